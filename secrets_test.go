package zimage

import (
	"encoding/base64"
	"encoding/json"
	"net/url"
	"strings"
	"testing"
)

func TestScrubberForms(t *testing.T) {
	const key = "sk-client-7f3a9c1e5b"
	const odd = "Ab+c/d=e&f<g>h i%j" // every character some encoding changes
	s := newScrubber([]string{key, odd, "short"})
	jsonOf := func(v string) string { b, _ := json.Marshal(v); return strings.Trim(string(b), `"`) }
	for _, tc := range []struct {
		name, in string
	}{
		{"exact", "echo " + key + " done"},
		{"upper case", "echo " + strings.ToUpper(key)},
		{"mixed case", "Bearer SK-Client-7F3A9c1e5b"},
		{"query escaped", "u?k=" + url.QueryEscape(odd)},
		{"query escaped, lower-case hex", "u?k=" + strings.ToLower(url.QueryEscape(odd))},
		{"path escaped", "/x/" + url.PathEscape(odd) + "/y"},
		{"escaped twice", "u?k=" + url.QueryEscape(url.QueryEscape(odd))},
		{"json escaped", `{"k":"` + jsonOf(odd) + `"}`},
		{"slashes escaped", `{"k":"Ab+c\/d=e&f<g>h i%j"}`},
		{"base64", "basic " + base64.StdEncoding.EncodeToString([]byte(key))},
		{"base64url", "t=" + base64.RawURLEncoding.EncodeToString([]byte(odd))},
		{"cut at the end", "error: invalid key " + key[:12] + "…"},
		{"cut at the start", "…" + key[8:] + " is invalid"},
		{"cut in the middle", "x" + key[3:15] + "y"},
		{"at the very end", "k=" + key},
		{"twice", key + " and " + key},
		{"short key", "the word is short"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if !s.contains(tc.in) {
				t.Errorf("contains(%q) = false", tc.in)
			}
			out := s.Replace(tc.in)
			if !strings.Contains(out, redacted) || s.contains(out) {
				t.Errorf("Replace(%q) = %q", tc.in, out)
			}
		})
	}

	for _, in := range []string{
		"",
		"a cat on a roof, ratio 16:9",
		"sk-cl",           // less than 8 characters of a key
		"sk-client-",      // half of the key minus one: ten of twenty characters is the limit
		"7f3a9c1e5 alone", // nine characters of twenty
	} {
		if in == "sk-client-" {
			// ten characters are exactly half: that is a leak
			if !s.contains(in) {
				t.Errorf("half the key %q is not found", in)
			}
			continue
		}
		if s.contains(in) || s.Replace(in) != in {
			t.Errorf("text without a secret changed: %q → %q", in, s.Replace(in))
		}
	}
}

// TestScrubberKeepsText checks that only the secret goes: the text around
// it stays, byte for byte, including multi-byte characters.
func TestScrubberKeepsText(t *testing.T) {
	s := newScrubber([]string{testSDKey, testLLMKey})
	in := "上游说: key " + strings.ToUpper(testSDKey) + ", then " + testLLMKey[:len(testLLMKey)-3] + " 完"
	want := "上游说: key " + redacted + ", then " + redacted + " 完"
	if got := s.Replace(in); got != want {
		t.Errorf("Replace = %q, want %q", got, want)
	}
	if got := (*scrubber)(nil).Replace("x " + testSDKey); got != "x "+testSDKey {
		t.Error("a nil scrubber must pass text through")
	}
}

func FuzzScrubber(f *testing.F) {
	f.Add("prefix ", "suffix", 0, 20)
	f.Add("", "", 3, 15)
	f.Add("日本", "%", 5, 11)
	s := newScrubber([]string{testClientKey, testSDKey})
	f.Fuzz(func(t *testing.T, before, after string, from, to int) {
		// any piece of at least half the key, in any case, between any text
		k := testSDKey
		from, to = int(uint(from)%uint(len(k))), int(uint(to)%uint(len(k)+1))
		if to-from < cutLen(len(k)) {
			from, to = 0, len(k)
		}
		in := before + strings.ToUpper(k[from:to]) + after
		if s.contains(s.Replace(in)) {
			t.Fatalf("Replace(%q) still holds a secret: %q", in, s.Replace(in))
		}
		if !s.contains(in) {
			t.Fatalf("contains(%q) = false", in)
		}
	})
}

func BenchmarkScrubber(b *testing.B) {
	s := newScrubber([]string{testClientKey, testSDKey, testLLMKey, "another-client-key-0123456789"})
	text := strings.Repeat("a cat on a roof, golden hour, 35mm, soft light, ", 20)
	b.SetBytes(int64(len(text)))
	for b.Loop() {
		_ = s.Replace(text)
	}
}
