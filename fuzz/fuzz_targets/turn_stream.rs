//! The TURN TCP/TLS read side (`StreamFramer`): any byte stream, cut into reads of any sizes, yields the same
//! frames as the whole stream framed at once, fails at the same place when it is not TURN, and never holds
//! more than one incomplete frame plus one read; every frame, fed to the core as a TCP client's, leaves
//! `TurnCore::check_invariants()` holding.
#![no_main]

use std::time::{Duration, Instant, UNIX_EPOCH};

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use webcall_turn::framing::{stream_frame_len, StreamFramer};
use webcall_turn::{CoreConfig, FiveTuple, Transport, TurnCore};

/// The largest frame: a STUN header and a 65,535-byte body (ChannelData padded is smaller).
const MAX_FRAME: usize = 20 + 65535;

#[derive(Arbitrary, Debug)]
struct Input {
    stream: Vec<u8>,
    /// Sizes of the successive reads (cycled; 0 counts as 1).
    reads: Vec<u16>,
}

fuzz_target!(|input: Input| {
    let mut reference: Vec<&[u8]> = Vec::new();
    let mut rest = &input.stream[..];
    let not_turn = loop {
        match stream_frame_len(rest) {
            Ok(Some(n)) => {
                reference.push(&rest[..n]);
                rest = &rest[n..];
            }
            Ok(None) => break false,
            Err(_) => break true,
        }
    };

    let now = Instant::now();
    let cfg = CoreConfig { secret: b"fuzz-secret".to_vec(), ..CoreConfig::default() };
    let mut core = TurnCore::new(cfg, now, UNIX_EPOCH + Duration::from_secs(1_700_000_000));
    let tuple = FiveTuple {
        transport: Transport::Tcp,
        client: "198.51.100.1:40000".parse().unwrap(),
        server: "192.0.2.10:3478".parse().unwrap(),
    };
    let mut framer = StreamFramer::new();
    let mut got: Vec<Vec<u8>> = Vec::new();
    let mut failed = false;
    let mut off = 0;
    let mut i = 0;
    while off < input.stream.len() && !failed {
        let want = if input.reads.is_empty() { usize::MAX } else { input.reads[i % input.reads.len()] as usize };
        i += 1;
        let n = want.clamp(1, input.stream.len() - off);
        framer.read_buf().extend_from_slice(&input.stream[off..off + n]);
        off += n;
        loop {
            match framer.next_frame() {
                Ok(Some(f)) => {
                    got.push(f.to_vec());
                    let _ = core.handle_client(now, tuple, f);
                    while core.poll_output().is_some() {}
                }
                Ok(None) => break,
                Err(_) => {
                    failed = true;
                    break;
                }
            }
        }
        assert!(framer.buffered() < MAX_FRAME + n, "holds {} bytes after a {n}-byte read", framer.buffered());
        core.check_invariants();
    }
    assert_eq!(failed, not_turn, "fails where the whole stream does");
    assert_eq!(got, reference, "the same frames, however the stream is cut");
});
