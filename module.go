// Package zimage is a Caddy HTTP handler module that puts the 梦羽 (Mengyu)
// text-to-image service behind the OpenAI API: GET /v1/models,
// POST /v1/chat/completions (streaming and not), POST /v1/images/generations,
// POST /v1/images/edits and POST /v1/responses, with an image store served
// from the site itself, several upstream accounts, named clients and a
// playground page.
//
// module.go holds the Gateway struct, its registration and the order in
// which its parts are provisioned and cleaned up. Each capability has its
// own file, named by what it holds (its config, Caddyfile parsing,
// provisioning and runtime together); docs/design.md describes the design
// they follow. In the order a request meets them:
//
//   - handler.go routes a path; clients.go finds the client by its key,
//     limiter.go holds its and the accounts' slots across reloads.
//   - Decoders: chat.go, images.go, edits.go, responses.go; the bodies that
//     carry an image are read by uploads.go (the upload budget),
//     uploads_chat.go (a chat body and its data: URLs) and uploads_rate.go
//     (min_upload_rate).
//   - pipeline.go takes the decoded ask through the steps: admission
//     (clients.go, quotas.go), the job (job.go, prompt.go, ratio.go),
//     enhancement (enhance.go), the generations, keep and render.
//   - Generation: upstream.go (the upstream block, the generator interface),
//     upstream_client.go (the HTTP call, transport and forward proxy),
//     upstream_answer.go (reading the service's answers and failures),
//     accounts.go (account blocks), account_pool.go (the choice of an
//     account), failover.go (retries, failover and rests), points.go;
//     models.go checks the model that ran; demo.go replaces the service
//     with local placeholders.
//   - The store: store.go (config, naming, writes), store_keep.go (the
//     pipeline's copy step, with fetch.go's bounded downloads and
//     imagecheck.go's check of every image), store_serve.go, store_sweep.go.
//   - Renderers: chat.go, stream.go (SSE and keep-alives), images.go,
//     responses_render.go; responses_store.go keeps Responses answers.
//   - Alongside: quotas_storage.go and quotas_usage.go (quota counts kept
//     and shown), coordination.go, coordination_redis.go and
//     coordination_hooks.go (sharing limits through Redis), health.go,
//     playground.go, metrics.go, secrets.go (scrubbing keys from answers
//     and logs), errors.go (the OpenAI error envelope), fastjson.go (JSON
//     written by hand on the hot path), caddyfile.go (the handler's
//     Caddyfile), command.go (`caddy zimage-models`).
package zimage

import (
	"errors"
	"fmt"
	"os"
	"strings"
	"time"

	"go.uber.org/zap"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
)

func init() {
	caddy.RegisterModule(Gateway{})
}

// Defaults, named so that the docs, the Caddyfile parser and Provision agree.
const (
	defaultUpstreamURL     = "https://sd.exacg.cc/api/v1/generate_image"
	defaultEnhanceBaseURL  = "https://api.openai.com/v1"
	defaultEnhanceModel    = "gpt-4o-mini"
	defaultModelName       = "Z-Image"
	defaultModelIndex      = 5
	defaultSteps           = 8
	defaultCFG             = 7.0
	defaultMaxBody         = 1 << 20
	defaultKeepalive       = 5 * time.Second
	defaultUpstreamTimeout = 180 * time.Second
	defaultEnhanceTimeout  = 10 * time.Second
	defaultRetries         = 1
	defaultMaxPromptLength = 20000

	// demoUpstream selects the local placeholder renderer (docs/design.md#the-demo).
	demoUpstream = "demo"
)

