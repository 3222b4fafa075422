package zimage

// Unit tests of the image store (docs/design.md#the-store): its Caddyfile and JSON config,
// the signature check and the id parser, put and the request origin.
// Serving (unit and through a real Caddy) is in store_serve_test.go, the
// retention sweep in store_sweep_test.go, the keep step in
// store_keep_test.go, two Caddy processes sharing one storage in
// store_cluster_test.go.

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"image"
	"image/color"
	"image/png"
	"math/rand/v2"
	"net/http"
	"net/http/httptest"
	"os"
	"path"
	"path/filepath"
	"reflect"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/certmagic"
	dto "github.com/prometheus/client_model/go"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
)

// storeTestPNG is a real PNG of w×h noise (distinct bytes on every call).
func storeTestPNG(t testing.TB, w, h int) []byte {
	t.Helper()
	img := image.NewNRGBA(image.Rect(0, 0, w, h))
	for i := range img.Pix {
		img.Pix[i] = byte(rand.IntN(256))
	}
	img.Set(0, 0, color.NRGBA{A: 255})
	var b bytes.Buffer
	if err := png.Encode(&b, img); err != nil {
		t.Fatal(err)
	}
	return b.Bytes()
}

// storeTestName is the name put gives data.
func storeTestName(data []byte, ext string) string {
	sum := sha256.Sum256(data)
	return hex.EncodeToString(sum[:16]) + "." + ext
}

// newTestFileStore is a store over a fresh file_system root, with its own
// sweep schedule so that tests do not share one.
func newTestFileStore(t *testing.T, maxAge time.Duration) (*imageStore, *certmagic.FileStorage) {
	t.Helper()
	fsto := &certmagic.FileStorage{Path: t.TempDir()}
	st := newImageStore(fsto, "zimage", maxAge, defaultStoreMaxSize, "", nil)
	st.schedule = &sweepSchedule{next: map[string]time.Time{}}
	return st, fsto
}

// storeCounter reads one series of a store metric.
func storeCounter(t *testing.T, c interface{ Write(*dto.Metric) error }) float64 {
	t.Helper()
	var m dto.Metric
	if err := c.Write(&m); err != nil {
		t.Fatal(err)
	}
	return m.GetCounter().GetValue()
}

// The store block lands in the JSON fields, the storage as the
// module object Caddy's own global `storage` option produces.
func TestUnitStoreCaddyfile(t *testing.T) {
	t.Setenv("ZIMAGE_UNIT_PUBLIC", "")
	os.Unsetenv("ZIMAGE_UNIT_PUBLIC")
	dur := func(d time.Duration) *caddy.Duration { c := caddy.Duration(d); return &c }
	for _, tc := range []struct {
		name, src string
		want      *StoreConfig
	}{
		{"bare", `store`, &StoreConfig{}},
		{"empty block", "store {\n}", &StoreConfig{}},
		{"off", `store off`, &StoreConfig{Off: true}},
		{"off keeps its settings", "store off {\n prefix x\n}", &StoreConfig{Off: true, Prefix: "x"}},
		{"storage with an argument", "store {\n storage file_system /var/lib/zimage\n}",
			&StoreConfig{StorageRaw: json.RawMessage(`{"module":"file_system","root":"/var/lib/zimage"}`)}},
		{"storage with a block", "store {\n storage file_system {\n  root /srv/img\n }\n prefix after\n}",
			&StoreConfig{StorageRaw: json.RawMessage(`{"module":"file_system","root":"/srv/img"}`), Prefix: "after"}},
		{"everything", `store {
			storage file_system /data
			prefix sites/a
			max_age 7d
			max_image_size 8MiB
			public_url https://img.example.com
		}`, &StoreConfig{
			StorageRaw: json.RawMessage(`{"module":"file_system","root":"/data"}`), Prefix: "sites/a",
			MaxAge: dur(7 * 24 * time.Hour), MaxImageSize: 8 << 20, PublicURL: "https://img.example.com",
		}},
		{"max_age 0 keeps everything", "store {\n max_age 0\n}", &StoreConfig{MaxAge: dur(0)}},
		{"max_age in hours", "store {\n max_age 12h\n}", &StoreConfig{MaxAge: dur(12 * time.Hour)}},
		{"max_image_size in MB", "store {\n max_image_size 2MB\n}", &StoreConfig{MaxImageSize: 2_000_000}},
		{"public_url with a port and a slash", "store {\n public_url http://127.0.0.1:8080/\n}", &StoreConfig{PublicURL: "http://127.0.0.1:8080/"}},
		{"public_url placeholder kept for Provision", "store {\n public_url {env.PUBLIC}\n}", &StoreConfig{PublicURL: "{env.PUBLIC}"}},
		{"public_url unset env", "store {\n public_url {$ZIMAGE_UNIT_PUBLIC}\n}", &StoreConfig{}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var g Gateway
			if err := g.UnmarshalCaddyfile(caddyfile.NewTestDispenser("zimage_gateway {\n" + tc.src + "\n}")); err != nil {
				t.Fatalf("UnmarshalCaddyfile: %v", err)
			}
			if !reflect.DeepEqual(g.Store, tc.want) {
				t.Errorf("got  %s\nwant %s", storeJSON(g.Store), storeJSON(tc.want))
			}
			if want := (Gateway{Store: tc.want}); !reflect.DeepEqual(g, want) {
				t.Errorf("fields other than Store changed: %+v", g)
			}
		})
	}
}

