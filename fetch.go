package zimage

import (
	"context"
	"errors"
	"fmt"
	"io"
	"mime"
	"net"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"time"

	"go.uber.org/zap"
	"golang.org/x/sync/errgroup"
	"golang.org/x/sync/semaphore"
)

// Downloads of generated images: for b64_json answers and for the store.
// They are bounded three ways: by host (only the image service's
// own hosts), by size, and by number in flight, so the memory they take is
// bounded by max_downloads images, never by the number of requests.
const (
	maxImageBytes       = 32 << 20
	defaultMaxDownloads = 8
)

// imageFetcher downloads generated images. It only fetches http(s) URLs
// from a trusted origin (the upstream's, or one image_hosts names), so a
// rogue image_url cannot make the gateway fetch internal addresses.
type imageFetcher struct {
	trusted []imageOrigin
	hosts   map[string]bool // the trusted host names, for the playground's CSP
	client  *http.Client
	slots   *semaphore.Weighted // images downloaded or held for an answer
	size    int64
}

// imageOrigin is one place images may come from. A trusted image host is
// scheme, host and port: with the service at
// 127.0.0.1:9101, nothing on 127.0.0.1:9102 or on Caddy's admin port is
// fetched.
type imageOrigin struct {
	scheme string // http or https; "" for either
	host   string // lower case; an IPv6 address without brackets
	port   string // "" for the default port of the scheme (80, 443)
	sub    bool   // a name's subdomains too (img.sd.exacg.cc for sd.exacg.cc)
}

// provisionFetcher builds the download client for the image service's
// origins (its URL's and image_hosts), through the upstream's proxy, and
// its max_downloads slots.
func (g *Gateway) provisionFetcher(up UpstreamConfig) error {
	if g.MaxDownloads == 0 {
		g.MaxDownloads = defaultMaxDownloads
	}
	if g.MaxDownloads < maxImagesN {
		return fmt.Errorf("zimage_gateway: max_downloads must be at least %d (the images of one answer are downloaded together), got %d", maxImagesN, g.MaxDownloads)
	}
	f, err := newImageFetcher(up.URL, g.ImageHosts, g.MaxDownloads)
	if err != nil {
		return err
	}
	f.client.Transport.(*http.Transport).Proxy = up.proxy()
	g.fetcher = f
	return nil
}

func newImageFetcher(upstreamURL string, extra []string, maxDownloads int) (*imageFetcher, error) {
	t := newTransport()
	t.ReadBufferSize = 32 << 10 // images are large, unlike the API answers
	f := &imageFetcher{
		hosts:  map[string]bool{},
		client: &http.Client{Transport: t},
		slots:  semaphore.NewWeighted(int64(maxDownloads)),
		size:   int64(maxDownloads),
	}
	// the upstream's own origin, its port made explicit, and its
	// subdomains on the same scheme and port
	if u, err := url.Parse(upstreamURL); err == nil && u.Hostname() != "" && (u.Scheme == "http" || u.Scheme == "https") {
		f.add(imageOrigin{scheme: u.Scheme, host: u.Hostname(), port: explicitPort(u.Scheme, u.Port()), sub: true})
	}
	for _, h := range extra {
		if h = strings.TrimSpace(h); h == "" {
			continue
		}
		o, err := parseImageHost(h)
		if err != nil {
			return nil, fmt.Errorf("zimage_gateway: image_hosts: %v", err)
		}
		f.add(o)
	}
	// redirects must stay on allowed origins as well
	f.client.CheckRedirect = func(req *http.Request, via []*http.Request) error {
		if len(via) >= 5 {
			return policyError{errors.New("too many redirects")}
		}
		if err := f.allowed(req.URL); err != nil {
			return policyError{err}
		}
		return nil
	}
	return f, nil
}

func (f *imageFetcher) add(o imageOrigin) {
	o.host = strings.ToLower(o.host)
	o.sub = o.sub && net.ParseIP(o.host) == nil
	f.trusted = append(f.trusted, o)
	f.hosts[o.host] = true
}

