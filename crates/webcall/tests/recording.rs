//! Recording SFU rooms (`--record-dir`): a real `webcall serve`, a real `webcall peer` publishing its 30 fps test
//! clip and Opus tone, real WebSocket clients starting and stopping it, the HTTP API; the files are checked with
//! Debian's ffprobe and ffmpeg (a decoder not written here).

use webcall_testkit as common;

use common::{temp_dir, Client, Proc, ServerProc};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};
use webcall_protocol::{ClientMessage, Join, RecordAction};
use webcall_protocol::{ErrorCode, ProtocolError, ServerMessage as M};

/// How long to wait for something that should happen (not a performance bound).
const WAIT: Duration = Duration::from_secs(60);
const SECRET: &str = "recording-test-secret-0123";

/// `webcall peer --sfu --send testsrc` in `room`: the 30 fps VP8 clip and an Opus tone.
fn camera(url: &str, room: &str) -> Proc {
    Proc::peer(url, room, "cam", &["--sfu", "--send", "testsrc", "--expect", "0", "--duration", "60s"]).waiting(WAIT)
}

/// `{"type":"record","action":…}`, written by the protocol's encoder.
async fn record(c: &mut Client, action: RecordAction) {
    c.send_msg(&ClientMessage::Record(action)).await;
}

/// Every file under `dir`, recursively.
fn files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(files(&p));
        } else {
            out.push(p);
        }
    }
    out.sort();
    out
}

