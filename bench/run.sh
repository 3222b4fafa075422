#!/usr/bin/env bash
# bench/run.sh: load benchmark of zimage_gateway against Caddy's own
# reverse_proxy / respond, on the same Caddy binary, the same fake upstream and
# the same machine, in one invocation. See bench/README.md.
#
#   bench/run.sh [throughput|burst|streams|store|all]     (default: throughput)
#
# throughput  ROUNDS alternating rounds of: gateway chat (no-enhance) vs
#             reverse_proxy, /v1/models vs respond, gateway chat with the
#             enhance round trip vs reverse_proxy. Medians and target ratios.
# burst       BURST simultaneous chat requests, fake image taking BURST_DELAY,
#             gateway vs reverse_proxy, each in a fresh Caddy process so the
#             peak RSS (VmHWM) is comparable.
# streams     STREAMS simultaneous streaming chat requests, fake image taking
#             STREAM_DELAY, gateway with stream_keepalive 5s.
# store       ROUNDS alternating rounds of: a stored IMAGE_SIZE image served by
#             the gateway's store vs Caddy's file_server on the same file, 200
#             and 304 (If-None-Match). Medians and target ratios.
#
# Caddy runs pinned to CPU $CADDY_CPU, the load generator and the fake upstream
# to CPU $LOAD_CPU, so Caddy's core does nothing but Caddy.
set -euo pipefail

MODE=${1:-throughput}
ROUNDS=${ROUNDS:-4}                 # throughput rounds (the targets want >= 4)
DURATION=${DURATION:-5s}            # per measurement
WARMUP=${WARMUP:-1s}                # per target, before round 1, not counted
CONC=${CONC:-32}                    # closed-loop concurrency (connections)
NOISE_MAX=${NOISE_MAX:-25}          # % of a core of other work that makes a measurement count as disturbed
RETRY=${RETRY:-3}                   # how often a disturbed measurement is repeated
QUIET_WAIT=${QUIET_WAIT:-30}        # seconds to wait for an idle machine before a repeat
BURST=${BURST:-2000}
BURST_DELAY=${BURST_DELAY:-2s}
BURST_ROUNDS=${BURST_ROUNDS:-2}     # alternating; each run is a fresh Caddy
PRECONNECT=${PRECONNECT:-1}         # burst/streams: open the connections before the clock starts (0: cold dials)
STREAMS=${STREAMS:-10000}
STREAM_DELAY=${STREAM_DELAY:-20s}
STREAM_KEEPALIVE=${STREAM_KEEPALIVE:-5s}
IMAGE_SIZE=${IMAGE_SIZE:-2000000}   # store mode: bytes of the stored image
BASE_PORT=${BASE_PORT:-18400}       # fake, gateway, enhance gateway, proxy, store, file_server: +0..+5
CADDY_CPU=${CADDY_CPU:-0}
LOAD_CPU=${LOAD_CPU:-1}
CADDY_LOG_LEVEL=${CADDY_LOG_LEVEL:-INFO}  # Caddy's default; the gateway pays for its log line
CADDY_BIN=${CADDY_BIN:-}            # use this binary instead of building ./cmd/caddy

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT=$ROOT/bench/.out
mkdir -p "$OUT"
CLK_TCK=$(getconf CLK_TCK)

FAKE_PORT=$BASE_PORT
GW_PORT=$((BASE_PORT + 1))
EN_PORT=$((BASE_PORT + 2))
PX_PORT=$((BASE_PORT + 3))
ST_PORT=$((BASE_PORT + 4))
FS_PORT=$((BASE_PORT + 5))
STORE_DIR=$OUT/store # the file_system storage of site (4), and file_server's root below it

KEY=sk-bench
CHAT_BODY='{"model":"Z-Image","messages":[{"role":"user","content":"a cat no-enhance"}]}'
ENHANCE_BODY='{"model":"Z-Image","messages":[{"role":"user","content":"a cat"}]}'
STREAM_BODY='{"model":"Z-Image","stream":true,"messages":[{"role":"user","content":"a cat no-enhance"}]}'
# what /v1/models answers, byte for byte the shape of the gateway's, for respond
MODELS_BODY='{"object":"list","data":[{"id":"Z-Image","object":"model","created":1700000000,"owned_by":"sd-exacg-gateway"}]}'
# both the gateway's markdown and the image service's JSON contain the image URL
EXPECT_IMAGE=img.example/x.png
EXPECT_MODELS='"Z-Image"'
# the enhance path counts only when the enhancement succeeded (the markdown says so),
# not when it silently degraded to the original prompt
EXPECT_ENHANCED='Enhanced Prompt'

PRE=()
[ "$PRECONNECT" = 1 ] && PRE=(-preconnect)

say() { printf '%s\n' "$*" >&2; }
die() { say "run.sh: $*"; exit 1; }

# --- pinning -----------------------------------------------------------------

PIN_CADDY=()
PIN_LOAD=()
if ! command -v taskset >/dev/null; then
	say "WARNING: taskset not found (util-linux): Caddy and the load generator are NOT pinned; numbers are noisier"
elif [ "$(nproc)" -lt 2 ]; then
	say "WARNING: only $(nproc) CPU: Caddy and the load generator share it; numbers are not comparable to a pinned run"
else
	PIN_CADDY=(taskset -c "$CADDY_CPU")
	PIN_LOAD=(taskset -c "$LOAD_CPU")
fi

# --- processes we start, and only those, are stopped on exit -----------------

