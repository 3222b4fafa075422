package zimage

import (
	"context"
	"encoding/base64"
	"encoding/json"
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
	"unicode/utf8"
)

// imagesRequest is the OpenAI Images API body plus the gateway's
// extensions (seed, cfg, negative_prompt). Fields the gateway cannot use
// (quality, style, user, background, output_format, …) are ignored.
type imagesRequest struct {
	Prompt         *string         `json:"prompt"`
	Model          string          `json:"model"`
	N              *int            `json:"n"`
	Size           string          `json:"size"`
	ResponseFormat string          `json:"response_format"`
	Seed           json.RawMessage `json:"seed"`
	CFG            *float64        `json:"cfg"`
	NegativePrompt *string         `json:"negative_prompt"`
}

const maxImagesN = 4

type imagesResponse struct {
	Created int64       `json:"created"`
	Data    []imageData `json:"data"`
}

type imageData struct {
	URL           string `json:"url,omitempty"`
	B64JSON       string `json:"b64_json,omitempty"`
	RevisedPrompt string `json:"revised_prompt"`
}

// parseSize reads "WxH"; "auto" or "" leave the size to the ratio rules.
func parseSize(s string) (w, h *float64, e *apiError) {
	s = strings.TrimSpace(strings.ToLower(s))
	if s == "" || s == "auto" {
		return nil, nil, nil
	}
	ws, hs, ok := strings.Cut(s, "x")
	wi, err1 := strconv.Atoi(strings.TrimSpace(ws))
	hi, err2 := strconv.Atoi(strings.TrimSpace(hs))
	if !ok || err1 != nil || err2 != nil || wi <= 0 || hi <= 0 {
		return nil, nil, invalidRequest("size", "Invalid size "+strconv.Quote(truncate(s, 40))+": expected \"WIDTHxHEIGHT\" (e.g. \"1024x1024\") or \"auto\"")
	}
	wf, hf := float64(wi), float64(hi)
	return &wf, &hf, nil
}

// serveImages answers POST /v1/images/generations.
func (g *Gateway) serveImages(w http.ResponseWriter, r *http.Request) {
	body, e := g.readBody(w, r)
	if e != nil {
		g.fail(w, endpointImages, "", e)
		return
	}
	var req imagesRequest
	if e := decodeJSON(body, &req); e != nil {
		g.fail(w, endpointImages, "", e)
		return
	}
	if req.Prompt == nil || strings.TrimSpace(*req.Prompt) == "" {
		g.fail(w, endpointImages, "", invalidRequest("prompt", "'prompt' is required"))
		return
	}
	prompt := strings.TrimSpace(*req.Prompt)
	if utf8.RuneCountInString(prompt) > g.MaxPromptLength {
		g.fail(w, endpointImages, "", invalidRequest("prompt", fmt.Sprintf("The prompt is longer than %d characters", g.MaxPromptLength)))
		return
	}
	m := g.lookupModel(req.Model)
	if m == nil {
		g.fail(w, endpointImages, "", errModelNotFound(req.Model))
		return
	}
	n := 1
	if req.N != nil {
		n = *req.N
	}
	if n < 1 || n > maxImagesN {
		g.fail(w, endpointImages, m.name, invalidRequest("n", fmt.Sprintf("n must be between 1 and %d", maxImagesN)))
		return
	}
	format := strings.ToLower(strings.TrimSpace(req.ResponseFormat))
	switch format {
	case "":
		format = "url"
	case "url", "b64_json":
	default:
		g.fail(w, endpointImages, m.name, invalidRequest("response_format", "response_format must be \"url\" or \"b64_json\""))
		return
	}
	width, height, e := parseSize(req.Size)
	if e != nil {
		g.fail(w, endpointImages, m.name, e)
		return
	}
	p := jobParams{prompt: prompt, width: width, height: height, cfg: req.CFG, negative: req.NegativePrompt}
	j, e := g.checkedJob(r, endpointImages, m, req.Model, p, req.Seed)
	if e != nil {
		g.fail(w, endpointImages, m.name, e)
		return
	}

	ctx := r.Context()
	g.runEnhance(ctx, j)
	data, e := g.generateN(ctx, j, n, j.fixedSeed, format)
	if e != nil {
		g.fail(w, endpointImages, m.name, e)
		return
	}
	writeJSON(w, http.StatusOK, imagesResponse{Created: time.Now().Unix(), Data: data})
	metricRequests.WithLabelValues(endpointImages, m.name, "200").Inc()
}

