package zimage

// The health endpoint: parsing, the answer
// through a real Caddy with accounts that work and accounts that rest, HEAD,
// no key in any form, and the store's write check.

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/caddyserver/certmagic"
)

func TestUnitHealthCaddyfile(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name, src string
		want      *HealthConfig
		err       string
	}{
		{"default path", "zimage_gateway {\n health\n}", &HealthConfig{}, ""},
		{"own path", "zimage_gateway {\n health /healthz\n}", &HealthConfig{Path: "/healthz"}, ""},
		{"two paths", "zimage_gateway {\n health /a /b\n}", nil, "wrong argument count"},
		{"a block", "zimage_gateway {\n health {\n  path /x\n }\n}", nil, "takes no block"},
		{"twice", "zimage_gateway {\n health\n health /x\n}", nil, "already specified"},
		{"relative", "zimage_gateway {\n health healthz\n}", nil, "must be absolute"},
		{"root", "zimage_gateway {\n health /\n}", nil, "must be absolute and not the site root"},
		{"not clean", "zimage_gateway {\n health /a/../b\n}", nil, "not clean"},
		{"an API path", "zimage_gateway {\n health /v1/models\n}", nil, "one of the gateway's API paths"},
		{"the store's path", "zimage_gateway {\n health /zimage/images/x\n}", nil, "one of the gateway's API paths"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var g Gateway
			err := g.UnmarshalCaddyfile(caddyfile.NewTestDispenser(tc.src))
			if tc.err != "" {
				if err == nil || !strings.Contains(err.Error(), tc.err) || !strings.Contains(err.Error(), "health") && tc.err != "wrong argument count" {
					t.Fatalf("error %v, want one saying %q and naming health", err, tc.err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if *g.Health != *tc.want {
				t.Errorf("got %+v, want %+v", g.Health, tc.want)
			}
		})
	}
	// the JSON field mirrors the Caddyfile
	var g Gateway
	if err := json.Unmarshal([]byte(`{"health":{"path":"/healthz"}}`), &g); err != nil || g.Health == nil || g.Health.Path != "/healthz" {
		t.Fatalf("JSON health: %+v %v", g.Health, err)
	}
}

// healthGet asks for the health endpoint without a key, as a load balancer does.
func healthGet(t *testing.T, method, path string) (int, http.Header, []byte, healthReport) {
	t.Helper()
	status, hdr, body := do(t, method, path, "", "Authorization", "")
	var rep healthReport
	if method != http.MethodHead {
		if err := json.Unmarshal(body, &rep); err != nil {
			t.Fatalf("health body is not JSON: %s", body)
		}
	}
	// not a key in any form the scrubber knows (and TestMain scans it too)
	if sc := newScrubber(testSecrets); sc.contains(string(body)) || sc.contains(fmt.Sprint(hdr)) {
		t.Fatalf("the health answer carries a key: %s", sc.Replace(string(body)))
	}
	return status, hdr, body, rep
}

// TestHealthOK: accounts awake and the store writable: 200 without a key,
// the accounts by name with their limits and the points the service
// reported, the store's state; HEAD the same without a body; another
// method 405; and no call to the image service.
func TestHealthOK(t *testing.T) {
	up := newFakeUpstream(t)
	up.setHandler(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		fmt.Fprint(w, `{"success":true,"data":{"image_url":"https://img.example.com/h.png","points_used":1,"remaining_points":4321}}`)
	})
	dir := t.TempDir()
	startCaddy(t, accountsSite(up.endpoint(),
		accountBlock("health-a", testAccountKeyA, "max_concurrent 2")+accountBlock("health-b", testAccountKeyB), "",
		"health\n\tstore {\n\t\tstorage file_system "+dir+"\n\t}"))
	if status, _, body := do(t, http.MethodPost, "/v1/chat/completions", chatJSON("points", 1, "")); status != 200 {
		t.Fatalf("generation: %d %s", status, body)
	}
	calls := len(up.Calls())

	status, hdr, body, rep := healthGet(t, http.MethodGet, "/v1/zimage/health")
	if status != 200 || rep.Status != "ok" || rep.Reason != "" || hdr.Get("Content-Type") != "application/json" || hdr.Get("Cache-Control") != "no-store" {
		t.Fatalf("health: %d %v %s", status, hdr, body)
	}
	if len(rep.Accounts) != 2 || rep.Accounts[0].Name != "health-a" || rep.Accounts[0].MaxConcurrent != 2 ||
		rep.Accounts[1].Name != "health-b" || rep.Accounts[1].MaxConcurrent != 0 || rep.Accounts[0].Resting {
		t.Errorf("accounts: %s", body)
	}
	// the generation went to health-b (unlimited: the most free slots):
	// its points are known, a's are not
	if p := rep.Accounts[1].PointsRemaining; p == nil || *p != 4321 || rep.Accounts[0].PointsRemaining != nil {
		t.Errorf("points: %s", body)
	}
	if rep.Store.State != "ok" || rep.Store.CheckedAt == nil {
		t.Errorf("store: %s", body)
	}
	for _, word := range []string{"api_key", "sd-", "Bearer", "points"} {
		if word != "points" && strings.Contains(string(body), word) {
			t.Errorf("the health body mentions %q: %s", word, body)
		}
	}

	status, hdr, body, _ = healthGet(t, http.MethodHead, "/v1/zimage/health")
	if status != 200 || len(body) != 0 || hdr.Get("Content-Type") != "application/json" || hdr.Get("Content-Length") == "0" {
		t.Errorf("HEAD: %d %v %q", status, hdr, body)
	}
	status, hdr, body = do(t, http.MethodPost, "/v1/zimage/health", "{}", "Authorization", "")
	if status != 405 || hdr.Get("Allow") != "GET, HEAD" {
		t.Errorf("POST: %d %v %s", status, hdr, body)
	} else {
		apiErr(t, body)
	}
	if n := len(up.Calls()); n != calls {
		t.Errorf("the health checks called the image service %d times", n-calls)
	}
}

