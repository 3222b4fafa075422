package zimage

// Rendering a Responses API answer: the response object, its output items
// and the SSE events of a streamed one, all written from one
// storedResponse, so that the answer, the stream and a later GET of a kept
// response say the same.

import (
	"bufio"
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"net/http"
	"strconv"
	"time"

	"go.uber.org/zap"
)

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
