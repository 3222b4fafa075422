package zimage

import (
	"bytes"
	"encoding/binary"
	"image"
	"image/color"
	"image/gif"
	"image/jpeg"
	"strings"
	"testing"
)

// webpVP8X is the header of an extended WebP of w×h (a canvas size is
// 24 bits of width-1 and height-1).
func webpVP8X(w, h int) []byte {
	b := []byte("RIFF\x00\x00\x00\x00WEBPVP8X\x0a\x00\x00\x00\x00\x00\x00\x00")
	b = append(b, byte(w-1), byte((w-1)>>8), byte((w-1)>>16), byte(h-1), byte((h-1)>>8), byte((h-1)>>16))
	return append(b, make([]byte, 10)...)
}

// webpVP8L is the header of a lossless WebP of w×h.
func webpVP8L(w, h int) []byte {
	b := []byte("RIFF\x00\x00\x00\x00WEBPVP8L\x00\x00\x00\x00\x2f")
	b = binary.LittleEndian.AppendUint32(b, uint32(w-1)|uint32(h-1)<<14)
	return append(b, make([]byte, 10)...)
}

// TestUnitCheckImage: one decision for every image returned or stored
// : the signature and a header that parses and
// declares 1…16384 pixels per side.
func TestUnitCheckImage(t *testing.T) {
	t.Parallel()
	small := image.NewRGBA(image.Rect(0, 0, 5, 3))
	small.Set(0, 0, color.White)
	var jp, gf bytes.Buffer
	if err := jpeg.Encode(&jp, small, nil); err != nil {
		t.Fatal(err)
	}
	if err := gif.Encode(&gf, small, nil); err != nil {
		t.Fatal(err)
	}
	lossy := []byte("RIFF\x00\x00\x00\x00WEBPVP8 \x00\x00\x00\x00\x00\x00\x00\x9d\x01\x2a")
	lossy = binary.LittleEndian.AppendUint16(lossy, 300)
	lossy = binary.LittleEndian.AppendUint16(lossy, 200)
	lossy = append(lossy, make([]byte, 10)...)
	const html = "<!doctype html><title>Just a moment...</title>"
	for _, tc := range []struct {
		name    string
		b       []byte
		ext     string // "" when refused
		w, h    int
		wantErr string
	}{
		{"png", storeTestPNG(t, 33, 17), "png", 33, 17, ""},
		{"jpeg", jp.Bytes(), "jpg", 5, 3, ""},
		{"gif", gf.Bytes(), "gif", 5, 3, ""},
		{"webp lossy", lossy, "webp", 300, 200, ""},
		{"webp lossless", webpVP8L(640, 480), "webp", 640, 480, ""},
		{"webp extended 1920×1080", webpVP8X(1920, 1080), "webp", 1920, 1080, ""},
		// a carry out of the low byte of width-1 (511 = 0x1ff)
		{"webp extended 512×256", webpVP8X(512, 256), "webp", 512, 256, ""},
		{"png at the bound", pngHeader(maxImageSide, 1), "png", maxImageSide, 1, ""},

		{"html", []byte(html), "", 0, 0, "not a PNG, JPEG, WebP or GIF"},
		{"empty", nil, "", 0, 0, "not a PNG"},
		{"png signature, html after", []byte("\x89PNG\r\n\x1a\n" + html), "", 0, 0, "header does not parse"},
		{"png signature, IHDR with a bad checksum", append(pngHeader(64, 64)[:29], 0, 0, 0, 0), "", 0, 0, "header does not parse"},
		{"png of width 0", pngHeader(0, 64), "", 0, 0, "header does not parse"},
		{"png over the bound", pngHeader(maxImageSide+1, 64), "", 0, 0, "more than 16384 per side"},
		{"png bomb 100000×100000", pngHeader(100000, 100000), "", 0, 0, "declares 100000×100000"},
		{"jpeg signature, html after", []byte("\xff\xd8\xff" + html), "", 0, 0, "header does not parse"},
		{"jpeg cut after the signature", jp.Bytes()[:20], "", 0, 0, "header does not parse"},
		{"gif signature, html after", []byte("GIF89a" + html), "", 0, 0, "header does not parse"},
		{"gif screen of 1×1, html after", []byte("GIF89a\x01\x00\x01\x00\x00\x00\x00" + html), "", 0, 0, "header does not parse"},
		{"webp signature, html after", []byte("RIFF\x00\x00\x00\x00WEBP" + html), "", 0, 0, "header does not parse"},
		{"webp truncated", []byte("RIFF\x00\x00\x00\x00WEBPVP8X"), "", 0, 0, "header does not parse"},
		{"webp lossy without its start code", append([]byte("RIFF\x00\x00\x00\x00WEBPVP8 "), make([]byte, 30)...), "", 0, 0, "header does not parse"},
		{"webp extended over the bound", webpVP8X(20000, 10), "", 0, 0, "more than 16384 per side"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			info, err := checkImage(tc.b)
			if tc.ext == "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("checkImage = %+v, %v; want an error with %q", info, err, tc.wantErr)
				}
				// the store and the edits refuse the same bytes
				st, _ := newTestFileStore(t, 0)
				if _, _, err := st.put(t.Context(), tc.b); err == nil {
					t.Error("the store accepted them")
				}
				if _, e := checkSource(tc.b, "image"); e == nil || e.status != 400 {
					t.Errorf("an edit accepted them: %+v", e)
				}
				return
			}
			if err != nil || info.ext != tc.ext || info.width != tc.w || info.height != tc.h {
				t.Fatalf("checkImage = %+v, %v; want %s %d×%d", info, err, tc.ext, tc.w, tc.h)
			}
			if ct, ok := storeContentType(info.ext); !ok || ct != info.contentType {
				t.Errorf("content type %q, the store's %q", info.contentType, ct)
			}
		})
	}
}

// FuzzCheckImage: any bytes, as an image host or a client may send them:
// checkImage never panics, and what it accepts has a known format and a
// size within the bound, which the edit and store paths agree with.
func FuzzCheckImage(f *testing.F) {
	f.Add(pngHeader(64, 64))
	f.Add(pngHeader(100000, 1))
	f.Add(webpVP8X(512, 256))
	f.Add(webpVP8L(1, 1))
	f.Add([]byte("GIF89a\x01\x00\x01\x00\x80\x00\x00"))
	f.Add([]byte("\xff\xd8\xff\xe0\x00\x10JFIF"))
	f.Add([]byte("RIFF\x00\x00\x00\x00WEBPVP8 \x00\x00\x00\x00\x00\x00\x00\x9d\x01\x2a"))
	f.Fuzz(func(t *testing.T, b []byte) {
		info, err := checkImage(b)
		if err != nil {
			return
		}
		if ext, _, ok := sniffImage(b); !ok || ext != info.ext {
			t.Fatalf("accepted as %q, sniffed as %q", info.ext, ext)
		}
		if info.width < 1 || info.height < 1 || info.width > maxImageSide || info.height > maxImageSide {
			t.Fatalf("accepted %d×%d", info.width, info.height)
		}
		if _, e := checkSource(b, "image"); (e == nil) == (info.ext == "gif") {
			t.Fatalf("an edit source decision differs for %s: %+v", info.ext, e)
		}
	})
}
