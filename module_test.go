package zimage

import (
	"context"
	"crypto/sha256"
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
)

// unitClearEnv unsets, for one test, every variable the worker read, so
// the machine's environment cannot leak into a test.
func unitClearEnv(t *testing.T) {
	t.Helper()
	for _, k := range []string{"GATEWAY_API_KEY", "SD_API_KEY", "ENHANCE_OPENAI_API_KEY", "ENHANCE_OPENAI_BASE_URL", "ENHANCE_OPENAI_MODEL"} {
		t.Setenv(k, "")
	}
}

// unitProvision fills a Gateway from a JSON handler config, as Caddy does,

// wantCaddyfileError parses src and requires an error that contains want
// and names the file and line (Testfile:N), as d.Errf errors do.
func wantCaddyfileError(t *testing.T, src, want string) {
	t.Helper()
	var g Gateway
	err := g.UnmarshalCaddyfile(caddyfile.NewTestDispenser(src))
	if err == nil {
		t.Fatalf("UnmarshalCaddyfile(%q) succeeded, want an error containing %q", src, want)
	}
	if !strings.Contains(err.Error(), want) {
		t.Fatalf("error %q, want it to contain %q", err, want)
	}
	if !strings.Contains(err.Error(), "Testfile:") {
		t.Errorf("error %q does not name the file and line", err)
	}
}

// wantProvisionError checks a load error: there is one, it names every
// piece of want (what the user must change), and it shows no key.
func wantProvisionError(t *testing.T, err error, want []string) {
	t.Helper()
	if err == nil {
		t.Fatal("Provision succeeded, want an error")
	}
	for _, w := range want {
		if !strings.Contains(err.Error(), w) {
			t.Errorf("error %q does not mention %q", err, w)
		}
	}
	for _, s := range testSecrets {
		if strings.Contains(err.Error(), s) {
			t.Errorf("error %q contains a configured secret", err)
		}
	}
}

// and provisions it with a fresh context.
func unitProvision(t *testing.T, cfg string) (*Gateway, error) {
	t.Helper()
	g := new(Gateway)
	if err := json.Unmarshal([]byte(cfg), g); err != nil {
		t.Fatalf("config %s: %v", cfg, err)
	}
	ctx, cancel := caddy.NewContext(caddy.Context{Context: t.Context()})
	t.Cleanup(cancel)
	err := g.Provision(ctx)
	// as Caddy does: Cleanup follows a failed Provision too, which may
	// have taken limiters before it failed
	t.Cleanup(func() { _ = g.Cleanup() })
	return g, err
}

func unitBearer(key string) *http.Request {
	r := httptest.NewRequest(http.MethodGet, "/v1/models", nil)
	if key != "" {
		r.Header.Set("Authorization", "Bearer "+key)
	}
	return r
}

