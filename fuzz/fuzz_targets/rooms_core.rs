//! Arbitrary sequences of connections, messages, drops, resumes and time against the room core: it never panics,
//! and its internal maps always agree (`check_invariants`).
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use std::time::{Duration, Instant};
use webcall_rooms::{Config, Rooms};

#[derive(Arbitrary, Debug)]
enum Op {
    Connect,
    Join { conn: u8, room: u8, resume: Option<u8>, password: Option<u8> },
    Relay { conn: u8, kind: u8, to: u8, big: bool },
    Bye { conn: u8 },
    Raw { conn: u8, text: String },
    Binary { conn: u8, len: u16 },
    Take { conn: u8 },
    Disconnect { conn: u8 },
    Advance { ms: u16 },
    Shutdown,
}

fuzz_target!(|ops: Vec<Op>| {
    let cfg = Config {
        max_peers: 3,
        max_rooms: 4,
        max_queued: 8,
        max_queued_bytes: 8000,
        max_message_size: 2048,
        resume_grace: Duration::from_millis(500),
        rate_per_sec: 20.0,
        max_errors: 5.0,
        ..Config::default()
    };
    let mut now = Instant::now();
    let mut rooms = Rooms::new(cfg, Box::new(|_: &str| Vec::new()), now);
    let mut conns: Vec<u64> = Vec::new();
    let mut ids: Vec<String> = Vec::new();
    let mut tokens: Vec<String> = Vec::new();
    let mut next = 1u64;
    let pick = |v: &Vec<u64>, i: u8| if v.is_empty() { 0 } else { v[i as usize % v.len()] };
    for op in ops.into_iter().take(400) {
        match op {
            Op::Connect => {
                rooms.connect(next, now);
                conns.push(next);
                next += 1;
            }
            Op::Join { conn, room, resume, password } => {
                let mut j = serde_json::json!({"type":"join","room":format!("r{}", room % 5)});
                if let (Some(r), false) = (resume, tokens.is_empty()) {
                    j["resume"] = tokens[r as usize % tokens.len()].clone().into();
                }
                if let Some(p) = password {
                    j["password"] = format!("p{}", p % 2).into();
                }
                rooms.message(pick(&conns, conn), &j.to_string(), now);
            }
            Op::Relay { conn, kind, to, big } => {
                let to = if ids.is_empty() { "x".to_owned() } else { ids[to as usize % ids.len()].clone() };
                let sdp = if big { "s".repeat(3000) } else { "v=0".into() };
                let m = match kind % 3 {
                    0 => serde_json::json!({"type":"offer","to":to,"sdp":sdp}),
                    1 => serde_json::json!({"type":"answer","to":to,"sdp":sdp}),
                    _ => serde_json::json!({"type":"candidate","to":to,"candidate":null}),
                };
                rooms.message(pick(&conns, conn), &m.to_string(), now);
            }
            Op::Bye { conn } => rooms.message(pick(&conns, conn), r#"{"type":"bye"}"#, now),
            Op::Raw { conn, text } => rooms.message(pick(&conns, conn), &text, now),
            Op::Binary { conn, len } => rooms.binary(pick(&conns, conn), len as usize, now),
            Op::Take { conn } => {
                let mut buf = Vec::new();
                rooms.take(pick(&conns, conn), &mut buf);
                for f in buf {
                    let v: serde_json::Value = serde_json::from_str(&f).expect("the core writes JSON");
                    if v["type"] == "welcome" {
                        ids.push(v["id"].as_str().unwrap().to_owned());
                        tokens.push(v["resume"].as_str().unwrap().to_owned());
                    }
                }
            }
            Op::Disconnect { conn } => {
                let c = pick(&conns, conn);
                rooms.disconnect(c, now);
                conns.retain(|x| *x != c);
            }
            Op::Advance { ms } => {
                now += Duration::from_millis(ms as u64);
                rooms.tick(now);
            }
            Op::Shutdown => rooms.shutdown(now),
        }
        while rooms.poll_output().is_some() {}
        rooms.check_invariants();
    }
});
