//! Pre-encoded clips, looped: what `webcall peer --send testsrc` sends, without any codec library.
//!
//! The way load testers (LiveKit's among them) make bots cheap: media is encoded once, ahead of time, and a bot
//! only loops the packets with an RTP clock that keeps running. The binary embeds a test pattern in VP8 at three
//! sizes and bitrates (the three layers of a simulcast sender, [`Layer`]) and a tone in Opus; `scripts/make-clips.sh`
//! regenerates them with Debian's ffmpeg. Every clip starts with a keyframe and has one every second.
//!
//! Using it (e.g. an SFU test publisher sending three simulcast layers):
//!
//! ```
//! use std::sync::Arc;
//! use webcall_peer::clip::{Clip, ClipLoop, Layer};
//!
//! // Sans-IO: the loop hands out frames with their RTP times; the caller paces them (one frame per
//! // `duration`, in RTP clock units) and writes them to its own str0m writer or RTP packetizer.
//! let mut layers: Vec<ClipLoop> = Layer::ALL.iter().map(|l| ClipLoop::new(Clip::builtin(*l))).collect();
//! let f = layers[2].next_frame();
//! assert!(f.key && f.rtp_time == 0 && f.duration == 3000);
//! layers[2].request_keyframe(); // a PLI for the high layer: its next frame is the clip's next keyframe
//! assert!(layers[2].next_frame().key);
//! let mut audio = ClipLoop::new(Clip::builtin_opus());
//! assert_eq!(audio.next_frame().duration, 960); // 20 ms at 48 kHz
//! ```
//!
//! With threads instead: [`crate::media::play_clip`] paces a clip on a thread of its own and broadcasts its frames
//! to every session that subscribes (what `--send testsrc` does).

use std::sync::{Arc, OnceLock};

use crate::media::{vp8_is_keyframe, vp8_keyframe_size, IvfFile};

/// The embedded clips (crates/peer/clips, made by scripts/make-clips.sh).
const LOW_IVF: &[u8] = include_bytes!("../clips/low.ivf");
const MID_IVF: &[u8] = include_bytes!("../clips/mid.ivf");
const HIGH_IVF: &[u8] = include_bytes!("../clips/high.ivf");
const AUDIO_OPUS: &[u8] = include_bytes!("../clips/audio.opus");

/// RTP clock of VP8 video.
pub const VIDEO_CLOCK: u32 = 90_000;
/// RTP clock of Opus (always 48 kHz, whatever the input's rate).
pub const OPUS_CLOCK: u32 = 48_000;

/// One of the embedded VP8 clips: the layers a simulcast sender would send.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, clap::ValueEnum)]
pub enum Layer {
    /// 320x180, about 150 kbit/s.
    Low,
    /// 640x360, about 500 kbit/s.
    Mid,
    /// 1280x720, about 1.5 Mbit/s.
    High,
}

impl Layer {
    pub const ALL: [Layer; 3] = [Layer::Low, Layer::Mid, Layer::High];

    /// Width and height of the layer's pictures.
    pub fn size(self) -> (u16, u16) {
        match self {
            Layer::Low => (320, 180),
            Layer::Mid => (640, 360),
            Layer::High => (1280, 720),
        }
    }
}

/// What a clip holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClipCodec {
    Vp8,
    Opus,
}

/// One encoded frame (VP8) or packet (Opus) of a clip.
#[derive(Debug, Clone)]
pub struct ClipFrame {
    pub data: Arc<[u8]>,
    /// A VP8 keyframe; every Opus packet counts as one (each can start playback).
    pub key: bool,
    /// How long it lasts, in RTP clock units.
    pub duration: u32,
}

/// An encoded clip held in memory, ready to loop.
#[derive(Debug)]
pub struct Clip {
    pub codec: ClipCodec,
    /// RTP clock rate of `duration` ([`VIDEO_CLOCK`] or [`OPUS_CLOCK`]).
    pub clock_rate: u32,
    /// Picture size (VP8, from the first keyframe).
    pub size: Option<(u16, u16)>,
    /// Starts with a keyframe.
    pub frames: Vec<ClipFrame>,
}

