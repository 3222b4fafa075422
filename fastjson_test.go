package zimage

import (
	"encoding/json"
	"math"
	"reflect"
	"strings"
	"testing"
)

// The hand-written encoders must write what encoding/json writes: clients
// parse the chat completion, the image service the request body, and a
// difference in escaping is a difference in what reaches them.

var jsonStringCases = func() []string {
	cases := []string{
		"", "a cat", `quote " backslash \ slash /`, "<script>alert(1)</script> & co",
		"line\nbreak\r\ttab\b\f", "\x00\x01\x1f\x7f", "猫 🐈 ✨ 📝", "\u2028\u2029 separators",
		"bad utf-8 \xff\xfe \xc3 end", "\xe2\x80", "![a](https://img.example/x.png?a=1&b=<2>)",
	}
	var all strings.Builder
	for b := 0; b < 0x80; b++ {
		all.WriteByte(byte(b))
	}
	return append(cases, all.String())
}()

func TestJSONAppendString(t *testing.T) {
	for _, s := range jsonStringCases {
		want, _ := json.Marshal(s)
		if got := appendJSONString(nil, s); string(got) != string(want) {
			t.Errorf("appendJSONString(%q) = %s, want %s", s, got, want)
		}
	}
}

func TestJSONAppendFloat(t *testing.T) {
	for _, f := range []float64{0, math.Copysign(0, -1), 1, 4.5, 7, -3.25, 0.1, 1e-6, 9.99e-7, 1e-7, 1.5e-10,
		123456789.125, 1e20, 1e21, 1.234e25, -1e21, 5e-324, math.MaxFloat64, math.SmallestNonzeroFloat64} {
		want, _ := json.Marshal(f)
		if got := appendJSONFloat(nil, f); string(got) != string(want) {
			t.Errorf("appendJSONFloat(%v) = %s, want %s", f, got, want)
		}
	}
}

// marshalCompletion is what encoding/json writes for c (chatCompletion has
// no MarshalJSON: its appendJSON is called by name).
func marshalCompletion(c chatCompletion) string {
	b, _ := json.Marshal(c)
	return string(b)
}

func TestJSONAppendChatCompletion(t *testing.T) {
	content := "![a <cat> & \"dog\"](https://img.example/x.png)\n\n**📝 Prompt:**\n> a\u2028cat \xff"
	cases := map[string]chatCompletion{
		"answer": {ID: "chatcmpl-1", Object: "chat.completion", Created: 1700000000, Model: "Z-Image",
			Choices: []chatChoice{{FinishReason: ptr("stop"), Message: &chatDelta{Role: "assistant", Content: &content}}}, Usage: &usage{}},
		"role chunk": {ID: "chatcmpl-2", Object: "chat.completion.chunk", Created: 1, Model: "z-image-turbo",
			Choices: []chatChoice{{Delta: &chatDelta{Role: "assistant", Content: ptr("")}}}},
		"content chunk": {ID: "x", Object: "chat.completion.chunk", Model: "Z-<Image>",
			Choices: []chatChoice{{Index: 3, Delta: &chatDelta{Content: &content}}}},
		"finish chunk": {ID: "x", Object: "chat.completion.chunk",
			Choices: []chatChoice{{Delta: &chatDelta{}, FinishReason: ptr("stop")}}},
		"usage chunk":     {ID: "x", Object: "chat.completion.chunk", Choices: []chatChoice{}, Usage: &usage{PromptTokens: 1, CompletionTokens: 2, TotalTokens: 3}},
		"no choices":      {ID: "x", Created: -5},
		"two choices":     {Choices: []chatChoice{{Message: &chatDelta{Role: "assistant"}}, {Index: 1, Delta: &chatDelta{Content: ptr("b")}, Message: &chatDelta{}}}},
		"content nothing": {Choices: []chatChoice{{}}},
	}
	for name, c := range cases {
		if got, want := string(c.appendJSON(nil)), marshalCompletion(c); got != want {
			t.Errorf("%s:\n got %s\nwant %s", name, got, want)
		}
	}
}

// upstreamRequestMirror is the image service's body as the struct tags
// describe it, for encoding/json to write: a generation, and an edit.
type upstreamRequestMirror struct {
	Prompt         string  `json:"prompt"`
	Width          int     `json:"width"`
	Height         int     `json:"height"`
	Steps          int     `json:"steps"`
	CFG            float64 `json:"cfg"`
	ModelIndex     int     `json:"model_index"`
	Seed           int64   `json:"seed"`
	NegativePrompt string  `json:"negative_prompt,omitempty"`
}

