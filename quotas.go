package zimage

// Client quotas: how many images a named client may have made per
// calendar hour, day, week or month. The image service's points are the
// operator's money, so every image made counts (a request for n images
// counts n) and a failed generation counts nothing.
//
// Concurrency: a request reserves its n images when it is admitted,
// before any generation starts, and gives back at its end what it did not
// make. Two requests that arrive together therefore cannot both pass a
// quota that has room for one of them: a quota of 3 with 2 in flight
// refuses a third request even though neither has finished. The price is
// that a request may be refused for images that later fail; it is the safe
// side, as the other way spends points nobody agreed to.
//
// The counts outlive restarts and reloads: each client's count is written
// to the gateway's storage (the store's, else Caddy's) at most once a
// second by a background flusher, and read back when a config that names
// the client is loaded; a crash loses at most that second. With
// `coordination` the counts live in Redis instead (coordination.go).
//
// This file holds the config, the periods and the counting (reserve, made,
// release); keeping the counts in storage is in quotas_storage.go, the
// usage endpoint and the health report in quotas_usage.go.

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"strconv"
	"sync"
	"time"

	"github.com/caddyserver/certmagic"
	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
)

// The calendar periods a quota may count over.
const (
	periodHour  = "hour"
	periodDay   = "day"
	periodWeek  = "week"
	periodMonth = "month"
)

var metricQuotaUsed = prometheus.NewGaugeVec(prometheus.GaugeOpts{
	Namespace: "caddy", Subsystem: "zimage", Name: "client_quota_used",
	Help: "Images a client has had made in the current period of each of its quotas (hour, day, week, month).",
}, []string{"client", "period"})

func init() { collectors = append(collectors, metricQuotaUsed) }

// QuotaConfig is one quota of a client: at most Images images per Per.
type QuotaConfig struct {
	// Images is the most images the client may have made in one period.
	// Required, at least 1.
	Images int `json:"images"`

	// Per is the calendar period: hour, day, week (from Monday) or month,
	// in the gateway's quota_timezone. Required.
	Per string `json:"per"`
}

// unmarshalQuota parses the arguments of `quota <n> images per <period>`.
func unmarshalQuota(d *caddyfile.Dispenser, others []QuotaConfig) (QuotaConfig, error) {
	args := d.RemainingArgs()
	if len(args) != 4 || args[1] != "images" || args[2] != "per" {
		return QuotaConfig{}, d.Errf("zimage_gateway: client quota: want 'quota <n> images per hour|day|week|month', got 'quota %s'", joinArgs(args))
	}
	n, err := strconv.Atoi(args[0])
	q := QuotaConfig{Images: n, Per: args[3]}
	if err != nil {
		return q, d.Errf("zimage_gateway: client quota: '%s' is not a whole number of images", args[0])
	}
	if err := checkQuota(q, others); err != nil {
		return q, d.Errf("%v", err)
	}
	return q, nil
}

func joinArgs(args []string) string {
	s := ""
	for i, a := range args {
		if i > 0 {
			s += " "
		}
		s += a
	}
	return s
}

// checkQuota holds the rules of one quota for the Caddyfile and JSON alike.
func checkQuota(q QuotaConfig, others []QuotaConfig) error {
	switch q.Per {
	case periodHour, periodDay, periodWeek, periodMonth:
	default:
		return fmt.Errorf("zimage_gateway: client quota: period '%s' is not one of hour, day, week, month", q.Per)
	}
	if q.Images < 1 {
		return fmt.Errorf("zimage_gateway: client quota: %d images per %s: want at least 1 (remove the quota to allow any number)", q.Images, q.Per)
	}
	for _, o := range others {
		if o.Per == q.Per {
			return fmt.Errorf("zimage_gateway: client quota per %s given twice: one quota per period", q.Per)
		}
	}
	return nil
}

// periodBounds is the calendar period of kind per that holds t, in loc.
func periodBounds(per string, t time.Time, loc *time.Location) (start, end time.Time) {
	t = t.In(loc)
	y, m, d := t.Date()
	switch per {
	case periodHour:
		start = time.Date(y, m, d, t.Hour(), 0, 0, 0, loc)
		end = start.Add(time.Hour)
	case periodDay:
		start = time.Date(y, m, d, 0, 0, 0, 0, loc)
		end = time.Date(y, m, d+1, 0, 0, 0, 0, loc)
	case periodWeek:
		back := (int(t.Weekday()) + 6) % 7 // days since Monday
		start = time.Date(y, m, d-back, 0, 0, 0, 0, loc)
		end = time.Date(y, m, d-back+7, 0, 0, 0, 0, loc)
	default: // month
		start = time.Date(y, m, 1, 0, 0, 0, 0, loc)
		end = time.Date(y, m+1, 1, 0, 0, 0, 0, loc)
	}
	return start, end
}

