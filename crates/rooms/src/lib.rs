//! Room logic without I/O, in the manner of str0m's `Rtc`.
//!
//! The adapter feeds [`Rooms`] inputs ([`Rooms::connect`], [`Rooms::message`], [`Rooms::disconnect`],
//! [`Rooms::tick`]) with the current time (the core has no clock), and acts on what comes out of its one output
//! channel, [`Rooms::poll_output`]: a connection has frames to write ([`Output::Wake`], then [`Rooms::take`]) or
//! must be closed ([`Output::Close`]); a request for the SFU ([`Output::Sfu`]); a session ended ([`Output::Left`]).
//! [`Rooms::poll_timeout`] says when to call `tick` next.
//!
//! Outbound frames stay in the core until the adapter takes them. That is what lets a resumed session get every
//! frame that was not yet written to its old connection, in order, and lets a slow reader be cut off without
//! losing what was queued for it. So `take` is a pull, like quinn's `poll_transmit`, not an output: the writer
//! calls it when its socket is ready, and what it has not taken still counts against the connection's bounds.
//!
//! The core is single-node. A layer may wrap it ([`RoomCore`]; the cluster's is `webcall_cluster::ClusterRooms`,
//! built on the core's public API alone, the part of it for layers being in `layer.rs`): it takes some inputs
//! itself (joins), and may add *remote* members, members whose sessions live outside this core. Those appear in
//! `welcome` and can be addressed, but the core only passes frames for them on ([`Output::Forward`]) and tells them
//! nothing of joins, leaves or topology (their own host does); it ends no media session for them and reports no
//! [`Output::Left`]. On a single node there are none, and these outputs never occur.

use indexmap::IndexMap;
use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};
use sha2::{Digest, Sha256};
use std::borrow::BorrowMut;
use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::hash::BuildHasherDefault;
use std::sync::Arc;
use std::time::{Duration, Instant};
use subtle::ConstantTimeEq;
use webcall_protocol::{
    encode_bye, encode_hello, encode_recording, encode_topology_sfu, encode_welcome, parse_client, ClientMessage,
    ErrorCode, ErrorCounts, Join, MessageCounts, MessageKind, PeerInfo, ProtocolError, RecordAction, Relay, SFU_PEER,
};

/// Frames in order, with their total size: memory bounds are in bytes, not only frames.
#[derive(Debug, Default)]
pub(crate) struct Queue {
    frames: VecDeque<Frame>,
    bytes: usize,
}

impl Queue {
    pub(crate) fn push_back(&mut self, f: Frame) {
        self.bytes += f.len();
        self.frames.push_back(f);
    }
    pub(crate) fn drain(&mut self, all: std::ops::RangeFull) -> std::collections::vec_deque::Drain<'_, Frame> {
        self.bytes = 0;
        self.frames.drain(all)
    }
    pub(crate) fn extend(&mut self, frames: impl IntoIterator<Item = Frame>) {
        for f in frames {
            self.push_back(f);
        }
    }
    pub(crate) fn len(&self) -> usize {
        self.frames.len()
    }
    pub(crate) fn is_empty(&self) -> bool {
        self.frames.is_empty()
    }
    pub(crate) fn bytes(&self) -> usize {
        self.bytes
    }
    pub(crate) fn iter(&self) -> impl Iterator<Item = &Frame> {
        self.frames.iter()
    }
}

impl From<Vec<Frame>> for Queue {
    fn from(v: Vec<Frame>) -> Self {
        let bytes = v.iter().map(|f| f.len()).sum();
        Queue { frames: v.into(), bytes }
    }
}

impl From<Queue> for Vec<Frame> {
    fn from(q: Queue) -> Self {
        q.frames.into()
    }
}

impl IntoIterator for Queue {
    type Item = Frame;
    type IntoIter = std::collections::vec_deque::IntoIter<Frame>;
    fn into_iter(self) -> Self::IntoIter {
        self.frames.into_iter()
    }
}

/// Adapter-chosen connection handle.
pub type ConnId = u64;

/// A frame ready to write; shared when the same frame goes to several peers.
pub type Frame = Arc<str>;

/// Tunables of the room logic. The server's flags map onto these.
#[derive(Debug, Clone)]
pub struct Config {
    /// Room capacity (`--max-peers`).
    pub max_peers: usize,
    /// Rooms on this server (`--max-rooms`).
    pub max_rooms: usize,
    /// How long a dropped session keeps its seat and id (`--resume-grace`).
    pub resume_grace: Duration,
    /// Frames queued for one connection before it counts as a slow reader (`--max-queued-messages`); a detached
    /// session may hold twice this before it is given up.
    pub max_queued: usize,
    /// Bytes queued for one connection before it counts as a slow reader (`--max-queued-bytes`); bounds memory
    /// per connection whatever the frame sizes. A detached session may hold twice this.
    pub max_queued_bytes: usize,
    /// Largest accepted frame in bytes (`--max-message-size`).
    pub max_message_size: usize,
    /// Sustained messages per second per connection (`--rate-limit`). The adapter paces reading to it (bursts of
    /// twice this pass at once, more are read more slowly); the core closes a connection that gets
    /// [`FLOOD_FACTOR`] times this many messages ahead of the rate anyway.
    pub rate_per_sec: f64,
    /// Refusals a connection may collect in a burst before it is closed; refilled at one per second.
    pub max_errors: f64,
    /// Wrong passwords a room takes per minute (`--max-password-attempts`); past it every password join to that
    /// room is refused `rate-limited` until the budget refills.
    pub password_attempts_per_min: f64,
    /// Seed for peer ids and resume tokens (the server passes OS entropy; tests pass a constant).
    pub seed: u64,
    /// Peer-to-peer mesh or the server's SFU (`--topology`).
    pub topology: Topology,
    /// Capacity of SFU rooms (`--max-sfu-peers`).
    pub max_sfu_peers: usize,
    /// Recording is possible (`--record-dir` is set); else `record` is refused.
    pub recording: bool,
}

/// How a room's media flows (`--topology`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Topology {
    /// Peer-to-peer while two peers are in the room; through the SFU from the third on, if every member speaks
    /// SFU (`join` with `"sfu":true`). An SFU room stays one until it empties.
    #[default]
    Auto,
    /// Always peer-to-peer (protocol v1 as before).
    Mesh,
    /// Always through the SFU; joins without `"sfu":true` are refused with `needs-sfu`.
    Sfu,
}

impl std::str::FromStr for Topology {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Topology::Auto),
            "mesh" => Ok(Topology::Mesh),
            "sfu" => Ok(Topology::Sfu),
            _ => Err(format!("unknown topology '{s}' (expected auto, mesh or sfu)")),
        }
    }
}

/// Why [`Rooms::admit_viewer`] refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchRefusal {
    NoRoom,
    /// The room is peer-to-peer: no media passes the server.
    NotSfu,
    Refused(ProtocolError),
}

/// What the adapter passes to the SFU ([`Output::Sfu`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SfuRequest {
    /// An `offer`/`answer`/`candidate` a peer addressed to `sfu`; `payload` is the raw JSON of `sdp`/`candidate`.
    Signal { room: Arc<str>, peer: Arc<str>, kind: webcall_protocol::RelayKind, payload: String },
    /// The peer left an SFU room (bye, or its grace period ran out): end its media session.
    Leave { room: Arc<str>, peer: Arc<str> },
    /// How the peer shows the video it receives (`view`).
    View { room: Arc<str>, peer: Arc<str>, tracks: Vec<webcall_protocol::TrackView> },
    /// Start (`start`) or stop recording `room`.
    Record { room: Arc<str>, start: bool },
}

