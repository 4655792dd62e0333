//! The I/O around [`TurnCore`]: a UDP pump thread and tokio adapters for TCP and TLS.
//!
//! One mutex guards the core. UDP (the listening socket and every relay socket) is served by one thread on
//! one epoll (mio), as coturn's relay threads do: a wake-up takes the lock once, reads a batch from each ready
//! socket through `quinn-udp` (recvmmsg, and GRO coalescing a burst of one flow), relays it and sends (what
//! goes to one client in equal-sized frames leaves in one GSO send). No task is woken per packet. Plain TCP
//! clients are read by the same thread on the same epoll (one wake-up serves every ready socket, and no tokio
//! reactor wakes per packet); their writes are direct, with a writer task for what does not fit at once. TLS
//! clients get a reader and a writer task each on the TURN thread's tokio runtime, as do the accept loops and
//! the timer.

use std::collections::{HashMap, HashSet};
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use mio::unix::SourceFd;
use parking_lot::Mutex;
use quinn_udp::{RecvMeta, UdpSocketState};
use rand::Rng;
use rustc_hash::FxHashMap;
use slab::Slab;
use std::io::IoSliceMut;
use std::io::Write;
use std::ops::Range;
use std::os::fd::{AsFd, AsRawFd};
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio::task::{AbortHandle, JoinHandle};

use crate::auth::IceMinter;
use crate::config::{PortRange, TurnConfig};
use crate::core::{
    stream_frame_len, AllocId, CoreConfig, CoreStats, Family, FiveTuple, Output, RelayPort, StreamFramer, Transport,
    TurnCore, PEER_HEADROOM, PEER_TAILROOM,
};
use crate::TurnError;

const MAX_UDP: usize = 65536;
/// Datagram slots per batched read (each a full-size buffer: GRO may fill one with a burst).
const RECV_SLOTS: usize = 32;
const SOCKET_BUFFER: usize = 4 << 20;
/// Per relay socket; memory is only used while a burst is queued.
const RELAY_SOCKET_BUFFER: usize = 1 << 20;
/// Writes to stream clients go out in pieces of at most this, each under the write timeout.
const WRITE_CHUNK: usize = 16 << 10;

/// Entry point: binds and spawns everything.
pub struct TurnServer;

impl TurnServer {
    /// Binds the UDP and TCP listeners on `cfg.listen` (same port; port 0 picks one free for both) and
    /// TLS if configured, spawns the tasks on the current tokio runtime and returns at once.
    pub async fn start(cfg: TurnConfig) -> Result<TurnHandle, TurnError> {
        cfg.check()?;
        // The relay runs on its own single-threaded runtime: sockets, tasks and wake-ups stay on one thread, so a
        // relayed packet costs no cross-thread wake-up (the signaling runtime's workers are not involved).
        // IO and timers only: no signal or child-process driver to turn on every wake-up of this thread.
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .enable_time()
            .build()
            .map_err(|e| TurnError::Io("starting the TURN runtime", e))?;
        let handle = rt.handle().clone();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        std::thread::Builder::new()
            .name("webcall-turn".into())
            .spawn(move || {
                rt.block_on(async {
                    let _ = stop_rx.await;
                });
                // Dropping the runtime cancels whatever is left (stuck writers included).
                rt.shutdown_background();
            })
            .map_err(|e| TurnError::Io("starting the TURN thread", e))?;
        let mut turn = handle
            .spawn(Self::start_here(cfg))
            .await
            .map_err(|e| TurnError::Io("starting TURN", io::Error::other(e)))??;
        turn.stop = Some(stop_tx);
        Ok(turn)
    }

    /// Binds and spawns on the current runtime (the TURN thread's).
    async fn start_here(cfg: TurnConfig) -> Result<TurnHandle, TurnError> {
        let (udp, tcp) = bind_pair(cfg.listen)?;
        let udp_addr = udp.sock.local_addr().map_err(|e| TurnError::Io("reading the UDP address", e))?;
        let tls = match &cfg.tls {
            Some((addr, sc)) => {
                let l = TcpListener::bind(addr).await.map_err(|e| TurnError::Bind {
                    proto: "TLS",
                    addr: *addr,
                    source: e,
                })?;
                Some((l, sc.clone()))
            }
            None => None,
        };
        let tls_addr = match &tls {
            Some((l, _)) => Some(l.local_addr().map_err(|e| TurnError::Io("reading the TLS address", e))?),
            None => None,
        };
        let relay_ip = cfg.listen.ip();
        let core_cfg = CoreConfig {
            realm: cfg.realm.clone(),
            secret: cfg.secret.clone().into_bytes(),
            max_lifetime: cfg.max_lifetime,
            user_quota: cfg.user_quota,
            total_quota: cfg.total_quota,
            ip_quota: cfg.ip_quota,
            allow_peers: cfg.allow_peers.clone(),
            external_ip: cfg.external_ip,
            // An IPv6 wildcard socket is dual-stack on Linux; a specific address serves its own family.
            relay_v4: relay_ip.is_ipv4() || relay_ip == IpAddr::V6(Ipv6Addr::UNSPECIFIED),
            relay_v6: relay_ip.is_ipv6(),
            seed: rand::rng().random(),
            own_ips: [Some(relay_ip), tls_addr.map(|a| a.ip())]
                .into_iter()
                .flatten()
                .filter(|ip| !ip.is_unspecified())
                .map(|ip| ip.to_canonical())
                .collect(),
            relay_ports: cfg.relay_ports,
            turn_ports: [Some(udp_addr.port()), tls_addr.map(|a| a.port())].into_iter().flatten().collect(),
            ..CoreConfig::default()
        };
        let core = TurnCore::new(core_cfg, Instant::now(), SystemTime::now());
        let pump_err = |e| TurnError::Io("starting the TURN UDP pump", e);
        let poll = mio::Poll::new().map_err(pump_err)?;
        let registry = poll.registry().try_clone().map_err(pump_err)?;
        let waker = mio::Waker::new(poll.registry(), WAKER).map_err(pump_err)?;
        registry.register(&mut SourceFd(&udp.sock.as_raw_fd()), LISTENER, mio::Interest::READABLE).map_err(pump_err)?;
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                core,
                relays: Slab::new(),
                relay_of: FxHashMap::default(),
                used_ports: HashSet::new(),
                reserved: HashMap::new(),
                streams: FxHashMap::default(),
            }),
            streams_open: AtomicUsize::new(0),
            streams_per_ip: Mutex::new(HashMap::new()),
            max_streams: cfg.max_streams,
            max_streams_per_ip: cfg.max_streams_per_ip,
            stream_idle: cfg.stream_idle,
            stream_first_message: cfg.stream_first_message,
            stream_queue: cfg.stream_queue,
            stream_write_timeout: cfg.stream_write_timeout,
            udp,
            udp_addr,
            registry,
            waker,
            new_streams: Mutex::new(Vec::new()),
            stopped: AtomicBool::new(false),
            tls: parking_lot::RwLock::new(tls.as_ref().map(|(_, sc)| sc.clone())),
            relay_ip,
            ports: cfg.relay_ports,
        });
        let pump = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("webcall-turn-udp".into())
                .spawn(move || pump_loop(shared, poll))
                .map_err(pump_err)?
        };
        let mut tasks = vec![tokio::spawn(tcp_accept(shared.clone(), tcp)), tokio::spawn(timer_loop(shared.clone()))];
        if let Some((l, _)) = tls {
            tasks.push(tokio::spawn(tls_accept(shared.clone(), l)));
        }
        let host_ip = cfg.external_ip.unwrap_or(udp_addr.ip());
        let minter = IceMinter::for_addrs(
            cfg.secret.clone().into_bytes(),
            cfg.credential_ttl,
            SocketAddr::new(host_ip, udp_addr.port()),
            tls_addr.map(|a| SocketAddr::new(cfg.external_ip.unwrap_or(a.ip()), a.port())),
        );
        tracing::info!(udp = %udp_addr, tcp = %udp_addr, tls = ?tls_addr, relay_ports = %cfg.relay_ports, "STUN/TURN listening");
        Ok(TurnHandle { stop: None, pump: Some(pump), addr: udp_addr, tls_addr, minter, shared, tasks })
    }
}

