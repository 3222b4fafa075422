// Command caddy is Caddy with its standard modules and zimage_gateway, for
// trying the gateway with `go run ./cmd/caddy run --config Caddyfile.example`
// and for the benchmarks. Production builds use
// `xcaddy build --with github.com/caddy-zimage/caddy-zimage`.
package main

import (
	caddycmd "github.com/caddyserver/caddy/v2/cmd"

	_ "github.com/caddyserver/caddy/v2/modules/standard"

	_ "github.com/caddy-zimage/caddy-zimage"
)

func main() {
	caddycmd.Main()
}
