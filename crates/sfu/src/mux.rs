//! A Matroska/WebM muxer without I/O: one track per file, frames in, bytes to append out, and at the end a few
//! bytes to write back at known offsets (the segment size and the duration).
//!
//! The EBML itself (element ids, sizes, SimpleBlock layout) is `webm-iterable`'s (pure Rust, MIT): it keeps the
//! release binary free of C++ (libwebm, the `webm` crate, links libstdc++ dynamically). What is ours is the file's
//! shape: the segment is opened with an unknown size, so a file cut off anywhere after a cluster still plays;
//! clusters are written whole (at most [`MAX_CLUSTER_MS`] behind), so a stopped recording never ends
//! mid-cluster.

use webm_iterable::matroska_spec::{Master, MatroskaSpec, SimpleBlock};
use webm_iterable::{WebmWriter, WriteOptions};

/// A cluster is written once it holds this much media (or at the next video keyframe).
pub const MAX_CLUSTER_MS: i64 = 2000;
/// Matroska timestamps in milliseconds (the default TimestampScale).
const TIMESTAMP_SCALE: u64 = 1_000_000;

/// What a recorded track carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Codec {
    Vp8,
    H264,
    Opus,
}

impl Codec {
    /// WebM for VP8 and Opus; H.264 is not in WebM's codec list, so Matroska.
    pub fn extension(self) -> &'static str {
        match self {
            Codec::H264 => "mkv",
            _ => "webm",
        }
    }
    fn codec_id(self) -> &'static str {
        match self {
            Codec::Vp8 => "V_VP8",
            Codec::H264 => "V_MPEG4/ISO/AVC",
            Codec::Opus => "A_OPUS",
        }
    }
    fn is_video(self) -> bool {
        self != Codec::Opus
    }
}

/// Width and height of video frames.
pub type FrameSize = (u32, u32);

/// Bytes to write at an offset of the file when it is finished.
pub type Patch = (u64, Vec<u8>);

/// One file's muxer. Call [`Muxer::start`] with the first (key)frame's details, then [`Muxer::frame`] per frame,
/// then [`Muxer::finish`].
pub struct Muxer {
    codec: Codec,
    w: WebmWriter<Vec<u8>>,
    /// Bytes handed out so far (the file's length).
    len: u64,
    /// Offset of the segment's 8-byte size field, and of its first data byte.
    segment_size_at: u64,
    segment_data_at: u64,
    /// Offset of the 8 bytes of the Duration float.
    duration_at: u64,
    /// The open cluster: its timestamp and its blocks.
    cluster: Option<(i64, Vec<MatroskaSpec>)>,
    first_ms: Option<i64>,
    last_ms: i64,
    frames: u64,
    /// Clusters written: (timestamp, offset in the segment) of those that start with a keyframe.
    cues: Vec<(i64, u64)>,
    cluster_key: bool,
}

impl Muxer {
    pub fn new(codec: Codec) -> Muxer {
        Muxer {
            codec,
            w: WebmWriter::new(Vec::new()),
            len: 0,
            segment_size_at: 0,
            segment_data_at: 0,
            duration_at: 0,
            cluster: None,
            first_ms: None,
            last_ms: 0,
            frames: 0,
            cues: Vec::new(),
            cluster_key: false,
        }
    }

    pub fn codec(&self) -> Codec {
        self.codec
    }

    /// Frames taken so far.
    pub fn frames(&self) -> u64 {
        self.frames
    }

    fn take(&mut self) -> Vec<u8> {
        let out = std::mem::take(self.w.get_mut());
        self.len += out.len() as u64;
        out
    }

