package zimage

// Upload memory: how the bodies that carry an image to edit are read. An
// edit's multipart body and a chat body with a data: URL are the only
// requests larger than max_body, and each may be tens of MiB; read as they
// arrive, thirty of them held 1.5–2.5 GB.
//
// So an upload is admitted before its body is read: first the client's
// own max_concurrent (a client at its limit is refused without a byte of
// its body read), then a share of the upload budget. The budget is one
// for the whole process (every site, every handler, across reloads: two
// sites each taking their full share would double the memory), as large
// as the largest max_upload_memory among the loaded handlers; a handler's
// own max_upload_memory caps what its requests hold at once. An upload
// that finds the budget spent waits up to the upstream's queue_timeout,
// then 429.
//
// An upload is charged for what it holds, not for what it announces: a
// multipart edit is admitted with a probe (its first 64 KiB), and only
// once those have arrived does it reserve the rest of its Content-Length
// (else max_upload) and get a buffer that large; a chat body's first
// max_body bytes are its probe, read before it is known to be an upload.
// A client that announces 20 MB and sends a byte a second thus holds 64
// KiB. The reservation is taken whole rather than grown as bytes arrive:
// uploads that each hold part of what they need and wait for the rest
// would deadlock the budget, whereas a reserved upload always finishes.
// Bodies must also keep up min_upload_rate (slowBody): a client that
// stalls after its probe holds its reservation for at most two windows.
// The budget is held while the body is read, decoded and stored; the job
// then waits for its upstream slot holding only the stored name.
//
// A budget rather than spooling to disk: the store takes an image as one
// []byte (certmagic.Storage.Store), so an upload is in memory whole at
// least once whatever else is done; spooling would add a disk write and
// read without lowering that peak. What the budget can do is make that
// one copy the only one: the image part is read into a buffer of its
// announced size, and a chat body's data: URLs are base64-decoded in place
// inside the body's own buffer (extractDataURLs) before the JSON is
// parsed, so the JSON decoder never copies them.
//
// This file holds the budget, the admission of an upload and the reading
// of a multipart one; the chat body's reading is in uploads_chat.go, the
// rate meter in uploads_rate.go.

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// defaultUploadMemoryUploads is max_upload_memory's default in uploads
// of max_upload: two at once (40 MiB with the default max_upload). The Go
// heap grows to about twice what is live before it collects, so the
// budget costs up to about twice itself in RSS: two uploads keep 30
// simultaneous ones under 150 MB (bench/uploadmem), and reading an upload
// takes a fraction of a second on a LAN, against the seconds of the
// generation it waits for afterwards.
const defaultUploadMemoryUploads = 2

// uploadProbe is what a multipart upload holds before it has shown that
// it sends: a client must send this much before it reserves its size.
const uploadProbe = 64 << 10

// The lingering close of a refused upload: a 413 answered while the
// client is still sending, followed by a close, makes the kernel reset
// the connection, and a client that reads its answer only after sending
// (most do) sees "connection reset" instead of the 413. So the rest of the
// body is read and discarded first, up to these bounds.
const (
	lingerBytes = 64 << 20
	lingerTime  = 10 * time.Second
)

var metricUploadMemory = prometheus.NewGauge(prometheus.GaugeOpts{
	Namespace: "caddy", Subsystem: "zimage", Name: "upload_memory_bytes",
	Help: "Bytes of the upload budget held by uploads being read, decoded and stored.",
})

func init() {
	// the upload budget's metric, registered with the others (metrics.go)
	collectors = append(collectors, metricUploadMemory)
}

// uploadMemory is the process's one upload budget.
var uploadMemory memBudget

// memBudget is the upload budget of the process: the pools of the loaded
// handlers, what they hold, and the requests waiting for a share.
type memBudget struct {
	mu    sync.Mutex
	held  int64
	pools []*uploadPool // the live handlers'; the budget is the largest
	last  int64         // the size once every pool is gone (requests may still hold shares)
	queue []*memWaiter  // first come, first served
}

// uploadPool is one handler's part of the budget: its max_upload_memory
// caps what its requests hold at once.
type uploadPool struct {
	size int64
	held int64         // under uploadMemory.mu
	wait time.Duration // the upstream's queue_timeout
}

type memWaiter struct {
	p    *uploadPool
	n    int64
	grow bool // a reservation of an admitted upload, not an admission
	ch   chan struct{}
	done bool
}

func (b *memBudget) sizeLocked() int64 {
	if len(b.pools) == 0 {
		return b.last
	}
	var n int64
	for _, p := range b.pools {
		n = max(n, p.size)
	}
	return n
}

func (b *memBudget) fitsLocked(p *uploadPool, n int64) bool {
	return b.held+n <= b.sizeLocked() && p.held+n <= p.size
}

// register adds a handler's pool: the budget grows to its size if larger.
func (b *memBudget) register(p *uploadPool) {
	b.mu.Lock()
	b.pools = append(b.pools, p)
	b.wakeLocked()
	b.mu.Unlock()
}

