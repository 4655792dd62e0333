//! The SFU core driven with simulated time: str0m clients connected to it through in-memory datagrams. Pages'
//! sessions first; then WHIP publishers and WHEP viewers: a publisher is never offered others' tracks; a viewer gets
//! its chosen participant's media on the m-lines of its own offer, and follows the active speaker without a choice.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use str0m::bwe::BweKind;
use str0m::change::{SdpAnswer, SdpOffer, SdpPendingOffer};
use str0m::media::{Direction, KeyframeRequestKind, MediaKind, MediaTime, Mid, Rid, Simulcast, SimulcastLayer};
use str0m::net::{Protocol, Receive};
use str0m::{Candidate, Event, Input, Output, Rtc};
use webcall_sfu::{Caps, RecordOp, SessionId, SessionRole, Sfu, SfuConfig, SfuEvent, SfuOutput, View};

const FRAME: Duration = Duration::from_millis(33);
/// The simulcast layers test clients publish: rid, frame size, bytes per frame.
const LAYERS: [(&str, u16, u16, usize); 3] = [("q", 320, 180, 300), ("h", 640, 360, 600), ("f", 1280, 720, 1200)];

/// A VP8 frame of a layer: keyframes carry the layer's size (RFC 6386 9.1), then the publisher's marker (the
/// first letter of its name, [`WHO_AT`]); every frame ends with the rid's letter.
fn vp8_frame(key: bool, w: u16, h: u16, len: usize, who: u8, mark: u8) -> Vec<u8> {
    let mut f = vec![if key { 0x10 } else { 0x11 }, 0x02, 0x00, 0x9d, 0x01, 0x2a];
    f.extend(w.to_le_bytes());
    f.extend(h.to_le_bytes());
    f.push(who);
    f.resize(len, mark);
    f
}

/// Where a video frame carries its publisher's marker (audio frames are all marker).
const WHO_AT: usize = 10;

/// A video frame one client received: from whom, on which layer (its rid letter), keyframe or not.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Got {
    layer: u8,
    key: bool,
}

struct Client {
    name: &'static str,
    rtc: Rtc,
    addr: SocketAddr,
    session: SessionId,
    video: Mid,
    audio: Mid,
    pending: Option<SdpPendingOffer>,
    /// mid -> publishing participant, from the server's last offer.
    mapping: HashMap<String, String>,
    /// (publisher's marker, kind) -> frames received.
    received: HashMap<(u8, MediaKind), u64>,
    /// Offers the server sent it.
    offers: u32,
    keyframe_requests: u64,
    timeout: Instant,
    connected: bool,
    publishing: bool,
    frames_sent: u32,
    /// Publishes the three layers of [`LAYERS`] (else one layer, the size of "f").
    simulcast: bool,
    /// Answers keyframe requests with a keyframe on the next frame (else only every 30 frames).
    answers_keyframes: bool,
    /// Layers (rid; `None` without simulcast) whose next frame is a keyframe.
    keyframe_due: Vec<Option<Rid>>,
    /// The layers keyframes were requested for.
    requested: Vec<Option<Rid>>,
    /// The RFC 6464 level of the audio it sends (dBov, 0 loudest, -127 silence).
    level: i8,
    /// Simulcast layers it stopped sending.
    dropped: Vec<Option<Rid>>,
    /// Video frames received, per publisher's marker, in order.
    frames: HashMap<u8, Vec<Got>>,
    /// Active speakers announced to this client's session, in order.
    speakers: Vec<String>,
    /// REMB estimates received (bit/s).
    rembs: Vec<u64>,
}

struct Net {
    now: Instant,
    sfu: Sfu,
    sfu_addr: SocketAddr,
    sfu_timeout: Instant,
    clients: Vec<Client>,
    next_frame: Instant,
    closed: Vec<SessionId>,
    /// What the recorder put out, in order.
    records: Vec<RecordOp>,
}

impl Net {
    fn new() -> Net {
        let now = Instant::now();
        let sfu_addr: SocketAddr = "127.0.0.1:7882".parse().unwrap();
        // The stepped clock of these simulated links looks like queueing to the TWCC estimator.
        let sfu = Sfu::new(SfuConfig { host_candidates: vec![sfu_addr], follow_bwe: false, ..Default::default() }, now);
        Net {
            now,
            sfu,
            sfu_addr,
            sfu_timeout: now,
            clients: Vec::new(),
            next_frame: now,
            closed: Vec::new(),
            records: Vec::new(),
        }
    }

    fn join(&mut self, name: &'static str) -> usize {
        self.join_with(name, false)
    }

    /// A client joins as a page (sendrecv, simulcast or not), a WHIP publisher (sendonly) or a WHEP viewer
    /// (recvonly).
    fn join_with(&mut self, name: &'static str, simulcast: bool) -> usize {
        self.join_as(name, SessionRole::Participant, Direction::SendRecv, simulcast)
    }

    fn new_with(caps: Caps) -> Net {
        let mut net = Net::new();
        let cfg = SfuConfig { host_candidates: vec![net.sfu_addr], caps, follow_bwe: false, ..Default::default() };
        net.sfu = Sfu::new(cfg, net.now);
        net
    }

