//! One WebRTC session with one remote peer: a str0m `Rtc` driven by UDP sockets, signaling commands and the
//! media source (VP8 video, Opus audio), on its own task.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use str0m::change::SdpPendingOffer;
use str0m::channel::ChannelId;
use str0m::format::Codec;
use str0m::media::{MediaKind, Mid};
use str0m::net::{Protocol, Receive};
use str0m::{Candidate, CandidateKind, Event, IceConnectionState, Input, Output, Rtc};
use tokio::net::UdpSocket;
use tokio::sync::{broadcast, mpsc};
use webcall_protocol::{IceCandidate, PeerData, Signal};

use crate::gather::{Gatherer, IceConfig, Recv};
use crate::media::{vp8_is_keyframe, vp8_keyframe_size, EncodedFrame, IvfWriter, SourceHandle};
use crate::out;

mod negotiation;
mod send;

/// What the controller tells a session.
#[derive(Debug)]
pub enum ToSession {
    Offer(String),
    Answer(String),
    Candidate(Option<IceCandidate>),
    /// A chat message, already encoded as the JSON the data channel carries.
    Chat(Arc<str>),
    Close,
}

/// What the session has seen, for stats lines and the exit code.
#[derive(Debug, Default, Clone)]
pub struct Report {
    pub id: String,
    pub name: String,
    pub ice: String,
    pub connected: bool,
    pub pair: Option<String>,
    pub frames_in: u64,
    pub keyframes_in: u64,
    pub bytes_in: u64,
    pub frames_out: u64,
    pub bytes_out: u64,
    pub chat_in: u64,
    /// Opus packets received and sent.
    pub audio_in: u64,
    pub audio_out: u64,
    pub recording: Option<PathBuf>,
    pub closed: bool,
    /// For the bitrate shown in stats lines.
    pub last_bytes_in: u64,
    pub last_at: Option<Instant>,
}

pub struct SessionConfig {
    pub my_name: String,
    pub remote_id: String,
    pub remote_name: String,
    pub offerer: bool,
    pub polite: bool,
    pub local_ips: Vec<IpAddr>,
    pub source: Option<SourceHandle>,
    pub record_dir: Option<PathBuf>,
    pub echo: bool,
    pub chat: bool,
    /// STUN/TURN servers from the welcome, and `--relay`.
    pub ice: IceConfig,
    pub signal: mpsc::UnboundedSender<(String, Signal)>,
}

pub struct Session {
    cfg: SessionConfig,
    rtc: Rtc,
    report: Arc<Mutex<Report>>,
    sockets: HashMap<SocketAddr, Arc<UdpSocket>>,
    pending: Option<SdpPendingOffer>,
    have_remote_description: bool,
    buffered_candidates: Vec<Candidate>,
    kinds: HashMap<SocketAddr, CandidateKind>,
    video_mids: Vec<Mid>,
    audio_mids: Vec<Mid>,
    chat_channel: Option<ChannelId>,
    chat_open: bool,
    recorder: Option<IvfWriter>,
    last_keyframe_request: Option<Instant>,
    sent_keyframe: bool,
    disconnected_since: Option<Instant>,
    /// Server-reflexive and relayed candidates.
    gather: Gatherer,
    /// An offer or answer went out: candidates gathered from now on are trickled.
    sdp_sent: bool,
    /// The mid of our first m-line, for trickled candidates (`sdpMid`).
    first_mid: Option<String>,
}

