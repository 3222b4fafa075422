package zimage

import (
	"bufio"
	"bytes"
	"context"
	"encoding/base64"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"hash/crc32"
	"io"
	"mime/multipart"
	"net/http"
	"net/http/httptest"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/openai/openai-go/v3"
)

// editFake is an image service with an edit model: it downloads the
// image_source it is given, as the real one does, records what it got,
// and answers with an edited image it serves itself.
type editFake struct {
	*fakeUpstream
	mu      sync.Mutex
	sources [][]byte // the bytes behind each image_source
	bodies  []map[string]any
	result  []byte
}

func newEditFake(t *testing.T) *editFake {
	f := &editFake{fakeUpstream: newFakeUpstream(t), result: storeTestPNG(t, 12, 8)}
	f.setHandler(func(w http.ResponseWriter, r *http.Request) {
		if r.Method == http.MethodGet {
			w.Header().Set("Content-Type", "image/png")
			w.Write(f.result)
			return
		}
		var body map[string]any
		raw, _ := io.ReadAll(r.Body)
		json.Unmarshal(raw, &body)
		var src []byte
		if u, _ := body["image_source"].(string); u != "" && strings.Contains(u, "/v1/zimage/images/") {
			resp, err := http.Get(u)
			if err == nil {
				src, _ = io.ReadAll(resp.Body)
				resp.Body.Close()
			}
		}
		f.mu.Lock()
		f.bodies = append(f.bodies, body)
		f.sources = append(f.sources, src)
		f.mu.Unlock()
		writeUpstreamOK(w, f.URL+"/edited.png")
	})
	return f
}

func (f *editFake) got() ([]map[string]any, [][]byte) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]map[string]any(nil), f.bodies...), append([][]byte(nil), f.sources...)
}

// editSite is a gateway with a generation model and an edit model, and the
// store on unless store is "".
func editSite(t *testing.T, f *editFake, store string, extra string) {
	if store == "on" {
		store = fmt.Sprintf("store {\n\t\tstorage file_system %s\n\t}", t.TempDir())
	}
	startCaddy(t, gatewaySite(f.fakeUpstream, nil, "model Z-Image\n\tmodel Qwen-Image-Edit {\n\t\tmodel_index 19\n\t\tedit\n\t}\n\t"+store+"\n\t"+extra)+"\nmetrics /metrics")
}

// multipartBody builds an edits form: fields in order, then the files.
func multipartBody(t *testing.T, fields [][2]string, files map[string][]byte) (string, *bytes.Buffer) {
	t.Helper()
	var b bytes.Buffer
	mw := multipart.NewWriter(&b)
	for _, f := range fields {
		mw.WriteField(f[0], f[1])
	}
	for name, data := range files {
		fw, err := mw.CreateFormFile(name, "source.png")
		if err != nil {
			t.Fatal(err)
		}
		fw.Write(data)
	}
	mw.Close()
	return mw.FormDataContentType(), &b
}

func postEdit(t *testing.T, ct string, body io.Reader) (int, http.Header, []byte) {
	t.Helper()
	req, _ := http.NewRequest(http.MethodPost, baseURL+"/v1/images/edits", body)
	req.Header.Set("Authorization", "Bearer "+testClientKey)
	req.Header.Set("Content-Type", ct)
	resp, err := testClient(30 * time.Second).Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, resp.Header, b
}

// The official SDK edits an uploaded PNG: the service downloads the very
// bytes from the gateway's store, and the edit comes back as a store URL.
func TestEditsSDK(t *testing.T) {
	f := newEditFake(t)
	editSite(t, f, "on", "")
	src := storeTestPNG(t, 40, 30)
	before := scrape(t)
	client := sdkFor(baseURL+"/v1/", testClientKey)
	res, err := client.Images.Edit(context.Background(), openai.ImageEditParams{
		Image:  openai.ImageEditParamsImageUnion{OfFile: openai.File(bytes.NewReader(src), "cat.png", "image/png")},
		Prompt: "make it night",
		Model:  "dall-e-2", // a generation model or an unknown one: the first edit model
		N:      openai.Int(2),
		Size:   openai.ImageEditParamsSize1536x1024, // the size asked of the service (docs/design.md#edits)
	})
	if err != nil {
		t.Fatal(err)
	}
	if len(res.Data) != 2 || !storeURLPattern.MatchString(res.Data[0].URL) || res.Data[0].RevisedPrompt != "make it night" {
		t.Fatalf("answer %+v", res.Data)
	}
	if status, b := getURL(t, res.Data[0].URL); status != 200 || !bytes.Equal(b, f.result) {
		t.Errorf("the edit's store URL: %d, %d bytes", status, len(b))
	}
	bodies, sources := f.got()
	if len(bodies) != 2 {
		t.Fatalf("%d service calls, want 2", len(bodies))
	}
	for i, b := range bodies {
		if !bytes.Equal(sources[i], src) {
			t.Errorf("call %d: the service downloaded %d bytes, not the uploaded image", i, len(sources[i]))
		}
		// exactly the edit body of docs/design.md#edits: the size, no steps, cfg or
		// seed
		if len(b) != 5 || b["prompt"] != "make it night" || b["model_index"] != float64(19) || b["width"] != float64(1536) || b["height"] != float64(1024) {
			t.Errorf("call %d body %v", i, b)
		}
	}
	after := scrape(t)
	if d := after.delta(before, "caddy_zimage_requests_total", "endpoint", "images_edits", "model", "Qwen-Image-Edit", "code", "200"); d != 1 {
		t.Errorf("requests_total{images_edits,200} +%v, want +1", d)
	}
	if d := after.delta(before, "caddy_zimage_enhance_total", "outcome", "skipped"); d != 1 {
		t.Errorf("enhance_total{skipped} +%v, want +1", d)
	}
}

