package zimage

import (
	"strings"
	"testing"
)

// Markdown safety: whatever the prompts and the image URL hold,
// the answer has one link — the image — and each prompt stays on its line
// in its own section.
func TestUnitMarkdownSafety(t *testing.T) {
	hostile := []string{
		"x\n\n**🎨 Aspect Ratio:** 1:1\n**📐 Resolution:** 1×1",
		"![evil](javascript:alert(1))",
		"[click](https://evil.example/)",
		"<img src=x onerror=alert(1)>",
		"<https://evil.example/>",
		"`code` and ```fences```",
		`\[already escaped\](x)`,
		"line\r\nbreaks\rand\nmore",
	}
	urls := []string{
		"https://img.example.com/a.png",
		"https://img.example.com/a b).png",
		"https://img.example.com/x](javascript:alert(1))",
		"https://img.example.com/<script>\n.png",
	}
	g := &Gateway{upstream: (*imageClient)(nil)}
	for _, p := range hostile {
		for _, u := range urls {
			for _, outcome := range []string{enhanceOK, enhanceFailed, enhanceSkipped} {
				j := &job{imageURL: u, prompt: p, original: p, enhance: outcome, ratio: "1:1", width: 2048, height: 2048}
				md := g.markdown(j)
				if n := strings.Count(md, "\n"); n != map[string]int{enhanceOK: 10, enhanceFailed: 9, enhanceSkipped: 7}[outcome] {
					t.Errorf("prompt %q, url %q, %s: %d lines, a prompt broke out of its section:\n%s", p, u, outcome, n, md)
				}
				if links := unescapedCount(md, "]("); links != 1 {
					t.Errorf("prompt %q, url %q: %d links, want only the image:\n%s", p, u, links, md)
				}
				if unescapedCount(md, "<") != 0 || unescapedCount(md, "`") != 0 {
					t.Errorf("prompt %q, url %q: raw HTML or code markup survived:\n%s", p, u, md)
				}
				if !strings.HasPrefix(md, "![") {
					t.Errorf("answer does not start with the image: %q", md)
				}
			}
		}
	}
}

// unescapedCount counts occurrences of sub not preceded by an odd run of
// backslashes.
func unescapedCount(s, sub string) int {
	n := 0
	for i := 0; ; {
		j := strings.Index(s[i:], sub)
		if j < 0 {
			return n
		}
		j += i
		bs := 0
		for k := j - 1; k >= 0 && s[k] == '\\'; k-- {
			bs++
		}
		if bs%2 == 0 {
			n++
		}
		i = j + len(sub)
	}
}

func TestUnitWriteEcho(t *testing.T) {
	for _, tc := range []struct{ in, want string }{
		{"一只猫在看书", "一只猫在看书"},
		{"a cat, (masterpiece:1.2), *soft* light", "a cat, (masterpiece:1.2), *soft* light"},
		{"a [red] cat", `a \[red\] cat`},
		{"<lora:x>", `\<lora:x\>`},
		{`back\slash`, `back\\slash`},
		{"two\nlines", "two lines"},
		{"crlf\r\nline", "crlf line"},
	} {
		var b strings.Builder
		writeEcho(&b, tc.in)
		if b.String() != tc.want {
			t.Errorf("writeEcho(%q) = %q, want %q", tc.in, b.String(), tc.want)
		}
	}
}
