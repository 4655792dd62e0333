//! Video in and out: a VP8 encoder on libvpx, a live test pattern, IVF files (read for `--send`, written for
//! `--record`).

use std::fs::File;
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::mem::MaybeUninit;
use std::os::raw::{c_int, c_ulong};
use std::path::{Path, PathBuf};
use std::ptr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::broadcast;
use vpx_sys as vpx;

use crate::PeerError;

/// One encoded VP8 frame, shared by every session that sends it.
#[derive(Debug)]
pub struct EncodedFrame {
    pub data: Arc<[u8]>,
    pub key: bool,
    /// RTP time in 90 kHz units.
    pub rtp_90k: u64,
}

/// `true` when a VP8 frame is a keyframe (RFC 6386 §9.1: bit 0 of the frame tag is 0).
pub fn vp8_is_keyframe(frame: &[u8]) -> bool {
    !frame.is_empty() && frame[0] & 1 == 0
}

/// Width and height from a VP8 keyframe (start code 9d 01 2a, then 14-bit sizes).
pub fn vp8_keyframe_size(frame: &[u8]) -> Option<(u16, u16)> {
    if frame.len() < 10 || !vp8_is_keyframe(frame) || frame[3..6] != [0x9d, 0x01, 0x2a] {
        return None;
    }
    let w = u16::from_le_bytes([frame[6], frame[7]]) & 0x3fff;
    let h = u16::from_le_bytes([frame[8], frame[9]]) & 0x3fff;
    Some((w, h))
}

/// A VP8 encoder for real-time use (no lag, CBR, forced keyframes on request).
pub struct Vp8Encoder {
    ctx: vpx::vpx_codec_ctx_t,
    width: u32,
    height: u32,
}

// The context is only used from the thread that owns the encoder.
unsafe impl Send for Vp8Encoder {}

impl Vp8Encoder {
    pub fn new(width: u32, height: u32, fps: u32, kbps: u32) -> Result<Self, PeerError> {
        let err = |what: &str| PeerError::Encoder(format!("libvpx {what} failed"));
        unsafe {
            let iface = vpx::vpx_codec_vp8_cx();
            if iface.is_null() {
                return Err(err("vpx_codec_vp8_cx"));
            }
            let mut cfg = MaybeUninit::<vpx::vpx_codec_enc_cfg_t>::zeroed().assume_init();
            if vpx::vpx_codec_enc_config_default(iface, &mut cfg, 0) != vpx::VPX_CODEC_OK {
                return Err(err("vpx_codec_enc_config_default"));
            }
            cfg.g_w = width;
            cfg.g_h = height;
            cfg.g_timebase.num = 1;
            cfg.g_timebase.den = fps as c_int;
            cfg.rc_target_bitrate = kbps;
            cfg.g_threads = 1;
            cfg.g_lag_in_frames = 0;
            cfg.g_error_resilient = vpx::VPX_ERROR_RESILIENT_DEFAULT;
            cfg.rc_end_usage = vpx::vpx_rc_mode::VPX_CBR;
            cfg.kf_mode = vpx::vpx_kf_mode::VPX_KF_AUTO;
            // A keyframe every few seconds lets a receiver that lost one recover without asking.
            cfg.kf_max_dist = fps * 3;
            let mut ctx = MaybeUninit::<vpx::vpx_codec_ctx_t>::zeroed().assume_init();
            if vpx::vpx_codec_enc_init_ver(&mut ctx, iface, &cfg, 0, vpx::VPX_ENCODER_ABI_VERSION as c_int)
                != vpx::VPX_CODEC_OK
            {
                return Err(err("vpx_codec_enc_init"));
            }
            // Fastest real-time speed: two cores are shared with everything else.
            vpx::vpx_codec_control_(&mut ctx, vpx::vp8e_enc_control_id::VP8E_SET_CPUUSED as c_int, 12 as c_int);
            Ok(Vp8Encoder { ctx, width, height })
        }
    }

