package zimage

// Integration tests through a real Caddy (harness_test.go) : configuration
// through Caddy (environment defaults, placeholders, load errors), the
// endpoints (auth, routing, errors) and the non-streaming chat pipeline,
// step by step, with every upstream fault. Each test asserts
// both what the client got and what the fake image service and fake LLM
// received.

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// itConfig is a gateway site with more knobs than gatewaySite: the
// upstream URL and block, the enhance block and lines after the gateway.
type itConfig struct {
	upstreamURL string   // default: the fake's endpoint
	upstream    string   // upstream block lines besides api_key; default "timeout 5s"
	llm         *fakeLLM // enhance on against this fake
	llmURL      string   // enhance base_url when llm is nil (e.g. a closed server)
	enhance     string   // enhance block lines besides api_key and base_url; default "timeout 2s"
	gateway     string   // more lines inside zimage_gateway
	after       string   // site lines after the gateway
}

func itSite(up *fakeUpstream, c itConfig) string {
	u := c.upstreamURL
	if u == "" {
		u = up.endpoint()
	}
	upBlock := c.upstream
	if upBlock == "" {
		upBlock = "timeout 5s"
	}
	enh := "enhance off"
	base := c.llmURL
	if c.llm != nil {
		base = c.llm.baseURL()
	}
	if base != "" {
		e := c.enhance
		if e == "" {
			e = "timeout 2s"
		}
		enh = fmt.Sprintf("enhance {\n\t\tapi_key %s\n\t\tbase_url %s\n\t\t%s\n\t}", testLLMKey, base, e)
	}
	return fmt.Sprintf("zimage_gateway {\n\tapi_key %s\n\tupstream %s {\n\t\tapi_key %s\n\t\t%s\n\t}\n\t%s\n\t%s\n}\n%s",
		testClientKey, u, testSDKey, upBlock, enh, c.gateway, c.after)
}

// itRefusedURL is the URL of a server that no longer listens: connections to
// it are refused.
func itRefusedURL(t *testing.T) string {
	t.Helper()
	s := httptest.NewServer(http.NotFoundHandler())
	u := s.URL
	s.Close()
	return u
}

// itChatBody is a chat completions body with one user message and the extra
// top-level fields given as key, value pairs.
func itChatBody(t *testing.T, prompt string, kv ...any) string {
	t.Helper()
	m := map[string]any{"messages": []any{map[string]any{"role": "user", "content": prompt}}}
	for i := 0; i+1 < len(kv); i += 2 {
		m[kv[i].(string)] = kv[i+1]
	}
	b, err := json.Marshal(m)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// itPost sends a chat completions request with the client key.
func itPost(t *testing.T, body string) (int, http.Header, []byte) {
	t.Helper()
	return do(t, http.MethodPost, "/v1/chat/completions", body)
}

// itOK posts body, requires a 200 chat.completion and returns its content.
func itOK(t *testing.T, body string) string {
	t.Helper()
	status, _, resp := itPost(t, body)
	if status != http.StatusOK {
		t.Fatalf("status %d, want 200: %s", status, resp)
	}
	return chatContent(t, resp)
}

// itWantErr checks an error answer: status, JSON content type, envelope and
// code; it returns the envelope.
func itWantErr(t *testing.T, status int, hdr http.Header, body []byte, wantStatus int, wantCode string) errorDetail {
	t.Helper()
	if status != wantStatus {
		t.Fatalf("status %d, want %d: %s", status, wantStatus, body)
	}
	if ct := hdr.Get("Content-Type"); ct != "application/json" {
		t.Errorf("Content-Type %q, want application/json", ct)
	}
	e := apiErr(t, body)
	if e.Code != wantCode {
		t.Errorf("error code %q, want %q: %s", e.Code, wantCode, body)
	}
	return e
}

// itCallsSince returns the calls the fake received after the first n.
func itCallsSince(up *fakeUpstream, n int) []upstreamCall { return up.Calls()[n:] }

func itLLMCallsSince(llm *fakeLLM, n int) []llmCall { return llm.Calls()[n:] }

// itOnlyCall requires exactly one upstream call after the first n.
func itOnlyCall(t *testing.T, up *fakeUpstream, n int) upstreamCall {
	t.Helper()
	calls := itCallsSince(up, n)
	if len(calls) != 1 {
		t.Fatalf("upstream received %d calls, want 1: %+v", len(calls), calls)
	}
	return calls[0]
}

// itLLMReplies is a fake LLM handler answering content as the model's text.
func itLLMReplies(content string) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		_ = json.NewEncoder(w).Encode(map[string]any{
			"id": "x", "object": "chat.completion",
			"choices": []any{map[string]any{"index": 0, "message": map[string]any{"role": "assistant", "content": content}}},
		})
	}
}

// itImageURL is the URL the default fake upstream answers for a seed.
func itImageURL(seed int64) string { return fmt.Sprintf("https://img.example.com/%d.png", seed) }

// The markdown of docs/design.md#the-prompt, written out from the spec's text.
func itMarkdown(alt, imageURL, section, ratio string, w, h int) string {
	return "![" + alt + "](" + imageURL + ")\n\n---\n" + section +
		"**🎨 Aspect Ratio:** " + ratio + "\n**📐 Resolution:** " + strconv.Itoa(w) + "×" + strconv.Itoa(h)
}

func itEnhanced(final, original string) string {
	return "**✨ Enhanced Prompt:**\n" + final + "\n\n**📝 Original Input:**\n" + original + "\n\n"
}

func itFailed(original string) string {
	return "**⚠️ Enhancement failed, using original prompt**\n\n**📝 Prompt:**\n" + original + "\n\n"
}

func itPlain(original string) string { return "**📝 Prompt:**\n" + original + "\n\n" }

func itKeys(m map[string]any) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	return keys
}

func itObject(t *testing.T, raw []byte) map[string]any {
	t.Helper()
	var m map[string]any
	if err := json.Unmarshal(raw, &m); err != nil {
		t.Fatalf("not a JSON object: %v: %s", err, raw)
	}
	return m
}

// ---- endpoints ----

// itTwoModels is a gateway config block with two models and an alias.
const itTwoModels = "model Z-Image {\n\t\talias dall-e-3\n\t}\n\tmodel Z-Turbo {\n\t\tmodel_index 7\n\t}"

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

