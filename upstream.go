package zimage

import (
	"bytes"
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"net"
	"net/http"
	"net/http/httptrace"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
	"unicode"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
)

// maxUpstreamBody bounds how much of the image service's answer is read: a
// success is a few hundred bytes, so anything near this is a broken server.
const maxUpstreamBody = 1 << 20

// generator makes one attempt at one image with one account's key and
// returns its URL and what the service said about it. origin is the
// scheme://host of the client's request, for generators that serve the
// image themselves (the demo). Retries, failover and slots are the
// account pool's (accounts.go).
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

// Kinds of upstream failure, as counted in caddy_zimage_upstream_errors_total.
const (
	kindTimeout     = "timeout"
	kindRefused     = "refused"
	kind5xx         = "status_5xx"
	kind429         = "status_429"
	kindBadResponse = "bad_response"
	kindBlocked     = "blocked"   // a Cloudflare challenge page instead of an answer (docs/design.md#failover-and-rests)
	kindNoPoints    = "no_points" // the account is out of points (docs/design.md#failover-and-rests, isNoPoints)
	kindProxy       = "proxy"     // the forward proxy failed, no account's fault (imageClient.proxyFailure)
	kindCanceled    = "canceled"  // the client left; not counted as an upstream error
)

// upstreamError is a failed generation, classified for the status it maps
// to (429, 504, 502) and for metrics.
type upstreamError struct {
	kind       string
	message    string // for the client, scrubbed and shortened by apiError
	detail     string // for the log only: the Go error chain, with addresses
	retryAfter string
	retryable  bool
	// allOut is set by the account pool on a no_points failure when every
	// account of the pool is out of points (docs/design.md#failover-and-rests)
	allOut bool
}

func (e *upstreamError) Error() string { return "upstream " + e.kind + ": " + e.message }

// apiError maps the failure to the client's answer.
func (e *upstreamError) apiError(scrub *scrubber) *apiError {
	// scrub first, then shorten: a key that straddles the cut must not
	// leave its first half behind
	msg := truncate(scrub.Replace(e.message), maxMessageRunes)
	switch e.kind {
	case kind429:
		// the client is told what the gateway itself does: the account
		// rests this long, the service's Retry-After capped, never the service's header as it came
		ra := retryAfterSeconds(restFor(e, 0, time.Now()))
		return &apiError{status: http.StatusTooManyRequests, typ: "rate_limit_error", code: "rate_limit_exceeded", retryAfter: ra,
			message: "The image service is rate limiting requests: " + msg}
	case kindNoPoints:
		if e.allOut {
			// no Retry-After: while every account rests the gateway still
			// asks them (a top-up works at once), so there is no time to name
			return &apiError{status: http.StatusBadGateway, typ: "upstream_error", code: "no_points",
				message: "The image service accounts have no points left (add points to an account, or add an account): " + msg}
		}
	case kindTimeout:
		return &apiError{status: http.StatusGatewayTimeout, typ: "upstream_error", code: "upstream_timeout",
			message: "The image service did not answer in time: " + msg}
	case kindCanceled:
		return &apiError{status: 499, typ: "invalid_request_error", code: "client_closed_request", message: "The client closed the request"}
	case kindProxy:
		return &apiError{status: http.StatusBadGateway, typ: "upstream_error", code: "upstream_proxy",
			message: "The image service was not reached: " + msg}
	case kindBlocked:
		// the message is ours alone: the challenge page is never passed on
		return &apiError{status: http.StatusBadGateway, typ: "upstream_error", code: "upstream_blocked",
			message: "The image service's Cloudflare protection refused the request (it answered a challenge page instead of an image); retry later"}
	}
	return &apiError{status: http.StatusBadGateway, typ: "upstream_error", code: "upstream_error",
		message: "The image service failed: " + msg}
}

