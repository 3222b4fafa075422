package zimage

// Errors as OpenAI answers them (docs/design.md#endpoints-and-errors): every
// client of the gateway is an OpenAI client, and its SDK turns this
// envelope into a typed error with the message the gateway wrote, so each
// message says what the user must change.

import (
	"encoding/json"
	"net/http"
	"strconv"
)

// apiError is an error answered in the OpenAI envelope:
// {"error":{"message","type","param","code"}}.
type apiError struct {
	status int
	// typ is OpenAI's error type (invalid_request_error, rate_limit_error,
	// upstream_error…), code the machine-readable reason a client may
	// test, param the request field at fault ("" for none)
	typ   string
	code  string
	param string
	// message is shown to the user as it is: it must carry no secret
	// (what comes from elsewhere is scrubbed before it gets here)
	message    string
	retryAfter string // seconds, for 429, which always carries one
}

func (e *apiError) Error() string { return e.message }

// invalidRequest is the 400 of a request the gateway cannot take as it
// is; param names the field to fix.
func invalidRequest(param, msg string) *apiError {
	return &apiError{status: http.StatusBadRequest, typ: "invalid_request_error", code: "invalid_request", param: param, message: msg}
}

// errUnauthorized is OpenAI's answer to a bad key, status and code, so
// that SDKs raise their authentication error and clients ask for a key.
func errUnauthorized() *apiError {
	return &apiError{status: http.StatusUnauthorized, typ: "invalid_request_error", code: "invalid_api_key",
		message: "Incorrect or missing API key: send it as 'Authorization: Bearer <key>'"}
}

func errModelNotFound(name string) *apiError {
	return &apiError{status: http.StatusNotFound, typ: "invalid_request_error", code: "model_not_found", param: "model",
		message: "The model '" + name + "' does not exist; GET /v1/models lists the available models"}
}

// errNotFound answers an unknown path under /v1/ and lists the paths
// there are: the usual cause is a client configured with a wrong base URL.
func errNotFound(path string) *apiError {
	return &apiError{status: http.StatusNotFound, typ: "invalid_request_error", code: "not_found",
		message: "Unknown API path " + path + "; this gateway serves /v1/models, /v1/chat/completions, /v1/images/generations, /v1/images/edits and /v1/responses"}
}

// errMethod answers a method the path does not take, naming the allowed
// ones in the message, which is what an API client shows. The paths
// browsers and caches fetch (the store, health, the playground) also set
// the Allow header.
func errMethod(method, allowed string) *apiError {
	return &apiError{status: http.StatusMethodNotAllowed, typ: "invalid_request_error", code: "method_not_allowed",
		message: "Method " + method + " is not allowed here; use " + allowed}
}

// errTooLarge names the limit, so the user knows what fits (or which
// setting to raise).
func errTooLarge(limit int64) *apiError {
	return &apiError{status: http.StatusRequestEntityTooLarge, typ: "invalid_request_error", code: "request_too_large",
		message: "Request body is larger than the limit of " + formatBytes(limit)}
}

// errQueueFull is the 429 of a request that found every account slot
// taken for queue_timeout; retryAfter tells the client when to try again.
func errQueueFull(retryAfter string) *apiError {
	return &apiError{status: http.StatusTooManyRequests, typ: "rate_limit_error", code: "rate_limit_exceeded", retryAfter: retryAfter,
		message: "The image service is busy: too many generations are waiting; retry later"}
}

// errorBody is the OpenAI error envelope.
type errorBody struct {
	Error errorDetail `json:"error"`
}

// errorDetail is the envelope's error. Param is a pointer because OpenAI
// always sends the key, null when no field is at fault, and clients
// written against its answers read it that way.
type errorDetail struct {
	Message string  `json:"message"`
	Type    string  `json:"type"`
	Param   *string `json:"param"`
	Code    string  `json:"code"`
}

// body is e as the envelope.
func (e *apiError) body() errorBody {
	d := errorDetail{Message: e.message, Type: e.typ, Code: e.code}
	if e.param != "" {
		p := e.param
		d.Param = &p
	}
	return errorBody{Error: d}
}

// writeError answers with e in the OpenAI envelope.
func writeError(w http.ResponseWriter, e *apiError) {
	h := w.Header()
	h.Set("Content-Type", "application/json")
	if e.retryAfter != "" {
		h.Set("Retry-After", e.retryAfter)
	}
	w.WriteHeader(e.status)
	// strings only: Marshal cannot fail
	b, _ := json.Marshal(e.body())
	_, _ = w.Write(b)
}

// formatBytes writes a limit for a message: in MiB or KiB only when
// exact, so that a message never rounds a limit and tells a user that a
// body fits when it does not.
func formatBytes(n int64) string {
	switch {
	case n >= 1<<20 && n%(1<<20) == 0:
		return strconv.FormatInt(n>>20, 10) + " MiB"
	case n >= 1<<10 && n%(1<<10) == 0:
		return strconv.FormatInt(n>>10, 10) + " KiB"
	}
	return strconv.FormatInt(n, 10) + " bytes"
}
