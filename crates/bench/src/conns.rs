//! Connections benchmark: open and join connections (webcall: rooms of two; PeerJS: connect until `OPEN`) up to
//! each checkpoint, hold them all idle, and read the server's resident memory at each checkpoint.

use crate::procfs;
use crate::proto::{Endpoint, Ws, SETUP_TIMEOUT};
use crate::{Common, Target};
use anyhow::{anyhow, bail, Context};
use clap::Args;
use futures_util::{StreamExt, TryStreamExt};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::Message;

#[derive(Debug, Clone, Args)]
pub struct ConnArgs {
    #[command(flatten)]
    pub common: Common,
    /// Connections held at each checkpoint (cumulative, ascending, at most 15000).
    #[arg(long, value_delimiter = ',', default_value = "1000,5000,10000")]
    pub counts: Vec<usize>,
    /// Connections being opened at once.
    #[arg(long, default_value_t = 100)]
    pub concurrency: usize,
    /// Seconds to let the server settle at each checkpoint before reading its memory.
    #[arg(long, default_value_t = 2.0)]
    pub settle: f64,
}

/// Reads (answering pings) until told to stop; counts connections the server dropped.
async fn hold(mut ws: Ws, mut done: watch::Receiver<bool>, dropped: Arc<AtomicUsize>) {
    loop {
        tokio::select! {
            m = ws.next() => match m {
                Some(Ok(Message::Close(_))) | Some(Err(_)) | None => {
                    dropped.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                Some(Ok(_)) => {}
            },
            _ = done.changed() => return,
        }
    }
}

async fn open(ep: &Endpoint, i: usize, nonce: u64) -> anyhow::Result<Ws> {
    match ep.target {
        Target::Webcall => Ok(ep.webcall_join(i, &format!("c{nonce}-{}", i / 2)).await?.0),
        Target::Peerjs => ep.peerjs_open(i, &format!("c{nonce}n{i}")).await,
    }
}

pub async fn run(a: ConnArgs) -> anyhow::Result<(String, String, bool)> {
    if a.counts.is_empty() || a.counts.windows(2).any(|w| w[0] >= w[1]) || a.counts[a.counts.len() - 1] > 15_000 {
        bail!("--counts must be ascending and at most 15000");
    }
    if a.concurrency == 0 || a.concurrency > 1000 || !(0.0..=60.0).contains(&a.settle) {
        bail!("--concurrency must be 1..=1000 and --settle 0..=60 s");
    }
    let ep = Arc::new(Endpoint::new(&a.common).await?);
    let pid = a.common.first_server_pid();
    let target = a.common.target.as_str();
    let nonce = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_micros() as u64 % 1_000_000_000;
    let rss0 = pid.map(procfs::rss_kib).transpose()?;
    let (done_tx, done_rx) = watch::channel(false);
    let dropped = Arc::new(AtomicUsize::new(0));
    let mut opened = 0;
    let (mut open_secs, mut open_cpu) = (0.0, Duration::ZERO);
    let mut checkpoints = Vec::new();
    let mut human = format!("{target} connections (rooms of two for webcall), {} opened at once:", a.concurrency);
    for &count in &a.counts {
        let (t, cpu0) = (Instant::now(), procfs::cpu_of(pid));
        let new: Vec<Ws> = futures_util::stream::iter(opened..count)
            .map(|i| {
                let ep = ep.clone();
                async move {
                    tokio::time::timeout(SETUP_TIMEOUT, open(&ep, i, nonce))
                        .await
                        .map_err(|_| anyhow!("connection {i} not open within {SETUP_TIMEOUT:?}"))?
                        .with_context(|| format!("opening connection {i}"))
                }
            })
            .buffered(a.concurrency)
            .try_collect()
            .await?;
        let (secs, cpu) = (t.elapsed().as_secs_f64(), procfs::cpu_of(pid).saturating_sub(cpu0));
        for ws in new {
            tokio::spawn(hold(ws, done_rx.clone(), dropped.clone()));
        }
        let n = count - opened;
        opened = count;
        open_secs += secs;
        open_cpu += cpu;
        tokio::time::sleep(Duration::from_secs_f64(a.settle)).await;
        let rss = pid.map(procfs::rss_kib).transpose()?;
        let per_conn = match (rss, rss0) {
            (Some(r), Some(r0)) => Some((r as f64 - r0 as f64) / count as f64),
            _ => None,
        };
        let cpu_us = cpu.as_secs_f64() * 1e6 / n as f64;
        human += &format!(
            "\n  {count:>6} held: opened {n} at {:.0}/s, server CPU {cpu_us:.0} µs per connection; server RSS {} KiB, {} KiB per connection",
            n as f64 / secs,
            rss.map_or("n/a".into(), |r| r.to_string()),
            per_conn.map_or("n/a".into(), |k| format!("{k:.2}")),
        );
        checkpoints.push(serde_json::json!({
            "connections": count, "opened": n, "open_per_s": n as f64 / secs,
            "server_cpu_us_per_conn": pid.map(|_| cpu_us), "rss_kib": rss, "kib_per_conn": per_conn,
        }));
    }
    let dropped = dropped.load(Ordering::Relaxed);
    let cpu_per_conn = open_cpu.as_secs_f64() * 1e6 / opened as f64;
    human += &format!(
        "\n  total: {opened} opened in {open_secs:.2} s ({:.0}/s), server CPU {cpu_per_conn:.0} µs per connection; baseline RSS {} KiB; {dropped} dropped by the server while held",
        opened as f64 / open_secs,
        rss0.map_or("n/a".into(), |r| r.to_string()),
    );
    let _ = done_tx.send(true);
    let json = serde_json::json!({
        "bench": "connections",
        "target": target,
        "concurrency": a.concurrency,
        "opened": opened,
        "open_per_s": opened as f64 / open_secs,
        "server_cpu_us_per_conn": pid.map(|_| cpu_per_conn),
        "baseline_rss_kib": rss0,
        "dropped": dropped,
        "checkpoints": checkpoints,
    });
    Ok((human, json.to_string(), a.common.json))
}
