package main

import (
	"bufio"
	"bytes"
	"fmt"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"
)

// TestRawConn checks the minimal client against net/http's server in every
// framing it may answer with, and that it keeps its one connection.
func TestRawConn(t *testing.T) {
	var conns atomic.Int32
	srv := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Header.Get("Authorization") != "Bearer k" || r.Header.Get("Content-Type") != "application/json" {
			http.Error(w, "bad headers", http.StatusBadRequest)
			return
		}
		switch r.URL.Path {
		case "/length":
			w.Write([]byte("hello length"))
		case "/chunked":
			w.Write([]byte("hello "))
			w.(http.Flusher).Flush() // forces chunked framing
			w.Write([]byte(strings.Repeat("x", 40000)))
		case "/nocontent":
			w.WriteHeader(http.StatusNoContent)
		case "/close":
			w.Header().Set("Connection", "close")
			w.Write([]byte("bye"))
		case "/missing":
			http.NotFound(w, r)
		}
	}))
	srv.Config.ConnState = func(_ net.Conn, s http.ConnState) {
		if s == http.StateNew {
			conns.Add(1)
		}
	}
	srv.Start()
	defer srv.Close()

	for _, tc := range []struct {
		path     string
		status   int
		contains string
		newConns int32 // connections the three requests should open
	}{
		{"/length", 200, "hello length", 1},
		{"/chunked", 200, "hello xxx", 1},
		{"/nocontent", 204, "", 1},
		{"/close", 200, "bye", 3},
		{"/missing", 404, "not found", 1},
	} {
		t.Run(tc.path, func(t *testing.T) {
			c, err := newRawConn(config{
				url:    srv.URL + tc.path,
				method: http.MethodPost,
				body:   []byte(`{"a":1}`),
				header: http.Header{"Authorization": {"Bearer k"}},
			})
			if err != nil {
				t.Fatal(err)
			}
			defer c.close()
			before := conns.Load()
			for range 3 {
				status, err := c.roundTrip(true)
				if err != nil {
					t.Fatal(err)
				}
				if status != tc.status {
					t.Fatalf("status %d, want %d (body %q)", status, tc.status, c.body)
				}
				if !strings.Contains(string(c.body), tc.contains) {
					t.Fatalf("body %.60q lacks %q", c.body, tc.contains)
				}
			}
			if got := conns.Load() - before; got != tc.newConns {
				t.Fatalf("%d connections for 3 requests, want %d", got, tc.newConns)
			}
		})
	}
}

// TestRawConnDiscard checks that an unkept body is skipped, not lost in the
// stream: the next answer on the connection must still parse.
func TestRawConnDiscard(t *testing.T) {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		bw := bufio.NewWriter(w)
		bw.WriteString(strings.Repeat("y", 100000))
		bw.Flush()
	}))
	defer srv.Close()
	c, err := newRawConn(config{url: srv.URL, method: http.MethodGet, header: http.Header{}})
	if err != nil {
		t.Fatal(err)
	}
	defer c.close()
	for i := range 3 {
		status, err := c.roundTrip(i == 2)
		if err != nil || status != 200 {
			t.Fatalf("round %d: status %d, err %v", i, status, err)
		}
	}
	if len(c.body) != 100000 {
		t.Fatalf("kept body is %d bytes, want 100000", len(c.body))
	}

	// an image of megabytes with a Content-Length, discarded in big reads,
	// leaves the connection at the next answer
	img := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		n := 2 << 20
		if r.URL.Query().Get("small") != "" {
			n = 10
		}
		w.Header().Set("Content-Length", fmt.Sprint(n))
		w.Write(bytes.Repeat([]byte("z"), n))
	}))
	defer img.Close()
	big, err := newRawConn(config{url: img.URL, method: http.MethodGet, header: http.Header{}})
	if err != nil {
		t.Fatal(err)
	}
	defer big.close()
	for i := range 3 {
		if status, err := big.roundTrip(false); err != nil || status != 200 {
			t.Fatalf("big round %d: status %d, err %v", i, status, err)
		}
	}
	big.req = bytes.Replace(big.req, []byte("GET / "), []byte("GET /?small=1 "), 1)
	if status, err := big.roundTrip(true); err != nil || status != 200 || string(big.body) != "zzzzzzzzzz" {
		t.Fatalf("after the big bodies: status %d, err %v, body %q", status, err, big.body)
	}
}
