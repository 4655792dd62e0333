//! `webcall bench` runs against a real server and relays messages. A smoke test only: figures are for
//! bench/signaling.sh and BENCHMARKS.md, never asserted here.

use webcall_testkit as common;

use common::ServerProc;
use std::process::Command;

fn bench(args: &[&str]) -> serde_json::Value {
    let out = Command::new(env!("CARGO_BIN_EXE_webcall")).arg("bench").args(args).output().expect("webcall runs");
    assert!(out.status.success(), "webcall bench failed: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("one JSON object on stdout")
}

#[test]
fn relay_and_connections_against_a_real_server() {
    let server = ServerProc::start(&["--rate-limit", "100000"]);
    let url = server.ws_url();
    let pid = server.pid().to_string();
    let r = bench(&[
        "relay",
        "--url",
        &url,
        "--server-pid",
        &pid,
        "--clients",
        "4",
        "--warmup",
        "0.2",
        "--duration",
        "1",
        "--json",
    ]);
    assert_eq!(r["target"], "webcall");
    assert!(r["msgs"].as_u64().unwrap() > 0, "{r}");
    assert!(r["server_cpu_s"].is_number(), "{r}");

    let c =
        bench(&["connections", "--url", &url, "--server-pid", &pid, "--counts", "10,20", "--settle", "0.1", "--json"]);
    assert_eq!(c["opened"], 20, "{c}");
    assert_eq!(c["checkpoints"].as_array().unwrap().len(), 2, "{c}");
    assert_eq!(c["dropped"], 0, "{c}");
}

#[test]
fn refuses_non_loopback_urls() {
    let out = Command::new(env!("CARGO_BIN_EXE_webcall"))
        .args(["bench", "relay", "--url", "ws://192.0.2.1:8080/ws", "--duration", "1"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("loopback"));
}
