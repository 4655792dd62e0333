//! The subset of the STUN wire format (RFC 8489) that TURN (RFC 8656) needs.
//!
//! Written by hand rather than taken from `stun-codec`/`stun-types`: the relay hot path must parse a
//! Send indication and write a Data indication *in place* (header written into headroom in front of the
//! payload the relay socket received), with no allocation and no attribute decoding beyond the two it
//! needs. The crates decode whole messages into owned or generic attribute lists, which costs on every
//! packet; the control plane (requests) is small enough that a second codec would buy nothing.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use hmac::{Hmac, Mac};
use sha1::Sha1;
use sha2::Sha256;

pub const MAGIC: u32 = 0x2112_A442;
pub const HEADER_LEN: usize = 20;

// Methods.
pub const BINDING: u16 = 0x001;
pub const ALLOCATE: u16 = 0x003;
pub const REFRESH: u16 = 0x004;
pub const SEND: u16 = 0x006;
pub const DATA: u16 = 0x007;
pub const CREATE_PERMISSION: u16 = 0x008;
pub const CHANNEL_BIND: u16 = 0x009;

// Classes.
pub const REQUEST: u16 = 0x000;
pub const INDICATION: u16 = 0x010;
pub const SUCCESS: u16 = 0x100;
pub const ERROR: u16 = 0x110;

// Attributes.
pub const MAPPED_ADDRESS: u16 = 0x0001;
pub const USERNAME: u16 = 0x0006;
pub const MESSAGE_INTEGRITY: u16 = 0x0008;
pub const ERROR_CODE: u16 = 0x0009;
pub const UNKNOWN_ATTRIBUTES: u16 = 0x000A;
pub const CHANNEL_NUMBER: u16 = 0x000C;
pub const LIFETIME: u16 = 0x000D;
pub const XOR_PEER_ADDRESS: u16 = 0x0012;
pub const DATA_ATTR: u16 = 0x0013;
pub const REALM: u16 = 0x0014;
pub const NONCE: u16 = 0x0015;
pub const XOR_RELAYED_ADDRESS: u16 = 0x0016;
pub const REQUESTED_ADDRESS_FAMILY: u16 = 0x0017;
pub const EVEN_PORT: u16 = 0x0018;
pub const REQUESTED_TRANSPORT: u16 = 0x0019;
pub const XOR_MAPPED_ADDRESS: u16 = 0x0020;
pub const RESERVATION_TOKEN: u16 = 0x0022;
pub const DONT_FRAGMENT: u16 = 0x001A;
pub const MESSAGE_INTEGRITY_SHA256: u16 = 0x001C;
pub const PASSWORD_ALGORITHM: u16 = 0x001D;
pub const PASSWORD_ALGORITHMS: u16 = 0x8002;
pub const SOFTWARE: u16 = 0x8022;
pub const FINGERPRINT: u16 = 0x8028;

const FINGERPRINT_XOR: u32 = 0x5354_554e;

/// Message type = method bits interleaved with the two class bits (RFC 8489 §5).
pub fn msg_type(method: u16, class: u16) -> u16 {
    (method & 0x000F) | ((method & 0x0070) << 1) | ((method & 0x0F80) << 2) | class
}

pub fn method_of(typ: u16) -> u16 {
    (typ & 0x000F) | ((typ & 0x00E0) >> 1) | ((typ & 0x3E00) >> 2)
}

pub fn class_of(typ: u16) -> u16 {
    typ & 0x0110
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParseError {
    Short,
    NotStun,
    BadLength,
    BadAttribute,
}

/// A parsed, borrowed STUN message. Attributes are only walked on demand.
#[derive(Clone, Copy)]
pub struct Msg<'a> {
    pub buf: &'a [u8],
    pub typ: u16,
}

