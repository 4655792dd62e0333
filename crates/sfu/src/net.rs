//! The thin tokio adapter: the [`Sfu`] core and its media sockets on a thread of their own (a single-threaded
//! runtime, like the TURN relay: a packet costs no cross-thread wake-up); signaling talks to it through
//! [`SfuHandle`].
//!
//! UDP goes through `quinn-udp`: one wake-up reads batches of datagrams (recvmmsg, GRO), the core takes the
//! whole batch, and what it sends goes out after it, runs of equal-sized packets to one destination as one GSO
//! send. Routing is the core's: by source address, and for unknown addresses by the STUN USERNAME's ufrag
//! (one hash lookup either way); anything else is dropped.
//!
//! ICE-TCP (RFC 6544, passive) listens on the same port number over TCP, with RFC 4571 framing: for networks
//! that block UDP. Each connection has a reader and a writer task; frames reach the core through a bounded
//! channel (a fast sender waits, nobody else does).

use std::cell::RefCell;
use std::collections::HashMap;
use std::io::{self, IoSliceMut};
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use quinn_udp::{RecvMeta, UdpSocketState};
use str0m::config::DtlsCert;
use str0m::net::Protocol;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::{mpsc, oneshot, Notify};
use tokio::task::AbortHandle;

use crate::core::{
    Caps, SessionId, SessionRole, Sfu, SfuConfig, SfuError, SfuEvent, SfuOutput, SfuStats, TrackInfo, Transmit, View,
};
use crate::tcp::{frame_into, Deframer};

/// Where the media socket listens and what address it advertises.
#[derive(Debug, Clone)]
pub struct MediaConfig {
    /// `--media-listen` (default `127.0.0.1:7882`): UDP, and ICE-TCP on the same port number.
    pub listen: SocketAddr,
    /// `--media-external-ip`: the address clients reach the socket at, when it differs (NAT).
    pub external_ip: Option<IpAddr>,
    pub dtls_cert: Option<DtlsCert>,
    /// Track and bitrate caps (`--max-sfu-tracks` and friends).
    pub caps: Caps,
    /// `--record-dir`: where recordings go; `None`, recording is refused.
    pub record_dir: Option<std::path::PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum SfuNetError {
    #[error("cannot bind the SFU media socket {addr} ({proto}): {source} (pick another --media-listen)")]
    Bind { addr: SocketAddr, proto: &'static str, source: io::Error },
    #[error(
        "--media-listen {0} is a wildcard address and no interface has an address to advertise in its place; \
         set --media-external-ip"
    )]
    Unadvertisable(SocketAddr),
    #[error("cannot start the SFU thread: {0}")]
    Thread(io::Error),
    #[error("the SFU task has stopped")]
    Stopped,
    #[error("recording is off on this server; start it with --record-dir DIR (or WEBCALL_RECORD_DIR)")]
    RecordingOff,
    #[error("cannot use the recording directory {dir}: {source} (check --record-dir)")]
    RecordDir { dir: std::path::PathBuf, source: io::Error },
    #[error(transparent)]
    Sfu(#[from] SfuError),
}

/// What the SFU tells the signaling side of one session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionSignal {
    /// The answer to the client's offer (also returned by [`SfuHandle::offer`]); it comes on this channel too so
    /// that it reaches the client before any server offer that follows it.
    Answer {
        sdp: String,
    },
    /// Send this offer to the client; `tracks` maps its receive m-lines to publishers.
    Offer {
        sdp: String,
        tracks: Vec<TrackInfo>,
    },
    Connected,
    /// The room's active speaker changed to this participant.
    ActiveSpeaker {
        participant: Arc<str>,
    },
    /// The media session died (ICE or DTLS failed); the client may join again.
    Closed,
}

/// The adapter's own figures (the core's are in [`SfuStats`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NetStats {
    /// RTP packets sent to subscribers (media the SFU forwards, with retransmissions), and their bytes as sent.
    pub forwarded_packets: u64,
    pub forwarded_packet_bytes: u64,
    /// Datagrams (and ICE-TCP frames) read from clients.
    pub received_datagrams: u64,
    /// UDP datagrams the kernel would not take (send buffer full): lost like on the network.
    pub send_drops: u64,
    /// Open ICE-TCP connections.
    pub tcp_connections: u64,
    /// ICE-TCP connections refused (per-address or total cap) or closed (no session claimed them, idle, slow).
    pub tcp_refused: u64,
}

enum Command {
    Add {
        room: String,
        participant: String,
        role: SessionRole,
        signals: mpsc::UnboundedSender<SessionSignal>,
        reply: oneshot::Sender<SessionId>,
    },
    Offer {
        id: SessionId,
        sdp: String,
        reply: oneshot::Sender<Result<Option<String>, SfuError>>,
    },
    Answer {
        id: SessionId,
        sdp: String,
        reply: oneshot::Sender<Result<(), SfuError>>,
    },
    Candidate {
        id: SessionId,
        line: String,
    },
    Remove {
        id: SessionId,
    },
    View {
        id: SessionId,
        views: Vec<(String, View)>,
    },
    Record {
        room: String,
        start: bool,
        reply: oneshot::Sender<bool>,
    },
    /// Stop every recording and wait until the files are closed.
    FinishRecordings {
        reply: oneshot::Sender<()>,
    },
}

/// A handle to the running SFU; cheap to clone. The SFU thread stops when the last handle is dropped.
#[derive(Clone)]
pub struct SfuHandle {
    tx: mpsc::UnboundedSender<Command>,
    recording: bool,
    local_addr: SocketAddr,
    advertised: Arc<[IpAddr]>,
    stats: Arc<Mutex<(SfuStats, NetStats)>>,
}

