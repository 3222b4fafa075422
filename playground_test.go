package zimage

import (
	"context"
	"encoding/json"
	"io/fs"
	"net/http"
	"net/http/httptest"
	"os"
	"reflect"
	"regexp"
	"strings"
	"testing"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
)

// unitPlayground provisions a gateway with the demo upstream and the given
// extra JSON fields (e.g. `"playground":{"path":"/try"}`).
func unitPlayground(t *testing.T, extra string) *Gateway {
	t.Helper()
	unitClearEnv(t)
	g, err := unitProvision(t, `{"api_keys":["`+testClientKey+`"],"upstream":{"url":"demo"}`+extra+`}`)
	if err != nil {
		t.Fatalf("provisioning: %v", err)
	}
	return g
}

// unitServe runs one request through the gateway and reports whether it
// reached the next handler.
func unitServe(t *testing.T, g *Gateway, r *http.Request) (*httptest.ResponseRecorder, bool) {
	t.Helper()
	repl := caddy.NewReplacer()
	r = r.WithContext(context.WithValue(r.Context(), caddy.ReplacerCtxKey, repl))
	w := httptest.NewRecorder()
	passed := false
	next := caddyhttp.HandlerFunc(func(http.ResponseWriter, *http.Request) error {
		passed = true
		return nil
	})
	if err := g.ServeHTTP(w, r, next); err != nil {
		t.Fatalf("ServeHTTP: %v", err)
	}
	return w, passed
}

// playgroundWantCSP is the page's policy with the demo upstream, exactly.
const playgroundWantCSP = "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; " +
	"connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"

