//! `webcall peer --sfu` in SFU rooms: real `webcall serve --topology sfu|auto` and real `webcall peer` processes
//! on loopback; every peer publishes the test source and records each other participant, received through the
//! server's SFU. Checked through stdout, exit codes, the recordings and `/metrics`.

use webcall_testkit as common;

use common::{Proc, ServerProc};
use std::path::{Path, PathBuf};
use std::time::Duration;
use webcall_peer::clip::{Clip, Layer};

/// How long to wait for something that should happen (not a performance bound).
const WAIT: Duration = Duration::from_secs(60);

/// `webcall peer --sfu` with `extra`.
fn sfu_peer(url: &str, room: &str, name: &str, extra: &[&str]) -> Proc {
    Proc::peer(url, room, name, &[&["--sfu"][..], extra].concat()).waiting(WAIT)
}

/// The final stats line of `p` for peer `id` received through the SFU, as `field=value` pairs (in an auto room a
/// peer-to-peer one comes before it).
fn final_stats(p: &Proc, id: &str) -> Vec<(String, String)> {
    let prefix = format!("stats final peer={id} ");
    let l = p.wait_for(&format!("final stats of {id}"), |l| l.starts_with(&prefix) && l.contains("pair=\"sfu\""));
    pairs(&l)
}

/// A stats line's `field=value` pairs.
fn pairs(line: &str) -> Vec<(String, String)> {
    line.split_whitespace().filter_map(|f| f.split_once('=')).map(|(k, v)| (k.into(), v.into())).collect()
}

fn field(stats: &[(String, String)], k: &str) -> u64 {
    stats.iter().find(|(n, _)| n == k).map(|(_, v)| v.parse().unwrap()).unwrap()
}

/// The recording named in a stats line: a VP8 IVF in `dir` that starts with a keyframe, each frame one the
/// publisher's clip has; returns its frame count.
fn check_recording(dir: &Path, stats: &[(String, String)], clip: &[Vec<u8>]) -> usize {
    let path = PathBuf::from(&stats.iter().find(|(k, _)| k == "recording").expect("a recording").1);
    assert_eq!(path.parent(), Some(dir));
    let id = path.display().to_string();
    let b = std::fs::read(&path).unwrap();
    assert_eq!(&b[0..4], b"DKIF");
    assert_eq!(&b[8..12], b"VP80");
    assert_eq!((u16::from_le_bytes([b[12], b[13]]), u16::from_le_bytes([b[14], b[15]])), (320, 180));
    let (mut o, mut n) = (32usize, 0usize);
    while o + 12 <= b.len() {
        let size = u32::from_le_bytes(b[o..o + 4].try_into().unwrap()) as usize;
        let f = &b[o + 12..o + 12 + size];
        if n == 0 {
            assert_eq!(f[0] & 1, 0, "{id}: the recording starts with a keyframe");
        }
        assert!(clip.iter().any(|c| c == f), "{id}: frame {n} is not a frame of the clip");
        o += 12 + size;
        n += 1;
    }
    n
}

fn metric(m: &str, name: &str) -> u64 {
    m.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .unwrap_or_else(|| panic!("no {name} in {m}"))
        .trim()
        .parse()
        .unwrap()
}

