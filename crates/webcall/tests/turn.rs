//! STUN/TURN as `webcall serve` wires it: the credentials a `welcome` carries work on the built-in TURN (checked
//! with coturn's own clients), `--ice-servers` points clients at an external coturn with the shared secret, and
//! `webcall turn` runs TURN alone; coturn's clients in every mode they have relay through `webcall serve` as an operator
//! starts it; the server refuses to relay to itself. Loopback only.

use webcall_testkit as common;

use common::{Client, ServerProc};
use std::io::{BufRead, BufReader};
use std::net::UdpSocket;
use std::process::{Child, Command, Stdio};
use std::time::Duration;
use webcall_protocol::{IceServer, ServerMessage};

fn have_coturn() -> bool {
    let ok = ["turnutils_uclient", "turnutils_peer", "turnutils_stunclient", "turnserver"].iter().all(|b| {
        Command::new("sh").args(["-c", &format!("command -v {b}")]).output().is_ok_and(|o| o.status.success())
    });
    if !ok {
        eprintln!("SKIPPED: coturn's binaries are missing (scripts/test.sh installs the coturn package)");
    }
    ok
}

fn free_udp_port() -> u16 {
    UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

struct Proc(Child);
impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `turnutils_peer`, coturn's UDP echo peer, on a free loopback port.
fn echo_peer() -> (Proc, u16) {
    let port = free_udp_port();
    let child = Command::new("turnutils_peer")
        .args(["-p", &port.to_string(), "-L", "127.0.0.1"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    (Proc(child), port)
}

/// (sent, received, lost) reported by `turnutils_uclient` relaying through `server:port` to the echo peer.
fn uclient(host: &str, port: u16, auth: &[&str], peer_port: u16) -> (bool, u64, u64, u64, String) {
    let out = Command::new("timeout")
        .args(["60", "turnutils_uclient"])
        .args(auth)
        .args([
            "-e",
            "127.0.0.1",
            "-r",
            &peer_port.to_string(),
            "-n",
            "50",
            "-m",
            "1",
            "-l",
            "120",
            "-z",
            "5",
            "-X",
            "-c",
            "-s",
        ])
        .args(["-p", &port.to_string(), host])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    summary(out)
}

/// (success, sent, received, lost, output) from uclient's summary lines.
fn summary(out: std::process::Output) -> (bool, u64, u64, u64, String) {
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    let num = |key: &str| -> u64 {
        text.lines()
            .filter_map(|l| l.find(key).map(|i| &l[i + key.len()..]))
            .filter_map(|r| r.trim_start().split(|c: char| !c.is_ascii_digit()).next()?.parse().ok())
            .next_back()
            .unwrap_or(0)
    };
    (out.status.success(), num("tot_send_msgs="), num("tot_recv_msgs="), num("Total lost packets"), text)
}

/// The welcome's `iceServers`.
fn ice_servers(w: &ServerMessage) -> &[IceServer] {
    let ServerMessage::Welcome { ice_servers, .. } = w else { panic!("not a welcome: {w:?}") };
    ice_servers
}

/// The welcome's TURN entry: (host, port, username, credential), and the STUN URL's port.
fn turn_entry(w: &ServerMessage) -> (String, u16, String, String, u16) {
    let servers = ice_servers(w);
    let stun = servers.iter().flat_map(|s| &s.urls).find_map(|u| u.strip_prefix("stun:")).expect("a stun: URL");
    let t = servers.iter().find(|s| s.username.is_some()).expect("an entry with credentials");
    let url = t.urls.iter().find_map(|u| u.strip_prefix("turn:")).expect("a turn: URL");
    let hostport = url.split('?').next().unwrap();
    let (host, port) = hostport.rsplit_once(':').unwrap();
    let stun_port = stun.rsplit_once(':').unwrap().1.parse().unwrap();
    (
        host.to_owned(),
        port.parse().unwrap(),
        t.username.clone().unwrap(),
        t.credential.clone().expect("a credential with the username"),
        stun_port,
    )
}

#[tokio::test]
async fn welcome_credentials_relay_through_the_builtin_turn() {
    if !have_coturn() {
        return;
    }
    let server = ServerProc::start(&["--turn-listen", "127.0.0.1:0", "--turn-allow-peer", "127.0.0.0/8"]);
    assert!(server.banner.iter().any(|l| l.contains("STUN/TURN on udp+tcp 127.0.0.1:")), "{:?}", server.banner);
    let (c, w) = Client::join(&server.ws_url(), "relay", "A").await;
    let (host, port, user, cred, stun_port) = turn_entry(&w);
    assert_eq!(host, "127.0.0.1");
    assert_eq!(stun_port, port);
    assert!(user.ends_with(&format!(":{}", c.id)), "TURN REST username <expiry>:<peer id>: {user}");
    let urls: Vec<&String> = ice_servers(&w).iter().flat_map(|s| &s.urls).collect();
    let has = |t: &str| urls.iter().any(|u| u.contains(t));
    assert!(has("transport=udp") && has("transport=tcp"), "{urls:?}");

    let stun = Command::new("timeout")
        .args(["20", "turnutils_stunclient", "-p", &port.to_string(), "127.0.0.1"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&stun.stdout);
    assert!(text.contains("UDP reflexive addr: 127.0.0.1:"), "{text}");

    let (_peer, peer_port) = echo_peer();
    let (ok, sent, recv, lost, out) = uclient("127.0.0.1", port, &["-u", &user, "-w", &cred], peer_port);
    assert!(ok && sent == 50 && recv == 50 && lost == 0, "relay with the welcome's credentials:\n{out}");
    let (ok, _, recv, _, out) = uclient("127.0.0.1", port, &["-u", &user, "-w", "wrong"], peer_port);
    assert!(!ok || recv == 0, "a wrong credential must not relay:\n{out}");

    let m = server.metrics();
    assert!(to_peer_packets(&m) >= 50, "{m}");
    assert!(m.contains("# TYPE webcall_turn_allocations gauge"), "{m}");
}

#[tokio::test]
async fn relaying_to_loopback_is_refused_by_default() {
    if !have_coturn() {
        return;
    }
    let server = ServerProc::start(&["--turn-listen", "127.0.0.1:0"]);
    let (_c, w) = Client::join(&server.ws_url(), "r", "A").await;
    let (_, port, user, cred, _) = turn_entry(&w);
    let (_peer, peer_port) = echo_peer();
    let (_, _, recv, _, out) = uclient("127.0.0.1", port, &["-u", &user, "-w", &cred], peer_port);
    assert_eq!(recv, 0, "nothing may reach a loopback peer without --turn-allow-peer:\n{out}");
}

#[tokio::test]
async fn ice_servers_point_at_an_external_coturn_with_the_shared_secret() {
    if !have_coturn() {
        return;
    }
    const SECRET: &str = "shared-with-coturn";
    let port = free_udp_port();
    let dir = common::temp_dir("coturn");
    let _coturn = Proc(
        Command::new("turnserver")
            .args(["-n", "--listening-ip", "127.0.0.1", "--relay-ip", "127.0.0.1", "-p", &port.to_string()])
            .args(["--use-auth-secret", "--static-auth-secret", SECRET, "--realm", "webcall", "--allow-loopback-peers"])
            .args(["--no-tls", "--no-dtls", "--no-cli", "--min-port", "40000", "--max-port", "40100"])
            .arg("--pidfile")
            .arg(dir.path().join("turnserver.pid"))
            .arg("--log-file")
            .arg(dir.path().join("turnserver.log"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    std::thread::sleep(Duration::from_millis(500));
    let urls = format!("stun:127.0.0.1:{port},turn:127.0.0.1:{port}?transport=udp");
    let server = ServerProc::start(&["--ice-servers", &urls, "--turn-secret", SECRET]);
    assert!(!server.banner.iter().any(|l| l.contains("STUN/TURN on")), "no built-in TURN: {:?}", server.banner);
    let (_c, w) = Client::join(&server.ws_url(), "r", "A").await;
    let (_, turn_port, user, cred, _) = turn_entry(&w);
    assert_eq!(turn_port, port);
    let (_peer, peer_port) = echo_peer();
    let (ok, sent, recv, lost, out) = uclient("127.0.0.1", port, &["-u", &user, "-w", &cred], peer_port);
    assert!(ok && sent == 50 && recv == 50 && lost == 0, "coturn accepts webcall's credentials:\n{out}");

    let out = Command::new(env!("CARGO_BIN_EXE_webcall"))
        .args(["serve", "--listen", "127.0.0.1:0", "--ice-servers", &urls])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("--turn-secret"), "turn: URLs need the secret: {err}");
}

#[tokio::test]
async fn webcall_turn_runs_alone() {
    if !have_coturn() {
        return;
    }
    let mut child = Command::new(env!("CARGO_BIN_EXE_webcall"))
        .args([
            "turn",
            "--turn-listen",
            "127.0.0.1:0",
            "--turn-secret",
            "alone-secret",
            "--turn-allow-peer",
            "127.0.0.0/8",
        ])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let _guard = Proc(child);
    let port: u16 = line.rsplit(':').next().unwrap().trim().parse().unwrap_or_else(|_| panic!("{line}"));
    let (_peer, peer_port) = echo_peer();
    let (ok, sent, recv, lost, out) = uclient("127.0.0.1", port, &["-W", "alone-secret", "-u", "bob"], peer_port);
    assert!(ok && sent == 50 && recv == 50 && lost == 0, "{out}");
}

/// SIGTERM and SIGINT right after the banner are a graceful stop (exit status 0), not death by the signal:
/// both handlers are installed before the server starts.
#[test]
fn webcall_turn_stops_gracefully_on_a_signal_right_after_start() {
    use std::os::unix::process::ExitStatusExt;
    for sig in [libc::SIGINT, libc::SIGTERM] {
        let mut child = Command::new(env!("CARGO_BIN_EXE_webcall"))
            .args(["turn", "--turn-listen", "127.0.0.1:0", "--turn-secret", "sig-secret"])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        assert!(line.contains("STUN/TURN"), "{line}");
        // SAFETY: kill(2) on our own child's pid.
        assert_eq!(unsafe { libc::kill(child.id() as libc::pid_t, sig) }, 0);
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        let status = loop {
            if let Some(s) = child.try_wait().unwrap() {
                break s;
            }
            assert!(std::time::Instant::now() < deadline, "webcall turn did not stop on signal {sig}");
            std::thread::sleep(Duration::from_millis(20));
        };
        assert!(status.success(), "signal {sig}: {status:?} (killed by signal {:?})", status.signal());
    }
}

// ---- Interop: coturn's clients in their default modes against `webcall serve` as an operator starts it ----

const SECRET: &str = "interop-secret";

/// `webcall serve --turn-secret … --turn-allow-peer 127.0.0.0/8 EXTRA…` on loopback: the process, its
/// STUN/TURN port (UDP and TCP) and, with `--turns-listen`, its TURN-over-TLS port.
fn serve_turn(extra: &[&str]) -> (ServerProc, u16, Option<u16>) {
    let mut args = vec!["--turn-listen", "127.0.0.1:0", "--turn-secret", SECRET, "--turn-allow-peer", "127.0.0.0/8"];
    args.extend_from_slice(extra);
    let server = ServerProc::start(&args);
    let line = server.banner.iter().find(|l| l.contains("STUN/TURN on udp+tcp ")).expect("TURN banner").clone();
    let rest = line.split("udp+tcp ").nth(1).unwrap();
    let port_of = |s: &str| s.trim().rsplit(':').next().unwrap().parse::<u16>().unwrap();
    let (plain, tls) = match rest.split_once(", turns ") {
        Some((p, t)) => (port_of(p), Some(port_of(t))),
        None => (port_of(rest), None),
    };
    (server, plain, tls)
}

/// `turnutils_uclient` relaying `n` messages for each of `m` clients through `port` to the echo peer on
/// `peer_port`, with TURN REST credentials from the shared secret, plus `flags`.
fn uclient_relay(port: u16, peer_port: u16, n: u64, m: u64, flags: &[&str]) -> (bool, u64, u64, u64, String) {
    let out = Command::new("timeout")
        .args(["60", "turnutils_uclient", "-W", SECRET, "-u", "alice", "-e", "127.0.0.1"])
        .args(["-r", &peer_port.to_string(), "-n", &n.to_string(), "-m", &m.to_string()])
        .args(["-l", "120", "-z", "5", "-X"])
        .args(flags)
        .args(["-p", &port.to_string(), "127.0.0.1"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    summary(out)
}

/// Relays through a fresh `webcall serve` with `flags` and checks every message came back.
fn interop(serve_extra: &[&str], flags: &[&str]) {
    if !have_coturn() {
        return;
    }
    let (server, port, tls) = serve_turn(serve_extra);
    let port = if flags.contains(&"-S") { tls.expect("--turns-listen bound") } else { port };
    let (_peer, peer_port) = echo_peer();
    let (n, m) = (100, 2);
    let (ok, sent, recv, lost, out) = uclient_relay(port, peer_port, n, m, flags);
    assert!(ok, "uclient {flags:?} failed:\n{out}");
    if flags.contains(&"-c") {
        assert_eq!(sent, n * m, "{out}");
    } else {
        assert!(sent >= n * m, "{out}");
    }
    assert_eq!((recv, lost), (sent, 0), "{out}");
    drop(server);
}

/// uclient's default: UDP with channels, whose numbers it picks from RFC 5766's 0x4000-0x7FFF.
#[test]
fn uclient_default_mode_channels() {
    interop(&[], &["-c"]);
}

/// Without -c, RTP/RTCP allocation pairs: EVEN-PORT with the R bit, then RESERVATION-TOKEN.
#[test]
fn uclient_rtp_rtcp_pairs() {
    interop(&[], &[]);
}

#[test]
fn uclient_send_indications() {
    interop(&[], &["-c", "-s"]);
}

/// DONT-FRAGMENT in the Allocate (-g): honoured, not answered with 420.
#[test]
fn uclient_dont_fragment() {
    interop(&[], &["-c", "-g"]);
}

#[test]
fn uclient_tcp_channels() {
    interop(&[], &["-c", "-t"]);
}

#[test]
fn uclient_tcp_send_indications() {
    interop(&[], &["-c", "-t", "-s"]);
}

/// TURN over TLS on --turns-listen with the server's (self-signed) certificate; uclient does not verify it.
#[test]
fn uclient_tls() {
    interop(&["--tls-self-signed", "--turns-listen", "127.0.0.1:0"], &["-c", "-t", "-S"]);
}

/// Two clients relaying to each other's relayed addresses on this same server (relay to relay).
#[test]
fn uclient_client_to_client() {
    interop(&[], &["-c", "-y"]);
}

/// ICE mobility (-M): uclient asks for a MOBILITY-TICKET, which webcall does not issue (RFC 8016 is
/// optional); the allocation works without it.
#[test]
fn uclient_mobility_mode() {
    interop(&[], &["-c", "-M"]);
}

fn to_peer_packets(m: &str) -> u64 {
    m.lines()
        .find_map(|l| l.strip_prefix("webcall_turn_relayed_packets_total{direction=\"to-peer\"} "))
        .expect("TURN metrics")
        .parse()
        .unwrap()
}

/// Issue 19 item 4: with --turn-external-ip, neither that address (a service on the host) nor the TURN port
/// is a peer, over channels or Send indications; relaying elsewhere keeps working meanwhile.
#[tokio::test]
async fn relaying_to_the_server_itself_is_refused() {
    if !have_coturn() {
        return;
    }
    let (server, port, _) = serve_turn(&["--turn-external-ip", "127.0.0.3"]);
    // A UDP service on the server's external address.
    let service = UdpSocket::bind("127.0.0.3:0").unwrap();
    service.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
    let service_port = service.local_addr().unwrap().port();
    let attack = |peer: &str, peer_port: u16, flags: &[&str]| {
        let out = Command::new("timeout")
            .args(["30", "turnutils_uclient", "-W", SECRET, "-u", "mallory", "-e", peer])
            .args(["-r", &peer_port.to_string(), "-n", "20", "-m", "1", "-z", "5", "-X", "-c"])
            .args(flags)
            .args(["-p", &port.to_string(), "127.0.0.1"])
            .stdin(Stdio::null())
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
    };
    for flags in [&[][..], &["-s"][..]] {
        let text = attack("127.0.0.3", service_port, flags);
        let mut b = [0u8; 2048];
        assert!(service.recv_from(&mut b).is_err(), "the host service got relayed data ({flags:?}):\n{text}");
        attack("127.0.0.1", port, flags);
    }
    assert_eq!(to_peer_packets(&server.metrics()), 0, "nothing relayed to the server itself");
    let (_peer, peer_port) = echo_peer();
    let (ok, sent, recv, lost, out) = uclient_relay(port, peer_port, 50, 1, &["-c"]);
    assert!(ok && sent == 50 && recv == 50 && lost == 0, "a well-behaved relay keeps working:\n{out}");
    assert!(to_peer_packets(&server.metrics()) >= 50);
}
