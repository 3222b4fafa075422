package zimage

import (
	"bytes"
	"context"
	"fmt"
	"image"
	"image/color"
	"image/png"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"sync"
)

// demoGenerator is the `upstream demo` of SPEC §7: instead of calling the
// image service it points at a placeholder PNG of the requested size that
// the module serves itself under demoPath, so every endpoint and client can
// be tried offline and without an account.
type demoGenerator struct{}

func (demoGenerator) generate(ctx context.Context, _ string, req upstreamRequest, origin string) (upstreamResult, *upstreamError) {
	if ctx.Err() != nil {
		return upstreamResult{}, ctxFailure(ctx, 0)
	}
	if req.ImageSource != "" {
		// an edit keeps the source's size (SPEC §10.4), tinted so that it
		// is told apart; a source of unknown size gets a square
		w, h := req.Width, req.Height
		if w <= 0 || h <= 0 {
			w, h = 1024, 1024
		}
		if s := max(w, h); s > maxSide { // keep the shape within the drawable sides
			w, h = max(minSide, w*maxSide/s), max(minSide, h*maxSide/s)
		}
		w, h = max(w, minSide), max(h, minSide)
		return upstreamResult{imageURL: fmt.Sprintf("%s%s%dx%d.png?seed=%d&edit=1", origin, demoPath, w, h, req.Seed)}, nil
	}
	res := upstreamResult{imageURL: fmt.Sprintf("%s%s%dx%d.png?seed=%d", origin, demoPath, req.Width, req.Height, req.Seed)}
	// the demo names the model that ran, as the service does, so that the
	// identity check (SPEC §14.1) can be tried offline too
	res.info.modelName, _ = demoMenuName(req.ModelIndex)
	return res, nil
}

// demoMenu is the demo upstream's model menu, by model_index (SPEC §14.2):
// made up, but shaped like the menus public clients of the service
// reported (REAL-SERVICE.md): Z-Image at 5, RealSkin EPS 1.3 beside it,
// the Qwen edit models at 18 and 19, video models after them. It answers
// `caddy zimage-models --upstream demo`, and names the demo's model.
var demoMenu = []string{
	0:  "Animagine XL 4.0",
	1:  "Illustrious XL 1.0",
	2:  "NoobAI XL 1.1",
	3:  "Pony Diffusion V6 XL",
	4:  "RealSkin EPS 1.3",
	5:  "Z-Image",
	6:  "FLUX.1 dev",
	7:  "Juggernaut XL",
	8:  "DreamShaper XL",
	9:  "RealVisXL 5.0",
	10: "Kolors",
	11: "SD 3.5 Large",
	12: "Hunyuan DiT",
	13: "Qwen Image",
	14: "Counterfeit XL",
	15: "Playground v2.5",
	16: "Anything XL",
	17: "Cetus-Mix XL",
	18: "Qwen Image Edit 2509",
	19: "Qwen Image Edit",
	20: "wan2.1",
	21: "wan2.2 T2V",
	22: "wan2.2 I2V",
}

// demoVideoFrom is the first video model of demoMenu: they make no image.
const demoVideoFrom = 20

// demoMenuName is the demo menu's model at index i.
func demoMenuName(i int) (string, bool) {
	if i < 0 || i >= len(demoMenu) {
		return "", false
	}
	return demoMenu[i], true
}

// demoProbe is the demo's answer to one discovery generation: the model's
// name and the points it cost (none: it is a demo), or why it failed.
func demoProbe(i int) (name string, points float64, failure string) {
	name, ok := demoMenuName(i)
	switch {
	case !ok:
		return "", 0, fmt.Sprintf("the menu has no model_index %d (it ends at %d)", i, len(demoMenu)-1)
	case i >= demoVideoFrom:
		return "", 0, fmt.Sprintf("%s makes videos, not images", name)
	}
	return name, 0, ""
}

