//! The server's WebSocket transport (its own frame codec, `crates/wsframe`) against a real `webcall serve`: control
//! frames, fragmentation, close handshakes, and frames that break RFC 6455, with tungstenite clients and raw TCP.

use webcall_testkit as common;

use common::msg::{hello, offer};
use common::{Client, Ended, ServerProc};
use futures_util::{SinkExt, StreamExt};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{CloseCode, Data, OpCode};
use tokio_tungstenite::tungstenite::protocol::frame::{CloseFrame, Frame};
use tokio_tungstenite::tungstenite::Message;

const WAIT: Duration = Duration::from_secs(10);

#[tokio::test]
async fn pings_are_answered_with_their_payload_and_a_close_is_echoed() {
    let server = ServerProc::start(&[]);
    let mut c = Client::connect(&server.ws_url()).await;
    c.ws.send(Message::Ping(b"are you there".to_vec().into())).await.unwrap();
    let pong = tokio::time::timeout(WAIT, async {
        loop {
            match c.ws.next().await.expect("open").expect("no error") {
                Message::Pong(p) => return p,
                _ => continue,
            }
        }
    })
    .await
    .expect("a pong");
    assert_eq!(&pong[..], b"are you there");

    c.ws.close(Some(CloseFrame { code: CloseCode::Away, reason: "leaving".into() })).await.unwrap();
    // The server answers with the client's code (tungstenite hands that answer out as the last message).
    assert_eq!(c.until_end().await, Ended::Closed(1001, String::new()));
}

#[tokio::test]
async fn a_message_in_fragments_is_one_message() {
    let server = ServerProc::start(&[]);
    let url = server.ws_url();
    let (mut a, _) = Client::join(&url, "frag", "A").await;
    let mut b = Client::connect(&url).await;
    let join = webcall_protocol::Join::new("frag", "B").to_json();
    let (one, two) = join.as_bytes().split_at(10);
    let (two, three) = two.split_at(7);
    b.ws.send(Message::Frame(Frame::message(one.to_vec(), OpCode::Data(Data::Text), false))).await.unwrap();
    // A ping between the fragments is answered and does not disturb them.
    b.ws.send(Message::Ping(Vec::new().into())).await.unwrap();
    b.ws.send(Message::Frame(Frame::message(two.to_vec(), OpCode::Data(Data::Continue), false))).await.unwrap();
    b.ws.send(Message::Frame(Frame::message(three.to_vec(), OpCode::Data(Data::Continue), true))).await.unwrap();
    b.expect_welcome().await;
    assert_eq!(a.recv().await, hello(&b.id, "B"));
}

#[tokio::test]
async fn many_messages_in_one_write_are_all_relayed_in_order() {
    let server = ServerProc::start(&[]);
    let url = server.ws_url();
    let (mut a, _) = Client::join(&url, "burst", "A").await;
    let (mut b, _) = Client::join(&url, "burst", "B").await;
    a.expect("hello").await;
    // Queue 40 frames in the client and write them together: the server reads many frames per read.
    for i in 0..40 {
        let m = webcall_protocol::Signal::Offer(format!("sdp {i} {}", "x".repeat(i * 50))).to_json(&b.id);
        a.ws.feed(Message::text(m)).await.unwrap();
    }
    a.ws.flush().await.unwrap();
    for i in 0..40 {
        assert_eq!(b.recv().await, offer(&a.id, &format!("sdp {i} {}", "x".repeat(i * 50))));
    }
}