func TestIntegPreflight(t *testing.T) {
	up := newFakeUpstream(t)
	site := "header Access-Control-Allow-Origin *\n" + itSite(up, itConfig{})
	startCaddy(t, site)
	for _, path := range []string{"/v1/chat/completions", "/chat/completions", "/v1/models", "/models/Z-Image", "/v1/images/generations"} {
		t.Run(path, func(t *testing.T) {
			status, hdr, body := do(t, http.MethodOptions, path, "", "Authorization", "")
			if status != http.StatusNoContent || len(body) != 0 {
				t.Fatalf("status %d body %q, want 204 and no body without auth", status, body)
			}
			if got := hdr.Get("Access-Control-Allow-Origin"); got != "*" {
				t.Errorf("CORS header from the Caddyfile missing: %q", got)
			}
		})
	}
	if n := len(up.Calls()); n != 0 {
		t.Errorf("preflight called the upstream %d times", n)
	}
}

func TestIntegFallthrough(t *testing.T) {
	up := newFakeUpstream(t)
	startCaddy(t, itSite(up, itConfig{after: `respond "next" 200`}))
	for _, tc := range []struct{ method, path string }{
		{http.MethodGet, "/index.html"},
		{http.MethodGet, "/"},
		{http.MethodPost, "/v1beta/x"},
		{http.MethodGet, "/v1models"},
		{http.MethodGet, "/v2/models"},
		{http.MethodGet, "/assets/v1/models"},
	} {
		t.Run(tc.method+" "+tc.path, func(t *testing.T) {
			// no key: a path that is not the gateway's is not its business
			status, _, body := do(t, tc.method, tc.path, "", "Authorization", "")
			if status != http.StatusOK || string(body) != "next" {
				t.Fatalf("status %d body %q, want the next handler's 200 \"next\"", status, body)
			}
		})
	}
}

func TestIntegUnknownPath(t *testing.T) {
	up := newFakeUpstream(t)
	startCaddy(t, itSite(up, itConfig{after: `respond "next" 200`}))
	for _, path := range []string{"/v1/foo", "/v1/", "/v1/chat", "/v1/images/variations", "/v1/zimage-demo/64x64.png"} {
		t.Run(path, func(t *testing.T) {
			status, hdr, body := do(t, http.MethodGet, path, "")
			e := itWantErr(t, status, hdr, body, http.StatusNotFound, "not_found")
			if e.Type != "invalid_request_error" {
				t.Errorf("type %q", e.Type)
			}
		})
	}
}

func TestIntegMethodNotAllowed(t *testing.T) {
	up := newFakeUpstream(t)
	startCaddy(t, itSite(up, itConfig{}))
	for _, tc := range []struct{ method, path string }{
		{http.MethodGet, "/v1/chat/completions"},
		{http.MethodPut, "/chat/completions"},
		{http.MethodPost, "/v1/models"},
		{http.MethodDelete, "/v1/models/Z-Image"},
		{http.MethodGet, "/v1/images/generations"},
	} {
		t.Run(tc.method+" "+tc.path, func(t *testing.T) {
			status, hdr, body := do(t, tc.method, tc.path, "")
			itWantErr(t, status, hdr, body, http.StatusMethodNotAllowed, "method_not_allowed")
		})
	}
	if n := len(up.Calls()); n != 0 {
		t.Errorf("upstream called %d times", n)
	}
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

func TestIntegBodyLimit(t *testing.T) {
	for _, tc := range []struct {
		name  string
		extra string
		limit int
	}{
		{"default 1MiB", "", 1 << 20},
		{"max_body 1KiB", "max_body 1KiB", 1 << 10},
	} {
		t.Run(tc.name, func(t *testing.T) {
			up := newFakeUpstream(t)
			startCaddy(t, itSite(up, itConfig{gateway: tc.extra}))
			// a valid body padded with trailing whitespace to an exact size
			obj := `{"messages":[{"role":"user","content":"a cat"}]}`
			atLimit := obj + strings.Repeat(" ", tc.limit-len(obj))
			if status, _, body := itPost(t, atLimit); status != http.StatusOK {
				t.Fatalf("a body of exactly the limit: status %d: %s", status, body)
			}
			status, hdr, body := itPost(t, atLimit+" ")
			e := itWantErr(t, status, hdr, body, http.StatusRequestEntityTooLarge, "request_too_large")
			if e.Type != "invalid_request_error" {
				t.Errorf("type %q", e.Type)
			}
			if n := len(up.Calls()); n != 1 {
				t.Errorf("upstream received %d calls, want 1 (none for the oversized body)", n)
			}
		})
	}
}

func TestIntegBadRequest(t *testing.T) {
	up := newFakeUpstream(t)
	startCaddy(t, itSite(up, itConfig{}))
	for _, tc := range []struct{ name, body string }{
		{"malformed JSON", `{"messages":[{"role":"user","content":"a cat"}`},
		{"not JSON", `model=Z-Image&prompt=cat`},
		{"empty body", ``},
		{"array", `[{"role":"user","content":"a cat"}]`},
		{"messages not a list", `{"messages":"a cat"}`},
		{"content a number", `{"messages":[{"role":"user","content":42}]}`},
		{"seed not an integer", `{"messages":[{"role":"user","content":"a cat"}],"seed":"abc"}`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			status, hdr, body := itPost(t, tc.body)
			e := itWantErr(t, status, hdr, body, http.StatusBadRequest, "invalid_request")
			if e.Type != "invalid_request_error" {
				t.Errorf("type %q", e.Type)
			}
		})
	}
	if n := len(up.Calls()); n != 0 {
		t.Errorf("upstream called %d times for bad requests", n)
	}
}

// ---- the chat pipeline ----

