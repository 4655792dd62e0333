//! `webcall peer --sfu` in an SFU room (docs/protocol.md, *SFU rooms*): one str0m session with the server, the
//! reserved peer id `sfu`. The peer offers its own audio and video; the server answers, and offers the other
//! participants' tracks as they come and go (`tracks` maps each m-line to its publisher). The server is impolite,
//! we are polite: a server offer that crosses ours wins, ours is rolled back and made again after our answer.
//!
//! Each other participant gets a [`Report`] of its own (frames, keyframes, bytes, Opus packets) and, with
//! `--record`, its own IVF file. With `--count-only` (the benchmark's subscriber) RTP is counted once the session
//! is up and never handed to str0m: no SRTP decryption, no depacketizing.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use str0m::change::{SdpAnswer, SdpOffer, SdpPendingOffer};
use str0m::format::Codec;
use str0m::media::{Direction, Frequency, KeyframeRequestKind, MediaKind, MediaTime, Mid};
use str0m::net::{Protocol, Receive};
use str0m::{Candidate, Event, Input, Output, Rtc};
use tokio::net::UdpSocket;
use tokio::sync::{broadcast, mpsc};

use crate::media::{vp8_is_keyframe, vp8_keyframe_size, EncodedFrame, IvfWriter, SourceHandle};
use crate::out;
use crate::session::Report;
use webcall_protocol::Signal;

/// One m-line of a server offer that carries another participant's media.
pub use webcall_protocol::SfuTrack as Track;
use webcall_protocol::SFU_PEER;

/// What the controller tells the SFU session.
#[derive(Debug)]
pub enum ToSfu {
    Offer {
        sdp: String,
        tracks: Vec<Track>,
    },
    Answer(String),
    /// A participant's display name (from `welcome`/`hello`), for its report and recording.
    Name {
        id: String,
        name: String,
    },
    Close,
}

/// The session's figures of its own (not per participant).
#[derive(Debug, Default)]
pub struct SfuCounters {
    pub connected: AtomicBool,
    pub closed: AtomicBool,
    /// Video frames and Opus packets written to the server, and the video's payload bytes.
    pub frames_out: AtomicU64,
    pub audio_out: AtomicU64,
    pub bytes_out: AtomicU64,
    /// RTP packets and bytes sent and (all participants together) received.
    pub rtp_out: AtomicU64,
    pub rtp_bytes_out: AtomicU64,
    pub rtp_in: AtomicU64,
    pub rtp_bytes_in: AtomicU64,
}

impl SfuCounters {
    /// One RTP packet of `len` bytes received.
    pub(crate) fn rtp_received(&self, len: usize) {
        self.rtp_in.fetch_add(1, Ordering::Relaxed);
        self.rtp_bytes_in.fetch_add(len as u64, Ordering::Relaxed);
    }
}

/// The controller's handle on the SFU session.
pub struct SfuPeer {
    pub tx: mpsc::UnboundedSender<ToSfu>,
    /// One per participant seen in a server offer, in order of appearance.
    pub reports: Arc<Mutex<Vec<Arc<Mutex<Report>>>>>,
    pub counters: Arc<SfuCounters>,
}

impl SfuPeer {
    pub fn send(&self, m: ToSfu) {
        let _ = self.tx.send(m);
    }

    pub fn reports(&self) -> Vec<Arc<Mutex<Report>>> {
        self.reports.lock().unwrap().clone()
    }

    /// The `stats sfu …` line.
    pub fn stats_line(&self, final_: bool) -> String {
        stats_line(final_, &[&self.counters])
    }
}

