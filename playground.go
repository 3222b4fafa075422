package zimage

// The playground (docs/design.md#the-playground): one page, embedded in the module,
// that tries the gateway in a browser through the gateway's own API on the
// same origin. Its config, its Caddyfile parsing, its provisioning and its
// serving live here; the page itself is in the folder playground/.

import (
	"bytes"
	"crypto/sha256"
	"embed"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"html/template"
	"io/fs"
	"net"
	"net/http"
	"path"
	"slices"
	"strings"
	"time"

	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
)

//go:embed playground
var playgroundFiles embed.FS

// defaultPlaygroundPath is where the page is served unless configured.
const defaultPlaygroundPath = "/playground"

// PlaygroundConfig turns on the playground page: a form that generates (and,
// with an edit model, edits) images through this gateway's own API, for
// people who would rather look than read. The page is served without auth;
// it asks for a client key, keeps it in the browser's localStorage and sends
// it only to this site. It is off unless configured.
type PlaygroundConfig struct {
	// Path is where the page is served: GET <path> and <path>/ answer the
	// page, and its assets and config.json are under <path>/. It must be an
	// absolute, clean path made of letters, digits and - . _ ~ /, and must
	// not overlap the gateway's API paths (/v1/…, /models, /chat, /images,
	// /zimage…). Default: /playground.
	Path string `json:"path,omitempty"`
}

// playground is a provisioned PlaygroundConfig: everything it answers is
// built once, so serving is a map lookup.
type playground struct {
	path  string // no trailing slash
	csp   string
	files map[string]*playgroundFile // by request path
}

// playgroundFile is one answer: the page, an asset or config.json.
type playgroundFile struct {
	body         []byte
	contentType  string
	etag         string
	cacheControl string
	version      string // an asset's hash as the page names it (?v=)
	page         bool   // the HTML page: it carries the CSP
}

// playgroundAPISegments are first path segments that belong to the API
// (with or without /v1, docs/design.md#endpoints-and-errors; /zimage… for the store of docs/design.md#the-store): a
// playground there would hide an endpoint, or an endpoint would hide it.
var playgroundAPISegments = []string{"v1", "models", "chat", "images", "zimage"}

// playgroundPath validates a configured path and returns it without its
// trailing slash; "" selects the default.
func playgroundPath(p string) (string, error) {
	if p == "" {
		return defaultPlaygroundPath, nil
	}
	if !strings.HasPrefix(p, "/") {
		return "", fmt.Errorf("zimage_gateway: playground: path %q must be absolute (start with /)", p)
	}
	for _, c := range p {
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || strings.ContainsRune("-._~/", c)) {
			return "", fmt.Errorf("zimage_gateway: playground: path %q may only contain letters, digits and - . _ ~ /", p)
		}
	}
	clean := strings.TrimRight(p, "/")
	if clean == "" {
		return "", fmt.Errorf("zimage_gateway: playground: path %q is the site root; choose a path such as %s", p, defaultPlaygroundPath)
	}
	if path.Clean(clean) != clean {
		return "", fmt.Errorf("zimage_gateway: playground: path %q is not clean (no //, . or .. segments)", p)
	}
	first, _, _ := strings.Cut(clean[1:], "/")
	for _, seg := range playgroundAPISegments {
		// /zimage-demo, /zimage_x: the gateway's own namespace, kept free
		if first == seg || seg == "zimage" && strings.HasPrefix(first, seg) {
			return "", fmt.Errorf("zimage_gateway: playground: path %q collides with the gateway's API paths (/v1/…, /models, /chat/…, /images/…, /zimage…)", p)
		}
	}
	return clean, nil
}

// unmarshalPlayground parses `playground [<path>]`.
func unmarshalPlayground(d *caddyfile.Dispenser) (*PlaygroundConfig, error) {
	pc := new(PlaygroundConfig)
	if d.NextArg() {
		pc.Path = d.Val()
	}
	if d.NextArg() {
		return nil, d.ArgErr()
	}
	if d.NextBlock(d.Nesting()) {
		return nil, d.Err("zimage_gateway: playground takes no block, only an optional path")
	}
	if _, err := playgroundPath(pc.Path); err != nil {
		return nil, d.Err(err.Error())
	}
	return pc, nil
}

