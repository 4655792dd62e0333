//! Relay benchmark: clients in rooms of two; in each pair one client sends offers, the other answers each one,
//! with `--window` offers in flight per pair. Every message carries its send time, so the receiver measures the
//! one-way latency on the generator's clock.

use crate::procfs;
use crate::proto::{next_text, Endpoint, Kind, Reader, Received, Template, Ws, SETUP_TIMEOUT};
use crate::stats::quantile;
use crate::{Common, Target};
use anyhow::{anyhow, bail, Context};
use clap::Args;
use futures_util::{SinkExt, StreamExt, TryStreamExt};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tokio::time::timeout_at;
use tokio_tungstenite::tungstenite::Message;

#[derive(Debug, Clone, Args)]
pub struct RelayArgs {
    #[command(flatten)]
    pub common: Common,
    /// Connections, in rooms of two (one pair per room).
    #[arg(long, default_value_t = 100)]
    pub clients: usize,
    /// Messages in flight per pair (1: the next offer goes when the answer to the last one is back).
    #[arg(long, default_value_t = 1)]
    pub window: usize,
    /// SDP bytes per message (the whole frame is some 60-120 bytes more).
    #[arg(long, default_value_t = 1024)]
    pub size: usize,
    /// Seconds of load before measuring.
    #[arg(long, default_value_t = 1.0)]
    pub warmup: f64,
    /// Seconds measured.
    #[arg(long, default_value_t = 5.0)]
    pub duration: f64,
    /// WebSocket URL for the second member of each pair: another node of the same cluster (`serve --redis`), so
    /// every message crosses nodes. Default: `--url`.
    #[arg(long, value_name = "URL")]
    pub url_b: Option<String>,
    /// Redis's process id: its CPU time per relayed message is reported too (not added to the server's).
    #[arg(long, value_name = "PID")]
    pub redis_pid: Option<u32>,
}

/// A message received: (receive time, one-way latency), nanoseconds.
type Sample = (u64, u64);

fn ns_since(base: Instant) -> u64 {
    base.elapsed().as_nanos() as u64
}

/// Two joined clients that can address each other.
struct Pair {
    a: Ws,
    b: Ws,
    a_id: String,
    b_id: String,
}

/// The first member of pair `i` connects through `ep`, the second through `ep_b` (the same endpoint, or another
/// node of the cluster).
async fn setup_pair(ep: &Endpoint, ep_b: &Endpoint, i: usize, nonce: u64) -> anyhow::Result<Pair> {
    match ep.target {
        Target::Webcall => {
            let room = format!("r{nonce}-{i}");
            let (mut a, a_id) = ep.webcall_join(2 * i, &room).await?;
            let (b, b_id) = ep_b.webcall_join(2 * i + 1, &room).await?;
            // The first client hears of the second before any relay, so no message is mistaken for load.
            let from = loop {
                if let webcall_protocol::ServerMessage::Hello { from, .. } = crate::proto::next_message(&mut a).await? {
                    break from;
                }
            };
            if from != b_id {
                bail!("hello from {from} but {b_id} joined");
            }
            Ok(Pair { a, b, a_id, b_id })
        }
        Target::Peerjs => {
            let (a_id, b_id) = (format!("r{nonce}a{i}"), format!("r{nonce}b{i}"));
            let a = ep.peerjs_open(2 * i, &a_id).await?;
            let b = ep_b.peerjs_open(2 * i + 1, &b_id).await?;
            Ok(Pair { a, b, a_id, b_id })
        }
    }
}

/// Sends offers, `window` in flight; stops sending at `stop_at` and collects the answers still due until `drain`.
async fn offerer(
    mut ws: Ws,
    t: Template,
    r: Reader,
    window: usize,
    base: Instant,
    stop_at: Instant,
    drain: Instant,
) -> anyhow::Result<Vec<Sample>> {
    let mut samples = Vec::new();
    for _ in 0..window {
        ws.send(Message::text(t.render(ns_since(base)))).await?;
    }
    let mut due = window;
    while due > 0 {
        let Ok(text) = timeout_at(drain.into(), next_text(&mut ws)).await else { break };
        let text = text?;
        let now = ns_since(base);
        let Received::Stamped(ts) = r.read(&text)? else { continue };
        samples.push((now, now.saturating_sub(ts)));
        if Instant::now() < stop_at {
            ws.send(Message::text(t.render(ns_since(base)))).await?;
        } else {
            due -= 1;
        }
    }
    Ok(samples)
}

