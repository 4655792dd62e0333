//! Forwarding in str0m's RTP mode (issue 14), without I/O: what one subscriber's track is sent for each packet a
//! publisher sends. Each subscriber stream has its own sequence numbers and media time, continuous across
//! simulcast layer switches (a switch happens only at a keyframe of the new layer), and VP8 picture ids /
//! TL0PICIDX continuous with them, so the receiver's decoder and jitter buffer see one stream. [`Vp8Frames`]
//! and [`H264Frames`] put frames back together from packets (the recorder writes whole frames).

use std::time::Instant;

/// What the rewriter needs of one received RTP packet.
#[derive(Debug, Clone, Copy)]
pub struct PacketIn<L> {
    /// Its simulcast layer (e.g. the rid); audio and single-layer video use one value throughout.
    pub layer: L,
    /// The extended sequence number (str0m's `SeqNo`, with the rollover counter above the low 16 bits).
    pub seq: u64,
    /// The RTP timestamp.
    pub time: u32,
    /// When it arrived (the adapter's clock).
    pub arrival: Instant,
    /// It starts a keyframe (str0m's `Vp8Descriptor::starts_keyframe` for VP8; always `true` for audio).
    pub keyframe_start: bool,
    /// The VP8 picture id and TL0PICIDX of its payload descriptor, where present.
    pub picture_id: Option<u16>,
    pub tl0_pic_idx: Option<u8>,
}

/// What to send a subscriber for a packet: its sequence number, timestamp and descriptor fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PacketOut {
    /// Extended sequence number for `RtpWrite::new` (rollover counter 0 at the start of the stream).
    pub seq: u64,
    pub time: u32,
    /// 15-bit picture id (7-bit when the publisher uses short ones; [`Rewriter`] keeps to the incoming width).
    pub picture_id: Option<u16>,
    pub tl0_pic_idx: Option<u8>,
    /// This packet is the first of a new layer (a switch or the start).
    pub switched: bool,
}

/// One subscriber track's rewriting state.
#[derive(Debug, Clone)]
pub struct Rewriter<L> {
    /// Media clock rate (90 000 for video, 48 000 for Opus): a layer switch advances time by the wall time between.
    clock_rate: u32,
    current: Option<L>,
    /// Added (wrapping) to the incoming sequence number / timestamp / picture id / TL0PICIDX of the current layer.
    seq_offset: u64,
    time_offset: u32,
    pid_offset: u16,
    tl0_offset: u8,
    /// The incoming sequence number the current layer started at: older packets of it (reordered) are dropped.
    layer_start: u64,
    /// The highest sequence number sent, and the timestamp, picture id and TL0PICIDX with it.
    last: Option<Last>,
}

#[derive(Debug, Clone, Copy)]
struct Last {
    seq: u64,
    time: u32,
    arrival: Instant,
    picture_id: Option<u16>,
    tl0_pic_idx: Option<u8>,
}

impl<L: Copy + PartialEq> Rewriter<L> {
    pub fn new(clock_rate: u32) -> Self {
        Rewriter {
            clock_rate,
            current: None,
            seq_offset: 0,
            time_offset: 0,
            pid_offset: 0,
            tl0_offset: 0,
            layer_start: 0,
            last: None,
        }
    }

    /// The layer being forwarded, if any.
    pub fn current(&self) -> Option<L> {
        self.current
    }

    /// Stops forwarding (the track is not shown); a later [`Rewriter::rewrite`] starts again at a keyframe,
    /// continuing the numbering.
    pub fn pause(&mut self) {
        self.current = None;
    }

    /// The packet as the subscriber gets it, or `None` when it is not forwarded: another layer than the current
    /// one (unless it starts a keyframe of `wanted`), a packet from before the current layer started, or nothing
    /// wanted.
    pub fn rewrite(&mut self, p: &PacketIn<L>, wanted: Option<L>) -> Option<PacketOut> {
        let mut switched = false;
        if self.current != Some(p.layer) {
            if wanted != Some(p.layer) || !p.keyframe_start {
                return None;
            }
            self.switch_to(p);
            switched = true;
        }
        if p.seq < self.layer_start {
            return None;
        }
        let seq = p.seq.wrapping_add(self.seq_offset);
        let time = p.time.wrapping_add(self.time_offset);
        let picture_id = p.picture_id.map(|id| id.wrapping_add(self.pid_offset) & 0x7fff);
        let tl0_pic_idx = p.tl0_pic_idx.map(|i| i.wrapping_add(self.tl0_offset));
        if self.last.is_none_or(|l| seq > l.seq) {
            self.last = Some(Last { seq, time, arrival: p.arrival, picture_id, tl0_pic_idx });
        }
        Some(PacketOut { seq, time, picture_id, tl0_pic_idx, switched })
    }

