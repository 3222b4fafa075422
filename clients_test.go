package zimage

// Named clients (docs/design.md#clients-quotas): the client blocks, key matching, attribution
// in metrics and logs, the per-client limit answered at once, and the
// README's recipe for per-key request rates with caddy-ratelimit.

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"reflect"
	"strings"
	"testing"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/caddyserver/caddy/v2/caddyconfig/httpcaddyfile"
	"github.com/caddyserver/caddy/v2/caddytest"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
)

// Client blocks parse into Clients, whole.
func TestUnitClientsCaddyfile(t *testing.T) {
	t.Parallel()
	os.Unsetenv("ZIMAGE_UNIT_UNSET")
	for _, tc := range []struct {
		name, src string
		want      Gateway
	}{
		{"clients beside api_key", `zimage_gateway {
			api_key k0
			client alice {
				key ka1 ka2
				key {env.ALICE_KEY}
				max_concurrent 2
			}
			client bob-2 {
				key kb
			}
		}`, Gateway{APIKeys: []string{"k0"}, Clients: []ClientConfig{
			{Name: "alice", Keys: []string{"ka1", "ka2", "{env.ALICE_KEY}"}, MaxConcurrent: 2},
			{Name: "bob-2", Keys: []string{"kb"}},
		}}},
		{"no block, empty key", `zimage_gateway {
			client carol
			client dave {
				key {$ZIMAGE_UNIT_UNSET}
			}
		}`, Gateway{Clients: []ClientConfig{{Name: "carol"}, {Name: "dave"}}}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var got Gateway
			if err := got.UnmarshalCaddyfile(caddyfile.NewTestDispenser(tc.src)); err != nil {
				t.Fatalf("UnmarshalCaddyfile: %v", err)
			}
			if !reflect.DeepEqual(got, tc.want) {
				gj, _ := json.Marshal(got)
				wj, _ := json.Marshal(tc.want)
				t.Fatalf("parsed\n %s\nwant\n %s", gj, wj)
			}
		})
	}

	for _, tc := range []struct {
		name, src, want string
	}{
		{"no name", "zimage_gateway {\n\tclient {\n\t\tkey k\n\t}\n}", "client needs a name"},
		{"two names", "zimage_gateway {\n\tclient a b\n}", "wrong argument count"},
		{"upper case name", "zimage_gateway {\n\tclient Alice\n}", "client name 'Alice' is not a simple label"},
		{"duplicate name", "zimage_gateway {\n\tclient a {\n\t\tkey k1\n\t}\n\tclient a {\n\t\tkey k2\n\t}\n}", "duplicate client name 'a'"},
		{"unknown option", "zimage_gateway {\n\tclient a {\n\t\tapi_key k\n\t}\n}", "unrecognized zimage_gateway client option 'api_key'"},
		{"max_concurrent twice", "zimage_gateway {\n\tclient a {\n\t\tmax_concurrent 1\n\t\tmax_concurrent 2\n\t}\n}", "client max_concurrent already specified"},
		{"bad max_concurrent", "zimage_gateway {\n\tclient a {\n\t\tmax_concurrent many\n\t}\n}", "invalid max_concurrent 'many'"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			wantCaddyfileError(t, tc.src, tc.want)
		})
	}
}

