package zimage

// Unit tests of the image store (docs/design.md#the-store): its Caddyfile and JSON config,
// the signature check and the id parser, put, serving over the two storage
// paths, the request origin, and the retention sweep. Serving through a
// real Caddy is in store_serve_test.go, two Caddy processes sharing one
// storage in store_cluster_test.go.

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"image"
	"image/color"
	"image/png"
	"io"
	"math/rand/v2"
	"net/http"
	"net/http/httptest"
	"os"
	"path"
	"path/filepath"
	"reflect"
	"regexp"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
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

// hiddenStorage hides the concrete storage type, so a store over it takes
// the generic path (Load), as with Redis or S3 storage modules; it counts
// the calls that read images.
type hiddenStorage struct {
	certmagic.Storage
	loads atomic.Int32
}

func (h *hiddenStorage) Load(ctx context.Context, key string) ([]byte, error) {
	h.loads.Add(1)
	return h.Storage.Load(ctx, key)
}

// docs/design.md#the-store over both storage paths, without Caddy: status, headers, the
// 304 that needs no Load, Range, 404 and 405.
func TestUnitStoreServe(t *testing.T) {
	fileStore, fsto := newTestFileStore(t, 0)
	hidden := &hiddenStorage{Storage: fsto}
	generic := newImageStore(hidden, "zimage", 0, defaultStoreMaxSize, "", nil)
	if generic.files != nil {
		t.Fatal("a storage that is not *certmagic.FileStorage must not take the file path")
	}
	img := storeTestPNG(t, 16, 16)
	name, _, err := fileStore.put(context.Background(), img)
	if err != nil {
		t.Fatal(err)
	}
	etag := `"` + strings.TrimSuffix(name, ".png") + `"`
	for _, st := range []*imageStore{fileStore, generic} {
		kind := "file"
		if st == generic {
			kind = "generic"
		}
		serve := func(method, name string, hdr ...string) *httptest.ResponseRecorder {
			r := httptest.NewRequest(method, "/v1/zimage/images/x", nil)
			for i := 0; i+1 < len(hdr); i += 2 {
				r.Header.Set(hdr[i], hdr[i+1])
			}
			w := httptest.NewRecorder()
			if code := st.serve(w, r, name); code != w.Code {
				t.Errorf("%s %s %s: serve returned %d but answered %d", kind, method, name, code, w.Code)
			}
			return w
		}
		t.Run(kind, func(t *testing.T) {
			w := serve(http.MethodGet, name)
			want := http.Header{
				"Content-Type":           {"image/png"},
				"Content-Length":         {fmt.Sprint(len(img))},
				"Etag":                   {etag},
				"Cache-Control":          {"public, max-age=31536000, immutable"},
				"X-Content-Type-Options": {"nosniff"},
				"Accept-Ranges":          {"bytes"},
			}
			if w.Code != 200 || !reflect.DeepEqual(w.Header(), want) || !bytes.Equal(w.Body.Bytes(), img) {
				t.Errorf("GET: %d %v, %d bytes; want 200 %v and the image", w.Code, w.Header(), w.Body.Len(), want)
			}
			if w := serve(http.MethodHead, name); w.Code != 200 || w.Body.Len() != 0 || w.Header().Get("Content-Length") != fmt.Sprint(len(img)) {
				t.Errorf("HEAD: %d, %d body bytes, Content-Length %q", w.Code, w.Body.Len(), w.Header().Get("Content-Length"))
			}
			loads := hidden.loads.Load()
			for _, inm := range []string{etag, "W/" + etag, `"other", ` + etag, "*"} {
				w := serve(http.MethodGet, name, "If-None-Match", inm)
				if w.Code != 304 || w.Body.Len() != 0 || w.Header().Get("Etag") != etag || w.Header().Get("Content-Length") != "" {
					t.Errorf("If-None-Match %s: %d %v %d bytes; want 304 with the ETag", inm, w.Code, w.Header(), w.Body.Len())
				}
			}
			if d := hidden.loads.Load() - loads; d != 0 {
				t.Errorf("a 304 loaded the image %d times; it needs only to know it exists", d)
			}
			if w := serve(http.MethodGet, name, "If-None-Match", `"other"`); w.Code != 200 || !bytes.Equal(w.Body.Bytes(), img) {
				t.Errorf("If-None-Match of another tag: %d", w.Code)
			}
			w = serve(http.MethodGet, name, "Range", "bytes=8-15")
			if w.Code != 206 || !bytes.Equal(w.Body.Bytes(), img[8:16]) || w.Header().Get("Content-Range") != fmt.Sprintf("bytes 8-15/%d", len(img)) {
				t.Errorf("Range: %d %q %q", w.Code, w.Header().Get("Content-Range"), w.Body.Bytes())
			}
			w = serve(http.MethodGet, name, "Range", "bytes=8-15", "If-Range", etag)
			if w.Code != 206 {
				t.Errorf("If-Range with the strong ETag: %d, want 206", w.Code)
			}
			w = serve(http.MethodGet, name, "Range", fmt.Sprintf("bytes=%d-", len(img)+10))
			if w.Code != 416 || apiErrOf(t, w).Code != "range_not_satisfiable" || w.Header().Get("Cache-Control") != "" {
				t.Errorf("Range beyond the end: %d %v %s", w.Code, w.Header(), w.Body.Bytes())
			}
			w = serve(http.MethodGet, name, "If-Match", `"other"`)
			if w.Code != 412 || apiErrOf(t, w).Code != "precondition_failed" {
				t.Errorf("If-Match of another tag: %d %s", w.Code, w.Body.Bytes())
			}
			for _, n := range []string{storeTestID + ".png", "../../x", name + "\x00"} {
				w := serve(http.MethodGet, n)
				if w.Code != 404 || apiErrOf(t, w).Code != "not_found" || w.Header().Get("Cache-Control") != "" {
					t.Errorf("GET %q: %d %v %s", n, w.Code, w.Header(), w.Body.Bytes())
				}
				if w := serve(http.MethodGet, n, "If-None-Match", `"`+storeTestID+`"`); w.Code != 404 {
					t.Errorf("GET %q with If-None-Match of its id: %d, want 404", n, w.Code)
				}
			}
			for _, m := range []string{http.MethodPost, http.MethodPut, http.MethodDelete, http.MethodPatch} {
				w := serve(m, name)
				if w.Code != 405 || apiErrOf(t, w).Code != "method_not_allowed" || w.Header().Get("Allow") != "GET, HEAD" {
					t.Errorf("%s: %d %v %s", m, w.Code, w.Header(), w.Body.Bytes())
				}
			}
			if w := serve(http.MethodOptions, name); w.Code != 204 {
				t.Errorf("OPTIONS: %d, want 204 (CORS preflight)", w.Code)
			}
		})
	}
}

