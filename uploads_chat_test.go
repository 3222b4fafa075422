package zimage

// Chat bodies that carry an image: how they are admitted by size, the
// in-place decoding of their data: URLs, and the JSON keys they may use.

import (
	"bytes"
	"encoding/base64"
	"encoding/json"
	"net/http"
	"strings"
	"testing"
)

// Issue 15 item 3: a chat body without an image is held to max_body before
// it is parsed, and a large one is refused without being read whole; one
// with an image may be max_upload large, base64 and all, and is decoded
// exactly (also from an encoder that escapes '/').
func TestUploadsChatBodies(t *testing.T) {
	f := newEditFake(t)
	editSite(t, f, "on", "")
	textBody := func(n int) []byte {
		b, _ := json.Marshal(map[string]any{"messages": []any{map[string]any{"role": "user", "content": strings.Repeat("a cat ", n/6)}}})
		return b
	}
	// 1.06 MiB of text: 413, not a 400 about the prompt's length
	status, hdr, raw := do(t, http.MethodPost, "/v1/chat/completions", string(textBody(1111000)))
	itWantErr(t, status, hdr, raw, 413, "request_too_large")

	// 19 MiB of text: 413 while the client is still sending it
	big := newHeldBody(textBody(19<<20), 2<<20)
	r := await(t, postHeld("/v1/chat/completions", "application/json", testClientKey, big))
	if r.status != http.StatusRequestEntityTooLarge || big.waited.Load() {
		t.Errorf("19 MiB of text: %d (waited for the body: %v) %s", r.status, big.waited.Load(), r.body)
	}

	// an image beyond max_body: the service downloads the very bytes
	src := paddedPNG(t, 3<<20)
	b64 := base64.StdEncoding.EncodeToString(src)
	for name, url := range map[string]string{
		"plain":     "data:image/png;base64," + b64,
		"unpadded":  "data:image/png;base64," + strings.TrimRight(b64, "="),
		"escaped /": "data:image/png;base64," + b64,
	} {
		t.Run(name, func(t *testing.T) {
			body := chatWithImage(t, "make it night", url)
			if name == "escaped /" {
				body = strings.ReplaceAll(body, "/", `\/`)
			}
			if len(body) < 1<<20 {
				t.Fatal("the body is within max_body")
			}
			_, before := f.got()
			content := itOK(t, body)
			_, sources := f.got()
			if len(sources) != len(before)+1 || !bytes.Equal(sources[len(before)], src) {
				t.Fatalf("the service did not get the attached image")
			}
			if !strings.Contains(content, "**✏️ Edit Instruction:**\nmake it night") {
				t.Errorf("content %q", content)
			}
		})
	}

	// an image in an older message only: still a 413 beyond max_body
	old := map[string]any{"messages": []any{
		map[string]any{"role": "user", "content": []any{map[string]any{"type": "image_url", "image_url": map[string]any{"url": "data:image/png;base64," + b64}}}},
		map[string]any{"role": "user", "content": "a cat"},
	}}
	ob, _ := json.Marshal(old)
	status, hdr, raw = do(t, http.MethodPost, "/v1/chat/completions", string(ob))
	itWantErr(t, status, hdr, raw, 413, "request_too_large")
}

