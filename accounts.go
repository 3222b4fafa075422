package zimage

// Many upstream accounts (docs/design.md#accounts): the account blocks of the upstream
// config, their provisioning into a pool whose limiters outlive reloads
// (limiter.go), the choice of an account per generation, failover and rest
// periods, and the points the service reports.

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"math"
	"math/rand/v2"
	"net/http"
	"regexp"
	"strconv"
	"sync"
	"time"

	"go.uber.org/zap"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
)

// defaultAccount names the account of a single upstream api_key.
const defaultAccount = "default"

// How long a failing account rests (docs/design.md#failover-and-rests): after a 429 as long as
// its Retry-After says (bounded), else restAfter429; after a connection
// error, a 5xx or a Cloudflare challenge restAfterFailure.
const (
	restAfter429     = 30 * time.Second
	restAfterFailure = 10 * time.Second
	minRest          = time.Second
	maxRest          = time.Hour // the cap on a service's Retry-After

	// defaultPointsRest is how long an account out of points rests
	// (docs/design.md#failover-and-rests): points come back only when someone tops it up.
	defaultPointsRest = time.Hour
)

// AccountConfig is one account of the image service.
type AccountConfig struct {
	// Name labels the account in metrics, logs and errors (its key never
	// appears there): 1 to 64 lower-case letters, digits, '-' and '_'.
	// Required, unique within the upstream.
	Name string `json:"name,omitempty"`

	// APIKey is the account's key, sent to the image service as a bearer
	// token. Placeholders are accepted. Required (except for the demo).
	APIKey string `json:"api_key,omitempty"`

	// MaxConcurrent is the most generations in flight on this account at
	// once, across all sites that use it (the same URL and key). 0 means
	// unlimited.
	MaxConcurrent int `json:"max_concurrent,omitempty"`

	// LowPoints, when above 0, makes the gateway log a warning once when
	// the account's remaining points, as the service reports them after
	// each generation, drop below it (and again only after they went back
	// above it).
	LowPoints float64 `json:"low_points,omitempty"`

	// PointsRest is how long the account rests when the service says it
	// has no points left, or when a generation's remaining_points is
	// below its points_used (docs/design.md#failover-and-rests). Default: the upstream's
	// points_rest, else 1h.
	PointsRest caddy.Duration `json:"points_rest,omitempty"`
}

// accountName is the form of an account's (and a client's) name: a label
// that is safe in metrics, logs and file names.
var accountName = regexp.MustCompile(`^[a-z0-9_-]{1,64}$`)

// unmarshalAccount parses `account <name> { api_key; max_concurrent;
// low_points; points_rest }` inside an upstream block; others are the accounts parsed
// before it.
func unmarshalAccount(d *caddyfile.Dispenser, others []AccountConfig) (AccountConfig, error) {
	var a AccountConfig
	if !d.NextArg() {
		return a, d.Errf("zimage_gateway: upstream account needs a name: account <name> { api_key <key> }")
	}
	a.Name = d.Val()
	if d.NextArg() {
		return a, d.ArgErr()
	}
	if err := checkAccountName(a.Name, others); err != nil {
		return a, d.Errf("%v", err)
	}
	err := eachOption(d, "upstream account", func(opt string) (err error) {
		switch opt {
		case "api_key":
			a.APIKey, err = optionalArg(d)
		case "max_concurrent":
			a.MaxConcurrent, err = parseInt(d, 0)
		case "low_points":
			var s string
			if s, err = singleArg(d); err != nil {
				return err
			}
			f, perr := strconv.ParseFloat(s, 64)
			if perr != nil || f <= 0 || math.IsInf(f, 0) {
				return d.Errf("zimage_gateway: invalid low_points '%s': want a number of points above 0", s)
			}
			a.LowPoints = f
		case "points_rest":
			a.PointsRest, err = parseDuration(d)
		default:
			return d.Errf("unrecognized zimage_gateway upstream account option '%s'", opt)
		}
		return err
	})
	return a, err
}

func checkAccountName(name string, others []AccountConfig) error {
	if !accountName.MatchString(name) {
		return fmt.Errorf("zimage_gateway: upstream account name '%s' is not a simple label: use 1 to 64 lower-case letters, digits, '-' and '_'", name)
	}
	for _, o := range others {
		if o.Name == name {
			return fmt.Errorf("zimage_gateway: duplicate upstream account name '%s'", name)
		}
	}
	return nil
}

