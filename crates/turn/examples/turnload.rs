//! A TURN relay load generator for `bench/turn/run.sh`: `--flows` allocations (UDP or TCP to the server, each
//! with a channel to one echo peer this program runs), then ChannelData at a fixed offered rate for a bounded
//! time and count, the peer echoing every datagram back through the relay. Batched I/O (sendmmsg, recvmmsg)
//! on the load side, so that it can offer more than one server CPU relays. Prints one `key=value` line:
//! packets sent, received by the peer, echoed, received back, and datagrams the kernel dropped at the load's
//! own sockets and at the server's (from /proc/net/udp), so loss is told apart per side.
//!
//! ```sh
//! cargo run --release -p webcall-turn --example turnload -- --server 127.0.0.1:3478 --secret S \
//!     --flows 10 --rate 50000 --secs 2 [--tcp] [--size 200] [--hold 30]
//! ```
//! With `--hold S` it keeps the allocations S seconds after the traffic (for idle measurements) and prints
//! `phase=...` lines as it goes (allocated, traffic, held, done).
//!
//! `--nap-ms N` (N ≥ 1): the peer and the clients' receiver do not wait in epoll; they drain their sockets, sleep N
//! ms, and drain again. On loopback, a datagram sent to a socket someone waits on wakes that thread inside the
//! *sender's* system call, so without it each server pays its load's wake-ups (a server on a real network does not);
//! with it, a datagram wakes no one. Datagrams then reach the peer, and come back, up to N ms later, in bursts.
//!
//! Loopback only: the server address must be a loopback address.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use webcall_turn::stun::{self, Builder, Msg};
use webcall_turn::{long_term_key, rest_password, rest_username};

const BATCH: usize = 64;
const CHANNEL: u16 = 0x4000;

struct Args {
    server: SocketAddr,
    secret: String,
    tcp: bool,
    flows: usize,
    rate: u64,
    secs: f64,
    size: usize,
    hold: f64,
    drain: Duration,
    /// Receivers drain, then sleep this long, instead of waiting in epoll (`None`: they wait).
    nap: Option<Duration>,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        server: "127.0.0.1:3478".parse().unwrap(),
        secret: String::new(),
        tcp: false,
        flows: 10,
        rate: 10_000,
        secs: 2.0,
        size: 200,
        hold: 0.0,
        drain: Duration::from_millis(1000),
        nap: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let mut v = || it.next().ok_or(format!("{k} needs a value"));
        let bad = |e: &dyn std::fmt::Display| format!("bad value for {k}: {e}");
        match k.as_str() {
            "--server" => a.server = v()?.parse().map_err(|e| bad(&e))?,
            "--secret" => a.secret = v()?,
            "--tcp" => a.tcp = true,
            "--flows" => a.flows = v()?.parse().map_err(|e| bad(&e))?,
            "--rate" => a.rate = v()?.parse().map_err(|e| bad(&e))?,
            "--secs" => a.secs = v()?.parse().map_err(|e| bad(&e))?,
            "--size" => a.size = v()?.parse().map_err(|e| bad(&e))?,
            "--hold" => a.hold = v()?.parse().map_err(|e| bad(&e))?,
            "--drain-ms" => a.drain = Duration::from_millis(v()?.parse().map_err(|e| bad(&e))?),
            "--nap-ms" => match v()?.parse::<u64>().map_err(|e| bad(&e))? {
                0 => a.nap = None,
                ms if ms <= 20 => a.nap = Some(Duration::from_millis(ms)),
                _ => return Err("--nap-ms: at most 20 (the sockets must hold what arrives meanwhile)".into()),
            },
            _ => return Err(format!("unknown argument {k} (see the doc comment of turnload.rs)")),
        }
    }
    if !a.server.ip().is_loopback() {
        return Err("--server must be a loopback address".into());
    }
    if a.flows == 0 || a.size < 8 || a.size > 1200 || a.secs <= 0.0 || a.secs > 60.0 || a.hold > 600.0 {
        return Err("need --flows >= 1, 8 <= --size <= 1200, 0 < --secs <= 60, --hold <= 600".into());
    }
    Ok(a)
}

/// The client side of one allocation.
enum Conn {
    Udp(UdpSocket),
    Tcp(TcpStream),
}