// A request shaped exactly like Open WebUI's image editing.
func TestEditsOpenWebUIShape(t *testing.T) {
	f := newEditFake(t)
	editSite(t, f, "on", "")
	src := storeTestPNG(t, 20, 20)
	ct, body := multipartBody(t, [][2]string{{"model", "Qwen-Image-Edit"}, {"prompt", "add a hat"}, {"n", "1"}, {"size", "512x512"}, {"response_format", "b64_json"}},
		map[string][]byte{"image": src})
	status, _, raw := postEdit(t, ct, body)
	if status != http.StatusOK {
		t.Fatalf("%d %s", status, raw)
	}
	a := parseImages(t, raw)
	if b, err := base64.StdEncoding.DecodeString(a.Data[0].B64JSON); err != nil || !bytes.Equal(b, f.result) || a.Data[0].RevisedPrompt != "add a hat" {
		t.Fatalf("b64_json is not the edited image (%v)", err)
	}
	// and image[] with one file is the same (docs/design.md#edits)
	ct, body = multipartBody(t, [][2]string{{"prompt", "add a hat"}}, map[string][]byte{"image[]": src})
	if status, _, raw := postEdit(t, ct, body); status != http.StatusOK {
		t.Fatalf("image[]: %d %s", status, raw)
	}
}

func TestEditsErrors(t *testing.T) {
	f := newEditFake(t)
	png := storeTestPNG(t, 8, 8)
	for _, tc := range []struct {
		name         string
		store, extra string
		fields       [][2]string
		files        map[string][]byte
		status       int
		param, code  string
	}{
		{"mask", "on", "", [][2]string{{"prompt", "x"}, {"mask", "m"}}, map[string][]byte{"image": png}, 400, "mask", "invalid_request"},
		{"mask file", "on", "", [][2]string{{"prompt", "x"}}, map[string][]byte{"image": png, "mask": png}, 400, "mask", "invalid_request"},
		{"no image", "on", "", [][2]string{{"prompt", "x"}}, nil, 400, "image", "invalid_request"},
		{"no prompt", "on", "", nil, map[string][]byte{"image": png}, 400, "prompt", "invalid_request"},
		{"not an image", "on", "", [][2]string{{"prompt", "x"}}, map[string][]byte{"image": []byte("GIF89a not allowed")}, 400, "image", "invalid_request"},
		{"html", "on", "", [][2]string{{"prompt", "x"}}, map[string][]byte{"image": []byte("<html>")}, 400, "image", "invalid_request"},
		{"png signature, garbage header", "on", "", [][2]string{{"prompt", "x"}}, map[string][]byte{"image": []byte("\x89PNG\r\n\x1a\n<html><body>not an image</body></html>")}, 400, "image", "invalid_request"},
		{"too large", "on", "max_upload 1KiB", [][2]string{{"prompt", "x"}}, map[string][]byte{"image": append(append([]byte{}, png...), make([]byte, 2048)...)}, 413, "image", "request_too_large"},
		{"store off", "", "", [][2]string{{"prompt", "x"}}, map[string][]byte{"image": png}, 400, "image", "store_required"},
		{"bad n", "on", "", [][2]string{{"prompt", "x"}, {"n", "5"}}, map[string][]byte{"image": png}, 400, "n", "invalid_request"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			editSite(t, f, tc.store, tc.extra)
			ct, body := multipartBody(t, tc.fields, tc.files)
			status, hdr, raw := postEdit(t, ct, body)
			e := itWantErr(t, status, hdr, raw, tc.status, tc.code)
			if e.Param == nil || *e.Param != tc.param {
				t.Errorf("param %v, want %q: %s", e.Param, tc.param, e.Message)
			}
		})
	}
	t.Run("seventeen images", func(t *testing.T) {
		editSite(t, f, "on", "")
		var b bytes.Buffer
		mw := multipart.NewWriter(&b)
		mw.WriteField("prompt", "x")
		for range maxEditImages + 1 {
			fw, _ := mw.CreateFormFile("image[]", "a.png")
			fw.Write(png)
		}
		mw.Close()
		status, hdr, raw := postEdit(t, mw.FormDataContentType(), &b)
		if e := itWantErr(t, status, hdr, raw, 400, "invalid_request"); e.Param == nil || *e.Param != "image" {
			t.Errorf("param %v", e.Param)
		}
	})
	t.Run("no edit model", func(t *testing.T) {
		startCaddy(t, gatewaySite(f.fakeUpstream, nil, fmt.Sprintf("store {\n\t\tstorage file_system %s\n\t}", t.TempDir())))
		ct, body := multipartBody(t, [][2]string{{"prompt", "x"}}, map[string][]byte{"image": png})
		status, hdr, raw := postEdit(t, ct, body)
		if e := itWantErr(t, status, hdr, raw, 400, "model_not_found"); !strings.Contains(e.Message, "add 'edit' to a model block") {
			t.Errorf("message %q", e.Message)
		}
		// chat with an image: the same 400 (docs/design.md#edits)
		status, hdr, raw = do(t, http.MethodPost, "/v1/chat/completions", chatWithImage(t, "make it red", "https://example.com/a.png"))
		itWantErr(t, status, hdr, raw, 400, "model_not_found")
	})
	t.Run("not multipart", func(t *testing.T) {
		editSite(t, f, "on", "")
		status, hdr, raw := postEdit(t, "text/plain", strings.NewReader(`{"prompt":"x"}`))
		itWantErr(t, status, hdr, raw, http.StatusUnsupportedMediaType, "unsupported_media_type")
	})
	if bodies, _ := f.got(); len(bodies) != 0 {
		t.Errorf("the service was called %d times for requests that fail", len(bodies))
	}
}

// chatWithImage is a chat body whose latest user message has text and an
// image part.
func chatWithImage(t *testing.T, text, imageURL string, extra ...string) string {
	t.Helper()
	msg := map[string]any{"role": "user", "content": []any{
		map[string]any{"type": "text", "text": text},
		map[string]any{"type": "image_url", "image_url": map[string]any{"url": imageURL}},
	}}
	body := map[string]any{"model": "Z-Image", "messages": []any{msg}}
	for i := 0; i+1 < len(extra); i += 2 {
		var v any
		json.Unmarshal([]byte(extra[i+1]), &v)
		body[extra[i]] = v
	}
	b, _ := json.Marshal(body)
	return string(b)
}

