package zimage

// Model identity (docs/design.md#model-identity): upstream_name and on_mismatch, the match
// rule, and the check through a real Caddy against a fake service whose
// menu has moved.

import (
	"bytes"
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
)

// answerModel is a fake image service's success that names the model that
// ran, as the real service does in data.model_name.
func answerModel(name string) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		var req upstreamRequest
		_ = json.NewDecoder(r.Body).Decode(&req)
		w.Header().Set("Content-Type", "application/json")
		n, _ := json.Marshal(name)
		fmt.Fprintf(w, `{"success":true,"message":"图像生成成功","data":{"image_url":"https://img.example.com/%d.png","image_id":7,"model_name":%s,"points_used":1,"remaining_points":99}}`, req.Seed, n)
	}
}

// The match rule: one name contains the other once both are lower-cased
// and stripped of spaces, '-', '_' and '.'.
func TestUnitModelMatch(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		expected, actual string
		want             bool
	}{
		{"Z-Image", "Z-Image", true},
		{"Z-Image", "z_image turbo", true},
		{"Z-Image", "Z Image Turbo v1.0", true},
		{"Z-Image", "zimage", true},
		{"Z-Image Turbo", "z-image", true}, // the other way round
		{"Qwen Image Edit", "Qwen-Image-Edit2511", true},
		{"Qwen.Image.Edit", "qwen_image_edit", true},
		{"Z-Image", "RealSkin EPS 1.3", false},
		{"Z-Image", "Z-Img", false},
		{"Z-Image", "Qwen Image Edit", false},
		{"RealSkin EPS 1.3", "realskin eps 13", true},
		{"RealSkin EPS 1.3", "RealSkin EPS 1.4", false},
	} {
		if got := sameModel(tc.expected, tc.actual); got != tc.want {
			t.Errorf("sameModel(%q, %q) = %v, want %v", tc.expected, tc.actual, got, tc.want)
		}
	}
}

// upstream_name and on_mismatch in the Caddyfile: parsed into the JSON
// fields; bad values fail with the file and line.
func TestUnitModelIdentityCaddyfile(t *testing.T) {
	t.Parallel()
	var g Gateway
	src := `zimage_gateway {
		model Z-Image {
			model_index 4
			upstream_name "Z-Image Turbo"
			on_mismatch refuse
		}
		model Anime {
			on_mismatch warn
		}
	}`
	if err := g.UnmarshalCaddyfile(caddyfile.NewTestDispenser(src)); err != nil {
		t.Fatal(err)
	}
	four := 4
	want := []ModelConfig{
		{Name: "Z-Image", ModelIndex: &four, UpstreamName: "Z-Image Turbo", OnMismatch: "refuse"},
		{Name: "Anime", OnMismatch: "warn"},
	}
	if !reflect.DeepEqual(g.Models, want) {
		a, _ := json.Marshal(g.Models)
		t.Errorf("parsed %s", a)
	}
	// and the JSON fields have the Caddyfile's names
	b, _ := json.Marshal(g.Models[0])
	if !strings.Contains(string(b), `"upstream_name":"Z-Image Turbo","on_mismatch":"refuse"`) {
		t.Errorf("JSON %s", b)
	}

	for _, tc := range []struct{ name, src, want string }{
		{"bad on_mismatch", "zimage_gateway {\n\tmodel A {\n\t\ton_mismatch ignore\n\t}\n}", "invalid on_mismatch 'ignore': want warn or refuse"},
		{"on_mismatch without value", "zimage_gateway {\n\tmodel A {\n\t\ton_mismatch\n\t}\n}", "wrong argument count"},
		{"upstream_name two args", "zimage_gateway {\n\tmodel A {\n\t\tupstream_name Z Image\n\t}\n}", "wrong argument count"},
		{"upstream_name twice", "zimage_gateway {\n\tmodel A {\n\t\tupstream_name a\n\t\tupstream_name b\n\t}\n}", "upstream_name already specified"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			wantCaddyfileError(t, tc.src, tc.want)
		})
	}
}

