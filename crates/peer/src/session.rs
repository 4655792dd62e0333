//! One WebRTC session with one remote peer: a str0m `Rtc` driven by UDP sockets, signaling commands and the
//! media source (VP8 video, Opus audio), on its own task.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use str0m::change::{SdpAnswer, SdpOffer, SdpPendingOffer};
use str0m::channel::{ChannelConfig, ChannelId};
use str0m::config::DtlsCert;
use str0m::format::Codec;
use str0m::media::{Direction, Frequency, KeyframeRequestKind, MediaKind, MediaTime, Mid};
use str0m::net::{Protocol, Receive};
use str0m::{Candidate, CandidateKind, Event, IceConnectionState, Input, Output, Rtc};
use tokio::net::UdpSocket;
use tokio::sync::{broadcast, mpsc};
use webcall_protocol::{IceCandidate, Signal};

use crate::gather::{GatherEvent, Gatherer, IceConfig, Recv};
use crate::media::{vp8_is_keyframe, vp8_keyframe_size, EncodedFrame, IvfWriter, SourceHandle};
use crate::out;

/// The process's DTLS certificate, shared by every session (see [`dtls_cert`]).
static DTLS_CERT: OnceLock<Option<DtlsCert>> = OnceLock::new();

/// The DTLS certificate every session of this process uses; generated on the first call, which blocks.
///
/// The first call is slow (~50-60 ms of CPU): the certificate's key is the first thing to draw from aws-lc's
/// random generator, whose CPU-jitter entropy source seeds itself once per process. Left to str0m, that
/// happened inside `Session::start` of the first call, on both peers, before the offer or answer could go out.
/// [`prepare_dtls_cert`] moves it to start-up, alongside the signaling connection.
pub fn dtls_cert() -> Option<DtlsCert> {
    DTLS_CERT
        .get_or_init(|| {
            let t = Instant::now();
            let cert = str0m::crypto::from_feature_flags().dtls_provider.generate_certificate();
            tracing::debug!("DTLS certificate generated in {:?}", t.elapsed());
            cert
        })
        .clone()
}