// TestHealthEveryAccountRests: 503 with the reason, Retry-After and each
// account's rest when every account of the handler rests. The last awake
// account of a handler is never rested by its own failures (docs/design.md#failover-and-rests),
// so the accounts come to rest as they do in production with two sites
// sharing an account (docs/design.md#accounts): the fake service answers 429 with
// Retry-After for a's and b's keys; the site's first request rests a and
// finds b failing too; a request through the other handler, whose
// accounts are b and c, rests b (c is awake) and is served by c.
func TestHealthEveryAccountRests(t *testing.T) {
	up := newFakeUpstream(t)
	limited := failWith(429, `{"error":"rate limited"}`, "Retry-After", "120")
	up.setHandler(byKey(map[string]http.HandlerFunc{testAccountKeyA: limited, testAccountKeyB: limited}))
	site := fmt.Sprintf(`@other header X-Handler other
zimage_gateway @other {
	api_key %[1]s
	upstream %[2]s {
		%[4]s
		%[5]s
	}
	enhance off
}
zimage_gateway {
	api_key %[1]s
	upstream %[2]s {
		%[3]s
		%[4]s
	}
	enhance off
	health /healthz
}`, testClientKey, up.endpoint(), accountBlock("rest-a", testAccountKeyA), accountBlock("rest-b", testAccountKeyB), accountBlock("rest-c", testAccountKeyC))
	startCaddy(t, site)

	if status, _, _, rep := healthGet(t, http.MethodGet, "/healthz"); status != 200 || rep.Store.State != "off" {
		t.Fatalf("before any failure: %d %+v", status, rep)
	}
	if status, _, body := do(t, http.MethodPost, "/v1/chat/completions", chatJSON("rest", 1, "")); status != 429 {
		t.Fatalf("both accounts limited: %d %s", status, body)
	}
	if status, _, _, rep := healthGet(t, http.MethodGet, "/healthz"); status != 200 || !rep.Accounts[0].Resting || rep.Accounts[1].Resting {
		t.Fatalf("a rests, b works on: %d %+v", status, rep)
	}
	if status, _, body := do(t, http.MethodPost, "/v1/chat/completions", chatJSON("rest", 2, ""), "X-Handler", "other"); status != 200 {
		t.Fatalf("through the other handler: %d %s", status, body)
	}
	calls := len(up.Calls())
	status, hdr, body, rep := healthGet(t, http.MethodGet, "/healthz")
	if status != 503 || rep.Status != "unavailable" || !strings.Contains(rep.Reason, "every upstream account rests") {
		t.Fatalf("every account rests: %d %s", status, body)
	}
	if ra := hdr.Get("Retry-After"); ra == "" || ra == "0" {
		t.Errorf("Retry-After %q, want the time until the first account wakes", ra)
	}
	for _, a := range rep.Accounts {
		if !a.Resting || a.RestingUntil == nil || time.Until(*a.RestingUntil) < 100*time.Second {
			t.Errorf("account %s: %+v, want resting about 120s", a.Name, a)
		}
	}
	if status, _, body, _ := healthGet(t, http.MethodHead, "/healthz"); status != 503 || len(body) != 0 {
		t.Errorf("HEAD: %d %q", status, body)
	}
	if n := len(up.Calls()); n != calls {
		t.Errorf("the health checks called the image service %d times", n-calls)
	}
}

