//! Tests of the sans-IO core on simulated time: no sockets, no sleeping.

use std::net::SocketAddr;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::*;
use crate::stun::{self, Builder, Msg};

const SECRET: &[u8] = b"s3cret";
const RELAY: &str = "192.0.2.10:50000";

struct H {
    core: TurnCore,
    now: Instant,
    unix: u64,
    relay_port: u16,
    txn: u32,
}

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn udp(client: &str) -> FiveTuple {
    FiveTuple { transport: Transport::Udp, client: addr(client), server: addr("192.0.2.10:3478") }
}

/// A decoded response.
#[derive(Debug)]
struct Resp {
    class: u16,
    method: u16,
    code: Option<u16>,
    bytes: Vec<u8>,
}

impl Resp {
    fn msg(&self) -> Msg<'_> {
        Msg::parse(&self.bytes).unwrap()
    }
    fn nonce(&self) -> String {
        String::from_utf8(self.msg().get(stun::NONCE).expect("NONCE").to_vec()).unwrap()
    }
    fn lifetime(&self) -> u32 {
        u32::from_be_bytes(self.msg().get(stun::LIFETIME).unwrap().try_into().unwrap())
    }
}

struct Creds {
    username: String,
    password: String,
}

impl H {
    fn new(cfg: CoreConfig) -> H {
        let now = Instant::now();
        let unix = 1_700_000_000;
        let core =
            TurnCore::new(CoreConfig { secret: SECRET.to_vec(), ..cfg }, now, UNIX_EPOCH + Duration::from_secs(unix));
        H { core, now, unix, relay_port: 50000, txn: 0 }
    }
    fn default() -> H {
        H::new(CoreConfig::default())
    }
    fn advance(&mut self, secs: u64) {
        self.now += Duration::from_secs(secs);
        self.core.handle_timeout(self.now);
        self.core.check_invariants();
    }
    fn creds(&self, user: &str, valid_for: i64) -> Creds {
        let username = auth::rest_username((self.unix as i64 + valid_for) as u64, user);
        let password = auth::rest_password(SECRET, &username);
        Creds { username, password }
    }
    fn txid(&mut self) -> [u8; 12] {
        self.txn += 1;
        let mut t = [0u8; 12];
        t[..4].copy_from_slice(&self.txn.to_be_bytes());
        t
    }
    fn build(&mut self, method: u16, auth: Option<(&Creds, &str)>, f: impl FnOnce(&mut Builder)) -> Vec<u8> {
        let txid = self.txid();
        build_with(txid, method, auth, f)
    }
    fn outputs(&mut self) -> Vec<Output> {
        std::iter::from_fn(|| self.core.poll_output()).collect()
    }
    /// Sends a request and returns the one response (answering OpenRelay with a bound socket).
    fn request(&mut self, tuple: FiveTuple, data: &[u8]) -> Resp {
        assert!(self.core.handle_client(self.now, tuple, data).is_none());
        let mut resp = None;
        let mut pending = self.outputs();
        while let Some(o) = pending.pop() {
            match o {
                Output::Transmit { tuple: t, data } => {
                    assert_eq!(t, tuple);
                    assert!(resp.is_none(), "one response per request");
                    let m = Msg::parse(&data).unwrap();
                    let code = m.get(stun::ERROR_CODE).map(|v| v[2] as u16 * 100 + v[3] as u16);
                    resp = Some(Resp { class: m.class(), method: m.method(), code, bytes: data });
                }
                Output::OpenRelay { alloc, family, port, .. } => {
                    assert_eq!(family, Family::V4);
                    let port = match port {
                        RelayPort::Reserved(p) => p,
                        RelayPort::Even { reserve_next } => {
                            self.relay_port += 2 - self.relay_port % 2;
                            let p = self.relay_port;
                            self.relay_port += reserve_next as u16;
                            p
                        }
                        RelayPort::Any => {
                            self.relay_port += 1;
                            self.relay_port
                        }
                    };
                    let bound = SocketAddr::new(addr(RELAY).ip(), port);
                    self.core.relay_opened(self.now, alloc, Some(bound));
                    pending.extend(self.outputs());
                }
                Output::CloseRelay { .. } | Output::ReleaseReserved { .. } => {}
            }
        }
        self.core.check_invariants();
        let r = resp.expect("a response");
        assert_eq!(r.msg().txid(), Msg::parse(data).unwrap().txid());
        r
    }
    /// Allocate with the 401 round trip first; returns the nonce and the relayed address.
    fn allocate(&mut self, tuple: FiveTuple, c: &Creds) -> (String, SocketAddr) {
        let first = self.build(stun::ALLOCATE, None, |b| {
            b.u32(stun::REQUESTED_TRANSPORT, 17 << 24);
        });
        let r = self.request(tuple, &first);
        assert_eq!(r.code, Some(401));
        assert_eq!(r.msg().get(stun::REALM), Some(&b"webcall"[..]));
        assert_eq!(r.msg().check_integrity(b"anything"), None, "401 carries no MESSAGE-INTEGRITY");
        let nonce = r.nonce();
        let req = self.build(stun::ALLOCATE, Some((c, &nonce)), |b| {
            b.u32(stun::REQUESTED_TRANSPORT, 17 << 24);
        });
        let r = self.request(tuple, &req);
        assert_eq!((r.class, r.code), (stun::SUCCESS, None), "{r:?}");
        let key = auth::long_term_key(&c.username, "webcall", &c.password);
        assert_eq!(r.msg().check_integrity(&key), Some(true));
        assert_eq!(r.msg().get_xor_addr(stun::XOR_MAPPED_ADDRESS), Some(tuple.client));
        (nonce, r.msg().get_xor_addr(stun::XOR_RELAYED_ADDRESS).unwrap())
    }
    fn simple(&mut self, tuple: FiveTuple, method: u16, c: &Creds, nonce: &str, f: impl FnOnce(&mut Builder)) -> Resp {
        let req = self.build(method, Some((c, nonce)), f);
        let r = self.request(tuple, &req);
        assert_eq!(r.method, method);
        r
    }
    fn perm(&mut self, tuple: FiveTuple, c: &Creds, nonce: &str, peer: &str) -> Resp {
        self.simple(tuple, stun::CREATE_PERMISSION, c, nonce, |b| {
            b.xor_addr(stun::XOR_PEER_ADDRESS, addr(peer));
        })
    }
    fn bind(&mut self, tuple: FiveTuple, c: &Creds, nonce: &str, ch: u16, peer: &str) -> Resp {
        self.simple(tuple, stun::CHANNEL_BIND, c, nonce, |b| {
            b.attr(stun::CHANNEL_NUMBER, &[(ch >> 8) as u8, ch as u8, 0, 0])
                .xor_addr(stun::XOR_PEER_ADDRESS, addr(peer));
        })
    }
    fn refresh(&mut self, tuple: FiveTuple, c: &Creds, nonce: &str, lifetime: Option<u32>) -> Resp {
        self.simple(tuple, stun::REFRESH, c, nonce, |b| {
            if let Some(l) = lifetime {
                b.u32(stun::LIFETIME, l);
            }
        })
    }
    /// Client sends a Send indication; returns the peer it goes to, if relayed.
    fn send_ind(&mut self, tuple: FiveTuple, peer: &str, payload: &[u8]) -> Option<SocketAddr> {
        let txid = self.txid();
        let m = Builder::new(stun::msg_type(stun::SEND, stun::INDICATION), &txid)
            .xor_addr(stun::XOR_PEER_ADDRESS, addr(peer))
            .attr(stun::DATA_ATTR, payload)
            .fingerprint()
            .finish();
        let r = self.core.handle_client(self.now, tuple, &m).map(|p| {
            assert_eq!(p.data, payload);
            p.peer
        });
        assert!(self.outputs().is_empty(), "indications get no answer");
        r
    }
    fn channel_data(&mut self, tuple: FiveTuple, ch: u16, payload: &[u8]) -> Option<SocketAddr> {
        let mut m = ch.to_be_bytes().to_vec();
        m.extend_from_slice(&(payload.len() as u16).to_be_bytes());
        m.extend_from_slice(payload);
        self.core.handle_client(self.now, tuple, &m).map(|p| {
            assert_eq!(p.data, payload);
            p.peer
        })
    }
    /// A peer sends `payload` to the relayed address of `tuple`'s allocation: the framed bytes for the
    /// client, if relayed.
    fn peer_sends(&mut self, tuple: FiveTuple, peer: &str, payload: &[u8]) -> Option<Vec<u8>> {
        let alloc = self.core.allocation_of(&tuple)?;
        let mut buf = vec![0xEEu8; PEER_HEADROOM + payload.len() + PEER_TAILROOM];
        buf[PEER_HEADROOM..PEER_HEADROOM + payload.len()].copy_from_slice(payload);
        let (t, range) = self.core.handle_peer(self.now, alloc, addr(peer), &mut buf, PEER_HEADROOM, payload.len())?;
        assert_eq!(t, tuple);
        Some(buf[range].to_vec())
    }
}

