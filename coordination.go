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
