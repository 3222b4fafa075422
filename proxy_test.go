package zimage

// forward_proxy_url (docs/design.md#failover-and-rests): the generation calls and
// the image downloads go through an HTTP proxy written here, which records
// what passed through it; its credentials are secrets like keys.

import (
	"encoding/base64"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"reflect"
	"strings"
	"sync"
	"testing"

	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
)

// The proxy's credentials, scanned for after the run like every key.
const (
	testProxyUser = "proxyuser"
	testProxyPass = "proxy-pass-8b2e4f1a7c"
)

func init() { testSecrets = append(testSecrets, testProxyPass) }

// proxied is one request the test proxy received.
type proxied struct {
	method, requestURI, proxyAuth string
}

// fakeProxy is a forward HTTP proxy for plain-http targets: it receives
// absolute-URI requests, records them and forwards them, or answers with
// fail when that is set.
type fakeProxy struct {
	*httptest.Server
	mu   sync.Mutex
	seen []proxied
	fail http.HandlerFunc
}

func newFakeProxy(t *testing.T) *fakeProxy {
	p := &fakeProxy{}
	direct := &http.Transport{Proxy: nil} // never through the environment's proxy
	t.Cleanup(direct.CloseIdleConnections)
	p.Server = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		p.mu.Lock()
		p.seen = append(p.seen, proxied{r.Method, r.RequestURI, r.Header.Get("Proxy-Authorization")})
		fail := p.fail
		p.mu.Unlock()
		if fail != nil {
			fail(w, r)
			return
		}
		if !r.URL.IsAbs() {
			http.Error(w, "not a proxy request", http.StatusBadRequest)
			return
		}
		out := r.Clone(r.Context())
		out.RequestURI = ""
		out.Header.Del("Proxy-Authorization")
		resp, err := direct.RoundTrip(out)
		if err != nil {
			http.Error(w, err.Error(), http.StatusBadGateway)
			return
		}
		defer resp.Body.Close()
		for k, v := range resp.Header {
			w.Header()[k] = v
		}
		w.WriteHeader(resp.StatusCode)
		io.Copy(w, resp.Body)
	}))
	t.Cleanup(p.Close)
	return p
}

func (p *fakeProxy) Seen() []proxied {
	p.mu.Lock()
	defer p.mu.Unlock()
	return append([]proxied(nil), p.seen...)
}

func (p *fakeProxy) setFail(h http.HandlerFunc) {
	p.mu.Lock()
	p.fail = h
	p.mu.Unlock()
}

// proxyURL is the proxy's URL with the test credentials.
func (p *fakeProxy) proxyURL() string {
	return "http://" + testProxyUser + ":" + testProxyPass + "@" + strings.TrimPrefix(p.URL, "http://")
}

func TestProxyForwardsGenerationAndDownload(t *testing.T) {
	px := newFakeProxy(t)
	up := newFakeUpstream(t)
	up.setHandler(func(w http.ResponseWriter, r *http.Request) {
		if r.Method == http.MethodGet {
			w.Header().Set("Content-Type", "image/png")
			w.Write(imagesPNG(5))
			return
		}
		if r.Header.Get("Proxy-Authorization") != "" {
			t.Error("the proxy's credentials reached the service")
		}
		writeUpstreamOK(w, up.URL+"/img/5.png")
	})
	startCaddy(t, opsSite(up.endpoint(), nil, "timeout 5s\n\t\tforward_proxy_url "+px.proxyURL(), ""))

	status, _, raw := do(t, http.MethodPost, "/v1/images/generations", `{"prompt":"a cat","response_format":"b64_json"}`)
	if status != http.StatusOK {
		t.Fatalf("%d %s", status, raw)
	}
	if b, _ := base64.StdEncoding.DecodeString(parseImages(t, raw).Data[0].B64JSON); string(b) != string(imagesPNG(5)) {
		t.Error("b64_json is not the served image")
	}
	wantAuth := "Basic " + base64.StdEncoding.EncodeToString([]byte(testProxyUser+":"+testProxyPass))
	seen := px.Seen()
	want := []proxied{
		{http.MethodPost, up.endpoint(), wantAuth},
		{http.MethodGet, up.URL + "/img/5.png", wantAuth},
	}
	if !reflect.DeepEqual(seen, want) {
		t.Errorf("the proxy saw %+v\nwant %+v", seen, want)
	}
	if calls := up.Calls(); len(calls) != 2 || calls[0].Auth != "Bearer "+testSDKey {
		t.Errorf("the service got %d calls (%+v)", len(calls), calls)
	}
}