fn build_with(txid: [u8; 12], method: u16, auth: Option<(&Creds, &str)>, f: impl FnOnce(&mut Builder)) -> Vec<u8> {
    let mut b = Builder::new(stun::msg_type(method, stun::REQUEST), &txid);
    f(&mut b);
    if let Some((c, nonce)) = auth {
        b.attr(stun::USERNAME, c.username.as_bytes()).attr(stun::REALM, b"webcall").attr(stun::NONCE, nonce.as_bytes());
        b.integrity(&auth::long_term_key(&c.username, "webcall", &c.password));
    }
    b.fingerprint();
    b.finish()
}

const PEER: &str = "203.0.113.5:7000";
const PEER2: &str = "203.0.113.6:7000";

#[test]
fn binding_returns_mapped_address() {
    let mut h = H::default();
    let t = udp("198.51.100.1:5000");
    let req = h.build(stun::BINDING, None, |_| {});
    let r = h.request(t, &req);
    assert_eq!((r.class, r.method), (stun::SUCCESS, stun::BINDING));
    assert_eq!(r.msg().get_xor_addr(stun::XOR_MAPPED_ADDRESS), Some(t.client));
    assert!(r.msg().fingerprint_ok());
}

#[test]
fn allocation_lifecycle_refresh_expiry_delete() {
    let mut h = H::default();
    let t = udp("198.51.100.1:5000");
    let c = h.creds("alice", 3600);
    let (nonce, relayed) = h.allocate(t, &c);
    assert_eq!(relayed, addr("192.0.2.10:50001"));
    assert_eq!(h.core.stats().allocations, 1);
    // Lifetime rules: absent -> default; above max -> max; below default -> default.
    assert_eq!(h.refresh(t, &c, &nonce, None).lifetime(), 600);
    assert_eq!(h.refresh(t, &c, &nonce, Some(100_000)).lifetime(), 3600);
    assert_eq!(h.refresh(t, &c, &nonce, Some(30)).lifetime(), 600);
    // Expires exactly at its lifetime; nothing but time passes.
    h.advance(599);
    assert_eq!(h.core.stats().allocations, 1);
    assert!(h.outputs().is_empty());
    h.advance(1);
    assert_eq!(h.core.stats().allocations, 0);
    assert!(matches!(h.outputs()[..], [Output::CloseRelay { .. }]));
    let r = h.refresh(t, &c, &h.core.nonce(h.now, t.client.ip()), None);
    assert_eq!(r.code, Some(437));
    // A new allocation, deleted with lifetime 0.
    let (nonce, _) = h.allocate(t, &c);
    let alloc = h.core.allocation_of(&t).unwrap();
    let r = h.refresh(t, &c, &nonce, Some(0));
    assert_eq!((r.class, r.lifetime()), (stun::SUCCESS, 0));
    assert_eq!(h.core.stats().allocations, 0);
    assert!(h.core.relayed_addr(alloc).is_none());
    assert_eq!(h.refresh(t, &c, &nonce, Some(0)).code, Some(437));
}

