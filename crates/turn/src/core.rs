//! The TURN server as a state machine without I/O.
//!
//! Inputs: what a client sent ([`TurnCore::handle_client`]), what a peer sent to a relay address
//! ([`TurnCore::handle_peer`]), the result of opening a relay socket ([`TurnCore::relay_opened`]), a
//! closed client stream ([`TurnCore::client_closed`]) and the time ([`TurnCore::handle_timeout`]).
//! Outputs: relayed payloads (returned directly, borrowing the caller's buffer: the hot path neither
//! allocates nor queues) and control-plane [`Output`]s from [`TurnCore::poll_output`].
//! Time is always passed in, so tests run on simulated time.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use hmac::{Hmac, Mac};
use ipnet::IpNet;
use rand::{Rng, RngCore, SeedableRng};
use sha1::Sha1;

use crate::auth;
use crate::config::PortRange;
use crate::defaults;
use crate::stun::{self, Builder, Msg};

/// How the client reached us.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Transport {
    Udp,
    Tcp,
    Tls,
}

/// Identifies a client's connection to the server (RFC 8656's 5-tuple).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FiveTuple {
    pub transport: Transport,
    pub client: SocketAddr,
    pub server: SocketAddr,
}

/// One allocation; also the token of its relay socket. Never reused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AllocId(pub u64);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

/// Control-plane work for the I/O layer.
#[derive(Debug, PartialEq, Eq)]
pub enum Output {
    /// Send `data` to the client on `tuple`.
    Transmit { tuple: FiveTuple, data: Vec<u8> },
    /// Bind a UDP relay socket of `family` as `port` says, then call [`TurnCore::relay_opened`]. With
    /// `dont_fragment` (the Allocate carried DONT-FRAGMENT), the socket sends with the DF bit set.
    OpenRelay { alloc: AllocId, family: Family, port: RelayPort, dont_fragment: bool },
    /// The allocation is gone: close its relay socket (unknown ids are to be ignored).
    CloseRelay { alloc: AllocId },
    /// A port held by [`RelayPort::Even`] `reserve_next` was not claimed in time: close it.
    ReleaseReserved { port: u16 },
}

/// Which relay port to bind (EVEN-PORT and RESERVATION-TOKEN, RFC 8656 §7.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RelayPort {
    /// Any free port of the range.
    Any,
    /// An even port; with `reserve_next`, the port above it is bound too and held for a later
    /// Allocate with the RESERVATION-TOKEN of this one (or released by [`Output::ReleaseReserved`]).
    Even { reserve_next: bool },
    /// The port held earlier for a reservation.
    Reserved(u16),
}

/// A payload to send from the relay socket of `alloc` to `peer`.
#[derive(Debug, PartialEq, Eq)]
pub struct PeerSend<'a> {
    pub alloc: AllocId,
    pub peer: SocketAddr,
    pub data: &'a [u8],
}

/// Bytes [`TurnCore::handle_peer`] needs in front of the payload (Data indication header with an IPv6
/// XOR-PEER-ADDRESS) and behind it (padding).
pub const PEER_HEADROOM: usize = 48;
pub const PEER_TAILROOM: usize = 4;

#[derive(Debug, Clone)]
pub struct CoreConfig {
    pub realm: String,
    /// The TURN REST shared secret.
    pub secret: Vec<u8>,
    pub default_lifetime: Duration,
    pub max_lifetime: Duration,
    pub permission_lifetime: Duration,
    pub channel_lifetime: Duration,
    /// How long a NONCE stays valid before 438 (Stale Nonce).
    pub nonce_lifetime: Duration,
    /// Allocations per user (the peer id part of the TURN REST username).
    pub user_quota: usize,
    /// Allocations on the whole server.
    pub total_quota: usize,
    /// Allocations per client IP address (IPv4-mapped IPv6 counts as the IPv4 address): one host cannot
    /// take the whole server with many users' credentials.
    pub ip_quota: usize,
    /// Permissions (peer IPs) per allocation; channels per allocation have the same cap.
    pub max_permissions: usize,
    /// Peer ranges allowed even though they are loopback/private/link-local/multicast.
    pub allow_peers: Vec<IpNet>,
    /// Advertised in XOR-RELAYED-ADDRESS instead of the bound IP (same family only).
    pub external_ip: Option<IpAddr>,
    pub relay_v4: bool,
    pub relay_v6: bool,
    pub software: Option<String>,
    /// The server's own IPs besides `external_ip` (specific listen addresses): peers there are reachable only
    /// on `relay_ports` (relay to relay between two clients), unless `allow_peers` names the IP.
    pub own_ips: Vec<IpAddr>,
    /// The relay port range (for relay candidates' sake; on the server's own IPs only the ports of live
    /// allocations are peers).
    pub relay_ports: PortRange,
    /// The server's STUN/TURN/TURNS ports: never a peer on an own or loopback IP.
    pub turn_ports: Vec<u16>,
    /// Seeds the nonce key and transaction ids (tests pass a constant; servers a random value).
    pub seed: u64,
}

impl Default for CoreConfig {
    fn default() -> Self {
        CoreConfig {
            realm: defaults::REALM.into(),
            secret: Vec::new(),
            default_lifetime: defaults::ALLOCATION_LIFETIME,
            max_lifetime: defaults::MAX_LIFETIME,
            permission_lifetime: defaults::PERMISSION_LIFETIME,
            channel_lifetime: defaults::CHANNEL_LIFETIME,
            nonce_lifetime: defaults::NONCE_LIFETIME,
            user_quota: defaults::USER_QUOTA,
            total_quota: defaults::TOTAL_QUOTA,
            ip_quota: defaults::IP_QUOTA,
            max_permissions: defaults::MAX_PERMISSIONS,
            allow_peers: Vec::new(),
            external_ip: None,
            relay_v4: true,
            relay_v6: true,
            software: Some(concat!("webcall ", env!("CARGO_PKG_VERSION")).into()),
            own_ips: Vec::new(),
            relay_ports: defaults::RELAY_PORTS,
            turn_ports: Vec::new(),
            seed: 0,
        }
    }
}

/// Counters for health and metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CoreStats {
    pub allocations: usize,
    pub to_peer_packets: u64,
    pub to_peer_bytes: u64,
    pub to_client_packets: u64,
    pub to_client_bytes: u64,
}

