package zimage

// The integration harness: one in-process Caddy (caddytest starts it on the
// first InitServer and every test loads its own Caddyfile into it), fake
// image and LLM services made with httptest that record what they receive,
// and a check after the whole run that no configured secret ever reached a
// response or a log line.

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddytest"
)

// The secrets every integration test configures. None may appear in a
// response body, a response header or a log line (TestMain checks).
const (
	testClientKey = "sk-client-7f3a9c1e5b"
	testSDKey     = "sd-upstream-secret-4d8e2b6a"
	testLLMKey    = "llm-enhance-secret-9c0f1e7d"
)

// The keys of the accounts and clients tests (accounts_test.go,
// clients_test.go), scanned like the others.
const (
	testAccountKeyA = "sd-account-a-secret-3e9b1c"
	testAccountKeyB = "sd-account-b-secret-7d2f8a"
	testAccountKeyC = "sd-account-c-secret-5a6e0b"
	testAliceKey    = "sk-alice-secret-2c8d4e"
	testAliceKey2   = "sk-alice-second-9f1b3a"
	testBobKey      = "sk-bob-secret-6e0a7c"
)

var testSecrets = []string{testClientKey, testSDKey, testLLMKey,
	testAccountKeyA, testAccountKeyB, testAccountKeyC, testAliceKey, testAliceKey2, testBobKey, testOddKey}

// Ports: free ones picked at start, so that another Caddy or another test
// run on the machine never collides with the suite; the environment
// variables can still fix them.
var (
	adminPort = envInt("ZIMAGE_TEST_ADMIN_PORT", freePort)
	httpPort  = envInt("ZIMAGE_TEST_HTTP_PORT", freePort)
	httpsPort = envInt("ZIMAGE_TEST_HTTPS_PORT", freePort)
	baseURL   = fmt.Sprintf("http://localhost:%d", httpPort)
)

func envInt(name string, def func() int) int {
	var n int
	if _, err := fmt.Sscan(os.Getenv(name), &n); err == nil && n > 0 {
		return n
	}
	return def()
}

// freePort asks the kernel for a free loopback port.
func freePort() int {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		panic(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

// logPath is the file every test config sends Caddy's logs to, at debug
// level, so tests can read log lines and TestMain can scan them all.
var logPath string

// stderrPath is where the test binary's stderr goes (see TestMain).
var stderrPath string

// seen collects every response body and header the harness's clients read,
// for the secret scan.
var seen struct {
	sync.Mutex
	bytes.Buffer
}

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "zimage-test-")
	if err != nil {
		panic(err)
	}
	logPath = filepath.Join(dir, "caddy.log")
	caddytest.Default.AdminPort = adminPort
	// start the in-process Caddy here, logging to the file from the first
	// line on: caddytest would start it with its own config, whose logs
	// (and the unit tests' provisioning warnings) drown a failure on stderr
	boot := fmt.Sprintf(`{"admin":{"listen":"localhost:%d"},"logging":{"logs":{"default":{"writer":{"output":"file","filename":%q},"encoder":{"format":"json"},"level":"DEBUG"}}}}`, adminPort, logPath)
	if err := caddy.Load([]byte(boot), true); err != nil {
		panic(err)
	}
	// the unit tests' provisioning logs through zap development loggers,
	// which open "stderr" when made, and caddytest reports through the
	// standard logger: both go to a file, scanned for secrets like the rest
	// (the runtime's own panics still reach file descriptor 2)
	stderrPath = filepath.Join(dir, "stderr.log")
	quiet, err := os.Create(stderrPath)
	if err != nil {
		panic(err)
	}
	os.Stderr = quiet
	log.SetOutput(quiet)
	code := m.Run()
	if code == 0 {
		code = scanForSecrets()
	}
	os.RemoveAll(dir)
	os.Exit(code)
}

