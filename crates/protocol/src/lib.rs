//! Signaling protocol v1 (see `docs/protocol.md`).
//!
//! Parsing borrows from the input frame and keeps relayed payloads (`sdp`, `candidate`) as raw JSON, so relaying
//! a message costs one parse and one copy, never a re-serialisation of the SDP.

pub mod client;
pub mod data;
pub mod sdp;

pub use client::{ClientError, Event, SignalingClient};
pub use data::PeerData;

use serde::{Deserialize, Deserializer, Serialize};
use serde_json::value::RawValue;
use std::borrow::Cow;
use std::fmt;

/// Room names: 1–64 characters of `[A-Za-z0-9_-]`.
pub const MAX_ROOM_LEN: usize = 64;
/// Display names: at most this many characters.
pub const MAX_NAME_LEN: usize = 64;
/// Resume tokens and other opaque strings are never longer than this.
pub const MAX_TOKEN_LEN: usize = 256;
/// Join tokens (`token`): a JWT naming a room of up to [`MAX_ROOM_LEN`] bytes and a name of up to [`MAX_NAME_LEN`]
/// characters (up to 4 bytes each in UTF-8) comes to about 650 bytes; this leaves room for more claims.
pub const MAX_JOIN_TOKEN_LEN: usize = 2048;

/// Machine-readable error codes (the `code` field of an `error` message).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(usize)]
pub enum ErrorCode {
    BadJson,
    UnknownType,
    MissingField,
    BadField,
    BadRoomName,
    NotJoined,
    AlreadyJoined,
    RoomFull,
    UnknownPeer,
    TooLarge,
    RateLimited,
    ServerFull,
    Unauthorized,
    ServerShutdown,
    Unavailable,
    NeedsSfu,
}

impl ErrorCode {
    pub const ALL: [ErrorCode; 16] = [
        ErrorCode::BadJson,
        ErrorCode::UnknownType,
        ErrorCode::MissingField,
        ErrorCode::BadField,
        ErrorCode::BadRoomName,
        ErrorCode::NotJoined,
        ErrorCode::AlreadyJoined,
        ErrorCode::RoomFull,
        ErrorCode::UnknownPeer,
        ErrorCode::TooLarge,
        ErrorCode::RateLimited,
        ErrorCode::ServerFull,
        ErrorCode::Unauthorized,
        ErrorCode::ServerShutdown,
        ErrorCode::Unavailable,
        ErrorCode::NeedsSfu,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadJson => "bad-json",
            ErrorCode::UnknownType => "unknown-type",
            ErrorCode::MissingField => "missing-field",
            ErrorCode::BadField => "bad-field",
            ErrorCode::BadRoomName => "bad-room-name",
            ErrorCode::NotJoined => "not-joined",
            ErrorCode::AlreadyJoined => "already-joined",
            ErrorCode::RoomFull => "room-full",
            ErrorCode::UnknownPeer => "unknown-peer",
            ErrorCode::TooLarge => "too-large",
            ErrorCode::RateLimited => "rate-limited",
            ErrorCode::ServerFull => "server-full",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::ServerShutdown => "server-shutdown",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::NeedsSfu => "needs-sfu",
        }
    }
}

/// A `code` that is not one of protocol v1's (see [`ErrorCode`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown error code '{0}' (not one of protocol v1's; is the server newer than this client?)")]
pub struct UnknownErrorCode(pub String);

impl std::str::FromStr for ErrorCode {
    type Err = UnknownErrorCode;
    /// The code of an `error` frame's `code` field (what [`ErrorCode::as_str`] writes).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ErrorCode::ALL.into_iter().find(|c| c.as_str() == s).ok_or_else(|| UnknownErrorCode(s.to_owned()))
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An enum whose values index a [`Tally`]: `ALL` lists them in discriminant order (a test checks it).
pub trait Key: Copy + 'static {
    const ALL: &'static [Self];
    fn index(self) -> usize;
}

impl Key for ErrorCode {
    const ALL: &'static [Self] = &ErrorCode::ALL;
    fn index(self) -> usize {
        self as usize
    }
}

/// Counters indexed by an enum ([`MessageKind`], [`ErrorCode`]): `t[kind] += 1`, no index arithmetic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tally<K: Key, const N: usize> {
    counts: [u64; N],
    _key: std::marker::PhantomData<K>,
}

impl<K: Key, const N: usize> Default for Tally<K, N> {
    fn default() -> Self {
        Tally { counts: [0; N], _key: std::marker::PhantomData }
    }
}

impl<K: Key, const N: usize> Tally<K, N> {
    /// Every key with its count, in `K::ALL` order.
    pub fn iter(&self) -> impl Iterator<Item = (K, u64)> + '_ {
        K::ALL.iter().copied().zip(self.counts.iter().copied())
    }
}

impl<K: Key, const N: usize> std::ops::Index<K> for Tally<K, N> {
    type Output = u64;
    fn index(&self, k: K) -> &u64 {
        &self.counts[k.index()]
    }
}

impl<K: Key, const N: usize> std::ops::IndexMut<K> for Tally<K, N> {
    fn index_mut(&mut self, k: K) -> &mut u64 {
        &mut self.counts[k.index()]
    }
}

/// Refusals by error code.
pub type ErrorCounts = Tally<ErrorCode, { ErrorCode::ALL.len() }>;
/// Received client messages by kind.
pub type MessageCounts = Tally<MessageKind, { MessageKind::ALL.len() }>;

/// What a received client frame was, for counting: one per client message type, and `invalid` for refusals.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(usize)]
pub enum MessageKind {
    Join,
    Offer,
    Answer,
    Candidate,
    Bye,
    Data,
    View,
    Record,
    Invalid,
}

impl MessageKind {
    pub const ALL: [MessageKind; 9] = [
        MessageKind::Join,
        MessageKind::Offer,
        MessageKind::Answer,
        MessageKind::Candidate,
        MessageKind::Bye,
        MessageKind::Data,
        MessageKind::View,
        MessageKind::Record,
        MessageKind::Invalid,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            MessageKind::Join => "join",
            MessageKind::Offer => "offer",
            MessageKind::Answer => "answer",
            MessageKind::Candidate => "candidate",
            MessageKind::Bye => "bye",
            MessageKind::Data => "data",
            MessageKind::View => "view",
            MessageKind::Record => "record",
            MessageKind::Invalid => "invalid",
        }
    }

    /// The kind of a parsed frame ([`MessageKind::Invalid`] for a refused one).
    pub fn of(parsed: &Result<ClientMessage<'_>, ProtocolError>) -> MessageKind {
        match parsed {
            Ok(m) => m.kind(),
            Err(_) => MessageKind::Invalid,
        }
    }
}

impl Key for MessageKind {
    const ALL: &'static [Self] = &MessageKind::ALL;
    fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for MessageKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A refused client message: what to tell the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProtocolError {
    pub code: ErrorCode,
    pub message: String,
    /// The `type` of the refused message, when it was readable.
    pub refers_to: Option<String>,
}

impl ProtocolError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ProtocolError { code, message: message.into(), refers_to: None }
    }

    pub fn refers_to(mut self, ty: &str) -> Self {
        self.refers_to = Some(ty.to_owned());
        self
    }

    /// The `error` frame for this refusal.
    pub fn to_json(&self) -> String {
        #[derive(Serialize)]
        struct Out<'a> {
            #[serde(rename = "type")]
            ty: &'static str,
            code: &'static str,
            message: &'a str,
            #[serde(rename = "ref", skip_serializing_if = "Option::is_none")]
            refers_to: Option<&'a str>,
        }
        serde_json::to_string(&Out {
            ty: "error",
            code: self.code.as_str(),
            message: &self.message,
            refers_to: self.refers_to.as_deref(),
        })
        .expect("error frames serialise")
    }
}

