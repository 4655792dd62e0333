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
#   PERF_OUT=/tmp/wc.perf bench/turn/run.sh   # also `perf record -e cpu-clock -g` webcall during the whole run
#   ZS= STEPS="10000 20000 40000" REPS=3 bench/turn/run.sh   # only: zero-loss throughput search (turnload)
#   ZS= STEPS=... TCP=1 bench/turn/run.sh  # the same with the clients on TCP (FLOWS, SIZE, STEP_SECS: see below)
#   STEPS_LOG=saved-output.txt bench/turn/run.sh   # only re-summarise the step lines of a saved search
#   NICE=0 bench/turn/run.sh               # no priority boost (by default servers and load at nice -10, own session)
#   NAP=1 ZS= STEPS=... bench/turn/run.sh  # turnload's receivers drain every 1 ms instead of waiting in epoll, so a
#                                          # relayed datagram wakes no load thread inside the server's send (loopback)
#   QUOTA=25 ZS= STEPS=... bench/turn/run.sh  # each server may use at most 25 % of its core (a cgroup each, CFS
#                                          # quota): both saturate within what the load's one core can offer, so the
#                                          # zero-loss search finds each server's limit instead of the top step
#   CONCURRENT=1 ZS= STEPS=... bench/turn/run.sh  # both servers' loads at once at each step (two turnloads sharing
#                                          # the load CPU): CPU ratios from the very same machine state; for CPU
#                                          # per packet at rates the load CPU carries twice, not for the zero-loss search
# uclient can offer only ~3 000 messages/s (a few % of a server's CPU), so throughput is searched with
# crates/turn/examples/turnload.rs (batched I/O), built here unless LOAD_BIN names a binary.
# (uclient's default mode uses RFC 5766 channel numbers up to 0x7FFF, which webcall accepts by default.)
#
# Needs: cargo, coturn (apt-get install -y coturn). Every process it starts is killed on exit; each load
# run is bounded by `timeout`.
set -euo pipefail
cd "$(dirname "$0")/../.."
# shellcheck source=bench/lib.sh
source bench/lib.sh

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
# On a machine shared with builds, servers and load run at a higher priority (nice -10, the same for both
# servers; CFS weight ~9x that of nice 0), so that other processes take less of the pinned CPUs. NICE=0: off.
# With autogroup scheduling (kernel.sched_autogroup_enabled=1) nice only ranks processes within one session, so
# the script runs in a session of its own whose autogroup gets the same nice.
NICE=${NICE:--10}
if [ "$NICE" != 0 ] && [ -z "${TURN_BENCH_SESSION:-}" ] && command -v setsid >/dev/null; then
  TURN_BENCH_SESSION=1 exec setsid --wait "$0" "$@"
fi
if [ "$NICE" != 0 ]; then
  echo "$NICE" >/proc/self/autogroup 2>/dev/null || true
  SRV_CPU="nice -n $NICE $SRV_CPU"; LOAD_CPU="nice -n $NICE $LOAD_CPU"
fi
SECRET=bench-secret
WC_PORT=${WC_PORT:-34578}
CT_PORT=${CT_PORT:-34478}
PEER_PORT=${PEER_PORT:-34480}
TICK=$(getconf CLK_TCK)