func storeJSON(s *StoreConfig) string { b, _ := json.Marshal(s); return string(b) }

// A bad store block fails at load, naming what to change.
func TestUnitStoreCaddyfileErrors(t *testing.T) {
	for _, tc := range []struct {
		name, src string
		want      []string
	}{
		{"argument other than off", `store on`, []string{"store", "'off'", "'on'"}},
		{"two arguments", `store off now`, []string{"wrong argument count"}},
		{"twice", "store\n store off", []string{"store already specified"}},
		{"unknown option", "store {\n root /x\n}", []string{"unrecognized zimage_gateway store option 'root'"}},
		{"option twice", "store {\n prefix a\n prefix b\n}", []string{"store prefix already specified"}},
		{"storage without module", "store {\n storage\n}", []string{"store", "storage", "module name"}},
		{"unknown storage module", "store {\n storage nosuch /x\n}", []string{"store", "storage nosuch", "caddy.storage.nosuch"}},
		{"storage module's own error", "store {\n storage file_system\n}", []string{"store", "storage file_system", "root"}},
		{"prefix with ..", "store {\n prefix ../etc\n}", []string{"store", "invalid prefix '../etc'"}},
		{"prefix with a space char", "store {\n prefix \"a b\"\n}", []string{"invalid prefix"}},
		{"prefix without value", "store {\n prefix\n}", []string{"wrong argument count"}},
		{"bad max_age", "store {\n max_age forever\n}", []string{"store", "invalid max_age 'forever'", "0 to keep"}},
		{"negative max_age", "store {\n max_age -1h\n}", []string{"invalid max_age '-1h'"}},
		{"max_age twice on a line", "store {\n max_age 1h 2h\n}", []string{"wrong argument count"}},
		{"bad max_image_size", "store {\n max_image_size big\n}", []string{"store", "invalid max_image_size 'big'"}},
		{"zero max_image_size", "store {\n max_image_size 0\n}", []string{"invalid max_image_size '0'"}},
		{"huge max_image_size", "store {\n max_image_size 2GiB\n}", []string{"invalid max_image_size '2GiB'", "1GiB"}},
		{"public_url with a path", "store {\n public_url https://example.com/img\n}", []string{"store", "invalid public_url", "no path"}},
		{"public_url not http", "store {\n public_url ftp://example.com\n}", []string{"invalid public_url 'ftp://example.com'"}},
		{"public_url relative", "store {\n public_url example.com\n}", []string{"invalid public_url 'example.com'"}},
		{"public_url with a query", "store {\n public_url https://example.com?x=1\n}", []string{"invalid public_url"}},
		{"public_url with user info", "store {\n public_url https://u:p@example.com\n}", []string{"invalid public_url"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var g Gateway
			err := g.UnmarshalCaddyfile(caddyfile.NewTestDispenser("zimage_gateway {\n" + tc.src + "\n}"))
			if err == nil {
				t.Fatalf("no error; Store = %s", storeJSON(g.Store))
			}
			for _, w := range tc.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q does not mention %q", err, w)
				}
			}
		})
	}
}