// countingStorage counts its writes and fails them while fail is set;
// the store's check loop writes from its own goroutine.
type countingStorage struct {
	certmagic.Storage
	writes atomic.Int64
	fail   atomic.Bool
}

func (c *countingStorage) Store(ctx context.Context, key string, v []byte) error {
	c.writes.Add(1)
	if c.fail.Load() {
		return errors.New("disk full at /secret/path")
	}
	return c.Storage.Store(ctx, key, v)
}

// waitUntil polls cond until it holds, failing the test after 10 s.
func waitUntil(t *testing.T, what string, cond func() bool) {
	t.Helper()
	for deadline := time.Now().Add(10 * time.Second); !cond(); time.Sleep(time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("waited 10s for %s", what)
		}
	}
}

// TestUnitHealthStore: the store's write check runs on its own schedule,
// so probes as far apart as a balancer's (35 s here, on a clock the test
// moves, ticked every 10 s) read a fresh result and answer 200; probes
// never write themselves; a store that cannot write makes the instance
// unavailable without the storage's error text in the body; a check that
// hangs counts as a failure; stop ends the loop.
func TestUnitHealthStore(t *testing.T) {
	t.Parallel()
	cs := &countingStorage{Storage: &certmagic.FileStorage{Path: t.TempDir()}}
	var clockMu sync.Mutex
	now := time.Date(2026, 12, 7, 10, 0, 0, 0, time.UTC)
	clock := func() time.Time { clockMu.Lock(); defer clockMu.Unlock(); return now }
	advance := func(d time.Duration) { clockMu.Lock(); now = now.Add(d); clockMu.Unlock() }
	st := newImageStore(cs, "zimage", 0, 1<<20, "", nil)
	p := newStoreProbe(st, clock, nil)
	h := &health{pool: unitPool(), store: st, now: clock, probe: p}
	tick := make(chan time.Time)
	go p.run(tick)
	defer func() {
		p.stop()
		select {
		case <-p.done:
		case <-time.After(10 * time.Second):
			t.Error("the check loop did not end on stop")
		}
	}()
	checkedAt := func() time.Time { p.mu.Lock(); defer p.mu.Unlock(); return p.at }
	// one tick of the loop, 10 s later: the test waits for its write
	step := func() {
		advance(healthStoreEvery)
		tick <- clock()
		waitUntil(t, "the check", func() bool { return checkedAt().Equal(clock()) })
	}

	if rep, _ := h.report(t.Context()); rep.Status != "ok" || rep.Store.State != "ok" || !rep.Store.CheckedAt.Equal(clock()) {
		t.Fatalf("first probe: %+v", rep)
	}
	for probe := range 3 {
		step()
		step()
		step()
		advance(5 * time.Second) // 35 s after the last probe
		rep, _ := h.report(t.Context())
		if rep.Status != "ok" || rep.Reason != "" || rep.Store.State != "ok" || !rep.Store.CheckedAt.Equal(clock().Add(-5*time.Second)) {
			t.Fatalf("probe %d, 35 s after the one before: %+v", probe+2, rep)
		}
	}
	writes := cs.writes.Load()
	if writes != 1+9 {
		t.Errorf("%d writes for the first check and nine ticks", writes)
	}
	for range 5 {
		_, _ = h.report(t.Context())
	}
	if n := cs.writes.Load(); n != writes {
		t.Errorf("five probes wrote %d times; the loop alone writes", n-writes)
	}
	if _, err := cs.Load(t.Context(), "zimage/health"); err != nil {
		t.Errorf("the check wrote no zimage/health: %v", err)
	}

	// a store that cannot write
	cs.fail.Store(true)
	step()
	rep, _ := h.report(t.Context())
	if rep.Status != "unavailable" || rep.Store.State != "failing" || rep.Reason != "the store cannot write to its storage" {
		t.Fatalf("failing store: %+v", rep)
	}
	if b, _ := json.Marshal(rep); strings.Contains(string(b), "secret") || strings.Contains(string(b), "disk full") {
		t.Fatalf("the storage's error reached the body: %s", b)
	}
	cs.fail.Store(false)
	step()
	if rep, _ = h.report(t.Context()); rep.Status != "ok" {
		t.Fatalf("after the store recovered: %+v", rep)
	}
	// no check has ended for longer than three ticks: the write hangs
	advance(healthStoreStale + time.Second)
	if rep, _ = h.report(t.Context()); rep.Store.State != "failing" || !strings.Contains(rep.Reason, "has not answered since") {
		t.Errorf("a hanging check: %+v", rep)
	}
}

