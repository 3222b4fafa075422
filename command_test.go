package zimage

// `caddy zimage-models` (docs/design.md#model-identity), run in-process against a fake image
// service with a menu of its own.

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/spf13/cobra"

	caddycmd "github.com/caddyserver/caddy/v2/cmd"
)

// fakeMenu is an image service whose menu is its own: by model_index, a
// name and the points it costs, or a failure. It records every call.
type fakeMenu struct {
	*httptest.Server
	mu    sync.Mutex
	calls []upstreamCall
	paths []string // the request URI each call arrived with (absolute through a proxy)
	proxy []string // Proxy-Authorization headers seen
	fail  bool     // every index fails
}

func newFakeMenu(t *testing.T) *fakeMenu {
	f := &fakeMenu{}
	f.Server = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		var body upstreamRequest
		_ = json.NewDecoder(r.Body).Decode(&body)
		f.mu.Lock()
		f.calls = append(f.calls, upstreamCall{Auth: r.Header.Get("Authorization"), Body: body})
		f.paths = append(f.paths, r.RequestURI)
		f.proxy = append(f.proxy, r.Header.Get("Proxy-Authorization"))
		fail := f.fail
		f.mu.Unlock()
		ok := func(name, points string) {
			w.Header().Set("Content-Type", "application/json")
			fmt.Fprintf(w, `{"success":true,"data":{"image_url":"https://img.example.com/x.png","image_id":1,"model_name":%q,"points_used":%s,"remaining_points":100}}`, name, points)
		}
		switch {
		case fail:
			failWith(500, `{"error":"maintenance"}`)(w, r)
		case body.ModelIndex == 4:
			ok("RealSkin EPS 1.3", `"2"`)
		case body.ModelIndex == 5:
			ok("Z-Image Turbo", "1")
		case body.ModelIndex == 6:
			// a service that echoes the caller's credentials in its error
			failWith(500, fmt.Sprintf(`{"error":"bad token %s"}`, r.Header.Get("Authorization")))(w, r)
		case body.ModelIndex == 8:
			w.Header().Set("Content-Type", "application/json")
			fmt.Fprint(w, `{"success":true,"data":{"image_url":"https://img.example.com/y.png"}}`)
		default:
			failWith(200, `{"success":false,"error":"模型不存在"}`)(w, r)
		}
	}))
	t.Cleanup(f.Close)
	return f
}

func (f *fakeMenu) Calls() []upstreamCall {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]upstreamCall(nil), f.calls...)
}

// runModels runs the command's function with opts and returns its exit
// code, error and output; nothing it prints or returns may hold a secret.
func runModels(t *testing.T, o discoverOptions) (int, error, string) {
	t.Helper()
	var out bytes.Buffer
	code, err := runZimageModels(context.Background(), o, &out)
	all := out.String()
	if err != nil {
		all += "\n" + err.Error()
	}
	if sc := newScrubber(append(testSecrets, "proxy-pass-8c1d")); sc.contains(all) {
		t.Errorf("a secret was printed: %s", sc.Replace(all))
	}
	return code, err, out.String()
}

// Without --yes nothing is called: the plan and the count are printed.
func TestUnitZimageModelsDryRun(t *testing.T) {
	unitClearEnv(t)
	t.Setenv("SD_API_KEY", testSDKey)
	f := newFakeMenu(t)
	code, err, out := runModels(t, discoverOptions{upstream: f.URL + "/api/v1/generate_image", from: 0, to: 24})
	if code != 0 || err != nil {
		t.Fatalf("exit %d %v", code, err)
	}
	if n := len(f.Calls()); n != 0 {
		t.Errorf("%d calls without --yes, want none", n)
	}
	for _, s := range []string{"25 generations", "model_index 0…24", "64×64", "8 steps", "account default (from SD_API_KEY)", "Nothing was called", "--yes"} {
		if !strings.Contains(out, s) {
			t.Errorf("plan %q does not say %q", out, s)
		}
	}
}

// With --yes: one smallest generation per index, and the table of index,
// model_name and points_used; a failing index has its failure (scrubbed)
// in its row and the others go on.
func TestUnitZimageModelsTable(t *testing.T) {
	unitClearEnv(t)
	t.Setenv("SD_API_KEY", testSDKey)
	f := newFakeMenu(t)
	code, err, out := runModels(t, discoverOptions{upstream: f.URL + "/api/v1/generate_image", from: 3, to: 8, yes: true})
	if code != 0 || err != nil {
		t.Fatalf("exit %d %v: %s", code, err, out)
	}
	calls := f.Calls()
	if len(calls) != 6 {
		t.Fatalf("%d calls, want 6 (index 3…8)", len(calls))
	}
	for i, c := range calls {
		b := c.Body
		if b.ModelIndex != 3+i || b.Width != 64 || b.Height != 64 || b.Steps != 8 || b.Seed != discoverSeed || b.Seed < 1 || b.Prompt != discoverPrompt || c.Auth != "Bearer "+testSDKey {
			t.Errorf("call %d: %+v auth ok %v", i, b, c.Auth == "Bearer "+testSDKey)
		}
	}
	rows := strings.Split(strings.TrimSpace(out), "\n")
	want := []string{
		"index  model_name                            points_used",
		"    3  failed: bad_response: 模型不存在",
		"    4  RealSkin EPS 1.3                      2",
		"    5  Z-Image Turbo                         1",
		"    6  failed: status_5xx: bad token Bearer [redacted]",
		"    7  failed: bad_response: 模型不存在",
		"    8  (no model_name in the answer)         -",
	}
	if len(rows) != len(want)+1 {
		t.Fatalf("output:\n%s", out)
	}
	for i, w := range want {
		if got := strings.TrimRight(rows[i+1], " "); got != w {
			t.Errorf("row %d:\n got %q\nwant %q", i, got, w)
		}
	}
}

