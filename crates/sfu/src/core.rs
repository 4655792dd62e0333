//! The SFU core: one str0m `Rtc` per participant session, no I/O. Datagrams, signaling and time go in;
//! datagrams, events and the next timeout come out of [`Sfu::poll_output`].

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use str0m::bwe::{Bitrate, BweKind};
use str0m::change::{SdpAnswer, SdpOffer, SdpPendingOffer};
use str0m::config::DtlsCert;
use str0m::format::{Codec, CodecExtra, H264CodecExtra, PayloadParams, Vp8CodecExtra};
use str0m::ice::{IceCreds, StunMessage};
use str0m::media::{Direction, KeyframeRequestKind, MediaData, MediaKind, Mid, Pt, Rid};
use str0m::net::{Protocol, Receive, TcpType};
use str0m::rtp::{ExtensionValues, RtpPacket, RtpWrite, Ssrc, Vp8Descriptor};
use str0m::{Candidate, Event, IceConnectionState, Input, Output, Rtc, RtcError};

use crate::record::{RecordOp, Recorder, Want};
use crate::rtp::{h264_starts_keyframe, vp8_descriptor_len, H264Frames, PacketIn, Rewriter, Vp8Frames};

/// A participant's session with the SFU (one peer connection).
pub type SessionId = u64;

/// Self-made keyframe requests (on loss) are sent at most this often per published track.
const KEYFRAME_THROTTLE: Duration = Duration::from_millis(500);
/// Source addresses remembered per session for routing (the oldest is forgotten past this).
const MAX_ADDRS_PER_SESSION: usize = 8;
/// With no session, the caller is still asked back this often (so it never sleeps forever).
const IDLE_TIMEOUT: Duration = Duration::from_secs(1);
/// Layer choice, active speaker and caps are revisited this often.
const TICK: Duration = Duration::from_millis(250);
/// A simulcast layer nothing arrived on for this long is gone (the browser stopped sending it: CPU, bandwidth).
const LAYER_GONE: Duration = Duration::from_millis(1500);
/// Bitrates are measured over windows of this length.
const RATE_WINDOW: Duration = Duration::from_secs(1);
/// A layer is good enough for a tile when it is at least this fraction of the tile's size (in either dimension).
const LAYER_FIT: f64 = 0.8;
/// Audio louder than this (dBov, RFC 6464) counts as sound.
const SPEECH_DBOV: i8 = -50;
/// Time constant of the smoothed share of sound per audio track.
const SPEECH_SMOOTHING: Duration = Duration::from_millis(800);
/// A smoothed share of sound below this is silence.
const SPEECH_MIN: f64 = 0.2;
/// A new loudest participant becomes the active speaker after staying loudest this long (no flapping).
const SPEAKER_HOLD: Duration = Duration::from_millis(1000);
/// How often a capped publisher is reminded of its allowance (REMB).
const REMB_INTERVAL: Duration = Duration::from_secs(1);
/// Estimated bitrate of an audio track, kept out of a subscriber's video budget.
const AUDIO_BITRATE: u64 = 40_000;
/// After congestion, layers stay within the estimate this long before trying higher ones.
const BWE_HOLD: Duration = Duration::from_secs(8);
/// The subscribers' send-side bandwidth estimate starts here (TWCC then finds the real figure).
const INITIAL_ESTIMATE: Bitrate = Bitrate::kbps(1500);
/// A timeout due this close is run at once, inside one drive: str0m asks for one as soon as packets are written to
/// a send stream (and upstream's pacer after every packet; vendor/str0m's patch refreshes it inside the poll).
const PACER_STEP: Duration = Duration::from_micros(1);
/// How late str0m's periodic bookkeeping may run: the delay controller of the bandwidth estimate (~30 times a second
/// per subscriber), TWCC and RTCP reports, ICE consent, stats. Such a timer waits for the next wake-up that a
/// datagram causes anyway (about every 10 ms while media flows) instead of waking the thread by itself: at fan-out
/// they were half the wake-ups. Timers that pace media, request retransmissions or drive DTLS are not delayed, but
/// str0m names only the soonest timer's reason: one due within this slack after a lazy one may run up to this late.
const LAZY_SLACK: Duration = Duration::from_millis(10);

fn lazy_slack(reason: str0m::Reason) -> Duration {
    use str0m::Reason as R;
    match reason {
        R::Feedback
        | R::Twcc
        | R::Stats
        | R::Ice
        | R::PauseCheck
        | R::BweDelayControl
        | R::BweProbeEstimator
        | R::BweProbeControl => LAZY_SLACK,
        _ => Duration::ZERO,
    }
}
/// At most this many such timeouts per drive (the rest on the adapter's next wake-up): one busy session does not
/// hold up the others for long.
const MAX_STEPS_PER_DRIVE: usize = 1024;

#[derive(Debug, thiserror::Error)]
pub enum SfuError {
    #[error("no SFU session {0}: it was closed or never existed; join again")]
    UnknownSession(SessionId),
    #[error("unreadable SDP ({0}); send the SDP of createOffer/createAnswer unchanged")]
    BadSdp(String),
    #[error("SDP refused: {0}")]
    Refused(#[from] RtcError),
    #[error("an answer while the server had no offer outstanding; ignored")]
    NoPendingOffer,
    #[error("unreadable ICE candidate ({0})")]
    BadCandidate(String),
    #[error("no video m-line '{0}' from the SFU in this session; use a mid of the server's offer 'tracks'")]
    UnknownTrack(String),
}

/// How the core is set up.
#[derive(Debug, Clone)]
pub struct SfuConfig {
    /// The addresses put into every session's SDP as host candidates (the media socket, as clients reach it).
    pub host_candidates: Vec<SocketAddr>,
    /// One DTLS certificate for all sessions (generating one per session costs ~50 ms of CPU).
    pub dtls_cert: Option<DtlsCert>,
    pub caps: Caps,
    /// Lower the layers a subscriber gets when its send-side bandwidth estimate (TWCC) falls below what it is
    /// sent. On by default; the simulated links of the core's tests turn it off (their stepped clock looks like
    /// queueing to the estimator).
    pub follow_bwe: bool,
}

impl Default for SfuConfig {
    fn default() -> Self {
        SfuConfig { host_candidates: Vec::new(), dtls_cert: None, caps: Caps::default(), follow_bwe: true }
    }
}

/// Limits on what publishers send. A track over a track cap is not forwarded (its publisher is told nothing
/// else: it still works for the others); publishers over a bitrate cap are asked to slow down (REMB), never
/// dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caps {
    /// Published tracks (audio and video) on the whole server.
    pub max_tracks: usize,
    /// Published tracks in one room.
    pub max_room_tracks: usize,
    /// Incoming media bitrate (bit/s) on the whole server.
    pub max_bitrate: u64,
    /// Incoming media bitrate (bit/s) in one room.
    pub max_room_bitrate: u64,
}

impl Default for Caps {
    fn default() -> Self {
        Caps { max_tracks: 10_000, max_room_tracks: 250, max_bitrate: 1_000_000_000, max_room_bitrate: 100_000_000 }
    }
}

/// How a subscriber's page shows one video track: the tile's size in CSS pixels times the device pixel ratio;
/// 0×0 when it is not shown (hidden, on another page, tab minimised).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct View {
    pub width: u32,
    pub height: u32,
}

impl View {
    pub const HIDDEN: View = View { width: 0, height: 0 };
    pub fn is_hidden(&self) -> bool {
        self.width == 0 || self.height == 0
    }
}

/// What a session does in its room.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum SessionRole {
    /// A page: publishes, and gets every other participant's tracks by server offers.
    #[default]
    Participant,
    /// Publishes only and is never offered others' tracks (WHIP: its client cannot renegotiate).
    Publisher,
    /// Receives only, on the m-lines of its own offer (WHEP: no renegotiation either): the audio and video of
    /// `source`, or, without one, of the room's first publisher; rebound when that one leaves.
    Viewer { source: Option<Arc<str>> },
}

/// One track a session receives from the SFU: which participant it comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrackInfo {
    /// The `mid` of the m-line in the session's SDP.
    pub mid: String,
    /// The publishing participant (the id the caller gave [`Sfu::add_session`]).
    pub participant: Arc<str>,
    pub kind: MediaKind,
    /// The `mid` of the track in the publisher's own session (which of its tracks this is: camera or screen).
    pub origin_mid: String,
}

/// Something the caller must act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SfuEvent {
    /// Send this offer to the session's client (server-driven renegotiation); `tracks` is the full mapping of
    /// the session's receive m-lines to publishers after this offer.
    Offer { session: SessionId, sdp: String, tracks: Vec<TrackInfo> },
    /// ICE and DTLS are up for this session.
    Connected { session: SessionId },
    /// The session died (ICE timed out, DTLS failed, bad input); it is gone from the core.
    Closed { session: SessionId },
    /// The room of `session` has a new active speaker (debounced); sent to every session of the room.
    ActiveSpeaker { session: SessionId, participant: Arc<str> },
}

/// A datagram to send from the media socket.
#[derive(Debug, Clone)]
pub struct Transmit {
    /// UDP, or TCP (ICE-TCP, RFC 6544): the adapter sends on the connection from `destination`.
    pub proto: Protocol,
    pub source: SocketAddr,
    pub destination: SocketAddr,
    pub contents: Vec<u8>,
}

