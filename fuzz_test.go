package zimage

import (
	"bytes"
	"encoding/json"
	"fmt"
	"net/http"
	"reflect"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"unicode/utf8"
)

// Fuzz targets for the parsers that read client and LLM text (docs/design.md#how-it-is-tested).
// Their seed corpora run in every `go test`; `go test -fuzz FuzzUnitX`
// explores further.

// triggerWords counts raw trigger words (any case, glued or not): removing
// a triggered ratio always removes one, and the joins removeSpan makes
// (with a space) cannot create one.
var triggerWords = regexp.MustCompile(`(?i)ratio|比例`)

func FuzzUnitDetectRatio(f *testing.F) {
	for _, s := range []string{
		"一只猫，比例 16:9", "比例：16:9", "ratio: 3:2", "16:9 比例", "aspect ratio 16:9", "Ratio 9:16",
		"16:9", "下午16:30的洛杉矶", "比例 13:2", "ratio 1:16", "比例 16:90", "rationale 16:9",
		"a cat, ratio 16:9, on a roof", "ratio 1:1 ratio 16:9", "1:1比例", "比例16：9。", "x比例 16:9ratio",
		"ratio", "比例", ":", "：", "", " ratio 1:1 ", "aspect\tratio\n3:4", "İİ ratio 1:2", "\xff比例 1:1\xfe",
		"ratio 00016:9", "ratio 1:1.", "ratio 1:1,", "，，比例 3:4，，",
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, in string) {
		if triggerPattern.MatchString(in) && !mayTrigger(in) {
			t.Fatalf("mayTrigger(%q) = false, but the trigger pattern matches: detectRatio would miss it", in)
		}
		ratio, rest, ok := detectRatio(in)
		if !ok {
			if ratio != "" || rest != in {
				t.Fatalf("detectRatio(%q) = (%q, %q, false): a miss must return the prompt unchanged", in, ratio, rest)
			}
			return
		}
		if _, listed := ratioSizes[ratio]; !listed {
			t.Fatalf("detectRatio(%q) found %q, not one of the six", in, ratio)
		}
		if len(rest) >= len(in) {
			t.Fatalf("detectRatio(%q) left %q: nothing removed", in, rest)
		}
		if got, was := len(triggerWords.FindAllString(rest, -1)), len(triggerWords.FindAllString(in, -1)); got >= was {
			t.Fatalf("detectRatio(%q) left %q: the trigger is still there (%d trigger words, was %d)", in, rest, got, was)
		}
		if utf8.ValidString(in) && !utf8.ValidString(rest) {
			t.Fatalf("detectRatio(%q) left invalid UTF-8 %q", in, rest)
		}
	})
}

// freeSkipWord reports whether s still holds a free-standing no-enhance.
func freeSkipWord(s string) bool {
	lower := asciiLower(s)
	for i := 0; ; {
		j := strings.Index(lower[i:], skipWord)
		if j < 0 {
			return false
		}
		j += i
		end := j + len(skipWord)
		if (j == 0 || !isWordByte(s[j-1])) && (end == len(s) || !isWordByte(s[end])) {
			return true
		}
		i = j + 1
	}
}

func FuzzUnitStripSkipWord(f *testing.F) {
	for _, s := range []string{
		"a cat no-enhance", "NO-ENHANCE a cat", "一只猫no-enhance", "no-enhancement", "xno-enhance",
		"no-enhance no-enhance", "no-no-enhanceenhance", "no-enhance-no-enhance", "İİİİİİİİİİ no-enhance",
		"\xffno-enhance\xfe", "0\tno-enhAnCe\xb0", "ȺȺȺȺȺ no-enhance", "  a  \t no-enhance  b ", "", "no-enhance",
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, in string) {
		out, found := stripSkipWord(in)
		if found != freeSkipWord(in) {
			t.Fatalf("stripSkipWord(%q) found %v, but a free-standing token is there: %v", in, found, !found)
		}
		if !found {
			if out != in {
				t.Fatalf("stripSkipWord(%q) = %q without a skip word: the prompt must be unchanged", in, out)
			}
			return
		}
		if freeSkipWord(out) {
			t.Fatalf("stripSkipWord(%q) = %q still holds the skip word", in, out)
		}
		if len(out) > len(in)-len(skipWord) {
			t.Fatalf("stripSkipWord(%q) = %q removed less than the token", in, out)
		}
		if utf8.ValidString(in) && !utf8.ValidString(out) {
			t.Fatalf("stripSkipWord(%q) = %q is not valid UTF-8", in, out)
		}
	})
}