// Images in chat (docs/design.md#edits): a data: URL is stored and given to the
// service by its public URL; an https URL is passed on unchanged and never
// fetched; the markdown of an edit, byte for byte.
func TestEditsInChat(t *testing.T) {
	f := newEditFake(t)
	editSite(t, f, "on", "")
	src := storeTestPNG(t, 64, 48)
	dataURL := "data:image/png;base64," + base64.StdEncoding.EncodeToString(src)

	content := itOK(t, chatWithImage(t, "make it night", dataURL))
	bodies, sources := f.got()
	if len(bodies) != 1 || !bytes.Equal(sources[0], src) {
		t.Fatalf("the service did not get the attached image: %v", bodies)
	}
	srcURL := bodies[0]["image_source"].(string)
	if !storeURLPattern.MatchString(srcURL) {
		t.Errorf("image_source %q is not on the gateway's origin", srcURL)
	}
	resultURL := storeURLPattern.FindString(strings.SplitN(content, "\n", 2)[0])
	// the resolution is the returned image's (12×8), which the store's copy
	// shows, not the 88×64 sent for the 64×48 source
	want := "![make it night](" + resultURL + ")\n\n---\n**✏️ Edit Instruction:**\nmake it night\n\n**🖼️ Source:** <" + srcURL + ">\n**📐 Resolution:** 12×8"
	if bodies[0]["width"] != float64(88) || bodies[0]["height"] != float64(64) {
		t.Errorf("size sent %v×%v, want 88×64", bodies[0]["width"], bodies[0]["height"])
	}
	if content != want {
		t.Errorf("markdown\n%q\nwant\n%q", content, want)
	}

	// streamed, the same content
	status, _, raw := do(t, http.MethodPost, "/v1/chat/completions", chatWithImage(t, "make it night", dataURL, "stream", "true"))
	if status != 200 || !strings.Contains(string(raw), `**✏️ Edit Instruction:**\nmake it night`) {
		t.Errorf("stream: %d %s", status, raw)
	}

	// an https URL of the client's: passed on, never fetched
	var hits atomic.Int32
	theirs := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { hits.Add(1) }))
	defer theirs.Close()
	content = itOK(t, chatWithImage(t, "make it red", theirs.URL+"/cat.png"))
	bodies, _ = f.got()
	if got := bodies[len(bodies)-1]["image_source"]; got != theirs.URL+"/cat.png" {
		t.Errorf("image_source %v, want the client's URL unchanged", got)
	}
	if hits.Load() != 0 {
		t.Errorf("the gateway fetched the client's image URL")
	}
	if b := bodies[len(bodies)-1]; b["width"] != float64(1024) || b["height"] != float64(1024) {
		t.Errorf("a source of unknown size: sent %v×%v, want 1024×1024", b["width"], b["height"])
	}
	if !strings.HasSuffix(content, "**🖼️ Source:** <"+theirs.URL+"/cat.png>\n**📐 Resolution:** 12×8") {
		t.Errorf("markdown ends %q", content[max(0, len(content)-80):])
	}

	// without the store the gateway never holds the result: the size sent
	editSite(t, f, "", "")
	content = itOK(t, chatWithImage(t, "make it red", theirs.URL+"/cat.png"))
	if !strings.HasSuffix(content, "**🖼️ Source:** <"+theirs.URL+"/cat.png>\n**📐 Resolution:** 1024×1024") {
		t.Errorf("markdown without the result's bytes ends %q", content[max(0, len(content)-80):])
	}
}

func TestEditsChatHostile(t *testing.T) {
	f := newEditFake(t)
	editSite(t, f, "on", "")
	huge := "data:image/png;base64," + strings.Repeat("A", 30<<20)
	for _, tc := range []struct {
		name, url string
		status    int
		code      string
	}{
		{"javascript URL", "javascript:alert(1)", 400, "invalid_request"},
		{"file URL", "file:///etc/passwd", 400, "invalid_request"},
		{"credentials in the URL", "https://user:pw@example.com/a.png", 400, "invalid_request"},
		{"bad base64", "data:image/png;base64,!!!!", 400, "invalid_request"},
		{"wrong mime", "data:text/html;base64," + base64.StdEncoding.EncodeToString([]byte("<b>x</b>")), 400, "invalid_request"},
		{"declared png, bytes html", "data:image/png;base64," + base64.StdEncoding.EncodeToString([]byte("<html>")), 400, "invalid_request"},
		{"not base64", "data:image/png,rawbytes", 400, "invalid_request"},
		{"30 MB data URL", huge, 413, "request_too_large"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			status, hdr, raw := do(t, http.MethodPost, "/v1/chat/completions", chatWithImage(t, "edit", tc.url))
			e := itWantErr(t, status, hdr, raw, tc.status, tc.code)
			if tc.status == 413 && !strings.Contains(e.Message, "20 MiB for an image to edit (max_upload)") {
				t.Errorf("message %q", e.Message)
			}
		})
	}
	if bodies, _ := f.got(); len(bodies) != 0 {
		t.Errorf("the service was called %d times for hostile requests", len(bodies))
	}
}

// The demo upstream edits too: a placeholder of the source's size.
func TestEditsDemo(t *testing.T) {
	startCaddy(t, fmt.Sprintf("zimage_gateway {\n\tapi_key %s\n\tupstream demo\n\tenhance off\n\tmodel Z-Image\n\tmodel Edit {\n\t\tmodel_index 19\n\t\tedit\n\t}\n\tstore {\n\t\tstorage file_system %s\n\t}\n}", testClientKey, t.TempDir()))
	ct, body := multipartBody(t, [][2]string{{"prompt", "tint it"}}, map[string][]byte{"image": storeTestPNG(t, 320, 200)})
	status, _, raw := postEdit(t, ct, body)
	if status != http.StatusOK {
		t.Fatalf("%d %s", status, raw)
	}
	u := parseImages(t, raw).Data[0].URL
	if status, b := getURL(t, u); status != 200 || imageSizeOf(b) != "320x200" {
		t.Errorf("demo edit %s: %d, %s, want the source's 320x200", u, status, imageSizeOf(b))
	}
	// the placeholder has the size sent: a small source fitted, or the
	// request's size (docs/design.md#edits)
	for size, want := range map[string]string{"": "96x64", "512x256": "512x256"} {
		ct, body := multipartBody(t, [][2]string{{"prompt", "tint it"}, {"size", size}}, map[string][]byte{"image": storeTestPNG(t, 30, 20)})
		status, _, raw := postEdit(t, ct, body)
		if status != http.StatusOK {
			t.Fatalf("%d %s", status, raw)
		}
		if status, b := getURL(t, parseImages(t, raw).Data[0].URL); status != 200 || imageSizeOf(b) != want {
			t.Errorf("demo edit with size %q: %d, %s, want %s", size, status, imageSizeOf(b), want)
		}
	}
}

