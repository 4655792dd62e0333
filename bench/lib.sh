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
