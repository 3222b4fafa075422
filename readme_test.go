package zimage

import (
	"encoding/json"
	"fmt"
	"os"
	"reflect"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
)

// TestUnitReadmeJSONMatchesCaddyfile keeps the README's promise that its
// JSON config and the Caddyfile block under it are the same handler.
func TestUnitReadmeJSONMatchesCaddyfile(t *testing.T) {
	t.Parallel()
	raw, err := os.ReadFile("README.md")
	if err != nil {
		t.Fatal(err)
	}
	_, section, ok := strings.Cut(string(raw), "## JSON config")
	if !ok {
		t.Fatal("README has no JSON config section")
	}
	jsonBlock := fenced(t, section, "```json\n")
	caddyBlock := fenced(t, section, "```caddy\n")

	var fromJSON Gateway
	if err := json.Unmarshal([]byte(jsonBlock), &fromJSON); err != nil {
		t.Fatalf("README JSON: %v", err)
	}
	var fromCaddyfile Gateway
	if err := fromCaddyfile.UnmarshalCaddyfile(caddyfile.NewTestDispenser(gatewayOfSite(t, caddyBlock))); err != nil {
		t.Fatalf("README Caddyfile: %v", err)
	}
	if !reflect.DeepEqual(fromJSON, fromCaddyfile) {
		a, _ := json.Marshal(fromJSON)
		b, _ := json.Marshal(fromCaddyfile)
		t.Errorf("README's JSON and Caddyfile differ:\njson      %s\ncaddyfile %s", a, b)
	}
	if fromJSON.Upstream == nil || fromJSON.Enhance == nil || len(fromJSON.Models) != 1 {
		t.Errorf("README JSON lost its blocks: %+v", fromJSON)
	}
}

// gatewayOfSite is the zimage_gateway directive of a README site block
// (docs/design.md#how-it-is-tested: fragments are shown inside a site), for UnmarshalCaddyfile.
func gatewayOfSite(t *testing.T, site string) string {
	t.Helper()
	i := strings.Index(site, "zimage_gateway")
	end := strings.LastIndex(strings.TrimRight(site, "\n"), "\n}")
	if i < 0 || end < i {
		t.Fatalf("no zimage_gateway in a site block:\n%s", site)
	}
	return site[i:end]
}

// fenced returns the first code block after the fence opener.
func fenced(t *testing.T, s, opener string) string {
	t.Helper()
	_, rest, ok := strings.Cut(s, opener)
	if !ok {
		t.Fatalf("no %q block", strings.TrimSpace(opener))
	}
	block, _, ok := strings.Cut(rest, "```")
	if !ok {
		t.Fatalf("unterminated %q block", strings.TrimSpace(opener))
	}
	return block
}

// TestUnitReadmeProductionExample: the production Caddyfile adapts, sets
// the server timeouts the README recommends, and keeps its keys as
// placeholders.
func TestUnitReadmeProductionExample(t *testing.T) {
	t.Parallel()
	raw, err := os.ReadFile("README.md")
	if err != nil {
		t.Fatal(err)
	}
	_, section, ok := strings.Cut(string(raw), "## Running it in production")
	if !ok {
		t.Fatal("README has no production section")
	}
	cfg := unitAdapt(t, fenced(t, section, "```caddy\n"))
	var c struct {
		Apps struct {
			HTTP struct {
				Servers map[string]struct {
					ReadTimeout       caddy.Duration `json:"read_timeout"`
					ReadHeaderTimeout caddy.Duration `json:"read_header_timeout"`
					WriteTimeout      caddy.Duration `json:"write_timeout"`
				} `json:"servers"`
			} `json:"http"`
		} `json:"apps"`
	}
	if err := json.Unmarshal(cfg, &c); err != nil {
		t.Fatal(err)
	}
	if len(c.Apps.HTTP.Servers) == 0 {
		t.Fatalf("no servers in %s", cfg)
	}
	for name, srv := range c.Apps.HTTP.Servers {
		if srv.ReadTimeout <= 0 || srv.ReadHeaderTimeout <= 0 || srv.WriteTimeout != 0 {
			t.Errorf("server %s: read_body %v, read_header %v, write %v: want both read timeouts and no write timeout",
				name, time.Duration(srv.ReadTimeout), time.Duration(srv.ReadHeaderTimeout), time.Duration(srv.WriteTimeout))
		}
	}
	if !strings.Contains(string(cfg), `{env.GATEWAY_API_KEY}`) || !strings.Contains(string(cfg), `{env.SD_API_KEY}`) {
		t.Errorf("the production example's keys are not {env.*} placeholders: %s", cfg)
	}
}

// TestUnitReadmeEditsExample: the README's edit model block parses into an
// edit model with the store on.
func TestUnitReadmeEditsExample(t *testing.T) {
	t.Parallel()
	raw, err := os.ReadFile("README.md")
	if err != nil {
		t.Fatal(err)
	}
	_, section, ok := strings.Cut(string(raw), "### Image edits")
	if !ok {
		t.Fatal("README has no image edits section")
	}
	var g Gateway
	if err := g.UnmarshalCaddyfile(caddyfile.NewTestDispenser(gatewayOfSite(t, fenced(t, section, "```caddy\n")))); err != nil {
		t.Fatal(err)
	}
	if len(g.Models) != 2 || !g.Models[1].Edit || g.Models[0].Edit || g.Store == nil {
		t.Errorf("README edits example: %+v", g)
	}
}

