//! `webcall peer`: a native WebRTC peer for webcall rooms, on str0m.
//!
//! The controller ([`run`]) keeps the signaling WebSocket (reconnecting and resuming by itself), starts one
//! [`session::Session`] per remote peer (offering to newcomers, answering the peers already there, perfect
//! negotiation with the smaller id polite), and relays chat lines from stdin. What it sends comes from
//! [`media::start_source`]: by default the pre-encoded VP8 and Opus clips of [`clip`], looped (no codec library);
//! live VP8 encoding with libvpx only with the `libvpx` cargo feature.

pub mod clip;
pub mod gather;
pub mod media;
pub mod session;
pub mod sfu;
#[cfg(feature = "libvpx")]
pub mod vpx;

use std::collections::HashMap;
use std::io::Write;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use tokio::io::AsyncBufReadExt;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;
use webcall_protocol::ServerMessage;

use media::{Source, SourceHandle};
use session::{Outgoing, Report, Session, SessionConfig, ToSession};

/// Exit codes, for scripts (also in `webcall peer --help`).
pub mod exit {
    /// Every expected peer connected and, where asked (`--record`, `--echo`, `--send`), video flowed both ways.
    pub const OK: i32 = 0;
    /// Something failed locally (a file, the encoder, a socket).
    pub const ERROR: i32 = 1;
    /// Bad command line (clap's own code).
    pub const USAGE: i32 = 2;
    /// The signaling server could not be reached, or refused the join.
    pub const SIGNALING: i32 = 3;
    /// Fewer peers than `--expect` connected, or a peer in the room never connected.
    pub const NOT_CONNECTED: i32 = 4;
    /// A connected peer sent no video although `--record`/`--echo` asked for it, or got none although
    /// `--send` was given.
    pub const NO_MEDIA: i32 = 5;
}

const AFTER_HELP: &str = "\
Output (stdout, one line each): 'joined room R as ID', 'peer ID ice STATE', 'peer ID connected',
'peer ID local candidate KIND ADDR after MS ms' (server-reflexive and relay candidates, as gathered),
'peer ID gathering complete in MS ms', 'peer ID selected pair KIND ADDR -> KIND ADDR (udp) local=KIND remote=KIND'
(KIND: host, srflx, prflx, relay), 'chat NAME: TEXT', and every few seconds and at exit
'stats peer=ID ...' with video frames, bytes and bitrate in and out, and Opus packets in and out (audio_in,
audio_out). Logs go to stderr (RUST_LOG=debug for more).

--record DIR writes each remote peer's video to DIR/NAME-ID.ivf (VP8 in IVF, starting at a keyframe; ffplay,
mpv and VLC open it). A peer that rejoins gets a new id and so a new file. With --sfu, when the room moves from
peer-to-peer to the SFU, what comes through the SFU goes to DIR/NAME-ID-sfu.ivf. --sfu adds the lines
'room media goes through the sfu', 'sfu connected', 'peer ID via sfu', 'peer ID connected (sfu)' and
'stats sfu connected=BOOL frames_out=N audio_out=N rtp_out=N rtp_in=N rtp_bytes_in=N' (RTP packets).

Exit codes:
  0  every expected peer connected and, where asked, video flowed (--record/--echo: received from every
     connected peer; --send: sent to every connected peer)
  1  local failure (file, encoder, socket)
  2  bad command line
  3  signaling server unreachable or join refused
  4  fewer than --expect peers connected, or a peer still in the room never connected
  5  a connected peer's video did not flow as asked";

