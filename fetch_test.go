package zimage

import (
	"encoding/base64"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// TestFetchDownloadsBounded: b64_json downloads are bounded by
// max_downloads whatever the number of requests, and every answer is
// still whole.
func TestFetchDownloadsBounded(t *testing.T) {
	const limit, requests, n = 4, 3, 4
	var active, peak, total atomic.Int32
	up := newFakeUpstream(t)
	up.setHandler(func(w http.ResponseWriter, r *http.Request) {
		if r.Method != http.MethodGet {
			writeUpstreamOK(w, up.URL+"/img/"+r.URL.Query().Get("x")+".png")
			return
		}
		now := active.Add(1)
		defer active.Add(-1)
		total.Add(1)
		for p := peak.Load(); now > p && !peak.CompareAndSwap(p, now); p = peak.Load() {
		}
		// hold the download until as many as the limit allows are in
		// flight (or a while has passed), so that a missing bound shows
		deadline := time.Now().Add(300 * time.Millisecond)
		for active.Load() < limit && time.Now().Before(deadline) {
			time.Sleep(time.Millisecond)
		}
		w.Header().Set("Content-Type", "image/png")
		w.Write(imagesPNG(7))
	})
	startCaddy(t, gatewaySite(up, nil, "max_downloads "+strconv.Itoa(limit)))

	var wg sync.WaitGroup
	for range requests {
		wg.Add(1)
		go func() {
			defer wg.Done()
			status, hdr, raw := do(t, http.MethodPost, "/v1/images/generations", `{"prompt":"a cat","n":4,"response_format":"b64_json"}`)
			if status != http.StatusOK {
				t.Errorf("status %d: %.300s", status, raw)
				return
			}
			// the streamed answer announces its exact length
			if cl := hdr.Get("Content-Length"); cl != strconv.Itoa(len(raw)) {
				t.Errorf("Content-Length %s for %d bytes", cl, len(raw))
			}
			a := parseImages(t, raw)
			if len(a.Data) != n {
				t.Errorf("%d images, want %d", len(a.Data), n)
			}
			for _, d := range a.Data {
				if b, err := base64.StdEncoding.DecodeString(d.B64JSON); err != nil || string(b) != string(imagesPNG(7)) || d.RevisedPrompt != "a cat" {
					t.Errorf("image %.60q… does not decode to the served PNG (%v)", d.B64JSON, err)
				}
			}
		}()
	}
	wg.Wait()
	if got := total.Load(); got != requests*n {
		t.Errorf("%d downloads, want %d", got, requests*n)
	}
	if got := peak.Load(); got > limit || got < 2 {
		t.Errorf("peak downloads in flight %d, want at most max_downloads %d (and more than one)", got, limit)
	}
}

// TestFetchDownloadTimeout: a stalled image host costs the request no more
// than the upstream timeout, and is a 504.
func TestFetchDownloadTimeout(t *testing.T) {
	up := newFakeUpstream(t)
	up.setHandler(func(w http.ResponseWriter, r *http.Request) {
		if r.Method == http.MethodGet {
			w.Header().Set("Content-Type", "image/png")
			w.WriteHeader(http.StatusOK)
			http.NewResponseController(w).Flush()
			<-r.Context().Done() // never sends the image
			return
		}
		writeUpstreamOK(w, up.URL+"/img/1.png")
	})
	startCaddy(t, opsSite(up.endpoint(), nil, "timeout 1s", ""))
	start := time.Now()
	status, hdr, raw := do(t, http.MethodPost, "/v1/images/generations", `{"prompt":"a cat","response_format":"b64_json"}`)
	elapsed := time.Since(start)
	e := itWantErr(t, status, hdr, raw, http.StatusGatewayTimeout, "upstream_timeout")
	if e.Message != "The image host did not send the generated image in time" {
		t.Errorf("message %q", e.Message)
	}
	// the 1s timeout, not the old fixed 60s (generous for a loaded machine)
	if elapsed > 20*time.Second {
		t.Errorf("the answer took %v with a 1s upstream timeout", elapsed)
	}
}

// TestFetchOneImageCheck: b64_json and the store's copy decide alike
// whether the image host's bytes are an image:
// an HTML page served as image/png, or a PNG signature before a header
// that does not parse, is a 502 for b64_json (never a 200 with the page
// base64-encoded) and no copy in the store (the answer keeps the
// service's URL).
func TestFetchOneImageCheck(t *testing.T) {
	up := newFakeUpstream(t)
	var body atomic.Value
	up.setHandler(func(w http.ResponseWriter, r *http.Request) {
		if r.Method == http.MethodGet {
			w.Header().Set("Content-Type", "image/png")
			w.Write(body.Load().([]byte))
			return
		}
		writeUpstreamOK(w, up.URL+"/img/1.png")
	})
	dir := t.TempDir()
	startCaddy(t, gatewaySite(up, nil, "store {\n\t\tstorage file_system "+dir+"\n\t}"))
	for _, tc := range []struct {
		name string
		b    []byte
		want string // in the 502's message
	}{
		{"html as image/png", []byte("<!doctype html><html><body>login</body></html>"), "not a PNG, JPEG, WebP or GIF"},
		{"png signature, garbage header", []byte("\x89PNG\r\n\x1a\n<html><body>login</body></html>"), "header does not parse"},
		{"png declaring 100000×100000", pngHeader(100000, 100000), "more than 16384 per side"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			body.Store(tc.b)
			status, hdr, raw := do(t, http.MethodPost, "/v1/images/generations", `{"prompt":"a cat","response_format":"b64_json"}`)
			e := itWantErr(t, status, hdr, raw, http.StatusBadGateway, "image_download_failed")
			if !strings.Contains(e.Message, tc.want) {
				t.Errorf("message %q, want %q", e.Message, tc.want)
			}
			status, _, raw = do(t, http.MethodPost, "/v1/images/generations", `{"prompt":"a cat"}`)
			if status != http.StatusOK || parseImages(t, raw).Data[0].URL != up.URL+"/img/1.png" {
				t.Errorf("url answer: %d %s; want the service's URL (no copy)", status, raw)
			}
		})
	}
	if entries, _ := os.ReadDir(filepath.Join(dir, "zimage", "images")); len(entries) != 0 {
		t.Errorf("%d files stored, want none", len(entries))
	}
	// the control: a real image passes both ways
	body.Store(imagesPNG(3))
	status, _, raw := do(t, http.MethodPost, "/v1/images/generations", `{"prompt":"a cat","response_format":"b64_json"}`)
	if status != http.StatusOK {
		t.Fatalf("a real PNG: %d %s", status, raw)
	}
}

