//! Arbitrary bytes into the server's WebSocket frame decoder: it never panics, never claims more than it was given,
//! leaves only an unfinished frame behind, and decoding in pieces (as reads arrive) gives the same messages and the
//! same verdict as decoding all at once.
#![no_main]

use libfuzzer_sys::fuzz_target;
use webcall_wsframe::{Decoder, Event, Violation};

#[derive(Debug, PartialEq)]
enum Got {
    Text(String),
    Binary(usize),
    Ping(Vec<u8>),
    Pong,
    Close(Option<(u16, String)>),
}

fn record(got: &mut Vec<Got>, e: Event<'_>) -> bool {
    let stop = matches!(e, Event::Close(_));
    got.push(match e {
        Event::Text(s) => Got::Text(s.to_string()),
        Event::Binary(n) => Got::Binary(n),
        Event::Ping(p) => Got::Ping(p.to_vec()),
        Event::Pong => Got::Pong,
        Event::Close(c) => Got::Close(c.map(|(c, r)| (c, r.to_string()))),
    });
    !stop
}

/// Feeds `data` in pieces of `step` bytes the way the server's socket does: the unfinished rest is kept and
/// the next piece appended to it.
fn in_pieces(data: &[u8], step: usize, max: usize) -> (Vec<Got>, Option<Violation>) {
    let mut dec = Decoder::new(max);
    let mut got = Vec::new();
    let mut pending: Vec<u8> = Vec::new();
    for piece in data.chunks(step) {
        pending.extend_from_slice(piece);
        match dec.decode(&mut pending, &mut |e| record(&mut got, e)) {
            Err(v) => return (got, Some(v)),
            Ok(d) => {
                assert!(d.consumed <= pending.len());
                if d.stopped {
                    return (got, None);
                }
                pending.drain(..d.consumed);
                assert!(d.need > pending.len(), "only an unfinished frame is left behind");
            }
        }
    }
    (got, None)
}

fuzz_target!(|input: &[u8]| {
    let [step, max, data @ ..] = input else { return };
    let max = *max as usize * 4;
    let (whole, whole_err) = in_pieces(data, data.len().max(1), max);
    let (pieces, pieces_err) = in_pieces(data, *step as usize + 1, max);
    assert_eq!(whole, pieces, "same messages whole and in pieces");
    assert_eq!(whole_err, pieces_err, "same verdict whole and in pieces");
});