impl SfuHandle {
    /// Binds the media sockets (UDP and TCP, same port) and starts the SFU thread.
    pub async fn start(cfg: MediaConfig) -> Result<SfuHandle, SfuNetError> {
        let writer = match &cfg.record_dir {
            Some(dir) => Some(
                crate::writer::RecordWriter::start(dir.clone())
                    .map_err(|source| SfuNetError::RecordDir { dir: dir.clone(), source })?,
            ),
            None => None,
        };
        let recording = writer.is_some();
        let (udp, tcp) = bind_pair(cfg.listen)?;
        let local_addr =
            udp.local_addr().map_err(|source| SfuNetError::Bind { addr: cfg.listen, proto: "UDP", source })?;
        let advertised: Arc<[IpAddr]> = advertised_ips(local_addr.ip(), cfg.external_ip, &interface_ips())
            .ok_or(SfuNetError::Unadvertisable(local_addr))?
            .into();
        // One certificate for every session, made off the runtime (its first use seeds aws-lc's entropy: slow).
        let dtls_cert = match cfg.dtls_cert {
            Some(c) => Some(c),
            None => {
                tokio::task::spawn_blocking(|| str0m::crypto::from_feature_flags().dtls_provider.generate_certificate())
                    .await
                    .ok()
                    .flatten()
            }
        };
        let port = local_addr.port();
        let host_candidates: Vec<SocketAddr> = advertised.iter().map(|ip| SocketAddr::new(*ip, port)).collect();
        let sfu_cfg =
            SfuConfig { host_candidates: host_candidates.clone(), dtls_cert, caps: cfg.caps, follow_bwe: true };
        let mut sfu = Sfu::new(sfu_cfg, Instant::now());
        sfu.set_tcp_candidates(host_candidates);
        let (tx, rx) = mpsc::unbounded_channel();
        let stats = Arc::new(Mutex::new((SfuStats::default(), NetStats::default())));
        let st = stats.clone();
        let ext = cfg.external_ip;
        let (ready_tx, ready_rx) = oneshot::channel();
        std::thread::Builder::new()
            .name("webcall-sfu".into())
            .spawn(move || {
                // IO and timers only: no signal or child-process driver to turn on every wake-up of this thread.
                let rt = match tokio::runtime::Builder::new_current_thread().enable_io().enable_time().build() {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                rt.block_on(async move {
                    let io = match Io::new(udp, tcp, local_addr, ext) {
                        Ok(io) => io,
                        Err(e) => {
                            let _ = ready_tx.send(Err(e));
                            return;
                        }
                    };
                    let _ = ready_tx.send(Ok(()));
                    run(io, sfu, rx, st, writer).await;
                });
                // Connections' tasks end with the runtime.
                rt.shutdown_background();
            })
            .map_err(SfuNetError::Thread)?;
        match ready_rx.await {
            Ok(Ok(())) => {}
            Ok(Err(source)) => return Err(SfuNetError::Bind { addr: local_addr, proto: "UDP", source }),
            Err(_) => return Err(SfuNetError::Stopped),
        }
        Ok(SfuHandle { tx, recording, local_addr, advertised, stats })
    }

    /// The bound address (UDP, and TCP on the same port).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The addresses put into every session's SDP (with [`SfuHandle::local_addr`]'s port).
    pub fn advertised(&self) -> &[IpAddr] {
        &self.advertised
    }

    /// The core's figures as of the SFU thread's last look (at most ~100 ms old).
    pub fn stats(&self) -> SfuStats {
        self.stats.lock().0
    }

    /// The adapter's figures, like [`SfuHandle::stats`].
    pub fn net_stats(&self) -> NetStats {
        self.stats.lock().1
    }

    /// A new session; its signals (server offers, close) come on the returned receiver.
    pub async fn add_session(
        &self,
        room: &str,
        participant: &str,
    ) -> Result<(SessionId, mpsc::UnboundedReceiver<SessionSignal>), SfuNetError> {
        self.add_session_with(room, participant, SessionRole::Participant).await
    }

    /// [`SfuHandle::add_session`] for a WHIP publisher or WHEP viewer (see [`SessionRole`]).
    pub async fn add_session_with(
        &self,
        room: &str,
        participant: &str,
        role: SessionRole,
    ) -> Result<(SessionId, mpsc::UnboundedReceiver<SessionSignal>), SfuNetError> {
        let (signals, rx) = mpsc::unbounded_channel();
        let (reply, id) = oneshot::channel();
        self.send(Command::Add { room: room.into(), participant: participant.into(), role, signals, reply })?;
        Ok((id.await.map_err(|_| SfuNetError::Stopped)?, rx))
    }

    /// The client's offer; `None` when the server's own outstanding offer wins (see [`Sfu::accept_offer`]).
    pub async fn offer(&self, id: SessionId, sdp: String) -> Result<Option<String>, SfuNetError> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::Offer { id, sdp, reply })?;
        Ok(rx.await.map_err(|_| SfuNetError::Stopped)??)
    }

    pub async fn answer(&self, id: SessionId, sdp: String) -> Result<(), SfuNetError> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::Answer { id, sdp, reply })?;
        Ok(rx.await.map_err(|_| SfuNetError::Stopped)??)
    }

    pub fn candidate(&self, id: SessionId, line: String) -> Result<(), SfuNetError> {
        self.send(Command::Candidate { id, line })
    }

    /// How the client shows the video of its receive m-lines (`mid`, size; 0×0 hidden).
    pub fn view(&self, id: SessionId, views: Vec<(String, View)>) -> Result<(), SfuNetError> {
        self.send(Command::View { id, views })
    }

    /// Whether recordings can be made (`--record-dir` is set).
    pub fn recording_enabled(&self) -> bool {
        self.recording
    }

    /// Starts (`start`) or stops recording `room`; `Ok(false)` when it already was (or was not) being recorded.
    pub async fn record(&self, room: &str, start: bool) -> Result<bool, SfuNetError> {
        if !self.recording {
            return Err(SfuNetError::RecordingOff);
        }
        let (reply, rx) = oneshot::channel();
        self.send(Command::Record { room: room.into(), start, reply })?;
        rx.await.map_err(|_| SfuNetError::Stopped)
    }

    /// Stops every recording and waits until its files are written and closed (graceful shutdown).
    pub async fn finish_recordings(&self) {
        let (reply, rx) = oneshot::channel();
        if self.send(Command::FinishRecordings { reply }).is_ok() {
            let _ = rx.await;
        }
    }

    pub fn remove(&self, id: SessionId) -> Result<(), SfuNetError> {
        self.send(Command::Remove { id })
    }

    fn send(&self, c: Command) -> Result<(), SfuNetError> {
        self.tx.send(c).map_err(|_| SfuNetError::Stopped)
    }
}