// storeProvision provisions a gateway whose store block is store (JSON).
func storeProvision(t *testing.T, store string) (*Gateway, error) {
	t.Helper()
	unitClearEnv(t)
	return unitProvision(t, `{"no_auth":true,"upstream":{"url":"demo"},"store":`+store+`}`)
}

// JSON configs get the same checks at Provision, placeholders
// resolved first; a storage module is loaded like the tls app loads one.
func TestUnitStoreProvisionErrors(t *testing.T) {
	dir := t.TempDir()
	for _, tc := range []struct {
		name, store string
		env         map[string]string
		want        []string
	}{
		{"unknown storage module", `{"storage":{"module":"nosuch"}}`, nil,
			[]string{"store: storage", "caddy.storage.nosuch"}},
		{"storage module config error", `{"storage":{"module":"file_system","root":5}}`, nil,
			[]string{"store: storage"}},
		{"negative max_age", `{"max_age":-1}`, nil, []string{"store", "max_age"}},
		{"negative max_image_size", `{"max_image_size":-1}`, nil, []string{"store", "max_image_size"}},
		{"huge max_image_size", `{"max_image_size":2147483648}`, nil, []string{"store", "max_image_size", "1GiB"}},
		{"bad prefix", `{"prefix":"a/../b"}`, nil, []string{"store", "invalid prefix"}},
		{"public_url with a path", `{"public_url":"https://example.com/x"}`, nil, []string{"store", "invalid public_url"}},
		{"public_url from env", `{"storage":{"module":"file_system","root":"` + dir + `"},"public_url":"{env.ZIMAGE_UNIT_PUBLIC}"}`,
			map[string]string{"ZIMAGE_UNIT_PUBLIC": "img.example.com"}, []string{"store", "invalid public_url 'img.example.com'"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			for k, v := range tc.env {
				t.Setenv(k, v)
			}
			_, err := storeProvision(t, tc.store)
			wantProvisionError(t, err, tc.want)
		})
	}
}

