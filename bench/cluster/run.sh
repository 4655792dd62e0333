#!/usr/bin/env bash
# Cross-node relay against single-node relay, in one run (see BENCHMARKS.md, "Cluster: cross-node relay").
#
#   bench/cluster/run.sh                      # 3 runs, medians and ratios at the end
#   RUNS=1 DURATION=2 bench/cluster/run.sh    # a quick look
#
# Each benchmark gets fresh processes: either one `webcall serve` (no Redis), or a redis-server and two
# `webcall serve --redis` nodes A and B, where the first member of every pair joins on A and the second on B, so
# every relayed message goes A → Redis (EVALSHA + PUBLISH) → B or back. The server side (the node, or both nodes
# and Redis) runs on SERVER_CPUS (default CPU 0: the same CPU budget for both setups), the generator
# (`webcall bench relay`, one thread) on GEN_CPU. Everything listens on 127.0.0.1 only; every load is bounded
# (DURATION s plus 1 s warmup, 300 s at most per benchmark); every process started here is stopped on exit. Raw
# results (one JSON object per line) go to $OUT (default bench/results/cluster-DATE.jsonl); the summary goes to
# stdout.
set -euo pipefail
cd "$(dirname "$0")/../.."

RUNS=${RUNS:-3}
DURATION=${DURATION:-5}
CLIENTS=${CLIENTS:-100}
WINDOW=${WINDOW:-8}
SERVER_CPUS=${SERVER_CPUS:-0}
GEN_CPU=${GEN_CPU:-1}
mkdir -p bench/results
OUT=${OUT:-bench/results/cluster-$(date -u +%Y%m%dT%H%M%SZ).jsonl}
: > "$OUT"

command -v redis-server >/dev/null || { echo "redis-server is needed (apt-get install redis-server)" >&2; exit 1; }
command -v jq >/dev/null || { echo "jq is needed" >&2; exit 1; }

source "$(dirname "$0")/../lib.sh"
bench_setup cluster-bench

ulimit -n "$(ulimit -Hn)"

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

REDIS_PID=
REDIS_URL=
start_redis() {
    local port
    port=$(free_port)
    taskset -c "$SERVER_CPUS" redis-server --port "$port" --bind 127.0.0.1 --save "" --appendonly no \
        --loglevel warning >"$TMP/redis.out" 2>&1 &
    REDIS_PID=$!
    PIDS+=("$REDIS_PID")
    for _ in $(seq 100); do
        if redis-cli -p "$port" ping 2>/dev/null | grep -q PONG; then
            REDIS_URL="redis://127.0.0.1:$port"
            return
        fi
        sleep 0.1
    done
    echo "redis-server did not start: $(cat "$TMP/redis.out")" >&2
    exit 1
}

# start_node NAME [serve flags…]: sets NODE_PID and NODE_URL.
NODE_PID=
NODE_URL=
start_node() {
    local name=$1
    shift
    bench_serve "$name" "$SERVER_CPUS" "$WEBCALL" "$@"
    NODE_PID=$SERVED_PID
    NODE_URL=$SERVED_URL
}

stop_all() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
    PIDS=()
}

# bench SETUP RUN WINDOW: one relay benchmark against fresh processes; appends its JSON, tagged, to $OUT.
bench() {
    local setup=$1 run=$2 window=$3 args
    if [[ $setup == single ]]; then
        start_node single
        args=(--url "$NODE_URL" --server-pid "$NODE_PID")
    else
        start_redis
        start_node a --redis "$REDIS_URL" --node-id bench-a
        local url_a=$NODE_URL pid_a=$NODE_PID
        start_node b --redis "$REDIS_URL" --node-id bench-b
        args=(--url "$url_a" --url-b "$NODE_URL" --server-pid "$pid_a,$NODE_PID" --redis-pid "$REDIS_PID")
    fi
    local json
    json=$(timeout 300 taskset -c "$GEN_CPU" "$WEBCALL" bench relay "${args[@]}" --clients "$CLIENTS" \
        --window "$window" --duration "$DURATION" --sources 8 --json)
    stop_all
    echo "$json" | jq -c --argjson run "$run" --arg setup "$setup" '. + {run: $run, setup: $setup}' >>"$OUT"
}