// Load-time errors name the clients, never their keys.
func TestUnitClientsProvisionErrors(t *testing.T) {
	unitClearEnv(t)
	t.Setenv("ZIMAGE_UNIT_EMPTY", "")
	const up = `"upstream":{"url":"demo"}`
	for _, tc := range []struct {
		name, cfg string
		want      []string
	}{
		{"duplicate key across clients", `{` + up + `,"clients":[{"name":"alice","keys":["` + testAliceKey + `"]},{"name":"bob","keys":["` + testBobKey + `","` + testAliceKey + `"]}]}`,
			[]string{"clients 'alice' and 'bob' share a key"}},
		{"api_key key in a client", `{` + up + `,"api_keys":["` + testClientKey + `"],"clients":[{"name":"alice","keys":["` + testClientKey + `"]}]}`,
			[]string{"clients 'default' and 'alice' share a key"}},
		{"client without key", `{` + up + `,"clients":[{"name":"alice"}]}`, []string{"client 'alice' has no key"}},
		{"key resolves empty", `{` + up + `,"clients":[{"name":"alice","keys":["{env.ZIMAGE_UNIT_EMPTY}"]}]}`, []string{"client 'alice' has no key"}},
		{"default taken by api_key", `{` + up + `,"api_keys":["` + testClientKey + `"],"clients":[{"name":"default","keys":["` + testAliceKey + `"]}]}`,
			[]string{"'default' belongs to the keys of api_key"}},
		{"no_auth with clients", `{` + up + `,"no_auth":true,"clients":[{"name":"alice","keys":["` + testAliceKey + `"]}]}`,
			[]string{"no_auth", "client blocks"}},
		{"negative max_concurrent", `{` + up + `,"clients":[{"name":"alice","keys":["` + testAliceKey + `"],"max_concurrent":-1}]}`,
			[]string{"client 'alice'", "max_concurrent"}},
		{"bad name", `{` + up + `,"clients":[{"name":"Alice Smith","keys":["` + testAliceKey + `"]}]}`,
			[]string{"'Alice Smith' is not a simple label"}},
		{"duplicate name", `{` + up + `,"clients":[{"name":"a","keys":["` + testAliceKey + `"]},{"name":"a","keys":["` + testBobKey + `"]}]}`,
			[]string{"duplicate client name 'a'"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := unitProvision(t, tc.cfg)
			wantProvisionError(t, err, tc.want)
		})
	}
}

// Every key of every client is matched, and names the client
// it belongs to; api_key keys are "default", no_auth is "anonymous";
// GATEWAY_API_KEY applies only when neither api_key nor a client gives a
// key; every key is scrubbed.
func TestUnitClientsAuthorize(t *testing.T) {
	unitClearEnv(t)
	t.Setenv("GATEWAY_API_KEY", "env-key")
	t.Setenv("ZIMAGE_UNIT_ALICE", testAliceKey2)
	g, err := unitProvision(t, `{"upstream":{"url":"demo"},"api_keys":["`+testClientKey+`"],"clients":[
		{"name":"alice","keys":["`+testAliceKey+`","{env.ZIMAGE_UNIT_ALICE}","`+testAliceKey+`"],"max_concurrent":1},
		{"name":"bob","keys":["`+testBobKey+`"]}]}`)
	if err != nil {
		t.Fatal(err)
	}
	for key, want := range map[string]string{
		testClientKey: "default", testAliceKey: "alice", testAliceKey2: "alice", testBobKey: "bob",
		"env-key": "", "": "", testBobKey + "x": "", strings.ToUpper(testBobKey): "", "{env.ZIMAGE_UNIT_ALICE}": "",
	} {
		if got := g.authorize(unitBearer(key)).label(); got != want {
			t.Errorf("key %q is client %q, want %q", key, got, want)
		}
	}
	for _, s := range []string{testClientKey, testAliceKey, testAliceKey2, testBobKey} {
		if got := g.scrub.Replace("echo " + s); got != "echo [redacted]" {
			t.Errorf("scrubber leaves %q", got)
		}
	}

	// clients alone: GATEWAY_API_KEY is no client's key
	g, err = unitProvision(t, `{"upstream":{"url":"demo"},"clients":[{"name":"bob","keys":["`+testBobKey+`"]}]}`)
	if err != nil {
		t.Fatal(err)
	}
	if g.authorize(unitBearer("env-key")) != nil || g.authorize(unitBearer(testBobKey)).label() != "bob" {
		t.Errorf("with clients only, GATEWAY_API_KEY must not be accepted and bob's key must")
	}
	// nothing configured: GATEWAY_API_KEY is the client "default"
	g, err = unitProvision(t, `{"upstream":{"url":"demo"}}`)
	if err != nil {
		t.Fatal(err)
	}
	if got := g.authorize(unitBearer("env-key")).label(); got != "default" {
		t.Errorf("GATEWAY_API_KEY is client %q, want default", got)
	}
	// no_auth: everyone is anonymous
	g, err = unitProvision(t, `{"upstream":{"url":"demo"},"no_auth":true}`)
	if err != nil {
		t.Fatal(err)
	}
	if got := g.authorize(unitBearer("")).label(); got != "anonymous" {
		t.Errorf("no_auth: client %q, want anonymous", got)
	}
}

