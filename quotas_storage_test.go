package zimage

// Quota counts kept in storage outlive a crash: the next Caddy on the same
// storage goes on from the count the first one wrote.

import (
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestQuotaRestartKeepsCounts: a Caddy that made two of alice's three
// images and then crashed (killed once its count was written, which
// happens within a second) leaves the count in the storage, and the next
// Caddy on that storage goes on from it.
func TestQuotaRestartKeepsCounts(t *testing.T) {
	if testing.Short() {
		t.Skip("builds and runs two Caddy processes")
	}
	bin := buildCaddy(t)
	up := newFakeUpstream(t)
	shared := t.TempDir()
	site := fmt.Sprintf(`	zimage_gateway {
		client alice {
			key %s
			quota 3 images per day
		}
		quota_timezone UTC
		upstream %s {
			api_key %s
		}
		enhance off
		store {
			storage file_system %s
		}
	}`, testClientKey, up.endpoint(), testSDKey, shared)
	ctx := t.Context()
	one := startCaddyProcess(t, bin, t.TempDir(), "instance-1", site)
	if r := one.generate(ctx, testClientKey, `{"prompt":"two","n":2}`); r.status != 200 {
		t.Fatalf("n=2 on instance 1: %d %v %s", r.status, r.err, r.body)
	}
	saved := filepath.Join(shared, "zimage", "quotas", "alice.json")
	waitFor(t, "alice's count in the storage", func() bool {
		b, _ := os.ReadFile(saved)
		return strings.Contains(string(b), `"used":2`)
	})
	one.kill()

	two := startCaddyProcess(t, bin, t.TempDir(), "instance-2", site)
	if u := two.usage(t, testClientKey); len(u.Quotas) != 1 || u.Quotas[0].Used != 2 {
		t.Errorf("usage on the next instance: %+v, want 2 used", u)
	}
	if r := two.generate(ctx, testClientKey, `{"prompt":"two more","n":2}`); r.status != http.StatusTooManyRequests {
		t.Errorf("2 more after the restart: %d %s, want 429", r.status, r.body)
	}
	if r := two.generate(ctx, testClientKey, `{"prompt":"the last"}`); r.status != 200 {
		t.Errorf("the third image: %d %s", r.status, r.body)
	}
}
