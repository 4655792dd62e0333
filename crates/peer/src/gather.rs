//! Candidates beyond host ones, gathered on the session's own UDP sockets from the signaling `iceServers`:
//!
//! - server-reflexive: a STUN Binding request (RFC 8489) to each `stun:` URL from each socket; the
//!   XOR-MAPPED-ADDRESS of the answer becomes `Candidate::server_reflexive(mapped, socket, "udp")`;
//! - relayed: a TURN allocation (RFC 8656) to each `turn:…?transport=udp` URL from each socket, with the
//!   welcome's long-term (TURN REST) credentials; the relayed address becomes `Candidate::relayed`.
//!
//! str0m has no TURN client, so the relay is driven here with the sans-IO `turn-client-proto` crate, which does
//! the protocol work: Allocate with the 401/nonce retry (and 438 stale nonce), Refresh before expiry,
//! CreatePermission and ChannelBind with their refreshes, Send/Data indications and ChannelData framing. Like
//! str0m it does no I/O: [`Gatherer`] owns the clients and the binding transactions, the session feeds it the
//! datagrams that come from a STUN/TURN server, and sends what it queues on the socket it names. Packets str0m
//! sends from a relayed candidate go through [`Gatherer::relay_send`]; data the server relays back comes out of
//! [`Gatherer::recv`] as [`Recv::Peer`], to be given to str0m as received on the relayed address.
//!
//! Only UDP to the STUN/TURN server is used (TURN over TCP/TLS is left to browsers).

use std::collections::{HashSet, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use str0m::Candidate;
use turn_client_proto::api::{TurnClientApi, TurnConfig, TurnEvent, TurnPollRet, TurnRecvRet};
use turn_client_proto::stun::agent::Transmit;
use turn_client_proto::types::{AddressFamily, TransportType, TurnCredentials};
use turn_client_proto::udp::TurnClientUdp;
use webcall_protocol::IceServer;

/// After this long, gathering counts as finished (end-of-candidates is signalled) even if a server never
/// answered; a candidate that still comes later is used and trickled all the same.
pub const GATHER_DEADLINE: Duration = Duration::from_secs(5);

/// STUN Binding retransmissions: sent at 0, 0.3, 0.9, 2.1 s; given up at 3.5 s.
const BINDING_RTO: Duration = Duration::from_millis(300);
const BINDING_TRIES: u32 = 4;
const BINDING_GIVE_UP: Duration = Duration::from_millis(3500);

/// Where to gather from: the `iceServers` of the last `welcome`, as usable UDP servers.
#[derive(Debug, Clone, Default)]
pub struct IceConfig {
    /// `host:port` of each STUN server.
    pub stun: Vec<String>,
    /// TURN servers reachable over UDP.
    pub turn: Vec<TurnServer>,
    /// `--relay`: gather and signal relayed candidates only.
    pub relay_only: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TurnServer {
    pub hostport: String,
    pub username: String,
    pub credential: String,
}

/// `scheme:host[:port][?transport=…]` → (scheme, `host:port`, transport). IPv6 hosts come in brackets.
fn parse_url(url: &str) -> Option<(&str, String, Option<&str>)> {
    let (scheme, rest) = url.split_once(':')?;
    let (hostport, query) = match rest.split_once('?') {
        Some((h, q)) => (h, Some(q)),
        None => (rest, None),
    };
    let transport = query.and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("transport=")));
    let hostport = hostport.trim_start_matches("//");
    if hostport.is_empty() {
        return None;
    }
    let has_port = match hostport.rfind(']') {
        Some(i) => hostport[i..].contains(':'),
        None => hostport.contains(':'),
    };
    let default_port = if scheme == "turns" || scheme == "stuns" { 5349 } else { 3478 };
    let hostport = if has_port { hostport.to_owned() } else { format!("{hostport}:{default_port}") };
    Some((scheme, hostport, transport))
}

impl IceConfig {
    pub fn from_servers(servers: &[IceServer], relay_only: bool) -> IceConfig {
        let mut c = IceConfig { relay_only, ..Default::default() };
        for s in servers {
            for url in &s.urls {
                match parse_url(url) {
                    Some(("stun", hp, _)) => {
                        if !c.stun.contains(&hp) {
                            c.stun.push(hp)
                        }
                    }
                    Some(("turn", hp, None | Some("udp"))) => {
                        let (Some(username), Some(credential)) = (&s.username, &s.credential) else {
                            tracing::warn!("TURN URL {url} without credentials; skipped");
                            continue;
                        };
                        let t = TurnServer { hostport: hp, username: username.clone(), credential: credential.clone() };
                        if !c.turn.contains(&t) {
                            c.turn.push(t);
                        }
                    }
                    _ => tracing::debug!("ICE server URL {url} not used (UDP STUN/TURN only)"),
                }
            }
        }
        c
    }
}

