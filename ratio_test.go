package zimage

import (
	"math"
	"regexp"
	"strings"
	"testing"
	"unicode/utf8"
)

// A ratio counts only next to a trigger word, and the
// trigger, the ratio and one adjoining separator leave the prompt.
func TestUnitDetectRatio(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name, in  string
		ratio     string // "" when no ratio may be found
		rest      string // the prompt left; for a miss, the input unchanged
		wantFound bool
	}{
		// each of the six, after both triggers
		{"1:1 比例", "一只猫 比例 1:1", "1:1", "一只猫", true},
		{"1:2 比例", "一只猫 比例 1:2", "1:2", "一只猫", true},
		{"3:2 比例", "一只猫 比例 3:2", "3:2", "一只猫", true},
		{"3:4 比例", "一只猫 比例 3:4", "3:4", "一只猫", true},
		{"16:9 比例", "一只猫 比例 16:9", "16:9", "一只猫", true},
		{"9:16 比例", "一只猫 比例 9:16", "9:16", "一只猫", true},
		{"1:1 ratio", "a cat ratio 1:1", "1:1", "a cat", true},
		{"1:2 ratio", "a cat ratio 1:2", "1:2", "a cat", true},
		{"3:2 ratio", "a cat ratio 3:2", "3:2", "a cat", true},
		{"3:4 ratio", "a cat ratio 3:4", "3:4", "a cat", true},
		{"16:9 ratio", "a cat ratio 16:9", "16:9", "a cat", true},
		{"9:16 ratio", "a cat ratio 9:16", "9:16", "a cat", true},

		// spellings
		{"full-width colon after trigger", "一只猫 比例：16:9", "16:9", "一只猫", true},
		{"full-width colon in ratio", "一只猫 比例 16：9", "16:9", "一只猫", true},
		{"no space after trigger", "一只猫比例16:9", "16:9", "一只猫", true},
		{"ascii colon after trigger", "a cat, ratio: 3:2", "3:2", "a cat", true},
		{"equals after trigger", "a cat ratio=3:4", "3:4", "a cat", true},
		{"spaces inside ratio", "a cat ratio 16 : 9", "16:9", "a cat", true},
		{"trigger after ratio", "一只猫 16:9 比例", "16:9", "一只猫", true},
		{"trigger after ratio, ascii", "a cat, 9:16 ratio", "9:16", "a cat", true},
		{"aspect ratio goes whole", "a cat, aspect ratio 16:9", "16:9", "a cat", true},
		{"aspect ratio at the start", "aspect ratio 16:9, a cat", "16:9", "a cat", true},
		{"Aspect Ratio capitalised", "a cat Aspect Ratio: 1:2", "1:2", "a cat", true},
		{"case of trigger", "a cat Ratio 9:16", "9:16", "a cat", true},
		{"upper case trigger", "a cat RATIO 9:16", "9:16", "a cat", true},
		{"trigger alone", "比例 1:1", "1:1", "", true},
		{"CJK glued to ascii trigger", "一只猫ratio 16:9", "16:9", "一只猫", true},
		{"ratio ends with full stop", "a cat ratio 16:9.", "", "a cat ratio 16:9.", false},
		{"first triggered ratio wins", "ratio 1:1 then ratio 16:9", "1:1", "then ratio 16:9", true},
		{"skips a trigger whose ratio is not listed", "比例 4:3 and 比例 3:4", "3:4", "比例 4:3 and", true},

		// separators: one adjoining `，` `,` `。` goes with the ratio
		{"full-width comma before", "一只猫，比例 16:9", "16:9", "一只猫", true},
		{"comma before", "a cat, ratio 16:9", "16:9", "a cat", true},
		{"full stop before", "一只猫。比例 16:9", "16:9", "一只猫", true},
		{"full-width comma after", "比例 16:9，一只猫", "16:9", "一只猫", true},
		{"comma after", "ratio 16:9, a cat", "16:9", "a cat", true},
		{"full stop after", "比例 16:9。一只猫", "16:9", "一只猫", true},
		{"only one separator removed", "一只猫，，比例 16:9", "16:9", "一只猫，", true},
		{"separator after goes first", "a cat, ratio 16:9, on a roof", "16:9", "a cat, on a roof", true},
		{"CJK joined without a space", "一只猫，比例 16:9，在屋顶上", "16:9", "一只猫，在屋顶上", true},
		{"middle of prompt", "a cat ratio 16:9 on a roof", "16:9", "a cat on a roof", true},
		{"newline kept", "a cat\non a roof ratio 1:1", "1:1", "a cat\non a roof", true},

		// never a ratio
		{"ratio without trigger", "16:9", "", "16:9", false},
		{"ratio without trigger in prose", "a cat in 16:9 widescreen", "", "a cat in 16:9 widescreen", false},
		{"time of day", "下午16:30的洛杉矶", "", "下午16:30的洛杉矶", false},
		{"time next to trigger", "比例 16:30", "", "比例 16:30", false},
		{"longer number before", "比例 13:2", "", "比例 13:2", false},
		{"longer number after", "ratio 1:16", "", "ratio 1:16", false},
		{"longer second number", "比例 16:90", "", "比例 16:90", false},
		{"decimal after", "ratio 16:9.5", "", "ratio 16:9.5", false},
		{"longer number before trigger", "116:9 ratio", "", "116:9 ratio", false},
		{"decimal before trigger", "1.16:9 ratio", "", "1.16:9 ratio", false},
		{"rationale is not ratio", "rationale 16:9", "", "rationale 16:9", false},
		{"ratios is not ratio", "ratios 16:9", "", "ratios 16:9", false},
		{"word ending in ratio", "oratio 16:9", "", "oratio 16:9", false},
		{"unlisted ratio", "ratio 4:3", "", "ratio 4:3", false},
		{"trigger without ratio", "比例很好的猫", "", "比例很好的猫", false},
		{"empty", "", "", "", false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ratio, rest, ok := detectRatio(tc.in)
			if ok != tc.wantFound || ratio != tc.ratio || rest != tc.rest {
				t.Fatalf("detectRatio(%q) = (%q, %q, %v), want (%q, %q, %v)",
					tc.in, ratio, rest, ok, tc.ratio, tc.rest, tc.wantFound)
			}
		})
	}
}

