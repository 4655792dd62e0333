//! Soak and abuse run: while thousands of clients join, churn, flood malformed and oversized frames and read
//! slowly, two well-behaved peers in their own room exchange sequenced messages. Reports whether any of theirs was
//! lost or reordered, the server's memory before, at peak and after, and the refusals it counted.
//!
//! Loopback only: the server address must be in 127.0.0.0/8; clients spread over source addresses 127.0.0.2–.250
//! so per-address limits see many clients. Every loop is bounded in count and time.

use anyhow::{bail, Context, Result};
use clap::Parser;
use futures_util::{SinkExt, StreamExt};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::TcpSocket;
use tokio_tungstenite::tungstenite::Message;
use webcall_protocol::{Event, IceCandidate, Join, ServerMessage, Signal, SignalingClient};

#[derive(Parser)]
#[command(about = "Bounded soak/abuse run against a webcall server on loopback")]
struct Args {
    /// Server address (127.0.0.0/8 only).
    #[arg(long)]
    server: SocketAddr,
    /// Server process id, to read its memory from /proc.
    #[arg(long)]
    pid: u32,
    /// How long the abuse lasts.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Clients that join, talk briefly and leave, over and over (each bounded).
    #[arg(long, default_value_t = 2000)]
    churners: usize,
    /// Clients sending malformed frames as fast as they can.
    #[arg(long, default_value_t = 50)]
    flooders: usize,
    /// Clients sending oversized frames.
    #[arg(long, default_value_t = 50)]
    oversized: usize,
    /// Joined clients that never read while a partner floods them.
    #[arg(long, default_value_t = 20)]
    slow_readers: usize,
    /// Messages per second each well-behaved peer sends (keep under the server's --rate-limit).
    #[arg(long, default_value_t = 40)]
    good_rate: u32,
    /// Repeat the whole run; memory after each round shows whether anything accumulates.
    #[arg(long, default_value_t = 2)]
    rounds: u32,
    /// A second node of the same cluster (`--redis`): the well-behaved peer B joins there, so their messages cross
    /// nodes through Redis.
    #[arg(long)]
    server_b: Option<SocketAddr>,
    /// The second node's process id, for its memory.
    #[arg(long)]
    pid_b: Option<u32>,
    /// Redis blip phase, with --server-b: the redis-server's process id (paused with SIGSTOP for --blip, then
    /// continued) and port (its clients then killed with CLIENT KILL), a third into each round.
    #[arg(long, requires = "server_b")]
    redis_pid: Option<u32>,
    #[arg(long, requires = "redis_pid")]
    redis_port: Option<u16>,
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    blip: Duration,
}

#[derive(Default)]
struct Tally {
    churn_joins: AtomicU64,
    churn_errors: AtomicU64,
    flood_frames: AtomicU64,
    flood_closed: AtomicU64,
    oversize_closed: AtomicU64,
    slow_cut: AtomicU64,
    connect_failures: AtomicU64,
}

type Ws = tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>;

fn source(i: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2 + (i % 249) as u8))
}

async fn connect(server: SocketAddr, from: IpAddr) -> Result<Ws> {
    let sock = TcpSocket::new_v4()?;
    sock.bind(SocketAddr::new(from, 0))?;
    let tcp = sock.connect(server).await?;
    let (ws, _) = tokio_tungstenite::client_async(format!("ws://{server}/ws"), tcp).await?;
    Ok(ws)
}

/// The next server message within `wait` (`None`: none, or one the typed protocol cannot read).
async fn recv_message(ws: &mut Ws, wait: Duration) -> Option<ServerMessage> {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        match tokio::time::timeout_at(deadline, ws.next()).await {
            Ok(Some(Ok(Message::Text(t)))) => return ServerMessage::parse(&t).ok(),
            Ok(Some(Ok(_))) => continue,
            _ => return None,
        }
    }
}

