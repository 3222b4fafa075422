package zimage

import (
	"bufio"
	"bytes"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
)

// heldBody is a request body that sends its first `at` bytes, then stops
// until the test lets it go on (or 10 s pass: then the server waited for
// the body, and waited reports it). read counts the bytes taken from it.
// Before it answers, net/http reads up to 256 KiB of a body the handler
// left unread (Caddy's wrapper of the body hides the size from it), so
// `at` must leave that much beyond what the handler reads.
type heldBody struct {
	data    []byte
	at, off int
	resume  chan struct{}
	once    sync.Once
	waited  atomic.Bool
	read    atomic.Int64
}

func newHeldBody(data []byte, at int) *heldBody {
	return &heldBody{data: data, at: at, resume: make(chan struct{})}
}

func (b *heldBody) Read(p []byte) (int, error) {
	if b.off == b.at {
		select {
		case <-b.resume:
		case <-time.After(10 * time.Second):
			b.waited.Store(true)
			b.let()
		}
	}
	end := len(b.data)
	if b.off < b.at {
		end = b.at
	}
	n := copy(p, b.data[b.off:end])
	b.off += n
	b.read.Add(int64(n))
	if b.off == len(b.data) {
		return n, io.EOF
	}
	return n, nil
}

func (b *heldBody) let() { b.once.Do(func() { close(b.resume) }) }

// postHeld sends a request whose body is held, in the background, with
// its Content-Length; the body goes on when the answer has come.
func postHeld(path, ct, key string, b *heldBody) <-chan result {
	ch := make(chan result, 1)
	go func() {
		defer b.let()
		req, _ := http.NewRequest(http.MethodPost, baseURL+path, b)
		req.ContentLength = int64(len(b.data))
		req.Header.Set("Authorization", "Bearer "+key)
		req.Header.Set("Content-Type", ct)
		resp, err := testClient(60 * time.Second).Do(req)
		if err != nil {
			ch <- result{err: err}
			return
		}
		b.let()
		defer resp.Body.Close()
		raw, err := io.ReadAll(resp.Body)
		ch <- result{status: resp.StatusCode, header: resp.Header, body: raw, err: err}
	}()
	return ch
}

// paddedPNG is a valid PNG of about size bytes: a small image followed by
// noise, which the header check and the store accept.
func paddedPNG(t testing.TB, size int) []byte {
	png := storeTestPNG(t, 16, 16)
	pad := make([]byte, size-len(png))
	for i := range pad {
		pad[i] = byte(i * 7)
	}
	return append(png, pad...)
}

// Issue 15 item 2: a client at its max_concurrent is refused before its
// upload is read. alice (max_concurrent 2) has two edits at the service;
// her next large edits get 429 while their bodies are still being sent.
func TestUploadsClientAdmittedBeforeBody(t *testing.T) {
	up := newFakeUpstream(t)
	g := newGate(t)
	up.setHandler(g.handler)
	startCaddy(t, opsSite(up.endpoint(), nil, "timeout 10s", fmt.Sprintf(`client alice {
		key %s
		max_concurrent 2
	}
	model Z-Image
	model Edit {
		model_index 19
		edit
	}
	store {
		storage file_system %s
	}`, testAliceKey, t.TempDir())))
	small := func() <-chan result {
		ct, body := multipartBody(t, [][2]string{{"prompt", "x"}}, map[string][]byte{"image": storeTestPNG(t, 8, 8)})
		return sendAsync(http.MethodPost, "/v1/images/edits", body.String(), "Authorization", "Bearer "+testAliceKey, "Content-Type", ct)
	}
	first, second := small(), small()
	waitFor(t, "alice's two edits at the service", func() bool { return up.active.Load() == 2 })

	ct, large := multipartBody(t, [][2]string{{"prompt", "x"}}, map[string][]byte{"image": paddedPNG(t, 19<<20)})
	var bodies []*heldBody
	var answers []<-chan result
	for range 3 {
		b := newHeldBody(large.Bytes(), 1<<20)
		bodies = append(bodies, b)
		answers = append(answers, postHeld("/v1/images/edits", ct, testAliceKey, b))
	}
	for i, ch := range answers {
		r := await(t, ch)
		if r.status != http.StatusTooManyRequests || r.header.Get("Retry-After") == "" {
			t.Errorf("large edit %d: %d %s", i, r.status, r.body)
		}
		if bodies[i].waited.Load() {
			t.Errorf("large edit %d: answered only after its whole body was sent", i)
		}
	}
	g.open()
	for _, ch := range []<-chan result{first, second} {
		if r := await(t, ch); r.status != http.StatusOK {
			t.Errorf("alice's edit: %d %s", r.status, r.body)
		}
	}
}