    /// Encodes one I420 picture; returns the frames it produced (usually one).
    pub fn encode(&mut self, i420: &[u8], pts: i64, force_key: bool) -> Result<Vec<(Vec<u8>, bool)>, PeerError> {
        assert!(i420.len() >= (self.width * self.height * 3 / 2) as usize);
        let mut out = Vec::new();
        unsafe {
            let mut img = MaybeUninit::<vpx::vpx_image_t>::zeroed().assume_init();
            if vpx::vpx_img_wrap(
                &mut img,
                vpx::vpx_img_fmt::VPX_IMG_FMT_I420,
                self.width,
                self.height,
                1,
                i420.as_ptr() as *mut u8,
            )
            .is_null()
            {
                return Err(PeerError::Encoder("libvpx vpx_img_wrap failed".into()));
            }
            let flags = if force_key { vpx::VPX_EFLAG_FORCE_KF as vpx::vpx_enc_frame_flags_t } else { 0 };
            if vpx::vpx_codec_encode(&mut self.ctx, &img, pts, 1, flags, vpx::VPX_DL_REALTIME as c_ulong)
                != vpx::VPX_CODEC_OK
            {
                return Err(PeerError::Encoder("libvpx vpx_codec_encode failed".into()));
            }
            let mut iter: vpx::vpx_codec_iter_t = ptr::null();
            loop {
                let pkt = vpx::vpx_codec_get_cx_data(&mut self.ctx, &mut iter);
                if pkt.is_null() {
                    break;
                }
                if (*pkt).kind == vpx::vpx_codec_cx_pkt_kind::VPX_CODEC_CX_FRAME_PKT {
                    let f = &(*pkt).data.frame;
                    let data = std::slice::from_raw_parts(f.buf as *const u8, f.sz as usize).to_vec();
                    out.push((data, f.flags & vpx::VPX_FRAME_IS_KEY != 0));
                }
            }
        }
        Ok(out)
    }
}

impl Drop for Vp8Encoder {
    fn drop(&mut self) {
        unsafe {
            vpx::vpx_codec_destroy(&mut self.ctx);
        }
    }
}

/// A VP8 decoder, used to check recordings (libvpx is the judge of what a player can show).
pub struct Vp8Decoder {
    ctx: vpx::vpx_codec_ctx_t,
}

unsafe impl Send for Vp8Decoder {}

impl Vp8Decoder {
    pub fn new() -> Result<Self, PeerError> {
        unsafe {
            let mut ctx = MaybeUninit::<vpx::vpx_codec_ctx_t>::zeroed().assume_init();
            let cfg = vpx::vpx_codec_dec_cfg_t { threads: 1, w: 0, h: 0 };
            if vpx::vpx_codec_dec_init_ver(
                &mut ctx,
                vpx::vpx_codec_vp8_dx(),
                &cfg,
                0,
                vpx::VPX_DECODER_ABI_VERSION as c_int,
            ) != vpx::VPX_CODEC_OK
            {
                return Err(PeerError::Encoder("libvpx vpx_codec_dec_init failed".into()));
            }
            Ok(Vp8Decoder { ctx })
        }
    }

    /// Decodes one frame; returns the size of the picture it produced, if any.
    pub fn decode(&mut self, frame: &[u8]) -> Result<Option<(u32, u32)>, String> {
        unsafe {
            let r = vpx::vpx_codec_decode(&mut self.ctx, frame.as_ptr(), frame.len() as _, ptr::null_mut(), 0);
            if r != vpx::VPX_CODEC_OK {
                return Err(format!("libvpx cannot decode the frame: {r:?}"));
            }
            let mut iter: vpx::vpx_codec_iter_t = ptr::null();
            let img = vpx::vpx_codec_get_frame(&mut self.ctx, &mut iter);
            Ok((!img.is_null()).then(|| ((*img).d_w, (*img).d_h)))
        }
    }
}

impl Drop for Vp8Decoder {
    fn drop(&mut self) {
        unsafe {
            vpx::vpx_codec_destroy(&mut self.ctx);
        }
    }
}

/// 3x5 bitmaps of the digits 0-9, one row per 3 bits.
const DIGITS: [[u8; 5]; 10] = [
    [7, 5, 5, 5, 7],
    [2, 6, 2, 2, 7],
    [7, 1, 7, 4, 7],
    [7, 1, 7, 1, 7],
    [5, 5, 7, 1, 1],
    [7, 4, 7, 1, 7],
    [7, 4, 7, 5, 7],
    [7, 1, 1, 1, 1],
    [7, 5, 7, 5, 7],
    [7, 5, 7, 1, 7],
];

