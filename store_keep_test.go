package zimage

import (
	"bufio"
	"bytes"
	"encoding/base64"
	"fmt"
	"image"
	"io"
	"net/http"
	"regexp"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// The copy step (docs/design.md#the-store) through a real Caddy: every endpoint's image
// is copied into the store before the answer, and the answer names it on
// the gateway's own origin.

// keepFake is an image service whose images it serves itself, counting
// the downloads, until stopped.
type keepFake struct {
	*fakeUpstream
	png       []byte
	downloads atomic.Int32
	gone      atomic.Bool
}

func newKeepFake(t *testing.T) *keepFake {
	f := &keepFake{fakeUpstream: newFakeUpstream(t), png: storeTestPNG(t, 16, 9)}
	f.setHandler(func(w http.ResponseWriter, r *http.Request) {
		if r.Method == http.MethodGet {
			f.downloads.Add(1)
			if f.gone.Load() {
				http.NotFound(w, r)
				return
			}
			w.Header().Set("Content-Type", "image/png")
			w.Write(f.png)
			return
		}
		writeUpstreamOK(w, f.URL+"/img/expiring.png")
	})
	return f
}

// storeURLPattern is a store URL on the test site's origin.
var storeURLPattern = regexp.MustCompile(`http://localhost:\d+/v1/zimage/images/[0-9a-f]{32}\.png`)

func getURL(t *testing.T, u string) (int, []byte) {
	t.Helper()
	resp, err := testClient(10 * time.Second).Get(u)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, b
}

func TestStoreKeepEveryEndpoint(t *testing.T) {
	f := newKeepFake(t)
	dir := t.TempDir()
	startCaddy(t, gatewaySite(f.fakeUpstream, nil, fmt.Sprintf("store {\n\t\tstorage file_system %s\n\t}", dir))+"\nmetrics /metrics")
	before := scrape(t)

	var urls []string
	content := itOK(t, itChatBody(t, "a cat"))
	urls = append(urls, storeURLPattern.FindString(content))
	status, _, raw := do(t, http.MethodPost, "/v1/chat/completions", `{"prompt":"a cat","stream":true}`)
	if status != http.StatusOK {
		t.Fatalf("stream: %d", status)
	}
	urls = append(urls, storeURLPattern.FindString(string(raw)))
	status, _, raw = do(t, http.MethodPost, "/v1/images/generations", `{"prompt":"a cat","n":2}`)
	if status != http.StatusOK {
		t.Fatalf("images: %d %s", status, raw)
	}
	for _, d := range parseImages(t, raw).Data {
		urls = append(urls, d.URL)
	}
	if n := f.downloads.Load(); n != 4 {
		t.Errorf("%d downloads for 4 images, want one each", n)
	}
	// b64_json encodes the copied bytes: still one download per image
	status, _, raw = do(t, http.MethodPost, "/v1/images/generations", `{"prompt":"a cat","response_format":"b64_json"}`)
	if status != http.StatusOK {
		t.Fatalf("b64: %d %s", status, raw)
	}
	if b, err := base64.StdEncoding.DecodeString(parseImages(t, raw).Data[0].B64JSON); err != nil || !bytes.Equal(b, f.png) {
		t.Errorf("b64_json is not the image (%v)", err)
	}
	if n := f.downloads.Load(); n != 5 {
		t.Errorf("%d downloads for 5 images, want one each", n)
	}

	// the image service's URL expires: the answers' images stay
	f.gone.Store(true)
	for i, u := range urls {
		if !storeURLPattern.MatchString(u) {
			t.Fatalf("answer %d names %q, not the store on this site", i, u)
		}
		if status, b := getURL(t, u); status != http.StatusOK || !bytes.Equal(b, f.png) {
			t.Errorf("%s: status %d, %d bytes: want the image's exact bytes", u, status, len(b))
		}
	}
	after := scrape(t)
	if d := after.delta(before, "caddy_zimage_store_images_total", "result", "stored"); d != 1 {
		t.Errorf("store_images_total{stored} +%v, want +1 (the same bytes each time)", d)
	}
	if d := after.delta(before, "caddy_zimage_store_images_total", "result", "duplicate"); d != 4 {
		t.Errorf("store_images_total{duplicate} +%v, want +4", d)
	}
	// the generation line says where the image is
	var stored int
	for _, l := range readLog(t) {
		if l["msg"] == "generation" && l["stored"] == true && l["store_id"] != nil {
			stored++
		}
	}
	if stored < 5 {
		t.Errorf("%d generation lines with stored and store_id, want 5", stored)
	}
}

// A copy that fails is never a new failure: the answer carries the
// upstream's URL, a warn line names the cause, and the metric counts it.
func TestStoreKeepFailureFallsBack(t *testing.T) {
	up := newFakeUpstream(t)
	for _, tc := range []struct {
		name  string
		serve http.HandlerFunc
	}{
		{"not an image", func(w http.ResponseWriter, r *http.Request) {
			w.Header().Set("Content-Type", "image/png")
			io.WriteString(w, "<html>login</html>")
		}},
		{"image host 404", http.NotFound},
	} {
		t.Run(tc.name, func(t *testing.T) {
			upURL := up.URL + "/img/" + strings.ReplaceAll(tc.name, " ", "-") + ".png"
			up.setHandler(func(w http.ResponseWriter, r *http.Request) {
				if r.Method == http.MethodGet {
					tc.serve(w, r)
					return
				}
				writeUpstreamOK(w, upURL)
			})
			startCaddy(t, gatewaySite(up, nil, fmt.Sprintf("store {\n\t\tstorage file_system %s\n\t}", t.TempDir()))+"\nmetrics /metrics")
			before := scrape(t)
			content := itOK(t, itChatBody(t, "a cat"))
			if !strings.Contains(content, "]("+upURL+")") {
				t.Errorf("answer %q, want the upstream's URL", content)
			}
			status, _, raw := do(t, http.MethodPost, "/v1/images/generations", `{"prompt":"a cat"}`)
			if status != http.StatusOK || parseImages(t, raw).Data[0].URL != upURL {
				t.Errorf("images: %d %s", status, raw)
			}
			if d := scrape(t).delta(before, "caddy_zimage_store_images_total", "result", "failed"); d != 2 {
				t.Errorf("store_images_total{failed} +%v, want +2", d)
			}
		})
	}
}

// The demo's placeholders are copied too, so a demo answer's URL is a
// store URL that outlives the process's placeholder cache.
func TestStoreKeepDemo(t *testing.T) {
	startCaddy(t, fmt.Sprintf("zimage_gateway {\n\tapi_key %s\n\tupstream demo\n\tenhance off\n\tstore {\n\t\tstorage file_system %s\n\t}\n}", testClientKey, t.TempDir()))
	status, _, raw := do(t, http.MethodPost, "/v1/images/generations", `{"prompt":"a cat","size":"64x128"}`)
	if status != http.StatusOK {
		t.Fatalf("%d %s", status, raw)
	}
	u := parseImages(t, raw).Data[0].URL
	if !storeURLPattern.MatchString(u) {
		t.Fatalf("demo URL %q is not a store URL", u)
	}
	status, b := getURL(t, u)
	if ext, _, ok := sniffImage(b); status != http.StatusOK || !ok || ext != "png" || imageSizeOf(b) != "64x128" {
		t.Errorf("status %d, %d bytes, %s: want the 64x128 placeholder", status, len(b), imageSizeOf(b))
	}
}

// imageSizeOf is "WxH" of an encoded image.
func imageSizeOf(b []byte) string {
	c, _, err := image.DecodeConfig(bytes.NewReader(b))
	if err != nil {
		return err.Error()
	}
	return fmt.Sprintf("%dx%d", c.Width, c.Height)
}

// A stream keeps sending keep-alives while the image is copied (docs/design.md#the-store):
// the image host sends the image only after the client saw one.
func TestStoreKeepStreamKeepsAlive(t *testing.T) {
	f := newKeepFake(t)
	release := make(chan struct{})
	var once sync.Once
	open := func() { once.Do(func() { close(release) }) }
	t.Cleanup(open)
	h := f.handler
	var waiting atomic.Bool
	f.setHandler(func(w http.ResponseWriter, r *http.Request) {
		if r.Method == http.MethodGet {
			waiting.Store(true)
			<-release
		}
		h(w, r)
	})
	startCaddy(t, gatewaySite(f.fakeUpstream, nil, fmt.Sprintf("stream_keepalive 50ms\n\tstore {\n\t\tstorage file_system %s\n\t}", t.TempDir())))
	req, _ := http.NewRequest(http.MethodPost, baseURL+"/v1/chat/completions", strings.NewReader(`{"prompt":"a cat","stream":true}`))
	req.Header.Set("Authorization", "Bearer "+testClientKey)
	req.Header.Set("Content-Type", "application/json")
	resp, err := testClient(20 * time.Second).Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	sc := bufio.NewScanner(resp.Body)
	var lines []string
	for sc.Scan() {
		lines = append(lines, sc.Text())
		if sc.Text() == ": keep-alive" && waiting.Load() {
			open() // the download is waiting and the stream is alive
		}
	}
	all := strings.Join(lines, "\n")
	ka := strings.Index(all, ": keep-alive")
	content := storeURLPattern.FindStringIndex(all)
	if ka < 0 || content == nil || ka > content[0] {
		t.Fatalf("want a keep-alive before the content with the store URL:\n%s", all)
	}
}