impl Session {
    /// Binds one UDP socket per local address and prepares the `Rtc`; the offerer also sends its offer.
    pub async fn start(
        cfg: SessionConfig,
        report: Arc<Mutex<Report>>,
    ) -> Result<
        (Session, mpsc::Receiver<(Vec<u8>, SocketAddr, SocketAddr)>, Vec<tokio::task::JoinHandle<()>>),
        crate::PeerError,
    > {
        let rtc = crate::rtc::new_rtc(Some(Duration::from_secs(1))).await;
        let (udp_tx, udp_rx) = mpsc::channel(256);
        let (bound, readers) = crate::rtc::bind_udp(&cfg.local_ips, udp_tx).await?;
        let locals: Vec<SocketAddr> = bound.iter().map(|(a, _)| *a).collect();
        let relay_only = cfg.ice.relay_only;
        let mut s = Session {
            cfg,
            rtc,
            report,
            sockets: bound.into_iter().collect(),
            pending: None,
            have_remote_description: false,
            buffered_candidates: Vec::new(),
            kinds: HashMap::new(),
            video_mids: Vec::new(),
            audio_mids: Vec::new(),
            chat_channel: None,
            chat_open: false,
            recorder: None,
            last_keyframe_request: None,
            sent_keyframe: false,
            disconnected_since: None,
            gather: Gatherer::new(Instant::now(), relay_only),
            sdp_sent: false,
            first_mid: None,
        };
        // Relay only: the sockets still talk to the TURN server; they are just never offered as candidates.
        for &local in locals.iter().filter(|_| !relay_only) {
            match Candidate::host(local, "udp") {
                Ok(c) => {
                    s.kinds.insert(local, CandidateKind::Host);
                    s.rtc.add_local_candidate(c);
                }
                Err(e) => tracing::warn!("no host candidate for {local}: {e}"),
            }
        }
        // Server-reflexive and relayed candidates, from every socket to every server of its address family.
        let now = Instant::now();
        for local in locals {
            if !relay_only {
                for hp in s.cfg.ice.stun.clone() {
                    if let Some(server) = crate::gather::resolve(&hp, local.is_ipv4()).await {
                        s.gather.add_binding(local, server, now);
                    }
                }
            }
            for t in s.cfg.ice.turn.clone() {
                if let Some(server) = crate::gather::resolve(&t.hostport, local.is_ipv4()).await {
                    s.gather.add_turn(local, server, &t, now);
                }
            }
        }
        s.gather.handle_timeout(Instant::now());
        s.flush_gather();
        if s.cfg.offerer {
            s.offer(false);
        }
        Ok((s, udp_rx, readers))
    }

    fn send(&self, m: Signal) {
        let _ = self.cfg.signal.send((self.cfg.remote_id.clone(), m));
    }

    fn update(&self, f: impl FnOnce(&mut Report)) {
        f(&mut self.report.lock().unwrap());
    }

