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
	var buf []byte
	if c, ok := v.(chatCompletion); ok {
		// the chunks, without reflection (chat.go)
		buf = c.appendJSON(append(make([]byte, 0, 256+len(c.firstContent())), "data: "...))
	} else {
		b, err := json.Marshal(v)
		if err != nil {
			return
		}
		buf = append(append(make([]byte, 0, len(b)+8), "data: "...), b...)
	}
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

// The chat stream (docs/design.md#the-prompt): the role chunk at once,
// keep-alives while the job runs, then the content, the finish chunk, the
// optional usage chunk and [DONE]. A failure after the stream began is an
// error event.

func (c *chatRenderer) chunk(choices []chatChoice, u *usage) chatCompletion {
	return chatCompletion{ID: c.id, Object: "chat.completion.chunk", Created: c.created, Model: c.requested, Choices: choices, Usage: u}
}

func (c *chatRenderer) beginStream(w http.ResponseWriter) {
	c.sse = startSSE(w, time.Duration(c.g.StreamKeepalive))
	c.sse.event(c.chunk([]chatChoice{{Delta: &chatDelta{Role: "assistant", Content: ptr("")}}}, nil))
}

func (c *chatRenderer) failStream(w http.ResponseWriter, e *apiError) {
	c.sse.stop()
	c.sse.event(e.body())
	setOutcome(w, e.status)
}

func (c *chatRenderer) writeStream(content string) {
	s := c.sse
	s.stop()
	s.event(c.chunk([]chatChoice{{Delta: &chatDelta{Content: ptr(content)}}}, nil))
	s.event(c.chunk([]chatChoice{{Delta: &chatDelta{}, FinishReason: ptr("stop")}}, nil))
	if c.includeUsage {
		s.event(c.chunk([]chatChoice{}, &usage{}))
	}
	s.done()
}

// imagesStream answers the Images API with "stream": true (docs/design.md#answers),
// as OpenAI's image streaming does: keep-alives while the images are made,
// then one <kind>.completed event per image with its base64 and every
// field openai-go's completed-event types require, and the stream ends; a
// failure is an error event with the OpenAI error object. The service has
// no partial images: partial_images is accepted and none are sent.
type imagesStream struct {
	interval time.Duration
	look     imageLook
	kind     string // image_generation or image_edit
	sse      *sseWriter
}

func (s *imagesStream) needBytes() bool { return true }

func (s *imagesStream) begin(w http.ResponseWriter, j *job) {
	s.kind = "image_generation"
	if j.edit {
		s.kind = "image_edit"
	}
	s.sse = startSSE(w, s.interval)
}

func (s *imagesStream) writeFailure(w http.ResponseWriter, j *job, e *apiError) {
	s.sse.stop()
	b, _ := json.Marshal(struct {
		Type  string      `json:"type"`
		Error errorDetail `json:"error"`
	}{"error", e.body().Error})
	s.sse.eventWith("error", func(w *bufio.Writer) { w.Write(b) })
	setOutcome(w, e.status)
}

func (s *imagesStream) write(w http.ResponseWriter, res *output) {
	s.sse.stop()
	created := strconv.FormatInt(time.Now().Unix(), 10)
	for i, img := range res.images {
		j := res.jobs[i]
		tail := `","created_at":` + created + `,"size":"` + heldSize(j) +
			`","output_format":"` + heldFormat(j, img) + `","quality":"` + s.look.quality + `","background":"` + s.look.background + `"` +
			`,"usage":{"input_tokens":0,"output_tokens":0,"total_tokens":0,` +
			`"input_tokens_details":{"image_tokens":0,"text_tokens":0}}}`
		s.sse.eventWith(s.kind+".completed", func(w *bufio.Writer) {
			w.WriteString(`{"type":"` + s.kind + `.completed","b64_json":"`)
			enc := base64.NewEncoder(base64.StdEncoding, w)
			enc.Write(img)
			enc.Close()
			w.WriteString(tail)
		})
	}
}
