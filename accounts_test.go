package zimage

// Many upstream accounts (docs/design.md#accounts): the account blocks in the
// Caddyfile and at Provision, and the helpers of the accounts' integration
// tests (a real Caddy against a fake service that tells the accounts apart
// by their keys), which account_pool_test.go, failover_test.go and
// points_test.go use.

import (
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"reflect"
	"strings"
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

	// more accounts than an explicit retries may name: the default still
	// lets each be tried once, and does not fail the load
	var many []string
	for i := range 12 {
		many = append(many, fmt.Sprintf(`{"name":"a%d","api_key":"%s-%d"}`, i, testAccountKeyA, i))
	}
	g, err = unitProvision(t, `{"api_keys":["`+testClientKey+`"],"upstream":{"url":"https://sd.example/gen","accounts":[`+strings.Join(many, ",")+`]}}`)
	if err != nil {
		t.Fatalf("12 accounts without retries: %v", err)
	}
	if g.accounts.retries != 11 {
		t.Errorf("12 accounts: retries %d, want 11 (each account once)", g.accounts.retries)
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

func btoi(b bool) int {
	if b {
		return 1
	}
	return 0
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

// grewSince is how much a series grew since before.
func grewSince(t *testing.T, before scrapeResult, name string, labels ...string) float64 {
	t.Helper()
	return scrape(t).delta(before, name, labels...)
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
