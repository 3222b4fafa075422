package zimage

import (
	"bytes"
	"math"
	"strconv"
	"unicode"
	"unicode/utf16"
	"unicode/utf8"
)

// JSON on the chat hot path without encoding/json's reflection, which was
// about a fifth of the handler's CPU per request (issue 17 item 11).
//
// Writing: the chat completion and the image service's request body are
// appended by hand, byte for byte what json.Marshal writes for the same
// values (fastjson_test.go checks it), its escapes included (<, >, & as
// \u003c…, U+2028/2029, invalid UTF-8 as \ufffd) and its number format.
//
// Reading: jsonReader reads the shapes the hot path expects (the chat
// body, the service's answer) and gives up on anything else: a syntax
// error, a type it did not expect, a key in another case or repeated. The
// caller then decodes with encoding/json, which has the last word and
// words the error, so the reader needs to be right only when it succeeds,
// and there it must decode what encoding/json decodes (the differential
// fuzz targets in fastjson_test.go).

const hexDigits = "0123456789abcdef"

// appendJSONString appends s as a JSON string, escaped as json.Marshal
// escapes it.
func appendJSONString(dst []byte, s string) []byte {
	dst = append(dst, '"')
	start := 0
	for i := 0; i < len(s); {
		b := s[i]
		if b < utf8.RuneSelf {
			if b >= 0x20 && b != '"' && b != '\\' && b != '<' && b != '>' && b != '&' {
				i++
				continue
			}
			dst = append(dst, s[start:i]...)
			switch b {
			case '\\', '"':
				dst = append(dst, '\\', b)
			case '\b':
				dst = append(dst, '\\', 'b')
			case '\f':
				dst = append(dst, '\\', 'f')
			case '\n':
				dst = append(dst, '\\', 'n')
			case '\r':
				dst = append(dst, '\\', 'r')
			case '\t':
				dst = append(dst, '\\', 't')
			default:
				dst = append(dst, '\\', 'u', '0', '0', hexDigits[b>>4], hexDigits[b&0xF])
			}
			i++
			start = i
			continue
		}
		c, size := utf8.DecodeRuneInString(s[i:])
		switch {
		case c == utf8.RuneError && size == 1:
			dst = append(dst, s[start:i]...)
			dst = append(dst, `\ufffd`...)
		case c == '\u2028' || c == '\u2029':
			dst = append(dst, s[start:i]...)
			dst = append(dst, '\\', 'u', '2', '0', '2', hexDigits[c&0xF])
		default:
			i += size
			continue
		}
		i += size
		start = i
	}
	dst = append(dst, s[start:]...)
	return append(dst, '"')
}

// appendJSONFloat appends a finite f as json.Marshal writes a float64: the
// shortest form, with an exponent only below 1e-6 or from 1e21 on.
func appendJSONFloat(dst []byte, f float64) []byte {
	format := byte('f')
	if abs := math.Abs(f); abs != 0 && (abs < 1e-6 || abs >= 1e21) {
		format = 'e'
	}
	dst = strconv.AppendFloat(dst, f, format, -1, 64)
	if format == 'e' {
		// e-07 to e-7, as encoding/json does
		if n := len(dst); n >= 4 && dst[n-4] == 'e' && dst[n-3] == '-' && dst[n-2] == '0' {
			dst[n-2] = dst[n-1]
			dst = dst[:n-1]
		}
	}
	return dst
}

// jsonReader reads one JSON document from b.
type jsonReader struct {
	b []byte
	i int
}

// maxReaderDepth is where the reader gives up on nested values it skips
// (encoding/json goes on to 10000).
const maxReaderDepth = 64

// peek skips white space and returns the next byte, 0 at the end.
func (r *jsonReader) peek() byte {
	for r.i < len(r.b) {
		switch c := r.b[r.i]; c {
		case ' ', '\t', '\n', '\r':
			r.i++
		default:
			return c
		}
	}
	return 0
}