// Streaming the Images API (docs/design.md#answers) through the SDK's streaming
// methods: one completed event per image, then the end; a failure is an
// error event.
func TestEditsStreamingImages(t *testing.T) {
	f := newEditFake(t)
	editSite(t, f, "on", "")
	client := sdkFor(baseURL+"/v1/", testClientKey)
	ctx := context.Background()

	gen := client.Images.GenerateStreaming(ctx, openai.ImageGenerateParams{Prompt: "a cat", N: openai.Int(2)})
	var got int
	for gen.Next() {
		ev := gen.Current()
		if ev.Type != "image_generation.completed" {
			t.Fatalf("event %q", ev.Type)
		}
		c := ev.AsImageGenerationCompleted()
		if b, err := base64.StdEncoding.DecodeString(c.B64JSON); err != nil || !bytes.Equal(b, f.result) || c.Size != "12x8" || c.OutputFormat != "png" || c.CreatedAt == 0 {
			t.Errorf("event %+v (%v)", c.Size, err)
		}
		// every field the SDK marks as required is present (docs/design.md#answers)
		for name, f := range map[string]interface{ Valid() bool }{"b64_json": c.JSON.B64JSON, "background": c.JSON.Background, "created_at": c.JSON.CreatedAt,
			"output_format": c.JSON.OutputFormat, "quality": c.JSON.Quality, "size": c.JSON.Size, "usage": c.JSON.Usage} {
			if !f.Valid() {
				t.Errorf("completed event without %s", name)
			}
		}
		got++
	}
	if err := gen.Err(); err != nil || got != 2 {
		t.Fatalf("generate stream: %d events, %v", got, err)
	}

	edit := client.Images.EditStreaming(ctx, openai.ImageEditParams{
		Image:         openai.ImageEditParamsImageUnion{OfFile: openai.File(bytes.NewReader(storeTestPNG(t, 10, 10)), "a.png", "image/png")},
		Prompt:        "make it night",
		PartialImages: openai.Int(2),
	})
	got = 0
	for edit.Next() {
		ev := edit.Current()
		if ev.Type != "image_edit.completed" || ev.AsImageEditCompleted().B64JSON == "" {
			t.Fatalf("event %+v", ev.Type)
		}
		if c := ev.AsImageEditCompleted(); !c.JSON.Quality.Valid() || !c.JSON.Background.Valid() || c.Quality != "auto" || c.Background != "auto" {
			t.Errorf("edit completed event: quality %q, background %q", c.Quality, c.Background)
		}
		got++
	}
	if err := edit.Err(); err != nil || got != 1 {
		t.Fatalf("edit stream: %d events, %v", got, err)
	}

	// LibreChat's request (OpenAIImageTools.js), to a gateway whose model
	// answers to LibreChat's hard-coded name: stream with partial_images 3;
	// the service has none, so the completed event is all that comes
	startCaddy(t, gatewaySite(f.fakeUpstream, nil, "model Z-Image {\n\t\talias gpt-image-1\n\t}"))
	status, hdr, raw := do(t, http.MethodPost, "/v1/images/generations",
		`{"model":"gpt-image-1","prompt":"a cat","n":1,"background":"auto","output_format":"png","quality":"auto","size":"auto","stream":true,"partial_images":3}`)
	if status != 200 || !strings.HasPrefix(hdr.Get("Content-Type"), "text/event-stream") ||
		strings.Count(string(raw), "event: image_generation.completed\n") != 1 || strings.Contains(string(raw), "partial_image") {
		t.Errorf("LibreChat's streamed request: %d %.300s", status, raw)
	}

	// a failure after the stream began is an error event (a new client:
	// fresh connections after the reload above)
	client = sdkFor(baseURL+"/v1/", testClientKey)
	f.setHandler(failWith(500, `{"error":"boom"}`))
	gen = client.Images.GenerateStreaming(ctx, openai.ImageGenerateParams{Prompt: "a cat"})
	for gen.Next() {
		t.Fatalf("an event from a failed generation: %v", gen.Current().Type)
	}
	if err := gen.Err(); err == nil || !strings.Contains(err.Error(), "boom") {
		t.Errorf("error %v, want the service's message", err)
	}
	status, hdr, raw = do(t, http.MethodPost, "/v1/images/generations", `{"prompt":"a cat","stream":true}`)
	if status != 200 || !strings.HasPrefix(hdr.Get("Content-Type"), "text/event-stream") || !strings.Contains(string(raw), "event: error\ndata: {\"type\":\"error\",\"error\":{") {
		t.Errorf("raw error stream: %d %s", status, raw)
	}
}

// pngHeader is a PNG signature and an IHDR chunk claiming w×h, with no
// pixels at all: a decompression bomb by dimension.
func pngHeader(w, h uint32) []byte {
	b := []byte("\x89PNG\r\n\x1a\n\x00\x00\x00\x0dIHDR")
	b = binary.BigEndian.AppendUint32(b, w)
	b = binary.BigEndian.AppendUint32(b, h)
	b = append(b, 8, 6, 0, 0, 0)
	return binary.BigEndian.AppendUint32(b, crc32.ChecksumIEEE(b[12:]))
}