func apiErrOf(t *testing.T, w *httptest.ResponseRecorder) errorDetail {
	t.Helper()
	if ct := w.Header().Get("Content-Type"); ct != "application/json" {
		t.Errorf("error Content-Type %q", ct)
	}
	return apiErr(t, w.Body.Bytes())
}

// brokenStorage fails every read but says the key exists: a storage that
// is down.
type brokenStorage struct{ certmagic.Storage }

func (brokenStorage) Load(context.Context, string) ([]byte, error) {
	return nil, errors.New("connection refused")
}
func (brokenStorage) Exists(context.Context, string) bool { return true }

// A storage that cannot be read is a 500 in the envelope, not a 404.
func TestUnitStoreServeStorageDown(t *testing.T) {
	st := newImageStore(brokenStorage{}, "zimage", 0, defaultStoreMaxSize, "", nil)
	w := httptest.NewRecorder()
	if code := st.serve(w, httptest.NewRequest(http.MethodGet, "/", nil), storeTestID+".png"); code != 500 || w.Code != 500 ||
		apiErrOf(t, w).Code != "storage_error" || strings.Contains(w.Body.String(), "refused") {
		t.Errorf("%d %s", w.Code, w.Body.Bytes())
	}
}

// discardWriter is a ResponseWriter that drops the body, with ReadFrom
// like net/http's (so sendfile-style copies do not buffer).
type discardWriter struct{ h http.Header }

