#!/usr/bin/env bash
# SFU benchmark (issue 14): `webcall serve --topology sfu` pinned to one core, loaded by native peers
# (`webcall peer --sfu`) on the other: publishers send the pre-encoded VP8 test pattern (640x360, ~500 kbit/s,
# 30 fps) and the Opus tone; subscribers count RTP datagrams (`--count-only`: no decryption, no decoding).
#
#   bench/sfu.sh                                  # everything below, defaults
#   FANOUT="10 40" MEETING="6" MESH="" bench/sfu.sh
#   WEBCALL_BIN=/tmp/webcall-before bench/sfu.sh  # another build
#
# Per run, over a window of DUR seconds once every peer is connected:
#   - server CPU per forwarded packet = (utime+stime of the server, /proc/PID/stat) / forwarded RTP packets
#     (webcall_sfu_forwarded_packets_total from /metrics), and the server core's busy share;
#   - forwarded packets/s and Mbit/s (webcall_sfu_forwarded_packet_bytes_total, as sent);
#   - loss: UDP receive/send buffer errors of the whole namespace (/proc/net/snmp: exact, the only place a loopback
#     datagram is dropped) and the server's send drops; and forwarded minus counted by the subscribers over the
#     whole run (includes the packets in flight to a peer as it leaves: a few per peer);
#   - memory per subscriber: server RSS with everyone in, minus RSS before the subscribers joined, over N.
# Mesh vs SFU: MESH participants each publish to all others (mesh) or once (SFU): video payload bytes sent per
# client per second, from the peers' own counters.
#
# Runs in a network namespace of its own (re-executes itself under `unshare --net`): loopback only, and the kernel
# counters count only this benchmark. Needs root (unshare), taskset, curl. Every process is killed on exit; each
# run is bounded in time.
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ -z "${WEBCALL_BENCH_NETNS:-}" ]]; then
    # Build outside the namespace (cargo may need the network for nothing, but keep it simple), then re-enter.
    if [[ -z "${WEBCALL_BIN:-}" ]]; then cargo build --release -q -p webcall; fi
    exec unshare --net env WEBCALL_BENCH_NETNS=1 WEBCALL_BIN="${WEBCALL_BIN:-target/release/webcall}" "$0" "$@"
fi
ip link set lo up

FANOUT=${FANOUT:-"5 10 20 40"}  # subscribers of one publisher
MEETING=${MEETING:-"4 6 8 10"}  # participants, each publishing and receiving all others
MESH=${MESH:-"4 6 8"}           # participants for mesh vs SFU
DUR=${DUR:-20}                  # measurement window, seconds
SERVER_CPU=${SERVER_CPU:-0}
PEER_CPUS=${PEER_CPUS:-1}
TICK=$(getconf CLK_TCK)

# shellcheck source=bench/lib.sh
source bench/lib.sh
bench_setup sfu

cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
rss_kb() { awk '/^VmRSS/ {print $2}' "/proc/$1/status"; }
metric() { curl -s "http://$HTTP/metrics" | awk -v m="$1" '$1 == m {print $2}'; }
# UDP RcvbufErrors + SndbufErrors of this namespace.
udp_errors() { awk '/^Udp:/ {n++; if (n == 1) for (i = 1; i <= NF; i++) h[i] = $i; else for (i = 1; i <= NF; i++) if (h[i] == "RcvbufErrors" || h[i] == "SndbufErrors") s += $i} END {print s + 0}' /proc/net/snmp; }

