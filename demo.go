package zimage

import (
	"bytes"
	"context"
	"fmt"
	"image"
	"image/color"
	_ "image/jpeg" // an edit's source, shown in its placeholder
	"image/png"
	"net/http"
	"net/url"
	"path"
	"strconv"
	"strings"
	"sync"
)

// demoGenerator is the `upstream demo` of docs/design.md#the-demo: instead of calling the
// image service it points at a placeholder PNG of the requested size that
// the module serves itself under demoPath, so every endpoint and client can
// be tried offline and without an account.
type demoGenerator struct{}

func (demoGenerator) generate(ctx context.Context, _ string, req upstreamRequest, origin string) (upstreamResult, *upstreamError) {
	if ctx.Err() != nil {
		return upstreamResult{}, ctxFailure(ctx, 0)
	}
	if req.ImageSource != "" {
		// an edit keeps the source's size (docs/design.md#edits), tinted so that it
		// is told apart; a source of unknown size gets a square
		w, h := req.Width, req.Height
		if w <= 0 || h <= 0 {
			w, h = 1024, 1024
		}
		if s := max(w, h); s > maxSide { // keep the shape within the drawable sides
			w, h = max(minSide, w*maxSide/s), max(minSide, h*maxSide/s)
		}
		w, h = max(w, minSide), max(h, minSide)
		u := fmt.Sprintf("%s%s%dx%d.png?seed=%d&edit=1", origin, demoPath, w, h, req.Seed)
		// a source in the store is named, so the placeholder can show it
		if su, err := url.Parse(req.ImageSource); err == nil {
			if name := path.Base(su.Path); isStoreName(name) {
				u += "&src=" + name
			}
		}
		return upstreamResult{imageURL: u}, nil
	}
	res := upstreamResult{imageURL: fmt.Sprintf("%s%s%dx%d.png?seed=%d", origin, demoPath, req.Width, req.Height, req.Seed)}
	// the demo names the model that ran, as the service does, so that the
	// identity check (docs/design.md#model-identity) can be tried offline too
	res.info.modelName, _ = demoMenuName(req.ModelIndex)
	return res, nil
}