    /// A client joins: it offers audio and video in direction `dir`, the SFU answers.
    fn join_as(&mut self, name: &'static str, role: SessionRole, dir: Direction, simulcast: bool) -> usize {
        let addr: SocketAddr = format!("127.0.0.2:{}", 5000 + self.clients.len()).parse().unwrap();
        let mut rtc = Rtc::builder().clear_codecs().enable_vp8(true).enable_opus(true, false).build(self.now);
        rtc.add_local_candidate(Candidate::host(addr, "udp").unwrap());
        let mut change = rtc.sdp_api();
        let audio = change.add_media(MediaKind::Audio, dir, Some(name.into()), None, None);
        let layers = simulcast.then(|| {
            let mut s = Simulcast::new();
            for (rid, ..) in LAYERS {
                s.add_send_layer(SimulcastLayer::new(rid));
            }
            s
        });
        let video = change.add_media(MediaKind::Video, dir, Some(name.into()), None, layers);
        let (offer, pending) = change.apply().unwrap();
        let session = self.sfu.add_session_with("room", name, role, self.now);
        let answer = self.sfu.accept_offer(session, &offer.to_sdp_string()).unwrap().expect("no glare on join");
        rtc.sdp_api().accept_answer(pending, SdpAnswer::from_sdp_string(&answer).unwrap()).unwrap();
        self.clients.push(Client {
            name,
            rtc,
            addr,
            session,
            video,
            audio,
            pending: None,
            mapping: HashMap::new(),
            received: HashMap::new(),
            offers: 0,
            keyframe_requests: 0,
            timeout: self.now,
            connected: false,
            publishing: dir != Direction::RecvOnly,
            frames_sent: 0,
            simulcast,
            answers_keyframes: true,
            keyframe_due: Vec::new(),
            requested: Vec::new(),
            level: -127,
            dropped: Vec::new(),
            frames: HashMap::new(),
            speakers: Vec::new(),
            rembs: Vec::new(),
        });
        self.clients.len() - 1
    }

    /// "a", "b" and "c" joined, connected and sending for two seconds.
    fn three_in_a_call() -> Net {
        let mut net = Net::new();
        for name in ["a", "b", "c"] {
            net.join(name);
        }
        net.run(Duration::from_secs(2));
        net
    }

    fn client(&self, name: &str) -> &Client {
        self.clients.iter().find(|c| c.name == name).unwrap()
    }

    fn client_mut(&mut self, name: &str) -> &mut Client {
        self.clients.iter_mut().find(|c| c.name == name).unwrap()
    }

    /// The mid on which `receiver` gets `publisher`'s video.
    fn video_mid(&self, receiver: &str, publisher: &str) -> String {
        let c = self.client(receiver);
        c.mapping
            .iter()
            .find(|(mid, p)| *p == publisher && c.rtc.media(mid.as_str().into()).unwrap().kind() == MediaKind::Video)
            .map(|(mid, _)| mid.clone())
            .unwrap()
    }

    fn set_view(&mut self, receiver: &str, publisher: &str, width: u32, height: u32) {
        let mid = self.video_mid(receiver, publisher);
        let session = self.client(receiver).session;
        self.sfu.set_view(session, &mid, View { width, height }).unwrap();
    }

    /// The video frames `receiver` got from `publisher` since the `from`th.
    fn frames(&self, receiver: &str, publisher: &str, from: usize) -> Vec<Got> {
        let v = self.client(receiver).frames.get(&marker(publisher));
        v.map(|v| v[from.min(v.len())..].to_vec()).unwrap_or_default()
    }

    fn frame_count(&self, receiver: &str, publisher: &str) -> usize {
        self.client(receiver).frames.get(&marker(publisher)).map_or(0, Vec::len)
    }

    fn received(&self, receiver: &str, publisher: &str, kind: MediaKind) -> u64 {
        self.client(receiver).received.get(&(marker(publisher), kind)).copied().unwrap_or(0)
    }

    /// Runs everything until `d` of simulated time has passed.
    fn run(&mut self, d: Duration) {
        let end = self.now + d;
        while self.now < end {
            self.exchange();
            self.publish();
            self.exchange();
            let next = self.clients.iter().map(|c| c.timeout).chain([self.sfu_timeout, self.next_frame]).min().unwrap();
            self.now = next.max(self.now + Duration::from_millis(1)).min(end);
            self.sfu.handle_timeout(self.now);
            for c in &mut self.clients {
                c.rtc.handle_input(Input::Timeout(self.now)).unwrap();
            }
        }
    }

    fn publish(&mut self) {
        if self.now < self.next_frame {
            return;
        }
        self.next_frame = self.now + FRAME;
        for c in self.clients.iter_mut().filter(|c| c.connected && c.publishing) {
            let who = marker(c.name);
            c.frames_sent += 1;
            let n = c.frames_sent;
            let ts = MediaTime::from_90khz(n as u64 * 3000);
            let layers: Vec<(Option<Rid>, u16, u16, usize, u8)> = if c.simulcast {
                LAYERS.iter().map(|(rid, w, h, len)| (Some(Rid::from(*rid)), *w, *h, *len, rid.as_bytes()[0])).collect()
            } else {
                vec![(None, 1280, 720, 1200, b'f')]
            };
            for (rid, w, h, len, mark) in layers {
                if c.dropped.contains(&rid) {
                    continue;
                }
                // A keyframe every 30 frames, and on request.
                let due = c.keyframe_due.contains(&rid);
                let key = n % 30 == 1 || due;
                c.keyframe_due.retain(|r| *r != rid);
                let frame = vp8_frame(key, w, h, len, who, mark);
                let mut w = c.rtc.writer(c.video).unwrap();
                let pt = w.payload_params().find(|p| p.spec().codec == str0m::format::Codec::Vp8).unwrap().pt();
                if let Some(rid) = rid {
                    w = w.rid(rid);
                }
                w.write(pt, self.now, ts, frame).unwrap();
            }
            let w = c.rtc.writer(c.audio).unwrap();
            let pt = w.payload_params().next().unwrap().pt();
            w.audio_level(c.level, c.level > -50)
                .write(
                    pt,
                    self.now,
                    MediaTime::new(n as u64 * 1584, str0m::media::Frequency::FORTY_EIGHT_KHZ),
                    vec![who; 80],
                )
                .unwrap();
        }
    }

