package zimage

// `upstream demo` renders placeholder PNGs of the right size that
// the module serves itself, says so in the markdown and in a warning at
// load, and is never a fallback for a missing key.

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"image"
	"image/color"
	"image/png"
	"io/fs"
	"net/http"
	"os"
	"regexp"
	"strings"
	"testing"
)

func demoTestSite() string {
	return fmt.Sprintf("zimage_gateway {\n\tapi_key %s\n\tupstream demo\n\tenhance off\n}", testClientKey)
}

// demoWarnLines counts the warn lines about the demo upstream in Caddy's log.
func demoWarnLines(t *testing.T) int {
	t.Helper()
	if _, err := os.Stat(logPath); errors.Is(err, fs.ErrNotExist) {
		return 0 // no config has been loaded yet
	}
	n := 0
	for _, l := range readLog(t) {
		msg, _ := l["msg"].(string)
		if l["level"] == "warn" && strings.Contains(msg, "demo") {
			n++
		}
	}
	return n
}

func TestDemoWarnsAtLoad(t *testing.T) {
	t.Setenv("SD_API_KEY", "")
	before := demoWarnLines(t)
	// a config no other test loads: Caddy skips loading one identical to
	// the running config, and there would be nothing to provision or log
	startCaddy(t, strings.Replace(demoTestSite(), "enhance off", "enhance off\n\tmax_body 777KiB", 1))
	if after := demoWarnLines(t); after <= before {
		t.Errorf("no warn line about the demo upstream in Caddy's log after loading it (%d before, %d after)", before, after)
	}
}

func TestDemoChatImage(t *testing.T) {
	t.Setenv("SD_API_KEY", "")
	startCaddy(t, demoTestSite())
	link := regexp.MustCompile(`^!\[[^\]]*\]\(([^)\s]+)\)\n`)
	for _, tc := range []struct {
		name   string
		prompt string
		kv     []any
		w, h   int
	}{
		{"default ratio", "a cat", nil, 2048, 2048},
		{"16:9", "a cat, ratio 16:9", nil, 2048, 1152},
		{"9:16", "比例 9:16 一只猫", nil, 1152, 2048},
		{"3:2", "a cat ratio 3:2", nil, 1920, 1280},
		{"body size", "a cat", []any{"width", 640, "height", 480}, 640, 480},
	} {
		t.Run(tc.name, func(t *testing.T) {
			content := itOK(t, itChatBody(t, tc.prompt, tc.kv...))
			m := link.FindStringSubmatch(content)
			if m == nil {
				t.Fatalf("no image link in %q", content)
			}
			url := m[1]
			if !strings.HasPrefix(url, baseURL+"/v1/zimage-demo/") {
				t.Errorf("image URL %q is not on the test site under /v1/zimage-demo/", url)
			}
			if !strings.Contains(content, "placeholder") || !strings.Contains(content, fmt.Sprintf("**📐 Resolution:** %d×%d", tc.w, tc.h)) {
				t.Errorf("markdown lacks the demo note or the resolution: %q", content)
			}
			// browsers fetch images without the API key
			status, hdr, img := do(t, http.MethodGet, strings.TrimPrefix(url, baseURL), "", "Authorization", "")
			if status != http.StatusOK || hdr.Get("Content-Type") != "image/png" {
				t.Fatalf("GET %s: %d %s", url, status, hdr.Get("Content-Type"))
			}
			cfg, format, err := image.DecodeConfig(bytes.NewReader(img))
			if err != nil || format != "png" {
				t.Fatalf("not a PNG: %v %s", err, format)
			}
			if cfg.Width != tc.w || cfg.Height != tc.h {
				t.Errorf("placeholder is %dx%d, want %dx%d", cfg.Width, cfg.Height, tc.w, tc.h)
			}
		})
	}
}

func TestDemoNotAFallback(t *testing.T) {
	t.Setenv("SD_API_KEY", "")
	t.Setenv("GATEWAY_API_KEY", "")
	for _, tc := range []struct {
		name     string
		upstream string
	}{
		{"default URL", ""},
		{"explicit URL", "upstream https://sd.example.invalid/api/v1/generate_image"},
		{"empty key", "upstream https://sd.example.invalid/api/v1/generate_image {\n\t\tapi_key {env.ZIMAGE_IT_UNSET_SD}\n\t}"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			caddyfile := fmt.Sprintf("%s\n:%d {\n\tzimage_gateway {\n\t\tapi_key %s\n\t\t%s\n\t\tenhance off\n\t}\n}\n",
				globals(), httpPort, testClientKey, tc.upstream)
			msg := itLoadError(t, caddyfile)
			for _, w := range []string{"zimage_gateway", "upstream", "api_key", "SD_API_KEY"} {
				if !strings.Contains(msg, w) {
					t.Errorf("load error does not mention %q: %s", w, msg)
				}
			}
		})
	}
}