// quotaStates holds one quotaState per client name and place where its
// counts are kept (a storage and prefix, or a Redis), shared by every
// handler that names the client and kept across reloads while either
// config names it: a reload neither resets nor re-reads a count.
var quotaStates = caddy.NewUsagePool()

// quotaCount is a client's count in one period.
type quotaCount struct {
	start, end time.Time
	limit      int
	used       int // images made (what the storage keeps)
	reserved   int // admitted by this instance, not made yet

	// with coordination: the cluster's count as Redis last told it
	// (made and in flight everywhere), and what this instance counted
	// while Redis was unreachable, to add when it returns
	shared  int
	pending int
	// pushes counts the catch-ups that handed pending to Redis: a
	// reservation made alone before one of them is in Redis since
	pushes int
}

// quotaState is one client's counts, by period.
type quotaState struct {
	mu     sync.Mutex
	client string
	counts map[string]*quotaCount
	dirty  bool
	loaded bool
}

// Destruct implements caddy.Destructor.
func (*quotaState) Destruct() error { return nil }

// clientQuota is one provisioned quota of a client.
type clientQuota struct {
	per   string
	limit int
}

// quotaSet is a handler's quotas: the states of its clients with quotas,
// where they are kept, and the flusher that keeps them.
type quotaSet struct {
	loc     *time.Location
	storage certmagic.Storage
	prefix  string
	ident   string      // where the counts are kept, for quotaStates
	coord   coordinator // nil without coordination
	logger  *zap.Logger
	now     func() time.Time
	states  map[string]*quotaState // by client name
	order   []string               // client names in config order
	quotas  map[string][]clientQuota
	cancel  context.CancelFunc // stops the flusher; nil with coordination
	done    chan struct{}
	closed  bool
	// stopHook ends the catch-up with coordination
	stopHook func()
}

// provisionQuotas loads the clients' quota states, reading each new one
// back from the storage, and starts the flusher. It runs after the store,
// whose storage and prefix it shares.
func (g *Gateway) provisionQuotas(ctx caddy.Context) error {
	loc := time.Local
	if g.QuotaTimezone != "" {
		l, err := time.LoadLocation(g.QuotaTimezone)
		if err != nil {
			return fmt.Errorf("zimage_gateway: quota_timezone '%s' is not a time zone this system knows (an IANA name such as Europe/Berlin or UTC): %v", g.QuotaTimezone, err)
		}
		loc = l
	}
	qs := &quotaSet{loc: loc, coord: g.coord, logger: g.logger, now: time.Now, states: map[string]*quotaState{}, quotas: map[string][]clientQuota{}}
	for _, cc := range g.Clients {
		for i, q := range cc.Quotas {
			if err := checkQuota(q, cc.Quotas[:i]); err != nil {
				return fmt.Errorf("zimage_gateway: client '%s': %v", cc.Name, err)
			}
			qs.quotas[cc.Name] = append(qs.quotas[cc.Name], clientQuota{per: q.Per, limit: q.Images})
		}
	}
	if len(qs.quotas) == 0 {
		return nil
	}
	if g.store != nil {
		qs.storage, qs.prefix = g.store.storage, g.store.prefix
		qs.ident = g.store.scheduleKey
	} else {
		qs.storage, qs.prefix = caddyStorage(ctx), defaultStorePrefix
		qs.ident = fmt.Sprintf("default %T", qs.storage)
		if s, ok := qs.storage.(fmt.Stringer); ok {
			qs.ident = "default " + s.String()
		}
		qs.ident = qs.prefix + "\x00" + qs.ident
	}
	if g.coord != nil {
		qs.ident = "coordination " + g.coordKey
	}
	for _, cc := range g.Clients {
		if len(qs.quotas[cc.Name]) == 0 {
			continue
		}
		val, _, _ := quotaStates.LoadOrNew(qs.stateKey(cc.Name), func() (caddy.Destructor, error) {
			return &quotaState{client: cc.Name, counts: map[string]*quotaCount{}}, nil
		})
		st := val.(*quotaState)
		qs.states[cc.Name] = st
		qs.order = append(qs.order, cc.Name)
		if qs.coord == nil {
			qs.load(ctx, st)
		}
	}
	for _, c := range g.clients.clients {
		if qs.states[c.name] != nil {
			c.quotas = qs
		}
	}
	g.quotas = qs
	if qs.coord != nil {
		// the counts live in Redis; this instance adds what it counted
		// alone when Redis returns after an absence
		qs.stopHook = qs.coord.onReconnect(qs.catchUp)
		return nil
	}
	fctx, cancel := context.WithCancel(context.Background())
	qs.cancel, qs.done = cancel, make(chan struct{})
	go qs.flusher(fctx)
	return nil
}

