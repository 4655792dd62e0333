//! Production features against a real server: join tokens, room passwords, origins, per-address limits, TLS,
//! graceful shutdown and metrics. Every refusal is provoked and its message checked.

use webcall_testkit as common;

use common::msg::{peer, peers};
use common::{Client, Ended, Pinned, ServerProc};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use webcall_protocol::{ErrorCode, Join, ServerMessage as M, Signal, BYE};

const SECRET: &str = "test-secret-0123456789";

async fn http_get(server: &ServerProc, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes()).await.unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).await.unwrap();
    resp
}

#[tokio::test]
async fn join_tokens_are_required_and_checked() {
    let server = ServerProc::start(&["--auth-secret", SECRET]);
    let url = server.ws_url();
    let mut c = Client::connect(&url).await;
    c.send_join(Join::new("board", "")).await;
    assert!(c.expect_error(ErrorCode::Unauthorized).await.message.contains("token"));
    let forged = common::token(SECRET, &["--room", "board"]).replace('.', ".x");
    c.send_join(Join { token: Some(forged.into()), ..Join::new("board", "") }).await;
    c.expect_error(ErrorCode::Unauthorized).await;
    let other_secret = common::token("some-other-secret-xyz", &["--room", "board"]);
    c.send_join(Join { token: Some(other_secret.into()), ..Join::new("board", "") }).await;
    assert!(c.expect_error(ErrorCode::Unauthorized).await.message.contains("signature"));
    let expired = common::token(SECRET, &["--room", "board", "--ttl", "0s"]);
    tokio::time::sleep(Duration::from_secs(7)).await; // past the 5 s leeway
    c.send_join(Join { token: Some(expired.into()), ..Join::new("board", "") }).await;
    assert!(c.expect_error(ErrorCode::Unauthorized).await.message.contains("expired"));
    let wrong_room = common::token(SECRET, &["--room", "other"]);
    c.send_join(Join { token: Some(wrong_room.into()), ..Join::new("board", "") }).await;
    c.expect_error(ErrorCode::Unauthorized).await;

    let good = common::token(SECRET, &["--room", "board", "--name", "Chair"]);
    c.send_join(Join { token: Some(good.into()), ..Join::new("board", "Impostor") }).await;
    // `publish: true` is the default when the frame has no `publish` (and the typed read checks it has none).
    assert!(matches!(c.expect_welcome().await, M::Welcome { publish: true, .. }));
    let viewer = common::token(SECRET, &["--room", "*", "--subscribe-only"]);
    let mut v = Client::connect(&url).await;
    v.send_join(Join { token: Some(viewer.into()), ..Join::new("board", "") }).await;
    let wv = v.expect_welcome().await;
    assert!(matches!(wv, M::Welcome { publish: false, .. }), "{wv:?}");
    assert_eq!(peers(wv), [peer(&c.id, "Chair")], "the token fixed the name");
    let sdp = "v=0\r\nm=video 9 UDP/TLS/RTP/SAVPF 96\r\na=sendrecv\r\n";
    v.relay(&c.id, Signal::Answer(sdp.into())).await;
    v.expect_error(ErrorCode::Unauthorized).await;
}

#[tokio::test]
async fn room_passwords() {
    let server = ServerProc::start(&[]);
    let url = server.ws_url();
    let mut a = Client::connect(&url).await;
    a.send_join(Join { password: Some("hunter2".into()), ..Join::new("private", "") }).await;
    a.expect_welcome().await;
    let mut b = Client::connect(&url).await;
    b.send_join(Join::new("private", "")).await;
    b.expect_error(ErrorCode::Unauthorized).await;
    b.send_join(Join { password: Some("hunter3".into()), ..Join::new("private", "") }).await;
    assert!(b.expect_error(ErrorCode::Unauthorized).await.message.contains("wrong password"));
    b.send_join(Join { password: Some("hunter2".into()), ..Join::new("private", "") }).await;
    b.expect_welcome().await;
}