func TestIntegChatPrompt(t *testing.T) {
	up := newFakeUpstream(t)
	startCaddy(t, itSite(up, itConfig{}))
	for _, tc := range []struct {
		name, body, want string
	}{
		{"string content", `{"messages":[{"role":"system","content":"be nice"},{"role":"user","content":"a cat on a roof"}]}`, "a cat on a roof"},
		{"content parts", `{"messages":[{"role":"user","content":[{"type":"text","text":"a red"},{"type":"text","text":"fox"}]}]}`, "a red fox"},
		// an image in an older message does not make the latest one an edit (docs/design.md#edits)
		{"image in an older message", `{"messages":[{"role":"user","content":[{"type":"image_url","image_url":{"url":"https://x.example/y.png"}}]},{"role":"assistant","content":"ok"},{"role":"user","content":"a red fox"}]}`, "a red fox"},
		{"last user message", `{"messages":[{"role":"user","content":"first idea"},{"role":"assistant","content":"ok"},{"role":"user","content":"second idea"}]}`, "second idea"},
		{"top-level prompt wins", `{"prompt":"a dog","messages":[{"role":"user","content":"a cat"}]}`, "a dog"},
		{"blank top-level prompt", `{"prompt":"   ","messages":[{"role":"user","content":"a cat"}]}`, "a cat"},
		{"top-level prompt only", `{"prompt":"a bird"}`, "a bird"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			n := len(up.Calls())
			content := itOK(t, tc.body)
			c := itOnlyCall(t, up, n)
			if c.Body.Prompt != tc.want {
				t.Errorf("upstream prompt %q, want %q", c.Body.Prompt, tc.want)
			}
			want := itMarkdown(tc.want, itImageURL(c.Body.Seed), itPlain(tc.want), "1:1", 2048, 2048)
			if content != want {
				t.Errorf("content\n%q\nwant\n%q", content, want)
			}
		})
	}
}

func TestIntegChatNoPrompt(t *testing.T) {
	up := newFakeUpstream(t)
	startCaddy(t, itSite(up, itConfig{}))
	for _, tc := range []struct{ name, body string }{
		{"no messages", `{"model":"Z-Image"}`},
		{"empty messages", `{"messages":[]}`},
		{"only a system message", `{"messages":[{"role":"system","content":"draw"}]}`},
		{"only an assistant message", `{"messages":[{"role":"assistant","content":"a cat"}]}`},
		{"blank user message", `{"messages":[{"role":"user","content":"  "}]}`},
		{"parts without text", `{"messages":[{"role":"user","content":[{"type":"image_url","image_url":{"url":"https://x.example/y.png"}}]}]}`},
		{"only a ratio", `{"messages":[{"role":"user","content":"比例 16:9"}]}`},
		{"only the skip word", `{"messages":[{"role":"user","content":"no-enhance"}]}`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			status, hdr, body := itPost(t, tc.body)
			itWantErr(t, status, hdr, body, http.StatusBadRequest, "invalid_request")
		})
	}
	if n := len(up.Calls()); n != 0 {
		t.Errorf("upstream called %d times without a prompt", n)
	}
}

func TestIntegChatModel(t *testing.T) {
	up := newFakeUpstream(t)
	startCaddy(t, itSite(up, itConfig{gateway: itTwoModels}))
	for _, tc := range []struct {
		name      string
		model     any // nil: field absent
		wantEcho  string
		wantIndex int // upstream model_index; 0: 404 expected
	}{
		{"missing selects the first", nil, "Z-Image", 5},
		{"exact", "Z-Turbo", "Z-Turbo", 7},
		{"case-insensitive", "z-turbo", "z-turbo", 7},
		{"alias", "dall-e-3", "dall-e-3", 5},
		{"alias any case", "DALL-E-3", "DALL-E-3", 5},
		{"unknown", "gpt-4o", "", 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var kv []any
			if tc.model != nil {
				kv = []any{"model", tc.model}
			}
			n := len(up.Calls())
			status, hdr, body := itPost(t, itChatBody(t, "a cat", kv...))
			if tc.wantIndex == 0 {
				e := itWantErr(t, status, hdr, body, http.StatusNotFound, "model_not_found")
				if e.Param == nil || *e.Param != "model" {
					t.Errorf("param %v, want model", e.Param)
				}
				if c := itCallsSince(up, n); len(c) != 0 {
					t.Errorf("unknown model reached the upstream")
				}
				return
			}
			if status != http.StatusOK {
				t.Fatalf("status %d: %s", status, body)
			}
			if got := itObject(t, body)["model"]; got != tc.wantEcho {
				t.Errorf("answer model %v, want %q", got, tc.wantEcho)
			}
			if c := itOnlyCall(t, up, n); c.Body.ModelIndex != tc.wantIndex {
				t.Errorf("model_index %d, want %d", c.Body.ModelIndex, tc.wantIndex)
			}
		})
	}
}

// TestIntegChatAnswerShape checks the chat.completion object of step 7.
func TestIntegChatAnswerShape(t *testing.T) {
	up := newFakeUpstream(t)
	startCaddy(t, itSite(up, itConfig{}))
	_, hdr, body := itPost(t, itChatBody(t, "a cat", "model", "Z-Image", "seed", 7))
	if ct := hdr.Get("Content-Type"); ct != "application/json" {
		t.Errorf("Content-Type %q", ct)
	}
	var got struct {
		ID      string `json:"id"`
		Object  string `json:"object"`
		Created int64  `json:"created"`
		Model   string `json:"model"`
		Choices []struct {
			Index        *int    `json:"index"`
			FinishReason *string `json:"finish_reason"`
			Message      struct {
				Role    string `json:"role"`
				Content string `json:"content"`
			} `json:"message"`
		} `json:"choices"`
		Usage map[string]int `json:"usage"`
	}
	if err := json.Unmarshal(body, &got); err != nil {
		t.Fatalf("%v: %s", err, body)
	}
	if got := strings.Join(itKeys(itObject(t, body)), ","); got != "choices,created,id,model,object,usage" {
		t.Errorf("top-level keys %s", got)
	}
	if !regexp.MustCompile(`^chatcmpl-[0-9A-Za-z]+$`).MatchString(got.ID) || got.Object != "chat.completion" ||
		got.Created <= 0 || got.Created > time.Now().Unix() || got.Model != "Z-Image" {
		t.Errorf("answer header fields: %s", body)
	}
	if len(got.Choices) != 1 || got.Choices[0].Index == nil || *got.Choices[0].Index != 0 ||
		got.Choices[0].FinishReason == nil || *got.Choices[0].FinishReason != "stop" ||
		got.Choices[0].Message.Role != "assistant" || got.Choices[0].Message.Content == "" {
		t.Errorf("choices: %s", body)
	}
	if len(got.Usage) != 3 || got.Usage["prompt_tokens"] != 0 || got.Usage["completion_tokens"] != 0 || got.Usage["total_tokens"] != 0 {
		t.Errorf("usage %v", got.Usage)
	}
	// ids are random per answer
	_, _, body2 := itPost(t, itChatBody(t, "a cat"))
	if id2, _ := itObject(t, body2)["id"].(string); id2 == got.ID {
		t.Errorf("two answers share the id %s", id2)
	}
}

