package zimage

// A real browser: headless Chromium loads a page from one
// loopback origin that calls the gateway on another with fetch, the way a
// browser chat client using the OpenAI JS SDK does, through the CORS
// snippet of Caddyfile.example, and renders the image the answer links to.

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/chromedp/chromedp"
)

// chromiumPath is Debian's chromium package binary, which .ci/run installs.
const chromiumPath = "/usr/bin/chromium"

// browserTimeout bounds one whole browser test, start-up included.
const browserTimeout = 60 * time.Second

// corsSnippet returns the top-level `(cors) { ... }` snippet block of
// Caddyfile.example, verbatim from its opening line to its closing brace,
// so that the browser test runs the very headers the example ships.
func corsSnippet(t *testing.T) string {
	t.Helper()
	raw, err := os.ReadFile("Caddyfile.example")
	if err != nil {
		t.Fatal(err)
	}
	return corsSnippetIn(t, "Caddyfile.example", string(raw))
}

// corsSnippetIn returns the `(cors) { ... }` block of text (a file, or the
// README's caddy blocks), from its opening line to its closing brace.
func corsSnippetIn(t *testing.T, what, text string) string {
	t.Helper()
	lines := strings.SplitAfter(text, "\n")
	for i, line := range lines {
		if strings.TrimRight(line, " \t\r\n") != "(cors) {" {
			continue
		}
		depth := 0
		for j := i; j < len(lines); j++ {
			depth += strings.Count(lines[j], "{") - strings.Count(lines[j], "}")
			if depth == 0 {
				return strings.TrimRight(strings.Join(lines[i:j+1], ""), "\n")
			}
		}
		t.Fatalf("%s: the (cors) snippet is not closed", what)
	}
	t.Fatalf("%s: no top-level '(cors) {' snippet", what)
	return ""
}

// TestBrowserCORSSnippetInREADME checks that the README's CORS section
// shows the snippet Caddyfile.example uses, byte for byte, so the two
// cannot drift apart.
func TestBrowserCORSSnippetInREADME(t *testing.T) {
	t.Parallel()
	snippet := corsSnippet(t)
	for _, want := range []string{"Access-Control-Allow-Origin", `Access-Control-Allow-Headers "Authorization, *"`} {
		if !strings.Contains(snippet, want) {
			t.Fatalf("the (cors) snippet extracted from Caddyfile.example lacks %q:\n%s", want, snippet)
		}
	}
	readme, err := os.ReadFile("README.md")
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(readme), snippet) {
		t.Errorf("README.md does not contain the (cors) snippet of Caddyfile.example verbatim:\n%s", snippet)
	}
}

// browserPage is the page the browser loads. It reads the gateway's base
// URL, the key and the prompt from its query string, POSTs a chat
// completion with the headers the OpenAI JS SDK sends, and writes what
// happened into #result as JSON: the HTTP status it could read, the error
// message or the rendered image's natural size, the raw body, and
// fetchError when fetch itself threw (a request blocked by CORS).
const browserPage = `<!doctype html>
<html><head><meta charset="utf-8"><title>zimage browser test</title></head>
<body>
<div id="images"></div>
<pre id="result"></pre>
<script>
async function run() {
	const q = new URLSearchParams(location.search);
	const out = {};
	try {
		const resp = await fetch(q.get("gw") + "/v1/chat/completions", {
			method: "POST",
			headers: {
				"Authorization": "Bearer " + q.get("key"),
				"Content-Type": "application/json",
				"X-Stainless-Lang": "js",
				"X-Stainless-Package-Version": "5.23.2",
				"X-Stainless-OS": "Linux",
				"X-Stainless-Arch": "x64",
				"X-Stainless-Runtime": "browser:chrome",
				"X-Stainless-Runtime-Version": "156.0.0",
				"X-Stainless-Retry-Count": "0",
				"X-Stainless-Timeout": "600",
			},
			body: JSON.stringify({model: "Z-Image", messages: [{role: "user", content: q.get("prompt")}]}),
		});
		out.status = resp.status;
		out.raw = await resp.text();
		const body = JSON.parse(out.raw);
		if (!resp.ok) {
			out.error = body.error.message;
			return;
		}
		const m = /!\[[^\]]*\]\(<?([^)\s>]+)>?\)/.exec(body.choices[0].message.content);
		if (!m) {
			out.renderError = "no markdown image in the answer";
			return;
		}
		out.imageURL = m[1];
		const img = document.createElement("img");
		await new Promise((resolve, reject) => {
			img.onload = resolve;
			img.onerror = () => reject(new Error("the image did not load: " + m[1]));
			img.src = m[1];
			document.getElementById("images").appendChild(img);
		});
		out.width = img.naturalWidth;
		out.height = img.naturalHeight;
	} catch (e) {
		out.fetchError = String(e);
	} finally {
		document.getElementById("result").textContent = JSON.stringify(out);
		const done = document.createElement("div");
		done.id = "done";
		document.body.appendChild(done);
	}
}
run();
</script>
</body></html>
`

