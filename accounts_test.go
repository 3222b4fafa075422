package zimage

// Many upstream accounts (docs/design.md#accounts): the account blocks, the choice of an
// account, the queue and the limits under load, failover and rests,
// points, Cloudflare challenges. Integration tests run a real Caddy
// against a fake service that tells the accounts apart by their keys.

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"os"
	"reflect"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"go.uber.org/zap"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
)

// unitPool is an account pool built by hand: one unlimited account, for
// unit tests that assemble a Gateway without Provision.
func unitPool() *accountPool {
	return &accountPool{
		accounts: []*account{{name: defaultAccount, lim: &limiter{queued: true}}},
		timeout:  time.Minute, queueTimeout: time.Minute, logger: zap.NewNop(),
	}
}

// unitLimit is the limit in force on an account.
func unitLimit(a *account) int {
	limMu.Lock()
	defer limMu.Unlock()
	return a.lim.limitLocked()
}

// Account blocks parse into the upstream's Accounts, whole.
func TestUnitAccountsCaddyfile(t *testing.T) {
	os.Unsetenv("ZIMAGE_UNIT_UNSET")
	intp := func(n int) *int { return &n }
	for _, tc := range []struct {
		name, src string
		want      *UpstreamConfig
	}{
		{"two accounts", `zimage_gateway {
			upstream {
				account main {
					api_key {env.SD_KEY_MAIN}
					max_concurrent 2
					low_points 500
					points_rest 30m
				}
				account spare_2 {
					api_key sd-spare
				}
				timeout 2m
				queue_timeout 30s
				retries 2
				points_rest 2h
			}
		}`, &UpstreamConfig{
			Accounts: []AccountConfig{
				{Name: "main", APIKey: "{env.SD_KEY_MAIN}", MaxConcurrent: 2, LowPoints: 500, PointsRest: caddy.Duration(30 * time.Minute)},
				{Name: "spare_2", APIKey: "sd-spare"},
			},
			Timeout: caddy.Duration(2 * time.Minute), QueueTimeout: caddy.Duration(30 * time.Second), Retries: intp(2),
			PointsRest: caddy.Duration(2 * time.Hour),
		}},
		{"empty block and empty key", `zimage_gateway {
			upstream https://sd.example/gen {
				account a-1 {
					api_key {$ZIMAGE_UNIT_UNSET}
				}
				account b
			}
		}`, &UpstreamConfig{URL: "https://sd.example/gen", Accounts: []AccountConfig{{Name: "a-1"}, {Name: "b"}}}},
		{"fractional low_points", `zimage_gateway {
			upstream {
				account a {
					low_points 12.5
				}
			}
		}`, &UpstreamConfig{Accounts: []AccountConfig{{Name: "a", LowPoints: 12.5}}}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var got Gateway
			if err := got.UnmarshalCaddyfile(caddyfile.NewTestDispenser(tc.src)); err != nil {
				t.Fatalf("UnmarshalCaddyfile: %v", err)
			}
			if want := (Gateway{Upstream: tc.want}); !reflect.DeepEqual(got, want) {
				gj, _ := json.Marshal(got)
				wj, _ := json.Marshal(want)
				t.Fatalf("parsed\n %s\nwant\n %s", gj, wj)
			}
		})
	}

	up := func(body string) string { return "zimage_gateway {\n\tupstream {\n" + body + "\n\t}\n}" }
	for _, tc := range []struct {
		name, src, want string
	}{
		{"no name", up("account {\n\tapi_key k\n}"), "account needs a name"},
		{"two names", up("account a b {\n}"), "wrong argument count"},
		{"upper case name", up("account Main"), "account name 'Main' is not a simple label"},
		{"dotted name", up("account a.b"), "account name 'a.b' is not a simple label"},
		{"long name", up("account " + strings.Repeat("a", 65)), "is not a simple label"},
		{"duplicate name", up("account a {\n\tapi_key k1\n}\naccount a {\n\tapi_key k2\n}"), "duplicate upstream account name 'a'"},
		{"unknown option", up("account a {\n\tkey k\n}"), "unrecognized zimage_gateway upstream account option 'key'"},
		{"option twice", up("account a {\n\tapi_key k1\n\tapi_key k2\n}"), "upstream account api_key already specified"},
		{"two keys", up("account a {\n\tapi_key k1 k2\n}"), "wrong argument count"},
		{"bad max_concurrent", up("account a {\n\tmax_concurrent -1\n}"), "invalid max_concurrent '-1'"},
		{"zero low_points", up("account a {\n\tlow_points 0\n}"), "invalid low_points '0'"},
		{"bad low_points", up("account a {\n\tlow_points lots\n}"), "invalid low_points 'lots'"},
		{"zero points_rest", up("account a {\n\tpoints_rest 0\n}"), "invalid points_rest '0'"},
		{"bad upstream points_rest", up("points_rest soon"), "invalid points_rest 'soon'"},
		{"api_key and accounts", up("api_key k\naccount a {\n\tapi_key k1\n}"), "either api_key or account blocks, not both"},
		{"accounts and api_key", up("account a {\n\tapi_key k1\n}\napi_key k"), "either api_key or account blocks, not both"},
		{"max_concurrent beside accounts", up("max_concurrent 2\naccount a {\n\tapi_key k1\n}"), "max_concurrent goes inside each account block"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			wantCaddyfileError(t, tc.src, tc.want)
		})
	}
}

// Load-time errors in the JSON config (which skips the
// Caddyfile's checks) name the account, never its key.
func TestUnitAccountsProvisionErrors(t *testing.T) {
	unitClearEnv(t)
	t.Setenv("ZIMAGE_UNIT_EMPTY", "")
	base := func(accounts string) string {
		return `{"api_keys":["` + testClientKey + `"],"upstream":{"url":"https://sd.example/gen","accounts":[` + accounts + `]}}`
	}
	acct := func(name, key string) string { return fmt.Sprintf(`{"name":%q,"api_key":%q}`, name, key) }
	for _, tc := range []struct {
		name, cfg string
		want      []string
	}{
		{"duplicate names", base(acct("a", testAccountKeyA) + "," + acct("a", testAccountKeyB)), []string{"duplicate upstream account name 'a'"}},
		{"no key", base(`{"name":"a"}`), []string{"account 'a' has no api_key"}},
		{"key resolves empty", base(acct("a", "{env.ZIMAGE_UNIT_EMPTY}")), []string{"account 'a' has no api_key"}},
		{"no name", base(acct("", testAccountKeyA)), []string{"account name '' is not a simple label"}},
		{"name with a space", base(acct("my account", testAccountKeyA)), []string{"'my account' is not a simple label"}},
		{"same key twice", base(acct("a", testAccountKeyA) + "," + acct("b", testAccountKeyA)), []string{"accounts 'a' and 'b' have the same api_key"}},
		{"negative max_concurrent", base(`{"name":"a","api_key":"` + testAccountKeyA + `","max_concurrent":-2}`), []string{"account 'a'", "max_concurrent"}},
		{"negative low_points", base(`{"name":"a","api_key":"` + testAccountKeyA + `","low_points":-1}`), []string{"account 'a'", "low_points"}},
		{"negative points_rest", base(`{"name":"a","api_key":"` + testAccountKeyA + `","points_rest":-1}`), []string{"account 'a'", "points_rest"}},
		{"negative upstream points_rest", `{"api_keys":["` + testClientKey + `"],"upstream":{"points_rest":-5,"accounts":[` + acct("a", testAccountKeyA) + `]}}`,
			[]string{"upstream: points_rest"}},
		{"api_key and accounts", `{"api_keys":["` + testClientKey + `"],"upstream":{"api_key":"` + testSDKey + `","accounts":[` + acct("a", testAccountKeyA) + `]}}`,
			[]string{"either api_key or account blocks"}},
		{"max_concurrent beside accounts", `{"api_keys":["` + testClientKey + `"],"upstream":{"max_concurrent":3,"accounts":[` + acct("a", testAccountKeyA) + `]}}`,
			[]string{"max_concurrent goes inside each account block"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := unitProvision(t, tc.cfg)
			wantProvisionError(t, err, tc.want)
		})
	}
}

// A single api_key is the account "default"; accounts resolve
// their keys, every key is a secret to scrub, and by default every account
// may be tried once.
func TestUnitAccountsProvision(t *testing.T) {
	unitClearEnv(t)
	t.Setenv("ZIMAGE_UNIT_KEY_B", testAccountKeyB)
	t.Setenv("SD_API_KEY", testSDKey) // not used once accounts are given
	g, err := unitProvision(t, `{"api_keys":["`+testClientKey+`"],"upstream":{"url":"https://sd.example/gen","points_rest":"2h","accounts":[
		{"name":"a","api_key":"`+testAccountKeyA+`","max_concurrent":2,"low_points":100,"points_rest":"10m"},
		{"name":"b","api_key":"{env.ZIMAGE_UNIT_KEY_B}"},
		{"name":"c","api_key":"`+testAccountKeyC+`","max_concurrent":1}]}}`)
	if err != nil {
		t.Fatal(err)
	}
	type got struct {
		name, key  string
		limit      int
		low        float64
		pointsRest time.Duration
	}
	var accts []got
	for _, a := range g.accounts.accounts {
		accts = append(accts, got{a.name, a.key, unitLimit(a), a.lowPoints, a.pointsRest})
	}
	want := []got{{"a", testAccountKeyA, 2, 100, 10 * time.Minute}, {"b", testAccountKeyB, 0, 0, 2 * time.Hour}, {"c", testAccountKeyC, 1, 0, 2 * time.Hour}}
	if !reflect.DeepEqual(accts, want) {
		t.Errorf("accounts %+v, want %+v", accts, want)
	}
	if g.accounts.retries != 2 || !g.accounts.limited {
		t.Errorf("retries %d limited %v, want 2 (each account once) and true", g.accounts.retries, g.accounts.limited)
	}
	for _, s := range []string{testAccountKeyA, testAccountKeyB, testAccountKeyC, testClientKey} {
		if got := g.scrub.Replace("echo " + s); got != "echo [redacted]" {
			t.Errorf("scrubber leaves %q", got)
		}
	}
	if got := g.scrub.Replace("echo " + testSDKey); got == "echo [redacted]" {
		t.Errorf("SD_API_KEY was used although accounts are configured")
	}

	// the single key: account "default", its limit the upstream's
	g, err = unitProvision(t, `{"api_keys":["`+testClientKey+`"],"upstream":{"max_concurrent":3,"retries":0}}`)
	if err != nil {
		t.Fatal(err)
	}
	if a := g.accounts.accounts; len(a) != 1 || a[0].name != "default" || a[0].key != testSDKey || unitLimit(a[0]) != 3 || g.accounts.retries != 0 || a[0].pointsRest != time.Hour {
		t.Errorf("single key: accounts %+v retries %d, want one 'default' with SD_API_KEY, limit 3 and points_rest 1h", a, g.accounts.retries)
	}
	g, err = unitProvision(t, `{"api_keys":["`+testClientKey+`"],"upstream":{"points_rest":"15m"}}`)
	if err != nil || g.accounts.accounts[0].pointsRest != 15*time.Minute {
		t.Errorf("single key with points_rest 15m: %v", err)
	}
}