async fn connect_with_headers(url: &str, headers: &[(&'static str, &str)]) -> Result<Client, String> {
    let mut req = url.into_client_request().unwrap();
    for (k, v) in headers {
        req.headers_mut().insert(*k, HeaderValue::from_str(v).unwrap());
    }
    match tokio_tungstenite::connect_async(req).await {
        Ok((ws, _)) => Ok(Client { ws, id: String::new(), resume: String::new() }),
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            let body = resp.body().as_ref().map(|b| String::from_utf8_lossy(b).into_owned()).unwrap_or_default();
            Err(format!("{} {body}", resp.status().as_u16()))
        }
        Err(e) => Err(e.to_string()),
    }
}

#[tokio::test]
async fn allowed_origins() {
    let server = ServerProc::start(&["--allowed-origins", "https://call.example.com,https://meet.example.org"]);
    let url = server.ws_url();
    let err = connect_with_headers(&url, &[("origin", "https://evil.example.net")]).await.err().unwrap();
    assert!(err.starts_with("403") && err.contains("not allowed"), "{err}");
    let err = connect_with_headers(&url, &[]).await.err().unwrap();
    assert!(err.starts_with("403"), "no Origin, no entry: {err}");
    let mut ok = connect_with_headers(&url, &[("origin", "https://meet.example.org")]).await.unwrap();
    ok.send_join(Join::new("r", "")).await;
    ok.expect_welcome().await;
    let m = http_get(&server, "/metrics").await;
    assert!(m.contains("webcall_connections_refused_total{reason=\"origin\"} 2"), "{m}");
}

#[tokio::test]
async fn per_address_limits_and_trusted_proxies() {
    let server = ServerProc::start(&[
        "--max-connections-per-ip",
        "2",
        "--max-joins-per-ip",
        "3",
        "--trusted-proxies",
        "127.0.0.0/8",
    ]);
    let url = server.ws_url();
    let h = |ip: &'static str| vec![("x-forwarded-for", ip)];
    let mut a = connect_with_headers(&url, &h("203.0.113.1")).await.unwrap();
    let _b = connect_with_headers(&url, &h("203.0.113.1")).await.unwrap();
    let mut third = connect_with_headers(&url, &h("203.0.113.1")).await.unwrap();
    let e = third.expect_error(ErrorCode::RateLimited).await;
    assert!(e.message.contains("connections from your address"), "{e}");
    assert_eq!(third.until_end().await, Ended::Closed(1008, "rate-limited".into()));
    // Another (forwarded) address has its own allowance.
    let mut other = connect_with_headers(&url, &h("203.0.113.2")).await.unwrap();
    other.send_join(Join::new("x", "")).await;
    other.expect_welcome().await;
    // Joins per minute: 3 pass, the 4th is refused.
    for i in 0..3 {
        a.send_join(Join::new(format!("j{i}"), "")).await;
        a.expect_welcome().await;
        a.send_text(BYE).await;
    }
    a.send_join(Join::new("j3", "")).await;
    assert!(a.expect_error(ErrorCode::RateLimited).await.message.contains("joins per minute"));
    let m = http_get(&server, "/metrics").await;
    assert!(m.contains("webcall_connections_refused_total{reason=\"per-ip\"} 1"), "{m}");
    assert!(m.contains("webcall_errors_total{code=\"rate-limited\"} 1"), "{m}");
}

/// The SHA-256 fingerprint of the certificate a TLS server at `addr` presents.
fn turns_fingerprint(addr: &str) -> String {
    use sha2::Digest;
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let cfg = rustls::ClientConfig::builder()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(Pinned(None)))
        .with_no_client_auth();
    let mut conn = rustls::ClientConnection::new(Arc::new(cfg), "localhost".try_into().unwrap()).unwrap();
    let mut sock = std::net::TcpStream::connect(addr).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    while conn.is_handshaking() {
        conn.complete_io(&mut sock).expect("TLS handshake with TURNS");
    }
    let der = &conn.peer_certificates().unwrap()[0];
    sha2::Sha256::digest(der.as_ref()).iter().map(|b| format!("{b:02X}")).collect::<Vec<_>>().join(":")
}

async fn wss_connect(url: &str, pinned: &str) -> Result<Client, String> {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let cfg = rustls::ClientConfig::builder()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(Pinned(Some(pinned.to_owned()))))
        .with_no_client_auth();
    let connector = tokio_tungstenite::Connector::Rustls(Arc::new(cfg));
    tokio_tungstenite::connect_async_tls_with_config(url, None, false, Some(connector))
        .await
        .map(|(ws, _)| Client { ws, id: String::new(), resume: String::new() })
        .map_err(|e| e.to_string())
}