// checkAccountsBlock holds the cross-field rules of the upstream block
// with accounts, for the Caddyfile and the JSON config alike.
func checkAccountsBlock(u *UpstreamConfig) error {
	if len(u.Accounts) == 0 {
		return nil
	}
	if u.APIKey != "" {
		return errors.New("zimage_gateway: upstream: either api_key or account blocks, not both: move the key into an account block (a single api_key is the account 'default')")
	}
	if u.MaxConcurrent != 0 {
		return errors.New("zimage_gateway: upstream: with account blocks, max_concurrent goes inside each account block")
	}
	return nil
}

// resolveAccounts checks the accounts and resolves their keys; without
// account blocks, the upstream's api_key (or SD_API_KEY) and max_concurrent
// make the one account "default".
func resolveAccounts(uc *UpstreamConfig, resolve func(v, env string) string, demo bool) error {
	if err := checkAccountsBlock(uc); err != nil {
		return err
	}
	if uc.PointsRest < 0 {
		return errors.New("zimage_gateway: upstream: points_rest must be a positive duration such as 1h")
	}
	if uc.PointsRest == 0 {
		uc.PointsRest = caddy.Duration(defaultPointsRest)
	}
	if len(uc.Accounts) == 0 {
		key := resolve(uc.APIKey, "SD_API_KEY")
		if key == "" && !demo {
			return errors.New("zimage_gateway: upstream: no API key for the image service: set 'api_key' in the upstream block or the SD_API_KEY environment variable, or add account blocks (or use 'upstream demo' to try the gateway without an account)")
		}
		uc.APIKey = key
		uc.Accounts = []AccountConfig{{Name: defaultAccount, APIKey: key, MaxConcurrent: uc.MaxConcurrent, PointsRest: uc.PointsRest}}
		return nil
	}
	keys := map[string]string{} // key → the account that has it
	for i := range uc.Accounts {
		a := &uc.Accounts[i]
		if err := checkAccountName(a.Name, uc.Accounts[:i]); err != nil {
			return err
		}
		if a.MaxConcurrent < 0 {
			return fmt.Errorf("zimage_gateway: upstream account '%s': max_concurrent must be 0 (unlimited) or more, got %d", a.Name, a.MaxConcurrent)
		}
		if a.LowPoints < 0 || math.IsNaN(a.LowPoints) || math.IsInf(a.LowPoints, 0) {
			return fmt.Errorf("zimage_gateway: upstream account '%s': low_points must be a number of points above 0, or 0 (off)", a.Name)
		}
		if a.PointsRest < 0 {
			return fmt.Errorf("zimage_gateway: upstream account '%s': points_rest must be a positive duration such as 1h", a.Name)
		}
		if a.PointsRest == 0 {
			a.PointsRest = uc.PointsRest
		}
		a.APIKey = resolve(a.APIKey, "")
		if a.APIKey == "" && !demo {
			return fmt.Errorf("zimage_gateway: upstream account '%s' has no api_key (or its placeholder resolved to nothing): set 'api_key' in its block", a.Name)
		}
		if other, dup := keys[a.APIKey]; dup && a.APIKey != "" {
			return fmt.Errorf("zimage_gateway: upstream accounts '%s' and '%s' have the same api_key: one account, one block", other, a.Name)
		}
		keys[a.APIKey] = a.Name
	}
	return nil
}

// account is one provisioned account of a pool.
type account struct {
	index     int
	name      string
	key       string
	lowPoints float64
	// pointsRest is how long it rests when out of points (docs/design.md#failover-and-rests)
	pointsRest time.Duration
	limit      int // its max_concurrent, claimed on its limiter
	// lim is its shared limiter, under limKey, with the pool's claim on
	// it; set while the pool holds its limiters (accountPool.enter)
	lim    *limiter
	limKey string
	claim  uint64
}

