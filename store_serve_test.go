package zimage

// The image store through a real Caddy (docs/design.md#the-store): images put into
// the configured storage are served at /v1/zimage/images/ and
// /zimage/images/ without auth, with the headers, 304, Range, and the
// envelope for errors; malformed ids never reach the storage; the served
// metric moves by exactly what was asked. The unit tests below serve over
// both storage paths (file and generic) without Caddy.

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"reflect"
	"runtime"
	"strconv"
	"strings"
	"sync/atomic"
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

// hiddenStorage hides the concrete storage type, so a store over it takes
// the generic path (Load), as with Redis or S3 storage modules; it counts
// the calls that read images.
type hiddenStorage struct {
	certmagic.Storage
	loads atomic.Int32
}

func (h *hiddenStorage) Load(ctx context.Context, key string) ([]byte, error) {
	h.loads.Add(1)
	return h.Storage.Load(ctx, key)
}

// docs/design.md#the-store over both storage paths, without Caddy: status, headers, the
// 304 that needs no Load, Range, 404 and 405.
func TestUnitStoreServe(t *testing.T) {
	fileStore, fsto := newTestFileStore(t, 0)
	hidden := &hiddenStorage{Storage: fsto}
	generic := newImageStore(hidden, "zimage", 0, defaultStoreMaxSize, "", nil)
	if generic.files != nil {
		t.Fatal("a storage that is not *certmagic.FileStorage must not take the file path")
	}
	img := storeTestPNG(t, 16, 16)
	name, _, err := fileStore.put(context.Background(), img)
	if err != nil {
		t.Fatal(err)
	}
	etag := `"` + strings.TrimSuffix(name, ".png") + `"`
	for _, st := range []*imageStore{fileStore, generic} {
		kind := "file"
		if st == generic {
			kind = "generic"
		}
		serve := func(method, name string, hdr ...string) *httptest.ResponseRecorder {
			r := httptest.NewRequest(method, "/v1/zimage/images/x", nil)
			for i := 0; i+1 < len(hdr); i += 2 {
				r.Header.Set(hdr[i], hdr[i+1])
			}
			w := httptest.NewRecorder()
			if code := st.serve(w, r, name); code != w.Code {
				t.Errorf("%s %s %s: serve returned %d but answered %d", kind, method, name, code, w.Code)
			}
			return w
		}
		t.Run(kind, func(t *testing.T) {
			w := serve(http.MethodGet, name)
			want := http.Header{
				"Content-Type":           {"image/png"},
				"Content-Length":         {fmt.Sprint(len(img))},
				"Etag":                   {etag},
				"Cache-Control":          {"public, max-age=31536000, immutable"},
				"X-Content-Type-Options": {"nosniff"},
				"Accept-Ranges":          {"bytes"},
			}
			if w.Code != 200 || !reflect.DeepEqual(w.Header(), want) || !bytes.Equal(w.Body.Bytes(), img) {
				t.Errorf("GET: %d %v, %d bytes; want 200 %v and the image", w.Code, w.Header(), w.Body.Len(), want)
			}
			if w := serve(http.MethodHead, name); w.Code != 200 || w.Body.Len() != 0 || w.Header().Get("Content-Length") != fmt.Sprint(len(img)) {
				t.Errorf("HEAD: %d, %d body bytes, Content-Length %q", w.Code, w.Body.Len(), w.Header().Get("Content-Length"))
			}
			loads := hidden.loads.Load()
			for _, inm := range []string{etag, "W/" + etag, `"other", ` + etag, "*"} {
				w := serve(http.MethodGet, name, "If-None-Match", inm)
				if w.Code != 304 || w.Body.Len() != 0 || w.Header().Get("Etag") != etag || w.Header().Get("Content-Length") != "" {
					t.Errorf("If-None-Match %s: %d %v %d bytes; want 304 with the ETag", inm, w.Code, w.Header(), w.Body.Len())
				}
			}
			if d := hidden.loads.Load() - loads; d != 0 {
				t.Errorf("a 304 loaded the image %d times; it needs only to know it exists", d)
			}
			if w := serve(http.MethodGet, name, "If-None-Match", `"other"`); w.Code != 200 || !bytes.Equal(w.Body.Bytes(), img) {
				t.Errorf("If-None-Match of another tag: %d", w.Code)
			}
			w = serve(http.MethodGet, name, "Range", "bytes=8-15")
			if w.Code != 206 || !bytes.Equal(w.Body.Bytes(), img[8:16]) || w.Header().Get("Content-Range") != fmt.Sprintf("bytes 8-15/%d", len(img)) {
				t.Errorf("Range: %d %q %q", w.Code, w.Header().Get("Content-Range"), w.Body.Bytes())
			}
			w = serve(http.MethodGet, name, "Range", "bytes=8-15", "If-Range", etag)
			if w.Code != 206 {
				t.Errorf("If-Range with the strong ETag: %d, want 206", w.Code)
			}
			w = serve(http.MethodGet, name, "Range", fmt.Sprintf("bytes=%d-", len(img)+10))
			if w.Code != 416 || apiErrOf(t, w).Code != "range_not_satisfiable" || w.Header().Get("Cache-Control") != "" {
				t.Errorf("Range beyond the end: %d %v %s", w.Code, w.Header(), w.Body.Bytes())
			}
			w = serve(http.MethodGet, name, "If-Match", `"other"`)
			if w.Code != 412 || apiErrOf(t, w).Code != "precondition_failed" {
				t.Errorf("If-Match of another tag: %d %s", w.Code, w.Body.Bytes())
			}
			for _, n := range []string{storeTestID + ".png", "../../x", name + "\x00"} {
				w := serve(http.MethodGet, n)
				if w.Code != 404 || apiErrOf(t, w).Code != "not_found" || w.Header().Get("Cache-Control") != "" {
					t.Errorf("GET %q: %d %v %s", n, w.Code, w.Header(), w.Body.Bytes())
				}
				if w := serve(http.MethodGet, n, "If-None-Match", `"`+storeTestID+`"`); w.Code != 404 {
					t.Errorf("GET %q with If-None-Match of its id: %d, want 404", n, w.Code)
				}
			}
			for _, m := range []string{http.MethodPost, http.MethodPut, http.MethodDelete, http.MethodPatch} {
				w := serve(m, name)
				if w.Code != 405 || apiErrOf(t, w).Code != "method_not_allowed" || w.Header().Get("Allow") != "GET, HEAD" {
					t.Errorf("%s: %d %v %s", m, w.Code, w.Header(), w.Body.Bytes())
				}
			}
			if w := serve(http.MethodOptions, name); w.Code != 204 {
				t.Errorf("OPTIONS: %d, want 204 (CORS preflight)", w.Code)
			}
		})
	}
}