{
    echo "machine: $(nproc) CPUs, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(free -g | awk '/Mem:/{print $2}') GiB"
    echo "webcall $("$WEBCALL" --version | cut -d' ' -f2) ($BUILT), $(redis-server --version | cut -d' ' -f1-3), Linux $(uname -r)"
    echo "server side on CPU $SERVER_CPUS, generator on CPU $GEN_CPU; $CLIENTS clients in rooms of two, 1 KiB SDP, $DURATION s measured per benchmark, $RUNS runs"
} | tee "$TMP/header" >&2
for run in $(seq "$RUNS"); do
    # Alternate which setup goes first, so slow drift on a shared machine does not favour one.
    order="single cluster"
    ((run % 2 == 0)) && order="cluster single"
    for setup in $order; do
        bench "$setup" "$run" 1
        bench "$setup" "$run" "$WINDOW"
    done
    echo "run $run of $RUNS done" >&2
done

# Medians over the runs, per setup and window; ratios = cross-node / single within each run, median over runs
# (the machine's load drifts between runs far more than between the two setups of one run).
cat "$TMP/header"
echo "raw: $OUT"
jq -rs '
  def median: map(select(. != null)) | sort | if length == 0 then null elif length % 2 == 1 then .[length / 2 | floor] else (.[length / 2 - 1] + .[length / 2]) / 2 end;
  def f(d): if . == null then "-" else (. * pow(10; d) | round) / pow(10; d) | tostring end;
  def row: {rate: .msgs_per_s, p50: .latency_us.p50, p99: .latency_us.p99, max: .latency_us.max, nodes: .server_cpu_us_per_msg,
            redis: .redis_cpu_us_per_msg, total: (.server_cpu_us_per_msg + (.redis_cpu_us_per_msg // 0))};
  def keys_: ["rate", "p50", "p99", "max", "nodes", "redis", "total"];
  def med(rows): reduce keys_[] as $k ({}; .[$k] = (rows | map(.[$k]) | median));
  group_by(.window) | map(
    . as $w
    | ($w | map(select(.setup == "single") | {run, r: row})) as $s
    | ($w | map(select(.setup == "cluster") | {run, r: row})) as $c
    | [$s[] as $x | $c[] | select(.run == $x.run) | .r as $y | $x.r as $x
        | {rate: ($y.rate / $x.rate), p50: ($y.p50 / $x.p50), p99: ($y.p99 / $x.p99), max: ($y.max / $x.max),
           nodes: ($y.nodes / $x.nodes), redis: null, total: ($y.total / $x.nodes)}] as $ratios
    | {window: $w[0].window, s: med($s | map(.r)), c: med($c | map(.r)), q: med($ratios)}
  )
  | (["window", "setup", "msgs/s", "p50 µs", "p99 µs", "max µs", "CPU µs/msg: nodes", "Redis", "nodes+Redis"] | @tsv),
    (.[] | .window as $w | (
      [$w, "single"] + ([.s.rate, .s.p50, .s.p99, .s.max] | map(f(0))) + [(.s.nodes, null, .s.total | f(1))],
      [$w, "cross-node"] + ([.c.rate, .c.p50, .c.p99, .c.max] | map(f(0))) + [(.c.nodes, .c.redis, .c.total | f(1))],
      [$w, "ratio", (.q.rate, .q.p50, .q.p99, .q.max, .q.nodes, null, .q.total | f(2))]
    ) | @tsv)
' "$OUT" | column -t -s $'\t'
echo "(medians over the runs; ratio = cross-node / single within a run, median over runs; CPU per relayed message,"
echo " nodes = both nodes summed; nodes+Redis ratio is against the single node's CPU)"