/// Resolves `host:port` to the addresses of one family.
pub async fn resolve(hostport: &str, v4: bool) -> Option<SocketAddr> {
    match tokio::net::lookup_host(hostport).await {
        Ok(addrs) => addrs.into_iter().find(|a| a.is_ipv4() == v4),
        Err(e) => {
            tracing::warn!("cannot resolve ICE server {hostport}: {e}");
            None
        }
    }
}

/// A datagram that came from a STUN/TURN server, once the gatherer has looked at it.
pub enum Recv {
    /// Protocol traffic, handled.
    Consumed,
    /// Data a peer sent to our relayed address `relay` (from a Data indication or ChannelData).
    Peer { relay: SocketAddr, peer: SocketAddr, data: Vec<u8> },
    /// Not for the gatherer: hand it to str0m.
    NotMine,
}

pub enum GatherEvent {
    Candidate(Candidate),
    /// Every server answered or gave up, or the deadline passed.
    Done,
}

struct Binding {
    txid: [u8; 12],
    local: SocketAddr,
    server: SocketAddr,
    started: Instant,
    next: Instant,
    tries: u32,
    done: bool,
}

struct Relay {
    client: TurnClientUdp,
    local: SocketAddr,
    server: SocketAddr,
    relayed: Option<SocketAddr>,
    done: bool,
    closed: bool,
    next: Instant,
    /// Peer addresses with a channel bound (or being bound).
    channels: HashSet<SocketAddr>,
}

pub struct Gatherer {
    /// The sans-IO clients count time in their own `Instant` from an arbitrary zero: this one.
    epoch: Instant,
    deadline: Instant,
    bindings: Vec<Binding>,
    relays: Vec<Relay>,
    remote_ips: HashSet<IpAddr>,
    events: VecDeque<GatherEvent>,
    transmits: VecDeque<(SocketAddr, SocketAddr, Vec<u8>)>,
    done: bool,
    relay_only: bool,
}

impl Gatherer {
    pub fn new(now: Instant, relay_only: bool) -> Gatherer {
        Gatherer {
            epoch: now,
            deadline: now + GATHER_DEADLINE,
            bindings: Vec::new(),
            relays: Vec::new(),
            remote_ips: HashSet::new(),
            events: VecDeque::new(),
            transmits: VecDeque::new(),
            done: false,
            relay_only,
        }
    }

    fn t(&self, now: Instant) -> turn_client_proto::stun::Instant {
        turn_client_proto::stun::Instant::from_nanos(now.saturating_duration_since(self.epoch).as_nanos() as i64)
    }

    /// Asks `server` for the reflexive address of the socket bound to `local`.
    pub fn add_binding(&mut self, local: SocketAddr, server: SocketAddr, now: Instant) {
        let txid: [u8; 12] = rand::random();
        self.bindings.push(Binding { txid, local, server, started: now, next: now, tries: 0, done: false });
        self.done = false;
    }

    /// Starts a TURN allocation on the socket bound to `local`.
    pub fn add_relay(&mut self, local: SocketAddr, server: SocketAddr, username: &str, credential: &str, now: Instant) {
        let mut cfg = TurnConfig::new(TurnCredentials::new(username, credential));
        cfg.set_address_family(if server.is_ipv4() { AddressFamily::IPV4 } else { AddressFamily::IPV6 });
        // The RFC's 39.5 s of retransmissions would hold the session up for nothing: a server that has not
        // answered 5 tries over ~3 s is not there.
        cfg.set_request_retransmits(Duration::from_millis(250), Duration::from_secs(1), 5, Duration::from_secs(1));
        let client = TurnClientUdp::allocate(local, server, cfg);
        self.relays.push(Relay {
            client,
            local,
            server,
            relayed: None,
            done: false,
            closed: false,
            next: now,
            channels: HashSet::new(),
        });
        self.done = false;
    }

