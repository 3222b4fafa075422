package zimage

// `caddy zimage-models` (docs/design.md#model-identity): the service's model_index is a
// position in its web page's model menu, and the menu moves. This
// subcommand prints today's menu, index → model_name → points_used, from
// one smallest generation per index, so an operator can set model_index
// (and upstream_name) from facts. Each index costs a generation: without
// --yes it only says what it would do.

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"os/signal"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/caddyserver/caddy/v2"
	caddycmd "github.com/caddyserver/caddy/v2/cmd"
)

func init() {
	caddycmd.RegisterCommand(caddycmd.Command{
		Name:  "zimage-models",
		Usage: "[--config <path> [--adapter <name>]] [--upstream <url>|demo] [--from <n>] [--to <n>] [--steps <n>] [--yes]",
		Short: "Lists the image service's model menu (model_index → model_name)",
		Long: `
Prints the 梦羽 image service's model menu as it is today: for each
model_index from --from to --to (default 0 to 24) it makes one generation
with the smallest request (64×64, a fixed prompt and seed) and prints the
index, the model_name the service answered and the points_used, or why
that index failed. Use it to set model_index and upstream_name of the
zimage_gateway's model blocks: the menu moves.

Every index costs a generation on the account. Without --yes nothing is
called: the command prints what it would do and how many generations that
is.

--config
    A Caddyfile or JSON config: the upstream URL, the key (of the first
    account) and forward_proxy_url of its first zimage_gateway handler are
    used. Without it: SD_API_KEY and the public endpoint (or --upstream).

--adapter
    The config adapter for --config, as for caddy run. Default: caddyfile
    for a file named Caddyfile* or *.caddyfile, else json.

--upstream
    The generate_image URL, or demo for the built-in menu of the demo
    upstream (offline, no key).

Every index is tried; a failure is printed in its row. The exit status is
0 when at least one index answered, 1 when every index failed or the
setup is wrong. No key is ever printed.`,
		CobraFunc: func(cmd *cobra.Command) {
			cmd.Flags().StringP("config", "c", "", "Caddyfile or JSON config whose first zimage_gateway handler names the upstream")
			cmd.Flags().StringP("adapter", "a", "", "Name of the config adapter for --config")
			cmd.Flags().String("upstream", "", "The generate_image URL, or demo")
			cmd.Flags().Int("from", discoverFrom, "First model_index")
			cmd.Flags().Int("to", discoverTo, "Last model_index")
			cmd.Flags().Int("steps", 0, "Sampling steps (default: the config's first model's, else 8)")
			cmd.Flags().BoolP("yes", "y", false, "Make the generations (each costs points)")
			// not caddycmd.WrapCommandFuncForCobra: it logs the error as a
			// JSON log line, and this command's errors are read by a
			// person at a terminal, as plain lines beside its table
			cmd.RunE = func(cmd *cobra.Command, _ []string) error {
				fs := caddycmd.Flags{FlagSet: cmd.Flags()}
				ctx, stop := signal.NotifyContext(cmd.Context(), os.Interrupt)
				defer stop()
				_, err := runZimageModels(ctx, discoverOptions{
					config: fs.String("config"), adapter: fs.String("adapter"), upstream: fs.String("upstream"),
					from: fs.Int("from"), to: fs.Int("to"), steps: fs.Int("steps"), yes: fs.Bool("yes"),
				}, cmd.OutOrStdout())
				if err != nil {
					// the exit status is 1 (Caddy's main exits 1 on any
					// error), and cobra prints neither "Error:" nor the usage
					cmd.SilenceErrors, cmd.SilenceUsage = true, true
					fmt.Fprintln(cmd.ErrOrStderr(), err.Error())
				}
				return err
			}
		},
	})
}

// The discovery request: the smallest the service takes, always the same,
// so that rows of different days compare (a seed of 0 fails there).
const (
	discoverFrom    = 0
	discoverTo      = 24
	discoverSide    = minSide // 64
	discoverSeed    = 20251205
	discoverPrompt  = "a red apple on a white table"
	discoverMaxSpan = 100 // indexes in one run: each one costs
)

