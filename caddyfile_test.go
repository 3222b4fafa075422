package zimage

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"reflect"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/caddyserver/caddy/v2/caddytest"
)

// Every sub-directive lands in the field the JSON config uses.
func TestUnitCaddyfileParse(t *testing.T) {
	// an unset {$VAR} leaves the sub-directive without argument
	t.Setenv("ZIMAGE_UNIT_SET", "from-env")
	os.Unsetenv("ZIMAGE_UNIT_UNSET")
	intp := func(n int) *int { return &n }
	fp := func(f float64) *float64 { return &f }
	for _, tc := range []struct {
		name, src string
		want      Gateway
	}{
		{"bare", `zimage_gateway`, Gateway{}},
		{"edit model, max_upload, max_downloads", `zimage_gateway {
			max_upload 5MiB
			max_downloads 12
			model Qwen-Image-Edit {
				model_index 19
				edit
			}
		}`, Gateway{MaxUpload: 5 << 20, MaxDownloads: 12, Models: []ModelConfig{{Name: "Qwen-Image-Edit", ModelIndex: intp(19), Edit: true}}}},
		{"answer forms and listed aliases", `zimage_gateway {
			default_response_format url
			list_aliases
			model Z-Image {
				alias gpt-image-1
				default_response_format b64_json
			}
		}`, Gateway{DefaultResponseFormat: "url", ListAliases: true, Models: []ModelConfig{{Name: "Z-Image", Aliases: []string{"gpt-image-1"}, DefaultResponseFormat: "b64_json"}}}},
		{"empty block", "zimage_gateway {\n}", Gateway{}},
		{"two keys", `zimage_gateway {
			api_key k1 k2
		}`, Gateway{APIKeys: []string{"k1", "k2"}}},
		{"api_key repeated", `zimage_gateway {
			api_key k1
			api_key k2 k3
		}`, Gateway{APIKeys: []string{"k1", "k2", "k3"}}},
		{"empty api_key", `zimage_gateway {
			api_key {$ZIMAGE_UNIT_UNSET}
		}`, Gateway{}},
		{"empty api_key beside a real one", `zimage_gateway {
			api_key
			api_key {$ZIMAGE_UNIT_SET}
		}`, Gateway{APIKeys: []string{"from-env"}}},
		{"placeholder kept for Provision", `zimage_gateway {
			api_key {env.GATEWAY_API_KEY}
		}`, Gateway{APIKeys: []string{"{env.GATEWAY_API_KEY}"}}},
		{"no_auth", `zimage_gateway {
			no_auth
		}`, Gateway{NoAuth: true}},
		{"upstream demo", `zimage_gateway {
			upstream demo
		}`, Gateway{Upstream: &UpstreamConfig{URL: "demo"}}},
		{"upstream env default", `zimage_gateway {
			upstream {$ZIMAGE_UNIT_UNSET:https://sd.example/gen} {
				api_key {$ZIMAGE_UNIT_UNSET}
			}
		}`, Gateway{Upstream: &UpstreamConfig{URL: "https://sd.example/gen"}}},
		{"upstream block without URL", `zimage_gateway {
			upstream {
				retries 0
			}
		}`, Gateway{Upstream: &UpstreamConfig{Retries: intp(0)}}},
		{"enhance off", `zimage_gateway {
			enhance off
		}`, Gateway{Enhance: &EnhanceConfig{Off: true}}},
		{"enhance block with empty values", `zimage_gateway {
			enhance {
				api_key {$ZIMAGE_UNIT_UNSET}
				base_url {$ZIMAGE_UNIT_UNSET}
				model
			}
		}`, Gateway{Enhance: &EnhanceConfig{}}},
		{"enhance system_prompt_file", `zimage_gateway {
			enhance {
				system_prompt_file /etc/zimage/prompt.txt
			}
		}`, Gateway{Enhance: &EnhanceConfig{SystemPromptFile: "/etc/zimage/prompt.txt"}}},
		{"sizes and durations", `zimage_gateway {
			stream_keepalive 1d
			max_body 1MB
			max_prompt_length 1
		}`, Gateway{StreamKeepalive: caddy.Duration(24 * time.Hour), MaxBody: 1000000, MaxPromptLength: 1}},
		{"everything", `zimage_gateway {
			api_key k1 k2
			api_key {$ZIMAGE_UNIT_SET}
			no_auth
			stream_keepalive 15s
			max_body 2MiB
			max_prompt_length 4000
			image_hosts img.example.com
			image_hosts cdn.example.com cdn2.example.com
			upstream https://sd.example/api/v1/generate_image {
				api_key {env.SD_API_KEY}
				timeout 2m
				max_concurrent 4
				queue_timeout 30s
				retries 3
			}
			enhance {
				api_key llm-key
				base_url https://llm.example/v1
				model qwen-plus
				timeout 8s
				system_prompt "Write prompts. Answer JSON."
			}
			model Z-Image {
				alias dall-e-3 gpt-image-1
				alias DALL-E-2
				model_index 5
				steps 8
				cfg 7
			}
			model Anime {
				model_index 0
				steps 20
				cfg 4.5
				negative_prompt "lowres, blurry"
			}
			model Bare
		}`, Gateway{
			APIKeys:         []string{"k1", "k2", "from-env"},
			NoAuth:          true,
			StreamKeepalive: caddy.Duration(15 * time.Second),
			MaxBody:         2 << 20,
			MaxPromptLength: 4000,
			ImageHosts:      []string{"img.example.com", "cdn.example.com", "cdn2.example.com"},
			Upstream: &UpstreamConfig{
				URL:           "https://sd.example/api/v1/generate_image",
				APIKey:        "{env.SD_API_KEY}",
				Timeout:       caddy.Duration(2 * time.Minute),
				MaxConcurrent: 4,
				QueueTimeout:  caddy.Duration(30 * time.Second),
				Retries:       intp(3),
			},
			Enhance: &EnhanceConfig{
				APIKey:       "llm-key",
				BaseURL:      "https://llm.example/v1",
				Model:        "qwen-plus",
				Timeout:      caddy.Duration(8 * time.Second),
				SystemPrompt: "Write prompts. Answer JSON.",
			},
			Models: []ModelConfig{
				{Name: "Z-Image", Aliases: []string{"dall-e-3", "gpt-image-1", "DALL-E-2"}, ModelIndex: intp(5), Steps: 8, CFG: fp(7)},
				{Name: "Anime", ModelIndex: intp(0), Steps: 20, CFG: fp(4.5), NegativePrompt: "lowres, blurry"},
				{Name: "Bare"},
			},
		}},
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
}

// Config errors fail at load with a message naming the directive,
// and carry the file and line.
func TestUnitCaddyfileErrors(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name, src, want string
	}{
		{"unknown option", "zimage_gateway {\n\tapi_keys k\n}", "unrecognized zimage_gateway option 'api_keys'"},
		{"bad default_response_format", "zimage_gateway {\n\tdefault_response_format base64\n}", "default_response_format must be url, b64_json or both"},
		{"bad model default_response_format", "zimage_gateway {\n\tmodel A {\n\t\tdefault_response_format png\n\t}\n}", "model A: default_response_format must be url, b64_json or both"},
		{"list_aliases with an argument", "zimage_gateway {\n\tlist_aliases on\n}", "wrong argument count"},
		{"unknown upstream option", "zimage_gateway {\n\tupstream {\n\t\tkey k\n\t}\n}", "unrecognized zimage_gateway upstream option 'key'"},
		{"unknown enhance option", "zimage_gateway {\n\tenhance {\n\t\tbase https://x\n\t}\n}", "unrecognized zimage_gateway enhance option 'base'"},
		{"unknown model option", "zimage_gateway {\n\tmodel A {\n\t\tsampler euler\n\t}\n}", "unrecognized zimage_gateway model option 'sampler'"},
		{"upstream option at top level", "zimage_gateway {\n\ttimeout 5s\n}", "unrecognized zimage_gateway option 'timeout'"},

		{"bad stream_keepalive", "zimage_gateway {\n\tstream_keepalive soon\n}", "invalid stream_keepalive 'soon'"},
		{"zero stream_keepalive", "zimage_gateway {\n\tstream_keepalive 0s\n}", "invalid stream_keepalive '0s'"},
		{"bad upstream timeout", "zimage_gateway {\n\tupstream {\n\t\ttimeout 5\n\t}\n}", "invalid timeout '5'"},
		{"negative upstream timeout", "zimage_gateway {\n\tupstream {\n\t\ttimeout -5s\n\t}\n}", "invalid timeout '-5s'"},
		{"bad queue_timeout", "zimage_gateway {\n\tupstream {\n\t\tqueue_timeout x\n\t}\n}", "invalid queue_timeout 'x'"},
		{"bad enhance timeout", "zimage_gateway {\n\tenhance {\n\t\ttimeout 10 s\n\t}\n}", "wrong argument count"},
		{"bad enhance timeout unit", "zimage_gateway {\n\tenhance {\n\t\ttimeout 10x\n\t}\n}", "invalid timeout '10x'"},
		{"missing duration", "zimage_gateway {\n\tstream_keepalive\n}", "wrong argument count"},

		{"bad max_concurrent", "zimage_gateway {\n\tupstream {\n\t\tmax_concurrent four\n\t}\n}", "invalid max_concurrent 'four'"},
		{"negative max_concurrent", "zimage_gateway {\n\tupstream {\n\t\tmax_concurrent -1\n\t}\n}", "invalid max_concurrent '-1'"},
		{"negative retries", "zimage_gateway {\n\tupstream {\n\t\tretries -1\n\t}\n}", "invalid retries '-1'"},
		{"fractional retries", "zimage_gateway {\n\tupstream {\n\t\tretries 1.5\n\t}\n}", "invalid retries '1.5'"},
		{"negative model_index", "zimage_gateway {\n\tmodel A {\n\t\tmodel_index -1\n\t}\n}", "invalid model_index '-1'"},
		{"zero steps", "zimage_gateway {\n\tmodel A {\n\t\tsteps 0\n\t}\n}", "invalid steps '0'"},
		{"bad cfg", "zimage_gateway {\n\tmodel A {\n\t\tcfg high\n\t}\n}", "invalid cfg 'high'"},
		{"zero cfg", "zimage_gateway {\n\tmodel A {\n\t\tcfg 0\n\t}\n}", "invalid cfg '0'"},
		{"cfg over 30", "zimage_gateway {\n\tmodel A {\n\t\tcfg 31\n\t}\n}", "invalid cfg '31'"},
		{"bad max_body", "zimage_gateway {\n\tmax_body lots\n}", "invalid max_body 'lots'"},
		{"zero max_body", "zimage_gateway {\n\tmax_body 0\n}", "invalid max_body '0'"},
		{"huge max_body", "zimage_gateway {\n\tmax_body 2GiB\n}", "invalid max_body '2GiB'"},
		{"zero max_prompt_length", "zimage_gateway {\n\tmax_prompt_length 0\n}", "invalid max_prompt_length '0'"},
		{"bad max_upload", "zimage_gateway {\n\tmax_upload big\n}", "invalid max_upload 'big'"},
		{"max_upload twice", "zimage_gateway {\n\tmax_upload 1MiB\n\tmax_upload 2MiB\n}", "max_upload already specified"},
		{"edit with an argument", "zimage_gateway {\n\tmodel A {\n\t\tedit yes\n\t}\n}", "wrong argument count"},
		{"max_downloads below 4", "zimage_gateway {\n\tmax_downloads 3\n}", "invalid max_downloads '3'"},

		{"duplicate model", "zimage_gateway {\n\tmodel Z-Image\n\tmodel Z-Image\n}", "duplicate model name 'Z-Image'"},
		{"duplicate model other case", "zimage_gateway {\n\tmodel Z-Image\n\tmodel z-image\n}", "duplicate model name 'z-image'"},
		{"model without name", "zimage_gateway {\n\tmodel {\n\t\tsteps 8\n\t}\n}", "model needs a name"},
		{"model option twice", "zimage_gateway {\n\tmodel A {\n\t\tsteps 8\n\t\tsteps 9\n\t}\n}", "steps already specified"},
		{"empty alias", "zimage_gateway {\n\tmodel A {\n\t\talias\n\t}\n}", "wrong argument count"},

		{"stray argument", "zimage_gateway extra", "wrong argument count"},
		{"stray argument before block", "zimage_gateway extra {\n}", "wrong argument count"},
		{"no_auth argument", "zimage_gateway {\n\tno_auth yes\n}", "wrong argument count"},
		{"upstream two URLs", "zimage_gateway {\n\tupstream https://a https://b\n}", "wrong argument count"},
		{"upstream api_key two values", "zimage_gateway {\n\tupstream {\n\t\tapi_key a b\n\t}\n}", "wrong argument count"},
		{"enhance off extra", "zimage_gateway {\n\tenhance off now\n}", "wrong argument count"},
		{"model two names", "zimage_gateway {\n\tmodel A B\n}", "wrong argument count"},
		{"max_body two values", "zimage_gateway {\n\tmax_body 1MiB 2MiB\n}", "wrong argument count"},
		{"empty image_hosts", "zimage_gateway {\n\timage_hosts\n}", "wrong argument count"},
		{"system_prompt two values", "zimage_gateway {\n\tenhance {\n\t\tsystem_prompt a b\n\t}\n}", "wrong argument count"},

		{"enhance on", "zimage_gateway {\n\tenhance on\n}", "enhance takes 'off' or a block, not 'on'"},
		{"upstream twice", "zimage_gateway {\n\tupstream demo\n\tupstream demo\n}", "upstream already specified"},
		{"enhance twice", "zimage_gateway {\n\tenhance off\n\tenhance off\n}", "enhance already specified"},
		{"stream_keepalive twice", "zimage_gateway {\n\tstream_keepalive 1s\n\tstream_keepalive 2s\n}", "stream_keepalive already specified"},
		{"upstream timeout twice", "zimage_gateway {\n\tupstream {\n\t\ttimeout 1s\n\t\ttimeout 2s\n\t}\n}", "upstream timeout already specified"},
		{"system prompt and file", "zimage_gateway {\n\tenhance {\n\t\tsystem_prompt hi\n\t\tsystem_prompt_file /x\n\t}\n}", "either system_prompt or system_prompt_file"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			wantCaddyfileError(t, tc.src, tc.want)
		})
	}
}

