package zimage

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"reflect"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
	"unicode/utf8"

	"go.uber.org/zap"
)

// The prompt is the non-blank top-level prompt, else the
// last user message (a string, or text parts joined by a space).
func TestUnitDecodeChat(t *testing.T) {
	t.Parallel()
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
	t.Parallel()
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
	t.Parallel()
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
	t.Parallel()
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
	t.Parallel()
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
	t.Parallel()
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
	t.Parallel()
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
	t.Parallel()
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
	t.Parallel()
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

// Markdown safety: whatever the prompts and the image URL hold,
// the answer has one link — the image — and each prompt stays on its line
// in its own section.
func TestUnitMarkdownSafety(t *testing.T) {
	t.Parallel()
	hostile := []string{
		"x\n\n**🎨 Aspect Ratio:** 1:1\n**📐 Resolution:** 1×1",
		"![evil](javascript:alert(1))",
		"[click](https://evil.example/)",
		"<img src=x onerror=alert(1)>",
		"<https://evil.example/>",
		"`code` and ```fences```",
		`\[already escaped\](x)`,
		"line\r\nbreaks\rand\nmore",
	}
	urls := []string{
		"https://img.example.com/a.png",
		"https://img.example.com/a b).png",
		"https://img.example.com/x](javascript:alert(1))",
		"https://img.example.com/<script>\n.png",
	}
	g := &Gateway{upstream: (*imageClient)(nil)}
	for _, p := range hostile {
		for _, u := range urls {
			for _, outcome := range []string{enhanceOK, enhanceFailed, enhanceSkipped} {
				j := &job{imageURL: u, prompt: p, original: p, enhance: outcome, ratio: "1:1", width: 2048, height: 2048}
				md := g.markdown(j)
				if n := strings.Count(md, "\n"); n != map[string]int{enhanceOK: 10, enhanceFailed: 9, enhanceSkipped: 7}[outcome] {
					t.Errorf("prompt %q, url %q, %s: %d lines, a prompt broke out of its section:\n%s", p, u, outcome, n, md)
				}
				if links := unescapedCount(md, "]("); links != 1 {
					t.Errorf("prompt %q, url %q: %d links, want only the image:\n%s", p, u, links, md)
				}
				if unescapedCount(md, "<") != 0 || unescapedCount(md, "`") != 0 {
					t.Errorf("prompt %q, url %q: raw HTML or code markup survived:\n%s", p, u, md)
				}
				if !strings.HasPrefix(md, "![") {
					t.Errorf("answer does not start with the image: %q", md)
				}
			}
		}
	}
}

// unescapedCount counts occurrences of sub not preceded by an odd run of
// backslashes.
func unescapedCount(s, sub string) int {
	n := 0
	for i := 0; ; {
		j := strings.Index(s[i:], sub)
		if j < 0 {
			return n
		}
		j += i
		bs := 0
		for k := j - 1; k >= 0 && s[k] == '\\'; k-- {
			bs++
		}
		if bs%2 == 0 {
			n++
		}
		i = j + len(sub)
	}
}

func TestUnitWriteEcho(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct{ in, want string }{
		{"一只猫在看书", "一只猫在看书"},
		{"a cat, (masterpiece:1.2), *soft* light", "a cat, (masterpiece:1.2), *soft* light"},
		{"a [red] cat", `a \[red\] cat`},
		{"<lora:x>", `\<lora:x\>`},
		{`back\slash`, `back\\slash`},
		{"two\nlines", "two lines"},
		{"crlf\r\nline", "crlf line"},
	} {
		var b strings.Builder
		writeEcho(&b, tc.in)
		if b.String() != tc.want {
			t.Errorf("writeEcho(%q) = %q, want %q", tc.in, b.String(), tc.want)
		}
	}
}

func FuzzUnitDecodeChat(f *testing.F) {
	for _, s := range []string{
		`{"prompt":"a cat"}`,
		`{"prompt":"  ","messages":[{"role":"user","content":"a dog"}]}`,
		`{"model":"Z-Image","messages":[{"role":"system","content":"x"},{"role":"user","content":[{"type":"text","text":"a"},{"type":"image_url","image_url":{"url":"u"}}]}]}`,
		`{"messages":[{"role":"user","content":5}]}`,
		`{"messages":[{"role":"user","content":["x"]}]}`,
		`{"messages":"a"}`, `{"prompt":1}`, `{"stream":"x","prompt":"p"}`, `{"width":"w"}`,
		`{"stream_options":{"include_usage":1}}`, `{"seed":{"a":1},"prompt":"p"}`,
		`[]`, `null`, `""`, ``, `{`, `{"prompt":"` + strings.Repeat("猫", 101) + `"}`,
		`{"messages":[{"role":"user","content":"\u0000"}]}`, `{"prompt":"\ud800"}`,
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, body []byte) {
		req, prompt, e := decodeChat(body, 100)
		if e != nil {
			if e.status != http.StatusBadRequest || e.message == "" || e.typ != "invalid_request_error" || req != nil || prompt != "" {
				t.Fatalf("decodeChat(%q) failed with %+v (req %v, prompt %q), want a plain 400", body, e, req, prompt)
			}
			return
		}
		if req == nil || prompt == "" || prompt != strings.TrimSpace(prompt) || utf8.RuneCountInString(prompt) > 100 {
			t.Fatalf("decodeChat(%q) = %v, %q: want a trimmed, non-empty prompt within the limit", body, req, prompt)
		}
		// what follows decoding must not panic either
		if _, e := parseSeed(req.Seed); e != nil && (e.status != http.StatusBadRequest || e.param != "seed") {
			t.Fatalf("parseSeed(%q) = %+v", req.Seed, e)
		}
	})
}

