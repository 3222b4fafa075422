// Command b64mem measures how much a burst of b64_json requests raises the
// gateway's memory: CLIENTS simultaneous
// /v1/images/generations requests with n=N and response_format b64_json,
// against a fake image service whose images are SIZE bytes. It starts the
// given Caddy binary with the gateway, samples the process's RSS while the
// burst runs, and prints the baseline, the peak and the rise.
//
//	go build -o /tmp/caddy ./cmd/caddy
//	go run ./bench/b64mem -caddy /tmp/caddy -max-concurrent 4
package main

import (
	"bytes"
	"crypto/rand"
	"encoding/base64"
	"encoding/binary"
	"encoding/json"
	"flag"
	"fmt"
	"hash/crc32"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/caddy-zimage/caddy-zimage/bench/internal/proc"
)

func main() {
	caddyBin := flag.String("caddy", "", "Caddy binary with the zimage_gateway module (go build ./cmd/caddy)")
	clients := flag.Int("clients", 30, "simultaneous requests")
	n := flag.Int("n", 4, "images per request")
	size := flag.Int("size", 8<<20, "bytes per image")
	maxConc := flag.Int("max-concurrent", 4, "the upstream's max_concurrent")
	delay := flag.Duration("delay", 200*time.Millisecond, "how long a generation takes")
	format := flag.String("format", "b64_json", `the response_format sent; "none" sends none, so the gateway's default applies`)
	proxy := flag.Bool("reverse-proxy", false, "measure Caddy's reverse_proxy passing the same images instead (n GETs per client)")
	flag.Parse()
	if *caddyBin == "" {
		proc.Fail("-caddy is required")
	}

	// one image, served for every URL: a PNG signature and a header that
	// parses (1024×1024), as the gateway checks every image it returns,
	// then random bytes
	img := make([]byte, *size)
	rand.Read(img)
	hdr := []byte("\x89PNG\r\n\x1a\n\x00\x00\x00\x0dIHDR\x00\x00\x04\x00\x00\x00\x04\x00\x08\x06\x00\x00\x00")
	hdr = binary.BigEndian.AppendUint32(hdr, crc32.ChecksumIEEE(hdr[12:]))
	copy(img, hdr)
	var downloads atomic.Int64
	fake := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method == http.MethodGet {
			downloads.Add(1)
			w.Header().Set("Content-Type", "image/png")
			w.Header().Set("Content-Length", strconv.Itoa(len(img)))
			w.Write(img)
			return
		}
		io.Copy(io.Discard, r.Body)
		time.Sleep(*delay)
		w.Header().Set("Content-Type", "application/json")
		fmt.Fprintf(w, `{"success":true,"data":{"image_url":"http://%s/img.png"}}`, r.Host)
	})}
	fl, err := net.Listen("tcp", "127.0.0.1:0")
	proc.Check(err)
	go fake.Serve(fl)

	port := proc.FreePort()
	dir, err := os.MkdirTemp("", "b64mem-")
	proc.Check(err)
	defer os.RemoveAll(dir)
	site := fmt.Sprintf(`reverse_proxy %s`, fl.Addr())
	if !*proxy {
		site = ""
	}
	cfg := fmt.Sprintf(`{
	admin off
	log {
		level ERROR
	}
}
http://127.0.0.1:%d {
	%s
	zimage_gateway {
		api_key sk-bench
		upstream http://%s/api/v1/generate_image {
			api_key sd-bench
			max_concurrent %d
			timeout 120s
		}
		enhance off
	}
}
`, port, site, fl.Addr(), *maxConc)
	cf := filepath.Join(dir, "Caddyfile")
	proc.Check(os.WriteFile(cf, []byte(cfg), 0o600))
	cmd := exec.Command(*caddyBin, "run", "--config", cf, "--adapter", "caddyfile")
	cmd.Env = append(os.Environ(), "XDG_DATA_HOME="+dir, "XDG_CONFIG_HOME="+dir)
	cmd.Stderr = os.Stderr
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	proc.Check(cmd.Start())
	defer cmd.Process.Kill()
	base := fmt.Sprintf("http://127.0.0.1:%d", port)
	proc.WaitUp(base)

	// warm up: one request of the same shape, so the baseline includes the
	// code paths, pools and TLS-free connections a steady gateway has
	body := fmt.Sprintf(`{"prompt":"a cat","n":%d,"response_format":%q}`, *n, *format)
	if *format == "none" {
		body = fmt.Sprintf(`{"prompt":"a cat","n":%d}`, *n)
	}
	if *proxy {
		post = func(base, _ string, n int, img []byte) error { return getN(base, n, img) }
	}
	if err := post(base, body, *n, img); err != nil {
		proc.Fail("warm-up: " + err.Error())
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
	start := time.Now()
	var wg sync.WaitGroup
	var ok, bad atomic.Int64
	var firstErr atomic.Value
	for range *clients {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := post(base, body, *n, img); err != nil {
				bad.Add(1)
				firstErr.CompareAndSwap(nil, err.Error())
				return
			}
			ok.Add(1)
		}()
	}
	wg.Wait()
	wall := time.Since(start)
	close(stop)
	sampler.Wait()
	rise := peak.Load() - baseline
	fmt.Printf("clients=%d n=%d image=%.1fMiB max_concurrent=%d: %d/%d answered in full in %.1fs; downloads %d; RSS baseline %.1f MB, peak %.1f MB, rise %.1f MB\n",
		*clients, *n, float64(*size)/(1<<20), *maxConc, ok.Load(), *clients, wall.Seconds(), downloads.Load()-int64(*n),
		proc.MB(baseline), proc.MB(peak.Load()), proc.MB(rise))
	if v := firstErr.Load(); v != nil {
		fmt.Println("first error:", v)
	}
	if bad.Load() > 0 {
		os.Exit(1)
	}
}