type upstreamEditMirror struct {
	Prompt      string `json:"prompt"`
	ModelIndex  int    `json:"model_index"`
	ImageSource string `json:"image_source"`
	Width       int    `json:"width"`
	Height      int    `json:"height"`
}

func checkUpstreamRequest(t *testing.T, u upstreamRequest) {
	t.Helper()
	var want []byte
	if u.ImageSource != "" {
		want, _ = json.Marshal(upstreamEditMirror{u.Prompt, u.ModelIndex, u.ImageSource, u.Width, u.Height})
	} else {
		want, _ = json.Marshal(upstreamRequestMirror{u.Prompt, u.Width, u.Height, u.Steps, u.CFG, u.ModelIndex, u.Seed, u.NegativePrompt})
	}
	got, err := u.MarshalJSON()
	if err != nil || string(got) != string(want) {
		t.Errorf("MarshalJSON(%+v) = %s, %v\nwant %s", u, got, err, want)
	}
	// the body the gateway sends is what json.Marshal makes of the request
	via, err := json.Marshal(u)
	if err != nil || string(via) != string(want) {
		t.Errorf("json.Marshal(%+v) = %s, %v\nwant %s", u, via, err, want)
	}
}

func TestJSONAppendUpstreamRequest(t *testing.T) {
	for _, u := range []upstreamRequest{
		{Prompt: "a cat", Width: 2048, Height: 2048, Steps: 8, CFG: 7, ModelIndex: 5, Seed: 123},
		{Prompt: "<a> & \"b\"\n", Width: 64, Height: 2048, Steps: 50, CFG: 4.25, ModelIndex: 0, Seed: 0, NegativePrompt: "blurry, \u2028 \xff"},
		{Prompt: "", CFG: 1e-7, Seed: -1, ModelIndex: -3},
		{Prompt: "make it blue", ModelIndex: 18, ImageSource: "https://gw.example/v1/images/abc.png?x=1&y=<2>", Width: 1024, Height: 768, Steps: 8, CFG: 3, Seed: 9, NegativePrompt: "ignored in an edit"},
	} {
		checkUpstreamRequest(t, u)
	}
	for _, f := range []float64{math.NaN(), math.Inf(1)} {
		if _, err := (upstreamRequest{CFG: f}).MarshalJSON(); err == nil {
			t.Errorf("MarshalJSON with cfg %v: no error, want json.Marshal's unsupported value", f)
		}
	}
}

// FuzzJSONAppend holds the hand-written encoders to encoding/json on any
// text and any cfg.
func FuzzJSONAppend(f *testing.F) {
	for _, s := range jsonStringCases {
		f.Add(s, s, 7.5, false)
	}
	f.Add("a", "", 1e21, true)
	f.Fuzz(func(t *testing.T, prompt, other string, cfg float64, edit bool) {
		if math.IsInf(cfg, 0) || math.IsNaN(cfg) {
			return
		}
		want, _ := json.Marshal(prompt)
		if got := appendJSONString(nil, prompt); string(got) != string(want) {
			t.Fatalf("appendJSONString(%q) = %s, want %s", prompt, got, want)
		}
		u := upstreamRequest{Prompt: prompt, NegativePrompt: other, CFG: cfg, Width: 1024, Height: 1024, Steps: 8, Seed: 42}
		if edit {
			u.ImageSource = "https://x.example/" + other
		}
		checkUpstreamRequest(t, u)
		c := chatCompletion{ID: other, Object: "chat.completion", Model: other,
			Choices: []chatChoice{{FinishReason: ptr("stop"), Message: &chatDelta{Role: "assistant", Content: &prompt}}}, Usage: &usage{}}
		if got, want := string(c.appendJSON(nil)), marshalCompletion(c); got != want {
			t.Fatalf("chat completion:\n got %s\nwant %s", got, want)
		}
	})
}

