package zimage

// POST /v1/images/generations: the decoder of an Images API body and the
// Images API's JSON renderer, which edits share (the streamed answer is in
// stream.go). Unlike chat, the answer names the image itself: a URL, its
// bytes in base64, or both.

import (
	"bufio"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"net/http"
	"path"
	"strconv"
	"strings"
	"time"
	"unicode/utf8"
)

// imagesRequest is the OpenAI Images API body plus the gateway's
// extensions (seed, cfg, negative_prompt). quality and background are
// echoed in the answer, as OpenAI's answers carry them; the other fields of
// today's API (output_format, output_compression, moderation, style, user,
// partial_images, …) are accepted and ignored: the service makes one kind
// of image and the gateway does not transcode it.
type imagesRequest struct {
	Prompt         *string         `json:"prompt"`
	Model          string          `json:"model"`
	N              *int            `json:"n"`
	Size           string          `json:"size"`
	ResponseFormat string          `json:"response_format"`
	Quality        string          `json:"quality"`
	Background     string          `json:"background"`
	Seed           json.RawMessage `json:"seed"`
	CFG            *float64        `json:"cfg"`
	NegativePrompt *string         `json:"negative_prompt"`
	Stream         bool            `json:"stream"`
}

// maxImagesN bounds n: each image is a generation of its own, paid in
// points and run in parallel on the accounts' slots, so that one request
// cannot take the whole pool.
const maxImagesN = 4

// The forms of an image in an answer: its URL, its bytes in base64, or
// both (only as a default: a request asks for one or the other).
const (
	formatURL  = "url"
	formatB64  = "b64_json"
	formatBoth = "both"
)

// parseDefaultFormat reads default_response_format.
func parseDefaultFormat(s string) (string, error) {
	switch f := strings.TrimSpace(s); f {
	case "", formatURL, formatB64, formatBoth:
		return f, nil
	}
	return "", fmt.Errorf("default_response_format must be url, b64_json or both, got %q", s)
}

// parseFormat reads response_format. A request without one gets the
// model's default_response_format, else the gateway's, else what clients
// of today's API expect: OpenAI's gpt-image models always answer b64_json
// and SDKs send those names without response_format, then read b64_json
// only; for any other name both forms, so a client that reads either
// works.
func (g *Gateway) parseFormat(s string, m *model, requested string) (string, *apiError) {
	switch f := strings.ToLower(strings.TrimSpace(s)); f {
	case "":
		switch {
		case m.defaultFormat != "":
			return m.defaultFormat, nil
		case g.DefaultResponseFormat != "":
			return g.DefaultResponseFormat, nil
		}
		name := strings.ToLower(strings.TrimSpace(requested))
		if strings.HasPrefix(name, "gpt-image-") || strings.HasPrefix(name, "chatgpt-image-") {
			return formatB64, nil
		}
		return formatBoth, nil
	case formatURL, formatB64:
		return f, nil
	}
	return "", invalidRequest("response_format", "response_format must be \"url\" or \"b64_json\"")
}

// imageLook is what an image answer reports of the images beside them, as
// OpenAI's answers do: quality and background as asked (the service has
// neither setting, so nothing else can be said of them).
type imageLook struct {
	quality, background string
}

// parseLook reads quality and background. Only OpenAI's values are
// accepted: they are echoed in the answer.
func parseLook(quality, background string) (imageLook, *apiError) {
	l := imageLook{quality: strings.ToLower(strings.TrimSpace(quality)), background: strings.ToLower(strings.TrimSpace(background))}
	switch l.quality {
	case "":
		l.quality = "auto"
	case "auto", "low", "medium", "high", "standard", "hd":
	default:
		return l, invalidRequest("quality", "quality must be auto, low, medium, high, standard or hd")
	}
	switch l.background {
	case "":
		l.background = "auto"
	case "auto", "transparent", "opaque":
	default:
		return l, invalidRequest("background", "background must be auto, transparent or opaque")
	}
	return l, nil
}