    fn on_event(&mut self, e: Event) {
        let id = self.cfg.remote_id.clone();
        match e {
            Event::IceConnectionStateChange(s) => {
                let state = format!("{s:?}").to_lowercase();
                out(format!("peer {id} ice {state}"));
                self.update(|r| r.ice = state);
                self.disconnected_since =
                    if s == IceConnectionState::Disconnected { Some(Instant::now()) } else { None };
            }
            Event::Connected => {
                out(format!("peer {id} connected"));
                self.update(|r| r.connected = true);
                if let Some(src) = &self.cfg.source {
                    src.request_keyframe();
                }
            }
            Event::MediaAdded(m) => {
                let mids = if m.kind == MediaKind::Video { &mut self.video_mids } else { &mut self.audio_mids };
                if !mids.contains(&m.mid) {
                    mids.push(m.mid);
                }
            }
            Event::MediaData(d) => {
                if d.params.spec().codec == Codec::Opus {
                    self.update(|r| r.audio_in += 1);
                    return;
                }
                if d.params.spec().codec != Codec::Vp8 {
                    return;
                }
                let len = d.data.len() as u64;
                let key = vp8_is_keyframe(&d.data);
                self.update(|r| {
                    r.frames_in += 1;
                    r.bytes_in += len;
                    r.keyframes_in += key as u64;
                });
                if !d.contiguous {
                    self.request_keyframe(d.mid);
                }
                if let Some(dir) = self.cfg.record_dir.clone() {
                    if self.recorder.is_none() {
                        match vp8_keyframe_size(&d.data) {
                            Some((w, h)) => {
                                let name = crate::rtc::sanitize(&self.cfg.remote_name);
                                let stem = if name.is_empty() { id.to_string() } else { format!("{name}-{id}") };
                                match IvfWriter::create_new(&dir, &stem, "p2p", w, h) {
                                    Ok(wr) => {
                                        out(format!("peer {id} recording {w}x{h} to {}", wr.path.display()));
                                        let p = wr.path.clone();
                                        self.update(|r| r.recording = Some(p));
                                        self.recorder = Some(wr);
                                    }
                                    Err(e) => tracing::error!("{e}"),
                                }
                            }
                            None => self.request_keyframe(d.mid),
                        }
                    }
                    if let Some(wr) = &mut self.recorder {
                        if let Err(e) = wr.write(d.time.rebase(str0m::media::Frequency::NINETY_KHZ).numer(), &d.data) {
                            tracing::error!("{e}");
                            self.recorder = None;
                        }
                    }
                }
                if self.cfg.echo {
                    let frame = EncodedFrame {
                        data: d.data.clone(),
                        key,
                        rtp_time: d.time.rebase(str0m::media::Frequency::NINETY_KHZ).numer(),
                    };
                    self.send_frame(&frame);
                }
            }
            Event::KeyframeRequest(_) => {
                if let Some(src) = &self.cfg.source {
                    src.request_keyframe();
                }
                if self.cfg.echo {
                    // Pass the request on to where the echoed video comes from.
                    let mids = self.video_mids.clone();
                    for mid in mids {
                        if self.rtc.media(mid).is_some_and(|m| m.direction().is_receiving()) {
                            self.request_keyframe(mid);
                        }
                    }
                }
            }
            Event::ChannelOpen(cid, label) if label == "chat" => {
                self.chat_channel = Some(cid);
                self.chat_open = true;
                if self.cfg.chat {
                    out(format!("peer {id} chat open"));
                }
            }
            Event::ChannelData(d) => {
                // Media state, names and hands are the page's business; the native peer shows chat only.
                let Some(PeerData::Chat { text, name, .. }) = PeerData::parse(&d.data) else { return };
                let (text, name) = (text.as_str(), if name.is_empty() { &self.cfg.remote_name } else { &name });
                self.update(|r| r.chat_in += 1);
                if self.cfg.chat {
                    print_chat(if name.is_empty() { id.as_str() } else { name }, text);
                }
            }
            Event::ChannelClose(cid) if self.chat_channel == Some(cid) => self.chat_open = false,
            Event::PeerStats(s) => {
                if let Some(p) = s.selected_candidate_pair {
                    let kind =
                        |a: &SocketAddr| self.kinds.get(a).map(|k| k.to_string()).unwrap_or_else(|| "prflx".into());
                    let local =
                        if self.gather.is_relayed(p.local.addr) { "relay".to_string() } else { kind(&p.local.addr) };
                    let remote = kind(&p.remote.addr);
                    let desc = format!(
                        "{local} {} -> {remote} {} ({}) local={local} remote={remote}",
                        p.local.addr,
                        p.remote.addr,
                        format!("{:?}", p.protocol).to_lowercase()
                    );
                    let changed = self.report.lock().unwrap().pair.as_deref() != Some(desc.as_str());
                    if changed {
                        out(format!("peer {id} selected pair {desc}"));
                        self.update(|r| r.pair = Some(desc));
                    }
                }
            }
            _ => {}
        }
    }

    /// Polls str0m until it wants to wait; sends what it transmits. Returns when to wake it next.
    fn drive(&mut self) -> Instant {
        loop {
            match self.rtc.poll_output() {
                Ok(Output::Timeout(t)) => {
                    self.flush_gather();
                    return self.gather.poll_timeout().map_or(t, |g| g.min(t));
                }
                Ok(Output::Transmit(t)) => {
                    // From a relayed candidate: through the TURN allocation.
                    if self.gather.relay_send(t.source, t.destination, &t.contents, Instant::now()) {
                        continue;
                    }
                    if let Some(sock) = self.sockets.get(&t.source) {
                        // UDP is lossy anyway; a full buffer drops the packet like the network would.
                        let _ = sock.try_send_to(&t.contents, t.destination);
                    }
                }
                Ok(Output::Event(e)) => self.on_event(e),
                Err(e) => {
                    tracing::warn!("peer {}: session failed: {e}", self.cfg.remote_id);
                    self.rtc.disconnect();
                    return Instant::now() + Duration::from_secs(1);
                }
            }
        }
    }

