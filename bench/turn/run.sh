#!/usr/bin/env bash
# Relay benchmark: webcall's TURN server (`webcall serve`, as a user starts it) vs coturn's turnserver, same load from coturn's turnutils_uclient
# against the same turnutils_peer echo peer, on loopback only. Measures relayed packets/s and bytes/s,
# loss, and server CPU time (utime+stime from /proc/PID/stat, all threads) during each load run.
#
#   bench/turn/run.sh                      # defaults below
#   N=5000 M=10 L=200 ZS=0 ROUNDS=1 WC_THREADS=1 MODE=-t bench/turn/run.sh
#   IDLE_ALLOCS=1000 ZS= bench/turn/run.sh # only: 1000 allocations at ~1 msg/s, then idle: memory, CPU
#   WC_BIN=/tmp/webcall-before bench/turn/run.sh   # measure another webcall binary
#   PIN=0 bench/turn/run.sh                # no CPU pinning (by default both servers share CPU 0, load on CPU 1)
#   PERF_OUT=/tmp/wc.perf bench/turn/run.sh   # also `perf record -e cpu-clock -g` webcall during its load runs
# (uclient's default mode uses RFC 5766 channel numbers up to 0x7FFF, which webcall accepts by default.)
#
# Needs: cargo, coturn (apt-get install -y coturn). Every process it starts is killed on exit; each load
# run is bounded by `timeout`.
set -euo pipefail
cd "$(dirname "$0")/../.."

N=${N:-3000}          # messages per client
M=${M:-10}            # clients (allocations)
L=${L:-200}           # payload bytes
ZS=${ZS-"1 0"}       # per-client send interval in ms; 0 = as fast as uclient can
ROUNDS=${ROUNDS:-3}   # alternating rounds per server and interval
MODE=${MODE:-""}      # extra uclient flags, e.g. "-t" (TCP) or "-s" (Send indications)
# Fairness: both servers on the same one CPU (each may use as many threads as it likes there; coturn keeps its
# own defaults), the load (uclient, echo peer) on the other, so neither server gets more cores than the other.
PIN=${PIN:-1}
if [ "$PIN" = 1 ]; then SRV_CPU="taskset -c 0"; LOAD_CPU="taskset -c 1"; else SRV_CPU=""; LOAD_CPU=""; fi
SECRET=bench-secret
WC_PORT=${WC_PORT:-34578}
CT_PORT=${CT_PORT:-34478}
PEER_PORT=${PEER_PORT:-34480}
TICK=$(getconf CLK_TCK)

for b in turnserver turnutils_uclient turnutils_peer; do
  command -v "$b" >/dev/null || { echo "missing $b: apt-get install -y coturn" >&2; exit 1; }
done

# WC_BIN: a webcall binary to measure instead of this tree's release build (e.g. a saved "before" build).
if [ -z "${WC_BIN:-}" ]; then
  cargo build --release -q -p webcall
  WC_BIN=target/release/webcall
fi
TMP=$(mktemp -d)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$TMP"; }
trap cleanup EXIT

$LOAD_CPU turnutils_peer -p "$PEER_PORT" -L 127.0.0.1 >/dev/null 2>&1 & PIDS+=($!)

# WC_THREADS: tokio worker threads (tokio reads TOKIO_WORKER_THREADS).
$SRV_CPU ${WC_THREADS:+env TOKIO_WORKER_THREADS=$WC_THREADS} "$WC_BIN" serve --listen 127.0.0.1:0 \
  --turn-listen "127.0.0.1:$WC_PORT" --turn-secret "$SECRET" --turn-allow-peer 127.0.0.0/8 \
  --turn-relay-ports 40000-44999 --turn-user-quota 100000 --turn-total-quota 100000 --turn-ip-quota 100000 \
  >"$TMP/webcall.log" 2>&1 & WC_PID=$!; PIDS+=($WC_PID)