// eat consumes c, the next byte after white space.
func (r *jsonReader) eat(c byte) bool {
	if r.peek() != c {
		return false
	}
	r.i++
	return true
}

// end reports whether only white space is left.
func (r *jsonReader) end() bool { return r.peek() == 0 && r.i == len(r.b) }

func (r *jsonReader) literal(s string) bool {
	if !bytes.HasPrefix(r.b[r.i:], []byte(s)) {
		return false
	}
	r.i += len(s)
	return true
}

// null consumes a null if one is next.
func (r *jsonReader) null() bool { return r.peek() == 'n' && r.literal("null") }

// boolean reads true or false.
func (r *jsonReader) boolean() (v, ok bool) {
	switch r.peek() {
	case 't':
		return true, r.literal("true")
	case 'f':
		return false, r.literal("false")
	}
	return false, false
}

// stringBytes reads a string and returns its raw contents (between the
// quotes, escapes as written) and whether it has escapes. It gives up on
// invalid UTF-8, which encoding/json would replace.
func (r *jsonReader) stringBytes() (raw []byte, escaped, ok bool) {
	if !r.eat('"') {
		return nil, false, false
	}
	start, ascii := r.i, true
	for j := start; j < len(r.b); j++ {
		switch c := r.b[j]; {
		case c == '"':
			r.i = j + 1
			raw = r.b[start:j]
			return raw, escaped, ascii || utf8.Valid(raw)
		case c == '\\':
			escaped = true
			j++
			if j >= len(r.b) {
				return nil, false, false
			}
			switch r.b[j] {
			case '"', '\\', '/', 'b', 'f', 'n', 'r', 't':
			case 'u':
				if _, ok := hex4(r.b[j+1:]); !ok {
					return nil, false, false
				}
				j += 4
			default:
				return nil, false, false
			}
		case c < 0x20:
			return nil, false, false
		case c >= utf8.RuneSelf:
			ascii = false
		}
	}
	return nil, false, false
}

// str reads a string.
func (r *jsonReader) str() (string, bool) {
	raw, escaped, ok := r.stringBytes()
	if !ok {
		return "", false
	}
	if !escaped {
		return string(raw), true
	}
	return unescapeJSON(raw), true
}

// unescapeJSON decodes the escapes of a valid string's contents as
// encoding/json does: a \u surrogate without its pair is U+FFFD.
func unescapeJSON(raw []byte) string {
	out := make([]byte, 0, len(raw))
	for i := 0; i < len(raw); {
		c := raw[i]
		if c != '\\' {
			out = append(out, c)
			i++
			continue
		}
		switch e := raw[i+1]; e {
		case 'b':
			out = append(out, '\b')
		case 'f':
			out = append(out, '\f')
		case 'n':
			out = append(out, '\n')
		case 'r':
			out = append(out, '\r')
		case 't':
			out = append(out, '\t')
		case 'u':
			rr, _ := hex4(raw[i+2:])
			i += 6
			if utf16.IsSurrogate(rr) {
				if len(raw) >= i+6 && raw[i] == '\\' && raw[i+1] == 'u' {
					if rr1, ok := hex4(raw[i+2:]); ok {
						if dec := utf16.DecodeRune(rr, rr1); dec != unicode.ReplacementChar {
							out = utf8.AppendRune(out, dec)
							i += 6
							continue
						}
					}
				}
				rr = unicode.ReplacementChar
			}
			out = utf8.AppendRune(out, rr)
			continue
		default: // " \ /
			out = append(out, e)
		}
		i += 2
	}
	return string(out)
}

// hex4 reads the four hex digits of a \u escape.
func hex4(b []byte) (rune, bool) {
	if len(b) < 4 {
		return 0, false
	}
	var r rune
	for _, c := range b[:4] {
		switch {
		case '0' <= c && c <= '9':
			c -= '0'
		case 'a' <= c && c <= 'f':
			c -= 'a' - 10
		case 'A' <= c && c <= 'F':
			c -= 'A' - 10
		default:
			return 0, false
		}
		r = r<<4 | rune(c)
	}
	return r, true
}