// Issue 15 item 2: max_upload_memory bounds the uploads read at once. Two
// uploads whose bodies are on their way hold the budget; a third waits
// queue_timeout, then 429 with Retry-After; once the two are stored the
// budget is free again, while their jobs are still at the service.
func TestUploadsBudget(t *testing.T) {
	up := newFakeUpstream(t)
	g := newGate(t)
	up.setHandler(g.handler)
	startCaddy(t, opsSite(up.endpoint(), nil, "timeout 10s\n\t\tqueue_timeout 1s", fmt.Sprintf(`max_upload 1MiB
	max_upload_memory 2MiB
	model Z-Image
	model Edit {
		model_index 19
		edit
	}
	store {
		storage file_system %s
	}`, t.TempDir()))+"\nmetrics /metrics")
	ct, body := multipartBody(t, [][2]string{{"prompt", "x"}}, map[string][]byte{"image": paddedPNG(t, 900<<10)})
	held := func() float64 { return scrape(t).values["caddy_zimage_upload_memory_bytes{}"] }
	base := held()
	// past their first 64 KiB, the two have shown that they send and
	// reserve their whole size
	a, b := newHeldBody(body.Bytes(), 300<<10), newHeldBody(body.Bytes(), 300<<10)
	ra, rb := postHeld("/v1/images/edits", ct, testClientKey, a), postHeld("/v1/images/edits", ct, testClientKey, b)
	want := base + float64(2*body.Len())
	waitFor(t, "two uploads holding the budget", func() bool { return held() == want })

	start := time.Now()
	c := newHeldBody(body.Bytes(), 512<<10)
	r := await(t, postHeld("/v1/images/edits", ct, testClientKey, c))
	if r.status != http.StatusTooManyRequests || r.header.Get("Retry-After") != "1" {
		t.Errorf("third upload: %d %v %s", r.status, r.header, r.body)
	}
	if d := time.Since(start); d < 900*time.Millisecond {
		t.Errorf("third upload refused after %v, before queue_timeout", d)
	}
	if c.waited.Load() {
		t.Errorf("the third upload's body was waited for")
	}

	// the two go on, are stored and wait at the service holding no budget
	a.let()
	b.let()
	waitFor(t, "both edits at the service", func() bool { return up.active.Load() == 2 })
	if got := held(); got != base {
		t.Errorf("upload_memory_bytes %v while the jobs wait at the service, want %v", got, base)
	}
	g.open()
	for _, ch := range []<-chan result{ra, rb} {
		if r := await(t, ch); r.status != http.StatusOK {
			t.Errorf("held upload: %d %s", r.status, r.body)
		}
	}
}

// max_upload_memory: Caddyfile and JSON, its default, and a value that
// could never hold one upload.
func TestUnitUploadsConfig(t *testing.T) {
	var g Gateway
	if err := g.UnmarshalCaddyfile(caddyfile.NewTestDispenser("zimage_gateway {\n max_upload_memory 64MiB\n}")); err != nil || g.MaxUploadMemory != 64<<20 {
		t.Fatalf("parsed %d, %v", g.MaxUploadMemory, err)
	}
	if err := new(Gateway).UnmarshalCaddyfile(caddyfile.NewTestDispenser("zimage_gateway {\n max_upload_memory lots\n}")); err == nil || !strings.Contains(err.Error(), "max_upload_memory") {
		t.Errorf("bad size: %v", err)
	}
	unitClearEnv(t)
	gw, err := unitProvision(t, `{"no_auth":true,"upstream":{"url":"demo"}}`)
	if err != nil || gw.MaxUploadMemory != 40<<20 || gw.uploads.size != 40<<20 {
		t.Errorf("default: %v %+v", err, gw)
	}
	_, err = unitProvision(t, `{"no_auth":true,"upstream":{"url":"demo"},"max_upload":10485760,"max_upload_memory":1048576}`)
	if err == nil || !strings.Contains(err.Error(), "max_upload_memory (1 MiB) is smaller than max_upload (10 MiB)") {
		t.Errorf("too small: %v", err)
	}
}

