package zimage

// Integration tests of streaming chat completions (docs/design.md#the-prompt)
// through a real Caddy: chunk order and timing against fakes blocked on
// channels, keep-alives while the upstream waits, gzip through Caddy's
// encode, failures after the stream began, client aborts, and the
// official Go SDK consuming the stream.

import (
	"bufio"
	"compress/gzip"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"
	"unicode/utf8"

	"github.com/openai/openai-go/v3"
	"github.com/openai/openai-go/v3/option"
)

// streamWait bounds every wait on a fake or on the stream, so a broken
// gateway fails the test instead of hanging it. It is a safety net, not a
// speed requirement.
const streamWait = 10 * time.Second

// streamGate blocks a fake until the test opens it; Cleanup opens it too,
// so a failing test never leaves a fake's handler (and httptest's Close)
// waiting forever.
type streamGate struct {
	ch   chan struct{}
	once sync.Once
}

func newStreamGate(t *testing.T) *streamGate {
	g := &streamGate{ch: make(chan struct{})}
	t.Cleanup(g.open)
	return g
}

func (g *streamGate) open() { g.once.Do(func() { close(g.ch) }) }

// wait blocks until the gate opens or the request is cancelled; it reports
// whether the gate opened.
func (g *streamGate) wait(r *http.Request) bool {
	select {
	case <-g.ch:
		return true
	case <-r.Context().Done():
		return false
	}
}

// streamSignal is a non-blocking send on a one-slot channel.
func streamSignal(ch chan struct{}) {
	select {
	case ch <- struct{}{}:
	default:
	}
}

func streamWaitFor(t *testing.T, ch <-chan struct{}, what string) {
	t.Helper()
	select {
	case <-ch:
	case <-time.After(streamWait):
		t.Fatalf("timed out after %v waiting for %s", streamWait, what)
	}
}

// writeUpstreamOK answers a generate_image call with success.
func writeUpstreamOK(w http.ResponseWriter, imageURL string) {
	w.Header().Set("Content-Type", "application/json")
	fmt.Fprintf(w, `{"success":true,"data":{"image_url":%q}}`, imageURL)
}

// writeLLMAnswer answers a chat completions call with content.
func writeLLMAnswer(w http.ResponseWriter, content string) {
	w.Header().Set("Content-Type", "application/json")
	_ = json.NewEncoder(w).Encode(map[string]any{
		"id": "x", "object": "chat.completion",
		"choices": []any{map[string]any{"index": 0, "message": map[string]any{"role": "assistant", "content": content}}},
	})
}

// streamEvent is one server-sent event: a comment (": keep-alive") or a
// data line.
type streamEvent struct {
	comment string
	data    string
}

// streamReader reads server-sent events from a response body as they arrive.
type streamReader struct{ br *bufio.Reader }

func newStreamReader(r io.Reader) *streamReader { return &streamReader{br: bufio.NewReader(r)} }

// next returns the next event, io.EOF at a clean end of the body.
func (s *streamReader) next() (streamEvent, error) {
	var ev streamEvent
	started := false
	for {
		line, err := s.br.ReadString('\n')
		if err != nil {
			if errors.Is(err, io.EOF) && line == "" && !started {
				return ev, io.EOF
			}
			if errors.Is(err, io.EOF) {
				return ev, fmt.Errorf("stream ended inside an event: %q", line)
			}
			return ev, err
		}
		line = strings.TrimSuffix(line, "\n")
		switch {
		case line == "":
			if started {
				return ev, nil
			}
		case strings.HasPrefix(line, ":"):
			started = true
			ev.comment = strings.TrimSpace(line[1:])
		case strings.HasPrefix(line, "data: "):
			started = true
			ev.data = line[len("data: "):]
		default:
			return ev, fmt.Errorf("unexpected SSE line %q", line)
		}
	}
}

// nextData skips keep-alive comments and returns the next data payload and
// the number of keep-alives skipped.
func (s *streamReader) nextData(t *testing.T) (string, int) {
	t.Helper()
	keepAlives := 0
	for {
		ev, err := s.next()
		if err != nil {
			t.Fatalf("reading the stream: %v", err)
		}
		if ev.data != "" {
			return ev.data, keepAlives
		}
		if ev.comment != "keep-alive" {
			t.Fatalf("unexpected comment %q", ev.comment)
		}
		keepAlives++
	}
}

// expectEOF checks that the stream ends after at most keep-alive comments.
func (s *streamReader) expectEOF(t *testing.T) {
	t.Helper()
	for {
		ev, err := s.next()
		if errors.Is(err, io.EOF) {
			return
		}
		if err != nil {
			t.Fatalf("reading the stream: %v", err)
		}
		if ev.data != "" {
			t.Fatalf("event after the end of the stream: %s", ev.data)
		}
	}
}