func FuzzUnitDecodeChat(f *testing.F) {
	for _, s := range []string{
		`{"prompt":"a cat"}`,
		`{"prompt":"  ","messages":[{"role":"user","content":"a dog"}]}`,
		`{"model":"Z-Image","messages":[{"role":"system","content":"x"},{"role":"user","content":[{"type":"text","text":"a"},{"type":"image_url","image_url":{"url":"u"}}]}]}`,
		`{"messages":[{"role":"user","content":5}]}`,
		`{"messages":[{"role":"user","content":["x"]}]}`,
		`{"messages":"a"}`, `{"prompt":1}`, `{"stream":"x","prompt":"p"}`, `{"width":"w"}`,
		`{"stream_options":{"include_usage":1}}`, `{"seed":{"a":1},"prompt":"p"}`,
		`[]`, `null`, `""`, ``, `{`, `{"prompt":"` + strings.Repeat("猫", 101) + `"}`,
		`{"messages":[{"role":"user","content":"\u0000"}]}`, `{"prompt":"\ud800"}`,
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, body []byte) {
		req, prompt, e := decodeChat(body, 100)
		if e != nil {
			if e.status != http.StatusBadRequest || e.message == "" || e.typ != "invalid_request_error" || req != nil || prompt != "" {
				t.Fatalf("decodeChat(%q) failed with %+v (req %v, prompt %q), want a plain 400", body, e, req, prompt)
			}
			return
		}
		if req == nil || prompt == "" || prompt != strings.TrimSpace(prompt) || utf8.RuneCountInString(prompt) > 100 {
			t.Fatalf("decodeChat(%q) = %v, %q: want a trimmed, non-empty prompt within the limit", body, req, prompt)
		}
		// what follows decoding must not panic either
		if _, e := parseSeed(req.Seed); e != nil && (e.status != http.StatusBadRequest || e.param != "seed") {
			t.Fatalf("parseSeed(%q) = %+v", req.Seed, e)
		}
	})
}

func FuzzUnitParseEnhanced(f *testing.F) {
	for _, s := range []string{
		`{"prompt":"a cat","aspect_ratio":"16:9"}`,
		"```json\n{\"prompt\":\"a cat\",\"aspect_ratio\":\"3:2\"}\n```",
		"<think>hmm {x}</think>{\"prompt\":\"a cat\"}", "<think>{\"prompt\":\"x\"}", "<THINK></think>",
		`Here: {"prompt":"a cat","aspect_ratio":"4:3"} done`, `{"prompt":"a","aspect_ratio":7}`,
		`{"prompt":"","aspect_ratio":null}`, `{{{{{{{{`, "İİİ<think>x</think>{\"prompt\":\"p\"}", "ȺȺȺȺ<think>{}</think>{\"prompt\":\"p\"}", "",
		`{"prompt":"p","aspect_ratio":"16：9"}`, strings.Repeat("{", 100) + `{"prompt":"late"}`,
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, in string) {
		out, err := parseEnhanced(in)
		if err != nil {
			if out != (enhanced{}) {
				t.Fatalf("parseEnhanced(%q) failed but returned %+v", in, out)
			}
			return
		}
		if out.prompt == "" || out.prompt != strings.TrimSpace(out.prompt) {
			t.Fatalf("parseEnhanced(%q) prompt %q: want trimmed and non-empty", in, out.prompt)
		}
		if _, listed := ratioSizes[out.ratio]; out.ratio != "" && !listed {
			t.Fatalf("parseEnhanced(%q) ratio %q: not one of the six", in, out.ratio)
		}
	})
}

