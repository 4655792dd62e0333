//! WHIP publishers and WHEP viewers in the SFU core, with simulated time: a publisher is never offered others'
//! tracks; a viewer gets its chosen participant's media on the m-lines of its own offer, and follows the active
//! speaker without a choice.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use str0m::change::{SdpAnswer, SdpOffer};
use str0m::media::{Direction, MediaKind, MediaTime, Mid};
use str0m::net::{Protocol, Receive};
use str0m::{Candidate, Event, Input, Output, Rtc};
use webcall_sfu::{SessionId, SessionRole, Sfu, SfuConfig, SfuEvent, SfuOutput};

struct Client {
    name: &'static str,
    rtc: Rtc,
    addr: SocketAddr,
    session: SessionId,
    /// Sending m-lines (audio, video) when it publishes.
    send: Option<(Mid, Mid)>,
    /// Audio level it puts on its audio (dBov, 0 loudest).
    level: i8,
    /// Frames received per kind, by the marker byte the publisher put in (its name's first letter).
    received: HashMap<(u8, MediaKind), u64>,
    offers: u32,
    connected: bool,
    timeout: Instant,
}

struct Net {
    now: Instant,
    sfu: Sfu,
    sfu_timeout: Instant,
    clients: Vec<Client>,
    next_frame: Instant,
    n: u64,
}

impl Net {
    fn new() -> Net {
        let now = Instant::now();
        let sfu = Sfu::new(
            SfuConfig {
                host_candidates: vec!["127.0.0.1:7882".parse().unwrap()],
                follow_bwe: false,
                ..Default::default()
            },
            now,
        );
        Net { now, sfu, sfu_timeout: now, clients: Vec::new(), next_frame: now, n: 0 }
    }

    /// A client offers `dir` audio and video (sendrecv for a page, sendonly for WHIP, recvonly for WHEP).
    fn join(&mut self, name: &'static str, role: SessionRole, dir: Direction) {
        let addr: SocketAddr = format!("127.0.0.2:{}", 5000 + self.clients.len()).parse().unwrap();
        let mut rtc = Rtc::builder().clear_codecs().enable_vp8(true).enable_opus(true, false).build(self.now);
        rtc.add_local_candidate(Candidate::host(addr, "udp").unwrap());
        let mut change = rtc.sdp_api();
        let audio = change.add_media(MediaKind::Audio, dir, Some(name.into()), None, None);
        let video = change.add_media(MediaKind::Video, dir, Some(name.into()), None, None);
        let (offer, pending) = change.apply().unwrap();
        let session = self.sfu.add_session_with("room", name, role, self.now);
        let answer = self.sfu.accept_offer(session, &offer.to_sdp_string()).unwrap().unwrap();
        rtc.sdp_api().accept_answer(pending, SdpAnswer::from_sdp_string(&answer).unwrap()).unwrap();
        let send = (dir != Direction::RecvOnly).then_some((audio, video));
        let c = Client {
            name,
            rtc,
            addr,
            session,
            send,
            level: -30,
            received: HashMap::new(),
            offers: 0,
            connected: false,
            timeout: self.now,
        };
        self.clients.push(c);
    }

    fn client(&mut self, name: &str) -> &mut Client {
        self.clients.iter_mut().find(|c| c.name == name).unwrap()
    }