// ---- through Caddy ----

// clientsSite is a site with the default key, alice (two keys) and bob;
// clientLines go into alice's block, upstream lines into the upstream's.
func clientsSite(up *fakeUpstream, upstream, aliceLines string) string {
	return opsSite(up.endpoint(), nil, "timeout 10s\n\t\t"+upstream, fmt.Sprintf(`client alice {
		key %s %s
		%s
	}
	client bob {
		key %s
	}
	stream_keepalive 50ms`, testAliceKey, testAliceKey2, aliceLines, testBobKey)) + "\nmetrics /metrics"
}

// as is a request header pair that sends key.
func as(key string) []string { return []string{"Authorization", "Bearer " + key} }

// TestClientsAttribution (docs/design.md#clients-quotas): each answer counts once under the
// client whose key it carried (both of alice's keys are alice), by
// endpoint and code, a stream that fails under the code of its error
// event; a wrong key is no client's; generation lines name the client.
func TestClientsAttribution(t *testing.T) {
	up := newFakeUpstream(t)
	startCaddy(t, clientsSite(up, "", ""))
	before, mark := scrape(t), markLog(t)

	for _, tc := range []struct {
		method, path, body string
		key                string
		status             int
	}{
		{http.MethodGet, "/v1/models", "", testAliceKey, 200},
		{http.MethodPost, "/v1/chat/completions", chatJSON("alice's cat", 1301, ""), testAliceKey2, 200},
		{http.MethodPost, "/v1/images/generations", `{"prompt":"alice's dogs","seed":1302,"n":2}`, testAliceKey, 200},
		{http.MethodPost, "/v1/chat/completions", `{"model":"nope","prompt":"x"}`, testBobKey, 404},
		{http.MethodPost, "/v1/chat/completions", chatJSON("bob streams", 1310, `,"stream":true`), testBobKey, 200},
		{http.MethodPost, "/v1/chat/completions", chatJSON("the default key", 1304, ""), testClientKey, 200},
		{http.MethodPost, "/v1/chat/completions", chatJSON("nobody", 1305, ""), "sk-wrong", 401},
	} {
		if status, _, body := do(t, tc.method, tc.path, tc.body, as(tc.key)...); status != tc.status {
			t.Fatalf("%s %s: status %d, want %d: %s", tc.method, tc.path, status, tc.status, body)
		}
	}
	// a stream whose generation fails: its HTTP status is 200, its outcome 502
	up.setHandler(failWith(500, `{"error":"boom"}`))
	s := send(context.Background(), http.MethodPost, "/v1/chat/completions", chatJSON("bob's stream fails", 1306, `,"stream":true`), as(testBobKey)...)
	if s.status != 200 || !strings.Contains(string(s.body), `"code":"upstream_error"`) {
		t.Fatalf("failing stream: status %d: %s", s.status, s.body)
	}

	after := scrape(t)
	want := map[[3]string]float64{
		{"alice", "models", "200"}:             1,
		{"alice", "chat_completions", "200"}:   1,
		{"alice", "images_generations", "200"}: 1, // one request for n=2
		{"bob", "chat_completions", "404"}:     1,
		{"bob", "chat_completions", "200"}:     1,
		{"bob", "chat_completions", "502"}:     1,
		{"default", "chat_completions", "200"}: 1,
	}
	// and nothing else: the 401 is no client's
	total := 0.0
	for key, v := range after.values {
		if strings.HasPrefix(key, "caddy_zimage_client_requests_total{") {
			total += v - before.values[key]
		}
	}
	for k, w := range want {
		if d := after.delta(before, "caddy_zimage_client_requests_total", "client", k[0], "endpoint", k[1], "code", k[2]); d != w {
			t.Errorf("client_requests_total{client=%q,endpoint=%q,code=%q} grew by %v, want %v", k[0], k[1], k[2], d, w)
		}
	}
	if total != 7 {
		t.Errorf("client_requests_total grew by %v in all, want 7 (the 401 is no client's)", total)
	}
	if after.types["caddy_zimage_client_requests_total"] != "counter" {
		t.Errorf("type %q, want counter", after.types["caddy_zimage_client_requests_total"])
	}
	for seed, client := range map[int]string{1301: "alice", 1302: "alice", 1303: "alice", 1310: "bob", 1304: "default", 1306: "bob"} {
		lines := mark.find(t, "generation", withSeed(seed))
		if len(lines) != 1 || lines[0]["client"] != client {
			t.Errorf("generation lines for seed %d: %v, want one with client %s", seed, lines, client)
		}
	}
	for _, l := range mark.lines(t) {
		for _, k := range []string{testAliceKey, testAliceKey2, testBobKey} {
			if strings.Contains(fmt.Sprint(l), k) {
				t.Fatalf("a client key reached the log: %v", l)
			}
		}
	}
}