// discoverOptions are the command's flags.
type discoverOptions struct {
	config, adapter, upstream string
	from, to, steps           int
	yes                       bool
}

// discoverTarget is the upstream the command asks, resolved from the
// config, the flags and the environment.
type discoverTarget struct {
	url     string // the generate_image URL, or demoUpstream
	key     string
	account string // the account's name, for the plan
	source  string // where the key came from, for the plan
	proxy   *url.URL
	steps   int
	timeout time.Duration
	secrets []string // scrubbed from everything printed
}

// runZimageModels is the command: the plan, and with yes the table. It
// returns the exit status beside the error for its tests; the command
// itself exits 1 on any error, as Caddy's main does.
func runZimageModels(ctx context.Context, o discoverOptions, out io.Writer) (int, error) {
	if o.from < 0 || o.to < o.from || o.to-o.from >= discoverMaxSpan {
		return caddy.ExitCodeFailedStartup, fmt.Errorf("zimage-models: --from and --to must give 0 ≤ from ≤ to and at most %d indexes, got %d…%d", discoverMaxSpan, o.from, o.to)
	}
	t, err := discoverTargetFrom(o)
	if err != nil {
		return caddy.ExitCodeFailedStartup, err
	}
	sc := newScrubber(t.secrets)
	n := o.to - o.from + 1
	where := "the demo upstream's built-in menu (nothing leaves this machine)"
	if t.url != demoUpstream {
		where = fmt.Sprintf("%s with the key of account %s (%s)", redactURL(t.url), t.account, t.source)
		if t.proxy != nil {
			where += " through the forward proxy " + redactURL(t.proxy.String())
		}
	}
	fmt.Fprintln(out, sc.Replace(fmt.Sprintf("zimage-models: %d generations, model_index %d…%d, each %d×%d, %d steps, seed %d, prompt %q, at %s.",
		n, o.from, o.to, discoverSide, discoverSide, t.steps, discoverSeed, discoverPrompt, where)))
	if !o.yes {
		cost := "Each generation costs points on the account."
		if t.url == demoUpstream {
			cost = "The demo costs nothing."
		}
		fmt.Fprintf(out, "%s Nothing was called: run again with --yes to make the %d generations.\n", cost, n)
		return caddy.ExitCodeSuccess, nil
	}

	// one index at a time: an interrupt stops the spending after the call
	// in flight, and an account with a limit at the service is not asked
	// for every index at once
	probe := t.prober()
	fmt.Fprintf(out, "%5s  %-36s  %s\n", "index", "model_name", "points_used")
	answered := 0
	for i := o.from; i <= o.to; i++ {
		if ctx.Err() != nil {
			fmt.Fprintln(out, "interrupted")
			break
		}
		name, points, failure := probe(ctx, i)
		if failure != "" {
			// the service's own text, scrubbed and shortened like a log's
			fmt.Fprintf(out, "%5d  failed: %s\n", i, truncate(sc.Replace(failure), maxMismatchRunes))
			continue
		}
		answered++
		if name == "" {
			name = "(no model_name in the answer)"
		}
		fmt.Fprintf(out, "%5d  %-36s  %s\n", i, truncate(sc.Replace(name), maxMismatchRunes), points)
	}
	if answered == 0 {
		return caddy.ExitCodeFailedStartup, errors.New("zimage-models: no model_index answered; the failures are in the table")
	}
	return caddy.ExitCodeSuccess, nil
}

