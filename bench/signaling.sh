#!/usr/bin/env bash
# Signaling benchmarks, webcall and the PeerJS server side by side in one run (see BENCHMARKS.md).
#
#   bench/signaling.sh            # 3 runs of everything, medians and ratios at the end
#   RUNS=1 DURATION=2 COUNTS=1000 bench/signaling.sh   # a quick look
#   WEBCALL_BASE_BIN=/tmp/webcall-old bench/signaling.sh   # also an older webcall binary ("base") in every run,
#                                 # for before/after figures side by side (ratio columns webcall / base)
#   PEERJS=0 bench/signaling.sh   # without the PeerJS server
#
# Every run also measures the kernel floor of the relay ("floor": `webcall bench floor-server`, one read and one
# write per message and nothing else, same CPU, same pairs, window and message size), so relay CPU per message can
# be read as a multiple of it (column webcall / floor).
#
# Each server runs pinned to CPU 0 and the generator (`webcall bench`, one thread) to CPU 1. Servers listen on
# 127.0.0.1 only; every load is bounded (DURATION seconds, at most COUNTS connections); every process started here
# is stopped on exit. Raw results (one JSON object per line) go to $OUT (default bench/results/signaling-DATE.jsonl).
set -euo pipefail
cd "$(dirname "$0")/.."

RUNS=${RUNS:-3}
DURATION=${DURATION:-5}
CLIENTS=${CLIENTS:-100}
WINDOW=${WINDOW:-8}
COUNTS=${COUNTS:-1000,5000,10000}
SERVER_CPU=${SERVER_CPU:-0}
GEN_CPU=${GEN_CPU:-1}
PEERJS_VERSION=$(node -p 'require("./bench/peerjs/package.json").dependencies.peer')
mkdir -p bench/results
OUT=${OUT:-bench/results/signaling-$(date -u +%Y%m%dT%H%M%SZ).jsonl}
: > "$OUT"

source "$(dirname "$0")/lib.sh"
bench_setup bench

# PeerJS from npm at the version pinned in bench/peerjs/package-lock.json.
if [[ ! -x bench/peerjs/node_modules/.bin/peerjs ]]; then
    (cd bench/peerjs && npm ci --no-audit --no-fund >&2)
fi

# The fd limit bounds both the server and the generator (10k connections each, plus spare).
ulimit -n "$(ulimit -Hn)"

SERVER_PID=
SERVER_URL=
BASE=
if [[ -n "${WEBCALL_BASE_BIN:-}" ]]; then
    cp "$WEBCALL_BASE_BIN" "$TMP/webcall-base"
    BASE="$TMP/webcall-base"
fi
start_webcall() { start_webcall_bin "$WEBCALL"; }
start_base() { start_webcall_bin "$BASE"; }
start_webcall_bin() {
    bench_serve server "$SERVER_CPU" "$1"
    SERVER_PID=$SERVED_PID
    SERVER_URL=$SERVED_URL
}
start_peerjs() {
    local port=$((20000 + RANDOM % 20000))
    : >"$TMP/server.out"
    taskset -c "$SERVER_CPU" node bench/peerjs/node_modules/.bin/peerjs --host 127.0.0.1 --port "$port" \
        --concurrent_limit 20000 >"$TMP/server.out" 2>"$TMP/server.err" &
    SERVER_PID=$!
    PIDS+=("$SERVER_PID")
    for _ in $(seq 100); do
        if grep -q 'Started PeerServer' "$TMP/server.out"; then
            SERVER_URL="ws://127.0.0.1:$port/peerjs"
            return
        fi
        sleep 0.1
    done
    echo "peerjs did not start: $(cat "$TMP/server.err" "$TMP/server.out")" >&2
    exit 1
}
# The kernel floor: `webcall bench floor-server`, a relay that does one read and one write per message and nothing
# else, on the same CPU; relay only (see BENCHMARKS.md, "the kernel floor").
start_floor() {
    : >"$TMP/floor.out"
    taskset -c "$SERVER_CPU" "$WEBCALL" bench floor-server --listen 127.0.0.1:0 --max-seconds 600 \
        >"$TMP/floor.out" 2>"$TMP/floor.err" &
    SERVER_PID=$!
    PIDS+=("$SERVER_PID")
    for _ in $(seq 100); do
        if grep -qs 'listening on' "$TMP/floor.out"; then
            SERVER_URL=$(sed -n 's|.*listening on \(.*\)|\1|p' "$TMP/floor.out")
            return
        fi
        sleep 0.1
    done
    echo "floor server did not start: $(cat "$TMP/floor.err")" >&2
    exit 1
}
bench_floor() {
    local run=$1 window=$2 json
    start_floor
    echo "[floor, run $run] relay window $window" >&2
    json=$(timeout 300 taskset -c "$GEN_CPU" "$WEBCALL" bench floor --addr "$SERVER_URL" --server-pid "$SERVER_PID" \
        --clients "$CLIENTS" --window "$window" --duration "$DURATION" --json)
    stop_server
    echo "$json" | jq -c --argjson run "$run" '. + {run: $run}' >>"$OUT"
}
stop_server() {
    kill "$SERVER_PID" 2>/dev/null || true
    wait "$SERVER_PID" 2>/dev/null || true
}

# bench TARGET RUN ARGS…: one benchmark against a fresh server; appends its JSON (tagged with the run) to $OUT.
bench() {
    local target=$1 run=$2
    shift 2
    "start_$target"
    local json proto=$target
    [[ $target == base ]] && proto=webcall
    echo "[$target, run $run] $1" >&2
    json=$(timeout 300 taskset -c "$GEN_CPU" "$WEBCALL" bench "$@" --target "$proto" --url "$SERVER_URL" \
        --server-pid "$SERVER_PID" --sources 8 --json)
    stop_server
    echo "$json" | jq -c --argjson run "$run" --arg target "$target" '. + {run: $run, target: $target}' >>"$OUT"
}

echo "machine: $(nproc) CPUs, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(free -g | awk '/Mem:/{print $2}') GiB" >&2
[[ -n $BASE ]] && echo "base: webcall $WEBCALL_BASE_BIN of $(date -u -r "$WEBCALL_BASE_BIN" +%FT%TZ)" >&2
echo "webcall $("$WEBCALL" --version | cut -d' ' -f2) ($BUILT), PeerJS server $PEERJS_VERSION, node $(node --version), Linux $(uname -r)" >&2
for run in $(seq "$RUNS"); do
    # Alternate which server goes first, so slow drift on a shared machine does not favour one.
    order="webcall floor peerjs${BASE:+ base}"
    [[ ${PEERJS:-1} == 0 ]] && order="webcall floor${BASE:+ base}"
    ((run % 2 == 0)) && order="${BASE:+base }peerjs floor webcall"
    ((run % 2 == 0)) && [[ ${PEERJS:-1} == 0 ]] && order="${BASE:+base }floor webcall"
    for target in $order; do
        if [[ $target == floor ]]; then
            bench_floor "$run" 1
            bench_floor "$run" "$WINDOW"
            continue
        fi
        bench "$target" "$run" relay --clients "$CLIENTS" --window 1 --duration "$DURATION"
        bench "$target" "$run" relay --clients "$CLIENTS" --window "$WINDOW" --duration "$DURATION"
        bench "$target" "$run" connections --counts "$COUNTS" --concurrency 100
    done
    echo "run $run of $RUNS done" >&2
done
node bench/summarize.mjs "$OUT"
