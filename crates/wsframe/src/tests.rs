use super::*;
use tungstenite::protocol::frame::coding::{Data, OpCode};
use tungstenite::protocol::frame::{Frame, FrameHeader};

/// A client frame as tungstenite (the client library our tests and the native peer use) writes it.
fn client_frame(op: OpCode, fin: bool, payload: &[u8], mask: [u8; 4]) -> Vec<u8> {
    let f = Frame::from_payload(
        FrameHeader { is_final: fin, opcode: op, mask: Some(mask), ..FrameHeader::default() },
        payload.to_vec().into(),
    );
    let mut out = Vec::new();
    f.format(&mut out).unwrap();
    out
}

fn text(s: &str) -> Vec<u8> {
    client_frame(OpCode::Data(Data::Text), true, s.as_bytes(), [1, 2, 3, 4])
}

#[derive(Debug, PartialEq)]
enum Got {
    Text(String),
    Binary(usize),
    Ping(Vec<u8>),
    Pong,
    Close(Option<(u16, String)>),
}

fn decode_all(dec: &mut Decoder, buf: &mut [u8]) -> (Result<Decoded, Violation>, Vec<Got>) {
    let mut got = Vec::new();
    let r = dec.decode(buf, &mut |e| {
        let stop = matches!(e, Event::Close(_));
        got.push(match e {
            Event::Text(s) => Got::Text(s.to_string()),
            Event::Binary(n) => Got::Binary(n),
            Event::Ping(p) => Got::Ping(p.to_vec()),
            Event::Pong => Got::Pong,
            Event::Close(c) => Got::Close(c.map(|(c, r)| (c, r.to_string()))),
        });
        !stop
    });
    (r, got)
}

#[test]
fn whole_frames_of_every_length_class_decode_where_they_lie() {
    for len in [0usize, 1, 7, 8, 9, 125, 126, 1000, 65535, 65536, 70000] {
        let msg: String = (0..len).map(|i| (b'a' + (i % 26) as u8) as char).collect();
        let mut buf = text(&msg);
        buf.extend(client_frame(OpCode::Data(Data::Binary), true, &vec![7; len], [9, 8, 7, 6]));
        let total = buf.len();
        let (r, got) = decode_all(&mut Decoder::new(1 << 20), &mut buf);
        assert_eq!(r, Ok(Decoded { consumed: total, need: 2, stopped: false }), "len {len}");
        assert_eq!(got, vec![Got::Text(msg), Got::Binary(len)], "len {len}");
    }
}

#[test]
fn an_unfinished_frame_is_left_with_how_much_it_needs() {
    let msg = "x".repeat(300);
    let whole = text(&msg);
    let header = 2 + 2 + 4;
    for cut in 0..whole.len() {
        let mut buf = whole[..cut].to_vec();
        let (r, got) = decode_all(&mut Decoder::new(4096), &mut buf);
        let need = if cut < 2 {
            2
        } else if cut < header {
            header
        } else {
            whole.len()
        };
        assert_eq!(r, Ok(Decoded { consumed: 0, need, stopped: false }), "cut at {cut}");
        assert!(got.is_empty());
        assert_eq!(buf, whole[..cut], "an unfinished frame is not touched");
    }
}

#[test]
fn fragments_are_joined_and_control_frames_may_come_between_them() {
    let mut buf = client_frame(OpCode::Data(Data::Text), false, "héllo ".as_bytes(), [5, 6, 7, 8]);
    buf.extend(client_frame(
        OpCode::Control(tungstenite::protocol::frame::coding::Control::Ping),
        true,
        b"p",
        [1, 1, 1, 1],
    ));
    // The two bytes of "é" split across fragments are still valid once joined.
    let e = "é".as_bytes();
    buf.extend(client_frame(OpCode::Data(Data::Continue), false, &[b'w', e[0]], [2, 2, 2, 2]));
    buf.extend(client_frame(OpCode::Data(Data::Continue), true, &[e[1], b'!'], [3, 3, 3, 3]));
    let (r, got) = decode_all(&mut Decoder::new(100), &mut buf);
    assert!(r.is_ok());
    assert_eq!(got, vec![Got::Ping(b"p".to_vec()), Got::Text("héllo wé!".into())]);
}

#[test]
fn a_handler_that_stops_leaves_the_rest() {
    let mut buf = text("one");
    buf.extend(client_frame(
        OpCode::Control(tungstenite::protocol::frame::coding::Control::Close),
        true,
        &[0x03, 0xE8, b'b', b'y', b'e'],
        [4, 3, 2, 1],
    ));
    let upto = buf.len();
    buf.extend(text("after the close"));
    let (r, got) = decode_all(&mut Decoder::new(100), &mut buf);
    assert_eq!(r, Ok(Decoded { consumed: upto, need: 0, stopped: true }));
    assert_eq!(got, vec![Got::Text("one".into()), Got::Close(Some((1000, "bye".into())))]);
}