    /// Delivers datagrams and signaling until nobody has anything to say.
    fn exchange(&mut self) {
        loop {
            let mut busy = false;
            while let Some(op) = self.sfu.poll_record() {
                self.records.push(op);
            }
            loop {
                match self.sfu.poll_output() {
                    SfuOutput::Timeout(t) => {
                        self.sfu_timeout = t;
                        break;
                    }
                    SfuOutput::Transmit(t) => {
                        busy = true;
                        let Some(c) = self.clients.iter_mut().find(|c| c.addr == t.destination) else { continue };
                        let input = Input::Receive(
                            self.now,
                            Receive {
                                proto: Protocol::Udp,
                                source: t.source,
                                destination: t.destination,
                                contents: t.contents.as_slice().try_into().unwrap(),
                            },
                        );
                        c.rtc.handle_input(input).unwrap();
                    }
                    SfuOutput::Event(SfuEvent::Offer { session, sdp, tracks }) => {
                        busy = true;
                        let c = self.clients.iter_mut().find(|c| c.session == session).unwrap();
                        assert!(c.pending.is_none());
                        c.offers += 1;
                        c.mapping = tracks.iter().map(|t| (t.mid.clone(), t.participant.to_string())).collect();
                        let answer = c.rtc.sdp_api().accept_offer(SdpOffer::from_sdp_string(&sdp).unwrap()).unwrap();
                        self.sfu.accept_answer(session, &answer.to_sdp_string()).unwrap();
                    }
                    SfuOutput::Event(SfuEvent::Closed { session }) => self.closed.push(session),
                    SfuOutput::Event(SfuEvent::Connected { .. }) => {}
                    SfuOutput::Event(SfuEvent::ActiveSpeaker { session, participant }) => {
                        if let Some(c) = self.clients.iter_mut().find(|c| c.session == session) {
                            c.speakers.push(participant.to_string());
                        }
                    }
                }
            }
            for c in &mut self.clients {
                loop {
                    match c.rtc.poll_output().unwrap() {
                        Output::Timeout(t) => {
                            c.timeout = t;
                            break;
                        }
                        Output::Transmit(t) => {
                            busy = true;
                            self.sfu.handle_receive(self.now, t.source, t.destination, &t.contents);
                        }
                        Output::Event(Event::Connected) => c.connected = true,
                        Output::Event(Event::MediaData(d)) => {
                            let kind = c.rtc.media(d.mid).unwrap().kind();
                            let from = if kind == MediaKind::Video { d.data[WHO_AT] } else { d.data[0] };
                            if kind == MediaKind::Video {
                                let got = Got { layer: *d.data.last().unwrap(), key: d.is_keyframe() };
                                c.frames.entry(from).or_default().push(got);
                            }
                            *c.received.entry((from, kind)).or_default() += 1;
                        }
                        Output::Event(Event::KeyframeRequest(r)) => {
                            assert_eq!(r.mid, c.video);
                            c.keyframe_requests += 1;
                            c.requested.push(r.rid);
                            if c.answers_keyframes {
                                c.keyframe_due.push(r.rid);
                            }
                        }
                        Output::Event(Event::EgressBitrateEstimate(BweKind::Remb { estimate, .. })) => {
                            c.rembs.push(estimate.as_u64());
                        }
                        Output::Event(_) => {}
                    }
                }
            }
            if !busy {
                return;
            }
        }
    }
}

#[test]
fn media_flows_between_three_participants_and_stops_when_one_leaves() {
    let mut net = Net::new();
    net.join("a");
    net.join("b");
    net.run(Duration::from_secs(2));
    assert!(net.client("a").connected && net.client("b").connected);
    // Each got an offer mapping the other's audio and video to the other's id.
    let mut tracks: Vec<&String> = net.client("b").mapping.values().collect();
    tracks.sort();
    assert_eq!(tracks, ["a", "a"]);
    for (rx, tx) in [("a", "b"), ("b", "a")] {
        assert!(net.received(rx, tx, MediaKind::Video) > 20, "{rx} got video from {tx}");
        assert!(net.received(rx, tx, MediaKind::Audio) > 20, "{rx} got audio from {tx}");
    }
    // Nobody gets their own media back.
    assert_eq!(net.received("a", "a", MediaKind::Video), 0);

    net.join("c");
    net.run(Duration::from_secs(2));
    for rx in ["a", "b", "c"] {
        for tx in ["a", "b", "c"].into_iter().filter(|t| *t != rx) {
            assert!(net.received(rx, tx, MediaKind::Video) > 20, "{rx} got video from {tx}");
            assert!(net.received(rx, tx, MediaKind::Audio) > 20, "{rx} got audio from {tx}");
        }
    }
    let stats = net.sfu.stats();
    assert_eq!(stats.sessions, 3);
    assert_eq!(stats.tracks, 6);
    assert!(stats.forwarded_frames > 6 * 2 * 40, "{stats:?}");

    // c leaves: a and b get an offer without c's tracks, and c's media stops reaching them.
    let c = net.client("c").session;
    net.sfu.remove_session(c);
    net.clients.retain(|x| x.name != "c");
    net.run(Duration::from_millis(500));
    assert!(net.client("a").mapping.values().all(|p| p == "b"));
    assert_eq!(net.client("a").mapping.len(), 2);
    let before = net.received("a", "c", MediaKind::Video);
    let from_b = net.received("a", "b", MediaKind::Video);
    net.run(Duration::from_secs(1));
    assert_eq!(net.received("a", "c", MediaKind::Video), before);
    assert!(net.received("a", "b", MediaKind::Video) > from_b + 20);
    assert_eq!(net.sfu.stats().sessions, 2);
    assert!(net.closed.is_empty(), "a removed session is not reported closed");
}