/// The addresses to advertise for a socket bound to `bound`: `external` if given; the bound address if it is a
/// specific one; for a wildcard, the interfaces' addresses of its family (both for `[::]`), loopback last.
/// `None` when nothing is left to advertise.
pub fn advertised_ips(bound: IpAddr, external: Option<IpAddr>, interfaces: &[IpAddr]) -> Option<Vec<IpAddr>> {
    if let Some(ip) = external {
        return Some(vec![ip]);
    }
    if !bound.is_unspecified() {
        return Some(vec![bound]);
    }
    let usable = |ip: &IpAddr| match ip {
        IpAddr::V4(v) => !v.is_unspecified() && !v.is_link_local(),
        // Link-local needs a scope id that candidates cannot carry.
        IpAddr::V6(v) => bound.is_ipv6() && !v.is_unspecified() && (v.segments()[0] & 0xffc0) != 0xfe80,
    };
    let mut ips: Vec<IpAddr> = interfaces.iter().copied().filter(usable).collect();
    ips.sort_by_key(|ip| ip.is_loopback());
    ips.dedup();
    (!ips.is_empty()).then_some(ips)
}

fn interface_ips() -> Vec<IpAddr> {
    if_addrs::get_if_addrs().unwrap_or_default().into_iter().map(|i| i.ip()).collect()
}

const MAX_UDP: usize = 65536;
/// Datagram slots per batched read (each a full-size buffer: GRO may fill one with a burst of one flow).
const RECV_SLOTS: usize = 16;
/// Batches per wake-up at most, so that commands and timers are not starved by a flood.
const BATCHES_PER_WAKE: usize = 8;
const SOCKET_BUFFER: usize = 4 << 20;
/// Most bytes in one GSO send (the kernel's limit is 64 KiB with headers).
const GSO_MAX_BYTES: usize = 60 << 10;
/// How late a timer may run so that timers due close together share a wake-up (see `run`).
const TIMER_SLACK: Duration = Duration::from_millis(2);
/// Messages (a datagram, or a GSO run of them) per `sendmmsg` call.
const SEND_BATCH: usize = 32;
/// The shared stats are refreshed this often (they are read by `/metrics`).
const STATS_EVERY: Duration = Duration::from_millis(100);

/// ICE-TCP bounds: connections per client address (IPv6: per /64) and in all.
const TCP_PER_IP: usize = 16;
const TCP_TOTAL: usize = 4096;
/// A connection must bring a frame a session claims within this, and is closed after this long without one.
const TCP_FIRST_FRAME: Duration = Duration::from_secs(10);
const TCP_IDLE: Duration = Duration::from_secs(30);
/// Bytes queued for one connection; media past it is dropped as UDP would lose it.
const TCP_OUT_LIMIT: usize = 1 << 20;
/// A write stuck this long drops the connection.
const TCP_WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Frames from all connections waiting for the core.
const TCP_QUEUE: usize = 1024;

/// A UDP socket with `quinn-udp`'s batched, offloaded I/O.
struct UdpIo {
    sock: UdpSocket,
    state: UdpSocketState,
}

impl UdpIo {
    fn new(std_sock: std::net::UdpSocket) -> io::Result<UdpIo> {
        let state = UdpSocketState::new((&std_sock).into())?;
        std_sock.set_nonblocking(true)?;
        Ok(UdpIo { sock: UdpSocket::from_std(std_sock)?, state })
    }

    /// Sends now or not at all (a full buffer loses the datagram, as the network would); false if lost.
    fn send(&self, t: &quinn_udp::Transmit<'_>) -> bool {
        match self.state.try_send((&self.sock).into(), t) {
            Ok(()) => true,
            Err(e) if t.segment_size.is_some() && e.kind() != io::ErrorKind::WouldBlock => {
                // The kernel refused GSO here: one by one.
                let size = t.segment_size.unwrap_or(t.contents.len()).max(1);
                let mut ok = true;
                for d in t.contents.chunks(size) {
                    ok &= self.send(&quinn_udp::Transmit { contents: d, segment_size: None, ..*t });
                }
                ok
            }
            Err(_) => false,
        }
    }

    /// One batch. A short batch means the queue was empty: tokio's readiness is cleared with it (a datagram that
    /// arrives later raises a new edge-triggered event), so the next turn does not spend a `recvmmsg` and a whole
    /// loop to learn `EAGAIN`: at low rates that was half the receive calls.
    fn try_recv(&self, bufs: &mut [IoSliceMut<'_>], meta: &mut [RecvMeta]) -> io::Result<usize> {
        let slots = bufs.len().min(meta.len());
        let mut short = 0;
        let r = self.sock.try_io(tokio::io::Interest::READABLE, || {
            let n = self.state.recv((&self.sock).into(), bufs, meta)?;
            if n < slots {
                short = n;
                return Err(io::ErrorKind::WouldBlock.into());
            }
            Ok(n)
        });
        match r {
            Ok(n) => Ok(n),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(short),
            Err(e) => Err(e),
        }
    }
}

/// One ICE-TCP connection's outbound bytes: the SFU thread appends frames, the writer task drains them.
struct StreamOut {
    buf: Mutex<Vec<u8>>,
    notify: Notify,
    closed: AtomicBool,
    reader: Mutex<Option<AbortHandle>>,
}

impl StreamOut {
    /// Queues one frame; false (dropped) past the queue's bound.
    fn push(&self, data: &[u8]) -> bool {
        {
            let mut b = self.buf.lock();
            if b.len() + data.len() + 2 > TCP_OUT_LIMIT || !frame_into(&mut b, data) {
                return false;
            }
        }
        self.notify.notify_one();
        true
    }

