//! Protocol v1 against a real `webcall serve` process with real WebSocket clients.

use webcall_testkit as common;

use common::msg::{answer, bye, hello, offer, peer, peers};
use common::{Client, Ended, ServerProc};
use futures_util::SinkExt;
use serde_json::json;
use std::time::Duration;
use tokio_tungstenite::tungstenite::Message;
use webcall_protocol::{ErrorCode, IceCandidate, Join, ServerMessage as M, Signal, BYE};

#[tokio::test]
async fn two_peers_exchange_hello_offer_answer_candidates_and_bye() {
    let server = ServerProc::start(&[]);
    let url = server.ws_url();
    let (mut a, wa) = Client::join(&url, "daily", "Alice").await;
    let M::Welcome { room, peers: others, resumed, publish, .. } = wa else { unreachable!("join gives the welcome") };
    assert_eq!((room.as_str(), others, resumed, publish), ("daily", vec![], false, true));
    let (mut b, wb) = Client::join(&url, "daily", "Bob").await;
    assert_eq!(peers(wb), [peer(&a.id, "Alice")]);
    assert_ne!(a.id, b.id);

    assert_eq!(a.recv().await, hello(&b.id, "Bob"));
    let sdp = "v=0\r\no=- 1 2 IN IP4 127.0.0.1\r\ns=-\r\n";
    a.relay(&b.id, Signal::Offer(sdp.into())).await;
    assert_eq!(b.recv().await, offer(&a.id, sdp));
    b.relay(&a.id, Signal::Answer("answer-sdp".into())).await;
    assert_eq!(a.recv().await, answer(&b.id, "answer-sdp"));
    let cand = IceCandidate {
        candidate: "candidate:1 1 udp 2122260223 127.0.0.1 50000 typ host".into(),
        sdp_mid: Some("0".into()),
        sdp_m_line_index: Some(0),
        username_fragment: Some("abcd".into()),
    };
    for swap in [false, true] {
        let (from, to) = if swap { (&mut b, &mut a) } else { (&mut a, &mut b) };
        from.relay(&to.id, Signal::Candidate(Some(cand.clone()))).await;
        from.relay(&to.id, Signal::Candidate(None)).await;
        assert_eq!(to.recv().await, M::Candidate { from: from.id.clone(), candidate: Some(cand.clone()) });
        assert_eq!(to.recv().await, M::Candidate { from: from.id.clone(), candidate: None });
    }
    b.send_text(BYE).await;
    assert_eq!(a.recv().await, bye(&b.id));
    // After bye the connection can join again, as a new peer.
    let old = b.id.clone();
    b.send_join(Join::new("daily", "Bob")).await;
    b.expect_welcome().await;
    assert_ne!(b.id, old);
    assert_eq!(a.recv().await, hello(&b.id, "Bob"));
}

#[tokio::test]
async fn third_peer_in_a_room_of_two_is_refused() {
    let server = ServerProc::start(&["--max-peers", "2"]);
    let url = server.ws_url();
    let (mut a, _) = Client::join(&url, "pair", "A").await;
    let (_b, _) = Client::join(&url, "pair", "B").await;
    a.expect("hello").await;
    let mut c = Client::connect(&url).await;
    c.send_join(Join::new("pair", "C")).await;
    let e = c.expect_error(ErrorCode::RoomFull).await;
    assert_eq!(e.refers_to.as_deref(), Some("join"));
    a.expect_silence(Duration::from_millis(200)).await;
    // Refused, not disconnected: another room works on the same connection.
    c.send_join(Join::new("other", "")).await;
    c.expect("welcome").await;
}

