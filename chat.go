package zimage

// POST /v1/chat/completions: the decoder that turns a chat body into an ask
// (a generation, or an edit when the latest user message carries an
// image) and the renderer of its answer, which is markdown: chat clients
// show text, so the image comes as a markdown image followed by the prompt
// it was made from. The body's reading (max_body, or max_upload for an
// image) is in uploads_chat.go, streaming in stream.go.

import (
	"bytes"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"math/rand/v2"
	"net/http"
	"reflect"
	"strconv"
	"strings"
	"time"
	"unicode/utf8"
)

// chatRequest is the part of an OpenAI chat completions body the gateway
// reads; other fields (temperature, tools, …) are accepted and ignored.
type chatRequest struct {
	Model    string        `json:"model"`
	Messages []chatMessage `json:"messages"`
	// Prompt is not OpenAI's: it lets a script send the prompt alone,
	// without messages, and wins over them when it is not blank
	Prompt        *string `json:"prompt"`
	Stream        bool    `json:"stream"`
	StreamOptions *struct {
		IncludeUsage bool `json:"include_usage"`
	} `json:"stream_options"`
	// the gateway's extensions, pointers so that absent differs from 0;
	// the size is any number, which the size rules round and clamp
	// (clampSide) rather than refuse
	Width  *float64 `json:"width"`
	Height *float64 `json:"height"`
	CFG    *float64 `json:"cfg"`
	// Seed is kept raw: clients send it as a number, a string or null,
	// and parseSeed answers each wrong form with its own message
	Seed           json.RawMessage `json:"seed"`
	NegativePrompt *string         `json:"negative_prompt"`

	// the data: URLs the body's reader decoded in place (uploads_chat.go)
	dataURLs *dataURLs
}

type chatMessage struct {
	Role    string         `json:"role"`
	Content messageContent `json:"content"`
}

// decodeJSON unmarshals a request body, turning decoder errors into 400s
// that name the offending field.
func decodeJSON(body []byte, v any) *apiError {
	if len(bytes.TrimSpace(body)) == 0 {
		return invalidRequest("", "The request body is empty; send a JSON object")
	}
	// JSON is UTF-8 (RFC 8259 §8.1); encoding/json would quietly turn other
	// bytes (a GBK or Latin-1 body) into U+FFFD and generate from garbage
	if !utf8.Valid(body) {
		return invalidRequest("", "The request body is not valid UTF-8; send JSON encoded as UTF-8")
	}
	if err := json.Unmarshal(body, v); err != nil {
		var te *json.UnmarshalTypeError
		if errors.As(err, &te) {
			if te.Field == "" {
				return invalidRequest("", fmt.Sprintf("The request body must be a JSON object, not %s", te.Value))
			}
			return invalidRequest(te.Field, fmt.Sprintf("Invalid type for '%s': expected %s, got %s", te.Field, jsonTypeName(te.Type), te.Value))
		}
		return invalidRequest("", "The request body is not valid JSON: "+err.Error())
	}
	return nil
}

// jsonTypeName names a Go type as the JSON type a client must send: the
// decoder's own names ("float64", "struct { Role string … }") mean nothing
// to an API client.
func jsonTypeName(t reflect.Type) string {
	if t == nil {
		return "another type"
	}
	for t.Kind() == reflect.Pointer {
		t = t.Elem()
	}
	switch t.Kind() {
	case reflect.String:
		return "a string"
	case reflect.Bool:
		return "a boolean"
	case reflect.Int, reflect.Int8, reflect.Int16, reflect.Int32, reflect.Int64,
		reflect.Uint, reflect.Uint8, reflect.Uint16, reflect.Uint32, reflect.Uint64:
		return "an integer"
	case reflect.Float32, reflect.Float64:
		return "a number"
	case reflect.Slice, reflect.Array:
		return "an array"
	case reflect.Struct, reflect.Map:
		return "an object"
	}
	return "another type"
}

// decodeChat parses and checks a chat completions body. The prompt's
// length is counted in characters, not bytes, so that max_prompt_length
// means the same for a Chinese prompt as for an English one.
func decodeChat(body []byte, maxPrompt int) (*chatRequest, string, *apiError) {
	var req chatRequest
	if e := decodeJSON(body, &req); e != nil {
		return nil, "", e
	}
	prompt, param, e := chatPrompt(&req)
	if e != nil {
		return nil, "", e
	}
	if utf8.RuneCountInString(prompt) > maxPrompt {
		return nil, "", invalidRequest(param, fmt.Sprintf("The prompt is longer than %d characters", maxPrompt))
	}
	return &req, prompt, nil
}