// Gateway is an OpenAI-compatible image API in front of the 梦羽
// text-to-image service. It answers /v1/models, /v1/chat/completions and
// /v1/images/generations (each also without the /v1 prefix) and passes every
// other path to the next handler, so it can share a site with other routes.
type Gateway struct {
	// APIKeys are the keys clients must present as `Authorization: Bearer <key>`:
	// the keys of the client "default". Placeholders such as {env.NAME} are
	// accepted. Default: the environment variable GATEWAY_API_KEY, when no
	// client block gives a key either. A key is required unless NoAuth is set.
	APIKeys []string `json:"api_keys,omitempty"`

	// Clients are named clients, each with its own keys and limit, beside
	// or instead of APIKeys (whose keys are the client "default"). A
	// request is attributed to the client whose key it carries.
	Clients []ClientConfig `json:"clients,omitempty"`

	// NoAuth turns client authentication off, for sites that authenticate
	// requests by other means (basic_auth, forward_auth, a private network).
	NoAuth bool `json:"no_auth,omitempty"`

	// StreamKeepalive is the interval between SSE keep-alive comments sent
	// while a streaming request waits for its image, so that proxies with
	// idle timeouts keep the connection open. Default: 5s.
	StreamKeepalive caddy.Duration `json:"stream_keepalive,omitempty"`

	// MaxBody is the largest request body accepted, in bytes; larger bodies
	// are answered with 413. Default: 1 MiB.
	MaxBody int64 `json:"max_body,omitempty"`

	// MaxUpload is the largest image accepted for an edit, in bytes: an
	// upload to /v1/images/edits or a data: URL in a chat message (whose
	// body may then be this large, base64 and all); larger ones are
	// answered with 413. Default: 20 MiB.
	MaxUpload int64 `json:"max_upload,omitempty"`

	// MaxUploadMemory is the most bytes of uploads (edits, and chat bodies
	// with an image) this handler's requests hold in memory at once, while
	// they are read, decoded and stored. The Caddy process has one budget
	// for all its handlers, as large as the largest of their values; an
	// upload that does not fit waits up to the upstream's queue_timeout,
	// then is answered 429. Default: twice max_upload.
	MaxUploadMemory int64 `json:"max_upload_memory,omitempty"`

	// MinUploadRate is the slowest an upload (an edit, or a chat body
	// larger than max_body) may arrive, in bytes a second: a body that
	// sends less in a 10 s window, counted from its first 10 s on, is cut
	// with 408 and its share of the upload memory returned, so that slow
	// clients cannot hold the upload memory. -1 turns it off.
	// Default: 64 KiB (65536).
	MinUploadRate int64 `json:"min_upload_rate,omitempty"`

	// MaxPromptLength is the longest prompt accepted, in characters (runes);
	// longer prompts are answered with 400. Default: 20000.
	MaxPromptLength int `json:"max_prompt_length,omitempty"`

	// Upstream configures the image service. Default: the public 梦羽
	// endpoint with the key from the environment variable SD_API_KEY.
	Upstream *UpstreamConfig `json:"upstream,omitempty"`

	// Enhance configures the optional LLM that rewrites short ideas into
	// detailed English prompts and suggests an aspect ratio. It is on by
	// default whenever an API key resolves (ENHANCE_OPENAI_API_KEY).
	Enhance *EnhanceConfig `json:"enhance,omitempty"`

	// Models are the model names clients may request. Default: exactly one
	// model, "Z-Image", with model_index 5, 8 steps and cfg 7.0.
	Models []ModelConfig `json:"models,omitempty"`

	// ListAliases lists each model's aliases in /v1/models as models of
	// their own. Default: off, since clients show every entry of the list
	// as a model to pick.
	ListAliases bool `json:"list_aliases,omitempty"`

	// DefaultResponseFormat is how the Images API answers a request that
	// gives no response_format: "url", "b64_json" or "both" (each image
	// with its URL and its base64). Default: b64_json for a model named
	// gpt-image-* or chatgpt-image-* (as OpenAI answers those, and as the
	// SDKs that send no response_format for them expect), both otherwise.
	// A model's own default_response_format comes first.
	DefaultResponseFormat string `json:"default_response_format,omitempty"`

	// ImageHosts lists extra image hosts (besides the upstream URL's
	// origin) from which images may be downloaded, for b64_json and the
	// store: "host" is that host on ports 80 (http) and 443 (https) only,
	// "host:port" that port, "scheme://host[:port]" exactly that origin;
	// names cover their subdomains. Default: none.
	ImageHosts []string `json:"image_hosts,omitempty"`

	// MaxDownloads is the most generated images downloaded, or held for a
	// b64_json answer, at once. It bounds the memory those answers take;
	// the images of one answer are taken together, so it is at least 4
	// (the largest n). Default: 8.
	MaxDownloads int `json:"max_downloads,omitempty"`

	// Store keeps a copy of every generated image and serves it from this
	// site, so the URLs in answers outlive the image service's own. Off
	// unless set; an empty object turns it on with the defaults.
	Store *StoreConfig `json:"store,omitempty"`

	// Playground serves a page that tries the gateway in a browser.
	// Off unless set; {} serves it at /playground.
	Playground *PlaygroundConfig `json:"playground,omitempty"`

	// Health serves the health endpoint for load balancers (docs/design.md#health),
	// without auth. Off unless set; {} serves it at /v1/zimage/health.
	Health *HealthConfig `json:"health,omitempty"`

	// QuotaTimezone is the IANA time zone (such as Europe/Berlin or UTC)
	// whose calendar hours, days, weeks and months the clients' quotas
	// count in. Default: the server's local time zone.
	QuotaTimezone string `json:"quota_timezone,omitempty"`

	// Coordination makes several instances of the gateway share their
	// limits, rests and quota counts through Redis, so that a cluster
	// counts as one. Off unless set: every limit is per instance.
	Coordination *CoordinationConfig `json:"coordination,omitempty"`

	// ResponsesText says whether a Responses API answer carries, after the
	// image_generation_call item, an assistant message with the chat
	// answer's markdown, so that clients that show only text still show
	// the picture. Off (false) suits clients that render the image item
	// themselves and would show it twice. A model's own setting wins.
	// Default: true.
	ResponsesText *bool `json:"responses_text,omitempty"`

	clients    *clientSet // every client and the digests of its keys
	modelsJSON []byte     // the /v1/models answer, built once
	models     []*model
	modelIndex map[string]*model // lower-cased names and aliases
	upstream   generator
	accounts   *accountPool  // the upstream accounts, their slots and queue
	timeout    time.Duration // the upstream timeout: a generation's whole time, download included
	fetcher    *imageFetcher
	enhancer   *enhancer
	store      *imageStore // nil when the store is off
	uploads    *uploadPool
	playground *playground // nil: off
	health     *health     // nil: off
	quotas     *quotaSet   // nil: no client has a quota
	coord      coordinator // nil: coordination is off
	coordKey   string      // its key in coords
	scrub      *scrubber
	logger     *zap.Logger
}

