package zimage

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"mime"
	"mime/multipart"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"unicode/utf8"

	"go.uber.org/zap"
)

// Image edits (docs/design.md#edits): POST /v1/images/edits with an uploaded image, and
// chat messages with an image part. The 梦羽 service edits an image it
// downloads itself, so an uploaded source is put into the store and
// the service is given its public URL.

const (
	endpointEdits    = "images_edits"
	defaultMaxUpload = 20 << 20
	// maxFormField bounds a multipart field that is not the image: a
	// prompt, a model name, a number
	maxFormField = 64 << 10
	maxFormParts = 32
	// maxEditImages is how many images an edit may carry: OpenAI's limit,
	// and what Cherry Studio sends at most. The service edits one.
	maxEditImages = 16
	// defaultEditSide is the side of the size sent for a source whose size
	// the gateway does not know (a client's URL)
	defaultEditSide = 1024
)

// sourceImage is the image an edit starts from.
type sourceImage struct {
	data          []byte // an upload or a data: URL; nil for a client's own URL
	url           string // the client's http(s) URL, passed on unchanged
	stored        string // a picture the store holds already, by name
	ext           string
	width, height int // from the header; 0 when unknown
}

// editForm is a parsed /v1/images/edits request, multipart or JSON.
type editForm struct {
	prompt, model, format, n, size string
	quality, background            string // echoed in the answer
	stream                         bool
	source                         *sourceImage
	ignored                        int // images after the first (docs/design.md#edits)
}

// parseEditForm reads the multipart body of /v1/images/edits as it
// arrives: the image within max_upload (413 beyond, without reading the
// rest), other fields within 64 KiB each.
func (g *Gateway) parseEditForm(w http.ResponseWriter, r *http.Request, up *upload) (*editForm, *apiError) {
	mt, params, err := mime.ParseMediaType(r.Header.Get("Content-Type"))
	if err != nil || mt != "multipart/form-data" || params["boundary"] == "" {
		return nil, &apiError{status: http.StatusUnsupportedMediaType, typ: "invalid_request_error", code: "unsupported_media_type",
			message: "Send the edit as multipart/form-data with the image in the field 'image', or as application/json with 'images': [{\"image_url\": …}], as the OpenAI Images API does"}
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
			// Open WebUI sends each image as its own image[] part, Cherry
			// Studio repeats image: the first is edited, the rest read
			// past (docs/design.md#edits)
			if f.source != nil {
				if f.ignored++; f.ignored >= maxEditImages {
					return nil, errTooManyImages("image")
				}
				if _, err := io.Copy(io.Discard, p); err != nil {
					return nil, g.formError(err, limit)
				}
				continue
			}
			b, e := readUpload(r, up, p, g.MaxUpload)
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
		case "size":
			f.size = v
		case "quality":
			f.quality = v
		case "background":
			f.background = v
		}
		// input_fidelity, output_format, output_compression, moderation,
		// partial_images, user…: accepted and ignored (the gateway does
		// not transcode)
	}
	if f.source == nil {
		return nil, invalidRequest("image", "'image' is required: send the image to edit as a file in the field 'image'")
	}
	return f, nil
}

func errTooManyImages(param string) *apiError {
	return invalidRequest(param, fmt.Sprintf("Send at most %d images; the image service edits the first", maxEditImages))
}

func (g *Gateway) formError(err error, limit int64) *apiError {
	var mbe *http.MaxBytesError
	if errors.As(err, &mbe) {
		return errTooLarge(limit)
	}
	return invalidRequest("", "The multipart body could not be read: "+truncate(err.Error(), 100))
}

func errUploadTooLarge(limit int64) *apiError {
	return &apiError{status: http.StatusRequestEntityTooLarge, typ: "invalid_request_error", code: "request_too_large", param: "image",
		message: "The image is larger than the limit of " + formatBytes(limit) + " (max_upload)"}
}