func (d *discardWriter) Header() http.Header         { return d.h }
func (d *discardWriter) WriteHeader(int)             {}
func (d *discardWriter) Write(b []byte) (int, error) { return len(b), nil }
func (d *discardWriter) ReadFrom(r io.Reader) (int64, error) {
	buf := make([]byte, 32<<10)
	return io.CopyBuffer(struct{ io.Writer }{io.Discard}, r, buf)
}

// With file_system storage an image is served from the file,
// not read into memory whole: serving a 16 MiB image allocates far less
// than 16 MiB (the generic path, which must Load, allocates all of it).
func TestUnitStoreServeFromFile(t *testing.T) {
	st, fsto := newTestFileStore(t, 0)
	big := append(pngHeader(2048, 2048), make([]byte, 16<<20)...)
	name, _, err := st.put(context.Background(), big)
	if err != nil {
		t.Fatal(err)
	}
	alloc := func(st *imageStore) uint64 {
		var m0, m1 runtime.MemStats
		runtime.GC()
		runtime.ReadMemStats(&m0)
		w := &discardWriter{h: http.Header{}}
		if code := st.serve(w, httptest.NewRequest(http.MethodGet, "/", nil), name); code != 200 {
			t.Fatalf("serve: %d", code)
		}
		runtime.ReadMemStats(&m1)
		return m1.TotalAlloc - m0.TotalAlloc
	}
	if a := alloc(st); a > 1<<20 {
		t.Errorf("serving a 16 MiB image from file_system storage allocated %d bytes", a)
	}
	if a := alloc(newImageStore(&hiddenStorage{Storage: fsto}, "zimage", 0, defaultStoreMaxSize, "", nil)); a < 16<<20 {
		t.Errorf("the generic path allocated only %d bytes: the measurement cannot tell the two apart", a)
	}
}

// makeOld sets a stored image's modification time to age ago.
func makeOld(t *testing.T, fsto *certmagic.FileStorage, key string, age time.Duration) {
	t.Helper()
	old := time.Now().Add(-age)
	if err := os.Chtimes(fsto.Filename(key), old, old); err != nil {
		t.Fatal(err)
	}
}

// The sweep deletes images older than max_age, keeps newer
// ones, and touches nothing that is not one of the store's images.
func TestUnitStoreSweep(t *testing.T) {
	st, fsto := newTestFileStore(t, time.Hour)
	ctx := context.Background()
	if n, err := st.sweep(ctx); n != 0 || err != nil {
		t.Fatalf("sweep of an empty storage: %d, %v", n, err)
	}
	oldName, _, _ := st.put(ctx, storeTestPNG(t, 4, 4))
	newName, _, _ := st.put(ctx, storeTestPNG(t, 4, 4))
	makeOld(t, fsto, st.dir+oldName, 2*time.Hour)
	// not the store's: other keys of the storage, and odd files beside the images
	others := []string{"certificates/acme/x.crt", "zimage/notes.txt", "zimage/images/README", "zimage/images/" + strings.ToUpper(storeTestID) + ".png", "other/images/" + storeTestID + ".png"}
	for _, k := range others {
		if err := fsto.Store(ctx, k, []byte("x")); err != nil {
			t.Fatal(err)
		}
		makeOld(t, fsto, k, 48*time.Hour)
	}
	deleted0 := storeCounter(t, metricStoreDeleted)

	n, err := st.sweep(ctx)
	if n != 1 || err != nil {
		t.Fatalf("sweep deleted %d (%v), want 1", n, err)
	}
	if fsto.Exists(ctx, st.dir+oldName) {
		t.Error("the image older than max_age is still there")
	}
	if !fsto.Exists(ctx, st.dir+newName) {
		t.Error("the new image was deleted")
	}
	for _, k := range others {
		if !fsto.Exists(ctx, k) {
			t.Errorf("%s is not the store's image, but the sweep deleted it", k)
		}
	}
	if d := storeCounter(t, metricStoreDeleted) - deleted0; d != 1 {
		t.Errorf("store_deleted_total grew by %v, want 1", d)
	}
	// the lock is released: the next sweep takes it again at once
	if n, err := st.sweep(ctx); n != 0 || err != nil {
		t.Errorf("second sweep: %d, %v", n, err)
	}

	keep, kfs := newTestFileStore(t, 0)
	name, _, _ := keep.put(ctx, storeTestPNG(t, 4, 4))
	makeOld(t, kfs, keep.dir+name, 1000*24*time.Hour)
	if n, err := keep.sweep(ctx); n != 0 || err != nil || !kfs.Exists(ctx, keep.dir+name) {
		t.Errorf("max_age 0 keeps everything: sweep deleted %d (%v)", n, err)
	}
}

