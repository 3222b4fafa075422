package zimage

import (
	"context"
	"encoding/json"
	"errors"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"go.uber.org/zap"
)

// The prompt is the non-blank top-level prompt, else the
// last user message (a string, or text parts joined by a space).
func TestUnitDecodeChat(t *testing.T) {
	for _, tc := range []struct {
		name, body string
		prompt     string
		param      string // for a 400: the param the error names ("" for null)
		wantErr    bool
	}{
		{"top-level prompt wins", `{"prompt":"a cat","messages":[{"role":"user","content":"a dog"}]}`, "a cat", "", false},
		{"top-level prompt alone", `{"prompt":"  a cat \n"}`, "a cat", "", false},
		{"blank top-level prompt falls back", `{"prompt":"  \t","messages":[{"role":"user","content":"a dog"}]}`, "a dog", "", false},
		{"null top-level prompt falls back", `{"prompt":null,"messages":[{"role":"user","content":"a dog"}]}`, "a dog", "", false},
		{"last user message", `{"messages":[{"role":"system","content":"be nice"},{"role":"user","content":"first"},{"role":"assistant","content":"![x](y)"},{"role":"user","content":"second"},{"role":"assistant","content":"later"}]}`, "second", "", false},
		{"user message trimmed", `{"messages":[{"role":"user","content":"  a cat\n"}]}`, "a cat", "", false},
		{"text parts joined by a space", `{"messages":[{"role":"user","content":[{"type":"text","text":"a cat"},{"type":"text","text":"on a roof"}]}]}`, "a cat on a roof", "", false},
		{"non-text parts ignored", `{"messages":[{"role":"user","content":[{"type":"image_url","image_url":{"url":"https://x/y.png"}},{"type":"text","text":"a cat"},{"type":"input_audio","input_audio":{"data":"AAAA"}},{"type":"text","text":"at night"}]}]}`, "a cat at night", "", false},
		{"blank text parts skipped", `{"messages":[{"role":"user","content":[{"type":"text","text":"a cat"},{"type":"text","text":"  "},{"type":"text","text":"b"}]}]}`, "a cat b", "", false},
		{"unknown fields ignored", `{"model":"dall-e-3","temperature":0.2,"tools":[],"n":1,"user":"u","messages":[{"role":"user","content":"a cat","name":"bob"}]}`, "a cat", "", false},
		{"multi-line prompt kept", `{"messages":[{"role":"user","content":"a cat\non a roof"}]}`, "a cat\non a roof", "", false},

		{"no user message", `{"messages":[{"role":"system","content":"be nice"},{"role":"assistant","content":"hi"}]}`, "", "messages", true},
		{"no messages", `{"model":"Z-Image"}`, "", "messages", true},
		{"empty messages", `{"messages":[]}`, "", "messages", true},
		{"blank user message", `{"messages":[{"role":"user","content":"   "}]}`, "", "messages", true},
		{"last user message blank", `{"messages":[{"role":"user","content":"a cat"},{"role":"user","content":""}]}`, "", "messages", true},
		{"null content", `{"messages":[{"role":"user","content":null}]}`, "", "messages", true},
		{"only image parts", `{"messages":[{"role":"user","content":[{"type":"image_url","image_url":{"url":"https://x"}}]}]}`, "", "messages", true},
		{"blank prompt and nothing else", `{"prompt":""}`, "", "messages", true},

		{"messages not an array", `{"messages":"a cat"}`, "", "messages", true},
		{"prompt not a string", `{"prompt":5}`, "", "prompt", true},
		{"model not a string", `{"model":3,"prompt":"a cat"}`, "", "model", true},
		{"stream not a boolean", `{"stream":"yes","prompt":"a cat"}`, "", "stream", true},
		{"width not a number", `{"width":"big","prompt":"a cat"}`, "", "width", true},
		{"height not a number", `{"height":[1],"prompt":"a cat"}`, "", "height", true},
		{"cfg not a number", `{"cfg":"7","prompt":"a cat"}`, "", "cfg", true},
		{"negative_prompt not a string", `{"negative_prompt":1,"prompt":"a cat"}`, "", "negative_prompt", true},
		{"include_usage not a boolean", `{"stream_options":{"include_usage":"yes"},"prompt":"a cat"}`, "", "stream_options.include_usage", true},
		{"role not a string", `{"messages":[{"role":1,"content":"a cat"}]}`, "", "messages.role", true},
		{"content a number", `{"messages":[{"role":"user","content":5}]}`, "", "messages[0].content", true},
		{"content an object", `{"messages":[{"role":"system","content":"x"},{"role":"user","content":{"text":"a cat"}}]}`, "", "messages[1].content", true},
		{"parts not objects", `{"messages":[{"role":"user","content":["a cat"]}]}`, "", "messages[0].content", true},
		{"part text not a string", `{"messages":[{"role":"user","content":[{"type":"text","text":5}]}]}`, "", "messages[0].content", true},
		{"body an array", `[{"prompt":"a cat"}]`, "", "", true},
		{"body not JSON", `prompt=a cat`, "", "", true},
		{"truncated JSON", `{"prompt":"a cat"`, "", "", true},
		{"empty body", ``, "", "", true},
		{"blank body", " \n ", "", "", true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			req, prompt, e := decodeChat([]byte(tc.body), 1000)
			if tc.wantErr {
				if e == nil {
					t.Fatalf("decodeChat(%s) = %q, want a 400", tc.body, prompt)
				}
				if e.status != http.StatusBadRequest || e.typ != "invalid_request_error" || e.message == "" {
					t.Errorf("error %+v, want a 400 invalid_request_error with a message", e)
				}
				if e.param != tc.param {
					t.Errorf("error param %q, want %q (message %q)", e.param, tc.param, e.message)
				}
				if req != nil || prompt != "" {
					t.Errorf("a failed decode returned %+v, %q", req, prompt)
				}
				return
			}
			if e != nil {
				t.Fatalf("decodeChat(%s): %+v", tc.body, e)
			}
			if prompt != tc.prompt || req == nil {
				t.Fatalf("decodeChat(%s) prompt %q, want %q", tc.body, prompt, tc.prompt)
			}
		})
	}
}

