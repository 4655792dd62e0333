//! The tokio adapter over real sockets on loopback: str0m clients publish to each other through the SFU, over
//! UDP and over ICE-TCP (RFC 6544 / RFC 4571).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use str0m::change::{SdpAnswer, SdpOffer};
use str0m::media::{Direction, MediaKind, MediaTime};
use str0m::net::{Protocol, Receive, TcpType};
use str0m::{Candidate, Event, Input, Output, Rtc};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use webcall_sfu::net::{MediaConfig, SessionSignal, SfuHandle};
use webcall_sfu::tcp::{frame_into, Deframer};

/// How a test client reaches the SFU.
enum Link {
    Udp(UdpSocket),
    Tcp { stream: TcpStream, deframer: Deframer },
}

impl Link {
    async fn send(&mut self, data: &[u8], to: SocketAddr) {
        match self {
            Link::Udp(s) => {
                s.send_to(data, to).await.unwrap();
            }
            Link::Tcp { stream, .. } => {
                let mut f = Vec::new();
                assert!(frame_into(&mut f, data));
                stream.write_all(&f).await.unwrap();
            }
        }
    }

    /// The datagrams (or frames) of one read, with their source.
    async fn recv(&mut self, buf: &mut [u8]) -> Vec<(Vec<u8>, SocketAddr)> {
        match self {
            Link::Udp(s) => {
                let (n, from) = s.recv_from(buf).await.unwrap();
                vec![(buf[..n].to_vec(), from)]
            }
            Link::Tcp { stream, deframer } => {
                let n = stream.read(buf).await.unwrap();
                assert!(n > 0, "the SFU closed the ICE-TCP connection");
                let from = stream.peer_addr().unwrap();
                let mut out = Vec::new();
                deframer.push(&buf[..n], |f| out.push((f.to_vec(), from)));
                out
            }
        }
    }
}