// scanForSecrets is the suite-wide test that no secret leaked.
func scanForSecrets() int {
	logs, _ := os.ReadFile(logPath)
	dev, _ := os.ReadFile(stderrPath)
	logs = append(logs, dev...)
	seen.Lock()
	responses := seen.String()
	seen.Unlock()
	code := 0
	// in any form the gateway's scrubber knows: encoded, in any case, cut
	for _, s := range testSecrets {
		sc := newScrubber([]string{s})
		if sc.contains(string(logs)) {
			fmt.Printf("FAIL: secret %q appears in Caddy's log: %s\n", s[:6]+"…", leakContext(sc, string(logs)))
			code = 1
		}
		if sc.contains(responses) {
			fmt.Printf("FAIL: secret %q appears in a response: %s\n", s[:6]+"…", leakContext(sc, responses))
			code = 1
		}
	}
	if code == 0 && len(responses) > 0 {
		fmt.Printf("secret scan: %d bytes of responses and %d bytes of logs are free of the %d test secrets\n",
			len(responses), len(logs), len(testSecrets))
	}
	return code
}

// leakContext shows where a secret was found, with the secret redacted.
func leakContext(sc *scrubber, text string) string {
	sp := sc.find(text, true)[0]
	from, to := max(0, sp[0]-80), min(len(text), sp[1]+80)
	return strconv.Quote(sc.Replace(text[from:to]))
}

// recordingTransport copies every response (headers and body) into seen.
type recordingTransport struct{ base http.RoundTripper }

func (rt recordingTransport) RoundTrip(req *http.Request) (*http.Response, error) {
	resp, err := rt.base.RoundTrip(req)
	if err != nil {
		return resp, err
	}
	seen.Lock()
	_ = resp.Header.Write(&seen.Buffer)
	seen.Unlock()
	resp.Body = &teeBody{rc: resp.Body}
	return resp, nil
}

type teeBody struct{ rc io.ReadCloser }

func (t *teeBody) Read(p []byte) (int, error) {
	n, err := t.rc.Read(p)
	if n > 0 {
		seen.Lock()
		seen.Write(p[:n])
		seen.Unlock()
	}
	return n, err
}

func (t *teeBody) Close() error { return t.rc.Close() }

// testClient is an HTTP client whose responses are scanned for secrets.
// Each has its own connections, and a request that meets a connection
// closed before any answer (a server of the config a reload just replaced)
// is sent once more on a new one.
func testClient(timeout time.Duration) *http.Client {
	return &http.Client{Timeout: timeout, Transport: recordingTransport{base: retryClosed{&http.Transport{}}}}
}

// retryClosed resends a request whose connection was closed before any
// answer came: such a request never reached a handler.
type retryClosed struct{ base *http.Transport }

func (rt retryClosed) RoundTrip(req *http.Request) (*http.Response, error) {
	resp, err := rt.base.RoundTrip(req)
	if err == nil || !closedBeforeAnswer(err) || (req.Body != nil && req.GetBody == nil) || req.Context().Err() != nil {
		return resp, err
	}
	retry := req.Clone(req.Context())
	if req.GetBody != nil {
		if retry.Body, err = req.GetBody(); err != nil {
			return nil, err
		}
	}
	rt.base.CloseIdleConnections()
	return rt.base.RoundTrip(retry)
}

func closedBeforeAnswer(err error) bool {
	// EPIPE: the request was written to a connection the old server had
	// already closed
	return errors.Is(err, io.EOF) || errors.Is(err, syscall.ECONNRESET) || errors.Is(err, syscall.EPIPE)
}

// startCaddy loads a Caddyfile made of the test globals and one site on
// the test HTTP port whose body is site. It returns the tester.
func startCaddy(t *testing.T, site string) *caddytest.Tester {
	t.Helper()
	return startCaddyRaw(t, fmt.Sprintf("%s\n:%d {\n%s\n}\n", globals(), httpPort, site))
}

// globals is the global options block every test config uses.
func globals() string {
	return fmt.Sprintf(`{
	skip_install_trust
	admin localhost:%d
	http_port %d
	https_port %d
	grace_period 1ns
	log {
		output file %s
		format json
		level DEBUG
	}
}`, adminPort, httpPort, httpsPort, logPath)
}