// pageResult is what browserPage writes into #result.
type pageResult struct {
	Status      int    `json:"status"`
	Raw         string `json:"raw"`
	Error       string `json:"error"`
	RenderError string `json:"renderError"`
	FetchError  string `json:"fetchError"`
	ImageURL    string `json:"imageURL"`
	Width       int    `json:"width"`
	Height      int    `json:"height"`
}

// newPageServer serves browserPage. It listens on 127.0.0.1 while the
// gateway is addressed as localhost: two origins, so every fetch is a
// cross-origin request with a CORS preflight.
func newPageServer(t *testing.T) *httptest.Server {
	return servePage(t, browserPage)
}

// servePage serves html at / on 127.0.0.1 (see newPageServer).
func servePage(t *testing.T, html string) *httptest.Server {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != "/" {
			http.NotFound(w, r)
			return
		}
		w.Header().Set("Content-Type", "text/html; charset=utf-8")
		_, _ = w.Write([]byte(html))
	}))
	t.Cleanup(srv.Close)
	return srv
}

// startBrowser starts headless Chromium with a fresh profile and returns a
// context bound to it and to browserTimeout. Without Chromium the test is
// skipped, except in CI (CI=true), where .ci/run installs it and its
// absence is a failure.
func startBrowser(t *testing.T) context.Context {
	t.Helper()
	if _, err := exec.LookPath(chromiumPath); err != nil {
		if os.Getenv("CI") == "true" {
			t.Fatalf("CI=true but Chromium is not installed at %s (.ci/run installs Debian's chromium package): %v", chromiumPath, err)
		}
		t.Skipf("Chromium is not installed at %s; install it (apt-get install chromium) to run the browser tests", chromiumPath)
	}
	ctx, cancel := context.WithTimeout(context.Background(), browserTimeout)
	t.Cleanup(cancel)
	opts := []chromedp.ExecAllocatorOption{
		chromedp.ExecPath(chromiumPath),
		chromedp.UserDataDir(t.TempDir()),
		chromedp.Headless,
		chromedp.NoSandbox, // the tests run as root here
		chromedp.Flag("disable-gpu", true),
		chromedp.NoFirstRun,
		chromedp.Flag("disable-quic", true),
		chromedp.Flag("disable-background-networking", true),
		chromedp.Flag("disable-component-update", true),
		chromedp.Flag("disable-sync", true),
	}
	ctx, cancelAlloc := chromedp.NewExecAllocator(ctx, opts...)
	t.Cleanup(cancelAlloc)
	ctx, cancelBrowser := chromedp.NewContext(ctx)
	t.Cleanup(cancelBrowser)
	if err := chromedp.Do(ctx); err != nil { // starts the browser
		t.Fatalf("starting Chromium: %v", err)
	}
	return ctx
}

