//go:build unix

package zimage

// Two Caddy processes, one storage (docs/design.md#the-store): how a Caddy cluster already
// shares its certificates. An image generated through the first instance
// is served by the second, which never saw the request that made it; a
// Responses API answer the first keeps is continued through the second.

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// the module's Caddy, built once per test run
var clusterCaddy struct {
	once sync.Once
	bin  string
	err  error
}

// buildCaddy builds ./cmd/caddy once per run; a machine without a Go
// toolchain on PATH skips the test, any other build failure fails it. The
// binary has one place per checkout in the temp directory, replaced by
// each run (written aside and renamed), so runs do not pile up binaries.
func buildCaddy(t *testing.T) string {
	t.Helper()
	clusterCaddy.once.Do(func() {
		if _, err := exec.LookPath("go"); err != nil {
			clusterCaddy.err = fmt.Errorf("skip: no go toolchain on PATH to build ./cmd/caddy: %v", err)
			return
		}
		wd, err := os.Getwd()
		if err != nil {
			clusterCaddy.err = err
			return
		}
		dir := filepath.Join(os.TempDir(), "zimage-test-caddy")
		if err := os.MkdirAll(dir, 0o700); err != nil {
			clusterCaddy.err = err
			return
		}
		bin := filepath.Join(dir, fmt.Sprintf("caddy-%x", sha256.Sum256([]byte(wd)))[:len("caddy-")+12])
		tmp := fmt.Sprintf("%s.%d", bin, os.Getpid())
		out, err := exec.Command("go", "build", "-o", tmp, "./cmd/caddy").CombinedOutput()
		if err == nil {
			err = os.Rename(tmp, bin)
		}
		if err != nil {
			os.Remove(tmp)
			clusterCaddy.err = fmt.Errorf("go build ./cmd/caddy: %v\n%s", err, out)
			return
		}
		clusterCaddy.bin = bin
	})
	if err := clusterCaddy.err; err != nil {
		if strings.HasPrefix(err.Error(), "skip: ") {
			t.Skip(err.Error())
		}
		t.Fatal(err)
	}
	return clusterCaddy.bin
}

// caddyProcess is one `caddy run` in its own process group.
type caddyProcess struct {
	cmd    *exec.Cmd
	port   int
	log    string
	exited chan struct{}
}

