//! Calls across real NATs (issue 4): the test builds its own hosts as network namespaces and runs real `webcall
//! serve` and `webcall peer` processes in them.
//!
//! ```text
//!   peer A 192.0.2.10 ── natA (192.0.2.1 | 198.51.100.2) ──┐
//!                                                          ├─ br0 198.51.100.1: webcall serve (signaling :8080,
//!   peer B 203.0.113.10 ─ natB (203.0.113.1 | 198.51.100.3) ┘      STUN/TURN :3478)
//! ```
//!
//! Every address is a documentation range (RFC 5737) that exists only inside the test's own namespaces; nothing else
//! is ever addressed. The NAT routers masquerade with nftables. What Linux conntrack gives:
//!
//! - `masquerade` alone: the source port is kept when it is free (port preservation), and one socket keeps one
//!   mapping whatever it sends to — endpoint-independent mapping. Filtering is address-and-port dependent: only packets
//!   matching a conntrack entry (a reply to something sent out) come back in; anything else is delivered to the
//!   router itself. A "port-restricted cone" NAT, where ICE's simultaneous checks punch the hole, so the call
//!   connects on server-reflexive candidates. The routers also drop new inbound flows on their WAN side before
//!   conntrack records them, as home routers do: otherwise a check that arrives before the local peer's own first
//!   packet to that address leaves an entry for exactly that 5-tuple, the outgoing packet clashes with it, and
//!   conntrack moves it to another port, which turns the cone into a symmetric NAT for that flow.
//! - `masquerade fully-random`: every new flow (each destination) gets a random port — endpoint-dependent mapping, a
//!   symmetric NAT. The port the STUN server saw is not the one the other peer's checks would have to reach, and the
//!   other NAT drops checks from ports nobody sent to, so only the TURN relay connects.
//!
//! Namespaces are named per process and case, so parallel runs do not collide, and are deleted (with the processes in
//! them) when the test ends, failed or not. Needs root, `ip` (iproute2) and `nft` (nftables); skipped otherwise.

use std::process::Command;
use std::time::{Duration, Instant};
use webcall_testkit::Proc;

/// How long to wait for something that should happen (not a performance bound).
const WAIT: Duration = Duration::from_secs(30);
const SERVER: &str = "198.51.100.1";

