//! Abuse against a real server over loopback (issue 19 and bursts from issue 17): each attack is bounded in count and
//! time, and each test asserts the bound or refusal and that a well-behaved call on the same server keeps working.

use webcall_testkit as common;

use common::msg::{answer, hello, offer};
use common::{read_server_frame, Client, Ended, ServerProc, WAIT};
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::Message;
use webcall_protocol::{ErrorCode, IceCandidate, Join, ServerMessage as M, Signal, BYE};

const SECRET: &str = "test-secret-0123456789";

/// A TCP connection to `to` from the loopback address `from`.
async fn tcp_from(from: &str, to: SocketAddr) -> std::io::Result<TcpStream> {
    let s = TcpSocket::new_v4()?;
    s.bind(format!("{from}:0").parse().unwrap())?;
    s.connect(to).await
}

/// Waits (up to `limit`) for the server to close `s`; `true` when it did.
async fn closed_within(s: &mut TcpStream, limit: Duration) -> bool {
    let mut buf = [0u8; 4096];
    let read_all = async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => continue,
            }
        }
    };
    tokio::time::timeout(limit, read_all).await.is_ok()
}

/// `GET path` from the loopback address `from`; the whole response.
async fn http_get_from(from: &str, addr: SocketAddr, path: &str) -> String {
    let mut s = tcp_from(from, addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes()).await.unwrap();
    let mut resp = String::new();
    tokio::time::timeout(WAIT, s.read_to_string(&mut resp)).await.expect("response within the wait").unwrap();
    resp
}

/// A WebSocket client connected from the loopback address `from`.
async fn ws_from(from: &str, server: &ServerProc) -> Client {
    let tcp = tcp_from(from, server.addr).await.unwrap();
    let (ws, _) = tokio_tungstenite::client_async(server.ws_url(), tokio_tungstenite::MaybeTlsStream::Plain(tcp))
        .await
        .expect("WebSocket connects");
    Client { ws, id: String::new(), resume: String::new() }
}

async fn join(mut c: Client, room: &str) -> Client {
    c.send_join(Join::new(room, "")).await;
    c.expect_welcome().await;
    c
}

/// Two peers in `room` exchange an offer and a candidate both ways: the call works.
async fn call_works(a: &mut Client, b: &mut Client) {
    a.relay(&b.id, Signal::Offer("v=0\r\n".into())).await;
    assert_eq!(b.recv().await, offer(&a.id, "v=0\r\n"));
    b.relay(&a.id, Signal::Answer("v=0\r\n".into())).await;
    assert_eq!(a.recv().await, answer(&b.id, "v=0\r\n"));
    b.relay(&a.id, Signal::Candidate(None)).await;
    assert_eq!(a.recv().await, M::Candidate { from: b.id.clone(), candidate: None });
}

async fn pair(url: &str, room: &str) -> (Client, Client) {
    let (a, _) = Client::join(url, room, "A").await;
    let (b, _) = Client::join(url, room, "B").await;
    let mut a = a;
    a.expect("hello").await;
    (a, b)
}

// --- 3: HTTP timeouts and a per-address cap before the upgrade -----------------------------------------------

