package zimage

// A cluster that counts as one: with `coordination redis <url>`, every
// instance shares through Redis, atomically, the quota counts, the slots
// of the upstream's accounts and of the clients' max_concurrent, and the
// accounts' rests. Without it nothing here runs and every limit is per
// instance.
//
// The shapes are Redis's own: a quota count is a string counted with
// INCRBY that expires after its period; a set of slots is a sorted set
// whose members are leases scored by when they expire, taken by a Lua
// script that drops the expired ones and takes a lease only below the
// limit, and renewed by the instance that holds it (so a crashed
// instance's slots come back within the lease's TTL); a rest is a string
// set with PX. Times inside scripts are Redis's own clock (TIME), so the
// instances' clocks need not agree.
//
// When Redis cannot be reached the gateway keeps serving on its
// per-instance limits and counts: it logs once, sets
// caddy_zimage_coordination_up to 0, reports health "degraded", and when
// Redis answers again it adds what it counted meanwhile and re-registers
// the slots its requests hold.

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/redis/go-redis/v9"
	"go.uber.org/zap"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
)

const (
	// defaultLeaseTTL is how long a slot outlives an instance that stopped
	// renewing it (a crash): short enough that a crashed instance's slots
	// come back soon, long enough that a slow Redis round trip never
	// loses a live one (it is renewed every third of it).
	defaultLeaseTTL = 15 * time.Second
	// defaultCoordPrefix starts every key the gateway writes to Redis.
	defaultCoordPrefix = "zimage"
	// coordTimeout bounds one Redis round trip: past it, Redis counts as
	// unreachable and the request goes on with per-instance limits.
	coordTimeout = 500 * time.Millisecond
	// clusterFullWait is how long an account whose slots are all taken
	// across the cluster is skipped before its slots are asked again.
	clusterFullWait = 50 * time.Millisecond
)

var metricCoordinationUp = prometheus.NewGauge(prometheus.GaugeOpts{
	Namespace: "caddy", Subsystem: "zimage", Name: "coordination_up",
	Help: "1 while the Redis of `coordination` answers, 0 while the gateway runs on per-instance limits without it.",
})

func init() {
	collectors = append(collectors, metricCoordinationUp)
	// the client's own log goes to stderr, outside Caddy's logs, with a
	// line per failed dial; the gateway logs the outage once itself
	redis.SetLogger(quietRedisLog{})
}

type quietRedisLog struct{}

func (quietRedisLog) Printf(context.Context, string, ...any) {}

// CoordinationConfig makes several gateways count as one through Redis.
type CoordinationConfig struct {
	// Redis is the URL of the Redis server: redis://[[user]:password@]host:port[/db]
	// (rediss:// for TLS). Placeholders such as {env.REDIS_URL} are
	// accepted; its password is a secret, kept out of logs, errors and the
	// health body. Required.
	Redis string `json:"redis,omitempty"`

	// LeaseTTL is how long a slot taken by an instance lives without being
	// renewed: the longest a crashed instance's slots stay taken.
	// Default: 15s.
	LeaseTTL caddy.Duration `json:"lease_ttl,omitempty"`

	// KeyPrefix starts every Redis key the gateway uses, so that several
	// clusters may share one Redis. Default: zimage.
	KeyPrefix string `json:"key_prefix,omitempty"`
}

// unmarshalCoordination parses `coordination redis <url> [{ lease_ttl <d>; key_prefix <p> }]`.
func unmarshalCoordination(d *caddyfile.Dispenser) (*CoordinationConfig, error) {
	args := d.RemainingArgs()
	if len(args) != 2 || args[0] != "redis" {
		return nil, d.Err("zimage_gateway: coordination: want 'coordination redis <url>', such as coordination redis redis://127.0.0.1:6379")
	}
	cc := &CoordinationConfig{Redis: args[1]}
	err := eachOption(d, "coordination", func(opt string) (err error) {
		switch opt {
		case "lease_ttl":
			cc.LeaseTTL, err = parseDuration(d)
		case "key_prefix":
			cc.KeyPrefix, err = singleArg(d)
		default:
			return d.Errf("unrecognized zimage_gateway coordination option '%s'", opt)
		}
		return err
	})
	return cc, err
}

