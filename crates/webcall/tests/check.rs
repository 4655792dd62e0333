//! `webcall check` reports what `serve` would run into, and exits 1 when anything would fail.

use std::process::Command;

fn check(args: &[&str]) -> (Option<i32>, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_webcall")).arg("check").args(args).output().unwrap();
    (out.status.code(), String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr))
}

#[test]
fn a_good_setup_passes() {
    let (code, out) = check(&["--listen", "127.0.0.1:0", "--turn-listen", "127.0.0.1:0", "--turn-secret", "s"]);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("no problems found"), "{out}");
}

#[test]
fn taken_ports_are_named() {
    let http = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = http.local_addr().unwrap().to_string();
    let turn = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let turn_addr = turn.local_addr().unwrap().to_string();
    let (code, out) = check(&["--listen", &addr, "--turn-listen", &turn_addr]);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains(&format!("FAIL  cannot listen on {addr}")), "{out}");
    assert!(out.contains(&format!("FAIL  cannot bind STUN/TURN on {turn_addr}")), "{out}");
    assert!(out.contains("2 problem(s) found"), "{out}");
}

#[test]
fn turn_on_the_wildcard_address_needs_an_external_ip() {
    let (code, out) = check(&["--listen", "127.0.0.1:0", "--turn-listen", "0.0.0.0:0"]);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("--turn-external-ip"), "{out}");
    let (code, out) =
        check(&["--listen", "127.0.0.1:0", "--turn-listen", "0.0.0.0:0", "--turn-external-ip", "203.0.113.9"]);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("advertise --turn-external-ip 203.0.113.9"), "{out}");
}

#[test]
fn unreadable_certificate_and_unreachable_redis_fail() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port(); // then closed
    let (code, out) = check(&[
        "--listen",
        "127.0.0.1:0",
        "--turn-listen",
        "127.0.0.1:0",
        "--tls-cert",
        "/nonexistent/cert.pem",
        "--tls-key",
        "/nonexistent/key.pem",
        "--redis",
        &format!("redis://127.0.0.1:{port}"),
    ]);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("FAIL  TLS:") && out.contains("/nonexistent/cert.pem"), "{out}");
    assert!(out.contains("FAIL  Redis at 127.0.0.1"), "{out}");
}

#[test]
fn invalid_settings_fail_first() {
    let (code, out) = check(&["--max-peers", "0"]);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("FAIL  settings:") && out.contains("max-peers"), "{out}");
}