    fn switch_to(&mut self, p: &PacketIn<L>) {
        self.current = Some(p.layer);
        let Some(last) = self.last else {
            // The stream's first packet: rollover counter 0 (str0m warns otherwise; the receiver assumes 0).
            self.seq_offset = (p.seq & 0xffff).wrapping_sub(p.seq);
            self.time_offset = 0;
            self.pid_offset = 0;
            self.tl0_offset = 0;
            self.layer_start = p.seq;
            return;
        };
        let next = last.seq + 1;
        self.seq_offset = next.wrapping_sub(p.seq);
        self.layer_start = p.seq;
        // Layers have clocks of their own: go on from the last timestamp by the wall time since (at least 1 tick).
        let elapsed = p.arrival.saturating_duration_since(last.arrival);
        let ticks = (elapsed.as_micros() as u64 * self.clock_rate as u64 / 1_000_000).max(1) as u32;
        self.time_offset = last.time.wrapping_add(ticks).wrapping_sub(p.time);
        if let (Some(out), Some(inp)) = (last.picture_id, p.picture_id) {
            self.pid_offset = out.wrapping_add(1).wrapping_sub(inp);
        }
        if let (Some(out), Some(inp)) = (last.tl0_pic_idx, p.tl0_pic_idx) {
            self.tl0_offset = out.wrapping_add(1).wrapping_sub(inp);
        }
    }
}

/// The length of a VP8 payload descriptor (RFC 7741 4.2), or `None` when the payload is too short for it (str0m's
/// `Vp8Descriptor` keeps it private).
pub fn vp8_descriptor_len(payload: &[u8]) -> Option<usize> {
    let first = *payload.first()?;
    let mut n = 1;
    if first & 0x80 != 0 {
        let x = *payload.get(1)?;
        n = 2;
        if x & 0x80 != 0 {
            // PictureID: 7 or 15 bits (M bit).
            n += if payload.get(n)? & 0x80 != 0 { 2 } else { 1 };
        }
        if x & 0x40 != 0 {
            n += 1;
        }
        if x & 0x30 != 0 {
            n += 1;
        }
    }
    (n < payload.len()).then_some(n)
}

/// Reassembles VP8 frames from one stream's RTP packets in arrival order: a frame is complete when every
/// sequence number from its first packet (S bit) to the one with the marker bit arrived. Frames with a gap are
/// dropped, and so is everything after a gap up to the next keyframe (a decoder could not use it).
#[derive(Debug, Default)]
pub struct Vp8Frames {
    /// The frame being collected: its timestamp, the next sequence number expected, the bytes so far.
    partial: Option<(u32, u64, Vec<u8>)>,
    /// A packet was lost since the last keyframe.
    broken: bool,
    /// The last sequence number seen: a skipped one is a loss.
    last: Option<u64>,
}

/// A reassembled frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub time: u32,
    pub keyframe: bool,
    pub data: Vec<u8>,
}

impl Vp8Frames {
    pub fn new() -> Self {
        Self::default()
    }

    /// One packet (payload without the RTP header); a frame when this completes one.
    pub fn push(&mut self, seq: u64, time: u32, marker: bool, payload: &[u8]) -> Option<Frame> {
        if self.last.is_some_and(|l| seq != l + 1) {
            self.broken = true;
            self.partial = None;
        }
        self.last = Some(seq);
        let n = vp8_descriptor_len(payload)?;
        let start = payload[0] & 0x10 != 0 && payload[0] & 0x07 == 0;
        if start {
            if self.partial.is_some() {
                // The previous frame's last packet never came.
                self.broken = true;
            }
            let keyframe = payload[n] & 0x01 == 0;
            if keyframe {
                self.broken = false;
            }
            if self.broken {
                self.partial = None;
                return None;
            }
            self.partial = Some((time, seq + 1, payload[n..].to_vec()));
        } else {
            match &mut self.partial {
                Some((t, next, data)) if *t == time && *next == seq => {
                    data.extend_from_slice(&payload[n..]);
                    *next += 1;
                }
                _ => {
                    self.broken = true;
                    self.partial = None;
                    return None;
                }
            }
        }
        if !marker {
            return None;
        }
        let (time, _, data) = self.partial.take()?;
        let keyframe = data.first().is_some_and(|b| b & 1 == 0);
        Some(Frame { time, keyframe, data })
    }
}

