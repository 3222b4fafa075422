package zimage

// Prompt text helpers: the skip word.

import (
	"strings"
	"testing"
	"unicode/utf8"
)

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
