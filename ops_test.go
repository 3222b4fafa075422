package zimage

// Production operation (docs/design.md#observability) through a real Caddy: the
// concurrency limit and its queue, retries, the log lines, and two sites
// side by side. The metrics are checked in metrics_test.go and reloads in
// reload_test.go; the helpers below serve all three.

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"
)

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

// sseStream reads a streaming response line by line in the background.
type sseStream struct {
	lines  chan string
	cancel context.CancelFunc
}

// openStream starts a streaming chat completion; the stream ends when the
// test does, or earlier with cancel (the client leaving).
func openStream(t *testing.T, body string) *sseStream {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, baseURL+"/v1/chat/completions", strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Authorization", "Bearer "+testClientKey)
	req.Header.Set("Content-Type", "application/json")
	resp, err := testClient(60 * time.Second).Do(req)
	if err != nil {
		t.Fatal(err)
	}
	if resp.StatusCode != http.StatusOK || !strings.HasPrefix(resp.Header.Get("Content-Type"), "text/event-stream") {
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		t.Fatalf("stream: status %d %q: %s", resp.StatusCode, resp.Header.Get("Content-Type"), b)
	}
	s := &sseStream{lines: make(chan string, 64), cancel: cancel}
	go func() {
		defer resp.Body.Close()
		defer close(s.lines)
		sc := bufio.NewScanner(resp.Body)
		sc.Buffer(make([]byte, 0, 64<<10), 1<<20)
		for sc.Scan() {
			if line := sc.Text(); line != "" {
				s.lines <- line
			}
		}
	}()
	return s
}

// until reads lines up to and including the first for which match holds,
// and returns them; it fails the test if the stream ends first.
func (s *sseStream) until(t *testing.T, what string, match func(string) bool) []string {
	t.Helper()
	var got []string
	timeout := time.After(20 * time.Second)
	for {
		select {
		case line, ok := <-s.lines:
			if !ok {
				t.Fatalf("stream ended before %s; read %s", what, tail(got))
			}
			got = append(got, line)
			if match(line) {
				return got
			}
		case <-timeout:
			t.Fatalf("timed out waiting for %s; read %s", what, tail(got))
		}
	}
}

// rest reads the remaining lines until the stream ends.
func (s *sseStream) rest(t *testing.T) []string {
	t.Helper()
	var got []string
	timeout := time.After(20 * time.Second)
	for {
		select {
		case line, ok := <-s.lines:
			if !ok {
				return got
			}
			got = append(got, line)
		case <-timeout:
			t.Fatalf("stream did not end; read %s", tail(got))
		}
	}
}

// tail shows the last lines read, for failure messages.
func tail(lines []string) string {
	if len(lines) > 5 {
		return fmt.Sprintf("%d lines, ending %q", len(lines), lines[len(lines)-5:])
	}
	return fmt.Sprintf("%q", lines)
}

func isRoleChunk(l string) bool {
	return strings.HasPrefix(l, "data: ") && strings.Contains(l, `"role":"assistant"`)
}
func isKeepAlive(l string) bool { return l == ": keep-alive" }

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

