package zimage

import (
	"bytes"
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
)

// maxUpstreamBody bounds how much of the image service's answer is read: a
// success is a few hundred bytes, so anything near this is a broken server.
const maxUpstreamBody = 1 << 20

// generator produces one image and returns its URL. origin is the
// scheme://host of the client's request, for generators that serve the
// image themselves (the demo).
type generator interface {
	generate(ctx context.Context, req upstreamRequest, origin string) (string, error)
}

// upstreamRequest is the image service's request body (SPEC §4 step 6).
type upstreamRequest struct {
	Prompt         string  `json:"prompt"`
	Width          int     `json:"width"`
	Height         int     `json:"height"`
	Steps          int     `json:"steps"`
	CFG            float64 `json:"cfg"`
	ModelIndex     int     `json:"model_index"`
	Seed           int64   `json:"seed"`
	NegativePrompt string  `json:"negative_prompt,omitempty"`

	// ImageSource makes the request an edit (SPEC §10): the service
	// downloads the source from this URL, and the body carries only the
	// instruction and the model (see MarshalJSON in edits.go).
	ImageSource string `json:"-"`
}

// Kinds of upstream failure, as counted in caddy_zimage_upstream_errors_total.
const (
	kindTimeout     = "timeout"
	kindRefused     = "refused"
	kind5xx         = "status_5xx"
	kind429         = "status_429"
	kindBadResponse = "bad_response"
	kindCanceled    = "canceled" // the client left; not counted as an upstream error
)

// upstreamError is a failed generation, classified for the status it maps
// to (429, 504, 502) and for metrics.
type upstreamError struct {
	kind       string
	message    string // for the client, scrubbed and shortened by apiError
	detail     string // for the log only: the Go error chain, with addresses
	retryAfter string
	retryable  bool
}

func (e *upstreamError) Error() string { return "upstream " + e.kind + ": " + e.message }

// apiError maps the failure to the client's answer.
func (e *upstreamError) apiError(scrub *scrubber) *apiError {
	// scrub first, then shorten: a key that straddles the cut must not
	// leave its first half behind (issue 8)
	msg := truncate(scrub.Replace(e.message), maxMessageRunes)
	switch e.kind {
	case kind429:
		ra := e.retryAfter
		if ra == "" {
			ra = "10"
		}
		return &apiError{status: http.StatusTooManyRequests, typ: "rate_limit_error", code: "rate_limit_exceeded", retryAfter: ra,
			message: "The image service is rate limiting requests: " + msg}
	case kindTimeout:
		return &apiError{status: http.StatusGatewayTimeout, typ: "upstream_error", code: "upstream_timeout",
			message: "The image service did not answer in time: " + msg}
	case kindCanceled:
		return &apiError{status: 499, typ: "invalid_request_error", code: "client_closed_request", message: "The client closed the request"}
	}
	return &apiError{status: http.StatusBadGateway, typ: "upstream_error", code: "upstream_error",
		message: "The image service failed: " + msg}
}

// imageClient calls the 梦羽 generate_image endpoint.
type imageClient struct {
	url     string
	key     string
	timeout time.Duration
	retries int
	client  *http.Client

	// retried, when set, is told of each failed attempt that is about to
	// be retried, so that transient failures show in the logs and in
	// caddy_zimage_upstream_errors_total even when the retry succeeds
	retried func(err *upstreamError, attempt int)
}

func newImageClient(u, key string, timeout time.Duration, retries int) *imageClient {
	return &imageClient{
		url:     u,
		key:     key,
		timeout: timeout,
		retries: retries,
		client:  newKeyedClient(),
	}
}

// newKeyedClient is the HTTP client for calls that carry a key in their
// Authorization header (the image service, the LLM): it follows no
// redirect at all, not even to the same host over plain HTTP, so the key
// goes only where it was configured to go.
func newKeyedClient() *http.Client {
	return &http.Client{
		Transport: newTransport(),
		CheckRedirect: func(*http.Request, []*http.Request) error {
			return errors.New("redirects are not followed")
		},
	}
}

// closeIdle closes the client's idle keep-alive connections (and with them
// their goroutines); calls in flight are not affected.
func (c *imageClient) closeIdle() { c.client.CloseIdleConnections() }