func TestIntegSkipWord(t *testing.T) {
	up := newFakeUpstream(t)
	llm := newFakeLLM(t, `{"prompt":"an enhanced cat","aspect_ratio":"16:9"}`)
	startCaddy(t, itSite(up, itConfig{llm: llm}))
	for _, tc := range []struct {
		name, prompt   string
		wantUp, wantOr string // upstream prompt, original shown in the markdown
		ratio          string
		w, h           int
	}{
		{"at the end", "a cat on a roof no-enhance", "a cat on a roof", "a cat on a roof", "1:1", 2048, 2048},
		{"any case, at the start", "NO-ENHANCE a cat", "a cat", "a cat", "1:1", 2048, 2048},
		{"with a ratio", "a cat No-Enhance ratio 9:16", "a cat", "a cat ratio 9:16", "9:16", 1152, 2048},
		{"in Chinese text", "一只猫 no-enhance", "一只猫", "一只猫", "1:1", 2048, 2048},
	} {
		t.Run(tc.name, func(t *testing.T) {
			n, nl := len(up.Calls()), len(llm.Calls())
			content := itOK(t, itChatBody(t, tc.prompt))
			if c := itLLMCallsSince(llm, nl); len(c) != 0 {
				t.Errorf("the LLM was called despite no-enhance: %+v", c)
			}
			c := itOnlyCall(t, up, n)
			if c.Body.Prompt != tc.wantUp || c.Body.Width != tc.w || c.Body.Height != tc.h {
				t.Errorf("upstream got %q %dx%d, want %q %dx%d", c.Body.Prompt, c.Body.Width, c.Body.Height, tc.wantUp, tc.w, tc.h)
			}
			want := itMarkdown(tc.wantUp, itImageURL(c.Body.Seed), itPlain(tc.wantOr), tc.ratio, tc.w, tc.h)
			if content != want {
				t.Errorf("content\n%q\nwant\n%q", content, want)
			}
		})
	}
	t.Run("a longer word is not the skip word", func(t *testing.T) {
		nl := len(llm.Calls())
		content := itOK(t, itChatBody(t, "a no-enhancement sign"))
		if c := itLLMCallsSince(llm, nl); len(c) != 1 || c[0].Body.Messages[1].Content != "a no-enhancement sign" {
			t.Errorf("LLM calls %+v, want one with the whole prompt", c)
		}
		if !strings.Contains(content, "**✨ Enhanced Prompt:**\nan enhanced cat\n") {
			t.Errorf("content %q", content)
		}
	})
}

func TestIntegUserRatio(t *testing.T) {
	up := newFakeUpstream(t)
	startCaddy(t, itSite(up, itConfig{}))
	for _, tc := range []struct {
		name, prompt, wantPrompt, ratio string
		w, h                            int
	}{
		{"ratio after comma", "a cat, ratio 16:9", "a cat", "16:9", 2048, 1152},
		{"比例 full-width colon", "比例：9:16 一只猫在屋顶", "一只猫在屋顶", "9:16", 1152, 2048},
		{"aspect ratio", "aspect ratio 3:2 mountains at dawn", "mountains at dawn", "3:2", 1920, 1280},
		{"ratio before trigger", "a tall tower 3:4 比例", "a tall tower", "3:4", 1536, 2048},
		{"ratio colon", "ratio: 1:2 a hanging scroll", "a hanging scroll", "1:2", 1024, 2048},
		{"explicit 1:1", "a coin, RATIO 1:1", "a coin", "1:1", 2048, 2048},
		{"no trigger", "a poster 16:9", "a poster 16:9", "1:1", 2048, 2048},
		{"a time", "下午16:30 的街道", "下午16:30 的街道", "1:1", 2048, 2048},
		{"inside a longer number", "ratio 13:2 of gears", "ratio 13:2 of gears", "1:1", 2048, 2048},
	} {
		t.Run(tc.name, func(t *testing.T) {
			n := len(up.Calls())
			content := itOK(t, itChatBody(t, tc.prompt))
			c := itOnlyCall(t, up, n)
			if c.Body.Prompt != tc.wantPrompt || c.Body.Width != tc.w || c.Body.Height != tc.h {
				t.Errorf("upstream got %q %dx%d, want %q %dx%d", c.Body.Prompt, c.Body.Width, c.Body.Height, tc.wantPrompt, tc.w, tc.h)
			}
			want := itMarkdown(tc.wantPrompt, itImageURL(c.Body.Seed), itPlain(tc.prompt), tc.ratio, tc.w, tc.h)
			if content != want {
				t.Errorf("content\n%q\nwant\n%q", content, want)
			}
		})
	}
}

