package zimage

// min_upload_rate: a body that arrives too slowly is cut, through a real
// Caddy (helpers in uploads_test.go).

import (
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
)

// A body that sends less than min_upload_rate over a window, after a
// first window that is free, is cut with 408 and its share returned. The
// window is shortened here; in service it is 10 s.
func TestUploadsMinimumRate(t *testing.T) {
	old := uploadRateWindow
	uploadRateWindow = 100 * time.Millisecond
	t.Cleanup(func() { uploadRateWindow = old })
	f := newEditFake(t)
	editSite(t, f, "on", "")
	held := func() float64 { return scrape(t).values["caddy_zimage_upload_memory_bytes{}"] }
	base := held()

	start := time.Now()
	r := <-crawl(t, 20_000_000, 10*time.Millisecond)
	if r.err != nil || r.status != http.StatusRequestTimeout || !strings.EqualFold(r.header.Get("Connection"), "close") {
		t.Fatalf("crawling upload: %d %v %v %s", r.status, r.err, r.header, r.body)
	}
	if e := apiErr(t, r.body); !strings.Contains(e.Message, "min_upload_rate") {
		t.Errorf("message %q", e.Message)
	}
	if d := time.Since(start); d < 2*uploadRateWindow {
		t.Errorf("cut after %v, within the first two windows", d)
	}
	waitFor(t, "the crawler's share returned", func() bool { return held() == base })

	// a client that sends nothing after its head is cut too
	conn := rawRequest(t, "", "/v1/chat/completions", "application/json", 20_000_000)
	if r := readRaw(conn); r.status != http.StatusRequestTimeout {
		t.Errorf("silent chat body: %d %v %s", r.status, r.err, r.body)
	}

	// a fast upload is not
	ct, body := multipartBody(t, [][2]string{{"prompt", "x"}}, map[string][]byte{"image": paddedPNG(t, 3<<20)})
	if status, _, raw := postEdit(t, ct, body); status != http.StatusOK {
		t.Errorf("fast upload: %d %s", status, raw)
	}

	var g Gateway
	if err := g.UnmarshalCaddyfile(caddyfile.NewTestDispenser("zimage_gateway {\n min_upload_rate 1MiB/s\n}")); err != nil || g.MinUploadRate != 1<<20 {
		t.Errorf("parsed %d, %v", g.MinUploadRate, err)
	}
	if err := new(Gateway).UnmarshalCaddyfile(caddyfile.NewTestDispenser("zimage_gateway {\n min_upload_rate off\n}")); err != nil {
		t.Errorf("off: %v", err)
	}
	if err := new(Gateway).UnmarshalCaddyfile(caddyfile.NewTestDispenser("zimage_gateway {\n min_upload_rate slow\n}")); err == nil || !strings.Contains(err.Error(), "min_upload_rate") {
		t.Errorf("bad rate: %v", err)
	}
}