// The page, its assets and config.json, served without auth with
// their types, caching and the page's CSP; nothing else under the path.
func TestUnitPlaygroundServing(t *testing.T) {
	g := unitPlayground(t, `,"playground":{"path":"/try/"}`)

	page, passed := unitServe(t, g, httptest.NewRequest(http.MethodGet, "/try", nil))
	if passed || page.Code != http.StatusOK {
		t.Fatalf("GET /try without a key: %d (passed on: %v), want the page", page.Code, passed)
	}
	for k, want := range map[string]string{
		"Content-Type":            "text/html; charset=utf-8",
		"Content-Security-Policy": playgroundWantCSP,
		"Cache-Control":           "no-cache",
		"X-Content-Type-Options":  "nosniff",
		"X-Frame-Options":         "DENY",
		"Referrer-Policy":         "no-referrer",
	} {
		if got := page.Header().Get(k); got != want {
			t.Errorf("page %s = %q, want %q", k, got, want)
		}
	}
	etag := page.Header().Get("ETag")
	if !regexp.MustCompile(`^"[0-9a-f]{32}"$`).MatchString(etag) {
		t.Errorf("page ETag %q, want a strong hash", etag)
	}
	body := page.Body.String()
	if !strings.Contains(body, `data-base="/try"`) {
		t.Errorf("the page does not know its base path /try")
	}

	slash, _ := unitServe(t, g, httptest.NewRequest(http.MethodGet, "/try/", nil))
	if slash.Code != http.StatusOK || slash.Body.String() != body {
		t.Errorf("GET /try/: %d, want the same page", slash.Code)
	}

	// every asset the page names is served, with its type, and cached for
	// good under the versioned name only
	refs := regexp.MustCompile(`(?:src|href)="(/try/[^"?]+)\?v=([0-9a-f]{12})"`).FindAllStringSubmatch(body, -1)
	wantTypes := map[string]string{
		"/try/app.js":    "text/javascript; charset=utf-8",
		"/try/style.css": "text/css; charset=utf-8",
		"/try/icon.svg":  "image/svg+xml",
	}
	got := map[string]bool{}
	for _, ref := range refs {
		name, version := ref[1], ref[2]
		got[name] = true
		w, _ := unitServe(t, g, httptest.NewRequest(http.MethodGet, name+"?v="+version, nil))
		if w.Code != http.StatusOK || w.Header().Get("Content-Type") != wantTypes[name] {
			t.Errorf("GET %s: %d %q, want 200 %q", name, w.Code, w.Header().Get("Content-Type"), wantTypes[name])
		}
		if cc := w.Header().Get("Cache-Control"); cc != "public, max-age=31536000, immutable" {
			t.Errorf("GET %s?v=%s: Cache-Control %q, want immutable", name, version, cc)
		}
		if w.Header().Get("Content-Security-Policy") != "" || w.Header().Get("X-Content-Type-Options") != "nosniff" {
			t.Errorf("GET %s: headers %v", name, w.Header())
		}
		stale, _ := unitServe(t, g, httptest.NewRequest(http.MethodGet, name+"?v=0123456789ab", nil))
		if stale.Code != http.StatusOK || stale.Header().Get("Cache-Control") != "no-cache" {
			t.Errorf("GET %s with another version: %d, Cache-Control %q; want the file, revalidated", name, stale.Code, stale.Header().Get("Cache-Control"))
		}
	}
	for name := range wantTypes {
		if !got[name] {
			t.Errorf("the page does not reference %s with a version", name)
		}
	}

	// conditional and HEAD requests
	r := httptest.NewRequest(http.MethodGet, "/try", nil)
	r.Header.Set("If-None-Match", etag)
	if w, _ := unitServe(t, g, r); w.Code != http.StatusNotModified {
		t.Errorf("If-None-Match with the page's ETag: %d, want 304", w.Code)
	}
	if w, _ := unitServe(t, g, httptest.NewRequest(http.MethodHead, "/try", nil)); w.Code != http.StatusOK || w.Body.Len() != 0 ||
		w.Header().Get("Content-Length") != strings.TrimSpace(page.Header().Get("Content-Length")) {
		t.Errorf("HEAD /try: %d, %d body bytes, Content-Length %q", w.Code, w.Body.Len(), w.Header().Get("Content-Length"))
	}

	for _, tc := range []struct {
		method, path string
		want         int
	}{
		{http.MethodGet, "/try/nothing.js", http.StatusNotFound},
		{http.MethodGet, "/try/index.html", http.StatusNotFound}, // the page is /try, not a file
		{http.MethodGet, "/try/playground/app.js", http.StatusNotFound},
		{http.MethodGet, "/try/app.js/", http.StatusNotFound},
		{http.MethodPost, "/try", http.StatusMethodNotAllowed},
		{http.MethodDelete, "/try/app.js", http.StatusMethodNotAllowed},
	} {
		w, passed := unitServe(t, g, httptest.NewRequest(tc.method, tc.path, nil))
		if passed || w.Code != tc.want {
			t.Errorf("%s %s: %d (passed on: %v), want %d", tc.method, tc.path, w.Code, passed, tc.want)
		}
		if tc.want == http.StatusMethodNotAllowed && w.Header().Get("Allow") != "GET, HEAD" {
			t.Errorf("%s %s: Allow %q", tc.method, tc.path, w.Header().Get("Allow"))
		}
	}

	// around the path: the site's and the API's, as before
	for _, path := range []string{"/tryout", "/", "/playground"} {
		if _, passed := unitServe(t, g, httptest.NewRequest(http.MethodGet, path, nil)); !passed {
			t.Errorf("GET %s was not passed to the next handler", path)
		}
	}
	if w, _ := unitServe(t, g, httptest.NewRequest(http.MethodGet, "/v1/models", nil)); w.Code != http.StatusUnauthorized {
		t.Errorf("GET /v1/models without a key: %d; the playground must not open the API", w.Code)
	}
}

// Off by default: no page, the path is the site's.
func TestUnitPlaygroundOffByDefault(t *testing.T) {
	g := unitPlayground(t, "")
	if g.playground != nil {
		t.Fatal("the playground is on without being configured")
	}
	if _, passed := unitServe(t, g, httptest.NewRequest(http.MethodGet, "/playground", nil)); !passed {
		t.Error("GET /playground was not passed to the next handler with the playground off")
	}
}