    /// When gathering started.
    pub fn started(&self) -> Instant {
        self.epoch
    }

    pub fn is_done(&self) -> bool {
        self.done
    }

    /// Whether `addr` is one of our relayed addresses.
    pub fn is_relayed(&self, addr: SocketAddr) -> bool {
        self.relays.iter().any(|r| r.relayed == Some(addr))
    }

    /// When [`Gatherer::handle_timeout`] wants to run next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let b = self.bindings.iter().filter(|b| !b.done).map(|b| b.next.min(b.started + BINDING_GIVE_UP));
        let r = self.relays.iter().filter(|r| !r.closed).map(|r| r.next);
        let d = (!self.done).then_some(self.deadline);
        b.chain(r).chain(d).min()
    }

    pub fn poll_transmit(&mut self) -> Option<(SocketAddr, SocketAddr, Vec<u8>)> {
        self.transmits.pop_front()
    }

    pub fn poll_event(&mut self) -> Option<GatherEvent> {
        self.events.pop_front()
    }

    /// The IP of a remote candidate: every allocation gets a permission for it, so the peer's checks and media
    /// get through the relay towards us (and ours towards it).
    pub fn add_remote_ip(&mut self, ip: IpAddr, now: Instant) {
        if !self.remote_ips.insert(ip) {
            return;
        }
        let t = self.t(now);
        for r in self.relays.iter_mut().filter(|r| r.relayed.is_some_and(|a| a.is_ipv4() == ip.is_ipv4())) {
            if let Err(e) = r.client.create_permission(TransportType::Udp, ip, t) {
                tracing::debug!("TURN permission for {ip}: {e:?}");
            }
            r.next = now;
        }
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        let t = self.t(now);
        for i in 0..self.bindings.len() {
            let b = &mut self.bindings[i];
            if b.done {
                continue;
            }
            if now >= b.started + BINDING_GIVE_UP {
                tracing::info!(
                    "STUN server {} did not answer from {}; no server-reflexive candidate",
                    b.server,
                    b.local
                );
                b.done = true;
                continue;
            }
            if now >= b.next && b.tries < BINDING_TRIES {
                let msg = binding_request(&b.txid);
                self.transmits.push_back((b.local, b.server, msg));
                b.tries += 1;
                b.next = now + BINDING_RTO * (1 << (b.tries - 1));
            } else if b.tries >= BINDING_TRIES {
                b.next = b.started + BINDING_GIVE_UP;
            }
        }
        for i in 0..self.relays.len() {
            self.service_relay(i, now, t);
        }
        if !self.done && now >= self.deadline {
            tracing::info!("candidate gathering: deadline passed with servers still silent");
            self.finish();
        }
        self.check_done();
    }

    /// Runs one TURN client until it waits: queues its datagrams, turns its events into candidates.
    fn service_relay(&mut self, i: usize, now: Instant, t: turn_client_proto::stun::Instant) {
        for _ in 0..16 {
            let r = &mut self.relays[i];
            if r.closed {
                return;
            }
            while let Some(tx) = r.client.poll_transmit(t) {
                let mut data = tx.data.to_vec();
                strip_dont_fragment(&mut data);
                self.transmits.push_back((r.local, tx.to, data));
            }
            while let Some(e) = r.client.poll_event() {
                match e {
                    TurnEvent::AllocationCreated(TransportType::Udp, relayed) => {
                        out_log(&format!(
                            "TURN allocation on {} from {}: relayed address {relayed}",
                            r.server, r.local
                        ));
                        r.relayed = Some(relayed);
                        r.done = true;
                        match Candidate::relayed(relayed, r.local, "udp") {
                            Ok(c) => self.events.push_back(GatherEvent::Candidate(c)),
                            Err(e) => tracing::warn!("relayed candidate {relayed}: {e}"),
                        }
                        for ip in self.remote_ips.iter().filter(|ip| ip.is_ipv4() == relayed.is_ipv4()) {
                            let _ = r.client.create_permission(TransportType::Udp, *ip, t);
                        }
                    }
                    TurnEvent::AllocationCreated(..) => {}
                    TurnEvent::AllocationCreateFailed(fam) => {
                        out_log(&format!("TURN allocation on {} from {} failed ({fam:?})", r.server, r.local));
                        r.done = true;
                    }
                    TurnEvent::PermissionCreateFailed(_, ip) => {
                        tracing::warn!("TURN {}: permission for {ip} refused", r.server)
                    }
                    TurnEvent::ChannelCreateFailed(_, a) => {
                        tracing::debug!("TURN {}: channel for {a} refused; Send indications instead", r.server)
                    }
                    e => tracing::debug!("TURN {}: {e:?}", r.server),
                }
            }
            match r.client.poll(t) {
                TurnPollRet::WaitUntil(w) => {
                    let w = w.to_std(self.epoch);
                    if w > now {
                        self.relays[i].next = w;
                        return;
                    }
                }
                TurnPollRet::Closed => {
                    if !r.done {
                        out_log(&format!(
                            "TURN allocation on {} from {} failed (no answer or refused)",
                            r.server, r.local
                        ));
                    }
                    r.done = true;
                    r.closed = true;
                    r.relayed = None;
                    return;
                }
                _ => return,
            }
        }
        self.relays[i].next = now + Duration::from_millis(10);
    }

    fn check_done(&mut self) {
        if !self.done && self.bindings.iter().all(|b| b.done) && self.relays.iter().all(|r| r.done) {
            self.finish();
        }
    }

    fn finish(&mut self) {
        self.done = true;
        self.events.push_back(GatherEvent::Done);
    }

    /// A datagram from `src` on the socket bound to `local`.
    pub fn recv(&mut self, local: SocketAddr, src: SocketAddr, buf: &[u8], now: Instant) -> Recv {
        // Our own Binding answers.
        if buf.len() >= 20 && buf[0] < 2 {
            if let Some(i) = self.bindings.iter().position(|b| !b.done && b.local == local && buf[8..20] == b.txid) {
                self.bindings[i].done = true;
                let server = self.bindings[i].server;
                match parse_binding_response(buf, &self.bindings[i].txid) {
                    Some(mapped) if self.relay_only => {
                        tracing::debug!("reflexive address {mapped} (not used: --relay)")
                    }
                    Some(mapped) if mapped == local => {
                        tracing::debug!("STUN {server}: no NAT in front of {local}; the host candidate covers it")
                    }
                    Some(mapped) => match Candidate::server_reflexive(mapped, local, "udp") {
                        Ok(c) => {
                            out_log(&format!("server-reflexive address {mapped} for {local} (STUN {server})"));
                            self.events.push_back(GatherEvent::Candidate(c));
                        }
                        Err(e) => tracing::warn!("server-reflexive candidate {mapped}: {e}"),
                    },
                    None => tracing::warn!("STUN {server}: Binding failed or answer unreadable"),
                }
                self.check_done();
                return Recv::Consumed;
            }
        }
        let t = self.t(now);
        let Some(i) = self.relays.iter().position(|r| !r.closed && r.local == local && r.server == src) else {
            return Recv::NotMine;
        };
        let r = &mut self.relays[i];
        let relayed = r.relayed;
        let ret = match r.client.recv(Transmit::new(buf, TransportType::Udp, src, local), t) {
            TurnRecvRet::Handled => Recv::Consumed,
            TurnRecvRet::Ignored(_) => Recv::NotMine,
            TurnRecvRet::PeerData(d) => match relayed {
                Some(relay) => Recv::Peer { relay, peer: d.peer, data: d.data().to_vec() },
                None => Recv::Consumed,
            },
            TurnRecvRet::PeerIcmp { peer, .. } => {
                tracing::debug!("TURN: ICMP from {peer}");
                Recv::Consumed
            }
        };
        // Whatever it changed (an allocation, a permission, a retry with the nonce) comes out now.
        self.service_relay(i, now, t);
        self.check_done();
        ret
    }

    /// Sends `data` to `to` through the allocation whose relayed address is `from`. Returns false if `from` is
    /// not a relayed address. Without a permission for `to` yet, asks for one and drops the packet (ICE
    /// retransmits its checks).
    pub fn relay_send(&mut self, from: SocketAddr, to: SocketAddr, data: &[u8], now: Instant) -> bool {
        let t = self.t(now);
        let Some(i) = self.relays.iter().position(|r| r.relayed == Some(from)) else { return false };
        let r = &mut self.relays[i];
        if !r.client.have_permission(TransportType::Udp, to.ip()) {
            if self.remote_ips.insert(to.ip()) {
                let _ = r.client.create_permission(TransportType::Udp, to.ip(), t);
                self.service_relay(i, now, t);
            }
            return true;
        }
        if r.channels.insert(to) {
            // ChannelData costs 4 bytes a packet instead of a Send indication's 36; until the bind is
            // confirmed the client keeps using Send indications.
            if let Err(e) = r.client.bind_channel(TransportType::Udp, to, t) {
                tracing::debug!("TURN channel for {to}: {e:?}");
            }
        }
        match r.client.send_to(TransportType::Udp, to, data, t) {
            Ok(Some(tb)) => {
                let tx = tb.build();
                self.transmits.push_back((r.local, tx.to, tx.data));
            }
            Ok(None) => {}
            Err(e) => tracing::debug!("TURN send to {to}: {e:?}"),
        }
        self.service_relay(i, now, t);
        true
    }

    /// Releases the allocations (a Refresh with lifetime 0); the datagrams come out of poll_transmit.
    pub fn close(&mut self, now: Instant) {
        let t = self.t(now);
        for r in self.relays.iter_mut().filter(|r| r.relayed.is_some()) {
            if r.client.delete(t).is_ok() {
                while let Some(tx) = r.client.poll_transmit(t) {
                    self.transmits.push_back((r.local, tx.to, tx.data.to_vec()));
                }
            }
        }
    }
}

