//go:build unix

package zimage

// Two real Caddy processes on one storage or one Redis, and one fake image
// service: counts that outlive a restart, and a cluster that counts as one
// (account slots, quotas, rests), through a Redis that is killed and comes
// back, and an instance that dies holding slots.

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
)

// testRedisPassword is the test Redis's password: a secret like the keys.
const testRedisPassword = "redis-pass-5b7e1c9d"

func init() { testSecrets = append(testSecrets, testRedisPassword) }

// testRedis is a redis-server of the test's own, on a free port.
type testRedis struct {
	t    testing.TB
	bin  string
	port int
	cmd  *exec.Cmd
	done chan struct{}
}

// startRedis runs redis-server (Debian's, which .ci/run installs). Without
// the binary the test is skipped, except in CI (CI=true), where that is a
// failure: the tests it would skip are what shows the cluster works.
func startRedis(t testing.TB) *testRedis {
	t.Helper()
	bin, err := exec.LookPath("redis-server")
	if err != nil {
		if os.Getenv("CI") == "true" {
			t.Fatalf("redis-server is not installed, and CI must run the Redis tests: apt-get install redis-server (%v)", err)
		}
		t.Skip("redis-server is not installed (apt-get install redis-server); the Redis coordination tests need it")
	}
	r := &testRedis{t: t, bin: bin, port: freePort()}
	r.start()
	t.Cleanup(r.stop)
	return r
}

func (r *testRedis) url() string {
	return fmt.Sprintf("redis://:%s@127.0.0.1:%d", testRedisPassword, r.port)
}

// start runs the server and waits until it answers.
func (r *testRedis) start() {
	t := r.t
	t.Helper()
	r.cmd = exec.Command(r.bin, "--port", fmt.Sprint(r.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
		"--requirepass", testRedisPassword, "--dir", t.TempDir())
	r.cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := r.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	r.done = make(chan struct{})
	go func() { _ = r.cmd.Wait(); close(r.done) }()
	// polled like waitFor, which takes a *testing.T (a benchmark starts one too)
	ready := func() bool {
		c, err := net.DialTimeout("tcp", fmt.Sprintf("127.0.0.1:%d", r.port), time.Second)
		if err != nil {
			return false
		}
		defer c.Close()
		fmt.Fprintf(c, "AUTH %s\r\nPING\r\n", testRedisPassword)
		_ = c.SetReadDeadline(time.Now().Add(time.Second))
		br := bufio.NewReader(c)
		a, _ := br.ReadString('\n')
		b, _ := br.ReadString('\n')
		return strings.HasPrefix(a, "+OK") && strings.HasPrefix(b, "+PONG")
	}
	for deadline := time.Now().Add(10 * time.Second); !ready(); time.Sleep(20 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("redis-server on port %d does not answer PING after 10s", r.port)
		}
	}
}

// kill stops the server at once, as a crash would (its data is lost: it
// runs without persistence).
func (r *testRedis) kill() {
	if r.cmd == nil {
		return
	}
	_ = syscall.Kill(-r.cmd.Process.Pid, syscall.SIGKILL)
	<-r.done
	r.cmd = nil
}

func (r *testRedis) stop() { r.kill() }

// kill ends a Caddy process at once, as a crash would.
func (p *caddyProcess) kill() {
	_ = syscall.Kill(-p.cmd.Process.Pid, syscall.SIGKILL)
	<-p.exited
}

// resetPeaks forgets the fake's peaks, for a new phase of a test.
func (f *fakeUpstream) resetPeaks() {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.keyPeak = map[string]int{}
	for k, n := range f.keyActive {
		f.keyPeak[k] = n
	}
}

func (p *caddyProcess) usage(t *testing.T, key string) usageAnswer {
	t.Helper()
	r := p.get(t.Context(), "/v1/zimage/usage", "Authorization", "Bearer "+key)
	var u usageAnswer
	if r.err != nil || r.status != 200 || json.Unmarshal(r.body, &u) != nil {
		t.Fatalf("usage: %d %v %s", r.status, r.err, r.body)
	}
	return u
}