/// Draws test-pattern frame `n` into an I420 buffer: colour bars, a box that moves, and the frame number.
pub fn draw_testsrc(buf: &mut [u8], w: usize, h: usize, n: u64) {
    let (y_plane, chroma) = buf.split_at_mut(w * h);
    let (u_plane, v_plane) = chroma.split_at_mut(w * h / 4);
    // Vertical luma bars that scroll one pixel per frame.
    for y in 0..h {
        for x in 0..w {
            let bar = ((x + n as usize) / (w / 8).max(1)) % 8;
            y_plane[y * w + x] = 40 + (bar as u8) * 25;
        }
    }
    for y in 0..h / 2 {
        for x in 0..w / 2 {
            let bar = ((2 * x + n as usize) / (w / 8).max(1)) % 8;
            u_plane[y * (w / 2) + x] = 128u8.wrapping_add((bar as u8).wrapping_mul(17));
            v_plane[y * (w / 2) + x] = 200u8.wrapping_sub((bar as u8).wrapping_mul(19));
        }
    }
    // A white box bouncing across the picture.
    let side = (h / 6).max(4);
    let span = (w - side).max(1);
    let pos = (n as usize * 8) % (2 * span);
    let bx = if pos < span { pos } else { 2 * span - pos };
    let by = h / 2 - side / 2;
    for y in by..(by + side).min(h) {
        for x in bx..(bx + side).min(w) {
            y_plane[y * w + x] = 235;
        }
    }
    // The frame counter, 6 digits, top left, on black.
    let scale = (h / 60).max(2);
    let text = format!("{:06}", n % 1_000_000);
    let (ox, oy) = (scale * 2, scale * 2);
    for y in 0..(7 * scale) {
        for x in 0..(text.len() * 4 * scale + 2 * scale) {
            if oy + y < h && ox + x < w {
                y_plane[(oy + y) * w + ox + x] = 16;
            }
        }
    }
    for (i, ch) in text.bytes().enumerate() {
        let glyph = DIGITS[(ch - b'0') as usize];
        for (row, bits) in glyph.iter().enumerate() {
            for col in 0..3 {
                if bits & (4 >> col) == 0 {
                    continue;
                }
                for dy in 0..scale {
                    for dx in 0..scale {
                        let x = ox + scale + (i * 4 + col) * scale + dx;
                        let y = oy + scale + row * scale + dy;
                        if x < w && y < h {
                            y_plane[y * w + x] = 235;
                        }
                    }
                }
            }
        }
    }
}

/// Where outgoing video comes from.
#[derive(Debug, Clone)]
pub enum Source {
    TestSrc { width: u32, height: u32, fps: u32 },
    Ivf(PathBuf),
}

/// Handle to a running source: subscribe for frames, ask for a keyframe.
#[derive(Clone)]
pub struct SourceHandle {
    pub frames: broadcast::Sender<Arc<EncodedFrame>>,
    pub want_keyframe: Arc<AtomicBool>,
    /// The encoding thread (test pattern), woken to encode a requested keyframe at once.
    encoder: Option<std::thread::Thread>,
}

impl SourceHandle {
    /// The next frame is a keyframe; the test pattern encodes it now rather than at its next frame time (up to
    /// a frame interval later), so a peer that just connected gets its first picture without waiting.
    pub fn request_keyframe(&self) {
        self.want_keyframe.store(true, Ordering::Relaxed);
        if let Some(t) = &self.encoder {
            t.unpark();
        }
    }
}

