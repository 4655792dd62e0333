// Medians over runs and webcall/PeerJS ratios (each ratio taken within one run, then the median of those) from
// the JSON lines bench/signaling.sh writes. Prints Markdown for BENCHMARKS.md.
import { readFileSync } from "node:fs";

const rows = readFileSync(process.argv[2], "utf8").trim().split("\n").filter(Boolean).map((l) => JSON.parse(l));
const median = (xs) => {
  const v = xs.filter((x) => x != null && Number.isFinite(x)).sort((a, b) => a - b);
  if (!v.length) return null;
  const m = v.length >> 1;
  return v.length % 2 ? v[m] : (v[m - 1] + v[m]) / 2;
};
const fmt = (x, d = 1) => (x == null ? "–" : x.toFixed(d));
const runs = [...new Set(rows.map((r) => r.run))];

// With WEBCALL_BASE_BIN, an older webcall binary ("base") ran in the same runs: extra columns for it.
const hasBase = rows.some((r) => r.target === "base");

// One metric: median per target and median of the per-run ratios webcall/peerjs (and webcall/base).
function metric(select, get) {
  const by = (t) => rows.filter((r) => r.target === t && select(r));
  const w = by("webcall"), p = by("peerjs"), o = by("base"), f = by("floor");
  const ratio = (other) => median(runs.map((run) => {
    const a = w.find((r) => r.run === run), b = other.find((r) => r.run === run);
    return a && b && get(a) != null && get(b) ? get(a) / get(b) : null;
  }));
  return {
    webcall: median(w.map(get)), peerjs: median(p.map(get)), ratio: ratio(p), base: median(o.map(get)), baseRatio: ratio(o),
    floor: median(f.map(get)), floorRatio: ratio(f), baseFloorRatio: median(runs.map((run) => {
      const a = o.find((r) => r.run === run), b = f.find((r) => r.run === run);
      return a && b && get(a) != null && get(b) ? get(a) / get(b) : null;
    })),
  };
}

const out = [];
out.push(`${runs.length} run(s); medians; ratio = webcall / PeerJS within each run, median over runs${hasBase ? "; base = the older webcall binary in the same runs" : ""}.`);
out.push("");
out.push(`| benchmark | metric | webcall | PeerJS | ratio |${hasBase ? " base | webcall / base |" : ""}`);
out.push(`|---|---|---:|---:|---:|${hasBase ? "---:|---:|" : ""}`);
const row = (bench, name, m, d = 1) =>
  out.push(`| ${bench} | ${name} | ${fmt(m.webcall, d)} | ${fmt(m.peerjs, d)} | ${fmt(m.ratio, 2)} |` +
    (hasBase ? ` ${fmt(m.base, d)} | ${fmt(m.baseRatio, 2)} |` : ""));
for (const window of [...new Set(rows.filter((r) => r.bench === "relay").map((r) => r.window))].sort((a, b) => a - b)) {
  const sel = (r) => r.bench === "relay" && r.window === window;
  const any = rows.find(sel);
  const b = `relay, ${any.clients} clients, window ${window}, ${any.size} B`;
  row(b, "server CPU µs / relayed msg", metric(sel, (r) => r.server_cpu_us_per_msg), 2);
  row(b, "relayed msgs/s", metric(sel, (r) => r.msgs_per_s), 0);
  row(b, "one-way latency p50 µs", metric(sel, (r) => r.latency_us.p50), 0);
  row(b, "one-way latency p99 µs", metric(sel, (r) => r.latency_us.p99), 0);
  row(b, "one-way latency max µs", metric(sel, (r) => r.latency_us.max), 0);
  row(b, "server cores busy", metric(sel, (r) => r.server_cores), 2);
}
const csel = (r) => r.bench === "connections";
if (rows.some(csel)) {
  const b = "connections";
  row(b, "server CPU µs / connection (connect + join)", metric(csel, (r) => r.server_cpu_us_per_conn), 0);
  row(b, "connections + joins / s", metric(csel, (r) => r.open_per_s), 0);
  row(b, "baseline RSS KiB", metric(csel, (r) => r.baseline_rss_kib), 0);
  const counts = [...new Set(rows.filter(csel).flatMap((r) => r.checkpoints.map((c) => c.connections)))];
  for (const n of counts) {
    const at = (r) => r.checkpoints.find((c) => c.connections === n);
    row(b, `RSS KiB / idle connection at ${n}`, metric(csel, (r) => at(r)?.kib_per_conn), 2);
  }
  row(b, "dropped while held", metric(csel, (r) => r.dropped), 0);
}
// The kernel floor (one read and one write per message through `webcall bench floor-server`), same runs.
if (rows.some((r) => r.target === "floor")) {
  out.push("");
  out.push("Kernel floor (`webcall bench floor-server`: one read + one write per message, nothing else), same runs; ratio = server / floor within each run, median over runs.");
  out.push("");
  out.push(`| relay | floor CPU µs / msg | webcall µs / msg | webcall / floor |${hasBase ? " base µs / msg | base / floor |" : ""}`);
  out.push(`|---|---:|---:|---:|${hasBase ? "---:|---:|" : ""}`);
  for (const window of [...new Set(rows.filter((r) => r.target === "floor").map((r) => r.window))].sort((a, b) => a - b)) {
    const m = metric((r) => r.bench === "relay" && r.window === window, (r) => r.server_cpu_us_per_msg);
    out.push(`| window ${window} | ${fmt(m.floor, 2)} | ${fmt(m.webcall, 2)} | ${fmt(m.floorRatio, 2)} |` +
      (hasBase ? ` ${fmt(m.base, 2)} | ${fmt(m.baseFloorRatio, 2)} |` : ""));
  }
}
console.log(out.join("\n"));
