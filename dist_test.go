package zimage

// The service unit of dist/ (docs/design.md#how-it-is-tested): it has the
// shape of Caddy's own caddy.service, and the config it names, shipped as
// dist/Caddyfile, adapts and provisions with the example environment.

import (
	"bufio"
	"encoding/json"
	"os"
	"path"
	"strings"
	"testing"

	"github.com/caddyserver/caddy/v2"
)

// systemdUnit reads the Key=value lines of a unit file (later ones append).
func systemdUnit(t *testing.T, name string) map[string][]string {
	t.Helper()
	f, err := os.Open(name)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	out := map[string][]string{}
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		if line == "" || line[0] == '#' || line[0] == '[' {
			continue
		}
		k, v, ok := strings.Cut(line, "=")
		if !ok {
			t.Fatalf("%s: not a Key=value line: %q", name, line)
		}
		out[k] = append(out[k], v)
	}
	return out
}

func TestUnitDistServiceUnit(t *testing.T) {
	unit := systemdUnit(t, "dist/caddy-zimage.service")
	one := func(k string) string {
		if len(unit[k]) != 1 {
			t.Fatalf("the unit has %d %s lines, want one", len(unit[k]), k)
		}
		return unit[k][0]
	}
	start, reload := strings.Fields(one("ExecStart")), strings.Fields(one("ExecReload"))
	flag := func(args []string, name string) string {
		for i, a := range args {
			if a == name && i+1 < len(args) {
				return args[i+1]
			}
		}
		return ""
	}
	// caddy run --config …; caddy reload --config … (the same file). No
	// --environ: it would print the keys of the environment into the journal
	if len(start) < 2 || path.Base(start[0]) != "caddy" || start[1] != "run" || strings.Contains(one("ExecStart"), "--environ") {
		t.Errorf("ExecStart %q, want caddy run --config … without --environ", one("ExecStart"))
	}
	config := flag(start, "--config")
	if len(reload) < 2 || reload[0] != start[0] || reload[1] != "reload" || flag(reload, "--config") != config || config == "" {
		t.Errorf("ExecReload %q, want %s reload --config %s", one("ExecReload"), start[0], config)
	}
	if one("Type") != "notify" || one("User") == "root" || one("User") == "" {
		t.Errorf("Type %q, User %q: want notify (caddy run tells systemd when it is ready) and a user of its own", one("Type"), one("User"))
	}
	// state under /var/lib, keys in the environment file, none in the unit
	if !strings.Contains(one("Environment"), "XDG_DATA_HOME=/var/lib/") || !strings.Contains(one("Environment"), "XDG_CONFIG_HOME=/var/lib/") || one("StateDirectory") == "" {
		t.Errorf("Environment %q, StateDirectory %q: want Caddy's data and config under /var/lib", one("Environment"), one("StateDirectory"))
	}
	envFile := one("EnvironmentFile")
	shipped := "dist/" + path.Base(envFile) + ".example"
	vars := map[string]string{}
	raw, err := os.ReadFile(shipped)
	if err != nil {
		t.Fatalf("the unit's EnvironmentFile %s is shipped as %s: %v", envFile, shipped, err)
	}
	for _, line := range strings.Split(string(raw), "\n") {
		if k, v, ok := strings.Cut(line, "="); ok && !strings.HasPrefix(line, "#") {
			vars[k] = v
		}
	}
	for _, k := range []string{"GATEWAY_API_KEY", "SD_API_KEY", "ZIMAGE_SITE"} {
		if vars[k] == "" {
			t.Errorf("%s does not set %s", shipped, k)
		}
	}

	// the config the unit names, shipped as dist/<name>, with the
	// environment file's variables (and nothing else of the test's)
	src, err := os.ReadFile("dist/" + path.Base(config))
	if err != nil {
		t.Fatalf("the unit's config %s is not shipped in dist/: %v", config, err)
	}
	unitClearEnv(t)
	for k, v := range vars {
		t.Setenv(k, v)
	}
	cfg := unitAdapt(t, string(src))
	for _, k := range []string{"GATEWAY_API_KEY", "SD_API_KEY"} {
		if strings.Contains(string(cfg), vars[k]) {
			t.Errorf("the adapted config carries the value of %s: keys belong in {env.*} placeholders", k)
		}
	}
	if !strings.Contains(string(cfg), `"`+vars["ZIMAGE_SITE"]+`"`) {
		t.Errorf("the site is not %s: %s", vars["ZIMAGE_SITE"], cfg)
	}
	// a path the gateway passes on gets a 404 that says so, never Caddy's
	// empty 200
	names := unitHandlerNames(cfg)
	if gi, ri := unitIndexOf(names, "zimage_gateway"), unitIndexOf(names, "static_response"); gi < 0 || ri < gi || !strings.Contains(string(cfg), `"status_code":404`) {
		t.Errorf("handlers %v: want the gateway, then a catch-all respond 404", names)
	}
	var g Gateway
	if err := json.Unmarshal(unitFindHandler(t, cfg, "zimage_gateway"), &g); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := caddy.NewContext(caddy.Context{Context: t.Context()})
	defer cancel()
	if err := g.Provision(ctx); err != nil {
		t.Fatalf("provisioning the unit's gateway: %v", err)
	}
	defer g.Cleanup()
	if g.health == nil || g.store == nil || !g.hasEditModel() {
		t.Errorf("the shipped config lacks health, the store or an edit model")
	}
}
