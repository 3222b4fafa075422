package zimage

import (
	"context"
	"encoding/json"
	"errors"
	"math/rand/v2"
	"net/http"
	"strconv"
	"strings"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"

	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
)

// Endpoint names, as logged and used as the metrics label.
const (
	endpointModels = "models"
	endpointChat   = "chat_completions"
	endpointImages = "images_generations"
)

// maxSeed bounds random seeds to what the upstream accepts: [0, 2^31-1).
const maxSeed = 2147483647

// job carries what the pipeline decides for one generation, so that the
// renderers (chat JSON, SSE, images JSON), the logs and the metrics all read
// the same facts (docs/design.md#the-data-path).
type job struct {
	endpoint  string
	model     *model
	requested string // the model name as the client sent it, echoed back

	original string // the user's prompt without the skip word
	cleaned  string // original without the ratio trigger: the un-enhanced prompt
	prompt   string // what is sent upstream
	skip     bool   // no-enhance was given
	enhance  string // enhanceOK, enhanceFailed, enhanceSkipped, enhanceDisabled

	userRatio     string
	bodyW, bodyH  *float64 // explicit size from the body
	ratio         string
	ratioSource   string // where the ratio came from: ratioFromBody, …
	width, height int

	seed      int64
	fixedSeed bool // the client chose the seed
	cfg       float64
	negative  string
	origin    string     // scheme://host of the request, for the demo
	client    *client    // who asked (clients.go); nil only in unit tests
	adm       *admission // what the request holds of its client's limits

	imageURL string
	stored   string // the store's name of the image ("<id>.<ext>"), when copied

	// the answer uses the image's bytes when they can be downloaded and
	// goes out with the URL alone otherwise (an Images API answer with
	// both forms, which the client did not ask for by name)
	bytesOptional bool

	// the size of the image the service returned, when the gateway held
	// its bytes (the store's copy, a b64_json download); 0 otherwise
	gotWidth, gotHeight int

	// an edit (docs/design.md#edits): the source's URL as given to the service; width
	// and height are the size sent (docs/design.md#edits)
	edit            bool
	sourceURL       string
	sourceName      string       // the source's name in the store, when stored for the edit
	sourceDuplicate bool         // the store held the source's bytes already
	ignored         int          // images of the request after the one edited
	account         string       // the account of the last attempt
	info            upstreamInfo // points, image id and model name from the service
	deadline        time.Time    // when the generation's time, download included, runs out
	queueWait       time.Duration
	latency         time.Duration
}

// jobParams are a generation's inputs common to chat and images.
type jobParams struct {
	prompt        string
	width, height *float64
	cfg           *float64
	seed          *int64
	negative      *string
}

// readParams reads the seed into p and checks its numbers: what the
// decoders of chat and images share once their bodies are decoded.
func readParams(p *jobParams, seed json.RawMessage) *apiError {
	var e *apiError
	if p.seed, e = parseSeed(seed); e != nil {
		return e
	}
	return checkParams(p)
}

// newJob is the job step of a generation: the cheap, deterministic
// decisions (skip word, user ratio, explicit size, seed, cfg and negative
// prompt) for the request admitted as adm, which came to origin.
// Enhancement and generation come later, after a stream has begun.
func (g *Gateway) newJob(q *ask, adm *admission, origin string) (*job, *apiError) {
	p := &q.params
	j := &job{endpoint: q.endpoint, model: q.model, requested: q.requested, bodyW: p.width, bodyH: p.height,
		adm: adm, origin: origin, bytesOptional: q.bytesOptional}
	if adm != nil {
		j.client = adm.client
	}
	m := q.model
	if q.requested == "" {
		j.requested = m.name
	}
	// a secret in the client's own text would go on to the LLM, the image
	// service and back into the answer: it goes nowhere
	j.original, j.skip = stripSkipWord(strings.TrimSpace(g.scrub.Replace(stripControl(p.prompt))))
	var ok bool
	if j.userRatio, j.cleaned, ok = detectRatio(j.original); !ok {
		j.cleaned = j.original
	}
	if j.cleaned == "" {
		return nil, invalidRequest("prompt", "The prompt is empty once the ratio, no-enhance and control characters are removed; describe the image to generate")
	}
	j.prompt = j.cleaned

	j.cfg = m.cfg
	if p.cfg != nil {
		j.cfg = *p.cfg
	}
	if p.seed != nil && *p.seed >= 0 {
		j.seed, j.fixedSeed = *p.seed, true
	} else {
		j.seed = randomSeed()
	}
	j.negative = m.negativePrompt
	if p.negative != nil {
		j.negative = g.scrub.Replace(stripControl(*p.negative))
	}
	j.decideSize("")
	return j, nil
}

