package zimage

import (
	"encoding/json"
	"net/http"
	"strconv"
	"sync"
	"time"
)

// sseWriter writes server-sent events and keeps the connection alive while
// the job runs. The keep-alive is a timer, not a goroutine per stream, so
// ten thousand waiting streams cost ten thousand timers; a mutex keeps its
// comments from interleaving with events.
type sseWriter struct {
	w        http.ResponseWriter
	rc       *http.ResponseController
	mu       sync.Mutex
	interval time.Duration
	timer    *time.Timer
	stopped  bool
	failed   bool // a write failed: the client is gone
}

var keepAliveComment = []byte(": keep-alive\n\n")

// startSSE sends the headers, then keeps the stream alive every interval
// until stop is called.
func startSSE(w http.ResponseWriter, interval time.Duration) *sseWriter {
	h := w.Header()
	h.Set("Content-Type", "text/event-stream")
	h.Set("Cache-Control", "no-cache")
	// nginx and some CDNs buffer responses unless told not to
	h.Set("X-Accel-Buffering", "no")
	w.WriteHeader(http.StatusOK)
	s := &sseWriter{w: w, rc: http.NewResponseController(w), interval: interval}
	// under the lock: a short interval can fire before the assignment, and
	// keepAlive reads s.timer
	s.mu.Lock()
	s.timer = time.AfterFunc(interval, s.keepAlive)
	s.mu.Unlock()
	return s
}

func (s *sseWriter) keepAlive() {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.stopped || s.failed {
		return
	}
	s.writeLocked(keepAliveComment)
	if !s.failed { // a client that is gone gets no more keep-alives
		s.timer.Reset(s.interval)
	}
}

// writeLocked writes and flushes at once, so that each event reaches the
// client when written, through Caddy's encode and any buffering proxy.
func (s *sseWriter) writeLocked(b []byte) {
	if s.failed {
		return
	}
	if _, err := s.w.Write(b); err != nil {
		s.failed = true
		return
	}
	if err := s.rc.Flush(); err != nil {
		s.failed = true
	}
}

// event writes one "data: <json>" event.
func (s *sseWriter) event(v any) {
	b, err := json.Marshal(v)
	if err != nil {
		return
	}
	buf := make([]byte, 0, len(b)+8)
	buf = append(buf, "data: "...)
	buf = append(buf, b...)
	buf = append(buf, '\n', '\n')
	s.mu.Lock()
	s.writeLocked(buf)
	s.mu.Unlock()
}

// done writes the terminating [DONE] event.
func (s *sseWriter) done() {
	s.mu.Lock()
	s.writeLocked([]byte("data: [DONE]\n\n"))
	s.mu.Unlock()
}

// stop ends the keep-alives; it must be called before the handler returns.
func (s *sseWriter) stop() {
	s.mu.Lock()
	s.stopped = true
	s.timer.Stop()
	s.mu.Unlock()
}

// streamChat answers a chat completion as chat.completion.chunk events
// (SPEC §4 "Streaming"): the role chunk at once, keep-alives while the job
// runs, then the content, the finish chunk, the optional usage chunk and
// [DONE]. A failure after the stream began is an error event.
func (g *Gateway) streamChat(w http.ResponseWriter, r *http.Request, j *job, id string, includeUsage bool) {
	created := time.Now().Unix()
	chunk := func(choices []chatChoice, u *usage) chatCompletion {
		return chatCompletion{ID: id, Object: "chat.completion.chunk", Created: created, Model: j.requested, Choices: choices, Usage: u}
	}
	s := startSSE(w, time.Duration(g.StreamKeepalive))
	defer s.stop()
	s.event(chunk([]chatChoice{{Delta: &chatDelta{Role: "assistant", Content: ptr("")}}}, nil))

	ctx := r.Context()
	g.runEnhance(ctx, j)
	if e := g.generate(ctx, j); e != nil {
		s.stop()
		s.event(e.body())
		metricRequests.WithLabelValues(endpointChat, j.model.name, strconv.Itoa(e.status)).Inc()
		setOutcome(w, e.status)

		return
	}
	s.stop()
	s.event(chunk([]chatChoice{{Delta: &chatDelta{Content: ptr(g.markdown(j))}}}, nil))
	s.event(chunk([]chatChoice{{Delta: &chatDelta{}, FinishReason: ptr("stop")}}, nil))
	if includeUsage {
		s.event(chunk([]chatChoice{}, &usage{}))
	}
	s.done()
	metricRequests.WithLabelValues(endpointChat, j.model.name, "200").Inc()
}