// Config errors fail at load with a message naming the directive,
// and never echo a configured secret.
func TestUnitProvisionErrors(t *testing.T) {
	dir := t.TempDir()
	for _, tc := range []struct {
		name, cfg string
		env       map[string]string
		want      []string
	}{
		{"no client key", `{"upstream":{"url":"demo"}}`, nil,
			[]string{"api_key", "GATEWAY_API_KEY", "no_auth"}},
		{"client key resolves empty", `{"api_keys":["{env.ZIMAGE_UNIT_EMPTY}",""],"upstream":{"url":"demo"}}`, nil,
			[]string{"api_key", "GATEWAY_API_KEY", "no_auth"}},
		{"no upstream key", `{"api_keys":["` + testClientKey + `"]}`, nil,
			[]string{"upstream", "api_key", "SD_API_KEY", "upstream demo"}},
		{"upstream key resolves empty", `{"api_keys":["` + testClientKey + `"],"upstream":{"api_key":"{env.ZIMAGE_UNIT_EMPTY}"}}`, nil,
			[]string{"SD_API_KEY", "upstream demo"}},
		{"max_downloads below n", `{"no_auth":true,"upstream":{"url":"demo"},"max_downloads":3}`, nil,
			[]string{"max_downloads", "at least 4"}},
		{"duplicate model", `{"no_auth":true,"upstream":{"url":"demo"},"models":[{"name":"Z-Image"},{"name":"z-image"}]}`, nil,
			[]string{"model", "duplicate", "z-image"}},
		{"duplicate alias", `{"no_auth":true,"upstream":{"url":"demo"},"models":[{"name":"A","aliases":["dall-e-3"]},{"name":"B","aliases":["DALL-E-3"]}]}`, nil,
			[]string{"duplicate", "DALL-E-3"}},
		{"alias equals another model", `{"no_auth":true,"upstream":{"url":"demo"},"models":[{"name":"A"},{"name":"B","aliases":["a"]}]}`, nil,
			[]string{"duplicate", `"a"`}},
		{"model without name", `{"no_auth":true,"upstream":{"url":"demo"},"models":[{"name":" "}]}`, nil,
			[]string{"model", "name"}},
		{"model negative steps", `{"no_auth":true,"upstream":{"url":"demo"},"models":[{"name":"A","steps":-1}]}`, nil,
			[]string{"model A", "steps"}},
		{"model negative index", `{"no_auth":true,"upstream":{"url":"demo"},"models":[{"name":"A","model_index":-1}]}`, nil,
			[]string{"model A", "model_index"}},
		{"model cfg zero", `{"no_auth":true,"upstream":{"url":"demo"},"models":[{"name":"A","cfg":0}]}`, nil,
			[]string{"model A", "cfg"}},
		{"bad upstream URL scheme", `{"api_keys":["` + testClientKey + `"],"upstream":{"url":"ftp://sd.example/gen","api_key":"` + testSDKey + `"}}`, nil,
			[]string{"upstream", "invalid URL"}},
		{"upstream URL not absolute", `{"api_keys":["` + testClientKey + `"],"upstream":{"url":"sd.example/gen","api_key":"` + testSDKey + `"}}`, nil,
			[]string{"upstream", "invalid URL"}},
		{"upstream URL unparsable", `{"api_keys":["` + testClientKey + `"],"upstream":{"url":"http://[::1","api_key":"` + testSDKey + `"}}`, nil,
			[]string{"upstream", "invalid URL"}},
		{"upstream URL from env", `{"api_keys":["` + testClientKey + `"],"upstream":{"url":"{env.ZIMAGE_UNIT_URL}","api_key":"` + testSDKey + `"}}`,
			map[string]string{"ZIMAGE_UNIT_URL": "localhost:8080"}, []string{"upstream", "invalid URL"}},
		{"negative retries", `{"no_auth":true,"upstream":{"url":"demo","retries":-1}}`, nil,
			[]string{"upstream", "retries"}},
		{"too many retries", `{"no_auth":true,"upstream":{"url":"demo","retries":11}}`, nil,
			[]string{"upstream", "retries"}},
		{"negative max_concurrent", `{"no_auth":true,"upstream":{"url":"demo","max_concurrent":-1}}`, nil,
			[]string{"upstream", "max_concurrent"}},
		{"bad enhance base_url", `{"api_keys":["` + testClientKey + `"],"upstream":{"api_key":"` + testSDKey + `"},"enhance":{"api_key":"` + testLLMKey + `","base_url":"api.openai.com/v1"}}`, nil,
			[]string{"enhance", "base_url"}},
		{"bad enhance base_url from env", `{"api_keys":["` + testClientKey + `"],"upstream":{"api_key":"` + testSDKey + `"}}`,
			map[string]string{"ENHANCE_OPENAI_API_KEY": testLLMKey, "ENHANCE_OPENAI_BASE_URL": "file:///etc"}, []string{"enhance", "base_url"}},
		{"both system prompts", `{"no_auth":true,"upstream":{"url":"demo"},"enhance":{"api_key":"` + testLLMKey + `","system_prompt":"x","system_prompt_file":"/x"}}`, nil,
			[]string{"enhance", "system_prompt", "system_prompt_file"}},
		{"missing system prompt file", `{"no_auth":true,"upstream":{"url":"demo"},"enhance":{"api_key":"` + testLLMKey + `","system_prompt_file":"` + filepath.Join(dir, "missing.txt") + `"}}`, nil,
			[]string{"enhance", "system_prompt_file"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			unitClearEnv(t)
			for k, v := range tc.env {
				t.Setenv(k, v)
			}
			_, err := unitProvision(t, tc.cfg)
			wantProvisionError(t, err, tc.want)
		})
	}
}

