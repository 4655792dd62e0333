//! Server-side WebSocket framing (RFC 6455), without I/O: [`Decoder::decode`] parses the client's frames in place
//! in a buffer the caller filled, [`encode`] writes the server's frames.
//!
//! Why not tungstenite on the server: it keeps a read buffer and a write buffer per connection for the
//! connection's life (its write buffer stays at its largest frame), copies every message into a fresh allocation,
//! and writes one frame per system call. Here a complete frame is unmasked and handed out where it lies (in the
//! caller's per-thread read buffer), nothing is kept between frames but an unfinished fragmented message, and the
//! caller can put any number of frames into one write. Clients and tests still use tungstenite.
//!
//! No extensions are negotiated (no permessage-deflate), so every RSV bit must be zero.

/// Frame opcodes.
pub mod opcode {
    pub const CONTINUATION: u8 = 0x0;
    pub const TEXT: u8 = 0x1;
    pub const BINARY: u8 = 0x2;
    pub const CLOSE: u8 = 0x8;
    pub const PING: u8 = 0x9;
    pub const PONG: u8 = 0xA;
}

/// Close codes this layer sends for what it finds wrong (RFC 6455 §7.4.1).
pub mod close_code {
    pub const NORMAL: u16 = 1000;
    pub const PROTOCOL_ERROR: u16 = 1002;
    pub const INVALID_DATA: u16 = 1007;
    pub const TOO_BIG: u16 = 1009;
}

/// A complete message or control frame from the client.
#[derive(Debug, PartialEq, Eq)]
pub enum Event<'a> {
    Text(&'a str),
    /// A binary message (signaling is text; only its size matters to the caller).
    Binary(usize),
    Ping(&'a [u8]),
    Pong,
    /// The client's close frame: its status code and reason, if it sent one.
    Close(Option<(u16, &'a str)>),
}

/// What the client did wrong; the connection must be closed with [`Violation::close_code`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Violation {
    /// A frame that breaks RFC 6455 (unmasked, reserved bits or opcode, bad fragmentation, oversized control frame).
    Protocol(&'static str),
    /// A text message or close reason that is not UTF-8.
    InvalidUtf8,
    /// A message over the size limit (refused from its header, before it is buffered).
    TooBig,
}

impl core::fmt::Display for Violation {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Violation::Protocol(what) => write!(f, "WebSocket protocol error: {what}"),
            Violation::InvalidUtf8 => f.write_str("text that is not UTF-8"),
            Violation::TooBig => f.write_str("message too large"),
        }
    }
}

impl std::error::Error for Violation {}

impl Violation {
    pub fn close_code(&self) -> u16 {
        match self {
            Violation::Protocol(_) => close_code::PROTOCOL_ERROR,
            Violation::InvalidUtf8 => close_code::INVALID_DATA,
            Violation::TooBig => close_code::TOO_BIG,
        }
    }
    /// A short reason for the close frame.
    pub fn reason(&self) -> &'static str {
        match self {
            Violation::Protocol(what) => what,
            Violation::InvalidUtf8 => "invalid UTF-8",
            Violation::TooBig => "message too large",
        }
    }
}

/// How far [`Decoder::decode`] got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decoded {
    /// Bytes of whole frames taken from the front of the buffer; the rest is the start of an unfinished frame.
    pub consumed: usize,
    /// The unfinished frame's size as far as known (at least its header's): keep reading until this much is there.
    pub need: usize,
    /// The handler asked to stop (e.g. after a close frame); nothing after that frame was looked at.
    pub stopped: bool,
}

/// A message sent in fragments, collected until its last one.
#[derive(Debug)]
struct Fragmented {
    text: bool,
    data: Vec<u8>,
}

/// The decoding state of one connection: only an unfinished fragmented message (rare: browsers send small
/// messages whole), so an idle connection's decoder holds no memory.
#[derive(Debug)]
pub struct Decoder {
    max_message: usize,
    fragmented: Option<Box<Fragmented>>,
}

impl Decoder {
    /// `max_message`: the largest message (all its fragments together) accepted; larger ones are a [`Violation::TooBig`].
    pub fn new(max_message: usize) -> Self {
        Decoder { max_message, fragmented: None }
    }