// unitHandlerNames lists the "handler" values of an adapted JSON config in
// document order, which is route order.
var unitHandlerField = regexp.MustCompile(`"handler":"([a-z_]+)"`)

func unitAdapt(t *testing.T, src string) []byte {
	t.Helper()
	out, warnings, err := caddyconfig.GetAdapter("caddyfile").Adapt([]byte(src), nil)
	if err != nil {
		t.Fatalf("adapting:\n%s\nerror: %v", src, err)
	}
	for _, w := range warnings {
		t.Errorf("adapt warning: %s:%d: %s", w.File, w.Line, w.Message)
	}
	return out
}

func unitHandlerNames(cfg []byte) []string {
	var names []string
	for _, m := range unitHandlerField.FindAllSubmatch(cfg, -1) {
		names = append(names, string(m[1]))
	}
	return names
}

// The directive orders itself, so a Caddyfile needs no global
// `order` line, and it comes before handlers that answer everything.
func TestUnitCaddyfileDirectiveOrder(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name, site string
		want       []string
	}{
		{"before respond", `
			respond "not an API path" 404
			zimage_gateway {
				api_key k
			}`, []string{"zimage_gateway", "static_response"}},
		{"before reverse_proxy", `
			reverse_proxy 127.0.0.1:9
			zimage_gateway {
				upstream demo
			}`, []string{"zimage_gateway", "reverse_proxy"}},
		{"after header, before file_server", `
			file_server
			zimage_gateway
			header X-Test yes`, []string{"headers", "zimage_gateway", "file_server"}},
		{"with a path matcher", `
			respond 404
			zimage_gateway /v1/* {
				no_auth
			}`, []string{"zimage_gateway", "static_response"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			// formatted, so that the only warnings would be about the gateway
			src := caddyfile.Format([]byte("{\n\tadmin off\n}\n:8080 {" + tc.site + "\n}\n"))
			cfg := unitAdapt(t, string(src))
			if got := unitHandlerNames(cfg); !reflect.DeepEqual(got, tc.want) {
				t.Fatalf("handlers in route order %v, want %v\nconfig: %s", got, tc.want, cfg)
			}
		})
	}
}