func TestIntegEnhance(t *testing.T) {
	const enhancedCat = "A fluffy ginger cat lounging on a terracotta rooftop at golden hour, warm light, soft shadows, cinematic composition, highly detailed"
	up := newFakeUpstream(t)
	llm := newFakeLLM(t, "")
	startCaddy(t, itSite(up, itConfig{llm: llm, enhance: "timeout 2s\n\t\tmodel prompt-writer"}))
	for _, tc := range []struct {
		name, prompt, llmSays string
		wantUser              string // the user message the LLM got
		locked                string // the ratio the system message must lock, if any
		ratio                 string
		w, h                  int
	}{
		{"LLM ratio applies", "a cat on a roof", `{"prompt":"` + enhancedCat + `","aspect_ratio":"16:9"}`,
			"a cat on a roof", "", "16:9", 2048, 1152},
		{"fences and think block", "a cat on a roof", "<think>the user wants a cat</think>\nHere you go:\n```json\n{\"prompt\": \"" + enhancedCat + "\", \"aspect_ratio\": \"9:16\"}\n```",
			"a cat on a roof", "", "9:16", 1152, 2048},
		{"unlisted LLM ratio ignored", "a cat on a roof", `{"prompt":"` + enhancedCat + `","aspect_ratio":"4:3"}`,
			"a cat on a roof", "", "1:1", 2048, 2048},
		{"null LLM ratio", "a cat on a roof", `{"prompt":"` + enhancedCat + `","aspect_ratio":null}`,
			"a cat on a roof", "", "1:1", 2048, 2048},
		{"user ratio wins and is locked", "a cat on a roof, ratio 9:16", `{"prompt":"` + enhancedCat + `","aspect_ratio":"16:9"}`,
			"a cat on a roof", "9:16", "9:16", 1152, 2048},
	} {
		t.Run(tc.name, func(t *testing.T) {
			llm.setHandler(itLLMReplies(tc.llmSays))
			n, nl := len(up.Calls()), len(llm.Calls())
			content := itOK(t, itChatBody(t, tc.prompt))

			lc := itLLMCallsSince(llm, nl)
			if len(lc) != 1 {
				t.Fatalf("LLM received %d calls, want 1", len(lc))
			}
			b := lc[0].Body
			if lc[0].Auth != "Bearer "+testLLMKey || b.Model != "prompt-writer" || b.Temp != 0.7 {
				t.Errorf("LLM request auth %q model %q temperature %v", lc[0].Auth, b.Model, b.Temp)
			}
			if len(b.Messages) != 2 || b.Messages[0].Role != "system" || b.Messages[1].Role != "user" || b.Messages[1].Content != tc.wantUser {
				t.Fatalf("LLM messages %+v", b.Messages)
			}
			sys := b.Messages[0].Content
			if !strings.Contains(sys, "JSON") || !strings.Contains(sys, "aspect_ratio") || !strings.Contains(sys, "verbatim") {
				t.Errorf("system message does not ask for the JSON answer and verbatim image text: %q", sys)
			}
			if mentions := strings.Contains(strings.ToLower(sys), "locked"); mentions != (tc.locked != "") ||
				(tc.locked != "" && !strings.Contains(sys, tc.locked)) {
				t.Errorf("system message locked=%v (ratio %q): %q", mentions, tc.locked, sys)
			}

			c := itOnlyCall(t, up, n)
			if c.Body.Prompt != enhancedCat || c.Body.Width != tc.w || c.Body.Height != tc.h {
				t.Errorf("upstream got %q %dx%d, want the enhanced prompt at %dx%d", c.Body.Prompt, c.Body.Width, c.Body.Height, tc.w, tc.h)
			}
			alt := string([]rune(enhancedCat)[:80])
			want := itMarkdown(strings.TrimSpace(alt), itImageURL(c.Body.Seed), itEnhanced(enhancedCat, tc.prompt), tc.ratio, tc.w, tc.h)
			if content != want {
				t.Errorf("content\n%q\nwant\n%q", content, want)
			}
		})
	}
}

func TestIntegEnhanceDegrades(t *testing.T) {
	t.Setenv("ENHANCE_OPENAI_MODEL", "")
	hang := func(w http.ResponseWriter, r *http.Request) { <-r.Context().Done() }
	for _, tc := range []struct {
		name    string
		handler http.HandlerFunc // nil: the LLM's URL refuses connections
		enhance string
		prompt  string
		want    string // the prompt generated
		ratio   string
		w, h    int
	}{
		{"status 500", func(w http.ResponseWriter, r *http.Request) {
			http.Error(w, `{"error":{"message":"overloaded"}}`, http.StatusInternalServerError)
		}, "", "a lighthouse in a storm", "a lighthouse in a storm", "1:1", 2048, 2048},
		{"garbage text", itLLMReplies("Sorry, I cannot help with that."), "", "a lighthouse, ratio 3:4", "a lighthouse", "3:4", 1536, 2048},
		{"not a chat completion", func(w http.ResponseWriter, r *http.Request) {
			_, _ = io.WriteString(w, "<html>bad gateway</html>")
		}, "", "a lighthouse in a storm", "a lighthouse in a storm", "1:1", 2048, 2048},
		{"empty prompt ignores its ratio", itLLMReplies(`{"prompt":"  ","aspect_ratio":"16:9"}`), "", "a lighthouse in a storm", "a lighthouse in a storm", "1:1", 2048, 2048},
		{"slow past timeout", hang, "timeout 300ms", "a lighthouse in a storm", "a lighthouse in a storm", "1:1", 2048, 2048},
		{"refused", nil, "", "a lighthouse in a storm", "a lighthouse in a storm", "1:1", 2048, 2048},
	} {
		t.Run(tc.name, func(t *testing.T) {
			up := newFakeUpstream(t)
			cfg := itConfig{enhance: tc.enhance}
			var llm *fakeLLM
			if tc.handler != nil {
				llm = newFakeLLM(t, "")
				llm.setHandler(tc.handler)
				cfg.llm = llm
			} else {
				cfg.llmURL = itRefusedURL(t) + "/v1"
			}
			startCaddy(t, itSite(up, cfg))
			content := itOK(t, itChatBody(t, tc.prompt))
			if llm != nil {
				lc := llm.Calls()
				if len(lc) != 1 || lc[0].Body.Model != "gpt-4o-mini" {
					t.Errorf("LLM calls %+v, want one to the default model gpt-4o-mini", lc)
				}
			}
			c := itOnlyCall(t, up, 0)
			if c.Body.Prompt != tc.want || c.Body.Width != tc.w || c.Body.Height != tc.h {
				t.Errorf("upstream got %q %dx%d, want %q %dx%d", c.Body.Prompt, c.Body.Width, c.Body.Height, tc.want, tc.w, tc.h)
			}
			want := itMarkdown(tc.want, itImageURL(c.Body.Seed), itFailed(tc.prompt), tc.ratio, tc.w, tc.h)
			if content != want {
				t.Errorf("content\n%q\nwant\n%q", content, want)
			}
		})
	}
}

func TestIntegSizePriority(t *testing.T) {
	up := newFakeUpstream(t)
	llm := newFakeLLM(t, `{"prompt":"a detailed scene","aspect_ratio":"9:16"}`)
	startCaddy(t, itSite(up, itConfig{llm: llm}))
	for _, tc := range []struct {
		name   string
		prompt string
		kv     []any
		ratio  string
		w, h   int
	}{
		{"body beats user and LLM", "a cat ratio 16:9", []any{"width", 1000, "height", 601}, "Custom", 1000, 600},
		{"rounded to a multiple of 8", "a cat", []any{"width", 1001, "height", 1004}, "Custom", 1000, 1008},
		{"fractions", "a cat", []any{"width", 777.7, "height", 333.3}, "Custom", 776, 336},
		{"clamped", "a cat", []any{"width", 5000, "height", 10}, "Custom", 2048, 64},
		{"width alone is ignored", "a cat", []any{"width", 640}, "9:16", 1152, 2048},
		{"user beats LLM", "a cat ratio 16:9", nil, "16:9", 2048, 1152},
		{"LLM beats the default", "a cat", nil, "9:16", 1152, 2048},
	} {
		t.Run(tc.name, func(t *testing.T) {
			n := len(up.Calls())
			content := itOK(t, itChatBody(t, tc.prompt, tc.kv...))
			c := itOnlyCall(t, up, n)
			if c.Body.Width != tc.w || c.Body.Height != tc.h {
				t.Errorf("upstream size %dx%d, want %dx%d", c.Body.Width, c.Body.Height, tc.w, tc.h)
			}
			tail := "**🎨 Aspect Ratio:** " + tc.ratio + "\n**📐 Resolution:** " + strconv.Itoa(tc.w) + "×" + strconv.Itoa(tc.h)
			if !strings.HasSuffix(content, tail) {
				t.Errorf("content %q does not end with %q", content, tail)
			}
		})
	}
}

