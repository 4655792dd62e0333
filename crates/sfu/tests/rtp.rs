//! The RTP-mode forwarding logic driven with simulated time: per-subscriber sequence numbers, timestamps and VP8
//! picture ids stay continuous across simulcast layer switches, switches wait for a keyframe, and VP8 frames are
//! put back together for the recorder.

use std::time::{Duration, Instant};

use str0m::rtp::Vp8Descriptor;
use webcall_sfu::rtp::{
    h264_starts_keyframe, vp8_descriptor_len, Frame, H264Frames, PacketIn, PacketOut, Rewriter, Vp8Frames,
};

/// What the SFU core asks of a VP8 payload: str0m's descriptor says whether it starts a keyframe.
fn vp8_starts_keyframe(payload: &[u8]) -> bool {
    Vp8Descriptor::parse(payload).is_ok_and(|d| d.starts_keyframe(payload))
}

/// A VP8 payload: descriptor with a 15-bit picture id, TL0PICIDX and TID, then `body` (its first byte's bit 0 is
/// the frame tag's P bit: 0 for a keyframe).
fn vp8(start: bool, pid: u16, tl0: u8, body: &[u8]) -> Vec<u8> {
    let mut p =
        vec![0x80 | if start { 0x10 } else { 0 }, 0x80 | 0x40 | 0x20, 0x80 | (pid >> 8) as u8, pid as u8, tl0, 0];
    p.extend_from_slice(body);
    p
}

const KEY: &[u8] = &[0x10, 0x02, 0x00, 0x9d, 0x01, 0x2a, 0x80, 0x02, 0x68, 0x01];
const DELTA: &[u8] = &[0x31, 0x02, 0x00, 0xaa];

/// A simulcast publisher: each layer with its own sequence numbers, clock offset and picture ids.
struct Layer {
    name: &'static str,
    seq: u64,
    time: u32,
    pid: u16,
    tl0: u8,
}

impl Layer {
    /// The next frame of this layer as one packet at `at` (30 fps: 3000 ticks apart).
    fn packet(&mut self, at: Instant, key: bool) -> PacketIn<&'static str> {
        let payload = vp8(true, self.pid, self.tl0, if key { KEY } else { DELTA });
        let d = Vp8Descriptor::parse(&payload).unwrap();
        let p = PacketIn {
            layer: self.name,
            seq: self.seq,
            time: self.time,
            arrival: at,
            keyframe_start: vp8_starts_keyframe(&payload),
            picture_id: d.picture_id(),
            tl0_pic_idx: d.tl0_pic_idx(),
        };
        assert_eq!(p.keyframe_start, key);
        assert_eq!(d.starts_keyframe(&payload), key, "our keyframe test agrees with str0m's");
        self.seq += 1;
        self.time = self.time.wrapping_add(3000);
        self.pid = (self.pid + 1) & 0x7fff;
        self.tl0 = self.tl0.wrapping_add(1);
        p
    }
}

