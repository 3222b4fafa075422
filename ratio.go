package zimage

import (
	"math"
	"regexp"
	"strings"
	"unicode/utf8"
)

// size is an output resolution in pixels.
type size struct{ w, h int }

// ratioSizes are the aspect ratios the gateway understands and the upstream
// resolution of each (SPEC §4 step 2).
var ratioSizes = map[string]size{
	"1:1":  {2048, 2048},
	"1:2":  {1024, 2048},
	"3:2":  {1920, 1280},
	"3:4":  {1536, 2048},
	"16:9": {2048, 1152},
	"9:16": {1152, 2048},
}

// Where the size of a job came from, as logged and shown.
const (
	sourceBody    = "body"
	sourceUser    = "user"
	sourceLLM     = "llm"
	sourceDefault = "default"
	defaultRatio  = "1:1"
	customRatio   = "Custom"

	minSide = 64
	maxSide = 2048
)

// triggerPattern finds the words that make a ratio count: only a ratio next
// to one of them is read, so "16:9" alone or a time such as 下午16:30 is left
// to the prompt. "aspect ratio" is one trigger and is removed whole.
var triggerPattern = regexp.MustCompile(`(?i)aspect\s*ratio|\bratio|比例`)

// The ratio after a trigger ("比例：16:9", "ratio 9:16") or before it
// ("16:9 比例"). Digits match greedily and their neighbours are checked in
// code, so a listed ratio inside a longer number (13:2, 1:16, 16:90) never
// counts: RE2 has no look-around.
var (
	ratioAfter  = regexp.MustCompile(`^[\s:：=]*(\d+)\s*[:：]\s*(\d+)`)
	ratioBefore = regexp.MustCompile(`(\d+)\s*[:：]\s*(\d+)\s*$`)
)

// detectRatio finds a user-written ratio (strict: only next to a trigger
// word) and returns it with the prompt that remains once the trigger, the
// ratio and an adjoining comma or full stop are removed. ok is false when
// the prompt holds no supported, triggered ratio; the prompt is then
// returned unchanged.
func detectRatio(prompt string) (ratio, rest string, ok bool) {
	for _, t := range triggerPattern.FindAllStringIndex(prompt, -1) {
		ts, te := t[0], t[1]
		// "ratios", "rational": a trigger glued to more letters is another word
		if te < len(prompt) && isLetter(prompt[te]) {
			continue
		}
		if m := ratioAfter.FindStringSubmatchIndex(prompt[te:]); m != nil {
			end := te + m[1]
			r := prompt[te+m[2]:te+m[3]] + ":" + prompt[te+m[4]:te+m[5]]
			if _, listed := ratioSizes[r]; listed && (end == len(prompt) || !isDigitOrDot(prompt[end])) {
				return r, removeSpan(prompt, ts, end), true
			}
		}
		if m := ratioBefore.FindStringSubmatchIndex(prompt[:ts]); m != nil {
			start := m[0]
			r := prompt[m[2]:m[3]] + ":" + prompt[m[4]:m[5]]
			if _, listed := ratioSizes[r]; listed && (start == 0 || !isDigitOrDot(prompt[start-1])) {
				return r, removeSpan(prompt, start, te), true
			}
		}
	}
	return "", prompt, false
}

