//! SFU rooms over real WebSockets: topology switches, the reserved peer id `sfu`, server-driven offers with the
//! track mapping, and what a v1 client gets. Loopback only.

use webcall_testkit as common;

use common::msg::{hello, peers};
use common::{Client, ServerProc};
use std::time::Instant;
use str0m::media::{Direction, MediaKind};
use str0m::Rtc;
use webcall_protocol::{ErrorCode, Join, PeerData, ServerMessage as M, Signal, BYE, SFU_PEER};

/// `{"type":"topology","mode":"sfu"}`.
fn to_sfu() -> M {
    M::Topology { mode: "sfu".into(), restart: false }
}

/// A browser-like offer: audio and video, sendrecv.
fn offer() -> String {
    offer_from().1
}

/// The same, keeping the client's side to answer the server's offers with.
fn offer_from() -> (Rtc, String, str0m::change::SdpPendingOffer) {
    let mut rtc = Rtc::builder().build(Instant::now());
    let mut change = rtc.sdp_api();
    change.add_media(MediaKind::Audio, Direction::SendRecv, None, None, None);
    change.add_media(MediaKind::Video, Direction::SendRecv, None, None, None);
    let (offer, pending) = change.apply().unwrap();
    (rtc, offer.to_sdp_string(), pending)
}

#[tokio::test]
async fn auto_moves_the_third_peer_to_the_sfu_which_answers_and_offers_tracks() {
    let server = ServerProc::start(&[]);
    let url = server.ws_url();
    let (mut a, _) = Client::join_sfu(&url, "r", "A").await;
    let (mut b, _) = Client::join_sfu(&url, "r", "B").await;
    a.expect("hello").await;
    let (mut c, w) = Client::join_sfu(&url, "r", "C").await;
    assert_eq!(peers(w).len(), 2);
    assert_eq!(c.recv().await, to_sfu());
    assert_eq!(a.recv().await, to_sfu());
    assert_eq!(a.recv().await, hello(&c.id, "C"));
    assert_eq!(b.recv().await, to_sfu());
    b.expect("hello").await;

    // A offers to the SFU and gets its answer (ICE-lite, the media port as the candidate).
    let (mut a_rtc, a_offer, a_pending) = offer_from();
    a.relay(SFU_PEER, Signal::Offer(a_offer)).await;
    let M::Answer { from, sdp } = a.expect("answer").await else { unreachable!() };
    assert_eq!(from, SFU_PEER);
    assert!(sdp.contains("a=ice-lite") && sdp.contains(" typ host"), "{sdp}");
    a_rtc.sdp_api().accept_answer(a_pending, str0m::change::SdpAnswer::from_sdp_string(&sdp).unwrap()).unwrap();

    // B publishes: A gets a server offer carrying B's audio and video, labelled with B's id.
    let b_offer = offer();
    b.relay(SFU_PEER, Signal::Offer(b_offer.clone())).await;
    b.expect("answer").await;
    let M::Offer { from, sdp, tracks: Some(tracks) } = a.expect("offer").await else {
        panic!("an SFU offer has tracks")
    };
    assert_eq!(from, SFU_PEER);
    assert_eq!(tracks.len(), 2, "{tracks:?}");
    assert!(tracks.iter().all(|t| t.peer == b.id), "{tracks:?}");
    // `peerMid`: each track's m-line in B's own offer (how a page tells B's screen from its camera).
    let mut b_mids: Vec<&str> = b_offer.lines().filter_map(|l| l.trim_end().strip_prefix("a=mid:")).collect();
    let mut peer_mids: Vec<&str> = tracks.iter().map(|t| t.peer_mid.as_str()).collect();
    b_mids.sort();
    peer_mids.sort();
    assert_eq!(peer_mids, b_mids, "{tracks:?}");
    let mut kinds: Vec<&str> = tracks.iter().map(|t| t.kind.as_str()).collect();
    kinds.sort();
    assert_eq!(kinds, ["audio", "video"]);
    let server_offer = str0m::change::SdpOffer::from_sdp_string(&sdp).unwrap();
    let a_answer = a_rtc.sdp_api().accept_offer(server_offer).unwrap().to_sdp_string();
    a.relay(SFU_PEER, Signal::Answer(a_answer)).await;

    // An unreadable SDP gets a clear error.
    c.relay(SFU_PEER, Signal::Offer("v=0 nonsense".into())).await;
    let e = c.expect_error(ErrorCode::BadField).await;
    assert_eq!(e.refers_to.as_deref(), Some("offer"));

    // /metrics: A's and B's audio and video are published.
    let m = server.metrics();
    assert!(m.lines().any(|l| l == "webcall_sfu_tracks 4"), "{m}");
    assert!(m.contains("webcall_sfu_sessions "), "{m}");

    // B leaves: A gets an offer without B's tracks; the room stays on the SFU.
    b.send_text(BYE).await;
    loop {
        if let M::Offer { from, tracks, .. } = a.recv().await {
            assert_eq!((from.as_str(), tracks), (SFU_PEER, Some(vec![])));
            break;
        }
    }
}

