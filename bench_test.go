package zimage

import (
	"context"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
)

// Benchmarks of the request path, piece by piece and whole. Run with
//
//	go test -run '^$' -bench . -benchmem .
//
// They report time and allocations per operation; bench/ compares the
// whole gateway with Caddy's reverse_proxy under load.

const benchChatBody = `{"model":"Z-Image","messages":[{"role":"system","content":"You draw."},{"role":"user","content":"一只猫在看书，比例 16:9 no-enhance"}],"stream":false}`

func BenchmarkDecodeChat(b *testing.B) {
	body := []byte(benchChatBody)
	b.ReportAllocs()
	for b.Loop() {
		if _, _, e := decodeChat(body, defaultMaxPromptLength); e != nil {
			b.Fatal(e)
		}
	}
}

func BenchmarkDetectRatio(b *testing.B) {
	b.ReportAllocs()
	for b.Loop() {
		if _, _, ok := detectRatio("一只猫在看书，比例 16:9"); !ok {
			b.Fatal("no ratio")
		}
	}
}

func BenchmarkStripSkipWord(b *testing.B) {
	b.ReportAllocs()
	for b.Loop() {
		stripSkipWord("a cat reading a book no-enhance")
	}
}

func BenchmarkMarkdown(b *testing.B) {
	g := &Gateway{upstream: (*imageClient)(nil)}
	j := &job{
		imageURL: "https://img.example.com/a.png", prompt: "A fluffy ginger cat reading an old book, warm light",
		original: "一只猫在看书", enhance: enhanceOK, ratio: "16:9", width: 2048, height: 1152,
	}
	b.ReportAllocs()
	for b.Loop() {
		_ = g.markdown(j)
	}
}

func BenchmarkSSEChunk(b *testing.B) {
	w := httptest.NewRecorder()
	s := startSSE(w, defaultKeepalive)
	defer s.stop()
	c := chatCompletion{ID: "chatcmpl-x", Object: "chat.completion.chunk", Created: 1, Model: "Z-Image",
		Choices: []chatChoice{{Delta: &chatDelta{Content: ptr("![a](https://img.example.com/a.png)")}}}}
	b.ReportAllocs()
	for b.Loop() {
		w.Body.Reset()
		s.event(c)
	}
}

// BenchmarkServeChat is the whole non-streaming chat path through
// ServeHTTP against a loopback fake image service.
func BenchmarkServeChat(b *testing.B) {
	up := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		_, _ = io.Copy(io.Discard, r.Body)
		w.Header().Set("Content-Type", "application/json")
		_, _ = io.WriteString(w, `{"success":true,"data":{"image_url":"https://img.example.com/a.png"}}`)
	}))
	defer up.Close()
	g := provisionForBench(b, up.URL)
	next := caddyhttp.HandlerFunc(func(http.ResponseWriter, *http.Request) error { return nil })
	b.ReportAllocs()
	for b.Loop() {
		req := httptest.NewRequest(http.MethodPost, "/v1/chat/completions", strings.NewReader(benchChatBody))
		req.Header.Set("Authorization", "Bearer sk-bench")
		w := httptest.NewRecorder()
		if err := g.ServeHTTP(w, req, next); err != nil || w.Code != http.StatusOK {
			b.Fatalf("status %d: %v %s", w.Code, err, w.Body)
		}
	}
}

// BenchmarkServeModels is GET /v1/models through ServeHTTP.
func BenchmarkServeModels(b *testing.B) {
	g := provisionForBench(b, "demo")
	next := caddyhttp.HandlerFunc(func(http.ResponseWriter, *http.Request) error { return nil })
	req := httptest.NewRequest(http.MethodGet, "/v1/models", nil)
	req.Header.Set("Authorization", "Bearer sk-bench")
	b.ReportAllocs()
	for b.Loop() {
		w := httptest.NewRecorder()
		if err := g.ServeHTTP(w, req, next); err != nil || w.Code != http.StatusOK {
			b.Fatalf("status %d: %v", w.Code, err)
		}
	}
}

func provisionForBench(b *testing.B, upstreamURL string) *Gateway {
	b.Helper()
	ctx, cancel := caddy.NewContext(caddy.Context{Context: context.Background()})
	b.Cleanup(cancel)
	g := &Gateway{
		APIKeys:  []string{"sk-bench"},
		Upstream: &UpstreamConfig{URL: upstreamURL, APIKey: "sd-bench"},
		Enhance:  &EnhanceConfig{Off: true},
	}
	if err := g.Provision(ctx); err != nil {
		b.Fatal(err)
	}
	g.logger = zap.NewNop() // measure the handler, not the console
	return g
}

// TestUnitGenerationLine pins the generation line of docs/design.md#observability byte for byte,
// field order included: it is written through an inline object
// (it was the largest allocation of a chat request), and log pipelines parse it.
func TestUnitGenerationLine(t *testing.T) {
	t.Parallel()
	var buf strings.Builder
	enc := zapcore.NewJSONEncoder(zapcore.EncoderConfig{MessageKey: "msg", LineEnding: "\n",
		EncodeDuration: zapcore.SecondsDurationEncoder}) // as Caddy's
	g := &Gateway{logger: zap.New(zapcore.NewCore(enc, zapcore.AddSync(&buf), zapcore.InfoLevel))}
	j := &job{
		endpoint: endpointChat, model: &model{name: "Z-Image"}, width: 2048, height: 1152,
		ratio: "16:9", ratioSource: ratioFromUser, seed: 42, enhance: enhanceSkipped,
		queueWait: 1500 * time.Microsecond, latency: 2 * time.Second,
		client: &client{name: "alice"}, account: "main", stored: "0123abcd.png",
		info: upstreamInfo{pointsUsed: 2, hasPointsUsed: true, remainingPoints: 98.5, hasRemainingPoints: true,
			imageID: "img-7", modelName: "Z-Image"},
	}
	g.logGeneration(j, http.StatusOK, "")
	g.logGeneration(&job{endpoint: endpointImages, model: &model{name: "Z-Image"}, ratio: "1:1", ratioSource: ratioFromDefault},
		http.StatusBadGateway, "status_5xx")
	want := `{"msg":"generation","endpoint":"chat_completions","model":"Z-Image","size":"2048x1152","ratio":"16:9","ratio_source":"user","seed":42,"enhance":"skipped","queue_wait":0.0015,"upstream_latency":2,"status":200,"client":"alice","account":"main","stored":true,"store_id":"0123abcd","points_used":2,"remaining_points":98.5,"image_id":"img-7","model_name":"Z-Image"}
{"msg":"generation","endpoint":"images_generations","model":"Z-Image","size":"0x0","ratio":"1:1","ratio_source":"default","seed":0,"enhance":"","queue_wait":0,"upstream_latency":0,"status":502,"client":"","account":"","failure":"status_5xx"}
`
	if got := buf.String(); got != want {
		t.Errorf("generation lines:\n got %s\nwant %s", got, want)
	}
}

// TestUnitHotPathAllocations guards the allocations taken out of every
// chat request, the hot path.
func TestUnitHotPathAllocations(t *testing.T) {
	s := newScrubber([]string{"sk-secret-key-0123456789"})
	prompt := strings.Repeat("A fluffy ginger cat reading an old book, warm light. ", 4)
	for _, tc := range []struct {
		name string
		f    func()
	}{
		{"scrubbing a prompt without a secret", func() { _ = s.Replace(prompt) }},
	} {
		if n := testing.AllocsPerRun(100, tc.f); n != 0 {
			t.Errorf("%s: %v allocations, want none", tc.name, n)
		}
	}
}