// The fields the pipeline reads come through decodeChat.
func TestUnitDecodeChatFields(t *testing.T) {
	req, prompt, e := decodeChat([]byte(`{"model":"DALL-E-3","stream":true,"stream_options":{"include_usage":true},
		"prompt":"a cat","width":1000,"height":500,"cfg":4.5,"seed":"12","negative_prompt":"blurry"}`), 1000)
	if e != nil {
		t.Fatal(e)
	}
	if prompt != "a cat" || req.Model != "DALL-E-3" || !req.Stream || req.StreamOptions == nil || !req.StreamOptions.IncludeUsage ||
		req.Width == nil || *req.Width != 1000 || req.Height == nil || *req.Height != 500 ||
		req.CFG == nil || *req.CFG != 4.5 || string(req.Seed) != `"12"` ||
		req.NegativePrompt == nil || *req.NegativePrompt != "blurry" {
		t.Fatalf("decoded %+v", req)
	}
}

// The prompt limit counts runes, and names the field the prompt came from.
func TestUnitDecodeChatPromptLength(t *testing.T) {
	for _, tc := range []struct {
		name, body, param string
		wantErr           bool
	}{
		{"5 CJK runes fit 5", `{"prompt":"猫猫猫猫猫"}`, "", false},
		{"6 runes do not", `{"prompt":"abcdef"}`, "prompt", true},
		{"from a message", `{"messages":[{"role":"user","content":"abcdef"}]}`, "messages[0].content", true},
		{"trimmed before counting", `{"prompt":"  abcde  "}`, "", false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, _, e := decodeChat([]byte(tc.body), 5)
			if (e != nil) != tc.wantErr {
				t.Fatalf("decodeChat(%s) error %+v, want error %v", tc.body, e, tc.wantErr)
			}
			if e != nil && (e.status != http.StatusBadRequest || e.param != tc.param) {
				t.Fatalf("error %+v, want a 400 naming %q", e, tc.param)
			}
		})
	}
}