impl fmt::Display for ProtocolError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}

impl std::error::Error for ProtocolError {}

/// The kinds of relayed (peer-to-peer) messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RelayKind {
    Offer,
    Answer,
    Candidate,
}

impl RelayKind {
    pub fn as_str(self) -> &'static str {
        match self {
            RelayKind::Offer => "offer",
            RelayKind::Answer => "answer",
            RelayKind::Candidate => "candidate",
        }
    }
    fn payload_field(self) -> &'static str {
        match self {
            RelayKind::Offer | RelayKind::Answer => "sdp",
            RelayKind::Candidate => "candidate",
        }
    }
}

/// A client message: parsed by the server ([`parse_client`], borrowing from the frame it came from), written by
/// clients ([`ClientMessage::to_json`]).
#[derive(Debug, Clone)]
pub enum ClientMessage<'a> {
    Join(Join<'a>),
    Relay(Relay<'a>),
    Bye,
    /// `{"type":"data","data":{…}}`: a JSON object for every other member of an SFU room (chat, media state, name,
    /// hand: what the data channel carries in a peer-to-peer room).
    Data(&'a RawValue),
    /// `view`: how an SFU client shows the video it receives (see docs/protocol.md, *Simulcast*).
    View(Vec<TrackView>),
    /// `{"type":"record","action":"start"|"stop"}`: start or stop recording the SFU room (docs/recording.md).
    Record(RecordAction),
}

/// What `record` asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RecordAction {
    Start,
    Stop,
}

/// At most this many entries in one `view` message.
pub const MAX_VIEW_TRACKS: usize = 256;
/// Tile sizes above this (device pixels) are refused as nonsense.
pub const MAX_VIEW_SIZE: u32 = 16384;

/// One entry of `view`: the receive m-line `mid` (of the server's offer `tracks`) is shown `width`×`height`
/// device pixels large; `0`×`0` when it is not shown.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrackView {
    pub mid: String,
    pub width: u32,
    pub height: u32,
}

impl ClientMessage<'_> {
    pub fn kind(&self) -> MessageKind {
        match self {
            ClientMessage::Join(_) => MessageKind::Join,
            ClientMessage::Relay(r) => match r.kind {
                RelayKind::Offer => MessageKind::Offer,
                RelayKind::Answer => MessageKind::Answer,
                RelayKind::Candidate => MessageKind::Candidate,
            },
            ClientMessage::Bye => MessageKind::Bye,
            ClientMessage::Data(_) => MessageKind::Data,
            ClientMessage::View(_) => MessageKind::View,
            ClientMessage::Record(_) => MessageKind::Record,
        }
    }

    /// The frame as a client sends it (serde; [`parse_client`] reads it back to the same message).
    pub fn to_json(&self) -> String {
        #[derive(Serialize)]
        #[serde(tag = "type", rename_all = "kebab-case")]
        enum Out<'a> {
            Join(&'a Join<'a>),
            Offer { to: &'a str, sdp: &'a RawValue },
            Answer { to: &'a str, sdp: &'a RawValue },
            Candidate { to: &'a str, candidate: &'a RawValue },
            Bye,
            Data { data: &'a RawValue },
            View { tracks: &'a [TrackView] },
            Record { action: RecordAction },
        }
        let out = match self {
            ClientMessage::Join(j) => Out::Join(j),
            ClientMessage::Relay(Relay { kind, to, payload }) => match kind {
                RelayKind::Offer => Out::Offer { to, sdp: payload },
                RelayKind::Answer => Out::Answer { to, sdp: payload },
                RelayKind::Candidate => Out::Candidate { to, candidate: payload },
            },
            ClientMessage::Bye => Out::Bye,
            ClientMessage::Data(data) => Out::Data { data },
            ClientMessage::View(tracks) => Out::View { tracks },
            ClientMessage::Record(action) => Out::Record { action: *action },
        };
        serde_json::to_string(&out).expect("client messages serialise")
    }
}

/// `{"type":"bye"}`: the client leaves its room.
pub const BYE: &str = r#"{"type":"bye"}"#;

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Join<'a> {
    pub room: Cow<'a, str>,
    pub name: Cow<'a, str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resume: Option<Cow<'a, str>>,
    /// Signed join token (production issue); carried so adapters can check it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token: Option<Cow<'a, str>>,
    /// Room password (production issue).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub password: Option<Cow<'a, str>>,
    /// `"sfu": true`: the client speaks the SFU messages (see docs/protocol.md, *SFU rooms*).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub sfu: bool,
}

impl<'a> Join<'a> {
    /// A plain join of `room` as `name` (set the other fields on the result).
    pub fn new(room: impl Into<Cow<'a, str>>, name: impl Into<Cow<'a, str>>) -> Self {
        Join { room: room.into(), name: name.into(), ..Default::default() }
    }

    /// The `join` frame.
    pub fn to_json(&self) -> String {
        ClientMessage::Join(self.clone()).to_json()
    }
}

/// The browser's `RTCIceCandidateInit`: the payload of `candidate` (the server relays it verbatim).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IceCandidate {
    /// The `a=candidate` line without `a=`; empty marks the end of candidates in some browsers.
    #[serde(default)]
    pub candidate: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sdp_mid: Option<String>,
    #[serde(rename = "sdpMLineIndex", default, skip_serializing_if = "Option::is_none")]
    pub sdp_m_line_index: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username_fragment: Option<String>,
}

/// What a client relays to another peer (or to [`SFU_PEER`]): the payload of `offer`, `answer` or `candidate`.
#[derive(Debug, Clone, PartialEq)]
pub enum Signal {
    Offer(String),
    Answer(String),
    /// `None` (`null`) marks the end of candidates.
    Candidate(Option<IceCandidate>),
}

impl Signal {
    pub fn kind(&self) -> RelayKind {
        match self {
            Signal::Offer(_) => RelayKind::Offer,
            Signal::Answer(_) => RelayKind::Answer,
            Signal::Candidate(_) => RelayKind::Candidate,
        }
    }

    /// The frame a client sends: `{"type":"offer","to":…,"sdp":…}` and so on.
    pub fn to_json(&self, to: &str) -> String {
        #[derive(Serialize)]
        #[serde(tag = "type", rename_all = "kebab-case")]
        enum Out<'a> {
            Offer { to: &'a str, sdp: &'a str },
            Answer { to: &'a str, sdp: &'a str },
            Candidate { to: &'a str, candidate: &'a Option<IceCandidate> },
        }
        let out = match self {
            Signal::Offer(sdp) => Out::Offer { to, sdp },
            Signal::Answer(sdp) => Out::Answer { to, sdp },
            Signal::Candidate(candidate) => Out::Candidate { to, candidate },
        };
        serde_json::to_string(&out).expect("signals serialise")
    }
}

/// `offer` / `answer` / `candidate`, addressed to `to`.
#[derive(Debug, Clone)]
pub struct Relay<'a> {
    pub kind: RelayKind,
    pub to: Cow<'a, str>,
    /// The payload as raw JSON: a JSON string for `sdp`, an object or `null` for `candidate`.
    pub payload: &'a RawValue,
}