/// The `stats sfu …` line of one or more sessions (a Janus participant has a publishing and a subscribing one).
pub fn stats_line(final_: bool, sessions: &[&SfuCounters]) -> String {
    let sum = |f: fn(&SfuCounters) -> &AtomicU64| sessions.iter().map(|c| f(c).load(Ordering::Relaxed)).sum::<u64>();
    let c = SfuCounters {
        connected: AtomicBool::new(sessions.iter().all(|c| c.connected.load(Ordering::Relaxed))),
        closed: AtomicBool::new(false),
        frames_out: AtomicU64::new(sum(|c| &c.frames_out)),
        audio_out: AtomicU64::new(sum(|c| &c.audio_out)),
        bytes_out: AtomicU64::new(sum(|c| &c.bytes_out)),
        rtp_out: AtomicU64::new(sum(|c| &c.rtp_out)),
        rtp_bytes_out: AtomicU64::new(sum(|c| &c.rtp_bytes_out)),
        rtp_in: AtomicU64::new(sum(|c| &c.rtp_in)),
        rtp_bytes_in: AtomicU64::new(sum(|c| &c.rtp_bytes_in)),
    };
    {
        let c = &c;
        format!(
            "stats{} sfu connected={} frames_out={} bytes_out={} audio_out={} rtp_out={} rtp_bytes_out={} rtp_in={} rtp_bytes_in={}",
            if final_ { " final" } else { "" },
            c.connected.load(Ordering::Relaxed),
            c.frames_out.load(Ordering::Relaxed),
            c.bytes_out.load(Ordering::Relaxed),
            c.audio_out.load(Ordering::Relaxed),
            c.rtp_out.load(Ordering::Relaxed),
            c.rtp_bytes_out.load(Ordering::Relaxed),
            c.rtp_in.load(Ordering::Relaxed),
            c.rtp_bytes_in.load(Ordering::Relaxed),
        )
    }
}

pub struct SfuSessionConfig {
    pub local_ips: Vec<IpAddr>,
    pub source: Option<SourceHandle>,
    pub record_dir: Option<PathBuf>,
    pub count_only: bool,
    /// Offer our media first (webcall's SFU); `false`: wait for the server's offer (a Janus subscriber).
    pub offer_first: bool,
    pub names: HashMap<String, String>,
    pub signal: mpsc::UnboundedSender<(String, Signal)>,
}

/// Starts the SFU session on a task of its own and sends its first offer.
pub async fn start(cfg: SfuSessionConfig) -> Result<SfuPeer, crate::PeerError> {
    let (tx, rx) = mpsc::unbounded_channel();
    let reports: Arc<Mutex<Vec<Arc<Mutex<Report>>>>> = Arc::default();
    let counters: Arc<SfuCounters> = Arc::default();
    let offer_first = cfg.offer_first;
    let mut s = Session::new(cfg, reports.clone(), counters.clone()).await?;
    if offer_first {
        s.offer();
    }
    tokio::spawn(s.run(rx));
    Ok(SfuPeer { tx, reports, counters })
}

/// One participant whose media we receive.
struct Remote {
    report: Arc<Mutex<Report>>,
    recorder: Option<IvfWriter>,
    last_keyframe_request: Option<Instant>,
}

struct Session {
    cfg: SfuSessionConfig,
    rtc: Rtc,
    sockets: HashMap<SocketAddr, SendSocket>,
    /// Stops the counting readers' threads (`--count-only`).
    stop_readers: Arc<AtomicBool>,
    udp_rx: mpsc::Receiver<(Vec<u8>, SocketAddr, SocketAddr)>,
    readers: Vec<tokio::task::JoinHandle<()>>,
    pending: Option<SdpPendingOffer>,
    /// Our sending m-lines, once offered.
    video: Option<Mid>,
    audio: Option<Mid>,
    /// mid → publishing participant, from the server's last offer.
    mapping: HashMap<Mid, String>,
    remotes: HashMap<String, Remote>,
    reports: Arc<Mutex<Vec<Arc<Mutex<Report>>>>>,
    counters: Arc<SfuCounters>,
    connected: bool,
    sent_keyframe: bool,
}