// rawRequest opens a connection to the test server and sends a POST's
// head with the client key; the caller sends the body on conn.
func rawRequest(t *testing.T, host, path, ct string, length int) net.Conn {
	t.Helper()
	conn, err := net.Dial("tcp", fmt.Sprintf("127.0.0.1:%d", httpPort))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	if host == "" {
		host = "localhost"
	}
	if _, err := fmt.Fprintf(conn, "POST %s HTTP/1.1\r\nHost: %s\r\nAuthorization: Bearer %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n\r\n",
		path, host, testClientKey, ct, length); err != nil {
		t.Fatal(err)
	}
	return conn
}

// readRaw reads the answer to a rawRequest.
func readRaw(conn net.Conn) result {
	conn.SetReadDeadline(time.Now().Add(30 * time.Second))
	resp, err := http.ReadResponse(bufio.NewReader(conn), nil)
	if err != nil {
		return result{err: err}
	}
	defer resp.Body.Close()
	if resp.Close {
		// ReadResponse takes the header out and says so here
		resp.Header.Set("Connection", "close")
	}
	raw, err := io.ReadAll(resp.Body)
	return result{status: resp.StatusCode, header: resp.Header, body: raw, err: err}
}

// crawl sends a multipart edit that announces length bytes, sends the
// head of its image part and then one byte every `every`; its answer
// comes on the channel.
func crawl(t *testing.T, length int, every time.Duration) <-chan result {
	t.Helper()
	const boundary = "crawl"
	conn := rawRequest(t, "", "/v1/images/edits", "multipart/form-data; boundary="+boundary, length)
	head := "--" + boundary + "\r\nContent-Disposition: form-data; name=\"image\"; filename=\"x.png\"\r\nContent-Type: image/png\r\n\r\n"
	if _, err := io.WriteString(conn, head); err != nil {
		t.Fatal(err)
	}
	stop := make(chan struct{})
	t.Cleanup(func() { close(stop) })
	go func() {
		tick := time.NewTicker(every)
		defer tick.Stop()
		for sent := len(head); sent < length; sent++ {
			select {
			case <-stop:
				return
			case <-tick.C:
			}
			if _, err := conn.Write([]byte{'x'}); err != nil {
				return
			}
		}
	}()
	ch := make(chan result, 1)
	go func() { ch <- readRaw(conn) }()
	return ch
}

// Three clients that announce 20 MB and send a byte a second hold only
// what they sent (a 64 KiB probe each), so a normal 19 MiB edit beside
// them is read and answered at once, while they still crawl.
func TestUploadsCrawlersHoldWhatTheySent(t *testing.T) {
	f := newEditFake(t)
	startCaddy(t, opsSite(f.endpoint(), nil, "timeout 10s\n\t\tqueue_timeout 3s", fmt.Sprintf(`model Z-Image
	model Edit {
		model_index 19
		edit
	}
	store {
		storage file_system %s
	}`, t.TempDir()))+"\nmetrics /metrics")
	held := func() float64 { return scrape(t).values["caddy_zimage_upload_memory_bytes{}"] }
	base := held()
	var crawlers []<-chan result
	for range 3 {
		crawlers = append(crawlers, crawl(t, 20_000_000, time.Second))
	}
	waitFor(t, "three crawling uploads admitted", func() bool { return held() == base+3*uploadProbe })

	ct, body := multipartBody(t, [][2]string{{"prompt", "make it night"}}, map[string][]byte{"image": paddedPNG(t, 19<<20)})
	if status, _, raw := postEdit(t, ct, body); status != http.StatusOK {
		t.Fatalf("a 19 MiB edit beside three crawling uploads: %d %s", status, raw)
	}
	for i, ch := range crawlers {
		select {
		case r := <-ch:
			t.Errorf("crawler %d answered before the edit's end: %d %s %v", i, r.status, r.body, r.err)
		default:
		}
	}
	if got := held(); got != base+3*uploadProbe {
		t.Errorf("upload_memory_bytes %v after the edit, want the crawlers' %v", got, base+3*uploadProbe)
	}
}