func TestUnitEditsSourceSize(t *testing.T) {
	webpLossless := []byte("RIFF\x00\x00\x00\x00WEBPVP8L\x00\x00\x00\x00\x2f")
	v := uint32(640-1) | uint32(480-1)<<14
	webpLossless = binary.LittleEndian.AppendUint32(webpLossless, v)
	webpLossless = append(webpLossless, make([]byte, 10)...)
	webpExt := []byte("RIFF\x00\x00\x00\x00WEBPVP8X\x0a\x00\x00\x00\x00\x00\x00\x00")
	webpExt = append(webpExt, byte(1919&0xff), byte(1919>>8), 0, byte(1079&0xff), byte(1079>>8), 0)
	webpExt = append(webpExt, make([]byte, 10)...)
	webpLossy := []byte("RIFF\x00\x00\x00\x00WEBPVP8 \x00\x00\x00\x00\x00\x00\x00\x9d\x01\x2a")
	webpLossy = binary.LittleEndian.AppendUint16(webpLossy, 300)
	webpLossy = binary.LittleEndian.AppendUint16(webpLossy, 200)
	webpLossy = append(webpLossy, make([]byte, 10)...)
	for _, tc := range []struct {
		name      string
		b         []byte
		ok        bool
		ext       string
		w, h      int
		wantParam string
	}{
		{"png", storeTestPNG(t, 33, 17), true, "png", 33, 17, ""},
		{"png header only, 16384×16384", pngHeader(16384, 16384), true, "png", 16384, 16384, ""},
		{"png header only, 100000×100000", pngHeader(100000, 100000), false, "", 0, 0, "image"},
		{"webp lossless", webpLossless, true, "webp", 640, 480, ""},
		{"webp extended", webpExt, true, "webp", 1920, 1080, ""},
		{"webp lossy", webpLossy, true, "webp", 300, 200, ""},
		{"webp truncated", []byte("RIFF\x00\x00\x00\x00WEBPVP8X"), false, "", 0, 0, "image"},
		{"gif is not an edit source", []byte("GIF89a\x01\x00\x01\x00"), false, "", 0, 0, "image"},
		{"text", []byte("hello"), false, "", 0, 0, "image"},
		{"empty", nil, false, "", 0, 0, "image"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			allocs := testing.AllocsPerRun(1, func() { checkSource(tc.b, "image") })
			s, e := checkSource(tc.b, "image")
			if !tc.ok {
				if e == nil || e.param != tc.wantParam || e.status != 400 {
					t.Fatalf("checkSource = %+v, %+v, want a 400", s, e)
				}
				return
			}
			if e != nil || s.ext != tc.ext || s.width != tc.w || s.height != tc.h {
				t.Fatalf("checkSource = %+v, %+v, want %s %dx%d", s, e, tc.ext, tc.w, tc.h)
			}
			if allocs > 50 {
				t.Errorf("%v allocations to read a header", allocs)
			}
		})
	}
	// the bomb is never decoded: reading its size costs no pixel memory
	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)
	for range 10 {
		checkSource(pngHeader(100000, 100000), "image")
	}
	runtime.ReadMemStats(&after)
	if grew := after.TotalAlloc - before.TotalAlloc; grew > 1<<20 {
		t.Errorf("reading 10 bomb headers allocated %d bytes", grew)
	}
}

func TestUnitEditsDataURL(t *testing.T) {
	t.Parallel()
	png := storeTestPNG(t, 4, 4)
	b64 := base64.StdEncoding.EncodeToString(png)
	for _, tc := range []struct {
		name, url string
		limit     int64
		status    int
	}{
		{"png", "data:image/png;base64," + b64, 1 << 20, 0},
		{"declared jpeg, bytes png: the bytes decide", "data:image/jpeg;base64," + b64, 1 << 20, 0},
		{"unpadded", "data:image/png;base64," + strings.TrimRight(b64, "="), 1 << 20, 0},
		{"upper-case scheme", "DATA:image/png;BASE64," + b64, 1 << 20, 0},
		{"not an image type", "data:text/plain;base64," + b64, 1 << 20, 400},
		{"not base64", "data:image/png," + b64, 1 << 20, 400},
		{"bad base64", "data:image/png;base64,***", 1 << 20, 400},
		{"over the limit, by the declared length", "data:image/png;base64," + strings.Repeat("A", 4000), 1000, 413},
		{"no comma", "data:image/png;base64", 1 << 20, 400},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s, e := decodeDataURL(tc.url, tc.limit, "p")
			if tc.status == 0 {
				if e != nil || !bytes.Equal(s.data, png) {
					t.Fatalf("decodeDataURL = %v, %+v", s, e)
				}
				return
			}
			if e == nil || e.status != tc.status {
				t.Fatalf("decodeDataURL = %v, %+v, want %d", s, e, tc.status)
			}
		})
	}
}

func FuzzEditsDataURL(f *testing.F) {
	f.Add("data:image/png;base64," + base64.StdEncoding.EncodeToString(pngHeader(100000, 100000)))
	f.Add("data:image/webp;base64,UklGRgAAAABXRUJQVlA4WAoAAAAAAAAAAAAAAA==")
	f.Add("data:;base64,")
	f.Add("data:image/png;base64,====")
	f.Fuzz(func(t *testing.T, u string) {
		s, e := decodeDataURL(u, 1<<16, "p")
		if (s == nil) == (e == nil) {
			t.Fatalf("decodeDataURL(%q) = %v, %v", u, s, e)
		}
		if s != nil && (len(s.data) > 1<<16 || s.width < 0 || s.height < 0) {
			t.Fatalf("decodeDataURL(%q) = %d bytes, %dx%d", u, len(s.data), s.width, s.height)
		}
	})
}

// FuzzEditsForm feeds the multipart parser arbitrary bodies: it answers a
// form or an OpenAI error, never panics, and never holds more than the
// limit of an image.
func FuzzEditsForm(f *testing.F) {
	seed := func(fields [][2]string, files map[string][]byte) {
		var b bytes.Buffer
		mw := multipart.NewWriter(&b)
		mw.SetBoundary("fuzzboundary")
		for _, fl := range fields {
			mw.WriteField(fl[0], fl[1])
		}
		for name, data := range files {
			fw, _ := mw.CreateFormFile(name, "x.png")
			fw.Write(data)
		}
		mw.Close()
		f.Add(b.Bytes())
	}
	seed([][2]string{{"prompt", "a"}, {"n", "2"}}, map[string][]byte{"image": pngHeader(8, 8)})
	seed([][2]string{{"prompt", "a"}}, map[string][]byte{"image[]": pngHeader(100000, 1), "mask": {1}})
	seed(nil, map[string][]byte{"image": make([]byte, 5000)})
	f.Add([]byte("--fuzzboundary\r\nContent-Disposition: form-data; name=\"image\"\r\n\r\n\x89PNG"))
	g := &Gateway{MaxUpload: 4096}
	f.Fuzz(func(t *testing.T, body []byte) {
		r := httptest.NewRequest(http.MethodPost, "/v1/images/edits", bytes.NewReader(body))
		r.Header.Set("Content-Type", "multipart/form-data; boundary=fuzzboundary")
		form, e := g.parseEditForm(httptest.NewRecorder(), r, nil)
		if (form == nil) == (e == nil) {
			t.Fatalf("parseEditForm = %v, %v", form, e)
		}
		if e != nil && (e.status < 400 || e.status > 415 || e.message == "") {
			t.Fatalf("error %+v", e)
		}
		if form != nil && (form.source == nil || int64(len(form.source.data)) > g.MaxUpload) {
			t.Fatalf("form %+v", form)
		}
	})
}