// chatPrompt is the top-level prompt when present and non-blank, else the
// last user message's text (docs/design.md#the-prompt). Only the last user
// message counts: the ones before it are the conversation's history, the
// prompts of pictures already made, and a blank last message is an error
// rather than a reason to make an older picture again. The second result
// names the field the prompt came from, for the param of later errors.
func chatPrompt(req *chatRequest) (string, string, *apiError) {
	if req.Prompt != nil && strings.TrimSpace(*req.Prompt) != "" {
		return strings.TrimSpace(*req.Prompt), "prompt", nil
	}
	for i := len(req.Messages) - 1; i >= 0; i-- {
		if req.Messages[i].Role != "user" {
			continue
		}
		text, err := req.Messages[i].Content.text()
		if err != nil {
			return "", "", invalidRequest(fmt.Sprintf("messages[%d].content", i), err.Error())
		}
		if text = strings.TrimSpace(text); text == "" {
			break
		}
		return text, "messages[" + strconv.Itoa(i) + "].content", nil
	}
	return "", "", invalidRequest("messages", "No prompt: send a user message with text (or a top-level 'prompt')")
}

// messageContent is a message's content, decoded once with the body: a
// string, or an array of content parts (text, image_url, and others the
// gateway ignores). A content of any other shape is no error of the body:
// it is one only in the message the prompt comes from (chatPrompt), and
// OpenAI clients send all kinds of content in the messages before it.
type messageContent struct {
	str     string
	parts   []contentPart
	isParts bool
	invalid bool // neither a string, nor null, nor an array of part objects
}

// contentPart is one part of an array content. Its text and image_url
// are checked apart: a malformed one spoils only what reads it (the
// prompt, or the image of an edit).
type contentPart struct {
	Type     string    `json:"type"`
	Text     partText  `json:"text"`
	ImageURL partImage `json:"image_url"`
}

// partText is a part's text; bad when it was not a string (or null).
type partText struct {
	s   string
	bad bool
}

// partImage is a part's image_url: set when it was an object, url its
// url; bad when it was not an object with a string url.
type partImage struct {
	set bool
	url string
	bad bool
}

// errContentShape is the error of a content that is neither a string nor
// an array of content parts.
var errContentShape = errors.New("Invalid message content: expected a string or an array of content parts")

// UnmarshalJSON reads a content without failing the body (messageContent).
// encoding/json calls it with the value's bytes, already checked to be
// valid JSON, null included; a key given twice replaces the content.
func (c *messageContent) UnmarshalJSON(b []byte) error {
	*c = messageContent{}
	switch b[0] {
	case 'n':
	case '"':
		c.invalid = json.Unmarshal(b, &c.str) != nil
	case '[':
		c.isParts = true
		c.invalid = json.Unmarshal(b, &c.parts) != nil
	default:
		c.invalid = true
	}
	return nil
}

// UnmarshalJSON reads a part's text as a string field would be read: null
// leaves it as it was, and a value of another type spoils it for good.
func (t *partText) UnmarshalJSON(b []byte) error {
	if json.Unmarshal(b, &t.s) != nil {
		t.bad = true
	}
	return nil
}

// UnmarshalJSON reads a part's image_url as a pointer to a struct with a
// string url would be read: null unsets it, an object fills it (keeping
// a url given before when it has none), anything else spoils it for good.
func (p *partImage) UnmarshalJSON(b []byte) error {
	if b[0] == 'n' {
		p.set, p.url = false, ""
		return nil
	}
	v := struct {
		URL string `json:"url"`
	}{p.url}
	if json.Unmarshal(b, &v) != nil {
		p.bad = true
	}
	p.set, p.url = true, v.URL
	return nil
}

// text is the content as the prompt: the string, or the text parts that
// are not blank joined by a space (image parts are ignored).
func (c *messageContent) text() (string, error) {
	if c.invalid {
		return "", errContentShape
	}
	if !c.isParts {
		return c.str, nil
	}
	texts := make([]string, 0, len(c.parts))
	for _, p := range c.parts {
		if p.Text.bad {
			return "", errContentShape
		}
		if p.Type == "text" && strings.TrimSpace(p.Text.s) != "" {
			texts = append(texts, p.Text.s)
		}
	}
	return strings.Join(texts, " "), nil
}

