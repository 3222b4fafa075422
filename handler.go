package zimage

import (
	"encoding/json"
	"errors"
	"io"
	"net/http"
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
	routeDemoImage
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
	}
	if id, ok := strings.CutPrefix(rest, "/models/"); ok && id != "" {
		return routeModel, id
	}
	if v1 {
		return routeUnknown, ""
	}
	return routeNone, ""
}

// ServeHTTP answers the gateway's endpoints and passes other paths on.
func (g *Gateway) ServeHTTP(w http.ResponseWriter, r *http.Request, next caddyhttp.Handler) error {
	rt, id := parseRoute(r.URL.Path)
	switch rt {
	case routeNone:
		return next.ServeHTTP(w, r)
	case routeDemoImage:
		if _, demo := g.upstream.(demoGenerator); demo {
			serveDemoImage(w, r, id)
			return nil
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
		g.fail(w, endpointFor(rt), "", errUnauthorized())
		return nil
	}
	// every answer from here on is the client's (SPEC §12); the models
	// endpoints, the hot path, make no job and need no request context
	rs, r := attribute(w, r, c, rt != routeModels && rt != routeModel)
	defer rs.finish(endpointFor(rt))
	w = rs

	switch rt {
	case routeModels:
		if r.Method != http.MethodGet {
			g.fail(w, endpointModels, "", errMethod(r.Method, "GET"))
			return nil
		}
		g.serveModels(w)
	case routeModel:
		if r.Method != http.MethodGet {
			g.fail(w, endpointModels, "", errMethod(r.Method, "GET"))
			return nil
		}
		g.serveModel(w, id)
	case routeChat:
		if r.Method != http.MethodPost {
			g.fail(w, endpointChat, "", errMethod(r.Method, "POST"))
			return nil
		}
		g.serveChat(w, r)
	case routeImages:
		if r.Method != http.MethodPost {
			g.fail(w, endpointImages, "", errMethod(r.Method, "POST"))
			return nil
		}
		g.serveImages(w, r)
	default:
		g.fail(w, "unknown", "", errNotFound(r.URL.Path))
	}
	return nil
}

func endpointFor(rt route) string {
	switch rt {
	case routeModels, routeModel:
		return endpointModels
	case routeChat:
		return endpointChat
	case routeImages:
		return endpointImages
	}
	return "unknown"
}

// readBody reads the request body within the configured limit.
func (g *Gateway) readBody(w http.ResponseWriter, r *http.Request) ([]byte, *apiError) {
	body, err := io.ReadAll(http.MaxBytesReader(w, r.Body, g.MaxBody))
	if err != nil {
		var mbe *http.MaxBytesError
		if errors.As(err, &mbe) {
			return nil, errTooLarge(g.MaxBody)
		}
		return nil, invalidRequest("", "Could not read the request body: "+err.Error())
	}
	return body, nil
}

// fail writes an error and counts it.
func (g *Gateway) fail(w http.ResponseWriter, endpoint, modelName string, e *apiError) {
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