#[test]
fn allocate_lifetime_and_mismatch_rules() {
    let mut h = H::default();
    let t = udp("198.51.100.1:5000");
    let c = h.creds("alice", 3600);
    let first = h.build(stun::ALLOCATE, None, |b| {
        b.u32(stun::REQUESTED_TRANSPORT, 17 << 24);
    });
    let nonce = h.request(t, &first).nonce();
    let req = h.build(stun::ALLOCATE, Some((&c, &nonce)), |b| {
        b.u32(stun::REQUESTED_TRANSPORT, 17 << 24).u32(stun::LIFETIME, 1800);
    });
    let r = h.request(t, &req);
    assert_eq!(r.lifetime(), 1800);
    // A retransmission gets the identical answer and no second allocation.
    let again = h.request(t, &req);
    assert_eq!(again.bytes, r.bytes);
    assert_eq!(h.core.stats().allocations, 1);
    // A new Allocate on the same 5-tuple is a mismatch.
    let req = h.build(stun::ALLOCATE, Some((&c, &nonce)), |b| {
        b.u32(stun::REQUESTED_TRANSPORT, 17 << 24);
    });
    assert_eq!(h.request(t, &req).code, Some(437));
    // TCP relaying is not offered; a missing REQUESTED-TRANSPORT is malformed.
    let t2 = udp("198.51.100.1:5001");
    let req = h.build(stun::ALLOCATE, Some((&c, &nonce)), |b| {
        b.u32(stun::REQUESTED_TRANSPORT, 6 << 24);
    });
    assert_eq!(h.request(t2, &req).code, Some(442));
    let req = h.build(stun::ALLOCATE, Some((&c, &nonce)), |_| {});
    assert_eq!(h.request(t2, &req).code, Some(400));
    // Unknown comprehension-required attribute -> 420 naming it.
    let req = h.build(stun::ALLOCATE, Some((&c, &nonce)), |b| {
        b.u32(stun::REQUESTED_TRANSPORT, 17 << 24).attr(0x0010, &[0, 0, 0, 1]);
    });
    let r = h.request(t2, &req);
    assert_eq!(r.code, Some(420));
    assert_eq!(r.msg().get(stun::UNKNOWN_ATTRIBUTES), Some(&[0x00, 0x10][..]));
    assert_eq!(h.core.stats().allocations, 1);
    // DONT-FRAGMENT is understood: the relay socket is to send with DF set.
    let t3 = udp("198.51.100.1:5002");
    let req = h.build(stun::ALLOCATE, Some((&c, &nonce)), |b| {
        b.u32(stun::REQUESTED_TRANSPORT, 17 << 24).attr(stun::DONT_FRAGMENT, &[]);
    });
    assert!(h.core.handle_client(h.now, t3, &req).is_none());
    let Some(Output::OpenRelay { alloc, dont_fragment: true, .. }) = h.core.poll_output() else { panic!() };
    h.core.relay_opened(h.now, alloc, Some(addr("192.0.2.10:50100")));
    let out = h.outputs();
    assert!(matches!(&out[..], [Output::Transmit { .. }]), "{out:?}");
    let Output::Transmit { data, .. } = &out[0] else { unreachable!() };
    assert_eq!(Msg::parse(data).unwrap().class(), stun::SUCCESS);
    h.core.client_closed(h.now, t3);
    h.outputs();
    // EVEN-PORT is passed on to the I/O layer.
    let req = h.build(stun::ALLOCATE, Some((&c, &nonce)), |b| {
        b.u32(stun::REQUESTED_TRANSPORT, 17 << 24).attr(stun::EVEN_PORT, &[0x80]);
    });
    assert!(h.core.handle_client(h.now, t2, &req).is_none());
    assert!(matches!(
        h.core.poll_output(),
        Some(Output::OpenRelay { port: RelayPort::Even { reserve_next: true }, .. })
    ));
}

#[test]
fn even_port_reservation_token() {
    let mut h = H::default();
    let c = h.creds("alice", 3600);
    let (nonce, _) = h.allocate(udp("198.51.100.1:1"), &c);
    let alloc = |h: &mut H, port: u16, f: &dyn Fn(&mut Builder)| {
        let req = h.build(stun::ALLOCATE, Some((&c, &nonce)), |b| {
            b.u32(stun::REQUESTED_TRANSPORT, 17 << 24);
            f(b)
        });
        h.request(udp(&format!("198.51.100.1:{port}")), &req)
    };
    // EVEN-PORT with R: an even relayed port and a token for the port above it.
    let r = alloc(&mut h, 2, &|b| {
        b.attr(stun::EVEN_PORT, &[0x80]);
    });
    let rtp = r.msg().get_xor_addr(stun::XOR_RELAYED_ADDRESS).unwrap();
    assert_eq!(rtp.port() % 2, 0);
    let token = r.msg().get(stun::RESERVATION_TOKEN).expect("RESERVATION-TOKEN").to_vec();
    // The token gets exactly that port, once.
    let r = alloc(&mut h, 3, &|b| {
        b.attr(stun::RESERVATION_TOKEN, &token);
    });
    assert_eq!(r.msg().get_xor_addr(stun::XOR_RELAYED_ADDRESS).unwrap().port(), rtp.port() + 1);
    assert_eq!(
        alloc(&mut h, 4, &|b| {
            b.attr(stun::RESERVATION_TOKEN, &token);
        })
        .code,
        Some(508)
    );
    // Without R: even port, no token. With a token and EVEN-PORT together: 400.
    let r = alloc(&mut h, 5, &|b| {
        b.attr(stun::EVEN_PORT, &[0]);
    });
    assert!(r.msg().get(stun::RESERVATION_TOKEN).is_none());
    assert_eq!(r.msg().get_xor_addr(stun::XOR_RELAYED_ADDRESS).unwrap().port() % 2, 0);
    assert_eq!(
        alloc(&mut h, 6, &|b| {
            b.attr(stun::EVEN_PORT, &[0]).attr(stun::RESERVATION_TOKEN, &token);
        })
        .code,
        Some(400)
    );
    // An unclaimed reservation is released after its lifetime; the token is then refused.
    let r = alloc(&mut h, 7, &|b| {
        b.attr(stun::EVEN_PORT, &[0x80]);
    });
    let token = r.msg().get(stun::RESERVATION_TOKEN).unwrap().to_vec();
    let held = r.msg().get_xor_addr(stun::XOR_RELAYED_ADDRESS).unwrap().port() + 1;
    h.advance(60);
    assert!(h.outputs().contains(&Output::ReleaseReserved { port: held }));
    let nonce = h.core.nonce(h.now, "198.51.100.1".parse().unwrap());
    let req = h.build(stun::ALLOCATE, Some((&c, &nonce)), |b| {
        b.u32(stun::REQUESTED_TRANSPORT, 17 << 24).attr(stun::RESERVATION_TOKEN, &token);
    });
    assert_eq!(h.request(udp("198.51.100.1:8"), &req).code, Some(508));
}

