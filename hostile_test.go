package zimage

// Hostile input: request bodies built to break the decoder or the
// pipeline — invalid UTF-8, NUL and other control characters, prompts past
// max_prompt_length, nesting past the JSON decoder's depth, trailing
// garbage, duplicated keys, a wrong type for every field, numbers at and
// past their limits — sent through a real Caddy, and fuzz targets that run
// arbitrary bodies through decoding and job building. The rule everywhere:
// a well-formed OpenAI error (400 naming the field where there is one) or a
// well-formed success, never a 500, never a panic. The bodies and the check
// are shared by chat and images, so they stay together here.

import (
	"bytes"
	"context"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"unicode"
	"unicode/utf8"
)

const (
	hostileChat   = "/v1/chat/completions"
	hostileImages = "/v1/images/generations"
)

// hostileNested is a body whose unknown field nests arrays 100k deep, ten
// times encoding/json's depth limit.
func hostileNested(prompt string) string {
	return `{"prompt":"` + prompt + `","x":` + strings.Repeat("[", 100000) + strings.Repeat("]", 100000) + `}`
}

// hostileLeak reports Go's own names for types in a client-facing message:
// the decoder's "struct { Role string … }" or "float64" mean nothing to an
// API client.
func hostileLeak(msg string) bool {
	for _, s := range []string{"struct {", "float64", "int64", "json.RawMessage", "zimage.", "Go value", "Go struct"} {
		if strings.Contains(msg, s) {
			return true
		}
	}
	return false
}