// parseSize reads "WxH"; "auto" or "" leave the size to the ratio rules.
// The sides are returned as the float64 pointers of jobParams, which chat's
// width and height fill too, so that one set of size rules serves both.
func parseSize(s string) (w, h *float64, e *apiError) {
	s = strings.TrimSpace(strings.ToLower(s))
	if s == "" || s == "auto" {
		return nil, nil, nil
	}
	ws, hs, ok := strings.Cut(s, "x")
	wi, err1 := strconv.Atoi(strings.TrimSpace(ws))
	hi, err2 := strconv.Atoi(strings.TrimSpace(hs))
	if !ok || err1 != nil || err2 != nil || wi <= 0 || hi <= 0 {
		return nil, nil, invalidRequest("size", "Invalid size "+strconv.Quote(truncate(s, 40))+": expected \"WIDTHxHEIGHT\" (e.g. \"1024x1024\") or \"auto\"")
	}
	wf, hf := float64(wi), float64(hi)
	return &wf, &hf, nil
}

// serveImages answers POST /v1/images/generations: it decodes the body
// into an ask and hands it to the pipeline.
func (g *Gateway) serveImages(w http.ResponseWriter, r *http.Request, adm *admission) {
	body, e := g.readBody(w, r, g.MaxBody)
	if e != nil {
		g.failRequest(w, endpointImages, "", e)
		return
	}
	q := &ask{endpoint: endpointImages}
	if e := g.decodeImages(q, body); e != nil {
		g.failRequest(w, endpointImages, q.modelName(), e)
		return
	}
	g.serve(w, r, adm, q)
}

// decodeImages makes the ask of an Images API generation body.
func (g *Gateway) decodeImages(q *ask, body []byte) *apiError {
	var req imagesRequest
	if e := decodeJSON(body, &req); e != nil {
		return e
	}
	if req.Prompt == nil || strings.TrimSpace(*req.Prompt) == "" {
		return invalidRequest("prompt", "'prompt' is required")
	}
	prompt := strings.TrimSpace(*req.Prompt)
	if utf8.RuneCountInString(prompt) > g.MaxPromptLength {
		return invalidRequest("prompt", fmt.Sprintf("The prompt is longer than %d characters", g.MaxPromptLength))
	}
	if q.model = g.lookupModel(req.Model); q.model == nil {
		return errModelNotFound(req.Model)
	}
	q.requested = req.Model
	q.n = 1
	if req.N != nil {
		q.n = *req.N
	}
	if q.n < 1 || q.n > maxImagesN {
		return invalidRequest("n", fmt.Sprintf("n must be between 1 and %d", maxImagesN))
	}
	format, e := g.parseFormat(req.ResponseFormat, q.model, req.Model)
	if e != nil {
		return e
	}
	look, e := parseLook(req.Quality, req.Background)
	if e != nil {
		return e
	}
	width, height, e := parseSize(req.Size)
	if e != nil {
		return e
	}
	q.params = jobParams{prompt: prompt, width: width, height: height, cfg: req.CFG, negative: req.NegativePrompt}
	if e := readParams(&q.params, req.Seed); e != nil {
		return e
	}
	// with both forms by default, a failed download leaves that image its
	// URL instead of failing the request: the client reads either form
	q.bytesOptional = format == formatBoth && !req.Stream
	q.out = g.imagesRenderer(req.Stream, format, look)
	return nil
}

// imagesRenderer is the way out of the Images API (generations and
// edits): a JSON answer with URLs, base64 or both, or a stream of events.
func (g *Gateway) imagesRenderer(stream bool, format string, look imageLook) renderer {
	if stream {
		return &imagesStream{interval: time.Duration(g.StreamKeepalive), look: look}
	}
	return imagesJSON{format: format, look: look}
}

// imagesJSON answers {"created","data":[{"url","b64_json","revised_prompt"}],
// "size","output_format","quality","background"}, each image with the
// forms asked for.
type imagesJSON struct {
	format string
	look   imageLook
}

// needBytes: an answer with b64_json needs each image's bytes, which the
// pipeline then downloads once for the answer and the store alike. begin
// sends nothing: the status of a JSON answer is not known before the work
// ends, so a failure can still be a plain JSON error (writeFailure).
func (o imagesJSON) needBytes() bool                                       { return o.format != formatURL }
func (imagesJSON) begin(http.ResponseWriter, *job)                         {}
func (imagesJSON) writeFailure(w http.ResponseWriter, _ *job, e *apiError) { writeError(w, e) }

