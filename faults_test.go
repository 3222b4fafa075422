package zimage

// Faults through a real Caddy, beyond the ones
// integration_test.go covers (refused, hang, 5xx, 429, bad answers, a huge
// answer, a slow or broken LLM, a client that leaves): an image service that
// trickles its answer, an LLM that answers without end or redirects, clients
// that send their body slowly or leave in the middle of it, and 500
// concurrent requests against an image service that is by turns fast, slow
// and failing. Each fault ends in a well-formed answer within the
// configured timeouts, releases its connections and goroutines, and never
// panics.

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"
)

// faultWait bounds every wait of these tests; the timeouts under test are
// far shorter, so only a gateway that ignores them gets here.
const faultWait = 20 * time.Second

// faultLogMark is the number of log lines so far, for faultNoPanic; the
// log file exists once the first test has started Caddy.
func faultLogMark(t *testing.T) int {
	if _, err := os.Stat(logPath); err != nil {
		return 0
	}
	return len(readLog(t))
}

// faultNoPanic fails the test if a log line written since mark mentions a
// panic: net/http recovers a handler's panic and Caddy logs it as
// "http: panic serving …".
func faultNoPanic(t *testing.T, mark int) {
	t.Helper()
	for _, entry := range readLog(t)[mark:] {
		b, _ := json.Marshal(entry)
		if strings.Contains(strings.ToLower(string(b)), "panic") {
			t.Errorf("panic in Caddy's log: %.500s", b)
		}
	}
}

// faultSignal closes ch once.
func faultSignal(once *sync.Once, ch chan struct{}) { once.Do(func() { close(ch) }) }

// faultAwait waits for ch, failing the test after faultWait.
func faultAwait(t *testing.T, ch <-chan struct{}, what string) {
	t.Helper()
	select {
	case <-ch:
	case <-time.After(faultWait):
		t.Fatalf("timed out waiting for %s", what)
	}
}

// faultStop is closed when the test ends, so that fakes which would
// otherwise write forever stop by themselves (httptest's Close waits for
// every handler).
func faultStop(t *testing.T) <-chan struct{} {
	stop := make(chan struct{})
	t.Cleanup(func() { close(stop) })
	return stop
}

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

// TestFaultLLMHostileBody: an LLM that answers 50 MB (a valid answer whose
// prompt is enormous, so a gateway that read it all would "succeed"), or
// that sends its headers and never ends its body. Either way the
// enhancement degrades within its 500ms timeout, the image is generated
// from the user's prompt, and the gateway stops reading.
func TestFaultLLMHostileBody(t *testing.T) {
	const total = 50 << 20
	for _, tc := range []struct {
		name    string
		handler func(w http.ResponseWriter, r *http.Request, stop <-chan struct{}, written *atomic.Int64) string
	}{
		{"50 MB answer", func(w http.ResponseWriter, r *http.Request, stop <-chan struct{}, written *atomic.Int64) string {
			w.Header().Set("Content-Type", "application/json")
			n, _ := io.WriteString(w, `{"choices":[{"message":{"role":"assistant","content":"{\"prompt\":\"a stolen prompt `)
			written.Add(int64(n))
			chunk := []byte(strings.Repeat("a", 64<<10)) // streamed, never 50 MB at once
			for written.Load() < total {
				select {
				case <-stop:
					return "still writing when the test ended"
				default:
				}
				n, err := w.Write(chunk)
				written.Add(int64(n))
				if err != nil {
					return "released"
				}
			}
			_, _ = io.WriteString(w, `\"}"}}]}`)
			return "wrote it all"
		}},
		{"body never ends", func(w http.ResponseWriter, r *http.Request, stop <-chan struct{}, written *atomic.Int64) string {
			w.Header().Set("Content-Type", "application/json")
			w.WriteHeader(http.StatusOK)
			_, _ = io.WriteString(w, `{"choices":[{"message":{"role":"assistant","content":"{\"prompt\":\"a`)
			_ = http.NewResponseController(w).Flush()
			select {
			case <-r.Context().Done():
				return "released"
			case <-stop:
				return "still open when the test ended"
			}
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			up := newFakeUpstream(t)
			llm := newFakeLLM(t, "")
			stop := faultStop(t)
			var written atomic.Int64
			var once sync.Once
			done := make(chan struct{})
			var how atomic.Value
			llm.setHandler(func(w http.ResponseWriter, r *http.Request) {
				defer faultSignal(&once, done)
				how.Store(tc.handler(w, r, stop, &written))
			})
			mark := faultLogMark(t)
			startCaddy(t, itSite(up, itConfig{llm: llm, enhance: "timeout 500ms"}))

			const prompt = "a lighthouse in a storm"
			content := itOK(t, itChatBody(t, prompt))
			c := itOnlyCall(t, up, 0)
			if c.Body.Prompt != prompt {
				t.Errorf("upstream prompt %.80q, want the user's %q", c.Body.Prompt, prompt)
			}
			if want := itMarkdown(prompt, itImageURL(c.Body.Seed), itFailed(prompt), "1:1", 2048, 2048); content != want {
				t.Errorf("content\n%.300q\nwant\n%q", content, want)
			}
			if n := len(llm.Calls()); n != 1 {
				t.Errorf("%d LLM calls, want 1", n)
			}
			faultAwait(t, done, "the LLM's connection to be released")
			if got := how.Load(); got != "released" {
				t.Errorf("the fake LLM ended with %v (%d bytes written), want its connection released", got, written.Load())
			}
			faultNoPanic(t, mark)
		})
	}
}

