//! Several `webcall serve --redis` nodes sharing rooms through a real `redis-server` (started here, on its own
//! loopback port), with real WebSocket clients.

use webcall_testkit as common;
use webcall_testkit::redis;

use common::msg::{answer, bye, hello, offer, peer, peers};
use common::{Client, Ended, ServerProc, WAIT};
use redis::Redis;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use webcall_protocol::{ErrorCode, Join, ServerMessage as M, Signal, BYE};

fn node(redis: &Redis, id: &str, extra: &[&str]) -> ServerProc {
    let url = redis.url();
    let mut args = vec!["--redis", url.as_str(), "--node-id", id, "--rate-limit", "2000"];
    args.extend_from_slice(extra);
    ServerProc::start(&args)
}

/// Status code of GET /healthz.
async fn healthz(server: &ServerProc) -> u16 {
    let Ok(mut s) = tokio::net::TcpStream::connect(server.addr).await else { return 0 };
    let req = format!("GET /healthz HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n", server.addr);
    if s.write_all(req.as_bytes()).await.is_err() {
        return 0;
    }
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(WAIT, s.read_to_end(&mut buf)).await;
    String::from_utf8_lossy(&buf).split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0)
}

async fn wait_health(server: &ServerProc, want: u16) {
    let deadline = Instant::now() + WAIT * 2;
    while healthz(server).await != want {
        assert!(Instant::now() < deadline, "/healthz did not become {want}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn peers_on_two_nodes_signal_as_on_one_and_keep_order() {
    let redis = Redis::start();
    let (n1, n2) = (node(&redis, "n1", &[]), node(&redis, "n2", &[]));
    let (mut a, wa) = Client::join(&n1.ws_url(), "daily", "Alice").await;
    assert_eq!(peers(wa), []);
    let (mut b, wb) = Client::join(&n2.ws_url(), "daily", "Bob").await;
    assert_eq!(peers(wb), [peer(&a.id, "Alice")]);
    assert_eq!(a.recv().await, hello(&b.id, "Bob"));

    a.relay(&b.id, Signal::Offer("v=0 offer".into())).await;
    assert_eq!(b.recv().await, offer(&a.id, "v=0 offer"));
    b.relay(&a.id, Signal::Answer("v=0 answer".into())).await;
    assert_eq!(a.recv().await, answer(&b.id, "v=0 answer"));
    b.relay(&a.id, Signal::Candidate(None)).await;
    assert_eq!(a.recv().await, M::Candidate { from: b.id.clone(), candidate: None });

    // Many messages both ways at once: each direction arrives complete and in order.
    const N: usize = 300;
    let (a_id, b_id) = (a.id.clone(), b.id.clone());
    let send_a = async {
        for i in 0..N {
            a.relay(&b_id, Signal::Offer(format!("a{i}"))).await;
        }
        a
    };
    let recv_b = async {
        for i in 0..N {
            b.relay(&a_id, Signal::Answer(format!("b{i}"))).await;
        }
        for i in 0..N {
            assert_eq!(b.recv().await, offer(&a_id, &format!("a{i}")));
        }
        b
    };
    let (mut a, mut b) = tokio::join!(send_a, recv_b);
    for i in 0..N {
        assert_eq!(a.recv().await, answer(&b.id, &format!("b{i}")));
    }
    a.expect_silence(Duration::from_millis(200)).await;
    b.expect_silence(Duration::from_millis(10)).await;

    b.send_text(BYE).await;
    assert_eq!(a.recv().await, bye(&b.id));
    a.relay(&b.id, Signal::Offer("late".into())).await;
    a.expect_error(ErrorCode::UnknownPeer).await;
}

#[tokio::test]
async fn three_nodes_one_room() {
    let redis = Redis::start();
    let nodes = [node(&redis, "n1", &[]), node(&redis, "n2", &[]), node(&redis, "n3", &[])];
    let (mut a, _) = Client::join(&nodes[0].ws_url(), "trio", "A").await;
    let (mut b, _) = Client::join(&nodes[1].ws_url(), "trio", "B").await;
    assert_eq!(a.recv().await, hello(&b.id, "B"));
    let (mut c, wc) = Client::join(&nodes[2].ws_url(), "trio", "C").await;
    assert_eq!(peers(wc), [peer(&a.id, "A"), peer(&b.id, "B")]);
    assert_eq!(a.recv().await, hello(&c.id, "C"));
    assert_eq!(b.recv().await, hello(&c.id, "C"));
    for from in [&mut a, &mut b] {
        from.relay(&c.id, Signal::Offer("x".into())).await;
        assert_eq!(c.recv().await, offer(&from.id, "x"));
    }
    c.send_text(BYE).await;
    assert_eq!(a.recv().await, bye(&c.id));
    assert_eq!(b.recv().await, bye(&c.id));
}

#[tokio::test]
async fn two_nodes_racing_for_the_last_seat_exactly_one_wins() {
    let redis = Redis::start();
    let (n1, n2) = (node(&redis, "n1", &["--max-peers", "2"]), node(&redis, "n2", &["--max-peers", "2"]));
    for round in 0..15 {
        let room = format!("race{round}");
        let (mut first, _) = Client::join(&n1.ws_url(), &room, "first").await;
        let (mut x, mut y) = (Client::connect(&n1.ws_url()).await, Client::connect(&n2.ws_url()).await);
        let join = Join::new(room.as_str(), "");
        tokio::join!(x.send_join(join.clone()), y.send_join(join.clone()));
        let (rx, ry) = tokio::join!(x.recv(), y.recv());
        let types = [rx.message_type(), ry.message_type()];
        assert!(types.contains(&"welcome") && types.contains(&"error"), "round {round}: {rx:?} {ry:?}");
        let err = if rx.message_type() == "error" { &rx } else { &ry };
        let code = err.clone().into_refusal().and_then(Result::ok).map(|e| e.code);
        assert_eq!(code, Some(ErrorCode::RoomFull), "{err:?}");
        first.expect("hello").await;
        first.expect_silence(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn resume_on_another_node_gets_the_queue_in_order() {
    let redis = Redis::start();
    let (n1, n2) = (node(&redis, "n1", &[]), node(&redis, "n2", &[]));
    let (mut a, _) = Client::join(&n1.ws_url(), "r", "A").await;
    let (b, _) = Client::join(&n2.ws_url(), "r", "B").await;
    a.expect("hello").await;
    let (b_id, token) = (b.id.clone(), b.resume.clone());
    drop(b); // the connection drops without bye
    tokio::time::sleep(Duration::from_millis(300)).await;
    for i in 0..5 {
        a.relay(&b_id, Signal::Offer(format!("q{i}"))).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    // Back through the other node.
    let (mut b, w) = Client::join_with(&n1.ws_url(), Join { resume: Some(token.into()), ..Join::new("r", "") }).await;
    let M::Welcome { id, resumed, peers, .. } = w else { unreachable!() };
    assert_eq!((id, resumed, peers), (b_id.clone(), true, vec![peer(&a.id, "A")]));
    for i in 0..5 {
        assert_eq!(b.recv().await, offer(&a.id, &format!("q{i}")));
    }
    a.expect_silence(Duration::from_millis(200)).await; // no bye, no hello: the same peer
    a.relay(&b_id, Signal::Offer("after".into())).await;
    assert_eq!(b.recv().await, offer(&a.id, "after"));
    b.relay(&a.id, Signal::Answer("back".into())).await;
    assert_eq!(a.recv().await, answer(&b_id, "back"));
    // And back again to the first node, this time while the old connection is still open.
    let resume = Join { resume: Some(b.resume.as_str().into()), ..Join::new("r", "") };
    let (mut b2, w) = Client::join_with(&n2.ws_url(), resume).await;
    assert!(matches!(w, M::Welcome { resumed: true, .. }), "{w:?}");
    assert_eq!(b.until_end().await, Ended::Closed(4000, "resumed elsewhere".into()));
    a.relay(&b_id, Signal::Offer("again".into())).await;
    assert_eq!(b2.recv().await, offer(&a.id, "again"));
}

#[tokio::test]
async fn a_killed_node_peers_get_bye_and_free_their_seats() {
    let redis = Redis::start();
    let args = ["--node-ttl", "1s", "--max-peers", "2"];
    let (n1, mut n2) = (node(&redis, "n1", &args), node(&redis, "n2", &args));
    let (mut a, _) = Client::join(&n1.ws_url(), "r", "A").await;
    let (b, _) = Client::join(&n2.ws_url(), "r", "B").await;
    a.expect("hello").await;
    n2.kill(); // SIGKILL: no goodbye
    let started = Instant::now();
    assert_eq!(a.recv().await, bye(&b.id));
    eprintln!("bye after the kill in {:?}", started.elapsed());
    let (_c, w) = Client::join(&n1.ws_url(), "r", "C").await;
    assert_eq!(peers(w), [peer(&a.id, "A")]);
}

#[tokio::test]
async fn a_node_stopped_gracefully_ends_its_sessions_with_bye() {
    let redis = Redis::start();
    let (n1, n2) =
        (node(&redis, "n1", &["--shutdown-timeout", "1s"]), node(&redis, "n2", &["--shutdown-timeout", "1s"]));
    let (mut a, _) = Client::join(&n1.ws_url(), "r", "A").await;
    let (b, _) = Client::join(&n2.ws_url(), "r", "B").await;
    assert_eq!(a.recv().await, hello(&b.id, "B"));
    n2.signal("TERM");
    assert_eq!(a.recv().await, bye(&b.id));
}

#[tokio::test]
async fn redis_outage_refuses_joins_reports_unhealthy_and_recovers_without_resetting_anyone() {
    let mut redis = Redis::start_outside_ephemeral();
    let port = redis.port;
    let args = ["--node-ttl", "1s"];
    let (n1, n2) = (node(&redis, "n1", &args), node(&redis, "n2", &args));
    assert_eq!(healthz(&n1).await, 200);
    let (mut a, _) = Client::join(&n1.ws_url(), "r", "A").await;
    let (mut b, _) = Client::join(&n2.ws_url(), "r", "B").await;
    a.expect("hello").await;

    redis.stop();
    wait_health(&n1, 503).await;
    let mut c = Client::connect(&n1.ws_url()).await;
    c.send_join(Join::new("r", "")).await;
    let e = c.expect_error(ErrorCode::Unavailable).await;
    assert_eq!(e.refers_to.as_deref(), Some("join"));
    // Accepted while Redis is away: kept by the sending node, delivered when it is back.
    a.relay(&b.id, Signal::Offer("during the outage".into())).await;

    let _redis = Redis::start_on(port);
    wait_health(&n1, 200).await;
    wait_health(&n2, 200).await;
    // Redis came back empty, but the nodes still have their sessions: they put them back, nobody is reset.
    assert_eq!(b.recv().await, offer(&a.id, "during the outage"));
    b.relay(&a.id, Signal::Answer("after".into())).await;
    assert_eq!(a.recv().await, answer(&b.id, "after"));
    // The refused connection stayed usable. Joins may be refused with `unavailable` for a moment while the
    // nodes re-register, as the error tells clients.
    let deadline = Instant::now() + WAIT;
    let w = loop {
        c.send_join(Join::new("r", "C")).await;
        let m = c.recv().await;
        if m.message_type() == "welcome" {
            break m;
        }
        let code = m.clone().into_refusal().and_then(Result::ok).map(|e| e.code);
        assert_eq!(code, Some(ErrorCode::Unavailable), "{m:?}");
        assert!(Instant::now() < deadline, "joins still refused after Redis came back");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let mut ids: Vec<String> = peers(w).into_iter().map(|p| p.id).collect();
    ids.sort();
    let mut want = vec![a.id.clone(), b.id.clone()];
    want.sort();
    assert_eq!(ids, want, "the restored members are listed");
    assert!(matches!(a.expect("hello").await, M::Hello { name, .. } if name == "C"));
    assert!(matches!(b.expect("hello").await, M::Hello { name, .. } if name == "C"));
    a.expect_silence(Duration::from_millis(300)).await;
    b.expect_silence(Duration::from_millis(10)).await;
}

#[tokio::test]
async fn password_guesses_are_limited_per_room_across_nodes() {
    let redis = Redis::start();
    let a = node(&redis, "pw-a", &["--max-password-attempts", "3", "--max-errors", "50"]);
    let b = node(&redis, "pw-b", &["--max-password-attempts", "3", "--max-errors", "50"]);
    let mut owner = Client::connect(&a.ws_url()).await;
    owner.send_join(Join { password: Some("right".into()), ..Join::new("vault", "") }).await;
    owner.expect_welcome().await;
    // Wrong guesses through either node count against the room, cluster-wide.
    for (i, n) in [&a, &b, &a].into_iter().enumerate() {
        let mut g = Client::connect(&n.ws_url()).await;
        g.send_join(Join { password: Some(format!("guess{i}").into()), ..Join::new("vault", "") }).await;
        let e = g.expect_error(ErrorCode::Unauthorized).await;
        assert!(e.message.contains("wrong password"), "{e}");
    }
    // Spent: every password is refused unchecked, the right one too, on both nodes.
    for n in [&b, &a] {
        let mut g = Client::connect(&n.ws_url()).await;
        g.send_join(Join { password: Some("right".into()), ..Join::new("vault", "") }).await;
        let e = g.expect_error(ErrorCode::RateLimited).await;
        let m = &e.message;
        assert!(m.contains("too many wrong passwords") && m.contains("try again in"), "{m}");
    }
    // Another room on the cluster is unaffected, and the owner saw nobody come in.
    let mut other = Client::connect(&b.ws_url()).await;
    other.send_join(Join::new("open-room", "")).await;
    other.expect_welcome().await;
    owner.expect_silence(Duration::from_millis(100)).await;
}
