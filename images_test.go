package zimage

// The Images API (docs/design.md#answers): its decoder, and through a real Caddy
// sizes and the ratio rules, the extensions, n > 1 in parallel with
// distinct seeds, b64_json downloads and their failures, request
// validation, and the official Go SDK.

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"image"
	"image/color"
	"image/jpeg"
	"image/png"
	"io"
	"net/http"
	"net/http/httptest"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/openai/openai-go/v3"
	"github.com/openai/openai-go/v3/option"
)

// imagesAnswer is the Images API response, with each datum kept raw too so
// the tests can check which keys are present.
type imagesAnswer struct {
	Created int64 `json:"created"`
	Data    []struct {
		URL           string `json:"url"`
		B64JSON       string `json:"b64_json"`
		RevisedPrompt string `json:"revised_prompt"`
	} `json:"data"`
	raw struct {
		Data []map[string]json.RawMessage `json:"data"`
	}
}

func parseImages(t *testing.T, body []byte) imagesAnswer {
	t.Helper()
	var a imagesAnswer
	if err := json.Unmarshal(body, &a); err != nil || a.Created == 0 || len(a.Data) == 0 {
		t.Fatalf("not an images response: %s", body)
	}
	if err := json.Unmarshal(body, &a.raw); err != nil {
		t.Fatal(err)
	}
	return a
}

// imagesPNG is a small PNG whose colour encodes k, so images differ.
func imagesPNG(k int64) []byte {
	img := image.NewRGBA(image.Rect(0, 0, 2, 2))
	for x := range 2 {
		for y := range 2 {
			img.Set(x, y, color.RGBA{R: uint8(k), G: uint8(k >> 8), B: 0x5a, A: 0xff})
		}
	}
	var b bytes.Buffer
	if err := png.Encode(&b, img); err != nil {
		panic(err)
	}
	return b.Bytes()
}

// generations are the calls to the fake that were generate_image calls (the
// fake also records the image downloads it serves, which have no body).
func generations(up *fakeUpstream) []upstreamCall {
	var out []upstreamCall
	for _, c := range up.Calls() {
		if c.Raw != "" {
			out = append(out, c)
		}
	}
	return out
}

func seedsOf(calls []upstreamCall) []int64 {
	var s []int64
	for _, c := range calls {
		s = append(s, c.Body.Seed)
	}
	sort.Slice(s, func(i, j int) bool { return s[i] < s[j] })
	return s
}

// serveOwnImages makes the fake upstream answer each generation with an
// image URL on its own host (/img/<k>.png, k counting calls) and serve
// those PNGs, so b64_json downloads pass the host check. It returns the
// PNG served for a URL.
func serveOwnImages(up *fakeUpstream) func(url string) []byte {
	var n atomic.Int64
	var mu sync.Mutex
	served := map[string][]byte{}
	up.setHandler(func(w http.ResponseWriter, r *http.Request) {
		if r.Method == http.MethodGet {
			mu.Lock()
			b, ok := served[up.URL+r.URL.Path]
			mu.Unlock()
			if !ok {
				http.NotFound(w, r)
				return
			}
			w.Header().Set("Content-Type", "image/png")
			w.Write(b)
			return
		}
		k := n.Add(1)
		u := fmt.Sprintf("%s/img/%d.png", up.URL, k)
		mu.Lock()
		served[u] = imagesPNG(k)
		mu.Unlock()
		writeUpstreamOK(w, u)
	})
	return func(u string) []byte {
		mu.Lock()
		defer mu.Unlock()
		return served[u]
	}
}