fn run_room(topology: &str, n: usize) {
    let server = ServerProc::start(&["--topology", topology]);
    let url = server.ws_url();
    let clip: Vec<Vec<u8>> = Clip::builtin(Layer::Low).frames.iter().map(|f| f.data.to_vec()).collect();
    let dirs: Vec<common::TempDir> = (0..n).map(|i| common::temp_dir(&format!("sfu-peer-{topology}-{i}"))).collect();
    let expect = (n - 1).to_string();
    let mut peers: Vec<Proc> = Vec::new();
    for (i, d) in dirs.iter().enumerate() {
        let dir = d.path().to_str().unwrap();
        let extra = ["--send", "testsrc", "--record", dir, "--expect", expect.as_str(), "--duration", "12s"];
        peers.push(sfu_peer(&url, "sfu-room", &format!("p{i}"), &extra));
        // Joins one after the other (an auto room goes to the SFU at the third).
        peers[i].id();
    }
    let ids: Vec<String> = peers.iter().map(Proc::id).collect();
    for p in &peers {
        p.wait_for("the sfu session", |l| l == "sfu connected");
    }
    let m = server.metrics();
    assert_eq!(metric(&m, "webcall_sfu_sessions"), n as u64, "{m}");
    for p in &mut peers {
        assert_eq!(p.wait_exit(), 0, "{} exit code; output:\n{}", p.tag(), p.output());
    }
    for (i, p) in peers.iter().enumerate() {
        for (j, other) in ids.iter().enumerate().filter(|(j, _)| *j != i) {
            let s = final_stats(p, other);
            assert!(field(&s, "frames_in") > 60, "{} from p{j}: {s:?}", p.tag());
            assert!(field(&s, "audio_in") > 100, "{} from p{j}: {s:?}", p.tag());
            let recorded = check_recording(dirs[i].path(), &s, &clip);
            assert!(recorded > 60, "{}: {recorded} frames of p{j} recorded", p.tag());
        }
        p.wait_for("the sfu stats", |l| l.starts_with("stats final sfu connected=true"));
    }
    let m = server.metrics();
    assert!(metric(&m, "webcall_sfu_forwarded_packets_total") > (n * (n - 1) * 60) as u64, "{m}");
    assert!(metric(&m, "webcall_sfu_forwarded_packet_bytes_total") > 0, "{m}");
}

#[test]
fn three_native_peers_receive_each_other_through_an_sfu_room() {
    run_room("sfu", 3);
}

#[test]
fn an_auto_room_of_native_peers_moves_to_the_sfu_at_the_third() {
    run_room("auto", 3);
}

const SECRET: &str = "whip-peer-secret-0123456789";

/// `webcall peer --whip` publishes over WHIP (with a join token as the Bearer token) into a room where a native
/// `--sfu` peer records it; without a token the server's 401 ends the publisher with exit code 3.
#[test]
fn a_native_whip_publisher_is_received_through_the_sfu() {
    let server = ServerProc::start(&["--auth-secret", SECRET]);
    let url = server.ws_url();
    let clip: Vec<Vec<u8>> = Clip::builtin(Layer::Low).frames.iter().map(|f| f.data.to_vec()).collect();

    let mut refused = sfu_peer(&url, "whip-room", "nobody", &["--whip", "--send", "testsrc"]);
    assert_eq!(refused.wait_exit(), 3, "{}", refused.output());
    assert!(refused.output().contains("whip refused: 401"), "{}", refused.output());

    let cam_token = common::token(SECRET, &["--room", "whip-room", "--name", "cam"]);
    let mut cam = sfu_peer(
        &url,
        "whip-room",
        "cam",
        &["--whip", "--send", "testsrc", "--token", &cam_token, "--duration", "12s"],
    );
    cam.wait_for("the WHIP resource", |l| l.starts_with("joined room whip-room via whip http://"));
    let dir = common::temp_dir("whip-peer-rec");
    let viewer_token = common::token(SECRET, &["--room", "whip-room", "--name", "viewer"]);
    let mut viewer = sfu_peer(
        &url,
        "whip-room",
        "viewer",
        &["--record", dir.path().to_str().unwrap(), "--token", &viewer_token, "--expect", "1", "--duration", "8s"],
    );
    let line = viewer.wait_for("the WHIP publisher", |l| l.starts_with("peer ") && l.ends_with(" via sfu"));
    let cam_id = line.split_whitespace().nth(1).unwrap().to_owned();
    assert_eq!(viewer.wait_exit(), 0, "viewer output:\n{}", viewer.output());
    let s = final_stats(&viewer, &cam_id);
    assert!(field(&s, "frames_in") > 60, "{s:?}");
    assert!(field(&s, "audio_in") > 100, "{s:?}");
    assert_eq!(s.iter().find(|(k, _)| k == "name").map(|(_, v)| v.as_str()), Some("\"cam\""), "{s:?}");
    assert!(check_recording(dir.path(), &s, &clip) > 60);
    assert_eq!(cam.wait_exit(), 0, "publisher output:\n{}", cam.output());
    let last = cam.wait_for("the final stats", |l| l.starts_with("stats final sfu connected=true"));
    assert!(last.contains("frames_out=") && !last.contains("frames_out=0 "), "{last}");
}

