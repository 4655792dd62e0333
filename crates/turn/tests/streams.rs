//! TCP/TLS connection handling on loopback: certificate swap for TURN over TLS, the idle close of
//! connections without an allocation (complete messages count, bytes do not), the caps on open stream
//! connections (in all and per address), and the bound on answers queued for a client that never reads.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use webcall_turn::stun::{self, Builder, Msg};
use webcall_turn::{long_term_key, TurnConfig, TurnServer};

mod common;

const SECRET: &str = "stream-secret";

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A fresh self-signed certificate: (server config, its DER).
fn server_tls() -> (Arc<rustls::ServerConfig>, CertificateDer<'static>) {
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let key = PrivateKeyDer::Pkcs8(cert.key_pair.serialize_der().into());
    let der = cert.cert.der().clone();
    let cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![der.clone()], key)
        .unwrap();
    (Arc::new(cfg), der)
}

/// Accepts any certificate (the test compares it with the expected one itself).
#[derive(Debug)]
struct AnyCert(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AnyCert {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

type Tls = tokio_rustls::client::TlsStream<TcpStream>;

/// Connects over TLS; returns the stream and the server's certificate.
async fn tls_connect(addr: SocketAddr) -> (Tls, CertificateDer<'static>) {
    let cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyCert(provider())))
        .with_no_client_auth();
    let tcp = TcpStream::connect(addr).await.unwrap();
    let name = ServerName::try_from("localhost").unwrap();
    let s = tokio_rustls::TlsConnector::from(Arc::new(cfg)).connect(name, tcp).await.unwrap();
    let cert = s.get_ref().1.peer_certificates().unwrap()[0].clone();
    (s, cert)
}

/// One STUN message from a stream; `None` on EOF. Bounded by a 5 s guard against hangs.
async fn read_msg<S: AsyncRead + Unpin>(s: &mut S) -> Option<Vec<u8>> {
    let fut = async {
        let mut h = [0u8; 20];
        s.read_exact(&mut h).await.ok()?;
        let len = u16::from_be_bytes([h[2], h[3]]) as usize;
        let mut b = vec![0u8; len];
        s.read_exact(&mut b).await.ok()?;
        Some([&h[..], &b].concat())
    };
    tokio::time::timeout(Duration::from_secs(5), fut).await.expect("an answer or a close within 5 s")
}

/// A Binding request answered with the client's address.
async fn binding<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S, txid: u8) -> bool {
    let req = Builder::new(stun::msg_type(stun::BINDING, stun::REQUEST), &[txid; 12]).finish();
    if s.write_all(&req).await.is_err() {
        return false;
    }
    let Some(r) = read_msg(s).await else {
        return false;
    };
    let m = Msg::parse(&r).unwrap();
    m.class() == stun::SUCCESS && m.txid() == &[txid; 12]
}