// The defaults, and what each setting turns into.
func TestUnitStoreProvision(t *testing.T) {
	dir := t.TempDir()
	storage := `"storage":{"module":"file_system","root":"` + dir + `"}`

	g, err := storeProvision(t, `{`+storage+`}`)
	if err != nil {
		t.Fatal(err)
	}
	st := g.store
	if st == nil {
		t.Fatal("store on, but g.store is nil")
	}
	if st.files == nil || st.files.Path != dir {
		t.Errorf("file_system storage: files = %+v, want the FileStorage at %s (served from the file)", st.files, dir)
	}
	if st.prefix != "zimage" || st.dir != "zimage/images/" || st.maxAge != 30*24*time.Hour || st.maxSize != 32<<20 || st.publicURL != "" {
		t.Errorf("defaults: prefix %q dir %q max_age %v max_image_size %d public_url %q", st.prefix, st.dir, st.maxAge, st.maxSize, st.publicURL)
	}
	if st.done == nil {
		t.Error("max_age 30d: the sweeper was not started")
	}
	// Cleanup stops the sweeper
	if err := g.Cleanup(); err != nil {
		t.Fatal(err)
	}
	select {
	case <-st.done:
	case <-time.After(10 * time.Second):
		t.Fatal("the sweeper did not stop on Cleanup")
	}

	t.Setenv("ZIMAGE_UNIT_PUBLIC", "https://img.example.com/")
	g, err = unitProvision(t, `{"no_auth":true,"upstream":{"url":"demo"},"store":{`+storage+
		`,"prefix":"/sites/a/","max_age":0,"max_image_size":1024,"public_url":"{env.ZIMAGE_UNIT_PUBLIC}"}}`)
	if err != nil {
		t.Fatal(err)
	}
	st = g.store
	if st.prefix != "sites/a" || st.dir != "sites/a/images/" || st.maxAge != 0 || st.maxSize != 1024 || st.publicURL != "https://img.example.com" {
		t.Errorf("settings: prefix %q dir %q max_age %v max_image_size %d public_url %q", st.prefix, st.dir, st.maxAge, st.maxSize, st.publicURL)
	}
	if st.done != nil {
		t.Error("max_age 0 keeps everything, but a sweeper was started")
	}

	for _, cfg := range []string{`{"off":true,` + storage + `}`} {
		g, err := storeProvision(t, cfg)
		if err != nil || g.store != nil {
			t.Errorf("store %s: err %v, store %+v; want off", cfg, err, g.store)
		}
	}
	g, err = unitProvision(t, `{"no_auth":true,"upstream":{"url":"demo"}}`)
	if err != nil || g.store != nil {
		t.Errorf("no store block: err %v, store %+v; want off", err, g.store)
	}
}

// The format is decided by the bytes' signature.
func TestUnitStoreSniff(t *testing.T) {
	for _, tc := range []struct {
		name, in, ext, ctype string
	}{
		{"png", "\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "png", "image/png"},
		{"jpeg", "\xff\xd8\xff\xe0\x00\x10JFIF", "jpg", "image/jpeg"},
		{"webp", "RIFF\x24\x00\x00\x00WEBPVP8 ", "webp", "image/webp"},
		{"gif89a", "GIF89a\x01\x00\x01\x00", "gif", "image/gif"},
		{"gif87a", "GIF87a\x01\x00", "gif", "image/gif"},
		{"html", "<!doctype html><title>Just a moment...</title>", "", ""},
		{"json", `{"error":"expired"}`, "", ""},
		{"svg", `<svg xmlns="http://www.w3.org/2000/svg"/>`, "", ""},
		{"empty", "", "", ""},
		{"truncated png signature", "\x89PNG\r\n", "", ""},
		{"riff that is not webp", "RIFF\x24\x00\x00\x00WAVEfmt ", "", ""},
		{"short riff", "RIFF\x24\x00WEBP", "", ""},
		{"png signature later in the file", "xx\x89PNG\r\n\x1a\n", "", ""},
		{"bmp", "BM\x36\x00\x00\x00", "", ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ext, ctype, ok := sniffImage([]byte(tc.in))
			if ext != tc.ext || ctype != tc.ctype || ok != (tc.ext != "") {
				t.Errorf("sniffImage = (%q, %q, %v), want (%q, %q, %v)", ext, ctype, ok, tc.ext, tc.ctype, tc.ext != "")
			}
		})
	}
	// a real encoder's output
	if ext, _, ok := sniffImage(storeTestPNG(t, 4, 4)); !ok || ext != "png" {
		t.Errorf("an encoded PNG is %q, %v", ext, ok)
	}
}

const storeTestID = "0123456789abcdef0123456789abcdef"

