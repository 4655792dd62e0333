//! SFU rooms across a cluster: real `redis-server`, three real `webcall serve --redis` nodes and real native peers
//! (`webcall peer --sfu`) on loopback, each peer on another node. The room's media goes through one node's SFU;
//! when that node is killed (SIGKILL), the room's SFU moves to a live node and the survivors' media resumes there.

use webcall_testkit as common;
use webcall_testkit::redis;

use common::msg::hello;
use common::{Client, Proc, ServerProc};
use redis::Redis;
use std::sync::Mutex;
use std::time::{Duration, Instant};
use webcall_protocol::{ErrorCode, Join, PeerData, ServerMessage as M, Signal, SFU_PEER};

/// `{"type":"topology","mode":"sfu"}` (no restart).
fn to_sfu() -> M {
    M::Topology { mode: "sfu".into(), restart: false }
}

/// How long to wait for something that should happen (not a performance bound).
const WAIT: Duration = Duration::from_secs(90);

/// The tests with media run one at a time: each has three real-time encoders and three nodes on two shared cores.
static MEDIA: Mutex<()> = Mutex::new(());

/// `webcall peer --sfu` sending the test source; waits on its output count lines from a given one on (what came
/// after a kill).
struct PeerProc(Proc);

impl PeerProc {
    /// A peer that stays `duration` (then says `bye`).
    fn start(url: &str, room: &str, name: &str, duration: &str) -> PeerProc {
        let extra = ["--sfu", "--send", "testsrc", "--duration", duration];
        PeerProc(Proc::peer(url, room, name, &extra).waiting(WAIT))
    }