impl Session {
    async fn new(
        cfg: SfuSessionConfig,
        reports: Arc<Mutex<Vec<Arc<Mutex<Report>>>>>,
        counters: Arc<SfuCounters>,
    ) -> Result<Session, crate::PeerError> {
        let mut rtc = crate::rtc::new_rtc(None).await;
        let (udp_tx, udp_rx) = mpsc::channel(1024);
        let stop_readers = Arc::new(AtomicBool::new(false));
        let (bound, readers): (Vec<(SocketAddr, SendSocket)>, _) = if cfg.count_only {
            let b = crate::rtc::bind_udp_counting(&cfg.local_ips, udp_tx, counters.clone(), stop_readers.clone())?;
            (b.into_iter().map(|(a, s)| (a, SendSocket::Plain(s))).collect(), Vec::new())
        } else {
            let (b, r) = crate::rtc::bind_udp(&cfg.local_ips, udp_tx).await?;
            (b.into_iter().map(|(a, s)| (a, SendSocket::Tokio(s))).collect(), r)
        };
        for (local, _) in &bound {
            match Candidate::host(*local, "udp") {
                Ok(c) => {
                    rtc.add_local_candidate(c);
                }
                Err(e) => tracing::warn!("no host candidate for {local}: {e}"),
            }
        }
        let sockets = bound.into_iter().collect();
        Ok(Session {
            cfg,
            rtc,
            sockets,
            stop_readers,
            udp_rx,
            readers,
            pending: None,
            video: None,
            audio: None,
            mapping: HashMap::new(),
            remotes: HashMap::new(),
            reports,
            counters,
            connected: false,
            sent_keyframe: false,
        })
    }

    fn send(&self, m: Signal) {
        let _ = self.cfg.signal.send((SFU_PEER.to_owned(), m));
    }

    /// Offers our audio and video (sendonly with a source, recvonly without) unless already negotiated.
    fn offer(&mut self) {
        if !self.cfg.offer_first || self.pending.is_some() || (self.video.is_some() && self.audio.is_some()) {
            return;
        }
        let dir = if self.cfg.source.is_some() { Direction::SendOnly } else { Direction::RecvOnly };
        let mut change = self.rtc.sdp_api();
        let (mut video, mut audio) = (None, None);
        if self.video.is_none() {
            video = Some(change.add_media(MediaKind::Video, dir, None, None, None));
        }
        if self.audio.is_none() && self.cfg.source.as_ref().is_none_or(|s| s.audio.is_some()) {
            audio = Some(change.add_media(MediaKind::Audio, dir, None, None, None));
        }
        if let Some((offer, pending)) = change.apply() {
            self.pending = Some(pending);
            self.video = self.video.or(video);
            self.audio = self.audio.or(audio);
            self.send(Signal::Offer(offer.to_sdp_string()));
        }
    }

    fn on_offer(&mut self, sdp: &str, tracks: Vec<Track>) {
        let offer = match SdpOffer::from_sdp_string(sdp) {
            Ok(o) => o,
            Err(e) => return tracing::warn!("sfu: unreadable offer: {e}"),
        };
        // Polite: the server's offer wins over ours, which is rolled back and made again below.
        let rolled_back = self.pending.take().is_some();
        if rolled_back {
            self.video = self.video.filter(|m| self.rtc.media(*m).is_some());
            self.audio = self.audio.filter(|m| self.rtc.media(*m).is_some());
        }
        match self.rtc.sdp_api().accept_offer(offer) {
            Ok(answer) => self.send(Signal::Answer(answer.to_sdp_string())),
            Err(e) => return tracing::warn!("sfu: offer refused: {e}"),
        }
        self.mapping = tracks.iter().map(|t| (Mid::from(t.mid.as_str()), t.peer.clone())).collect();
        for t in tracks {
            self.remote(&t.peer);
        }
        self.mark_connected();
        if rolled_back {
            self.offer();
        }
    }

