package zimage

import (
	"bytes"
	"encoding/base64"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"net/url"
	"sort"
	"strings"
)

// redacted replaces a secret wherever one is found.
const redacted = "[redacted]"

// gramLen is the length of the windows the scrubber indexes: a secret's
// piece must be at least this long to be found by the fast path.
const gramLen = 8

// scrubber removes every configured secret (client keys, the image service
// key, the LLM key, the forward proxy's credentials) from text that leaves
// the gateway: to a client, to the image service, to the LLM or to a log
// line. A secret can come back from any party in any form, so it
// looks for
//   - every encoding a party may have applied: as is, URL query and path
//     escaping (also twice), JSON escaping;
//   - percent-encoding of any of its bytes, in either hex case: the text is
//     percent-decoded (twice at most) and matched again;
//   - base64 (standard or URL alphabet) of any text that holds the secret
//     at any place, such as "Bearer <key>" or "user:<key>": the secret's
//     bytes start at one of three offsets in a 3-byte group, and at each
//     the characters that carry its bits alone are fixed, so those three
//     runs are forms like the others;
//   - hex of its bytes, in either case, run together (as %x prints it) or
//     a byte apart (as % x and debug dumps print it): a service's debug
//     output echoed a key this way;
//   - in any letter case (percent-escapes, hex and keys alike);
//   - cut: any piece of a text form at least half its length (and at
//     least 8 characters, or the whole of a shorter one) counts, so a key
//     that a party shortened still goes.
//
// It indexes every 8-byte window of every form, so scrubbing costs one
// bitset probe per byte of text, whatever the number of secrets, and a
// text with a '%' in it once or twice more: linear in the text.
type scrubber struct {
	forms  []string // lower-cased forms of every secret
	minLen []int    // the shortest piece of forms[i] that counts as a leak
	short  []int    // forms shorter than gramLen, matched whole by strings.Index
	grams  map[uint64][]gramRef
	filter [1 << 10]uint64 // a bit per hashed gram: most text misses at once
}

// gramRef is where an indexed window occurs: in forms[form] at offset.
type gramRef struct{ form, offset int }

func newScrubber(secrets []string) *scrubber {
	s := &scrubber{grams: map[uint64][]gramRef{}}
	seen := map[string]bool{}
	add := func(form string, minLen int) {
		form = asciiLower(form)
		if form == "" || seen[form] {
			return
		}
		seen[form] = true
		i := len(s.forms)
		s.forms = append(s.forms, form)
		s.minLen = append(s.minLen, minLen)
		if len(form) < gramLen {
			s.short = append(s.short, i)
			return
		}
		for o := 0; o+gramLen <= len(form); o++ {
			g := binary.LittleEndian.Uint64([]byte(form[o : o+gramLen]))
			s.grams[g] = append(s.grams[g], gramRef{form: i, offset: o})
			h := gramHash(g)
			s.filter[h>>6] |= 1 << (h & 63)
		}
	}
	for _, k := range secrets {
		if k == "" {
			continue
		}
		for _, f := range textForms(k) {
			add(f, cutLen(len(f)))
		}
		// base64 of a cut key is not a piece of the key's base64: only
		// the whole run a key's bytes fix counts
		for _, f := range base64Forms(k) {
			add(f, len(f))
		}
	}
	return s
}

// textForms are the encodings of a secret in which a piece of it is still
// a piece of the encoding.
func textForms(k string) []string {
	js, _ := json.Marshal(k) // escapes <, >, & as \u003c… as Go does
	var plain strings.Builder
	enc := json.NewEncoder(&plain)
	enc.SetEscapeHTML(false)
	_ = enc.Encode(k)
	unquote := func(s string) string { return strings.TrimSuffix(strings.TrimPrefix(strings.TrimSpace(s), `"`), `"`) }
	forms := []string{
		k,
		url.QueryEscape(k),
		url.PathEscape(k),
		url.QueryEscape(url.QueryEscape(k)),
		unquote(string(js)),
		unquote(plain.String()),
		strings.ReplaceAll(unquote(plain.String()), "/", `\/`), // PHP and others escape slashes
		// hex: a piece of the key is a piece of its hex; upper case is
		// found as every form is, by lower-casing the text
		hex.EncodeToString([]byte(k)),
		spacedHex(k),
	}
	return forms
}

// spacedHex is k's bytes in hex, a space between bytes.
func spacedHex(k string) string {
	b := make([]byte, 0, 3*len(k))
	for i := 0; i < len(k); i++ {
		if i > 0 {
			b = append(b, ' ')
		}
		b = hex.AppendEncode(b, []byte{k[i]})
	}
	return string(b)
}

// base64Forms are the runs of base64 characters that k fixes wherever it
// sits in the encoded bytes: with a bytes (0, 1, 2) of its 3-byte group
// before it, characters ceil(8a/6) to floor((8a+8n)/6) carry k's bits
// alone, whatever comes before and after. Matching these three runs (for
// each alphabet) finds base64 of "Bearer <key>", "user:<key>" or any text
// around the key without decoding the text at each alignment.
func base64Forms(k string) []string {
	var forms []string
	n := len(k)
	for a := range 3 {
		lo, hi := (8*a+5)/6, (8*a+8*n)/6
		if hi-lo < 4 { // too short to tell from chance
			continue
		}
		in := append(make([]byte, a, a+n), k...)
		for _, enc := range []*base64.Encoding{base64.RawStdEncoding, base64.RawURLEncoding} {
			forms = append(forms, enc.EncodeToString(in)[lo:hi])
		}
	}
	return forms
}

// cutLen is the shortest piece of a form of n bytes that counts as a leak.
func cutLen(n int) int {
	return max((n+1)/2, min(n, gramLen))
}

