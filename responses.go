package zimage

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net/http"
	"strconv"
	"strings"
	"time"
	"unicode/utf8"

	"go.uber.org/zap"
)

// The Responses API: POST /v1/responses, and GET and DELETE
// /v1/responses/{id} for the responses kept in the store. OpenAI's SDKs
// and several clients now use it first (the Vercel AI SDK's default
// provider call, the "OpenAI Responses" provider types of chat clients).
// It is a decoder and a renderer on the pipeline chat uses: the text of
// the last user message is the prompt, an image in that message makes the
// request an edit, and the answer is an image_generation_call item (the
// image as base64, as OpenAI's image tool answers) followed by a message
// with the chat answer's markdown, for clients that show only text.

const endpointResponses = "responses"

// responsesRequest is the part of a Responses API body the gateway reads.
// instructions, tool_choice, metadata, user and the rest are accepted and
// ignored: instructions are a system prompt, not a picture's description.
type responsesRequest struct {
	Model              string          `json:"model"`
	Input              json.RawMessage `json:"input"`
	PreviousResponseID *string         `json:"previous_response_id"`
	Stream             bool            `json:"stream"`
	Store              *bool           `json:"store"`
	Tools              []responsesTool `json:"tools"`
	Seed               json.RawMessage `json:"seed"`
}

// responsesTool is one entry of tools: an image_generation tool's
// options are read like the Images API's; other tools are ignored, as a
// model without them would.
type responsesTool struct {
	Type           string          `json:"type"`
	Size           string          `json:"size"`
	Quality        string          `json:"quality"`
	Background     string          `json:"background"`
	InputImageMask json.RawMessage `json:"input_image_mask"`
}

// responsesItem is one item of a list input: a message, or another item
// (an item_reference, a previous turn's output) that is read past.
type responsesItem struct {
	Type    string          `json:"type"`
	Role    string          `json:"role"`
	Content json.RawMessage `json:"content"`
}

// responsesPart is one part of a message's content.
type responsesPart struct {
	Type     string          `json:"type"`
	Text     string          `json:"text"`
	ImageURL json.RawMessage `json:"image_url"` // a string; {"url"} accepted too
	FileID   *string         `json:"file_id"`
}

// imageTool is the request's image_generation tool, or a zero one; a mask
// is refused, the service has none.
func (req *responsesRequest) imageTool() (responsesTool, *apiError) {
	for _, t := range req.Tools {
		if t.Type != "image_generation" {
			continue
		}
		if m := bytes.TrimSpace(t.InputImageMask); len(m) > 0 && string(m) != "null" {
			return t, invalidRequest("tools", "input_image_mask is not supported: the image service edits the whole image from the instruction")
		}
		return t, nil
	}
	return responsesTool{}, nil
}

// responsesInput reads the prompt and the image to edit from input: a
// string, or items whose last user message gives the text (its input_text
// parts joined by a space) and, when it has one, the image (its last
// input_image part). Images in older messages are ignored, as in chat.
func (g *Gateway) responsesInput(raw json.RawMessage, urls *dataURLs) (string, *sourceImage, *apiError) {
	raw = bytes.TrimSpace(raw)
	var prompt string
	var src *sourceImage
	switch {
	case len(raw) == 0 || string(raw) == "null":
		return "", nil, invalidRequest("input", "'input' is required: the text of the picture to make, or a list of messages")
	case raw[0] == '"':
		if err := json.Unmarshal(raw, &prompt); err != nil {
			return "", nil, invalidRequest("input", "Invalid input: "+err.Error())
		}
	case raw[0] == '[':
		var items []responsesItem
		if err := json.Unmarshal(raw, &items); err != nil {
			return "", nil, invalidRequest("input", "Invalid input: expected a string or a list of input items")
		}
		var e *apiError
		if prompt, src, e = g.lastUserMessage(items, urls); e != nil {
			return "", nil, e
		}
	default:
		return "", nil, invalidRequest("input", "Invalid input: expected a string or a list of input items")
	}
	if prompt = strings.TrimSpace(prompt); prompt == "" {
		return "", nil, invalidRequest("input", "No prompt: send a user message with text")
	}
	if utf8.RuneCountInString(prompt) > g.MaxPromptLength {
		return "", nil, invalidRequest("input", fmt.Sprintf("The prompt is longer than %d characters", g.MaxPromptLength))
	}
	return prompt, src, nil
}

