package zimage

import (
	"bytes"
	"encoding/base64"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"image"
	_ "image/gif" // DecodeConfig of the formats the service may answer
	_ "image/jpeg"
	_ "image/png"
	"io"
	"mime"
	"mime/multipart"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"unicode/utf8"

	"go.uber.org/zap"
)

// Image edits (SPEC §10): POST /v1/images/edits with an uploaded image, and
// chat messages with an image part. The 梦羽 service edits an image it
// downloads itself, so an uploaded source is put into the store (§9) and
// the service is given its public URL.

const (
	endpointEdits    = "images_edits"
	defaultMaxUpload = 20 << 20
	// maxFormField bounds a multipart field that is not the image: a
	// prompt, a model name, a number
	maxFormField = 64 << 10
	maxFormParts = 32
)

// sourceImage is the image an edit starts from.
type sourceImage struct {
	data          []byte // an upload or a data: URL; nil for a client's own URL
	url           string // the client's http(s) URL, passed on unchanged
	ext           string
	width, height int // from the header; 0 when unknown
}

// editForm is a parsed /v1/images/edits request.
type editForm struct {
	prompt, model, format, n string
	stream                   bool
	source                   *sourceImage
}

// parseEditForm reads the multipart body of /v1/images/edits as it
// arrives: the image within max_upload (413 beyond, without reading the
// rest), other fields within 64 KiB each.
func (g *Gateway) parseEditForm(w http.ResponseWriter, r *http.Request) (*editForm, *apiError) {
	mt, params, err := mime.ParseMediaType(r.Header.Get("Content-Type"))
	if err != nil || mt != "multipart/form-data" || params["boundary"] == "" {
		return nil, &apiError{status: http.StatusUnsupportedMediaType, typ: "invalid_request_error", code: "unsupported_media_type",
			message: "Send the edit as multipart/form-data with the image in the field 'image', as the OpenAI Images API does"}
	}
	// the whole body: the image plus its fields and the multipart framing
	limit := g.MaxUpload + 1<<20
	mr := multipart.NewReader(http.MaxBytesReader(w, r.Body, limit), params["boundary"])
	f := &editForm{}
	for parts := 0; ; parts++ {
		p, err := mr.NextPart()
		if err == io.EOF {
			break
		}
		if err != nil {
			return nil, g.formError(err, limit)
		}
		if parts >= maxFormParts {
			return nil, invalidRequest("", fmt.Sprintf("The form has more than %d fields", maxFormParts))
		}
		name := p.FormName()
		switch name {
		case "image", "image[]":
			if f.source != nil {
				return nil, invalidRequest("image", "Send one image: the image service edits one image at a time")
			}
			b, e := readLimited(p, g.MaxUpload)
			if e != nil {
				return nil, e
			}
			if f.source, e = checkSource(b, "image"); e != nil {
				return nil, e
			}
			continue
		case "mask", "mask[]":
			return nil, invalidRequest("mask", "Masks are not supported: the image service edits the whole image from the instruction")
		}
		b, err := io.ReadAll(io.LimitReader(p, maxFormField+1))
		if err != nil {
			return nil, g.formError(err, limit)
		}
		if len(b) > maxFormField {
			return nil, invalidRequest(name, fmt.Sprintf("The field '%s' is longer than %s", truncate(name, 40), formatBytes(maxFormField)))
		}
		if !utf8.Valid(b) {
			return nil, invalidRequest(name, fmt.Sprintf("The field '%s' is not valid UTF-8", truncate(name, 40)))
		}
		v := strings.TrimSpace(string(b))
		switch name {
		case "prompt":
			f.prompt = v
		case "model":
			f.model = v
		case "response_format":
			f.format = v
		case "n":
			f.n = v
		case "stream":
			f.stream = v == "true" || v == "1"
		}
		// size, quality, background, input_fidelity, output_format, user…:
		// accepted and ignored, an edit keeps the source's size (§10.1)
	}
	if f.source == nil {
		return nil, invalidRequest("image", "'image' is required: send the image to edit as a file in the field 'image'")
	}
	return f, nil
}

