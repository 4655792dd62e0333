#!/usr/bin/env bash
# Native-peer call setup through `webcall serve`, inside a network namespace that has only loopback.
#
#   bench/calls.sh                         # 3 runs: 20 sequential calls, then sustained setups at 2, 4, 8 at once
#   RUNS=1 CALLS=10 CONCURRENCY="1 4" bench/calls.sh
#
# Each call: `webcall peer` A joins a fresh room, B joins; B's output is timestamped (join → ICE connected → DTLS
# connected → first received video frame), then both hang up. Peers send a 320x180 VP8 test pattern. The server
# runs pinned to CPU 0; the peers run wherever the kernel puts them (they are most of the load).
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ -z "${WEBCALL_IN_NETNS:-}" ]]; then
    exec unshare --net env WEBCALL_IN_NETNS=1 bash -c 'ip link set lo up && exec "$0" "$@"' "$0" "$@"
fi

RUNS=${RUNS:-3}
CALLS=${CALLS:-20}
CONCURRENCY=${CONCURRENCY:-1 2 4 8}
SIZE=${SIZE:-320x180}
mkdir -p bench/results
OUT=${OUT:-bench/results/calls-$(date -u +%Y%m%dT%H%M%SZ).jsonl}
: > "$OUT"

source "$(dirname "$0")/lib.sh"
bench_setup calls

echo "machine: $(nproc) CPUs, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs); network namespace with: $(ip -o link | awk -F': ' '{print $2}' | xargs)" >&2
for run in $(seq "$RUNS"); do
    for c in $CONCURRENCY; do
        : >"$TMP/server.out" # here, not in the background child: the last server's address must not be read
        taskset -c 0 env RUST_LOG=warn "$WEBCALL" serve --listen 127.0.0.1:0 --max-joins-per-ip 100000 \
            >"$TMP/server.out" 2>"$TMP/server.err" &
        spid=$!
        PIDS+=("$spid")
        for _ in $(seq 100); do grep -q 'listening on' "$TMP/server.out" && break; sleep 0.1; done
        addr=$(sed -n 's|.*listening on http://\([^ ]*\).*|\1|p' "$TMP/server.out")
        n=$CALLS
        ((c > 1)) && n=$((c * 5))
        json=$(timeout 600 "$WEBCALL" bench calls --url "ws://$addr/ws" --server-pid "$spid" --calls "$n" \
            --concurrency "$c" --size "$SIZE" --json)
        kill "$spid"; wait "$spid" 2>/dev/null || true
        echo "$json" | jq -c --argjson run "$run" --arg load "$(cut -d' ' -f1-3 /proc/loadavg)" '. + {run: $run, loadavg: $load}' >>"$OUT"
    done
    echo "run $run of $RUNS done" >&2
done
jq -s -r '
  def median: sort | if length % 2 == 1 then .[length/2|floor] else (.[length/2-1] + .[length/2]) / 2 end;
  group_by(.concurrency) | .[] |
  "concurrency \(.[0].concurrency) (\(.[0].calls) calls x \(length) runs): join→ICE p50 \(map(.join_to_ice_ms.p50)|median|.*10|round/10) ms p95 \(map(.join_to_ice_ms.p95)|median|.*10|round/10); join→DTLS p50 \(map(.join_to_dtls_ms.p50)|median|.*10|round/10) p95 \(map(.join_to_dtls_ms.p95)|median|.*10|round/10); join→first frame p50 \(map(.join_to_frame_ms.p50)|median|.*10|round/10) p95 \(map(.join_to_frame_ms.p95)|median|.*10|round/10); setups/s \(map(.setups_per_s)|median|.*100|round/100); server CPU ms/call \(map(.server_cpu_ms_per_call)|median|.*100|round/100)"' "$OUT"
