package zimage

import (
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"
)

func TestUnitParseRoute(t *testing.T) {
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