// startCaddyRaw loads a whole Caddyfile (which must start with globals()).
func startCaddyRaw(t *testing.T, caddyfile string) *caddytest.Tester {
	t.Helper()
	tester := caddytest.NewTester(t)
	tester.Client = testClient(30 * time.Second)
	tester.InitServer(caddyfile, "caddyfile")
	return tester
}

// upstreamCall is one request the fake image service received.
type upstreamCall struct {
	Auth string
	Body upstreamRequest
	Raw  string
}

// fakeUpstream is an httptest image service. Its handler answers success
// with an image URL unless the test sets another. It tells the accounts
// apart by the key it receives: in flight and peak per key too.
type fakeUpstream struct {
	*httptest.Server
	mu        sync.Mutex
	calls     []upstreamCall
	handler   http.HandlerFunc
	active    atomic.Int32
	peak      atomic.Int32
	keyActive map[string]int
	keyPeak   map[string]int
}

func newFakeUpstream(t *testing.T) *fakeUpstream {
	f := &fakeUpstream{keyActive: map[string]int{}, keyPeak: map[string]int{}}
	f.Server = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		n := f.active.Add(1)
		defer f.active.Add(-1)
		key := strings.TrimPrefix(r.Header.Get("Authorization"), "Bearer ")
		f.mu.Lock()
		f.keyActive[key]++
		f.keyPeak[key] = max(f.keyPeak[key], f.keyActive[key])
		f.mu.Unlock()
		defer func() {
			f.mu.Lock()
			f.keyActive[key]--
			f.mu.Unlock()
		}()
		for {
			p := f.peak.Load()
			if n <= p || f.peak.CompareAndSwap(p, n) {
				break
			}
		}
		raw, _ := io.ReadAll(r.Body)
		var body upstreamRequest
		_ = json.Unmarshal(raw, &body)
		f.mu.Lock()
		f.calls = append(f.calls, upstreamCall{Auth: r.Header.Get("Authorization"), Body: body, Raw: string(raw)})
		h := f.handler
		f.mu.Unlock()
		if h != nil {
			r.Body = io.NopCloser(bytes.NewReader(raw)) // the test's handler reads it too
			h(w, r)
			return
		}
		w.Header().Set("Content-Type", "application/json")
		fmt.Fprintf(w, `{"success":true,"data":{"image_url":"https://img.example.com/%d.png"}}`, body.Seed)
	}))
	t.Cleanup(f.Close)
	return f
}

// URL of the generate endpoint.
func (f *fakeUpstream) endpoint() string { return f.Server.URL + "/api/v1/generate_image" }

func (f *fakeUpstream) setHandler(h http.HandlerFunc) {
	f.mu.Lock()
	f.handler = h
	f.mu.Unlock()
}

func (f *fakeUpstream) Calls() []upstreamCall {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]upstreamCall(nil), f.calls...)
}

// keyCalls is how many calls carried key.
func (f *fakeUpstream) keyCalls(key string) int {
	n := 0
	for _, c := range f.Calls() {
		if c.Auth == "Bearer "+key {
			n++
		}
	}
	return n
}

// keyStats is how many calls with key are in flight now, and the most
// there ever were at once.
func (f *fakeUpstream) keyStats(key string) (active, peak int) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.keyActive[key], f.keyPeak[key]
}

// llmCall is one request the fake LLM received.
type llmCall struct {
	Auth string
	Body struct {
		Model    string       `json:"model"`
		Messages []llmMessage `json:"messages"`
		Temp     float64      `json:"temperature"`
	}
}

// fakeLLM is an httptest OpenAI-compatible chat completions endpoint that
// answers content (the model's text) unless the test sets another handler.
type fakeLLM struct {
	*httptest.Server
	mu      sync.Mutex
	calls   []llmCall
	content string
	handler http.HandlerFunc
}