// TestFaultLLMRedirect: an LLM base URL that redirects to another server.
// The gateway does not follow (the Authorization header carries the LLM
// key), so the other server never hears from it — although it would answer
// a fine enhancement — and the request degrades.
func TestFaultLLMRedirect(t *testing.T) {
	var mu sync.Mutex
	var seen []string // Authorization headers the other server received
	other := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		seen = append(seen, r.Header.Get("Authorization"))
		mu.Unlock()
		writeLLMAnswer(w, `{"prompt":"a prompt from the redirect target","aspect_ratio":"16:9"}`)
	}))
	t.Cleanup(other.Close)
	for _, status := range []int{http.StatusFound, http.StatusTemporaryRedirect} {
		t.Run(http.StatusText(status), func(t *testing.T) {
			up := newFakeUpstream(t)
			llm := newFakeLLM(t, "")
			llm.setHandler(func(w http.ResponseWriter, r *http.Request) {
				http.Redirect(w, r, other.URL+"/v1/chat/completions", status)
			})
			startCaddy(t, itSite(up, itConfig{llm: llm, enhance: "timeout 500ms"}))

			const prompt = "a lighthouse in a storm"
			content := itOK(t, itChatBody(t, prompt))
			c := itOnlyCall(t, up, 0)
			if want := itMarkdown(prompt, itImageURL(c.Body.Seed), itFailed(prompt), "1:1", 2048, 2048); content != want {
				t.Errorf("content\n%q\nwant\n%q", content, want)
			}
			if lc := llm.Calls(); len(lc) != 1 || lc[0].Auth != "Bearer "+testLLMKey {
				t.Errorf("LLM calls %+v, want one with the key", lc)
			}
		})
	}
	mu.Lock()
	defer mu.Unlock()
	for _, a := range seen {
		if strings.Contains(a, testLLMKey) {
			t.Errorf("the redirect target received the LLM key")
		}
	}
	if len(seen) != 0 {
		t.Errorf("the redirect target received %d requests, want none", len(seen))
	}
}

