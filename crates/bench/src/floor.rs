//! The kernel floor of a relay: what one receive and one send per message on loopback TCP cost, measured the same
//! way as `relay` (clients in pairs, `--window` messages in flight, the server's CPU time per relayed message), so
//! a signaling server's figure can be read as a multiple of it within one run.
//!
//! `floor-server` is a relay with no framing, parsing or routing: a one-thread tokio runtime (epoll), one task per
//! direction of each pair, each doing `read` into a buffer and `write_all` of what it read. `floor` is its load:
//! fixed-size messages (default 1100 bytes, the size of a relayed 1 KiB offer frame) that carry their send time.

use crate::procfs;
use crate::stats::quantile;
use anyhow::{anyhow, bail};
use clap::Args;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::time::timeout_at;

#[derive(Debug, Clone, Args)]
pub struct FloorServerArgs {
    /// Address to listen on (loopback only).
    #[arg(long, default_value = "127.0.0.1:0")]
    pub listen: SocketAddr,
    /// Exit after this many seconds (bounded even if nobody stops it).
    #[arg(long, default_value_t = 600)]
    pub max_seconds: u64,
}

#[derive(Debug, Clone, Args)]
pub struct FloorArgs {
    /// The floor server's address (`floor-server` prints it).
    #[arg(long)]
    pub addr: SocketAddr,
    /// The floor server's process id: its CPU time per relayed message is the figure.
    #[arg(long, value_name = "PID")]
    pub server_pid: u32,
    /// Connections, in pairs.
    #[arg(long, default_value_t = 100)]
    pub clients: usize,
    /// Messages in flight per pair.
    #[arg(long, default_value_t = 1)]
    pub window: usize,
    /// Bytes per message.
    #[arg(long, default_value_t = 1100)]
    pub size: usize,
    #[arg(long, default_value_t = 1.0)]
    pub warmup: f64,
    #[arg(long, default_value_t = 5.0)]
    pub duration: f64,
    /// Print the result as one JSON object on stdout.
    #[arg(long)]
    pub json: bool,
}

/// Each connection starts with its pair number and side (0 or 1), 4 bytes each, little-endian.
const HELLO: usize = 8;

pub fn serve(a: FloorServerArgs) -> anyhow::Result<()> {
    if !a.listen.ip().is_loopback() {
        bail!("--listen must be a loopback address");
    }
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async {
        let listener = TcpListener::bind(a.listen).await?;
        println!("floor server listening on {}", listener.local_addr()?);
        let until = Instant::now() + Duration::from_secs(a.max_seconds);
        let mut waiting: HashMap<u32, TcpStream> = HashMap::new();
        loop {
            let Ok(accepted) = timeout_at(until.into(), listener.accept()).await else { return Ok(()) };
            let (mut s, _) = accepted?;
            s.set_nodelay(true)?;
            let mut hello = [0u8; HELLO];
            s.read_exact(&mut hello).await?;
            let pair = u32::from_le_bytes(hello[..4].try_into().expect("4 bytes"));
            match waiting.remove(&pair) {
                None => {
                    waiting.insert(pair, s);
                }
                Some(other) => {
                    let (ar, aw) = other.into_split();
                    let (br, bw) = s.into_split();
                    tokio::spawn(pipe(ar, bw));
                    tokio::spawn(pipe(br, aw));
                }
            }
        }
    })
}

/// One receive, one send: whatever one `read` returned is written on.
async fn pipe(mut r: tokio::net::tcp::OwnedReadHalf, mut w: tokio::net::tcp::OwnedWriteHalf) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match r.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if w.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
        }
    }
}

type Sample = (u64, u64);

fn ns_since(base: Instant) -> u64 {
    base.elapsed().as_nanos() as u64
}

fn message(size: usize, stamp: u64) -> Vec<u8> {
    let mut m = vec![b'x'; size];
    m[..8].copy_from_slice(&stamp.to_le_bytes());
    m
}

async fn connect(addr: SocketAddr, pair: u32, side: u32) -> anyhow::Result<TcpStream> {
    let mut s = TcpStream::connect(addr).await?;
    s.set_nodelay(true)?;
    let mut hello = [0u8; HELLO];
    hello[..4].copy_from_slice(&pair.to_le_bytes());
    hello[4..].copy_from_slice(&side.to_le_bytes());
    s.write_all(&hello).await?;
    Ok(s)
}

async fn offerer(
    mut s: TcpStream,
    size: usize,
    window: usize,
    base: Instant,
    stop_at: Instant,
    drain: Instant,
) -> anyhow::Result<Vec<Sample>> {
    let mut samples = Vec::new();
    let mut buf = vec![0u8; size];
    for _ in 0..window {
        s.write_all(&message(size, ns_since(base))).await?;
    }
    let mut due = window;
    while due > 0 {
        let Ok(r) = timeout_at(drain.into(), s.read_exact(&mut buf)).await else { break };
        r?;
        let now = ns_since(base);
        let ts = u64::from_le_bytes(buf[..8].try_into().expect("8 bytes"));
        samples.push((now, now.saturating_sub(ts)));
        if Instant::now() < stop_at {
            s.write_all(&message(size, ns_since(base))).await?;
        } else {
            due -= 1;
        }
    }
    Ok(samples)
}

