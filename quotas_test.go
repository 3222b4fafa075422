package zimage

import (
	"encoding/json"
	"net/http"
	"os"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
)

func TestUnitQuotaCaddyfile(t *testing.T) {
	good := `zimage_gateway {
		client alice {
			key k1
			quota 3 images per day
			quota 50 images per month
		}
		quota_timezone Europe/Berlin
	}`
	var g Gateway
	if err := g.UnmarshalCaddyfile(caddyfile.NewTestDispenser(good)); err != nil {
		t.Fatal(err)
	}
	if q := g.Clients[0].Quotas; len(q) != 2 || q[0] != (QuotaConfig{Images: 3, Per: "day"}) || q[1] != (QuotaConfig{Images: 50, Per: "month"}) || g.QuotaTimezone != "Europe/Berlin" {
		t.Errorf("parsed %+v, zone %q", q, g.QuotaTimezone)
	}
	for _, bad := range []struct{ quota, want string }{
		{"quota 3 images per year", "not one of hour, day, week, month"},
		{"quota 0 images per day", "at least 1"},
		{"quota x images per day", "not a whole number"},
		{"quota 3 per day", "want 'quota <n> images per"},
		{"quota 3 images per day\n\t\t\tquota 4 images per day", "given twice"},
	} {
		var g Gateway
		err := g.UnmarshalCaddyfile(caddyfile.NewTestDispenser("zimage_gateway {\n\t\tclient alice {\n\t\t\tkey k1\n\t\t\t" + bad.quota + "\n\t\t}\n\t}"))
		if err == nil || !strings.Contains(err.Error(), bad.want) {
			t.Errorf("%q: error %v, want one saying %q", bad.quota, err, bad.want)
		}
	}
}

func TestUnitQuotaPeriods(t *testing.T) {
	berlin, err := time.LoadLocation("Europe/Berlin")
	if err != nil {
		t.Skip("no tzdata:", err)
	}
	at := time.Date(2026, 12, 9, 15, 30, 0, 0, berlin) // a Wednesday
	for _, tc := range []struct{ per, start, end string }{
		{"hour", "2026-12-09T15:00:00+01:00", "2026-12-09T16:00:00+01:00"},
		{"day", "2026-12-09T00:00:00+01:00", "2026-12-10T00:00:00+01:00"},
		{"week", "2026-12-07T00:00:00+01:00", "2026-12-14T00:00:00+01:00"},
		{"month", "2026-12-01T00:00:00+01:00", "2027-01-01T00:00:00+01:00"},
	} {
		s, e := periodBounds(tc.per, at, berlin)
		if s.Format(time.RFC3339) != tc.start || e.Format(time.RFC3339) != tc.end {
			t.Errorf("%s: %s – %s, want %s – %s", tc.per, s.Format(time.RFC3339), e.Format(time.RFC3339), tc.start, tc.end)
		}
	}
	// a day across the change to summer time is 23 hours long
	s, e := periodBounds("day", time.Date(2027, 3, 28, 12, 0, 0, 0, berlin), berlin)
	if e.Sub(s) != 23*time.Hour {
		t.Errorf("the day of the change to summer time lasts %s", e.Sub(s))
	}
}

// quotaSite is the gateway with alice limited to 3 images a day (UTC) and
// bob without a quota; extra lines go in the gateway block.
// The counts are kept in a storage of the test's own.
func quotaSite(t *testing.T, up *fakeUpstream, extra string) string {
	if !strings.Contains(extra, "store {") {
		extra += "\n\tstore {\n\t\tstorage file_system " + t.TempDir() + "\n\t}"
	}
	return opsSite(up.endpoint(), nil, "timeout 10s\n\t\tretries 0", `client alice {
		key `+testAliceKey+`
		quota 3 images per day
	}
	client bob {
		key `+testBobKey+`
	}
	quota_timezone UTC
	health
	`+extra) + "\nmetrics /metrics"
}