impl Relay<'_> {
    /// The frame the addressee receives: the sender's message with `to` replaced by `from`.
    pub fn encode_from(&self, from: &str) -> String {
        encode_relay(self.kind, from, self.payload)
    }

    /// [`Relay::encode_from`] into `out` (cleared first): a caller that copies the frame into its own allocation
    /// anyway (`Arc<str>`) reuses one buffer instead of allocating a `String` per relayed message.
    pub fn encode_from_into(&self, out: &mut String, from: &str) {
        out.clear();
        encode_relay_into(out, self.kind, from, self.payload);
    }
}

/// `{"type":"<kind>","from":"<from>","<sdp|candidate>":<payload>}` without re-serialising the payload.
pub fn encode_relay(kind: RelayKind, from: &str, payload: &RawValue) -> String {
    let mut s = String::with_capacity(40 + from.len() + payload.get().len());
    encode_relay_into(&mut s, kind, from, payload);
    s
}

/// [`encode_relay`], appended to `s`.
pub fn encode_relay_into(s: &mut String, kind: RelayKind, from: &str, payload: &RawValue) {
    let p = payload.get();
    s.reserve(40 + from.len() + p.len());
    s.push_str("{\"type\":\"");
    s.push_str(kind.as_str());
    s.push_str("\",\"from\":");
    push_json_str(s, from);
    s.push_str(",\"");
    s.push_str(kind.payload_field());
    s.push_str("\":");
    s.push_str(p);
    s.push('}');
}

fn push_json_str(out: &mut String, v: &str) {
    // serde_json escapes only `"`, `\` and control characters; anything else goes in verbatim (same bytes).
    // A fold without early exit, so the check runs over whole vectors of bytes.
    let plain = !v.bytes().fold(false, |esc, b| esc | (b < 0x20) | (b == b'"') | (b == b'\\'));
    if plain {
        out.reserve(v.len() + 2);
        out.push('"');
        out.push_str(v);
        out.push('"');
    } else {
        out.push_str(&serde_json::to_string(v).expect("strings serialise"));
    }
}

/// Every field any client message may carry; each kept raw so a wrong type gets `bad-field`, not `bad-json`.
#[derive(Deserialize)]
struct Fields<'a> {
    #[serde(rename = "type", borrow, default, deserialize_with = "present")]
    ty: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    room: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    name: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    resume: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    token: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    password: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    sfu: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    to: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    sdp: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    candidate: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    tracks: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    data: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    action: Option<&'a RawValue>,
}

/// A present field is `Some`, even when it is `null` (plain `Option` would fold `null` into absent).
fn present<'de, D: Deserializer<'de>>(d: D) -> Result<Option<&'de RawValue>, D::Error> {
    <&RawValue>::deserialize(d).map(Some)
}

fn string_field<'a>(raw: Option<&'a RawValue>, field: &str, ty: &str) -> Result<Option<Cow<'a, str>>, ProtocolError> {
    let Some(raw) = raw else { return Ok(None) };
    // The raw value is already valid JSON: a string without escapes is exactly the text between its quotes.
    let text = raw.get();
    if text.len() >= 2 && text.starts_with('"') && !text.contains('\\') {
        return Ok(Some(Cow::Borrowed(&text[1..text.len() - 1])));
    }
    match serde_json::from_str::<Cow<'a, str>>(text) {
        Ok(s) => Ok(Some(s)),
        Err(_) => {
            Err(ProtocolError::new(ErrorCode::BadField, format!("field '{field}' must be a string")).refers_to(ty))
        }
    }
}

fn required<'a>(v: Option<Cow<'a, str>>, field: &str, ty: &str) -> Result<Cow<'a, str>, ProtocolError> {
    v.ok_or_else(|| {
        ProtocolError::new(ErrorCode::MissingField, format!("'{ty}' needs the field '{field}'")).refers_to(ty)
    })
}

/// `true` for 1–64 characters of `[A-Za-z0-9_-]`.
/// The characters of peer ids, resume tokens and WHIP/WHEP resource ids (URL- and JSON-safe).
pub const ID_ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";

/// Fills `buf` with characters each uniform over [`ID_ALPHABET`], from `next_u64`: six random bits per character,
/// values past the alphabet's 62 drawn again. On the stack, so a caller can make an id with one allocation.
pub fn fill_id(buf: &mut [u8], mut next_u64: impl FnMut() -> u64) -> &str {
    let mut i = 0;
    while i < buf.len() {
        let mut bits = next_u64();
        for _ in 0..10 {
            let v = (bits & 63) as usize;
            bits >>= 6;
            if v < ID_ALPHABET.len() {
                buf[i] = ID_ALPHABET[v];
                i += 1;
                if i == buf.len() {
                    break;
                }
            }
        }
    }
    std::str::from_utf8(buf).expect("the alphabet is ASCII")
}

/// An id of `len` characters (see [`fill_id`]); `next_u64` is the caller's random source.
pub fn random_id(len: usize, next_u64: impl FnMut() -> u64) -> String {
    let mut buf = vec![0u8; len];
    fill_id(&mut buf, next_u64);
    String::from_utf8(buf).expect("the alphabet is ASCII")
}