// accountPool is a handler's accounts, the one queue before them and the
// rules of an attempt: the generation's timeout, how long it may wait for
// a slot, how many more attempts a failure allows.
type accountPool struct {
	accounts     []*account
	next         int  // round robin among equals; under limMu
	limited      bool // some account has a max_concurrent
	timeout      time.Duration
	queueTimeout time.Duration
	retries      int
	logger       *zap.Logger

	// the pool holds its limiters (references and claims) from Provision
	// until its config is cleaned up (closed) and its last generation has
	// finished (work == 0): the slots its requests hold still count for
	// whatever config comes next. A request that comes
	// after that takes them again (enter).
	holdMu   sync.Mutex
	gen      uint64 // the config load that made the pool
	work     int    // generations inside run
	closed   bool
	released bool // the limiters are given back

	// retried is told of each failed attempt that is followed by another,
	// so that it shows in the log and caddy_zimage_upstream_errors_total
	// even when the next attempt succeeds
	retried func(ue *upstreamError, attempt int, from, to *account)

	// coord shares the accounts' slots and rests with a cluster; nil
	// without coordination (coordination.go)
	coord     coordinator
	stopShare []func()
}

// limiterKey identifies an account across handlers and reloads: the
// service URL and a digest of the key (the key itself is kept out of the
// pool's keys); keyless demo accounts go by name.
func limiterKey(url, key, name string) string {
	if key == "" {
		return "account|" + url + "|name:" + name
	}
	sum := sha256.Sum256([]byte(key))
	return "account|" + url + "|" + hex.EncodeToString(sum[:])
}

// newAccountPool loads (or makes) the shared limiter of every account and
// claims the configured limit on it for the config load gen, which
// resizes it in place when an older config used another. Another handler
// of the same load that names the same account (same URL and key) with
// another max_concurrent makes a warning: the lower applies (docs/design.md#accounts).
func newAccountPool(uc UpstreamConfig, retries int, gen uint64, logger *zap.Logger) *accountPool {
	p := &accountPool{
		timeout:      time.Duration(uc.Timeout),
		queueTimeout: time.Duration(uc.QueueTimeout),
		retries:      retries,
		logger:       logger,
		gen:          gen,
	}
	for i, ac := range uc.Accounts {
		a := &account{index: i, name: ac.Name, key: ac.APIKey, lowPoints: ac.LowPoints, limit: ac.MaxConcurrent,
			pointsRest: time.Duration(ac.PointsRest), limKey: limiterKey(uc.URL, ac.APIKey, ac.Name)}
		var other *limitClaim
		a.lim, a.claim, other = loadLimiterIn(a.limKey, a.limit, true, gen, a.name)
		if other != nil {
			limMu.Lock()
			applies := a.lim.limitLocked()
			limMu.Unlock()
			logger.Warn("upstream account is configured twice with different max_concurrent; the lower applies, as it is one account at the service",
				zap.String("account", a.name), zap.Int("max_concurrent", a.limit),
				zap.String("other_account", other.name), zap.Int("other_max_concurrent", other.n),
				zap.Int("applies", applies))
		}
		p.accounts = append(p.accounts, a)
		p.limited = p.limited || ac.MaxConcurrent > 0
	}
	return p
}

// enter counts a generation in, taking the limiters again if the pool had
// given them back (a request of a replaced config that reached the
// upstream step only after the config's other work had drained).
func (p *accountPool) enter() {
	p.holdMu.Lock()
	defer p.holdMu.Unlock()
	p.work++
	if !p.released {
		return
	}
	p.released = false
	for _, a := range p.accounts {
		l, claim, _ := loadLimiterIn(a.limKey, a.limit, true, p.gen, a.name)
		limMu.Lock()
		a.lim, a.claim = l, claim
		limMu.Unlock()
	}
}

// leave counts a generation out; the last one of a closed pool gives its
// limiters back.
func (p *accountPool) leave() {
	p.holdMu.Lock()
	defer p.holdMu.Unlock()
	p.work--
	if p.closed && p.work == 0 {
		_ = p.releaseLocked()
	}
}

// close marks the pool's config as replaced (Caddy's Cleanup): it gives
// back the pool's claims and limiter references at once when no
// generation of it runs, else when the last one leaves. A second call
// does nothing.
func (p *accountPool) close() error {
	if p == nil {
		return nil
	}
	p.holdMu.Lock()
	defer p.holdMu.Unlock()
	if p.closed {
		return nil
	}
	p.closed = true
	if p.work > 0 {
		return nil
	}
	return p.releaseLocked()
}

