package zimage

import (
	"context"
	"net/http"
	"net/http/httptest"
	"sort"
	"testing"
)

// Size is "WxH", or "auto"/absent to leave it to the ratio rules.
func TestUnitParseSize(t *testing.T) {
	for _, tc := range []struct {
		name, in string
		w, h     float64 // 0: no size
		wantErr  bool
	}{
		{"WxH", "1024x768", 1024, 768, false},
		{"square", "1024x1024", 1024, 1024, false},
		{"OpenAI portrait", "1024x1792", 1024, 1792, false},
		{"upper-case X", "512X512", 512, 512, false},
		{"spaces", " 1024 x 768 ", 1024, 768, false},
		{"out of range is clamped later", "4096x10", 4096, 10, false},
		{"auto", "auto", 0, 0, false},
		{"AUTO", "AUTO", 0, 0, false},
		{"empty", "", 0, 0, false},
		{"not a size", "abc", 0, 0, true},
		{"one side", "1024", 0, 0, true},
		{"missing height", "1024x", 0, 0, true},
		{"missing width", "x768", 0, 0, true},
		{"zero", "0x768", 0, 0, true},
		{"negative", "1024x-768", 0, 0, true},
		{"fraction", "1024.5x768", 0, 0, true},
		{"three sides", "1x2x3", 0, 0, true},
		{"times sign", "1024×768", 0, 0, true},
		{"ratio", "16:9", 0, 0, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			w, h, e := parseSize(tc.in)
			if tc.wantErr {
				if e == nil || e.status != http.StatusBadRequest || e.param != "size" {
					t.Fatalf("parseSize(%q) = %v, %v, %+v, want a 400 naming size", tc.in, w, h, e)
				}
				return
			}
			if e != nil {
				t.Fatalf("parseSize(%q): %+v", tc.in, e)
			}
			if tc.w == 0 {
				if w != nil || h != nil {
					t.Fatalf("parseSize(%q) = %v, %v, want no size", tc.in, *w, *h)
				}
				return
			}
			if w == nil || h == nil || *w != tc.w || *h != tc.h {
				t.Fatalf("parseSize(%q) = %v, %v, want %v x %v", tc.in, w, h, tc.w, tc.h)
			}
		})
	}
}

// The OpenAI Images body with its unknown fields ignored, and
// type errors named by field.
func TestUnitDecodeImages(t *testing.T) {
	for _, tc := range []struct {
		name, body string
		param      string // "" when valid
		check      func(*imagesRequest) bool
	}{
		{"OpenAI fields ignored", `{"prompt":"a cat","model":"dall-e-3","n":2,"size":"1024x1024","quality":"hd","style":"vivid","user":"u","background":"auto","output_format":"png","moderation":"low","response_format":"b64_json"}`, "",
			func(r *imagesRequest) bool {
				return *r.Prompt == "a cat" && r.Model == "dall-e-3" && *r.N == 2 && r.Size == "1024x1024" && r.ResponseFormat == "b64_json"
			}},
		{"extensions", `{"prompt":"a cat","seed":"5","cfg":3,"negative_prompt":"blurry"}`, "",
			func(r *imagesRequest) bool {
				return string(r.Seed) == `"5"` && *r.CFG == 3 && *r.NegativePrompt == "blurry"
			}},
		{"n not a number", `{"prompt":"a cat","n":"2"}`, "n", nil},
		{"n fraction", `{"prompt":"a cat","n":1.5}`, "n", nil},
		{"size not a string", `{"prompt":"a cat","size":1024}`, "size", nil},
		{"prompt not a string", `{"prompt":["a cat"]}`, "prompt", nil},
		{"cfg not a number", `{"prompt":"a cat","cfg":"high"}`, "cfg", nil},
		{"response_format not a string", `{"prompt":"a cat","response_format":1}`, "response_format", nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var req imagesRequest
			e := decodeJSON([]byte(tc.body), &req)
			if tc.param != "" {
				if e == nil || e.status != http.StatusBadRequest || e.param != tc.param {
					t.Fatalf("decode(%s) = %+v, want a 400 naming %s", tc.body, e, tc.param)
				}
				return
			}
			if e != nil {
				t.Fatal(e)
			}
			if !tc.check(&req) {
				t.Fatalf("decoded %+v", req)
			}
		})
	}
}

