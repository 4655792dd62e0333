//! Another implementation's client against the server: `turn-client-proto` (the sans-IO TURN client the native
//! peer uses), over real UDP on loopback, with MD5/HMAC-SHA1 and with SHA-256 message integrity (RFC 8489
//! PASSWORD-ALGORITHMS), relaying to a UDP echo peer and back.

use std::net::SocketAddr;
use std::time::{Duration, Instant, SystemTime};

use tokio::net::UdpSocket;
use turn_client_proto::api::{TurnClientApi, TurnConfig, TurnEvent, TurnPollRet, TurnRecvRet};
use turn_client_proto::stun::agent::Transmit;
use turn_client_proto::stun::types::message::IntegrityAlgorithm;
use turn_client_proto::types::{TransportType, TurnCredentials};
use turn_client_proto::udp::TurnClientUdp;

mod common;

/// Allocates with only `integrity` allowed, relays one message to an echo peer and returns what came back.
async fn relay_with(integrity: IntegrityAlgorithm) -> Vec<u8> {
    let srv = common::start("proto-secret", None, common::allow_loopback).await;
    let ice = srv.ice_minter().ice_servers_at("p", SystemTime::now());
    let (user, pass) = (ice[1].username.clone().unwrap(), ice[1].credential.clone().unwrap());

    let echo = UdpSocket::bind("127.0.0.2:0").await.unwrap();
    let echo_addr = echo.local_addr().unwrap();
    tokio::spawn(async move {
        let mut b = [0u8; 2048];
        while let Ok((n, from)) = echo.recv_from(&mut b).await {
            let _ = echo.send_to(&b[..n], from).await;
        }
    });

    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let local = sock.local_addr().unwrap();
    let mut tc = TurnConfig::new(TurnCredentials::new(&user, &pass));
    tc.set_supported_integrity(integrity);
    let mut client = TurnClientUdp::allocate(local, srv.addr(), tc);
    let epoch = Instant::now();
    let t = || turn_client_proto::stun::Instant::from_nanos(epoch.elapsed().as_nanos() as i64);
    let deadline = Instant::now() + Duration::from_secs(10);
    let (mut sent, mut buf) = (false, [0u8; 2048]);
    loop {
        assert!(Instant::now() < deadline, "no relayed echo within 10 s ({integrity:?})");
        while let Some(tx) = client.poll_transmit(t()) {
            sock.send_to(&tx.data, tx.to).await.unwrap();
        }
        while let Some(e) = client.poll_event() {
            match e {
                TurnEvent::AllocationCreated(..) => {
                    client.create_permission(TransportType::Udp, echo_addr.ip(), t()).unwrap();
                }
                TurnEvent::PermissionCreated(..) if !sent => {
                    let tb = client.send_to(TransportType::Udp, echo_addr, b"through the relay", t()).unwrap();
                    let tx = tb.unwrap().build();
                    sock.send_to(&tx.data, tx.to).await.unwrap();
                    sent = true;
                }
                TurnEvent::AllocationCreateFailed(_) => panic!("allocation refused ({integrity:?})"),
                _ => {}
            }
        }
        let wait = match client.poll(t()) {
            TurnPollRet::WaitUntil(w) => w.to_std(epoch).saturating_duration_since(Instant::now()),
            TurnPollRet::Closed => panic!("client closed ({integrity:?})"),
            _ => Duration::from_millis(10),
        };
        let wait = wait.clamp(Duration::from_millis(1), Duration::from_millis(200));
        if let Ok(Ok((n, from))) = tokio::time::timeout(wait, sock.recv_from(&mut buf)).await {
            let from: SocketAddr = from;
            if let TurnRecvRet::PeerData(d) =
                client.recv(Transmit::new(&buf[..n], TransportType::Udp, from, local), t())
            {
                assert_eq!(d.peer, echo_addr);
                return d.data().to_vec();
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn md5_credentials() {
    assert_eq!(relay_with(IntegrityAlgorithm::Sha1).await, b"through the relay");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sha256_message_integrity() {
    assert_eq!(relay_with(IntegrityAlgorithm::Sha256).await, b"through the relay");
}