/// `webcall peer`: join a room as a native WebRTC peer.
#[derive(Debug, Clone, clap::Args)]
#[command(after_help = AFTER_HELP)]
pub struct PeerArgs {
    /// Signaling WebSocket URL.
    #[arg(long, value_name = "URL", env = "WEBCALL_SERVER")]
    pub server: String,
    /// Room to join (1-64 characters of A-Z a-z 0-9 _ -).
    #[arg(long)]
    pub room: String,
    /// Display name shown to the others.
    #[arg(long, default_value = "webcall-peer")]
    pub name: String,
    /// Media to send: `testsrc` (a test pattern in VP8 at --size, 30 fps, and a tone in Opus, pre-encoded and
    /// looped), `live` (the test pattern encoded live with libvpx at --size and --fps, and the tone; needs a build
    /// with --features libvpx), or an IVF file of VP8, looped (video only).
    #[arg(long, value_name = "testsrc|live|FILE.ivf", conflicts_with = "echo")]
    pub send: Option<String>,
    /// Write each remote peer's video to DIR/NAME-ID.ivf.
    #[arg(long, value_name = "DIR")]
    pub record: Option<PathBuf>,
    /// Relay stdin lines to every peer's `chat` data channel and print theirs as 'chat NAME: TEXT'.
    #[arg(long)]
    pub chat: bool,
    /// Send each peer's video back to it.
    #[arg(long)]
    pub echo: bool,
    /// Use only relay candidates: allocate on the TURN server in the welcome's iceServers and offer nothing else
    /// (no host or server-reflexive candidates). Without --relay, host, server-reflexive (STUN) and relay
    /// candidates are all gathered.
    #[arg(long)]
    pub relay: bool,
    /// Gather host candidates on this address only (default: every non-loopback interface, else loopback).
    #[arg(long, value_name = "ADDR")]
    pub ip: Option<IpAddr>,
    /// Leave after this long (e.g. 10s, 2m); without it, run until interrupted.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub duration: Option<Duration>,
    /// How many distinct peers must connect for exit code 0.
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub expect: usize,
    /// Test pattern size, WIDTHxHEIGHT. `testsrc` comes in the three sizes of a simulcast sender: 320x180
    /// (~150 kbit/s), 640x360 (~500 kbit/s) and 1280x720 (~1.5 Mbit/s); `live` takes any even size.
    #[arg(long, default_value = "640x360", value_parser = parse_size)]
    pub size: (u32, u32),
    /// Frame rate of `--send live` (the clips are 30 fps).
    #[arg(long, value_name = "FPS")]
    pub fps: Option<u32>,
    /// Seconds between stats lines.
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
    pub stats_every: Duration,
    /// Speak SFU (join with "sfu":true): in a room whose media goes through the server, keep one connection to
    /// the server's SFU, publish to it and receive every other participant from it (see docs/protocol.md).
    #[arg(long)]
    pub sfu: bool,
    /// With --sfu: once connected, count incoming RTP packets instead of decrypting them (no recording, no
    /// per-participant frames): the cheap subscriber of bench/sfu.sh. Figures in the 'stats sfu' line.
    #[arg(long, requires = "sfu", conflicts_with = "record")]
    pub count_only: bool,
}

fn parse_size(s: &str) -> Result<(u32, u32), String> {
    let (w, h) = s.split_once('x').ok_or("expected WIDTHxHEIGHT, e.g. 640x480")?;
    let (w, h): (u32, u32) = (w.parse().map_err(|_| "bad width")?, h.parse().map_err(|_| "bad height")?);
    if w < 16 || h < 16 || w % 2 != 0 || h % 2 != 0 || w > 4096 || h > 4096 {
        return Err("width and height must be even, 16-4096".into());
    }
    Ok((w, h))
}