/// Why a clip cannot be looped.
#[derive(Debug, thiserror::Error)]
pub enum ClipError {
    #[error("{0}")]
    Ivf(String),
    #[error("no keyframe: a receiver could never start decoding")]
    NoKeyframe,
    #[error("not an Ogg file: {0}")]
    Ogg(String),
    #[error("not Ogg Opus: {0}")]
    Opus(String),
}

impl Clip {
    /// The embedded VP8 clip of a layer (parsed once per process).
    pub fn builtin(layer: Layer) -> Arc<Clip> {
        static CLIPS: [OnceLock<Arc<Clip>>; 3] = [OnceLock::new(), OnceLock::new(), OnceLock::new()];
        let (i, bytes) = match layer {
            Layer::Low => (0, LOW_IVF),
            Layer::Mid => (1, MID_IVF),
            Layer::High => (2, HIGH_IVF),
        };
        CLIPS[i]
            .get_or_init(|| {
                let ivf = IvfFile::parse(bytes).expect("embedded clip is a valid IVF");
                Arc::new(Clip::from_ivf(&ivf).expect("embedded clip starts with a keyframe"))
            })
            .clone()
    }

    /// The embedded Opus clip.
    pub fn builtin_opus() -> Arc<Clip> {
        static OPUS: OnceLock<Arc<Clip>> = OnceLock::new();
        OPUS.get_or_init(|| Arc::new(Clip::from_ogg_opus(AUDIO_OPUS).expect("embedded clip is Ogg Opus"))).clone()
    }

    /// The VP8 frames of an IVF file, from its first keyframe on; frame durations come from the pts steps (the
    /// last frame lasts as long as the median step).
    pub fn from_ivf(ivf: &IvfFile) -> Result<Clip, ClipError> {
        let first_key = ivf.frames.iter().position(|(_, d)| vp8_is_keyframe(d)).ok_or(ClipError::NoKeyframe)?;
        let frames = &ivf.frames[first_key..];
        // pts in the file's timebase (scale / rate seconds) to the 90 kHz clock, without rounding drift.
        let to_clock =
            |pts: u64| (pts as u128 * VIDEO_CLOCK as u128 * ivf.scale as u128 / ivf.rate as u128).min(u64::MAX as u128);
        let times: Vec<u64> = frames.iter().map(|(pts, _)| to_clock(*pts) as u64).collect();
        let mut steps: Vec<u64> = times.windows(2).map(|w| w[1].saturating_sub(w[0])).filter(|s| *s > 0).collect();
        steps.sort_unstable();
        let last = steps.get(steps.len() / 2).copied().unwrap_or(VIDEO_CLOCK as u64 / 30);
        let mut out = Vec::with_capacity(frames.len());
        for (i, (_, data)) in frames.iter().enumerate() {
            let d = times.get(i + 1).map_or(last, |next| next.saturating_sub(times[i]));
            out.push(ClipFrame { data: data.as_slice().into(), key: vp8_is_keyframe(data), duration: d as u32 });
        }
        Ok(Clip { codec: ClipCodec::Vp8, clock_rate: VIDEO_CLOCK, size: vp8_keyframe_size(&frames[0].1), frames: out })
    }

    /// The packets of an Ogg Opus file (RFC 7845): the two header packets are checked and skipped, each audio
    /// packet's duration is read from its TOC byte (RFC 6716 §3.1).
    pub fn from_ogg_opus(bytes: &[u8]) -> Result<Clip, ClipError> {
        let mut r = ogg::PacketReader::new(std::io::Cursor::new(bytes));
        let mut next = || r.read_packet().map_err(|e| ClipError::Ogg(e.to_string()));
        let head = next()?.ok_or_else(|| ClipError::Ogg("no packets".into()))?;
        if !head.data.starts_with(b"OpusHead") || head.data.len() < 19 {
            return Err(ClipError::Opus("the first packet is not an OpusHead".into()));
        }
        if head.data[18] != 0 {
            return Err(ClipError::Opus("multichannel mapping families are not supported: use mono or stereo".into()));
        }
        match next()? {
            Some(p) if p.data.starts_with(b"OpusTags") => {}
            _ => return Err(ClipError::Opus("the second packet is not OpusTags".into())),
        }
        let mut frames = Vec::new();
        while let Some(p) = next()? {
            let duration = opus_packet_samples(&p.data)
                .ok_or_else(|| ClipError::Opus(format!("packet {} has a bad TOC byte", frames.len())))?;
            frames.push(ClipFrame { data: p.data.into(), key: true, duration });
        }
        if frames.is_empty() {
            return Err(ClipError::Opus("no audio packets".into()));
        }
        Ok(Clip { codec: ClipCodec::Opus, clock_rate: OPUS_CLOCK, size: None, frames })
    }

