//! The SFU's media-port demux: any datagrams (UDP) or ICE-TCP byte streams (RFC 4571, cut into reads of any
//! sizes), from known and unknown addresses, STUN-shaped with a live session's ufrag or not, never panic; a
//! datagram from an address no check introduced that is not STUN is dropped and counted (it costs its sender
//! only), and the TCP deframer yields the same frames however the stream is cut.
#![no_main]

use std::net::SocketAddr;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use str0m::change::SdpOffer;
use str0m::config::DtlsCert;
use str0m::media::{Direction, MediaKind};
use str0m::net::Protocol;
use str0m::Rtc;
use webcall_sfu::tcp::{frame_into, Deframer};
use webcall_sfu::{Sfu, SfuConfig, SfuOutput};

#[derive(Arbitrary, Debug)]
enum Op {
    /// A datagram from source `from` (0-3: addresses that may become known, others: unknown).
    Udp {
        from: u8,
        stun_ufrag: bool,
        data: Vec<u8>,
    },
    /// A TCP stream from `from`, as frames, cut into reads of these sizes.
    Tcp {
        from: u8,
        frames: Vec<Vec<u8>>,
        reads: Vec<u8>,
    },
    Time {
        ms: u16,
    },
}

fn cert() -> DtlsCert {
    static C: OnceLock<DtlsCert> = OnceLock::new();
    C.get_or_init(|| str0m::crypto::from_feature_flags().dtls_provider.generate_certificate().expect("a certificate"))
        .clone()
}

fn offer(now: Instant) -> SdpOffer {
    static O: OnceLock<String> = OnceLock::new();
    let sdp = O.get_or_init(|| {
        let mut rtc = Rtc::builder().set_dtls_cert(cert()).build(now);
        let mut change = rtc.sdp_api();
        change.add_media(MediaKind::Video, Direction::SendRecv, None, None, None);
        change.apply().expect("an offer").0.to_sdp_string()
    });
    SdpOffer::from_sdp_string(sdp).expect("our own offer parses")
}

fn stun_with(ufrag: &str, data: &mut Vec<u8>) {
    let user = format!("{ufrag}:x");
    data.resize(data.len().max(24 + user.len()), 0);
    let body = ((data.len() - 20) & 0xfffc) as u16;
    data[..2].copy_from_slice(&[0x00, 0x01]);
    data[2..4].copy_from_slice(&body.to_be_bytes());
    data[4..8].copy_from_slice(&[0x21, 0x12, 0xa4, 0x42]);
    data[20..22].copy_from_slice(&[0x00, 0x06]);
    data[22..24].copy_from_slice(&(user.len() as u16).to_be_bytes());
    data[24..24 + user.len()].copy_from_slice(user.as_bytes());
}

fuzz_target!(|ops: Vec<Op>| {
    let mut now = Instant::now();
    let server: SocketAddr = "192.0.2.10:7882".parse().unwrap();
    let cfg = SfuConfig { host_candidates: vec![server], dtls_cert: Some(cert()), ..Default::default() };
    let mut sfu = Sfu::new(cfg, now);
    sfu.set_tcp_candidates(vec![server]);
    let id = sfu.add_session("room", "a", now);
    let answer = sfu.accept_offer(id, &offer(now).to_sdp_string()).unwrap().unwrap();
    let ufrag = answer.lines().find_map(|l| l.strip_prefix("a=ice-ufrag:")).unwrap().trim().to_string();
    let addr = |from: u8| SocketAddr::from(([198, 51, 100, from], 40000 + from as u16));
    // Addresses a STUN check with the live ufrag came from (the core learns them before checking integrity).
    let mut introduced = [false; 256];
    for op in ops.into_iter().take(64) {
        match op {
            Op::Udp { from, stun_ufrag, mut data } => {
                data.truncate(2000);
                if stun_ufrag {
                    stun_with(&ufrag, &mut data);
                    introduced[from as usize] = true;
                }
                let before = sfu.stats().unrouted_datagrams;
                sfu.handle_receive(now, addr(from), server, &data);
                let is_stun = data.first().is_some_and(|b| *b < 4);
                if !introduced[from as usize] && !is_stun {
                    assert_eq!(sfu.stats().unrouted_datagrams, before + 1, "an unknown address was routed");
                }
            }
            Op::Tcp { from, frames, reads } => {
                let mut stream = Vec::new();
                let mut want = Vec::new();
                for f in frames.iter().take(16) {
                    if frame_into(&mut stream, f) && !f.is_empty() {
                        want.push(f.clone());
                    }
                }
                let mut d = Deframer::new();
                let mut got = Vec::new();
                let (mut off, mut i) = (0, 0);
                while off < stream.len() {
                    let n = if reads.is_empty() { stream.len() } else { reads[i % reads.len()].max(1) as usize };
                    let n = n.min(stream.len() - off);
                    d.push(&stream[off..off + n], |f| got.push(f.to_vec()));
                    off += n;
                    i += 1;
                }
                assert_eq!(got, want);
                assert_eq!(d.pending(), 0);
                for f in got {
                    sfu.handle_receive_on(now, Protocol::Tcp, addr(from), server, &f);
                }
            }
            Op::Time { ms } => {
                now += Duration::from_millis(ms as u64);
                sfu.handle_timeout(now);
            }
        }
        // Drain what the core wants to send; bounded (it always ends with a timeout).
        for _ in 0..10_000 {
            if let SfuOutput::Timeout(_) = sfu.poll_output() {
                break;
            }
        }
    }
});