/// A silent connection, one dribbling a header byte every 5 s and an idle keep-alive connection are closed by the
/// header timeout (10 s); a flood of half-sent requests from one address is cut at --max-connections-per-ip at
/// accept, while /healthz and a call from another address work.
#[tokio::test]
async fn slow_silent_and_flooding_http_clients_are_bounded() {
    // Loopback is trusted as a proxy by default (and then not counted per socket address).
    let server = ServerProc::start(&["--trusted-proxies", "10.255.255.255/32", "--max-connections-per-ip", "20"]);
    let addr = server.addr;

    let mut silent = tcp_from("127.0.0.3", addr).await.unwrap();
    let mut keepalive = tcp_from("127.0.0.3", addr).await.unwrap();
    keepalive.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    let mut first = [0u8; 512];
    let n = keepalive.read(&mut first).await.unwrap();
    assert!(String::from_utf8_lossy(&first[..n]).starts_with("HTTP/1.1 200"), "keep-alive gets its response");
    let dribbler = tokio::spawn(async move {
        let mut s = tcp_from("127.0.0.3", addr).await.unwrap();
        // Bounded: at most 8 bytes, 40 s.
        for b in b"GET / HT".iter() {
            if s.write_all(&[*b]).await.is_err() {
                return true;
            }
            if closed_within(&mut s, Duration::from_secs(5)).await {
                return true;
            }
        }
        false
    });

    // The flood: 200 half-sent requests from 127.0.0.1, all at once.
    let mut flood = Vec::new();
    for _ in 0..200 {
        if let Ok(mut s) = tcp_from("127.0.0.1", addr).await {
            let _ = s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n").await;
            flood.push(s);
        }
    }
    // Meanwhile, another address: health and a call.
    assert!(http_get_from("127.0.0.2", addr, "/healthz").await.starts_with("HTTP/1.1 200"));
    let mut a = join(ws_from("127.0.0.2", &server).await, "calm").await;
    let mut b = join(ws_from("127.0.0.2", &server).await, "calm").await;
    a.expect("hello").await;
    call_works(&mut a, &mut b).await;

    let mut cut = 0;
    for s in flood.iter_mut() {
        if closed_within(s, Duration::from_millis(50)).await {
            cut += 1;
        }
    }
    assert!(cut >= 180, "past the 20 per address, flood connections are closed at accept; {cut} of 200 were");
    let metrics = http_get_from("127.0.0.2", addr, "/metrics").await;
    let refused: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("webcall_connections_refused_total{reason=\"tcp-per-ip\"} "))
        .expect("the refusals are counted")
        .parse()
        .unwrap();
    assert!(refused >= 180, "{refused}");

    // The header timeout (10 s) closes the slow ones; the wait is a bound, not a measurement.
    assert!(closed_within(&mut silent, Duration::from_secs(20)).await, "a silent connection is closed");
    assert!(closed_within(&mut keepalive, Duration::from_secs(20)).await, "an idle keep-alive connection is closed");
    assert!(dribbler.await.unwrap(), "a connection dribbling its headers is closed");
    let mut kept = 0;
    for s in flood.iter_mut() {
        if !closed_within(s, Duration::from_secs(15)).await {
            kept += 1;
        }
    }
    assert_eq!(kept, 0, "the half-sent requests that were let in time out too");
    drop(flood);
    // The address has its budget back; the call went on meanwhile.
    assert!(http_get_from("127.0.0.1", addr, "/healthz").await.starts_with("HTTP/1.1 200"));
    call_works(&mut b, &mut a).await;
}

/// Completes a TLS handshake with `addr` (blocking); the socket and the server's certificate.
fn tls_handshake(addr: SocketAddr) -> (std::net::TcpStream, rustls::ClientConnection, Vec<u8>) {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let cfg =
        rustls::ClientConfig::builder().dangerous().with_custom_certificate_verifier(Arc::new(common::Pinned(None)));
    let mut conn =
        rustls::ClientConnection::new(Arc::new(cfg.with_no_client_auth()), "localhost".try_into().unwrap()).unwrap();
    let mut sock = std::net::TcpStream::connect(addr).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    while conn.is_handshaking() {
        conn.complete_io(&mut sock).expect("TLS handshake");
    }
    let der = conn.peer_certificates().unwrap()[0].as_ref().to_vec();
    (sock, conn, der)
}

/// The validity of a DER certificate: its first two UTCTime values (`YYMMDDHHMMSSZ`), as years since 2000 and days
/// of the year, roughly (enough to tell a year from a century).
fn validity_days(der: &[u8]) -> (i64, i64) {
    let mut times = der.windows(15).filter(|w| w[0] == 0x17 && w[1] == 13 && w[14] == b'Z').map(|w| {
        let d = |i: usize| (w[i] - b'0') as i64 * 10 + (w[i + 1] - b'0') as i64;
        (2000 + d(2)) * 372 + (d(4) - 1) * 31 + d(6)
    });
    (times.next().expect("notBefore as UTCTime"), times.next().expect("notAfter as UTCTime"))
}