#[test]
fn bad_and_expired_credentials_are_refused() {
    let mut h = H::default();
    let t = udp("198.51.100.1:5000");
    let first = h.build(stun::ALLOCATE, None, |b| {
        b.u32(stun::REQUESTED_TRANSPORT, 17 << 24);
    });
    let nonce = h.request(t, &first).nonce();
    let alloc = |h: &mut H, c: &Creds| {
        let req = h.build(stun::ALLOCATE, Some((c, &nonce)), |b| {
            b.u32(stun::REQUESTED_TRANSPORT, 17 << 24);
        });
        h.request(t, &req)
    };
    // Wrong password.
    let mut c = h.creds("alice", 3600);
    c.password = auth::rest_password(b"not the secret", &c.username);
    let r = alloc(&mut h, &c);
    assert_eq!(r.code, Some(401));
    assert!(r.msg().get(stun::NONCE).is_some() && r.msg().get(stun::REALM).is_some());
    // Expired (correctly signed) credentials.
    let c = h.creds("alice", -1);
    assert_eq!(alloc(&mut h, &c).code, Some(401));
    // Not a TURN REST username.
    let username = "alice".to_string();
    let c = Creds { password: auth::rest_password(SECRET, &username), username };
    assert_eq!(alloc(&mut h, &c).code, Some(401));
    assert_eq!(h.core.stats().allocations, 0);
    // Valid now, but the credentials expire while the allocation lives: it may still be refreshed with
    // them (a call outlives its credentials), but they open no new allocation.
    let c = h.creds("alice", 100);
    let r = alloc(&mut h, &c);
    assert_eq!(r.class, stun::SUCCESS);
    h.advance(100);
    let nonce = h.core.nonce(h.now, t.client.ip());
    assert_eq!(h.refresh(t, &c, &nonce, None).class, stun::SUCCESS);
    assert_eq!(h.perm(t, &c, &nonce, PEER).class, stun::SUCCESS);
    let t2 = udp("198.51.100.1:5001");
    let req = h.build(stun::ALLOCATE, Some((&c, &nonce)), |b| {
        b.u32(stun::REQUESTED_TRANSPORT, 17 << 24);
    });
    assert_eq!(h.request(t2, &req).code, Some(401));
    // Someone else's valid credentials on this allocation: 441.
    let bob = h.creds("bob", 3600);
    let r = h.refresh(t, &bob, &nonce, None);
    assert_eq!(r.code, Some(441));
    let key = auth::long_term_key(&bob.username, "webcall", &bob.password);
    assert_eq!(r.msg().check_integrity(&key), Some(true), "authenticated errors carry MESSAGE-INTEGRITY");
    // Missing MESSAGE-INTEGRITY but USERNAME present -> 401; MI without USERNAME -> 400.
    let req = h.build(stun::REFRESH, None, |b| {
        b.attr(stun::USERNAME, b"x");
    });
    assert_eq!(h.request(t, &req).code, Some(401));
    let req = h.build(stun::REFRESH, None, |b| {
        b.integrity(b"k");
    });
    assert_eq!(h.request(t, &req).code, Some(400));
}

#[test]
fn stale_and_forged_nonces_get_438() {
    let mut h = H::default();
    let t = udp("198.51.100.1:5000");
    let c = h.creds("alice", 7200);
    let (nonce, _) = h.allocate(t, &c);
    h.advance(599);
    assert_eq!(h.refresh(t, &c, &nonce, None).class, stun::SUCCESS);
    h.advance(1);
    let r = h.refresh(t, &c, &nonce, None);
    assert_eq!(r.code, Some(438));
    let fresh = r.nonce();
    assert_ne!(fresh, nonce);
    assert_eq!(h.refresh(t, &c, &fresh, None).class, stun::SUCCESS);
    // A forged nonce (changed timestamp) and a nonce issued to another client address are refused.
    let (cookie, rest) = fresh.split_at("obMatJos2gAAA".len());
    let forged = format!("{cookie}{:016x}{}", u64::from_str_radix(&rest[..16], 16).unwrap() + 1, &rest[16..]);
    assert_eq!(h.refresh(t, &c, &forged, None).code, Some(438));
    let other = h.core.nonce(h.now, addr("198.51.100.2:1").ip());
    assert_eq!(h.refresh(t, &c, &other, None).code, Some(438));
}

#[test]
fn permissions_gate_both_directions_and_expire_after_300s() {
    let mut h = H::default();
    let t = udp("198.51.100.1:5000");
    let c = h.creds("alice", 7200);
    let (nonce, _) = h.allocate(t, &c);
    // No permission yet: nothing passes either way.
    assert_eq!(h.send_ind(t, PEER, b"hi"), None);
    assert_eq!(h.peer_sends(t, PEER, b"hello"), None);
    assert_eq!(h.perm(t, &c, &nonce, PEER).class, stun::SUCCESS);
    assert_eq!(h.send_ind(t, PEER, b"hi"), Some(addr(PEER)));
    // Permissions are per IP: another port of the same peer IP may send too.
    let framed = h.peer_sends(t, "203.0.113.5:9999", b"hello").unwrap();
    let m = Msg::parse(&framed).unwrap();
    assert_eq!((m.method(), m.class()), (stun::DATA, stun::INDICATION));
    assert_eq!(m.get_xor_addr(stun::XOR_PEER_ADDRESS), Some(addr("203.0.113.5:9999")));
    assert_eq!(m.get(stun::DATA_ATTR), Some(&b"hello"[..]));
    assert_eq!(framed.len() % 4, 0, "padded");
    // Another IP has none.
    assert_eq!(h.peer_sends(t, PEER2, b"x"), None);
    // Refreshed at 200 s, it lasts until 500 s.
    h.advance(200);
    assert_eq!(h.perm(t, &c, &nonce, PEER).class, stun::SUCCESS);
    h.advance(299);
    assert!(h.send_ind(t, PEER, b"hi").is_some());
    h.advance(1);
    assert_eq!(h.send_ind(t, PEER, b"hi"), None);
    assert_eq!(h.peer_sends(t, PEER, b"late"), None);
    // IPv6 data indications work too (IPv6 allocation).
}

