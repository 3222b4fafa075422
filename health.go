package zimage

// The health endpoint (docs/design.md#health): a GET or HEAD, without
// auth (load balancers and Caddy's own active health checks send no key),
// that says whether a generation could start on this instance now. Its
// config, Caddyfile parsing, provisioning and serving live here; it reads
// the accounts' limiters (limiter.go) and the store (store.go) without
// changing them, and it never calls the image service.

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
	"go.uber.org/zap"

	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
)

const (
	// defaultHealthPath is where the health endpoint answers unless
	// configured: inside the gateway's own /v1/zimage/ namespace, beside
	// the stored images
	defaultHealthPath = "/v1/zimage/health"

	// the store's write check: a tiny write under {prefix}/health, made by
	// a loop of its own every healthStoreEvery while health is on, so that
	// a probe at any interval reads a fresh result (balancers probe every
	// 30 s, once a minute or once an hour) and probes never write to the
	// storage themselves; each write is bounded by healthStoreTimeout. A
	// result older than healthStoreStale means the loop's write hangs,
	// and counts as a failure
	healthStoreEvery   = 10 * time.Second
	healthStoreTimeout = 5 * time.Second
	healthStoreStale   = 3 * healthStoreEvery
	// how long the first probe waits for the first check
	healthStoreFirstWait = 3 * time.Second

	// healthDegradedAfter generations in a row that failed on every
	// account they tried make the status "degraded": still 200, since a
	// generation can start, but the service has not been delivering
	healthDegradedAfter = 3
)

// HealthConfig turns on the health endpoint: GET or HEAD <path>, without
// auth, answers 200 {"status":"ok",…} when a generation could start now
// (some upstream account is not resting, and the store, if on, can write)
// and 503 {"status":"unavailable","reason":…} otherwise; "degraded" (200)
// when the last generations in a row all failed. The body names the
// accounts (resting until when, points remaining when known), the store's
// state and the upstream as last seen; never a key or a prompt. It makes
// no upstream call. Off unless set.
type HealthConfig struct {
	// Path is where the endpoint answers, exactly (no prefix match). It
	// must be absolute and clean, and must not be one of the gateway's own
	// endpoints. Default: /v1/zimage/health.
	Path string `json:"path,omitempty"`
}

// health is a provisioned HealthConfig.
type health struct {
	path   string
	pool   *accountPool
	store  *imageStore // nil: the store is off
	probe  *storeProbe // nil with the store off
	now    func() time.Time
	logger *zap.Logger

	// what the generations of this handler last met at the service
	seenMu sync.Mutex
	seen   upstreamSeen

	// cluster is the quotas' use and the coordination's state (quotas_usage.go,
	// coordination.go)
	cluster func(ctx context.Context) healthCluster
}

// upstreamSeen is the upstream as the handler's generations last saw it.
type upstreamSeen struct {
	lastSuccess, lastFailure time.Time
	lastFailureKind          string
	consecutiveFailures      int
}

// unmarshalHealth parses `health [<path>]`.
func unmarshalHealth(d *caddyfile.Dispenser) (*HealthConfig, error) {
	hc := new(HealthConfig)
	if d.NextArg() {
		hc.Path = d.Val()
	}
	if d.NextArg() {
		return nil, d.ArgErr()
	}
	if d.NextBlock(d.Nesting()) {
		return nil, d.Err("zimage_gateway: health takes no block, only an optional path")
	}
	if _, err := healthPath(hc.Path); err != nil {
		return nil, d.Err(err.Error())
	}
	return hc, nil
}

