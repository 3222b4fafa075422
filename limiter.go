package zimage

import (
	"context"
	"errors"
	"math"
	"slices"
	"strconv"
	"sync"
	"time"

	"github.com/caddyserver/caddy/v2"
)

// limiters holds one limiter per upstream account (its URL and key) and
// per named client, shared by every handler that uses it and kept across
// config reloads while either the old or the new config still references
// it. Its size is not part of its identity: a reload that changes
// max_concurrent changes the size of the limiter in place, so the new
// limit holds from the reload on for every request, the old config's
// included; a rest period (docs/design.md#failover-and-rests) survives the
// reload in the same way. An account pool keeps its references (and its
// claims) until its last generation has finished, even after its config
// was replaced (accountPool.close): a reload to a config without the
// account must not forget the slots that old requests still hold.
var limiters = caddy.NewUsagePool()

// limMu guards every limiter's counters and the one queue of waiting
// generations. A generation may take a slot of any of its pool's accounts,
// so the choice among them and the queue are decided under one lock; it is
// held for a few hundred nanoseconds per generation, which takes seconds.
var (
	limMu    sync.Mutex
	queue    []*waiter // first come, first served
	claimSeq uint64
)

// configLoads numbers the config loads in the order Caddy provisions them.
// The handlers of one load share its provisioning context (caddy.Context
// wraps it with values only), so its Done channel names the load.
var configLoads struct {
	sync.Mutex
	seq    uint64
	byDone map[<-chan struct{}]uint64
}

// configGeneration is the number of the config load that ctx provisions;
// a context that cannot be cancelled is a load of its own.
func configGeneration(ctx context.Context) uint64 {
	done := ctx.Done()
	configLoads.Lock()
	defer configLoads.Unlock()
	if done == nil {
		configLoads.seq++
		return configLoads.seq
	}
	if n, ok := configLoads.byDone[done]; ok {
		return n
	}
	configLoads.seq++
	n := configLoads.seq
	if configLoads.byDone == nil {
		configLoads.byDone = map[<-chan struct{}]uint64{}
	}
	configLoads.byDone[done] = n
	context.AfterFunc(ctx, func() {
		configLoads.Lock()
		delete(configLoads.byDone, done)
		configLoads.Unlock()
	})
	return n
}

// newGeneration is a load of its own, for claims that do not share their
// limiter with siblings of the same load (the named clients).
func newGeneration() uint64 { return configGeneration(context.Background()) }

// limiter counts the generations in flight on one account (or one
// client's requests) against its limit.
type limiter struct {
	inFlight int
	// claims are the limits of the live handlers that use this limiter,
	// oldest first. The claims of the newest config load make the limit: a
	// reload provisions the new handler before it cleans up the old one,
	// so the new limit applies at once, and a reload that fails (its
	// handlers are cleaned up without ever serving) gives the old limit
	// back. Two handlers of one load that name the same account (two
	// sites) give it the lower of their limits, whatever their order
	// (docs/design.md#accounts).
	claims []limitClaim
	last   int // the limit once every claim is gone (requests may still hold slots)

	// queued limiters wake waiting generations when a slot frees;
	// client limiters answer at once instead and never queue
	queued bool

	restUntil time.Time // failover.go: the account rests until then
	// failover.go: the account rests at least until then after a 429,
	// as the service asked; a success does not end this part
	retryAfterUntil time.Time
	// failover.go: the account rests until then for want of points
	noPointsUntil time.Time
	// clusterRest: restUntil was set by another instance (coordination.go),
	// so the cluster forgetting it ends it here too
	clusterRest bool
	restTimer   *time.Timer // wakes the queue when the rest ends
	lowPoints   bool        // points.go: remaining points are below low_points

	// coordination_hooks.go: every slot of the account is taken across the
	// cluster until then; the timer wakes the queue when it ends
	fullUntil time.Time
	fullTimer *time.Timer
}

type limitClaim struct {
	id   uint64
	gen  uint64 // the config load (configGeneration)
	n    int
	name string // what the claiming handler calls it, for the warning
}