// streamChunk is a chat.completion.chunk with the parts whose exact shape
// the tests check kept raw.
type streamChunk struct {
	ID      string `json:"id"`
	Object  string `json:"object"`
	Created int64  `json:"created"`
	Model   string `json:"model"`
	Choices []struct {
		Index        int             `json:"index"`
		Delta        json.RawMessage `json:"delta"`
		FinishReason *string         `json:"finish_reason"`
	} `json:"choices"`
	Usage json.RawMessage `json:"usage"`
	raw   map[string]json.RawMessage
}

func parseChunk(t *testing.T, data string) streamChunk {
	t.Helper()
	var c streamChunk
	if err := json.Unmarshal([]byte(data), &c); err != nil {
		t.Fatalf("chunk is not JSON: %v: %s", err, data)
	}
	if err := json.Unmarshal([]byte(data), &c.raw); err != nil {
		t.Fatal(err)
	}
	if c.Object != "chat.completion.chunk" {
		t.Fatalf("object %q, want chat.completion.chunk: %s", c.Object, data)
	}
	if !strings.HasPrefix(c.ID, "chatcmpl-") || c.Created == 0 {
		t.Fatalf("bad id or created: %s", data)
	}
	return c
}

// contentDelta returns the content of a chunk whose delta carries only
// content, failing otherwise.
func contentDelta(t *testing.T, c streamChunk) string {
	t.Helper()
	if len(c.Choices) != 1 || c.Choices[0].FinishReason != nil {
		t.Fatalf("content chunk: want one choice without finish_reason: %+v", c.raw)
	}
	var d map[string]string
	if err := json.Unmarshal(c.Choices[0].Delta, &d); err != nil || len(d) != 1 {
		t.Fatalf("content chunk delta %s: want {\"content\":…} only", c.Choices[0].Delta)
	}
	content, ok := d["content"]
	if !ok || content == "" {
		t.Fatalf("content chunk delta %s has no content", c.Choices[0].Delta)
	}
	return content
}

// postStream sends a chat completions body and returns the open response.
// The body is closed at cleanup.
func postStream(t *testing.T, ctx context.Context, client *http.Client, path, body string, hdr ...string) *http.Response {
	t.Helper()
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, baseURL+path, strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Authorization", "Bearer "+testClientKey)
	req.Header.Set("Content-Type", "application/json")
	for i := 0; i+1 < len(hdr); i += 2 {
		req.Header.Set(hdr[i], hdr[i+1])
	}
	resp, err := client.Do(req)
	if err != nil {
		t.Fatalf("POST %s: %v", path, err)
	}
	t.Cleanup(func() { resp.Body.Close() })
	return resp
}