func (p *caddyProcess) generate(ctx context.Context, key, body string) result {
	return p.do(ctx, http.MethodPost, "/v1/images/generations", body, "Authorization", "Bearer "+key, "Content-Type", "application/json")
}

// clusterSite is the gateway of one instance of a cluster on the Redis at
// redisURL: accounts one and two (max_concurrent 2 each) at the fake,
// alice with 5 images a day, and the default client without a quota.
func clusterSite(up *fakeUpstream, redisURL, accounts string) string {
	return fmt.Sprintf(`	zimage_gateway {
		api_key %s
		client alice {
			key %s
			quota 5 images per day
		}
		client bob {
			key %s
			max_concurrent 1
		}
		quota_timezone UTC
		upstream %s {
			%s
			timeout 30s
			queue_timeout 30s
			retries 1
		}
		coordination redis %s {
			lease_ttl 1s
		}
		enhance off
		health
	}
	metrics /metrics`, testClientKey, testAliceKey, testBobKey, up.endpoint(), accounts, redisURL)
}

const twoAccounts = `account one {
				api_key ` + testAccountKeyA + `
				max_concurrent 2
			}
			account two {
				api_key ` + testAccountKeyB + `
				max_concurrent 2
			}`

// holdAll sends n generations through each instance (the default
// client), waits until the fake holds want of them, then lets them through
// one at a time; it returns their results.
func holdAll(t *testing.T, up *fakeUpstream, g *gate, n, want int, insts ...*caddyProcess) []result {
	t.Helper()
	var wg sync.WaitGroup
	var mu sync.Mutex
	var out []result
	for _, p := range insts {
		for i := range n {
			wg.Add(1)
			go func() {
				defer wg.Done()
				r := p.generate(context.Background(), testClientKey, fmt.Sprintf(`{"prompt":"held %d"}`, i))
				mu.Lock()
				out = append(out, r)
				mu.Unlock()
			}()
		}
	}
	waitFor(t, fmt.Sprintf("%d generations at the fake", want), func() bool { return int(up.active.Load()) == want })
	for range n * len(insts) {
		g.release(t)
	}
	wg.Wait()
	return out
}

