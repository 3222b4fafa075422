#!/usr/bin/env bash
# bench/instr.sh: user-space instructions per chat request of Caddy, gateway
# (no-enhance) and reverse_proxy, counted by valgrind's callgrind. Unlike CPU
# time, the count does not move when other work shares the machine, so it
# compares two builds on a busy machine. It leaves out the
# kernel's part (the same system calls on both sides: bench/README.md).
#
#   CADDY_BIN=/tmp/caddy N=2000 bench/instr.sh
#
# Each contender is run twice, with a fixed warm-up and then 0 or N requests;
# the difference over N is per request. Needs valgrind and bench/.out/{fake,load}
# (bench/run.sh builds them). About 1 min per 1,000 requests.
set -euo pipefail
cd "$(dirname "$0")/.."
N=${N:-2000}
BASE_PORT=${BASE_PORT:-18880}
: "${CADDY_BIN:?set CADDY_BIN to a Caddy built with this module}"
OUT=$PWD/bench/.out/instr
FAKE=$BASE_PORT GW=$((BASE_PORT + 1)) PX=$((BASE_PORT + 3)) ADMIN=$((BASE_PORT + 19))
BODY='{"model":"Z-Image","messages":[{"role":"user","content":"a cat no-enhance"}]}'
mkdir -p "$OUT"
cat >"$OUT/Caddyfile" <<CF
{
	admin localhost:$ADMIN
	persist_config off
	auto_https off
	grace_period 1s
}
http://:$GW {
	bind 127.0.0.1
	zimage_gateway {
		api_key sk-bench
		upstream http://127.0.0.1:$FAKE/api/v1/generate_image {
			api_key sd-bench
		}
		enhance off
	}
}
http://:$PX {
	bind 127.0.0.1
	rewrite * /api/v1/generate_image
	reverse_proxy 127.0.0.1:$FAKE {
		header_up Authorization "Bearer sd-bench"
		transport http {
			keepalive_idle_conns 4096
			keepalive_idle_conns_per_host 4096
		}
	}
}
CF
load() { bench/.out/load -url "http://127.0.0.1:$1/v1/chat/completions" -expect img.example/x.png \
	-body "$BODY" -header "Authorization: Bearer sk-bench" -c 8 -timeout 60s -n "$2" >/dev/null; }

# count PORT N: instructions of a whole Caddy run that serves the warm-up, then N requests at PORT
count() {
	bench/.out/fake -addr "127.0.0.1:$FAKE" -delay 0 >"$OUT/fake.log" 2>&1 &
	local fake=$! caddy
	# Go's asynchronous preemption signals trip callgrind
	GODEBUG=asyncpreemptoff=1 HOME=$OUT/home valgrind --tool=callgrind --callgrind-out-file="$OUT/callgrind.out" \
		"$CADDY_BIN" run --config "$OUT/Caddyfile" --adapter caddyfile >"$OUT/caddy.log" 2>&1 &
	caddy=$!
	for _ in $(seq 120); do curl -fs -o /dev/null "localhost:$ADMIN/config/" && break; sleep 1; done
	load "$GW" 200
	load "$PX" 200
	[ "$2" -gt 0 ] && load "$1" "$2"
	curl -fs -X POST "localhost:$ADMIN/stop" >/dev/null
	wait "$caddy" || true
	kill "$fake"
	wait "$fake" 2>/dev/null || true
	awk '/^summary:/ {print $2}' "$OUT/callgrind.out"
}

per() { echo $((($(count "$1" "$N") - $(count "$1" 0)) / N)); }
gw=$(per "$GW")
px=$(per "$PX")
echo "instructions per request: gateway chat $gw, reverse_proxy $px, ratio $(awk -v a="$gw" -v b="$px" 'BEGIN {printf "%.3f", a / b}') ($N requests, $CADDY_BIN)"