// A trusted image host is scheme, host and port: the
// upstream's origin with its default port made explicit, and image_hosts
// entries as host (default ports only), host:port or scheme://host[:port];
// names cover their subdomains on the same terms, addresses only
// themselves.
func TestUnitImageFetcherAllowed(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		upstream string
		hosts    []string
		url      string
		ok       bool
	}{
		{"https://sd.exacg.cc/api/v1/generate_image", nil, "https://sd.exacg.cc/img/1.png", true},
		{"https://sd.exacg.cc/api/v1/generate_image", nil, "https://SD.exacg.cc:443/img/1.png", true},
		{"https://sd.exacg.cc/api/v1/generate_image", nil, "https://img.sd.exacg.cc/1.png", true},
		{"https://sd.exacg.cc/api/v1/generate_image", nil, "http://sd.exacg.cc/img/1.png", false},
		{"https://sd.exacg.cc/api/v1/generate_image", nil, "https://sd.exacg.cc:8443/img/1.png", false},
		{"https://sd.exacg.cc/api/v1/generate_image", nil, "https://evilsd.exacg.cc/1.png", false},
		{"https://sd.exacg.cc/api/v1/generate_image", nil, "https://sd.exacg.cc.evil.com/1.png", false},
		{"https://sd.exacg.cc/api/v1/generate_image", nil, "http://169.254.169.254/latest/meta-data", false},
		{"https://sd.exacg.cc/api/v1/generate_image", nil, "file:///etc/passwd", false},
		{"https://sd.exacg.cc/api/v1/generate_image", nil, "ftp://sd.exacg.cc/1.png", false},
		// the probe's case: the service on one port, images on another,
		// Caddy's admin endpoint
		{"http://127.0.0.1:9101/api/v1/generate_image", nil, "http://127.0.0.1:9101/i.png", true},
		{"http://127.0.0.1:9101/api/v1/generate_image", nil, "http://127.0.0.1:9102/i.png", false},
		{"http://127.0.0.1:9101/api/v1/generate_image", nil, "http://127.0.0.1:2019/config/", false},
		{"http://127.0.0.1:9101/api/v1/generate_image", nil, "http://127.0.0.1/i.png", false},
		{"http://127.0.0.1:80/api/v1/generate_image", nil, "http://127.0.0.1/i.png", true},
		{"http://sd.example/api", nil, "http://sd.example:80/i.png", true},
		// a bare host: its default ports only, either scheme
		{"https://sd.exacg.cc/api", []string{"CDN.Example.com", " "}, "https://cdn.example.com/1.png", true},
		{"https://sd.exacg.cc/api", []string{"cdn.example.com"}, "http://cdn.example.com/1.png", true},
		{"https://sd.exacg.cc/api", []string{"cdn.example.com"}, "https://a.cdn.example.com/1.png", true},
		{"https://sd.exacg.cc/api", []string{"cdn.example.com"}, "https://cdn.example.com:8443/1.png", false},
		{"https://sd.exacg.cc/api", []string{"cdn.example.com"}, "http://cdn.example.com:443/1.png", false},
		// host:port: that port on either scheme
		{"https://sd.exacg.cc/api", []string{"127.0.0.1:9102"}, "http://127.0.0.1:9102/i.png", true},
		{"https://sd.exacg.cc/api", []string{"127.0.0.1:9102"}, "http://127.0.0.1:9103/i.png", false},
		{"https://sd.exacg.cc/api", []string{"[::1]:9102"}, "http://[::1]:9102/i.png", true},
		{"https://sd.exacg.cc/api", []string{"::1"}, "http://[::1]/i.png", true},
		{"https://sd.exacg.cc/api", []string{"::1"}, "http://[::1]:2019/i.png", false},
		{"https://sd.exacg.cc/api", []string{"10.0.0.5"}, "http://a.10.0.0.5/i.png", false},
		// scheme://host[:port]: exactly that origin
		{"https://sd.exacg.cc/api", []string{"https://img.example.net"}, "https://img.example.net/1.png", true},
		{"https://sd.exacg.cc/api", []string{"https://img.example.net"}, "http://img.example.net/1.png", false},
		{"https://sd.exacg.cc/api", []string{"http://img.example.net:8080/"}, "http://img.example.net:8080/1.png", true},
	} {
		f, err := newImageFetcher(tc.upstream, tc.hosts, defaultMaxDownloads)
		if err != nil {
			t.Fatal(err)
		}
		u, err := url.Parse(tc.url)
		if err != nil {
			t.Fatal(err)
		}
		if got := f.allowed(u) == nil; got != tc.ok {
			t.Errorf("upstream %s, image_hosts %q: allowed(%s) = %v, want %v", tc.upstream, tc.hosts, tc.url, got, tc.ok)
		}
	}
	for _, bad := range []string{"ftp://x.example", "http://x.example/path", "https://u:p@x.example", "x.example:0", "x.example:http", "x/y", "a@b"} {
		if _, err := newImageFetcher("https://sd.exacg.cc/api", []string{bad}, defaultMaxDownloads); err == nil || !strings.Contains(err.Error(), "image_hosts") {
			t.Errorf("image_hosts %q: err %v, want a load error naming image_hosts", bad, err)
		}
	}
}

