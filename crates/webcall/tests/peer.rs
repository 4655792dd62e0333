//! `webcall peer` end to end: real `webcall serve` and real `webcall peer` processes on loopback (host
//! candidates pinned to 127.0.0.1 with --ip), checked through their stdout, exit codes and recordings.

use webcall_testkit as common;

use common::{Proc, ServerProc};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};
use webcall_peer::clip::{Clip, Layer};

/// How long to wait for something that should happen (not a performance bound).
const WAIT: Duration = Duration::from_secs(30);

/// Waits until `p`'s stats lines show at least `n` frames received from peer `id`.
fn wait_frames_from(p: &Proc, id: &str, n: u64) {
    let prefix = format!("stats peer={id} ");
    p.wait_for(&format!("{n} frames from {id}"), |l| {
        l.starts_with(&prefix)
            && l.split_whitespace()
                .find_map(|f| f.strip_prefix("frames_in="))
                .and_then(|v| v.parse::<u64>().ok())
                .is_some_and(|v| v >= n)
    });
}

/// The peer id in `p`'s `n`th 'peer ID recording' line.
fn nth_recording(p: &Proc, n: usize) -> String {
    let l = p.wait_n(n, "recording", |l| l.starts_with("peer ") && l.contains(" recording "));
    l.split_whitespace().nth(1).unwrap().to_owned()
}

fn temp_dir(tag: &str) -> common::TempDir {
    common::temp_dir(&format!("peer-{tag}"))
}

/// The frames `--send testsrc --size 320x180` loops.
fn low_clip() -> Vec<Vec<u8>> {
    Clip::builtin(Layer::Low).frames.iter().map(|f| f.data.to_vec()).collect()
}

/// Reads an IVF file and checks it the way a player would (header, frame headers, VP8 payload headers), and that
/// it is exactly what was sent: every frame is, byte for byte, a frame of the looped `clip`, each the one after
/// the frame before (around the loop), or a keyframe (a keyframe request skips ahead to the next one), and the
/// RTP clock steps one frame time (30 fps) each, across loops too. Returns the number of frames.
fn check_ivf(path: &Path, w: u16, h: u16, clip: &[Vec<u8>]) -> usize {
    let b = std::fs::read(path).unwrap();
    let ctx = path.display();
    assert!(b.len() > 32, "{ctx}: too short");
    assert_eq!(&b[0..4], b"DKIF", "{ctx}: signature");
    assert_eq!(u16::from_le_bytes([b[4], b[5]]), 0, "{ctx}: version");
    assert_eq!(u16::from_le_bytes([b[6], b[7]]), 32, "{ctx}: header size");
    assert_eq!(&b[8..12], b"VP80", "{ctx}: fourcc");
    assert_eq!((u16::from_le_bytes([b[12], b[13]]), u16::from_le_bytes([b[14], b[15]])), (w, h), "{ctx}: size");
    let rate = u32::from_le_bytes(b[16..20].try_into().unwrap());
    let scale = u32::from_le_bytes(b[20..24].try_into().unwrap());
    assert!(rate > 0 && scale > 0, "{ctx}: timebase");
    let count = u32::from_le_bytes(b[24..28].try_into().unwrap()) as usize;
    let (mut o, mut n, mut last_pts, mut last_idx) = (32usize, 0usize, 0u64, 0usize);
    while o < b.len() {
        assert!(o + 12 <= b.len(), "{ctx}: frame {n} header cut short");
        let size = u32::from_le_bytes(b[o..o + 4].try_into().unwrap()) as usize;
        let pts = u64::from_le_bytes(b[o + 4..o + 12].try_into().unwrap());
        assert!(size > 3 && o + 12 + size <= b.len(), "{ctx}: frame {n} size {size}");
        assert!(n == 0 || pts >= last_pts, "{ctx}: frame {n} pts goes back");
        let f = &b[o + 12..o + 12 + size];
        // VP8 frame tag (RFC 6386 9.1): keyframe bit, version 0-3, show_frame, first partition inside the frame.
        let tag = u32::from_le_bytes([f[0], f[1], f[2], 0]);
        let key = tag & 1 == 0;
        assert!((tag >> 1) & 7 <= 3, "{ctx}: frame {n} version");
        assert!((tag >> 5) as usize <= size, "{ctx}: frame {n} first partition size");
        if n == 0 {
            assert!(key, "{ctx}: the recording starts with a keyframe");
        }
        if key {
            assert_eq!(&f[3..6], &[0x9d, 0x01, 0x2a], "{ctx}: frame {n} keyframe start code");
        }
        if key {
            let size = (u16::from_le_bytes([f[6], f[7]]) & 0x3fff, u16::from_le_bytes([f[8], f[9]]) & 0x3fff);
            assert_eq!(size, (w, h), "{ctx}: frame {n} keyframe picture size");
        }
        let idx = clip.iter().position(|c| c == f).unwrap_or_else(|| panic!("{ctx}: frame {n} is not a frame sent"));
        if n > 0 {
            assert!(
                key || idx == (last_idx + 1) % clip.len(),
                "{ctx}: frame {n} (clip frame {idx}) does not follow clip frame {last_idx}"
            );
            assert_eq!(pts - last_pts, 3000, "{ctx}: frame {n}: the RTP clock steps one frame time");
        }
        last_pts = pts;
        last_idx = idx;
        o += 12 + size;
        n += 1;
    }
    assert_eq!(count, n, "{ctx}: frame count in the header");
    n
}