#[test]
fn channel_binding_rules() {
    let mut h = H::default();
    let t = udp("198.51.100.1:5000");
    let c = h.creds("alice", 7200);
    let (nonce, _) = h.allocate(t, &c);
    assert_eq!(h.refresh(t, &c, &nonce, Some(3600)).lifetime(), 3600);
    assert_eq!(h.bind(t, &c, &nonce, 0x3FFF, PEER).code, Some(400));
    assert_eq!(h.bind(t, &c, &nonce, 0x8000, PEER).code, Some(400));
    assert_eq!(h.bind(t, &c, &nonce, 0x4000, PEER).class, stun::SUCCESS);
    assert_eq!(h.bind(t, &c, &nonce, 0x4FFF, PEER2).class, stun::SUCCESS);
    // ChannelData goes to the bound peer; unbound channel numbers are dropped.
    assert_eq!(h.channel_data(t, 0x4000, b"abc"), Some(addr(PEER)));
    assert_eq!(h.channel_data(t, 0x4FFF, b"abc"), Some(addr(PEER2)));
    assert_eq!(h.channel_data(t, 0x4001, b"abc"), None);
    // Truncated ChannelData is dropped.
    assert!(h.core.handle_client(h.now, t, &[0x40, 0x00, 0x00, 0x10, 1, 2]).is_none());
    // Peer data on a bound channel arrives as ChannelData (unpadded over UDP).
    assert_eq!(h.peer_sends(t, PEER, b"hello").unwrap(), [&[0x40, 0x00, 0x00, 0x05][..], b"hello"].concat());
    // ...but from another port of that IP, as a Data indication (the binding is per transport address).
    let framed = h.peer_sends(t, "203.0.113.5:1", b"x").unwrap();
    assert_eq!(Msg::parse(&framed).unwrap().method(), stun::DATA);
    // Rebinding rules: same channel, other peer -> 400; same peer, other channel -> 400; same pair refreshes.
    assert_eq!(h.bind(t, &c, &nonce, 0x4000, PEER2).code, Some(400));
    assert_eq!(h.bind(t, &c, &nonce, 0x4001, PEER).code, Some(400));
    h.advance(500);
    assert_eq!(h.bind(t, &c, &nonce, 0x4000, PEER).class, stun::SUCCESS);
    // PEER2's channel (bound at 0) expires at 600 s even though its permission is kept alive.
    assert_eq!(h.perm(t, &c, &nonce, PEER2).class, stun::SUCCESS);
    h.advance(100);
    let nonce = h.core.nonce(h.now, t.client.ip());
    assert_eq!(h.channel_data(t, 0x4FFF, b"abc"), None);
    assert_eq!(h.channel_data(t, 0x4000, b"abc"), Some(addr(PEER)), "refreshed at 500 s");
    // Peer data from PEER2 now comes as a Data indication.
    assert_eq!(Msg::parse(&h.peer_sends(t, PEER2, b"x").unwrap()).unwrap().method(), stun::DATA);
    // For 5 minutes after expiry neither the number nor the peer may be rebound differently...
    assert_eq!(h.bind(t, &c, &nonce, 0x4FFF, "203.0.113.7:1").code, Some(400));
    assert_eq!(h.bind(t, &c, &nonce, 0x4FFE, PEER2).code, Some(400));
    // ...but the same binding may be renewed.
    assert_eq!(h.bind(t, &c, &nonce, 0x4FFF, PEER2).class, stun::SUCCESS);
    assert_eq!(h.channel_data(t, 0x4FFF, b"abc"), Some(addr(PEER2)));
    // The channel 0x4000 (refreshed at 500 s) expires at 1100 s, then cools down until 1400 s.
    h.advance(500);
    let nonce = h.core.nonce(h.now, t.client.ip());
    assert_eq!(h.perm(t, &c, &nonce, PEER).class, stun::SUCCESS);
    assert_eq!(h.channel_data(t, 0x4000, b"abc"), None);
    assert_eq!(h.bind(t, &c, &nonce, 0x4000, "203.0.113.7:1").code, Some(400));
    h.advance(300);
    let nonce = h.core.nonce(h.now, t.client.ip());
    assert_eq!(h.bind(t, &c, &nonce, 0x4000, "203.0.113.7:1").class, stun::SUCCESS);
    assert_eq!(h.channel_data(t, 0x4000, b"abc"), Some(addr("203.0.113.7:1")));
}

#[test]
fn rfc5766_channel_numbers_are_accepted() {
    let mut h = H::default();
    let t = udp("198.51.100.1:5000");
    let c = h.creds("alice", 7200);
    let (nonce, _) = h.allocate(t, &c);
    assert_eq!(h.bind(t, &c, &nonce, 0x7FFF, PEER).class, stun::SUCCESS);
    assert_eq!(h.channel_data(t, 0x7FFF, b"abc"), Some(addr(PEER)));
    assert_eq!(h.bind(t, &c, &nonce, 0x8000, PEER2).code, Some(400));
}

#[test]
fn channel_data_over_tcp_is_padded() {
    let mut h = H::default();
    let t = FiveTuple { transport: Transport::Tcp, ..udp("198.51.100.1:5000") };
    let c = h.creds("alice", 7200);
    let (nonce, _) = h.allocate(t, &c);
    assert_eq!(h.bind(t, &c, &nonce, 0x4000, PEER).class, stun::SUCCESS);
    let framed = h.peer_sends(t, PEER, b"hello").unwrap();
    assert_eq!(framed, [&[0x40, 0x00, 0x00, 0x05][..], b"hello", &[0, 0, 0]].concat());
    assert_eq!(stream_frame_len(&framed), Ok(Some(12)));
    assert_eq!(stream_frame_len(&framed[..11]), Ok(None));
    assert_eq!(stream_frame_len(&[0xFF, 0, 0, 0]), Err(NotTurn));
    // Closing the connection removes the allocation.
    h.core.client_closed(h.now, t);
    assert_eq!(h.core.stats().allocations, 0);
    assert!(matches!(h.outputs()[..], [Output::CloseRelay { .. }]));
}