async fn answerer(
    mut s: TcpStream,
    size: usize,
    base: Instant,
    mut done: watch::Receiver<bool>,
) -> anyhow::Result<Vec<Sample>> {
    let mut samples = Vec::new();
    let mut buf = vec![0u8; size];
    loop {
        tokio::select! {
            r = s.read_exact(&mut buf) => match r {
                Ok(_) => {}
                // The offerer is done and gone (its connection closed, so the relay closed this one).
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
                Err(e) => return Err(e.into()),
            },
            _ = done.changed() => break,
        }
        let now = ns_since(base);
        let ts = u64::from_le_bytes(buf[..8].try_into().expect("8 bytes"));
        samples.push((now, now.saturating_sub(ts)));
        s.write_all(&message(size, ns_since(base))).await?;
    }
    Ok(samples)
}

pub async fn run(a: FloorArgs) -> anyhow::Result<(String, String, bool)> {
    if !a.addr.ip().is_loopback() {
        bail!("--addr must be a loopback address");
    }
    if a.clients < 2 || a.clients > 2000 || a.window == 0 || a.window > 64 || a.size < 8 || a.size > 65536 {
        bail!("--clients 2..=2000, --window 1..=64, --size 8..=65536");
    }
    if !(0.0..=60.0).contains(&a.warmup) || !(0.1..=300.0).contains(&a.duration) {
        bail!("--warmup must be 0..=60 s and --duration 0.1..=300 s");
    }
    let pairs = a.clients / 2;
    let mut set = Vec::new();
    for i in 0..pairs as u32 {
        set.push((connect(a.addr, i, 0).await?, connect(a.addr, i, 1).await?));
    }
    let base = Instant::now();
    let measure_from = base + Duration::from_secs_f64(a.warmup);
    let stop_at = measure_from + Duration::from_secs_f64(a.duration);
    let drain = stop_at + Duration::from_secs(5);
    let (done_tx, done_rx) = watch::channel(false);
    let (mut offerers, mut answerers) = (Vec::new(), Vec::new());
    for (x, y) in set {
        answerers.push(tokio::spawn(answerer(y, a.size, base, done_rx.clone())));
        offerers.push(tokio::spawn(offerer(x, a.size, a.window, base, stop_at, drain)));
    }
    tokio::time::sleep_until(measure_from.into()).await;
    let (srv0, gen0, t0) = (procfs::cpu_of(Some(a.server_pid)), procfs::cpu_of(None), ns_since(base));
    tokio::time::sleep_until(stop_at.into()).await;
    let (srv1, gen1, t1) = (procfs::cpu_of(Some(a.server_pid)), procfs::cpu_of(None), ns_since(base));
    let mut lat: Vec<u64> = Vec::new();
    for h in offerers {
        lat.extend(h.await??.into_iter().filter(|(at, _)| (t0..t1).contains(at)).map(|(_, l)| l));
    }
    let _ = done_tx.send(true);
    for h in answerers {
        lat.extend(h.await??.into_iter().filter(|(at, _)| (t0..t1).contains(at)).map(|(_, l)| l));
    }
    lat.sort_unstable();
    let msgs = lat.len() as u64;
    if msgs == 0 {
        return Err(anyhow!("no message relayed in the measured window"));
    }
    let secs = (t1 - t0) as f64 / 1e9;
    let us = |ns: u64| ns as f64 / 1000.0;
    let (p50, p99, max) = (us(quantile(&lat, 0.5)), us(quantile(&lat, 0.99)), us(lat.last().copied().unwrap_or(0)));
    let per_msg = |d: Duration| d.as_secs_f64() * 1e6 / msgs as f64;
    let (srv, gen) = (srv1.saturating_sub(srv0), gen1.saturating_sub(gen0));
    let human = format!(
        "floor relay: {} clients, window {}, {} B, {secs:.1} s: {msgs} msgs, {:.0} msgs/s; p50 {p50:.0} µs; server CPU {:.2} µs per msg ({:.2} cores); generator {:.1} µs per msg",
        a.clients,
        a.window,
        a.size,
        msgs as f64 / secs,
        per_msg(srv),
        srv.as_secs_f64() / secs,
        per_msg(gen),
    );
    let json = serde_json::json!({
        "bench": "relay",
        "target": "floor",
        "clients": a.clients,
        "window": a.window,
        "size": a.size,
        "seconds": secs,
        "msgs": msgs,
        "msgs_per_s": msgs as f64 / secs,
        "latency_us": {"p50": p50, "p99": p99, "max": max},
        "server_cpu_s": srv.as_secs_f64(),
        "server_cpu_us_per_msg": per_msg(srv),
        "server_cores": srv.as_secs_f64() / secs,
        "generator_cpu_us_per_msg": per_msg(gen),
    });
    Ok((human, json.to_string(), a.json))
}