// gatedStorage holds every Delete until the gate opens, so a test can
// look at the world while a sweep is in progress.
type gatedStorage struct {
	*certmagic.FileStorage
	entered chan string   // a Delete has begun (key)
	gate    chan struct{} // closed: deletes go ahead
}

func (g *gatedStorage) Delete(ctx context.Context, key string) error {
	g.entered <- key
	<-g.gate
	return g.FileStorage.Delete(ctx, key)
}

// Serving is never held up by a sweep, which holds the storage
// lock, so that a second instance skips its turn rather than sweep at the
// same time.
func TestUnitStoreSweepConcurrent(t *testing.T) {
	_, fsto := newTestFileStore(t, 0)
	gs := &gatedStorage{FileStorage: fsto, entered: make(chan string, 16), gate: make(chan struct{})}
	sweeper := newImageStore(gs, "zimage", time.Hour, defaultStoreMaxSize, "", nil)
	server := newImageStore(fsto, "zimage", time.Hour, defaultStoreMaxSize, "", nil) // a second instance, same storage
	ctx := context.Background()
	oldImg, newImg := storeTestPNG(t, 8, 8), storeTestPNG(t, 8, 8)
	oldName, _, _ := server.put(ctx, oldImg)
	newName, _, _ := server.put(ctx, newImg)
	makeOld(t, fsto, server.dir+oldName, 3*time.Hour)

	type sweepResult struct {
		n   int
		err error
	}
	done := make(chan sweepResult, 1)
	go func() { n, err := sweeper.sweep(ctx); done <- sweepResult{n, err} }()
	select {
	case <-gs.entered:
	case <-time.After(10 * time.Second):
		t.Fatal("the sweep never reached the old image")
	}

	// the sweep is in progress, between its lock and its Delete
	var wg sync.WaitGroup
	var bad atomic.Int32
	for i := range 20 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			name, want := newName, newImg
			if i%2 == 1 {
				name, want = oldName, oldImg // not deleted yet: still served
			}
			w := httptest.NewRecorder()
			if server.serve(w, httptest.NewRequest(http.MethodGet, "/", nil), name); w.Code != 200 || !bytes.Equal(w.Body.Bytes(), want) {
				bad.Add(1)
			}
		}()
	}
	wg.Wait()
	if n := bad.Load(); n != 0 {
		t.Errorf("%d of 20 requests served during a sweep failed", n)
	}
	if n, err := server.sweep(ctx); n != 0 || !errors.Is(err, errSweepBusy) {
		t.Errorf("a second instance swept (%d, %v) while the first held the lock; want errSweepBusy", n, err)
	}

	close(gs.gate)
	var r sweepResult
	select {
	case r = <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("the sweep did not finish")
	}
	if r.n != 1 || r.err != nil {
		t.Errorf("sweep: %d, %v; want 1 deleted", r.n, r.err)
	}
	if w := httptest.NewRecorder(); server.serve(w, httptest.NewRequest(http.MethodGet, "/", nil), oldName) != 404 {
		t.Errorf("the swept image: %d, want 404", w.Code)
	}
	if w := httptest.NewRecorder(); server.serve(w, httptest.NewRequest(http.MethodGet, "/", nil), newName) != 200 {
		t.Errorf("the new image after the sweep: %d, want 200", w.Code)
	}
}

// The sweeper runs in the background, shortly after start and
// then every interval, and stops when its store is cleaned up.
func TestUnitStoreSweeper(t *testing.T) {
	st, fsto := newTestFileStore(t, time.Hour)
	st.firstSweep, st.sweepEvery = 10*time.Millisecond, 30*time.Millisecond
	ctx := context.Background()
	a, _, _ := st.put(ctx, storeTestPNG(t, 4, 4))
	makeOld(t, fsto, st.dir+a, 2*time.Hour)
	st.start(ctx)
	waitFor(t, "the first sweep", func() bool { return !fsto.Exists(ctx, st.dir+a) })
	b, _, _ := st.put(ctx, storeTestPNG(t, 4, 4))
	makeOld(t, fsto, st.dir+b, 2*time.Hour)
	waitFor(t, "a later sweep", func() bool { return !fsto.Exists(ctx, st.dir+b) })
	st.stop()
	select {
	case <-st.done:
	case <-time.After(10 * time.Second):
		t.Fatal("the sweeper did not stop")
	}
}

