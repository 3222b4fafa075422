package zimage

// Retries of the image service call through a real Caddy: which failures
// are retried, how often, and that they stay within the one timeout.

import (
	"net/http"
	"strings"
	"sync"
	"testing"
)

// TestOpsRetries: retries happen on connection errors and 502/503/504 only,
// as many as configured (default 1), and never on other statuses, on
// success:false or after a timeout; a 429 passes Retry-After on.
func TestOpsRetries(t *testing.T) {
	ok := func(w http.ResponseWriter, r *http.Request) { writeImage(w, "https://img.example.com/retry.png") }
	hang := func(w http.ResponseWriter, r *http.Request) { <-r.Context().Done() }
	for _, tc := range []struct {
		name      string
		upstream  string             // lines of the upstream block
		answers   []http.HandlerFunc // per attempt; the last repeats
		status    int
		calls     int
		code      string // the error code, when status is not 200
		retryAftr string
	}{
		{"503 once then success, default retries", "", []http.HandlerFunc{failWith(503, `{"error":"busy"}`), ok}, 200, 2, "", ""},
		{"dropped connection then success", "", []http.HandlerFunc{dropConnection, ok}, 200, 2, "", ""},
		{"always 504, default retries", "", []http.HandlerFunc{failWith(504, `{}`)}, 502, 2, "upstream_error", ""},
		{"always 502, retries 2", "retries 2", []http.HandlerFunc{failWith(502, `{}`)}, 502, 3, "upstream_error", ""},
		{"always 503, retries 0", "retries 0", []http.HandlerFunc{failWith(503, `{}`)}, 502, 1, "upstream_error", ""},
		{"always 500, retries 2", "retries 2", []http.HandlerFunc{failWith(500, `{"error":"boom"}`)}, 502, 1, "upstream_error", ""},
		{"400, retries 2", "retries 2", []http.HandlerFunc{failWith(400, `{"message":"bad prompt"}`)}, 502, 1, "upstream_error", ""},
		{"429 with Retry-After, retries 2", "retries 2", []http.HandlerFunc{failWith(429, `{"error":"slow down"}`, "Retry-After", "7")}, 429, 1, "rate_limit_exceeded", "7"},
		{"success false, retries 2", "retries 2", []http.HandlerFunc{failWith(200, `{"success":false,"error":"nsfw"}`)}, 502, 1, "upstream_error", ""},
		{"timeout, retries 2", "retries 2\n\t\ttimeout 500ms", []http.HandlerFunc{hang}, 504, 1, "upstream_timeout", ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			up := newFakeUpstream(t)
			var mu sync.Mutex
			attempt := 0
			up.setHandler(func(w http.ResponseWriter, r *http.Request) {
				mu.Lock()
				h := tc.answers[min(attempt, len(tc.answers)-1)]
				attempt++
				mu.Unlock()
				h(w, r)
			})
			upstream := tc.upstream
			if !strings.Contains(upstream, "timeout") {
				upstream += "\n\t\ttimeout 10s"
			}
			startCaddy(t, opsSite(up.endpoint(), nil, upstream, ""))

			status, hdr, body := do(t, http.MethodPost, "/v1/chat/completions", chatJSON("retry me", 41, ""))
			if status != tc.status {
				t.Fatalf("status %d, want %d: %s", status, tc.status, body)
			}
			if tc.code != "" {
				if e := apiErr(t, body); e.Code != tc.code {
					t.Errorf("error code %q, want %q", e.Code, tc.code)
				}
			}
			if tc.retryAftr != "" && hdr.Get("Retry-After") != tc.retryAftr {
				t.Errorf("Retry-After %q, want %q", hdr.Get("Retry-After"), tc.retryAftr)
			}
			if n := len(up.Calls()); n != tc.calls {
				t.Errorf("%d upstream attempts, want %d", n, tc.calls)
			}
		})
	}
}

// TestOpsRetriesStayWithinTimeout: retries and their backoff (250 ms,
// 500 ms, 1 s, … each ±50%) fit inside the one overall timeout: with
// retries 10 and timeout 2s an upstream that always answers 503 is tried
// three to five times (at least two on a slow machine), never eleven, and
// the client gets the upstream's failure.
func TestOpsRetriesStayWithinTimeout(t *testing.T) {
	up := newFakeUpstream(t)
	up.setHandler(failWith(503, `{"error":"down"}`))
	startCaddy(t, opsSite(up.endpoint(), nil, "timeout 2s\n\t\tretries 10", ""))
	status, _, body := do(t, http.MethodPost, "/v1/chat/completions", chatJSON("retry within the timeout", 45, ""))
	if status != http.StatusBadGateway && status != http.StatusGatewayTimeout {
		t.Fatalf("status %d, want 502 or 504: %s", status, body)
	}
	if n := len(up.Calls()); n < 2 || n > 5 {
		t.Errorf("%d attempts within 2s, want 2 to 5", n)
	}
}

// TestOpsRetriesRefusedConnection: a refused connection is retried: with
// retries 2 there are three attempts, each counted as a "refused" upstream
// error and the first two logged as retried, then 502.
func TestOpsRetriesRefusedConnection(t *testing.T) {
	startCaddy(t, opsSite(closedURL(t), nil, "timeout 10s\n\t\tretries 2", "")+"\nmetrics /metrics")
	mark := markLog(t)
	before := scrape(t)
	status, _, body := do(t, http.MethodPost, "/v1/chat/completions", chatJSON("nobody home", 51, ""))
	if status != http.StatusBadGateway {
		t.Fatalf("status %d, want 502: %s", status, body)
	}
	after := scrape(t)
	if d := after.delta(before, "caddy_zimage_upstream_errors_total", "kind", "refused"); d != 3 {
		t.Errorf("refused errors counted: %v, want 3 (one per attempt)", d)
	}
	retried := mark.find(t, "image service call failed; retrying", func(l map[string]any) bool { return l["kind"] == "refused" })
	final := mark.find(t, "generation", withSeed(51))
	if len(retried) != 2 || len(final) != 1 || final[0]["failure"] != "refused" || final[0]["status"] != float64(502) {
		t.Errorf("want two retry warnings and one generation line with failure refused; got %d and %v", len(retried), final)
	}
}