/// The peer id of a `welcome`.
fn welcome_id(m: Option<ServerMessage>) -> Option<String> {
    match m? {
        ServerMessage::Welcome { id, .. } => Some(id),
        _ => None,
    }
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

async fn metrics(server: SocketAddr) -> Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(server).await?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: soak\r\nConnection: close\r\n\r\n").await?;
    let mut out = String::new();
    s.read_to_string(&mut out).await?;
    Ok(out)
}

/// The next event of `client` from `ws` within `wait` (`None`: none, or a frame the typed protocol cannot read).
async fn next_event(ws: &mut Ws, client: &mut SignalingClient, wait: Duration) -> Option<Event> {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        match tokio::time::timeout_at(deadline, ws.next()).await {
            Ok(Some(Ok(Message::Text(t)))) => return client.receive(&t).ok(),
            Ok(Some(Ok(_))) => continue,
            _ => return None,
        }
    }
}

/// Writes whatever `client` has to send; `false` if a write failed.
async fn flush(ws: &mut Ws, client: &mut SignalingClient) -> bool {
    while let Some(frame) = client.poll_transmit() {
        if ws.send(Message::text(frame)).await.is_err() {
            return false;
        }
    }
    true
}

/// A well-behaved peer joined to `room` as `name` from source address `from`: its connection and client.
async fn join_good(server: SocketAddr, from: Ipv4Addr, room: &str, name: &str) -> Result<(Ws, SignalingClient)> {
    let mut ws = connect(server, IpAddr::V4(from)).await?;
    let mut client = SignalingClient::new(Join::new(room.to_owned(), name.to_owned()));
    ws.send(Message::text(client.connected())).await?;
    match next_event(&mut ws, &mut client, Duration::from_secs(5)).await {
        Some(Event::Welcome { .. }) => Ok((ws, client)),
        other => bail!("{name}: no welcome, got {other:?}"),
    }
}

/// One well-behaved peer's run: sends candidates `seq 0`, `seq 1`, … to `to` at `rate` until `until`, and reads
/// until 2 s after (so in-flight messages arrive); returns (sent, received, lost or reordered).
async fn good_run(mut ws: Ws, mut client: SignalingClient, to: String, rate: u32, until: Instant) -> (u64, u64, u64) {
    let mut tick = tokio::time::interval(Duration::from_secs(1) / rate);
    let (mut sent, mut next, mut bad) = (0u64, 0u64, 0u64);
    let mut sending = true;
    let stop = until + Duration::from_secs(2);
    loop {
        tokio::select! {
            _ = tick.tick(), if sending && Instant::now() < until => {
                let c = IceCandidate { candidate: format!("seq {sent}"), sdp_mid: Some("0".into()), ..Default::default() };
                client.send(&to, &Signal::Candidate(Some(c)));
                // Counted once written; a failed write ends the sending (the reading goes on).
                sending = flush(&mut ws, &mut client).await;
                sent += u64::from(sending);
            }
            m = tokio::time::timeout_at(stop.into(), ws.next()) => {
                let Ok(Some(Ok(msg))) = m else { break };
                let Message::Text(t) = msg else { continue };
                let c = match client.receive(&t) {
                    Ok(Event::Signal { signal: Signal::Candidate(Some(c)), .. }) => c,
                    Ok(Event::Error { .. }) => {
                        bad += 1; // a refusal of ours is a lost message too
                        continue;
                    }
                    _ => continue,
                };
                let Some(seq) = c.candidate.strip_prefix("seq ") else { continue };
                let seq: u64 = seq.parse().unwrap_or(u64::MAX);
                if seq != next {
                    bad += 1;
                }
                next = seq.wrapping_add(1);
            }
        }
    }
    let _ = ws.close(None).await;
    (sent, next, bad)
}