// TestFaultSlowClientBody: a client that sends its body a few bytes at a
// time, with pauses, is served as usual: the gateway reads the whole body,
// however it arrives.
func TestFaultSlowClientBody(t *testing.T) {
	up := newFakeUpstream(t)
	startCaddy(t, itSite(up, itConfig{}))
	for _, tc := range []struct {
		name, path, body string
	}{
		{"chat", "/v1/chat/completions", `{"model":"Z-Image","messages":[{"role":"user","content":"a slow cat on a slow roof"}]}`},
		{"images", "/v1/images/generations", `{"model":"Z-Image","prompt":"a slow cat on a slow roof","size":"512x512"}`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			before := len(up.Calls())
			pr, pw := io.Pipe()
			go func() {
				for i := 0; i < len(tc.body); i += 7 {
					// a client on a bad line: the pauses are the fault
					time.Sleep(15 * time.Millisecond)
					if _, err := io.WriteString(pw, tc.body[i:min(i+7, len(tc.body))]); err != nil {
						return
					}
				}
				pw.Close()
			}()
			req, err := http.NewRequest(http.MethodPost, baseURL+tc.path, pr)
			if err != nil {
				t.Fatal(err)
			}
			req.Header.Set("Authorization", "Bearer "+testClientKey)
			req.Header.Set("Content-Type", "application/json")
			resp, err := testClient(faultWait).Do(req)
			if err != nil {
				t.Fatal(err)
			}
			defer resp.Body.Close()
			body, err := io.ReadAll(resp.Body)
			if err != nil || resp.StatusCode != http.StatusOK {
				t.Fatalf("status %d, %v: %s", resp.StatusCode, err, body)
			}
			if tc.path == "/v1/chat/completions" {
				chatContent(t, body)
			} else {
				parseImages(t, body)
			}
			c := itOnlyCall(t, up, before)
			if c.Body.Prompt != "a slow cat on a slow roof" {
				t.Errorf("upstream prompt %q", c.Body.Prompt)
			}
		})
	}
}

// faultCounter reads one series of caddy_zimage_requests_total.
func faultCounter(t *testing.T, endpoint, model, code string) float64 {
	t.Helper()
	var m dto.Metric
	if err := metricRequests.WithLabelValues(endpoint, model, code).Write(&m); err != nil {
		t.Fatal(err)
	}
	return m.GetCounter().GetValue()
}

// TestFaultClientGoneMidBody: a client that declares 1000 bytes, sends 10
// and hangs up (or half-closes, and waits for the answer). The gateway
// answers 400 to whoever still listens, never calls the image service, and
// nothing panics.
func TestFaultClientGoneMidBody(t *testing.T) {
	up := newFakeUpstream(t)
	mark := faultLogMark(t)
	startCaddy(t, itSite(up, itConfig{}))
	for _, tc := range []struct {
		name      string
		halfClose bool
	}{
		{"closed", false},
		{"half-closed", true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			before := faultCounter(t, endpointChat, "", "400")
			conn, err := net.Dial("tcp", fmt.Sprintf("127.0.0.1:%d", httpPort))
			if err != nil {
				t.Fatal(err)
			}
			defer conn.Close()
			partial := `{"prompt":` // 10 of the 1000 bytes announced
			_, err = fmt.Fprintf(conn, "POST /v1/chat/completions HTTP/1.1\r\nHost: localhost:%d\r\nAuthorization: Bearer %s\r\n"+
				"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n%s", httpPort, testClientKey, partial)
			if err != nil {
				t.Fatal(err)
			}
			if tc.halfClose {
				if err := conn.(*net.TCPConn).CloseWrite(); err != nil {
					t.Fatal(err)
				}
				_ = conn.SetReadDeadline(time.Now().Add(faultWait))
				resp, err := http.ReadResponse(bufio.NewReader(conn), nil)
				if err != nil {
					t.Fatalf("no answer after half-closing: %v", err)
				}
				body, _ := io.ReadAll(resp.Body)
				resp.Body.Close()
				seen.Lock()
				seen.Write(body) // for the suite-wide secret scan
				seen.Unlock()
				itWantErr(t, resp.StatusCode, resp.Header, body, http.StatusBadRequest, "invalid_request")
			} else {
				conn.Close()
			}
			// the handler has finished once it has counted its answer
			deadline := time.Now().Add(faultWait)
			for faultCounter(t, endpointChat, "", "400") < before+1 {
				if time.Now().After(deadline) {
					t.Fatal("the gateway never finished the request whose client left")
				}
				time.Sleep(10 * time.Millisecond)
			}
		})
	}
	if n := len(up.Calls()); n != 0 {
		t.Errorf("the image service was called %d times for truncated bodies", n)
	}
	faultNoPanic(t, mark)
}