// A proxy that fails, echoing its credentials in every form it has them,
// and a proxy that is not there: the client learns that the proxy failed,
// never its credentials.
func TestProxyErrorsShowNoCredentials(t *testing.T) {
	px := newFakeProxy(t)
	up := newFakeUpstream(t)
	userinfo := testProxyUser + ":" + testProxyPass
	px.setFail(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(http.StatusBadGateway)
		json.NewEncoder(w).Encode(map[string]any{"success": false, "error": fmt.Sprintf(
			"proxy refused %s (%s, %s, %s)", r.Header.Get("Proxy-Authorization"), userinfo, url.QueryEscape(testProxyPass), testProxyPass)})
	})
	startCaddy(t, opsSite(up.endpoint(), nil, "timeout 5s\n\t\tretries 0\n\t\tforward_proxy_url "+px.proxyURL(), ""))
	status, hdr, raw := do(t, http.MethodPost, "/v1/chat/completions", itChatBody(t, "a cat"))
	e := itWantErr(t, status, hdr, raw, http.StatusBadGateway, "upstream_error")
	if !strings.Contains(e.Message, "proxy refused") {
		t.Errorf("message %q, want the proxy's text", e.Message)
	}
	secrets := newScrubber([]string{testProxyPass, userinfo})
	if secrets.contains(string(raw)) || strings.Contains(string(raw), base64.StdEncoding.EncodeToString([]byte(userinfo))) {
		t.Errorf("the answer carries the proxy's credentials: %s", raw)
	}
	if len(up.Calls()) != 0 {
		t.Error("the service was called around the proxy")
	}

	closed := httptest.NewServer(http.NotFoundHandler())
	closedURL := "http://" + userinfo + "@" + strings.TrimPrefix(closed.URL, "http://")
	closed.Close()
	startCaddy(t, opsSite(up.endpoint(), nil, "timeout 5s\n\t\tretries 0\n\t\tforward_proxy_url "+closedURL, ""))
	status, hdr, raw = do(t, http.MethodPost, "/v1/chat/completions", itChatBody(t, "a cat"))
	e = itWantErr(t, status, hdr, raw, http.StatusBadGateway, "upstream_proxy")
	if e.Message != "The image service was not reached: the forward proxy (forward_proxy_url) refused the connection" {
		t.Errorf("message %q", e.Message)
	}
	if secrets.contains(string(raw)) {
		t.Errorf("the answer carries the proxy's credentials: %s", raw)
	}
	for _, l := range readLog(t) {
		if b, _ := json.Marshal(l); secrets.contains(string(b)) {
			t.Errorf("a log line carries the proxy's credentials: %s", secrets.Replace(string(b)))
		}
	}
}

// Without forward_proxy_url the environment's proxy applies (Go's
// ProxyFromEnvironment) to both clients; with it, every request goes to it,
// loopback targets included. A bad URL is a load error that names the
// directive and shows no credential.
func TestUnitProxyProvision(t *testing.T) {
	unitClearEnv(t)
	proxyOf := func(g *Gateway) (gen, dl func(*http.Request) (*url.URL, error)) {
		return g.upstream.(*imageClient).transport.Proxy,
			g.fetcher.client.Transport.(*http.Transport).Proxy
	}
	fn := func(f func(*http.Request) (*url.URL, error)) uintptr { return reflect.ValueOf(f).Pointer() }

	g, err := unitProvision(t, `{"api_keys":["k"],"upstream":{"url":"https://sd.example/api","api_key":"s"}}`)
	if err != nil {
		t.Fatal(err)
	}
	gen, dl := proxyOf(g)
	if env := fn(http.ProxyFromEnvironment); fn(gen) != env || fn(dl) != env {
		t.Error("without forward_proxy_url the environment's proxy must apply")
	}

	t.Setenv("ZIMAGE_UNIT_PROXY", "http://u:"+testProxyPass+"@10.1.2.3:3128")
	g, err = unitProvision(t, `{"api_keys":["k"],"upstream":{"url":"http://127.0.0.1:9/api","api_key":"s","forward_proxy_url":"{env.ZIMAGE_UNIT_PROXY}"}}`)
	if err != nil {
		t.Fatal(err)
	}
	gen, dl = proxyOf(g)
	for _, f := range []func(*http.Request) (*url.URL, error){gen, dl} {
		u, err := f(httptest.NewRequest(http.MethodGet, "http://127.0.0.1:9/x.png", nil))
		if err != nil || u == nil || u.Host != "10.1.2.3:3128" {
			t.Errorf("proxy for a loopback target: %v, %v", u, err)
		}
	}
	if !g.scrub.contains("x "+testProxyPass) || !g.scrub.contains(base64.StdEncoding.EncodeToString([]byte("u:"+testProxyPass))) {
		t.Error("the proxy's password is not a secret of the scrubber")
	}

	for _, bad := range []string{
		"socks9://u:" + testProxyPass + "@h:1",
		"http://u:" + testProxyPass + "@h:99999",
		"http://u:" + testProxyPass + "@h:1/path",
		"u:" + testProxyPass + "@h:1",
		"http://u:" + testProxyPass + "@:1",
		"http://u:" + testProxyPass + "@h:1 x\x7f",
	} {
		_, err := unitProvision(t, `{"api_keys":["k"],"upstream":{"api_key":"s","forward_proxy_url":`+string(must(json.Marshal(bad)))+`}}`)
		wantProvisionError(t, err, []string{"forward_proxy_url", "http://[user:pass@]host:port"})
	}
}