// coordinator is what the accounts, the clients and the quotas ask of the
// cluster. Its only implementation is Redis; a nil coordinator means
// `coordination` is off.
type coordinator interface {
	// slots takes n slots of the set key below limit, adding them to held
	// when given; rest is the rest the account key names, if restKey is
	// set. An error means Redis is unreachable: the caller goes on alone.
	slots(ctx context.Context, key, restKey string, limit, n int, held slotLease) (lease slotLease, rest time.Time, ok bool, err error)
	// shareRest rests the account key for every instance until then.
	shareRest(restKey string, until time.Time)
	// endRest ends the account key's rest for every instance, but for
	// keep (a 429's Retry-After, when it runs on): a success showed that
	// whatever made the account rest has passed.
	endRest(restKey string, keep time.Time)
	// watchRests applies the rests other instances set, as they come; a
	// zero time means the cluster knows no rest of the account.
	watchRests(restKey string, apply func(until time.Time)) (stop func())
	reserveQuota(ctx context.Context, client string, keys []quotaKey, n int) (totals []int, ok bool, err error)
	releaseQuota(ctx context.Context, client string, keys []quotaKey, n int) error
	readQuota(ctx context.Context, client string, keys []quotaKey) ([]int, error)
	// onReconnect runs catchUp each time Redis answers again.
	onReconnect(catchUp func(ctx context.Context) error) (stop func())
	isUp() bool
}

// slotLease is slots held across the cluster.
type slotLease interface {
	release()
	// shrink gives back n of its slots.
	shrink(n int)
}

// slotShare is a client's max_concurrent across the cluster.
type slotShare interface {
	acquire(ctx context.Context, limit, n int, held slotLease) (slotLease, bool)
}

// coords holds one redisCoord per Redis URL and prefix, shared by every
// handler and kept across reloads, so that a reload neither drops the
// slots that running requests hold nor opens new connections.
var coords = caddy.NewUsagePool()

// instanceID names this process's leases.
var instanceID = func() string {
	var b [6]byte
	_, _ = rand.Read(b[:])
	return hex.EncodeToString(b[:])
}()

// redisCoord is a coordinator over one Redis.
type redisCoord struct {
	rdb    *redis.Client
	prefix string
	ttl    time.Duration
	addr   string // host:port, for logs (never the URL: it holds the password)
	logger *zap.Logger

	up     atomic.Bool
	seq    atomic.Uint64
	mu     sync.Mutex // guards leases and the hooks; held across renewals and releases, so a released lease is never renewed back
	leases map[*redisLease]struct{}
	rests  map[string][]*restWatch
	hooks  map[*reconnectHook]struct{}

	cancel context.CancelFunc
	done   chan struct{}
}

type restWatch struct{ apply func(time.Time) }
type reconnectHook struct{ f func(context.Context) error }

// provisionCoordination connects (lazily: Redis may come up later) to the
// configured Redis. It returns the URL's secrets for the scrubber.
func (g *Gateway) provisionCoordination(resolve func(v, env string) string) ([]string, error) {
	cc := g.Coordination
	if cc == nil {
		return nil, nil
	}
	raw := resolve(cc.Redis, "")
	if raw == "" {
		return nil, errors.New("zimage_gateway: coordination: the Redis URL is empty (or its placeholder resolved to nothing): set it, such as coordination redis redis://127.0.0.1:6379")
	}
	secrets := redisSecrets(raw)
	opt, err := redis.ParseURL(raw)
	if err != nil {
		// the parser's message may quote the URL, password and all
		return secrets, fmt.Errorf("zimage_gateway: coordination: the Redis URL is not valid: want redis://[:password@]host:port[/db] or rediss://… (%s)", newScrubber(append(secrets, raw)).Replace(err.Error()))
	}
	ttl := time.Duration(cc.LeaseTTL)
	if ttl == 0 {
		ttl = defaultLeaseTTL
	}
	if ttl < 300*time.Millisecond {
		return secrets, fmt.Errorf("zimage_gateway: coordination: lease_ttl %s is shorter than 300ms, less than a few Redis round trips", ttl)
	}
	prefix := cc.KeyPrefix
	if prefix == "" {
		prefix = defaultCoordPrefix
	}
	if strings.ContainsAny(prefix, " \t\r\n{}") {
		return secrets, fmt.Errorf("zimage_gateway: coordination: key_prefix %q may not contain spaces or braces", prefix)
	}
	sum := sha256.Sum256([]byte(raw))
	key := "coord|" + hex.EncodeToString(sum[:]) + "|" + prefix + "|" + ttl.String()
	val, _, err := coords.LoadOrNew(key, func() (caddy.Destructor, error) {
		opt.DialTimeout, opt.ReadTimeout, opt.WriteTimeout = coordTimeout, coordTimeout, coordTimeout
		opt.MaxRetries = -1 // a failure is answered at once, alone; the loop below retries
		c := &redisCoord{rdb: redis.NewClient(opt), prefix: prefix, ttl: ttl, addr: opt.Addr, logger: g.logger,
			leases: map[*redisLease]struct{}{}, rests: map[string][]*restWatch{}, hooks: map[*reconnectHook]struct{}{}}
		c.up.Store(true) // until the first failure says otherwise
		metricCoordinationUp.Set(1)
		ctx, cancel := context.WithCancel(context.Background())
		c.cancel, c.done = cancel, make(chan struct{})
		go c.loop(ctx)
		return c, nil
	})
	if err != nil {
		return secrets, err
	}
	g.coord = val.(*redisCoord)
	g.coordKey = key
	return secrets, nil
}

