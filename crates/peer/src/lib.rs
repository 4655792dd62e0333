//! `webcall peer`: a native WebRTC peer for webcall rooms, on str0m.
//!
//! The controller ([`run`]) keeps the signaling WebSocket (reconnecting and resuming by itself), starts one
//! [`session::Session`] per remote peer (offering to newcomers, answering the peers already there, perfect
//! negotiation with the smaller id polite), and relays chat lines from stdin. What it sends comes from
//! [`media::start_source`]: by default the pre-encoded VP8 and Opus clips of [`clip`], looped (no codec library);
//! live VP8 encoding with libvpx only with the `libvpx` cargo feature.

pub mod clip;
mod controller;
pub mod gather;
pub mod janus;
pub mod media;
pub mod rtc;
pub mod session;
pub mod sfu;
mod signaling;
#[cfg(feature = "libvpx")]
pub mod vpx;
pub mod whip;

use std::collections::HashMap;
use std::io::Write;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::AsyncBufReadExt;
use tokio::sync::mpsc;

use controller::Controller;
use media::{Source, SourceHandle};
use signaling::{Ended, Inputs, Leave};

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
peer-to-peer to the SFU, the recording that starts second goes to DIR/NAME-ID-sfu.ivf (through the SFU) or
DIR/NAME-ID-p2p.ivf (peer-to-peer); no file is ever overwritten. --sfu adds the lines
'room media goes through the sfu', 'sfu connected', 'peer ID via sfu', 'peer ID connected (sfu)' and
'stats sfu connected=BOOL frames_out=N bytes_out=N audio_out=N rtp_out=N rtp_bytes_out=N rtp_in=N rtp_bytes_in=N'
(video frames and their payload bytes, Opus packets, RTP packets and bytes as sent and received).

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
    /// Relay stdin lines to every peer's `chat` data channel and print theirs as 'chat NAME: TEXT'; in an SFU
    /// room (no data channels) as signaling `data`, the way the page chats there.
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
    /// per-participant frames): the cheap subscriber of bench/sfu.sh. Its sockets are then read every 5 ms, not
    /// per datagram (nobody is woken by an arriving packet). Figures in the 'stats sfu' line.
    #[arg(long, requires = "sfu", conflicts_with = "record")]
    pub count_only: bool,
    /// Benchmark only (bench/sfu.sh): --server is a Janus HTTP API URL (http://HOST:PORT/janus) and --room a
    /// VideoRoom number; publish with --send, subscribe to --expect other publishers with --count-only.
    #[arg(long, requires = "sfu")]
    pub janus: bool,
    /// Publish --send into --room through the server's WHIP endpoint (POST /whip/ROOM, docs/whip.md), as a
    /// broadcast tool such as OBS does, instead of joining over the WebSocket: send only, host candidates only,
    /// no chat. --server is the same URL as for joining (ws://HOST:PORT/ws or the page's https:// address);
    /// --token or --password is sent as the Bearer token.
    #[arg(long, conflicts_with_all = ["janus", "record", "echo", "chat", "count_only", "relay"])]
    pub whip: bool,
    /// A join token (`webcall token`), for a server started with --auth-secret.
    #[arg(long, value_name = "TOKEN", env = "WEBCALL_TOKEN")]
    pub token: Option<String>,
    /// The room's password (the first joiner of a room sets it).
    #[arg(long, value_name = "PASSWORD", env = "WEBCALL_PASSWORD")]
    pub password: Option<String>,
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
    #[error("{0}")]
    Whip(String),
    #[error(
        "--server {url}: {why}; expected the server's URL, e.g. ws://127.0.0.1:8080/ws or https://call.example.org"
    )]
    BadServerUrl { url: String, why: String },
    #[error("--whip publishes: give --send testsrc, live or FILE.ivf")]
    WhipWithoutSend,
    #[error("--relay needs a TURN server reachable over UDP in the server's iceServers, and the server offers none (started with --no-turn, or --ice-servers without a turn: URL?); drop --relay")]
    NoRelay,
}

impl PeerError {
    pub fn exit_code(&self) -> i32 {
        match self {
            PeerError::NoSuchLayer(..)
            | PeerError::FpsWithoutLive
            | PeerError::BadServerUrl { .. }
            | PeerError::WhipWithoutSend => exit::USAGE,
            PeerError::Whip(_) => exit::SIGNALING,
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
    rtc::prepare_dtls_cert();
    let stop = Arc::new(AtomicBool::new(false));
    let source = media_source(&args, &stop)?;
    if args.janus || args.whip {
        let code = if args.janus { janus::run(args, source).await } else { whip::run(args, source).await };
        stop.store(true, Ordering::Relaxed);
        return code;
    }
    if let Some(dir) = &args.record {
        std::fs::create_dir_all(dir).map_err(|e| PeerError::Io {
            what: format!("creating the --record directory {}", dir.display()),
            source: e,
        })?;
    }
    let (signal_tx, signals) = mpsc::unbounded_channel();
    let mut c = Controller {
        ips: local_ips(&args),
        args: args.clone(),
        source,
        my_id: None,
        peers: HashMap::new(),
        names: HashMap::new(),
        reports: Vec::new(),
        signal_tx,
        ice: gather::IceConfig { relay_only: args.relay, ..Default::default() },
        joined: false,
        sfu: None,
    };
    let term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| PeerError::Io { what: "installing the SIGTERM handler".into(), source: e })?;
    let mut leave = Leave { deadline: args.duration.map(|d| tokio::time::Instant::now() + d), term };
    let mut stats = tokio::time::interval(args.stats_every.max(Duration::from_millis(100)));
    stats.tick().await;
    let inputs = Inputs { signals, chat: stdin_chat(args.chat), stats };

    let ended = signaling::run(&mut c, &mut leave, inputs).await;
    stop.store(true, Ordering::Relaxed);
    match ended {
        Err(e) => {
            c.close_all();
            return Err(e);
        }
        Ok(Ended::Refused) => {
            c.close_all();
            return Ok(exit::SIGNALING);
        }
        Ok(Ended::Left) => {}
    }
    // Judge before closing: closing marks sessions closed but keeps what they saw.
    let code = c.exit_code();
    // Every session ever started, not only the current ones: one closed just before (its peer left as we did)
    // may still be writing its recording.
    let mut handles: Vec<_> = c.reports.clone();
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
            || sfu_counters.as_ref().is_some_and(|c| !c.closed.load(Ordering::Relaxed)))
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    c.print_stats(true);
    out(format!("exit {code}"));
    Ok(code)
}

/// What `--send` (with `--size`, `--fps`) asks for, started.
fn media_source(args: &PeerArgs, stop: &Arc<AtomicBool>) -> Result<Option<SourceHandle>, PeerError> {
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
    source.map(|s| media::start_source(s, stop.clone())).transpose()
}

/// Stdin lines, as chat messages to send (only with `--chat`; EOF just stops reading).
fn stdin_chat(enabled: bool) -> mpsc::UnboundedReceiver<String> {
    let (tx, rx) = mpsc::unbounded_channel();
    if enabled {
        tokio::spawn(async move {
            let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
            while let Ok(Some(l)) = lines.next_line().await {
                if tx.send(l).is_err() {
                    return;
                }
            }
        });
    }
    rx
}