// imageClient calls the 梦羽 generate_image endpoint, one attempt at a
// time, with the key of the account the pool chose.
type imageClient struct {
	url     *url.URL      // parsed once, not per call
	timeout time.Duration // for the message of a timeout
	// the calls go straight to the transport, which follows no redirect:
	// the key goes only where it was configured to go (classifyAnswer
	// answers a 3xx as one), and http.Client's redirect machinery would
	// copy the headers on every call for nothing
	transport *http.Transport

	// proxy is the proxy the transport sends the calls through (nil for
	// none), fixed for the one URL the client calls; proxyName is what
	// its errors call it
	proxy     *url.URL
	proxyName string
}

// Names of the proxy in the errors that blame it.
const (
	proxyNameConfigured  = "the forward proxy (forward_proxy_url)"
	proxyNameEnvironment = "the forward proxy (HTTPS_PROXY or HTTP_PROXY of the environment)"
)

// newImageClient calls the service at u, an absolute http(s) URL
// (checkHTTPURL), through transport, whose Proxy is set already; a
// client whose proxy comes from the environment should say so in
// proxyName.
func newImageClient(u string, timeout time.Duration, transport *http.Transport) (*imageClient, error) {
	parsed, err := url.Parse(u)
	if err != nil {
		return nil, err
	}
	c := &imageClient{url: parsed, timeout: timeout, transport: transport, proxyName: proxyNameConfigured}
	if transport.Proxy != nil {
		c.proxy, _ = transport.Proxy(&http.Request{Method: http.MethodPost, URL: parsed, Header: http.Header{}})
	}
	if c.proxy != nil && transport.OnProxyConnectResponse == nil {
		transport.OnProxyConnectResponse = refuseProxyConnect
	}
	return c, nil
}

// proxyRefusal is a forward proxy's answer other than 200 to the CONNECT
// of an https call: it refused to open the tunnel to the service.
type proxyRefusal struct{ status int }

func (e *proxyRefusal) Error() string {
	msg := "refused the request: " + strconv.Itoa(e.status) + " " + http.StatusText(e.status)
	if e.status == http.StatusProxyAuthRequired {
		msg += "; check the user and password it is given"
	}
	return msg
}

// refuseProxyConnect turns a refused CONNECT into a proxyRefusal, which
// names the status (Go's own error would carry the proxy's reason
// phrase, whatever the proxy wrote there).
func refuseProxyConnect(_ context.Context, _ *url.URL, _ *http.Request, res *http.Response) error {
	if res.StatusCode != http.StatusOK {
		return &proxyRefusal{status: res.StatusCode}
	}
	return nil
}

// tunnelTrace watches an https call through a proxy: whether the
// transport got past the proxy's CONNECT (the service's TLS handshake
// began, or a connection came from the pool), which tells the proxy's
// failures from the service's.
type tunnelTrace struct {
	tlsStarts atomic.Int32
	gotConn   atomic.Bool
}

func (tt *tunnelTrace) trace() *httptrace.ClientTrace {
	return &httptrace.ClientTrace{
		TLSHandshakeStart: func() { tt.tlsStarts.Add(1) },
		GotConn:           func(httptrace.GotConnInfo) { tt.gotConn.Store(true) },
	}
}

// proxyFailure classifies a call through the proxy that got no answer:
// the proxy's fault (kind proxy) when the proxy itself failed, else nil.
// Through a proxy to a plain-http URL every byte comes from the proxy,
// so every such failure is the proxy's; to an https URL only those
// before the tunnel to the service was open (the dial of the proxy, its
// answer to CONNECT), as what follows is the service's TLS.
func (c *imageClient) proxyFailure(err error, tt *tunnelTrace) *upstreamError {
	if c.proxy == nil {
		return nil
	}
	var refusal *proxyRefusal
	if errors.As(err, &refusal) {
		return &upstreamError{kind: kindProxy, message: c.proxyName + " " + refusal.Error(), detail: err.Error()}
	}
	var oe *net.OpError
	proxys := c.url.Scheme != "https" || // plain http: the proxy answers
		errors.As(err, &oe) && oe.Op == "proxyconnect" || // its dial, its TLS
		tt != nil && !tt.gotConn.Load() && int(tt.tlsStarts.Load()) <= proxyTLSHandshakes(c.proxy) // its CONNECT
	if !proxys {
		return nil
	}
	return &upstreamError{kind: kindProxy, message: describeNetErr(c.proxyName, err), detail: err.Error()}
}