pub fn valid_room_name(room: &str) -> bool {
    !room.is_empty()
        && room.len() <= MAX_ROOM_LEN
        && room.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// `true` for a display name the server accepts: at most 64 characters, no control characters.
pub fn valid_display_name(name: &str) -> bool {
    check_name(name, "").is_ok()
}

fn check_name(name: &str, ty: &str) -> Result<(), ProtocolError> {
    if name.chars().count() > MAX_NAME_LEN {
        return Err(ProtocolError::new(
            ErrorCode::BadField,
            format!("field 'name' is longer than {MAX_NAME_LEN} characters"),
        )
        .refers_to(ty));
    }
    if name.chars().any(char::is_control) {
        return Err(ProtocolError::new(ErrorCode::BadField, "field 'name' contains control characters").refers_to(ty));
    }
    Ok(())
}

fn check_opaque(v: &Option<Cow<'_, str>>, field: &str, ty: &str, max: usize) -> Result<(), ProtocolError> {
    match v {
        Some(s) if s.len() > max => {
            Err(ProtocolError::new(ErrorCode::BadField, format!("field '{field}' is longer than {max} bytes"))
                .refers_to(ty))
        }
        _ => Ok(()),
    }
}

/// Parses one client frame. Every refusal carries the error code the client should see.
pub fn parse_client(text: &str) -> Result<ClientMessage<'_>, ProtocolError> {
    // serde would also read a struct from a JSON array, by position.
    if !text.trim_start().starts_with('{') {
        return Err(ProtocolError::new(ErrorCode::BadJson, "a message must be one JSON object"));
    }
    let fields: Fields<'_> = serde_json::from_str(text)
        .map_err(|e| ProtocolError::new(ErrorCode::BadJson, format!("a message must be one JSON object: {e}")))?;
    let ty = match string_field(fields.ty, "type", "")? {
        Some(t) => t,
        None => return Err(ProtocolError::new(ErrorCode::MissingField, "every message needs a string field 'type'")),
    };
    let ty: &str = &ty;
    match ty {
        "join" => {
            let room = required(string_field(fields.room, "room", ty)?, "room", ty)?;
            if !valid_room_name(&room) {
                return Err(ProtocolError::new(
                    ErrorCode::BadRoomName,
                    format!("room names are 1-{MAX_ROOM_LEN} characters of A-Z a-z 0-9 _ -"),
                )
                .refers_to(ty));
            }
            let name = string_field(fields.name, "name", ty)?.unwrap_or(Cow::Borrowed(""));
            check_name(&name, ty)?;
            let resume = string_field(fields.resume, "resume", ty)?;
            let token = string_field(fields.token, "token", ty)?;
            let password = string_field(fields.password, "password", ty)?;
            check_opaque(&resume, "resume", ty, MAX_TOKEN_LEN)?;
            check_opaque(&token, "token", ty, MAX_JOIN_TOKEN_LEN)?;
            check_opaque(&password, "password", ty, MAX_TOKEN_LEN)?;
            let sfu = match fields.sfu.map(RawValue::get) {
                None | Some("false") => false,
                Some("true") => true,
                Some(_) => {
                    return Err(
                        ProtocolError::new(ErrorCode::BadField, "field 'sfu' must be true or false").refers_to(ty)
                    )
                }
            };
            Ok(ClientMessage::Join(Join { room, name, resume, token, password, sfu }))
        }
        "offer" | "answer" | "candidate" => {
            let kind = match ty {
                "offer" => RelayKind::Offer,
                "answer" => RelayKind::Answer,
                _ => RelayKind::Candidate,
            };
            let to = required(string_field(fields.to, "to", ty)?, "to", ty)?;
            let payload = match kind {
                RelayKind::Offer | RelayKind::Answer => fields.sdp,
                RelayKind::Candidate => fields.candidate,
            };
            let field = kind.payload_field();
            let Some(payload) = payload else {
                return Err(ProtocolError::new(ErrorCode::MissingField, format!("'{ty}' needs the field '{field}'"))
                    .refers_to(ty));
            };
            let first = payload.get().as_bytes().first().copied();
            let ok = match kind {
                RelayKind::Offer | RelayKind::Answer => first == Some(b'"'),
                RelayKind::Candidate => first == Some(b'{') || payload.get() == "null",
            };
            if !ok {
                let want = if kind == RelayKind::Candidate { "an object or null" } else { "a string" };
                return Err(
                    ProtocolError::new(ErrorCode::BadField, format!("field '{field}' must be {want}")).refers_to(ty)
                );
            }
            Ok(ClientMessage::Relay(Relay { kind, to, payload }))
        }
        "bye" => Ok(ClientMessage::Bye),
        "view" => {
            let raw = fields.tracks.ok_or_else(|| {
                ProtocolError::new(ErrorCode::MissingField, "'view' needs the field 'tracks'").refers_to(ty)
            })?;
            let bad =
                |why: &str| ProtocolError::new(ErrorCode::BadField, format!("field 'tracks' {why}")).refers_to(ty);
            let tracks: Vec<TrackView> = serde_json::from_str(raw.get())
                .map_err(|_| bad("must be an array of {\"mid\": string, \"width\": integer, \"height\": integer}"))?;
            if tracks.len() > MAX_VIEW_TRACKS {
                return Err(bad(&format!("has more than {MAX_VIEW_TRACKS} entries")));
            }
            if tracks.iter().any(|t| t.mid.is_empty() || t.mid.len() > 32) {
                return Err(bad("has a 'mid' that is empty or longer than 32 bytes"));
            }
            if tracks.iter().any(|t| t.width > MAX_VIEW_SIZE || t.height > MAX_VIEW_SIZE) {
                return Err(bad(&format!("has a 'width' or 'height' above {MAX_VIEW_SIZE}")));
            }
            Ok(ClientMessage::View(tracks))
        }
        "record" => match string_field(fields.action, "action", ty)?.as_deref() {
            Some("start") => Ok(ClientMessage::Record(RecordAction::Start)),
            Some("stop") => Ok(ClientMessage::Record(RecordAction::Stop)),
            Some(_) => {
                Err(ProtocolError::new(ErrorCode::BadField, "field 'action' must be \"start\" or \"stop\"")
                    .refers_to(ty))
            }
            None => Err(ProtocolError::new(ErrorCode::MissingField, "'record' needs the field 'action'").refers_to(ty)),
        },
        "data" => match fields.data {
            Some(d) if d.get().starts_with('{') => Ok(ClientMessage::Data(d)),
            Some(_) => Err(ProtocolError::new(ErrorCode::BadField, "field 'data' must be an object").refers_to(ty)),
            None => Err(ProtocolError::new(ErrorCode::MissingField, "'data' needs the field 'data'").refers_to(ty)),
        },
        other => {
            let shown: String = other.chars().take(32).collect();
            Err(ProtocolError::new(
                ErrorCode::UnknownType,
                format!("unknown message type '{shown}' (expected join, offer, answer, candidate, bye, data, view or record)"),
            ))
        }
    }
}

/// The reserved peer id that addresses the server's SFU in `offer`/`answer`/`candidate` (`to`/`from`).
/// Peer ids are 10 characters, so it never names a peer.
pub const SFU_PEER: &str = "sfu";

/// One m-line of a server offer in an SFU room: whose media it carries.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SfuTrack {
    pub mid: String,
    /// The publishing participant's peer id.
    pub peer: String,
    /// `audio` or `video`.
    pub kind: String,
    /// The `mid` of this track in the publisher's own connection (its `media` data says which one is its screen).
    #[serde(rename = "peerMid", default)]
    pub peer_mid: String,
}

/// `{"type":"data","from":…,"data":{…}}`: a member's `data` object, for the others of its SFU room.
pub fn encode_data(from: &str, data: &RawValue) -> String {
    let d = data.get();
    let mut s = String::with_capacity(32 + from.len() + d.len());
    s.push_str(r#"{"type":"data","from":"#);
    push_json_str(&mut s, from);
    s.push_str(r#","data":"#);
    s.push_str(d);
    s.push('}');
    s
}

/// `{"type":"topology","mode":"sfu"}`: this room's media goes through the server from now on.
pub fn encode_topology_sfu() -> &'static str {
    r#"{"type":"topology","mode":"sfu"}"#
}

/// `{"type":"topology","mode":"sfu","restart":true}`: the room's SFU moved (with `--redis`, the node that ran it
/// died): the client's connection to `sfu` is gone; it makes a new one (a fresh offer).
pub fn encode_topology_sfu_restart() -> &'static str {
    r#"{"type":"topology","mode":"sfu","restart":true}"#
}

/// The SFU's offer to a client: `{"type":"offer","from":"sfu","sdp":…,"tracks":[…]}`.
pub fn encode_sfu_offer(sdp: &str, tracks: &[SfuTrack]) -> String {
    #[derive(Serialize)]
    struct Out<'a> {
        #[serde(rename = "type")]
        ty: &'static str,
        from: &'static str,
        sdp: &'a str,
        tracks: &'a [SfuTrack],
    }
    serde_json::to_string(&Out { ty: "offer", from: SFU_PEER, sdp, tracks }).expect("offers serialise")
}

