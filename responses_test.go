package zimage

// The Responses API driven by openai-go's Responses client (New,
// NewStreaming, Get, Delete) against the real Caddy and a fake image
// service that edits: plain and streamed answers, edits by input_image,
// the errors, and responses_text off. Kept responses (previous_response_id,
// one client's responses, their sweep) are in responses_store_test.go.

import (
	"bufio"
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/openai/openai-go/v3"
	"github.com/openai/openai-go/v3/responses"
)

// respText is a Responses request whose input is a string.
func respText(model, prompt string) responses.ResponseNewParams {
	return responses.ResponseNewParams{Model: model, Input: responses.ResponseNewParamsInputUnion{OfString: openai.String(prompt)}}
}

// respImageCall is the image_generation_call item of a response, which
// comes first.
func respImageCall(t *testing.T, r *responses.Response) responses.ResponseOutputItemImageGenerationCall {
	t.Helper()
	if len(r.Output) == 0 || r.Output[0].Type != "image_generation_call" {
		t.Fatalf("output %s, want an image_generation_call first", r.RawJSON())
	}
	return r.Output[0].AsImageGenerationCall()
}

// respStore is the response's store field, which openai-go's type leaves
// out.
func respStore(r *responses.Response) bool {
	var v struct {
		Store bool `json:"store"`
	}
	json.Unmarshal([]byte(r.RawJSON()), &v)
	return v.Store
}

// wantAPIError checks an SDK error's status and code.
func wantAPIError(t *testing.T, what string, err error, status int, code string) *openai.Error {
	t.Helper()
	var ae *openai.Error
	if !errors.As(err, &ae) || ae.StatusCode != status || ae.Code != code {
		t.Fatalf("%s: %v, want %d %s", what, err, status, code)
	}
	return ae
}

func TestResponsesSDK(t *testing.T) {
	f := newEditFake(t)
	editSite(t, f, "on", "")
	before := scrape(t)
	client := sdkFor(baseURL+"/v1/", testClientKey)
	ctx := context.Background()

	r, err := client.Responses.New(ctx, respText("Z-Image", "a red fox in the snow, ratio 16:9"))
	if err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(r.ID, "resp_") || r.Status != "completed" || string(r.Model) != "Z-Image" || r.CreatedAt == 0 || !respStore(r) {
		t.Errorf("response %s", r.RawJSON())
	}
	call := respImageCall(t, r)
	if img, err := base64.StdEncoding.DecodeString(call.Result); err != nil || string(img) != string(f.result) || call.Status != "completed" || !strings.HasPrefix(call.ID, "ig_") {
		t.Errorf("image call %s (%v)", call.RawJSON(), err)
	}
	// the image's facts as the Images API gives them: the real size and
	// format of the bytes, quality and background as asked
	var fields map[string]any
	json.Unmarshal([]byte(call.RawJSON()), &fields)
	if fields["size"] != "12x8" || fields["output_format"] != "png" || fields["quality"] != "auto" || fields["background"] != "auto" || fields["revised_prompt"] != "a red fox in the snow" {
		t.Errorf("image call fields %v", fields)
	}
	// the chat answer's markdown, for clients that show only text: the
	// ratio words work as in chat
	if len(r.Output) != 2 || r.Output[1].Type != "message" {
		t.Fatalf("output %s", r.RawJSON())
	}
	text := r.OutputText()
	u := storeURLPattern.FindString(text)
	if !strings.HasPrefix(text, "![a red fox in the snow]("+u+")") || u == "" || !strings.Contains(text, "**🎨 Aspect Ratio:** 16:9") {
		t.Errorf("message text %q", text)
	}
	bodies, _ := f.got()
	if b := bodies[len(bodies)-1]; b["prompt"] != "a red fox in the snow" || b["width"] != float64(2048) || b["height"] != float64(1152) {
		t.Errorf("service call %v", b)
	}

	// kept: GET gives it again, the image as base64 again
	got, err := client.Responses.Get(ctx, r.ID, responses.ResponseGetParams{})
	if err != nil {
		t.Fatal(err)
	}
	if got.ID != r.ID || respImageCall(t, got).Result != call.Result || got.OutputText() != text {
		t.Errorf("GET %.300s", got.RawJSON())
	}
	if err := client.Responses.Delete(ctx, r.ID); err != nil {
		t.Fatal(err)
	}
	_, err = client.Responses.Get(ctx, r.ID, responses.ResponseGetParams{})
	wantAPIError(t, "GET after DELETE", err, 404, "not_found")

	// store:false is answered, not kept
	r, err = client.Responses.New(ctx, responses.ResponseNewParams{Model: "Z-Image", Store: openai.Bool(false),
		Input: responses.ResponseNewParamsInputUnion{OfString: openai.String("a cat")}})
	if err != nil || respStore(r) {
		t.Fatalf("store:false: %v, %s", err, r.RawJSON())
	}
	_, err = client.Responses.Get(ctx, r.ID, responses.ResponseGetParams{})
	wantAPIError(t, "GET of a response not kept", err, 404, "not_found")

	// the image tool's size is the size asked of the service; its quality
	// and background are echoed
	status, _, raw := do(t, http.MethodPost, "/v1/responses", `{"model":"Z-Image","input":"a cat","tools":[{"type":"web_search"},`+
		`{"type":"image_generation","size":"1024x1536","quality":"high","background":"transparent","output_format":"webp","partial_images":2}]}`)
	bodies, _ = f.got()
	if b := bodies[len(bodies)-1]; status != 200 || b["width"] != float64(1024) || b["height"] != float64(1536) ||
		!strings.Contains(string(raw), `"quality":"high","background":"transparent"}`) {
		t.Errorf("image tool: %d, service call %v, %.300s", status, b, raw)
	}

	after := scrape(t)
	if d := after.delta(before, "caddy_zimage_requests_total", "endpoint", "responses", "model", "Z-Image", "code", "200"); d != 3 {
		t.Errorf("requests_total{responses,Z-Image,200} +%v, want +3", d)
	}
}