// runPage opens the page in a new tab of the browser with the given query
// and returns what it wrote once it is done. The gateway's answer as the
// page read it goes to the suite-wide secret scan.
func runPage(t *testing.T, browser context.Context, page *httptest.Server, key, prompt string) pageResult {
	t.Helper()
	tab, cancel := chromedp.NewContext(browser)
	defer cancel()
	q := url.Values{"gw": {baseURL}, "key": {key}, "prompt": {prompt}}
	if err := chromedp.Do(tab,
		chromedp.Navigate(page.URL+"/?"+q.Encode()),
		chromedp.WaitReady(chromedp.ID("done")),
	); err != nil {
		t.Fatalf("running the page: %v", err)
	}
	text, err := chromedp.Run(tab, chromedp.TextContent(chromedp.ID("result")))
	if err != nil {
		t.Fatalf("reading the page's result: %v", err)
	}
	var res pageResult
	if err := json.Unmarshal([]byte(text), &res); err != nil {
		t.Fatalf("the page wrote no result JSON (%v): %q", err, text)
	}
	seen.Lock()
	seen.WriteString(res.Raw)
	seen.Unlock()
	return res
}

// browserCaddyfile is a whole config: the globals, the CORS snippet taken
// from Caddyfile.example (when cors is true) and a site with the demo
// upstream, so the image is the gateway's own placeholder PNG.
func browserCaddyfile(t *testing.T, cors bool) string {
	snippet, imp := "", ""
	if cors {
		snippet, imp = corsSnippet(t), "import cors"
	}
	return fmt.Sprintf(`%s

%s

:%d {
	%s
	zimage_gateway {
		api_key %s
		upstream demo
		enhance off
	}
}
`, globals(), snippet, httpPort, imp, testClientKey)
}

// TestBrowserRendersImage drives the chat endpoint from a page on another
// origin, as a browser client does (the CORS preflight, the chat answer,
// the demo image), and checks that the image renders at the ratio's size,
// and that a wrong key shows the 401 message the page could read.
func TestBrowserRendersImage(t *testing.T) {
	browser := startBrowser(t)
	page := newPageServer(t)
	if !strings.HasPrefix(page.URL, "http://127.0.0.1:") || !strings.HasPrefix(baseURL, "http://localhost:") {
		t.Fatalf("page %s and gateway %s must be distinct loopback origins", page.URL, baseURL)
	}
	startCaddyRaw(t, browserCaddyfile(t, true))

	for _, tc := range []struct {
		name          string
		key, prompt   string
		width, height int
	}{
		{name: "16:9", key: testClientKey, prompt: "a lighthouse at dusk, 比例 16:9", width: 2048, height: 1152},
		{name: "9:16", key: testClientKey, prompt: "a tall tower ratio 9:16", width: 1152, height: 2048},
		{name: "3:2", key: testClientKey, prompt: "a field of tulips, ratio: 3:2", width: 1920, height: 1280},
		{name: "default 1:1", key: testClientKey, prompt: "a red bicycle", width: 2048, height: 2048},
	} {
		t.Run(tc.name, func(t *testing.T) {
			res := runPage(t, browser, page, tc.key, tc.prompt)
			if res.FetchError != "" || res.RenderError != "" || res.Status != http.StatusOK {
				t.Fatalf("page: status %d, fetch error %q, render error %q, body %s",
					res.Status, res.FetchError, res.RenderError, res.Raw)
			}
			if want := baseURL + demoPath; !strings.HasPrefix(res.ImageURL, want) {
				t.Errorf("image URL %q is not the gateway's placeholder under %s", res.ImageURL, want)
			}
			if res.Width != tc.width || res.Height != tc.height {
				t.Errorf("rendered image is %d×%d, want %d×%d (%s)", res.Width, res.Height, tc.width, tc.height, res.ImageURL)
			}
		})
	}

	t.Run("wrong key", func(t *testing.T) {
		res := runPage(t, browser, page, "sk-not-a-configured-key", "a red bicycle")
		if res.FetchError != "" {
			t.Fatalf("the browser blocked the 401 answer (no CORS headers on errors?): %s", res.FetchError)
		}
		if res.Status != http.StatusUnauthorized {
			t.Fatalf("page read status %d, want 401; body %s", res.Status, res.Raw)
		}
		if want := "Incorrect or missing API key"; !strings.Contains(res.Error, want) {
			t.Errorf("page shows error %q, want it to contain %q", res.Error, want)
		}
		if res.Width != 0 || res.ImageURL != "" {
			t.Errorf("page rendered an image after a 401: %s", res.ImageURL)
		}
	})
}

