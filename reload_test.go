package zimage

// Lifecycle (docs/design.md#observability): loading a new config through the admin API while
// generations are in flight, as `caddy reload` does. Requests in flight
// finish with the config they started with, new requests get the new one,
// and what each config's Provision made is released by its Cleanup.

import (
	"fmt"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
)

// limiterRefs is how many provisioned handlers hold the shared limiter of
// the test's account (testSDKey) on an upstream URL (0 when none does).
func limiterRefs(url string) int {
	refs, _ := limiters.References(limiterKey(url, testSDKey, defaultAccount))
	return refs
}

// TestOpsReloadUnderLoad: K generations are in flight when a changed
// config (another upstream, another model) is loaded; each finishes with
// the old config's upstream and model, while a new request already gets
// the new config. Afterwards only the new config holds a limiter.
func TestOpsReloadUnderLoad(t *testing.T) {
	const k = 3
	oldUp := newFakeUpstream(t)
	g := newGate(t)
	oldUp.setHandler(g.handler)
	startCaddy(t, opsSite(oldUp.endpoint(), nil, "timeout 30s\n\t\tmax_concurrent 3\n\t\tqueue_timeout 30s", ""))

	var inflight [k]<-chan result
	for i := range inflight {
		inflight[i] = sendAsync(http.MethodPost, "/v1/chat/completions", chatJSON(fmt.Sprintf("started before the reload %d", i), 100+i, ""))
	}
	waitFor(t, "all generations at the old upstream", func() bool { return oldUp.active.Load() == k })

	newUp := newFakeUpstream(t)
	startCaddy(t, opsSite(newUp.endpoint(), nil, "timeout 30s\n\t\tmax_concurrent 3", "model Z-Image-B {\n\t\tsteps 12\n\t}"))

	status, _, body := do(t, http.MethodPost, "/v1/chat/completions", `{"model":"Z-Image-B","prompt":"after the reload","seed":200}`)
	if status != http.StatusOK {
		t.Fatalf("new request: status %d: %s", status, body)
	}
	if calls := newUp.Calls(); len(calls) != 1 || calls[0].Body.Seed != 200 || calls[0].Body.Steps != 12 {
		t.Errorf("new upstream calls %+v, want the new request with the new model's 12 steps", calls)
	}
	if status, _, body := do(t, http.MethodPost, "/v1/chat/completions", `{"model":"Z-Image","prompt":"old model"}`); status != http.StatusNotFound {
		t.Errorf("the old config's model after the reload: status %d, want 404: %s", status, body)
	}

	g.open()
	for i, ch := range inflight {
		r := await(t, ch)
		if r.status != http.StatusOK {
			t.Errorf("in-flight request %d: status %d: %s", i, r.status, r.body)
			continue
		}
		if c := chatContent(t, r.body); !strings.Contains(c, "https://img.example.com/gated.png") || !strings.Contains(string(r.body), `"model":"Z-Image"`) {
			t.Errorf("in-flight request %d did not finish with the old config: %s", i, r.body)
		}
	}
	calls := oldUp.Calls()
	if len(calls) != k {
		t.Errorf("old upstream calls: %d, want %d", len(calls), k)
	}
	for _, c := range calls {
		if c.Body.Steps != defaultSteps {
			t.Errorf("an in-flight request used %d steps, want the old config's %d", c.Body.Steps, defaultSteps)
		}
	}
	if n := len(newUp.Calls()); n != 1 {
		t.Errorf("new upstream calls: %d, want 1 (the in-flight requests stay on the old one)", n)
	}
	if old, cur := limiterRefs(oldUp.endpoint()), limiterRefs(newUp.endpoint()); old != 0 || cur != 1 {
		t.Errorf("limiter references: old config's %d (want 0), new config's %d (want 1)", old, cur)
	}
}

