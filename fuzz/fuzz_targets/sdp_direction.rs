//! Any SDP: the subscribe-only check never panics, and what it accepts no browser reads as sending: read the way
//! libwebrtc does (lines split at `\n`, one trailing `\r` dropped, the last direction line of a section applies,
//! `sendrecv` without one), every audio/video section is `recvonly` or `inactive`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use webcall_protocol::sdp::check_receive_only;

fuzz_target!(|data: &[u8]| {
    let Ok(sdp) = std::str::from_utf8(data) else { return };
    if check_receive_only(sdp).is_err() {
        return;
    }
    let mut media = false;
    let mut dir = "sendrecv";
    let check = |media: bool, dir: &str| assert!(!media || matches!(dir, "recvonly" | "inactive"), "{sdp:?}");
    for raw in sdp.split('\n') {
        let line = raw.strip_suffix('\r').unwrap_or(raw);
        if let Some(m) = line.strip_prefix("m=") {
            check(media, dir);
            media = m.starts_with("audio") || m.starts_with("video");
            dir = "sendrecv";
        } else if let Some(a) = line.strip_prefix("a=") {
            if matches!(a, "sendrecv" | "sendonly" | "recvonly" | "inactive") {
                dir = a;
            }
        }
    }
    check(media, dir);
});
