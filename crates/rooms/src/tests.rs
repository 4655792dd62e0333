//! The room logic driven by hand: no sockets, simulated time.

use super::*;
use crate::harness::Harness;
use serde_json::Value;
use webcall_protocol::{Join, Signal, BYE};

impl Harness {
    fn new(cfg: Config) -> Self {
        let ice = |id: &str| {
            vec![IceServer { urls: vec!["stun:127.0.0.1:3478".into()], username: Some(id.into()), credential: None }]
        };
        let now = Instant::now();
        Harness::over(Rooms::new(cfg, Box::new(ice), now), now)
    }
    /// Connects and joins; returns (conn, id, resume token).
    fn join(&mut self, room: &str, name: &str) -> (ConnId, String, String) {
        let c = self.connect();
        self.send(c, &Join::new(room, name).to_json());
        let w = self.recv(c).remove(0);
        assert_eq!(w["type"], "welcome", "{w}");
        (c, w["id"].as_str().unwrap().into(), w["resume"].as_str().unwrap().into())
    }
}

fn small() -> Config {
    Config { max_peers: 2, ..Config::default() }
}

#[test]
fn hello_offer_answer_candidate_bye() {
    let mut h = Harness::new(Config::default());
    let (a, a_id, _) = h.join("r", "Alice");
    let (b, b_id, _) = h.join("r", "Bob");
    assert_eq!(h.recv(a), vec![serde_json::json!({"type":"hello","from":b_id,"name":"Bob"})]);

    h.send(a, &Signal::Offer("v=0 offer".into()).to_json(&b_id));
    assert_eq!(h.recv(b), vec![serde_json::json!({"type":"offer","from":a_id,"sdp":"v=0 offer"})]);
    h.send(b, &Signal::Answer("v=0 answer".into()).to_json(&a_id));
    assert_eq!(h.recv(a), vec![serde_json::json!({"type":"answer","from":b_id,"sdp":"v=0 answer"})]);
    let cand = serde_json::json!({"candidate":"candidate:1 1 udp 1 127.0.0.1 9 typ host","sdpMid":"0","sdpMLineIndex":0,"usernameFragment":"u"});
    let typed: webcall_protocol::IceCandidate = serde_json::from_value(cand.clone()).unwrap();
    h.send(a, &Signal::Candidate(Some(typed)).to_json(&b_id));
    h.send(a, &Signal::Candidate(None).to_json(&b_id));
    assert_eq!(
        h.recv(b),
        vec![
            serde_json::json!({"type":"candidate","from":a_id,"candidate":cand}),
            serde_json::json!({"type":"candidate","from":a_id,"candidate":null})
        ]
    );
    h.send(b, r#"{"type":"bye"}"#);
    assert_eq!(h.recv(a), vec![serde_json::json!({"type":"bye","from":b_id})]);
    assert_eq!(h.rooms.stats().peers, 1);
    // The connection may join again after bye.
    h.send(b, r#"{"type":"join","room":"r"}"#);
    assert_eq!(h.recv(b)[0]["type"], "welcome");
}

#[test]
fn welcome_lists_others_and_fresh_ice() {
    let mut h = Harness::new(Config::default());
    let (_, a_id, _) = h.join("r", "Alice");
    let c = h.connect();
    h.send(c, r#"{"type":"join","room":"r","name":"Bob"}"#);
    let w = h.recv(c).remove(0);
    assert_eq!(w["peers"], serde_json::json!([{"id":a_id,"name":"Alice"}]));
    assert_eq!(w["room"], "r");
    assert_eq!(w["resumed"], false);
    assert_eq!(w["iceServers"][0]["username"], w["id"], "ice servers are minted per peer");
}

#[test]
fn room_full_and_capacity_counts_detached_sessions() {
    let mut h = Harness::new(small());
    let (a, _, _) = h.join("r", "A");
    h.join("r", "B");
    let c = h.connect();
    h.send(c, r#"{"type":"join","room":"r"}"#);
    let e = h.recv(c).remove(0);
    assert_eq!(
        (e["type"].as_str(), e["code"].as_str(), e["ref"].as_str()),
        (Some("error"), Some("room-full"), Some("join"))
    );
    // A's connection drops: its seat is held during the grace period.
    h.rooms.disconnect(a, h.now);
    h.send(c, r#"{"type":"join","room":"r"}"#);
    assert_eq!(h.recv(c)[0]["code"], "room-full");
    h.advance(Duration::from_secs(21));
    h.send(c, r#"{"type":"join","room":"r"}"#);
    assert_eq!(h.recv(c)[0]["type"], "welcome");
    // Other rooms are unaffected.
    h.join("other", "X");
}

#[test]
fn from_cannot_be_spoofed_nor_other_rooms_addressed() {
    let mut h = Harness::new(Config::default());
    let (a, a_id, _) = h.join("r1", "A");
    let (b, b_id, _) = h.join("r1", "B");
    let (x, x_id, _) = h.join("r2", "X");
    h.recv(a);
    // Raw JSON: a spoofed `from` is what this checks, and the typed encoder cannot write one.
    h.send_json(b, serde_json::json!({"type":"offer","to":a_id,"from":x_id,"sdp":"s"}));
    assert_eq!(h.recv(a)[0]["from"], b_id.as_str(), "the server sets from");
    h.send(a, &Signal::Offer("s".into()).to_json(&x_id));
    assert_eq!(h.recv(a)[0]["code"], "unknown-peer");
    assert!(h.recv(x).is_empty());
    h.send(a, &Signal::Offer("s".into()).to_json(&a_id));
    assert_eq!(h.recv(a)[0]["code"], "unknown-peer", "no messages to yourself");
}

#[test]
fn every_error_code_and_the_connection_stays_usable() {
    let mut h = Harness::new(Config { max_peers: 1, max_rooms: 2, ..Config::default() });
    let c = h.connect();
    let cases = [
        ("{", "bad-json"),
        (r#"{"type":"dance"}"#, "unknown-type"),
        (r#"{"type":"join"}"#, "missing-field"),
        (r#"{"type":"join","room":7}"#, "bad-field"),
        (r#"{"type":"join","room":"a/b"}"#, "bad-room-name"),
        (r#"{"type":"offer","to":"x","sdp":"s"}"#, "not-joined"),
        (r#"{"type":"bye"}"#, "not-joined"),
    ];
    for (text, code) in cases {
        h.send(c, text);
        let got = h.recv(c);
        assert_eq!(got.len(), 1, "{text}");
        assert_eq!(got[0]["code"], code, "{text}");
        assert!(!got[0]["message"].as_str().unwrap().is_empty());
    }
    h.rooms.binary(c, 10, h.now);
    assert_eq!(h.recv(c)[0]["code"], "bad-json");
    h.send(c, r#"{"type":"join","room":"full"}"#);
    h.recv(c);
    h.send(c, r#"{"type":"join","room":"again"}"#);
    assert_eq!(h.recv(c)[0]["code"], "already-joined");
    let d = h.connect();
    h.send(d, r#"{"type":"join","room":"full"}"#);
    assert_eq!(h.recv(d)[0]["code"], "room-full");
    h.send(d, r#"{"type":"join","room":"second"}"#);
    h.recv(d);
    let e = h.connect();
    h.send(e, r#"{"type":"join","room":"third"}"#);
    assert_eq!(h.recv(e)[0]["code"], "server-full");
    h.send(c, r#"{"type":"offer","to":"nobody","sdp":"s"}"#);
    assert_eq!(h.recv(c)[0]["code"], "unknown-peer");
    assert!(h.outputs().iter().all(|o| matches!(o, Output::Wake(_))), "no error so far closes");
}

#[test]
fn too_large_closes_with_1009() {
    let mut h = Harness::new(Config { max_message_size: 100, ..Config::default() });
    let c = h.connect();
    h.send(c, &format!(r#"{{"type":"join","room":"{}"}}"#, "a".repeat(200)));
    assert_eq!(h.recv(c)[0]["code"], "too-large");
    assert!(h.outputs().contains(&Output::Close { conn: c, code: close::TOO_BIG, reason: "message too large" }));
    h.send(c, r#"{"type":"join","room":"r"}"#);
    assert!(h.recv(c).is_empty(), "nothing is read after a close");
}

#[test]
fn rate_limit_then_abuse_close() {
    let mut h = Harness::new(Config { rate_per_sec: 5.0, max_errors: 3.0, ..Config::default() });
    let (c, _, _) = h.join("r", "A");
    for _ in 0..9 {
        h.send(c, r#"{"type":"bye","x":1}"#.replace("bye", "candidate").as_str());
    }
    let got = h.recv(c);
    // 10 tokens of burst: the join took one, 9 bad candidates pass the rate limit but are refused.
    assert!(got.iter().all(|m| m["code"] == "missing-field"));
    assert!(h
        .outputs()
        .iter()
        .any(|o| matches!(o, Output::Close { code: close::POLICY, reason: "too many errors", .. })));

    // Bursts pass (the adapter paces reading); only a connection far ahead of the rate is closed.
    let mut h = Harness::new(Config { rate_per_sec: 5.0, ..Config::default() });
    let (a, _, _) = h.join("r", "A");
    let (b, b_id, _) = h.join("r", "B");
    h.recv(a);
    let msg = serde_json::json!({"type":"candidate","to":b_id,"candidate":null}).to_string();
    let ahead = (5.0 * crate::FLOOD_FACTOR) as usize;
    for _ in 0..ahead - 1 {
        h.send(a, &msg);
    }
    assert!(h.recv(a).is_empty(), "a burst of {} is not refused", ahead - 1);
    assert_eq!(h.recv(b).len(), ahead - 1);
    h.advance(Duration::from_secs(1));
    for _ in 0..6 {
        h.send(a, &msg);
    }
    assert_eq!(h.recv(b).len(), 5, "the bucket refilled by the rate");
    let codes: Vec<Value> = h.recv(a).into_iter().map(|m| m["code"].clone()).collect();
    assert_eq!(codes, vec![Value::from("rate-limited")]);
    assert!(h.outputs().contains(&Output::Close { conn: a, code: close::POLICY, reason: close::FLOODING }));
}

#[test]
fn resume_keeps_id_and_delivers_queue_in_order() {
    let mut h = Harness::new(Config::default());
    let (a, a_id, _) = h.join("r", "A");
    let (b, b_id, b_tok) = h.join("r", "B");
    h.recv(a);
    // B's connection drops with two undelivered frames still queued in the core.
    h.send(a, &Signal::Offer("1".into()).to_json(&b_id));
    h.send(a, &Signal::Offer("2".into()).to_json(&b_id));
    h.rooms.disconnect(b, h.now);
    for i in 3..=5 {
        h.send(a, &Signal::Offer(i.to_string()).to_json(&b_id));
    }
    assert!(h.recv(a).is_empty(), "A sees neither bye nor errors");
    h.advance(Duration::from_secs(10));
    let b2 = h.connect();
    h.send(b2, &Join { resume: Some(b_tok.as_str().into()), ..Join::new("r", "") }.to_json());
    let got = h.recv(b2);
    assert_eq!(got[0]["type"], "welcome");
    assert_eq!(got[0]["id"], b_id.as_str());
    assert_eq!(got[0]["resumed"], true);
    assert_ne!(got[0]["resume"], b_tok.as_str(), "a fresh token");
    assert_eq!(got[0]["peers"][0]["id"], a_id.as_str());
    let sdps: Vec<&str> = got[1..].iter().map(|m| m["sdp"].as_str().unwrap()).collect();
    assert_eq!(sdps, ["1", "2", "3", "4", "5"]);
    h.advance(Duration::from_secs(30));
    assert!(h.recv(a).is_empty(), "the old expiry was cancelled");
    // The old token is spent: using it now is a fresh join (room has space).
    let b3 = h.connect();
    h.send(b3, &Join { resume: Some(b_tok.as_str().into()), ..Join::new("r", "") }.to_json());
    let w = h.recv(b3).remove(0);
    assert_eq!(w["resumed"], false);
    assert_ne!(w["id"], b_id.as_str());
}

#[test]
fn resume_replaces_a_connection_not_yet_known_dead() {
    let mut h = Harness::new(Config::default());
    let (a, _, _) = h.join("r", "A");
    let (b, b_id, b_tok) = h.join("r", "B");
    h.recv(a);
    h.send(a, &Signal::Offer("unread".into()).to_json(&b_id));
    h.outputs();
    let b2 = h.connect();
    h.send(b2, &Join { resume: Some(b_tok.as_str().into()), ..Join::new("r", "") }.to_json());
    assert!(h.outputs().contains(&Output::Close {
        conn: b,
        code: close::RESUMED_ELSEWHERE,
        reason: "resumed elsewhere"
    }));
    let got = h.recv(b2);
    assert_eq!(got[0]["id"], b_id.as_str());
    assert_eq!(got[1]["sdp"], "unread", "what the old socket had not written moves over");
    h.rooms.disconnect(b, h.now);
    h.advance(Duration::from_secs(60));
    assert!(h.recv(a).is_empty(), "the old socket's end does not end the session");
    assert_eq!(h.rooms.stats().peers, 2);
}

#[test]
fn dropped_session_says_bye_after_grace() {
    let mut h = Harness::new(Config { resume_grace: Duration::from_secs(5), ..Config::default() });
    let (a, _, _) = h.join("r", "A");
    let (b, b_id, b_tok) = h.join("r", "B");
    h.recv(a);
    h.rooms.disconnect(b, h.now);
    assert_eq!(h.rooms.poll_timeout(), Some(h.now + Duration::from_secs(5)));
    h.advance(Duration::from_millis(4999));
    assert!(h.recv(a).is_empty());
    h.advance(Duration::from_millis(1));
    assert_eq!(h.recv(a), vec![serde_json::json!({"type":"bye","from":b_id})]);
    assert_eq!(h.rooms.poll_timeout(), None);
    let b2 = h.connect();
    h.send(b2, &Join { resume: Some(b_tok.as_str().into()), ..Join::new("r", "") }.to_json());
    let w = h.recv(b2).remove(0);
    assert_eq!(w["resumed"], false, "too late: a fresh session");
    assert_eq!(h.recv(a)[0]["type"], "hello");
}

#[test]
fn slow_reader_is_cut_off_and_keeps_its_frames() {
    let mut h = Harness::new(Config { max_queued: 4, rate_per_sec: 1000.0, ..Config::default() });
    let (a, _, _) = h.join("r", "A");
    let (b, b_id, b_tok) = h.join("r", "B");
    h.recv(a);
    h.outputs();
    for i in 0..5 {
        h.send(a, &Signal::Offer(i.to_string()).to_json(&b_id));
    }
    assert!(h.outputs().contains(&Output::Close { conn: b, code: close::POLICY, reason: "slow reader" }));
    h.send(a, &Signal::Offer("5".into()).to_json(&b_id));
    h.rooms.disconnect(b, h.now);
    let b2 = h.connect();
    h.send(b2, &Join { resume: Some(b_tok.as_str().into()), ..Join::new("r", "") }.to_json());
    let got = h.recv(b2);
    let sdps: Vec<&str> = got[1..].iter().map(|m| m["sdp"].as_str().unwrap()).collect();
    assert_eq!(sdps, ["0", "1", "2", "3", "4", "5"]);
}

#[test]
fn detached_queue_overflow_ends_the_session() {
    let mut h = Harness::new(Config { max_queued: 2, rate_per_sec: 1000.0, ..Config::default() });
    let (a, _, _) = h.join("r", "A");
    let (b, b_id, _) = h.join("r", "B");
    h.recv(a);
    h.rooms.disconnect(b, h.now);
    for i in 0..5 {
        h.send(a, &Signal::Offer(i.to_string()).to_json(&b_id));
    }
    let got = h.recv(a);
    assert_eq!(got[0], serde_json::json!({"type":"bye","from":b_id}));
    assert_eq!(got[1]["code"], "unknown-peer", "later messages are refused, not silently lost");
}

#[test]
fn empty_rooms_disappear_and_ids_are_unique() {
    let mut h = Harness::new(Config { max_peers: 1000, max_queued: 1000, ..Config::default() });
    let mut ids = std::collections::HashSet::new();
    let mut conns = vec![];
    for _ in 0..500 {
        let (c, id, _) = h.join("big", "");
        assert!(ids.insert(id));
        conns.push(c);
    }
    for c in conns {
        h.send(c, r#"{"type":"bye"}"#);
    }
    assert_eq!(h.rooms.stats(), Stats { connections: 500, rooms: 0, peers: 0, detached_peers: 0 });
}

#[test]
fn room_password_set_by_first_joiner() {
    let mut h = Harness::new(Config::default());
    let a = h.connect();
    h.send(a, r#"{"type":"join","room":"locked","password":"s3cret"}"#);
    assert_eq!(h.recv(a)[0]["type"], "welcome");
    let b = h.connect();
    h.send(b, r#"{"type":"join","room":"locked"}"#);
    let e = h.recv(b).remove(0);
    assert_eq!(e["code"], "unauthorized");
    assert!(e["message"].as_str().unwrap().contains("needs a password"));
    h.send(b, r#"{"type":"join","room":"locked","password":"guess"}"#);
    assert!(h.recv(b)[0]["message"].as_str().unwrap().contains("wrong password"));
    h.send(b, r#"{"type":"join","room":"locked","password":"s3cret"}"#);
    assert_eq!(h.recv(b)[0]["type"], "welcome");
    // An open room stays open: a password given later does not lock it.
    h.join("open", "X");
    let (_, _, _) = h.join("open", "Y");
    // Once empty, the room and its password are gone.
    h.send(a, r#"{"type":"bye"}"#);
    h.send(b, r#"{"type":"bye"}"#);
    h.join("locked", "New owner");
}

struct TokenPolicy;
impl JoinPolicy for TokenPolicy {
    fn admit(&self, _: ConnId, j: &Join<'_>) -> Result<Admission, ProtocolError> {
        match j.token.as_deref() {
            Some("viewer") => Ok(Admission { name: Some("Viewer".into()), publish: false, record: false }),
            Some("host") => Ok(Admission { name: None, publish: true, record: true }),
            _ => Err(ProtocolError::new(ErrorCode::Unauthorized, "a valid token is required")),
        }
    }
}

#[test]
fn join_policy_and_subscribe_only_peers() {
    let mut h = Harness::new(Config::default());
    h.rooms = Rooms::new(Config::default(), Box::new(|_: &str| Vec::new()), h.now).with_policy(Box::new(TokenPolicy));
    let x = h.connect();
    h.send(x, r#"{"type":"join","room":"r"}"#);
    assert_eq!(h.recv(x)[0]["code"], "unauthorized");
    h.send(x, r#"{"type":"join","room":"r","token":"host","name":"Host"}"#);
    let w = h.recv(x).remove(0);
    assert!(w.get("publish").is_none(), "publishers get the plain v1 welcome: {w}");
    let host_id = w["id"].as_str().unwrap().to_owned();
    let v = h.connect();
    h.send(v, r#"{"type":"join","room":"r","token":"viewer","name":"I am the host"}"#);
    let w = h.recv(v).remove(0);
    assert_eq!(w["publish"], false);
    assert_eq!(h.recv(x)[0]["name"], "Viewer", "the token fixes the name");
    let sends =
        "v=0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=sendrecv\r\nm=application 9 UDP/DTLS/SCTP webrtc-datachannel\r\n";
    let default_dir = "v=0\r\nm=video 9 UDP/TLS/RTP/SAVPF 96\r\na=mid:0\r\n";
    let receives = "v=0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=recvonly\r\nm=video 9 UDP/TLS/RTP/SAVPF 96\r\na=inactive\r\nm=application 9 UDP/DTLS/SCTP webrtc-datachannel\r\n";
    for sdp in [sends, default_dir] {
        h.send(v, &Signal::Answer(sdp.into()).to_json(&host_id));
        assert_eq!(h.recv(v)[0]["code"], "unauthorized", "{sdp:?}");
    }
    h.send(v, &Signal::Answer(receives.into()).to_json(&host_id));
    assert!(h.recv(v).is_empty());
    assert_eq!(h.recv(x)[0]["sdp"], receives);
    h.send(x, &Signal::Offer(sends.into()).to_json(w["id"].as_str().unwrap()));
    assert_eq!(h.recv(v)[0]["type"], "offer", "publishers are not restricted");
}

#[test]
fn shutdown_tells_everyone_and_refuses_joins() {
    let mut h = Harness::new(Config::default());
    let (a, _, _) = h.join("r", "A");
    let lobby = h.connect();
    h.outputs();
    h.rooms.shutdown(h.now);
    for c in [a, lobby] {
        let got = h.recv(c);
        assert!(got.iter().any(|m| m["code"] == "server-shutdown"), "{got:?}");
    }
    let outs = h.outputs();
    for c in [a, lobby] {
        assert!(outs.contains(&Output::Close { conn: c, code: close::GOING_AWAY, reason: "server shutting down" }));
    }
    // Connected just as the shutdown began (its upgrade finished after `shutdown` went through the connections):
    // told the same at once, not left open without a word.
    let late = h.connect();
    assert!(h.outputs().contains(&Output::Close {
        conn: late,
        code: close::GOING_AWAY,
        reason: "server shutting down"
    }));
    h.send(late, r#"{"type":"join","room":"r"}"#);
    let got = h.recv(late);
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0]["code"], "server-shutdown");
}

#[test]
fn counters_count() {
    let mut h = Harness::new(Config::default());
    let (a, _, _) = h.join("r", "A");
    let (_, b_id, _) = h.join("r", "B");
    h.send(a, &Signal::Offer("x".into()).to_json(&b_id));
    h.send(a, "junk");
    h.send(a, &Signal::Candidate(None).to_json("nobody"));
    let c = h.rooms.counters().clone();
    let counted: Vec<_> = c.messages.iter().map(|(k, n)| (k.as_str(), n)).collect();
    assert_eq!(
        counted,
        [
            ("join", 2),
            ("offer", 1),
            ("answer", 0),
            ("candidate", 1),
            ("bye", 0),
            ("data", 0),
            ("view", 0),
            ("record", 0),
            ("invalid", 1)
        ]
    );
    assert_eq!(c.errors[ErrorCode::BadJson], 1);
    assert_eq!(c.errors[ErrorCode::UnknownPeer], 1);
    assert_eq!(c.joins, 2);
}

#[test]
fn slow_reader_bound_is_in_bytes_too() {
    // 8 frames allowed, but only 100 KB: two 60 KB frames already make a slow reader.
    let mut h = Harness::new(Config {
        max_queued: 8,
        max_queued_bytes: 100_000,
        rate_per_sec: 1000.0,
        max_message_size: 65536,
        ..Config::default()
    });
    let (a, _, _) = h.join("r", "A");
    let (b, b_id, b_tok) = h.join("r", "B");
    h.recv(a);
    h.outputs();
    let big = "x".repeat(60_000);
    h.send(a, &Signal::Offer(big.clone()).to_json(&b_id));
    assert!(h.outputs().iter().all(|o| !matches!(o, Output::Close { .. })));
    h.send(a, &Signal::Offer(big.clone()).to_json(&b_id));
    assert!(h.outputs().contains(&Output::Close { conn: b, code: close::POLICY, reason: "slow reader" }));
    // Detached with 120 KB, it takes frames while it holds under twice the bound (to 180 KB, then 240 KB); the next
    // one ends the session and is refused.
    for _ in 0..2 {
        h.send(a, &Signal::Offer(big.clone()).to_json(&b_id));
        assert!(h.recv(a).is_empty());
    }
    h.send(a, &Signal::Offer(big.clone()).to_json(&b_id));
    let got = h.recv(a);
    assert_eq!(got[0], serde_json::json!({"type":"bye","from":b_id}), "{got:?}");
    assert_eq!(got[1]["code"], "unknown-peer");
    let b2 = h.connect();
    h.send(b2, &Join { resume: Some(b_tok.as_str().into()), ..Join::new("r", "") }.to_json());
    assert_eq!(h.recv(b2)[0]["resumed"], false);
}

#[test]
fn ids_and_tokens_are_fresh_and_from_the_alphabet() {
    let mut h = Harness::new(Config { max_peers: 2, ..Config::default() });
    let mut seen = std::collections::HashSet::new();
    let mut counts = [0usize; 62];
    for i in 0..400 {
        let (_, id, token) = h.join(&format!("r{}", i / 2), "n");
        assert_eq!((id.len(), token.len()), (10, 24), "{id} {token}");
        for b in id.bytes().chain(token.bytes()) {
            let k = webcall_protocol::ID_ALPHABET
                .iter()
                .position(|&a| a == b)
                .unwrap_or_else(|| panic!("{b} not in the alphabet"));
            counts[k] += 1;
        }
        assert!(seen.insert(id) && seen.insert(token), "an id or token came twice");
    }
    // 400 * 34 characters over 62 letters: about 219 each; every letter shows up, none dominates.
    assert!(counts.iter().all(|&c| (100..400).contains(&c)), "{counts:?}");
}

#[test]
fn connections_and_sessions_come_and_go_in_any_order() {
    // The maps keep entries densely (removal moves the last entry into the hole): churn in a mixed order and
    // check that every remaining connection and session still finds its own entry.
    let mut h = Harness::new(Config { max_peers: 3, resume_grace: Duration::from_secs(5), ..Config::default() });
    let mut live = Vec::new();
    for round in 0..6 {
        for i in 0..9 {
            let (c, id, _) = h.join(&format!("r{round}-{}", i / 3), &format!("p{i}"));
            live.push((c, id));
        }
        // Leave from the front, the middle and the back.
        for k in [0, live.len() / 2, live.len() - 1] {
            let (c, _) = live.remove(k.min(live.len() - 1));
            if k % 2 == 0 {
                h.send(c, BYE);
            }
            h.rooms.disconnect(c, h.now);
            h.rooms.check_invariants();
        }
        h.advance(Duration::from_secs(6));
        h.rooms.check_invariants();
        for (c, id) in &live {
            assert_eq!(h.rooms.peer_of(*c), Some(id.as_str()));
        }
        for (c, _) in &live {
            h.recv(*c);
        }
    }
    assert_eq!(h.rooms.stats().connections, live.len());
    assert_eq!(h.rooms.stats().peers, live.len());
}

#[test]
fn a_taken_queue_leaves_nothing_behind() {
    let mut h = Harness::new(small());
    let (a, _, _) = h.join("r", "A");
    let (_, b_id, _) = h.join("r", "B");
    h.recv(a);
    h.send(a, &Signal::Offer("v=0".into()).to_json(&b_id));
    let c = &h.rooms.conns[&a];
    assert!(c.out.is_empty() && c.out.frames.capacity() == 0, "an idle connection keeps no queue buffer");
}

impl Harness {
    /// Like `join`, for a client that speaks SFU; returns (conn, id, frames after the welcome).
    fn join_sfu(&mut self, room: &str, name: &str) -> (ConnId, String, Vec<Value>) {
        let c = self.connect();
        self.send(c, &Join { sfu: true, ..Join::new(room, name) }.to_json());
        let mut got = self.recv(c);
        let w = got.remove(0);
        assert_eq!(w["type"], "welcome", "{w}");
        (c, w["id"].as_str().unwrap().into(), got)
    }
    fn sfu_requests(&mut self) -> Vec<SfuRequest> {
        self.split(|o| matches!(o, Output::Sfu(_)))
            .into_iter()
            .map(|o| match o {
                Output::Sfu(r) => r,
                _ => unreachable!("split"),
            })
            .collect()
    }
}

fn topology_sfu() -> Value {
    serde_json::json!({"type":"topology","mode":"sfu"})
}

#[test]
fn auto_moves_to_the_sfu_on_the_third_sfu_peer_and_stays_there() {
    let mut h = Harness::new(Config::default());
    let (a, a_id, after) = h.join_sfu("r", "A");
    assert!(after.is_empty());
    let (b, _, after) = h.join_sfu("r", "B");
    assert!(after.is_empty(), "two peers stay peer-to-peer: {after:?}");
    // In a peer-to-peer room a `view` has nowhere to go.
    h.send(b, r#"{"type":"view","tracks":[]}"#);
    let e = h.recv(b);
    assert_eq!((e[0]["code"].as_str(), e[0]["ref"].as_str()), (Some("needs-sfu"), Some("view")), "{e:?}");
    assert_eq!(h.recv(a)[0]["type"], "hello");
    assert!(!h.rooms.room_is_sfu("r"));
    let (c, c_id, after) = h.join_sfu("r", "C");
    assert_eq!(after, vec![topology_sfu()]);
    assert_eq!(h.recv(a), vec![topology_sfu(), serde_json::json!({"type":"hello","from":c_id,"name":"C"})]);
    assert_eq!(h.recv(b)[0], topology_sfu());

    // Offers to the reserved id "sfu" go to the SFU adapter, not to a peer.
    h.send(c, &Signal::Offer("v=0 c".into()).to_json("sfu"));
    let req = h.sfu_requests();
    assert!(
        matches!(&req[..], [SfuRequest::Signal { peer, kind: webcall_protocol::RelayKind::Offer, payload, .. }]
            if **peer == *c_id && payload == "\"v=0 c\""),
        "{req:?}"
    );
    assert!(h.recv(c).is_empty());
    // The SFU's frames reach the peer.
    assert!(h.rooms.sfu_frame(&c_id, Arc::from(webcall_protocol::encode_sfu_answer("v=0 s"))));
    assert_eq!(h.recv(c)[0]["from"], "sfu");
    // `view` goes to the SFU too.
    h.send(c, r#"{"type":"view","tracks":[{"mid":"4","width":320,"height":180}]}"#);
    let view = webcall_protocol::TrackView { mid: "4".into(), width: 320, height: 180 };
    assert_eq!(
        h.sfu_requests(),
        vec![SfuRequest::View { room: Arc::from("r"), peer: Arc::from(c_id.as_str()), tracks: vec![view] }]
    );
    assert!(h.recv(c).is_empty());

    // Shrinking back to two keeps the SFU; leaving ends the SFU session.
    h.send(c, r#"{"type":"bye"}"#);
    assert_eq!(h.sfu_requests(), vec![SfuRequest::Leave { room: Arc::from("r"), peer: Arc::from(c_id.as_str()) }]);
    assert!(h.rooms.room_is_sfu("r"));
    h.send(a, r#"{"type":"bye"}"#);
    h.send(b, r#"{"type":"bye"}"#);
    assert!(!h.rooms.room_is_sfu("r"), "an emptied room is gone, so the next call starts peer-to-peer");
    let _ = a_id;
}

#[test]
fn a_v1_client_keeps_a_room_peer_to_peer_and_is_refused_by_an_sfu_room() {
    let mut h = Harness::new(Config::default());
    h.join("mixed", "v1");
    h.join_sfu("mixed", "A");
    let (_, _, after) = h.join_sfu("mixed", "B");
    assert!(after.is_empty(), "a v1 member keeps the room a mesh: {after:?}");
    assert!(!h.rooms.room_is_sfu("mixed"));

    h.join_sfu("s", "A");
    h.join_sfu("s", "B");
    h.join_sfu("s", "C");
    let c = h.connect();
    h.send(c, &Join::new("s", "").to_json());
    let e = h.recv(c).remove(0);
    assert_eq!((e["type"].as_str(), e["code"].as_str()), (Some("error"), Some("needs-sfu")), "{e}");
    // Addressing "sfu" in a mesh room is an unknown peer, as in v1.
    let (m, _, _) = h.join("mixed2", "x");
    h.send(m, &Signal::Offer("v=0".into()).to_json("sfu"));
    assert_eq!(h.recv(m)[0]["code"], "unknown-peer");
}

#[test]
fn sfu_topology_and_capacities() {
    let mut h = Harness::new(Config { topology: Topology::Sfu, max_peers: 2, max_sfu_peers: 3, ..Config::default() });
    let c = h.connect();
    h.send(c, &Join::new("r", "").to_json());
    assert_eq!(h.recv(c)[0]["code"], "needs-sfu");
    let (_, _, after) = h.join_sfu("r", "A");
    assert_eq!(after, vec![topology_sfu()], "an sfu-topology room is one from its first peer");
    h.join_sfu("r", "B");
    h.join_sfu("r", "C");
    let d = h.connect();
    h.send(d, &Join { sfu: true, ..Join::new("r", "") }.to_json());
    assert_eq!(h.recv(d)[0]["code"], "room-full", "--max-sfu-peers bounds SFU rooms");

    let mut h = Harness::new(Config { topology: Topology::Mesh, ..Config::default() });
    for n in ["A", "B", "C"] {
        let (_, _, after) = h.join_sfu("m", n);
        assert!(after.is_empty(), "mesh never moves");
    }
    assert!(!h.rooms.room_is_sfu("m"));
}

#[test]
fn a_resumed_peer_of_an_sfu_room_is_told_again() {
    let mut h = Harness::new(Config { topology: Topology::Sfu, ..Config::default() });
    let c = h.connect();
    h.send(c, &Join { sfu: true, ..Join::new("r", "") }.to_json());
    let w = h.recv(c).remove(0);
    h.rooms.disconnect(c, h.now);
    let c2 = h.connect();
    let resume = w["resume"].as_str().map(Into::into);
    h.send(c2, &Join { sfu: true, resume, ..Join::new("r", "") }.to_json());
    let got = h.recv(c2);
    assert_eq!(got[0]["resumed"], true);
    assert_eq!(got[1], topology_sfu());
}

/// A WHIP publisher's connection (`connect_sfu_only`) moves even a one-page room to the SFU, before its `hello`.
#[test]
fn an_sfu_only_client_moves_a_small_room_to_the_sfu_or_is_refused() {
    let mut h = Harness::new(Config::default());
    let (a, _, _) = h.join_sfu("r", "A");
    let w = h.conn_id();
    h.rooms.connect_sfu_only(w, h.now);
    h.send(w, &Join { sfu: true, ..Join::new("r", "OBS") }.to_json());
    let got = h.recv(w);
    assert_eq!((got[0]["type"].as_str(), got[1].clone()), (Some("welcome"), topology_sfu()), "{got:?}");
    let hello = serde_json::json!({"type":"hello","from":got[0]["id"],"name":"OBS"});
    assert_eq!(h.recv(a), vec![topology_sfu(), hello], "topology before the publisher's hello");
    assert!(h.rooms.room_is_sfu("r"));

    // A fresh room is an SFU room from the publisher on.
    let w2 = h.conn_id();
    h.rooms.connect_sfu_only(w2, h.now);
    h.send(w2, &Join { sfu: true, ..Join::new("fresh", "") }.to_json());
    assert_eq!(h.recv(w2)[1], topology_sfu());

    // A room with a v1 member stays as it is; the publisher is refused.
    h.join("v1room", "old");
    let w3 = h.conn_id();
    h.rooms.connect_sfu_only(w3, h.now);
    h.send(w3, &Join { sfu: true, ..Join::new("v1room", "") }.to_json());
    assert_eq!(h.recv(w3)[0]["code"], "needs-sfu");
    assert!(!h.rooms.room_is_sfu("v1room"));
}

#[test]
fn viewers_are_admitted_to_sfu_rooms_with_the_password() {
    let mut h = Harness::new(Config { topology: Topology::Sfu, ..Config::default() });
    assert_eq!(h.rooms.admit_viewer("none", None, "v", h.now), Err(WatchRefusal::NoRoom));
    let c = h.connect();
    h.send(c, &Join { sfu: true, password: Some("pw".into()), ..Join::new("r", "") }.to_json());
    assert_eq!(h.recv(c)[0]["type"], "welcome");
    let refused = |r: Result<Vec<IceServer>, WatchRefusal>| match r {
        Err(WatchRefusal::Refused(e)) => e.code,
        other => panic!("{other:?}"),
    };
    assert_eq!(refused(h.rooms.admit_viewer("r", None, "v", h.now)), ErrorCode::Unauthorized);
    assert_eq!(refused(h.rooms.admit_viewer("r", Some("nope"), "v", h.now)), ErrorCode::Unauthorized);
    let ice = h.rooms.admit_viewer("r", Some("pw"), "v", h.now).unwrap();
    assert_eq!(ice[0].username.as_deref(), Some("v"), "ICE servers minted for the viewer");

    let mut h = Harness::new(Config::default());
    h.join_sfu("p2p", "A");
    assert_eq!(h.rooms.admit_viewer("p2p", None, "v", h.now), Err(WatchRefusal::NotSfu));
}

#[test]
fn data_goes_to_the_others_of_an_sfu_room_and_is_refused_in_a_mesh() {
    let mut h = Harness::new(Config::default());
    let (a, a_id, _) = h.join_sfu("r", "A");
    let (b, _, _) = h.join_sfu("r", "B");
    h.recv(a);
    // Peer-to-peer: the data channel carries chat; the server says so.
    h.send_json(a, serde_json::json!({"type":"data","data":{"type":"chat","text":"hi"}}));
    let e = h.recv(a).remove(0);
    assert_eq!((e["code"].as_str(), e["ref"].as_str()), (Some("needs-sfu"), Some("data")), "{e}");
    assert!(h.recv(b).is_empty());

    let (c, _, _) = h.join_sfu("r", "C");
    h.recv(a);
    h.recv(b);
    let chat = serde_json::json!({"type":"chat","text":"hi \"all\"","name":"A","ts":1});
    h.send_json(a, serde_json::json!({"type":"data","data":chat}));
    let want = serde_json::json!({"type":"data","from":a_id,"data":chat});
    assert_eq!(h.recv(b), vec![want.clone()]);
    assert_eq!(h.recv(c), vec![want]);
    assert!(h.recv(a).is_empty(), "not echoed to the sender");
    // Raw JSON: `data` must be an object, and this one is not.
    h.send_json(a, serde_json::json!({"type":"data","data":[1]}));
    assert_eq!(h.recv(a)[0]["code"], "bad-field");
}

#[test]
fn recording_is_started_by_a_member_shown_to_all_and_to_late_joiners() {
    let cfg = Config { topology: Topology::Sfu, recording: true, ..Config::default() };
    let mut h = Harness::new(cfg);
    let (a, a_id, _) = h.join_sfu("r", "A");
    let (b, _, _) = h.join_sfu("r", "B");
    h.recv(a);
    h.send(a, r#"{"type":"record","action":"start"}"#);
    let on = serde_json::json!({"type":"recording","active":true,"by":a_id});
    assert_eq!(h.recv(a), vec![on.clone()]);
    assert_eq!(h.recv(b), vec![on]);
    let room: Arc<str> = Arc::from("r");
    assert_eq!(h.sfu_requests().last(), Some(&SfuRequest::Record { room: room.clone(), start: true }));
    // Again: nothing changes, the sender is told how it is.
    h.send(b, r#"{"type":"record","action":"start"}"#);
    assert_eq!(h.recv(b), vec![serde_json::json!({"type":"recording","active":true})]);
    assert!(h.recv(a).is_empty());
    assert!(!h.sfu_requests().iter().any(|r| matches!(r, SfuRequest::Record { .. })));
    let (_, _, after) = h.join_sfu("r", "Late");
    assert!(after.contains(&serde_json::json!({"type":"recording","active":true})), "{after:?}");
    h.send(b, r#"{"type":"record","action":"stop"}"#);
    let off = h.recv(a).into_iter().find(|m| m["type"] == "recording").expect("a is told");
    assert_eq!(off["active"], false);
    assert_eq!(h.sfu_requests().last(), Some(&SfuRequest::Record { room: room.clone(), start: false }));
    assert_eq!(h.rooms.set_recording("r", true, "api", h.now), Ok(true));
    assert_eq!(h.recv(a), vec![serde_json::json!({"type":"recording","active":true,"by":"api"})]);
    // Bad input and the empty room.
    h.send(a, r#"{"type":"record","action":"pause"}"#);
    assert_eq!(h.recv(a)[0]["code"], "bad-field");
    h.send(a, r#"{"type":"record"}"#);
    assert_eq!(h.recv(a)[0]["code"], "missing-field");
    assert_eq!(h.rooms.set_recording("nobody", true, "api", h.now), Err(RecordRefusal::NoRoom("nobody".into())));
}

#[test]
fn recording_is_refused_when_off_in_a_mesh_room_and_without_the_claim() {
    let mut h = Harness::new(Config::default());
    let (a, _, _) = h.join("p2p", "A");
    h.send(a, r#"{"type":"record","action":"start"}"#);
    let e = h.recv(a).remove(0);
    assert_eq!(e["code"], "unavailable");
    assert!(e["message"].as_str().unwrap().contains("--record-dir"), "{e}");

    // A room with a member that does not speak SFU stays peer-to-peer, and cannot be recorded.
    let mut h = Harness::new(Config { recording: true, ..Config::default() });
    let (a, _, _) = h.join_sfu("p2p", "A");
    h.join("p2p", "B (v1)");
    h.recv(a);
    h.send(a, r#"{"type":"record","action":"start"}"#);
    let e = h.recv(a).remove(0);
    assert_eq!((e["code"].as_str(), e["ref"].as_str()), (Some("needs-sfu"), Some("record")));
    assert!(e["message"].as_str().unwrap().contains("peer-to-peer"), "{e}");
    // A pair of SFU speakers (two pages) moves to the SFU to be recorded.
    let (c, _, _) = h.join_sfu("pair", "C");
    let (d, d_id, _) = h.join_sfu("pair", "D");
    h.recv(c);
    assert!(!h.rooms.room_is_sfu("pair"));
    h.send(d, r#"{"type":"record","action":"start"}"#);
    let on = serde_json::json!({"type":"recording","active":true,"by":d_id});
    for x in [c, d] {
        assert_eq!(h.recv(x), vec![topology_sfu(), on.clone()]);
    }
    assert!(h.rooms.room_is_sfu("pair") && h.rooms.is_recording("pair"));

    let cfg = Config { topology: Topology::Sfu, recording: true, ..Config::default() };
    h.rooms = Rooms::new(cfg, Box::new(|_: &str| Vec::new()), h.now).with_policy(Box::new(TokenPolicy));
    let v = h.connect();
    h.send(v, r#"{"type":"join","room":"r","token":"viewer","sfu":true}"#);
    h.recv(v);
    h.send(v, r#"{"type":"record","action":"start"}"#);
    assert_eq!(h.recv(v)[0]["code"], "unauthorized");
    let x = h.connect();
    h.send(x, r#"{"type":"join","room":"r","token":"host","sfu":true}"#);
    h.recv(x);
    h.send(x, r#"{"type":"record","action":"start"}"#);
    assert_eq!(h.recv(x)[0]["type"], "recording");
    assert!(h.rooms.is_recording("r"));
    // The room empties: the SFU is told to stop.
    h.send(v, r#"{"type":"bye"}"#);
    h.send(x, r#"{"type":"bye"}"#);
    let room: Arc<str> = Arc::from("r");
    assert_eq!(h.sfu_requests().last(), Some(&SfuRequest::Record { room, start: false }));
}

#[test]
fn maps_give_back_their_peak_capacity_once_empty() {
    let now = Instant::now();
    let mut r = Rooms::new(Config::default(), Box::new(|_: &str| Vec::new()), now);
    for c in 0..2000 {
        r.connect(c, now);
        r.message(c, &format!(r#"{{"type":"join","room":"r{}"}}"#, c / 2), now);
    }
    assert!(r.conns.capacity() >= 2000 && r.peers.capacity() >= 2000);
    for c in 0..2000 {
        r.message(c, r#"{"type":"bye"}"#, now);
        r.disconnect(c, now);
    }
    std::iter::from_fn(|| r.poll_output()).count();
    r.tick(now);
    assert!(r.conns.capacity() < 100, "conns kept {}", r.conns.capacity());
    assert!(r.peers.capacity() < 100 && r.rooms.capacity() < 100 && r.tokens.capacity() < 100);
    assert!(r.out.capacity() < 100);
}

#[test]
fn a_single_node_forwards_nothing_and_reports_the_leave() {
    let now = Instant::now();
    let mut r = Rooms::new(Config::default(), Box::new(|_: &str| Vec::new()), now);
    r.connect(1, now);
    r.message(1, r#"{"type":"join","room":"r"}"#, now);
    r.message(1, r#"{"type":"bye"}"#, now);
    let out: Vec<Output> = std::iter::from_fn(|| r.poll_output()).collect();
    assert!(!out.iter().any(|o| matches!(o, Output::Forward { .. })), "{out:?}");
    assert!(matches!(out.last(), Some(Output::Left { room, .. }) if &**room == "r"), "{out:?}");
}