// TestOpsReloadKeepsLimiterShared: a reload that keeps the upstream and
// max_concurrent keeps the limiter, so the slot held by a request of the
// old config still counts: the new config's request waits (and here times
// out) instead of exceeding the limit, and gets the slot once it frees.
func TestOpsReloadKeepsLimiterShared(t *testing.T) {
	up := newFakeUpstream(t)
	g := newGate(t)
	up.setHandler(g.handler)
	upstream := "timeout 30s\n\t\tmax_concurrent 1\n\t\tqueue_timeout 300ms"
	startCaddy(t, opsSite(up.endpoint(), nil, upstream, "stream_keepalive 5s"))

	held := sendAsync(http.MethodPost, "/v1/chat/completions", chatJSON("holds the slot", 301, ""))
	waitFor(t, "the old config's generation at the upstream", func() bool { return up.active.Load() == 1 })
	startCaddy(t, opsSite(up.endpoint(), nil, upstream, "stream_keepalive 6s"))

	if status, hdr, body := do(t, http.MethodPost, "/v1/chat/completions", chatJSON("waits", 302, "")); status != http.StatusTooManyRequests || hdr.Get("Retry-After") == "" {
		t.Errorf("while the old config's request holds the slot: status %d, Retry-After %q: %s", status, hdr.Get("Retry-After"), body)
	}
	g.open()
	if r := await(t, held); r.status != http.StatusOK {
		t.Fatalf("old config's request: status %d: %s", r.status, r.body)
	}
	if status, _, body := do(t, http.MethodPost, "/v1/chat/completions", chatJSON("gets the slot", 303, "")); status != http.StatusOK {
		t.Fatalf("after the slot frees: status %d: %s", status, body)
	}
	if got := seeds(up.Calls()); len(got) != 2 || got[0] != 301 || got[1] != 303 {
		t.Errorf("upstream calls with seeds %v, want [301 303]", got)
	}
	if n := limiterRefs(up.endpoint()); n != 1 {
		t.Errorf("limiter references after the reload: %d, want 1", n)
	}
}

// TestOpsReloadReleasesConnections: each reload's Cleanup closes the old
// config's idle connections to the image service (and with them their
// goroutines) and drops its limiter reference, so neither piles up over
// reloads.
func TestOpsReloadReleasesConnections(t *testing.T) {
	var open atomic.Int32
	srv := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		writeImage(w, "https://img.example.com/conn.png")
	}))
	srv.Config.ConnState = func(_ net.Conn, s http.ConnState) {
		switch s {
		case http.StateNew:
			open.Add(1)
		case http.StateClosed, http.StateHijacked:
			open.Add(-1)
		}
	}
	srv.Start()
	t.Cleanup(srv.Close)
	url := srv.URL + "/api/v1/generate_image"

	const reloads = 4
	for i := range reloads {
		model := fmt.Sprintf("Z-%d", i)
		startCaddy(t, opsSite(url, nil, "timeout 5s\n\t\tmax_concurrent 2", "model "+model))
		if status, _, body := do(t, http.MethodPost, "/v1/chat/completions", `{"model":"`+model+`","prompt":"keep-alive"}`); status != http.StatusOK {
			t.Fatalf("config %d: status %d: %s", i, status, body)
		}
	}
	// every config made its own connection; all but the current one's go
	waitFor(t, "the old configs' connections to close", func() bool { return open.Load() <= 1 })
	if n := limiterRefs(url); n != 1 {
		t.Errorf("limiter references after %d loads: %d, want 1", reloads, n)
	}
}

// unitLimiter is the shared limiter under key, or nil.
func unitLimiter(key string) *limiter {
	var found *limiter
	limiters.Range(func(k, v any) bool {
		if k == key {
			found = v.(*limiter)
		}
		return found == nil
	})
	return found
}

// unitQueueLen is how many generations wait in the one queue.
func unitQueueLen() int {
	limMu.Lock()
	defer limMu.Unlock()
	return len(queue)
}

// TestOpsReloadLowersLimitInPlace: with 10 generations in
// flight and 4 more queued under max_concurrent 10, a reload lowers the
// limit to 3 and 4 requests of the new config queue too. The limiter of
// the account is resized in place, so from the reload on no generation
// starts while 3 or more run, whichever config it came from: as the
// upstream lets the requests go one by one, each of the 8 that arrive
// after the reload finds at most 3 in flight, itself included.
func TestOpsReloadLowersLimitInPlace(t *testing.T) {
	up := newFakeUpstream(t)
	g := newGate(t)
	var reloaded atomic.Bool
	var mu sync.Mutex
	var seen []int32 // in flight at the fake when a request arrived after the reload
	up.setHandler(func(w http.ResponseWriter, r *http.Request) {
		if reloaded.Load() {
			mu.Lock()
			seen = append(seen, up.active.Load())
			mu.Unlock()
		}
		g.handler(w, r)
	})
	site := func(n int) string {
		return opsSite(up.endpoint(), nil, fmt.Sprintf("timeout 30s\n\t\tqueue_timeout 30s\n\t\tmax_concurrent %d", n), "")
	}
	startCaddy(t, site(10))
	var results []<-chan result
	for i := range 14 {
		results = append(results, sendAsync(http.MethodPost, "/v1/chat/completions", chatJSON("before the reload", 500+i, "")))
	}
	waitFor(t, "10 generations in flight and 4 queued", func() bool { return up.active.Load() == 10 && unitQueueLen() == 4 })
	before := unitLimiter(limiterKey(up.endpoint(), testSDKey, defaultAccount))

	reloaded.Store(true)
	startCaddy(t, site(3))
	for i := range 4 {
		results = append(results, sendAsync(http.MethodPost, "/v1/chat/completions", chatJSON("after the reload", 600+i, "")))
	}
	waitFor(t, "8 requests queued (the new config's 4 wait behind the 10 in flight)", func() bool { return unitQueueLen() == 8 })
	if n := up.active.Load(); n != 10 {
		t.Fatalf("%d in flight at the fake right after the reload, want the 10 of before", n)
	}

	for range len(results) {
		g.release(t)
	}
	for i, ch := range results {
		if r := await(t, ch); r.status != http.StatusOK {
			t.Errorf("request %d: status %d: %s", i, r.status, r.body)
		}
	}
	mu.Lock()
	defer mu.Unlock()
	if len(seen) != 8 {
		t.Errorf("%d generations started after the reload, want the 8 queued", len(seen))
	}
	for i, n := range seen {
		if n > 3 {
			t.Errorf("generation %d after the reload started with %d in flight, over the new limit of 3: %v", i, n, seen)
		}
	}
	after := unitLimiter(limiterKey(up.endpoint(), testSDKey, defaultAccount))
	if before != after || before == nil {
		t.Errorf("the reload made another limiter for the same account (%p, then %p)", before, after)
	}
	if n := limiterRefs(up.endpoint()); n != 1 {
		t.Errorf("limiter references after the reload: %d, want 1", n)
	}
}