// respSSE is one event of a raw stream: its name and data.
type respSSE struct {
	name string
	data map[string]any
}

func TestResponsesStreaming(t *testing.T) {
	f := newEditFake(t)
	release := make(chan struct{})
	handler := f.handler
	f.setHandler(func(w http.ResponseWriter, r *http.Request) {
		if r.Method == http.MethodPost {
			<-release
		}
		handler(w, r)
	})
	t.Cleanup(func() {
		select { // never leave the fake blocked
		case <-release:
		default:
			close(release)
		}
	})
	editSite(t, f, "on", "stream_keepalive 50ms")

	// raw: the events up to "generating" at once, keep-alives while the
	// service works, then the rest in OpenAI's order
	req, _ := http.NewRequest(http.MethodPost, baseURL+"/v1/responses", strings.NewReader(`{"model":"Z-Image","input":"a cat","stream":true}`))
	req.Header.Set("Authorization", "Bearer "+testClientKey)
	req.Header.Set("Content-Type", "application/json")
	resp, err := testClient(20 * time.Second).Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if !strings.HasPrefix(resp.Header.Get("Content-Type"), "text/event-stream") {
		t.Fatalf("Content-Type %q", resp.Header.Get("Content-Type"))
	}
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 0, 1<<16), 1<<24)
	var events []respSSE
	var name string
	keepAlives, beforeImage := 0, 0
	for sc.Scan() {
		switch l := sc.Text(); {
		case l == ": keep-alive":
			if keepAlives++; keepAlives == 1 {
				beforeImage = len(events)
				close(release) // a keep-alive after the first events: now the image
			}
		case strings.HasPrefix(l, "event: "):
			name = l[len("event: "):]
		case strings.HasPrefix(l, "data: "):
			var d map[string]any
			if err := json.Unmarshal([]byte(l[len("data: "):]), &d); err != nil {
				t.Fatalf("event %s: %v", name, err)
			}
			events = append(events, respSSE{name, d})
		}
	}
	want := []string{"response.created", "response.in_progress", "response.output_item.added",
		"response.image_generation_call.in_progress", "response.image_generation_call.generating",
		"response.image_generation_call.completed", "response.output_item.done",
		"response.output_item.added", "response.content_part.added", "response.output_text.delta",
		"response.output_text.done", "response.content_part.done", "response.output_item.done", "response.completed"}
	var names []string
	for i, ev := range events {
		names = append(names, ev.name)
		if ev.data["type"] != ev.name || ev.data["sequence_number"] != float64(i) {
			t.Errorf("event %d: name %s, data type %v, sequence_number %v", i, ev.name, ev.data["type"], ev.data["sequence_number"])
		}
	}
	if strings.Join(names, " ") != strings.Join(want, " ") {
		t.Fatalf("events\n%v\nwant\n%v", names, want)
	}
	if keepAlives == 0 || beforeImage != 5 {
		t.Errorf("%d keep-alives, the first after %d events; want keep-alives after the 5 events up to generating", keepAlives, beforeImage)
	}
	done := events[6].data["item"].(map[string]any)
	if img, _ := base64.StdEncoding.DecodeString(done["result"].(string)); string(img) != string(f.result) {
		t.Errorf("output_item.done: the image call's result is not the image")
	}
	if _, ok := events[9].data["logprobs"].([]any); !ok || events[9].data["delta"] != events[10].data["text"] {
		t.Errorf("output_text.delta %v, output_text.done %v", events[9].data, events[10].data)
	}
	completed := events[13].data["response"].(map[string]any)
	if completed["status"] != "completed" || len(completed["output"].([]any)) != 2 {
		t.Errorf("response.completed %v", completed["status"])
	}

	// the SDK reads the same stream into its types
	client := sdkFor(baseURL+"/v1/", testClientKey)
	stream := client.Responses.NewStreaming(context.Background(), respText("Z-Image", "a dog"))
	var types []string
	var text string
	var final responses.Response
	for stream.Next() {
		ev := stream.Current()
		types = append(types, ev.Type)
		switch ev.Type {
		case "response.output_text.delta":
			text += ev.Delta
		case "response.completed":
			final = ev.AsResponseCompleted().Response
		}
	}
	if err := stream.Err(); err != nil || strings.Join(types, " ") != strings.Join(want, " ") {
		t.Fatalf("SDK stream %v: %v", types, err)
	}
	if !strings.HasPrefix(text, "![a dog](") || final.OutputText() != text || respImageCall(t, &final).Result == "" {
		t.Errorf("SDK stream: text %q, final %.200s", text, final.RawJSON())
	}

	// a failure after the stream began is response.failed with the error
	f.setHandler(failWith(500, `{"error":"boom"}`))
	status, _, raw := do(t, http.MethodPost, "/v1/responses", `{"input":"a cat","stream":true}`)
	if status != 200 || !strings.Contains(string(raw), "event: response.failed\ndata: {\"type\":\"response.failed\",\"sequence_number\":5,") ||
		!strings.Contains(string(raw), `"status":"failed","error":{"code":`) || !strings.Contains(string(raw), "boom") {
		t.Errorf("failed stream: %d %s", status, raw)
	}
}