#[tokio::test]
async fn a_v1_client_is_refused_by_an_sfu_room_with_needs_sfu() {
    let server = ServerProc::start(&["--topology", "sfu"]);
    let url = server.ws_url();
    let mut v1 = Client::connect(&url).await;
    v1.send_join(Join::new("r", "old")).await;
    let e = v1.expect_error(ErrorCode::NeedsSfu).await;
    assert_eq!(e.refers_to.as_deref(), Some("join"));
    let (mut s, _) = Client::join_sfu(&url, "r", "new").await;
    assert_eq!(s.recv().await, to_sfu());
}

#[tokio::test]
async fn an_auto_room_on_the_sfu_refuses_v1_passes_data_on_and_has_its_own_cap() {
    let server = ServerProc::start(&["--max-peers", "2", "--max-sfu-peers", "3"]);
    let url = server.ws_url();
    let (mut a, _) = Client::join_sfu(&url, "r", "A").await;
    let (mut b, _) = Client::join_sfu(&url, "r", "B").await;
    a.expect("hello").await;
    // Peer-to-peer: `data` is refused (the data channel carries it).
    a.send_data(&PeerData::chat("p2p", "A", 1).to_value()).await;
    assert_eq!(a.expect_error(ErrorCode::NeedsSfu).await.refers_to.as_deref(), Some("data"));
    // The third moves the room to the SFU, past --max-peers 2 (SFU rooms have --max-sfu-peers).
    let (mut c, _) = Client::join_sfu(&url, "r", "C").await;
    c.expect("topology").await;
    a.expect("topology").await;
    a.expect("hello").await;
    b.expect("topology").await;
    b.expect("hello").await;
    // A protocol v1 client (no "sfu":true) gets needs-sfu, and nothing else happens.
    let mut v1 = Client::connect(&url).await;
    v1.send_join(Join::new("r", "old")).await;
    let e = v1.expect_error(ErrorCode::NeedsSfu).await;
    assert_eq!(e.refers_to.as_deref(), Some("join"));
    // A fourth SFU client is over --max-sfu-peers 3.
    let mut d = Client::connect(&url).await;
    d.send_join(Join { sfu: true, ..Join::new("r", "D") }).await;
    d.expect_error(ErrorCode::RoomFull).await;
    // `data` reaches every other member unchanged, with `from`.
    let chat = PeerData::chat("hi \"all\"", "A", 1).to_value();
    a.send_data(&chat).await;
    for x in [&mut b, &mut c] {
        assert_eq!(x.recv().await, M::Data { from: a.id.clone(), data: chat.clone() });
    }
    // A mesh room (clients without SFU) is bounded by --max-peers 2.
    let (_x, _) = Client::join(&url, "m", "X").await;
    let (_y, _) = Client::join(&url, "m", "Y").await;
    let mut z = Client::connect(&url).await;
    z.send_join(Join::new("m", "Z")).await;
    z.expect_error(ErrorCode::RoomFull).await;
}

#[tokio::test]
async fn mesh_keeps_three_peers_peer_to_peer() {
    let server = ServerProc::start(&["--topology", "mesh"]);
    let url = server.ws_url();
    let (mut a, _) = Client::join_sfu(&url, "r", "A").await;
    let (b, _) = Client::join_sfu(&url, "r", "B").await;
    let (c, _) = Client::join_sfu(&url, "r", "C").await;
    assert_eq!(a.recv().await, hello(&b.id, "B"));
    assert_eq!(a.recv().await, hello(&c.id, "C"));
    a.relay(SFU_PEER, Signal::Offer(offer())).await;
    a.expect_error(ErrorCode::UnknownPeer).await;
}