    fn on_answer(&mut self, sdp: &str) {
        let Some(pending) = self.pending.take() else {
            return tracing::debug!("sfu: answer without an offer; ignored");
        };
        match SdpAnswer::from_sdp_string(sdp) {
            Ok(a) => {
                if let Err(e) = self.rtc.sdp_api().accept_answer(pending, a) {
                    tracing::warn!("sfu: answer refused: {e}");
                }
            }
            Err(e) => tracing::warn!("sfu: unreadable answer: {e}"),
        }
    }

    /// The participant's state, made on first sight.
    fn remote(&mut self, peer: &str) -> &mut Remote {
        if !self.remotes.contains_key(peer) {
            let name = self.cfg.names.get(peer).cloned().unwrap_or_default();
            let report = Arc::new(Mutex::new(Report { id: peer.to_owned(), name, ..Default::default() }));
            self.reports.lock().unwrap().push(report.clone());
            out(format!("peer {peer} via sfu"));
            self.remotes.insert(peer.to_owned(), Remote { report, recorder: None, last_keyframe_request: None });
        }
        self.remotes.get_mut(peer).expect("just made")
    }

    /// Participants we receive count as connected once the session with the server is up.
    fn mark_connected(&mut self) {
        if !self.connected {
            return;
        }
        for (id, r) in &self.remotes {
            let mut rep = r.report.lock().unwrap();
            if !rep.connected {
                rep.connected = true;
                rep.ice = "connected".into();
                rep.pair = Some("sfu".into());
                out(format!("peer {id} connected (sfu)"));
            }
        }
    }

    fn send_frame(&mut self, f: &EncodedFrame, kind: MediaKind) {
        if !self.connected {
            return;
        }
        if kind == MediaKind::Video && !self.sent_keyframe {
            if !f.key {
                if let Some(src) = &self.cfg.source {
                    src.request_keyframe();
                }
                return;
            }
            self.sent_keyframe = true;
        }
        let (mid, codec, clock) = match kind {
            MediaKind::Video => (self.video, Codec::Vp8, Frequency::NINETY_KHZ),
            MediaKind::Audio => (self.audio, Codec::Opus, Frequency::FORTY_EIGHT_KHZ),
        };
        let Some(mid) = mid else { return };
        if !self.rtc.media(mid).is_some_and(|m| m.direction().is_sending()) {
            return;
        }
        let Some(writer) = self.rtc.writer(mid) else { return };
        let Some(pt) = writer.payload_params().find(|p| p.spec().codec == codec).map(|p| p.pt()) else { return };
        match writer.write(pt, Instant::now(), MediaTime::new(f.rtp_time, clock), f.data.clone()) {
            Ok(()) => {
                let c = if kind == MediaKind::Video { &self.counters.frames_out } else { &self.counters.audio_out };
                c.fetch_add(1, Ordering::Relaxed);
                // Every participant gets what we publish: their reports count it as sent to them.
                if kind == MediaKind::Video {
                    let len = f.data.len() as u64;
                    self.counters.bytes_out.fetch_add(len, Ordering::Relaxed);
                    for r in self.remotes.values() {
                        let mut rep = r.report.lock().unwrap();
                        rep.frames_out += 1;
                        rep.bytes_out += len;
                    }
                }
            }
            Err(e) => tracing::debug!("sfu: {kind:?} frame not sent: {e}"),
        }
    }