// TestStreamChunksArriveAsWritten observes one stream chunk by chunk
// against fakes blocked on channels: the role chunk arrives while the LLM
// has not answered, keep-alives arrive while the image service has not
// answered, then content, finish, usage and [DONE] — and the content is the
// non-streaming answer's markdown for the same seed.
func TestStreamChunksArriveAsWritten(t *testing.T) {
	const llmOut = `{"prompt":"a red fox in fresh snow, cinematic light","aspect_ratio":"16:9"}`
	up := newFakeUpstream(t)
	llm := newFakeLLM(t, llmOut)
	llmGate, upGate := newStreamGate(t), newStreamGate(t)
	llmEntered, upEntered := make(chan struct{}, 1), make(chan struct{}, 1)
	llm.setHandler(func(w http.ResponseWriter, r *http.Request) {
		streamSignal(llmEntered)
		if llmGate.wait(r) {
			writeLLMAnswer(w, llmOut)
		}
	})
	up.setHandler(func(w http.ResponseWriter, r *http.Request) {
		streamSignal(upEntered)
		if upGate.wait(r) {
			writeUpstreamOK(w, "https://img.example.com/fox.png")
		}
	})
	startCaddy(t, gatewaySite(up, llm, "stream_keepalive 100ms"))

	const body = `{"model":"z-image","seed":4242,"messages":[{"role":"user","content":"a fox in the snow"}]%s}`
	resp := postStream(t, context.Background(), testClient(30*time.Second), "/v1/chat/completions",
		fmt.Sprintf(body, `,"stream":true,"stream_options":{"include_usage":true}`))
	if resp.StatusCode != http.StatusOK {
		b, _ := io.ReadAll(resp.Body)
		t.Fatalf("status %d: %s", resp.StatusCode, b)
	}
	if ct := resp.Header.Get("Content-Type"); !strings.HasPrefix(ct, "text/event-stream") {
		t.Fatalf("Content-Type %q, want text/event-stream", ct)
	}
	if cc := resp.Header.Get("Cache-Control"); cc != "no-cache" {
		t.Fatalf("Cache-Control %q, want no-cache", cc)
	}
	sr := newStreamReader(resp.Body)

	// 1. the role chunk, while the LLM is still blocked
	data, _ := sr.nextData(t)
	role := parseChunk(t, data)
	if len(role.Choices) != 1 || string(role.Choices[0].Delta) != `{"role":"assistant","content":""}` ||
		role.Choices[0].FinishReason != nil || role.Choices[0].Index != 0 {
		t.Fatalf("role chunk: %s", data)
	}
	if role.Model != "z-image" {
		t.Fatalf("model %q, want the requested name echoed", role.Model)
	}
	streamWaitFor(t, llmEntered, "the enhancement call")
	if n := len(up.Calls()); n != 0 {
		t.Fatalf("the image service was called %d times before enhancement finished", n)
	}

	// 2. keep-alives while the image service is blocked, and nothing else
	llmGate.open()
	streamWaitFor(t, upEntered, "the image service call")
	for seen := 0; seen < 2; {
		ev, err := sr.next()
		if err != nil {
			t.Fatalf("reading keep-alives: %v", err)
		}
		if ev.data != "" {
			t.Fatalf("data event before the image service answered: %s", ev.data)
		}
		if ev.comment != "keep-alive" {
			t.Fatalf("comment %q, want keep-alive", ev.comment)
		}
		seen++
	}

	// 3. the rest once the image service answers
	upGate.open()
	data, _ = sr.nextData(t)
	contentChunk := parseChunk(t, data)
	content := contentDelta(t, contentChunk)
	data, _ = sr.nextData(t)
	finish := parseChunk(t, data)
	data, _ = sr.nextData(t)
	usageChunk := parseChunk(t, data)
	if data, _ = sr.nextData(t); data != "[DONE]" {
		t.Fatalf("want [DONE], got %s", data)
	}
	sr.expectEOF(t)
	for _, c := range []streamChunk{contentChunk, finish, usageChunk} {
		if c.ID != role.ID || c.Model != "z-image" {
			t.Fatalf("chunk id/model %q/%q, want %q/z-image", c.ID, c.Model, role.ID)
		}
	}
	if len(finish.Choices) != 1 || string(finish.Choices[0].Delta) != "{}" ||
		finish.Choices[0].FinishReason == nil || *finish.Choices[0].FinishReason != "stop" {
		t.Fatalf("finish chunk: %+v", finish.raw)
	}
	if string(usageChunk.raw["choices"]) != "[]" {
		t.Fatalf("usage chunk choices %s, want []", usageChunk.raw["choices"])
	}

	// the same request without streaming gives the same markdown
	status, _, nonStream := do(t, http.MethodPost, "/v1/chat/completions", fmt.Sprintf(body, ""))
	if status != http.StatusOK {
		t.Fatalf("non-stream status %d: %s", status, nonStream)
	}
	if want := chatContent(t, nonStream); content != want {
		t.Fatalf("stream content differs from the non-stream answer:\n got %q\nwant %q", content, want)
	}
	if !strings.HasPrefix(content, "![a red fox in fresh snow, cinematic light](https://img.example.com/fox.png)\n\n---\n**✨ Enhanced Prompt:**\n") ||
		!strings.HasSuffix(content, "**🎨 Aspect Ratio:** 16:9\n**📐 Resolution:** 2048×1152") {
		t.Fatalf("content is not the enhanced markdown: %q", content)
	}
	for _, c := range up.Calls() {
		if c.Body.Seed != 4242 {
			t.Fatalf("seed %d reached the image service, want 4242", c.Body.Seed)
		}
	}
}