# The throughput search's summary from its step lines ("rep=... server=... rate=... cpu_ns=... <turnload result>").
summarize_steps() {
  awk '
    { for (i = 1; i <= NF; i++) { split($i, kv, "="); v[kv[1]] = kv[2] }
      k = v["rep"]" "v["server"]; ok = (v["not_sent"] == 0 && v["lost_to_peer"] == 0 && v["lost_to_client"] == 0)
      if (!(k in first_bad)) { if (ok) best[k] = v["rate"]; else { first_bad[k] = v["rate"]; why[k] = (v["load_sock_drops"] > 0 ? "load dropped too" : "") } }
      # The same with up to 0.1 % of the packets lost (tells sporadic drops from saturation).
      lossy = (v["lost_to_peer"] + v["lost_to_client"] + v["not_sent"]) > 0.001 * 2 * v["offered"]
      if (!(k in first_bad01)) { if (!lossy) best01[k] = v["rate"]; else first_bad01[k] = v["rate"] }
      pk = v["server"]" "v["rate"]; relayed = v["at_peer"] + v["back"]
      if (ok && relayed > 0) { n[pk]++; cpu[pk, n[pk]] = v["cpu_ns"] / relayed / 1000 }
      if (!(v["rep"] in reps)) { reps[v["rep"]] = 1; nrep++ }
      if (!(v["rate"] in rates)) { rates[v["rate"]] = 1; order[++nrt] = v["rate"] + 0 } }
    function median(pk,   i, j, t, m) { m = n[pk]; for (i = 1; i <= m; i++) a[i] = cpu[pk, i]
      for (i = 1; i <= m; i++) for (j = i + 1; j <= m; j++) if (a[j] < a[i]) { t = a[i]; a[i] = a[j]; a[j] = t }
      return m % 2 ? a[(m + 1) / 2] : (a[m / 2] + a[m / 2 + 1]) / 2 }
    END {
      for (i = 1; i <= nrt; i++) for (j = i + 1; j <= nrt; j++) if (order[j] < order[i]) { t = order[i]; order[i] = order[j]; order[j] = t }
      for (r = 1; r <= nrep; r++) {
        w = best[r" webcall"] + 0; c = best[r" coturn"] + 0
        printf "rep %s: highest zero-loss rate webcall %d msg/s (first lossy: %s%s), coturn %d msg/s (first lossy: %s%s); webcall/coturn = %s\n", r,
          w, (r" webcall" in first_bad ? first_bad[r" webcall"] : "none"), why[r" webcall"] ? ", " why[r" webcall"] : "",
          c, (r" coturn" in first_bad ? first_bad[r" coturn"] : "none"), why[r" coturn"] ? ", " why[r" coturn"] : "",
          (c > 0 ? sprintf("%.2f", w / c) : "n/a")
        if (c > 0) zr[++nz] = w / c
        w = best01[r" webcall"] + 0; c = best01[r" coturn"] + 0
        printf "rep %s: highest rate with loss <= 0.1%%: webcall %d msg/s, coturn %d msg/s; webcall/coturn = %s\n", r, w, c, (c > 0 ? sprintf("%.2f", w / c) : "n/a")
      }
      for (i = 1; i <= nz; i++) for (j = i + 1; j <= nz; j++) if (zr[j] < zr[i]) { t = zr[i]; zr[i] = zr[j]; zr[j] = t }
      if (nz) printf "zero-loss rate webcall/coturn, median over %d repetitions: %.2f (range %.2f-%.2f)\n", nz, nz % 2 ? zr[(nz + 1) / 2] : (zr[nz / 2] + zr[nz / 2 + 1]) / 2, zr[1], zr[nz]
      print "CPU per relayed packet (median over lossless repetitions, us): rate webcall coturn ratio"
      for (i = 1; i <= nrt; i++) { rt = order[i]; w = "webcall "rt; c = "coturn "rt
        if (n[w] && n[c]) printf "  %7d  %6.2f  %6.2f  %.2f  (n=%d/%d)\n", rt, median(w), median(c), median(w) / median(c), n[w], n[c] }
    }' "$1"
}
# STEPS_LOG=FILE: only summarise the step lines of a saved run.
if [ -n "${STEPS_LOG:-}" ]; then grep '^rep=' "$STEPS_LOG" | summarize_steps /dev/stdin; exit 0; fi

for b in turnserver turnutils_uclient turnutils_peer; do
  command -v "$b" >/dev/null || { echo "missing $b: apt-get install -y coturn" >&2; exit 1; }
done

# WC_BIN: a webcall binary to measure instead of this tree's release build (e.g. a saved "before" build).
if [ -z "${WC_BIN:-}" ]; then
  cargo build --release -q -p webcall
  WC_BIN=target/release/webcall
