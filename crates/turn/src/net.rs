//! Thin tokio adapters (UDP, TCP, TLS) around [`TurnCore`].
//!
//! One mutex guards the core; the hot path holds it only for the core call (a few hash lookups), never
//! across a send. Relay sockets each get a task; the listening UDP socket gets one task; each stream
//! connection a reader and a writer task.

use std::collections::{HashMap, HashSet};
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use parking_lot::Mutex;
use rand::Rng;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, UdpSocket};
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
        let (udp, tcp) = bind_pair(cfg.listen)?;
        let udp_addr = udp.local_addr().map_err(|e| TurnError::Io("reading the UDP address", e))?;
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
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                core,
                relays: HashMap::new(),
                used_ports: HashSet::new(),
                reserved: HashMap::new(),
                streams: HashMap::new(),
            }),
            streams_open: AtomicUsize::new(0),
            streams_per_ip: Mutex::new(HashMap::new()),
            max_streams: cfg.max_streams,
            max_streams_per_ip: cfg.max_streams_per_ip,
            stream_idle: cfg.stream_idle,
            stream_first_message: cfg.stream_first_message,
            stream_queue: cfg.stream_queue,
            stream_write_timeout: cfg.stream_write_timeout,
            udp: Arc::new(udp),
            udp_addr,
            tls: parking_lot::RwLock::new(tls.as_ref().map(|(_, sc)| sc.clone())),
            relay_ip,
            ports: cfg.relay_ports,
        });
        let mut tasks = vec![
            tokio::spawn(udp_loop(shared.clone())),
            tokio::spawn(tcp_accept(shared.clone(), tcp)),
            tokio::spawn(timer_loop(shared.clone())),
        ];
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
        Ok(TurnHandle { addr: udp_addr, tls_addr, minter, shared, tasks })
    }
}

/// A running server. Dropping it stops the server too (without waiting).
pub struct TurnHandle {
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
    }
    fn abort_all(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
        let mut st = self.shared.state.lock();
        for (_, r) in st.relays.drain() {
            r.task.abort();
        }
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
    }
}

struct Relay {
    sock: Arc<UdpSocket>,
    task: AbortHandle,
    port: u16,
}

/// Outbound bytes of one TCP/TLS client; relay tasks append, the writer task drains.
struct StreamOut {
    buf: Mutex<Vec<u8>>,
    /// Most bytes `buf` may hold.
    limit: usize,
    notify: Notify,
    closed: AtomicBool,
    reader: Mutex<Option<AbortHandle>>,
    writer: Mutex<Option<AbortHandle>>,
}

impl StreamOut {
    /// Queues `data`. Past the limit, relayed data (`droppable`) is dropped as UDP would lose it; an answer
    /// that does not fit means the client is not reading them: it is disconnected.
    fn push(&self, data: &[u8], droppable: bool) {
        {
            let mut b = self.buf.lock();
            if b.len() + data.len() > self.limit {
                drop(b);
                if !droppable {
                    tracing::debug!(limit = self.limit, "TURN stream client does not read its answers: closed");
                    self.kill();
                }
                return;
            }
            b.extend_from_slice(data);
        }
        self.notify.notify_one();
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
    }
}

struct State {
    core: TurnCore,
    relays: HashMap<AllocId, Relay>,
    used_ports: HashSet<u16>,
    /// Ports held for RESERVATION-TOKENs.
    reserved: HashMap<u16, std::net::UdpSocket>,
    streams: HashMap<FiveTuple, Arc<StreamOut>>,
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
    udp: Arc<UdpSocket>,
    udp_addr: SocketAddr,
    /// The TLS configuration for new TURNS connections; [`TurnHandle::set_tls`] swaps it.
    tls: parking_lot::RwLock<Option<Arc<rustls::ServerConfig>>>,
    relay_ip: IpAddr,
    ports: PortRange,
}