// playgroundConfig is GET <path>/config.json: what the page cannot learn
// from the API. No secret goes in it: it is served without auth.
type playgroundConfig struct {
	// EditModels are the names of the edit models (docs/design.md#edits); the page
	// offers its edit panel only when there is one.
	EditModels []string `json:"edit_models"`
	// Store says whether generated images are kept on this site (docs/design.md#the-store),
	// so links in the page's history stay valid.
	Store bool `json:"store"`
	// Enhance says whether an LLM rewrites prompts; without one the page's
	// enhancement switch has nothing to switch.
	Enhance bool `json:"enhance"`
	// Demo says the upstream is the placeholder renderer (docs/design.md#the-demo).
	Demo bool `json:"demo"`
	// KeyRequired is false under no_auth: the page asks for no key.
	KeyRequired bool `json:"key_required"`
}

// provisionPlayground builds the page, its assets, config.json and the CSP.
// It runs after the models, the upstream, the enhancer and the image
// fetcher are provisioned: the page's config and its img-src derive from them.
func (g *Gateway) provisionPlayground() (*playground, error) {
	if g.Playground == nil {
		return nil, nil
	}
	base, err := playgroundPath(g.Playground.Path)
	if err != nil {
		return nil, err
	}
	p := &playground{path: base, files: map[string]*playgroundFile{}}

	// the assets, each named by a hash of its bytes in the page, so that it
	// can be cached for good and an upgrade still loads the new one
	versions := map[string]string{}
	err = fs.WalkDir(playgroundFiles, "playground", func(name string, de fs.DirEntry, err error) error {
		if err != nil || de.IsDir() || path.Base(name) == "index.html" {
			return err
		}
		b, err := playgroundFiles.ReadFile(name)
		if err != nil {
			return err
		}
		rel := strings.TrimPrefix(name, "playground/")
		f := newPlaygroundFile(b, playgroundContentType(rel))
		f.version = f.etag[1:13]
		f.cacheControl = "no-cache" // when asked for without the current ?v=
		p.files[base+"/"+rel] = f
		versions[rel] = f.version
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("zimage_gateway: playground: reading the embedded assets: %v", err)
	}

	// the page: assets by absolute, versioned URLs (the page answers at
	// <path> without a slash too, where relative URLs would miss)
	tmpl, err := template.New("index.html").Funcs(template.FuncMap{
		"asset": func(name string) (string, error) {
			v, ok := versions[name]
			if !ok {
				return "", fmt.Errorf("no embedded asset %q", name)
			}
			return base + "/" + name + "?v=" + v, nil
		},
	}).ParseFS(playgroundFiles, "playground/index.html")
	if err != nil {
		return nil, fmt.Errorf("zimage_gateway: playground: parsing the page: %v", err)
	}
	var page bytes.Buffer
	if err := tmpl.Execute(&page, struct{ Base string }{base}); err != nil {
		return nil, fmt.Errorf("zimage_gateway: playground: rendering the page: %v", err)
	}
	pf := newPlaygroundFile(page.Bytes(), "text/html; charset=utf-8")
	pf.cacheControl = "no-cache" // revalidated (ETag), so an upgrade shows at once
	pf.page = true
	p.files[base] = pf
	p.files[base+"/"] = pf

	cfg := playgroundConfig{EditModels: []string{}, KeyRequired: !g.NoAuth, Enhance: g.enhancer != nil}
	for _, m := range g.models {
		if m.edit {
			cfg.EditModels = append(cfg.EditModels, m.name)
		}
	}
	_, cfg.Demo = g.upstream.(demoGenerator)
	cfg.Store = g.store != nil
	cb, err := json.Marshal(cfg)
	if err != nil {
		return nil, err
	}
	cf := newPlaygroundFile(cb, "application/json")
	cf.cacheControl = "no-cache"
	p.files[base+"/config.json"] = cf

	p.csp = playgroundCSP(g.fetcher)
	return p, nil
}

func newPlaygroundFile(b []byte, contentType string) *playgroundFile {
	sum := sha256.Sum256(b)
	return &playgroundFile{body: b, contentType: contentType, etag: `"` + hex.EncodeToString(sum[:16]) + `"`}
}

// playgroundContentType names the types of the files in playground/; an
// unknown extension is a build mistake, caught by the unit test that walks
// the folder.
func playgroundContentType(name string) string {
	switch path.Ext(name) {
	case ".js":
		return "text/javascript; charset=utf-8"
	case ".css":
		return "text/css; charset=utf-8"
	case ".svg":
		return "image/svg+xml"
	case ".png":
		return "image/png"
	case ".html":
		return "text/html; charset=utf-8"
	}
	return "application/octet-stream"
}

// playgroundCSP is the page's Content-Security-Policy: nothing inline,
// nothing from elsewhere, except images. With the demo upstream or the store
// the images are on this site ('self'); data: and blob: are the page's own
// previews (a picked file). Without the store, images are the image
// service's URLs: the policy allows exactly the hosts the gateway itself
// downloads images from (the upstream's host, image_hosts, and their
// subdomains, as for b64_json), on any port, so the policy stays as narrow
// as the gateway's own trust and an operator widens both in one place.
func playgroundCSP(f *imageFetcher) string {
	img := []string{"'self'", "data:", "blob:"}
	if f != nil {
		hosts := make([]string, 0, len(f.hosts))
		for h := range f.hosts {
			hosts = append(hosts, h)
		}
		slices.Sort(hosts)
		for _, h := range hosts {
			if strings.Contains(h, ":") { // an IPv6 literal has no CSP host-source form
				continue
			}
			img = append(img, h+":*")
			if net.ParseIP(h) == nil {
				img = append(img, "*."+h+":*")
			}
		}
	}
	return strings.Join([]string{
		"default-src 'self'",
		"script-src 'self'",
		"style-src 'self'",
		"img-src " + strings.Join(img, " "),
		"connect-src 'self'",
		"object-src 'none'",
		"base-uri 'none'",
		"form-action 'none'", // the forms are the script's: never a navigation that could carry the key
		"frame-ancestors 'none'",
	}, "; ")
}

// serve answers r when its path is the playground's, and reports whether it
// did. It runs before authentication: the page and its assets hold no secret.
func (p *playground) serve(w http.ResponseWriter, r *http.Request) bool {
	if r.URL.Path != p.path && !strings.HasPrefix(r.URL.Path, p.path+"/") {
		return false
	}
	h := w.Header()
	h.Set("X-Content-Type-Options", "nosniff")
	f, ok := p.files[r.URL.Path]
	if !ok {
		http.Error(w, "404 not found: no such playground file", http.StatusNotFound)
		return true
	}
	if r.Method != http.MethodGet && r.Method != http.MethodHead {
		h.Set("Allow", "GET, HEAD")
		http.Error(w, "405 method not allowed: use GET", http.StatusMethodNotAllowed)
		return true
	}
	if f.page {
		h.Set("Content-Security-Policy", p.csp)
		h.Set("X-Frame-Options", "DENY") // frame-ancestors for browsers without CSP 2
		h.Set("Referrer-Policy", "no-referrer")
	}
	h.Set("Content-Type", f.contentType)
	h.Set("ETag", f.etag)
	if f.version != "" && r.URL.Query().Get("v") == f.version {
		h.Set("Cache-Control", "public, max-age=31536000, immutable")
	} else {
		h.Set("Cache-Control", f.cacheControl)
	}
	// ServeContent answers If-None-Match (304), HEAD and Range
	http.ServeContent(w, r, "", time.Time{}, bytes.NewReader(f.body))
	return true
}