// badImage reports whether a part's image_url was malformed. The content
// then holds no image to edit, and the request is a generation from its
// text, as when the client sends no image at all.
func (c *messageContent) badImage() bool {
	for i := range c.parts {
		if c.parts[i].ImageURL.bad {
			return true
		}
	}
	return false
}

// parseSeed accepts an integer, an integral number or an integer in a
// string; null or absent means "random". Negative seeds also mean random,
// as in most SD front ends. A seed that is not an integer is a 400 rather
// than a random seed: the client asked for one picture and would get
// another without knowing.
func parseSeed(raw json.RawMessage) (*int64, *apiError) {
	raw = bytes.TrimSpace(raw)
	if len(raw) == 0 || string(raw) == "null" {
		return nil, nil
	}
	s := string(raw)
	if raw[0] == '"' {
		if err := json.Unmarshal(raw, &s); err != nil {
			return nil, invalidRequest("seed", "Invalid seed: expected an integer")
		}
		s = strings.TrimSpace(s)
	}
	n, err := strconv.ParseInt(s, 10, 64)
	if err != nil && raw[0] != '"' {
		// An integral JSON number (42.0, 4.2e1) is that integer;
		// JavaScript clients send whole numbers that way
		if f, ferr := strconv.ParseFloat(s, 64); ferr == nil && f == math.Trunc(f) && math.Abs(f) < 1<<53 {
			n, err = int64(f), nil
		}
	}
	if err != nil {
		return nil, invalidRequest("seed", "Invalid seed "+strconv.Quote(truncate(s, 40))+": expected an integer")
	}
	if n >= maxSeed {
		return nil, invalidRequest("seed", fmt.Sprintf("Invalid seed %d: must be below %d", n, maxSeed))
	}
	return &n, nil
}

// checkParams rejects numbers no client means: NaN cannot come from JSON,
// but absurd sizes or cfg values can. The size's range and rounding are
// the ratio rules' (ratio.go); here only what no rule could use is
// refused, so that the client hears of its mistake instead of getting a
// picture of another size.
func checkParams(p *jobParams) *apiError {
	if (p.width == nil) != (p.height == nil) {
		// one without the other is ignored: the ratio rules decide
		p.width, p.height = nil, nil
	}
	if p.width != nil && (*p.width <= 0 || *p.height <= 0) {
		return invalidRequest("width", "width and height must be positive numbers")
	}
	if p.cfg != nil && (*p.cfg <= 0 || *p.cfg > 30) {
		return invalidRequest("cfg", "cfg must be a number in (0, 30]")
	}
	return nil
}

// serveChat answers POST /v1/chat/completions: it decodes the body into
// an ask, a generation or (with an image in the latest user message) an
// edit, and hands it to the pipeline.
func (g *Gateway) serveChat(w http.ResponseWriter, r *http.Request, adm *admission) {
	g.serveChatBody(w, r, adm, &ask{endpoint: endpointChat, n: 1}, g.decodeChatAsk)
}

// serveChatBody is the front door of the endpoints whose JSON body may
// carry an image to edit (chat, Responses): such a body may be max_upload
// large, base64 and all; one without an image is held to max_body
// (readChatBody). decode fills q from the body; the pipeline does the rest.
func (g *Gateway) serveChatBody(w http.ResponseWriter, r *http.Request, adm *admission, q *ask, decode func(*ask, *chatBody) *apiError) {
	body, e := g.readChatBody(w, r, adm)
	if e != nil {
		g.failBody(w, r, q.endpoint, e)
		return
	}
	if e := decode(q, body); e != nil {
		body.release()
		g.failRequest(w, q.endpoint, q.modelName(), e)
		return
	}
	// the upload's share goes with the ask, given back once the edit's
	// source is stored; the body's images are reachable from the ask
	// alone from here
	q.up = body.up
	body.urls = nil
	g.serve(w, r, adm, q)
}