func isLetter(c byte) bool { return c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' }

func isDigitOrDot(c byte) bool { return c >= '0' && c <= '9' || c == '.' }

// removeSpan cuts prompt[start:end] together with one adjoining separator
// (，,。) and tidies the spaces left behind. The separator after the span
// goes first, so "a cat, ratio 16:9, on a roof" keeps its first comma.
func removeSpan(prompt string, start, end int) string {
	before := strings.TrimRight(prompt[:start], " \t")
	after := strings.TrimLeft(prompt[end:], " \t")
	if t, ok := trimSeparatorPrefix(after); ok {
		after = t
	} else if t, ok := trimSeparatorSuffix(before); ok {
		before = t
	}
	before = strings.TrimRight(before, " \t")
	after = strings.TrimLeft(after, " \t")
	if before == "" || after == "" {
		return strings.TrimSpace(before + after)
	}
	// CJK text has no spaces between words: join it without one
	if last, _ := utf8.DecodeLastRuneInString(before); last >= utf8.RuneSelf {
		return before + after
	}
	if first, _ := utf8.DecodeRuneInString(after); first >= utf8.RuneSelf {
		return before + after
	}
	return before + " " + after
}

func trimSeparatorSuffix(s string) (string, bool) {
	for _, sep := range []string{"，", ",", "。"} {
		if strings.HasSuffix(s, sep) {
			return s[:len(s)-len(sep)], true
		}
	}
	return s, false
}

func trimSeparatorPrefix(s string) (string, bool) {
	for _, sep := range []string{"，", ",", "。"} {
		if strings.HasPrefix(s, sep) {
			return s[len(sep):], true
		}
	}
	return s, false
}

// skipWord is the token that turns enhancement off for one request.
const skipWord = "no-enhance"

// stripSkipWord removes every free-standing "no-enhance" (any case) and
// reports whether there was one. A token glued to other letters or digits
// ("no-enhancement", "xno-enhance") does not count; CJK text around it
// does not glue, since CJK prompts have no spaces.
func stripSkipWord(prompt string) (string, bool) {
	lower := asciiLower(prompt) // offsets in lower are offsets in prompt
	if !strings.Contains(lower, skipWord) {
		return prompt, false
	}
	var b strings.Builder
	found := false
	last := 0
	for i := 0; i+len(skipWord) <= len(lower); {
		j := strings.Index(lower[i:], skipWord)
		if j < 0 {
			break
		}
		j += i
		end := j + len(skipWord)
		if (j == 0 || !isWordByte(prompt[j-1])) && (end == len(prompt) || !isWordByte(prompt[end])) {
			b.WriteString(prompt[last:j])
			last = end
			found = true
		}
		i = end
	}
	if !found {
		return prompt, false
	}
	b.WriteString(prompt[last:])
	return collapseSpaces(b.String()), true
}

// asciiLower lowers ASCII letters only. strings.ToLower would also change
// the byte length of some runes (İ, invalid UTF-8), so offsets found in its
// result would not be offsets in the original.
func asciiLower(s string) string {
	b := []byte(s)
	for i, c := range b {
		if c >= 'A' && c <= 'Z' {
			b[i] = c + 'a' - 'A'
		}
	}
	return string(b)
}

func isWordByte(c byte) bool {
	return c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '_' || c == '-'
}

// collapseSpaces trims the prompt and folds runs of spaces and tabs left
// behind by removals; newlines are kept.
func collapseSpaces(s string) string {
	s = strings.TrimSpace(s)
	if !strings.Contains(s, "  ") && !strings.Contains(s, "\t") {
		return s
	}
	var b strings.Builder
	b.Grow(len(s))
	space := false
	// bytes, not runes: spaces and tabs never occur inside a multi-byte
	// rune, and bytes of invalid UTF-8 pass through untouched
	for i := 0; i < len(s); i++ {
		c := s[i]
		if c == ' ' || c == '\t' {
			if !space {
				b.WriteByte(' ')
			}
			space = true
			continue
		}
		space = false
		b.WriteByte(c)
	}
	return b.String()
}

// clampSide rounds a requested side to a multiple of 8 within 64…2048.
func clampSide(v float64) int {
	if math.IsNaN(v) {
		return minSide
	}
	n := int(math.Round(math.Max(minSide, math.Min(maxSide, v))/8) * 8)
	return max(minSide, min(maxSide, n))
}

// altText is the image's alt text: the first 80 runes of the prompt without
// the characters that would end or break the markdown image.
func altText(prompt string) string {
	var b strings.Builder
	n := 0
	for _, r := range prompt {
		if n == 80 {
			break
		}
		n++
		switch r {
		// brackets and line breaks end the alt text; a backslash would
		// escape the closing bracket, a backtick open a code span over it,
		// and angle brackets read as HTML in lax renderers
		case '[', ']', '\n', '\r', '\\', '`', '<', '>':
			continue
		}
		if r == utf8.RuneError {
			continue
		}
		b.WriteRune(r)
	}
	alt := strings.TrimSpace(b.String())
	if alt == "" {
		return "Generated image"
	}
	return alt
}
