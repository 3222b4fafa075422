package zimage

import (
	"encoding/json"
	"os"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
)

// TestUnitReadmeJSONMatchesCaddyfile keeps the README's promise that its
// JSON config and the Caddyfile block under it are the same handler.
func TestUnitReadmeJSONMatchesCaddyfile(t *testing.T) {
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
	if err := fromCaddyfile.UnmarshalCaddyfile(caddyfile.NewTestDispenser(caddyBlock)); err != nil {
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
// placeholders (issue 8, items 10 and 12).
func TestUnitReadmeProductionExample(t *testing.T) {
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
	raw, err := os.ReadFile("README.md")
	if err != nil {
		t.Fatal(err)
	}
	_, section, ok := strings.Cut(string(raw), "### Image edits")
	if !ok {
		t.Fatal("README has no image edits section")
	}
	var g Gateway
	if err := g.UnmarshalCaddyfile(caddyfile.NewTestDispenser(fenced(t, section, "```caddy\n"))); err != nil {
		t.Fatal(err)
	}
	if len(g.Models) != 2 || !g.Models[1].Edit || g.Models[0].Edit || g.Store == nil {
		t.Errorf("README edits example: %+v", g)
	}
}