fi
# The load generator of the throughput search and the 1000-allocation run (batched I/O, counts per side).
if [ -n "${STEPS:-}" ] || [ "${IDLE_ALLOCS:-0}" -gt 0 ]; then
  if [ -z "${LOAD_BIN:-}" ]; then
    cargo build --release -q -p webcall-turn --example turnload
    LOAD_BIN=target/release/examples/turnload
  fi
fi
ulimit -n 65536 2>/dev/null || true
TMP=$(mktemp -d)
PIDS=()
CGS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$TMP"
  for g in "${CGS[@]}"; do rmdir "$g" 2>/dev/null || true; done
}
trap cleanup EXIT

$LOAD_CPU turnutils_peer -p "$PEER_PORT" -L 127.0.0.1 >/dev/null 2>&1 & PIDS+=($!)

# WC_THREADS: tokio worker threads (tokio reads TOKIO_WORKER_THREADS).
$SRV_CPU ${WC_THREADS:+env TOKIO_WORKER_THREADS=$WC_THREADS} "$WC_BIN" serve --listen 127.0.0.1:0 --media-listen 127.0.0.1:0 \
  --turn-listen "127.0.0.1:$WC_PORT" --turn-secret "$SECRET" --turn-allow-peer 127.0.0.0/8 \
  --turn-relay-ports 40000-44999 --turn-user-quota 100000 --turn-total-quota 100000 --turn-ip-quota 100000 \
  >"$TMP/webcall.log" 2>&1 & WC_PID=$!; PIDS+=($WC_PID)

$SRV_CPU turnserver -n --listening-ip=127.0.0.1 --relay-ip=127.0.0.1 --listening-port="$CT_PORT" \
  --use-auth-secret --static-auth-secret="$SECRET" --realm=webcall --allow-loopback-peers \
  --no-cli --no-tls --no-dtls --min-port=50000 --max-port=54999 --log-file="$TMP/coturn.log" \
  >/dev/null 2>&1 & CT_PID=$!; PIDS+=($CT_PID)