// unitAccountPool is a pool of hand-made accounts a, b, c… with the given
// limits (0: unlimited).
func unitAccountPool(limits ...int) *accountPool {
	p := &accountPool{logger: zap.NewNop(), timeout: time.Minute, queueTimeout: time.Minute}
	for i, n := range limits {
		l := &limiter{queued: true, claims: []limitClaim{{id: 1, n: n}}}
		p.accounts = append(p.accounts, &account{index: i, name: string(rune('a' + i)), lim: l})
	}
	return p
}

// takes takes up to n slots through fresh choices and names the accounts
// chosen; "-" when none was free.
func takes(p *accountPool, n int, setup func(c *choice)) string {
	limMu.Lock()
	defer limMu.Unlock()
	var out []string
	for range n {
		c := p.newChoice()
		if setup != nil {
			setup(c)
		}
		if !c.take() {
			out = append(out, "-")
			continue
		}
		out = append(out, c.chosen.name)
	}
	return strings.Join(out, "")
}

// The account with the most free slots, ties in turn; resting
// accounts only when every account rests; after a failure only untried
// accounts that do not rest.
func TestUnitAccountChoice(t *testing.T) {
	rest := func(p *accountPool, names ...string) {
		limMu.Lock()
		defer limMu.Unlock()
		for _, a := range p.accounts {
			if strings.Contains(strings.Join(names, ""), a.name) {
				a.lim.restUntil = time.Now().Add(time.Hour)
			}
		}
	}
	t.Run("most free slots, ties in turn", func(t *testing.T) {
		// free a=2 b=4: b; a=2 b=3: b; tie 2-2 after b: a; a=1 b=2: b; tie: a; b; full
		if got := takes(unitAccountPool(2, 4), 7, nil); got != "bbabab-" {
			t.Errorf("takes %q, want bbabab-", got)
		}
	})
	t.Run("unlimited accounts take turns", func(t *testing.T) {
		if got := takes(unitAccountPool(0, 0, 0), 7, nil); got != "abcabca" {
			t.Errorf("takes %q, want abcabca", got)
		}
	})
	t.Run("released slots are taken again", func(t *testing.T) {
		p := unitAccountPool(1, 1)
		if got := takes(p, 3, nil); got != "ab-" {
			t.Fatalf("takes %q, want ab-", got)
		}
		p.accounts[1].lim.release(1)
		if got := takes(p, 2, nil); got != "b-" {
			t.Errorf("after b's release: takes %q, want b-", got)
		}
	})
	t.Run("resting accounts are skipped", func(t *testing.T) {
		p := unitAccountPool(0, 0, 0)
		rest(p, "a", "c")
		if got := takes(p, 3, nil); got != "bbb" {
			t.Errorf("takes %q, want bbb", got)
		}
	})
	t.Run("a resting account with free slots waits for the awake one", func(t *testing.T) {
		p := unitAccountPool(5, 1)
		rest(p, "a")
		if got := takes(p, 2, nil); got != "b-" {
			t.Errorf("takes %q, want b-", got)
		}
	})
	t.Run("every account rests: they work on", func(t *testing.T) {
		p := unitAccountPool(1, 2)
		rest(p, "a", "b")
		if got := takes(p, 4, nil); got != "bab-" {
			t.Errorf("takes %q, want bab-", got)
		}
	})
	t.Run("failover: untried and awake only", func(t *testing.T) {
		p := unitAccountPool(0, 0, 0)
		rest(p, "c")
		failover := func(c *choice) { c.tried[0], c.allowResting = true, false }
		if got := takes(p, 2, failover); got != "bb" {
			t.Errorf("takes %q, want bb", got)
		}
		limMu.Lock()
		c := p.newChoice()
		c.tried[0], c.tried[1], c.allowResting = true, true, false
		hopeful := c.hopeful()
		limMu.Unlock()
		if hopeful {
			t.Errorf("a failover with every other account tried or resting still hopes")
		}
	})
}

// The newest live claim is the limit; giving it back (a
// reload that failed) restores the older one; a limit that grows wakes
// the queue at once.
func TestUnitLimiterClaims(t *testing.T) {
	key := "unit|" + t.Name()
	l, old := loadLimiter(key, 10, true)
	same, cur := loadLimiter(key, 3, true)
	if same != l {
		t.Fatal("a second handler got another limiter for the same key")
	}
	limit := func() int { limMu.Lock(); defer limMu.Unlock(); return l.limitLocked() }
	if n := limit(); n != 3 {
		t.Errorf("limit %d after the newer claim, want 3", n)
	}
	if err := dropLimiter(key, l, cur); err != nil || limit() != 10 {
		t.Errorf("after the newer handler's cleanup (a failed reload): limit %d, %v; want 10", limit(), err)
	}
	_, cur = loadLimiter(key, 1, true)
	if err := dropLimiter(key, l, old); err != nil || limit() != 1 {
		t.Errorf("after the older handler's cleanup (a reload): limit %d, %v; want 1", limit(), err)
	}

	p := &accountPool{accounts: []*account{{name: "a", lim: l}}}
	limMu.Lock()
	taken := p.newChoice().take()
	limMu.Unlock()
	if !taken {
		t.Fatal("the one slot was not free")
	}
	done := make(chan error, 1)
	go func() { done <- acquire(context.Background(), time.Minute, p.newChoice()) }()
	waitFor(t, "the second generation to queue", func() bool { return unitQueueLen() == 1 })
	_, grown := loadLimiter(key, 2, true)
	select {
	case err := <-done:
		if err != nil {
			t.Errorf("acquire after the limit grew: %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("a limit that grew did not wake the queue")
	}
	l.release(2)
	_ = dropLimiter(key, l, grown)
	_ = dropLimiter(key, l, cur)
	if refs, _ := limiters.References(key); refs != 0 {
		t.Errorf("%d references left", refs)
	}
}

// The handlers of one config load that name the same account
// share its limiter at the lower of their limits, in either order, and
// the second one learns of the first (for the warning); a newer load's
// limits replace an older load's, and a failed load gives them back.
func TestUnitLimiterOneLoadLowerLimit(t *testing.T) {
	limit := func(l *limiter) int { limMu.Lock(); defer limMu.Unlock(); return l.limitLocked() }
	for _, tc := range []struct {
		name        string
		first, then int
		want        int
	}{
		{"lower first", 2, 5, 2},
		{"lower second", 5, 2, 2},
		{"unlimited and 3", 0, 3, 3},
		{"3 and unlimited", 3, 0, 3},
	} {
		t.Run(tc.name, func(t *testing.T) {
			key := "unit|" + t.Name()
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			gen := configGeneration(ctx)
			l, c1, other := loadLimiterIn(key, tc.first, true, gen, "site-a")
			if other != nil {
				t.Errorf("the first claim of a load saw another: %+v", other)
			}
			_, c2, other := loadLimiterIn(key, tc.then, true, gen, "site-b")
			if other == nil || other.n != tc.first || other.name != "site-a" {
				t.Errorf("the second claim saw %+v, want site-a's %d", other, tc.first)
			}
			if n := limit(l); n != tc.want {
				t.Errorf("limit %d, want the lower, %d", n, tc.want)
			}

			// a newer load (a reload) replaces both, higher or not
			newer, cancelNewer := context.WithCancel(context.Background())
			defer cancelNewer()
			_, c3, other := loadLimiterIn(key, 7, true, configGeneration(newer), "site-a")
			if other != nil || limit(l) != 7 {
				t.Errorf("after a newer load: limit %d, other %+v; want 7 and none", limit(l), other)
			}
			// which fails: the older load's lower limit is back
			_ = dropLimiter(key, l, c3)
			if n := limit(l); n != tc.want {
				t.Errorf("after the newer load failed: limit %d, want %d", n, tc.want)
			}
			_ = dropLimiter(key, l, c1)
			_ = dropLimiter(key, l, c2)
			if refs, _ := limiters.References(key); refs != 0 {
				t.Errorf("%d references left", refs)
			}
		})
	}

	// a load is its provisioning context, values added or not
	ctx, cancel := context.WithCancel(context.Background())
	child := context.WithValue(ctx, struct{}{}, 1)
	if a, b := configGeneration(ctx), configGeneration(child); a != b {
		t.Errorf("one load got two numbers: %d, %d", a, b)
	}
	other, cancelOther := context.WithCancel(context.Background())
	defer cancelOther()
	if a, b := configGeneration(ctx), configGeneration(other); a >= b {
		t.Errorf("a later load got %d, not more than the earlier %d", b, a)
	}
	if a, b := configGeneration(context.Background()), configGeneration(context.Background()); a == b {
		t.Errorf("contexts that cannot end share the load %d", a)
	}
	cancel()
	waitFor(t, "the ended load to be forgotten", func() bool {
		configLoads.Lock()
		defer configLoads.Unlock()
		_, ok := configLoads.byDone[ctx.Done()]
		return !ok
	})
}

// A pool whose config was replaced keeps its limiters
// while a generation of it runs, gives them back when the last one
// leaves, and takes them again for one that comes later.
func TestUnitAccountPoolHoldsLimitersWhileBusy(t *testing.T) {
	url := "https://sd.example/" + t.Name()
	uc := UpstreamConfig{URL: url, Accounts: []AccountConfig{{Name: "a1", APIKey: testAccountKeyA, MaxConcurrent: 2}}}
	key := limiterKey(url, testAccountKeyA, "a1")
	refs := func() int { n, _ := limiters.References(key); return n }
	p := newAccountPool(uc, 1, newGeneration(), zap.NewNop())
	p.enter()
	p.enter()
	if err := p.close(); err != nil || refs() != 1 {
		t.Fatalf("closed with two generations running: %d references, %v; want 1", refs(), err)
	}
	p.leave()
	if refs() != 1 {
		t.Errorf("%d references with one generation left, want 1", refs())
	}
	p.leave()
	if refs() != 0 {
		t.Errorf("%d references after the last generation left, want 0", refs())
	}
	p.enter() // a late one of the replaced config
	if refs() != 1 || unitLimit(p.accounts[0]) != 2 {
		t.Errorf("a late generation: %d references, limit %d; want 1 and 2", refs(), unitLimit(p.accounts[0]))
	}
	p.leave()
	if err := p.close(); err != nil || refs() != 0 {
		t.Errorf("after the late one: %d references, %v; want 0", refs(), err)
	}
}

// How long a failing account rests; the client's
// Retry-After after a 429 is the same figure, in whole seconds.
func TestUnitRestFor(t *testing.T) {
	now := time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)
	for _, tc := range []struct {
		name       string
		ue         upstreamError
		pointsRest time.Duration
		want       time.Duration
	}{
		{"429 with seconds", upstreamError{kind: kind429, retryAfter: "7"}, 0, 7 * time.Second},
		{"429 with a date", upstreamError{kind: kind429, retryAfter: now.Add(90 * time.Second).Format(http.TimeFormat)}, 0, 90 * time.Second},
		{"429 without Retry-After", upstreamError{kind: kind429}, 0, 30 * time.Second},
		{"429 Retry-After 0", upstreamError{kind: kind429, retryAfter: "0"}, 0, time.Second},
		{"429 Retry-After a day", upstreamError{kind: kind429, retryAfter: "86400"}, 0, time.Hour},
		{"429 date in the past", upstreamError{kind: kind429, retryAfter: now.Add(-time.Minute).Format(http.TimeFormat)}, 0, time.Second},
		{"429 Retry-After 999999999", upstreamError{kind: kind429, retryAfter: "999999999"}, 0, time.Hour},
		{"429 Retry-After that overflows nanoseconds", upstreamError{kind: kind429, retryAfter: "99999999999999"}, 0, time.Hour},
		{"429 date a year ahead", upstreamError{kind: kind429, retryAfter: now.AddDate(1, 0, 0).Format(http.TimeFormat)}, 0, time.Hour},
		{"5xx", upstreamError{kind: kind5xx, retryAfter: "99"}, 0, 10 * time.Second},
		{"connection error", upstreamError{kind: kindRefused}, 0, 10 * time.Second},
		{"blocked", upstreamError{kind: kindBlocked}, 0, 10 * time.Second},
		{"no points, default", upstreamError{kind: kindNoPoints}, 0, time.Hour},
		{"no points, points_rest 20m", upstreamError{kind: kindNoPoints, retryAfter: "5"}, 20 * time.Minute, 20 * time.Minute},
		{"no points, points_rest 6h: not capped", upstreamError{kind: kindNoPoints}, 6 * time.Hour, 6 * time.Hour},
	} {
		if got := restFor(&tc.ue, tc.pointsRest, now); got != tc.want {
			t.Errorf("%s: rest %s, want %s", tc.name, got, tc.want)
		}
	}

	// the client's Retry-After after a 429 (computed from now, so the
	// date forms are left to the rest table above)
	for ra, want := range map[string]string{"7": "7", "": "30", "0": "1", "86400": "3600", "999999999": "3600", "99999999999999": "3600"} {
		ae := (&upstreamError{kind: kind429, retryAfter: ra}).apiError(newScrubber(nil))
		if ae.status != http.StatusTooManyRequests || ae.retryAfter != want {
			t.Errorf("429 with Retry-After %q: status %d, Retry-After %q, want 429 and %q", ra, ae.status, ae.retryAfter, want)
		}
	}
}

// The one guess at the service's words for an account out of
// points, case-insensitive, whole words for the English ones.
func TestUnitIsNoPoints(t *testing.T) {
	for msg, want := range map[string]bool{
		"积分不足":                           true,
		"您的积分已用完，请充值":                    true,
		"账户余额不足":                         true,
		"Insufficient points":            true,
		"INSUFFICIENT_POINTS":            true,
		"insufficient_quota":             true,
		"not enough points (0 left)":     true,
		"Points: 0":                      true,
		"balance too low":                true,
		"Your balance is 0.":             true,
		"error=insufficient":             true,
		"":                               false,
		"nsfw content detected":          false,
		"upstream endpoints are busy":    false,
		"load balancer timeout":          false,
		"rebalanced the queue":           false,
		"checkpoints are loading":        false,
		"pointsless":                     false,
		"model not found":                false,
		"Internal Server Error":          false,
		"rate limit exceeded, slow down": false,
	} {
		if got := isNoPoints(msg); got != want {
			t.Errorf("isNoPoints(%q) = %v, want %v", msg, got, want)
		}
	}
}

// Text the client wrote is never evidence about an account: the words of
// the out-of-points rule that the request's own texts carry are not read
// in a failure, however the service echoed them (whole, cut, in another
// case, with its spaces changed), while the words the service added are.
func TestUnitIsNoPointsEchoedPrompt(t *testing.T) {
	const long = "forbidden points and balance in a long prompt that the service cuts"
	for _, tc := range []struct {
		name, msg string
		sent      []string
		want      bool
	}{
		{"the prompt echoed whole", "prompt contains forbidden word: forbidden points no-enhance", []string{"forbidden points no-enhance"}, false},
		{"the echo without the prompt to compare", "prompt contains forbidden word: forbidden points no-enhance", nil, true},
		{"cut short", "prompt contains forbidden word: " + long[:25] + "…", []string{long}, false},
		{"cut at both ends", "forbidden word in '…points and bal…'", []string{long}, false},
		{"only the forbidden word", "forbidden word: points", []string{long}, false},
		{"in capitals", "PROMPT CONTAINS: FORBIDDEN POINTS", []string{"forbidden points"}, false},
		{"another case in the prompt", "prompt contains: balance", []string{"BALANCE of light"}, false},
		{"spaces collapsed", "forbidden: points balance", []string{"points\n\n   balance"}, false},
		{"spaces removed", "forbidden: points", []string{"p o i n t s"}, false},
		{"an invisible character removed", "forbidden: points", []string{"poi\u200bnts"}, false},
		{"full-width letters folded", "forbidden: points", []string{"ｐｏｉｎｔｓ"}, false},
		{"积分 echoed", "违禁词：积分商城", []string{"积分商城的海报"}, false},
		{"余额 with spaces in the prompt", "违禁词：余额", []string{"余 额"}, false},
		{"a word of the service's beside the echo", "Insufficient points (prompt: 'sharp points')", []string{"sharp points"}, true},
		{"the service's own words, another prompt", "积分不足，请充值", []string{"a red fox"}, true},
		{"the prompt in the source URL", "cannot download https://img.example/points.png", []string{"edit it", "https://img.example/points.png"}, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := isNoPoints(tc.msg, tc.sent...); got != tc.want {
				t.Errorf("isNoPoints(%q, %q) = %v, want %v", tc.msg, tc.sent, got, tc.want)
			}
		})
	}
}