/// Answers every offer at once, until told to stop.
async fn answerer(
    mut ws: Ws,
    t: Template,
    r: Reader,
    base: Instant,
    mut done: watch::Receiver<bool>,
) -> anyhow::Result<Vec<Sample>> {
    let mut samples = Vec::new();
    loop {
        let text = tokio::select! {
            r = next_text(&mut ws) => r?,
            _ = done.changed() => break,
        };
        let now = ns_since(base);
        let Received::Stamped(ts) = r.read(&text)? else { continue };
        samples.push((now, now.saturating_sub(ts)));
        ws.send(Message::text(t.render(ns_since(base)))).await?;
    }
    Ok(samples)
}

pub async fn run(a: RelayArgs) -> anyhow::Result<(String, String, bool)> {
    if a.clients < 2 || a.clients > 20_000 {
        bail!("--clients must be 2..=20000");
    }
    if a.window == 0 || a.window > 64 {
        bail!("--window must be 1..=64");
    }
    if !(0.0..=60.0).contains(&a.warmup) || !(0.1..=300.0).contains(&a.duration) {
        bail!("--warmup must be 0..=60 s and --duration 0.1..=300 s");
    }
    let ep = Arc::new(Endpoint::new(&a.common).await?);
    let ep_b = match &a.url_b {
        Some(u) => Arc::new(Endpoint::at(&a.common, u).await?),
        None => ep.clone(),
    };
    let pairs = a.clients / 2;
    let nonce = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_micros() as u64 % 1_000_000_000;
    let setup_started = Instant::now();
    let set: Vec<Pair> = futures_util::stream::iter(0..pairs)
        .map(|i| {
            let (ep, ep_b) = (ep.clone(), ep_b.clone());
            async move {
                tokio::time::timeout(SETUP_TIMEOUT, setup_pair(&ep, &ep_b, i, nonce))
                    .await
                    .map_err(|_| anyhow!("pair {i} not set up within {SETUP_TIMEOUT:?}"))?
                    .with_context(|| format!("setting up pair {i}"))
            }
        })
        .buffer_unordered(64)
        .try_collect()
        .await?;
    let setup_secs = setup_started.elapsed().as_secs_f64();

    let pids = a.common.server_pid.clone();
    let cpus = |pids: &[u32]| pids.iter().map(|p| procfs::cpu_of(Some(*p))).collect::<Vec<_>>();
    let redis_pid = a.redis_pid;
    let base = Instant::now();
    let measure_from = base + Duration::from_secs_f64(a.warmup);
    let stop_at = measure_from + Duration::from_secs_f64(a.duration);
    let drain = stop_at + Duration::from_secs(5);
    let (done_tx, done_rx) = watch::channel(false);
    let mut offerers = Vec::new();
    let mut answerers = Vec::new();
    for p in set {
        let target = a.common.target;
        let offer = Template::new(target, Kind::Offer, &p.b_id, a.size);
        let answer = Template::new(target, Kind::Answer, &p.a_id, a.size);
        let (offers, answers) = (Reader::new(target, Kind::Offer, &p.a_id), Reader::new(target, Kind::Answer, &p.b_id));
        answerers.push(tokio::spawn(answerer(p.b, answer, offers, base, done_rx.clone())));
        offerers.push(tokio::spawn(offerer(p.a, offer, answers, a.window, base, stop_at, drain)));
    }

    tokio::time::sleep_until(measure_from.into()).await;
    let (srv0, red0, gen0, t0) =
        (cpus(&pids), redis_pid.map(|p| procfs::cpu_of(Some(p))), procfs::cpu_of(None), ns_since(base));
    tokio::time::sleep_until(stop_at.into()).await;
    let (srv1, red1, gen1, t1) =
        (cpus(&pids), redis_pid.map(|p| procfs::cpu_of(Some(p))), procfs::cpu_of(None), ns_since(base));

    let mut lat: Vec<u64> = Vec::new();
    let mut first_err = None;
    for h in offerers {
        match h.await? {
            Ok(s) => lat.extend(s.into_iter().filter(|(at, _)| (t0..t1).contains(at)).map(|(_, l)| l)),
            Err(e) => first_err = first_err.or(Some(e)),
        }
    }
    let _ = done_tx.send(true);
    for h in answerers {
        match h.await? {
            Ok(s) => lat.extend(s.into_iter().filter(|(at, _)| (t0..t1).contains(at)).map(|(_, l)| l)),
            Err(e) => first_err = first_err.or(Some(e)),
        }
    }
    if let Some(e) = first_err {
        return Err(e.context("a client failed during the run"));
    }
    drop(done_rx);

    lat.sort_unstable();
    let msgs = lat.len() as u64;
    let secs = (t1 - t0) as f64 / 1e9;
    let rate = msgs as f64 / secs;
    let us = |ns: u64| ns as f64 / 1000.0;
    let (p50, p99, max) = (us(quantile(&lat, 0.5)), us(quantile(&lat, 0.99)), us(lat.last().copied().unwrap_or(0)));
    let per_msg = |d: Duration| if msgs > 0 { d.as_secs_f64() * 1e6 / msgs as f64 } else { f64::NAN };
    // Each node's CPU time over the measured window; the server's figure is their sum.
    let node_cpu: Vec<Duration> = srv1.iter().zip(&srv0).map(|(b, a)| b.saturating_sub(*a)).collect();
    let srv_cpu: Duration = node_cpu.iter().sum();
    let redis_cpu = red1.zip(red0).map(|(b, a)| b.saturating_sub(a));
    let gen_cpu = gen1.saturating_sub(gen0);
    let has_pid = !pids.is_empty();
    let url_b = a.url_b.as_deref().unwrap_or(&a.common.url);
    let cross = url_b != a.common.url;
    let target = a.common.target.as_str();
    let human = format!(
        "{target} relay{}: {} clients ({pairs} pairs), window {}, {} B SDP, {:.1} s: {msgs} msgs, {rate:.0} msgs/s; one-way latency p50 {p50:.0} µs, p99 {p99:.0} µs, max {max:.0} µs; server CPU {} per msg ({:.2} cores){}; generator CPU {:.1} µs per msg; setup {setup_secs:.2} s",
        if cross { " across two nodes" } else { "" },
        a.clients,
        a.window,
        a.size,
        secs,
        if has_pid { format!("{:.1} µs", per_msg(srv_cpu)) } else { "n/a (no --server-pid)".into() },
        srv_cpu.as_secs_f64() / secs,
        {
            let mut extra = String::new();
            if node_cpu.len() > 1 {
                let each: Vec<String> = node_cpu.iter().map(|c| format!("{:.1}", per_msg(*c))).collect();
                extra += &format!(" [{} µs per node]", each.join(" + "));
            }
            if let Some(c) = redis_cpu {
                extra += &format!("; Redis CPU {:.1} µs per msg ({:.2} cores)", per_msg(c), c.as_secs_f64() / secs);
            }
            extra
        },
        per_msg(gen_cpu),
    );
    let json = serde_json::json!({
        "bench": "relay",
        "target": target,
        "clients": a.clients,
        "window": a.window,
        "url": a.common.url,
        "url_b": url_b,
        "cross_node": cross,
        "size": a.size,
        "seconds": secs,
        "msgs": msgs,
        "msgs_per_s": rate,
        "latency_us": {"p50": p50, "p99": p99, "max": max},
        "server_cpu_s": has_pid.then_some(srv_cpu.as_secs_f64()),
        "server_cpu_us_per_msg": has_pid.then(|| per_msg(srv_cpu)),
        "server_cores": has_pid.then(|| srv_cpu.as_secs_f64() / secs),
        "node_cpu_us_per_msg": has_pid.then(|| node_cpu.iter().map(|c| per_msg(*c)).collect::<Vec<_>>()),
        "redis_cpu_s": redis_cpu.map(|c| c.as_secs_f64()),
        "redis_cpu_us_per_msg": redis_cpu.map(per_msg),
        "redis_cores": redis_cpu.map(|c| c.as_secs_f64() / secs),
        "generator_cpu_us_per_msg": per_msg(gen_cpu),
        "setup_s": setup_secs,
    });
    Ok((human, json.to_string(), a.common.json))
}
