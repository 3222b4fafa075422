package zimage

// The image service (docs/design.md#the-service-behind-it) as the rest of the
// gateway sees it: the generator interface that the client and the demo
// implement, the request body, and the upstream block's config, Caddyfile
// parsing and provisioning (forward_proxy_url included). The HTTP call is
// in upstream_client.go, the reading of its answers in upstream_answer.go,
// the accounts in accounts.go.

import (
	"context"
	"fmt"
	"math"
	"net/http"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
)

// generator makes one attempt at one image with one account's key and
// returns its URL and what the service said about it. origin is the
// scheme://host of the client's request, for generators that serve the
// image themselves (the demo). Retries, failover and slots are the
// account pool's (account_pool.go, failover.go).
type generator interface {
	generate(ctx context.Context, key string, req upstreamRequest, origin string) (upstreamResult, *upstreamError)
}

// upstreamResult is a successful generation.
type upstreamResult struct {
	imageURL string
	info     upstreamInfo
}

// upstreamInfo is what the service's success answer tells besides the
// URL (docs/design.md#points); each part may be absent.
type upstreamInfo struct {
	pointsUsed, remainingPoints       float64
	hasPointsUsed, hasRemainingPoints bool
	imageID, modelName                string
}

// upstreamRequest is the image service's request body (docs/design.md#the-prompt).
type upstreamRequest struct {
	Prompt         string  `json:"prompt"`
	Width          int     `json:"width"`
	Height         int     `json:"height"`
	Steps          int     `json:"steps"`
	CFG            float64 `json:"cfg"`
	ModelIndex     int     `json:"model_index"`
	Seed           int64   `json:"seed"`
	NegativePrompt string  `json:"negative_prompt,omitempty"`

	// ImageSource makes the request an edit (docs/design.md#edits): the service
	// downloads the source from this URL, and the body carries only the
	// instruction and the model (see MarshalJSON).
	ImageSource string `json:"-"`
}

// MarshalJSON writes the image service's request body: an edit carries the
// instruction, the model, the source's URL and the size (docs/design.md#edits), a
// generation everything else. It fails only on a cfg that is not finite,
// as json.Marshal would.
func (u upstreamRequest) MarshalJSON() ([]byte, error) {
	dst := make([]byte, 0, 160+len(u.Prompt)+len(u.NegativePrompt)+len(u.ImageSource))
	dst = append(dst, `{"prompt":`...)
	dst = appendJSONString(dst, u.Prompt)
	if u.ImageSource != "" {
		dst = append(dst, `,"model_index":`...)
		dst = strconv.AppendInt(dst, int64(u.ModelIndex), 10)
		dst = append(dst, `,"image_source":`...)
		dst = appendJSONString(dst, u.ImageSource)
		dst = append(dst, `,"width":`...)
		dst = strconv.AppendInt(dst, int64(u.Width), 10)
		dst = append(dst, `,"height":`...)
		dst = strconv.AppendInt(dst, int64(u.Height), 10)
		return append(dst, '}'), nil
	}
	if math.IsInf(u.CFG, 0) || math.IsNaN(u.CFG) {
		return nil, fmt.Errorf("json: unsupported value: %v", u.CFG)
	}
	dst = append(dst, `,"width":`...)
	dst = strconv.AppendInt(dst, int64(u.Width), 10)
	dst = append(dst, `,"height":`...)
	dst = strconv.AppendInt(dst, int64(u.Height), 10)
	dst = append(dst, `,"steps":`...)
	dst = strconv.AppendInt(dst, int64(u.Steps), 10)
	dst = append(dst, `,"cfg":`...)
	dst = appendJSONFloat(dst, u.CFG)
	dst = append(dst, `,"model_index":`...)
	dst = strconv.AppendInt(dst, int64(u.ModelIndex), 10)
	dst = append(dst, `,"seed":`...)
	dst = strconv.AppendInt(dst, u.Seed, 10)
	if u.NegativePrompt != "" {
		dst = append(dst, `,"negative_prompt":`...)
		dst = appendJSONString(dst, u.NegativePrompt)
	}
	return append(dst, '}'), nil
}

// checkHTTPURL accepts absolute http and https URLs only.
func checkHTTPURL(s string) error {
	u, err := url.Parse(s)
	if err != nil {
		return fmt.Errorf("invalid URL %q: %v", s, err)
	}
	if (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
		return fmt.Errorf("invalid URL %q: want an absolute http:// or https:// URL", s)
	}
	return nil
}