#[test]
fn quotas_per_user_and_total() {
    let mut h = H::new(CoreConfig { user_quota: 2, total_quota: 3, ..CoreConfig::default() });
    let alice = h.creds("alice", 3600);
    let alice2 = h.creds("alice", 3000); // other expiry, same user
    let bob = h.creds("bob", 3600);
    let carol = h.creds("carol", 3600);
    let (nonce, _) = h.allocate(udp("198.51.100.1:1"), &alice);
    h.allocate(udp("198.51.100.1:2"), &alice2);
    let try_alloc = |h: &mut H, port: u16, c: &Creds| {
        let req = h.build(stun::ALLOCATE, Some((c, &nonce)), |b| {
            b.u32(stun::REQUESTED_TRANSPORT, 17 << 24);
        });
        h.request(udp(&format!("198.51.100.1:{port}")), &req)
    };
    assert_eq!(try_alloc(&mut h, 3, &alice).code, Some(486));
    assert_eq!(try_alloc(&mut h, 4, &bob).class, stun::SUCCESS);
    assert_eq!(try_alloc(&mut h, 5, &carol).code, Some(486), "server total reached");
    // Freeing one of alice's makes room for both quotas.
    h.refresh(udp("198.51.100.1:1"), &alice, &nonce, Some(0));
    assert_eq!(try_alloc(&mut h, 6, &alice).class, stun::SUCCESS);
    assert_eq!(h.core.stats().allocations, 3);
}

#[test]
fn quota_per_client_ip_counts_live_allocations() {
    let mut h = H::new(CoreConfig { ip_quota: 2, ..CoreConfig::default() });
    // Other users' credentials do not help: the limit is per address.
    let (alice, bob, carol) = (h.creds("alice", 7200), h.creds("bob", 7200), h.creds("carol", 7200));
    let (nonce, _) = h.allocate(udp("198.51.100.1:1"), &alice);
    h.allocate(udp("198.51.100.1:2"), &bob);
    let try_alloc = |h: &mut H, client: &str, c: &Creds| {
        let req = h.build(stun::ALLOCATE, Some((c, &nonce)), |b| {
            b.u32(stun::REQUESTED_TRANSPORT, 17 << 24);
        });
        h.request(udp(client), &req)
    };
    let r = try_alloc(&mut h, "198.51.100.1:3", &carol);
    assert_eq!(r.code, Some(486), "{r:?}");
    let reason = String::from_utf8_lossy(&r.msg().get(stun::ERROR_CODE).unwrap()[4..]).into_owned();
    assert!(reason.contains("address"), "{reason}");
    // The same host over IPv6-mapped IPv4 is the same address; another host is not limited.
    let mapped = udp("[::ffff:198.51.100.1]:4");
    let r = h.build(stun::ALLOCATE, None, |b| {
        b.u32(stun::REQUESTED_TRANSPORT, 17 << 24);
    });
    let mapped_nonce = h.request(mapped, &r).nonce();
    assert_eq!(alloc_on(&mut h, mapped, &carol, &mapped_nonce).code, Some(486));
    let (_, _) = h.allocate(udp("198.51.100.2:1"), &carol);
    // A deleted allocation frees its slot.
    assert_eq!(h.refresh(udp("198.51.100.1:2"), &bob, &nonce, Some(0)).lifetime(), 0);
    assert_eq!(try_alloc(&mut h, "198.51.100.1:5", &carol).class, stun::SUCCESS);
    assert_eq!(try_alloc(&mut h, "198.51.100.1:6", &bob).code, Some(486));
    // Expired allocations free theirs: keep only :5 alive, let :1 run out (600 s default lifetime).
    h.advance(300);
    let fresh = h.refresh(udp("198.51.100.1:5"), &carol, &nonce, None);
    assert_eq!(fresh.class, stun::SUCCESS, "{fresh:?}");
    h.advance(301);
    assert_eq!(h.core.allocation_of(&udp("198.51.100.1:1")), None);
    let r = h.build(stun::ALLOCATE, None, |b| {
        b.u32(stun::REQUESTED_TRANSPORT, 17 << 24);
    });
    let nonce = h.request(udp("198.51.100.1:7"), &r).nonce();
    let req = h.build(stun::ALLOCATE, Some((&bob, &nonce)), |b| {
        b.u32(stun::REQUESTED_TRANSPORT, 17 << 24);
    });
    assert_eq!(h.request(udp("198.51.100.1:7"), &req).class, stun::SUCCESS);
    // :5 and :7 (198.51.100.2's expired as well).
    assert_eq!(h.core.stats().allocations, 2);
    // A closed TCP connection frees its slot too.
    let tcp = FiveTuple { transport: Transport::Tcp, ..udp("198.51.100.1:7") };
    assert_eq!(alloc_on(&mut h, tcp, &bob, &nonce).code, Some(486));
    h.refresh(udp("198.51.100.1:7"), &bob, &nonce, Some(0));
    assert_eq!(alloc_on(&mut h, tcp, &bob, &nonce).class, stun::SUCCESS);
    h.core.client_closed(h.now, tcp);
    h.core.check_invariants();
    assert_eq!(h.core.stats().allocations, 1);
    assert_eq!(alloc_on(&mut h, udp("198.51.100.1:8"), &bob, &nonce).class, stun::SUCCESS);
}

fn alloc_on(h: &mut H, t: FiveTuple, c: &Creds, nonce: &str) -> Resp {
    let req = h.build(stun::ALLOCATE, Some((c, nonce)), |b| {
        b.u32(stun::REQUESTED_TRANSPORT, 17 << 24);
    });
    h.request(t, &req)
}

