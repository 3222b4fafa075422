package zimage

// The image store through a real Caddy (docs/design.md#the-store): images put into
// the configured storage are served at /v1/zimage/images/ and
// /zimage/images/ without auth, with the headers, 304, Range, and the
// envelope for errors; malformed ids never reach the storage; the served
// metric moves by exactly what was asked.

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/certmagic"
)

// storeSite is a gateway site whose store is a file_system storage at dir,
// with Caddy's metrics handler at /metrics.
func storeSite(t *testing.T, dir, extra string) {
	t.Helper()
	up := newFakeUpstream(t)
	startCaddy(t, gatewaySite(up, nil, fmt.Sprintf("store {\n\t\tstorage file_system %s\n\t\tmax_age 0\n\t}\n\t%s", dir, extra))+"\nmetrics /metrics")
}

// putDirect puts data into the store at root as the gateway's copy step
// will, and returns the image's name.
func putDirect(t *testing.T, root string, data []byte) string {
	t.Helper()
	st := newImageStore(&certmagic.FileStorage{Path: root}, defaultStorePrefix, 0, defaultStoreMaxSize, "", nil)
	name, _, err := st.put(context.Background(), data)
	if err != nil {
		t.Fatal(err)
	}
	return name
}

// rawGet sends a request line as written (no client-side path cleaning or
// escaping) and returns the status and body.
func rawGet(t *testing.T, target string) (int, []byte) {
	t.Helper()
	conn, err := net.DialTimeout("tcp", fmt.Sprintf("127.0.0.1:%d", httpPort), 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(10 * time.Second))
	fmt.Fprintf(conn, "GET %s HTTP/1.1\r\nHost: localhost:%d\r\nConnection: close\r\n\r\n", target, httpPort)
	resp, err := http.ReadResponse(bufio.NewReader(conn), nil)
	if err != nil {
		t.Fatalf("GET %q: %v", target, err)
	}
	defer resp.Body.Close()
	var b bytes.Buffer
	_, _ = b.ReadFrom(resp.Body)
	seen.Lock()
	seen.Write(b.Bytes())
	seen.Unlock()
	return resp.StatusCode, b.Bytes()
}