// The answers of a service that echoes the prompt: read with the texts
// the request sent, an echo is neither out of points nor a challenge
// page; an HTTP 402 stays out of points whatever its text.
func TestUnitParseAnswerEcho(t *testing.T) {
	const prompt = "forbidden points <html> no-enhance"
	for _, tc := range []struct {
		name          string
		status        int
		ctype, body   string
		echo, without string // the kind with the prompt sent, and without
	}{
		{"400 echo", 400, "application/json", `{"success":false,"message":"prompt contains forbidden word: ` + prompt + `"}`, kindBadResponse, kindNoPoints},
		{"200 success false echo", 200, "application/json", `{"success":false,"error":{"message":"bad prompt: FORBIDDEN POINTS"}}`, kindBadResponse, kindNoPoints},
		{"403 plain text starting with the echo", 403, "text/plain", "<html> no-enhance is forbidden", kindBadResponse, kindBlocked},
		{"403 HTML page", 403, "text/html", "<html>forbidden</html>", kindBlocked, kindBlocked},
		{"402 echo", 402, "application/json", `{"success":false,"message":"` + prompt + `"}`, kindNoPoints, kindNoPoints},
	} {
		t.Run(tc.name, func(t *testing.T) {
			resp := &http.Response{StatusCode: tc.status, Status: http.StatusText(tc.status), Header: http.Header{"Content-Type": {tc.ctype}}}
			for sent, want := range map[string]string{prompt: tc.echo, "": tc.without} {
				_, ue := parseAnswer(resp, []byte(tc.body), sent)
				if ue == nil || ue.kind != want {
					t.Errorf("sent %q: failure %+v, want kind %s", sent, ue, want)
				}
			}
		})
	}
}

// A success ends an account's rest, whatever made it (the account may
// have been topped up, or never been at fault), except what a 429 asked
// for: its Retry-After holds.
func TestUnitSuccessEndsRest(t *testing.T) {
	resting := func(a *account) (bool, time.Duration) {
		limMu.Lock()
		defer limMu.Unlock()
		return a.lim.restingLocked(time.Now()), time.Until(a.lim.restUntil).Round(time.Second)
	}
	for _, tc := range []struct {
		name  string
		rests []upstreamError
		want  time.Duration // the rest left after the success; 0: none
	}{
		{"5xx", []upstreamError{{kind: kind5xx}}, 0},
		{"blocked", []upstreamError{{kind: kindBlocked}}, 0},
		{"no points", []upstreamError{{kind: kindNoPoints}}, 0},
		{"429", []upstreamError{{kind: kind429, retryAfter: "60"}}, 60 * time.Second},
		{"429, then out of points", []upstreamError{{kind: kind429, retryAfter: "60"}, {kind: kindNoPoints}}, 60 * time.Second},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p := unitAccountPool(0, 0)
			a := p.accounts[0]
			for _, ue := range tc.rests {
				p.rest(a, &ue)
			}
			if r, _ := resting(a); !r {
				t.Fatal("the account does not rest")
			}
			p.answered(a)
			r, left := resting(a)
			if r != (tc.want > 0) || r && left != tc.want {
				t.Errorf("after a success: resting %v for %s, want %s", r, left, tc.want)
			}
			if p.allOutOfPoints() {
				t.Error("the pool is still out of points")
			}
		})
	}
}

// One request rests at most one account for a kind its content could
// cause: a pool of three accounts that all answer no points is all
// resting after three requests, each of which rests one, and only the
// third tells the client that every account is out.
func TestUnitOneRequestRestsOneAccount(t *testing.T) {
	for _, kind := range []string{kindNoPoints, kindBlocked} {
		t.Run(kind, func(t *testing.T) {
			p := unitAccountPool(0, 0, 0)
			p.retries = 2
			for i, want := range []struct {
				tries  int
				allOut bool
			}{{2, false}, {2, false}, {1, kind == kindNoPoints}} {
				tries := 0
				_, _, err := p.run(t.Context(), func(ctx context.Context, a *account) (upstreamResult, *upstreamError) {
					tries++
					return upstreamResult{}, &upstreamError{kind: kind, message: "no"}
				})
				var ue *upstreamError
				if !errors.As(err, &ue) || ue.kind != kind || ue.allOut != want.allOut || tries != want.tries {
					t.Errorf("request %d: %d tries, error %+v; want %d tries, kind %s, all out %v", i+1, tries, err, want.tries, kind, want.allOut)
				}
				resting := 0
				limMu.Lock()
				for _, a := range p.accounts {
					if a.lim.restingLocked(time.Now()) {
						resting++
					}
				}
				limMu.Unlock()
				if w := min(i+1, 2+btoi(kind == kindNoPoints)); resting != w {
					t.Errorf("after request %d: %d accounts rest, want %d", i+1, resting, w)
				}
			}
		})
	}
}