// With nothing but the worker's environment variables, a bare
// zimage_gateway behaves like the worker.
func TestUnitProvisionEnvDefaults(t *testing.T) {
	unitClearEnv(t)
	t.Setenv("GATEWAY_API_KEY", " "+testClientKey+" ")
	t.Setenv("SD_API_KEY", testSDKey)
	t.Setenv("ENHANCE_OPENAI_API_KEY", testLLMKey)
	t.Setenv("ENHANCE_OPENAI_BASE_URL", "https://llm.example/compat/v1/")
	t.Setenv("ENHANCE_OPENAI_MODEL", "qwen-plus")
	g, err := unitProvision(t, `{}`)
	if err != nil {
		t.Fatal(err)
	}

	if ks := g.clients.keys; len(ks) != 1 || ks[0].digest != sha256.Sum256([]byte(testClientKey)) || g.clients.clients[0].name != "default" {
		t.Errorf("client keys: want exactly GATEWAY_API_KEY (trimmed)")
	}
	if g.authorize(unitBearer(testClientKey)) == nil || g.authorize(unitBearer("wrong")) != nil || g.authorize(unitBearer("")) != nil {
		t.Errorf("auth does not accept exactly GATEWAY_API_KEY")
	}

	ic, ok := g.upstream.(*imageClient)
	if !ok {
		t.Fatalf("upstream %T, want the image service client", g.upstream)
	}
	acc := g.accounts.accounts
	if ic.url.String() != defaultUpstreamURL || len(acc) != 1 || acc[0].name != "default" || acc[0].key != testSDKey || ic.timeout != 180*time.Second || g.accounts.retries != 1 {
		t.Errorf("upstream url %q timeout %s retries %d accounts %d (key from SD_API_KEY: %v)", ic.url.String(), ic.timeout, g.accounts.retries, len(acc), acc[0].key == testSDKey)
	}
	if g.accounts.limited {
		t.Errorf("a limit without max_concurrent")
	}

	e := g.enhancer
	if e == nil {
		t.Fatal("enhancement off although ENHANCE_OPENAI_API_KEY is set")
	}
	if e.url != "https://llm.example/compat/v1/chat/completions" || e.model != "qwen-plus" || e.key != testLLMKey ||
		e.timeout != 10*time.Second || e.system != defaultSystemPrompt {
		t.Errorf("enhancer url %q model %q timeout %s default prompt %v (key from env: %v)",
			e.url, e.model, e.timeout, e.system == defaultSystemPrompt, e.key == testLLMKey)
	}

	if g.StreamKeepalive != caddy.Duration(5*time.Second) || g.MaxBody != 1<<20 || g.MaxPromptLength != 20000 {
		t.Errorf("defaults keepalive %s max_body %d max_prompt_length %d", time.Duration(g.StreamKeepalive), g.MaxBody, g.MaxPromptLength)
	}
	if len(g.models) != 1 {
		t.Fatalf("%d models, want the one default", len(g.models))
	}
	m := g.models[0]
	if m.name != "Z-Image" || m.modelIndex != 5 || m.steps != 8 || m.cfg != 7 || m.negativePrompt != "" {
		t.Errorf("default model %+v", m)
	}
	var list struct {
		Object string
		Data   []modelObject
	}
	if err := json.Unmarshal(g.modelsJSON, &list); err != nil || list.Object != "list" || len(list.Data) != 1 ||
		list.Data[0].ID != "Z-Image" || list.Data[0].Object != "model" || list.Data[0].OwnedBy != "sd-exacg-gateway" || list.Data[0].Created <= 0 {
		t.Errorf("/v1/models answer %s", g.modelsJSON)
	}

	for _, s := range []string{testClientKey, testSDKey, testLLMKey} { // the three this config has
		if got := g.scrub.Replace("echo " + s); got != "echo [redacted]" {
			t.Errorf("scrubber leaves %q", got)
		}
	}
}

