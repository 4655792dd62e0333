//! The recorder and muxer on real encoded media, checked by a real decoder: Debian's ffmpeg encodes a test pattern
//! (VP8 in IVF, H.264 in Annex B as WHIP publishers such as OBS send it), the recorder writes it as str0m would hand
//! it over (with a loss in the middle), and ffprobe/ffmpeg read the file back.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use str0m::format::{Codec, CodecExtra, CodecSpec, FormatParams, H264CodecExtra, PayloadParams, Vp8CodecExtra};
use str0m::media::{Frequency, MediaData, MediaKind, MediaTime, Mid, Pt};
use str0m::rtp::{ExtensionValues, SeqNo};
use webcall_sfu::record::{RecordOp, Recorder, Want};

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("webcall-sfu-record-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d.join(name)
}

fn ffmpeg(args: &[&str]) {
    let out = Command::new("ffmpeg")
        .args(["-v", "error", "-y"])
        .args(args)
        .output()
        .expect("ffmpeg runs (apt-get install ffmpeg)");
    assert!(out.status.success(), "ffmpeg {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// VP8 frames of an IVF file: (keyframe, bytes).
fn ivf_frames(b: &[u8]) -> Vec<(bool, Vec<u8>)> {
    let mut o = u16::from_le_bytes([b[6], b[7]]) as usize;
    let mut out = Vec::new();
    while o + 12 <= b.len() {
        let n = u32::from_le_bytes(b[o..o + 4].try_into().unwrap()) as usize;
        let f = b[o + 12..o + 12 + n].to_vec();
        out.push((f[0] & 1 == 0, f));
        o += 12 + n;
    }
    out
}

/// H.264 access units of an Annex B stream with access unit delimiters: (keyframe, bytes).
fn annexb_units(b: &[u8]) -> Vec<(bool, Vec<u8>)> {
    let mut starts = Vec::new();
    for i in 0..b.len().saturating_sub(4) {
        // 00 00 00 01 09: an access unit delimiter starts every access unit.
        if b[i..i + 4] == [0, 0, 0, 1] && b[i + 4] & 0x1f == 9 {
            starts.push(i);
        }
    }
    starts.push(b.len());
    starts
        .windows(2)
        .map(|w| {
            let au = b[w[0]..w[1]].to_vec();
            let idr = webcall_sfu::mux::annexb_nals(&au).iter().any(|n| n.first().is_some_and(|x| x & 0x1f == 5));
            (idr, au)
        })
        .collect()
}

fn media(codec: Codec, i: usize, key: bool, contiguous: bool, data: &[u8], t0: Instant) -> MediaData {
    let (clock, extra) = match codec {
        Codec::H264 => (Frequency::NINETY_KHZ, CodecExtra::H264(H264CodecExtra { is_keyframe: key })),
        _ => (
            Frequency::NINETY_KHZ,
            CodecExtra::Vp8(Vp8CodecExtra {
                discardable: false,
                sync: false,
                layer_index: 0,
                picture_id: None,
                tl0_picture_id: None,
                is_keyframe: key,
            }),
        ),
    };
    let spec = CodecSpec { codec, clock_rate: clock, channels: None, format: FormatParams::default() };
    MediaData {
        mid: Mid::from("1"),
        pt: Pt::from(96),
        rid: None,
        params: PayloadParams::new(Pt::from(96), None, spec),
        // A random RTP start, as publishers have.
        time: MediaTime::new(1_234_567 + i as u64 * 3000, clock),
        network_time: t0 + Duration::from_millis(i as u64 * 33),
        seq_range: SeqNo::default()..=SeqNo::default(),
        contiguous,
        data: Arc::from(data),
        ext_vals: ExtensionValues::default(),
        codec_extra: extra,
        last_sender_info: None,
        audio_start_of_talk_spurt: false,
    }
}

/// Records `frames` (30 fps) with a loss before frame `lost`; writes the file; returns its path and the frames
/// written.
fn record(codec: Codec, frames: &[(bool, Vec<u8>)], lost: usize, path: &Path) -> usize {
    let t0 = Instant::now();
    let mut rec = Recorder::new(1);
    let (room, who): (Arc<str>, Arc<str>) = ("r".into(), "p".into());
    let mut ops = Vec::new();
    let mut asked = 0;
    for (i, (key, data)) in frames.iter().enumerate() {
        let d = media(codec, i, *key, i != lost, data, t0);
        let want = rec.frame(&d, MediaKind::Video, None, true, &room, &who, &mut ops);
        if want != Want::Nothing {
            asked += 1;
        }
    }
    assert!(asked > 0, "a keyframe was asked for after the loss");
    ops.extend(rec.finish());
    let mut file = Vec::new();
    let mut written = 0;
    for op in ops {
        match op {
            RecordOp::Open { extension, .. } => assert_eq!(extension, path.extension().unwrap()),
            RecordOp::Append { bytes, .. } => file.extend(bytes),
            RecordOp::Close { tail, patches, frames, .. } => {
                file.extend(tail);
                for (at, b) in patches {
                    file[at as usize..at as usize + b.len()].copy_from_slice(&b);
                }
                written = frames as usize;
            }
        }
    }
    std::fs::write(path, file).unwrap();
    written
}

/// (codec, frames decoded, duration s, width) by ffprobe; and `ffmpeg -v error` decodes it without a word.
fn check(path: &Path) -> (String, u64, f64, u64) {
    let out = Command::new("ffprobe")
        .args(["-v", "error", "-count_frames", "-show_entries", "stream=codec_name,nb_read_frames,width"])
        .args(["-show_entries", "format=duration", "-of", "json"])
        .arg(path)
        .output()
        .unwrap();
    assert!(out.status.success() && out.stderr.is_empty(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let s = &v["streams"][0];
    let dec = Command::new("ffmpeg").args(["-v", "error", "-i"]).arg(path).args(["-f", "null", "-"]).output().unwrap();
    assert!(dec.status.success() && dec.stderr.is_empty(), "{}", String::from_utf8_lossy(&dec.stderr));
    (
        s["codec_name"].as_str().unwrap().to_owned(),
        s["nb_read_frames"].as_str().unwrap().parse().unwrap(),
        v["format"]["duration"].as_str().unwrap().parse().unwrap(),
        s["width"].as_u64().unwrap(),
    )
}

#[test]
fn vp8_with_a_loss_is_written_from_keyframe_to_keyframe_and_decodes_cleanly() {
    let ivf = tmp("in.ivf");
    let src = ["-f", "lavfi", "-i", "testsrc=size=320x240:rate=30", "-t", "4", "-c:v", "libvpx", "-g", "30"];
    ffmpeg(&[&src[..], &["-b:v", "300k", ivf.to_str().unwrap()]].concat());
    let frames = ivf_frames(&std::fs::read(&ivf).unwrap());
    assert_eq!(frames.len(), 120);
    let out = tmp("out.webm");
    // Lost before frame 40: 40..60 are skipped (the next keyframe is 60).
    let written = record(Codec::Vp8, &frames, 40, &out);
    assert_eq!(written, 100);
    let (codec, decoded, duration, width) = check(&out);
    assert_eq!((codec.as_str(), decoded, width), ("vp8", 100, 320));
    assert!((duration - 4.0).abs() < 0.1, "{duration} s: time runs on across the gap");
}

#[test]
fn h264_from_annex_b_goes_into_matroska_and_decodes_cleanly() {
    let raw = tmp("in.h264");
    let src = ["-f", "lavfi", "-i", "testsrc=size=320x240:rate=30", "-t", "4", "-c:v", "libx264", "-g", "30"];
    let opts = ["-bf", "0", "-x264-params", "repeat-headers=1", "-bsf:v", "h264_metadata=aud=insert", "-f", "h264"];
    ffmpeg(&[&src[..], &opts[..], &[raw.to_str().unwrap()]].concat());
    let units = annexb_units(&std::fs::read(&raw).unwrap());
    assert_eq!(units.len(), 120);
    assert!(units[0].0 && units[30].0 && !units[1].0);
    let out = tmp("out.mkv");
    let written = record(Codec::H264, &units, 40, &out);
    assert_eq!(written, 100);
    let (codec, decoded, duration, width) = check(&out);
    assert_eq!((codec.as_str(), decoded, width), ("h264", 100, 320));
    assert!((duration - 4.0).abs() < 0.1, "{duration} s");
}
