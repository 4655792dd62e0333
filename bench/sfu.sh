#!/usr/bin/env bash
# SFU benchmark (issue 14): `webcall serve --topology sfu` and, side by side in the same run, Janus's VideoRoom
# (Debian `janus`, installed if missing), each pinned to one core and loaded by the same native peers
# (`webcall peer --sfu`, with `--janus` for Janus's HTTP API) on the other core: publishers send the pre-encoded
# VP8 test pattern (640x360, ~500 kbit/s, 30 fps) and the Opus tone; subscribers count RTP datagrams
# (`--count-only`: no decryption, no decoding; their sockets are drained every 5 ms, so a forwarded datagram wakes
# no receiver, which on loopback the sending server would pay for).
#
#   bench/sfu.sh                                  # defaults below
#   FANOUT="10 40" MEETING="6" MESH="" bench/sfu.sh
#   JANUS=0 bench/sfu.sh                          # webcall only
#   WEBCALL_BIN=/tmp/webcall-before bench/sfu.sh  # another build
#   WEBCALL_BIN=/tmp/before PEER_BIN=target/release/webcall bench/sfu.sh  # another server, the same generator
#   SAVE=bench/results/sfu-NAME.txt bench/sfu.sh  # also keep the raw lines (cite them in BENCHMARKS.md)
#   QUOTA=25 SATURATE="10 30 50" FANOUT= MEETING= MESH= bench/sfu.sh
#                                                 # each server limited to 25 % of its core (a CFS quota in a cgroup
#                                                 # of its own): its saturation within what one generator core can
#                                                 # offer; packets/s at the last lossless step / 0.25 = per core
#
# Per run, over a window of DUR seconds once every peer is connected:
#   - server CPU per forwarded packet = the server's CPU time (all threads' schedstat) / RTP packets the subscribers
#     counted in the window (the same measure for both servers; webcall's own forwarded-packet counter from
#     /metrics is shown next to it), and the server core's busy share;
#   - packets/s and Mbit/s forwarded;
#   - loss: UDP receive/send buffer errors of the whole namespace (/proc/net/snmp: on loopback the only place a
#     datagram is dropped), webcall's send drops, and webcall's forwarded minus counted over the whole run (this
#     includes what was in flight to a peer as it left: a few packets per peer);
#   - memory per subscriber: server RSS in the window minus RSS before anyone joined, over N.
#   - webcall only, `tmo/pkt`: str0m session timeouts the SFU ran per packet it forwarded (/metrics), the work
#     str0m does per packet besides sending it (vendor/str0m/PATCHES.md); a count, so free of the machine's noise.
# Mesh vs SFU: MESH participants each publish to all others (mesh) or once (SFU): video payload bytes each client
# sends per second, from the peers' own counters.
#
# Runs in a network namespace of its own (re-executes itself under `unshare --net`), with lo and a veth pair whose
# both ends stay inside (198.18.0.1 on wc0: libnice, hence Janus, gathers no loopback candidates); the kernel
# counters count only this benchmark. Needs root (unshare, ip), taskset, curl. Every process is killed on exit;
# each run is bounded in time.
set -euo pipefail
cd "$(dirname "$0")/.."

JANUS=${JANUS:-1} # 0: webcall only
if [[ -z "${WEBCALL_BENCH_NETNS:-}" ]]; then
    if [[ $JANUS == 1 ]] && ! command -v janus >/dev/null; then
        echo "installing janus (Debian package)" >&2
        apt-get install -y -qq janus >/dev/null || { echo "janus missing: apt-get install -y janus (JANUS=0 skips it)" >&2; exit 1; }
    fi
    if [[ -z "${WEBCALL_BIN:-}" ]]; then cargo build --release -q -p webcall; fi
    exec unshare --net env WEBCALL_BENCH_NETNS=1 WEBCALL_BIN="${WEBCALL_BIN:-target/release/webcall}" "$0" "$@"
fi
ip link set lo up
ip link add wc0 type veth peer name wc1
ip addr add 198.18.0.1/24 dev wc0
ip link set wc0 up
ip link set wc1 up
ADDR=198.18.0.1

FANOUT=${FANOUT-"10 30"}  # subscribers of one publisher
MEETING=${MEETING-"5 10"} # participants, each publishing and receiving all others
MESH=${MESH-"4 6 8"}      # participants for mesh vs SFU
SATURATE=${SATURATE-""}   # saturation steps: extra subscribers of SAT_PUBS publishers (e.g. "0 20 40 80")
SAT_PUBS=${SAT_PUBS:-10}
DUR=${DUR:-15}             # measurement window, seconds
SERVER_CPU=${SERVER_CPU:-0}
PEER_CPUS=${PEER_CPUS:-1}
QUOTA=${QUOTA:-}           # percent of one core each server may use (CFS quota); empty: no limit
JANUS_LIB=/usr/lib/x86_64-linux-gnu/janus
JANUS_PORT=18088