    /// Index of the first line from `from` on that satisfies `pred`.
    fn wait_for(&self, what: &str, from: usize, pred: impl Fn(&str) -> bool) -> usize {
        let t0 = Instant::now();
        loop {
            if let Some(i) = self.0.lines().iter().skip(from).position(|l| pred(l)) {
                return from + i;
            }
            assert!(t0.elapsed() < WAIT, "{}: no {what} in:\n{}", self.0.tag(), self.0.output());
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn id(&self) -> String {
        self.0.id()
    }

    /// Waits (from line `from` on) for a stats line of `peer` received through the SFU with more than `frames`
    /// video frames and some audio.
    fn wait_media(&self, peer: &str, from: usize, frames: u64) -> usize {
        let prefix = format!("stats peer={peer} ");
        self.wait_for(&format!("{frames} frames of {peer} via the sfu"), from, |l| {
            l.starts_with(&prefix)
                && l.contains("pair=\"sfu\"")
                && field(l, "frames_in") > frames
                && field(l, "audio_in") > 0
        })
    }

    fn len(&self) -> usize {
        self.0.lines().len()
    }
}

fn field(line: &str, k: &str) -> u64 {
    line.split_whitespace()
        .find_map(|f| f.strip_prefix(k).and_then(|r| r.strip_prefix('=')))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Status code of GET /healthz.
fn healthz(server: &ServerProc) -> u16 {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(server.addr) else { return 0 };
    let _ = s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    let mut r = String::new();
    let _ = s.read_to_string(&mut r);
    r.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0)
}

fn metric(m: &str, name: &str) -> u64 {
    m.lines().find_map(|l| l.strip_prefix(&format!("{name} "))).map_or(0, |v| v.trim().parse().unwrap())
}

fn sessions(nodes: &[&ServerProc]) -> Vec<u64> {
    nodes.iter().map(|n| metric(&n.metrics(), "webcall_sfu_sessions")).collect()
}

fn node(redis: &Redis, id: &str) -> ServerProc {
    let url = redis.url();
    ServerProc::start(&["--redis", url.as_str(), "--node-id", id, "--node-ttl", "1s", "--rate-limit", "2000"])
}

#[test]
fn an_sfu_room_spans_nodes_and_survives_the_death_of_its_sfu_node() {
    let _one = MEDIA.lock().unwrap_or_else(|e| e.into_inner());
    let redis = Redis::start();
    let nodes = [node(&redis, "n1"), node(&redis, "n2"), node(&redis, "n3")];
    let mut nodes: Vec<Option<ServerProc>> = nodes.into_iter().map(Some).collect();
    let url = |i: usize| nodes[i].as_ref().unwrap().ws_url();
    // One peer per node; the third join moves the room to the SFU, on the third peer's node (n3).
    let mut peers: Vec<PeerProc> = Vec::new();
    for i in 0..3 {
        peers.push(PeerProc::start(&url(i), "span", &format!("p{i}"), "300s"));
        peers[i].id();
    }
    let ids: Vec<String> = peers.iter().map(PeerProc::id).collect();
    for p in &peers {
        p.wait_for("the sfu session", 0, |l| l == "sfu connected");
    }
    for (i, p) in peers.iter().enumerate() {
        for (j, other) in ids.iter().enumerate().filter(|(j, _)| *j != i) {
            let at = p.wait_media(other, 0, 30);
            eprintln!("p{i} gets p{j} through the sfu: line {at}");
        }
    }
    let live: Vec<&ServerProc> = nodes.iter().flatten().collect();
    assert_eq!(sessions(&live), [0, 0, 3], "the room's media lives on one node, n3 (its SFU sessions per node)");

    // SIGKILL the SFU's node: p2 goes with it; p0 and p1 are told to reconnect, to n1 (the earliest member's).
    let marks: Vec<usize> = peers.iter().map(PeerProc::len).collect();
    nodes[2].take().unwrap().kill();
    let killed = Instant::now();
    for i in 0..2 {
        peers[i].wait_for("the restart", marks[i], |l| l == "sfu restart");
    }
    eprintln!("told to restart {:?} after the kill", killed.elapsed());
    for (i, j) in [(0, 1), (1, 0)] {
        let restart = peers[i].wait_for("the restart", marks[i], |l| l == "sfu restart");
        peers[i].wait_for("the new sfu session", restart, |l| l == "sfu connected");
        peers[i].wait_media(&ids[j], restart, 30);
    }
    eprintln!("media resumed {:?} after the kill", killed.elapsed());
    let live: Vec<&ServerProc> = nodes.iter().flatten().collect();
    assert_eq!(sessions(&live), [2, 0], "the room's media moved to n1");
}

#[test]
fn the_sfu_node_serves_a_room_it_hosts_no_member_of_and_hands_it_over_on_shutdown() {
    let _one = MEDIA.lock().unwrap_or_else(|e| e.into_inner());
    let redis = Redis::start();
    let (n1, mut n2) = (node(&redis, "n1"), node(&redis, "n2"));
    // Two peers on n1, the third on n2: its join moves the room to n2's SFU.
    let p0 = PeerProc::start(&n1.ws_url(), "away", "p0", "300s");
    p0.id();
    let p1 = PeerProc::start(&n1.ws_url(), "away", "p1", "300s");
    p1.id();
    let p2 = PeerProc::start(&n2.ws_url(), "away", "p2", "12s");
    p2.id();
    let (id0, id1) = (p0.id(), p1.id());
    p0.wait_media(&id1, 0, 30);
    p1.wait_media(&id0, 0, 30);
    // p2 says bye: n2 hosts nobody of the room now, and still carries its media.
    let gone = p0.wait_for("p2's bye", 0, |l| l.ends_with(" left"));
    let deadline = Instant::now() + WAIT;
    while sessions(&[&n1, &n2]) != [0, 2] {
        assert!(Instant::now() < deadline, "SFU sessions per node: {:?}", sessions(&[&n1, &n2]));
        std::thread::sleep(Duration::from_millis(200));
    }
    let after = p0.len().max(gone);
    p0.wait_media(&id1, after, 30);
    p1.wait_media(&id0, p1.len(), 30);

    // SIGTERM: n2 hands its rooms over as it goes (no wait for its liveness key to expire).
    let marks = [p0.len(), p1.len()];
    n2.signal("TERM");
    assert_eq!(n2.wait_exit(), Some(0));
    for (p, (mark, other)) in [&p0, &p1].into_iter().zip([(marks[0], &id1), (marks[1], &id0)]) {
        let restart = p.wait_for("the restart", mark, |l| l == "sfu restart");
        p.wait_for("the new sfu session", restart, |l| l == "sfu connected");
        p.wait_media(other, restart, 30);
    }
    assert_eq!(sessions(&[&n1]), [2], "the room's media moved to n1");
}

/// An offer the SFU cannot use: its refusal comes back from the room's SFU node, whichever node the client is on.
async fn sfu_refuses_an_offer(c: &mut Client) {
    c.relay(SFU_PEER, Signal::Offer("not an SDP".into())).await;
    let e = c.expect_error(ErrorCode::BadField).await;
    assert_eq!(e.refers_to.as_deref(), Some("offer"), "{e}");
    assert!(e.message.contains("SFU"), "{e}");
}

#[tokio::test]
async fn sfu_signaling_crosses_nodes_and_the_room_keeps_its_sfu_node_when_redis_restarts_empty() {
    let mut redis = Redis::start_outside_ephemeral();
    let port = redis.port;
    let (n1, n2) = (node(&redis, "n1"), node(&redis, "n2"));
    let (mut a, _) = Client::join_sfu(&n1.ws_url(), "keep", "A").await;
    let (mut b, _) = Client::join_sfu(&n2.ws_url(), "keep", "B").await;
    assert_eq!(a.recv().await, hello(&b.id, "B"));
    // The third join (on n2) moves the room to n2's SFU: everyone hears topology, before the hello.
    let (mut c, _) = Client::join_sfu(&n2.ws_url(), "keep", "C").await;
    assert_eq!(c.recv().await, to_sfu());
    for x in [&mut a, &mut b] {
        assert_eq!(x.recv().await, to_sfu());
        assert_eq!(x.recv().await, hello(&c.id, "C"));
    }
    let owner = || redis::command_reply(port, "GET wc:sfu:keep");
    assert_eq!(owner(), "$2\r\nn2\r\n");
    // A's offer to `sfu` goes from n1 to n2's SFU, and its refusal back.
    sfu_refuses_an_offer(&mut a).await;
    sfu_refuses_an_offer(&mut b).await;
    // `data` reaches the members on the other node.
    let chat = PeerData::chat("hi", "A", 1).to_value();
    a.send_data(&chat).await;
    for x in [&mut b, &mut c] {
        assert_eq!(x.recv().await, M::Data { from: a.id.clone(), data: chat.clone() });
    }

    // Redis restarted empty: the nodes put the room back, SFU node included.
    redis.stop();
    let _redis = Redis::start_on(port);
    redis::wait_until("the room's SFU node restored", WAIT, || owner() == "$2\r\nn2\r\n");
    // Each node takes joins again once it has answered Redis again.
    for n in [&n1, &n2] {
        let deadline = Instant::now() + WAIT;
        while healthz(n) != 200 {
            assert!(Instant::now() < deadline, "/healthz of a node did not become 200");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let mut v1 = Client::connect(&n1.ws_url()).await;
    v1.send_join(Join::new("keep", "old")).await;
    v1.expect_error(ErrorCode::NeedsSfu).await;
    let (mut d, _) = Client::join_sfu(&n1.ws_url(), "keep", "D").await;
    assert_eq!(d.recv().await, to_sfu());
    // Nobody was told to restart: the SFU did not move.
    assert_eq!(a.recv().await, hello(&d.id, "D"));
    sfu_refuses_an_offer(&mut a).await;
    sfu_refuses_an_offer(&mut d).await;
}