// faultCheckChat checks a non-streaming answer: a chat.completion with an
// image, or an OpenAI error envelope. It reports whether it was a success.
func faultCheckChat(resp *http.Response, body []byte) (bool, error) {
	if ct := resp.Header.Get("Content-Type"); ct != "application/json" {
		return false, fmt.Errorf("status %d with Content-Type %q", resp.StatusCode, ct)
	}
	if resp.StatusCode == http.StatusOK {
		var cc struct {
			Object  string `json:"object"`
			Choices []struct {
				FinishReason string `json:"finish_reason"`
				Message      struct {
					Role    string `json:"role"`
					Content string `json:"content"`
				} `json:"message"`
			} `json:"choices"`
		}
		if err := json.Unmarshal(body, &cc); err != nil || cc.Object != "chat.completion" || len(cc.Choices) != 1 ||
			cc.Choices[0].FinishReason != "stop" || cc.Choices[0].Message.Role != "assistant" ||
			!strings.HasPrefix(cc.Choices[0].Message.Content, "![a cat](https://img.example.com/") {
			return false, fmt.Errorf("malformed success: %.300s", body)
		}
		return true, nil
	}
	if err := faultCheckEnvelope(body); err != nil {
		return false, err
	}
	if resp.StatusCode != http.StatusBadGateway && resp.StatusCode != http.StatusTooManyRequests {
		return false, fmt.Errorf("status %d, want 502 or 429: %s", resp.StatusCode, body)
	}
	if resp.StatusCode == http.StatusTooManyRequests && resp.Header.Get("Retry-After") == "" {
		return false, errors.New("429 without Retry-After")
	}
	return false, nil
}

// faultCheckEnvelope checks an OpenAI error envelope.
func faultCheckEnvelope(b []byte) error {
	var eb errorBody
	if err := json.Unmarshal(b, &eb); err != nil || eb.Error.Message == "" || eb.Error.Type == "" || eb.Error.Code == "" {
		return fmt.Errorf("not an OpenAI error envelope: %.300s", b)
	}
	return nil
}

// faultCheckStream checks a streamed answer: the role chunk, then either
// content, finish and [DONE], or one error event; keep-alive comments
// anywhere; nothing after the end. It reports whether it was a success.
func faultCheckStream(resp *http.Response) (bool, error) {
	if resp.StatusCode != http.StatusOK || resp.Header.Get("Content-Type") != "text/event-stream" {
		return false, fmt.Errorf("stream answered %d %q", resp.StatusCode, resp.Header.Get("Content-Type"))
	}
	sr := newStreamReader(resp.Body)
	var data []string
	for {
		ev, err := sr.next()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return false, fmt.Errorf("after %d events: %v", len(data), err)
		}
		if ev.data == "" {
			if ev.comment != "keep-alive" {
				return false, fmt.Errorf("unexpected comment %q", ev.comment)
			}
			continue
		}
		data = append(data, ev.data)
	}
	type chunk struct {
		ID      string `json:"id"`
		Object  string `json:"object"`
		Choices []struct {
			Delta struct {
				Role    string  `json:"role"`
				Content *string `json:"content"`
			} `json:"delta"`
			FinishReason *string `json:"finish_reason"`
		} `json:"choices"`
	}
	parse := func(s string) (chunk, error) {
		var c chunk
		if err := json.Unmarshal([]byte(s), &c); err != nil || c.Object != "chat.completion.chunk" || len(c.Choices) != 1 {
			return c, fmt.Errorf("malformed chunk %.300s", s)
		}
		return c, nil
	}
	if len(data) == 0 {
		return false, errors.New("empty stream")
	}
	role, err := parse(data[0])
	if err != nil || role.Choices[0].Delta.Role != "assistant" {
		return false, fmt.Errorf("first event is not the role chunk: %.300s", data[0])
	}
	switch len(data) {
	case 2: // the failure after the stream began
		return false, faultCheckEnvelope([]byte(data[1]))
	case 4:
		content, err1 := parse(data[1])
		finish, err2 := parse(data[2])
		if err1 != nil || err2 != nil || content.ID != role.ID || finish.ID != role.ID ||
			content.Choices[0].Delta.Content == nil || !strings.HasPrefix(*content.Choices[0].Delta.Content, "![a cat](https://img.example.com/") ||
			finish.Choices[0].FinishReason == nil || *finish.Choices[0].FinishReason != "stop" || data[3] != "[DONE]" {
			return false, fmt.Errorf("malformed success stream: %q", data)
		}
		return true, nil
	}
	return false, fmt.Errorf("stream of %d events: %q", len(data), data)
}