// newTransport is the transport for the image service and the LLM: keeps
// connections warm for many concurrent generations and bounds connecting;
// the whole call is bounded by the caller's context.
func newTransport() *http.Transport {
	return &http.Transport{
		Proxy: http.ProxyFromEnvironment,
		DialContext: (&net.Dialer{
			Timeout:   10 * time.Second,
			KeepAlive: 30 * time.Second,
		}).DialContext,
		ForceAttemptHTTP2:   true,
		MaxIdleConns:        1024,
		MaxIdleConnsPerHost: 256,
		IdleConnTimeout:     90 * time.Second,
		TLSHandshakeTimeout: 10 * time.Second,
		// requests and answers are a few hundred bytes: the default 4 KiB
		// buffers per connection are memory that thousands of concurrent
		// slow generations hold for nothing
		WriteBufferSize: 2 << 10,
		ReadBufferSize:  2 << 10,
	}
}

// generate calls the service, retrying connection errors and 502/503/504
// with jittered backoff, all within the configured timeout.
func (c *imageClient) generate(ctx context.Context, req upstreamRequest, _ string) (string, error) {
	body, err := json.Marshal(req)
	if err != nil {
		return "", &upstreamError{kind: kindBadResponse, message: "encoding request: " + err.Error()}
	}
	parent := ctx
	ctx, cancel := context.WithTimeout(ctx, c.timeout)
	defer cancel()

	for attempt := 0; ; attempt++ {
		imageURL, uerr := c.try(ctx, parent, body)
		if uerr == nil {
			return imageURL, nil
		}
		if !uerr.retryable || attempt >= c.retries {
			return "", uerr
		}
		// 250ms, 500ms, 1s… each with ±50% jitter, so retries of many
		// requests after one outage do not arrive together
		backoff := time.Duration(float64(250*time.Millisecond<<attempt) * (0.5 + rand.Float64()))
		if dl, ok := ctx.Deadline(); ok && time.Until(dl) < backoff {
			return "", uerr
		}
		if c.retried != nil {
			c.retried(uerr, attempt+1)
		}
		t := time.NewTimer(backoff)
		select {
		case <-ctx.Done():
			t.Stop()
			return "", classifyCtx(parent, c.timeout)
		case <-t.C:
		}
	}
}

// classifyCtx tells a client that left from a call that ran out of time.
func classifyCtx(parent context.Context, timeout time.Duration) *upstreamError {
	if parent.Err() != nil {
		return &upstreamError{kind: kindCanceled, message: "client went away"}
	}
	return &upstreamError{kind: kindTimeout, message: "no answer within " + timeout.String()}
}

// upstreamAnswer is the service's reply; error texts come in several shapes.
type upstreamAnswer struct {
	Success *bool `json:"success"`
	Data    struct {
		ImageURL string `json:"image_url"`
	} `json:"data"`
	Error   json.RawMessage `json:"error"`
	Message string          `json:"message"`
}