// parseImageHost reads one image_hosts entry:
//   - host: that host on the default ports only (http on 80, https on
//     443), so a bare name never opens the host's other ports;
//   - host:port ([v6]:port): that port, over http or https;
//   - scheme://host[:port]: exactly that origin.
//
// A name covers its subdomains too (on the same ports), an IP address only
// itself.
func parseImageHost(h string) (imageOrigin, error) {
	bad := func(why string) (imageOrigin, error) {
		return imageOrigin{}, fmt.Errorf("invalid entry %q: %s (want host, host:port or scheme://host[:port])", h, why)
	}
	if strings.Contains(h, "://") {
		u, err := url.Parse(h)
		if err != nil {
			return bad("not a URL")
		}
		if u.Scheme != "http" && u.Scheme != "https" {
			return bad("the scheme must be http or https")
		}
		if u.Hostname() == "" || u.User != nil || strings.Trim(u.Path, "/") != "" || u.RawQuery != "" || u.Fragment != "" {
			return bad("an origin has no path, query or credentials")
		}
		if err := checkPort(u.Port()); err != nil {
			return bad(err.Error())
		}
		return imageOrigin{scheme: u.Scheme, host: u.Hostname(), port: explicitPort(u.Scheme, u.Port()), sub: true}, nil
	}
	if ip := net.ParseIP(h); ip != nil { // a bare IPv6 address has colons but no port
		return imageOrigin{host: ip.String()}, nil
	}
	host, port, err := net.SplitHostPort(h)
	if err != nil {
		if strings.ContainsAny(h, ":/[]@?#") {
			return bad("not a host name")
		}
		return imageOrigin{host: h, sub: true}, nil
	}
	if host == "" || strings.ContainsAny(host, "/@?#") {
		return bad("not a host name")
	}
	if err := checkPort(port); err != nil {
		return bad(err.Error())
	}
	return imageOrigin{host: host, port: port, sub: true}, nil
}

func checkPort(p string) error {
	if p == "" {
		return nil
	}
	if n, err := strconv.Atoi(p); err != nil || n < 1 || n > 65535 {
		return fmt.Errorf("port %q is not 1…65535", p)
	}
	return nil
}

// explicitPort is port, or the scheme's default when it is empty.
func explicitPort(scheme, port string) string {
	if port != "" {
		return port
	}
	if scheme == "https" {
		return "443"
	}
	return "80"
}

func (f *imageFetcher) allowed(u *url.URL) error {
	if u.Scheme != "http" && u.Scheme != "https" {
		return fmt.Errorf("image URL scheme %q is not http(s)", u.Scheme)
	}
	host := strings.ToLower(u.Hostname())
	port := explicitPort(u.Scheme, u.Port())
	for _, o := range f.trusted {
		if o.scheme != "" && o.scheme != u.Scheme {
			continue
		}
		if want := o.port; want == "" && port != explicitPort(u.Scheme, "") || want != "" && want != port {
			continue
		}
		if host == o.host || o.sub && strings.HasSuffix(host, "."+o.host) {
			return nil
		}
	}
	return fmt.Errorf("image host %q is not allowed: add it to image_hosts", strings.ToLower(u.Host))
}

// acquire takes n download slots at once, waiting until ctx's deadline:
// all the images of one answer together, so that two requests holding
// half of what they need can never wait for each other. The slots are
// held until release is called, after the answer is written.
func (f *imageFetcher) acquire(ctx context.Context, n int) (release func(), e *apiError) {
	if err := f.slots.Acquire(ctx, int64(n)); err != nil {
		return nil, downloadCtxError(ctx)
	}
	var once sync.Once
	return func() { once.Do(func() { f.slots.Release(int64(n)) }) }, nil
}

// downloadAll downloads the images of jobs in parallel, within the
// download slots and each job's remaining time. With failFast the first
// failure cancels the others and fails the whole; without, each image that
// could not be downloaded is nil and its error is in errs. The caller must
// call release once it no longer holds the images.
func (g *Gateway) downloadAll(ctx context.Context, jobs []*job, failFast bool) (images [][]byte, errs []*apiError, release func(), e *apiError) {
	// waiting for slots counts against the earliest deadline of the jobs
	wait := ctx
	if dl, ok := earliestDeadline(jobs); ok {
		var cancel context.CancelFunc
		wait, cancel = context.WithDeadline(ctx, dl)
		defer cancel()
	}
	release, e = g.fetcher.acquire(wait, len(jobs))
	if e != nil {
		return nil, nil, nil, e
	}
	images = make([][]byte, len(jobs))
	errs = make([]*apiError, len(jobs))
	eg, dctx := errgroup.WithContext(ctx)
	if !failFast {
		dctx = ctx // an image that fails leaves the others be
	}
	for i, j := range jobs {
		eg.Go(func() error {
			if images[i], errs[i] = g.download(dctx, j); errs[i] != nil && failFast {
				return errs[i]
			}
			return nil
		})
	}
	if err := eg.Wait(); err != nil {
		release()
		return nil, nil, nil, err.(*apiError)
	}
	return images, errs, release, nil
}

