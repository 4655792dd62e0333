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
//! TURN over TCP (`turn:…?transport=tcp`) and TLS (`turns:`) stand by for networks that block UDP: a socket
//! whose UDP allocations all failed allocates over the server's TCP, then its TLS, address. The session does
//! I/O on UDP sockets only, so a stream connection is bridged (`bridge`): a task holds the TCP/TLS
//! connection and a UDP socket beside the session's; TURN messages go over the bridge one datagram each.

use std::collections::{HashSet, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use str0m::Candidate;
use tokio::task::AbortHandle;
use turn_client_proto::api::{TurnClientApi, TurnConfig, TurnEvent, TurnPollRet, TurnRecvRet};
use turn_client_proto::client::TurnClient;
use turn_client_proto::stun::agent::{StunAgent, StunAgentPollRet, Transmit};
use turn_client_proto::stun::types::attribute::XorMappedAddress;
use turn_client_proto::stun::types::message::{Message, MessageClass, MessageWriteVec, TransactionId, BINDING};
use turn_client_proto::stun::types::prelude::*;
use turn_client_proto::tcp::TurnClientTcp;
use turn_client_proto::types::{AddressFamily, TransportType, TurnCredentials};
use turn_client_proto::udp::TurnClientUdp;
use webcall_protocol::IceServer;

/// After this long, gathering counts as finished (end-of-candidates is signalled) even if a server never
/// answered; a candidate that still comes later is used and trickled all the same.
pub const GATHER_DEADLINE: Duration = Duration::from_secs(5);

/// STUN Binding retransmissions: sent at 0, 0.3, 0.9, 2.1 s; given up 1.4 s after the last.
const BINDING_RTO: Duration = Duration::from_millis(300);
const BINDING_TRIES: u32 = 4;
const BINDING_LAST_WAIT: Duration = Duration::from_millis(1400);
/// Connecting (and the TLS handshake) to a TURN server over TCP/TLS.
const STREAM_CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// A UDP allocation still unanswered after this long brings in the TCP/TLS stand-bys (the UDP one may
/// still win; the first allocation made closes the ones still trying).
const STREAM_FALLBACK_AFTER: Duration = Duration::from_millis(1500);

/// Where to gather from: the `iceServers` of the last `welcome`, as usable servers.
#[derive(Debug, Clone, Default)]
pub struct IceConfig {
    /// `host:port` of each STUN server.
    pub stun: Vec<String>,
    /// TURN servers: over UDP first; TCP and TLS ones stand by for a socket whose UDP allocations failed.
    pub turn: Vec<TurnServer>,
    /// `--relay`: gather and signal relayed candidates only.
    pub relay_only: bool,
}

/// How a TURN server is reached (the allocation is always a UDP relay).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TurnTransport {
    Udp,
    Tcp,
    /// TLS over TCP (`turns:`); the certificate is checked against the host name (or IP) of the URL.
    Tls,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TurnServer {
    pub hostport: String,
    pub username: String,
    pub credential: String,
    pub transport: TurnTransport,
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
                    Some((scheme @ ("turn" | "turns"), hp, transport)) => {
                        let transport = match (scheme, transport) {
                            ("turn", None | Some("udp")) => TurnTransport::Udp,
                            ("turn", Some("tcp")) => TurnTransport::Tcp,
                            ("turns", None | Some("tcp")) => TurnTransport::Tls,
                            _ => {
                                tracing::debug!("ICE server URL {url} not used (unknown transport)");
                                continue;
                            }
                        };
                        let (Some(username), Some(credential)) = (&s.username, &s.credential) else {
                            tracing::warn!("TURN URL {url} without credentials; skipped");
                            continue;
                        };
                        let t = TurnServer {
                            hostport: hp,
                            username: username.clone(),
                            credential: credential.clone(),
                            transport,
                        };
                        if !c.turn.contains(&t) {
                            c.turn.push(t);
                        }
                    }
                    _ => tracing::debug!("ICE server URL {url} not used"),
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

/// One STUN Binding transaction (`stun-proto` does the retransmissions).
struct Binding {
    agent: StunAgent,
    txid: TransactionId,
    local: SocketAddr,
    server: SocketAddr,
    next: Instant,
    done: bool,
}

struct Relay {
    client: TurnClient,
    transport: TurnTransport,
    local: SocketAddr,
    /// The TURN server.
    server: SocketAddr,
    /// Where its messages go and come from as datagrams: the server over UDP, the bridge over TCP/TLS.
    via: SocketAddr,
    bridge: Option<AbortHandle>,
    started: Instant,
    relayed: Option<SocketAddr>,
    done: bool,
    closed: bool,
    next: Instant,
    /// Peer addresses with a channel bound (or being bound).
    channels: HashSet<SocketAddr>,
}

impl Relay {
    fn close(&mut self) {
        self.done = true;
        self.closed = true;
        self.relayed = None;
        if let Some(b) = self.bridge.take() {
            b.abort();
        }
    }
}

/// A TCP/TLS TURN server held back until the socket's UDP allocations fail.
struct Standby {
    transport: TurnTransport,
    local: SocketAddr,
    server: SocketAddr,
    host: String,
    username: String,
    credential: String,
}

pub struct Gatherer {
    /// The sans-IO clients count time in their own `Instant` from an arbitrary zero: this one.
    epoch: Instant,
    deadline: Instant,
    bindings: Vec<Binding>,
    relays: Vec<Relay>,
    standby: Vec<Standby>,
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
            standby: Vec::new(),
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
        let mut agent = StunAgent::builder(TransportType::Udp, local)
            .remote_addr(server)
            .request_retransmits(BINDING_RTO, Duration::MAX, BINDING_TRIES, BINDING_LAST_WAIT)
            .build();
        let msg = Message::builder_request(BINDING, MessageWriteVec::new()).finish();
        let txid = Message::from_bytes(&msg).expect("a request we built").transaction_id();
        match agent.send_request(&msg, server, self.t(now)) {
            Ok(tx) => self.transmits.push_back((local, server, tx.data.to_vec())),
            Err(e) => {
                tracing::warn!("STUN Binding to {server}: {e}");
                return;
            }
        }
        self.bindings.push(Binding { agent, txid, local, server, next: now, done: false });
        self.done = false;
    }

    /// Starts a TURN allocation over UDP on the socket bound to `local`.
    pub fn add_relay(&mut self, local: SocketAddr, server: SocketAddr, username: &str, credential: &str, now: Instant) {
        self.start_relay(TurnTransport::Udp, local, server, "", username, credential, now);
    }

    /// A TURN server of the welcome for the socket bound to `local`, `server` being its resolved address:
    /// over UDP it allocates now; over TCP/TLS it stands by until the socket has no UDP allocation left to
    /// try (at once if there is none).
    pub fn add_turn(&mut self, local: SocketAddr, server: SocketAddr, t: &TurnServer, now: Instant) {
        if t.transport == TurnTransport::Udp {
            return self.add_relay(local, server, &t.username, &t.credential, now);
        }
        let host = t.hostport.rsplit_once(':').map_or(&t.hostport[..], |(h, _)| h);
        let host = host.trim_start_matches('[').trim_end_matches(']').to_owned();
        self.standby.push(Standby {
            transport: t.transport,
            local,
            server,
            host,
            username: t.username.clone(),
            credential: t.credential.clone(),
        });
        self.done = false;
        self.fall_back(local, now);
    }

    /// Once none of `local`'s allocations is made or recently started, starts all its stand-by servers at once
    /// (a firewall that drops the TCP one costs a connect timeout); the first allocation made closes the others.
    fn fall_back(&mut self, local: SocketAddr, now: Instant) {
        let waiting = |r: &Relay| r.relayed.is_some() || now < r.started + STREAM_FALLBACK_AFTER;
        if self.relays.iter().any(|r| r.local == local && !r.closed && waiting(r)) {
            return;
        }
        let (mine, rest) = std::mem::take(&mut self.standby).into_iter().partition(|s| s.local == local);
        self.standby = rest;
        for s in mine {
            out_log(&format!("TURN over {:?} to {} from {local}: no UDP allocation", s.transport, s.server));
            self.start_relay(s.transport, local, s.server, &s.host, &s.username, &s.credential, now);
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn start_relay(
        &mut self,
        transport: TurnTransport,
        local: SocketAddr,
        server: SocketAddr,
        host: &str,
        username: &str,
        credential: &str,
        now: Instant,
    ) {
        let mut cfg = TurnConfig::new(TurnCredentials::new(username, credential));
        cfg.set_address_family(if server.is_ipv4() { AddressFamily::IPV4 } else { AddressFamily::IPV6 });
        // The RFC's 39.5 s of retransmissions would hold the session up for nothing: a server that has not
        // answered 5 tries over ~3 s is not there.
        cfg.set_request_retransmits(Duration::from_millis(250), Duration::from_secs(1), 5, Duration::from_secs(1));
        let (client, via, bridge) = match transport {
            TurnTransport::Udp => (TurnClient::from(TurnClientUdp::allocate(local, server, cfg)), server, None),
            _ => match bridge::start(local, server, (transport == TurnTransport::Tls).then_some(host)) {
                Ok((via, task)) => (TurnClient::from(TurnClientTcp::allocate(local, server, cfg)), via, Some(task)),
                Err(e) => {
                    out_log(&format!("TURN over {transport:?} to {server} from {local} failed: {e}"));
                    return self.fall_back(local, now);
                }
            },
        };
        self.relays.push(Relay {
            client,
            transport,
            local,
            server,
            via,
            bridge,
            started: now,
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
        let b = self.bindings.iter().filter(|b| !b.done).map(|b| b.next);
        let r = self.relays.iter().filter(|r| !r.closed).map(|r| r.next);
        let fallback = self
            .relays
            .iter()
            .filter(|r| !r.closed && r.relayed.is_none() && self.standby.iter().any(|s| s.local == r.local))
            .map(|r| r.started + STREAM_FALLBACK_AFTER);
        let r = r.chain(fallback);
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
        for b in self.bindings.iter_mut().filter(|b| !b.done) {
            match b.agent.poll(t) {
                StunAgentPollRet::WaitUntil(w) => b.next = w.to_std(self.epoch),
                StunAgentPollRet::TransactionTimedOut(_) | StunAgentPollRet::TransactionCancelled(_) => {
                    tracing::info!(
                        "STUN server {} did not answer from {}; no server-reflexive candidate",
                        b.server,
                        b.local
                    );
                    b.done = true;
                    continue;
                }
            }
            while let Some(tx) = b.agent.poll_transmit(t) {
                self.transmits.push_back((b.local, b.server, tx.data.to_vec()));
            }
        }
        for i in 0..self.relays.len() {
            self.service_relay(i, now, t);
        }
        let mut locals: Vec<SocketAddr> = self.standby.iter().map(|s| s.local).collect();
        locals.dedup();
        for local in locals {
            self.fall_back(local, now);
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
                let to = if tx.to == r.server { r.via } else { tx.to };
                self.transmits.push_back((r.local, to, tx.data.to_vec()));
            }
            let mut won = None;
            while let Some(e) = r.client.poll_event() {
                match e {
                    TurnEvent::AllocationCreated(TransportType::Udp, relayed) => {
                        // On stdout: which way the relay was reached is worth knowing (and tests check it).
                        crate::out(format!(
                            "TURN allocation on {} over {:?} from {}: relayed address {relayed}",
                            r.server, r.transport, r.local
                        ));
                        r.relayed = Some(relayed);
                        r.done = true;
                        won = Some((r.local, r.transport));
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
                        out_log(&format!(
                            "TURN allocation on {} over {:?} from {} failed ({fam:?})",
                            r.server, r.transport, r.local
                        ));
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
            if let Some((local, mine)) = won {
                // The other ways to this socket's relay still trying are not needed.
                for o in self.relays.iter_mut().filter(|o| o.local == local && o.transport != mine) {
                    if o.relayed.is_none() && !o.closed {
                        o.close();
                    }
                }
            }
            let r = &mut self.relays[i];
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
                            "TURN allocation on {} over {:?} from {} failed (no answer or refused)",
                            r.server, r.transport, r.local
                        ));
                    }
                    r.close();
                    let local = r.local;
                    return self.fall_back(local, now);
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
        let t = self.t(now);
        if let Ok(msg) = Message::from_bytes(buf) {
            let txid = msg.transaction_id();
            if let Some(i) = self.bindings.iter().position(|b| !b.done && b.local == local && b.txid == txid) {
                let b = &mut self.bindings[i];
                if !msg.is_response() || !b.agent.handle_stun_message_with_time(&msg, src, t) {
                    return Recv::Consumed;
                }
                b.done = true;
                let server = b.server;
                let mapped = msg
                    .attribute::<XorMappedAddress>()
                    .ok()
                    .filter(|_| msg.has_class(MessageClass::Success))
                    .map(|a| a.addr(txid));
                match mapped {
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
        let Some(i) = self.relays.iter().position(|r| !r.closed && r.local == local && r.via == src) else {
            return Recv::NotMine;
        };
        let r = &mut self.relays[i];
        let relayed = r.relayed;
        let transport = r.client.transport();
        let ret = match r.client.recv(Transmit::new(buf, transport, r.server, local), t) {
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
                let to = if tx.to == r.server { r.via } else { tx.to };
                self.transmits.push_back((r.local, to, tx.data));
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
                    let to = if tx.to == r.server { r.via } else { tx.to };
                    self.transmits.push_back((r.local, to, tx.data.to_vec()));
                }
            }
        }
    }
}

fn out_log(s: &str) {
    tracing::info!("{s}");
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
                    "turn:198.51.100.1:3478?transport=sctp".into(),
                ],
                username: Some("1:a".into()),
                credential: Some("c".into()),
            },
        ];
        let c = IceConfig::from_servers(&servers, true);
        assert_eq!(c.stun, vec!["198.51.100.1:3478".to_string()]);
        let transports: Vec<_> = c.turn.iter().map(|t| t.transport).collect();
        assert_eq!(transports, [TurnTransport::Udp, TurnTransport::Tcp]);
        assert!(c.relay_only);
    }
}

impl Drop for Gatherer {
    fn drop(&mut self) {
        for r in &mut self.relays {
            r.close();
        }
    }
}

/// TURN over TCP/TLS for a session that does I/O on UDP sockets only: a task holds the stream connection to
/// the server and a UDP socket on the session socket's IP. Each datagram the session sends to that socket is
/// one TURN message for the stream; each TURN message or ChannelData from the stream comes back to the
/// session's socket as one datagram. ChannelData is padded to 4 bytes on the stream (RFC 8656 §12.5), which
/// `turn-client-proto` neither writes nor expects: the bridge adds the padding going out and takes it off
/// coming in.
pub(crate) mod bridge {
    use std::io;
    use std::net::SocketAddr;
    use std::sync::Arc;

    use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
    use tokio::net::{TcpStream, UdpSocket};
    use tokio::task::AbortHandle;

    use super::STREAM_CONNECT_TIMEOUT;

    /// Binds the bridge's datagram side and spawns the task; returns the address the session talks to.
    /// `tls` is the server name (host or IP of the `turns:` URL) to check the certificate against.
    pub fn start(session: SocketAddr, server: SocketAddr, tls: Option<&str>) -> io::Result<(SocketAddr, AbortHandle)> {
        let tls = match tls {
            Some(host) => Some((client_config()?, server_name(host)?)),
            None => None,
        };
        let std_sock = std::net::UdpSocket::bind(SocketAddr::new(session.ip(), 0))?;
        std_sock.set_nonblocking(true)?;
        let udp = UdpSocket::from_std(std_sock)?;
        let via = udp.local_addr()?;
        let task = tokio::spawn(async move {
            if let Err(e) = run(udp, session, server, tls).await {
                tracing::info!("TURN stream to {server} ended: {e}");
            }
        });
        Ok((via, task.abort_handle()))
    }

    type Tls = (Arc<rustls::ClientConfig>, rustls::pki_types::ServerName<'static>);

    async fn run(udp: UdpSocket, session: SocketAddr, server: SocketAddr, tls: Option<Tls>) -> io::Result<()> {
        let connect = async {
            let tcp = TcpStream::connect(server).await?;
            tcp.set_nodelay(true)?;
            Ok::<_, io::Error>(tcp)
        };
        let tcp = tokio::time::timeout(STREAM_CONNECT_TIMEOUT, connect).await.map_err(|_| timed_out())??;
        match tls {
            None => pump(udp, session, tcp).await,
            Some((cfg, name)) => {
                let tls = tokio_rustls::TlsConnector::from(cfg).connect(name, tcp);
                let tls = tokio::time::timeout(STREAM_CONNECT_TIMEOUT, tls).await.map_err(|_| timed_out())??;
                pump(udp, session, tls).await
            }
        }
    }

    fn timed_out() -> io::Error {
        io::Error::new(io::ErrorKind::TimedOut, "no connection within 3 s")
    }

    async fn pump<S: AsyncRead + AsyncWrite + Unpin>(udp: UdpSocket, session: SocketAddr, s: S) -> io::Result<()> {
        let (mut rd, mut wr) = tokio::io::split(s);
        let mut dgram = vec![0u8; 65536];
        let mut stream: Vec<u8> = Vec::with_capacity(4096);
        loop {
            tokio::select! {
                r = udp.recv_from(&mut dgram) => {
                    let (n, from) = r?;
                    if from == session {
                        wr.write_all(&dgram[..n]).await?;
                        let pad = if dgram[0] >> 6 == 1 { n.div_ceil(4) * 4 - n } else { 0 };
                        wr.write_all(&[0u8; 3][..pad]).await?;
                        wr.flush().await?;
                    }
                }
                r = rd.read_buf(&mut stream) => {
                    if r? == 0 {
                        return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "closed by the server"));
                    }
                    let mut start = 0;
                    while let Some(n) = frame_len(&stream[start..])? {
                        let f = &stream[start..start + n];
                        let unpadded = if f[0] >> 6 == 1 { 4 + u16::from_be_bytes([f[2], f[3]]) as usize } else { n };
                        udp.send_to(&f[..unpadded], session).await?;
                        start += n;
                    }
                    stream.drain(..start);
                    stream.reserve(4096);
                }
            }
        }
    }

    /// Length of the first complete frame: a STUN message (20 + length) or ChannelData padded to 4 bytes
    /// (RFC 8656 §12.5); `None` until it is all there.
    fn frame_len(b: &[u8]) -> io::Result<Option<usize>> {
        if b.len() < 4 {
            return Ok(None);
        }
        let len = u16::from_be_bytes([b[2], b[3]]) as usize;
        let n = match b[0] >> 6 {
            0 => 20 + len,
            1 => 4 + len.div_ceil(4) * 4,
            _ => return Err(io::Error::new(io::ErrorKind::InvalidData, "not TURN on the stream")),
        };
        Ok((b.len() >= n).then_some(n))
    }

    /// The web PKI roots, plus the certificates of the PEM file `SSL_CERT_FILE` names (as OpenSSL reads it):
    /// how a private CA or a self-signed server certificate is trusted.
    pub(crate) fn client_config() -> io::Result<Arc<rustls::ClientConfig>> {
        use rustls::pki_types::pem::PemObject;
        let mut roots = rustls::RootCertStore { roots: webpki_roots::TLS_SERVER_ROOTS.to_vec() };
        if let Some(path) = std::env::var_os("SSL_CERT_FILE") {
            let certs = rustls::pki_types::CertificateDer::pem_file_iter(&path)
                .map_err(|e| io::Error::other(format!("SSL_CERT_FILE {}: {e}", path.to_string_lossy())))?;
            for c in certs {
                let c = c.map_err(|e| io::Error::other(format!("SSL_CERT_FILE: {e}")))?;
                roots.add(c).map_err(|e| io::Error::other(format!("SSL_CERT_FILE: {e}")))?;
            }
        }
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let cfg = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(io::Error::other)?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(Arc::new(cfg))
    }

    pub(crate) fn server_name(host: &str) -> io::Result<rustls::pki_types::ServerName<'static>> {
        rustls::pki_types::ServerName::try_from(host.to_owned())
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, format!("TLS server name {host}: {e}")))
    }

    #[cfg(test)]
    mod tests {
        #[test]
        fn frames() {
            assert_eq!(super::frame_len(&[0, 1, 0, 4, 1]).unwrap(), None);
            assert_eq!(super::frame_len(&[0u8; 24][..]).unwrap(), Some(20));
            assert_eq!(super::frame_len(&[0x40, 0, 0, 5, 1, 2, 3, 4, 5, 0, 0, 0]).unwrap(), Some(12));
            assert!(super::frame_len(&[0xC0, 0, 0, 0]).is_err());
        }
    }
}
