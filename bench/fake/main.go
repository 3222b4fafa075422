// Command fake is the stand-in for the two services the gateway talks to, for
// the load benchmark in bench/run.sh: the Mengyu image service
// (POST /api/v1/generate_image) and an OpenAI-compatible LLM
// (POST /v1/chat/completions, the enhance path).
//
// It answers with fixed, precomputed bodies so that its own cost per request
// is as small and as constant as net/http allows: whatever it costs, it costs
// the same for the gateway and for Caddy's reverse_proxy, which both talk to
// the same process. The image call waits -delay before answering, which is
// how the burst and stream modes hold thousands of requests open at once.
//
// GET /stats reports how many calls it served and the peak number in flight,
// so the driver can check that a burst really reached the upstream at once;
// POST /stats/reset starts the count again.
//
// -server raw (the default) answers with the minimal HTTP/1.1 server of
// raw.go, -server go with net/http. Why: on the benchmark's two cores the
// fake shares a core with the load generator, and a net/http server costs
// about half of what Caddy's whole reverse_proxy does per request. At the
// throughput the targets ask for, that core would saturate before Caddy's
// and cap the gateway's numbers; the fake must be cheaper than what it
// serves.
package main

import (
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"os"
	"strconv"
	"sync/atomic"
	"time"
)

// imageJSON is the success answer of the image service.
var imageJSON = []byte(`{"success":true,"data":{"image_url":"https://img.example/x.png"}}`)

// llmContent is what the fake LLM "suggests": a prompt and a ratio, as the
// enhancement system prompt asks for.
const llmContent = `{"prompt":"a cat, detailed","aspect_ratio":"16:9"}`

var jsonType = []string{"application/json"}

// counters are the numbers GET /stats reports.
type counters struct {
	image, llm, other     atomic.Int64
	inFlight, maxInFlight atomic.Int64
}

func (c *counters) enter() {
	n := c.inFlight.Add(1)
	for {
		m := c.maxInFlight.Load()
		if n <= m || c.maxInFlight.CompareAndSwap(m, n) {
			return
		}
	}
}

func (c *counters) leave() { c.inFlight.Add(-1) }

func main() {
	addr := flag.String("addr", "127.0.0.1:18400", "listen address (loopback)")
	server := flag.String("server", "raw", "HTTP server: raw (minimal HTTP/1.1, cheap) or go (net/http)")
	f := &fake{}
	flag.DurationVar(&f.delay, "delay", 0, "how long the image call takes before answering")
	flag.DurationVar(&f.llmDelay, "llm-delay", 0, "how long the LLM call takes before answering")
	flag.Parse()

	var err error
	f.llmBody, err = json.Marshal(map[string]any{
		"id":      "chatcmpl-fake",
		"object":  "chat.completion",
		"created": 1700000000,
		"model":   "gpt-4o-mini",
		"choices": []map[string]any{{
			"index":         0,
			"finish_reason": "stop",
			"message":       map[string]any{"role": "assistant", "content": llmContent},
		}},
		"usage": map[string]int{"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
	})
	if err != nil {
		log.Fatal(err)
	}

	ln, err := net.Listen("tcp", *addr)
	if err != nil {
		log.Fatal(err)
	}
	fmt.Fprintf(os.Stderr, "fake: %s server on %s, image delay %s\n", *server, ln.Addr(), f.delay)
	switch *server {
	case "raw":
		log.Fatal(serveRaw(ln, f))
	case "go":
		srv := &http.Server{
			Handler:           f,
			ReadHeaderTimeout: 30 * time.Second,
			// the burst and stream modes park thousands of idle keep-alive
			// connections here between phases; let them stay
			IdleTimeout: 5 * time.Minute,
			ErrorLog:    log.New(io.Discard, "", 0),
		}
		log.Fatal(srv.Serve(ln))
	default:
		log.Fatalf("-server must be raw or go")
	}
}

// fake holds the answers and the counters; both servers route through call.
type fake struct {
	delay, llmDelay time.Duration
	llmBody         []byte
	c               counters
}

// call decides the answer to one request: its status and body, how long to
// wait before sending it, and what to run once it is sent (may be nil).
func (f *fake) call(method, path string) (status int, body []byte, wait time.Duration, done func()) {
	switch {
	case method == http.MethodPost && path == "/api/v1/generate_image":
		f.c.image.Add(1)
		f.c.enter()
		return http.StatusOK, imageJSON, f.delay, f.c.leave
	case method == http.MethodPost && path == "/v1/chat/completions":
		f.c.llm.Add(1)
		return http.StatusOK, f.llmBody, f.llmDelay, nil
	case method == http.MethodGet && path == "/stats":
		return http.StatusOK, fmt.Appendf(nil, `{"image":%d,"llm":%d,"other":%d,"in_flight":%d,"max_in_flight":%d}`+"\n",
			f.c.image.Load(), f.c.llm.Load(), f.c.other.Load(), f.c.inFlight.Load(), f.c.maxInFlight.Load()), 0, nil
	case method == http.MethodPost && path == "/stats/reset":
		// zero the counts and the peak, so each burst measures its own
		f.c.image.Store(0)
		f.c.llm.Store(0)
		f.c.other.Store(0)
		f.c.maxInFlight.Store(f.c.inFlight.Load())
		return http.StatusNoContent, nil, 0, nil
	default:
		// anything else is a benchmark misconfiguration; count it so it shows
		f.c.other.Add(1)
		return http.StatusNotFound, []byte(`{"success":false,"error":"fake: no such endpoint"}`), 0, nil
	}
}

// ServeHTTP is the net/http server (-server go).
func (f *fake) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	// drain the body so the connection can be reused
	if _, err := io.Copy(io.Discard, r.Body); err != nil {
		return
	}
	status, body, wait, done := f.call(r.Method, r.URL.Path)
	if done != nil {
		defer done()
	}
	if wait > 0 {
		t := time.NewTimer(wait)
		select {
		case <-t.C:
		case <-r.Context().Done():
			t.Stop()
			return
		}
	}
	// shared header slices: no per-request allocation for them
	h := w.Header()
	h["Content-Type"] = jsonType
	h["Content-Length"] = []string{strconv.Itoa(len(body))}
	w.WriteHeader(status)
	_, _ = w.Write(body)
}