// proxyTLSHandshakes is how many TLS handshakes a call makes with proxy
// itself before the tunnel: one with an https proxy.
func proxyTLSHandshakes(proxy *url.URL) int {
	if proxy.Scheme == "https" {
		return 1
	}
	return 0
}

// newKeyedClient is the HTTP client for calls that carry a key in their
// Authorization header (the LLM; the image service's calls go to the
// transport itself, see imageClient): it follows no
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
func (c *imageClient) closeIdle() { c.transport.CloseIdleConnections() }

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

// errGenerationTimeout is the cause of the context of a generation that
// ran out of its timeout, which tells it from a client that left.
var errGenerationTimeout = errors.New("generation timeout")

// ctxFailure classifies a call cut short by its context: the generation's
// timeout, or the client that went away.
func ctxFailure(ctx context.Context, timeout time.Duration) *upstreamError {
	if errors.Is(context.Cause(ctx), errGenerationTimeout) || errors.Is(ctx.Err(), context.DeadlineExceeded) {
		return &upstreamError{kind: kindTimeout, message: "no answer within " + timeout.String()}
	}
	return &upstreamError{kind: kindCanceled, message: "client went away"}
}

// upstreamAnswer is the service's reply; error texts come in several shapes.
// The optional parts of data read what they can and never fail, so that a
// type the gateway did not expect there never turns a success into a
// failure.
type upstreamAnswer struct {
	Success *bool `json:"success"`
	Data    struct {
		ImageURL        string       `json:"image_url"`
		PointsUsed      answerPoints `json:"points_used"`
		RemainingPoints answerPoints `json:"remaining_points"`
		ImageID         answerText   `json:"image_id"`
		ModelName       answerText   `json:"model_name"`
	} `json:"data"`
	Error   answerError `json:"error"`
	Message string      `json:"message"`
}

// answerPoints is a number of points: a JSON number or a numeric string
// (the service has sent both); anything else, or nothing, is absent.
type answerPoints struct {
	n  float64
	ok bool
}

func (p *answerPoints) UnmarshalJSON(b []byte) error {
	p.n, p.ok = parsePoints(b)
	return nil
}

// answerText is image_id or model_name, for the log (rawText).
type answerText string

func (t *answerText) UnmarshalJSON(b []byte) error {
	*t = answerText(rawText(b))
	return nil
}

// answerError is the text of the answer's error: the string itself, or
// the message of an object; "" for anything else.
type answerError string

func (e *answerError) UnmarshalJSON(b []byte) error {
	var s string
	var obj struct {
		Message string `json:"message"`
	}
	switch {
	case json.Unmarshal(b, &s) == nil && s != "":
		*e = answerError(s)
	case json.Unmarshal(b, &obj) == nil:
		*e = answerError(obj.Message)
	default:
		*e = ""
	}
	return nil
}

// answerBuffers are what the service's answers are read into: a success
// is a few hundred bytes.
var answerBuffers = sync.Pool{New: func() any {
	b := make([]byte, 0, 4<<10)
	return &b
}}

