package main

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"strconv"
)

// rawConn is a minimal HTTP/1.1 keep-alive client: one connection, one
// request written as prebuilt bytes, the answer parsed just enough (status,
// Content-Length, chunked, Connection: close) to read it to the end.
//
// Why not net/http: on this benchmark's two cores the load generator shares
// its core with the fake upstream, and net/http's client costs about as much
// CPU per request as Caddy's respond handler does to answer it. A generator
// that saturates before the server measures itself, not the server, and
// would hide exactly the gains the targets ask about. This client costs a
// write and a read system call and a few comparisons. -client go switches
// back to net/http for comparison; -burst and -stream always use net/http,
// as they measure the server's concurrency, not its throughput.
type rawConn struct {
	addr string
	req  []byte
	conn net.Conn
	br   *bufio.Reader
	body []byte // the answer's body, when it must be looked at

	// scratch takes a large body that is not looked at in big reads
	// (an image of megabytes through the 16 KiB bufio buffer would cost
	// a system call per 16 KiB, on the core the generator shares)
	scratch []byte
}

// newRawConn prebuilds the request bytes; it dials lazily.
func newRawConn(cfg config) (*rawConn, error) {
	u, err := url.Parse(cfg.url)
	if err != nil {
		return nil, err
	}
	if u.Scheme != "http" {
		return nil, fmt.Errorf("-client raw speaks plain http only, not %q (use -client go)", u.Scheme)
	}
	addr := u.Host
	if u.Port() == "" {
		addr = net.JoinHostPort(u.Hostname(), "80")
	}
	var b bytes.Buffer
	fmt.Fprintf(&b, "%s %s HTTP/1.1\r\nHost: %s\r\nUser-Agent: bench-load\r\n", cfg.method, u.RequestURI(), u.Host)
	h := cfg.header.Clone()
	if len(cfg.body) > 0 || cfg.method == http.MethodPost || cfg.method == http.MethodPut {
		h.Set("Content-Length", strconv.Itoa(len(cfg.body)))
		if len(cfg.body) > 0 && h.Get("Content-Type") == "" {
			h.Set("Content-Type", "application/json")
		}
	}
	if err := h.Write(&b); err != nil {
		return nil, err
	}
	b.WriteString("\r\n")
	b.Write(cfg.body)
	return &rawConn{addr: addr, req: b.Bytes()}, nil
}

// roundTrip sends the request and reads the whole answer. keep asks for the
// body in c.body (to check -expect); otherwise it is discarded unread.
func (c *rawConn) roundTrip(keep bool) (status int, err error) {
	if c.conn == nil {
		conn, err := net.Dial("tcp", c.addr)
		if err != nil {
			return 0, err
		}
		c.conn = conn
		if c.br == nil {
			c.br = bufio.NewReaderSize(conn, 16<<10)
		} else {
			c.br.Reset(conn)
		}
	}
	status, closeAfter, err := c.exchange(keep)
	if err != nil || closeAfter {
		c.conn.Close()
		c.conn = nil
	}
	return status, err
}

var errMalformed = errors.New("malformed HTTP response")

func (c *rawConn) exchange(keep bool) (status int, closeAfter bool, err error) {
	if _, err := c.conn.Write(c.req); err != nil {
		return 0, true, err
	}
	br := c.br
	line, err := br.ReadSlice('\n')
	if err != nil {
		return 0, true, err
	}
	// "HTTP/1.1 200 OK\r\n"
	if len(line) < 12 || !bytes.HasPrefix(line, []byte("HTTP/1.")) || line[8] != ' ' {
		return 0, true, errMalformed
	}
	status = int(line[9]-'0')*100 + int(line[10]-'0')*10 + int(line[11]-'0')
	if status < 100 || status > 999 {
		return 0, true, errMalformed
	}
	closeAfter = line[7] == '0' // HTTP/1.0 closes unless told otherwise; close to be safe
	length, chunked := int64(-1), false
	for {
		line, err = br.ReadSlice('\n')
		if err != nil {
			return status, true, err
		}
		if len(line) <= 2 { // the blank line after the headers
			break
		}
		name, value, ok := bytes.Cut(line, []byte(":"))
		if !ok {
			return status, true, errMalformed
		}
		value = bytes.TrimSpace(value)
		switch {
		case asciiEqualFold(name, "content-length"):
			n, err := strconv.ParseInt(string(value), 10, 64)
			if err != nil || n < 0 {
				return status, true, errMalformed
			}
			length = n
		case asciiEqualFold(name, "transfer-encoding"):
			chunked = asciiContainsFold(value, "chunked")
		case asciiEqualFold(name, "connection"):
			closeAfter = closeAfter || asciiContainsFold(value, "close")
		}
	}
	c.body = c.body[:0]
	switch {
	case status < 200 || status == 204 || status == 304:
		// no body
	case chunked:
		for {
			line, err = br.ReadSlice('\n')
			if err != nil {
				return status, true, err
			}
			hex, _, _ := bytes.Cut(bytes.TrimSpace(line), []byte(";"))
			n, err := strconv.ParseInt(string(hex), 16, 64)
			if err != nil || n < 0 {
				return status, true, errMalformed
			}
			if n == 0 {
				// trailers, then the blank line
				for {
					line, err = br.ReadSlice('\n')
					if err != nil {
						return status, true, err
					}
					if len(line) <= 2 {
						break
					}
				}
				break
			}
			if err := c.readN(n, keep); err != nil {
				return status, true, err
			}
			if _, err := br.Discard(2); err != nil { // the chunk's CRLF
				return status, true, err
			}
		}
	case length >= 0:
		if err := c.readN(length, keep); err != nil {
			return status, true, err
		}
	default:
		// delimited by the end of the connection
		for {
			if err := c.readN(int64(br.Size()), keep); err != nil {
				if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
					return status, true, nil
				}
				return status, true, err
			}
		}
	}
	return status, closeAfter, nil
}

// readN reads n body bytes, into c.body when keep.
func (c *rawConn) readN(n int64, keep bool) error {
	if !keep {
		if n <= int64(c.br.Size()) {
			_, err := c.br.Discard(int(n))
			return err
		}
		if c.scratch == nil {
			c.scratch = make([]byte, 256<<10)
		}
		for n > 0 {
			// bufio reads straight into a large p once its buffer is empty
			got, err := c.br.Read(c.scratch[:min(n, int64(len(c.scratch)))])
			n -= int64(got)
			if err != nil {
				if err == io.EOF && n > 0 {
					err = io.ErrUnexpectedEOF
				}
				if n > 0 {
					return err
				}
			}
		}
		return nil
	}
	start := len(c.body)
	c.body = append(c.body, make([]byte, n)...)
	got, err := io.ReadFull(c.br, c.body[start:])
	c.body = c.body[:start+got]
	return err
}

func (c *rawConn) close() {
	if c.conn != nil {
		c.conn.Close()
		c.conn = nil
	}
}

// asciiEqualFold compares a header name with a lowercase ASCII name.
func asciiEqualFold(b []byte, lower string) bool {
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

// asciiContainsFold reports whether a header value contains a lowercase
// ASCII token.
func asciiContainsFold(b []byte, lower string) bool {
	for i := 0; i+len(lower) <= len(b); i++ {
		if asciiEqualFold(b[i:i+len(lower)], lower) {
			return true
		}
	}
	return false
}
