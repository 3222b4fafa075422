package main

import (
	"context"
	"encoding/json"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"
)

// TestServers drives both servers with Go's HTTP client, the one the gateway
// uses, in the request framings it may send.
func TestServers(t *testing.T) {
	f := &fake{llmBody: []byte(`{"choices":[{"message":{"content":"x"}}]}`)}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go serveRaw(ln, f)
	defer ln.Close()
	goSrv := httptest.NewServer(f)
	defer goSrv.Close()

	for _, base := range []string{"http://" + ln.Addr().String(), goSrv.URL} {
		tr := &http.Transport{ExpectContinueTimeout: 5 * time.Second}
		client := &http.Client{Transport: tr, Timeout: 5 * time.Second}
		for _, tc := range []struct {
			name, method, path string
			body               io.Reader
			header             http.Header
			status             int
			contains           string
		}{
			{"image", "POST", "/api/v1/generate_image", strings.NewReader(`{"prompt":"a"}`), nil, 200, "img.example/x.png"},
			// io.MultiReader hides the length: Go sends the body chunked
			{"image chunked", "POST", "/api/v1/generate_image", io.MultiReader(strings.NewReader(strings.Repeat("p", 9000))), nil, 200, `"success":true`},
			{"expect continue", "POST", "/api/v1/generate_image", strings.NewReader(`{}`), http.Header{"Expect": {"100-continue"}}, 200, "image_url"},
			{"llm", "POST", "/v1/chat/completions", strings.NewReader(`{"messages":[]}`), nil, 200, "choices"},
			{"llm with query", "POST", "/v1/chat/completions?x=1", strings.NewReader(`{}`), nil, 200, "choices"},
			{"stats", "GET", "/stats", nil, nil, 200, `"max_in_flight":`},
			{"unknown", "GET", "/nope", nil, nil, 404, "no such endpoint"},
		} {
			t.Run(base+" "+tc.name, func(t *testing.T) {
				req, err := http.NewRequest(tc.method, base+tc.path, tc.body)
				if err != nil {
					t.Fatal(err)
				}
				for k, v := range tc.header {
					req.Header[k] = v
				}
				resp, err := client.Do(req)
				if err != nil {
					t.Fatal(err)
				}
				b, err := io.ReadAll(resp.Body)
				resp.Body.Close()
				if err != nil {
					t.Fatal(err)
				}
				if resp.StatusCode != tc.status || !strings.Contains(string(b), tc.contains) {
					t.Fatalf("got %d %q, want %d containing %q", resp.StatusCode, b, tc.status, tc.contains)
				}
				if ct := resp.Header.Get("Content-Type"); ct != "application/json" {
					t.Fatalf("Content-Type %q", ct)
				}
			})
		}
		tr.CloseIdleConnections()
	}

	// the counters saw both servers' calls; a reset starts them again
	resp, err := http.Get(goSrv.URL + "/stats")
	if err != nil {
		t.Fatal(err)
	}
	var st struct{ Image, LLM, Other int }
	err = json.NewDecoder(resp.Body).Decode(&st)
	resp.Body.Close()
	if err != nil {
		t.Fatal(err)
	}
	if st.Image != 6 || st.LLM != 4 || st.Other != 2 {
		t.Fatalf("stats %+v, want image 6, llm 4, other 2", st)
	}
}

// TestRawKeepAlive checks that the raw server answers many requests on one
// connection (the benchmark's closed loop depends on it).
func TestRawKeepAlive(t *testing.T) {
	f := &fake{llmBody: []byte(`{}`)}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go serveRaw(ln, f)
	defer ln.Close()
	var dials int
	tr := &http.Transport{DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
		dials++
		return (&net.Dialer{}).DialContext(ctx, network, addr)
	}}
	defer tr.CloseIdleConnections()
	for range 20 {
		resp, err := (&http.Client{Transport: tr}).Post("http://"+ln.Addr().String()+"/api/v1/generate_image", "application/json", strings.NewReader(`{}`))
		if err != nil {
			t.Fatal(err)
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
	}
	if dials != 1 {
		t.Fatalf("%d connections for 20 sequential requests, want 1", dials)
	}
}