#[test]
fn close_frames_are_checked() {
    use tungstenite::protocol::frame::coding::Control;
    let close = |p: &[u8]| client_frame(OpCode::Control(Control::Close), true, p, [0, 0, 0, 0]);
    assert_eq!(decode_all(&mut Decoder::new(10), &mut close(&[])).1, vec![Got::Close(None)]);
    assert_eq!(
        decode_all(&mut Decoder::new(10), &mut close(&[0x0F, 0xA0])).1,
        vec![Got::Close(Some((4000, "".into())))]
    );
    assert_eq!(
        decode_all(&mut Decoder::new(10), &mut close(&[3])).0,
        Err(Violation::Protocol("close frame with a one-byte payload"))
    );
    for bad in [999u16, 1004, 1005, 1006, 1015, 2000, 5000] {
        let r = decode_all(&mut Decoder::new(10), &mut close(&bad.to_be_bytes())).0;
        assert_eq!(r.unwrap_err().close_code(), close_code::PROTOCOL_ERROR, "code {bad}");
    }
    let r = decode_all(&mut Decoder::new(10), &mut close(&[0x03, 0xE8, 0xFF])).0;
    assert_eq!(r, Err(Violation::InvalidUtf8));
}

#[test]
fn frames_that_break_the_protocol_are_refused() {
    let proto = |buf: &mut Vec<u8>| {
        let r = decode_all(&mut Decoder::new(1 << 16), buf).0;
        assert_eq!(r.map_err(|v| v.close_code()), Err(close_code::PROTOCOL_ERROR), "{buf:02x?}");
    };
    // Unmasked.
    proto(&mut vec![0x81, 0x01, b'a']);
    // RSV1 (would be permessage-deflate, not negotiated).
    proto(&mut vec![0xC1, 0x81, 0, 0, 0, 0, b'a']);
    // Reserved opcodes.
    proto(&mut vec![0x83, 0x80, 0, 0, 0, 0]);
    proto(&mut vec![0x8B, 0x80, 0, 0, 0, 0]);
    // Fragmented ping; ping over 125 bytes (checked from the header alone).
    proto(&mut vec![0x09, 0x80, 0, 0, 0, 0]);
    proto(&mut vec![0x89, 0xFE]);
    // Continuation with nothing to continue; a new message inside a fragmented one.
    proto(&mut vec![0x80, 0x80, 0, 0, 0, 0]);
    let mut buf = client_frame(OpCode::Data(Data::Text), false, b"a", [0; 4]);
    buf.extend(text("b"));
    proto(&mut buf);
    // A 64-bit length with its top bit set.
    proto(&mut vec![0x82, 0xFF, 0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
}

#[test]
fn text_that_is_not_utf8_is_refused() {
    let mut buf = client_frame(OpCode::Data(Data::Text), true, &[b'a', 0xC3], [1, 2, 3, 4]);
    assert_eq!(decode_all(&mut Decoder::new(100), &mut buf).0, Err(Violation::InvalidUtf8));
}

#[test]
fn messages_over_the_limit_are_refused_from_the_header_alone() {
    let whole = text(&"x".repeat(101));
    // Only the header is there: refused before the payload is waited for.
    let (r, got) = decode_all(&mut Decoder::new(100), &mut whole[..8].to_vec());
    assert_eq!(r, Err(Violation::TooBig));
    assert!(got.is_empty());
    assert!(decode_all(&mut Decoder::new(101), &mut whole.clone()).0.is_ok());
    // Fragments count together.
    let mut buf = client_frame(OpCode::Data(Data::Text), false, &[b'x'; 60], [0; 4]);
    buf.extend(client_frame(OpCode::Data(Data::Continue), true, &[b'x'; 41], [0; 4]));
    assert_eq!(decode_all(&mut Decoder::new(100), &mut buf).0, Err(Violation::TooBig));
    // A 64-bit length far over any limit.
    let mut huge = vec![0x82, 0xFF, 0x7F, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0, 0, 0];
    assert_eq!(decode_all(&mut Decoder::new(100), &mut huge).0, Err(Violation::TooBig));
}

#[test]
fn unmasking_matches_the_definition_at_every_length_and_mask() {
    for len in 0..40 {
        let data: Vec<u8> = (0..len as u8).map(|i| i.wrapping_mul(37)).collect();
        let mask = [0x12, 0x34, 0x56, 0x78];
        let mut fast = data.clone();
        unmask(&mut fast, mask);
        let slow: Vec<u8> = data.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]).collect();
        assert_eq!(fast, slow, "len {len}");
    }
}

#[test]
fn server_frames_read_back_with_tungstenite() {
    for len in [0usize, 125, 126, 65535, 65536] {
        let payload = vec![b'z'; len];
        let mut out = Vec::new();
        encode(&mut out, opcode::TEXT, &payload);
        let mut cursor = std::io::Cursor::new(&out[..]);
        let (header, _) = FrameHeader::parse(&mut cursor).unwrap().expect("a whole header");
        assert!(header.is_final && header.mask.is_none(), "len {len}");
        assert_eq!(header.opcode, OpCode::Data(Data::Text));
        assert_eq!(out.len() - cursor.position() as usize, len, "len {len}");
    }
    let mut out = Vec::new();
    encode_close(&mut out, 1008, &"é".repeat(100));
    assert_eq!(out[1] as usize, out.len() - 2);
    assert!(out.len() - 2 <= 125);
    assert!(std::str::from_utf8(&out[4..]).is_ok(), "the reason is cut on a char boundary");
    assert_eq!(u16::from_be_bytes([out[2], out[3]]), 1008);
}