// decideSize applies the size priority of docs/design.md#the-prompt: explicit body
// width and height, then the user's ratio, then the LLM's, then 1:1.
func (j *job) decideSize(llmRatio string) {
	switch {
	case j.bodyW != nil && j.bodyH != nil:
		j.width, j.height = clampSide(*j.bodyW), clampSide(*j.bodyH)
		j.ratio, j.ratioSource = customRatio, ratioFromBody
		return
	case j.userRatio != "":
		j.ratio, j.ratioSource = j.userRatio, ratioFromUser
	case llmRatio != "":
		j.ratio, j.ratioSource = llmRatio, ratioFromLLM
	default:
		j.ratio, j.ratioSource = defaultRatio, ratioFromDefault
	}
	s := ratioSizes[j.ratio]
	j.width, j.height = s.w, s.h
}

// runEnhance is the enhance step: one LLM call unless skipped or not
// configured; any failure keeps the user's prompt. It then settles the
// size.
func (g *Gateway) runEnhance(ctx context.Context, j *job) {
	if j.edit {
		return // edits are not enhanced; newEditJob counted them skipped
	}
	switch {
	case g.enhancer == nil:
		j.enhance = enhanceDisabled
	case j.skip:
		j.enhance = enhanceSkipped
	default:
		out, err := g.enhancer.enhance(ctx, j.cleaned, j.userRatio)
		switch {
		case err != nil && ctx.Err() != nil:
			// the client left: not an LLM failure
			j.enhance = enhanceCanceled
		case err != nil:
			j.enhance = enhanceFailed
			g.logger.Warn("prompt enhancement failed; using the original prompt",
				zap.String("endpoint", j.endpoint), zap.String("error", g.scrub.Replace(err.Error())))
		default:
			j.enhance = enhanceOK
			// an LLM proxy may echo its Authorization header, or the
			// keys it was shown: its text is scrubbed like any other
			j.prompt = g.scrub.Replace(out.prompt)
			j.decideSize(out.ratio) // a body size or the user's ratio still wins
		}
	}
	metricEnhance.WithLabelValues(j.enhance).Inc()
}

// generate is one generation: an account and a slot, the attempts, the
// outcome recorded, the check of the model that ran. It is safe to call concurrently on distinct jobs.
func (g *Gateway) generate(ctx context.Context, j *job) *apiError {
	req := upstreamRequest{
		Prompt:         j.prompt,
		Width:          j.width,
		Height:         j.height,
		Steps:          j.model.steps,
		CFG:            j.cfg,
		ModelIndex:     j.model.modelIndex,
		Seed:           j.seed,
		NegativePrompt: j.negative,
		ImageSource:    j.sourceURL,
	}
	res, run, err := g.accounts.run(ctx, func(ctx context.Context, a *account) (upstreamResult, *upstreamError) {
		return g.upstream.generate(ctx, a.key, req, j.origin)
	})
	j.account, j.queueWait, j.latency, j.deadline = run.account, run.queueWait, run.latency, run.deadline
	if err == nil && g.scrub.contains(res.imageURL) {
		// a URL with a key in it (in its query, escaped, in any case) would
		// hand the key to every reader of the answer
		err = &upstreamError{kind: kindBadResponse, message: "the image service answered an image URL that carries a secret; it is not passed on"}
	}
	g.health.noteGeneration(err) // the upstream as last seen (health.go)

	if err != nil {
		var ae *apiError
		if errors.As(err, &ae) { // no slot within queue_timeout
			g.logGeneration(j, ae.status, "queue_timeout")
			return ae
		}
		var ue *upstreamError
		if !errors.As(err, &ue) {
			ue = &upstreamError{kind: kindBadResponse, message: err.Error()}
		}
		ae = ue.apiError(g.scrub)
		if ue.kind != kindCanceled {
			metricUpstreamErrors.WithLabelValues(ue.kind).Inc()
			g.logger.Warn("image service call failed",
				zap.String("endpoint", j.endpoint), zap.String("model", j.model.name),
				zap.String("account", j.account),
				zap.String("kind", ue.kind), zap.String("error", ae.message),
				zap.String("detail", g.scrub.Replace(ue.detail)),
				zap.Duration("upstream_latency", j.latency))
		}
		g.logGeneration(j, ae.status, ue.kind)
		return ae
	}
	metricGeneration.WithLabelValues(j.model.name).Observe(j.latency.Seconds())
	// the service made the image and took its points: it counts against
	// the client's quotas whatever happens to the answer
	j.adm.made()
	j.imageURL = res.imageURL
	j.info = res.info
	j.info.imageID, j.info.modelName = g.scrub.Replace(j.info.imageID), g.scrub.Replace(j.info.modelName)
	// the success line is written once the image is kept (produce), so it
	// can say where the answer's image lives; the model that ran must be
	// the model asked for (docs/design.md#model-identity, models.go)
	return g.checkModel(j)
}

// upstreamRetried counts and logs a failed attempt that the account pool
// follows with another, on the account to (the same one, or another one
// at once: failover); the final outcome is logged by generate.
func (g *Gateway) upstreamRetried(ue *upstreamError, attempt int, from, to *account) {
	metricUpstreamErrors.WithLabelValues(ue.kind).Inc()
	g.logger.Warn("image service call failed; retrying",
		zap.String("kind", ue.kind), zap.Int("attempt", attempt),
		zap.String("account", from.name), zap.String("next_account", to.name),
		zap.String("error", truncate(g.scrub.Replace(ue.message), maxMessageRunes)),
		zap.String("detail", g.scrub.Replace(ue.detail)))
}

