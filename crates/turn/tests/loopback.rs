//! The tokio adapters end to end on loopback with a minimal client made from the crate's own codec
//! (runs without coturn installed).

use std::net::SocketAddr;
use std::time::{Duration, SystemTime};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use webcall_turn::stun::{self, Builder, Msg};
use webcall_turn::{long_term_key, IceMinter, TurnConfig, TurnError, TurnServer};

mod common;

const SECRET: &str = "loop-secret";

async fn start() -> webcall_turn::TurnHandle {
    common::start(SECRET, None, common::allow_loopback).await
}

/// Sends/receives whole TURN messages over UDP or TCP.
enum Conn {
    Udp(UdpSocket, SocketAddr),
    Tcp(TcpStream),
}

impl Conn {
    async fn send(&mut self, m: &[u8]) {
        match self {
            Conn::Udp(s, to) => {
                s.send_to(m, *to).await.unwrap();
            }
            Conn::Tcp(s) => s.write_all(m).await.unwrap(),
        }
    }
    async fn recv(&mut self) -> Vec<u8> {
        let fut = async {
            match self {
                Conn::Udp(s, _) => {
                    let mut b = vec![0u8; 2048];
                    let n = s.recv(&mut b).await.unwrap();
                    b.truncate(n);
                    b
                }
                Conn::Tcp(s) => {
                    let mut h = [0u8; 4];
                    s.read_exact(&mut h).await.unwrap();
                    let len = u16::from_be_bytes([h[2], h[3]]) as usize;
                    let body = if h[0] >> 6 == 1 { (len + 3) & !3 } else { len + 16 };
                    let mut b = vec![0u8; body];
                    s.read_exact(&mut b).await.unwrap();
                    [&h[..], &b].concat()
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(5), fut).await.expect("an answer within 5 s")
    }
}

struct Client {
    conn: Conn,
    username: String,
    key: [u8; 16],
    nonce: String,
    n: u8,
}

impl Client {
    fn req(&mut self, method: u16, f: impl FnOnce(&mut Builder)) -> Vec<u8> {
        self.n += 1;
        let mut b = Builder::new(stun::msg_type(method, stun::REQUEST), &[self.n; 12]);
        f(&mut b);
        b.attr(stun::USERNAME, self.username.as_bytes())
            .attr(stun::REALM, b"webcall")
            .attr(stun::NONCE, self.nonce.as_bytes())
            .integrity(&self.key);
        b.finish()
    }
    async fn call(&mut self, method: u16, f: impl FnOnce(&mut Builder)) -> Vec<u8> {
        let m = self.req(method, f);
        self.conn.send(&m).await;
        let r = self.conn.recv().await;
        let msg = Msg::parse(&r).unwrap();
        assert_eq!(msg.class(), stun::SUCCESS, "error {:?}", msg.get(stun::ERROR_CODE));
        assert_eq!(msg.check_integrity(&self.key), Some(true));
        r
    }
}

/// Allocate (with the 401 round trip), then returns the client and its relayed address.
async fn allocate(mut conn: Conn, minter: &IceMinter) -> (Client, SocketAddr) {
    let ice = minter.ice_servers_at("peer-x", SystemTime::now());
    let username = ice[1].username.clone().unwrap();
    let password = ice[1].credential.clone().unwrap();
    let first = Builder::new(stun::msg_type(stun::ALLOCATE, stun::REQUEST), &[0; 12])
        .u32(stun::REQUESTED_TRANSPORT, 17 << 24)
        .finish();
    conn.send(&first).await;
    let r = conn.recv().await;
    let m = Msg::parse(&r).unwrap();
    assert_eq!(m.get(stun::ERROR_CODE).map(|v| v[3]), Some(1), "401");
    let nonce = String::from_utf8(m.get(stun::NONCE).unwrap().to_vec()).unwrap();
    let key = long_term_key(&username, "webcall", &password);
    let mut c = Client { conn, username, key, nonce, n: 0 };
    let r = c
        .call(stun::ALLOCATE, |b| {
            b.u32(stun::REQUESTED_TRANSPORT, 17 << 24);
        })
        .await;
    let relayed = Msg::parse(&r).unwrap().get_xor_addr(stun::XOR_RELAYED_ADDRESS).unwrap();
    (c, relayed)
}

async fn relay_both_ways(conn: Conn, minter: &IceMinter) {
    let (mut c, relayed) = allocate(conn, minter).await;
    assert_eq!(relayed.ip().to_string(), "127.0.0.1");
    let peer = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let peer_addr = peer.local_addr().unwrap();
    c.call(stun::CREATE_PERMISSION, |b| {
        b.xor_addr(stun::XOR_PEER_ADDRESS, peer_addr);
    })
    .await;

    // Send indication -> peer; peer -> Data indication.
    let ind = Builder::new(stun::msg_type(stun::SEND, stun::INDICATION), &[42; 12])
        .xor_addr(stun::XOR_PEER_ADDRESS, peer_addr)
        .attr(stun::DATA_ATTR, b"via send")
        .finish();
    c.conn.send(&ind).await;
    let mut b = [0u8; 1500];
    let (n, from) = tokio::time::timeout(Duration::from_secs(5), peer.recv_from(&mut b)).await.unwrap().unwrap();
    assert_eq!((&b[..n], from), (&b"via send"[..], relayed));
    peer.send_to(b"to client", relayed).await.unwrap();
    let r = c.conn.recv().await;
    let m = Msg::parse(&r).unwrap();
    assert_eq!((m.method(), m.class()), (stun::DATA, stun::INDICATION));
    assert_eq!(m.get(stun::DATA_ATTR), Some(&b"to client"[..]));
    assert_eq!(m.get_xor_addr(stun::XOR_PEER_ADDRESS), Some(peer_addr));

    // Channel: ChannelData both ways, 100 packets each, every one accounted for.
    c.call(stun::CHANNEL_BIND, |b| {
        b.attr(stun::CHANNEL_NUMBER, &[0x40, 0x01, 0, 0]).xor_addr(stun::XOR_PEER_ADDRESS, peer_addr);
    })
    .await;
    for i in 0..100u8 {
        let mut cd = vec![0x40, 0x01, 0, 3, i, i, i, 0];
        if matches!(c.conn, Conn::Udp(..)) {
            cd.truncate(7);
        }
        c.conn.send(&cd).await;
        let (n, _) = tokio::time::timeout(Duration::from_secs(5), peer.recv_from(&mut b)).await.unwrap().unwrap();
        assert_eq!(&b[..n], &[i, i, i]);
        peer.send_to(&[i; 5], relayed).await.unwrap();
        let r = c.conn.recv().await;
        assert_eq!(&r[..9], &[0x40, 0x01, 0, 5, i, i, i, i, i]);
    }

    // Delete; the relayed address goes away.
    let r = c
        .call(stun::REFRESH, |b| {
            b.u32(stun::LIFETIME, 0);
        })
        .await;
    assert_eq!(Msg::parse(&r).unwrap().get(stun::LIFETIME), Some(&[0, 0, 0, 0][..]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udp_allocation_relays_both_ways() {
    let srv = start().await;
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    relay_both_ways(Conn::Udp(sock, srv.addr()), &srv.ice_minter()).await;
    assert_eq!(srv.stats().allocations, 0);
    assert!(srv.stats().to_peer_packets >= 101 && srv.stats().to_client_packets >= 101);
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_allocation_relays_both_ways_and_dies_with_the_connection() {
    let srv = start().await;
    let tcp = TcpStream::connect(srv.addr()).await.unwrap();
    relay_both_ways(Conn::Tcp(tcp), &srv.ice_minter()).await;
    // A second allocation on a new connection is removed when that connection closes.
    let tcp = TcpStream::connect(srv.addr()).await.unwrap();
    let (c, _) = allocate(Conn::Tcp(tcp), &srv.ice_minter()).await;
    assert_eq!(srv.stats().allocations, 1);
    drop(c);
    for _ in 0..100 {
        if srv.stats().allocations == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(srv.stats().allocations, 0, "allocation outlived its TCP connection");
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn taken_port_is_a_clear_error_and_shutdown_frees_it() {
    let srv = start().await;
    let addr = srv.addr();
    let err = TurnServer::start(TurnConfig::new(addr, SECRET)).await.err().expect("port is taken");
    assert!(matches!(err, TurnError::Bind { .. }));
    assert!(err.to_string().contains("--turn-listen"), "{err}");
    srv.shutdown().await;
    let again = TurnServer::start(TurnConfig::new(addr, SECRET)).await.expect("port free after shutdown");
    again.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn minter_points_at_the_bound_address() {
    let srv = start().await;
    let ice = srv.ice_minter().ice_servers_at("abc", SystemTime::now());
    let port = srv.addr().port();
    assert_eq!(ice[0].urls, vec![format!("stun:127.0.0.1:{port}")]);
    assert_eq!(
        ice[1].urls,
        vec![format!("turn:127.0.0.1:{port}?transport=udp"), format!("turn:127.0.0.1:{port}?transport=tcp")]
    );
    srv.shutdown().await;
}

/// The pump thread reads TCP clients edge-triggered: frames split at any byte, many in one segment, and bursts
/// each way all arrive, in order (no read or wake-up missed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_frames_split_and_batched_anywhere_are_all_relayed() {
    let srv = start().await;
    let tcp = TcpStream::connect(srv.addr()).await.unwrap();
    let (mut c, relayed) = allocate(Conn::Tcp(tcp), &srv.ice_minter()).await;
    let peer = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let peer_addr = peer.local_addr().unwrap();
    c.call(stun::CHANNEL_BIND, |b| {
        b.attr(stun::CHANNEL_NUMBER, &[0x40, 0x02, 0, 0]).xor_addr(stun::XOR_PEER_ADDRESS, peer_addr);
    })
    .await;
    let mut b = [0u8; 1500];
    let mut cut = 1usize;
    // Varied lengths, with a run of equal ones (which may leave as one GSO send).
    let frame_len =
        |round: u32, i: u32| if (40..70).contains(&i) { 120 } else { 1 + ((round * 100 + i) % 300) as usize };
    for round in 0..30u32 {
        // 100 frames of varied lengths (padding included), written in pieces of 1..=997 bytes.
        let mut wire = Vec::new();
        for i in 0..100u32 {
            let n = frame_len(round, i);
            wire.extend_from_slice(&[0x40, 0x02, (n >> 8) as u8, n as u8]);
            wire.extend((0..n).map(|k| (round + i + k as u32) as u8));
            wire.resize(wire.len() + (4 - n % 4) % 4, 0);
        }
        let Conn::Tcp(tcp) = &mut c.conn else { unreachable!() };
        let mut rest = &wire[..];
        while !rest.is_empty() {
            cut = cut * 7 % 997 + 1;
            let k = cut.min(rest.len());
            tcp.write_all(&rest[..k]).await.unwrap();
            rest = &rest[k..];
            if cut.is_multiple_of(3) {
                tokio::task::yield_now().await;
            }
        }
        for i in 0..100u32 {
            let (n, _) = tokio::time::timeout(Duration::from_secs(10), peer.recv_from(&mut b))
                .await
                .unwrap_or_else(|_| panic!("round {round}: frame {i} not relayed"))
                .unwrap();
            assert_eq!(n, frame_len(round, i), "round {round} frame {i}");
            assert!(b[..n].iter().enumerate().all(|(k, &x)| x == (round + i + k as u32) as u8));
        }
        // And back: a burst of 50 datagrams, all on the stream in order.
        for i in 0..50u8 {
            peer.send_to(&[i; 9], relayed).await.unwrap();
        }
        for i in 0..50u8 {
            let r = c.conn.recv().await;
            assert_eq!(&r[..13], &[0x40, 0x02, 0, 9, i, i, i, i, i, i, i, i, i], "round {round} back {i}");
        }
    }
    srv.shutdown().await;
}