    /// Stops reading; the writer sends what is queued, then shuts the connection down.
    fn close(&self) {
        self.closed.store(true, Ordering::Release);
        if let Some(r) = self.reader.lock().take() {
            r.abort();
        }
        self.notify.notify_one();
    }
}

enum TcpEvent {
    Open { peer: SocketAddr, local: SocketAddr, out: Arc<StreamOut> },
    Frame { peer: SocketAddr, data: Vec<u8> },
    Closed { peer: SocketAddr },
}

struct TcpConn {
    out: Arc<StreamOut>,
    /// Where the client reached us, as the core knows the address (advertised form).
    local: SocketAddr,
    /// A session took one of its frames.
    claimed: bool,
    opened: Instant,
}

/// The SFU thread's I/O state.
struct Io {
    udp: UdpIo,
    port: u16,
    /// The socket is bound to a wildcard address: replies name their source address (pktinfo).
    wildcard: bool,
    v6_socket: bool,
    /// `--media-external-ip`: the address every datagram is deemed to arrive at (the core's candidate).
    external: Option<IpAddr>,
    bound: SocketAddr,
    tcp_rx: mpsc::Receiver<TcpEvent>,
    tcp: HashMap<SocketAddr, TcpConn>,
    /// Transmits of one round, sent together (GSO runs).
    pending: Vec<Transmit>,
    gso: Vec<u8>,
    /// Scratch of [`Io::flush`]: runs of `pending` (one message each), their addresses and iovecs.
    runs: Vec<(usize, usize)>,
    names: Vec<socket2::SockAddr>,
    iovs: Vec<libc::iovec>,
    net: NetStats,
}

impl Io {
    fn new(
        udp: std::net::UdpSocket,
        tcp: std::net::TcpListener,
        bound: SocketAddr,
        external: Option<IpAddr>,
    ) -> io::Result<Io> {
        let udp = UdpIo::new(udp)?;
        tcp.set_nonblocking(true)?;
        let listener = TcpListener::from_std(tcp)?;
        let (tcp_tx, tcp_rx) = mpsc::channel(TCP_QUEUE);
        tokio::spawn(tcp_accept(listener, tcp_tx));
        Ok(Io {
            udp,
            port: bound.port(),
            wildcard: bound.ip().is_unspecified(),
            v6_socket: bound.is_ipv6(),
            external,
            bound,
            tcp_rx,
            tcp: HashMap::new(),
            pending: Vec::new(),
            gso: Vec::new(),
            runs: Vec::new(),
            names: Vec::new(),
            iovs: Vec::new(),
            net: NetStats::default(),
        })
    }

    /// The address the core should see a datagram arrive at (the candidate the client checked).
    fn destination(&self, dst_ip: Option<IpAddr>) -> SocketAddr {
        match (self.external, self.wildcard, dst_ip) {
            (Some(ip), _, _) => SocketAddr::new(ip, self.port),
            (None, true, Some(ip)) => SocketAddr::new(unmap(ip), self.port),
            _ => self.bound,
        }
    }

    /// Reads batches until none is ready (or the per-wake bound), handing each datagram to the core.
    fn read_udp(&mut self, sfu: &mut Sfu, s: &mut Scratch) -> io::Result<()> {
        for _ in 0..BATCHES_PER_WAKE {
            let n = match self.udp.try_recv(&mut Scratch::bufs(&mut s.slots), &mut s.meta) {
                Ok(0) => return Ok(()),
                Ok(n) => n,
                // ICMP errors (port unreachable) surface here on Linux; they concern one peer only.
                Err(e) if transient(&e) => continue,
                Err(e) => return Err(e),
            };
            let now = Instant::now();
            for (m, buf) in s.meta[..n].iter().zip(s.slots.iter()) {
                let source = unmap_addr(m.addr);
                let destination = self.destination(m.dst_ip);
                for d in buf[..m.len].chunks(m.stride.max(1)) {
                    self.net.received_datagrams += 1;
                    sfu.handle_receive(now, source, destination, d);
                }
            }
            if n < s.meta.len() {
                return Ok(());
            }
        }
        Ok(())
    }

    fn tcp_event(&mut self, sfu: &mut Sfu, e: TcpEvent) {
        match e {
            TcpEvent::Open { peer, local, out } => {
                let local = match self.external {
                    Some(ip) => SocketAddr::new(ip, self.port),
                    None => unmap_addr(local),
                };
                if let Some(old) = self.tcp.insert(peer, TcpConn { out, local, claimed: false, opened: Instant::now() })
                {
                    old.out.close();
                }
                self.net.tcp_connections = self.tcp.len() as u64;
            }
            TcpEvent::Frame { peer, data } => {
                let Some(c) = self.tcp.get_mut(&peer) else { return };
                self.net.received_datagrams += 1;
                let routed = sfu.handle_receive_on(Instant::now(), Protocol::Tcp, peer, c.local, &data);
                if routed {
                    c.claimed = true;
                } else if !c.claimed {
                    // Nobody's: the connection costs nothing more.
                    c.out.close();
                    self.tcp.remove(&peer);
                    self.net.tcp_refused += 1;
                    self.net.tcp_connections = self.tcp.len() as u64;
                }
            }
            TcpEvent::Closed { peer } => {
                if let Some(c) = self.tcp.remove(&peer) {
                    c.out.close();
                }
                self.net.tcp_connections = self.tcp.len() as u64;
            }
        }
    }

    /// Unclaimed connections past their first-frame time are closed.
    fn sweep_tcp(&mut self, now: Instant) {
        let before = self.tcp.len();
        self.tcp.retain(|_, c| {
            let keep = c.claimed || now < c.opened + TCP_FIRST_FRAME;
            if !keep {
                c.out.close();
            }
            keep
        });
        self.net.tcp_refused += (before - self.tcp.len()) as u64;
        self.net.tcp_connections = self.tcp.len() as u64;
    }

    fn queue(&mut self, t: Transmit) {
        if is_rtp(&t.contents) {
            self.net.forwarded_packets += 1;
            self.net.forwarded_packet_bytes += t.contents.len() as u64;
        }
        match t.proto {
            Protocol::Udp => self.pending.push(t),
            _ => {
                if let Some(c) = self.tcp.get(&t.destination) {
                    if !c.out.push(&t.contents) {
                        self.net.send_drops += 1;
                    }
                }
            }
        }
    }