/// The two well-behaved peers, through the protocol's [`SignalingClient`]: each sends `seq` 0,1,2… to the other;
/// returns (sent, received, lost or reordered) for each.
async fn good_pair(
    server: SocketAddr,
    server_b: SocketAddr,
    rate: u32,
    until: Instant,
) -> Result<[(u64, u64, u64); 2]> {
    let (mut a, mut ca) = join_good(server, Ipv4Addr::new(127, 0, 0, 251), "soak-good", "A").await?;
    let (b, cb) = join_good(server_b, Ipv4Addr::new(127, 0, 0, 252), "soak-good", "B").await?;
    let hello = next_event(&mut a, &mut ca, Duration::from_secs(5)).await;
    let Some(Event::Hello { from: idb, .. }) = hello else { bail!("A did not see B's hello: {hello:?}") };
    let ida = ca.id().context("A's id")?.to_owned();
    let (ra, rb) = tokio::join!(good_run(a, ca, idb, rate, until), good_run(b, cb, ida, rate, until));
    Ok([ra, rb])
}

/// After `after`: pauses Redis (SIGSTOP) for `pause`, continues it, then kills its clients' connections.
async fn redis_blip(pid: u32, port: u16, pause: Duration, after: Duration) -> Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let signal = |sig: &str| {
        let ok = std::process::Command::new("kill").args([sig, &pid.to_string()]).status().is_ok_and(|s| s.success());
        if ok {
            Ok(())
        } else {
            Err(anyhow::anyhow!("kill {sig} {pid} failed"))
        }
    };
    tokio::time::sleep(after).await;
    signal("-STOP")?;
    tokio::time::sleep(pause).await;
    signal("-CONT")?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut killed = Vec::new();
    for kind in ["pubsub", "normal"] {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.context("redis for CLIENT KILL")?;
        s.write_all(format!("CLIENT KILL TYPE {kind} SKIPME yes\r\n").as_bytes()).await?;
        let mut buf = [0u8; 64];
        let n = tokio::time::timeout(Duration::from_secs(2), s.read(&mut buf)).await.unwrap_or(Ok(0))?;
        killed.push(format!("{} {kind}", String::from_utf8_lossy(&buf[..n]).trim().trim_start_matches(':')));
    }
    Ok(format!("paused {pause:?} (SIGSTOP), then CLIENT KILL: {}", killed.join(", ")))
}