// TestOpsLimiterCapsConcurrencyAcrossEndpoints: with max_concurrent 2, a
// chat and an images generation fill the slots; a streaming chat then
// waits (sending keep-alives) without reaching the upstream, and goes
// through as soon as one slot frees. The fake never sees more than 2.
func TestOpsLimiterCapsConcurrencyAcrossEndpoints(t *testing.T) {
	up := newFakeUpstream(t)
	g := newGate(t)
	up.setHandler(g.handler)
	startCaddy(t, opsSite(up.endpoint(), nil, "timeout 30s\n\t\tmax_concurrent 2\n\t\tqueue_timeout 30s", "stream_keepalive 50ms"))

	chat := sendAsync(http.MethodPost, "/v1/chat/completions", chatJSON("a lighthouse", 11, ""))
	images := sendAsync(http.MethodPost, "/v1/images/generations", `{"prompt":"a harbour","seed":12}`)
	waitFor(t, "two generations at the fake upstream", func() bool { return up.active.Load() == 2 })

	s := openStream(t, chatJSON("a storm", 13, `,"stream":true`))
	s.until(t, "the role chunk", isRoleChunk)
	// two keep-alives while queued: the stream is alive, and it has had
	// ample time to reach the upstream if nothing held it back
	s.until(t, "a keep-alive", isKeepAlive)
	s.until(t, "a second keep-alive", isKeepAlive)
	if n, calls := up.active.Load(), seeds(up.Calls()); n != 2 || len(calls) != 2 {
		t.Fatalf("while the stream is queued: %d active at the fake, calls with seeds %v; want 2 active and 2 calls", n, calls)
	}

	g.release(t)
	waitFor(t, "the queued stream to reach the upstream", func() bool { return len(up.Calls()) == 3 })
	g.open()

	for name, ch := range map[string]<-chan result{"chat": chat, "images": images} {
		if r := await(t, ch); r.status != http.StatusOK {
			t.Errorf("%s: status %d: %s", name, r.status, r.body)
		}
	}
	rest := strings.Join(s.rest(t), "\n")
	if !strings.Contains(rest, "https://img.example.com/gated.png") || !strings.HasSuffix(rest, "data: [DONE]") {
		t.Errorf("queued stream did not finish with the image:\n%s", rest)
	}
	if p := up.peak.Load(); p != 2 {
		t.Errorf("peak concurrency at the upstream: %d, want 2", p)
	}
}

// TestOpsQueueTimeout: a request that waits longer than queue_timeout gets
// 429 rate_limit_exceeded with Retry-After (a stream, whose headers are
// gone, gets the error as an event), and never reaches the upstream.
func TestOpsQueueTimeout(t *testing.T) {
	up := newFakeUpstream(t)
	g := newGate(t)
	up.setHandler(g.handler)
	startCaddy(t, opsSite(up.endpoint(), nil, "timeout 30s\n\t\tmax_concurrent 1\n\t\tqueue_timeout 300ms", "stream_keepalive 50ms"))

	holder := sendAsync(http.MethodPost, "/v1/chat/completions", chatJSON("the one in flight", 21, ""))
	waitFor(t, "the first generation at the fake upstream", func() bool { return up.active.Load() == 1 })

	for _, tc := range []struct {
		name, path, body string
	}{
		{"chat", "/v1/chat/completions", chatJSON("queued chat", 22, "")},
		{"images", "/v1/images/generations", `{"prompt":"queued image","seed":23}`},
		{"images n=2", "/v1/images/generations", `{"prompt":"queued images","seed":24,"n":2}`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			status, hdr, body := do(t, http.MethodPost, tc.path, tc.body)
			if status != http.StatusTooManyRequests {
				t.Fatalf("status %d, want 429: %s", status, body)
			}
			if e := apiErr(t, body); e.Code != "rate_limit_exceeded" || e.Type != "rate_limit_error" {
				t.Errorf("error %+v, want code rate_limit_exceeded", e)
			}
			// ceil(300ms) = 1 s: about as long as the queue allows
			if ra := hdr.Get("Retry-After"); ra != "1" {
				t.Errorf("Retry-After %q, want 1", ra)
			}
		})
	}
	t.Run("stream", func(t *testing.T) {
		s := openStream(t, chatJSON("queued stream", 25, `,"stream":true`))
		s.until(t, "the role chunk", isRoleChunk)
		rest := s.rest(t)
		if len(rest) == 0 {
			t.Fatal("the stream ended without an error event")
		}
		last := rest[len(rest)-1]
		if !strings.HasPrefix(last, `data: {"error":`) || !strings.Contains(last, `"code":"rate_limit_exceeded"`) {
			t.Errorf("stream ended with %q, want a rate_limit_exceeded error event; read %s", last, tail(rest))
		}
	})

	if got := seeds(up.Calls()); len(got) != 1 || got[0] != 21 {
		t.Errorf("upstream calls with seeds %v, want only the first (21)", got)
	}
	g.open()
	if r := await(t, holder); r.status != http.StatusOK {
		t.Errorf("the request in flight: status %d: %s", r.status, r.body)
	}
}