sleep 1
kill -0 "$WC_PID" && kill -0 "$CT_PID" || { echo "a server did not start" >&2; cat "$TMP"/*.log >&2; exit 1; }
# QUOTA: each server in a cpu cgroup of its own, at most QUOTA % of one core (bench/lib.sh, cpu_quota_group).
if [ -n "${QUOTA:-}" ]; then
  for s in webcall:$WC_PID coturn:$CT_PID; do
    cg=$(cpu_quota_group "webcall-bench-turn-${s%%:*}" "$QUOTA") || exit 1
    CGS+=("$cg")
    echo "${s#*:}" >"$cg/cgroup.procs"
  done
fi

cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
# CPU time of all of a process's threads in ns (scheduler accounting: finer than the 10 ms ticks).
threads_ns() { for t in $(ls /proc/"$1"/task | sort); do echo "$t $(tr ' ' _ </proc/"$1"/task/$t/comm) $(awk '{print $1, $3}' /proc/"$1"/task/$t/schedstat)"; done; }
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
  # The subshell must not inherit the EXIT trap (a signal before the exec would run the cleanup).
  (trap - EXIT; exec perf record -q -e cpu-clock -g -p "$WC_PID" -o "$PERF_OUT") >/dev/null 2>&1 & PERF_PID=$!; PIDS+=($PERF_PID)
fi
echo "load: $M clients x $N msgs x $L B, uclient flags: ${MODE:-(UDP, channels)} -c -X; intervals: ${ZS:-none} ms; $ROUNDS rounds; pinned: $PIN"
for z in $ZS; do
  for r in $(seq "$ROUNDS"); do
    run webcall "$WC_PID" "$WC_PORT" "$z"
    run coturn "$CT_PID" "$CT_PORT" "$z"
  done
done

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

# Zero-loss throughput search: turnload offers each rate of STEPS (client->peer messages/s over FLOWS allocations,
# the peer echoing each back, so twice that in relayed packets/s) for STEP_SECS, rates ascending, the servers
# taking turns at each step (order swapped every repetition), REPS repetitions. A step is lossless when every message went
# out (not_sent=0) and came back (no loss either way); a server's zero-loss rate in a repetition is the highest
# step below its first lossy one; it stops climbing after two lossy steps in a row. Loss is told apart per
# side: datagrams the kernel dropped at the server's sockets, at the load's own sockets, and the rest.
if [ -n "${STEPS:-}" ]; then
  FLOWS=${FLOWS:-10}; STEP_SECS=${STEP_SECS:-2}; REPS=${REPS:-3}; SIZE=${SIZE:-$L}
  echo
  echo "throughput search: $FLOWS flows x $SIZE B, clients over $([ -n "${TCP:-}" ] && echo TCP || echo UDP)$([ "${CONCURRENT:-0}" = 1 ] && echo ", both servers at once"); steps (msg/s each way): $STEPS; $STEP_SECS s each; $REPS repetitions; pinned: $PIN${QUOTA:+, at most $QUOTA % of the core each}; nice: $NICE ($(cat /proc/self/autogroup 2>/dev/null))"
  : >"$TMP/steps"
  # step_start SERVER RATE: one load run against SERVER; its output in $TMP/out-SERVER, the server's CPU over
  # the run ("ns user_ticks sys_ticks") in $TMP/cpu-SERVER.
  step_start() {
    local srv=$1 rate=$2 pid port c0 c1 u0 s0 u1 s1
    if [ "$srv" = webcall ]; then pid=$WC_PID; port=$WC_PORT; else pid=$CT_PID; port=$CT_PORT; fi
    c0=$(cpu_ns "$pid"); read -r u0 s0 < <(awk '{print $14, $15}' "/proc/$pid/stat")
    timeout $((STEP_SECS + 60)) $LOAD_CPU "$LOAD_BIN" --server "127.0.0.1:$port" --secret "$SECRET" \
      ${TCP:+--tcp} ${NAP:+--nap-ms "$NAP"} --flows "$FLOWS" --rate "$rate" --secs "$STEP_SECS" --size "$SIZE" \
      >"$TMP/out-$srv" 2>&1 || true
    c1=$(cpu_ns "$pid"); read -r u1 s1 < <(awk '{print $14, $15}' "/proc/$pid/stat")
    echo "$((c1 - c0)) $((u1 - u0)) $((s1 - s0))" >"$TMP/cpu-$srv"
  }
  for rep in $(seq "$REPS"); do
    if [ $((rep % 2)) = 1 ]; then order="webcall coturn"; else order="coturn webcall"; fi
    declare -A bad=([webcall]=0 [coturn]=0)
    for rate in $STEPS; do
      # Both servers at each step, one after the other, so that they meet the same background load; with
      # CONCURRENT=1 both at once (each its own load), so that they meet the very same machine.
      todo=()
      for srv in $order; do [ "${bad[$srv]}" -ge 2 ] || todo+=("$srv"); done
      if [ "${CONCURRENT:-0}" = 1 ]; then
        jobs_=()
        for srv in "${todo[@]}"; do step_start "$srv" "$rate" & jobs_+=($!); done
        wait "${jobs_[@]}"
      else
        for srv in "${todo[@]}"; do step_start "$srv" "$rate"; done
      fi
      for srv in "${todo[@]}"; do
        read -r cpu u s <"$TMP/cpu-$srv"
        line=$(grep '^result ' "$TMP/out-$srv" || true)
        if [ -z "$line" ]; then echo "$srv $rate: turnload failed: $(tail -1 "$TMP/out-$srv")" >&2; line="result sent=0 lost_to_peer=1"; fi
        echo "rep=$rep server=$srv rate=$rate cpu_ns=$cpu user_ticks=$u sys_ticks=$s ${line#result }" | tee -a "$TMP/steps"
        if grep -qE 'not_sent=0 .*lost_to_peer=0 lost_to_client=0 ' <<<"$line"; then bad[$srv]=0; else bad[$srv]=$((bad[$srv] + 1)); fi
      done
      [ "${bad[webcall]}" -ge 2 ] && [ "${bad[coturn]}" -ge 2 ] && break
    done
  done
  echo
  summarize_steps "$TMP/steps"
fi

# Many allocations: memory per allocation (RSS growth / allocations), CPU while each sends 1 message a second,
# then CPU while they are held with no traffic at all. turnload makes every allocation (and its channel) before
# any traffic and says so ("phase=allocated flows=N"), counts the flows that got packets back through the relay
# (flows_back) and the loss, so the figures rest on a known allocation count; each window starts at its phase.
if [ "${IDLE_ALLOCS:-0}" -gt 0 ]; then
  LOW_SECS=${LOW_SECS:-10}; IDLE_SECS=${IDLE_SECS:-30}
  rss_kb() { awk '/^VmRSS/ {print $2}' "/proc/$1/status"; }
  wait_for() { for _ in $(seq 300); do grep -q "$2" "$1" && return 0; sleep 0.2; done; return 1; }
  echo
  echo "idle: $IDLE_ALLOCS allocations (UDP, one channel each), ${LOW_SECS} s at 1 message/s each ($IDLE_ALLOCS msg/s, 100 B), then ${IDLE_SECS} s held idle"
  for srv in webcall coturn; do
    if [ $srv = webcall ]; then pid=$WC_PID; port=$WC_PORT; else pid=$CT_PID; port=$CT_PORT; fi
    log="$TMP/idle-$srv.log"
    r0=$(rss_kb "$pid")
    timeout $((LOW_SECS + IDLE_SECS + 120)) $LOAD_CPU "$LOAD_BIN" --server "127.0.0.1:$port" --secret "$SECRET" \
      --flows "$IDLE_ALLOCS" --rate "$IDLE_ALLOCS" --secs "$LOW_SECS" --size 100 --hold "$((IDLE_SECS + 2))" \
      --drain-ms 1000 >"$log" 2>&1 & up=$!
    wait_for "$log" 'phase=traffic$' || { echo "$srv: allocations not made: $(tail -1 "$log")" >&2; kill $up; continue; }
    r1=$(rss_kb "$pid"); c0=$(cpu_ns "$pid"); t0=$(now)
    wait_for "$log" 'phase=traffic-done' || true
    c1=$(cpu_ns "$pid"); t1=$(now)
    wait_for "$log" 'phase=holding' || true
    sleep 1; c2=$(cpu_ns "$pid"); threads_ns "$pid" >"$TMP/th0"; t2=$(now); sleep "$IDLE_SECS"
    c3=$(cpu_ns "$pid"); threads_ns "$pid" >"$TMP/th1"; t3=$(now); r2=$(rss_kb "$pid")
    wait "$up" || true
    grep -E '^(phase=allocated|result)' "$log" | sed "s/^/$srv: /"
    awk -v s=$srv -v n="$IDLE_ALLOCS" -v r0="$r0" -v r1="$r1" -v r2="$r2" \
      -v lc="$((c1 - c0))" -v lt="$(echo "$t1 - $t0" | bc -l)" -v ic="$((c3 - c2))" -v it="$(echo "$t3 - $t2" | bc -l)" \
      'BEGIN { printf "%-8s RSS %d -> %d KiB after allocating (%.2f KiB per allocation), %d KiB after the traffic; traffic: CPU %.3f%% of a core (%.1f us per relayed packet at ~%d packets/s); idle: CPU %.4f%% of a core (%.1f ms in %.0f s)\n", s, r0, r1, (r1 - r0) / n, r2, 100 * lc / 1e9 / lt, lc / 1e3 / (2 * n * lt), 2 * n, 100 * ic / 1e9 / it, ic / 1e6, it }'
    # Which threads spent the idle CPU (tid comm ns wake-ups).
    join "$TMP/th0" "$TMP/th1" | awk -v s=$srv -v t="$IDLE_SECS" '{ printf "%-8s   idle thread %-18s %.2f ms, %d wake-ups in %d s\n", s, $2, ($6 - $3) / 1e6, $7 - $4, t }'
  done
fi
# The profile covers every run above (uclient, the throughput search, the allocations).
if [ -n "${PERF_OUT:-}" ]; then kill -INT "$PERF_PID" 2>/dev/null || true; wait "$PERF_PID" 2>/dev/null || true; fi