func newFakeLLM(t *testing.T, content string) *fakeLLM {
	f := &fakeLLM{content: content}
	f.Server = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		var c llmCall
		c.Auth = r.Header.Get("Authorization")
		_ = json.NewDecoder(r.Body).Decode(&c.Body)
		f.mu.Lock()
		f.calls = append(f.calls, c)
		h, content := f.handler, f.content
		f.mu.Unlock()
		if r.URL.Path != "/v1/chat/completions" {
			http.NotFound(w, r)
			return
		}
		if h != nil {
			h(w, r)
			return
		}
		w.Header().Set("Content-Type", "application/json")
		_ = json.NewEncoder(w).Encode(map[string]any{
			"id": "x", "object": "chat.completion",
			"choices": []any{map[string]any{"index": 0, "message": map[string]any{"role": "assistant", "content": content}}},
		})
	}))
	t.Cleanup(f.Close)
	return f
}

// baseURL is the LLM's base URL as the enhance block takes it.
func (f *fakeLLM) baseURL() string { return f.Server.URL + "/v1" }

func (f *fakeLLM) setHandler(h http.HandlerFunc) {
	f.mu.Lock()
	f.handler = h
	f.mu.Unlock()
}

func (f *fakeLLM) Calls() []llmCall {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]llmCall(nil), f.calls...)
}

// gatewaySite is a site body with the gateway pointed at the fakes; extra
// lines go inside the zimage_gateway block. llm may be nil (enhance off).
func gatewaySite(up *fakeUpstream, llm *fakeLLM, extra string) string {
	return opsSite(up.endpoint(), llm, "timeout 5s", extra)
}

// opsSite is a site body with the gateway pointed at upURL; upstream lines
// go in the upstream block and extra lines in the zimage_gateway block.
// llm may be nil (enhance off).
func opsSite(upURL string, llm *fakeLLM, upstream, extra string) string {
	enh := "enhance off"
	if llm != nil {
		enh = fmt.Sprintf("enhance {\n\t\tapi_key %s\n\t\tbase_url %s\n\t\ttimeout 2s\n\t}", testLLMKey, llm.baseURL())
	}
	return fmt.Sprintf(`zimage_gateway {
	api_key %s
	upstream %s {
		api_key %s
		%s
	}
	%s
	%s
}`, testClientKey, upURL, testSDKey, upstream, enh, extra)
}