// TestOpsQueuedClientLeavesAtOnce: with max_concurrent 1, a queued client
// that goes away leaves the queue at once (its generation is logged as 499
// while the first still holds the slot, well before the 30 s queue_timeout),
// never reaches the upstream, and the next request gets the slot.
func TestOpsQueuedClientLeavesAtOnce(t *testing.T) {
	up := newFakeUpstream(t)
	g := newGate(t)
	up.setHandler(g.handler)
	startCaddy(t, opsSite(up.endpoint(), nil, "timeout 30s\n\t\tmax_concurrent 1\n\t\tqueue_timeout 30s", "stream_keepalive 50ms"))

	first := sendAsync(http.MethodPost, "/v1/chat/completions", chatJSON("first in line", 31, ""))
	waitFor(t, "the first generation at the fake upstream", func() bool { return up.active.Load() == 1 })

	mark := markLog(t)
	waiter := openStream(t, chatJSON("leaves the queue", 32, `,"stream":true`))
	waiter.until(t, "the role chunk", isRoleChunk)
	waiter.until(t, "a keep-alive while queued", isKeepAlive)
	waiter.cancel()
	waitFor(t, "the waiter's generation line with status 499", func() bool {
		lines := mark.find(t, "generation", withSeed(32))
		return len(lines) == 1 && lines[0]["status"] == float64(499)
	})
	if n := up.active.Load(); n != 1 {
		t.Fatalf("the first request should still hold the slot; %d active", n)
	}

	g.open()
	if r := await(t, first); r.status != http.StatusOK {
		t.Fatalf("first: status %d: %s", r.status, r.body)
	}
	status, _, body := do(t, http.MethodPost, "/v1/chat/completions", chatJSON("next in line", 33, ""))
	if status != http.StatusOK {
		t.Fatalf("next: status %d: %s", status, body)
	}
	if got := seeds(up.Calls()); len(got) != 2 || got[0] != 31 || got[1] != 33 {
		t.Errorf("upstream calls with seeds %v, want [31 33]: the waiter never reaches it", got)
	}
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

// TestOpsRetries: retries happen on connection errors and 502/503/504 only,
// as many as configured (default 1), and never on other statuses, on
// success:false or after a timeout; a 429 passes Retry-After on.
func TestOpsRetries(t *testing.T) {
	ok := func(w http.ResponseWriter, r *http.Request) { writeImage(w, "https://img.example.com/retry.png") }
	hang := func(w http.ResponseWriter, r *http.Request) { <-r.Context().Done() }
	for _, tc := range []struct {
		name      string
		upstream  string             // lines of the upstream block
		answers   []http.HandlerFunc // per attempt; the last repeats
		status    int
		calls     int
		code      string // the error code, when status is not 200
		retryAftr string
	}{
		{"503 once then success, default retries", "", []http.HandlerFunc{failWith(503, `{"error":"busy"}`), ok}, 200, 2, "", ""},
		{"dropped connection then success", "", []http.HandlerFunc{dropConnection, ok}, 200, 2, "", ""},
		{"always 504, default retries", "", []http.HandlerFunc{failWith(504, `{}`)}, 502, 2, "upstream_error", ""},
		{"always 502, retries 2", "retries 2", []http.HandlerFunc{failWith(502, `{}`)}, 502, 3, "upstream_error", ""},
		{"always 503, retries 0", "retries 0", []http.HandlerFunc{failWith(503, `{}`)}, 502, 1, "upstream_error", ""},
		{"always 500, retries 2", "retries 2", []http.HandlerFunc{failWith(500, `{"error":"boom"}`)}, 502, 1, "upstream_error", ""},
		{"400, retries 2", "retries 2", []http.HandlerFunc{failWith(400, `{"message":"bad prompt"}`)}, 502, 1, "upstream_error", ""},
		{"429 with Retry-After, retries 2", "retries 2", []http.HandlerFunc{failWith(429, `{"error":"slow down"}`, "Retry-After", "7")}, 429, 1, "rate_limit_exceeded", "7"},
		{"success false, retries 2", "retries 2", []http.HandlerFunc{failWith(200, `{"success":false,"error":"nsfw"}`)}, 502, 1, "upstream_error", ""},
		{"timeout, retries 2", "retries 2\n\t\ttimeout 500ms", []http.HandlerFunc{hang}, 504, 1, "upstream_timeout", ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			up := newFakeUpstream(t)
			var mu sync.Mutex
			attempt := 0
			up.setHandler(func(w http.ResponseWriter, r *http.Request) {
				mu.Lock()
				h := tc.answers[min(attempt, len(tc.answers)-1)]
				attempt++
				mu.Unlock()
				h(w, r)
			})
			upstream := tc.upstream
			if !strings.Contains(upstream, "timeout") {
				upstream += "\n\t\ttimeout 10s"
			}
			startCaddy(t, opsSite(up.endpoint(), nil, upstream, ""))

			status, hdr, body := do(t, http.MethodPost, "/v1/chat/completions", chatJSON("retry me", 41, ""))
			if status != tc.status {
				t.Fatalf("status %d, want %d: %s", status, tc.status, body)
			}
			if tc.code != "" {
				if e := apiErr(t, body); e.Code != tc.code {
					t.Errorf("error code %q, want %q", e.Code, tc.code)
				}
			}
			if tc.retryAftr != "" && hdr.Get("Retry-After") != tc.retryAftr {
				t.Errorf("Retry-After %q, want %q", hdr.Get("Retry-After"), tc.retryAftr)
			}
			if n := len(up.Calls()); n != tc.calls {
				t.Errorf("%d upstream attempts, want %d", n, tc.calls)
			}
		})
	}
}