/// A running server. Dropping it stops the server too (without waiting).
pub struct TurnHandle {
    /// Stops the TURN thread's runtime.
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    /// The UDP pump thread.
    pump: Option<std::thread::JoinHandle<()>>,
    addr: SocketAddr,
    tls_addr: Option<SocketAddr>,
    minter: IceMinter,
    shared: Arc<Shared>,
    tasks: Vec<JoinHandle<()>>,
}

impl TurnHandle {
    /// The bound UDP and TCP address (same port).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
    pub fn tls_addr(&self) -> Option<SocketAddr> {
        self.tls_addr
    }
    /// Mints `iceServers` pointing at this server (at `--turn-external-ip` when given). Implements
    /// `webcall_protocol::IceProvider`.
    pub fn ice_minter(&self) -> IceMinter {
        self.minter.clone()
    }
    pub fn stats(&self) -> CoreStats {
        self.shared.state.lock().core.stats()
    }
    /// Replaces the TLS configuration (e.g. a renewed certificate) for TURN-over-TLS connections accepted
    /// from now on; established ones keep theirs. Without `--turns-listen` it does nothing.
    pub fn set_tls(&self, cfg: Arc<rustls::ServerConfig>) {
        let mut tls = self.shared.tls.write();
        if tls.is_some() {
            *tls = Some(cfg);
        }
    }
    /// Reads [`TurnHandle::stats`] from elsewhere (e.g. `/metrics`) while the server runs.
    pub fn stats_reader(&self) -> impl Fn() -> CoreStats + Send + Sync + 'static {
        let shared = self.shared.clone();
        move || shared.state.lock().core.stats()
    }
    /// Stops all tasks and closes all sockets; returns once the listeners are closed.
    pub async fn shutdown(mut self) {
        self.abort_all();
        for t in self.tasks.drain(..) {
            let _ = t.await;
        }
        if let Some(p) = self.pump.take() {
            let _ = tokio::task::spawn_blocking(move || p.join()).await;
        }
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
    fn abort_all(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
        self.shared.stopped.store(true, Ordering::Release);
        let _ = self.shared.waker.wake();
        let mut st = self.shared.state.lock();
        st.relays.clear();
        st.relay_of.clear();
        // Stuck writers (clients that stopped reading) are not waited for.
        for (_, s) in st.streams.drain() {
            s.kill();
        }
        st.reserved.clear();
    }
}

