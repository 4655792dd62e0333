//! Real `redis-server` (and `redis-sentinel`) processes on loopback ports, for the cluster tests.

use crate::WAIT;
use std::io::{Read, Write};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Redis {
    child: Child,
    pub port: u16,
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A port outside the ephemeral range, so that while a server on it is down no other test's `bind(0)` takes it.
pub fn port_outside_ephemeral(salt: u16) -> u16 {
    let base = 20_000 + ((std::process::id() as u16).wrapping_mul(7).wrapping_add(salt.wrapping_mul(131)) % 5_000);
    (base..base + 500).find(|p| std::net::TcpListener::bind(("127.0.0.1", *p)).is_ok()).expect("a free port")
}

fn wait_port(port: u16) {
    let deadline = Instant::now() + WAIT;
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "nothing listens on port {port}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl Redis {
    pub fn start() -> Redis {
        Self::start_on(free_port())
    }

    pub fn start_on(port: u16) -> Redis {
        Self::start_with(port, &[])
    }

    pub fn start_with(port: u16, extra: &[&str]) -> Redis {
        let mut args = vec!["--port".to_owned(), port.to_string()];
        for a in ["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"] {
            args.push(a.to_owned());
        }
        // A replica's full sync writes an RDB file even with --save "": keep it out of the source tree.
        args.extend(["--dir".to_owned(), std::env::temp_dir().display().to_string()]);
        args.extend(extra.iter().map(|s| s.to_string()));
        let child = Command::new("redis-server")
            .args(&args)
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server runs (scripts/test.sh installs it)");
        wait_port(port);
        Redis { child, port }
    }

    pub fn start_outside_ephemeral() -> Redis {
        Self::start_on(port_outside_ephemeral(0))
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill").args([&format!("-{sig}"), &self.pid().to_string()]).status().unwrap().success();
        assert!(ok, "kill -{sig} redis failed");
    }

    pub fn stop(&mut self) {
        let _ = self.signal_quiet("CONT");
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn signal_quiet(&self, sig: &str) -> bool {
        Command::new("kill")
            .args([&format!("-{sig}"), &self.pid().to_string()])
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    /// `INFO <section>` as text.
    pub fn command_info(&self, section: &str) -> String {
        command_reply(self.port, &format!("INFO {section}"))
    }

    /// One command in Redis' inline form; the reply's first line.
    pub fn command(&self, cmd: &str) -> String {
        command(self.port, cmd)
    }
}

/// One inline command to a Redis (or Sentinel) on `port`; the reply's first line.
pub fn command(port: u16, cmd: &str) -> String {
    command_reply(port, cmd).lines().next().unwrap_or("").to_owned()
}

/// One inline command; the raw reply as far as one read gets it ("" if nothing answers).
pub fn command_reply(port: u16, cmd: &str) -> String {
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else { return String::new() };
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    if s.write_all(format!("{cmd}\r\n").as_bytes()).is_err() {
        return String::new();
    }
    let mut buf = [0u8; 16384];
    let n = s.read(&mut buf).unwrap_or(0);
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

/// Waits until `f` holds (polling), or panics after `within`.
pub fn wait_until(what: &str, within: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !f() {
        assert!(Instant::now() < deadline, "{what}: not within {within:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A `redis-sentinel` watching `master` on `master_port` under the name `mymaster`, with short timeouts.
pub struct Sentinel {
    child: Child,
    pub port: u16,
    _dir: crate::TempDir,
}

impl Sentinel {
    pub fn start(master_port: u16, quorum: u32) -> Sentinel {
        let port = free_port();
        let dir = crate::temp_dir(&format!("sentinel{port}"));
        let conf = dir.path().join("sentinel.conf");
        let text = format!(
            "port {port}\nbind 127.0.0.1\ndir {}\nsentinel monitor mymaster 127.0.0.1 {master_port} {quorum}\n\
             sentinel down-after-milliseconds mymaster 1000\nsentinel failover-timeout mymaster 3000\n\
             sentinel parallel-syncs mymaster 1\n",
            dir.path().display()
        );
        std::fs::write(&conf, text).unwrap();
        let child = Command::new("redis-sentinel")
            .arg(&conf)
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-sentinel runs (scripts/test.sh installs it)");
        wait_port(port);
        Sentinel { child, port, _dir: dir }
    }
}

impl Drop for Sentinel {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