func (g *Gateway) lastUserMessage(items []responsesItem, urls *dataURLs) (string, *sourceImage, *apiError) {
	for i := len(items) - 1; i >= 0; i-- {
		it := items[i]
		if it.Role != "user" || (it.Type != "" && it.Type != "message") {
			continue
		}
		c := bytes.TrimSpace(it.Content)
		if len(c) > 0 && c[0] == '"' {
			var s string
			if err := json.Unmarshal(c, &s); err != nil {
				return "", nil, invalidRequest("input", "Invalid message content: "+err.Error())
			}
			return s, nil, nil
		}
		var parts []responsesPart
		if err := json.Unmarshal(c, &parts); err != nil {
			return "", nil, invalidRequest("input", "Invalid message content: expected a string or a list of content parts")
		}
		var texts []string
		var image *responsesPart
		for k := range parts {
			switch parts[k].Type {
			case "input_text", "text":
				if strings.TrimSpace(parts[k].Text) != "" {
					texts = append(texts, parts[k].Text)
				}
			case "input_image":
				image = &parts[k]
			}
		}
		if image == nil {
			return strings.Join(texts, " "), nil, nil
		}
		src, e := g.responsesImage(image, urls)
		return strings.Join(texts, " "), src, e
	}
	return "", nil, nil
}

// responsesImage reads an input_image: a data: URL (decoded where the
// body's reader found it) or the client's http(s) URL, passed on.
func (g *Gateway) responsesImage(p *responsesPart, urls *dataURLs) (*sourceImage, *apiError) {
	if p.FileID != nil && *p.FileID != "" {
		return nil, invalidRequest("input", "Images given by file_id are not supported: this gateway has no files to refer to; send image_url with an https or data: URL")
	}
	var u string
	if err := json.Unmarshal(p.ImageURL, &u); err != nil {
		var obj struct {
			URL string `json:"url"`
		}
		if json.Unmarshal(p.ImageURL, &obj) != nil {
			return nil, invalidRequest("input", "input_image needs image_url: an https or data: URL")
		}
		u = obj.URL
	}
	if u = strings.TrimSpace(u); u == "" {
		return nil, invalidRequest("input", "input_image needs image_url: an https or data: URL")
	}
	if strings.HasPrefix(strings.ToLower(u), "data:") {
		return urls.dataURL(u, g.MaxUpload, "input")
	}
	return g.imageFromURL(u, "input")
}

// serveResponses answers POST /v1/responses: it decodes the body into an
// ask, a generation or an edit, and hands it to the pipeline.
func (g *Gateway) serveResponses(w http.ResponseWriter, r *http.Request, adm *admission) {
	g.serveChatBody(w, r, adm, &ask{endpoint: endpointResponses, n: 1}, func(q *ask, body *chatBody) *apiError {
		return g.decodeResponses(r.Context(), q, body, adm.client)
	})
}

