package zimage

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"net/url"
	"strings"
	"sync/atomic"
	"time"

	"github.com/caddyserver/certmagic"
	"github.com/dustin/go-humanize"
	"go.uber.org/zap"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
)

// The image store (docs/design.md#the-store): generated images are copied into a Caddy
// storage and served from the gateway's own site, so the URLs in old chat
// answers keep working after the image service's own URLs expire. This
// file holds its config, Caddyfile parsing and provisioning, the naming of
// images and the writes (put, url, remove) that the keep step
// (store_keep.go) and edits' sources use; serving is in store_serve.go,
// the retention sweep in store_sweep.go.

const (
	defaultStorePrefix  = "zimage"
	defaultStoreMaxAge  = 30 * 24 * time.Hour
	defaultStoreMaxSize = 32 << 20
	maxStoreMaxSize     = 1 << 30

	// storeIDLen is the length of an image id in hex digits: 128 bits of
	// the image's SHA-256, unguessable without the image itself (docs/design.md#the-store)
	storeIDLen = 32

	// storeURLPath is where stored images are served; storePath without
	// the /v1 prefix answers too (docs/design.md#the-store)
	storeURLPath = "/v1" + storePath
	storePath    = "/zimage/images/"

	// a year, and immutable: the URL names the bytes, they never change
	storeCacheControl = "public, max-age=31536000, immutable"

	// the first sweep waits a little after start, so that it does not
	// compete with the config load; later sweeps come at most this often
	defaultFirstSweep = time.Minute
	defaultSweepEvery = time.Hour

	// a duplicate older than this is written again, so that an answer
	// naming it keeps its URL for max_age from now, not from the first copy
	storeRefreshAfter = time.Hour
)

// Results of put, as counted in caddy_zimage_store_images_total.
const (
	storeStored    = "stored"
	storeDuplicate = "duplicate"
	storeFailed    = "failed" // counted by the copy step, whatever failed
)

// StoreConfig configures the image store. A bare `store` (an empty JSON
// object) turns it on with the defaults; without it the store is off and
// answers name the image service's own URLs.
type StoreConfig struct {
	// Off turns the store off while keeping its settings in the config.
	Off bool `json:"off,omitempty"`

	// StorageRaw is the Caddy storage module (namespace caddy.storage) that
	// holds the images, written like Caddy's own global `storage` option,
	// e.g. {"module": "file_system", "root": "/var/lib/zimage"}. Any storage
	// module works; instances that share one storage serve each other's
	// images. Default: the storage Caddy itself uses (the global `storage`
	// option; file_system in Caddy's data directory unless set).
	StorageRaw json.RawMessage `json:"storage,omitempty" caddy:"namespace=caddy.storage inline_key=module"`

	// Prefix is the key prefix in the storage; images are kept under
	// {prefix}/images/ and nothing else is read or written. Placeholders
	// are accepted. Default: zimage.
	Prefix string `json:"prefix,omitempty"`

	// MaxAge is how long an image is kept: a background sweep deletes
	// older ones. 0 keeps them forever. Default: 30d.
	MaxAge *caddy.Duration `json:"max_age,omitempty"`

	// MaxImageSize is the largest image, in bytes, that is copied into the
	// store; a larger one keeps the image service's URL. Default: 32 MiB.
	MaxImageSize int64 `json:"max_image_size,omitempty"`

	// PublicURL is scheme://host[:port] at which clients (and the image
	// service, for edits) reach this site; image URLs start with it.
	// Placeholders are accepted. Default: the scheme and host of each
	// request, X-Forwarded-Proto and X-Forwarded-Host included when the
	// request came through a trusted proxy (the server's trusted_proxies).
	PublicURL string `json:"public_url,omitempty"`
}

// imageStore is a provisioned store: where images go, how they are named
// and served, and the retention sweeper.
type imageStore struct {
	storage   certmagic.Storage
	files     *certmagic.FileStorage // set for file_system storage: served from the file
	prefix    string                 // without a trailing slash
	dir       string                 // prefix + "/images/"
	maxAge    time.Duration          // 0: keep forever
	maxSize   int64                  // the copy step bounds its download by this too
	publicURL string                 // scheme://host[:port] or ""
	logger    *zap.Logger

	// the sweeper: unexported timings so that tests need no long waits
	firstSweep, sweepEvery time.Duration
	schedule               *sweepSchedule
	scheduleKey            string
	cancel                 context.CancelFunc
	done                   chan struct{} // closed when the sweeper has stopped
	wakes                  atomic.Int32  // wake-ups handled (swept or not), for tests
}