func TestResponsesEditByInputImage(t *testing.T) {
	f := newEditFake(t)
	editSite(t, f, "on", "")
	src := storeTestPNG(t, 40, 30)
	client := sdkFor(baseURL+"/v1/", testClientKey)
	r, err := client.Responses.New(context.Background(), responses.ResponseNewParams{
		Model: "Z-Image", // not an edit model: the first edit model edits, as in chat
		Input: responses.ResponseNewParamsInputUnion{OfInputItemList: responses.ResponseInputParam{
			responses.ResponseInputItemParamOfMessage("a lighthouse", responses.EasyInputMessageRoleUser),
			responses.ResponseInputItemParamOfMessage(responses.ResponseInputMessageContentListParam{
				{OfInputText: &responses.ResponseInputTextParam{Text: "make it night"}},
				{OfInputImage: &responses.ResponseInputImageParam{ImageURL: openai.String("data:image/png;base64," + base64.StdEncoding.EncodeToString(src)), Detail: "auto"}},
			}, responses.EasyInputMessageRoleUser),
		}},
	})
	if err != nil {
		t.Fatal(err)
	}
	bodies, sources := f.got()
	if len(bodies) != 1 || string(sources[0]) != string(src) || bodies[0]["prompt"] != "make it night" || bodies[0]["model_index"] != float64(19) {
		t.Fatalf("service calls %v", bodies)
	}
	if !strings.Contains(r.OutputText(), "**✏️ Edit Instruction:**\nmake it night") || respImageCall(t, r).Result == "" {
		t.Errorf("answer %.400s", r.RawJSON())
	}

	// a body beyond max_body is an upload, as a chat body with an image is
	big := storeTestPNG(t, 700, 700)
	body := `{"model":"Qwen-Image-Edit","input":[{"role":"user","content":[{"type":"input_text","text":"add a moon"},` +
		`{"type":"input_image","image_url":"data:image/png;base64,` + base64.StdEncoding.EncodeToString(big) + `"}]}]}`
	if len(body) <= 1<<20 {
		t.Fatalf("the body is %d bytes, not beyond max_body", len(body))
	}
	status, _, raw := do(t, http.MethodPost, "/v1/responses", body)
	if _, sources = f.got(); status != 200 || string(sources[len(sources)-1]) != string(big) {
		t.Errorf("a large input_image: %d %.300s", status, raw)
	}
	// beyond max_body without an image, it is refused unread
	status, hdr, raw := do(t, http.MethodPost, "/v1/responses", `{"input":"`+strings.Repeat("a", 2<<20)+`"}`)
	itWantErr(t, status, hdr, raw, http.StatusRequestEntityTooLarge, "request_too_large")
}

