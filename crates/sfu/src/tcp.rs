//! RFC 4571 framing for ICE-TCP (RFC 6544): every packet on the stream is preceded by its length in two bytes,
//! big-endian. Pure and bounded, so the adapter and the fuzzer share it.

/// Longest frame RFC 4571 can carry.
pub const MAX_FRAME: usize = u16::MAX as usize;

/// Reassembles frames from stream reads. Holds at most one partial frame (≤ 2 + 65535 bytes).
#[derive(Debug, Default)]
pub struct Deframer {
    buf: Vec<u8>,
}

impl Deframer {
    pub fn new() -> Self {
        Deframer::default()
    }

    /// Feeds `data` (one read); calls `frame` for each complete frame, in order. Empty frames are skipped.
    pub fn push(&mut self, mut data: &[u8], mut frame: impl FnMut(&[u8])) {
        // Complete frames straight from the read when nothing is pending: no copy.
        if self.buf.is_empty() {
            while data.len() >= 2 {
                let len = u16::from_be_bytes([data[0], data[1]]) as usize;
                if data.len() < 2 + len {
                    break;
                }
                if len > 0 {
                    frame(&data[2..2 + len]);
                }
                data = &data[2 + len..];
            }
            self.buf.extend_from_slice(data);
            return;
        }
        self.buf.extend_from_slice(data);
        let mut at = 0;
        while self.buf.len() - at >= 2 {
            let len = u16::from_be_bytes([self.buf[at], self.buf[at + 1]]) as usize;
            if self.buf.len() - at < 2 + len {
                break;
            }
            if len > 0 {
                frame(&self.buf[at + 2..at + 2 + len]);
            }
            at += 2 + len;
        }
        self.buf.drain(..at);
    }

    /// Bytes of a partial frame waiting for the rest.
    pub fn pending(&self) -> usize {
        self.buf.len()
    }
}

/// Appends `data` as one frame to `out`; `false` (nothing appended) if it is too long for RFC 4571.
pub fn frame_into(out: &mut Vec<u8>, data: &[u8]) -> bool {
    let Ok(len) = u16::try_from(data.len()) else { return false };
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(data);
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_survive_any_split() {
        let mut stream = Vec::new();
        let frames: Vec<Vec<u8>> = (0..20u8).map(|i| vec![i; i as usize * 37]).collect();
        for f in &frames {
            assert!(frame_into(&mut stream, f));
        }
        for step in [1, 2, 3, 7, 100, 5000] {
            let mut d = Deframer::new();
            let mut got = Vec::new();
            for chunk in stream.chunks(step) {
                d.push(chunk, |f| got.push(f.to_vec()));
            }
            let want: Vec<Vec<u8>> = frames.iter().filter(|f| !f.is_empty()).cloned().collect();
            assert_eq!(got, want, "step {step}");
            assert_eq!(d.pending(), 0);
        }
    }

    #[test]
    fn too_long_is_refused() {
        let mut out = Vec::new();
        assert!(!frame_into(&mut out, &vec![0; MAX_FRAME + 1]));
        assert!(out.is_empty());
        assert!(frame_into(&mut out, &vec![0; MAX_FRAME]));
    }
}
