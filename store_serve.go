package zimage

// Serving the store (docs/design.md#the-store): GET and HEAD of
// /v1/zimage/images/{id}.{ext}, without auth (an <img> cannot send a key:
// the id is the secret), with the validators and Range support of Caddy's
// file_server, from the file itself when the storage is file_system.

import (
	"bytes"
	"errors"
	"io"
	"io/fs"
	"net/http"
	"os"
	"strconv"
	"strings"
	"time"

	"go.uber.org/zap"

	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
)

func errImageNotFound() *apiError {
	return &apiError{status: http.StatusNotFound, typ: "invalid_request_error", code: "not_found",
		message: "No such image in this gateway's store (it may have expired)"}
}

func errStoreUnavailable() *apiError {
	return &apiError{status: http.StatusInternalServerError, typ: "server_error", code: "storage_error",
		message: "The image store could not be read; retry later"}
}

// serveStored answers GET and HEAD /v1/zimage/images/{id}.{ext} (and
// without /v1), without auth: an <img> cannot send a key, the id is the
// secret. It counts every answer in caddy_zimage_store_served_total.
func (g *Gateway) serveStored(w http.ResponseWriter, r *http.Request, name string) {
	code := g.store.serve(w, r, name)
	metricStoreServed.WithLabelValues(strconv.Itoa(code)).Inc()
}

// serve answers one request for a stored image and returns its status.
func (s *imageStore) serve(w http.ResponseWriter, r *http.Request, name string) int {
	switch r.Method {
	case http.MethodGet, http.MethodHead:
	case http.MethodOptions: // CORS preflight; the headers come from the site's config
		w.WriteHeader(http.StatusNoContent)
		return http.StatusNoContent
	default:
		w.Header().Set("Allow", "GET, HEAD")
		writeError(w, errMethod(r.Method, "GET or HEAD"))
		return http.StatusMethodNotAllowed
	}
	contentType, ok := parseStoreName(name)
	if !ok {
		writeError(w, errImageNotFound())
		return http.StatusNotFound
	}
	key := s.dir + name
	etag := `"` + name[:storeIDLen] + `"` // the id names the bytes: a strong validator
	ctx := r.Context()

	// a revalidation needs only to know the image is still there; with a
	// remote storage that saves loading the whole image for a 304
	if inm := r.Header.Get("If-None-Match"); inm != "" && etagListMatches(inm, etag) {
		var exists bool
		if s.files != nil {
			_, err := os.Stat(s.files.Filename(key))
			exists = err == nil
		} else {
			exists = s.storage.Exists(ctx, key)
		}
		if !exists {
			writeError(w, errImageNotFound())
			return http.StatusNotFound
		}
		h := w.Header()
		h["Etag"] = []string{etag}
		h["Cache-Control"] = []string{storeCacheControl}
		w.WriteHeader(http.StatusNotModified)
		return http.StatusNotModified
	}

	var content io.ReadSeeker
	if s.files != nil {
		// a file on disk is served from the file (sendfile), never read whole
		f, err := os.Open(s.files.Filename(key))
		if err != nil {
			return s.loadFailed(w, name, err, errors.Is(err, fs.ErrNotExist))
		}
		defer f.Close()
		content = f
	} else {
		b, err := s.storage.Load(ctx, key)
		if err != nil {
			// some storages do not wrap fs.ErrNotExist: ask once more
			return s.loadFailed(w, name, err, errors.Is(err, fs.ErrNotExist) || !s.storage.Exists(ctx, key))
		}
		content = bytes.NewReader(b)
	}
	h := w.Header()
	h["Content-Type"] = []string{contentType}
	h["Etag"] = []string{etag}
	h["Cache-Control"] = []string{storeCacheControl}
	h["X-Content-Type-Options"] = []string{"nosniff"}
	sw := &storeWriter{ResponseWriterWrapper: caddyhttp.ResponseWriterWrapper{ResponseWriter: w}}
	// Range, If-Range, If-Match and HEAD; no modification time: the ETag
	// is the validator
	http.ServeContent(sw, r, "", time.Time{}, content)
	if sw.code == 0 {
		sw.code = http.StatusOK
	}
	return sw.code
}

// loadFailed answers a storage read that failed: 404 when the image is not
// there, else 500 and an error line.
func (s *imageStore) loadFailed(w http.ResponseWriter, name string, err error, notFound bool) int {
	if notFound {
		writeError(w, errImageNotFound())
		return http.StatusNotFound
	}
	s.logger.Error("reading a stored image failed", zap.String("image", name), zap.Error(err))
	e := errStoreUnavailable()
	writeError(w, e)
	return e.status
}

// etagListMatches is the weak comparison of If-None-Match (RFC 9110
// 13.1.2): any listed tag, W/ or not, or "*".
func etagListMatches(header, etag string) bool {
	for _, t := range strings.Split(header, ",") {
		t = strings.TrimSpace(t)
		if t == "*" || strings.TrimPrefix(t, "W/") == etag {
			return true
		}
	}
	return false
}

// storeWriter records the status http.ServeContent chose, for the metric,
// and answers its plain-text errors (416 for a range beyond the image, 412
// for a failed If-Match) in the OpenAI envelope like every other error. It
// passes ReadFrom on, so a file still goes out by sendfile.
type storeWriter struct {
	caddyhttp.ResponseWriterWrapper
	code    int
	swallow bool // the error body is ours: drop ServeContent's text
}

func (w *storeWriter) WriteHeader(code int) {
	if w.code != 0 {
		return
	}
	w.code = code
	if code < 400 {
		w.ResponseWriter.WriteHeader(code)
		return
	}
	w.swallow = true
	h := w.Header()
	h.Del("Cache-Control") // an error is not immutable
	h.Del("Etag")
	msg := "The requested range is outside the image"
	c := "range_not_satisfiable"
	if code != http.StatusRequestedRangeNotSatisfiable {
		msg, c = "A precondition of the request failed", "precondition_failed"
	}
	writeError(w.ResponseWriter, &apiError{status: code, typ: "invalid_request_error", code: c, message: msg})
}

func (w *storeWriter) Write(b []byte) (int, error) {
	if w.code == 0 {
		w.WriteHeader(http.StatusOK)
	}
	if w.swallow {
		return len(b), nil
	}
	return w.ResponseWriter.Write(b)
}

func (w *storeWriter) ReadFrom(r io.Reader) (int64, error) {
	if w.code == 0 {
		w.WriteHeader(http.StatusOK)
	}
	if w.swallow {
		return io.Copy(io.Discard, r)
	}
	// the wrapper's ReadFrom passes a file on to sendfile
	return w.ResponseWriterWrapper.ReadFrom(r)
}