impl Conn {
    fn send(&mut self, b: &[u8]) -> std::io::Result<()> {
        match self {
            Conn::Udp(s) => s.send(b).map(|_| ()),
            Conn::Tcp(s) => s.write_all(b),
        }
    }
    /// One STUN message (skipping ChannelData, which cannot arrive before the channel exists).
    fn recv(&mut self) -> std::io::Result<Vec<u8>> {
        match self {
            Conn::Udp(s) => {
                let mut b = vec![0u8; 2048];
                let n = s.recv(&mut b)?;
                b.truncate(n);
                Ok(b)
            }
            Conn::Tcp(s) => {
                let mut h = [0u8; 20];
                s.read_exact(&mut h)?;
                let len = u16::from_be_bytes([h[2], h[3]]) as usize;
                let mut b = h.to_vec();
                b.resize(20 + len, 0);
                s.read_exact(&mut b[20..])?;
                Ok(b)
            }
        }
    }
}

fn txid(n: u64) -> [u8; 12] {
    let mut t = [0u8; 12];
    t[..8].copy_from_slice(&n.to_le_bytes());
    t[8..].copy_from_slice(&std::process::id().to_le_bytes());
    t
}

/// One request/response exchange, retried over UDP.
fn exchange(c: &mut Conn, req: &[u8], id: &[u8; 12]) -> Result<Vec<u8>, String> {
    for _ in 0..8 {
        c.send(req).map_err(|e| format!("send: {e}"))?;
        let until = Instant::now() + Duration::from_millis(500);
        while Instant::now() < until {
            match c.recv() {
                Ok(b) => {
                    if b.len() >= 20 && &b[8..20] == id {
                        return Ok(b);
                    }
                }
                Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => break,
                Err(e) => return Err(format!("recv: {e}")),
            }
        }
    }
    Err("no answer".into())
}

/// Allocates (answering the 401 challenge) and binds `CHANNEL` to `peer`. Returns the relayed address and
/// the Refresh request (lifetime 0) that deletes the allocation.
fn setup(c: &mut Conn, n: u64, secret: &str, peer: SocketAddr) -> Result<(SocketAddr, Vec<u8>), String> {
    let expiry = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() + 3600;
    let user = rest_username(expiry, &format!("load{n}"));
    let pass = rest_password(secret.as_bytes(), &user);
    let id = txid(n << 8);
    let req = Builder::new(stun::msg_type(stun::ALLOCATE, stun::REQUEST), &id)
        .u32(stun::REQUESTED_TRANSPORT, 17 << 24)
        .finish();
    let b = exchange(c, &req, &id)?;
    let m = Msg::parse(&b).map_err(|e| format!("{e:?}"))?;
    let realm = String::from_utf8_lossy(m.get(stun::REALM).ok_or("401 without REALM")?).into_owned();
    let nonce = m.get(stun::NONCE).ok_or("401 without NONCE")?.to_vec();
    let key = long_term_key(&user, &realm, &pass);
    let authed = |b: &mut Builder| {
        b.attr(stun::USERNAME, user.as_bytes())
            .attr(stun::REALM, realm.as_bytes())
            .attr(stun::NONCE, &nonce)
            .integrity(&key)
            .finish()
    };
    let id = txid((n << 8) | 1);
    let mut b = Builder::new(stun::msg_type(stun::ALLOCATE, stun::REQUEST), &id);
    b.u32(stun::REQUESTED_TRANSPORT, 17 << 24);
    let resp = exchange(c, &authed(&mut b), &id)?;
    let m = Msg::parse(&resp).map_err(|e| format!("{e:?}"))?;
    if m.class() != stun::SUCCESS {
        return Err(format!("Allocate refused: {:?}", m.get(stun::ERROR_CODE).map(String::from_utf8_lossy)));
    }
    let relayed = m.get_xor_addr(stun::XOR_RELAYED_ADDRESS).ok_or("no XOR-RELAYED-ADDRESS")?;
    let id = txid((n << 8) | 2);
    let mut b = Builder::new(stun::msg_type(stun::CHANNEL_BIND, stun::REQUEST), &id);
    b.u32(stun::CHANNEL_NUMBER, (CHANNEL as u32) << 16).xor_addr(stun::XOR_PEER_ADDRESS, peer);
    let resp = exchange(c, &authed(&mut b), &id)?;
    if Msg::parse(&resp).map_err(|e| format!("{e:?}"))?.class() != stun::SUCCESS {
        return Err("ChannelBind refused".into());
    }
    let mut b = Builder::new(stun::msg_type(stun::REFRESH, stun::REQUEST), &txid((n << 8) | 3));
    b.u32(stun::LIFETIME, 0);
    Ok((relayed, authed(&mut b)))
}