#[test]
fn forwarded_packets_leave_without_a_session_timeout_each() {
    // Guards vendor/str0m's patch: upstream ran a whole session timeout after packets were written and another after
    // every packet its pacer (on with BWE, as in every SFU session) let out, on top of the timers' own: 2.2 per
    // forwarded frame here without the patch, 0.5 with it (the timers').
    let mut net = Net::three_in_a_call();
    let before = net.sfu.stats();
    net.run(Duration::from_secs(2));
    let after = net.sfu.stats();
    let frames = after.forwarded_frames - before.forwarded_frames;
    let timeouts = after.session_timeouts - before.session_timeouts;
    assert!(frames > 6 * 2 * 50, "{after:?}");
    assert!(timeouts < frames, "{timeouts} session timeouts for {frames} forwarded frames");
}

#[test]
fn bookkeeping_timers_wait_for_a_wake_up_that_comes_anyway() {
    // str0m's periodic bookkeeping (the estimator's delay controller, TWCC and RTCP reports) may run up to 10 ms
    // late: the SFU asks to be woken later than it is due, and `timers_due` tells an adapter that woke up for a
    // datagram to run it then. Without this, those timers were half of the media thread's wake-ups at fan-out.
    let mut net = Net::three_in_a_call();
    let mut deferred = 0;
    for _ in 0..100 {
        net.exchange();
        let SfuOutput::Timeout(wake) = net.sfu.poll_output() else { panic!("output left after exchange") };
        let due = (0..=wake.duration_since(net.now).as_millis() as u64)
            .map(|ms| net.now + Duration::from_millis(ms))
            .chain([wake])
            .find(|t| net.sfu.timers_due(*t))
            .expect("timers are due by the time the SFU asks to be woken");
        assert!(wake <= due + Duration::from_millis(11), "a timer due at {due:?} waits until {wake:?}");
        if due < wake {
            deferred += 1;
            // A wake-up for something else at `due` runs what is due.
            let before = net.sfu.stats().session_timeouts;
            net.now = due;
            net.sfu.handle_timeout(due);
            assert!(net.sfu.stats().session_timeouts > before, "timers_due said a timer was due at {due:?}");
        }
        net.run(Duration::from_millis(7));
    }
    assert!(deferred > 10, "only {deferred} of 100 wake-ups had bookkeeping to defer");
    assert!(net.closed.is_empty());
}

#[test]
fn keyframe_request_of_a_subscriber_reaches_the_publisher() {
    let mut net = Net::new();
    net.join("a");
    net.join("b");
    net.run(Duration::from_secs(2));
    let before = net.client("a").keyframe_requests;
    let b_before = net.client("b").keyframe_requests;
    let requests = net.sfu.stats().keyframe_requests;
    // b asks for a keyframe on the m-line carrying a's video.
    let b = net.clients.iter_mut().find(|c| c.name == "b").unwrap();
    let mid = b
        .mapping
        .iter()
        .find(|(mid, p)| *p == "a" && b.rtc.media(mid.as_str().into()).unwrap().kind() == MediaKind::Video)
        .map(|(mid, _)| Mid::from(mid.as_str()))
        .unwrap();
    b.rtc.writer(mid).unwrap().request_keyframe(None, KeyframeRequestKind::Pli).unwrap();
    net.run(Duration::from_millis(300));
    assert_eq!(net.client("a").keyframe_requests, before + 1);
    assert_eq!(net.sfu.stats().keyframe_requests, requests + 1);
    assert_eq!(net.client("b").keyframe_requests, b_before, "b publishes too but nobody asked it");
}

#[test]
fn a_late_joiner_gets_a_keyframe_request_sent_for_it() {
    let mut net = Net::new();
    net.join("a");
    net.run(Duration::from_secs(1));
    assert_eq!(net.client("a").keyframe_requests, 0, "nobody subscribes yet");
    net.join("b");
    net.run(Duration::from_secs(1));
    assert!(net.client("a").keyframe_requests >= 1);
}

#[test]
fn unknown_datagrams_are_dropped_and_counted() {
    let mut net = Net::new();
    net.join("a");
    net.run(Duration::from_millis(500));
    let stranger: SocketAddr = "127.0.0.9:4000".parse().unwrap();
    let before = net.sfu.stats().unrouted_datagrams;
    net.sfu.handle_receive(net.now, stranger, net.sfu_addr, &[0x80, 0x60, 0, 1, 2, 3]);
    net.sfu.handle_receive(net.now, stranger, net.sfu_addr, &[0x00, 0x01, 0x00, 0x00]);
    net.sfu.handle_receive(net.now, stranger, net.sfu_addr, &[]);
    assert_eq!(net.sfu.stats().unrouted_datagrams, before + 3);
    net.run(Duration::from_millis(500));
    assert!(net.client("a").connected);
}