// Seed is an integer or an integer string; null or absent
// means random (nil); negative numbers pass through and newJob makes them
// random; anything else is a 400 naming seed.
func TestUnitParseSeed(t *testing.T) {
	for _, tc := range []struct {
		name, raw string
		want      int64
		isNil     bool
		wantErr   bool
	}{
		{"absent", ``, 0, true, false},
		{"null", `null`, 0, true, false},
		{"integer", `123`, 123, false, false},
		{"zero", `0`, 0, false, false},
		{"integer string", `"123"`, 123, false, false},
		{"integer string with spaces", `" 42 "`, 42, false, false},
		{"largest", `2147483646`, 2147483646, false, false},
		{"negative means random later", `-1`, -1, false, false},
		{"negative string", `"-7"`, -7, false, false},

		{"2^31-1 is too big", `2147483647`, 0, false, true},
		{"much too big", `99999999999999999999`, 0, false, true},
		{"not a number", `"abc"`, 0, false, true},
		{"empty string", `""`, 0, false, true},
		{"fraction", `1.5`, 0, false, true},
		{"fraction string", `"1.5"`, 0, false, true},
		{"integral number", `42.0`, 42, false, false},
		{"integral exponent", `4.2e1`, 42, false, false},
		{"exponent", `1e3`, 1000, false, false},
		{"integral but too big", `1e10`, 0, false, true},
		{"integral number in a string", `"42.0"`, 0, false, true},
		{"boolean", `true`, 0, false, true},
		{"object", `{}`, 0, false, true},
		{"array", `[1]`, 0, false, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, e := parseSeed(json.RawMessage(tc.raw))
			if tc.wantErr {
				if e == nil || e.status != http.StatusBadRequest || e.param != "seed" {
					t.Fatalf("parseSeed(%s) = %v, %+v, want a 400 naming seed", tc.raw, got, e)
				}
				return
			}
			if e != nil {
				t.Fatalf("parseSeed(%s): %+v", tc.raw, e)
			}
			if tc.isNil != (got == nil) || (got != nil && *got != tc.want) {
				t.Fatalf("parseSeed(%s) = %v, want %d (nil %v)", tc.raw, got, tc.want, tc.isNil)
			}
		})
	}
}

// checkParams drops a lone width or height and rejects absurd values.
func TestUnitCheckParams(t *testing.T) {
	f := func(v float64) *float64 { return &v }
	for _, tc := range []struct {
		name          string
		width, height *float64
		cfg           *float64
		param         string // "" when valid
		keepSize      bool
	}{
		{"nothing", nil, nil, nil, "", false},
		{"both sides", f(1024), f(768), nil, "", true},
		{"width alone dropped", f(1024), nil, nil, "", false},
		{"height alone dropped", nil, f(768), nil, "", false},
		{"zero width", f(0), f(768), nil, "width", false},
		{"negative height", f(1024), f(-1), nil, "width", false},
		{"tiny is clamped later, not rejected", f(1), f(1), nil, "", true},
		{"cfg 7", nil, nil, f(7), "", false},
		{"cfg 30", nil, nil, f(30), "", false},
		{"cfg 0", nil, nil, f(0), "cfg", false},
		{"cfg negative", nil, nil, f(-2), "cfg", false},
		{"cfg over 30", nil, nil, f(30.5), "cfg", false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p := jobParams{prompt: "a cat", width: tc.width, height: tc.height, cfg: tc.cfg}
			e := checkParams(&p)
			if tc.param == "" {
				if e != nil {
					t.Fatalf("checkParams: %+v", e)
				}
			} else if e == nil || e.status != http.StatusBadRequest || e.param != tc.param {
				t.Fatalf("checkParams = %+v, want a 400 naming %s", e, tc.param)
			}
			if e == nil && tc.keepSize != (p.width != nil && p.height != nil) {
				t.Fatalf("after checkParams width %v height %v, want size kept %v", p.width, p.height, tc.keepSize)
			}
			if e == nil && (p.width == nil) != (p.height == nil) {
				t.Fatal("checkParams left one side without the other")
			}
		})
	}
}

