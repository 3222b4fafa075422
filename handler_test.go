package zimage

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"
)

func TestUnitParseRoute(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		path string
		want route
		id   string
	}{
		{"/v1/models", routeModels, ""},
		{"/models", routeModels, ""},
		{"/v1/models/", routeModels, ""},
		{"/v1/models/Z-Image", routeModel, "Z-Image"},
		{"/models/dall-e-3", routeModel, "dall-e-3"},
		{"/v1/chat/completions", routeChat, ""},
		{"/chat/completions", routeChat, ""},
		{"/v1//chat/completions", routeChat, ""},
		{"//v1///images/generations", routeImages, ""},
		{"/images/generations", routeImages, ""},
		{"/v1/zimage-demo/64x64.png", routeDemoImage, "64x64.png"},
		{"/v1/embeddings", routeUnknown, ""},
		{"/v1", routeUnknown, ""},
		{"/v1beta/models", routeNone, ""},
		{"/", routeNone, ""},
		{"/index.html", routeNone, ""},
		{"/api/chat/completions", routeNone, ""},
	} {
		got, id := parseRoute(tc.path)
		if got != tc.want || id != tc.id {
			t.Errorf("parseRoute(%q) = %d, %q; want %d, %q", tc.path, got, id, tc.want, tc.id)
		}
	}
}

// TestHandlerNoAuthCrossSite: with no_auth, a JSON endpoint refuses the
// body types a browser sends from any page without a preflight; with keys
// every type is accepted as before.
func TestHandlerNoAuthCrossSite(t *testing.T) {
	up := newFakeUpstream(t)
	body := `{"prompt":"a cat"}`
	for _, tc := range []struct {
		name, ct string
		noAuth   bool
		want     int
	}{
		{"no_auth text/plain", "text/plain;charset=UTF-8", true, http.StatusUnsupportedMediaType},
		{"no_auth form", "application/x-www-form-urlencoded", true, http.StatusUnsupportedMediaType},
		{"no_auth multipart", "multipart/form-data; boundary=x", true, http.StatusUnsupportedMediaType},
		{"no_auth no type", "", true, http.StatusUnsupportedMediaType},
		{"no_auth json", "application/json", true, http.StatusOK},
		{"no_auth json charset", "application/json; charset=utf-8", true, http.StatusOK},
		{"keys text/plain", "text/plain", false, http.StatusOK},
		{"keys no type", "", false, http.StatusOK},
	} {
		t.Run(tc.name, func(t *testing.T) {
			site := gatewaySite(up, nil, "")
			if tc.noAuth {
				site = strings.Replace(site, "api_key "+testClientKey, "no_auth", 1)
			}
			startCaddy(t, site)
			for _, path := range []string{"/v1/chat/completions", "/v1/images/generations"} {
				req, _ := http.NewRequest(http.MethodPost, baseURL+path, strings.NewReader(body))
				if tc.ct != "" {
					req.Header.Set("Content-Type", tc.ct)
				}
				if !tc.noAuth {
					req.Header.Set("Authorization", "Bearer "+testClientKey)
				}
				resp, err := testClient(10 * time.Second).Do(req)
				if err != nil {
					t.Fatal(err)
				}
				raw, _ := io.ReadAll(resp.Body)
				resp.Body.Close()
				if resp.StatusCode != tc.want {
					t.Fatalf("%s: status %d, want %d: %s", path, resp.StatusCode, tc.want, raw)
				}
				if tc.want == http.StatusUnsupportedMediaType {
					if e := apiErr(t, raw); e.Code != "unsupported_media_type" || !strings.Contains(e.Message, "application/json") {
						t.Errorf("error %+v", e)
					}
				}
			}
		})
	}
}

