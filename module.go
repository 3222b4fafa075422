// Package zimage is a Caddy HTTP handler module that puts the 梦羽 (Mengyu)
// text-to-image service behind the OpenAI API: GET /v1/models,
// POST /v1/chat/completions (streaming and not) and POST /v1/images/generations.
package zimage

import (
	"crypto/sha256"
	"encoding/json"
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

	// demoUpstream selects the local placeholder renderer (SPEC §7).
	demoUpstream = "demo"
)

// Gateway is an OpenAI-compatible image API in front of the 梦羽
// text-to-image service. It answers /v1/models, /v1/chat/completions and
// /v1/images/generations (each also without the /v1 prefix) and passes every
// other path to the next handler, so it can share a site with other routes.
type Gateway struct {
	// APIKeys are the keys clients must present as `Authorization: Bearer <key>`.
	// Placeholders such as {env.NAME} are accepted. Default: the environment
	// variable GATEWAY_API_KEY. Required unless NoAuth is set.
	APIKeys []string `json:"api_keys,omitempty"`

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

	// ImageHosts lists extra host names (besides the upstream's own host)
	// from which images may be downloaded for response_format b64_json.
	ImageHosts []string `json:"image_hosts,omitempty"`

	keyDigests   [][32]byte // SHA-256 of each client key
	modelsJSON   []byte     // the /v1/models answer, built once
	models       []*model
	modelIndex   map[string]*model // lower-cased names and aliases
	upstream     generator
	limiter      *limiter
	limiterKey   string
	queueTimeout time.Duration
	fetcher      *imageFetcher
	enhancer     *enhancer
	scrub        *strings.Replacer
	logger       *zap.Logger
}

// UpstreamConfig configures the image service client.
type UpstreamConfig struct {
	// URL is the generate_image endpoint, or "demo" to render placeholder
	// images locally without an account. Placeholders are accepted.
	// Default: https://sd.exacg.cc/api/v1/generate_image.
	URL string `json:"url,omitempty"`

	// APIKey is sent to the image service as a bearer token. Placeholders
	// are accepted. Default: the environment variable SD_API_KEY. Required
	// unless URL is "demo".
	APIKey string `json:"api_key,omitempty"`

	// Timeout bounds one whole generation call, retries included.
	// Default: 180s.
	Timeout caddy.Duration `json:"timeout,omitempty"`

	// MaxConcurrent is the most generations in flight to this upstream at
	// once, across all endpoints and sites that share it. 0 means unlimited.
	MaxConcurrent int `json:"max_concurrent,omitempty"`

	// QueueTimeout is how long a request may wait for a free slot before it
	// is answered with 429. Default: the upstream timeout.
	QueueTimeout caddy.Duration `json:"queue_timeout,omitempty"`

	// Retries is how many times a call is retried after a connection error
	// or an upstream 502/503/504; never after other statuses or a timeout.
	// Default: 1.
	Retries *int `json:"retries,omitempty"`
}

// EnhanceConfig configures the OpenAI-compatible LLM used for prompt
// enhancement. Every failure of the LLM silently falls back to the user's
// own prompt.
type EnhanceConfig struct {
	// Off disables enhancement even when a key is available.
	Off bool `json:"off,omitempty"`

	// APIKey is the LLM's bearer token. Placeholders are accepted.
	// Default: the environment variable ENHANCE_OPENAI_API_KEY.
	APIKey string `json:"api_key,omitempty"`

	// BaseURL is the LLM API's base URL, to which /chat/completions is
	// appended. Placeholders are accepted. Default: the environment variable
	// ENHANCE_OPENAI_BASE_URL, else https://api.openai.com/v1.
	BaseURL string `json:"base_url,omitempty"`

	// Model is the LLM model name. Default: the environment variable
	// ENHANCE_OPENAI_MODEL, else gpt-4o-mini.
	Model string `json:"model,omitempty"`

	// Timeout bounds the LLM call. Default: 10s.
	Timeout caddy.Duration `json:"timeout,omitempty"`

	// SystemPrompt replaces the built-in system prompt.
	SystemPrompt string `json:"system_prompt,omitempty"`

	// SystemPromptFile reads the system prompt from a file at load time.
	SystemPromptFile string `json:"system_prompt_file,omitempty"`
}

// ModelConfig is one model name offered to clients.
type ModelConfig struct {
	// Name is the model id listed by /v1/models.
	Name string `json:"name"`

	// Aliases are other names clients may send (e.g. dall-e-3, which some
	// chat clients hard-code for images). They are not listed by /v1/models.
	Aliases []string `json:"aliases,omitempty"`

	// ModelIndex is the upstream's model_index. Default: 5.
	ModelIndex *int `json:"model_index,omitempty"`

	// Steps is the number of sampling steps. Default: 8.
	Steps int `json:"steps,omitempty"`

	// CFG is the default guidance scale. Default: 7.0.
	CFG *float64 `json:"cfg,omitempty"`

	// NegativePrompt is the default negative prompt. Default: none.
	NegativePrompt string `json:"negative_prompt,omitempty"`
}