// TestOpsRetriesStayWithinTimeout: retries and their backoff (250 ms,
// 500 ms, 1 s, … each ±50%) fit inside the one overall timeout: with
// retries 10 and timeout 2s an upstream that always answers 503 is tried
// three to five times (at least two on a slow machine), never eleven, and
// the client gets the upstream's failure.
func TestOpsRetriesStayWithinTimeout(t *testing.T) {
	up := newFakeUpstream(t)
	up.setHandler(failWith(503, `{"error":"down"}`))
	startCaddy(t, opsSite(up.endpoint(), nil, "timeout 2s\n\t\tretries 10", ""))
	status, _, body := do(t, http.MethodPost, "/v1/chat/completions", chatJSON("retry within the timeout", 45, ""))
	if status != http.StatusBadGateway && status != http.StatusGatewayTimeout {
		t.Fatalf("status %d, want 502 or 504: %s", status, body)
	}
	if n := len(up.Calls()); n < 2 || n > 5 {
		t.Errorf("%d attempts within 2s, want 2 to 5", n)
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

// TestOpsRetriesRefusedConnection: a refused connection is retried: with
// retries 2 there are three attempts, each counted as a "refused" upstream
// error and the first two logged as retried, then 502.
func TestOpsRetriesRefusedConnection(t *testing.T) {
	startCaddy(t, opsSite(closedURL(t), nil, "timeout 10s\n\t\tretries 2", "")+"\nmetrics /metrics")
	mark := markLog(t)
	before := scrape(t)
	status, _, body := do(t, http.MethodPost, "/v1/chat/completions", chatJSON("nobody home", 51, ""))
	if status != http.StatusBadGateway {
		t.Fatalf("status %d, want 502: %s", status, body)
	}
	after := scrape(t)
	if d := after.delta(before, "caddy_zimage_upstream_errors_total", "kind", "refused"); d != 3 {
		t.Errorf("refused errors counted: %v, want 3 (one per attempt)", d)
	}
	retried := mark.find(t, "image service call failed; retrying", func(l map[string]any) bool { return l["kind"] == "refused" })
	final := mark.find(t, "generation", withSeed(51))
	if len(retried) != 2 || len(final) != 1 || final[0]["failure"] != "refused" || final[0]["status"] != float64(502) {
		t.Errorf("want two retry warnings and one generation line with failure refused; got %d and %v", len(retried), final)
	}
}

// TestOpsLogsGenerationLine: one info line per generation with the
// endpoint, configured model, size, ratio and its source (body, user, llm,
// default), seed, enhancement outcome, queue wait, upstream latency and
// status; the prompt text only at debug level.
func TestOpsLogsGenerationLine(t *testing.T) {
	up := newFakeUpstream(t)
	llm := newFakeLLM(t, `{"prompt":"llmcanary glowing jellyfish, deep sea","aspect_ratio":"9:16"}`)
	startCaddy(t, opsSite(up.endpoint(), llm, "timeout 10s\n\t\tmax_concurrent 4", "model Z-Image {\n\t\talias dall-e-3\n\t}"))

	// prompt texts that must stay out of info and warn lines: the LLM's
	// prompt, and each case's own
	canaries := []string{"llmcanary"}
	mark := markLog(t)
	for _, tc := range []struct {
		name, path, body string
		canary           string
		seed             int
		endpoint, size   string
		ratio, source    string
		enhance          string
	}{
		{"body size", "/v1/chat/completions", `{"model":"dall-e-3","seed":61,"width":1000,"height":600,"messages":[{"role":"user","content":"bodycanary fox no-enhance"}]}`,
			"bodycanary", 61, "chat_completions", "1000x600", "Custom", "body", "skipped"},
		// a body size that is one of the six (the playground's 16:9 button)
		// is logged as its ratio; the markdown still says Custom
		{"body size of a ratio", "/v1/chat/completions", `{"model":"dall-e-3","seed":65,"width":2048,"height":1152,"messages":[{"role":"user","content":"ratiobodycanary fox no-enhance"}]}`,
			"ratiobodycanary", 65, "chat_completions", "2048x1152", "16:9", "body", "skipped"},
		{"images size of a ratio", "/v1/images/generations", `{"model":"Z-Image","prompt":"imgratiocanary fox no-enhance","seed":66,"size":"2048x1152"}`,
			"imgratiocanary", 66, "images_generations", "2048x1152", "16:9", "body", "skipped"},
		{"user ratio", "/v1/chat/completions", chatJSON("usercanary fox ratio 16:9", 62, ""),
			"usercanary", 62, "chat_completions", "2048x1152", "16:9", "user", "ok"},
		{"llm ratio", "/v1/images/generations", `{"model":"DALL-E-3","prompt":"llmratiocanary fox","seed":63}`,
			"llmratiocanary", 63, "images_generations", "1152x2048", "9:16", "llm", "ok"},
		{"default ratio", "/v1/chat/completions", chatJSON("defaultcanary fox no-enhance", 64, `,"stream":true`),
			"defaultcanary", 64, "chat_completions", "2048x2048", "1:1", "default", "skipped"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			canaries = append(canaries, tc.canary)
			status, _, body := do(t, http.MethodPost, tc.path, tc.body)
			if status != http.StatusOK {
				t.Fatalf("status %d: %s", status, body)
			}
			if tc.source == "body" && tc.endpoint == "chat_completions" && !strings.Contains(string(body), "**🎨 Aspect Ratio:** Custom") {
				t.Errorf("a body size's markdown does not say Custom: %s", body)
			}
			lines := mark.find(t, "generation", withSeed(tc.seed))
			if len(lines) != 1 {
				t.Fatalf("%d generation lines for seed %d, want 1", len(lines), tc.seed)
			}
			l := lines[0]
			for k, want := range map[string]any{
				"level": "info", "logger": "http.handlers.zimage_gateway",
				"endpoint": tc.endpoint, "model": "Z-Image", "size": tc.size,
				"ratio": tc.ratio, "ratio_source": tc.source, "enhance": tc.enhance,
				"status": float64(200),
			} {
				if l[k] != want {
					t.Errorf("%s = %v, want %v", k, l[k], want)
				}
			}
			for _, k := range []string{"queue_wait", "upstream_latency"} {
				if _, ok := l[k].(float64); !ok {
					t.Errorf("%s missing or not a duration: %v", k, l[k])
				}
			}
			// the prompt is there for debugging, at debug level only
			debug := mark.find(t, "generation prompt", func(m map[string]any) bool {
				return m["level"] == "debug" && strings.Contains(fmt.Sprint(m["original"]), tc.canary)
			})
			if len(debug) != 1 {
				t.Errorf("%d debug lines with the prompt, want 1", len(debug))
			}
		})
	}

	for _, l := range mark.lines(t) {
		if l["level"] == "debug" {
			continue
		}
		line := fmt.Sprint(l)
		for _, c := range canaries {
			if strings.Contains(line, c) {
				t.Errorf("prompt text %q in a %v line: %s", c, l["level"], line)
			}
		}
	}
}

// TestOpsLogsFailures: every upstream failure is a warn line with its kind
// (retried attempts included), the generation line carries the failure,
// an LLM failure is a warn line with its cause, and a secret the upstream
// echoes back never reaches the log.
func TestOpsLogsFailures(t *testing.T) {
	up := newFakeUpstream(t)
	llm := newFakeLLM(t, `{"prompt":"unused"}`)
	startCaddy(t, opsSite(up.endpoint(), llm, "timeout 10s", ""))
	start := markLog(t)

	t.Run("upstream 503 echoing the key", func(t *testing.T) {
		mark := markLog(t)
		up.setHandler(func(w http.ResponseWriter, r *http.Request) {
			failWith(503, `{"error":"overloaded; you sent `+r.Header.Get("Authorization")+`"}`)(w, r)
		})
		status, _, body := do(t, http.MethodPost, "/v1/chat/completions", chatJSON("warn me no-enhance", 71, ""))
		if status != http.StatusBadGateway {
			t.Fatalf("status %d, want 502: %s", status, body)
		}
		retried := mark.find(t, "image service call failed; retrying", func(l map[string]any) bool {
			return l["level"] == "warn" && l["kind"] == "status_5xx" && l["attempt"] == float64(1)
		})
		failed := mark.find(t, "image service call failed", func(l map[string]any) bool {
			return l["level"] == "warn" && l["kind"] == "status_5xx" && l["model"] == "Z-Image"
		})
		gen := mark.find(t, "generation", withSeed(71))
		if len(retried) != 1 || len(failed) != 1 || len(gen) != 1 || gen[0]["failure"] != "status_5xx" || gen[0]["status"] != float64(502) {
			t.Fatalf("retry warnings %d, failure warnings %d, generation lines %v", len(retried), len(failed), gen)
		}
		for _, l := range append(retried, failed...) {
			if msg := fmt.Sprint(l["error"]); !strings.Contains(msg, "[redacted]") || strings.Contains(msg, testSDKey) {
				t.Errorf("error field %q: want the echoed key redacted", msg)
			}
		}
	})

	t.Run("LLM 500", func(t *testing.T) {
		mark := markLog(t)
		up.setHandler(nil)
		llm.setHandler(failWith(500, `{"error":"llm down"}`))
		status, _, body := do(t, http.MethodPost, "/v1/chat/completions", chatJSON("enhance fails", 72, ""))
		if status != http.StatusOK {
			t.Fatalf("status %d: %s", status, body)
		}
		warns := mark.find(t, "prompt enhancement failed; using the original prompt", func(l map[string]any) bool {
			return l["level"] == "warn" && strings.Contains(fmt.Sprint(l["error"]), "500")
		})
		gen := mark.find(t, "generation", withSeed(72))
		if len(warns) != 1 || len(gen) != 1 || gen[0]["enhance"] != "failed" {
			t.Fatalf("LLM warnings with the cause: %d; generation lines %v", len(warns), gen)
		}
	})

	for _, l := range start.lines(t) {
		line := fmt.Sprint(l)
		for _, s := range testSecrets {
			if strings.Contains(line, s) {
				t.Fatalf("a configured secret is in the log: %s", line)
			}
		}
	}
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

// TestOpsTwoSites: two gateways with different keys, models and upstreams
// work side by side in one Caddy, each with its own settings.
func TestOpsTwoSites(t *testing.T) {
	upA, upB := newFakeUpstream(t), newFakeUpstream(t)
	startCaddyRaw(t, twoSites(upA, upB, ""))
	hostA, hostB := fmt.Sprintf("a.localhost:%d", httpPort), fmt.Sprintf("b.localhost:%d", httpPort)

	for _, tc := range []struct {
		name, host, key, model, other string
		up                            *fakeUpstream
		sdKey                         string
		index                         int
	}{
		{"site a", hostA, testClientKey, "Model-A", "Model-B", upA, testSDKey, 3},
		{"site b", hostB, keyB, "Model-B", "Model-A", upB, sdKeyB, 7},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ctx := context.Background()
			auth := "Bearer " + tc.key
			r := send(ctx, http.MethodGet, "/v1/models", "", "Host", tc.host, "Authorization", auth)
			if r.status != http.StatusOK || !strings.Contains(string(r.body), `"id":"`+tc.model+`"`) || strings.Contains(string(r.body), tc.other) {
				t.Errorf("models: status %d: %s", r.status, r.body)
			}
			r = send(ctx, http.MethodPost, "/v1/chat/completions", `{"prompt":"side by side","seed":81}`, "Host", tc.host, "Authorization", auth)
			if r.status != http.StatusOK {
				t.Fatalf("chat: status %d: %s", r.status, r.body)
			}
			calls := tc.up.Calls()
			if len(calls) != 1 || calls[0].Auth != "Bearer "+tc.sdKey || calls[0].Body.ModelIndex != tc.index {
				t.Errorf("upstream calls %+v: want one with this site's key and model_index %d", calls, tc.index)
			}
			r = send(ctx, http.MethodPost, "/v1/chat/completions", `{"model":"`+tc.other+`","prompt":"x"}`, "Host", tc.host, "Authorization", auth)
			if r.status != http.StatusNotFound {
				t.Errorf("the other site's model: status %d, want 404", r.status)
			}
		})
	}
	t.Run("keys do not cross", func(t *testing.T) {
		for host, key := range map[string]string{hostA: keyB, hostB: testClientKey} {
			if r := send(context.Background(), http.MethodGet, "/v1/models", "", "Host", host, "Authorization", "Bearer "+key); r.status != http.StatusUnauthorized {
				t.Errorf("%s with the other site's key: status %d, want 401", host, r.status)
			}
		}
	})
}

