//! TURN over TCP/TLS byte streams split into frames (RFC 8656 §12.5), without I/O.

use crate::stun;

/// A stream carried something other than STUN or ChannelData.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NotTurn;

/// Length of the next complete frame in a TCP/TLS byte stream: a STUN message (20 + length) or a
/// ChannelData message padded to 4 bytes. `Ok(None)` means more bytes are needed; `Err` means the
/// stream is not TURN and should be closed.
pub fn stream_frame_len(buf: &[u8]) -> Result<Option<usize>, NotTurn> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let len = u16::from_be_bytes([buf[2], buf[3]]) as usize;
    let n = match buf[0] >> 6 {
        0b00 => stun::HEADER_LEN + len,
        0b01 => 4 + stun::pad4(len),
        _ => return Err(NotTurn),
    };
    Ok((buf.len() >= n).then_some(n))
}

/// The read side of one TCP/TLS connection: bytes in ([`StreamFramer::read_buf`], then read into it),
/// complete frames out ([`StreamFramer::next_frame`]). It holds at most one incomplete frame (a STUN message
/// is at most 20 + 65,535 bytes) plus what the last read added, and allocates nothing up front.
#[derive(Debug, Default)]
pub struct StreamFramer {
    buf: Vec<u8>,
    start: usize,
}

impl StreamFramer {
    pub fn new() -> StreamFramer {
        StreamFramer::default()
    }

    /// The next complete frame, if one is buffered. After `Err` the stream is not TURN: close it.
    pub fn next_frame(&mut self) -> Result<Option<&[u8]>, NotTurn> {
        match stream_frame_len(&self.buf[self.start..])? {
            Some(n) => {
                let f = &self.buf[self.start..self.start + n];
                self.start += n;
                Ok(Some(f))
            }
            None => Ok(None),
        }
    }

    /// The buffer to append the next read to (`AsyncReadExt::read_buf`), with consumed frames dropped and
    /// room for at least 4 KiB more.
    pub fn read_buf(&mut self) -> &mut Vec<u8> {
        if self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
        } else if self.start >= 16 << 10 {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        self.buf.reserve(4096);
        &mut self.buf
    }

    /// Bytes held that are not yet returned as frames.
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.start
    }
}