// post sends one request and checks that every image decodes to img (or,
// for a request without response_format b64_json, comes by URL).
var post = postB64

// getN fetches the image n times in parallel through the proxy.
func getN(base string, n int, img []byte) error {
	errs := make(chan error, n)
	for range n {
		go func() {
			resp, err := http.Get(base + "/img.png")
			if err != nil {
				errs <- err
				return
			}
			defer resp.Body.Close()
			b, err := io.ReadAll(resp.Body)
			if err == nil && !bytes.Equal(b, img) {
				err = fmt.Errorf("proxied image differs")
			}
			errs <- err
		}()
	}
	for range n {
		if err := <-errs; err != nil {
			return err
		}
	}
	return nil
}

func postB64(base, body string, n int, img []byte) error {
	req, _ := http.NewRequest(http.MethodPost, base+"/v1/images/generations", strings.NewReader(body))
	req.Header.Set("Authorization", "Bearer sk-bench")
	req.Header.Set("Content-Type", "application/json")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	var ans struct {
		Data []struct {
			B64JSON string `json:"b64_json"`
			URL     string `json:"url"`
		} `json:"data"`
	}
	if resp.StatusCode != http.StatusOK {
		b, _ := io.ReadAll(io.LimitReader(resp.Body, 500))
		return fmt.Errorf("status %d: %s", resp.StatusCode, b)
	}
	if err := json.NewDecoder(resp.Body).Decode(&ans); err != nil {
		return err
	}
	if len(ans.Data) != n {
		return fmt.Errorf("%d images, want %d", len(ans.Data), n)
	}
	for _, d := range ans.Data {
		if d.B64JSON == "" && d.URL != "" && !strings.Contains(body, "b64_json") {
			continue // an answer by URL alone, which is what was asked
		}
		b, err := base64.StdEncoding.DecodeString(d.B64JSON)
		if err != nil || !bytes.Equal(b, img) {
			return fmt.Errorf("an image does not decode to the served bytes (%v)", err)
		}
	}
	return nil
}
