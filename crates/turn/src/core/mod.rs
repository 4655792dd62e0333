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
use rustc_hash::FxHashMap;
use sha1::Sha1;

use crate::auth;
use crate::config::PortRange;
use crate::defaults;
use crate::stun::{self, Builder, Msg};

mod allocation;
mod credentials;
mod permission;
mod quota;
mod relay;

use self::allocation::*;
use self::credentials::*;
use self::permission::*;
pub use self::permission::{canonical, peer_allowed};
use self::quota::Tally;
pub use crate::framing::{stream_frame_len, NotTurn, StreamFramer};

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

const SWEEP_EVERY: Duration = Duration::from_secs(30);

/// The sans-IO TURN server.
pub struct TurnCore {
    cfg: CoreConfig,
    start: Instant,
    start_unix: u64,
    nonce_key: [u8; 20],
    txid_state: u64,
    next_id: u64,
    // FxHash on the per-packet lookups: the keys are bounded by the quotas, so flooding one bucket is not
    // worth defending against with SipHash's cost per packet.
    allocs: FxHashMap<AllocId, Allocation>,
    by_tuple: FxHashMap<FiveTuple, AllocId>,
    expiries: BTreeSet<(Instant, AllocId)>,
    per_user: Tally<Arc<str>>,
    per_ip: Tally<IpAddr>,
    reservations: HashMap<[u8; 8], Reservation>,
    /// Ports of open relay sockets (with how many: an IPv4 and an IPv6 relay may share one): on the server's
    /// own IPs, the only peers.
    live_relay_ports: Tally<u16>,
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
            allocs: FxHashMap::default(),
            by_tuple: FxHashMap::default(),
            expiries: BTreeSet::new(),
            per_user: Tally::new(),
            per_ip: Tally::new(),
            reservations: HashMap::new(),
            live_relay_ports: Tally::new(),
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
        self.live_relay_ports.add(relayed.port());
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
            self.per_user.remove(&a.user);
            self.per_ip.remove(&a.tuple.client.ip().to_canonical());
            if let Some(r) = a.relayed {
                self.live_relay_ports.remove(&r.port());
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
        let mut users: FxHashMap<Arc<str>, usize> = FxHashMap::default();
        let mut ips: FxHashMap<IpAddr, usize> = FxHashMap::default();
        for (id, a) in &self.allocs {
            assert_eq!(self.by_tuple.get(&a.tuple), Some(id), "by_tuple entry");
            assert!(self.expiries.contains(&(a.expires, *id)), "expiry entry");
            assert!(id.0 < self.next_id, "ids are never reused");
            *users.entry(a.user.clone()).or_default() += 1;
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
        assert_eq!(&users, self.per_user.as_map(), "per_user counts");
        assert!(users.values().all(|n| *n <= self.cfg.user_quota), "user quota");
        assert_eq!(&ips, self.per_ip.as_map(), "per_ip counts");
        let mut live: FxHashMap<u16, usize> = FxHashMap::default();
        for a in self.allocs.values() {
            if let Some(r) = a.relayed {
                *live.entry(r.port()).or_default() += 1;
            }
        }
        assert_eq!(&live, self.live_relay_ports.as_map(), "live relay ports");
        assert!(ips.values().all(|n| *n <= self.cfg.ip_quota), "ip quota");
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

#[cfg(test)]
mod tests;
