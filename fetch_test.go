package zimage

import (
	"encoding/base64"
	"net/http"
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
// still whole (issue 8, item 5).
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
// than the upstream timeout, and is a 504 (issue 8, item 6).
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
// whether the image host's bytes are an image (issue 15, items 4 and 5):
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