func (g *Gateway) formError(err error, limit int64) *apiError {
	var mbe *http.MaxBytesError
	if errors.As(err, &mbe) {
		return errTooLarge(limit)
	}
	return invalidRequest("", "The multipart body could not be read: "+truncate(err.Error(), 100))
}

// readLimited reads a part of at most limit bytes; a larger one is a 413
// as soon as the limit is passed.
func readLimited(r io.Reader, limit int64) ([]byte, *apiError) {
	var buf bytes.Buffer
	n, err := buf.ReadFrom(io.LimitReader(r, limit+1))
	if err != nil {
		var mbe *http.MaxBytesError
		if errors.As(err, &mbe) {
			return nil, errUploadTooLarge(limit)
		}
		return nil, invalidRequest("image", "The image could not be read: "+truncate(err.Error(), 100))
	}
	if n > limit {
		return nil, errUploadTooLarge(limit)
	}
	return buf.Bytes(), nil
}

func errUploadTooLarge(limit int64) *apiError {
	return &apiError{status: http.StatusRequestEntityTooLarge, typ: "invalid_request_error", code: "request_too_large", param: "image",
		message: "The image is larger than the limit of " + formatBytes(limit) + " (max_upload)"}
}

// checkSource accepts PNG, JPEG and WebP by their signature (SPEC §10.1)
// and reads the size from the header, never the pixels: a header that
// claims 100000×100000 costs nothing.
func checkSource(b []byte, param string) (*sourceImage, *apiError) {
	ext, _, ok := sniffImage(b)
	if !ok || ext == "gif" {
		return nil, invalidRequest(param, "The image must be a PNG, JPEG or WebP file")
	}
	s := &sourceImage{data: b, ext: ext}
	s.width, s.height = imageSize(b, ext)
	return s, nil
}