// TestHostileRequests sends each hostile body through Caddy and checks the
// whole answer: status, content type, envelope and param for errors, and
// for successes the answer's shape and what reached the image service.
func TestHostileRequests(t *testing.T) {
	up := newFakeUpstream(t)
	startCaddy(t, itSite(up, itConfig{}))

	const (
		ok   = http.StatusOK
		bad  = http.StatusBadRequest
		null = "" // the error's param is null
	)
	// the limit counts runes, not bytes
	atLimit := strings.Repeat("猫", defaultMaxPromptLength)
	tooLong := strings.Repeat("a", 100000)
	for _, tc := range []struct {
		name   string
		path   string
		body   string
		status int
		param  string // errors: the param named
		// successes: what the image service received (prompt always;
		// negative, size and seed when set)
		prompt   string
		negative string
		w, h     int
		seed     int64
	}{
		// encodings and control characters
		{name: "invalid UTF-8 in the prompt", path: hostileChat, body: "{\"prompt\":\"a cat \xff\xfe on a roof\"}", status: bad, param: null},
		{name: "invalid UTF-8 in a message", path: hostileChat, body: "{\"messages\":[{\"role\":\"user\",\"content\":\"\xe4\xb8\x80\xe5\x8f\xaa\xe7\x8c\"}]}", status: bad, param: null},
		{name: "GBK body", path: hostileChat, body: "{\"prompt\":\"\xbb\xad\xd2\xbb\xd6\xbb\xc3\xa8\"}", status: bad, param: null},
		{name: "images: invalid UTF-8", path: hostileImages, body: "{\"prompt\":\"a cat\xc0\xaf\"}", status: bad, param: null},
		{name: "escaped NUL is stripped", path: hostileChat, body: `{"prompt":"a cat\u0000 on a roof"}`, status: ok, prompt: "a cat on a roof"},
		{name: "raw NUL is not JSON", path: hostileChat, body: "{\"prompt\":\"a cat\x00 on a roof\"}", status: bad, param: null},
		{name: "escape sequences, DEL and C1 stripped", path: hostileChat, body: `{"messages":[{"role":"user","content":"a \u001b[1mred\u007f cat\u0085\u009b"}]}`, status: ok, prompt: "a [1mred cat"},
		{name: "tabs and newlines kept", path: hostileChat, body: `{"prompt":"a cat\ton a roof\nat night"}`, status: ok, prompt: "a cat\ton a roof\nat night"},
		{name: "only control characters", path: hostileChat, body: `{"prompt":"\u0000\u0001 \u001f"}`, status: bad, param: "prompt"},
		{name: "images: NUL in prompt and negative_prompt", path: hostileImages, body: `{"prompt":"a\u0000 cat","negative_prompt":"blurry\u0000, lowres"}`, status: ok, prompt: "a cat", negative: "blurry, lowres"},

		// max_prompt_length (default 20000 characters)
		{name: "100k-character prompt", path: hostileChat, body: `{"prompt":"` + tooLong + `"}`, status: bad, param: "prompt"},
		{name: "100k-character message", path: hostileChat, body: `{"messages":[{"role":"user","content":"` + tooLong + `"}]}`, status: bad, param: "messages[0].content"},
		{name: "prompt of exactly the limit", path: hostileChat, body: `{"prompt":"` + atLimit + `"}`, status: ok, prompt: atLimit},
		{name: "one character past the limit", path: hostileChat, body: `{"prompt":"` + atLimit + `a"}`, status: bad, param: "prompt"},
		{name: "images: 100k-character prompt", path: hostileImages, body: `{"prompt":"` + tooLong + `"}`, status: bad, param: "prompt"},
		{name: "images: prompt of exactly the limit", path: hostileImages, body: `{"prompt":"` + atLimit + `"}`, status: ok, prompt: atLimit},

		// JSON structure
		{name: "100k nested arrays", path: hostileChat, body: hostileNested("a cat"), status: bad, param: null},
		{name: "images: 100k nested arrays", path: hostileImages, body: hostileNested("a cat"), status: bad, param: null},
		{name: "trailing garbage", path: hostileChat, body: `{"prompt":"a cat"} xyz`, status: bad, param: null},
		{name: "two objects", path: hostileChat, body: `{"prompt":"a cat"}{"prompt":"a dog"}`, status: bad, param: null},
		{name: "images: trailing garbage", path: hostileImages, body: `{"prompt":"a cat"}]`, status: bad, param: null},
		{name: "duplicated key: the last wins", path: hostileChat, body: `{"prompt":"a cat","prompt":"a dog"}`, status: ok, prompt: "a dog"},
		{name: "duplicated messages: the last wins", path: hostileChat, body: `{"messages":[{"role":"user","content":"a cat"}],"messages":[{"role":"user","content":"a dog"}]}`, status: ok, prompt: "a dog"},
		{name: "images: duplicated key", path: hostileImages, body: `{"prompt":"a cat","prompt":"a dog"}`, status: ok, prompt: "a dog"},
		{name: "top-level string", path: hostileChat, body: `"a cat"`, status: bad, param: null},
		{name: "top-level number", path: hostileChat, body: `42`, status: bad, param: null},
		{name: "top-level null has no prompt", path: hostileChat, body: `null`, status: bad, param: "messages"},
		{name: "images: top-level array", path: hostileImages, body: `[{"prompt":"a cat"}]`, status: bad, param: null},

		// a wrong type for every field of the chat body
		{name: "chat model", path: hostileChat, body: `{"model":3,"prompt":"a cat"}`, status: bad, param: "model"},
		{name: "chat messages object", path: hostileChat, body: `{"messages":{"role":"user","content":"a cat"}}`, status: bad, param: "messages"},
		{name: "chat messages of numbers", path: hostileChat, body: `{"messages":[1,2]}`, status: bad, param: "messages"},
		{name: "chat role", path: hostileChat, body: `{"messages":[{"role":["user"],"content":"a cat"}]}`, status: bad, param: "messages.role"},
		{name: "chat content", path: hostileChat, body: `{"messages":[{"role":"user","content":true}]}`, status: bad, param: "messages[0].content"},
		{name: "chat prompt", path: hostileChat, body: `{"prompt":["a cat"]}`, status: bad, param: "prompt"},
		{name: "chat stream", path: hostileChat, body: `{"prompt":"a cat","stream":"true"}`, status: bad, param: "stream"},
		{name: "chat stream_options", path: hostileChat, body: `{"prompt":"a cat","stream":true,"stream_options":true}`, status: bad, param: "stream_options"},
		{name: "chat include_usage", path: hostileChat, body: `{"prompt":"a cat","stream":true,"stream_options":{"include_usage":"yes"}}`, status: bad, param: "stream_options.include_usage"},
		{name: "chat width", path: hostileChat, body: `{"prompt":"a cat","width":"512","height":512}`, status: bad, param: "width"},
		{name: "chat height", path: hostileChat, body: `{"prompt":"a cat","width":512,"height":{}}`, status: bad, param: "height"},
		{name: "chat cfg", path: hostileChat, body: `{"prompt":"a cat","cfg":"7"}`, status: bad, param: "cfg"},
		{name: "chat seed boolean", path: hostileChat, body: `{"prompt":"a cat","seed":true}`, status: bad, param: "seed"},
		{name: "chat seed fraction", path: hostileChat, body: `{"prompt":"a cat","seed":1.5}`, status: bad, param: "seed"},
		{name: "chat seed object", path: hostileChat, body: `{"prompt":"a cat","seed":{"value":1}}`, status: bad, param: "seed"},
		{name: "chat negative_prompt", path: hostileChat, body: `{"prompt":"a cat","negative_prompt":["blurry"]}`, status: bad, param: "negative_prompt"},

		// … and of the images body
		{name: "images prompt", path: hostileImages, body: `{"prompt":5}`, status: bad, param: "prompt"},
		{name: "images model", path: hostileImages, body: `{"prompt":"a cat","model":[]}`, status: bad, param: "model"},
		{name: "images n fraction", path: hostileImages, body: `{"prompt":"a cat","n":1.5}`, status: bad, param: "n"},
		{name: "images n huge", path: hostileImages, body: `{"prompt":"a cat","n":1e30}`, status: bad, param: "n"},
		{name: "images size", path: hostileImages, body: `{"prompt":"a cat","size":1024}`, status: bad, param: "size"},
		{name: "images response_format", path: hostileImages, body: `{"prompt":"a cat","response_format":true}`, status: bad, param: "response_format"},
		{name: "images seed", path: hostileImages, body: `{"prompt":"a cat","seed":[7]}`, status: bad, param: "seed"},
		{name: "images cfg", path: hostileImages, body: `{"prompt":"a cat","cfg":"x"}`, status: bad, param: "cfg"},
		{name: "images negative_prompt", path: hostileImages, body: `{"prompt":"a cat","negative_prompt":{}}`, status: bad, param: "negative_prompt"},

		// numbers at and past their limits (n is covered by TestImagesN/TestImagesInvalid)
		{name: "width 2048", path: hostileChat, body: `{"prompt":"a cat","width":2048,"height":2048}`, status: ok, prompt: "a cat", w: 2048, h: 2048},
		{name: "width 99999 clamps", path: hostileChat, body: `{"prompt":"a cat","width":99999,"height":1024}`, status: ok, prompt: "a cat", w: 2048, h: 1024},
		{name: "width past float64", path: hostileChat, body: `{"prompt":"a cat","width":1e400,"height":1024}`, status: bad, param: "width"},
		{name: "images size 99999x99999 clamps", path: hostileImages, body: `{"prompt":"a cat","size":"99999x99999"}`, status: ok, prompt: "a cat", w: 2048, h: 2048},
		{name: "images size past int", path: hostileImages, body: `{"prompt":"a cat","size":"99999999999999999999x1024"}`, status: bad, param: "size"},
		{name: "seed 2147483646", path: hostileChat, body: `{"prompt":"a cat","seed":2147483646}`, status: ok, prompt: "a cat", seed: 2147483646},
		{name: "seed 2147483647", path: hostileChat, body: `{"prompt":"a cat","seed":2147483647}`, status: bad, param: "seed"},
		{name: "images seed 2147483646", path: hostileImages, body: `{"prompt":"a cat","seed":"2147483646"}`, status: ok, prompt: "a cat", seed: 2147483646},
		{name: "images seed 2147483647", path: hostileImages, body: `{"prompt":"a cat","seed":"2147483647"}`, status: bad, param: "seed"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			before := len(up.Calls())
			status, hdr, body := do(t, http.MethodPost, tc.path, tc.body)
			if status >= 500 {
				t.Fatalf("status %d: %.300s", status, body)
			}
			if ct := hdr.Get("Content-Type"); ct != "application/json" {
				t.Errorf("Content-Type %q, want application/json", ct)
			}
			calls := itCallsSince(up, before)
			if tc.status != ok {
				if status != tc.status {
					t.Fatalf("status %d, want %d: %.300s", status, tc.status, body)
				}
				e := apiErr(t, body)
				if e.Type != "invalid_request_error" || e.Code != "invalid_request" {
					t.Errorf("type %q code %q, want invalid_request_error, invalid_request", e.Type, e.Code)
				}
				got := null
				if e.Param != nil {
					got = *e.Param
				}
				if got != tc.param || (e.Param != nil && *e.Param == "") {
					t.Errorf("param %v, want %q: %s", e.Param, tc.param, e.Message)
				}
				if hostileLeak(e.Message) {
					t.Errorf("message names Go types: %s", e.Message)
				}
				if len(calls) != 0 {
					t.Errorf("the image service was called %d times for a rejected body", len(calls))
				}
				return
			}
			if status != ok {
				t.Fatalf("status %d, want 200: %.300s", status, body)
			}
			if bytes.Contains(body, []byte(`\u0000`)) {
				t.Errorf("the answer echoes a NUL: %.300s", body)
			}
			if tc.path == hostileChat {
				chatContent(t, body)
			} else {
				parseImages(t, body)
			}
			if len(calls) != 1 {
				t.Fatalf("the image service was called %d times, want 1", len(calls))
			}
			c := calls[0].Body
			if c.Prompt != tc.prompt {
				t.Errorf("upstream prompt %.80q, want %.80q", c.Prompt, tc.prompt)
			}
			if tc.negative != "" && c.NegativePrompt != tc.negative {
				t.Errorf("upstream negative_prompt %q, want %q", c.NegativePrompt, tc.negative)
			}
			if tc.w != 0 && (c.Width != tc.w || c.Height != tc.h) {
				t.Errorf("upstream size %dx%d, want %dx%d", c.Width, c.Height, tc.w, tc.h)
			}
			if tc.seed != 0 && c.Seed != tc.seed {
				t.Errorf("upstream seed %d, want %d", c.Seed, tc.seed)
			}
		})
	}
}