    /// Sends what this round produced: runs of equal-sized datagrams to one destination go as one GSO message (a
    /// run may end with one shorter datagram), and all of a round's messages go many per `sendmmsg`.
    fn flush(&mut self) {
        let max = self.udp.state.max_gso_segments().max(1);
        // A wildcard socket names each datagram's source address (pktinfo): then quinn-udp, one message per call.
        let pktinfo = self.wildcard && self.external.is_none();
        let mut runs = std::mem::take(&mut self.runs);
        let mut i = 0;
        while i < self.pending.len() {
            let (to, len, src) = {
                let t = &self.pending[i];
                (t.destination, t.contents.len(), t.source.ip())
            };
            let mut j = i + 1;
            let mut bytes = len;
            while j < self.pending.len() && j - i < max {
                let t = &self.pending[j];
                let l = t.contents.len();
                if t.destination != to
                    || l > len
                    || bytes + l > GSO_MAX_BYTES
                    || self.pending[j - 1].contents.len() != len
                {
                    break;
                }
                bytes += l;
                j += 1;
            }
            if !pktinfo {
                runs.push((i, j));
                i = j;
                continue;
            }
            if !self.send_run(i, j, Some(src)) {
                self.net.send_drops += (j - i) as u64;
            }
            i = j;
        }
        self.send_batch(&mut runs);
        self.runs = runs;
        self.pending.clear();
    }

    /// Sends the run `pending[i..j]` (equal-sized datagrams to one destination, the last may be shorter) through
    /// quinn-udp: one GSO message if it holds more than one datagram, from `src_ip` if given. Where the kernel
    /// refuses GSO, quinn-udp stops offering it (`max_gso_segments` falls to 1, so later rounds make no runs) and
    /// [`UdpIo::send`] sends the datagrams one by one. False if one was lost.
    fn send_run(&mut self, i: usize, j: usize, src_ip: Option<IpAddr>) -> bool {
        let to = self.pending[i].destination;
        let destination = if self.v6_socket { map_addr(to) } else { to };
        let (contents, segment_size): (&[u8], _) = if j - i > 1 {
            self.gso.clear();
            for t in &self.pending[i..j] {
                self.gso.extend_from_slice(&t.contents);
            }
            (&self.gso, Some(self.pending[i].contents.len()))
        } else {
            (&self.pending[i].contents, None)
        };
        self.udp.send(&quinn_udp::Transmit { destination, ecn: None, contents, segment_size, src_ip })
    }

    /// Sends each run `pending[i..j]` of `runs` as one message (a GSO message if it holds more than one datagram),
    /// up to [`SEND_BATCH`] messages per `sendmmsg`; order is kept. quinn-udp sends one message per call, and a
    /// call per message was ~8 % of the SFU's CPU in a fan-out profile (one datagram to each of many subscribers)
    /// and half of its send calls in a meeting (a frame's packets to each subscriber).
    fn send_batch(&mut self, runs: &mut Vec<(usize, usize)>) {
        use std::os::fd::AsRawFd;
        // CMSG_SPACE(sizeof(u16)) is 24 bytes on 64-bit Linux; u64 words keep the cmsghdr aligned.
        const CMSG_WORDS: usize = 3;
        // SAFETY: CMSG_SPACE and CMSG_LEN are pure arithmetic.
        let (space, cmsg_len) = unsafe {
            (
                libc::CMSG_SPACE(std::mem::size_of::<u16>() as u32) as usize,
                libc::CMSG_LEN(std::mem::size_of::<u16>() as u32),
            )
        };
        assert!(space <= CMSG_WORDS * 8);
        for chunk in runs.chunks(SEND_BATCH) {
            self.names.clear();
            self.names.extend(chunk.iter().map(|&(i, _)| {
                let to = self.pending[i].destination;
                socket2::SockAddr::from(if self.v6_socket { map_addr(to) } else { to })
            }));
            // Every iovec first: `hdrs` point into `iovs`, which must not grow after that.
            self.iovs.clear();
            for &(i, j) in chunk {
                self.iovs.extend(self.pending[i..j].iter().map(|t| libc::iovec {
                    iov_base: t.contents.as_ptr() as *mut libc::c_void,
                    iov_len: t.contents.len(),
                }));
            }
            // SAFETY: all-zero mmsghdr values are valid (null pointers, zero lengths); every pointer set below
            // points into `pending`, `names`, `iovs` or `cmsgs`, which outlive the call.
            let mut hdrs: [libc::mmsghdr; SEND_BATCH] = unsafe { std::mem::zeroed() };
            let mut cmsgs = [[0u64; CMSG_WORDS]; SEND_BATCH];
            let mut first = 0;
            for (n, (&(i, j), name)) in chunk.iter().zip(self.names.iter()).enumerate() {
                let h = &mut hdrs[n].msg_hdr;
                h.msg_name = name.as_ptr() as *mut libc::c_void;
                h.msg_namelen = name.len();
                // SAFETY: `first + (j - i) <= iovs.len()` (filled above in the same order).
                h.msg_iov = unsafe { self.iovs.as_mut_ptr().add(first) };
                h.msg_iovlen = j - i;
                first += j - i;
                if j - i > 1 {
                    let c = cmsgs[n].as_mut_ptr() as *mut libc::cmsghdr;
                    // SAFETY: `c` points at `space` zeroed, aligned bytes of `cmsgs[n]`; CMSG_DATA stays inside.
                    unsafe {
                        (*c).cmsg_len = cmsg_len as _;
                        (*c).cmsg_level = libc::SOL_UDP;
                        (*c).cmsg_type = libc::UDP_SEGMENT;
                        std::ptr::write_unaligned(
                            libc::CMSG_DATA(c) as *mut u16,
                            self.pending[i].contents.len() as u16,
                        );
                    }
                    h.msg_control = c as *mut libc::c_void;
                    h.msg_controllen = space as _;
                }
            }
            let len = chunk.len();
            let mut sent = 0;
            while sent < len {
                // SAFETY: `hdrs[sent..len]` are initialised above.
                let n = unsafe {
                    libc::sendmmsg(
                        self.udp.sock.as_raw_fd(),
                        hdrs[sent..].as_mut_ptr(),
                        (len - sent) as libc::c_uint,
                        0,
                    )
                };
                if n > 0 {
                    sent += n as usize;
                    continue;
                }
                let (i, j) = chunk[sent];
                match io::Error::last_os_error().kind() {
                    io::ErrorKind::Interrupted => {}
                    // A full buffer loses the rest, as the network would.
                    io::ErrorKind::WouldBlock => {
                        self.net.send_drops += chunk[sent..].iter().map(|&(i, j)| (j - i) as u64).sum::<u64>();
                        break;
                    }
                    // The kernel refused GSO for this message: quinn-udp sends it one datagram at a time, and offers
                    // no GSO from then on.
                    _ if j - i > 1 => {
                        if self.udp.state.max_gso_segments() > 1 {
                            tracing::info!(error = %io::Error::last_os_error(), "media socket refused GSO; sending datagrams one by one");
                        }
                        if !self.send_run(i, j, None) {
                            self.net.send_drops += (j - i) as u64;
                        }
                        sent += 1;
                    }
                    // This datagram cannot go (e.g. its peer's port is unreachable): skip it, send the rest.
                    _ => {
                        self.net.send_drops += 1;
                        sent += 1;
                    }
                }
            }
        }
        runs.clear();
    }
}

/// RTP, not RTCP (RFC 7983 first byte 128-191; RFC 5761 RTCP packet types 192-223 in the second byte).
fn is_rtp(d: &[u8]) -> bool {
    d.len() >= 12 && (128..=191).contains(&d[0]) && !(192..=223).contains(&d[1])
}

fn unmap(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v) => v.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

fn unmap_addr(a: SocketAddr) -> SocketAddr {
    SocketAddr::new(unmap(a.ip()), a.port())
}

fn map_addr(a: SocketAddr) -> SocketAddr {
    match a.ip() {
        IpAddr::V4(v) => SocketAddr::new(IpAddr::V6(v.to_ipv6_mapped()), a.port()),
        IpAddr::V6(_) => a,
    }
}

fn transient(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::Interrupted
            | io::ErrorKind::WouldBlock
    )
}