// Edits share the pipeline (docs/design.md#edits): /v1/models lists edit models like
// the others, the service's 429 is passed on, and the generation line says
// the size came from the source.
func TestEditsPipeline(t *testing.T) {
	f := newEditFake(t)
	editSite(t, f, "on", "")
	status, _, raw := do(t, http.MethodGet, "/v1/models", "")
	if status != 200 || !strings.Contains(string(raw), `"id":"Qwen-Image-Edit","object":"model"`) || !strings.Contains(string(raw), `"id":"Z-Image"`) {
		t.Fatalf("models: %d %s", status, raw)
	}
	ct, body := multipartBody(t, [][2]string{{"prompt", "log me"}}, map[string][]byte{"image": storeTestPNG(t, 30, 20)})
	if status, _, raw := postEdit(t, ct, body); status != 200 {
		t.Fatalf("%d %s", status, raw)
	}
	var line map[string]any
	for _, l := range readLog(t) {
		if l["msg"] == "generation" && l["endpoint"] == endpointEdits {
			line = l
		}
	}
	// 30×20 is sent fitted (96×64); the service answered 12×8, which is logged
	if line == nil || line["ratio_source"] != "source" || line["enhance"] != "skipped" || line["size"] != "96x64" || line["model"] != "Qwen-Image-Edit" || line["stored"] != true ||
		line["size_sent"] != "96x64" || line["size_returned"] != "12x8" {
		t.Errorf("generation line %v", line)
	}

	f.setHandler(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Retry-After", "7")
		failWith(429, `{"error":"slow down"}`)(w, r)
	})
	ct, body = multipartBody(t, [][2]string{{"prompt", "x"}}, map[string][]byte{"image": storeTestPNG(t, 4, 4)})
	status, hdr, raw := postEdit(t, ct, body)
	if itWantErr(t, status, hdr, raw, 429, "rate_limit_exceeded"); hdr.Get("Retry-After") != "7" {
		t.Errorf("Retry-After %q", hdr.Get("Retry-After"))
	}
}

// A streamed Images API request gets keep-alives while its image is made
// (docs/design.md#answers): the service answers only after the client saw one.
func TestEditsStreamingKeepAlive(t *testing.T) {
	f := newEditFake(t)
	release := make(chan struct{})
	handler := f.handler
	f.setHandler(func(w http.ResponseWriter, r *http.Request) {
		if r.Method == http.MethodPost {
			<-release
		}
		handler(w, r)
	})
	editSite(t, f, "on", "stream_keepalive 50ms")
	req, _ := http.NewRequest(http.MethodPost, baseURL+"/v1/images/generations", strings.NewReader(`{"prompt":"a cat","stream":true}`))
	req.Header.Set("Authorization", "Bearer "+testClientKey)
	req.Header.Set("Content-Type", "application/json")
	t.Cleanup(func() {
		select { // never leave the fake blocked
		case <-release:
		default:
			close(release)
		}
	})
	resp, err := testClient(20 * time.Second).Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 0, 1<<16), 1<<24)
	var lines []string
	for sc.Scan() {
		lines = append(lines, sc.Text())
		if sc.Text() == ": keep-alive" && len(lines) == 1 {
			close(release) // a keep-alive came first: now the image
		}
	}
	if len(lines) < 3 || lines[0] != ": keep-alive" {
		t.Fatalf("stream %q…, want a keep-alive first", lines[:min(len(lines), 3)])
	}
	var event string
	for i, l := range lines {
		if strings.HasPrefix(l, "event: ") {
			event = l
			if i+1 >= len(lines) || !strings.HasPrefix(lines[i+1], `data: {"type":"image_generation.completed","b64_json":"`) {
				t.Errorf("event without its data: %q", lines[i:])
			}
		}
	}
	if event != "event: image_generation.completed" {
		t.Errorf("last event %q", event)
	}
}

// Edits are attributed to their client and held to its max_concurrent
// like generations (docs/design.md#clients-quotas): alice's second edit is a 429 at once while
// her first is at the service.
func TestEditsClientLimit(t *testing.T) {
	up := newFakeUpstream(t)
	g := newGate(t)
	up.setHandler(g.handler)
	startCaddy(t, opsSite(up.endpoint(), nil, "timeout 10s", fmt.Sprintf(`client alice {
		key %s
		max_concurrent 1
	}
	model Z-Image
	model Edit {
		model_index 19
		edit
	}
	store {
		storage file_system %s
	}`, testAliceKey, t.TempDir()))+"\nmetrics /metrics")
	before := scrape(t)
	png := storeTestPNG(t, 8, 8)
	post := func() <-chan result {
		ct, body := multipartBody(t, [][2]string{{"prompt", "x"}}, map[string][]byte{"image": png})
		return sendAsync(http.MethodPost, "/v1/images/edits", body.String(), "Authorization", "Bearer "+testAliceKey, "Content-Type", ct)
	}
	first := post()
	waitFor(t, "alice's edit at the service", func() bool { return up.active.Load() == 1 })
	if r := await(t, post()); r.status != http.StatusTooManyRequests || r.header.Get("Retry-After") == "" {
		t.Errorf("alice's second edit: %d %s", r.status, r.body)
	}
	g.open()
	if r := await(t, first); r.status != http.StatusOK {
		t.Errorf("alice's first edit: %d %s", r.status, r.body)
	}
	if d := scrape(t).delta(before, "caddy_zimage_client_requests_total", "client", "alice", "endpoint", "images_edits", "code", "429"); d != 1 {
		t.Errorf("client_requests_total{alice,images_edits,429} +%v, want +1", d)
	}
}

// The requested model when it is an edit model, else the
// first edit model; none configured is a 400 naming the fix.
func TestUnitEditsModelChoice(t *testing.T) {
	t.Parallel()
	g := &Gateway{}
	g.Models = []ModelConfig{{Name: "Z-Image"}, {Name: "Edit-A", Edit: true}, {Name: "Edit-B", Edit: true, Aliases: []string{"qwen"}}}
	if err := g.provisionModels(); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct{ requested, want string }{
		{"", "Edit-A"},
		{"Z-Image", "Edit-A"},
		{"dall-e-2", "Edit-A"},
		{"edit-b", "Edit-B"},
		{"QWEN", "Edit-B"},
		{"Edit-A", "Edit-A"},
	} {
		if m, e := g.editModel(tc.requested); e != nil || m.name != tc.want {
			t.Errorf("editModel(%q) = %v, %v, want %s", tc.requested, m, e, tc.want)
		}
	}
	g.Models = []ModelConfig{{Name: "Z-Image"}}
	if err := g.provisionModels(); err != nil {
		t.Fatal(err)
	}
	if _, e := g.editModel("Z-Image"); e == nil || e.status != 400 || e.code != "model_not_found" || !strings.Contains(e.message, "add 'edit'") {
		t.Errorf("no edit model: %+v", e)
	}
}