// logGeneration writes the one info line per generation (docs/design.md#observability); the
// prompt itself only at debug level.
func (g *Gateway) logGeneration(j *job, status int, failure string) {
	if ce := g.logger.Check(zapcore.InfoLevel, "generation"); ce != nil {
		// one inline object rather than a slice of up to 19 fields, which
		// was the largest allocation of a chat request;
		// the line is the same, field for field
		ce.Write(zap.Inline(generationLine{j: j, status: status, failure: failure}))
	}
	if ce := g.logger.Check(zapcore.DebugLevel, "generation prompt"); ce != nil {
		ce.Write(zap.String("original", j.original), zap.String("prompt", j.prompt))
	}
}

// generationLine is the fields of the "generation" line. The encoder
// reads them from the job inside the logger's Write, before logGeneration
// returns.
type generationLine struct {
	j       *job
	status  int
	failure string
}

func (l generationLine) MarshalLogObject(enc zapcore.ObjectEncoder) error {
	j := l.j
	enc.AddString("endpoint", j.endpoint)
	enc.AddString("model", j.model.name)
	enc.AddString("size", strconv.Itoa(j.width)+"x"+strconv.Itoa(j.height))
	enc.AddString("ratio", logRatio(j.ratio, j.width, j.height))
	enc.AddString("ratio_source", j.ratioSource)
	enc.AddInt64("seed", j.seed)
	enc.AddString("enhance", j.enhance)
	enc.AddDuration("queue_wait", j.queueWait)
	enc.AddDuration("upstream_latency", j.latency)
	enc.AddInt64("status", int64(l.status))
	enc.AddString("client", j.client.label())
	enc.AddString("account", j.account)
	if l.failure != "" {
		enc.AddString("failure", l.failure)
	}
	// the service has answered another size than asked (a public client
	// saw 512×512 for edits sent without a size)
	if j.gotWidth > 0 && (j.gotWidth != j.width || j.gotHeight != j.height) {
		enc.AddString("size_sent", strconv.Itoa(j.width)+"x"+strconv.Itoa(j.height))
		enc.AddString("size_returned", strconv.Itoa(j.gotWidth)+"x"+strconv.Itoa(j.gotHeight))
	}
	if j.ignored > 0 {
		enc.AddInt("images_ignored", j.ignored)
	}
	if l.status == http.StatusOK {
		enc.AddBool("stored", j.stored != "")
		if id, _, ok := strings.Cut(j.stored, "."); ok {
			enc.AddString("store_id", id)
		}
	}
	// what the service said about the image (docs/design.md#points), when it did
	if j.info.hasPointsUsed {
		enc.AddFloat64("points_used", j.info.pointsUsed)
	}
	if j.info.hasRemainingPoints {
		enc.AddFloat64("remaining_points", j.info.remainingPoints)
	}
	if j.info.imageID != "" {
		enc.AddString("image_id", j.info.imageID)
	}
	if j.info.modelName != "" {
		enc.AddString("model_name", j.info.modelName)
	}
	return nil
}

// randomSeed is a fresh seed in [1, 2147483647): public clients of the
// service report that seeds 0 and -1 fail there (docs/design.md#the-prompt).
func randomSeed() int64 { return 1 + seedSource(maxSeed-1) }

// seedSource draws in [0, n); a variable so that a test can draw the
// extremes.
var seedSource = rand.Int64N

// requestOrigin is the scheme://host the client used (docs/design.md#the-store): behind a
// proxy that terminates TLS, its X-Forwarded-Proto and X-Forwarded-Host,
// but only when Caddy trusts the proxy (the server's trusted_proxies);
// anyone else could send those headers to get URLs on a host of their
// choosing. With several proxies the first value is the client-facing one.
func requestOrigin(r *http.Request) string {
	scheme := "http"
	if r.TLS != nil {
		scheme = "https"
	}
	host := r.Host
	if trusted, _ := caddyhttp.GetVar(r.Context(), caddyhttp.TrustedProxyVarKey).(bool); trusted {
		if p := strings.ToLower(firstForwarded(r.Header.Get("X-Forwarded-Proto"))); p == "http" || p == "https" {
			scheme = p
		}
		if h := firstForwarded(r.Header.Get("X-Forwarded-Host")); validForwardedHost(h) {
			host = h
		}
	}
	return scheme + "://" + host
}

// firstForwarded is the first of a comma-separated forwarding header.
func firstForwarded(v string) string {
	v, _, _ = strings.Cut(v, ",")
	return strings.TrimSpace(v)
}

// validForwardedHost accepts host[:port] made of the characters of DNS
// names, IPv4 and bracketed IPv6 addresses: the value goes into URLs and
// markdown.
func validForwardedHost(h string) bool {
	if h == "" || len(h) > 255 {
		return false
	}
	for _, c := range h {
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || strings.ContainsRune(".-:[]_", c)) {
			return false
		}
	}
	return true
}
