package zimage

// Upload memory (issue 15, items 2 and 3): how the bodies that carry an
// image to edit are read. An edit's multipart body and a chat body with a
// data: URL are the only requests larger than max_body, and each may be
// tens of MiB; read as they arrive, thirty of them held 1.5–2.5 GB.
//
// So an upload is admitted before its body is read: first the client's
// own max_concurrent (a client at its limit is refused without a byte of
// its body read), then a share of max_upload_memory, a budget shared by
// every upload of the handler, charged with what the request will hold
// (its Content-Length, else the most it may send). An upload that finds
// the budget spent waits up to the upstream's queue_timeout, then 429.
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
	"errors"
	"fmt"
	"io"
	"net/http"
	"strconv"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/sync/semaphore"
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

var metricUploadMemory = prometheus.NewGauge(prometheus.GaugeOpts{
	Namespace: "caddy", Subsystem: "zimage", Name: "upload_memory_bytes",
	Help: "Bytes of max_upload_memory held by uploads being read, decoded and stored.",
})

func init() {
	// this room's metric, registered with the others (metrics.go)
	collectors = append(collectors, metricUploadMemory)
}

// uploadBudget is a handler's max_upload_memory.
type uploadBudget struct {
	sem  *semaphore.Weighted
	size int64
	wait time.Duration // the upstream's queue_timeout
}

// provisionUploads checks max_upload_memory, fills its default and makes
// the budget; after the upstream, whose queue_timeout it waits.
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
	wait := defaultUpstreamTimeout
	if g.accounts != nil && g.accounts.queueTimeout > 0 {
		wait = g.accounts.queueTimeout
	}
	g.uploads = &uploadBudget{sem: semaphore.NewWeighted(g.MaxUploadMemory), size: g.MaxUploadMemory, wait: wait}
	return nil
}

// upload is one request's share of the budget. Its methods accept nil: a
// body within max_body holds none.
type upload struct {
	b *uploadBudget
	n int64
}

// release gives the share back; a second call does nothing.
func (u *upload) release() {
	if u == nil || u.n == 0 {
		return
	}
	u.b.sem.Release(u.n)
	metricUploadMemory.Sub(float64(u.n))
	u.n = 0
}

// hold takes charge bytes of the budget (all of it at most: a request
// larger than the budget reads alone), waiting up to queue_timeout.
func (b *uploadBudget) hold(r *http.Request, charge int64) (*upload, *apiError) {
	n := max(1, min(charge, b.size))
	ctx, cancel := context.WithTimeout(r.Context(), b.wait)
	defer cancel()
	if err := b.sem.Acquire(ctx, n); err != nil {
		if r.Context().Err() != nil {
			return nil, &apiError{status: 499, typ: "invalid_request_error", code: "client_closed_request", message: "The client closed the request"}
		}
		e := errQueueFull(retryAfterSeconds(b.wait))
		e.message = "The gateway is reading as many uploads as max_upload_memory allows; retry later"
		return nil, e
	}
	metricUploadMemory.Add(float64(n))
	return &upload{b: b, n: n}, nil
}

// admitUpload admits a request whose body is an upload of at most limit
// bytes, before any of it is read: a body announced larger is a 413 at
// once, a client at its max_concurrent a 429 at once (one slot is taken
// now; the job takes the rest of its n, admitClient), then the budget.
func (g *Gateway) admitUpload(r *http.Request, limit int64, tooLarge *apiError) (*upload, *apiError) {
	if r.ContentLength > limit {
		return nil, tooLarge
	}
	if e := admitClient(r, 1); e != nil {
		return nil, e
	}
	charge := limit
	if r.ContentLength >= 0 {
		charge = r.ContentLength
	}
	return g.uploads.hold(r, charge)
}

// readUpload reads an uploaded file within limit bytes, into one buffer
// of the size the request announced: a buffer grown as the bytes arrive
// leaves up to four times the image behind as garbage.
func readUpload(r *http.Request, part io.Reader, limit int64) ([]byte, *apiError) {
	size := limit + 1
	if r.ContentLength >= 0 {
		size = min(size, r.ContentLength+1)
	}
	buf := make([]byte, 0, size)
	for {
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
	return invalidRequest("image", "The image could not be read: "+truncate(err.Error(), 100))
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

// readChatBody reads a chat body (SPEC §3, §10.2). Within max_body it is
// any JSON body. Beyond, it can only be a chat with an image to edit: the
// bytes read so far must show an image part ("image_url" or a data:image
// URL), else it is a 413 without reading the rest; then it is an upload,
// admitted (client, budget) before another byte is read.
func (g *Gateway) readChatBody(w http.ResponseWriter, r *http.Request) (*chatBody, *apiError) {
	limit := max(g.MaxBody, g.MaxUpload/3*4+g.MaxBody) // base64 and the rest
	if r.ContentLength > limit {
		return nil, g.errChatTooLarge()
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
	up, e := g.admitUpload(r, limit, g.errChatTooLarge())
	if e != nil {
		return nil, e
	}
	size := limit + 1
	if r.ContentLength >= 0 {
		size = r.ContentLength + 1
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
}

// dataURL decodes a data: URL of a chat message: a reference to one the
// body's reader decoded, or any other through decodeDataURL.
func (x *dataURLs) dataURL(s string, limit int64, param string) (*sourceImage, *apiError) {
	if x == nil || !strings.HasPrefix(s, x.prefix) {
		return decodeDataURL(s, limit, param)
	}
	i, err := strconv.Atoi(s[len(x.prefix):])
	if err != nil || i < 0 || i >= len(x.images) {
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
			// "url" of a chat's image part, "image_url" of a JSON edit
			urlValue = string(s) == "url" || string(s) == "image_url"
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