// UpstreamConfig configures the image service client.
type UpstreamConfig struct {
	// URL is the generate_image endpoint, or "demo" to render placeholder
	// images locally without an account. Placeholders are accepted.
	// Default: https://sd.exacg.cc/api/v1/generate_image.
	URL string `json:"url,omitempty"`

	// APIKey is sent to the image service as a bearer token: the one
	// account named "default". Placeholders are accepted. Default: the
	// environment variable SD_API_KEY. Required unless URL is "demo" or
	// Accounts are given (not both).
	APIKey string `json:"api_key,omitempty"`

	// Accounts are several accounts of the image service, used instead of
	// APIKey: each generation goes to the account with the most free
	// slots, and a failing account's work moves to the others (docs/design.md#accounts).
	Accounts []AccountConfig `json:"accounts,omitempty"`

	// Timeout bounds one whole generation: every attempt, failovers and
	// retries included, and the image's download. Default: 180s.
	Timeout caddy.Duration `json:"timeout,omitempty"`

	// MaxConcurrent is the most generations in flight at once on the
	// account of APIKey, across all endpoints and sites that use the same
	// URL and key. 0 means unlimited. With Accounts, each account has its
	// own max_concurrent instead.
	MaxConcurrent int `json:"max_concurrent,omitempty"`

	// QueueTimeout is how long a request may wait for a free slot before it
	// is answered with 429. Default: the upstream timeout.
	QueueTimeout caddy.Duration `json:"queue_timeout,omitempty"`

	// PointsRest is how long an account rests when the service says it has
	// no points left, or when a generation's remaining_points is below its
	// points_used (docs/design.md#failover-and-rests); an account block may set its own.
	// Default: 1h.
	PointsRest caddy.Duration `json:"points_rest,omitempty"`

	// Retries is how many more attempts a generation may make after a
	// failed one: on another account at once after a 429, a connection
	// error or a 5xx (failover), or on the same account, after a short
	// backoff, after a connection error or a 502/503/504 when no other
	// account is free; never after other statuses or a timeout.
	// Default: 1, or one less than the number of accounts when that is
	// more, so that every account may be tried once.
	Retries *int `json:"retries,omitempty"`

	// ForwardProxyURL sends the generation calls and the image downloads
	// through this HTTP(S) proxy, http://[user:pass@]host:port or https://…
	// (the name Caddy's reverse_proxy HTTP transport uses; docs/design.md#failover-and-rests):
	// for servers whose address the service's Cloudflare refuses. Its
	// credentials are secrets like keys: they never appear in an answer or
	// a log line. Placeholders are accepted. Default: the environment's
	// HTTPS_PROXY, HTTP_PROXY and NO_PROXY, as Go reads them.
	ForwardProxyURL string `json:"forward_proxy_url,omitempty"`
}

// provisionUpstream resolves the image service settings and builds its
// client (or the demo renderer) and the account pool with its shared
// limiters. It returns the resolved config, whose accounts carry their keys.
func (g *Gateway) provisionUpstream(ctx caddy.Context, resolve func(v, env string) string) (UpstreamConfig, error) {
	var uc UpstreamConfig
	if g.Upstream != nil {
		uc = *g.Upstream
		uc.Accounts = slices.Clone(uc.Accounts)
	}
	uc.URL = resolve(uc.URL, "")
	if uc.URL == "" {
		uc.URL = defaultUpstreamURL
	}
	demo := strings.EqualFold(uc.URL, demoUpstream)
	if demo {
		uc.URL = demoUpstream
	}
	if uc.Timeout <= 0 {
		uc.Timeout = caddy.Duration(defaultUpstreamTimeout)
	}
	if uc.QueueTimeout <= 0 {
		uc.QueueTimeout = uc.Timeout
	}
	g.timeout = time.Duration(uc.Timeout)
	if uc.MaxConcurrent < 0 {
		return uc, fmt.Errorf("zimage_gateway: upstream: max_concurrent must be 0 (unlimited) or more, got %d", uc.MaxConcurrent)
	}
	uc.ForwardProxyURL = resolve(uc.ForwardProxyURL, "")
	if _, err := parseProxyURL(uc.ForwardProxyURL); err != nil {
		return uc, err
	}
	if err := resolveAccounts(&uc, resolve, demo); err != nil {
		return uc, err
	}
	// the default lets every account be tried once, however many there
	// are: only a value the operator wrote is held to the bound
	retries := max(defaultRetries, len(uc.Accounts)-1)
	if uc.Retries != nil {
		retries = *uc.Retries
		if retries < 0 || retries > 10 {
			return uc, fmt.Errorf("zimage_gateway: upstream: retries must be between 0 and 10, got %d", retries)
		}
	}

	if demo {
		g.upstream = demoGenerator{}
		g.logger.Warn("zimage_gateway is using the demo upstream: images are local placeholders, the image service is never called")
	} else {
		if err := checkHTTPURL(uc.URL); err != nil {
			return uc, fmt.Errorf("zimage_gateway: upstream: %v", err)
		}
		tr := newTransport()
		tr.Proxy = uc.proxy()
		ic, err := newImageClient(uc.URL, time.Duration(uc.Timeout), tr)
		if err != nil {
			return uc, fmt.Errorf("zimage_gateway: upstream: %v", err)
		}
		if uc.ForwardProxyURL == "" {
			ic.proxyName = proxyNameEnvironment
		}
		g.upstream = ic
	}
	// the handlers of one config load share a limit per account (docs/design.md#accounts)
	g.accounts = newAccountPool(uc, retries, configGeneration(ctx), g.logger)
	return uc, nil
}