// generate makes one attempt with key.
func (c *imageClient) generate(ctx context.Context, key string, req upstreamRequest, _ string) (upstreamResult, *upstreamError) {
	// MarshalJSON directly: json.Marshal(req) would call it and then scan
	// and copy its output once more (compact), the largest part of the
	// cost that round 2's MarshalJSON added per request
	body, err := req.MarshalJSON()
	if err != nil {
		return upstreamResult{}, &upstreamError{kind: kindBadResponse, message: "encoding request: " + err.Error()}
	}
	hreq, err := http.NewRequestWithContext(ctx, http.MethodPost, "", bytes.NewReader(body))
	if err != nil {
		return upstreamResult{}, &upstreamError{kind: kindBadResponse, message: err.Error()}
	}
	// a transport only reads the request's URL, so all calls share one
	hreq.URL, hreq.Host = c.url, c.url.Host
	hreq.Header.Set("Content-Type", "application/json")
	hreq.Header.Set("Accept", "application/json")
	hreq.Header.Set("Authorization", "Bearer "+key)
	var tt *tunnelTrace
	if c.proxy != nil && c.url.Scheme == "https" {
		tt = new(tunnelTrace)
		hreq = hreq.WithContext(httptrace.WithClientTrace(ctx, tt.trace()))
	}
	resp, err := c.transport.RoundTrip(hreq)
	if err != nil {
		if ctx.Err() != nil {
			return upstreamResult{}, ctxFailure(ctx, c.timeout)
		}
		if ue := c.proxyFailure(err, tt); ue != nil {
			return upstreamResult{}, ue
		}
		return upstreamResult{}, &upstreamError{kind: kindRefused, message: describeNetErr("the image service", err), detail: err.Error(), retryable: true}
	}
	defer resp.Body.Close()
	if c.proxy != nil && resp.StatusCode == http.StatusProxyAuthRequired {
		// only a proxy answers 407: the configured one wants (other)
		// credentials
		return upstreamResult{}, &upstreamError{kind: kindProxy,
			message: c.proxyName + " " + (&proxyRefusal{status: resp.StatusCode}).Error()}
	}
	// read into a pooled buffer: parseAnswer keeps nothing of raw
	bp := answerBuffers.Get().(*[]byte)
	defer answerBuffers.Put(bp)
	raw, err := readFull(resp.Body, (*bp)[:0])
	if err == nil && len(raw) == cap(raw) {
		// larger than any success: the rest, up to the limit, elsewhere
		var rest []byte
		rest, err = io.ReadAll(io.LimitReader(resp.Body, maxUpstreamBody+1-int64(len(raw))))
		raw = append(raw[:len(raw):len(raw)], rest...)
	}
	if err != nil {
		if ctx.Err() != nil {
			return upstreamResult{}, ctxFailure(ctx, c.timeout)
		}
		return upstreamResult{}, &upstreamError{kind: kindRefused, message: describeNetErr("the image service", err) + " while answering", detail: err.Error(), retryable: true}
	}
	if len(raw) > maxUpstreamBody {
		return upstreamResult{}, &upstreamError{kind: kindBadResponse, message: fmt.Sprintf("answer larger than %d bytes", maxUpstreamBody)}
	}
	return parseAnswer(resp, raw, req.Prompt, req.NegativePrompt, req.ImageSource)
}

// parseAnswer reads the service's answer: an image, or a classified
// failure. A failure that says the account is out of points is kind
// no_points whatever its status (docs/design.md#failover-and-rests): an HTTP 402, or one whose own
// text isNoPoints. sent are the texts the request carried (its prompt
// as sent, the source image's URL), which the service may echo in its
// errors: they are no evidence about the account (isNoPoints,
// isChallenge).
func parseAnswer(resp *http.Response, raw []byte, sent ...string) (upstreamResult, *upstreamError) {
	if isChallenge(resp, raw, sent...) {
		// Cloudflare's "Just a moment…" page: nothing of it goes anywhere,
		// the log's detail names the status alone (docs/design.md#failover-and-rests)
		return upstreamResult{}, &upstreamError{kind: kindBlocked, message: "Cloudflare challenge page",
			detail: "HTTP " + strconv.Itoa(resp.StatusCode) + " with an HTML body"}
	}
	// decoded once, for the classification and the no_points check alike;
	// an HTML page only costs the decoder its first byte
	var ans upstreamAnswer
	jsonErr := json.Unmarshal(raw, &ans)
	res, ue := classifyAnswer(resp, raw, ans, jsonErr)
	if ue == nil {
		return res, ue
	}
	if resp.StatusCode == http.StatusPaymentRequired || isNoPoints(upstreamMessage(ans, ""), sent...) {
		return upstreamResult{}, &upstreamError{kind: kindNoPoints, message: upstreamMessage(ans, resp.Status)}
	}
	return res, ue
}

