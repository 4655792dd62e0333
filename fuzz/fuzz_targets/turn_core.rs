//! Arbitrary sequences of client requests (mostly well-formed, with valid or invalid credentials), raw and
//! corrupted datagrams, peer datagrams, relay-socket results, closed connections and time against the TURN
//! core: it never panics, what it emits is well-formed, and `TurnCore::check_invariants()` holds after
//! every input.
#![no_main]

use std::net::SocketAddr;
use std::time::{Duration, Instant, UNIX_EPOCH};

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use webcall_turn::core::{canonical, AllocId, Family, PEER_HEADROOM, PEER_TAILROOM};
use webcall_turn::stun::{self, Builder, Msg};
use webcall_turn::{auth, CoreConfig, FiveTuple, Output, RelayPort, Transport, TurnCore};

const SECRET: &[u8] = b"fuzz-secret";
const UNIX: u64 = 1_700_000_000;
const CLIENTS: [&str; 5] =
    ["198.51.100.1:1000", "198.51.100.1:1001", "[::ffff:198.51.100.1]:1002", "198.51.100.2:1000", "[2001:db8::1]:1000"];
const PEERS: [&str; 6] = [
    "203.0.113.5:7000",
    "203.0.113.6:7001",
    "[2001:db8::5]:7000",
    "10.0.0.1:9",
    "127.0.0.1:9",
    "[::ffff:203.0.113.5]:7000",
];

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Cred {
    Valid(u8),
    Expired(u8),
    WrongPassword(u8),
    Malformed,
    StaleNonce(u8),
    None,
}

#[derive(Arbitrary, Debug)]
enum Op {
    Binding {
        client: u8,
    },
    Allocate {
        client: u8,
        cred: Cred,
        udp: bool,
        family: Option<u8>,
        even_port: Option<u8>,
        token: Option<u8>,
        lifetime: Option<u32>,
    },
    Refresh {
        client: u8,
        cred: Cred,
        lifetime: Option<u32>,
    },
    CreatePermission {
        client: u8,
        cred: Cred,
        peers: Vec<u8>,
    },
    ChannelBind {
        client: u8,
        cred: Cred,
        number: u16,
        peer: u8,
    },
    Send {
        client: u8,
        peer: u8,
        len: u8,
    },
    ChannelData {
        client: u8,
        number: u16,
        len: u8,
        extra: u8,
    },
    /// The last request, resent (a retransmission) or with one byte changed.
    Resend {
        client: u8,
        pos: u16,
        xor: u8,
    },
    Raw {
        client: u8,
        bytes: Vec<u8>,
    },
    Peer {
        alloc: u8,
        peer: u8,
        len: u16,
    },
    RelayOpened {
        which: u8,
        ok: bool,
        port: u16,
    },
    Closed {
        client: u8,
    },
    Advance {
        secs: u16,
    },
}

#[derive(Arbitrary, Debug)]
struct Input {
    external_ip: bool,
    ops: Vec<Op>,
}

struct World {
    core: TurnCore,
    now: Instant,
    start: Instant,
    txn: u64,
    /// Latest NONCE the server gave each client.
    nonces: Vec<Option<String>>,
    /// Relays asked for and not answered yet.
    pending: Vec<(AllocId, Family, RelayPort)>,
    allocs: Vec<AllocId>,
    tokens: Vec<[u8; 8]>,
    last: Vec<u8>,
}

fn tuple(i: u8) -> FiveTuple {
    let transport = match i / 5 % 3 {
        0 => Transport::Udp,
        1 => Transport::Tcp,
        _ => Transport::Tls,
    };
    FiveTuple {
        transport,
        client: CLIENTS[i as usize % 5].parse().unwrap(),
        server: "192.0.2.10:3478".parse().unwrap(),
    }
}

fn peer(i: u8) -> SocketAddr {
    PEERS[i as usize % PEERS.len()].parse().unwrap()
}

impl World {
    fn unix_now(&self) -> u64 {
        UNIX + (self.now - self.start).as_secs()
    }