    /// The file's header: EBML header, the segment (size unknown until [`Muxer::finish`]), Info and the track.
    /// `size`: the video's frame size; `private`: CodecPrivate (avcC for H.264; Opus gets its OpusHead here).
    pub fn start(&mut self, size: Option<(u32, u32)>, private: Option<Vec<u8>>) -> Vec<u8> {
        let doc = if self.codec == Codec::H264 { "matroska" } else { "webm" };
        let ebml = MatroskaSpec::Ebml(Master::Full(vec![
            MatroskaSpec::EbmlVersion(1),
            MatroskaSpec::EbmlReadVersion(1),
            MatroskaSpec::EbmlMaxIdLength(4),
            MatroskaSpec::EbmlMaxSizeLength(8),
            MatroskaSpec::DocType(doc.into()),
            MatroskaSpec::DocTypeVersion(4),
            MatroskaSpec::DocTypeReadVersion(2),
        ]));
        self.write(&ebml);
        let head = self.take();
        self.segment_size_at = head.len() as u64 + 4;
        self.segment_data_at = head.len() as u64 + 12;
        let _ = self.w.write_advanced(&MatroskaSpec::Segment(Master::Start), WriteOptions::is_unknown_sized_element());
        let mut out = head;
        out.extend(self.take());
        let info = MatroskaSpec::Info(Master::Full(vec![
            MatroskaSpec::TimestampScale(TIMESTAMP_SCALE),
            MatroskaSpec::Duration(0.0),
            MatroskaSpec::MuxingApp("webcall".into()),
            MatroskaSpec::WritingApp("webcall".into()),
        ]));
        self.write(&info);
        let info = self.take();
        // The Duration element: id 44 89, size 88 (8 bytes), then the float.
        let at = info.windows(3).position(|w| w == [0x44, 0x89, 0x88]).expect("Info holds the Duration");
        self.duration_at = out.len() as u64 + at as u64 + 3;
        out.extend(info);
        let mut entry = vec![
            MatroskaSpec::TrackNumber(1),
            MatroskaSpec::TrackUID(1),
            MatroskaSpec::TrackType(if self.codec.is_video() { 1 } else { 2 }),
            MatroskaSpec::CodecID(self.codec.codec_id().into()),
        ];
        let private = match self.codec {
            Codec::Opus => Some(opus_head()),
            _ => private,
        };
        if let Some(p) = private {
            entry.push(MatroskaSpec::CodecPrivate(p));
        }
        match (self.codec, size) {
            (Codec::Opus, _) => {
                // RFC 7845 5.1: 80 ms of pre-roll after a seek; 48 kHz whatever the input was.
                entry.push(MatroskaSpec::SeekPreRoll(80_000_000));
                entry.push(MatroskaSpec::Audio(Master::Full(vec![
                    MatroskaSpec::SamplingFrequency(48_000.0),
                    MatroskaSpec::Channels(2),
                ])));
            }
            (_, Some((w, h))) => entry.push(MatroskaSpec::Video(Master::Full(vec![
                MatroskaSpec::PixelWidth(w as u64),
                MatroskaSpec::PixelHeight(h as u64),
            ]))),
            _ => {}
        }
        self.write(&MatroskaSpec::Tracks(Master::Full(vec![MatroskaSpec::TrackEntry(Master::Full(entry))])));
        out.extend(self.take());
        out
    }

    fn write(&mut self, tag: &MatroskaSpec) {
        // Only an element out of place fails, and every element here is placed by this module.
        if let Err(e) = self.w.write(tag) {
            debug_assert!(false, "muxer wrote an element out of place: {e}");
        }
    }

    /// A frame at `ms` (milliseconds from any origin; made non-decreasing here). Returns bytes to append: a whole
    /// cluster when one is complete, else nothing.
    pub fn frame(&mut self, ms: i64, keyframe: bool, data: &[u8]) -> Vec<u8> {
        let ms = ms.max(self.last_ms).max(0);
        self.first_ms.get_or_insert(ms);
        self.last_ms = ms;
        self.frames += 1;
        let mut out = Vec::new();
        let full = self.cluster.as_ref().is_some_and(|(start, blocks)| {
            !blocks.is_empty() && (ms - start >= MAX_CLUSTER_MS || (keyframe && self.codec.is_video()))
        });
        if full {
            out = self.flush_cluster();
        }
        let (start, blocks) = self.cluster.get_or_insert_with(|| (ms, Vec::new()));
        if blocks.is_empty() {
            self.cluster_key = keyframe || !self.codec.is_video();
        }
        let rel = (ms - *start).clamp(0, i16::MAX as i64) as i16;
        blocks.push(SimpleBlock::new_uncheked(data, 1, rel, false, None, false, keyframe).into());
        out
    }