// Sweeps come at most once per interval per store, however
// many times the config is reloaded (each reload provisions a new store
// whose sweeper starts again) and however many sites share the storage.
func TestUnitStoreSweepSchedule(t *testing.T) {
	sc := &sweepSchedule{next: map[string]time.Time{}}
	t0 := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	for _, step := range []struct {
		key     string
		at      time.Duration
		due     bool
		nextDue time.Duration
	}{
		{"a", 0, true, 0},
		{"a", time.Minute, false, time.Hour}, // a reload a minute later
		{"b", time.Minute, true, 0},          // another storage: its own turn
		{"a", 59 * time.Minute, false, time.Hour},
		{"a", time.Hour, true, 0},
		{"a", time.Hour + time.Second, false, 2 * time.Hour},
	} {
		due, next := sc.claim(step.key, t0.Add(step.at), time.Hour)
		if due != step.due || (!due && !next.Equal(t0.Add(step.nextDue))) {
			t.Errorf("claim(%s at +%v) = %v, %v; want %v, +%v", step.key, step.at, due, next.Sub(t0), step.due, step.nextDue)
		}
	}

	// two sweepers of one store (a reload: old and new config) sweep once
	_, fsto := newTestFileStore(t, 0)
	counting := &countingLister{FileStorage: fsto}
	sched := &sweepSchedule{next: map[string]time.Time{}}
	var stores []*imageStore
	for range 2 {
		st := newImageStore(counting, "zimage", time.Hour, defaultStoreMaxSize, "", nil)
		st.schedule, st.scheduleKey = sched, "same"
		st.firstSweep, st.sweepEvery = time.Millisecond, time.Hour
		st.start(context.Background())
		stores = append(stores, st)
	}
	for _, st := range stores {
		waitFor(t, "both sweepers to wake up", func() bool { return st.wakes.Load() > 0 })
	}
	for _, st := range stores {
		st.stop()
		<-st.done
	}
	if n := counting.lists.Load(); n != 1 {
		t.Errorf("two sweepers of one store swept %d times, want 1", n)
	}
}

// countingLister counts sweeps (each lists the images once, and the kept
// responses once, which are not counted).
type countingLister struct {
	*certmagic.FileStorage
	lists atomic.Int32
}

func (c *countingLister) List(ctx context.Context, prefix string, recursive bool) ([]string, error) {
	if strings.HasSuffix(prefix, "/images") {
		c.lists.Add(1)
	}
	return c.FileStorage.List(ctx, prefix, recursive)
}

// The store's paths, with and without /v1; the name is passed on
// as it came, for parseStoreName to judge.
func TestUnitStoreRoute(t *testing.T) {
	for _, tc := range []struct {
		path string
		want route
		name string
	}{
		{"/v1/zimage/images/" + storeTestID + ".png", routeStoreImage, storeTestID + ".png"},
		{"/zimage/images/" + storeTestID + ".png", routeStoreImage, storeTestID + ".png"},
		{"//v1//zimage/images/x.png", routeStoreImage, "x.png"},
		{"/v1/zimage/images/../../etc/passwd", routeStoreImage, "../../etc/passwd"},
		{"/v1/zimage/images/", routeStoreImage, ""},
		{"/v1/zimage/images", routeUnknown, ""},
		{"/v1/zimage/imagesx/a.png", routeUnknown, ""},
		{"/zimage/images", routeNone, ""},
		{"/zimage/other/a.png", routeNone, ""},
	} {
		if got, name := parseRoute(tc.path); got != tc.want || name != tc.name {
			t.Errorf("parseRoute(%q) = %d, %q; want %d, %q", tc.path, got, name, tc.want, tc.name)
		}
	}
}