// provisionStore resolves the store's settings, loads its storage module
// the way Caddy's tls app loads its own (so any storage module works) and
// starts the retention sweeper. The store stays nil when it is off.
func (g *Gateway) provisionStore(ctx caddy.Context, resolve func(v, env string) string) error {
	g.store = nil
	sc := g.Store
	if sc == nil || sc.Off {
		return nil
	}
	prefix, err := checkStorePrefix(resolve(sc.Prefix, ""))
	if err != nil {
		return fmt.Errorf("zimage_gateway: store: %v", err)
	}
	maxAge := defaultStoreMaxAge
	if sc.MaxAge != nil {
		if *sc.MaxAge < 0 {
			return fmt.Errorf("zimage_gateway: store: max_age must be 0 (keep images forever) or a positive duration, got %s", time.Duration(*sc.MaxAge))
		}
		maxAge = time.Duration(*sc.MaxAge)
	}
	maxSize := sc.MaxImageSize
	if maxSize == 0 {
		maxSize = defaultStoreMaxSize
	}
	if maxSize < 0 || maxSize > maxStoreMaxSize {
		return fmt.Errorf("zimage_gateway: store: max_image_size must be between 1 byte and 1GiB, got %d", maxSize)
	}
	public, err := checkPublicURL(resolve(sc.PublicURL, ""))
	if err != nil {
		return fmt.Errorf("zimage_gateway: store: %v", err)
	}

	var storage certmagic.Storage
	var identity string
	if sc.StorageRaw != nil {
		identity = string(sc.StorageRaw) // LoadModule clears the field
		val, err := ctx.LoadModule(sc, "StorageRaw")
		if err != nil {
			return fmt.Errorf("zimage_gateway: store: storage: loading the storage module: %v", err)
		}
		conv, ok := val.(caddy.StorageConverter)
		if !ok {
			return fmt.Errorf("zimage_gateway: store: storage: module %T is not a storage module", val)
		}
		if storage, err = conv.CertMagicStorage(); err != nil {
			return fmt.Errorf("zimage_gateway: store: storage: %v", err)
		}
	} else {
		storage = caddyStorage(ctx)
		identity = fmt.Sprintf("default %T", storage)
		if s, ok := storage.(fmt.Stringer); ok {
			identity = "default " + s.String()
		}
	}
	if storage == nil {
		return errors.New("zimage_gateway: store: no storage: set 'storage' in the store block")
	}

	st := newImageStore(storage, prefix, maxAge, maxSize, public, g.logger)
	st.scheduleKey = prefix + "\x00" + identity
	g.store = st
	if maxAge > 0 {
		st.start(ctx)
	}
	return nil
}

// caddyStorage is the storage Caddy itself uses (the global `storage`
// option). A context made outside a config load, as unit tests make them,
// has no config to ask and panics; Caddy's own default applies then, as it
// does for a config without a storage.
func caddyStorage(ctx caddy.Context) (s certmagic.Storage) {
	defer func() {
		if recover() != nil {
			s = caddy.DefaultStorage
		}
	}()
	if s = ctx.Storage(); s == nil {
		s = caddy.DefaultStorage
	}
	return s
}

// newImageStore makes a store over storage with the default sweep timings;
// the sweeper is not started.
func newImageStore(storage certmagic.Storage, prefix string, maxAge time.Duration, maxSize int64, publicURL string, logger *zap.Logger) *imageStore {
	st := &imageStore{
		storage:    storage,
		prefix:     prefix,
		dir:        prefix + "/images/",
		maxAge:     maxAge,
		maxSize:    maxSize,
		publicURL:  publicURL,
		logger:     logger,
		firstSweep: defaultFirstSweep,
		sweepEvery: defaultSweepEvery,
		schedule:   sweeps,
	}
	if fs, ok := storage.(*certmagic.FileStorage); ok {
		st.files = fs
	}
	if st.logger == nil {
		st.logger = zap.NewNop()
	}
	st.scheduleKey = prefix + "\x00" + fmt.Sprintf("%T %p", storage, storage)
	return st
}