    fn flush_cluster(&mut self) -> Vec<u8> {
        let Some((start, mut blocks)) = self.cluster.take() else { return Vec::new() };
        if blocks.is_empty() {
            return Vec::new();
        }
        if self.cluster_key {
            self.cues.push((start, self.len - self.segment_data_at));
        }
        let mut children = vec![MatroskaSpec::Timestamp(start as u64)];
        children.append(&mut blocks);
        self.write(&MatroskaSpec::Cluster(Master::Full(children)));
        self.take()
    }

    /// Ends the file: the last cluster and the cues to append, and the segment size and duration to write back.
    pub fn finish(&mut self) -> (Vec<u8>, Vec<Patch>) {
        let mut out = self.flush_cluster();
        if !self.cues.is_empty() {
            let points = self
                .cues
                .iter()
                .map(|(t, pos)| {
                    MatroskaSpec::CuePoint(Master::Full(vec![
                        MatroskaSpec::CueTime(*t as u64),
                        MatroskaSpec::CueTrackPositions(Master::Full(vec![
                            MatroskaSpec::CueTrack(1),
                            MatroskaSpec::CueClusterPosition(*pos),
                        ])),
                    ]))
                })
                .collect();
            self.write(&MatroskaSpec::Cues(Master::Full(points)));
            out.extend(self.take());
        }
        let mut patches = Vec::new();
        if self.segment_data_at == 0 {
            return (out, patches);
        }
        let size = self.len - self.segment_data_at;
        let mut field = size.to_be_bytes();
        field[0] = 0x01; // an 8-byte EBML size (sizes stay below 2^56)
        patches.push((self.segment_size_at, field.to_vec()));
        patches.push((self.duration_at, self.duration_ms().to_be_bytes().to_vec()));
        (out, patches)
    }

    /// From the first frame to the end of the last (its length taken as the average frame interval).
    pub fn duration_ms(&self) -> f64 {
        let Some(first) = self.first_ms else { return 0.0 };
        let span = (self.last_ms - first) as f64;
        let tail = if self.frames > 1 { span / (self.frames - 1) as f64 } else { 20.0 };
        span + tail
    }

    /// The file's length once everything handed out so far is written.
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// RFC 7845 5.1 identification header: version 1, 2 channels (WebRTC's opus/48000/2), no pre-skip, 48 kHz,
/// no gain, mapping family 0.
fn opus_head() -> Vec<u8> {
    let mut h = b"OpusHead".to_vec();
    h.push(1);
    h.push(2);
    h.extend_from_slice(&0u16.to_le_bytes());
    h.extend_from_slice(&48_000u32.to_le_bytes());
    h.extend_from_slice(&0i16.to_le_bytes());
    h.push(0);
    h
}

/// H.264 in Matroska is length-prefixed (AVCC) with the parameter sets in CodecPrivate; str0m hands out Annex B
/// (start codes). The NAL units of one access unit.
pub fn annexb_nals(data: &[u8]) -> Vec<&[u8]> {
    let mut nals = Vec::new();
    let mut i = 0;
    let mut start = None;
    while i + 3 <= data.len() {
        if data[i] == 0 && data[i + 1] == 0 && data[i + 2] == 1 {
            if let Some(s) = start {
                let mut end = i;
                while end > s && data[end - 1] == 0 {
                    end -= 1;
                }
                nals.push(&data[s..end]);
            }
            i += 3;
            start = Some(i);
        } else {
            i += 1;
        }
    }
    match start {
        Some(s) if s < data.len() => nals.push(&data[s..]),
        None if !data.is_empty() => nals.push(data),
        _ => {}
    }
    nals
}

/// Annex B to 4-byte length prefixes.
pub fn annexb_to_avcc(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len() + 8);
    for n in annexb_nals(data) {
        out.extend_from_slice(&(n.len() as u32).to_be_bytes());
        out.extend_from_slice(n);
    }
    out
}