fn out_log(s: &str) {
    tracing::info!("{s}");
}

/// turn-client-proto puts DONT-FRAGMENT (0x001A, comprehension-required) in its first, unauthenticated Allocate
/// and gives up on the 420 Unknown Attribute that a server without DF support answers (RFC 8656 §7.2 says
/// clients should retry without it; webcall's own TURN is such a server, coturn is not). DF is only a hint, so it
/// is taken out of that request on the way out. The request has neither MESSAGE-INTEGRITY nor FINGERPRINT
/// (credentials come with the retry), so nothing needs re-signing; anything else passes untouched.
fn strip_dont_fragment(m: &mut Vec<u8>) {
    const ALLOCATE_REQUEST: u16 = 0x0003;
    if m.len() < 20 || u16::from_be_bytes([m[0], m[1]]) != ALLOCATE_REQUEST || m[4..8] != 0x2112_A442u32.to_be_bytes() {
        return;
    }
    let (mut o, mut df) = (20, None);
    while o + 4 <= m.len() {
        let typ = u16::from_be_bytes([m[o], m[o + 1]]);
        let l = u16::from_be_bytes([m[o + 2], m[o + 3]]) as usize;
        match typ {
            0x0008 | 0x001C | 0x8028 => return, // MESSAGE-INTEGRITY(-SHA256), FINGERPRINT: signed, leave it
            0x001A if l == 0 => df = Some(o),
            _ => {}
        }
        o += 4 + l.div_ceil(4) * 4;
    }
    if let Some(o) = df {
        m.drain(o..o + 4);
        let len = u16::from_be_bytes([m[2], m[3]]) - 4;
        m[2..4].copy_from_slice(&len.to_be_bytes());
    }
}