type usageAnswer struct {
	Object string       `json:"object"`
	Client string       `json:"client"`
	Quotas []usageQuota `json:"quotas"`
}

func getUsage(t *testing.T, path, key string) usageAnswer {
	t.Helper()
	status, _, body := do(t, http.MethodGet, path, "", as(key)...)
	var u usageAnswer
	if status != http.StatusOK || json.Unmarshal(body, &u) != nil || u.Object != "usage" {
		t.Fatalf("GET %s: %d %s", path, status, body)
	}
	return u
}

func tomorrowUTC() string {
	y, m, d := time.Now().UTC().Date()
	return time.Date(y, m, d+1, 0, 0, 0, 0, time.UTC).Format(time.RFC3339)
}

// TestQuotaCountsImagesMade: every image made counts (n:2 counts 2), a
// failed generation counts nothing, a request that would pass the quota
// is a 429 insufficient_quota naming it and its reset with Retry-After;
// the usage endpoint answers each client its own, the metric and the
// health body show it.
func TestQuotaCountsImagesMade(t *testing.T) {
	up := newFakeUpstream(t)
	startCaddy(t, quotaSite(t, up, ""))

	if u := getUsage(t, "/v1/zimage/usage", testAliceKey); u.Client != "alice" || len(u.Quotas) != 1 ||
		u.Quotas[0] != (usageQuota{Period: "day", Limit: 3, Used: 0, ResetsAt: tomorrowUTC()}) {
		t.Errorf("alice's usage before any image: %+v", u)
	}
	if status, _, body := do(t, http.MethodPost, "/v1/images/generations", `{"prompt":"two","n":2}`, as(testAliceKey)...); status != 200 {
		t.Fatalf("n=2: %d %s", status, body)
	}
	// a failure counts nothing
	up.setHandler(func(w http.ResponseWriter, r *http.Request) { http.Error(w, "down", http.StatusInternalServerError) })
	if status, _, body := do(t, http.MethodPost, "/v1/images/generations", `{"prompt":"fails"}`, as(testAliceKey)...); status != http.StatusBadGateway {
		t.Fatalf("failing generation: %d %s", status, body)
	}
	up.setHandler(nil)
	if u := getUsage(t, "/zimage/usage", testAliceKey); len(u.Quotas) != 1 || u.Quotas[0].Used != 2 {
		t.Errorf("alice's usage after 2 images and a failure: %+v, want 2 used", u)
	}

	status, hdr, body := do(t, http.MethodPost, "/v1/images/generations", `{"prompt":"two more","n":2}`, as(testAliceKey)...)
	e := apiErr(t, body)
	if status != http.StatusTooManyRequests || e.Type != "insufficient_quota" || e.Code != "insufficient_quota" ||
		!strings.Contains(e.Message, "client alice has used 2 of its 3 images per day") || !strings.Contains(e.Message, tomorrowUTC()) {
		t.Errorf("n=2 with 1 left: %d %s", status, body)
	}
	if ra, err := strconv.Atoi(hdr.Get("Retry-After")); err != nil || ra < 1 || ra > 86400 {
		t.Errorf("Retry-After %q, want the seconds until midnight UTC", hdr.Get("Retry-After"))
	}
	if status, _, body := do(t, http.MethodPost, "/v1/chat/completions", chatJSON("the third", 7, ""), as(testAliceKey)...); status != 200 {
		t.Fatalf("the third image: %d %s", status, body)
	}
	status, _, body = do(t, http.MethodPost, "/v1/chat/completions", chatJSON("the fourth", 8, ""), as(testAliceKey)...)
	want := "client alice has used its 3 images per day; the quota resets at " + tomorrowUTC()
	if e := apiErr(t, body); status != http.StatusTooManyRequests || e.Message != want {
		t.Errorf("the fourth image: %d %s, want the message %q", status, body, want)
	}
	if status, _, body := do(t, http.MethodPost, "/v1/images/generations", `{"prompt":"four","n":4}`, as(testAliceKey)...); status != http.StatusBadRequest {
		t.Errorf("n=4 against a quota of 3: %d %s, want 400: it can never pass", status, body)
	}
	if n := len(up.Calls()); n != 4 {
		t.Errorf("the service was called %d times, want 4 (2 + a failure + 1)", n)
	}

	// bob has no quota and sees nobody else's
	if u := getUsage(t, "/v1/zimage/usage", testBobKey); u.Client != "bob" || u.Quotas == nil || len(u.Quotas) != 0 {
		t.Errorf("bob's usage: %+v, want an empty list", u)
	}
	if status, _, _ := do(t, http.MethodGet, "/v1/zimage/usage", "", "Authorization", ""); status != http.StatusUnauthorized {
		t.Errorf("usage without a key: %d, want 401", status)
	}
	if status, _, _ := do(t, http.MethodPost, "/v1/zimage/usage", "{}", as(testAliceKey)...); status != http.StatusMethodNotAllowed {
		t.Errorf("POST usage: %d, want 405", status)
	}
	if got := scrape(t).get("caddy_zimage_client_quota_used", "client", "alice", "period", "day"); got != 3 {
		t.Errorf("caddy_zimage_client_quota_used{alice,day} = %v, want 3", got)
	}
	status, _, body = do(t, http.MethodGet, "/v1/zimage/health", "", "Authorization", "")
	var rep healthReport
	if status != 200 || json.Unmarshal(body, &rep) != nil || len(rep.Clients) != 1 || rep.Clients[0].Name != "alice" ||
		len(rep.Clients[0].Quotas) != 1 || rep.Clients[0].Quotas[0].Used != 3 || rep.Coordination != nil {
		t.Errorf("health: %d %s, want alice's use and no coordination", status, body)
	}
}

