#!/usr/bin/env bash
# Browser call setup through webcall vs a zero-cost baseline (two pages signaling over a BroadcastChannel), headless
# Debian chromium, in a network namespace with only loopback. See bench/browser.mjs.
#
#   bench/browser.sh            # 3 runs of 10 calls of each kind; medians
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ -z "${WEBCALL_IN_NETNS:-}" ]]; then
    exec unshare --net env WEBCALL_IN_NETNS=1 bash -c 'ip link set lo up && exec "$0" "$@"' "$0" "$@"
fi

RUNS=${RUNS:-3}
export CALLS=${CALLS:-10}
mkdir -p bench/results
OUT=${OUT:-bench/results/browser-$(date -u +%Y%m%dT%H%M%SZ).jsonl}
: > "$OUT"
TMP=$(mktemp -d /tmp/webcall-browser.XXXXXX)
trap 'rm -rf "$TMP"' EXIT

if [[ -z "${WEBCALL_BIN:-}" ]]; then
    cargo build --release -p webcall >&2
    WEBCALL_BIN=target/release/webcall
fi
cp "$WEBCALL_BIN" "$TMP/webcall"
export WEBCALL_BIN="$TMP/webcall"
[[ -d node_modules/playwright-core ]] || npm ci --no-audit --no-fund >&2

echo "chromium: $(chromium --version 2>/dev/null || echo '?'); $(nproc) CPUs" >&2
for run in $(seq "$RUNS"); do
    # node's own timeout bounds a stuck page; this bounds everything else.
    timeout 600 node bench/browser.mjs | jq -c --argjson run "$run" '. + {run: $run}' >>"$OUT"
    echo "run $run of $RUNS done" >&2
done
jq -s -r '
  def median: sort | if length % 2 == 1 then .[length/2|floor] else (.[length/2-1] + .[length/2]) / 2 end;
  def r: .*10|round/10;
  (group_by(.kind) | map({key: .[0].kind, value: {n: length, offer: (map(.offer)|median), answer: (map(.answer)|median), ice: (map(.ice)|median), dtls: (map(.dtls)|median), frame: (map(.frame)|median)}}) | from_entries) as $m
  | "baseline (\($m.baseline.n) calls): join→offer in \($m.baseline.offer|r) ms, →answer out \($m.baseline.answer|r) ms, →ICE \($m.baseline.ice|r) ms, →connected \($m.baseline.dtls|r) ms, →first frame \($m.baseline.frame|r) ms",
    "webcall  (\($m.webcall.n) calls): join→offer in \($m.webcall.offer|r) ms, →answer out \($m.webcall.answer|r) ms, →ICE \($m.webcall.ice|r) ms, →connected \($m.webcall.dtls|r) ms, →first frame \($m.webcall.frame|r) ms",
    "webcall / baseline: ICE \($m.webcall.ice / $m.baseline.ice * 100 | round / 100), first frame \($m.webcall.frame / $m.baseline.frame * 100 | round / 100)"' "$OUT"