// Destruct implements caddy.Destructor: no config uses this Redis any more.
func (c *redisCoord) Destruct() error {
	c.cancel()
	<-c.done
	c.mu.Lock()
	leases := make([]*redisLease, 0, len(c.leases))
	for l := range c.leases {
		leases = append(leases, l)
	}
	c.mu.Unlock()
	for _, l := range leases {
		l.release()
	}
	return c.rdb.Close()
}

func (c *redisCoord) isUp() bool { return c.up.Load() }

// failed marks Redis unreachable after err, logging the change once.
func (c *redisCoord) failed(err error) error {
	if err == nil || errors.Is(err, context.Canceled) {
		return err
	}
	if c.up.CompareAndSwap(true, false) {
		metricCoordinationUp.Set(0)
		c.logger.Error("coordination: Redis is unreachable; serving on this instance's own limits and counts until it answers again",
			zap.String("redis", c.addr), zap.String("error", c.scrub(err)))
	}
	return err
}

func (c *redisCoord) scrub(err error) string {
	s := err.Error()
	if p := c.rdb.Options().Password; p != "" {
		s = strings.ReplaceAll(s, p, redacted)
	}
	return s
}

var errCoordDown = errors.New("coordination: Redis is unreachable")

// call runs f with a bounded context, unless Redis is known to be down.
func (c *redisCoord) call(ctx context.Context, f func(ctx context.Context) error) error {
	if !c.up.Load() {
		return errCoordDown
	}
	return c.failed(bounded(ctx, f))
}

// bounded runs f with a bounded context.
func bounded(ctx context.Context, f func(ctx context.Context) error) error {
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), coordTimeout)
	defer cancel()
	err := f(ctx)
	if errors.Is(err, redis.Nil) {
		err = nil
	}
	return err
}

// loop renews the leases and reads the rests every third of the lease
// TTL (at most every second), and asks a Redis that went away whether it
// is back.
func (c *redisCoord) loop(ctx context.Context) {
	defer close(c.done)
	every := min(c.ttl/3, time.Second)
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		if !c.up.Load() {
			pctx, cancel := context.WithTimeout(ctx, coordTimeout)
			err := c.rdb.Ping(pctx).Err()
			cancel()
			if err != nil || c.catchUp(ctx) != nil {
				continue
			}
			// shared again only once Redis holds what this instance did
			// alone: its counts and the slots its requests hold
			c.up.Store(true)
			metricCoordinationUp.Set(1)
			c.logger.Info("coordination: Redis answers again; limits and counts are shared again", zap.String("redis", c.addr))
		} else {
			c.renew(ctx, c.call)
		}
		c.pullRests(ctx)
	}
}

func (c *redisCoord) key(kind, name string) string { return c.prefix + ":" + kind + ":" + name }

// hashKey shortens a limiter's key (it holds the service URL) for Redis.
func hashKey(s string) string {
	sum := sha256.Sum256([]byte(s))
	return hex.EncodeToString(sum[:12])
}

// slotScript takes ARGV[3] leases of the sorted set KEYS[1] if fewer than
// ARGV[1] (minus them) are live, each expiring ARGV[2] ms from now; it
// answers whether it took them and the rest KEYS[2] holds (ms since the
// epoch, 0 for none).
var slotScript = redis.NewScript(`
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local rest = redis.call('GET', KEYS[2]) or '0'
local limit, ttl, n = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
if redis.call('ZCARD', KEYS[1]) + n > limit then
  return {0, rest}
end
for i = 1, n do
  redis.call('ZADD', KEYS[1], now + ttl, ARGV[3 + i])
end
redis.call('PEXPIRE', KEYS[1], ttl * 2)
return {1, rest}
`)