// TestImagesSizes: size "WxH" is used as given (rounded, clamped), "auto"
// or no size leave it to the chat pipeline's ratio rules, and
// revised_prompt carries the final prompt; both paths answer.
func TestImagesSizes(t *testing.T) {
	const enhanced = "a majestic lighthouse at dusk, volumetric light"
	up := newFakeUpstream(t)
	llm := newFakeLLM(t, `{"prompt":"`+enhanced+`","aspect_ratio":"9:16"}`)
	startCaddy(t, gatewaySite(up, llm, ""))
	for _, tc := range []struct {
		name        string
		path        string
		fields      string
		prompt      string
		w, h        int
		wantRevised string
		wantLLM     bool
	}{
		{"auto: the LLM's ratio", "/v1/images/generations", `"size":"auto",`, "a lighthouse", 1152, 2048, enhanced, true},
		{"no size: the LLM's ratio", "/images/generations", "", "a lighthouse", 1152, 2048, enhanced, true},
		{"explicit size beats the LLM", "/v1/images/generations", `"size":"1024x1536",`, "a lighthouse", 1024, 1536, enhanced, true},
		{"user ratio beats the LLM", "/v1/images/generations", `"size":"auto",`, "a lighthouse ratio 16:9", 2048, 1152, enhanced, true},
		{"explicit size beats the user ratio", "/v1/images/generations", `"size":"512X768",`, "a lighthouse ratio 16:9", 512, 768, enhanced, true},
		{"Chinese trigger", "/images/generations", "", "灯塔 比例：3:2", 1920, 1280, enhanced, true},
		{"no-enhance", "/v1/images/generations", "", "a lighthouse no-enhance", 2048, 2048, "a lighthouse", false},
		{"no-enhance with a ratio", "/v1/images/generations", `"size":"auto",`, "a lighthouse, ratio 3:4 No-Enhance", 1536, 2048, "a lighthouse", false},
		{"size rounded and clamped", "/v1/images/generations", `"size":"1001x4000",`, "a lighthouse no-enhance", 1000, 2048, "a lighthouse", false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			llmBefore, upBefore := len(llm.Calls()), len(up.Calls())
			body := fmt.Sprintf(`{%s"prompt":%q}`, tc.fields, tc.prompt)
			status, hdr, raw := do(t, http.MethodPost, tc.path, body)
			if status != http.StatusOK {
				t.Fatalf("status %d: %s", status, raw)
			}
			if ct := hdr.Get("Content-Type"); ct != "application/json" {
				t.Fatalf("Content-Type %q", ct)
			}
			a := parseImages(t, raw)
			calls := up.Calls()[upBefore:]
			if len(a.Data) != 1 || len(calls) != 1 {
				t.Fatalf("%d data, %d generations, want 1 and 1", len(a.Data), len(calls))
			}
			c := calls[0].Body
			if c.Width != tc.w || c.Height != tc.h {
				t.Fatalf("upstream size %dx%d, want %dx%d", c.Width, c.Height, tc.w, tc.h)
			}
			if c.Prompt != tc.wantRevised || a.Data[0].RevisedPrompt != tc.wantRevised {
				t.Fatalf("upstream prompt %q, revised_prompt %q, want %q", c.Prompt, a.Data[0].RevisedPrompt, tc.wantRevised)
			}
			if want := fmt.Sprintf("https://img.example.com/%d.png", c.Seed); a.Data[0].URL != want {
				t.Fatalf("url %q, want %q", a.Data[0].URL, want)
			}
			if _, ok := a.raw.Data[0]["b64_json"]; ok {
				t.Fatalf("url answer carries b64_json: %s", raw)
			}
			if called := len(llm.Calls()) > llmBefore; called != tc.wantLLM {
				t.Fatalf("LLM called %v, want %v", called, tc.wantLLM)
			}
		})
	}
}

// TestImagesParams: the extensions seed, cfg and negative_prompt reach the
// image service, model aliases resolve, and the OpenAI fields the gateway
// cannot use are accepted and ignored.
func TestImagesParams(t *testing.T) {
	up := newFakeUpstream(t)
	startCaddy(t, gatewaySite(up, nil, `model Z-Image {
		alias dall-e-3
		negative_prompt "ugly"
	}`))
	for _, tc := range []struct {
		name     string
		body     string
		seed     int64 // -1: random
		cfg      float64
		negative string
	}{
		{"extensions", `{"prompt":"a cat","seed":77,"cfg":4.5,"negative_prompt":"blurry, lowres"}`, 77, 4.5, "blurry, lowres"},
		{"seed as a string", `{"prompt":"a cat","seed":"78"}`, 78, 7, "ugly"},
		{"alias and defaults", `{"prompt":"a cat","model":"dall-e-3"}`, -1, 7, "ugly"},
		{"ignored OpenAI fields", `{"prompt":"a cat","model":"DALL-E-3","seed":79,"quality":"hd","style":"vivid","user":"u-1",
			"background":"transparent","output_format":"webp","output_compression":80,"moderation":"low","partial_images":2}`, 79, 7, "ugly"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			before := len(up.Calls())
			status, _, raw := do(t, http.MethodPost, "/v1/images/generations", tc.body)
			if status != http.StatusOK {
				t.Fatalf("status %d: %s", status, raw)
			}
			parseImages(t, raw)
			calls := up.Calls()[before:]
			if len(calls) != 1 {
				t.Fatalf("%d generations, want 1", len(calls))
			}
			c := calls[0]
			if c.Auth != "Bearer "+testSDKey {
				t.Fatal("the image service did not get the SD key")
			}
			if tc.seed >= 0 && c.Body.Seed != tc.seed {
				t.Fatalf("seed %d, want %d", c.Body.Seed, tc.seed)
			}
			if c.Body.CFG != tc.cfg || c.Body.NegativePrompt != tc.negative || c.Body.Steps != 8 || c.Body.ModelIndex != 5 {
				t.Fatalf("upstream body %s", c.Raw)
			}
		})
	}
}