    fn on_event(&mut self, e: Event) {
        match e {
            Event::IceConnectionStateChange(s) => out(format!("sfu ice {}", format!("{s:?}").to_lowercase())),
            Event::Connected => {
                out("sfu connected");
                self.connected = true;
                self.counters.connected.store(true, Ordering::Relaxed);
                self.mark_connected();
                if let Some(src) = &self.cfg.source {
                    src.request_keyframe();
                }
            }
            Event::MediaData(d) => {
                let Some(peer) = self.mapping.get(&d.mid).cloned() else { return };
                let record_dir = self.cfg.record_dir.clone();
                let codec = d.params.spec().codec;
                let mut want_keyframe = false;
                {
                    let r = self.remote(&peer);
                    if codec == Codec::Opus {
                        r.report.lock().unwrap().audio_in += 1;
                        return;
                    }
                    if codec != Codec::Vp8 {
                        return;
                    }
                    let key = vp8_is_keyframe(&d.data);
                    {
                        let mut rep = r.report.lock().unwrap();
                        rep.frames_in += 1;
                        rep.bytes_in += d.data.len() as u64;
                        rep.keyframes_in += key as u64;
                    }
                    want_keyframe |= !d.contiguous;
                    if let (Some(dir), None) = (&record_dir, &r.recorder) {
                        match vp8_keyframe_size(&d.data) {
                            Some((w, h)) => {
                                let name = crate::rtc::sanitize(&r.report.lock().unwrap().name);
                                let stem = if name.is_empty() { peer.clone() } else { format!("{name}-{peer}") };
                                // A peer-to-peer recording of this peer (auto room) keeps its own file.
                                match IvfWriter::create_new(dir, &stem, "sfu", w, h) {
                                    Ok(wr) => {
                                        out(format!("peer {peer} recording {w}x{h} to {}", wr.path.display()));
                                        r.report.lock().unwrap().recording = Some(wr.path.clone());
                                        r.recorder = Some(wr);
                                    }
                                    Err(e) => tracing::error!("{e}"),
                                }
                            }
                            None => want_keyframe = true,
                        }
                    }
                    if let Some(wr) = &mut r.recorder {
                        if let Err(e) = wr.write(d.time.rebase(Frequency::NINETY_KHZ).numer(), &d.data) {
                            tracing::error!("{e}");
                            r.recorder = None;
                        }
                    }
                    if want_keyframe
                        && r.last_keyframe_request.is_some_and(|t| t.elapsed() < Duration::from_millis(500))
                    {
                        want_keyframe = false;
                    }
                    if want_keyframe {
                        r.last_keyframe_request = Some(Instant::now());
                    }
                }
                if want_keyframe {
                    if let Some(mut w) = self.rtc.writer(d.mid) {
                        let _ = w.request_keyframe(None, KeyframeRequestKind::Pli);
                    }
                }
            }
            Event::KeyframeRequest(_) => {
                if let Some(src) = &self.cfg.source {
                    src.request_keyframe();
                }
            }
            _ => {}
        }
    }

    fn drive(&mut self) -> Instant {
        loop {
            match self.rtc.poll_output() {
                Ok(Output::Timeout(t)) => return t,
                Ok(Output::Transmit(t)) => {
                    if is_rtp(&t.contents) {
                        self.counters.rtp_out.fetch_add(1, Ordering::Relaxed);
                        self.counters.rtp_bytes_out.fetch_add(t.contents.len() as u64, Ordering::Relaxed);
                    }
                    if let Some(sock) = self.sockets.get(&t.source) {
                        // UDP is lossy anyway; a full buffer drops the packet like the network would.
                        let _ = sock.try_send_to(&t.contents, t.destination);
                    }
                }
                Ok(Output::Event(e)) => self.on_event(e),
                Err(e) => {
                    tracing::warn!("sfu: session failed: {e}");
                    self.rtc.disconnect();
                    return Instant::now() + Duration::from_secs(1);
                }
            }
        }
    }

