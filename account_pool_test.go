package zimage

// The account pool (docs/design.md#accounts): the choice of an account, the
// limiters' claims across handlers and reloads, and the limits under load
// through a real Caddy. Helpers for account sites are in accounts_test.go.

import (
	"context"
	"fmt"
	"net/http"
	"reflect"
	"strings"
	"testing"
	"time"

	"go.uber.org/zap"
)

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