// The six ratios map to the exact upstream resolutions of docs/design.md#the-prompt.
func TestUnitRatioSizes(t *testing.T) {
	t.Parallel()
	want := map[string]size{
		"1:1":  {2048, 2048},
		"1:2":  {1024, 2048},
		"3:2":  {1920, 1280},
		"3:4":  {1536, 2048},
		"16:9": {2048, 1152},
		"9:16": {1152, 2048},
	}
	if len(ratioSizes) != len(want) {
		t.Fatalf("ratioSizes has %d entries, want %d: %v", len(ratioSizes), len(want), ratioSizes)
	}
	for r, s := range want {
		if got, ok := ratioSizes[r]; !ok || got != s {
			t.Errorf("ratioSizes[%q] = %v (listed %v), want %v", r, got, ok, s)
		}
	}
}

// `no-enhance` as a separate word, in any case, anywhere.
func TestUnitStripSkipWord(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name, in, want string
		found          bool
	}{
		{"at the end", "a cat no-enhance", "a cat", true},
		{"at the start", "no-enhance a cat", "a cat", true},
		{"in the middle", "a cat no-enhance on a roof", "a cat on a roof", true},
		{"upper case", "a cat NO-ENHANCE", "a cat", true},
		{"mixed case", "a cat No-Enhance", "a cat", true},
		{"twice", "no-enhance a cat no-enhance", "a cat", true},
		{"alone", "no-enhance", "", true},
		{"CJK before", "一只猫no-enhance", "一只猫", true},
		{"CJK after", "no-enhance一只猫", "一只猫", true},
		{"CJK around", "一只猫no-enhance在屋顶上", "一只猫在屋顶上", true},
		{"punctuation after", "a cat, no-enhance.", "a cat, .", true},
		{"tab before", "a cat\tno-enhance", "a cat", true},
		{"newline kept", "a cat\nno-enhance\non a roof", "a cat\n\non a roof", true},
		{"non-ASCII upper case before", "İİ no-enhance", "İİ", true},
		{"no-enhancement is another word", "a cat no-enhancement", "a cat no-enhancement", false},
		{"glued letters before", "a cat xno-enhance", "a cat xno-enhance", false},
		{"glued digit after", "a cat no-enhance2", "a cat no-enhance2", false},
		{"glued dash before", "a cat -no-enhance", "a cat -no-enhance", false},
		{"underscore after", "a cat no-enhance_", "a cat no-enhance_", false},
		{"without dash", "a cat noenhance", "a cat noenhance", false},
		{"one glued, one free", "no-enhancement no-enhance", "no-enhancement", true},
		{"absent", "a cat", "a cat", false},
		{"absent keeps spacing", "  a  cat  ", "  a  cat  ", false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, found := stripSkipWord(tc.in)
			if got != tc.want || found != tc.found {
				t.Fatalf("stripSkipWord(%q) = (%q, %v), want (%q, %v)", tc.in, got, found, tc.want, tc.found)
			}
		})
	}
}

