//! libvpx's VP8 encoder and decoder (cargo feature `libvpx`): live encoding for `--send live`, and a decoder that
//! tests can use to judge recordings. Needs the system's libvpx (pkg-config and libvpx-dev to build).

use std::mem::MaybeUninit;
use std::os::raw::{c_int, c_ulong};
use std::ptr;

use vpx_sys as vpx;

use crate::PeerError;

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::media::{draw_testsrc, vp8_is_keyframe, vp8_keyframe_size, IvfFile, IvfWriter};

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