// TestImagesInvalid: invalid values are 400s naming the parameter, before
// anything is generated; unknown models 404.
func TestImagesInvalid(t *testing.T) {
	up := newFakeUpstream(t)
	startCaddy(t, gatewaySite(up, nil, ""))
	for _, tc := range []struct {
		name   string
		body   string
		status int
		param  string
	}{
		{"n 0", `{"prompt":"a cat","n":0}`, 400, "n"},
		{"n 5", `{"prompt":"a cat","n":5}`, 400, "n"},
		{"n negative", `{"prompt":"a cat","n":-1}`, 400, "n"},
		{"n not a number", `{"prompt":"a cat","n":"two"}`, 400, "n"},
		{"size abc", `{"prompt":"a cat","size":"abc"}`, 400, "size"},
		{"size without height", `{"prompt":"a cat","size":"1024x"}`, 400, "size"},
		{"size zero", `{"prompt":"a cat","size":"0x512"}`, 400, "size"},
		{"response_format xml", `{"prompt":"a cat","response_format":"xml"}`, 400, "response_format"},
		{"no prompt", `{"n":1}`, 400, "prompt"},
		{"blank prompt", `{"prompt":"   "}`, 400, "prompt"},
		{"only the skip word", `{"prompt":"no-enhance"}`, 400, "prompt"},
		{"bad seed", `{"prompt":"a cat","seed":"x"}`, 400, "seed"},
		{"bad cfg", `{"prompt":"a cat","cfg":0}`, 400, "cfg"},
		{"unknown model", `{"prompt":"a cat","model":"midjourney"}`, 404, "model"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			status, hdr, raw := do(t, http.MethodPost, "/v1/images/generations", tc.body)
			if status != tc.status {
				t.Fatalf("status %d, want %d: %s", status, tc.status, raw)
			}
			if ct := hdr.Get("Content-Type"); ct != "application/json" {
				t.Fatalf("Content-Type %q", ct)
			}
			e := apiErr(t, raw)
			if e.Param == nil || *e.Param != tc.param {
				t.Fatalf("param %v, want %q: %s", e.Param, tc.param, raw)
			}
		})
	}
	if n := len(up.Calls()); n != 0 {
		t.Fatalf("%d generations for invalid requests", n)
	}
}

// parallelBarrier makes the fake hold every generation until n are in
// flight at once: a gateway that runs them one after another never gets
// there, and its calls fail after streamWait.
func parallelBarrier(n int32, answer func(w http.ResponseWriter, r *http.Request, k int32)) http.HandlerFunc {
	var arrived atomic.Int32
	all := make(chan struct{})
	return func(w http.ResponseWriter, r *http.Request) {
		k := arrived.Add(1)
		if k == n {
			close(all)
		}
		select {
		case <-all:
			answer(w, r, k)
		case <-r.Context().Done():
		case <-time.After(streamWait):
			w.WriteHeader(http.StatusInternalServerError)
			io.WriteString(w, `{"error":"generations were not in flight together"}`)
		}
	}
}

// TestImagesN: n > 1 runs the generations in parallel, with seed, seed+1,
// … when a seed is given and distinct random seeds otherwise.
func TestImagesN(t *testing.T) {
	for _, tc := range []struct {
		name  string
		body  string
		n     int
		seeds []int64 // nil: any distinct seeds
	}{
		{"n 2 with a seed", `{"prompt":"a cat","n":2,"seed":100}`, 2, []int64{100, 101}},
		{"n 4 with a seed", `{"prompt":"a cat","n":4,"seed":"7"}`, 4, []int64{7, 8, 9, 10}},
		{"n 3 random seeds", `{"prompt":"a cat","n":3}`, 3, nil},
		// past the largest seed the count goes on at 1, never 0 (docs/design.md#the-prompt)
		{"n 3 wrapping", `{"prompt":"a cat","n":3,"seed":2147483645}`, 3, []int64{1, 2147483645, 2147483646}},
		{"an explicit 0 is passed on", `{"prompt":"a cat","n":2,"seed":0}`, 2, []int64{0, 1}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			up := newFakeUpstream(t)
			up.setHandler(parallelBarrier(int32(tc.n), func(w http.ResponseWriter, r *http.Request, k int32) {
				writeUpstreamOK(w, fmt.Sprintf("https://img.example.com/call-%d.png", k))
			}))
			startCaddy(t, gatewaySite(up, nil, ""))
			status, _, raw := do(t, http.MethodPost, "/v1/images/generations", tc.body)
			if status != http.StatusOK {
				t.Fatalf("status %d: %s", status, raw)
			}
			a := parseImages(t, raw)
			if len(a.Data) != tc.n {
				t.Fatalf("%d images, want %d", len(a.Data), tc.n)
			}
			urls := map[string]bool{}
			for _, d := range a.Data {
				urls[d.URL] = true
				if d.RevisedPrompt != "a cat" {
					t.Fatalf("revised_prompt %q", d.RevisedPrompt)
				}
			}
			if len(urls) != tc.n {
				t.Fatalf("urls %v are not distinct", urls)
			}
			if p := up.peak.Load(); p != int32(tc.n) {
				t.Fatalf("peak concurrency %d, want %d", p, tc.n)
			}
			seeds := seedsOf(up.Calls())
			for i := 1; i < len(seeds); i++ {
				if seeds[i] == seeds[i-1] {
					t.Fatalf("seeds %v are not distinct", seeds)
				}
			}
			if tc.seeds != nil && fmt.Sprint(seeds) != fmt.Sprint(tc.seeds) {
				t.Fatalf("seeds %v, want %v", seeds, tc.seeds)
			}
		})
	}
}