// TestStreamChunkShapes checks every chunk of a stream against the OpenAI
// chunk format, with and without the usage chunk, on both paths.
func TestStreamChunkShapes(t *testing.T) {
	up := newFakeUpstream(t)
	startCaddy(t, gatewaySite(up, nil, ""))
	for _, tc := range []struct {
		name      string
		path      string
		options   string
		model     string
		wantModel string
		wantUsage bool
	}{
		{"usage requested", "/v1/chat/completions", `,"stream_options":{"include_usage":true}`, `"model":"Z-IMAGE",`, "Z-IMAGE", true},
		{"usage not requested", "/v1/chat/completions", `,"stream_options":{"include_usage":false}`, `"model":"Z-Image",`, "Z-Image", false},
		{"no stream_options, no model", "/v1/chat/completions", "", "", "Z-Image", false},
		{"path without v1", "/chat/completions", `,"stream_options":{"include_usage":true}`, `"model":"z-image",`, "z-image", true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			body := fmt.Sprintf(`{%s"stream":true,"seed":7,"messages":[{"role":"user","content":"a lighthouse no-enhance"}]%s}`, tc.model, tc.options)
			resp := postStream(t, context.Background(), testClient(30*time.Second), tc.path, body)
			if resp.StatusCode != http.StatusOK || !strings.HasPrefix(resp.Header.Get("Content-Type"), "text/event-stream") {
				b, _ := io.ReadAll(resp.Body)
				t.Fatalf("status %d, type %q: %s", resp.StatusCode, resp.Header.Get("Content-Type"), b)
			}
			sr := newStreamReader(resp.Body)
			var chunks []streamChunk
			for {
				data, _ := sr.nextData(t)
				if data == "[DONE]" {
					break
				}
				chunks = append(chunks, parseChunk(t, data))
			}
			sr.expectEOF(t)
			want := 3
			if tc.wantUsage {
				want = 4
			}
			if len(chunks) != want {
				t.Fatalf("%d chunks before [DONE], want %d", len(chunks), want)
			}
			for i, c := range chunks {
				if c.ID != chunks[0].ID || c.Model != tc.wantModel {
					t.Fatalf("chunk %d: id %q model %q, want %q %q", i, c.ID, c.Model, chunks[0].ID, tc.wantModel)
				}
				if i < 3 {
					if u, ok := c.raw["usage"]; ok && string(u) != "null" {
						t.Fatalf("chunk %d carries usage %s", i, u)
					}
					if len(c.Choices) != 1 || c.Choices[0].Index != 0 {
						t.Fatalf("chunk %d: want one choice with index 0: %s", i, c.raw["choices"])
					}
				}
			}
			if d := string(chunks[0].Choices[0].Delta); d != `{"role":"assistant","content":""}` || chunks[0].Choices[0].FinishReason != nil {
				t.Fatalf("role chunk delta %s", d)
			}
			content := contentDelta(t, chunks[1])
			if want := "![a lighthouse](https://img.example.com/7.png)\n\n---\n**📝 Prompt:**\na lighthouse\n\n**🎨 Aspect Ratio:** 1:1\n**📐 Resolution:** 2048×2048"; content != want {
				t.Fatalf("content\n got %q\nwant %q", content, want)
			}
			if f := chunks[2].Choices[0]; string(f.Delta) != "{}" || f.FinishReason == nil || *f.FinishReason != "stop" {
				t.Fatalf("finish chunk %s", chunks[2].raw["choices"])
			}
			if tc.wantUsage {
				u := chunks[3]
				if string(u.raw["choices"]) != "[]" {
					t.Fatalf("usage chunk choices %s, want []", u.raw["choices"])
				}
				var got usage
				if err := json.Unmarshal(u.Usage, &got); err != nil || got != (usage{}) || !strings.Contains(string(u.Usage), `"total_tokens":0`) {
					t.Fatalf("usage %s, want zero usage", u.Usage)
				}
			}
		})
	}
}

// TestStreamThroughGzip runs a stream behind Caddy's encode gzip on the
// same route: every event must reach the client when written, decoded
// incrementally, not when the response ends.
func TestStreamThroughGzip(t *testing.T) {
	up := newFakeUpstream(t)
	upGate := newStreamGate(t)
	upEntered := make(chan struct{}, 1)
	up.setHandler(func(w http.ResponseWriter, r *http.Request) {
		streamSignal(upEntered)
		if upGate.wait(r) {
			writeUpstreamOK(w, "https://img.example.com/gz.png")
		}
	})
	startCaddy(t, "encode gzip\n"+gatewaySite(up, nil, "stream_keepalive 100ms"))

	// setting Accept-Encoding ourselves turns off the transport's own
	// transparent decompression, so the test sees the gzip stream
	resp := postStream(t, context.Background(), testClient(30*time.Second), "/v1/chat/completions",
		`{"stream":true,"messages":[{"role":"user","content":"a harbour at night"}]}`,
		"Accept-Encoding", "gzip")
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("status %d", resp.StatusCode)
	}
	if ce := resp.Header.Get("Content-Encoding"); ce != "gzip" {
		t.Fatalf("Content-Encoding %q, want gzip (is encode on the route?)", ce)
	}
	zr, err := gzip.NewReader(resp.Body)
	if err != nil {
		t.Fatalf("gzip header: %v", err)
	}
	sr := newStreamReader(zr)

	data, _ := sr.nextData(t)
	if c := parseChunk(t, data); string(c.Choices[0].Delta) != `{"role":"assistant","content":""}` {
		t.Fatalf("first chunk is not the role chunk: %s", data)
	}
	streamWaitFor(t, upEntered, "the image service call")
	ev, err := sr.next()
	if err != nil || ev.comment != "keep-alive" {
		t.Fatalf("want a keep-alive while the image service waits, got %+v, %v", ev, err)
	}
	upGate.open()
	data, _ = sr.nextData(t)
	if content := contentDelta(t, parseChunk(t, data)); !strings.HasPrefix(content, "![a harbour at night](https://img.example.com/gz.png)") {
		t.Fatalf("content %q", content)
	}
	data, _ = sr.nextData(t)
	if c := parseChunk(t, data); c.Choices[0].FinishReason == nil {
		t.Fatalf("want the finish chunk, got %s", data)
	}
	if data, _ = sr.nextData(t); data != "[DONE]" {
		t.Fatalf("want [DONE], got %s", data)
	}
	sr.expectEOF(t) // also checks the gzip trailer
}