impl Shared {
    /// Feeds one frame from a client to the core. Relayed data (the hot path) goes straight out of its relay
    /// socket, outside the lock; anything else queues its outputs (UDP ones into `udp_out`).
    async fn client_frame(self: &Arc<Self>, tuple: FiveTuple, frame: &[u8], udp_out: &mut Vec<(Vec<u8>, SocketAddr)>) {
        let send = {
            let mut st = self.state.lock();
            let st = &mut *st;
            match st.core.handle_client(Instant::now(), tuple, frame) {
                Some(p) => st.relays.get(&p.alloc).map(|r| (r.sock.clone(), p.peer, p.data)),
                None => {
                    self.pump(st, udp_out);
                    None
                }
            }
        };
        if let Some((sock, peer, data)) = send {
            let _ = sock.send_to(data, peer).await;
        }
    }

    /// Executes the core's queued outputs. UDP datagrams are collected into `udp_out` to be sent once
    /// the lock is released.
    fn pump(self: &Arc<Self>, st: &mut State, udp_out: &mut Vec<(Vec<u8>, SocketAddr)>) {
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
                    if let Some(r) = st.relays.remove(&alloc) {
                        r.task.abort();
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
            if dont_fragment {
                if let Err(e) = set_dont_fragment(&std_sock) {
                    tracing::warn!(error = %e, "cannot set DF on a relay socket");
                }
            }
            let sock = match std_sock.set_nonblocking(true).and_then(|_| UdpSocket::from_std(std_sock)) {
                Ok(s) => Arc::new(s),
                Err(e) => {
                    tracing::warn!(error = %e, "relay socket setup failed");
                    return None;
                }
            };
            let bound = sock.local_addr().ok()?;
            let task = tokio::spawn(relay_loop(self.clone(), alloc, sock.clone())).abort_handle();
            st.used_ports.insert(port);
            st.relays.insert(alloc, Relay { sock, task, port });
            Some(bound)
        }
    }

    async fn send_udp(&self, out: Vec<(Vec<u8>, SocketAddr)>) {
        for (data, to) in out {
            let _ = self.udp.send_to(&data, to).await;
        }
    }
}