// TestHandlerServerTimeouts: the server timeouts the README recommends
// (here scaled down to 1s) cut a body sent a byte at a time, and do not
// cut a generation that takes longer than they do, streamed or not: Go
// lifts the read deadline once the body is read.
func TestHandlerServerTimeouts(t *testing.T) {
	up := newFakeUpstream(t)
	slow := make(chan struct{})
	up.setHandler(func(w http.ResponseWriter, r *http.Request) {
		select { // a generation that outlasts read_body
		case <-time.After(1500 * time.Millisecond):
		case <-slow:
		}
		writeUpstreamOK(w, "https://img.example.com/1.png")
	})
	timeouts := "grace_period 1ns\n\tservers {\n\t\ttimeouts {\n\t\t\tread_header 1s\n\t\t\tread_body 1s\n\t\t}\n\t}"
	startCaddyRaw(t, fmt.Sprintf("%s\n:%d {\n%s\n}\n", strings.Replace(globals(), "grace_period 1ns", timeouts, 1), httpPort, gatewaySite(up, nil, "")))

	for _, body := range []string{`{"prompt":"a cat"}`, `{"prompt":"a cat","stream":true}`} {
		status, _, raw := do(t, http.MethodPost, "/v1/chat/completions", body)
		if status != http.StatusOK || !strings.Contains(string(raw), "img.example.com/1.png") {
			t.Fatalf("%s: status %d: %s", body, status, raw)
		}
	}
	calls := len(up.Calls())

	// a body of 100 bytes sent one byte every 100ms would take 10s
	conn, err := net.Dial("tcp", fmt.Sprintf("127.0.0.1:%d", httpPort))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	start := time.Now()
	fmt.Fprintf(conn, "POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer %s\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n", testClientKey)
	closed := make(chan struct{})
	go func() {
		defer close(closed)
		io.Copy(io.Discard, conn) // until the server answers and closes
	}()
	for i := 0; ; i++ {
		select {
		case <-closed:
		case <-time.After(100 * time.Millisecond):
			if i < 100 {
				conn.Write([]byte{' '})
				continue
			}
		}
		break
	}
	if elapsed := time.Since(start); elapsed > 5*time.Second {
		t.Errorf("a body trickling for 10s held the connection %v with read_body 1s", elapsed)
	}
	close(slow)
	if n := len(up.Calls()); n != calls {
		t.Errorf("the trickled request reached the image service")
	}
}

func TestIntegPreflight(t *testing.T) {
	up := newFakeUpstream(t)
	site := "header Access-Control-Allow-Origin *\n" + itSite(up, itConfig{})
	startCaddy(t, site)
	for _, path := range []string{"/v1/chat/completions", "/chat/completions", "/v1/models", "/models/Z-Image", "/v1/images/generations"} {
		t.Run(path, func(t *testing.T) {
			status, hdr, body := do(t, http.MethodOptions, path, "", "Authorization", "")
			if status != http.StatusNoContent || len(body) != 0 {
				t.Fatalf("status %d body %q, want 204 and no body without auth", status, body)
			}
			if got := hdr.Get("Access-Control-Allow-Origin"); got != "*" {
				t.Errorf("CORS header from the Caddyfile missing: %q", got)
			}
		})
	}
	if n := len(up.Calls()); n != 0 {
		t.Errorf("preflight called the upstream %d times", n)
	}
}

func TestIntegFallthrough(t *testing.T) {
	up := newFakeUpstream(t)
	startCaddy(t, itSite(up, itConfig{after: `respond "next" 200`}))
	for _, tc := range []struct{ method, path string }{
		{http.MethodGet, "/index.html"},
		{http.MethodGet, "/"},
		{http.MethodPost, "/v1beta/x"},
		{http.MethodGet, "/v1models"},
		{http.MethodGet, "/v2/models"},
		{http.MethodGet, "/assets/v1/models"},
	} {
		t.Run(tc.method+" "+tc.path, func(t *testing.T) {
			// no key: a path that is not the gateway's is not its business
			status, _, body := do(t, tc.method, tc.path, "", "Authorization", "")
			if status != http.StatusOK || string(body) != "next" {
				t.Fatalf("status %d body %q, want the next handler's 200 \"next\"", status, body)
			}
		})
	}
}

func TestIntegUnknownPath(t *testing.T) {
	up := newFakeUpstream(t)
	startCaddy(t, itSite(up, itConfig{after: `respond "next" 200`}))
	for _, path := range []string{"/v1/foo", "/v1/", "/v1/chat", "/v1/images/variations", "/v1/zimage-demo/64x64.png"} {
		t.Run(path, func(t *testing.T) {
			status, hdr, body := do(t, http.MethodGet, path, "")
			e := itWantErr(t, status, hdr, body, http.StatusNotFound, "not_found")
			if e.Type != "invalid_request_error" {
				t.Errorf("type %q", e.Type)
			}
		})
	}
}

