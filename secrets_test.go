package zimage

import (
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"net/http"
	"net/url"
	"strings"
	"testing"
)

func TestScrubberForms(t *testing.T) {
	t.Parallel()
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
	t.Parallel()
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

// pctEncode percent-encodes the bytes of s at the positions every picks,
// in the hex case given.
func pctEncode(s string, upper bool, every func(i int) bool) string {
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if !every(i) {
			b.WriteByte(s[i])
			continue
		}
		e := fmt.Sprintf("%%%02x", s[i])
		if upper {
			e = strings.ToUpper(e)
		}
		b.WriteString(e)
	}
	return b.String()
}

// TestScrubberEncodedForms: a secret echoed percent-encoded (in full or in
// part, either hex case, once or twice) or inside base64 that does not
// start at the secret, at each of the three alignments, is found and
// replaced, and only it.
func TestScrubberEncodedForms(t *testing.T) {
	t.Parallel()
	const key = "sk-client-7f3a9c1e5b"
	s := newScrubber([]string{key, testOddKey})
	all := func(int) bool { return true }
	b64 := base64.StdEncoding.EncodeToString
	for _, tc := range []struct {
		name, in, keep string // keep: text around the secret that must stay
	}{
		{"percent-encoded in full, lower-case hex", "bad key " + pctEncode(key, false, all) + " sent", "bad key "},
		{"percent-encoded in full, upper-case hex", "bad key " + pctEncode(key, true, all), "bad key "},
		{"every other byte percent-encoded", "k=" + pctEncode(key, true, func(i int) bool { return i%2 == 0 }) + "&x=1", "&x=1"},
		{"one byte percent-encoded", "k=" + pctEncode(key, false, func(i int) bool { return i == 7 }), "k="},
		{"percent-encoded twice", "u?k=" + url.QueryEscape(pctEncode(key, false, all)), "u?k="},
		{"odd key percent-encoded in full", "t=" + pctEncode(testOddKey, true, all), "t="},
		{"half of the key percent-encoded", "bad " + pctEncode(key[:10], false, all) + "…", "bad "},
		{"as is and percent-encoded", key + " / " + pctEncode(key, false, all), " / "},
		{"in an image URL", "https://img.example.com/1.png?sig=" + pctEncode(key, true, all), "https://img.example.com/1.png?sig="},
		{"base64 of the key", "t " + b64([]byte(key)), "t "},
		{"base64 of Bearer <key> (offset 7: alignment 1)", "echo " + b64([]byte("Bearer "+key)) + " end", " end"},
		{"base64 of user:<key> (offset 5: alignment 2)", "Basic " + b64([]byte("user:"+key)), "Basic "},
		{"base64 of ab<key> (alignment 2)", b64([]byte("ab" + key + "cd")), ""},
		{"base64url of a JSON holding the key", base64.RawURLEncoding.EncodeToString([]byte(`{"token":"` + testOddKey + `"}`)), ""},
		{"base64 of Bearer <key>, percent-encoded", "a=" + url.QueryEscape(b64([]byte("Bearer "+testOddKey))), "a="},
		{"upper-case base64 text", "x " + strings.ToUpper(b64([]byte("Bearer "+key))), "x "},
		{"hex, lower case", "debug: key=" + hex.EncodeToString([]byte(key)) + " end", " end"},
		{"hex, upper case", "KEY " + strings.ToUpper(hex.EncodeToString([]byte(key))), "KEY "},
		{"hex of Bearer <key>", "auth=" + fmt.Sprintf("%x", "Bearer "+key) + "&", "auth="},
		{"hex of the odd key", "t=" + fmt.Sprintf("%X", testOddKey), "t="},
		{"hex a byte apart", "dump: " + fmt.Sprintf("% x", key) + " |", " |"},
		{"hex a byte apart, upper case", "dump: " + fmt.Sprintf("% X", testOddKey), "dump: "},
		{"half of the key in hex", "k " + hex.EncodeToString([]byte(key[:10])) + "…", "k "},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if !s.contains(tc.in) {
				t.Fatalf("contains(%q) = false", tc.in)
			}
			out := s.Replace(tc.in)
			if s.contains(out) || !strings.Contains(out, redacted) || !strings.Contains(out, tc.keep) {
				t.Errorf("Replace(%q) = %q", tc.in, out)
			}
		})
	}
	for _, in := range []string{
		"a cat%20on a roof, 100%25 sure, %zz %4",
		"https://img.example.com/a%20b.png?x=%E7%8C%AB",
		b64([]byte("Bearer sk-client-other-key-000")),
		b64([]byte("nothing secret at all, only a long enough text")),
		pctEncode("sk-client", false, all) + " 7f3a9",                                    // under half of the key
		hex.EncodeToString([]byte(key[:9])) + " " + hex.EncodeToString([]byte(key[11:])), // two pieces under half
		"sha256 9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
	} {
		if s.contains(in) || s.Replace(in) != in {
			t.Errorf("text without a secret changed: %q → %q", in, s.Replace(in))
		}
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
	for _, bc := range []struct{ name, text string }{
		{"plain", strings.Repeat("a cat on a roof, golden hour, 35mm, soft light, ", 20)},
		// a text with escapes is decoded and scanned again
		{"escaped", strings.Repeat("https://img.example.com/a%20cat%2C%20golden%20hour.png?x=1&", 20)},
		// hex digests look like the keys' hex forms to the first filter
		{"hex", strings.Repeat("https://img.example.com/zimage/images/9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08.png ", 10)},
	} {
		b.Run(bc.name, func(b *testing.B) {
			b.SetBytes(int64(len(bc.text)))
			for b.Loop() {
				_ = s.Replace(bc.text)
			}
		})
	}
}