    fn request(&mut self, client: u8, method: u16, cred: Cred, f: impl FnOnce(&mut Builder)) {
        self.txn += 1;
        let mut txid = [0u8; 12];
        txid[..8].copy_from_slice(&self.txn.to_be_bytes());
        let mut b = Builder::new(stun::msg_type(method, stun::REQUEST), &txid);
        f(&mut b);
        let nonce = self.nonces[client as usize % 15].clone().unwrap_or_else(|| "0".repeat(32));
        let (user, expiry, password) = match cred {
            Cred::None => (None, 0, String::new()),
            Cred::Valid(u) | Cred::StaleNonce(u) => (Some(u), self.unix_now() + 3600, String::new()),
            Cred::Expired(u) => (Some(u), self.unix_now().saturating_sub(1), String::new()),
            Cred::WrongPassword(u) => (Some(u), self.unix_now() + 3600, "wrong".into()),
            Cred::Malformed => (None, 1, String::new()),
        };
        if !matches!(cred, Cred::None) {
            let username = match user {
                Some(u) => auth::rest_username(expiry, &format!("user{}", u % 4)),
                None => "no-timestamp".into(),
            };
            let password = if password.is_empty() { auth::rest_password(SECRET, &username) } else { password };
            let nonce = if matches!(cred, Cred::StaleNonce(_)) { "f".repeat(32) } else { nonce };
            b.attr(stun::USERNAME, username.as_bytes())
                .attr(stun::REALM, b"webcall")
                .attr(stun::NONCE, nonce.as_bytes());
            b.integrity(&auth::long_term_key(&username, "webcall", &password));
        }
        b.fingerprint();
        let msg = b.finish();
        self.client(client, &msg);
        self.last = msg;
    }

    fn client(&mut self, client: u8, data: &[u8]) {
        let t = tuple(client);
        if let Some(p) = self.core.handle_client(self.now, t, data) {
            assert!(self.core.relayed_addr(p.alloc).is_some(), "relays only through open allocations");
            assert_eq!(self.core.allocation_of(&t), Some(p.alloc));
            assert_eq!(p.peer, canonical(p.peer));
        }
    }

    fn drain(&mut self) {
        while let Some(o) = self.core.poll_output() {
            match o {
                Output::Transmit { tuple, data } => {
                    let m = Msg::parse(&data).expect("the core emits valid STUN");
                    assert!(m.fingerprint_ok());
                    if let Some(n) = m.get(stun::NONCE) {
                        let i = (0..15u8).filter(|i| tuple_eq(*i, &tuple));
                        for i in i {
                            self.nonces[i as usize] = Some(String::from_utf8(n.to_vec()).unwrap());
                        }
                    }
                    if let Some(t) = m.get(stun::RESERVATION_TOKEN) {
                        self.tokens.push(t.try_into().expect("8-byte token"));
                    }
                }
                Output::OpenRelay { alloc, family, port, .. } => self.pending.push((alloc, family, port)),
                Output::CloseRelay { alloc } => self.allocs.retain(|a| *a != alloc),
                Output::ReleaseReserved { .. } => {}
            }
        }
    }
}

fn tuple_eq(i: u8, t: &FiveTuple) -> bool {
    tuple(i) == *t
}

