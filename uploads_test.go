package zimage

import (
	"bufio"
	"bytes"
	"encoding/base64"
	"encoding/json"
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

// Issue 15 item 3: a chat body without an image is held to max_body before
// it is parsed, and a large one is refused without being read whole; one
// with an image may be max_upload large, base64 and all, and is decoded
// exactly (also from an encoder that escapes '/').
func TestUploadsChatBodies(t *testing.T) {
	f := newEditFake(t)
	editSite(t, f, "on", "")
	textBody := func(n int) []byte {
		b, _ := json.Marshal(map[string]any{"messages": []any{map[string]any{"role": "user", "content": strings.Repeat("a cat ", n/6)}}})
		return b
	}
	// 1.06 MiB of text: 413, not a 400 about the prompt's length
	status, hdr, raw := do(t, http.MethodPost, "/v1/chat/completions", string(textBody(1111000)))
	itWantErr(t, status, hdr, raw, 413, "request_too_large")

	// 19 MiB of text: 413 while the client is still sending it
	big := newHeldBody(textBody(19<<20), 2<<20)
	r := await(t, postHeld("/v1/chat/completions", "application/json", testClientKey, big))
	if r.status != http.StatusRequestEntityTooLarge || big.waited.Load() {
		t.Errorf("19 MiB of text: %d (waited for the body: %v) %s", r.status, big.waited.Load(), r.body)
	}

	// an image beyond max_body: the service downloads the very bytes
	src := paddedPNG(t, 3<<20)
	b64 := base64.StdEncoding.EncodeToString(src)
	for name, url := range map[string]string{
		"plain":     "data:image/png;base64," + b64,
		"unpadded":  "data:image/png;base64," + strings.TrimRight(b64, "="),
		"escaped /": "data:image/png;base64," + b64,
	} {
		t.Run(name, func(t *testing.T) {
			body := chatWithImage(t, "make it night", url)
			if name == "escaped /" {
				body = strings.ReplaceAll(body, "/", `\/`)
			}
			if len(body) < 1<<20 {
				t.Fatal("the body is within max_body")
			}
			_, before := f.got()
			content := itOK(t, body)
			_, sources := f.got()
			if len(sources) != len(before)+1 || !bytes.Equal(sources[len(before)], src) {
				t.Fatalf("the service did not get the attached image")
			}
			if !strings.Contains(content, "**✏️ Edit Instruction:**\nmake it night") {
				t.Errorf("content %q", content)
			}
		})
	}

	// an image in an older message only: still a 413 beyond max_body
	old := map[string]any{"messages": []any{
		map[string]any{"role": "user", "content": []any{map[string]any{"type": "image_url", "image_url": map[string]any{"url": "data:image/png;base64," + b64}}}},
		map[string]any{"role": "user", "content": "a cat"},
	}}
	ob, _ := json.Marshal(old)
	status, hdr, raw = do(t, http.MethodPost, "/v1/chat/completions", string(ob))
	itWantErr(t, status, hdr, raw, 413, "request_too_large")
}

// The in-place decoder agrees with decodeDataURL on the JSON strings
// clients send, and leaves the rest of the body as it was.
func TestUnitUploadsExtractDataURLs(t *testing.T) {
	img := paddedPNG(t, 40<<10)
	b64 := base64.StdEncoding.EncodeToString(img)
	wrapped := ""
	for i := 0; i < len(b64); i += 76 {
		wrapped += b64[i:min(len(b64), i+76)] + "\r\n"
	}
	for _, tc := range []struct {
		name, url string
		escape    bool // '/' written as \/
		extracted bool
		ok        bool
	}{
		{"padded", "data:image/png;base64," + b64, false, true, true},
		{"unpadded", "data:image/png;base64," + strings.TrimRight(b64, "="), false, true, true},
		{"escaped slashes", "data:image/png;base64," + b64, true, true, true},
		{"line breaks", "data:image/png;base64," + wrapped, false, true, true},
		{"upper-case scheme", "DATA:image/PNG;BASE64," + b64, false, true, true},
		{"bad base64", "data:image/png;base64," + b64[:100] + "!" + b64[101:], false, true, false},
		{"data after padding", "data:image/png;base64," + b64 + "QUJD", false, true, false},
		{"short: left to decodeDataURL", "data:image/png;base64," + b64[:1000], false, false, true},
		{"not an image type", "data:text/plain;base64," + b64, false, false, false},
		{"not base64", "data:image/png," + b64, false, false, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			body, _ := json.Marshal(map[string]any{"prompt": "data:image/png;base64," + b64, "messages": []any{map[string]any{"role": "user", "content": []any{
				map[string]any{"type": "text", "text": `say "url":"data:image/png;base64,` + b64[:20000] + `"`},
				map[string]any{"type": "image_url", "image_url": map[string]any{"url": tc.url}},
			}}}})
			if tc.escape {
				body = bytes.ReplaceAll(body, []byte("/"), []byte(`\/`))
			}
			want, wantErr := decodeDataURL(tc.url, 1<<20, "p")
			js, x := extractDataURLs(append([]byte(nil), body...))
			var req chatRequest
			if e := decodeJSON(js, &req); e != nil {
				t.Fatalf("the JSON left is not JSON: %v", e)
			}
			req.dataURLs = x
			if prompt, _, _ := chatPrompt(&req); !strings.HasPrefix(*req.Prompt, "data:image/png;base64,") || prompt != *req.Prompt {
				t.Errorf("the prompt changed: %.60q", *req.Prompt)
			}
			g := &Gateway{MaxUpload: 1 << 20}
			got, gotErr := g.chatImage(&req)
			if tc.extracted != (x != nil && len(x.images) == 1) {
				t.Errorf("extracted: %v, want %v", x != nil, tc.extracted)
			}
			if (gotErr == nil) != tc.ok || (wantErr == nil) != tc.ok {
				t.Fatalf("errors: in place %v, decodeDataURL %v; want ok %v", gotErr, wantErr, tc.ok)
			}
			if tc.ok && (!bytes.Equal(got.data, want.data) || got.width != want.width || tc.extracted && !bytes.Equal(got.data, img)) {
				t.Errorf("decoded differently")
			}
			if !tc.ok && gotErr.message != wantErr.message {
				t.Errorf("message %q, decodeDataURL's %q", gotErr.message, wantErr.message)
			}
		})
	}
}