func btoi(b bool) int {
	if b {
		return 1
	}
	return 0
}

// The service's answer, read: points as numbers or
// numeric strings (absent is fine, odd types never break a success),
// image_id and model_name, and challenge pages told from JSON errors.
func TestUnitParseAnswer(t *testing.T) {
	type want struct {
		kind               string // "" for success
		used, remaining    string // "-" for absent
		imageID, modelName string
	}
	pts := func(has bool, f float64) string {
		if !has {
			return "-"
		}
		return fmt.Sprint(f)
	}
	ok := func(data string) string {
		return `{"success":true,"data":{"image_url":"https://img.example.com/a.png"` + data + `}}`
	}
	for _, tc := range []struct {
		name   string
		status int
		ctype  string
		body   string
		want   want
	}{
		{"numbers", 200, "application/json", ok(`,"points_used":5,"remaining_points":1234.5,"image_id":987,"model_name":"Z-Image Turbo"`), want{"", "5", "1234.5", "987", "Z-Image Turbo"}},
		{"numeric strings", 200, "application/json", ok(`,"points_used":" 5 ","remaining_points":"-3","image_id":"img-9"`), want{"", "5", "-3", "img-9", ""}},
		{"absent", 200, "application/json", ok(``), want{"", "-", "-", "", ""}},
		{"nulls", 200, "application/json", ok(`,"points_used":null,"remaining_points":null,"image_id":null,"model_name":null`), want{"", "-", "-", "", ""}},
		{"odd types", 200, "application/json", ok(`,"points_used":{"n":1},"remaining_points":[1],"image_id":true,"model_name":{"x":1}`), want{"", "-", "-", "", ""}},
		{"not numbers", 200, "application/json", ok(`,"points_used":"five","remaining_points":"NaN","model_name":"a\u0007b"`), want{"", "-", "-", "", "ab"}},
		{"infinite", 200, "application/json", ok(`,"points_used":"Inf","remaining_points":"1e999"`), want{"", "-", "-", "", ""}},
		{"long image_id", 200, "application/json", ok(`,"image_id":"` + strings.Repeat("x", 300) + `"`), want{"", "-", "-", truncate(strings.Repeat("x", 300), maxInfoRunes), ""}},

		{"403 HTML challenge", 403, "text/html; charset=UTF-8", `<!DOCTYPE html><html><head><title>Just a moment...</title>`, want{kind: kindBlocked}},
		{"503 HTML without a type", 503, "", "\n  <html><body>Checking your browser</body></html>", want{kind: kindBlocked}},
		{"403 cf-mitigated", 403, "application/octet-stream", `x`, want{kind: kindBlocked}},
		{"403 JSON error", 403, "application/json", `{"success":false,"error":"account suspended"}`, want{kind: kindBadResponse}},
		{"402", 402, "application/json", `{"success":false,"error":"payment required"}`, want{kind: kindNoPoints}},
		{"402 without a body", 402, "", ``, want{kind: kindNoPoints}},
		{"403 insufficient points", 403, "application/json", `{"success":false,"error":"insufficient points"}`, want{kind: kindNoPoints}},
		{"200 success false 积分不足", 200, "application/json", `{"success":false,"message":"积分不足，请充值"}`, want{kind: kindNoPoints}},
		{"400 error object about balance", 400, "application/json", `{"error":{"message":"Balance exhausted"}}`, want{kind: kindNoPoints}},
		{"429 insufficient_quota", 429, "application/json", `{"error":"insufficient_quota"}`, want{kind: kindNoPoints}},
		{"500 余额", 500, "application/json", `{"error":"余额不足"}`, want{kind: kindNoPoints}},
		{"502 load balancer", 502, "application/json", `{"error":"load balancer error"}`, want{kind: kind5xx}},
		{"403 HTML challenge about points", 403, "text/html", `<html>points balance</html>`, want{kind: kindBlocked}},
		{"200 not JSON", 200, "text/plain", `insufficient points`, want{kind: kindBadResponse}},
		{"503 JSON error", 503, "application/json", `{"error":"maintenance"}`, want{kind: kind5xx}},
		{"500 HTML", 500, "text/html", `<html>oops</html>`, want{kind: kind5xx}},
		{"200 HTML", 200, "text/html", `<html>hi</html>`, want{kind: kindBadResponse}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			resp := &http.Response{StatusCode: tc.status, Status: http.StatusText(tc.status), Header: http.Header{}}
			if tc.ctype != "" {
				resp.Header.Set("Content-Type", tc.ctype)
			}
			if tc.name == "403 cf-mitigated" {
				resp.Header.Set("Cf-Mitigated", "challenge")
			}
			res, ue := parseAnswer(resp, []byte(tc.body))
			if tc.want.kind != "" {
				if ue == nil || ue.kind != tc.want.kind {
					t.Fatalf("failure %+v, want kind %s", ue, tc.want.kind)
				}
				if strings.Contains(ue.message+ue.detail, "<") {
					t.Errorf("the page reached the error: %+v", ue)
				}
				return
			}
			if ue != nil {
				t.Fatalf("failure %+v, want success", ue)
			}
			i := res.info
			got := want{"", pts(i.hasPointsUsed, i.pointsUsed), pts(i.hasRemainingPoints, i.remainingPoints), i.imageID, i.modelName}
			if got != tc.want {
				t.Errorf("info %+v, want %+v", got, tc.want)
			}
		})
	}
}

// ---- through Caddy ----

// accountBlock is an account block of the upstream config.
func accountBlock(name, key string, lines ...string) string {
	return fmt.Sprintf("account %s {\n\t\t\tapi_key %s\n\t\t\t%s\n\t\t}\n\t\t", name, key, strings.Join(lines, "\n\t\t\t"))
}

// accountsSite is a site whose gateway uses the given account blocks (and
// upstream lines) on upURL, with metrics on /metrics.
func accountsSite(upURL, accounts, upstream, extra string) string {
	return fmt.Sprintf(`zimage_gateway {
	api_key %s
	upstream %s {
		%s
		%s
	}
	enhance off
	%s
}
metrics /metrics`, testClientKey, upURL, accounts, upstream, extra)
}

// byKey is a fake upstream handler that answers per account key; keys
// without a handler get an image named after the account.
func byKey(handlers map[string]http.HandlerFunc) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		key := strings.TrimPrefix(r.Header.Get("Authorization"), "Bearer ")
		if h := handlers[key]; h != nil {
			h(w, r)
			return
		}
		writeImage(w, "https://img.example.com/"+keyNames[key]+".png")
	}
}

// keyNames names the test accounts' keys.
var keyNames = map[string]string{testAccountKeyA: "a", testAccountKeyB: "b", testAccountKeyC: "c"}

// generationLines are the generation log lines since the mark whose
// status is status.
func generationLines(t *testing.T, mark logMark, status int) []map[string]any {
	t.Helper()
	return mark.find(t, "generation", func(l map[string]any) bool { return l["status"] == float64(status) })
}

// TestAccountsLimitsHoldUnder200Requests (docs/design.md#accounts): three accounts with
// max_concurrent 3, 5 and 2 and 200 requests at once: exactly those many
// run on each account (the fake counts per key), the other 190 wait in the
// one queue, and once the fake answers all 200 are served without any
// account ever going over its limit.
func TestAccountsLimitsHoldUnder200Requests(t *testing.T) {
	up := newFakeUpstream(t)
	g := newGate(t)
	up.setHandler(g.handler)
	limits := map[string]int{testAccountKeyA: 3, testAccountKeyB: 5, testAccountKeyC: 2}
	startCaddy(t, accountsSite(up.endpoint(),
		accountBlock("a", testAccountKeyA, "max_concurrent 3")+accountBlock("b", testAccountKeyB, "max_concurrent 5")+accountBlock("c", testAccountKeyC, "max_concurrent 2"),
		"timeout 60s\n\t\tqueue_timeout 60s", ""))

	const n = 200
	results := make([]<-chan result, n)
	for i := range n {
		results[i] = sendAsync(http.MethodPost, "/v1/images/generations", fmt.Sprintf(`{"prompt":"load %d","seed":%d}`, i, i))
	}
	waitFor(t, "10 generations in flight and 190 queued", func() bool { return up.active.Load() == 10 && unitQueueLen() == n-10 })
	for key, limit := range limits {
		if active, _ := up.keyStats(key); active != limit {
			t.Errorf("account %s: %d in flight with the queue full, want its max_concurrent %d", keyNames[key], active, limit)
		}
	}
	g.open()
	for i, ch := range results {
		if r := await(t, ch); r.status != http.StatusOK {
			t.Errorf("request %d: status %d: %s", i, r.status, r.body)
		}
	}
	total := 0
	for key, limit := range limits {
		_, peak := up.keyStats(key)
		calls := up.keyCalls(key)
		total += calls
		if peak != limit || calls < limit {
			t.Errorf("account %s: peak %d in flight over %d calls, want exactly its max_concurrent %d", keyNames[key], peak, calls, limit)
		}
	}
	if total != n || len(up.Calls()) != n {
		t.Errorf("%d calls with the accounts' keys (%d in all), want %d", total, len(up.Calls()), n)
	}
}

// TestAccountsChoiceByFreeSlots (docs/design.md#accounts): generations arriving one by
// one go to the account with the most free slots, ties in turn: with
// max_concurrent 2 (a) and 4 (b) the order is b b a b a b, and the next
// one waits.
func TestAccountsChoiceByFreeSlots(t *testing.T) {
	up := newFakeUpstream(t)
	g := newGate(t)
	up.setHandler(g.handler)
	startCaddy(t, accountsSite(up.endpoint(),
		accountBlock("a", testAccountKeyA, "max_concurrent 2")+accountBlock("b", testAccountKeyB, "max_concurrent 4"),
		"timeout 30s\n\t\tqueue_timeout 30s", ""))
	var results []<-chan result
	var order []string
	for i := range 6 {
		results = append(results, sendAsync(http.MethodPost, "/v1/chat/completions", chatJSON("one by one", 700+i, "")))
		waitFor(t, fmt.Sprintf("generation %d at the fake", i+1), func() bool { return len(up.Calls()) == i+1 })
		order = append(order, keyNames[strings.TrimPrefix(up.Calls()[i].Auth, "Bearer ")])
	}
	if got := strings.Join(order, " "); got != "b b a b a b" {
		t.Errorf("accounts in order %q, want \"b b a b a b\"", got)
	}
	results = append(results, sendAsync(http.MethodPost, "/v1/chat/completions", chatJSON("waits", 710, "")))
	waitFor(t, "the seventh to queue", func() bool { return unitQueueLen() == 1 })
	g.open()
	for i, ch := range results {
		if r := await(t, ch); r.status != http.StatusOK {
			t.Errorf("request %d: status %d: %s", i, r.status, r.body)
		}
	}
}