// renewScript extends the leases ARGV[2..] of KEYS[1] by ARGV[1] ms from
// now, adding back any that Redis lost (a restart without persistence).
var renewScript = redis.NewScript(`
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[1])
for i = 2, #ARGV do
  redis.call('ZADD', KEYS[1], now + ttl, ARGV[i])
end
redis.call('PEXPIRE', KEYS[1], ttl * 2)
return 1
`)

// redisLease is slots of one sorted set that this instance holds.
type redisLease struct {
	c       *redisCoord
	key     string
	members []string
}

func (c *redisCoord) slots(ctx context.Context, key, restKey string, limit, n int, held slotLease) (slotLease, time.Time, bool, error) {
	l, _ := held.(*redisLease)
	if l == nil {
		l = &redisLease{c: c, key: c.key("slots", key)}
	}
	members := make([]string, n)
	for i := range members {
		members[i] = instanceID + ":" + strconv.FormatUint(c.seq.Add(1), 10)
	}
	rk := c.key("rest", restKey)
	if restKey == "" {
		rk = c.key("rest", "-")
	}
	var res []any
	err := c.call(ctx, func(ctx context.Context) error {
		args := append([]any{limit, c.ttl.Milliseconds(), n}, anySlice(members)...)
		var err error
		res, err = slotScript.Run(ctx, c.rdb, []string{l.key, rk}, args...).Slice()
		return err
	})
	if err != nil {
		// alone: the slots are this instance's, registered so that a
		// Redis that returns learns of them with the next renewal
		l.add(members)
		return l, time.Time{}, true, err
	}
	var rest time.Time
	if len(res) == 2 {
		if ms, _ := strconv.ParseInt(fmt.Sprint(res[1]), 10, 64); ms > 0 {
			rest = time.UnixMilli(ms)
		}
	}
	if ok, _ := res[0].(int64); ok != 1 {
		if held == nil {
			return nil, rest, false, nil
		}
		return held, rest, false, nil
	}
	l.add(members)
	return l, rest, true, nil
}

func (l *redisLease) add(members []string) {
	l.c.mu.Lock()
	l.members = append(l.members, members...)
	l.c.leases[l] = struct{}{}
	l.c.mu.Unlock()
}

func (l *redisLease) release() { l.shrink(len(l.members)) }

// shrink gives back n of the lease's slots (its newest).
func (l *redisLease) shrink(n int) {
	c := l.c
	c.mu.Lock()
	defer c.mu.Unlock()
	n = min(n, len(l.members))
	if n <= 0 {
		return
	}
	gone := l.members[len(l.members)-n:]
	l.members = l.members[:len(l.members)-n]
	if len(l.members) == 0 {
		delete(c.leases, l)
	}
	// a release that fails leaves the slot to expire with its TTL
	_ = c.call(context.Background(), func(ctx context.Context) error {
		return c.rdb.ZRem(ctx, l.key, anySlice(gone)...).Err()
	})
}

// catchUp hands a Redis that answers again what this instance did
// without it: the quota counts (the hooks) and the slots it holds.
func (c *redisCoord) catchUp(ctx context.Context) error {
	c.mu.Lock()
	hooks := make([]*reconnectHook, 0, len(c.hooks))
	for h := range c.hooks {
		hooks = append(hooks, h)
	}
	c.mu.Unlock()
	for _, h := range hooks {
		if err := bounded(ctx, h.f); err != nil {
			return err
		}
	}
	return c.renew(ctx, bounded)
}

// renew extends every lease this instance holds, running the round trip
// through run (call, or bounded while Redis is not counted as up yet).
func (c *redisCoord) renew(ctx context.Context, run func(context.Context, func(context.Context) error) error) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if len(c.leases) == 0 {
		return nil
	}
	byKey := map[string][]any{}
	for l := range c.leases {
		byKey[l.key] = append(byKey[l.key], anySlice(l.members)...)
	}
	return run(ctx, func(ctx context.Context) error {
		pipe := c.rdb.Pipeline()
		for k, ms := range byKey {
			renewScript.Run(ctx, pipe, []string{k}, append([]any{c.ttl.Milliseconds()}, ms...)...)
		}
		_, err := pipe.Exec(ctx)
		if err != nil && strings.Contains(err.Error(), "NOSCRIPT") {
			// a Redis that restarted has forgotten the scripts: load them
			// and try again once
			_ = renewScript.Load(ctx, c.rdb).Err()
			pipe = c.rdb.Pipeline()
			for k, ms := range byKey {
				renewScript.Run(ctx, pipe, []string{k}, append([]any{c.ttl.Milliseconds()}, ms...)...)
			}
			_, err = pipe.Exec(ctx)
		}
		return err
	})
}