// TestCoordinationTwoInstances: two Caddy processes on one Redis count as
// one: each account runs at most its 2 generations across both, alice's 5
// images a day are 5 across both, bob's max_concurrent 1 is 1 across both, one instance's 429 rests the account for
// the other, and a Redis that is killed and restarted mid-run loses no
// request and brings the shared limits back. The Redis password appears in
// no answer or log.
func TestCoordinationTwoInstances(t *testing.T) {
	if testing.Short() {
		t.Skip("builds and runs two Caddy processes and a Redis")
	}
	rd := startRedis(t)
	bin := buildCaddy(t)
	up := newFakeUpstream(t)
	g := &gate{ch: make(chan struct{})}
	up.setHandler(g.handler)
	site := clusterSite(up, rd.url(), twoAccounts)
	one := startCaddyProcess(t, bin, t.TempDir(), "instance-1", site)
	two := startCaddyProcess(t, bin, t.TempDir(), "instance-2", site)
	ctx := t.Context()

	// 3 generations through each instance, 4 account slots in the cluster:
	// alone, each instance would run 4 (2 per account), 8 in all
	for _, r := range holdAll(t, up, g, 3, 4, one, two) {
		if r.err != nil || r.status != 200 {
			t.Errorf("held generation: %d %v %s", r.status, r.err, r.body)
		}
	}
	for _, k := range []string{testAccountKeyA, testAccountKeyB} {
		if _, peak := up.keyStats(k); peak > 2 {
			t.Errorf("an account had %d generations in flight at the fake, its max_concurrent across the cluster is 2", peak)
		}
	}
	g.open()

	// alice's 5 a day: 3 here, 2 there, the sixth refused on either
	for i, p := range []*caddyProcess{one, two, one, two, one} {
		if r := p.generate(ctx, testAliceKey, fmt.Sprintf(`{"prompt":"alice %d"}`, i)); r.status != 200 {
			t.Fatalf("alice's image %d: %d %s", i+1, r.status, r.body)
		}
	}
	for i, p := range []*caddyProcess{one, two} {
		r := p.generate(ctx, testAliceKey, `{"prompt":"alice's sixth"}`)
		var eb errorBody
		if r.status != http.StatusTooManyRequests || json.Unmarshal(r.body, &eb) != nil || eb.Error.Code != "insufficient_quota" {
			t.Errorf("alice's sixth image on instance %d: %d %s", i+1, r.status, r.body)
		}
	}
	if u := two.usage(t, testAliceKey); len(u.Quotas) != 1 || u.Quotas[0].Used != 5 {
		t.Errorf("alice's usage on instance 2: %+v, want 5 used", u)
	}

	// bob runs 1 generation at once, whichever instance he asks
	bobGate := newGate(t)
	up.setHandler(bobGate.handler)
	bobHeld := make(chan result, 1)
	go func() { bobHeld <- one.generate(context.Background(), testBobKey, `{"prompt":"bob's one"}`) }()
	waitFor(t, "bob's generation at the fake", func() bool { return up.active.Load() == 1 })
	r := two.generate(ctx, testBobKey, `{"prompt":"bob's second, elsewhere"}`)
	if var429 := apiErr(t, r.body); r.status != http.StatusTooManyRequests || var429.Code != "rate_limit_exceeded" {
		t.Errorf("bob's second generation on instance 2: %d %s", r.status, r.body)
	}
	bobGate.open()
	if r := <-bobHeld; r.status != 200 {
		t.Errorf("bob's first: %d %s", r.status, r.body)
	}
	if r := two.generate(ctx, testBobKey, `{"prompt":"bob's next"}`); r.status != 200 {
		t.Errorf("bob's next once the first finished: %d %s", r.status, r.body)
	}

	// account one's 429 on instance 1 rests it on instance 2 too
	var once sync.Once
	up.setHandler(func(w http.ResponseWriter, r *http.Request) {
		if r.Header.Get("Authorization") == "Bearer "+testAccountKeyA {
			rested := false
			once.Do(func() { rested = true })
			if rested {
				w.Header().Set("Retry-After", "600")
				http.Error(w, `{"error":"rate limited"}`, http.StatusTooManyRequests)
				return
			}
		}
		writeImage(w, "https://img.example.com/ok.png")
	})
	// accounts are taken by free slots, ties in turn; leases of the
	// phases above may still hold account one's slots for up to lease_ttl
	// on a loaded machine, so instance 1 is given several turns
	start := up.keyCalls(testAccountKeyA)
	for i := 0; up.keyCalls(testAccountKeyA) == start; i++ {
		if i == 20 {
			t.Fatal("instance 1 never chose account one")
		}
		if r := one.generate(ctx, testClientKey, `{"prompt":"until one answers 429"}`); r.status != 200 {
			t.Fatalf("instance 1: %d %s", r.status, r.body)
		}
	}
	callsA := up.keyCalls(testAccountKeyA)
	for range 4 {
		if r := two.generate(ctx, testClientKey, `{"prompt":"on instance 2"}`); r.status != 200 {
			t.Fatalf("instance 2: %d %s", r.status, r.body)
		}
	}
	if n := up.keyCalls(testAccountKeyA) - callsA; n != 0 {
		t.Errorf("instance 2 sent %d generations to the account instance 1 saw rate-limited", n)
	}
	h := two.get(ctx, "/v1/zimage/health")
	var rep healthReport
	if json.Unmarshal(h.body, &rep) != nil || len(rep.Accounts) != 2 || !rep.Accounts[0].Resting || rep.Accounts[1].Resting {
		t.Errorf("instance 2's health: %s, want account one resting", h.body)
	}

	// Redis dies while each instance has a generation in flight: those
	// finish, every later request is still served, on each instance's own
	// limits, and both say so
	outage := newGate(t)
	up.setHandler(func(w http.ResponseWriter, r *http.Request) {
		var body upstreamRequest
		_ = json.NewDecoder(r.Body).Decode(&body)
		if strings.Contains(body.Prompt, "across the outage") {
			outage.handler(w, r)
			return
		}
		writeImage(w, "https://img.example.com/ok.png")
	})
	inFlight := make(chan result, 2)
	for _, p := range []*caddyProcess{one, two} {
		go func() {
			inFlight <- p.generate(context.Background(), testClientKey, `{"prompt":"held across the outage"}`)
		}()
	}
	waitFor(t, "a generation of each instance at the fake", func() bool { return up.active.Load() == 2 })
	rd.kill()
	for i, p := range []*caddyProcess{one, two, one, two} {
		if r := p.generate(ctx, testClientKey, `{"prompt":"without redis"}`); r.status != 200 {
			t.Errorf("request %d without Redis: %d %s", i, r.status, r.body)
		}
	}
	outage.open()
	for range 2 {
		if r := <-inFlight; r.status != 200 {
			t.Errorf("a generation in flight when Redis died: %d %s", r.status, r.body)
		}
	}
	for i, p := range []*caddyProcess{one, two} {
		if got := parseScrape(t, p.get(ctx, "/metrics")).get("caddy_zimage_coordination_up"); got != 0 {
			t.Errorf("instance %d: coordination_up %v without Redis", i+1, got)
		}
		var rep healthReport
		h := p.get(ctx, "/v1/zimage/health")
		if h.status != 200 || json.Unmarshal(h.body, &rep) != nil || rep.Status != "degraded" || rep.Coordination == nil || rep.Coordination.State != "down" {
			t.Errorf("instance %d health without Redis: %d %s", i+1, h.status, h.body)
		}
	}
	// Redis is back (empty: it kept nothing): the limits are shared again
	rd.start()
	for i, p := range []*caddyProcess{one, two} {
		waitFor(t, fmt.Sprintf("instance %d back on Redis", i+1), func() bool {
			return parseScrape(t, p.get(ctx, "/metrics")).get("caddy_zimage_coordination_up") == 1
		})
	}
	// the counts came back with the instances (Redis kept nothing)
	for i, p := range []*caddyProcess{one, two} {
		if r := p.generate(ctx, testAliceKey, `{"prompt":"alice after the outage"}`); r.status != http.StatusTooManyRequests {
			t.Errorf("alice's sixth image on instance %d after Redis returned empty: %d %s", i+1, r.status, r.body)
		}
	}
	g = &gate{ch: make(chan struct{})}
	t.Cleanup(g.open)
	up.setHandler(g.handler)
	up.resetPeaks()
	// account one still rests (Redis lost its rest; each instance kept
	// it): 2 slots of account two across the cluster
	for _, r := range holdAll(t, up, g, 2, 2, one, two) {
		if r.err != nil || r.status != 200 {
			t.Errorf("held generation after Redis returned: %d %v %s", r.status, r.err, r.body)
		}
	}
	if _, peak := up.keyStats(testAccountKeyB); peak > 2 {
		t.Errorf("account two had %d generations in flight after Redis returned, want at most 2", peak)
	}

	for i, p := range []*caddyProcess{one, two} {
		b, _ := os.ReadFile(p.log)
		if strings.Contains(string(b), testRedisPassword) {
			t.Errorf("instance %d's log holds the Redis password", i+1)
		}
		if !strings.Contains(string(b), "Redis is unreachable") {
			t.Errorf("instance %d did not log that Redis was unreachable", i+1)
		}
	}
}