// The enhancer's own defaults apply when only its key is set.
func TestUnitProvisionEnhanceDefaults(t *testing.T) {
	for _, tc := range []struct {
		name, cfg string // cfg: extra JSON fields
		env       map[string]string
		on        bool
		url       string
		model     string
		timeout   time.Duration
	}{
		{"key from env only", ``, map[string]string{"ENHANCE_OPENAI_API_KEY": testLLMKey}, true,
			"https://api.openai.com/v1/chat/completions", "gpt-4o-mini", 10 * time.Second},
		{"no key: off", ``, map[string]string{"ENHANCE_OPENAI_BASE_URL": "https://llm.example/v1"}, false, "", "", 0},
		{"enhance off despite key", `"enhance":{"off":true}`, map[string]string{"ENHANCE_OPENAI_API_KEY": testLLMKey}, false, "", "", 0},
		{"configured wins over env", `"enhance":{"api_key":"` + testLLMKey + `","base_url":"http://127.0.0.1:1/v1","model":"m","timeout":3000000000}`,
			map[string]string{"ENHANCE_OPENAI_BASE_URL": "https://env.example/v1", "ENHANCE_OPENAI_MODEL": "env-model"}, true,
			"http://127.0.0.1:1/v1/chat/completions", "m", 3 * time.Second},
		{"empty-resolving values fall back", `"enhance":{"api_key":"{env.ZIMAGE_UNIT_EMPTY}","base_url":"{env.ZIMAGE_UNIT_EMPTY}","model":"{env.ZIMAGE_UNIT_EMPTY}"}`,
			map[string]string{"ENHANCE_OPENAI_API_KEY": testLLMKey, "ENHANCE_OPENAI_MODEL": "env-model"}, true,
			"https://api.openai.com/v1/chat/completions", "env-model", 10 * time.Second},
	} {
		t.Run(tc.name, func(t *testing.T) {
			unitClearEnv(t)
			t.Setenv("ZIMAGE_UNIT_EMPTY", "")
			for k, v := range tc.env {
				t.Setenv(k, v)
			}
			cfg := `{"no_auth":true,"upstream":{"url":"demo"}`
			if tc.cfg != "" {
				cfg += "," + tc.cfg
			}
			g, err := unitProvision(t, cfg+"}")
			if err != nil {
				t.Fatal(err)
			}
			if (g.enhancer != nil) != tc.on {
				t.Fatalf("enhancer %v, want on %v", g.enhancer != nil, tc.on)
			}
			if !tc.on {
				return
			}
			e := g.enhancer
			if e.url != tc.url || e.model != tc.model || e.timeout != tc.timeout || e.key != testLLMKey {
				t.Fatalf("enhancer url %q model %q timeout %s (key right: %v), want %q %q %s",
					e.url, e.model, e.timeout, e.key == testLLMKey, tc.url, tc.model, tc.timeout)
			}
		})
	}
}