// TestImagesNFailsAsAWhole: when one of n generations fails, the request
// fails with that failure (not the cancellation of its siblings), and the
// siblings still in flight are cancelled.
func TestImagesNFailsAsAWhole(t *testing.T) {
	up := newFakeUpstream(t)
	cancelled := make(chan struct{}, 3)
	// seeds 8, 9 and 10: the last generation's body is the one a byte
	// longer, so the failure is the last one, and the root cause must win
	// over the cancellations of the generations listed before it
	var mu sync.Mutex
	var longest int64
	barrier := parallelBarrier(3, func(w http.ResponseWriter, r *http.Request, k int32) {
		mu.Lock()
		last := r.ContentLength == longest
		mu.Unlock()
		if last {
			w.WriteHeader(http.StatusInternalServerError)
			io.WriteString(w, `{"success":false,"error":"NSFW filter tripped"}`)
			return
		}
		select {
		case <-r.Context().Done():
			cancelled <- struct{}{}
		case <-time.After(streamWait):
			writeUpstreamOK(w, "https://img.example.com/late.png")
		}
	})
	up.setHandler(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		longest = max(longest, r.ContentLength)
		mu.Unlock()
		barrier(w, r)
	})
	startCaddy(t, gatewaySite(up, nil, ""))
	status, _, raw := do(t, http.MethodPost, "/v1/images/generations", `{"prompt":"a cat","n":3,"seed":8}`)
	if status != http.StatusBadGateway {
		t.Fatalf("status %d, want 502: %s", status, raw)
	}
	if e := apiErr(t, raw); !strings.Contains(e.Message, "NSFW filter tripped") || e.Code != "upstream_error" {
		t.Fatalf("error %+v, want the failing generation's message", e)
	}
	if strings.Contains(string(raw), `"data"`) {
		t.Fatalf("partial data in a failed answer: %s", raw)
	}
	streamWaitFor(t, cancelled, "the first sibling's cancellation")
	streamWaitFor(t, cancelled, "the second sibling's cancellation")
}