// checkStorePrefix accepts a key prefix of path segments made of letters,
// digits, '-', '_' and '.', never "." or "..", so that the store's keys
// cannot leave {prefix}/images/.
func checkStorePrefix(p string) (string, error) {
	p = strings.Trim(p, "/")
	if p == "" {
		return defaultStorePrefix, nil
	}
	for _, seg := range strings.Split(p, "/") {
		ok := seg != "" && seg != "." && seg != ".."
		for _, c := range seg {
			if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '-' || c == '_' || c == '.') {
				ok = false
			}
		}
		if !ok {
			return "", fmt.Errorf("invalid prefix '%s': want path segments of letters, digits, '-', '_' and '.', such as zimage or sites/a", p)
		}
	}
	return p, nil
}

// checkPublicURL accepts "" or scheme://host[:port] with an http(s)
// scheme and no path (a trailing slash is dropped), query or fragment.
func checkPublicURL(s string) (string, error) {
	if s == "" {
		return "", nil
	}
	u, err := url.Parse(s)
	if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" || u.User != nil ||
		(u.Path != "" && u.Path != "/") || u.RawQuery != "" || u.Fragment != "" || u.Opaque != "" {
		return "", fmt.Errorf("invalid public_url '%s': want scheme://host[:port] with http or https and no path, such as https://img.example.com", s)
	}
	return u.Scheme + "://" + u.Host, nil
}

// unmarshalStore parses the store sub-directive:
//
//	store [off] {
//	    storage <module> [<args>] { … }
//	    prefix <key prefix>
//	    max_age <duration>
//	    max_image_size <size>
//	    public_url <url>
//	}
//
// The storage module parses its own tokens, exactly as in Caddy's global
// `storage` option.
func unmarshalStore(d *caddyfile.Dispenser) (*StoreConfig, error) {
	s := new(StoreConfig)
	if d.NextArg() {
		if d.Val() != "off" {
			return nil, d.Errf("zimage_gateway: store takes 'off' or a block, not '%s'", d.Val())
		}
		s.Off = true
	}
	if d.NextArg() {
		return nil, d.ArgErr()
	}
	err := eachOption(d, "store", func(opt string) (err error) {
		switch opt {
		case "storage":
			s.StorageRaw, err = unmarshalStorage(d)
		case "prefix":
			if s.Prefix, err = singleArg(d); err == nil && !strings.Contains(s.Prefix, "{") {
				if _, perr := checkStorePrefix(s.Prefix); perr != nil {
					err = d.Errf("zimage_gateway: store: %v", perr)
				}
			}
		case "max_age":
			var v string
			if v, err = singleArg(d); err != nil {
				return err
			}
			dur, perr := caddy.ParseDuration(v)
			if perr != nil || dur < 0 {
				return d.Errf("zimage_gateway: store: invalid max_age '%s': want a duration such as 30d or 12h, or 0 to keep images forever", v)
			}
			age := caddy.Duration(dur)
			s.MaxAge = &age
		case "max_image_size":
			var v string
			if v, err = singleArg(d); err != nil {
				return err
			}
			n, perr := humanize.ParseBytes(v)
			if perr != nil || n == 0 || n > maxStoreMaxSize {
				return d.Errf("zimage_gateway: store: invalid max_image_size '%s': want a size such as 32MiB, up to 1GiB", v)
			}
			s.MaxImageSize = int64(n)
		case "public_url":
			// optional: `public_url {$PUBLIC_URL}` unset means "the request's origin"
			if s.PublicURL, err = optionalArg(d); err == nil && !strings.Contains(s.PublicURL, "{") {
				if _, perr := checkPublicURL(s.PublicURL); perr != nil {
					err = d.Errf("zimage_gateway: store: %v", perr)
				}
			}
		default:
			return d.Errf("unrecognized zimage_gateway store option '%s'", opt)
		}
		return err
	})
	if err != nil {
		return nil, err
	}
	return s, nil
}

// unmarshalStorage reads `storage <module> [<args>] { … }` as Caddy's
// parseOptStorage does, into the JSON module object StorageRaw holds.
func unmarshalStorage(d *caddyfile.Dispenser) (json.RawMessage, error) {
	if !d.NextArg() {
		return nil, d.Errf("zimage_gateway: store: storage needs a storage module name, such as file_system")
	}
	name := d.Val()
	unm, err := caddyfile.UnmarshalModule(d, "caddy.storage."+name)
	if err != nil {
		return nil, fmt.Errorf("zimage_gateway: store: storage %s: %w", name, err)
	}
	if _, ok := unm.(caddy.StorageConverter); !ok {
		return nil, d.Errf("zimage_gateway: store: storage: module caddy.storage.%s is not a storage module", name)
	}
	var warnings []caddyconfig.Warning
	raw := caddyconfig.JSONModuleObject(unm, "module", name, &warnings)
	if len(warnings) > 0 {
		return nil, d.Errf("zimage_gateway: store: storage %s: %s", name, warnings[0].Message)
	}
	return raw, nil
}