// readmeBlocks returns every code block of the README fenced with the
// given info string, with the line its fence opens on.
func readmeBlocks(t *testing.T, info string) (blocks []string, lines []int, before []string) {
	t.Helper()
	raw, err := os.ReadFile("README.md")
	if err != nil {
		t.Fatal(err)
	}
	all := strings.Split(string(raw), "\n")
	for i := 0; i < len(all); i++ {
		if all[i] != "```"+info {
			continue
		}
		start := i
		var b strings.Builder
		for i++; i < len(all) && all[i] != "```"; i++ {
			b.WriteString(all[i] + "\n")
		}
		blocks = append(blocks, b.String())
		lines = append(lines, start+1)
		// the prose before the block, back to the previous block
		from := start - 1
		for from > 0 && !strings.HasPrefix(all[from], "```") {
			from--
		}
		before = append(before, strings.Join(all[from+1:start], "\n"))
	}
	return blocks, lines, before
}

// readmeComment is a Caddyfile comment, which may name a <placeholder>.
var readmeComment = regexp.MustCompile(`(?m)(^|\s)#.*$`)

// readmeStandIns are the plugins README blocks may use (docs/design.md#how-it-is-tested): each
// directive is adapted through a stand-in registered in the test binary
// (clients_test.go), and the prose before its block must name the plugin.
var readmeStandIns = map[string]string{
	"rate_limit": "mholt/caddy-ratelimit",
}

// TestUnitReadmeCaddyfilesAdapt (docs/design.md#how-it-is-tested): every block
// fenced as ```caddy in the README adapts as written, whole (a fragment is
// shown inside a site block), with no `…`; a block that needs a plugin
// says so before it. Syntax references with <placeholders> are fenced as
// plain text. Blocks added later are picked up by the same loop.
func TestUnitReadmeCaddyfilesAdapt(t *testing.T) {
	t.Parallel()
	blocks, lines, before := readmeBlocks(t, "caddy")
	if len(blocks) < 8 {
		t.Fatalf("only %d caddy blocks found in the README", len(blocks))
	}
	for i, src := range blocks {
		t.Run(fmt.Sprintf("line %d", lines[i]), func(t *testing.T) {
			if strings.Contains(src, "…") || strings.Contains(src, "...") {
				t.Errorf("the block contains an ellipsis, which Caddy does not read:\n%s", src)
			}
			if code := readmeComment.ReplaceAllString(src, ""); regexp.MustCompile(`<[a-z][^>]*>`).MatchString(code) {
				t.Errorf("the block has <placeholders>: fence a syntax reference as text:\n%s", src)
			}
			for directive, plugin := range readmeStandIns {
				if regexp.MustCompile(`(?m)^\s*`+directive+`\b`).MatchString(src) && !strings.Contains(before[i], plugin) {
					t.Errorf("the block uses %s, but the prose before it does not say it needs %s", directive, plugin)
				}
			}
			cfg := unitAdapt(t, src)
			if !strings.Contains(string(cfg), `"zimage_gateway"`) && !strings.Contains(src, "reverse_proxy") {
				t.Errorf("the block has no zimage_gateway handler: %s", cfg)
			}
		})
	}
	// the syntax reference is text, and still the whole syntax
	texts, _, _ := readmeBlocks(t, "text")
	found := false
	for _, b := range texts {
		found = found || strings.HasPrefix(b, "zimage_gateway [<matcher>] {")
	}
	if !found {
		t.Error("the README's Caddyfile syntax reference is not fenced as text")
	}
}

// TestUnitEditModelHintAdapts: the Caddyfile an error shows to add an edit
// model (edits.go) adapts inside a gateway and makes an edit model.
func TestUnitEditModelHintAdapts(t *testing.T) {
	t.Parallel()
	src := "localhost {\n\tzimage_gateway {\n\t\tapi_key {env.GATEWAY_API_KEY}\n\t\tupstream demo\n\t\tstore\n" +
		"\t\tmodel Z-Image\n\t\t" + strings.ReplaceAll(editModelHint, "\n", "\n\t\t") + "\n\t}\n}\n"
	var g Gateway
	if err := json.Unmarshal(unitFindHandler(t, unitAdapt(t, src), "zimage_gateway"), &g); err != nil {
		t.Fatal(err)
	}
	if len(g.Models) != 2 || !g.Models[1].Edit || g.Models[1].ModelIndex == nil || *g.Models[1].ModelIndex != 19 {
		t.Errorf("the hint's model: %+v", g.Models)
	}
	var h Gateway
	if _, e := h.editModel("Z-Image"); e == nil || !strings.Contains(e.message, editModelHint) {
		t.Errorf("the error does not show the hint: %v", e)
	}
}