// model is a resolved ModelConfig.
type model struct {
	name           string
	modelIndex     int
	steps          int
	cfg            float64
	negativePrompt string
	created        int64
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
func (g *Gateway) Provision(ctx caddy.Context) error {
	g.logger = ctx.Logger()
	repl := caddy.NewReplacer()
	resolve := func(v, env string) string {
		v = strings.TrimSpace(repl.ReplaceKnown(v, ""))
		if v == "" && env != "" {
			v = strings.TrimSpace(os.Getenv(env))
		}
		return v
	}

	// client keys
	var keys []string
	for _, k := range g.APIKeys {
		if k = resolve(k, ""); k != "" {
			keys = append(keys, k)
		}
	}
	if len(keys) == 0 {
		if k := resolve("", "GATEWAY_API_KEY"); k != "" {
			keys = append(keys, k)
		}
	}
	g.keyDigests = nil
	for _, k := range keys {
		g.keyDigests = append(g.keyDigests, sha256.Sum256([]byte(k)))
	}
	if len(keys) == 0 && !g.NoAuth {
		return errors.New("zimage_gateway: no client API key: set 'api_key' (or the GATEWAY_API_KEY environment variable), or 'no_auth' if the site authenticates requests otherwise")
	}

	if g.StreamKeepalive <= 0 {
		g.StreamKeepalive = caddy.Duration(defaultKeepalive)
	}
	if g.MaxBody <= 0 {
		g.MaxBody = defaultMaxBody
	}
	if g.MaxPromptLength <= 0 {
		g.MaxPromptLength = defaultMaxPromptLength
	}

	if err := g.provisionModels(); err != nil {
		return err
	}
	secrets := append([]string(nil), keys...)
	up, err := g.provisionUpstream(resolve)
	if err != nil {
		return err
	}
	if up.APIKey != "" {
		secrets = append(secrets, up.APIKey)
	}
	enh, err := g.provisionEnhance(resolve)
	if err != nil {
		return err
	}
	if enh != nil {
		secrets = append(secrets, enh.key)
	}
	g.enhancer = enh
	g.scrub = newScrubber(secrets)

	g.fetcher = newImageFetcher(up.URL, g.ImageHosts)
	if reg := ctx.GetMetricsRegistry(); reg != nil {
		if err := registerMetrics(reg); err != nil {
			return fmt.Errorf("zimage_gateway: registering metrics: %v", err)
		}
	}
	return nil
}

// provisionModels fills model defaults and builds the case-insensitive index
// of names and aliases.
func (g *Gateway) provisionModels() error {
	cfgs := g.Models
	if len(cfgs) == 0 {
		cfgs = []ModelConfig{{Name: defaultModelName}}
	}
	now := time.Now().Unix()
	g.models = make([]*model, 0, len(cfgs))
	g.modelIndex = make(map[string]*model)
	for _, mc := range cfgs {
		name := strings.TrimSpace(mc.Name)
		if name == "" {
			return errors.New("zimage_gateway: model: a name is required")
		}
		m := &model{
			name:           name,
			modelIndex:     defaultModelIndex,
			steps:          defaultSteps,
			cfg:            defaultCFG,
			negativePrompt: mc.NegativePrompt,
			created:        now,
		}
		if mc.ModelIndex != nil {
			if *mc.ModelIndex < 0 {
				return fmt.Errorf("zimage_gateway: model %s: model_index must be 0 or more, got %d", name, *mc.ModelIndex)
			}
			m.modelIndex = *mc.ModelIndex
		}
		if mc.Steps < 0 {
			return fmt.Errorf("zimage_gateway: model %s: steps must be positive, got %d", name, mc.Steps)
		}
		if mc.Steps > 0 {
			m.steps = mc.Steps
		}
		if mc.CFG != nil {
			if *mc.CFG <= 0 || *mc.CFG > 30 {
				return fmt.Errorf("zimage_gateway: model %s: cfg must be in (0, 30], got %g", name, *mc.CFG)
			}
			m.cfg = *mc.CFG
		}
		for _, n := range append([]string{name}, mc.Aliases...) {
			key := strings.ToLower(strings.TrimSpace(n))
			if key == "" {
				continue
			}
			if _, dup := g.modelIndex[key]; dup {
				return fmt.Errorf("zimage_gateway: model: duplicate model name or alias %q", n)
			}
			g.modelIndex[key] = m
		}
		g.models = append(g.models, m)
	}
	list := modelList{Object: "list", Data: make([]modelObject, 0, len(g.models))}
	for _, m := range g.models {
		list.Data = append(list.Data, m.object())
	}
	var err error
	g.modelsJSON, err = json.Marshal(list)
	return err
}

// provisionUpstream resolves the image service settings and builds its
// client (or the demo renderer) and the shared concurrency limiter.
func (g *Gateway) provisionUpstream(resolve func(v, env string) string) (UpstreamConfig, error) {
	var uc UpstreamConfig
	if g.Upstream != nil {
		uc = *g.Upstream
	}
	uc.URL = resolve(uc.URL, "")
	if uc.URL == "" {
		uc.URL = defaultUpstreamURL
	}
	uc.APIKey = resolve(uc.APIKey, "SD_API_KEY")
	if uc.Timeout <= 0 {
		uc.Timeout = caddy.Duration(defaultUpstreamTimeout)
	}
	if uc.QueueTimeout <= 0 {
		uc.QueueTimeout = uc.Timeout
	}
	retries := defaultRetries
	if uc.Retries != nil {
		retries = *uc.Retries
	}
	if retries < 0 || retries > 10 {
		return uc, fmt.Errorf("zimage_gateway: upstream: retries must be between 0 and 10, got %d", retries)
	}
	if uc.MaxConcurrent < 0 {
		return uc, fmt.Errorf("zimage_gateway: upstream: max_concurrent must be 0 (unlimited) or more, got %d", uc.MaxConcurrent)
	}

	if strings.EqualFold(uc.URL, demoUpstream) {
		uc.URL = demoUpstream
		g.upstream = demoGenerator{}
		g.logger.Warn("zimage_gateway is using the demo upstream: images are local placeholders, the image service is never called")
	} else {
		if err := checkHTTPURL(uc.URL); err != nil {
			return uc, fmt.Errorf("zimage_gateway: upstream: %v", err)
		}
		if uc.APIKey == "" {
			return uc, errors.New("zimage_gateway: upstream: no API key for the image service: set 'api_key' in the upstream block or the SD_API_KEY environment variable (or use 'upstream demo' to try the gateway without an account)")
		}
		ic := newImageClient(uc.URL, uc.APIKey, time.Duration(uc.Timeout), retries)
		ic.retried = g.upstreamRetried
		g.upstream = ic
	}

	if uc.MaxConcurrent > 0 {
		g.limiterKey = fmt.Sprintf("%s|%d", uc.URL, uc.MaxConcurrent)
		val, _, _ := limiters.LoadOrNew(g.limiterKey, func() (caddy.Destructor, error) {
			return newLimiter(uc.MaxConcurrent), nil
		})
		g.limiter = val.(*limiter)
		g.queueTimeout = time.Duration(uc.QueueTimeout)
	}
	return uc, nil
}

// provisionEnhance resolves the LLM settings; it returns nil when
// enhancement is off or no key resolves.
func (g *Gateway) provisionEnhance(resolve func(v, env string) string) (*enhancer, error) {
	var ec EnhanceConfig
	if g.Enhance != nil {
		ec = *g.Enhance
	}
	if ec.Off {
		return nil, nil
	}
	key := resolve(ec.APIKey, "ENHANCE_OPENAI_API_KEY")
	if key == "" {
		return nil, nil
	}
	base := resolve(ec.BaseURL, "ENHANCE_OPENAI_BASE_URL")
	if base == "" {
		base = defaultEnhanceBaseURL
	}
	if err := checkHTTPURL(base); err != nil {
		return nil, fmt.Errorf("zimage_gateway: enhance: base_url: %v", err)
	}
	name := resolve(ec.Model, "ENHANCE_OPENAI_MODEL")
	if name == "" {
		name = defaultEnhanceModel
	}
	timeout := time.Duration(ec.Timeout)
	if timeout <= 0 {
		timeout = defaultEnhanceTimeout
	}
	system := ec.SystemPrompt
	if ec.SystemPromptFile != "" {
		if system != "" {
			return nil, errors.New("zimage_gateway: enhance: use either system_prompt or system_prompt_file, not both")
		}
		b, err := os.ReadFile(ec.SystemPromptFile)
		if err != nil {
			return nil, fmt.Errorf("zimage_gateway: enhance: system_prompt_file: %v", err)
		}
		system = string(b)
	}
	if strings.TrimSpace(system) == "" {
		system = defaultSystemPrompt
	}
	return newEnhancer(base, key, name, system, timeout), nil
}

// Cleanup releases what Provision made: its reference to the shared
// limiter and the idle connections of its HTTP clients. Caddy calls it as
// soon as a reload has replaced the config, while the old config's requests
// may still be in flight (the grace period does not delay it), so it must
// not disturb them: they keep their limiter and their busy connections.
func (g *Gateway) Cleanup() error {
	if ic, ok := g.upstream.(*imageClient); ok {
		ic.closeIdle()
	}
	if g.enhancer != nil {
		g.enhancer.client.CloseIdleConnections()
	}
	if g.fetcher != nil {
		g.fetcher.client.CloseIdleConnections()
	}
	if g.limiterKey != "" {
		key := g.limiterKey
		g.limiterKey = "" // a second Cleanup must not release a sibling's reference
		_, err := limiters.Delete(key)
		return err
	}
	return nil
}

// lookupModel finds a model by name or alias, case-insensitively; an empty
// name selects the first configured model.
func (g *Gateway) lookupModel(name string) *model {
	if strings.TrimSpace(name) == "" {
		return g.models[0]
	}
	if m, ok := g.modelIndex[strings.ToLower(strings.TrimSpace(name))]; ok {
		return m
	}
	return nil
}

// Interface guards
var (
	_ caddy.Provisioner           = (*Gateway)(nil)
	_ caddy.CleanerUpper          = (*Gateway)(nil)
	_ caddyhttp.MiddlewareHandler = (*Gateway)(nil)
)