/// Why [`Rooms::set_recording`] refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordRefusal {
    #[error("recording is off on this server; start it with --record-dir DIR (or WEBCALL_RECORD_DIR)")]
    Off,
    #[error("no room '{0}' on this server (nobody is in it)")]
    NoRoom(String),
    #[error(
        "room '{0}' is peer-to-peer: its media never reaches the server, so it cannot be recorded; rooms whose \
         members all speak SFU (web pages without ?mesh=1) move to the SFU to be recorded, unless the server runs \
         with --topology mesh"
    )]
    NotSfu(String),
    #[error("recording is single-node for now: with --redis a room's media may live on another node; run one node to record")]
    Clustered,
}

impl RecordRefusal {
    fn to_protocol(&self) -> ProtocolError {
        let code = match self {
            RecordRefusal::Off | RecordRefusal::Clustered => ErrorCode::Unavailable,
            RecordRefusal::NoRoom(_) => ErrorCode::NotJoined,
            RecordRefusal::NotSfu(_) => ErrorCode::NeedsSfu,
        };
        ProtocolError::new(code, self.to_string()).refers_to("record")
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            max_peers: 4,
            max_rooms: 10_000,
            resume_grace: Duration::from_secs(20),
            max_queued: 256,
            max_queued_bytes: 1 << 20,
            max_message_size: 64 * 1024,
            rate_per_sec: 50.0,
            max_errors: 20.0,
            password_attempts_per_min: 10.0,
            seed: 0,
            topology: Topology::Auto,
            max_sfu_peers: 100,
            recording: false,
        }
    }
}

/// A connection more than this many seconds' worth of messages ahead of `--rate-limit` is flooding: closed with
/// [`close::POLICY`] and reason [`close::FLOODING`]. A paced adapter only gets there when one read holds that many
/// messages.
pub const FLOOD_FACTOR: f64 = 20.0;

/// WebSocket close codes the core asks for.
pub mod close {
    /// Policy violation: too many errors, slow reader, flooding.
    pub const POLICY: u16 = 1008;
    /// The reason a flooding connection is closed with (code [`POLICY`]).
    pub const FLOODING: &str = "rate-limited: message flood";
    /// Message too big.
    pub const TOO_BIG: u16 = 1009;
    /// Application code: the session was resumed on another connection.
    pub const RESUMED_ELSEWHERE: u16 = 4000;
    /// The server is shutting down.
    pub const GOING_AWAY: u16 = 1001;
}

/// What a [`JoinPolicy`] grants a fresh join.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Admission {
    /// Replaces the name the client asked for (a signed token fixes the name).
    pub name: Option<String>,
    /// `false`: the peer may only receive media; offers and answers that would send audio or video are refused.
    pub publish: bool,
    /// May start and stop recording the room (`record`): everyone in an open room; with tokens, the `record` claim.
    pub record: bool,
}

impl Default for Admission {
    fn default() -> Self {
        Admission { name: None, publish: true, record: true }
    }
}

/// Decides whether a fresh join may proceed (signed tokens, per-address join rates). Resumes are not asked: the
/// resume token is their credential.
pub trait JoinPolicy: Send + Sync {
    fn admit(&self, conn: ConnId, join: &Join<'_>) -> Result<Admission, ProtocolError>;
}

impl<T: JoinPolicy + ?Sized> JoinPolicy for Arc<T> {
    fn admit(&self, conn: ConnId, join: &Join<'_>) -> Result<Admission, ProtocolError> {
        (**self).admit(conn, join)
    }
}

/// Admits everyone: open rooms.
pub struct OpenPolicy;

impl JoinPolicy for OpenPolicy {
    fn admit(&self, _: ConnId, _: &Join<'_>) -> Result<Admission, ProtocolError> {
        Ok(Admission::default())
    }
}

/// Monotonic counters for metrics.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Counters {
    /// Received messages by kind.
    pub messages: MessageCounts,
    /// Refusals by code.
    pub errors: ErrorCounts,
    pub joins: u64,
    pub resumes: u64,
    /// Sessions that ended because their grace period ran out.
    pub expired: u64,
    pub slow_readers: u64,
}

/// What the core (`X` = [`Infallible`]: none of its own) or a layer around it ([`RoomCore::Extra`]) puts out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output<X = Infallible> {
    /// The connection's outbound queue went from empty to non-empty: call [`Rooms::take`].
    Wake(ConnId),
    /// Write what [`Rooms::take`] still yields, then close with this code and reason. The core no longer reads
    /// from this connection; call [`Rooms::disconnect`] once the socket is gone.
    Close { conn: ConnId, code: u16, reason: &'static str },
    /// For the SFU adapter.
    Sfu(SfuRequest),
    /// A frame for remote member `to` (see the crate docs): the layer that added it delivers it.
    Forward { to: Arc<str>, frame: Frame },
    /// A session of this core ended (bye, grace over, overflow). Nothing to do on a single node; a layer around
    /// the core may tell others.
    Left { id: Arc<str>, room: Arc<str> },
    /// An output of the layer around the core.
    Layer(X),
}

impl Output {
    /// The core's output as one of a layer's channel.
    pub fn widen<X>(self) -> Output<X> {
        match self {
            Output::Wake(conn) => Output::Wake(conn),
            Output::Close { conn, code, reason } => Output::Close { conn, code, reason },
            Output::Sfu(req) => Output::Sfu(req),
            Output::Forward { to, frame } => Output::Forward { to, frame },
            Output::Left { id, room } => Output::Left { id, room },
            Output::Layer(never) => match never {},
        }
    }
}

/// What a router drives: the single-node [`Rooms`], or a layer around one (e.g. the cluster's) that takes some
/// inputs itself and adds outputs of its own (`Extra`). Every other input goes to the core ([`BorrowMut`]).
pub trait RoomCore: BorrowMut<Rooms> + Send + 'static {
    type Extra: std::fmt::Debug + Send;
    /// One text frame from a connection ([`Rooms::message`]).
    fn message(&mut self, conn: ConnId, text: &str, now: Instant);
    /// The connection is gone ([`Rooms::disconnect`]).
    fn disconnect(&mut self, conn: ConnId, now: Instant);
    /// The one output channel ([`Rooms::poll_output`]).
    fn poll_output(&mut self) -> Option<Output<Self::Extra>>;
}

impl RoomCore for Rooms {
    type Extra = Infallible;
    #[inline]
    fn message(&mut self, conn: ConnId, text: &str, now: Instant) {
        Rooms::message(self, conn, text, now)
    }
    #[inline]
    fn disconnect(&mut self, conn: ConnId, now: Instant) {
        Rooms::disconnect(self, conn, now)
    }
    #[inline]
    fn poll_output(&mut self) -> Option<Output> {
        Rooms::poll_output(self)
    }
}

/// Gives each welcome its `iceServers`; defined in `webcall_protocol` (the TURN server implements it too).
pub use webcall_protocol::{IceProvider, IceServer};

/// Counters for health and metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    pub connections: usize,
    pub rooms: usize,
    pub peers: usize,
    pub detached_peers: usize,
}