#[test]
fn a_silent_client_is_closed_and_its_tracks_removed() {
    let mut net = Net::new();
    net.join("a");
    net.join("b");
    net.run(Duration::from_secs(1));
    let b = net.client("b").session;
    // b's machine vanishes: nothing more from it.
    net.clients.retain(|c| c.name != "b");
    net.run(Duration::from_secs(60));
    assert_eq!(net.closed, vec![b]);
    assert_eq!(net.sfu.stats().sessions, 1);
    assert!(net.client("a").mapping.is_empty(), "a's offer dropped b's tracks");
}

#[test]
fn a_publisher_s_tracks_are_offered_to_the_others_before_any_media_flows() {
    let mut net = Net::new();
    net.join("a");
    net.join("b");
    // No datagram exchanged yet: the offers come from signaling alone.
    let mut offers = Vec::new();
    loop {
        match net.sfu.poll_output() {
            SfuOutput::Timeout(_) => break,
            SfuOutput::Event(SfuEvent::Offer { session, tracks, .. }) => offers.push((session, tracks.len())),
            _ => {}
        }
    }
    offers.sort();
    assert_eq!(offers, vec![(net.client("a").session, 2), (net.client("b").session, 2)]);
}

#[test]
fn a_client_offer_crossing_the_server_s_is_ignored_and_bad_input_is_refused() {
    let mut net = Net::new();
    net.join("a");
    net.join("b");
    let a = net.client("a").session;
    // The server has an offer out to a (b's tracks) that a has not answered.
    let mut offered = false;
    loop {
        match net.sfu.poll_output() {
            SfuOutput::Timeout(_) => break,
            SfuOutput::Event(SfuEvent::Offer { session, .. }) if session == a => offered = true,
            _ => {}
        }
    }
    assert!(offered);
    // a renegotiates at the same moment: the server is impolite and keeps its own offer.
    let c = net.clients.iter_mut().find(|c| c.name == "a").unwrap();
    let mut change = c.rtc.sdp_api();
    change.add_media(MediaKind::Video, Direction::SendOnly, None, None, None);
    let (offer, _) = change.apply().unwrap();
    assert_eq!(net.sfu.accept_offer(a, &offer.to_sdp_string()).unwrap(), None);

    let b = net.client("b").session;
    assert!(matches!(net.sfu.accept_offer(b, "v=0 nonsense"), Err(webcall_sfu::SfuError::BadSdp(_))));
    assert!(matches!(net.sfu.accept_offer(999, "v=0"), Err(webcall_sfu::SfuError::UnknownSession(999))));
    assert!(matches!(net.sfu.add_candidate(b, "candidate:garbage"), Err(webcall_sfu::SfuError::BadCandidate(_))));
}

/// Garbage on the media port costs the sender only: random datagrams (some shaped as STUN with a live session's
/// ufrag, some from a connected client's address) neither panic nor break the session.
#[test]
fn the_demux_survives_garbage() {
    let mut net = Net::new();
    net.join("a");
    net.join("b");
    net.run(Duration::from_secs(1));
    let a_addr = net.client("a").addr;
    // The server's ufrag for some session, from a STUN-shaped datagram's point of view.
    let ufrag = {
        let mut rtc = Rtc::builder().build(net.now);
        let mut change = rtc.sdp_api();
        change.add_media(MediaKind::Audio, Direction::SendRecv, None, None, None);
        let (offer, _) = change.apply().unwrap();
        let s = net.sfu.add_session("room", "probe", net.now);
        let answer = net.sfu.accept_offer(s, &offer.to_sdp_string()).unwrap().unwrap();
        answer.lines().find_map(|l| l.strip_prefix("a=ice-ufrag:")).unwrap().trim().to_string()
    };
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for i in 0..20_000u32 {
        let len = (next() % 1500) as usize;
        let mut data: Vec<u8> = (0..len).map(|_| next() as u8).collect();
        if i % 3 == 0 && data.len() >= 40 {
            // A STUN binding request header with a USERNAME of the live ufrag, the rest random.
            let body = (data.len() - 20) as u8 & 0xfc;
            data[..4].copy_from_slice(&[0x00, 0x01, 0x00, body]);
            data[4..8].copy_from_slice(&[0x21, 0x12, 0xa4, 0x42]);
            let user = format!("{ufrag}:x");
            data[20..22].copy_from_slice(&[0x00, 0x06]);
            data[22..24].copy_from_slice(&(user.len() as u16).to_be_bytes());
            let end = (24 + user.len()).min(data.len());
            data[24..end].copy_from_slice(&user.as_bytes()[..end - 24]);
        }
        let source = if i % 2 == 0 { a_addr } else { SocketAddr::from(([127, 0, 0, 3], (next() % 60000) as u16)) };
        net.sfu.handle_receive(net.now, source, net.sfu_addr, &data);
        if i % 1000 == 0 {
            while !matches!(net.sfu.poll_output(), SfuOutput::Timeout(_)) {}
        }
    }
    // a and b still exchange media: the probe session's ufrag did not take a's address.
    let before = net.received("b", "a", MediaKind::Video);
    net.run(Duration::from_secs(1));
    assert!(net.received("b", "a", MediaKind::Video) > before + 20);
}

/// A publisher's marker in its frames: its name's first letter (unique in each test).
fn marker(name: &str) -> u8 {
    name.as_bytes()[0]
}

/// Runs until `name` has just sent a keyframe (frame 30k+2), so the next periodic one is a second away.
fn run_past_keyframe(net: &mut Net, name: &str) {
    for _ in 0..200 {
        net.run(Duration::from_millis(10));
        if net.client(name).frames_sent % 30 == 2 {
            return;
        }
    }
    panic!("{name} sends no frames");
}