// TestStreamUpstreamFailure makes the image service fail after the stream
// began: the client gets one error event in the OpenAI envelope, then the
// stream ends, without content, finish chunk or [DONE].
func TestStreamUpstreamFailure(t *testing.T) {
	up := newFakeUpstream(t)
	startCaddy(t, gatewaySite(up, nil, "stream_keepalive 100ms"))
	for _, tc := range []struct {
		name     string
		status   int
		body     string
		wantCode string
		wantType string
		wantMsg  string
	}{
		{"500 with message", 500, `{"success":false,"error":"GPU on fire"}`, "upstream_error", "upstream_error", "GPU on fire"},
		{"429", 429, `{"error":{"message":"slow down"}}`, "rate_limit_exceeded", "rate_limit_error", "slow down"},
		{"success false", 200, `{"success":false,"message":"prompt rejected by filter"}`, "upstream_error", "upstream_error", "prompt rejected by filter"},
		{"no image_url", 200, `{"success":true,"data":{}}`, "upstream_error", "upstream_error", "image_url"},
		{"malformed JSON", 200, `{"success":tru`, "upstream_error", "upstream_error", "not valid JSON"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			gate := newStreamGate(t)
			up.setHandler(func(w http.ResponseWriter, r *http.Request) {
				if gate.wait(r) {
					w.Header().Set("Content-Type", "application/json")
					w.WriteHeader(tc.status)
					io.WriteString(w, tc.body)
				}
			})
			resp := postStream(t, context.Background(), testClient(30*time.Second), "/v1/chat/completions",
				`{"stream":true,"messages":[{"role":"user","content":"a cat"}]}`)
			if resp.StatusCode != http.StatusOK {
				t.Fatalf("status %d: the stream should have started", resp.StatusCode)
			}
			sr := newStreamReader(resp.Body)
			data, _ := sr.nextData(t)
			if c := parseChunk(t, data); string(c.Choices[0].Delta) != `{"role":"assistant","content":""}` {
				t.Fatalf("first chunk %s", data)
			}
			gate.open()
			data, _ = sr.nextData(t)
			var eb struct {
				Error *struct {
					Message string  `json:"message"`
					Type    string  `json:"type"`
					Param   *string `json:"param"`
					Code    string  `json:"code"`
				} `json:"error"`
			}
			if err := json.Unmarshal([]byte(data), &eb); err != nil || eb.Error == nil {
				t.Fatalf("want an error event, got %s", data)
			}
			if eb.Error.Code != tc.wantCode || eb.Error.Type != tc.wantType || !strings.Contains(eb.Error.Message, tc.wantMsg) {
				t.Fatalf("error event %s, want code %s type %s message containing %q", data, tc.wantCode, tc.wantType, tc.wantMsg)
			}
			sr.expectEOF(t) // no [DONE], no content after the error
		})
	}
}

// TestStreamErrorsBeforeStart: what is wrong before the stream begins is an
// ordinary JSON error with its status, not an event stream.
func TestStreamErrorsBeforeStart(t *testing.T) {
	up := newFakeUpstream(t)
	startCaddy(t, gatewaySite(up, nil, ""))
	const prompt = `"messages":[{"role":"user","content":"a cat"}]`
	for _, tc := range []struct {
		name      string
		body      string
		hdr       []string
		status    int
		code      string
		wantParam string
	}{
		{"no key", `{"stream":true,` + prompt + `}`, []string{"Authorization", ""}, 401, "invalid_api_key", ""},
		{"wrong key", `{"stream":true,` + prompt + `}`, []string{"Authorization", "Bearer sk-wrong"}, 401, "invalid_api_key", ""},
		{"bad JSON", `{"stream":true,` + prompt, nil, 400, "invalid_request", ""},
		{"unknown model", `{"stream":true,"model":"sdxl",` + prompt + `}`, nil, 404, "model_not_found", "model"},
		{"no prompt", `{"stream":true,"messages":[{"role":"system","content":"hi"}]}`, nil, 400, "invalid_request", "messages"},
		{"bad seed", `{"stream":true,"seed":"abc",` + prompt + `}`, nil, 400, "invalid_request", "seed"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			status, hdr, body := do(t, http.MethodPost, "/v1/chat/completions", tc.body, tc.hdr...)
			if status != tc.status {
				t.Fatalf("status %d, want %d: %s", status, tc.status, body)
			}
			if ct := hdr.Get("Content-Type"); ct != "application/json" {
				t.Fatalf("Content-Type %q, want application/json", ct)
			}
			e := apiErr(t, body)
			if e.Code != tc.code {
				t.Fatalf("code %q, want %q", e.Code, tc.code)
			}
			if tc.wantParam != "" && (e.Param == nil || *e.Param != tc.wantParam) {
				t.Fatalf("param %v, want %q", e.Param, tc.wantParam)
			}
		})
	}
	if n := len(up.Calls()); n != 0 {
		t.Fatalf("the image service was called %d times for rejected requests", n)
	}
}

