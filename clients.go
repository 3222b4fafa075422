package zimage

// Named clients (docs/design.md#clients-quotas): the client blocks and the api_key keys (the
// client "default"), matching a request's key against all of them in
// constant time, the per-client limit on generations at once, and the
// attribution of every answer to its client.

import (
	"context"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/hex"
	"errors"
	"fmt"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
)

// Client names the gateway gives itself.
const (
	defaultClient   = "default"   // the keys of api_key
	anonymousClient = "anonymous" // every request under no_auth
)

// clientRetryAfter is the Retry-After, in seconds, of a client at its
// max_concurrent: about the time a generation takes to finish.
const clientRetryAfter = "5"

// ClientConfig is one named client of the gateway: a person, a team or an
// application with keys of its own.
type ClientConfig struct {
	// Name labels the client in metrics and logs (its keys never appear
	// there): 1 to 64 lower-case letters, digits, '-' and '_'. Required,
	// unique; "default" is taken by the keys of api_key when there are any.
	Name string `json:"name,omitempty"`

	// Keys are the client's keys, sent as `Authorization: Bearer <key>`.
	// Placeholders are accepted; a key that resolves to nothing is
	// dropped, and a client left without a key is a config error. A key
	// belongs to one client only.
	Keys []string `json:"keys,omitempty"`

	// MaxConcurrent is the most generations the client may run at once
	// (an Images API request for n images counts n); a request beyond it
	// is answered at once with 429 and Retry-After, without waiting in
	// the upstream queue. 0 means unlimited.
	MaxConcurrent int `json:"max_concurrent,omitempty"`

	// Quotas are the most images the client may have made per calendar
	// hour, day, week or month (one quota per period); a request that
	// would pass one is answered 429 insufficient_quota. Default: none.
	Quotas []QuotaConfig `json:"quotas,omitempty"`
}

// unmarshalClient parses `client <name> { key <key>...; max_concurrent <n> }`;
// others are the clients parsed before it.
func unmarshalClient(d *caddyfile.Dispenser, others []ClientConfig) (ClientConfig, error) {
	var c ClientConfig
	if !d.NextArg() {
		return c, d.Errf("zimage_gateway: client needs a name: client <name> { key <key> }")
	}
	c.Name = d.Val()
	if d.NextArg() {
		return c, d.ArgErr()
	}
	if err := checkClientName(c.Name, others); err != nil {
		return c, d.Errf("%v", err)
	}
	err := eachOption(d, "client", func(opt string) (err error) {
		switch opt {
		case "key":
			// `key {$UNSET}` leaves no argument, like api_key
			c.Keys = append(c.Keys, d.RemainingArgs()...)
		case "max_concurrent":
			c.MaxConcurrent, err = parseInt(d, 0)
		case "quota":
			var q QuotaConfig
			if q, err = unmarshalQuota(d, c.Quotas); err == nil {
				c.Quotas = append(c.Quotas, q)
			}
		default:
			return d.Errf("unrecognized zimage_gateway client option '%s'", opt)
		}
		return err
	}, "key", "quota")
	return c, err
}

func checkClientName(name string, others []ClientConfig) error {
	if !accountName.MatchString(name) {
		return fmt.Errorf("zimage_gateway: client name '%s' is not a simple label: use 1 to 64 lower-case letters, digits, '-' and '_'", name)
	}
	for _, o := range others {
		if o.Name == name {
			return fmt.Errorf("zimage_gateway: duplicate client name '%s'", name)
		}
	}
	return nil
}

// client is one provisioned client.
type client struct {
	name   string
	lim    *limiter // its generations in flight; nil for anonymous
	limKey string
	claim  uint64
	quotas *quotaSet // nil: the client has no quota (quotas.go)
	// shared is the client's max_concurrent across a cluster, with
	// coordination (coordination.go)
	shared slotShare

	// served holds the client's caddy_zimage_client_requests_total
	// children for code 200, one per entry of servedEndpoints, each made
	// on its first use (as WithLabelValues would, so /metrics shows the
	// same series): the hot path then skips hashing three labels and
	// formatting the code on every request
	served [len(servedEndpoints)]atomic.Pointer[prometheus.Counter]
}

// servedEndpoints are the endpoints whose answers client.served counts.
var servedEndpoints = [...]string{endpointModels, endpointChat, endpointImages, endpointEdits, endpointResponses}