/// After a channel binding expires, neither its number nor its peer may be rebound differently for this
/// long (RFC 8656 §12).
const CHANNEL_COOLDOWN: Duration = Duration::from_secs(300);
const SWEEP_EVERY: Duration = Duration::from_secs(30);
/// Channel numbers as RFC 5766 allowed them and deployed clients (coturn's among them) pick them; RFC 8656
/// narrowed new bindings to 0x4000-0x4FFF, which a server gains nothing by enforcing.
const CHANNEL_NUMBERS: std::ops::RangeInclusive<u16> = 0x4000..=0x7FFF;

struct Channel {
    number: u16,
    peer: SocketAddr,
    expires: Instant,
}

struct Allocation {
    tuple: FiveTuple,
    username: Box<str>,
    user: Arc<str>,
    key: Key,
    family: Family,
    /// Advertised relayed address; `None` while the relay socket is being opened.
    relayed: Option<SocketAddr>,
    expires: Instant,
    perms: Vec<(IpAddr, Instant)>,
    channels: Vec<Channel>,
    /// Transaction id of the Allocate that made it, and the answer (re-sent on retransmission).
    alloc_txid: [u8; 12],
    alloc_response: Vec<u8>,
    alloc_fingerprint: bool,
    lifetime: Duration,
    reserve_next: bool,
}

/// A port held for a RESERVATION-TOKEN.
struct Reservation {
    port: u16,
    family: Family,
    expires: Instant,
}

/// How long a reserved port waits for its Allocate (RFC 8656 §7.2 suggests 30 s).
const RESERVATION_LIFETIME: Duration = Duration::from_secs(30);

impl Allocation {
    fn permitted(&self, ip: IpAddr, now: Instant) -> bool {
        self.perms.iter().any(|(p, exp)| *p == ip && *exp > now)
    }
}

struct Authed {
    username: Box<str>,
    user: Arc<str>,
    key: Key,
}

/// A long-term credential key (MD5 or SHA-256 of `username:realm:password`, RFC 8489 §9.2.2) and which
/// integrity attribute the client signed with; answers are signed the same way.
#[derive(Clone, Copy)]
struct Key {
    bytes: [u8; 32],
    len: u8,
    sha256: bool,
}

impl Key {
    fn as_bytes(&self) -> &[u8] {
        &self.bytes[..self.len as usize]
    }
}

/// The PASSWORD-ALGORITHMS this server offers, in order of preference: SHA-256 (2), then MD5 (1), neither
/// with parameters (RFC 8489 §14.11).
const PASSWORD_ALGORITHMS: [u8; 8] = [0, 2, 0, 0, 0, 1, 0, 0];
/// The RFC 8489 nonce cookie with the "password algorithms" security feature bit (§9.2): tells clients
/// that PASSWORD-ALGORITHMS is offered, so a downgrade is detectable.
const NONCE_COOKIE: &str = "obMatJos2gAAA";

/// The sans-IO TURN server.
pub struct TurnCore {
    cfg: CoreConfig,
    start: Instant,
    start_unix: u64,
    nonce_key: [u8; 20],
    txid_state: u64,
    next_id: u64,
    allocs: HashMap<AllocId, Allocation>,
    by_tuple: HashMap<FiveTuple, AllocId>,
    expiries: BTreeSet<(Instant, AllocId)>,
    per_user: HashMap<Arc<str>, usize>,
    per_ip: HashMap<IpAddr, usize>,
    reservations: HashMap<[u8; 8], Reservation>,
    /// Ports of open relay sockets (with how many: an IPv4 and an IPv6 relay may share one): on the server's
    /// own IPs, the only peers.
    live_relay_ports: HashMap<u16, u32>,
    rng: rand::rngs::StdRng,
    out: VecDeque<Output>,
    next_sweep: Instant,
    stats: CoreStats,
}