/// Several senders relay to one receiver at once while it does not read, so the receiver's frames queue up and are
/// written in pieces as its socket drains: every message still arrives once, whole, in each sender's order. (Also
/// the test for any write path that bypasses the queue; one tried in 4513e20 broke it when leftovers were lost.)
#[tokio::test]
async fn concurrent_senders_to_a_stalled_receiver_arrive_whole_and_in_order() {
    let server = ServerProc::start(&[
        "--max-queued-messages",
        "1000",
        "--max-queued-bytes",
        "16777216",
        "--rate-limit",
        "100000",
        "--max-peers",
        "8",
    ]);
    let url = server.ws_url();
    let (mut rx, _) = Client::join(&url, "fan-in", "R").await;
    const SENDERS: usize = 4;
    const EACH: usize = 100;
    let mut senders = Vec::new();
    for s in 0..SENDERS {
        let (c, _) = Client::join(&url, "fan-in", &format!("S{s}")).await;
        assert_eq!(rx.recv().await, hello(&c.id, &format!("S{s}")));
        senders.push(c);
    }
    let to = rx.id.clone();
    // 4 × 100 × ~20 KB: far more than loopback's socket buffers while the receiver is stalled.
    let body = |s: usize, i: usize| format!("{s} {i} {}", "y".repeat(20_000 + (i * 37) % 500));
    let tasks: Vec<_> = senders
        .into_iter()
        .enumerate()
        .map(|(s, mut c)| {
            let to = to.clone();
            tokio::spawn(async move {
                for i in 0..EACH {
                    c.relay(&to, webcall_protocol::Signal::Offer(body(s, i))).await;
                }
                c
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut next = [0usize; SENDERS];
    let mut ids = Vec::new();
    for t in tasks {
        ids.push(t.await.unwrap().id.clone());
    }
    for _ in 0..SENDERS * EACH {
        let m = rx.recv().await;
        let webcall_protocol::ServerMessage::Offer { from, sdp, .. } = m else {
            panic!("expected an offer, got {m:?}")
        };
        let s = ids.iter().position(|id| *id == from).expect("from a sender");
        assert_eq!(sdp, body(s, next[s]), "sender {s}'s message {}", next[s]);
        next[s] += 1;
    }
    assert_eq!(next, [EACH; SENDERS]);
    rx.expect_silence(Duration::from_millis(200)).await;
}

/// A raw TCP client that did the WebSocket handshake, for frames no client library would send.
async fn raw_upgrade(server: &ServerProc) -> TcpStream {
    let addr = server.ws_url().trim_start_matches("ws://").trim_end_matches("/ws").to_string();
    let mut s = TcpStream::connect(&addr).await.unwrap();
    let req = format!(
        "GET /ws HTTP/1.1\r\nHost: {addr}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut b = [0u8; 1];
        assert_eq!(s.read(&mut b).await.unwrap(), 1, "response head");
        head.push(b[0]);
    }
    let head = String::from_utf8(head).unwrap();
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert!(head.contains("s3pPLMBiTxaQ9kYGzzhZRbK+xOo="), "RFC 6455's example accept key: {head}");
    s
}

/// Reads server frames until a close frame; returns its code and reason.
async fn read_close(s: &mut TcpStream) -> (u16, String) {
    tokio::time::timeout(WAIT, async {
        loop {
            let mut h = [0u8; 2];
            s.read_exact(&mut h).await.expect("a frame before the connection ends");
            assert_eq!(h[1] & 0x80, 0, "server frames are not masked");
            let len = match h[1] & 0x7F {
                126 => s.read_u16().await.unwrap() as usize,
                127 => s.read_u64().await.unwrap() as usize,
                n => n as usize,
            };
            let mut p = vec![0u8; len];
            s.read_exact(&mut p).await.unwrap();
            if h[0] & 0x0F == 0x8 {
                let code = u16::from_be_bytes([p[0], p[1]]);
                return (code, String::from_utf8(p[2..].to_vec()).unwrap());
            }
        }
    })
    .await
    .expect("a close frame within the wait")
}

fn masked(first: u8, payload: &[u8]) -> Vec<u8> {
    assert!(payload.len() < 126);
    let mask = [0x11, 0x22, 0x33, 0x44];
    let mut f = vec![first, 0x80 | payload.len() as u8];
    f.extend_from_slice(&mask);
    f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    f
}

#[tokio::test]
async fn frames_that_break_the_protocol_are_closed_with_the_right_code() {
    let server = ServerProc::start(&[]);
    let cases: [(&str, Vec<u8>, u16); 4] = [
        ("unmasked", vec![0x81, 0x02, b'{', b'}'], 1002),
        ("reserved bit (no extension negotiated)", masked(0xC1, b"{}"), 1002),
        ("text that is not UTF-8", masked(0x81, &[b'"', 0xFF, b'"']), 1007),
        ("continuation of nothing", masked(0x80, b"{}"), 1002),
    ];
    for (what, frame, code) in cases {
        let mut s = raw_upgrade(&server).await;
        s.write_all(&frame).await.unwrap();
        let (got, reason) = read_close(&mut s).await;
        assert_eq!(got, code, "{what}: {reason}");
        assert!(!reason.is_empty(), "{what}: the close says why");
    }
    // The server is still fine.
    Client::join(&server.ws_url(), "after", "A").await;
}

#[tokio::test]
async fn a_frame_header_over_the_limit_is_refused_before_its_payload() {
    let server = ServerProc::start(&[]);
    let mut s = raw_upgrade(&server).await;
    // A header announcing 1 GiB, and no payload: the server must not wait for (or buffer) it.
    let mut h = vec![0x81, 0x80 | 127];
    h.extend_from_slice(&(1u64 << 30).to_be_bytes());
    h.extend_from_slice(&[1, 2, 3, 4]);
    s.write_all(&h).await.unwrap();
    assert_eq!(read_close(&mut s).await, (1009, "message too large".into()));
}