// TestAccountsFailoverRestsAccount (docs/design.md#failover-and-rests): account a always answers
// 429 with Retry-After: 1. The first request tries a (first in turn), then
// b at once, and succeeds; a rests for a second, during which every
// request goes straight to b; after the rest a is tried again (and fails
// over again). The client never sees the 429.
func TestAccountsFailoverRestsAccount(t *testing.T) {
	up := newFakeUpstream(t)
	var mu sync.Mutex
	var aCalls []time.Time
	up.setHandler(byKey(map[string]http.HandlerFunc{testAccountKeyA: func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		aCalls = append(aCalls, time.Now())
		mu.Unlock()
		failWith(429, `{"error":"account a is rate limited"}`, "Retry-After", "1")(w, r)
	}}))
	startCaddy(t, accountsSite(up.endpoint(), accountBlock("a", testAccountKeyA)+accountBlock("b", testAccountKeyB), "timeout 10s", ""))
	before, mark := scrape(t), markLog(t)
	aCount := func() int { mu.Lock(); defer mu.Unlock(); return len(aCalls) }

	requests := 0
	deadline := time.Now().Add(10 * time.Second)
	for aCount() < 2 {
		if time.Now().After(deadline) {
			t.Fatalf("account a was not tried again after its rest (%d requests, %d calls to a)", requests, aCount())
		}
		status, _, body := do(t, http.MethodPost, "/v1/chat/completions", chatJSON("failover", 800+requests, ""))
		requests++
		if status != http.StatusOK || !strings.Contains(string(body), "https://img.example.com/b.png") {
			t.Fatalf("request %d: status %d, want b's image: %s", requests, status, body)
		}
		if requests == 1 && aCount() != 1 {
			t.Fatalf("the first request did not try a first (%d calls to a)", aCount())
		}
		time.Sleep(20 * time.Millisecond) // the polling interval, not a synchronisation
	}
	mu.Lock()
	gap := aCalls[1].Sub(aCalls[0])
	mu.Unlock()
	if gap < time.Second {
		t.Errorf("account a was called again %s after its 429, within its 1s rest", gap)
	}
	if requests < 3 {
		t.Errorf("only %d requests during a's rest: the test did not see a resting", requests)
	}
	if n := up.keyCalls(testAccountKeyB); n != requests {
		t.Errorf("%d calls to b for %d requests, want one each", n, requests)
	}

	after := scrape(t)
	if d := after.delta(before, "caddy_zimage_upstream_account_rests_total", "account", "a", "reason", "status_429"); d != 2 {
		t.Errorf("rests of a counted %v, want 2", d)
	}
	if d := after.delta(before, "caddy_zimage_upstream_errors_total", "kind", "status_429"); d != 2 {
		t.Errorf("429s counted %v, want 2 (one per failed attempt)", d)
	}
	if d := after.delta(before, "caddy_zimage_upstream_account_rests_total", "account", "b", "reason", "status_429"); d != 0 {
		t.Errorf("b rested %v times", d)
	}
	rests := mark.find(t, "image service account rests", func(l map[string]any) bool {
		return l["level"] == "warn" && l["account"] == "a" && l["reason"] == "status_429" && l["rest"] == float64(1)
	})
	retried := mark.find(t, "image service call failed; retrying", func(l map[string]any) bool {
		return l["account"] == "a" && l["next_account"] == "b" && l["kind"] == "status_429"
	})
	served := generationLines(t, mark, 200)
	if len(rests) != 2 || len(retried) != 2 || len(served) != requests {
		t.Errorf("%d rest lines, %d failover lines, %d generation lines; want 2, 2, %d", len(rests), len(retried), len(served), requests)
	}
	for _, l := range served {
		if l["account"] != "b" {
			t.Errorf("a generation line names account %v, want b", l["account"])
		}
	}
}

// TestAccountsFailoverKinds (docs/design.md#failover-and-rests): a connection error, a
// 5xx, a Cloudflare challenge and a 429 without Retry-After move the
// attempt to the other account and rest the failing one for 10 s (30 s
// for the 429); other failures neither fail over nor rest an account.
func TestAccountsFailoverKinds(t *testing.T) {
	html := func(status int) http.HandlerFunc {
		return func(w http.ResponseWriter, r *http.Request) {
			w.Header().Set("Content-Type", "text/html")
			w.WriteHeader(status)
			fmt.Fprint(w, "<!DOCTYPE html><title>Just a moment...</title>")
		}
	}
	for _, tc := range []struct {
		name     string
		a        http.HandlerFunc
		upstream string
		status   int    // of the first request
		kind     string // rest reason; "" for none
		rest     float64
	}{
		{"dropped connection", dropConnection, "", 200, kindRefused, 10},
		{"500", failWith(500, `{"error":"boom"}`), "", 200, kind5xx, 10},
		{"502", failWith(502, `{}`), "", 200, kind5xx, 10},
		{"503 JSON", failWith(503, `{"error":"busy"}`), "", 200, kind5xx, 10},
		{"403 challenge", html(403), "", 200, kindBlocked, 10},
		{"503 challenge", html(503), "", 200, kindBlocked, 10},
		{"429 without Retry-After", failWith(429, `{"error":"slow"}`), "", 200, kind429, 30},
		{"429, retries 0: passed on, a rests", failWith(429, `{"error":"slow"}`, "Retry-After", "5"), "retries 0", 429, kind429, 5},
		{"429 Retry-After 999999999: rests the cap", failWith(429, `{"error":"slow"}`, "Retry-After", "999999999"), "", 200, kind429, 3600},
		{"402: no points, rests 1h", failWith(402, `{"error":"payment required"}`), "", 200, kindNoPoints, 3600},
		{"积分不足: no points, rests points_rest", failWith(200, `{"success":false,"message":"积分不足"}`), "points_rest 20m", 200, kindNoPoints, 1200},
		{"400: no failover", failWith(400, `{"error":"bad prompt"}`), "", 502, "", 0},
		{"success false: no failover", failWith(200, `{"success":false,"error":"nsfw"}`), "", 502, "", 0},
		{"403 JSON: no failover", failWith(403, `{"error":"forbidden"}`), "", 502, "", 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			up := newFakeUpstream(t)
			up.setHandler(byKey(map[string]http.HandlerFunc{testAccountKeyA: tc.a}))
			startCaddy(t, accountsSite(up.endpoint(), accountBlock("a", testAccountKeyA)+accountBlock("b", testAccountKeyB), "timeout 10s\n\t\t"+tc.upstream, ""))
			before, mark := scrape(t), markLog(t)

			status, _, body := do(t, http.MethodPost, "/v1/chat/completions", chatJSON("fail over?", 900, ""))
			if status != tc.status {
				t.Fatalf("status %d, want %d: %s", status, tc.status, body)
			}
			if a, b := up.keyCalls(testAccountKeyA), up.keyCalls(testAccountKeyB); a != 1 || (tc.status == 200) != (b == 1) {
				t.Fatalf("calls a %d, b %d", a, b)
			}
			if tc.kind == "" {
				if n := len(mark.find(t, "image service account rests", nil)); n != 0 {
					t.Errorf("%d rests, want none", n)
				}
				return
			}
			if rested := grewSince(t, before, "caddy_zimage_upstream_account_rests_total", "account", "a", "reason", tc.kind); rested != 1 {
				t.Errorf("rests of a for %s: %v, want 1", tc.kind, rested)
			}
			if l := mark.find(t, "image service account rests", nil); len(l) != 1 || l[0]["rest"] != tc.rest {
				t.Errorf("rest lines %v, want one of %vs", l, tc.rest)
			}
			// while a rests, the next request goes to b alone
			if status, _, body := do(t, http.MethodPost, "/v1/chat/completions", chatJSON("b only", 901, "")); status != http.StatusOK {
				t.Fatalf("second request: status %d: %s", status, body)
			}
			if a := up.keyCalls(testAccountKeyA); a != 1 {
				t.Errorf("a was called %d times, want 1: it rests", a)
			}
		})
	}
}

// grewSince is how much a series grew since before.
func grewSince(t *testing.T, before scrapeResult, name string, labels ...string) float64 {
	t.Helper()
	return scrape(t).delta(before, name, labels...)
}

// TestAccountsAllFail (docs/design.md#failover-and-rests): when no account can answer, the client
// gets the last account's error in the envelope (its 429 with its own
// Retry-After), with any key it echoed scrubbed.
func TestAccountsAllFail(t *testing.T) {
	echo := func(status int, msg string, hdr ...string) http.HandlerFunc {
		return func(w http.ResponseWriter, r *http.Request) {
			failWith(status, `{"error":"`+msg+` (you sent `+r.Header.Get("Authorization")+`)"}`, hdr...)(w, r)
		}
	}
	for _, tc := range []struct {
		name         string
		a, b, c      http.HandlerFunc
		status       int
		want, notice string // in the message; notice must not be
		retryAfter   string
	}{
		{"5xx", echo(503, "a is down"), echo(500, "b is down"), nil, 502, "b is down", "a is down", ""},
		{"429s", echo(429, "a is limited", "Retry-After", "7"), echo(429, "b is limited", "Retry-After", "3"), nil, 429, "b is limited", "a is limited", "3"},
		{"three accounts", echo(502, "a is down"), dropConnection, echo(500, "c is down"), 502, "c is down", "a is down", ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			up := newFakeUpstream(t)
			up.setHandler(byKey(map[string]http.HandlerFunc{testAccountKeyA: tc.a, testAccountKeyB: tc.b, testAccountKeyC: tc.c}))
			accounts := accountBlock("a", testAccountKeyA) + accountBlock("b", testAccountKeyB)
			if tc.c != nil {
				accounts += accountBlock("c", testAccountKeyC)
			}
			startCaddy(t, accountsSite(up.endpoint(), accounts, "timeout 10s", ""))
			status, hdr, body := do(t, http.MethodPost, "/v1/chat/completions", chatJSON("nobody answers", 950, ""))
			if status != tc.status {
				t.Fatalf("status %d, want %d: %s", status, tc.status, body)
			}
			e := apiErr(t, body)
			if !strings.Contains(e.Message, tc.want) || strings.Contains(e.Message, tc.notice) || !strings.Contains(e.Message, "[redacted]") {
				t.Errorf("message %q, want the last account's (%q) with its key redacted", e.Message, tc.want)
			}
			if hdr.Get("Retry-After") != tc.retryAfter {
				t.Errorf("Retry-After %q, want %q", hdr.Get("Retry-After"), tc.retryAfter)
			}
			want := map[string]int{testAccountKeyA: 1, testAccountKeyB: 1, testAccountKeyC: 0}
			if tc.c != nil {
				want[testAccountKeyC] = 1
			}
			for key, n := range want {
				if got := up.keyCalls(key); got != n {
					t.Errorf("account %s called %d times, want %d", keyNames[key], got, n)
				}
			}
		})
	}
}