// The JSON config: the default model's upstream_name is Z-Image, a
// configured model has none unless given; bad values are load errors that
// say what to change.
func TestUnitModelIdentityProvision(t *testing.T) {
	unitClearEnv(t)
	g, err := unitProvision(t, `{"no_auth":true,"upstream":{"url":"demo"}}`)
	if err != nil {
		t.Fatal(err)
	}
	if m := g.models[0]; m.upstreamName != "Z-Image" || m.refuse {
		t.Errorf("default model: upstream_name %q refuse %v, want Z-Image and warn", m.upstreamName, m.refuse)
	}
	g, err = unitProvision(t, `{"no_auth":true,"upstream":{"url":"demo"},"models":[
		{"name":"Z-Image"},
		{"name":"Real","upstream_name":" RealSkin EPS 1.3 ","on_mismatch":"refuse"},
		{"name":"Edit","edit":true,"upstream_name":"Qwen Image Edit","on_mismatch":"warn"}]}`)
	if err != nil {
		t.Fatal(err)
	}
	for i, want := range []struct {
		name   string
		refuse bool
	}{{"", false}, {"RealSkin EPS 1.3", true}, {"Qwen Image Edit", false}} {
		if m := g.models[i]; m.upstreamName != want.name || m.refuse != want.refuse {
			t.Errorf("model %s: upstream_name %q refuse %v, want %q %v", m.name, m.upstreamName, m.refuse, want.name, want.refuse)
		}
	}

	for _, tc := range []struct {
		name, cfg string
		want      []string
	}{
		{"bad on_mismatch", `{"models":[{"name":"A","on_mismatch":"block"}]}`, []string{"model A", "on_mismatch must be warn or refuse", `"block"`}},
		{"on_mismatch in capitals", `{"models":[{"name":"A","on_mismatch":"Refuse"}]}`, []string{"model A", "on_mismatch must be warn or refuse"}},
		{"upstream_name of separators", `{"models":[{"name":"A","upstream_name":" - . "}]}`, []string{"model A", "upstream_name", "no letter or digit"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg := strings.Replace(tc.cfg, `{"models"`, `{"no_auth":true,"upstream":{"url":"demo"},"models"`, 1)
			_, err := unitProvision(t, cfg)
			wantProvisionError(t, err, tc.want)
		})
	}
}

// logsSince is the log lines written after the first n with message msg.
func logsSince(t *testing.T, n int, msg string) []map[string]any {
	t.Helper()
	var out []map[string]any
	for _, l := range readLog(t)[n:] {
		if l["msg"] == msg {
			out = append(out, l)
		}
	}
	return out
}

const mismatchMsg = "the image service ran another model than configured: its model menu has moved"

// on_mismatch warn (the default): the image is answered; one warning per
// model per config load, naming model, index, expected and actual; the
// metric counts every mismatch. A name that matches, and an answer without
// a model_name, are not mismatches.
func TestModelMismatchWarn(t *testing.T) {
	up := newFakeUpstream(t)
	up.setHandler(answerModel("RealSkin EPS 1.3"))
	startCaddy(t, gatewaySite(up, nil, `model Identity-Warn {
		model_index 5
		upstream_name Z-Image
	}
	model Identity-Quiet {
		upstream_name Z-Image
	}`)+"\nmetrics /metrics")
	mark := len(readLog(t))
	before := scrape(t)

	status, _, b := do(t, http.MethodPost, "/v1/chat/completions", `{"model":"Identity-Warn","prompt":"a cat no-enhance"}`)
	if status != http.StatusOK || !strings.Contains(chatContent(t, b), "https://img.example.com/") {
		t.Fatalf("chat: %d %s", status, b)
	}
	status, _, b = do(t, http.MethodPost, "/v1/images/generations", `{"model":"Identity-Warn","prompt":"a dog no-enhance"}`)
	if status != http.StatusOK || !strings.Contains(string(b), `"url":"https://img.example.com/`) {
		t.Fatalf("images: %d %s", status, b)
	}
	// the same name, as the service spells it, and no name at all
	up.setHandler(answerModel("z_image turbo"))
	if status, _, b := do(t, http.MethodPost, "/v1/chat/completions", `{"model":"Identity-Quiet","prompt":"a cat no-enhance"}`); status != http.StatusOK {
		t.Fatalf("matching name: %d %s", status, b)
	}
	up.setHandler(nil)
	if status, _, b := do(t, http.MethodPost, "/v1/chat/completions", `{"model":"Identity-Quiet","prompt":"a cat no-enhance"}`); status != http.StatusOK {
		t.Fatalf("no model_name: %d %s", status, b)
	}

	after := scrape(t)
	if d := after.delta(before, "caddy_zimage_model_mismatch_total", "model", "Identity-Warn"); d != 2 {
		t.Errorf("caddy_zimage_model_mismatch_total{model=Identity-Warn} grew by %v, want 2", d)
	}
	if d := after.delta(before, "caddy_zimage_model_mismatch_total", "model", "Identity-Quiet"); d != 0 {
		t.Errorf("caddy_zimage_model_mismatch_total{model=Identity-Quiet} grew by %v, want 0", d)
	}
	warns := logsSince(t, mark, mismatchMsg)
	if len(warns) != 1 {
		t.Fatalf("%d mismatch warnings for two mismatches of one model, want 1: %v", len(warns), warns)
	}
	w := warns[0]
	for k, want := range map[string]any{"level": "warn", "model": "Identity-Warn", "model_index": float64(5), "expected": "Z-Image", "actual": "RealSkin EPS 1.3"} {
		if w[k] != want {
			t.Errorf("warning %s = %v, want %v (%v)", k, w[k], want, w)
		}
	}
	// the line as Caddy writes it, for the README
	raw, _ := os.ReadFile(logPath)
	for _, l := range strings.Split(string(raw), "\n") {
		if strings.Contains(l, mismatchMsg) && strings.Contains(l, "Identity-Warn") {
			t.Logf("the warning an operator sees: %s", l)
		}
	}
}