/// Kernel drops of the UDP sockets bound to `ports` on 127.0.0.1, from /proc/net/udp.
fn udp_drops(ports: &[u16]) -> u64 {
    let t = std::fs::read_to_string("/proc/net/udp").unwrap_or_default();
    let want: std::collections::HashSet<u16> = ports.iter().copied().collect();
    t.lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let port = u16::from_str_radix(f.get(1)?.split(':').nth(1)?, 16).ok()?;
            want.contains(&port).then(|| f.last()?.parse::<u64>().ok()).flatten()
        })
        .sum()
}

/// Datagrams the kernel dropped from the per-CPU loopback backlog queues (netdev_max_backlog), all CPUs: a drop
/// on the way, at neither socket (/proc/net/softnet_stat, second column).
fn backlog_drops() -> u64 {
    let t = std::fs::read_to_string("/proc/net/softnet_stat").unwrap_or_default();
    t.lines().filter_map(|l| u64::from_str_radix(l.split_whitespace().nth(1)?, 16).ok()).sum()
}

#[derive(Default)]
struct Counts {
    at_peer: AtomicU64,
    echoed: AtomicU64,
    back: AtomicU64,
    /// Flows that got at least one packet back (counted once each).
    flows_back: AtomicU64,
}

/// Registers `fd` with `poll`, unless napping: then nothing is registered, so an arriving datagram does not even
/// queue an epoll event.
fn watch(poll: &mio::Poll, fd: i32, token: usize, nap: Option<Duration>) -> Result<(), String> {
    if nap.is_some() {
        return Ok(());
    }
    poll.registry()
        .register(&mut mio::unix::SourceFd(&fd), mio::Token(token), mio::Interest::READABLE)
        .map_err(|e| e.to_string())
}

/// Until there may be something to read: epoll (at most 50 ms), or with `nap` a plain sleep (nobody is woken by an
/// arriving datagram).
fn wait(poll: &mut mio::Poll, events: &mut mio::Events, nap: Option<Duration>) {
    match nap {
        Some(d) => std::thread::sleep(d),
        None => {
            let _ = poll.poll(events, Some(Duration::from_millis(50)));
        }
    }
}

/// Receives a batch into `bufs` (recvmmsg, non-blocking): (count, lengths, sources).
fn recv_batch(fd: i32, bufs: &mut [[u8; 2048]], lens: &mut [usize], from: &mut [SocketAddr]) -> usize {
    // SAFETY: zeroed iovec/mmsghdr/sockaddr_storage are valid; all pointers point into locals that outlive
    // the call.
    unsafe {
        let mut names: [libc::sockaddr_storage; BATCH] = std::mem::zeroed();
        let mut iovs: [libc::iovec; BATCH] = std::mem::zeroed();
        let mut hdrs: [libc::mmsghdr; BATCH] = std::mem::zeroed();
        let n = bufs.len().min(BATCH);
        for i in 0..n {
            iovs[i] = libc::iovec { iov_base: bufs[i].as_mut_ptr().cast(), iov_len: 2048 };
            hdrs[i].msg_hdr.msg_iov = &mut iovs[i];
            hdrs[i].msg_hdr.msg_iovlen = 1;
            hdrs[i].msg_hdr.msg_name = (&mut names[i] as *mut libc::sockaddr_storage).cast();
            hdrs[i].msg_hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_storage>() as u32;
        }
        let r = libc::recvmmsg(fd, hdrs.as_mut_ptr(), n as u32, libc::MSG_DONTWAIT, std::ptr::null_mut());
        if r <= 0 {
            return 0;
        }
        for i in 0..r as usize {
            lens[i] = hdrs[i].msg_len as usize;
            let sin = &*(&names[i] as *const libc::sockaddr_storage as *const libc::sockaddr_in);
            from[i] = SocketAddr::new(IpAddr::V4(u32::from_be(sin.sin_addr.s_addr).into()), u16::from_be(sin.sin_port));
        }
        r as usize
    }
}

