//! What a subscribe-only peer's SDP may say, read the way a browser reads it: libwebrtc splits lines at `\n`
//! (dropping one `\r` before it), and of several direction lines in a media section applies the last. So this
//! parses every section and accepts only what cannot be read as sending: each audio/video section carries exactly
//! one direction line, `a=recvonly` or `a=inactive`; duplicates, a session-level direction, lines a browser might
//! read differently (stray `\r`, NUL, odd case or spacing of a direction) and unknown media kinds are refused.

use std::fmt;

/// Why an SDP is refused for a subscribe-only peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SdpRefusal {
    /// An audio/video section sends, or has no direction line (`sendrecv` is the default).
    Sends { section: usize },
    /// An audio/video section has more than one direction line.
    DuplicateDirection { section: usize },
    /// A direction line before the first `m=` line.
    SessionDirection,
    /// A line a browser might read differently than this check.
    Ambiguous { line: usize },
    /// A media kind other than audio, video or application.
    UnknownMedia { section: usize },
}

impl fmt::Display for SdpRefusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SdpRefusal::Sends { section } => write!(
                f,
                "media section {section} would send (mark every audio and video section a=recvonly or a=inactive)"
            ),
            SdpRefusal::DuplicateDirection { section } => {
                write!(f, "media section {section} has more than one direction line")
            }
            SdpRefusal::SessionDirection => write!(f, "a direction line at session level (put it in each section)"),
            SdpRefusal::Ambiguous { line } => write!(f, "line {line} is malformed"),
            SdpRefusal::UnknownMedia { section } => write!(f, "media section {section} is not audio, video or data"),
        }
    }
}

const DIRECTIONS: [&str; 4] = ["sendrecv", "sendonly", "recvonly", "inactive"];