/// A token bucket; time comes from the caller, as nanoseconds since [`Rooms`] was created (8 bytes, where an
/// `Instant` takes 16: every connection has two buckets).
#[derive(Debug, Clone)]
struct Bucket {
    tokens: f64,
    last: u64,
}

impl Bucket {
    fn full(cap: f64, now: u64) -> Self {
        Bucket { tokens: cap, last: now }
    }
    /// Seconds until a token is there (0 when one is).
    fn wait(&mut self, now: u64, per_sec: f64, cap: f64) -> f64 {
        let dt = Duration::from_nanos(now.saturating_sub(self.last)).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + dt * per_sec).min(cap);
        ((1.0 - self.tokens) / per_sec).max(0.0)
    }
    fn take(&mut self, now: u64, per_sec: f64, cap: f64) -> bool {
        let dt = Duration::from_nanos(now.saturating_sub(self.last)).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + dt * per_sec).min(cap);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

struct Conn {
    peer: Option<Arc<str>>,
    out: Queue,
    /// Queue length past which the connection is a slow reader; raised while a resume backlog drains.
    limit: usize,
    /// Same, in bytes.
    limit_bytes: usize,
    closing: bool,
    rate: Bucket,
    errors: Bucket,
    /// A client of the server's own (WHIP): its join makes the room an SFU room, or is refused `needs-sfu`.
    sfu_only: bool,
}

struct Peer {
    name: Arc<str>,
    room: Arc<str>,
    conn: Option<ConnId>,
    token: Arc<str>,
    /// Frames for a detached session, in order.
    pending: Queue,
    /// Bumped at each detach, so a stale deadline is ignored.
    epoch: u64,
    publish: bool,
    /// A remote member (see the crate docs): no connection, no queue, no token here.
    remote: bool,
    /// Joined with `"sfu":true`.
    sfu: bool,
    /// May start and stop recording ([`Admission::record`]).
    record: RecordGrant,
}

/// Whether a session may send `record`, and if not, which refusal it hears.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordGrant {
    Granted,
    /// Its join token does not grant `record`.
    NotGranted,
    /// A session of a cluster node: recording stays single-node ([`RecordRefusal::Clustered`]).
    Clustered,
}

struct Room {
    /// Peer ids in join order.
    members: Vec<Arc<str>>,
    /// Salted SHA-256 of the password the first joiner set.
    password: Option<([u8; 16], [u8; 32])>,
    /// Wrong passwords this room may still take (refilled per `password_attempts_per_min`).
    guesses: Bucket,
    /// Media goes through the SFU (until the room empties).
    sfu: bool,
    /// Being recorded (until stopped or the room empties).
    recording: bool,
}

impl Room {
    fn new(password: Option<([u8; 16], [u8; 32])>, guesses: f64, now: u64) -> Self {
        Room { members: Vec::new(), password, guesses: Bucket::full(guesses, now), sfu: false, recording: false }
    }
}

/// The relay's encode buffer keeps at most this much capacity (a burst of large offers gives it back).
const ENCODE_BUF_KEEP: usize = 16 * 1024;

pub struct Rooms {
    cfg: Config,
    ice: Box<dyn IceProvider>,
    rng: StdRng,
    // Entries live in one dense `Vec` each (IndexMap), with only an index table hashed: a `HashMap` keeps its
    // entries in the table itself, at most 7/8 full, so at 10k connections it held 16384 slots of each entry.
    /// Connection ids are chosen by the adapter, not by clients: a fast hash is enough.
    conns: IndexMap<ConnId, Conn, BuildHasherDefault<rustc_hash::FxHasher>>,
    peers: IndexMap<Arc<str>, Peer>,
    rooms: IndexMap<Arc<str>, Room>,
    /// Resume token -> peer id; the key is the same allocation as the session's `token`.
    tokens: HashMap<Arc<str>, Arc<str>>,
    /// (deadline, peer, epoch) in deadline order: the grace period is the same for everyone.
    deadlines: VecDeque<(Instant, Arc<str>, u64)>,
    out: VecDeque<Output>,
    policy: Box<dyn JoinPolicy>,
    counters: Counters,
    shutting_down: bool,
    /// Time of the latest input, for work that an input triggers indirectly.
    now: Instant,
    /// Time zero of the rate buckets.
    origin: Instant,
    /// A relayed frame is encoded here, then copied into its `Arc<str>` (one allocation per message, not two).
    encode_buf: String,
}

fn password_hash(salt: &[u8; 16], password: &str) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(salt);
    h.update(password.as_bytes());
    h.finalize().into()
}

/// Why a subscribe-only peer's SDP (as its raw JSON string) is refused; `None` when it cannot send media.
fn sdp_refusal(raw: &serde_json::value::RawValue) -> Option<String> {
    let Ok(sdp) = serde_json::from_str::<std::borrow::Cow<'_, str>>(raw.get()) else {
        return Some("the SDP is not a string".into());
    };
    webcall_protocol::sdp::check_receive_only(&sdp).err().map(|e| e.to_string())
}

impl Rooms {
    /// `now`: time zero of the core's rate buckets (the core reads no clock).
    pub fn new(cfg: Config, ice: Box<dyn IceProvider>, now: Instant) -> Self {
        let rng = StdRng::seed_from_u64(cfg.seed);
        Rooms {
            cfg,
            ice,
            rng,
            conns: IndexMap::default(),
            peers: IndexMap::new(),
            rooms: IndexMap::new(),
            tokens: HashMap::new(),
            deadlines: VecDeque::new(),
            out: VecDeque::new(),
            policy: Box::new(OpenPolicy),
            counters: Counters::default(),
            shutting_down: false,
            now,
            origin: now,
            encode_buf: String::new(),
        }
    }

    /// Replaces the default [`OpenPolicy`].
    pub fn with_policy(mut self, policy: Box<dyn JoinPolicy>) -> Self {
        self.policy = policy;
        self
    }

    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    /// Tells every connection the server is going away (`error` `server-shutdown`, then close 1001) and refuses
    /// joins from now on.
    pub fn shutdown(&mut self, now: Instant) {
        self.now = now;
        self.shutting_down = true;
        let conns: Vec<ConnId> = self.conns.iter().filter(|(_, c)| !c.closing).map(|(k, _)| *k).collect();
        for conn in conns {
            self.tell_shutdown(conn);
        }
    }

    /// `server-shutdown`, then close 1001.
    fn tell_shutdown(&mut self, conn: ConnId) {
        let e = ProtocolError::new(ErrorCode::ServerShutdown, "this server is shutting down; reconnect in a moment");
        self.push(conn, Arc::from(e.to_json()));
        self.close(conn, close::GOING_AWAY, "server shutting down");
    }