// countServed counts one answer of the client's with code 200 at endpoint.
func (c *client) countServed(endpoint string) {
	i := slices.Index(servedEndpoints[:], endpoint)
	if i < 0 {
		metricClientRequests.WithLabelValues(c.name, endpoint, "200").Inc()
		return
	}
	p := c.served[i].Load()
	if p == nil {
		// two requests may both get here: the vec gives both the same child
		ctr := metricClientRequests.WithLabelValues(c.name, endpoint, "200")
		p = &ctr
		c.served[i].Store(p)
	}
	(*p).Inc()
}

// label is the client's name for logs and metrics ("" when unknown).
func (c *client) label() string {
	if c == nil {
		return ""
	}
	return c.name
}

// clientKey is the digest of one key and the client it belongs to.
type clientKey struct {
	digest [32]byte
	client int
}

// clientSet is a handler's clients and all their keys.
type clientSet struct {
	keys      []clientKey
	clients   []*client
	anonymous *client // no_auth
	closed    bool
}

// provisionClients resolves the client keys: those of api_key (or, when
// neither api_key nor a client block gives one, GATEWAY_API_KEY) are the
// client "default". It returns every key, for the scrubber.
func (g *Gateway) provisionClients(resolve func(v, env string) string) ([]string, error) {
	type named struct {
		name  string
		keys  []string
		limit int
	}
	var all []named
	var defKeys []string
	for _, k := range g.APIKeys {
		if k = resolve(k, ""); k != "" {
			defKeys = append(defKeys, k)
		}
	}
	if len(defKeys) == 0 && len(g.Clients) == 0 {
		if k := resolve("", "GATEWAY_API_KEY"); k != "" {
			defKeys = append(defKeys, k)
		}
	}
	if len(defKeys) > 0 {
		all = append(all, named{name: defaultClient, keys: defKeys})
	}
	if g.NoAuth && len(g.Clients) > 0 {
		return nil, errors.New("zimage_gateway: client blocks need keys, and no_auth turns keys off: remove no_auth or the client blocks")
	}
	for i, cc := range g.Clients {
		if err := checkClientName(cc.Name, g.Clients[:i]); err != nil {
			return nil, err
		}
		if cc.Name == defaultClient && len(defKeys) > 0 {
			return nil, errors.New("zimage_gateway: the client name 'default' belongs to the keys of api_key: rename the client block, or move those keys into it")
		}
		if cc.MaxConcurrent < 0 {
			return nil, fmt.Errorf("zimage_gateway: client '%s': max_concurrent must be 0 (unlimited) or more, got %d", cc.Name, cc.MaxConcurrent)
		}
		n := named{name: cc.Name, limit: cc.MaxConcurrent}
		for _, k := range cc.Keys {
			if k = resolve(k, ""); k != "" {
				n.keys = append(n.keys, k)
			}
		}
		if len(n.keys) == 0 {
			return nil, fmt.Errorf("zimage_gateway: client '%s' has no key (or its placeholders resolved to nothing): add 'key <key>' to its block", cc.Name)
		}
		all = append(all, n)
	}

	cs := &clientSet{}
	owner := map[string]string{} // key → its client
	var secrets []string
	for i, n := range all {
		c := &client{name: n.name}
		var digests []string
		for _, k := range n.keys {
			if o, dup := owner[k]; dup {
				if o == n.name {
					continue // the same key twice in one client is harmless
				}
				return nil, fmt.Errorf("zimage_gateway: clients '%s' and '%s' share a key: a key belongs to one client, so that its requests are attributed and limited once", o, n.name)
			}
			owner[k] = n.name
			d := sha256.Sum256([]byte(k))
			cs.keys = append(cs.keys, clientKey{digest: d, client: i})
			digests = append(digests, hex.EncodeToString(d[:]))
			secrets = append(secrets, k)
		}
		// a client is its name and its keys: the same client on two sites
		// (or across a reload) shares its limit, and its limit changes in
		// place like an account's
		slices.Sort(digests)
		sum := sha256.Sum256([]byte(strings.Join(digests, ",")))
		c.limKey = "client|" + n.name + "|" + hex.EncodeToString(sum[:])
		c.lim, c.claim = loadLimiter(c.limKey, n.limit, false)
		cs.clients = append(cs.clients, c)
	}
	g.clients = cs
	if g.NoAuth {
		cs.anonymous = &client{name: anonymousClient}
	} else if len(cs.keys) == 0 {
		return secrets, errors.New("zimage_gateway: no client API key: set 'api_key' or a 'client' block with a key (or the GATEWAY_API_KEY environment variable), or 'no_auth' if the site authenticates requests otherwise")
	}
	return secrets, nil
}