// Every index failed: the rows, and a non-zero exit status.
func TestUnitZimageModelsAllFail(t *testing.T) {
	unitClearEnv(t)
	t.Setenv("SD_API_KEY", testSDKey)
	f := newFakeMenu(t)
	f.mu.Lock()
	f.fail = true
	f.mu.Unlock()
	code, err, out := runModels(t, discoverOptions{upstream: f.URL, from: 0, to: 2, yes: true})
	if code == 0 || err == nil || !strings.Contains(err.Error(), "no model_index answered") {
		t.Fatalf("exit %d %v, want a failure", code, err)
	}
	if strings.Count(out, "failed: status_5xx: maintenance") != 3 {
		t.Errorf("output:\n%s", out)
	}
}

// --config with a Caddyfile: the first zimage_gateway handler (inside a
// handle block, a subroute), its first account's key from the environment,
// its first model's steps; the demo upstream of a config answers offline.
func TestUnitZimageModelsConfig(t *testing.T) {
	unitClearEnv(t)
	t.Setenv("ZIMAGE_CMD_KEY", testAccountKeyA)
	f := newFakeMenu(t)
	dir := t.TempDir()
	caddyfile := filepath.Join(dir, "Caddyfile")
	writeFile(t, caddyfile, fmt.Sprintf(`example.com {
	handle /other/* {
		respond "hi"
	}
	handle /api/* {
		zimage_gateway {
			api_key sk-x
			upstream %s/api/v1/generate_image {
				account first {
					api_key {env.ZIMAGE_CMD_KEY}
				}
				account second {
					api_key %s
				}
			}
			model Anime {
				steps 20
			}
		}
	}
}
`, f.URL, testAccountKeyB))
	code, err, out := runModels(t, discoverOptions{config: caddyfile, from: 5, to: 5, yes: true})
	if code != 0 || err != nil {
		t.Fatalf("exit %d %v: %s", code, err, out)
	}
	calls := f.Calls()
	if len(calls) != 1 || calls[0].Auth != "Bearer "+testAccountKeyA || calls[0].Body.Steps != 20 {
		t.Fatalf("calls %+v, want one with the first account's key and 20 steps", calls)
	}
	if !strings.Contains(out, "account first (from "+caddyfile+")") || !strings.Contains(out, "Z-Image Turbo") {
		t.Errorf("output:\n%s", out)
	}

	demo := filepath.Join(dir, "demo.caddyfile")
	writeFile(t, demo, "localhost {\n\tzimage_gateway {\n\t\tno_auth\n\t\tupstream demo\n\t}\n}\n")
	code, err, out = runModels(t, discoverOptions{config: demo, adapter: "caddyfile", from: 4, to: 5, yes: true})
	if code != 0 || err != nil || !strings.Contains(out, "built-in menu") || !strings.Contains(out, "    5  Z-Image ") {
		t.Fatalf("demo config: exit %d %v:\n%s", code, err, out)
	}

	// no handler, no key: errors that say what to change
	none := filepath.Join(dir, "none.caddyfile")
	writeFile(t, none, "localhost {\n\trespond hi\n}\n")
	// a config is read as caddy run reads it: a Caddyfile under another
	// name needs --adapter, and the error says so
	odd := filepath.Join(dir, "gateway.conf")
	writeFile(t, odd, "localhost {\n\tzimage_gateway {\n\t\tno_auth\n\t\tupstream demo\n\t}\n}\n")
	if _, err, _ := runModels(t, discoverOptions{config: odd, to: 1}); err == nil || !strings.Contains(err.Error(), "--adapter") {
		t.Errorf("a Caddyfile named %s without --adapter: %v, want an error naming --adapter", odd, err)
	}
	if _, err, _ := runModels(t, discoverOptions{config: odd, adapter: "caddyfile", to: 1}); err != nil {
		t.Errorf("a Caddyfile named %s with --adapter caddyfile: %v", odd, err)
	}
	if _, err, _ := runModels(t, discoverOptions{config: none, to: 1}); err == nil || !strings.Contains(err.Error(), "has no zimage_gateway handler") {
		t.Errorf("config without the handler: %v", err)
	}
	if _, err, _ := runModels(t, discoverOptions{upstream: f.URL, to: 1}); err == nil || !strings.Contains(err.Error(), "set SD_API_KEY") {
		t.Errorf("no key: %v", err)
	}
}