func gramHash(g uint64) uint64 { return (g * 0x9E3779B97F4A7C15) >> 48 }

// Replace returns text with every secret in it, in any of its forms,
// replaced by [redacted]. Text without a secret is returned as is.
func (s *scrubber) Replace(text string) string {
	spans := s.find(text, false)
	if len(spans) == 0 {
		return text
	}
	var b strings.Builder
	b.Grow(len(text))
	last := 0
	for _, sp := range spans {
		b.WriteString(text[last:sp[0]])
		b.WriteString(redacted)
		last = sp[1]
	}
	b.WriteString(text[last:])
	return b.String()
}

// contains reports whether text holds a secret in any form.
func (s *scrubber) contains(text string) bool {
	return len(s.find(text, true)) > 0
}

// find returns the sorted, merged byte spans of text that are secrets.
// With first, it stops at the first one.
func (s *scrubber) find(text string, first bool) [][2]int {
	if s == nil || len(s.forms) == 0 || text == "" {
		return nil
	}
	// a prompt or a URL fits the array on the stack: scrubbing them
	// allocates nothing unless a secret is found
	var buf [512]byte
	lt := append(buf[:0], text...)
	lowerBytes(lt) // ASCII lower case keeps the byte offsets
	spans := s.scan(lt, first, nil)
	if first && len(spans) > 0 {
		return spans
	}
	// a secret percent-encoded in part or whole (%73%6B%2D…), once or
	// twice: decode and scan again, mapping spans back to the text
	dec, off := lt, []int(nil)
	for range 2 {
		if bytes.IndexByte(dec, '%') < 0 {
			break
		}
		var ok bool
		if dec, off, ok = unescapePercent(dec, off); !ok {
			break
		}
		found := s.scan(dec, first, off)
		if first && len(found) > 0 {
			return found
		}
		spans = append(spans, found...)
	}
	return mergeSpans(spans)
}

// scan returns the spans of the secrets' forms in lt (lower case); with
// off, a span [i, j) of lt is [off[i], off[j]) of the text.
func (s *scrubber) scan(lt []byte, first bool, off []int) (spans [][2]int) {
	add := func(start, stop int) {
		if off != nil {
			start, stop = off[start], off[stop]
		}
		spans = append(spans, [2]int{start, stop})
	}
	for _, i := range s.short {
		f := []byte(s.forms[i])
		for o := 0; ; {
			j := bytes.Index(lt[o:], f)
			if j < 0 {
				break
			}
			add(o+j, o+j+len(f))
			if first {
				return spans
			}
			o += j + len(f)
		}
	}
	for i := 0; i+gramLen <= len(lt); i++ {
		g := binary.LittleEndian.Uint64(lt[i : i+gramLen])
		h := gramHash(g)
		if s.filter[h>>6]&(1<<(h&63)) == 0 {
			continue
		}
		end := i
		for _, ref := range s.grams[g] {
			f := s.forms[ref.form]
			// grow the match both ways as far as text follows the form
			start, fo := i, ref.offset
			for start > 0 && fo > 0 && lt[start-1] == f[fo-1] {
				start, fo = start-1, fo-1
			}
			stop, fe := i+gramLen, ref.offset+gramLen
			for stop < len(lt) && fe < len(f) && lt[stop] == f[fe] {
				stop, fe = stop+1, fe+1
			}
			if stop-start >= s.minLen[ref.form] {
				add(start, stop)
				if first {
					return spans
				}
				end = max(end, stop)
			}
		}
		if end > i+gramLen {
			i = end - gramLen // the windows inside the match are covered
		}
	}
	return spans
}

// unescapePercent decodes every %XX escape (either hex case) of b into a new
// lower-case buffer, with the offset in the original text of each decoded
// byte and of the end; prev maps b's own offsets further back (nil: b is
// the text). ok is false when b has no escape.
func unescapePercent(b []byte, prev []int) (dec []byte, off []int, ok bool) {
	dec = make([]byte, len(b))
	off = make([]int, len(b)+1)
	n := 0
	for i := 0; i < len(b); n++ {
		off[n] = i
		c := b[i]
		if c == '%' && i+2 < len(b) && isHex(b[i+1]) && isHex(b[i+2]) {
			c = unhex(b[i+1])<<4 | unhex(b[i+2])
			i += 3
			ok = true
		} else {
			i++
		}
		if c >= 'A' && c <= 'Z' {
			c += 'a' - 'A'
		}
		dec[n] = c
	}
	off[n] = len(b)
	if prev != nil {
		for j := 0; j <= n; j++ {
			off[j] = prev[off[j]]
		}
	}
	return dec[:n], off[:n+1], ok
}

func isHex(c byte) bool { return c >= '0' && c <= '9' || c >= 'a' && c <= 'f' || c >= 'A' && c <= 'F' }

func unhex(c byte) byte {
	switch {
	case c <= '9':
		return c - '0'
	case c >= 'a':
		return c - 'a' + 10
	}
	return c - 'A' + 10
}

func lowerBytes(b []byte) {
	for i, c := range b {
		if c >= 'A' && c <= 'Z' {
			b[i] = c + 'a' - 'A'
		}
	}
}

// mergeSpans sorts spans and joins those that overlap or touch.
func mergeSpans(spans [][2]int) [][2]int {
	if len(spans) < 2 {
		return spans
	}
	sort.Slice(spans, func(a, b int) bool { return spans[a][0] < spans[b][0] })
	out := spans[:1]
	for _, sp := range spans[1:] {
		if last := &out[len(out)-1]; sp[0] <= last[1] {
			last[1] = max(last[1], sp[1])
			continue
		}
		out = append(out, sp)
	}
	return out
}