FAKE_PID=
CADDY_PID=
SAMPLER_PID=
stop_pid() { # pid: TERM, wait, then KILL
	local pid=$1
	[ -n "$pid" ] || return 0
	kill "$pid" 2>/dev/null || return 0
	for _ in $(seq 50); do
		kill -0 "$pid" 2>/dev/null || { wait "$pid" 2>/dev/null || true; return 0; }
		sleep 0.1
	done
	kill -9 "$pid" 2>/dev/null || true
	wait "$pid" 2>/dev/null || true
}
cleanup() {
	stop_pid "$SAMPLER_PID"
	stop_pid "$CADDY_PID"
	stop_pid "$FAKE_PID"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_port() { # port pid what
	for _ in $(seq 200); do
		port_open "$1" && return 0
		kill -0 "$2" 2>/dev/null || return 1
		sleep 0.05
	done
	return 1
}

# --- build -------------------------------------------------------------------

build() {
	cd "$ROOT"
	if [ -z "$CADDY_BIN" ]; then
		[ -f cmd/caddy/main.go ] || die "cmd/caddy/main.go not found: the benchmark builds the repo's Caddy main (or set CADDY_BIN)"
		say "building caddy (./cmd/caddy) ..."
		go build -o "$OUT/caddy" ./cmd/caddy
		CADDY_BIN=$OUT/caddy
	fi
	go build -o "$OUT/fake" ./bench/fake
	go build -o "$OUT/load" ./bench/load
	# grep reads the whole list: with -q it would stop at the match, and
	# list-modules, killed by SIGPIPE, would fail the pipe (pipefail)
	"$CADDY_BIN" list-modules 2>/dev/null | grep -x 'http.handlers.zimage_gateway' >/dev/null ||
		die "$CADDY_BIN does not contain http.handlers.zimage_gateway"
}

# --- the Caddyfile: three sites, one binary ----------------------------------

write_caddyfile() {
	cat >"$OUT/Caddyfile" <<EOF
# written by bench/run.sh; do not edit
{
	admin off
	persist_config off
	auto_https off
	grace_period 1s
	log {
		level $CADDY_LOG_LEVEL
	}
}

# (1) the gateway, no enhancement
http://:$GW_PORT {
	bind 127.0.0.1
	zimage_gateway {
		api_key $KEY
		stream_keepalive $STREAM_KEEPALIVE
		upstream http://127.0.0.1:$FAKE_PORT/api/v1/generate_image {
			api_key sd-bench
		}
		enhance off
	}
}

# (2) the gateway with enhancement: fake LLM, then fake image service
http://:$EN_PORT {
	bind 127.0.0.1
	zimage_gateway {
		api_key $KEY
		stream_keepalive $STREAM_KEEPALIVE
		upstream http://127.0.0.1:$FAKE_PORT/api/v1/generate_image {
			api_key sd-bench
		}
		enhance {
			api_key llm-bench
			base_url http://127.0.0.1:$FAKE_PORT/v1
		}
	}
}