// TestClientsAnonymous (docs/design.md#clients-quotas): under no_auth every request is the
// client "anonymous".
func TestClientsAnonymous(t *testing.T) {
	up := newFakeUpstream(t)
	startCaddy(t, fmt.Sprintf("zimage_gateway {\n\tno_auth\n\tupstream %s {\n\t\tapi_key %s\n\t}\n\tenhance off\n}\nmetrics /metrics", up.endpoint(), testSDKey))
	before, mark := scrape(t), markLog(t)
	if status, _, body := do(t, http.MethodPost, "/v1/chat/completions", chatJSON("anyone", 1401, ""), "Authorization", ""); status != http.StatusOK {
		t.Fatalf("status %d: %s", status, body)
	}
	if d := scrape(t).delta(before, "caddy_zimage_client_requests_total", "client", "anonymous", "endpoint", "chat_completions", "code", "200"); d != 1 {
		t.Errorf("anonymous requests counted %v, want 1", d)
	}
	if l := mark.find(t, "generation", withSeed(1401)); len(l) != 1 || l[0]["client"] != "anonymous" {
		t.Errorf("generation lines %v, want client anonymous", l)
	}
}

// TestClientsMaxConcurrent (docs/design.md#clients-quotas): alice may run one generation at
// once. While hers runs, her next requests (chat, a stream, the Images
// API) are answered 429 with Retry-After at once, even with upstream slots
// free and even while the shared queue has a waiter, whose place they
// never take; n beyond her limit is a 400; bob is served meanwhile; once
// hers finishes, alice is served again.
func TestClientsMaxConcurrent(t *testing.T) {
	up := newFakeUpstream(t)
	g := newGate(t)
	up.setHandler(g.handler)
	startCaddy(t, clientsSite(up, "max_concurrent 2\n\t\tqueue_timeout 30s", "max_concurrent 1"))
	before := scrape(t)
	rejected := func(what string, r result) {
		t.Helper()
		if r.err != nil || r.status != http.StatusTooManyRequests || r.header.Get("Retry-After") == "" {
			t.Fatalf("%s: status %d, Retry-After %q, %v: %s", what, r.status, r.header.Get("Retry-After"), r.err, r.body)
		}
		var eb errorBody
		if json.Unmarshal(r.body, &eb) != nil || eb.Error.Code != "rate_limit_exceeded" || !strings.Contains(eb.Error.Message, "alice") {
			t.Errorf("%s: error %s, want rate_limit_exceeded naming the client", what, r.body)
		}
	}
	ctx := context.Background()

	alice1 := sendAsync(http.MethodPost, "/v1/chat/completions", chatJSON("alice holds her slot", 1501, ""), as(testAliceKey)...)
	waitFor(t, "alice's generation at the fake", func() bool { return up.active.Load() == 1 })
	rejected("alice's second, an upstream slot free", send(ctx, http.MethodPost, "/v1/chat/completions", chatJSON("alice again", 1502, ""), as(testAliceKey2)...))

	bob1 := sendAsync(http.MethodPost, "/v1/chat/completions", chatJSON("bob is served", 1503, ""), as(testBobKey)...)
	waitFor(t, "bob's generation beside alice's", func() bool { return up.active.Load() == 2 })
	bob2 := sendAsync(http.MethodPost, "/v1/chat/completions", chatJSON("bob waits", 1504, ""), as(testBobKey)...)
	waitFor(t, "bob's second in the shared queue", func() bool { return unitQueueLen() == 1 })

	rejected("alice's chat, the queue busy", send(ctx, http.MethodPost, "/v1/chat/completions", chatJSON("alice once more", 1505, ""), as(testAliceKey)...))
	rejected("alice's stream", send(ctx, http.MethodPost, "/v1/chat/completions", chatJSON("alice streams", 1506, `,"stream":true`), as(testAliceKey)...))
	rejected("alice's images", send(ctx, http.MethodPost, "/v1/images/generations", `{"prompt":"alice's image","seed":1507}`, as(testAliceKey)...))
	if n := unitQueueLen(); n != 1 {
		t.Errorf("%d in the shared queue, want bob's alone", n)
	}
	r := send(ctx, http.MethodPost, "/v1/images/generations", `{"prompt":"two","n":2}`, as(testAliceKey)...)
	if var400 := apiErr(t, r.body); r.status != http.StatusBadRequest || var400.Param == nil || *var400.Param != "n" {
		t.Errorf("n=2 for a client limited to 1: status %d: %s", r.status, r.body)
	}

	g.open()
	for name, ch := range map[string]<-chan result{"alice": alice1, "bob": bob1, "bob's second": bob2} {
		if r := await(t, ch); r.status != http.StatusOK {
			t.Errorf("%s: status %d: %s", name, r.status, r.body)
		}
	}
	if status, _, body := do(t, http.MethodPost, "/v1/chat/completions", chatJSON("alice's turn again", 1508, ""), as(testAliceKey)...); status != http.StatusOK {
		t.Errorf("alice after her generation finished: status %d: %s", status, body)
	}
	if got := seeds(up.Calls()); len(got) != 4 {
		t.Errorf("upstream calls with seeds %v, want alice's two and bob's two", got)
	}
	after := scrape(t)
	for _, tc := range []struct {
		client, endpoint, code string
		want                   float64
	}{
		{"alice", "chat_completions", "429", 3},
		{"alice", "images_generations", "429", 1},
		{"alice", "images_generations", "400", 1},
		{"alice", "chat_completions", "200", 2},
		{"bob", "chat_completions", "200", 2},
	} {
		if d := after.delta(before, "caddy_zimage_client_requests_total", "client", tc.client, "endpoint", tc.endpoint, "code", tc.code); d != tc.want {
			t.Errorf("client_requests_total{%s,%s,%s} grew by %v, want %v", tc.client, tc.endpoint, tc.code, d, tc.want)
		}
	}
}