// TestImagesB64 covers response_format b64_json: the gateway downloads the
// image, only from the upstream's host or image_hosts, only images, within
// a size bound, and a failed download is a 502 naming the cause.
func TestImagesB64(t *testing.T) {
	// other is a second image host, reached as "localhost" so its host
	// differs from the upstream's 127.0.0.1
	other := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "image/png")
		w.Write(imagesPNG(9000))
	}))
	defer other.Close()
	otherHost := strings.Replace(strings.TrimPrefix(other.URL, "http://"), "127.0.0.1", "localhost", 1)
	otherURL := "http://" + otherHost + "/elsewhere.png"
	closed := httptest.NewServer(http.NotFoundHandler())
	closedURL := closed.URL + "/gone.png"
	closedHost := strings.TrimPrefix(closed.URL, "http://")
	closed.Close()

	for _, tc := range []struct {
		name     string
		extra    string
		imageURL func(up string) string // "" for the fake's own image path
		serve    http.HandlerFunc       // the fake's answer to the download
		want     []byte                 // nil: a 502 is expected
		wantMsg  string
	}{
		{name: "same host as the upstream", want: imagesPNG(1)},
		{name: "host in image_hosts", extra: "image_hosts " + otherHost, imageURL: func(string) string { return otherURL }, want: imagesPNG(9000)},
		{name: "host not allowed", imageURL: func(string) string { return otherURL }, wantMsg: `image host "` + otherHost + `" is not allowed`},
		{name: "redirect to a host not allowed", serve: func(w http.ResponseWriter, r *http.Request) {
			http.Redirect(w, r, otherURL, http.StatusFound)
		}, wantMsg: `image host "` + otherHost + `" is not allowed`},
		{name: "not an image", serve: func(w http.ResponseWriter, r *http.Request) {
			w.Header().Set("Content-Type", "text/html; charset=utf-8")
			io.WriteString(w, "<html>login required</html>")
		}, wantMsg: `content type "text/html", not an image`},
		{name: "image host 404", serve: http.NotFound, wantMsg: "404 Not Found"},
		{name: "image too large", serve: func(w http.ResponseWriter, r *http.Request) {
			w.Header().Set("Content-Type", "image/png")
			chunk := make([]byte, 1<<20)
			for range maxImageBytes>>20 + 2 {
				if _, err := w.Write(chunk); err != nil {
					return
				}
			}
		}, wantMsg: "image larger than 32 MiB"},
		{name: "connection refused", extra: "image_hosts " + closedHost, imageURL: func(string) string { return closedURL }, wantMsg: "the image host refused the connection"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			up := newFakeUpstream(t)
			up.setHandler(func(w http.ResponseWriter, r *http.Request) {
				if r.Method == http.MethodGet {
					if tc.serve != nil {
						tc.serve(w, r)
						return
					}
					w.Header().Set("Content-Type", "image/png")
					w.Write(imagesPNG(1))
					return
				}
				u := up.URL + "/img/1.png"
				if tc.imageURL != nil {
					u = tc.imageURL(up.URL)
				}
				writeUpstreamOK(w, u)
			})
			startCaddy(t, gatewaySite(up, nil, tc.extra))
			status, _, raw := do(t, http.MethodPost, "/v1/images/generations", `{"prompt":"a cat","response_format":"b64_json"}`)
			if tc.want == nil {
				if status != http.StatusBadGateway {
					t.Fatalf("status %d, want 502: %.300s", status, raw)
				}
				e := apiErr(t, raw)
				if e.Code != "image_download_failed" || e.Type != "upstream_error" || !strings.Contains(e.Message, tc.wantMsg) {
					t.Fatalf("error %+v, want image_download_failed naming %q", e, tc.wantMsg)
				}
				return
			}
			if status != http.StatusOK {
				t.Fatalf("status %d: %s", status, raw)
			}
			a := parseImages(t, raw)
			got, err := base64.StdEncoding.DecodeString(a.Data[0].B64JSON)
			if err != nil || !bytes.Equal(got, tc.want) {
				t.Fatalf("b64_json does not decode to the served PNG (%v)", err)
			}
			if _, ok := a.raw.Data[0]["url"]; ok {
				t.Fatalf("b64_json answer carries a url: %.300s", raw)
			}
			if a.Data[0].RevisedPrompt != "a cat" {
				t.Fatalf("revised_prompt %q", a.Data[0].RevisedPrompt)
			}
		})
	}
}

// TestImagesSDK drives the endpoint with the official Go SDK: both
// response formats, n 2 with a seed (seed and seed+1 reach the image
// service), an alias model and an OpenAI size.
func TestImagesSDK(t *testing.T) {
	for _, tc := range []struct {
		name   string
		format openai.ImageGenerateParamsResponseFormat
		base   string
	}{
		{"url", openai.ImageGenerateParamsResponseFormatURL, "/v1"},
		{"b64_json", openai.ImageGenerateParamsResponseFormatB64JSON, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			up := newFakeUpstream(t)
			servedAt := serveOwnImages(up)
			startCaddy(t, gatewaySite(up, nil, "model Z-Image {\n\t\talias dall-e-3\n\t}"))
			client := openaiSDK(tc.base)
			res, err := client.Images.Generate(context.Background(), openai.ImageGenerateParams{
				Prompt:         "a watercolour fox no-enhance",
				Model:          "dall-e-3",
				N:              openai.Int(2),
				Size:           openai.ImageGenerateParamsSize1792x1024,
				ResponseFormat: tc.format,
				Quality:        "hd",
				Style:          "vivid",
			}, option.WithJSONSet("seed", 42))
			if err != nil {
				t.Fatalf("Images.Generate: %v", err)
			}
			if len(res.Data) != 2 || res.Created == 0 {
				t.Fatalf("%d images, created %d", len(res.Data), res.Created)
			}
			gens := generations(up)
			if s := fmt.Sprint(seedsOf(gens)); s != "[42 43]" {
				t.Fatalf("seeds %s reached the image service, want [42 43]", s)
			}
			for _, c := range gens {
				if c.Body.Width != 1792 || c.Body.Height != 1024 {
					t.Fatalf("size %dx%d, want 1792x1024", c.Body.Width, c.Body.Height)
				}
			}
			seen := map[string]bool{}
			for i, d := range res.Data {
				if d.RevisedPrompt != "a watercolour fox" {
					t.Fatalf("image %d revised_prompt %q", i, d.RevisedPrompt)
				}
				var img []byte
				if tc.format == openai.ImageGenerateParamsResponseFormatURL {
					if d.B64JSON != "" {
						t.Fatalf("image %d: url answer with b64_json", i)
					}
					img = servedAt(d.URL)
					if img == nil {
						t.Fatalf("image %d: url %q was not one the image service returned", i, d.URL)
					}
				} else {
					if d.URL != "" {
						t.Fatalf("image %d: b64_json answer with url %q", i, d.URL)
					}
					if img, err = base64.StdEncoding.DecodeString(d.B64JSON); err != nil {
						t.Fatal(err)
					}
					if !bytes.Equal(img, servedAt(fmt.Sprintf("%s/img/1.png", up.URL))) && !bytes.Equal(img, servedAt(fmt.Sprintf("%s/img/2.png", up.URL))) {
						t.Fatalf("image %d is not one of the served PNGs", i)
					}
				}
				if _, err := png.Decode(bytes.NewReader(img)); err != nil {
					t.Fatalf("image %d is not a PNG: %v", i, err)
				}
				seen[string(img)] = true
			}
			if len(seen) != 2 {
				t.Fatal("the two images are the same")
			}
		})
	}
}

