package zimage

import (
	"slices"
	"strconv"
	"strings"

	"github.com/dustin/go-humanize"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/caddyserver/caddy/v2/caddyconfig/httpcaddyfile"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
)

func init() {
	httpcaddyfile.RegisterHandlerDirective("zimage_gateway", parseCaddyfile)
	// it answers requests itself: order it first among the handlers that
	// respond (before respond, so a catch-all respond or reverse_proxy on the
	// same site does not hide the API), and a Caddyfile needs no `order` line
	httpcaddyfile.RegisterDirectiveOrder("zimage_gateway", httpcaddyfile.Before, "respond")
}

func parseCaddyfile(h httpcaddyfile.Helper) (caddyhttp.MiddlewareHandler, error) {
	g := new(Gateway)
	err := g.UnmarshalCaddyfile(h.Dispenser)
	return g, withoutModulePrefix(err)
}

// UnmarshalCaddyfile sets up the handler from Caddyfile tokens. Syntax:
//
//	zimage_gateway [<matcher>] {
//	    api_key <key> [<key>...]
//	    client <name> {
//	        key <key> [<key>...]
//	        max_concurrent <n>
//	        quota <n> images per hour|day|week|month
//	    }
//	    quota_timezone <IANA name>
//	    coordination redis <url> {
//	        lease_ttl <duration>
//	        key_prefix <prefix>
//	    }
//	    no_auth
//	    stream_keepalive <duration>
//	    max_body <size>
//	    max_prompt_length <n>
//	    image_hosts <host>[:<port>]|<scheme>://<host>[:<port>]...
//	    max_downloads <n>
//	    max_upload <size>
//	    max_upload_memory <size>
//	    upstream [<url>|demo] {
//	        api_key <key>
//	        account <name> {
//	            api_key <key>
//	            max_concurrent <n>
//	            low_points <n>
//	            points_rest <duration>
//	        }
//	        timeout <duration>
//	        max_concurrent <n>
//	        queue_timeout <duration>
//	        retries <n>
//	        forward_proxy_url <url>
//	        points_rest <duration>
//	    }
//	    enhance [off] {
//	        api_key <key>
//	        base_url <url>
//	        model <name>
//	        timeout <duration>
//	        system_prompt <text> | system_prompt_file <path>
//	    }
//	    store [off] {
//	        storage <module> [<args>] { … }
//	        prefix <key prefix>
//	        max_age <duration>
//	        max_image_size <size>
//	        public_url <url>
//	    }
//	    model <name> {
//	        alias <name>...
//	        model_index <n>
//	        steps <n>
//	        cfg <float>
//	        negative_prompt <text>
//	        edit
//	        upstream_name <name>
//	        on_mismatch warn|refuse
//	        default_response_format url|b64_json|both
//	    }
//	    list_aliases
//	    default_response_format url|b64_json|both
//	    playground [<path>]
//	    health [<path>]
//	}
//
// A key or URL written as {$VAR} that resolves to nothing counts as unset
// (its default applies), so those sub-directives accept no argument.
func (g *Gateway) UnmarshalCaddyfile(d *caddyfile.Dispenser) error {
	d.Next() // consume directive name
	if d.NextArg() {
		return d.ArgErr()
	}
	seen := map[string]bool{}
	once := func(name string) error {
		if seen[name] {
			return d.Errf("zimage_gateway: %s already specified", name)
		}
		seen[name] = true
		return nil
	}
	for nesting := d.Nesting(); d.NextBlock(nesting); {
		opt := d.Val()
		switch opt {
		case "api_key":
			g.APIKeys = append(g.APIKeys, d.RemainingArgs()...)
		case "no_auth":
			if d.NextArg() {
				return d.ArgErr()
			}
			g.NoAuth = true
		case "stream_keepalive":
			if err := once(opt); err != nil {
				return err
			}
			dur, err := parseDuration(d)
			if err != nil {
				return err
			}
			g.StreamKeepalive = dur
		case "max_body":
			if err := once(opt); err != nil {
				return err
			}
			n, err := parseByteSize(d, "1MiB")
			if err != nil {
				return err
			}
			g.MaxBody = n
		case "max_upload":
			if err := once(opt); err != nil {
				return err
			}
			n, err := parseByteSize(d, "20MiB")
			if err != nil {
				return err
			}
			g.MaxUpload = n
		case "max_upload_memory":
			if err := once(opt); err != nil {
				return err
			}
			n, err := parseByteSize(d, "40MiB")
			if err != nil {
				return err
			}
			g.MaxUploadMemory = n
		case "min_upload_rate":
			if err := once(opt); err != nil {
				return err
			}
			v, err := singleArg(d)
			if err != nil {
				return err
			}
			if v == "off" {
				g.MinUploadRate = -1
				continue
			}
			n, err := humanize.ParseBytes(strings.TrimSuffix(v, "/s"))
			if err != nil || n == 0 || n > 1<<30 {
				return d.Errf("zimage_gateway: invalid min_upload_rate '%s': want bytes a second such as 64KiB (or 64KiB/s), or off", v)
			}
			g.MinUploadRate = int64(n)
		case "max_prompt_length":
			if err := once(opt); err != nil {
				return err
			}
			n, err := parseInt(d, 1)
			if err != nil {
				return err
			}
			g.MaxPromptLength = n
		case "max_downloads":
			if err := once(opt); err != nil {
				return err
			}
			n, err := parseInt(d, maxImagesN)
			if err != nil {
				return err
			}
			g.MaxDownloads = n
		case "image_hosts":
			args := d.RemainingArgs()
			if len(args) == 0 {
				return d.ArgErr()
			}
			g.ImageHosts = append(g.ImageHosts, args...)
		case "upstream":
			if err := once(opt); err != nil {
				return err
			}
			u, err := unmarshalUpstream(d)
			if err != nil {
				return err
			}
			g.Upstream = u
		case "enhance":
			if err := once(opt); err != nil {
				return err
			}
			e, err := unmarshalEnhance(d)
			if err != nil {
				return err
			}
			g.Enhance = e
		case "store":
			if err := once(opt); err != nil {
				return err
			}
			s, err := unmarshalStore(d)
			if err != nil {
				return err
			}
			g.Store = s
		case "client":
			c, err := unmarshalClient(d, g.Clients)
			if err != nil {
				return err
			}
			g.Clients = append(g.Clients, c)
		case "model":
			m, err := unmarshalModel(d)
			if err != nil {
				return err
			}
			for _, other := range g.Models {
				if strings.EqualFold(other.Name, m.Name) {
					return d.Errf("zimage_gateway: duplicate model name '%s'", m.Name)
				}
			}
			g.Models = append(g.Models, m)
		case "list_aliases":
			if d.NextArg() {
				return d.ArgErr()
			}
			g.ListAliases = true
		case "default_response_format":
			if err := once(opt); err != nil {
				return err
			}
			v, err := singleArg(d)
			if err != nil {
				return err
			}
			if _, err := parseDefaultFormat(v); err != nil {
				return d.Errf("zimage_gateway: %v", err)
			}
			g.DefaultResponseFormat = v
		case "playground":
			if err := once(opt); err != nil {
				return err
			}
			p, err := unmarshalPlayground(d)
			if err != nil {
				return err
			}
			g.Playground = p
		case "quota_timezone":
			if err := once(opt); err != nil {
				return err
			}
			tz, err := singleArg(d)
			if err != nil {
				return err
			}
			g.QuotaTimezone = tz
		case "coordination":
			if err := once(opt); err != nil {
				return err
			}
			c, err := unmarshalCoordination(d)
			if err != nil {
				return err
			}
			g.Coordination = c
		case "health":
			if err := once(opt); err != nil {
				return err
			}
			h, err := unmarshalHealth(d)
			if err != nil {
				return err
			}
			g.Health = h
		case "responses_text":
			if err := once(opt); err != nil {
				return err
			}
			on, err := parseOnOff(d)
			if err != nil {
				return err
			}
			g.ResponsesText = &on
		default:
			return d.Errf("unrecognized zimage_gateway option '%s'", opt)
		}
	}
	return nil
}