#[test]
fn sequence_time_and_picture_id_run_on_across_a_layer_switch_at_a_keyframe() {
    let t0 = Instant::now();
    let frame = Duration::from_millis(33);
    // Rollover counter 1 already on the low layer; the high one is about to wrap its 16-bit sequence number.
    let mut low = Layer { name: "l", seq: 70_000, time: 1_000_000, pid: 5000, tl0: 250 };
    let mut high = Layer { name: "h", seq: 65_534, time: 4_000_000_000, pid: 32_766, tl0: 9 };
    let mut rw = Rewriter::new(90_000);

    // Nothing before the wanted layer's keyframe; other layers never.
    assert_eq!(rw.rewrite(&low.packet(t0, false), Some("l")), None);
    assert_eq!(rw.rewrite(&high.packet(t0, true), Some("l")), None);
    let first = rw.rewrite(&low.packet(t0 + frame, true), Some("l")).unwrap();
    assert!(first.switched);
    assert_eq!(first.seq, 70_001 & 0xffff, "the subscriber's stream starts with rollover counter 0");
    assert_eq!(rw.current(), Some("l"));

    let mut now = t0 + frame;
    let mut out: Vec<PacketOut> = vec![first];
    for _ in 0..5 {
        now += frame;
        assert_eq!(rw.rewrite(&high.packet(now, false), Some("h")), None, "the high layer waits for a keyframe");
        out.push(rw.rewrite(&low.packet(now, false), Some("h")).unwrap());
    }
    // The high layer's keyframe: the switch. The low layer's packets stop being forwarded.
    now += frame + Duration::from_millis(10);
    out.push(rw.rewrite(&high.packet(now, true), Some("h")).unwrap());
    assert_eq!(rw.rewrite(&low.packet(now, false), Some("h")), None);
    for _ in 0..4 {
        now += frame;
        out.push(rw.rewrite(&high.packet(now, false), Some("h")).unwrap());
    }

    for w in out.windows(2) {
        assert_eq!(w[1].seq, w[0].seq + 1, "consecutive sequence numbers: {out:?}");
        assert_eq!(w[1].picture_id.unwrap(), (w[0].picture_id.unwrap() + 1) & 0x7fff);
        assert_eq!(w[1].tl0_pic_idx.unwrap(), w[0].tl0_pic_idx.unwrap().wrapping_add(1));
        let dt = w[1].time.wrapping_sub(w[0].time);
        assert!((2970..=4000).contains(&dt), "timestamps advance by the frame interval, also at the switch: {dt}");
    }
    let switch = out.iter().position(|p| p.switched && p.seq != first.seq).unwrap();
    assert_eq!(switch, 6);
    // 43 ms between the last low packet and the high keyframe: 3870 ticks at 90 kHz.
    assert_eq!(out[6].time.wrapping_sub(out[5].time), 3870);
}

#[test]
fn losses_pass_through_and_reordered_packets_from_before_a_switch_are_dropped() {
    let t0 = Instant::now();
    let mut rw = Rewriter::new(90_000);
    let mut a = Layer { name: "a", seq: 100, time: 0, pid: 1, tl0: 1 };
    let mut b = Layer { name: "b", seq: 9000, time: 777, pid: 300, tl0: 40 };
    let k = rw.rewrite(&a.packet(t0, true), Some("a")).unwrap();
    a.seq += 2; // two packets lost: the gap stays, so the subscriber NACKs them (str0m resends from its buffer)
    let after_loss = rw.rewrite(&a.packet(t0, false), Some("a")).unwrap();
    assert_eq!(after_loss.seq, k.seq + 3);

    let late = b.packet(t0, false); // sent before b's keyframe, arrives after it
    let bk = rw.rewrite(&b.packet(t0, true), Some("b")).unwrap();
    assert_eq!(bk.seq, after_loss.seq + 1);
    assert_eq!(rw.rewrite(&late, Some("b")), None, "older than the switch point");
    assert_eq!(rw.rewrite(&b.packet(t0, false), Some("b")).unwrap().seq, bk.seq + 1);

    // Paused (tile hidden), then shown again: the numbering continues from where it stopped.
    rw.pause();
    assert_eq!(rw.rewrite(&b.packet(t0, false), Some("b")), None);
    assert_eq!(rw.rewrite(&b.packet(t0, false), Some("b")), None);
    let back = rw.rewrite(&b.packet(t0 + Duration::from_secs(2), true), Some("b")).unwrap();
    assert_eq!(back.seq, bk.seq + 2);
    assert!(back.switched);
}

#[test]
fn audio_runs_unchanged_after_the_start() {
    let t0 = Instant::now();
    let mut rw = Rewriter::new(48_000);
    let opus = |seq, time| PacketIn {
        layer: (),
        seq,
        time,
        arrival: t0,
        keyframe_start: true,
        picture_id: None,
        tl0_pic_idx: None,
    };
    let a = rw.rewrite(&opus(65_535, 960), Some(())).unwrap();
    let b = rw.rewrite(&opus(65_536, 1920), Some(())).unwrap();
    assert_eq!((a.seq, a.time, b.seq, b.time), (65_535, 960, 65_536, 1920));
    assert_eq!(a.picture_id, None);
}

#[test]
fn vp8_descriptor_parsing_and_str0m_patch_agree() {
    let p = vp8(true, 0x1234, 7, KEY);
    assert_eq!(vp8_descriptor_len(&p), Some(6));
    assert_eq!(vp8_descriptor_len(&[0x10, 0x00]), Some(1));
    assert_eq!(vp8_descriptor_len(&[0x90]), None);
    assert_eq!(vp8_descriptor_len(&[0x90, 0x80, 0x81]), None, "15-bit picture id cut short");
    assert!(!vp8_starts_keyframe(&vp8(false, 1, 1, KEY)), "not the start of the partition");
    assert!(!vp8_starts_keyframe(&vp8(true, 1, 1, DELTA)));
    let d = Vp8Descriptor::parse(&p).unwrap();
    assert_eq!((d.picture_id(), d.tl0_pic_idx()), (Some(0x1234), Some(7)));
    d.patch().picture_id(0x7fff).tl0_pic_idx(200).build().expect("str0m patches what we rewrite");
}