// The words the gateway takes for the service saying that an account has
// no points left: 积分 (points) and 余额 (balance) anywhere, the English
// ones as whole words. This and isChallenge are the one place where the
// gateway reads the service's words for a kind of failure; see
// isNoPoints.
var (
	noPointsHan     = [...]string{"积分", "余额"}
	noPointsEnglish = [...]string{"points", "balance", "insufficient"}
)

// isNoPoints reports whether a failure's own text (the service's error or
// message) says that the account has no points left (docs/design.md#failover-and-rests). No
// public client shows the service's words for it, so this is a guess, and
// one that fails safe: a failure it wrongly takes for no_points only moves
// the request to another account at once and rests this one (a resting
// account still serves when every account rests; a request rests at most
// one account so: accountPool.run), and one it misses is handled as its
// status says. It matches, case-insensitively, 积分 or 余额 anywhere, and
// the words "points", "balance" and "insufficient" when not part of a
// longer word ("insufficient_points" and "Points:" match, "endpoints" and
// "load balancer" do not). The README says the same.
//
// A word that one of sent (the texts the request carried: its prompt as
// sent to the service) contains is not read: the service may echo the
// prompt in its errors ("prompt contains a forbidden word: …"), whole,
// cut at any length, in another case or with its spaces changed, and a
// word the client wrote says nothing about the account. So the echo of
// "forbidden points" is no evidence, and neither is a real "insufficient
// points" for a prompt that says "insufficient points": that request gets
// the service's failure, and the next one that reaches the account rests
// it.
func isNoPoints(msg string, sent ...string) bool {
	return noPointsWords(msg, false)&^carriedWords(sent) != 0
}

// noPointsWords is the set of the words of the rule that s says (bit i:
// noPointsHan then noPointsEnglish), whole English words only, or any
// occurrence when anywhere is set.
func noPointsWords(s string, anywhere bool) (said uint) {
	for i, w := range noPointsHan {
		if strings.Contains(s, w) {
			said |= 1 << i
		}
	}
	word := func(run string) {
		for i, w := range noPointsEnglish {
			if strings.EqualFold(run, w) || anywhere && strings.Contains(run, w) {
				said |= 1 << (len(noPointsHan) + i)
			}
		}
	}
	if anywhere {
		word(s)
		return said
	}
	start := -1
	for i, r := range s {
		switch letter := unicode.IsLetter(r); {
		case letter && start < 0:
			start = i
		case !letter && start >= 0:
			word(s[start:i])
			start = -1
		}
	}
	if start >= 0 {
		word(s[start:])
	}
	return said
}

// carriedWords is the set of the rule's words that any of sent contains
// anywhere, read the way an echo may have changed it: in lower case, with
// full-width letters as ASCII and without spaces, control or invisible
// formatting characters (so "POI NTS" and "ｐｏｉｎｔｓ" carry "points").
func carriedWords(sent []string) (carried uint) {
	for _, s := range sent {
		if s == "" {
			continue
		}
		carried |= noPointsWords(foldEcho(s), true)
	}
	return carried
}