// TestUnitHealthProvisionLoop: with the store on, provisioning health
// starts the write check loop, which writes before any probe comes, and
// stop (Cleanup) ends it; with the store off there is no loop.
func TestUnitHealthProvisionLoop(t *testing.T) {
	t.Parallel()
	cs := &countingStorage{Storage: &certmagic.FileStorage{Path: t.TempDir()}}
	g := &Gateway{accounts: unitPool(), store: newImageStore(cs, "zimage", 0, 1<<20, "", nil), Health: &HealthConfig{}}
	h, err := g.provisionHealth()
	if err != nil {
		t.Fatal(err)
	}
	waitUntil(t, "a write without a probe", func() bool { return cs.writes.Load() > 0 })
	g.health = h
	if err := g.Cleanup(); err != nil {
		t.Fatal(err)
	}
	select {
	case <-h.probe.done:
	case <-time.After(10 * time.Second):
		t.Fatal("Cleanup did not end the check loop")
	}
	g = &Gateway{accounts: unitPool(), Health: &HealthConfig{}}
	if h, err = g.provisionHealth(); err != nil || h.probe != nil {
		t.Fatalf("without a store: %+v %v", h, err)
	}
	h.stop()
}

// TestHealthUpstreamSeen: the body reports the upstream as the
// generations last saw it; three generations in a row that failed make
// the status degraded, still 200 (a generation can start); a success
// ends it. The service's message, which quotes the prompt, never reaches
// the body.
func TestHealthUpstreamSeen(t *testing.T) {
	up := newFakeUpstream(t)
	const prompt = "a lighthouse named quasimodo-7781"
	up.setHandler(failWith(400, `{"success":false,"message":"refused: `+prompt+`"}`))
	startCaddy(t, accountsSite(up.endpoint(), accountBlock("seen-a", testAccountKeyA)+accountBlock("seen-b", testAccountKeyB), "", "health"))

	status, _, body, rep := healthGet(t, http.MethodGet, "/v1/zimage/health")
	if status != 200 || rep.Status != "ok" || rep.Upstream != (healthUpstream{}) || !strings.Contains(string(body), `"upstream":{"last_success":null,"last_failure":null,"last_failure_kind":"","consecutive_failures":0}`) {
		t.Fatalf("before any generation: %d %s", status, body)
	}
	for i := 1; i <= 4; i++ {
		if status, _, body := do(t, http.MethodPost, "/v1/images/generations", `{"model":"Z-Image","prompt":"`+prompt+`"}`); status != 502 {
			t.Fatalf("generation %d: %d %s", i, status, body)
		}
		status, _, body, rep := healthGet(t, http.MethodGet, "/v1/zimage/health")
		want := "ok"
		if i >= 3 {
			want = "degraded"
		}
		if status != 200 || rep.Status != want || rep.Upstream.ConsecutiveFailures != i || rep.Upstream.LastFailureKind != kindBadResponse ||
			rep.Upstream.LastFailure == nil || rep.Upstream.LastSuccess != nil {
			t.Fatalf("after %d failed generations: %d %s", i, status, body)
		}
		if want == "degraded" && !strings.Contains(rep.Reason, "failed on every account") {
			t.Errorf("degraded without its reason: %s", body)
		}
		if strings.Contains(string(body), "quasimodo") || strings.Contains(string(body), "refused") {
			t.Fatalf("the health body carries the service's message or the prompt: %s", body)
		}
	}
	// HEAD agrees with GET
	if status, _, _, _ := healthGet(t, http.MethodHead, "/v1/zimage/health"); status != 200 {
		t.Errorf("HEAD while degraded: %d", status)
	}

	up.setHandler(func(w http.ResponseWriter, r *http.Request) { writeImage(w, "https://img.example.com/seen.png") })
	if status, _, body := do(t, http.MethodPost, "/v1/images/generations", `{"model":"Z-Image","prompt":"`+prompt+`"}`); status != 200 {
		t.Fatalf("a generation that works: %d %s", status, body)
	}
	status, _, body, rep = healthGet(t, http.MethodGet, "/v1/zimage/health")
	if status != 200 || rep.Status != "ok" || rep.Reason != "" || rep.Upstream.ConsecutiveFailures != 0 || rep.Upstream.LastSuccess == nil ||
		rep.Upstream.LastFailure == nil || rep.Upstream.LastFailureKind != kindBadResponse {
		t.Fatalf("after a success: %d %s", status, body)
	}
}