impl<'a> Msg<'a> {
    /// Checks the header and that the attributes tile the body exactly; `buf` may be longer (TCP framing
    /// hands exact frames, UDP datagrams are exact too).
    pub fn parse(buf: &'a [u8]) -> Result<Msg<'a>, ParseError> {
        if buf.len() < HEADER_LEN {
            return Err(ParseError::Short);
        }
        let typ = u16::from_be_bytes([buf[0], buf[1]]);
        if typ & 0xC000 != 0 || u32::from_be_bytes([buf[4], buf[5], buf[6], buf[7]]) != MAGIC {
            return Err(ParseError::NotStun);
        }
        let len = u16::from_be_bytes([buf[2], buf[3]]) as usize;
        if len & 3 != 0 || HEADER_LEN + len != buf.len() {
            return Err(ParseError::BadLength);
        }
        let mut off = HEADER_LEN;
        while off < buf.len() {
            if off + 4 > buf.len() {
                return Err(ParseError::BadAttribute);
            }
            let alen = u16::from_be_bytes([buf[off + 2], buf[off + 3]]) as usize;
            off += 4 + pad4(alen);
            if off > buf.len() {
                return Err(ParseError::BadAttribute);
            }
        }
        Ok(Msg { buf, typ })
    }

    pub fn method(&self) -> u16 {
        method_of(self.typ)
    }
    pub fn class(&self) -> u16 {
        class_of(self.typ)
    }
    pub fn txid(&self) -> &'a [u8; 12] {
        self.buf[8..20].try_into().expect("header checked")
    }

    /// (type, value, offset of the attribute header) for each attribute.
    pub fn attrs(&self) -> Attrs<'a> {
        Attrs { buf: self.buf, off: HEADER_LEN }
    }

    /// First attribute of `typ` before MESSAGE-INTEGRITY (later ones are not covered by it and ignored,
    /// RFC 8489 §14.5), FINGERPRINT excepted.
    pub fn get(&self, typ: u16) -> Option<&'a [u8]> {
        for (t, v, _) in self.attrs() {
            if t == typ {
                return Some(v);
            }
            if t == MESSAGE_INTEGRITY || t == MESSAGE_INTEGRITY_SHA256 {
                break;
            }
        }
        None
    }

    pub fn get_xor_addr(&self, typ: u16) -> Option<SocketAddr> {
        self.get(typ).and_then(|v| decode_xor_addr(v, self.txid()))
    }

    /// Verifies MESSAGE-INTEGRITY with `key`. `None` when the attribute is missing.
    pub fn check_integrity(&self, key: &[u8]) -> Option<bool> {
        let off = self.attrs().find(|(t, _, _)| *t == MESSAGE_INTEGRITY).map(|(_, _, o)| o)?;
        let value = &self.buf[off + 4..off + 24.min(self.buf.len() - off)];
        if value.len() != 20 {
            return Some(false);
        }
        let mut mac = <Hmac<Sha1> as Mac>::new_from_slice(key).expect("hmac takes any key");
        mac.update(&self.buf[0..2]);
        mac.update(&((off + 24 - HEADER_LEN) as u16).to_be_bytes());
        mac.update(&self.buf[4..off]);
        Some(mac.verify_slice(value).is_ok())
    }

    /// Verifies MESSAGE-INTEGRITY-SHA256 (RFC 8489 §14.6: HMAC-SHA256, possibly truncated to 16..=32
    /// bytes) with `key`. `None` when the attribute is missing.
    pub fn check_integrity_sha256(&self, key: &[u8]) -> Option<bool> {
        let (_, value, off) = self.attrs().find(|(t, _, _)| *t == MESSAGE_INTEGRITY_SHA256)?;
        if value.len() < 16 || value.len() > 32 || value.len() % 4 != 0 {
            return Some(false);
        }
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(key).expect("hmac takes any key");
        mac.update(&self.buf[0..2]);
        mac.update(&((off + 4 + value.len() - HEADER_LEN) as u16).to_be_bytes());
        mac.update(&self.buf[4..off]);
        Some(mac.verify_truncated_left(value).is_ok())
    }

    /// `false` when a FINGERPRINT is present and wrong.
    pub fn fingerprint_ok(&self) -> bool {
        match self.attrs().find(|(t, _, _)| *t == FINGERPRINT) {
            None => true,
            Some((_, v, off)) => {
                v.len() == 4 && u32::from_be_bytes([v[0], v[1], v[2], v[3]]) == fingerprint(self.buf, off)
            }
        }
    }
}