// percentDecode undoes markdownURL's %XX escapes.
func percentDecode(s string) string {
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '%' && i+2 < len(s) {
			if v, err := strconv.ParseUint(s[i+1:i+3], 16, 8); err == nil {
				b.WriteByte(byte(v))
				i += 2
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

func FuzzUnitMarkdownURL(f *testing.F) {
	for _, s := range []string{
		"https://img.example.com/a.png", "https://img.example.com/a b(1).png", "https://x/[a]<b>",
		"https://x/a\nb\rc\td\x00e\x7f", "https://x/\"'\\`", "https://x/a.png) ![x](y", "https://x/猫.png", "",
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, in string) {
		out := markdownURL(in)
		if strings.ContainsAny(out, " ()[]<>\n\r\t") {
			t.Fatalf("markdownURL(%q) = %q holds a character that breaks a markdown link", in, out)
		}
		for i := 0; i < len(out); i++ {
			if out[i] < 0x20 || out[i] == 0x7f {
				t.Fatalf("markdownURL(%q) = %q holds a control character", in, out)
			}
		}
		if !strings.Contains(in, "%") && percentDecode(out) != in {
			t.Fatalf("markdownURL(%q) = %q does not decode back to the URL", in, out)
		}
		// the image line as the markdown renderer sees it keeps the URL whole
		line := "![" + altText(in) + "](" + out + ")"
		if strings.Count(line, "](") != 1 || strings.Contains(out, ")") {
			t.Fatalf("image line %q does not parse as one image", line)
		}
	})
}

// refContent is a message's content read as the gateway read it before it
// was decoded once with the body: kept raw, then decoded by encoding/json
// into one struct for the prompt and into another for the image of an
// edit. messageContent must read every message the same.
type refContent struct {
	text    string
	textErr bool
	images  []string // "type|set|url" of each part, nil when not an edit's content
}

func readRefContent(raw json.RawMessage) refContent {
	var ref refContent
	raw = bytes.TrimSpace(raw)
	if len(raw) == 0 || string(raw) == "null" {
		return ref
	}
	switch raw[0] {
	case '"':
		ref.textErr = json.Unmarshal(raw, &ref.text) != nil
	case '[':
		var parts []struct {
			Type string `json:"type"`
			Text string `json:"text"`
		}
		if json.Unmarshal(raw, &parts) != nil {
			ref.textErr = true
		}
		var texts []string
		for _, p := range parts {
			if p.Type == "text" && strings.TrimSpace(p.Text) != "" {
				texts = append(texts, p.Text)
			}
		}
		if !ref.textErr {
			ref.text = strings.Join(texts, " ")
		}
		var images []struct {
			Type     string `json:"type"`
			ImageURL *struct {
				URL string `json:"url"`
			} `json:"image_url"`
		}
		if json.Unmarshal(raw, &images) == nil {
			ref.images = []string{}
			for _, p := range images {
				url := ""
				if p.ImageURL != nil {
					url = p.ImageURL.URL
				}
				ref.images = append(ref.images, fmt.Sprintf("%s|%v|%s", p.Type, p.ImageURL != nil, url))
			}
		}
	default:
		ref.textErr = true
	}
	return ref
}

func readContent(c *messageContent) refContent {
	var got refContent
	text, err := c.text()
	got.text, got.textErr = text, err != nil
	if c.isParts && !c.invalid && !c.badImage() {
		got.images = []string{}
		for _, p := range c.parts {
			got.images = append(got.images, fmt.Sprintf("%s|%v|%s", p.Type, p.ImageURL.set, p.ImageURL.url))
		}
	}
	return got
}

// FuzzUnitMessageContent holds messageContent to the two decodes it
// replaced, on any message: its keys in any case, given twice, its
// values of any type.
func FuzzUnitMessageContent(f *testing.F) {
	for _, s := range []string{
		`{"role":"user","content":"a cat"}`, `{"role":"user","content":null}`, `{"role":"user"}`,
		`{"role":"user","content":5}`, `{"role":"user","content":{"text":"a"}}`, `{"role":"user","content":["a"]}`,
		`{"role":"user","content":[{"type":"text","text":"a cat"},{"type":"image_url","image_url":{"url":"https://x/a.png","detail":"auto"}}]}`,
		`{"role":"user","content":[{"type":"text","text":5},{"type":"image_url","image_url":{"url":"https://x/a.png"}}]}`,
		`{"role":"user","content":[{"type":"text","text":"a"},{"type":"image_url","image_url":"https://x/a.png"}]}`,
		`{"role":"user","content":[{"type":"image_url","image_url":{"url":5}}]}`,
		`{"role":"user","content":[{"type":"image_url","image_url":{"URL":"u","url":null}}]}`,
		`{"role":"user","content":[{"type":"image_url","image_url":{"url":"a"},"image_url":{}}]}`,
		`{"role":"user","content":[{"type":"image_url","image_url":{"url":"a"},"image_url":null}]}`,
		`{"role":"user","content":[{"type":"text","text":5,"text":"a"}]}`, `{"role":"user","content":[{"text":"a","Text":null}]}`,
		`{"role":"user","content":[null,{},{"type":5}]}`, `{"role":"user","content":"a","content":[{"type":"text","text":"b"}]}`,
		`{"role":"user","Content":"a","CONTENT":null}`, `{"role":"user","content":"\ud800 \u00e9 \xff"}`,
		`{"role":5,"content":"a"}`, `null`,
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, message string) {
		body := []byte(`{"messages":[` + message + `]}`)
		if !json.Valid(body) {
			return
		}
		var req chatRequest
		var ref struct {
			Messages []struct {
				Role    string          `json:"role"`
				Content json.RawMessage `json:"content"`
			} `json:"messages"`
		}
		errNew, errRef := json.Unmarshal(body, &req), json.Unmarshal(body, &ref)
		if (errNew == nil) != (errRef == nil) || len(req.Messages) != len(ref.Messages) {
			t.Fatalf("%s: decoded %d messages, %v; before: %d, %v", body, len(req.Messages), errNew, len(ref.Messages), errRef)
		}
		for i := range req.Messages {
			if got, want := readContent(&req.Messages[i].Content), readRefContent(ref.Messages[i].Content); !reflect.DeepEqual(got, want) {
				t.Fatalf("%s: content read as %+v, before as %+v", body, got, want)
			}
		}
	})
}