func (p *accountPool) releaseLocked() error {
	if p.released {
		return nil
	}
	p.released = true
	var errs []error
	for _, a := range p.accounts {
		errs = append(errs, dropLimiter(a.limKey, a.lim, a.claim))
	}
	return errors.Join(errs...)
}

// keys are the accounts' keys, for the scrubber.
func (p *accountPool) keys() []string {
	var out []string
	for _, a := range p.accounts {
		if a.key != "" {
			out = append(out, a.key)
		}
	}
	return out
}

// choice is one generation's choice of an account (docs/design.md#accounts): the one
// with the most free slots, ties in turn; accounts that rest only when all
// of them rest. After a failure (failover) it takes only accounts it has
// not tried that do not rest.
type choice struct {
	p            *accountPool
	tried        []bool
	allowResting bool
	chosen       *account
	triedBuf     [8]bool // tried's array for pools of up to 8 accounts

	// lease is the chosen account's slot across a cluster (coordination.go)
	lease slotLease
}

func (p *accountPool) newChoice() *choice {
	c := &choice{p: p, allowResting: true}
	// one allocation per request rather than two for the usual pool
	if n := len(p.accounts); n <= len(c.triedBuf) {
		c.tried = c.triedBuf[:n]
	} else {
		c.tried = make([]bool, n)
	}
	return c
}

func (c *choice) take() bool {
	p, now := c.p, time.Now()
	best, bestFree := -1, 0
	awake := false
	for i := range p.accounts {
		k := (p.next + i) % len(p.accounts)
		a := p.accounts[k]
		if c.tried[k] || a.lim.restingLocked(now) {
			continue
		}
		awake = true
		if f := a.lim.freeLocked(); f > bestFree {
			best, bestFree = k, f
		}
	}
	if !awake && c.allowResting {
		// every account rests: they work on rather than refuse everyone
		for i := range p.accounts {
			k := (p.next + i) % len(p.accounts)
			if f := p.accounts[k].lim.freeLocked(); !c.tried[k] && f > bestFree {
				best, bestFree = k, f
			}
		}
	}
	if best < 0 {
		return false
	}
	p.next = best + 1
	c.chosen = p.accounts[best]
	c.chosen.lim.inFlight++
	return true
}

func (c *choice) hopeful() bool {
	now := time.Now()
	for k, a := range c.p.accounts {
		if !c.tried[k] && (c.allowResting || !a.lim.restingLocked(now)) {
			return true
		}
	}
	return false
}

// failsOver reports the failures that move the attempt to another account
// and rest the account (docs/design.md#failover-and-rests).
func failsOver(kind string) bool {
	switch kind {
	case kind429, kindRefused, kind5xx, kindBlocked, kindNoPoints:
		return true
	}
	return false
}

// restFor is how long an account rests after ue: out of points, its
// pointsRest (as configured, not capped); after a 429 the service's
// Retry-After within minRest…maxRest. The client's Retry-After for a 429
// is this same figure (upstreamError.apiError).
func restFor(ue *upstreamError, pointsRest time.Duration, now time.Time) time.Duration {
	if ue.kind == kindNoPoints {
		if pointsRest <= 0 {
			pointsRest = defaultPointsRest
		}
		return pointsRest
	}
	d := restAfterFailure
	if ue.kind == kind429 {
		d = restAfter429
		if ra := ue.retryAfter; ra != "" {
			if n, err := strconv.Atoi(ra); err == nil {
				// compared before multiplying: 999999999999 s would overflow
				d = time.Duration(min(n, int(maxRest/time.Second))) * time.Second
			} else if t, err := http.ParseTime(ra); err == nil {
				d = t.Sub(now)
			}
		}
	}
	return min(max(d, minRest), maxRest)
}