#[test]
fn a_subscriber_gets_the_layer_its_tile_needs_and_switches_only_on_a_keyframe() {
    let mut net = Net::new();
    net.join_with("a", true);
    net.join("b");
    net.run(Duration::from_secs(2));
    // No view reported: the best layer.
    let got = net.frames("b", "a", 0);
    assert!(got.len() > 20, "{got:?}");
    assert_eq!(got.last().unwrap().layer, b'f');
    assert!(got[0].key, "forwarding starts at a keyframe");

    // b shows a's tile small; a answers no keyframe request, so the switch waits for its next periodic keyframe.
    net.client_mut("a").answers_keyframes = false;
    run_past_keyframe(&mut net, "a");
    let from = net.frame_count("b", "a");
    let switches = net.sfu.stats().layer_switches;
    net.set_view("b", "a", 320, 180);
    net.run(Duration::from_secs(2));
    assert!(net.client("a").requested.contains(&Some(Rid::from("q"))), "a keyframe of q was asked for");
    let got = net.frames("b", "a", from);
    let first_q = got.iter().position(|g| g.layer == b'q').expect("b moved to q");
    assert!(got[first_q].key, "the switch happens on a keyframe of the new layer: {got:?}");
    assert!(first_q >= 20, "until then b kept getting f, without a gap: {first_q}");
    assert!(got[..first_q].iter().all(|g| g.layer == b'f'));
    assert!(got[first_q..].iter().all(|g| g.layer == b'q'), "nothing of f after the switch");
    assert_eq!(net.sfu.stats().layer_switches, switches + 1);

    // A middle-sized tile: h (the smallest layer that fills it); a answers keyframe requests now: quick.
    net.client_mut("a").answers_keyframes = true;
    let from = net.frame_count("b", "a");
    net.set_view("b", "a", 700, 400);
    net.run(Duration::from_millis(500));
    let got = net.frames("b", "a", from);
    let first_h = got.iter().position(|g| g.layer == b'h').expect("b moved to h");
    assert!(got[first_h].key && first_h < 5, "{got:?}");
    assert!(got[first_h..].iter().all(|g| g.layer == b'h'));
}

#[test]
fn a_hidden_tile_gets_no_video_and_a_shown_one_starts_at_a_keyframe() {
    let mut net = Net::new();
    net.join_with("a", true);
    net.join("b");
    net.run(Duration::from_secs(2));
    net.set_view("b", "a", 0, 0);
    net.run(Duration::from_millis(100));
    let video = net.frame_count("b", "a");
    let audio = net.received("b", "a", MediaKind::Audio);
    let forwarded = net.sfu.stats().forwarded_frames;
    net.run(Duration::from_secs(2));
    assert_eq!(net.frame_count("b", "a"), video, "nothing of a hidden tile");
    assert!(net.received("b", "a", MediaKind::Audio) > audio + 40, "audio goes on");
    // The SFU forwarded only three streams meanwhile (a gets b's video and audio, b gets a's audio), ~61 frames
    // each in 2 s (one more or less at either end, with what the pacer held); a's video to b would add ~60 more.
    // (The bound was `< 3 * 61`, which a run with 61 of each at the window's edges failed.)
    let delta = net.sfu.stats().forwarded_frames - forwarded;
    assert!(delta < 3 * 61 + 30, "{delta} frames forwarded: no f/h/q to b");

    net.set_view("b", "a", 1280, 720);
    net.run(Duration::from_secs(1));
    let got = net.frames("b", "a", video);
    assert!(got.len() > 20 && got[0].key && got[0].layer == b'f', "{got:?}");
}

#[test]
fn a_publisher_without_simulcast_is_forwarded_whatever_the_tile_size() {
    let mut net = Net::new();
    net.join("a");
    net.join("b");
    net.run(Duration::from_secs(1));
    net.set_view("b", "a", 160, 90);
    let from = net.frame_count("b", "a");
    net.run(Duration::from_secs(1));
    let got = net.frames("b", "a", from);
    assert!(got.len() > 25 && got.iter().all(|g| g.layer == b'f'), "{got:?}");
    assert_eq!(net.sfu.stats().layer_switches, 0);
    // A view of an m-line that is not one of b's video tracks is refused.
    let b = net.client("b").session;
    assert!(matches!(
        net.sfu.set_view(b, "nope", View { width: 1, height: 1 }),
        Err(webcall_sfu::SfuError::UnknownTrack(_))
    ));
}

#[test]
fn the_active_speaker_is_announced_to_the_room_after_a_debounce() {
    let mut net = Net::new();
    for n in ["a", "b", "c"] {
        net.join(n);
    }
    net.run(Duration::from_secs(1));
    assert!(net.clients.iter().all(|c| c.speakers.is_empty()), "nobody speaks yet");
    net.client_mut("a").level = -20;
    net.run(Duration::from_secs(3));
    for c in &net.clients {
        assert_eq!(c.speakers, ["a"], "{} hears a", c.name);
    }
    // A short sound from c (a cough) does not take the floor.
    net.client_mut("c").level = -10;
    net.run(Duration::from_millis(400));
    net.client_mut("c").level = -127;
    net.run(Duration::from_secs(2));
    assert_eq!(net.client("b").speakers, ["a"]);
    // b speaks and a stops: b is the active speaker, announced once.
    net.client_mut("a").level = -127;
    net.client_mut("b").level = -30;
    net.run(Duration::from_secs(3));
    for c in &net.clients {
        assert_eq!(c.speakers, ["a", "b"], "{}", c.name);
    }
}