#[tokio::test]
async fn every_error_code_and_the_connection_stays_usable() {
    let server =
        ServerProc::start(&["--max-peers", "2", "--max-rooms", "2", "--rate-limit", "5", "--max-errors", "100"]);
    let url = server.ws_url();
    let mut c = Client::connect(&url).await;
    // Raw text: each of these is malformed on purpose.
    let cases: &[(&str, ErrorCode)] = &[
        ("this is not json", ErrorCode::BadJson),
        (r#"["join"]"#, ErrorCode::BadJson),
        (r#"{"type":"hug"}"#, ErrorCode::UnknownType),
        (r#"{"room":"r"}"#, ErrorCode::MissingField),
        (r#"{"type":"join"}"#, ErrorCode::MissingField),
        (r#"{"type":"join","room":["r"]}"#, ErrorCode::BadField),
        (r#"{"type":"join","room":"no spaces"}"#, ErrorCode::BadRoomName),
    ];
    for (text, code) in cases {
        c.send_text(text).await;
        c.expect_error(*code).await;
        tokio::time::sleep(Duration::from_millis(220)).await; // stay under the rate limit
    }
    c.ws.send(Message::binary(vec![1, 2, 3])).await.unwrap();
    c.expect_error(ErrorCode::BadJson).await;
    c.relay("x", Signal::Offer("s".into())).await;
    assert_eq!(c.expect_error(ErrorCode::NotJoined).await.refers_to.as_deref(), Some("offer"));
    tokio::time::sleep(Duration::from_millis(500)).await;
    c.send_join(Join::new("one", "")).await;
    c.expect_welcome().await;
    c.send_join(Join::new("two", "")).await;
    c.expect_error(ErrorCode::AlreadyJoined).await;
    c.relay("nobody", Signal::Offer("s".into())).await;
    c.expect_error(ErrorCode::UnknownPeer).await;
    let me = c.id.clone();
    c.relay(&me, Signal::Offer("s".into())).await;
    c.expect_error(ErrorCode::UnknownPeer).await;
    tokio::time::sleep(Duration::from_millis(1200)).await;

    let (d, _) = Client::join(&url, "one", "D").await;
    assert_eq!(c.recv().await, hello(&d.id, "D"));
    let mut e = Client::connect(&url).await;
    e.send_join(Join::new("one", "")).await;
    e.expect_error(ErrorCode::RoomFull).await;
    e.send_join(Join::new("second", "")).await;
    e.expect_welcome().await;
    let mut f = Client::connect(&url).await;
    f.send_join(Join::new("third", "")).await;
    f.expect_error(ErrorCode::ServerFull).await;

    // A burst past twice the rate is read more slowly, not refused (rate-limited is for floods: see security.rs).
    for _ in 0..15 {
        c.relay("nobody", Signal::Offer("s".into())).await;
    }
    for _ in 0..15 {
        c.expect_error(ErrorCode::UnknownPeer).await;
    }

    // too-large: refused with an error, then closed with 1009. Raw text: oversized on purpose.
    let big = format!(r#"{{"type":"offer","to":"x","sdp":"{}"}}"#, "a".repeat(70_000));
    f.send_text(&big).await;
    f.expect_error(ErrorCode::TooLarge).await;
    assert_eq!(f.until_end().await, Ended::Closed(1009, "message too large".into()));
}

#[tokio::test]
async fn repeated_errors_close_the_connection_with_a_reason() {
    let server = ServerProc::start(&["--max-errors", "5"]);
    let mut c = Client::connect(&server.ws_url()).await;
    for _ in 0..10 {
        c.send_text("garbage").await;
    }
    for _ in 0..5 {
        c.expect_error(ErrorCode::BadJson).await;
    }
    assert_eq!(c.until_end().await, Ended::Closed(1008, "too many errors".into()));
}

#[tokio::test]
async fn frames_far_over_the_limit_are_cut_off() {
    let server = ServerProc::start(&["--max-message-size", "4096"]);
    let (mut a, _) = Client::join(&server.ws_url(), "r", "A").await;
    // Raw text: oversized on purpose.
    let huge = format!(r#"{{"type":"offer","to":"x","sdp":"{}"}}"#, "a".repeat(100_000));
    let _ = a.ws.send(Message::text(huge)).await;
    let end = a.until_end().await;
    assert!(matches!(end, Ended::Closed(1009, _) | Ended::Dropped), "{end:?}");
    // The server is unharmed.
    Client::join(&server.ws_url(), "r2", "B").await;
}

#[tokio::test]
async fn from_cannot_be_spoofed_and_other_rooms_are_unreachable() {
    let server = ServerProc::start(&[]);
    let url = server.ws_url();
    let (mut a, _) = Client::join(&url, "r1", "A").await;
    let (mut b, _) = Client::join(&url, "r1", "B").await;
    let (mut x, _) = Client::join(&url, "r2", "X").await;
    a.expect("hello").await;
    // Raw JSON: a spoofed `from` is what this checks, and the typed encoder cannot write one.
    b.send(json!({"type":"offer","to":a.id,"from":x.id,"sdp":"s"})).await;
    assert_eq!(a.recv().await, offer(&b.id, "s"), "the server sets from");
    a.relay(&x.id, Signal::Offer("s".into())).await;
    let e = a.expect_error(ErrorCode::UnknownPeer).await;
    assert!(e.message.contains("r1"), "{e}");
    x.expect_silence(Duration::from_millis(300)).await;
}

#[tokio::test]
async fn resume_keeps_the_id_and_delivers_queued_messages_in_order() {
    let server = ServerProc::start(&["--resume-grace", "5s"]);
    let url = server.ws_url();
    let (mut a, _) = Client::join(&url, "r", "A").await;
    let (b, _) = Client::join(&url, "r", "B").await;
    a.expect("hello").await;
    let (b_id, b_token) = (b.id.clone(), b.resume.clone());
    drop(b); // the TCP connection ends without a close handshake or bye
    tokio::time::sleep(Duration::from_millis(200)).await;
    for i in 0..20 {
        let c = IceCandidate { candidate: format!("c{i}"), sdp_mid: Some("0".into()), ..Default::default() };
        a.relay(&b_id, Signal::Candidate(Some(c))).await;
    }
    a.expect_silence(Duration::from_millis(300)).await; // accepted: no error, no bye

    let (mut b2, w) =
        Client::join_with(&url, Join { resume: Some(b_token.as_str().into()), ..Join::new("r", "") }).await;
    let M::Welcome { id, resumed, peers, resume, .. } = w else { unreachable!() };
    assert_eq!((id, resumed, peers), (b_id.clone(), true, vec![peer(&a.id, "A")]));
    assert_ne!(resume, b_token);
    for i in 0..20 {
        let c = IceCandidate { candidate: format!("c{i}"), sdp_mid: Some("0".into()), ..Default::default() };
        assert_eq!(b2.recv().await, M::Candidate { from: a.id.clone(), candidate: Some(c) });
    }
    // Live again: traffic flows both ways, and A never saw a bye.
    b2.relay(&a.id, Signal::Offer("after".into())).await;
    assert_eq!(a.recv().await, offer(&b_id, "after"));
}

#[tokio::test]
async fn resume_replaces_a_connection_the_server_still_thinks_alive() {
    let server = ServerProc::start(&[]);
    let url = server.ws_url();
    let (mut a, _) = Client::join(&url, "r", "A").await;
    let (mut b, _) = Client::join(&url, "r", "B").await;
    a.expect("hello").await;
    let (b2, _) = Client::join_with(&url, Join { resume: Some(b.resume.as_str().into()), ..Join::new("r", "") }).await;
    assert_eq!(b2.id, b.id);
    assert_eq!(b.until_end().await, Ended::Closed(4000, "resumed elsewhere".into()));
    a.expect_silence(Duration::from_millis(300)).await;
}

#[tokio::test]
async fn a_dropped_peer_turns_into_bye_after_the_grace_period() {
    let server = ServerProc::start(&["--resume-grace", "1s"]);
    let url = server.ws_url();
    let (mut a, _) = Client::join(&url, "r", "A").await;
    let (b, _) = Client::join(&url, "r", "B").await;
    a.expect("hello").await;
    let (b_id, token) = (b.id.clone(), b.resume.clone());
    drop(b);
    a.expect_silence(Duration::from_millis(500)).await;
    assert_eq!(a.recv().await, bye(&b_id));
    // Too late to resume: a fresh session.
    let (b2, w) = Client::join_with(&url, Join { resume: Some(token.into()), ..Join::new("r", "") }).await;
    assert!(matches!(w, M::Welcome { resumed: false, .. }), "{w:?}");
    assert_ne!(b2.id, b_id);
}

#[tokio::test]
async fn a_silent_connection_is_dropped_by_the_idle_timeout() {
    let server = ServerProc::start(&["--ping-interval", "200ms", "--idle-timeout", "1s", "--resume-grace", "500ms"]);
    let url = server.ws_url();
    let (mut a, _) = Client::join(&url, "r", "A").await;
    // B joins and then never reads again, so it answers no ping: from the server's side it went silent.
    let (b, _) = Client::join(&url, "r", "B").await;
    a.expect("hello").await;
    assert_eq!(a.recv().await, bye(&b.id));
    drop(b);
}

#[tokio::test]
async fn a_slow_reader_is_cut_off_and_server_memory_stays_bounded() {
    // Under load the fast side may send a few dozen offers between the session's end and reading its bye; each gets
    // `unknown-peer`, which must not trip --max-errors (not what this test is about).
    let server = ServerProc::start(&[
        "--max-queued-messages",
        "16",
        "--rate-limit",
        "100000",
        "--resume-grace",
        "30s",
        "--max-errors",
        "100000",
    ]);
    let url = server.ws_url();
    let (mut fast, _) = Client::join(&url, "r", "Fast").await;
    let (mut slow, _) = Client::join(&url, "r", "Slow").await;
    fast.expect("hello").await;
    let rss_before = server.rss_kib();
    let sdp = "x".repeat(60_000);
    let msg = Signal::Offer(sdp).to_json(&slow.id);
    // The slow side never reads; its kernel buffers fill, then the server's bounded queue, then the session ends.
    let mut sent = 0;
    let mut ended = false;
    while sent < 2000 && !ended {
        fast.send_text(&msg).await;
        sent += 1;
        while let Ok(Some(m)) = tokio::time::timeout(Duration::from_millis(1), async { Some(fast.recv().await) }).await
        {
            if let M::Bye { from } = m {
                assert_eq!(from, slow.id);
                ended = true;
            }
        }
    }
    assert!(ended, "the slow reader's session ended after {sent} messages of 60 KB");
    eprintln!("slow reader: session ended after {sent} messages of 60 KB");
    // The session is gone: further messages to it are refused, not queued.
    while let Ok(m) = tokio::time::timeout(Duration::from_millis(200), fast.recv()).await {
        let refusal = m.clone().into_refusal();
        assert!(
            matches!(refusal, Some(Ok(ref e)) if e.code == ErrorCode::UnknownPeer),
            "only refusals may follow the bye: {m:?}"
        );
    }
    fast.relay(&slow.id, Signal::Offer("after".into())).await;
    fast.expect_error(ErrorCode::UnknownPeer).await;
    let grown_mib = server.rss_kib().saturating_sub(rss_before) / 1024;
    assert!(grown_mib < 64, "server grew by {grown_mib} MiB for {sent} messages to a reader that never read");
    let end = slow.until_end().await;
    assert!(matches!(end, Ended::Closed(1008, _) | Ended::Dropped), "{end:?}");
}

#[tokio::test]
async fn two_hundred_rooms_at_once() {
    // 400 clients from one address: lift the per-address limits, which are not what this test is about.
    let server = ServerProc::start(&["--max-connections-per-ip", "1000", "--max-joins-per-ip", "10000"]);
    let url = server.ws_url();
    let mut tasks = Vec::new();
    for i in 0..200 {
        let url = url.clone();
        tasks.push(tokio::spawn(async move {
            let room = format!("room-{i}");
            let (mut a, _) = Client::join(&url, &room, "A").await;
            let (mut b, w) = Client::join(&url, &room, "B").await;
            assert!(matches!(w, M::Welcome { ref peers, .. } if peers.len() == 1), "rooms do not mix: {w:?}");
            a.expect("hello").await;
            a.relay(&b.id, Signal::Offer(room.clone())).await;
            assert_eq!(b.recv().await, offer(&a.id, &room));
            b.relay(&a.id, Signal::Answer(room.clone())).await;
            assert_eq!(a.recv().await, answer(&b.id, &room));
            (a, b)
        }));
    }
    let mut clients = Vec::new();
    for t in tasks {
        clients.push(t.await.unwrap());
    }
    assert_eq!(clients.len(), 200);
}

#[tokio::test]
async fn healthz_answers() {
    let server = ServerProc::start(&[]);
    let mut stream = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    stream.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await.unwrap();
    let mut resp = String::new();
    stream.read_to_string(&mut resp).await.unwrap();
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
}