func TestIntegMethodNotAllowed(t *testing.T) {
	up := newFakeUpstream(t)
	startCaddy(t, itSite(up, itConfig{}))
	// a 405 says in its Allow header what the path answers (RFC 9110 §15.5.6)
	for _, tc := range []struct{ method, path, allow string }{
		{http.MethodGet, "/v1/chat/completions", "POST"},
		{http.MethodPut, "/chat/completions", "POST"},
		{http.MethodPost, "/v1/models", "GET"},
		{http.MethodDelete, "/v1/models/Z-Image", "GET"},
		{http.MethodGet, "/v1/images/generations", "POST"},
		{http.MethodGet, "/v1/images/edits", "POST"},
		{http.MethodGet, "/v1/responses", "POST"},
		{http.MethodPut, "/v1/responses/resp_x", "GET, DELETE"},
	} {
		t.Run(tc.method+" "+tc.path, func(t *testing.T) {
			status, hdr, body := do(t, tc.method, tc.path, "")
			itWantErr(t, status, hdr, body, http.StatusMethodNotAllowed, "method_not_allowed")
			if got := hdr.Get("Allow"); got != tc.allow {
				t.Errorf("Allow %q, want %q", got, tc.allow)
			}
		})
	}
	if n := len(up.Calls()); n != 0 {
		t.Errorf("upstream called %d times", n)
	}
}

func TestIntegBodyLimit(t *testing.T) {
	for _, tc := range []struct {
		name  string
		extra string
		limit int
	}{
		{"default 1MiB", "", 1 << 20},
		{"max_body 1KiB", "max_body 1KiB", 1 << 10},
	} {
		t.Run(tc.name, func(t *testing.T) {
			up := newFakeUpstream(t)
			startCaddy(t, itSite(up, itConfig{gateway: tc.extra}))
			// a valid body padded with trailing whitespace to an exact size
			obj := `{"messages":[{"role":"user","content":"a cat"}]}`
			atLimit := obj + strings.Repeat(" ", tc.limit-len(obj))
			if status, _, body := itPost(t, atLimit); status != http.StatusOK {
				t.Fatalf("a body of exactly the limit: status %d: %s", status, body)
			}
			status, hdr, body := itPost(t, atLimit+" ")
			e := itWantErr(t, status, hdr, body, http.StatusRequestEntityTooLarge, "request_too_large")
			if e.Type != "invalid_request_error" {
				t.Errorf("type %q", e.Type)
			}
			if n := len(up.Calls()); n != 1 {
				t.Errorf("upstream received %d calls, want 1 (none for the oversized body)", n)
			}
		})
	}
}

func TestIntegBadRequest(t *testing.T) {
	up := newFakeUpstream(t)
	startCaddy(t, itSite(up, itConfig{}))
	for _, tc := range []struct{ name, body string }{
		{"malformed JSON", `{"messages":[{"role":"user","content":"a cat"}`},
		{"not JSON", `model=Z-Image&prompt=cat`},
		{"empty body", ``},
		{"array", `[{"role":"user","content":"a cat"}]`},
		{"messages not a list", `{"messages":"a cat"}`},
		{"content a number", `{"messages":[{"role":"user","content":42}]}`},
		{"seed not an integer", `{"messages":[{"role":"user","content":"a cat"}],"seed":"abc"}`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			status, hdr, body := itPost(t, tc.body)
			e := itWantErr(t, status, hdr, body, http.StatusBadRequest, "invalid_request")
			if e.Type != "invalid_request_error" {
				t.Errorf("type %q", e.Type)
			}
		})
	}
	if n := len(up.Calls()); n != 0 {
		t.Errorf("upstream called %d times for bad requests", n)
	}
}

