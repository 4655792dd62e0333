//! Shared by webcall's integration tests (a library, so each test binary takes what it needs): a real
//! `webcall serve` process, real WebSocket clients, and `webcall` child processes read line by line.

pub mod redis;

use futures_util::{SinkExt, StreamExt};
use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use webcall_protocol::{ClientMessage, ErrorCode, Join, ProtocolError, ServerMessage, Signal};

/// How long a test waits for something that should happen (not a performance bound).
pub const WAIT: Duration = Duration::from_secs(10);

/// The `webcall` binary under test: `WEBCALL_BIN`, else the one cargo built for the integration tests (it puts
/// their binaries in `target/<profile>/deps`, the package's binary one level up).
pub fn webcall_bin() -> PathBuf {
    if let Some(b) = std::env::var_os("WEBCALL_BIN") {
        return b.into();
    }
    let exe = std::env::current_exe().expect("the test binary's path");
    let dir = exe.parent().and_then(|d| d.parent()).expect("a test binary under target/<profile>/deps");
    dir.join(format!("webcall{}", std::env::consts::EXE_SUFFIX))
}

pub struct ServerProc {
    child: Child,
    pub addr: SocketAddr,
    /// `http` or `https`.
    pub scheme: String,
    /// Lines printed before the `listening on` line (e.g. the TLS fingerprint).
    pub banner: Vec<String>,
}

impl ServerProc {
    /// `webcall serve --listen 127.0.0.1:0 ARGS…`, ready when it prints its address.
    pub fn start(args: &[&str]) -> ServerProc {
        Self::start_on("127.0.0.1:0", args)
    }

    pub fn start_on(listen: &str, args: &[&str]) -> ServerProc {
        Self::start_env(listen, args, &[])
    }

    /// Like [`ServerProc::start_on`], with extra environment variables for the server process only.
    pub fn start_env(listen: &str, args: &[&str], env: &[(&str, &str)]) -> ServerProc {
        // Each server gets its own STUN/TURN port unless the test chooses one (the default 3478 would collide).
        let own_turn = args.iter().any(|a| matches!(*a, "--turn-listen" | "--no-turn" | "--ice-servers"));
        let turn: &[&str] = if own_turn { &[] } else { &["--turn-listen", "127.0.0.1:0"] };
        let mut child = Command::new(webcall_bin())
            .envs(env.iter().copied())
            .arg("serve")
            .args(["--listen", listen])
            .args(turn)
            .args(args)
            .env("RUST_LOG", "warn")
            // Likewise the SFU's media port (default 7882); a flag in `args` still wins.
            .env("WEBCALL_MEDIA_LISTEN", "127.0.0.1:0")
            .stdout(Stdio::piped())
            .spawn()
            .expect("webcall binary runs");
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut banner = Vec::new();
        let url = loop {
            let mut line = String::new();
            if out.read_line(&mut line).unwrap() == 0 {
                let status = child.wait().unwrap();
                panic!("webcall serve exited ({status}) before listening; printed {banner:?}");
            }
            match line.split("listening on ").nth(1) {
                Some(rest) => break rest.split_whitespace().next().unwrap().to_owned(),
                None => banner.push(line.trim_end().to_owned()),
            }
        };
        let (scheme, addr) = url.split_once("://").unwrap();
        ServerProc { child, addr: addr.parse().unwrap(), scheme: scheme.to_owned(), banner }
    }

    /// `GET /metrics`: the response (head and Prometheus text).
    pub fn metrics(&self) -> String {
        use std::io::Read;
        let mut s = std::net::TcpStream::connect(self.addr).expect("the server accepts");
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
        let mut r = String::new();
        s.read_to_string(&mut r).unwrap();
        r
    }

    pub fn ws_url(&self) -> String {
        let ws = if self.scheme == "https" { "wss" } else { "ws" };
        format!("{ws}://{}/ws", self.addr)
    }