// TestOpsReloadAccountAbsentKeepsItsSlots: account a1
// (max_concurrent 2) has 2 generations in flight and 6 queued when a
// reload drops it, and a second reload brings it back with
// max_concurrent 1. The old config's pool keeps a1's limiter while its
// requests run, so the slots they hold still count: a1's key never has
// more than 2 calls at once, and every call that starts after the second
// reload finds itself alone on the key.
func TestOpsReloadAccountAbsentKeepsItsSlots(t *testing.T) {
	up := newFakeUpstream(t)
	g := newGate(t)
	var reloaded atomic.Bool
	var mu sync.Mutex
	var seen []int // a1's calls in flight when one arrived after the second reload
	up.setHandler(func(w http.ResponseWriter, r *http.Request) {
		if reloaded.Load() && r.Header.Get("Authorization") == "Bearer "+testAccountKeyA {
			active, _ := up.keyStats(testAccountKeyA)
			mu.Lock()
			seen = append(seen, active)
			mu.Unlock()
		}
		g.handler(w, r)
	})
	site := func(accounts string) string {
		return accountsSite(up.endpoint(), accounts, "timeout 30s\n\t\tqueue_timeout 30s", "")
	}
	startCaddy(t, site(accountBlock("a1", testAccountKeyA, "max_concurrent 2")))
	var results []<-chan result
	for i := range 8 {
		results = append(results, sendAsync(http.MethodPost, "/v1/chat/completions", chatJSON("a1 before the reloads", 1700+i, "")))
	}
	waitFor(t, "2 generations on a1 and 6 queued", func() bool {
		active, _ := up.keyStats(testAccountKeyA)
		return active == 2 && unitQueueLen() == 6
	})

	startCaddy(t, site(accountBlock("a2", testAccountKeyB, "max_concurrent 1")))
	reloaded.Store(true)
	startCaddy(t, site(accountBlock("a1", testAccountKeyA, "max_concurrent 1")))
	for i := range 2 {
		results = append(results, sendAsync(http.MethodPost, "/v1/chat/completions", chatJSON("a1 after the reloads", 1800+i, "")))
	}
	waitFor(t, "the new config's 2 requests to queue behind the old 6", func() bool { return unitQueueLen() == 8 })
	if active, _ := up.keyStats(testAccountKeyA); active != 2 {
		t.Fatalf("%d calls on a1 right after the reloads, want the 2 of before", active)
	}

	for range len(results) {
		g.release(t)
	}
	for i, ch := range results {
		if r := await(t, ch); r.status != http.StatusOK {
			t.Errorf("request %d: status %d: %s", i, r.status, r.body)
		}
	}
	if _, peak := up.keyStats(testAccountKeyA); peak != 2 {
		t.Errorf("a1's key had %d calls at once, want at most its first limit, 2", peak)
	}
	mu.Lock()
	defer mu.Unlock()
	if len(seen) != 8 {
		t.Errorf("%d calls on a1 after the reloads, want the 6 old and 2 new queued ones", len(seen))
	}
	for i, n := range seen {
		if n > 1 {
			t.Errorf("call %d on a1 after the reloads started with %d in flight, over the new limit of 1: %v", i, n, seen)
		}
	}
	if refs, _ := limiters.References(limiterKey(up.endpoint(), testAccountKeyA, "a1")); refs != 1 {
		t.Errorf("a1's limiter has %d references once the old requests are done, want the current config's 1", refs)
	}
}