// generateN runs n generations of one enhanced job in parallel (each waits
// for its own slot in the limiter), with seed, seed+1, … when the client
// fixed the seed and fresh random seeds otherwise. The first failure
// cancels the others and fails the request.
func (g *Gateway) generateN(ctx context.Context, base *job, n int, fixedSeed bool, format string) ([]imageData, *apiError) {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	data := make([]imageData, n)
	errs := make([]*apiError, n)
	var wg sync.WaitGroup
	for i := range n {
		j := *base
		switch {
		case i == 0:
		case fixedSeed:
			j.seed = (base.seed + int64(i)) % maxSeed
		default:
			j.seed = randomSeed()
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			if e := g.generate(ctx, &j); e != nil {
				errs[i] = e
				cancel()
				return
			}
			d := imageData{RevisedPrompt: j.prompt}
			if format == "b64_json" {
				b, e := g.fetchImage(ctx, j.imageURL)
				if e != nil {
					errs[i] = e
					cancel()
					return
				}
				d.B64JSON = base64.StdEncoding.EncodeToString(b)
			} else {
				d.URL = j.imageURL
			}
			data[i] = d
		}()
	}
	wg.Wait()
	// report the root cause, not the cancellations it caused in siblings
	var first *apiError
	for _, e := range errs {
		if e != nil && (first == nil || first.status == 499) {
			first = e
		}
	}
	if first != nil {
		return nil, first
	}
	return data, nil
}

// Limits on downloads for b64_json.
const (
	maxImageBytes   = 32 << 20
	downloadTimeout = 60 * time.Second
)

// imageFetcher downloads generated images for b64_json. It only fetches
// http(s) URLs on the upstream's host or the configured image_hosts, so a
// rogue image_url cannot make the gateway fetch internal addresses.
type imageFetcher struct {
	hosts  map[string]bool
	client *http.Client
}

func newImageFetcher(upstreamURL string, extra []string) *imageFetcher {
	t := newTransport()
	t.ReadBufferSize = 32 << 10 // images are large, unlike the API answers
	f := &imageFetcher{hosts: map[string]bool{}, client: &http.Client{Transport: t}}
	if u, err := url.Parse(upstreamURL); err == nil && u.Hostname() != "" {
		f.hosts[strings.ToLower(u.Hostname())] = true
	}
	for _, h := range extra {
		if h = strings.ToLower(strings.TrimSpace(h)); h != "" {
			f.hosts[h] = true
		}
	}
	// redirects must stay on allowed hosts as well
	f.client.CheckRedirect = func(req *http.Request, via []*http.Request) error {
		if len(via) >= 5 {
			return errors.New("too many redirects")
		}
		return f.allowed(req.URL)
	}
	return f
}

func (f *imageFetcher) allowed(u *url.URL) error {
	if u.Scheme != "http" && u.Scheme != "https" {
		return fmt.Errorf("image URL scheme %q is not http(s)", u.Scheme)
	}
	host := strings.ToLower(u.Hostname())
	if f.hosts[host] {
		return nil
	}
	// subdomains of an allowed host (img.sd.exacg.cc for sd.exacg.cc)
	for h := range f.hosts {
		if net.ParseIP(h) == nil && strings.HasSuffix(host, "."+h) {
			return nil
		}
	}
	return fmt.Errorf("image host %q is not allowed: add it to image_hosts", host)
}

// fetchImage downloads one image for b64_json.
func (g *Gateway) fetchImage(ctx context.Context, imageURL string) ([]byte, *apiError) {
	if _, demo := g.upstream.(demoGenerator); demo {
		if b, ok := demoImageForURL(imageURL); ok {
			return b, nil
		}
	}
	fail := func(msg string) *apiError {
		return &apiError{status: http.StatusBadGateway, typ: "upstream_error", code: "image_download_failed",
			message: "Downloading the generated image failed: " + g.scrub.Replace(msg)}
	}
	u, err := url.Parse(imageURL)
	if err != nil {
		return nil, fail("invalid image URL")
	}
	if err := g.fetcher.allowed(u); err != nil {
		return nil, fail(err.Error())
	}
	ctx, cancel := context.WithTimeout(ctx, downloadTimeout)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u.String(), nil)
	if err != nil {
		return nil, fail(err.Error())
	}
	resp, err := g.fetcher.client.Do(req)
	if err != nil {
		if ctx.Err() != nil {
			return nil, fail("no answer within " + downloadTimeout.String())
		}
		return nil, fail(describeNetErr(err))
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return nil, fail("image host answered " + resp.Status)
	}
	if mt, _, _ := mime.ParseMediaType(resp.Header.Get("Content-Type")); !strings.HasPrefix(mt, "image/") {
		return nil, fail(fmt.Sprintf("image host answered content type %q, not an image", truncate(mt, 60)))
	}
	b, err := io.ReadAll(io.LimitReader(resp.Body, maxImageBytes+1))
	if err != nil {
		return nil, fail("reading the image: " + describeNetErr(err))
	}
	if len(b) > maxImageBytes {
		return nil, fail(fmt.Sprintf("image larger than %d MiB", maxImageBytes>>20))
	}
	return b, nil
}
