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

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"slices"
	"strconv"
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

// minExtract is the shortest data: URL a chat body's reader decodes in
// place; shorter ones are left to the JSON decoder (decodeDataURL).
const minExtract = 16 << 10

// uploadProbe is what a multipart upload holds before it has shown that
// it sends: a client must send this much before it reserves its size.
const uploadProbe = 64 << 10

// defaultMinUploadRate is min_upload_rate's default, in bytes a second.
const defaultMinUploadRate = 64 << 10

// uploadRateWindow is the window over which min_upload_rate is judged;
// the first window is free, so the earliest cut comes after two. A
// variable so that tests can judge in milliseconds.
var uploadRateWindow = 10 * time.Second

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
	// this room's metric, registered with the others (metrics.go)
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

// failBody answers an error met while reading an upload. A body cut for
// its rate or refused as too large is left unread, so the connection is
// closed after the answer; before that, the rest of a too-large body is
// read and discarded (a lingering close, bounded by lingerBytes and
// lingerTime), so that a client still sending reads its 413 instead of a
// reset.
func (g *Gateway) failBody(w http.ResponseWriter, r *http.Request, endpoint string, e *apiError) {
	if e.status != http.StatusRequestEntityTooLarge && e.status != http.StatusRequestTimeout {
		g.fail(w, endpoint, "", e)
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
	g.fail(w, endpoint, "", e)
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

// chatBody is a chat request's body as read: the JSON (its large data:
// URLs replaced by references into urls), and the upload it holds.
type chatBody struct {
	json   []byte
	urls   *dataURLs
	up     *upload
	upload bool // larger than max_body: it must carry an image to edit
}

// release drops the body's images and gives back its share of the budget;
// after it, nothing of the upload is reachable from the request.
func (b *chatBody) release() {
	b.urls = nil
	b.up.release()
}

// readChatBody reads a chat body (docs/design.md#endpoints-and-errors; docs/design.md#edits). Within max_body it is
// any JSON body. Beyond, it can only be a chat with an image to edit: the
// bytes read so far must show an image part ("image_url" or a data:image
// URL), else it is a 413 without reading the rest; then it is an upload,
// admitted (client, budget: its whole size, for its first max_body bytes
// have shown that it sends) before another byte is read. A body that may
// be larger than max_body is judged for its rate (slowBody).
func (g *Gateway) readChatBody(w http.ResponseWriter, r *http.Request, adm *admission) (*chatBody, *apiError) {
	limit := max(g.MaxBody, g.MaxUpload/3*4+g.MaxBody) // base64 and the rest
	if r.ContentLength > limit {
		return nil, g.errChatTooLarge()
	}
	var slow *slowBody
	if r.ContentLength < 0 || r.ContentLength > g.MaxBody {
		slow = g.meterBody(w, r)
		defer slow.finish()
	}
	body := http.MaxBytesReader(w, r.Body, limit)
	headSize := g.MaxBody + 1
	if r.ContentLength >= 0 {
		headSize = min(headSize, r.ContentLength+1)
	}
	head, err := readFull(body, make([]byte, 0, headSize))
	if err != nil {
		return nil, chatReadError(err, g)
	}
	if int64(len(head)) <= g.MaxBody {
		return &chatBody{json: head}, nil
	}
	if !looksLikeImage(head) {
		return nil, g.errChatTooLarge()
	}
	size := uploadSize(r, limit)
	up, e := g.admitUpload(r, adm, limit, size-1, slow, g.errChatTooLarge())
	if e != nil {
		return nil, e
	}
	buf := append(make([]byte, 0, size), head...)
	if buf, err = readFull(body, buf); err != nil {
		up.release()
		return nil, chatReadError(err, g)
	}
	if int64(len(buf)) > limit {
		up.release()
		return nil, g.errChatTooLarge()
	}
	js, urls := extractDataURLs(buf)
	if urls == nil {
		// an upload's data: URLs are read in place or refused, never
		// decoded whole outside the budget (dataURLs.dataURL)
		urls = &dataURLs{}
	}
	urls.upload = true
	return &chatBody{json: js, urls: urls, up: up, upload: true}, nil
}

// readFull reads r into buf's free capacity, stopping when it is full or
// r ends; it never grows buf.
func readFull(r io.Reader, buf []byte) ([]byte, error) {
	for len(buf) < cap(buf) {
		n, err := r.Read(buf[len(buf):cap(buf)])
		buf = buf[:len(buf)+n]
		if err == io.EOF {
			return buf, nil
		}
		if err != nil {
			return buf, err
		}
	}
	return buf, nil
}

func chatReadError(err error, g *Gateway) *apiError {
	var mbe *http.MaxBytesError
	if errors.As(err, &mbe) {
		return g.errChatTooLarge()
	}
	if errors.Is(err, errUploadTooSlow) {
		return tooSlow()
	}
	return invalidRequest("", "Could not read the request body: "+truncate(err.Error(), 100))
}

// looksLikeImage tells whether the start of a chat body shows an image
// part: the part's type or key "image_url", or a data:image URL.
func looksLikeImage(b []byte) bool {
	return bytes.Contains(b, []byte(`"image_url"`)) || bytes.Contains(bytes.ToLower(b), []byte("data:image/"))
}

// dataURLs are the data: URLs of a chat body, decoded where they were
// (extractDataURLs). An entry is nil when its base64 was not valid.
type dataURLs struct {
	prefix string // of the references that stand for them in the JSON
	images [][]byte
	// upload: the body was an upload, so any data: URL too large for the
	// JSON decoder to copy harmlessly has been read in place or is refused
	upload bool
}

// dataURL decodes a data: URL of a chat message: a reference to one the
// body's reader decoded, or any other through decodeDataURL.
func (x *dataURLs) dataURL(s string, limit int64, param string) (*sourceImage, *apiError) {
	var i int
	var err error
	if x != nil && x.prefix != "" && strings.HasPrefix(s, x.prefix) {
		i, err = strconv.Atoi(s[len(x.prefix):])
	}
	if x == nil || x.prefix == "" || !strings.HasPrefix(s, x.prefix) || err != nil || i < 0 || i >= len(x.images) {
		if x != nil && x.upload && len(s) >= minExtract {
			return nil, invalidRequest(param, "The data: URL could not be read: send it as a JSON string \"data:image/png;base64,…\" (no JSON escapes in its type), in the field \"url\" of the image_url part")
		}
		return decodeDataURL(s, limit, param)
	}
	b := x.images[i]
	if b == nil {
		return nil, invalidRequest(param, "The data: URL's base64 is not valid")
	}
	if int64(len(b)) > limit {
		return nil, errUploadTooLarge(limit)
	}
	return checkSource(b, param)
}

// extractDataURLs finds the large data:image URLs of a JSON body (string
// values of a key "url", as chat image parts carry them, or "image_url",
// as JSON edits do), base64-decodes each
// in place, inside the body's own buffer, and returns a copy of the JSON
// in which each stands as a short reference (data:image/x-zimage-upload;
// base64,<nonce>-<i>). The images are slices of body: the body is in
// memory once, and the JSON decoder copies only the rest. JSON escapes in
// the base64 other than \/ and line breaks make an entry invalid (no
// client escapes base64's letters).
func extractDataURLs(body []byte) ([]byte, *dataURLs) {
	x := &dataURLs{prefix: "data:image/x-zimage-upload;base64," + randomID()[:12] + "-"}
	type span struct{ from, to, image int }
	var spans []span
	urlValue := false // the next value is that of a key "url"
	for i := 0; i < len(body); i++ {
		c := body[i]
		switch c {
		case ' ', '\t', '\r', '\n', ':':
			continue
		case '"':
		default:
			urlValue = false
			continue
		}
		end := stringEnd(body, i+1)
		if end < 0 {
			break // not JSON: the decoder says so
		}
		s := body[i+1 : end]
		if isKey(body, end+1) {
			// "url" of a chat's image part, "image_url" of a JSON edit,
			// matched as encoding/json matches them
			urlValue = keyIs(s, "url") || keyIs(s, "image_url")
		} else if urlValue {
			urlValue = false
			if p := dataURLPayload(s); p >= 0 {
				n, ok := decodeBase64InPlace(s[p:])
				img := s[p : p+n : p+n]
				if !ok {
					img = nil
				}
				spans = append(spans, span{from: i + 1, to: end, image: len(x.images)})
				x.images = append(x.images, img)
			}
		}
		i = end
	}
	if len(spans) == 0 {
		return body, nil
	}
	size := len(body)
	for _, sp := range spans {
		size += len(x.prefix) + 20 - (sp.to - sp.from)
	}
	out := make([]byte, 0, size)
	prev := 0
	for _, sp := range spans {
		out = append(out, body[prev:sp.from]...)
		out = append(out, x.prefix...)
		out = strconv.AppendInt(out, int64(sp.image), 10)
		prev = sp.to
	}
	return append(out, body[prev:]...), x
}

// keyIs tells whether the raw JSON key s names the field name as
// encoding/json decides: after its escapes, case-insensitively ("URL" is
// "url"). A key that differs otherwise is not read here, and the image it
// carries is refused (dataURLs.dataURL) rather than decoded whole.
func keyIs(s []byte, name string) bool {
	if bytes.IndexByte(s, '\\') < 0 {
		return bytes.EqualFold(s, []byte(name))
	}
	if len(s) > 6*len(name) {
		return false // longer than name with every letter escaped
	}
	var k string
	if json.Unmarshal(append(append([]byte{'"'}, s...), '"'), &k) != nil {
		return false
	}
	return strings.EqualFold(k, name)
}

// stringEnd is the index of the quote that ends the JSON string starting
// at from, or -1.
func stringEnd(b []byte, from int) int {
	for k := from; ; {
		q := bytes.IndexByte(b[k:], '"')
		if q < 0 {
			return -1
		}
		q += k
		bs := 0
		for bs < q-from && b[q-1-bs] == '\\' {
			bs++
		}
		if bs%2 == 0 {
			return q
		}
		k = q + 1
	}
}

// isKey tells whether a string that ended before from is an object key.
func isKey(b []byte, from int) bool {
	for ; from < len(b); from++ {
		switch b[from] {
		case ' ', '\t', '\r', '\n':
			continue
		case ':':
			return true
		}
		return false
	}
	return false
}

// dataURLPayload is where the base64 starts in the raw JSON string s when
// s is a data:image/…;base64, URL worth decoding in place, else -1. The
// checks are decodeDataURL's: a URL that fails them is left to it, to be
// answered as before.
func dataURLPayload(s []byte) int {
	if len(s) < minExtract || !bytes.EqualFold(s[:5], []byte("data:")) {
		return -1
	}
	comma := bytes.IndexByte(s[:min(len(s), 512)], ',')
	if comma < 0 {
		return -1
	}
	meta := strings.ToLower(strings.ReplaceAll(string(s[5:comma]), `\/`, "/"))
	mt, _, _ := strings.Cut(meta, ";")
	if strings.Contains(meta, `\`) || !strings.HasSuffix(meta, ";base64") || !strings.HasPrefix(mt, "image/") {
		return -1
	}
	return comma + 1
}

// decodeBase64InPlace decodes the base64 of a raw JSON string into its
// own first bytes and returns their number. Writing never overtakes
// reading: n bytes out take 4n/3 characters in. As decodeDataURL does,
// padding is optional and line breaks are ignored.
func decodeBase64InPlace(b []byte) (int, bool) {
	var in [4096]byte
	var out [3072]byte
	r, w, q := 0, 0, 0
	pad := false
	flush := func() bool {
		m, err := base64.RawStdEncoding.Decode(out[:], in[:q])
		if err != nil {
			return false
		}
		w += copy(b[w:], out[:m])
		q = 0
		return true
	}
	for r < len(b) {
		c := b[r]
		r++
		if c == '\\' {
			if r == len(b) {
				return 0, false
			}
			switch b[r] {
			case '/':
				c = '/'
			case 'n', 'r':
				r++
				continue
			default:
				return 0, false
			}
			r++
		}
		if c == '=' {
			pad = true
			continue
		}
		if pad {
			return 0, false
		}
		in[q] = c
		q++
		if q == len(in) && !flush() {
			return 0, false
		}
	}
	if !flush() {
		return 0, false
	}
	return w, true
}
