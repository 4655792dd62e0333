#!/usr/bin/env bash
# User-space instructions per connection + join of `webcall serve`, counted by callgrind (deterministic, unlike CPU
# time on this shared VM; kernel time is not counted). See BENCHMARKS.md, "Per-connection cost outside the
# WebSocket transport".
#
#   bench/callgrind-connections.sh                   # binary built here, 2000 connections
#   WEBCALL_BIN=/tmp/webcall-old N=6000 bench/callgrind-connections.sh
#
# The server runs under valgrind with instrumentation off until it listens; instrumentation is switched on just
# before `webcall bench connections` opens N joined connections (rooms of two, 100 at once, as bench/signaling.sh
# does) and off once they are all open, so start-up and shutdown are not counted. Prints the total, the total per
# connection and the callgrind output file (kept in $OUT_DIR, default /tmp), for `callgrind_annotate`.
set -euo pipefail
cd "$(dirname "$0")/.."
N=${N:-2000}
OUT_DIR=${OUT_DIR:-/tmp}
source "$(dirname "$0")/lib.sh"
bench_setup callgrind
ulimit -n "$(ulimit -Hn)"

OUT="$OUT_DIR/callgrind-connections.$(date -u +%Y%m%dT%H%M%SZ).out"
valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$OUT" "$WEBCALL" serve \
    --listen 127.0.0.1:0 --turn-listen 127.0.0.1:0 --rate-limit 1000000 --max-connections 20000 \
    --max-connections-per-ip 100000 --max-joins-per-ip 100000000 --max-rooms 20000 \
    >"$TMP/server.out" 2>"$TMP/server.err" &
SERVER_PID=$!
PIDS+=("$SERVER_PID")
for _ in $(seq 600); do
    grep -q 'listening on' "$TMP/server.out" && break
    sleep 0.1
done
addr=$(sed -n 's|.*listening on http://\([^ ]*\).*|\1|p' "$TMP/server.out")
[[ -n "$addr" ]] || { echo "webcall serve did not start: $(cat "$TMP/server.err")" >&2; exit 1; }
sleep 1 # let start-up work (TURN sockets, worker threads) finish before counting
callgrind_control -i on "$SERVER_PID" >/dev/null
"$WEBCALL" bench connections --target webcall --url "ws://$addr/ws" --counts "$N" --concurrency 100 --sources 8 \
    --settle 0.5 >&2
callgrind_control -i off "$SERVER_PID" >/dev/null
kill "$SERVER_PID"
wait "$SERVER_PID" 2>/dev/null || true
total=$(callgrind_annotate "$OUT" 2>/dev/null | awk '/PROGRAM TOTALS/ {gsub(",", "", $1); print $1}')
echo "webcall ($BUILT): $total instructions for $N connections, $((total / N)) per connection; profile: $OUT"