#[derive(Debug)]
pub enum SfuOutput {
    Transmit(Transmit),
    Event(SfuEvent),
    /// Nothing more to do until this time (or the next input); then call [`Sfu::handle_timeout`].
    Timeout(Instant),
}

/// Running totals, for `/metrics`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SfuStats {
    pub sessions: u64,
    pub tracks: u64,
    /// Media frames written to subscribers (as RTP packets, rewritten per subscriber, not packetized again).
    pub forwarded_frames: u64,
    pub forwarded_bytes: u64,
    /// Keyframe requests sent to publishers (forwarded PLI/FIR, and the SFU's own on loss or a new subscriber).
    pub keyframe_requests: u64,
    /// Datagrams from addresses/ufrags no session knows; dropped.
    pub unrouted_datagrams: u64,
    /// Simulcast layer switches of a subscriber's track (each on a keyframe of the new layer).
    pub layer_switches: u64,
    /// Tracks not forwarded because a track cap was reached.
    pub refused_tracks: u64,
    /// REMB messages sent to publishers over a bitrate cap.
    pub remb_sent: u64,
    /// str0m session timeouts run: timers that fell due, and the one str0m asks for after packets are written.
    /// Per forwarded packet, the figure the forwarding cost follows (vendor/str0m/PATCHES.md).
    pub session_timeouts: u64,
    /// Rooms being recorded, and files open.
    pub recording_rooms: u64,
    pub recording_files: u64,
}

/// Bits per second over windows of [`RATE_WINDOW`].
#[derive(Debug, Clone, Copy)]
struct Rate {
    start: Instant,
    bytes: u64,
    bps: u64,
}

impl Rate {
    fn new(now: Instant) -> Rate {
        Rate { start: now, bytes: 0, bps: 0 }
    }
    fn add(&mut self, now: Instant, bytes: usize) {
        self.roll(now);
        self.bytes += bytes as u64;
    }
    fn roll(&mut self, now: Instant) {
        let el = now.saturating_duration_since(self.start);
        if el >= RATE_WINDOW {
            // A window after a long gap counts the gap too (rate falls to what it was over the whole time).
            self.bps = (self.bytes * 8 * 1000) / (el.as_millis().max(1) as u64);
            self.bytes = 0;
            self.start = now;
        }
    }
    fn bps(&mut self, now: Instant) -> u64 {
        self.roll(now);
        self.bps
    }
    /// The last full window's rate, or less when nothing came for longer than a window.
    fn peek(&self, now: Instant) -> u64 {
        let el = now.saturating_duration_since(self.start);
        if el >= RATE_WINDOW * 2 {
            (self.bytes * 8 * 1000) / (el.as_millis().max(1) as u64)
        } else {
            self.bps
        }
    }
}

/// Layer choice of one subscriber track: its index in `tracks_out`, the publisher's live layers smallest first as
/// (rid, bit/s), and the index of the chosen one (`None`: nothing).
type Plan = (usize, Vec<(Option<Rid>, u64)>, Option<usize>);

/// One simulcast layer of a published video track (or the only one: rid `None`).
#[derive(Debug)]
struct Layer {
    rid: Option<Rid>,
    /// Frame size from the last VP8 keyframe of this layer (0 until one came).
    width: u32,
    height: u32,
    rate: Rate,
    last_seen: Instant,
    last_keyframe_request: Option<Instant>,
    /// The highest sequence number received: a skipped one is a loss.
    last_seq: Option<u64>,
}

/// The smoothed share of time a publisher's audio carries sound.
#[derive(Debug, Clone, Copy)]
struct Loudness {
    share: f64,
    last: Option<Instant>,
}

impl Loudness {
    fn add(&mut self, now: Instant, level: i8) {
        let sound = if level > SPEECH_DBOV { 1.0 } else { 0.0 };
        let dt = self.last.map_or(Duration::ZERO, |l| now.saturating_duration_since(l));
        let a = 1.0 - (-dt.as_secs_f64() / SPEECH_SMOOTHING.as_secs_f64()).exp();
        // The first packet after a gap weighs like the whole gap (the gap was silence, as far as we know).
        let a = if self.last.is_none() { 0.05 } else { a.clamp(0.01, 1.0) };
        self.share += a * (sound - self.share);
        self.last = Some(now);
    }
    fn share(&self, now: Instant) -> f64 {
        match self.last {
            // No packet for a while (DTX, muted without sending): decays as silence.
            Some(l) => {
                let dt = now.saturating_duration_since(l).saturating_sub(Duration::from_millis(200));
                self.share * (-dt.as_secs_f64() / SPEECH_SMOOTHING.as_secs_f64()).exp()
            }
            None => 0.0,
        }
    }
}

#[derive(Debug)]
struct TrackIn {
    mid: Mid,
    kind: MediaKind,
    last_keyframe_request: Option<Instant>,
    /// Video: the layers seen so far, in no order.
    layers: Vec<Layer>,
    loudness: Loudness,
    /// The allowance last sent by REMB (over a bitrate cap), and when.
    capped: Option<(u64, Instant)>,
    /// Its file while the room is recorded.
    recorder: Option<Box<Recorder>>,
    /// While recorded: frames put together from each layer's packets.
    frames: Vec<(Option<Rid>, Reassembly)>,
}

/// Whole frames from RTP packets, for the recorder.
#[derive(Debug)]
enum Reassembly {
    Vp8(Vp8Frames),
    H264(H264Frames),
    /// Opus: a packet is a frame.
    Whole,
}

impl TrackIn {
    fn new(mid: Mid, kind: MediaKind) -> TrackIn {
        TrackIn {
            mid,
            kind,
            last_keyframe_request: None,
            layers: Vec::new(),
            loudness: Loudness { share: 0.0, last: None },
            capped: None,
            recorder: None,
            frames: Vec::new(),
        }
    }
    fn bps(&mut self, now: Instant) -> u64 {
        self.layers.iter_mut().map(|l| l.rate.bps(now)).sum()
    }
}

/// What a subscriber's track is fed from: which layer, and how its numbering continues across switches.
#[derive(Debug)]
struct Feed {
    /// The page's view of this track (`None`: not reported; the best layer the bandwidth allows is sent).
    view: Option<View>,
    /// The layer wanted; forwarding moves to it on its next keyframe.
    target: Option<Option<Rid>>,
    /// Sequence numbers, timestamps and VP8 picture ids of the subscriber's stream; its current layer is the one
    /// being forwarded (`None`: nothing).
    rw: Rewriter<Option<Rid>>,
}

impl Feed {
    fn new(kind: MediaKind) -> Feed {
        let clock = if kind == MediaKind::Audio { 48_000 } else { 90_000 };
        Feed { view: None, target: None, rw: Rewriter::new(clock) }
    }