// TestClientsDuplicateKeysRejectedAtLoad (docs/design.md#clients-quotas): a key given to two
// clients fails `caddy validate`, naming both clients and not the key.
func TestClientsDuplicateKeysRejectedAtLoad(t *testing.T) {
	t.Parallel()
	src := fmt.Sprintf(`{
	admin off
}
:0 {
	zimage_gateway {
		api_key %s
		client alice {
			key %s
		}
		client bob {
			key %s %s
		}
		upstream demo
	}
}`, testClientKey, testAliceKey, testBobKey, testAliceKey)
	cfgJSON := unitAdapt(t, string(caddyfile.Format([]byte(src))))
	var cfg caddy.Config
	if err := json.Unmarshal(cfgJSON, &cfg); err != nil {
		t.Fatal(err)
	}
	err := caddy.Validate(&cfg)
	if err == nil || !strings.Contains(err.Error(), "clients 'alice' and 'bob' share a key") {
		t.Fatalf("validate: %v, want the shared key named by its clients", err)
	}
	for _, s := range testSecrets {
		if strings.Contains(err.Error(), s) {
			t.Errorf("the error shows a key: %v", err)
		}
	}
}

// ---- the README's caddy-ratelimit recipe ----

// stubRateLimit stands in for mholt/caddy-ratelimit's rate_limit
// directive, which this module does not depend on: it parses the syntax
// the plugin documents (zones with key, window and events), so that the
// README's snippet adapts in a test, with its directive order.
type stubRateLimit struct {
	Zones map[string]map[string]string `json:"rate_limits,omitempty"`
}