// unregister removes a pool whose handler is cleaned up; its requests
// still in flight give their shares back as before.
func (b *memBudget) unregister(p *uploadPool) {
	b.mu.Lock()
	if len(b.pools) == 1 && b.pools[0] == p {
		b.last = p.size
	}
	b.pools = slices.DeleteFunc(b.pools, func(q *uploadPool) bool { return q == p })
	b.wakeLocked()
	b.mu.Unlock()
}

// wakeLocked serves the queue in order. Admissions do not overtake one
// another (a large upload is not starved by small ones), but a waiting
// reservation is served past an admission that does not fit: it belongs
// to an upload already holding its probe, which frees all once read.
func (b *memBudget) wakeLocked() {
	kept := b.queue[:0]
	blocked := false
	for _, w := range b.queue {
		if (w.grow || !blocked) && b.fitsLocked(w.p, w.n) {
			b.takeLocked(w.p, w.n)
			w.done = true
			close(w.ch)
			continue
		}
		blocked = blocked || !w.grow
		kept = append(kept, w)
	}
	clear(b.queue[len(kept):])
	b.queue = kept
}

func (b *memBudget) takeLocked(p *uploadPool, n int64) {
	b.held += n
	p.held += n
	metricUploadMemory.Add(float64(n))
}

// take takes n bytes for a request of p, waiting up to p.wait.
func (b *memBudget) take(ctx context.Context, p *uploadPool, n int64, grow bool) *apiError {
	b.mu.Lock()
	if b.fitsLocked(p, n) && (grow || !slices.ContainsFunc(b.queue, func(w *memWaiter) bool { return !w.grow })) {
		b.takeLocked(p, n)
		b.mu.Unlock()
		return nil
	}
	w := &memWaiter{p: p, n: n, grow: grow, ch: make(chan struct{})}
	b.queue = append(b.queue, w)
	b.mu.Unlock()

	t := time.NewTimer(p.wait)
	defer t.Stop()
	var e *apiError
	select {
	case <-w.ch:
		return nil
	case <-ctx.Done():
		e = &apiError{status: 499, typ: "invalid_request_error", code: "client_closed_request", message: "The client closed the request"}
	case <-t.C:
		e = errQueueFull(retryAfterSeconds(p.wait))
		e.message = "The gateway is reading as many uploads as max_upload_memory allows; retry later"
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	if w.done {
		// served as the wait ended: the share is the caller's
		return nil
	}
	b.queue = slices.DeleteFunc(b.queue, func(q *memWaiter) bool { return q == w })
	b.wakeLocked() // an admission behind it may fit now
	return e
}

func (b *memBudget) give(p *uploadPool, n int64) {
	b.mu.Lock()
	b.held -= n
	p.held -= n
	metricUploadMemory.Sub(float64(n))
	b.wakeLocked()
	b.mu.Unlock()
}

// provisionUploads checks max_upload_memory and min_upload_rate, fills
// their defaults and adds the handler's pool to the process's budget;
// after the upstream, whose queue_timeout it waits.
func (g *Gateway) provisionUploads() error {
	if g.MaxUploadMemory < 0 {
		return fmt.Errorf("zimage_gateway: max_upload_memory must be positive, got %d", g.MaxUploadMemory)
	}
	if g.MaxUploadMemory == 0 {
		g.MaxUploadMemory = defaultUploadMemoryUploads * g.MaxUpload
	}
	if g.MaxUploadMemory < g.MaxUpload {
		return fmt.Errorf("zimage_gateway: max_upload_memory (%s) is smaller than max_upload (%s), so one upload could never be read: raise max_upload_memory or lower max_upload",
			formatBytes(g.MaxUploadMemory), formatBytes(g.MaxUpload))
	}
	switch {
	case g.MinUploadRate == 0:
		g.MinUploadRate = defaultMinUploadRate
	case g.MinUploadRate < -1:
		return fmt.Errorf("zimage_gateway: min_upload_rate must be positive bytes a second (or -1: off), got %d", g.MinUploadRate)
	}
	wait := defaultUpstreamTimeout
	if g.accounts != nil && g.accounts.queueTimeout > 0 {
		wait = g.accounts.queueTimeout
	}
	g.uploads = &uploadPool{size: g.MaxUploadMemory, wait: wait}
	uploadMemory.register(g.uploads)
	return nil
}

// cleanupUploads takes the handler's pool out of the budget.
func (g *Gateway) cleanupUploads() {
	if g.uploads != nil {
		uploadMemory.unregister(g.uploads)
		g.uploads = nil
	}
}

// upload is one request's share of the budget. Its methods accept nil: a
// body within max_body holds none.
type upload struct {
	p    *uploadPool
	n    int64
	body *slowBody // paused while the upload waits for its reservation
}

// release gives the share back; a second call does nothing.
func (u *upload) release() {
	if u == nil || u.n == 0 {
		return
	}
	uploadMemory.give(u.p, u.n)
	u.n = 0
}

// reserve raises the share to size bytes (at most the handler's whole
// pool: a request larger than it reads alone), waiting up to
// queue_timeout; the client's rate is not judged meanwhile.
func (u *upload) reserve(r *http.Request, size int64) *apiError {
	if u == nil {
		return nil
	}
	n := min(size, u.p.size) - u.n
	if n <= 0 {
		return nil
	}
	u.body.pause()
	defer u.body.resume()
	if e := uploadMemory.take(r.Context(), u.p, n, true); e != nil {
		return e
	}
	u.n += n
	return nil
}

// admitUpload admits a request whose body is an upload of at most limit
// bytes, before the body is read: a body announced larger is a 413 at
// once, a client at its max_concurrent a 429 at once (one slot is taken
// now, so that a client at its limit takes no share of the budget; the
// pipeline's admit step takes the rest of its n), then charge bytes of
// the budget (at least one, at most the handler's pool), waiting up to
// queue_timeout.
func (g *Gateway) admitUpload(r *http.Request, adm *admission, limit, charge int64, body *slowBody, tooLarge *apiError) (*upload, *apiError) {
	if r.ContentLength > limit {
		return nil, tooLarge
	}
	if e := adm.admit(r.Context(), 1); e != nil {
		return nil, e
	}
	u := &upload{p: g.uploads, body: body}
	n := max(1, min(charge, u.p.size))
	body.pause()
	defer body.resume()
	if e := uploadMemory.take(r.Context(), u.p, n, false); e != nil {
		return nil, e
	}
	u.n = n
	return u, nil
}

// uploadSize is how large an upload's buffer must be: its Content-Length
// and one byte to see that it ends, else limit and one.
func uploadSize(r *http.Request, limit int64) int64 {
	if r.ContentLength >= 0 {
		return min(limit+1, r.ContentLength+1)
	}
	return limit + 1
}

// readUpload reads an uploaded file within limit bytes: its first
// uploadProbe bytes into a small buffer, then, once the share is reserved
// for the size the request announced, into one buffer of that size (a
// buffer grown as the bytes arrive leaves up to four times the image
// behind as garbage).
func readUpload(r *http.Request, up *upload, part io.Reader, limit int64) ([]byte, *apiError) {
	size := uploadSize(r, limit)
	buf := make([]byte, 0, min(size, uploadProbe))
	for {
		if len(buf) == cap(buf) && int64(cap(buf)) < size {
			if e := up.reserve(r, size-1); e != nil {
				return nil, e
			}
			buf = append(make([]byte, 0, size), buf...)
		}
		if len(buf) == cap(buf) {
			if int64(len(buf)) > limit {
				return nil, errUploadTooLarge(limit)
			}
			// a body shorter than announced cannot get here; one byte
			// more tells whether the part goes on
			var one [1]byte
			n, err := part.Read(one[:])
			if n == 0 && err == io.EOF {
				return buf, nil
			}
			if n > 0 {
				return nil, errUploadTooLarge(limit)
			}
			if err != nil {
				return nil, readUploadError(err, limit)
			}
			continue
		}
		n, err := part.Read(buf[len(buf):cap(buf)])
		buf = buf[:len(buf)+n]
		if err == io.EOF {
			if int64(len(buf)) > limit {
				return nil, errUploadTooLarge(limit)
			}
			return buf, nil
		}
		if err != nil {
			return nil, readUploadError(err, limit)
		}
	}
}

func readUploadError(err error, limit int64) *apiError {
	var mbe *http.MaxBytesError
	if errors.As(err, &mbe) {
		return errUploadTooLarge(limit)
	}
	if errors.Is(err, errUploadTooSlow) {
		return tooSlow()
	}
	return invalidRequest("image", "The image could not be read: "+truncate(err.Error(), 100))
}

// failBody answers an error met while reading an upload. A body cut for
// its rate or refused as too large is left unread, so the connection is
// closed after the answer; before that, the rest of a too-large body is
// read and discarded (a lingering close, bounded by lingerBytes and
// lingerTime), so that a client still sending reads its 413 instead of a
// reset.
func (g *Gateway) failBody(w http.ResponseWriter, r *http.Request, endpoint string, e *apiError) {
	if e.status != http.StatusRequestEntityTooLarge && e.status != http.StatusRequestTimeout {
		g.failRequest(w, endpoint, "", e)
		return
	}
	w.Header().Set("Connection", "close")
	// a client that waits for 100 Continue has sent nothing: reading
	// would invite the body. HTTP/2 resets the stream, not the connection.
	linger := e.status == http.StatusRequestEntityTooLarge && r.ProtoMajor == 1 &&
		!strings.EqualFold(r.Header.Get("Expect"), "100-continue") && r.ContentLength <= lingerBytes
	rc := http.NewResponseController(w)
	if linger {
		// else net/http closes as soon as the answer is written
		linger = rc.EnableFullDuplex() == nil
	}
	g.failRequest(w, endpoint, "", e)
	if !linger {
		return
	}
	_ = rc.Flush()
	if b, ok := r.Body.(*slowBody); ok {
		b.finish()
	}
	_ = rc.SetReadDeadline(time.Now().Add(lingerTime))
	_, _ = io.CopyN(io.Discard, r.Body, lingerBytes)
}
