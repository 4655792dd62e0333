#!/usr/bin/env bash
# Soak/abuse run on loopback: a release `webcall serve` with default limits, loaded by `webcall-soak`
# (churn, malformed floods, oversized frames, slow readers) while two well-behaved peers exchange sequenced messages.
# Usage: bench/soak/run.sh [DURATION] [ROUNDS]   (default 20s, 2 rounds). Bounded: ends by itself.
set -euo pipefail
cd "$(dirname "$0")/../.."
duration=${1:-20s}; rounds=${2:-2}
cargo build --release --locked -p webcall -p webcall-soak >/dev/null
out=$(mktemp); target/release/webcall serve --listen 127.0.0.1:0 >"$out" 2>/dev/null & pid=$!
trap 'kill $pid 2>/dev/null || true; rm -f "$out"' EXIT
for _ in $(seq 50); do grep -q listening "$out" && break; sleep 0.1; done
addr=$(grep -o 'http://[0-9.:]*' "$out" | sed 's|http://||')
ulimit -n 20000 2>/dev/null || true
target/release/webcall-soak --server "$addr" --pid "$pid" --duration "$duration" --rounds "$rounds"