// TestStreamClientAbort: a client that leaves mid-stream cancels the LLM or
// image service call in flight (the fakes observe their request context
// end), and no goroutine of the request outlives it.
func TestStreamClientAbort(t *testing.T) {
	for _, tc := range []struct {
		name        string
		duringLLM   bool
		wantUpCalls int
	}{
		{"during enhancement", true, 0},
		{"during generation", false, 1},
	} {
		t.Run(tc.name, func(t *testing.T) {
			up := newFakeUpstream(t)
			llm := newFakeLLM(t, `{"prompt":"a cat on a roof","aspect_ratio":null}`)
			entered, cancelled := make(chan struct{}, 1), make(chan struct{}, 1)
			block := func(w http.ResponseWriter, r *http.Request) {
				streamSignal(entered)
				select {
				case <-r.Context().Done():
					streamSignal(cancelled)
				case <-time.After(streamWait):
					// not cancelled: answer so the test ends and fails below
					writeUpstreamOK(w, "https://img.example.com/late.png")
				}
			}
			// timeouts far beyond streamWait: only the client leaving can
			// end the blocked call in time
			startCaddy(t, fmt.Sprintf(`zimage_gateway {
	api_key %s
	stream_keepalive 100ms
	upstream %s {
		api_key %s
		timeout 60s
	}
	enhance {
		api_key %s
		base_url %s
		timeout 60s
	}
}`, testClientKey, up.endpoint(), testSDKey, testLLMKey, llm.baseURL()))
			// a first request opens the gateway's keep-alive connections to
			// the fakes, so the baseline holds them and only what belongs to
			// the aborted request can exceed it
			const body = `{"stream":true,"messages":[{"role":"user","content":"a cat on a roof"}]}`
			if status, _, b := do(t, http.MethodPost, "/v1/chat/completions", body); status != http.StatusOK || !strings.HasSuffix(string(b), "data: [DONE]\n\n") {
				t.Fatalf("warm-up: status %d: %s", status, b)
			}
			upBefore := len(up.Calls())
			if tc.duringLLM {
				llm.setHandler(block)
			} else {
				up.setHandler(block)
			}
			base := settledGoroutines()
			tr := &http.Transport{}
			client := &http.Client{Transport: recordingTransport{base: tr}}
			ctx, cancel := context.WithCancel(context.Background())
			resp := postStream(t, ctx, client, "/v1/chat/completions", body)
			sr := newStreamReader(resp.Body)
			data, _ := sr.nextData(t)
			parseChunk(t, data)
			streamWaitFor(t, entered, "the blocked call")
			// a keep-alive proves the loop runs before the client leaves
			if ev, err := sr.next(); err != nil || ev.comment != "keep-alive" {
				t.Fatalf("want a keep-alive while waiting, got %+v, %v", ev, err)
			}
			cancel()
			resp.Body.Close()
			tr.CloseIdleConnections()
			streamWaitFor(t, cancelled, "the blocked call to be cancelled")
			if n := len(up.Calls()) - upBefore; n != tc.wantUpCalls {
				t.Fatalf("the image service was called %d times, want %d", n, tc.wantUpCalls)
			}

			// every goroutine of the request (handler, keep-alive timer,
			// outgoing calls) ends: the count returns to the baseline
			deadline := time.Now().Add(streamWait)
			for {
				n := runtime.NumGoroutine()
				if n <= base {
					break
				}
				if time.Now().After(deadline) {
					buf := make([]byte, 1<<20)
					t.Fatalf("%d goroutines remain, baseline %d:\n%s", n, base, buf[:runtime.Stack(buf, true)])
				}
				time.Sleep(20 * time.Millisecond)
			}
		})
	}
}

// settledGoroutines waits until the goroutine count stops falling (timers
// and connections of earlier requests winding down) and returns it.
func settledGoroutines() int {
	n := runtime.NumGoroutine()
	for range 50 {
		time.Sleep(20 * time.Millisecond)
		m := runtime.NumGoroutine()
		if m >= n {
			return n
		}
		n = m
	}
	return n
}

// flushRecorder is a ResponseWriter that reports every write attempt and
// can be made to fail, for the keep-alive timer's unit test.
type flushRecorder struct {
	*httptest.ResponseRecorder
	writes chan string
	fail   bool
}

func (f *flushRecorder) Write(b []byte) (int, error) {
	f.writes <- string(b)
	if f.fail {
		return 0, errors.New("client gone")
	}
	return f.ResponseRecorder.Write(b)
}

