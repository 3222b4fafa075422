// Command uploadmem measures how much a burst of uploads raises the
// gateway's memory: CLIENTS simultaneous edits of a
// valid PNG of about 19 MiB (-mode edits: multipart /v1/images/edits), or
// chats whose last user message carries a PNG of about 14 MiB as a data:
// URL (-mode chat), against a fake image service that takes -delay per
// call, with the store on a file_system. It starts the given Caddy binary,
// samples the process's RSS while the burst runs, and prints the
// baseline, the peak, the rise and how the requests were answered.
//
//	go build -o /tmp/caddy ./cmd/caddy
//	go run ./bench/uploadmem -caddy /tmp/caddy -mode edits
//	go run ./bench/uploadmem -caddy /tmp/caddy -mode chat
//	go run ./bench/uploadmem -caddy /tmp/caddy -mode edits -crawlers 3
//	go run ./bench/uploadmem -caddy /tmp/caddy -mode edits -sites 2
//	go run ./bench/uploadmem -caddy /tmp/caddy -mode chat -key URL
//
// -crawlers keeps that many uploads crawling beside the burst (each
// announces 20 MB and sends a byte a second); -sites spreads the burst
// over that many sites of one Caddy, each with its own gateway; -key is
// the key of the chat image part's URL.
package main

import (
	"bytes"
	"crypto/rand"
	"encoding/base64"
	"encoding/json"
	"flag"
	"fmt"
	"image"
	"image/png"
	"io"
	"mime/multipart"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/caddy-zimage/caddy-zimage/bench/internal/proc"
)