// Only {32 lowercase hex}.{png|jpg|webp|gif} is an image name.
func TestUnitStoreID(t *testing.T) {
	for _, tc := range []struct {
		name, in, ctype string
	}{
		{"png", storeTestID + ".png", "image/png"},
		{"jpg", storeTestID + ".jpg", "image/jpeg"},
		{"webp", storeTestID + ".webp", "image/webp"},
		{"gif", storeTestID + ".gif", "image/gif"},
		{"jpeg spelled out", storeTestID + ".jpeg", ""},
		{"upper-case ext", storeTestID + ".PNG", ""},
		{"upper-case id", strings.ToUpper(storeTestID) + ".png", ""},
		{"unknown ext", storeTestID + ".svg", ""},
		{"no ext", storeTestID, ""},
		{"empty ext", storeTestID + ".", ""},
		{"short id", storeTestID[1:] + ".png", ""},
		{"long id", storeTestID + "0.png", ""},
		{"full sha256", storeTestID + storeTestID + ".png", ""},
		{"not hex", "0123456789abcdeg0123456789abcdef.png", ""},
		{"double ext", storeTestID + ".png.png", ""},
		{"trailing slash", storeTestID + ".png/", ""},
		{"path", "a/" + storeTestID + ".png", ""},
		{"dotdot", "../../../../etc/passwd", ""},
		{"dotdot shaped like a name", "../" + storeTestID[3:] + ".png", ""},
		{"decoded slash", storeTestID[:16] + "/" + storeTestID[17:] + ".png", ""},
		{"backslash", storeTestID[:31] + "\\.png", ""},
		{"NUL in ext", storeTestID + ".png\x00", ""},
		{"NUL in id", storeTestID[:31] + "\x00.png", ""},
		{"empty", "", ""},
		{"overlong", strings.Repeat("a", 10000) + ".png", ""},
		{"unicode digit", "０123456789abcdef0123456789abcde.png", ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ctype, ok := parseStoreName(tc.in)
			if ctype != tc.ctype || ok != (tc.ctype != "") {
				t.Errorf("parseStoreName(%q) = (%q, %v), want (%q, %v)", tc.in, ctype, ok, tc.ctype, tc.ctype != "")
			}
		})
	}
}

var storeNamePattern = regexp.MustCompile(`^[0-9a-f]{32}\.(png|jpg|webp|gif)$`)

// FuzzStoreID: the id parser accepts exactly the names put makes, and a
// name it accepts never leaves {prefix}/images/ as a key or a file name.
func FuzzStoreID(f *testing.F) {
	for _, s := range []string{
		storeTestID + ".png", storeTestID + ".jpg", storeTestID + ".webp", storeTestID + ".gif",
		storeTestID + ".jpeg", "../" + storeTestID + ".png", storeTestID + ".png\x00", "..%2F..%2Fx",
		strings.ToUpper(storeTestID) + ".png", storeTestID[:31] + "/.png", "", ".", "..", "/",
		strings.Repeat("f", 32) + ".gif", strings.Repeat("0", 33) + ".png", storeTestID + "\xff.png",
	} {
		f.Add(s)
	}
	fsto := &certmagic.FileStorage{Path: "/srv/store"}
	f.Fuzz(func(t *testing.T, name string) {
		ctype, ok := parseStoreName(name)
		if ok != storeNamePattern.MatchString(name) {
			t.Fatalf("parseStoreName(%q) ok=%v, but the name pattern says %v", name, ok, !ok)
		}
		if !ok {
			if ctype != "" {
				t.Fatalf("parseStoreName(%q) rejected the name but returned %q", name, ctype)
			}
			return
		}
		if want, _ := storeContentType(path.Ext(name)[1:]); ctype != want {
			t.Fatalf("parseStoreName(%q) = %q, want %q", name, ctype, want)
		}
		key := "zimage/images/" + name
		if path.Clean(key) != key || path.Dir(key) != "zimage/images" {
			t.Fatalf("key %q leaves zimage/images", key)
		}
		if fn := fsto.Filename(key); filepath.Dir(fn) != filepath.Join("/srv/store", "zimage", "images") {
			t.Fatalf("file %q leaves the images directory", fn)
		}
	})
}