// stateKey names a client's state: its name where its counts are kept.
func (qs *quotaSet) stateKey(client string) string { return "quota|" + qs.ident + "|" + client }

// countLocked is the client's count in the period of q that holds now,
// a new one when the period has turned.
func (qs *quotaSet) countLocked(st *quotaState, q clientQuota, now time.Time) *quotaCount {
	c := st.counts[q.per]
	if c == nil || !now.Before(c.end) {
		start, end := periodBounds(q.per, now, qs.loc)
		c = &quotaCount{start: start, end: end}
		st.counts[q.per] = c
		st.dirty = true
	}
	c.limit = q.limit // a reload may change it
	return c
}

// quotaHold is what one request reserved: n images in each period.
type quotaHold struct {
	mu     sync.Mutex
	n      int         // reserved and not yet made or given back
	starts []time.Time // the period each quota's reservation counts in
	shared []bool      // whether it was counted in Redis
	pushes []int       // quotaCount.pushes when it was made alone
}

// reserve reserves n images of every quota of the client, or none: the
// error names the quota the request would pass and when it resets.
func (qs *quotaSet) reserve(ctx context.Context, client string, h *quotaHold, n int) *apiError {
	st := qs.states[client]
	quotas := qs.quotas[client]
	now := qs.now()
	for _, q := range quotas {
		if n+h.n > q.limit {
			return invalidRequest("n", fmt.Sprintf("n=%d is more than the %d images per %s client %s may have made", n+h.n, q.limit, q.per, client))
		}
	}
	st.mu.Lock()
	counts := make([]*quotaCount, len(quotas))
	for i, q := range quotas {
		counts[i] = qs.countLocked(st, q, now)
	}
	st.mu.Unlock()

	shared := false
	var totals []int
	if qs.coord != nil {
		var ok bool
		var err error
		totals, ok, err = qs.coord.reserveQuota(ctx, client, quotaKeys(quotas, counts), n)
		if err == nil {
			shared = true
			if !ok {
				st.mu.Lock()
				for i, c := range counts {
					c.shared = totals[i]
				}
				st.mu.Unlock()
				return qs.refuse(client, quotas, counts, totals, n, now)
			}
		}
	}

	st.mu.Lock()
	defer st.mu.Unlock()
	if !shared {
		used := make([]int, len(counts))
		for i, c := range counts {
			used[i] = c.used + c.reserved
			if qs.coord != nil {
				used[i] = c.shared + c.pending
			}
		}
		for i, q := range quotas {
			if used[i]+n > q.limit {
				return qs.refuse(client, quotas, counts, used, n, now)
			}
		}
	}
	if h.starts == nil {
		h.starts = make([]time.Time, len(quotas))
		h.shared = make([]bool, len(quotas))
		h.pushes = make([]int, len(quotas))
	}
	for i, c := range counts {
		c.reserved += n
		if shared {
			c.shared = totals[i]
		} else if qs.coord != nil {
			c.pending += n
		}
		h.starts[i], h.shared[i], h.pushes[i] = c.start, shared, c.pushes
	}
	h.n += n
	return nil
}

// refuse is the 429 of a request that would pass a quota: the quota
// whose reset comes last among those it would pass, as the request can
// pass only then.
func (qs *quotaSet) refuse(client string, quotas []clientQuota, counts []*quotaCount, used []int, n int, now time.Time) *apiError {
	worst := -1
	for i, q := range quotas {
		if used[i]+n > q.limit && (worst < 0 || counts[i].end.After(counts[worst].end)) {
			worst = i
		}
	}
	if worst < 0 { // Redis refused on counts that moved since: the first quota
		worst = 0
	}
	q, c := quotas[worst], counts[worst]
	resets := c.end.UTC().Format(time.RFC3339)
	msg := fmt.Sprintf("client %s has used its %d images per %s; the quota resets at %s", client, q.limit, q.per, resets)
	if u := used[worst]; u < q.limit {
		msg = fmt.Sprintf("client %s has used %d of its %d images per %s, and this request asks for %d more; the quota resets at %s", client, u, q.limit, q.per, n, resets)
	}
	return &apiError{status: http.StatusTooManyRequests, typ: "insufficient_quota", code: "insufficient_quota",
		retryAfter: strconv.Itoa(max(1, int(c.end.Sub(now).Seconds()+0.999))), message: msg}
}