// The in-place decoder agrees with decodeDataURL on the JSON strings
// clients send, and leaves the rest of the body as it was.
func TestUnitUploadsExtractDataURLs(t *testing.T) {
	img := paddedPNG(t, 40<<10)
	b64 := base64.StdEncoding.EncodeToString(img)
	wrapped := ""
	for i := 0; i < len(b64); i += 76 {
		wrapped += b64[i:min(len(b64), i+76)] + "\r\n"
	}
	for _, tc := range []struct {
		name, url string
		escape    bool // '/' written as \/
		extracted bool
		ok        bool
	}{
		{"padded", "data:image/png;base64," + b64, false, true, true},
		{"unpadded", "data:image/png;base64," + strings.TrimRight(b64, "="), false, true, true},
		{"escaped slashes", "data:image/png;base64," + b64, true, true, true},
		{"line breaks", "data:image/png;base64," + wrapped, false, true, true},
		{"upper-case scheme", "DATA:image/PNG;BASE64," + b64, false, true, true},
		{"bad base64", "data:image/png;base64," + b64[:100] + "!" + b64[101:], false, true, false},
		{"data after padding", "data:image/png;base64," + b64 + "QUJD", false, true, false},
		{"short: left to decodeDataURL", "data:image/png;base64," + b64[:1000], false, false, true},
		{"not an image type", "data:text/plain;base64," + b64, false, false, false},
		{"not base64", "data:image/png," + b64, false, false, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			body, _ := json.Marshal(map[string]any{"prompt": "data:image/png;base64," + b64, "messages": []any{map[string]any{"role": "user", "content": []any{
				map[string]any{"type": "text", "text": `say "url":"data:image/png;base64,` + b64[:20000] + `"`},
				map[string]any{"type": "image_url", "image_url": map[string]any{"url": tc.url}},
			}}}})
			if tc.escape {
				body = bytes.ReplaceAll(body, []byte("/"), []byte(`\/`))
			}
			want, wantErr := decodeDataURL(tc.url, 1<<20, "p")
			js, x := extractDataURLs(append([]byte(nil), body...))
			var req chatRequest
			if e := decodeJSON(js, &req); e != nil {
				t.Fatalf("the JSON left is not JSON: %v", e)
			}
			req.dataURLs = x
			if prompt, _, _ := chatPrompt(&req); !strings.HasPrefix(*req.Prompt, "data:image/png;base64,") || prompt != *req.Prompt {
				t.Errorf("the prompt changed: %.60q", *req.Prompt)
			}
			g := &Gateway{MaxUpload: 1 << 20}
			got, gotErr := g.chatImage(&req)
			if tc.extracted != (x != nil && len(x.images) == 1) {
				t.Errorf("extracted: %v, want %v", x != nil, tc.extracted)
			}
			if (gotErr == nil) != tc.ok || (wantErr == nil) != tc.ok {
				t.Fatalf("errors: in place %v, decodeDataURL %v; want ok %v", gotErr, wantErr, tc.ok)
			}
			if tc.ok && (!bytes.Equal(got.data, want.data) || got.width != want.width || tc.extracted && !bytes.Equal(got.data, img)) {
				t.Errorf("decoded differently")
			}
			if !tc.ok && gotErr.message != wantErr.message {
				t.Errorf("message %q, decodeDataURL's %q", gotErr.message, wantErr.message)
			}
		})
	}
}

// Whatever the base64, decoding in place never writes where it has not
// yet read, and agrees with the standard decoder whenever that accepts it.
func FuzzUploadsBase64InPlace(f *testing.F) {
	for _, s := range []string{"", "QQ", "QQ==", "QUJD", "QUJDRA==", "QQ=\n", "Q=Q", "QU\nJD", "////", "+/+/"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, payload string) {
		raw, _ := json.Marshal(payload)
		s := raw[1 : len(raw)-1]
		buf := append([]byte(nil), s...)
		n, ok := decodeBase64InPlace(buf)
		p := strings.TrimRight(payload, "=")
		want, err := base64.StdEncoding.DecodeString(p)
		if err != nil {
			want, err = base64.RawStdEncoding.DecodeString(p)
		}
		if err == nil && !bytes.Contains(s, []byte(`\u`)) && !bytes.Contains(s, []byte(`\t`)) {
			if !ok || !bytes.Equal(buf[:n], want) {
				t.Fatalf("%q: in place %v %x, standard %x", payload, ok, buf[:n], want)
			}
		}
		if ok && n > len(s) {
			t.Fatalf("%q: %d bytes out of %d", payload, n, len(s))
		}
	})
}

// A chat image part keyed "URL" (encoding/json matches keys without
// regard to case) is read in place like "url", not decoded whole by the
// JSON decoder; a data: URL the in-place reader cannot read in an upload
// is refused rather than decoded outside the budget.
func TestUploadsImageKeyCase(t *testing.T) {
	b64 := base64.StdEncoding.EncodeToString(paddedPNG(t, 64<<10))
	for _, key := range []string{`"URL"`, `"Url"`, `"\u0055RL"`, `"IMAGE_URL"`} {
		body := []byte(`{"images":[{` + key + `:"data:image/png;base64,` + b64 + `"}]}`)
		if key != `"IMAGE_URL"` {
			body = []byte(`{"messages":[{"role":"user","content":[{"type":"image_url","image_url":{` + key + `:"data:image/png;base64,` + b64 + `"}}]}]}`)
		}
		js, urls := extractDataURLs(bytes.Clone(body))
		if urls == nil || len(urls.images) != 1 || len(js) > 1000 {
			t.Errorf("key %s: not read in place (%d bytes of JSON left)", key, len(js))
		}
	}

	f := newEditFake(t)
	editSite(t, f, "on", "")
	src := paddedPNG(t, 3<<20)
	body := strings.Replace(chatWithImage(t, "make it night", "data:image/png;base64,"+base64.StdEncoding.EncodeToString(src)), `"url"`, `"URL"`, 1)
	itOK(t, body)
	if _, sources := f.got(); len(sources) == 0 || !bytes.Equal(sources[len(sources)-1], src) {
		t.Errorf("the service did not get the image sent under \"URL\"")
	}
	escaped := strings.Replace(body, "data:image/png", `data:image\u002fpng`, 1)
	status, hdr, raw := do(t, http.MethodPost, "/v1/chat/completions", escaped)
	itWantErr(t, status, hdr, raw, 400, "invalid_request")
}