# shellcheck source=bench/lib.sh
source bench/lib.sh
bench_setup sfu
# The load generator's binary: the server's unless PEER_BIN is set (before/after runs of a server change keep the
# same generator).
PEER_WEBCALL=$WEBCALL
if [[ -n ${PEER_BIN:-} ]]; then
    cp "$PEER_BIN" "$TMP/webcall-peer"
    PEER_WEBCALL=$TMP/webcall-peer
fi

# QUOTA: the server in a cpu cgroup of this run's own (bench/lib.sh, cpu_quota_group), removed on exit.
CG=
if [[ -n $QUOTA ]]; then
    CG=$(cpu_quota_group webcall-bench-sfu "$QUOTA") || exit 1
    trap 'bench_cleanup; rmdir "$CG" 2>/dev/null || true' EXIT
fi
# limit PID: moves a server (all its threads, and those it starts later) into the quota's cgroup, if any.
limit() { if [[ -n $CG ]]; then echo "$1" >"$CG/cgroup.procs"; fi; }

# Busy and idle jiffies of CPU $1 (a single CPU number; "0 0" otherwise): the generator core's load.
cpu_busy() { awk -v c="cpu$1" '$1 == c { print $2 + $3 + $4 + $7 + $8 + $9, $5 + $6; f = 1 } END { if (!f) print 0, 0 }' /proc/stat; }
rss_kb() { awk '/^VmRSS/ {print $2}' "/proc/$1/status"; }
metric() { curl -s "http://$HTTP/metrics" | awk -v m="$1" '$1 == m {print $2}'; }
wc_metric() { if [[ $SERVER == webcall ]]; then metric "$1"; else echo 0; fi; }
# UDP RcvbufErrors + SndbufErrors of this namespace.
udp_errors() {
    awk '/^Udp:/ { n++; if (n == 1) for (i = 1; i <= NF; i++) h[i] = $i
                   else for (i = 1; i <= NF; i++) if (h[i] == "RcvbufErrors" || h[i] == "SndbufErrors") s += $i }
         END { print s + 0 }' /proc/net/snmp
}

# Datagrams dropped at the server's own UDP sockets (receive buffer full: the server did not keep up), from
# /proc/net/udp* rows whose inode is one of the server's sockets.
server_drops() {
    local inodes
    inodes=$(find "/proc/$1/fd" -lname 'socket:*' -printf '%l\n' 2>/dev/null | tr -dc '0-9\n' | sort -u | tr '\n' ' ')
    awk -v ino=" $inodes " 'FNR > 1 && index(ino, " " $10 " ") { s += $NF } END { print s + 0 }' /proc/net/udp /proc/net/udp6
}