// config.json tells the page what the API does not: edit models, store,
// enhancement, demo, whether a key is needed. It holds no secret.
func TestUnitPlaygroundConfigJSON(t *testing.T) {
	read := func(g *Gateway) playgroundConfig {
		t.Helper()
		w, _ := unitServe(t, g, httptest.NewRequest(http.MethodGet, g.playground.path+"/config.json", nil))
		if w.Code != http.StatusOK || w.Header().Get("Content-Type") != "application/json" || w.Header().Get("Cache-Control") != "no-cache" {
			t.Fatalf("config.json: %d %v", w.Code, w.Header())
		}
		for _, s := range testSecrets {
			if strings.Contains(w.Body.String(), s) {
				t.Fatalf("config.json carries a secret: %s", w.Body)
			}
		}
		var c playgroundConfig
		if err := json.Unmarshal(w.Body.Bytes(), &c); err != nil {
			t.Fatal(err)
		}
		return c
	}

	g := unitPlayground(t, `,"playground":{}`)
	if got, want := read(g), (playgroundConfig{EditModels: []string{}, Demo: true, KeyRequired: true}); !reflect.DeepEqual(got, want) {
		t.Errorf("demo config.json = %+v, want %+v", got, want)
	}

	// an edit model (the flag the edits work sets from ModelConfig.Edit)
	g = unitPlayground(t, `,"playground":{},"models":[{"name":"Z-Image"},{"name":"Qwen-Image-Edit","model_index":19}]`)
	g.models[1].edit = true
	p, err := g.provisionPlayground()
	if err != nil {
		t.Fatal(err)
	}
	g.playground = p
	if got := read(g); !reflect.DeepEqual(got.EditModels, []string{"Qwen-Image-Edit"}) {
		t.Errorf("edit_models = %v, want [Qwen-Image-Edit]", got.EditModels)
	}

	// the real service with an LLM and no client keys
	unitClearEnv(t)
	g, err = unitProvision(t, `{"no_auth":true,"upstream":{"url":"https://sd.example/gen","api_key":"`+testSDKey+`"},`+
		`"enhance":{"api_key":"`+testLLMKey+`"},"playground":{}}`)
	if err != nil {
		t.Fatal(err)
	}
	if got, want := read(g), (playgroundConfig{EditModels: []string{}, Enhance: true}); !reflect.DeepEqual(got, want) {
		t.Errorf("config.json = %+v, want %+v", got, want)
	}

	// the store on: the page's history stays valid
	g = unitPlayground(t, `,"playground":{},"store":{"storage":{"module":"file_system","root":"`+t.TempDir()+`"}}`)
	if got := read(g); !got.Store {
		t.Errorf("config.json = %+v, want store true", got)
	}
}

// Without the store, images are on the image service's hosts: img-src
// allows exactly the hosts the gateway downloads images from.
func TestUnitPlaygroundCSPImageHosts(t *testing.T) {
	unitClearEnv(t)
	g, err := unitProvision(t, `{"api_keys":["k"],"upstream":{"url":"https://sd.example/api/v1/generate_image","api_key":"s"},`+
		`"image_hosts":["cdn.example.net","10.0.0.5","::1"],"playground":{}}`)
	if err != nil {
		t.Fatal(err)
	}
	w, _ := unitServe(t, g, httptest.NewRequest(http.MethodGet, "/playground", nil))
	want := "default-src 'self'; script-src 'self'; style-src 'self'; " +
		"img-src 'self' data: blob: 10.0.0.5:* cdn.example.net:* *.cdn.example.net:* sd.example:* *.sd.example:*; " +
		"connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
	if got := w.Header().Get("Content-Security-Policy"); got != want {
		t.Errorf("CSP\n got %s\nwant %s", got, want)
	}
}

