package zimage

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// The answer is read into a pooled buffer of 4 KiB, and past it up to
// maxUpstreamBody: a success of any size up to the limit is read whole,
// padding on either side of the buffer's edge, and one byte more fails.
func TestUnitImageClientAnswerSizes(t *testing.T) {
	const head, tail = `{"success":true,"data":{"image_url":"https://img.example/x.png","model_name":"Z-Image","pad":"`, `"}}`
	for _, size := range []int{len(head) + len(tail), 4<<10 - 1, 4 << 10, 4<<10 + 1, 100 << 10, maxUpstreamBody, maxUpstreamBody + 1} {
		body := head + strings.Repeat("a", size-len(head)-len(tail)) + tail
		srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			_, _ = w.Write([]byte(body))
		}))
		ic, err := newImageClient(srv.URL+"/api/v1/generate_image", time.Minute, newTransport())
		if err != nil {
			t.Fatal(err)
		}
		// twice: the second call reads into the buffer the first gave back
		for range 2 {
			res, ue := ic.generate(context.Background(), "sd-key", upstreamRequest{Prompt: "a cat"}, "")
			if size > maxUpstreamBody {
				if ue == nil || ue.kind != kindBadResponse || !strings.Contains(ue.message, "larger than") {
					t.Errorf("answer of %d bytes: %+v, %+v; want bad_response, larger than the limit", size, res, ue)
				}
				continue
			}
			if ue != nil || res.imageURL != "https://img.example/x.png" || res.info.modelName != "Z-Image" {
				t.Errorf("answer of %d bytes: %+v, %+v; want the image", size, res, ue)
			}
		}
		ic.closeIdle()
		srv.Close()
	}
}

// The request the gateway sends to the image service and the faults of its
// answer (refused, hang, 5xx, 429, bad or huge answers), through a real
// Caddy (harness_test.go). Each test asserts both what the client got and
// what the fake image service received.

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

// An image service that trickles its answer, through a real Caddy: the
// upstream timeout bounds the whole call, the client gets a well-formed
// answer, the connection is released and nothing panics.

// TestFaultUpstreamTrickle: an image service that sends its headers and the
// start of a success, then one byte every 100ms for ever. The upstream
// timeout bounds the whole call, not the time between bytes: the client
// gets a 504 and the gateway drops the connection, which the fake sees.
func TestFaultUpstreamTrickle(t *testing.T) {
	up := newFakeUpstream(t)
	stop := faultStop(t)
	var once sync.Once
	released := make(chan struct{})
	var how atomic.Value
	up.setHandler(func(w http.ResponseWriter, r *http.Request) {
		defer faultSignal(&once, released)
		rc := http.NewResponseController(w)
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(http.StatusOK)
		_, _ = io.WriteString(w, `{"success":true,"data":{"image_url":"https://img.example.com/`)
		if err := rc.Flush(); err != nil {
			how.Store("first write failed")
			return
		}
		tick := time.NewTicker(100 * time.Millisecond)
		defer tick.Stop()
		for {
			select {
			case <-r.Context().Done():
				how.Store("released")
				return
			case <-stop:
				how.Store("still trickling when the test ended")
				return
			case <-tick.C:
			}
			if _, err := w.Write([]byte("a")); err != nil {
				how.Store("released")
				return
			}
			if err := rc.Flush(); err != nil {
				how.Store("released")
				return
			}
		}
	})
	mark := faultLogMark(t)
	startCaddy(t, itSite(up, itConfig{upstream: "timeout 1s"}))

	status, hdr, body := itPost(t, itChatBody(t, "a cat"))
	e := itWantErr(t, status, hdr, body, http.StatusGatewayTimeout, "upstream_timeout")
	if e.Type != "upstream_error" {
		t.Errorf("type %q", e.Type)
	}
	faultAwait(t, released, "the image service's connection to be released")
	if got := how.Load(); got != "released" {
		t.Errorf("the fake image service ended with %v, want its connection released by the gateway", got)
	}
	if n := len(up.Calls()); n != 1 {
		t.Errorf("%d calls to the image service, want 1 (a timeout is not retried)", n)
	}
	faultNoPanic(t, mark)
}
