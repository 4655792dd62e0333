//! Arbitrary bytes into the STUN/ChannelData decoder: it never panics, and what it accepts re-encodes
//! consistently (attributes, MESSAGE-INTEGRITY, FINGERPRINT, XOR addresses, message types).
#![no_main]

use libfuzzer_sys::fuzz_target;
use webcall_turn::core::stream_frame_len;
use webcall_turn::stun::{self, Builder, Msg};

fuzz_target!(|data: &[u8]| {
    // Stream framing: a frame never claims more than what is there.
    if let Ok(Some(n)) = stream_frame_len(data) {
        assert!(n <= data.len() && n >= 4);
    }
    if let Ok(s) = std::str::from_utf8(data) {
        let _ = webcall_turn::auth::parse_rest_username(s);
    }
    let Ok(m) = Msg::parse(data) else { return };
    let typ = m.typ;
    assert_eq!(stun::msg_type(m.method(), m.class()), typ, "type bits round-trip");
    let txid = *m.txid();
    let key = b"fuzz-key";
    let _ = m.check_integrity(key);
    let _ = m.fingerprint_ok();
    let _ = m.get(stun::USERNAME);

    // Re-encode every attribute verbatim: same attributes, and the same bytes up to padding (the
    // builder pads with zeros, the input may not).
    let attrs: Vec<(u16, &[u8], usize)> = m.attrs().collect();
    let mut b = Builder::new(typ, &txid);
    let mut zero_padded = data.to_vec();
    for (t, v, off) in &attrs {
        b.attr(*t, v);
        let end = off + 4 + v.len();
        zero_padded[end..off + 4 + stun::pad4(v.len())].fill(0);
    }
    let again = b.finish();
    assert_eq!(again, zero_padded, "verbatim re-encoding");
    let m2 = Msg::parse(&again).expect("re-encoded message parses");
    assert!(m2.attrs().map(|(t, v, _)| (t, v)).eq(attrs.iter().map(|(t, v, _)| (*t, *v))));

    // XOR addresses decode and encode back to the same value (the first byte is reserved).
    for (t, v, _) in &attrs {
        if let Some(a) = stun::decode_xor_addr(v, &txid) {
            let mut out = [0u8; 20];
            let n = stun::encode_xor_addr(&mut out, a, &txid);
            assert_eq!(&out[1..n], &v[1..], "XOR address of attribute {t:#x}");
        }
    }

    // Signed and fingerprinted again, the covered attributes verify.
    let covered: Vec<_> = attrs
        .iter()
        .take_while(|(t, _, _)| {
            *t != stun::MESSAGE_INTEGRITY && *t != stun::MESSAGE_INTEGRITY_SHA256 && *t != stun::FINGERPRINT
        })
        .collect();
    if 20 + covered.iter().map(|(_, v, _)| 4 + stun::pad4(v.len())).sum::<usize>() + 32 > u16::MAX as usize {
        return;
    }
    let mut b = Builder::new(typ, &txid);
    for (t, v, _) in &covered {
        b.attr(*t, v);
    }
    let signed = b.integrity(key).fingerprint().finish();
    let m3 = Msg::parse(&signed).expect("signed message parses");
    assert_eq!(m3.check_integrity(key), Some(true));
    assert!(m3.fingerprint_ok());
    for (t, v, _) in &covered {
        if covered.iter().find(|(u, _, _)| u == t).map(|(_, w, _)| w) == Some(v) {
            assert_eq!(m3.get(*t), Some(*v), "first {t:#x} before MESSAGE-INTEGRITY");
        }
    }
});
