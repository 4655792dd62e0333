#!/usr/bin/env bash
# Soak/abuse run on loopback: a release `webcall serve` with default limits, loaded by `webcall-soak`
# (churn, malformed floods, oversized frames, slow readers) while two well-behaved peers exchange sequenced messages.
# Usage: bench/soak/run.sh [DURATION] [ROUNDS]   (default 20s, 2 rounds). Bounded: ends by itself.
#   BLIP=5s bench/soak/run.sh 30s 3   # Redis-blip phase: two nodes sharing rooms through a redis-server on a free
#                                     # loopback port; B joins on the second node, and a third into each round Redis
#                                     # is paused (SIGSTOP) for BLIP, continued, and its clients killed (CLIENT KILL).
set -euo pipefail
cd "$(dirname "$0")/../.."
duration=${1:-20s}; rounds=${2:-2}
# WEBCALL_BIN / SOAK_BIN: prebuilt binaries (e.g. to compare two builds); default: build them here.
if [[ -z "${WEBCALL_BIN:-}" || -z "${SOAK_BIN:-}" ]]; then
    cargo build --release --locked -p webcall -p webcall-soak >/dev/null
fi
webcall=${WEBCALL_BIN:-target/release/webcall}; soak=${SOAK_BIN:-target/release/webcall-soak}
pids=(); tmp=$(mktemp -d)
trap 'for p in "${pids[@]}"; do kill -CONT "$p" 2>/dev/null; kill "$p" 2>/dev/null || true; done; rm -rf "$tmp"' EXIT
# serve NAME [flags…]: starts a node, sets PID and ADDR.
serve() {
    local name=$1; shift
    "$webcall" serve --listen 127.0.0.1:0 --turn-listen 127.0.0.1:0 --media-listen 127.0.0.1:0 "$@" >"$tmp/$name" 2>/dev/null & PID=$!
    pids+=("$PID")
    for _ in $(seq 50); do grep -q listening "$tmp/$name" && break; sleep 0.1; done
    ADDR=$(grep -o 'http://[0-9.:]*' "$tmp/$name" | sed 's|http://||')
}
ulimit -n 20000 2>/dev/null || true
if [[ -z "${BLIP:-}" ]]; then
    serve a
    "$soak" --server "$ADDR" --pid "$PID" --duration "$duration" --rounds "$rounds"
else
    port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    redis-server --port "$port" --bind 127.0.0.1 --save "" --appendonly no --loglevel warning >/dev/null & rpid=$!
    pids+=("$rpid")
    for _ in $(seq 50); do (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.1; done
    serve a --redis "redis://127.0.0.1:$port" --node-id soak-a; a_addr=$ADDR; a_pid=$PID
    serve b --redis "redis://127.0.0.1:$port" --node-id soak-b
    "$soak" --server "$a_addr" --pid "$a_pid" --server-b "$ADDR" --pid-b "$PID" \
        --redis-pid "$rpid" --redis-port "$port" --blip "$BLIP" --duration "$duration" --rounds "$rounds"
fi