/// Why a request failed: (code, reason).
type Fail = (u16, &'static str);

impl TurnCore {
    /// `now` and `unix_now` are the same moment on the monotonic and the wall clock; credentials carry
    /// wall-clock expiry times, everything else runs on `Instant`s.
    pub fn new(cfg: CoreConfig, now: Instant, unix_now: SystemTime) -> Self {
        let mut rng = rand::rngs::StdRng::seed_from_u64(cfg.seed);
        let mut nonce_key = [0u8; 20];
        rng.fill_bytes(&mut nonce_key);
        TurnCore {
            start: now,
            start_unix: unix_now.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs(),
            nonce_key,
            txid_state: rng.random::<u64>() | 1,
            next_id: 1,
            allocs: HashMap::new(),
            by_tuple: HashMap::new(),
            expiries: BTreeSet::new(),
            per_user: HashMap::new(),
            per_ip: HashMap::new(),
            reservations: HashMap::new(),
            live_relay_ports: HashMap::new(),
            rng,
            out: VecDeque::new(),
            next_sweep: now + SWEEP_EVERY,
            stats: CoreStats::default(),
            cfg,
        }
    }

    pub fn config(&self) -> &CoreConfig {
        &self.cfg
    }

    pub fn stats(&self) -> CoreStats {
        CoreStats { allocations: self.allocs.len(), ..self.stats }
    }

    pub fn poll_output(&mut self) -> Option<Output> {
        self.out.pop_front()
    }

    /// When [`TurnCore::handle_timeout`] should be called next.
    pub fn poll_timeout(&self) -> Instant {
        match self.expiries.first() {
            Some((t, _)) => (*t).min(self.next_sweep),
            None => self.next_sweep,
        }
    }

    /// The relayed (advertised) address of an allocation, once open.
    pub fn relayed_addr(&self, alloc: AllocId) -> Option<SocketAddr> {
        self.allocs.get(&alloc).and_then(|a| a.relayed)
    }

    pub fn allocation_of(&self, tuple: &FiveTuple) -> Option<AllocId> {
        self.by_tuple.get(tuple).copied()
    }

    /// A datagram (UDP) or one frame (TCP/TLS, see [`stream_frame_len`]) from a client. Returns what to
    /// relay to a peer; anything else (responses) is queued for [`TurnCore::poll_output`].
    pub fn handle_client<'a>(&mut self, now: Instant, tuple: FiveTuple, data: &'a [u8]) -> Option<PeerSend<'a>> {
        match data.first()? >> 6 {
            0b01 => self.channel_data(now, tuple, data),
            0b00 => {
                let msg = Msg::parse(data).ok()?;
                if !msg.fingerprint_ok() {
                    return None;
                }
                match msg.class() {
                    stun::REQUEST => {
                        self.request(now, tuple, &msg);
                        None
                    }
                    stun::INDICATION if msg.method() == stun::SEND => self.send_indication(now, tuple, msg),
                    _ => None,
                }
            }
            _ => None,
        }
    }

    fn channel_data<'a>(&mut self, now: Instant, tuple: FiveTuple, data: &'a [u8]) -> Option<PeerSend<'a>> {
        if data.len() < 4 {
            return None;
        }
        let number = u16::from_be_bytes([data[0], data[1]]);
        let len = u16::from_be_bytes([data[2], data[3]]) as usize;
        let payload = data.get(4..4 + len)?;
        let id = *self.by_tuple.get(&tuple)?;
        let a = self.allocs.get(&id)?;
        let ch = a.channels.iter().find(|c| c.number == number && c.expires > now)?;
        if !a.permitted(ch.peer.ip(), now) {
            return None;
        }
        let peer = ch.peer;
        self.stats.to_peer_packets += 1;
        self.stats.to_peer_bytes += len as u64;
        Some(PeerSend { alloc: id, peer, data: payload })
    }

    fn send_indication<'a>(&mut self, now: Instant, tuple: FiveTuple, msg: Msg<'a>) -> Option<PeerSend<'a>> {
        let id = *self.by_tuple.get(&tuple)?;
        let a = self.allocs.get(&id)?;
        let (mut peer, mut data) = (None, None);
        for (t, v, _) in msg.attrs() {
            match t {
                stun::XOR_PEER_ADDRESS if peer.is_none() => peer = stun::decode_xor_addr(v, msg.txid()),
                stun::DATA_ATTR if data.is_none() => data = Some(v),
                // Unknown comprehension-required attributes: discard the indication (RFC 8489 §6.3.2).
                t if t < 0x8000 && !is_known(t) => return None,
                _ => {}
            }
        }
        let peer = canonical(peer?);
        let data = data?;
        if a.relayed.is_none() || !a.permitted(peer.ip(), now) || !self.port_allowed(peer) {
            return None;
        }
        self.stats.to_peer_packets += 1;
        self.stats.to_peer_bytes += data.len() as u64;
        Some(PeerSend { alloc: id, peer, data })
    }

    /// A datagram that arrived on the relay socket of `alloc` from `from`. The payload is
    /// `buf[start..start + len]`; `start >= PEER_HEADROOM` and `buf.len() >= start + len + PEER_TAILROOM`
    /// are required. Frames it in place (ChannelData or Data indication) and returns where to send it and
    /// which bytes of `buf`; `None` drops it (no permission, unknown allocation).
    pub fn handle_peer(
        &mut self,
        now: Instant,
        alloc: AllocId,
        from: SocketAddr,
        buf: &mut [u8],
        start: usize,
        len: usize,
    ) -> Option<(FiveTuple, Range<usize>)> {
        debug_assert!(start >= PEER_HEADROOM && buf.len() >= start + len + PEER_TAILROOM);
        if len > u16::MAX as usize - 64 {
            return None;
        }
        let from = canonical(from);
        let a = self.allocs.get(&alloc)?;
        if a.relayed.is_none() || !a.permitted(from.ip(), now) || !self.port_allowed(from) {
            return None;
        }
        let tuple = a.tuple;
        let range = if let Some(ch) = a.channels.iter().find(|c| c.peer == from && c.expires > now) {
            let s = start - 4;
            buf[s..s + 2].copy_from_slice(&ch.number.to_be_bytes());
            buf[s + 2..s + 4].copy_from_slice(&(len as u16).to_be_bytes());
            // Over streams ChannelData is padded to 4 bytes (RFC 8656 §12.5); over UDP it need not be.
            let end = if tuple.transport == Transport::Udp {
                start + len
            } else {
                let e = start + stun::pad4(len);
                buf[start + len..e].fill(0);
                e
            };
            s..end
        } else {
            let alen = if from.is_ipv4() { 8 } else { 20 };
            let s = start - (stun::HEADER_LEN + 4 + alen + 4);
            let padded = stun::pad4(len);
            let body = 4 + alen + 4 + padded;
            let txid = self.next_txid();
            let h = &mut buf[s..start];
            h[0..2].copy_from_slice(&stun::msg_type(stun::DATA, stun::INDICATION).to_be_bytes());
            h[2..4].copy_from_slice(&(body as u16).to_be_bytes());
            h[4..8].copy_from_slice(&stun::MAGIC.to_be_bytes());
            h[8..20].copy_from_slice(&txid);
            h[20..22].copy_from_slice(&stun::XOR_PEER_ADDRESS.to_be_bytes());
            h[22..24].copy_from_slice(&(alen as u16).to_be_bytes());
            stun::encode_xor_addr(&mut h[24..24 + alen], from, &txid);
            let d = 24 + alen;
            h[d..d + 2].copy_from_slice(&stun::DATA_ATTR.to_be_bytes());
            h[d + 2..d + 4].copy_from_slice(&(len as u16).to_be_bytes());
            buf[start + len..start + padded].fill(0);
            s..start + padded
        };
        self.stats.to_client_packets += 1;
        self.stats.to_client_bytes += len as u64;
        Some((tuple, range))
    }

    /// The relay socket for `alloc` is bound at `bound` (or could not be: `None`).
    pub fn relay_opened(&mut self, now: Instant, alloc: AllocId, bound: Option<SocketAddr>) {
        let Some(a) = self.allocs.get_mut(&alloc) else {
            self.out.push_back(Output::CloseRelay { alloc });
            return;
        };
        let tuple = a.tuple;
        let Some(bound) = bound else {
            let mut b = Builder::new(stun::msg_type(stun::ALLOCATE, stun::ERROR), &a.alloc_txid);
            b.error(508, "Insufficient Capacity: no relay port free");
            let data = finish(&mut b, &self.cfg, Some(&a.key), a.alloc_fingerprint);
            self.out.push_back(Output::Transmit { tuple, data });
            self.remove(alloc);
            return;
        };
        let relayed = match self.cfg.external_ip {
            Some(ip) if ip.is_ipv4() == bound.is_ipv4() => SocketAddr::new(ip, bound.port()),
            _ => bound,
        };
        a.relayed = Some(relayed);
        *self.live_relay_ports.entry(relayed.port()).or_insert(0) += 1;
        let mut b = Builder::new(stun::msg_type(stun::ALLOCATE, stun::SUCCESS), &a.alloc_txid);
        b.xor_addr(stun::XOR_RELAYED_ADDRESS, relayed)
            .u32(stun::LIFETIME, a.lifetime.as_secs() as u32)
            .xor_addr(stun::XOR_MAPPED_ADDRESS, tuple.client);
        if a.reserve_next {
            let mut token = [0u8; 8];
            self.rng.fill_bytes(&mut token);
            let r = Reservation { port: bound.port() + 1, family: a.family, expires: now + RESERVATION_LIFETIME };
            self.reservations.insert(token, r);
            b.attr(stun::RESERVATION_TOKEN, &token);
        }
        let data = finish(&mut b, &self.cfg, Some(&a.key), a.alloc_fingerprint);
        a.alloc_response = data.clone();
        self.out.push_back(Output::Transmit { tuple, data });
    }

    /// A TCP/TLS client connection closed: its allocation goes with it (RFC 8656 §3.1).
    pub fn client_closed(&mut self, _now: Instant, tuple: FiveTuple) {
        if let Some(id) = self.by_tuple.get(&tuple).copied() {
            self.remove(id);
        }
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        while let Some(&(t, id)) = self.expiries.first() {
            if t > now {
                break;
            }
            tracing::debug!(alloc = id.0, "allocation expired");
            self.remove(id);
        }
        if now >= self.next_sweep {
            for a in self.allocs.values_mut() {
                a.perms.retain(|(_, exp)| *exp > now);
                a.channels.retain(|c| c.expires + CHANNEL_COOLDOWN > now);
            }
            let out = &mut self.out;
            self.reservations.retain(|_, r| {
                let keep = r.expires > now;
                if !keep {
                    out.push_back(Output::ReleaseReserved { port: r.port });
                }
                keep
            });
            self.next_sweep = now + SWEEP_EVERY;
        }
    }

    fn remove(&mut self, id: AllocId) {
        if let Some(a) = self.allocs.remove(&id) {
            self.by_tuple.remove(&a.tuple);
            self.expiries.remove(&(a.expires, id));
            if let Some(n) = self.per_user.get_mut(&a.user) {
                *n -= 1;
                if *n == 0 {
                    self.per_user.remove(&a.user);
                }
            }
            if let Some(port) = a.relayed.map(|r| r.port()) {
                if let Some(n) = self.live_relay_ports.get_mut(&port) {
                    *n -= 1;
                    if *n == 0 {
                        self.live_relay_ports.remove(&port);
                    }
                }
            }
            let ip = a.tuple.client.ip().to_canonical();
            if let Some(n) = self.per_ip.get_mut(&ip) {
                *n -= 1;
                if *n == 0 {
                    self.per_ip.remove(&ip);
                }
            }
            self.out.push_back(Output::CloseRelay { alloc: id });
        }
    }

    /// Panics if the core's tables disagree with each other or exceed their caps. For tests and fuzzing:
    /// it walks every allocation.
    #[doc(hidden)]
    pub fn check_invariants(&self) {
        assert_eq!(self.allocs.len(), self.by_tuple.len(), "by_tuple size");
        assert_eq!(self.allocs.len(), self.expiries.len(), "expiries size");
        assert!(self.allocs.len() <= self.cfg.total_quota, "total quota");
        let mut users: HashMap<&Arc<str>, usize> = HashMap::new();
        let mut ips: HashMap<IpAddr, usize> = HashMap::new();
        for (id, a) in &self.allocs {
            assert_eq!(self.by_tuple.get(&a.tuple), Some(id), "by_tuple entry");
            assert!(self.expiries.contains(&(a.expires, *id)), "expiry entry");
            assert!(id.0 < self.next_id, "ids are never reused");
            *users.entry(&a.user).or_default() += 1;
            *ips.entry(a.tuple.client.ip().to_canonical()).or_default() += 1;
            // The Allocate answer is stored exactly when the relay socket is open.
            assert_eq!(a.relayed.is_some(), !a.alloc_response.is_empty(), "relay state");
            let v4 = a.family == Family::V4;
            let max = self.cfg.max_permissions;
            // ChannelBind installs permissions outside the CreatePermission cap: at most one per channel.
            assert!(a.perms.len() <= 2 * max, "permission cap");
            assert!(a.channels.len() <= max, "channel cap");
            for (i, (ip, _)) in a.perms.iter().enumerate() {
                assert_eq!(ip.is_ipv4(), v4, "permission family");
                assert!(!a.perms[..i].iter().any(|(p, _)| p == ip), "duplicate permission");
            }
            for (i, c) in a.channels.iter().enumerate() {
                assert!(CHANNEL_NUMBERS.contains(&c.number), "channel number range");
                assert_eq!(c.peer.is_ipv4(), v4, "channel family");
                for d in &a.channels[..i] {
                    assert!(d.number != c.number, "channel number bound twice");
                    assert!(d.peer != c.peer, "peer bound to two channels");
                }
            }
        }
        assert_eq!(users.len(), self.per_user.len(), "per_user keys");
        for (u, n) in &self.per_user {
            assert_eq!(users.get(u), Some(n), "per_user count of {u}");
            assert!(*n <= self.cfg.user_quota, "user quota");
        }
        assert_eq!(ips, self.per_ip, "per_ip counts");
        let mut live: HashMap<u16, u32> = HashMap::new();
        for a in self.allocs.values() {
            if let Some(r) = a.relayed {
                *live.entry(r.port()).or_default() += 1;
            }
        }
        assert_eq!(live, self.live_relay_ports, "live relay ports");
        assert!(self.per_ip.values().all(|n| *n <= self.cfg.ip_quota), "ip quota");
    }

    fn next_txid(&mut self) -> [u8; 12] {
        // xorshift64*: indications need unpredictable-enough, not secret, ids; no syscall per packet.
        let mut x = self.txid_state;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.txid_state = x;
        let a = x.wrapping_mul(0x2545_F491_4F6C_DD1D);
        let mut t = [0u8; 12];
        t[..8].copy_from_slice(&a.to_le_bytes());
        t[8..].copy_from_slice(&((a >> 17) as u32).to_le_bytes());
        t
    }

    fn now_secs(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.start).as_secs()
    }

    fn nonce(&self, now: Instant, ip: IpAddr) -> String {
        let issued = self.now_secs(now);
        format!("{NONCE_COOKIE}{issued:016x}{:016x}", self.nonce_mac(issued, ip))
    }

    fn nonce_mac(&self, issued: u64, ip: IpAddr) -> u64 {
        let mut mac = <Hmac<Sha1> as Mac>::new_from_slice(&self.nonce_key).expect("any key");
        mac.update(&issued.to_be_bytes());
        match ip {
            IpAddr::V4(v) => mac.update(&v.octets()),
            IpAddr::V6(v) => mac.update(&v.octets()),
        }
        u64::from_be_bytes(mac.finalize().into_bytes()[..8].try_into().expect("20 bytes"))
    }

    fn nonce_valid(&self, now: Instant, ip: IpAddr, nonce: &[u8]) -> bool {
        let Some(s) = std::str::from_utf8(nonce).ok().and_then(|s| s.strip_prefix(NONCE_COOKIE)) else {
            return false;
        };
        if s.len() != 32 {
            return false;
        }
        let (Ok(issued), Ok(mac)) = (u64::from_str_radix(&s[..16], 16), u64::from_str_radix(&s[16..], 16)) else {
            return false;
        };
        mac == self.nonce_mac(issued, ip)
            && self.now_secs(now).saturating_sub(issued) < self.cfg.nonce_lifetime.as_secs()
    }

    fn request(&mut self, now: Instant, tuple: FiveTuple, msg: &Msg<'_>) {
        let method = msg.method();
        let fp = msg.attrs().any(|(t, _, _)| t == stun::FINGERPRINT);
        if method == stun::BINDING {
            let mut b = Builder::new(stun::msg_type(stun::BINDING, stun::SUCCESS), msg.txid());
            b.xor_addr(stun::XOR_MAPPED_ADDRESS, tuple.client).mapped_addr(tuple.client);
            let data = finish(&mut b, &self.cfg, None, fp);
            self.out.push_back(Output::Transmit { tuple, data });
            return;
        }
        if !matches!(method, stun::ALLOCATE | stun::REFRESH | stun::CREATE_PERMISSION | stun::CHANNEL_BIND) {
            return self.reply_error(now, tuple, msg, (400, "Bad Request: unknown method"), None, fp);
        }
        // A retransmitted Allocate gets the same answer (RFC 8656 §7.2), without re-authenticating.
        if method == stun::ALLOCATE {
            if let Some(a) = self.by_tuple.get(&tuple).and_then(|id| self.allocs.get(id)) {
                if a.alloc_txid == *msg.txid() {
                    if !a.alloc_response.is_empty() {
                        let data = a.alloc_response.clone();
                        self.out.push_back(Output::Transmit { tuple, data });
                    }
                    return;
                }
            }
        }
        let unknown: Vec<u16> = msg.attrs().map(|(t, _, _)| t).filter(|t| *t < 0x8000 && !is_known(*t)).collect();
        if !unknown.is_empty() {
            tracing::debug!(?unknown, method, client = %tuple.client, "unknown comprehension-required attributes");
            let mut b = Builder::new(stun::msg_type(method, stun::ERROR), msg.txid());
            b.error(420, "Unknown Attribute");
            let v: Vec<u8> = unknown.iter().flat_map(|t| t.to_be_bytes()).collect();
            b.attr(stun::UNKNOWN_ATTRIBUTES, &v);
            let data = finish(&mut b, &self.cfg, None, fp);
            self.out.push_back(Output::Transmit { tuple, data });
            return;
        }
        let auth = match self.authenticate(now, tuple, msg, fp) {
            Some(a) => a,
            None => return,
        };
        let res = match method {
            stun::ALLOCATE => self.allocate(now, tuple, msg, &auth, fp),
            stun::REFRESH => self.refresh(now, tuple, msg, &auth),
            stun::CREATE_PERMISSION => self.create_permission(now, tuple, msg, &auth),
            _ => self.channel_bind(now, tuple, msg, &auth),
        };
        match res {
            Ok(None) => {}
            Ok(Some(mut b)) => {
                let data = finish(&mut b, &self.cfg, Some(&auth.key), fp);
                self.out.push_back(Output::Transmit { tuple, data });
            }
            Err(fail) => self.reply_error(now, tuple, msg, fail, Some(&auth.key), fp),
        }
    }

    /// RFC 8489 §9.2.4, long-term credentials with TURN REST usernames, MD5 or SHA-256 keys
    /// (PASSWORD-ALGORITHM) and MESSAGE-INTEGRITY or MESSAGE-INTEGRITY-SHA256. On failure the error
    /// response is queued and `None` returned.
    fn authenticate(&mut self, now: Instant, tuple: FiveTuple, msg: &Msg<'_>, fp: bool) -> Option<Authed> {
        let mi = msg.attrs().any(|(t, _, _)| t == stun::MESSAGE_INTEGRITY);
        let mi256 = msg.attrs().any(|(t, _, _)| t == stun::MESSAGE_INTEGRITY_SHA256);
        let (Some(username), Some(realm), Some(nonce)) =
            (msg.get(stun::USERNAME), msg.get(stun::REALM), msg.get(stun::NONCE))
        else {
            if !mi && !mi256 {
                self.reply_error(now, tuple, msg, (401, "Unauthorized"), None, fp);
            } else {
                self.reply_error(now, tuple, msg, (400, "Bad Request: USERNAME, REALM and NONCE required"), None, fp);
            }
            return None;
        };
        if !mi && !mi256 {
            self.reply_error(now, tuple, msg, (401, "Unauthorized"), None, fp);
            return None;
        }
        if realm != self.cfg.realm.as_bytes() {
            self.reply_error(now, tuple, msg, (401, "Unauthorized: wrong REALM"), None, fp);
            return None;
        }
        // Both or neither (RFC 8489 §9.2.4); PASSWORD-ALGORITHMS must be the list we sent (no downgrade).
        let sha256_key = match (msg.get(stun::PASSWORD_ALGORITHMS), msg.get(stun::PASSWORD_ALGORITHM)) {
            (None, None) => false,
            (Some(list), Some(alg)) if list == PASSWORD_ALGORITHMS => match alg.get(..2) {
                Some([0, 1]) => false,
                Some([0, 2]) => true,
                _ => {
                    self.reply_error(now, tuple, msg, (400, "Bad Request: unknown PASSWORD-ALGORITHM"), None, fp);
                    return None;
                }
            },
            _ => {
                let fail = (400, "Bad Request: PASSWORD-ALGORITHMS does not match the offer");
                self.reply_error(now, tuple, msg, fail, None, fp);
                return None;
            }
        };
        let unix_now = self.start_unix + self.now_secs(now);
        let valid_user = std::str::from_utf8(username).ok().and_then(|u| {
            let (expiry, user) = auth::parse_rest_username(u)?;
            // Expiry bounds new allocations; an allocation made in time may be kept alive with the same
            // credentials (a call outlives them), as long as its client refreshes it.
            let keeps_alloc = || {
                msg.method() != stun::ALLOCATE
                    && self.by_tuple.get(&tuple).is_some_and(|id| &*self.allocs[id].username == u)
            };
            (expiry > unix_now || keeps_alloc()).then_some((u, user))
        });
        let Some((username, user)) = valid_user else {
            self.reply_error(now, tuple, msg, (401, "Unauthorized: credentials expired or malformed"), None, fp);
            return None;
        };
        let password = auth::rest_password(&self.cfg.secret, username);
        let mut key = Key { bytes: [0; 32], len: 16, sha256: mi256 };
        if sha256_key {
            key.bytes = auth::long_term_key_sha256(username, &self.cfg.realm, &password);
            key.len = 32;
        } else {
            key.bytes[..16].copy_from_slice(&auth::long_term_key(username, &self.cfg.realm, &password));
        }
        let ok = if mi256 { msg.check_integrity_sha256(key.as_bytes()) } else { msg.check_integrity(key.as_bytes()) };
        if ok != Some(true) {
            self.reply_error(now, tuple, msg, (401, "Unauthorized: wrong credentials"), None, fp);
            return None;
        }
        if !self.nonce_valid(now, tuple.client.ip(), nonce) {
            self.reply_error(now, tuple, msg, (438, "Stale Nonce"), None, fp);
            return None;
        }
        let user: Arc<str> = match self.per_user.get_key_value(user) {
            Some((k, _)) => k.clone(),
            None => user.into(),
        };
        Some(Authed { username: username.into(), user, key })
    }

    fn reply_error(&mut self, now: Instant, tuple: FiveTuple, msg: &Msg<'_>, fail: Fail, key: Option<&Key>, fp: bool) {
        let (code, reason) = fail;
        let mut b = Builder::new(stun::msg_type(msg.method(), stun::ERROR), msg.txid());
        b.error(code, reason);
        if code == 401 || code == 438 {
            let nonce = self.nonce(now, tuple.client.ip());
            b.attr(stun::REALM, self.cfg.realm.as_bytes()).attr(stun::NONCE, nonce.as_bytes());
            b.attr(stun::PASSWORD_ALGORITHMS, &PASSWORD_ALGORITHMS);
        }
        let data = finish(&mut b, &self.cfg, key, fp);
        self.out.push_back(Output::Transmit { tuple, data });
    }

    fn lifetime(&self, requested: Option<u32>) -> Duration {
        match requested {
            None => self.cfg.default_lifetime,
            Some(s) => Duration::from_secs(s as u64).min(self.cfg.max_lifetime).max(self.cfg.default_lifetime),
        }
    }

    fn allocate(
        &mut self,
        now: Instant,
        tuple: FiveTuple,
        msg: &Msg<'_>,
        auth: &Authed,
        fp: bool,
    ) -> Result<Option<Builder>, Fail> {
        if self.by_tuple.contains_key(&tuple) {
            return Err((437, "Allocation Mismatch"));
        }
        match msg.get(stun::REQUESTED_TRANSPORT) {
            None => return Err((400, "Bad Request: REQUESTED-TRANSPORT missing")),
            Some(v) if v.len() != 4 => return Err((400, "Bad Request: REQUESTED-TRANSPORT malformed")),
            Some(v) if v[0] != 17 => return Err((442, "Unsupported Transport Protocol")),
            Some(_) => {}
        }
        let token = msg.get(stun::RESERVATION_TOKEN);
        if token.is_some() && (msg.get(stun::EVEN_PORT).is_some() || msg.get(stun::REQUESTED_ADDRESS_FAMILY).is_some())
        {
            return Err((400, "Bad Request: RESERVATION-TOKEN with EVEN-PORT or REQUESTED-ADDRESS-FAMILY"));
        }
        let family = match msg.get(stun::REQUESTED_ADDRESS_FAMILY) {
            None => Family::V4,
            Some([1, ..]) => Family::V4,
            Some([2, ..]) => Family::V6,
            Some(_) => return Err((440, "Address Family not Supported")),
        };
        if (family == Family::V4 && !self.cfg.relay_v4) || (family == Family::V6 && !self.cfg.relay_v6) {
            return Err((440, "Address Family not Supported"));
        }
        if self.per_user.get(&auth.user).copied().unwrap_or(0) >= self.cfg.user_quota {
            return Err((486, "Allocation Quota Reached: too many allocations for this user"));
        }
        let ip = tuple.client.ip().to_canonical();
        if self.per_ip.get(&ip).copied().unwrap_or(0) >= self.cfg.ip_quota {
            return Err((486, "Allocation Quota Reached: too many allocations from this address"));
        }
        if self.allocs.len() >= self.cfg.total_quota {
            return Err((486, "Allocation Quota Reached: server full"));
        }
        let (port, family) = match (token, msg.get(stun::EVEN_PORT)) {
            (Some(t), _) => {
                let r = <[u8; 8]>::try_from(t)
                    .ok()
                    .and_then(|t| self.reservations.remove(&t))
                    .filter(|r| r.expires > now)
                    .ok_or((508, "Insufficient Capacity: unknown or expired RESERVATION-TOKEN"))?;
                (RelayPort::Reserved(r.port), r.family)
            }
            (None, Some(v)) => (RelayPort::Even { reserve_next: v.first().is_some_and(|b| b & 0x80 != 0) }, family),
            (None, None) => (RelayPort::Any, family),
        };
        let reserve_next = port == RelayPort::Even { reserve_next: true };
        let dont_fragment = msg.get(stun::DONT_FRAGMENT).is_some();
        let lifetime = self.lifetime(msg.get(stun::LIFETIME).and_then(be_u32));
        let id = AllocId(self.next_id);
        self.next_id += 1;
        let expires = now + lifetime;
        self.allocs.insert(
            id,
            Allocation {
                tuple,
                username: auth.username.clone(),
                user: auth.user.clone(),
                key: auth.key,
                family,
                relayed: None,
                expires,
                perms: Vec::new(),
                channels: Vec::new(),
                alloc_txid: *msg.txid(),
                alloc_response: Vec::new(),
                alloc_fingerprint: fp,
                lifetime,
                reserve_next,
            },
        );
        self.by_tuple.insert(tuple, id);
        self.expiries.insert((expires, id));
        *self.per_user.entry(auth.user.clone()).or_insert(0) += 1;
        *self.per_ip.entry(ip).or_insert(0) += 1;
        self.out.push_back(Output::OpenRelay { alloc: id, family, port, dont_fragment });
        Ok(None)
    }

    /// The allocation on `tuple`, checked against the request's credentials.
    fn own_alloc(&self, tuple: FiveTuple, auth: &Authed) -> Result<AllocId, Fail> {
        let id = *self.by_tuple.get(&tuple).ok_or((437, "Allocation Mismatch: no allocation"))?;
        let a = &self.allocs[&id];
        if a.username != auth.username {
            return Err((441, "Wrong Credentials"));
        }
        if a.relayed.is_none() {
            return Err((437, "Allocation Mismatch: allocation not ready"));
        }
        Ok(id)
    }

    fn refresh(
        &mut self,
        now: Instant,
        tuple: FiveTuple,
        msg: &Msg<'_>,
        auth: &Authed,
    ) -> Result<Option<Builder>, Fail> {
        let id = self.own_alloc(tuple, auth)?;
        let requested = msg.get(stun::LIFETIME).and_then(be_u32);
        let mut b = Builder::new(stun::msg_type(stun::REFRESH, stun::SUCCESS), msg.txid());
        if requested == Some(0) {
            self.remove(id);
            b.u32(stun::LIFETIME, 0);
            return Ok(Some(b));
        }
        let lifetime = self.lifetime(requested);
        let a = self.allocs.get_mut(&id).expect("checked");
        self.expiries.remove(&(a.expires, id));
        a.expires = now + lifetime;
        self.expiries.insert((a.expires, id));
        b.u32(stun::LIFETIME, lifetime.as_secs() as u32);
        Ok(Some(b))
    }

    /// The IP check of a permission (ports do not matter to permissions, RFC 8656 §9).
    fn check_peer(&self, a: &Allocation, peer: SocketAddr) -> Result<(), Fail> {
        if peer.is_ipv4() != (a.family == Family::V4) {
            return Err((443, "Peer Address Family Mismatch"));
        }
        // The server's own IPs pass here for relay to relay; `port_allowed` narrows them to the relay ports.
        if !peer_allowed(peer.ip(), &self.cfg.allow_peers) && !self.is_own(peer.ip()) {
            return Err((403, "Forbidden: peer address not allowed"));
        }
        Ok(())
    }

    fn is_own(&self, ip: IpAddr) -> bool {
        self.cfg.external_ip.is_some_and(|e| e.to_canonical() == ip) || self.cfg.own_ips.contains(&ip)
    }

    /// Relaying to (or from) the server itself: on its own IPs only the relay sockets of live allocations
    /// (two clients of this server relaying to each other; other sockets of the host may use ports of the
    /// relay range too), unless `allow_peers` names a listen IP; the STUN/TURN ports never, on loopback
    /// either. `peer` is canonical.
    fn port_allowed(&self, peer: SocketAddr) -> bool {
        let ip = peer.ip();
        let own = self.is_own(ip);
        if !own && !ip.is_loopback() {
            return true;
        }
        let port = peer.port();
        if self.live_relay_ports.contains_key(&port) {
            return true;
        }
        if self.cfg.turn_ports.contains(&port) {
            return false;
        }
        if !own {
            return true;
        }
        self.cfg.external_ip.is_none_or(|e| e.to_canonical() != ip)
            && self.cfg.allow_peers.iter().any(|n| n.contains(&ip))
    }

    fn create_permission(
        &mut self,
        now: Instant,
        tuple: FiveTuple,
        msg: &Msg<'_>,
        auth: &Authed,
    ) -> Result<Option<Builder>, Fail> {
        let id = self.own_alloc(tuple, auth)?;
        let mut peers = Vec::new();
        for (t, v, _) in msg.attrs() {
            if t == stun::MESSAGE_INTEGRITY || t == stun::MESSAGE_INTEGRITY_SHA256 {
                break;
            }
            if t == stun::XOR_PEER_ADDRESS {
                let p = stun::decode_xor_addr(v, msg.txid()).ok_or((400, "Bad Request: bad XOR-PEER-ADDRESS"))?;
                peers.push(canonical(p));
            }
        }
        if peers.is_empty() {
            return Err((400, "Bad Request: XOR-PEER-ADDRESS missing"));
        }
        let a = &self.allocs[&id];
        for p in &peers {
            self.check_peer(a, *p)?;
        }
        let exp = now + self.cfg.permission_lifetime;
        let max = self.cfg.max_permissions;
        let a = self.allocs.get_mut(&id).expect("checked");
        let new = peers.iter().filter(|p| !a.perms.iter().any(|(ip, _)| *ip == p.ip())).count();
        a.perms.retain(|(_, e)| *e > now);
        if a.perms.len() + new > max {
            return Err((508, "Insufficient Capacity: too many permissions"));
        }
        for p in peers {
            install_perm(a, p.ip(), exp);
        }
        Ok(Some(Builder::new(stun::msg_type(stun::CREATE_PERMISSION, stun::SUCCESS), msg.txid())))
    }

    fn channel_bind(
        &mut self,
        now: Instant,
        tuple: FiveTuple,
        msg: &Msg<'_>,
        auth: &Authed,
    ) -> Result<Option<Builder>, Fail> {
        let id = self.own_alloc(tuple, auth)?;
        let number = match msg.get(stun::CHANNEL_NUMBER) {
            Some(v) if v.len() == 4 => u16::from_be_bytes([v[0], v[1]]),
            _ => return Err((400, "Bad Request: CHANNEL-NUMBER missing")),
        };
        if !CHANNEL_NUMBERS.contains(&number) {
            return Err((400, "Bad Request: channel number outside 0x4000-0x7FFF"));
        }
        let peer = msg
            .get_xor_addr(stun::XOR_PEER_ADDRESS)
            .map(canonical)
            .ok_or((400, "Bad Request: XOR-PEER-ADDRESS missing"))?;
        let a = &self.allocs[&id];
        self.check_peer(a, peer)?;
        if !self.port_allowed(peer) {
            return Err((403, "Forbidden: peer is this server (only its relay ports are)"));
        }
        let live = |c: &Channel| c.expires + CHANNEL_COOLDOWN > now;
        if a.channels.iter().any(|c| live(c) && c.number == number && c.peer != peer) {
            return Err((400, "Bad Request: channel bound to another peer"));
        }
        if a.channels.iter().any(|c| live(c) && c.peer == peer && c.number != number) {
            return Err((400, "Bad Request: peer bound to another channel"));
        }
        let max = self.cfg.max_permissions;
        let ch_exp = now + self.cfg.channel_lifetime;
        let perm_exp = now + self.cfg.permission_lifetime;
        let a = self.allocs.get_mut(&id).expect("checked");
        a.channels.retain(live);
        match a.channels.iter_mut().find(|c| c.number == number) {
            Some(c) => c.expires = ch_exp,
            None => {
                if a.channels.len() >= max {
                    return Err((508, "Insufficient Capacity: too many channels"));
                }
                a.channels.push(Channel { number, peer, expires: ch_exp });
            }
        }
        install_perm(a, peer.ip(), perm_exp);
        Ok(Some(Builder::new(stun::msg_type(stun::CHANNEL_BIND, stun::SUCCESS), msg.txid())))
    }
}