// do sends a request to the test site with the client key and returns the
// status, headers and body.
func do(t *testing.T, method, path, body string, hdr ...string) (int, http.Header, []byte) {
	t.Helper()
	req, err := http.NewRequest(method, baseURL+path, strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Authorization", "Bearer "+testClientKey)
	if body != "" {
		req.Header.Set("Content-Type", "application/json")
	}
	for i := 0; i+1 < len(hdr); i += 2 {
		if hdr[i+1] == "" {
			req.Header.Del(hdr[i])
		} else {
			req.Header.Set(hdr[i], hdr[i+1])
		}
	}
	resp, err := testClient(30 * time.Second).Do(req)
	if err != nil {
		t.Fatalf("%s %s: %v", method, path, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatalf("%s %s: reading body: %v", method, path, err)
	}
	return resp.StatusCode, resp.Header, b
}

// apiErr decodes an OpenAI error envelope, failing the test when the body
// is not one.
func apiErr(t *testing.T, body []byte) errorDetail {
	t.Helper()
	var eb errorBody
	if err := json.Unmarshal(body, &eb); err != nil || eb.Error.Message == "" || eb.Error.Type == "" {
		t.Fatalf("not an OpenAI error envelope: %s", body)
	}
	return eb.Error
}

// chatContent decodes a chat.completion and returns its message content.
func chatContent(t *testing.T, body []byte) string {
	t.Helper()
	var cc struct {
		Object  string `json:"object"`
		Choices []struct {
			Message struct {
				Content string `json:"content"`
			} `json:"message"`
		} `json:"choices"`
	}
	if err := json.Unmarshal(body, &cc); err != nil || cc.Object != "chat.completion" || len(cc.Choices) != 1 {
		t.Fatalf("not a chat.completion: %s", body)
	}
	return cc.Choices[0].Message.Content
}

// readLog returns the log lines written so far, decoded.
func readLog(t *testing.T) []map[string]any {
	t.Helper()
	raw, err := os.ReadFile(logPath)
	if err != nil {
		t.Fatal(err)
	}
	var out []map[string]any
	for _, line := range bytes.Split(raw, []byte("\n")) {
		var m map[string]any
		if json.Unmarshal(line, &m) == nil {
			out = append(out, m)
		}
	}
	return out
}

// itConfig is a gateway site with more knobs than gatewaySite: the
// upstream URL and block, the enhance block and lines after the gateway.
type itConfig struct {
	upstreamURL string   // default: the fake's endpoint
	upstream    string   // upstream block lines besides api_key; default "timeout 5s"
	llm         *fakeLLM // enhance on against this fake
	llmURL      string   // enhance base_url when llm is nil (e.g. a closed server)
	enhance     string   // enhance block lines besides api_key and base_url; default "timeout 2s"
	gateway     string   // more lines inside zimage_gateway
	after       string   // site lines after the gateway
}

func itSite(up *fakeUpstream, c itConfig) string {
	u := c.upstreamURL
	if u == "" {
		u = up.endpoint()
	}
	upBlock := c.upstream
	if upBlock == "" {
		upBlock = "timeout 5s"
	}
	enh := "enhance off"
	base := c.llmURL
	if c.llm != nil {
		base = c.llm.baseURL()
	}
	if base != "" {
		e := c.enhance
		if e == "" {
			e = "timeout 2s"
		}
		enh = fmt.Sprintf("enhance {\n\t\tapi_key %s\n\t\tbase_url %s\n\t\t%s\n\t}", testLLMKey, base, e)
	}
	return fmt.Sprintf("zimage_gateway {\n\tapi_key %s\n\tupstream %s {\n\t\tapi_key %s\n\t\t%s\n\t}\n\t%s\n\t%s\n}\n%s",
		testClientKey, u, testSDKey, upBlock, enh, c.gateway, c.after)
}

// itRefusedURL is the URL of a server that no longer listens: connections to
// it are refused.
func itRefusedURL(t *testing.T) string {
	t.Helper()
	s := httptest.NewServer(http.NotFoundHandler())
	u := s.URL
	s.Close()
	return u
}

// itChatBody is a chat completions body with one user message and the extra
// top-level fields given as key, value pairs.
func itChatBody(t *testing.T, prompt string, kv ...any) string {
	t.Helper()
	m := map[string]any{"messages": []any{map[string]any{"role": "user", "content": prompt}}}
	for i := 0; i+1 < len(kv); i += 2 {
		m[kv[i].(string)] = kv[i+1]
	}
	b, err := json.Marshal(m)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// itPost sends a chat completions request with the client key.
func itPost(t *testing.T, body string) (int, http.Header, []byte) {
	t.Helper()
	return do(t, http.MethodPost, "/v1/chat/completions", body)
}

// itOK posts body, requires a 200 chat.completion and returns its content.
func itOK(t *testing.T, body string) string {
	t.Helper()
	status, _, resp := itPost(t, body)
	if status != http.StatusOK {
		t.Fatalf("status %d, want 200: %s", status, resp)
	}
	return chatContent(t, resp)
}

// itWantErr checks an error answer: status, JSON content type, envelope and
// code; it returns the envelope.
func itWantErr(t *testing.T, status int, hdr http.Header, body []byte, wantStatus int, wantCode string) errorDetail {
	t.Helper()
	if status != wantStatus {
		t.Fatalf("status %d, want %d: %s", status, wantStatus, body)
	}
	if ct := hdr.Get("Content-Type"); ct != "application/json" {
		t.Errorf("Content-Type %q, want application/json", ct)
	}
	e := apiErr(t, body)
	if e.Code != wantCode {
		t.Errorf("error code %q, want %q: %s", e.Code, wantCode, body)
	}
	return e
}

// itCallsSince returns the calls the fake received after the first n.
func itCallsSince(up *fakeUpstream, n int) []upstreamCall { return up.Calls()[n:] }

func itLLMCallsSince(llm *fakeLLM, n int) []llmCall { return llm.Calls()[n:] }

// itOnlyCall requires exactly one upstream call after the first n.
func itOnlyCall(t *testing.T, up *fakeUpstream, n int) upstreamCall {
	t.Helper()
	calls := itCallsSince(up, n)
	if len(calls) != 1 {
		t.Fatalf("upstream received %d calls, want 1: %+v", len(calls), calls)
	}
	return calls[0]
}

// itLLMReplies is a fake LLM handler answering content as the model's text.
func itLLMReplies(content string) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		_ = json.NewEncoder(w).Encode(map[string]any{
			"id": "x", "object": "chat.completion",
			"choices": []any{map[string]any{"index": 0, "message": map[string]any{"role": "assistant", "content": content}}},
		})
	}
}

// itImageURL is the URL the default fake upstream answers for a seed.
func itImageURL(seed int64) string { return fmt.Sprintf("https://img.example.com/%d.png", seed) }

// The markdown of docs/design.md#the-prompt, written out from the spec's text.
func itMarkdown(alt, imageURL, section, ratio string, w, h int) string {
	return "![" + alt + "](" + imageURL + ")\n\n---\n" + section +
		"**🎨 Aspect Ratio:** " + ratio + "\n**📐 Resolution:** " + strconv.Itoa(w) + "×" + strconv.Itoa(h)
}

func itEnhanced(final, original string) string {
	return "**✨ Enhanced Prompt:**\n" + final + "\n\n**📝 Original Input:**\n" + original + "\n\n"
}

func itPlain(original string) string { return "**📝 Prompt:**\n" + original + "\n\n" }

func itKeys(m map[string]any) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	return keys
}