// newJob settles docs/design.md#the-prompt before enhancement.
func TestUnitNewJob(t *testing.T) {
	m := &model{name: "Z-Image", modelIndex: 5, steps: 8, cfg: 7, negativePrompt: "lowres"}
	f := func(v float64) *float64 { return &v }
	seed := func(v int64) *int64 { return &v }
	neg := func(s string) *string { return &s }
	for _, tc := range []struct {
		name          string
		p             jobParams
		requested     string
		original      string
		cleaned       string
		skip          bool
		ratio         string
		source        string
		w, h          int
		seed          int64 // -1: random
		cfg           float64
		negative      string
		wantRequested string
	}{
		{"defaults", jobParams{prompt: "a cat"}, "", "a cat", "a cat", false, "1:1", ratioFromDefault, 2048, 2048, -1, 7, "lowres", "Z-Image"},
		{"user ratio", jobParams{prompt: "一只猫，比例 16:9"}, "z-image", "一只猫，比例 16:9", "一只猫", false, "16:9", ratioFromUser, 2048, 1152, -1, 7, "lowres", "z-image"},
		{"skip word and ratio", jobParams{prompt: "a cat ratio 9:16 no-enhance"}, "dall-e-3", "a cat ratio 9:16", "a cat", true, "9:16", ratioFromUser, 1152, 2048, -1, 7, "lowres", "dall-e-3"},
		{"body size wins over ratio", jobParams{prompt: "a cat ratio 9:16", width: f(1000), height: f(500.4)}, "", "a cat ratio 9:16", "a cat", false, customRatio, ratioFromBody, 1000, 504, -1, 7, "lowres", "Z-Image"},
		{"body size clamped", jobParams{prompt: "a cat", width: f(10), height: f(9000)}, "", "a cat", "a cat", false, customRatio, ratioFromBody, 64, 2048, -1, 7, "lowres", "Z-Image"},
		{"explicit seed cfg negative", jobParams{prompt: "a cat", seed: seed(42), cfg: f(3.5), negative: neg("")}, "", "a cat", "a cat", false, "1:1", ratioFromDefault, 2048, 2048, 42, 3.5, "", "Z-Image"},
		{"seed zero kept", jobParams{prompt: "a cat", seed: seed(0)}, "", "a cat", "a cat", false, "1:1", ratioFromDefault, 2048, 2048, 0, 7, "lowres", "Z-Image"},
		{"negative seed is random", jobParams{prompt: "a cat", seed: seed(-1)}, "", "a cat", "a cat", false, "1:1", ratioFromDefault, 2048, 2048, -1, 7, "lowres", "Z-Image"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			g := &Gateway{}
			r := httptest.NewRequest(http.MethodPost, "http://gw.example/v1/chat/completions", nil)
			j, e := g.newJob(&ask{endpoint: endpointChat, model: m, requested: tc.requested, params: tc.p}, nil, requestOrigin(r))
			if e != nil {
				t.Fatal(e)
			}
			if j.original != tc.original || j.cleaned != tc.cleaned || j.prompt != tc.cleaned || j.skip != tc.skip {
				t.Errorf("prompts original %q cleaned %q prompt %q skip %v", j.original, j.cleaned, j.prompt, j.skip)
			}
			if j.ratio != tc.ratio || j.ratioSource != tc.source || j.width != tc.w || j.height != tc.h {
				t.Errorf("size %s (%s) %dx%d, want %s (%s) %dx%d", j.ratio, j.ratioSource, j.width, j.height, tc.ratio, tc.source, tc.w, tc.h)
			}
			if tc.seed >= 0 && j.seed != tc.seed {
				t.Errorf("seed %d, want %d", j.seed, tc.seed)
			}
			if j.seed < 0 || j.seed >= maxSeed {
				t.Errorf("seed %d outside [0, 2147483647)", j.seed)
			}
			if j.cfg != tc.cfg || j.negative != tc.negative || j.requested != tc.wantRequested {
				t.Errorf("cfg %v negative %q requested %q", j.cfg, j.negative, j.requested)
			}
			if j.origin != "http://gw.example" {
				t.Errorf("origin %q", j.origin)
			}
		})
	}
}