    fn got(&mut self, rx: &str, from: &str, kind: MediaKind) -> u64 {
        let marker = from.as_bytes()[0];
        self.client(rx).received.get(&(marker, kind)).copied().unwrap_or(0)
    }

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
        self.next_frame = self.now + Duration::from_millis(33);
        self.n += 1;
        let n = self.n;
        for c in self.clients.iter_mut().filter(|c| c.connected) {
            let Some((audio, video)) = c.send else { continue };
            let marker = c.name.as_bytes()[0];
            // A VP8 payload: a keyframe every 30 frames (bit 0 clear), the marker, filler.
            let mut frame = vec![if n % 30 == 1 { 0x10 } else { 0x11 }, 0x02, 0x00, 0x9d, 0x01, 0x2a, marker];
            frame.extend(std::iter::repeat_n(n as u8, 600));
            let w = c.rtc.writer(video).unwrap();
            let pt = w.payload_params().next().unwrap().pt();
            w.write(pt, self.now, MediaTime::from_90khz(n * 3000), frame).unwrap();
            let w = c.rtc.writer(audio).unwrap().audio_level(c.level, c.level > -127);
            let pt = w.payload_params().next().unwrap().pt();
            let t = MediaTime::new(n * 1584, str0m::media::Frequency::FORTY_EIGHT_KHZ);
            w.write(pt, self.now, t, vec![marker; 80]).unwrap();
        }
    }

    fn exchange(&mut self) {
        loop {
            let mut busy = false;
            loop {
                match self.sfu.poll_output() {
                    SfuOutput::Timeout(t) => {
                        self.sfu_timeout = t;
                        break;
                    }
                    SfuOutput::Transmit(t) => {
                        busy = true;
                        let Some(c) = self.clients.iter_mut().find(|c| c.addr == t.destination) else { continue };
                        let contents = t.contents.as_slice().try_into().unwrap();
                        let r =
                            Receive { proto: Protocol::Udp, source: t.source, destination: t.destination, contents };
                        c.rtc.handle_input(Input::Receive(self.now, r)).unwrap();
                    }
                    SfuOutput::Event(SfuEvent::Offer { session, sdp, .. }) => {
                        busy = true;
                        let c = self.clients.iter_mut().find(|c| c.session == session).unwrap();
                        c.offers += 1;
                        let answer = c.rtc.sdp_api().accept_offer(SdpOffer::from_sdp_string(&sdp).unwrap()).unwrap();
                        self.sfu.accept_answer(session, &answer.to_sdp_string()).unwrap();
                    }
                    SfuOutput::Event(_) => {}
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
                            let marker = if kind == MediaKind::Video { d.data.get(6) } else { d.data.first() };
                            *c.received.entry((marker.copied().unwrap_or(0), kind)).or_default() += 1;
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
fn a_publisher_is_never_offered_tracks_and_a_viewer_plays_its_chosen_participant() {
    let mut net = Net::new();
    net.join("alice", SessionRole::Participant, Direction::SendRecv);
    net.join("obs", SessionRole::Publisher, Direction::SendOnly);
    net.join("viewer", SessionRole::Viewer { source: Some(Arc::from("obs")) }, Direction::RecvOnly);
    net.run(Duration::from_secs(3));
    assert!(net.clients.iter().all(|c| c.connected));
    // The page gets the publisher's media by a server offer; the publisher and the viewer are never offered.
    assert!(net.got("alice", "obs", MediaKind::Video) > 30);
    assert!(net.got("alice", "obs", MediaKind::Audio) > 30);
    assert_eq!((net.client("obs").offers, net.client("viewer").offers), (0, 0));
    assert!(net.client("obs").received.is_empty(), "a WHIP publisher receives nothing");
    // The viewer plays obs on its own m-lines, and nothing of alice.
    assert!(net.got("viewer", "obs", MediaKind::Video) > 30);
    assert!(net.got("viewer", "obs", MediaKind::Audio) > 30);
    assert_eq!(net.got("viewer", "alice", MediaKind::Video), 0);
    // Viewers are nobody's publisher.
    assert_eq!(net.sfu.stats().tracks, 4);

    // obs leaves: alice is offered its tracks' end, the viewer waits (it chose obs).
    let obs = net.client("obs").session;
    net.sfu.remove_session(obs);
    net.clients.retain(|c| c.name != "obs");
    net.run(Duration::from_millis(500));
    let before = net.got("viewer", "alice", MediaKind::Video);
    net.run(Duration::from_secs(1));
    assert_eq!(net.got("viewer", "alice", MediaKind::Video), before, "a viewer of obs does not get alice");
}

#[test]
fn a_viewer_without_a_choice_follows_the_active_speaker() {
    let mut net = Net::new();
    net.join("alice", SessionRole::Participant, Direction::SendRecv);
    net.join("bob", SessionRole::Participant, Direction::SendRecv);
    net.client("bob").level = -127;
    net.join("viewer", SessionRole::Viewer { source: None }, Direction::RecvOnly);
    net.run(Duration::from_secs(3));
    assert!(net.got("viewer", "alice", MediaKind::Video) > 30, "alice speaks");
    assert_eq!(net.got("viewer", "bob", MediaKind::Video), 0);

    // bob speaks, alice falls silent: after the hold the viewer gets bob's media instead.
    net.client("alice").level = -127;
    net.client("bob").level = -10;
    net.run(Duration::from_secs(4));
    let (a, b) = (net.got("viewer", "alice", MediaKind::Video), net.got("viewer", "bob", MediaKind::Video));
    net.run(Duration::from_secs(1));
    assert!(net.got("viewer", "bob", MediaKind::Video) > b + 20, "bob's video flows to the viewer");
    assert_eq!(net.got("viewer", "alice", MediaKind::Video), a, "alice's stopped");
    assert_eq!(net.client("viewer").offers, 0, "switching needs no renegotiation");

    // The speaker leaves: the viewer gets the one left.
    let bob = net.client("bob").session;
    net.sfu.remove_session(bob);
    net.clients.retain(|c| c.name != "bob");
    let a = net.got("viewer", "alice", MediaKind::Video);
    // A switch starts on a keyframe (this publisher sends one a second, the SFU's PLI may just miss one).
    net.run(Duration::from_secs(2));
    assert!(net.got("viewer", "alice", MediaKind::Video) > a + 20);
}
