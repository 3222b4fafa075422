//go:build unix

package zimage

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"testing"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
)

// BenchmarkCoordination is the cost per request of what `coordination`
// adds: one generation's admission (a quota reservation and a client
// slot), its account slot and their release, with the image service
// answering at once, alone and through a Redis on loopback (the round
// trips are the difference). bench/coordination.sh runs it.
func BenchmarkCoordination(b *testing.B) {
	for _, mode := range []string{"local", "redis"} {
		b.Run(mode, func(b *testing.B) {
			coord := ""
			if mode == "redis" {
				coord = "coordination redis " + startRedis(b).url()
			}
			cfg := fmt.Sprintf(`zimage_gateway {
				client alice {
					key %s
					max_concurrent 8
					quota 1000000000 images per day
				}
				upstream demo {
					max_concurrent 8
				}
				enhance off
				store {
					storage file_system %s
				}
				%s
			}`, testAliceKey, b.TempDir(), coord)
			var g Gateway
			if err := g.UnmarshalCaddyfile(caddyfile.NewTestDispenser(cfg)); err != nil {
				b.Fatal(err)
			}
			raw, _ := json.Marshal(g)
			g = Gateway{}
			_ = json.Unmarshal(raw, &g)
			ctx, cancel := caddy.NewContext(caddy.Context{Context: context.Background()})
			defer cancel()
			if err := g.Provision(ctx); err != nil {
				b.Fatal(err)
			}
			defer g.Cleanup()
			c := g.clients.clients[0]
			ok := func(context.Context, *account) (upstreamResult, *upstreamError) { return upstreamResult{}, nil }
			b.ReportAllocs()
			b.ResetTimer()
			for b.Loop() {
				req := httptest.NewRequest(http.MethodPost, "/v1/images/generations", nil)
				rs := &requestState{ResponseWriterWrapper: caddyhttp.ResponseWriterWrapper{ResponseWriter: httptest.NewRecorder()}, client: c, adm: admission{client: c}}
				if e := rs.adm.admit(req.Context(), 1); e != nil {
					b.Fatal(e)
				}
				if _, _, err := g.accounts.run(req.Context(), ok); err != nil {
					b.Fatal(err)
				}
				rs.adm.made()
				rs.finish(endpointImages)
			}
		})
	}
}
