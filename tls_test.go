package zimage

// HTTPS as users run it: a real Caddy serves the gateway
// on a site name with `tls internal`, Caddy's local CA standing in for ACME
// on a machine without internet; the client trusts that CA's root, read
// from Caddy's own PKI app through the admin API. openai-go talks HTTP/2 to
// it: chat, a streamed chat, the Images API, an edit upload. Stored image
// URLs are https:// on the site's name, and a plain http:// POST gets
// Caddy's redirect.

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/openai/openai-go/v3"
	"github.com/openai/openai-go/v3/option"
)

// protoRecorder notes the protocol of every response it carries.
type protoRecorder struct {
	base   http.RoundTripper
	mu     sync.Mutex
	protos map[string]int
}

func (p *protoRecorder) RoundTrip(req *http.Request) (*http.Response, error) {
	resp, err := p.base.RoundTrip(req)
	if err == nil {
		p.mu.Lock()
		p.protos[resp.Proto]++
		p.mu.Unlock()
	}
	return resp, err
}

func (p *protoRecorder) seen() map[string]int {
	p.mu.Lock()
	defer p.mu.Unlock()
	out := map[string]int{}
	for k, v := range p.protos {
		out[k] = v
	}
	return out
}

// localCARoots reads the root of Caddy's local CA ("tls internal") from
// the PKI app, through the admin API.
func localCARoots(t *testing.T) *x509.CertPool {
	t.Helper()
	resp, err := testClient(10 * time.Second).Get(fmt.Sprintf("http://localhost:%d/pki/ca/local", adminPort))
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var ca struct {
		Root string `json:"root_certificate"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&ca); err != nil || resp.StatusCode != 200 {
		t.Fatalf("GET /pki/ca/local: %d %v", resp.StatusCode, err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM([]byte(ca.Root)) {
		t.Fatalf("no root certificate in %q", ca.Root)
	}
	return pool
}

func TestTLSInternalOpenAIOverHTTP2(t *testing.T) {
	up := newFakeUpstream(t)
	img := storeTestPNG(t, 64, 48)
	gate := newStreamGate(t)
	up.setHandler(func(w http.ResponseWriter, r *http.Request) {
		if r.Method == http.MethodGet {
			w.Header().Set("Content-Type", "image/png")
			w.Write(img)
			return
		}
		raw, _ := io.ReadAll(r.Body)
		if bytes.Contains(raw, []byte("slowcanary")) && !gate.wait(r) {
			return
		}
		writeUpstreamOK(w, up.URL+"/image.png")
	})
	// Caddy's storage (its local CA, the certificate) and the store in
	// the test's own directory; the keys as {env.*} placeholders, as the
	// README says to write them: with automatic HTTPS on, Caddy logs the
	// adjusted config at debug level, placeholders and all
	data := t.TempDir()
	t.Setenv("ZIMAGE_TLS_CLIENT_KEY", testClientKey)
	t.Setenv("ZIMAGE_TLS_SD_KEY", testSDKey)
	cfg := strings.TrimSuffix(globals(), "}") + "\tstorage file_system " + data + "\n}\n" + fmt.Sprintf(`
https://localhost {
	tls internal
	zimage_gateway {
		api_key {env.ZIMAGE_TLS_CLIENT_KEY}
		upstream %s {
			api_key {env.ZIMAGE_TLS_SD_KEY}
			timeout 10s
		}
		enhance off
		stream_keepalive 50ms
		model Z-Image
		model Qwen-Image-Edit {
			model_index 19
			edit
		}
		store
	}
}
`, up.endpoint())
	startCaddyRaw(t, cfg)

	rec := &protoRecorder{protos: map[string]int{}, base: &http.Transport{
		TLSClientConfig:   &tls.Config{RootCAs: localCARoots(t), ServerName: "localhost"},
		ForceAttemptHTTP2: true, // a custom TLS config turns it off otherwise
	}}
	client := &http.Client{Timeout: 30 * time.Second, Transport: recordingTransport{base: rec}}
	site := fmt.Sprintf("https://localhost:%d", httpsPort)

	// the certificate is issued in the background after the load
	deadline := time.Now().Add(20 * time.Second)
	for {
		resp, err := client.Get(site + "/v1/models")
		if err == nil {
			resp.Body.Close()
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("no TLS answer from %s: %v", site, err)
		}
		time.Sleep(50 * time.Millisecond) // polling, bounded by the deadline
	}

	sdk := openai.NewClient(option.WithBaseURL(site+"/v1/"), option.WithAPIKey(testClientKey),
		option.WithHTTPClient(client), option.WithMaxRetries(0))
	ctx := context.Background()
	stored := regexp.MustCompile(fmt.Sprintf(`https://localhost:%d/v1/zimage/images/[0-9a-f]{32}\.png`, httpsPort))

	// chat
	params := openai.ChatCompletionNewParams{Model: "Z-Image", Messages: []openai.ChatCompletionMessageParamUnion{openai.UserMessage("a lighthouse no-enhance")}}
	res, err := sdk.Chat.Completions.New(ctx, params)
	if err != nil {
		t.Fatal(err)
	}
	if c := res.Choices[0].Message.Content; !stored.MatchString(c) {
		t.Errorf("chat over TLS: the image is not an https:// URL of the site's store:\n%s", c)
	}

	// a streamed chat, through the SDK
	stream := sdk.Chat.Completions.NewStreaming(ctx, params)
	acc := openai.ChatCompletionAccumulator{}
	for stream.Next() {
		acc.AddChunk(stream.Current())
	}
	if err := stream.Err(); err != nil || len(acc.Choices) != 1 || !stored.MatchString(acc.Choices[0].Message.Content) {
		t.Errorf("streamed chat over TLS: %v %+v", err, acc.Choices)
	}

	// keep-alives arrive over HTTP/2 while the service works: the fake
	// answers only after the client has read one
	req, _ := http.NewRequest(http.MethodPost, site+"/v1/chat/completions",
		strings.NewReader(`{"model":"Z-Image","stream":true,"messages":[{"role":"user","content":"slowcanary no-enhance"}]}`))
	req.Header.Set("Authorization", "Bearer "+testClientKey)
	req.Header.Set("Content-Type", "application/json")
	resp, err := client.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	if resp.ProtoMajor != 2 {
		t.Errorf("the stream came over %s, want HTTP/2", resp.Proto)
	}
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	var keepalives int
	var sawImage, done bool
	for sc.Scan() {
		line := sc.Text()
		switch {
		case line == ": keep-alive":
			keepalives++
			gate.open()
		case strings.HasPrefix(line, "data: ") && stored.MatchString(line):
			sawImage = true
		case line == "data: [DONE]":
			done = true
		}
	}
	resp.Body.Close()
	if keepalives == 0 || !sawImage || !done {
		t.Errorf("stream over h2: %d keep-alives, image %v, [DONE] %v", keepalives, sawImage, done)
	}

	// the Images API
	gen, err := sdk.Images.Generate(ctx, openai.ImageGenerateParams{Model: "Z-Image", Prompt: "a fox no-enhance", N: openai.Int(2)})
	if err != nil {
		t.Fatal(err)
	}
	if len(gen.Data) != 2 || !stored.MatchString(gen.Data[0].URL) || !stored.MatchString(gen.Data[1].URL) {
		t.Errorf("images over TLS: %+v", gen.Data)
	}

	// an edit upload (multipart)
	edit, err := sdk.Images.Edit(ctx, openai.ImageEditParams{
		Image:  openai.ImageEditParamsImageUnion{OfFile: openai.File(bytes.NewReader(storeTestPNG(t, 40, 30)), "cat.png", "image/png")},
		Prompt: "make it night",
		Model:  "Qwen-Image-Edit",
	})
	if err != nil {
		t.Fatal(err)
	}
	if len(edit.Data) != 1 || !stored.MatchString(edit.Data[0].URL) {
		t.Errorf("edit over TLS: %+v", edit.Data)
	}
	// a stored image comes back over the same connection
	if r, err := client.Get(gen.Data[0].URL); err != nil || r.StatusCode != 200 || r.Header.Get("Content-Type") != "image/png" {
		t.Errorf("GET %s: %v %v", gen.Data[0].URL, r, err)
	} else {
		r.Body.Close()
	}

	for proto, n := range rec.seen() {
		if proto != "HTTP/2.0" {
			t.Errorf("%d responses over %s, want HTTP/2 only", n, proto)
		}
	}

	// plain http:// to the API: Caddy's redirect to https (308 keeps the
	// method and body), before the gateway sees the request
	plain := &http.Client{Timeout: 10 * time.Second, Transport: recordingTransport{base: &http.Transport{}},
		CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}
	req, _ = http.NewRequest(http.MethodPost, fmt.Sprintf("http://localhost:%d/v1/chat/completions", httpPort), strings.NewReader(`{}`))
	req.Header.Set("Authorization", "Bearer "+testClientKey)
	resp, err = plain.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	// (Caddy names no port when it redirects to its own https_port, which
	// it takes for the public 443: here the test's https_port is another)
	if want := "https://localhost/v1/chat/completions"; resp.StatusCode != http.StatusPermanentRedirect || resp.Header.Get("Location") != want {
		t.Errorf("http:// POST: %d Location %q, want 308 to %s", resp.StatusCode, resp.Header.Get("Location"), want)
	}
	// what the README says of a client configured with http://: openai-go
	// refuses to follow a redirect to another origin, so the call fails
	// with an error rather than reaching the gateway
	calls := len(up.Calls())
	httpSDK := openai.NewClient(option.WithBaseURL(fmt.Sprintf("http://localhost:%d/v1/", httpPort)), option.WithAPIKey(testClientKey),
		option.WithHTTPClient(client), option.WithMaxRetries(0))
	if _, err := httpSDK.Chat.Completions.New(ctx, params); err == nil || !strings.Contains(err.Error(), "origin") {
		t.Errorf("openai-go configured with http://: %v, want its error about the redirect's origin", err)
	}
	if n := len(up.Calls()); n != calls {
		t.Errorf("the http:// call reached the image service")
	}
}