func earliestDeadline(jobs []*job) (time.Time, bool) {
	var dl time.Time
	for _, j := range jobs {
		if !j.deadline.IsZero() && (dl.IsZero() || j.deadline.Before(dl)) {
			dl = j.deadline
		}
	}
	return dl, !dl.IsZero()
}

// download fetches the image of one generated job, within the time its
// generation has left (the upstream timeout bounds the whole
// call: a stalled image host is a 504 like any other timeout).
// The caller holds a download slot.
func (g *Gateway) download(ctx context.Context, j *job) ([]byte, *apiError) {
	if _, demo := g.upstream.(demoGenerator); demo {
		if b, ok := g.demoImageForURL(ctx, j.imageURL); ok {
			return b, nil
		}
	}
	fail := func(msg string, err error) *apiError {
		msg = g.scrub.Replace(msg)
		if err != nil {
			g.logger.Warn("image download failed", zap.String("endpoint", j.endpoint),
				zap.String("error", msg), zap.String("detail", g.scrub.Replace(err.Error())))
		}
		return &apiError{status: http.StatusBadGateway, typ: "upstream_error", code: "image_download_failed",
			message: "Downloading the generated image failed: " + msg}
	}
	u, err := url.Parse(j.imageURL)
	if err != nil {
		return nil, fail("invalid image URL", nil)
	}
	if err := g.fetcher.allowed(u); err != nil {
		return nil, fail(err.Error(), nil)
	}
	if !j.deadline.IsZero() {
		var cancel context.CancelFunc
		ctx, cancel = context.WithDeadline(ctx, j.deadline)
		defer cancel()
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u.String(), nil)
	if err != nil {
		return nil, fail("invalid image URL", nil)
	}
	resp, err := g.fetcher.client.Do(req)
	if err != nil {
		if ctx.Err() != nil {
			return nil, downloadCtxError(ctx)
		}
		var pe policyError
		if errors.As(err, &pe) {
			return nil, fail(pe.Error(), nil)
		}
		return nil, fail(describeNetErr("the image host", err), err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return nil, fail("image host answered "+resp.Status, nil)
	}
	if mt, _, _ := mime.ParseMediaType(resp.Header.Get("Content-Type")); !strings.HasPrefix(mt, "image/") {
		return nil, fail(fmt.Sprintf("image host answered content type %q, not an image", truncate(mt, 60)), nil)
	}
	if resp.ContentLength > maxImageBytes {
		return nil, fail(fmt.Sprintf("image larger than %d MiB", maxImageBytes>>20), nil)
	}
	b, err := readImage(resp.Body, resp.ContentLength)
	if err != nil {
		if ctx.Err() != nil {
			return nil, downloadCtxError(ctx)
		}
		if errors.Is(err, errImageTooLarge) {
			return nil, fail(fmt.Sprintf("image larger than %d MiB", maxImageBytes>>20), nil)
		}
		return nil, fail(describeNetErr("the image host", err)+" while sending the image", err)
	}
	// the same check as the store's: a Content-Type of
	// image/png over an HTML page is no image, for b64_json either
	if _, err := checkImage(b); err != nil {
		return nil, fail("the image host answered "+err.Error(), nil)
	}
	return b, nil
}

var errImageTooLarge = errors.New("image too large")

// policyError is a download the gateway refused (a redirect to a host not
// allowed): its text is the gateway's own and safe to show.
type policyError struct{ err error }

func (e policyError) Error() string { return e.err.Error() }

// readImage reads a whole image of at most maxImageBytes into one buffer
// of the right size when the length is known, so no image is copied while
// the buffer grows.
func readImage(r io.Reader, length int64) ([]byte, error) {
	if length < 0 {
		b, err := io.ReadAll(io.LimitReader(r, maxImageBytes+1))
		if err == nil && len(b) > maxImageBytes {
			return nil, errImageTooLarge
		}
		return b, err
	}
	b := make([]byte, length)
	if _, err := io.ReadFull(r, b); err != nil {
		return nil, err
	}
	return b, nil
}

// downloadCtxError tells a client that left from a download that ran out
// of the generation's time.
func downloadCtxError(ctx context.Context) *apiError {
	if errors.Is(context.Cause(ctx), context.Canceled) || errors.Is(ctx.Err(), context.Canceled) {
		return (&upstreamError{kind: kindCanceled}).apiError(nil)
	}
	return &apiError{status: http.StatusGatewayTimeout, typ: "upstream_error", code: "upstream_timeout",
		message: "The image host did not send the generated image in time"}
}