// ---- fuzz targets ----

// hostileGenerator is an image service stub that records nothing, so a
// long fuzz run does not grow memory.
type hostileGenerator struct{}

func (hostileGenerator) generate(context.Context, string, upstreamRequest, string) (upstreamResult, *upstreamError) {
	return upstreamResult{imageURL: "https://img.example.com/fuzz.png"}, nil
}

// hostileGateway is a Gateway built by hand with the default model, a
// short prompt limit and no enhancer.
func hostileGateway(t testing.TB) *Gateway {
	g := unitGateway(hostileGenerator{}, nil)
	g.MaxPromptLength = 200
	if err := g.provisionModels(); err != nil {
		t.Fatal(err)
	}
	return g
}

// hostileChatJob runs a chat body through what a request meets before
// any work: the chat endpoint's own decoder, then the job step.
func hostileChatJob(g *Gateway, r *http.Request, body []byte) (*job, *apiError) {
	q := &ask{endpoint: endpointChat, n: 1}
	if e := g.decodeChatAsk(q, &chatBody{json: body}); e != nil {
		return nil, e
	}
	if q.edit != nil {
		return g.newEditJob(r.Context(), q, nil, requestOrigin(r))
	}
	return g.newJob(q, nil, requestOrigin(r))
}

// hostileImagesJob does the same for an images body, and checks that the
// size the decoder read is two positive integers or none.
func hostileImagesJob(t *testing.T, g *Gateway, r *http.Request, body []byte) (*job, *apiError) {
	q := &ask{endpoint: endpointImages}
	if e := g.decodeImages(q, body); e != nil {
		return nil, e
	}
	w, h := q.params.width, q.params.height
	if (w == nil) != (h == nil) || (w != nil && (*w < 1 || *h < 1 || *w != float64(int(*w)) || *h != float64(int(*h)))) {
		t.Fatalf("%q: size read as %v, %v: not two positive integers", body, w, h)
	}
	return g.newJob(q, nil, requestOrigin(r))
}