fn install_perm(a: &mut Allocation, ip: IpAddr, exp: Instant) {
    match a.perms.iter_mut().find(|(p, _)| *p == ip) {
        Some(p) => p.1 = exp,
        None => a.perms.push((ip, exp)),
    }
}

fn finish(b: &mut Builder, cfg: &CoreConfig, key: Option<&Key>, fp: bool) -> Vec<u8> {
    if let Some(s) = &cfg.software {
        b.attr(stun::SOFTWARE, s.as_bytes());
    }
    match key {
        Some(k) if k.sha256 => b.integrity_sha256(k.as_bytes()),
        Some(k) => b.integrity(k.as_bytes()),
        None => b,
    };
    if fp {
        b.fingerprint();
    }
    b.finish()
}

fn be_u32(v: &[u8]) -> Option<u32> {
    Some(u32::from_be_bytes(v.try_into().ok()?))
}

fn is_known(t: u16) -> bool {
    matches!(
        t,
        stun::MAPPED_ADDRESS
            | stun::USERNAME
            | stun::MESSAGE_INTEGRITY
            | stun::ERROR_CODE
            | stun::UNKNOWN_ATTRIBUTES
            | stun::CHANNEL_NUMBER
            | stun::LIFETIME
            | stun::XOR_PEER_ADDRESS
            | stun::DATA_ATTR
            | stun::REALM
            | stun::NONCE
            | stun::XOR_RELAYED_ADDRESS
            | stun::REQUESTED_ADDRESS_FAMILY
            | stun::REQUESTED_TRANSPORT
            | stun::EVEN_PORT
            | stun::RESERVATION_TOKEN
            | stun::XOR_MAPPED_ADDRESS
            | stun::DONT_FRAGMENT
            | stun::MESSAGE_INTEGRITY_SHA256
            | stun::PASSWORD_ALGORITHM
    )
}

