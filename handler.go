package zimage

import (
	"encoding/json"
	"errors"
	"io"
	"mime"
	"net/http"
	"net/url"
	"slices"
	"strconv"
	"strings"

	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
)

// route is what a request path asks for.
type route int

const (
	routeNone route = iota // not ours: the next handler's
	routeUnknown
	routeModels
	routeModel
	routeChat
	routeImages
	routeEdits
	routeResponses // POST a new response
	routeResponse  // GET or DELETE a stored one
	routeDemoImage
	routeStoreImage
	routeUsage
)

// demoPath is where the demo upstream serves its placeholder PNGs.
const demoPath = "/v1/zimage-demo/"

// parseRoute maps a path to a route. Every endpoint answers with and
// without the /v1 prefix (clients are configured both ways); other paths
// under /v1/ are unknown API paths, and the rest belong to the site.
func parseRoute(path string) (route, string) {
	// a base URL configured with a trailing slash ("…/v1/") makes some
	// clients ask for "/v1//chat/completions"
	for strings.Contains(path, "//") {
		path = strings.ReplaceAll(path, "//", "/")
	}
	if strings.HasPrefix(path, demoPath) {
		return routeDemoImage, path[len(demoPath):]
	}
	if name, ok := strings.CutPrefix(path, storeURLPath); ok {
		return routeStoreImage, name
	}
	if name, ok := strings.CutPrefix(path, storePath); ok {
		return routeStoreImage, name
	}
	rest, v1 := strings.CutPrefix(path, "/v1")
	if v1 && rest != "" && rest[0] != '/' { // "/v1beta" is not ours
		return routeNone, ""
	}
	rest = strings.TrimSuffix(rest, "/")
	switch rest {
	case "/models":
		return routeModels, ""
	case "/chat/completions":
		return routeChat, ""
	case "/images/generations":
		return routeImages, ""
	case "/images/edits":
		return routeEdits, ""
	case usagePath:
		return routeUsage, ""
	case "/responses":
		return routeResponses, ""
	}
	if id, ok := strings.CutPrefix(rest, "/models/"); ok && id != "" {
		return routeModel, id
	}
	if id, ok := strings.CutPrefix(rest, "/responses/"); ok && id != "" && !strings.Contains(id, "/") {
		return routeResponse, id
	}
	if v1 {
		return routeUnknown, ""
	}
	return routeNone, ""
}

// ServeHTTP answers the gateway's endpoints and passes other paths on.
func (g *Gateway) ServeHTTP(w http.ResponseWriter, r *http.Request, next caddyhttp.Handler) error {
	// the playground's path is configured, so it is matched here rather
	// than in parseRoute; before auth: the page holds no secret (docs/design.md#the-playground)
	if g.playground != nil && g.playground.serve(w, r) {
		return nil
	}
	// the health endpoint: no auth, load balancers send no key (docs/design.md#health)
	if g.health != nil && g.health.serve(w, r) {
		return nil
	}
	rt, id := parseRoute(r.URL.Path)
	switch rt {
	case routeNone:
		return next.ServeHTTP(w, r)
	case routeDemoImage:
		if _, demo := g.upstream.(demoGenerator); demo {
			g.serveDemoImage(w, r, id)
			return nil
		}
		rt = routeUnknown
	case routeStoreImage:
		// before auth: an <img> cannot send a key (docs/design.md#the-store)
		if g.store != nil {
			g.serveStored(w, r, id)
			return nil
		}
		// with the store off: an unknown API path, or the site's own
		if !strings.HasPrefix(strings.TrimLeft(r.URL.Path, "/"), "v1/") {
			return next.ServeHTTP(w, r)
		}
		rt = routeUnknown
	}

	// CORS preflight: no auth; the headers come from the site's config
	if r.Method == http.MethodOptions {
		w.WriteHeader(http.StatusNoContent)
		return nil
	}
	c := g.authorize(r)
	if c == nil {
		g.failRequest(w, endpointFor(rt), "", errUnauthorized())
		return nil
	}
	// every answer from here on is the client's: counted for it, and
	// what it holds of its limits given back when the request ends
	rs := &requestState{ResponseWriterWrapper: caddyhttp.ResponseWriterWrapper{ResponseWriter: w}, client: c, adm: admission{client: c}}
	defer rs.finish(endpointFor(rt))
	w = rs
	if e := g.checkCrossSite(r, rt); e != nil {
		g.failRequest(w, endpointFor(rt), "", e)
		return nil
	}

	if ms := routeMethods[rt]; ms != nil && !slices.Contains(ms, r.Method) {
		// a 405 names what the route answers, in the header too
		w.Header().Set("Allow", strings.Join(ms, ", "))
		g.failRequest(w, endpointFor(rt), "", errMethod(r.Method, strings.Join(ms, " or ")))
		return nil
	}
	switch rt {
	case routeModels:
		g.serveModels(w)
	case routeModel:
		g.serveModel(w, id)
	case routeChat:
		g.serveChat(w, r, &rs.adm)
	case routeImages:
		g.serveImages(w, r, &rs.adm)
	case routeEdits:
		g.serveEdits(w, r, &rs.adm)
	case routeUsage:
		g.serveUsage(w, r, c)
	case routeResponses:
		g.serveResponses(w, r, &rs.adm)
	case routeResponse:
		g.serveStoredResponse(w, r, c, id)
	default:
		g.failRequest(w, "unknown", "", errNotFound(r.URL.Path))
	}
	return nil
}