    /// One pass through the clip, in RTP clock units.
    pub fn duration(&self) -> u64 {
        self.frames.iter().map(|f| f.duration as u64).sum()
    }
}

/// Samples (at 48 kHz) in one Opus packet, from its TOC byte and frame count; `None` for a malformed packet.
pub fn opus_packet_samples(packet: &[u8]) -> Option<u32> {
    let toc = *packet.first()?;
    let config = toc >> 3;
    // Frame sizes in 48 kHz samples: SILK 10/20/40/60 ms, hybrid 10/20 ms, CELT 2.5/5/10/20 ms.
    let per_frame = match config {
        0..=11 => [480, 960, 1920, 2880][(config % 4) as usize],
        12..=15 => [480, 960][(config % 2) as usize],
        _ => [120, 240, 480, 960][(config % 4) as usize],
    };
    let count = match toc & 3 {
        0 => 1,
        1 | 2 => 2,
        _ => (*packet.get(1)? & 0x3f) as u32,
    };
    let total = per_frame * count;
    // A packet holds at least one frame and at most 120 ms.
    (count > 0 && total <= 5760).then_some(total)
}

/// One frame handed out by [`ClipLoop::next_frame`].
#[derive(Debug, Clone)]
pub struct LoopFrame {
    pub data: Arc<[u8]>,
    pub key: bool,
    /// RTP time (clip clock), counted from 0 and continuous across loops and skips.
    pub rtp_time: u64,
    /// How long until the next frame is due, in RTP clock units.
    pub duration: u32,
}

/// A clip played in a loop, without I/O or a clock of its own: each [`next_frame`](ClipLoop::next_frame) gives the
/// next frame and its RTP time; the RTP time advances by each frame's duration, so it runs on smoothly when the
/// clip wraps around, and a consumer that sends frame *n* at `start + rtp_time / clock_rate` keeps real time.
#[derive(Debug, Clone)]
pub struct ClipLoop {
    clip: Arc<Clip>,
    pos: usize,
    rtp_time: u64,
    want_keyframe: bool,
}

impl ClipLoop {
    /// Starts at the clip's first frame (a keyframe).
    pub fn new(clip: Arc<Clip>) -> ClipLoop {
        ClipLoop { clip, pos: 0, rtp_time: 0, want_keyframe: false }
    }

    pub fn clip(&self) -> &Arc<Clip> {
        &self.clip
    }

    /// A receiver asked for a keyframe (PLI/FIR): the next frame handed out is the clip's next keyframe, skipping
    /// the delta frames before it (the RTP clock does not jump, only the picture does).
    pub fn request_keyframe(&mut self) {
        self.want_keyframe = true;
    }