// TestQuotaReservedAtAdmission: requests in flight hold their images, so
// two at once cannot both pass a quota with room for one; what fails is
// given back.
func TestQuotaReservedAtAdmission(t *testing.T) {
	up := newFakeUpstream(t)
	g := newGate(t)
	// of the two held images, the first is made and the second fails
	// (once the first is counted: its sibling's failure cancels it)
	var calls atomic.Int32
	fail := newGate(t)
	up.setHandler(func(w http.ResponseWriter, r *http.Request) {
		if calls.Add(1) == 1 {
			<-g.ch
			writeImage(w, "https://img.example.com/made.png")
			return
		}
		<-fail.ch
		http.Error(w, "down", http.StatusInternalServerError)
	})
	startCaddy(t, quotaSite(t, up, ""))

	held := sendAsync(http.MethodPost, "/v1/images/generations", `{"prompt":"in flight","n":2}`, as(testAliceKey)...)
	waitFor(t, "alice's two generations at the fake", func() bool { return up.active.Load() == 2 })
	status, _, body := do(t, http.MethodPost, "/v1/images/generations", `{"prompt":"two while two fly","n":2}`, as(testAliceKey)...)
	if e := apiErr(t, body); status != http.StatusTooManyRequests || e.Code != "insufficient_quota" {
		t.Errorf("2 more while 2 are in flight: %d %s", status, body)
	}
	g.open()
	waitFor(t, "the first image counted", func() bool {
		return scrape(t).get("caddy_zimage_client_quota_used", "client", "alice", "period", "day") == 1
	})
	fail.open()
	if r := await(t, held); r.status != http.StatusBadGateway {
		t.Fatalf("the held request, one of its images failing: %d %s", r.status, r.body)
	}
	if u := getUsage(t, "/v1/zimage/usage", testAliceKey); u.Quotas[0].Used != 1 {
		t.Errorf("used %d, want 1: the image made counts, the failed one is given back", u.Quotas[0].Used)
	}
	up.setHandler(nil)
	if status, _, body := do(t, http.MethodPost, "/v1/images/generations", `{"prompt":"the last two","n":2}`, as(testAliceKey)...); status != 200 {
		t.Errorf("2 more with 1 of 3 used: %d %s", status, body)
	}
}