// A reload is a new config load: the model warns again, once. The default
// model (no model block) is checked against "Z-Image".
func TestModelMismatchWarnOncePerLoad(t *testing.T) {
	up := newFakeUpstream(t)
	up.setHandler(answerModel("RealSkin EPS 1.3"))
	site := gatewaySite(up, nil, "")
	for load := range 2 {
		startCaddy(t, site+fmt.Sprintf("\nrespond /load-%d 204", load)) // a changed config
		mark := len(readLog(t))
		for range 2 {
			if status, _, b := do(t, http.MethodPost, "/v1/chat/completions", `{"prompt":"a cat no-enhance"}`); status != http.StatusOK {
				t.Fatalf("load %d: %d %s", load, status, b)
			}
		}
		if w := logsSince(t, mark, mismatchMsg); len(w) != 1 || w[0]["model"] != "Z-Image" || w[0]["expected"] != "Z-Image" {
			t.Errorf("load %d: warnings %v, want one for the default model", load, w)
		}
	}
}

// on_mismatch refuse: a 502 model_mismatch whose message names the index,
// the name it now gives and what to change; the image is not returned, on
// chat, streamed chat and images alike.
func TestModelMismatchRefuse(t *testing.T) {
	up := newFakeUpstream(t)
	up.setHandler(answerModel("RealSkin EPS 1.3"))
	startCaddy(t, gatewaySite(up, nil, `model Identity-Refuse {
		model_index 5
		upstream_name Z-Image
		on_mismatch refuse
	}`)+"\nmetrics /metrics")
	before := scrape(t)
	check := func(what string, e errorDetail) {
		t.Helper()
		if e.Code != "model_mismatch" || e.Type != "upstream_error" {
			t.Errorf("%s: code %q type %q, want model_mismatch upstream_error", what, e.Code, e.Type)
		}
		for _, s := range []string{"model_index 5", `"RealSkin EPS 1.3"`, `"Z-Image"`, "Set model_index of model Identity-Refuse", "caddy zimage-models", "upstream_name"} {
			if !strings.Contains(e.Message, s) {
				t.Errorf("%s: message %q does not say %q", what, e.Message, s)
			}
		}
	}
	for _, path := range []string{"/v1/chat/completions", "/v1/images/generations"} {
		status, _, b := do(t, http.MethodPost, path, `{"model":"Identity-Refuse","prompt":"a cat no-enhance"}`)
		if status != http.StatusBadGateway {
			t.Fatalf("%s: %d %s, want 502", path, status, b)
		}
		if strings.Contains(string(b), "img.example.com") {
			t.Errorf("%s: the refused image is in the answer: %s", path, b)
		}
		check(path, apiErr(t, b))
	}

	// streamed: the error event instead of the content
	resp := send(t.Context(), http.MethodPost, "/v1/chat/completions", `{"model":"Identity-Refuse","prompt":"a cat no-enhance","stream":true}`)
	if resp.err != nil || resp.status != http.StatusOK {
		t.Fatalf("stream: %d %v", resp.status, resp.err)
	}
	body := string(resp.body)
	if strings.Contains(body, "img.example.com") || strings.Contains(body, "[DONE]") {
		t.Errorf("stream answered the refused image: %s", body)
	}
	_, ev, ok := strings.Cut(body, `data: {"error"`)
	if !ok {
		t.Fatalf("no error event: %s", body)
	}
	ev, _, _ = strings.Cut(`{"error"`+ev, "\n")
	check("stream", apiErr(t, []byte(ev)))

	after := scrape(t)
	if d := after.delta(before, "caddy_zimage_model_mismatch_total", "model", "Identity-Refuse"); d != 3 {
		t.Errorf("mismatches counted %v, want 3", d)
	}
	if d := after.delta(before, "caddy_zimage_requests_total", "endpoint", "images_generations", "model", "Identity-Refuse", "code", "502"); d != 1 {
		t.Errorf("images 502 counted %v, want 1", d)
	}
}

