package zimage

// The rate meter of request bodies (min_upload_rate): a body that arrives
// slower than the rate is cut, so that a client cannot hold a share of the
// upload budget, or a connection, by sending a byte now and then.

import (
	"errors"
	"io"
	"net/http"
	"sync"
	"time"
)

// defaultMinUploadRate is min_upload_rate's default, in bytes a second.
const defaultMinUploadRate = 64 << 10

// uploadRateWindow is the window over which min_upload_rate is judged;
// the first window is free, so the earliest cut comes after two. A
// variable so that tests can judge in milliseconds.
var uploadRateWindow = 10 * time.Second

// errUploadTooSlow is what a body cut for its rate reads.
var errUploadTooSlow = errors.New("the request body arrives slower than min_upload_rate")

func tooSlow() *apiError {
	return &apiError{status: http.StatusRequestTimeout, typ: "invalid_request_error", code: "request_timeout",
		message: "The request body arrived too slowly: send uploads faster than min_upload_rate"}
}

// slowBody is a request body that is cut when it arrives below
// min_upload_rate: a body that sends less than rate × window in a window
// (the first window is free) reads errUploadTooSlow from then on. A
// client that sends nothing at all is cut too: a timer checks each
// window as it ends and makes the pending read fail through the
// connection's read deadline. Its methods accept nil (no rate is judged).
type slowBody struct {
	io.ReadCloser
	rc     *http.ResponseController
	quota  int64 // bytes a window
	window time.Duration

	mu        sync.Mutex
	from, end time.Time // the window being judged; bytes before from are free
	n         int64     // bytes in it so far
	timer     *time.Timer
	paused    bool
	cut, done bool
}

// meterBody makes r's body a slowBody, unless min_upload_rate is off.
func (g *Gateway) meterBody(w http.ResponseWriter, r *http.Request) *slowBody {
	if g.MinUploadRate <= 0 {
		return nil
	}
	win := uploadRateWindow
	now := time.Now()
	b := &slowBody{ReadCloser: r.Body, rc: http.NewResponseController(w), window: win,
		quota: int64(float64(g.MinUploadRate) * win.Seconds()), from: now.Add(win), end: now.Add(2 * win)}
	// the timer may fire before AfterFunc returns (a tiny window): check
	// reads b.timer under b.mu, so it is set under b.mu too
	b.mu.Lock()
	b.timer = time.AfterFunc(2*win, b.check)
	b.mu.Unlock()
	r.Body = b
	return b
}

func (b *slowBody) Read(p []byte) (int, error) {
	n, err := b.ReadCloser.Read(p)
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.cut {
		return n, errUploadTooSlow
	}
	if b.done {
		return n, err
	}
	now := time.Now()
	if !b.rollLocked(now) {
		b.cutLocked()
		return n, errUploadTooSlow
	}
	if !now.Before(b.from) {
		b.n += int64(n)
	}
	if err != nil {
		b.finishLocked()
	}
	return n, err
}

// rollLocked judges the windows that ended by now; false: one fell short.
func (b *slowBody) rollLocked(now time.Time) bool {
	for !now.Before(b.end) {
		if b.n < b.quota {
			return false
		}
		b.from, b.end, b.n = b.end, b.end.Add(b.window), 0
	}
	return true
}

// check runs as a window ends, whether or not a read is pending.
func (b *slowBody) check() {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.done || b.paused || b.cut {
		return
	}
	now := time.Now()
	if !b.rollLocked(now) {
		b.cutLocked()
		return
	}
	b.timer.Reset(b.end.Sub(now))
}

// cutLocked cuts the body: a read waiting for the client fails now.
func (b *slowBody) cutLocked() {
	b.cut = true
	b.finishLocked()
	_ = b.rc.SetReadDeadline(time.Now())
}

func (b *slowBody) finishLocked() {
	b.done = true
	b.timer.Stop()
}

// finish ends the judging once the handler has read what it needs; the
// connection keeps no deadline of ours (net/http reads it in the
// background while the request runs, and a deadline there would cancel
// the request).
func (b *slowBody) finish() {
	if b == nil {
		return
	}
	b.mu.Lock()
	b.finishLocked()
	b.mu.Unlock()
}

// pause stops the judging while the gateway, not the client, holds the
// body back (waiting for the budget); resume starts a new window then.
func (b *slowBody) pause() {
	if b == nil {
		return
	}
	b.mu.Lock()
	b.paused = true
	b.timer.Stop()
	b.mu.Unlock()
}

func (b *slowBody) resume() {
	if b == nil {
		return
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	b.paused = false
	if b.done {
		return
	}
	now := time.Now()
	if now.After(b.from) {
		b.from, b.end, b.n = now, now.Add(b.window), 0
	}
	b.timer.Reset(b.end.Sub(now))
}