// testOddKey is a client key with every character some encoding changes,
// for the tests of encoded secrets; it is in the suite-wide scan too.
const testOddKey = "sk-odd+/=&<>%key-93b1"

// TestSecretsOnSuccessPaths: an LLM proxy that echoes its Authorization
// header and the keys it saw, in several forms, and a client that pastes
// keys into its prompt: no key reaches the image service, the answer or
// the log.
func TestSecretsOnSuccessPaths(t *testing.T) {
	up := newFakeUpstream(t)
	llm := newFakeLLM(t, "")
	llm.setHandler(func(w http.ResponseWriter, r *http.Request) {
		auth := r.Header.Get("Authorization")
		prompt := "a cat, " + auth + ", " + strings.ToUpper(testLLMKey) + ", " + url.QueryEscape(testOddKey) +
			", " + testSDKey[:len(testSDKey)-4] + ", https://x.example/?k=" + url.PathEscape(testOddKey)
		b, _ := json.Marshal(map[string]string{"prompt": prompt})
		writeLLMAnswer(w, string(b))
	})
	startCaddy(t, itSite(up, itConfig{llm: llm, gateway: "api_key " + testOddKey}))
	sc := newScrubber(testSecrets)

	check := func(where, text string) {
		t.Helper()
		if sc.contains(text) {
			t.Errorf("%s carries a secret: %q", where, sc.Replace(text))
		}
		if !strings.Contains(text, "redacted") { // markdown escapes its brackets
			t.Errorf("%s lost the redaction marker: %q", where, text)
		}
	}
	content := itOK(t, itChatBody(t, "a cat "+strings.ToUpper(testClientKey)))
	check("the chat answer", content)
	status, _, raw := do(t, http.MethodPost, "/v1/images/generations", `{"prompt":"a dog `+testSDKey+`"}`)
	if status != http.StatusOK {
		t.Fatalf("images: %d %s", status, raw)
	}
	check("revised_prompt", parseImages(t, raw).Data[0].RevisedPrompt)
	calls := up.Calls()
	if len(calls) != 2 {
		t.Fatalf("%d upstream calls, want 2", len(calls))
	}
	for _, c := range calls {
		check("the prompt sent to the image service", c.Body.Prompt)
	}
	for _, c := range llm.Calls() {
		for _, m := range c.Body.Messages {
			if sc.contains(m.Content) {
				t.Errorf("the LLM was sent a secret: %q", sc.Replace(m.Content))
			}
		}
	}
}

// TestSecretsInImageURL: an image URL with a key in it, in any form, is
// not passed on: it is a bad response.
func TestSecretsInImageURL(t *testing.T) {
	up := newFakeUpstream(t)
	startCaddy(t, gatewaySite(up, nil, "api_key "+testOddKey))
	for _, u := range []string{
		"https://img.example.com/1.png?token=" + testSDKey,
		"https://img.example.com/1.png?token=" + strings.ToUpper(testClientKey),
		"https://img.example.com/1.png?k=" + url.QueryEscape(testOddKey),
		"https://img.example.com/" + url.PathEscape(testOddKey) + "/1.png",
		"https://img.example.com/1.png?t=" + testSDKey[3:],
	} {
		up.setHandler(func(w http.ResponseWriter, r *http.Request) { writeUpstreamOK(w, u) })
		status, hdr, raw := do(t, http.MethodPost, "/v1/chat/completions", itChatBody(t, "a cat"))
		e := itWantErr(t, status, hdr, raw, http.StatusBadGateway, "upstream_error")
		if !strings.Contains(e.Message, "carries a secret") {
			t.Errorf("%s: message %q", u, e.Message)
		}
	}
}