// TestAccountsRestSurvivesReload (docs/design.md#accounts): a rest
// period outlives a reload as the limits do: after a's 429 (Retry-After
// 30) a reload keeps the accounts, and the new config's requests still go
// to b alone.
func TestAccountsRestSurvivesReload(t *testing.T) {
	up := newFakeUpstream(t)
	up.setHandler(byKey(map[string]http.HandlerFunc{testAccountKeyA: failWith(429, `{"error":"later"}`, "Retry-After", "30")}))
	accounts := accountBlock("a", testAccountKeyA, "max_concurrent 4") + accountBlock("b", testAccountKeyB, "max_concurrent 4")
	startCaddy(t, accountsSite(up.endpoint(), accounts, "timeout 10s", "stream_keepalive 5s"))
	if status, _, body := do(t, http.MethodPost, "/v1/chat/completions", chatJSON("a rests", 960, "")); status != http.StatusOK {
		t.Fatalf("status %d: %s", status, body)
	}
	startCaddy(t, accountsSite(up.endpoint(), accounts, "timeout 10s", "stream_keepalive 6s"))
	for i := range 4 {
		if status, _, body := do(t, http.MethodPost, "/v1/chat/completions", chatJSON("after the reload", 961+i, "")); status != http.StatusOK {
			t.Fatalf("status %d: %s", status, body)
		}
	}
	if a, b := up.keyCalls(testAccountKeyA), up.keyCalls(testAccountKeyB); a != 1 || b != 5 {
		t.Errorf("calls a %d, b %d; want 1 and 5: a rests across the reload", a, b)
	}
}

// TestAccountsPoints (docs/design.md#points): the points each account's answers
// report (numbers for a, numeric strings for b) set the gauge and add to
// the counter per account; the generation line carries the account, the
// points, image_id and model_name; low_points warns once per crossing.
func TestAccountsPoints(t *testing.T) {
	up := newFakeUpstream(t)
	var mu sync.Mutex
	aRemaining := []int{150, 95, 90, 120, 80} // crosses below 100 twice
	aN, bN := 0, 0
	answer := func(w http.ResponseWriter, data string) {
		w.Header().Set("Content-Type", "application/json")
		fmt.Fprintf(w, `{"success":true,"data":{"image_url":"https://img.example.com/p.png",%s}}`, data)
	}
	up.setHandler(byKey(map[string]http.HandlerFunc{
		testAccountKeyA: func(w http.ResponseWriter, r *http.Request) {
			mu.Lock()
			rem := aRemaining[aN]
			aN++
			mu.Unlock()
			answer(w, fmt.Sprintf(`"points_used":5,"remaining_points":%d,"image_id":%d,"model_name":"Z-Image Turbo"`, rem, 1000+aN))
		},
		testAccountKeyB: func(w http.ResponseWriter, r *http.Request) {
			mu.Lock()
			bN++
			n := bN
			mu.Unlock()
			answer(w, fmt.Sprintf(`"points_used":"2","remaining_points":"%d.5","image_id":"img-b-%d"`, 1000-n, n))
		},
	}))
	startCaddy(t, accountsSite(up.endpoint(), accountBlock("a", testAccountKeyA, "low_points 100")+accountBlock("b", testAccountKeyB), "timeout 10s", ""))
	before, mark := scrape(t), markLog(t)
	for i := range 10 { // in turn: a b a b …
		if status, _, body := do(t, http.MethodPost, "/v1/chat/completions", chatJSON("points", 1100+i, "")); status != http.StatusOK {
			t.Fatalf("status %d: %s", status, body)
		}
	}
	after := scrape(t)
	for _, tc := range []struct {
		name    string
		account string
		want    float64
		delta   bool
	}{
		{"caddy_zimage_upstream_points_used_total", "a", 25, true},
		{"caddy_zimage_upstream_points_used_total", "b", 10, true},
		{"caddy_zimage_upstream_points_remaining", "a", 80, false},
		{"caddy_zimage_upstream_points_remaining", "b", 995.5, false},
	} {
		got := after.get(tc.name, "account", tc.account)
		if tc.delta {
			got = after.delta(before, tc.name, "account", tc.account)
		}
		if got != tc.want {
			t.Errorf("%s{account=%s} = %v, want %v", tc.name, tc.account, got, tc.want)
		}
	}
	if after.types["caddy_zimage_upstream_points_remaining"] != "gauge" || after.types["caddy_zimage_upstream_points_used_total"] != "counter" {
		t.Errorf("types %q %q", after.types["caddy_zimage_upstream_points_remaining"], after.types["caddy_zimage_upstream_points_used_total"])
	}

	warns := mark.find(t, "image service account is low on points", func(l map[string]any) bool {
		return l["level"] == "warn" && l["account"] == "a" && l["low_points"] == float64(100)
	})
	if len(warns) != 2 || warns[0]["remaining_points"] != float64(95) || warns[1]["remaining_points"] != float64(80) {
		t.Errorf("low points warnings %v, want two: at 95 and at 80", warns)
	}
	lines := generationLines(t, mark, 200)
	if len(lines) != 10 {
		t.Fatalf("%d generation lines, want 10", len(lines))
	}
	first, second := lines[0], lines[1]
	for k, want := range map[string]any{"account": "a", "points_used": float64(5), "remaining_points": float64(150), "image_id": "1001", "model_name": "Z-Image Turbo", "client": "default"} {
		if first[k] != want {
			t.Errorf("first line %s = %v, want %v", k, first[k], want)
		}
	}
	for k, want := range map[string]any{"account": "b", "points_used": float64(2), "remaining_points": 999.5, "image_id": "img-b-1"} {
		if second[k] != want {
			t.Errorf("second line %s = %v, want %v", k, second[k], want)
		}
	}
	if _, ok := second["model_name"]; ok {
		t.Errorf("model_name on a line whose answer had none: %v", second)
	}
}

// TestAccountsBlocked (docs/design.md#failover-and-rests): a Cloudflare challenge (an HTML 403 or
// 503) is a 502 saying the service's Cloudflare protection refused the
// request, counted as kind blocked, with none of the page in the answer
// or the log; a 403 with a JSON body stays the service's own error.
func TestAccountsBlocked(t *testing.T) {
	const canary = "cf-challenge-canary-4b2e"
	page := "<!DOCTYPE html><html><head><title>Just a moment...</title></head><body>" + canary + "</body></html>"
	up := newFakeUpstream(t)
	startCaddy(t, opsSite(up.endpoint(), nil, "timeout 10s", "")+"\nmetrics /metrics")
	mark := markLog(t)
	for _, tc := range []struct {
		name      string
		h         http.HandlerFunc
		code      string
		message   string
		kind      string
		wantCalls int
	}{
		{"403 challenge", func(w http.ResponseWriter, r *http.Request) {
			w.Header().Set("Content-Type", "text/html; charset=UTF-8")
			w.Header().Set("Cf-Mitigated", "challenge")
			w.WriteHeader(403)
			fmt.Fprint(w, page)
		}, "upstream_blocked", "Cloudflare protection refused the request", kindBlocked, 1},
		{"503 challenge without a type", func(w http.ResponseWriter, r *http.Request) {
			w.Header()["Content-Type"] = nil
			w.WriteHeader(503)
			fmt.Fprint(w, "\n"+page)
		}, "upstream_blocked", "Cloudflare protection refused the request", kindBlocked, 1},
		{"403 JSON", failWith(403, `{"success":false,"error":"account suspended"}`), "upstream_error", "account suspended", kindBadResponse, 1},
	} {
		t.Run(tc.name, func(t *testing.T) {
			up.setHandler(tc.h)
			calls := len(up.Calls())
			before := scrape(t)
			status, _, body := do(t, http.MethodPost, "/v1/chat/completions", chatJSON("blocked?", 1200, ""))
			if status != http.StatusBadGateway {
				t.Fatalf("status %d, want 502: %s", status, body)
			}
			if e := apiErr(t, body); e.Code != tc.code || !strings.Contains(e.Message, tc.message) {
				t.Errorf("error %+v, want code %s with %q", e, tc.code, tc.message)
			}
			if strings.Contains(string(body), canary) || strings.Contains(string(body), "<") {
				t.Errorf("the page reached the client: %s", body)
			}
			if d := grewSince(t, before, "caddy_zimage_upstream_errors_total", "kind", tc.kind); d != 1 {
				t.Errorf("errors of kind %s counted %v, want 1", tc.kind, d)
			}
			if n := len(up.Calls()) - calls; n != tc.wantCalls {
				t.Errorf("%d calls, want %d (a challenge is not retried on the same account)", n, tc.wantCalls)
			}
		})
	}
	for _, l := range mark.lines(t) {
		if s := fmt.Sprint(l); strings.Contains(s, canary) || strings.Contains(s, "Just a moment") {
			t.Errorf("the challenge page reached the log: %s", s)
		}
	}
	if l := mark.find(t, "image service call failed", func(l map[string]any) bool { return l["kind"] == kindBlocked }); len(l) != 2 {
		t.Errorf("%d warn lines of kind blocked, want 2", len(l))
	}
}

// The README's production config for several accounts and several users
// adapts and provisions: its accounts and clients take effect.
func TestUnitReadmeAccountsExample(t *testing.T) {
	unitClearEnv(t)
	for k, v := range map[string]string{
		"FAMILY_KEY": testClientKey, "ALICE_LAPTOP_KEY": testAliceKey, "ALICE_PHONE_KEY": testAliceKey2, "BOT_KEY": testBobKey,
		"SD_KEY_MAIN": testAccountKeyA, "SD_KEY_SPARE": testAccountKeyB,
	} {
		t.Setenv(k, v)
	}
	raw, err := os.ReadFile("README.md")
	if err != nil {
		t.Fatal(err)
	}
	_, section, ok := strings.Cut(string(raw), "### Several accounts and several users")
	if !ok {
		t.Fatal("README has no section for several accounts and users")
	}
	cfg := unitAdapt(t, fenced(t, section, "```caddy\n"))
	var g Gateway
	if err := json.Unmarshal(unitFindHandler(t, cfg, "zimage_gateway"), &g); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := caddy.NewContext(caddy.Context{Context: t.Context()})
	defer cancel()
	if err := g.Provision(ctx); err != nil {
		t.Fatalf("provisioning the README's gateway: %v", err)
	}
	defer g.Cleanup()
	var accts []string
	for _, a := range g.accounts.accounts {
		accts = append(accts, fmt.Sprintf("%s:%d:%v", a.name, unitLimit(a), a.lowPoints))
	}
	if got := strings.Join(accts, " "); got != "main:4:500 spare:2:200" || g.accounts.retries != 1 {
		t.Errorf("accounts %q retries %d", got, g.accounts.retries)
	}
	for key, want := range map[string]string{testClientKey: "family", testAliceKey: "alice", testAliceKey2: "alice", testBobKey: "bot"} {
		if got := g.authorize(unitBearer(key)).label(); got != want {
			t.Errorf("key of %s is client %q", want, got)
		}
	}
}