// TestImagesSDKError: a failed generation reaches the SDK as an API error
// with the gateway's status and message.
func TestImagesSDKError(t *testing.T) {
	up := newFakeUpstream(t)
	up.setHandler(func(w http.ResponseWriter, r *http.Request) {
		w.WriteHeader(http.StatusTooManyRequests)
		io.WriteString(w, `{"error":"quota exceeded"}`)
	})
	startCaddy(t, gatewaySite(up, nil, ""))
	client := openaiSDK("/v1")
	_, err := client.Images.Generate(context.Background(), openai.ImageGenerateParams{Prompt: "a cat"})
	var oe *openai.Error
	if !errors.As(err, &oe) || oe.StatusCode != http.StatusTooManyRequests || oe.Code != "rate_limit_exceeded" || !strings.Contains(oe.Message, "quota exceeded") {
		t.Fatalf("error %v, want a 429 API error naming the upstream's message", err)
	}
}

// The answer form without response_format: OpenAI's gpt-image names get
// b64_json only (as OpenAI answers them, and as SDKs that send them without
// response_format read them), any other name both forms; an explicit value
// is honoured exactly, and default_response_format (gateway, then model)
// replaces the default.
func TestImagesDefaultFormat(t *testing.T) {
	f := newEditFake(t)
	models := "model Z-Image {\n\t\talias gpt-image-1 ChatGPT-Image-Latest dall-e-3\n\t}\n\tmodel Z-Url {\n\t\tdefault_response_format url\n\t}\n\tmodel Qwen-Image-Edit {\n\t\tmodel_index 19\n\t\tedit\n\t}\n\t"
	startCaddy(t, gatewaySite(f.fakeUpstream, nil, models+fmt.Sprintf("store {\n\t\tstorage file_system %s\n\t}", t.TempDir())))
	forms := func(raw []byte) string {
		a := parseImages(t, raw)
		var keys []string
		for k := range a.raw.Data[0] {
			if k != "revised_prompt" {
				keys = append(keys, k)
			}
		}
		sort.Strings(keys)
		if d := a.Data[0]; d.B64JSON != "" {
			if b, err := base64.StdEncoding.DecodeString(d.B64JSON); err != nil || !bytes.Equal(b, f.result) {
				t.Errorf("b64_json is not the image (%v)", err)
			}
		}
		return strings.Join(keys, "+")
	}
	for _, tc := range []struct{ model, format, want string }{
		{"", "", "b64_json+url"},
		{"dall-e-3", "", "b64_json+url"},
		{"gpt-image-1", "", "b64_json"},
		{"chatgpt-image-latest", "", "b64_json"},
		{"gpt-image-1", "url", "url"},
		{"Z-Image", "b64_json", "b64_json"},
		{"Z-Url", "", "url"},
		{"Z-Url", "b64_json", "b64_json"},
	} {
		body := fmt.Sprintf(`{"prompt":"a cat","model":%q`, tc.model)
		if tc.format != "" {
			body += fmt.Sprintf(`,"response_format":%q`, tc.format)
		}
		status, _, raw := do(t, http.MethodPost, "/v1/images/generations", body+"}")
		if status != http.StatusOK {
			t.Fatalf("%s: %d %s", body, status, raw)
		}
		if got := forms(raw); got != tc.want {
			t.Errorf("generation %s}: %s, want %s", body, got, tc.want)
		}
	}
	// edits, in both forms: the Vercel AI SDK sends every edit without
	// response_format
	for _, tc := range []struct{ model, want string }{{"", "b64_json+url"}, {"gpt-image-1", "b64_json"}} {
		ct, body := multipartBody(t, [][2]string{{"prompt", "make it night"}, {"model", tc.model}}, map[string][]byte{"image": storeTestPNG(t, 10, 10)})
		status, _, raw := postEdit(t, ct, body)
		if status != http.StatusOK {
			t.Fatalf("edit: %d %s", status, raw)
		}
		if got := forms(raw); got != tc.want {
			t.Errorf("multipart edit on %q: %s, want %s", tc.model, got, tc.want)
		}
		js := fmt.Sprintf(`{"prompt":"make it night","model":%q,"images":[{"image_url":"data:image/png;base64,%s"}]}`, tc.model, base64.StdEncoding.EncodeToString(storeTestPNG(t, 10, 10)))
		status, _, raw = postEdit(t, "application/json", strings.NewReader(js))
		if status != http.StatusOK {
			t.Fatalf("edit: %d %s", status, raw)
		}
		if got := forms(raw); got != tc.want {
			t.Errorf("JSON edit on %q: %s, want %s", tc.model, got, tc.want)
		}
	}

	// the gateway's default, under a model's own
	startCaddy(t, gatewaySite(f.fakeUpstream, nil, "default_response_format url\n\t"+models))
	for model, want := range map[string]string{"gpt-image-1": "url", "Z-Image": "url"} {
		status, _, raw := do(t, http.MethodPost, "/v1/images/generations", fmt.Sprintf(`{"prompt":"a cat","model":%q}`, model))
		if status != http.StatusOK {
			t.Fatalf("%d %s", status, raw)
		}
		if got := forms(raw); got != want {
			t.Errorf("default_response_format url, %s: %s, want %s", model, got, want)
		}
	}
	// both forms without being asked for them by name: an image the gateway
	// cannot download (its host is not allowed) goes out with its URL
	// alone, as it did before the default had base64; asked for b64_json,
	// the request fails; streamed, it fails as an error event
	f.setHandler(func(w http.ResponseWriter, r *http.Request) { writeUpstreamOK(w, "https://img.example.com/a.png") })
	startCaddy(t, gatewaySite(f.fakeUpstream, nil, models))
	status, _, raw := do(t, http.MethodPost, "/v1/images/generations", `{"prompt":"a cat"}`)
	if status != http.StatusOK || forms(raw) != "url" || parseImages(t, raw).Data[0].URL != "https://img.example.com/a.png" {
		t.Errorf("both forms, image not downloadable: %d %s, want the URL alone", status, raw)
	}
	if status, _, raw := do(t, http.MethodPost, "/v1/images/generations", `{"prompt":"a cat","model":"gpt-image-1"}`); status != http.StatusBadGateway {
		t.Errorf("b64_json, image not downloadable: %d %s, want 502", status, raw)
	}
	if status, _, raw := do(t, http.MethodPost, "/v1/images/generations", `{"prompt":"a cat","stream":true}`); status != http.StatusOK || !strings.Contains(string(raw), "event: error\n") {
		t.Errorf("streamed, image not downloadable: %d %s, want an error event", status, raw)
	}
	status, _, raw = do(t, http.MethodPost, "/v1/images/generations", `{"prompt":"a cat","response_format":"both"}`)
	if status != http.StatusBadRequest || !strings.Contains(string(raw), `"param":"response_format"`) {
		t.Errorf("response_format both: %d %s, want a 400 (a request asks for one form)", status, raw)
	}
}