// {env.NAME} placeholders resolve at Provision, and a value that
// resolves to nothing falls back to the default.
func TestUnitProvisionPlaceholders(t *testing.T) {
	unitClearEnv(t)
	t.Setenv("ZIMAGE_UNIT_CLIENT", testClientKey)
	t.Setenv("ZIMAGE_UNIT_SD", testSDKey)
	t.Setenv("ZIMAGE_UNIT_URL", "http://127.0.0.1:1/api/v1/generate_image")
	t.Setenv("ZIMAGE_UNIT_LLM", testLLMKey)
	t.Setenv("ZIMAGE_UNIT_BASE", "http://127.0.0.1:2/v1")
	t.Setenv("ZIMAGE_UNIT_MODEL", "deepseek-chat")
	g, err := unitProvision(t, `{
		"api_keys": ["{env.ZIMAGE_UNIT_CLIENT}", "second-{env.ZIMAGE_UNIT_MODEL}"],
		"upstream": {"url": "{env.ZIMAGE_UNIT_URL}", "api_key": "{env.ZIMAGE_UNIT_SD}", "max_concurrent": 2},
		"enhance": {"api_key": "{env.ZIMAGE_UNIT_LLM}", "base_url": "{env.ZIMAGE_UNIT_BASE}", "model": "{env.ZIMAGE_UNIT_MODEL}"}
	}`)
	if err != nil {
		t.Fatal(err)
	}
	if g.authorize(unitBearer(testClientKey)) == nil || g.authorize(unitBearer("second-deepseek-chat")) == nil || g.authorize(unitBearer("{env.ZIMAGE_UNIT_CLIENT}")) != nil {
		t.Errorf("client keys not resolved from placeholders")
	}
	ic := g.upstream.(*imageClient)
	if key := g.accounts.accounts[0].key; ic.url.String() != "http://127.0.0.1:1/api/v1/generate_image" || key != testSDKey {
		t.Errorf("upstream url %q (key resolved: %v)", ic.url.String(), key == testSDKey)
	}
	if n := unitLimit(g.accounts.accounts[0]); !g.accounts.limited || n != 2 || g.accounts.queueTimeout != 180*time.Second {
		t.Errorf("limit %d queue timeout %s, want 2 slots and the upstream timeout", n, g.accounts.queueTimeout)
	}
	e := g.enhancer
	if e == nil || e.url != "http://127.0.0.1:2/v1/chat/completions" || e.model != "deepseek-chat" || e.key != testLLMKey {
		t.Errorf("enhancer %+v not resolved from placeholders", e)
	}
	if g.fetcher == nil || g.fetcher.allowed(unitURL(t, "http://127.0.0.1:1/x.png")) != nil {
		t.Errorf("image downloads not allowed from the resolved upstream host")
	}
}

// An empty-resolving value counts as unset, for every key and URL.
func TestUnitProvisionEmptyFallsBack(t *testing.T) {
	unitClearEnv(t)
	t.Setenv("ZIMAGE_UNIT_EMPTY", "  ")
	t.Setenv("GATEWAY_API_KEY", testClientKey)
	t.Setenv("SD_API_KEY", testSDKey)
	g, err := unitProvision(t, `{
		"api_keys": ["{env.ZIMAGE_UNIT_EMPTY}", "{env.ZIMAGE_UNIT_NEVER_SET}"],
		"upstream": {"url": "{env.ZIMAGE_UNIT_EMPTY}", "api_key": "{env.ZIMAGE_UNIT_EMPTY}"}
	}`)
	if err != nil {
		t.Fatal(err)
	}
	if g.authorize(unitBearer(testClientKey)) == nil {
		t.Errorf("empty api_key values did not fall back to GATEWAY_API_KEY")
	}
	ic := g.upstream.(*imageClient)
	if key := g.accounts.accounts[0].key; ic.url.String() != defaultUpstreamURL || key != testSDKey {
		t.Errorf("upstream url %q (key from SD_API_KEY: %v), want the defaults", ic.url.String(), key == testSDKey)
	}
}

// Configured client keys replace GATEWAY_API_KEY rather than adding to it.
func TestUnitProvisionConfiguredKeysOnly(t *testing.T) {
	unitClearEnv(t)
	t.Setenv("GATEWAY_API_KEY", "env-key")
	g, err := unitProvision(t, `{"api_keys":["k1","k2"],"upstream":{"url":"demo"}}`)
	if err != nil {
		t.Fatal(err)
	}
	for key, want := range map[string]bool{"k1": true, "k2": true, "env-key": false, "k1 k2": false, "": false} {
		if got := g.authorize(unitBearer(key)) != nil; got != want {
			t.Errorf("authorized(%q) = %v, want %v", key, got, want)
		}
	}
}

// No_auth needs no key (docs/design.md#endpoints-and-errors); `upstream demo` needs no SD key,
// in any case, and serves placeholders.
func TestUnitProvisionNoAuthDemo(t *testing.T) {
	unitClearEnv(t)
	g, err := unitProvision(t, `{"no_auth":true,"upstream":{"url":"Demo"}}`)
	if err != nil {
		t.Fatal(err)
	}
	if _, demo := g.upstream.(demoGenerator); !demo {
		t.Fatalf("upstream %T, want the demo", g.upstream)
	}
	if g.authorize(unitBearer("")) == nil || g.authorize(unitBearer("anything")) == nil {
		t.Errorf("no_auth still checks keys")
	}
}