// try makes one attempt.
func (c *imageClient) try(ctx, parent context.Context, body []byte) (string, *upstreamError) {
	hreq, err := http.NewRequestWithContext(ctx, http.MethodPost, c.url, bytes.NewReader(body))
	if err != nil {
		return "", &upstreamError{kind: kindBadResponse, message: err.Error()}
	}
	hreq.Header.Set("Content-Type", "application/json")
	hreq.Header.Set("Accept", "application/json")
	hreq.Header.Set("Authorization", "Bearer "+c.key)
	resp, err := c.client.Do(hreq)
	if err != nil {
		if ctx.Err() != nil {
			return "", classifyCtx(parent, c.timeout)
		}
		return "", &upstreamError{kind: kindRefused, message: describeNetErr("the image service", err), detail: err.Error(), retryable: true}
	}
	defer resp.Body.Close()
	raw, err := io.ReadAll(io.LimitReader(resp.Body, maxUpstreamBody+1))
	if err != nil {
		if ctx.Err() != nil {
			return "", classifyCtx(parent, c.timeout)
		}
		return "", &upstreamError{kind: kindRefused, message: describeNetErr("the image service", err) + " while answering", detail: err.Error(), retryable: true}
	}
	if len(raw) > maxUpstreamBody {
		return "", &upstreamError{kind: kindBadResponse, message: fmt.Sprintf("answer larger than %d bytes", maxUpstreamBody)}
	}

	var ans upstreamAnswer
	jsonErr := json.Unmarshal(raw, &ans)
	switch {
	case resp.StatusCode == http.StatusTooManyRequests:
		return "", &upstreamError{kind: kind429, message: upstreamMessage(ans, resp.Status),
			retryAfter: cleanRetryAfter(resp.Header.Get("Retry-After"))}
	case resp.StatusCode >= 500:
		switch resp.StatusCode {
		case http.StatusBadGateway, http.StatusServiceUnavailable, http.StatusGatewayTimeout:
			return "", &upstreamError{kind: kind5xx, message: upstreamMessage(ans, resp.Status), retryable: true}
		}
		return "", &upstreamError{kind: kind5xx, message: upstreamMessage(ans, resp.Status)}
	case resp.StatusCode < 200 || resp.StatusCode > 299:
		return "", &upstreamError{kind: kindBadResponse, message: upstreamMessage(ans, resp.Status)}
	case jsonErr != nil:
		return "", &upstreamError{kind: kindBadResponse, message: "answer is not valid JSON"}
	case ans.Success == nil || !*ans.Success:
		return "", &upstreamError{kind: kindBadResponse, message: upstreamMessage(ans, "generation was not successful")}
	case strings.TrimSpace(ans.Data.ImageURL) == "":
		return "", &upstreamError{kind: kindBadResponse, message: "answer has no image_url"}
	}
	imageURL := strings.TrimSpace(ans.Data.ImageURL)
	// the URL goes into markdown and may be downloaded: only http(s) links
	// (never javascript: or data:) are passed on
	if checkHTTPURL(imageURL) != nil {
		return "", &upstreamError{kind: kindBadResponse, message: "answer has an image_url that is not an http(s) URL"}
	}
	return imageURL, nil
}

// upstreamMessage picks the service's own error text (error, error.message
// or message); fallback when it gave none. It is shortened only after
// scrubbing, in apiError.
func upstreamMessage(ans upstreamAnswer, fallback string) string {
	msg := ans.Message
	if len(ans.Error) > 0 {
		var s string
		var obj struct {
			Message string `json:"message"`
		}
		if json.Unmarshal(ans.Error, &s) == nil && s != "" {
			msg = s
		} else if json.Unmarshal(ans.Error, &obj) == nil && obj.Message != "" {
			msg = obj.Message
		}
	}
	msg = strings.TrimSpace(msg)
	if msg == "" {
		return fallback
	}
	return msg
}

// cleanRetryAfter passes on a Retry-After in seconds or HTTP-date form, and
// drops anything else rather than echo arbitrary upstream bytes.
func cleanRetryAfter(v string) string {
	v = strings.TrimSpace(v)
	if n, err := strconv.Atoi(v); err == nil && n >= 0 {
		return strconv.Itoa(n)
	}
	if _, err := http.ParseTime(v); err == nil {
		return v
	}
	return ""
}

// maxMessageRunes is how much of a party's own error text reaches a client.
const maxMessageRunes = 300

// describeNetErr says in plain words what went wrong with a connection to
// party. Clients get only this: the Go error chain names internal addresses
// ("read tcp 127.0.0.1:42202->…"), which go to the log alone (issue 8).
func describeNetErr(party string, err error) string {
	var ne net.Error
	var dnsErr *net.DNSError
	var oe *net.OpError
	var certErr *tls.CertificateVerificationError
	var recErr tls.RecordHeaderError
	switch {
	case errors.Is(err, context.DeadlineExceeded) || errors.As(err, &ne) && ne.Timeout():
		return party + " did not answer in time"
	case errors.Is(err, syscall.ECONNREFUSED):
		return party + " refused the connection"
	case errors.As(err, &dnsErr):
		return "the host name of " + party + " could not be resolved"
	case errors.As(err, &certErr), errors.As(err, &recErr):
		return "the TLS connection to " + party + " failed"
	case errors.Is(err, io.EOF), errors.Is(err, io.ErrUnexpectedEOF),
		errors.Is(err, syscall.ECONNRESET), errors.Is(err, syscall.EPIPE):
		return party + " closed the connection"
	case errors.As(err, &oe) && oe.Op == "dial":
		return party + " could not be reached"
	}
	return "the connection to " + party + " failed"
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

	// APIKey is sent to the image service as a bearer token. Placeholders
	// are accepted. Default: the environment variable SD_API_KEY. Required
	// unless URL is "demo".
	APIKey string `json:"api_key,omitempty"`

	// Timeout bounds one whole generation call, retries included.
	// Default: 180s.
	Timeout caddy.Duration `json:"timeout,omitempty"`

	// MaxConcurrent is the most generations in flight to this upstream at
	// once, across all endpoints and sites that share it. 0 means unlimited.
	MaxConcurrent int `json:"max_concurrent,omitempty"`

	// QueueTimeout is how long a request may wait for a free slot before it
	// is answered with 429. Default: the upstream timeout.
	QueueTimeout caddy.Duration `json:"queue_timeout,omitempty"`

	// Retries is how many times a call is retried after a connection error
	// or an upstream 502/503/504; never after other statuses or a timeout.
	// Default: 1.
	Retries *int `json:"retries,omitempty"`
}

