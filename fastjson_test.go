package zimage

import (
	"encoding/json"
	"fmt"
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
	t.Parallel()
	for _, s := range jsonStringCases {
		want, _ := json.Marshal(s)
		if got := appendJSONString(nil, s); string(got) != string(want) {
			t.Errorf("appendJSONString(%q) = %s, want %s", s, got, want)
		}
	}
}

func TestJSONAppendFloat(t *testing.T) {
	t.Parallel()
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
	t.Parallel()
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
	t.Parallel()
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

// fillTagged sets every field of v that encoding/json reads or writes
// (exported, not tagged "-") to a value that is not its zero, through
// pointers, slices and structs, each string and number different and the
// strings full of what must be escaped. A kind it does not know fails the
// test, so that a new field of a new kind is not left zero unnoticed.
func fillTagged(t *testing.T, v reflect.Value, n *int) {
	t.Helper()
	*n++
	switch v.Kind() {
	case reflect.String:
		v.SetString(fmt.Sprintf("s%d <&\"\\\n\u2028猫>", *n))
	case reflect.Int, reflect.Int8, reflect.Int16, reflect.Int32, reflect.Int64:
		v.SetInt(int64(-*n))
	case reflect.Uint, reflect.Uint8, reflect.Uint16, reflect.Uint32, reflect.Uint64:
		v.SetUint(uint64(*n))
	case reflect.Float32, reflect.Float64:
		v.SetFloat(float64(*n) + 0.25)
	case reflect.Bool:
		v.SetBool(true)
	case reflect.Pointer:
		v.Set(reflect.New(v.Type().Elem()))
		fillTagged(t, v.Elem(), n)
	case reflect.Slice:
		v.Set(reflect.MakeSlice(v.Type(), 2, 2))
		for i := range 2 {
			fillTagged(t, v.Index(i), n)
		}
	case reflect.Struct:
		for i := range v.NumField() {
			if f := v.Type().Field(i); f.IsExported() && f.Tag.Get("json") != "-" {
				fillTagged(t, v.Field(i), n)
			}
		}
	default:
		t.Fatalf("fillTagged: a %s field; teach fillTagged its kind", v.Type())
	}
}

// filled is a T with every tagged field set (fillTagged).
func filled[T any](t *testing.T) T {
	var v T
	n := 0
	fillTagged(t, reflect.ValueOf(&v).Elem(), &n)
	return v
}

// The writers are held to what encoding/json reads back: a field added to
// a written type and not to its writer comes back zero and fails here,
// instead of being dropped from every answer.
func TestJSONAppendWritesEveryField(t *testing.T) {
	t.Parallel()
	c := filled[chatCompletion](t)
	checkReadBack(t, "chatCompletion.appendJSON", c, c.appendJSON(nil))
	u := filled[upstreamRequest](t)
	body, err := u.MarshalJSON()
	if err != nil {
		t.Fatal(err)
	}
	checkReadBack(t, "upstreamRequest.MarshalJSON (a generation)", u, body)

	// an edit carries the source and, of the generation's fields, all
	// but these (the service ignores them in an edit)
	editOmits := map[string]bool{"steps": true, "cfg": true, "seed": true, "negative_prompt": true}
	u.ImageSource = "https://gw.example/v1/zimage/images/a.png?x=<1>&y=2"
	body, err = u.MarshalJSON()
	var edit map[string]any
	if err != nil || json.Unmarshal(body, &edit) != nil {
		t.Fatalf("upstreamRequest.MarshalJSON (an edit) = %s, %v", body, err)
	}
	if edit["image_source"] != u.ImageSource {
		t.Errorf("edit body %s: image_source %v, want %q", body, edit["image_source"], u.ImageSource)
	}
	var generation map[string]any
	_ = json.Unmarshal(mustMarshalGeneration(t, u), &generation)
	for name, v := range generation {
		if got, ok := edit[name]; editOmits[name] == ok || (ok && !reflect.DeepEqual(got, v)) {
			t.Errorf("edit body %s: %q is %v (present %v), want it %s", body, name, got, ok, map[bool]string{true: "left out", false: fmt.Sprint(v)}[editOmits[name]])
		}
	}
}

// checkReadBack reads written back with encoding/json into a T, which
// must give want.
func checkReadBack[T any](t *testing.T, writer string, want T, written []byte) {
	t.Helper()
	var back T
	if err := json.Unmarshal(written, &back); err != nil {
		t.Fatalf("%s wrote %s: %v", writer, written, err)
	}
	if path := firstDiff(reflect.ValueOf(back), reflect.ValueOf(want), reflect.TypeFor[T]().Name()); path != "" {
		t.Errorf("%s wrote %s\n%s reads back different from the value written: is it written?", writer, written, path)
	}
}

// firstDiff names the first field in which a and b differ, "" if none.
func firstDiff(a, b reflect.Value, path string) string {
	switch a.Kind() {
	case reflect.Pointer:
		if a.IsNil() || b.IsNil() {
			break
		}
		return firstDiff(a.Elem(), b.Elem(), path)
	case reflect.Slice:
		if a.Len() != b.Len() {
			break
		}
		for i := range a.Len() {
			if d := firstDiff(a.Index(i), b.Index(i), fmt.Sprintf("%s[%d]", path, i)); d != "" {
				return d
			}
		}
		return ""
	case reflect.Struct:
		for i := range a.NumField() {
			if d := firstDiff(a.Field(i), b.Field(i), path+"."+a.Type().Field(i).Name); d != "" {
				return d
			}
		}
		return ""
	}
	if reflect.DeepEqual(a.Interface(), b.Interface()) {
		return ""
	}
	return path
}

// mustMarshalGeneration is u's body as a generation.
func mustMarshalGeneration(t *testing.T, u upstreamRequest) []byte {
	t.Helper()
	u.ImageSource = ""
	b, err := u.MarshalJSON()
	if err != nil {
		t.Fatal(err)
	}
	return b
}