// The page and its script use nothing the CSP forbids: no inline script,
// no inline style, no event handler attributes, no eval, no innerHTML.
func TestUnitPlaygroundAssetsNeedNoUnsafeInline(t *testing.T) {
	t.Parallel()
	page, _ := playgroundFiles.ReadFile("playground/index.html")
	for _, re := range []string{`\sstyle\s*=`, `<style`, `\son[a-z]+\s*=`, `javascript:`} {
		if m := regexp.MustCompile(re).FindString(string(page)); m != "" {
			t.Errorf("index.html has %q, which the CSP would block", m)
		}
	}
	for _, tag := range regexp.MustCompile(`<script[^>]*>[^<]*`).FindAllString(string(page), -1) {
		if !strings.Contains(tag, ` src="`) || !strings.HasSuffix(tag, ">") {
			t.Errorf("index.html has an inline script: %s", tag)
		}
	}
	js, _ := playgroundFiles.ReadFile("playground/app.js")
	for _, bad := range []string{"innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function", `setAttribute("style"`, ".style.", "http://", "https://"} {
		if strings.Contains(string(js), bad) {
			t.Errorf("app.js uses %q", bad)
		}
	}
	css, _ := playgroundFiles.ReadFile("playground/style.css")
	if strings.Contains(string(css), "@import") || strings.Contains(string(css), "url(") {
		t.Error("style.css loads something: the page must work offline")
	}
	// every embedded file has a known type
	_ = fs.WalkDir(playgroundFiles, "playground", func(name string, de fs.DirEntry, err error) error {
		if err == nil && !de.IsDir() && playgroundContentType(name) == "application/octet-stream" {
			t.Errorf("%s: no content type known for it", name)
		}
		return err
	})
}

// The path is validated at load, with an error naming playground.
func TestUnitPlaygroundPath(t *testing.T) {
	for _, tc := range []struct{ in, want string }{
		{"", "/playground"},
		{"/playground", "/playground"},
		{"/try/", "/try"},
		{"/tools/zimage-ui", "/tools/zimage-ui"},
		{"/a-b_c.d~e/F9", "/a-b_c.d~e/F9"},
		{"/modelsx", "/modelsx"},
		{"/v1beta", "/v1beta"},
	} {
		got, err := playgroundPath(tc.in)
		if err != nil || got != tc.want {
			t.Errorf("playgroundPath(%q) = %q, %v; want %q", tc.in, got, err, tc.want)
		}
	}
	for _, tc := range []struct{ in, want string }{
		{"playground", "must be absolute"},
		{"/", "site root"},
		{"//", "site root"},
		{"/a//b", "not clean"},
		{"/a/./b", "not clean"},
		{"/a/../b", "not clean"},
		{"/v1", "collides"},
		{"/v1/playground", "collides"},
		{"/models", "collides"},
		{"/chat", "collides"},
		{"/chat/completions", "collides"},
		{"/images/playground", "collides"},
		{"/zimage", "collides"},
		{"/zimage/images", "collides"},
		{"/zimage-demo", "collides"},
		{"/play ground", "may only contain"},
		{"/play?x", "may only contain"},
		{"/spielplätze", "may only contain"},
		{"/{env.X}", "may only contain"},
	} {
		_, err := playgroundPath(tc.in)
		if err == nil || !strings.Contains(err.Error(), "zimage_gateway: playground: ") || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("playgroundPath(%q) error %v, want one naming playground and saying %q", tc.in, err, tc.want)
		}
	}
	// JSON configs get the same check, at Provision
	unitClearEnv(t)
	if _, err := unitProvision(t, `{"api_keys":["k"],"upstream":{"url":"demo"},"playground":{"path":"/v1/ui"}}`); err == nil ||
		!strings.Contains(err.Error(), "playground") {
		t.Errorf("Provision with playground path /v1/ui: %v, want an error naming playground", err)
	}
}