// hostileControl reports a control character other than tab and line
// breaks: none may reach the image service.
func hostileControl(s string) bool {
	return strings.IndexFunc(s, func(r rune) bool { return unicode.IsControl(r) && r != '\t' && r != '\n' && r != '\r' }) >= 0
}

// hostileCheck is the invariant of both body fuzz targets: a plain 400
// (or a 404 for an unknown model) in a marshalable envelope, or a job the
// image service can take, which then runs through the rest of the pipeline
// and renders valid markdown.
func hostileCheck(t *testing.T, g *Gateway, body []byte, j *job, e *apiError) {
	t.Helper()
	if e != nil {
		if j != nil {
			t.Fatalf("%q: both a job and an error %+v", body, e)
		}
		switch {
		case e.status == http.StatusBadRequest && e.typ == "invalid_request_error" && e.message != "":
		case e.status == http.StatusNotFound && e.code == "model_not_found":
		default:
			t.Fatalf("%q: error %+v, want a 400 (or a 404 for the model)", body, e)
		}
		if b, err := json.Marshal(e.body()); err != nil || !json.Valid(b) {
			t.Fatalf("%q: error envelope does not marshal: %v", body, err)
		}
		return
	}
	if j == nil {
		t.Fatalf("%q: neither a job nor an error", body)
	}
	for _, side := range []int{j.width, j.height} {
		if side < minSide || side > maxSide || side%8 != 0 {
			t.Fatalf("%q: size %dx%d outside 64…2048 or not a multiple of 8", body, j.width, j.height)
		}
	}
	if j.prompt == "" || strings.TrimSpace(j.prompt) == "" || !utf8.ValidString(j.prompt) || hostileControl(j.prompt) {
		t.Fatalf("%q: prompt %q: want non-empty valid UTF-8 without control characters", body, j.prompt)
	}
	if !utf8.ValidString(j.negative) || hostileControl(j.negative) {
		t.Fatalf("%q: negative prompt %q: want valid UTF-8 without control characters", body, j.negative)
	}
	if j.seed < 0 || j.seed >= maxSeed || j.cfg <= 0 || j.cfg > 30 {
		t.Fatalf("%q: seed %d cfg %v out of range", body, j.seed, j.cfg)
	}
	ctx := context.Background()
	g.runEnhance(ctx, j)
	if e := g.generate(ctx, j); e != nil {
		t.Fatalf("%q: generate: %+v", body, e)
	}
	md := g.markdown(j)
	if !utf8.ValidString(md) || hostileControl(md) {
		t.Fatalf("%q: markdown %q is not valid UTF-8 text", body, md)
	}
}