// close gives back the clients' limiters; a second call does nothing.
func (cs *clientSet) close() error {
	if cs == nil || cs.closed {
		return nil
	}
	cs.closed = true
	var errs []error
	for _, c := range cs.clients {
		errs = append(errs, dropLimiter(c.limKey, c.lim, c.claim))
	}
	return errors.Join(errs...)
}

// authorize returns the client whose key the request carries, or nil. The
// bearer token's SHA-256 is compared with every key of every client in
// constant time, and the match is selected without a branch, so neither
// the time nor its lengths tell which key (or whether any) matched.
func (g *Gateway) authorize(r *http.Request) *client {
	if g.NoAuth {
		return g.clients.anonymous
	}
	h := r.Header.Get("Authorization")
	const prefix = "bearer "
	if len(h) < len(prefix) || !strings.EqualFold(h[:len(prefix)], prefix) {
		return nil
	}
	got := sha256.Sum256([]byte(strings.TrimSpace(h[len(prefix):])))
	match, idx := 0, 0
	for _, k := range g.clients.keys {
		eq := subtle.ConstantTimeCompare(got[:], k.digest[:])
		match |= eq
		idx = subtle.ConstantTimeSelect(eq, k.client, idx)
	}
	if match != 1 {
		return nil
	}
	return g.clients.clients[idx]
}

// requestState follows one attributed request: its client, what it holds
// of the client's limits (given back when it ends), and the status it was
// answered with, for caddy_zimage_client_requests_total. It wraps the
// ResponseWriter to see the status, as Caddy's own wrappers do; Unwrap
// keeps flushing (SSE) working through it.
type requestState struct {
	caddyhttp.ResponseWriterWrapper
	client *client
	adm    admission
	code   int
}

func (rs *requestState) WriteHeader(code int) {
	if rs.code == 0 {
		rs.code = code
	}
	rs.ResponseWriter.WriteHeader(code)
}

func (rs *requestState) Write(b []byte) (int, error) {
	if rs.code == 0 {
		rs.code = http.StatusOK
	}
	return rs.ResponseWriter.Write(b)
}

// finish gives back what the request held and counts the answer.
func (rs *requestState) finish(endpoint string) {
	rs.adm.release()
	code := rs.code
	if code == 0 || code == http.StatusOK {
		rs.client.countServed(endpoint)
		return
	}
	metricClientRequests.WithLabelValues(rs.client.name, endpoint, strconv.Itoa(code)).Inc()
}

// setOutcome records the status of an answer whose HTTP status was sent
// before the outcome was known (a stream that ends with an error event),
// as caddy_zimage_requests_total counts it.
func setOutcome(w http.ResponseWriter, code int) {
	if rs, ok := w.(*requestState); ok {
		rs.code = code
	}
}

// admitSlots takes the client slots of n images the request does not hold
// yet (an upload took one before its body was read), and reports how many
// it took; the pipeline's admit step calls it.
func (a *admission) admitSlots(ctx context.Context, n int) (int, *apiError) {
	if a.client.lim == nil {
		return 0, nil
	}
	c := a.client
	need := max(0, n-a.held)
	limMu.Lock()
	limit := c.lim.limitLocked()
	// slots are taken without a limit too: a reload that sets one counts
	// the requests already running
	ok := (limit == 0 || n <= limit) && (need == 0 || c.lim.takeLocked(need))
	limMu.Unlock()
	busy := &apiError{status: http.StatusTooManyRequests, typ: "rate_limit_error", code: "rate_limit_exceeded", retryAfter: clientRetryAfter,
		message: fmt.Sprintf("Client '%s' already runs its limit of %d generations at once; retry when one has finished", c.name, limit)}
	switch {
	case limit > 0 && n > limit:
		return 0, invalidRequest("n", fmt.Sprintf("n=%d is more than the %d generations client '%s' may run at once", n, limit, c.name))
	case !ok:
		return 0, busy
	}
	a.held += need
	// across a cluster, the same limit holds for all instances together
	if c.shared != nil && limit > 0 && need > 0 {
		l, ok := c.shared.acquire(ctx, limit, need, a.lease)
		if !ok {
			// the lease has none of them: only the local slots go back
			a.held -= need
			c.lim.release(need)
			return 0, busy
		}
		a.lease = l
	}
	return need, nil
}

// giveBackSlots gives back n client slots taken by admitSlots.
func (a *admission) giveBackSlots(n int) {
	if n <= 0 {
		return
	}
	a.held -= n
	a.client.lim.release(n)
	if a.lease != nil {
		a.lease.shrink(n)
	}
}

// Interface guard
var _ http.ResponseWriter = (*requestState)(nil)