// decodeResponses makes the ask of a Responses request of client c, with
// its renderer; ctx reads the response a previous_response_id names.
func (g *Gateway) decodeResponses(ctx context.Context, q *ask, body *chatBody, c *client) *apiError {
	var req responsesRequest
	if e := decodeJSON(body.json, &req); e != nil {
		return e
	}
	tool, e := req.imageTool()
	if e != nil {
		return e
	}
	prompt, src, e := g.responsesInput(req.Input, body.urls)
	if e != nil {
		return e
	}
	if src == nil && body.upload {
		return g.errChatTooLarge()
	}
	var prev *storedResponse
	if req.PreviousResponseID != nil && *req.PreviousResponseID != "" {
		if g.store == nil {
			return &apiError{status: http.StatusBadRequest, typ: "invalid_request_error", code: "store_required", param: "previous_response_id",
				message: "previous_response_id needs the image store, where responses are kept: turn 'store' on in the zimage_gateway block"}
		}
		if prev, e = g.loadResponse(ctx, c, *req.PreviousResponseID); e != nil {
			e.param = "previous_response_id"
			return e
		}
	}
	m := g.lookupModel(req.Model)
	if src == nil && prev != nil && m != nil && m.edit {
		// "make it night" after a generation: the picture that response
		// made is the one to edit, as OpenAI's image tool does across turns
		src = prev.source()
	}
	q.requested = req.Model
	if src != nil {
		if q.model, e = g.editModel(req.Model); e != nil {
			return e
		}
		if q.edit, e = g.newEditAsk(prompt, src, tool.Size, 0); e != nil {
			return e
		}
	} else {
		if q.model = m; m == nil {
			return errModelNotFound(req.Model)
		}
		width, height, e := parseSize(tool.Size)
		if e != nil {
			e.param = "tools"
			return e
		}
		q.params = jobParams{prompt: prompt, width: width, height: height}
		if e := readParams(&q.params, req.Seed); e != nil {
			return e
		}
	}
	out := &responsesRenderer{
		g:      g,
		ctx:    ctx,
		stream: req.Stream,
		keep:   g.store != nil && (req.Store == nil || *req.Store),
		rec: storedResponse{
			ID:         "resp_" + secureID(),
			Client:     c.label(),
			CallID:     "ig_" + secureID(),
			Quality:    g.echoOption(tool.Quality),
			Background: g.echoOption(tool.Background),
		},
	}
	if req.PreviousResponseID != nil {
		out.rec.PreviousResponseID = *req.PreviousResponseID
	}
	q.out = out
	return nil
}

// echoOption is an option of the image tool as the answer echoes it: as
// asked, or auto; bounded and scrubbed like any text of the client's that
// goes back out.
func (g *Gateway) echoOption(s string) string {
	if s = strings.TrimSpace(s); s == "" {
		return "auto"
	}
	return g.scrub.Replace(truncate(stripControl(s), 40))
}

// secureID is 24 random bytes in hex: a response id is named in GET and
// DELETE, so it must not be guessable even where no_auth lets every
// request be the same client.
func secureID() string {
	var b [24]byte
	_, _ = rand.Read(b[:])
	return hex.EncodeToString(b[:])
}

// storedResponse is what the answer says, without the image's bytes: the
// renderer writes the answer from it, and the store keeps it as JSON
// under {prefix}/responses/{id}.json (the image lives in the store already;
// its name is kept), so a GET, or previous_response_id on any instance
// sharing the storage, can answer it again.
type storedResponse struct {
	ID                 string `json:"id"`
	Client             string `json:"client"` // only its client may read it
	CreatedAt          int64  `json:"created_at"`
	Model              string `json:"model"` // as the client named it
	PreviousResponseID string `json:"previous_response_id,omitempty"`
	CallID             string `json:"call_id"`
	MessageID          string `json:"message_id,omitempty"`
	Image              string `json:"image,omitempty"` // the store's name of the image
	ImageURL           string `json:"image_url"`
	Width              int    `json:"width"`
	Height             int    `json:"height"`
	RevisedPrompt      string `json:"revised_prompt"`
	OutputFormat       string `json:"output_format"`
	Quality            string `json:"quality"`
	Background         string `json:"background"`
	Text               string `json:"text,omitempty"` // the message's markdown; none with responses_text off
	Store              bool   `json:"store"`
}

// source is the picture a stored response made, as the source of an
// edit: by its name in the store when it was kept there (the job step
// gives the service its URL on the request's origin), else the URL the
// answer carried.
func (s *storedResponse) source() *sourceImage {
	return &sourceImage{url: s.ImageURL, stored: s.Image, width: s.Width, height: s.Height}
}