func unmarshalUpstream(d *caddyfile.Dispenser) (*UpstreamConfig, error) {
	u := new(UpstreamConfig)
	if d.NextArg() {
		u.URL = d.Val()
	}
	if d.NextArg() {
		return nil, d.ArgErr()
	}
	err := eachOption(d, "upstream", func(opt string) (err error) {
		switch opt {
		case "api_key":
			u.APIKey, err = optionalArg(d)
		case "account":
			var a AccountConfig
			if a, err = unmarshalAccount(d, u.Accounts); err == nil {
				u.Accounts = append(u.Accounts, a)
			}
		case "timeout":
			u.Timeout, err = parseDuration(d)
		case "queue_timeout":
			u.QueueTimeout, err = parseDuration(d)
		case "points_rest":
			u.PointsRest, err = parseDuration(d)
		case "max_concurrent":
			u.MaxConcurrent, err = parseInt(d, 0)
		case "forward_proxy_url":
			u.ForwardProxyURL, err = optionalArg(d)
		case "retries":
			var n int
			n, err = parseInt(d, 0)
			u.Retries = &n
		default:
			return d.Errf("unrecognized zimage_gateway upstream option '%s'", opt)
		}
		return err
	}, "account")
	if err != nil {
		return nil, err
	}
	if err := checkAccountsBlock(u); err != nil {
		return nil, d.Errf("%v", err)
	}
	return u, nil
}

// parseProxyURL checks forward_proxy_url: empty (the environment's proxy),
// or an absolute http(s) URL of a proxy. Its error never quotes the URL,
// which may carry credentials.
func parseProxyURL(s string) (*url.URL, error) {
	if s == "" {
		return nil, nil
	}
	bad := func(why string) error {
		return fmt.Errorf("zimage_gateway: upstream: forward_proxy_url: %s; want http://[user:pass@]host:port or https://[user:pass@]host:port", why)
	}
	u, err := url.Parse(s)
	switch {
	case err != nil:
		return nil, bad("not a valid URL")
	case u.Scheme != "http" && u.Scheme != "https":
		return nil, bad("the scheme must be http or https")
	case u.Hostname() == "":
		return nil, bad("the URL names no host")
	case strings.Trim(u.Path, "/") != "" || u.RawQuery != "" || u.Fragment != "":
		return nil, bad("a proxy URL has no path or query")
	}
	if p := u.Port(); p != "" {
		if checkPort(p) != nil {
			return nil, bad("the port is not 1…65535")
		}
	}
	return u, nil
}

// proxy is the Proxy function of the transports that reach the service
// and its image hosts: forward_proxy_url when set, else the environment's
// (Provision has checked the URL).
func (uc UpstreamConfig) proxy() func(*http.Request) (*url.URL, error) {
	if u, _ := parseProxyURL(uc.ForwardProxyURL); u != nil {
		return http.ProxyURL(u)
	}
	return http.ProxyFromEnvironment
}

// proxySecrets are the credentials in forward_proxy_url, for the scrubber:
// the password and user:password (whose base64 is the Proxy-Authorization
// header), or a user name alone when it is the only credential (a token).
func proxySecrets(s string) []string {
	u, _ := parseProxyURL(s)
	if u == nil || u.User == nil {
		return nil
	}
	name := u.User.Username()
	if pass, ok := u.User.Password(); ok && pass != "" {
		return []string{pass, name + ":" + pass}
	}
	if name != "" {
		return []string{name}
	}
	return nil
}