// The README's model identity section: its Caddyfile adapts as written and
// sets both sub-directives; the warning line and the command it shows are
// the ones the code writes.
func TestUnitReadmeModelIdentity(t *testing.T) {
	t.Parallel()
	raw, err := os.ReadFile("README.md")
	if err != nil {
		t.Fatal(err)
	}
	_, section, ok := strings.Cut(string(raw), "## Model identity")
	if !ok {
		t.Fatal("README has no model identity section")
	}
	section, _, _ = strings.Cut(section, "\n## ")
	var h struct {
		Models []ModelConfig `json:"models"`
	}
	if err := json.Unmarshal(unitFindHandler(t, unitAdapt(t, fenced(t, section, "```caddy\n")), "zimage_gateway"), &h); err != nil {
		t.Fatal(err)
	}
	if len(h.Models) != 2 || h.Models[0].UpstreamName != "Z-Image" || h.Models[0].OnMismatch != onMismatchRefuse || h.Models[1].UpstreamName != "Qwen Image Edit" {
		t.Errorf("README example: %+v", h.Models)
	}
	// the demo's table, exactly as the command prints it
	_, _, demo := runModels(t, discoverOptions{upstream: "demo", from: discoverFrom, to: discoverTo, yes: true})
	if !strings.Contains(section, "$ caddy zimage-models --upstream demo --yes\n"+demo+"```") {
		t.Errorf("README's demo output is not what the command prints:\n%s", demo)
	}
	for _, s := range []string{mismatchMsg, `"model_index":5,"expected":"Z-Image","actual":"RealSkin EPS 1.3"`,
		"caddy zimage-models --config", "Dec 2025", "May 2026"} {
		if !strings.Contains(section, s) {
			t.Errorf("README's model identity section lacks %q", s)
		}
	}
}

// default_response_format in the JSON config: resolved once, a wrong value
// refused at load naming what to write.
func TestUnitDefaultResponseFormatProvision(t *testing.T) {
	unitClearEnv(t)
	g, err := unitProvision(t, `{"no_auth":true,"upstream":{"url":"demo"},"default_response_format":"b64_json","models":[{"name":"A"},{"name":"B","default_response_format":"url"}]}`)
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct{ model, asked, want string }{
		{"A", "", formatB64}, {"B", "", formatURL}, {"B", "b64_json", formatB64}, {"A", "URL", formatURL},
	} {
		if got, e := g.parseFormat(tc.asked, g.lookupModel(tc.model), tc.model); e != nil || got != tc.want {
			t.Errorf("model %s, response_format %q: %q %v, want %q", tc.model, tc.asked, got, e, tc.want)
		}
	}
	for cfg, want := range map[string][]string{
		`{"default_response_format":"png"}`:                            {"default_response_format must be url, b64_json or both", `"png"`},
		`{"models":[{"name":"A","default_response_format":"base64"}]}`: {"model A", "default_response_format must be url, b64_json or both"},
	} {
		_, err := unitProvision(t, strings.Replace(cfg, `{`, `{"no_auth":true,"upstream":{"url":"demo"},`, 1))
		wantProvisionError(t, err, want)
	}
}