// --config with JSON: forward_proxy_url carries the calls, its credentials
// are used and never printed.
func TestUnitZimageModelsForwardProxy(t *testing.T) {
	unitClearEnv(t)
	f := newFakeMenu(t) // the "proxy" answers as the service, recording the absolute URI
	cfg := filepath.Join(t.TempDir(), "caddy.json")
	writeFile(t, cfg, fmt.Sprintf(`{"apps":{"http":{"servers":{"srv0":{"routes":[{"handle":[
		{"handler":"subroute","routes":[{"handle":[{"handler":"zimage_gateway","upstream":{
			"url":"http://sd.invalid/api/v1/generate_image","api_key":%q,
			"forward_proxy_url":"http://zuser:proxy-pass-8c1d@%s"}}]}]}]}]}}}}}`, testSDKey, strings.TrimPrefix(f.URL, "http://")))
	code, err, out := runModels(t, discoverOptions{config: cfg, from: 5, to: 5})
	if code != 0 || err != nil || !strings.Contains(out, "through the forward proxy http://…@127.0.0.1") {
		t.Fatalf("plan: exit %d %v:\n%s", code, err, out)
	}
	code, err, out = runModels(t, discoverOptions{config: cfg, from: 5, to: 5, yes: true})
	if code != 0 || err != nil || !strings.Contains(out, "Z-Image Turbo") {
		t.Fatalf("exit %d %v:\n%s", code, err, out)
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if len(f.paths) != 1 || f.paths[0] != "http://sd.invalid/api/v1/generate_image" || !strings.HasPrefix(f.proxy[0], "Basic ") {
		t.Errorf("through the proxy: %q, Proxy-Authorization %q", f.paths, f.proxy)
	}

	// a proxy URL that is not one: an error that does not echo it
	writeFile(t, cfg, `{"apps":{"http":{"servers":{"a":{"routes":[{"handle":[{"handler":"zimage_gateway","upstream":{"api_key":"k","forward_proxy_url":"socks9://u:proxy-pass-8c1d@x"}}]}]}}}}}`)
	if _, err, _ := runModels(t, discoverOptions{config: cfg, to: 1}); err == nil || !strings.Contains(err.Error(), "forward_proxy_url") {
		t.Errorf("bad proxy: %v", err)
	}
}

// --upstream demo answers from the built-in menu, with no key; the command
// is registered as Caddy's and its flags reach the function.
func TestUnitZimageModelsDemoCommand(t *testing.T) {
	unitClearEnv(t)
	reg, ok := caddycmd.Commands()["zimage-models"]
	if !ok {
		t.Fatal("zimage-models is not registered")
	}
	cmd := &cobra.Command{Use: reg.Name}
	reg.CobraFunc(cmd)
	var out bytes.Buffer
	cmd.SetOut(&out)
	cmd.SetArgs([]string{"--upstream", "demo", "--from", "4", "--to", "23", "--yes"})
	if err := cmd.Execute(); err != nil {
		t.Fatalf("%v\n%s", err, out.String())
	}
	for _, s := range []string{
		"    4  RealSkin EPS 1.3 ", "    5  Z-Image ", "   19  Qwen Image Edit ",
		"   20  failed: wan2.1 makes videos, not images", "   23  failed: the menu has no model_index 23",
	} {
		if !strings.Contains(out.String(), s) {
			t.Errorf("demo table lacks %q:\n%s", s, out.String())
		}
	}
}

func writeFile(t *testing.T, path, s string) {
	t.Helper()
	if err := os.WriteFile(path, []byte(s), 0o600); err != nil {
		t.Fatal(err)
	}
}

// The command's errors are plain lines on stderr, for the person at the
// terminal, not JSON log lines; the exit status is still a failure.
func TestUnitZimageModelsErrorLine(t *testing.T) {
	unitClearEnv(t)
	reg := caddycmd.Commands()["zimage-models"]
	cmd := &cobra.Command{Use: reg.Name}
	reg.CobraFunc(cmd)
	var out, errOut bytes.Buffer
	cmd.SetOut(&out)
	cmd.SetErr(&errOut)
	cmd.SetArgs([]string{"--upstream", "demo", "--from", "5", "--to", "1"})
	if err := cmd.Execute(); err == nil {
		t.Fatal("--from 5 --to 1 succeeded")
	}
	want := "zimage-models: --from and --to must give 0 ≤ from ≤ to and at most 100 indexes, got 5…1\n"
	if errOut.String() != want {
		t.Errorf("stderr %q, want the plain line %q", errOut.String(), want)
	}
}
