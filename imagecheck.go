package zimage

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"image"
	_ "image/gif" // DecodeConfig of the formats the service may answer
	_ "image/jpeg"
	_ "image/png"
)

// One decision for every image the gateway returns or keeps: the store's copy, a b64_json download and an edit's
// source all pass checkImage, so bytes refused on one path are refused on
// every path. A signature alone is four bytes anyone can put in front of
// an HTML page; the format's header must parse too and declare a sane
// size. Only the header is read, never the pixels, so a header that claims
// 100000×100000 costs nothing to refuse.

// maxImageSide is the largest width or height an image may declare. The
// service makes 64…2048 per side; sources from cameras and phones reach
// about 8000; 16384 is WebP's own limit (14-bit sizes), so no real image
// of the four formats is refused and a dimension bomb is.
const maxImageSide = 16384

// imageFormats are the formats the store accepts, by signature: the
// Content-Type of a download proves nothing (docs/design.md#the-store).
var imageFormats = []struct {
	ext, contentType string
	match            func(b []byte) bool
}{
	{"png", "image/png", func(b []byte) bool { return bytes.HasPrefix(b, []byte("\x89PNG\r\n\x1a\n")) }},
	{"jpg", "image/jpeg", func(b []byte) bool { return bytes.HasPrefix(b, []byte("\xff\xd8\xff")) }},
	{"webp", "image/webp", func(b []byte) bool {
		return len(b) >= 12 && string(b[:4]) == "RIFF" && string(b[8:12]) == "WEBP"
	}},
	{"gif", "image/gif", func(b []byte) bool {
		return bytes.HasPrefix(b, []byte("GIF87a")) || bytes.HasPrefix(b, []byte("GIF89a"))
	}},
}

// sniffImage names the format of b by its signature: the extension the
// store uses and its Content-Type. It is the first half of checkImage;
// alone it decides nothing about whether the bytes are an image.
func sniffImage(b []byte) (ext, contentType string, ok bool) {
	for _, f := range imageFormats {
		if f.match(b) {
			return f.ext, f.contentType, true
		}
	}
	return "", "", false
}

// imageInfo is what checkImage read from an image's header.
type imageInfo struct {
	ext, contentType string
	width, height    int
}

// checkImage decides whether b is an image the gateway returns or stores:
// a PNG, JPEG, WebP or GIF by signature whose header parses and declares
// 1…maxImageSide pixels per side. The error says which part failed, in
// words safe to show a client or log (no byte of b is quoted).
func checkImage(b []byte) (imageInfo, error) {
	ext, ct, ok := sniffImage(b)
	if !ok {
		return imageInfo{}, errors.New("the bytes are not a PNG, JPEG, WebP or GIF image")
	}
	w, h := imageSize(b, ext)
	if w == 0 || h == 0 {
		return imageInfo{}, fmt.Errorf("the bytes start like a %s image but its header does not parse", ext)
	}
	if w > maxImageSide || h > maxImageSide {
		return imageInfo{}, fmt.Errorf("the %s image declares %d×%d pixels, more than %d per side", ext, w, h, maxImageSide)
	}
	return imageInfo{ext: ext, contentType: ct, width: w, height: h}, nil
}

// imageSize reads an image's dimensions from its header; 0, 0 when the
// header does not say.
func imageSize(b []byte, ext string) (int, int) {
	switch ext {
	case "webp":
		return webpSize(b)
	case "gif":
		// a GIF's header is 7 bytes anything can fill: the block after it
		// (and its colour table) must start as a GIF's blocks do
		if !gifBlocksFollow(b) {
			return 0, 0
		}
	}
	c, _, err := image.DecodeConfig(bytes.NewReader(b))
	if err != nil || c.Width <= 0 || c.Height <= 0 {
		return 0, 0
	}
	return c.Width, c.Height
}

// gifBlocksFollow reports whether the byte after a GIF's logical screen
// descriptor and global colour table starts an extension (0x21) or an
// image (0x2c), as the format requires.
func gifBlocksFollow(b []byte) bool {
	if len(b) < 13 {
		return false
	}
	next := 13
	if b[10]&0x80 != 0 { // a global colour table of 2^(n+1) RGB entries
		next += 3 << (1 + b[10]&7)
	}
	return next < len(b) && (b[next] == 0x21 || b[next] == 0x2c)
}

// webpSize reads the canvas size of a WebP file: the standard library has
// no WebP decoder, and the three chunk kinds each say it their own way.
func webpSize(b []byte) (int, int) {
	if len(b) < 30 {
		return 0, 0
	}
	chunk := b[12:16]
	d := b[20:]
	switch string(chunk) {
	case "VP8X": // extended: 24-bit canvas width-1 and height-1
		return 1 + (int(d[4]) | int(d[5])<<8 | int(d[6])<<16), 1 + (int(d[7]) | int(d[8])<<8 | int(d[9])<<16)
	case "VP8L": // lossless: signature 0x2f, then 14-bit width-1 and height-1
		if d[0] != 0x2f {
			return 0, 0
		}
		v := binary.LittleEndian.Uint32(d[1:5])
		return 1 + int(v&0x3fff), 1 + int(v>>14&0x3fff)
	case "VP8 ": // lossy: a key frame's start code, then 14-bit sizes
		if d[3] != 0x9d || d[4] != 0x01 || d[5] != 0x2a {
			return 0, 0
		}
		return int(binary.LittleEndian.Uint16(d[6:8]) & 0x3fff), int(binary.LittleEndian.Uint16(d[8:10]) & 0x3fff)
	}
	return 0, 0
}
