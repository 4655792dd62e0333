//! Media in and out: the sources `--send` starts (looping clips, or a live test pattern with the `libvpx`
//! feature), IVF files (read for `--send`, written for `--record`).

use std::fs::File;
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::broadcast;

use crate::clip::{Clip, ClipLoop, Layer};
use crate::PeerError;

#[cfg(feature = "libvpx")]
pub use crate::vpx::{Vp8Decoder, Vp8Encoder};

/// One encoded frame (VP8) or packet (Opus), shared by every session that sends it.
#[derive(Debug)]
pub struct EncodedFrame {
    pub data: Arc<[u8]>,
    /// A VP8 keyframe (always true for Opus).
    pub key: bool,
    /// RTP time in the track's clock: 90 kHz for VP8, 48 kHz for Opus.
    pub rtp_time: u64,
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

/// Where outgoing media comes from.
#[derive(Debug, Clone)]
pub enum Source {
    /// The embedded clips: the test pattern in VP8 at `layer`, and the Opus tone.
    TestSrc { layer: Layer },
    /// A live test pattern encoded with libvpx (cargo feature `libvpx`), and the Opus tone.
    Live { width: u32, height: u32, fps: u32 },
    /// An IVF file of VP8, looped (video only).
    Ivf(PathBuf),
}

/// One outgoing track on a thread of its own: every session subscribes to its frames; any of them can ask for a
/// keyframe.
#[derive(Clone)]
pub struct TrackHandle {
    pub frames: broadcast::Sender<Arc<EncodedFrame>>,
    want_keyframe: Arc<AtomicBool>,
    /// Woken to answer a keyframe request at once (the live encoder).
    thread: Option<std::thread::Thread>,
}

impl TrackHandle {
    fn new() -> TrackHandle {
        TrackHandle { frames: broadcast::channel(64).0, want_keyframe: Arc::new(AtomicBool::new(false)), thread: None }
    }

    /// The next frame is a keyframe: the clips skip to their next keyframe at the next frame time; the live test
    /// pattern encodes one at once rather than at its next frame time, so a peer that just connected gets its
    /// first picture without waiting.
    pub fn request_keyframe(&self) {
        self.want_keyframe.store(true, Ordering::Relaxed);
        if let Some(t) = &self.thread {
            t.unpark();
        }
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Arc<EncodedFrame>> {
        self.frames.subscribe()
    }
}

/// Handle to a running source: its video track and, for `testsrc` and `live`, an Opus track.
#[derive(Clone)]
pub struct SourceHandle {
    pub video: TrackHandle,
    pub audio: Option<TrackHandle>,
}

impl SourceHandle {
    pub fn request_keyframe(&self) {
        self.video.request_keyframe();
    }
}

/// Starts the source on threads of its own (pacing and encoding are kept off the async runtime).
pub fn start_source(source: Source, stop: Arc<AtomicBool>) -> Result<SourceHandle, PeerError> {
    match source {
        Source::TestSrc { layer } => Ok(SourceHandle {
            video: play_clip(Clip::builtin(layer), "testsrc-video", stop.clone())?,
            audio: Some(play_clip(Clip::builtin_opus(), "testsrc-audio", stop)?),
        }),
        Source::Live { width, height, fps } => Ok(SourceHandle {
            video: live::start(width, height, fps, stop.clone())?,
            audio: Some(play_clip(Clip::builtin_opus(), "testsrc-audio", stop)?),
        }),
        Source::Ivf(path) => {
            let file = IvfFile::read(&path)?;
            let clip = Clip::from_ivf(&file).map_err(|e| PeerError::BadIvf { path, why: e.to_string() })?;
            Ok(SourceHandle { video: play_clip(Arc::new(clip), "ivf-source", stop)?, audio: None })
        }
    }
}

/// Plays `clip` in a loop on a thread of its own, in real time: frame *n* is broadcast at `start + rtp_time /
/// clock_rate` (see [`ClipLoop`]); a keyframe request is answered from the clip's next keyframe at the next frame
/// time. The thread ends when `stop` is set. An SFU publisher can start one per simulcast layer
/// (`Clip::builtin(Layer::Low)`, `Mid`, `High`) and write each subscriber's frames to its layer's RTP stream.
pub fn play_clip(clip: Arc<Clip>, name: &str, stop: Arc<AtomicBool>) -> Result<TrackHandle, PeerError> {
    let handle = TrackHandle::new();
    let (tx, want) = (handle.frames.clone(), handle.want_keyframe.clone());
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            let clock = clip.clock_rate as f64;
            let mut lp = ClipLoop::new(clip);
            let start = Instant::now();
            while !stop.load(Ordering::Relaxed) {
                if want.swap(false, Ordering::Relaxed) {
                    lp.request_keyframe();
                }
                let f = lp.next_frame();
                let due = start + Duration::from_secs_f64(f.rtp_time as f64 / clock);
                if let Some(d) = due.checked_duration_since(Instant::now()) {
                    std::thread::sleep(d);
                }
                let _ = tx.send(Arc::new(EncodedFrame { data: f.data, key: f.key, rtp_time: f.rtp_time }));
            }
        })
        .map_err(|e| PeerError::Io { what: format!("starting the {name} thread"), source: e })?;
    Ok(handle)
}

