package zimage

// The HTTP client of the image service: one attempt with one account's
// key (generate), the shared transport, the forward proxy and how its
// failures are told from the service's, and plain words for network
// errors. What the answer means is read in upstream_answer.go; which
// account makes the attempt, and what happens after a failure, is the
// account pool's (account_pool.go, failover.go).

import (
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptrace"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

// maxUpstreamBody bounds how much of the image service's answer is read: a
// success is a few hundred bytes, so anything near this is a broken server.
const maxUpstreamBody = 1 << 20

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