// percentDecode undoes markdownURL's %XX escapes.
func percentDecode(s string) string {
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '%' && i+2 < len(s) {
			if v, err := strconv.ParseUint(s[i+1:i+3], 16, 8); err == nil {
				b.WriteByte(byte(v))
				i += 2
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

func FuzzUnitMarkdownURL(f *testing.F) {
	for _, s := range []string{
		"https://img.example.com/a.png", "https://img.example.com/a b(1).png", "https://x/[a]<b>",
		"https://x/a\nb\rc\td\x00e\x7f", "https://x/\"'\\`", "https://x/a.png) ![x](y", "https://x/猫.png", "",
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, in string) {
		out := markdownURL(in)
		if strings.ContainsAny(out, " ()[]<>\n\r\t") {
			t.Fatalf("markdownURL(%q) = %q holds a character that breaks a markdown link", in, out)
		}
		for i := 0; i < len(out); i++ {
			if out[i] < 0x20 || out[i] == 0x7f {
				t.Fatalf("markdownURL(%q) = %q holds a control character", in, out)
			}
		}
		if !strings.Contains(in, "%") && percentDecode(out) != in {
			t.Fatalf("markdownURL(%q) = %q does not decode back to the URL", in, out)
		}
		// the image line as the markdown renderer sees it keeps the URL whole
		line := "![" + altText(in) + "](" + out + ")"
		if strings.Count(line, "](") != 1 || strings.Contains(out, ")") {
			t.Fatalf("image line %q does not parse as one image", line)
		}
	})
}

// refContent is a message's content read as the gateway read it before it
// was decoded once with the body: kept raw, then decoded by encoding/json
// into one struct for the prompt and into another for the image of an
// edit. messageContent must read every message the same.
type refContent struct {
	text    string
	textErr bool
	images  []string // "type|set|url" of each part, nil when not an edit's content
}

func readRefContent(raw json.RawMessage) refContent {
	var ref refContent
	raw = bytes.TrimSpace(raw)
	if len(raw) == 0 || string(raw) == "null" {
		return ref
	}
	switch raw[0] {
	case '"':
		ref.textErr = json.Unmarshal(raw, &ref.text) != nil
	case '[':
		var parts []struct {
			Type string `json:"type"`
			Text string `json:"text"`
		}
		if json.Unmarshal(raw, &parts) != nil {
			ref.textErr = true
		}
		var texts []string
		for _, p := range parts {
			if p.Type == "text" && strings.TrimSpace(p.Text) != "" {
				texts = append(texts, p.Text)
			}
		}
		if !ref.textErr {
			ref.text = strings.Join(texts, " ")
		}
		var images []struct {
			Type     string `json:"type"`
			ImageURL *struct {
				URL string `json:"url"`
			} `json:"image_url"`
		}
		if json.Unmarshal(raw, &images) == nil {
			ref.images = []string{}
			for _, p := range images {
				url := ""
				if p.ImageURL != nil {
					url = p.ImageURL.URL
				}
				ref.images = append(ref.images, fmt.Sprintf("%s|%v|%s", p.Type, p.ImageURL != nil, url))
			}
		}
	default:
		ref.textErr = true
	}
	return ref
}

func readContent(c *messageContent) refContent {
	var got refContent
	text, err := c.text()
	got.text, got.textErr = text, err != nil
	if c.isParts && !c.invalid && !c.badImage() {
		got.images = []string{}
		for _, p := range c.parts {
			got.images = append(got.images, fmt.Sprintf("%s|%v|%s", p.Type, p.ImageURL.set, p.ImageURL.url))
		}
	}
	return got
}

// FuzzUnitMessageContent holds messageContent to the two decodes it
// replaced, on any message: its keys in any case, given twice, its
// values of any type.
func FuzzUnitMessageContent(f *testing.F) {
	for _, s := range []string{
		`{"role":"user","content":"a cat"}`, `{"role":"user","content":null}`, `{"role":"user"}`,
		`{"role":"user","content":5}`, `{"role":"user","content":{"text":"a"}}`, `{"role":"user","content":["a"]}`,
		`{"role":"user","content":[{"type":"text","text":"a cat"},{"type":"image_url","image_url":{"url":"https://x/a.png","detail":"auto"}}]}`,
		`{"role":"user","content":[{"type":"text","text":5},{"type":"image_url","image_url":{"url":"https://x/a.png"}}]}`,
		`{"role":"user","content":[{"type":"text","text":"a"},{"type":"image_url","image_url":"https://x/a.png"}]}`,
		`{"role":"user","content":[{"type":"image_url","image_url":{"url":5}}]}`,
		`{"role":"user","content":[{"type":"image_url","image_url":{"URL":"u","url":null}}]}`,
		`{"role":"user","content":[{"type":"image_url","image_url":{"url":"a"},"image_url":{}}]}`,
		`{"role":"user","content":[{"type":"image_url","image_url":{"url":"a"},"image_url":null}]}`,
		`{"role":"user","content":[{"type":"text","text":5,"text":"a"}]}`, `{"role":"user","content":[{"text":"a","Text":null}]}`,
		`{"role":"user","content":[null,{},{"type":5}]}`, `{"role":"user","content":"a","content":[{"type":"text","text":"b"}]}`,
		`{"role":"user","Content":"a","CONTENT":null}`, `{"role":"user","content":"\ud800 \u00e9 \xff"}`,
		`{"role":5,"content":"a"}`, `null`,
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, message string) {
		body := []byte(`{"messages":[` + message + `]}`)
		if !json.Valid(body) {
			return
		}
		var req chatRequest
		var ref struct {
			Messages []struct {
				Role    string          `json:"role"`
				Content json.RawMessage `json:"content"`
			} `json:"messages"`
		}
		errNew, errRef := json.Unmarshal(body, &req), json.Unmarshal(body, &ref)
		if (errNew == nil) != (errRef == nil) || len(req.Messages) != len(ref.Messages) {
			t.Fatalf("%s: decoded %d messages, %v; before: %d, %v", body, len(req.Messages), errNew, len(ref.Messages), errRef)
		}
		for i := range req.Messages {
			if got, want := readContent(&req.Messages[i].Content), readRefContent(ref.Messages[i].Content); !reflect.DeepEqual(got, want) {
				t.Fatalf("%s: content read as %+v, before as %+v", body, got, want)
			}
		}
	})
}