    async fn run(mut self, mut cmds: mpsc::UnboundedReceiver<ToSfu>) {
        let mut video: Option<broadcast::Receiver<Arc<EncodedFrame>>> =
            self.cfg.source.as_ref().map(|s| s.video.subscribe());
        let mut audio: Option<broadcast::Receiver<Arc<EncodedFrame>>> =
            self.cfg.source.as_ref().and_then(|s| s.audio.as_ref()).map(|a| a.subscribe());
        loop {
            let wake = self.drive().min(Instant::now() + Duration::from_millis(500));
            if !self.rtc.is_alive() {
                out("sfu session ended");
                break;
            }
            tokio::select! {
                cmd = cmds.recv() => match cmd {
                    Some(ToSfu::Offer { sdp, tracks }) => self.on_offer(&sdp, tracks),
                    Some(ToSfu::Answer(sdp)) => self.on_answer(&sdp),
                    Some(ToSfu::Name { id, name }) => {
                        if let Some(r) = self.remotes.get(&id) {
                            r.report.lock().unwrap().name = name.clone();
                        }
                        self.cfg.names.insert(id, name);
                    }
                    Some(ToSfu::Close) | None => break,
                },
                Some((buf, source, destination)) = self.udp_rx.recv() => {
                    if is_rtp(&buf) {
                        self.counters.rtp_received(buf.len());
                        // The benchmark's subscriber: RTP is counted, not decrypted (the rest, STUN/DTLS/RTCP, goes
                        // on). Its reader counts on its own once connected; this is what it queued before.
                        if self.cfg.count_only && self.connected {
                            continue;
                        }
                    }
                    if let Ok(contents) = buf.as_slice().try_into() {
                        let input = Input::Receive(Instant::now(), Receive { proto: Protocol::Udp, source, destination, contents });
                        if let Err(e) = self.rtc.handle_input(input) {
                            tracing::debug!("sfu: input refused: {e}");
                        }
                    }
                }
                f = async { match video.as_mut() { Some(r) => r.recv().await, None => std::future::pending().await } } => {
                    match f {
                        Ok(f) => self.send_frame(&f, MediaKind::Video),
                        Err(broadcast::error::RecvError::Lagged(_)) => {}
                        Err(broadcast::error::RecvError::Closed) => video = None,
                    }
                }
                f = async { match audio.as_mut() { Some(r) => r.recv().await, None => std::future::pending().await } } => {
                    match f {
                        Ok(f) => self.send_frame(&f, MediaKind::Audio),
                        Err(broadcast::error::RecvError::Lagged(_)) => {}
                        Err(broadcast::error::RecvError::Closed) => audio = None,
                    }
                }
                _ = tokio::time::sleep_until(wake.into()) => {
                    let _ = self.rtc.handle_input(Input::Timeout(Instant::now()));
                }
            }
        }
        for r in &self.readers {
            r.abort();
        }
        self.stop_readers.store(true, Ordering::Relaxed);
        for (id, r) in &mut self.remotes {
            if let Some(mut wr) = r.recorder.take() {
                if let Err(e) = wr.finish() {
                    tracing::error!("{e}");
                }
                out(format!("peer {id} recorded {} frames to {}", wr.frames, wr.path.display()));
            }
            r.report.lock().unwrap().closed = true;
        }
        self.rtc.disconnect();
        self.counters.closed.store(true, Ordering::Relaxed);
    }
}

/// A session's socket for sending: tokio's, or the counting subscriber's plain one (read by a thread, see
/// [`crate::rtc::bind_udp_counting`]).
enum SendSocket {
    Tokio(Arc<UdpSocket>),
    Plain(Arc<std::net::UdpSocket>),
}

impl SendSocket {
    fn try_send_to(&self, data: &[u8], to: SocketAddr) -> std::io::Result<usize> {
        match self {
            SendSocket::Tokio(s) => s.try_send_to(data, to),
            SendSocket::Plain(s) => s.send_to(data, to),
        }
    }
}

/// RTP, not RTCP (RFC 7983 first byte 128-191; RFC 5761 RTCP packet types 192-223 in the second byte).
pub(crate) fn is_rtp(d: &[u8]) -> bool {
    d.len() >= 12 && (128..=191).contains(&d[0]) && !(192..=223).contains(&d[1])
}