fn run(args: &[&str]) -> Result<(), String> {
    let out = Command::new(args[0]).args(&args[1..]).output().map_err(|e| format!("{}: {e}", args.join(" ")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("{} failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim()))
    }
}

/// Why the test cannot run here, if it cannot.
fn unsupported() -> Option<String> {
    let uid = Command::new("id").arg("-u").output().ok().map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned());
    if uid.as_deref() != Some("0") {
        return Some("not root (network namespaces need it)".into());
    }
    for (bin, pkg) in [("ip", "iproute2"), ("nft", "nftables")] {
        let found =
            Command::new("sh").args(["-c", &format!("command -v {bin}")]).output().is_ok_and(|o| o.status.success());
        if !found {
            return Some(format!("`{bin}` is missing (apt-get install {pkg}; scripts/test.sh does)"));
        }
    }
    None
}

/// The namespaces of one case; deleted on drop, with whatever still runs in them.
struct Net {
    names: Vec<String>,
}

impl Net {
    fn ns(&self, role: &str) -> String {
        self.names.iter().find(|n| n.ends_with(&format!("-{role}"))).unwrap().clone()
    }

    /// Deletes namespaces a killed earlier run of this test left behind (its process is gone).
    fn remove_stale() {
        let Ok(o) = Command::new("ip").args(["netns", "list"]).output() else { return };
        for name in String::from_utf8_lossy(&o.stdout).lines().filter_map(|l| l.split_whitespace().next()) {
            let Some(pid) = name.strip_prefix("wcnat-").and_then(|r| r.split('-').next()) else { continue };
            if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
                drop(Net { names: vec![name.to_owned()] });
            }
        }
    }

    /// Builds the topology above; `symmetric_a` makes natA a symmetric NAT.
    fn build(case: &str, symmetric_a: bool) -> Result<Net, String> {
        Self::build_with(case, symmetric_a, Firewall::Open)
    }

    /// The same, with natA's `firewall` in front of peer A.
    fn build_with(case: &str, symmetric_a: bool, firewall: Firewall) -> Result<Net, String> {
        Self::remove_stale();
        let prefix = format!("wcnat-{}-{case}", std::process::id());
        let names: Vec<String> = ["pub", "nata", "a", "natb", "b"].iter().map(|r| format!("{prefix}-{r}")).collect();
        let mut net = Net { names: Vec::new() };
        for n in &names {
            run(&["ip", "netns", "add", n])?;
            net.names.push(n.clone());
            run(&["ip", "-n", n, "link", "set", "lo", "up"])?;
        }
        let (public, nata, a, natb, b) = (&names[0], &names[1], &names[2], &names[3], &names[4]);
        run(&["ip", "-n", public, "link", "add", "br0", "type", "bridge"])?;
        run(&["ip", "-n", public, "addr", "add", &format!("{SERVER}/24"), "dev", "br0"])?;
        run(&["ip", "-n", public, "link", "set", "br0", "up"])?;
        for (nat, host, port, wan, lan, host_ip, random) in [
            (nata, a, "pa", "198.51.100.2/24", "192.0.2.1", "192.0.2.10", symmetric_a),
            (natb, b, "pb", "198.51.100.3/24", "203.0.113.1", "203.0.113.10", false),
        ] {
            // Links are created inside the namespaces, so no name ever exists in the host's namespace.
            run(&["ip", "-n", public, "link", "add", port, "type", "veth", "peer", "name", "wan", "netns", nat])?;
            run(&["ip", "-n", public, "link", "set", port, "master", "br0", "up"])?;
            run(&["ip", "-n", nat, "addr", "add", wan, "dev", "wan"])?;
            run(&["ip", "-n", nat, "link", "set", "wan", "up"])?;
            run(&["ip", "-n", nat, "link", "add", "lan", "type", "veth", "peer", "name", "eth0", "netns", host])?;
            run(&["ip", "-n", nat, "addr", "add", &format!("{lan}/24"), "dev", "lan"])?;
            run(&["ip", "-n", nat, "link", "set", "lan", "up"])?;
            run(&["ip", "-n", host, "addr", "add", &format!("{host_ip}/24"), "dev", "eth0"])?;
            run(&["ip", "-n", host, "link", "set", "eth0", "up"])?;
            run(&["ip", "-n", host, "route", "add", "default", "via", lan])?;
            run(&["ip", "netns", "exec", nat, "sysctl", "-qw", "net.ipv4.ip_forward=1"])?;
            let nft = |args: &[&str]| run(&[&["ip", "netns", "exec", nat, "nft"][..], args].concat());
            nft(&["add", "table", "ip", "nat"])?;
            nft(&["add", "chain", "ip", "nat", "post", "{ type nat hook postrouting priority srcnat; }"])?;
            let masquerade: &[&str] = if random { &["masquerade", "fully-random"] } else { &["masquerade"] };
            nft(&[&["add", "rule", "ip", "nat", "post", "oifname", "wan"][..], masquerade].concat())?;
            // A home router's firewall: nothing new comes in from the WAN. Dropped before conntrack confirms
            // it, an unsolicited packet leaves no entry behind; without this, a peer's check that arrives
            // before our own outgoing one creates an entry for exactly that 5-tuple, and our check then
            // clashes with it and leaves on another port (Linux re-maps rather than reuse a taken tuple).
            nft(&["add", "table", "ip", "filter"])?;
            for hook in ["input", "forward"] {
                nft(&[
                    "add",
                    "chain",
                    "ip",
                    "filter",
                    hook,
                    &format!("{{ type filter hook {hook} priority filter; }}"),
                ])?;
                nft(&["add", "rule", "ip", "filter", hook, "iifname", "wan", "ct", "state", "new", "drop"])?;
            }
            if nat == nata {
                // Networks that let only TCP out (UDP entirely), or only TLS's port.
                let deny: &[&[&str]] = match firewall {
                    Firewall::Open => &[],
                    Firewall::NoUdp => &[&["meta", "l4proto", "udp"]],
                    Firewall::NoUdpNoTurnTcp => &[&["meta", "l4proto", "udp"], &["tcp", "dport", "3478"]],
                };
                for d in deny {
                    nft(&[&["add", "rule", "ip", "filter", "forward", "iifname", "lan"][..], d, &["drop"]].concat())?;
                }
            }
        }
        Ok(net)
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for n in &self.names {
            // Anything still running in our namespaces was started by this test.
            if let Ok(o) = Command::new("ip").args(["netns", "pids", n]).output() {
                for pid in String::from_utf8_lossy(&o.stdout).split_whitespace() {
                    let _ = Command::new("kill").args(["-9", pid]).status();
                }
            }
        }
        for n in self.names.iter().rev() {
            if let Err(e) = run(&["ip", "netns", "del", n]) {
                eprintln!("cleanup: {e}");
            }
        }
    }
}

