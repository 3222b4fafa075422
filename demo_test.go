package zimage

// SPEC §7: `upstream demo` renders placeholder PNGs of the right size that
// the module serves itself, says so in the markdown and in a warning at
// load, and is never a fallback for a missing key.

import (
	"bytes"
	"errors"
	"fmt"
	"image"
	_ "image/png"
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
// check (SPEC §14.1) works offline: the default Z-Image at 5 matches.
func TestUnitDemoNamesModel(t *testing.T) {
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