/// A STUN Binding request: header only (RFC 8489 §5, no attributes needed).
fn binding_request(txid: &[u8; 12]) -> Vec<u8> {
    let mut m = Vec::with_capacity(20);
    m.extend_from_slice(&0x0001u16.to_be_bytes());
    m.extend_from_slice(&0u16.to_be_bytes());
    m.extend_from_slice(&0x2112_A442u32.to_be_bytes());
    m.extend_from_slice(txid);
    m
}

/// XOR-MAPPED-ADDRESS (or MAPPED-ADDRESS) of a Binding success response with this transaction id.
fn parse_binding_response(buf: &[u8], txid: &[u8; 12]) -> Option<SocketAddr> {
    if buf.len() < 20 || u16::from_be_bytes([buf[0], buf[1]]) != 0x0101 || buf[4..8] != 0x2112_A442u32.to_be_bytes() {
        return None;
    }
    if &buf[8..20] != txid {
        return None;
    }
    let len = u16::from_be_bytes([buf[2], buf[3]]) as usize;
    let body = buf.get(20..20 + len)?;
    let (mut o, mut plain) = (0, None);
    while o + 4 <= body.len() {
        let typ = u16::from_be_bytes([body[o], body[o + 1]]);
        let l = u16::from_be_bytes([body[o + 2], body[o + 3]]) as usize;
        let v = body.get(o + 4..o + 4 + l)?;
        match typ {
            0x0020 => return decode_addr(v, Some(&buf[4..20])),
            0x0001 => plain = decode_addr(v, None),
            _ => {}
        }
        o += 4 + l.div_ceil(4) * 4;
    }
    plain
}

