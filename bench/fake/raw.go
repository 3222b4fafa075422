package main

import (
	"bufio"
	"bytes"
	"errors"
	"io"
	"net"
	"net/http"
	"strconv"
	"time"
)

// serveRaw is a minimal HTTP/1.1 server: a goroutine per connection reads a
// request line and headers, skips the body (Content-Length or chunked),
// answers with one write, and reads the next request on the same
// connection. It understands what Go's HTTP client (the gateway's) and
// Caddy's reverse_proxy send, which is all it ever serves.
func serveRaw(ln net.Listener, f *fake) error {
	// the two hot answers are built once, whole, and shared read-only
	fixed := map[*byte][]byte{
		&imageJSON[0]: appendAnswer(nil, http.StatusOK, imageJSON),
		&f.llmBody[0]: appendAnswer(nil, http.StatusOK, f.llmBody),
	}
	for {
		conn, err := ln.Accept()
		if err != nil {
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				continue
			}
			return err
		}
		go serveRawConn(conn, f, fixed)
	}
}

func serveRawConn(conn net.Conn, f *fake, fixed map[*byte][]byte) {
	defer conn.Close()
	br := bufio.NewReaderSize(conn, 4096)
	var out []byte
	for {
		method, path, closeAfter, err := readRequest(br, conn)
		if err != nil {
			return // EOF between requests, or a request this fake cannot parse
		}
		status, body, wait, done := f.call(method, path)
		if wait > 0 {
			time.Sleep(wait)
		}
		var a []byte
		if status == http.StatusOK && len(body) > 0 {
			a = fixed[&body[0]]
		}
		if a == nil {
			a = appendAnswer(out[:0], status, body)
			out = a
		}
		_, err = conn.Write(a)
		if done != nil {
			done()
		}
		if err != nil || closeAfter {
			return
		}
	}
}

// appendAnswer appends a complete HTTP/1.1 response.
func appendAnswer(b []byte, status int, body []byte) []byte {
	b = append(b, "HTTP/1.1 "...)
	b = strconv.AppendInt(b, int64(status), 10)
	b = append(b, ' ')
	b = append(b, http.StatusText(status)...)
	b = append(b, "\r\nContent-Type: application/json\r\n"...)
	if status != http.StatusNoContent {
		b = append(b, "Content-Length: "...)
		b = strconv.AppendInt(b, int64(len(body)), 10)
		b = append(b, "\r\n"...)
	}
	b = append(b, "\r\n"...)
	return append(b, body...)
}

var errBadRequest = errors.New("fake: malformed request")

// readRequest reads one request's line and headers and skips its body,
// answering "Expect: 100-continue" on w first.
func readRequest(br *bufio.Reader, w io.Writer) (method, path string, closeAfter bool, err error) {
	line, err := br.ReadSlice('\n')
	if err != nil {
		return "", "", false, err
	}
	// "POST /api/v1/generate_image HTTP/1.1\r\n"
	m, rest, ok1 := bytes.Cut(line, []byte(" "))
	target, proto, ok2 := bytes.Cut(rest, []byte(" "))
	if !ok1 || !ok2 {
		return "", "", false, errBadRequest
	}
	if i := bytes.IndexByte(target, '?'); i >= 0 {
		target = target[:i]
	}
	// interned: these strings are the only ones the fake routes on
	method, path = intern(m), intern(target)
	closeAfter = bytes.HasPrefix(proto, []byte("HTTP/1.0"))
	length, chunked, expect := int64(0), false, false
	for {
		line, err = br.ReadSlice('\n')
		if err != nil {
			return "", "", false, err
		}
		if len(line) <= 2 {
			break
		}
		name, value, ok := bytes.Cut(line, []byte(":"))
		if !ok {
			return "", "", false, errBadRequest
		}
		value = bytes.TrimSpace(value)
		switch {
		case equalFold(name, "content-length"):
			if length, err = strconv.ParseInt(string(value), 10, 64); err != nil || length < 0 {
				return "", "", false, errBadRequest
			}
		case equalFold(name, "transfer-encoding"):
			chunked = bytes.Contains(bytes.ToLower(value), []byte("chunked"))
		case equalFold(name, "connection"):
			closeAfter = closeAfter || bytes.Contains(bytes.ToLower(value), []byte("close"))
		case equalFold(name, "expect"):
			expect = bytes.EqualFold(value, []byte("100-continue"))
		}
	}
	if expect {
		if _, err := io.WriteString(w, "HTTP/1.1 100 Continue\r\n\r\n"); err != nil {
			return "", "", false, err
		}
	}
	if !chunked {
		_, err = br.Discard(int(length))
		return method, path, closeAfter, err
	}
	for {
		line, err = br.ReadSlice('\n')
		if err != nil {
			return "", "", false, err
		}
		size, _, _ := bytes.Cut(bytes.TrimSpace(line), []byte(";"))
		n, err := strconv.ParseInt(string(size), 16, 64)
		if err != nil || n < 0 {
			return "", "", false, errBadRequest
		}
		if n == 0 {
			for { // trailers, then the blank line
				if line, err = br.ReadSlice('\n'); err != nil {
					return "", "", false, err
				}
				if len(line) <= 2 {
					return method, path, closeAfter, nil
				}
			}
		}
		if _, err := br.Discard(int(n) + 2); err != nil { // data and its CRLF
			return "", "", false, err
		}
	}
}

// intern returns a constant string for the methods and paths the fake knows,
// so routing allocates nothing.
func intern(b []byte) string {
	for _, s := range [...]string{
		http.MethodPost, http.MethodGet,
		"/api/v1/generate_image", "/v1/chat/completions", "/stats", "/stats/reset",
	} {
		if string(b) == s {
			return s
		}
	}
	return string(b)
}

// equalFold compares a header name with a lowercase ASCII name.
func equalFold(b []byte, lower string) bool {
	if len(b) != len(lower) {
		return false
	}
	for i := range len(b) {
		ch := b[i]
		if 'A' <= ch && ch <= 'Z' {
			ch += 'a' - 'A'
		}
		if ch != lower[i] {
			return false
		}
	}
	return true
}