#[test]
fn vp8_frames_are_reassembled_and_broken_ones_dropped_until_a_keyframe() {
    let mut f = Vp8Frames::new();
    let body: Vec<u8> = KEY.iter().chain([1, 2, 3].iter()).copied().collect();
    assert_eq!(f.push(10, 900, false, &vp8(true, 1, 1, &body[..5])), None);
    assert_eq!(f.push(11, 900, false, &vp8(false, 1, 1, &body[5..9])), None);
    let k = f.push(12, 900, true, &vp8(false, 1, 1, &body[9..])).unwrap();
    assert_eq!(k, Frame { time: 900, keyframe: true, data: body.clone() });

    // A delta frame loses its middle packet: dropped, and the next delta frame too (it refers to the lost one).
    assert_eq!(f.push(13, 3900, false, &vp8(true, 2, 2, DELTA)), None);
    assert_eq!(f.push(15, 3900, true, &vp8(false, 2, 2, &[9])), None);
    assert_eq!(f.push(16, 6900, true, &vp8(true, 3, 3, DELTA)), None);
    // The next keyframe is whole again.
    let k2 = f.push(17, 9900, true, &vp8(true, 4, 4, KEY)).unwrap();
    assert!(k2.keyframe);
    let d = f.push(18, 12900, true, &vp8(true, 5, 5, DELTA)).unwrap();
    assert_eq!(d, Frame { time: 12900, keyframe: false, data: DELTA.to_vec() });
}

#[test]
fn h264_access_units_are_reassembled_from_stap_a_and_fu_a() {
    let sps = [0x67, 0x42, 0xc0, 0x1e];
    let pps = [0x68, 0xce, 0x3c, 0x80];
    let idr: Vec<u8> = std::iter::once(0x65).chain(1..=20).collect();
    // STAP-A with SPS and PPS, then the IDR slice in three FU-A fragments.
    let mut stap = vec![24];
    for n in [&sps[..], &pps[..]] {
        stap.extend_from_slice(&(n.len() as u16).to_be_bytes());
        stap.extend_from_slice(n);
    }
    let fu = |start: bool, end: bool, part: &[u8]| {
        let mut p = vec![(idr[0] & 0xe0) | 28, (start as u8) << 7 | (end as u8) << 6 | (idr[0] & 0x1f)];
        p.extend_from_slice(part);
        p
    };
    assert!(h264_starts_keyframe(&stap) && h264_starts_keyframe(&fu(true, false, &idr[1..8])));
    assert!(!h264_starts_keyframe(&fu(false, false, &idr[8..15])));
    let mut f = H264Frames::new();
    assert_eq!(f.push(1, 90, false, &stap), None);
    assert_eq!(f.push(2, 90, false, &fu(true, false, &idr[1..8])), None);
    assert_eq!(f.push(3, 90, false, &fu(false, false, &idr[8..15])), None);
    let unit = f.push(4, 90, true, &fu(false, true, &idr[15..])).unwrap();
    let mut want = Vec::new();
    for n in [&sps[..], &pps[..], &idr[..]] {
        want.extend_from_slice(&[0, 0, 0, 1]);
        want.extend_from_slice(n);
    }
    assert_eq!(unit, Frame { time: 90, keyframe: true, data: want });

    // A non-IDR slice after a lost packet waits for the next keyframe.
    let slice = [0x41, 0x9a, 0x01];
    assert_eq!(f.push(6, 3090, true, &slice), None);
    assert_eq!(f.push(7, 6090, true, &slice), None);
    assert!(f.push(8, 9090, false, &stap).is_none(), "no marker: the unit goes on");
    assert!(f.push(9, 9090, true, &[0x65, 1, 2]).unwrap().keyframe);
    assert_eq!(f.push(10, 12090, true, &slice).unwrap().data, [0, 0, 0, 1, 0x41, 0x9a, 0x01]);
}
