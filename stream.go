package zimage

import (
	"bufio"
	"encoding/base64"
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

// eventWith writes one event, named unless name is empty, whose data the
// callback writes: a large payload (an image's base64) is encoded straight
// into the stream, never held whole.
func (s *sseWriter) eventWith(name string, data func(w *bufio.Writer)) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.failed {
		return
	}
	bw := bufio.NewWriterSize(s.w, 32<<10)
	if name != "" {
		bw.WriteString("event: " + name + "\n")
	}
	bw.WriteString("data: ")
	data(bw)
	bw.WriteString("\n\n")
	if err := bw.Flush(); err != nil {
		s.failed = true
		return
	}
	if err := s.rc.Flush(); err != nil {
		s.failed = true
	}
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
	g.keep(ctx, r, []*job{j}, false) // keep-alives go on while the image is copied
	s.stop()
	s.event(chunk([]chatChoice{{Delta: &chatDelta{Content: ptr(g.markdown(j))}}}, nil))
	s.event(chunk([]chatChoice{{Delta: &chatDelta{}, FinishReason: ptr("stop")}}, nil))
	if includeUsage {
		s.event(chunk([]chatChoice{}, &usage{}))
	}
	s.done()
	metricRequests.WithLabelValues(endpointChat, j.model.name, "200").Inc()
}

// streamImages answers the Images API with "stream": true (SPEC §10.5), as
// OpenAI's image streaming does: keep-alives while the images are made,
// then one <kind>.completed event per image with its base64, and the
// stream ends; a failure is an error event with the OpenAI error object.
func (g *Gateway) streamImages(w http.ResponseWriter, r *http.Request, j *job, n int) {
	kind := "image_generation"
	if j.edit {
		kind = "image_edit"
	}
	s := startSSE(w, time.Duration(g.StreamKeepalive))
	defer s.stop()
	ctx := r.Context()
	jobs, e := g.generateN(ctx, j, n)
	var images [][]byte
	release := func() {}
	if e == nil {
		images, release, e = g.keep(ctx, r, jobs, true)
	}
	defer release()
	s.stop()
	if e != nil {
		b, _ := json.Marshal(struct {
			Type  string      `json:"type"`
			Error errorDetail `json:"error"`
		}{"error", e.body().Error})
		s.eventWith("error", func(w *bufio.Writer) { w.Write(b) })
		setOutcome(w, e.status)
		metricRequests.WithLabelValues(j.endpoint, j.model.name, strconv.Itoa(e.status)).Inc()
		return
	}
	created := strconv.FormatInt(time.Now().Unix(), 10)
	for i, img := range images {
		ext, _, _ := sniffImage(img)
		format := map[string]string{"jpg": "jpeg"}[ext]
		if format == "" {
			format = ext
		}
		width, height := imageSize(img, ext)
		if width == 0 {
			width, height = jobs[i].width, jobs[i].height
		}
		tail := `","created_at":` + created + `,"size":"` + strconv.Itoa(width) + "x" + strconv.Itoa(height) +
			`","output_format":"` + format + `","usage":{"input_tokens":0,"output_tokens":0,"total_tokens":0,` +
			`"input_tokens_details":{"image_tokens":0,"text_tokens":0}}}`
		s.eventWith(kind+".completed", func(w *bufio.Writer) {
			w.WriteString(`{"type":"` + kind + `.completed","b64_json":"`)
			enc := base64.NewEncoder(base64.StdEncoding, w)
			enc.Write(img)
			enc.Close()
			w.WriteString(tail)
		})
	}
	metricRequests.WithLabelValues(j.endpoint, j.model.name, "200").Inc()
}