// healthPath validates a configured path; "" selects the default.
func healthPath(p string) (string, error) {
	if p == "" {
		return defaultHealthPath, nil
	}
	if !strings.HasPrefix(p, "/") || p == "/" {
		return "", fmt.Errorf("zimage_gateway: health: path %q must be absolute and not the site root, such as %s", p, defaultHealthPath)
	}
	for _, c := range p {
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || strings.ContainsRune("-._~/", c)) {
			return "", fmt.Errorf("zimage_gateway: health: path %q may only contain letters, digits and - . _ ~ /", p)
		}
	}
	if strings.Contains(p, "//") || strings.Contains(p+"/", "/./") || strings.Contains(p+"/", "/../") {
		return "", fmt.Errorf("zimage_gateway: health: path %q is not clean (no //, . or .. segments)", p)
	}
	// an endpoint of the gateway's own would be hidden (or hide it)
	if rt, _ := parseRoute(p); rt != routeNone && rt != routeUnknown {
		return "", fmt.Errorf("zimage_gateway: health: path %q is one of the gateway's API paths; choose another, such as %s", p, defaultHealthPath)
	}
	return p, nil
}

// provisionHealth builds the endpoint; it runs after the upstream and the
// store, whose state it reports.
func (g *Gateway) provisionHealth() (*health, error) {
	if g.Health == nil {
		return nil, nil
	}
	p, err := healthPath(g.Health.Path)
	if err != nil {
		return nil, err
	}
	if g.playground != nil && (p == g.playground.path || strings.HasPrefix(p, g.playground.path+"/")) {
		return nil, fmt.Errorf("zimage_gateway: health: path %q is inside the playground's path %s; choose another", p, g.playground.path)
	}
	h := &health{path: p, pool: g.accounts, store: g.store, now: time.Now, logger: g.logger, cluster: g.healthCluster}
	if g.store != nil {
		h.probe = newStoreProbe(g.store, time.Now, g.logger)
		t := time.NewTicker(healthStoreEvery)
		go func() {
			defer t.Stop()
			h.probe.run(t.C) // a tick that comes while a write runs is dropped
		}()
	}
	return h, nil
}

// stop ends the store's write check loop (Cleanup) and waits for a write
// in progress, which is bounded: a write after Cleanup would land in a
// storage the next config (or a test's temporary directory) owns. Nil-safe.
func (h *health) stop() {
	if h == nil || h.probe == nil {
		return
	}
	h.probe.stop()
	select {
	case <-h.probe.done:
	case <-time.After(healthStoreTimeout + time.Second):
	}
}

// noteGeneration records how a generation ended at the service: err is
// what the account pool's run (and the image URL's check) returned. A
// generation that never reached an account (no slot in time) or whose
// client left tells nothing about the service. Nil-safe: health may be off.
func (h *health) noteGeneration(err error) {
	if h == nil {
		return
	}
	kind := ""
	if err != nil {
		var ae *apiError
		var ue *upstreamError
		switch {
		case errors.As(err, &ae):
			return
		case errors.As(err, &ue):
			if ue.kind == kindCanceled {
				return
			}
			kind = ue.kind
		default:
			kind = kindBadResponse
		}
	}
	now := h.now()
	h.seenMu.Lock()
	defer h.seenMu.Unlock()
	if kind == "" {
		h.seen.lastSuccess, h.seen.consecutiveFailures = now, 0
		return
	}
	h.seen.lastFailure, h.seen.lastFailureKind = now, kind
	h.seen.consecutiveFailures++
}

// healthReport is the body of the health endpoint. Nothing in it is a
// secret: account names, times, counts and states.
type healthReport struct {
	Status   string          `json:"status"` // ok | degraded | unavailable
	Reason   string          `json:"reason,omitempty"`
	Accounts []healthAccount `json:"accounts"`
	Store    healthStore     `json:"store"`
	Upstream healthUpstream  `json:"upstream"`
	healthCluster
}

// healthUpstream is upstreamSeen in the body: times null until the first
// generation that ended so, and the failure's kind as counted in
// caddy_zimage_upstream_errors_total (never its message, which may quote
// the prompt).
type healthUpstream struct {
	LastSuccess         *time.Time `json:"last_success"`
	LastFailure         *time.Time `json:"last_failure"`
	LastFailureKind     string     `json:"last_failure_kind"`
	ConsecutiveFailures int        `json:"consecutive_failures"`
}