    /// The next frame to send.
    pub fn next_frame(&mut self) -> LoopFrame {
        let n = self.clip.frames.len();
        if std::mem::take(&mut self.want_keyframe) && !self.clip.frames[self.pos].key {
            // Every clip has a keyframe (checked when it was made), so this ends within one pass.
            while !self.clip.frames[self.pos].key {
                self.pos = (self.pos + 1) % n;
            }
        }
        let f = &self.clip.frames[self.pos];
        let out = LoopFrame { data: f.data.clone(), key: f.key, rtp_time: self.rtp_time, duration: f.duration };
        self.rtp_time += f.duration as u64;
        self.pos = (self.pos + 1) % n;
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_layers_are_real_time_vp8() {
        for layer in Layer::ALL {
            let clip = Clip::builtin(layer);
            assert_eq!(clip.codec, ClipCodec::Vp8);
            assert_eq!(clip.size, Some(layer.size()), "{layer:?}");
            assert!(clip.frames[0].key);
            // 30 fps, a keyframe every second, every frame shown (no hidden alt-ref frames to skip).
            assert!(clip.frames.iter().all(|f| f.duration == 3000), "{layer:?}");
            let keys: Vec<usize> = clip.frames.iter().enumerate().filter(|(_, f)| f.key).map(|(i, _)| i).collect();
            assert!(keys.windows(2).all(|w| w[1] - w[0] <= 30), "{layer:?}: keyframes at {keys:?}");
            assert!(clip.frames.iter().all(|f| f.data[0] & 0x10 != 0), "{layer:?}: show_frame");
            for f in clip.frames.iter().filter(|f| f.key) {
                assert_eq!(vp8_keyframe_size(&f.data), Some(layer.size()));
            }
            assert!(clip.duration() >= 3 * 90_000, "{layer:?}: a few seconds");
        }
        // The bitrates are ordered like simulcast layers.
        let bytes = |l| Clip::builtin(l).frames.iter().map(|f| f.data.len()).sum::<usize>();
        assert!(bytes(Layer::Low) < bytes(Layer::Mid) && bytes(Layer::Mid) < bytes(Layer::High));
    }

    #[test]
    fn builtin_opus_is_20ms_packets() {
        let clip = Clip::builtin_opus();
        assert_eq!((clip.codec, clip.clock_rate), (ClipCodec::Opus, 48_000));
        assert!(clip.frames.len() >= 150, "a few seconds of 20 ms packets");
        assert!(clip.frames.iter().all(|f| f.duration == 960));
    }

    #[test]
    fn loop_keeps_the_rtp_clock_running_across_wraps() {
        let clip = Clip::builtin(Layer::Low);
        let n = clip.frames.len();
        let mut lp = ClipLoop::new(clip.clone());
        let mut last = None;
        for i in 0..(2 * n + 5) {
            let f = lp.next_frame();
            assert_eq!(f.rtp_time, i as u64 * 3000, "frame {i}");
            assert_eq!(f.data, clip.frames[i % n].data, "frame {i} is the clip's frame {}", i % n);
            if let Some(prev) = last {
                assert_eq!(f.rtp_time - prev, 3000);
            }
            last = Some(f.rtp_time);
        }
    }

    #[test]
    fn keyframe_request_skips_to_the_next_keyframe() {
        let clip = Clip::builtin(Layer::Mid);
        let mut lp = ClipLoop::new(clip.clone());
        for _ in 0..5 {
            lp.next_frame();
        }
        lp.request_keyframe();
        let f = lp.next_frame();
        assert!(f.key, "answered from the next keyframe");
        assert_eq!(f.rtp_time, 5 * 3000, "the clock does not jump");
        let k = clip.frames.iter().skip(5).position(|f| f.key).unwrap() + 5;
        assert_eq!(f.data, clip.frames[k].data);
        assert!(!lp.next_frame().key, "then the delta frames after it");
        // Near the end the next keyframe is the first frame again.
        let mut lp = ClipLoop::new(clip.clone());
        let last_key = clip.frames.iter().rposition(|f| f.key).unwrap();
        for _ in 0..=last_key {
            lp.next_frame();
        }
        lp.request_keyframe();
        assert_eq!(lp.next_frame().data, clip.frames[0].data);
    }

    #[test]
    fn opus_toc_durations() {
        assert_eq!(opus_packet_samples(&[0xfc]), Some(960)); // CELT FB 20 ms, one frame
        assert_eq!(opus_packet_samples(&[0x0b << 3 | 1]), Some(2 * 2880)); // SILK 60 ms, two frames
        assert_eq!(opus_packet_samples(&[30 << 3 | 3, 3]), Some(3 * 480)); // CELT 10 ms, code 3, three frames
        assert_eq!(opus_packet_samples(&[0x0b << 3 | 3, 3]), None, "180 ms is too long");
        assert_eq!(opus_packet_samples(&[0xfb, 0]), None, "code 3 with no frames");
        assert_eq!(opus_packet_samples(&[]), None);
    }

    #[test]
    fn bad_clips_get_clear_errors() {
        assert!(matches!(Clip::from_ogg_opus(b"not ogg at all"), Err(ClipError::Ogg(_))));
        let ivf =
            IvfFile { fourcc: *b"VP80", width: 2, height: 2, rate: 30, scale: 1, frames: vec![(0, vec![1, 0, 0])] };
        assert!(matches!(Clip::from_ivf(&ivf), Err(ClipError::NoKeyframe)));
    }
}