#[test]
fn publishers_over_the_room_bitrate_cap_are_asked_to_slow_down_not_dropped() {
    // Each client sends ~290 kbit/s of video and ~20 of audio: two of them are over a 400 kbit/s room cap.
    let caps = Caps { max_room_bitrate: 400_000, ..Caps::default() };
    let mut net = Net::new_with(caps);
    net.join("a");
    net.join("b");
    net.run(Duration::from_secs(4));
    for n in ["a", "b"] {
        let rembs = &net.client(n).rembs;
        assert!(!rembs.is_empty(), "{n} was asked to slow down");
        assert!(rembs.iter().all(|r| (150_000..=200_000).contains(r)), "{n}: a fair share of the cap: {rembs:?}");
    }
    assert!(net.sfu.stats().remb_sent >= 4);
    // Nobody was dropped: media still flows both ways.
    let before = net.received("a", "b", MediaKind::Video);
    net.run(Duration::from_secs(1));
    assert!(net.received("a", "b", MediaKind::Video) > before + 20);
    assert!(net.closed.is_empty());

    // Without a cap in reach nobody hears of it.
    let mut net = Net::new();
    net.join("a");
    net.join("b");
    net.run(Duration::from_secs(3));
    assert!(net.client("a").rembs.is_empty());
}

#[test]
fn a_track_over_the_room_track_cap_is_not_forwarded() {
    let caps = Caps { max_room_tracks: 3, ..Caps::default() };
    let mut net = Net::new_with(caps);
    net.join("a");
    net.join("b");
    net.run(Duration::from_secs(2));
    assert_eq!(net.sfu.stats().tracks, 3);
    assert_eq!(net.sfu.stats().refused_tracks, 1);
    // b's second track (video) is the one refused; a gets b's audio, and b gets all of a's.
    assert_eq!(net.received("a", "b", MediaKind::Video), 0);
    assert!(net.received("a", "b", MediaKind::Audio) > 20);
    assert!(net.received("b", "a", MediaKind::Video) > 20);
    assert!(net.closed.is_empty());
}

// WHIP publishers and WHEP viewers.

#[test]
fn a_publisher_is_never_offered_tracks_and_a_viewer_plays_its_chosen_participant() {
    let mut net = Net::new();
    net.join_as("alice", SessionRole::Participant, Direction::SendRecv, false);
    net.join_as("obs", SessionRole::Publisher, Direction::SendOnly, false);
    net.join_as("viewer", SessionRole::Viewer { source: Some(Arc::from("obs")) }, Direction::RecvOnly, false);
    net.run(Duration::from_secs(3));
    assert!(net.clients.iter().all(|c| c.connected));
    // The page gets the publisher's media by a server offer; the publisher and the viewer are never offered.
    assert!(net.received("alice", "obs", MediaKind::Video) > 30);
    assert!(net.received("alice", "obs", MediaKind::Audio) > 30);
    assert_eq!((net.client("obs").offers, net.client("viewer").offers), (0, 0));
    assert!(net.client("obs").received.is_empty(), "a WHIP publisher receives nothing");
    // The viewer plays obs on its own m-lines, and nothing of alice.
    assert!(net.received("viewer", "obs", MediaKind::Video) > 30);
    assert!(net.received("viewer", "obs", MediaKind::Audio) > 30);
    assert_eq!(net.received("viewer", "alice", MediaKind::Video), 0);
    // Viewers are nobody's publisher.
    assert_eq!(net.sfu.stats().tracks, 4);

    // obs leaves: alice is offered its tracks' end, the viewer waits (it chose obs).
    let obs = net.client("obs").session;
    net.sfu.remove_session(obs);
    net.clients.retain(|c| c.name != "obs");
    net.run(Duration::from_millis(500));
    let before = net.received("viewer", "alice", MediaKind::Video);
    net.run(Duration::from_secs(1));
    assert_eq!(net.received("viewer", "alice", MediaKind::Video), before, "a viewer of obs does not get alice");
}

#[test]
fn a_viewer_without_a_choice_follows_the_active_speaker() {
    let mut net = Net::new();
    net.join_as("alice", SessionRole::Participant, Direction::SendRecv, false);
    net.client_mut("alice").level = -30;
    net.join_as("bob", SessionRole::Participant, Direction::SendRecv, false);
    net.join_as("viewer", SessionRole::Viewer { source: None }, Direction::RecvOnly, false);
    net.run(Duration::from_secs(3));
    assert!(net.received("viewer", "alice", MediaKind::Video) > 30, "alice speaks");
    assert_eq!(net.received("viewer", "bob", MediaKind::Video), 0);

    // bob speaks, alice falls silent: after the hold the viewer gets bob's media instead.
    net.client_mut("alice").level = -127;
    net.client_mut("bob").level = -10;
    net.run(Duration::from_secs(4));
    let (a, b) = (net.received("viewer", "alice", MediaKind::Video), net.received("viewer", "bob", MediaKind::Video));
    net.run(Duration::from_secs(1));
    assert!(net.received("viewer", "bob", MediaKind::Video) > b + 20, "bob's video flows to the viewer");
    assert_eq!(net.received("viewer", "alice", MediaKind::Video), a, "alice's stopped");
    assert_eq!(net.client("viewer").offers, 0, "switching needs no renegotiation");

    // The speaker leaves: the viewer gets the one left.
    let bob = net.client("bob").session;
    net.sfu.remove_session(bob);
    net.clients.retain(|c| c.name != "bob");
    let a = net.received("viewer", "alice", MediaKind::Video);
    // A switch starts on a keyframe (this publisher sends one a second, the SFU's PLI may just miss one).
    net.run(Duration::from_secs(2));
    assert!(net.received("viewer", "alice", MediaKind::Video) > a + 20);
}