type healthAccount struct {
	Name            string     `json:"name"`
	Resting         bool       `json:"resting"`
	RestingUntil    *time.Time `json:"resting_until,omitempty"`
	InFlight        int        `json:"in_flight"`
	MaxConcurrent   int        `json:"max_concurrent"` // 0: unlimited
	PointsRemaining *float64   `json:"points_remaining,omitempty"`
}

type healthStore struct {
	State     string     `json:"state"` // off | ok | failing | checking
	CheckedAt *time.Time `json:"checked_at,omitempty"`
}

// serve answers the health path and reports whether the request was its.
func (h *health) serve(w http.ResponseWriter, r *http.Request) bool {
	if r.URL.Path != h.path {
		return false
	}
	if r.Method != http.MethodGet && r.Method != http.MethodHead {
		w.Header().Set("Allow", "GET, HEAD")
		writeError(w, errMethod(r.Method, "GET or HEAD"))
		return true
	}
	rep, retryAfter := h.report(r.Context())
	body, _ := json.Marshal(rep)
	hdr := w.Header()
	hdr.Set("Content-Type", "application/json")
	hdr.Set("Cache-Control", "no-store")
	hdr.Set("Content-Length", strconv.Itoa(len(body)))
	code := http.StatusOK
	if rep.Status == "unavailable" {
		code = http.StatusServiceUnavailable
		if retryAfter > 0 {
			hdr.Set("Retry-After", retryAfterSeconds(retryAfter))
		}
	}
	w.WriteHeader(code)
	if r.Method != http.MethodHead {
		_, _ = w.Write(body)
	}
	return true
}

// report reads the state of the accounts and the store. retryAfter is how
// long until the first resting account wakes, when every one rests.
func (h *health) report(ctx context.Context) (rep healthReport, retryAfter time.Duration) {
	now := h.now()
	points := pointsRemaining()
	awake := false
	var firstWake time.Time
	limMu.Lock()
	for _, a := range h.pool.accounts {
		ha := healthAccount{Name: a.name, InFlight: a.lim.inFlight, MaxConcurrent: a.lim.limitLocked()}
		if a.lim.restingLocked(now) {
			until := a.lim.restUntil.UTC().Truncate(time.Second)
			ha.Resting, ha.RestingUntil = true, &until
			if firstWake.IsZero() || a.lim.restUntil.Before(firstWake) {
				firstWake = a.lim.restUntil
			}
		} else {
			awake = true
		}
		if p, ok := points[a.name]; ok {
			ha.PointsRemaining = &p
		}
		rep.Accounts = append(rep.Accounts, ha)
	}
	limMu.Unlock()

	rep.Store = healthStore{State: "off"}
	var storeErr string
	if h.probe != nil {
		rep.Store, storeErr = h.probe.state(ctx, now)
	}
	h.seenMu.Lock()
	seen := h.seen
	h.seenMu.Unlock()
	rep.Upstream = healthUpstream{LastFailureKind: seen.lastFailureKind, ConsecutiveFailures: seen.consecutiveFailures}
	if !seen.lastSuccess.IsZero() {
		t := seen.lastSuccess.UTC().Truncate(time.Second)
		rep.Upstream.LastSuccess = &t
	}
	if !seen.lastFailure.IsZero() {
		t := seen.lastFailure.UTC().Truncate(time.Second)
		rep.Upstream.LastFailure = &t
	}
	switch {
	case !awake:
		rep.Status = "unavailable"
		rep.Reason = "every upstream account rests until " + firstWake.UTC().Truncate(time.Second).Format(time.RFC3339)
		retryAfter = firstWake.Sub(now)
	case storeErr != "":
		rep.Status, rep.Reason = "unavailable", storeErr
	case seen.consecutiveFailures >= healthDegradedAfter:
		rep.Status = "degraded"
		rep.Reason = fmt.Sprintf("the last %d generations failed on every account they tried (the last: %s)", seen.consecutiveFailures, seen.lastFailureKind)
	default:
		rep.Status = "ok"
	}
	if h.cluster != nil {
		rep.healthCluster = h.cluster(ctx)
	}
	if rep.Status == "ok" && rep.Coordination != nil && rep.Coordination.State != "up" {
		rep.Status, rep.Reason = "degraded", "coordination: Redis is unreachable; limits and counts are per instance until it answers"
	}
	return rep, retryAfter
}

