package zimage

// Failover and rests (docs/design.md#failover-and-rests): one generation's
// run over the account pool, which failures move it to another account or
// retry the same one, and how long a failing account rests.

import (
	"context"
	"errors"
	"math/rand/v2"
	"net/http"
	"strconv"
	"time"

	"go.uber.org/zap"
)

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
		// pass (connection errors, 502/503/504)
		backoff := retryBackoff(attempt, rand.Float64())
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

// retryBackoff is the wait before attempt+1 on the same account: 250ms,
// 500ms, 1s… each with ±50% jitter (jitter in [0, 1)), so retries of many
// requests after one outage do not arrive together. The doubling stops at
// 2^20 (far beyond any timeout): with many accounts tried before, attempt
// may pass 35, where the shift would overflow into no wait at all.
func retryBackoff(attempt int, jitter float64) time.Duration {
	return time.Duration(float64(250*time.Millisecond<<min(attempt, 20)) * (0.5 + jitter))
}
