package zimage

// The health endpoint (SPEC §15.1, issue 16 item 3): parsing, the answer
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
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/caddyserver/certmagic"
)

func TestUnitHealthCaddyfile(t *testing.T) {
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
// account of a handler is never rested by its own failures (SPEC §11.2),
// so the accounts come to rest as they do in production with two sites
// sharing an account (SPEC §11.7): the fake service answers 429 with
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

// failingStorage is a storage whose writes fail.
type failingStorage struct {
	certmagic.Storage
	writes int
}

func (f *failingStorage) Store(context.Context, string, []byte) error {
	f.writes++
	return errors.New("disk full at /secret/path")
}

// TestUnitHealthStore: a store that cannot write makes the instance
// unavailable, without the storage's error text in the body; probes in
// quick succession write once, and a stale result starts one new check.
func TestUnitHealthStore(t *testing.T) {
	fs := &failingStorage{Storage: &certmagic.FileStorage{Path: t.TempDir()}}
	g := &Gateway{accounts: unitPool(), store: newImageStore(fs, "zimage", 0, 1<<20, "", nil), Health: &HealthConfig{}}
	h, err := g.provisionHealth()
	if err != nil {
		t.Fatal(err)
	}
	now := time.Now()
	h.now = func() time.Time { return now }
	for range 3 {
		rep, _ := h.report(t.Context())
		if rep.Status != "unavailable" || rep.Store.State != "failing" || rep.Reason != "the store cannot write to its storage" {
			t.Fatalf("%+v", rep)
		}
		if b, _ := json.Marshal(rep); strings.Contains(string(b), "secret") || strings.Contains(string(b), "disk full") {
			t.Fatalf("the storage's error reached the body: %s", b)
		}
	}
	if fs.writes != 1 {
		t.Errorf("%d writes for three probes, want one", fs.writes)
	}

	// a writable store: ok once a fresh check has run
	ok := newImageStore(&certmagic.FileStorage{Path: t.TempDir()}, "zimage", 0, 1<<20, "", nil)
	h.store = ok
	h.probe.at = now.Add(-healthStoreEvery) // stale: the next probe checks again
	done := func() chan struct{} { h.probe.mu.Lock(); defer h.probe.mu.Unlock(); return h.probe.running }
	rep, _ := h.report(t.Context()) // answers with the stale result meanwhile
	if rep.Store.State != "failing" {
		t.Errorf("while the new check runs: %+v", rep)
	}
	if ch := done(); ch != nil {
		<-ch
	}
	if rep, _ = h.report(t.Context()); rep.Status != "ok" || rep.Store.State != "ok" {
		t.Errorf("after a good check: %+v", rep)
	}
	if _, err := ok.storage.Load(t.Context(), "zimage/health"); err != nil {
		t.Errorf("the check wrote no zimage/health: %v", err)
	}
	// a check that has not answered for long counts as a failure
	now = now.Add(healthStoreStale + time.Second)
	h.probe.mu.Lock()
	h.probe.running = make(chan struct{}) // one hangs
	h.probe.mu.Unlock()
	if rep, _ = h.report(t.Context()); rep.Store.State != "failing" || !strings.Contains(rep.Reason, "has not answered since") {
		t.Errorf("a hanging check: %+v", rep)
	}
}

// TestUnitHealthREADME: the README's health check example for Caddy's own
// reverse_proxy adapts with an active health check on the gateway's
// default health path, and its sample answer is the endpoint's shape.
func TestUnitHealthREADME(t *testing.T) {
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
	if err := dec.Decode(&rep); err != nil || rep.Status != "ok" || len(rep.Accounts) != 2 || rep.Store.State != "ok" {
		t.Errorf("the README's sample health answer: %+v %v", rep, err)
	}
}