// Model settings and aliases resolve case-insensitively; the first model
// is the default.
func TestUnitProvisionModels(t *testing.T) {
	unitClearEnv(t)
	g, err := unitProvision(t, `{"no_auth":true,"upstream":{"url":"demo"},"models":[
		{"name":"Z-Image","aliases":["dall-e-3","gpt-image-1"]},
		{"name":"Anime","model_index":0,"steps":20,"cfg":4.5,"negative_prompt":"lowres"}]}`)
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name, want string
	}{
		{"", "Z-Image"}, {"  ", "Z-Image"}, {"z-image", "Z-Image"}, {"DALL-E-3", "Z-Image"}, {" gpt-image-1 ", "Z-Image"},
		{"anime", "Anime"}, {"dall-e-2", ""}, {"Z", ""},
	} {
		got := ""
		if m := g.lookupModel(tc.name); m != nil {
			got = m.name
		}
		if got != tc.want {
			t.Errorf("lookupModel(%q) = %q, want %q", tc.name, got, tc.want)
		}
	}
	a := g.lookupModel("Anime")
	if a.modelIndex != 0 || a.steps != 20 || a.cfg != 4.5 || a.negativePrompt != "lowres" {
		t.Errorf("Anime %+v", a)
	}
	var list modelList
	if err := json.Unmarshal(g.modelsJSON, &list); err != nil || len(list.Data) != 2 || list.Data[0].ID != "Z-Image" || list.Data[1].ID != "Anime" {
		t.Errorf("/v1/models %s, want the two names and no aliases", g.modelsJSON)
	}
}

// system_prompt_file is read at load.
func TestUnitProvisionSystemPromptFile(t *testing.T) {
	unitClearEnv(t)
	path := filepath.Join(t.TempDir(), "prompt.txt")
	if err := os.WriteFile(path, []byte("Only JSON, please."), 0o600); err != nil {
		t.Fatal(err)
	}
	cfg, _ := json.Marshal(map[string]any{"no_auth": true, "upstream": map[string]any{"url": "demo"},
		"enhance": map[string]any{"api_key": testLLMKey, "system_prompt_file": path}})
	g, err := unitProvision(t, string(cfg))
	if err != nil {
		t.Fatal(err)
	}
	if g.enhancer == nil || g.enhancer.system != "Only JSON, please." {
		t.Fatalf("enhancer %+v, want the file's prompt", g.enhancer)
	}
}

// Cleanup releases the shared limiter: a sibling with the same upstream
// shares it while both live, and a new one gets a fresh limiter after.
func TestUnitProvisionLimiterShared(t *testing.T) {
	unitClearEnv(t)
	const cfg = `{"no_auth":true,"upstream":{"url":"demo","max_concurrent":3,"queue_timeout":1000000000}}`
	a, err := unitProvision(t, cfg)
	if err != nil {
		t.Fatal(err)
	}
	b, err := unitProvision(t, cfg)
	if err != nil {
		t.Fatal(err)
	}
	la, lb := a.accounts.accounts[0].lim, b.accounts.accounts[0].lim
	if la == nil || la != lb || a.accounts.queueTimeout != time.Second {
		t.Fatalf("limiters %p %p (queue timeout %s), want one shared limiter", la, lb, a.accounts.queueTimeout)
	}
	if err := a.Cleanup(); err != nil {
		t.Fatal(err)
	}
	if err := b.Cleanup(); err != nil {
		t.Fatal(err)
	}
	c, err := unitProvision(t, cfg)
	if err != nil {
		t.Fatal(err)
	}
	if c.accounts.accounts[0].lim == la {
		t.Fatal("the limiter survived the Cleanup of every handler that used it")
	}
}

func unitURL(t *testing.T, s string) *url.URL {
	t.Helper()
	u, err := url.Parse(s)
	if err != nil {
		t.Fatal(err)
	}
	return u
}

