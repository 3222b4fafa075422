package zimage

// Reading a chat body that may carry an image to edit: within max_body any
// JSON, beyond it an upload admitted before the rest is read. Its large
// data: URLs are decoded in place inside the body's own buffer before the
// JSON is parsed, so the image is in memory once.

import (
	"bytes"
	"encoding/base64"
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"strconv"
	"strings"
)

// minExtract is the shortest data: URL a chat body's reader decodes in
// place; shorter ones are left to the JSON decoder (decodeDataURL).
const minExtract = 16 << 10

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