// TestAccountsRetryAfterCapped: the client's Retry-After
// after the service's 429 is what the gateway does with the account, its
// rest: the service's figure, capped at an hour; 30 s when it gives none.
// Never the service's header as it came.
func TestAccountsRetryAfterCapped(t *testing.T) {
	up := newFakeUpstream(t)
	startCaddy(t, opsSite(up.endpoint(), nil, "timeout 10s\n\t\tretries 0", ""))
	for _, tc := range []struct {
		name, header, want string
	}{
		{"999999999 seconds", "999999999", "3600"},
		{"a date next year", time.Now().AddDate(1, 0, 0).UTC().Format(http.TimeFormat), "3600"},
		{"7 seconds", "7", "7"},
		{"none", "", "30"},
		{"garbage", "soon", "30"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var hdr []string
			if tc.header != "" {
				hdr = []string{"Retry-After", tc.header}
			}
			up.setHandler(failWith(429, `{"error":"slow down"}`, hdr...))
			status, h, body := do(t, http.MethodPost, "/v1/chat/completions", chatJSON("rate limited", 1300, ""))
			if status != http.StatusTooManyRequests {
				t.Fatalf("status %d, want 429: %s", status, body)
			}
			if got := h.Get("Retry-After"); got != tc.want {
				t.Errorf("Retry-After %q, want %q", got, tc.want)
			}
		})
	}
}

// TestAccountsOutOfPoints (docs/design.md#failover-and-rests): an answer that
// says an account has no points left fails over at once and rests the
// account for points_rest, counted as kind no_points; a success whose
// remaining_points is below its points_used rests the account before it
// is asked again; the client hears of no_points only when every account
// is out: a 502 saying so, without Retry-After.
func TestAccountsOutOfPoints(t *testing.T) {
	noPoints := failWith(403, `{"success":false,"error":"Insufficient points: 0 left"}`)
	t.Run("one out: failover and its rest", func(t *testing.T) {
		up := newFakeUpstream(t)
		up.setHandler(byKey(map[string]http.HandlerFunc{testAccountKeyA: noPoints}))
		startCaddy(t, accountsSite(up.endpoint(), accountBlock("a", testAccountKeyA, "points_rest 45m")+accountBlock("b", testAccountKeyB),
			"timeout 10s\n\t\tpoints_rest 2h", ""))
		before, mark := scrape(t), markLog(t)
		for i := range 3 {
			status, _, body := do(t, http.MethodPost, "/v1/chat/completions", chatJSON("out of points?", 1400+i, ""))
			if status != http.StatusOK || !strings.Contains(string(body), "img.example.com/b.png") {
				t.Fatalf("request %d: status %d, want b's image: %s", i, status, body)
			}
		}
		if a, b := up.keyCalls(testAccountKeyA), up.keyCalls(testAccountKeyB); a != 1 || b != 3 {
			t.Errorf("calls a %d, b %d; want 1 and 3 (a rests)", a, b)
		}
		after := scrape(t)
		if d := after.delta(before, "caddy_zimage_upstream_errors_total", "kind", "no_points"); d != 1 {
			t.Errorf("no_points errors counted %v, want 1", d)
		}
		if d := after.delta(before, "caddy_zimage_upstream_account_rests_total", "account", "a", "reason", "no_points"); d != 1 {
			t.Errorf("no_points rests of a counted %v, want 1", d)
		}
		if l := mark.find(t, "image service account rests", nil); len(l) != 1 || l[0]["account"] != "a" || l[0]["rest"] != float64(45*60) {
			t.Errorf("rest lines %v, want one of a for its points_rest, 2700s", l)
		}
	})

	t.Run("all out: 502 no_points once every account rests", func(t *testing.T) {
		up := newFakeUpstream(t)
		up.setHandler(byKey(map[string]http.HandlerFunc{
			testAccountKeyA: noPoints,
			testAccountKeyB: failWith(402, `{"success":false,"message":"余额不足"}`),
		}))
		startCaddy(t, accountsSite(up.endpoint(), accountBlock("a", testAccountKeyA)+accountBlock("b", testAccountKeyB), "timeout 10s", ""))
		before, mark := scrape(t), markLog(t)
		// the first rests a, and b failing the same way makes it the
		// request's failure (b does not rest for it); the second rests b;
		// the third, while both rest, still asks one (a, in turn)
		for i, code := range []string{"upstream_error", "no_points", "no_points"} {
			status, hdr, body := do(t, http.MethodPost, "/v1/chat/completions", chatJSON("nobody has points", 1500+i, ""))
			if status != http.StatusBadGateway {
				t.Fatalf("request %d: status %d, want 502: %s", i, status, body)
			}
			e := apiErr(t, body)
			if e.Code != code || code == "no_points" && !strings.Contains(e.Message, "accounts have no points left") || code != "no_points" && !strings.Contains(e.Message, "余额不足") {
				t.Errorf("request %d: error %+v, want code %s", i, e, code)
			}
			if ra := hdr.Get("Retry-After"); ra != "" {
				t.Errorf("request %d: Retry-After %q on a 502 no_points", i, ra)
			}
		}
		if a, b := up.keyCalls(testAccountKeyA), up.keyCalls(testAccountKeyB); a != 2 || b != 2 {
			t.Errorf("calls a %d, b %d; want 2 and 2", a, b)
		}
		if d := grewSince(t, before, "caddy_zimage_upstream_errors_total", "kind", "no_points"); d != 4 {
			t.Errorf("no_points errors counted %v, want 4 (one per call)", d)
		}
		for _, name := range []string{"a", "b"} {
			if l := mark.find(t, "image service account rests", func(l map[string]any) bool {
				return l["reason"] == kindNoPoints && l["account"] == name && l["rest"] == float64(3600)
			}); len(l) == 0 {
				t.Errorf("no no_points rest line for %s", name)
			}
		}
	})

	t.Run("one out, the other rests after a 429: not no_points", func(t *testing.T) {
		up := newFakeUpstream(t)
		up.setHandler(byKey(map[string]http.HandlerFunc{
			testAccountKeyA: failWith(429, `{"error":"slow"}`, "Retry-After", "60"),
			testAccountKeyB: noPoints,
		}))
		startCaddy(t, accountsSite(up.endpoint(), accountBlock("a", testAccountKeyA)+accountBlock("b", testAccountKeyB), "timeout 10s", ""))
		// a rests after its 429 (b answers no points: out)
		do(t, http.MethodPost, "/v1/chat/completions", chatJSON("a rests", 1550, ""))
		status, _, body := do(t, http.MethodPost, "/v1/chat/completions", chatJSON("b is out, a rests", 1551, ""))
		if e := apiErr(t, body); status == http.StatusBadGateway && e.Code == "no_points" {
			t.Errorf("no_points while account a only rests after a 429: %s", body)
		}
	})

	t.Run("remaining below used: rests before it is asked again", func(t *testing.T) {
		up := newFakeUpstream(t)
		up.setHandler(byKey(map[string]http.HandlerFunc{testAccountKeyA: func(w http.ResponseWriter, r *http.Request) {
			w.Header().Set("Content-Type", "application/json")
			fmt.Fprint(w, `{"success":true,"data":{"image_url":"https://img.example.com/a.png","points_used":5,"remaining_points":"3"}}`)
		}}))
		startCaddy(t, accountsSite(up.endpoint(), accountBlock("a", testAccountKeyA)+accountBlock("b", testAccountKeyB), "timeout 10s\n\t\tpoints_rest 90m", ""))
		before, mark := scrape(t), markLog(t)
		want := []string{"a", "b", "b", "b"} // in turn a, b, a, b without the rest
		for i, w := range want {
			status, _, body := do(t, http.MethodPost, "/v1/chat/completions", chatJSON("last points", 1600+i, ""))
			if status != http.StatusOK || !strings.Contains(string(body), "img.example.com/"+w+".png") {
				t.Fatalf("request %d: status %d, want %s's image: %s", i, status, w, body)
			}
		}
		if a := up.keyCalls(testAccountKeyA); a != 1 {
			t.Errorf("a was asked %d times, want once: it rests after its last points", a)
		}
		rests := mark.find(t, "image service account rests", func(l map[string]any) bool {
			return l["account"] == "a" && l["reason"] == kindNoPoints && l["rest"] == float64(90*60) &&
				l["remaining_points"] == float64(3) && l["points_used"] == float64(5)
		})
		if len(rests) != 1 {
			t.Errorf("%d rest lines for a's last points, want 1", len(rests))
		}
		if d := grewSince(t, before, "caddy_zimage_upstream_errors_total", "kind", "no_points"); d != 0 {
			t.Errorf("no_points errors counted %v for a success", d)
		}
	})
}

// TestAccountsTwoSitesOneAccountLowerLimit (docs/design.md#accounts): two sites name the same account (same URL and key), one with
// max_concurrent 2 and one with 5, in either order in the Caddyfile. They
// share one limiter at the lower limit: with 7 requests at the site that
// says 5, the fake sees 2 calls on the key and 5 wait; a warning at load
// names the account and both values.
func TestAccountsTwoSitesOneAccountLowerLimit(t *testing.T) {
	hostA, hostB := fmt.Sprintf("a.localhost:%d", httpPort), fmt.Sprintf("b.localhost:%d", httpPort)
	site := func(host, name string, limit int, up *fakeUpstream) string {
		return fmt.Sprintf("http://%s {\n%s\n}\n", host, accountsSite(up.endpoint(),
			accountBlock(name, testAccountKeyA, fmt.Sprintf("max_concurrent %d", limit)), "timeout 30s\n\t\tqueue_timeout 30s", ""))
	}
	for _, tc := range []struct {
		name           string
		limitA, limitB int
	}{
		{"lower first", 2, 5},
		{"lower second", 5, 2},
	} {
		t.Run(tc.name, func(t *testing.T) {
			up := newFakeUpstream(t)
			g := newGate(t)
			up.setHandler(g.handler)
			mark := markLog(t)
			startCaddyRaw(t, globals()+"\n"+site(hostA, "main", tc.limitA, up)+site(hostB, "shared", tc.limitB, up))

			warns := mark.find(t, "upstream account is configured twice with different max_concurrent; the lower applies, as it is one account at the service", func(l map[string]any) bool {
				return l["level"] == "warn" && l["applies"] == float64(2)
			})
			if len(warns) != 1 {
				t.Fatalf("%d warnings, want 1: %v", len(warns), warns)
			}
			w := warns[0]
			got := map[any]any{w["account"]: w["max_concurrent"], w["other_account"]: w["other_max_concurrent"]}
			if want := map[any]any{"main": float64(tc.limitA), "shared": float64(tc.limitB)}; !reflect.DeepEqual(got, want) {
				t.Errorf("warning names %v, want both accounts with their limits %v", got, want)
			}

			// every request at the site that says 5
			busy := hostA
			if tc.limitB == 5 {
				busy = hostB
			}
			var results []<-chan result
			for i := range 7 {
				results = append(results, sendAsync(http.MethodPost, "/v1/images/generations", fmt.Sprintf(`{"prompt":"two sites %d","seed":%d}`, i, 1900+i), "Host", busy))
			}
			waitFor(t, "2 calls on the account and 5 queued", func() bool {
				active, _ := up.keyStats(testAccountKeyA)
				return active == 2 && unitQueueLen() == 5
			})
			g.open()
			for i, ch := range results {
				if r := await(t, ch); r.status != http.StatusOK {
					t.Errorf("request %d: status %d: %s", i, r.status, r.body)
				}
			}
			if _, peak := up.keyStats(testAccountKeyA); peak != 2 {
				t.Errorf("%d calls at once on the account, want the lower limit, 2", peak)
			}
		})
	}
}