    pub async fn run(
        mut self,
        mut cmds: mpsc::UnboundedReceiver<ToSession>,
        mut udp: mpsc::Receiver<(Vec<u8>, SocketAddr, SocketAddr)>,
        readers: Vec<tokio::task::JoinHandle<()>>,
    ) {
        let mut frames: Option<broadcast::Receiver<Arc<EncodedFrame>>> =
            if self.cfg.echo { None } else { self.cfg.source.as_ref().map(|s| s.video.subscribe()) };
        let mut audio: Option<broadcast::Receiver<Arc<EncodedFrame>>> =
            self.cfg.source.as_ref().and_then(|s| s.audio.as_ref()).map(|a| a.subscribe());
        loop {
            let wake = self.drive().min(Instant::now() + Duration::from_millis(500));
            if !self.rtc.is_alive() {
                out(format!("peer {} session ended", self.cfg.remote_id));
                break;
            }
            // A connection that stays down is restarted by one side; perfect negotiation makes either safe.
            if self.disconnected_since.is_some_and(|t| t.elapsed() > Duration::from_secs(4)) && !self.cfg.polite {
                self.disconnected_since = None;
                tracing::info!("peer {}: ICE disconnected, restarting ICE", self.cfg.remote_id);
                self.offer(true);
            }
            tokio::select! {
                cmd = cmds.recv() => match cmd {
                    Some(ToSession::Offer(sdp)) => self.on_offer(&sdp),
                    Some(ToSession::Answer(sdp)) => self.on_answer(&sdp),
                    Some(ToSession::Candidate(c)) => self.on_candidate(c),
                    Some(ToSession::Chat(json)) => self.on_chat(&json),
                    Some(ToSession::Close) | None => break,
                },
                Some((buf, source, destination)) = udp.recv() => {
                    let now = Instant::now();
                    let (source, destination, buf) = match self.gather.recv(destination, source, &buf, now) {
                        Recv::Consumed => continue,
                        // Relayed to us: str0m sees it arrive on the relayed address, from the peer.
                        Recv::Peer { relay, peer, data } => (peer, relay, data),
                        Recv::NotMine => (source, destination, buf),
                    };
                    if let Ok(contents) = buf.as_slice().try_into() {
                        let input = Input::Receive(now, Receive { proto: Protocol::Udp, source, destination, contents });
                        if let Err(e) = self.rtc.handle_input(input) {
                            tracing::debug!("peer {}: input refused: {e}", self.cfg.remote_id);
                        }
                    }
                }
                f = async { match frames.as_mut() { Some(r) => r.recv().await, None => std::future::pending().await } } => {
                    match f {
                        Ok(f) => self.send_frame(&f),
                        Err(broadcast::error::RecvError::Lagged(_)) => {}
                        Err(broadcast::error::RecvError::Closed) => frames = None,
                    }
                }
                f = async { match audio.as_mut() { Some(r) => r.recv().await, None => std::future::pending().await } } => {
                    match f {
                        Ok(f) => self.send_audio(&f),
                        Err(broadcast::error::RecvError::Lagged(_)) => {}
                        Err(broadcast::error::RecvError::Closed) => audio = None,
                    }
                }
                _ = tokio::time::sleep_until(wake.into()) => {
                    let now = Instant::now();
                    self.gather.handle_timeout(now);
                    let _ = self.rtc.handle_input(Input::Timeout(now));
                }
            }
        }
        // Give the allocations back rather than let them time out on the server.
        self.gather.close(Instant::now());
        self.flush_gather();
        for r in readers {
            r.abort();
        }
        if let Some(mut wr) = self.recorder.take() {
            if let Err(e) = wr.finish() {
                tracing::error!("{e}");
            }
            out(format!("peer {} recorded {} frames to {}", self.cfg.remote_id, wr.frames, wr.path.display()));
        }
        self.rtc.disconnect();
        self.update(|r| r.closed = true);
    }
}

/// The JSON a chat message travels as (the browser client's format).
/// The 'chat NAME: TEXT' line of a received chat message.
pub(crate) fn print_chat(who: &str, text: &str) {
    // Control characters could rewrite the terminal: show them escaped.
    let clean: String = text
        .chars()
        .flat_map(|c| if c.is_control() { c.escape_default().collect::<Vec<_>>() } else { vec![c] })
        .collect();
    out(format!("chat {who}: {clean}"));
}

pub fn chat_json(text: &str, name: &str) -> String {
    let ts =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0);
    PeerData::chat(text, name, ts).to_json()
}