// A fresh random seed for every request without one (docs/design.md#the-prompt).
func TestUnitNewJobRandomSeeds(t *testing.T) {
	m := &model{name: "Z-Image", steps: 8, cfg: 7}
	r := httptest.NewRequest(http.MethodPost, "/v1/chat/completions", nil)
	seen := map[int64]bool{}
	for range 20 {
		j, e := (&Gateway{}).newJob(&ask{endpoint: endpointChat, model: m, requested: "", params: jobParams{prompt: "a cat"}}, nil, requestOrigin(r))
		if e != nil {
			t.Fatal(e)
		}
		seen[j.seed] = true
	}
	if len(seen) < 19 { // a repeat among 20 draws from 2^31 is all but impossible
		t.Fatalf("20 requests got only %d distinct seeds", len(seen))
	}
}

// A prompt that is only a ratio or the skip word is a 400.
func TestUnitNewJobEmptyPrompt(t *testing.T) {
	m := &model{name: "Z-Image", steps: 8, cfg: 7}
	r := httptest.NewRequest(http.MethodPost, "/v1/chat/completions", nil)
	for _, p := range []string{"比例 16:9", "no-enhance", "ratio 1:1 no-enhance", "比例：9:16。"} {
		j, e := (&Gateway{}).newJob(&ask{endpoint: endpointChat, model: m, requested: "", params: jobParams{prompt: p}}, nil, requestOrigin(r))
		if e == nil || e.status != http.StatusBadRequest || e.param != "prompt" {
			t.Errorf("newJob(%q) = %+v, %+v, want a 400 naming prompt", p, j, e)
		}
	}
}

// unitGenerator is an image service that answers url (or err) and records
// what it was asked.
type unitGenerator struct {
	url string
	err error

	mu   sync.Mutex
	reqs []upstreamRequest
}

func (s *unitGenerator) generate(ctx context.Context, _ string, req upstreamRequest, origin string) (upstreamResult, *upstreamError) {
	s.mu.Lock()
	s.reqs = append(s.reqs, req)
	s.mu.Unlock()
	if s.err != nil {
		var ue *upstreamError
		if !errors.As(s.err, &ue) {
			ue = &upstreamError{kind: kindBadResponse, message: s.err.Error()}
		}
		return upstreamResult{}, ue
	}
	return upstreamResult{imageURL: s.url}, nil
}

func (s *unitGenerator) requests() []upstreamRequest {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]upstreamRequest(nil), s.reqs...)
}

// unitGateway is a Gateway assembled by hand around a generator and an
// optional enhancer, enough for newJob, runEnhance, generate and markdown.
func unitGateway(up generator, enh *enhancer) *Gateway {
	return &Gateway{upstream: up, accounts: unitPool(), enhancer: enh, logger: zap.NewNop(), scrub: newScrubber([]string{testSDKey, testLLMKey})}
}