$SRV_CPU turnserver -n --listening-ip=127.0.0.1 --relay-ip=127.0.0.1 --listening-port="$CT_PORT" \
  --use-auth-secret --static-auth-secret="$SECRET" --realm=webcall --allow-loopback-peers \
  --no-cli --no-tls --no-dtls --min-port=50000 --max-port=54999 --log-file="$TMP/coturn.log" \
  >/dev/null 2>&1 & CT_PID=$!; PIDS+=($CT_PID)
sleep 1
kill -0 "$WC_PID" && kill -0 "$CT_PID" || { echo "a server did not start" >&2; cat "$TMP"/*.log >&2; exit 1; }

cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
now() { date +%s.%N; }

# run NAME PID PORT Z -> appends "name z sent recv bytes lost wall cpu" to $TMP/results
run() {
  local name=$1 pid=$2 port=$3 z=$4
  local c0 c1 t0 t1 out
  c0=$(cpu_ticks "$pid"); t0=$(now)
  out=$(timeout 120 $LOAD_CPU turnutils_uclient $MODE -c -X -W "$SECRET" -u bench -e 127.0.0.1 -r "$PEER_PORT" \
        -n "$N" -m "$M" -l "$L" -z "$z" -p "$port" 127.0.0.1 2>&1) || true
  t1=$(now); c1=$(cpu_ticks "$pid")
  local sent recv rbytes lost
  sent=$(grep -o 'start_mclient: tot_send_msgs=[0-9]*' <<<"$out" | tail -1 | grep -o '[0-9]*$' || echo 0)
  recv=$(grep -o 'tot_recv_msgs=[0-9]*$' <<<"$out" | tail -1 | grep -o '[0-9]*$' || echo 0)
  rbytes=$(grep -o 'tot_recv_bytes ~ [0-9]*$' <<<"$out" | tail -1 | grep -o '[0-9]*$' || echo 0)
  lost=$(grep -o 'Total lost packets [0-9]*' <<<"$out" | grep -o '[0-9]*$' || echo NA)
  echo "$name $z ${sent:-0} ${recv:-0} ${rbytes:-0} $lost $(echo "$t1 - $t0" | bc -l) $(( c1 - c0 ))" >>"$TMP/results"
}

if [ -n "${PERF_OUT:-}" ]; then
  perf record -q -e cpu-clock -g -p "$WC_PID" -o "$PERF_OUT" >/dev/null 2>&1 & PERF_PID=$!; PIDS+=($PERF_PID)
fi
echo "load: $M clients x $N msgs x $L B, uclient flags: ${MODE:-(UDP, channels)} -c -X; intervals: ${ZS:-none} ms; $ROUNDS rounds; pinned: $PIN"
for z in $ZS; do
  for r in $(seq "$ROUNDS"); do
    run webcall "$WC_PID" "$WC_PORT" "$z"
    run coturn "$CT_PID" "$CT_PORT" "$z"
  done
done

if [ -n "${PERF_OUT:-}" ]; then kill -INT "$PERF_PID" 2>/dev/null || true; wait "$PERF_PID" 2>/dev/null || true; fi
if [ -s "$TMP/results" ]; then
echo
awk -v tick="$TICK" '
  { k=$1" "$2; sent[k]+=$3; recv[k]+=$4; bytes[k]+=$5; lost[k]+=($6=="NA"?0:$6); bad[k]+=($6=="NA"); wall[k]+=$7; cpu[k]+=$8/tick; zs[$2]=1 }
  END {
    printf "%-8s %4s %9s %9s %7s %9s %11s %8s %12s\n", "server", "z", "sent", "recv", "lost", "relay_pps", "relay_MB/s", "cpu_s", "cpu_us/pkt"
    for (z in zs) for (s = 0; s < 2; s++) {
      n = (s == 0 ? "webcall" : "coturn"); k = n" "z
      relayed = sent[k] + recv[k]
      pps[k] = relayed / wall[k]; mbs = 2 * bytes[k] / wall[k] / 1e6
      per[k] = relayed > 0 ? cpu[k] * 1e6 / relayed : 0
      printf "%-8s %4s %9d %9d %7d %9.0f %11.2f %8.2f %12.2f%s\n", n, z, sent[k], recv[k], lost[k], pps[k], mbs, cpu[k], per[k], (bad[k] ? "  (uclient failed)" : "")
    }
    print ""
    for (z in zs) {
      w = "webcall "z; c = "coturn "z
      printf "z=%s ms: throughput webcall/coturn = %.2f, CPU per packet webcall/coturn = %.2f, loss webcall %d vs coturn %d\n", z, pps[w] / pps[c], (per[c] > 0 ? per[w] / per[c] : 0), lost[w], lost[c]
    }
  }' "$TMP/results"
fi

# Many allocations: memory per allocation (RSS growth / allocations), CPU while each sends ~1 message a second,
# then CPU while they are held with no traffic at all (uclient -h keeps them after its last message). The
# windows start only once uclient reports every allocation made ("Total connect time") and, for idle, every
# message sent, so allocation work never falls into them.
if [ "${IDLE_ALLOCS:-0}" -gt 0 ]; then
  IDLE_MSGS=${IDLE_MSGS:-20}; LOW_SECS=${LOW_SECS:-10}; IDLE_SECS=${IDLE_SECS:-30}
  rss_kb() { awk '/^VmRSS/ {print $2}' "/proc/$1/status"; }
  sent_msgs() { grep -o 'tot_send_msgs=[0-9]*' "$1" | tail -1 | grep -o '[0-9]*$' || echo 0; }
  echo
  echo "idle: $IDLE_ALLOCS allocations, $IDLE_MSGS messages of 100 B each (-z 1000), then held idle; CPU over ${LOW_SECS} s of traffic and ${IDLE_SECS} s idle"
  for srv in webcall coturn; do
    if [ $srv = webcall ]; then pid=$WC_PID; port=$WC_PORT; else pid=$CT_PID; port=$CT_PORT; fi
    log="$TMP/idle-$srv.log"
    r0=$(rss_kb "$pid")
    timeout $((IDLE_SECS + 240)) $LOAD_CPU turnutils_uclient -h -c -X -W "$SECRET" -u idle -e 127.0.0.1 -r "$PEER_PORT" \
      -n "$IDLE_MSGS" -m "$IDLE_ALLOCS" -l 100 -z 1000 -p "$port" 127.0.0.1 >"$log" 2>&1 & up=$!
    for _ in $(seq 120); do grep -q 'Total connect time' "$log" && break; sleep 1; done
    grep -q 'Total connect time' "$log" || { echo "$srv: uclient did not finish allocating" >&2; tail -3 "$log" >&2; }
    sleep 2
    m0=$(sent_msgs "$log"); c0=$(cpu_ticks "$pid"); t0=$(now); sleep "$LOW_SECS"
    c1=$(cpu_ticks "$pid"); t1=$(now); m1=$(sent_msgs "$log")
    for _ in $(seq 120); do [ "$(sent_msgs "$log")" -ge $((IDLE_MSGS * IDLE_ALLOCS)) ] && break; sleep 1; done
    sleep 3
    r1=$(rss_kb "$pid"); c2=$(cpu_ticks "$pid"); t2=$(now); sleep "$IDLE_SECS"; c3=$(cpu_ticks "$pid"); t3=$(now)
    kill "$up" 2>/dev/null || true; wait "$up" 2>/dev/null || true
    awk -v s=$srv -v n="$IDLE_ALLOCS" -v r0="$r0" -v r1="$r1" -v tick="$TICK" \
      -v lc="$((c1 - c0))" -v lt="$(echo "$t1 - $t0" | bc -l)" -v lm="$((m1 - m0))" \
      -v ic="$((c3 - c2))" -v it="$(echo "$t3 - $t2" | bc -l)" \
      'BEGIN { printf "%-8s RSS %d -> %d KiB (%.2f KiB per allocation); traffic: %.0f msg/s sent, CPU %.2f%% of a core; idle: CPU %.3f%% of a core (%d ticks in %.0f s)\n", s, r0, r1, (r1 - r0) / n, lm / lt, 100 * lc / tick / lt, 100 * ic / tick / it, ic, it }'
  done
fi
