//! webcall's TURN server, started in-process on loopback, driven by coturn's own test clients
//! (`turnutils_stunclient`, `turnutils_uclient`) with `turnutils_peer` as the UDP echo peer.
//! Debian package `coturn`; without it these tests print why and pass vacuously.

use std::net::{SocketAddr, UdpSocket};
use std::process::Stdio;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::process::{Child, Command};
use webcall_turn::{rest_password, TurnConfig, TurnHandle, TurnServer};

const SECRET: &str = "it-s3cret";

fn have_coturn() -> bool {
    let ok = ["turnutils_uclient", "turnutils_peer", "turnutils_stunclient"].iter().all(|b| {
        std::env::var_os("PATH").map(|p| std::env::split_paths(&p).any(|d| d.join(b).is_file())).unwrap_or(false)
    });
    if !ok {
        println!("SKIPPED: coturn's turnutils_* not installed (apt-get install -y coturn)");
    }
    ok
}

async fn server(allow_loopback: bool, legacy_channels: bool) -> TurnHandle {
    let mut cfg = TurnConfig::new("127.0.0.1:0".parse().unwrap(), SECRET);
    if allow_loopback {
        cfg.allow_peers = vec!["127.0.0.0/8".parse().unwrap()];
    }
    cfg.legacy_channel_numbers = legacy_channels;
    TurnServer::start(cfg).await.expect("server starts")
}

/// A `turnutils_peer` UDP echo server on a free loopback port, answering before this returns.
struct Peer {
    port: u16,
    _child: Child,
}