func TestStoreServe(t *testing.T) {
	dir := t.TempDir()
	storeSite(t, dir, "")
	img := storeTestPNG(t, 64, 48)
	name := putDirect(t, dir, img)
	id := strings.TrimSuffix(name, ".png")
	etag := `"` + id + `"`
	// a PNG beside the store's directory, which a traversal would reach
	secret := storeTestPNG(t, 4, 4)
	if err := os.WriteFile(filepath.Join(dir, "zimage", "secret.png"), secret, 0o600); err != nil {
		t.Fatal(err)
	}
	before := scrape(t)
	noAuth := []string{"Authorization", ""}

	for _, p := range []string{"/v1/zimage/images/" + name, "/zimage/images/" + name} {
		status, h, body := do(t, http.MethodGet, p, "", noAuth...)
		if status != 200 || !bytes.Equal(body, img) {
			t.Fatalf("GET %s without a key: %d, %d bytes; want 200 and the image", p, status, len(body))
		}
		h.Del("Date")
		want := http.Header{
			"Accept-Ranges":          {"bytes"},
			"Cache-Control":          {"public, max-age=31536000, immutable"},
			"Content-Length":         {strconv.Itoa(len(img))},
			"Content-Type":           {"image/png"},
			"Etag":                   {etag},
			"Server":                 {"Caddy"},
			"X-Content-Type-Options": {"nosniff"},
		}
		if fmt.Sprint(h) != fmt.Sprint(want) {
			t.Errorf("GET %s headers\n got %v\nwant %v", p, h, want)
		}
	}
	// a key, right or wrong, changes nothing
	if status, _, body := do(t, http.MethodGet, "/v1/zimage/images/"+name, "", "Authorization", "Bearer wrong"); status != 200 || !bytes.Equal(body, img) {
		t.Errorf("GET with a wrong key: %d", status)
	}

	status, h, body := do(t, http.MethodHead, "/v1/zimage/images/"+name, "", noAuth...)
	if status != 200 || len(body) != 0 || h.Get("Content-Length") != strconv.Itoa(len(img)) || h.Get("Content-Type") != "image/png" {
		t.Errorf("HEAD: %d, %d body bytes, %v", status, len(body), h)
	}
	status, h, body = do(t, http.MethodGet, "/v1/zimage/images/"+name, "", "Authorization", "", "If-None-Match", etag)
	if status != 304 || len(body) != 0 || h.Get("Etag") != etag || h.Get("Cache-Control") != storeCacheControl {
		t.Errorf("If-None-Match: %d, %d body bytes, %v", status, len(body), h)
	}
	status, h, body = do(t, http.MethodGet, "/zimage/images/"+name, "", "Authorization", "", "Range", "bytes=100-199")
	if status != 206 || !bytes.Equal(body, img[100:200]) || h.Get("Content-Range") != fmt.Sprintf("bytes 100-199/%d", len(img)) || h.Get("Content-Length") != "100" {
		t.Errorf("Range: %d, %d bytes, %v", status, len(body), h)
	}
	status, _, body = do(t, http.MethodGet, "/v1/zimage/images/"+name, "", "Authorization", "", "Range", fmt.Sprintf("bytes=%d-", len(img)))
	if status != 416 || apiErr(t, body).Code != "range_not_satisfiable" {
		t.Errorf("Range past the end: %d %s", status, body)
	}

	// malformed or unknown: 404 in the envelope, the same for every shape
	notFound := []string{
		"/v1/zimage/images/" + storeTestID + ".png", // well formed, not stored
		"/v1/zimage/images/" + strings.ToUpper(id) + ".png",
		"/v1/zimage/images/" + id + ".PNG",
		"/v1/zimage/images/" + id + ".jpeg",
		"/v1/zimage/images/" + id + ".jpg", // right id, wrong format
		"/v1/zimage/images/" + id,
		"/v1/zimage/images/" + id[1:] + ".png",
		"/v1/zimage/images/" + id + "0.png",
		"/v1/zimage/images/" + name + "/",
		"/v1/zimage/images/" + name + "%00",
		"/v1/zimage/images/" + id + "%00.png",
		"/v1/zimage/images/..%2Fsecret.png",
		"/v1/zimage/images/%2e%2e%2fsecret.png",
		"/zimage/images/..%2f..%2fzimage%2fsecret.png",
		"/v1/zimage/images/" + strings.Repeat("a", 8000) + ".png",
		"/v1/zimage/images/",
	}
	for _, p := range notFound {
		status, h, body := do(t, http.MethodGet, p, "", noAuth...)
		if status != 404 || apiErr(t, body).Code != "not_found" || h.Get("Content-Type") != "application/json" || h.Get("Cache-Control") != "" {
			t.Errorf("GET %.80s: %d %v %s", p, status, h, body)
		}
		if bytes.Contains(body, secret) {
			t.Errorf("GET %.80s answered the file beside the store", p)
		}
	}
	// a traversal as the client wrote it, not cleaned on the way (Caddy
	// passes the path on as it came)
	traversals := []string{"/v1/zimage/images/../secret.png", "/zimage/images/../../zimage/secret.png"}
	for _, target := range traversals {
		status, body := rawGet(t, target)
		if status != 404 || bytes.Contains(body, secret) || apiErr(t, body).Code != "not_found" {
			t.Errorf("GET %s: %d %s", target, status, body)
		}
	}

	for _, m := range []string{http.MethodPost, http.MethodPut, http.MethodDelete} {
		status, h, body := do(t, m, "/v1/zimage/images/"+name, `{}`, noAuth...)
		if status != 405 || apiErr(t, body).Code != "method_not_allowed" || h.Get("Allow") != "GET, HEAD" {
			t.Errorf("%s: %d %v %s", m, status, h, body)
		}
	}
	if !putDirectExists(dir, name) {
		t.Fatal("a DELETE removed the image")
	}

	after := scrape(t)
	// three GETs and a HEAD; 304; 206; 416; the 404s; three 405s
	for _, tc := range []struct {
		code string
		want float64
	}{
		{"200", 4}, {"304", 1}, {"206", 1}, {"416", 1}, {"404", float64(len(notFound) + len(traversals))}, {"405", 3},
	} {
		if d := after.delta(before, "caddy_zimage_store_served_total", "code", tc.code); d != tc.want {
			t.Errorf("store_served_total{code=%s} grew by %v, want %v", tc.code, d, tc.want)
		}
	}
	if typ := after.types["caddy_zimage_store_served_total"]; typ != "counter" {
		t.Errorf("store_served_total has type %q", typ)
	}
	for _, name := range []string{"caddy_zimage_store_images_total", "caddy_zimage_store_deleted_total"} {
		if after.types[name] != "counter" {
			t.Errorf("%s is not registered as a counter (type %q)", name, after.types[name])
		}
	}
}