/// The files of a recording, put together from the recorder's output: (participant, kind, bytes, closed).
fn recorded_files(ops: &[RecordOp]) -> Vec<(String, MediaKind, Vec<u8>, bool)> {
    let mut files: Vec<(u64, String, MediaKind, Vec<u8>, bool)> = Vec::new();
    for op in ops {
        match op {
            RecordOp::Open { file, participant, kind, .. } => {
                files.push((*file, participant.to_string(), *kind, Vec::new(), false))
            }
            RecordOp::Append { file, bytes } => {
                files.iter_mut().find(|f| f.0 == *file).expect("appended to an open file").3.extend(bytes)
            }
            RecordOp::Close { file, tail, patches, .. } => {
                let f = files.iter_mut().find(|f| f.0 == *file).expect("closed an open file");
                f.3.extend(tail);
                for (at, b) in patches {
                    f.3[*at as usize..*at as usize + b.len()].copy_from_slice(b);
                }
                f.4 = true;
            }
        }
    }
    files.into_iter().map(|f| (f.1, f.2, f.3, f.4)).collect()
}

/// The blocks of a one-track WebM file: (timestamp ms, keyframe, last byte of the frame).
fn blocks(file: &[u8]) -> Vec<(i64, bool, u8)> {
    use webm_iterable::matroska_spec::{MatroskaSpec, SimpleBlock};
    let mut out = Vec::new();
    let mut cluster = 0i64;
    for tag in webm_iterable::WebmIterator::new(file, &[]) {
        match tag.expect("the file parses") {
            MatroskaSpec::Timestamp(t) => cluster = t as i64,
            b @ MatroskaSpec::SimpleBlock(_) => {
                let sb = SimpleBlock::try_from(&b).unwrap();
                out.push((cluster + sb.timestamp as i64, sb.keyframe, *sb.raw_frame_data().last().unwrap()));
            }
            _ => {}
        }
    }
    out
}

#[test]
fn a_recording_keeps_one_layer_starts_on_keyframes_and_ends_files_of_leavers() {
    let mut net = Net::new();
    net.join_with("a", true);
    net.join("b");
    net.run(Duration::from_secs(1));
    // b shows a small: what it receives does not change what is recorded.
    net.set_view("b", "a", 320, 180);
    net.client_mut("a").answers_keyframes = false;
    assert!(net.sfu.start_recording("room"));
    assert!(!net.sfu.start_recording("room"), "already recording");
    net.run(Duration::from_secs(3));
    assert!(net.client("a").requested.contains(&Some(Rid::from("f"))), "a keyframe of the recorded layer was asked");
    assert_eq!(net.sfu.stats().recording_files, 4, "{:?}", net.sfu.stats());
    // The recorded layer stops coming: the recording goes on with the next best one, from its keyframe.
    net.client_mut("a").dropped.push(Some(Rid::from("f")));
    net.client_mut("a").answers_keyframes = true;
    net.run(Duration::from_secs(3));
    // f comes back (the estimate grew again): the recording steps up to it, at its keyframe.
    net.client_mut("a").dropped.clear();
    net.run(Duration::from_secs(2));
    // a leaves: its files end; b's go on until the recording stops.
    let a = net.client("a").session;
    net.sfu.remove_session(a);
    net.clients.retain(|c| c.name != "a");
    net.run(Duration::from_millis(200));
    let files = recorded_files(&net.records);
    assert!(files.iter().filter(|f| f.0 == "a").all(|f| f.3), "a's files are closed");
    assert!(files.iter().filter(|f| f.0 == "b").all(|f| !f.3), "b's are still open");
    net.run(Duration::from_secs(1));
    assert!(net.sfu.stop_recording("room"));
    net.run(Duration::from_millis(100));
    let files = recorded_files(&net.records);
    assert_eq!(files.len(), 4, "audio and video of a and b");
    assert!(files.iter().all(|f| f.3), "all closed");
    assert_eq!(net.sfu.stats().recording_files, 0);

    let (_, _, a_video, _) = files.iter().find(|f| f.0 == "a" && f.1 == MediaKind::Video).unwrap();
    let got = blocks(a_video);
    assert!(got[0].1, "the file starts with a keyframe");
    let first_h = got.iter().position(|b| b.2 == b'h').expect("recorded h once f was gone");
    assert!(got[first_h].1, "the change of layer is at a keyframe");
    assert!(got[..first_h].iter().all(|b| b.2 == b'f'), "only f before: {:?}", &got[..first_h]);
    let back = first_h + got[first_h..].iter().position(|b| b.2 == b'f').expect("back to f when it came back");
    assert!(got[back].1, "the step up is at a keyframe too");
    assert!(got[first_h..back].iter().all(|b| b.2 == b'h'), "only h between");
    assert!(got[back..].iter().all(|b| b.2 == b'f'), "only f after");
    // 30 fps for about 8 s (less the wait for the first keyframe and the gap while f was gone).
    assert!((180..=245).contains(&got.len()), "{} frames", got.len());
    assert!(got.windows(2).all(|w| w[0].0 <= w[1].0), "time never goes back");
    let gap = got[first_h].0 - got[first_h - 1].0;
    assert!((1..2000).contains(&gap), "time runs on across the layer change: {gap} ms");

    let (_, _, b_audio, _) = files.iter().find(|f| f.0 == "b" && f.1 == MediaKind::Audio).unwrap();
    let audio = blocks(b_audio);
    assert!(audio.len() > 100, "{} audio frames", audio.len());
}