pub struct Attrs<'a> {
    buf: &'a [u8],
    off: usize,
}

impl<'a> Iterator for Attrs<'a> {
    type Item = (u16, &'a [u8], usize);
    fn next(&mut self) -> Option<Self::Item> {
        let b = self.buf;
        let o = self.off;
        if o + 4 > b.len() {
            return None;
        }
        let t = u16::from_be_bytes([b[o], b[o + 1]]);
        let l = u16::from_be_bytes([b[o + 2], b[o + 3]]) as usize;
        let end = (o + 4 + l).min(b.len());
        self.off = o + 4 + pad4(l);
        Some((t, &b[o + 4..end], o))
    }
}

pub fn pad4(n: usize) -> usize {
    (n + 3) & !3
}

/// CRC-32 of the message up to `off`, with the length field set as if FINGERPRINT ended the message.
fn fingerprint(buf: &[u8], off: usize) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&buf[0..2]);
    h.update(&((off + 8 - HEADER_LEN) as u16).to_be_bytes());
    h.update(&buf[4..off]);
    h.finalize() ^ FINGERPRINT_XOR
}

pub fn decode_xor_addr(v: &[u8], txid: &[u8; 12]) -> Option<SocketAddr> {
    if v.len() < 8 {
        return None;
    }
    let port = u16::from_be_bytes([v[2], v[3]]) ^ (MAGIC >> 16) as u16;
    match v[1] {
        0x01 if v.len() == 8 => {
            let ip = u32::from_be_bytes([v[4], v[5], v[6], v[7]]) ^ MAGIC;
            Some(SocketAddr::new(IpAddr::V4(Ipv4Addr::from(ip)), port))
        }
        0x02 if v.len() == 20 => {
            let mut x = [0u8; 16];
            x[..4].copy_from_slice(&MAGIC.to_be_bytes());
            x[4..].copy_from_slice(txid);
            let mut ip = [0u8; 16];
            for i in 0..16 {
                ip[i] = v[4 + i] ^ x[i];
            }
            Some(SocketAddr::new(IpAddr::V6(Ipv6Addr::from(ip)), port))
        }
        _ => None,
    }
}

/// Writes the value of an XOR-*-ADDRESS attribute; returns its length (8 or 20).
pub fn encode_xor_addr(out: &mut [u8], addr: SocketAddr, txid: &[u8; 12]) -> usize {
    out[0] = 0;
    out[2..4].copy_from_slice(&(addr.port() ^ (MAGIC >> 16) as u16).to_be_bytes());
    match addr.ip() {
        IpAddr::V4(ip) => {
            out[1] = 0x01;
            out[4..8].copy_from_slice(&(u32::from(ip) ^ MAGIC).to_be_bytes());
            8
        }
        IpAddr::V6(ip) => {
            out[1] = 0x02;
            let o = ip.octets();
            let mut x = [0u8; 16];
            x[..4].copy_from_slice(&MAGIC.to_be_bytes());
            x[4..].copy_from_slice(txid);
            for i in 0..16 {
                out[4 + i] = o[i] ^ x[i];
            }
            20
        }
    }
}

/// Builds one message into a `Vec` (control plane only).
pub struct Builder {
    buf: Vec<u8>,
}

impl Builder {
    pub fn new(typ: u16, txid: &[u8; 12]) -> Builder {
        let mut buf = Vec::with_capacity(128);
        buf.extend_from_slice(&typ.to_be_bytes());
        buf.extend_from_slice(&[0, 0]);
        buf.extend_from_slice(&MAGIC.to_be_bytes());
        buf.extend_from_slice(txid);
        Builder { buf }
    }

    pub fn attr(&mut self, typ: u16, value: &[u8]) -> &mut Self {
        self.buf.extend_from_slice(&typ.to_be_bytes());
        self.buf.extend_from_slice(&(value.len() as u16).to_be_bytes());
        self.buf.extend_from_slice(value);
        let padded = pad4(self.buf.len());
        self.buf.resize(padded, 0);
        self.set_len();
        self
    }