#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    #[error("{what}: {source}")]
    Io { what: String, source: std::io::Error },
    #[error("VP8 encoder: {0} (is libvpx installed? Debian: apt-get install libvpx7)")]
    Encoder(String),
    #[error("{path}: {why}; --send takes 'testsrc', 'live' or an IVF file of VP8 frames")]
    BadIvf { path: PathBuf, why: String },
    #[error("--send live: built without the `libvpx` feature; rebuild with --features libvpx or use --send testsrc/FILE.ivf")]
    NoLibvpx,
    #[error("--send testsrc --size {0}x{1}: the pre-encoded test pattern comes in 320x180, 640x360 and 1280x720; other sizes need --send live")]
    NoSuchLayer(u32, u32),
    #[error("--fps applies to --send live only (the test pattern clips and IVF files keep their own frame rate)")]
    FpsWithoutLive,
    #[error("--relay needs a TURN server reachable over UDP in the server's iceServers, and the server offers none (started with --no-turn, or --ice-servers without a turn: URL?); drop --relay")]
    NoRelay,
}

impl PeerError {
    pub fn exit_code(&self) -> i32 {
        match self {
            PeerError::NoSuchLayer(..) | PeerError::FpsWithoutLive => exit::USAGE,
            _ => exit::ERROR,
        }
    }
}

/// Prints one status line on stdout (scripts and tests read these).
pub(crate) fn out(line: impl AsRef<str>) {
    let mut o = std::io::stdout().lock();
    let _ = writeln!(o, "{}", line.as_ref());
    let _ = o.flush();
}

fn local_ips(args: &PeerArgs) -> Vec<IpAddr> {
    if let Some(ip) = args.ip {
        return vec![ip];
    }
    let mut ips: Vec<IpAddr> = if_addrs::get_if_addrs()
        .unwrap_or_default()
        .into_iter()
        .map(|i| i.ip())
        .filter(|ip| match ip {
            IpAddr::V4(v) => !v.is_loopback() && !v.is_link_local(),
            // Link-local v6 needs a scope id that candidates cannot carry.
            IpAddr::V6(v) => !v.is_loopback() && (v.segments()[0] & 0xffc0) != 0xfe80,
        })
        .collect();
    ips.dedup();
    if ips.is_empty() {
        ips.push(IpAddr::from([127, 0, 0, 1]));
    }
    ips
}

struct Peer {
    tx: mpsc::UnboundedSender<ToSession>,
    report: Arc<Mutex<Report>>,
}

struct Controller {
    args: PeerArgs,
    ips: Vec<IpAddr>,
    source: Option<SourceHandle>,
    my_id: Option<String>,
    resume: Option<String>,
    peers: HashMap<String, Peer>,
    names: HashMap<String, String>,
    /// Every session ever started (rejoins make new ones), for the exit code and the final stats.
    reports: Vec<Arc<Mutex<Report>>>,
    signal_tx: mpsc::UnboundedSender<(String, Outgoing)>,
    /// From the last welcome.
    ice: gather::IceConfig,
    /// The session with the server's SFU, once the room went there (`--sfu`).
    sfu: Option<sfu::SfuPeer>,
}

impl Controller {
    fn start_session(&mut self, remote: &str, offerer: bool) {
        if let Some(old) = self.peers.remove(remote) {
            let _ = old.tx.send(ToSession::Close);
        }
        let my_id = self.my_id.clone().unwrap_or_default();
        let name = self.names.get(remote).cloned().unwrap_or_default();
        let report = Arc::new(Mutex::new(Report { id: remote.to_owned(), name: name.clone(), ..Default::default() }));
        let cfg = SessionConfig {
            my_name: self.args.name.clone(),
            remote_id: remote.to_owned(),
            remote_name: name,
            offerer,
            polite: my_id.as_str() < remote,
            local_ips: self.ips.clone(),
            source: self.source.clone(),
            record_dir: self.args.record.clone(),
            echo: self.args.echo,
            chat: self.args.chat,
            ice: self.ice.clone(),
            signal: self.signal_tx.clone(),
        };
        let (tx, rx) = mpsc::unbounded_channel();
        let r = report.clone();
        tokio::spawn(async move {
            match Session::start(cfg, r.clone()).await {
                Ok((s, udp, readers)) => s.run(rx, udp, readers).await,
                Err(e) => {
                    tracing::error!("{e}");
                    r.lock().unwrap().closed = true;
                }
            }
        });
        self.reports.push(report.clone());
        self.peers.insert(remote.to_owned(), Peer { tx, report });
    }