/// The slots of a batched read, on the SFU thread.
struct Scratch {
    slots: Vec<Vec<u8>>,
    meta: Vec<RecvMeta>,
}

impl Scratch {
    fn bufs(slots: &mut [Vec<u8>]) -> [IoSliceMut<'_>; RECV_SLOTS] {
        let mut it = slots.iter_mut();
        std::array::from_fn(|_| IoSliceMut::new(it.next().expect("RECV_SLOTS slots")))
    }
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch {
        slots: (0..RECV_SLOTS).map(|_| vec![0u8; MAX_UDP]).collect(),
        meta: vec![RecvMeta::default(); RECV_SLOTS],
    });
}

/// UDP and TCP on the same port. With port 0, retries until a port free for both is found.
fn bind_pair(addr: SocketAddr) -> Result<(std::net::UdpSocket, std::net::TcpListener), SfuNetError> {
    let err = |proto, source| SfuNetError::Bind { addr, proto, source };
    for _ in 0..if addr.port() == 0 { 20 } else { 1 } {
        let udp = std::net::UdpSocket::bind(addr).map_err(|e| err("UDP", e))?;
        let port = udp.local_addr().map_err(|e| err("UDP", e))?.port();
        let tcp = match bind_tcp(SocketAddr::new(addr.ip(), port)) {
            Ok(t) => t,
            Err(_) if addr.port() == 0 => continue,
            Err(e) => return Err(err("TCP", e)),
        };
        let s = socket2::SockRef::from(&udp);
        let _ = s.set_recv_buffer_size(SOCKET_BUFFER);
        let _ = s.set_send_buffer_size(SOCKET_BUFFER);
        return Ok((udp, tcp));
    }
    Err(err("TCP", io::Error::new(io::ErrorKind::AddrInUse, "no port free for both UDP and TCP")))
}

fn bind_tcp(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    let s = socket2::Socket::new(socket2::Domain::for_address(addr), socket2::Type::STREAM, None)?;
    s.set_reuse_address(true)?;
    if addr.is_ipv6() {
        // Like the UDP socket: `[::]` takes IPv4 too.
        let _ = s.set_only_v6(false);
    }
    s.bind(&addr.into())?;
    s.listen(1024)?;
    Ok(s.into())
}

async fn run(
    mut io: Io,
    mut sfu: Sfu,
    mut rx: mpsc::UnboundedReceiver<Command>,
    stats: Arc<Mutex<(SfuStats, NetStats)>>,
    mut writer: Option<crate::writer::RecordWriter>,
) {
    let mut signals: HashMap<SessionId, mpsc::UnboundedSender<SessionSignal>> = HashMap::new();
    let sleep = tokio::time::sleep_until(Instant::now().into());
    tokio::pin!(sleep);
    let mut next_stats = Instant::now();
    loop {
        let deadline = loop {
            match sfu.poll_output() {
                SfuOutput::Transmit(t) => io.queue(t),
                SfuOutput::Event(e) => {
                    let (id, signal) = match e {
                        SfuEvent::Offer { session, sdp, tracks } => (session, SessionSignal::Offer { sdp, tracks }),
                        SfuEvent::Connected { session } => (session, SessionSignal::Connected),
                        SfuEvent::Closed { session } => (session, SessionSignal::Closed),
                        SfuEvent::ActiveSpeaker { session, participant } => {
                            (session, SessionSignal::ActiveSpeaker { participant })
                        }
                    };
                    let gone = signal == SessionSignal::Closed;
                    if let Some(tx) = signals.get(&id) {
                        let _ = tx.send(signal);
                    }
                    if gone {
                        signals.remove(&id);
                    }
                }
                SfuOutput::Timeout(t) => break t,
            }
        };
        // Files are written on the writer's thread: here only a channel send.
        while let Some(op) = sfu.poll_record() {
            if let Some(w) = &mut writer {
                w.send(op);
            }
        }
        io.flush();
        let now = Instant::now();
        if now >= next_stats {
            next_stats = now + STATS_EVERY;
            io.sweep_tcp(now);
            *stats.lock() = (sfu.stats(), io.net);
        }
        // Stats and the TCP sweep need a turn even when the core has nothing to do, but not on an idle server
        // (no session, no connection): there only stray datagrams change a figure, and they can wait for the
        // core's idle timer rather than wake the thread ten times a second.
        let idle = sfu.is_empty() && io.tcp.is_empty();
        // The figures are refreshed on any wake-up once due; a wake-up of their own only when none came for a
        // whole further period.
        let deadline = if idle { deadline } else { deadline.min(next_stats + STATS_EVERY) };
        // Timers due within TIMER_SLACK of each other run in one wake-up: each wake runs every due session's str0m
        // timeout (pacer, RTCP), a fixed cost that dominated the profile at low packet rates. Work due now (a frame
        // was written) is not delayed.
        let deadline = if deadline > now { deadline + TIMER_SLACK } else { deadline };
        if sleep.deadline().into_std() != deadline {
            sleep.as_mut().reset(deadline.into());
        }
        tokio::select! {
            r = io.udp.sock.readable() => {
                let r = r.and_then(|()| SCRATCH.with_borrow_mut(|s| io.read_udp(&mut sfu, s)));
                if let Err(e) = r {
                    tracing::error!("SFU media socket failed: {e}");
                    return;
                }
                // Awake anyway: timers that may wait (Sfu::timers_due) run now rather than in a wake of their own.
                let now = Instant::now();
                if sfu.timers_due(now) {
                    sfu.handle_timeout(now);
                }
            }
            c = rx.recv() => match c {
                None => return,
                // Signaling changed something: the figures follow at once (tests and /metrics read them).
                Some(c) => {
                    next_stats = Instant::now();
                    command(&mut sfu, &mut signals, c, writer.as_mut());
                }
            },
            Some(e) = io.tcp_rx.recv() => io.tcp_event(&mut sfu, e),
            _ = &mut sleep => sfu.handle_timeout(Instant::now()),
        }
    }
}