    /// The layer being forwarded (`None`: nothing).
    fn current(&self) -> Option<Option<Rid>> {
        self.rw.current()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OutState {
    ToOpen,
    Negotiating(Mid),
    Open(Mid),
    ToStop(Mid),
    NegotiatingStop(Mid),
}

#[derive(Debug)]
struct TrackOut {
    origin: SessionId,
    origin_mid: Mid,
    participant: Arc<str>,
    kind: MediaKind,
    state: OutState,
    feed: Feed,
    /// Its send stream, once set up unpaced (see [`Sfu::forward`]): found by a hash lookup from then on,
    /// where a lookup by mid walks every send stream of the session for each forwarded packet.
    ssrc: Option<Ssrc>,
    /// The publisher's payload type and the subscriber's for the same codec, last looked up.
    pt: Option<(Pt, Pt)>,
}

impl TrackOut {
    fn new(origin: SessionId, origin_mid: Mid, participant: Arc<str>, kind: MediaKind) -> TrackOut {
        TrackOut {
            origin,
            origin_mid,
            participant,
            kind,
            state: OutState::ToOpen,
            feed: Feed::new(kind),
            ssrc: None,
            pt: None,
        }
    }
}

impl TrackOut {
    fn mid(&self) -> Option<Mid> {
        match self.state {
            OutState::ToOpen => None,
            OutState::Negotiating(m) | OutState::Open(m) | OutState::ToStop(m) | OutState::NegotiatingStop(m) => {
                Some(m)
            }
        }
    }
}

struct Session {
    room: Arc<str>,
    participant: Arc<str>,
    role: SessionRole,
    /// Viewers: the m-lines of their offer the SFU sends on.
    slots: Vec<(Mid, MediaKind)>,
    rtc: Rtc,
    ufrag: String,
    pending: Option<SdpPendingOffer>,
    /// The first offer/answer is done: from then on the server may offer.
    negotiated: bool,
    tracks_in: Vec<TrackIn>,
    tracks_out: Vec<TrackOut>,
    addrs: Vec<SocketAddr>,
    /// When str0m's next timer is due, and the latest it may run ([`lazy_slack`]).
    timeout: Instant,
    latest: Instant,
    dirty: bool,
    /// The send-side bandwidth estimate towards this client (TWCC), bit/s.
    estimate: Option<u64>,
    /// After congestion (the estimate fell below what was sent), the video budget, until when.
    ceiling: Option<(u64, Instant)>,
    /// Published m-lines not forwarded (over a track cap).
    refused: Vec<Mid>,
    /// Viewers: the numbering of m-lines whose publisher went away, continued by the next one bound to them.
    numbering: Vec<(Mid, Rewriter<Option<Rid>>)>,
}

/// A room's active speaker, and the one that may take over.
#[derive(Debug, Default)]
struct Speaker {
    current: Option<SessionId>,
    candidate: Option<(SessionId, Instant)>,
}

/// What one session's output means for the others.
#[allow(clippy::large_enum_variant)] // short-lived, in a Vec drained at once
enum Propagate {
    TrackOpen {
        mid: Mid,
        kind: MediaKind,
    },
    Rtp(Incoming),
    /// Layers of this track changed (a new one, a size known, one gone): subscribers choose again.
    Layers,
    Keyframe {
        origin: SessionId,
        mid: Mid,
        rid: Option<Rid>,
        kind: KeyframeRequestKind,
    },
}

/// A received RTP packet and what the per-subscriber path needs of it (parsed once).
struct Incoming {
    mid: Mid,
    rid: Option<Rid>,
    params: PayloadParams,
    packet: RtpPacket,
    keyframe_start: bool,
    vp8: Option<Vp8Descriptor>,
}

/// The SFU core. See the module documentation.
pub struct Sfu {
    cfg: SfuConfig,
    /// Keyed by ids the core hands out (not by anything a client chooses): a fast hash for the per-packet lookups.
    sessions: HashMap<SessionId, Session, rustc_hash::FxBuildHasher>,
    rooms: HashMap<Arc<str>, Vec<SessionId>>,
    by_ufrag: HashMap<String, SessionId>,
    by_addr: HashMap<SocketAddr, SessionId>,
    /// Passive ICE-TCP host candidates (RFC 6544), set by the adapter when it listens on TCP.
    tcp_candidates: Vec<SocketAddr>,
    next_id: SessionId,
    dirty: Vec<SessionId>,
    out: VecDeque<SfuOutput>,
    now: Instant,
    stats: SfuStats,
    next_tick: Instant,
    /// The soonest timer (sessions' or the tick) as of the last [`Sfu::poll_output`].
    due_at: Instant,
    /// The active speaker per room: announced to the pages (`speaker`), followed by WHEP viewers.
    floor: HashMap<Arc<str>, Speaker>,
    /// Rooms being recorded (see [`Sfu::start_recording`]).
    recording: HashSet<Arc<str>>,
    record_out: VecDeque<RecordOp>,
    next_file: u64,
    /// What a drive passes on to the other sessions, kept between drives (one allocation, not one per packet).
    props: Vec<Propagate>,
}

impl Sfu {
    pub fn new(cfg: SfuConfig, now: Instant) -> Self {
        Sfu {
            cfg,
            sessions: HashMap::default(),
            rooms: HashMap::new(),
            by_ufrag: HashMap::new(),
            by_addr: HashMap::new(),
            tcp_candidates: Vec::new(),
            next_id: 1,
            dirty: Vec::new(),
            out: VecDeque::new(),
            now,
            stats: SfuStats::default(),
            next_tick: now + TICK,
            due_at: now + TICK,
            floor: HashMap::new(),
            recording: HashSet::new(),
            record_out: VecDeque::new(),
            next_file: 1,
            props: Vec::new(),
        }
    }

    /// Every later session also offers these passive TCP host candidates (RFC 6544; RFC 4571 framing is the
    /// adapter's business).
    pub fn set_tcp_candidates(&mut self, addrs: Vec<SocketAddr>) {
        self.tcp_candidates = addrs;
    }

    pub fn stats(&self) -> SfuStats {
        SfuStats {
            sessions: self.sessions.len() as u64,
            tracks: self.sessions.values().map(|s| s.tracks_in.len() as u64).sum(),
            recording_rooms: self.recording.len() as u64,
            recording_files: self
                .sessions
                .values()
                .flat_map(|s| &s.tracks_in)
                .filter(|t| t.recorder.as_ref().is_some_and(|r| r.file().is_some()))
                .count() as u64,
            ..self.stats
        }
    }

    /// No sessions at all.
    pub fn is_empty(&self) -> bool {
        self.sessions.is_empty()
    }

    /// Records `room` from now on: one file per published track, each starting with a keyframe (asked for).
    /// `false` if it was being recorded already.
    pub fn start_recording(&mut self, room: &str) -> bool {
        self.recording.insert(Arc::from(room))
    }

    /// Stops recording `room`: its files are finished ([`RecordOp::Close`]). `false` if it was not recorded.
    pub fn stop_recording(&mut self, room: &str) -> bool {
        if !self.recording.remove(room) {
            return false;
        }
        let members = self.rooms.get(room).cloned().unwrap_or_default();
        for id in members {
            self.finish_recorders(id);
        }
        true
    }

    /// Stops every recording (the server is stopping).
    pub fn stop_all_recordings(&mut self) {
        let rooms: Vec<Arc<str>> = self.recording.iter().cloned().collect();
        for r in rooms {
            self.stop_recording(&r);
        }
    }

    pub fn is_recording(&self, room: &str) -> bool {
        self.recording.contains(room)
    }

    /// The next file operation for the adapter. Drain it after [`Sfu::poll_output`].
    pub fn poll_record(&mut self) -> Option<RecordOp> {
        self.record_out.pop_front()
    }

    fn finish_recorders(&mut self, id: SessionId) {
        let Some(s) = self.sessions.get_mut(&id) else { return };
        for t in &mut s.tracks_in {
            t.frames.clear();
            if let Some(op) = t.recorder.take().and_then(|r| r.finish()) {
                self.record_out.push_back(op);
            }
        }
    }

    /// A packet of a published track of a recorded room: put together into frames for [`Sfu::record_frame`].
    fn record_packet(&mut self, from: SessionId, p: &Incoming) {
        if self.recording.is_empty() {
            return;
        }
        let Some(s) = self.sessions.get_mut(&from) else { return };
        if !self.recording.contains(&s.room) {
            return;
        }
        let Some(t) = s.tracks_in.iter_mut().find(|t| t.mid == p.mid) else { return };
        let codec = p.params.spec().codec;
        let i = match t.frames.iter().position(|(rid, _)| *rid == p.rid) {
            Some(i) => i,
            None => {
                let r = match codec {
                    Codec::Vp8 => Reassembly::Vp8(Vp8Frames::new()),
                    Codec::H264 => Reassembly::H264(H264Frames::new()),
                    _ => Reassembly::Whole,
                };
                t.frames.push((p.rid, r));
                t.frames.len() - 1
            }
        };
        let h = &p.packet.header;
        let seq = *p.packet.seq_no;
        let (data, extra) = match &mut t.frames[i].1 {
            Reassembly::Vp8(f) => {
                let Some(fr) = f.push(seq, h.timestamp, h.marker, &p.packet.payload) else { return };
                let extra = Vp8CodecExtra {
                    discardable: false,
                    sync: false,
                    layer_index: 0,
                    picture_id: None,
                    tl0_picture_id: None,
                    is_keyframe: fr.keyframe,
                };
                (fr.data, CodecExtra::Vp8(extra))
            }
            Reassembly::H264(f) => {
                let Some(fr) = f.push(seq, h.timestamp, h.marker, &p.packet.payload) else { return };
                (fr.data, CodecExtra::H264(H264CodecExtra { is_keyframe: fr.keyframe }))
            }
            Reassembly::Whole => (p.packet.payload.to_vec(), CodecExtra::None),
        };
        let d = MediaData {
            mid: p.mid,
            pt: h.payload_type,
            rid: p.rid,
            params: p.params,
            time: p.packet.time,
            network_time: p.packet.timestamp,
            seq_range: p.packet.seq_no..=p.packet.seq_no,
            // Reassembly drops what follows a loss up to the next keyframe.
            contiguous: true,
            data: data.into(),
            ext_vals: ExtensionValues::default(),
            codec_extra: extra,
            last_sender_info: None,
            audio_start_of_talk_spurt: false,
        };
        self.record_frame(from, &d);
    }

    /// A frame of a published track of a recorded room, for its file. One layer is recorded at a time: the highest
    /// that arrives; another only when that one stops coming or a larger one appears (at the new one's keyframe,
    /// asked for, time running on).
    fn record_frame(&mut self, from: SessionId, d: &MediaData) {
        if self.recording.is_empty() {
            return;
        }
        let now = self.now;
        let Some(s) = self.sessions.get_mut(&from) else { return };
        if !self.recording.contains(&s.room) {
            return;
        }
        let Some(t) = s.tracks_in.iter_mut().find(|t| t.mid == d.mid) else { return };
        let live = |l: &&Layer| now.saturating_duration_since(l.last_seen) < LAYER_GONE;
        let best = match t.kind {
            MediaKind::Video => {
                t.layers.iter().filter(live).max_by_key(|l| (l.width, l.height, l.rate.peek(now))).map(|l| l.rid)
            }
            _ => Some(d.rid),
        };
        let Some(best) = best else { return };
        let rec = t.recorder.get_or_insert_with(|| {
            let file = self.next_file;
            self.next_file += 1;
            Box::new(Recorder::new(file))
        });
        // Kept while it comes, unless a larger one appears (simulcast layers start small while the estimate grows):
        // no flapping, at most a step up per new layer and a step down when one stops.
        let size = |rid: Option<Rid>| t.layers.iter().find(|l| l.rid == rid).map_or(0, |l| l.width * l.height);
        let keep = rec
            .layer()
            .is_some_and(|r| t.layers.iter().any(|l| l.rid == r && live(&l)) && (best == r || size(best) <= size(r)));
        let mut ops = Vec::new();
        let want = rec.frame(d, t.kind, best, keep, &s.room, &s.participant, &mut ops);
        self.record_out.extend(ops);
        if let Want::Keyframe(rid) = want {
            self.request_layer_keyframe(from, d.mid, rid);
        }
    }

    /// Number of sessions in `room`.
    pub fn room_len(&self, room: &str) -> usize {
        self.rooms.get(room).map_or(0, Vec::len)
    }

    /// A new session for `participant` in `room`. The client offers first ([`Sfu::accept_offer`]); every other
    /// session of the room gets this one's tracks, and this one gets theirs, by server offers.
    pub fn add_session(&mut self, room: &str, participant: &str, now: Instant) -> SessionId {
        self.add_session_with(room, participant, SessionRole::Participant, now)
    }

    /// [`Sfu::add_session`] for a session of another [`SessionRole`].
    pub fn add_session_with(&mut self, room: &str, participant: &str, role: SessionRole, now: Instant) -> SessionId {
        self.now = now;
        let id = self.next_id;
        self.next_id += 1;
        let creds = IceCreds::new();
        let mut builder = Rtc::builder()
            .set_ice_lite(true)
            .set_local_ice_credentials(creds.clone())
            .clear_codecs()
            .enable_vp8(true)
            // After VP8, so browsers keep sending VP8; for publishers that send only H.264 (OBS over WHIP).
            .enable_h264(true)
            .enable_opus(true, false)
            .enable_bwe(Some(INITIAL_ESTIMATE))
            // Packets are forwarded as they come (rewritten per subscriber), not depacketized and packetized again.
            .set_rtp_mode(true);
        if let Some(cert) = &self.cfg.dtls_cert {
            builder = builder.set_dtls_cert(cert.clone());
        }
        let mut rtc = builder.build(now);
        for addr in &self.cfg.host_candidates {
            match Candidate::host(*addr, "udp") {
                Ok(c) => {
                    rtc.add_local_candidate(c);
                }
                Err(e) => tracing::warn!("SFU host candidate {addr} refused: {e}"),
            }
        }
        for addr in &self.tcp_candidates {
            match Candidate::builder().tcp().host(*addr).tcptype(TcpType::Passive).build() {
                Ok(c) => {
                    rtc.add_local_candidate(c);
                }
                Err(e) => tracing::warn!("SFU TCP host candidate {addr} refused: {e}"),
            }
        }
        let room: Arc<str> = room.into();
        let room_members = self.rooms.entry(room.clone()).or_default();
        let participant: Arc<str> = participant.into();
        let mut tracks_out = Vec::new();
        for other in room_members.iter().filter(|_| role == SessionRole::Participant) {
            let o = &self.sessions[other];
            for t in &o.tracks_in {
                tracks_out.push(TrackOut::new(*other, t.mid, o.participant.clone(), t.kind));
            }
        }
        room_members.push(id);
        self.by_ufrag.insert(creds.ufrag.clone(), id);
        self.sessions.insert(
            id,
            Session {
                room,
                participant,
                role,
                slots: Vec::new(),
                rtc,
                ufrag: creds.ufrag,
                pending: None,
                negotiated: false,
                tracks_in: Vec::new(),
                tracks_out,
                addrs: Vec::new(),
                timeout: now,
                latest: now,
                dirty: false,
                estimate: None,
                ceiling: None,
                refused: Vec::new(),
                numbering: Vec::new(),
            },
        );
        self.mark_dirty(id);
        id
    }

    /// Ends a session the caller no longer wants (the participant left). No `Closed` event follows.
    pub fn remove_session(&mut self, id: SessionId) {
        if let Some(s) = self.sessions.get_mut(&id) {
            s.rtc.disconnect();
            self.close(id, false);
        }
    }

    /// The client's offer. `Ok(None)`: the server has an offer of its own outstanding and, being the impolite
    /// side of perfect negotiation, ignores the client's (the client rolls back and answers the server's).
    pub fn accept_offer(&mut self, id: SessionId, sdp: &str) -> Result<Option<String>, SfuError> {
        let (mut room_left, mut all_left) = self.tracks_left(id);
        let s = self.sessions.get_mut(&id).ok_or(SfuError::UnknownSession(id))?;
        let offer = SdpOffer::from_sdp_string(sdp).map_err(|e| SfuError::BadSdp(e.to_string()))?;
        if s.pending.is_some() {
            return Ok(None);
        }
        let answer = s.rtc.sdp_api().accept_offer(offer)?;
        s.negotiated = true;
        let answer = answer.to_sdp_string();
        // An ICE restart gives the session a new ufrag: route by it from now on.
        if let Some(ufrag) = answer.lines().find_map(|l| l.trim_end().strip_prefix("a=ice-ufrag:")) {
            if ufrag != s.ufrag {
                self.by_ufrag.remove(&s.ufrag);
                s.ufrag = ufrag.to_owned();
                self.by_ufrag.insert(s.ufrag.clone(), id);
            }
        }
        // str0m reports MediaAdded only once DTLS is up; the others' offers need not wait for that.
        let mut opened = Vec::new();
        for mid in sdp.lines().filter_map(|l| l.trim_end().strip_prefix("a=mid:")) {
            let mid = Mid::from(mid);
            let Some(m) = s.rtc.media(mid) else { continue };
            let known = s.tracks_in.iter().any(|t| t.mid == mid) || s.tracks_out.iter().any(|t| t.mid() == Some(mid));
            let media = matches!(m.kind(), MediaKind::Audio | MediaKind::Video);
            if !known && m.direction().is_receiving() && media {
                if room_left == 0 || all_left == 0 {
                    if !s.refused.contains(&mid) {
                        s.refused.push(mid);
                        self.stats.refused_tracks += 1;
                        tracing::info!("SFU session {id}: track {mid} not forwarded: a track cap is reached");
                    }
                    continue;
                }
                room_left -= 1;
                all_left -= 1;
                s.tracks_in.push(TrackIn::new(mid, m.kind()));
                opened.push(Propagate::TrackOpen { mid, kind: m.kind() });
            }
            let viewer = matches!(s.role, SessionRole::Viewer { .. });
            if media && viewer && m.direction().is_sending() && !s.slots.iter().any(|(sm, _)| *sm == mid) {
                s.slots.push((mid, m.kind()));
            }
        }
        self.mark_dirty(id);
        for p in opened {
            self.propagate(id, p);
        }
        self.bind_viewer(id);
        Ok(Some(answer))
    }

    /// The client's answer to the server's last offer.
    pub fn accept_answer(&mut self, id: SessionId, sdp: &str) -> Result<(), SfuError> {
        let s = self.sessions.get_mut(&id).ok_or(SfuError::UnknownSession(id))?;
        let pending = s.pending.take().ok_or(SfuError::NoPendingOffer)?;
        let answer = SdpAnswer::from_sdp_string(sdp).map_err(|e| SfuError::BadSdp(e.to_string()))?;
        let res = s.rtc.sdp_api().accept_answer(pending, answer);
        // Either way the offer is done with: opened tracks are open, or go back to be offered again.
        let mut opened = Vec::new();
        for t in &mut s.tracks_out {
            match (t.state, res.is_ok()) {
                (OutState::Negotiating(m), true) => {
                    t.state = OutState::Open(m);
                    opened.push((t.origin, t.origin_mid, t.kind));
                }
                (OutState::Negotiating(_), false) => t.state = OutState::ToOpen,
                (OutState::NegotiatingStop(m), false) => t.state = OutState::ToStop(m),
                _ => {}
            }
        }
        s.tracks_out.retain(|t| !(res.is_ok() && matches!(t.state, OutState::NegotiatingStop(_))));
        self.mark_dirty(id);
        res?;
        // A new subscriber needs a keyframe of its layer to start decoding: choosing the layers asks for it.
        if opened.iter().any(|(_, _, kind)| *kind == MediaKind::Video) {
            self.select_layers(id);
        }
        Ok(())
    }

    /// A trickled candidate of the client (the `candidate` line of an `RTCIceCandidateInit`). The server is
    /// ICE-lite and answers the client's checks, so candidates are optional.
    pub fn add_candidate(&mut self, id: SessionId, line: &str) -> Result<(), SfuError> {
        let s = self.sessions.get_mut(&id).ok_or(SfuError::UnknownSession(id))?;
        if line.trim().is_empty() {
            return Ok(());
        }
        let c = Candidate::from_sdp_string(line.trim()).map_err(|e| SfuError::BadCandidate(e.to_string()))?;
        s.rtc.add_remote_candidate(c);
        self.mark_dirty(id);
        Ok(())
    }

    /// A datagram that arrived on the media socket at `destination` from `source`. Routed by the STUN
    /// username's ufrag, or by the source address ICE has seen; anything else is dropped (costs one lookup).
    pub fn handle_receive(&mut self, now: Instant, source: SocketAddr, destination: SocketAddr, data: &[u8]) {
        self.handle_receive_on(now, Protocol::Udp, source, destination, data);
    }

    /// [`Sfu::handle_receive`] for any transport (`Protocol::Tcp`: one RFC 4571 frame of an ICE-TCP connection).
    /// Returns whether a session took it.
    pub fn handle_receive_on(
        &mut self,
        now: Instant,
        proto: Protocol,
        source: SocketAddr,
        destination: SocketAddr,
        data: &[u8],
    ) -> bool {
        self.now = now;
        let id = match self.route(source, data) {
            Some(id) => id,
            None => {
                self.stats.unrouted_datagrams += 1;
                return false;
            }
        };
        let Ok(contents) = data.try_into() else {
            self.stats.unrouted_datagrams += 1;
            return false;
        };
        let s = self.sessions.get_mut(&id).expect("routed sessions exist");
        let input = Input::Receive(now, Receive { proto, source, destination, contents });
        if let Err(e) = s.rtc.handle_input(input) {
            tracing::info!("SFU session {id}: input refused, closing: {e}");
            s.rtc.disconnect();
        }
        // In RTP mode str0m holds one received packet until the next poll and a later input replaces it: the
        // session is polled now, not at the end of the batch.
        self.drive(id);
        true
    }

    fn route(&mut self, source: SocketAddr, data: &[u8]) -> Option<SessionId> {
        // RFC 7983: a first byte of 0..=3 is STUN; its USERNAME is "<our ufrag>:<their ufrag>".
        if data.first().is_some_and(|b| *b < 4) {
            let msg = StunMessage::parse(data).ok()?;
            let (local, _) = msg.split_username()?;
            let id = *self.by_ufrag.get(local)?;
            // The check's integrity is verified inside the session, after routing: an unverified check never takes
            // an address from another session, and adds at most a handful per session.
            if let std::collections::hash_map::Entry::Vacant(e) = self.by_addr.entry(source) {
                e.insert(id);
                let s = self.sessions.get_mut(&id)?;
                if s.addrs.len() >= MAX_ADDRS_PER_SESSION {
                    let old = s.addrs.remove(0);
                    if self.by_addr.get(&old) == Some(&id) {
                        self.by_addr.remove(&old);
                    }
                }
                s.addrs.push(source);
            }
            return Some(id);
        }
        self.by_addr.get(&source).copied()
    }

    /// Time has passed: sessions whose timeout is due run their timers.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.now = now;
        let due: Vec<SessionId> = self.sessions.iter().filter(|(_, s)| s.timeout <= now).map(|(id, _)| *id).collect();
        for id in due {
            let s = self.sessions.get_mut(&id).expect("due sessions exist");
            self.stats.session_timeouts += 1;
            if let Err(e) = s.rtc.handle_input(Input::Timeout(now)) {
                tracing::info!("SFU session {id}: timer failed, closing: {e}");
                s.rtc.disconnect();
            }
            self.mark_dirty(id);
        }
        if now >= self.next_tick {
            self.next_tick = now + TICK;
            self.tick();
        }
    }

    /// The next thing to do. Call until it returns [`SfuOutput::Timeout`].
    pub fn poll_output(&mut self) -> SfuOutput {
        loop {
            if let Some(o) = self.out.pop_front() {
                return o;
            }
            let Some(id) = self.dirty.pop() else { break };
            self.drive(id);
        }
        // The tick (speakers, layers, caps) is bookkeeping too: it may wait for a wake-up that comes anyway.
        let (mut due, mut latest) = (self.next_tick, self.next_tick + LAZY_SLACK);
        for s in self.sessions.values() {
            due = due.min(s.timeout);
            latest = latest.min(s.latest);
        }
        self.due_at = due;
        let next = if self.sessions.is_empty() { self.now + IDLE_TIMEOUT } else { latest };
        SfuOutput::Timeout(next.max(self.now))
    }

    /// Whether a timer was due at `now` when [`SfuOutput::Timeout`] gave a later time to wake up: an adapter that
    /// woke up for a datagram runs it in the same wake-up ([`Sfu::handle_timeout`]).
    pub fn timers_due(&self, now: Instant) -> bool {
        now >= self.due_at
    }

    fn mark_dirty(&mut self, id: SessionId) {
        if let Some(s) = self.sessions.get_mut(&id) {
            if !s.dirty {
                s.dirty = true;
                self.dirty.push(id);
            }
        }
    }

    /// Polls one session until it waits for time, then passes what it produced on to the others.
    fn drive(&mut self, id: SessionId) {
        // A new published track stops the polling for its cap decision, which looks at every session (rare; the
        // sum over sessions per poll was ~8 % of the SFU's CPU in a fan-out profile).
        while let Some((mid, kind)) = self.drive_until_track(id) {
            let (room_left, all_left) = self.tracks_left(id);
            let Some(s) = self.sessions.get_mut(&id) else { return };
            if room_left == 0 || all_left == 0 {
                s.refused.push(mid);
                self.stats.refused_tracks += 1;
            } else {
                s.tracks_in.push(TrackIn::new(mid, kind));
                self.propagate(id, Propagate::TrackOpen { mid, kind });
            }
        }
    }

    /// [`Sfu::drive`] until the session waits for time (`None`) or reports a published track not seen before.
    fn drive_until_track(&mut self, id: SessionId) -> Option<(Mid, MediaKind)> {
        let now = self.now;
        // Taken, not borrowed: propagating drives other sessions, which take (an empty) one in turn.
        let mut props = std::mem::take(&mut self.props);
        let mut added = None;
        let alive = {
            let s = self.sessions.get_mut(&id)?;
            s.dirty = false;
            negotiate(id, s, &mut self.out);
            let mut steps = 0;
            loop {
                if !s.rtc.is_alive() || added.is_some() {
                    break;
                }
                match s.rtc.poll_output() {
                    // Without this, a session sent one packet per wake-up of the adapter (a few hundred a second):
                    // in a room of ten publishers the written frames piled up in str0m and most never left.
                    Ok(Output::Timeout(t)) if t <= now + PACER_STEP && steps < MAX_STEPS_PER_DRIVE => {
                        steps += 1;
                        self.stats.session_timeouts += 1;
                        if let Err(e) = s.rtc.handle_input(Input::Timeout(now)) {
                            tracing::info!("SFU session {id}: timer failed, closing: {e}");
                            s.rtc.disconnect();
                        }
                    }
                    Ok(Output::Timeout(t)) => {
                        s.timeout = t;
                        s.latest = t + lazy_slack(s.rtc.last_timeout_reason());
                        break;
                    }
                    Ok(Output::Transmit(t)) => self.out.push_back(SfuOutput::Transmit(Transmit {
                        proto: t.proto,
                        source: t.source,
                        destination: t.destination,
                        contents: t.contents.into(),
                    })),
                    Ok(Output::Event(e)) => match e {
                        Event::Connected => self.out.push_back(SfuOutput::Event(SfuEvent::Connected { session: id })),
                        Event::IceConnectionStateChange(IceConnectionState::Disconnected) => s.rtc.disconnect(),
                        Event::MediaAdded(m) => {
                            let ours = s.tracks_out.iter().any(|t| t.mid() == Some(m.mid));
                            let known = s.tracks_in.iter().any(|t| t.mid == m.mid) || s.refused.contains(&m.mid);
                            if !ours && !known && m.direction.is_receiving() {
                                added = Some((m.mid, m.kind));
                            }
                        }
                        Event::RtpPacket(packet) => {
                            let ssrc = packet.header.ssrc;
                            let Some((mid, rid)) = s.rtc.direct_api().stream_rx(&ssrc).map(|rx| (rx.mid(), rx.rid()))
                            else {
                                continue;
                            };
                            // Media of a refused (over the cap) m-line goes nowhere.
                            let Some(t) = s.tracks_in.iter_mut().find(|t| t.mid == mid) else { continue };
                            let pt = packet.header.payload_type;
                            let Some(params) = s.rtc.codec_config().params().iter().find(|p| p.pt() == pt).copied()
                            else {
                                continue;
                            };
                            let (keyframe_start, vp8) = match params.spec().codec {
                                Codec::Vp8 => {
                                    let d = Vp8Descriptor::parse(&packet.payload).ok();
                                    (d.is_some_and(|d| d.starts_keyframe(&packet.payload)), d)
                                }
                                Codec::H264 => (h264_starts_keyframe(&packet.payload), None),
                                _ => (true, None),
                            };
                            let p = Incoming { mid, rid, params, packet, keyframe_start, vp8 };
                            let (changed, lost) = track_layer(t, &p, now);
                            if t.kind == MediaKind::Video {
                                if lost {
                                    let due = t.last_keyframe_request.is_none_or(|l| now >= l + KEYFRAME_THROTTLE);
                                    if due {
                                        t.last_keyframe_request = Some(now);
                                        props.push(Propagate::Keyframe {
                                            origin: id,
                                            mid,
                                            rid,
                                            kind: KeyframeRequestKind::Fir,
                                        });
                                    }
                                }
                                if changed {
                                    props.push(Propagate::Layers);
                                }
                            } else if let Some(level) = p.packet.header.ext_vals.audio_level {
                                t.loudness.add(now, level);
                            }
                            props.push(Propagate::Rtp(p));
                        }
                        Event::EgressBitrateEstimate(BweKind::Twcc { estimate, .. }) => {
                            s.estimate = Some(estimate.as_u64());
                        }
                        Event::KeyframeRequest(r) => {
                            if let Some(t) = s.tracks_out.iter().find(|t| t.mid() == Some(r.mid)) {
                                // The subscriber sees one stream: the request is for the layer it is fed.
                                if let Some(rid) = t.feed.current() {
                                    props.push(Propagate::Keyframe {
                                        origin: t.origin,
                                        mid: t.origin_mid,
                                        rid,
                                        kind: r.kind,
                                    });
                                }
                            }
                        }
                        _ => {}
                    },
                    Err(e) => {
                        tracing::info!("SFU session {id}: closing: {e}");
                        s.rtc.disconnect();
                    }
                }
            }
            s.rtc.is_alive()
        };
        for p in props.drain(..) {
            self.propagate(id, p);
        }
        self.props = props;
        if !alive {
            self.close(id, true);
            return None;
        }
        added
    }

    fn propagate(&mut self, from: SessionId, p: Propagate) {
        let Some(room) = self.sessions.get(&from).map(|s| s.room.clone()) else { return };
        if let Propagate::Rtp(p) = p {
            return self.forward(from, &room, p);
        }
        let members = self.rooms.get(&room).cloned().unwrap_or_default();
        match p {
            Propagate::TrackOpen { mid, kind } => {
                let participant = self.sessions[&from].participant.clone();
                self.stats.tracks += 1;
                for other in members.into_iter().filter(|o| *o != from) {
                    let role = self.sessions.get(&other).map(|s| s.role.clone());
                    if matches!(role, Some(SessionRole::Viewer { .. })) {
                        self.bind_viewer(other);
                        continue;
                    }
                    if let Some(s) = self.sessions.get_mut(&other).filter(|s| s.role == SessionRole::Participant) {
                        s.tracks_out.push(TrackOut::new(from, mid, participant.clone(), kind));
                    }
                    self.mark_dirty(other);
                }
            }
            Propagate::Rtp(_) => {}
            Propagate::Layers => {
                for other in members.into_iter().filter(|o| *o != from) {
                    self.select_layers(other);
                }
            }
            Propagate::Keyframe { origin, mid, rid, kind } => self.request_keyframe(origin, mid, rid, kind),
        }
    }

    /// A packet of `from`'s to every subscriber of it in `room`, with each subscriber's own numbering (the
    /// per-packet path: no allocation here; the payload is shared, an `Arc`).
    fn forward(&mut self, from: SessionId, room: &Arc<str>, p: Incoming) {
        self.record_packet(from, &p);
        // Taken out while the subscribers are written to (nothing here changes a room's members), put back after.
        let members = self.rooms.get_mut(room).map(std::mem::take).unwrap_or_default();
        let h = &p.packet.header;
        let input = PacketIn {
            layer: p.rid,
            seq: *p.packet.seq_no,
            time: h.timestamp,
            arrival: p.packet.timestamp,
            keyframe_start: p.keyframe_start,
            picture_id: p.vp8.and_then(|d| d.picture_id()),
            tl0_pic_idx: p.vp8.and_then(|d| d.tl0_pic_idx()),
        };
        // A 7-bit picture id (the M bit of its first byte clear) stays 7-bit.
        let pl = &p.packet.payload;
        let short_pid = pl.len() > 2 && pl[0] & 0x80 != 0 && pl[1] & 0x80 != 0 && pl[2] & 0x80 == 0;
        let ext_vals = ExtensionValues {
            audio_level: h.ext_vals.audio_level,
            voice_activity: h.ext_vals.voice_activity,
            ..Default::default()
        };
        for &other in members.iter().filter(|o| **o != from) {
            let Some(s) = self.sessions.get_mut(&other) else { continue };
            let Some(t) = s.tracks_out.iter_mut().find(|t| t.origin == from && t.origin_mid == p.mid) else {
                continue;
            };
            let OutState::Open(mid) = t.state else { continue };
            let f = &mut t.feed;
            if t.kind == MediaKind::Video && f.current() != Some(p.rid) {
                // Another layer than the one sent: taken up only at a keyframe of the wanted one; a track that
                // shows nothing yet starts at any layer's keyframe (the wanted one follows).
                let starting = f.current().is_none() && !f.view.is_some_and(|v| v.is_hidden());
                if !(p.keyframe_start && (f.target == Some(p.rid) || starting)) {
                    continue;
                }
                if f.current().is_some() {
                    self.stats.layer_switches += 1;
                }
            }
            // Switches to this layer at its keyframe; sequence numbers and time continue from where the
            // subscriber's stream was.
            let Some(out) = f.rw.rewrite(&input, Some(p.rid)) else { continue };
            let pt = match t.pt {
                Some((inp, out)) if inp == h.payload_type => out,
                _ => {
                    let Some(pt) = s.rtc.codec_config().match_params(p.params).map(|x| x.pt()) else { continue };
                    t.pt = Some((h.payload_type, pt));
                    pt
                }
            };
            let mut api = s.rtc.direct_api();
            // One hash lookup per packet; the mid check catches a stream the session has since replaced.
            let known = match t.ssrc {
                Some(ssrc) => api.stream_tx(&ssrc).filter(|tx| tx.mid() == mid),
                None => None,
            };
            let fresh = known.is_none();
            let tx = match known {
                Some(tx) => tx,
                None => match api.stream_tx_by_mid(mid, None) {
                    Some(tx) => tx,
                    None => continue,
                },
            };
            if fresh {
                // Forwarded media leaves as it comes, like other SFUs send it (the publisher paced it already):
                // str0m paces video to the send-side estimate by default, and its queue dropped what did not fit.
                // The estimate (TWCC) still chooses the layers (`select_layers`); probing still paces padding.
                tx.set_unpaced(true);
                t.ssrc = Some(tx.ssrc());
            }
            let mut w = RtpWrite::new(pt, out.seq.into(), out.time, p.packet.timestamp, p.packet.payload.clone())
                .marker(h.marker)
                .ext_vals(ext_vals.clone())
                .nackable(t.kind == MediaKind::Video);
            if let Some(d) = p.vp8 {
                let same = out.picture_id == input.picture_id && out.tl0_pic_idx == input.tl0_pic_idx;
                if !same {
                    let mut b = d.patch();
                    if let Some(id) = out.picture_id {
                        // Keep the width the publisher used (7 or 15 bits).
                        b = b.picture_id(if short_pid { id & 0x7f } else { id });
                    }
                    if let Some(i) = out.tl0_pic_idx {
                        b = b.tl0_pic_idx(i);
                    }
                    match b.build() {
                        Ok(patch) => w = w.vp8_patch(patch),
                        Err(e) => tracing::debug!("SFU: VP8 descriptor not rewritten: {e}"),
                    }
                }
            }
            tx.write_rtp(w);
            // A video frame ends with the marker bit; an Opus packet is a frame.
            if h.marker || t.kind == MediaKind::Audio {
                self.stats.forwarded_frames += 1;
            }
            self.stats.forwarded_bytes += p.packet.payload.len() as u64;
            if !s.dirty {
                s.dirty = true;
                self.dirty.push(other);
            }
        }
        if let Some(m) = self.rooms.get_mut(room) {
            *m = members;
        }
    }

    /// How many more tracks the room of `id` and the server take before a track cap.
    fn tracks_left(&self, id: SessionId) -> (usize, usize) {
        let caps = &self.cfg.caps;
        let all: usize = self.sessions.values().map(|s| s.tracks_in.len()).sum();
        let room: usize = self
            .sessions
            .get(&id)
            .and_then(|s| self.rooms.get(&s.room))
            .map_or(0, |m| m.iter().filter_map(|o| self.sessions.get(o)).map(|s| s.tracks_in.len()).sum());
        (caps.max_room_tracks.saturating_sub(room), caps.max_tracks.saturating_sub(all))
    }

    /// How the client of session `id` shows the video it receives on m-line `mid` (a mid of the server's offer
    /// `tracks`): the layer forwarded follows (see [`View`]); a hidden track gets nothing.
    pub fn set_view(&mut self, id: SessionId, mid: &str, view: View) -> Result<(), SfuError> {
        let s = self.sessions.get_mut(&id).ok_or(SfuError::UnknownSession(id))?;
        let t = s
            .tracks_out
            .iter_mut()
            .find(|t| t.kind == MediaKind::Video && t.mid().is_some_and(|m| m.to_string() == mid))
            .ok_or_else(|| SfuError::UnknownTrack(mid.chars().take(32).collect()))?;
        t.feed.view = Some(view);
        self.select_layers(id);
        Ok(())
    }

    /// Chooses for every video track session `id` receives the layer to forward: the smallest that fills the tile
    /// as the page shows it, then lower ones while the sum is over the session's bandwidth estimate. A change of
    /// layer asks the publisher for a keyframe of the new one; forwarding moves over when it comes.
    fn select_layers(&mut self, id: SessionId) {
        let now = self.now;
        let Some(s) = self.sessions.get(&id) else { return };
        let mut plan: Vec<Plan> = Vec::new();
        let mut audio = 0;
        for (i, t) in s.tracks_out.iter().enumerate() {
            if !matches!(t.state, OutState::Open(_)) {
                continue;
            }
            if t.kind != MediaKind::Video {
                audio += AUDIO_BITRATE;
                continue;
            }
            let Some(origin) =
                self.sessions.get(&t.origin).and_then(|o| o.tracks_in.iter().find(|x| x.mid == t.origin_mid))
            else {
                continue;
            };
            let mut live: Vec<&Layer> =
                origin.layers.iter().filter(|l| now.saturating_duration_since(l.last_seen) < LAYER_GONE).collect();
            if live.is_empty() {
                continue;
            }
            live.sort_by_key(|l| (l.width, l.height, l.rate.peek(now)));
            let fits = |l: &&Layer, v: View| {
                l.width as f64 >= v.width as f64 * LAYER_FIT || l.height as f64 >= v.height as f64 * LAYER_FIT
            };
            let choice = match t.feed.view {
                Some(v) if v.is_hidden() => None,
                Some(v) => Some(live.iter().position(|l| fits(l, v)).unwrap_or(live.len() - 1)),
                None => Some(live.len() - 1),
            };
            plan.push((i, live.iter().map(|l| (l.rid, l.rate.peek(now))).collect(), choice));
        }
        let total = |plan: &[Plan]| -> u64 { plan.iter().filter_map(|(_, l, c)| c.map(|c| l[c].1)).sum() };
        let desired = total(&plan) + audio;
        // The estimate follows what is sent when the link has room (it is application-limited), so it only says
        // something when it falls below that: congestion. Layers then fit it for a while before trying higher.
        let sent: u64 = plan
            .iter()
            .filter_map(|(i, l, _)| {
                let cur = s.tracks_out[*i].feed.current()?;
                l.iter().find(|x| x.0 == cur).map(|x| x.1)
            })
            .sum();
        let mut ceiling = s.ceiling.filter(|(_, until)| now < *until);
        if let Some(estimate) = s.estimate.filter(|_| self.cfg.follow_bwe) {
            if estimate.saturating_sub(audio) < sent * 9 / 10 {
                ceiling = Some((estimate, now + BWE_HOLD));
            }
        }
        if let Some((estimate, _)) = ceiling {
            let budget = estimate.saturating_sub(audio);
            while total(&plan) > budget {
                // Step down the dearest track that has a lower layer (never below the lowest: pausing is the page's).
                let Some(p) =
                    plan.iter_mut().filter(|p| p.2.is_some_and(|c| c > 0)).max_by_key(|p| p.1[p.2.unwrap_or(0)].1)
                else {
                    break;
                };
                p.2 = p.2.map(|c| c - 1);
            }
        }
        let s = self.sessions.get_mut(&id).expect("checked above");
        s.ceiling = ceiling;
        let mut requests = Vec::new();
        for (i, layers, choice) in plan {
            let t = &mut s.tracks_out[i];
            let target = choice.map(|c| layers[c].0);
            if target.is_none() {
                t.feed.rw.pause();
            }
            t.feed.target = target;
            if let Some(rid) = target {
                if t.feed.current() != Some(rid) {
                    requests.push((t.origin, t.origin_mid, rid));
                }
            }
        }
        // Probe towards what the pages would like to see.
        s.rtc.bwe().set_bitrate(Bitrate::ZERO, Bitrate::bps(desired.max(AUDIO_BITRATE)));
        self.mark_dirty(id);
        for (origin, mid, rid) in requests {
            self.request_layer_keyframe(origin, mid, rid);
        }
    }

    /// A keyframe of one layer, for a subscriber switching to it (at most every [`KEYFRAME_THROTTLE`] per layer).
    fn request_layer_keyframe(&mut self, origin: SessionId, mid: Mid, rid: Option<Rid>) {
        let now = self.now;
        let Some(l) = self
            .sessions
            .get_mut(&origin)
            .and_then(|s| s.tracks_in.iter_mut().find(|t| t.mid == mid))
            .and_then(|t| t.layers.iter_mut().find(|l| l.rid == rid))
        else {
            return;
        };
        if l.last_keyframe_request.is_some_and(|at| now < at + KEYFRAME_THROTTLE) {
            return;
        }
        l.last_keyframe_request = Some(now);
        self.request_keyframe(origin, mid, rid, KeyframeRequestKind::Pli);
    }

    /// Every [`TICK`]: layers (estimates and layers change), the active speakers, the bitrate caps.
    fn tick(&mut self) {
        let ids: Vec<SessionId> = self.sessions.keys().copied().collect();
        for id in ids {
            self.select_layers(id);
        }
        self.active_speakers();
        self.enforce_caps();
    }

    /// Per room, the participant whose audio carries sound most of the time; a change is announced once the new
    /// one has stayed ahead for [`SPEAKER_HOLD`].
    fn active_speakers(&mut self) {
        let now = self.now;
        let mut changed = Vec::new();
        for (room, members) in &self.rooms {
            let share = |id: &SessionId| -> f64 {
                self.sessions.get(id).map_or(0.0, |s| {
                    s.tracks_in
                        .iter()
                        .filter(|t| t.kind == MediaKind::Audio)
                        .map(|t| t.loudness.share(now))
                        .fold(0.0, f64::max)
                })
            };
            let loudest = members
                .iter()
                .map(|m| (*m, share(m)))
                .filter(|(_, v)| *v >= SPEECH_MIN)
                .max_by(|a, b| a.1.total_cmp(&b.1));
            let sp = self.floor.entry(room.clone()).or_default();
            let current = sp.current.map_or(0.0, |c| share(&c));
            match loudest {
                // The current speaker keeps the floor unless clearly outdone.
                Some((id, v)) if Some(id) != sp.current && v > current + 0.1 => match sp.candidate {
                    Some((c, since)) if c == id => {
                        if now >= since + SPEAKER_HOLD {
                            sp.current = Some(id);
                            sp.candidate = None;
                            changed.push(room.clone());
                            let participant = self.sessions[&id].participant.clone();
                            for m in members {
                                self.out.push_back(SfuOutput::Event(SfuEvent::ActiveSpeaker {
                                    session: *m,
                                    participant: participant.clone(),
                                }));
                            }
                        }
                    }
                    _ => sp.candidate = Some((id, now)),
                },
                _ => sp.candidate = None,
            }
        }
        for room in changed {
            self.follow_speaker(&room);
        }
    }

    /// Bitrate caps: when a room or the server receives more than its cap, the video publishers above their fair
    /// share (max-min) are asked by REMB to send at most that share; they are told again every
    /// [`REMB_INTERVAL`], and released (a REMB of the whole cap) once everyone fits.
    fn enforce_caps(&mut self) {
        let now = self.now;
        let caps = self.cfg.caps;
        // (session, mid, room, bit/s, video, capped)
        let mut tracks = Vec::new();
        for (id, s) in self.sessions.iter_mut() {
            for t in s.tracks_in.iter_mut() {
                let bps = t.bps(now);
                tracks.push((*id, t.mid, s.room.clone(), bps, t.kind == MediaKind::Video, t.capped));
            }
        }
        // A capped track would send more if it could: its demand is taken as half as much again as allowed.
        let demand = |bps: u64, capped: Option<(u64, Instant)>| capped.map_or(bps, |(c, _)| bps.max(c + c / 2));
        let level = |filter: &dyn Fn(&Arc<str>) -> bool, cap: u64| -> Option<u64> {
            let audio: u64 = tracks.iter().filter(|t| filter(&t.2) && !t.4).map(|t| t.3).sum();
            let video: Vec<u64> = tracks.iter().filter(|t| filter(&t.2) && t.4).map(|t| demand(t.3, t.5)).collect();
            water_level(video, cap.saturating_sub(audio))
        };
        let server = level(&|_| true, caps.max_bitrate);
        let mut remb = Vec::new();
        for room in self.rooms.keys() {
            let room_level = level(&|r: &Arc<str>| r == room, caps.max_room_bitrate);
            let allowed = match (server, room_level) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            for t in tracks.iter().filter(|t| t.2 == *room && t.4) {
                match allowed {
                    Some(l) if demand(t.3, t.5) > l => {
                        let due = t.5.is_none_or(|(c, at)| c != l || now >= at + REMB_INTERVAL);
                        if due {
                            remb.push((t.0, t.1, Some(l)));
                        }
                    }
                    _ if t.5.is_some() => remb.push((t.0, t.1, None)),
                    _ => {}
                }
            }
        }
        for (id, mid, allowed) in remb {
            let Some(s) = self.sessions.get_mut(&id) else { continue };
            let Some(t) = s.tracks_in.iter_mut().find(|t| t.mid == mid) else { continue };
            t.capped = allowed.map(|l| (l, now));
            let rid = t.layers.first().map(|l| l.rid).unwrap_or(None);
            let value = allowed.unwrap_or(caps.max_room_bitrate.min(caps.max_bitrate));
            if let Some(rx) = s.rtc.direct_api().stream_rx_by_mid(mid, rid) {
                rx.request_remb(Bitrate::bps(value));
                self.stats.remb_sent += 1;
                tracing::debug!("SFU session {id}: track {mid} asked to send at most {value} bit/s");
            }
            self.mark_dirty(id);
        }
    }

    fn request_keyframe(&mut self, origin: SessionId, mid: Mid, rid: Option<Rid>, kind: KeyframeRequestKind) {
        let Some(s) = self.sessions.get_mut(&origin) else { return };
        let possible = s.rtc.codec_config().params().iter().any(|p| match kind {
            KeyframeRequestKind::Pli => p.fb_pli(),
            KeyframeRequestKind::Fir => p.fb_fir(),
        });
        if !possible {
            return;
        }
        let mut api = s.rtc.direct_api();
        let Some(rx) = api.stream_rx_by_mid(mid, rid) else { return };
        rx.request_keyframe(kind);
        self.stats.keyframe_requests += 1;
        self.mark_dirty(origin);
    }

    /// Binds a viewer's unbound m-lines to its source's tracks of the same kind (see [`SessionRole::Viewer`]).
    fn bind_viewer(&mut self, id: SessionId) {
        let Some(s) = self.sessions.get(&id) else { return };
        let SessionRole::Viewer { source } = &s.role else { return };
        let free: Vec<(Mid, MediaKind)> =
            s.slots.iter().filter(|(m, _)| !s.tracks_out.iter().any(|t| t.mid() == Some(*m))).copied().collect();
        if free.is_empty() {
            return;
        }
        let members = self.rooms.get(&s.room).cloned().unwrap_or_default();
        // The chosen participant; else the active speaker, or the first that publishes anything.
        let speaker = self.speaker(&s.room).filter(|sp| source.is_none() && *sp != id);
        let speaker = speaker.filter(|sp| self.sessions.get(sp).is_some_and(|os| !os.tracks_in.is_empty()));
        let origin = speaker.or_else(|| {
            members.into_iter().find(|o| {
                *o != id
                    && self.sessions.get(o).is_some_and(|os| {
                        !os.tracks_in.is_empty() && source.as_ref().is_none_or(|src| *src == os.participant)
                    })
            })
        });
        let Some(origin) = origin else { return };
        let o = &self.sessions[&origin];
        let participant = o.participant.clone();
        let mut bound = Vec::new();
        for (mid, kind) in free {
            let taken = |m: Mid| bound.iter().any(|(om, _)| *om == m);
            if let Some(t) = o.tracks_in.iter().find(|t| t.kind == kind && !taken(t.mid)) {
                bound.push((
                    t.mid,
                    TrackOut { state: OutState::Open(mid), ..TrackOut::new(origin, t.mid, participant.clone(), kind) },
                ));
            }
        }
        let s = self.sessions.get_mut(&id).expect("checked above");
        let mut keyframes = Vec::new();
        for (origin_mid, mut t) in bound {
            if t.kind == MediaKind::Video {
                keyframes.push(origin_mid);
            }
            if let Some(i) = s.numbering.iter().position(|(m, _)| Some(*m) == t.mid()) {
                t.feed.rw = s.numbering.swap_remove(i).1;
            }
            s.tracks_out.push(t);
        }
        self.mark_dirty(id);
        // The layer to forward, and a keyframe of it.
        if !keyframes.is_empty() {
            self.select_layers(id);
        }
    }

    /// The room's active speaker, if anyone has spoken.
    fn speaker(&self, room: &str) -> Option<SessionId> {
        self.floor.get(room).and_then(|f| f.current)
    }

    /// Viewers that follow the speaker (no chosen source) switch to the room's new one.
    fn follow_speaker(&mut self, room: &str) {
        let Some(speaker) = self.speaker(room) else { return };
        let members = self.rooms.get(room).cloned().unwrap_or_default();
        for m in members {
            let Some(s) = self.sessions.get_mut(&m) else { continue };
            let stale = s.tracks_out.is_empty() || s.tracks_out.iter().any(|t| t.origin != speaker);
            if s.role == (SessionRole::Viewer { source: None }) && stale {
                let gone = std::mem::take(&mut s.tracks_out);
                keep_numbering(s, gone);
                self.bind_viewer(m);
            }
        }
    }

    fn close(&mut self, id: SessionId, event: bool) {
        // A publisher that leaves ends its files; when it comes back, it gets new ones.
        self.finish_recorders(id);
        let Some(s) = self.sessions.remove(&id) else { return };
        self.by_ufrag.remove(&s.ufrag);
        for a in &s.addrs {
            if self.by_addr.get(a) == Some(&id) {
                self.by_addr.remove(a);
            }
        }
        let members = match self.rooms.get_mut(&s.room) {
            Some(m) => {
                m.retain(|o| *o != id);
                m.clone()
            }
            None => Vec::new(),
        };
        if members.is_empty() {
            self.rooms.remove(&s.room);
            self.floor.remove(&s.room);
        } else if let Some(sp) = self.floor.get_mut(&s.room) {
            if sp.current == Some(id) {
                sp.current = None;
            }
            if sp.candidate.is_some_and(|(c, _)| c == id) {
                sp.candidate = None;
            }
        }
        for other in members {
            let Some(o) = self.sessions.get_mut(&other) else { continue };
            if matches!(o.role, SessionRole::Viewer { .. }) {
                // A viewer cannot renegotiate: its m-lines stay and get another publisher's media.
                let (gone, kept) = std::mem::take(&mut o.tracks_out).into_iter().partition(|t| t.origin == id);
                o.tracks_out = kept;
                keep_numbering(o, gone);
                self.bind_viewer(other);
                continue;
            }
            o.tracks_out.retain(|t| !(t.origin == id && t.state == OutState::ToOpen));
            for t in o.tracks_out.iter_mut().filter(|t| t.origin == id) {
                if let OutState::Negotiating(m) | OutState::Open(m) = t.state {
                    t.state = OutState::ToStop(m);
                }
            }
            self.mark_dirty(other);
        }
        if event {
            self.out.push_back(SfuOutput::Event(SfuEvent::Closed { session: id }));
        }
    }
}

/// Offers what changed (tracks to open or stop) once the first exchange is done and no offer is outstanding.
fn negotiate(id: SessionId, s: &mut Session, out: &mut VecDeque<SfuOutput>) {
    if !s.negotiated || s.pending.is_some() || s.role != SessionRole::Participant {
        return;
    }
    if !s.tracks_out.iter().any(|t| matches!(t.state, OutState::ToOpen | OutState::ToStop(_))) {
        return;
    }
    let mut change = s.rtc.sdp_api();
    for t in &mut s.tracks_out {
        match t.state {
            OutState::ToOpen => {
                // The stream id is the publisher's id: the page groups a participant's tracks by it.
                let mid = change.add_media(t.kind, Direction::SendOnly, Some(t.participant.to_string()), None, None);
                t.state = OutState::Negotiating(mid);
            }
            OutState::ToStop(m) => {
                change.stop_media(m);
                t.state = OutState::NegotiatingStop(m);
            }
            _ => {}
        }
    }
    let Some((offer, pending)) = change.apply() else { return };
    s.pending = Some(pending);
    let tracks = s
        .tracks_out
        .iter()
        .filter_map(|t| match t.state {
            OutState::Negotiating(m) | OutState::Open(m) => Some(TrackInfo {
                mid: m.to_string(),
                participant: t.participant.clone(),
                kind: t.kind,
                origin_mid: t.origin_mid.to_string(),
            }),
            _ => None,
        })
        .collect();
    out.push_back(SfuOutput::Event(SfuEvent::Offer { session: id, sdp: offer.to_sdp_string(), tracks }));
}

/// Keeps the numbering of a viewer's unbound m-lines for the publisher bound to them next: its stream (one SSRC)
/// goes on without a jump in sequence numbers or time.
fn keep_numbering(s: &mut Session, gone: Vec<TrackOut>) {
    for mut t in gone {
        if let Some(mid) = t.mid() {
            t.feed.rw.pause();
            s.numbering.retain(|(m, _)| *m != mid);
            s.numbering.push((mid, t.feed.rw));
        }
    }
}

/// Notes a packet of a published track on its layer (audio: the only one). Returns whether a layer appeared, came
/// back, or its frame size changed (subscribers choose again), and whether packets were skipped (lost).
fn track_layer(t: &mut TrackIn, p: &Incoming, now: Instant) -> (bool, bool) {
    let mut changed = false;
    let i = match t.layers.iter().position(|l| l.rid == p.rid) {
        Some(i) => i,
        None => {
            t.layers.push(Layer {
                rid: p.rid,
                width: 0,
                height: 0,
                rate: Rate::new(now),
                last_seen: now,
                last_keyframe_request: None,
                last_seq: None,
            });
            changed = true;
            t.layers.len() - 1
        }
    };
    let l = &mut t.layers[i];
    changed |= now.saturating_duration_since(l.last_seen) >= LAYER_GONE;
    l.last_seen = now;
    l.rate.add(now, p.packet.payload.len());
    let seq = *p.packet.seq_no;
    let lost = l.last_seq.is_some_and(|last| seq > last + 1);
    if l.last_seq.is_none_or(|last| seq > last) {
        l.last_seq = Some(seq);
    }
    if p.keyframe_start && p.params.spec().codec == Codec::Vp8 {
        let body = vp8_descriptor_len(&p.packet.payload).map(|n| &p.packet.payload[n..]);
        if let Some((w, h)) = body.and_then(vp8_size) {
            changed |= (w, h) != (l.width, l.height);
            (l.width, l.height) = (w, h);
        }
    }
    (changed, lost)
}

/// The frame size of a VP8 keyframe (RFC 6386 9.1: a 3-byte frame tag with bit 0 clear, the start code 9d 01 2a,
/// then 14-bit width and height, little-endian).
pub(crate) fn vp8_size(frame: &[u8]) -> Option<(u32, u32)> {
    if frame.len() < 10 || frame[0] & 1 != 0 || frame[3..6] != [0x9d, 0x01, 0x2a] {
        return None;
    }
    let w = u16::from_le_bytes([frame[6], frame[7]]) & 0x3fff;
    let h = u16::from_le_bytes([frame[8], frame[9]]) & 0x3fff;
    Some((w as u32, h as u32))
}

/// Max-min fair share: the level `l` with `sum(min(demand, l)) == budget`, or `None` when every demand fits.
fn water_level(mut demands: Vec<u64>, budget: u64) -> Option<u64> {
    demands.sort_unstable();
    let n = demands.len() as u64;
    let mut left = budget;
    for (i, d) in demands.into_iter().enumerate() {
        let fair = left / (n - i as u64);
        if d > fair {
            return Some(fair);
        }
        left -= d;
    }
    None
}