    fn to_peer(&self, id: &str, m: ToSession) {
        if let Some(p) = self.peers.get(id) {
            let _ = p.tx.send(m);
        }
    }

    fn close_all(&mut self) {
        for (_, p) in self.peers.drain() {
            let _ = p.tx.send(ToSession::Close);
        }
    }

    /// The room went to the SFU: one session with the server (peer-to-peer sessions close once it is up).
    async fn start_sfu(&mut self) -> Result<(), PeerError> {
        if self.sfu.is_some() {
            return Ok(());
        }
        out("room media goes through the sfu");
        let cfg = sfu::SfuSessionConfig {
            local_ips: self.ips.clone(),
            source: self.source.clone(),
            record_dir: self.args.record.clone(),
            count_only: self.args.count_only,
            names: self.names.clone(),
            signal: self.signal_tx.clone(),
        };
        self.sfu = Some(sfu::start(cfg).await?);
        Ok(())
    }

    fn close_sfu(&mut self) {
        if let Some(s) = self.sfu.take() {
            s.send(sfu::ToSfu::Close);
            self.reports.extend(s.reports());
        }
    }

    fn print_stats(&self, final_: bool) {
        let now = Instant::now();
        let mut list: Vec<_> =
            if final_ { self.reports.clone() } else { self.peers.values().map(|p| p.report.clone()).collect() };
        if let Some(s) = &self.sfu {
            list.extend(s.reports());
            out(s.stats_line(final_));
        }
        for r in list {
            let mut r = r.lock().unwrap();
            let kbps = match r.last_at {
                Some(t) if now > t => (r.bytes_in - r.last_bytes_in) as f64 * 8.0 / 1000.0 / (now - t).as_secs_f64(),
                _ => 0.0,
            };
            if !final_ {
                r.last_at = Some(now);
                r.last_bytes_in = r.bytes_in;
            }
            out(format!(
                "stats{} peer={} name={:?} ice={} connected={} pair={:?} frames_in={} keyframes_in={} bytes_in={} kbps_in={:.0} frames_out={} bytes_out={} chat_in={} audio_in={} audio_out={}{}",
                if final_ { " final" } else { "" },
                r.id,
                r.name,
                if r.ice.is_empty() { "new" } else { &r.ice },
                r.connected,
                r.pair.as_deref().unwrap_or("none"),
                r.frames_in,
                r.keyframes_in,
                r.bytes_in,
                kbps,
                r.frames_out,
                r.bytes_out,
                r.chat_in,
                r.audio_in,
                r.audio_out,
                r.recording.as_ref().map(|p| format!(" recording={}", p.display())).unwrap_or_default(),
            ));
        }
    }

    fn exit_code(&self, joined: bool) -> i32 {
        if !joined {
            return exit::SIGNALING;
        }
        let mut all = self.reports.clone();
        all.extend(self.sfu.iter().flat_map(|s| s.reports()));
        let reports: Vec<Report> = all.iter().map(|r| r.lock().unwrap().clone()).collect();
        let mut connected: Vec<&str> = reports.iter().filter(|r| r.connected).map(|r| r.id.as_str()).collect();
        connected.sort_unstable();
        connected.dedup();
        let present_unconnected = self.peers.values().any(|p| !p.report.lock().unwrap().connected);
        if connected.len() < self.args.expect || present_unconnected {
            return exit::NOT_CONNECTED;
        }
        let want_in = self.args.record.is_some() || self.args.echo;
        let want_out = self.args.send.is_some();
        for r in reports.iter().filter(|r| r.connected) {
            if (want_in && r.frames_in == 0) || (want_out && r.frames_out == 0) {
                return exit::NO_MEDIA;
            }
        }
        exit::OK
    }
}

