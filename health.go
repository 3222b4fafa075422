package zimage

// The health endpoint (SPEC §15.1, issue 16 item 3): a GET or HEAD, without
// auth (load balancers and Caddy's own active health checks send no key),
// that says whether a generation could start on this instance now. Its
// config, Caddyfile parsing, provisioning and serving live here; it reads
// the accounts' limiters (limiter.go) and the store (store.go) without
// changing them, and it never calls the image service.

import (
	"context"
	"encoding/json"
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

	// the store's write check: a tiny write under {prefix}/health, made at
	// most once per healthStoreEvery by whichever probe finds the last
	// result stale (probes never queue up on the storage), bounded by
	// healthStoreTimeout; a result older than healthStoreStale (the
	// refresh hangs) counts as a failure
	healthStoreEvery   = 10 * time.Second
	healthStoreTimeout = 5 * time.Second
	healthStoreStale   = 3 * healthStoreEvery
	// how long the first probe waits for the first check
	healthStoreFirstWait = 3 * time.Second
)

// HealthConfig turns on the health endpoint: GET or HEAD <path>, without
// auth, answers 200 {"status":"ok",…} when a generation could start now
// (some upstream account is not resting, and the store, if on, can write)
// and 503 {"status":"unavailable","reason":…} otherwise. The body names
// the accounts (resting until when, points remaining when known) and the
// store's state; never a key or a prompt. It makes no upstream call.
// Off unless set.
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
	h := &health{path: p, pool: g.accounts, store: g.store, now: time.Now, logger: g.logger}
	if g.store != nil {
		h.probe = &storeProbe{}
	}
	return h, nil
}

// healthReport is the body of the health endpoint. Nothing in it is a
// secret: account names, times, counts and states.
type healthReport struct {
	Status   string          `json:"status"` // ok | unavailable
	Reason   string          `json:"reason,omitempty"`
	Accounts []healthAccount `json:"accounts"`
	Store    healthStore     `json:"store"`
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
	if rep.Status != "ok" {
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
		rep.Store, storeErr = h.probe.state(ctx, h.store, now, h.logger)
	}
	switch {
	case !awake:
		rep.Status = "unavailable"
		rep.Reason = "every upstream account rests until " + firstWake.UTC().Truncate(time.Second).Format(time.RFC3339)
		retryAfter = firstWake.Sub(now)
	case storeErr != "":
		rep.Status, rep.Reason = "unavailable", storeErr
	default:
		rep.Status = "ok"
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

// storeProbe caches the result of the store's write check, so that
// health probes, however frequent, write to the storage at most once per
// healthStoreEvery, one write at a time, each bounded in time.
type storeProbe struct {
	mu      sync.Mutex
	at      time.Time     // when the last check ended; zero: none yet
	err     error         // its result
	running chan struct{} // closed when the running check ends; nil: none runs
}

// state returns the store's state for the report and, when it cannot
// write, the reason. A stale result starts a new check in the background
// and is used meanwhile; only the first probe waits for a check (briefly).
func (p *storeProbe) state(ctx context.Context, s *imageStore, now time.Time, logger *zap.Logger) (healthStore, string) {
	p.mu.Lock()
	if p.running == nil && now.Sub(p.at) >= healthStoreEvery {
		p.running = make(chan struct{})
		go p.check(s, logger)
	}
	done := p.running
	first := p.at.IsZero()
	p.mu.Unlock()
	if first && done != nil {
		t := time.NewTimer(healthStoreFirstWait)
		select {
		case <-done:
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
// It has a context of its own: a probe that leaves does not cut it short.
func (p *storeProbe) check(s *imageStore, logger *zap.Logger) {
	ctx, cancel := context.WithTimeout(context.Background(), healthStoreTimeout)
	defer cancel()
	stamp := time.Now().UTC().Format(time.RFC3339Nano)
	err := s.storage.Store(ctx, s.prefix+"/health", []byte(stamp+"\n"))
	if err == nil && ctx.Err() != nil {
		err = ctx.Err()
	}
	if err != nil && logger != nil {
		logger.Warn("health: the store cannot write", zap.String("key", s.prefix+"/health"), zap.Error(err))
	}
	p.mu.Lock()
	p.at, p.err = time.Now(), err
	close(p.running)
	p.running = nil
	p.mu.Unlock()
}