// decodeChatAsk makes the ask of a chat body.
func (g *Gateway) decodeChatAsk(q *ask, body *chatBody) *apiError {
	req, prompt, e := decodeChat(body.json, g.MaxPromptLength)
	if e != nil {
		return e
	}
	req.dataURLs = body.urls
	src, e := g.chatImage(req)
	if e == nil && src == nil && body.upload {
		e = g.errChatTooLarge()
	}
	if e != nil {
		return e
	}
	q.requested = req.Model
	if src != nil {
		// an image in the latest user message: an edit of it (docs/design.md#edits)
		if q.model, e = g.editModel(req.Model); e != nil {
			return e
		}
		if q.edit, e = g.newEditAsk(prompt, src, "", 0); e != nil {
			return e
		}
	} else {
		if q.model = g.lookupModel(req.Model); q.model == nil {
			return errModelNotFound(req.Model)
		}
		q.params = jobParams{prompt: prompt, width: req.Width, height: req.Height, cfg: req.CFG, negative: req.NegativePrompt}
		if e := readParams(&q.params, req.Seed); e != nil {
			return e
		}
	}
	out := &chatRenderer{g: g, id: "chatcmpl-" + randomID()}
	if req.Stream {
		out.stream = true
		out.includeUsage = req.StreamOptions != nil && req.StreamOptions.IncludeUsage
	}
	q.out = out
	return nil
}

// chatRenderer answers a chat completion: one chat.completion, or with
// stream the chunks of docs/design.md#the-prompt (stream.go).
type chatRenderer struct {
	g            *Gateway
	id           string
	stream       bool
	includeUsage bool
	created      int64
	requested    string
	sse          *sseWriter
}

// needBytes is false: a chat answer links to the image, it never carries
// its bytes, so the pipeline downloads an image only to keep it.
func (c *chatRenderer) needBytes() bool { return false }

// begin fixes created (every chunk of a stream carries the same one, as
// OpenAI's do) and, for a stream, sends the headers and the role chunk at
// once, so that the client sees the answer begin while the image is made.
func (c *chatRenderer) begin(w http.ResponseWriter, j *job) {
	c.created, c.requested = time.Now().Unix(), j.requested
	if c.stream {
		c.beginStream(w)
	}
}

// writeFailure answers e: as an error event once a stream has begun (its
// status is sent already), else as the usual JSON error.
func (c *chatRenderer) writeFailure(w http.ResponseWriter, j *job, e *apiError) {
	if c.stream {
		c.failStream(w, e)
		return
	}
	writeError(w, e)
}

// write answers the image as markdown: one chat.completion, or the
// content, finish and (asked for) usage chunks of a stream. usage is there
// and zero, as the service counts no tokens: clients that read it must
// find it.
func (c *chatRenderer) write(w http.ResponseWriter, res *output) {
	content := c.g.markdown(res.jobs[0])
	if c.stream {
		c.writeStream(content)
		return
	}
	cc := chatCompletion{
		ID:      c.id,
		Object:  "chat.completion",
		Created: c.created,
		Model:   c.requested,
		Choices: []chatChoice{{
			Index:        0,
			FinishReason: ptr("stop"),
			Message:      &chatDelta{Role: "assistant", Content: &content},
		}},
		Usage: &usage{},
	}
	// the buffer fits the answer and the escapes of its content at once
	writeJSONBytes(w, http.StatusOK, cc.appendJSON(make([]byte, 0, 256+len(c.id)+len(c.requested)+len(content)+len(content)/8)))
}

// chatCompletion is both the chat.completion answer and, with Delta
// instead of Message, a chat.completion.chunk.
type chatCompletion struct {
	ID      string       `json:"id"`
	Object  string       `json:"object"`
	Created int64        `json:"created"`
	Model   string       `json:"model"`
	Choices []chatChoice `json:"choices"`
	Usage   *usage       `json:"usage,omitempty"`
}

// chatChoice is one choice; FinishReason is null in every chunk but the
// last, as in OpenAI's streams, so it is a pointer.
type chatChoice struct {
	Index        int        `json:"index"`
	Message      *chatDelta `json:"message,omitempty"`
	Delta        *chatDelta `json:"delta,omitempty"`
	FinishReason *string    `json:"finish_reason"`
}

// chatDelta is a message, or a chunk's part of one: a chunk carries the
// role or the content, hence both omitempty.
type chatDelta struct {
	Role    string  `json:"role,omitempty"`
	Content *string `json:"content,omitempty"`
}