// CaddyModule returns the Caddy module information.
func (Gateway) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "http.handlers.zimage_gateway",
		New: func() caddy.Module { return new(Gateway) },
	}
}

// Provision resolves placeholders and environment defaults once, then builds
// the clients, the limiter and the metrics; ServeHTTP only reads the result.
func (g *Gateway) Provision(ctx caddy.Context) (err error) {
	defer func() { err = withoutModulePrefix(err) }()
	g.logger = ctx.Logger()
	repl := caddy.NewReplacer()
	resolve := func(v, env string) string {
		v = strings.TrimSpace(repl.ReplaceKnown(v, ""))
		if v == "" && env != "" {
			v = strings.TrimSpace(os.Getenv(env))
		}
		return v
	}

	// client keys and named clients (clients.go)
	keys, err := g.provisionClients(resolve)
	if err != nil {
		return err
	}

	if g.StreamKeepalive <= 0 {
		g.StreamKeepalive = caddy.Duration(defaultKeepalive)
	}
	if g.MaxBody <= 0 {
		g.MaxBody = defaultMaxBody
	}
	if g.MaxUpload <= 0 {
		g.MaxUpload = defaultMaxUpload
	}
	if g.MaxPromptLength <= 0 {
		g.MaxPromptLength = defaultMaxPromptLength
	}

	if err := g.provisionModels(); err != nil {
		return err
	}
	secrets := append([]string(nil), keys...)
	// the Redis URL's password is a secret like the keys (coordination.go)
	coordSecrets, err := g.provisionCoordination(resolve)
	secrets = append(secrets, coordSecrets...)
	if err != nil {
		return err
	}
	g.shareClients()
	up, err := g.provisionUpstream(ctx, resolve)
	if err != nil {
		return err
	}
	g.accounts.retried = g.upstreamRetried
	g.accounts.shareRests(g.coord)
	// every account's key, as every client's (docs/design.md#failover-and-rests; docs/design.md#clients-quotas)
	secrets = append(secrets, g.accounts.keys()...)
	secrets = append(secrets, proxySecrets(up.ForwardProxyURL)...) // docs/design.md#failover-and-rests
	enh, err := g.provisionEnhance(resolve)
	if err != nil {
		return err
	}
	if enh != nil {
		secrets = append(secrets, enh.key)
	}
	g.enhancer = enh
	g.scrub = newScrubber(secrets)

	if err := g.provisionFetcher(up); err != nil {
		return err
	}
	if err := g.provisionStore(ctx, resolve); err != nil {
		return err
	}
	// after the store, whose storage keeps the counts (quotas.go)
	if err := g.provisionQuotas(ctx); err != nil {
		return err
	}
	// after the upstream: an upload waits its queue_timeout (uploads.go)
	if err := g.provisionUploads(); err != nil {
		return err
	}
	// an edit's upload is stored so that the service can fetch it (docs/design.md#edits)
	if g.store != nil && g.hasEditModel() && g.MaxUpload > g.store.maxSize {
		return fmt.Errorf("zimage_gateway: max_upload (%s) is larger than the store's max_image_size (%s), so uploads that large could not be stored for the image service: raise max_image_size or lower max_upload",
			formatBytes(g.MaxUpload), formatBytes(g.store.maxSize))
	}
	// after the store and the models: the page says what they offer
	if g.playground, err = g.provisionPlayground(); err != nil {
		return err
	}
	// after the accounts, the store and the playground (health.go)
	if g.health, err = g.provisionHealth(); err != nil {
		return err
	}
	if reg := ctx.GetMetricsRegistry(); reg != nil {
		if err := registerMetrics(reg); err != nil {
			return fmt.Errorf("zimage_gateway: registering metrics: %v", err)
		}
	}
	return nil
}