// restScript rests KEYS[1] until ARGV[1] (ms since the epoch) for ARGV[2]
// ms, unless a longer rest is set.
var restScript = redis.NewScript(`
local cur = tonumber(redis.call('GET', KEYS[1]) or '0')
if tonumber(ARGV[1]) > cur then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
end
return 1
`)

func (c *redisCoord) shareRest(restKey string, until time.Time) {
	d := time.Until(until)
	if d <= 0 {
		return
	}
	_ = c.call(context.Background(), func(ctx context.Context) error {
		return restScript.Run(ctx, c.rdb, []string{c.key("rest", restKey)}, until.UnixMilli(), d.Milliseconds()).Err()
	})
}

// endRestScript shortens the rest KEYS[1] to ARGV[1] (ms since the epoch;
// 0 ends it) when it is longer, ARGV[2] ms from now.
var endRestScript = redis.NewScript(`
local cur = tonumber(redis.call('GET', KEYS[1]) or '0')
if cur <= tonumber(ARGV[1]) then return 0 end
if tonumber(ARGV[1]) == 0 then
  redis.call('DEL', KEYS[1])
else
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
end
return 1
`)

func (c *redisCoord) endRest(restKey string, keep time.Time) {
	var ms, d int64
	if d = time.Until(keep).Milliseconds(); d > 0 {
		ms = keep.UnixMilli()
	}
	_ = c.call(context.Background(), func(ctx context.Context) error {
		return endRestScript.Run(ctx, c.rdb, []string{c.key("rest", restKey)}, ms, max(d, 1)).Err()
	})
}

func (c *redisCoord) watchRests(restKey string, apply func(time.Time)) func() {
	w := &restWatch{apply: apply}
	c.mu.Lock()
	c.rests[restKey] = append(c.rests[restKey], w)
	c.mu.Unlock()
	return func() {
		c.mu.Lock()
		defer c.mu.Unlock()
		ws := c.rests[restKey]
		for i, o := range ws {
			if o == w {
				ws = append(ws[:i:i], ws[i+1:]...)
				break
			}
		}
		if len(ws) == 0 {
			delete(c.rests, restKey)
		} else {
			c.rests[restKey] = ws
		}
	}
}

// pullRests applies the rests that other instances set.
func (c *redisCoord) pullRests(ctx context.Context) {
	c.mu.Lock()
	keys := make([]string, 0, len(c.rests))
	for k := range c.rests {
		keys = append(keys, k)
	}
	c.mu.Unlock()
	if len(keys) == 0 {
		return
	}
	full := make([]string, len(keys))
	for i, k := range keys {
		full[i] = c.key("rest", k)
	}
	var vals []any
	if c.call(ctx, func(ctx context.Context) (err error) {
		vals, err = c.rdb.MGet(ctx, full...).Result()
		return err
	}) != nil {
		return
	}
	for i, v := range vals {
		// no key (v is nil): the cluster knows no rest, or another
		// instance ended it after a success
		s, _ := v.(string)
		var until time.Time
		if ms, _ := strconv.ParseInt(s, 10, 64); ms > 0 {
			until = time.UnixMilli(ms)
		}
		c.mu.Lock()
		ws := append([]*restWatch(nil), c.rests[keys[i]]...)
		c.mu.Unlock()
		for _, w := range ws {
			w.apply(until)
		}
	}
}

// quotaScript adds ARGV[1] to every count KEYS[i] unless one would pass
// its limit ARGV[1+i]; each expires at ARGV[1+#KEYS+i] (s since the
// epoch). It answers whether it added, then the counts.
var quotaScript = redis.NewScript(`
local n, k = tonumber(ARGV[1]), #KEYS
local vals, ok = {}, 1
for i = 1, k do
  vals[i] = tonumber(redis.call('GET', KEYS[i]) or '0')
  if vals[i] + n > tonumber(ARGV[1 + i]) then ok = 0 end
end
if ok == 1 then
  for i = 1, k do
    vals[i] = redis.call('INCRBY', KEYS[i], n)
    redis.call('EXPIREAT', KEYS[i], ARGV[1 + k + i])
  end
end
table.insert(vals, 1, ok)
return vals
`)