async fn start(cfg: impl FnOnce(&mut TurnConfig)) -> webcall_turn::TurnHandle {
    common::start(SECRET, Some(server_tls().0), cfg).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn turns_uses_a_swapped_certificate_for_new_connections() {
    let (a, a_der) = server_tls();
    let (b, b_der) = server_tls();
    let srv = start(|_| {}).await;
    srv.set_tls(a);
    let addr = srv.tls_addr().unwrap();
    let (mut old, cert) = tls_connect(addr).await;
    assert_eq!(cert, a_der);
    assert!(binding(&mut old, 1).await);

    srv.set_tls(b);
    let (mut new, cert) = tls_connect(addr).await;
    assert_eq!(cert, b_der, "new connections get the new certificate");
    assert!(binding(&mut new, 2).await);
    assert!(binding(&mut old, 3).await, "the established connection keeps working");

    // Without --turns-listen there is nothing to swap, and it does no harm.
    let plain = TurnServer::start(TurnConfig::new("127.0.0.1:0".parse().unwrap(), SECRET)).await.unwrap();
    plain.set_tls(server_tls().0);
    assert_eq!(plain.tls_addr(), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_stream_without_allocation_is_closed_but_one_with_an_allocation_stays() {
    let srv = start(|c| {
        c.stream_idle = Duration::from_millis(200);
        c.stream_first_message = Duration::from_millis(200);
    })
    .await;
    // Silent from the start: closed (EOF rather than the 5 s guard).
    let mut idle = TcpStream::connect(srv.addr()).await.unwrap();
    assert_eq!(read_msg(&mut idle).await, None);
    // Talking, then silent: closed too.
    let mut talked = TcpStream::connect(srv.addr()).await.unwrap();
    assert!(binding(&mut talked, 1).await);
    assert_eq!(read_msg(&mut talked).await, None);
    // Same over TLS.
    let (mut tls, _) = tls_connect(srv.tls_addr().unwrap()).await;
    assert_eq!(read_msg(&mut tls).await, None);

    // With an allocation the connection outlives several idle periods.
    let mut s = TcpStream::connect(srv.addr()).await.unwrap();
    let ice = srv.ice_minter().ice_servers_at("p", SystemTime::now());
    let (user, pass) = (ice[1].username.clone().unwrap(), ice[1].credential.clone().unwrap());
    let first = Builder::new(stun::msg_type(stun::ALLOCATE, stun::REQUEST), &[0; 12])
        .u32(stun::REQUESTED_TRANSPORT, 17 << 24)
        .finish();
    s.write_all(&first).await.unwrap();
    let r = read_msg(&mut s).await.unwrap();
    let nonce = Msg::parse(&r).unwrap().get(stun::NONCE).unwrap().to_vec();
    let key = long_term_key(&user, "webcall", &pass);
    let req = |txid: u8, method: u16| {
        let mut b = Builder::new(stun::msg_type(method, stun::REQUEST), &[txid; 12]);
        if method == stun::ALLOCATE {
            b.u32(stun::REQUESTED_TRANSPORT, 17 << 24);
        }
        b.attr(stun::USERNAME, user.as_bytes())
            .attr(stun::REALM, b"webcall")
            .attr(stun::NONCE, &nonce)
            .integrity(&key)
            .finish()
    };
    s.write_all(&req(1, stun::ALLOCATE)).await.unwrap();
    let r = read_msg(&mut s).await.unwrap();
    assert_eq!(Msg::parse(&r).unwrap().class(), stun::SUCCESS);
    assert_eq!(srv.stats().allocations, 1);
    tokio::time::sleep(Duration::from_millis(1000)).await;
    s.write_all(&req(2, stun::REFRESH)).await.unwrap();
    let r = read_msg(&mut s).await.expect("still open");
    assert_eq!(Msg::parse(&r).unwrap().class(), stun::SUCCESS);
    assert_eq!(srv.stats().allocations, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_stream_connections_are_capped() {
    const MAX: usize = 8;
    let srv = start(|c| c.max_streams = MAX).await;
    let mut open = Vec::new();
    for i in 0..MAX {
        let mut s = TcpStream::connect(srv.addr()).await.unwrap();
        assert!(binding(&mut s, i as u8).await, "connection {i} is served");
        open.push(s);
    }
    // One over: the kernel accepts it, the server closes it unread (TLS counts against the same cap).
    let mut over = TcpStream::connect(srv.addr()).await.unwrap();
    assert!(!binding(&mut over, 100).await);
    let mut over_tls = TcpStream::connect(srv.tls_addr().unwrap()).await.unwrap();
    let mut b = [0u8; 1];
    let n = tokio::time::timeout(Duration::from_secs(5), over_tls.read(&mut b)).await.expect("closed within 5 s");
    assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");
    // The ones in use keep working; closing one frees a slot (freed once its tasks end).
    assert!(binding(&mut open[0], 101).await);
    drop(open.pop());
    let mut served = false;
    for _ in 0..100 {
        let mut s = TcpStream::connect(srv.addr()).await.unwrap();
        if binding(&mut s, 102).await {
            served = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(served, "a slot frees up after a connection closes");
}

/// Connects from `local` (a loopback address of the test's choosing) to `server`.
async fn connect_from(local: &str, server: SocketAddr) -> TcpStream {
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind(format!("{local}:0").parse().unwrap()).unwrap();
    sock.connect(server).await.unwrap()
}

/// Issue 19 item 2: one address cannot take every connection slot; another address still gets served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_per_address_are_capped() {
    const PER_IP: usize = 6;
    let srv = start(|c| c.max_streams_per_ip = PER_IP).await;
    let mut held = Vec::new();
    for i in 0..PER_IP {
        let mut s = connect_from("127.0.0.1", srv.addr()).await;
        assert!(binding(&mut s, i as u8).await, "connection {i} from the address is served");
        held.push(s);
    }
    // The attack, bounded: 3 × the cap more from the same address, each closed unserved.
    for i in 0..3 * PER_IP {
        let mut s = connect_from("127.0.0.1", srv.addr()).await;
        assert!(!binding(&mut s, 50 + i as u8).await, "connection {} over the cap is refused", PER_IP + i);
    }
    let mut tls_over = TcpStream::connect(srv.tls_addr().unwrap()).await.unwrap();
    let mut b = [0u8; 1];
    let n = tokio::time::timeout(Duration::from_secs(5), tls_over.read(&mut b)).await.expect("closed within 5 s");
    assert!(matches!(n, Ok(0) | Err(_)), "TLS counts against the same per-address cap: {n:?}");
    // Meanwhile another address is served, over TCP and TLS, and the held connections keep working.
    let mut other = connect_from("127.0.0.2", srv.addr()).await;
    assert!(binding(&mut other, 200).await);
    assert!(binding(&mut held[0], 201).await);
}

/// Issue 19 item 2: a byte now and then does not keep a connection open; only complete messages do
/// (or an allocation).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dribbling_bytes_does_not_keep_a_connection_open() {
    let idle = Duration::from_millis(600);
    let srv = start(|c| {
        c.stream_idle = idle;
        c.stream_first_message = idle;
    })
    .await;
    let started = std::time::Instant::now();
    // Before any complete message: one byte of a Binding request every 100 ms (20 bytes would take 2 s).
    let mut s = TcpStream::connect(srv.addr()).await.unwrap();
    let req = Builder::new(stun::msg_type(stun::BINDING, stun::REQUEST), &[9; 12]).finish();
    let mut closed_after = None;
    for (i, b) in req.iter().enumerate() {
        if s.write_all(&[*b]).await.is_err() {
            closed_after = Some(i);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await.expect("closed within 5 s");
    assert!(matches!(n, Ok(0) | Err(_)), "a dribbling connection is closed, not answered: {n:?} {closed_after:?}");
    assert!(started.elapsed() < Duration::from_secs(8));
    // After a complete message, the same: dribbling a second one does not extend the first's idle time.
    let mut s = TcpStream::connect(srv.addr()).await.unwrap();
    assert!(binding(&mut s, 1).await);
    for b in &req[..12] {
        if s.write_all(&[*b]).await.is_err() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await.expect("closed within 5 s");
    assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");
    // A connection that keeps sending complete messages stays.
    let mut s = TcpStream::connect(srv.addr()).await.unwrap();
    for i in 0..8 {
        assert!(binding(&mut s, i).await, "message {i}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Issue 19 item 1: a client that sends requests but never reads the answers is cut off once the queue for
/// it is full, instead of making the server hold its answers without limit; other clients keep working.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_reads_is_cut_off() {
    const QUEUE: usize = 64 << 10;
    let srv = start(|c| {
        c.stream_queue = QUEUE;
        c.stream_write_timeout = Duration::from_secs(1);
    })
    .await;
    // A tiny receive window so that the kernel buffers little of what the server writes.
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    let mut s = sock.connect(srv.addr()).await.unwrap();
    // Unauthenticated Refresh requests, each answered with a 401 of ~100 bytes. Bounded: at most 16 MB.
    let mut req = Vec::new();
    for i in 0..1000u32 {
        let mut txid = [0u8; 12];
        txid[..4].copy_from_slice(&i.to_be_bytes());
        req.extend(Builder::new(stun::msg_type(stun::REFRESH, stun::REQUEST), &txid).finish());
    }
    let mut sent = 0usize;
    let mut cut_off = false;
    while sent < 16 << 20 {
        match tokio::time::timeout(Duration::from_secs(5), s.write_all(&req)).await {
            Ok(Ok(())) => sent += req.len(),
            Ok(Err(_)) => {
                cut_off = true;
                break;
            }
            // The server stopped reading us: it must close the connection shortly.
            Err(_) => break,
        }
    }
    if !cut_off {
        // Writes stalled or all were sent: the server must close within the write timeout and a bit.
        let closed = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                tokio::time::sleep(Duration::from_millis(50)).await;
                if s.write_all(&req[..20]).await.is_err() {
                    return true;
                }
            }
        })
        .await;
        assert!(closed.unwrap_or(false), "a client that never reads must be disconnected");
    }
    // The answers the server held for it: bounded by the queue (a 401 is ~100 bytes per 20-byte request, so
    // without the bound 16 MB of requests would queue 80 MB).
    assert!(sent < 16 << 20, "the server kept reading requests it could not answer ({sent} bytes)");
    // Another client is served meanwhile.
    let mut other = TcpStream::connect(srv.addr()).await.unwrap();
    assert!(binding(&mut other, 7).await);
}

/// Shutdown does not wait for a writer stuck on a client that never reads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_does_not_wait_for_a_stuck_writer() {
    let srv = start(|c| c.stream_write_timeout = Duration::from_secs(3600)).await;
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    let mut s = sock.connect(srv.addr()).await.unwrap();
    let req = Builder::new(stun::msg_type(stun::REFRESH, stun::REQUEST), &[1; 12]).finish();
    for _ in 0..2000 {
        if tokio::time::timeout(Duration::from_millis(200), s.write_all(&req)).await.is_err() {
            break;
        }
    }
    tokio::time::timeout(Duration::from_secs(5), srv.shutdown()).await.expect("shutdown within 5 s");
}