# (3) Caddy's own nearest equivalents: respond for /v1/models, reverse_proxy
# (the client's body passed to the image service with the service key) for chat
http://:$PX_PORT {
	bind 127.0.0.1
	handle /v1/models {
		header Content-Type application/json
		respond \`$MODELS_BODY\` 200
	}
	handle {
		rewrite * /api/v1/generate_image
		reverse_proxy 127.0.0.1:$FAKE_PORT {
			header_up Authorization "Bearer sd-bench"
			# Caddy's default keeps 32 idle upstream connections; give it as many
			# as the load has, so reverse_proxy is not handicapped by dialing
			transport http {
				keepalive_idle_conns 4096
				keepalive_idle_conns_per_host 4096
			}
		}
	}
}

# (4) the gateway's image store (file_system storage), and only that: the
# fake image service is never called on this site
http://:$ST_PORT {
	bind 127.0.0.1
	zimage_gateway {
		api_key $KEY
		upstream http://127.0.0.1:$FAKE_PORT/api/v1/generate_image {
			api_key sd-bench
		}
		enhance off
		store {
			storage file_system $STORE_DIR
			max_age 0
		}
	}
}

# (5) Caddy's own static file server on the store's image directory: the same file
http://:$FS_PORT {
	bind 127.0.0.1
	root * $STORE_DIR/zimage/images
	file_server
}
EOF
	"$CADDY_BIN" validate --config "$OUT/Caddyfile" --adapter caddyfile >"$OUT/validate.log" 2>&1 ||
		{ cat "$OUT/validate.log" >&2; die "the generated Caddyfile does not validate"; }
}

# --- processes ---------------------------------------------------------------

start_fake() { # delay
	stop_pid "$FAKE_PID"
	port_open "$FAKE_PORT" && die "port $FAKE_PORT is in use (set BASE_PORT)"
	"${PIN_LOAD[@]}" "$OUT/fake" -addr "127.0.0.1:$FAKE_PORT" -delay "$1" >"$OUT/fake.log" 2>&1 &
	FAKE_PID=$!
	wait_port "$FAKE_PORT" "$FAKE_PID" || { cat "$OUT/fake.log" >&2; die "the fake upstream did not start"; }
}

start_caddy() { # log name
	stop_pid "$CADDY_PID"
	CADDY_PID=
	for p in "$GW_PORT" "$EN_PORT" "$PX_PORT" "$ST_PORT" "$FS_PORT"; do
		port_open "$p" && die "port $p is in use (set BASE_PORT)"
	done
	# Caddy's storage and autosave stay under bench/.out
	HOME=$OUT/home XDG_DATA_HOME=$OUT/home/data XDG_CONFIG_HOME=$OUT/home/config \
		"${PIN_CADDY[@]}" "$CADDY_BIN" run --config "$OUT/Caddyfile" --adapter caddyfile >"$OUT/caddy-$1.log" 2>&1 &
	CADDY_PID=$!
	for p in "$GW_PORT" "$EN_PORT" "$PX_PORT" "$ST_PORT" "$FS_PORT"; do
		wait_port "$p" "$CADDY_PID" || { tail -20 "$OUT/caddy-$1.log" >&2; die "caddy did not start"; }
	done
}

# utime+stime of a process, in clock ticks (/proc/PID/stat fields 14 and 15,
# counted after the parenthesised command name)
cpu_ticks() { sed 's/^.*) //' "/proc/$1/stat" | awk '{print $12 + $13}'; }
# a /proc/PID/status field in kB (VmRSS, VmHWM)
mem_kb() { awk -v k="$2:" '$1 == k {print $2}' "/proc/$1/status"; }

# jget JSON FIELD: a number from load's flat JSON line
jget() { printf '%s' "$1" | sed -n "s/.*\"$2\":\([-0-9.e+]*\).*/\1/p"; }

# load URL EXPECT BODY [load flags...]: run the load generator on its core
load() {
	local url=$1 expect=$2 body=$3
	shift 3
	"${PIN_LOAD[@]}" "$OUT/load" -url "$url" -expect "$expect" -body "$body" \
		-header "Authorization: Bearer $KEY" "$@"
}

median() { sort -g | awk '{a[NR] = $1} END {if (NR == 0) print "nan"; else if (NR % 2) print a[(NR + 1) / 2]; else print (a[NR / 2] + a[NR / 2 + 1]) / 2}'; }

# --- throughput --------------------------------------------------------------

# target NAME: url, expected string, body and extra load flags of a target
target() {
	T_FLAGS=()
	case $1 in
	gw_chat) T_URL=http://127.0.0.1:$GW_PORT/v1/chat/completions T_EXPECT=$EXPECT_IMAGE T_BODY=$CHAT_BODY ;;
	px_chat | px_chat2) T_URL=http://127.0.0.1:$PX_PORT/v1/chat/completions T_EXPECT=$EXPECT_IMAGE T_BODY=$CHAT_BODY ;;
	gw_models) T_URL=http://127.0.0.1:$GW_PORT/v1/models T_EXPECT=$EXPECT_MODELS T_BODY= ;;
	px_respond) T_URL=http://127.0.0.1:$PX_PORT/v1/models T_EXPECT=$EXPECT_MODELS T_BODY= ;;
	gw_enhance) T_URL=http://127.0.0.1:$EN_PORT/v1/chat/completions T_EXPECT=$EXPECT_ENHANCED T_BODY=$ENHANCE_BODY ;;
	st_image) T_URL=http://127.0.0.1:$ST_PORT/v1/zimage/images/$IMAGE_NAME T_EXPECT= T_BODY= ;;
	fs_image) T_URL=http://127.0.0.1:$FS_PORT/$IMAGE_NAME T_EXPECT= T_BODY= ;;
	st_304)
		T_URL=http://127.0.0.1:$ST_PORT/v1/zimage/images/$IMAGE_NAME T_EXPECT= T_BODY=
		T_FLAGS=(-header "If-None-Match: $ST_ETAG" -status 304)
		;;
	fs_304)
		T_URL=http://127.0.0.1:$FS_PORT/$IMAGE_NAME T_EXPECT= T_BODY=
		T_FLAGS=(-header "If-None-Match: $FS_ETAG" -status 304)
		;;
	*) die "unknown target $1" ;;
	esac
}

# sys_ticks, from /proc/stat: process time (user, nice, system) plus steal of
# the whole machine, its total ticks, and busy and total ticks of the load
# core. Interrupt and softirq time is left out of the first: the kernel
# accounts it to no process, and here it is mostly the benchmark's own
# loopback traffic, not other work.
sys_ticks() {
	awk -v lc="cpu$LOAD_CPU" '$1 == "cpu" || $1 == lc {
		t = $2 + $3 + $4 + $5 + $6 + $7 + $8 + $9
		if ($1 == "cpu") {ab = $2 + $3 + $4 + $9; at = t} else {lb = t - $5 - $6; lt = t} }
		END {print ab, at, lb, lt}' /proc/stat
}

# measure ROUND NAME: one closed-loop run against a target, with Caddy's CPU
# time read around it; appends a row to $RESULTS. Two more columns keep the
# comparison honest: how busy the load core was (near 100%: the generator,
# not Caddy, set the pace, and a faster contender looks slower than it is),
# and how much CPU went to anything but Caddy, the fake and the generator
# (other processes, hypervisor steal).
# A measurement disturbed by more than NOISE_MAX% of a core of such work is
# repeated, up to RETRY times, so a build elsewhere on the box does not decide
# a round.
NOISY=0 # set once waiting for quiet failed: then stop repeating, the box stays busy
measure() {
	local tries=0
	while :; do
		measure_once "$@"
		if [ "$M_OTHER" -le "$NOISE_MAX" ] || [ "$tries" -ge "$RETRY" ] || [ "$NOISY" = 1 ]; then
			break
		fi
		tries=$((tries + 1))
		say "  $2: disturbed (other work ${M_OTHER}% of a core > NOISE_MAX $NOISE_MAX%), repeating ($tries/$RETRY)"
		wait_quiet || { NOISY=1; say "  (the machine stays busy: no more repeats in this run)"; }
	done
	printf '%s\n' "$M_ROW" >>"$RESULTS"
	printf '%s\n' "$M_LINE" >&2
}

measure_once() {
	local round=$1 name=$2 t0 t1 f0 f1 s0 s1 json req rps cpu_us cpu_pct bad loadcore other
	target "$name"
	s0=$(sys_ticks)
	t0=$(cpu_ticks "$CADDY_PID")
	f0=$(cpu_ticks "$FAKE_PID")
	json=$(load "$T_URL" "$T_EXPECT" "$T_BODY" -c "$CONC" -d "$DURATION" "${T_FLAGS[@]}")
	t1=$(cpu_ticks "$CADDY_PID")
	f1=$(cpu_ticks "$FAKE_PID")
	s1=$(sys_ticks)
	req=$(jget "$json" requests)
	rps=$(jget "$json" rps)
	bad=$(($(jget "$json" errors) + $(jget "$json" non2xx) + $(jget "$json" bad)))
	cpu_us=$(awk -v d=$((t1 - t0)) -v hz="$CLK_TCK" -v n="$req" 'BEGIN {printf "%.1f", n ? d * 1e6 / hz / n : 0}')
	cpu_pct=$(awk -v d=$((t1 - t0)) -v hz="$CLK_TCK" -v w="$(jget "$json" wall_s)" 'BEGIN {printf "%.0f", w ? d / hz / w * 100 : 0}')
	read -r loadcore other < <(awk -v a="$s0" -v b="$s1" -v c=$((t1 - t0)) -v f=$((f1 - f0)) \
		-v l="$(jget "$json" cpu_s)" -v hz="$CLK_TCK" -v ncpu="$(nproc)" 'BEGIN {
		split(a, x, " "); split(b, y, " ")
		lc = (y[4] - x[4]) ? (y[3] - x[3]) * 100 / (y[4] - x[4]) : 0
		core = (y[2] - x[2]) / ncpu   # ticks one core had in this interval
		o = core ? ((y[1] - x[1]) - c - f - l * hz) * 100 / core : 0
		printf "%.0f %.0f\n", lc, (o < 0 ? 0 : o) }')
	M_OTHER=$other
	M_ROW=$(printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s' "$round" "$name" "$rps" "$(jget "$json" p50_ms)" \
		"$(jget "$json" p99_ms)" "$cpu_us" "$cpu_pct" "$bad" "$loadcore" "$other")
	M_LINE=$(printf '  %-10s %9s req/s  p50 %7s ms  p99 %7s ms  caddy %7s µs/req, %3s%% of its core; load core %3s%%; other %3s%%%s' \
		"$name" "$rps" "$(jget "$json" p50_ms)" "$(jget "$json" p99_ms)" "$cpu_us" "$cpu_pct" "$loadcore" "$other" \
		"$([ "$bad" = 0 ] || echo "  FAILED: $bad  $json")")
}

col() { # NAME COLUMN: median over rounds of a results column
	awk -F'\t' -v n="$1" -v c="$2" '$2 == n {print $c}' "$RESULTS" | median
}

verdict() { # VALUE OP LIMIT
	awk -v v="$1" -v l="$3" -v op="$2" 'BEGIN {ok = (op == ">=") ? v >= l : v <= l; print ok ? "PASS" : "MISS"}'
}

ratio() { awk -v a="$1" -v b="$2" 'BEGIN {printf "%.2f", b ? a / b : 0}'; }

throughput() {
	say "== throughput: $ROUNDS rounds, $DURATION per measurement, concurrency $CONC"
	start_fake 0
	start_caddy throughput
	RESULTS=$OUT/throughput.tsv
	: >"$RESULTS"

	say "warm-up ($WARMUP each, not counted)"
	for name in gw_chat px_chat gw_models px_respond gw_enhance; do
		target "$name"
		load "$T_URL" "$T_EXPECT" "$T_BODY" -c "$CONC" -d "$WARMUP" >/dev/null
	done

	local r order
	for r in $(seq "$ROUNDS"); do
		if [ $((r % 2)) = 1 ]; then
			order="gw_chat px_chat gw_models px_respond gw_enhance px_chat2"
			say "round $r (gateway first)"
		else
			order="px_chat gw_chat px_respond gw_models px_chat2 gw_enhance"
			say "round $r (Caddy first)"
		fi
		for name in $order; do
			measure "$r" "$name"
		done
	done

	local fails
	fails=$(awk -F'\t' '{s += $8} END {print s + 0}' "$RESULTS")
	echo
	echo "medians of $ROUNDS rounds (Caddy pinned to CPU $CADDY_CPU, load+fake to CPU $LOAD_CPU; CPU = Caddy utime+stime):"
	printf '%-34s %10s %9s %9s %12s %7s %10s %7s\n' "" "req/s" "p50 ms" "p99 ms" "CPU µs/req" "CPU %" "load core" "other"
	local name label
	for name in gw_chat px_chat gw_models px_respond gw_enhance px_chat2; do
		case $name in
		gw_chat) label="gateway chat (no-enhance)" ;;
		px_chat) label="reverse_proxy (chat pair)" ;;
		gw_models) label="gateway /v1/models" ;;
		px_respond) label="respond (models pair)" ;;
		gw_enhance) label="gateway chat (enhance: LLM+image)" ;;
		px_chat2) label="reverse_proxy (enhance pair)" ;;
		esac
		printf '%-34s %10s %9s %9s %12s %7s %9s%% %6s%%\n' "$label" "$(col "$name" 3)" "$(col "$name" 4)" \
			"$(col "$name" 5)" "$(col "$name" 6)" "$(col "$name" 7)" "$(col "$name" 9)" "$(col "$name" 10)"
	done
	echo
	local a b x
	a=$(col gw_chat 3) b=$(col px_chat 3) x=$(ratio "$a" "$b")
	printf '%-46s %6sx  target >= 1.6x  %s\n' "chat throughput / reverse_proxy" "$x" "$(verdict "$x" '>=' 1.6)"
	a=$(col gw_chat 6) b=$(col px_chat 6) x=$(ratio "$a" "$b")
	printf '%-46s %6sx  target <= 0.6x  %s\n' "chat CPU per request / reverse_proxy" "$x" "$(verdict "$x" '<=' 0.6)"
	a=$(col gw_models 3) b=$(col px_respond 3) x=$(ratio "$a" "$b")
	printf '%-46s %6sx  target >= 1.3x  %s\n' "models throughput / respond" "$x" "$(verdict "$x" '>=' 1.3)"
	a=$(col gw_enhance 3) b=$(col px_chat2 3) x=$(ratio "$a" "$b")
	printf '%-46s %6sx  target >= 0.9x  %s\n' "enhance-path throughput / reverse_proxy" "$x" "$(verdict "$x" '>=' 0.9)"
	[ "$fails" = 0 ] || echo "WARNING: $fails requests failed (errors, non-2xx or wrong body): see the round lines above"
	for name in gw_chat px_chat gw_models px_respond gw_enhance px_chat2; do
		if awk -v v="$(col "$name" 9)" 'BEGIN {exit !(v >= 95)}'; then
			echo "NOTE: $name saturated the load core (median $(col "$name" 9)%): the generator, not Caddy, set its pace; its req/s is a lower bound"
		fi
	done
	x=$(awk -F'\t' '$10 > m {m = $10} END {print m + 0}' "$RESULTS")
	if awk -v v="$x" -v m="$NOISE_MAX" 'BEGIN {exit !(v > m)}'; then
		echo "WARNING: up to ${x}% of a core went to other work during a kept measurement (NOISE_MAX $NOISE_MAX%): the machine was not quiet; rerun for clean numbers"
	fi
	say "(per-round rows: $RESULTS; Caddy log: $OUT/caddy-throughput.log)"
}

# --- store -------------------------------------------------------------------

# store_image: an IMAGE_SIZE PNG (signature, then noise: the store checks the
# signature only) written where the store keeps it, {prefix}/images/{id}.png
# with id the first 128 bits of its SHA-256, exactly as put names it
store_image() {
	rm -rf "$STORE_DIR"
	mkdir -p "$STORE_DIR/zimage/images"
	local tmp=$OUT/image.png
	{ printf '\211PNG\r\n\032\n'; head -c $((IMAGE_SIZE - 8)) /dev/urandom; } >"$tmp"
	IMAGE_NAME=$(sha256sum "$tmp" | cut -c1-32).png
	mv "$tmp" "$STORE_DIR/zimage/images/$IMAGE_NAME"
}

# etag_of URL: the ETag a server gives for URL
etag_of() { curl -fsS -o /dev/null -D - "$1" | awk 'tolower($1) == "etag:" {sub(/\r$/, "", $2); print $2}'; }

store_bench() {
	say "== store: a stored $IMAGE_SIZE-byte image, gateway store vs file_server on the same file, $ROUNDS rounds, $DURATION per measurement, concurrency $CONC"
	store_image
	start_fake 0
	start_caddy store
	RESULTS=$OUT/store.tsv
	: >"$RESULTS"

	# both serve the same bytes, and both revalidate with their own ETag
	local file=$STORE_DIR/zimage/images/$IMAGE_NAME st fs
	st=http://127.0.0.1:$ST_PORT/v1/zimage/images/$IMAGE_NAME
	fs=http://127.0.0.1:$FS_PORT/$IMAGE_NAME
	curl -fsS "$st" | cmp -s - "$file" || die "$st does not serve the stored file"
	curl -fsS "$fs" | cmp -s - "$file" || die "$fs does not serve the stored file"
	ST_ETAG=$(etag_of "$st")
	FS_ETAG=$(etag_of "$fs")
	[ -n "$ST_ETAG" ] && [ -n "$FS_ETAG" ] || die "no ETag (store: '$ST_ETAG', file_server: '$FS_ETAG')"
	[ "$(curl -sS -o /dev/null -w '%{http_code}' -H "If-None-Match: $ST_ETAG" "$st")" = 304 ] || die "$st does not answer 304 to its ETag"
	[ "$(curl -sS -o /dev/null -w '%{http_code}' -H "If-None-Match: $FS_ETAG" "$fs")" = 304 ] || die "$fs does not answer 304 to its ETag"
	say "image $IMAGE_NAME ($IMAGE_SIZE bytes); ETags: store $ST_ETAG, file_server $FS_ETAG"

	say "warm-up ($WARMUP each, not counted)"
	local name
	for name in st_image fs_image st_304 fs_304; do
		target "$name"
		load "$T_URL" "$T_EXPECT" "$T_BODY" -c "$CONC" -d "$WARMUP" "${T_FLAGS[@]}" >/dev/null
	done
	local r order
	for r in $(seq "$ROUNDS"); do
		if [ $((r % 2)) = 1 ]; then
			order="st_image fs_image st_304 fs_304"
			say "round $r (gateway first)"
		else
			order="fs_image st_image fs_304 st_304"
			say "round $r (file_server first)"
		fi
		for name in $order; do
			measure "$r" "$name"
		done
	done

	local fails
	fails=$(awk -F'\t' '{s += $8} END {print s + 0}' "$RESULTS")
	echo
	echo "medians of $ROUNDS rounds, $IMAGE_SIZE-byte image (Caddy pinned to CPU $CADDY_CPU, load+fake to CPU $LOAD_CPU; CPU = Caddy utime+stime):"
	printf '%-34s %10s %9s %9s %12s %7s %10s %7s\n' "" "req/s" "p50 ms" "p99 ms" "CPU µs/req" "CPU %" "load core" "other"
	local label
	for name in st_image fs_image st_304 fs_304; do
		case $name in
		st_image) label="gateway store, 200" ;;
		fs_image) label="file_server, 200" ;;
		st_304) label="gateway store, 304" ;;
		fs_304) label="file_server, 304" ;;
		esac
		printf '%-34s %10s %9s %9s %12s %7s %9s%% %6s%%\n' "$label" "$(col "$name" 3)" "$(col "$name" 4)" \
			"$(col "$name" 5)" "$(col "$name" 6)" "$(col "$name" 7)" "$(col "$name" 9)" "$(col "$name" 10)"
	done
	echo
	local x
	x=$(ratio "$(col st_image 3)" "$(col fs_image 3)")
	printf '%-46s %6sx  target >= 0.9x  %s\n' "stored image throughput / file_server" "$x" "$(verdict "$x" '>=' 0.9)"
	x=$(ratio "$(col st_304 3)" "$(col fs_304 3)")
	printf '%-46s %6sx  target >= 1.0x  %s\n' "304 throughput / file_server" "$x" "$(verdict "$x" '>=' 1.0)"
	x=$(ratio "$(col st_image 6)" "$(col fs_image 6)")
	printf '%-46s %6sx  (informational)\n' "stored image CPU per request / file_server" "$x"
	x=$(ratio "$(col st_304 6)" "$(col fs_304 6)")
	printf '%-46s %6sx  (informational)\n' "304 CPU per request / file_server" "$x"
	[ "$fails" = 0 ] || echo "WARNING: $fails requests failed (errors, wrong status or body): see the round lines above"
	for name in st_image fs_image st_304 fs_304; do
		if awk -v v="$(col "$name" 9)" 'BEGIN {exit !(v >= 95)}'; then
			echo "NOTE: $name saturated the load core (median $(col "$name" 9)%): the generator, not Caddy, set its pace; its req/s is a lower bound"
		fi
	done
	x=$(awk -F'\t' '$10 > m {m = $10} END {print m + 0}' "$RESULTS")
	if awk -v v="$x" -v m="$NOISE_MAX" 'BEGIN {exit !(v > m)}'; then
		echo "WARNING: up to ${x}% of a core went to other work during a kept measurement (NOISE_MAX $NOISE_MAX%): the machine was not quiet; rerun for clean numbers"
	fi
	say "(per-round rows: $RESULTS; Caddy log: $OUT/caddy-store.log)"
}

# --- burst -------------------------------------------------------------------

# burst_one ROUND NAME URL: a fresh Caddy, BURST simultaneous chat requests
burst_one() {
	local round=$1 name=$2 url=$3 base t0 t1 json hwm stats ok
	start_caddy "burst-$name"
	wait_quiet || true # the fresh process settles; and a build elsewhere would decide the wall time
	base=$(mem_kb "$CADDY_PID" VmRSS)
	curl -fsS -X POST "http://127.0.0.1:$FAKE_PORT/stats/reset" >/dev/null 2>&1 || true
	t0=$(cpu_ticks "$CADDY_PID")
	json=$(load "$url" "$EXPECT_IMAGE" "$CHAT_BODY" -burst "$BURST" -timeout 60s "${PRE[@]}")
	t1=$(cpu_ticks "$CADDY_PID")
	hwm=$(mem_kb "$CADDY_PID" VmHWM)
	stats=$(curl -fsS "http://127.0.0.1:$FAKE_PORT/stats" 2>/dev/null || echo '{}')
	ok=$(jget "$json" ok)
	printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$round" "$name" "$(jget "$json" wall_s)" "$ok" \
		"$hwm" "$base" "$(jget "$json" p99_ms)" "$((t1 - t0))" "$(jget "$stats" max_in_flight)" >>"$RESULTS"
	printf '  %-13s ok %5s/%s  wall %6s s  p50 %8s ms  max %8s ms  peak RSS %7s kB (fresh %s kB)  upstream peak in flight %s%s\n' \
		"$name" "$ok" "$BURST" "$(jget "$json" wall_s)" "$(jget "$json" p50_ms)" "$(jget "$json" max_ms)" \
		"$hwm" "$base" "$(jget "$stats" max_in_flight)" \
		"$([ "$ok" = "$BURST" ] || echo "  FAILED: $json")" >&2
	stop_pid "$CADDY_PID"
	CADDY_PID=
}

burst() {
	say "== burst: $BURST simultaneous chat requests, fake image takes $BURST_DELAY, $BURST_ROUNDS alternating rounds, fresh Caddy each, $([ "$PRECONNECT" = 1 ] && echo "connections opened before the clock" || echo "cold connections")"
	raise_nofile $((BURST * 2 + 512))
	start_fake "$BURST_DELAY"
	RESULTS=$OUT/burst.tsv
	: >"$RESULTS"
	local gw=http://127.0.0.1:$GW_PORT/v1/chat/completions px=http://127.0.0.1:$PX_PORT/v1/chat/completions r json
	# the harness's own floor: the same burst straight at the fake, no Caddy.
	# Whatever wall time this takes (dialing 2000 connections, on the core the
	# fake shares with the generator) is in the numbers below too.
	json=$(load "http://127.0.0.1:$FAKE_PORT/api/v1/generate_image" "$EXPECT_IMAGE" "$CHAT_BODY" -burst "$BURST" -timeout 60s "${PRE[@]}")
	HARNESS_WALL=$(jget "$json" wall_s)
	say "  harness floor (burst straight at the fake, no Caddy): ok $(jget "$json" ok)/$BURST, wall $HARNESS_WALL s"
	for r in $(seq "$BURST_ROUNDS"); do
		say "round $r"
		if [ $((r % 2)) = 1 ]; then
			burst_one "$r" gateway "$gw"
			burst_one "$r" reverse_proxy "$px"
		else
			burst_one "$r" reverse_proxy "$px"
			burst_one "$r" gateway "$gw"
		fi
	done
	echo
	echo "burst of $BURST, medians of $BURST_ROUNDS fresh-process runs each ($([ "$PRECONNECT" = 1 ] && echo "connections opened before the clock" || echo "cold connections, dialed in the burst")):"
	printf '%-15s %8s %8s %10s %14s %14s %12s\n' "" "ok" "wall s" "p99 ms" "peak RSS kB" "fresh RSS kB" "CPU µs/req"
	local name
	for name in gateway reverse_proxy; do
		printf '%-15s %8s %8s %10s %14s %14s %12s\n' "$name" "$(col "$name" 4)" "$(col "$name" 3)" \
			"$(col "$name" 7)" "$(col "$name" 5)" "$(col "$name" 6)" \
			"$(awk -v t="$(col "$name" 8)" -v hz="$CLK_TCK" -v n="$BURST" 'BEGIN {printf "%.0f", t * 1e6 / hz / n}')"
	done
	echo "(harness floor, the same burst straight at the fake: wall $HARNESS_WALL s, of which $BURST_DELAY is the fake's delay)"
	echo
	local ok wall x
	ok=$(awk -F'\t' -v n="$BURST" '$2 == "gateway" && $4 != n {bad++} END {print bad ? "MISS" : "PASS"}' "$RESULTS")
	printf '%-46s %s\n' "gateway: all $BURST succeed, every run" "$ok"
	wall=$(awk -F'\t' '$2 == "gateway" && $3 > m {m = $3} END {print m + 0}' "$RESULTS")
	printf '%-46s %6ss  target < 3s    %s\n' "gateway: worst wall time" "$wall" "$(awk -v w="$wall" 'BEGIN {print w < 3 ? "PASS" : "MISS"}')"
	x=$(ratio "$(col gateway 5)" "$(col reverse_proxy 5)")
	printf '%-46s %6sx  target <= 0.8x  %s\n' "gateway peak RSS / reverse_proxy peak RSS" "$x" "$(verdict "$x" '<=' 0.8)"
	x=$(ratio "$(awk -F'\t' '$2 == "gateway" {print $5 - $6}' "$RESULTS" | median)" \
		"$(awk -F'\t' '$2 == "reverse_proxy" {print $5 - $6}' "$RESULTS" | median)")
	printf '%-46s %6sx  (informational: growth over the fresh process)\n' "gateway RSS growth / reverse_proxy RSS growth" "$x"
	say "(per-run rows: $RESULTS)"
}

# --- streams -----------------------------------------------------------------

# raise_nofile NEED: as many file descriptors as allowed; sets NOFILE
raise_nofile() {
	ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
	NOFILE=$(ulimit -n)
	[ "$NOFILE" = unlimited ] && NOFILE=1048576
	if [ "$NOFILE" -lt "$1" ]; then
		say "WARNING: open-file limit is $NOFILE (hard limit $(ulimit -Hn)); this mode wants $1"
	fi
}

streams() {
	# Caddy holds two descriptors per stream: the client's and the upstream's
	raise_nofile $((STREAMS * 2 + 512))
	local n=$STREAMS
	if [ "$NOFILE" -lt $((n * 2 + 512)) ]; then
		n=$(((NOFILE - 512) / 2))
		say "WARNING: running $n streams instead of $STREAMS: Caddy needs 2 descriptors per stream and may open only $NOFILE (raise the hard limit: ulimit -Hn)"
	fi
	say "== streams: $n simultaneous streaming chat requests, fake image takes $STREAM_DELAY, stream_keepalive $STREAM_KEEPALIVE, $([ "$PRECONNECT" = 1 ] && echo "connections opened before the clock" || echo "cold connections")"
	start_fake "$STREAM_DELAY"
	start_caddy streams
	wait_quiet || true
	local base t0 t1 json hwm after stats peak
	base=$(mem_kb "$CADDY_PID" VmRSS)
	curl -fsS -X POST "http://127.0.0.1:$FAKE_PORT/stats/reset" >/dev/null 2>&1 || true

	# sample VmRSS every second while the streams are open (VmHWM is the
	# kernel's own peak; the samples show the plateau)
	: >"$OUT/streams-rss.txt"
	(while kill -0 "$CADDY_PID" 2>/dev/null; do
		mem_kb "$CADDY_PID" VmRSS >>"$OUT/streams-rss.txt" 2>/dev/null || true
		sleep 1
	done) &
	SAMPLER_PID=$!

	t0=$(cpu_ticks "$CADDY_PID")
	json=$(load "http://127.0.0.1:$GW_PORT/v1/chat/completions" "$EXPECT_IMAGE" "$STREAM_BODY" \
		-stream -burst "$n" -timeout 120s "${PRE[@]}")
	t1=$(cpu_ticks "$CADDY_PID")
	stop_pid "$SAMPLER_PID"
	SAMPLER_PID=
	hwm=$(mem_kb "$CADDY_PID" VmHWM)
	after=$(mem_kb "$CADDY_PID" VmRSS)
	peak=$(sort -g "$OUT/streams-rss.txt" | tail -1)
	stats=$(curl -fsS "http://127.0.0.1:$FAKE_PORT/stats" 2>/dev/null || echo '{}')

	echo
	echo "streams: $n simultaneous, image after $STREAM_DELAY, keep-alive every $STREAM_KEEPALIVE"
	echo "  load: $json"
	printf '  %-40s %s / %s\n' "completed (data: [DONE], no error)" "$(jget "$json" completed)" "$n"
	printf '  %-40s %s\n' "ok (2xx, complete, image URL present)" "$(jget "$json" ok)"
	printf '  %-40s %s s\n' "wall" "$(jget "$json" wall_s)"
	printf '  %-40s %s (per stream min %s, max %s)\n' "keep-alive comments seen" "$(jget "$json" keepalives)" \
		"$(jget "$json" keepalive_min)" "$(jget "$json" keepalive_max)"
	printf '  %-40s %s ms\n' "longest silence on any stream" "$(jget "$json" max_gap_ms)"
	printf '  %-40s p50 %s ms, p99 %s ms\n' "first SSE line after" "$(jget "$json" ttfb_p50_ms)" "$(jget "$json" ttfb_p99_ms)"
	printf '  %-40s %s\n' "upstream peak in flight (fake)" "$(jget "$stats" max_in_flight)"
	printf '  %-40s fresh %s kB, sampled peak %s kB, VmHWM %s kB, after %s kB\n' "Caddy RSS" "$base" "$peak" "$hwm" "$after"
	printf '  %-40s %s kB\n' "RSS per stream ((VmHWM - fresh) / n)" "$(awk -v h="$hwm" -v b="$base" -v n="$n" 'BEGIN {printf "%.1f", (h - b) / n}')"
	printf '  %-40s %s µs\n' "Caddy CPU per stream" "$(awk -v d=$((t1 - t0)) -v hz="$CLK_TCK" -v n="$n" 'BEGIN {printf "%.0f", d * 1e6 / hz / n}')"
	local ka_min gap_ok
	ka_min=$(jget "$json" keepalive_min)
	# flowing: every stream saw keep-alives and none fell silent much past the interval
	gap_ok=$(awk -v g="$(jget "$json" max_gap_ms)" -v k="$STREAM_KEEPALIVE" 'BEGIN {
		s = k + 0; if (k ~ /ms$/) s /= 1000; else if (k ~ /m$/) s *= 60
		print (g <= s * 1000 * 1.5 + 1000) ? "yes" : "no" }')
	printf '  %-40s %s\n' "all complete" "$([ "$(jget "$json" ok)" = "$n" ] && echo PASS || echo MISS)"
	printf '  %-40s %s\n' "keep-alives flowing" "$([ "${ka_min:-0}" -ge 1 ] && [ "$gap_ok" = yes ] && echo PASS || echo MISS)"
	[ "$n" = "$STREAMS" ] || echo "  NOTE: $n streams, not $STREAMS: the open-file limit ($NOFILE) allows no more"
}

# --- main --------------------------------------------------------------------

machine() {
	echo "machine: $(nproc) CPUs, $(awk -F': ' '/^model name/ {print $2; exit}' /proc/cpuinfo), $(uname -sr), $(go version | awk '{print $3}')"
	echo "caddy:   $("$CADDY_BIN" version 2>/dev/null | head -1) ($CADDY_BIN)"
	echo "pinning: caddy ${PIN_CADDY[*]:-(none)}; load and fake ${PIN_LOAD[*]:-(none)}"
	# the numbers mean something only on an otherwise idle machine: say so
	# when something else is busy (a build, a test suite)
	local busy
	busy=$(idle_check)
	echo "before start: ${busy}% of all CPUs busy with other work"
	awk -v b="$busy" 'BEGIN {exit !(b > 10)}' &&
		say "WARNING: the machine is not idle (${busy}% busy); throughput and CPU numbers will be noisy"
	return 0
}

# wait_quiet: up to QUIET_WAIT seconds for the machine to go idle (under 10%
# busy while our processes idle); fails when it does not
wait_quiet() {
	local end=$((SECONDS + QUIET_WAIT)) busy
	while :; do
		busy=$(idle_check)
		[ "$busy" -le 10 ] && return 0
		[ "$SECONDS" -ge "$end" ] && { say "  (still ${busy}% busy after ${QUIET_WAIT}s; measuring anyway)"; return 1; }
	done
}

# idle_check: percent of CPU time not idle, over one second, from /proc/stat
idle_check() {
	local a b
	a=$(awk '/^cpu / {print $2+$3+$4+$5+$6+$7+$8+$9, $5+$6}' /proc/stat)
	sleep 1
	b=$(awk '/^cpu / {print $2+$3+$4+$5+$6+$7+$8+$9, $5+$6}' /proc/stat)
	awk -v a="$a" -v b="$b" 'BEGIN {split(a, x, " "); split(b, y, " "); t = y[1] - x[1]; i = y[2] - x[2]
		printf "%.0f", t ? (t - i) * 100 / t : 0}'
}

case $MODE in
throughput | burst | streams | store | all) ;;
*) die "usage: bench/run.sh [throughput|burst|streams|store|all]" ;;
esac
build
write_caddyfile
machine
case $MODE in
throughput) throughput ;;
burst) burst ;;
streams) streams ;;
store) store_bench ;;
all)
	throughput
	burst
	streams
	store_bench
	;;
esac
