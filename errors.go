package zimage

import (
	"encoding/json"
	"net/http"
	"strconv"
)

// apiError is an error answered in the OpenAI envelope:
// {"error":{"message","type","param","code"}}.
type apiError struct {
	status     int
	typ        string
	code       string
	param      string
	message    string
	retryAfter string // seconds, for 429
}

func (e *apiError) Error() string { return e.message }

func invalidRequest(param, msg string) *apiError {
	return &apiError{status: http.StatusBadRequest, typ: "invalid_request_error", code: "invalid_request", param: param, message: msg}
}

func errUnauthorized() *apiError {
	return &apiError{status: http.StatusUnauthorized, typ: "invalid_request_error", code: "invalid_api_key",
		message: "Incorrect or missing API key: send it as 'Authorization: Bearer <key>'"}
}

func errModelNotFound(name string) *apiError {
	return &apiError{status: http.StatusNotFound, typ: "invalid_request_error", code: "model_not_found", param: "model",
		message: "The model '" + name + "' does not exist; GET /v1/models lists the available models"}
}

func errNotFound(path string) *apiError {
	return &apiError{status: http.StatusNotFound, typ: "invalid_request_error", code: "not_found",
		message: "Unknown API path " + path + "; this gateway serves /v1/models, /v1/chat/completions, /v1/images/generations, /v1/images/edits and /v1/responses"}
}

func errMethod(method, allowed string) *apiError {
	return &apiError{status: http.StatusMethodNotAllowed, typ: "invalid_request_error", code: "method_not_allowed",
		message: "Method " + method + " is not allowed here; use " + allowed}
}

func errTooLarge(limit int64) *apiError {
	return &apiError{status: http.StatusRequestEntityTooLarge, typ: "invalid_request_error", code: "request_too_large",
		message: "Request body is larger than the limit of " + formatBytes(limit)}
}

func errQueueFull(retryAfter string) *apiError {
	return &apiError{status: http.StatusTooManyRequests, typ: "rate_limit_error", code: "rate_limit_exceeded", retryAfter: retryAfter,
		message: "The image service is busy: too many generations are waiting; retry later"}
}

// errorBody is the OpenAI error envelope.
type errorBody struct {
	Error errorDetail `json:"error"`
}

type errorDetail struct {
	Message string  `json:"message"`
	Type    string  `json:"type"`
	Param   *string `json:"param"`
	Code    string  `json:"code"`
}

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
	b, _ := json.Marshal(e.body())
	_, _ = w.Write(b)
}

func formatBytes(n int64) string {
	switch {
	case n >= 1<<20 && n%(1<<20) == 0:
		return strconv.FormatInt(n>>20, 10) + " MiB"
	case n >= 1<<10 && n%(1<<10) == 0:
		return strconv.FormatInt(n>>10, 10) + " KiB"
	}
	return strconv.FormatInt(n, 10) + " bytes"
}