/// ffprobe's view of the file's only stream: (codec, duration s, frames counted by decoding, width).
fn probe(f: &Path) -> (String, f64, u64, u64) {
    let out = Command::new("ffprobe")
        .args(["-v", "error", "-count_frames", "-show_entries", "stream=codec_name,nb_read_frames,width"])
        .args(["-show_entries", "format=duration", "-of", "json"])
        .arg(f)
        .output()
        .expect("ffprobe runs (apt-get install ffmpeg)");
    assert!(out.status.success(), "ffprobe {}: {}", f.display(), String::from_utf8_lossy(&out.stderr));
    assert!(out.stderr.is_empty(), "ffprobe complains about {}: {}", f.display(), String::from_utf8_lossy(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let s = &v["streams"][0];
    let duration: f64 = v["format"]["duration"].as_str().expect("a duration").parse().unwrap();
    let frames: u64 = s["nb_read_frames"].as_str().unwrap().parse().unwrap();
    (s["codec_name"].as_str().unwrap().to_owned(), duration, frames, s["width"].as_u64().unwrap_or(0))
}

/// `ffmpeg -v error -i FILE -f null -` decodes everything and prints nothing.
fn decodes_cleanly(f: &Path) {
    let out = Command::new("ffmpeg").args(["-v", "error", "-i"]).arg(f).args(["-f", "null", "-"]).output().unwrap();
    assert!(out.status.success() && out.stderr.is_empty(), "{}: {}", f.display(), String::from_utf8_lossy(&out.stderr));
}

async fn join_sfu(url: &str, room: &str, name: &str, token: Option<&str>) -> Client {
    Client::join_with(url, Join { sfu: true, token: token.map(Into::into), ..Join::new(room, name) }).await.0
}

/// The next message of `ty`, skipping others (hello, topology).
async fn next_of(c: &mut Client, ty: &str) -> M {
    loop {
        let m = c.recv().await;
        if m.message_type() == ty {
            return m;
        }
    }
}

/// `{"type":"recording",…}`.
fn recording(active: bool, by: Option<&str>) -> M {
    M::Recording { active, by: by.map(str::to_owned) }
}

/// A raw HTTP/1.1 request; (status, body).
async fn http(addr: std::net::SocketAddr, method: &str, path: &str, bearer: Option<&str>) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let auth = bearer.map(|b| format!("Authorization: Bearer {b}\r\n")).unwrap_or_default();
    let req = format!("{method} {path} HTTP/1.1\r\nHost: x\r\n{auth}Content-Length: 0\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    let status = out.split_whitespace().nth(1).unwrap().parse().unwrap();
    let body = out.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
    (status, body)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_native_publisher_is_recorded_frame_for_frame_and_a_rejoin_gets_new_files() {
    let dir = temp_dir("recording-peer");
    let server = ServerProc::start(&["--topology", "sfu", "--record-dir", dir.path().to_str().unwrap()]);
    let url = server.ws_url();
    let peer = camera(&url, "rec-room");
    let peer_id = peer.id();
    peer.wait_for("the sfu session", |l| l == "sfu connected");
    let mut ctl = join_sfu(&url, "rec-room", "Director", None).await;
    let t0 = Instant::now();
    record(&mut ctl, RecordAction::Start).await;
    assert_eq!(next_of(&mut ctl, "recording").await, recording(true, Some(&ctl.id)));
    // The publisher is told too.
    peer.wait_for("the recording notice", |l| l.starts_with("room recording on by "));
    tokio::time::sleep(Duration::from_secs(6)).await;
    let (_, m) = http(server.addr, "GET", "/metrics", None).await;
    assert!(m.contains("\nwebcall_sfu_recording_rooms 1\n"), "{m}");
    assert!(m.contains("\nwebcall_sfu_recording_files 2\n"), "audio and video: {m}");
    record(&mut ctl, RecordAction::Stop).await;
    let wall = t0.elapsed().as_secs_f64();
    assert_eq!(next_of(&mut ctl, "recording").await, recording(false, Some(&ctl.id)));
    peer.wait_for("the end of the recording", |l| l.starts_with("room recording off"));
    // The files are closed on the writer thread: wait until both are there with their duration.
    let t = Instant::now();
    let got = loop {
        let f = files(dir.path());
        if f.len() == 2 && f.iter().all(|p| Command::new("ffprobe").arg(p).output().is_ok_and(|o| o.status.success())) {
            tokio::time::sleep(Duration::from_millis(500)).await;
            break files(dir.path());
        }
        assert!(t.elapsed() < WAIT, "files: {f:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    for f in &got {
        let name = f.file_name().unwrap().to_str().unwrap();
        assert_eq!(f.parent().unwrap().file_name().unwrap(), "rec-room", "one directory per room");
        assert!(name.contains(&format!("-{peer_id}-")), "the participant is in the name: {name}");
        assert!(name.ends_with(".webm"), "{name}");
        decodes_cleanly(f);
    }
    let video = got.iter().find(|f| f.to_str().unwrap().contains("-video-")).expect("a video file");
    let audio = got.iter().find(|f| f.to_str().unwrap().contains("-audio-")).expect("an audio file");
    let (codec, duration, frames, width) = probe(video);
    eprintln!("video: {codec} {duration:.2} s {frames} frames {width} px wide; recorded for {wall:.2} s");
    assert_eq!((codec.as_str(), width), ("vp8", 320));
    // The clip is 30 fps: frames match the file's duration, and the duration the time it was recorded (less the
    // wait for the first keyframe).
    let fps = frames as f64 / duration;
    assert!((27.0..=33.0).contains(&fps), "{frames} frames in {duration} s");
    assert!(duration > wall - 2.0 && duration < wall + 0.5, "{duration} s of {wall} s");
    let (codec, a_duration, packets, _) = probe(audio);
    assert_eq!(codec, "opus");
    assert!(a_duration > wall - 2.0 && a_duration < wall + 0.5, "audio {a_duration} s of {wall} s");
    assert!(packets as f64 > a_duration * 40.0, "20 ms Opus packets: {packets} in {a_duration} s");

    // Again, with the publisher leaving and coming back: its second session gets files of its own.
    record(&mut ctl, RecordAction::Start).await;
    next_of(&mut ctl, "recording").await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    drop(peer);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let peer = camera(&url, "rec-room");
    peer.wait_for("the recording notice on joining", |l| l == "room recording on");
    peer.wait_for("the sfu session", |l| l == "sfu connected");
    tokio::time::sleep(Duration::from_secs(3)).await;
    // The server stops mid-recording: its files are finished, not cut off.
    server.signal("TERM");
    let mut server = server;
    assert_eq!(server.wait_exit(), Some(0));
    let all = files(dir.path());
    assert_eq!(all.len(), 6, "two recordings of the first session, one of the second: {all:?}");
    for f in all.iter().filter(|f| !got.contains(f)) {
        decodes_cleanly(f);
        let (_, duration, frames, _) = probe(f);
        assert!(duration > 1.0 && frames > 20, "{}: {duration} s, {frames} frames", f.display());
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_http_api_needs_the_secret_and_refuses_clearly() {
    let dir = temp_dir("recording-api");
    let server = ServerProc::start(&[
        "--topology",
        "sfu",
        "--record-dir",
        dir.path().to_str().unwrap(),
        "--auth-secret",
        SECRET,
    ]);
    let token = |record: bool| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_webcall"));
        c.args(["token", "--auth-secret", SECRET, "--room", "api-room"]);
        if record {
            c.arg("--record");
        }
        String::from_utf8(c.output().unwrap().stdout).unwrap().trim().to_owned()
    };
    let url = server.ws_url();
    let path = "/api/rooms/api-room/recording";
    assert_eq!(http(server.addr, "POST", path, Some(SECRET)).await.0, 404, "nobody in the room yet");
    let mut member = join_sfu(&url, "api-room", "M", Some(&token(false))).await;
    let (status, body) = http(server.addr, "POST", path, None).await;
    assert_eq!(status, 401, "{body}");
    assert_eq!(http(server.addr, "POST", path, Some("not-the-secret")).await.0, 401);
    let (status, body) = http(server.addr, "POST", path, Some(SECRET)).await;
    // Raw JSON: the HTTP API's reply, not a signaling message (crates/protocol types only the WebSocket's).
    assert_eq!(
        (status, serde_json::from_str::<Value>(&body).unwrap()),
        (201, json!({"room":"api-room","recording":true}))
    );
    assert_eq!(next_of(&mut member, "recording").await, recording(true, Some("api")));
    assert_eq!(http(server.addr, "POST", path, Some(SECRET)).await.0, 200, "already recording");
    // A member whose token lacks `record` may not stop it; one whose token has it may.
    record(&mut member, RecordAction::Stop).await;
    member.expect_error(ErrorCode::Unauthorized).await;
    let mut director = join_sfu(&url, "api-room", "D", Some(&token(true))).await;
    assert_eq!(next_of(&mut director, "recording").await, recording(true, None), "joiners see it");
    record(&mut director, RecordAction::Stop).await;
    assert_eq!(next_of(&mut member, "recording").await, recording(false, Some(&director.id)));
    assert_eq!(http(server.addr, "DELETE", path, Some(SECRET)).await.0, 404, "not recording");
    assert_eq!(http(server.addr, "POST", path, Some(SECRET)).await.0, 201);
    assert_eq!(http(server.addr, "DELETE", path, Some(SECRET)).await.0, 204);
    assert_eq!(http(server.addr, "POST", "/api/rooms/bad%2Fname/recording", Some(SECRET)).await.0, 400);

    // A WHIP publisher (what OBS does) is a participant of the room: it is recorded like the others.
    let obs_token = token(false);
    let obs = Proc::peer(
        &url,
        "api-room",
        "obs",
        &["--whip", "--send", "testsrc", "--token", &obs_token, "--duration", "60s"],
    )
    .waiting(WAIT);
    obs.wait_for("the WHIP resource", |l| l.starts_with("joined room api-room via whip http://"));
    assert_eq!(http(server.addr, "POST", path, Some(SECRET)).await.0, 201);
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(http(server.addr, "DELETE", path, Some(SECRET)).await.0, 204);
    let t = Instant::now();
    let video = loop {
        let done = files(dir.path()).into_iter().find(|f| {
            f.to_str().unwrap().contains("-video-")
                && Command::new("ffprobe")
                    .args(["-v", "error", "-show_entries", "format=duration", "-of", "csv=p=0"])
                    .arg(f)
                    .output()
                    .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim().parse::<f64>().is_ok_and(|d| d > 0.0))
        });
        if let Some(v) = done {
            break v;
        }
        assert!(t.elapsed() < WAIT, "no finished video of the WHIP publisher: {:?}", files(dir.path()));
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    decodes_cleanly(&video);
    let (codec, duration, frames, _) = probe(&video);
    assert_eq!(codec, "vp8");
    assert!(duration > 2.5 && frames > 60, "{duration} s, {frames} frames");
    drop(obs);

    // Without --record-dir: refused, saying what to do.
    let off = ServerProc::start(&["--topology", "sfu", "--auth-secret", SECRET]);
    let mut c = join_sfu(&off.ws_url(), "api-room", "M", Some(&token(true))).await;
    let (status, body) = http(off.addr, "POST", path, Some(SECRET)).await;
    assert_eq!(status, 409, "{body}");
    assert!(body.contains("--record-dir"), "{body}");
    record(&mut c, RecordAction::Start).await;
    let e: ProtocolError = next_of(&mut c, "error").await.into_refusal().unwrap().unwrap();
    assert_eq!(e.code, ErrorCode::Unavailable, "{e}");
    assert!(e.message.contains("--record-dir"), "{e}");
    // Without --auth-secret there is no credential for the API.
    let open = ServerProc::start(&["--topology", "sfu", "--record-dir", dir.path().to_str().unwrap()]);
    let (status, body) = http(open.addr, "POST", path, Some(SECRET)).await;
    assert_eq!(status, 403, "{body}");
    // A peer-to-peer room: its media never reaches the server.
    let mesh = ServerProc::start(&["--topology", "mesh", "--record-dir", dir.path().to_str().unwrap()]);
    let (mut p, _) = Client::join(&mesh.ws_url(), "p2p", "P").await;
    record(&mut p, RecordAction::Start).await;
    let e = p.expect_error(ErrorCode::NeedsSfu).await;
    assert!(e.message.contains("peer-to-peer"), "{e}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_killed_server_leaves_files_that_play_up_to_their_last_cluster() {
    let dir = temp_dir("recording-kill");
    let mut server = ServerProc::start(&["--topology", "sfu", "--record-dir", dir.path().to_str().unwrap()]);
    let url = server.ws_url();
    let peer = camera(&url, "kill-room");
    peer.wait_for("the sfu session", |l| l == "sfu connected");
    let mut ctl = join_sfu(&url, "kill-room", "Director", None).await;
    record(&mut ctl, RecordAction::Start).await;
    next_of(&mut ctl, "recording").await;
    tokio::time::sleep(Duration::from_secs(7)).await;
    server.kill(); // SIGKILL: nothing is finished
    let video = files(dir.path()).into_iter().find(|f| f.to_str().unwrap().contains("-video-")).expect("a video file");
    decodes_cleanly(&video);
    let out = Command::new("ffprobe")
        .args(["-v", "error", "-count_frames", "-show_entries", "stream=nb_read_frames", "-of", "csv=p=0"])
        .arg(&video)
        .output()
        .unwrap();
    assert!(out.stderr.is_empty(), "{}", String::from_utf8_lossy(&out.stderr));
    let frames: u64 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
    eprintln!("killed after 7 s of recording: {frames} frames playable");
    // 7 s at 30 fps, less the last cluster (at most 2 s) that was still in memory.
    assert!((120..=215).contains(&frames), "{frames} frames");
}