// TestCoordinationCrashedInstanceSlotsReturn: an instance killed while it
// holds both slots of the account leaves them to expire with their lease:
// the other instance's waiting generation gets one within the TTL.
func TestCoordinationCrashedInstanceSlotsReturn(t *testing.T) {
	if testing.Short() {
		t.Skip("builds and runs two Caddy processes and a Redis")
	}
	rd := startRedis(t)
	bin := buildCaddy(t)
	up := newFakeUpstream(t)
	g := newGate(t)
	up.setHandler(g.handler)
	site := clusterSite(up, rd.url(), `api_key `+testSDKey+`
			max_concurrent 2`)
	one := startCaddyProcess(t, bin, t.TempDir(), "instance-1", site)
	two := startCaddyProcess(t, bin, t.TempDir(), "instance-2", site)
	for range 2 {
		go one.generate(context.Background(), testClientKey, `{"prompt":"held by the instance that dies"}`)
	}
	waitFor(t, "instance 1's two generations at the fake", func() bool { return up.active.Load() == 2 })
	one.kill()
	waitFor(t, "the fake seeing instance 1 go", func() bool { return up.active.Load() == 0 })

	waiting := make(chan result, 1)
	go func() { waiting <- two.generate(context.Background(), testClientKey, `{"prompt":"waits for a slot"}`) }()
	waitFor(t, "instance 2's generation at the fake", func() bool { return up.active.Load() == 1 })
	g.open()
	if r := <-waiting; r.status != 200 {
		t.Errorf("instance 2's generation: %d %s", r.status, r.body)
	}
}