// Bodies as clients send them, and the corners of encoding/json's
// decoding: readChat must decode what json.Unmarshal decodes, or give up.
var chatBodies = []struct {
	body string
	fast bool // readChat must read it itself (the shapes clients send)
}{
	{`{"model":"Z-Image","messages":[{"role":"user","content":"a cat no-enhance"}]}`, true},
	{`{"model":"Z-Image","messages":[{"role":"system","content":"You are helpful."},{"role":"user","content":"a cat 16:9"}],"stream":true,"stream_options":{"include_usage":true},"temperature":0.7,"top_p":1,"max_tokens":null}`, true},
	{`{"messages":[{"role":"user","content":[{"type":"text","text":"a cat"},{"type":"image_url","image_url":{"url":"https://x.example/a.png","detail":"auto"}}]}],"model":"z-image"}`, true},
	{" \n{\"model\" : \"Z-Image\" , \"prompt\":\"\\u732b \\ud83d\\udc08 \\\"q\\\" \\/ \\n\\t\",\"width\":1024,\"height\":7.68e2,\"cfg\":-0.5,\"seed\":\"42\",\"negative_prompt\":null} \r\n", true},
	{`{"model":null,"messages":null,"prompt":null,"stream":null,"stream_options":null,"width":null,"seed":null}`, true},
	{`{"messages":[null,{"role":null,"content":null,"name":"x"},{}],"stream_options":{"include_usage":null,"x":[1,{"y":[]}]}}`, true},
	{`{"prompt":"lone \ud800 surrogate \udc00 and \ud800\u0041"}`, true},
	{`{"seed":-0.0e+3,"cfg":1E400}`, false},
	{`{"Model":"Z-Image"}`, false},
	{`{"model":"a","model":"b"}`, false},
	{`{"mod\u0065l":"Z-Image"}`, false},
	{`{"ſtream":true}`, false},
	{`{"stream":"yes"}`, false},
	{`{"width":"1024"}`, false},
	{`{"messages":{"role":"user"}}`, false},
	{`{"messages":["a cat"]}`, false},
	{`{"model":"Z-Image"} {}`, false},
	{`{"model":"Z-Image",}`, false},
	{`{"width":01}`, false},
	{`{"width":1.}`, false},
	{`{"x":[1,2,]}`, false},
	{`{"x":tru}`, false},
	{"{\"prompt\":\"a\x01b\"}", false},
	{`null`, false},
	{`[]`, false},
	{``, false},
	{`{"prompt":"\x"}`, false},
	{`{"x":` + strings.Repeat("[", 100) + strings.Repeat("]", 100) + `}`, false},
}

// checkRead reads body with read and, when it read it, with json.Unmarshal:
// both must give the same value.
func checkRead[T any](t *testing.T, body []byte, read func([]byte, *T) bool) bool {
	t.Helper()
	var fast, slow T
	if !read(body, &fast) {
		return false
	}
	if err := json.Unmarshal(body, &slow); err != nil {
		t.Fatalf("read %q, json.Unmarshal: %v", body, err)
	}
	if !reflect.DeepEqual(fast, slow) {
		t.Fatalf("read %q\n got %+v\nwant %+v", body, fast, slow)
	}
	return true
}

func TestReadChat(t *testing.T) {
	for _, tc := range chatBodies {
		if got := checkRead(t, []byte(tc.body), readChat); got != tc.fast {
			t.Errorf("readChat(%q) read it: %v, want %v", tc.body, got, tc.fast)
		}
	}
}

var answerBodies = []struct {
	body string
	fast bool
}{
	{`{"success":true,"data":{"image_url":"https://img.example/x.png"}}`, true},
	{`{"success":true,"data":{"image_url":"https://img.example/x.png","points_used":2,"remaining_points":"98.5","image_id":12345,"model_name":"Z-Image","prompt":"a cat","width":1024}}`, true},
	{`{"success":false,"error":{"message":"余额不足","code":402},"message":null}`, true},
	{`{"success":false,"error":"insufficient points","data":null}`, true},
	{`{"success":null,"message":"\u8bf7\u7a0d\u540e"}`, true},
	{`{"success":"true"}`, false},
	{`{"data":{"image_url":5}}`, false},
	{`{"Success":true}`, false},
	{`{"data":{"image_url":"a","image_url":"b"}}`, false},
	{`{"success":true,"data":{"image_url":`, false},
	{`<html>Just a moment...</html>`, false},
}

func TestReadAnswer(t *testing.T) {
	for _, tc := range answerBodies {
		if got := checkRead(t, []byte(tc.body), readAnswer); got != tc.fast {
			t.Errorf("readAnswer(%q) read it: %v, want %v", tc.body, got, tc.fast)
		}
	}
}

// FuzzReadJSON holds the readers to encoding/json on any input: what they
// read, they read as json.Unmarshal does.
func FuzzReadJSON(f *testing.F) {
	for _, tc := range chatBodies {
		f.Add([]byte(tc.body))
	}
	for _, tc := range answerBodies {
		f.Add([]byte(tc.body))
	}
	f.Fuzz(func(t *testing.T, body []byte) {
		checkRead(t, body, readChat)
		checkRead(t, body, readAnswer)
		r := jsonReader{b: body}
		if s, ok := r.str(); ok && r.end() {
			var want string
			if err := json.Unmarshal(body, &want); err != nil || s != want {
				t.Fatalf("str(%q) = %q, json.Unmarshal: %q, %v", body, s, want, err)
			}
		}
	})
}