/// Sends `msgs` (each to its address, or on a connected socket with `None`) in sendmmsg calls; returns how
/// many the kernel took (a full buffer stops the batch).
fn send_batch(fd: i32, msgs: &[(&[u8], Option<SocketAddr>)]) -> usize {
    let mut done = 0;
    for chunk in msgs.chunks(BATCH) {
        // SAFETY: as in recv_batch.
        let n = unsafe {
            let mut names: [libc::sockaddr_in; BATCH] = std::mem::zeroed();
            let mut iovs: [libc::iovec; BATCH] = std::mem::zeroed();
            let mut hdrs: [libc::mmsghdr; BATCH] = std::mem::zeroed();
            for (i, (b, to)) in chunk.iter().enumerate() {
                iovs[i] = libc::iovec { iov_base: b.as_ptr() as *mut _, iov_len: b.len() };
                hdrs[i].msg_hdr.msg_iov = &mut iovs[i];
                hdrs[i].msg_hdr.msg_iovlen = 1;
                if let Some(SocketAddr::V4(a)) = to {
                    names[i].sin_family = libc::AF_INET as u16;
                    names[i].sin_port = a.port().to_be();
                    names[i].sin_addr.s_addr = u32::from(*a.ip()).to_be();
                    hdrs[i].msg_hdr.msg_name = (&mut names[i] as *mut libc::sockaddr_in).cast();
                    hdrs[i].msg_hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_in>() as u32;
                }
            }
            libc::sendmmsg(fd, hdrs.as_mut_ptr(), chunk.len() as u32, 0)
        };
        if n <= 0 {
            break;
        }
        done += n as usize;
        if (n as usize) < chunk.len() {
            break;
        }
    }
    done
}

fn main() {
    let a = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("turnload: {e}");
            std::process::exit(2);
        }
    };
    if let Err(e) = run(a) {
        eprintln!("turnload: {e}");
        std::process::exit(1);
    }
}