// demoMenu is the demo upstream's model menu, by model_index (docs/design.md#model-identity):
// made up, but shaped like the menus public clients of the service
// reported (README, "Model identity"): Z-Image at 5, RealSkin EPS 1.3 beside it,
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
func (g *Gateway) serveDemoImage(w http.ResponseWriter, r *http.Request, name string) {
	if r.Method != http.MethodGet && r.Method != http.MethodHead {
		writeError(w, errMethod(r.Method, "GET"))
		return
	}
	b, ok := g.demoImage(r.Context(), name, r.URL.Query())
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

// demoImageForURL renders the placeholder a demo URL names, for b64_json
// and the store's copy.
func (g *Gateway) demoImageForURL(ctx context.Context, s string) ([]byte, bool) {
	u, err := url.Parse(s)
	if err != nil {
		return nil, false
	}
	name, ok := strings.CutPrefix(u.Path, demoPath)
	if !ok {
		return nil, false
	}
	return g.demoImage(ctx, name, u.Query())
}

// demoPalettes give each seed one of a few looks, so that distinct seeds
// visibly give distinct images.
var demoPalettes = [][2]color.RGBA{
	{{0x2b, 0x5d, 0x9e, 0xff}, {0x8e, 0xc5, 0xfc, 0xff}},
	{{0x9e, 0x2b, 0x5d, 0xff}, {0xfc, 0x8e, 0xc5, 0xff}},
	{{0x2b, 0x9e, 0x5d, 0xff}, {0x8e, 0xfc, 0xc5, 0xff}},
	{{0x6d, 0x4c, 0x1f, 0xff}, {0xf5, 0xd0, 0x8a, 0xff}},
}

// demoEditPalette tints the placeholders of edits: the source's dark
// tones become the first colour, its light tones the second.
var demoEditPalette = [2]color.RGBA{{0x5b, 0x2b, 0x9e, 0xff}, {0xd9, 0xb8, 0xfc, 0xff}}

// demoMaxSourcePixels bounds the source an edit's placeholder decodes
// (4096×4096, 64 MiB as RGBA); a larger one gets the stripes.
const demoMaxSourcePixels = 4096 * 4096

var (
	demoCacheMu sync.Mutex
	demoCache   = map[string][]byte{}
)

const demoCacheMax = 32

// demoImage renders the placeholder named "WxH.png": an edit's source,
// scaled to that size and tinted, when the source is in the store and
// decodes (PNG or JPEG: the standard library has no WebP decoder), else
// stripes in the seed's palette (the edit palette for an edit). A band
// along the top edge shows the seed's bits, so that two seeds never give
// the same bytes: the store keeps identical bytes once, and n images
// would come back as one URL n times.
func (g *Gateway) demoImage(ctx context.Context, name string, q url.Values) ([]byte, bool) {
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
	seed, _ := strconv.ParseInt(q.Get("seed"), 10, 64)
	edit := q.Get("edit") == "1"
	if src := q.Get("src"); edit && isStoreName(src) {
		if img := g.demoSource(ctx, src); img != nil {
			return encodeDemo(tintedSource(img, w, h, seed))
		}
	}
	pal := int(uint64(seed) % uint64(len(demoPalettes)))
	colors := demoPalettes[pal]
	if edit {
		pal, colors = -1, demoEditPalette
	}
	key := fmt.Sprintf("%dx%d/%d/%d", w, h, pal, seed)
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
	drawSeedBand(w, h, seed, func(x, y int, on bool) {
		img.Pix[y*img.Stride+x] = 0
		if on {
			img.Pix[y*img.Stride+x] = 1
		}
	})
	b, ok = encodeDemo(img)
	if !ok {
		return nil, false
	}
	demoCacheMu.Lock()
	if len(demoCache) >= demoCacheMax {
		clear(demoCache) // placeholders are cheap to redraw
	}
	demoCache[key] = b
	demoCacheMu.Unlock()
	return b, true
}

// drawSeedBand sets the pixels of a band along the top edge: 31 cells, one
// per bit of the seed, on or off.
func drawSeedBand(w, h int, seed int64, set func(x, y int, on bool)) {
	const bits = 31
	cell := w / bits
	for y := range max(2, h/64) {
		for x := range cell * bits {
			set(x, y, seed>>(x/cell)&1 == 1)
		}
	}
}

func encodeDemo(img image.Image) ([]byte, bool) {
	var buf bytes.Buffer
	enc := png.Encoder{CompressionLevel: png.BestSpeed}
	if err := enc.Encode(&buf, img); err != nil {
		return nil, false
	}
	return buf.Bytes(), true
}

// isStoreName tells whether name is the name of an image in the store.
func isStoreName(name string) bool {
	_, ok := parseStoreName(name)
	return ok
}

// demoSource decodes an edit's source from the store, or gives nil: no
// store, no such image, a format the standard library does not decode
// (WebP), or a source too large to decode for a placeholder.
func (g *Gateway) demoSource(ctx context.Context, name string) image.Image {
	if g.store == nil {
		return nil
	}
	b, err := g.store.storage.Load(ctx, g.store.dir+name)
	if err != nil {
		return nil
	}
	cfg, _, err := image.DecodeConfig(bytes.NewReader(b))
	if err != nil || cfg.Width <= 0 || cfg.Height <= 0 || cfg.Width*cfg.Height > demoMaxSourcePixels {
		return nil
	}
	img, _, err := image.Decode(bytes.NewReader(b))
	if err != nil {
		return nil
	}
	return img
}

// tintedSource is src scaled to w×h (nearest pixel) with its lightness
// mapped onto the edit palette, and the seed's band on top.
func tintedSource(src image.Image, w, h int, seed int64) *image.RGBA {
	out := image.NewRGBA(image.Rect(0, 0, w, h))
	b := src.Bounds()
	dark, light := demoEditPalette[0], demoEditPalette[1]
	mix := func(a, b uint8, l uint32) uint8 { return uint8((uint32(a)*(255-l) + uint32(b)*l) / 255) }
	for y := range h {
		sy := b.Min.Y + y*b.Dy()/h
		for x := range w {
			r, g, bl, _ := src.At(b.Min.X+x*b.Dx()/w, sy).RGBA()
			l := (299*r + 587*g + 114*bl) / 1000 >> 8 // 0…255
			i := out.PixOffset(x, y)
			out.Pix[i], out.Pix[i+1], out.Pix[i+2], out.Pix[i+3] = mix(dark.R, light.R, l), mix(dark.G, light.G, l), mix(dark.B, light.B, l), 0xff
		}
	}
	drawSeedBand(w, h, seed, func(x, y int, on bool) {
		c := dark
		if on {
			c = light
		}
		out.SetRGBA(x, y, c)
	})
	return out
}