// serveDemoImage answers GET /v1/zimage-demo/<W>x<H>.png?seed=N without
// auth: browsers load images without the API key.
func serveDemoImage(w http.ResponseWriter, r *http.Request, name string) {
	if r.Method != http.MethodGet && r.Method != http.MethodHead {
		writeError(w, errMethod(r.Method, "GET"))
		return
	}
	seed, _ := strconv.ParseInt(r.URL.Query().Get("seed"), 10, 64)
	b, ok := demoImage(name, seed, r.URL.Query().Get("edit") == "1")
	if !ok {
		writeError(w, errNotFound(r.URL.Path))
		return
	}
	w.Header().Set("Content-Type", "image/png")
	w.Header().Set("Content-Length", strconv.Itoa(len(b)))
	w.Header().Set("Cache-Control", "public, max-age=86400")
	w.WriteHeader(http.StatusOK)
	if r.Method == http.MethodGet {
		_, _ = w.Write(b)
	}
}

// demoImageForURL renders the placeholder a demo URL names, for b64_json.
func demoImageForURL(s string) ([]byte, bool) {
	u, err := url.Parse(s)
	if err != nil {
		return nil, false
	}
	name, ok := strings.CutPrefix(u.Path, demoPath)
	if !ok {
		return nil, false
	}
	seed, _ := strconv.ParseInt(u.Query().Get("seed"), 10, 64)
	return demoImage(name, seed, u.Query().Get("edit") == "1")
}

// demoPalettes give each seed one of a few looks, so that distinct seeds
// visibly give distinct images.
var demoPalettes = [][2]color.RGBA{
	{{0x2b, 0x5d, 0x9e, 0xff}, {0x8e, 0xc5, 0xfc, 0xff}},
	{{0x9e, 0x2b, 0x5d, 0xff}, {0xfc, 0x8e, 0xc5, 0xff}},
	{{0x2b, 0x9e, 0x5d, 0xff}, {0x8e, 0xfc, 0xc5, 0xff}},
	{{0x6d, 0x4c, 0x1f, 0xff}, {0xf5, 0xd0, 0x8a, 0xff}},
}

// demoEditPalette tints the placeholders of edits.
var demoEditPalette = [2]color.RGBA{{0x5b, 0x2b, 0x9e, 0xff}, {0xd9, 0xb8, 0xfc, 0xff}}

var (
	demoCacheMu sync.Mutex
	demoCache   = map[string][]byte{}
)

const demoCacheMax = 32

// demoImage renders (and caches) a striped PNG of the size named "WxH.png",
// tinted for an edit.
func demoImage(name string, seed int64, edit bool) ([]byte, bool) {
	dims, ok := strings.CutSuffix(name, ".png")
	if !ok {
		return nil, false
	}
	ws, hs, ok := strings.Cut(dims, "x")
	if !ok {
		return nil, false
	}
	w, err1 := strconv.Atoi(ws)
	h, err2 := strconv.Atoi(hs)
	if err1 != nil || err2 != nil || w < minSide || h < minSide || w > maxSide || h > maxSide {
		return nil, false
	}
	pal := int(uint64(seed) % uint64(len(demoPalettes)))
	colors := demoPalettes[pal]
	if edit {
		pal, colors = -1, demoEditPalette
	}
	key := fmt.Sprintf("%dx%d/%d", w, h, pal)
	demoCacheMu.Lock()
	b, hit := demoCache[key]
	demoCacheMu.Unlock()
	if hit {
		return b, true
	}

	img := image.NewPaletted(image.Rect(0, 0, w, h), color.Palette{colors[0], colors[1]})
	stripe := max(w, h) / 16
	for y := range h {
		row := img.Pix[y*img.Stride : y*img.Stride+w]
		for x := range row {
			if ((x+y)/stripe)%2 == 1 {
				row[x] = 1
			}
		}
	}
	var buf bytes.Buffer
	enc := png.Encoder{CompressionLevel: png.BestSpeed}
	if err := enc.Encode(&buf, img); err != nil {
		return nil, false
	}
	b = buf.Bytes()
	demoCacheMu.Lock()
	if len(demoCache) >= demoCacheMax {
		clear(demoCache) // placeholders are cheap to redraw
	}
	demoCache[key] = b
	demoCacheMu.Unlock()
	return b, true
}