fn ivf_files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|r| {
            r.filter_map(|e| e.ok()).map(|e| e.path()).filter(|p| p.extension().is_some_and(|e| e == "ivf")).collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

#[test]
fn two_peers_send_record_and_chat() {
    let server = ServerProc::start(&[]);
    let url = server.ws_url();
    let dir = temp_dir("two");
    let (da, db) = (dir.path().join("alice"), dir.path().join("bob"));
    let common = ["--send", "testsrc", "--chat", "--duration", "8s"];
    let mut alice = Proc::peer(&url, "two", "alice", &[&common[..], &["--record", da.to_str().unwrap()]].concat());
    let alice_id = alice.id();
    let mut bob = Proc::peer(&url, "two", "bob", &[&common[..], &["--record", db.to_str().unwrap()]].concat());
    let bob_id = bob.id();

    alice.wait_for("connected", |l| l == format!("peer {bob_id} connected"));
    bob.wait_for("connected", |l| l == format!("peer {alice_id} connected"));
    alice.wait_for("selected pair", |l| l.starts_with(&format!("peer {bob_id} selected pair host 127.0.0.1:")));
    alice.wait_for("chat channel", |l| l == format!("peer {bob_id} chat open"));
    bob.wait_for("chat channel", |l| l == format!("peer {alice_id} chat open"));
    alice.say("hello from alice");
    bob.say("hi from bob, with ünïcode");
    bob.wait_for("alice's chat", |l| l == "chat alice: hello from alice");
    alice.wait_for("bob's chat", |l| l == "chat bob: hi from bob, with ünïcode");

    assert_eq!(alice.wait_exit(), 0, "alice:\n{}", alice.output());
    assert_eq!(bob.wait_exit(), 0, "bob:\n{}", bob.output());

    for (me, dir, other, other_id) in [(&alice, &da, "bob", &bob_id), (&bob, &db, "alice", &alice_id)] {
        let files = ivf_files(dir);
        assert_eq!(files.len(), 1, "{}: one recording: {files:?}", me.tag());
        assert!(files[0].ends_with(format!("{other}-{other_id}.ivf")), "{files:?}");
        let n = check_ivf(&files[0], 320, 180, &low_clip());
        // Media flows for most of the 8 s at 30 fps; ask for 2 s worth so a loaded machine still passes.
        assert!(n >= 60, "{}: only {n} frames from {other}", me.tag());
        let recorded = me.wait_for("recorded line", |l| l.starts_with(&format!("peer {other_id} recorded ")));
        assert!(recorded.contains(&format!("recorded {n} frames")), "{recorded}");
        let fin = me.wait_for("final stats", |l| l.starts_with(&format!("stats final peer={other_id} ")));
        assert!(fin.contains("connected=true") && fin.contains("chat_in=1"), "{fin}");
        // testsrc sends Opus too: 20 ms packets for most of the call.
        let audio_in = fin.split_whitespace().find_map(|f| f.strip_prefix("audio_in=")).and_then(|v| v.parse().ok());
        assert!(audio_in.is_some_and(|n: u64| n >= 100), "{}: Opus from {other}: {fin}", me.tag());
    }
}

#[test]
fn peer_rejoins_and_survives_a_server_restart() {
    let mut server = ServerProc::start(&[]);
    let addr = server.addr;
    let url = server.ws_url();
    let dir = temp_dir("restart");
    let (da, db) = (dir.path().join("a"), dir.path().join("b"));
    let mut a = Proc::peer(&url, "re", "anna", &["--send", "testsrc", "--record", da.to_str().unwrap()]);
    a.id();

    // First visit: B connects, sends video, leaves by itself.
    let mut b1 = Proc::peer(&url, "re", "ben", &["--send", "testsrc", "--duration", "3s"]);
    let b1_id = b1.id();
    a.wait_for("recording from b1", |l| l.starts_with(&format!("peer {b1_id} recording")));
    assert_eq!(b1.wait_exit(), 0, "{}", b1.output());
    a.wait_for("b1 left", |l| l == format!("peer {b1_id} left"));

    // B comes back as a new peer: a new session and a new recording.
    let mut b2 = Proc::peer(&url, "re", "ben", &["--send", "testsrc", "--record", db.to_str().unwrap()]);
    let b2_id = b2.id();
    assert_ne!(b1_id, b2_id);
    wait_frames_from(&a, &b2_id, 30);
    let a_id = nth_recording(&b2, 1);
    wait_frames_from(&b2, &a_id, 30);

    // The server dies and comes back on the same port: both peers reconnect by themselves and media flows again.
    server.kill();
    a.wait_for("lost signaling", |l| l.starts_with("signaling: connection lost"));
    b2.wait_for("lost signaling", |l| l.starts_with("signaling: connection lost"));
    let _server2 = ServerProc::start_on(&addr.to_string(), &[]);
    a.wait_n(2, "rejoin", |l| l.starts_with("joined room re as "));
    b2.wait_n(2, "rejoin", |l| l.starts_with("joined room re as "));
    // Fresh server, fresh ids: new sessions, new recordings, frames flowing on them.
    let b3_id = nth_recording(&a, 3);
    let a3_id = nth_recording(&b2, 2);
    assert!(b3_id != b2_id && a3_id != a_id, "new ids after the restart");
    wait_frames_from(&a, &b3_id, 30);
    wait_frames_from(&b2, &a3_id, 30);
    a.terminate();
    b2.terminate();
    assert_eq!(a.wait_exit(), 0, "{}", a.output());
    assert_eq!(b2.wait_exit(), 0, "{}", b2.output());

    let files = ivf_files(&da);
    assert_eq!(files.len(), 3, "a recorded b1, b2, and b2 after the restart: {files:?}");
    for f in &files {
        assert!(check_ivf(f, 320, 180, &low_clip()) >= 10, "{}", f.display());
    }
    let files = ivf_files(&db);
    assert_eq!(files.len(), 2, "b2 recorded a before and after the restart: {files:?}");
    for f in &files {
        assert!(check_ivf(f, 320, 180, &low_clip()) >= 10, "{}", f.display());
    }
}

#[test]
fn exit_codes_say_what_went_wrong() {
    // Nothing listens there (a server started and stopped): 3.
    let addr = {
        let mut s = ServerProc::start(&[]);
        let a = s.addr;
        s.kill();
        a
    };
    let mut p = Proc::peer(&format!("ws://{addr}/ws"), "x", "p", &["--duration", "1s"]);
    assert_eq!(p.wait_exit(), 3, "{}", p.output());

    // Joined, but nobody came: 4.
    let server = ServerProc::start(&[]);
    let mut p = Proc::peer(&server.ws_url(), "lonely", "p", &["--duration", "1s"]);
    assert_eq!(p.wait_exit(), 4, "{}", p.output());

    // Refused join (bad room name): 3.
    let mut p = Proc::peer(&server.ws_url(), "bad room", "p", &["--duration", "5s"]);
    assert_eq!(p.wait_exit(), 3, "{}", p.output());

    // Bad command line: 2; unreadable --send file: 1.
    let st = Command::new(env!("CARGO_BIN_EXE_webcall")).args(["peer", "--room", "r"]).output().unwrap();
    assert_eq!(st.status.code(), Some(2));
    let mut p = Proc::peer(&server.ws_url(), "r", "p", &["--send", "/nonexistent.ivf", "--duration", "1s"]);
    assert_eq!(p.wait_exit(), 1, "{}", p.output());

    // The test pattern only comes in its three pre-encoded sizes; --fps is for live encoding: 2, saying why.
    let peer = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_webcall"))
            .args(["peer", "--server", &server.ws_url(), "--room", "r", "--duration", "1s"])
            .args(args)
            .output()
            .unwrap();
        (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let (code, err) = peer(&["--send", "testsrc", "--size", "320x240"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("320x180, 640x360 and 1280x720"), "{err}");
    let (code, err) = peer(&["--send", "testsrc", "--fps", "15"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("--fps applies to --send live"), "{err}");
    if !cfg!(feature = "libvpx") {
        // Live encoding needs libvpx, which the default build leaves out: 1, saying how to get it.
        let (code, err) = peer(&["--send", "live"]);
        assert_eq!(code, Some(1), "{err}");
        assert!(err.contains("rebuild with --features libvpx or use --send testsrc/FILE.ivf"), "{err}");
    }
}

#[test]
fn file_source_loops_and_echo_sends_it_back() {
    use webcall_peer::media::IvfWriter;
    let dir = temp_dir("echo");
    // A one-second clip (the first 30 frames of the embedded one: a keyframe, then delta frames); the sender loops it.
    let clip = dir.path().join("clip.ivf");
    let frames: Vec<Vec<u8>> = low_clip().into_iter().take(30).collect();
    let mut wr = IvfWriter::create(clip.clone(), 320, 180).unwrap();
    for (n, f) in frames.iter().enumerate() {
        wr.write(n as u64 * 3000, f).unwrap();
    }
    wr.finish().unwrap();

    let server = ServerProc::start(&[]);
    let url = server.ws_url();
    let rec = dir.path().join("rec");
    let mut sender = Proc::peer(
        &url,
        "echo",
        "filer",
        &["--send", clip.to_str().unwrap(), "--record", rec.to_str().unwrap(), "--duration", "6s"],
    );
    sender.id();
    let mut echo = Proc::peer(&url, "echo", "echoer", &["--echo", "--duration", "5s"]);
    let echo_id = echo.id();
    // More frames come back than the clip holds: the file loops, and the echo returns it.
    wait_frames_from(&sender, &echo_id, 45);
    assert_eq!(echo.wait_exit(), 0, "{}", echo.output());
    assert_eq!(sender.wait_exit(), 0, "{}", sender.output());
    let files = ivf_files(&rec);
    assert_eq!(files.len(), 1, "{files:?}");
    assert!(check_ivf(&files[0], 320, 180, &frames) >= 45);
}

/// The server's Prometheus metrics.
fn metrics(server: &ServerProc) -> String {
    use std::io::Read;
    let mut s = std::net::TcpStream::connect(server.addr).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
    let mut r = String::new();
    s.read_to_string(&mut r).unwrap();
    r
}

/// The `selected pair` line's `local=KIND remote=KIND` (the last one printed for `id`).
fn pair_kinds(p: &Proc, id: &str) -> (String, String) {
    let prefix = format!("peer {id} selected pair ");
    let l = p.wait_for("selected pair", |l| l.starts_with(&prefix));
    let field = |k: &str| {
        l.split_whitespace().find_map(|f| f.strip_prefix(k)).unwrap_or_else(|| panic!("{k} in {l}")).to_owned()
    };
    (field("local="), field("remote="))
}

/// Both peers `--relay`: each allocates on the built-in TURN (with the welcome's REST credentials), signals only its
/// relayed candidate, and the call runs relay to relay; the recordings decode.
#[test]
fn relay_only_call_through_the_builtin_turn() {
    let server = ServerProc::start(&["--turn-listen", "127.0.0.1:0", "--turn-allow-peer", "127.0.0.0/8"]);
    let url = server.ws_url();
    let dir = temp_dir("relay");
    let (da, db) = (dir.path().join("a"), dir.path().join("b"));
    let common = ["--relay", "--send", "testsrc", "--duration", "8s"];
    let mut a = Proc::peer(&url, "relay", "ada", &[&common[..], &["--record", da.to_str().unwrap()]].concat());
    let a_id = a.id();
    let mut b = Proc::peer(&url, "relay", "bert", &[&common[..], &["--record", db.to_str().unwrap()]].concat());
    let b_id = b.id();

    for (p, other) in [(&a, &b_id), (&b, &a_id)] {
        let cand =
            p.wait_for("relay candidate", |l| l.starts_with(&format!("peer {other} local candidate relay 127.0.0.1:")));
        p.wait_for("end of gathering", |l| l.starts_with(&format!("peer {other} gathering complete")));
        p.wait_for("connected", |l| l == format!("peer {other} connected"));
        assert_eq!(pair_kinds(p, other), ("relay".into(), "relay".into()), "{}:\n{}", p.tag(), p.output());
        // The relayed address is the TURN server's, not the peer's socket: the selected pair starts from it.
        let relayed = cand.split_whitespace().nth(5).unwrap();
        p.wait_for("pair from the relayed address", |l| {
            l.starts_with(&format!("peer {other} selected pair relay {relayed} -> relay "))
        });
        let out = p.output();
        assert!(!out.contains("local candidate host") && !out.contains("local candidate srflx"), "relay only:\n{out}");
    }
    let held =
        metrics(&server).lines().find_map(|l| l.strip_prefix("webcall_turn_allocations ")?.trim().parse::<u32>().ok());
    assert_eq!(held, Some(2), "one allocation per relay-only peer during the call");
    assert_eq!(a.wait_exit(), 0, "{}", a.output());
    assert_eq!(b.wait_exit(), 0, "{}", b.output());
    // Leaving peers give their allocations back (Refresh with lifetime 0) instead of letting them expire.
    let t0 = Instant::now();
    loop {
        let m = metrics(&server);
        let n = m.lines().find_map(|l| l.strip_prefix("webcall_turn_allocations ")).map(|v| v.trim().to_owned());
        if n.as_deref() == Some("0") {
            break;
        }
        assert!(t0.elapsed() < WAIT, "allocations still held after both peers left: {n:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
    for (me, dir) in [(&a, &da), (&b, &db)] {
        let files = ivf_files(dir);
        assert_eq!(files.len(), 1, "{}: {files:?}", me.tag());
        let n = check_ivf(&files[0], 320, 180, &low_clip());
        assert!(n >= 60, "{}: only {n} frames through the relay", me.tag());
    }
}

/// One side `--relay`, the other gathering everything: the relay-only side sends from its relayed address, the other
/// side sees a relay candidate at the far end of its pair.
#[test]
fn relay_only_peer_calls_a_peer_with_host_candidates() {
    let server = ServerProc::start(&["--turn-listen", "127.0.0.1:0", "--turn-allow-peer", "127.0.0.0/8"]);
    let url = server.ws_url();
    let mut r = Proc::peer(&url, "mixed", "relayed", &["--relay", "--send", "testsrc", "--duration", "6s"]);
    let r_id = r.id();
    let mut h = Proc::peer(&url, "mixed", "hosted", &["--send", "testsrc", "--duration", "6s"]);
    let h_id = h.id();
    r.wait_for("connected", |l| l == format!("peer {h_id} connected"));
    h.wait_for("connected", |l| l == format!("peer {r_id} connected"));
    assert_eq!(pair_kinds(&r, &h_id).0, "relay", "{}", r.output());
    assert_eq!(pair_kinds(&h, &r_id).1, "relay", "{}", h.output());
    wait_frames_from(&r, &h_id, 30);
    wait_frames_from(&h, &r_id, 30);
    assert_eq!(r.wait_exit(), 0, "{}", r.output());
    assert_eq!(h.wait_exit(), 0, "{}", h.output());
}

/// `--relay` against a server that offers no TURN: exit 1 and say why.
#[test]
fn relay_without_turn_fails_clearly() {
    let server = ServerProc::start(&["--no-turn"]);
    let out = Command::new(env!("CARGO_BIN_EXE_webcall"))
        .args(["peer", "--server", &server.ws_url(), "--room", "noturn", "--relay", "--duration", "5s"])
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("--relay needs a TURN server"), "{err}");
}