// The response object and its items, as OpenAI's Responses API writes
// them (the fields openai-go and the Vercel AI SDK read).
type responseObject struct {
	ID                 string         `json:"id"`
	Object             string         `json:"object"`
	CreatedAt          int64          `json:"created_at"`
	Status             string         `json:"status"`
	Error              *responseError `json:"error"`
	IncompleteDetails  *struct{}      `json:"incomplete_details"`
	Instructions       *string        `json:"instructions"`
	Model              string         `json:"model"`
	Output             []any          `json:"output"`
	ParallelToolCalls  bool           `json:"parallel_tool_calls"`
	PreviousResponseID *string        `json:"previous_response_id"`
	Store              bool           `json:"store"`
	ToolChoice         string         `json:"tool_choice"`
	Tools              []any          `json:"tools"`
	Metadata           struct{}       `json:"metadata"`
	Usage              responseUsage  `json:"usage"`
}

type responseError struct {
	Code    string `json:"code"`
	Message string `json:"message"`
}

type responseUsage struct {
	InputTokens        int `json:"input_tokens"`
	InputTokensDetails struct {
		CachedTokens int `json:"cached_tokens"`
	} `json:"input_tokens_details"`
	OutputTokens        int `json:"output_tokens"`
	OutputTokensDetails struct {
		ReasoningTokens int `json:"reasoning_tokens"`
	} `json:"output_tokens_details"`
	TotalTokens int `json:"total_tokens"`
}

type imageCallItem struct {
	ID            string  `json:"id"`
	Type          string  `json:"type"`
	Status        string  `json:"status"`
	Result        *string `json:"result"`
	RevisedPrompt string  `json:"revised_prompt,omitempty"`
	Size          string  `json:"size,omitempty"`
	OutputFormat  string  `json:"output_format,omitempty"`
	Quality       string  `json:"quality,omitempty"`
	Background    string  `json:"background,omitempty"`
}

type messageItem struct {
	ID      string       `json:"id"`
	Type    string       `json:"type"`
	Status  string       `json:"status"`
	Role    string       `json:"role"`
	Content []outputText `json:"content"`
}

type outputText struct {
	Type        string `json:"type"`
	Text        string `json:"text"`
	Annotations []any  `json:"annotations"`
	Logprobs    []any  `json:"logprobs"`
}

// responseEvent is one event of a streamed response; each type uses some
// of the fields.
type responseEvent struct {
	Type           string          `json:"type"`
	SequenceNumber int             `json:"sequence_number"`
	Response       *responseObject `json:"response,omitempty"`
	OutputIndex    *int            `json:"output_index,omitempty"`
	ItemID         string          `json:"item_id,omitempty"`
	ContentIndex   *int            `json:"content_index,omitempty"`
	Item           any             `json:"item,omitempty"`
	Part           *outputText     `json:"part,omitempty"`
	Delta          *string         `json:"delta,omitempty"`
	Text           *string         `json:"text,omitempty"`
	Logprobs       json.RawMessage `json:"logprobs,omitempty"` // [] on the text events, as OpenAI sends
}

var noLogprobs = json.RawMessage("[]")

// imageCall is the image_generation_call item: in progress (no result),
// or completed with marker standing where the base64 goes (writeMarked).
func (s *storedResponse) imageCall(marker *string) imageCallItem {
	if marker == nil {
		return imageCallItem{ID: s.CallID, Type: "image_generation_call", Status: "in_progress"}
	}
	return imageCallItem{
		ID: s.CallID, Type: "image_generation_call", Status: "completed", Result: marker,
		RevisedPrompt: s.RevisedPrompt, Size: strconv.Itoa(s.Width) + "x" + strconv.Itoa(s.Height),
		OutputFormat: s.OutputFormat, Quality: s.Quality, Background: s.Background,
	}
}

func (s *storedResponse) message(status, text string) messageItem {
	return messageItem{ID: s.MessageID, Type: "message", Status: status, Role: "assistant",
		Content: []outputText{{Type: "output_text", Text: text, Annotations: []any{}, Logprobs: []any{}}}}
}

// object is the response object; with marker, completed with its output.
func (s *storedResponse) object(status string, marker *string) *responseObject {
	o := &responseObject{
		ID: s.ID, Object: "response", CreatedAt: s.CreatedAt, Status: status, Model: s.Model,
		Output: []any{}, ParallelToolCalls: true, Store: s.Store, ToolChoice: "auto", Tools: []any{},
	}
	if s.PreviousResponseID != "" {
		o.PreviousResponseID = &s.PreviousResponseID
	}
	if marker != nil {
		o.Output = append(o.Output, s.imageCall(marker))
		if s.MessageID != "" {
			o.Output = append(o.Output, s.message("completed", s.Text))
		}
	}
	return o
}