// modulePrefix begins the errors of the config's parts, so that each one
// names the module when read on its own (a unit test, a log line).
const modulePrefix = "zimage_gateway: "

// withoutModulePrefix drops modulePrefix from an error that reaches Caddy,
// whose own chain names the module already ("provision
// http.handlers.zimage_gateway: …", "parsing caddyfile tokens for
// 'zimage_gateway': …"): said twice, the name buries the message.
func withoutModulePrefix(err error) error {
	if err == nil || !strings.HasPrefix(err.Error(), modulePrefix) {
		return err
	}
	return trimmedError{msg: strings.TrimPrefix(err.Error(), modulePrefix), err: err}
}

type trimmedError struct {
	msg string
	err error
}

func (e trimmedError) Error() string { return e.msg }
func (e trimmedError) Unwrap() error { return e.err }

// Cleanup releases what Provision made: its claims on the shared limiters
// and the idle connections of its HTTP clients. Caddy calls it as soon as
// a reload has replaced the config, while the old config's requests may
// still be in flight (the grace period does not delay it), so it must not
// disturb them: they keep their limiters and their busy connections.
func (g *Gateway) Cleanup() error {
	if g.store != nil {
		g.store.stop() // the sweeper; stored images stay
	}
	g.health.stop()    // the store's write check loop
	g.cleanupUploads() // uploads in flight keep their shares
	if ic, ok := g.upstream.(*imageClient); ok {
		ic.closeIdle()
	}
	if g.enhancer != nil {
		g.enhancer.client.CloseIdleConnections()
	}
	if g.fetcher != nil {
		g.fetcher.client.CloseIdleConnections()
	}
	// close does nothing the second time: a second Cleanup must not
	// release a sibling's reference
	errs := []error{g.quotas.close(), g.accounts.close(), g.clients.close()}
	if g.accounts != nil {
		g.accounts.stopSharing()
	}
	if g.coord != nil {
		_, err := coords.Delete(g.coordKey)
		errs = append(errs, err)
		g.coord = nil
	}
	return errors.Join(errs...)
}

// Interface guards
var (
	_ caddy.Provisioner           = (*Gateway)(nil)
	_ caddy.CleanerUpper          = (*Gateway)(nil)
	_ caddyhttp.MiddlewareHandler = (*Gateway)(nil)
)
