#!/usr/bin/env bash
# Runs every webcall test. On a fresh Debian machine with the Rust toolchain it first installs what the tests need
# (system packages, Node packages); a second run skips what is already there.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '\n==> %s\n' "$*"; }

# --- what the tests need --------------------------------------------------------------------------------------
need_pkgs=()
command -v chromium >/dev/null || need_pkgs+=(chromium)
command -v firefox-esr >/dev/null || need_pkgs+=(firefox-esr)
command -v turnutils_uclient >/dev/null || need_pkgs+=(coturn)
command -v redis-server >/dev/null || need_pkgs+=(redis-server)
command -v redis-sentinel >/dev/null || need_pkgs+=(redis-sentinel)
command -v ip >/dev/null || need_pkgs+=(iproute2)
command -v nft >/dev/null || need_pkgs+=(nftables)
command -v unshare >/dev/null || need_pkgs+=(util-linux)
command -v ffmpeg >/dev/null || need_pkgs+=(ffmpeg)
command -v node >/dev/null || need_pkgs+=(nodejs npm)
if [ ${#need_pkgs[@]} -gt 0 ]; then
  log "installing ${need_pkgs[*]}"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need_pkgs[@]}" >/dev/null
  # Debian's coturn may start its own turnserver on 3478; the tests use their own ports, but do not leave it running.
  pkill -x turnserver 2>/dev/null || true
fi
# npm ci on a fresh checkout, and again when package-lock.json is newer than what npm installed (its copy in
# node_modules/.package-lock.json), e.g. after a merge that added a package.
if [ -f package.json ] && { [ ! -d node_modules ] || [ package-lock.json -nt node_modules/.package-lock.json ]; }; then
  log "installing Node packages (npm ci)"
  npm ci --no-audit --no-fund --loglevel=error
fi

# --- Rust: unit and integration tests (real servers on loopback) ------------------------------------------------
log "cargo fmt --check, cargo clippy -D warnings"
cargo fmt --all --check
(cd fuzz && cargo fmt --check)
cargo clippy --workspace --all-targets --locked -- -D warnings

log "cargo test"
cargo build --workspace --all-targets --locked
cargo test --workspace --locked --no-fail-fast -- --test-threads="${WEBCALL_TEST_THREADS:-4}"

# --- browser and end-to-end tests (Node's test runner driving Debian's chromium and firefox-esr) ------------------
# The browsers' ICE offers every interface's address as a candidate, so they run in a network namespace of their own:
# loopback, plus (Firefox gathers no loopback candidates) a veth pair wc0/wc1 with both ends inside it, the
# test-only address 198.18.0.1 (RFC 2544 benchmarking range) on wc0 and the default route through it. Nothing in
# these tests can reach anything outside the namespace (the tests refuse to run otherwise; see tests/e2e/helpers.mjs
# NETNS_SETUP, which must match).
E2E_NETNS='ip link set lo up && ip link add wc0 type veth peer name wc1 && echo 1 > /proc/sys/net/ipv6/conf/wc0/disable_ipv6 && echo 1 > /proc/sys/net/ipv6/conf/wc1/disable_ipv6 && ip addr add 198.18.0.1/24 dev wc0 && ip link set wc0 up && ip link set wc1 up && ip route add default dev wc0'
if [ -d tests/e2e ]; then
  log "end-to-end tests (headless chromium and firefox-esr, network namespace of their own)"
  cargo build --locked -p webcall
  mkdir -p test-artifacts
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO=sudo
  $SUDO unshare --net sh -c "$E2E_NETNS && exec node --test --test-concurrency=1 tests/e2e/"
fi
# --- fuzzing: a short, bounded run of every target (see fuzz/README.md for a long one) ---------------------------
# cargo-fuzz without a sanitizer builds on the stable toolchain; safe Rust gains little from ASan.
log "fuzzing (${WEBCALL_FUZZ_SECONDS:-10} s per target)"
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked --version 0.13.2
for target in $(cd fuzz && cargo fuzz list); do
  out=$(mktemp)
  # A crash fails the run (the whole output, with the crashing input's path, is shown).
  if ! (cd fuzz && cargo fuzz run -s none -O "$target" -- -max_total_time="${WEBCALL_FUZZ_SECONDS:-10}" \
      -print_final_stats=1 >"$out" 2>&1); then
    cat "$out"; rm -f "$out"
    echo "fuzz target $target failed"; exit 1
  fi
  echo "$target: $(grep -E '^Done' "$out" | tail -1)"
  rm -f "$out"
done

log "all tests passed"