/// The avcC record (ISO 14496-15 5.2.4.1) from the first SPS and PPS of an access unit, and the SPS's frame size.
pub fn avcc_record(data: &[u8]) -> Option<(Vec<u8>, Option<FrameSize>)> {
    let nals = annexb_nals(data);
    let sps = nals.iter().find(|n| n.first().is_some_and(|b| b & 0x1f == 7))?;
    let pps = nals.iter().find(|n| n.first().is_some_and(|b| b & 0x1f == 8))?;
    if sps.len() < 4 {
        return None;
    }
    let mut r = vec![1, sps[1], sps[2], sps[3], 0xff, 0xe1];
    r.extend_from_slice(&(sps.len() as u16).to_be_bytes());
    r.extend_from_slice(sps);
    r.push(1);
    r.extend_from_slice(&(pps.len() as u16).to_be_bytes());
    r.extend_from_slice(pps);
    Some((r, sps_size(sps)))
}

/// Exp-Golomb reader over an RBSP (emulation prevention bytes removed).
struct Bits {
    data: Vec<u8>,
    pos: usize,
}

impl Bits {
    fn bit(&mut self) -> Option<u32> {
        let b = self.data.get(self.pos / 8)?;
        let v = (b >> (7 - self.pos % 8)) & 1;
        self.pos += 1;
        Some(v as u32)
    }
    fn bits(&mut self, n: u32) -> Option<u32> {
        (0..n).try_fold(0, |acc, _| Some((acc << 1) | self.bit()?))
    }
    fn ue(&mut self) -> Option<u32> {
        let mut zeros = 0;
        while self.bit()? == 0 {
            zeros += 1;
            if zeros > 31 {
                return None;
            }
        }
        Some((1u32 << zeros) - 1 + self.bits(zeros)?)
    }
    fn se(&mut self) -> Option<i32> {
        let v = self.ue()?;
        Some(if v % 2 == 1 { v.div_ceil(2) as i32 } else { -((v / 2) as i32) })
    }
}