// resultMarker is a string that stands for the image's base64 in an
// encoded object, replaced while it is written: the image is encoded
// straight into the answer, never held as a base64 string too.
func resultMarker() *string {
	m := "zimage-result-" + secureID()
	return &m
}

// writeMarked writes the JSON js with img's base64 where the quoted
// marker stands.
func writeMarked(w *bufio.Writer, js []byte, marker string, img []byte) {
	before, after, ok := bytes.Cut(js, []byte(`"`+marker+`"`))
	w.Write(before)
	if !ok {
		return
	}
	w.WriteByte('"')
	enc := base64.NewEncoder(base64.StdEncoding, w)
	enc.Write(img)
	enc.Close()
	w.WriteByte('"')
	w.Write(after)
}

// markedLen is the length writeMarked writes.
func markedLen(js []byte, marker string, img []byte) int {
	return len(js) - len(marker) + base64.StdEncoding.EncodedLen(len(img))
}

// writeResponseJSON answers a completed response with its image.
func writeResponseJSON(w http.ResponseWriter, s *storedResponse, img []byte) {
	marker := resultMarker()
	js, _ := json.Marshal(s.object("completed", marker))
	h := w.Header()
	h["Content-Type"] = []string{"application/json"}
	h["Content-Length"] = []string{strconv.Itoa(markedLen(js, *marker, img))}
	w.WriteHeader(http.StatusOK)
	bw := bufio.NewWriterSize(w, 32<<10)
	writeMarked(bw, js, *marker, img)
	_ = bw.Flush() // a client that left is not an error to report
}

// responsesRenderer answers a Responses request: the response object, or
// with stream its events in OpenAI's order, each with its sequence_number.
type responsesRenderer struct {
	g      *Gateway
	ctx    context.Context
	stream bool
	keep   bool // the response is kept in the store
	rec    storedResponse
	sse    *sseWriter
	seq    int
}

// the image's bytes go into the answer as base64
func (o *responsesRenderer) needBytes() bool { return true }

func (o *responsesRenderer) begin(w http.ResponseWriter, j *job) {
	o.rec.CreatedAt, o.rec.Model, o.rec.Store = time.Now().Unix(), j.requested, o.keep
	if j.model.responsesText {
		o.rec.MessageID = "msg_" + secureID()
	}
	if !o.stream {
		return
	}
	// everything up to "generating" goes at once; keep-alives follow while
	// the service works
	o.sse = startSSE(w, time.Duration(o.g.StreamKeepalive))
	o.send(responseEvent{Type: "response.created", Response: o.rec.object("in_progress", nil)}, nil, nil)
	o.send(responseEvent{Type: "response.in_progress", Response: o.rec.object("in_progress", nil)}, nil, nil)
	o.send(responseEvent{Type: "response.output_item.added", OutputIndex: ptr(0), Item: o.rec.imageCall(nil)}, nil, nil)
	o.send(responseEvent{Type: "response.image_generation_call.in_progress", OutputIndex: ptr(0), ItemID: o.rec.CallID}, nil, nil)
	o.send(responseEvent{Type: "response.image_generation_call.generating", OutputIndex: ptr(0), ItemID: o.rec.CallID}, nil, nil)
}

// send writes one event, named by its type, with img's base64 where
// marker stands when given.
func (o *responsesRenderer) send(ev responseEvent, marker *string, img []byte) {
	ev.SequenceNumber = o.seq
	o.seq++
	js, err := json.Marshal(ev)
	if err != nil {
		return
	}
	o.sse.eventWith(ev.Type, func(w *bufio.Writer) {
		if marker == nil {
			w.Write(js)
			return
		}
		writeMarked(w, js, *marker, img)
	})
}