func putDirectExists(root, name string) bool {
	_, err := os.Stat(filepath.Join(root, "zimage", "images", name))
	return err == nil
}

// With the store off the path is what it was: under /v1 an
// unknown API path (after auth), without /v1 the site's own.
func TestStoreOffPaths(t *testing.T) {
	up := newFakeUpstream(t)
	startCaddy(t, gatewaySite(up, nil, "")+"\nrespond \"the site\" 200")
	name := storeTestID + ".png"
	if status, _, body := do(t, http.MethodGet, "/v1/zimage/images/"+name, ""); status != 404 || apiErr(t, body).Code != "not_found" ||
		!strings.Contains(apiErr(t, body).Message, "Unknown API path") {
		t.Errorf("store off, /v1 path: %d %s", status, body)
	}
	if status, _, body := do(t, http.MethodGet, "/v1/zimage/images/"+name, "", "Authorization", ""); status != 401 {
		t.Errorf("store off, /v1 path without a key: %d %s, want 401 as for any API path", status, body)
	}
	if status, _, body := do(t, http.MethodGet, "/zimage/images/"+name, ""); status != 200 || string(body) != "the site" {
		t.Errorf("store off, path without /v1: %d %q, want the next handler's answer", status, body)
	}
}

// Without a storage of its own the store uses Caddy's (the
// global storage option), and a store off (`store off`) serves nothing.
func TestStoreDefaultStorage(t *testing.T) {
	dir := t.TempDir()
	up := newFakeUpstream(t)
	cfg := strings.Replace(globals(), "skip_install_trust", "skip_install_trust\n\tstorage file_system "+dir, 1)
	startCaddyRaw(t, fmt.Sprintf("%s\n:%d {\n%s\n}\n", cfg, httpPort, gatewaySite(up, nil, "store")))
	img := storeTestPNG(t, 8, 8)
	name := putDirect(t, dir, img)
	if status, _, body := do(t, http.MethodGet, "/v1/zimage/images/"+name, "", "Authorization", ""); status != 200 || !bytes.Equal(body, img) {
		t.Errorf("image in Caddy's own storage: %d, %d bytes", status, len(body))
	}

	startCaddyRaw(t, fmt.Sprintf("%s\n:%d {\n%s\n}\n", cfg, httpPort, gatewaySite(up, nil, "store off")))
	if status, _, body := do(t, http.MethodGet, "/v1/zimage/images/"+name, ""); status != 404 || !strings.Contains(apiErr(t, body).Message, "Unknown API path") {
		t.Errorf("store off: %d %s", status, body)
	}
}