/// UDP and TCP on the same port. With port 0, retries until a port free for both is found.
fn bind_pair(addr: SocketAddr) -> Result<(UdpSocket, TcpListener), TurnError> {
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
        udp.set_nonblocking(true).map_err(|e| bind_err("UDP", e))?;
        let udp = UdpSocket::from_std(udp).map_err(|e| bind_err("UDP", e))?;
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

/// DONT-FRAGMENT (RFC 8656 §7.2): every datagram from this relay socket leaves with DF set; one larger
/// than the path MTU fails to send instead of being fragmented.
fn set_dont_fragment(sock: &std::net::UdpSocket) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let v6 = sock.local_addr()?.is_ipv6();
    let (level, name, value) = if v6 {
        (libc::IPPROTO_IPV6, libc::IPV6_DONTFRAG, 1)
    } else {
        (libc::IPPROTO_IP, libc::IP_MTU_DISCOVER, libc::IP_PMTUDISC_DO)
    };
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

async fn udp_loop(shared: Arc<Shared>) {
    let mut buf = vec![0u8; MAX_UDP];
    let mut udp_out = Vec::new();
    loop {
        let (n, from) = match shared.udp.recv_from(&mut buf).await {
            Ok(x) => x,
            Err(e) if transient(&e) => continue,
            Err(e) => {
                tracing::error!(error = %e, "TURN UDP socket failed");
                return;
            }
        };
        let tuple = FiveTuple { transport: Transport::Udp, client: from, server: shared.udp_addr };
        shared.client_frame(tuple, &buf[..n], &mut udp_out).await;
        if !udp_out.is_empty() {
            shared.send_udp(std::mem::take(&mut udp_out)).await;
        }
    }
}

async fn relay_loop(shared: Arc<Shared>, alloc: AllocId, sock: Arc<UdpSocket>) {
    let mut buf = vec![0u8; PEER_HEADROOM + MAX_UDP + PEER_TAILROOM];
    loop {
        let (n, from) = match sock.recv_from(&mut buf[PEER_HEADROOM..PEER_HEADROOM + MAX_UDP]).await {
            Ok(x) => x,
            Err(e) if transient(&e) => continue,
            Err(e) => {
                tracing::warn!(error = %e, alloc = alloc.0, "relay socket failed");
                return;
            }
        };
        let to = {
            let mut st = shared.state.lock();
            let st = &mut *st;
            match st.core.handle_peer(Instant::now(), alloc, from, &mut buf, PEER_HEADROOM, n) {
                Some((tuple, range)) if tuple.transport == Transport::Udp => Some((tuple.client, range)),
                Some((tuple, range)) => {
                    if let Some(s) = st.streams.get(&tuple) {
                        s.push(&buf[range], true);
                    }
                    None
                }
                None => None,
            }
        };
        if let Some((client, range)) = to {
            let _ = shared.udp.send_to(&buf[range], client).await;
        }
    }
}

async fn timer_loop(shared: Arc<Shared>) {
    let mut udp_out = Vec::new();
    loop {
        let next = shared.state.lock().core.poll_timeout();
        let cap = Instant::now() + Duration::from_secs(1);
        tokio::time::sleep_until(next.min(cap).into()).await;
        {
            let mut st = shared.state.lock();
            st.core.handle_timeout(Instant::now());
            shared.pump(&mut st, &mut udp_out);
        }
        if !udp_out.is_empty() {
            shared.send_udp(std::mem::take(&mut udp_out)).await;
        }
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
                tokio::spawn(async move {
                    serve_stream(shared, s, tuple, accepted).await;
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
                            serve_stream(shared, tls, tuple, accepted).await
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
async fn serve_stream<S>(shared: Arc<Shared>, stream: S, tuple: FiveTuple, accepted: Instant)
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let (mut rd, mut wr) = tokio::io::split(stream);
    let per_record = tuple.transport == Transport::Tls;
    let out = Arc::new(StreamOut {
        buf: Mutex::new(Vec::new()),
        limit: shared.stream_queue,
        notify: Notify::new(),
        closed: AtomicBool::new(false),
        reader: Mutex::new(None),
        writer: Mutex::new(None),
    });
    shared.state.lock().streams.insert(tuple, out.clone());
    let writer = {
        let out = out.clone();
        let timeout = shared.stream_write_timeout;
        tokio::spawn(async move {
            let mut spare = Vec::new();
            loop {
                out.notify.notified().await;
                loop {
                    std::mem::swap(&mut *out.buf.lock(), &mut spare);
                    if spare.is_empty() {
                        break;
                    }
                    if write_frames(&mut wr, &spare, per_record, timeout).await.is_err() {
                        out.kill();
                        return;
                    }
                    spare.clear();
                }
                if out.closed.load(Ordering::Acquire) {
                    let _ = tokio::time::timeout(timeout, wr.shutdown()).await;
                    return;
                }
            }
        })
    };
    *out.writer.lock() = Some(writer.abort_handle());
    let reader = {
        let shared = shared.clone();
        tokio::spawn(async move {
            let mut framer = StreamFramer::new();
            let mut udp_out = Vec::new();
            // Until the first complete message, then after each: bytes alone do not push it back.
            let mut deadline = accepted + shared.stream_first_message;
            loop {
                loop {
                    match framer.next_frame() {
                        Ok(Some(frame)) => {
                            shared.client_frame(tuple, frame, &mut udp_out).await;
                            deadline = Instant::now() + shared.stream_idle;
                        }
                        Ok(None) => break,
                        Err(_) => return,
                    }
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
    let mut udp_out = Vec::new();
    {
        let mut st = shared.state.lock();
        st.streams.remove(&tuple);
        st.core.client_closed(Instant::now(), tuple);
        shared.pump(&mut st, &mut udp_out);
    }
    out.close();
    let _ = writer.await;
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