    pub fn u32(&mut self, typ: u16, v: u32) -> &mut Self {
        self.attr(typ, &v.to_be_bytes())
    }

    pub fn xor_addr(&mut self, typ: u16, addr: SocketAddr) -> &mut Self {
        let txid: [u8; 12] = self.buf[8..20].try_into().expect("header");
        let mut v = [0u8; 20];
        let n = encode_xor_addr(&mut v, addr, &txid);
        self.attr(typ, &v[..n])
    }

    /// Plain MAPPED-ADDRESS, for RFC 3489 clients.
    pub fn mapped_addr(&mut self, addr: SocketAddr) -> &mut Self {
        let mut v = vec![0u8, 0];
        v.extend_from_slice(&addr.port().to_be_bytes());
        match addr.ip() {
            IpAddr::V4(ip) => {
                v[1] = 1;
                v.extend_from_slice(&ip.octets());
            }
            IpAddr::V6(ip) => {
                v[1] = 2;
                v.extend_from_slice(&ip.octets());
            }
        }
        self.attr(MAPPED_ADDRESS, &v)
    }

    pub fn error(&mut self, code: u16, reason: &str) -> &mut Self {
        let mut v = vec![0u8, 0, (code / 100) as u8, (code % 100) as u8];
        v.extend_from_slice(reason.as_bytes());
        self.attr(ERROR_CODE, &v)
    }

    pub fn integrity(&mut self, key: &[u8]) -> &mut Self {
        let off = self.buf.len();
        self.buf.extend_from_slice(&MESSAGE_INTEGRITY.to_be_bytes());
        self.buf.extend_from_slice(&20u16.to_be_bytes());
        self.buf.extend_from_slice(&[0; 20]);
        self.set_len();
        let mut mac = <Hmac<Sha1> as Mac>::new_from_slice(key).expect("hmac takes any key");
        mac.update(&self.buf[..off]);
        let tag = mac.finalize().into_bytes();
        self.buf[off + 4..off + 24].copy_from_slice(&tag);
        self
    }

    /// MESSAGE-INTEGRITY-SHA256, full length (32 bytes).
    pub fn integrity_sha256(&mut self, key: &[u8]) -> &mut Self {
        let off = self.buf.len();
        self.buf.extend_from_slice(&MESSAGE_INTEGRITY_SHA256.to_be_bytes());
        self.buf.extend_from_slice(&32u16.to_be_bytes());
        self.buf.extend_from_slice(&[0; 32]);
        self.set_len();
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(key).expect("hmac takes any key");
        mac.update(&self.buf[..off]);
        let tag = mac.finalize().into_bytes();
        self.buf[off + 4..off + 36].copy_from_slice(&tag);
        self
    }

    pub fn fingerprint(&mut self) -> &mut Self {
        let off = self.buf.len();
        self.buf.extend_from_slice(&FINGERPRINT.to_be_bytes());
        self.buf.extend_from_slice(&4u16.to_be_bytes());
        self.buf.extend_from_slice(&[0; 4]);
        self.set_len();
        let crc = fingerprint(&self.buf, off);
        self.buf[off + 4..off + 8].copy_from_slice(&crc.to_be_bytes());
        self
    }

    fn set_len(&mut self) {
        let len = (self.buf.len() - HEADER_LEN) as u16;
        self.buf[2..4].copy_from_slice(&len.to_be_bytes());
    }