// prober makes one discovery generation: the model's name and the points
// it cost ("-" when not said), or the failure. It calls the image client
// directly, without the account pool: an index is asked once, with no
// retry or failover, since a retry would cost points twice and a failure
// is itself worth a row of the table.
func (t *discoverTarget) prober() func(ctx context.Context, i int) (name, points, failure string) {
	if t.url == demoUpstream {
		return func(_ context.Context, i int) (string, string, string) {
			name, p, failure := demoProbe(i)
			return name, strconv.FormatFloat(p, 'f', -1, 64), failure
		}
	}
	// a plain transport: calls made one at a time need none of the
	// gateway's connection pooling (newTransport)
	tr := &http.Transport{Proxy: http.ProxyFromEnvironment, TLSHandshakeTimeout: 10 * time.Second}
	if t.proxy != nil {
		tr.Proxy = http.ProxyURL(t.proxy)
	}
	// the key goes only where it was configured to go: the image client
	// follows no redirect
	ic, err := newImageClient(t.url, t.timeout, tr)
	if err != nil { // checked when the target was read; never here
		return func(context.Context, int) (string, string, string) { return "", "", err.Error() }
	}
	if t.proxy == nil {
		ic.proxyName = proxyNameEnvironment
	}
	return func(ctx context.Context, i int) (string, string, string) {
		ctx, cancel := context.WithTimeout(ctx, t.timeout)
		defer cancel()
		res, ue := ic.generate(ctx, t.key, upstreamRequest{
			Prompt: discoverPrompt, Width: discoverSide, Height: discoverSide, Steps: t.steps,
			CFG: defaultCFG, ModelIndex: i, Seed: discoverSeed,
		}, "")
		if ue != nil {
			return "", "", ue.kind + ": " + ue.message
		}
		points := "-"
		if res.info.hasPointsUsed {
			points = strconv.FormatFloat(res.info.pointsUsed, 'f', -1, 64)
		}
		return res.info.modelName, points, ""
	}
}

// discoverHandler is the part of a zimage_gateway handler's JSON the
// command reads. forward_proxy_url is read here from the raw config, so
// the command does not depend on the upstream's Go type.
type discoverHandler struct {
	Handler  string `json:"handler"`
	Upstream *struct {
		URL             string         `json:"url"`
		APIKey          string         `json:"api_key"`
		ForwardProxyURL string         `json:"forward_proxy_url"`
		Timeout         caddy.Duration `json:"timeout"`
		Accounts        []struct {
			Name   string `json:"name"`
			APIKey string `json:"api_key"`
		} `json:"accounts"`
	} `json:"upstream"`
	Models []struct {
		Steps int `json:"steps"`
	} `json:"models"`
	Routes []struct {
		Handle []json.RawMessage `json:"handle"`
	} `json:"routes"` // of a subroute
}

// discoverTargetFrom resolves the upstream: --config, then --upstream and
// the environment (SD_API_KEY). Errors name what to change and carry no
// key.
func discoverTargetFrom(o discoverOptions) (*discoverTarget, error) {
	// placeholders ({env.SD_API_KEY}) are resolved as Provision resolves
	// them, so a config's keys work here unchanged
	repl := caddy.NewReplacer()
	resolve := func(v string) string { return strings.TrimSpace(repl.ReplaceKnown(v, "")) }
	t := &discoverTarget{account: "default", timeout: defaultUpstreamTimeout, steps: defaultSteps}
	var proxy string
	if o.config != "" {
		h, err := firstGatewayHandler(o.config, o.adapter)
		if err != nil {
			return nil, err
		}
		if len(h.Models) > 0 && h.Models[0].Steps > 0 {
			t.steps = h.Models[0].Steps
		}
		if u := h.Upstream; u != nil {
			t.url = resolve(u.URL)
			t.key, t.source = resolve(u.APIKey), "from "+o.config
			if len(u.Accounts) > 0 {
				t.account, t.key = u.Accounts[0].Name, resolve(u.Accounts[0].APIKey)
			}
			proxy = resolve(u.ForwardProxyURL)
			if u.Timeout > 0 {
				t.timeout = time.Duration(u.Timeout)
			}
		}
	}
	if o.upstream != "" {
		t.url = o.upstream
	}
	if o.steps > 0 {
		t.steps = o.steps
	}
	if t.url == "" {
		t.url = defaultUpstreamURL
	}
	if strings.EqualFold(t.url, demoUpstream) {
		t.url = demoUpstream
		return t, nil
	}
	if t.key == "" {
		t.key, t.source = strings.TrimSpace(os.Getenv("SD_API_KEY")), "from SD_API_KEY"
	}
	t.secrets = []string{t.key}
	if proxy != "" {
		pu, err := url.Parse(proxy)
		if err != nil || (pu.Scheme != "http" && pu.Scheme != "https") || pu.Host == "" {
			// the value may carry the proxy's credentials: never echoed
			return nil, errors.New("zimage-models: forward_proxy_url in the config is not an http(s) URL; fix the upstream block's forward_proxy_url")
		}
		t.proxy = pu
		// scrubbed as proxySecrets does: the password, and user:password
		// (the Proxy-Authorization header's content before base64)
		if pw, ok := pu.User.Password(); ok {
			t.secrets = append(t.secrets, pw)
		}
		if pu.User != nil {
			t.secrets = append(t.secrets, pu.User.String())
		}
	}
	if t.key == "" {
		return nil, errors.New("zimage-models: no upstream key: set SD_API_KEY, or give --config with a zimage_gateway whose upstream has an api_key (or an account), or use --upstream demo")
	}
	if u, err := url.Parse(t.url); err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
		return nil, fmt.Errorf("zimage-models: the upstream URL %s is not an http(s) URL; fix --upstream or the upstream block", newScrubber(t.secrets).Replace(redactURL(t.url)))
	}
	return t, nil
}