/// `Ok` when no audio or video section of `sdp` can send.
pub fn check_receive_only(sdp: &str) -> Result<(), SdpRefusal> {
    // (is audio/video, direction lines seen, last direction receives only)
    let mut section: Option<(bool, u32, bool)> = None;
    let mut index = 0usize;
    let finish = |s: Option<(bool, u32, bool)>, index: usize| match s {
        Some((true, 0, _)) => Err(SdpRefusal::Sends { section: index }),
        Some((true, n, _)) if n > 1 => Err(SdpRefusal::DuplicateDirection { section: index }),
        Some((true, _, false)) => Err(SdpRefusal::Sends { section: index }),
        _ => Ok(()),
    };
    for (n, raw) in sdp.split('\n').enumerate() {
        let line = raw.strip_suffix('\r').unwrap_or(raw);
        if line.contains(['\r', '\0']) {
            return Err(SdpRefusal::Ambiguous { line: n + 1 });
        }
        if let Some(m) = line.strip_prefix("m=") {
            finish(section, index)?;
            index += 1;
            let kind = m.split(' ').next().unwrap_or("");
            let media = match kind {
                "audio" | "video" => true,
                "application" => false,
                _ => return Err(SdpRefusal::UnknownMedia { section: index }),
            };
            section = Some((media, 0, false));
            continue;
        }
        // An attribute's name, however it is spelled: anything that looks like a direction must be one exactly.
        let attr = line.trim_start();
        let attr = match attr.get(..2) {
            Some(p) if p.eq_ignore_ascii_case("a=") => &attr[2..],
            _ => continue,
        };
        let name = attr.split([':', ' ', '\t']).next().unwrap_or("").trim();
        let Some(dir) = DIRECTIONS.iter().find(|d| d.eq_ignore_ascii_case(name)) else { continue };
        if line != format!("a={dir}") {
            return Err(SdpRefusal::Ambiguous { line: n + 1 });
        }
        match &mut section {
            None => return Err(SdpRefusal::SessionDirection),
            Some((_, count, receives)) => {
                *count += 1;
                *receives = matches!(*dir, "recvonly" | "inactive");
            }
        }
    }
    finish(section, index)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sdp(body: &str) -> String {
        format!("v=0\r\no=- 1 2 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\n{body}")
    }

    #[test]
    fn receive_only_sections_pass() {
        let ok = sdp("m=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=mid:0\r\na=recvonly\r\nm=video 9 UDP/TLS/RTP/SAVPF 96\r\na=inactive\r\nm=application 9 UDP/DTLS/SCTP webrtc-datachannel\r\na=mid:2\r\n");
        assert_eq!(check_receive_only(&ok), Ok(()));
        assert_eq!(check_receive_only(&ok.replace("\r\n", "\n")), Ok(()));
        assert_eq!(check_receive_only(&sdp("")), Ok(()), "no media at all");
    }

    /// What libwebrtc would apply: per audio/video section, the last direction line, `sendrecv` without one.
    fn browser_sends(sdp: &str) -> bool {
        let (mut media, mut dir, mut sends) = (false, "sendrecv", false);
        for raw in sdp.split('\n') {
            let line = raw.strip_suffix('\r').unwrap_or(raw);
            if let Some(m) = line.strip_prefix("m=") {
                sends |= media && !matches!(dir, "recvonly" | "inactive");
                media = m.starts_with("audio") || m.starts_with("video");
                dir = "sendrecv";
            } else if let Some(a) = line.strip_prefix("a=") {
                if DIRECTIONS.contains(&a) {
                    dir = a;
                }
            }
        }
        sends || (media && !matches!(dir, "recvonly" | "inactive"))
    }

    /// Random SDPs from lines that matter (a cheap stand-in for the `sdp_direction` fuzz target): nothing accepted
    /// sends as a browser reads it.
    #[test]
    fn nothing_accepted_sends_as_a_browser_reads_it() {
        const LINES: [&str; 14] = [
            "m=audio 9 RTP/AVP 0",
            "m=video 9 RTP/AVP 96",
            "m=application 9 DTLS/SCTP 5000",
            "m=text 9 RTP/AVP 0",
            "a=recvonly",
            "a=inactive",
            "a=sendrecv",
            "a=sendonly",
            "a=recvonly ",
            "a=mid:0",
            "A=sendonly",
            "a=recvonly\ra=sendrecv",
            "",
            "c=IN IP4 0.0.0.0",
        ];
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        let (mut accepted, mut refused) = (0, 0);
        for _ in 0..20_000 {
            let mut sdp = String::from("v=0\r\n");
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let n = (x % 7) as usize;
            for i in 0..n {
                let pick = (x >> (8 * i + 3)) as usize % LINES.len();
                sdp.push_str(LINES[pick]);
                sdp.push_str(if (x >> (i + 50)) & 1 == 0 { "\r\n" } else { "\n" });
            }
            match check_receive_only(&sdp) {
                Ok(()) => {
                    accepted += 1;
                    assert!(!browser_sends(&sdp), "{sdp:?}");
                }
                Err(_) => refused += 1,
            }
        }
        assert!(accepted > 100 && refused > 100, "{accepted} accepted, {refused} refused");
    }

    #[test]
    fn anything_that_may_send_is_refused() {
        let cases = [
            ("m=audio 9 RTP/AVP 0\r\na=recvonly\r\na=sendrecv\r\n", SdpRefusal::DuplicateDirection { section: 1 }),
            ("m=audio 9 RTP/AVP 0\r\na=inactive\r\na=sendonly\r\n", SdpRefusal::DuplicateDirection { section: 1 }),
            ("m=audio 9 RTP/AVP 0\r\na=recvonly\r\na=recvonly\r\n", SdpRefusal::DuplicateDirection { section: 1 }),
            ("m=audio 9 RTP/AVP 0\r\na=mid:0\r\n", SdpRefusal::Sends { section: 1 }),
            ("m=video 9 RTP/AVP 96\r\na=sendonly\r\n", SdpRefusal::Sends { section: 1 }),
            ("a=recvonly\r\nm=video 9 RTP/AVP 96\r\na=recvonly\r\n", SdpRefusal::SessionDirection),
            ("m=audio 9 RTP/AVP 0\r\na=recvonly \r\n", SdpRefusal::Ambiguous { line: 6 }),
            ("m=audio 9 RTP/AVP 0\r\na=RECVONLY\r\n", SdpRefusal::Ambiguous { line: 6 }),
            ("m=audio 9 RTP/AVP 0\r\n a=recvonly\r\n", SdpRefusal::Ambiguous { line: 6 }),
            ("m=audio 9 RTP/AVP 0\ra=recvonly\r\n", SdpRefusal::Ambiguous { line: 5 }),
            ("m=Audio 9 RTP/AVP 0\r\na=recvonly\r\n", SdpRefusal::UnknownMedia { section: 1 }),
            ("m=audio 9 RTP/AVP 0\r\na=recvonly\r\nm=video 9 RTP/AVP 96\r\n", SdpRefusal::Sends { section: 2 }),
        ];
        for (body, want) in cases {
            assert_eq!(check_receive_only(&sdp(body)), Err(want), "{body:?}");
        }
    }
}
