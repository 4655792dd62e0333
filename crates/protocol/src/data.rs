//! What peers say to each other (docs/protocol.md, *Data channel: chat*): one JSON object per message on the
//! `chat` data channel, or inside signaling `data` in an SFU room. The server never reads these; the web client,
//! the native peer and the tests do, through this type.

use serde::{Deserialize, Serialize};

/// Chat text longer than this many characters is cut by the sender.
pub const MAX_CHAT_CHARS: usize = 4000;

/// One peer-to-peer message. Receivers ignore unknown types and unknown fields ([`PeerData::parse`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum PeerData {
    /// A chat line to everyone. `name` and `ts` are optional on receipt (older senders).
    Chat {
        text: String,
        #[serde(default, skip_serializing_if = "String::is_empty")]
        name: String,
        /// Sender's clock, milliseconds since the Unix epoch.
        #[serde(default)]
        ts: u64,
    },
    /// What the sender currently sends; an absent field counts as on for audio/video and off for the screen.
    Media {
        #[serde(default = "yes")]
        audio: bool,
        #[serde(default = "yes")]
        video: bool,
        #[serde(default)]
        screen: bool,
        #[serde(rename = "screenStream", default, skip_serializing_if = "Option::is_none")]
        screen_stream: Option<String>,
        #[serde(rename = "screenMid", default, skip_serializing_if = "Option::is_none")]
        screen_mid: Option<String>,
    },
    /// The sender's display name now.
    Name { name: String },
    /// The sender raised or lowered a hand.
    Hand { raised: bool },
}

fn yes() -> bool {
    true
}

impl PeerData {
    /// A chat line as a sender makes it: the text cut to [`MAX_CHAT_CHARS`].
    pub fn chat(text: &str, name: &str, ts: u64) -> Self {
        PeerData::Chat { text: text.chars().take(MAX_CHAT_CHARS).collect(), name: name.into(), ts }
    }

    /// The message in `bytes`, or `None` for what a receiver ignores: not JSON, not an object, an unknown type,
    /// or a known type with a field of the wrong kind.
    pub fn parse(bytes: &[u8]) -> Option<Self> {
        serde_json::from_slice(bytes).ok()
    }

    /// The same, for a `data` payload already read as part of a signaling message.
    pub fn from_value(value: &serde_json::Value) -> Option<Self> {
        Self::deserialize(value).ok()
    }

    /// The wire form: one JSON object.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("PeerData serialises")
    }

    /// The wire form as a JSON value (for signaling `data`).
    pub fn to_value(&self) -> serde_json::Value {
        serde_json::to_value(self).expect("PeerData serialises")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_documented_examples_and_writes_them_back() {
        for text in [
            r#"{"type":"chat","text":"Hello Bob","name":"Alice","ts":1763942400123}"#,
            r#"{"type":"media","audio":false,"video":true,"screen":false}"#,
            r#"{"type":"name","name":"Alice B."}"#,
            r#"{"type":"hand","raised":true}"#,
        ] {
            let m = PeerData::parse(text.as_bytes()).unwrap_or_else(|| panic!("{text}"));
            assert_eq!(m.to_json(), text);
        }
    }

    #[test]
    fn receivers_ignore_what_they_do_not_know_and_fill_what_is_absent() {
        assert_eq!(PeerData::parse(br#"{"type":"wave"}"#), None);
        assert_eq!(PeerData::parse(b"[1]"), None);
        assert_eq!(PeerData::parse(b"not json"), None);
        assert_eq!(PeerData::parse(br#"{"type":"hand","raised":"yes"}"#), None);
        assert_eq!(
            PeerData::parse(br#"{"type":"chat","text":"hi","extra":1}"#),
            Some(PeerData::Chat { text: "hi".into(), name: String::new(), ts: 0 })
        );
        let media = PeerData::from_value(&serde_json::json!({"type":"media","screen":true})).unwrap();
        assert!(matches!(media, PeerData::Media { audio: true, video: true, screen: true, .. }));
    }

    #[test]
    fn a_long_chat_line_is_cut_by_characters_not_bytes() {
        let PeerData::Chat { text, .. } = PeerData::chat(&"é".repeat(MAX_CHAT_CHARS + 10), "A", 1) else {
            unreachable!()
        };
        assert_eq!(text.chars().count(), MAX_CHAT_CHARS);
    }
}