// hostileBodies seed both body fuzz targets, so plain `go test` runs them.
var hostileBodies = []string{
	`{"prompt":"a cat"}`,
	`{"prompt":"a cat, ratio 16:9 no-enhance","width":99999,"height":1e-300,"seed":"2147483646","cfg":30}`,
	`{"messages":[{"role":"user","content":[{"type":"text","text":"a"},{"type":"image_url","image_url":{"url":"u"}}]}]}`,
	`{"messages":[{"role":"user","content":[{"type":"image_url","image_url":{"url":"u"}}]}]}`,
	"{\"prompt\":\"a cat \xff\xfe\"}", "{\"prompt\":\"a\x00\"}", `{"prompt":"a\u0000\u001b\u007f\u0085 cat"}`,
	`{"prompt":"\u0000"}`, `{"prompt":"\ud800\udfff"}`, `{"prompt":"a","negative_prompt":"\u0000x"}`,
	`{"prompt":"a"} x`, `{"prompt":"a","prompt":"b"}`, `[{"prompt":"a"}]`, `"a"`, `null`, `1`, ``, `{`,
	`{"model":3}`, `{"model":"nope","prompt":"a"}`, `{"model":"Z-IMAGE","prompt":"a"}`,
	`{"prompt":"a","stream":"x"}`, `{"prompt":"a","stream_options":{"include_usage":1}}`,
	`{"prompt":"a","width":-1,"height":5}`, `{"prompt":"a","width":1e400,"height":1}`, `{"prompt":"a","width":0.1,"height":0.1}`,
	`{"prompt":"a","seed":2147483647}`, `{"prompt":"a","seed":"-5"}`, `{"prompt":"a","seed":1e3}`,
	`{"prompt":"a","cfg":0}`, `{"prompt":"a","cfg":31}`, `{"prompt":"a","cfg":1e-300}`,
	`{"prompt":"a","n":5,"size":"99999x99999","response_format":"b64_json"}`, `{"prompt":"a","size":"0x0"}`,
	`{"prompt":"a","size":"x"}`, `{"prompt":"a","size":"1024X768"}`, `{"prompt":"a","size":" 9 x 9 "}`, `{"prompt":"a","size":"auto"}`,
	`{"prompt":"a","size":"99999999999999999999x1"}`, `{"prompt":"a","size":"-8x8"}`,
	`{"prompt":"` + strings.Repeat("猫", 200) + `"}`, `{"prompt":"` + strings.Repeat("猫", 201) + `"}`,
	`{"x":` + strings.Repeat("[", 20000) + strings.Repeat("]", 20000) + `,"prompt":"a"}`,
	`{"prompt":"比例 16:9"}`, `{"prompt":"no-enhance"}`, `{"prompt":"\u0000 no-enhance \u0001"}`,
}

func FuzzHostileChatBody(f *testing.F) {
	for _, s := range hostileBodies {
		f.Add([]byte(s))
	}
	g := hostileGateway(f)
	r := httptest.NewRequest(http.MethodPost, "http://gw.example/v1/chat/completions", nil)
	f.Fuzz(func(t *testing.T, body []byte) {
		j, e := hostileChatJob(g, r, body)
		hostileCheck(t, g, body, j, e)
	})
}

func FuzzHostileImagesBody(f *testing.F) {
	for _, s := range hostileBodies {
		f.Add([]byte(s))
	}
	g := hostileGateway(f)
	r := httptest.NewRequest(http.MethodPost, "http://gw.example/v1/images/generations", nil)
	f.Fuzz(func(t *testing.T, body []byte) {
		j, e := hostileImagesJob(t, g, r, body)
		hostileCheck(t, g, body, j, e)
	})
}