// loadLimiter returns the shared limiter under key, making it if no live
// handler holds it, and claims the limit n (0: unlimited) for the caller,
// as a load of its own. The caller releases both with dropLimiter.
func loadLimiter(key string, n int, queued bool) (*limiter, uint64) {
	l, id, _ := loadLimiterIn(key, n, queued, newGeneration(), "")
	return l, id
}

// loadLimiterIn is loadLimiter for a handler of the config load gen that
// calls the limiter name. It also returns another claim of the same load
// with another limit, if there is one, for a warning.
func loadLimiterIn(key string, n int, queued bool, gen uint64, name string) (*limiter, uint64, *limitClaim) {
	val, _, _ := limiters.LoadOrNew(key, func() (caddy.Destructor, error) {
		return &limiter{queued: queued}, nil
	})
	l := val.(*limiter)
	id, other := l.claim(n, gen, name)
	return l, id, other
}

// dropLimiter gives back a claim and the reference to the limiter.
func dropLimiter(key string, l *limiter, claim uint64) error {
	l.unclaim(claim)
	_, err := limiters.Delete(key)
	return err
}

// claim makes n the limit of the load gen until a newer load claims or
// this claim's release; within one load the lowest claim is the limit.
func (l *limiter) claim(n int, gen uint64, name string) (uint64, *limitClaim) {
	limMu.Lock()
	defer limMu.Unlock()
	claimSeq++
	var other *limitClaim
	for _, c := range l.claims {
		if c.gen == gen && c.n != n && other == nil {
			other = &c
		}
	}
	l.claims = append(l.claims, limitClaim{id: claimSeq, gen: gen, n: n, name: name})
	l.wakeLocked() // the limit may have grown
	return claimSeq, other
}

func (l *limiter) unclaim(id uint64) {
	limMu.Lock()
	defer limMu.Unlock()
	i := slices.IndexFunc(l.claims, func(c limitClaim) bool { return c.id == id })
	if i < 0 {
		return
	}
	if len(l.claims) == 1 {
		l.last = l.limitLocked()
	}
	l.claims = slices.Delete(l.claims, i, i+1)
	l.wakeLocked()
}

// limitLocked is the limit in force: the lowest of the newest load's
// claims; 0 means unlimited.
func (l *limiter) limitLocked() int {
	if len(l.claims) == 0 {
		return l.last
	}
	var newest uint64
	for _, c := range l.claims {
		newest = max(newest, c.gen)
	}
	limit := 0
	for _, c := range l.claims {
		if c.gen == newest && c.n > 0 && (limit == 0 || c.n < limit) {
			limit = c.n
		}
	}
	return limit
}

// freeLocked is how many more generations may start now; negative after
// a reload lowered the limit below what is in flight. An unlimited
// limiter has "very many" free slots, fewer as more are in flight, so
// that the choice among accounts still prefers the least busy.
func (l *limiter) freeLocked() int {
	if !l.fullUntil.IsZero() && time.Now().Before(l.fullUntil) {
		return 0
	}
	if n := l.limitLocked(); n > 0 {
		return n - l.inFlight
	}
	return math.MaxInt32 - l.inFlight
}

// takeLocked takes n slots if that many are free.
func (l *limiter) takeLocked(n int) bool {
	if l.freeLocked() < n {
		return false
	}
	l.inFlight += n
	return true
}

// release gives back n slots and hands them to whoever waits.
func (l *limiter) release(n int) {
	limMu.Lock()
	l.inFlight -= n
	l.wakeLocked()
	limMu.Unlock()
}

func (l *limiter) wakeLocked() {
	if l.queued {
		wakeLocked()
	}
}

// Destruct implements caddy.Destructor: the last handler holding the
// limiter is gone.
func (l *limiter) Destruct() error {
	limMu.Lock()
	if l.restTimer != nil {
		l.restTimer.Stop()
	}
	if l.fullTimer != nil {
		l.fullTimer.Stop()
	}
	limMu.Unlock()
	return nil
}