/// Whether an H.264 RTP payload (RFC 6184) carries the start of an IDR picture or a sequence parameter set
/// (single NAL unit, STAP-A aggregate, or the first fragment of an FU-A).
pub fn h264_starts_keyframe(payload: &[u8]) -> bool {
    let Some(&first) = payload.first() else { return false };
    let key = |nal: u8| matches!(nal & 0x1f, 5 | 7);
    match first & 0x1f {
        1..=23 => key(first),
        24 => {
            let mut rest = &payload[1..];
            while rest.len() > 2 {
                let n = u16::from_be_bytes([rest[0], rest[1]]) as usize;
                if n == 0 || rest.len() < 2 + n {
                    return false;
                }
                if key(rest[2]) {
                    return true;
                }
                rest = &rest[2 + n..];
            }
            false
        }
        28 => payload.get(1).is_some_and(|&h| h & 0x80 != 0 && key(h)),
        _ => false,
    }
}

/// Reassembles H.264 access units (Annex B, start codes) from one stream's RTP packets: the packets of one
/// timestamp with consecutive sequence numbers up to the marker bit. After a gap, nothing until a keyframe.
#[derive(Debug, Default)]
pub struct H264Frames {
    partial: Option<(u32, u64, Vec<u8>)>,
    broken: bool,
    last: Option<u64>,
}

impl H264Frames {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn push(&mut self, seq: u64, time: u32, marker: bool, payload: &[u8]) -> Option<Frame> {
        if self.last.is_some_and(|l| seq != l + 1) {
            self.lost();
        }
        self.last = Some(seq);
        let continues = matches!(&self.partial, Some((t, next, _)) if *t == time && *next == seq);
        if !continues {
            if self.partial.take().is_some() {
                // The unit before ended without its marker bit.
                self.broken = true;
            }
            if h264_starts_keyframe(payload) {
                self.broken = false;
            }
            if self.broken {
                return None;
            }
            self.partial = Some((time, seq, Vec::new()));
        }
        let (_, next, data) = self.partial.as_mut().expect("set above");
        *next = seq + 1;
        if !append_h264(payload, data) {
            self.partial = None;
            self.broken = true;
            return None;
        }
        if !marker {
            return None;
        }
        let (time, _, data) = self.partial.take()?;
        let keyframe = annexb_has_idr(&data);
        Some(Frame { time, keyframe, data })
    }

    /// A packet was lost (a sequence number skipped): drop the unit being collected, wait for a keyframe.
    pub fn lost(&mut self) {
        self.partial = None;
        self.broken = true;
    }
}

/// Appends the NAL units of one RTP payload to `out` with Annex B start codes; `false` on a malformed payload.
fn append_h264(payload: &[u8], out: &mut Vec<u8>) -> bool {
    let Some(&first) = payload.first() else { return false };
    match first & 0x1f {
        1..=23 => {
            out.extend_from_slice(&[0, 0, 0, 1]);
            out.extend_from_slice(payload);
        }
        24 => {
            let mut rest = &payload[1..];
            while rest.len() > 2 {
                let n = u16::from_be_bytes([rest[0], rest[1]]) as usize;
                if rest.len() < 2 + n {
                    return false;
                }
                out.extend_from_slice(&[0, 0, 0, 1]);
                out.extend_from_slice(&rest[2..2 + n]);
                rest = &rest[2 + n..];
            }
        }
        28 => {
            let Some(&h) = payload.get(1) else { return false };
            if h & 0x80 != 0 {
                out.extend_from_slice(&[0, 0, 0, 1, (first & 0xe0) | (h & 0x1f)]);
            } else if out.is_empty() {
                return false;
            }
            out.extend_from_slice(&payload[2..]);
        }
        _ => return false,
    }
    true
}

fn annexb_has_idr(data: &[u8]) -> bool {
    data.windows(4).any(|w| w[..3] == [0, 0, 1] && matches!(w[3] & 0x1f, 5))
}