// usage is the token count, always zero (see chatRenderer.write).
type usage struct {
	PromptTokens     int `json:"prompt_tokens"`
	CompletionTokens int `json:"completion_tokens"`
	TotalTokens      int `json:"total_tokens"`
}

// firstContent is the first choice's content, which sizes the buffer the
// completion is written into.
func (c *chatCompletion) firstContent() string {
	if len(c.Choices) == 0 {
		return ""
	}
	ch := &c.Choices[0]
	if ch.Message != nil && ch.Message.Content != nil {
		return *ch.Message.Content
	}
	if ch.Delta != nil && ch.Delta.Content != nil {
		return *ch.Delta.Content
	}
	return ""
}

// appendJSON appends the chat completion (or chunk) as json.Marshal
// writes a chatCompletion: byte for byte, as fastjson_test.go checks,
// without encoding/json's reflection on the path every chat answer takes.
func (c *chatCompletion) appendJSON(dst []byte) []byte {
	dst = append(dst, `{"id":`...)
	dst = appendJSONString(dst, c.ID)
	dst = append(dst, `,"object":`...)
	dst = appendJSONString(dst, c.Object)
	dst = append(dst, `,"created":`...)
	dst = strconv.AppendInt(dst, c.Created, 10)
	dst = append(dst, `,"model":`...)
	dst = appendJSONString(dst, c.Model)
	dst = append(dst, `,"choices":`...)
	if c.Choices == nil {
		dst = append(dst, "null"...)
	} else {
		dst = append(dst, '[')
		for i := range c.Choices {
			if i > 0 {
				dst = append(dst, ',')
			}
			dst = c.Choices[i].appendJSON(dst)
		}
		dst = append(dst, ']')
	}
	if u := c.Usage; u != nil {
		dst = append(dst, `,"usage":{"prompt_tokens":`...)
		dst = strconv.AppendInt(dst, int64(u.PromptTokens), 10)
		dst = append(dst, `,"completion_tokens":`...)
		dst = strconv.AppendInt(dst, int64(u.CompletionTokens), 10)
		dst = append(dst, `,"total_tokens":`...)
		dst = strconv.AppendInt(dst, int64(u.TotalTokens), 10)
		dst = append(dst, '}')
	}
	return append(dst, '}')
}

func (c *chatChoice) appendJSON(dst []byte) []byte {
	dst = append(dst, `{"index":`...)
	dst = strconv.AppendInt(dst, int64(c.Index), 10)
	if c.Message != nil {
		dst = append(dst, `,"message":`...)
		dst = c.Message.appendJSON(dst)
	}
	if c.Delta != nil {
		dst = append(dst, `,"delta":`...)
		dst = c.Delta.appendJSON(dst)
	}
	dst = append(dst, `,"finish_reason":`...)
	if c.FinishReason == nil {
		dst = append(dst, "null"...)
	} else {
		dst = appendJSONString(dst, *c.FinishReason)
	}
	return append(dst, '}')
}

func (d *chatDelta) appendJSON(dst []byte) []byte {
	dst = append(dst, '{')
	comma := false
	if d.Role != "" {
		dst = append(dst, `"role":`...)
		dst = appendJSONString(dst, d.Role)
		comma = true
	}
	if d.Content != nil {
		if comma {
			dst = append(dst, ',')
		}
		dst = append(dst, `"content":`...)
		dst = appendJSONString(dst, *d.Content)
	}
	return append(dst, '}')
}

// ptr is v's address, for the optional fields of answers.
func ptr[T any](v T) *T { return &v }

// randomID is 24 hex digits for completion ids. They must differ, not be
// unguessable (nothing is looked up by them, unlike a response's id,
// secureID), so math/rand's fast generator is enough.
func randomID() string {
	var b [12]byte
	for i := 0; i < len(b); i += 4 {
		v := rand.Uint32()
		b[i], b[i+1], b[i+2], b[i+3] = byte(v), byte(v>>8), byte(v>>16), byte(v>>24)
	}
	return hex.EncodeToString(b[:])
}

