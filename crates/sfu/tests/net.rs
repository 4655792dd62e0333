//! The tokio adapter over real UDP on loopback: two str0m clients publish to each other through the SFU.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use str0m::change::{SdpAnswer, SdpOffer};
use str0m::media::{Direction, MediaKind, MediaTime};
use str0m::net::{Protocol, Receive};
use str0m::{Candidate, Event, Input, Output, Rtc};
use tokio::net::UdpSocket;
use webcall_sfu::net::{MediaConfig, SessionSignal, SfuHandle, SfuNetError};

/// Runs one client for `run_for`; returns video frames received per publishing participant.
async fn client(sfu: SfuHandle, name: &str, run_for: Duration) -> HashMap<String, u64> {
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = socket.local_addr().unwrap();
    let mut rtc = Rtc::builder().clear_codecs().enable_vp8(true).enable_opus(true, false).build(Instant::now());
    rtc.add_local_candidate(Candidate::host(addr, "udp").unwrap());
    let mut change = rtc.sdp_api();
    let video = change.add_media(MediaKind::Video, Direction::SendRecv, None, None, None);
    let (offer, pending) = change.apply().unwrap();
    let (id, mut signals) = sfu.add_session("room", name).await.unwrap();
    let answer = sfu.offer(id, offer.to_sdp_string()).await.unwrap().unwrap();
    rtc.sdp_api().accept_answer(pending, SdpAnswer::from_sdp_string(&answer).unwrap()).unwrap();

    let end = tokio::time::Instant::now() + run_for;
    let mut mapping: HashMap<String, String> = HashMap::new();
    let mut received: HashMap<String, u64> = HashMap::new();
    let (mut connected, mut n, mut next_frame) = (false, 0u64, Instant::now());
    let mut buf = vec![0u8; 2048];
    while tokio::time::Instant::now() < end {
        let timeout = loop {
            match rtc.poll_output().unwrap() {
                Output::Timeout(t) => break t,
                Output::Transmit(t) => {
                    socket.send_to(&t.contents, t.destination).await.unwrap();
                }
                Output::Event(Event::Connected) => connected = true,
                Output::Event(Event::MediaData(d)) => {
                    let from = mapping.get(&d.mid.to_string()).cloned().unwrap_or_default();
                    *received.entry(from).or_default() += 1;
                }
                Output::Event(_) => {}
            }
        };
        if connected && Instant::now() >= next_frame {
            n += 1;
            next_frame = Instant::now() + Duration::from_millis(33);
            let w = rtc.writer(video).unwrap();
            let pt = w.payload_params().next().unwrap().pt();
            let frame = vec![if n % 30 == 1 { 0x10 } else { 0x11 }, 0x02, 0x00, 0x9d, 0x01, 0x2a, n as u8, 0, 0, 0];
            w.write(pt, Instant::now(), MediaTime::from_90khz(n * 3000), frame).unwrap();
            continue;
        }
        let wake = timeout.min(next_frame).max(Instant::now());
        tokio::select! {
            r = socket.recv_from(&mut buf) => {
                let (len, source) = r.unwrap();
                let contents = buf[..len].try_into().unwrap();
                let input = Input::Receive(Instant::now(), Receive { proto: Protocol::Udp, source, destination: addr, contents });
                rtc.handle_input(input).unwrap();
            }
            s = signals.recv() => match s {
                Some(SessionSignal::Offer { sdp, tracks }) => {
                    mapping = tracks.into_iter().map(|t| (t.mid, t.participant.to_string())).collect();
                    let answer = rtc.sdp_api().accept_offer(SdpOffer::from_sdp_string(&sdp).unwrap()).unwrap();
                    sfu.answer(id, answer.to_sdp_string()).await.unwrap();
                }
                Some(_) => {}
                None => panic!("{name}: the SFU closed the session"),
            },
            _ = tokio::time::sleep_until(wake.into()) => rtc.handle_input(Input::Timeout(Instant::now())).unwrap(),
        }
    }
    received
}

#[tokio::test]
async fn two_clients_exchange_video_over_loopback_udp() {
    let cfg = MediaConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        external_ip: None,
        dtls_cert: None,
        caps: Default::default(),
    };
    let sfu = SfuHandle::start(cfg).await.unwrap();
    assert_ne!(sfu.local_addr().port(), 0);
    let (a, b) = tokio::join!(
        client(sfu.clone(), "a", Duration::from_secs(3)),
        client(sfu.clone(), "b", Duration::from_secs(3))
    );
    assert!(a.get("b").copied().unwrap_or(0) > 20, "a got {a:?}");
    assert!(b.get("a").copied().unwrap_or(0) > 20, "b got {b:?}");
    let stats = sfu.stats();
    assert_eq!(stats.tracks, 2);
    assert!(stats.forwarded_frames > 40, "{stats:?}");
}

#[tokio::test]
async fn a_wildcard_listen_address_needs_an_external_ip() {
    let listen: SocketAddr = "0.0.0.0:0".parse().unwrap();
    let cfg = MediaConfig { listen, external_ip: None, dtls_cert: None, caps: Default::default() };
    assert!(matches!(SfuHandle::start(cfg).await, Err(SfuNetError::Unadvertisable(_))));
    let cfg = MediaConfig {
        listen,
        external_ip: Some("127.0.0.1".parse().unwrap()),
        dtls_cert: None,
        caps: Default::default(),
    };
    SfuHandle::start(cfg).await.unwrap();
}