// TestUnitHealthREADME: the README's health check example for Caddy's own
// reverse_proxy adapts with an active health check on the gateway's
// default health path, and its sample answer is the endpoint's shape.
func TestUnitHealthREADME(t *testing.T) {
	t.Parallel()
	blocks, _, _ := readmeBlocks(t, "caddy")
	found := false
	for _, b := range blocks {
		if !strings.Contains(b, "health_uri") {
			continue
		}
		found = true
		cfg := string(unitAdapt(t, b))
		if !strings.Contains(cfg, `"active":{`) || !strings.Contains(cfg, `"uri":"`+defaultHealthPath+`"`) {
			t.Errorf("the health_uri example does not check %s: %s", defaultHealthPath, cfg)
		}
	}
	if !found {
		t.Fatal("the README has no reverse_proxy health_uri example")
	}
	raw, err := os.ReadFile("README.md")
	if err != nil {
		t.Fatal(err)
	}
	_, section, _ := strings.Cut(string(raw), "### Health checks")
	dec := json.NewDecoder(strings.NewReader(fenced(t, section, "```json\n")))
	dec.DisallowUnknownFields()
	var rep healthReport
	if err := dec.Decode(&rep); err != nil || rep.Status != "ok" || len(rep.Accounts) != 2 || rep.Store.State != "ok" || rep.Upstream.LastSuccess == nil {
		t.Errorf("the README's sample health answer: %+v %v", rep, err)
	}
}