// TestOpsTwoSitesShareOneUpstreamLimit: two sites that configure the same
// account (the upstream URL and key) with max_concurrent 1 share its
// limiter: while site a's generation runs, site b's request waits and times
// out. Another key on the same URL is another account with its own slot:
// then site b is served while site a's generation still runs.
func TestOpsTwoSitesShareOneUpstreamLimit(t *testing.T) {
	up := newFakeUpstream(t)
	g := newGate(t)
	up.setHandler(g.handler)
	const limit = "max_concurrent 1\n\t\t\tqueue_timeout 300ms"
	hostA, hostB := fmt.Sprintf("a.localhost:%d", httpPort), fmt.Sprintf("b.localhost:%d", httpPort)
	siteB := func(seed int) result {
		return send(context.Background(), http.MethodPost, "/v1/chat/completions", fmt.Sprintf(`{"prompt":"site b","seed":%d}`, seed),
			"Host", hostB, "Authorization", "Bearer "+keyB)
	}

	// one account: site b uses site a's key
	startCaddyRaw(t, strings.Replace(twoSites(up, up, limit), sdKeyB, testSDKey, 1))
	a := sendAsync(http.MethodPost, "/v1/chat/completions", `{"prompt":"site a holds the slot","seed":91}`, "Host", hostA)
	waitFor(t, "site a's generation at the fake upstream", func() bool { return up.active.Load() == 1 })
	if r := siteB(92); r.status != http.StatusTooManyRequests || r.header.Get("Retry-After") == "" {
		t.Errorf("site b while site a holds the account's only slot: status %d, Retry-After %q: %s", r.status, r.header.Get("Retry-After"), r.body)
	}
	g.release(t)
	if r := await(t, a); r.status != http.StatusOK {
		t.Errorf("site a: status %d: %s", r.status, r.body)
	}
	if got := seeds(up.Calls()); len(got) != 1 || got[0] != 91 {
		t.Errorf("upstream calls with seeds %v, want only site a's 91", got)
	}

	// two accounts: each site has its own key and its own slot
	startCaddyRaw(t, twoSites(up, up, limit))
	a = sendAsync(http.MethodPost, "/v1/chat/completions", `{"prompt":"site a holds its slot","seed":93}`, "Host", hostA)
	waitFor(t, "site a's generation at the fake upstream", func() bool { return up.active.Load() == 1 })
	b := sendAsync(http.MethodPost, "/v1/chat/completions", `{"prompt":"site b has its own","seed":94}`,
		"Host", hostB, "Authorization", "Bearer "+keyB)
	waitFor(t, "site b's generation at the fake upstream beside site a's", func() bool { return up.active.Load() == 2 })
	g.open()
	for name, ch := range map[string]<-chan result{"site a": a, "site b": b} {
		if r := await(t, ch); r.status != http.StatusOK {
			t.Errorf("%s: status %d: %s", name, r.status, r.body)
		}
	}
}