// The markdown content, byte for byte, for each enhancement
// outcome and for a custom size, produced by the real pipeline (newJob,
// runEnhance, generate) around a stub image service and an httptest LLM.
func TestUnitMarkdown(t *testing.T) {
	llmOK, llmRecs := unitLLM(t, `<think>short idea</think>{"prompt":"A fluffy [orange] cat\non a sunny roof","aspect_ratio":"9:16"}`, nil)
	llmDown, _ := unitLLM(t, "", func(w http.ResponseWriter, r *http.Request) {
		http.Error(w, "overloaded", http.StatusServiceUnavailable)
	})
	okEnh := newEnhancer(llmOK.URL+"/v1", testLLMKey, "m", defaultSystemPrompt, 5*time.Second)
	downEnh := newEnhancer(llmDown.URL+"/v1", testLLMKey, "m", defaultSystemPrompt, 5*time.Second)
	f := func(v float64) *float64 { return &v }

	const url = "https://img.example.com/out/a b(1).png"
	const mdURL = "https://img.example.com/out/a%20b%281%29.png"
	const llmPrompt = "A fluffy [orange] cat\non a sunny roof"
	// echoed prompts keep to one line and show markup characters literally
	const llmEcho = `A fluffy \[orange\] cat on a sunny roof`
	for _, tc := range []struct {
		name    string
		enh     *enhancer
		p       jobParams
		want    string
		wantLLM bool
		sent    string // the prompt the image service got
		w, h    int
	}{
		{
			name: "enhanced, LLM ratio", enh: okEnh, p: jobParams{prompt: "一只猫"}, wantLLM: true,
			want: "![A fluffy orange caton a sunny roof](" + mdURL + ")\n\n---\n" +
				"**✨ Enhanced Prompt:**\n" + llmEcho + "\n\n" +
				"**📝 Original Input:**\n一只猫\n\n" +
				"**🎨 Aspect Ratio:** 9:16\n**📐 Resolution:** 1152×2048",
			sent: llmPrompt, w: 1152, h: 2048,
		},
		{
			name: "enhanced, user ratio locked", enh: okEnh, p: jobParams{prompt: "一只猫，比例 16:9"}, wantLLM: true,
			want: "![A fluffy orange caton a sunny roof](" + mdURL + ")\n\n---\n" +
				"**✨ Enhanced Prompt:**\n" + llmEcho + "\n\n" +
				"**📝 Original Input:**\n一只猫，比例 16:9\n\n" +
				"**🎨 Aspect Ratio:** 16:9\n**📐 Resolution:** 2048×1152",
			sent: llmPrompt, w: 2048, h: 1152,
		},
		{
			name: "enhanced, custom size", enh: okEnh, p: jobParams{prompt: "a cat", width: f(1000), height: f(500)}, wantLLM: true,
			want: "![A fluffy orange caton a sunny roof](" + mdURL + ")\n\n---\n" +
				"**✨ Enhanced Prompt:**\n" + llmEcho + "\n\n" +
				"**📝 Original Input:**\na cat\n\n" +
				"**🎨 Aspect Ratio:** Custom\n**📐 Resolution:** 1000×504",
			sent: llmPrompt, w: 1000, h: 504,
		},
		{
			name: "enhancement failed", enh: downEnh, p: jobParams{prompt: "a cat, ratio 3:2"}, wantLLM: true,
			want: "![a cat](" + mdURL + ")\n\n---\n" +
				"**⚠️ Enhancement failed, using original prompt**\n\n" +
				"**📝 Prompt:**\na cat, ratio 3:2\n\n" +
				"**🎨 Aspect Ratio:** 3:2\n**📐 Resolution:** 1920×1280",
			sent: "a cat", w: 1920, h: 1280,
		},
		{
			name: "skipped", enh: okEnh, p: jobParams{prompt: "a [cat] no-enhance"},
			want: "![a cat](" + mdURL + ")\n\n---\n" +
				"**📝 Prompt:**\na \\[cat\\]\n\n" +
				"**🎨 Aspect Ratio:** 1:1\n**📐 Resolution:** 2048×2048",
			sent: "a [cat]", w: 2048, h: 2048,
		},
		{
			name: "not configured, custom size", enh: nil, p: jobParams{prompt: "a cat ratio 16:9", width: f(512), height: f(768)},
			want: "![a cat](" + mdURL + ")\n\n---\n" +
				"**📝 Prompt:**\na cat ratio 16:9\n\n" +
				"**🎨 Aspect Ratio:** Custom\n**📐 Resolution:** 512×768",
			sent: "a cat", w: 512, h: 768,
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			up := &unitGenerator{url: url}
			g := unitGateway(up, tc.enh)
			m := &model{name: "Z-Image", modelIndex: 5, steps: 8, cfg: 7}
			r := httptest.NewRequest(http.MethodPost, "/v1/chat/completions", nil)
			before := len(llmRecs())
			j, e := g.newJob(&ask{endpoint: endpointChat, model: m, requested: "", params: tc.p}, nil, requestOrigin(r))
			if e != nil {
				t.Fatal(e)
			}
			g.runEnhance(context.Background(), j)
			if e := g.generate(context.Background(), j); e != nil {
				t.Fatal(e)
			}
			if got := g.markdown(j); got != tc.want {
				t.Fatalf("markdown:\n got %q\nwant %q", got, tc.want)
			}
			if tc.enh == okEnh {
				if called := len(llmRecs()) > before; called != tc.wantLLM {
					t.Errorf("LLM called %v, want %v", called, tc.wantLLM)
				}
			}
			reqs := up.requests()
			if len(reqs) != 1 {
				t.Fatalf("image service got %d requests", len(reqs))
			}
			want := upstreamRequest{Prompt: tc.sent, Width: tc.w, Height: tc.h, Steps: 8, CFG: 7, ModelIndex: 5, Seed: j.seed}
			if reqs[0] != want {
				t.Fatalf("image service got %+v, want %+v", reqs[0], want)
			}
		})
	}
}