#[test]
fn special_peer_addresses_are_denied_unless_allowed() {
    for (allow, expect_loopback) in [(vec![], 403), (vec!["127.0.0.0/8".parse().unwrap()], 200)] {
        let mut h = H::new(CoreConfig { allow_peers: allow, ..CoreConfig::default() });
        let t = udp("198.51.100.1:5000");
        let c = h.creds("alice", 3600);
        let (nonce, _) = h.allocate(t, &c);
        for denied in
            ["10.1.2.3:1", "172.16.0.1:1", "192.168.1.1:1", "169.254.1.1:1", "224.0.0.1:1", "0.0.0.0:1", "100.64.0.1:1"]
        {
            assert_eq!(h.perm(t, &c, &nonce, denied).code, Some(403), "{denied}");
            assert_eq!(h.bind(t, &c, &nonce, 0x4000, denied).code, Some(403), "{denied}");
        }
        let r = h.perm(t, &c, &nonce, "127.0.0.1:9");
        assert_eq!(r.code.unwrap_or(200), expect_loopback);
        // One denied address fails the whole request.
        let r = h.simple(t, stun::CREATE_PERMISSION, &c, &nonce, |b| {
            b.xor_addr(stun::XOR_PEER_ADDRESS, addr(PEER2)).xor_addr(stun::XOR_PEER_ADDRESS, addr("10.0.0.1:1"));
        });
        assert_eq!(r.code, Some(403));
        assert_eq!(h.send_ind(t, PEER2, b"x"), None);
        // IPv6 peers on an IPv4 allocation.
        assert_eq!(h.perm(t, &c, &nonce, "[2001:db8::1]:1").code, Some(443));
    }
    let none = [];
    for ip in [
        "::1",
        "fe80::1",
        "fc00::1",
        "ff02::1",
        "::ffff:127.0.0.1",
        "::ffff:10.0.0.1",
        "2002:7f00:1::1",
        "64:ff9b::a00:1",
        "255.255.255.255",
    ] {
        assert!(!peer_allowed(ip.parse().unwrap(), &none), "{ip}");
    }
    for ip in ["203.0.113.5", "8.8.8.8", "2001:db8::1"] {
        assert!(peer_allowed(ip.parse().unwrap(), &none), "{ip}");
    }
    assert!(peer_allowed("::ffff:127.0.0.1".parse().unwrap(), &["127.0.0.0/8".parse().unwrap()]));
}

#[test]
fn relay_port_exhaustion_is_508() {
    let mut h = H::default();
    let t = udp("198.51.100.1:5000");
    let c = h.creds("alice", 3600);
    let first = h.build(stun::ALLOCATE, None, |b| {
        b.u32(stun::REQUESTED_TRANSPORT, 17 << 24);
    });
    let nonce = h.request(t, &first).nonce();
    let req = h.build(stun::ALLOCATE, Some((&c, &nonce)), |b| {
        b.u32(stun::REQUESTED_TRANSPORT, 17 << 24);
    });
    assert!(h.core.handle_client(h.now, t, &req).is_none());
    let Some(Output::OpenRelay { alloc, .. }) = h.core.poll_output() else { panic!("expected OpenRelay") };
    h.core.relay_opened(h.now, alloc, None);
    let out = h.outputs();
    let Output::Transmit { data, .. } = &out[0] else { panic!("{out:?}") };
    assert_eq!(Msg::parse(data).unwrap().get(stun::ERROR_CODE).map(|v| v[2] as u16 * 100 + v[3] as u16), Some(508));
    assert_eq!(h.core.stats().allocations, 0);
}

#[test]
fn external_ip_is_advertised_and_ipv6_data_indications() {
    let mut h = H::new(CoreConfig { external_ip: Some("198.18.0.1".parse().unwrap()), ..CoreConfig::default() });
    let t = udp("198.51.100.1:5000");
    let c = h.creds("alice", 3600);
    let (_, relayed) = h.allocate(t, &c);
    assert_eq!(relayed, addr("198.18.0.1:50001"));

    // IPv6 allocation: the Data indication carries a 20-byte XOR-PEER-ADDRESS and fits the headroom.
    let mut h = H::default();
    let t = udp("198.51.100.1:5000");
    let first = h.build(stun::ALLOCATE, None, |b| {
        b.u32(stun::REQUESTED_TRANSPORT, 17 << 24);
    });
    let nonce = h.request(t, &first).nonce();
    let req = h.build(stun::ALLOCATE, Some((&c, &nonce)), |b| {
        b.u32(stun::REQUESTED_TRANSPORT, 17 << 24).attr(stun::REQUESTED_ADDRESS_FAMILY, &[2, 0, 0, 0]);
    });
    assert!(h.core.handle_client(h.now, t, &req).is_none());
    let Some(Output::OpenRelay { alloc, family: Family::V6, .. }) = h.core.poll_output() else { panic!() };
    h.core.relay_opened(h.now, alloc, Some(addr("[2001:db8::10]:50000")));
    h.outputs();
    let peer = "[2001:db8::5]:7000";
    assert_eq!(h.perm(t, &c, &nonce, peer).class, stun::SUCCESS);
    assert_eq!(h.perm(t, &c, &nonce, PEER).code, Some(443));
    let framed = h.peer_sends(t, peer, b"abcde").unwrap();
    let m = Msg::parse(&framed).unwrap();
    assert_eq!(m.get_xor_addr(stun::XOR_PEER_ADDRESS), Some(addr(peer)));
    assert_eq!(m.get(stun::DATA_ATTR), Some(&b"abcde"[..]));
    assert_eq!(h.send_ind(t, peer, b"v6"), Some(addr(peer)));
}

#[test]
fn garbage_is_ignored() {
    let mut h = H::default();
    let t = udp("198.51.100.1:5000");
    for g in [&[][..], &[0x00, 0x01], &[0xFF; 40], &[0x80; 20]] {
        assert!(h.core.handle_client(h.now, t, g).is_none());
    }
    // A response or an unknown indication from a client is ignored too.
    let mut m = build_with([9; 12], stun::BINDING, None, |_| {});
    m[0..2].copy_from_slice(&stun::msg_type(stun::BINDING, stun::SUCCESS).to_be_bytes());
    assert!(h.core.handle_client(h.now, t, &m).is_none());
    assert!(h.outputs().is_empty());
    // A bad FINGERPRINT makes the request vanish.
    let mut m = build_with([9; 12], stun::BINDING, None, |_| {});
    let n = m.len();
    m[n - 1] ^= 1;
    assert!(h.core.handle_client(h.now, t, &m).is_none());
    assert!(h.outputs().is_empty());
    let _ = SystemTime::now();
}