func TestIntegParamDefaults(t *testing.T) {
	up := newFakeUpstream(t)
	startCaddy(t, itSite(up, itConfig{}))
	itOK(t, itChatBody(t, "a cat"))
	itOK(t, itChatBody(t, "a cat"))
	calls := up.Calls()
	if len(calls) != 2 {
		t.Fatalf("%d upstream calls", len(calls))
	}
	for i, c := range calls {
		if c.Body.CFG != 7 || c.Body.Steps != 8 || c.Body.ModelIndex != 5 {
			t.Errorf("call %d: cfg %v steps %d model_index %d, want 7, 8, 5", i, c.Body.CFG, c.Body.Steps, c.Body.ModelIndex)
		}
		if c.Body.Seed < 0 || c.Body.Seed >= 2147483647 {
			t.Errorf("call %d: seed %d outside [0, 2147483647)", i, c.Body.Seed)
		}
		if _, present := itObject(t, []byte(c.Raw))["negative_prompt"]; present {
			t.Errorf("call %d: negative_prompt sent without one configured: %s", i, c.Raw)
		}
	}
	if calls[0].Body.Seed == calls[1].Body.Seed {
		t.Errorf("two requests without a seed both used %d", calls[0].Body.Seed)
	}
}

func TestIntegParams(t *testing.T) {
	up := newFakeUpstream(t)
	tuned := "model Z-Image\n\tmodel Z-Tuned {\n\t\tmodel_index 3\n\t\tsteps 20\n\t\tcfg 4.5\n\t\tnegative_prompt \"low quality, watermark\"\n\t}"
	startCaddy(t, itSite(up, itConfig{gateway: tuned}))
	const random = -1
	for _, tc := range []struct {
		name       string
		kv         []any
		cfg        float64
		seed       int64
		negative   string // "" means the field is absent
		index, stp int
	}{
		{"explicit values", []any{"cfg", 3.5, "seed", 42, "negative_prompt", "blurry"}, 3.5, 42, "blurry", 5, 8},
		{"seed as a string", []any{"seed", "123"}, 7, 123, "", 5, 8},
		{"seed null is random", []any{"seed", nil}, 7, random, "", 5, 8},
		{"model defaults", []any{"model", "Z-Tuned"}, 4.5, random, "low quality, watermark", 3, 20},
		{"explicit beats model defaults", []any{"model", "z-tuned", "cfg", 9, "seed", 5, "negative_prompt", "cartoon"}, 9, 5, "cartoon", 3, 20},
	} {
		t.Run(tc.name, func(t *testing.T) {
			n := len(up.Calls())
			content := itOK(t, itChatBody(t, "a cat", tc.kv...))
			c := itOnlyCall(t, up, n)
			b := c.Body
			if b.CFG != tc.cfg || b.NegativePrompt != tc.negative || b.ModelIndex != tc.index || b.Steps != tc.stp {
				t.Errorf("upstream cfg %v negative %q model_index %d steps %d, want %v %q %d %d",
					b.CFG, b.NegativePrompt, b.ModelIndex, b.Steps, tc.cfg, tc.negative, tc.index, tc.stp)
			}
			if tc.seed == random {
				if b.Seed < 0 || b.Seed >= 2147483647 {
					t.Errorf("seed %d outside [0, 2147483647)", b.Seed)
				}
			} else if b.Seed != tc.seed {
				t.Errorf("seed %d, want %d", b.Seed, tc.seed)
			}
			if _, present := itObject(t, []byte(c.Raw))["negative_prompt"]; present != (tc.negative != "") {
				t.Errorf("negative_prompt present=%v in %s", present, c.Raw)
			}
			if !strings.Contains(content, "]("+itImageURL(b.Seed)+")") {
				t.Errorf("content %q lacks the image of seed %d", content, b.Seed)
			}
		})
	}
}

func TestIntegUpstreamRequest(t *testing.T) {
	up := newFakeUpstream(t)
	var mu sync.Mutex
	var method, path string
	var hdr http.Header
	up.setHandler(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		method, path, hdr = r.Method, r.URL.Path, r.Header.Clone()
		mu.Unlock()
		w.Header().Set("Content-Type", "application/json")
		_, _ = io.WriteString(w, `{"success":true,"data":{"image_url":"https://img.example.com/fixed.png"}}`)
	})
	startCaddy(t, itSite(up, itConfig{}))
	content := itOK(t, itChatBody(t, "a red fox in the snow, ratio 3:2", "seed", 2024))

	mu.Lock()
	defer mu.Unlock()
	if method != http.MethodPost || path != "/api/v1/generate_image" {
		t.Errorf("upstream got %s %s", method, path)
	}
	if got := hdr.Get("Authorization"); got != "Bearer "+testSDKey {
		t.Errorf("Authorization %q, want the SD key as a bearer token", got)
	}
	if got := hdr.Get("Content-Type"); got != "application/json" {
		t.Errorf("Content-Type %q", got)
	}
	c := itOnlyCall(t, up, 0)
	raw := itObject(t, []byte(c.Raw))
	want := map[string]any{
		"prompt": "a red fox in the snow", "width": 1920.0, "height": 1280.0,
		"steps": 8.0, "cfg": 7.0, "model_index": 5.0, "seed": 2024.0,
	}
	if strings.Join(itKeys(raw), ",") != strings.Join(itKeys(want), ",") {
		t.Errorf("upstream body keys %v, want %v: %s", itKeys(raw), itKeys(want), c.Raw)
	}
	for k, v := range want {
		if raw[k] != v {
			t.Errorf("upstream %s = %v, want %v", k, raw[k], v)
		}
	}
	wantMD := "![a red fox in the snow](https://img.example.com/fixed.png)\n\n---\n**📝 Prompt:**\na red fox in the snow, ratio 3:2\n\n**🎨 Aspect Ratio:** 3:2\n**📐 Resolution:** 1920×1280"
	if content != wantMD {
		t.Errorf("content\n%q\nwant\n%q", content, wantMD)
	}
}