func (stubRateLimit) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{ID: "http.handlers.rate_limit", New: func() caddy.Module { return new(stubRateLimit) }}
}

func (stubRateLimit) ServeHTTP(w http.ResponseWriter, r *http.Request, next caddyhttp.Handler) error {
	return next.ServeHTTP(w, r)
}

func init() {
	// in the test binary only, where the real plugin is never linked
	caddy.RegisterModule(stubRateLimit{})
	httpcaddyfile.RegisterHandlerDirective("rate_limit", func(h httpcaddyfile.Helper) (caddyhttp.MiddlewareHandler, error) {
		rl := stubRateLimit{Zones: map[string]map[string]string{}}
		h.Next()
		if h.NextArg() {
			return nil, h.ArgErr()
		}
		for n := h.Nesting(); h.NextBlock(n); {
			if h.Val() != "zone" || !h.NextArg() {
				return nil, h.Errf("stub rate_limit: want zone <name> { … }, got %s", h.Val())
			}
			zone := map[string]string{}
			rl.Zones[h.Val()] = zone
			for n := h.Nesting(); h.NextBlock(n); {
				opt := h.Val()
				if opt != "key" && opt != "window" && opt != "events" || !h.NextArg() {
					return nil, h.Errf("stub rate_limit: unknown or empty zone option %s", opt)
				}
				zone[opt] = h.Val()
			}
			if zone["key"] == "" || zone["window"] == "" || zone["events"] == "" {
				return nil, h.Err("stub rate_limit: a zone needs key, window and events")
			}
		}
		return rl, nil
	})
}

// The README's per-key request rate recipe is a valid Caddyfile, and with
// a stand-in for the plugin it adapts: rate_limit runs before the gateway,
// keyed by the Authorization header.
func TestUnitReadmeRateLimitSnippet(t *testing.T) {
	t.Parallel()
	raw, err := os.ReadFile("README.md")
	if err != nil {
		t.Fatal(err)
	}
	_, section, ok := strings.Cut(string(raw), "### Per-key request rates")
	if !ok {
		t.Fatal("README has no per-key request rates section")
	}
	src := fenced(t, section, "```caddy\n")
	if _, err := caddyfile.Parse("README", []byte(src)); err != nil {
		t.Fatalf("the snippet is not a valid Caddyfile: %v", err)
	}
	cfg, warnings, err := caddyconfig.GetAdapter("caddyfile").Adapt([]byte(src), nil)
	if err != nil || len(warnings) > 0 {
		t.Fatalf("adapting the snippet: %v %v", err, warnings)
	}
	names := unitHandlerNames(cfg)
	rl, gw := unitIndexOf(names, "rate_limit"), unitIndexOf(names, "zimage_gateway")
	if rl < 0 || gw < 0 || rl > gw {
		t.Fatalf("handlers %v: want rate_limit before zimage_gateway", names)
	}
	if !strings.Contains(string(cfg), `"key":"{http.request.header.Authorization}"`) {
		t.Errorf("the zone is not keyed by the client's key: %s", cfg)
	}
	var g Gateway
	if err := json.Unmarshal(unitFindHandler(t, cfg, "zimage_gateway"), &g); err != nil || len(g.Clients) == 0 {
		t.Errorf("the gateway of the snippet: %+v, %v", g, err)
	}
}