/// RFC 8489 §9.2: the 401 offers PASSWORD-ALGORITHMS (SHA-256, MD5) with the nonce cookie; a client that
/// picks SHA-256 signs with MESSAGE-INTEGRITY-SHA256 and the SHA-256 key, and gets answers signed the same way.
#[test]
fn sha256_message_integrity_when_the_client_picks_it() {
    let mut h = H::default();
    let t = udp("198.51.100.1:5000");
    let c = h.creds("alice", 3600);
    let first = h.build(stun::ALLOCATE, None, |b| {
        b.u32(stun::REQUESTED_TRANSPORT, 17 << 24);
    });
    let r = h.request(t, &first);
    assert_eq!(r.code, Some(401));
    let offer = r.msg().get(stun::PASSWORD_ALGORITHMS).expect("PASSWORD-ALGORITHMS").to_vec();
    assert_eq!(offer, [0, 2, 0, 0, 0, 1, 0, 0]);
    let nonce = r.nonce();
    assert!(nonce.starts_with("obMatJos2"), "{nonce}");
    let key = auth::long_term_key_sha256(&c.username, "webcall", &c.password);
    let signed = |h: &mut H, algs: &[u8], alg: u16, realm: &[u8], f: &dyn Fn(&mut Builder)| {
        let txid = h.txid();
        let mut b = Builder::new(stun::msg_type(stun::ALLOCATE, stun::REQUEST), &txid);
        b.u32(stun::REQUESTED_TRANSPORT, 17 << 24);
        f(&mut b);
        b.attr(stun::USERNAME, c.username.as_bytes()).attr(stun::REALM, realm).attr(stun::NONCE, nonce.as_bytes());
        b.attr(stun::PASSWORD_ALGORITHMS, algs).attr(stun::PASSWORD_ALGORITHM, &[0, alg as u8, 0, 0]);
        b.integrity_sha256(&key);
        b.fingerprint();
        b.finish()
    };
    // A downgraded list (MD5 only) is refused; so is a mismatched REALM.
    let req = signed(&mut h, &[0, 1, 0, 0], 2, b"webcall", &|_| {});
    assert_eq!(h.request(t, &req).code, Some(400));
    let req = signed(&mut h, &offer, 2, b"other", &|_| {});
    assert_eq!(h.request(t, &req).code, Some(401));
    let req = signed(&mut h, &offer, 2, b"webcall", &|_| {});
    let r = h.request(t, &req);
    assert_eq!((r.class, r.code), (stun::SUCCESS, None), "{r:?}");
    assert_eq!(r.msg().check_integrity_sha256(&key), Some(true));
    assert_eq!(r.msg().check_integrity(&key), None, "signed like the request");
    // The classic MD5 key with MESSAGE-INTEGRITY still works, with or without the algorithm attributes.
    let c2 = h.creds("bob", 3600);
    let t2 = udp("198.51.100.1:5001");
    h.allocate(t2, &c2);
}

#[test]
fn mismatched_realm_is_refused() {
    let mut h = H::default();
    let t = udp("198.51.100.1:5000");
    let c = h.creds("alice", 3600);
    let first = h.build(stun::ALLOCATE, None, |b| {
        b.u32(stun::REQUESTED_TRANSPORT, 17 << 24);
    });
    let nonce = h.request(t, &first).nonce();
    let txid = h.txid();
    // Keyed with the configured realm, but naming another one.
    let mut b = Builder::new(stun::msg_type(stun::ALLOCATE, stun::REQUEST), &txid);
    b.u32(stun::REQUESTED_TRANSPORT, 17 << 24);
    b.attr(stun::USERNAME, c.username.as_bytes()).attr(stun::REALM, b"elsewhere").attr(stun::NONCE, nonce.as_bytes());
    b.integrity(&auth::long_term_key(&c.username, "webcall", &c.password));
    let r = h.request(t, &b.finish());
    assert_eq!(r.code, Some(401));
    assert_eq!(h.core.stats().allocations, 0);
}

/// Issue 19 item 4: the server's own addresses are no peers, except its relay ports (relay to relay).
#[test]
fn relaying_to_the_server_itself_is_refused_except_relay_ports() {
    let external: IpAddr = "198.18.0.1".parse().unwrap();
    let mut h = H::new(CoreConfig {
        external_ip: Some(external),
        own_ips: vec!["192.0.2.10".parse().unwrap()],
        turn_ports: vec![3478, 5349],
        relay_ports: crate::config::PortRange { min: 50000, max: 50100 },
        allow_peers: vec!["127.0.0.0/8".parse().unwrap()],
        ..CoreConfig::default()
    });
    let t = udp("198.51.100.1:5000");
    let c = h.creds("alice", 3600);
    let (nonce, _) = h.allocate(t, &c);
    // The permission (an IP) is fine: relay to relay needs it.
    assert_eq!(h.perm(t, &c, &nonce, "198.18.0.1:1").class, stun::SUCCESS);
    assert_eq!(h.perm(t, &c, &nonce, "192.0.2.10:1").class, stun::SUCCESS);
    for bad in ["198.18.0.1:5353", "198.18.0.1:3478", "192.0.2.10:22", "192.0.2.10:3478", "127.0.0.1:3478"] {
        assert_eq!(h.bind(t, &c, &nonce, 0x4001, bad).code, Some(403), "{bad}");
        h.perm(t, &c, &nonce, bad);
        assert_eq!(h.send_ind(t, bad, b"x"), None, "{bad}");
        assert_eq!(h.peer_sends(t, bad, b"x"), None, "{bad}");
    }
    // A port of the relay range that no allocation holds (another socket of the host may).
    assert_eq!(h.bind(t, &c, &nonce, 0x4002, "198.18.0.1:50077").code, Some(403));
    // Another client's relayed address on this server.
    let t2 = udp("198.51.100.2:5000");
    let (_, other) = h.allocate(t2, &h.creds("bob", 3600));
    assert_eq!(other.ip(), external);
    let other = other.to_string();
    assert_eq!(h.bind(t, &c, &nonce, 0x4002, &other).class, stun::SUCCESS);
    assert_eq!(h.send_ind(t, &other, b"x"), Some(addr(&other)));
    assert!(h.peer_sends(t, &other, b"x").is_some());
    // Loopback peers the operator allowed, on other ports.
    assert_eq!(h.perm(t, &c, &nonce, "127.0.0.1:7").class, stun::SUCCESS);
    assert_eq!(h.send_ind(t, "127.0.0.1:7", b"x"), Some(addr("127.0.0.1:7")));
}

#[test]
fn azure_platform_address_is_denied() {
    assert!(!peer_allowed("168.63.129.16".parse().unwrap(), &[]));
    assert!(peer_allowed("168.63.129.17".parse().unwrap(), &[]));
}