// Caddyfile: `playground [<path>]`, once, no block.
func TestUnitPlaygroundCaddyfile(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name, src string
		want      *PlaygroundConfig
		err       string
	}{
		{"off by default", "zimage_gateway {\n\tapi_key k\n}", nil, ""},
		{"bare", "zimage_gateway {\n\tplayground\n}", &PlaygroundConfig{}, ""},
		{"path", "zimage_gateway {\n\tplayground /try\n}", &PlaygroundConfig{Path: "/try"}, ""},
		{"two paths", "zimage_gateway {\n\tplayground /a /b\n}", nil, "wrong argument count"},
		{"twice", "zimage_gateway {\n\tplayground\n\tplayground /b\n}", nil, "playground already specified"},
		{"block", "zimage_gateway {\n\tplayground /a {\n\t\tpath /b\n\t}\n}", nil, "playground takes no block"},
		{"under /v1", "zimage_gateway {\n\tplayground /v1/ui\n}", nil, "zimage_gateway: playground: path \"/v1/ui\" collides"},
		{"relative", "zimage_gateway {\n\tplayground ui\n}", nil, "must be absolute"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var g Gateway
			err := g.UnmarshalCaddyfile(caddyfile.NewTestDispenser(tc.src))
			if tc.err != "" {
				if err == nil || !strings.Contains(err.Error(), tc.err) {
					t.Fatalf("error %v, want %q", err, tc.err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if !reflect.DeepEqual(g.Playground, tc.want) {
				t.Errorf("Playground = %+v, want %+v", g.Playground, tc.want)
			}
		})
	}
	// the Caddyfile and the JSON field are the same config
	var fromJSON Gateway
	if err := json.Unmarshal([]byte(`{"playground":{"path":"/try"}}`), &fromJSON); err != nil {
		t.Fatal(err)
	}
	var fromCaddyfile Gateway
	if err := fromCaddyfile.UnmarshalCaddyfile(caddyfile.NewTestDispenser("zimage_gateway {\n\tplayground /try\n}")); err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(fromJSON, fromCaddyfile) {
		t.Errorf("JSON %+v and Caddyfile %+v differ", fromJSON.Playground, fromCaddyfile.Playground)
	}
}

// Caddyfile.example turns the playground on at /playground.
func TestUnitPlaygroundInExample(t *testing.T) {
	src, err := os.ReadFile("Caddyfile.example")
	if err != nil {
		t.Fatal(err)
	}
	unitClearEnv(t)
	t.Setenv("SD_UPSTREAM", "demo")
	t.Setenv("GATEWAY_API_KEY", testClientKey)
	var g Gateway
	if err := json.Unmarshal(unitFindHandler(t, unitAdapt(t, string(src)), "zimage_gateway"), &g); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := caddy.NewContext(caddy.Context{Context: t.Context()})
	defer cancel()
	if err := g.Provision(ctx); err != nil {
		t.Fatal(err)
	}
	defer g.Cleanup()
	if g.playground == nil || g.playground.path != "/playground" {
		t.Fatalf("Caddyfile.example does not turn the playground on at /playground")
	}
	// the first command shows everything (docs/design.md#the-demo): the page's config
	// offers the edit panel, with the store the edits of uploads need
	f := g.playground.files["/playground/config.json"]
	var pc playgroundConfig
	if f == nil || json.Unmarshal(f.body, &pc) != nil || len(pc.EditModels) == 0 || !pc.Store || !pc.Demo {
		t.Fatalf("the example's playground config: %s, want an edit model, the store and the demo", f.body)
	}
}

// The README's first command says where the playground is, its picture is
// in the repository, and its basic_auth example adapts with the page
// behind the password and the API not.
func TestUnitPlaygroundREADME(t *testing.T) {
	t.Parallel()
	readme, err := os.ReadFile("README.md")
	if err != nil {
		t.Fatal(err)
	}
	_, first, _ := strings.Cut(string(readme), "## First two commands")
	if block := fenced(t, first, "```sh\n"); !strings.Contains(block, "open http://localhost:8080/playground") {
		t.Errorf("the README's first command block does not say to open the playground:\n%s", block)
	}
	if !strings.Contains(string(readme), "](docs/playground.png)") {
		t.Error("the README does not show docs/playground.png")
	}
	if b, err := os.ReadFile("docs/playground.png"); err != nil || !strings.HasPrefix(string(b), "\x89PNG") {
		t.Errorf("docs/playground.png is not a PNG: %v", err)
	}

	_, public, ok := strings.Cut(string(readme), "### On a public site")
	if !ok {
		t.Fatal("README has no 'On a public site' section")
	}
	cfg := unitAdapt(t, fenced(t, public, "```caddy\n"))
	names := unitHandlerNames(cfg)
	auth, gw := unitIndexOf(names, "authentication"), unitIndexOf(names, "zimage_gateway")
	if auth < 0 || gw < 0 || auth > gw {
		t.Fatalf("handlers %v: want basic_auth (authentication) before zimage_gateway", names)
	}
	if !strings.Contains(string(cfg), `"path":["/playground*"]`) {
		t.Errorf("basic_auth is not limited to the playground's path: %s", cfg)
	}
}