// TestIntegMarkdown writes the three variants of docs/design.md#the-prompt out in
// full, and the alt text and link rules.
func TestIntegMarkdown(t *testing.T) {
	up := newFakeUpstream(t)
	llm := newFakeLLM(t, "")
	startCaddy(t, itSite(up, itConfig{llm: llm}))
	long := strings.Repeat("猫", 100)
	for _, tc := range []struct {
		name, prompt, llmSays, imageURL string
		want                            string
	}{
		{"plain (skipped)", "a cat no-enhance", "", "https://img.example.com/a.png",
			"![a cat](https://img.example.com/a.png)\n\n---\n**📝 Prompt:**\na cat\n\n**🎨 Aspect Ratio:** 1:1\n**📐 Resolution:** 2048×2048"},
		{"enhanced", "一只猫 比例 16:9", `{"prompt":"a cat, cinematic","aspect_ratio":"1:1"}`, "https://img.example.com/b.png",
			"![a cat, cinematic](https://img.example.com/b.png)\n\n---\n**✨ Enhanced Prompt:**\na cat, cinematic\n\n**📝 Original Input:**\n一只猫 比例 16:9\n\n**🎨 Aspect Ratio:** 16:9\n**📐 Resolution:** 2048×1152"},
		{"failed", "a cat", "no json here", "https://img.example.com/c.png",
			"![a cat](https://img.example.com/c.png)\n\n---\n**⚠️ Enhancement failed, using original prompt**\n\n**📝 Prompt:**\na cat\n\n**🎨 Aspect Ratio:** 1:1\n**📐 Resolution:** 2048×2048"},
		{"alt is 80 runes", long + " no-enhance", "", "https://img.example.com/d.png",
			"![" + strings.Repeat("猫", 80) + "](https://img.example.com/d.png)\n\n---\n**📝 Prompt:**\n" + long + "\n\n**🎨 Aspect Ratio:** 1:1\n**📐 Resolution:** 2048×2048"},
		{"alt of nothing but brackets", "[[ ]] no-enhance", "", "https://img.example.com/f.png",
			"![Generated image](https://img.example.com/f.png)\n\n---\n**📝 Prompt:**\n\\[\\[ \\]\\]\n\n**🎨 Aspect Ratio:** 1:1\n**📐 Resolution:** 2048×2048"},
		{"alt without brackets and newlines; echo on one line, markup escaped", "a [red]\ncat no-enhance", "", "https://img.example.com/e.png",
			"![a redcat](https://img.example.com/e.png)\n\n---\n**📝 Prompt:**\na \\[red\\] cat\n\n**🎨 Aspect Ratio:** 1:1\n**📐 Resolution:** 2048×2048"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			llm.setHandler(itLLMReplies(tc.llmSays))
			up.setHandler(func(w http.ResponseWriter, r *http.Request) {
				w.Header().Set("Content-Type", "application/json")
				_ = json.NewEncoder(w).Encode(map[string]any{"success": true, "data": map[string]any{"image_url": tc.imageURL}})
			})
			if content := itOK(t, itChatBody(t, tc.prompt)); content != tc.want {
				t.Errorf("content\n%q\nwant\n%q", content, tc.want)
			}
		})
	}
	t.Run("image URL with spaces and parentheses", func(t *testing.T) {
		up.setHandler(func(w http.ResponseWriter, r *http.Request) {
			_, _ = io.WriteString(w, `{"success":true,"data":{"image_url":"https://img.example.com/my image (1).png"}}`)
		})
		content := itOK(t, itChatBody(t, "a cat no-enhance"))
		link, _, _ := strings.Cut(strings.TrimPrefix(content, "![a cat]("), "\n")
		if link != "<https://img.example.com/my image (1).png>)" && link != "https://img.example.com/my%20image%20%281%29.png)" {
			t.Errorf("link %q breaks the markdown image", link)
		}
	})
}

// ---- upstream faults ----

func TestIntegUpstreamFaults(t *testing.T) {
	respond := func(status int, body string, hdr ...string) http.HandlerFunc {
		return func(w http.ResponseWriter, r *http.Request) {
			for i := 0; i+1 < len(hdr); i += 2 {
				w.Header().Set(hdr[i], hdr[i+1])
			}
			w.WriteHeader(status)
			_, _ = io.WriteString(w, body)
		}
	}
	for _, tc := range []struct {
		name       string
		handler    http.HandlerFunc
		refused    bool
		upstream   string
		status     int
		code       string
		msg        string // the answer's message contains it
		retryAfter string
		calls      int
	}{
		{name: "refused", refused: true, status: 502, code: "upstream_error", calls: 0},
		{name: "hang past timeout", handler: func(w http.ResponseWriter, r *http.Request) { <-r.Context().Done() },
			upstream: "timeout 1s", status: 504, code: "upstream_timeout", calls: 1},
		{name: "500 with error", handler: respond(500, `{"success":false,"error":"GPU out of memory"}`),
			status: 502, code: "upstream_error", msg: "GPU out of memory", calls: 1},
		{name: "500 with message", handler: respond(500, `{"message":"internal scheduler failure"}`),
			status: 502, code: "upstream_error", msg: "internal scheduler failure", calls: 1},
		{name: "503 is retried once", handler: respond(503, `{"error":{"message":"maintenance"}}`),
			status: 502, code: "upstream_error", msg: "maintenance", calls: 2},
		{name: "429 passes Retry-After", handler: respond(429, `{"error":"too many requests, slow down"}`, "Retry-After", "7"),
			status: 429, code: "rate_limit_exceeded", msg: "slow down", retryAfter: "7", calls: 1},
		{name: "malformed JSON", handler: respond(200, `{"success":true,"data":{"image_url":`),
			status: 502, code: "upstream_error", calls: 1},
		{name: "HTML", handler: respond(200, `<html>maintenance</html>`),
			status: 502, code: "upstream_error", calls: 1},
		{name: "success false", handler: respond(200, `{"success":false,"message":"prompt rejected by the content filter"}`),
			status: 502, code: "upstream_error", msg: "prompt rejected by the content filter", calls: 1},
		{name: "missing image_url", handler: respond(200, `{"success":true,"data":{}}`),
			status: 502, code: "upstream_error", calls: 1},
		{name: "empty image_url", handler: respond(200, `{"success":true,"data":{"image_url":"  "}}`),
			status: 502, code: "upstream_error", calls: 1},
		{name: "redirect is not followed", handler: func(w http.ResponseWriter, r *http.Request) {
			http.Redirect(w, r, "/api/v1/generate_image?again=1", http.StatusFound)
		}, status: 502, code: "upstream_error", msg: "302 Found, a redirect, which the gateway does not follow", calls: 1},
		{name: "echoes the SD key", handler: func(w http.ResponseWriter, r *http.Request) {
			w.WriteHeader(500)
			_, _ = fmt.Fprintf(w, `{"error":"invalid token %s for this account"}`, r.Header.Get("Authorization"))
		}, status: 502, code: "upstream_error", msg: "for this account", calls: 1},
	} {
		t.Run(tc.name, func(t *testing.T) {
			up := newFakeUpstream(t)
			up.setHandler(tc.handler)
			cfg := itConfig{upstream: tc.upstream}
			if tc.refused {
				cfg.upstreamURL = itRefusedURL(t) + "/api/v1/generate_image"
			}
			startCaddy(t, itSite(up, cfg))
			status, hdr, body := itPost(t, itChatBody(t, "a cat"))
			e := itWantErr(t, status, hdr, body, tc.status, tc.code)
			if !strings.Contains(e.Message, tc.msg) {
				t.Errorf("message %q does not carry %q", e.Message, tc.msg)
			}
			if strings.Contains(string(body), testSDKey) || strings.Contains(string(body), testClientKey) {
				t.Errorf("a secret in the answer: %s", body)
			}
			if got := hdr.Get("Retry-After"); got != tc.retryAfter {
				t.Errorf("Retry-After %q, want %q", got, tc.retryAfter)
			}
			if n := len(up.Calls()); n != tc.calls {
				t.Errorf("upstream received %d calls, want %d", n, tc.calls)
			}
		})
	}
}