fn command(
    sfu: &mut Sfu,
    signals: &mut HashMap<SessionId, mpsc::UnboundedSender<SessionSignal>>,
    c: Command,
    mut writer: Option<&mut crate::writer::RecordWriter>,
) {
    match c {
        Command::Record { room, start, reply } => {
            let changed = if start { sfu.start_recording(&room) } else { sfu.stop_recording(&room) };
            let _ = reply.send(changed);
        }
        Command::FinishRecordings { reply } => {
            sfu.stop_all_recordings();
            while let Some(op) = sfu.poll_record() {
                if let Some(w) = writer.as_deref_mut() {
                    w.send(op);
                }
            }
            match writer {
                Some(w) => w.flush(reply),
                None => {
                    let _ = reply.send(());
                }
            }
        }
        Command::Add { room, participant, role, signals: tx, reply } => {
            let id = sfu.add_session_with(&room, &participant, role, Instant::now());
            signals.insert(id, tx);
            let _ = reply.send(id);
        }
        Command::Offer { id, sdp, reply } => {
            let res = sfu.accept_offer(id, &sdp);
            if let (Ok(Some(answer)), Some(tx)) = (&res, signals.get(&id)) {
                let _ = tx.send(SessionSignal::Answer { sdp: answer.clone() });
            }
            let _ = reply.send(res);
        }
        Command::Answer { id, sdp, reply } => {
            let _ = reply.send(sfu.accept_answer(id, &sdp));
        }
        Command::Candidate { id, line } => {
            if let Err(e) = sfu.add_candidate(id, &line) {
                tracing::debug!("SFU session {id}: candidate ignored: {e}");
            }
        }
        Command::View { id, views } => {
            for (mid, view) in views {
                if let Err(e) = sfu.set_view(id, &mid, view) {
                    tracing::debug!("SFU session {id}: view ignored: {e}");
                }
            }
        }
        Command::Remove { id } => {
            sfu.remove_session(id);
            signals.remove(&id);
        }
    }
}

/// The key of the per-address connection cap: the IPv4 address, or the /64 of an IPv6 one.
fn ip_key(ip: IpAddr) -> IpAddr {
    match unmap(ip) {
        IpAddr::V6(v) => {
            let s = v.segments();
            IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
        }
        v4 => v4,
    }
}

/// Counts a connection against its address until dropped.
struct Slot {
    per_ip: Arc<Mutex<HashMap<IpAddr, usize>>>,
    key: IpAddr,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut m = self.per_ip.lock();
        if let Some(n) = m.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.key);
            }
        }
    }
}

async fn tcp_accept(listener: TcpListener, events: mpsc::Sender<TcpEvent>) {
    let per_ip: Arc<Mutex<HashMap<IpAddr, usize>>> = Arc::default();
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                // Out of descriptors and the like: wait rather than spin.
                tracing::warn!("SFU ICE-TCP accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let key = ip_key(peer.ip());
        {
            let mut m = per_ip.lock();
            let total: usize = m.values().sum();
            let n = m.entry(key).or_default();
            if *n >= TCP_PER_IP || total >= TCP_TOTAL {
                tracing::debug!("SFU ICE-TCP connection from {peer} refused: too many");
                continue;
            }
            *n += 1;
        }
        let slot = Slot { per_ip: per_ip.clone(), key };
        let events = events.clone();
        tokio::spawn(tcp_conn(stream, unmap_addr(peer), events, slot));
    }
}

