package zimage

// The Redis side of coordination: the Lua scripts and the redisCoord
// operations that run them, for slots and their leases, rests and quota
// counts. Each script does its reading and writing in one step, so that
// two instances never both take the last slot or the last of a quota.

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"time"

	"github.com/redis/go-redis/v9"
)

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
