//! Recording without I/O: which frames of a published track go into its file, and the file's bytes. The core
//! feeds every frame of a track in a recorded room to the track's [`Recorder`]; what comes out are
//! [`RecordOp`]s, which the adapter writes to disk on a thread of its own (the media pump never waits on a disk).

use std::sync::Arc;
use std::time::Instant;

use str0m::format::Codec as RtpCodec;
use str0m::media::{MediaData, MediaKind, Rid};

use crate::mux::{self, Codec, Muxer, Patch};

/// What the adapter does with the files. A file is opened with its first (key)frame, so a track that never sends
/// one leaves no file.
#[derive(Debug, Clone, PartialEq)]
pub enum RecordOp {
    /// Create a file for this track of `participant` in `room` (the adapter names it, with the time it opens it).
    Open {
        file: u64,
        room: Arc<str>,
        participant: Arc<str>,
        kind: MediaKind,
        mid: String,
        extension: &'static str,
    },
    Append {
        file: u64,
        bytes: Vec<u8>,
    },
    /// Append `tail`, write the patches at their offsets, close. `frames` were written in all.
    Close {
        file: u64,
        tail: Vec<u8>,
        patches: Vec<Patch>,
        frames: u64,
    },
}

/// What the recorder wants from the publisher after a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Want {
    Nothing,
    /// A keyframe of this layer (the file starts with one, and continues after a loss or layer change with one).
    Keyframe(Option<Rid>),
}

/// One published track's file.
pub struct Recorder {
    file: u64,
    mux: Option<Muxer>,
    /// The layer recorded (video); `None` until the first keyframe.
    layer: Option<Option<Rid>>,
    /// Frames are skipped until a keyframe (after loss: the decoder would show garbage).
    wait_key: bool,
    /// Added to the track's media time (ms) so that the file starts at 0 and runs on across a layer change.
    offset: i64,
    /// The last time written (ms in the file) and when its frame arrived.
    last: Option<(i64, Instant)>,
}

impl std::fmt::Debug for Recorder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Recorder").field("file", &self.file).field("layer", &self.layer).finish_non_exhaustive()
    }
}

/// Milliseconds of a frame's media time.
fn millis(d: &MediaData) -> i64 {
    let t = d.time;
    (t.numer() as i128 * 1000 / t.denom().max(1) as i128) as i64
}

impl Recorder {
    pub fn new(file: u64) -> Recorder {
        Recorder { file, mux: None, layer: None, wait_key: true, offset: 0, last: None }
    }

    /// The layer recorded (`None` before the first keyframe).
    pub fn layer(&self) -> Option<Option<Rid>> {
        self.layer
    }

    /// The file's id once it is open.
    pub fn file(&self) -> Option<u64> {
        self.mux.as_ref().map(|_| self.file)
    }

    /// A frame of the track. `best`: the layer to record when choosing one (the highest that arrives);
    /// `keep`: stay with the layer recorded so far (it still arrives and nothing larger does). Ops go to `out`.
    #[allow(clippy::too_many_arguments)]
    pub fn frame(
        &mut self,
        d: &MediaData,
        kind: MediaKind,
        best: Option<Rid>,
        keep: bool,
        room: &Arc<str>,
        participant: &Arc<str>,
        out: &mut Vec<RecordOp>,
    ) -> Want {
        let codec = match d.params.spec().codec {
            RtpCodec::Vp8 => Codec::Vp8,
            RtpCodec::H264 => Codec::H264,
            RtpCodec::Opus => Codec::Opus,
            _ => return Want::Nothing,
        };
        let key = d.is_keyframe() || kind == MediaKind::Audio;
        let switching = match self.layer {
            // The recorded layer goes on until the one it moves to has sent its keyframe.
            Some(cur) if cur == d.rid => false,
            // Another layer: taken up only when the recorded one stopped coming or a larger one came.
            Some(_) if keep || d.rid != best => return Want::Nothing,
            Some(_) if !key => return Want::Keyframe(d.rid),
            Some(_) => true,
            None if d.rid != best => return Want::Nothing,
            None => true,
        };
        if !d.contiguous && kind == MediaKind::Video {
            self.wait_key = true;
        }
        if (self.wait_key || switching) && !key {
            return Want::Keyframe(d.rid);
        }
        let t = millis(d);
        if switching || self.layer.is_none() {
            self.offset = match self.last {
                // Layers have clocks of their own: continue from the last frame written, by the arrival gap.
                Some((last, at)) => last + (d.network_time.saturating_duration_since(at).as_millis() as i64).max(1) - t,
                None => -t,
            };
            self.layer = Some(d.rid);
        }
        let data = match codec {
            Codec::H264 => mux::annexb_to_avcc(&d.data),
            _ => d.data.to_vec(),
        };
        let mut bytes = Vec::new();
        if self.mux.is_none() {
            let (size, private) = match codec {
                Codec::Vp8 => (crate::core::vp8_size(&d.data), None),
                Codec::H264 => match mux::avcc_record(&d.data) {
                    Some((record, size)) => (size, Some(record)),
                    // A keyframe without its parameter sets cannot start the file.
                    None => return Want::Keyframe(d.rid),
                },
                Codec::Opus => (None, None),
            };
            let mut m = Muxer::new(codec);
            bytes = m.start(size, private);
            self.mux = Some(m);
            out.push(RecordOp::Open {
                file: self.file,
                room: room.clone(),
                participant: participant.clone(),
                kind,
                mid: d.mid.to_string(),
                extension: codec.extension(),
            });
        }
        self.wait_key = false;
        let ms = t + self.offset;
        self.last = Some((ms, d.network_time));
        let m = self.mux.as_mut().expect("opened above");
        bytes.extend(m.frame(ms, key, &data));
        if !bytes.is_empty() {
            out.push(RecordOp::Append { file: self.file, bytes });
        }
        Want::Nothing
    }

    /// Ends the file (if one was opened).
    pub fn finish(self) -> Option<RecordOp> {
        let mut m = self.mux?;
        let (tail, patches) = m.finish();
        Some(RecordOp::Close { file: self.file, tail, patches, frames: m.frames() })
    }
}
