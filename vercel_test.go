package zimage

// The Vercel AI SDK as a tested client: clients/vercel holds a small Node
// project (ai and @ai-sdk/openai pinned by its package-lock.json) whose
// tests call the SDK as its users do; this test starts the gateway for
// them and runs `node --test` there. CI installs the project with npm ci
// (.ci/run) and must run it; elsewhere the test is skipped until
// node_modules is installed.

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"image"
	"image/color"
	"image/png"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"testing"
	"time"
)

// sizedPNG is a one-colour PNG of w×h: small on the wire whatever its size.
func sizedPNG(t testing.TB, w, h int) []byte {
	t.Helper()
	img := image.NewNRGBA(image.Rect(0, 0, w, h))
	c := color.NRGBA{R: 30, G: 60, B: 90, A: 255}
	for y := range h {
		for x := range w {
			img.SetNRGBA(x, y, c)
		}
	}
	var b bytes.Buffer
	if err := png.Encode(&b, img); err != nil {
		t.Fatal(err)
	}
	return b.Bytes()
}

// newSizedFake is an image service that answers, for generations and
// edits alike, a PNG of the width and height it was asked for.
func newSizedFake(t *testing.T) *fakeUpstream {
	up := newFakeUpstream(t)
	var cache sync.Map // "WxH" → PNG
	up.setHandler(func(w http.ResponseWriter, r *http.Request) {
		if r.Method == http.MethodGet {
			var width, height int
			if _, err := fmt.Sscanf(r.URL.Path, "/img/%dx%d.png", &width, &height); err != nil || width <= 0 || height <= 0 || width > 4096 || height > 4096 {
				http.NotFound(w, r)
				return
			}
			b, ok := cache.Load(r.URL.Path)
			if !ok {
				b, _ = cache.LoadOrStore(r.URL.Path, sizedPNG(t, width, height))
			}
			w.Header().Set("Content-Type", "image/png")
			w.Write(b.([]byte))
			return
		}
		var body struct{ Width, Height int }
		json.NewDecoder(r.Body).Decode(&body)
		writeUpstreamOK(w, fmt.Sprintf("%s/img/%dx%d.png", up.URL, body.Width, body.Height))
	})
	return up
}

func TestVercelAISDK(t *testing.T) {
	dir := filepath.Join("clients", "vercel")
	ci := os.Getenv("CI") == "true"
	if _, err := os.Stat(filepath.Join(dir, "node_modules")); err != nil && !ci {
		t.Skip("clients/vercel/node_modules is not installed: run `npm ci` in clients/vercel (CI does)")
	}
	node, err := exec.LookPath("node")
	if err != nil {
		if ci {
			t.Fatal("node is not installed; CI runs the Vercel AI SDK's tests with Node 20 or later")
		}
		t.Skip("node is not installed")
	}
	up := newSizedFake(t)
	startCaddy(t, gatewaySite(up, nil, fmt.Sprintf(`model Z-Image {
		alias gpt-image-1
	}
	model Qwen-Image-Edit {
		model_index 19
		edit
	}
	store {
		storage file_system %s
	}`, t.TempDir())))

	// a bound, not a timing: a hung SDK call fails the test instead of
	// the whole run
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, node, "--test", "--test-reporter=spec")
	cmd.Dir = dir
	cmd.Env = append(os.Environ(),
		"ZIMAGE_BASE_URL="+baseURL+"/v1",
		"ZIMAGE_API_KEY="+testClientKey,
		"ZIMAGE_SOURCE_PNG="+base64.StdEncoding.EncodeToString(sizedPNG(t, 40, 30)),
		"NO_COLOR=1",
	)
	out, err := cmd.CombinedOutput()
	// the output names each test and its assertion; the API key is not
	// in it (the SDK's errors carry the request's URL and body, not its
	// headers), and the harness's secret scan does not see it
	if err != nil {
		t.Fatalf("node --test in %s: %v\n%s", dir, err, newScrubber([]string{testClientKey}).Replace(string(out)))
	}
	t.Logf("%s", out)
}