// Body sizes are rounded to a multiple of 8 and clamped to
// 64…2048.
func TestUnitClampSide(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		in   float64
		want int
	}{
		{1024, 1024},
		{1023, 1024},
		{1020, 1024}, // 127.5 rounds half away from zero
		{1019, 1016},
		{100, 104},
		{64, 64},
		{63, 64},
		{1, 64},
		{0, 64},
		{-500, 64},
		{2048, 2048},
		{2049, 2048},
		{2047, 2048},
		{5000, 2048},
		{1e300, 2048},
		{math.Inf(1), 2048},
		{math.Inf(-1), 64},
		{math.NaN(), 64},
		{767.9, 768},
	} {
		got := clampSide(tc.in)
		if got != tc.want {
			t.Errorf("clampSide(%v) = %d, want %d", tc.in, got, tc.want)
		}
		if got%8 != 0 || got < 64 || got > 2048 {
			t.Errorf("clampSide(%v) = %d: not a multiple of 8 in 64…2048", tc.in, got)
		}
	}
}

// {alt} is the first 80 runes of the final prompt without
// `[`, `]` and newlines; "Generated image" when empty.
func TestUnitAltText(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name, in, want string
	}{
		{"short", "a cat on a roof", "a cat on a roof"},
		{"exactly 80 ascii", strings.Repeat("a", 80), strings.Repeat("a", 80)},
		{"81 ascii", strings.Repeat("a", 81), strings.Repeat("a", 80)},
		{"runes not bytes", strings.Repeat("猫", 100), strings.Repeat("猫", 80)},
		{"emoji counted as runes", strings.Repeat("🐱", 81), strings.Repeat("🐱", 80)},
		{"brackets removed", "a [cat] on ]a[ roof", "a cat on a roof"},
		{"newlines removed", "a cat\non a\r\nroof", "a caton aroof"},
		{"trimmed", "  a cat  ", "a cat"},
		{"empty", "", "Generated image"},
		{"only breakers", "[]\n\r", "Generated image"},
		{"only spaces", "   ", "Generated image"},
		{"invalid UTF-8 dropped", "a\xffcat", "acat"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := altText(tc.in); got != tc.want {
				t.Fatalf("altText(%q) = %q, want %q", tc.in, got, tc.want)
			}
		})
	}
}