// hostileFake is a fake service whose answers depend on the prompt, as a
// service that echoes the prompt in its refusals and a Cloudflare rule
// that matches a word would: a prompt with "forbidden" gets a 400 that
// echoes it (through echo, which may cut it or change its case), a prompt
// with "cfmarker" a Cloudflare-like HTML page; any other an image named
// after the account.
func hostileFake(echo func(prompt string) string) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		var body upstreamRequest
		_ = json.NewDecoder(r.Body).Decode(&body)
		switch {
		case strings.Contains(body.Prompt, "forbidden"):
			failWith(http.StatusBadRequest, string(must(json.Marshal(map[string]any{
				"success": false, "message": "prompt contains forbidden word: " + echo(body.Prompt)}))))(w, r)
		case strings.Contains(body.Prompt, "cfmarker"):
			w.Header().Set("Content-Type", "text/html; charset=UTF-8")
			w.WriteHeader(http.StatusForbidden)
			fmt.Fprint(w, `<!DOCTYPE html><html><head><title>Attention Required! | Cloudflare</title></head><body>Sorry, you have been blocked. insufficient points balance</body></html>`)
		default:
			writeImage(w, "https://img.example.com/"+keyNames[strings.TrimPrefix(r.Header.Get("Authorization"), "Bearer ")]+".png")
		}
	}
}

// threeAccountsWithHealth starts a gateway of three accounts a, b and c on
// up, with the health endpoint on.
func threeAccountsWithHealth(t *testing.T, up *fakeUpstream) {
	startCaddy(t, accountsSite(up.endpoint(),
		accountBlock("a", testAccountKeyA)+accountBlock("b", testAccountKeyB)+accountBlock("c", testAccountKeyC), "timeout 10s", "health"))
}

// TestAccountsHostilePromptRestsNoAccount: one client's prompt cannot
// take the pool down. A service that echoes the prompt in a refusal
// (whole, cut, in capitals) makes no account rest, though the prompt
// says "points": the client gets the service's refusal, health stays 200
// and the next ordinary request is served at its first attempt. A
// Cloudflare page for a word of the prompt rests the first account that
// met it and no other: the second account failing the same way makes it
// the request's failure.
func TestAccountsHostilePromptRestsNoAccount(t *testing.T) {
	const prompt = "forbidden points no-enhance"
	for _, tc := range []struct {
		name, prompt string
		echo         func(string) string
		code         string
		calls, rests int
	}{
		{"echoed whole", prompt, func(p string) string { return p }, "upstream_error", 1, 0},
		{"echoed cut", prompt, func(p string) string { return p[:len("forbidden poin")] + "ts…" }, "upstream_error", 1, 0},
		{"echoed in capitals, spaces doubled", "forbidden Points\tand balance", func(p string) string {
			return strings.ReplaceAll(strings.ToUpper(p), "\t", "  ")
		}, "upstream_error", 1, 0},
		{"a Cloudflare page for a word", "a cfmarker cat", nil, "upstream_blocked", 2, 1},
	} {
		t.Run(tc.name, func(t *testing.T) {
			up := newFakeUpstream(t)
			up.setHandler(hostileFake(tc.echo))
			threeAccountsWithHealth(t, up)
			before, mark := scrape(t), markLog(t)

			status, hdr, body := do(t, http.MethodPost, "/v1/images/generations", `{"model":"Z-Image","prompt":`+string(must(json.Marshal(tc.prompt)))+`}`)
			e := itWantErr(t, status, hdr, body, http.StatusBadGateway, tc.code)
			if tc.code == "upstream_error" && !strings.Contains(e.Message, "prompt contains forbidden word") {
				t.Errorf("message %q, want the service's refusal", e.Message)
			}
			if n := len(up.Calls()); n != tc.calls {
				t.Errorf("the hostile request made %d calls, want %d", n, tc.calls)
			}
			var rests float64
			for _, name := range []string{"a", "b", "c"} {
				for _, kind := range []string{kindNoPoints, kindBlocked} {
					rests += grewSince(t, before, "caddy_zimage_upstream_account_rests_total", "account", name, "reason", kind)
				}
			}
			if int(rests) != tc.rests || len(mark.find(t, "image service account rests", nil)) != tc.rests {
				t.Errorf("%v accounts rested, want %d", rests, tc.rests)
			}
			if status, _, body, _ := healthGet(t, http.MethodGet, "/v1/zimage/health"); status != http.StatusOK {
				t.Errorf("health after the hostile request: %d %s", status, body)
			}

			calls := len(up.Calls())
			if status, _, body := do(t, http.MethodPost, "/v1/images/generations", `{"model":"Z-Image","prompt":"a quiet lake"}`); status != http.StatusOK {
				t.Fatalf("the next ordinary request: %d %s", status, body)
			}
			if n := len(up.Calls()) - calls; n != 1 {
				t.Errorf("the next ordinary request made %d calls, want 1: the first account it asked served it", n)
			}
		})
	}
}

// TestAccountsSuccessEndsRest: an account that answered out of points
// rests, but once it makes an image (asked while every account rests) the
// rest is over: the next request goes to it rather than to the account
// still out, and health is 200 again.
func TestAccountsSuccessEndsRest(t *testing.T) {
	var toppedUp atomic.Bool
	up := newFakeUpstream(t)
	up.setHandler(byKey(map[string]http.HandlerFunc{
		testAccountKeyA: func(w http.ResponseWriter, r *http.Request) {
			if !toppedUp.Load() {
				failWith(http.StatusForbidden, `{"success":false,"error":"Insufficient points"}`)(w, r)
				return
			}
			writeImage(w, "https://img.example.com/a.png")
		},
		testAccountKeyB: failWith(http.StatusPaymentRequired, `{"success":false,"message":"余额不足"}`),
	}))
	startCaddy(t, accountsSite(up.endpoint(), accountBlock("a", testAccountKeyA)+accountBlock("b", testAccountKeyB), "timeout 10s", "health"))
	mark := markLog(t)
	for i, code := range []string{"upstream_error", "no_points"} { // a rests, then b
		status, hdr, body := do(t, http.MethodPost, "/v1/chat/completions", chatJSON("both out", 1700+i, ""))
		itWantErr(t, status, hdr, body, http.StatusBadGateway, code)
	}
	if status, _, body, _ := healthGet(t, http.MethodGet, "/v1/zimage/health"); status != http.StatusServiceUnavailable {
		t.Fatalf("health while both rest: %d %s", status, body)
	}

	toppedUp.Store(true)
	for i := range 3 {
		status, _, body := do(t, http.MethodPost, "/v1/chat/completions", chatJSON("a again", 1710+i, ""))
		if status != http.StatusOK || !strings.Contains(string(body), "img.example.com/a.png") {
			t.Fatalf("request %d after the top-up: %d, want a's image: %s", i, status, body)
		}
	}
	if status, _, body, rep := healthGet(t, http.MethodGet, "/v1/zimage/health"); status != http.StatusOK || rep.Accounts[0].Resting || !rep.Accounts[1].Resting {
		t.Errorf("health after a's image: %d %s, want 200 with b alone resting", status, body)
	}
	if a, b := up.keyCalls(testAccountKeyA), up.keyCalls(testAccountKeyB); a != 4 || b != 2 {
		t.Errorf("calls a %d, b %d; want 4 and 2: b rests, a no more", a, b)
	}
	if l := mark.find(t, "image service account rests no more: it made an image", nil); len(l) != 1 || l[0]["account"] != "a" {
		t.Errorf("lines of a rest ended: %v, want one for a", l)
	}
}

// TestAccountsAllOutRestInNRequests: three accounts all truly out of
// points (saying so in three ways) are all resting after three requests,
// each of which rests one account; the first two get the service's
// answer, and only the third, when every account rests, no_points.
func TestAccountsAllOutRestInNRequests(t *testing.T) {
	up := newFakeUpstream(t)
	up.setHandler(byKey(map[string]http.HandlerFunc{
		testAccountKeyA: failWith(http.StatusForbidden, `{"success":false,"error":"Insufficient points: 0 left"}`),
		testAccountKeyB: failWith(http.StatusPaymentRequired, `{"success":false,"message":"payment required"}`),
		testAccountKeyC: failWith(http.StatusOK, `{"success":false,"message":"积分不足"}`),
	}))
	threeAccountsWithHealth(t, up)
	before := scrape(t)
	for i, want := range []struct {
		code  string
		calls int
	}{{"upstream_error", 2}, {"upstream_error", 2}, {"no_points", 1}} {
		calls := len(up.Calls())
		status, hdr, body := do(t, http.MethodPost, "/v1/chat/completions", chatJSON("nobody has points", 1800+i, ""))
		itWantErr(t, status, hdr, body, http.StatusBadGateway, want.code)
		if n := len(up.Calls()) - calls; n != want.calls {
			t.Errorf("request %d made %d calls, want %d", i+1, n, want.calls)
		}
	}
	after := scrape(t)
	for _, name := range []string{"a", "b", "c"} {
		if d := after.delta(before, "caddy_zimage_upstream_account_rests_total", "account", name, "reason", kindNoPoints); d != 1 {
			t.Errorf("account %s rested %v times, want once", name, d)
		}
	}
	if status, _, body, _ := healthGet(t, http.MethodGet, "/v1/zimage/health"); status != http.StatusServiceUnavailable {
		t.Errorf("health with every account out: %d %s", status, body)
	}
}