// foldEcho is s lower-cased, full-width ASCII folded to ASCII, and
// without spaces, control and format characters: what an echo of s could
// have become.
func foldEcho(s string) string {
	return strings.Map(func(r rune) rune {
		switch {
		case unicode.IsSpace(r) || unicode.IsControl(r) || unicode.Is(unicode.Cf, r):
			return -1
		case r >= '！' && r <= '～':
			r -= '！' - '!'
		}
		return unicode.ToLower(r)
	}, s)
}

// classifyAnswer is parseAnswer by status and shape alone; ans is raw
// decoded, jsonErr what decoding it gave.
func classifyAnswer(resp *http.Response, raw []byte, ans upstreamAnswer, jsonErr error) (upstreamResult, *upstreamError) {
	switch {
	case resp.StatusCode == http.StatusTooManyRequests:
		return upstreamResult{}, &upstreamError{kind: kind429, message: upstreamMessage(ans, resp.Status),
			retryAfter: cleanRetryAfter(resp.Header.Get("Retry-After"))}
	case resp.StatusCode >= 500:
		switch resp.StatusCode {
		case http.StatusBadGateway, http.StatusServiceUnavailable, http.StatusGatewayTimeout:
			return upstreamResult{}, &upstreamError{kind: kind5xx, message: upstreamMessage(ans, resp.Status), retryable: true}
		}
		return upstreamResult{}, &upstreamError{kind: kind5xx, message: upstreamMessage(ans, resp.Status)}
	case resp.StatusCode >= 300 && resp.StatusCode <= 399:
		// the key goes only to the configured URL (imageClient)
		return upstreamResult{}, &upstreamError{kind: kindBadResponse,
			message: "it answered " + resp.Status + ", a redirect, which the gateway does not follow: set the upstream URL to where it leads"}
	case resp.StatusCode < 200 || resp.StatusCode > 299:
		return upstreamResult{}, &upstreamError{kind: kindBadResponse, message: upstreamMessage(ans, resp.Status)}
	case jsonErr != nil:
		return upstreamResult{}, &upstreamError{kind: kindBadResponse, message: "answer is not valid JSON"}
	case ans.Success == nil || !*ans.Success:
		return upstreamResult{}, &upstreamError{kind: kindBadResponse, message: upstreamMessage(ans, "generation was not successful")}
	case strings.TrimSpace(ans.Data.ImageURL) == "":
		return upstreamResult{}, &upstreamError{kind: kindBadResponse, message: "answer has no image_url"}
	}
	imageURL := strings.TrimSpace(ans.Data.ImageURL)
	// the URL goes into markdown and may be downloaded: only http(s) links
	// (never javascript: or data:) are passed on
	if checkHTTPURL(imageURL) != nil {
		return upstreamResult{}, &upstreamError{kind: kindBadResponse, message: "answer has an image_url that is not an http(s) URL"}
	}
	res := upstreamResult{imageURL: imageURL}
	res.info.pointsUsed, res.info.hasPointsUsed = ans.Data.PointsUsed.n, ans.Data.PointsUsed.ok
	res.info.remainingPoints, res.info.hasRemainingPoints = ans.Data.RemainingPoints.n, ans.Data.RemainingPoints.ok
	res.info.imageID = string(ans.Data.ImageID)
	res.info.modelName = string(ans.Data.ModelName)
	return res, nil
}

// isChallenge tells a Cloudflare challenge (or any HTML error page) on a
// 403 or 503 from the service's own answers, which are JSON: Cloudflare
// marks its challenges with cf-mitigated, and its pages are HTML. A 403
// with a JSON body is the service's own refusal, a normal error. A body
// sniffed as HTML whose mark one of sent carries (a prompt that begins
// "<html" echoed at the start of a plain-text error) is not.
func isChallenge(resp *http.Response, raw []byte, sent ...string) bool {
	if resp.StatusCode != http.StatusForbidden && resp.StatusCode != http.StatusServiceUnavailable {
		return false
	}
	if strings.EqualFold(resp.Header.Get("Cf-Mitigated"), "challenge") {
		return true
	}
	if ct := strings.ToLower(resp.Header.Get("Content-Type")); strings.HasPrefix(ct, "text/html") || strings.HasPrefix(ct, "application/xhtml") {
		return true
	}
	head := bytes.TrimLeft(bytes.TrimPrefix(raw, []byte("\xef\xbb\xbf")), " \t\r\n")
	head = head[:min(len(head), 16)]
	for _, p := range []string{"<!doctype html", "<html", "<head", "<!--"} {
		if len(head) >= len(p) && strings.EqualFold(string(head[:len(p)]), p) {
			return !carriedMark(sent, p)
		}
	}
	return false
}