func TestIntegModelsList(t *testing.T) {
	up := newFakeUpstream(t)
	startCaddy(t, itSite(up, itConfig{gateway: itTwoModels}))
	for _, path := range []string{"/v1/models", "/models"} {
		t.Run(path, func(t *testing.T) {
			status, hdr, body := do(t, http.MethodGet, path, "")
			if status != http.StatusOK {
				t.Fatalf("status %d: %s", status, body)
			}
			if ct := hdr.Get("Content-Type"); ct != "application/json" {
				t.Errorf("Content-Type %q", ct)
			}
			top := itObject(t, body)
			if got := itKeys(top); strings.Join(got, ",") != "data,object" || top["object"] != "list" {
				t.Fatalf("list shape: %s", body)
			}
			data, _ := top["data"].([]any)
			if len(data) != 2 {
				t.Fatalf("want one entry per configured model (2), aliases not listed: %s", body)
			}
			now := float64(time.Now().Unix())
			for i, want := range []string{"Z-Image", "Z-Turbo"} {
				m, _ := data[i].(map[string]any)
				if got := strings.Join(itKeys(m), ","); got != "created,id,object,owned_by,supported_endpoint_types" {
					t.Errorf("entry %d keys %s: %s", i, got, body)
				}
				// New API's convention, which Cherry Studio's painting page
				// reads (its first entry) to offer the model for images
				if got := fmt.Sprint(m["supported_endpoint_types"]); got != "[image-generation openai openai-response]" {
					t.Errorf("entry %d supported_endpoint_types %s", i, got)
				}
				created, _ := m["created"].(float64)
				if m["id"] != want || m["object"] != "model" || m["owned_by"] != "sd-exacg-gateway" || created <= 0 || created > now {
					t.Errorf("entry %d = %v, want id %s, object model, owned_by sd-exacg-gateway, a unix created", i, m, want)
				}
			}
			if bytes.Contains(body, []byte("dall-e-3")) {
				t.Errorf("alias listed: %s", body)
			}
		})
	}
	if n := len(up.Calls()); n != 0 {
		t.Errorf("listing models called the upstream %d times", n)
	}
}

// With list_aliases on, each alias is listed as a model of its own, after
// its model, and /v1/models/{alias} names it as listed.
func TestIntegModelsListAliases(t *testing.T) {
	up := newFakeUpstream(t)
	startCaddy(t, itSite(up, itConfig{gateway: "list_aliases\n\t" + itTwoModels}))
	status, _, body := do(t, http.MethodGet, "/v1/models", "")
	var list struct {
		Data []struct {
			ID    string   `json:"id"`
			Types []string `json:"supported_endpoint_types"`
		} `json:"data"`
	}
	if err := json.Unmarshal(body, &list); err != nil || status != http.StatusOK {
		t.Fatalf("%d %s", status, body)
	}
	var ids []string
	for _, m := range list.Data {
		ids = append(ids, m.ID)
		if len(m.Types) != 3 {
			t.Errorf("%s: supported_endpoint_types %v", m.ID, m.Types)
		}
	}
	if got := strings.Join(ids, ","); got != "Z-Image,dall-e-3,Z-Turbo" {
		t.Errorf("listed %s, want Z-Image,dall-e-3,Z-Turbo", got)
	}
	for path, want := range map[string]string{"/v1/models/DALL-E-3": "dall-e-3", "/v1/models/z-image": "Z-Image"} {
		status, _, body := do(t, http.MethodGet, path, "")
		if m := itObject(t, body); status != http.StatusOK || m["id"] != want {
			t.Errorf("%s: %d %s, want id %s", path, status, body, want)
		}
	}
}

func TestIntegModelGet(t *testing.T) {
	up := newFakeUpstream(t)
	startCaddy(t, itSite(up, itConfig{gateway: itTwoModels}))
	for _, tc := range []struct {
		path   string
		wantID string // "" means 404 model_not_found
	}{
		{"/v1/models/Z-Image", "Z-Image"},
		{"/models/Z-Turbo", "Z-Turbo"},
		{"/v1/models/z-turbo", "Z-Turbo"},
		{"/v1/models/dall-e-3", "Z-Image"},
		{"/v1/models/gpt-4o", ""},
		{"/models/nope", ""},
	} {
		t.Run(tc.path, func(t *testing.T) {
			status, hdr, body := do(t, http.MethodGet, tc.path, "")
			if tc.wantID == "" {
				e := itWantErr(t, status, hdr, body, http.StatusNotFound, "model_not_found")
				if e.Type != "invalid_request_error" {
					t.Errorf("type %q", e.Type)
				}
				return
			}
			if status != http.StatusOK {
				t.Fatalf("status %d: %s", status, body)
			}
			m := itObject(t, body)
			if got := strings.Join(itKeys(m), ","); got != "created,id,object,owned_by,supported_endpoint_types" {
				t.Errorf("keys %s", got)
			}
			if got := fmt.Sprint(m["supported_endpoint_types"]); got != "[image-generation openai openai-response]" {
				t.Errorf("supported_endpoint_types %s", got)
			}
			if m["id"] != tc.wantID || m["object"] != "model" || m["owned_by"] != "sd-exacg-gateway" {
				t.Errorf("got %s, want the model object of %s", body, tc.wantID)
			}
		})
	}
}