/// What natA lets out from peer A.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Firewall {
    Open,
    /// No UDP at all: STUN and TURN over UDP fail; TURN over TCP is the way out.
    NoUdp,
    /// No UDP and not the TURN TCP port: only TURN over TLS (5349) gets through.
    NoUdpNoTurnTcp,
}

/// `webcall ARGS…` inside namespace `ns`.
fn start(ns: &str, tag: &str, args: &[&str]) -> Proc {
    Proc::in_netns(ns, tag, args, &[])
}

/// `p`'s latest `selected pair` line's (local, remote) candidate kinds for peer `id`, once `accept` takes them.
fn pair_kinds(p: &Proc, id: &str, accept: impl Fn(&str, &str) -> bool) -> (String, String) {
    let prefix = format!("peer {id} selected pair ");
    let t0 = Instant::now();
    loop {
        let last = p.lines().into_iter().rev().find(|l| l.starts_with(&prefix));
        if let Some(l) = last {
            let field = |k: &str| l.split_whitespace().find_map(|f| f.strip_prefix(k)).unwrap_or("?").to_owned();
            let (local, remote) = (field("local="), field("remote="));
            if accept(&local, &remote) || t0.elapsed() >= WAIT {
                return (local, remote);
            }
        } else {
            assert!(t0.elapsed() < WAIT, "{}: no selected pair in:\n{}", p.tag(), p.output());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The most frames `p`'s final stats lines report from peer `id`.
fn frames_from(p: &Proc, id: &str) -> u64 {
    let prefix = format!("stats final peer={id} ");
    p.lines()
        .iter()
        .filter(|l| l.starts_with(&prefix))
        .filter_map(|l| l.split_whitespace().find_map(|f| f.strip_prefix("frames_in="))?.parse().ok())
        .max()
        .unwrap_or(0)
}

/// Starts the server in the public namespace and peers A and B behind their NATs; both send the test pattern for a
/// few seconds. Returns (server, a, b, a's id, b's id), connected.
fn call(net: &Net) -> (Proc, Proc, Proc, String, String) {
    let server = start(
        &net.ns("pub"),
        "serve",
        &[
            "serve",
            "--listen",
            &format!("{SERVER}:8080"),
            "--turn-listen",
            &format!("{SERVER}:3478"),
            "--turn-allow-peer",
            "198.51.100.0/24",
        ],
    );
    server.wait_for("listening", |l| l.contains("listening on"));
    let url = format!("ws://{SERVER}:8080/ws");
    let common = [
        "--server",
        &url,
        "--room",
        "nat",
        "--send",
        "testsrc",
        "--size",
        "320x180",
        "--stats-every",
        "1s",
        "--duration",
        "8s",
    ];
    let a = start(&net.ns("a"), "A", &[&["peer", "--name", "a"][..], &common[..]].concat());
    let a_id = a.id();
    let b = start(&net.ns("b"), "B", &[&["peer", "--name", "b"][..], &common[..]].concat());
    let b_id = b.id();
    a.wait_for("connected", |l| l == format!("peer {b_id} connected"));
    b.wait_for("connected", |l| l == format!("peer {a_id} connected"));
    (server, a, b, a_id, b_id)
}

fn finish(a: &mut Proc, b: &mut Proc, a_id: &str, b_id: &str) {
    assert_eq!(a.wait_exit(), 0, "A:\n{}", a.output());
    assert_eq!(b.wait_exit(), 0, "B:\n{}", b.output());
    // Video flowed both ways across the NATs (the exit code says so too; the counts make failures readable).
    assert!(frames_from(a, b_id) >= 30, "A got {} frames:\n{}", frames_from(a, b_id), a.output());
    assert!(frames_from(b, a_id) >= 30, "B got {} frames:\n{}", frames_from(b, a_id), b.output());
}

#[test]
fn cone_nats_connect_on_server_reflexive_candidates() {
    if let Some(why) = unsupported() {
        eprintln!("SKIPPED: calls across NATs: {why}");
        return;
    }
    let net = Net::build("cone", false).unwrap_or_else(|e| panic!("building the namespaces: {e}"));
    let (_server, mut a, mut b, a_id, b_id) = call(&net);
    // Each side learned its NAT's public address from the STUN server.
    a.wait_for("srflx", |l| l.starts_with(&format!("peer {b_id} local candidate srflx 198.51.100.2:")));
    b.wait_for("srflx", |l| l.starts_with(&format!("peer {a_id} local candidate srflx 198.51.100.3:")));
    let direct = |l: &str, r: &str| l != "relay" && r != "relay";
    let pa = pair_kinds(&a, &b_id, direct);
    let pb = pair_kinds(&b, &a_id, direct);
    assert!(direct(&pa.0, &pa.1) && direct(&pb.0, &pb.1), "no relay between cone NATs: A {pa:?}, B {pb:?}");
    // A socket's own address (host) talks to the other NAT's public mapping (srflx, or prflx if the check came
    // before the trickled candidate): at least one side sees it as the server-reflexive candidate it was signalled.
    assert!([&pa.1, &pb.1].iter().any(|k| *k == "srflx"), "srflx on one side: A {pa:?}, B {pb:?}");
    finish(&mut a, &mut b, &a_id, &b_id);
}

#[test]
fn symmetric_nat_connects_only_through_the_relay() {
    if let Some(why) = unsupported() {
        eprintln!("SKIPPED: calls across NATs: {why}");
        return;
    }
    let net = Net::build("sym", true).unwrap_or_else(|e| panic!("building the namespaces: {e}"));
    let (_server, mut a, mut b, a_id, b_id) = call(&net);
    let relayed = |l: &str, r: &str| l == "relay" || r == "relay";
    let pa = pair_kinds(&a, &b_id, relayed);
    let pb = pair_kinds(&b, &a_id, relayed);
    assert!(relayed(&pa.0, &pa.1) && relayed(&pb.0, &pb.1), "through the relay: A {pa:?}, B {pb:?}");
    finish(&mut a, &mut b, &a_id, &b_id);
    // It stayed there: no later pair went direct.
    for (p, id) in [(&a, &b_id), (&b, &a_id)] {
        let prefix = format!("peer {id} selected pair ");
        let out = p.output();
        for l in out.lines().filter(|l| l.starts_with(&prefix)) {
            assert!(l.contains("=relay"), "{}: a direct pair across a symmetric NAT: {l}\n{out}", p.tag());
        }
    }
}

/// Issue 16: peer A's network lets no UDP out (and, in the second case, not the TURN TCP port either). Its
/// UDP allocation fails, and it falls back to TURN over TCP, then TURN over TLS, to a `webcall turn` beside
/// `webcall serve` (`--ice-servers` with the shared secret); the call goes through that relay.
fn stream_fallback(case: &str, firewall: Firewall, expect: &[&str]) {
    if let Some(why) = unsupported() {
        eprintln!("SKIPPED: calls across NATs: {why}");
        return;
    }
    let net = Net::build_with(case, false, firewall).unwrap_or_else(|e| panic!("building the namespaces: {e}"));
    // A certificate for the TURN server's address, trusted by the peers through SSL_CERT_FILE.
    let dir = std::env::temp_dir().join(format!("wcnat-{}-{case}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cert = rcgen::generate_simple_self_signed(vec![SERVER.to_owned()]).unwrap();
    let (cert_file, key_file) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&cert_file, cert.cert.pem()).unwrap();
    std::fs::write(&key_file, cert.signing_key.serialize_pem()).unwrap();
    let (cert_s, key_s) = (cert_file.to_str().unwrap(), key_file.to_str().unwrap());
    let turn = start(
        &net.ns("pub"),
        "turn",
        &["turn", "--turn-listen", &format!("{SERVER}:3478"), "--turns-listen", &format!("{SERVER}:5349")]
            .into_iter()
            .chain(["--tls-cert", cert_s, "--tls-key", key_s, "--turn-secret", "nat-secret"])
            .chain(["--turn-allow-peer", "198.51.100.0/24"])
            .collect::<Vec<_>>(),
    );
    turn.wait_for("TURN listening", |l| l.contains("STUN/TURN on"));
    let urls = format!(
        "stun:{SERVER}:3478,turn:{SERVER}:3478?transport=udp,turn:{SERVER}:3478?transport=tcp,turns:{SERVER}:5349?transport=tcp"
    );
    let server = start(
        &net.ns("pub"),
        "serve",
        &["serve", "--listen", &format!("{SERVER}:8080"), "--ice-servers", &urls, "--turn-secret", "nat-secret"],
    );
    server.wait_for("listening", |l| l.contains("listening on"));
    let url = format!("ws://{SERVER}:8080/ws");
    let common = ["--server", &url, "--room", "fw", "--send", "testsrc", "--size", "320x180"];
    let common = [&common[..], &["--stats-every", "1s", "--duration", "16s"]].concat();
    let env = [("SSL_CERT_FILE", cert_s)];
    let mut a = Proc::in_netns(&net.ns("a"), "A", &[&["peer", "--name", "a"][..], &common[..]].concat(), &env);
    let a_id = a.id();
    let mut b = Proc::in_netns(&net.ns("b"), "B", &[&["peer", "--name", "b"][..], &common[..]].concat(), &env);
    let b_id = b.id();
    a.wait_for("connected", |l| l == format!("peer {b_id} connected"));
    b.wait_for("connected", |l| l == format!("peer {a_id} connected"));
    // TCP and TLS are tried together: either may win where both get through.
    let over = |l: &str| expect.iter().any(|e| l.contains(&format!("over {e} from")));
    a.wait_for("a stream allocation", |l| over(l) && l.contains("relayed address"));
    let pa = pair_kinds(&a, &b_id, |l, _| l == "relay");
    assert_eq!(pa.0, "relay", "A can only reach B through its relay: {pa:?}\n{}", a.output());
    finish(&mut a, &mut b, &a_id, &b_id);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn without_udp_the_peer_relays_over_turn_tcp_or_tls() {
    stream_fallback("notcp", Firewall::NoUdp, &["Tcp", "Tls"]);
}

#[test]
fn without_udp_and_the_turn_port_the_peer_relays_over_turn_tls() {
    stream_fallback("notls", Firewall::NoUdpNoTurnTcp, &["Tls"]);
}