// The JSON config mirrors the account and client
// blocks field by field.
func TestUnitAccountsClientsAdaptJSON(t *testing.T) {
	caddytest.AssertAdapt(t, `:8080 {
	zimage_gateway {
		client alice {
			key {env.ALICE_KEY} k2
			max_concurrent 2
		}
		upstream {
			account main {
				api_key {env.SD_KEY_MAIN}
				max_concurrent 4
				low_points 500
			}
			account spare {
				api_key {env.SD_KEY_SPARE}
			}
		}
	}
}`, "caddyfile", `{
	"apps": {
		"http": {
			"servers": {
				"srv0": {
					"listen": [
						":8080"
					],
					"routes": [
						{
							"handle": [
								{
									"clients": [
										{
											"keys": [
												"{env.ALICE_KEY}",
												"k2"
											],
											"max_concurrent": 2,
											"name": "alice"
										}
									],
									"handler": "zimage_gateway",
									"upstream": {
										"accounts": [
											{
												"api_key": "{env.SD_KEY_MAIN}",
												"low_points": 500,
												"max_concurrent": 4,
												"name": "main"
											},
											{
												"api_key": "{env.SD_KEY_SPARE}",
												"name": "spare"
											}
										]
									}
								}
							]
						}
					]
				}
			}
		}
	}
}`)
}

func TestIntegAuth(t *testing.T) {
	const second, third = "sk-second-client-key", "sk-third-client-key"
	up := newFakeUpstream(t)
	// keys on one line and on a repeated line
	startCaddy(t, itSite(up, itConfig{gateway: "api_key " + second + "\n\tapi_key " + third}))
	routes := []struct{ method, path, body string }{
		{http.MethodGet, "/v1/models", ""},
		{http.MethodPost, "/v1/chat/completions", `{"messages":[{"role":"user","content":"a cat"}]}`},
	}
	for _, tc := range []struct {
		name string
		auth string
		ok   bool
	}{
		{"missing", "", false},
		{"wrong key", "Bearer sk-wrong", false},
		{"key with a suffix", "Bearer " + testClientKey + "x", false},
		{"key prefix", "Bearer " + testClientKey[:10], false},
		{"no scheme", testClientKey, false},
		{"basic scheme", "Basic " + testClientKey, false},
		{"first key", "Bearer " + testClientKey, true},
		{"second key", "Bearer " + second, true},
		{"third key", "Bearer " + third, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			for _, rt := range routes {
				n := len(up.Calls())
				status, hdr, body := do(t, rt.method, rt.path, rt.body, "Authorization", tc.auth)
				if tc.ok {
					if status != http.StatusOK {
						t.Errorf("%s %s: status %d, want 200: %s", rt.method, rt.path, status, body)
					}
					continue
				}
				e := itWantErr(t, status, hdr, body, http.StatusUnauthorized, "invalid_api_key")
				if e.Type != "invalid_request_error" {
					t.Errorf("type %q", e.Type)
				}
				if c := itCallsSince(up, n); len(c) != 0 {
					t.Errorf("an unauthorized request reached the upstream: %+v", c)
				}
			}
		})
	}
}

func TestIntegNoAuth(t *testing.T) {
	t.Setenv("GATEWAY_API_KEY", "")
	up := newFakeUpstream(t)
	startCaddy(t, fmt.Sprintf("zimage_gateway {\n\tno_auth\n\tupstream %s {\n\t\tapi_key %s\n\t}\n\tenhance off\n}", up.endpoint(), testSDKey))
	status, _, body := do(t, http.MethodGet, "/v1/models", "", "Authorization", "")
	if status != http.StatusOK {
		t.Fatalf("models without a key under no_auth: %d %s", status, body)
	}
	status, _, body = do(t, http.MethodPost, "/v1/chat/completions", `{"messages":[{"role":"user","content":"a cat"}]}`, "Authorization", "")
	if status != http.StatusOK {
		t.Fatalf("chat without a key under no_auth: %d %s", status, body)
	}
	if c := itOnlyCall(t, up, 0); c.Auth != "Bearer "+testSDKey || c.Body.Prompt != "a cat" {
		t.Errorf("upstream call %+v", c)
	}
}
