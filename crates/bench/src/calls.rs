//! Calls benchmark: native peers (`webcall peer`, this same binary) call each other through a signaling server.
//! For each call, peer A joins a fresh room, then peer B joins; B's output lines are timestamped as they arrive:
//! join (`joined room`) → ICE connected (`peer … ice connected`) → DTLS connected (`peer … connected`) → first
//! received video frame (`peer … recording`, written at the first keyframe). `--concurrency` calls run at once,
//! which gives the sustained call setups per second.

use crate::procfs;
use crate::stats::quantile;
use anyhow::{anyhow, bail, Context};
use clap::Args;
use futures_util::{StreamExt, TryStreamExt};
use std::process::Stdio;
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use tokio::process::{Child, ChildStdout, Command};

#[derive(Debug, Clone, Args)]
pub struct CallArgs {
    /// Signaling URL of a webcall server (loopback).
    #[arg(long)]
    pub url: String,
    /// The server's process id (CPU time per call setup from /proc).
    #[arg(long, value_name = "PID")]
    pub server_pid: Option<u32>,
    /// Calls to set up (at most 1000).
    #[arg(long, default_value_t = 20)]
    pub calls: usize,
    /// Calls set up at once.
    #[arg(long, default_value_t = 1)]
    pub concurrency: usize,
    /// Video size the peers send (`webcall peer --size`: 320x180, 640x360 or 1280x720).
    #[arg(long, default_value = "320x180")]
    pub size: String,
    /// Print the result as one JSON object on stdout.
    #[arg(long)]
    pub json: bool,
}

/// Milliseconds from B's join to each milestone.
#[derive(Debug, Clone, Copy)]
struct Times {
    ice: f64,
    dtls: f64,
    frame: f64,
}

/// How long one call may take to reach its first frame before the run is abandoned.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

fn peer(
    url: &str,
    room: &str,
    name: &str,
    size: &str,
    dir: &std::path::Path,
) -> anyhow::Result<(Child, Lines<BufReader<ChildStdout>>)> {
    let mut child = Command::new(std::env::current_exe()?)
        .args(["peer", "--server", url, "--room", room, "--name", name, "--send", "testsrc", "--size", size])
        .args(["--ip", "127.0.0.1", "--duration", "40s", "--stats-every", "60s"])
        .arg("--record")
        .arg(dir)
        .env("RUST_LOG", "error")
        .stdout(Stdio::piped())
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .context("starting webcall peer")?;
    let out = child.stdout.take().ok_or_else(|| anyhow!("no stdout"))?;
    Ok((child, BufReader::new(out).lines()))
}

async fn line(lines: &mut Lines<BufReader<ChildStdout>>, who: &str) -> anyhow::Result<String> {
    lines.next_line().await?.ok_or_else(|| anyhow!("peer {who} exited early"))
}

async fn call(url: &str, i: usize, nonce: u64, size: &str, dir: &std::path::Path) -> anyhow::Result<Times> {
    let room = format!("call{nonce}-{i}");
    let (mut a, mut a_out) = peer(url, &room, "a", size, dir)?;
    while !line(&mut a_out, "a").await?.starts_with("joined room") {}
    // A keeps printing; drain it so its pipe never fills.
    let drain = tokio::spawn(async move { while let Ok(Some(_)) = a_out.next_line().await {} });
    let (mut b, mut b_out) = peer(url, &room, "b", size, dir)?;
    let (mut join, mut ice, mut dtls) = (None, None, None);
    let frame = loop {
        let l = line(&mut b_out, "b").await?;
        let now = Instant::now();
        if l.starts_with("joined room") {
            join = Some(now);
        } else if l.starts_with("peer ") && (l.ends_with(" ice connected") || l.ends_with(" ice completed")) {
            // str0m reports `completed` when the first nominated pair works, sometimes without `connected` first.
            ice = ice.or(Some(now));
        } else if l.starts_with("peer ") && l.contains(" ice ") {
        } else if l.starts_with("peer ") && l.ends_with(" connected") {
            dtls = dtls.or(Some(now));
        } else if l.starts_with("peer ") && l.contains(" recording ") {
            break now;
        } else if l.starts_with("signaling error") {
            bail!("call {i}: {l}");
        }
    };
    let _ = a.start_kill();
    let _ = b.start_kill();
    let _ = a.wait().await;
    let _ = b.wait().await;
    drain.abort();
    let join = join.ok_or_else(|| anyhow!("call {i}: no join line"))?;
    let ms = |t: Option<Instant>| t.map_or(f64::NAN, |t| t.duration_since(join).as_secs_f64() * 1e3);
    Ok(Times { ice: ms(ice), dtls: ms(dtls), frame: ms(Some(frame)) })
}