/// `{"type":"speaker","peer":…}`: the active speaker of an SFU room changed to `peer`.
pub fn encode_speaker(peer: &str) -> String {
    let mut s = String::with_capacity(40 + peer.len());
    s.push_str(r#"{"type":"speaker","peer":"#);
    push_json_str(&mut s, peer);
    s.push('}');
    s
}

/// `{"type":"recording","active":…,"by":…}`: the room's recording started or stopped (`by`: who; `None` for
/// the state a joiner is told).
pub fn encode_recording(active: bool, by: Option<&str>) -> String {
    ServerMessage::Recording { active, by: by.map(str::to_owned) }.to_json()
}

/// The SFU's answer to a client's offer: `{"type":"answer","from":"sfu","sdp":…}`.
pub fn encode_sfu_answer(sdp: &str) -> String {
    let mut s = String::with_capacity(40 + sdp.len());
    s.push_str(r#"{"type":"answer","from":"sfu","sdp":"#);
    s.push_str(&serde_json::to_string(sdp).expect("strings serialise"));
    s.push('}');
    s
}

/// One entry of `welcome.peers`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerInfo {
    pub id: String,
    pub name: String,
}

/// The browser's `RTCIceServer` shape.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IceServer {
    pub urls: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub username: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub credential: Option<String>,
}

/// Gives each welcome its `iceServers` (fresh TURN credentials per peer id). Here, where both the room core
/// (which asks) and the TURN server (which answers) see it, so neither depends on the other.
pub trait IceProvider: Send + Sync {
    fn ice_servers(&self, peer_id: &str) -> Vec<IceServer>;
}

impl<F: Fn(&str) -> Vec<IceServer> + Send + Sync> IceProvider for F {
    fn ice_servers(&self, peer_id: &str) -> Vec<IceServer> {
        self(peer_id)
    }
}

/// The `welcome` frame, byte for byte what serde writes for [`ServerMessage::Welcome`] (see the test), by hand:
/// it is on the join path the benchmarks measure.
pub fn encode_welcome(
    id: &str,
    room: &str,
    peers: &[PeerInfo],
    ice_servers: &[IceServer],
    resume: &str,
    resumed: bool,
    publish: bool,
) -> String {
    // By hand, byte for byte what serde_json makes of `ServerMessage::Welcome` (see the test): one allocation of about the
    // right size instead of serde's growth steps, and no escaping pass over strings that need none.
    let mut len = 120 + id.len() + room.len() + resume.len();
    len += peers.iter().map(|p| 20 + p.id.len() + p.name.len()).sum::<usize>();
    for s in ice_servers {
        len += 48 + s.urls.iter().map(|u| u.len() + 3).sum::<usize>();
        len += s.username.as_ref().map_or(0, |u| u.len()) + s.credential.as_ref().map_or(0, |c| c.len());
    }
    let mut o = String::with_capacity(len);
    o.push_str("{\"type\":\"welcome\",\"id\":");
    push_json_str(&mut o, id);
    o.push_str(",\"room\":");
    push_json_str(&mut o, room);
    o.push_str(",\"peers\":[");
    for (i, p) in peers.iter().enumerate() {
        if i > 0 {
            o.push(',');
        }
        o.push_str("{\"id\":");
        push_json_str(&mut o, &p.id);
        o.push_str(",\"name\":");
        push_json_str(&mut o, &p.name);
        o.push('}');
    }
    o.push_str("],\"iceServers\":[");
    for (i, s) in ice_servers.iter().enumerate() {
        if i > 0 {
            o.push(',');
        }
        o.push_str("{\"urls\":[");
        for (j, u) in s.urls.iter().enumerate() {
            if j > 0 {
                o.push(',');
            }
            push_json_str(&mut o, u);
        }
        o.push(']');
        if let Some(u) = &s.username {
            o.push_str(",\"username\":");
            push_json_str(&mut o, u);
        }
        if let Some(c) = &s.credential {
            o.push_str(",\"credential\":");
            push_json_str(&mut o, c);
        }
        o.push('}');
    }
    o.push_str("],\"resume\":");
    push_json_str(&mut o, resume);
    o.push_str(if resumed { ",\"resumed\":true" } else { ",\"resumed\":false" });
    if !publish {
        o.push_str(",\"publish\":false");
    }
    o.push('}');
    o
}

/// The `hello` frame (same bytes as serde's [`ServerMessage::Hello`]).
pub fn encode_hello(from: &str, name: &str) -> String {
    let mut s = String::with_capacity(40 + from.len() + name.len());
    s.push_str("{\"type\":\"hello\",\"from\":");
    push_json_str(&mut s, from);
    s.push_str(",\"name\":");
    push_json_str(&mut s, name);
    s.push('}');
    s
}

/// The `bye` frame a room's members get (same bytes as serde's [`ServerMessage::Bye`]).
pub fn encode_bye(from: &str) -> String {
    let mut s = String::with_capacity(32 + from.len());
    s.push_str("{\"type\":\"bye\",\"from\":");
    push_json_str(&mut s, from);
    s.push('}');
    s
}

fn yes() -> bool {
    true
}

fn is_true(b: &bool) -> bool {
    *b
}

/// Everything a server sends: written by the room core (hand-written encoders for the frequent ones, the same
/// bytes as serde's form, tested), read by clients ([`SignalingClient`], the native peer, tests, bench).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum ServerMessage {
    Welcome {
        id: String,
        room: String,
        peers: Vec<PeerInfo>,
        #[serde(rename = "iceServers")]
        ice_servers: Vec<IceServer>,
        resume: String,
        #[serde(default)]
        resumed: bool,
        /// `false` when this peer may only receive media (subscribe-only token); only then is it sent.
        #[serde(default = "yes", skip_serializing_if = "is_true")]
        publish: bool,
    },
    Hello {
        from: String,
        #[serde(default)]
        name: String,
    },
    Offer {
        from: String,
        sdp: String,
        /// SFU offers (`from` is [`SFU_PEER`]) always have it, empty when nobody publishes: whose media each m-line
        /// carries. Offers relayed from a peer have none.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        tracks: Option<Vec<SfuTrack>>,
    },
    Answer {
        from: String,
        sdp: String,
    },
    Candidate {
        from: String,
        candidate: Option<IceCandidate>,
    },
    Bye {
        from: String,
    },
    /// The room's media path changed (`mode`: `sfu`); `restart`: the SFU moved, connect to it again.
    Topology {
        mode: String,
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        restart: bool,
    },
    /// The active speaker of an SFU room changed to `peer` (see [`encode_speaker`]).
    Speaker {
        peer: String,
    },
    /// The room is (`active`) or is no longer being recorded; `by` is the peer id that started or stopped it, or
    /// `api` for the HTTP API (absent in the one a joiner gets). See [`encode_recording`].
    Recording {
        active: bool,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        by: Option<String>,
    },
    /// Member `from` of an SFU room sent `data` (an object, passed on unchanged; see [`encode_data`]).
    Data {
        from: String,
        data: serde_json::Value,
    },
    Error {
        code: String,
        message: String,
        #[serde(rename = "ref", default, skip_serializing_if = "Option::is_none")]
        refers_to: Option<String>,
    },
}

impl ServerMessage {
    /// Reads one server frame.
    pub fn parse(text: &str) -> Result<ServerMessage, serde_json::Error> {
        serde_json::from_str(text)
    }