/// The frame size of an H.264 SPS (ITU-T H.264 7.3.2.1.1), cropping applied.
pub fn sps_size(sps: &[u8]) -> Option<(u32, u32)> {
    let mut rbsp = Vec::with_capacity(sps.len());
    let mut zeros = 0;
    for &b in sps.get(1..)? {
        if zeros >= 2 && b == 3 {
            zeros = 0;
            continue;
        }
        zeros = if b == 0 { zeros + 1 } else { 0 };
        rbsp.push(b);
    }
    let mut r = Bits { data: rbsp, pos: 0 };
    let profile = r.bits(8)?;
    r.bits(16)?; // constraint flags, level
    r.ue()?; // sps id
    let mut chroma = 1;
    if [100, 110, 122, 244, 44, 83, 86, 118, 128, 138, 139, 134, 135].contains(&profile) {
        chroma = r.ue()?;
        if chroma == 3 {
            r.bit()?;
        }
        r.ue()?;
        r.ue()?;
        r.bit()?;
        if r.bit()? == 1 {
            for i in 0..if chroma == 3 { 12 } else { 8 } {
                if r.bit()? == 1 {
                    let n = if i < 6 { 16 } else { 64 };
                    let (mut last, mut next) = (8i32, 8i32);
                    for _ in 0..n {
                        if next != 0 {
                            next = (last + r.se()? + 256) % 256;
                        }
                        last = if next == 0 { last } else { next };
                    }
                }
            }
        }
    }
    r.ue()?; // log2_max_frame_num
    match r.ue()? {
        0 => {
            r.ue()?;
        }
        1 => {
            r.bit()?;
            r.se()?;
            r.se()?;
            for _ in 0..r.ue()? {
                r.se()?;
            }
        }
        _ => {}
    }
    r.ue()?; // max_num_ref_frames
    r.bit()?;
    let w_mbs = r.ue()? + 1;
    let h_units = r.ue()? + 1;
    let frame_mbs_only = r.bit()?;
    if frame_mbs_only == 0 {
        r.bit()?;
    }
    r.bit()?;
    let (mut cl, mut cr, mut ct, mut cb) = (0, 0, 0, 0);
    if r.bit()? == 1 {
        (cl, cr, ct, cb) = (r.ue()?, r.ue()?, r.ue()?, r.ue()?);
    }
    let (sub_w, sub_h) = match chroma {
        0 | 3 => (1, 1),
        2 => (2, 1),
        _ => (2, 2),
    };
    let crop_x = if chroma == 0 { 1 } else { sub_w };
    let crop_y = (if chroma == 0 { 1 } else { sub_h }) * (2 - frame_mbs_only);
    let w = (w_mbs * 16).checked_sub((cl + cr) * crop_x)?;
    let h = (h_units * 16 * (2 - frame_mbs_only)).checked_sub((ct + cb) * crop_y)?;
    Some((w, h))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn annexb_splits_and_prefixes() {
        let au = [0, 0, 0, 1, 0x67, 1, 2, 0, 0, 1, 0x68, 3, 0, 0, 0, 1, 0x65, 9, 9];
        let nals = annexb_nals(&au);
        assert_eq!(nals, vec![&[0x67, 1, 2][..], &[0x68, 3][..], &[0x65, 9, 9][..]]);
        assert_eq!(&annexb_to_avcc(&au)[..7], &[0, 0, 0, 3, 0x67, 1, 2]);
    }

    #[test]
    fn sps_of_640x480_baseline() {
        // x264 baseline 640x480: profile 66, level 30.
        let sps =
            [0x67, 0x42, 0xc0, 0x1e, 0xd9, 0x00, 0xa0, 0x3d, 0xa1, 0x00, 0x00, 0x03, 0x00, 0x01, 0x00, 0x00, 0x03];
        assert_eq!(sps_size(&sps), Some((640, 480)));
    }

    #[test]
    fn patches_land_on_the_size_and_duration() {
        let mut m = Muxer::new(Codec::Opus);
        let mut file = m.start(None, None);
        for i in 0..150 {
            file.extend(m.frame(i * 20, true, &[0xfc, 0xff, 0xfe]));
        }
        let (tail, patches) = m.finish();
        file.extend(tail);
        assert_eq!(file.len() as u64, m.len());
        let (at, size) = &patches[0];
        assert_eq!(&file[*at as usize - 4..*at as usize], &[0x18, 0x53, 0x80, 0x67]);
        assert_eq!(&file[*at as usize..*at as usize + 8], &[0x01, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]);
        let seg = u64::from_be_bytes(size[..].try_into().unwrap()) & 0x00ff_ffff_ffff_ffff;
        assert_eq!(seg, file.len() as u64 - at - 8);
        let (dat, dur) = &patches[1];
        assert_eq!(&file[*dat as usize - 3..*dat as usize], &[0x44, 0x89, 0x88]);
        assert_eq!(f64::from_be_bytes(dur[..].try_into().unwrap()), 3000.0);
        // 150 frames of 20 ms: two clusters of 2 s and one of 1 s... the last one written by finish.
        assert_eq!(file.windows(4).filter(|w| *w == [0x1f, 0x43, 0xb6, 0x75]).count(), 2);
    }
}
