package zimage

// The pipeline: n generations with distinct seeds and the first failure
// winning; and through a real Caddy, a client that leaves cancels the
// work in progress, and 500 concurrent requests against an image service
// that is by turns fast, slow and failing each end in a well-formed answer,
// releasing their connections and goroutines.

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"runtime"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

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

// N>1 runs n generations with seed, seed+1, … when a seed is
// given (wrapping below 2^31-1), and distinct random seeds otherwise.
func TestUnitGenerateNSeeds(t *testing.T) {
	t.Parallel()
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
	t.Parallel()
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