    /// Sends a signal (e.g. `TERM`) to the server.
    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill").args([&format!("-{sig}"), &self.pid().to_string()]).status().unwrap().success();
        assert!(ok, "kill -{sig} failed");
    }

    /// Waits for the server to exit; its exit code.
    pub fn wait_exit(&mut self) -> Option<i32> {
        let deadline = std::time::Instant::now() + WAIT;
        while std::time::Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("server did not exit within {WAIT:?}");
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Resident memory of the server in KiB.
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        status.lines().find(|l| l.starts_with("VmRSS:")).unwrap().split_whitespace().nth(1).unwrap().parse().unwrap()
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for ServerProc {
    fn drop(&mut self) {
        self.kill();
    }
}

pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

pub struct Client {
    pub ws: Ws,
    pub id: String,
    pub resume: String,
}

/// How a connection ended, as seen by the client.
#[derive(Debug, PartialEq)]
pub enum Ended {
    Closed(u16, String),
    Dropped,
}

impl Client {
    pub async fn connect(url: &str) -> Client {
        Self::connect_raw(url).await.expect("WebSocket connects")
    }

    /// Connects and joins `room` with `"sfu":true`; the client (id and resume token set) and its `welcome`.
    pub async fn join_sfu(url: &str, room: &str, name: &str) -> (Client, ServerMessage) {
        Self::join_with(url, Join { sfu: true, ..Join::new(room, name) }).await
    }

    pub async fn connect_raw(url: &str) -> Result<Client, tokio_tungstenite::tungstenite::Error> {
        let (ws, _) = tokio_tungstenite::connect_async(url).await?;
        Ok(Client { ws, id: String::new(), resume: String::new() })
    }

    /// Connects and joins; keeps id and resume token.
    pub async fn join(url: &str, room: &str, name: &str) -> (Client, ServerMessage) {
        Self::join_with(url, Join::new(room, name)).await
    }

    /// Connects and sends `join`; the client (id and resume token set) and its `welcome`.
    pub async fn join_with(url: &str, join: Join<'_>) -> (Client, ServerMessage) {
        let mut c = Client::connect(url).await;
        c.send_join(join).await;
        let w = c.expect_welcome().await;
        (c, w)
    }

    /// Sends raw JSON: for messages the typed encoders cannot write (malformed on purpose, spoofed fields).
    pub async fn send(&mut self, v: serde_json::Value) {
        self.send_text(&v.to_string()).await;
    }

    /// Sends a client message (typed).
    pub async fn send_msg(&mut self, m: &ClientMessage<'_>) {
        self.send_text(&m.to_json()).await;
    }

    /// Sends a `join` (typed).
    pub async fn send_join(&mut self, join: Join<'_>) {
        self.send_text(&join.to_json()).await;
    }

    /// Sends `data` (an object) to the others of an SFU room (typed).
    pub async fn send_data(&mut self, data: &serde_json::Value) {
        let raw = serde_json::value::to_raw_value(data).expect("JSON");
        self.send_msg(&ClientMessage::Data(&raw)).await;
    }

    /// Relays `signal` to peer `to` (typed).
    pub async fn relay(&mut self, to: &str, signal: Signal) {
        self.send_text(&signal.to_json(to)).await;
    }

    pub async fn send_text(&mut self, t: &str) {
        self.ws.send(Message::text(t)).await.expect("send");
    }

    /// The next message, typed (see [`read_server_frame`]); panics after [`WAIT`].
    pub async fn recv(&mut self) -> ServerMessage {
        tokio::time::timeout(WAIT, self.next_message())
            .await
            .expect("a message within the wait")
            .expect("connection open")
    }

    /// The next message, asserting its type.
    pub async fn expect(&mut self, ty: &str) -> ServerMessage {
        let m = self.recv().await;
        assert_eq!(m.message_type(), ty, "expected {ty}, got {m:?}");
        m
    }

    /// The next message must be a `welcome`; this client's id and resume token become its.
    pub async fn expect_welcome(&mut self) -> ServerMessage {
        let w = self.expect("welcome").await;
        if let ServerMessage::Welcome { id, resume, .. } = &w {
            (self.id, self.resume) = (id.clone(), resume.clone());
        }
        w
    }

    /// The next message must be an error with this code; the refusal.
    pub async fn expect_error(&mut self, code: ErrorCode) -> ProtocolError {
        let m = self.recv().await;
        let e = match m.clone().into_refusal() {
            Some(Ok(e)) => e,
            _ => panic!("expected error {code}, got {m:?}"),
        };
        assert_eq!(e.code, code, "{m:?}");
        assert!(!e.message.is_empty(), "errors say what happened: {m:?}");
        e
    }

    /// Nothing arrives for `d`.
    pub async fn expect_silence(&mut self, d: Duration) {
        if let Ok(m) = tokio::time::timeout(d, self.next_message()).await {
            panic!("expected nothing, got {m:?}");
        }
    }

    async fn next_message(&mut self) -> Option<ServerMessage> {
        loop {
            match self.ws.next().await? {
                Ok(Message::Text(t)) => return Some(read_server_frame(&t)),
                Ok(Message::Close(_)) | Err(_) => return None,
                Ok(_) => continue,
            }
        }
    }

    /// Reads until the connection ends; returns how (skipping any data frames).
    pub async fn until_end(&mut self) -> Ended {
        let end = async {
            loop {
                match self.ws.next().await {
                    Some(Ok(Message::Close(Some(f)))) => return Ended::Closed(u16::from(f.code), f.reason.to_string()),
                    Some(Ok(Message::Close(None))) => {
                        return Ended::Closed(u16::from(CloseCode::Status), String::new())
                    }
                    Some(Ok(_)) => continue,
                    Some(Err(_)) | None => return Ended::Dropped,
                }
            }
        };
        tokio::time::timeout(WAIT, end).await.expect("connection ends within the wait")
    }
}

/// A server frame, typed; panics unless [`ServerMessage`] reads it and carries all of it (the frame is exactly the
/// typed message's JSON: no field that the type would drop), so comparing typed messages is as strict as comparing
/// the frames.
pub fn read_server_frame(text: &str) -> ServerMessage {
    let m = ServerMessage::parse(text)
        .unwrap_or_else(|e| panic!("the server sent what ServerMessage cannot read ({e}): {text}"));
    let raw: serde_json::Value = serde_json::from_str(text).expect("server frames are JSON");
    assert_eq!(
        raw,
        serde_json::to_value(&m).expect("server messages serialise"),
        "ServerMessage drops a field of {text}"
    );
    m
}

/// Server messages as a test expects them (`assert_eq!(c.recv().await, msg::hello(&b.id, "Bob"))`).
pub mod msg {
    use webcall_protocol::{PeerInfo, ServerMessage};

    pub fn hello(from: &str, name: &str) -> ServerMessage {
        ServerMessage::Hello { from: from.into(), name: name.into() }
    }

    /// A relayed offer (no SFU `tracks`).
    pub fn offer(from: &str, sdp: &str) -> ServerMessage {
        ServerMessage::Offer { from: from.into(), sdp: sdp.into(), tracks: None }
    }

    pub fn answer(from: &str, sdp: &str) -> ServerMessage {
        ServerMessage::Answer { from: from.into(), sdp: sdp.into() }
    }

    pub fn bye(from: &str) -> ServerMessage {
        ServerMessage::Bye { from: from.into() }
    }

    /// A `welcome`'s `peers` entry.
    pub fn peer(id: &str, name: &str) -> PeerInfo {
        PeerInfo { id: id.into(), name: name.into() }
    }

    /// The `peers` of a `welcome`; panics on another message.
    pub fn peers(welcome: ServerMessage) -> Vec<PeerInfo> {
        let ServerMessage::Welcome { peers, .. } = welcome else { panic!("not a welcome: {welcome:?}") };
        peers
    }
}

pub use tempfile::TempDir;

/// A join token signed with `secret`: `webcall token --auth-secret SECRET ARGS…`.
pub fn token(secret: &str, args: &[&str]) -> String {
    let out = Command::new(webcall_bin()).args(["token", "--auth-secret", secret]).args(args).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

/// A fresh directory under the system temp dir (named after `tag`), removed with everything in it when dropped.
pub fn temp_dir(tag: &str) -> TempDir {
    tempfile::Builder::new().prefix(&format!("webcall-test-{tag}-")).tempdir().expect("a temporary directory")
}

/// A `webcall` child process (`peer`, or anything inside a network namespace), its stdout collected line by line
/// (and echoed to stderr, tagged, for a failing test's log). Killed when dropped.
pub struct Proc {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Arc<Mutex<Vec<String>>>,
    tag: String,
    /// Bounds every wait on this process (not a performance bound).
    wait: Duration,
}

impl Proc {
    /// `webcall peer --server URL --room ROOM --name NAME` with host candidates on 127.0.0.1, a small test
    /// pattern size and stats every second, then `extra`; stdin is piped (see [`Proc::say`]). Waits up to 30 s.
    pub fn peer(url: &str, room: &str, name: &str, extra: &[&str]) -> Proc {
        let mut cmd = Command::new(webcall_bin());
        cmd.args(["peer", "--server", url, "--room", room, "--name", name, "--ip", "127.0.0.1"])
            .args(["--size", "320x180", "--stats-every", "1s"])
            .args(extra)
            .stdin(Stdio::piped());
        Proc::spawn(cmd, name, Duration::from_secs(30))
    }

    /// `webcall ARGS…` inside network namespace `ns`, with `env`. Waits up to 30 s.
    pub fn in_netns(ns: &str, tag: &str, args: &[&str], env: &[(&str, &str)]) -> Proc {
        let mut cmd = Command::new("ip");
        let bin = webcall_bin();
        cmd.args(["netns", "exec", ns]).arg(bin).args(args).envs(env.iter().copied()).stdin(Stdio::null());
        Proc::spawn(cmd, tag, Duration::from_secs(30))
    }

    /// Runs `cmd` with `RUST_LOG=warn` and stdout piped; `wait` bounds the waits on it.
    pub fn spawn(mut cmd: Command, tag: &str, wait: Duration) -> Proc {
        let mut child = cmd.env("RUST_LOG", "warn").stdout(Stdio::piped()).spawn().expect("the process starts");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let (out, l, t) = (child.stdout.take().unwrap(), lines.clone(), tag.to_owned());
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { return };
                eprintln!("[{t}] {line}");
                l.lock().unwrap().push(line);
            }
        });
        Proc { stdin: child.stdin.take(), child, lines, tag: tag.to_owned(), wait }
    }

    /// The same process, its waits bounded by `wait` instead.
    pub fn waiting(mut self, wait: Duration) -> Proc {
        self.wait = wait;
        self
    }

    /// The name it was started under (a peer's `--name`).
    pub fn tag(&self) -> &str {
        &self.tag
    }

    /// The bound of this process's waits.
    pub fn wait(&self) -> Duration {
        self.wait
    }

    /// The lines printed so far.
    pub fn lines(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }

    pub fn output(&self) -> String {
        self.lines.lock().unwrap().join("\n")
    }

    /// Waits until `n` output lines satisfy `pred`; the last of them.
    pub fn wait_n(&self, n: usize, what: &str, pred: impl Fn(&str) -> bool) -> String {
        let t0 = Instant::now();
        loop {
            let found: Vec<String> = self.lines.lock().unwrap().iter().filter(|l| pred(l)).cloned().collect();
            if found.len() >= n {
                return found[n - 1].clone();
            }
            assert!(t0.elapsed() < self.wait, "{}: no {what} (wanted {n}) in:\n{}", self.tag, self.output());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits for a line satisfying `pred`; the first such line.
    pub fn wait_for(&self, what: &str, pred: impl Fn(&str) -> bool) -> String {
        self.wait_n(1, what, pred)
    }

    /// The peer id from the `joined room … as ID` line.
    pub fn id(&self) -> String {
        let l = self.wait_for("join", |l| l.starts_with("joined room "));
        l.split(" as ").nth(1).unwrap().split_whitespace().next().unwrap().to_owned()
    }

    /// Writes a line to its stdin (piped by [`Proc::peer`]).
    pub fn say(&mut self, line: &str) {
        let s = self.stdin.as_mut().expect("stdin is piped");
        writeln!(s, "{line}").unwrap();
        s.flush().unwrap();
    }

    /// SIGTERM: a peer leaves cleanly and reports its exit code.
    pub fn terminate(&mut self) {
        let _ = Command::new("kill").arg(self.child.id().to_string()).status();
    }

    /// Waits for the exit; its code (-1: killed by a signal).
    pub fn wait_exit(&mut self) -> i32 {
        let t0 = Instant::now();
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                // Let the reader thread take the last lines.
                std::thread::sleep(Duration::from_millis(100));
                return st.code().unwrap_or(-1);
            }
            assert!(t0.elapsed() < self.wait, "{} did not exit:\n{}", self.tag, self.output());
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Accepts exactly the certificate with this SHA-256 fingerprint (`None`: any, to read what a server presents).
#[derive(Debug)]
pub struct Pinned(pub Option<String>);

impl rustls::client::danger::ServerCertVerifier for Pinned {
    fn verify_server_cert(
        &self,
        end_entity: &rustls::pki_types::CertificateDer<'_>,
        _: &[rustls::pki_types::CertificateDer<'_>],
        _: &rustls::pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        use sha2::Digest;
        let fp: Vec<String> = sha2::Sha256::digest(end_entity.as_ref()).iter().map(|b| format!("{b:02X}")).collect();
        if self.0.as_ref().is_none_or(|want| fp.join(":") == *want) {
            Ok(rustls::client::danger::ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General(format!("fingerprint {} is not the pinned {:?}", fp.join(":"), self.0)))
        }
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        with_algorithms(|algs| rustls::crypto::verify_tls12_signature(message, cert, dss, algs))
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        with_algorithms(|algs| rustls::crypto::verify_tls13_signature(message, cert, dss, algs))
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        with_algorithms(|algs| algs.supported_schemes())
    }
}

/// `f` with aws-lc-rs's signature algorithms (what the server's rustls uses).
fn with_algorithms<T>(f: impl FnOnce(&rustls::crypto::WebPkiSupportedAlgorithms) -> T) -> T {
    f(&rustls::crypto::aws_lc_rs::default_provider().signature_verification_algorithms)
}