func main() {
	caddyBin := flag.String("caddy", "", "Caddy binary with the zimage_gateway module (go build ./cmd/caddy)")
	mode := flag.String("mode", "edits", "edits (multipart uploads) or chat (data: URLs)")
	clients := flag.Int("clients", 30, "simultaneous requests")
	side := flag.Int("side", 0, "the PNG's width and height in pixels; default 2600 (edits, ~19 MiB) or 2200 (chat, ~14 MiB)")
	maxConc := flag.Int("max-concurrent", 4, "the upstream's max_concurrent")
	delay := flag.Duration("delay", 3*time.Second, "how long a generation takes")
	extra := flag.String("extra", "", "more lines for the zimage_gateway block (e.g. max_upload_memory 64MiB)")
	crawlers := flag.Int("crawlers", 0, "uploads that crawl beside the burst (20 MB announced, a byte a second)")
	sites := flag.Int("sites", 1, "sites the burst is spread over, each with its own gateway")
	key := flag.String("key", "url", "chat mode: the key of the image part's URL")
	flag.Parse()
	if *caddyBin == "" {
		proc.Fail("-caddy is required")
	}
	if *side == 0 {
		*side = map[bool]int{true: 2200, false: 2600}[*mode == "chat"]
	}
	src := noisePNG(*side)

	// the image service: an edit answers, after delay, with a small PNG it
	// serves itself (which the store copies)
	result := noisePNG(16)
	var calls atomic.Int64
	fake := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method == http.MethodGet {
			w.Header().Set("Content-Type", "image/png")
			w.Write(result)
			return
		}
		calls.Add(1)
		io.Copy(io.Discard, r.Body)
		time.Sleep(*delay)
		w.Header().Set("Content-Type", "application/json")
		fmt.Fprintf(w, `{"success":true,"data":{"image_url":"http://%s/edited-%d.png"}}`, r.Host, calls.Load())
	})}
	fl, err := net.Listen("tcp", "127.0.0.1:0")
	proc.Check(err)
	go fake.Serve(fl)

	port := proc.FreePort()
	dir, err := os.MkdirTemp("", "uploadmem-")
	proc.Check(err)
	defer os.RemoveAll(dir)
	cfg := `{
	admin off
	log {
		level ERROR
	}
}
`
	for i := range *sites {
		cfg += fmt.Sprintf(`http://site%d.localhost:%d {
	zimage_gateway {
		api_key sk-bench
		upstream http://%s/api/v1/generate_image {
			api_key sd-bench
			max_concurrent %d
			timeout 120s
		}
		enhance off
		model Z-Image
		model Edit {
			model_index 19
			edit
		}
		store {
			storage file_system %s
		}
		%s
	}
}
`, i, port, fl.Addr(), *maxConc, filepath.Join(dir, "store"), *extra)
	}
	cf := filepath.Join(dir, "Caddyfile")
	proc.Check(os.WriteFile(cf, []byte(cfg), 0o600))
	cmd := exec.Command(*caddyBin, "run", "--config", cf, "--adapter", "caddyfile")
	cmd.Env = append(os.Environ(), "XDG_DATA_HOME="+dir, "XDG_CONFIG_HOME="+dir)
	cmd.Stderr = os.Stderr
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	proc.Check(cmd.Start())
	defer cmd.Process.Kill()
	base := fmt.Sprintf("http://127.0.0.1:%d", port)
	proc.WaitUp(base + "/site0") // any answer: Caddy is up

	// one body, built beforehand and sent by every request, so the
	// clients' own work is not in the measured time
	var ct, path string
	var body []byte
	switch *mode {
	case "edits":
		var b bytes.Buffer
		mw := multipart.NewWriter(&b)
		mw.WriteField("prompt", "make it night")
		fw, _ := mw.CreateFormFile("image", "source.png")
		fw.Write(src)
		mw.Close()
		ct, path, body = mw.FormDataContentType(), "/v1/images/edits", b.Bytes()
	case "chat":
		msg := map[string]any{"role": "user", "content": []any{
			map[string]any{"type": "text", "text": "make it night"},
			map[string]any{"type": "image_url", "image_url": map[string]any{"url": "data:image/png;base64," + base64.StdEncoding.EncodeToString(src)}},
		}}
		body, _ = json.Marshal(map[string]any{"model": "Z-Image", "messages": []any{msg}})
		body = []byte(strings.Replace(string(body), `"url":"data:`, `"`+*key+`":"data:`, 1))
		ct, path = "application/json", "/v1/chat/completions"
	default:
		proc.Fail("-mode is edits or chat")
	}
	var sent atomic.Int64
	send := func() (int, error) {
		req, _ := http.NewRequest(http.MethodPost, base+path, bytes.NewReader(body))
		req.Host = fmt.Sprintf("site%d.localhost:%d", sent.Add(1)%int64(*sites), port)
		req.Header.Set("Authorization", "Bearer sk-bench")
		req.Header.Set("Content-Type", ct)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			return 0, err
		}
		defer resp.Body.Close()
		msg, _ := io.ReadAll(io.LimitReader(resp.Body, 300))
		if resp.StatusCode != http.StatusOK && resp.StatusCode != http.StatusTooManyRequests {
			return resp.StatusCode, fmt.Errorf("status %d: %s", resp.StatusCode, msg)
		}
		return resp.StatusCode, nil
	}

	// warm up: one request of the same shape
	if code, err := send(); err != nil || code != http.StatusOK {
		proc.Fail(fmt.Sprintf("warm-up: %d %v", code, err))
	}
	time.Sleep(500 * time.Millisecond)
	baseline := proc.RSS(cmd.Process.Pid)

	var peak atomic.Int64
	stop := make(chan struct{})
	var sampler sync.WaitGroup
	sampler.Add(1)
	go func() {
		defer sampler.Done()
		for {
			if v := proc.RSS(cmd.Process.Pid); v > peak.Load() {
				peak.Store(v)
			}
			select {
			case <-stop:
				return
			case <-time.After(5 * time.Millisecond):
			}
		}
	}()
	var crawled []net.Conn
	for range *crawlers {
		crawled = append(crawled, crawl(port, path, ct))
	}
	time.Sleep(500 * time.Millisecond) // the crawlers admitted
	start := time.Now()
	var wg sync.WaitGroup
	var ok, limited, bad atomic.Int64
	var firstErr atomic.Value
	for range *clients {
		wg.Add(1)
		go func() {
			defer wg.Done()
			code, err := send()
			switch {
			case err != nil:
				bad.Add(1)
				firstErr.CompareAndSwap(nil, err.Error())
			case code == http.StatusOK:
				ok.Add(1)
			default:
				limited.Add(1)
			}
		}()
	}
	wg.Wait()
	wall := time.Since(start)
	crawlersAnswered := 0
	for _, c := range crawled {
		c.SetReadDeadline(time.Now().Add(10 * time.Millisecond))
		if n, _ := c.Read(make([]byte, 1)); n > 0 {
			crawlersAnswered++
		}
		c.Close()
	}
	close(stop)
	sampler.Wait()
	fmt.Printf("mode=%s key=%s sites=%d crawlers=%d (answered during the burst: %d) clients=%d image=%.1fMiB body=%.1fMiB max_concurrent=%d delay=%v: %d ok, %d 429, %d other in %.1fs; RSS baseline %.1f MB, peak %.1f MB, rise %.1f MB\n",
		*mode, *key, *sites, *crawlers, crawlersAnswered, *clients, float64(len(src))/(1<<20), float64(len(body))/(1<<20), *maxConc, *delay,
		ok.Load(), limited.Load(), bad.Load(), wall.Seconds(), proc.MB(baseline), proc.MB(peak.Load()), proc.MB(peak.Load()-baseline))
	if v := firstErr.Load(); v != nil {
		fmt.Println("first error:", v)
	}
	if bad.Load() > 0 {
		os.Exit(1)
	}
}

// noisePNG is a valid side×side PNG that does not compress: random RGB
// pixels, stored without compression (about 3 bytes a pixel).
func noisePNG(side int) []byte {
	img := image.NewRGBA(image.Rect(0, 0, side, side))
	rand.Read(img.Pix)
	for i := 3; i < len(img.Pix); i += 4 {
		img.Pix[i] = 0xff // opaque: encoded as RGB
	}
	var b bytes.Buffer
	proc.Check((&png.Encoder{CompressionLevel: png.NoCompression}).Encode(&b, img))
	return b.Bytes()
}

// crawl opens an upload that announces 20 MB and sends its head and then
// a byte a second, until its connection is closed.
func crawl(port int, path, ct string) net.Conn {
	c, err := net.Dial("tcp", fmt.Sprintf("127.0.0.1:%d", port))
	proc.Check(err)
	fmt.Fprintf(c, "POST %s HTTP/1.1\r\nHost: site0.localhost:%d\r\nAuthorization: Bearer sk-bench\r\nContent-Type: %s\r\nContent-Length: 20000000\r\n\r\n", path, port, ct)
	go func() {
		for {
			if _, err := c.Write([]byte{'-'}); err != nil {
				return
			}
			time.Sleep(time.Second)
		}
	}()
	return c
}