// rest makes a rest after ue, unless every other account of the pool
// rests already: the last one awake works on (docs/design.md#failover-and-rests). An account out
// of points rests in any case (docs/design.md#failover-and-rests): that is what it is, and a
// resting account still serves while every account rests.
func (p *accountPool) rest(a *account, ue *upstreamError, fields ...zap.Field) {
	now := time.Now()
	d := restFor(ue, a.pointsRest, now)
	limMu.Lock()
	others := ue.kind == kindNoPoints
	for _, o := range p.accounts {
		others = others || o != a && !o.lim.restingLocked(now)
	}
	rested := others && a.lim.restLocked(now.Add(d))
	if rested {
		a.lim.clusterRest = false // this instance's own evidence
	}
	until := now.Add(d)
	if ue.kind == kindNoPoints && until.After(a.lim.noPointsUntil) {
		a.lim.noPointsUntil = until
	}
	if rested && ue.kind == kind429 && until.After(a.lim.retryAfterUntil) {
		a.lim.retryAfterUntil = until
	}
	limMu.Unlock()
	if !rested {
		return
	}
	p.sharedRest(a, now.Add(d))
	metricAccountRests.WithLabelValues(a.name, ue.kind).Inc()
	p.logger.Warn("image service account rests", append([]zap.Field{
		zap.String("account", a.name), zap.String("reason", ue.kind), zap.Duration("rest", d)}, fields...)...)
}

// answered ends the rest of a, which just made an image: whatever made
// it rest has passed (a top-up, the end of an outage), or was never the
// account's. Only a 429's Retry-After holds: the service said when to ask
// again.
func (p *accountPool) answered(a *account) {
	now := time.Now()
	limMu.Lock()
	ended := a.lim.endRestLocked(now)
	keep := a.lim.restUntil
	a.lim.clusterRest = false
	limMu.Unlock()
	if ended {
		p.sharedEnd(a, keep)
		p.logger.Info("image service account rests no more: it made an image", zap.String("account", a.name))
	}
}

// contentKind marks the failures the content of a request could cause,
// whatever the account: the words of a prompt echoed in a refusal
// (isNoPoints guards against that, but cannot know every echo), a
// Cloudflare rule that matches the prompt. One request rests at most one
// account for each (accountPool.run).
func contentKind(kind string) uint8 {
	switch kind {
	case kindNoPoints:
		return 1
	case kindBlocked:
		return 2
	}
	return 0
}

// allOutOfPoints reports whether every account of the pool rests for
// want of points: only then does the client hear of it (docs/design.md#failover-and-rests).
func (p *accountPool) allOutOfPoints() bool {
	now := time.Now()
	limMu.Lock()
	defer limMu.Unlock()
	for _, a := range p.accounts {
		if !now.Before(a.lim.noPointsUntil) {
			return false
		}
	}
	return true
}

// giveUp ends run with ue, telling a no_points failure whether every
// account is out.
func (p *accountPool) giveUp(ue *upstreamError) (upstreamResult, error) {
	if ue.kind == kindNoPoints {
		ue.allOut = p.allOutOfPoints()
	}
	return upstreamResult{}, ue
}

// call is one attempt with one account.
type call func(ctx context.Context, a *account) (upstreamResult, *upstreamError)

// accountRun is what the pool did for one generation, for its log line
// and for the download that follows it: the account of the last attempt,
// the time queued for a slot, the time from the slot to the last answer,
// and when the generation's time (download included) runs out.
type accountRun struct {
	account   string
	queueWait time.Duration
	latency   time.Duration
	deadline  time.Time
}