// routeMethods are the methods each API route answers; the usage route
// checks its own. Kept in a table so that the 405 and its Allow header say
// the same as the switch that serves the route.
var routeMethods = map[route][]string{
	routeModels:    {http.MethodGet},
	routeModel:     {http.MethodGet},
	routeChat:      {http.MethodPost},
	routeImages:    {http.MethodPost},
	routeEdits:     {http.MethodPost},
	routeResponses: {http.MethodPost},
	routeResponse:  {http.MethodGet, http.MethodDelete},
}

func endpointFor(rt route) string {
	switch rt {
	case routeModels, routeModel:
		return endpointModels
	case routeChat:
		return endpointChat
	case routeImages:
		return endpointImages
	case routeEdits:
		return endpointEdits
	case routeUsage:
		return endpointUsage
	case routeResponses, routeResponse:
		return endpointResponses
	}
	return "unknown"
}

// readBody reads the request body within limit.
func (g *Gateway) readBody(w http.ResponseWriter, r *http.Request, limit int64) ([]byte, *apiError) {
	body, err := io.ReadAll(http.MaxBytesReader(w, r.Body, limit))
	if err != nil {
		var mbe *http.MaxBytesError
		if errors.As(err, &mbe) {
			return nil, errTooLarge(limit)
		}
		return nil, invalidRequest("", "Could not read the request body: "+err.Error())
	}
	return body, nil
}

// failRequest answers a request with e in the OpenAI envelope and counts
// it in caddy_zimage_requests_total under endpoint and model. A failure
// after the pipeline's renderer began is written by the renderer instead
// (a stream has sent its status already) and counted there.
func (g *Gateway) failRequest(w http.ResponseWriter, endpoint, modelName string, e *apiError) {
	writeError(w, e)
	metricRequests.WithLabelValues(endpoint, modelName, strconv.Itoa(e.status)).Inc()
}

// writeJSON answers v as JSON.
func writeJSON(w http.ResponseWriter, status int, v any) {
	b, err := json.Marshal(v)
	if err != nil {
		writeError(w, &apiError{status: http.StatusInternalServerError, typ: "server_error", code: "internal_error", message: "encoding the response failed"})
		return
	}
	writeJSONBytes(w, status, b)
}

// writeJSONBytes answers with an encoded JSON body. The header keys are
// already canonical, so they are assigned directly (the profile of the
// models endpoint showed Header().Set among its larger costs).
func writeJSONBytes(w http.ResponseWriter, status int, b []byte) {
	h := w.Header()
	h["Content-Type"] = []string{"application/json"}
	h["Content-Length"] = []string{strconv.Itoa(len(b))}
	w.WriteHeader(status)
	_, _ = w.Write(b)
}

// checkCrossSite refuses, with no_auth, a JSON endpoint's body of a type a
// browser sends from any web page without a CORS preflight: no
// key stands between such a page and the operator's points. With keys, the
// key is the protection and any type is accepted, as clients send them.
func (g *Gateway) checkCrossSite(r *http.Request, rt route) *apiError {
	if !g.NoAuth || r.Method != http.MethodPost {
		return nil
	}
	if rt == routeEdits {
		// edits are multipart by design, which any page may send: with
		// no_auth only this site's own pages (the playground) may post one
		if o := r.Header.Get("Origin"); o != "" {
			if u, err := url.Parse(o); err != nil || !strings.EqualFold(u.Host, r.Host) {
				return &apiError{status: http.StatusForbidden, typ: "invalid_request_error", code: "cross_origin",
					message: "This gateway runs with no_auth: edits are accepted from its own site only"}
			}
		}
		return nil
	}
	if rt != routeChat && rt != routeImages && rt != routeResponses {
		return nil
	}
	ct := r.Header.Get("Content-Type")
	mt, _, err := mime.ParseMediaType(ct)
	switch {
	case ct == "":
		// fetch() with a Blob body of no type sends none, without a preflight
	case err != nil:
	case mt == "text/plain", mt == "application/x-www-form-urlencoded", mt == "multipart/form-data":
	default:
		return nil
	}
	return &apiError{status: http.StatusUnsupportedMediaType, typ: "invalid_request_error", code: "unsupported_media_type",
		message: "Send the body as Content-Type: application/json. This gateway runs with no_auth, and a web page can make a browser send other types to it without asking"}
}