func must[T any](v T, err error) T {
	if err != nil {
		panic(err)
	}
	return v
}

func TestUnitProxyCaddyfile(t *testing.T) {
	var g Gateway
	err := g.UnmarshalCaddyfile(caddyfile.NewTestDispenser("zimage_gateway {\n\tupstream {\n\t\tforward_proxy_url {env.PROXY}\n\t}\n}"))
	if err != nil || g.Upstream == nil || g.Upstream.ForwardProxyURL != "{env.PROXY}" {
		t.Fatalf("parsed %+v, %v", g.Upstream, err)
	}
	for _, src := range []string{
		"zimage_gateway {\n\tupstream {\n\t\tforward_proxy_url a b\n\t}\n}",
		"zimage_gateway {\n\tupstream {\n\t\tforward_proxy_url a\n\t\tforward_proxy_url b\n\t}\n}",
	} {
		var g Gateway
		if err := g.UnmarshalCaddyfile(caddyfile.NewTestDispenser(src)); err == nil {
			t.Errorf("%q parsed", src)
		}
	}
}

// The README's "Reaching the service" section: both Caddyfiles adapt as
// written, one with forward_proxy_url, one with a relay as the upstream.
func TestUnitReadmeReachingTheService(t *testing.T) {
	raw, err := os.ReadFile("README.md")
	if err != nil {
		t.Fatal(err)
	}
	_, section, ok := strings.Cut(string(raw), "### Reaching the service")
	if !ok {
		t.Fatal("README has no Reaching the service section")
	}
	section, _, _ = strings.Cut(section, "\n### ")
	var adapted []string
	for rest := section; ; {
		var block string
		if _, rest, ok = strings.Cut(rest, "```caddy\n"); !ok {
			break
		}
		block, rest, _ = strings.Cut(rest, "```")
		adapted = append(adapted, string(unitAdapt(t, block)))
	}
	if len(adapted) != 2 || !strings.Contains(adapted[0], `"forward_proxy_url":"{env.ZIMAGE_PROXY_URL}"`) ||
		!strings.Contains(adapted[1], `"url":"https://zimage-relay.example.workers.dev/api/v1/generate_image"`) {
		t.Errorf("adapted %d blocks: %s", len(adapted), adapted)
	}
}

// garbage answers a proxy request, or a CONNECT, with bytes that are not
// HTTP.
func garbage(w http.ResponseWriter, r *http.Request) {
	conn, buf, err := http.NewResponseController(w).Hijack()
	if err != nil {
		return
	}
	defer conn.Close()
	buf.WriteString("SSH-2.0-OpenSSH_9.6 \x00\x01 not a proxy\r\n\r\n")
	buf.Flush()
}

// proxyAuthRequired answers a proxy request, or a CONNECT, with 407.
func proxyAuthRequired(w http.ResponseWriter, r *http.Request) {
	w.Header().Set("Proxy-Authenticate", `Basic realm="proxy"`)
	http.Error(w, "credentials "+r.Header.Get("Proxy-Authorization")+" refused", http.StatusProxyAuthRequired)
}