// --- naming ------------------------------------------------------------------

// storeContentType is the Content-Type of a known extension.
func storeContentType(ext string) (string, bool) {
	for _, f := range imageFormats {
		if f.ext == ext {
			return f.contentType, true
		}
	}
	return "", false
}

// parseStoreName checks a requested image name before anything is looked
// up: exactly storeIDLen lowercase hex digits, a dot and a known
// extension. Anything else (a path, "..", an encoded slash once decoded, a
// NUL, upper case, a longer or shorter id) is no image of the store, so no
// request can reach another storage key.
func parseStoreName(name string) (contentType string, ok bool) {
	if len(name) < storeIDLen+2 || len(name) > storeIDLen+5 || name[storeIDLen] != '.' {
		return "", false
	}
	for i := range storeIDLen {
		if c := name[i]; !(c >= '0' && c <= '9' || c >= 'a' && c <= 'f') {
			return "", false
		}
	}
	return storeContentType(name[storeIDLen+1:])
}

// --- the copy ------------------------------------------------------------------

// put stores one image and returns its name ({id}.{ext}, see storeURL).
// The bytes must be a PNG, JPEG, WebP or GIF by signature and at most
// max_image_size. The key is content-addressed, so the same bytes are
// stored once: duplicate reports that they were there already. put counts
// stored and duplicate in caddy_zimage_store_images_total; a failure is
// counted by the caller as "failed" (metricStoreImages), once per failed
// copy, whether the download or put failed.
func (s *imageStore) put(ctx context.Context, data []byte) (name string, duplicate bool, err error) {
	if int64(len(data)) > s.maxSize {
		return "", false, fmt.Errorf("store: the image is %s, larger than max_image_size %s", formatBytes(int64(len(data))), formatBytes(s.maxSize))
	}
	info, err := checkImage(data)
	if err != nil {
		return "", false, fmt.Errorf("store: %w", err)
	}
	ext := info.ext
	sum := sha256.Sum256(data)
	name = hex.EncodeToString(sum[:storeIDLen/2]) + "." + ext
	key := s.dir + name
	if s.storage.Exists(ctx, key) {
		// a sweep deletes by age since the last write: an old copy is
		// written again, so the URL in this answer lasts max_age too
		if s.maxAge > 0 {
			info, err := s.storage.Stat(ctx, key)
			if err != nil || time.Since(info.Modified) > min(storeRefreshAfter, s.maxAge/2) {
				if err := s.storage.Store(ctx, key, data); err != nil {
					return "", false, fmt.Errorf("store: writing %s: %w", name, err)
				}
			}
		}
		metricStoreImages.WithLabelValues(storeDuplicate).Inc()
		return name, true, nil
	}
	if err := s.storage.Store(ctx, key, data); err != nil {
		return "", false, fmt.Errorf("store: writing %s: %w", name, err)
	}
	metricStoreImages.WithLabelValues(storeStored).Inc()
	return name, false, nil
}

// url is the public URL of a stored image for a request from origin
// (scheme://host, see requestOrigin): public_url wins when set.
func (s *imageStore) url(origin, name string) string {
	base := s.publicURL
	if base == "" {
		base = origin
	}
	return base + storeURLPath + name
}

// remove deletes a stored image the gateway took in for nothing: the source
// of an edit that failed (docs/design.md#edits). It runs after the request may have
// been cancelled, so it has a context of its own, bounded in time.
func (s *imageStore) remove(ctx context.Context, name string) {
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), storeRemoveTimeout)
	defer cancel()
	if err := s.storage.Delete(ctx, s.dir+name); err != nil {
		s.logger.Warn("deleting the source of a failed edit failed; the sweep will delete it after max_age",
			zap.String("store_id", name), zap.Error(err))
		return
	}
	metricStoreDeleted.Inc()
}

// storeRemoveTimeout bounds the deletion of a failed edit's source.
const storeRemoveTimeout = 10 * time.Second