// TestFetchImageHostPort: through Caddy, with the service and a second
// server on 127.0.0.1 on different ports, an image on the second is not
// downloaded (a 502 naming its host and port, and no request reaches it)
// until image_hosts names its host:port.
func TestFetchImageHostPort(t *testing.T) {
	var hits atomic.Int32
	other := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		hits.Add(1)
		w.Header().Set("Content-Type", "image/png")
		w.Write(imagesPNG(42))
	}))
	defer other.Close()
	up := newFakeUpstream(t)
	up.setHandler(func(w http.ResponseWriter, r *http.Request) { writeUpstreamOK(w, other.URL+"/i.png") })
	otherHost := strings.TrimPrefix(other.URL, "http://")
	if !strings.HasPrefix(up.URL, "http://127.0.0.1:") || !strings.HasPrefix(otherHost, "127.0.0.1:") {
		t.Fatalf("want both on 127.0.0.1: %s, %s", up.URL, other.URL)
	}

	startCaddy(t, gatewaySite(up, nil, ""))
	status, hdr, raw := do(t, http.MethodPost, "/v1/images/generations", `{"prompt":"a cat","response_format":"b64_json"}`)
	e := itWantErr(t, status, hdr, raw, http.StatusBadGateway, "image_download_failed")
	if want := `image host "` + otherHost + `" is not allowed: add it to image_hosts`; !strings.Contains(e.Message, want) {
		t.Errorf("message %q, want %q", e.Message, want)
	}
	// a bare host is its default ports only
	startCaddy(t, gatewaySite(up, nil, "image_hosts 127.0.0.1"))
	status, hdr, raw = do(t, http.MethodPost, "/v1/images/generations", `{"prompt":"a cat","response_format":"b64_json"}`)
	itWantErr(t, status, hdr, raw, http.StatusBadGateway, "image_download_failed")
	if n := hits.Load(); n != 0 {
		t.Fatalf("%d requests reached the untrusted port", n)
	}

	startCaddy(t, gatewaySite(up, nil, "image_hosts "+otherHost))
	status, _, raw = do(t, http.MethodPost, "/v1/images/generations", `{"prompt":"a cat","response_format":"b64_json"}`)
	if status != http.StatusOK {
		t.Fatalf("with image_hosts %s: %d %s", otherHost, status, raw)
	}
	if b, _ := base64.StdEncoding.DecodeString(parseImages(t, raw).Data[0].B64JSON); string(b) != string(imagesPNG(42)) {
		t.Error("b64_json is not the second server's image")
	}
}