// TestQuotaReloadKeepsCounts: a reload (and a config that changes the
// limit) keeps the count; a failed config load does not lose it either.
func TestQuotaReloadKeepsCounts(t *testing.T) {
	up := newFakeUpstream(t)
	dir := t.TempDir()
	store := "store {\n\t\tstorage file_system " + dir + "\n\t}"
	startCaddy(t, quotaSite(t, up, store))
	if status, _, body := do(t, http.MethodPost, "/v1/images/generations", `{"prompt":"two","n":2}`, as(testAliceKey)...); status != 200 {
		t.Fatalf("n=2: %d %s", status, body)
	}
	startCaddy(t, strings.Replace(quotaSite(t, up, store), "quota 3 images", "quota 4 images", 1))
	u := getUsage(t, "/v1/zimage/usage", testAliceKey)
	if len(u.Quotas) != 1 || u.Quotas[0].Used != 2 || u.Quotas[0].Limit != 4 {
		t.Errorf("after the reload: %+v, want 2 used of 4", u)
	}
	if status, _, body := do(t, http.MethodPost, "/v1/images/generations", `{"prompt":"three","n":3}`, as(testAliceKey)...); status != http.StatusTooManyRequests {
		t.Errorf("3 more with 2 of 4 used: %d %s", status, body)
	}
}

// TestUnitDistClusterCaddyfile: the cluster example of dist/ adapts and
// provisions (Redis is reached lazily, so none needs to run), with its
// Redis password kept out of the adapted config.
func TestUnitDistClusterCaddyfile(t *testing.T) {
	src, err := os.ReadFile("dist/Caddyfile.cluster")
	if err != nil {
		t.Fatal(err)
	}
	unitClearEnv(t)
	t.Setenv("GATEWAY_API_KEY", "sk-cluster-gateway")
	t.Setenv("SD_API_KEY", "sd-cluster-account")
	t.Setenv("REDIS_URL", "redis://:"+testRedisPassword+"@127.0.0.1:1")
	cfg := unitAdapt(t, string(src))
	if strings.Contains(string(cfg), testRedisPassword) {
		t.Errorf("the adapted config carries the Redis password")
	}
	var g Gateway
	if err := json.Unmarshal(unitFindHandler(t, cfg, "zimage_gateway"), &g); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := caddy.NewContext(caddy.Context{Context: t.Context()})
	defer cancel()
	g.Store.StorageRaw = json.RawMessage(`{"module":"file_system","root":"` + t.TempDir() + `"}`)
	if err := g.Provision(ctx); err != nil {
		t.Fatalf("provisioning: %v", err)
	}
	defer g.Cleanup()
	if g.coord == nil || g.quotas == nil || g.scrub.Replace("x"+testRedisPassword) != "x"+redacted {
		t.Errorf("coordination %v, quotas %v, the password scrubbed as %q", g.coord, g.quotas, g.scrub.Replace("x"+testRedisPassword))
	}
}

// TestUnitQuotaTimezoneUnknown: a zone the system does not know fails the
// load, naming the directive.
func TestUnitQuotaTimezoneUnknown(t *testing.T) {
	g := Gateway{Clients: []ClientConfig{{Name: "alice", Keys: []string{testAliceKey}, Quotas: []QuotaConfig{{Images: 3, Per: "day"}}}},
		Upstream: &UpstreamConfig{URL: "demo"}, QuotaTimezone: "Mars/Olympus_Mons"}
	ctx, cancel := caddy.NewContext(caddy.Context{Context: t.Context()})
	defer cancel()
	err := g.Provision(ctx)
	defer g.Cleanup()
	if err == nil || !strings.Contains(err.Error(), "quota_timezone 'Mars/Olympus_Mons'") {
		t.Errorf("Provision: %v, want an error naming quota_timezone", err)
	}
}