/// `--chat` in an SFU room: there are no data channels, so stdin lines go out as signaling `data` and the other
/// peer prints them (and counts them in the SFU report of the sender).
#[test]
fn native_peers_chat_through_an_sfu_room() {
    let server = ServerProc::start(&["--topology", "sfu"]);
    let url = server.ws_url();
    let args = ["--send", "testsrc", "--chat", "--duration", "8s"];
    let mut alice = sfu_peer(&url, "sfu-chat", "alice", &args);
    let alice_id = alice.id();
    let mut bob = sfu_peer(&url, "sfu-chat", "bob", &args);
    let bob_id = bob.id();
    alice.wait_for("bob through the sfu", |l| l == format!("peer {bob_id} via sfu"));
    bob.wait_for("alice through the sfu", |l| l == format!("peer {alice_id} via sfu"));
    alice.say("hello from alice");
    bob.say("hi from bob, with ünïcode\u{1b}[2J");
    bob.wait_for("alice's chat", |l| l == "chat alice: hello from alice");
    alice.wait_for("bob's chat", |l| l == "chat bob: hi from bob, with ünïcode\\u{1b}[2J");
    assert_eq!(alice.wait_exit(), 0, "{}", alice.output());
    assert_eq!(bob.wait_exit(), 0, "{}", bob.output());
    assert_eq!(field(&final_stats(&bob, &alice_id), "chat_in"), 1);
    assert_eq!(field(&final_stats(&alice, &bob_id), "chat_in"), 1);
}

/// `--count-only` (the benchmark's subscriber): it decrypts and decodes nothing, yet counts every forwarded RTP
/// packet of the publisher (video and audio) once its session is up, from a thread that drains its sockets.
#[test]
fn a_count_only_subscriber_counts_what_the_sfu_forwards() {
    let server = ServerProc::start(&["--topology", "sfu"]);
    let url = server.ws_url();
    let mut publisher = sfu_peer(&url, "count-room", "pub", &["--send", "testsrc", "--duration", "14s"]);
    publisher.id();
    let mut counter = sfu_peer(&url, "count-room", "counter", &["--count-only", "--expect", "1", "--duration", "8s"]);
    counter.wait_for("the sfu session", |l| l == "sfu connected");
    assert_eq!(counter.wait_exit(), 0, "counter output:\n{}", counter.output());
    let line = counter.wait_for("the final stats", |l| l.starts_with("stats final sfu connected=true"));
    let s = pairs(&line);
    // ~30 video frames (one or more packets each) and 50 audio packets a second, for most of the 8 s.
    let (packets, bytes) = (field(&s, "rtp_in"), field(&s, "rtp_bytes_in"));
    assert!(packets > 200, "{line}");
    assert!(bytes > packets * 50, "RTP packets carry their payload: {line}");
    // It sent nothing and decoded nothing: its counts are of the forwarded packets alone.
    assert_eq!(field(&s, "rtp_out"), 0, "{line}");
    let m = server.metrics();
    assert!(metric(&m, "webcall_sfu_forwarded_packets_total") >= packets, "counted more than was forwarded: {m}");
    // The publisher sees a member that never sends it media, so it does not exit 0; its own count bounds ours.
    publisher.wait_exit();
    let sent = pairs(&publisher.wait_for("the final stats", |l| l.starts_with("stats final sfu connected=true")));
    assert!(field(&sent, "rtp_out") >= packets, "counted more than was sent: {sent:?} vs {line}");
}
