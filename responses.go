package zimage

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"net/http"
	"strings"
	"unicode/utf8"
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
//
// This file decodes the request into an ask; responses_render.go writes
// the answer, responses_store.go keeps it for GET, DELETE and
// previous_response_id.

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
	// quality and background are echoed in the answer: only OpenAI's
	// values, as the Images API takes them
	look, e := parseLook(tool.Quality, tool.Background)
	if e != nil {
		e.param = "tools"
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
			// the Images API's fields are named where this body has them:
			// the size in the image tool, the instruction in input
			switch e.param {
			case "size":
				e.param = "tools"
			case "prompt":
				e.param = "input"
			}
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
			Quality:    look.quality,
			Background: look.background,
		},
	}
	if req.PreviousResponseID != nil {
		out.rec.PreviousResponseID = *req.PreviousResponseID
	}
	q.out = out
	return nil
}

// secureID is 24 random bytes in hex: a response id is named in GET and
// DELETE, so it must not be guessable even where no_auth lets every
// request be the same client.
func secureID() string {
	var b [24]byte
	_, _ = rand.Read(b[:])
	return hex.EncodeToString(b[:])
}