#[tokio::test]
async fn self_signed_tls_serves_wss_with_the_printed_fingerprint() {
    let server = ServerProc::start(&["--tls-self-signed"]);
    assert_eq!(server.scheme, "https");
    let fp = server.banner.iter().find_map(|l| l.split("fingerprint ").nth(1)).expect("fingerprint printed").to_owned();
    assert_eq!(fp.split(':').count(), 32, "{fp}");
    let url = server.ws_url();
    assert!(url.starts_with("wss://"));
    let mut c = wss_connect(&url, &fp).await.unwrap();
    c.send_join(Join::new("secure", "")).await;
    c.expect_welcome().await;
    let wrong = fp.replacen(&fp[..2], if &fp[..2] == "00" { "11" } else { "00" }, 1);
    let err = wss_connect(&url, &wrong).await.err().expect("another fingerprint is refused");
    assert!(err.contains("pinned"), "{err}");
    // Plain HTTP on the TLS port is not served.
    assert!(Client::connect_raw(&format!("ws://{}/ws", server.addr)).await.is_err());
}

#[tokio::test]
async fn certificate_files_and_reload_on_sighup() {
    let dir = common::temp_dir("tls");
    let write = |name: &str| {
        let c = rcgen::generate_simple_self_signed(vec![name.to_owned()]).unwrap();
        std::fs::write(dir.path().join("cert.pem"), c.cert.pem()).unwrap();
        std::fs::write(dir.path().join("key.pem"), c.signing_key.serialize_pem()).unwrap();
    };
    write("first.test");
    let cert = dir.path().join("cert.pem");
    let key = dir.path().join("key.pem");
    let turns = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().to_string(); // then freed
    let server = ServerProc::start(&[
        "--tls-cert",
        cert.to_str().unwrap(),
        "--tls-key",
        key.to_str().unwrap(),
        "--turn-listen",
        "127.0.0.1:0",
        "--turns-listen",
        &turns,
    ]);
    let fp1 = server.banner.iter().find_map(|l| l.split("fingerprint ").nth(1)).unwrap().to_owned();
    assert_eq!(turns_fingerprint(&turns), fp1, "TURN over TLS uses the server's certificate");
    let mut live = wss_connect(&server.ws_url(), &fp1).await.unwrap();
    live.send_join(Join::new("r", "")).await;
    live.expect_welcome().await;
    write("second.test");
    server.signal("HUP");
    // New connections get the new certificate; the call in progress is untouched.
    let mut reloaded = false;
    for _ in 0..100 {
        if wss_connect(&server.ws_url(), &fp1).await.is_err() {
            reloaded = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(reloaded, "the old certificate is still served after SIGHUP");
    let fp2 = turns_fingerprint(&turns);
    assert_ne!(fp2, fp1, "TURN over TLS follows the reload");
    live.relay("nobody", Signal::Offer("s".into())).await;
    live.expect_error(ErrorCode::UnknownPeer).await;

    let out = Command::new(env!("CARGO_BIN_EXE_webcall"))
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--tls-cert",
            "/nonexistent.pem",
            "--tls-key",
            key.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("/nonexistent.pem"), "{err}");
}

#[tokio::test]
async fn graceful_shutdown_tells_clients_and_exits_zero() {
    let mut server = ServerProc::start(&["--shutdown-timeout", "5s"]);
    let url = server.ws_url();
    let (mut a, _) = Client::join(&url, "r", "A").await;
    let mut idle = Client::connect(&url).await;
    server.signal("TERM");
    for c in [&mut a, &mut idle] {
        let e = c.expect_error(ErrorCode::ServerShutdown).await;
        assert!(e.message.contains("reconnect"));
        assert_eq!(c.until_end().await, Ended::Closed(1001, "server shutting down".into()));
    }
    assert_eq!(server.wait_exit(), Some(0));
}

#[tokio::test]
async fn metrics_count_what_happens() {
    let server = ServerProc::start(&[]);
    let url = server.ws_url();
    let (mut a, _) = Client::join(&url, "m", "A").await;
    let (b, _) = Client::join(&url, "m", "B").await;
    a.expect("hello").await;
    a.relay(&b.id, Signal::Offer("x".into())).await;
    a.send_text("nonsense").await;
    a.expect_error(ErrorCode::BadJson).await;
    let m = http_get(&server, "/metrics").await;
    assert!(m.starts_with("HTTP/1.1 200"));
    for line in [
        "webcall_connections 2",
        "webcall_rooms 1",
        "webcall_peers 2",
        "webcall_messages_total{type=\"join\"} 2",
        "webcall_messages_total{type=\"offer\"} 1",
        "webcall_errors_total{code=\"bad-json\"} 1",
        "webcall_joins_total 2",
        "# TYPE webcall_messages_total counter",
    ] {
        assert!(m.contains(line), "missing {line:?} in\n{m}");
    }
    let rss: u64 =
        m.lines().find_map(|l| l.strip_prefix("webcall_process_resident_memory_bytes ")).unwrap().parse().unwrap();
    assert!(rss > 1 << 20, "{rss}");
}
