package zimage

import (
	"net/http"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"unicode/utf8"
)

// Fuzz targets for the parsers that read client and LLM text (SPEC §8).
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