async fn echo_peer() -> Peer {
    for _ in 0..5 {
        let port = UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let child = Command::new("turnutils_peer")
            .args(["-p", &port.to_string(), "-L", "127.0.0.1"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn turnutils_peer");
        let probe = UdpSocket::bind("127.0.0.1:0").unwrap();
        probe.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
        for _ in 0..30 {
            probe.send_to(b"ping", ("127.0.0.1", port)).unwrap();
            let mut b = [0u8; 16];
            if let Ok((n, _)) = probe.recv_from(&mut b) {
                if &b[..n] == b"ping" {
                    return Peer { port, _child: child };
                }
            }
        }
    }
    panic!("turnutils_peer did not answer");
}

struct Run {
    ok: bool,
    out: String,
}

impl Run {
    /// (sent, received, lost) from uclient's summary lines.
    fn totals(&self) -> (u64, u64, u64) {
        let num_after = |line: &str, key: &str| -> Option<u64> {
            let rest = &line[line.find(key)? + key.len()..];
            rest.trim_start().split(|c: char| !c.is_ascii_digit()).next()?.parse().ok()
        };
        let mut sent = None;
        let mut recv = None;
        let mut lost = None;
        for line in self.out.lines() {
            if line.contains("start_mclient: tot_send_msgs=") {
                sent = num_after(line, "tot_send_msgs=");
                recv = num_after(line, "tot_recv_msgs=");
            }
            if line.contains("Total lost packets") {
                lost = num_after(line, "Total lost packets");
            }
        }
        match (sent, recv, lost) {
            (Some(s), Some(r), Some(l)) => (s, r, l),
            _ => panic!("no summary in uclient output:\n{}", self.out),
        }
    }
}

async fn uclient(server: SocketAddr, args: &[&str]) -> Run {
    let mut cmd = Command::new("turnutils_uclient");
    cmd.args(args).args(["-p", &server.port().to_string(), &server.ip().to_string()]);
    cmd.stdin(Stdio::null()).kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(60), cmd.output())
        .await
        .expect("turnutils_uclient finishes within 60 s")
        .expect("turnutils_uclient runs");
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    Run { ok: out.status.success(), out: text }
}

/// Relays `n` messages per client for `m` clients and checks every one came back.
async fn relay_ok(extra: &[&str], legacy_channels: bool) {
    relay_ok_with(extra, legacy_channels, true).await
}

/// `no_rtcp = false`: uclient opens RTP/RTCP allocation pairs (EVEN-PORT with R, then RESERVATION-TOKEN).
async fn relay_ok_with(extra: &[&str], legacy_channels: bool, no_rtcp: bool) {
    if !have_coturn() {
        return;
    }
    let srv = server(true, legacy_channels).await;
    let peer = echo_peer().await;
    let (n, m) = (200u64, 2u64);
    let port = peer.port.to_string();
    let (ns, ms) = (n.to_string(), m.to_string());
    let mut args = vec!["-W", SECRET, "-u", "alice", "-e", "127.0.0.1", "-r", &port];
    args.extend(["-n", &ns, "-m", &ms, "-l", "120", "-z", "5", "-X"]);
    if no_rtcp {
        args.push("-c");
    }
    args.extend(extra);
    let run = uclient(srv.addr(), &args).await;
    assert!(run.ok, "uclient {args:?} failed:\n{}", run.out);
    let (sent, recv, lost) = run.totals();
    if no_rtcp {
        assert_eq!(sent, n * m, "{}", run.out);
    } else {
        assert!(sent >= n * m, "{}", run.out);
    }
    assert_eq!(recv, sent, "{}", run.out);
    assert_eq!(lost, 0, "{}", run.out);
    // It really went through our relay, both ways.
    let st = srv.stats();
    assert!(st.to_peer_packets >= n * m && st.to_client_packets >= n * m, "{st:?}");
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stunclient_gets_binding_answer() {
    if !have_coturn() {
        return;
    }
    let srv = server(false, false).await;
    let out = tokio::time::timeout(
        Duration::from_secs(20),
        Command::new("turnutils_stunclient")
            .args(["-p", &srv.addr().port().to_string(), "127.0.0.1"])
            .kill_on_drop(true)
            .output(),
    )
    .await
    .unwrap()
    .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("UDP reflexive addr: 127.0.0.1:"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uclient_udp_channels() {
    relay_ok(&[], true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uclient_udp_rtp_rtcp_pairs_with_reservation_tokens() {
    relay_ok_with(&[], true, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uclient_udp_send_indications_strict_server() {
    relay_ok(&["-s"], false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uclient_tcp_channels() {
    relay_ok(&["-t"], true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uclient_tcp_send_indications() {
    relay_ok(&["-t", "-s"], false).await;
}

/// Two clients relaying to each other's relayed addresses on this same server (what turn-rs refused).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uclient_client_to_client_through_same_server() {
    relay_ok(&["-y"], true).await;
}

/// Static long-term credentials as uclient's `-u/-w`: we compute the TURN REST password ourselves.
async fn with_user(srv: &TurnHandle, peer: &Peer, username: &str) -> Run {
    let password = rest_password(SECRET.as_bytes(), username);
    let port = peer.port.to_string();
    let args = [
        "-u",
        username,
        "-w",
        &password,
        "-e",
        "127.0.0.1",
        "-r",
        &port,
        "-n",
        "20",
        "-m",
        "1",
        "-z",
        "5",
        "-X",
        "-c",
        "-s",
    ];
    uclient(srv.addr(), &args).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_or_expired_credentials_fail() {
    if !have_coturn() {
        return;
    }
    let srv = server(true, false).await;
    let peer = echo_peer().await;
    let port = peer.port.to_string();
    let run = uclient(
        srv.addr(),
        &["-W", "not-the-secret", "-u", "alice", "-e", "127.0.0.1", "-r", &port, "-n", "20", "-X", "-c"],
    )
    .await;
    assert!(!run.ok, "wrong secret accepted:\n{}", run.out);
    assert!(!run.out.contains("Total lost packets"), "{}", run.out);
    assert_eq!(srv.stats().allocations, 0);

    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs();
    let run = with_user(&srv, &peer, &format!("{}:bob", now - 10)).await;
    assert!(!run.ok, "expired credentials accepted:\n{}", run.out);
    assert_eq!(srv.stats().to_peer_packets, 0);
    assert_eq!(srv.stats().allocations, 0);

    // Control: the same path with a future expiry works, so the refusal above was the expiry.
    let run = with_user(&srv, &peer, &format!("{}:bob", now + 600)).await;
    assert!(run.ok, "{}", run.out);
    assert_eq!(run.totals(), (20, 20, 0));
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loopback_peer_refused_by_default() {
    if !have_coturn() {
        return;
    }
    let srv = server(false, false).await;
    let peer = echo_peer().await;
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs();
    let run = with_user(&srv, &peer, &format!("{}:carol", now + 600)).await;
    assert!(!run.ok, "relayed to a loopback peer without --turn-allow-peer:\n{}", run.out);
    assert!(run.out.contains("403"), "refused with 403:\n{}", run.out);
    assert_eq!(srv.stats().to_peer_packets, 0);
    srv.shutdown().await;
}

/// TURN over TLS (`turns:`), with a self-signed certificate; uclient does not verify it without -E.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uclient_over_tls() {
    if !have_coturn() {
        return;
    }
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(cert.key_pair.serialize_der().into());
    let tls =
        rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![cert.cert.der().clone()], key)
            .unwrap();
    let mut cfg = webcall_turn::TurnArgs {
        listen: Some("127.0.0.1:0".parse().unwrap()),
        turns_listen: Some("127.0.0.1:0".parse().unwrap()),
        secret: Some(SECRET.into()),
        allow_peer: vec!["127.0.0.0/8".parse().unwrap()],
        ..Default::default()
    }
    .into_config(Some(std::sync::Arc::new(tls)))
    .unwrap();
    cfg.legacy_channel_numbers = true;
    let srv = TurnServer::start(cfg).await.unwrap();
    let tls_addr = srv.tls_addr().expect("TLS bound");
    let peer = echo_peer().await;
    let port = peer.port.to_string();
    let args = [
        "-S",
        "-t",
        "-W",
        SECRET,
        "-u",
        "alice",
        "-e",
        "127.0.0.1",
        "-r",
        &port,
        "-n",
        "100",
        "-m",
        "2",
        "-z",
        "5",
        "-X",
        "-c",
    ];
    let run = uclient(tls_addr, &args).await;
    assert!(run.ok, "{}", run.out);
    assert_eq!(run.totals(), (200, 200, 0), "{}\n{:?}", run.out, srv.stats());
    assert!(srv.stats().to_peer_packets >= 200);
    // The minted iceServers name the turns: URL.
    let ice = srv.ice_minter().ice_servers_at("p", SystemTime::now());
    assert!(ice[1].urls.contains(&format!("turns:127.0.0.1:{}?transport=tcp", tls_addr.port())), "{ice:?}");
    srv.shutdown().await;
}