/// Starts generating the DTLS certificate on a thread of its own, so the first session finds it ready.
pub fn prepare_dtls_cert() {
    let _ = std::thread::Builder::new().name("dtls-cert".into()).spawn(|| {
        dtls_cert();
    });
}

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
        // Normally ready by now (prepare_dtls_cert at start-up); otherwise wait for it off the runtime.
        let cert = match DTLS_CERT.get() {
            Some(c) => c.clone(),
            None => tokio::task::spawn_blocking(dtls_cert).await.ok().flatten(),
        };
        let mut builder = Rtc::builder()
            .clear_codecs()
            .enable_vp8(true)
            .enable_opus(true, false)
            .set_stats_interval(Some(Duration::from_secs(1)));
        if let Some(cert) = cert {
            builder = builder.set_dtls_cert(cert);
        }
        let rtc = builder.build(Instant::now());
        let (udp_tx, udp_rx) = mpsc::channel(256);
        let relay_only = cfg.ice.relay_only;
        let mut s = Session {
            cfg,
            rtc,
            report,
            sockets: HashMap::new(),
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
        let mut readers = Vec::new();
        for ip in s.cfg.local_ips.clone() {
            let sock = UdpSocket::bind(SocketAddr::new(ip, 0))
                .await
                .map_err(|e| crate::PeerError::Io { what: format!("binding a UDP socket on {ip}"), source: e })?;
            let local = sock.local_addr().map_err(|e| crate::PeerError::Io { what: "local_addr".into(), source: e })?;
            let sock = Arc::new(sock);
            s.sockets.insert(local, sock.clone());
            let tx = udp_tx.clone();
            readers.push(tokio::spawn(async move {
                let mut buf = vec![0u8; 2048];
                loop {
                    match sock.recv_from(&mut buf).await {
                        Ok((n, src)) => {
                            if tx.send((buf[..n].to_vec(), src, local)).await.is_err() {
                                return;
                            }
                        }
                        // ICMP port-unreachable from a peer that went away shows up here on Linux: keep reading.
                        Err(e) => tracing::debug!("udp recv on {local}: {e}"),
                    }
                }
            }));
            if relay_only {
                // The socket still talks to the TURN server; it is just never offered as a candidate.
                continue;
            }
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
        let locals: Vec<SocketAddr> = s.sockets.keys().copied().collect();
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

    /// An offer or answer went out (it carries every candidate gathered so far): from now on new candidates
    /// are trickled, and end-of-candidates follows once gathering is over.
    fn sdp_sent(&mut self, sdp: &str) {
        self.sdp_sent = true;
        if let Some(mid) = sdp.lines().find_map(|l| l.strip_prefix("a=mid:")) {
            self.first_mid = Some(mid.trim().to_owned());
        }
        if self.gather.is_done() {
            self.send(Signal::Candidate(None));
        }
    }

    /// Sends what the gatherer queued and takes in the candidates it found.
    fn flush_gather(&mut self) {
        while let Some((local, to, data)) = self.gather.poll_transmit() {
            if let Some(sock) = self.sockets.get(&local) {
                let _ = sock.try_send_to(&data, to);
            }
        }
        while let Some(e) = self.gather.poll_event() {
            match e {
                GatherEvent::Candidate(c) => {
                    let (addr, kind) = (c.addr(), c.kind());
                    self.kinds.insert(addr, kind);
                    let Some(added) = self.rtc.add_local_candidate(c) else {
                        tracing::debug!("peer {}: {kind} candidate {addr} not added (redundant)", self.cfg.remote_id);
                        continue;
                    };
                    let line = added.to_sdp_string();
                    let ms = self.gather.started().elapsed().as_millis();
                    out(format!("peer {} local candidate {kind} {addr} after {ms} ms", self.cfg.remote_id));
                    if self.sdp_sent {
                        let c = IceCandidate {
                            candidate: line,
                            sdp_mid: self.first_mid.clone(),
                            sdp_m_line_index: Some(0),
                            username_fragment: None,
                        };
                        self.send(Signal::Candidate(Some(c)));
                    }
                }
                GatherEvent::Done => {
                    let ms = self.gather.started().elapsed().as_millis();
                    out(format!("peer {} gathering complete in {ms} ms", self.cfg.remote_id));
                    if self.sdp_sent {
                        self.send(Signal::Candidate(None));
                    }
                }
            }
        }
    }

    fn update(&self, f: impl FnOnce(&mut Report)) {
        f(&mut self.report.lock().unwrap());
    }

    /// Makes an offer with whatever is missing (video, audio, chat channel) or an ICE restart.
    fn offer(&mut self, ice_restart: bool) {
        if self.pending.is_some() {
            return;
        }
        let mut change = self.rtc.sdp_api();
        if self.video_mids.is_empty() {
            let mid = change.add_media(MediaKind::Video, Direction::SendRecv, None, None, None);
            self.video_mids.push(mid);
        }
        if self.audio_mids.is_empty() {
            let mid = change.add_media(MediaKind::Audio, Direction::SendRecv, None, None, None);
            self.audio_mids.push(mid);
        }
        if self.chat_channel.is_none() && !self.have_remote_description {
            self.chat_channel = Some(change.add_channel_with_config(chat_channel_config()));
        }
        if ice_restart {
            change.ice_restart(true);
        }
        if let Some((offer, pending)) = change.apply() {
            self.pending = Some(pending);
            let sdp = offer.to_sdp_string();
            self.send(Signal::Offer(sdp.clone()));
            self.sdp_sent(&sdp);
        }
    }

    /// Remembers the kinds of the candidates inside a remote SDP (for the selected-pair line).
    fn learn_sdp_candidates(&mut self, sdp: &str) {
        for line in sdp.lines().filter_map(|l| l.strip_prefix("a=")) {
            if let Ok(c) = Candidate::from_sdp_string(line.trim()) {
                self.kinds.insert(c.addr(), c.kind());
                self.gather.add_remote_ip(c.addr().ip(), Instant::now());
            }
        }
    }

    /// The m-lines an accepted offer created, known now rather than at their `MediaAdded` events (a re-offer made
    /// right away must not add a second video or audio line).
    fn learn_offered_media(&mut self, sdp: &str) {
        let mut kind = None;
        for line in sdp.lines().map(str::trim) {
            if let Some(m) = line.strip_prefix("m=") {
                kind = m.split_whitespace().next().map(str::to_owned);
            } else if let Some(mid) = line.strip_prefix("a=mid:") {
                let mid = Mid::from(mid);
                let mids = match kind.as_deref() {
                    Some("video") => &mut self.video_mids,
                    Some("audio") => &mut self.audio_mids,
                    _ => continue,
                };
                if self.rtc.media(mid).is_some() && !mids.contains(&mid) {
                    mids.push(mid);
                }
            }
        }
    }

    fn on_offer(&mut self, sdp: &str) {
        self.learn_sdp_candidates(sdp);
        let offer = match SdpOffer::from_sdp_string(sdp) {
            Ok(o) => o,
            Err(e) => return tracing::warn!("peer {}: unreadable offer: {e}", self.cfg.remote_id),
        };
        // Perfect negotiation: on a collision the impolite side ignores the remote offer; the polite side
        // lets it win (accept_offer rolls back our pending offer).
        if self.pending.is_some() && !self.cfg.polite {
            tracing::info!("peer {}: offer collision, ignoring theirs (we are impolite)", self.cfg.remote_id);
            return;
        }
        let rolled_back = self.pending.take().is_some();
        if rolled_back {
            // Our un-negotiated m-lines and channel are gone with the rollback.
            self.video_mids.retain(|m| self.rtc.media(*m).is_some());
            self.audio_mids.retain(|m| self.rtc.media(*m).is_some());
            if !self.chat_open {
                self.chat_channel = None;
            }
        }
        if self.chat_channel.is_none() {
            // The browser's chat channel is pre-negotiated (id 0): declare ours before answering.
            self.chat_channel = Some(self.rtc.direct_api().create_data_channel(chat_channel_config()));
        }
        match self.rtc.sdp_api().accept_offer(offer) {
            Ok(answer) => {
                self.have_remote_description = true;
                let answer = answer.to_sdp_string();
                self.send(Signal::Answer(answer.clone()));
                self.sdp_sent(&answer);
                self.flush_candidates();
                self.learn_offered_media(sdp);
                // Ours were rolled back: offer what the remote offer did not bring.
                if rolled_back && (self.video_mids.is_empty() || self.audio_mids.is_empty()) {
                    self.offer(false);
                }
            }
            Err(e) => tracing::warn!("peer {}: offer refused: {e}", self.cfg.remote_id),
        }
    }

    fn on_answer(&mut self, sdp: &str) {
        self.learn_sdp_candidates(sdp);
        let Some(pending) = self.pending.take() else {
            return tracing::debug!("peer {}: answer without an offer; ignored", self.cfg.remote_id);
        };
        let answer = match SdpAnswer::from_sdp_string(sdp) {
            Ok(a) => a,
            Err(e) => return tracing::warn!("peer {}: unreadable answer: {e}", self.cfg.remote_id),
        };
        match self.rtc.sdp_api().accept_answer(pending, answer) {
            Ok(()) => {
                self.have_remote_description = true;
                self.flush_candidates();
            }
            Err(e) => tracing::warn!("peer {}: answer refused: {e}", self.cfg.remote_id),
        }
    }

    fn on_candidate(&mut self, c: Option<IceCandidate>) {
        let Some(c) = c else { return };
        let line = c.candidate.as_str();
        if line.is_empty() {
            return; // Some browsers signal end-of-candidates this way.
        }
        match Candidate::from_sdp_string(line) {
            Ok(cand) => {
                self.kinds.insert(cand.addr(), cand.kind());
                self.gather.add_remote_ip(cand.addr().ip(), Instant::now());
                if self.have_remote_description {
                    self.rtc.add_remote_candidate(cand);
                } else {
                    self.buffered_candidates.push(cand);
                }
            }
            // mDNS (.local) and TCP candidates from browsers are not usable here.
            Err(e) => tracing::debug!("peer {}: skipping candidate {line:?}: {e}", self.cfg.remote_id),
        }
    }

    fn flush_candidates(&mut self) {
        for c in std::mem::take(&mut self.buffered_candidates) {
            self.rtc.add_remote_candidate(c);
        }
    }

    fn on_chat(&mut self, json: &str) {
        if !self.chat_open {
            return tracing::info!("peer {}: chat channel not open; message dropped", self.cfg.remote_id);
        }
        if let Some(mut ch) = self.chat_channel.and_then(|id| self.rtc.channel(id)) {
            if let Err(e) = ch.write(false, json.as_bytes()) {
                tracing::warn!("peer {}: chat not sent: {e}", self.cfg.remote_id);
            }
        }
    }

    fn send_frame(&mut self, f: &EncodedFrame) {
        if !self.rtc.is_connected() {
            return;
        }
        // Start each receiver on a keyframe: anything before it is undecodable.
        if !self.sent_keyframe && !f.key {
            if let Some(src) = &self.cfg.source {
                src.request_keyframe();
            }
            return;
        }
        if self.write_media(MediaKind::Video, f) {
            self.sent_keyframe = true;
            let len = f.data.len() as u64;
            self.update(|r| {
                r.frames_out += 1;
                r.bytes_out += len;
            });
        }
    }

    fn send_audio(&mut self, f: &EncodedFrame) {
        if self.rtc.is_connected() && self.write_media(MediaKind::Audio, f) {
            self.update(|r| r.audio_out += 1);
        }
    }

    /// Writes one frame to the first sending m-line of `kind` (VP8 at 90 kHz, Opus at 48 kHz); false if none.
    fn write_media(&mut self, kind: MediaKind, f: &EncodedFrame) -> bool {
        let (mids, codec, clock) = match kind {
            MediaKind::Video => (self.video_mids.clone(), Codec::Vp8, Frequency::NINETY_KHZ),
            MediaKind::Audio => (self.audio_mids.clone(), Codec::Opus, Frequency::FORTY_EIGHT_KHZ),
        };
        for mid in mids {
            let sending = self.rtc.media(mid).map(|m| m.direction().is_sending()).unwrap_or(false);
            if !sending {
                continue;
            }
            let Some(writer) = self.rtc.writer(mid) else { continue };
            let Some(pt) = writer.payload_params().find(|p| p.spec().codec == codec).map(|p| p.pt()) else {
                continue;
            };
            return match writer.write(pt, Instant::now(), MediaTime::new(f.rtp_time, clock), f.data.clone()) {
                Ok(()) => true,
                Err(e) => {
                    tracing::debug!("peer {}: {kind:?} frame not sent: {e}", self.cfg.remote_id);
                    false
                }
            };
        }
        false
    }

    fn request_keyframe(&mut self, mid: Mid) {
        if self.last_keyframe_request.is_some_and(|t| t.elapsed() < Duration::from_millis(500)) {
            return;
        }
        if let Some(mut w) = self.rtc.writer(mid) {
            let _ = w.request_keyframe(None, KeyframeRequestKind::Pli);
            self.last_keyframe_request = Some(Instant::now());
        }
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
                                let name = sanitize(&self.cfg.remote_name);
                                let file =
                                    if name.is_empty() { format!("{id}.ivf") } else { format!("{name}-{id}.ivf") };
                                match IvfWriter::create(dir.join(file), w, h) {
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
                let Ok(v) = serde_json::from_slice::<Value>(&d.data) else { return };
                if v["type"] != "chat" {
                    return;
                }
                let text = v["text"].as_str().unwrap_or("");
                let name = v["name"].as_str().filter(|n| !n.is_empty()).unwrap_or(&self.cfg.remote_name);
                self.update(|r| r.chat_in += 1);
                if self.cfg.chat {
                    // Control characters could rewrite the terminal: show them escaped.
                    let clean: String = text
                        .chars()
                        .flat_map(|c| if c.is_control() { c.escape_default().collect::<Vec<_>>() } else { vec![c] })
                        .collect();
                    out(format!("chat {}: {clean}", if name.is_empty() { id.as_str() } else { name }));
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

/// The chat channel as the browser client declares it: label `chat`, negotiated out of band as SCTP stream 0.
fn chat_channel_config() -> ChannelConfig {
    ChannelConfig { label: "chat".into(), ordered: true, negotiated: Some(0), ..Default::default() }
}

/// File-name-safe version of a display name.
fn sanitize(name: &str) -> String {
    name.chars().filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '_').take(32).collect()
}

/// The JSON a chat message travels as (the browser client's format).
pub fn chat_json(text: &str, name: &str) -> String {
    let ts =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0);
    json!({"type": "chat", "text": text, "name": name, "ts": ts}).to_string()
}