// An image URL with spaces or parentheses still renders.
func TestUnitMarkdownURL(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name, in, want string
	}{
		{"plain URL unchanged", "https://img.example.com/a/b.png?x=1&y=2#f", "https://img.example.com/a/b.png?x=1&y=2#f"},
		{"percent already encoded unchanged", "https://img.example.com/a%20b.png", "https://img.example.com/a%20b.png"},
		{"non-ASCII unchanged", "https://img.example.com/猫.png", "https://img.example.com/猫.png"},
		{"space", "https://img.example.com/a b.png", "https://img.example.com/a%20b.png"},
		{"parentheses", "https://img.example.com/a(1).png", "https://img.example.com/a%281%29.png"},
		{"brackets", "https://img.example.com/[a].png", "https://img.example.com/%5Ba%5D.png"},
		{"angle brackets", "https://img.example.com/<a>.png", "https://img.example.com/%3Ca%3E.png"},
		{"newline and CR", "https://img.example.com/a\r\nb.png", "https://img.example.com/a%0D%0Ab.png"},
		{"tab and DEL", "https://img.example.com/a\tb\x7f.png", "https://img.example.com/a%09b%7F.png"},
		{"quotes and backslash", "https://img.example.com/\"a'\\`.png", "https://img.example.com/%22a%27%5C%60.png"},
		// only the breaking characters are encoded; `!` is harmless
		{"markdown break attempt", "https://x/a.png) ![evil](https://evil/", "https://x/a.png%29%20!%5Bevil%5D%28https://evil/"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got := markdownURL(tc.in)
			if got != tc.want {
				t.Fatalf("markdownURL(%q) = %q, want %q", tc.in, got, tc.want)
			}
			if strings.ContainsAny(got, " ()[]<>\n\r") {
				t.Fatalf("markdownURL(%q) = %q still holds a character that breaks a link", tc.in, got)
			}
		})
	}
}

// logRatio names the ratio of a body size that is exactly one of the six
// and leaves every other ratio as it is.
func TestUnitLogRatio(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		ratio string
		w, h  int
		want  string
	}{
		{customRatio, 2048, 1152, "16:9"},
		{customRatio, 1152, 2048, "9:16"},
		{customRatio, 1920, 1280, "3:2"},
		{customRatio, 2048, 2048, "1:1"},
		{customRatio, 1000, 600, customRatio},
		{customRatio, 1024, 576, customRatio}, // 16:9 in shape, not one of the six sizes
		{"3:4", 1536, 2048, "3:4"},
		{"", 30, 20, ""}, // an edit: no ratio
	} {
		if got := logRatio(tc.ratio, tc.w, tc.h); got != tc.want {
			t.Errorf("logRatio(%q, %d, %d) = %q, want %q", tc.ratio, tc.w, tc.h, got, tc.want)
		}
	}
}

func TestIntegUserRatio(t *testing.T) {
	up := newFakeUpstream(t)
	startCaddy(t, itSite(up, itConfig{}))
	for _, tc := range []struct {
		name, prompt, wantPrompt, ratio string
		w, h                            int
	}{
		{"ratio after comma", "a cat, ratio 16:9", "a cat", "16:9", 2048, 1152},
		{"比例 full-width colon", "比例：9:16 一只猫在屋顶", "一只猫在屋顶", "9:16", 1152, 2048},
		{"aspect ratio", "aspect ratio 3:2 mountains at dawn", "mountains at dawn", "3:2", 1920, 1280},
		{"ratio before trigger", "a tall tower 3:4 比例", "a tall tower", "3:4", 1536, 2048},
		{"ratio colon", "ratio: 1:2 a hanging scroll", "a hanging scroll", "1:2", 1024, 2048},
		{"explicit 1:1", "a coin, RATIO 1:1", "a coin", "1:1", 2048, 2048},
		{"no trigger", "a poster 16:9", "a poster 16:9", "1:1", 2048, 2048},
		{"a time", "下午16:30 的街道", "下午16:30 的街道", "1:1", 2048, 2048},
		{"inside a longer number", "ratio 13:2 of gears", "ratio 13:2 of gears", "1:1", 2048, 2048},
	} {
		t.Run(tc.name, func(t *testing.T) {
			n := len(up.Calls())
			content := itOK(t, itChatBody(t, tc.prompt))
			c := itOnlyCall(t, up, n)
			if c.Body.Prompt != tc.wantPrompt || c.Body.Width != tc.w || c.Body.Height != tc.h {
				t.Errorf("upstream got %q %dx%d, want %q %dx%d", c.Body.Prompt, c.Body.Width, c.Body.Height, tc.wantPrompt, tc.w, tc.h)
			}
			want := itMarkdown(tc.wantPrompt, itImageURL(c.Body.Seed), itPlain(tc.prompt), tc.ratio, tc.w, tc.h)
			if content != want {
				t.Errorf("content\n%q\nwant\n%q", content, want)
			}
		})
	}
}

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