// TestBrowserNeedsCORS is the control for the test above: without the
// snippet the same page is blocked by the browser, so the pages really are
// cross-origin and the snippet is what lets them through.
func TestBrowserNeedsCORS(t *testing.T) {
	browser := startBrowser(t)
	page := newPageServer(t)
	startCaddyRaw(t, browserCaddyfile(t, false))

	res := runPage(t, browser, page, testClientKey, "a red bicycle")
	if res.FetchError == "" || res.Status != 0 {
		t.Fatalf("without the CORS snippet the page read status %d (fetch error %q); want the fetch blocked",
			res.Status, res.FetchError)
	}
}

// streamHelperPage replays, with fetch from another origin, the request
// the openai npm package (v5) makes for chat.completions.stream() in a
// browser: its stream helper adds X-Stainless-Helper-Method to the
// headers every call carries (the X-Stainless-* platform headers, Accept,
// and OpenAI-Organization / OpenAI-Project when the client is configured
// with them). It reads the whole event stream and writes what happened
// into #result, as browserPage does.
const streamHelperPage = `<!doctype html>
<html><head><meta charset="utf-8"><title>zimage stream helper test</title></head>
<body>
<pre id="result"></pre>
<script>
async function run() {
	const q = new URLSearchParams(location.search);
	const out = {};
	try {
		const resp = await fetch(q.get("gw") + "/v1/chat/completions", {
			method: "POST",
			headers: {
				"Accept": "application/json",
				"Content-Type": "application/json",
				"Authorization": "Bearer " + q.get("key"),
				"OpenAI-Organization": "org-test",
				"OpenAI-Project": "proj_test",
				"X-Stainless-Lang": "js",
				"X-Stainless-Package-Version": "5.23.2",
				"X-Stainless-OS": "Unknown",
				"X-Stainless-Arch": "unknown",
				"X-Stainless-Runtime": "browser:chrome",
				"X-Stainless-Runtime-Version": "141.0.0",
				"X-Stainless-Retry-Count": "0",
				"X-Stainless-Timeout": "600",
				"X-Stainless-Helper-Method": "stream",
			},
			body: JSON.stringify({model: "Z-Image", stream: true, messages: [{role: "user", content: q.get("prompt")}]}),
		});
		out.status = resp.status;
		out.raw = await resp.text();
	} catch (e) {
		out.fetchError = String(e);
	} finally {
		document.getElementById("result").textContent = JSON.stringify(out);
		const done = document.createElement("div");
		done.id = "done";
		document.body.appendChild(done);
	}
}
run();
</script>
</body></html>
`