// TestProxyFaultsAreNotTheAccounts: a forward proxy that answers 407 or
// bytes that are not HTTP, to a plain-http service's calls and to the
// CONNECT of an https one, is the proxy's fault: a 502 upstream_proxy
// that names forward_proxy_url (never its credentials), counted as kind
// proxy, with no other account tried and none resting.
func TestProxyFaultsAreNotTheAccounts(t *testing.T) {
	userinfo := testProxyUser + ":" + testProxyPass
	secrets := newScrubber([]string{testProxyPass, userinfo, base64.StdEncoding.EncodeToString([]byte(userinfo))})
	for _, tc := range []struct {
		name    string
		https   bool
		fail    http.HandlerFunc
		message string
	}{
		{"http service, 407", false, proxyAuthRequired, "the forward proxy (forward_proxy_url) refused the request: 407 Proxy Authentication Required; check the user and password it is given"},
		{"http service, garbage", false, garbage, "the forward proxy (forward_proxy_url) answered something that is not HTTP"},
		{"https service, CONNECT 407", true, proxyAuthRequired, "the forward proxy (forward_proxy_url) refused the request: 407 Proxy Authentication Required; check the user and password it is given"},
		{"https service, CONNECT 403", true, func(w http.ResponseWriter, r *http.Request) { http.Error(w, "no", http.StatusForbidden) },
			"the forward proxy (forward_proxy_url) refused the request: 403 Forbidden"},
		{"https service, CONNECT garbage", true, garbage, "the forward proxy (forward_proxy_url) answered something that is not HTTP"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			px := newFakeProxy(t)
			px.setFail(tc.fail)
			up := newFakeUpstream(t)
			endpoint := up.endpoint()
			if tc.https {
				// never reached: the proxy refuses the tunnel
				endpoint = "https://sd.example.invalid/api/v1/generate_image"
			}
			startCaddy(t, accountsSite(endpoint, accountBlock("a", testAccountKeyA)+accountBlock("b", testAccountKeyB),
				"timeout 10s\n\t\tforward_proxy_url "+px.proxyURL(), "health"))
			before, mark := scrape(t), markLog(t)

			status, hdr, raw := do(t, http.MethodPost, "/v1/chat/completions", itChatBody(t, "a cat"))
			e := itWantErr(t, status, hdr, raw, http.StatusBadGateway, "upstream_proxy")
			if e.Message != "The image service was not reached: "+tc.message {
				t.Errorf("message %q, want the proxy's fault: %q", e.Message, tc.message)
			}
			if secrets.contains(string(raw)) {
				t.Errorf("the answer carries the proxy's credentials: %s", raw)
			}
			if n := len(px.Seen()); n != 1 {
				t.Errorf("the proxy saw %d requests, want 1: no other account is tried for the proxy's fault", n)
			}
			after := scrape(t)
			if d := after.delta(before, "caddy_zimage_upstream_errors_total", "kind", "proxy"); d != 1 {
				t.Errorf("errors of kind proxy counted %v, want 1", d)
			}
			if l := mark.find(t, "image service account rests", nil); len(l) != 0 {
				t.Errorf("accounts rested for the proxy's fault: %v", l)
			}
			if status, _, body, rep := healthGet(t, http.MethodGet, "/v1/zimage/health"); status != http.StatusOK || rep.Accounts[0].Resting || rep.Accounts[1].Resting {
				t.Errorf("health after the proxy's fault: %d %s", status, body)
			}
			for _, l := range mark.lines(t) {
				if b, _ := json.Marshal(l); secrets.contains(string(b)) {
					t.Errorf("a log line carries the proxy's credentials: %s", secrets.Replace(string(b)))
				}
			}
		})
	}
}

// TestProxyTunnelServiceFaultIsTheService: through a proxy that opens the
// tunnel, a failure of the service itself (here its TLS certificate,
// which the gateway does not trust) is the service's, not the proxy's.
func TestProxyTunnelServiceFaultIsTheService(t *testing.T) {
	svc := httptest.NewTLSServer(http.NotFoundHandler())
	t.Cleanup(svc.Close)
	px := newFakeProxy(t)
	px.setFail(func(w http.ResponseWriter, r *http.Request) {
		if r.Method != http.MethodConnect {
			http.Error(w, "CONNECT only", http.StatusMethodNotAllowed)
			return
		}
		to, err := net.Dial("tcp", r.Host)
		if err != nil {
			http.Error(w, err.Error(), http.StatusBadGateway)
			return
		}
		defer to.Close()
		conn, buf, err := http.NewResponseController(w).Hijack()
		if err != nil {
			return
		}
		defer conn.Close()
		buf.WriteString("HTTP/1.1 200 Connection established\r\n\r\n")
		buf.Flush()
		go io.Copy(to, buf)
		io.Copy(conn, to)
	})
	startCaddy(t, opsSite(svc.URL+"/api/v1/generate_image", nil, "timeout 10s\n\t\tretries 0\n\t\tforward_proxy_url "+px.proxyURL(), "")+"\nmetrics /metrics")
	before := scrape(t)
	status, hdr, raw := do(t, http.MethodPost, "/v1/chat/completions", itChatBody(t, "a cat"))
	e := itWantErr(t, status, hdr, raw, http.StatusBadGateway, "upstream_error")
	if e.Message != "The image service failed: the TLS connection to the image service failed" {
		t.Errorf("message %q", e.Message)
	}
	if d := grewSince(t, before, "caddy_zimage_upstream_errors_total", "kind", "refused"); d != 1 {
		t.Errorf("errors of kind refused counted %v, want 1", d)
	}
	if seen := px.Seen(); len(seen) != 1 || seen[0].method != http.MethodConnect {
		t.Errorf("the proxy saw %+v, want one CONNECT", seen)
	}
}