/// Runs one client for `run_for`; returns video frames received per publishing participant.
async fn client(sfu: SfuHandle, name: &str, tcp: bool, run_for: Duration) -> HashMap<String, u64> {
    let mut rtc = Rtc::builder().clear_codecs().enable_vp8(true).enable_opus(true, false).build(Instant::now());
    let (mut link, addr, proto) = if tcp {
        let stream = TcpStream::connect(sfu.local_addr()).await.unwrap();
        let addr = stream.local_addr().unwrap();
        let c = Candidate::builder().tcp().host(addr).tcptype(TcpType::Active).build().unwrap();
        rtc.add_local_candidate(c);
        (Link::Tcp { stream, deframer: Deframer::new() }, addr, Protocol::Tcp)
    } else {
        let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = socket.local_addr().unwrap();
        rtc.add_local_candidate(Candidate::host(addr, "udp").unwrap());
        (Link::Udp(socket), addr, Protocol::Udp)
    };
    let mut change = rtc.sdp_api();
    let video = change.add_media(MediaKind::Video, Direction::SendRecv, None, None, None);
    let (offer, pending) = change.apply().unwrap();
    let (id, mut signals) = sfu.add_session("room", name).await.unwrap();
    let answer = sfu.offer(id, offer.to_sdp_string()).await.unwrap().unwrap();
    assert!(answer.contains(" tcp ") && answer.contains("tcptype passive"), "no passive TCP candidate: {answer}");
    rtc.sdp_api().accept_answer(pending, SdpAnswer::from_sdp_string(&answer).unwrap()).unwrap();

    let end = tokio::time::Instant::now() + run_for;
    let mut mapping: HashMap<String, String> = HashMap::new();
    let mut received: HashMap<String, u64> = HashMap::new();
    let (mut connected, mut n, mut next_frame) = (false, 0u64, Instant::now());
    let mut buf = vec![0u8; 65536];
    while tokio::time::Instant::now() < end {
        let timeout = loop {
            match rtc.poll_output().unwrap() {
                Output::Timeout(t) => break t,
                Output::Transmit(t) => {
                    assert_eq!(t.proto, proto);
                    link.send(&t.contents, t.destination).await;
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
            r = link.recv(&mut buf) => {
                for (data, source) in r {
                    let contents = data.as_slice().try_into().unwrap();
                    let input = Input::Receive(Instant::now(), Receive { proto, source, destination: addr, contents });
                    rtc.handle_input(input).unwrap();
                }
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

fn loopback() -> MediaConfig {
    MediaConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        external_ip: None,
        dtls_cert: None,
        caps: Default::default(),
        record_dir: None,
    }
}

#[tokio::test]
async fn two_clients_exchange_video_over_loopback_udp() {
    let sfu = SfuHandle::start(loopback()).await.unwrap();
    assert_ne!(sfu.local_addr().port(), 0);
    let (a, b) = tokio::join!(
        client(sfu.clone(), "a", false, Duration::from_secs(3)),
        client(sfu.clone(), "b", false, Duration::from_secs(3))
    );
    assert!(a.get("b").copied().unwrap_or(0) > 20, "a got {a:?}");
    assert!(b.get("a").copied().unwrap_or(0) > 20, "b got {b:?}");
    tokio::time::sleep(Duration::from_millis(250)).await;
    let (stats, net) = (sfu.stats(), sfu.net_stats());
    assert_eq!(stats.tracks, 2);
    assert!(stats.forwarded_frames > 40, "{stats:?}");
    // Each test frame fits one packet.
    assert!(net.forwarded_packets >= stats.forwarded_frames, "{net:?} {stats:?}");
    assert!(net.forwarded_packet_bytes > net.forwarded_packets * 12, "{net:?}");
}

#[tokio::test]
async fn a_client_over_ice_tcp_and_one_over_udp_exchange_video() {
    let sfu = SfuHandle::start(loopback()).await.unwrap();
    let (a, b) = tokio::join!(
        client(sfu.clone(), "a", true, Duration::from_secs(3)),
        client(sfu.clone(), "b", false, Duration::from_secs(3))
    );
    assert!(a.get("b").copied().unwrap_or(0) > 20, "a (TCP) got {a:?}");
    assert!(b.get("a").copied().unwrap_or(0) > 20, "b (UDP) got {b:?}");
    tokio::time::sleep(Duration::from_millis(250)).await;
    // The client closed its connection on leaving; the SFU noticed and refused none.
    let net = sfu.net_stats();
    assert_eq!((net.tcp_connections, net.tcp_refused), (0, 0), "{net:?}");
}

#[tokio::test]
async fn ice_tcp_connections_nobody_claims_are_closed() {
    let sfu = SfuHandle::start(loopback()).await.unwrap();
    // A frame no session knows: the connection is closed at once.
    let mut s = TcpStream::connect(sfu.local_addr()).await.unwrap();
    let mut f = Vec::new();
    frame_into(&mut f, &[0x80; 100]);
    s.write_all(&f).await.unwrap();
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await.expect("closed in time");
    assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");
    // Garbage on UDP from an unknown address: dropped after one lookup, counted.
    let u = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    for i in 0..100u8 {
        u.send_to(&[i; 64], sfu.local_addr()).await.unwrap();
    }
    let t0 = Instant::now();
    while sfu.stats().unrouted_datagrams < 101 && t0.elapsed() < Duration::from_secs(5) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(sfu.stats().unrouted_datagrams, 101, "{:?}", sfu.stats());
    assert!(sfu.net_stats().tcp_refused >= 1);
    assert_eq!(sfu.net_stats().tcp_connections, 0);
}

#[tokio::test]
async fn a_wildcard_listen_address_advertises_the_interfaces() {
    let cfg = MediaConfig {
        listen: "0.0.0.0:0".parse().unwrap(),
        external_ip: None,
        dtls_cert: None,
        caps: Default::default(),
        record_dir: None,
    };
    let sfu = SfuHandle::start(cfg).await.unwrap();
    assert!(!sfu.advertised().is_empty());
    assert!(sfu.advertised().iter().all(|ip| !ip.is_unspecified()), "{:?}", sfu.advertised());
    let cfg = MediaConfig {
        listen: "0.0.0.0:0".parse().unwrap(),
        external_ip: Some("192.0.2.7".parse().unwrap()),
        dtls_cert: None,
        caps: Default::default(),
        record_dir: None,
    };
    let sfu = SfuHandle::start(cfg).await.unwrap();
    assert_eq!(sfu.advertised(), ["192.0.2.7".parse::<std::net::IpAddr>().unwrap()]);
}