/// IPv4-mapped IPv6 addresses count as the IPv4 address they carry.
pub fn canonical(a: SocketAddr) -> SocketAddr {
    SocketAddr::new(a.ip().to_canonical(), a.port())
}

/// Relaying to loopback, private, link-local, multicast, unspecified and other special-purpose addresses
/// is refused unless a range in `allow` covers the peer.
pub fn peer_allowed(ip: IpAddr, allow: &[IpNet]) -> bool {
    let ip = ip.to_canonical();
    if allow.iter().any(|n| n.contains(&ip)) {
        return true;
    }
    match ip {
        IpAddr::V4(v) => {
            let o = v.octets();
            !(v.is_loopback()
                || v.is_private()
                || v.is_link_local()
                || v.is_multicast()
                || v.is_broadcast()
                || v.is_unspecified()
                || o[0] == 0
                || (o[0] == 100 && (o[1] & 0xC0) == 64) // 100.64/10 shared address space
                || o[0] >= 240
                || o == [168, 63, 129, 16]) // Azure's platform address (DNS, metadata, health)
        }
        IpAddr::V6(v) => {
            let s = v.segments();
            !(v.is_loopback()
                || v.is_unspecified()
                || v.is_multicast()
                || (s[0] & 0xFE00) == 0xFC00 // unique local fc00::/7
                || (s[0] & 0xFFC0) == 0xFE80 // link-local fe80::/10
                || s[0] == 0x2002 // 6to4 can tunnel to any IPv4 address
                || (s[0] == 0x64 && s[1] == 0xFF9B)) // NAT64 likewise
        }
    }
}

/// A stream carried something other than STUN or ChannelData.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NotTurn;

/// Length of the next complete frame in a TCP/TLS byte stream: a STUN message (20 + length) or a
/// ChannelData message padded to 4 bytes. `Ok(None)` means more bytes are needed; `Err` means the
/// stream is not TURN and should be closed.
pub fn stream_frame_len(buf: &[u8]) -> Result<Option<usize>, NotTurn> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let len = u16::from_be_bytes([buf[2], buf[3]]) as usize;
    let n = match buf[0] >> 6 {
        0b00 => stun::HEADER_LEN + len,
        0b01 => 4 + stun::pad4(len),
        _ => return Err(NotTurn),
    };
    Ok((buf.len() >= n).then_some(n))
}

#[cfg(test)]
#[path = "core_tests.rs"]
mod tests;