start_server() { # topology [flags]
    bench_serve server "$SERVER_CPU" "$WEBCALL" --no-turn --topology "$1" --max-sfu-peers 1000 --max-peers 16 "${@:2}"
    HTTP=${SERVED_URL#ws://}
    HTTP=${HTTP%/ws}
}

stop_server() {
    kill "$SERVED_PID" 2>/dev/null || true
    wait "$SERVED_PID" 2>/dev/null || true
}

# peer NAME ROOM DURATION [flags]: a `webcall peer --sfu` on the peers' cores; stdout in $TMP/NAME.out.
peer() {
    local name=$1 room=$2 dur=$3
    shift 3
    taskset -c "$PEER_CPUS" env RUST_LOG=error "$WEBCALL" peer --server "$SERVED_URL" --room "$room" --name "$name" \
        --ip 127.0.0.1 --stats-every 1s --duration "${dur}s" "$@" >"$TMP/$name.out" 2>"$TMP/$name.err" &
    PIDS+=($!)
    LAST_PEER=$!
}

wait_lines() { # PATTERN FILES... : until every file has a line matching PATTERN (bounded)
    local pat=$1
    shift
    for _ in $(seq 600); do
        local missing=0
        for f in "$@"; do grep -qs -- "$pat" "$f" || missing=1; done
        [[ $missing == 0 ]] && return 0
        sleep 0.1
    done
    echo "timed out waiting for '$pat' in $*" >&2
    return 1
}

final_field() { # FILE FIELD: from the 'stats final sfu' line
    sed -n 's/^stats final sfu .*\b'"$2"'=\([0-9]*\).*/\1/p' "$1" | tail -1
}

RESULTS="$TMP/results"
: >"$RESULTS"

# measure KIND N PUBLISHERS: the window, then the end-of-run accounting. Peers are already started.
measure() {
    local kind=$1 n=$2 pubs=$3
    local c0 c1 f0 f1 b0 b1 t0 t1 rss
    sleep 2
    c0=$(cpu_ticks "$SERVED_PID"); f0=$(metric webcall_sfu_forwarded_packets_total); b0=$(metric webcall_sfu_forwarded_packet_bytes_total); t0=$(date +%s.%N)
    sleep "$DUR"
    c1=$(cpu_ticks "$SERVED_PID"); f1=$(metric webcall_sfu_forwarded_packets_total); b1=$(metric webcall_sfu_forwarded_packet_bytes_total); t1=$(date +%s.%N)
    rss=$(rss_kb "$SERVED_PID")
    echo "$kind $n $pubs $(echo "$t1 - $t0" | bc -l) $((c1 - c0)) $((f1 - f0)) $((b1 - b0)) $rss" >"$TMP/window"
}

# account KIND N PUBS RSS0 PEER_FILES...: after every peer exited; appends one line to $RESULTS.
account() {
    local kind=$1 n=$2 pubs=$3 rss0=$4
    shift 4
    local fwd drops counted=0 e
    fwd=$(metric webcall_sfu_forwarded_packets_total)
    drops=$(metric webcall_sfu_send_drops_total)
    for f in "$@"; do counted=$((counted + $(final_field "$f" rtp_in))); done
    e=$(( $(udp_errors) - UDP0 ))
    read -r _ _ _ wall ticks pkts bytes rss <"$TMP/window"
    echo "$kind $n $pubs $wall $ticks $pkts $bytes $rss0 $rss $fwd $counted $e $drops" >>"$RESULTS"
}

fanout() { # N subscribers of one publisher
    local n=$1 room="fan$1" files=() subs=()
    start_server sfu
    UDP0=$(udp_errors)
    sleep 0.5
    local rss0
    rss0=$(rss_kb "$SERVED_PID")
    for i in $(seq "$n"); do
        peer "s$i" "$room" $((DUR + 40)) --sfu --count-only
        subs+=("$LAST_PEER"); files+=("$TMP/s$i.out")
    done
    wait_lines '^sfu connected' "${files[@]}"
    peer pub "$room" $((DUR + 6)) --sfu --send testsrc --size 640x360
    local pub=$LAST_PEER
    wait_lines '^sfu connected' "$TMP/pub.out"
    measure fanout "$n" 1
    wait "$pub" || true
    sleep 1
    for p in "${subs[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
    for p in "${subs[@]}"; do wait "$p" 2>/dev/null || true; done
    account fanout "$n" 1 "$rss0" "${files[@]}"
    stop_server
}

meeting() { # M participants, each publishing and receiving the others
    local m=$1 room="meet$1" files=() ps=()
    start_server sfu
    UDP0=$(udp_errors)
    sleep 0.5
    local rss0
    rss0=$(rss_kb "$SERVED_PID")
    for i in $(seq "$m"); do
        peer "m$i" "$room" $((DUR + 30)) --sfu --count-only --send testsrc --size 640x360
        ps+=("$LAST_PEER"); files+=("$TMP/m$i.out")
    done
    wait_lines '^sfu connected' "${files[@]}"
    measure meeting "$m" "$m"
    for p in "${ps[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
    for p in "${ps[@]}"; do wait "$p" 2>/dev/null || true; done
    account meeting "$m" "$m" "$rss0" "${files[@]}"
    stop_server
}

# mesh_vs_sfu N: video payload bytes/s each client sends, peer-to-peer mesh vs through the SFU.
mesh_vs_sfu() {
    local n=$1 topo files
    for topo in mesh sfu; do
        start_server "$topo"
        files=()
        local ps=()
        for i in $(seq "$n"); do
            local flags=(--send testsrc --size 640x360 --expect $((n - 1)))
            [[ $topo == sfu ]] && flags+=(--sfu --count-only)
            peer "x$topo$i" "mesh$n$topo" 20 "${flags[@]}"
            ps+=("$LAST_PEER"); files+=("$TMP/x$topo$i.out")
        done
        for p in "${ps[@]}"; do wait "$p" 2>/dev/null || true; done
        stop_server
        # Per client: each session's payload bytes over its frames, at 30 frames/s; averaged over clients.
        awk -v topo="$topo" -v n="$n" '
            FNR == 1 { if (rate != "") { sum += rate; k++ } rate = 0 }
            topo == "mesh" && /^stats final peer=/ { b = f = 0
                for (i = 1; i <= NF; i++) { split($i, kv, "="); if (kv[1] == "bytes_out") b = kv[2]; if (kv[1] == "frames_out") f = kv[2] }
                if (f > 0) rate += b / f * 30 }
            topo == "sfu" && /^stats final sfu / { b = f = 0
                for (i = 1; i <= NF; i++) { split($i, kv, "="); if (kv[1] == "bytes_out") b = kv[2]; if (kv[1] == "frames_out") f = kv[2] }
                if (f > 0) rate = b / f * 30 }
            END { sum += rate; k++; printf "meshvs %s %d %.0f\n", topo, n, sum / k }' "${files[@]}" >>"$RESULTS"
    done
}

echo "webcall: $BUILT; server on CPU $SERVER_CPU, peers on CPU $PEER_CPUS; window ${DUR}s"
for n in $FANOUT; do fanout "$n"; done
for m in $MEETING; do meeting "$m"; done
for n in $MESH; do mesh_vs_sfu "$n"; done

echo
awk -v tick="$TICK" '
    $1 == "fanout" || $1 == "meeting" {
        wall = $4; cpu = $5 / tick; pkts = $6
        per = pkts > 0 ? cpu * 1e6 / pkts : 0
        subs = ($1 == "fanout") ? $2 : $2
        if (!hdr++) printf "%-8s %4s %4s %9s %8s %8s %9s %7s %11s %9s %9s %7s %6s\n", "run", "N", "pubs", "fwd_pps", "Mbit/s", "cpu_%", "us/pkt", "KiB/sub", "fwd_total", "counted", "missing", "bufErr", "drops"
        printf "%-8s %4d %4d %9.0f %8.2f %8.1f %9.2f %7.0f %11d %9d %9d %7d %6d\n", $1, $2, $3, pkts / wall, $7 * 8 / wall / 1e6, 100 * cpu / wall, per, ($9 - $8) / subs, $10, $11, $10 - $11, $12, $13
    }' "$RESULTS"
echo
awk '$1 == "meshvs" { r[$3][$2] = $4 } END {
        printf "%4s %16s %16s %8s\n", "N", "mesh_kB/s/client", "sfu_kB/s/client", "ratio"
        for (n in r) printf "%4d %16.1f %16.1f %8.2f\n", n, r[n]["mesh"] / 1000, r[n]["sfu"] / 1000, (r[n]["sfu"] > 0 ? r[n]["mesh"] / r[n]["sfu"] : 0)
    }' "$RESULTS"
cp "$RESULTS" "bench/results/sfu-$(date -u +%Y%m%dT%H%M%SZ).txt" 2>/dev/null || true