func TestResponsesErrors(t *testing.T) {
	f := newEditFake(t)
	editSite(t, f, "on", "")
	// an edit's size comes from the same tool as a generation's, so a bad
	// one names the same field
	badEditSize := `{"model":"Qwen-Image-Edit","input":[{"role":"user","content":[{"type":"input_text","text":"add a moon"},` +
		`{"type":"input_image","image_url":"data:image/png;base64,` + base64.StdEncoding.EncodeToString(storeTestPNG(t, 40, 30)) + `"}]}],` +
		`"tools":[{"type":"image_generation","size":"huge"}]}`
	for _, tc := range []struct {
		body, param, code string
		status            int
	}{
		{`{"model":"Z-Image","input":[{"role":"user","content":[{"type":"input_text","text":"edit"},{"type":"input_image","file_id":"file-123"}]}]}`, "input", "invalid_request", 400},
		{`{"model":"Z-Image","input":"a cat","tools":[{"type":"image_generation","input_image_mask":{"image_url":"https://x.example/m.png"}}]}`, "tools", "invalid_request", 400},
		{`{"model":"Z-Image","input":"a cat","tools":[{"type":"image_generation","size":"huge"}]}`, "tools", "invalid_request", 400},
		{badEditSize, "tools", "invalid_request", 400},
		// the tool's quality and background are read like the Images API's:
		// a value OpenAI does not have is refused, not echoed back
		{`{"model":"Z-Image","input":"a cat","tools":[{"type":"image_generation","quality":"ultra"}]}`, "tools", "invalid_request", 400},
		{`{"model":"Z-Image","input":"a cat","tools":[{"type":"image_generation","background":"<b>sk-x</b>"}]}`, "tools", "invalid_request", 400},
		{`{"model":"Z-Image"}`, "input", "invalid_request", 400},
		{`{"model":"Z-Image","input":[{"role":"assistant","content":"hello"}]}`, "input", "invalid_request", 400},
		{`{"model":"Z-Image","input":42}`, "input", "invalid_request", 400},
		{`{"model":"nope","input":"a cat"}`, "model", "model_not_found", 404},
	} {
		status, hdr, raw := do(t, http.MethodPost, "/v1/responses", tc.body)
		if e := itWantErr(t, status, hdr, raw, tc.status, tc.code); e.Param == nil || *e.Param != tc.param {
			t.Errorf("%s: param %v, want %s", tc.body, e.Param, tc.param)
		}
	}
	if n := len(f.Calls()); n != 0 {
		t.Errorf("%d service calls for refused requests", n)
	}
	status, hdr, raw := do(t, http.MethodPut, "/v1/responses", `{}`)
	itWantErr(t, status, hdr, raw, 405, "method_not_allowed")

	// without the store there is nowhere to keep a response
	editSite(t, f, "", "")
	client := sdkFor(baseURL+"/v1/", testClientKey)
	p := respText("Qwen-Image-Edit", "make it night")
	p.PreviousResponseID = openai.String("resp_" + strings.Repeat("a", 48))
	_, err := client.Responses.New(context.Background(), p)
	if e := wantAPIError(t, "previous_response_id without the store", err, 400, "store_required"); e.Param != "previous_response_id" || !strings.Contains(e.Message, "turn 'store' on") {
		t.Errorf("error %q", e.Message)
	}
	// and a response is still answered, marked as not kept
	r, err := client.Responses.New(context.Background(), respText("Z-Image", "a cat"))
	if err != nil || respStore(r) || respImageCall(t, r).Result == "" {
		t.Errorf("without the store: %v, %s", err, r.RawJSON())
	}

	// with no_auth, a body type any web page can make a browser send
	// without a preflight is refused, as for chat
	startCaddy(t, strings.Replace(gatewaySite(f.fakeUpstream, nil, ""), "api_key "+testClientKey, "no_auth", 1))
	status, hdr, raw = do(t, http.MethodPost, "/v1/responses", `{"input":"a cat"}`, "Content-Type", "text/plain", "Authorization", "")
	itWantErr(t, status, hdr, raw, http.StatusUnsupportedMediaType, "unsupported_media_type")
}