// made counts one image of the request's reservation as made.
func (qs *quotaSet) made(client string, h *quotaHold) {
	h.mu.Lock()
	if h.n == 0 {
		h.mu.Unlock()
		return
	}
	h.n--
	h.mu.Unlock()
	st := qs.states[client]
	now := qs.now()
	st.mu.Lock()
	defer st.mu.Unlock()
	for i, q := range qs.quotas[client] {
		c := qs.countLocked(st, q, now)
		if c.start.Equal(h.starts[i]) {
			c.reserved--
		}
		// an image made just after the period turned counts in the new
		// one: its points were spent then
		c.used++
		if !c.start.Equal(h.starts[i]) {
			if h.shared[i] && qs.coord != nil {
				c.pending++ // the reservation counted in the old period's key
			}
		}
		metricQuotaUsed.WithLabelValues(client, q.per).Set(float64(qs.shownLocked(c)))
	}
	st.dirty = true
}

// release gives back what the request reserved and did not make.
func (qs *quotaSet) release(ctx context.Context, client string, h *quotaHold) {
	h.mu.Lock()
	n := h.n
	h.n = 0
	h.mu.Unlock()
	if n == 0 {
		return
	}
	st := qs.states[client]
	quotas := qs.quotas[client]
	now := qs.now()
	var back []quotaKey
	st.mu.Lock()
	for i, q := range quotas {
		c := qs.countLocked(st, q, now)
		if !c.start.Equal(h.starts[i]) {
			continue // the period turned: its count is gone anyway
		}
		c.reserved -= n
		switch {
		case h.shared[i], qs.coord != nil && c.pushes != h.pushes[i]:
			// counted in Redis: at once, or by a catch-up since
			back = append(back, quotaKey{per: q.per, start: c.start, end: c.end, limit: q.limit})
		case qs.coord != nil:
			c.pending -= n
		}
	}
	st.mu.Unlock()
	if len(back) > 0 {
		if err := qs.coord.releaseQuota(ctx, client, back, n); err != nil {
			// Redis went away meanwhile: the catch-up takes it back
			st.mu.Lock()
			for _, k := range back {
				if c := st.counts[k.per]; c != nil && c.start.Equal(k.start) {
					c.pending -= n
				}
			}
			st.mu.Unlock()
		}
	}
}

// shownLocked is the count a client is shown: the cluster's with
// coordination, else this instance's images made.
func (qs *quotaSet) shownLocked(c *quotaCount) int {
	if qs.coord != nil {
		return max(c.used, c.shared+c.pending-c.reserved)
	}
	return c.used
}

// quotaKey names one period's count, for the coordinator.
type quotaKey struct {
	per        string
	start, end time.Time
	limit      int
}

func quotaKeys(quotas []clientQuota, counts []*quotaCount) []quotaKey {
	keys := make([]quotaKey, len(quotas))
	for i, q := range quotas {
		keys[i] = quotaKey{per: q.per, start: counts[i].start, end: counts[i].end, limit: q.limit}
	}
	return keys
}

// close stops the flusher, writes what changed since its last pass and
// gives the states back; a second call does nothing.
func (qs *quotaSet) close() error {
	if qs == nil || qs.closed {
		return nil
	}
	qs.closed = true
	if qs.stopHook != nil {
		qs.stopHook()
	}
	if qs.cancel != nil {
		qs.cancel()
		<-qs.done
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		qs.flush(ctx)
	}
	var errs []error
	for _, name := range qs.order {
		_, err := quotaStates.Delete(qs.stateKey(name))
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}

// quota bookkeeping of one request (its admission): reserved by the
// admit step, counted by each image made, given back at the request's end.

func (a *admission) reserveQuota(ctx context.Context, n int) *apiError {
	if n <= 0 || a.client.quotas == nil {
		return nil
	}
	if a.quota == nil {
		a.quota = &quotaHold{}
	}
	return a.client.quotas.reserve(ctx, a.client.name, a.quota, n)
}

// made counts one image made for the request.
func (a *admission) made() {
	if a == nil || a.quota == nil {
		return
	}
	a.client.quotas.made(a.client.name, a.quota)
}

func (a *admission) releaseQuota(ctx context.Context) {
	if a.quota != nil {
		a.client.quotas.release(ctx, a.client.name, a.quota)
	}
}