// imageSize reads an image's dimensions from its header; 0, 0 when the
// header does not say.
func imageSize(b []byte, ext string) (int, int) {
	if ext == "webp" {
		return webpSize(b)
	}
	c, _, err := image.DecodeConfig(bytes.NewReader(b))
	if err != nil || c.Width <= 0 || c.Height <= 0 {
		return 0, 0
	}
	return c.Width, c.Height
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
		return 1 + int(d[4]) | int(d[5])<<8 | int(d[6])<<16, 1 + int(d[7]) | int(d[8])<<8 | int(d[9])<<16
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

// decodeDataURL reads a data: URL of an image, within limit bytes
// decoded; its declared type proves nothing, the bytes' signature decides.
func decodeDataURL(s string, limit int64, param string) (*sourceImage, *apiError) {
	if len(s) < 5 || !strings.EqualFold(s[:5], "data:") {
		return nil, invalidRequest(param, "The image URL must be an http(s) or data: URL")
	}
	meta, payload, ok := strings.Cut(s[5:], ",")
	if !ok || !strings.HasSuffix(strings.ToLower(meta), ";base64") {
		return nil, invalidRequest(param, "The data: URL must be base64-encoded (data:image/png;base64,…)")
	}
	if mt, _, _ := strings.Cut(strings.ToLower(meta), ";"); !strings.HasPrefix(mt, "image/") {
		return nil, invalidRequest(param, "The data: URL is not an image")
	}
	if int64(base64.StdEncoding.DecodedLen(len(payload))) > limit+3 {
		return nil, errUploadTooLarge(limit)
	}
	b, err := base64.StdEncoding.DecodeString(strings.TrimRight(payload, "="))
	if err != nil {
		b, err = base64.RawStdEncoding.DecodeString(strings.TrimRight(payload, "="))
	}
	if err != nil {
		return nil, invalidRequest(param, "The data: URL's base64 is not valid")
	}
	if int64(len(b)) > limit {
		return nil, errUploadTooLarge(limit)
	}
	return checkSource(b, param)
}

// chatImage finds the image of an edit in chat (SPEC §10.2): the last
// image part of the latest user message. Images in older messages are
// ignored.
func (g *Gateway) chatImage(req *chatRequest) (*sourceImage, *apiError) {
	for i := len(req.Messages) - 1; i >= 0; i-- {
		if req.Messages[i].Role != "user" {
			continue
		}
		raw := bytes.TrimSpace(req.Messages[i].Content)
		if len(raw) == 0 || raw[0] != '[' {
			return nil, nil
		}
		var parts []struct {
			Type     string `json:"type"`
			ImageURL *struct {
				URL string `json:"url"`
			} `json:"image_url"`
		}
		if err := json.Unmarshal(raw, &parts); err != nil {
			return nil, nil // contentText reports a malformed content
		}
		param := fmt.Sprintf("messages[%d].content", i)
		for k := len(parts) - 1; k >= 0; k-- {
			p := parts[k]
			if p.Type != "image_url" || p.ImageURL == nil {
				continue
			}
			u := strings.TrimSpace(p.ImageURL.URL)
			if strings.HasPrefix(strings.ToLower(u), "data:") {
				return decodeDataURL(u, g.MaxUpload, param)
			}
			if checkHTTPURL(u) != nil {
				return nil, invalidRequest(param, "An image URL must be an http(s) or data: URL")
			}
			if pu, _ := url.Parse(u); pu == nil || pu.User != nil {
				return nil, invalidRequest(param, "An image URL must not carry credentials")
			}
			// a client's own URL goes to the service unchanged: the
			// gateway never fetches it (§10.3)
			return &sourceImage{url: u}, nil
		}
		return nil, nil
	}
	return nil, nil
}

// editModelHint is the Caddyfile an error shows to add an edit model: real
// Caddyfile syntax (a block needs its lines), adapted by a test.
const editModelHint = "model Qwen-Image-Edit {\n\tmodel_index 19\n\tedit\n}"

// editModel picks the model of an edit: the requested one if it is an edit
// model, else the first edit model (SPEC §10.1, §10.2).
func (g *Gateway) editModel(requested string) (*model, *apiError) {
	if m := g.lookupModel(requested); m != nil && m.edit {
		return m, nil
	}
	for _, m := range g.models {
		if m.edit {
			return m, nil
		}
	}
	return nil, &apiError{status: http.StatusBadRequest, typ: "invalid_request_error", code: "model_not_found", param: "model",
		message: "No edit model is configured: add 'edit' to a model block to edit images; in the Caddyfile:\n" + editModelHint}
}

// hostSource gives the image service a URL it can download the source
// from: a client's own URL as it is; an upload or a data: URL through the
// store, which needs to be on (SPEC §10.3).
func (g *Gateway) hostSource(r *http.Request, s *sourceImage) (string, *apiError) {
	if s.url != "" {
		return s.url, nil
	}
	if g.store == nil {
		return "", &apiError{status: http.StatusBadRequest, typ: "invalid_request_error", code: "store_required", param: "image",
			message: "Editing an uploaded image needs the image store: turn 'store' on in the zimage_gateway block, so the image service can download the source from this site"}
	}
	name, _, err := g.store.put(r.Context(), s.data)
	if err != nil {
		g.logger.Warn("storing an edit's source image failed", zap.String("error", g.scrub.Replace(err.Error())))
		return "", &apiError{status: http.StatusInternalServerError, typ: "server_error", code: "store_failed",
			message: "The source image could not be stored for the image service"}
	}
	return g.storeURL(r, name), nil
}

// formN reads the multipart n (1…4, default 1).
func formN(v string) (int, *apiError) {
	if v == "" {
		return 1, nil
	}
	n, err := strconv.Atoi(v)
	if err != nil || n < 1 || n > maxImagesN {
		return 0, invalidRequest("n", fmt.Sprintf("n must be between 1 and %d", maxImagesN))
	}
	return n, nil
}

// MarshalJSON writes the service's request body: an edit carries only the
// instruction, the model and the source's URL (SPEC §10), a generation
// everything else.
func (u upstreamRequest) MarshalJSON() ([]byte, error) {
	if u.ImageSource != "" {
		return json.Marshal(struct {
			Prompt      string `json:"prompt"`
			ModelIndex  int    `json:"model_index"`
			ImageSource string `json:"image_source"`
		}{u.Prompt, u.ModelIndex, u.ImageSource})
	}
	type plain upstreamRequest // without this method
	return json.Marshal(plain(u))
}

// serveEdits answers POST /v1/images/edits (SPEC §10.1).
func (g *Gateway) serveEdits(w http.ResponseWriter, r *http.Request) {
	f, e := g.parseEditForm(w, r)
	if e != nil {
		g.fail(w, endpointEdits, "", e)
		return
	}
	if f.prompt == "" {
		g.fail(w, endpointEdits, "", invalidRequest("prompt", "'prompt' is required: say how to edit the image"))
		return
	}
	m, e := g.editModel(f.model)
	if e != nil {
		g.fail(w, endpointEdits, "", e)
		return
	}
	n, e := formN(f.n)
	if e != nil {
		g.fail(w, endpointEdits, m.name, e)
		return
	}
	format, e := parseFormat(f.format)
	if e != nil {
		g.fail(w, endpointEdits, m.name, e)
		return
	}
	j, e := g.newEditJob(r, endpointEdits, m, f.model, f.prompt, f.source, n)
	if e != nil {
		g.fail(w, endpointEdits, m.name, e)
		return
	}
	if f.stream {
		g.streamImages(w, r, j, n)
		return
	}
	g.answerImages(w, r, j, n, format)
}

// newEditJob makes the job of an edit: the instruction as the prompt (no
// skip word, ratio or enhancement: an edit keeps the source's size), and
// the source hosted where the service can download it (SPEC §10.3–4).
func (g *Gateway) newEditJob(r *http.Request, endpoint string, m *model, requested, instruction string, src *sourceImage, n int) (*job, *apiError) {
	instruction = strings.TrimSpace(g.scrub.Replace(stripControl(instruction)))
	if instruction == "" {
		return nil, invalidRequest("prompt", "The instruction is empty: say how to edit the image")
	}
	if utf8.RuneCountInString(instruction) > g.MaxPromptLength {
		return nil, invalidRequest("prompt", fmt.Sprintf("The instruction is longer than %d characters", g.MaxPromptLength))
	}
	j := &job{
		endpoint: endpoint, model: m, requested: requested, edit: true,
		original: instruction, cleaned: instruction, prompt: instruction,
		enhance: enhanceSkipped, source: sourceSource,
		width: src.width, height: src.height,
		seed:   randomSeed(),
		origin: requestOrigin(r),
		client: requestClient(r),
	}
	if requested == "" {
		j.requested = m.name
	}
	// the client's own limit, before the source is stored (SPEC §12)
	if e := admitClient(r, n); e != nil {
		return nil, e
	}
	var e *apiError
	if j.sourceURL, e = g.hostSource(r, src); e != nil {
		return nil, e
	}
	metricEnhance.WithLabelValues(enhanceSkipped).Inc()
	return j, nil
}

// sourceSource is the ratio_source of an edit: the size is the source's.
const sourceSource = "source"

// editMarkdown renders the chat answer of an edit (SPEC §10.4), byte for
// byte.
func (g *Gateway) editMarkdown(j *job) string {
	var b strings.Builder
	writeImageLine(&b, j.prompt, j.imageURL)
	b.WriteString("**✏️ Edit Instruction:**\n")
	writeEcho(&b, j.prompt)
	b.WriteString("\n\n**🖼️ Source:** <")
	b.WriteString(autolinkURL(j.sourceURL))
	b.WriteString(">")
	if j.width > 0 && j.height > 0 {
		writeResolution(&b, j.width, j.height)
	}
	g.writeDemoNote(&b)
	return b.String()
}

// autolinkURL percent-encodes what would end an autolink <…> early or
// break it: spaces, angle brackets and control characters.
func autolinkURL(u string) string {
	var b strings.Builder
	for i := 0; i < len(u); i++ {
		c := u[i]
		if c <= 0x20 || c == 0x7f || c == '<' || c == '>' {
			fmt.Fprintf(&b, "%%%02X", c)
			continue
		}
		b.WriteByte(c)
	}
	return b.String()
}