fuzz_target!(|input: Input| {
    let now = Instant::now();
    let cfg = CoreConfig {
        secret: SECRET.to_vec(),
        user_quota: 2,
        total_quota: 5,
        ip_quota: 3,
        max_permissions: 3,
        allow_peers: vec!["127.0.0.0/8".parse().unwrap()],
        external_ip: input.external_ip.then(|| "198.18.0.1".parse().unwrap()),
        ..CoreConfig::default()
    };
    let mut w = World {
        core: TurnCore::new(cfg, now, UNIX_EPOCH + Duration::from_secs(UNIX)),
        now,
        start: now,
        txn: 0,
        nonces: vec![None; 15],
        pending: Vec::new(),
        allocs: Vec::new(),
        tokens: Vec::new(),
        last: Vec::new(),
    };
    for op in input.ops.into_iter().take(300) {
        match op {
            Op::Binding { client } => w.request(client, stun::BINDING, Cred::None, |_| {}),
            Op::Allocate { client, cred, udp, family, even_port, token, lifetime } => {
                let token = token.and_then(|i| w.tokens.get(i as usize % w.tokens.len().max(1)).copied());
                w.request(client, stun::ALLOCATE, cred, |b| {
                    b.u32(stun::REQUESTED_TRANSPORT, if udp { 17 << 24 } else { 6 << 24 });
                    if let Some(f) = family {
                        b.attr(stun::REQUESTED_ADDRESS_FAMILY, &[f % 3, 0, 0, 0]);
                    }
                    if let Some(e) = even_port {
                        b.attr(stun::EVEN_PORT, &[e & 0x80]);
                    }
                    if let Some(t) = token {
                        b.attr(stun::RESERVATION_TOKEN, &t);
                    }
                    if let Some(l) = lifetime {
                        b.u32(stun::LIFETIME, l);
                    }
                })
            }
            Op::Refresh { client, cred, lifetime } => w.request(client, stun::REFRESH, cred, |b| {
                if let Some(l) = lifetime {
                    b.u32(stun::LIFETIME, l % 4000);
                }
            }),
            Op::CreatePermission { client, cred, peers } => w.request(client, stun::CREATE_PERMISSION, cred, |b| {
                for p in peers.iter().take(6) {
                    b.xor_addr(stun::XOR_PEER_ADDRESS, peer(*p));
                }
            }),
            Op::ChannelBind { client, cred, number, peer: p } => {
                // Mostly valid numbers, sometimes anything.
                let number = if number & 0x8000 == 0 { 0x4000 | (number & 0x7) } else { number };
                w.request(client, stun::CHANNEL_BIND, cred, |b| {
                    b.attr(stun::CHANNEL_NUMBER, &[(number >> 8) as u8, number as u8, 0, 0])
                        .xor_addr(stun::XOR_PEER_ADDRESS, peer(p));
                })
            }
            Op::Send { client, peer: p, len } => {
                let m = Builder::new(stun::msg_type(stun::SEND, stun::INDICATION), &[1; 12])
                    .xor_addr(stun::XOR_PEER_ADDRESS, peer(p))
                    .attr(stun::DATA_ATTR, &vec![0xAB; len as usize])
                    .finish();
                w.client(client, &m);
            }
            Op::ChannelData { client, number, len, extra } => {
                let number = if number & 0x8000 == 0 { 0x4000 | (number & 0x7) } else { number };
                let mut m = number.to_be_bytes().to_vec();
                m.extend_from_slice(&(len as u16).to_be_bytes());
                m.resize(4 + len.saturating_sub(extra) as usize, 0xCD);
                w.client(client, &m);
            }
            Op::Resend { client, pos, xor } => {
                let mut m = std::mem::take(&mut w.last);
                if !m.is_empty() {
                    let i = pos as usize % m.len();
                    m[i] ^= xor;
                }
                w.client(client, &m);
            }
            Op::Raw { client, bytes } => w.client(client, &bytes),
            Op::Peer { alloc, peer: p, len } => {
                let Some(&id) = w.allocs.get(alloc as usize % w.allocs.len().max(1)) else { continue };
                let len = len as usize % 1500;
                let mut buf = vec![0x5Au8; PEER_HEADROOM + len + PEER_TAILROOM];
                let from = peer(p);
                if let Some((t, r)) = w.core.handle_peer(w.now, id, from, &mut buf, PEER_HEADROOM, len) {
                    assert_eq!(w.core.allocation_of(&t), Some(id));
                    let framed = &buf[r];
                    if framed[0] >> 6 == 1 {
                        assert_eq!(u16::from_be_bytes([framed[2], framed[3]]) as usize, len);
                        assert_eq!(&framed[4..4 + len], &vec![0x5Au8; len][..]);
                    } else {
                        let m = Msg::parse(framed).expect("a valid Data indication");
                        assert_eq!(m.get(stun::DATA_ATTR), Some(&vec![0x5Au8; len][..]));
                        assert_eq!(m.get_xor_addr(stun::XOR_PEER_ADDRESS), Some(canonical(from)));
                    }
                }
            }
            Op::RelayOpened { which, ok, port } => {
                if w.pending.is_empty() {
                    continue;
                }
                let (id, family, want) = w.pending.remove(which as usize % w.pending.len());
                let port = match want {
                    RelayPort::Reserved(p) => p,
                    RelayPort::Even { .. } => (port | 1).saturating_sub(1).max(2),
                    RelayPort::Any => port.max(1),
                };
                let ip = match family {
                    Family::V4 => "192.0.2.10",
                    Family::V6 => "2001:db8::10",
                };
                let bound = ok.then(|| SocketAddr::new(ip.parse().unwrap(), port));
                w.core.relay_opened(w.now, id, bound);
                if ok && w.core.relayed_addr(id).is_some() {
                    w.allocs.push(id);
                }
            }
            Op::Closed { client } => w.core.client_closed(w.now, tuple(client)),
            Op::Advance { secs } => {
                w.now += Duration::from_secs(secs as u64 % 1200);
                w.core.handle_timeout(w.now);
                assert!(w.core.poll_timeout() > w.now, "nothing left due");
            }
        }
        w.drain();
        w.core.check_invariants();
    }
});