// run makes one generation: it waits for a slot on an account (up to
// queue_timeout), then attempts with the accounts the failures leave,
// within the one timeout. The error is an *apiError when no slot was had,
// else the last attempt's *upstreamError; what happened is reported
// either way.
func (p *accountPool) run(ctx context.Context, try call) (res upstreamResult, rep accountRun, err error) {
	p.enter()
	defer p.leave()
	c := p.newChoice()
	defer c.dropLease()
	queued := time.Now()
	err = p.acquireSlot(ctx, p.queueTimeout, c)
	rep.queueWait = time.Since(queued)
	if p.limited {
		metricQueueWait.Observe(rep.queueWait.Seconds())
	}
	if err != nil {
		var ae *apiError
		if errors.As(err, &ae) {
			return upstreamResult{}, rep, ae
		}
		// the client left while queued: its place is free already
		return upstreamResult{}, rep, &upstreamError{kind: kindCanceled, message: "client went away"}
	}

	metricInFlight.Inc()
	defer metricInFlight.Dec()
	start := time.Now()
	defer func() { rep.latency = time.Since(start) }()
	// the timeout bounds the whole generation, every attempt and the
	// image's download included
	rep.deadline = start.Add(p.timeout)
	ctx, cancel := context.WithDeadlineCause(ctx, rep.deadline, errGenerationTimeout)
	defer cancel()

	// held is the account whose slot this generation holds: given back
	// on every way out, and before another account's slot is waited for
	a := c.chosen
	held := a
	defer func() {
		if held != nil {
			held.lim.release(1)
		}
	}()
	var rested uint8 // the contentKinds this request rested an account for
	for attempt := 0; ; attempt++ {
		rep.account = a.name
		res, ue := try(ctx, a)
		if ue == nil {
			// a success ends a rest; then points: an account that just
			// spent its last points rests (that wins) before its slot can
			// go to anyone (the deferred release comes after)
			p.answered(a)
			p.notePoints(a, res.info)
			return res, rep, nil
		}
		if !failsOver(ue.kind) || ctx.Err() != nil {
			return upstreamResult{}, rep, ue
		}
		k := contentKind(ue.kind)
		if rested&k != 0 {
			// a second account fails the same way for the same request:
			// the request is at fault (a pool of accounts all out of
			// points still rests one per request until all rest), so
			// no further account is tried or rested for it, and the
			// client gets the service's answer
			p.logger.Info("a second account failed the same way for this request; taking it for the request's fault, not the accounts'",
				zap.String("account", a.name), zap.String("kind", ue.kind))
			return upstreamResult{}, rep, ue
		}
		rested |= k
		p.rest(a, ue)
		if attempt >= p.retries {
			res, err = p.giveUp(ue)
			return res, rep, err
		}

		// another account at once, if one that does not rest is left
		c.tried[a.index], c.allowResting = true, false
		limMu.Lock()
		others := c.hopeful()
		limMu.Unlock()
		if others {
			held.lim.release(1)
			held = nil
			if err := p.acquireSlot(ctx, min(p.queueTimeout, time.Until(rep.deadline)), c); err != nil {
				if ctx.Err() != nil {
					return upstreamResult{}, rep, ctxFailure(ctx, p.timeout)
				}
				// none freed in time: the client gets what the last
				// account said
				res, err = p.giveUp(ue)
				return res, rep, err
			}
			held = c.chosen

			if p.retried != nil {
				p.retried(ue, attempt+1, a, c.chosen)
			}
			a = c.chosen
			continue
		}

		// the same account again, after a short backoff, for failures that
		// pass (connection errors, 502/503/504): 250ms, 500ms, 1s… each
		// with ±50% jitter, so retries of many requests after one outage
		// do not arrive together
		backoff := time.Duration(float64(250*time.Millisecond<<attempt) * (0.5 + rand.Float64()))
		if !ue.retryable || time.Until(rep.deadline) < backoff {
			res, err = p.giveUp(ue)
			return res, rep, err
		}
		if p.retried != nil {
			p.retried(ue, attempt+1, a, a)
		}
		t := time.NewTimer(backoff)
		select {
		case <-ctx.Done():
			t.Stop()
			return upstreamResult{}, rep, ctxFailure(ctx, p.timeout)
		case <-t.C:
		}
	}
}

// notePoints records the points the service reported for a's generation
// (docs/design.md#points), warns once when they cross below low_points, and rests
// the account as out of points when what is left would not pay for
// another generation like this one (docs/design.md#failover-and-rests).
func (p *accountPool) notePoints(a *account, info upstreamInfo) {
	if info.hasPointsUsed && info.pointsUsed > 0 {
		metricPointsUsed.WithLabelValues(a.name).Add(info.pointsUsed)
	}
	if info.hasPointsUsed && info.hasRemainingPoints && info.remainingPoints < info.pointsUsed {
		p.rest(a, &upstreamError{kind: kindNoPoints}, zap.Float64("remaining_points", info.remainingPoints),
			zap.Float64("points_used", info.pointsUsed))
	}
	if !info.hasRemainingPoints {
		return
	}
	metricPointsRemaining.WithLabelValues(a.name).Set(info.remainingPoints)
	if a.lowPoints <= 0 {
		return
	}
	below := info.remainingPoints < a.lowPoints
	limMu.Lock()
	crossed := below && !a.lim.lowPoints
	a.lim.lowPoints = below
	limMu.Unlock()
	if crossed {
		p.logger.Warn("image service account is low on points",
			zap.String("account", a.name), zap.Float64("remaining_points", info.remainingPoints),
			zap.Float64("low_points", a.lowPoints))
	}
}