// pointsRemaining is what caddy_zimage_upstream_points_remaining holds,
// by account: only accounts whose points the service has reported (the
// gauge's series exist only for those; asking for a missing one would
// make it, at 0, and set off a low-points alert).
func pointsRemaining() map[string]float64 {
	ch := make(chan prometheus.Metric, 16)
	go func() {
		metricPointsRemaining.Collect(ch)
		close(ch)
	}()
	out := map[string]float64{}
	for m := range ch {
		var pb dto.Metric
		if m.Write(&pb) != nil || pb.Gauge == nil {
			continue
		}
		for _, l := range pb.Label {
			if l.GetName() == "account" {
				out[l.GetValue()] = pb.Gauge.GetValue()
			}
		}
	}
	return out
}

// storeProbe runs the store's write check on its own schedule and keeps
// its last result for the probes: however frequent or rare the probes,
// the storage sees one write per tick, one at a time, each bounded in time.
type storeProbe struct {
	store  *imageStore
	now    func() time.Time
	logger *zap.Logger

	mu  sync.Mutex
	at  time.Time // when the last check ended; zero: none yet
	err error     // its result

	first    chan struct{} // closed when the first check has ended
	quit     chan struct{} // closed by stop
	done     chan struct{} // closed when run has returned
	stopOnce sync.Once
}

func newStoreProbe(s *imageStore, now func() time.Time, logger *zap.Logger) *storeProbe {
	return &storeProbe{store: s, now: now, logger: logger,
		first: make(chan struct{}), quit: make(chan struct{}), done: make(chan struct{})}
}

// run checks at once, then at every tick, until stop.
func (p *storeProbe) run(tick <-chan time.Time) {
	defer close(p.done)
	p.check()
	close(p.first)
	for {
		select {
		case <-p.quit:
			return
		case <-tick:
			p.check()
		}
	}
}

// stop ends run; a write in progress finishes (it is bounded) first.
func (p *storeProbe) stop() {
	p.stopOnce.Do(func() { close(p.quit) })
}

// state returns the store's state for the report and, when it cannot
// write, the reason. Only a probe that comes before the first check has
// ended waits for it (briefly).
func (p *storeProbe) state(ctx context.Context, now time.Time) (healthStore, string) {
	select {
	case <-p.first:
	default:
		t := time.NewTimer(healthStoreFirstWait)
		select {
		case <-p.first:
		case <-ctx.Done():
		case <-t.C:
		}
		t.Stop()
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.at.IsZero() {
		return healthStore{State: "checking"}, "the store's first write check has not finished"
	}
	at := p.at.UTC().Truncate(time.Second)
	switch {
	case p.err != nil:
		return healthStore{State: "failing", CheckedAt: &at}, "the store cannot write to its storage"
	case now.Sub(p.at) > healthStoreStale:
		return healthStore{State: "failing", CheckedAt: &at}, "the store's write check has not answered since " + at.Format(time.RFC3339)
	}
	return healthStore{State: "ok", CheckedAt: &at}, ""
}

// check writes one small key, {prefix}/health, and records the result.
func (p *storeProbe) check() {
	ctx, cancel := context.WithTimeout(context.Background(), healthStoreTimeout)
	defer cancel()
	stamp := p.now().UTC().Format(time.RFC3339Nano)
	err := p.store.storage.Store(ctx, p.store.prefix+"/health", []byte(stamp+"\n"))
	if err == nil && ctx.Err() != nil {
		err = ctx.Err()
	}
	if err != nil && p.logger != nil {
		p.logger.Warn("health: the store cannot write", zap.String("key", p.store.prefix+"/health"), zap.Error(err))
	}
	p.mu.Lock()
	p.at, p.err = p.now(), err
	p.mu.Unlock()
}