// Image answers carry size, output_format, quality and background at the
// top level, as OpenAI's do: the real size and format when the gateway
// holds the bytes, else the size asked and png; quality and background as
// asked. Today's request fields are accepted. Read with the official SDK,
// whose types have these fields, for generations and edits, plain and
// streamed.
func TestImagesAnswerFields(t *testing.T) {
	f := newEditFake(t)
	f.result = storeTestJPEG(t, 24, 16)
	editSite(t, f, "on", "")
	client := sdkFor(baseURL+"/v1/", testClientKey)
	ctx := context.Background()
	newer := []option.RequestOption{option.WithJSONSet("style", "vivid"), option.WithJSONSet("input_fidelity", "high")}

	gen, err := client.Images.Generate(ctx, openai.ImageGenerateParams{
		Prompt: "a cat", Size: openai.ImageGenerateParamsSize1024x1024,
		Quality: openai.ImageGenerateParamsQualityHigh, Background: openai.ImageGenerateParamsBackgroundOpaque,
		OutputFormat: openai.ImageGenerateParamsOutputFormatWebP, OutputCompression: openai.Int(80),
		Moderation: openai.ImageGenerateParamsModerationLow, User: openai.String("u1"),
	}, newer...)
	if err != nil {
		t.Fatalf("Images.Generate: %v", err)
	}
	// the store holds the bytes: the real size and format, not the 1024x1024 asked
	if gen.Size != "24x16" || gen.OutputFormat != "jpeg" || gen.Quality != "high" || gen.Background != "opaque" {
		t.Errorf("generation answer: size %q, output_format %q, quality %q, background %q", gen.Size, gen.OutputFormat, gen.Quality, gen.Background)
	}
	edit, err := client.Images.Edit(ctx, openai.ImageEditParams{
		Image:  openai.ImageEditParamsImageUnion{OfFile: openai.File(bytes.NewReader(storeTestPNG(t, 10, 10)), "a.png", "image/png")},
		Prompt: "make it night", InputFidelity: openai.ImageEditParamsInputFidelityHigh,
		OutputFormat: openai.ImageEditParamsOutputFormatPNG, User: openai.String("u1"),
		Background: openai.ImageEditParamsBackgroundTransparent,
	})
	if err != nil {
		t.Fatalf("Images.Edit: %v", err)
	}
	if edit.Size != "24x16" || edit.OutputFormat != "jpeg" || edit.Quality != "auto" || edit.Background != "transparent" {
		t.Errorf("edit answer: size %q, output_format %q, quality %q, background %q", edit.Size, edit.OutputFormat, edit.Quality, edit.Background)
	}

	st := client.Images.GenerateStreaming(ctx, openai.ImageGenerateParams{Prompt: "a cat", Quality: openai.ImageGenerateParamsQualityLow, Background: openai.ImageGenerateParamsBackgroundOpaque})
	for st.Next() {
		c := st.Current().AsImageGenerationCompleted()
		if c.Size != "24x16" || c.OutputFormat != "jpeg" || c.Quality != "low" || c.Background != "opaque" {
			t.Errorf("generation completed event: size %q, output_format %q, quality %q, background %q", c.Size, c.OutputFormat, c.Quality, c.Background)
		}
	}
	if err := st.Err(); err != nil {
		t.Fatal(err)
	}
	est := client.Images.EditStreaming(ctx, openai.ImageEditParams{
		Image:   openai.ImageEditParamsImageUnion{OfFile: openai.File(bytes.NewReader(storeTestPNG(t, 10, 10)), "a.png", "image/png")},
		Prompt:  "make it night",
		Quality: openai.ImageEditParamsQualityMedium,
	})
	for est.Next() {
		c := est.Current().AsImageEditCompleted()
		if c.Size != "24x16" || c.OutputFormat != "jpeg" || c.Quality != "medium" || c.Background != "auto" {
			t.Errorf("edit completed event: size %q, output_format %q, quality %q, background %q", c.Size, c.OutputFormat, c.Quality, c.Background)
		}
	}
	if err := est.Err(); err != nil {
		t.Fatal(err)
	}

	// without the bytes (no store, url asked): the size asked, png
	startCaddy(t, gatewaySite(f.fakeUpstream, nil, ""))
	status, _, raw := do(t, http.MethodPost, "/v1/images/generations", `{"prompt":"a cat","size":"512x768","response_format":"url"}`)
	var top struct{ Size, OutputFormat, Quality, Background string }
	json.Unmarshal(raw, &struct {
		Size         *string `json:"size"`
		OutputFormat *string `json:"output_format"`
		Quality      *string `json:"quality"`
		Background   *string `json:"background"`
	}{&top.Size, &top.OutputFormat, &top.Quality, &top.Background})
	if status != 200 || top.Size != "512x768" || top.OutputFormat != "png" || top.Quality != "auto" || top.Background != "auto" {
		t.Errorf("url answer without the bytes: %d %+v", status, top)
	}
	for _, body := range []string{`{"prompt":"a cat","quality":"ultra"}`, `{"prompt":"a cat","background":"pink"}`} {
		if status, _, raw := do(t, http.MethodPost, "/v1/images/generations", body); status != http.StatusBadRequest {
			t.Errorf("%s: %d %s, want 400", body, status, raw)
		}
	}
}

// storeTestJPEG is a w×h JPEG.
func storeTestJPEG(t testing.TB, w, h int) []byte {
	t.Helper()
	var b bytes.Buffer
	if err := jpeg.Encode(&b, image.NewRGBA(image.Rect(0, 0, w, h)), nil); err != nil {
		t.Fatal(err)
	}
	return b.Bytes()
}

// Size is "WxH", or "auto"/absent to leave it to the ratio rules.
func TestUnitParseSize(t *testing.T) {
	t.Parallel()
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
	t.Parallel()
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