func itObject(t *testing.T, raw []byte) map[string]any {
	t.Helper()
	var m map[string]any
	if err := json.Unmarshal(raw, &m); err != nil {
		t.Fatalf("not a JSON object: %v: %s", err, raw)
	}
	return m
}

// itTwoModels is a gateway config block with two models and an alias.
const itTwoModels = "model Z-Image {\n\t\talias dall-e-3\n\t}\n\tmodel Z-Turbo {\n\t\tmodel_index 7\n\t}"

// itLoadError posts a whole Caddyfile to Caddy's admin /load, as `caddy run`
// or `caddy reload` would, and returns the error Caddy answers; a config
// that loads fails the test.
func itLoadError(t *testing.T, caddyfile string) string {
	t.Helper()
	// make sure the in-process Caddy runs; a failed load keeps this config
	startCaddy(t, `respond "up" 200`)
	req, err := http.NewRequest(http.MethodPost, fmt.Sprintf("http://localhost:%d/load", adminPort), strings.NewReader(caddyfile))
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Content-Type", "text/caddyfile")
	resp, err := testClient(30 * time.Second).Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	if resp.StatusCode == http.StatusOK {
		t.Fatalf("the config loaded; want a load error:\n%s", caddyfile)
	}
	// the previous config still serves
	if status, _, b := do(t, http.MethodGet, "/", "", "Authorization", ""); status != http.StatusOK || string(b) != "up" {
		t.Errorf("after a failed load the running config answers %d %q", status, b)
	}
	return string(body)
}

// gate holds the fake upstream's requests until the test lets them go, one
// at a time (release) or all at once (open).
type gate struct {
	ch   chan struct{}
	once sync.Once
}

// newGate makes a gate that opens when the test ends, before the fakes
// close (cleanups run last-registered first), so no request hangs.
func newGate(t *testing.T) *gate {
	g := &gate{ch: make(chan struct{})}
	t.Cleanup(g.open)
	return g
}