// checkSource accepts PNG, JPEG and WebP (docs/design.md#edits) that pass the one
// image check of every stored image (checkImage: signature, a header that
// parses, a sane size), reading the size from the header, never the pixels.
func checkSource(b []byte, param string) (*sourceImage, *apiError) {
	info, err := checkImage(b)
	if err == nil && info.ext == "gif" {
		err = errors.New("GIF is not a format the image service edits")
	}
	if err != nil {
		return nil, invalidRequest(param, "The image must be a PNG, JPEG or WebP file: "+err.Error())
	}
	return &sourceImage{data: b, ext: info.ext, width: info.width, height: info.height}, nil
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

// chatImage finds the image of an edit in chat (docs/design.md#edits): the last
// image part of the latest user message. Images in older messages are
// ignored.
func (g *Gateway) chatImage(req *chatRequest) (*sourceImage, *apiError) {
	for i := len(req.Messages) - 1; i >= 0; i-- {
		if req.Messages[i].Role != "user" {
			continue
		}
		c := &req.Messages[i].Content
		if !c.isParts || c.invalid || c.badImage() {
			return nil, nil // chatPrompt reports a malformed content
		}
		param := fmt.Sprintf("messages[%d].content", i)
		for k := len(c.parts) - 1; k >= 0; k-- {
			p := &c.parts[k]
			if p.Type != "image_url" || !p.ImageURL.set {
				continue
			}
			u := strings.TrimSpace(p.ImageURL.url)
			if strings.HasPrefix(strings.ToLower(u), "data:") {
				// decoded in place in the body (uploads_chat.go)
				return req.dataURLs.dataURL(u, g.MaxUpload, param)
			}
			return g.imageFromURL(u, param)
		}
		return nil, nil
	}
	return nil, nil
}

// imageFromURL reads the image of an edit given by URL, in chat or in a
// JSON edit: a data: URL is decoded (and later stored), a client's own
// http(s) URL goes to the service unchanged: the gateway never fetches it
// (docs/design.md#edits).
func (g *Gateway) imageFromURL(u, param string) (*sourceImage, *apiError) {
	u = strings.TrimSpace(u)
	if strings.HasPrefix(strings.ToLower(u), "data:") {
		return decodeDataURL(u, g.MaxUpload, param)
	}
	if checkHTTPURL(u) != nil {
		return nil, invalidRequest(param, "An image URL must be an http(s) or data: URL")
	}
	if pu, _ := url.Parse(u); pu == nil || pu.User != nil {
		return nil, invalidRequest(param, "An image URL must not carry credentials")
	}
	return &sourceImage{url: u}, nil
}

// editJSONRequest is OpenAI's JSON form of an edit (docs/design.md#edits), which
// recent SDKs send: the images by URL, never uploaded.
type editJSONRequest struct {
	Images []struct {
		ImageURL json.RawMessage `json:"image_url"` // a string, or {"url": …}
		FileID   *string         `json:"file_id"`
	} `json:"images"`
	Prompt         string `json:"prompt"`
	Model          string `json:"model"`
	N              *int   `json:"n"`
	Size           string `json:"size"`
	ResponseFormat string `json:"response_format"`
	Quality        string `json:"quality"`
	Background     string `json:"background"`
	Stream         bool   `json:"stream"`
}

// parseEditJSON reads a JSON edit. It is read like a chat body with an
// image (uploads.go): a body beyond max_body is an upload, admitted before
// it is read, its data: URLs decoded in place; the share of the budget is
// the caller's to release once the source is stored.
func (g *Gateway) parseEditJSON(w http.ResponseWriter, r *http.Request, adm *admission) (*editForm, *upload, *apiError) {
	body, e := g.readChatBody(w, r, adm)
	if e != nil {
		return nil, nil, e
	}
	f, e := g.decodeEditJSON(body)
	if e != nil {
		body.release()
		return nil, nil, e
	}
	return f, body.up, nil
}

// decodeEditJSON decodes OpenAI's JSON form of an edit.
func (g *Gateway) decodeEditJSON(body *chatBody) (*editForm, *apiError) {
	var req editJSONRequest
	if e := decodeJSON(body.json, &req); e != nil {
		return nil, e
	}
	f := &editForm{prompt: strings.TrimSpace(req.Prompt), model: req.Model, format: req.ResponseFormat, size: req.Size, stream: req.Stream,
		quality: req.Quality, background: req.Background}
	if req.N != nil {
		f.n = strconv.Itoa(*req.N)
	}
	switch n := len(req.Images); {
	case n == 0:
		return nil, invalidRequest("images", "'images' is required: send the image to edit as {\"image_url\": \"https://…\" or \"data:image/png;base64,…\"}")
	case n > maxEditImages:
		return nil, errTooManyImages("images")
	default:
		f.ignored = n - 1
	}
	first := req.Images[0]
	if first.FileID != nil {
		return nil, invalidRequest("images", "Images given by file_id are not supported: this gateway has no files to refer to; send image_url with an https or data: URL")
	}
	var u string
	if err := json.Unmarshal(first.ImageURL, &u); err != nil {
		var obj struct {
			URL string `json:"url"`
		}
		if json.Unmarshal(first.ImageURL, &obj) != nil || obj.URL == "" {
			return nil, invalidRequest("images", "images[0].image_url must be an https or data: URL")
		}
		u = obj.URL
	}
	var e *apiError
	if strings.HasPrefix(strings.ToLower(strings.TrimSpace(u)), "data:") {
		f.source, e = body.urls.dataURL(strings.TrimSpace(u), g.MaxUpload, "images")
	} else {
		f.source, e = g.imageFromURL(u, "images")
	}
	if e != nil {
		return nil, e
	}
	return f, nil
}

// editModelHint is the Caddyfile an error shows to add an edit model: real
// Caddyfile syntax (a block needs its lines), adapted by a test.
const editModelHint = "model Qwen-Image-Edit {\n\tmodel_index 19\n\tedit\n}"

// editModel picks the model of an edit: the requested one if it is an edit
// model, else the first edit model (docs/design.md#edits).
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
// from: a picture the store holds at its URL for origin; a client's own
// URL as it is; an upload or a data: URL through the store, which needs
// to be on.
func (g *Gateway) hostSource(ctx context.Context, j *job, s *sourceImage, origin string) *apiError {
	if s.stored != "" && g.store != nil {
		// not this request's to delete when the edit fails: no sourceName
		j.sourceURL = g.store.url(origin, s.stored)
		return nil
	}
	if s.url != "" {
		j.sourceURL = s.url
		return nil
	}
	if g.store == nil {
		return &apiError{status: http.StatusBadRequest, typ: "invalid_request_error", code: "store_required", param: "image",
			message: "Editing an uploaded image needs the image store: turn 'store' on in the zimage_gateway block, so the image service can download the source from this site"}
	}
	name, dup, err := g.store.put(ctx, s.data)
	// from here the job holds the stored name only: the bytes are
	// unreachable once the upload's budget is given back (uploads.go)
	s.data = nil
	if err != nil {
		g.logger.Warn("storing an edit's source image failed", zap.String("error", g.scrub.Replace(err.Error())))
		return &apiError{status: http.StatusInternalServerError, typ: "server_error", code: "store_failed",
			message: "The source image could not be stored for the image service"}
	}
	// a source stored for this request alone is deleted again if the
	// edit fails (discardSource)
	j.sourceName, j.sourceDuplicate = name, dup
	j.sourceURL = g.store.url(origin, name)
	return nil
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

// serveEdits answers POST /v1/images/edits (docs/design.md#edits): it decodes the
// edit, multipart or JSON, and hands it to the pipeline.
func (g *Gateway) serveEdits(w http.ResponseWriter, r *http.Request, adm *admission) {
	q := &ask{endpoint: endpointEdits}
	var f *editForm
	var e *apiError
	if mt, _, _ := mime.ParseMediaType(r.Header.Get("Content-Type")); mt == "application/json" {
		f, q.up, e = g.parseEditJSON(w, r, adm)
	} else {
		// the client's limit and the upload budget, before the body is
		// read (uploads.go): a probe of it, then its size once the probe
		// has arrived; held until the source is stored
		limit := g.MaxUpload + 1<<20
		slow := g.meterBody(w, r)
		if q.up, e = g.admitUpload(r, adm, limit, min(uploadSize(r, limit)-1, uploadProbe), slow, errTooLarge(limit)); e == nil {
			f, e = g.parseEditForm(w, r, q.up)
		}
		slow.finish()
	}
	if e != nil {
		q.up.release()
		g.failBody(w, r, endpointEdits, e)
		return
	}
	if e := g.decodeEdit(q, f); e != nil {
		q.up.release()
		g.failRequest(w, endpointEdits, q.modelName(), e)
		return
	}
	g.serve(w, r, adm, q)
}

// decodeEdit makes the ask of an edit form: the model, n, the answer's
// form, and the edit itself.
func (g *Gateway) decodeEdit(q *ask, f *editForm) *apiError {
	if f.prompt == "" {
		return invalidRequest("prompt", "'prompt' is required: say how to edit the image")
	}
	var e *apiError
	if q.model, e = g.editModel(f.model); e != nil {
		return e
	}
	q.requested = f.model
	if q.n, e = formN(f.n); e != nil {
		return e
	}
	format, e := g.parseFormat(f.format, q.model, f.model)
	if e != nil {
		return e
	}
	look, e := parseLook(f.quality, f.background)
	if e != nil {
		return e
	}
	if q.edit, e = g.newEditAsk(f.prompt, f.source, f.size, f.ignored); e != nil {
		return e
	}
	q.bytesOptional = format == formatBoth && !f.stream
	q.out = g.imagesRenderer(f.stream, format, look)
	return nil
}

// editAsk is what an edit asks: the instruction (no skip word, ratio or
// enhancement applies to it), the image, and the size to ask of the
// service.
type editAsk struct {
	instruction   string
	source        *sourceImage
	width, height int
	sizeGiven     bool // the client chose the size; else it is the source's
	ignored       int  // images of the request after the one edited
}

// newEditAsk checks an edit's instruction and size. The size matters:
// without one the service answers 512×512 whatever the source
// (a public client of the service found it; docs/design.md#the-service-behind-it), so the source's own size is sent when none is given.
func (g *Gateway) newEditAsk(prompt string, src *sourceImage, size string, ignored int) (*editAsk, *apiError) {
	instruction := strings.TrimSpace(g.scrub.Replace(stripControl(prompt)))
	if instruction == "" {
		return nil, invalidRequest("prompt", "The instruction is empty: say how to edit the image")
	}
	if utf8.RuneCountInString(instruction) > g.MaxPromptLength {
		return nil, invalidRequest("prompt", fmt.Sprintf("The instruction is longer than %d characters", g.MaxPromptLength))
	}
	ea := &editAsk{instruction: instruction, source: src, ignored: ignored}
	w, h, e := parseSize(size)
	if e != nil {
		return nil, e
	}
	if w != nil {
		ea.width, ea.height = fitEditSize(*w, *h)
		ea.sizeGiven = true
	} else {
		ea.width, ea.height = fitEditSize(float64(src.width), float64(src.height))
	}
	return ea, nil
}

// newEditJob is the job step of an edit, for the request admitted as adm,
// which came to origin: the instruction as the prompt, the size sent to the service,
// and the source hosted where the service can download it (docs/design.md#edits).
func (g *Gateway) newEditJob(ctx context.Context, q *ask, adm *admission, origin string) (*job, *apiError) {
	ea := q.edit
	j := &job{
		endpoint: q.endpoint, model: q.model, requested: q.requested, edit: true,
		original: ea.instruction, cleaned: ea.instruction, prompt: ea.instruction,
		enhance: enhanceSkipped, ratioSource: ratioFromSource,
		width: ea.width, height: ea.height,
		ignored:       ea.ignored,
		seed:          randomSeed(),
		origin:        origin,
		adm:           adm,
		bytesOptional: q.bytesOptional,
	}
	if adm != nil {
		j.client = adm.client
	}
	if q.requested == "" {
		j.requested = q.model.name
	}
	if ea.sizeGiven {
		j.ratioSource = ratioFromBody
	}
	e := g.hostSource(ctx, j, ea.source, origin)
	ea.source = nil // the bytes go with the upload's share
	if e != nil {
		return nil, e
	}
	metricEnhance.WithLabelValues(enhanceSkipped).Inc()
	return j, nil
}

// fitEditSize is the size an edit asks of the service (docs/design.md#edits): w×h
// scaled into 64…2048 on each side keeping its aspect ratio (down when a
// side is above 2048, up when one is below 64), each side then rounded to
// the nearest multiple of 8; 1024×1024 when the size is unknown.
func fitEditSize(w, h float64) (int, int) {
	if !(w > 0 && h > 0) || math.IsInf(w, 0) || math.IsInf(h, 0) {
		return defaultEditSide, defaultEditSide
	}
	if s := max(w, h); s > maxSide {
		w, h = w*maxSide/s, h*maxSide/s
	}
	if s := min(w, h); s < minSide {
		w, h = w*minSide/s, h*minSide/s
	}
	return clampSide(w), clampSide(h)
}

// editMarkdown renders the chat answer of an edit (docs/design.md#edits), byte for
// byte.
func (g *Gateway) editMarkdown(j *job) string {
	var b strings.Builder
	writeImageLine(&b, j.prompt, j.imageURL)
	b.WriteString("**✏️ Edit Instruction:**\n")
	writeEcho(&b, j.prompt)
	b.WriteString("\n\n**🖼️ Source:** <")
	b.WriteString(autolinkURL(j.sourceURL))
	b.WriteString(">")
	// the returned image's size when the gateway holds it, else the size
	// sent: the service has answered other sizes than asked
	if j.gotWidth > 0 {
		writeResolution(&b, j.gotWidth, j.gotHeight)
	} else {
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