// TestSecretsInUpstreamErrors: the service's error text is scrubbed before
// it is shortened, in every encoding, and network errors reach the client
// without internal addresses.
func TestSecretsInUpstreamErrors(t *testing.T) {
	up := newFakeUpstream(t)
	startCaddy(t, gatewaySite(up, nil, "api_key "+testOddKey))
	jsonEsc, _ := json.Marshal(testOddKey)
	for _, tc := range []struct {
		name, message string
	}{
		// the key straddles the 300-character cut: scrub, then cut
		{"straddling the cut", strings.Repeat("x", 290) + " " + testSDKey},
		{"upper case", "bad key " + strings.ToUpper(testSDKey)},
		{"query escaped", "bad key " + url.QueryEscape(testOddKey)},
		{"path escaped", "bad key " + url.PathEscape(testOddKey)},
		{"json escaped", "bad key " + strings.Trim(string(jsonEsc), `"`)},
		{"cut by the service", "bad key " + testClientKey[:13] + "..."},
	} {
		t.Run(tc.name, func(t *testing.T) {
			up.setHandler(func(w http.ResponseWriter, r *http.Request) {
				w.Header().Set("Content-Type", "application/json")
				w.WriteHeader(http.StatusBadRequest)
				json.NewEncoder(w).Encode(map[string]any{"success": false, "error": tc.message})
			})
			status, hdr, raw := do(t, http.MethodPost, "/v1/chat/completions", itChatBody(t, "a cat"))
			e := itWantErr(t, status, hdr, raw, http.StatusBadGateway, "upstream_error")
			if sc := newScrubber(append(testSecrets, testOddKey)); sc.contains(e.Message) || sc.contains(string(raw)) {
				t.Errorf("message carries a secret: %q", e.Message)
			}
			// the prefix a cut would leave
			if strings.Contains(string(raw), testSDKey[:8]) {
				t.Errorf("message carries the key's first characters: %q", e.Message)
			}
		})
	}

	t.Run("connection closed", func(t *testing.T) {
		up.setHandler(func(w http.ResponseWriter, r *http.Request) {
			conn, _, err := http.NewResponseController(w).Hijack()
			if err == nil {
				conn.Close()
			}
		})
		status, hdr, raw := do(t, http.MethodPost, "/v1/chat/completions", itChatBody(t, "a cat"))
		e := itWantErr(t, status, hdr, raw, http.StatusBadGateway, "upstream_error")
		if e.Message != "The image service failed: the image service closed the connection" {
			t.Errorf("message %q", e.Message)
		}
		for _, internal := range []string{"127.0.0.1", "tcp", "->", "EOF"} {
			if strings.Contains(string(raw), internal) {
				t.Errorf("the answer names %q: %s", internal, raw)
			}
		}
		// the log keeps the detail for the operator
		found := false
		for _, l := range readLog(t) {
			if d, _ := l["detail"].(string); l["msg"] == "image service call failed" && strings.Contains(d, "EOF") {
				found = true
			}
		}
		if !found {
			t.Error("no warn line with the error's detail")
		}
	})
}

// TestSecretsEncodedThroughCaddy: a service that echoes the key it was
// sent percent-encoded, as base64 of "Bearer <key>" (its Authorization
// header) and in hex (either case, as a debug dump prints it), in its
// error message and in its image URL: none reaches the client or the log.
func TestSecretsEncodedThroughCaddy(t *testing.T) {
	up := newFakeUpstream(t)
	all := func(int) bool { return true }
	echoes := func(r *http.Request) (pct, b64, hx string) {
		key := strings.TrimPrefix(r.Header.Get("Authorization"), "Bearer ")
		return pctEncode(key, true, all), base64.StdEncoding.EncodeToString([]byte(r.Header.Get("Authorization"))), hex.EncodeToString([]byte(key))
	}
	startCaddy(t, gatewaySite(up, nil, ""))
	sc := newScrubber(testSecrets)

	up.setHandler(func(w http.ResponseWriter, r *http.Request) {
		pct, b64, hx := echoes(r)
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(http.StatusBadRequest)
		json.NewEncoder(w).Encode(map[string]any{"success": false,
			"error": "invalid key " + pct + " (header " + b64 + "; key bytes " + hx + ", " + strings.ToUpper(hx) + ")"})
	})
	status, hdr, raw := do(t, http.MethodPost, "/v1/chat/completions", itChatBody(t, "a cat"))
	e := itWantErr(t, status, hdr, raw, http.StatusBadGateway, "upstream_error")
	if !strings.HasPrefix(e.Message, "The image service failed: invalid key [redacted] (header ") || strings.Count(e.Message, redacted) != 4 {
		t.Errorf("message %q", e.Message)
	}
	if sc.contains(string(raw)) {
		t.Errorf("the answer carries a secret: %s", raw)
	}

	for _, form := range []string{"percent", "base64", "hex", "HEX"} {
		up.setHandler(func(w http.ResponseWriter, r *http.Request) {
			pct, b64, hx := echoes(r)
			writeUpstreamOK(w, map[string]string{
				"percent": "https://img.example.com/1.png?k=" + pct,
				"base64":  "https://img.example.com/1.png?auth=" + url.QueryEscape(b64),
				"hex":     "https://img.example.com/1.png?k=" + hx,
				"HEX":     "https://img.example.com/" + strings.ToUpper(hx) + ".png",
			}[form])
		})
		status, hdr, raw := do(t, http.MethodPost, "/v1/chat/completions", itChatBody(t, "a cat"))
		e := itWantErr(t, status, hdr, raw, http.StatusBadGateway, "upstream_error")
		if !strings.Contains(e.Message, "carries a secret") || sc.contains(string(raw)) {
			t.Errorf("%s: %s", form, raw)
		}
	}
	for _, l := range readLog(t) {
		if b, _ := json.Marshal(l); sc.contains(string(b)) {
			t.Errorf("a log line carries a secret: %s", sc.Replace(string(b)))
		}
	}
}
