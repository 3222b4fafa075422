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
// resolution of each (docs/design.md#the-prompt).
var ratioSizes = map[string]size{
	"1:1":  {2048, 2048},
	"1:2":  {1024, 2048},
	"3:2":  {1920, 1280},
	"3:4":  {1536, 2048},
	"16:9": {2048, 1152},
	"9:16": {1152, 2048},
}

// logRatio is the ratio the generation log line names: an
// explicit size that is exactly one of the six ratio sizes (the playground's
// ratio buttons send them) is logged as that ratio, so the log says what was
// asked for; the chat markdown keeps docs/design.md#the-prompt's "Custom" for any body size.
func logRatio(ratio string, w, h int) string {
	if ratio != customRatio {
		return ratio
	}
	for name, sz := range ratioSizes {
		if sz.w == w && sz.h == h {
			return name
		}
	}
	return ratio
}

// Where the size of a job came from, as logged (ratio_source).
const (
	ratioFromBody = "body"
	// an edit without a size asked: the source image's shape
	ratioFromSource  = "source"
	ratioFromUser    = "user"
	ratioFromLLM     = "llm"
	ratioFromDefault = "default"
	defaultRatio     = "1:1"
	customRatio      = "Custom"

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
	if !mayTrigger(prompt) {
		return "", prompt, false // most prompts: no regexp run at all
	}
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

// mayTrigger reports whether prompt holds what every match of
// triggerPattern holds: "ratio" in any case (its letters fold to ASCII
// letters alone) or 比例.
func mayTrigger(prompt string) bool {
	for i := 0; i+len("ratio") <= len(prompt); i++ {
		if prompt[i]|0x20 == 'r' && strings.EqualFold(prompt[i:i+len("ratio")], "ratio") {
			return true
		}
	}
	return strings.Contains(prompt, "比例")
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

// clampSide rounds a requested side to a multiple of 8 within 64…2048.
func clampSide(v float64) int {
	if math.IsNaN(v) {
		return minSide
	}
	n := int(math.Round(math.Max(minSide, math.Min(maxSide, v))/8) * 8)
	return max(minSide, min(maxSide, n))
}
