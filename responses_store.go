package zimage

// Kept responses: a Responses API answer is kept in the store (without
// the image's bytes) when the store is on, so that GET and DELETE
// /v1/responses/{id} and previous_response_id work on any instance that
// shares the storage. A response belongs to the client that made it:
// another client's id is answered exactly like an unknown one.

import (
	"context"
	"encoding/json"
	"errors"
	"io"
	"io/fs"
	"net/http"
	"strings"
	"time"

	"go.uber.org/zap"
)

// responseKeyID checks a response id before any storage access: only ids
// this gateway makes ("resp_" and 48 lowercase hex digits) reach a key.
func responseKeyID(id string) bool {
	hexPart, ok := strings.CutPrefix(id, "resp_")
	if !ok || len(hexPart) != 48 {
		return false
	}
	for i := 0; i < len(hexPart); i++ {
		if c := hexPart[i]; !(c >= '0' && c <= '9' || c >= 'a' && c <= 'f') {
			return false
		}
	}
	return true
}

func (s *imageStore) responseKey(id string) string {
	return s.prefix + "/" + responsesDir + id + ".json"
}

// responsesDir holds the kept responses under the store's prefix.
const responsesDir = "responses/"

func errResponseNotFound(id string) *apiError {
	return &apiError{status: http.StatusNotFound, typ: "invalid_request_error", code: "not_found",
		message: "No response with id '" + truncate(id, 80) + "' found (responses are kept for the store's max_age, for the client that made them)"}
}

func (g *Gateway) saveResponse(ctx context.Context, s *storedResponse) error {
	b, err := json.Marshal(s)
	if err != nil {
		return err
	}
	return g.store.storage.Store(ctx, g.store.responseKey(s.ID), b)
}

// loadResponse reads a kept response of client c: another client's, an
// expired or an unknown one are all the same 404, so an id tells nothing
// to whoever does not own it.
func (g *Gateway) loadResponse(ctx context.Context, c *client, id string) (*storedResponse, *apiError) {
	if !responseKeyID(id) {
		return nil, errResponseNotFound(id)
	}
	b, err := g.store.storage.Load(ctx, g.store.responseKey(id))
	if errors.Is(err, fs.ErrNotExist) {
		return nil, errResponseNotFound(id)
	}
	if err != nil {
		g.logger.Warn("reading a kept response failed", zap.String("response_id", id), zap.String("error", g.scrub.Replace(err.Error())))
		return nil, errStoreUnavailable()
	}
	var s storedResponse
	if json.Unmarshal(b, &s) != nil || s.ID != id || s.Client != c.label() ||
		g.store.maxAge > 0 && time.Since(time.Unix(s.CreatedAt, 0)) > g.store.maxAge {
		return nil, errResponseNotFound(id)
	}
	return &s, nil
}

// serveStoredResponse answers GET /v1/responses/{id} (the response again,
// its image as base64) and DELETE (removes it).
func (g *Gateway) serveStoredResponse(w http.ResponseWriter, r *http.Request, c *client, id string) {
	if g.store == nil {
		g.failRequest(w, endpointResponses, "", errResponseNotFound(id))
		return
	}
	s, e := g.loadResponse(r.Context(), c, id)
	if e != nil {
		g.failRequest(w, endpointResponses, "", e)
		return
	}
	if r.Method == http.MethodDelete {
		if err := g.store.storage.Delete(r.Context(), g.store.responseKey(id)); err != nil && !errors.Is(err, fs.ErrNotExist) {
			g.logger.Warn("deleting a kept response failed", zap.String("response_id", id), zap.String("error", g.scrub.Replace(err.Error())))
			g.failRequest(w, endpointResponses, "", errStoreUnavailable())
			return
		}
		writeJSON(w, http.StatusOK, struct {
			ID      string `json:"id"`
			Object  string `json:"object"`
			Deleted bool   `json:"deleted"`
		}{id, "response.deleted", true})
		return
	}
	var img []byte
	if s.Image != "" {
		// the image is held in a download slot, as a b64_json answer's
		// is: the slots bound the memory of all answers that carry bytes
		wait, cancel := context.WithTimeout(r.Context(), g.timeout)
		release, e := g.fetcher.acquire(wait, 1)
		cancel()
		if e != nil {
			if e.status == http.StatusGatewayTimeout {
				e = &apiError{status: http.StatusServiceUnavailable, typ: "server_error", code: "busy", retryAfter: "5",
					message: "The gateway holds as many images as max_downloads allows; retry later"}
			}
			g.failRequest(w, endpointResponses, "", e)
			return
		}
		defer release()
		var err error
		if img, err = g.store.load(r.Context(), s.Image); err != nil {
			// the image was swept, or the storage failed: the response
			// without its picture would mislead
			g.logger.Warn("reading a kept response's image failed", zap.String("response_id", id), zap.String("error", g.scrub.Replace(err.Error())))
			g.failRequest(w, endpointResponses, "", errResponseNotFound(id))
			return
		}
	}
	writeResponseJSON(w, s, img)
}

// load reads a stored image whole, within max_image_size.
func (s *imageStore) load(ctx context.Context, name string) ([]byte, error) {
	if _, ok := parseStoreName(name); !ok {
		return nil, fs.ErrNotExist
	}
	b, err := s.storage.Load(ctx, s.dir+name)
	if err != nil {
		return nil, err
	}
	if int64(len(b)) > s.maxSize {
		return nil, io.ErrShortBuffer
	}
	return b, nil
}
