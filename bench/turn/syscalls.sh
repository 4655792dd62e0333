#!/usr/bin/env bash
# Syscalls and context switches per relayed packet, webcall vs coturn side by side: both servers started as
# bench/turn/run.sh starts them (pinned to CPU 0, load on CPU 1), turnload offers each rate of RATES for SECS,
# and `perf stat` counts each server's system calls (syscalls:sys_enter_*) and context switches over that run.
#
#   RATES="5000 10000" TCP= bench/turn/syscalls.sh       # TCP=1: clients over TCP
#   WC_BIN=/tmp/webcall-before bench/turn/syscalls.sh
#   RECORD=/tmp/prof bench/turn/syscalls.sh            # instead: `perf record -e cpu-clock -g` per server and rate
#   NAP=1 bench/turn/syscalls.sh                       # turnload's receivers nap instead of waiting (see run.sh)
# Needs: perf (root or perf_event_paranoid <= 1, tracefs), coturn. Loopback only; every process is killed on exit.
set -euo pipefail
cd "$(dirname "$0")/../.."
RATES=${RATES:-"5000 10000 40000"}; SECS=${SECS:-2}; FLOWS=${FLOWS:-10}; SIZE=${SIZE:-200}
SECRET=bench-secret; WC_PORT=${WC_PORT:-34578}; CT_PORT=${CT_PORT:-34478}
SRV="nice -n -10 taskset -c 0"; LOAD="nice -n -10 taskset -c 1"
if [ -z "${WC_BIN:-}" ]; then cargo build --release -q -p webcall; WC_BIN=target/release/webcall; fi
if [ -z "${LOAD_BIN:-}" ]; then cargo build --release -q -p webcall-turn --example turnload; LOAD_BIN=target/release/examples/turnload; fi
TMP=$(mktemp -d); PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$TMP"; }
trap cleanup EXIT
$SRV "$WC_BIN" serve --listen 127.0.0.1:0 --media-listen 127.0.0.1:0 \
  --turn-listen "127.0.0.1:$WC_PORT" --turn-secret "$SECRET" --turn-allow-peer 127.0.0.0/8 \
  --turn-relay-ports 40000-44999 --turn-user-quota 100000 --turn-total-quota 100000 --turn-ip-quota 100000 \
  >"$TMP/webcall.log" 2>&1 & WC_PID=$!; PIDS+=($WC_PID)
$SRV turnserver -n --listening-ip=127.0.0.1 --relay-ip=127.0.0.1 --listening-port="$CT_PORT" \
  --use-auth-secret --static-auth-secret="$SECRET" --realm=webcall --allow-loopback-peers \
  --no-cli --no-tls --no-dtls --min-port=50000 --max-port=54999 --log-file="$TMP/coturn.log" \
  >/dev/null 2>&1 & CT_PID=$!; PIDS+=($CT_PID)
sleep 1
echo "syscalls per relayed packet: $FLOWS flows x $SIZE B over $([ -n "${TCP:-}" ] && echo TCP || echo UDP), $SECS s per rate"
for rate in $RATES; do
  for srv in webcall coturn; do
    if [ $srv = webcall ]; then pid=$WC_PID; port=$WC_PORT; else pid=$CT_PID; port=$CT_PORT; fi
    if [ -n "${RECORD:-}" ]; then
      # RECORD=DIR: a cpu-clock profile per server and rate instead of the counts.
      perf record -q -e cpu-clock -g -p "$pid" -o "$RECORD/$srv-$rate.perf" >/dev/null 2>&1 & ppid=$!
    else
      perf stat -x, -e 'syscalls:sys_enter_*' -e context-switches -e task-clock -p "$pid" -o "$TMP/perf" & ppid=$!
    fi
    sleep 0.3
    out=$(timeout $((SECS + 30)) $LOAD "$LOAD_BIN" --server "127.0.0.1:$port" --secret "$SECRET" ${TCP:+--tcp} ${NAP:+--nap-ms "$NAP"} \
          --flows "$FLOWS" --rate "$rate" --secs "$SECS" --size "$SIZE" 2>&1 | grep '^result' || true)
    kill -INT $ppid; wait $ppid 2>/dev/null || true
    relayed=$(sed -n 's/.* at_peer=\([0-9]*\) .* back=\([0-9]*\) .*/\1 \2/p' <<<"$out" | awk '{print $1 + $2}')
    echo "$srv rate=$rate relayed=$relayed ${out#result }"
    [ -n "${RECORD:-}" ] && continue
    awk -F, -v n="${relayed:-0}" '$1 ~ /^[0-9.]+$/ && $1 > 0 && n > 0 {
        name = $3; sub("syscalls:sys_enter_", "", name)
        if (name == "task-clock") printf "    %-16s %8.2f us/pkt\n", name, $1 * 1000 / n; else printf "    %-16s %8.3f /pkt\n", name, $1 / n
        if ($3 ~ /^syscalls/) tot += $1 }
      END { if (n > 0) printf "    %-16s %8.3f /pkt\n", "SYSCALLS", tot / n }' "$TMP/perf" | sort -k2 -nr
  done
done