// TestFaultConcurrentMixedUpstream: 500 concurrent chat requests, half of
// them streamed, while the image service answers by turns fast, slow,
// 500, 429 and malformed JSON. Every answer is well-formed, successes match
// exactly the generations the service let succeed, nothing hangs or
// panics, and once the connections are closed the goroutine count returns
// to where it was.
func TestFaultConcurrentMixedUpstream(t *testing.T) {
	const requests = 500
	up := newFakeUpstream(t)
	var turn, served atomic.Int64
	up.setHandler(func(w http.ResponseWriter, r *http.Request) {
		switch turn.Add(1) % 5 {
		case 0:
			served.Add(1)
			writeUpstreamOK(w, "https://img.example.com/fast.png")
		case 1:
			select {
			case <-time.After(200 * time.Millisecond):
			case <-r.Context().Done():
				return
			}
			served.Add(1)
			writeUpstreamOK(w, "https://img.example.com/slow.png")
		case 2:
			w.WriteHeader(http.StatusInternalServerError)
			_, _ = io.WriteString(w, `{"success":false,"error":"GPU on fire"}`)
		case 3:
			w.Header().Set("Retry-After", "3")
			w.WriteHeader(http.StatusTooManyRequests)
			_, _ = io.WriteString(w, `{"error":"slow down"}`)
		case 4:
			_, _ = io.WriteString(w, `{"success":true,"data":{"image_url":`)
		}
	})
	mark := faultLogMark(t)
	startCaddy(t, itSite(up, itConfig{gateway: "stream_keepalive 50ms"}))
	base := settledGoroutines()

	tr := &http.Transport{MaxConnsPerHost: requests + 50, MaxIdleConnsPerHost: requests + 50}
	client := &http.Client{Timeout: faultWait * 2, Transport: recordingTransport{base: tr}}
	var wg sync.WaitGroup
	var successes atomic.Int64
	errs := make([]error, requests)
	for i := range requests {
		wg.Add(1)
		go func() {
			defer wg.Done()
			stream := i%2 == 0
			body := fmt.Sprintf(`{"stream":%v,"messages":[{"role":"user","content":"a cat"}]}`, stream)
			req, err := http.NewRequestWithContext(context.Background(), http.MethodPost, baseURL+"/v1/chat/completions", strings.NewReader(body))
			if err != nil {
				errs[i] = err
				return
			}
			req.Header.Set("Authorization", "Bearer "+testClientKey)
			req.Header.Set("Content-Type", "application/json")
			resp, err := client.Do(req)
			if err != nil {
				errs[i] = err // a hang ends here, at the client's timeout
				return
			}
			defer resp.Body.Close()
			var ok bool
			if stream {
				ok, err = faultCheckStream(resp)
			} else {
				var b []byte
				if b, err = io.ReadAll(resp.Body); err == nil {
					ok, err = faultCheckChat(resp, b)
				}
			}
			if err != nil {
				errs[i] = fmt.Errorf("stream %v: %w", stream, err)
			}
			if ok {
				successes.Add(1)
			}
		}()
	}
	wg.Wait()
	failed := 0
	for i, err := range errs {
		if err != nil {
			if failed++; failed <= 5 {
				t.Errorf("request %d: %v", i, err)
			}
		}
	}
	if failed > 0 {
		t.Fatalf("%d of %d requests got no well-formed answer", failed, requests)
	}
	if n := len(up.Calls()); n != requests {
		t.Errorf("%d calls to the image service, want %d (none of these failures is retried)", n, requests)
	}
	if s, want := successes.Load(), served.Load(); s != want || s == 0 || s == requests {
		t.Errorf("%d successes, want %d: the generations the image service let succeed", s, want)
	}
	faultNoPanic(t, mark)

	// close what stays open by design (keep-alive connections on both
	// sides); every goroutine of the 500 requests must then end
	tr.CloseIdleConnections()
	up.CloseClientConnections()
	const tolerance = 10
	deadline := time.Now().Add(faultWait)
	for {
		n := runtime.NumGoroutine()
		if n <= base+tolerance {
			break
		}
		if time.Now().After(deadline) {
			buf := make([]byte, 256<<10)
			t.Fatalf("%d goroutines remain, baseline %d:\n%s", n, base, buf[:runtime.Stack(buf, true)])
		}
		time.Sleep(20 * time.Millisecond)
	}
}