// A load error, as Caddy reports it, names the module once: Caddy's own
// chain already says "provision http.handlers.zimage_gateway" or "parsing
// caddyfile tokens for 'zimage_gateway'".
func TestUnitLoadErrorNamesModuleOnce(t *testing.T) {
	unitClearEnv(t)
	ctx, cancel := caddy.NewContext(caddy.Context{Context: t.Context()})
	defer cancel()
	for _, raw := range []string{
		`{"no_auth":true,"upstream":{"url":"demo"},"models":[{"name":"A","cfg":99}]}`,
		`{"no_auth":true,"upstream":{"url":"demo"},"store":{"storage":{"module":"nosuch"}}}`,
		`{"no_auth":true,"upstream":{"url":"demo"},"default_response_format":"png"}`,
	} {
		_, err := ctx.LoadModuleByID("http.handlers.zimage_gateway", json.RawMessage(raw))
		if err == nil || strings.Count(err.Error(), "zimage_gateway:") != 1 {
			t.Errorf("loading %s: %v, want an error naming zimage_gateway once", raw, err)
		}
	}
	_, _, err := caddyconfig.GetAdapter("caddyfile").Adapt([]byte(":80 {\n\tzimage_gateway {\n\t\tmodel A {\n\t\t\ton_mismatch block\n\t\t}\n\t}\n}\n"), nil)
	if err == nil || strings.Count(err.Error(), "zimage_gateway") != 1 || !strings.Contains(err.Error(), "model A: invalid on_mismatch") {
		t.Errorf("adapting: %v, want an error naming zimage_gateway once", err)
	}
}

// TestOpsTwoSites: two gateways with different keys, models and upstreams
// work side by side in one Caddy, each with its own settings.
func TestOpsTwoSites(t *testing.T) {
	upA, upB := newFakeUpstream(t), newFakeUpstream(t)
	startCaddyRaw(t, twoSites(upA, upB, ""))
	hostA, hostB := fmt.Sprintf("a.localhost:%d", httpPort), fmt.Sprintf("b.localhost:%d", httpPort)

	for _, tc := range []struct {
		name, host, key, model, other string
		up                            *fakeUpstream
		sdKey                         string
		index                         int
	}{
		{"site a", hostA, testClientKey, "Model-A", "Model-B", upA, testSDKey, 3},
		{"site b", hostB, keyB, "Model-B", "Model-A", upB, sdKeyB, 7},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ctx := context.Background()
			auth := "Bearer " + tc.key
			r := send(ctx, http.MethodGet, "/v1/models", "", "Host", tc.host, "Authorization", auth)
			if r.status != http.StatusOK || !strings.Contains(string(r.body), `"id":"`+tc.model+`"`) || strings.Contains(string(r.body), tc.other) {
				t.Errorf("models: status %d: %s", r.status, r.body)
			}
			r = send(ctx, http.MethodPost, "/v1/chat/completions", `{"prompt":"side by side","seed":81}`, "Host", tc.host, "Authorization", auth)
			if r.status != http.StatusOK {
				t.Fatalf("chat: status %d: %s", r.status, r.body)
			}
			calls := tc.up.Calls()
			if len(calls) != 1 || calls[0].Auth != "Bearer "+tc.sdKey || calls[0].Body.ModelIndex != tc.index {
				t.Errorf("upstream calls %+v: want one with this site's key and model_index %d", calls, tc.index)
			}
			r = send(ctx, http.MethodPost, "/v1/chat/completions", `{"model":"`+tc.other+`","prompt":"x"}`, "Host", tc.host, "Authorization", auth)
			if r.status != http.StatusNotFound {
				t.Errorf("the other site's model: status %d, want 404", r.status)
			}
		})
	}
	t.Run("keys do not cross", func(t *testing.T) {
		for host, key := range map[string]string{hostA: keyB, hostB: testClientKey} {
			if r := send(context.Background(), http.MethodGet, "/v1/models", "", "Host", host, "Authorization", "Bearer "+key); r.status != http.StatusUnauthorized {
				t.Errorf("%s with the other site's key: status %d, want 401", host, r.status)
			}
		}
	})
}