    pub fn finish(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn type_roundtrip() {
        for m in [BINDING, ALLOCATE, REFRESH, SEND, DATA, CREATE_PERMISSION, CHANNEL_BIND] {
            for c in [REQUEST, INDICATION, SUCCESS, ERROR] {
                let t = msg_type(m, c);
                assert_eq!(method_of(t), m);
                assert_eq!(class_of(t), c);
            }
        }
        assert_eq!(msg_type(BINDING, SUCCESS), 0x0101);
        assert_eq!(msg_type(ALLOCATE, ERROR), 0x0113);
        assert_eq!(msg_type(SEND, INDICATION), 0x0016);
    }

    #[test]
    fn integrity_and_fingerprint_roundtrip() {
        let txid = [7u8; 12];
        let peer: SocketAddr = "[2001:db8::1]:4000".parse().unwrap();
        let msg = Builder::new(msg_type(ALLOCATE, REQUEST), &txid)
            .attr(USERNAME, b"user")
            .xor_addr(XOR_PEER_ADDRESS, peer)
            .integrity(b"key")
            .fingerprint()
            .finish();
        let m = Msg::parse(&msg).unwrap();
        assert_eq!(m.check_integrity(b"key"), Some(true));
        assert_eq!(m.check_integrity(b"other"), Some(false));
        assert!(m.fingerprint_ok());
        assert_eq!(m.get(USERNAME), Some(&b"user"[..]));
        assert_eq!(m.get_xor_addr(XOR_PEER_ADDRESS), Some(peer));
        let mut bad = msg.clone();
        bad[HEADER_LEN + 4] ^= 1;
        let m = Msg::parse(&bad).unwrap();
        assert_eq!(m.check_integrity(b"key"), Some(false));
        assert!(!m.fingerprint_ok());
    }

    fn unhex(h: &str) -> Vec<u8> {
        let h: String = h.split_whitespace().collect();
        (0..h.len()).step_by(2).map(|i| u8::from_str_radix(&h[i..i + 2], 16).unwrap()).collect()
    }

    /// RFC 5769 §2.1 sample request (short-term credential: the key is the password).
    #[test]
    fn rfc5769_sample_request() {
        let bytes = unhex(
            "00010058 2112a442 b7e7a701 bc34d686 fa87dfae 80220010 5354554e 20746573 7420636c 69656e74
             00240004 6e0001ff 80290008 932ff9b1 51263b36 00060009 6576746a 3a683676 59202020
             00080014 9aeaa70c bfd8cb56 781ef2b5 b2d3f249 c1b571a2 80280004 e57a3bcf",
        );
        let m = Msg::parse(&bytes).unwrap();
        assert_eq!(m.method(), BINDING);
        assert_eq!(m.check_integrity(b"VOkJxbRl1RmTxUk/WvJxBt"), Some(true));
        assert!(m.fingerprint_ok());
    }

    /// RFC 5769 §2.4: long-term credential, key = MD5(username:realm:password).
    #[test]
    fn rfc5769_long_term_request() {
        let bytes = unhex(
            "00010060 2112a442 78ad3433 c6ad72c0 29da412e 00060012 e3839ee3 8388e383 aae38383 e382afe3
             82b90000 0015001c 662f2f34 39396b39 35346436 4f4c3334 6f4c3946 53547679 36347341
             0014000b 6578616d 706c652e 6f726700 00080014 f6702465 6dd64a3e 02b8e071 2e85c9a2 8ca89666",
        );
        let m = Msg::parse(&bytes).unwrap();
        let user = std::str::from_utf8(m.get(USERNAME).unwrap()).unwrap();
        let key = crate::auth::long_term_key(user, "example.org", "TheMatrIX");
        assert_eq!(m.check_integrity(&key), Some(true));
        assert_eq!(m.get(NONCE), Some(&b"f//499k954d6OL34oL9FSTvy64sA"[..]));
    }

    #[test]
    fn rejects_garbage() {
        assert_eq!(Msg::parse(&[0; 10]).err(), Some(ParseError::Short));
        let mut b = Builder::new(msg_type(BINDING, REQUEST), &[0; 12]).finish();
        b[4] = 0;
        assert_eq!(Msg::parse(&b).err(), Some(ParseError::NotStun));
        let mut b = Builder::new(msg_type(BINDING, REQUEST), &[0; 12]).attr(USERNAME, b"abcd").finish();
        b[HEADER_LEN + 3] = 200; // attribute longer than the message
        assert_eq!(Msg::parse(&b).err(), Some(ParseError::BadAttribute));
    }
}