// restLocked makes the limiter's account rest until the given time (a
// longer rest already running is kept) and wakes the queue when it ends.
// It reports whether the rest began or grew.
func (l *limiter) restLocked(until time.Time) bool {
	if !until.After(l.restUntil) {
		return false
	}
	l.restUntil = until
	if l.restTimer != nil {
		l.restTimer.Stop()
	}
	l.restTimer = time.AfterFunc(time.Until(until), func() {
		limMu.Lock()
		wakeLocked()
		limMu.Unlock()
	})
	wakeLocked() // a waiter may have no account left to hope for
	return true
}

func (l *limiter) restingLocked(now time.Time) bool { return now.Before(l.restUntil) }

// endRestLocked ends the account's rest after a success, and its rest for
// want of points, but not a 429's (retryAfterUntil). It reports whether a
// rest was shortened.
func (l *limiter) endRestLocked(now time.Time) bool {
	l.noPointsUntil = time.Time{}
	keep := l.retryAfterUntil
	if !keep.After(now) {
		keep = time.Time{}
	}
	if !l.restUntil.After(now) || !l.restUntil.After(keep) {
		return false
	}
	l.restUntil = time.Time{}
	if l.restTimer != nil {
		l.restTimer.Stop()
		l.restTimer = nil
	}
	if !keep.IsZero() {
		l.restLocked(keep)
	}
	wakeLocked() // waiters may take this account now
	return true
}

// chooser decides, under limMu, which slot a generation may take: the
// account pool (account_pool.go) implements the choice of docs/design.md#accounts.
type chooser interface {
	// take takes a slot the generation may use, if one is free now.
	take() bool
	// hopeful reports whether waiting can still give it one.
	hopeful() bool
}

// waiter is a generation in the queue.
type waiter struct {
	c    chooser
	ch   chan bool // true: a slot was taken for it; false: give up
	done bool
}

// errNoAccount is acquire's answer when no slot can ever be had (every
// candidate account rests or was tried).
var errNoAccount = errors.New("no account left to try")

// acquire takes a slot through c, waiting up to wait in the queue. It
// returns errQueueFull when the wait times out, errNoAccount when c has no
// hope left, and the context's error when the client leaves (which frees
// its place in the queue at once).
func acquire(ctx context.Context, wait time.Duration, c chooser) error {
	limMu.Lock()
	if c.take() {
		limMu.Unlock()
		return nil
	}
	if !c.hopeful() {
		limMu.Unlock()
		return errNoAccount
	}
	w := &waiter{c: c, ch: make(chan bool, 1)}
	queue = append(queue, w)
	limMu.Unlock()

	t := time.NewTimer(wait)
	defer t.Stop()
	var err error
	select {
	case ok := <-w.ch:
		if !ok {
			return errNoAccount
		}
		return nil
	case <-ctx.Done():
		err = ctx.Err()
	case <-t.C:
		err = errQueueFull(retryAfterSeconds(wait))
	}
	limMu.Lock()
	if !w.done {
		w.done = true
		queue = slices.DeleteFunc(queue, func(q *waiter) bool { return q == w })
		limMu.Unlock()
		return err
	}
	limMu.Unlock()
	// the queue answered as the wait ended: a slot taken just in time is
	// the caller's (a client that left fails at its first call and gives
	// it back like any other)
	if ok := <-w.ch; !ok {
		return errNoAccount
	}
	return nil
}

// wakeLocked serves the queue in order: each waiter takes a slot if its
// chooser finds one, and one whose chooser has no hope left gives up.
func wakeLocked() {
	kept := queue[:0]
	for _, w := range queue {
		switch {
		case w.c.take():
			w.done = true
			w.ch <- true
		case !w.c.hopeful():
			w.done = true
			w.ch <- false
		default:
			kept = append(kept, w)
		}
	}
	clear(queue[len(kept):])
	queue = kept
}

// retryAfterSeconds suggests waiting about as long as the queue allows.
func retryAfterSeconds(d time.Duration) string {
	return strconv.Itoa(max(1, int((d+time.Second-1)/time.Second)))
}

// Interface guard
var _ caddy.Destructor = (*limiter)(nil)