func (o *responsesRenderer) writeFailure(w http.ResponseWriter, j *job, e *apiError) {
	if !o.stream {
		writeError(w, e)
		return
	}
	o.sse.stop()
	obj := o.rec.object("failed", nil)
	obj.Error = &responseError{Code: e.code, Message: e.message}
	o.send(responseEvent{Type: "response.failed", Response: obj}, nil, nil)
	setOutcome(w, e.status)
}

func (o *responsesRenderer) write(w http.ResponseWriter, res *output) {
	j, img := res.jobs[0], res.images[0]
	s := &o.rec
	s.Image, s.ImageURL, s.RevisedPrompt = j.stored, j.imageURL, j.prompt
	s.Width, s.Height = j.width, j.height
	if j.gotWidth > 0 {
		s.Width, s.Height = j.gotWidth, j.gotHeight
	}
	s.OutputFormat = heldFormat(j, img)
	if s.MessageID != "" {
		s.Text = o.g.markdown(j)
	}
	if o.keep {
		if err := o.g.saveResponse(o.ctx, s); err != nil {
			// the picture is made and paid for: it is answered, only not
			// kept for a later turn
			s.Store = false
			o.g.logger.Warn("keeping the response in the store failed; it is answered but cannot be continued or fetched",
				zap.String("response_id", s.ID), zap.String("error", o.g.scrub.Replace(err.Error())))
		}
	}
	if !o.stream {
		writeResponseJSON(w, s, img)
		return
	}
	o.sse.stop()
	marker := resultMarker()
	o.send(responseEvent{Type: "response.image_generation_call.completed", OutputIndex: ptr(0), ItemID: s.CallID}, nil, nil)
	o.send(responseEvent{Type: "response.output_item.done", OutputIndex: ptr(0), Item: s.imageCall(marker)}, marker, img)
	if s.MessageID != "" {
		at := ptr(1)
		empty := outputText{Type: "output_text", Text: "", Annotations: []any{}}
		done := empty
		done.Text = s.Text
		o.send(responseEvent{Type: "response.output_item.added", OutputIndex: at, Item: messageItem{ID: s.MessageID, Type: "message", Status: "in_progress", Role: "assistant", Content: []outputText{}}}, nil, nil)
		o.send(responseEvent{Type: "response.content_part.added", OutputIndex: at, ItemID: s.MessageID, ContentIndex: ptr(0), Part: &empty}, nil, nil)
		o.send(responseEvent{Type: "response.output_text.delta", OutputIndex: at, ItemID: s.MessageID, ContentIndex: ptr(0), Delta: &s.Text, Logprobs: noLogprobs}, nil, nil)
		o.send(responseEvent{Type: "response.output_text.done", OutputIndex: at, ItemID: s.MessageID, ContentIndex: ptr(0), Text: &s.Text, Logprobs: noLogprobs}, nil, nil)
		o.send(responseEvent{Type: "response.content_part.done", OutputIndex: at, ItemID: s.MessageID, ContentIndex: ptr(0), Part: &done}, nil, nil)
		o.send(responseEvent{Type: "response.output_item.done", OutputIndex: at, Item: s.message("completed", s.Text)}, nil, nil)
	}
	o.send(responseEvent{Type: "response.completed", Response: s.object("completed", marker)}, marker, img)
}

// --- kept responses ---------------------------------------------------------

// responseKeyID checks a response id before any storage access: only ids
// this gateway makes ("resp_" and 48 lowercase hex digits) reach a key.
func responseKeyID(id string) bool {
	hexPart, ok := strings.CutPrefix(id, "resp_")
	if !ok || len(hexPart) != 48 {
		return false
	}
	for i := 0; i < len(hexPart); i++ {
		if c := hexPart[i]; !(c >= '0' && c <= '9' || c >= 'a' && c <= 'f') {
			return false
		}
	}
	return true
}

func (s *imageStore) responseKey(id string) string {
	return s.prefix + "/" + responsesDir + id + ".json"
}

// responsesDir holds the kept responses under the store's prefix.
const responsesDir = "responses/"

func errResponseNotFound(id string) *apiError {
	return &apiError{status: http.StatusNotFound, typ: "invalid_request_error", code: "not_found",
		message: "No response with id '" + truncate(id, 80) + "' found (responses are kept for the store's max_age, for the client that made them)"}
}