func apiErrOf(t *testing.T, w *httptest.ResponseRecorder) errorDetail {
	t.Helper()
	if ct := w.Header().Get("Content-Type"); ct != "application/json" {
		t.Errorf("error Content-Type %q", ct)
	}
	return apiErr(t, w.Body.Bytes())
}

// brokenStorage fails every read but says the key exists: a storage that
// is down.
type brokenStorage struct{ certmagic.Storage }

func (brokenStorage) Load(context.Context, string) ([]byte, error) {
	return nil, errors.New("connection refused")
}
func (brokenStorage) Exists(context.Context, string) bool { return true }

// A storage that cannot be read is a 500 in the envelope, not a 404.
func TestUnitStoreServeStorageDown(t *testing.T) {
	st := newImageStore(brokenStorage{}, "zimage", 0, defaultStoreMaxSize, "", nil)
	w := httptest.NewRecorder()
	if code := st.serve(w, httptest.NewRequest(http.MethodGet, "/", nil), storeTestID+".png"); code != 500 || w.Code != 500 ||
		apiErrOf(t, w).Code != "storage_error" || strings.Contains(w.Body.String(), "refused") {
		t.Errorf("%d %s", w.Code, w.Body.Bytes())
	}
}

// discardWriter is a ResponseWriter that drops the body, with ReadFrom
// like net/http's (so sendfile-style copies do not buffer).
type discardWriter struct{ h http.Header }

func (d *discardWriter) Header() http.Header         { return d.h }
func (d *discardWriter) WriteHeader(int)             {}
func (d *discardWriter) Write(b []byte) (int, error) { return len(b), nil }
func (d *discardWriter) ReadFrom(r io.Reader) (int64, error) {
	buf := make([]byte, 32<<10)
	return io.CopyBuffer(struct{ io.Writer }{io.Discard}, r, buf)
}

// With file_system storage an image is served from the file,
// not read into memory whole: serving a 16 MiB image allocates far less
// than 16 MiB (the generic path, which must Load, allocates all of it).
func TestUnitStoreServeFromFile(t *testing.T) {
	st, fsto := newTestFileStore(t, 0)
	big := append(pngHeader(2048, 2048), make([]byte, 16<<20)...)
	name, _, err := st.put(context.Background(), big)
	if err != nil {
		t.Fatal(err)
	}
	alloc := func(st *imageStore) uint64 {
		var m0, m1 runtime.MemStats
		runtime.GC()
		runtime.ReadMemStats(&m0)
		w := &discardWriter{h: http.Header{}}
		if code := st.serve(w, httptest.NewRequest(http.MethodGet, "/", nil), name); code != 200 {
			t.Fatalf("serve: %d", code)
		}
		runtime.ReadMemStats(&m1)
		return m1.TotalAlloc - m0.TotalAlloc
	}
	if a := alloc(st); a > 1<<20 {
		t.Errorf("serving a 16 MiB image from file_system storage allocated %d bytes", a)
	}
	if a := alloc(newImageStore(&hiddenStorage{Storage: fsto}, "zimage", 0, defaultStoreMaxSize, "", nil)); a < 16<<20 {
		t.Errorf("the generic path allocated only %d bytes: the measurement cannot tell the two apart", a)
	}
}

// The store's paths, with and without /v1; the name is passed on
// as it came, for parseStoreName to judge.
func TestUnitStoreRoute(t *testing.T) {
	for _, tc := range []struct {
		path string
		want route
		name string
	}{
		{"/v1/zimage/images/" + storeTestID + ".png", routeStoreImage, storeTestID + ".png"},
		{"/zimage/images/" + storeTestID + ".png", routeStoreImage, storeTestID + ".png"},
		{"//v1//zimage/images/x.png", routeStoreImage, "x.png"},
		{"/v1/zimage/images/../../etc/passwd", routeStoreImage, "../../etc/passwd"},
		{"/v1/zimage/images/", routeStoreImage, ""},
		{"/v1/zimage/images", routeUnknown, ""},
		{"/v1/zimage/imagesx/a.png", routeUnknown, ""},
		{"/zimage/images", routeNone, ""},
		{"/zimage/other/a.png", routeNone, ""},
	} {
		if got, name := parseRoute(tc.path); got != tc.want || name != tc.name {
			t.Errorf("parseRoute(%q) = %d, %q; want %d, %q", tc.path, got, name, tc.want, tc.name)
		}
	}
}