pub async fn run(a: CallArgs) -> anyhow::Result<(String, String, bool)> {
    if a.calls == 0 || a.calls > 1000 || a.concurrency == 0 || a.concurrency > 64 {
        bail!("--calls must be 1..=1000 and --concurrency 1..=64");
    }
    if !a.url.starts_with("ws://127.") && !a.url.starts_with("ws://[::1]") && !a.url.starts_with("ws://localhost") {
        bail!("webcall bench only dials loopback addresses, not {}", a.url);
    }
    let dir = std::env::temp_dir().join(format!("webcall-bench-calls-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let nonce = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_micros() as u64 % 1_000_000_000;
    let (t0, cpu0) = (Instant::now(), procfs::cpu_of(a.server_pid));
    let result: anyhow::Result<Vec<Times>> = futures_util::stream::iter(0..a.calls)
        .map(|i| {
            let (url, size, dir) = (a.url.clone(), a.size.clone(), dir.clone());
            async move {
                tokio::time::timeout(CALL_TIMEOUT, call(&url, i, nonce, &size, &dir))
                    .await
                    .map_err(|_| anyhow!("call {i} had no video within {CALL_TIMEOUT:?}"))?
            }
        })
        .buffer_unordered(a.concurrency)
        .try_collect()
        .await;
    let (secs, cpu) = (t0.elapsed().as_secs_f64(), procfs::cpu_of(a.server_pid).saturating_sub(cpu0));
    let _ = std::fs::remove_dir_all(&dir);
    let times = result?;
    let pick = |f: fn(&Times) -> f64| {
        let mut v: Vec<u64> = times.iter().map(|t| (f(t) * 1000.0) as u64).collect();
        v.sort_unstable();
        (quantile(&v, 0.5) as f64 / 1000.0, quantile(&v, 0.95) as f64 / 1000.0)
    };
    let (ice, dtls, frame) = (pick(|t| t.ice), pick(|t| t.dtls), pick(|t| t.frame));
    let rate = a.calls as f64 / secs;
    let srv_ms = cpu.as_secs_f64() * 1e3 / a.calls as f64;
    let human = format!(
        "calls: {} calls, {} at once, {}: join → ICE connected median {:.1} ms (p95 {:.1}), → DTLS connected {:.1} ms (p95 {:.1}), → first video frame {:.1} ms (p95 {:.1}); {rate:.2} call setups/s (whole call: spawn both peers, first frame, hang up); server CPU {srv_ms:.2} ms per call",
        a.calls, a.concurrency, a.size, ice.0, ice.1, dtls.0, dtls.1, frame.0, frame.1,
    );
    let json = serde_json::json!({
        "bench": "calls", "calls": a.calls, "concurrency": a.concurrency, "size": a.size,
        "join_to_ice_ms": {"p50": ice.0, "p95": ice.1},
        "join_to_dtls_ms": {"p50": dtls.0, "p95": dtls.1},
        "join_to_frame_ms": {"p50": frame.0, "p95": frame.1},
        "setups_per_s": rate, "seconds": secs,
        "server_cpu_ms_per_call": a.server_pid.map(|_| srv_ms),
    });
    Ok((human, json.to_string(), a.json))
}