// The JSON config mirrors the Caddyfile field by field.
func TestUnitCaddyfileAdaptJSON(t *testing.T) {
	caddytest.AssertAdapt(t, `:8080 {
	zimage_gateway {
		api_key {env.GATEWAY_API_KEY}
		stream_keepalive 10s
		upstream https://sd.example/gen {
			api_key {env.SD_API_KEY}
			retries 0
		}
		enhance off
		model Z-Image {
			alias dall-e-3
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
									"api_keys": [
										"{env.GATEWAY_API_KEY}"
									],
									"enhance": {
										"off": true
									},
									"handler": "zimage_gateway",
									"models": [
										{
											"aliases": [
												"dall-e-3"
											],
											"name": "Z-Image"
										}
									],
									"stream_keepalive": 10000000000,
									"upstream": {
										"api_key": "{env.SD_API_KEY}",
										"retries": 0,
										"url": "https://sd.example/gen"
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

// Caddyfile.example adapts, and its gateway provisions, in the two modes
// its header documents, so the example cannot rot.
func TestUnitCaddyfileExample(t *testing.T) {
	src, err := os.ReadFile("Caddyfile.example")
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name     string
		env      map[string]string
		wantDemo bool
	}{
		{"demo", map[string]string{"SD_UPSTREAM": "demo", "GATEWAY_API_KEY": testClientKey, "SD_API_KEY": ""}, true},
		{"real service", map[string]string{"SD_UPSTREAM": "", "GATEWAY_API_KEY": testClientKey, "SD_API_KEY": testSDKey}, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			for _, k := range []string{"ENHANCE_OPENAI_API_KEY", "ENHANCE_OPENAI_BASE_URL", "ENHANCE_OPENAI_MODEL"} {
				t.Setenv(k, "")
			}
			for k, v := range tc.env {
				t.Setenv(k, v)
			}
			cfg := unitAdapt(t, string(src))
			names := unitHandlerNames(cfg)
			gi := unitIndexOf(names, "zimage_gateway")
			if gi < 0 || gi > unitIndexOf(names, "static_response") {
				t.Fatalf("handlers %v: want zimage_gateway before the catch-all respond", names)
			}
			raw := unitFindHandler(t, cfg, "zimage_gateway")
			var g Gateway
			if err := json.Unmarshal(raw, &g); err != nil {
				t.Fatal(err)
			}
			ctx, cancel := caddy.NewContext(caddy.Context{Context: t.Context()})
			defer cancel()
			if err := g.Provision(ctx); err != nil {
				t.Fatalf("provisioning the example's gateway: %v", err)
			}
			defer g.Cleanup()
			_, demo := g.upstream.(demoGenerator)
			if demo != tc.wantDemo {
				t.Fatalf("demo upstream %v, want %v", demo, tc.wantDemo)
			}
			if g.lookupModel("dall-e-3") == nil || g.lookupModel("Z-Image") == nil || !g.accounts.limited {
				t.Fatalf("the example's model alias or max_concurrent did not take effect")
			}
			// the keys stay placeholders in the JSON that `caddy adapt` and
			// the autosave write, and the site listens on loopback only
			for _, k := range []string{testClientKey, testSDKey} {
				if strings.Contains(string(cfg), k) {
					t.Errorf("the adapted example carries the key %s…", k[:6])
				}
			}
			var listen struct {
				Apps struct {
					HTTP struct {
						Servers map[string]struct {
							Listen []string `json:"listen"`
						} `json:"servers"`
					} `json:"http"`
				} `json:"apps"`
			}
			if err := json.Unmarshal(cfg, &listen); err != nil {
				t.Fatal(err)
			}
			for name, srv := range listen.Apps.HTTP.Servers {
				if len(srv.Listen) == 0 {
					t.Errorf("server %s listens on every interface", name)
				}
				for _, l := range srv.Listen {
					if !strings.HasPrefix(l, "127.0.0.1:") && !strings.HasPrefix(l, "[::1]:") {
						t.Errorf("server %s listens on %s, want loopback only", name, l)
					}
				}
			}
			if g.store == nil || g.store.maxAge != 30*24*time.Hour || g.store.storage != caddy.DefaultStorage {
				t.Fatalf("the example's store is not on with Caddy's own storage and max_age 30d: %+v", g.store)
			}
			if !tc.wantDemo {
				ic, ok := g.upstream.(*imageClient)
				if !ok || ic.url.String() != defaultUpstreamURL || g.accounts.accounts[0].key != testSDKey {
					t.Fatalf("upstream %+v, want the public service with SD_API_KEY", g.upstream)
				}
			}
		})
	}
}

func unitIndexOf(list []string, s string) int {
	for i, v := range list {
		if v == s {
			return i
		}
	}
	return -1
}

// unitFindHandler digs the JSON object of the first handler with that name out
// of an adapted config.
func unitFindHandler(t *testing.T, cfg []byte, name string) json.RawMessage {
	t.Helper()
	var found json.RawMessage
	var walk func(v json.RawMessage)
	walk = func(v json.RawMessage) {
		if found != nil {
			return
		}
		var obj map[string]json.RawMessage
		if json.Unmarshal(v, &obj) == nil {
			if h, ok := obj["handler"]; ok && string(h) == `"`+name+`"` {
				found = v
				return
			}
			for _, c := range obj {
				walk(c)
			}
			return
		}
		var arr []json.RawMessage
		if json.Unmarshal(v, &arr) == nil {
			for _, c := range arr {
				walk(c)
			}
		}
	}
	walk(cfg)
	if found == nil {
		t.Fatalf("no %s handler in %s", name, cfg)
	}
	return found
}

// Caddyfile.example, run as a newcomer runs it (its port moved to the
// suite's free port, its admin endpoint and logs to the suite's): it
// answers on every name of the loopback interface, and a host it does not
// serve gets a 404 that says where the gateway is, never Caddy's empty 200
// (which OpenAI SDKs take for an empty answer without an error).
func TestExampleAnswersEveryLoopbackName(t *testing.T) {
	src, err := os.ReadFile("Caddyfile.example")
	if err != nil {
		t.Fatal(err)
	}
	cfg := string(src)
	const adminBlock = "{\n\tadmin localhost:2019\n}\n"
	if !strings.Contains(cfg, adminBlock) || !strings.Contains(cfg, ":8080") {
		t.Fatalf("Caddyfile.example has no global block %q or no port 8080: adapt this test", adminBlock)
	}
	cfg = strings.Replace(cfg, adminBlock, globals()+"\n", 1)
	cfg = strings.ReplaceAll(cfg, ":8080", fmt.Sprintf(":%d", httpPort))
	t.Setenv("SD_UPSTREAM", "demo")
	t.Setenv("GATEWAY_API_KEY", testClientKey)
	t.Setenv("ENHANCE_OPENAI_API_KEY", "")
	startCaddyRaw(t, cfg)

	get := func(dial, host, path string) (int, string) {
		t.Helper()
		req, _ := http.NewRequest(http.MethodGet, fmt.Sprintf("http://%s:%d%s", dial, httpPort, path), nil)
		req.Host = fmt.Sprintf("%s:%d", host, httpPort)
		req.Header.Set("Authorization", "Bearer "+testClientKey)
		resp, err := testClient(10 * time.Second).Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b)
	}
	for _, tc := range []struct{ dial, host string }{
		{"127.0.0.1", "localhost"}, {"127.0.0.1", "127.0.0.1"}, {"[::1]", "[::1]"}, {"127.0.0.1", "[::1]"},
	} {
		if status, body := get(tc.dial, tc.host, "/v1/models"); status != http.StatusOK || !strings.Contains(body, `"id":"Z-Image"`) {
			t.Errorf("GET /v1/models with Host %s: %d %q", tc.host, status, body)
		}
	}
	if status, body := get("127.0.0.1", "127.0.0.1", "/"); status != http.StatusNotFound || !strings.Contains(body, "/playground") {
		t.Errorf("GET / with Host 127.0.0.1: %d %q, want the example's 404", status, body)
	}
	for _, host := range []string{"example.org", "192.168.1.2"} {
		status, body := get("127.0.0.1", host, "/v1/models")
		if status != http.StatusNotFound || !strings.Contains(body, fmt.Sprintf("http://127.0.0.1:%d", httpPort)) {
			t.Errorf("GET /v1/models with Host %s: %d %q, want a 404 naming the base URLs", host, status, body)
		}
	}
}

func TestIntegEnvDefaults(t *testing.T) {
	up := newFakeUpstream(t)
	llm := newFakeLLM(t, `{"prompt":"a majestic lion at sunset, golden light","aspect_ratio":"3:2"}`)
	t.Setenv("GATEWAY_API_KEY", testClientKey)
	t.Setenv("SD_API_KEY", testSDKey)
	t.Setenv("ENHANCE_OPENAI_API_KEY", testLLMKey)
	t.Setenv("ENHANCE_OPENAI_BASE_URL", llm.baseURL())
	t.Setenv("ENHANCE_OPENAI_MODEL", "env-model")
	startCaddy(t, "zimage_gateway {\n\tupstream "+up.endpoint()+"\n}")

	status, hdr, body := do(t, http.MethodGet, "/v1/models", "", "Authorization", "Bearer sk-wrong")
	itWantErr(t, status, hdr, body, http.StatusUnauthorized, "invalid_api_key")
	status, _, body = do(t, http.MethodGet, "/v1/models", "")
	if status != http.StatusOK || !bytes.Contains(body, []byte(`"id":"Z-Image"`)) {
		t.Fatalf("models with the env key: %d %s", status, body)
	}
	content := itOK(t, itChatBody(t, "a lion"))
	lc := llm.Calls()
	if len(lc) != 1 || lc[0].Auth != "Bearer "+testLLMKey || lc[0].Body.Model != "env-model" {
		t.Errorf("LLM calls %+v, want one with the env key and model", lc)
	}
	c := itOnlyCall(t, up, 0)
	if c.Auth != "Bearer "+testSDKey || c.Body.Prompt != "a majestic lion at sunset, golden light" ||
		c.Body.Width != 1920 || c.Body.Height != 1280 || c.Body.Steps != 8 || c.Body.ModelIndex != 5 || c.Body.CFG != 7 {
		t.Errorf("upstream call %+v", c)
	}
	want := itMarkdown("a majestic lion at sunset, golden light", itImageURL(c.Body.Seed),
		itEnhanced("a majestic lion at sunset, golden light", "a lion"), "3:2", 1920, 1280)
	if content != want {
		t.Errorf("content\n%q\nwant\n%q", content, want)
	}
}

func TestIntegEnvPlaceholders(t *testing.T) {
	up := newFakeUpstream(t)
	llm := newFakeLLM(t, `{"prompt":"an enhanced owl","aspect_ratio":null}`)
	t.Setenv("ZIMAGE_IT_CLIENT", testClientKey)
	t.Setenv("ZIMAGE_IT_SD", testSDKey)
	t.Setenv("ZIMAGE_IT_LLM", testLLMKey)
	t.Setenv("ZIMAGE_IT_LLM_URL", llm.baseURL())
	t.Setenv("ZIMAGE_IT_URL", up.endpoint())
	t.Setenv("ZIMAGE_IT_EMPTY", "")
	for _, tc := range []struct {
		name string
		site string
		env  map[string]string
	}{
		{"runtime placeholders", `zimage_gateway {
	api_key {env.ZIMAGE_IT_CLIENT}
	upstream {env.ZIMAGE_IT_URL} {
		api_key {env.ZIMAGE_IT_SD}
	}
	enhance {
		api_key {env.ZIMAGE_IT_LLM}
		base_url {env.ZIMAGE_IT_LLM_URL}
	}
}`, map[string]string{"GATEWAY_API_KEY": "", "SD_API_KEY": "", "ENHANCE_OPENAI_API_KEY": "", "ENHANCE_OPENAI_BASE_URL": ""}},
		{"Caddyfile substitution", `zimage_gateway {
	api_key {$ZIMAGE_IT_CLIENT}
	upstream {$ZIMAGE_IT_URL} {
		api_key {$ZIMAGE_IT_SD}
	}
	enhance {
		api_key {$ZIMAGE_IT_LLM}
		base_url {$ZIMAGE_IT_LLM_URL}
	}
}`, map[string]string{"GATEWAY_API_KEY": "", "SD_API_KEY": "", "ENHANCE_OPENAI_API_KEY": "", "ENHANCE_OPENAI_BASE_URL": ""}},
		{"empty values fall back to the environment", `zimage_gateway {
	api_key {env.ZIMAGE_IT_EMPTY}
	upstream {env.ZIMAGE_IT_URL} {
		api_key {env.ZIMAGE_IT_EMPTY}
	}
	enhance {
		api_key {$ZIMAGE_IT_EMPTY}
		base_url {env.ZIMAGE_IT_EMPTY}
	}
}`, map[string]string{"GATEWAY_API_KEY": testClientKey, "SD_API_KEY": testSDKey,
			"ENHANCE_OPENAI_API_KEY": testLLMKey, "ENHANCE_OPENAI_BASE_URL": llm.baseURL()}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			for k, v := range tc.env {
				t.Setenv(k, v)
			}
			startCaddy(t, tc.site)
			n, nl := len(up.Calls()), len(llm.Calls())
			status, hdr, body := do(t, http.MethodGet, "/v1/models", "", "Authorization", "Bearer sk-wrong")
			itWantErr(t, status, hdr, body, http.StatusUnauthorized, "invalid_api_key")
			content := itOK(t, itChatBody(t, "an owl"))
			if c := itOnlyCall(t, up, n); c.Auth != "Bearer "+testSDKey || c.Body.Prompt != "an enhanced owl" {
				t.Errorf("upstream call %+v", c)
			}
			if lc := itLLMCallsSince(llm, nl); len(lc) != 1 || lc[0].Auth != "Bearer "+testLLMKey {
				t.Errorf("LLM calls %+v", lc)
			}
			if !strings.Contains(content, "**✨ Enhanced Prompt:**\nan enhanced owl\n") {
				t.Errorf("content %q", content)
			}
		})
	}
}

func TestIntegLoadErrors(t *testing.T) {
	t.Setenv("GATEWAY_API_KEY", "")
	t.Setenv("SD_API_KEY", "")
	up := newFakeUpstream(t)
	upBlock := fmt.Sprintf("upstream %s {\n\t\tapi_key %s\n\t}\n\tenhance off", up.endpoint(), testSDKey)
	for _, tc := range []struct {
		name    string
		gateway string
		want    []string
	}{
		{"no client key", upBlock, []string{"zimage_gateway", "api_key", "GATEWAY_API_KEY", "no_auth"}},
		{"client key from an empty variable", "api_key {env.ZIMAGE_IT_UNSET_KEY}\n\t" + upBlock, []string{"zimage_gateway", "api_key"}},
		{"unknown sub-directive", "api_key " + testClientKey + "\n\tcolour blue\n\t" + upBlock, []string{"zimage_gateway", "colour"}},
		{"unknown upstream option", "api_key " + testClientKey + "\n\tupstream " + up.endpoint() + " {\n\t\tapi_key " + testSDKey + "\n\t\tspeed fast\n\t}",
			[]string{"zimage_gateway", "upstream", "speed"}},
		{"bad duration", "api_key " + testClientKey + "\n\tstream_keepalive soon\n\t" + upBlock, []string{"zimage_gateway", "stream_keepalive", "soon"}},
		{"bad number", "api_key " + testClientKey + "\n\tupstream " + up.endpoint() + " {\n\t\tapi_key " + testSDKey + "\n\t\tmax_concurrent lots\n\t}",
			[]string{"zimage_gateway", "max_concurrent", "lots"}},
		{"duplicate model", "api_key " + testClientKey + "\n\t" + upBlock + "\n\tmodel Z-Image\n\tmodel z-image", []string{"zimage_gateway", "duplicate model"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			caddyfile := fmt.Sprintf("%s\n:%d {\n\tzimage_gateway {\n\t%s\n\t}\n}\n", globals(), httpPort, tc.gateway)
			msg := itLoadError(t, caddyfile)
			for _, w := range tc.want {
				if !strings.Contains(msg, w) {
					t.Errorf("load error does not mention %q: %s", w, msg)
				}
			}
		})
	}
}
