package zimage

// The concurrency limit and its queue through a real Caddy: one limit across
// endpoints, the queue timeout, a queued client that leaves, and one
// upstream limit shared by two sites.

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"
)

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

func isRoleChunk(l string) bool {
	return strings.HasPrefix(l, "data: ") && strings.Contains(l, `"role":"assistant"`)
}

func isKeepAlive(l string) bool { return l == ": keep-alive" }

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