// N>1 runs n generations with seed, seed+1, … when a seed is
// given (wrapping below 2^31-1), and distinct random seeds otherwise.
func TestUnitGenerateNSeeds(t *testing.T) {
	m := &model{name: "Z-Image", modelIndex: 5, steps: 8, cfg: 7}
	r := httptest.NewRequest(http.MethodPost, "/v1/images/generations", nil)
	for _, tc := range []struct {
		name string
		seed *int64
		n    int
		want []int64 // nil: random and distinct
	}{
		{"fixed seed", ptr(int64(100)), 3, []int64{100, 101, 102}},
		{"fixed seed wraps to 1, never 0", ptr(int64(maxSeed - 2)), 4, []int64{1, 2, maxSeed - 2, maxSeed - 1}},
		{"random seeds", nil, 4, nil},
		{"one", ptr(int64(9)), 1, []int64{9}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			up := &unitGenerator{url: "https://img.example.com/x.png"}
			g := unitGateway(up, nil)
			j, e := g.newJob(&ask{endpoint: endpointImages, model: m, requested: "", params: jobParams{prompt: "a cat", seed: tc.seed}}, nil, requestOrigin(r))
			if e != nil {
				t.Fatal(e)
			}
			g.runEnhance(context.Background(), j)
			data, e := g.generateN(context.Background(), j, tc.n)
			if e != nil {
				t.Fatal(e)
			}
			if len(data) != tc.n {
				t.Fatalf("%d images, want %d", len(data), tc.n)
			}
			for _, d := range data {
				if d.imageURL != "https://img.example.com/x.png" || d.prompt != "a cat" {
					t.Fatalf("image %+v", d)
				}
			}
			var seeds []int64
			for _, q := range up.requests() {
				seeds = append(seeds, q.Seed)
			}
			sort.Slice(seeds, func(a, b int) bool { return seeds[a] < seeds[b] })
			if tc.want != nil {
				if len(seeds) != len(tc.want) {
					t.Fatalf("seeds %v, want %v", seeds, tc.want)
				}
				for i := range seeds {
					if seeds[i] != tc.want[i] {
						t.Fatalf("seeds %v, want %v", seeds, tc.want)
					}
				}
				return
			}
			for i := 1; i < len(seeds); i++ {
				if seeds[i] == seeds[i-1] {
					t.Fatalf("random seeds repeat: %v", seeds)
				}
			}
		})
	}
}

// If any of the n generations fails, the request fails with the
// root cause.
func TestUnitGenerateNFailure(t *testing.T) {
	m := &model{name: "Z-Image", modelIndex: 5, steps: 8, cfg: 7}
	r := httptest.NewRequest(http.MethodPost, "/v1/images/generations", nil)
	up := &unitGenerator{err: &upstreamError{kind: kind429, message: "slow down " + testSDKey, retryAfter: "7"}}
	g := unitGateway(up, nil)
	j, e := g.newJob(&ask{endpoint: endpointImages, model: m, requested: "", params: jobParams{prompt: "a cat"}}, nil, requestOrigin(r))
	if e != nil {
		t.Fatal(e)
	}
	data, e := g.generateN(context.Background(), j, 3)
	if e == nil || data != nil {
		t.Fatalf("generateN = %v, %v, want a failure", data, e)
	}
	if e.status != http.StatusTooManyRequests || e.retryAfter != "7" {
		t.Fatalf("error %+v, want the upstream's 429 with its Retry-After", e)
	}
	if got := e.message; got != "The image service is rate limiting requests: slow down [redacted]" {
		t.Fatalf("message %q, want the upstream's text with the key scrubbed", got)
	}
	if n := len(up.requests()); n < 1 || n > 3 {
		t.Fatalf("image service got %d requests, want 1 to 3", n)
	}
}

// Random seeds are drawn from [1, 2^31-1): the service fails on 0. The source is pinned to its extremes.
func TestUnitRandomSeedRange(t *testing.T) {
	defer func(f func(int64) int64) { seedSource = f }(seedSource)
	for _, tc := range []struct {
		draw func(n int64) int64
		want int64
	}{
		{func(int64) int64 { return 0 }, 1},
		{func(n int64) int64 { return n - 1 }, maxSeed - 1},
	} {
		seedSource = tc.draw
		if got := randomSeed(); got != tc.want {
			t.Errorf("randomSeed() = %d, want %d", got, tc.want)
		}
	}
}
