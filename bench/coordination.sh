#!/usr/bin/env bash
# The cost per request of `coordination` (Redis round trips on loopback),
# side by side with the same work without it: one generation's admission
# (quota reservation and client slot), its account slot and their
# release, the image service answering at once. Needs redis-server.
# From the repo root: bench/coordination.sh [benchtime, default 5000x]
set -euo pipefail
cd "$(dirname "$0")/.."
go test -count=1 -run '^$' -bench '^BenchmarkCoordination$' -benchtime "${1:-5000x}" -benchmem .