// firstGatewayHandler finds the first zimage_gateway handler of a config:
// servers in name order, routes in order, subroutes entered. The config is
// read and adapted as `caddy run` reads it (caddycmd.LoadConfig: the
// adapter named, else by the file's name, else JSON), so any config Caddy
// runs is one this command reads.
func firstGatewayHandler(path, adapter string) (*discoverHandler, error) {
	body, _, _, err := caddycmd.LoadConfig(path, adapter)
	if err != nil {
		return nil, fmt.Errorf("zimage-models: reading --config: %v", err)
	}
	var cfg struct {
		Apps struct {
			HTTP struct {
				Servers map[string]struct {
					Routes []struct {
						Handle []json.RawMessage `json:"handle"`
					} `json:"routes"`
				} `json:"servers"`
			} `json:"http"`
		} `json:"apps"`
	}
	if err := json.Unmarshal(body, &cfg); err != nil {
		return nil, fmt.Errorf("zimage-models: reading %s as JSON: %v", path, err)
	}
	names := make([]string, 0, len(cfg.Apps.HTTP.Servers))
	for n := range cfg.Apps.HTTP.Servers {
		names = append(names, n)
	}
	// a map's order changes from run to run: sorted, the same config
	// always names the same handler
	sort.Strings(names)
	var find func(handles []json.RawMessage) *discoverHandler
	find = func(handles []json.RawMessage) *discoverHandler {
		for _, raw := range handles {
			var h discoverHandler
			if json.Unmarshal(raw, &h) != nil {
				continue
			}
			switch h.Handler {
			case "zimage_gateway":
				return &h
			case "subroute":
				for _, r := range h.Routes {
					if found := find(r.Handle); found != nil {
						return found
					}
				}
			}
		}
		return nil
	}
	for _, n := range names {
		for _, r := range cfg.Apps.HTTP.Servers[n].Routes {
			if h := find(r.Handle); h != nil {
				return h, nil
			}
		}
	}
	return nil, fmt.Errorf("zimage-models: %s has no zimage_gateway handler", path)
}

// redactURL is a URL as printed: its user information (a proxy's or a
// relay's credentials) and its query (a relay may take a token there)
// are left out.
func redactURL(s string) string {
	u, err := url.Parse(s)
	if err != nil || u.Host == "" {
		return "(an unparsable URL)"
	}
	out := u.Scheme + "://"
	if u.User != nil {
		out += "…@"
	}
	out += u.Host + u.EscapedPath()
	if u.RawQuery != "" {
		out += "?…"
	}
	return out
}