/// The live test pattern, encoded with libvpx.
#[cfg(feature = "libvpx")]
mod live {
    use super::*;
    use crate::vpx::Vp8Encoder;

    pub fn start(width: u32, height: u32, fps: u32, stop: Arc<AtomicBool>) -> Result<TrackHandle, PeerError> {
        let mut handle = TrackHandle::new();
        // The first frame is a keyframe anyway; start without a pending request.
        let (tx, want) = (handle.frames.clone(), handle.want_keyframe.clone());
        let mut enc = Vp8Encoder::new(width, height, fps, 800)?;
        let thread = std::thread::Builder::new()
            .name("testsrc-live".into())
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
                                let rtp_time = n * 90_000 / fps as u64;
                                let _ = tx.send(Arc::new(EncodedFrame { data: data.into(), key, rtp_time }));
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
            .map_err(|e| PeerError::Io { what: "starting the live test source thread".into(), source: e })?;
        handle.thread = Some(thread.thread().clone());
        Ok(handle)
    }
}

/// Without libvpx there is no live encoder: say how to get one, or what to send instead.
#[cfg(not(feature = "libvpx"))]
mod live {
    use super::*;

    pub fn start(_: u32, _: u32, _: u32, _: Arc<AtomicBool>) -> Result<TrackHandle, PeerError> {
        Err(PeerError::NoLibvpx)
    }
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
        Self::start(file, path, width, height)
    }

    /// A new file `DIR/STEM.ivf`, or `DIR/STEM-ALT.ivf` (then `STEM-ALT-2.ivf`, …) when that exists: two
    /// recordings of one peer (peer-to-peer and through the SFU) may start in either order, and neither may
    /// truncate the other, so the name is claimed with `O_EXCL`.
    pub fn create_new(dir: &Path, stem: &str, alt: &str, width: u16, height: u16) -> Result<IvfWriter, PeerError> {
        for n in 0u32.. {
            let path = match n {
                0 => dir.join(format!("{stem}.ivf")),
                1 => dir.join(format!("{stem}-{alt}.ivf")),
                n => dir.join(format!("{stem}-{alt}-{n}.ivf")),
            };
            match File::options().write(true).create_new(true).open(&path) {
                Ok(file) => return Self::start(file, path, width, height),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && n < 1000 => continue,
                Err(e) => return Err(PeerError::Io { what: format!("creating {}", path.display()), source: e }),
            }
        }
        unreachable!("the loop returns")
    }

    fn start(file: File, path: PathBuf, width: u16, height: u16) -> Result<IvfWriter, PeerError> {
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

    /// Two recordings of one peer (peer-to-peer and through the SFU, either first) never share a file.
    #[test]
    fn a_second_recording_of_a_peer_gets_its_own_file() {
        let dir = std::env::temp_dir().join(format!("webcall-peer-ivf-new-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let names: Vec<String> = ["sfu", "p2p", "p2p"]
            .iter()
            .map(|alt| {
                let w = IvfWriter::create_new(&dir, "p1-ID", alt, 320, 180).unwrap();
                w.path.file_name().unwrap().to_str().unwrap().to_owned()
            })
            .collect();
        assert_eq!(names, ["p1-ID.ivf", "p1-ID-p2p.ivf", "p1-ID-p2p-2.ivf"]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn clip_round_trips_through_ivf() {
        let clip = Clip::builtin(Layer::Low);
        let dir = std::env::temp_dir().join(format!("webcall-peer-ivf-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("t.ivf");
        let mut wr = IvfWriter::create(path.clone(), 320, 180).unwrap();
        let mut lp = ClipLoop::new(clip.clone());
        for _ in 0..40 {
            let f = lp.next_frame();
            wr.write(f.rtp_time, &f.data).unwrap();
        }
        wr.finish().unwrap();
        let f = IvfFile::read(&path).unwrap();
        assert_eq!((f.width, f.height, f.frames.len(), f.rate, f.scale), (320, 180, 40, 90_000, 1));
        assert_eq!(u32::from_le_bytes(std::fs::read(&path).unwrap()[24..28].try_into().unwrap()), 40);
        for (i, (pts, data)) in f.frames.iter().enumerate() {
            assert_eq!((*pts, &data[..]), (i as u64 * 3000, &clip.frames[i].data[..]));
        }
        // Read back as a clip: the same frames and durations.
        let again = Clip::from_ivf(&f).unwrap();
        assert_eq!(again.size, Some((320, 180)));
        assert!(again.frames.iter().all(|f| f.duration == 3000));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn ivf_errors_say_what_is_wrong() {
        assert!(matches!(IvfFile::parse(b"RIFF"), Err(e) if e.contains("DKIF")));
        let mut b = std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/clips/low.ivf")).unwrap();
        b.truncate(200);
        assert!(matches!(IvfFile::parse(&b), Err(e) if e.contains("cut short")));
    }
}