// number reads a number as JSON writes it (no leading zeros, no bare dot)
// and returns its text.
func (r *jsonReader) number() ([]byte, bool) {
	r.peek()
	b, start, i := r.b, r.i, r.i
	digits := func() bool {
		j := i
		for i < len(b) && b[i] >= '0' && b[i] <= '9' {
			i++
		}
		return i > j
	}
	if i < len(b) && b[i] == '-' {
		i++
	}
	switch {
	case i < len(b) && b[i] == '0':
		i++
	case !digits():
		return nil, false
	}
	if i < len(b) && b[i] == '.' {
		i++
		if !digits() {
			return nil, false
		}
	}
	if i < len(b) && (b[i] == 'e' || b[i] == 'E') {
		i++
		if i < len(b) && (b[i] == '+' || b[i] == '-') {
			i++
		}
		if !digits() {
			return nil, false
		}
	}
	r.i = i
	return b[start:i], true
}

// float reads a number that fits a float64.
func (r *jsonReader) float() (float64, bool) {
	text, ok := r.number()
	if !ok {
		return 0, false
	}
	f, err := strconv.ParseFloat(string(text), 64)
	return f, err == nil
}

// skip reads any value and returns its text.
func (r *jsonReader) skip(depth int) ([]byte, bool) {
	if depth > maxReaderDepth {
		return nil, false
	}
	r.peek()
	start := r.i
	var ok bool
	switch r.peek() {
	case '"':
		_, _, ok = r.stringBytes()
	case '{':
		ok = r.object(func(key []byte) bool {
			_, ok := r.skip(depth + 1)
			return ok
		})
	case '[':
		ok = r.array(func() bool {
			_, ok := r.skip(depth + 1)
			return ok
		})
	case 't', 'f':
		_, ok = r.boolean()
	case 'n':
		ok = r.null()
	default:
		_, ok = r.number()
	}
	return r.b[start:r.i], ok
}

// object reads an object: field is called with each key, the reader at
// its value, and reads the value or gives up. A key with escapes is given
// up on.
func (r *jsonReader) object(field func(key []byte) bool) bool {
	if !r.eat('{') {
		return false
	}
	if r.eat('}') {
		return true
	}
	for {
		key, escaped, ok := r.stringBytes()
		if !ok || escaped || !r.eat(':') || !field(key) {
			return false
		}
		if r.eat(',') {
			continue
		}
		return r.eat('}')
	}
}

// array reads an array, elem reading each element.
func (r *jsonReader) array(elem func() bool) bool {
	if !r.eat('[') {
		return false
	}
	if r.eat(']') {
		return true
	}
	for {
		if !elem() {
			return false
		}
		if r.eat(',') {
			continue
		}
		return r.eat(']')
	}
}

// matchField matches a key against the names of a struct's fields as
// encoding/json does: the exact name is field i; a key that is not a name
// in any case is unknown (-1, skipped); a name in another case, or a
// key that is not ASCII (encoding/json folds ſ to s and K to k), is
// given up on (-2).
func matchField(key []byte, names []string) int {
	for i, n := range names {
		if string(key) == n {
			return i
		}
	}
	for _, c := range key {
		if c >= utf8.RuneSelf {
			return -2
		}
	}
	for _, n := range names {
		if bytes.EqualFold(key, []byte(n)) {
			return -2
		}
	}
	return -1
}

// field matches key (matchField) and settles what is not a field to read:
// an unknown key's value is skipped (-1, true), a key in another case or
// given twice gives up (false). seen records the fields read.
func (r *jsonReader) field(key []byte, names []string, seen *uint16, depth int) (int, bool) {
	f := matchField(key, names)
	switch {
	case f == -1:
		_, ok := r.skip(depth)
		return -1, ok
	case f < 0 || *seen&(1<<f) != 0:
		return f, false
	}
	*seen |= 1 << f
	return f, true
}