// markdown renders the answer content of docs/design.md#the-prompt, byte for
// byte. Both prompts are shown when the LLM rewrote it, so that a user can
// tell what was generated from what they wrote; the failure note says
// why the picture follows their words literally.
func (g *Gateway) markdown(j *job) string {
	if j.edit {
		return g.editMarkdown(j)
	}
	var b strings.Builder
	b.Grow(256 + len(j.imageURL) + 2*len(j.prompt) + len(j.original))
	writeImageLine(&b, j.prompt, j.imageURL)
	switch j.enhance {
	case enhanceOK:
		b.WriteString("**✨ Enhanced Prompt:**\n")
		writeEcho(&b, j.prompt)
		b.WriteString("\n\n**📝 Original Input:**\n")
		writeEcho(&b, j.original)
		b.WriteString("\n\n")
	case enhanceFailed:
		b.WriteString("**⚠️ Enhancement failed, using original prompt**\n\n**📝 Prompt:**\n")
		writeEcho(&b, j.original)
		b.WriteString("\n\n")
	default:
		b.WriteString("**📝 Prompt:**\n")
		writeEcho(&b, j.original)
		b.WriteString("\n\n")
	}
	b.WriteString("**🎨 Aspect Ratio:** ")
	b.WriteString(j.ratio)
	writeResolution(&b, j.width, j.height)
	g.writeDemoNote(&b)
	return b.String()
}

// writeImageLine writes the markdown image that starts every answer.
func writeImageLine(b *strings.Builder, alt, imageURL string) {
	b.WriteString("![")
	b.WriteString(altText(alt))
	b.WriteString("](")
	b.WriteString(markdownURL(imageURL))
	b.WriteString(")\n\n---\n")
}

// writeResolution writes the resolution line (× is U+00D7).
func writeResolution(b *strings.Builder, width, height int) {
	b.WriteString("\n**📐 Resolution:** ")
	b.WriteString(strconv.Itoa(width))
	b.WriteString("×")
	b.WriteString(strconv.Itoa(height))
}

// writeDemoNote says so when the image is the demo's placeholder.
func (g *Gateway) writeDemoNote(b *strings.Builder) {
	if _, demo := g.upstream.(demoGenerator); demo {
		b.WriteString("\n\n_🧪 Demo upstream: this is a local placeholder image; no image service was called._")
	}
}

// echoEscapes are the characters that would let an echoed prompt start a
// link, an image, raw HTML or code in the answer: a prompt is shown as the
// text the user typed, never as markup (markdown safety).
const echoEscapes = "\\[]<>`"

// writeEcho writes a prompt into its section of the markdown: line breaks
// become spaces, so the prompt cannot start a section of its own, and
// markup characters are backslash-escaped, which renders them literally.
// Ordinary prompts pass through byte for byte.
func writeEcho(b *strings.Builder, s string) {
	if !strings.ContainsAny(s, echoEscapes+"\r\n") {
		b.WriteString(s)
		return
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch {
		case c == '\r' && i+1 < len(s) && s[i+1] == '\n':
			continue // \r\n is one line break
		case c == '\r' || c == '\n':
			b.WriteByte(' ')
		case strings.IndexByte(echoEscapes, c) >= 0:
			b.WriteByte('\\')
			b.WriteByte(c)
		default:
			b.WriteByte(c)
		}
	}
}

// markdownURL percent-encodes the characters that would end or break a
// markdown link destination (spaces, parentheses, brackets, angle brackets,
// quotes, backslashes, control characters), so the link is the one intended.
func markdownURL(u string) string {
	const unsafe = " ()[]<>\"'\\`"
	if !strings.ContainsAny(u, unsafe) && !hasControl(u) {
		return u
	}
	var b strings.Builder
	for i := 0; i < len(u); i++ {
		c := u[i]
		if c < 0x20 || c == 0x7f || strings.IndexByte(unsafe, c) >= 0 {
			fmt.Fprintf(&b, "%%%02X", c)
			continue
		}
		b.WriteByte(c)
	}
	return b.String()
}

// hasControl reports whether s holds an ASCII control character, which
// markdownURL then encodes.
func hasControl(s string) bool {
	for i := 0; i < len(s); i++ {
		if s[i] < 0x20 || s[i] == 0x7f {
			return true
		}
	}
	return false
}

// errChatTooLarge names both of a chat body's limits: max_body, and
// max_upload for a body that carries an image to edit (docs/design.md#edits).
func (g *Gateway) errChatTooLarge() *apiError {
	e := errTooLarge(g.MaxBody)
	e.message = "Request body is larger than the limit of " + formatBytes(g.MaxBody) +
		" (max_body), or " + formatBytes(g.MaxUpload) + " for an image to edit (max_upload)"
	return e
}