    /// The frame's `type`.
    pub fn message_type(&self) -> &'static str {
        match self {
            ServerMessage::Welcome { .. } => "welcome",
            ServerMessage::Hello { .. } => "hello",
            ServerMessage::Offer { .. } => "offer",
            ServerMessage::Answer { .. } => "answer",
            ServerMessage::Candidate { .. } => "candidate",
            ServerMessage::Bye { .. } => "bye",
            ServerMessage::Topology { .. } => "topology",
            ServerMessage::Speaker { .. } => "speaker",
            ServerMessage::Recording { .. } => "recording",
            ServerMessage::Data { .. } => "data",
            ServerMessage::Error { .. } => "error",
        }
    }

    /// An `error` frame as the refusal it reports (`None` for other frames); a code this version does not know is
    /// an error.
    pub fn into_refusal(self) -> Option<Result<ProtocolError, UnknownErrorCode>> {
        let ServerMessage::Error { code, message, refers_to } = self else { return None };
        Some(code.parse().map(|code| ProtocolError { code, message, refers_to }))
    }

    /// The frame (serde; the room core writes the frequent ones by hand, to the same bytes).
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("server messages serialise")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn code(text: &str) -> ErrorCode {
        parse_client(text).unwrap_err().code
    }

    #[test]
    fn error_codes_index_like_all() {
        for (i, c) in ErrorCode::ALL.iter().enumerate() {
            assert_eq!(*c as usize, i, "{c}");
        }
    }

    #[test]
    fn record_and_recording_round_trip() {
        for (text, action) in [
            (r#"{"type":"record","action":"start"}"#, RecordAction::Start),
            (r#"{"type":"record","action":"stop"}"#, RecordAction::Stop),
        ] {
            let m = parse_client(text).unwrap();
            assert!(matches!(m, ClientMessage::Record(a) if a == action));
            assert_eq!(m.to_json(), text);
            assert_eq!(m.kind(), MessageKind::Record);
        }
        assert_eq!(code(r#"{"type":"record","action":1}"#), ErrorCode::BadField);
        let on = encode_recording(true, Some("Yx3kq0tVb2"));
        assert_eq!(on, r#"{"type":"recording","active":true,"by":"Yx3kq0tVb2"}"#);
        assert_eq!(
            ServerMessage::parse(&on).unwrap(),
            ServerMessage::Recording { active: true, by: Some("Yx3kq0tVb2".into()) }
        );
        assert_eq!(encode_recording(false, None), r#"{"type":"recording","active":false}"#);
    }

    #[test]
    fn parses_join_with_defaults() {
        let m = parse_client(r#"{"type":"join","room":"a-b_C9"}"#).unwrap();
        let ClientMessage::Join(j) = m else { panic!() };
        assert_eq!(j.room, "a-b_C9");
        assert_eq!(j.name, "");
        assert_eq!(j.resume, None);
    }

    #[test]
    fn join_says_whether_the_client_speaks_sfu() {
        let ClientMessage::Join(j) = parse_client(r#"{"type":"join","room":"r"}"#).unwrap() else { panic!() };
        assert!(!j.sfu);
        let ClientMessage::Join(j) = parse_client(r#"{"type":"join","room":"r","sfu":true}"#).unwrap() else {
            panic!()
        };
        assert!(j.sfu);
        assert_eq!(code(r#"{"type":"join","room":"r","sfu":"yes"}"#), ErrorCode::BadField);
    }

    #[test]
    fn view_lists_tile_sizes_and_refuses_nonsense() {
        let ClientMessage::View(v) = parse_client(
            r#"{"type":"view","tracks":[{"mid":"3","width":640,"height":360},{"mid":"5","width":0,"height":0}]}"#,
        )
        .unwrap() else {
            panic!("not a view")
        };
        assert_eq!(v[0], TrackView { mid: "3".into(), width: 640, height: 360 });
        assert_eq!(v[1].width, 0);
        assert_eq!(code(r#"{"type":"view"}"#), ErrorCode::MissingField);
        for bad in [
            r#"{"type":"view","tracks":{}}"#,
            r#"{"type":"view","tracks":[{"mid":"3","width":-1,"height":2}]}"#,
            r#"{"type":"view","tracks":[{"mid":"3","width":1.5,"height":2}]}"#,
            r#"{"type":"view","tracks":[{"mid":3,"width":1,"height":2}]}"#,
            r#"{"type":"view","tracks":[{"mid":"","width":1,"height":2}]}"#,
            r#"{"type":"view","tracks":[{"mid":"3","width":99999,"height":2}]}"#,
            r#"{"type":"view","tracks":[{"mid":"3","width":1}]}"#,
        ] {
            assert_eq!(code(bad), ErrorCode::BadField, "{bad}");
        }
        let many =
            format!(r#"{{"type":"view","tracks":[{}]}}"#, vec![r#"{"mid":"1","width":1,"height":1}"#; 257].join(","));
        assert_eq!(code(&many), ErrorCode::BadField);
        let typed = ServerMessage::Speaker { peer: "Yx3kq0tVb2".into() };
        assert_eq!(encode_speaker("Yx3kq0tVb2"), typed.to_json());
        assert_eq!(ServerMessage::parse(&encode_speaker("Yx3kq0tVb2")).unwrap(), typed);
        let v = ClientMessage::View(vec![TrackView { mid: "3".into(), width: 1, height: 2 }]);
        assert!(matches!(parse_client(&v.to_json()), Ok(ClientMessage::View(t)) if t[0].height == 2));
    }

    #[test]
    fn sfu_frames_are_json() {
        let t = [SfuTrack { mid: "2".into(), peer: "Yx3kq0tVb2".into(), kind: "video".into(), peer_mid: "1".into() }];
        let v: serde_json::Value = serde_json::from_str(&encode_sfu_offer("v=0\r\n\"", &t)).unwrap();
        assert_eq!(v["from"], "sfu");
        assert_eq!(v["tracks"][0]["peer"], "Yx3kq0tVb2");
        assert_eq!(v["tracks"][0]["peerMid"], "1");
        let v: serde_json::Value = serde_json::from_str(&encode_sfu_answer("v=0\r\n")).unwrap();
        assert_eq!((v["type"].as_str(), v["sdp"].as_str()), (Some("answer"), Some("v=0\r\n")));
        let v: serde_json::Value = serde_json::from_str(encode_topology_sfu()).unwrap();
        assert_eq!(v["mode"], "sfu");
    }

    #[test]
    fn data_carries_an_object_for_the_room() {
        let ClientMessage::Data(d) =
            parse_client(r#"{"type":"data","data":{"type":"chat","text":"hi \"x\""}}"#).unwrap()
        else {
            panic!()
        };
        let v: serde_json::Value = serde_json::from_str(&encode_data("Yx3kq0tVb2", d)).unwrap();
        assert_eq!(v, serde_json::json!({"type":"data","from":"Yx3kq0tVb2","data":{"type":"chat","text":"hi \"x\""}}));
        assert_eq!(code(r#"{"type":"data","data":"hi"}"#), ErrorCode::BadField);
        assert_eq!(code(r#"{"type":"data","data":null}"#), ErrorCode::BadField);
        assert_eq!(code(r#"{"type":"data"}"#), ErrorCode::MissingField);
    }

    #[test]
    fn unescapes_strings() {
        let m = parse_client(r#"{"type":"join","room":"r","name":"Zo\u00eb \"Z\""}"#).unwrap();
        let ClientMessage::Join(j) = m else { panic!() };
        assert_eq!(j.name, "Zoë \"Z\"");
    }

    #[test]
    fn refusals_have_the_right_codes() {
        assert_eq!(code("nope"), ErrorCode::BadJson);
        assert_eq!(code("[1,2]"), ErrorCode::BadJson);
        assert_eq!(code(r#"{"type":"join","room":"a","room":"b"}"#), ErrorCode::BadJson);
        assert_eq!(code(r#"{"room":"a"}"#), ErrorCode::MissingField);
        assert_eq!(code(r#"{"type":7}"#), ErrorCode::BadField);
        assert_eq!(code(r#"{"type":"dance"}"#), ErrorCode::UnknownType);
        assert_eq!(code(r#"{"type":"join"}"#), ErrorCode::MissingField);
        assert_eq!(code(r#"{"type":"join","room":""}"#), ErrorCode::BadRoomName);
        assert_eq!(code(r#"{"type":"join","room":"a b"}"#), ErrorCode::BadRoomName);
        assert_eq!(code(&format!(r#"{{"type":"join","room":"{}"}}"#, "a".repeat(65))), ErrorCode::BadRoomName);
        assert!(parse_client(&format!(r#"{{"type":"join","room":"{}"}}"#, "a".repeat(64))).is_ok());
        assert_eq!(code(r#"{"type":"join","room":5}"#), ErrorCode::BadField);
        assert_eq!(code(&format!(r#"{{"type":"join","room":"r","name":"{}"}}"#, "é".repeat(65))), ErrorCode::BadField);
        assert_eq!(code(r#"{"type":"join","room":"r","name":"a\nb"}"#), ErrorCode::BadField);
        assert_eq!(code(r#"{"type":"offer","sdp":"x"}"#), ErrorCode::MissingField);
        assert_eq!(code(r#"{"type":"offer","to":"x"}"#), ErrorCode::MissingField);
        assert_eq!(code(r#"{"type":"offer","to":"x","sdp":null}"#), ErrorCode::BadField);
        assert_eq!(code(r#"{"type":"answer","to":"x","sdp":{}}"#), ErrorCode::BadField);
        assert_eq!(code(r#"{"type":"candidate","to":"x"}"#), ErrorCode::MissingField);
        assert_eq!(code(r#"{"type":"candidate","to":"x","candidate":"c"}"#), ErrorCode::BadField);
    }

    #[test]
    fn relays_replace_to_with_from_and_keep_payload_verbatim() {
        let text = r#"{"type":"candidate","to":"B","candidate":{"candidate":"candidate:1 1 udp 1 127.0.0.1 5 typ host","sdpMid":"0","sdpMLineIndex":0},"extra":1}"#;
        let ClientMessage::Relay(r) = parse_client(text).unwrap() else { panic!() };
        let out = r.encode_from("A");
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["type"], "candidate");
        assert_eq!(v["from"], "A");
        assert_eq!(v["candidate"]["sdpMLineIndex"], 0);
        assert!(v.get("to").is_none() && v.get("extra").is_none());

        let ClientMessage::Relay(r) = parse_client(r#"{"type":"candidate","to":"B","candidate":null}"#).unwrap() else {
            panic!()
        };
        assert_eq!(r.encode_from("A"), r#"{"type":"candidate","from":"A","candidate":null}"#);

        let ClientMessage::Relay(r) = parse_client(r#"{"type":"offer","to":"B","sdp":"v=0\r\n\u0041"}"#).unwrap()
        else {
            panic!()
        };
        let parsed: ServerMessage = serde_json::from_str(&r.encode_from("A")).unwrap();
        assert_eq!(parsed, ServerMessage::Offer { from: "A".into(), sdp: "v=0\r\nA".into(), tracks: None });
    }

    #[test]
    fn string_fields_read_as_serde_reads_them() {
        // Whitespace around values, escapes, unicode, empty strings: the no-escape shortcut and serde agree.
        for text in [
            r#"{"type":"join","room":"r-1","name":"Ann"}"#,
            "{ \"type\" :\t\"join\" ,\n \"room\" : \"r\" , \"name\" : \"\" , \"resume\" : \"t\\u0041\" }",
            r#"{"type":"join","room":"r","name":"Ann \"A\" é","password":"p\\w","token":"x"}"#,
        ] {
            let ClientMessage::Join(j) = parse_client(text).unwrap() else { panic!("{text}") };
            let v: serde_json::Value = serde_json::from_str(text).unwrap();
            assert_eq!(&*j.room, v["room"].as_str().unwrap());
            assert_eq!(&*j.name, v["name"].as_str().unwrap());
            for (got, key) in [(&j.resume, "resume"), (&j.token, "token"), (&j.password, "password")] {
                assert_eq!(got.as_deref(), v[key].as_str(), "{key} of {text}");
            }
        }
        let e = parse_client(r#"{"type":"join","room":5}"#).err().unwrap();
        assert_eq!(e.code, ErrorCode::BadField);
    }

    #[test]
    fn server_messages_round_trip() {
        let w = encode_welcome(
            "id1",
            "r",
            &[PeerInfo { id: "p".into(), name: "N\"".into() }],
            &[IceServer { urls: vec!["stun:127.0.0.1:3478".into()], username: None, credential: None }],
            "tok",
            false,
            true,
        );
        let ServerMessage::Welcome { peers, ice_servers, .. } = serde_json::from_str(&w).unwrap() else { panic!() };
        assert_eq!(peers[0].name, "N\"");
        assert_eq!(ice_servers[0].urls[0], "stun:127.0.0.1:3478");
        assert!(!w.contains("username"), "absent credentials are omitted: {w}");
        // Byte for byte what serde_json writes, with and without escapes, credentials, peers, publish.
        let ice = [
            IceServer { urls: vec!["stun:[::1]:3478".into()], username: None, credential: None },
            IceServer {
                urls: vec!["turn:h:3478?transport=udp".into(), "turns:h\\x:5349?transport=tcp".into()],
                username: Some("1700003600:id1".into()),
                credential: Some("d8soP47RbdIKLDUOpnJPVQyq5Ts=".into()),
            },
        ];
        let peers =
            [PeerInfo { id: "p".into(), name: "N\"\u{1}é".into() }, PeerInfo { id: "q".into(), name: String::new() }];
        for (peers, ice, resume, resumed, publish) in [
            (&peers[..], &ice[..], "tok", true, false),
            (&[][..], &[][..], "t\n", false, true),
            (&peers[..1], &ice[1..], "", false, true),
        ] {
            let by_serde = ServerMessage::Welcome {
                id: "id1".into(),
                room: "r-1_x".into(),
                peers: peers.to_vec(),
                ice_servers: ice.to_vec(),
                resume: resume.into(),
                resumed,
                publish,
            }
            .to_json();
            assert_eq!(encode_welcome("id1", "r-1_x", peers, ice, resume, resumed, publish), by_serde);
        }
        let h: ServerMessage = serde_json::from_str(&encode_hello("x", "a\"b")).unwrap();
        assert_eq!(h, ServerMessage::Hello { from: "x".into(), name: "a\"b".into() });
        let e = ProtocolError::new(ErrorCode::RoomFull, "full").refers_to("join").to_json();
        assert_eq!(e, r#"{"type":"error","code":"room-full","message":"full","ref":"join"}"#);
    }

    #[test]
    fn server_messages_name_their_type_and_errors_read_back_as_refusals() {
        for c in ErrorCode::ALL {
            assert_eq!(c.as_str().parse::<ErrorCode>(), Ok(c));
        }
        assert_eq!("dance".parse::<ErrorCode>(), Err(UnknownErrorCode("dance".into())));
        let all = [
            ServerMessage::Welcome {
                id: "A".into(),
                room: "r".into(),
                peers: vec![],
                ice_servers: vec![],
                resume: "t".into(),
                resumed: false,
                publish: true,
            },
            ServerMessage::Hello { from: "B".into(), name: "Bob".into() },
            ServerMessage::Offer { from: "B".into(), sdp: "o".into(), tracks: None },
            ServerMessage::Answer { from: "B".into(), sdp: "a".into() },
            ServerMessage::Candidate { from: "B".into(), candidate: None },
            ServerMessage::Bye { from: "B".into() },
            ServerMessage::Topology { mode: "sfu".into(), restart: true },
            ServerMessage::Speaker { peer: "B".into() },
            ServerMessage::Recording { active: true, by: None },
            ServerMessage::Data { from: "B".into(), data: serde_json::json!({}) },
            ServerMessage::Error { code: "room-full".into(), message: "full".into(), refers_to: None },
        ];
        for m in all {
            let v: serde_json::Value = serde_json::from_str(&m.to_json()).unwrap();
            assert_eq!(v["type"], m.message_type());
            assert_eq!(m.clone().into_refusal().is_some(), m.message_type() == "error");
        }
        let refused = ProtocolError::new(ErrorCode::RoomFull, "full").refers_to("join");
        assert_eq!(ServerMessage::parse(&refused.to_json()).unwrap().into_refusal(), Some(Ok(refused)));
        let newer = ServerMessage::Error { code: "dance".into(), message: "m".into(), refers_to: None };
        assert_eq!(newer.into_refusal(), Some(Err(UnknownErrorCode("dance".into()))));
    }

    #[test]
    fn fast_encoders_write_what_serde_writes() {
        for (from, name) in [("x", "a\"b"), ("Yx3kq0tVb2", ""), ("q", "é\u{1}\\")] {
            let hello = ServerMessage::Hello { from: from.into(), name: name.into() };
            assert_eq!(encode_hello(from, name), hello.to_json());
            assert_eq!(encode_bye(from), ServerMessage::Bye { from: from.into() }.to_json());
        }
        for sdp in ["v=0\r\n", "", "a\"b\u{7}"] {
            let raw = serde_json::value::to_raw_value(sdp).unwrap();
            let offer = ServerMessage::Offer { from: "A\"".into(), sdp: sdp.into(), tracks: None };
            assert_eq!(encode_relay(RelayKind::Offer, "A\"", &raw), offer.to_json());
            let answer = ServerMessage::Answer { from: "A".into(), sdp: sdp.into() };
            assert_eq!(encode_relay(RelayKind::Answer, "A", &raw), answer.to_json());
            let sfu = ServerMessage::Answer { from: SFU_PEER.into(), sdp: sdp.into() };
            assert_eq!(encode_sfu_answer(sdp), sfu.to_json());
            // With tracks, and without (nobody publishes): SFU offers always carry `tracks`.
            let audio = SfuTrack { mid: "0".into(), peer: "p".into(), kind: "audio".into(), peer_mid: "0".into() };
            for tracks in [vec![audio], vec![]] {
                let sfu = ServerMessage::Offer { from: SFU_PEER.into(), sdp: sdp.into(), tracks: Some(tracks.clone()) };
                assert_eq!(encode_sfu_offer(sdp, &tracks), sfu.to_json());
                assert_eq!(ServerMessage::parse(&encode_sfu_offer(sdp, &tracks)).unwrap(), sfu);
            }
        }
        let c = IceCandidate {
            candidate: "candidate:1 1 udp 1 127.0.0.1 5 typ host".into(),
            sdp_mid: Some("0".into()),
            sdp_m_line_index: Some(0),
            username_fragment: None,
        };
        for candidate in [None, Some(c)] {
            let raw = serde_json::value::to_raw_value(&candidate).unwrap();
            let m = ServerMessage::Candidate { from: "B".into(), candidate };
            assert_eq!(encode_relay(RelayKind::Candidate, "B", &raw), m.to_json());
        }
        assert_eq!(encode_topology_sfu(), ServerMessage::Topology { mode: "sfu".into(), restart: false }.to_json());
        assert_eq!(
            encode_topology_sfu_restart(),
            ServerMessage::Topology { mode: "sfu".into(), restart: true }.to_json()
        );
        // `data` is passed on as the client wrote it; serde's map sorts keys, so these are sorted already.
        for d in [r#"{}"#, r#"{"name":"é\"\u0001","type":"name"}"#, r#"{"a":[1,{"b":null}],"type":"x"}"#] {
            let raw: Box<RawValue> = serde_json::from_str(d).unwrap();
            let m = ServerMessage::Data { from: "Kq3\"".into(), data: serde_json::from_str(d).unwrap() };
            assert_eq!(encode_data("Kq3\"", &raw), m.to_json());
            assert_eq!(ServerMessage::parse(&encode_data("Kq3\"", &raw)).unwrap(), m);
        }
        for refers_to in [None, Some("offer")] {
            let mut e = ProtocolError::new(ErrorCode::UnknownPeer, "no peer 'x\"'");
            e.refers_to = refers_to.map(str::to_owned);
            let m = ServerMessage::Error {
                code: "unknown-peer".into(),
                message: e.message.clone(),
                refers_to: e.refers_to.clone(),
            };
            assert_eq!(e.to_json(), m.to_json());
        }
    }

    #[test]
    fn client_messages_read_back_as_written() {
        let mut j = Join::new("r-1", "Ann \"A\"");
        j.resume = Some("t".into());
        j.sfu = true;
        let text = j.to_json();
        let ClientMessage::Join(back) = parse_client(&text).unwrap() else { panic!() };
        assert_eq!(back, j);
        let plain = Join::new("r", "");
        assert_eq!(plain.to_json(), r#"{"type":"join","room":"r","name":""}"#);
        let c = IceCandidate { candidate: "candidate:1 1 udp 1 ::1 5 typ host".into(), ..Default::default() };
        for s in [
            Signal::Offer("v=0\r\n".into()),
            Signal::Answer("\"".into()),
            Signal::Candidate(Some(c)),
            Signal::Candidate(None),
        ] {
            let text = s.to_json("Yx3kq0tVb2");
            let ClientMessage::Relay(r) = parse_client(&text).unwrap() else { panic!("{text}") };
            assert_eq!((r.kind, &*r.to), (s.kind(), "Yx3kq0tVb2"));
            assert_eq!(ClientMessage::Relay(r).to_json(), text);
        }
        assert!(matches!(parse_client(BYE), Ok(ClientMessage::Bye)));
        assert_eq!(ClientMessage::Bye.to_json(), BYE);
    }

    #[test]
    fn tallies_index_by_kind() {
        for (i, k) in MessageKind::ALL.iter().enumerate() {
            assert_eq!(*k as usize, i, "{k}");
        }
        let mut t = MessageCounts::default();
        t[MessageKind::of(&parse_client(r#"{"type":"bye"}"#))] += 1;
        t[MessageKind::of(&parse_client("nope"))] += 2;
        let seen: Vec<_> = t.iter().filter(|(_, n)| *n > 0).collect();
        assert_eq!(seen, [(MessageKind::Bye, 1), (MessageKind::Invalid, 2)]);
        let mut e = ErrorCounts::default();
        e[ErrorCode::NeedsSfu] += 1;
        assert_eq!(e.iter().last(), Some((ErrorCode::NeedsSfu, 1)));
    }
}