// TestFaultSlowClientBody: a client that sends its body a few bytes at a
// time, with pauses, is served as usual: the gateway reads the whole body,
// however it arrives.
func TestFaultSlowClientBody(t *testing.T) {
	up := newFakeUpstream(t)
	startCaddy(t, itSite(up, itConfig{}))
	for _, tc := range []struct {
		name, path, body string
	}{
		{"chat", "/v1/chat/completions", `{"model":"Z-Image","messages":[{"role":"user","content":"a slow cat on a slow roof"}]}`},
		{"images", "/v1/images/generations", `{"model":"Z-Image","prompt":"a slow cat on a slow roof","size":"512x512"}`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			before := len(up.Calls())
			pr, pw := io.Pipe()
			go func() {
				for i := 0; i < len(tc.body); i += 7 {
					// a client on a bad line: the pauses are the fault
					time.Sleep(15 * time.Millisecond)
					if _, err := io.WriteString(pw, tc.body[i:min(i+7, len(tc.body))]); err != nil {
						return
					}
				}
				pw.Close()
			}()
			req, err := http.NewRequest(http.MethodPost, baseURL+tc.path, pr)
			if err != nil {
				t.Fatal(err)
			}
			req.Header.Set("Authorization", "Bearer "+testClientKey)
			req.Header.Set("Content-Type", "application/json")
			resp, err := testClient(faultWait).Do(req)
			if err != nil {
				t.Fatal(err)
			}
			defer resp.Body.Close()
			body, err := io.ReadAll(resp.Body)
			if err != nil || resp.StatusCode != http.StatusOK {
				t.Fatalf("status %d, %v: %s", resp.StatusCode, err, body)
			}
			if tc.path == "/v1/chat/completions" {
				chatContent(t, body)
			} else {
				parseImages(t, body)
			}
			c := itOnlyCall(t, up, before)
			if c.Body.Prompt != "a slow cat on a slow roof" {
				t.Errorf("upstream prompt %q", c.Body.Prompt)
			}
		})
	}
}

// faultCounter reads one series of caddy_zimage_requests_total.
func faultCounter(t *testing.T, endpoint, model, code string) float64 {
	t.Helper()
	var m dto.Metric
	if err := metricRequests.WithLabelValues(endpoint, model, code).Write(&m); err != nil {
		t.Fatal(err)
	}
	return m.GetCounter().GetValue()
}

// TestFaultClientGoneMidBody: a client that declares 1000 bytes, sends 10
// and hangs up (or half-closes, and waits for the answer). The gateway
// answers 400 to whoever still listens, never calls the image service, and
// nothing panics.
func TestFaultClientGoneMidBody(t *testing.T) {
	up := newFakeUpstream(t)
	mark := faultLogMark(t)
	startCaddy(t, itSite(up, itConfig{}))
	for _, tc := range []struct {
		name      string
		halfClose bool
	}{
		{"closed", false},
		{"half-closed", true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			before := faultCounter(t, endpointChat, "", "400")
			conn, err := net.Dial("tcp", fmt.Sprintf("127.0.0.1:%d", httpPort))
			if err != nil {
				t.Fatal(err)
			}
			defer conn.Close()
			partial := `{"prompt":` // 10 of the 1000 bytes announced
			_, err = fmt.Fprintf(conn, "POST /v1/chat/completions HTTP/1.1\r\nHost: localhost:%d\r\nAuthorization: Bearer %s\r\n"+
				"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n%s", httpPort, testClientKey, partial)
			if err != nil {
				t.Fatal(err)
			}
			if tc.halfClose {
				if err := conn.(*net.TCPConn).CloseWrite(); err != nil {
					t.Fatal(err)
				}
				_ = conn.SetReadDeadline(time.Now().Add(faultWait))
				resp, err := http.ReadResponse(bufio.NewReader(conn), nil)
				if err != nil {
					t.Fatalf("no answer after half-closing: %v", err)
				}
				body, _ := io.ReadAll(resp.Body)
				resp.Body.Close()
				seen.Lock()
				seen.Write(body) // for the suite-wide secret scan
				seen.Unlock()
				itWantErr(t, resp.StatusCode, resp.Header, body, http.StatusBadRequest, "invalid_request")
			} else {
				conn.Close()
			}
			// the handler has finished once it has counted its answer
			deadline := time.Now().Add(faultWait)
			for faultCounter(t, endpointChat, "", "400") < before+1 {
				if time.Now().After(deadline) {
					t.Fatal("the gateway never finished the request whose client left")
				}
				time.Sleep(10 * time.Millisecond)
			}
		})
	}
	if n := len(up.Calls()); n != 0 {
		t.Errorf("the image service was called %d times for truncated bodies", n)
	}
	faultNoPanic(t, mark)
}
