package zimage

// The account pool (docs/design.md#accounts): a handler's provisioned
// accounts, their shared limiters held across config reloads (limiter.go),
// and the choice of an account for each attempt. What happens after a
// failed attempt is in failover.go, the points the service reports in
// points.go.

import (
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"sync"
	"time"

	"go.uber.org/zap"
)

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

	// lease is the chosen account's slot across a cluster (coordination_hooks.go)
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