// The demo's image URLs (and the store's) carry the origin the
// client saw: X-Forwarded-Proto/-Host from a trusted proxy, and from no
// one else.
func TestStoreRequestOriginTrustedProxy(t *testing.T) {
	chat := func(t *testing.T) string {
		t.Helper()
		status, _, body := do(t, http.MethodPost, "/v1/chat/completions", `{"prompt":"a cat no-enhance"}`,
			"X-Forwarded-Proto", "https", "X-Forwarded-Host", "chat.example.com")
		if status != 200 {
			t.Fatalf("chat: %d %s", status, body)
		}
		return chatContent(t, body)
	}
	site := opsSite("demo", nil, "", "")
	startCaddy(t, site)
	if md, want := chat(t), fmt.Sprintf("](http://localhost:%d%s", httpPort, demoPath); !strings.Contains(md, want) {
		t.Errorf("untrusted proxy headers were honoured: %q, want %q", md, want)
	}

	cfg := strings.Replace(globals(), "skip_install_trust", "skip_install_trust\n\tservers {\n\t\ttrusted_proxies static 127.0.0.1/8 ::1/128\n\t}", 1)
	startCaddyRaw(t, fmt.Sprintf("%s\n:%d {\n%s\n}\n", cfg, httpPort, site))
	if md, want := chat(t), "](https://chat.example.com"+demoPath; !strings.Contains(md, want) {
		t.Errorf("trusted proxy headers were ignored: %q, want %q", md, want)
	}
}

// TestStoreRangeLikeFileServer pins the store's answers to edge-case Range
// headers to those of Caddy's own file_server for the same file on the same
// site. Both hand the request to the standard library's
// http.ServeContent, which answers `bytes=-0` (a suffix of zero bytes) 206
// with an empty body and Content-Range "bytes N-(N-1)/N", where RFC 9110
// §14.1.1 calls it unsatisfiable (416). The store keeps Caddy's behaviour;
// this test fails when either side changes, so the two never drift apart.
func TestStoreRangeLikeFileServer(t *testing.T) {
	dir := t.TempDir()
	img := storeTestPNG(t, 16, 16)
	name := putDirect(t, dir, img)
	up := newFakeUpstream(t)
	startCaddy(t, gatewaySite(up, nil, fmt.Sprintf("store {\n\t\tstorage file_system %s\n\t\tmax_age 0\n\t}", dir))+
		fmt.Sprintf("\nhandle_path /files/* {\n\troot * %s\n\tfile_server\n}", filepath.Join(dir, "zimage", "images")))
	type answer struct {
		status        int
		contentRange  string
		contentLength string
		body          int
	}
	get := func(path, rng string) answer {
		status, h, body := do(t, http.MethodGet, path, "", "Authorization", "", "Range", rng)
		return answer{status, h.Get("Content-Range"), h.Get("Content-Length"), len(body)}
	}
	n := len(img)
	for _, tc := range []struct {
		rng  string
		want answer // what both answer today
	}{
		{"bytes=-0", answer{206, fmt.Sprintf("bytes %d-%d/%d", n, n-1, n), "0", 0}},
		{"bytes=-1", answer{206, fmt.Sprintf("bytes %d-%d/%d", n-1, n-1, n), "1", 1}},
		{"bytes=0-0", answer{206, fmt.Sprintf("bytes 0-0/%d", n), "1", 1}},
		{fmt.Sprintf("bytes=-%d", n+10), answer{206, fmt.Sprintf("bytes 0-%d/%d", n-1, n), strconv.Itoa(n), n}},
		{fmt.Sprintf("bytes=%d-", n), answer{416, fmt.Sprintf("bytes */%d", n), "", -1}},
	} {
		t.Run(tc.rng, func(t *testing.T) {
			store, files := get("/v1/zimage/images/"+name, tc.rng), get("/files/"+name, tc.rng)
			// the store's error bodies are the OpenAI envelope, file_server's
			// are empty: only statuses and headers are compared for errors
			if tc.want.body < 0 {
				store.body, files.body, store.contentLength, files.contentLength = -1, -1, "", ""
			}
			if store != files {
				t.Errorf("store %+v, file_server %+v", store, files)
			}
			if store != tc.want {
				t.Errorf("store %+v, want %+v", store, tc.want)
			}
		})
	}
}