    /// Decodes the whole frames at the front of `buf` (unmasking them in place) and passes each complete message
    /// or control frame to `on`, which returns `false` to stop. A violation ends decoding: the caller closes.
    pub fn decode(&mut self, buf: &mut [u8], on: &mut dyn FnMut(Event<'_>) -> bool) -> Result<Decoded, Violation> {
        let mut at = 0;
        loop {
            let rest = &mut buf[at..];
            let header = match parse_header(rest)? {
                Parsed::Need(need) => return Ok(Decoded { consumed: at, need, stopped: false }),
                Parsed::Header(h) => h,
            };
            let is_control = header.opcode & 0x8 != 0;
            if !is_control {
                let so_far = self.fragmented.as_ref().map_or(0, |f| f.data.len() as u64);
                if header.len.saturating_add(so_far) > self.max_message as u64 {
                    return Err(Violation::TooBig);
                }
            }
            // Below the limit (or a control frame of at most 125 bytes), so it fits in usize.
            let total = header.size + header.len as usize;
            if rest.len() < total {
                return Ok(Decoded { consumed: at, need: total, stopped: false });
            }
            let payload = &mut rest[header.size..total];
            unmask(payload, header.mask);
            at += total;
            let go = match header.opcode {
                opcode::TEXT | opcode::BINARY => {
                    if self.fragmented.is_some() {
                        return Err(Violation::Protocol("new message before the last one's final fragment"));
                    }
                    let text = header.opcode == opcode::TEXT;
                    if header.fin {
                        emit(text, payload, on)?
                    } else {
                        self.fragmented = Some(Box::new(Fragmented { text, data: payload.to_vec() }));
                        true
                    }
                }
                opcode::CONTINUATION => {
                    let Some(f) = self.fragmented.as_mut() else {
                        return Err(Violation::Protocol("continuation frame without a message to continue"));
                    };
                    f.data.extend_from_slice(payload);
                    if header.fin {
                        let mut f = self.fragmented.take().expect("checked above");
                        emit(f.text, &mut f.data, on)?
                    } else {
                        true
                    }
                }
                opcode::PING => on(Event::Ping(payload)),
                opcode::PONG => on(Event::Pong),
                opcode::CLOSE => on(Event::Close(parse_close(payload)?)),
                _ => unreachable!("parse_header refuses reserved opcodes"),
            };
            if !go {
                return Ok(Decoded { consumed: at, need: 0, stopped: true });
            }
        }
    }
}

fn emit(text: bool, payload: &mut [u8], on: &mut dyn FnMut(Event<'_>) -> bool) -> Result<bool, Violation> {
    if text {
        let s = std::str::from_utf8(payload).map_err(|_| Violation::InvalidUtf8)?;
        Ok(on(Event::Text(s)))
    } else {
        Ok(on(Event::Binary(payload.len())))
    }
}

fn parse_close(payload: &[u8]) -> Result<Option<(u16, &str)>, Violation> {
    match payload {
        [] => Ok(None),
        [_] => Err(Violation::Protocol("close frame with a one-byte payload")),
        [a, b, reason @ ..] => {
            let code = u16::from_be_bytes([*a, *b]);
            // Codes a peer may send (RFC 6455 §7.4; 1004–1006 and 1015 are never on the wire).
            let valid = matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999);
            if !valid {
                return Err(Violation::Protocol("close frame with an invalid status code"));
            }
            let reason = std::str::from_utf8(reason).map_err(|_| Violation::InvalidUtf8)?;
            Ok(Some((code, reason)))
        }
    }
}

struct Header {
    fin: bool,
    opcode: u8,
    mask: [u8; 4],
    /// Header bytes, mask included.
    size: usize,
    /// Payload bytes.
    len: u64,
}

enum Parsed {
    Need(usize),
    Header(Header),
}

fn parse_header(buf: &[u8]) -> Result<Parsed, Violation> {
    let [b0, b1, ..] = *buf else { return Ok(Parsed::Need(2)) };
    if b0 & 0x70 != 0 {
        return Err(Violation::Protocol("reserved bits set (no extension was negotiated)"));
    }
    let fin = b0 & 0x80 != 0;
    let opcode = b0 & 0x0F;
    match opcode {
        opcode::CONTINUATION | opcode::TEXT | opcode::BINARY => {}
        opcode::CLOSE | opcode::PING | opcode::PONG => {
            if !fin {
                return Err(Violation::Protocol("fragmented control frame"));
            }
        }
        _ => return Err(Violation::Protocol("reserved opcode")),
    }
    if b1 & 0x80 == 0 {
        return Err(Violation::Protocol("unmasked frame from a client"));
    }
    let (len_size, short) = match b1 & 0x7F {
        126 => (2, None),
        127 => (8, None),
        n => (0, Some(n as u64)),
    };
    if opcode & 0x8 != 0 && short.is_none_or(|n| n > 125) {
        return Err(Violation::Protocol("control frame over 125 bytes"));
    }
    let size = 2 + len_size + 4;
    if buf.len() < size {
        return Ok(Parsed::Need(size));
    }
    let len = match (short, len_size) {
        (Some(n), _) => n,
        (None, 2) => u16::from_be_bytes([buf[2], buf[3]]) as u64,
        _ => {
            let n = u64::from_be_bytes(buf[2..10].try_into().expect("8 bytes"));
            if n >> 63 != 0 {
                return Err(Violation::Protocol("payload length with its most significant bit set"));
            }
            n
        }
    };
    let mask = buf[size - 4..size].try_into().expect("4 bytes");
    Ok(Parsed::Header(Header { fin, opcode, mask, size, len }))
}

/// XORs the client's mask over the payload, eight bytes at a time.
fn unmask(payload: &mut [u8], mask: [u8; 4]) {
    let wide = u64::from_ne_bytes([mask[0], mask[1], mask[2], mask[3], mask[0], mask[1], mask[2], mask[3]]);
    let mut chunks = payload.chunks_exact_mut(8);
    for c in &mut chunks {
        let v = u64::from_ne_bytes((&*c).try_into().expect("8 bytes")) ^ wide;
        c.copy_from_slice(&v.to_ne_bytes());
    }
    // Whole chunks are a multiple of 4 bytes long, so the tail starts at mask[0].
    for (i, b) in chunks.into_remainder().iter_mut().enumerate() {
        *b ^= mask[i & 3];
    }
}

/// The most bytes a server frame's header takes.
pub const MAX_HEADER: usize = 10;

/// The header of one unmasked, unfragmented server frame with a payload of `len` bytes: the buffer and how many of
/// its bytes are the header.
pub fn header(opcode: u8, len: usize) -> ([u8; MAX_HEADER], usize) {
    let mut h = [0u8; MAX_HEADER];
    h[0] = 0x80 | opcode;
    match len {
        n @ 0..=125 => {
            h[1] = n as u8;
            (h, 2)
        }
        n @ 126..=0xFFFF => {
            h[1] = 126;
            h[2..4].copy_from_slice(&(n as u16).to_be_bytes());
            (h, 4)
        }
        n => {
            h[1] = 127;
            h[2..10].copy_from_slice(&(n as u64).to_be_bytes());
            (h, 10)
        }
    }
}

/// Appends one unmasked, unfragmented server frame.
pub fn encode(out: &mut Vec<u8>, opcode: u8, payload: &[u8]) {
    let (h, n) = header(opcode, payload.len());
    out.reserve(n + payload.len());
    out.extend_from_slice(&h[..n]);
    out.extend_from_slice(payload);
}

/// Appends a close frame with `code` and `reason` (cut to fit the 125-byte control payload, on a char boundary).
pub fn encode_close(out: &mut Vec<u8>, code: u16, reason: &str) {
    let mut end = reason.len().min(123);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    let mut payload = [0u8; 125];
    payload[..2].copy_from_slice(&code.to_be_bytes());
    payload[2..2 + end].copy_from_slice(&reason.as_bytes()[..end]);
    encode(out, opcode::CLOSE, &payload[..2 + end]);
}

#[cfg(test)]
mod tests;