    /// `now` as a bucket time.
    fn nanos(&self, now: Instant) -> u64 {
        u64::try_from(now.saturating_duration_since(self.origin).as_nanos()).unwrap_or(u64::MAX)
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    pub fn stats(&self) -> Stats {
        Stats {
            connections: self.conns.len(),
            rooms: self.rooms.len(),
            peers: self.peers.len(),
            detached_peers: self.peers.values().filter(|p| p.conn.is_none()).count(),
        }
    }

    /// A new WebSocket. Admission limits (connections per server or IP) are the adapter's.
    pub fn connect(&mut self, conn: ConnId, now: Instant) {
        self.now = now;
        let burst = self.cfg.rate_per_sec * FLOOD_FACTOR;
        let t = self.nanos(now);
        self.conns.insert(
            conn,
            Conn {
                peer: None,
                out: Queue::default(),
                limit: self.cfg.max_queued,
                limit_bytes: self.cfg.max_queued_bytes,
                closing: false,
                rate: Bucket::full(burst, t),
                errors: Bucket::full(self.cfg.max_errors, t),
                sfu_only: false,
            },
        );
        // A WebSocket whose upgrade completed just as the shutdown began (its client already has the `101`) is
        // registered after `shutdown` went through the connections: it is told the same, not left to be cut off.
        if self.shutting_down {
            self.tell_shutdown(conn);
        }
    }

    /// [`Rooms::connect`] for a client that can only use the SFU (a WHIP publisher): its join moves the room to the
    /// SFU whatever its size, where every member speaks SFU, and is refused `needs-sfu` where one does not.
    pub fn connect_sfu_only(&mut self, conn: ConnId, now: Instant) {
        self.connect(conn, now);
        if let Some(c) = self.conns.get_mut(&conn) {
            c.sfu_only = true;
        }
    }

    /// A binary frame: the protocol is text only.
    pub fn binary(&mut self, conn: ConnId, len: usize, now: Instant) {
        self.now = now;
        if self.accepting(conn) {
            if len > self.cfg.max_message_size {
                return self.too_large(conn, len);
            }
            self.refuse(
                conn,
                ProtocolError::new(ErrorCode::BadJson, "binary frames are not part of the protocol; send JSON text"),
                now,
            );
        }
    }

    /// One text frame from a connection.
    pub fn message(&mut self, conn: ConnId, text: &str, now: Instant) {
        if let Some(j) = self.read(conn, text, now) {
            self.join(conn, j, now);
        }
    }

    /// [`Rooms::message`] but for a `join`, which is returned for the caller to decide (a layer around the core
    /// admits joins its own way: [`Rooms::may_join`] first).
    #[inline]
    pub fn read<'t>(&mut self, conn: ConnId, text: &'t str, now: Instant) -> Option<Join<'t>> {
        self.now = now;
        if !self.accepting(conn) {
            return None;
        }
        if text.len() > self.cfg.max_message_size {
            self.too_large(conn, text.len());
            return None;
        }
        let t = self.nanos(now);
        let c = self.conns.get_mut(&conn).expect("accepting() checked it");
        if !c.rate.take(t, self.cfg.rate_per_sec, self.cfg.rate_per_sec * FLOOD_FACTOR) {
            let (limit, ahead) = (self.cfg.rate_per_sec, self.cfg.rate_per_sec * FLOOD_FACTOR);
            let e = ProtocolError::new(
                ErrorCode::RateLimited,
                format!("more than {ahead} messages ahead of {limit} per second; closing"),
            );
            self.counters.errors[e.code] += 1;
            self.push(conn, Arc::from(e.to_json()));
            self.close(conn, close::POLICY, close::FLOODING);
            return None;
        }
        let parsed = parse_client(text);
        self.counters.messages[MessageKind::of(&parsed)] += 1;
        match parsed {
            Err(e) => self.refuse(conn, e, now),
            Ok(ClientMessage::Join(j)) => return Some(j),
            Ok(ClientMessage::Relay(r)) => self.relay(conn, r, now),
            Ok(ClientMessage::Bye) => self.bye(conn, now),
            Ok(ClientMessage::View(v)) => self.view(conn, v, now),
            Ok(ClientMessage::Data(d)) => self.data(conn, d, now),
            Ok(ClientMessage::Record(a)) => self.record(conn, a, now),
        }
        None
    }

    /// The connection is gone (closed by either side or dead). A joined session enters its resume grace period,
    /// keeping every frame not yet taken.
    pub fn disconnect(&mut self, conn: ConnId, now: Instant) {
        self.now = now;
        let Some(mut c) = self.conns.swap_remove(&conn) else { return };
        if let Some(id) = c.peer.take() {
            self.detach(&id, std::mem::take(&mut c.out), now);
        }
    }

    /// Expires sessions whose grace period is over.
    pub fn tick(&mut self, now: Instant) {
        self.now = now;
        while let Some((deadline, _, _)) = self.deadlines.front() {
            if *deadline > now {
                break;
            }
            let (_, id, epoch) = self.deadlines.pop_front().expect("front exists");
            let expired = self.peers.get(&id).is_some_and(|p| p.conn.is_none() && p.epoch == epoch);
            if expired {
                self.counters.expired += 1;
                self.leave(&id);
            }
        }
        self.shrink();
    }

    /// Gives back what the maps grew to under a peak once they are mostly empty, so memory returns to its
    /// baseline after load (a map keeps its largest capacity otherwise). Halving at a quarter full keeps it cheap.
    fn shrink(&mut self) {
        fn sparse(len: usize, cap: usize) -> bool {
            cap > 64 && len * 4 < cap
        }
        if sparse(self.conns.len(), self.conns.capacity()) {
            self.conns.shrink_to_fit();
        }
        if sparse(self.peers.len(), self.peers.capacity()) {
            self.peers.shrink_to_fit();
        }
        if sparse(self.rooms.len(), self.rooms.capacity()) {
            self.rooms.shrink_to_fit();
        }
        if sparse(self.tokens.len(), self.tokens.capacity()) {
            self.tokens.shrink_to_fit();
        }
        if sparse(self.deadlines.len(), self.deadlines.capacity()) {
            self.deadlines.shrink_to_fit();
        }
        if sparse(self.out.len(), self.out.capacity()) {
            self.out.shrink_to_fit();
        }
    }

    /// When `tick` has work next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.deadlines.front().map(|(d, _, _)| *d)
    }

    pub fn poll_output(&mut self) -> Option<Output> {
        self.out.pop_front()
    }

    /// Moves the connection's queued frames into `buf` (appending). Empty for unknown connections.
    pub fn take(&mut self, conn: ConnId, buf: &mut Vec<Frame>) {
        if let Some(c) = self.conns.get_mut(&conn) {
            // The queue's buffer goes too (not `drain`): an idle connection keeps no allocation here.
            buf.extend(std::mem::take(&mut c.out));
            c.limit = self.cfg.max_queued;
            c.limit_bytes = self.cfg.max_queued_bytes;
        }
    }

    /// Panics if the internal maps disagree (for fuzzing and tests): every member is a session of that room, every
    /// session is a member, connections and sessions point at each other, tokens match, rooms are within capacity
    /// and never empty, live queues are bounded.
    pub fn check_invariants(&self) {
        for (name, room) in &self.rooms {
            assert!(!room.members.is_empty(), "empty room {name} kept");
            let cap = if room.sfu { self.cfg.max_sfu_peers } else { self.cfg.max_peers };
            assert!(room.members.len() <= cap, "room {name} over capacity");
            for m in &room.members {
                assert_eq!(self.peers.get(m).map(|p| &p.room), Some(name), "member {m} of {name} is not its session");
            }
        }
        let members: usize = self.rooms.values().map(|r| r.members.len()).sum();
        assert_eq!(members, self.peers.len(), "sessions outside any room");
        for (id, p) in &self.peers {
            // A remote member's token is its host's.
            if !p.remote {
                assert_eq!(self.tokens.get(&p.token), Some(id), "token of {id} does not lead back");
            }
            if let Some(conn) = p.conn {
                let c = self.conns.get(&conn).expect("session points at a live connection");
                assert_eq!(c.peer.as_ref(), Some(id), "connection {conn} does not point back at {id}");
                assert!(p.pending.is_empty(), "a live session keeps no pending frames");
            } else {
                assert!(p.pending.len() <= self.cfg.max_queued * 2, "detached queue over its bound");
                assert!(
                    p.pending.bytes() <= self.cfg.max_queued_bytes * 2 + self.cfg.max_message_size * 4,
                    "detached queue over its byte bound"
                );
            }
        }
        let local = self.peers.values().filter(|p| !p.remote).count();
        assert_eq!(self.tokens.len(), local, "stale resume tokens");
        for (conn, c) in &self.conns {
            if let Some(id) = &c.peer {
                assert_eq!(self.peers.get(id).and_then(|p| p.conn), Some(*conn), "connection {conn} claims {id}");
            }
            assert!(c.closing || c.out.len() <= c.limit, "connection {conn} queue over its limit while open");
            assert!(
                c.closing || c.out.bytes() <= c.limit_bytes,
                "connection {conn} queue over its byte limit while open"
            );
            assert_eq!(c.out.bytes(), c.out.iter().map(|f| f.len()).sum::<usize>(), "byte count of {conn} drifted");
        }
    }

    /// The peer id a connection is joined as.
    pub fn peer_of(&self, conn: ConnId) -> Option<&str> {
        self.conns.get(&conn).and_then(|c| c.peer.as_deref())
    }

    /// Whether the core still reads from `conn` (it exists and is not closing).
    pub fn accepting(&self, conn: ConnId) -> bool {
        self.conns.get(&conn).is_some_and(|c| !c.closing)
    }

    fn too_large(&mut self, conn: ConnId, len: usize) {
        self.counters.errors[ErrorCode::TooLarge] += 1;
        let max = self.cfg.max_message_size;
        let e =
            ProtocolError::new(ErrorCode::TooLarge, format!("a frame of {len} bytes is over the limit of {max} bytes"));
        self.push(conn, Arc::from(e.to_json()));
        self.close(conn, close::TOO_BIG, "message too large");
    }

    /// `conn` hears `e`, which counts against its error budget: past [`Config::max_errors`] it is closed.
    pub fn refuse(&mut self, conn: ConnId, e: ProtocolError, now: Instant) {
        self.counters.errors[e.code] += 1;
        self.push(conn, Arc::from(e.to_json()));
        let max = self.cfg.max_errors;
        let t = self.nanos(now);
        let c = self.conns.get_mut(&conn).expect("refuse() is only called for live connections");
        if !c.errors.take(t, 1.0, max) {
            self.close(conn, close::POLICY, "too many errors");
        }
    }

    /// Stop reading from `conn`; its session (if any) is detached now so nothing more queues on the dying socket.
    fn close(&mut self, conn: ConnId, code: u16, reason: &'static str) {
        let Some(c) = self.conns.get_mut(&conn) else { return };
        if c.closing {
            return;
        }
        c.closing = true;
        self.out.push_back(Output::Close { conn, code, reason });
    }

    /// Queues a frame for a connection; a connection that lets its queue overflow is a slow reader and is cut off
    /// (its session keeps the frames for a resume).
    fn push(&mut self, conn: ConnId, frame: Frame) {
        let Some(c) = self.conns.get_mut(&conn) else { return };
        c.out.push_back(frame);
        if c.out.len() == 1 {
            self.out.push_back(Output::Wake(conn));
        }
        if (c.out.len() > c.limit || c.out.bytes() > c.limit_bytes) && !c.closing {
            c.closing = true;
            self.counters.slow_readers += 1;
            self.out.push_back(Output::Close { conn, code: close::POLICY, reason: "slow reader" });
            if let Some(id) = c.peer.take() {
                let queued = std::mem::take(&mut c.out);
                // The adapter will disconnect it; the grace period starts now.
                let now = self.now;
                self.detach(&id, queued, now);
            }
        }
    }

    /// Delivers a frame to a session, live or detached. `false`: the session is gone (or just ended because it
    /// missed too much while detached to be resumed faithfully), and the frame was not accepted.
    fn deliver(&mut self, id: &str, frame: Frame) -> bool {
        let Some(p) = self.peers.get_mut(id) else { return false };
        if p.remote {
            let to = self.peers.get_key_value(id).expect("just found").0.clone();
            self.out.push_back(Output::Forward { to, frame });
            return true;
        }
        match p.conn {
            Some(conn) => self.push(conn, frame),
            None if p.pending.len() >= self.cfg.max_queued * 2
                || p.pending.bytes() >= self.cfg.max_queued_bytes * 2 =>
            {
                let id: Arc<str> = Arc::from(id);
                self.leave(&id);
                return false;
            }
            None => p.pending.push_back(frame),
        }
        true
    }

    fn detach(&mut self, id: &Arc<str>, unsent: Queue, now: Instant) {
        let grace = self.cfg.resume_grace;
        let Some(p) = self.peers.get_mut(id) else { return };
        p.conn = None;
        p.epoch += 1;
        let mut pending = unsent;
        pending.extend(p.pending.drain(..));
        p.pending = pending;
        // What a closing connection still had queued may exceed a detached session's bound: such a session is
        // ended as a slow reader would be (its room is told), rather than kept with an unbounded queue.
        let over = p.pending.len() > self.cfg.max_queued * 2 || p.pending.bytes() > self.cfg.max_queued_bytes * 2;
        if grace.is_zero() || over {
            self.leave(id);
        } else {
            self.deadlines.push_back((now + grace, id.clone(), p.epoch));
        }
    }

    /// `len` (at most 24) characters from the core's seeded RNG ([`webcall_protocol::fill_id`]). Built on the
    /// stack, so the id costs one allocation.
    fn new_id(&mut self, len: usize) -> Arc<str> {
        let mut buf = [0u8; 24];
        Arc::from(webcall_protocol::fill_id(&mut buf[..len], || self.rng.next_u64()))
    }

    fn new_token(&mut self, id: &Arc<str>) -> Arc<str> {
        let token = self.new_id(24);
        self.tokens.insert(token.clone(), id.clone());
        token
    }

    fn others(&self, room: &str, except: &str) -> Vec<PeerInfo> {
        self.rooms
            .get(room)
            .map(|r| {
                r.members
                    .iter()
                    .filter(|m| &***m != except)
                    .map(|m| PeerInfo { id: m.to_string(), name: self.peers[m].name.to_string() })
                    .collect()
            })
            .unwrap_or_default()
    }

    fn welcome(&mut self, conn: ConnId, id: &Arc<str>, resumed: bool) {
        let p = &self.peers[id];
        let (room, token, publish) = (p.room.clone(), p.token.clone(), p.publish);
        let peers = self.others(&room, id);
        let ice = self.ice.ice_servers(id);
        let frame = encode_welcome(id, &room, &peers, &ice, &token, resumed, publish);
        self.push(conn, Arc::from(frame));
    }

    /// The checks every join takes, wherever it is admitted: `false` when `conn` was refused.
    pub fn may_join(&mut self, conn: ConnId, now: Instant) -> bool {
        if let Some(id) = self.conns[&conn].peer.clone() {
            let room = &self.peers[&id].room;
            let e = ProtocolError::new(ErrorCode::AlreadyJoined, format!("already in room '{room}'; send bye first"));
            self.refuse(conn, e.refers_to("join"), now);
            return false;
        }
        if self.shutting_down {
            let e =
                ProtocolError::new(ErrorCode::ServerShutdown, "this server is shutting down; reconnect in a moment");
            self.refuse(conn, e.refers_to("join"), now);
            return false;
        }
        true
    }

    fn join(&mut self, conn: ConnId, j: Join<'_>, now: Instant) {
        if !self.may_join(conn, now) {
            return;
        }
        if let Some(token) = j.resume.as_deref() {
            if let Some(id) = self.tokens.get(token).cloned() {
                if *self.peers[&id].room == *j.room {
                    self.counters.resumes += 1;
                    return self.resume(conn, id, token);
                }
            }
        }
        let admission = match self.policy.admit(conn, &j) {
            Ok(a) => a,
            Err(e) => return self.refuse(conn, e.refers_to("join"), now),
        };
        // One lookup of the room serves every check and the insert below (nothing else changes the rooms here).
        let existing = self.rooms.get_index_of(&*j.room);
        if let Some(i) = existing {
            let t = self.nanos(now);
            let (cap, per_sec) = (self.cfg.password_attempts_per_min, self.cfg.password_attempts_per_min / 60.0);
            let r = &mut self.rooms[i];
            if let Some((salt, hash)) = &r.password {
                // Guesses are limited per room, whoever makes them: while the budget is spent, every password is
                // refused unchecked (a right one too, or guessing from many addresses would go on).
                if j.password.is_some() {
                    let wait = r.guesses.wait(t, per_sec, cap);
                    if wait > 0.0 {
                        let e = ProtocolError::new(
                            ErrorCode::RateLimited,
                            format!(
                                "too many wrong passwords for room '{}'; try again in {} s",
                                j.room,
                                wait.ceil() as u64
                            ),
                        );
                        return self.refuse(conn, e.refers_to("join"), now);
                    }
                }
                let given = j.password.as_deref().unwrap_or("");
                if !bool::from(password_hash(salt, given).ct_eq(hash)) {
                    if j.password.is_some() {
                        r.guesses.take(t, per_sec, cap);
                    }
                    let what = if j.password.is_some() { "wrong password" } else { "this room needs a password" };
                    let e = ProtocolError::new(ErrorCode::Unauthorized, format!("{what} for room '{}'", j.room));
                    return self.refuse(conn, e.refers_to("join"), now);
                }
            }
            let n = r.members.len();
            let r = &self.rooms[i];
            let forced = self.conns[&conn].sfu_only && self.cfg.topology != Topology::Mesh;
            let sfu = r.sfu || self.moves_to_sfu(r, j.sfu) || (forced && r.members.iter().all(|m| self.peers[m].sfu));
            if self.conns[&conn].sfu_only && !sfu {
                let e = ProtocolError::new(
                    ErrorCode::NeedsSfu,
                    format!("room '{}' is peer-to-peer with a client that does not speak SFU; try later", j.room),
                );
                return self.refuse(conn, e.refers_to("join"), now);
            }
            if sfu && !j.sfu {
                let e = ProtocolError::new(
                    ErrorCode::NeedsSfu,
                    format!("room '{}' sends media through the server; join with \"sfu\":true", j.room),
                );
                return self.refuse(conn, e.refers_to("join"), now);
            }
            let cap = if sfu { self.cfg.max_sfu_peers } else { self.cfg.max_peers };
            if n >= cap {
                let e = ProtocolError::new(
                    ErrorCode::RoomFull,
                    format!("room '{}' is full ({} of {} peers)", j.room, n, cap),
                );
                return self.refuse(conn, e.refers_to("join"), now);
            }
        } else if self.cfg.topology == Topology::Sfu && !j.sfu {
            let e = ProtocolError::new(
                ErrorCode::NeedsSfu,
                "this server sends all media through its SFU; join with \"sfu\":true",
            );
            return self.refuse(conn, e.refers_to("join"), now);
        } else if self.rooms.len() >= self.cfg.max_rooms {
            let e = ProtocolError::new(ErrorCode::ServerFull, "this server has no room for another room; try later");
            return self.refuse(conn, e.refers_to("join"), now);
        }
        let id: Arc<str> = loop {
            let candidate = self.new_id(10);
            if !self.peers.contains_key(&candidate) {
                break candidate;
            }
        };
        let token = self.new_token(&id);
        let (room_index, room) = match existing {
            Some(i) => (i, self.rooms.get_index(i).expect("found above").0.clone()),
            None => {
                // The first joiner may lock the room with a password.
                let password = j.password.as_deref().map(|p| {
                    let salt: [u8; 16] = self.rng.random();
                    (salt, password_hash(&salt, p))
                });
                let room: Arc<str> = Arc::from(&*j.room);
                let mut created = Room::new(password, self.cfg.password_attempts_per_min, self.nanos(now));
                created.sfu = self.cfg.topology == Topology::Sfu || self.conns[&conn].sfu_only;
                (self.rooms.insert_full(room.clone(), created).0, room)
            }
        };
        let name: Arc<str> = Arc::from(admission.name.as_deref().unwrap_or(&j.name));
        self.peers.insert(
            id.clone(),
            Peer {
                name: name.clone(),
                room: room.clone(),
                conn: Some(conn),
                token,
                pending: Queue::default(),
                epoch: 0,
                publish: admission.publish,
                remote: false,
                sfu: j.sfu,
                record: if admission.record { RecordGrant::Granted } else { RecordGrant::NotGranted },
            },
        );
        let switched = {
            let r = &self.rooms[room_index];
            !r.sfu && (self.moves_to_sfu(r, j.sfu) || self.conns[&conn].sfu_only)
        };
        let members = &mut self.rooms[room_index].members;
        // Exact: most rooms hold two peers, and `push` alone would make room for four.
        members.reserve_exact(1);
        members.push(id.clone());
        self.counters.joins += 1;
        self.conns.get_mut(&conn).expect("live").peer = Some(id.clone());
        self.welcome(conn, &id, false);
        if switched {
            self.switch_to_sfu(&room, &id);
        }
        if self.rooms[room_index].sfu {
            self.push(conn, Arc::from(encode_topology_sfu()));
        }
        if self.rooms[room_index].recording {
            self.push(conn, Arc::from(encode_recording(true, None)));
        }
        let hello: Frame = Arc::from(encode_hello(&id, &name));
        self.broadcast(&room, &id, hello);
    }

    /// `auto`: a room of two SFU-speaking peers moves to the SFU when a third one that speaks it joins.
    fn moves_to_sfu(&self, r: &Room, joiner_sfu: bool) -> bool {
        self.cfg.topology == Topology::Auto
            && joiner_sfu
            && r.members.len() >= 2
            && r.members.iter().all(|m| self.peers[m].sfu)
    }

    /// Frames from the SFU for a peer (its offers and answers). `false`: the peer is gone.
    pub fn sfu_frame(&mut self, peer: &str, frame: Frame) -> bool {
        self.deliver(peer, frame)
    }

    /// May someone watch `room`'s media without joining (WHEP)? It must be an SFU room, and its password (if any)
    /// given; wrong passwords count against the room's guess budget as joins do. `Ok`: the ICE servers to use.
    pub fn admit_viewer(
        &mut self,
        room: &str,
        password: Option<&str>,
        viewer: &str,
        now: Instant,
    ) -> Result<Vec<IceServer>, WatchRefusal> {
        self.now = now;
        let t = self.nanos(now);
        let (cap, per_sec) = (self.cfg.password_attempts_per_min, self.cfg.password_attempts_per_min / 60.0);
        let Some(r) = self.rooms.get_mut(room) else { return Err(WatchRefusal::NoRoom) };
        if let Some((salt, hash)) = &r.password {
            let wait = r.guesses.wait(t, per_sec, cap);
            if password.is_some() && wait > 0.0 {
                let secs = wait.ceil() as u64;
                let e = format!("too many wrong passwords for room '{room}'; try again in {secs} s");
                return Err(WatchRefusal::Refused(ProtocolError::new(ErrorCode::RateLimited, e)));
            }
            if !bool::from(password_hash(salt, password.unwrap_or("")).ct_eq(hash)) {
                if password.is_some() {
                    r.guesses.take(t, per_sec, cap);
                }
                let what = if password.is_some() { "wrong password" } else { "this room needs a password" };
                let e = ProtocolError::new(ErrorCode::Unauthorized, format!("{what} for room '{room}'"));
                return Err(WatchRefusal::Refused(e));
            }
        }
        if !r.sfu {
            return Err(WatchRefusal::NotSfu);
        }
        Ok(self.ice.ice_servers(viewer))
    }

    /// Whether `room` sends media through the SFU.
    pub fn room_is_sfu(&self, room: &str) -> bool {
        self.rooms.get(room).is_some_and(|r| r.sfu)
    }

    fn resume(&mut self, conn: ConnId, id: Arc<str>, old_token: &str) {
        self.tokens.remove(old_token);
        let new_token = self.new_token(&id);
        self.resume_with(conn, id, new_token);
    }

    fn resume_with(&mut self, conn: ConnId, id: Arc<str>, new_token: Arc<str>) {
        let old_conn = {
            let p = self.peers.get_mut(&id).expect("token points at a live session");
            p.token = new_token;
            p.conn.replace(conn)
        };
        // The old socket may still look alive (the server has not noticed it died): replace it, keeping what it
        // had not written yet ahead of anything queued since.
        let mut backlog = match old_conn.filter(|&c| c != conn) {
            Some(old) => self.release_resumed(old),
            None => Queue::default(),
        };
        let p = self.peers.get_mut(&id).expect("live");
        p.epoch += 1; // cancels the pending expiry
        backlog.extend(p.pending.drain(..));
        self.seat_on(conn, &id, true, backlog);
    }

    /// A session's old connection, now that the session lives on elsewhere: detached from it, closed (`resumed
    /// elsewhere`), and what it had not written yet returned, to go first on the session's new way out.
    fn release_resumed(&mut self, old: ConnId) -> Queue {
        let mut unsent = Queue::default();
        if let Some(c) = self.conns.get_mut(&old) {
            c.peer = None;
            unsent = std::mem::take(&mut c.out);
        }
        self.close(old, close::RESUMED_ELSEWHERE, "resumed elsewhere");
        unsent
    }

    /// Joins session `id` (already pointing at `conn`) to `conn`: `welcome`, the room's state, then `backlog`,
    /// which the connection's bounds make room for.
    fn seat_on(&mut self, conn: ConnId, id: &Arc<str>, resumed: bool, backlog: Queue) {
        let c = self.conns.get_mut(&conn).expect("live");
        c.peer = Some(id.clone());
        c.limit = self.cfg.max_queued + backlog.len() + 1;
        c.limit_bytes = self.cfg.max_queued_bytes + backlog.bytes() + 1;
        self.welcome(conn, id, resumed);
        let room = self.peers[id].room.clone();
        if self.room_is_sfu(&room) {
            self.push(conn, Arc::from(encode_topology_sfu()));
        }
        if self.rooms.get(&room).is_some_and(|r| r.recording) {
            self.push(conn, Arc::from(encode_recording(true, None)));
        }
        for frame in backlog {
            self.push(conn, frame);
        }
    }

    fn relay(&mut self, conn: ConnId, r: Relay<'_>, now: Instant) {
        let ty = r.kind.as_str();
        let Some(from) = self.conns[&conn].peer.clone() else {
            let e = ProtocolError::new(ErrorCode::NotJoined, format!("join a room before sending '{ty}'"));
            return self.refuse(conn, e.refers_to(ty), now);
        };
        let room = self.peers[&from].room.clone();
        if *r.to == *SFU_PEER && self.room_is_sfu(&room) {
            if r.kind != webcall_protocol::RelayKind::Candidate && !self.peers[&from].publish {
                if let Some(why) = sdp_refusal(r.payload) {
                    let e = ProtocolError::new(
                        ErrorCode::Unauthorized,
                        format!(
                            "your token is subscribe-only: {why}; mark audio and video recvonly (or inactive), once"
                        ),
                    );
                    return self.refuse(conn, e.refers_to(ty), now);
                }
            }
            let payload = r.payload.get().to_owned();
            self.out.push_back(Output::Sfu(SfuRequest::Signal { room, peer: from, kind: r.kind, payload }));
            return;
        }
        let target = self.peers.get_key_value(&*r.to).filter(|(k, p)| p.room == room && **k != from);
        let Some((to, _)) = target else {
            let shown: String = r.to.chars().take(64).collect();
            let e = ProtocolError::new(ErrorCode::UnknownPeer, format!("no peer '{shown}' in room '{room}'"));
            return self.refuse(conn, e.refers_to(ty), now);
        };
        let to = to.clone();
        if r.kind != webcall_protocol::RelayKind::Candidate && !self.peers[&from].publish {
            if let Some(why) = sdp_refusal(r.payload) {
                let e = ProtocolError::new(
                    ErrorCode::Unauthorized,
                    format!("your token is subscribe-only: {why}; mark audio and video recvonly (or inactive), once"),
                );
                return self.refuse(conn, e.refers_to(ty), now);
            }
        }
        r.encode_from_into(&mut self.encode_buf, &from);
        let frame = Arc::from(self.encode_buf.as_str());
        if self.encode_buf.capacity() > ENCODE_BUF_KEEP {
            self.encode_buf = String::new();
        }
        if !self.deliver(&to, frame) {
            let e = ProtocolError::new(ErrorCode::UnknownPeer, format!("peer '{to}' has left room '{room}'"));
            self.refuse(conn, e.refers_to(ty), now);
        }
    }

    /// `data` in an SFU room goes to every other member (there is no data channel between peers there).
    fn data(&mut self, conn: ConnId, d: &serde_json::value::RawValue, now: Instant) {
        let Some(from) = self.conns[&conn].peer.clone() else {
            let e = ProtocolError::new(ErrorCode::NotJoined, "join a room before sending 'data'");
            return self.refuse(conn, e.refers_to("data"), now);
        };
        let room = self.peers[&from].room.clone();
        if !self.room_is_sfu(&room) {
            let e = ProtocolError::new(
                ErrorCode::NeedsSfu,
                format!("room '{room}' is peer-to-peer: send this over the data channel of each peer connection"),
            );
            return self.refuse(conn, e.refers_to("data"), now);
        }
        self.broadcast_all(&room, &from, Arc::from(webcall_protocol::encode_data(&from, d)));
    }

    /// Starts (`start`) or stops recording `room` for `by` (a peer id, or `api`): the SFU is asked and every
    /// member is told (`recording`). `Ok(false)`: it already was (or was not) being recorded; nothing changes.
    pub fn set_recording(&mut self, room: &str, start: bool, by: &str, now: Instant) -> Result<bool, RecordRefusal> {
        self.now = now;
        if !self.cfg.recording {
            return Err(RecordRefusal::Off);
        }
        let Some(r) = self.rooms.get(room) else { return Err(RecordRefusal::NoRoom(room.to_owned())) };
        let room: Arc<str> = self.rooms.get_key_value(room).expect("found above").0.clone();
        if !r.sfu {
            // `auto`: a room of SFU-speaking members (pages) moves to the SFU to be recorded, as at a third joiner.
            let movable = self.cfg.topology == Topology::Auto
                && r.members.len() <= self.cfg.max_sfu_peers
                && r.members.iter().all(|m| self.peers[m].sfu);
            if !start || !movable {
                return Err(RecordRefusal::NotSfu(room.to_string()));
            }
            self.rooms.get_mut(&room).expect("found above").sfu = true;
            self.broadcast(&room, "", Arc::from(encode_topology_sfu()));
        }
        let r = self.rooms.get_mut(&room).expect("found above");
        if r.recording == start {
            return Ok(false);
        }
        r.recording = start;
        self.out.push_back(Output::Sfu(SfuRequest::Record { room: room.clone(), start }));
        self.broadcast(&room, "", Arc::from(encode_recording(start, Some(by))));
        Ok(true)
    }

    /// Whether `room` is being recorded.
    pub fn is_recording(&self, room: &str) -> bool {
        self.rooms.get(room).is_some_and(|r| r.recording)
    }

    /// `record` from a member that may (see [`Admission::record`]).
    fn record(&mut self, conn: ConnId, action: RecordAction, now: Instant) {
        let Some(peer) = self.conns[&conn].peer.clone() else {
            let e = ProtocolError::new(ErrorCode::NotJoined, "join a room before sending 'record'");
            return self.refuse(conn, e.refers_to("record"), now);
        };
        match self.peers[&peer].record {
            RecordGrant::Granted => {}
            // With --redis nobody may (the cluster layer's sessions carry this): say why first.
            RecordGrant::Clustered => return self.refuse(conn, RecordRefusal::Clustered.to_protocol(), now),
            RecordGrant::NotGranted => {
                let e = ProtocolError::new(
                    ErrorCode::Unauthorized,
                    "your join token does not grant 'record'; ask for one minted with --record",
                );
                return self.refuse(conn, e.refers_to("record"), now);
            }
        }
        let room = self.peers[&peer].room.clone();
        let start = action == RecordAction::Start;
        match self.set_recording(&room, start, &peer, now) {
            // Nothing changed: the sender still hears how things are.
            Ok(false) => self.push(conn, Arc::from(encode_recording(start, None))),
            Ok(true) => {}
            Err(e) => self.refuse(conn, e.to_protocol(), now),
        }
    }

    /// `view` goes to the SFU of the peer's room; outside an SFU room it is refused.
    fn view(&mut self, conn: ConnId, tracks: Vec<webcall_protocol::TrackView>, now: Instant) {
        let Some(peer) = self.conns[&conn].peer.clone() else {
            let e = ProtocolError::new(ErrorCode::NotJoined, "join a room before sending 'view'");
            return self.refuse(conn, e.refers_to("view"), now);
        };
        let room = self.peers[&peer].room.clone();
        if !self.room_is_sfu(&room) {
            // As for `data`: the room's topology, not the message, is what does not fit.
            let e = ProtocolError::new(ErrorCode::NeedsSfu, "'view' is for SFU rooms; this room is peer-to-peer");
            return self.refuse(conn, e.refers_to("view"), now);
        }
        self.out.push_back(Output::Sfu(SfuRequest::View { room, peer, tracks }));
    }

    fn bye(&mut self, conn: ConnId, now: Instant) {
        let Some(id) = self.conns.get_mut(&conn).and_then(|c| c.peer.take()) else {
            let e = ProtocolError::new(ErrorCode::NotJoined, "not in a room");
            return self.refuse(conn, e.refers_to("bye"), now);
        };
        self.leave(&id);
    }

    /// Ends a session: frees its seat and tells the room.
    fn leave(&mut self, id: &Arc<str>) {
        let Some(p) = self.peers.swap_remove(id) else { return };
        // A remote member's host ends its media session and tells the others.
        if !p.remote {
            if self.room_is_sfu(&p.room) {
                self.out.push_back(Output::Sfu(SfuRequest::Leave { room: p.room.clone(), peer: id.clone() }));
            }
            self.out.push_back(Output::Left { id: id.clone(), room: p.room.clone() });
        }
        self.tokens.remove(&p.token);
        if let Some(conn) = p.conn {
            if let Some(c) = self.conns.get_mut(&conn) {
                c.peer = None;
            }
        }
        let now_empty = match self.rooms.get_mut(&p.room) {
            Some(r) => {
                r.members.retain(|m| m != id);
                r.members.is_empty()
            }
            None => false,
        };
        if now_empty {
            if self.rooms.swap_remove(&p.room).is_some_and(|r| r.recording) {
                self.out.push_back(Output::Sfu(SfuRequest::Record { room: p.room.clone(), start: false }));
            }
        } else if !self.has_local_members(&p.room) {
            // Only remote members are left (on a single node every member is local, and the check stops at the
            // first): nobody here cares about this room any more.
            self.forget_room(&p.room);
        } else {
            self.broadcast(&p.room, id, Arc::from(encode_bye(id)));
        }
    }

    /// Drops a room that has only remote members left.
    fn forget_room(&mut self, room: &str) {
        if let Some(r) = self.rooms.swap_remove(room) {
            for m in r.members {
                self.peers.swap_remove(&m);
            }
        }
    }

    /// Makes `token` the resume token of local session `id`.
    fn set_token(&mut self, id: &Arc<str>, token: Arc<str>) {
        let p = self.peers.get_mut(id).expect("a live session");
        self.tokens.remove(&p.token);
        self.tokens.insert(token.clone(), id.clone());
        p.token = token;
    }

    fn broadcast(&mut self, room: &str, except: &str, frame: Frame) {
        // Remote members hear of joins, leaves and topology from their own host, not from here.
        self.broadcast_to(room, except, frame, false);
    }

    /// To every other member, remote ones too (`data`).
    fn broadcast_all(&mut self, room: &str, except: &str, frame: Frame) {
        self.broadcast_to(room, except, frame, true);
    }

    fn broadcast_to(&mut self, room: &str, except: &str, frame: Frame, remote: bool) {
        let Some(r) = self.rooms.get(room) else { return };
        let targets: Vec<Arc<str>> =
            r.members.iter().filter(|m| &***m != except && (remote || !self.peers[*m].remote)).cloned().collect();
        for t in targets {
            self.deliver(&t, frame.clone());
        }
    }
}

mod layer;
pub use layer::{Member, Seat};

#[cfg(any(test, feature = "harness"))]
pub mod harness;

#[cfg(test)]
mod tests;