// TestUnitCoordinationConfig: the Caddyfile form, and load errors that
// name what to change without quoting the Redis password.
func TestUnitCoordinationConfig(t *testing.T) {
	var g Gateway
	src := "zimage_gateway {\n\tcoordination redis {env.REDIS_URL} {\n\t\tlease_ttl 5s\n\t\tkey_prefix site-a\n\t}\n}"
	if err := g.UnmarshalCaddyfile(caddyfile.NewTestDispenser(src)); err != nil {
		t.Fatal(err)
	}
	if want := (CoordinationConfig{Redis: "{env.REDIS_URL}", LeaseTTL: caddy.Duration(5 * time.Second), KeyPrefix: "site-a"}); *g.Coordination != want {
		t.Errorf("parsed %+v, want %+v", *g.Coordination, want)
	}
	for _, bad := range []struct{ src, want string }{
		{"coordination redis", "want 'coordination redis <url>'"},
		{"coordination memcached localhost:11211", "want 'coordination redis <url>'"},
		{"coordination redis redis://h:1 {\n\t\tttl 1s\n\t}", "unrecognized zimage_gateway coordination option 'ttl'"},
	} {
		var g Gateway
		err := g.UnmarshalCaddyfile(caddyfile.NewTestDispenser("zimage_gateway {\n\t" + bad.src + "\n}"))
		if err == nil || !strings.Contains(err.Error(), bad.want) {
			t.Errorf("%q: %v, want an error saying %q", bad.src, err, bad.want)
		}
	}
	for _, bad := range []struct {
		cc   CoordinationConfig
		want string
	}{
		{CoordinationConfig{Redis: "{env.UNSET_REDIS_URL}"}, "the Redis URL is empty"},
		{CoordinationConfig{Redis: "http://:" + testRedisPassword + "@h:1"}, "the Redis URL is not valid"},
		{CoordinationConfig{Redis: "redis://:" + testRedisPassword + "@h:1", LeaseTTL: caddy.Duration(time.Millisecond)}, "lease_ttl 1ms is shorter than 300ms"},
		{CoordinationConfig{Redis: "redis://:" + testRedisPassword + "@h:1", KeyPrefix: "a b"}, "key_prefix"},
	} {
		g := Gateway{APIKeys: []string{testClientKey}, Upstream: &UpstreamConfig{URL: "demo"}, Coordination: &bad.cc}
		ctx, cancel := caddy.NewContext(caddy.Context{Context: t.Context()})
		err := g.Provision(ctx)
		cancel()
		if err == nil || !strings.Contains(err.Error(), bad.want) || strings.Contains(err.Error(), testRedisPassword) {
			t.Errorf("%+v: %v, want an error saying %q without the password", bad.cc, err, bad.want)
		}
	}
}