// Put checks the bytes, names them by their SHA-256 and stores
// the same bytes once.
func TestUnitStorePut(t *testing.T) {
	st, fsto := newTestFileStore(t, time.Hour)
	ctx := context.Background()
	img := storeTestPNG(t, 8, 8)
	stored0 := storeCounter(t, metricStoreImages.WithLabelValues(storeStored))
	dup0 := storeCounter(t, metricStoreImages.WithLabelValues(storeDuplicate))
	failed0 := storeCounter(t, metricStoreImages.WithLabelValues(storeFailed))

	name, dup, err := st.put(ctx, img)
	if err != nil || dup {
		t.Fatalf("first put: %q, duplicate %v, %v", name, dup, err)
	}
	if want := storeTestName(img, "png"); name != want {
		t.Errorf("name %q, want %q (128 bits of SHA-256, hex, and the real format's extension)", name, want)
	}
	if _, ok := parseStoreName(name); !ok {
		t.Errorf("put made a name the id parser refuses: %q", name)
	}
	on, err := os.ReadFile(filepath.Join(fsto.Path, "zimage", "images", name))
	if err != nil || !bytes.Equal(on, img) {
		t.Fatalf("the file under {prefix}/images/ holds %d bytes (%v), want the image's %d", len(on), err, len(img))
	}
	name2, dup, err := st.put(ctx, img)
	if err != nil || !dup || name2 != name {
		t.Fatalf("second put of the same bytes: %q, duplicate %v, %v; want %q, true", name2, dup, err, name)
	}

	// the extension follows the bytes, not what anyone claims
	gif := []byte("GIF89a\x01\x00\x01\x00\x80\x00\x00\xff\xff\xff\x00\x00\x00!\xf9\x04\x01\x00\x00\x00\x00,\x00\x00\x00\x00\x01\x00\x01\x00\x00\x02\x02D\x01\x00;")
	if name, _, err := st.put(ctx, gif); err != nil || name != storeTestName(gif, "gif") {
		t.Errorf("gif: %q, %v", name, err)
	}

	for _, tc := range []struct {
		name string
		data []byte
		want string
	}{
		{"html", []byte("<html>Just a moment...</html>"), "not a PNG, JPEG, WebP or GIF"},
		{"empty", nil, "not a PNG"},
		{"too large", append([]byte("\x89PNG\r\n\x1a\n"), make([]byte, 2000)...), "larger than max_image_size"},
	} {
		small := newImageStore(fsto, "zimage", time.Hour, 1024, "", nil)
		if _, _, err := small.put(ctx, tc.data); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: err %v, want %q", tc.name, err, tc.want)
		}
	}
	entries, _ := os.ReadDir(filepath.Join(fsto.Path, "zimage", "images"))
	if len(entries) != 2 {
		t.Errorf("%d files under images/, want 2 (the png and the gif): refused bytes must not be stored", len(entries))
	}
	if d := storeCounter(t, metricStoreImages.WithLabelValues(storeStored)) - stored0; d != 2 {
		t.Errorf("store_images_total{stored} grew by %v, want 2", d)
	}
	if d := storeCounter(t, metricStoreImages.WithLabelValues(storeDuplicate)) - dup0; d != 1 {
		t.Errorf("store_images_total{duplicate} grew by %v, want 1", d)
	}
	if d := storeCounter(t, metricStoreImages.WithLabelValues(storeFailed)) - failed0; d != 0 {
		t.Errorf("store_images_total{failed} grew by %v: put leaves failures to the copy step", d)
	}
}

// A duplicate of an old copy is written again, so the sweep
// (which deletes by age) does not take the image from under a new answer.
func TestUnitStorePutRefreshesOldDuplicate(t *testing.T) {
	st, fsto := newTestFileStore(t, 24*time.Hour)
	img := storeTestPNG(t, 4, 4)
	name, _, err := st.put(context.Background(), img)
	if err != nil {
		t.Fatal(err)
	}
	file := fsto.Filename(st.dir + name)
	old := time.Now().Add(-20 * time.Hour)
	if err := os.Chtimes(file, old, old); err != nil {
		t.Fatal(err)
	}
	if _, dup, err := st.put(context.Background(), img); err != nil || !dup {
		t.Fatalf("duplicate put: %v %v", dup, err)
	}
	fi, err := os.Stat(file)
	if err != nil || time.Since(fi.ModTime()) > time.Minute {
		t.Errorf("after a duplicate put the copy is %v old (%v), want fresh", time.Since(fi.ModTime()), err)
	}
	if n, err := st.sweep(context.Background()); err != nil || n != 0 {
		t.Errorf("sweep after the refresh deleted %d (%v), want 0", n, err)
	}
}