// handler is a fake upstream handler that waits at the gate, then answers
// success (or nothing, when the gateway gave up first).
func (g *gate) handler(w http.ResponseWriter, r *http.Request) {
	select {
	case <-g.ch:
	case <-r.Context().Done():
		return
	}
	writeImage(w, "https://img.example.com/gated.png")
}

// release lets exactly one held request through; it fails the test when
// none is held.
func (g *gate) release(t *testing.T) {
	t.Helper()
	select {
	case g.ch <- struct{}{}:
	case <-time.After(10 * time.Second):
		t.Fatal("release: no request is waiting at the fake upstream")
	}
}

func (g *gate) open() { g.once.Do(func() { close(g.ch) }) }

// writeImage answers the image service's success.
func writeImage(w http.ResponseWriter, url string) {
	w.Header().Set("Content-Type", "application/json")
	fmt.Fprintf(w, `{"success":true,"data":{"image_url":%q}}`, url)
}

// waitFor polls cond until it holds, failing the test after 10 s. It waits
// for state that other goroutines reach (a request arriving at a fake, a
// log line being written), never for time to pass.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// result is a finished request, for requests sent in the background.
type result struct {
	status int
	header http.Header
	body   []byte
	err    error
}

// send makes a request to the test port with the client key (hdr pairs
// override headers, "Host" sets the virtual host) without touching t, so
// that goroutines may call it.
func send(ctx context.Context, method, path, body string, hdr ...string) result {
	req, err := http.NewRequestWithContext(ctx, method, baseURL+path, strings.NewReader(body))
	if err != nil {
		return result{err: err}
	}
	req.Header.Set("Authorization", "Bearer "+testClientKey)
	if body != "" {
		req.Header.Set("Content-Type", "application/json")
	}
	for i := 0; i+1 < len(hdr); i += 2 {
		if strings.EqualFold(hdr[i], "Host") {
			req.Host = hdr[i+1]
		} else {
			req.Header.Set(hdr[i], hdr[i+1])
		}
	}
	resp, err := testClient(60 * time.Second).Do(req)
	if err != nil {
		return result{err: err}
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	return result{status: resp.StatusCode, header: resp.Header, body: b, err: err}
}

// sendAsync sends in the background; await collects the result.
func sendAsync(method, path, body string, hdr ...string) <-chan result {
	ch := make(chan result, 1)
	go func() { ch <- send(context.Background(), method, path, body, hdr...) }()
	return ch
}

func await(t *testing.T, ch <-chan result) result {
	t.Helper()
	select {
	case r := <-ch:
		if r.err != nil {
			t.Fatalf("request failed: %v", r.err)
		}
		return r
	case <-time.After(30 * time.Second):
		t.Fatal("request did not finish")
	}
	return result{}
}

// chatJSON is a chat completions body with a fixed seed, so that the
// request can be found among the upstream's calls and the log lines.
func chatJSON(prompt string, seed int, extra string) string {
	return fmt.Sprintf(`{"model":"Z-Image","seed":%d,"messages":[{"role":"user","content":%q}]%s}`, seed, prompt, extra)
}

// tail shows the last lines read, for failure messages.
func tail(lines []string) string {
	if len(lines) > 5 {
		return fmt.Sprintf("%d lines, ending %q", len(lines), lines[len(lines)-5:])
	}
	return fmt.Sprintf("%q", lines)
}

// logMark is a position in the log file, which every test shares: a test
// looks only at the lines written after its mark.
type logMark int

func markLog(t *testing.T) logMark { return logMark(len(readLog(t))) }

// lines are the log lines written since the mark.
func (m logMark) lines(t *testing.T) []map[string]any {
	t.Helper()
	return readLog(t)[m:]
}

// find returns the lines since the mark with message msg for which match
// holds (match may be nil).
func (m logMark) find(t *testing.T, msg string, match func(map[string]any) bool) []map[string]any {
	t.Helper()
	var out []map[string]any
	for _, l := range m.lines(t) {
		if l["msg"] == msg && (match == nil || match(l)) {
			out = append(out, l)
		}
	}
	return out
}

// withSeed matches a generation log line by its seed.
func withSeed(seed int) func(map[string]any) bool {
	return func(l map[string]any) bool { s, ok := l["seed"].(float64); return ok && int(s) == seed }
}

// seeds lists the seeds of the upstream's calls, in arrival order.
func seeds(calls []upstreamCall) []int64 {
	out := make([]int64, len(calls))
	for i, c := range calls {
		out[i] = c.Body.Seed
	}
	return out
}

// failWith is a fake upstream handler answering status with body.
func failWith(status int, body string, hdr ...string) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		for i := 0; i+1 < len(hdr); i += 2 {
			w.Header().Set(hdr[i], hdr[i+1])
		}
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(status)
		io.WriteString(w, body)
	}
}

