package zimage

// Many upstream accounts (docs/design.md#accounts): the account blocks of the
// upstream config, their Caddyfile parsing and their checks and keys at
// Provision. The pool they become and the choice of an account are in
// account_pool.go, failover and rests in failover.go, points in points.go.

import (
	"errors"
	"fmt"
	"math"
	"regexp"
	"strconv"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
)

// defaultAccount names the account of a single upstream api_key.
const defaultAccount = "default"

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
