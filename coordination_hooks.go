package zimage

// What the account pool, the clients and the quotas do with a
// coordinator: take and give back an account's slot across the cluster,
// share rests, hold clients' cluster-wide slots, and add what an instance
// counted while Redis was away. Without coordination each of these falls
// back to the instance's own limits.

import (
	"context"
	"time"
)

// the accounts' slots and rests across the cluster

// acquireSlot is acquire (limiter.go) and, with coordination, a lease on
// the chosen account's slots across the cluster: an account whose slots
// are all taken elsewhere is skipped for clusterFullWait (others are
// chosen meanwhile, or the generation waits in the queue), and a rest
// another instance set is applied here before the slot is used.
func (p *accountPool) acquireSlot(ctx context.Context, wait time.Duration, c *choice) error {
	if p.coord == nil {
		return acquire(ctx, wait, c)
	}
	c.dropLease() // a failover: the last account's local slot is back already
	deadline := time.Now().Add(wait)
	for {
		if err := acquire(ctx, max(0, time.Until(deadline)), c); err != nil {
			return err
		}
		a := c.chosen
		limMu.Lock()
		limit := a.lim.limitLocked()
		limMu.Unlock()
		if limit == 0 {
			return nil // unlimited: nothing to share but its rests
		}
		key := hashKey(a.limKey)
		lease, rest, ok, err := p.coord.slots(ctx, key, key, limit, 1, nil)
		if err != nil {
			c.lease = lease // Redis is away: this instance's limit alone
			return nil
		}
		now := time.Now()
		if ok && rest.After(now) {
			limMu.Lock()
			a.lim.restLocked(rest)
			awake := false
			for k, o := range p.accounts {
				awake = awake || !c.tried[k] && !o.lim.restingLocked(now)
			}
			limMu.Unlock()
			if awake {
				lease.release()
				a.lim.release(1)
				continue
			}
		}
		if ok {
			c.lease = lease
			return nil
		}
		limMu.Lock()
		a.lim.fullLocked(now.Add(clusterFullWait))
		limMu.Unlock()
		a.lim.release(1)
		if !now.Before(deadline) {
			return errQueueFull(retryAfterSeconds(wait))
		}
	}
}

// dropLease gives back the choice's slot across the cluster: at the end
// of the generation, or before it moves to another account.
func (c *choice) dropLease() {
	if c.lease != nil {
		c.lease.release()
		c.lease = nil
	}
}

// fullLocked skips the limiter's account until then: its slots are all
// taken across the cluster. The queue is woken when the time is up.
func (l *limiter) fullLocked(until time.Time) {
	l.fullUntil = until
	if l.fullTimer != nil {
		l.fullTimer.Stop()
	}
	l.fullTimer = time.AfterFunc(time.Until(until), func() {
		limMu.Lock()
		wakeLocked()
		limMu.Unlock()
	})
}

// shareRests makes the pool's accounts rest when another instance rests
// them, and lets its own rests be shared (accountPool.rest).
func (p *accountPool) shareRests(c coordinator) {
	p.coord = c
	if c == nil {
		return
	}
	for _, a := range p.accounts {
		p.stopShare = append(p.stopShare, c.watchRests(hashKey(a.limKey), func(until time.Time) {
			limMu.Lock()
			defer limMu.Unlock()
			switch {
			case !until.IsZero():
				if a.lim.restLocked(until) {
					a.lim.clusterRest = true
				}
			case a.lim.clusterRest:
				// a rest this instance only heard of, which the
				// cluster no longer knows: another instance's success
				// ended it
				a.lim.endRestLocked(time.Now())
				a.lim.clusterRest = false
			}
		}))
	}
}

// sharedEnd tells the cluster that a's rest ended, but for keep.
func (p *accountPool) sharedEnd(a *account, keep time.Time) {
	if p.coord != nil {
		p.coord.endRest(hashKey(a.limKey), keep)
	}
}

// sharedRest tells the cluster of a rest this instance began.
func (p *accountPool) sharedRest(a *account, until time.Time) {
	if p.coord != nil {
		p.coord.shareRest(hashKey(a.limKey), until)
	}
}

func (p *accountPool) stopSharing() {
	for _, stop := range p.stopShare {
		stop()
	}
	p.stopShare = nil
}

// clientSlots is a client's max_concurrent across the cluster.
type clientSlots struct {
	c   coordinator
	key string
}

func (s clientSlots) acquire(ctx context.Context, limit, n int, held slotLease) (slotLease, bool) {
	l, _, ok, _ := s.c.slots(ctx, s.key, "", limit, n, held)
	return l, ok
}

// shareClients gives each client with a max_concurrent its cluster-wide
// slots.
func (g *Gateway) shareClients() {
	if g.coord == nil {
		return
	}
	for _, c := range g.clients.clients {
		c.shared = clientSlots{c: g.coord, key: "client-" + c.name}
	}
}

// quota counts across the cluster: the catch-up when Redis returns.

// catchUp adds to Redis what this instance counted while it was away.
func (qs *quotaSet) catchUp(ctx context.Context) error {
	rc, ok := qs.coord.(*redisCoord)
	if !ok {
		return nil
	}
	now := qs.now()
	for _, name := range qs.order {
		st := qs.states[name]
		st.mu.Lock()
		type item struct {
			k             quotaKey
			seen, pending int
			c             *quotaCount
		}
		var items []item
		for _, q := range qs.quotas[name] {
			c := qs.countLocked(st, q, now)
			items = append(items, item{k: quotaKey{per: q.per, start: c.start, end: c.end, limit: q.limit}, seen: c.shared, pending: c.pending, c: c})
		}
		st.mu.Unlock()
		for _, it := range items {
			v, err := rc.catchUpQuota(ctx, name, it.k, it.seen, it.pending)
			if err != nil {
				return err
			}
			st.mu.Lock()
			it.c.pending -= it.pending
			it.c.shared = v
			it.c.pushes++
			st.mu.Unlock()
		}
	}
	return nil
}