func (g *Gateway) saveResponse(ctx context.Context, s *storedResponse) error {
	b, err := json.Marshal(s)
	if err != nil {
		return err
	}
	return g.store.storage.Store(ctx, g.store.responseKey(s.ID), b)
}

// loadResponse reads a kept response of client c: another client's, an
// expired or an unknown one are all the same 404, so an id tells nothing
// to whoever does not own it.
func (g *Gateway) loadResponse(ctx context.Context, c *client, id string) (*storedResponse, *apiError) {
	if !responseKeyID(id) {
		return nil, errResponseNotFound(id)
	}
	b, err := g.store.storage.Load(ctx, g.store.responseKey(id))
	if errors.Is(err, fs.ErrNotExist) {
		return nil, errResponseNotFound(id)
	}
	if err != nil {
		g.logger.Warn("reading a kept response failed", zap.String("response_id", id), zap.String("error", g.scrub.Replace(err.Error())))
		return nil, errStoreUnavailable()
	}
	var s storedResponse
	if json.Unmarshal(b, &s) != nil || s.ID != id || s.Client != c.label() ||
		g.store.maxAge > 0 && time.Since(time.Unix(s.CreatedAt, 0)) > g.store.maxAge {
		return nil, errResponseNotFound(id)
	}
	return &s, nil
}

// serveStoredResponse answers GET /v1/responses/{id} (the response again,
// its image as base64) and DELETE (removes it).
func (g *Gateway) serveStoredResponse(w http.ResponseWriter, r *http.Request, c *client, id string) {
	if g.store == nil {
		g.fail(w, endpointResponses, "", errResponseNotFound(id))
		return
	}
	s, e := g.loadResponse(r.Context(), c, id)
	if e != nil {
		g.fail(w, endpointResponses, "", e)
		return
	}
	if r.Method == http.MethodDelete {
		if err := g.store.storage.Delete(r.Context(), g.store.responseKey(id)); err != nil && !errors.Is(err, fs.ErrNotExist) {
			g.logger.Warn("deleting a kept response failed", zap.String("response_id", id), zap.String("error", g.scrub.Replace(err.Error())))
			g.fail(w, endpointResponses, "", errStoreUnavailable())
			return
		}
		writeJSON(w, http.StatusOK, struct {
			ID      string `json:"id"`
			Object  string `json:"object"`
			Deleted bool   `json:"deleted"`
		}{id, "response.deleted", true})
		return
	}
	var img []byte
	if s.Image != "" {
		// the image is held in a download slot, as a b64_json answer's
		// is: the slots bound the memory of all answers that carry bytes
		wait, cancel := context.WithTimeout(r.Context(), g.timeout)
		release, e := g.fetcher.acquire(wait, 1)
		cancel()
		if e != nil {
			if e.status == http.StatusGatewayTimeout {
				e = &apiError{status: http.StatusServiceUnavailable, typ: "server_error", code: "busy", retryAfter: "5",
					message: "The gateway holds as many images as max_downloads allows; retry later"}
			}
			g.fail(w, endpointResponses, "", e)
			return
		}
		defer release()
		var err error
		if img, err = g.store.load(r.Context(), s.Image); err != nil {
			// the image was swept, or the storage failed: the response
			// without its picture would mislead
			g.logger.Warn("reading a kept response's image failed", zap.String("response_id", id), zap.String("error", g.scrub.Replace(err.Error())))
			g.fail(w, endpointResponses, "", errResponseNotFound(id))
			return
		}
	}
	writeResponseJSON(w, s, img)
}

// load reads a stored image whole, within max_image_size.
func (s *imageStore) load(ctx context.Context, name string) ([]byte, error) {
	if _, ok := parseStoreName(name); !ok {
		return nil, fs.ErrNotExist
	}
	b, err := s.storage.Load(ctx, s.dir+name)
	if err != nil {
		return nil, err
	}
	if int64(len(b)) > s.maxSize {
		return nil, io.ErrShortBuffer
	}
	return b, nil
}