async fn tcp_conn(stream: TcpStream, peer: SocketAddr, events: mpsc::Sender<TcpEvent>, slot: Slot) {
    let Ok(local) = stream.local_addr() else { return };
    let _ = stream.set_nodelay(true);
    let (mut rd, mut wr) = stream.into_split();
    let out = Arc::new(StreamOut {
        buf: Mutex::new(Vec::new()),
        notify: Notify::new(),
        closed: AtomicBool::new(false),
        reader: Mutex::new(None),
    });
    if events.send(TcpEvent::Open { peer, local, out: out.clone() }).await.is_err() {
        return;
    }
    let ev = events.clone();
    let reader = tokio::spawn(async move {
        let mut deframer = Deframer::new();
        let mut buf = vec![0u8; 16 << 10];
        loop {
            let n = match tokio::time::timeout(TCP_IDLE, rd.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return,
                Ok(Ok(n)) => n,
            };
            let mut frames = Vec::new();
            deframer.push(&buf[..n], |f| frames.push(f.to_vec()));
            for data in frames {
                if ev.send(TcpEvent::Frame { peer, data }).await.is_err() {
                    return;
                }
            }
        }
    });
    *out.reader.lock() = Some(reader.abort_handle());
    let mut spare = Vec::new();
    loop {
        let closed = out.closed.load(Ordering::Acquire);
        std::mem::swap(&mut *out.buf.lock(), &mut spare);
        if !spare.is_empty() {
            match tokio::time::timeout(TCP_WRITE_TIMEOUT, wr.write_all(&spare)).await {
                Ok(Ok(())) => spare.clear(),
                _ => break,
            }
            continue;
        }
        if closed || reader.is_finished() {
            break;
        }
        out.notify.notified().await;
    }
    let _ = tokio::time::timeout(Duration::from_secs(1), wr.shutdown()).await;
    reader.abort();
    let _ = events.send(TcpEvent::Closed { peer }).await;
    drop(slot);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    #[test]
    fn advertised_addresses() {
        let v4 = |s: &str| s.parse::<IpAddr>().unwrap();
        let ifs = [v4("127.0.0.1"), v4("192.0.2.5"), v4("169.254.1.1"), v4("2001:db8::5"), v4("fe80::1")];
        assert_eq!(advertised_ips(v4("0.0.0.0"), None, &ifs), Some(vec![v4("192.0.2.5"), v4("127.0.0.1")]));
        assert_eq!(
            advertised_ips(v4("::"), None, &ifs),
            Some(vec![v4("192.0.2.5"), v4("2001:db8::5"), v4("127.0.0.1")])
        );
        assert_eq!(advertised_ips(v4("0.0.0.0"), Some(v4("198.51.100.1")), &ifs), Some(vec![v4("198.51.100.1")]));
        assert_eq!(advertised_ips(v4("10.0.0.1"), None, &ifs), Some(vec![v4("10.0.0.1")]));
        assert_eq!(advertised_ips(v4("0.0.0.0"), None, &[v4("fe80::1")]), None);
    }

    /// The kernel refuses a GSO message on a socket without UDP checksums (SO_NO_CHECK: EINVAL), as it does one
    /// whose segments exceed the path MTU. `flush` must then send that run's datagrams one by one, in order, with
    /// the rest of the batch, none counted lost; and send no GSO message after that.
    #[tokio::test]
    async fn a_refused_gso_run_goes_out_one_by_one() {
        use std::os::fd::AsRawFd;
        let no_check = |sock: &std::net::UdpSocket| {
            let one: libc::c_int = 1;
            // SAFETY: setsockopt reads one c_int from a live local.
            let r = unsafe {
                libc::setsockopt(
                    sock.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_NO_CHECK,
                    &one as *const libc::c_int as *const libc::c_void,
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                )
            };
            assert_eq!(r, 0, "SO_NO_CHECK");
        };
        let rx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let rx2 = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        for r in [&rx, &rx2] {
            r.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        }
        let (to, to2) = (rx.local_addr().unwrap(), rx2.local_addr().unwrap());

        // What the test relies on, shown on a socket of its own: this kernel does GSO, and refuses it here.
        let probe = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let probe_state = UdpSocketState::new((&probe).into()).unwrap();
        assert!(probe_state.max_gso_segments() > 1, "no UDP GSO on this kernel: nothing to refuse");
        no_check(&probe);
        let t = quinn_udp::Transmit {
            destination: to2,
            ecn: None,
            contents: &[0; 200],
            segment_size: Some(100),
            src_ip: None,
        };
        assert!(probe_state.try_send((&probe).into(), &t).is_err(), "a GSO send without checksums was not refused");

        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        no_check(&udp);
        let bound = udp.local_addr().unwrap();
        let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut io = Io::new(udp, tcp, bound, None).unwrap();
        let transmit = |destination, tag: u8, len| Transmit {
            proto: Protocol::Udp,
            source: bound,
            destination,
            contents: vec![tag; len],
        };
        // One round: a run of three equal datagrams and a shorter one ending it (one GSO message), a datagram
        // to another address, one more to the first.
        for (dst, tag, len) in [(to, 1, 1000), (to, 2, 1000), (to, 3, 1000), (to, 4, 500), (to2, 5, 700), (to, 6, 800)]
        {
            io.queue(transmit(dst, tag, len));
        }
        io.flush();
        // quinn-udp stops offering GSO once the kernel refuses it: the run was tried as GSO, and refused.
        assert_eq!(
            io.udp.state.max_gso_segments(),
            1,
            "the GSO run was not refused: the test did not reach the fallback"
        );
        // A second round: two equal datagrams that would have made a run.
        io.queue(transmit(to, 7, 1000));
        io.queue(transmit(to, 8, 1000));
        io.flush();
        assert_eq!(io.net.send_drops, 0);

        let mut buf = [0u8; 2048];
        let mut got = Vec::new();
        for _ in 0..7 {
            let n = rx.recv(&mut buf).expect("a datagram of the first address");
            assert!(buf[..n].iter().all(|&b| b == buf[0]), "a datagram mixed two transmits");
            got.push((buf[0], n));
        }
        assert_eq!(got, [(1, 1000), (2, 1000), (3, 1000), (4, 500), (6, 800), (7, 1000), (8, 1000)]);
        let n = rx2.recv(&mut buf).expect("the datagram of the second address");
        assert_eq!((buf[0], n), (5, 700));
    }

    #[test]
    fn rtp_is_told_from_rtcp() {
        let mut p = [0u8; 12];
        p[0] = 0x80;
        p[1] = 96;
        assert!(is_rtp(&p));
        p[1] = 0x80 | 96; // marker bit
        assert!(is_rtp(&p));
        p[1] = 200; // RTCP SR
        assert!(!is_rtp(&p));
        p[0] = 0x16; // DTLS
        assert!(!is_rtp(&p));
        assert_eq!(unmap(IpAddr::V6(Ipv4Addr::new(127, 0, 0, 1).to_ipv6_mapped())), IpAddr::from([127, 0, 0, 1]));
    }
}