// TestBrowserCORSStreamHelper: the CORS snippet as the README shows it
// (taken from README.md, so the README cannot drift) lets a page on
// another origin make the request of the openai JS SDK's stream helper,
// X-Stainless-Helper-Method and all, and read the streamed answer.
func TestBrowserCORSStreamHelper(t *testing.T) {
	blocks, _, _ := readmeBlocks(t, "caddy")
	snippet := ""
	for _, b := range blocks {
		if strings.Contains(b, "(cors) {") {
			snippet = corsSnippetIn(t, "README.md", b)
			break
		}
	}
	if snippet == "" {
		t.Fatal("README.md has no caddy block with the (cors) snippet")
	}
	browser := startBrowser(t)
	startCaddyRaw(t, fmt.Sprintf(`%s

%s

:%d {
	import cors
	zimage_gateway {
		api_key %s
		upstream demo
		enhance off
	}
}
`, globals(), snippet, httpPort, testClientKey))

	t.Run("its headers replayed", func(t *testing.T) {
		res := runPage(t, browser, servePage(t, streamHelperPage), testClientKey, "a red bicycle")
		if res.FetchError != "" || res.Status != http.StatusOK {
			t.Fatalf("the stream helper's request through the README's snippet: status %d, fetch error %q (a header the snippet does not allow?), body %.300s", res.Status, res.FetchError, res.Raw)
		}
		if !strings.Contains(res.Raw, "chat.completion.chunk") || !strings.Contains(res.Raw, demoPath) || !strings.HasSuffix(strings.TrimSpace(res.Raw), "data: [DONE]") {
			t.Errorf("the page did not read a whole event stream with the image: %.600s", res.Raw)
		}
	})

	// the npm package itself, served to the page from a local copy:
	// clients/openai-js, which .ci/run installs with npm ci and names in
	// ZIMAGE_OPENAI_JS (in CI it must run)
	t.Run("the openai npm package", func(t *testing.T) {
		dir := os.Getenv("ZIMAGE_OPENAI_JS")
		if dir == "" {
			if os.Getenv("CI") == "true" {
				t.Fatal("ZIMAGE_OPENAI_JS is not set: .ci/run installs clients/openai-js and sets it")
			}
			t.Skip("ZIMAGE_OPENAI_JS is not set: (cd clients/openai-js && npm ci), then set it to clients/openai-js/node_modules/openai to run the SDK's own stream() in the browser")
		}
		if _, err := os.Stat(dir + "/index.mjs"); err != nil {
			t.Fatalf("ZIMAGE_OPENAI_JS=%s is not the openai package's directory: %v", dir, err)
		}
		files := http.StripPrefix("/openai/", http.FileServer(http.Dir(dir)))
		page := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			if strings.HasPrefix(r.URL.Path, "/openai/") {
				if strings.HasSuffix(r.URL.Path, ".mjs") {
					w.Header().Set("Content-Type", "text/javascript")
				}
				files.ServeHTTP(w, r)
				return
			}
			w.Header().Set("Content-Type", "text/html; charset=utf-8")
			_, _ = w.Write([]byte(sdkStreamPage))
		}))
		t.Cleanup(page.Close)
		res := runPage(t, browser, page, testClientKey, "a red bicycle")
		if res.FetchError != "" || res.Status != http.StatusOK {
			t.Fatalf("the SDK's chat.completions.stream() through the README's snippet: %+v", res)
		}
		if !strings.Contains(res.Raw, demoPath) {
			t.Errorf("the SDK's stream did not carry the image: %.600s", res.Raw)
		}
	})
}

// sdkStreamPage runs the openai npm package's chat.completions.stream()
// against the gateway on another origin and writes the text it streamed
// into #result (status 200 when the stream ended well), as browserPage does.
const sdkStreamPage = `<!doctype html>
<html><head><meta charset="utf-8"><title>zimage openai SDK test</title></head>
<body>
<pre id="result"></pre>
<script type="module">
import OpenAI from "/openai/index.mjs";
const q = new URLSearchParams(location.search);
const out = {};
try {
	const client = new OpenAI({apiKey: q.get("key"), baseURL: q.get("gw") + "/v1", dangerouslyAllowBrowser: true, maxRetries: 0});
	const stream = client.chat.completions.stream({model: "Z-Image", messages: [{role: "user", content: q.get("prompt")}]});
	let text = "";
	for await (const chunk of stream) text += (chunk.choices[0] && chunk.choices[0].delta && chunk.choices[0].delta.content) || "";
	out.status = 200;
	out.raw = text;
} catch (e) {
	out.fetchError = String(e);
} finally {
	document.getElementById("result").textContent = JSON.stringify(out);
	const done = document.createElement("div");
	done.id = "done";
	document.body.appendChild(done);
}
</script>
</body></html>
`