start_webcall() { # topology
    # (bench_serve puts the media port on 127.0.0.1: the same path through lo as $ADDR.)
    bench_serve server "$SERVER_CPU" "$WEBCALL" --no-turn --topology "$1" --max-sfu-peers 1000 --max-peers 16
    PEER_IP=127.0.0.1
    limit "$SERVED_PID"
    HTTP=${SERVED_URL#ws://}
    HTTP=${HTTP%/ws}
    SERVER=webcall
    PEER_TARGET=(--server "$SERVED_URL")
}

# Janus with the VideoRoom plugin and the HTTP transport only, ICE-lite like webcall, on $ADDR.
start_janus() {
    local d="$TMP/janus"
    mkdir -p "$d"
    {
        echo "general: { configs_folder = \"$d\", plugins_folder = \"$JANUS_LIB/plugins\", transports_folder = \"$JANUS_LIB/transports\","
        echo "  events_folder = \"$JANUS_LIB/events\", loggers_folder = \"$JANUS_LIB/loggers\", debug_level = 3, session_timeout = 120 }"
        echo 'media: { rtp_port_range = "20000-29999" }'
        echo 'nat: { ice_lite = true, ice_enforce_list = "wc0", ignore_mdns = true }'
        echo 'plugins: { disable = "libjanus_audiobridge.so,libjanus_echotest.so,libjanus_lua.so,libjanus_duktape.so,libjanus_nosip.so,libjanus_recordplay.so,libjanus_sip.so,libjanus_streaming.so,libjanus_textroom.so,libjanus_videocall.so,libjanus_voicemail.so" }'
        echo 'transports: { disable = "libjanus_mqtt.so,libjanus_nanomsg.so,libjanus_pfunix.so,libjanus_rabbitmq.so,libjanus_websockets.so" }'
        echo 'events: { broadcast = false, disable = "libjanus_gelfevh.so,libjanus_mqttevh.so,libjanus_nanomsgevh.so,libjanus_rabbitmqevh.so,libjanus_sampleevh.so,libjanus_wsevh.so" }'
        echo 'loggers: { disable = "libjanus_jsonlog.so" }'
    } >"$d/janus.jcfg"
    echo "general: { json = \"compact\", base_path = \"/janus\", http = true, port = $JANUS_PORT, ip = \"$ADDR\", https = false }" >"$d/janus.transport.http.jcfg"
    echo 'admin: { admin_http = false }' >>"$d/janus.transport.http.jcfg"
    echo 'general: { }' >"$d/janus.plugin.videoroom.jcfg"
    taskset -c "$SERVER_CPU" janus -F "$d" -C "$d/janus.jcfg" >"$TMP/janus.log" 2>&1 &
    SERVED_PID=$!
    PIDS+=("$SERVED_PID")
    limit "$SERVED_PID"
    for _ in $(seq 100); do
        curl -s "http://$ADDR:$JANUS_PORT/janus/info" >/dev/null && break
        sleep 0.1
    done
    SERVER=janus
    PEER_IP=$ADDR
    PEER_TARGET=(--janus --server "http://$ADDR:$JANUS_PORT/janus")
}

start() { # SERVER
    if [[ $1 == janus ]]; then start_janus; else start_webcall sfu; fi
}

stop_server() {
    kill "$SERVED_PID" 2>/dev/null || true
    wait "$SERVED_PID" 2>/dev/null || true
}

# peer NAME ROOM DURATION [flags]: a `webcall peer` on the peers' core, to the server started last; stdout in
# $TMP/NAME.out.
peer() {
    local name=$1 room=$2 dur=$3
    shift 3
    taskset -c "$PEER_CPUS" env RUST_LOG=error "$PEER_WEBCALL" peer "${PEER_TARGET[@]}" --room "$room" --name "$name" \
        --ip "$PEER_IP" --stats-every 500ms --duration "${dur}s" "$@" >"$TMP/$name.out" 2>"$TMP/$name.err" &
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

counted_now() { # FIELD FILES...: RTP packets (rtp_in) or bytes (rtp_bytes_in) the peers have counted so far (their
    # last stats lines)
    local field=$1 sum=0 f v
    shift
    for f in "$@"; do
        v=$(grep '^stats sfu ' "$f" | tail -1 | sed -n 's/.*\b'"$field"'=\([0-9]*\).*/\1/p')
        sum=$((sum + ${v:-0}))
    done
    echo "$sum"
}

RESULTS="$TMP/results"
: >"$RESULTS"

# measure FILES...: the window (DUR seconds, 2 s after everyone connected). Peers are already started.
measure() {
    local c0 c1 f0 f1 b0 b1 k0 k1 y0 y1 t0 t1 o0 o1 g0 g1 rss
    sleep 2
    c0=$(cpu_ns "$SERVED_PID"); k0=$(counted_now rtp_in "$@"); f0=$(wc_metric webcall_sfu_forwarded_packets_total)
    y0=$(counted_now rtp_bytes_in "$@")
    b0=$(wc_metric webcall_sfu_forwarded_packet_bytes_total); o0=$(wc_metric webcall_sfu_session_timeouts_total)
    t0=$(date +%s.%N); g0=$(cpu_busy "$PEER_CPUS")
    sleep "$DUR"
    c1=$(cpu_ns "$SERVED_PID"); k1=$(counted_now rtp_in "$@"); f1=$(wc_metric webcall_sfu_forwarded_packets_total)
    y1=$(counted_now rtp_bytes_in "$@")
    b1=$(wc_metric webcall_sfu_forwarded_packet_bytes_total); o1=$(wc_metric webcall_sfu_session_timeouts_total)
    t1=$(date +%s.%N); g1=$(cpu_busy "$PEER_CPUS")
    rss=$(rss_kb "$SERVED_PID")
    echo "$(echo "$t1 - $t0" | bc -l) $((c1 - c0)) $((k1 - k0)) $((f1 - f0)) $((b1 - b0)) $rss $(server_drops "$SERVED_PID") $((y1 - y0)) $((${o1:-0} - ${o0:-0})) $(echo "$g1 $g0" | awk '{ b = $1 - $3; i = $2 - $4; print (b + i > 0 ? 100 * b / (b + i) : 0) }')" >"$TMP/window"
}

# account KIND N PUBS RSS0 PEER_FILES...: after every peer exited; appends one line to $RESULTS.
account() {
    local kind=$1 n=$2 pubs=$3 rss0=$4
    shift 4
    local fwd drops counted=0 e wall cpu cpkts fpkts bytes rss
    fwd=$(wc_metric webcall_sfu_forwarded_packets_total)
    drops=$(wc_metric webcall_sfu_send_drops_total)
    for f in "$@"; do counted=$((counted + $(final_field "$f" rtp_in))); done
    e=$(($(udp_errors) - UDP0))
    read -r wall cpu cpkts fpkts bytes rss sdrops cbytes tmos gen <"$TMP/window"
    echo "$SERVER $kind $n $pubs $wall $cpu $cpkts $fpkts $bytes $rss0 $rss $fwd $counted $e $drops $sdrops $cbytes $tmos $gen" >>"$RESULTS"
}

fanout() { # SERVER N: N subscribers of one publisher
    local n=$2 room=$((1000 + $2)) files=() subs=() rss0 pub
    start "$1"
    UDP0=$(udp_errors)
    sleep 0.5
    rss0=$(rss_kb "$SERVED_PID")
    for i in $(seq "$n"); do
        peer "s$i" "$room" $((DUR + 40)) --sfu --count-only --expect 1
        subs+=("$LAST_PEER"); files+=("$TMP/s$i.out")
    done
    # webcall: subscribers connect first; Janus: they subscribe once the publisher is there.
    if [[ $1 == webcall ]]; then wait_lines '^sfu connected' "${files[@]}" || true; else sleep 2; fi
    peer pub "$room" $((DUR + 10)) --sfu --send testsrc --size 640x360
    pub=$LAST_PEER
    if ! wait_lines '^sfu connected' "$TMP/pub.out" "${files[@]}"; then
        echo "$1 fanout $n: not every peer connected within 60 s; run skipped" >&2
        stop_server
        return
    fi
    measure "${files[@]}"
    wait "$pub" || true
    sleep 1
    for p in "${subs[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
    for p in "${subs[@]}"; do wait "$p" 2>/dev/null || true; done
    account fanout "$n" 1 "$rss0" "${files[@]}"
    stop_server
    rm -f "$TMP"/s*.out "$TMP"/pub.out
}

meeting() { # SERVER M [S]: M participants, each publishing and receiving the others, and S more that only receive
    local m=$2 s=${3:-0} room=$((2000 + $2)) files=() ps=() rss0 kind=meeting
    [[ $s -gt 0 ]] && kind=sat$m
    start "$1"
    UDP0=$(udp_errors)
    sleep 0.5
    rss0=$(rss_kb "$SERVED_PID")
    for i in $(seq "$m"); do
        peer "m$i" "$room" $((DUR + 30)) --sfu --count-only --send testsrc --size 640x360 --expect $((m - 1))
        ps+=("$LAST_PEER"); files+=("$TMP/m$i.out")
    done
    for i in $(seq "$s"); do
        peer "m$((m + i))" "$room" $((DUR + 30)) --sfu --count-only --expect "$m"
        ps+=("$LAST_PEER"); files+=("$TMP/m$((m + i)).out")
    done
    if ! wait_lines '^sfu connected' "${files[@]}"; then
        echo "$1 meeting $m: not every peer connected within 60 s; run skipped" >&2
        for p in "${ps[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
        stop_server
        return
    fi
    # Janus subscribers subscribe once every other publisher is there; webcall's renegotiate as they come.
    sleep $((3 + s / 10))
    measure "${files[@]}"
    for p in "${ps[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
    for p in "${ps[@]}"; do wait "$p" 2>/dev/null || true; done
    account "$kind" $((m + s)) "$m" "$rss0" "${files[@]}"
    stop_server
    rm -f "$TMP"/m*.out
}

# mesh_vs_sfu N: video payload bytes/s each client sends, peer-to-peer mesh vs through webcall's SFU.
mesh_vs_sfu() {
    local n=$1 topo files ps
    for topo in mesh sfu; do
        start_webcall "$topo"
        files=()
        ps=()
        for i in $(seq "$n"); do
            local flags=(--send testsrc --size 640x360 --expect $((n - 1)))
            [[ $topo == sfu ]] && flags+=(--sfu --count-only)
            peer "x$topo$i" "$((3000 + n))" 20 "${flags[@]}"
            ps+=("$LAST_PEER"); files+=("$TMP/x$topo$i.out")
        done
        for p in "${ps[@]}"; do wait "$p" 2>/dev/null || true; done
        stop_server
        # Per client: each session's payload bytes over its frames, at 30 frames/s; averaged over clients.
        awk -v topo="$topo" -v n="$n" '
            FNR == 1 && NR > 1 { sum += rate; k++; rate = 0 }
            topo == "mesh" && /^stats final peer=/ { b = f = 0
                for (i = 1; i <= NF; i++) { split($i, kv, "="); if (kv[1] == "bytes_out") b = kv[2]; if (kv[1] == "frames_out") f = kv[2] }
                if (f > 0) rate += b / f * 30 }
            topo == "sfu" && /^stats final sfu / { b = f = 0
                for (i = 1; i <= NF; i++) { split($i, kv, "="); if (kv[1] == "bytes_out") b = kv[2]; if (kv[1] == "frames_out") f = kv[2] }
                if (f > 0) rate = b / f * 30 }
            END { sum += rate; k++; printf "meshvs %s %d %.0f\n", topo, n, sum / k }' "${files[@]}" >>"$RESULTS"
        rm -f "$TMP"/x*.out
    done
}

SERVERS=webcall
[[ $JANUS == 1 ]] && SERVERS="webcall janus"
echo "webcall: $BUILT$([[ $JANUS == 1 ]] && echo "; janus $(dpkg-query -W -f '${Version}' janus 2>/dev/null)"); server on CPU $SERVER_CPU${QUOTA:+ (at most $QUOTA % of it)}, peers on CPU $PEER_CPUS; window ${DUR}s"
for n in $FANOUT; do for s in $SERVERS; do fanout "$s" "$n"; done; done
for m in $MEETING; do for s in $SERVERS; do meeting "$s" "$m"; done; done
for n in $SATURATE; do for s in $SERVERS; do meeting "$s" "$SAT_PUBS" "$n"; done; done
for n in $MESH; do mesh_vs_sfu "$n"; done

echo
awk '
    $2 == "fanout" || $2 == "meeting" || $2 ~ /^sat/ {
        wall = $5; cpu = $6 / 1e9; pkts = $7
        per = pkts > 0 ? cpu * 1e6 / pkts : 0
        wc = $1 == "webcall"
        if (!hdr++) printf "%-8s %-8s %4s %9s %9s %8s %7s %8s %8s %9s %8s %7s %6s %7s %7s %6s\n", "server", "run", "N", "recv_pps", "srv_pps", "Mbit/s", "cpu_%", "us/pkt", "KiB/sub", "counted", "missing", "bufErr", "drops", "srvDrop", "tmo/pkt", "gen_%"
        printf "%-8s %-8s %4d %9.0f %9s %8.2f %7.1f %8.2f %8.0f %9d %8s %7d %6s %7d %7s %6.0f\n", $1, $2, $3, pkts / wall,
            (wc ? sprintf("%.0f", $8 / wall) : "-"), $17 * 8 / wall / 1e6, 100 * cpu / wall, per,
            ($11 - $10) / $3, $13, (wc ? $12 - $13 : "-"), $14, (wc ? $15 : "-"), $16,
            (wc && $18 > 0 && $8 > 0 ? sprintf("%.2f", $18 / $8) : "-"), $19
        key = $2 " " $3; us[$1 " " key] = per; keys[key] = 1
    }
    END { for (k in keys) if (us["janus " k] > 0) printf "%s: CPU per packet webcall/janus = %.2f\n", k, us["webcall " k] / us["janus " k] }' "$RESULTS"
echo
awk '$1 == "meshvs" { r[$3 " " $2] = $4; ns[$3] = 1 }
    END {
        printf "%4s %16s %16s %8s\n", "N", "mesh_kB/s/client", "sfu_kB/s/client", "ratio"
        for (n in ns) printf "%4d %16.1f %16.1f %8.2f\n", n, r[n " mesh"] / 1000, r[n " sfu"] / 1000, (r[n " sfu"] > 0 ? r[n " mesh"] / r[n " sfu"] : 0)
    }' "$RESULTS"
# Raw lines are kept only when asked (SAVE=FILE), so a run never leaves an uncited file in bench/results.
if [ -n "${SAVE:-}" ]; then cp "$RESULTS" "$SAVE" && echo "raw results: $SAVE"; fi