/// A (XOR-)MAPPED-ADDRESS value; `xor` is magic cookie + transaction id for the XOR form.
fn decode_addr(v: &[u8], xor: Option<&[u8]>) -> Option<SocketAddr> {
    if v.len() < 4 {
        return None;
    }
    let x = |i: usize| xor.map_or(0, |k| k[i]);
    let port = u16::from_be_bytes([v[2] ^ x(0), v[3] ^ x(1)]);
    let ip: IpAddr = match v[1] {
        1 if v.len() >= 8 => IpAddr::from([v[4] ^ x(0), v[5] ^ x(1), v[6] ^ x(2), v[7] ^ x(3)]),
        2 if v.len() >= 20 => {
            let mut a = [0u8; 16];
            for (i, b) in a.iter_mut().enumerate() {
                *b = v[4 + i] ^ x(i);
            }
            IpAddr::from(a)
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert_eq!(parse_url("stun:127.0.0.1:3478"), Some(("stun", "127.0.0.1:3478".into(), None)));
        assert_eq!(parse_url("turn:h.example?transport=udp"), Some(("turn", "h.example:3478".into(), Some("udp"))));
        assert_eq!(parse_url("turn:[::1]:5000?transport=tcp"), Some(("turn", "[::1]:5000".into(), Some("tcp"))));
        assert_eq!(parse_url("turns:[::1]"), Some(("turns", "[::1]:5349".into(), None)));
        let servers = [
            IceServer { urls: vec!["stun:198.51.100.1:3478".into()], username: None, credential: None },
            IceServer {
                urls: vec![
                    "turn:198.51.100.1:3478?transport=udp".into(),
                    "turn:198.51.100.1:3478?transport=tcp".into(),
                ],
                username: Some("1:a".into()),
                credential: Some("c".into()),
            },
        ];
        let c = IceConfig::from_servers(&servers, true);
        assert_eq!(c.stun, vec!["198.51.100.1:3478".to_string()]);
        assert_eq!(c.turn.len(), 1);
        assert!(c.relay_only);
    }

    #[test]
    fn binding_round_trip() {
        let txid = [7u8; 12];
        let req = binding_request(&txid);
        assert_eq!(req.len(), 20);
        // A success response with XOR-MAPPED-ADDRESS 198.51.100.7:40000.
        let mut r = vec![0x01, 0x01, 0, 12];
        r.extend_from_slice(&0x2112_A442u32.to_be_bytes());
        r.extend_from_slice(&txid);
        r.extend_from_slice(&[0x00, 0x20, 0, 8, 0, 1]);
        r.extend_from_slice(&(40000u16 ^ 0x2112).to_be_bytes());
        for (i, b) in [198u8, 51, 100, 7].iter().enumerate() {
            r.push(b ^ 0x2112_A442u32.to_be_bytes()[i]);
        }
        assert_eq!(parse_binding_response(&r, &txid), Some("198.51.100.7:40000".parse().unwrap()));
        assert_eq!(parse_binding_response(&r, &[8u8; 12]), None);
    }

    #[test]
    fn dont_fragment_is_taken_out_of_the_first_allocate_only() {
        let mut m = vec![0x00, 0x03, 0, 12];
        m.extend_from_slice(&0x2112_A442u32.to_be_bytes());
        m.extend_from_slice(&[1u8; 12]);
        m.extend_from_slice(&[0x00, 0x19, 0, 4, 17, 0, 0, 0]); // REQUESTED-TRANSPORT udp
        m.extend_from_slice(&[0x00, 0x1A, 0, 0]); // DONT-FRAGMENT
        let mut stripped = m.clone();
        strip_dont_fragment(&mut stripped);
        assert_eq!(stripped.len(), m.len() - 4);
        assert_eq!(&stripped[2..4], &[0, 8]);
        assert_eq!(&stripped[20..], &m[20..28]);
        // Signed: untouched.
        let mut signed = m.clone();
        signed.extend_from_slice(&[0x80, 0x28, 0, 4, 0, 0, 0, 0]);
        signed[3] = 20;
        let before = signed.clone();
        strip_dont_fragment(&mut signed);
        assert_eq!(signed, before);
    }
}