// provisionUpstream resolves the image service settings and builds its
// client (or the demo renderer) and the shared concurrency limiter.
func (g *Gateway) provisionUpstream(resolve func(v, env string) string) (UpstreamConfig, error) {
	var uc UpstreamConfig
	if g.Upstream != nil {
		uc = *g.Upstream
	}
	uc.URL = resolve(uc.URL, "")
	if uc.URL == "" {
		uc.URL = defaultUpstreamURL
	}
	uc.APIKey = resolve(uc.APIKey, "SD_API_KEY")
	if uc.Timeout <= 0 {
		uc.Timeout = caddy.Duration(defaultUpstreamTimeout)
	}
	if uc.QueueTimeout <= 0 {
		uc.QueueTimeout = uc.Timeout
	}
	g.timeout = time.Duration(uc.Timeout)
	retries := defaultRetries
	if uc.Retries != nil {
		retries = *uc.Retries
	}
	if retries < 0 || retries > 10 {
		return uc, fmt.Errorf("zimage_gateway: upstream: retries must be between 0 and 10, got %d", retries)
	}
	if uc.MaxConcurrent < 0 {
		return uc, fmt.Errorf("zimage_gateway: upstream: max_concurrent must be 0 (unlimited) or more, got %d", uc.MaxConcurrent)
	}

	if strings.EqualFold(uc.URL, demoUpstream) {
		uc.URL = demoUpstream
		g.upstream = demoGenerator{}
		g.logger.Warn("zimage_gateway is using the demo upstream: images are local placeholders, the image service is never called")
	} else {
		if err := checkHTTPURL(uc.URL); err != nil {
			return uc, fmt.Errorf("zimage_gateway: upstream: %v", err)
		}
		if uc.APIKey == "" {
			return uc, errors.New("zimage_gateway: upstream: no API key for the image service: set 'api_key' in the upstream block or the SD_API_KEY environment variable (or use 'upstream demo' to try the gateway without an account)")
		}
		ic := newImageClient(uc.URL, uc.APIKey, time.Duration(uc.Timeout), retries)
		ic.retried = g.upstreamRetried
		g.upstream = ic
	}

	if uc.MaxConcurrent > 0 {
		g.limiterKey = fmt.Sprintf("%s|%d", uc.URL, uc.MaxConcurrent)
		val, _, _ := limiters.LoadOrNew(g.limiterKey, func() (caddy.Destructor, error) {
			return newLimiter(uc.MaxConcurrent), nil
		})
		g.limiter = val.(*limiter)
		g.queueTimeout = time.Duration(uc.QueueTimeout)
	}
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
		case "timeout":
			u.Timeout, err = parseDuration(d)
		case "queue_timeout":
			u.QueueTimeout, err = parseDuration(d)
		case "max_concurrent":
			u.MaxConcurrent, err = parseInt(d, 0)
		case "retries":
			var n int
			n, err = parseInt(d, 0)
			u.Retries = &n
		default:
			return d.Errf("unrecognized zimage_gateway upstream option '%s'", opt)
		}
		return err
	})
	if err != nil {
		return nil, err
	}
	return u, nil
}