async fn churner(server: SocketAddr, i: usize, until: Instant, t: Arc<Tally>) {
    let mut round = 0;
    while Instant::now() < until && round < 50 {
        round += 1;
        let Ok(mut ws) = connect(server, source(i)).await else {
            t.connect_failures.fetch_add(1, Relaxed);
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        let room = format!("churn-{}", (i * 7 + round) % 1000);
        let mut client = SignalingClient::new(Join::new(room, format!("c{i}")));
        if ws.send(Message::text(client.connected())).await.is_err() {
            continue;
        }
        match next_event(&mut ws, &mut client, Duration::from_secs(5)).await {
            Some(Event::Welcome { peers, .. }) => {
                t.churn_joins.fetch_add(1, Relaxed);
                if let Some(other) = peers.first() {
                    client.send(&other.id, &Signal::Offer("v=0 churn".into()));
                    flush(&mut ws, &mut client).await;
                }
                tokio::time::sleep(Duration::from_millis(50 + (i % 200) as u64)).await;
                if round % 2 == 0 {
                    let _ = ws.send(Message::text(client.bye())).await;
                    let _ = ws.close(None).await;
                } // else: just drop it, leaving a session in its grace period
            }
            _ => {
                t.churn_errors.fetch_add(1, Relaxed);
                tokio::time::sleep(Duration::from_millis(500)).await; // a refused client backs off
            }
        }
    }
}

async fn flooder(server: SocketAddr, i: usize, until: Instant, t: Arc<Tally>) {
    while Instant::now() < until {
        let Ok(ws) = connect(server, source(i + 1000)).await else { return };
        let (mut sink, mut stream) = ws.split();
        let reader = async { while let Some(Ok(_)) = stream.next().await {} };
        let writer = async {
            for n in 0..10_000u32 {
                // Raw text: malformed JSON and an unknown type, on purpose.
                let junk = if n % 2 == 0 { "{{{not json".to_owned() } else { format!(r#"{{"type":"dance","n":{n}}}"#) };
                if sink.send(Message::text(junk)).await.is_err() {
                    break;
                }
                t.flood_frames.fetch_add(1, Relaxed);
            }
        };
        tokio::select! { _ = reader => {}, _ = writer => {} }
        t.flood_closed.fetch_add(1, Relaxed);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn oversized(server: SocketAddr, i: usize, until: Instant, t: Arc<Tally>) {
    // Raw text: a frame far over the server's size limit, on purpose.
    let big = format!(r#"{{"type":"offer","to":"x","sdp":"{}"}}"#, "x".repeat(100_000));
    while Instant::now() < until {
        let Ok(mut ws) = connect(server, source(i + 2000)).await else { return };
        let _ = ws.send(Message::text(big.clone())).await;
        while let Ok(Some(Ok(_))) = tokio::time::timeout(Duration::from_secs(5), ws.next()).await {}
        t.oversize_closed.fetch_add(1, Relaxed);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn slow_pair(server: SocketAddr, i: usize, until: Instant, t: Arc<Tally>) -> Result<()> {
    let room = format!("slow-{i}");
    let mut slow = connect(server, source(i + 3000)).await?;
    slow.send(Message::text(Join::new(room.as_str(), "").to_json())).await?;
    let w = recv_message(&mut slow, Duration::from_secs(5)).await;
    let target = welcome_id(w).context("slow reader's welcome")?;
    let mut fast = connect(server, source(i + 4000)).await?;
    fast.send(Message::text(Join::new(room.as_str(), "").to_json())).await?;
    recv_message(&mut fast, Duration::from_secs(5)).await;
    let sdp = "s".repeat(60_000);
    let (mut sink, mut stream) = fast.split();
    let cut = async {
        while let Some(Ok(Message::Text(m))) = stream.next().await {
            if matches!(ServerMessage::parse(&m), Ok(ServerMessage::Bye { .. })) {
                return true;
            }
        }
        false
    };
    let flood = async {
        for _ in 0..2000 {
            if Instant::now() > until {
                break;
            }
            let m = Signal::Offer(sdp.clone()).to_json(&target);
            if sink.send(Message::text(m)).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(25)).await; // under the default rate limit of 50/s
        }
        futures_util::future::pending::<bool>().await
    };
    if tokio::select! { c = cut => c, f = flood => f } {
        t.slow_cut.fetch_add(1, Relaxed);
    }
    drop(slow);
    Ok(())
}

#[tokio::main]
async fn main() -> Result<()> {
    let a = Args::parse();
    if !a.server.ip().is_loopback() {
        bail!("--server must be a loopback address: this tool only loads servers on this machine");
    }
    if a.server_b.is_some_and(|b| !b.ip().is_loopback()) {
        bail!("--server-b must be a loopback address");
    }
    if a.redis_pid.is_some() && a.blip + Duration::from_secs(3) > a.duration * 2 / 3 {
        bail!("--blip {:?} does not fit in two thirds of --duration {:?} (with 3 s to recover)", a.blip, a.duration);
    }
    let baseline = rss_kib(a.pid);
    println!("server RSS baseline {baseline} KiB");
    if let Some(pid) = a.pid_b {
        println!("second node RSS baseline {} KiB", rss_kib(pid));
    }
    let mut ok = true;
    for round in 1..=a.rounds {
        println!("--- round {round} of {}", a.rounds);
        ok &= round_once(&a, baseline).await?;
    }
    if !ok {
        std::process::exit(1);
    }
    Ok(())
}

async fn round_once(a: &Args, baseline: u64) -> Result<bool> {
    let until = Instant::now() + a.duration;
    let t = Arc::new(Tally::default());
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..a.churners {
        tasks.spawn(churner(a.server, i, until, t.clone()));
    }
    for i in 0..a.flooders {
        tasks.spawn(flooder(a.server, i, until, t.clone()));
    }
    for i in 0..a.oversized {
        tasks.spawn(oversized(a.server, i, until, t.clone()));
    }
    for i in 0..a.slow_readers {
        let (t, server) = (t.clone(), a.server);
        tasks.spawn(async move {
            let _ = slow_pair(server, i, until, t).await;
        });
    }
    let peak = Arc::new(AtomicU64::new(baseline));
    let sampler = {
        let peak = peak.clone();
        let pid = a.pid;
        tokio::spawn(async move {
            while Instant::now() < until + Duration::from_secs(2) {
                peak.fetch_max(rss_kib(pid), Relaxed);
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
    };
    let blip = match (a.redis_pid, a.redis_port) {
        (Some(pid), Some(port)) => Some(tokio::spawn(redis_blip(pid, port, a.blip, a.duration / 3))),
        _ => None,
    };
    let good = good_pair(a.server, a.server_b.unwrap_or(a.server), a.good_rate, until).await?;
    if let Some(b) = blip {
        println!("redis blip: {}", b.await.context("blip task")??);
    }
    // Everything is bounded by `until`; give stragglers a moment, then stop them.
    let _ = tokio::time::timeout(Duration::from_secs(15), async { while tasks.join_next().await.is_some() {} }).await;
    tasks.abort_all();
    sampler.abort();
    // Sessions dropped without bye wait out their grace period before the server frees them.
    let settle = Instant::now() + Duration::from_secs(40);
    let mut after;
    let m = loop {
        let m = metrics(a.server).await?;
        let gauge = |name: &str| {
            m.lines().find_map(|l| l.strip_prefix(&format!("{name} "))).and_then(|v| v.parse::<u64>().ok())
        };
        after = rss_kib(a.pid);
        if gauge("webcall_peers") == Some(0) && gauge("webcall_connections") == Some(0) || Instant::now() > settle {
            break m;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let counter = |name: &str| -> Vec<String> {
        m.lines().filter(|l| l.starts_with(name) && !l.ends_with(" 0")).map(str::to_owned).collect()
    };
    let [(sa, ra, ba), (sb, rb, bb)] = good;
    println!("well-behaved peers: A sent {sa}, B received {rb} (lost or reordered {bb}); B sent {sb}, A received {ra} (lost or reordered {ba})");
    println!(
        "churn: {} joins ({} refused or failed, {} connect failures); floods: {} malformed frames, {} flooders closed; oversized: {} closed; slow readers cut off: {}",
        t.churn_joins.load(Relaxed),
        t.churn_errors.load(Relaxed),
        t.connect_failures.load(Relaxed),
        t.flood_frames.load(Relaxed),
        t.flood_closed.load(Relaxed),
        t.oversize_closed.load(Relaxed),
        t.slow_cut.load(Relaxed)
    );
    println!("server RSS: baseline {baseline} KiB, peak {} KiB, after the round {after} KiB", peak.load(Relaxed));
    if let Some(pid) = a.pid_b {
        println!("second node RSS after the round: {} KiB", rss_kib(pid));
    }
    for g in ["webcall_connections ", "webcall_peers ", "webcall_rooms "] {
        if let Some(l) = m.lines().find(|l| l.starts_with(g)) {
            println!("  after the round: {l}");
        }
    }
    println!("server refusals:");
    for l in counter("webcall_errors_total")
        .into_iter()
        .chain(counter("webcall_connections_refused_total"))
        .chain(counter("webcall_slow_readers_total"))
    {
        println!("  {l}");
    }
    let lossless = ba == 0 && bb == 0 && ra == sb && rb == sa && sa > 0 && sb > 0;
    println!(
        "verdict: {}",
        if lossless { "no message of the well-behaved peers was lost or reordered" } else { "LOSS OR REORDERING" }
    );
    Ok(lossless)
}