/// Starts the source on its own thread (encoding is CPU work, kept off the async runtime).
pub fn start_source(source: Source, stop: Arc<AtomicBool>) -> Result<SourceHandle, PeerError> {
    let (tx, _) = broadcast::channel(64);
    let mut handle = SourceHandle { frames: tx.clone(), want_keyframe: Arc::new(AtomicBool::new(true)), encoder: None };
    let want = handle.want_keyframe.clone();
    match source {
        Source::TestSrc { width, height, fps } => {
            let mut enc = Vp8Encoder::new(width, height, fps, 800)?;
            let thread = std::thread::Builder::new()
                .name("testsrc".into())
                .spawn(move || {
                    let (w, h) = (width as usize, height as usize);
                    let mut buf = vec![0u8; w * h * 3 / 2];
                    let period = Duration::from_secs_f64(1.0 / fps as f64);
                    let start = Instant::now();
                    let mut n: u64 = 0;
                    while !stop.load(Ordering::Relaxed) {
                        draw_testsrc(&mut buf, w, h, n);
                        let key = want.swap(false, Ordering::Relaxed);
                        match enc.encode(&buf, n as i64, key) {
                            Ok(frames) => {
                                for (data, key) in frames {
                                    let rtp_90k = n * 90_000 / fps as u64;
                                    let _ = tx.send(Arc::new(EncodedFrame { data: data.into(), key, rtp_90k }));
                                }
                            }
                            Err(e) => {
                                tracing::error!("test source stopped: {e}");
                                return;
                            }
                        }
                        n += 1;
                        // Pace against the start time so encoding time does not slow the clock down. A keyframe
                        // request cuts the wait short: that frame goes out early, the ones after keep the clock.
                        let next = start + period * n as u32;
                        while !want.load(Ordering::Relaxed) && !stop.load(Ordering::Relaxed) {
                            match next.checked_duration_since(Instant::now()) {
                                Some(d) if !d.is_zero() => std::thread::park_timeout(d),
                                _ => break,
                            }
                        }
                    }
                })
                .map_err(|e| PeerError::Encoder(format!("cannot start the test source thread: {e}")))?;
            handle.encoder = Some(thread.thread().clone());
        }
        Source::Ivf(path) => {
            let file = IvfFile::read(&path)?;
            std::thread::Builder::new()
                .name("ivf-source".into())
                .spawn(move || {
                    let start = Instant::now();
                    // Frame times come from the file's pts and timebase; the loop continues the clock.
                    let tb = file.timebase_secs();
                    let first = file.frames.first().map(|f| f.0).unwrap_or(0);
                    let last = file.frames.last().map(|f| f.0).unwrap_or(0);
                    let loop_len = (last - first) as f64 * tb + file.frame_secs();
                    let mut lap = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        for (pts, data) in &file.frames {
                            if stop.load(Ordering::Relaxed) {
                                return;
                            }
                            let t = lap as f64 * loop_len + (*pts - first) as f64 * tb;
                            if let Some(d) = (start + Duration::from_secs_f64(t)).checked_duration_since(Instant::now())
                            {
                                std::thread::sleep(d);
                            }
                            want.store(false, Ordering::Relaxed);
                            let key = vp8_is_keyframe(data);
                            let _ = tx.send(Arc::new(EncodedFrame {
                                data: data.as_slice().into(),
                                key,
                                rtp_90k: (t * 90_000.0) as u64,
                            }));
                        }
                        lap += 1;
                    }
                })
                .map_err(|e| PeerError::Encoder(format!("cannot start the IVF source thread: {e}")))?;
        }
    }
    Ok(handle)
}

/// An IVF file read whole (they are small test clips).
pub struct IvfFile {
    pub fourcc: [u8; 4],
    pub width: u16,
    pub height: u16,
    pub rate: u32,
    pub scale: u32,
    pub frames: Vec<(u64, Vec<u8>)>,
}

impl IvfFile {
    pub fn read(path: &Path) -> Result<IvfFile, PeerError> {
        let bad = |why: &str| PeerError::BadIvf { path: path.to_owned(), why: why.to_owned() };
        let mut bytes = Vec::new();
        File::open(path)
            .and_then(|mut f| f.read_to_end(&mut bytes))
            .map_err(|e| PeerError::Io { what: format!("reading {}", path.display()), source: e })?;
        Self::parse(&bytes).map_err(|why| bad(&why))
    }

    pub fn parse(bytes: &[u8]) -> Result<IvfFile, String> {
        if bytes.len() < 32 || &bytes[0..4] != b"DKIF" {
            return Err("not an IVF file (no DKIF header)".into());
        }
        let hdr_len = u16::from_le_bytes([bytes[6], bytes[7]]) as usize;
        let fourcc: [u8; 4] = bytes[8..12].try_into().unwrap();
        if &fourcc != b"VP80" {
            return Err(format!("codec {} is not VP8 (VP80)", String::from_utf8_lossy(&fourcc)));
        }
        let u16at = |o: usize| u16::from_le_bytes([bytes[o], bytes[o + 1]]);
        let u32at = |o: usize| u32::from_le_bytes(bytes[o..o + 4].try_into().unwrap());
        let (width, height, rate, scale) = (u16at(12), u16at(14), u32at(16), u32at(20));
        if rate == 0 || scale == 0 {
            return Err("timebase is zero".into());
        }
        let mut frames = Vec::new();
        let mut o = hdr_len.max(32);
        while o + 12 <= bytes.len() {
            let size = u32at(o) as usize;
            let pts = u64::from_le_bytes(bytes[o + 4..o + 12].try_into().unwrap());
            o += 12;
            if o + size > bytes.len() {
                return Err(format!("frame {} is cut short", frames.len()));
            }
            frames.push((pts, bytes[o..o + size].to_vec()));
            o += size;
        }
        if frames.is_empty() {
            return Err("no frames".into());
        }
        Ok(IvfFile { fourcc, width, height, rate, scale, frames })
    }

    /// Seconds per pts unit (the header stores the rate and scale: timebase = scale / rate).
    pub fn timebase_secs(&self) -> f64 {
        self.scale as f64 / self.rate as f64
    }