// Two sites share one upload budget: the process's, as large as the
// largest max_upload_memory. Two uploads on one site hold it all; an
// upload to the other site waits, then gets 429.
func TestUploadsOneBudgetForTwoSites(t *testing.T) {
	up := newFakeUpstream(t)
	g := newGate(t)
	up.setHandler(g.handler)
	dir := t.TempDir()
	site := func(host, mem string) string {
		return fmt.Sprintf("http://%s:%d {\n%s\n}\n", host, httpPort, opsSite(up.endpoint(), nil, "timeout 10s\n\t\tqueue_timeout 1s", fmt.Sprintf(`max_upload 1MiB
	max_upload_memory %s
	model Z-Image
	model Edit {
		model_index 19
		edit
	}
	store {
		storage file_system %s
	}`, mem, dir))+"\nmetrics /metrics")
	}
	startCaddyRaw(t, globals()+"\n"+site("one.localhost", "2MiB")+site("two.localhost", "1MiB"))
	held := func() float64 { return scrape(t, "one.localhost").values["caddy_zimage_upload_memory_bytes{}"] }
	base := held()
	ct, body := multipartBody(t, [][2]string{{"prompt", "x"}}, map[string][]byte{"image": paddedPNG(t, 900<<10)})
	send := func(host string, b *heldBody) <-chan result {
		ch := make(chan result, 1)
		go func() {
			defer b.let()
			conn := rawRequest(t, host, "/v1/images/edits", ct, len(b.data))
			go io.Copy(conn, b)
			r := readRaw(conn)
			b.let()
			ch <- r
		}()
		return ch
	}
	a, b := newHeldBody(body.Bytes(), 300<<10), newHeldBody(body.Bytes(), 300<<10)
	ra, rb := send("one.localhost", a), send("one.localhost", b)
	waitFor(t, "two uploads of the first site holding the budget", func() bool { return held() == base+float64(2*body.Len()) })

	c := newHeldBody(body.Bytes(), 512<<10)
	r := await(t, send("two.localhost", c))
	if r.status != http.StatusTooManyRequests || c.waited.Load() {
		t.Errorf("the second site's upload: %d (waited for: %v) %s", r.status, c.waited.Load(), r.body)
	}
	a.let()
	b.let()
	waitFor(t, "both edits at the service", func() bool { return up.active.Load() == 2 })
	g.open()
	for _, ch := range []<-chan result{ra, rb} {
		if r := await(t, ch); r.status != http.StatusOK {
			t.Errorf("held upload: %d %s", r.status, r.body)
		}
	}
	if got := held(); got != base {
		t.Errorf("upload_memory_bytes %v at the end, want %v", got, base)
	}
}

// A body over the limit gets its 413 even when the client reads its answer
// only after sending the whole body: the gateway answers, then reads and
// discards the rest before it closes, so the kernel has nothing to reset.
func TestUploadsTooLargeIsAnswered(t *testing.T) {
	f := newEditFake(t)
	editSite(t, f, "on", "")
	junk := bytes.Repeat([]byte("0123456789abcdef"), (30<<20)/16)
	for _, c := range []struct{ path, ct string }{
		{"/v1/images/edits", "multipart/form-data; boundary=x"},
		{"/v1/chat/completions", "application/json"},
		{"/v1/responses", "application/json"},
	} {
		for i := range 20 {
			conn := rawRequest(t, "", c.path, c.ct, len(junk))
			if _, err := conn.Write(junk); err != nil {
				t.Fatalf("%s, try %d: sending the body: %v", c.path, i, err)
			}
			r := readRaw(conn)
			conn.Close()
			if r.err != nil || r.status != http.StatusRequestEntityTooLarge || !strings.EqualFold(r.header.Get("Connection"), "close") {
				t.Fatalf("%s, try %d: %d %v %v %s", c.path, i, r.status, r.err, r.header, r.body)
			}
		}
	}
}