// The demo names the model of its menu in its answers, so the identity
// check (docs/design.md#model-identity) works offline: the default Z-Image at 5 matches.
func TestUnitDemoNamesModel(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		index int
		want  string
	}{{5, "Z-Image"}, {4, "RealSkin EPS 1.3"}, {19, "Qwen Image Edit"}, {99, ""}} {
		res, ue := demoGenerator{}.generate(t.Context(), "", upstreamRequest{Width: 64, Height: 64, ModelIndex: tc.index}, "http://x")
		if ue != nil || res.info.modelName != tc.want {
			t.Errorf("index %d: model_name %q (%v), want %q", tc.index, res.info.modelName, ue, tc.want)
		}
	}
}

// The demo's edit placeholder shows its source: the stored source scaled
// to the size sent and tinted (dark stays dark, light stays light); n 2
// gives two different pictures, for edits and for generations without a
// seed (the store keeps identical bytes once: the same picture would come
// back as one URL twice). A WebP source, which the standard library does
// not decode, gets the stripes.
func TestDemoEditShowsSource(t *testing.T) {
	t.Setenv("SD_API_KEY", "")
	startCaddy(t, strings.Replace(demoTestSite(), "enhance off", fmt.Sprintf("enhance off\n\tmodel Z-Image\n\tmodel Qwen-Image-Edit {\n\t\tmodel_index 19\n\t\tedit\n\t}\n\tstore {\n\t\tstorage file_system %s\n\t}", t.TempDir()), 1))
	// 40×20: the left half black, the right half white
	src := image.NewGray(image.Rect(0, 0, 40, 20))
	for y := range 20 {
		for x := 20; x < 40; x++ {
			src.Pix[y*src.Stride+x] = 0xff
		}
	}
	var pngSrc bytes.Buffer
	png.Encode(&pngSrc, src)
	decode := func(u string) image.Image {
		t.Helper()
		status, b := getURL(t, u)
		img, _, err := image.Decode(bytes.NewReader(b))
		if status != http.StatusOK || err != nil {
			t.Fatalf("%s: %d %v", u, status, err)
		}
		return img
	}
	near := func(c color.Color, want color.RGBA) bool {
		r, g, b, _ := c.RGBA()
		d := func(a uint32, w uint8) int { return max(int(a>>8)-int(w), int(w)-int(a>>8)) }
		return d(r, want.R) < 8 && d(g, want.G) < 8 && d(b, want.B) < 8
	}

	ct, body := multipartBody(t, [][2]string{{"prompt", "make it night"}, {"n", "2"}, {"response_format", "url"}}, map[string][]byte{"image": pngSrc.Bytes()})
	status, _, raw := postEdit(t, ct, body)
	if status != http.StatusOK {
		t.Fatalf("%d %s", status, raw)
	}
	a := parseImages(t, raw)
	if len(a.Data) != 2 || a.Data[0].URL == a.Data[1].URL {
		t.Fatalf("n 2 edit: %+v, want two different URLs", a.Data)
	}
	for _, d := range a.Data {
		img := decode(d.URL)
		// 40×20 fitted into 64…2048: 128×64
		if b := img.Bounds(); b.Dx() != 128 || b.Dy() != 64 {
			t.Fatalf("placeholder %v, want the size sent, 128x64", b)
		}
		if left, right := img.At(10, 40), img.At(110, 40); !near(left, demoEditPalette[0]) || !near(right, demoEditPalette[1]) {
			t.Errorf("placeholder pixels %v (left) %v (right), want the source's black and white tinted %v and %v", left, right, demoEditPalette[0], demoEditPalette[1])
		}
	}

	// WebP: the stripes, in the edit palette
	webp := []byte("RIFF\x00\x00\x00\x00WEBPVP8L\x00\x00\x00\x00\x2f")
	webp = binary.LittleEndian.AppendUint32(webp, uint32(64-1)|uint32(64-1)<<14)
	webp = append(webp, make([]byte, 10)...)
	ct, body = multipartBody(t, [][2]string{{"prompt", "make it night"}, {"response_format", "url"}}, map[string][]byte{"image": webp})
	if status, _, raw = postEdit(t, ct, body); status != http.StatusOK {
		t.Fatalf("%d %s", status, raw)
	}
	img := decode(parseImages(t, raw).Data[0].URL)
	if !near(img.At(2, 40), demoEditPalette[0]) || !near(img.At(63, 40), demoEditPalette[1]) {
		t.Errorf("a WebP source's placeholder: %v %v, want the edit palette's stripes", img.At(2, 40), img.At(63, 40))
	}

	// generations: n 2 without a seed, several times (four palettes: two
	// seeds shared one a quarter of the time)
	for range 8 {
		status, _, raw := do(t, http.MethodPost, "/v1/images/generations", `{"prompt":"a cat","n":2,"size":"64x64","response_format":"url"}`)
		a := parseImages(t, raw)
		if status != http.StatusOK || len(a.Data) != 2 || a.Data[0].URL == a.Data[1].URL {
			t.Fatalf("n 2 generation: %d %+v, want two different URLs", status, a.Data)
		}
	}
}