// TestStreamKeepAliveTimer: the keep-alive timer stops writing once the
// stream is stopped and once a write has failed (the client is gone); it
// is re-armed only while the stream is healthy.
func TestStreamKeepAliveTimer(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name string
		fail bool
	}{
		{"stopped by the handler", false},
		{"client gone", true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			rec := &flushRecorder{ResponseRecorder: httptest.NewRecorder(), writes: make(chan string, 100), fail: tc.fail}
			s := startSSE(rec, time.Millisecond)
			defer s.stop()
			if ct := rec.Header().Get("Content-Type"); ct != "text/event-stream" {
				t.Fatalf("Content-Type %q", ct)
			}
			writes := 2
			if tc.fail {
				writes = 1
			}
			for range writes {
				select {
				case w := <-rec.writes:
					if w != ": keep-alive\n\n" {
						t.Fatalf("keep-alive wrote %q", w)
					}
				case <-time.After(streamWait):
					t.Fatal("no keep-alive written")
				}
			}
			if !tc.fail {
				s.stop()
			}
			// the callback holds the mutex from its write to its re-arming:
			// once we hold it, the last callback has finished
			s.mu.Lock()
			s.mu.Unlock()
			if tc.fail && !s.failed {
				t.Fatal("a failed write did not mark the stream failed")
			}
			if s.timer.Stop() {
				t.Fatal("the keep-alive timer is still armed")
			}
			s.keepAlive() // a late timer callback writes nothing
			select {
			case w := <-rec.writes:
				t.Fatalf("keep-alive written after the stream ended: %q", w)
			default:
			}
			if !tc.fail {
				// events still go out after the keep-alives stop
				s.event(map[string]int{"n": 1})
				s.done()
				if got := rec.Body.String(); !strings.HasSuffix(got, ": keep-alive\n\ndata: {\"n\":1}\n\ndata: [DONE]\n\n") {
					t.Fatalf("body %q", got)
				}
				if !rec.Flushed {
					t.Fatal("events were not flushed")
				}
			}
		})
	}
}

// openaiSDK is the official OpenAI Go SDK pointed at the test site.
func openaiSDK(base string) openai.Client {
	return openai.NewClient(
		option.WithBaseURL(baseURL+base),
		option.WithAPIKey(testClientKey),
		option.WithHTTPClient(testClient(30*time.Second)),
		option.WithMaxRetries(0),
	)
}

// TestStreamSDK consumes the stream with the official SDK and its
// accumulator: the accumulated message equals the non-streaming answer for
// the same seed, on both base URLs.
func TestStreamSDK(t *testing.T) {
	up := newFakeUpstream(t)
	llm := newFakeLLM(t, "```json\n{\"prompt\":\"an astronaut riding a horse on the moon\",\"aspect_ratio\":\"3:2\"}\n```")
	startCaddy(t, gatewaySite(up, llm, ""))
	for _, base := range []string{"/v1", ""} {
		t.Run("base "+base, func(t *testing.T) {
			client := openaiSDK(base)
			params := openai.ChatCompletionNewParams{
				Model:    "Z-Image",
				Messages: []openai.ChatCompletionMessageParamUnion{openai.UserMessage("宇航员骑马")},
				Seed:     openai.Int(31337),
			}
			ctx := context.Background()
			plain, err := client.Chat.Completions.New(ctx, params)
			if err != nil {
				t.Fatalf("non-streaming: %v", err)
			}

			params.StreamOptions = openai.ChatCompletionStreamOptionsParam{IncludeUsage: openai.Bool(true)}
			stream := client.Chat.Completions.NewStreaming(ctx, params)
			var acc openai.ChatCompletionAccumulator
			chunks := 0
			for stream.Next() {
				chunk := stream.Current()
				if !acc.AddChunk(chunk) {
					t.Fatalf("the accumulator rejected chunk %d: %s", chunks, chunk.RawJSON())
				}
				chunks++
			}
			if err := stream.Err(); err != nil {
				t.Fatalf("stream: %v", err)
			}
			stream.Close()
			if chunks != 4 {
				t.Fatalf("%d chunks, want role, content, finish and usage", chunks)
			}
			if len(acc.Choices) != 1 || len(plain.Choices) != 1 {
				t.Fatalf("choices: stream %d, plain %d", len(acc.Choices), len(plain.Choices))
			}
			got, want := acc.Choices[0].Message.Content, plain.Choices[0].Message.Content
			if got != want {
				t.Fatalf("accumulated content differs from the non-stream answer:\n got %q\nwant %q", got, want)
			}
			if !strings.Contains(got, "(https://img.example.com/31337.png)") || !strings.Contains(got, "**📐 Resolution:** 1920×1280") {
				t.Fatalf("content %q", got)
			}
			if acc.Choices[0].FinishReason != "stop" || acc.Model != "Z-Image" || !strings.HasPrefix(acc.ID, "chatcmpl-") {
				t.Fatalf("accumulated finish %q model %q id %q", acc.Choices[0].FinishReason, acc.Model, acc.ID)
			}
		})
	}
	for _, c := range up.Calls() {
		if c.Body.Seed != 31337 {
			t.Fatalf("seed %d reached the image service, want 31337", c.Body.Seed)
		}
	}
}