// catchUpScript adds ARGV[2] (what this instance counted alone) to
// KEYS[1], starting from ARGV[1] (what it last saw there) when the key is
// gone: a Redis restarted without persistence has lost it.
var catchUpScript = redis.NewScript(`
local v = tonumber(redis.call('GET', KEYS[1]) or ARGV[1])
v = v + tonumber(ARGV[2])
if v < 0 then v = 0 end
redis.call('SET', KEYS[1], v, 'EXAT', ARGV[3])
return v
`)

// quotaKeyFor is the Redis key of a client's count in one period.
func (c *redisCoord) quotaKeyFor(client string, k quotaKey) string {
	return c.key("quota", client+":"+k.per+":"+strconv.FormatInt(k.start.Unix(), 10))
}

// quotaExpiry keeps a count a day past its period, for the usage of a
// period that just ended.
func quotaExpiry(k quotaKey) int64 { return k.end.Add(24 * time.Hour).Unix() }

func (c *redisCoord) reserveQuota(ctx context.Context, client string, keys []quotaKey, n int) ([]int, bool, error) {
	ks := make([]string, len(keys))
	args := []any{n}
	for i, k := range keys {
		ks[i] = c.quotaKeyFor(client, k)
		args = append(args, k.limit)
	}
	for _, k := range keys {
		args = append(args, quotaExpiry(k))
	}
	var res []int64
	err := c.call(ctx, func(ctx context.Context) (err error) {
		res, err = quotaScript.Run(ctx, c.rdb, ks, args...).Int64Slice()
		return err
	})
	if err != nil || len(res) != len(keys)+1 {
		return nil, false, errors.Join(err, errCoordDown)
	}
	totals := make([]int, len(keys))
	for i := range totals {
		totals[i] = int(res[i+1])
	}
	return totals, res[0] == 1, nil
}

func (c *redisCoord) releaseQuota(ctx context.Context, client string, keys []quotaKey, n int) error {
	return c.call(ctx, func(ctx context.Context) error {
		pipe := c.rdb.Pipeline()
		for _, k := range keys {
			pipe.DecrBy(ctx, c.quotaKeyFor(client, k), int64(n))
		}
		_, err := pipe.Exec(ctx)
		return err
	})
}

func (c *redisCoord) readQuota(ctx context.Context, client string, keys []quotaKey) ([]int, error) {
	ks := make([]string, len(keys))
	for i, k := range keys {
		ks[i] = c.quotaKeyFor(client, k)
	}
	var vals []any
	err := c.call(ctx, func(ctx context.Context) (err error) {
		vals, err = c.rdb.MGet(ctx, ks...).Result()
		return err
	})
	if err != nil {
		return nil, err
	}
	out := make([]int, len(keys))
	for i, v := range vals {
		s, _ := v.(string)
		out[i], _ = strconv.Atoi(s)
	}
	return out, nil
}

// catchUpQuota adds pending to a count, making it at least seen first.
func (c *redisCoord) catchUpQuota(ctx context.Context, client string, k quotaKey, seen, pending int) (int, error) {
	v, err := catchUpScript.Run(ctx, c.rdb, []string{c.quotaKeyFor(client, k)}, seen, pending, quotaExpiry(k)).Int()
	return v, err
}

func (c *redisCoord) onReconnect(f func(ctx context.Context) error) func() {
	h := &reconnectHook{f: f}
	c.mu.Lock()
	c.hooks[h] = struct{}{}
	c.mu.Unlock()
	return func() {
		c.mu.Lock()
		delete(c.hooks, h)
		c.mu.Unlock()
	}
}

// redisSecrets are the credentials in a Redis URL, for the scrubber.
func redisSecrets(raw string) []string {
	u, err := url.Parse(raw)
	if err != nil || u.User == nil {
		// unparsable: the whole URL may hold the password
		return []string{raw}
	}
	var out []string
	if pass, ok := u.User.Password(); ok && pass != "" {
		out = append(out, pass, u.User.String())
	}
	return out
}

func anySlice(ss []string) []any {
	out := make([]any, len(ss))
	for i, s := range ss {
		out[i] = s
	}
	return out
}

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
