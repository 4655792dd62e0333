//! `webcall serve` settings: flag over environment over TOML file over default, and clear refusals.

use webcall_testkit as common;

use common::{Client, ServerProc};
use std::process::Command;
use webcall_protocol::Join;

fn webcall() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_webcall"));
    // The SFU's default media port would collide between tests run at once.
    c.env("WEBCALL_MEDIA_LISTEN", "127.0.0.1:0");
    c
}

/// Capacity as the server applies it: how many joins one room takes.
async fn capacity(server: &ServerProc) -> usize {
    let url = server.ws_url();
    let mut clients = Vec::new();
    for n in 0..10 {
        let mut c = Client::connect(&url).await;
        c.send_join(Join::new("cap", "")).await;
        let m = c.recv().await;
        if let Some(e) = m.clone().into_refusal() {
            assert_eq!(e.map(|e| e.code), Ok(webcall_protocol::ErrorCode::RoomFull), "{m:?}");
            return n;
        }
        clients.push(c);
    }
    panic!("no capacity limit seen");
}

#[tokio::test]
async fn flag_beats_env_beats_file() {
    let dir = common::temp_dir("config");
    let file = dir.path().join("webcall.toml");
    std::fs::write(&file, "max-peers = 3\nresume-grace = \"5s\"\n").unwrap();
    let file = file.to_str().unwrap();

    let s = ServerProc::start(&["--config", file]);
    assert_eq!(capacity(&s).await, 3, "from the file");

    let env = [("WEBCALL_MAX_PEERS", "5")];
    let s = ServerProc::start_env("127.0.0.1:0", &["--config", file], &env);
    assert_eq!(capacity(&s).await, 5, "env over file");
    let s = ServerProc::start_env("127.0.0.1:0", &["--config", file, "--max-peers", "2"], &env);
    assert_eq!(capacity(&s).await, 2, "flag over env");
    let s = ServerProc::start(&[]);
    assert_eq!(capacity(&s).await, 4, "default");
}

#[test]
fn bad_settings_are_refused_with_a_clear_message() {
    let out = webcall().args(["serve", "--max-peers", "1"]).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("max-peers") && err.contains("2 to 64"), "{err}");

    let out = webcall().args(["serve", "--resume-grace", "soon"]).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--resume-grace") && err.contains("20s"), "{err}");

    let dir = common::temp_dir("badconfig");
    let file = dir.path().join("bad.toml");
    std::fs::write(&file, "max-peer = 3\n").unwrap();
    let out = webcall().args(["serve", "--config", file.to_str().unwrap()]).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bad.toml") && err.contains("max-peer"), "unknown keys are named: {err}");

    let out = webcall().args(["serve", "--config", "/nonexistent/webcall.toml"]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("cannot read config file"), "{err}");
}

#[test]
fn a_taken_port_says_so() {
    let holder = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = holder.local_addr().unwrap().to_string();
    let out = webcall().args(["serve", "--listen", &addr, "--turn-listen", "127.0.0.1:0"]).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&addr) && err.contains("--listen"), "{err}");
}