// Whatever the base64, decoding in place never writes where it has not
// yet read, and agrees with the standard decoder whenever that accepts it.
func FuzzUploadsBase64InPlace(f *testing.F) {
	for _, s := range []string{"", "QQ", "QQ==", "QUJD", "QUJDRA==", "QQ=\n", "Q=Q", "QU\nJD", "////", "+/+/"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, payload string) {
		raw, _ := json.Marshal(payload)
		s := raw[1 : len(raw)-1]
		buf := append([]byte(nil), s...)
		n, ok := decodeBase64InPlace(buf)
		p := strings.TrimRight(payload, "=")
		want, err := base64.StdEncoding.DecodeString(p)
		if err != nil {
			want, err = base64.RawStdEncoding.DecodeString(p)
		}
		if err == nil && !bytes.Contains(s, []byte(`\u`)) && !bytes.Contains(s, []byte(`\t`)) {
			if !ok || !bytes.Equal(buf[:n], want) {
				t.Fatalf("%q: in place %v %x, standard %x", payload, ok, buf[:n], want)
			}
		}
		if ok && n > len(s) {
			t.Fatalf("%q: %d bytes out of %d", payload, n, len(s))
		}
	})
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

// A body that sends less than min_upload_rate over a window, after a
// first window that is free, is cut with 408 and its share returned. The
// window is shortened here; in service it is 10 s.
func TestUploadsMinimumRate(t *testing.T) {
	old := uploadRateWindow
	uploadRateWindow = 100 * time.Millisecond
	t.Cleanup(func() { uploadRateWindow = old })
	f := newEditFake(t)
	editSite(t, f, "on", "")
	held := func() float64 { return scrape(t).values["caddy_zimage_upload_memory_bytes{}"] }
	base := held()

	start := time.Now()
	r := <-crawl(t, 20_000_000, 10*time.Millisecond)
	if r.err != nil || r.status != http.StatusRequestTimeout || !strings.EqualFold(r.header.Get("Connection"), "close") {
		t.Fatalf("crawling upload: %d %v %v %s", r.status, r.err, r.header, r.body)
	}
	if e := apiErr(t, r.body); !strings.Contains(e.Message, "min_upload_rate") {
		t.Errorf("message %q", e.Message)
	}
	if d := time.Since(start); d < 2*uploadRateWindow {
		t.Errorf("cut after %v, within the first two windows", d)
	}
	waitFor(t, "the crawler's share returned", func() bool { return held() == base })

	// a client that sends nothing after its head is cut too
	conn := rawRequest(t, "", "/v1/chat/completions", "application/json", 20_000_000)
	if r := readRaw(conn); r.status != http.StatusRequestTimeout {
		t.Errorf("silent chat body: %d %v %s", r.status, r.err, r.body)
	}

	// a fast upload is not
	ct, body := multipartBody(t, [][2]string{{"prompt", "x"}}, map[string][]byte{"image": paddedPNG(t, 3<<20)})
	if status, _, raw := postEdit(t, ct, body); status != http.StatusOK {
		t.Errorf("fast upload: %d %s", status, raw)
	}

	var g Gateway
	if err := g.UnmarshalCaddyfile(caddyfile.NewTestDispenser("zimage_gateway {\n min_upload_rate 1MiB/s\n}")); err != nil || g.MinUploadRate != 1<<20 {
		t.Errorf("parsed %d, %v", g.MinUploadRate, err)
	}
	if err := new(Gateway).UnmarshalCaddyfile(caddyfile.NewTestDispenser("zimage_gateway {\n min_upload_rate off\n}")); err != nil {
		t.Errorf("off: %v", err)
	}
	if err := new(Gateway).UnmarshalCaddyfile(caddyfile.NewTestDispenser("zimage_gateway {\n min_upload_rate slow\n}")); err == nil || !strings.Contains(err.Error(), "min_upload_rate") {
		t.Errorf("bad rate: %v", err)
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

// A chat image part keyed "URL" (encoding/json matches keys without
// regard to case) is read in place like "url", not decoded whole by the
// JSON decoder; a data: URL the in-place reader cannot read in an upload
// is refused rather than decoded outside the budget.
func TestUploadsImageKeyCase(t *testing.T) {
	b64 := base64.StdEncoding.EncodeToString(paddedPNG(t, 64<<10))
	for _, key := range []string{`"URL"`, `"Url"`, `"\u0055RL"`, `"IMAGE_URL"`} {
		body := []byte(`{"images":[{` + key + `:"data:image/png;base64,` + b64 + `"}]}`)
		if key != `"IMAGE_URL"` {
			body = []byte(`{"messages":[{"role":"user","content":[{"type":"image_url","image_url":{` + key + `:"data:image/png;base64,` + b64 + `"}}]}]}`)
		}
		js, urls := extractDataURLs(bytes.Clone(body))
		if urls == nil || len(urls.images) != 1 || len(js) > 1000 {
			t.Errorf("key %s: not read in place (%d bytes of JSON left)", key, len(js))
		}
	}

	f := newEditFake(t)
	editSite(t, f, "on", "")
	src := paddedPNG(t, 3<<20)
	body := strings.Replace(chatWithImage(t, "make it night", "data:image/png;base64,"+base64.StdEncoding.EncodeToString(src)), `"url"`, `"URL"`, 1)
	itOK(t, body)
	if _, sources := f.got(); len(sources) == 0 || !bytes.Equal(sources[len(sources)-1], src) {
		t.Errorf("the service did not get the image sent under \"URL\"")
	}
	escaped := strings.Replace(body, "data:image/png", `data:image\u002fpng`, 1)
	status, hdr, raw := do(t, http.MethodPost, "/v1/chat/completions", escaped)
	itWantErr(t, status, hdr, raw, 400, "invalid_request")
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