// TestStreamSDKError: a failure after the stream began reaches the SDK as
// a stream error carrying the image service's message.
func TestStreamSDKError(t *testing.T) {
	up := newFakeUpstream(t)
	up.setHandler(func(w http.ResponseWriter, r *http.Request) {
		w.WriteHeader(http.StatusInternalServerError)
		io.WriteString(w, `{"error":"out of GPUs"}`)
	})
	startCaddy(t, gatewaySite(up, nil, ""))
	client := openaiSDK("/v1")
	stream := client.Chat.Completions.NewStreaming(context.Background(), openai.ChatCompletionNewParams{
		Model:    "Z-Image",
		Messages: []openai.ChatCompletionMessageParamUnion{openai.UserMessage("a cat")},
	})
	defer stream.Close()
	var acc openai.ChatCompletionAccumulator
	for stream.Next() {
		acc.AddChunk(stream.Current())
	}
	err := stream.Err()
	if err == nil || !strings.Contains(err.Error(), "out of GPUs") {
		t.Fatalf("stream error %v, want one naming the upstream's message", err)
	}
	if len(acc.Choices) == 1 && acc.Choices[0].Message.Content != "" {
		t.Fatalf("content %q delivered despite the failure", acc.Choices[0].Message.Content)
	}
}

// hostileJSONText is s as it reads back after a JSON round trip:
// encoding/json writes each byte of invalid UTF-8 as U+FFFD.
func hostileJSONText(s string) string {
	var b strings.Builder
	for i := 0; i < len(s); {
		r, n := utf8.DecodeRuneInString(s[i:])
		if r == utf8.RuneError && n == 1 {
			b.WriteRune(utf8.RuneError)
		} else {
			b.WriteString(s[i : i+n])
		}
		i += n
	}
	return b.String()
}

// FuzzHostileSSE: whatever text a chunk carries (the markdown echoes the
// prompt; the model name and error messages echo client strings), every
// event the sseWriter writes is one `data: <JSON>` line followed by a blank
// line, and the JSON reads back as the text.
func FuzzHostileSSE(f *testing.F) {
	for _, s := range []string{
		"plain", "", "two\nlines", "cr\rlf\r\n", "\n\ndata: [DONE]\n\n", "data: {\"x\":1}", ": keep-alive\n\n",
		"\x00\x01\x1b[31m", "\u2028\u2029\u0085", "\xff\xfe\xc0\xaf", "\xed\xa0\x80", "猫🐈‍⬛", "\"}\\", "</script><!--",
	} {
		f.Add(s, "Z-Image")
	}
	f.Add("content", "dall-e-3\n\ndata: x")
	f.Fuzz(func(t *testing.T, content, model string) {
		rec := httptest.NewRecorder()
		s := startSSE(rec, time.Hour)
		chunk := func(choices []chatChoice) chatCompletion {
			return chatCompletion{ID: "chatcmpl-fuzz", Object: "chat.completion.chunk", Created: 1, Model: model, Choices: choices}
		}
		s.event(chunk([]chatChoice{{Delta: &chatDelta{Role: "assistant", Content: ptr("")}}}))
		s.event(chunk([]chatChoice{{Delta: &chatDelta{Content: ptr(content)}}}))
		s.event((&apiError{status: http.StatusBadGateway, typ: "upstream_error", code: "upstream_error", message: content}).body())
		s.done()
		s.stop()

		if ct := rec.Header().Get("Content-Type"); ct != "text/event-stream" {
			t.Fatalf("Content-Type %q", ct)
		}
		out := rec.Body.String()
		if !strings.HasSuffix(out, "\n\n") {
			t.Fatalf("stream does not end with a blank line: %q", out)
		}
		events := strings.Split(strings.TrimSuffix(out, "\n\n"), "\n\n")
		if len(events) != 4 || events[3] != "data: [DONE]" {
			t.Fatalf("want 3 events and [DONE], got %d: %q", len(events), out)
		}
		wantText, wantModel := hostileJSONText(content), hostileJSONText(model)
		for i, ev := range events[:3] {
			payload, ok := strings.CutPrefix(ev, "data: ")
			// SSE ends a line at LF, CR or CRLF: none may occur inside one
			if !ok || strings.ContainsAny(payload, "\r\n") || !json.Valid([]byte(payload)) {
				t.Fatalf("event %d is not one data line of JSON: %q", i, ev)
			}
			var got struct {
				Model   string `json:"model"`
				Choices []struct {
					Delta struct {
						Content *string `json:"content"`
					} `json:"delta"`
				} `json:"choices"`
				Error *struct {
					Message string `json:"message"`
				} `json:"error"`
			}
			if err := json.Unmarshal([]byte(payload), &got); err != nil {
				t.Fatalf("event %d: %v", i, err)
			}
			switch i {
			case 0:
				if got.Model != wantModel || len(got.Choices) != 1 || got.Choices[0].Delta.Content == nil || *got.Choices[0].Delta.Content != "" {
					t.Fatalf("role chunk reads back as %+v", got)
				}
			case 1:
				if got.Model != wantModel || len(got.Choices) != 1 || got.Choices[0].Delta.Content == nil || *got.Choices[0].Delta.Content != wantText {
					t.Fatalf("content chunk reads back as %+v, want content %q model %q", got, wantText, wantModel)
				}
			case 2:
				if got.Error == nil || got.Error.Message != wantText {
					t.Fatalf("error event reads back as %q, want message %q", payload, wantText)
				}
			}
		}
	})
}