impl Drop for TurnHandle {
    fn drop(&mut self) {
        self.abort_all();
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// A UDP socket with `quinn-udp`'s batched, offloaded I/O. Non-blocking; the pump thread's epoll says when
/// it is readable.
struct UdpIo {
    sock: std::net::UdpSocket,
    state: UdpSocketState,
}

impl UdpIo {
    fn new(sock: std::net::UdpSocket) -> io::Result<UdpIo> {
        let state = UdpSocketState::new((&sock).into())?;
        sock.set_nonblocking(true)?;
        // quinn-udp asks for the destination address, the TOS byte and a receive timestamp of every datagram
        // (QUIC uses them; a relay does not): each costs the kernel a control message per datagram, and
        // SO_TIMESTAMPNS makes it timestamp every packet it receives. GRO stays on.
        let v6 = sock.local_addr()?.is_ipv6();
        let off: [(libc::c_int, libc::c_int); 3] = if v6 {
            [
                (libc::IPPROTO_IPV6, libc::IPV6_RECVPKTINFO),
                (libc::IPPROTO_IPV6, libc::IPV6_RECVTCLASS),
                (libc::SOL_SOCKET, libc::SO_TIMESTAMPNS),
            ]
        } else {
            [
                (libc::IPPROTO_IP, libc::IP_PKTINFO),
                (libc::IPPROTO_IP, libc::IP_RECVTOS),
                (libc::SOL_SOCKET, libc::SO_TIMESTAMPNS),
            ]
        };
        for (level, name) in off {
            let _ = set_int_option(&sock, level, name, 0);
        }
        if v6 {
            // A dual-stack socket got IP_RECVTOS for its IPv4 side too.
            let _ = set_int_option(&sock, libc::IPPROTO_IP, libc::IP_RECVTOS, 0);
        }
        Ok(UdpIo { sock, state })
    }

    /// Sends now or not at all: a full socket buffer loses the datagram, as the network would. With
    /// `segment_size`, `data` is several datagrams of that size (the last may be shorter) for one GSO send;
    /// where the kernel refuses that (a segment over the path MTU), they go one by one.
    fn send(&self, to: SocketAddr, data: &[u8], segment_size: Option<usize>) {
        let t = quinn_udp::Transmit { destination: to, ecn: None, contents: data, segment_size, src_ip: None };
        match self.state.try_send((&self.sock).into(), &t) {
            Err(e) if segment_size.is_some() && e.kind() != io::ErrorKind::WouldBlock => {
                for d in data.chunks(segment_size.unwrap_or(data.len()).max(1)) {
                    self.send(to, d, None);
                }
            }
            _ => {}
        }
    }

    /// Reads a batch if one is ready: `Ok(0)` when none is.
    fn try_recv(&self, bufs: &mut [IoSliceMut<'_>], meta: &mut [RecvMeta]) -> io::Result<usize> {
        match self.state.recv((&self.sock).into(), bufs, meta) {
            Ok(n) => Ok(n),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(0),
            Err(e) => Err(e),
        }
    }
}

/// The pump thread's buffers: the slots of a batched read, the datagrams of that read going out to peers and the
/// frames going out to clients.
struct Scratch {
    slots: Vec<Vec<u8>>,
    meta: Vec<RecvMeta>,
    to_peers: ToPeers,
    out: Out,
}

impl Scratch {
    fn new() -> Scratch {
        Scratch {
            slots: (0..RECV_SLOTS).map(|_| vec![0u8; MAX_UDP]).collect(),
            meta: vec![RecvMeta::default(); RECV_SLOTS],
            to_peers: ToPeers::default(),
            out: Out::default(),
        }
    }

    fn bufs(slots: &mut [Vec<u8>]) -> [IoSliceMut<'_>; RECV_SLOTS] {
        let mut it = slots.iter_mut();
        std::array::from_fn(|_| IoSliceMut::new(it.next().expect("RECV_SLOTS slots")))
    }
}

/// Most bytes in one GSO send (the kernel's limit is 64 KiB with headers).
const GSO_MAX_BYTES: usize = 60 << 10;

/// Frames for clients collected under the lock, packed back to back, sent after it.
#[derive(Default)]
struct Out {
    buf: Vec<u8>,
    frames: Vec<(SocketAddr, usize)>,
    /// Frames for TCP/TLS clients: (client, bytes of `sbuf`); each client's leave in one write.
    streams: Vec<(Arc<StreamOut>, Range<usize>)>,
    sbuf: Vec<u8>,
    gather: Vec<u8>,
    /// Single frames waiting for one `sendmmsg`: (to, bytes of `buf`).
    singles: Vec<(SocketAddr, Range<usize>)>,
    names: Vec<socket2::SockAddr>,
}

impl Out {
    /// Frames `payload` from `from` for `alloc` in place at the end of the buffer; keeps it if the core relays it
    /// to a UDP client, hands it to the stream of a TCP/TLS one.
    fn relay(
        &mut self,
        core: &mut TurnCore,
        streams: &FxHashMap<FiveTuple, Arc<StreamOut>>,
        now: Instant,
        alloc: AllocId,
        from: SocketAddr,
        payload: &[u8],
    ) {
        let pos = self.buf.len();
        self.buf.resize(pos + PEER_HEADROOM + payload.len() + PEER_TAILROOM, 0);
        self.buf[pos + PEER_HEADROOM..pos + PEER_HEADROOM + payload.len()].copy_from_slice(payload);
        let framed = core.handle_peer(now, alloc, from, &mut self.buf[pos..], PEER_HEADROOM, payload.len());
        match framed {
            Some((tuple, r)) if tuple.transport == Transport::Udp => {
                self.buf.copy_within(pos + r.start..pos + r.end, pos);
                self.buf.truncate(pos + r.len());
                self.frames.push((tuple.client, r.len()));
            }
            Some((tuple, r)) => {
                if let Some(s) = streams.get(&tuple) {
                    let start = self.sbuf.len();
                    self.sbuf.extend_from_slice(&self.buf[pos + r.start..pos + r.end]);
                    self.streams.push((s.clone(), start..self.sbuf.len()));
                }
                self.buf.truncate(pos);
            }
            None => self.buf.truncate(pos),
        }
    }

    /// Sends the frames: runs of equal-sized frames to one client go as one GSO send, the others (to many
    /// clients) together in `sendmmsg` calls; each client's frames stay in order.
    fn flush(&mut self, io: &UdpIo) {
        self.flush_streams();
        let max = io.state.max_gso_segments().max(1);
        let (mut i, mut off) = (0, 0);
        while i < self.frames.len() {
            let (to, len) = self.frames[i];
            let mut j = i + 1;
            let mut end = off + len;
            // A run may end with one shorter frame (GSO sends the remainder as the last segment).
            while j < self.frames.len() && j - i < max && self.frames[j].0 == to && self.frames[j - 1].1 == len {
                let l = self.frames[j].1;
                if l > len || end - off + l > GSO_MAX_BYTES {
                    break;
                }
                end += l;
                j += 1;
                if l < len {
                    break;
                }
            }
            if j - i > 1 {
                send_many(&io.sock, &self.buf, &self.singles, &mut self.names);
                self.singles.clear();
                io.send(to, &self.buf[off..end], Some(len));
            } else {
                self.singles.push((to, off..end));
            }
            off = end;
            i = j;
        }
        send_many(&io.sock, &self.buf, &self.singles, &mut self.names);
        self.singles.clear();
        self.buf.clear();
        self.frames.clear();
    }

    /// What each TCP/TLS client gets leaves in one write (or one queueing), in order.
    fn flush_streams(&mut self) {
        if self.streams.is_empty() {
            return;
        }
        if self.streams.len() > 1 {
            self.streams.sort_by_key(|(s, _)| Arc::as_ptr(s)); // stable: per client, order kept
        }
        let mut i = 0;
        while i < self.streams.len() {
            let s = &self.streams[i].0;
            let j = i + self.streams[i..].iter().take_while(|(t, _)| Arc::ptr_eq(s, t)).count();
            let group = &self.streams[i..j];
            let whole = if let [(_, r)] = group {
                s.push(&self.sbuf[r.clone()], true)
            } else {
                self.gather.clear();
                for (_, r) in group {
                    self.gather.extend_from_slice(&self.sbuf[r.clone()]);
                }
                s.push(&self.gather, true)
            };
            // Over the queue limit all at once: as many whole frames as fit, the rest dropped.
            if !whole && group.len() > 1 {
                for (_, r) in group {
                    s.push(&self.sbuf[r.clone()], true);
                }
            }
            i = j;
        }
        self.streams.clear();
        self.sbuf.clear();
    }
}

/// Frames for clients are sent once per wake-up, or earlier when this many bytes are waiting.
const OUT_FLUSH: usize = 256 << 10;

/// Datagrams per `sendmmsg` call.
const SEND_BATCH: usize = 32;

/// Sends each `buf[range]` to its address, many per `sendmmsg` (quinn-udp batches only by GSO, to one
/// address). Best effort like every relayed datagram: a full socket buffer drops the rest.
fn send_many(
    sock: &std::net::UdpSocket,
    buf: &[u8],
    msgs: &[(SocketAddr, Range<usize>)],
    names: &mut Vec<socket2::SockAddr>,
) {
    send_many_by(sock, msgs.len(), |i| (msgs[i].0, &buf[msgs[i].1.clone()]), names)
}

/// [`send_many`] for `count` datagrams that `msg(i)` gives.
fn send_many_by<'b>(
    sock: &std::net::UdpSocket,
    count: usize,
    msg: impl Fn(usize) -> (SocketAddr, &'b [u8]),
    names: &mut Vec<socket2::SockAddr>,
) {
    let mut first = 0;
    while first < count {
        let len = (count - first).min(SEND_BATCH);
        let chunk = first..first + len;
        first += len;
        if len == 1 {
            let (to, data) = msg(chunk.start);
            let _ = sock.send_to(data, to);
            continue;
        }
        names.clear();
        names.extend(chunk.clone().map(|i| socket2::SockAddr::from(msg(i).0)));
        // SAFETY: all-zero iovec and mmsghdr values are valid (null pointers, zero lengths); every pointer set
        // below points into the callers' buffers, `names` or `iovs`, which outlive the call.
        let mut iovs: [libc::iovec; SEND_BATCH] = unsafe { std::mem::zeroed() };
        let mut hdrs: [libc::mmsghdr; SEND_BATCH] = unsafe { std::mem::zeroed() };
        for (i, (k, name)) in chunk.clone().zip(names.iter()).enumerate() {
            let data = msg(k).1;
            iovs[i] = libc::iovec { iov_base: data.as_ptr() as *mut libc::c_void, iov_len: data.len() };
            let h = &mut hdrs[i].msg_hdr;
            h.msg_name = name.as_ptr() as *mut libc::c_void;
            h.msg_namelen = name.len();
            h.msg_iov = &mut iovs[i];
            h.msg_iovlen = 1;
        }
        let mut sent = 0;
        while sent < len {
            // SAFETY: `hdrs[sent..len]` are initialised above.
            let n =
                unsafe { libc::sendmmsg(sock.as_raw_fd(), hdrs[sent..].as_mut_ptr(), (len - sent) as libc::c_uint, 0) };
            if n > 0 {
                sent += n as usize;
                continue;
            }
            match io::Error::last_os_error().kind() {
                io::ErrorKind::Interrupted => {}
                io::ErrorKind::WouldBlock => break,
                // This datagram cannot go (e.g. too large for the path): skip it, send the rest.
                _ => sent += 1,
            }
        }
    }
}

/// Datagrams for peers out of one batched read from clients, sent together once the batch is handled: those of
/// one relay socket in one `sendmmsg` (each client's datagrams stay in order).
#[derive(Default)]
struct ToPeers {
    /// (relay slab index, peer, slot of the read, bytes of that slot).
    msgs: Vec<(usize, SocketAddr, usize, Range<usize>)>,
    names: Vec<socket2::SockAddr>,
    /// A GSO run copied together.
    gather: Vec<u8>,
}

impl ToPeers {
    /// Sends and forgets everything queued. Must run before the slab changes (a control message may close a
    /// relay and reuse its index) and before the slots are read into again.
    fn flush(&mut self, relays: &Slab<Relay>, slots: &[Vec<u8>]) {
        let msgs = &mut self.msgs;
        if msgs.len() > 1 {
            msgs.sort_by_key(|m| m.0); // stable: per relay, order kept
        }
        let mut i = 0;
        while i < msgs.len() {
            let relay = msgs[i].0;
            let j = i + msgs[i..].iter().take_while(|m| m.0 == relay).count();
            if let Some(r) = relays.get(relay) {
                let group = &msgs[i..j];
                let data = |k: usize| &slots[group[k].2][group[k].3.clone()];
                let max = r.sock.state.max_gso_segments().max(1);
                // Runs of equal-sized datagrams to one peer (a video frame's packets) leave as one GSO send: one
                // trip through the stack instead of one per datagram. The rest go together in `sendmmsg`.
                let (mut k, mut single) = (0, 0);
                while k < group.len() {
                    let (peer, len) = (group[k].1, data(k).len());
                    let mut e = k + 1;
                    while e < group.len()
                        && e - k < max
                        && group[e].1 == peer
                        && data(e).len() == len
                        && (e - k + 1) * len <= GSO_MAX_BYTES
                    {
                        e += 1;
                    }
                    if e - k > 1 {
                        let rest = &group[single..k];
                        send_many_by(&r.sock.sock, rest.len(), |x| (rest[x].1, data(single + x)), &mut self.names);
                        self.gather.clear();
                        for x in k..e {
                            self.gather.extend_from_slice(data(x));
                        }
                        r.sock.send(peer, &self.gather, Some(len));
                        single = e;
                    }
                    k = e;
                }
                let rest = &group[single..];
                send_many_by(&r.sock.sock, rest.len(), |x| (rest[x].1, data(single + x)), &mut self.names);
            }
            i = j;
        }
        msgs.clear();
    }
}

/// [`ToPeers`] for the frames of one read from a TCP/TLS client, copied out of the framer.
#[derive(Default)]
struct StreamToPeers {
    buf: Vec<u8>,
    to: ToPeers,
}

impl StreamToPeers {
    fn push(&mut self, relay: usize, peer: SocketAddr, data: &[u8]) {
        let start = self.buf.len();
        self.buf.extend_from_slice(data);
        self.to.msgs.push((relay, peer, 0, start..self.buf.len()));
    }

    fn flush(&mut self, relays: &Slab<Relay>) {
        self.to.flush(relays, std::slice::from_ref(&self.buf));
        self.buf.clear();
        // Idle connections keep no large buffer.
        if self.buf.capacity() > 64 << 10 {
            self.buf = Vec::new();
        }
    }
}

/// An open relay socket, registered with the pump's epoll under its slab index.
struct Relay {
    alloc: AllocId,
    sock: UdpIo,
    port: u16,
}

/// Outbound bytes of one TCP/TLS client. Over TCP, while nothing is queued, [`StreamOut::push`] writes
/// straight to the socket (no task wake-up per relayed packet); what does not fit at once is queued for the
/// writer task, which then has the socket until the queue is empty again.
struct StreamOut {
    q: Mutex<OutQueue>,
    /// A duplicate of the TCP socket's descriptor (non-blocking, like the original) for direct writes; `None`
    /// over TLS, whose records only the writer task can produce.
    direct: Option<std::net::TcpStream>,
    /// Most bytes `buf` may hold.
    limit: usize,
    notify: Notify,
    closed: AtomicBool,
    reader: Mutex<Option<AbortHandle>>,
    writer: Mutex<Option<AbortHandle>>,
}

impl StreamOut {
    /// A new stream client's output, registered under its tuple (the TLS and the plain TCP path share this).
    fn register(shared: &Shared, tuple: FiveTuple, direct: Option<std::net::TcpStream>) -> Arc<StreamOut> {
        let out = Arc::new(StreamOut {
            q: Mutex::new(OutQueue::default()),
            direct,
            limit: shared.stream_queue,
            notify: Notify::new(),
            closed: AtomicBool::new(false),
            reader: Mutex::new(None),
            writer: Mutex::new(None),
        });
        shared.state.lock().streams.insert(tuple, out.clone());
        out
    }
}

#[derive(Default)]
struct OutQueue {
    buf: Vec<u8>,
    /// The writer task holds bytes taken from `buf` that are not all written yet: no direct writes meanwhile.
    writing: bool,
}

impl StreamOut {
    /// Writes or queues `data`. Past the limit, relayed data (`droppable`) is dropped as UDP would lose it; an
    /// answer that does not fit means the client is not reading them: it is disconnected. False when `data` was
    /// dropped for the limit.
    fn push(&self, data: &[u8], droppable: bool) -> bool {
        {
            let mut q = self.q.lock();
            if let Some(sock) = self.direct.as_ref().filter(|_| q.buf.is_empty() && !q.writing) {
                if self.closed.load(Ordering::Acquire) {
                    return true;
                }
                match (&*sock).write(data) {
                    Ok(n) if n == data.len() => return true,
                    // The rest of a frame begun on the wire must follow it, whatever the limit.
                    Ok(n) => {
                        q.buf.extend_from_slice(&data[n..]);
                        drop(q);
                        self.notify.notify_one();
                        return true;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(_) => {
                        drop(q);
                        self.kill();
                        return true;
                    }
                }
            }
            if q.buf.len() + data.len() > self.limit {
                drop(q);
                if !droppable {
                    tracing::debug!(limit = self.limit, "TURN stream client does not read its answers: closed");
                    self.kill();
                }
                return false;
            }
            q.buf.extend_from_slice(data);
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
    /// Closes at once, dropping what is queued.
    fn kill(&self) {
        self.close();
        if let Some(w) = self.writer.lock().take() {
            w.abort();
        }
        if let Some(sock) = &self.direct {
            let _ = sock.shutdown(std::net::Shutdown::Both);
        }
    }
}

struct State {
    core: TurnCore,
    /// Relay sockets; the slab index is the socket's epoll token.
    relays: Slab<Relay>,
    relay_of: FxHashMap<AllocId, usize>,
    used_ports: HashSet<u16>,
    /// Ports held for RESERVATION-TOKENs.
    reserved: HashMap<u16, std::net::UdpSocket>,
    streams: FxHashMap<FiveTuple, Arc<StreamOut>>,
}

struct Shared {
    state: Mutex<State>,
    /// Open TCP/TLS connections (handshaking ones included), capped at `max_streams`.
    streams_open: AtomicUsize,
    /// The same per client address (IPv6 per /64), capped at `max_streams_per_ip`.
    streams_per_ip: Mutex<HashMap<IpAddr, usize>>,
    max_streams: usize,
    max_streams_per_ip: usize,
    stream_idle: Duration,
    stream_first_message: Duration,
    stream_queue: usize,
    stream_write_timeout: Duration,
    udp: UdpIo,
    udp_addr: SocketAddr,
    /// The pump's epoll: relay sockets are added as they open.
    registry: mio::Registry,
    waker: mio::Waker,
    /// TCP clients accepted for the pump to read, taken up at its next wake-up.
    new_streams: Mutex<Vec<PumpStream>>,
    stopped: AtomicBool,
    /// The TLS configuration for new TURNS connections; [`TurnHandle::set_tls`] swaps it.
    tls: parking_lot::RwLock<Option<Arc<rustls::ServerConfig>>>,
    relay_ip: IpAddr,
    ports: PortRange,
}

impl Shared {
    /// Feeds one frame from a client to the core. Relayed data (the hot path) goes straight out of its relay
    /// socket, outside the lock; anything else queues its outputs (UDP ones into `udp_out`).
    /// Non-blocking UDP sends cannot stall, so the relayed datagram leaves under the lock.
    fn client_frame(
        self: &Arc<Self>,
        st: &mut State,
        tuple: FiveTuple,
        frame: &[u8],
        udp_out: &mut UdpOut,
        to_peers: &mut StreamToPeers,
    ) {
        match st.core.handle_client(Instant::now(), tuple, frame) {
            Some(p) => {
                if let Some(&i) = st.relay_of.get(&p.alloc) {
                    to_peers.push(i, p.peer, p.data);
                }
            }
            None => {
                to_peers.flush(&st.relays);
                self.pump(st, udp_out)
            }
        }
    }

    /// Executes the core's queued outputs. UDP datagrams are collected into `udp_out` to be sent once
    /// the lock is released.
    fn pump(self: &Arc<Self>, st: &mut State, udp_out: &mut UdpOut) {
        while let Some(o) = st.core.poll_output() {
            match o {
                Output::Transmit { tuple, data } => match tuple.transport {
                    Transport::Udp => udp_out.push((data, tuple.client)),
                    _ => {
                        if let Some(s) = st.streams.get(&tuple) {
                            s.push(&data, false);
                        }
                    }
                },
                Output::OpenRelay { alloc, family, port, dont_fragment } => {
                    let bound = self.open_relay(st, alloc, family, port, dont_fragment);
                    st.core.relay_opened(Instant::now(), alloc, bound);
                }
                Output::ReleaseReserved { port } => {
                    if st.reserved.remove(&port).is_some() {
                        st.used_ports.remove(&port);
                    }
                }
                Output::CloseRelay { alloc } => {
                    if let Some(i) = st.relay_of.remove(&alloc) {
                        let r = st.relays.remove(i);
                        let _ = self.registry.deregister(&mut SourceFd(&r.sock.sock.as_raw_fd()));
                        st.used_ports.remove(&r.port);
                    }
                }
            }
        }
    }

    fn open_relay(
        self: &Arc<Self>,
        st: &mut State,
        alloc: AllocId,
        family: Family,
        want: RelayPort,
        dont_fragment: bool,
    ) -> Option<SocketAddr> {
        let ip = match (family, self.relay_ip) {
            (Family::V4, IpAddr::V4(ip)) => IpAddr::V4(ip),
            (Family::V4, _) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            (Family::V6, ip) => ip,
        };
        if let RelayPort::Reserved(port) = want {
            let bound =
                st.reserved.remove(&port).and_then(|sock| self.start_relay(st, alloc, sock, port, dont_fragment));
            if bound.is_none() {
                st.used_ports.remove(&port);
            }
            return bound;
        }
        let (even, reserve) = match want {
            RelayPort::Even { reserve_next } => (true, reserve_next),
            _ => (false, false),
        };
        let n = self.ports.len();
        let first = rand::rng().random_range(0..n);
        for i in 0..n {
            let port = self.ports.min + ((first + i) % n) as u16;
            if st.used_ports.contains(&port) || (even && port % 2 == 1) {
                continue;
            }
            if reserve && (port == self.ports.max || st.used_ports.contains(&(port + 1))) {
                continue;
            }
            let Ok(std_sock) = std::net::UdpSocket::bind(SocketAddr::new(ip, port)) else {
                continue;
            };
            if reserve {
                let Ok(next) = std::net::UdpSocket::bind(SocketAddr::new(ip, port + 1)) else {
                    continue;
                };
                st.used_ports.insert(port + 1);
                st.reserved.insert(port + 1, next);
            }
            return self.start_relay(st, alloc, std_sock, port, dont_fragment);
        }
        tracing::warn!(range = %self.ports, "no free relay port: widen --turn-relay-ports");
        None
    }

    fn start_relay(
        self: &Arc<Self>,
        st: &mut State,
        alloc: AllocId,
        std_sock: std::net::UdpSocket,
        port: u16,
        dont_fragment: bool,
    ) -> Option<SocketAddr> {
        {
            set_buffers(&std_sock, RELAY_SOCKET_BUFFER);
            // quinn-udp sets DF (PMTU probing) on every socket; without DONT-FRAGMENT, Linux's default again.
            let sock = match UdpIo::new(std_sock).and_then(|io| set_pmtu_discover(&io.sock, dont_fragment).map(|_| io))
            {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "relay socket setup failed");
                    return None;
                }
            };
            let bound = sock.sock.local_addr().ok()?;
            let entry = st.relays.vacant_entry();
            let token = mio::Token(entry.key());
            if let Err(e) =
                self.registry.register(&mut SourceFd(&sock.sock.as_raw_fd()), token, mio::Interest::READABLE)
            {
                tracing::warn!(error = %e, "relay socket setup failed");
                return None;
            }
            entry.insert(Relay { alloc, sock, port });
            st.relay_of.insert(alloc, token.0);
            st.used_ports.insert(port);
            Some(bound)
        }
    }

    /// Control-plane datagrams (answers), sent after the lock. A full socket buffer loses one; the client
    /// retransmits its request.
    fn send_udp(&self, out: &mut UdpOut) {
        for (data, to) in out.drain(..) {
            self.udp.send(to, &data, None);
        }
    }
}

/// UDP and TCP on the same port. With port 0, retries until a port free for both is found.
fn bind_pair(addr: SocketAddr) -> Result<(UdpIo, TcpListener), TurnError> {
    let bind_err = |proto, e| TurnError::Bind { proto, addr, source: e };
    for _ in 0..if addr.port() == 0 { 20 } else { 1 } {
        let udp = std::net::UdpSocket::bind(addr).map_err(|e| bind_err("UDP", e))?;
        let port = udp.local_addr().map_err(|e| bind_err("UDP", e))?.port();
        let tcp = match bind_tcp(SocketAddr::new(addr.ip(), port)) {
            Ok(t) => t,
            Err(_) if addr.port() == 0 => continue,
            Err(e) => return Err(bind_err("TCP", e)),
        };
        set_buffers(&udp, SOCKET_BUFFER);
        let udp = UdpIo::new(udp).map_err(|e| bind_err("UDP", e))?;
        return Ok((udp, tcp));
    }
    Err(bind_err("TCP", io::Error::new(io::ErrorKind::AddrInUse, "no port free for both UDP and TCP")))
}

fn bind_tcp(addr: SocketAddr) -> io::Result<TcpListener> {
    let s = if addr.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
    s.set_reuseaddr(true)?;
    s.bind(addr)?;
    s.listen(1024)
}

/// Larger kernel buffers absorb bursts (the kernel caps them at net.core.rmem_max/wmem_max).
fn set_buffers(sock: &std::net::UdpSocket, size: usize) {
    let s = socket2::SockRef::from(sock);
    let _ = s.set_recv_buffer_size(size);
    let _ = s.set_send_buffer_size(size);
}

/// DONT-FRAGMENT (RFC 8656 §7.2): with `df`, every datagram from this relay socket leaves with DF set and one
/// larger than the path MTU fails to send; without, Linux's default (DF while the path MTU allows, fragments
/// above it).
fn set_pmtu_discover(sock: &std::net::UdpSocket, df: bool) -> io::Result<()> {
    let (level, name, value) = match (sock.local_addr()?.is_ipv6(), df) {
        (false, true) => (libc::IPPROTO_IP, libc::IP_MTU_DISCOVER, libc::IP_PMTUDISC_DO),
        (false, false) => (libc::IPPROTO_IP, libc::IP_MTU_DISCOVER, libc::IP_PMTUDISC_WANT),
        (true, true) => (libc::IPPROTO_IPV6, libc::IPV6_MTU_DISCOVER, libc::IPV6_PMTUDISC_DO),
        (true, false) => (libc::IPPROTO_IPV6, libc::IPV6_MTU_DISCOVER, libc::IPV6_PMTUDISC_WANT),
    };
    set_int_option(sock, level, name, value)
}

fn set_int_option(
    sock: &std::net::UdpSocket,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> io::Result<()> {
    // SAFETY: a valid socket descriptor and a c_int option value of the right size.
    let r = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            level,
            name,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
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

/// Epoll tokens of the pump besides the relay sockets' (slab indices).
const LISTENER: mio::Token = mio::Token(usize::MAX - 1);
const WAKER: mio::Token = mio::Token(usize::MAX - 2);
/// Tokens of the TCP clients the pump reads: this plus their index in the pump's own slab (above any relay's).
const STREAM_BASE: usize = 1 << 40;

/// Control-plane datagrams to clients: (data, to).
type UdpOut = Vec<(Vec<u8>, SocketAddr)>;

/// The UDP data plane: one thread, one epoll over the listening socket and every relay socket (as coturn's
/// relay threads do). A wake-up takes the lock once for everything that is ready; no task is woken per packet.
fn pump_loop(shared: Arc<Shared>, mut poll: mio::Poll) {
    let mut events = mio::Events::with_capacity(256);
    let mut s = Scratch::new();
    let mut udp_out = UdpOut::new();
    // Sockets left readable after BATCHES_PER_WAKE batches: epoll is edge-triggered, so they are read again
    // after the others without waiting.
    let mut again: Vec<mio::Token> = Vec::new();
    let mut ready: Vec<mio::Token> = Vec::new();
    // The TCP clients this thread reads (only it touches them; their end drops them here).
    let mut conns: Slab<PumpStream> = Slab::new();
    let mut stream_peers = StreamToPeers::default();
    loop {
        let timeout = if again.is_empty() { None } else { Some(Duration::ZERO) };
        if let Err(e) = poll.poll(&mut events, timeout) {
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            tracing::error!(error = %e, "TURN UDP pump failed");
            return;
        }
        if shared.stopped.load(Ordering::Acquire) {
            return;
        }
        ready.clear();
        ready.append(&mut again);
        let mut woken = false;
        for e in events.iter() {
            if e.token() == WAKER {
                woken = true;
            } else {
                ready.push(e.token());
            }
        }
        if woken {
            shared.adopt_streams(&mut conns);
        }
        {
            let mut st = shared.state.lock();
            for &t in &ready {
                let more = if t == LISTENER {
                    shared.client_batch(&mut st, &mut s, &mut udp_out)
                } else if t.0 >= STREAM_BASE {
                    shared.stream_read(&mut st, &mut conns, t.0 - STREAM_BASE, &mut stream_peers, &mut udp_out)
                } else {
                    shared.peer_batch(&mut st, &mut s, t.0)
                };
                if more && !again.contains(&t) {
                    again.push(t);
                }
            }
        }
        // What every ready relay socket had for clients leaves together (GSO runs, sendmmsg).
        s.out.flush(&shared.udp);
        if !udp_out.is_empty() {
            shared.send_udp(&mut udp_out);
        }
    }
}

/// At most this many batches per socket and wake-up, so that one busy socket does not starve the others.
const BATCHES_PER_WAKE: usize = 4;

impl Shared {
    /// Reads batches from the listening socket: relayed data goes out of the relay sockets at once, the
    /// control plane's datagrams into `udp_out`. True if the socket may still hold datagrams.
    fn client_batch(self: &Arc<Self>, st: &mut State, s: &mut Scratch, udp_out: &mut UdpOut) -> bool {
        let server = self.udp_addr;
        let Scratch { slots, meta, to_peers, .. } = s;
        for _ in 0..BATCHES_PER_WAKE {
            let n = match self.udp.try_recv(&mut Scratch::bufs(slots), meta) {
                Ok(0) => return false,
                Ok(n) => n,
                Err(e) if transient(&e) => continue,
                Err(e) => {
                    tracing::error!(error = %e, "TURN UDP socket failed");
                    return false;
                }
            };
            let now = Instant::now();
            for (j, (m, buf)) in meta[..n].iter().zip(slots.iter()).enumerate() {
                let tuple = FiveTuple { transport: Transport::Udp, client: m.addr, server };
                for d in buf[..m.len].chunks(m.stride.max(1)) {
                    match st.core.handle_client(now, tuple, d) {
                        Some(p) => {
                            if let Some(&i) = st.relay_of.get(&p.alloc) {
                                let off = p.data.as_ptr() as usize - buf.as_ptr() as usize;
                                to_peers.msgs.push((i, p.peer, j, off..off + p.data.len()));
                            }
                        }
                        None => {
                            // The outputs may close relays and reuse their slab indices.
                            to_peers.flush(&st.relays, slots);
                            self.pump(st, udp_out)
                        }
                    }
                }
            }
            to_peers.flush(&st.relays, slots);
            // Fewer than asked for: the queue was empty, and the next datagram raises a new edge.
            if n < meta.len() {
                return false;
            }
        }
        true
    }

    /// Reads batches from relay socket `index` and relays them to their client. True if the socket may still
    /// hold datagrams.
    fn peer_batch(&self, st: &mut State, s: &mut Scratch, index: usize) -> bool {
        let State { core, relays, streams, .. } = st;
        // A stale token (the relay closed since the wake-up) reads nothing or another relay's datagrams
        // harmlessly.
        let Some(relay) = relays.get(index) else {
            return false;
        };
        let Scratch { slots, meta, out, .. } = s;
        for _ in 0..BATCHES_PER_WAKE {
            let n = match relay.sock.try_recv(&mut Scratch::bufs(slots), meta) {
                Ok(0) => return false,
                Ok(n) => n,
                Err(e) if transient(&e) => continue,
                Err(e) => {
                    tracing::warn!(error = %e, alloc = relay.alloc.0, "relay socket failed");
                    return false;
                }
            };
            let now = Instant::now();
            for (m, buf) in meta[..n].iter().zip(slots.iter()) {
                for d in buf[..m.len].chunks(m.stride.max(1)) {
                    out.relay(core, streams, now, relay.alloc, m.addr, d);
                }
            }
            if out.buf.len() + out.sbuf.len() >= OUT_FLUSH {
                out.flush(&self.udp);
            }
            if n < meta.len() {
                return false;
            }
        }
        true
    }
}

impl Shared {
    /// Registers the TCP clients accepted since the last wake-up. Epoll reports at once those that already
    /// hold bytes.
    fn adopt_streams(&self, conns: &mut Slab<PumpStream>) {
        let new = std::mem::take(&mut *self.new_streams.lock());
        for c in new {
            let entry = conns.vacant_entry();
            let token = mio::Token(STREAM_BASE + entry.key());
            if let Err(e) = self.registry.register(&mut SourceFd(&c.sock.as_raw_fd()), token, mio::Interest::READABLE) {
                // Dropping it ends the connection.
                tracing::warn!(error = %e, "TURN TCP client not registered");
                continue;
            }
            entry.insert(c);
        }
    }

    /// Reads what TCP client `idx` sent (one read per call, into its framer; a read the kernel did not fill
    /// means its queue is empty, and new bytes raise a new edge) and relays its frames. True if the socket may
    /// still hold bytes.
    fn stream_read(
        self: &Arc<Self>,
        st: &mut State,
        conns: &mut Slab<PumpStream>,
        idx: usize,
        to_peers: &mut StreamToPeers,
        udp_out: &mut UdpOut,
    ) -> bool {
        // A stale token (the connection ended since the wake-up) reads another's bytes harmlessly, or nothing.
        let Some(c) = conns.get_mut(idx) else {
            return false;
        };
        let tuple = c.tuple;
        let (mut end, mut more) = (false, true);
        for _ in 0..BATCHES_PER_WAKE {
            let buf = c.framer.read_buf();
            let len = buf.len();
            let room = buf.capacity() - len;
            // Straight into the spare capacity: zeroing it first (the buffer grows to tens of KiB) cost a memset
            // of the whole room per read.
            let got = match socket2::SockRef::from(&c.sock).recv(&mut buf.spare_capacity_mut()[..room]) {
                Ok(n) => {
                    // SAFETY: `recv` initialised the first `n` bytes of the spare capacity.
                    unsafe { buf.set_len(len + n) };
                    n
                }
                Err(e) => {
                    match e.kind() {
                        io::ErrorKind::Interrupted => continue,
                        io::ErrorKind::WouldBlock => more = false,
                        _ => end = true,
                    }
                    break;
                }
            };
            if got == 0 {
                end = true;
                break;
            }
            let mut framed = false;
            loop {
                match c.framer.next_frame() {
                    Ok(Some(frame)) => {
                        self.client_frame(st, tuple, frame, udp_out, to_peers);
                        framed = true;
                    }
                    Ok(None) => break,
                    Err(_) => {
                        end = true;
                        break;
                    }
                }
            }
            to_peers.flush(&st.relays);
            if framed {
                c.link.framed(c.accepted);
            }
            if end || got < room {
                more = false;
                break;
            }
        }
        if end {
            let c = conns.remove(idx);
            let _ = self.registry.deregister(&mut SourceFd(&c.sock.as_raw_fd()));
            return false;
        }
        more
    }
}

/// A plain TCP client the pump thread reads.
struct PumpStream {
    tuple: FiveTuple,
    /// A duplicate of the connection's descriptor, registered with the pump's epoll.
    sock: std::net::TcpStream,
    framer: StreamFramer,
    accepted: Instant,
    link: Arc<StreamLink>,
}

impl Drop for PumpStream {
    /// The pump stopped reading (end of stream, an error, not TURN, or the pump stopped): the connection's task
    /// closes it.
    fn drop(&mut self) {
        self.link.ended.notify_one();
    }
}

/// What the pump tells the task of a TCP client it reads.
#[derive(Default)]
struct StreamLink {
    /// When the last complete message came, in ms after the connection was accepted, plus one (0: none yet).
    last_frame: AtomicU64,
    ended: Notify,
}

impl StreamLink {
    fn framed(&self, accepted: Instant) {
        self.last_frame.store(accepted.elapsed().as_millis() as u64 + 1, Ordering::Release);
    }
}

async fn timer_loop(shared: Arc<Shared>) {
    let mut udp_out = UdpOut::new();
    loop {
        let next = shared.state.lock().core.poll_timeout();
        let cap = Instant::now() + Duration::from_secs(1);
        tokio::time::sleep_until(next.min(cap).into()).await;
        {
            let mut st = shared.state.lock();
            st.core.handle_timeout(Instant::now());
            shared.pump(&mut st, &mut udp_out);
        }
        shared.send_udp(&mut udp_out);
    }
}

/// The key of the per-address connection cap: the IPv4 address, or the /64 of an IPv6 one (one host
/// usually has a whole /64).
fn stream_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => {
            let s = v6.segments();
            IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
        }
        v4 => v4,
    }
}

/// Holds one of the `max_streams` connection slots, and one of its address's `max_streams_per_ip`.
struct StreamSlot(Arc<Shared>, IpAddr);

impl StreamSlot {
    fn take(shared: &Arc<Shared>, from: IpAddr) -> Option<StreamSlot> {
        let key = stream_key(from);
        {
            let mut per_ip = shared.streams_per_ip.lock();
            let n = per_ip.entry(key).or_insert(0);
            if *n >= shared.max_streams_per_ip {
                tracing::debug!(%from, max = shared.max_streams_per_ip, "TURN stream refused: too many from this address");
                return None;
            }
            *n += 1;
        }
        let n = shared.streams_open.fetch_add(1, Ordering::AcqRel);
        if n >= shared.max_streams {
            shared.streams_open.fetch_sub(1, Ordering::AcqRel);
            release_ip(&mut shared.streams_per_ip.lock(), key);
            tracing::debug!(max = shared.max_streams, "TURN stream connection refused: too many open");
            return None;
        }
        Some(StreamSlot(shared.clone(), key))
    }
}

fn release_ip(per_ip: &mut HashMap<IpAddr, usize>, key: IpAddr) {
    if let Some(n) = per_ip.get_mut(&key) {
        *n -= 1;
        if *n == 0 {
            per_ip.remove(&key);
        }
    }
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        self.0.streams_open.fetch_sub(1, Ordering::AcqRel);
        release_ip(&mut self.0.streams_per_ip.lock(), self.1);
    }
}

async fn tcp_accept(shared: Arc<Shared>, l: TcpListener) {
    loop {
        match l.accept().await {
            Ok((s, from)) => {
                let accepted = Instant::now();
                let Some(slot) = StreamSlot::take(&shared, from.ip()) else {
                    continue;
                };
                let _ = s.set_nodelay(true);
                let server = s.local_addr().unwrap_or(shared.udp_addr);
                let tuple = FiveTuple { transport: Transport::Tcp, client: from, server };
                let shared = shared.clone();
                // The pump thread reads it (a duplicate descriptor for its epoll, one for direct writes); without
                // spare descriptors (EMFILE), tasks read and write it.
                let dups = (s.as_fd().try_clone_to_owned(), s.as_fd().try_clone_to_owned());
                if let (Ok(rd), Ok(direct)) = dups {
                    // Off tokio's reactor: the writer registers for writability only, so incoming bytes wake
                    // only the pump.
                    let Ok(sock) = s.into_std() else {
                        continue;
                    };
                    tokio::spawn(async move {
                        serve_tcp(shared, sock, rd.into(), direct.into(), tuple, accepted).await;
                        drop(slot);
                    });
                    continue;
                }
                tokio::spawn(async move {
                    serve_stream(shared, s, None, tuple, accepted).await;
                    drop(slot);
                });
            }
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!(error = %e, "TURN TCP accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn tls_accept(shared: Arc<Shared>, l: TcpListener) {
    loop {
        match l.accept().await {
            Ok((s, from)) => {
                let accepted = Instant::now();
                let Some(slot) = StreamSlot::take(&shared, from.ip()) else {
                    continue;
                };
                let _ = s.set_nodelay(true);
                let server = s.local_addr().unwrap_or(shared.udp_addr);
                // Read per accept so that a reloaded certificate applies to the next handshake.
                let Some(cfg) = shared.tls.read().clone() else {
                    return;
                };
                let acc = tokio_rustls::TlsAcceptor::from(cfg);
                let shared = shared.clone();
                tokio::spawn(async move {
                    let _slot = slot;
                    let deadline = (accepted + shared.stream_first_message).into();
                    match tokio::time::timeout_at(deadline, acc.accept(s)).await {
                        Ok(Ok(tls)) => {
                            let tuple = FiveTuple { transport: Transport::Tls, client: from, server };
                            serve_stream(shared, tls, None, tuple, accepted).await
                        }
                        Ok(Err(e)) => {
                            tracing::debug!(error = %e, %from, "TURN TLS handshake failed")
                        }
                        Err(_) => tracing::debug!(%from, "TURN TLS handshake timed out"),
                    }
                });
            }
            Err(e) => {
                tracing::warn!(error = %e, "TURN TLS accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Serves one TCP/TLS client until it closes, stops sending complete messages (see
/// [`TurnConfig::stream_idle`](crate::TurnConfig)), stops reading its answers, or the server stops.
async fn serve_stream<S>(
    shared: Arc<Shared>,
    stream: S,
    direct: Option<std::net::TcpStream>,
    tuple: FiveTuple,
    accepted: Instant,
) where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let (mut rd, wr) = tokio::io::split(stream);
    let per_record = tuple.transport == Transport::Tls;
    let out = StreamOut::register(&shared, tuple, direct);
    let writer = tokio::spawn(write_loop(out.clone(), WriteTo::Split { wr, per_record }, shared.stream_write_timeout));
    *out.writer.lock() = Some(writer.abort_handle());
    let reader = {
        let shared = shared.clone();
        tokio::spawn(async move {
            let mut framer = StreamFramer::new();
            let mut udp_out = UdpOut::new();
            let mut to_peers = StreamToPeers::default();
            // Until the first complete message, then after each: bytes alone do not push it back.
            let mut deadline = accepted + shared.stream_first_message;
            loop {
                // Every complete frame of a read under one lock.
                let mut framed = false;
                let mut bad = false;
                if framer.buffered() > 0 {
                    let mut st = shared.state.lock();
                    loop {
                        match framer.next_frame() {
                            Ok(Some(frame)) => {
                                shared.client_frame(&mut st, tuple, frame, &mut udp_out, &mut to_peers);
                                framed = true;
                            }
                            Ok(None) => break,
                            Err(_) => {
                                bad = true;
                                break;
                            }
                        }
                    }
                    to_peers.flush(&st.relays);
                }
                shared.send_udp(&mut udp_out);
                if bad {
                    return;
                }
                if framed {
                    deadline = Instant::now() + shared.stream_idle;
                }
                match tokio::time::timeout_at(deadline.into(), rd.read_buf(framer.read_buf())).await {
                    Ok(Ok(0)) | Ok(Err(_)) => return,
                    Ok(Ok(_)) => {}
                    // Quiet connections may stay while they hold an allocation (its lifetime bounds
                    // them); others are closed so idle sockets cannot pile up.
                    Err(_) => {
                        if shared.state.lock().core.allocation_of(&tuple).is_none() {
                            tracing::debug!(client = %tuple.client, "TURN stream idle: closed");
                            return;
                        }
                        deadline = Instant::now() + shared.stream_idle;
                    }
                }
            }
        })
    };
    *out.reader.lock() = Some(reader.abort_handle());
    let _ = reader.await;
    end_stream(&shared, tuple, &out, writer).await;
}

/// Forgets a TCP/TLS client whose reading ended: its allocation goes, the writer sends what is queued, then
/// shuts the connection down.
async fn end_stream(shared: &Arc<Shared>, tuple: FiveTuple, out: &StreamOut, writer: JoinHandle<()>) {
    let mut udp_out = UdpOut::new();
    {
        let mut st = shared.state.lock();
        st.streams.remove(&tuple);
        st.core.client_closed(Instant::now(), tuple);
        shared.pump(&mut st, &mut udp_out);
    }
    shared.send_udp(&mut udp_out);
    out.close();
    let _ = writer.await;
}

/// Serves one plain TCP client: the pump thread reads it (`rd`) and writes to it directly (`direct`); this task
/// writes what did not fit at once, and closes it when it ends or idles (no timer per read: it wakes when a
/// deadline passes and looks when the last message came).
async fn serve_tcp(
    shared: Arc<Shared>,
    sock: std::net::TcpStream,
    rd: std::net::TcpStream,
    direct: std::net::TcpStream,
    tuple: FiveTuple,
    accepted: Instant,
) {
    // SAFETY: the AsyncFd owns `sock`, an open TCP socket whose descriptor does not change while it lives.
    let Ok(wfd) = (unsafe { AsyncFd::register_with_interest(sock, tokio::io::Interest::WRITABLE) }) else {
        return;
    };
    let out = StreamOut::register(&shared, tuple, Some(direct));
    let to = WriteTo::<tokio::io::Sink>::Fd(wfd);
    let writer = tokio::spawn(write_loop(out.clone(), to, shared.stream_write_timeout));
    *out.writer.lock() = Some(writer.abort_handle());
    let link = Arc::new(StreamLink::default());
    shared.new_streams.lock().push(PumpStream {
        tuple,
        sock: rd,
        framer: StreamFramer::new(),
        accepted,
        link: link.clone(),
    });
    if shared.waker.wake().is_ok() {
        // Until the first complete message, then after each: bytes alone do not push it back. Quiet
        // connections may stay while they hold an allocation (its lifetime bounds them).
        let mut floor = accepted;
        loop {
            let last = link.last_frame.load(Ordering::Acquire);
            let due = match last {
                0 => accepted + shared.stream_first_message,
                ms => accepted + Duration::from_millis(ms - 1) + shared.stream_idle,
            };
            tokio::select! {
                _ = link.ended.notified() => break,
                _ = tokio::time::sleep_until(due.max(floor).into()) => {
                    if link.last_frame.load(Ordering::Acquire) != last {
                        continue;
                    }
                    if shared.state.lock().core.allocation_of(&tuple).is_some() {
                        floor = Instant::now() + shared.stream_idle;
                        continue;
                    }
                    tracing::debug!(client = %tuple.client, "TURN stream idle: closed");
                    // The pump sees the end of the stream and drops its side.
                    if let Some(sock) = &out.direct {
                        let _ = sock.shutdown(std::net::Shutdown::Read);
                    }
                    link.ended.notified().await;
                    break;
                }
            }
        }
    }
    end_stream(&shared, tuple, &out, writer).await;
}

/// Where a TCP/TLS client's writer task writes: the plain TCP socket (shared with the pump's direct writes) or
/// the write half of a TLS stream. An enum, not a trait: the spawned loop must stay `Send` for any stream type.
enum WriteTo<W> {
    Fd(AsyncFd<std::net::TcpStream>),
    Split { wr: W, per_record: bool },
}

impl<W: AsyncWrite + Unpin> WriteTo<W> {
    async fn write(&mut self, data: &[u8], timeout: Duration) -> io::Result<()> {
        match self {
            WriteTo::Fd(fd) => write_fd(fd, data, timeout).await,
            WriteTo::Split { wr, per_record } => write_frames(wr, data, *per_record, timeout).await,
        }
    }

    async fn shutdown(&mut self, timeout: Duration) {
        match self {
            WriteTo::Fd(fd) => {
                let _ = fd.get_ref().shutdown(std::net::Shutdown::Write);
            }
            WriteTo::Split { wr, .. } => {
                let _ = tokio::time::timeout(timeout, wr.shutdown()).await;
            }
        }
    }
}

/// The writer task of a TCP/TLS client: writes what [`StreamOut::push`] queued until the queue is empty, then
/// waits; once closed, shuts the connection down after the last bytes. A failed write kills the client.
async fn write_loop<W: AsyncWrite + Unpin>(out: Arc<StreamOut>, mut to: WriteTo<W>, timeout: Duration) {
    let mut spare = Vec::new();
    loop {
        out.notify.notified().await;
        loop {
            {
                let mut q = out.q.lock();
                std::mem::swap(&mut q.buf, &mut spare);
                q.writing = !spare.is_empty();
            }
            if spare.is_empty() {
                break;
            }
            if to.write(&spare, timeout).await.is_err() {
                out.kill();
                return;
            }
            spare.clear();
        }
        if out.closed.load(Ordering::Acquire) {
            to.shutdown(timeout).await;
            return;
        }
    }
}

/// Writes `data` to a non-blocking TCP socket in pieces, each within `timeout`.
async fn write_fd(fd: &AsyncFd<std::net::TcpStream>, data: &[u8], timeout: Duration) -> io::Result<()> {
    let mut rest = data;
    while !rest.is_empty() {
        let piece = &rest[..rest.len().min(WRITE_CHUNK)];
        let wrote = tokio::time::timeout(timeout, async {
            loop {
                let mut ready = fd.writable().await?;
                if let Ok(r) = ready.try_io(|s| s.get_ref().write(piece)) {
                    return r;
                }
            }
        })
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "TURN client does not read"))??;
        rest = &rest[wrote..];
    }
    Ok(())
}

/// Over TLS each TURN message goes in its own record: coturn's clients read one message per record and
/// lose the rest of a record that holds several. Over TCP, coalesced writes are fine and cheaper. Each
/// piece must be written within `timeout`.
async fn write_frames<W: AsyncWrite + Unpin>(
    wr: &mut W,
    data: &[u8],
    per_record: bool,
    timeout: Duration,
) -> io::Result<()> {
    let timed_out = || io::Error::new(io::ErrorKind::TimedOut, "TURN client does not read");
    let mut rest = data;
    while !rest.is_empty() {
        let n = if per_record {
            match stream_frame_len(rest) {
                Ok(Some(n)) => n,
                _ => break,
            }
        } else {
            rest.len().min(WRITE_CHUNK)
        };
        tokio::time::timeout(timeout, wr.write_all(&rest[..n])).await.map_err(|_| timed_out())??;
        rest = &rest[n..];
    }
    // TLS buffers records until flushed.
    tokio::time::timeout(timeout, wr.flush()).await.map_err(|_| timed_out())?
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The kernel refuses a GSO message on a socket without UDP checksums (SO_NO_CHECK: EINVAL), as it does one
    /// whose segments exceed the path MTU. A run of frames to one client must still reach it, one datagram each,
    /// in order, with the single frames of the same flush.
    #[test]
    fn a_refused_gso_run_goes_out_one_by_one() {
        let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        set_int_option(&sock, libc::SOL_SOCKET, libc::SO_NO_CHECK, 1).unwrap();
        let io = UdpIo::new(sock).unwrap();
        assert!(io.state.max_gso_segments() > 1, "no UDP GSO on this kernel: nothing to refuse");
        let rx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let rx2 = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        for r in [&rx, &rx2] {
            r.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        }
        let (to, to2) = (rx.local_addr().unwrap(), rx2.local_addr().unwrap());
        let mut out = Out::default();
        // A run of three equal frames and a shorter one ending it (one GSO message), then a frame to another
        // client and one more to the first (singles, one sendmmsg).
        for (dst, tag, len) in [(to, 1u8, 300), (to, 2, 300), (to, 3, 300), (to, 4, 100), (to2, 5, 200), (to, 6, 250)] {
            out.buf.extend(std::iter::repeat_n(tag, len));
            out.frames.push((dst, len));
        }
        out.flush(&io);
        // quinn-udp stops offering GSO once the kernel refuses it: the run was tried as GSO, and refused.
        assert_eq!(io.state.max_gso_segments(), 1, "the run did not meet a refused GSO send");

        let mut buf = [0u8; 2048];
        let mut got = Vec::new();
        for _ in 0..5 {
            let n = rx.recv(&mut buf).expect("a frame for the first client");
            assert!(buf[..n].iter().all(|&b| b == buf[0]), "a datagram mixed two frames");
            got.push((buf[0], n));
        }
        assert_eq!(got, [(1, 300), (2, 300), (3, 300), (4, 100), (6, 250)]);
        let n = rx2.recv(&mut buf).expect("the frame for the second client");
        assert_eq!((buf[0], n), (5, 200));
    }
}