fn run(a: Args) -> Result<(), String> {
    let peer = UdpSocket::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    let peer_addr = peer.local_addr().unwrap();
    let sref = socket2::SockRef::from(&peer);
    let _ = sref.set_recv_buffer_size(8 << 20);
    let _ = sref.set_send_buffer_size(8 << 20);
    let mut conns = Vec::with_capacity(a.flows);
    let mut relays = Vec::with_capacity(a.flows);
    let mut deletes = Vec::with_capacity(a.flows);
    let mut load_ports = vec![peer_addr.port()];
    let t0 = Instant::now();
    for i in 0..a.flows {
        let mut c = if a.tcp {
            let s = TcpStream::connect(a.server).map_err(|e| format!("connect: {e}"))?;
            s.set_nodelay(true).ok();
            s.set_read_timeout(Some(Duration::from_millis(500))).ok();
            Conn::Tcp(s)
        } else {
            let s = UdpSocket::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
            s.connect(a.server).map_err(|e| e.to_string())?;
            s.set_read_timeout(Some(Duration::from_millis(500))).ok();
            let r = socket2::SockRef::from(&s);
            let _ = r.set_recv_buffer_size(1 << 20);
            load_ports.push(s.local_addr().unwrap().port());
            Conn::Udp(s)
        };
        let (relayed, delete) = setup(&mut c, i as u64, &a.secret, peer_addr).map_err(|e| format!("flow {i}: {e}"))?;
        relays.push(relayed);
        deletes.push(delete);
        conns.push(c);
    }
    let alloc_secs = t0.elapsed().as_secs_f64();
    println!("phase=allocated flows={} secs={alloc_secs:.2}", conns.len());
    let relay_ports: Vec<u16> = relays.iter().map(|r| r.port()).collect();
    let mut server_ports = relay_ports.clone();
    server_ports.push(a.server.port());
    let (server_drops0, load_drops0, backlog0) = (udp_drops(&server_ports), udp_drops(&load_ports), backlog_drops());

    let counts = Arc::new(Counts::default());
    let stop = Arc::new(AtomicBool::new(false));
    // The echo peer: everything it gets goes back to where it came from.
    let nap = a.nap;
    let echo = {
        let (counts, stop) = (counts.clone(), stop.clone());
        let mut poll = mio::Poll::new().map_err(|e| e.to_string())?;
        let fd = peer.as_raw_fd();
        watch(&poll, fd, 0, nap)?;
        std::thread::spawn(move || {
            let _peer = peer;
            let mut bufs = vec![[0u8; 2048]; BATCH];
            let (mut lens, mut from) = ([0usize; BATCH], ["0.0.0.0:0".parse().unwrap(); BATCH]);
            let mut events = mio::Events::with_capacity(4);
            while !stop.load(Ordering::Relaxed) {
                wait(&mut poll, &mut events, nap);
                loop {
                    let n = recv_batch(fd, &mut bufs, &mut lens, &mut from);
                    if n == 0 {
                        break;
                    }
                    counts.at_peer.fetch_add(n as u64, Ordering::Relaxed);
                    let msgs: Vec<(&[u8], Option<SocketAddr>)> =
                        (0..n).map(|i| (&bufs[i][..lens[i]], Some(from[i]))).collect();
                    let sent = send_batch(fd, &msgs);
                    counts.echoed.fetch_add(sent as u64, Ordering::Relaxed);
                }
            }
        })
    };
    // The clients' receiver: counts ChannelData coming back, per flow.
    let mut send_fds = Vec::new();
    let mut tcp_writers = Vec::new();
    let receiver = {
        let (counts, stop) = (counts.clone(), stop.clone());
        let mut poll = mio::Poll::new().map_err(|e| e.to_string())?;
        let mut readers = Vec::new();
        for (i, c) in conns.into_iter().enumerate() {
            match c {
                Conn::Udp(s) => {
                    s.set_nonblocking(true).map_err(|e| e.to_string())?;
                    send_fds.push(s.as_raw_fd());
                    watch(&poll, s.as_raw_fd(), i, nap)?;
                    readers.push(Conn::Udp(s));
                }
                Conn::Tcp(s) => {
                    s.set_nonblocking(true).map_err(|e| e.to_string())?;
                    tcp_writers.push((s.try_clone().map_err(|e| e.to_string())?, Vec::<u8>::new()));
                    watch(&poll, s.as_raw_fd(), i, nap)?;
                    readers.push(Conn::Tcp(s));
                }
            }
        }
        std::thread::spawn(move || {
            let mut bufs = vec![[0u8; 2048]; BATCH];
            let (mut lens, mut from) = ([0usize; BATCH], ["0.0.0.0:0".parse().unwrap(); BATCH]);
            let mut got = vec![false; readers.len()];
            let mut pending: HashMap<usize, Vec<u8>> = HashMap::new();
            let mut events = mio::Events::with_capacity(1024);
            let mut rd = vec![0u8; 256 << 10];
            while !stop.load(Ordering::Relaxed) {
                wait(&mut poll, &mut events, nap);
                // Napping, every socket is read each round; else the ones epoll named.
                let ready: Vec<usize> = match nap {
                    Some(_) => (0..readers.len()).collect(),
                    None => events.iter().map(|ev| ev.token().0).collect(),
                };
                for i in ready {
                    let mut n_flow = 0u64;
                    match &mut readers[i] {
                        Conn::Udp(s) => loop {
                            let n = recv_batch(s.as_raw_fd(), &mut bufs, &mut lens, &mut from);
                            if n == 0 {
                                break;
                            }
                            n_flow += lens[..n].iter().filter(|&&l| l >= 4).count() as u64;
                        },
                        Conn::Tcp(s) => loop {
                            match s.read(&mut rd) {
                                Ok(0) => break,
                                Ok(n) => {
                                    let p = pending.entry(i).or_default();
                                    p.extend_from_slice(&rd[..n]);
                                    let mut off = 0;
                                    while p.len() - off >= 4 {
                                        let len = u16::from_be_bytes([p[off + 2], p[off + 3]]) as usize;
                                        let total = if p[off] >> 6 == 1 { 4 + stun::pad4(len) } else { 20 + len };
                                        if p.len() - off < total {
                                            break;
                                        }
                                        if p[off] >> 6 == 1 {
                                            n_flow += 1;
                                        }
                                        off += total;
                                    }
                                    p.drain(..off);
                                }
                                Err(_) => break,
                            }
                        },
                    }
                    if n_flow > 0 {
                        counts.back.fetch_add(n_flow, Ordering::Relaxed);
                        if !got[i] {
                            got[i] = true;
                            counts.flows_back.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            }
            readers
        })
    };

    // The sender: every millisecond, what the offered rate owes by then, spread over the flows, one sendmmsg
    // (or one write) per flow. Bounded in count (rate × secs) and time (secs, plus a drain).
    let total = (a.rate as f64 * a.secs).round() as u64;
    let mut frame = vec![0u8; 4 + stun::pad4(a.size)];
    frame[0..2].copy_from_slice(&CHANNEL.to_be_bytes());
    frame[2..4].copy_from_slice(&(a.size as u16).to_be_bytes());
    let udp_frame = &frame[..4 + a.size];
    let flows = a.flows;
    let (mut sent, mut not_sent) = (0u64, 0u64);
    let mut next_flow = 0usize;
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(a.secs);
    let mut tick = start;
    println!("phase=traffic");
    while sent + not_sent < total && Instant::now() < deadline + Duration::from_millis(100) {
        let due = ((start.elapsed().as_secs_f64() * a.rate as f64) as u64).min(total);
        let mut owe = due.saturating_sub(sent + not_sent);
        while owe > 0 {
            // This flow's share of the tick, at least one.
            let k = (owe as usize).div_ceil(flows.min(owe as usize).max(1)).min(BATCH);
            let i = next_flow % flows;
            next_flow += 1;
            let ok = if a.tcp {
                let (s, buf) = &mut tcp_writers[i];
                let mut ok = 0;
                for _ in 0..k {
                    // A stream that does not drain within 1 MiB is backpressure: not offered.
                    if buf.len() < 1 << 20 {
                        buf.extend_from_slice(&frame);
                        ok += 1;
                    }
                }
                if let Ok(n) = s.write(buf) {
                    buf.drain(..n);
                }
                ok
            } else {
                let msgs: Vec<(&[u8], Option<SocketAddr>)> = (0..k).map(|_| (udp_frame, None)).collect();
                send_batch(send_fds[i], &msgs)
            };
            sent += ok as u64;
            not_sent += (k - ok) as u64;
            owe -= k as u64;
        }
        tick += Duration::from_millis(1);
        if let Some(d) = tick.checked_duration_since(Instant::now()) {
            std::thread::sleep(d);
        }
    }
    // TCP: what is still buffered goes out (bounded by the drain time).
    let flush_until = Instant::now() + a.drain;
    for (s, buf) in &mut tcp_writers {
        while !buf.is_empty() && Instant::now() < flush_until {
            match s.write(buf) {
                Ok(n) => {
                    buf.drain(..n);
                }
                Err(_) => std::thread::sleep(Duration::from_millis(1)),
            }
        }
        not_sent += (buf.len() / frame.len()) as u64;
        sent -= (buf.len() / frame.len()) as u64;
    }
    // What the deadline cut off (the load did not get the CPU to offer it) counts as not offered.
    not_sent += total - sent - not_sent;
    let send_secs = start.elapsed().as_secs_f64();
    std::thread::sleep(a.drain);
    println!("phase=traffic-done");
    if a.hold > 0.0 {
        println!("phase=holding");
        std::thread::sleep(Duration::from_secs_f64(a.hold));
        println!("phase=held");
    }
    stop.store(true, Ordering::Relaxed);
    let _ = echo.join();
    // Deletes the allocations (UDP: a Refresh with lifetime 0, unanswered; TCP: closing does it).
    if let Ok(readers) = receiver.join() {
        for (mut c, del) in readers.into_iter().zip(&deletes) {
            if let Conn::Udp(_) = c {
                let _ = c.send(del);
            }
        }
    }
    let c = &counts;
    let (at_peer, echoed, back) =
        (c.at_peer.load(Ordering::Relaxed), c.echoed.load(Ordering::Relaxed), c.back.load(Ordering::Relaxed));
    println!(
        "result offered={} sent={sent} not_sent={not_sent} at_peer={at_peer} echoed={echoed} back={back} \
         lost_to_peer={} lost_to_client={} server_sock_drops={} load_sock_drops={} backlog_drops={} flows={} \
         flows_back={} \
         send_secs={send_secs:.3} alloc_secs={alloc_secs:.2}",
        total,
        sent.saturating_sub(at_peer),
        echoed.saturating_sub(back),
        udp_drops(&server_ports).saturating_sub(server_drops0),
        udp_drops(&load_ports).saturating_sub(load_drops0),
        backlog_drops().saturating_sub(backlog0),
        flows,
        c.flows_back.load(Ordering::Relaxed),
    );
    Ok(())
}