// TestUnitQuotaCatchUp: counts made while Redis is away reach it when it
// returns (a Redis restarted empty starts from what the instance last saw
// there), and a reservation made alone and given back after that is taken
// back from Redis too.
func TestUnitQuotaCatchUp(t *testing.T) {
	rd := startRedis(t)
	g := Gateway{Clients: []ClientConfig{{Name: "alice", Keys: []string{testAliceKey}, Quotas: []QuotaConfig{{Images: 3, Per: "day"}}}},
		Upstream: &UpstreamConfig{URL: "demo"}, QuotaTimezone: "UTC",
		Coordination: &CoordinationConfig{Redis: rd.url(), LeaseTTL: caddy.Duration(time.Second), KeyPrefix: "catchup-" + fmt.Sprint(rd.port)}}
	ctx, cancel := caddy.NewContext(caddy.Context{Context: t.Context()})
	defer cancel()
	if err := g.Provision(ctx); err != nil {
		t.Fatal(err)
	}
	defer g.Cleanup()
	qs := g.quotas
	used := func() int { // what Redis holds: made, and reserved in flight
		t.Helper()
		start, end := periodBounds(periodDay, time.Now(), time.UTC)
		n, err := g.coord.readQuota(t.Context(), "alice", []quotaKey{{per: periodDay, start: start, end: end, limit: 3}})
		if err != nil {
			t.Fatal(err)
		}
		return n[0]
	}

	made := &quotaHold{}
	if e := qs.reserve(t.Context(), "alice", made, 1); e != nil {
		t.Fatal(e)
	}
	qs.made("alice", made)
	qs.release(t.Context(), "alice", made)

	rd.kill()
	alone := &quotaHold{}
	if e := qs.reserve(t.Context(), "alice", alone, 1); e != nil {
		t.Fatalf("a reservation without Redis: %v", e)
	}
	if g.coord.isUp() {
		t.Fatal("the coordinator did not notice Redis going away")
	}
	rd.start()
	waitFor(t, "the coordinator back on Redis", g.coord.isUp)
	if n := used(); n != 2 {
		t.Errorf("after the catch-up Redis counts %d, want 2: the image made before, the reservation made alone", n)
	}
	qs.release(t.Context(), "alice", alone)
	if n := used(); n != 1 {
		t.Errorf("after the lone reservation was given back Redis counts %d, want 1", n)
	}
}

// TestCoordinationSuccessEndsSharedRest: an account that one instance
// rested for want of points rests on the other too, and when it makes an
// image again (a top-up) the rest ends on both: the other instance, which
// only heard of the rest, does not keep the account idle for the hour.
func TestCoordinationSuccessEndsSharedRest(t *testing.T) {
	if testing.Short() {
		t.Skip("builds and runs two Caddy processes and a Redis")
	}
	rd := startRedis(t)
	bin := buildCaddy(t)
	up := newFakeUpstream(t)
	var out sync.Once
	up.setHandler(func(w http.ResponseWriter, r *http.Request) {
		empty := false
		out.Do(func() { empty = true })
		if empty {
			w.Header().Set("Content-Type", "application/json")
			w.WriteHeader(http.StatusPaymentRequired)
			fmt.Fprint(w, `{"success":false,"message":"insufficient points"}`)
			return
		}
		writeImage(w, "https://img.example.com/topped-up.png")
	})
	site := clusterSite(up, rd.url(), "account one {\n\t\t\t\tapi_key "+testAccountKeyA+"\n\t\t\t}")
	one := startCaddyProcess(t, bin, t.TempDir(), "instance-1", site)
	two := startCaddyProcess(t, bin, t.TempDir(), "instance-2", site)
	ctx := t.Context()
	health := func(p *caddyProcess) int { return p.get(ctx, "/v1/zimage/health").status }

	if r := one.generate(ctx, testClientKey, `{"prompt":"a cat"}`); r.status != http.StatusBadGateway {
		t.Fatalf("the out-of-points answer: %d %s, want 502", r.status, r.body)
	}
	waitFor(t, "instance 2 to hear of the rest (health 503)", func() bool { return health(two) == http.StatusServiceUnavailable })
	// a resting account still serves while every account rests: the
	// top-up shows on instance 1
	if r := one.generate(ctx, testClientKey, `{"prompt":"a cat"}`); r.status != 200 {
		t.Fatalf("after the top-up: %d %s", r.status, r.body)
	}
	waitFor(t, "instance 2 to hear that the rest ended (health 200)", func() bool { return health(two) == http.StatusOK })
	if s := health(one); s != http.StatusOK {
		t.Errorf("instance 1's health after its success: %d, want 200", s)
	}
}