// startCaddyProcess runs bin with a Caddyfile serving the gateway on a free
// port, Caddy's own data and config under home, until the test ends.
func startCaddyProcess(t *testing.T, bin, home, name, site string) *caddyProcess {
	t.Helper()
	p := &caddyProcess{port: freePort(), exited: make(chan struct{})}
	dir := t.TempDir()
	cfg := fmt.Sprintf(`{
	admin off
	persist_config off
	auto_https off
	skip_install_trust
	grace_period 1s
}

http://127.0.0.1:%d {
	bind 127.0.0.1
%s
}
`, p.port, site)
	cfgPath := filepath.Join(dir, "Caddyfile")
	if err := os.WriteFile(cfgPath, []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	p.log = filepath.Join(dir, name+".log")
	logf, err := os.Create(p.log)
	if err != nil {
		t.Fatal(err)
	}
	p.cmd = exec.Command(bin, "run", "--config", cfgPath, "--adapter", "caddyfile")
	p.cmd.Env = append(os.Environ(), "HOME="+home, "XDG_DATA_HOME="+filepath.Join(home, "data"), "XDG_CONFIG_HOME="+filepath.Join(home, "config"),
		"GATEWAY_API_KEY=", "SD_API_KEY=", "ENHANCE_OPENAI_API_KEY=")
	p.cmd.Stdout, p.cmd.Stderr = logf, logf
	p.cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := p.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { _ = p.cmd.Wait(); logf.Close(); close(p.exited) }()
	t.Cleanup(func() {
		// the whole group: caddy and anything it started
		_ = syscall.Kill(-p.cmd.Process.Pid, syscall.SIGTERM)
		select {
		case <-p.exited:
		case <-time.After(10 * time.Second):
			_ = syscall.Kill(-p.cmd.Process.Pid, syscall.SIGKILL)
			<-p.exited
		}
		if t.Failed() {
			b, _ := os.ReadFile(p.log)
			t.Logf("%s log:\n%s", name, b)
		}
	})

	// ready when /v1/models answers; a process that exits is a failure
	deadline := time.Now().Add(30 * time.Second)
	for {
		if r := p.get(t.Context(), "/v1/models", "Authorization", "Bearer "+testClientKey); r.err == nil && r.status == 200 {
			return p
		}
		select {
		case <-p.exited:
			b, _ := os.ReadFile(p.log)
			t.Fatalf("%s exited before it was ready:\n%s", name, b)
		case <-time.After(50 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			b, _ := os.ReadFile(p.log)
			t.Fatalf("%s not ready on port %d after 30s:\n%s", name, p.port, b)
		}
	}
}

func (p *caddyProcess) url(path string) string {
	return fmt.Sprintf("http://127.0.0.1:%d%s", p.port, path)
}

// get requests path (or a whole URL) from this instance.
func (p *caddyProcess) get(ctx context.Context, path string, hdr ...string) result {
	return p.do(ctx, http.MethodGet, path, "", hdr...)
}

func (p *caddyProcess) do(ctx context.Context, method, path, body string, hdr ...string) result {
	u := path
	if strings.HasPrefix(path, "/") {
		u = p.url(path)
	}
	req, err := http.NewRequestWithContext(ctx, method, u, strings.NewReader(body))
	if err != nil {
		return result{err: err}
	}
	for i := 0; i+1 < len(hdr); i += 2 {
		req.Header.Set(hdr[i], hdr[i+1])
	}
	resp, err := testClient(10 * time.Second).Do(req)
	if err != nil {
		return result{err: err}
	}
	defer resp.Body.Close()
	var b bytes.Buffer
	_, err = b.ReadFrom(resp.Body)
	return result{status: resp.StatusCode, header: resp.Header, body: b.Bytes(), err: err}
}

func TestStoreTwoInstancesOneStorage(t *testing.T) {
	if testing.Short() {
		t.Skip("builds and runs two Caddy processes")
	}
	bin := buildCaddy(t)
	shared := t.TempDir() // the volume both instances mount
	site := fmt.Sprintf(`	zimage_gateway {
		api_key %s
		upstream demo
		enhance off
		model Z-Image
		model Qwen-Image-Edit {
			model_index 19
			edit
		}
		store {
			storage file_system %s
		}
		health
	}
	metrics /metrics`, testClientKey, shared)
	one := startCaddyProcess(t, bin, t.TempDir(), "instance-1", site)
	two := startCaddyProcess(t, bin, t.TempDir(), "instance-2", site)
	ctx := t.Context()
	auth := []string{"Authorization", "Bearer " + testClientKey, "Content-Type", "application/json"}

	// a generation through instance 1
	r := one.do(ctx, http.MethodPost, "/v1/images/generations", `{"prompt":"a lighthouse no-enhance","size":"256x256","seed":7}`, auth...)
	if r.err != nil || r.status != 200 {
		t.Fatalf("generation through instance 1: %d %v %s", r.status, r.err, r.body)
	}
	var ans struct {
		Data []struct {
			URL string `json:"url"`
		} `json:"data"`
	}
	if err := json.Unmarshal(r.body, &ans); err != nil || len(ans.Data) != 1 || ans.Data[0].URL == "" {
		t.Fatalf("answer: %s", r.body)
	}
	imageURL := ans.Data[0].URL
	img := one.get(ctx, imageURL)
	if img.err != nil || img.status != 200 || len(img.body) == 0 {
		t.Fatalf("the answer's image %s from instance 1: %d %v", imageURL, img.status, img.err)
	}
	path, stored := strings.CutPrefix(imageURL, one.url(storeURLPath))
	if !stored {
		t.Fatalf("instance 1's answer names %s, not its store", imageURL)
	}

	// instance 2 serves what instance 1 stored
	for _, p := range []string{storeURLPath + path, storePath + path} {
		got := two.get(ctx, p)
		if got.err != nil || got.status != 200 || !bytes.Equal(got.body, img.body) || got.header.Get("Content-Type") != "image/png" {
			t.Errorf("instance 2 GET %s: %d %v, %d bytes (want %d, the image instance 1 made)", p, got.status, got.err, len(got.body), len(img.body))
		}
	}
	etag := `"` + strings.TrimSuffix(path, ".png") + `"`
	if got := two.get(ctx, storeURLPath+path, "If-None-Match", etag); got.status != 304 {
		t.Errorf("instance 2 revalidation: %d, want 304", got.status)
	}
	if got := two.get(ctx, storeURLPath+storeTestID+".png"); got.status != 404 {
		t.Errorf("instance 2, an id neither stored: %d, want 404", got.status)
	}

	// each instance answers its load balancer's health check for itself,
	// without a key: its accounts and its write check on the shared storage
	// (docs/design.md#health)
	for i, p := range []*caddyProcess{one, two} {
		h := p.get(ctx, "/v1/zimage/health")
		var rep healthReport
		if h.err != nil || h.status != 200 || json.Unmarshal(h.body, &rep) != nil || rep.Status != "ok" ||
			rep.Store.State != "ok" || len(rep.Accounts) != 1 || rep.Accounts[0].Resting {
			t.Errorf("instance %d health: %d %v %s", i+1, h.status, h.err, h.body)
		}
	}
	if _, err := os.Stat(filepath.Join(shared, "zimage", "health")); err != nil {
		t.Errorf("no write check on the shared storage: %v", err)
	}
	// metrics are per instance: instance 2 served the image it never stored
	m1, m2 := parseScrape(t, one.get(ctx, "/metrics")), parseScrape(t, two.get(ctx, "/metrics"))
	if got := m1.get("caddy_zimage_store_images_total", "result", "stored"); got != 1 {
		t.Errorf("instance 1 stored %v images, want 1", got)
	}
	if got := m2.get("caddy_zimage_store_images_total", "result", "stored"); got != 0 {
		t.Errorf("instance 2 counts %v stored images, want 0: it made none", got)
	}
	if got := m2.get("caddy_zimage_store_served_total", "code", "200"); got != 2 {
		t.Errorf("instance 2 served %v images with 200, want 2", got)
	}
	if got := m2.get("caddy_zimage_requests_total", "endpoint", "images_generations", "model", "Z-Image", "code", "200"); got != 0 {
		t.Errorf("instance 2 counts %v generations, want 0", got)
	}

	// a response kept by instance 1 is instance 2's too: GET answers it,
	// and previous_response_id on the edit model edits its picture, whose
	// URL instance 2 gives the service
	r = one.do(ctx, http.MethodPost, "/v1/responses", `{"model":"Z-Image","input":"a lighthouse no-enhance"}`, auth...)
	var first struct {
		ID     string `json:"id"`
		Output []struct {
			Result  string `json:"result"`
			Content []struct {
				Text string `json:"text"`
			} `json:"content"`
		} `json:"output"`
	}
	if r.err != nil || r.status != 200 || json.Unmarshal(r.body, &first) != nil || len(first.Output) != 2 || first.Output[0].Result == "" {
		t.Fatalf("response through instance 1: %d %v %.300s", r.status, r.err, r.body)
	}
	got := two.get(ctx, "/v1/responses/"+first.ID, auth...)
	if got.status != 200 || !bytes.Contains(got.body, []byte(`"result":"`+first.Output[0].Result+`"`)) {
		t.Errorf("instance 2 GET of instance 1's response: %d %.300s", got.status, got.body)
	}
	name := first.Output[1].Content[0].Text[strings.Index(first.Output[1].Content[0].Text, storeURLPath)+len(storeURLPath):]
	name = name[:strings.IndexByte(name, ')')]
	r = two.do(ctx, http.MethodPost, "/v1/responses", `{"model":"Qwen-Image-Edit","input":"make it night","previous_response_id":"`+first.ID+`"}`, auth...)
	var edit struct {
		Output []struct {
			Content []struct {
				Text string `json:"text"`
			} `json:"content"`
		} `json:"output"`
	}
	if r.err != nil || r.status != 200 || json.Unmarshal(r.body, &edit) != nil || len(edit.Output) != 2 ||
		!strings.Contains(edit.Output[1].Content[0].Text, "**🖼️ Source:** <"+two.url(storeURLPath+name)+">") {
		t.Errorf("an edit through instance 2 of instance 1's response: %d %v %.600s", r.status, r.err, r.body)
	}
}