// A demo answer says in the markdown that the image is a
// placeholder; a real one never does.
func TestUnitMarkdownDemoNote(t *testing.T) {
	m := &model{name: "Z-Image", modelIndex: 5, steps: 8, cfg: 7}
	r := httptest.NewRequest(http.MethodPost, "http://localhost:8080/v1/chat/completions", nil)
	for _, tc := range []struct {
		name     string
		up       generator
		wantNote bool
	}{
		{"demo", demoGenerator{}, true},
		{"real", &unitGenerator{url: "https://img.example.com/1.png"}, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			g := unitGateway(tc.up, nil)
			j, e := g.newJob(&ask{endpoint: endpointChat, model: m, requested: "", params: jobParams{prompt: "a cat", seed: ptr(int64(7))}}, nil, requestOrigin(r))
			if e != nil {
				t.Fatal(e)
			}
			g.runEnhance(context.Background(), j)
			if e := g.generate(context.Background(), j); e != nil {
				t.Fatal(e)
			}
			md := g.markdown(j)
			prefix := "![a cat](" + markdownURL(j.imageURL) + ")\n\n---\n**📝 Prompt:**\na cat\n\n**🎨 Aspect Ratio:** 1:1\n**📐 Resolution:** 2048×2048"
			if !strings.HasPrefix(md, prefix) {
				t.Fatalf("markdown %q, want it to start with %q", md, prefix)
			}
			note := strings.TrimPrefix(md, prefix)
			if tc.wantNote != strings.Contains(strings.ToLower(note), "placeholder") {
				t.Fatalf("after the resolution: %q, want a placeholder note %v", note, tc.wantNote)
			}
			if tc.wantNote && j.imageURL != "http://localhost:8080/v1/zimage-demo/2048x2048.png?seed=7" {
				t.Fatalf("demo image URL %q", j.imageURL)
			}
		})
	}
}