// dropConnection closes the connection without an answer.
func dropConnection(w http.ResponseWriter, r *http.Request) {
	conn, _, err := http.NewResponseController(w).Hijack()
	if err == nil {
		conn.Close()
	}
}

// closedURL is an image service URL on which nothing listens.
func closedURL(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	return "http://" + addr + "/api/v1/generate_image"
}

// twoSites is a Caddyfile with two gateways on two virtual hosts of the
// test port, each with its own client key, image service key, model and
// upstream; metrics on site a.
func twoSites(upA, upB *fakeUpstream, upstream string) string {
	site := func(host, key, sdKey, model, upURL string, index int, extra string) string {
		return fmt.Sprintf(`http://%s:%d {
	zimage_gateway {
		api_key %s
		upstream %s {
			api_key %s
			timeout 10s
			%s
		}
		enhance off
		model %s {
			model_index %d
		}
	}
	%s
}
`, host, httpPort, key, upURL, sdKey, upstream, model, index, extra)
	}
	return globals() + "\n" +
		site("a.localhost", testClientKey, testSDKey, "Model-A", upA.endpoint(), 3, "metrics /metrics") +
		site("b.localhost", keyB, sdKeyB, "Model-B", upB.endpoint(), 7, "")
}

// Site b's secrets contain the test secrets, so the suite-wide scan
// catches them too.
const (
	keyB   = testClientKey + "-site-b"
	sdKeyB = testSDKey + "-site-b"
)

// faultWait bounds every wait of the fault tests; the timeouts under test are
// far shorter, so only a gateway that ignores them gets here.
const faultWait = 20 * time.Second

// faultLogMark is the number of log lines so far, for faultNoPanic; the
// log file exists once the first test has started Caddy.
func faultLogMark(t *testing.T) int {
	if _, err := os.Stat(logPath); err != nil {
		return 0
	}
	return len(readLog(t))
}

// faultNoPanic fails the test if a log line written since mark mentions a
// panic: net/http recovers a handler's panic and Caddy logs it as
// "http: panic serving …".
func faultNoPanic(t *testing.T, mark int) {
	t.Helper()
	for _, entry := range readLog(t)[mark:] {
		b, _ := json.Marshal(entry)
		if strings.Contains(strings.ToLower(string(b)), "panic") {
			t.Errorf("panic in Caddy's log: %.500s", b)
		}
	}
}

// faultSignal closes ch once.
func faultSignal(once *sync.Once, ch chan struct{}) { once.Do(func() { close(ch) }) }

// faultAwait waits for ch, failing the test after faultWait.
func faultAwait(t *testing.T, ch <-chan struct{}, what string) {
	t.Helper()
	select {
	case <-ch:
	case <-time.After(faultWait):
		t.Fatalf("timed out waiting for %s", what)
	}
}

// faultStop is closed when the test ends, so that fakes which would
// otherwise write forever stop by themselves (httptest's Close waits for
// every handler).
func faultStop(t *testing.T) <-chan struct{} {
	stop := make(chan struct{})
	t.Cleanup(func() { close(stop) })
	return stop
}