// An upload must fit the store it goes into (docs/design.md#edits): with an edit
// model, a max_upload above max_image_size fails at load, naming both;
// without one, uploads never happen and the store's limit is its own.
func TestUnitEditsUploadFitsStore(t *testing.T) {
	unitClearEnv(t)
	_, err := unitProvision(t, `{"no_auth":true,"upstream":{"url":"demo"},"models":[{"name":"E","edit":true}],"max_upload":10485760,"store":{"max_image_size":1048576,"storage":{"module":"file_system","root":"`+t.TempDir()+`"}}}`)
	if err == nil || !strings.Contains(err.Error(), "max_upload (10 MiB)") || !strings.Contains(err.Error(), "max_image_size (1 MiB)") {
		t.Fatalf("error %v", err)
	}
	for _, ok := range []string{
		`{"no_auth":true,"upstream":{"url":"demo"},"models":[{"name":"E","edit":true}],"max_upload":1048576,"store":{"storage":{"module":"file_system","root":"` + t.TempDir() + `"}}}`,
		`{"no_auth":true,"upstream":{"url":"demo"},"max_upload":10485760,"store":{"max_image_size":1048576,"storage":{"module":"file_system","root":"` + t.TempDir() + `"}}}`,
	} {
		if _, err := unitProvision(t, ok); err != nil {
			t.Errorf("%s: %v", ok, err)
		}
	}
}

// formPart is one part of a multipart body, in order: a field, or a file
// when data is set.
type formPart struct {
	name, value string
	data        []byte
}

func orderedForm(t *testing.T, parts []formPart) (string, *bytes.Buffer) {
	t.Helper()
	var b bytes.Buffer
	mw := multipart.NewWriter(&b)
	for i, p := range parts {
		if p.data == nil {
			mw.WriteField(p.name, p.value)
			continue
		}
		fw, err := mw.CreateFormFile(p.name, fmt.Sprintf("image-%d.png", i))
		if err != nil {
			t.Fatal(err)
		}
		fw.Write(p.data)
	}
	mw.Close()
	return mw.FormDataContentType(), &b
}

// Edits as the chat clients really send them (docs/design.md#edits): several images
// (the first is edited, the rest counted), and OpenAI's JSON form.
func TestEditsClientShapes(t *testing.T) {
	f := newEditFake(t)
	first, second, third := storeTestPNG(t, 300, 200), storeTestPNG(t, 40, 40), storeTestPNG(t, 50, 50)
	// a client's own image, never fetched
	var hits atomic.Int32
	theirs := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { hits.Add(1) }))
	defer theirs.Close()
	jsonEdit := func(images string) func() (string, io.Reader) {
		return func() (string, io.Reader) {
			return "application/json", strings.NewReader(`{"model":"gpt-image-1","prompt":"add a hat","images":` + images + `,"size":"1024x1536","n":1}`)
		}
	}
	form := func(parts ...formPart) func() (string, io.Reader) {
		return func() (string, io.Reader) { return orderedForm(t, parts) }
	}
	dataURL := "data:image/png;base64," + base64.StdEncoding.EncodeToString(first)
	for _, tc := range []struct {
		name    string
		body    func() (string, io.Reader)
		source  []byte // what the service must download; nil: a client URL
		srcURL  string // the client URL passed on
		w, h    float64
		ignored float64
	}{
		// Open WebUI (routers/images.py): its fields, then each image as
		// its own image[] part
		{"open webui", form(formPart{name: "model", value: "Qwen-Image-Edit"}, formPart{name: "prompt", value: "add a hat"}, formPart{name: "n", value: "1"},
			formPart{name: "response_format", value: "b64_json"}, formPart{name: "image[]", data: first}, formPart{name: "image[]", data: second}), first, "", 304, 200, 1},
		// Cherry Studio (paintings/providers/newapi): prompt, an empty
		// model, the size, then image repeated
		{"cherry studio", form(formPart{name: "prompt", value: "add a hat"}, formPart{name: "model", value: ""}, formPart{name: "size", value: "1024x1024"},
			formPart{name: "image", data: first}, formPart{name: "image", data: second}, formPart{name: "image", data: third}), first, "", 1024, 1024, 2},
		// OpenAI's JSON form: a data: URL is stored, an https URL passed on
		{"json data url", jsonEdit(`[{"image_url":"` + dataURL + `"},{"image_url":"` + theirs.URL + `/b.png"}]`), first, "", 1024, 1536, 1},
		{"json client url", jsonEdit(`[{"image_url":"` + theirs.URL + `/a.png"}]`), nil, theirs.URL + "/a.png", 1024, 1536, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			editSite(t, f, "on", "")
			before, _ := f.got()
			ct, body := tc.body()
			status, _, raw := postEdit(t, ct, body)
			if status != http.StatusOK {
				t.Fatalf("%d %s", status, raw)
			}
			bodies, sources := f.got()
			if len(bodies) != len(before)+1 {
				t.Fatalf("%d service calls, want 1", len(bodies)-len(before))
			}
			b, src := bodies[len(bodies)-1], sources[len(sources)-1]
			if tc.source != nil && !bytes.Equal(src, tc.source) {
				t.Errorf("the service downloaded %d bytes, not the first image", len(src))
			}
			if tc.srcURL != "" && b["image_source"] != tc.srcURL {
				t.Errorf("image_source %v, want the client's URL", b["image_source"])
			}
			if b["width"] != tc.w || b["height"] != tc.h {
				t.Errorf("size sent %v×%v, want %v×%v", b["width"], b["height"], tc.w, tc.h)
			}
			var line map[string]any
			for _, l := range readLog(t) {
				if l["msg"] == "generation" && l["endpoint"] == endpointEdits {
					line = l
				}
			}
			if got, _ := line["images_ignored"].(float64); got != tc.ignored {
				t.Errorf("images_ignored %v, want %v", line["images_ignored"], tc.ignored)
			}
		})
	}
	if hits.Load() != 0 {
		t.Errorf("the gateway fetched a client's image URL %d times", hits.Load())
	}

	for _, tc := range []struct {
		name, body, param string
	}{
		{"file_id", `{"prompt":"x","images":[{"file_id":"file-abc"}]}`, "images"},
		{"no images", `{"prompt":"x"}`, "images"},
		{"seventeen", `{"prompt":"x","images":[` + strings.Repeat(`{"image_url":"https://example.com/a.png"},`, maxEditImages) + `{"image_url":"https://example.com/a.png"}]}`, "images"},
		{"javascript url", `{"prompt":"x","images":[{"image_url":"javascript:alert(1)"}]}`, "images"},
		{"bad size", `{"prompt":"x","size":"big","images":[{"image_url":"https://example.com/a.png"}]}`, "size"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			before, _ := f.got()
			status, hdr, raw := postEdit(t, "application/json", strings.NewReader(tc.body))
			if e := itWantErr(t, status, hdr, raw, 400, "invalid_request"); e.Param == nil || *e.Param != tc.param {
				t.Errorf("param %v, want %q: %s", e.Param, tc.param, e.Message)
			}
			if after, _ := f.got(); len(after) != len(before) {
				t.Errorf("the service was called")
			}
		})
	}
}