enum WsEnd {
    /// Leave: duration over or a signal.
    Leave,
    /// The connection dropped: reconnect.
    Lost,
    /// The server refused the join for good.
    Refused,
}

/// Runs `webcall peer`; returns the process exit code (see [`exit`]).
pub async fn run(args: PeerArgs) -> i32 {
    match run_inner(args).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("webcall peer: {e}");
            e.exit_code()
        }
    }
}

async fn run_inner(args: PeerArgs) -> Result<i32, PeerError> {
    // The DTLS certificate (and with it aws-lc's RNG seeding) is ready before the first session needs it.
    session::prepare_dtls_cert();
    let stop = Arc::new(AtomicBool::new(false));
    let source = match args.send.as_deref() {
        Some("live") => {
            Some(Source::Live { width: args.size.0, height: args.size.1, fps: args.fps.unwrap_or(30).clamp(1, 120) })
        }
        _ if args.fps.is_some() => return Err(PeerError::FpsWithoutLive),
        None => None,
        Some("testsrc") => {
            let (w, h) = args.size;
            let layer = clip::Layer::ALL
                .into_iter()
                .find(|l| l.size() == (w as u16, h as u16))
                .ok_or(PeerError::NoSuchLayer(w, h))?;
            Some(Source::TestSrc { layer })
        }
        Some(path) => Some(Source::Ivf(path.into())),
    };
    let source = source.map(|s| media::start_source(s, stop.clone())).transpose()?;
    if let Some(dir) = &args.record {
        std::fs::create_dir_all(dir).map_err(|e| PeerError::Io {
            what: format!("creating the --record directory {}", dir.display()),
            source: e,
        })?;
    }
    let (signal_tx, mut signal_rx) = mpsc::unbounded_channel();
    let mut c = Controller {
        ips: local_ips(&args),
        args: args.clone(),
        source,
        my_id: None,
        resume: None,
        peers: HashMap::new(),
        names: HashMap::new(),
        reports: Vec::new(),
        signal_tx,
        ice: gather::IceConfig { relay_only: args.relay, ..Default::default() },
        sfu: None,
    };
    let deadline = args.duration.map(|d| tokio::time::Instant::now() + d);
    let sleep_deadline = async {
        match deadline {
            Some(d) => tokio::time::sleep_until(d).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(sleep_deadline);
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| PeerError::Io { what: "installing the SIGTERM handler".into(), source: e })?;

    // Stdin lines become chat messages (only with --chat; EOF just stops reading).
    let (chat_tx, mut chat_rx) = mpsc::unbounded_channel::<String>();
    if args.chat {
        tokio::spawn(async move {
            let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
            while let Ok(Some(l)) = lines.next_line().await {
                if chat_tx.send(l).is_err() {
                    return;
                }
            }
        });
    } else {
        drop(chat_tx);
    }

    let mut stats = tokio::time::interval(args.stats_every.max(Duration::from_millis(100)));
    stats.tick().await;
    let mut joined = false;
    let mut backoff = Duration::from_millis(200);
    // Signals produced while the WebSocket is down; sent after a resume, dropped after a fresh join.
    let mut outbox: Vec<(String, Outgoing)> = Vec::new();

    'connect: loop {
        let ws = tokio::select! {
            // No Nagle: an offer, answer or candidate must not wait for the ACK of the message before it.
            r = tokio_tungstenite::connect_async_with_config(args.server.as_str(), None, true) => r,
            _ = &mut sleep_deadline => break 'connect,
            _ = tokio::signal::ctrl_c() => break 'connect,
            _ = term.recv() => break 'connect,
        };
        let mut ws = match ws {
            Ok((ws, _)) => ws,
            Err(e) => {
                tracing::warn!("cannot reach {}: {e}; retrying", args.server);
                if !joined && c.my_id.is_none() {
                    out(format!("signaling: cannot reach {} ({e}); retrying", args.server));
                }
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = &mut sleep_deadline => break 'connect,
                    _ = tokio::signal::ctrl_c() => break 'connect,
                    _ = term.recv() => break 'connect,
                }
                backoff = (backoff * 2).min(Duration::from_secs(2));
                continue;
            }
        };
        let mut join = json!({"type": "join", "room": args.room, "name": args.name});
        if let Some(r) = &c.resume {
            join["resume"] = json!(r);
        }
        if args.sfu {
            join["sfu"] = json!(true);
        }
        if ws.send(Message::text(join.to_string())).await.is_err() {
            continue;
        }
        let mut live = false;
        let end = loop {
            tokio::select! {
                m = ws.next() => {
                    let text = match m {
                        Some(Ok(Message::Text(t))) => t,
                        Some(Ok(Message::Close(_))) | Some(Err(_)) | None => break WsEnd::Lost,
                        Some(Ok(_)) => continue,
                    };
                    if let Some(m) = sfu::parse(&text) {
                        match m {
                            sfu::SfuMessage::Topology if args.sfu => c.start_sfu().await?,
                            sfu::SfuMessage::Topology => {}
                            sfu::SfuMessage::Offer { sdp, tracks } => {
                                if let Some(s) = &c.sfu { s.send(sfu::ToSfu::Offer { sdp, tracks }) }
                            }
                            sfu::SfuMessage::Answer { sdp } => {
                                if let Some(s) = &c.sfu { s.send(sfu::ToSfu::Answer(sdp)) }
                            }
                        }
                        continue;
                    }
                    let msg: ServerMessage = match serde_json::from_str(&text) {
                        Ok(m) => m,
                        Err(e) => { tracing::warn!("unreadable server message {text}: {e}"); continue; }
                    };
                    match msg {
                        ServerMessage::Welcome { id, room, peers, resume, resumed, ice_servers, .. } => {
                            c.ice = gather::IceConfig::from_servers(&ice_servers, args.relay);
                            if args.relay && c.ice.turn.is_empty() {
                                let _ = ws.send(Message::text(r#"{"type":"bye"}"#)).await;
                                c.close_all();
                                stop.store(true, std::sync::atomic::Ordering::Relaxed);
                                return Err(PeerError::NoRelay);
                            }
                            let same = c.my_id.as_deref() == Some(id.as_str());
                            if !same && c.my_id.is_some() {
                                out(format!("signaling: session not resumed; rejoined as a new peer, rebuilding {} connection(s)", c.peers.len()));
                                c.close_all();
                                c.close_sfu();
                                outbox.clear();
                            }
                            out(format!("joined room {room} as {id}{}", if resumed { " (resumed)" } else { "" }));
                            c.my_id = Some(id);
                            c.resume = Some(resume);
                            joined = true;
                            live = true;
                            backoff = Duration::from_millis(200);
                            for p in peers {
                                if let Some(s) = &c.sfu {
                                    s.send(sfu::ToSfu::Name { id: p.id.clone(), name: p.name.clone() });
                                }
                                c.names.insert(p.id, p.name);
                            }
                            for (to, m) in outbox.drain(..) {
                                let _ = ws.send(Message::text(encode_out(&to, &m))).await;
                            }
                        }
                        ServerMessage::Hello { from, name } => {
                            out(format!("peer {from} joined ({name})"));
                            c.names.insert(from.clone(), name.clone());
                            match &c.sfu {
                                // Its media comes through the SFU's offers.
                                Some(s) => s.send(sfu::ToSfu::Name { id: from, name }),
                                None => c.start_session(&from, true),
                            }
                        }
                        ServerMessage::Offer { from, sdp, .. } => {
                            if !c.peers.contains_key(&from) {
                                c.start_session(&from, false);
                            }
                            c.to_peer(&from, ToSession::Offer(sdp));
                        }
                        ServerMessage::Answer { from, sdp } => c.to_peer(&from, ToSession::Answer(sdp)),
                        ServerMessage::Candidate { from, candidate } => c.to_peer(&from, ToSession::Candidate(candidate)),
                        // Read above (sfu::parse).
                        ServerMessage::Topology { .. } => {}
                        ServerMessage::Bye { from } => {
                            out(format!("peer {from} left"));
                            if let Some(p) = c.peers.remove(&from) {
                                let _ = p.tx.send(ToSession::Close);
                            }
                        }
                        ServerMessage::Error { code, message, refers_to } => {
                            out(format!("signaling error {code}: {message}"));
                            if refers_to.as_deref() == Some("join") && !live {
                                break WsEnd::Refused;
                            }
                        }
                    }
                }
                Some((to, m)) = signal_rx.recv() => {
                    if live {
                        if ws.send(Message::text(encode_out(&to, &m))).await.is_err() {
                            outbox.push((to, m));
                            break WsEnd::Lost;
                        }
                    } else {
                        outbox.push((to, m));
                    }
                }
                Some(line) = chat_rx.recv() => {
                    let json: Arc<str> = session::chat_json(&line, &args.name).into();
                    for p in c.peers.values() {
                        let _ = p.tx.send(ToSession::Chat(json.clone()));
                    }
                }
                _ = stats.tick() => {
                    // The SFU path is up: the peer-to-peer one goes (what it saw stays in the reports).
                    if c.sfu.as_ref().is_some_and(|s| s.counters.connected.load(std::sync::atomic::Ordering::Relaxed)) && !c.peers.is_empty() {
                        out(format!("closing {} peer-to-peer connection(s): media goes through the sfu", c.peers.len()));
                        c.close_all();
                    }
                    c.print_stats(false);
                }
                _ = &mut sleep_deadline => break WsEnd::Leave,
                _ = tokio::signal::ctrl_c() => break WsEnd::Leave,
                _ = term.recv() => break WsEnd::Leave,
            }
        };
        match end {
            WsEnd::Leave => {
                let _ = ws.send(Message::text(r#"{"type":"bye"}"#)).await;
                let _ = ws.close(None).await;
                break 'connect;
            }
            WsEnd::Refused => {
                c.close_all();
                stop.store(true, std::sync::atomic::Ordering::Relaxed);
                return Ok(exit::SIGNALING);
            }
            WsEnd::Lost => {
                out("signaling: connection lost; reconnecting");
                // Media keeps flowing peer to peer meanwhile; the sessions stay up.
                // Signals to send later come through signal_rx into the outbox on the next connection.
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = &mut sleep_deadline => break 'connect,
                }
            }
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    // Judge before closing: closing marks sessions closed but keeps what they saw.
    let code = c.exit_code(joined);
    let mut handles: Vec<_> = c.peers.values().map(|p| p.report.clone()).collect();
    handles.extend(c.sfu.iter().flat_map(|s| s.reports()));
    let sfu_counters = c.sfu.as_ref().map(|s| s.counters.clone());
    c.close_all();
    if let Some(s) = &c.sfu {
        s.send(sfu::ToSfu::Close);
    }
    // Let sessions finish their recordings (they flush on Close).
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(2)
        && (handles.iter().any(|r| !r.lock().unwrap().closed)
            || sfu_counters.as_ref().is_some_and(|c| !c.closed.load(std::sync::atomic::Ordering::Relaxed)))
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    c.print_stats(true);
    out(format!("exit {code}"));
    Ok(code)
}

fn encode_out(to: &str, m: &Outgoing) -> String {
    match m {
        Outgoing::Offer(sdp) => json!({"type": "offer", "to": to, "sdp": sdp}),
        Outgoing::Answer(sdp) => json!({"type": "answer", "to": to, "sdp": sdp}),
        Outgoing::Candidate(c) => json!({"type": "candidate", "to": to, "candidate": c}),
    }
    .to_string()
}