func TestIntegUpstreamHugeAnswer(t *testing.T) {
	const total = 64 << 20 // far beyond what a bounded reader plus socket buffers take
	up := newFakeUpstream(t)
	var written atomic.Int64
	done := make(chan struct{})
	var once sync.Once
	up.setHandler(func(w http.ResponseWriter, r *http.Request) {
		defer once.Do(func() { close(done) })
		w.Header().Set("Content-Type", "application/json")
		// a well-formed success whose image_url is enormous: an unbounded
		// reader would even answer 200
		n, _ := io.WriteString(w, `{"success":true,"data":{"image_url":"https://img.example.com/`)
		written.Add(int64(n))
		chunk := bytes.Repeat([]byte("a"), 64<<10)
		for written.Load() < total {
			n, err := w.Write(chunk)
			written.Add(int64(n))
			if err != nil {
				return
			}
		}
		_, _ = io.WriteString(w, `.png"}}`)
	})
	startCaddy(t, itSite(up, itConfig{upstream: "timeout 30s"}))
	status, hdr, body := itPost(t, itChatBody(t, "a cat"))
	itWantErr(t, status, hdr, body, http.StatusBadGateway, "upstream_error")
	if len(body) > 4096 {
		t.Errorf("error answer of %d bytes", len(body))
	}
	select {
	case <-done:
	case <-time.After(30 * time.Second):
		t.Fatal("the fake upstream is still writing: the gateway kept reading")
	}
	if n := written.Load(); n >= total {
		t.Errorf("the gateway read all %d bytes of the answer", n)
	}
}

func TestIntegClientGoneCancels(t *testing.T) {
	for _, tc := range []struct {
		name  string
		inLLM bool
	}{
		{"during generation", false},
		{"during enhancement", true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			up := newFakeUpstream(t)
			llm := newFakeLLM(t, `{"prompt":"an enhanced cat","aspect_ratio":null}`)
			started, cancelled := make(chan struct{}), make(chan struct{})
			var startOnce, cancelOnce sync.Once
			block := func(w http.ResponseWriter, r *http.Request) {
				startOnce.Do(func() { close(started) })
				<-r.Context().Done()
				cancelOnce.Do(func() { close(cancelled) })
			}
			if tc.inLLM {
				llm.setHandler(block)
			} else {
				up.setHandler(block)
			}
			// timeouts far beyond the waits below: only the client leaving
			// can end the fakes' requests in time
			startCaddy(t, itSite(up, itConfig{llm: llm, upstream: "timeout 60s", enhance: "timeout 60s"}))

			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			req, err := http.NewRequestWithContext(ctx, http.MethodPost, baseURL+"/v1/chat/completions", strings.NewReader(itChatBody(t, "a cat")))
			if err != nil {
				t.Fatal(err)
			}
			req.Header.Set("Authorization", "Bearer "+testClientKey)
			req.Header.Set("Content-Type", "application/json")
			errc := make(chan error, 1)
			go func() {
				resp, err := testClient(0).Do(req)
				if err == nil {
					resp.Body.Close()
				}
				errc <- err
			}()
			select {
			case <-started:
			case <-time.After(20 * time.Second):
				t.Fatal("the fake never received the request")
			}
			cancel()
			select {
			case <-cancelled:
			case <-time.After(20 * time.Second):
				t.Fatal("the gateway did not cancel its call when the client went away")
			}
			if err := <-errc; err == nil {
				t.Error("the cancelled request got an answer")
			}
		})
	}
}

// ---- configuration through Caddy ----

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

// itLoadError posts a whole Caddyfile to Caddy's admin /load, as `caddy run`
// or `caddy reload` would, and returns the error Caddy answers; a config
// that loads fails the test.
func itLoadError(t *testing.T, caddyfile string) string {
	t.Helper()
	// make sure the in-process Caddy runs; a failed load keeps this config
	startCaddy(t, `respond "up" 200`)
	req, err := http.NewRequest(http.MethodPost, fmt.Sprintf("http://localhost:%d/load", adminPort), strings.NewReader(caddyfile))
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Content-Type", "text/caddyfile")
	resp, err := testClient(30 * time.Second).Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	if resp.StatusCode == http.StatusOK {
		t.Fatalf("the config loaded; want a load error:\n%s", caddyfile)
	}
	// the previous config still serves
	if status, _, b := do(t, http.MethodGet, "/", "", "Authorization", ""); status != http.StatusOK || string(b) != "up" {
		t.Errorf("after a failed load the running config answers %d %q", status, b)
	}
	return string(body)
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