// The request's origin, X-Forwarded-* only from a trusted proxy;
// public_url wins over it.
func TestUnitStoreRequestOrigin(t *testing.T) {
	for _, tc := range []struct {
		name     string
		tls      bool
		trusted  any // the trusted_proxy var Caddy sets; nil: not set
		hdr      map[string]string
		want     string
		public   string
		wantImgs string
	}{
		{"plain", false, false, nil, "http://gw.example:8080", "", ""},
		{"tls", true, false, nil, "https://gw.example:8080", "", ""},
		{"forwarded, untrusted", false, false, map[string]string{"X-Forwarded-Proto": "https", "X-Forwarded-Host": "evil.example"}, "http://gw.example:8080", "", ""},
		{"forwarded, no var", false, nil, map[string]string{"X-Forwarded-Proto": "https", "X-Forwarded-Host": "evil.example"}, "http://gw.example:8080", "", ""},
		{"forwarded, trusted", false, true, map[string]string{"X-Forwarded-Proto": "https", "X-Forwarded-Host": "chat.example.com"}, "https://chat.example.com", "", ""},
		{"trusted, proto only", false, true, map[string]string{"X-Forwarded-Proto": "HTTPS"}, "https://gw.example:8080", "", ""},
		{"trusted, list", false, true, map[string]string{"X-Forwarded-Proto": "https, http", "X-Forwarded-Host": "a.example, b.example"}, "https://a.example", "", ""},
		{"trusted, bad proto", false, true, map[string]string{"X-Forwarded-Proto": "javascript"}, "http://gw.example:8080", "", ""},
		{"trusted, bad host", false, true, map[string]string{"X-Forwarded-Host": "a.example/x?y"}, "http://gw.example:8080", "", ""},
		{"trusted, markdown in host", false, true, map[string]string{"X-Forwarded-Host": "a.example)![x](y"}, "http://gw.example:8080", "", ""},
		{"trusted, ipv6 host", false, true, map[string]string{"X-Forwarded-Host": "[::1]:9000"}, "http://[::1]:9000", "", ""},
		{"trusted, https to http", true, true, map[string]string{"X-Forwarded-Proto": "http"}, "http://gw.example:8080", "", ""},
		{"public_url wins", false, true, map[string]string{"X-Forwarded-Host": "chat.example.com"}, "http://chat.example.com", "https://img.example.com", "https://img.example.com"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			scheme := "http"
			if tc.tls {
				scheme = "https" // httptest sets r.TLS
			}
			r := httptest.NewRequest(http.MethodGet, scheme+"://gw.example:8080/v1/chat/completions", nil)
			if tc.trusted != nil {
				r = r.WithContext(context.WithValue(r.Context(), caddyhttp.VarsCtxKey, map[string]any{caddyhttp.TrustedProxyVarKey: tc.trusted}))
			}
			for k, v := range tc.hdr {
				r.Header.Set(k, v)
			}
			if got := requestOrigin(r); got != tc.want {
				t.Errorf("requestOrigin = %q, want %q", got, tc.want)
			}
			g := &Gateway{store: &imageStore{publicURL: tc.public}}
			want := tc.wantImgs
			if want == "" {
				want = tc.want
			}
			want += "/v1/zimage/images/" + storeTestID + ".png"
			if got := g.store.url(requestOrigin(r), storeTestID+".png"); got != want {
				t.Errorf("store URL = %q, want %q", got, want)
			}
		})
	}
}
