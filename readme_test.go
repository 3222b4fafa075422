package zimage

import (
	"encoding/json"
	"os"
	"reflect"
	"strings"
	"testing"

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