// eachOption walks the sub-directives of a block, refusing any given twice
// unless it is one of the repeatable ones, and hands each to handle.
func eachOption(d *caddyfile.Dispenser, block string, handle func(opt string) error, repeatable ...string) error {
	seen := map[string]bool{}
	for nesting := d.Nesting(); d.NextBlock(nesting); {
		opt := d.Val()
		if seen[opt] && !slices.Contains(repeatable, opt) {
			return d.Errf("zimage_gateway: %s %s already specified", block, opt)
		}
		seen[opt] = true
		if err := handle(opt); err != nil {
			return err
		}
	}
	return nil
}

// singleArg reads exactly one argument.
func singleArg(d *caddyfile.Dispenser) (string, error) {
	if !d.NextArg() {
		return "", d.ArgErr()
	}
	v := d.Val()
	if d.NextArg() {
		return "", d.ArgErr()
	}
	return v, nil
}

// optionalArg reads zero or one argument: `api_key {$UNSET}` leaves no
// token behind, and docs/design.md#endpoints-and-errors says an empty value means "use the default".
func optionalArg(d *caddyfile.Dispenser) (string, error) {
	var v string
	if d.NextArg() {
		v = d.Val()
	}
	if d.NextArg() {
		return "", d.ArgErr()
	}
	return v, nil
}

func parseDuration(d *caddyfile.Dispenser) (caddy.Duration, error) {
	name := d.Val()
	s, err := singleArg(d)
	if err != nil {
		return 0, err
	}
	dur, err := caddy.ParseDuration(s)
	if err != nil || dur <= 0 {
		return 0, d.Errf("zimage_gateway: invalid %s '%s': want a positive duration such as 30s or 2m", name, s)
	}
	return caddy.Duration(dur), nil
}

// parseByteSize reads one size argument (1MiB, 500KB), from 1 byte to 1 GiB.
func parseByteSize(d *caddyfile.Dispenser, example string) (int64, error) {
	name := d.Val()
	s, err := singleArg(d)
	if err != nil {
		return 0, err
	}
	n, err := humanize.ParseBytes(s)
	if err != nil || n == 0 || n > 1<<30 {
		return 0, d.Errf("zimage_gateway: invalid %s '%s': want a size such as %s, up to 1GiB", name, s, example)
	}
	return int64(n), nil
}

func parseInt(d *caddyfile.Dispenser, min int) (int, error) {
	name := d.Val()
	s, err := singleArg(d)
	if err != nil {
		return 0, err
	}
	n, err := strconv.Atoi(s)
	if err != nil || n < min {
		return 0, d.Errf("zimage_gateway: invalid %s '%s': want a whole number of at least %d", name, s, min)
	}
	return n, nil
}

// Interface guard
var _ caddyfile.Unmarshaler = (*Gateway)(nil)

// parseOnOff reads the one argument of a switch: on or off.
func parseOnOff(d *caddyfile.Dispenser) (bool, error) {
	name := d.Val()
	v, err := singleArg(d)
	if err != nil {
		return false, err
	}
	switch v {
	case "on":
		return true, nil
	case "off":
		return false, nil
	}
	return false, d.Errf("zimage_gateway: %s: invalid value '%s': want on or off", name, v)
}