    /// Duration of one frame: the median pts step, or 1/30 s for a one-frame file.
    fn frame_secs(&self) -> f64 {
        let mut steps: Vec<u64> =
            self.frames.windows(2).map(|w| w[1].0.saturating_sub(w[0].0)).filter(|s| *s > 0).collect();
        steps.sort_unstable();
        steps.get(steps.len() / 2).map(|s| *s as f64 * self.timebase_secs()).unwrap_or(1.0 / 30.0)
    }
}

/// Writes VP8 frames to an IVF file (timebase 1/90000, the RTP clock), starting at the first keyframe.
pub struct IvfWriter {
    out: BufWriter<File>,
    pub path: PathBuf,
    pub frames: u32,
    first_ts: Option<u64>,
}

impl IvfWriter {
    pub fn create(path: PathBuf, width: u16, height: u16) -> Result<IvfWriter, PeerError> {
        let file = File::create(&path)
            .map_err(|e| PeerError::Io { what: format!("creating {}", path.display()), source: e })?;
        let mut out = BufWriter::new(file);
        let mut h = Vec::with_capacity(32);
        h.extend_from_slice(b"DKIF");
        h.extend_from_slice(&0u16.to_le_bytes());
        h.extend_from_slice(&32u16.to_le_bytes());
        h.extend_from_slice(b"VP80");
        h.extend_from_slice(&width.to_le_bytes());
        h.extend_from_slice(&height.to_le_bytes());
        h.extend_from_slice(&90_000u32.to_le_bytes());
        h.extend_from_slice(&1u32.to_le_bytes());
        h.extend_from_slice(&0u32.to_le_bytes());
        h.extend_from_slice(&0u32.to_le_bytes());
        out.write_all(&h).map_err(|e| PeerError::Io { what: format!("writing {}", path.display()), source: e })?;
        Ok(IvfWriter { out, path, frames: 0, first_ts: None })
    }

    pub fn write(&mut self, rtp_90k: u64, data: &[u8]) -> Result<(), PeerError> {
        let first = *self.first_ts.get_or_insert(rtp_90k);
        let pts = rtp_90k.saturating_sub(first);
        let io = |e| PeerError::Io { what: format!("writing {}", self.path.display()), source: e };
        self.out.write_all(&(data.len() as u32).to_le_bytes()).map_err(io)?;
        self.out.write_all(&pts.to_le_bytes()).map_err(io)?;
        self.out.write_all(data).map_err(io)?;
        self.frames += 1;
        Ok(())
    }

    /// Flushes and fixes the frame count in the header (players read it for the duration).
    pub fn finish(&mut self) -> Result<(), PeerError> {
        let path = self.path.clone();
        let io = |e| PeerError::Io { what: format!("writing {}", path.display()), source: e };
        self.out.flush().map_err(io)?;
        let f = self.out.get_mut();
        f.seek(SeekFrom::Start(24)).map_err(io)?;
        f.write_all(&self.frames.to_le_bytes()).map_err(io)?;
        f.seek(SeekFrom::End(0)).map_err(io)?;
        f.flush().map_err(io)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_testsrc_and_round_trips_through_ivf() {
        let (w, h) = (160u32, 120u32);
        let mut enc = Vp8Encoder::new(w, h, 30, 300).unwrap();
        let mut buf = vec![0u8; (w * h * 3 / 2) as usize];
        let dir = std::env::temp_dir().join(format!("webcall-peer-ivf-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("t.ivf");
        let mut wr = None;
        let mut keys = 0;
        for n in 0..20u64 {
            draw_testsrc(&mut buf, w as usize, h as usize, n);
            for (data, key) in enc.encode(&buf, n as i64, n == 10).unwrap() {
                assert_eq!(key, vp8_is_keyframe(&data));
                if key {
                    keys += 1;
                    assert_eq!(vp8_keyframe_size(&data), Some((w as u16, h as u16)));
                }
                let wr = wr.get_or_insert_with(|| IvfWriter::create(path.clone(), w as u16, h as u16).unwrap());
                wr.write(n * 3000, &data).unwrap();
            }
        }
        assert!(keys >= 2, "the first frame and the forced one are keyframes");
        wr.unwrap().finish().unwrap();
        let f = IvfFile::read(&path).unwrap();
        assert_eq!((f.width, f.height, f.frames.len()), (160, 120, 20));
        assert_eq!(u32::from_le_bytes(std::fs::read(&path).unwrap()[24..28].try_into().unwrap()), 20);
        assert!(vp8_is_keyframe(&f.frames[0].1));
        let mut dec = Vp8Decoder::new().unwrap();
        for (_, fr) in &f.frames {
            assert_eq!(dec.decode(fr).unwrap(), Some((160, 120)));
        }
        assert!(dec.decode(&[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]).is_err(), "garbage does not decode");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
