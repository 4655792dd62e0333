//! The SFU core: one str0m `Rtc` per participant session, no I/O. Datagrams, signaling and time go in;
//! datagrams, events and the next timeout come out of [`Sfu::poll_output`].

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use str0m::change::{SdpAnswer, SdpOffer, SdpPendingOffer};
use str0m::config::DtlsCert;
use str0m::ice::{IceCreds, StunMessage};
use str0m::media::{Direction, KeyframeRequestKind, MediaData, MediaKind, Mid, Rid};
use str0m::net::{Protocol, Receive, TcpType};
use str0m::{Candidate, Event, IceConnectionState, Input, Output, Rtc, RtcError};

/// A participant's session with the SFU (one peer connection).
pub type SessionId = u64;

/// Self-made keyframe requests (on loss) are sent at most this often per published track.
const KEYFRAME_THROTTLE: Duration = Duration::from_millis(500);
/// Source addresses remembered per session for routing (the oldest is forgotten past this).
const MAX_ADDRS_PER_SESSION: usize = 8;
/// With no session, the caller is still asked back this often (so it never sleeps forever).
const IDLE_TIMEOUT: Duration = Duration::from_secs(1);

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
}

/// How the core is set up.
#[derive(Debug, Clone, Default)]
pub struct SfuConfig {
    /// The addresses put into every session's SDP as host candidates (the media socket, as clients reach it).
    pub host_candidates: Vec<SocketAddr>,
    /// One DTLS certificate for all sessions (generating one per session costs ~50 ms of CPU).
    pub dtls_cert: Option<DtlsCert>,
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
    /// Media frames written to subscribers (str0m packetizes them again, with NACK/RTX).
    pub forwarded_frames: u64,
    pub forwarded_bytes: u64,
    /// Keyframe requests sent to publishers (forwarded PLI/FIR, and the SFU's own on loss or a new subscriber).
    pub keyframe_requests: u64,
    /// Datagrams from addresses/ufrags no session knows; dropped.
    pub unrouted_datagrams: u64,
}

#[derive(Debug)]
struct TrackIn {
    mid: Mid,
    kind: MediaKind,
    last_keyframe_request: Option<Instant>,
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
    timeout: Instant,
    dirty: bool,
}

/// What one session's output means for the others.
#[allow(clippy::large_enum_variant)] // short-lived, in a Vec drained at once
enum Propagate {
    TrackOpen { mid: Mid, kind: MediaKind },
    Media(MediaData),
    Keyframe { origin: SessionId, mid: Mid, rid: Option<Rid>, kind: KeyframeRequestKind },
}

/// The SFU core. See the module documentation.
pub struct Sfu {
    cfg: SfuConfig,
    sessions: HashMap<SessionId, Session>,
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
    speakers: crate::speaker::Speakers,
}

