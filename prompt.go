package zimage

import (
	"strings"
	"unicode"
	"unicode/utf8"
)

// Prompt text helpers: the skip word, control characters and the alt text,
// shared by every endpoint's job.

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

// stripControl drops the control characters (NUL, escape sequences, DEL,
// C1) from a prompt, keeping tabs and line breaks: the prompts go to a
// Stable Diffusion service, to which they are noise at best, and are echoed
// into the chat answer (hostile input).
func stripControl(s string) string {
	isControl := func(r rune) bool { return unicode.IsControl(r) && r != '\t' && r != '\n' && r != '\r' }
	if strings.IndexFunc(s, isControl) < 0 {
		return s
	}
	return strings.Map(func(r rune) rune {
		if isControl(r) {
			return -1
		}
		return r
	}, s)
}

func truncate(s string, n int) string {
	if r := []rune(s); len(r) > n {
		return string(r[:n]) + "…"
	}
	return s
}