func TestUnitEditsFitSize(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		w, h         float64
		wantW, wantH int
	}{
		{20, 12, 104, 64},        // Scaled up, then to multiples of 8
		{3000, 2000, 2048, 1368}, // Scaled down
		{1024, 1024, 1024, 1024},
		{640, 480, 640, 480},
		{1001, 999, 1000, 1000},
		{10000, 10, 2048, 64}, // a sliver: each side clamped after scaling
		{0, 0, 1024, 1024},    // unknown
		{-5, 10, 1024, 1024},
	} {
		if w, h := fitEditSize(tc.w, tc.h); w != tc.wantW || h != tc.wantH {
			t.Errorf("fitEditSize(%v, %v) = %d×%d, want %d×%d", tc.w, tc.h, w, h, tc.wantW, tc.wantH)
		}
	}
}

// The source of an edit that failed is deleted again, so the store is no
// free file host (docs/design.md#edits); a source whose bytes were stored before
// stays.
func TestEditsFailedSourceDeleted(t *testing.T) {
	f := newEditFake(t)
	editSite(t, f, "on", "")
	f.mu.Lock() // the edit fake's own handler: records, downloads the source, answers
	ok := f.fakeUpstream.handler
	f.mu.Unlock()
	lastSource := func() string {
		bodies, _ := f.got()
		return bodies[len(bodies)-1]["image_source"].(string)
	}
	for _, tc := range []struct {
		name   string
		status int
		fail   http.HandlerFunc
	}{
		{"service error", 502, failWith(500, `{"error":"boom"}`)},
		{"service busy", 429, failWith(429, `{"error":"slow down"}`)},
		{"not an answer", 502, failWith(200, `{"success":false,"error":"bad prompt"}`)},
	} {
		t.Run(tc.name, func(t *testing.T) {
			// the fake records the call and downloads the source, then
			// fails it
			f.setHandler(func(w http.ResponseWriter, r *http.Request) {
				if r.Method == http.MethodGet {
					ok(w, r)
					return
				}
				rec := httptest.NewRecorder()
				ok(rec, r)
				tc.fail(w, r)
			})
			src := storeTestPNG(t, 33+len(tc.name), 21) // bytes no other test stored
			ct, body := multipartBody(t, [][2]string{{"prompt", "x"}}, map[string][]byte{"image": src})
			if status, _, raw := postEdit(t, ct, body); status != tc.status {
				t.Fatalf("%d %s, want %d", status, raw, tc.status)
			}
			if status, _ := getURL(t, lastSource()); status != http.StatusNotFound {
				t.Errorf("the failed edit's source is still served: %d", status)
			}
		})
	}

	t.Run("bytes stored before stay", func(t *testing.T) {
		f.setHandler(ok)
		src := storeTestPNG(t, 77, 55)
		ct, body := multipartBody(t, [][2]string{{"prompt", "x"}}, map[string][]byte{"image": src})
		if status, _, raw := postEdit(t, ct, body); status != 200 {
			t.Fatalf("%d %s", status, raw)
		}
		f.setHandler(func(w http.ResponseWriter, r *http.Request) {
			if r.Method == http.MethodGet {
				ok(w, r)
				return
			}
			ok(httptest.NewRecorder(), r)
			failWith(500, `{"error":"boom"}`)(w, r)
		})
		ct, body = multipartBody(t, [][2]string{{"prompt", "x"}}, map[string][]byte{"image": src})
		if status, _, raw := postEdit(t, ct, body); status != 502 {
			t.Fatalf("%d %s", status, raw)
		}
		if status, b := getURL(t, lastSource()); status != 200 || !bytes.Equal(b, src) {
			t.Errorf("a source another edit stored was deleted: %d", status)
		}
	})
}

// A JSON edit larger than max_body is an upload like a chat with an image:
// admitted, and its data: URL decoded in place (uploads.go), not a 413.
func TestEditsJSONLargeDataURL(t *testing.T) {
	f := newEditFake(t)
	editSite(t, f, "on", "max_body 4KiB")
	src := paddedPNG(t, 40<<10)
	body := `{"prompt":"add a hat","images":[{"image_url":"data:image/png;base64,` + base64.StdEncoding.EncodeToString(src) + `"}]}`
	if _, x := extractDataURLs([]byte(body)); x == nil || len(x.images) != 1 || !bytes.Equal(x.images[0], src) {
		t.Errorf("the JSON edit's data: URL is not decoded in place")
	}
	status, _, raw := postEdit(t, "application/json", strings.NewReader(body))
	if status != http.StatusOK {
		t.Fatalf("%d %s", status, raw)
	}
	if _, sources := f.got(); !bytes.Equal(sources[len(sources)-1], src) {
		t.Errorf("the service did not get the image")
	}
	// and a text body that large without an image is a 413
	status, hdr, raw := postEdit(t, "application/json", strings.NewReader(`{"prompt":"`+strings.Repeat("a", 8<<10)+`"}`))
	itWantErr(t, status, hdr, raw, http.StatusRequestEntityTooLarge, "request_too_large")
}
