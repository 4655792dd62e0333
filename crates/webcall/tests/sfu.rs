//! SFU rooms over real WebSockets: topology switches, the reserved peer id `sfu`, server-driven offers with the
//! track mapping, and what a v1 client gets. Loopback only.

use webcall_testkit as common;

use common::{Client, ServerProc};
use serde_json::json;
use std::time::Instant;
use str0m::media::{Direction, MediaKind};
use str0m::Rtc;
use webcall_protocol::{Join, Signal, BYE};

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
    assert_eq!(w["peers"].as_array().unwrap().len(), 2);
    assert_eq!(c.expect("topology").await["mode"], "sfu");
    assert_eq!(a.expect("topology").await["mode"], "sfu");
    assert_eq!(a.expect("hello").await["name"], "C");
    assert_eq!(b.expect("topology").await["mode"], "sfu");
    b.expect("hello").await;

    // A offers to the SFU and gets its answer (ICE-lite, the media port as the candidate).
    let (mut a_rtc, a_offer, a_pending) = offer_from();
    a.relay("sfu", Signal::Offer(a_offer)).await;
    let answer = a.expect("answer").await;
    assert_eq!(answer["from"], "sfu");
    let sdp = answer["sdp"].as_str().unwrap();
    assert!(sdp.contains("a=ice-lite") && sdp.contains(" typ host"), "{sdp}");
    a_rtc.sdp_api().accept_answer(a_pending, str0m::change::SdpAnswer::from_sdp_string(sdp).unwrap()).unwrap();

    // B publishes: A gets a server offer carrying B's audio and video, labelled with B's id.
    let b_offer = offer();
    b.relay("sfu", Signal::Offer(b_offer.clone())).await;
    b.expect("answer").await;
    let o = a.expect("offer").await;
    assert_eq!(o["from"], "sfu");
    let tracks = o["tracks"].as_array().unwrap();
    assert_eq!(tracks.len(), 2, "{o}");
    assert!(tracks.iter().all(|t| t["peer"] == b.id.as_str()), "{o}");
    // `peerMid`: each track's m-line in B's own offer (how a page tells B's screen from its camera).
    let mut b_mids: Vec<&str> = b_offer.lines().filter_map(|l| l.trim_end().strip_prefix("a=mid:")).collect();
    let mut peer_mids: Vec<&str> = tracks.iter().map(|t| t["peerMid"].as_str().unwrap()).collect();
    b_mids.sort();
    peer_mids.sort();
    assert_eq!(peer_mids, b_mids, "{o}");
    let mut kinds: Vec<&str> = tracks.iter().map(|t| t["kind"].as_str().unwrap()).collect();
    kinds.sort();
    assert_eq!(kinds, ["audio", "video"]);
    let server_offer = str0m::change::SdpOffer::from_sdp_string(o["sdp"].as_str().unwrap()).unwrap();
    let a_answer = a_rtc.sdp_api().accept_offer(server_offer).unwrap().to_sdp_string();
    a.relay("sfu", Signal::Answer(a_answer)).await;

    // An unreadable SDP gets a clear error.
    c.relay("sfu", Signal::Offer("v=0 nonsense".into())).await;
    let e = c.expect_error("bad-field").await;
    assert_eq!(e["ref"], "offer");

    // /metrics: A's and B's audio and video are published.
    let m = server.metrics();
    assert!(m.lines().any(|l| l == "webcall_sfu_tracks 4"), "{m}");
    assert!(m.contains("webcall_sfu_sessions "), "{m}");

    // B leaves: A gets an offer without B's tracks; the room stays on the SFU.
    b.send_text(BYE).await;
    loop {
        let m = a.recv().await;
        if m["type"] == "offer" {
            assert_eq!(m["tracks"], json!([]), "{m}");
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
    let e = v1.expect_error("needs-sfu").await;
    assert_eq!(e["ref"], "join");
    let (mut s, _) = Client::join_sfu(&url, "r", "new").await;
    assert_eq!(s.expect("topology").await["mode"], "sfu");
}

#[tokio::test]
async fn an_auto_room_on_the_sfu_refuses_v1_passes_data_on_and_has_its_own_cap() {
    let server = ServerProc::start(&["--max-peers", "2", "--max-sfu-peers", "3"]);
    let url = server.ws_url();
    let (mut a, _) = Client::join_sfu(&url, "r", "A").await;
    let (mut b, _) = Client::join_sfu(&url, "r", "B").await;
    a.expect("hello").await;
    // Peer-to-peer: `data` is refused (the data channel carries it).
    a.send_data(&json!({"type":"chat","text":"p2p"})).await;
    assert_eq!(a.expect_error("needs-sfu").await["ref"], "data");
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
    let e = v1.expect_error("needs-sfu").await;
    assert_eq!(e["ref"], "join");
    // A fourth SFU client is over --max-sfu-peers 3.
    let mut d = Client::connect(&url).await;
    d.send_join(Join { sfu: true, ..Join::new("r", "D") }).await;
    d.expect_error("room-full").await;
    // `data` reaches every other member unchanged, with `from`.
    let chat = json!({"type":"chat","text":"hi \"all\"","name":"A","ts":1});
    a.send_data(&chat).await;
    for x in [&mut b, &mut c] {
        let m = x.expect("data").await;
        assert_eq!((&m["from"], &m["data"]), (&json!(a.id), &chat), "{m}");
    }
    // A mesh room (clients without SFU) is bounded by --max-peers 2.
    let (_x, _) = Client::join(&url, "m", "X").await;
    let (_y, _) = Client::join(&url, "m", "Y").await;
    let mut z = Client::connect(&url).await;
    z.send_join(Join::new("m", "Z")).await;
    z.expect_error("room-full").await;
}

#[tokio::test]
async fn mesh_keeps_three_peers_peer_to_peer() {
    let server = ServerProc::start(&["--topology", "mesh"]);
    let url = server.ws_url();
    let (mut a, _) = Client::join_sfu(&url, "r", "A").await;
    Client::join_sfu(&url, "r", "B").await;
    Client::join_sfu(&url, "r", "C").await;
    assert_eq!(a.expect("hello").await["name"], "B");
    assert_eq!(a.expect("hello").await["name"], "C");
    a.relay("sfu", Signal::Offer(offer())).await;
    a.expect_error("unknown-peer").await;
}
