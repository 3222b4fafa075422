// Command fake is the stand-in for the two services the gateway talks to, for
// the load benchmark in bench/run.sh: the Mengyu image service
// (POST /api/v1/generate_image) and an OpenAI-compatible LLM
// (POST /v1/chat/completions, the enhance path of SPEC §4 step 3).
//
// It answers with fixed, precomputed bodies so that its own cost per request
// is as small and as constant as net/http allows: whatever it costs, it costs
// the same for the gateway and for Caddy's reverse_proxy, which both talk to
// the same process. The image call waits -delay before answering, which is
// how the burst and stream modes hold thousands of requests open at once.
//
// GET /stats reports how many calls it served and the peak number in flight,
// so the driver can check that a burst really reached the upstream at once.
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

// imageBody is the success answer of the image service (SPEC §4 step 6).
const imageBody = `{"success":true,"data":{"image_url":"https://img.example/x.png"}}`

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
	delay := flag.Duration("delay", 0, "how long the image call takes before answering")
	llmDelay := flag.Duration("llm-delay", 0, "how long the LLM call takes before answering")
	flag.Parse()

	llmBody, err := json.Marshal(map[string]any{
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

	var c counters
	mux := http.NewServeMux()
	mux.HandleFunc("POST /api/v1/generate_image", func(w http.ResponseWriter, r *http.Request) {
		c.image.Add(1)
		c.enter()
		defer c.leave()
		answer(w, r, *delay, []byte(imageBody))
	})
	mux.HandleFunc("POST /v1/chat/completions", func(w http.ResponseWriter, r *http.Request) {
		c.llm.Add(1)
		answer(w, r, *llmDelay, llmBody)
	})
	mux.HandleFunc("GET /stats", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		fmt.Fprintf(w, `{"image":%d,"llm":%d,"other":%d,"in_flight":%d,"max_in_flight":%d}`+"\n",
			c.image.Load(), c.llm.Load(), c.other.Load(), c.inFlight.Load(), c.maxInFlight.Load())
	})
	// POST /stats/reset zeroes the peak, so each burst measures its own
	mux.HandleFunc("POST /stats/reset", func(w http.ResponseWriter, r *http.Request) {
		c.image.Store(0)
		c.llm.Store(0)
		c.other.Store(0)
		c.maxInFlight.Store(c.inFlight.Load())
		w.WriteHeader(http.StatusNoContent)
	})
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		// anything else is a benchmark misconfiguration; count it so it shows
		c.other.Add(1)
		http.Error(w, `{"success":false,"error":"fake: no such endpoint"}`, http.StatusNotFound)
	})

	ln, err := net.Listen("tcp", *addr)
	if err != nil {
		log.Fatal(err)
	}
	srv := &http.Server{
		Handler:           mux,
		ReadHeaderTimeout: 30 * time.Second,
		// the burst and stream modes park thousands of idle keep-alive
		// connections here between phases; let them stay
		IdleTimeout: 5 * time.Minute,
		ErrorLog:    log.New(io.Discard, "", 0),
	}
	fmt.Fprintf(os.Stderr, "fake: listening on %s, image delay %s\n", ln.Addr(), *delay)
	log.Fatal(srv.Serve(ln))
}

// answer drains the request body (so the connection can be reused), waits
// delay unless the caller leaves first, and writes body as JSON.
func answer(w http.ResponseWriter, r *http.Request, delay time.Duration, body []byte) {
	if _, err := io.Copy(io.Discard, r.Body); err != nil {
		return
	}
	if delay > 0 {
		t := time.NewTimer(delay)
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
	w.WriteHeader(http.StatusOK)
	_, _ = w.Write(body)
}
