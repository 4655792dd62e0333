# Shared set-up of the bench scripts (source it): a temp dir, a list of processes killed on exit, and the binary
# under test copied so that a rebuild during the run does not change it.
#   bench_setup NAME   sets TMP, PIDS (append started pids), WEBCALL (the copy) and BUILT (what it is).
bench_setup() {
    TMP=$(mktemp -d "/tmp/webcall-$1.XXXXXX")
    PIDS=()
    trap bench_cleanup EXIT
    if [[ -z "${WEBCALL_BIN:-}" ]]; then
        cargo build --release -p webcall >&2
        WEBCALL_BIN=target/release/webcall
        BUILT="built here from $(git rev-parse --short HEAD)$(git diff --quiet HEAD -- crates Cargo.lock || echo ' plus uncommitted changes')"
    else
        BUILT="prebuilt $WEBCALL_BIN of $(date -u -r "$WEBCALL_BIN" +%FT%TZ)"
    fi
    cp "$WEBCALL_BIN" "$TMP/webcall"
    WEBCALL="$TMP/webcall"
}

bench_cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
    rm -rf "$TMP"
}

# bench_serve NAME CPUS BIN [serve flags…]: starts `BIN serve` pinned to CPUS on a free loopback port, with the
# benchmark limits (all load comes from 127.0.0.x; see BENCHMARKS.md) and the built-in TURN on a free port (welcomes
# carry fresh TURN credentials, as by default). Sets SERVED_PID and SERVED_URL (ws://…/ws); output in $TMP/NAME.out.
bench_serve() {
    local name=$1 cpus=$2 bin=$3
    shift 3
    # Emptied here, not by the redirection below: that runs in the background child, and until it does, an earlier
    # server's address would still be read from the file.
    : >"$TMP/$name.out"
    taskset -c "$cpus" env RUST_LOG=warn "$bin" serve --listen 127.0.0.1:0 --turn-listen 127.0.0.1:0 --media-listen 127.0.0.1:0 \
        --rate-limit 1000000 --max-connections 20000 --max-connections-per-ip 100000 \
        --max-joins-per-ip 100000000 --max-rooms 20000 "$@" >"$TMP/$name.out" 2>"$TMP/$name.err" &
    SERVED_PID=$!
    PIDS+=("$SERVED_PID")
    for _ in $(seq 100); do
        if grep -qs 'listening on' "$TMP/$name.out"; then
            SERVED_URL="ws://$(sed -n 's|.*listening on http://\([^ ]*\).*|\1|p' "$TMP/$name.out")/ws"
            return
        fi
        sleep 0.1
    done
    echo "webcall serve ($name) did not start: $(cat "$TMP/$name.err")" >&2
    exit 1
}

# CPU time of all of a process's threads in ns, from the scheduler's own accounting (/proc/PID/task/*/schedstat):
# exact, where utime+stime count 10 ms ticks (which overstated webcall's SFU by ~1.2x at low packet rates; see
# BENCHMARKS.md, "SFU", eleventh round). A thread that ended during a measured window would be missed.
cpu_ns() { cat /proc/"$1"/task/*/schedstat 2>/dev/null | awk '{s += $1} END {printf "%.0f\n", s}'; }

# cpu_quota_group NAME PERCENT: makes a cpu cgroup (v2 cpu.max, else v1 cfs_quota_us) whose processes may use
# PERCENT % of one core, and prints its path. The period is the shortest whose quota is the kernel's minimum of 1 ms
# (4 ms at 25 %), so that a limited server gets its turns evenly rather than in long bursts. Move a process (all its
# threads, and those it starts later) in with `echo PID >PATH/cgroup.procs`; `rmdir PATH` once it is empty.
# Lets a benchmark saturate a server with the load of one core: a quarter-core server saturates at a quarter of
# the rate a whole core would.
cpu_quota_group() {
    local name=$1 pct=$2 period cg
    period=$(((100000 + pct - 1) / pct))
    if grep -qsw cpu /sys/fs/cgroup/cgroup.controllers; then
        echo +cpu >/sys/fs/cgroup/cgroup.subtree_control 2>/dev/null || true
        cg=/sys/fs/cgroup/$name.$$
        mkdir "$cg" && echo "$((pct * period / 100)) $period" >"$cg/cpu.max" || return 1
    elif [[ -d /sys/fs/cgroup/cpu ]]; then
        cg=/sys/fs/cgroup/cpu/$name.$$
        mkdir "$cg" && echo "$period" >"$cg/cpu.cfs_period_us" && echo $((pct * period / 100)) >"$cg/cpu.cfs_quota_us" ||
            return 1
    else
        echo "a CPU quota needs the cpu cgroup controller (/sys/fs/cgroup)" >&2
        return 1
    fi
    echo "$cg"
}