/// TLS: a connection that never finishes its handshake, and one that finishes it and sends nothing, are closed;
/// the self-signed certificate is valid for about a year (from a day ago).
#[tokio::test]
async fn tls_handshake_and_silence_after_it_time_out() {
    let server = ServerProc::start(&["--tls-self-signed"]);
    let addr = server.addr;
    let mut never = TcpStream::connect(addr).await.unwrap();
    never.write_all(&[0x16, 0x03, 0x01]).await.unwrap(); // the start of a ClientHello, no more
    let silent = tokio::task::spawn_blocking(move || {
        let (mut sock, mut conn, der) = tls_handshake(addr);
        sock.set_read_timeout(Some(Duration::from_secs(25))).unwrap();
        // Reads until the server closes (close_notify or EOF) or the bound passes.
        let closed = loop {
            match conn.complete_io(&mut sock) {
                Ok((0, 0)) => break true,
                Ok(_) => {
                    use std::io::Read;
                    let mut b = [0u8; 256];
                    match conn.reader().read(&mut b) {
                        Ok(0) => break true,
                        Ok(_) => continue,
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                        Err(_) => break true,
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock || e.kind() == std::io::ErrorKind::TimedOut => {
                    break false
                }
                Err(_) => break true,
            }
        };
        (closed, der)
    });
    // A call over WSS meanwhile.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let cfg =
        rustls::ClientConfig::builder().dangerous().with_custom_certificate_verifier(Arc::new(common::Pinned(None)));
    let connector = tokio_tungstenite::Connector::Rustls(Arc::new(cfg.with_no_client_auth()));
    let mut wss = Vec::new();
    for _ in 0..2 {
        let (ws, _) =
            tokio_tungstenite::connect_async_tls_with_config(server.ws_url(), None, false, Some(connector.clone()))
                .await
                .expect("WSS connects");
        wss.push(join(Client { ws, id: String::new(), resume: String::new() }, "secure").await);
    }
    let (mut a, mut b) = (wss.remove(0), wss.remove(0));
    a.expect("hello").await;
    call_works(&mut a, &mut b).await;
    assert!(closed_within(&mut never, Duration::from_secs(20)).await, "an unfinished handshake is closed");
    let (closed, der) = silent.await.unwrap();
    assert!(closed, "a connection silent after its handshake is closed");
    let (from, to) = validity_days(&der);
    let span = to - from;
    assert!((360..=372 + 3).contains(&span), "valid for about a year, not {span} days ({from}..{to})");
}

// --- 5: subscribe-only SDP, read as a browser reads it ---------------------------------------------------------

/// Joins with `token`; the client and the server's answer (a welcome, or the refusal).
async fn join_with(url: &str, room: &str, token: &str) -> (Client, M) {
    let mut c = Client::connect(url).await;
    c.send_join(Join { token: Some(token.into()), ..Join::new(room, "") }).await;
    let w = c.recv().await;
    if let M::Welcome { id, .. } = &w {
        c.id = id.clone();
    }
    (c, w)
}

#[tokio::test]
async fn subscribe_only_sdp_is_read_as_a_browser_reads_it() {
    let server = ServerProc::start(&["--auth-secret", SECRET, "--max-errors", "50"]);
    let url = server.ws_url();
    let (mut publisher, _) = join_with(&url, "show", &common::token(SECRET, &["--room", "show"])).await;
    let (mut viewer, w) =
        join_with(&url, "show", &common::token(SECRET, &["--room", "show", "--subscribe-only"])).await;
    assert!(matches!(w, M::Welcome { publish: false, .. }), "{w:?}");
    publisher.expect("hello").await;
    let head = "v=0\r\no=- 1 2 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\n";
    let refused = [
        "m=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=recvonly\r\na=sendrecv\r\n",
        "m=video 9 UDP/TLS/RTP/SAVPF 96\r\na=inactive\r\na=sendonly\r\n",
        "m=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=mid:0\r\n",
        "m=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=recvonly \r\n",
        "a=recvonly\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=recvonly\r\n",
        "m=audio 9 UDP/TLS/RTP/SAVPF 111\ra=sendrecv\r\na=recvonly\r\n",
    ];
    for body in refused {
        viewer.relay(&publisher.id, Signal::Offer(format!("{head}{body}"))).await;
        let e = viewer.expect_error(ErrorCode::Unauthorized).await;
        assert!(e.message.contains("subscribe-only"), "{e}");
    }
    publisher.expect_silence(Duration::from_millis(200)).await;
    let ok = format!("{head}m=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=recvonly\r\nm=video 9 UDP/TLS/RTP/SAVPF 96\r\na=inactive\r\nm=application 9 UDP/DTLS/SCTP webrtc-datachannel\r\n");
    viewer.relay(&publisher.id, Signal::Offer(ok.clone())).await;
    assert_eq!(publisher.recv().await, offer(&viewer.id, &ok));
    // The publisher's own SDP is not restricted.
    let answer = format!("{head}m=audio 9 RTP/AVP 0\r\na=sendrecv\r\n");
    publisher.relay(&viewer.id, Signal::Answer(answer)).await;
    viewer.expect("answer").await;
}

// --- 6: trusted proxies on a dual-stack listener ---------------------------------------------------------------

async fn ws_with_xff(url: &str, xff: &str) -> Client {
    let mut req = url.into_client_request().unwrap();
    req.headers_mut().insert("x-forwarded-for", HeaderValue::from_str(xff).unwrap());
    let (ws, _) = tokio_tungstenite::connect_async(req).await.expect("WebSocket connects");
    Client { ws, id: String::new(), resume: String::new() }
}

#[tokio::test]
async fn a_proxy_on_a_dual_stack_listener_is_trusted_and_ipv6_is_counted_by_64() {
    // [::] takes IPv4 too: a proxy on 127.0.0.1 arrives as ::ffff:127.0.0.1.
    let server = ServerProc::start_on("[::]:0", &["--max-connections-per-ip", "1"]);
    let url = format!("ws://127.0.0.1:{}/ws", server.addr.port());
    // Two users behind the proxy each get their own budget.
    let one = join(ws_with_xff(&url, "198.51.100.1").await, "proxied").await;
    let two = join(ws_with_xff(&url, "198.51.100.2").await, "proxied").await;
    let mut again = ws_with_xff(&url, "198.51.100.1").await;
    again.expect_error(ErrorCode::RateLimited).await;
    assert_eq!(again.until_end().await, Ended::Closed(1008, "rate-limited".into()));
    // IPv6 by /64: another address in the same /64 shares the budget, the next /64 does not.
    let mut v6 = join(ws_with_xff(&url, "2001:db8:1:2::1").await, "v6").await;
    let mut same64 = ws_with_xff(&url, "2001:db8:1:2:ffff::9").await;
    same64.expect_error(ErrorCode::RateLimited).await;
    let next64 = join(ws_with_xff(&url, "2001:db8:1:3::1").await, "v6").await;
    assert_eq!(v6.recv().await, hello(&next64.id, ""));
    let (mut one, mut two) = (one, two);
    one.expect("hello").await;
    call_works(&mut one, &mut two).await;
}

// --- 7: tokens of every length the server accepts ---------------------------------------------------------------

#[tokio::test]
async fn minted_tokens_for_the_longest_room_and_name_are_accepted() {
    let server = ServerProc::start(&["--auth-secret", SECRET]);
    let url = server.ws_url();
    let room = "r".repeat(64);
    for name in ["n".repeat(64), "😀".repeat(64), "\"\\".repeat(32)] {
        let t = common::token(SECRET, &["--room", &room, "--name", &name]);
        assert!(t.len() > 256, "the case the issue found: {} bytes", t.len());
        let (mut c, w) = join_with(&url, &room, &t).await;
        assert_eq!(w.message_type(), "welcome", "{w:?}");
        c.send_text(BYE).await;
    }
    let any = common::token(SECRET, &["--room", "*", "--name", &"é".repeat(64)]);
    let (_, w) = join_with(&url, &room, &any).await;
    assert_eq!(w.message_type(), "welcome", "{w:?}");
    // What the server would refuse, `webcall token` refuses to mint.
    let out = Command::new(env!("CARGO_BIN_EXE_webcall"))
        .args(["token", "--auth-secret", SECRET, "--room", "r", "--name", &"n".repeat(65)])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--name"));
}

// --- 8: password guesses per room --------------------------------------------------------------------------------

#[tokio::test]
async fn room_password_guesses_are_limited_per_room() {
    let server = ServerProc::start(&["--max-password-attempts", "5", "--max-errors", "50"]);
    let url = server.ws_url();
    let mut owner = Client::connect(&url).await;
    owner.send_join(Join { password: Some("right".into()), ..Join::new("vault", "") }).await;
    owner.expect_welcome().await;
    let (mut a, mut b) = pair(&url, "elsewhere").await;
    // Guesses from several connections count against the room.
    for i in 0..5 {
        let mut g = Client::connect(&url).await;
        g.send_join(Join { password: Some(format!("guess{i}").into()), ..Join::new("vault", "") }).await;
        assert!(g.expect_error(ErrorCode::Unauthorized).await.message.contains("wrong password"));
    }
    let mut g = Client::connect(&url).await;
    for pw in ["guess5", "right"] {
        g.send_join(Join { password: Some(pw.into()), ..Join::new("vault", "") }).await;
        let e = g.expect_error(ErrorCode::RateLimited).await;
        let m = &e.message;
        assert!(m.contains("too many wrong passwords") && m.contains("try again in"), "{m}");
    }
    // The owner's room and another call are unaffected.
    call_works(&mut a, &mut b).await;
    owner.expect_silence(Duration::from_millis(100)).await;
    // One guess refills every 12 s at 5 per minute: the right password then gets in.
    tokio::time::sleep(Duration::from_secs(13)).await;
    g.send_join(Join { password: Some("right".into()), ..Join::new("vault", "") }).await;
    g.expect_welcome().await;
    assert_eq!(owner.recv().await, hello(&g.id, ""));
}

// --- 9: JWT nbf, headers --------------------------------------------------------------------------------------------

fn b64url(bytes: &[u8]) -> String {
    const A: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk.iter().enumerate().fold(0u32, |n, (i, b)| n | (*b as u32) << (16 - 8 * i));
        for i in 0..=chunk.len() {
            out.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
        }
    }
    out
}

fn hmac_sha256(key: &[u8], msg: &[u8]) -> Vec<u8> {
    use sha2::{Digest, Sha256};
    let mut k = [0u8; 64];
    k[..key.len()].copy_from_slice(key);
    let inner = Sha256::new().chain_update(k.map(|b| b ^ 0x36)).chain_update(msg).finalize();
    Sha256::new().chain_update(k.map(|b| b ^ 0x5c)).chain_update(inner).finalize().to_vec()
}

fn jwt(claims: Value) -> String {
    let body = format!("{}.{}", b64url(br#"{"alg":"HS256","typ":"JWT"}"#), b64url(claims.to_string().as_bytes()));
    let sig = b64url(&hmac_sha256(SECRET.as_bytes(), body.as_bytes()));
    format!("{body}.{sig}")
}

#[tokio::test]
async fn jwt_not_before_is_honoured_and_pages_carry_security_headers() {
    let server = ServerProc::start(&["--auth-secret", SECRET]);
    let url = server.ws_url();
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    let claims = |nbf: u64| json!({"room":"r","exp":now + 600,"nbf":nbf,"permissions":["join","publish"]});
    let (_, e) = join_with(&url, "r", &jwt(claims(now + 300))).await;
    let e = e.into_refusal().expect("an error").expect("a known code");
    assert_eq!(e.code, ErrorCode::Unauthorized, "{e}");
    assert!(e.message.contains("not valid yet"), "{e}");
    let (_, w) = join_with(&url, "r", &jwt(claims(now - 10))).await;
    assert_eq!(w.message_type(), "welcome", "the hand-made token is right otherwise: {w:?}");

    for path in ["/", "/r/daily", "/app/call.js", "/nope"] {
        let resp = http_get_from("127.0.0.1", server.addr, path).await.to_ascii_lowercase();
        let head = resp.split("\r\n\r\n").next().unwrap().to_owned();
        assert!(head.contains("content-security-policy: default-src 'self'"), "{path}: {head}");
        assert!(head.contains("frame-ancestors 'none'"), "{path}: {head}");
        assert!(head.contains("x-frame-options: deny"), "{path}: {head}");
        assert!(head.contains("x-content-type-options: nosniff"), "{path}: {head}");
    }
}

// --- issue 17 point 3: bursts are slowed, not refused; floods are closed ------------------------------------------

#[tokio::test]
async fn a_burst_is_read_slowly_and_a_flood_is_closed() {
    // Default limits: 50 messages/s, bursts of 100, 256 queued per receiver.
    let server = ServerProc::start(&[]);
    let url = server.ws_url();
    let (mut a, mut b) = pair(&url, "burst").await;
    // 300 candidates at once, as a browser with several peer connections sends them.
    let candidate = |i: u16| IceCandidate {
        candidate: format!(
            "candidate:{i} 1 udp 2122260223 127.0.0.1 {} typ host generation 0 ufrag abcd network-id 1",
            50000 + i
        ),
        sdp_mid: Some("0".into()),
        sdp_m_line_index: Some(0),
        username_fragment: None,
    };
    for i in 0..300 {
        a.ws.feed(Message::text(Signal::Candidate(Some(candidate(i))).to_json(&b.id))).await.unwrap();
    }
    a.ws.flush().await.unwrap();
    for i in 0..300 {
        assert_eq!(b.recv().await, M::Candidate { from: a.id.clone(), candidate: Some(candidate(i)) }, "in order");
    }
    a.expect_silence(Duration::from_millis(200)).await;

    // A flood: 20 000 small messages to a peer in its room, at 20/s far more than 20 s worth.
    let flood_server = ServerProc::start(&["--rate-limit", "20", "--max-errors", "100000"]);
    let (flooder, target) = pair(&flood_server.ws_url(), "flood").await;
    let to = target.id.clone();
    // The target reads what is relayed to it, as a browser would.
    let reader = tokio::spawn(async move {
        let mut target = target;
        let mut n = 0u32;
        while let Some(Ok(m)) = target.ws.next().await {
            if m.is_text() {
                n += 1;
            }
        }
        n
    });
    let (mut tx, mut rx) = flooder.ws.split();
    let sender = tokio::spawn(async move {
        let msg = Signal::Candidate(None).to_json(&to);
        for _ in 0..20_000 {
            if tx.feed(Message::text(msg.clone())).await.is_err() {
                return;
            }
        }
        let _ = tx.flush().await;
    });
    let end = tokio::time::timeout(Duration::from_secs(40), async {
        let mut last_error = None;
        loop {
            match rx.next().await {
                Some(Ok(Message::Text(t))) => last_error = read_server_frame(&t).into_refusal(),
                Some(Ok(Message::Close(Some(f)))) => return (u16::from(f.code), f.reason.to_string(), last_error),
                Some(Ok(_)) => {}
                _ => return (0, String::new(), last_error),
            }
        }
    })
    .await
    .expect("the flooder is closed after 20 s of pacing");
    assert_eq!((end.0, end.1.as_str()), (1008, "rate-limited: message flood"), "{:?}", end.2);
    assert_eq!(end.2.map(|e| e.map(|e| e.code)), Some(Ok(ErrorCode::RateLimited)));
    sender.abort();
    drop(flood_server);
    let relayed = reader.await.unwrap();
    // Read at the rate (a burst of 40, then 20/s for the 20 s): far fewer than were sent.
    assert!((300..=1000).contains(&relayed), "{relayed} of the flood were relayed");
    // The call next door went on.
    call_works(&mut a, &mut b).await;
}
