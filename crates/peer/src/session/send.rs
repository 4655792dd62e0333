//! What a session sends: video and audio frames (each receiver starts on a keyframe), chat, keyframe requests.

use std::time::{Duration, Instant};

use str0m::format::Codec;
use str0m::media::{Frequency, KeyframeRequestKind, MediaKind, MediaTime, Mid};

use super::Session;
use crate::media::EncodedFrame;

impl Session {
    pub(super) fn on_chat(&mut self, json: &str) {
        if !self.chat_open {
            return tracing::info!("peer {}: chat channel not open; message dropped", self.cfg.remote_id);
        }
        if let Some(mut ch) = self.chat_channel.and_then(|id| self.rtc.channel(id)) {
            if let Err(e) = ch.write(false, json.as_bytes()) {
                tracing::warn!("peer {}: chat not sent: {e}", self.cfg.remote_id);
            }
        }
    }

    pub(super) fn send_frame(&mut self, f: &EncodedFrame) {
        if !self.rtc.is_connected() {
            return;
        }
        // Start each receiver on a keyframe: anything before it is undecodable.
        if !self.sent_keyframe && !f.key {
            if let Some(src) = &self.cfg.source {
                src.request_keyframe();
            }
            return;
        }
        if self.write_media(MediaKind::Video, f) {
            self.sent_keyframe = true;
            let len = f.data.len() as u64;
            self.update(|r| {
                r.frames_out += 1;
                r.bytes_out += len;
            });
        }
    }

    pub(super) fn send_audio(&mut self, f: &EncodedFrame) {
        if self.rtc.is_connected() && self.write_media(MediaKind::Audio, f) {
            self.update(|r| r.audio_out += 1);
        }
    }

    /// Writes one frame to the first sending m-line of `kind` (VP8 at 90 kHz, Opus at 48 kHz); false if none.
    pub(super) fn write_media(&mut self, kind: MediaKind, f: &EncodedFrame) -> bool {
        let (mids, codec, clock) = match kind {
            MediaKind::Video => (self.video_mids.clone(), Codec::Vp8, Frequency::NINETY_KHZ),
            MediaKind::Audio => (self.audio_mids.clone(), Codec::Opus, Frequency::FORTY_EIGHT_KHZ),
        };
        for mid in mids {
            let sending = self.rtc.media(mid).map(|m| m.direction().is_sending()).unwrap_or(false);
            if !sending {
                continue;
            }
            let Some(writer) = self.rtc.writer(mid) else { continue };
            let Some(pt) = writer.payload_params().find(|p| p.spec().codec == codec).map(|p| p.pt()) else {
                continue;
            };
            return match writer.write(pt, Instant::now(), MediaTime::new(f.rtp_time, clock), f.data.clone()) {
                Ok(()) => true,
                Err(e) => {
                    tracing::debug!("peer {}: {kind:?} frame not sent: {e}", self.cfg.remote_id);
                    false
                }
            };
        }
        false
    }

    pub(super) fn request_keyframe(&mut self, mid: Mid) {
        if self.last_keyframe_request.is_some_and(|t| t.elapsed() < Duration::from_millis(500)) {
            return;
        }
        if let Some(mut w) = self.rtc.writer(mid) {
            let _ = w.request_keyframe(None, KeyframeRequestKind::Pli);
            self.last_keyframe_request = Some(Instant::now());
        }
    }
}