// carriedMark reports whether any of sent carries mark, read as
// carriedWords reads them.
func carriedMark(sent []string, mark string) bool {
	for _, s := range sent {
		if strings.Contains(foldEcho(s), strings.ReplaceAll(mark, " ", "")) {
			return true
		}
	}
	return false
}

// parsePoints reads a number of points (answerPoints).
func parsePoints(raw []byte) (float64, bool) {
	s := strings.TrimSpace(string(raw))
	if u, err := strconv.Unquote(s); err == nil && strings.HasPrefix(s, `"`) {
		s = strings.TrimSpace(u)
	}
	if s == "" || s == "null" {
		return 0, false
	}
	f, err := strconv.ParseFloat(s, 64)
	if err != nil || math.IsNaN(f) || math.IsInf(f, 0) {
		return 0, false
	}
	return f, true
}

// maxInfoRunes bounds the image_id and model_name the log carries.
const maxInfoRunes = 128

// rawText is a JSON string or number as text (image_id and model_name),
// shortened and without control characters; anything else is "".
func rawText(raw []byte) string {
	var s string
	if json.Unmarshal(raw, &s) != nil {
		var n json.Number
		if json.Unmarshal(raw, &n) != nil {
			return ""
		}
		s = n.String()
	}
	return truncate(stripControl(strings.TrimSpace(s)), maxInfoRunes)
}

// upstreamMessage picks the service's own error text (error, error.message
// or message); fallback when it gave none. It is shortened only after
// scrubbing, in apiError.
func upstreamMessage(ans upstreamAnswer, fallback string) string {
	msg := ans.Message
	if ans.Error != "" {
		msg = string(ans.Error)
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
// ("read tcp 127.0.0.1:42202->…"), which go to the log alone.
func describeNetErr(party string, err error) string {
	var ne net.Error
	var dnsErr *net.DNSError
	var oe *net.OpError
	var certErr *tls.CertificateVerificationError
	var recErr tls.RecordHeaderError
	if errors.As(err, &oe) && oe.Op == "proxyconnect" && !strings.HasPrefix(party, "the forward proxy") {
		// Go names a failed connection to forward_proxy_url so; the
		// operator should look at the proxy, not at the party behind it
		party = "the forward proxy (forward_proxy_url)"
	}
	switch {
	case errors.Is(err, context.DeadlineExceeded) || errors.As(err, &ne) && ne.Timeout():
		return party + " did not answer in time"
	case errors.Is(err, syscall.ECONNREFUSED):
		return party + " refused the connection"
	case errors.As(err, &dnsErr):
		return "the host name of " + party + " could not be resolved"
	case errors.As(err, &certErr), errors.As(err, &recErr):
		return "the TLS connection to " + party + " failed"
	case strings.Contains(err.Error(), "malformed HTTP"):
		// net/http's words for an answer that is not HTTP (its error has
		// no type to test)
		return party + " answered something that is not HTTP"
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
	retries := max(defaultRetries, len(uc.Accounts)-1)
	if uc.Retries != nil {
		retries = *uc.Retries
	}
	if retries < 0 || retries > 10 {
		return uc, fmt.Errorf("zimage_gateway: upstream: retries must be between 0 and 10, got %d", retries)
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