func (o imagesJSON) write(w http.ResponseWriter, res *output) {
	writeImagesAnswer(w, res, o.format != formatB64, o.format != formatURL, o.look)
}

// heldSize is the size an answer reports of an image: the real one when
// the gateway held its bytes (the service has answered other sizes than
// asked), else the size asked of the service.
func heldSize(j *job) string {
	w, h := j.width, j.height
	if j.gotWidth > 0 {
		w, h = j.gotWidth, j.gotHeight
	}
	return strconv.Itoa(w) + "x" + strconv.Itoa(h)
}

// heldFormat is the format an answer reports of an image: the real one
// when the gateway holds its bytes (img, or the store's copy, whose name
// carries it), else png, the service's usual format.
func heldFormat(j *job, img []byte) string {
	ext := ""
	if img != nil {
		ext, _, _ = sniffImage(img)
	} else if j.stored != "" {
		ext = strings.TrimPrefix(path.Ext(j.stored), ".")
	}
	switch ext {
	case "jpg", "jpeg":
		return "jpeg"
	case "webp":
		return "webp"
	}
	return "png"
}

// writeImagesAnswer writes the images answer with each image's base64
// encoded straight into the response, so an image is held once, as its
// bytes, and never again as a base64 string and its JSON encoding (the
// memory of a burst of b64_json answers stays within the download slots).
func writeImagesAnswer(w http.ResponseWriter, res *output, withURL, withB64 bool, look imageLook) {
	head := []byte(`{"created":` + strconv.FormatInt(time.Now().Unix(), 10) + `,"data":[`)
	// a download that failed for an answer with both forms leaves that
	// image without its base64
	held := func(i int) []byte {
		if withB64 && res.images != nil {
			return res.images[i]
		}
		return nil
	}
	foot, _ := json.Marshal(struct {
		Size         string `json:"size"`
		OutputFormat string `json:"output_format"`
		Quality      string `json:"quality"`
		Background   string `json:"background"`
	}{heldSize(res.jobs[0]), heldFormat(res.jobs[0], held(0)), look.quality, look.background})
	// the object's '{' becomes a comma: its fields continue the answer
	foot[0] = ','
	// each item is pre, the base64 when asked for, and post
	pre, post := make([][]byte, len(res.jobs)), make([][]byte, len(res.jobs))
	total := len(head) + len("]") + len(foot)
	for i, j := range res.jobs {
		b := []byte{'{'}
		if withURL {
			u, _ := json.Marshal(j.imageURL)
			b = append(append(append(b, `"url":`...), u...), ',')
		}
		if img := held(i); img != nil {
			b = append(b, `"b64_json":"`...)
			post[i] = []byte(`",`)
			total += base64.StdEncoding.EncodedLen(len(img))
		}
		p, _ := json.Marshal(j.prompt)
		pre[i], post[i] = b, append(append(append(post[i], `"revised_prompt":`...), p...), '}')
		total += len(pre[i]) + len(post[i])
		if i > 0 {
			total++
		}
	}
	// the length is known before the first byte (base64's follows from the
	// image's), so the answer carries Content-Length as a buffered one would
	h := w.Header()
	h["Content-Type"] = []string{"application/json"}
	h["Content-Length"] = []string{strconv.Itoa(total)}
	w.WriteHeader(http.StatusOK)
	// the base64 encoder writes 4 bytes at a time: buffered into larger
	// writes to the connection
	bw := bufio.NewWriterSize(w, 32<<10)
	bw.Write(head)
	for i := range res.jobs {
		if i > 0 {
			bw.WriteByte(',')
		}
		bw.Write(pre[i])
		if img := held(i); img != nil {
			enc := base64.NewEncoder(base64.StdEncoding, bw)
			enc.Write(img)
			enc.Close()
		}
		bw.Write(post[i])
	}
	bw.WriteByte(']')
	bw.Write(foot)
	_ = bw.Flush() // a client that left is not an error to report
}