// responses_text off leaves the message out, for clients that render the
// image item themselves; a model's own setting wins over the gateway's.
func TestResponsesTextOff(t *testing.T) {
	f := newEditFake(t)
	editSite(t, f, "on", "responses_text off\n\tmodel Z-Turbo {\n\t\tmodel_index 7\n\t\tresponses_text on\n\t}")
	client := sdkFor(baseURL+"/v1/", testClientKey)
	ctx := context.Background()
	r, err := client.Responses.New(ctx, respText("Z-Image", "a cat"))
	if err != nil {
		t.Fatal(err)
	}
	if len(r.Output) != 1 || respImageCall(t, r).Result == "" || r.OutputText() != "" {
		t.Errorf("responses_text off: %.300s", r.RawJSON())
	}
	stream := client.Responses.NewStreaming(ctx, respText("Z-Image", "a cat"))
	var types []string
	for stream.Next() {
		types = append(types, stream.Current().Type)
	}
	if stream.Err() != nil || strings.Contains(strings.Join(types, " "), "output_text") || types[len(types)-1] != "response.completed" {
		t.Errorf("streamed with responses_text off: %v %v", types, stream.Err())
	}
	if r, err = client.Responses.New(ctx, respText("Z-Turbo", "a cat")); err != nil || len(r.Output) != 2 {
		t.Errorf("the model's responses_text on: %v, %d items", err, len(r.Output))
	}
}

// responses_text is a switch at the gateway and in a model block.
func TestUnitResponsesTextCaddyfile(t *testing.T) {
	var g Gateway
	src := "zimage_gateway {\n\tresponses_text off\n\tmodel Z-Image {\n\t\tresponses_text on\n\t}\n\tmodel Z-Turbo\n}"
	if err := g.UnmarshalCaddyfile(caddyfile.NewTestDispenser(src)); err != nil {
		t.Fatal(err)
	}
	if g.ResponsesText == nil || *g.ResponsesText || g.Models[0].ResponsesText == nil || !*g.Models[0].ResponsesText || g.Models[1].ResponsesText != nil {
		t.Fatalf("parsed %+v", g)
	}
	if err := g.provisionModels(); err != nil {
		t.Fatal(err)
	}
	if !g.models[0].responsesText || g.models[1].responsesText {
		t.Errorf("Z-Image %v (its own on), Z-Turbo %v (the gateway's off)", g.models[0].responsesText, g.models[1].responsesText)
	}
	wantCaddyfileError(t, "zimage_gateway {\n\tresponses_text maybe\n}", "responses_text: invalid value 'maybe': want on or off")
	wantCaddyfileError(t, "zimage_gateway {\n\tmodel Z {\n\t\tresponses_text\n\t}\n}", "wrong argument count")
	wantCaddyfileError(t, "zimage_gateway {\n\tresponses_text on\n\tresponses_text off\n}", "responses_text already specified")
}

// FuzzResponsesInput feeds the Responses decoder arbitrary bodies, as the
// body's reader hands them over: it answers a prompt (and maybe an image)
// or an OpenAI error, never panics.
func FuzzResponsesInput(f *testing.F) {
	png := base64.StdEncoding.EncodeToString(storeTestPNG(f, 2, 2))
	f.Add(`{"input":"a cat"}`)
	f.Add(`{"input":[{"role":"user","content":[{"type":"input_text","text":"x"},{"type":"input_image","image_url":"data:image/png;base64,` + png + `"}]}]}`)
	f.Add(`{"input":[{"type":"message","role":"user","content":[{"type":"input_image","image_url":{"url":"https://a.example/x.png"}}]}]}`)
	f.Add(`{"input":[{"role":"user","content":[{"type":"input_image","file_id":"f"}]}],"tools":[{"type":"image_generation","input_image_mask":{}}]}`)
	f.Add(`{"input":[{"type":"item_reference","id":"x"},{"role":"user","content":null}]}`)
	g := &Gateway{MaxUpload: 1 << 16, MaxPromptLength: 100}
	f.Fuzz(func(t *testing.T, body string) {
		js, urls := extractDataURLs([]byte(body))
		var req responsesRequest
		if decodeJSON(js, &req) != nil {
			return
		}
		if _, e := req.imageTool(); e != nil && e.status != http.StatusBadRequest {
			t.Fatalf("imageTool: %v", e)
		}
		prompt, src, e := g.responsesInput(req.Input, urls)
		if e == nil && (strings.TrimSpace(prompt) == "" || src != nil && src.data == nil && src.url == "") {
			t.Fatalf("responsesInput(%q) = %q, %+v", body, prompt, src)
		}
		// (a data: image beyond max_upload is the 413 of every upload)
		if e != nil && e.status != http.StatusRequestEntityTooLarge && (e.status != http.StatusBadRequest || e.param != "input") {
			t.Fatalf("responsesInput(%q): %d %s %q", body, e.status, e.param, e.message)
		}
	})
}