impl Sfu {
    pub fn new(cfg: SfuConfig, now: Instant) -> Self {
        Sfu {
            cfg,
            sessions: HashMap::new(),
            rooms: HashMap::new(),
            by_ufrag: HashMap::new(),
            by_addr: HashMap::new(),
            tcp_candidates: Vec::new(),
            next_id: 1,
            dirty: Vec::new(),
            out: VecDeque::new(),
            now,
            stats: SfuStats::default(),
            speakers: Default::default(),
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
            ..self.stats
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
            .enable_opus(true, false);
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
                tracks_out.push(TrackOut {
                    origin: *other,
                    origin_mid: t.mid,
                    participant: o.participant.clone(),
                    kind: t.kind,
                    state: OutState::ToOpen,
                });
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
                dirty: false,
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
                s.tracks_in.push(TrackIn { mid, kind: m.kind(), last_keyframe_request: None });
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
        // A new subscriber needs a keyframe to start decoding.
        for (origin, mid, kind) in opened {
            if kind == MediaKind::Video {
                self.request_keyframe(origin, mid, None, KeyframeRequestKind::Pli);
            }
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
        self.mark_dirty(id);
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
            if let Err(e) = s.rtc.handle_input(Input::Timeout(now)) {
                tracing::info!("SFU session {id}: timer failed, closing: {e}");
                s.rtc.disconnect();
            }
            self.mark_dirty(id);
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
        let next = self.sessions.values().map(|s| s.timeout).min();
        SfuOutput::Timeout(next.unwrap_or(self.now + IDLE_TIMEOUT).max(self.now))
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
        let now = self.now;
        let mut props = Vec::new();
        let alive = {
            let Some(s) = self.sessions.get_mut(&id) else { return };
            s.dirty = false;
            negotiate(id, s, &mut self.out);
            loop {
                if !s.rtc.is_alive() {
                    break;
                }
                match s.rtc.poll_output() {
                    Ok(Output::Timeout(t)) => {
                        s.timeout = t;
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
                            let known = s.tracks_in.iter().any(|t| t.mid == m.mid);
                            if !ours && !known && m.direction.is_receiving() {
                                s.tracks_in.push(TrackIn { mid: m.mid, kind: m.kind, last_keyframe_request: None });
                                props.push(Propagate::TrackOpen { mid: m.mid, kind: m.kind });
                            }
                        }
                        Event::MediaData(d) => {
                            if !d.contiguous {
                                if let Some(t) = s.tracks_in.iter_mut().find(|t| t.mid == d.mid) {
                                    let due = t.last_keyframe_request.is_none_or(|l| now >= l + KEYFRAME_THROTTLE);
                                    if t.kind == MediaKind::Video && due {
                                        t.last_keyframe_request = Some(now);
                                        props.push(Propagate::Keyframe {
                                            origin: id,
                                            mid: d.mid,
                                            rid: d.rid,
                                            kind: KeyframeRequestKind::Fir,
                                        });
                                    }
                                }
                            }
                            props.push(Propagate::Media(d));
                        }
                        Event::KeyframeRequest(r) => {
                            if let Some(t) = s.tracks_out.iter().find(|t| t.mid() == Some(r.mid)) {
                                props.push(Propagate::Keyframe {
                                    origin: t.origin,
                                    mid: t.origin_mid,
                                    rid: r.rid,
                                    kind: r.kind,
                                });
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
        for p in props {
            self.propagate(id, p);
        }
        if !alive {
            self.close(id, true);
        }
    }

    fn propagate(&mut self, from: SessionId, p: Propagate) {
        let Some(room) = self.sessions.get(&from).map(|s| s.room.clone()) else { return };
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
                        s.tracks_out.push(TrackOut {
                            origin: from,
                            origin_mid: mid,
                            participant: participant.clone(),
                            kind,
                            state: OutState::ToOpen,
                        });
                    }
                    self.mark_dirty(other);
                }
            }
            Propagate::Media(d) => {
                if let Some(level) = d.ext_vals.audio_level {
                    if self.speakers.observe(&room, from, level, self.now).is_some() {
                        self.follow_speaker(&room, &members);
                    }
                }
                for other in members.into_iter().filter(|o| *o != from) {
                    let Some(s) = self.sessions.get_mut(&other) else { continue };
                    let Some(mid) =
                        s.tracks_out.iter().find(|t| t.origin == from && t.origin_mid == d.mid).and_then(|t| {
                            match t.state {
                                OutState::Open(m) => Some(m),
                                _ => None,
                            }
                        })
                    else {
                        continue;
                    };
                    let Some(writer) = s.rtc.writer(mid) else { continue };
                    let Some(pt) = writer.match_params(d.params) else { continue };
                    if let Err(e) = writer.write(pt, d.network_time, d.time, d.data.clone()) {
                        tracing::info!("SFU session {other}: write failed, closing: {e}");
                        s.rtc.disconnect();
                    } else {
                        self.stats.forwarded_frames += 1;
                        self.stats.forwarded_bytes += d.data.len() as u64;
                    }
                    self.mark_dirty(other);
                }
            }
            Propagate::Keyframe { origin, mid, rid, kind } => self.request_keyframe(origin, mid, rid, kind),
        }
    }

    fn request_keyframe(&mut self, origin: SessionId, mid: Mid, rid: Option<Rid>, kind: KeyframeRequestKind) {
        let Some(s) = self.sessions.get_mut(&origin) else { return };
        let Some(mut writer) = s.rtc.writer(mid) else { return };
        if writer.is_request_keyframe_possible(kind) && writer.request_keyframe(rid, kind).is_ok() {
            self.stats.keyframe_requests += 1;
            self.mark_dirty(origin);
        }
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
        let speaker = self.speakers.current(&s.room).filter(|sp| source.is_none() && *sp != id);
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
                    TrackOut {
                        origin,
                        origin_mid: t.mid,
                        participant: participant.clone(),
                        kind,
                        state: OutState::Open(mid),
                    },
                ));
            }
        }
        let s = self.sessions.get_mut(&id).expect("checked above");
        let mut keyframes = Vec::new();
        for (origin_mid, t) in bound {
            if t.kind == MediaKind::Video {
                keyframes.push(origin_mid);
            }
            s.tracks_out.push(t);
        }
        self.mark_dirty(id);
        for mid in keyframes {
            self.request_keyframe(origin, mid, None, KeyframeRequestKind::Pli);
        }
    }

    /// Viewers that follow the speaker (no chosen source) switch to the room's new one.
    fn follow_speaker(&mut self, room: &str, members: &[SessionId]) {
        let Some(speaker) = self.speakers.current(room) else { return };
        for &m in members {
            let Some(s) = self.sessions.get_mut(&m) else { continue };
            let stale = s.tracks_out.is_empty() || s.tracks_out.iter().any(|t| t.origin != speaker);
            if s.role == (SessionRole::Viewer { source: None }) && stale {
                s.tracks_out.clear();
                self.bind_viewer(m);
            }
        }
    }

    fn close(&mut self, id: SessionId, event: bool) {
        let Some(s) = self.sessions.remove(&id) else { return };
        self.speakers.remove(&s.room, id);
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
        }
        for other in members {
            let Some(o) = self.sessions.get_mut(&other) else { continue };
            if matches!(o.role, SessionRole::Viewer { .. }) {
                // A viewer cannot renegotiate: its m-lines stay and get another publisher's media.
                o.tracks_out.retain(|t| t.origin != id);
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
