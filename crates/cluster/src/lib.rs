//! Several `webcall serve` nodes sharing rooms through Redis (see `docs/cluster.md`).
//!
//! [`ClusterRouter`] is a [`Router`] like `LocalRouter`: the same sans-IO core (in cluster mode) handles this
//! node's connections, while Redis holds what must be cluster-wide (seats, membership, resume tokens, which node
//! hosts which peer) and carries events between nodes, one channel per node. Messages between peers on different
//! nodes travel on `links` (module): sequenced, acknowledged and replayed from the sender's buffer, so a Redis blip,
//! restart or failover delays them but loses nothing.

mod layer;
mod links;
mod scripts;

pub use layer::{AdmitKind, Admitted, ClusterOutput, ClusterRooms, LocalSession};

use redis::aio::ConnectionManager;
use redis::Value;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use webcall_protocol::{ErrorCode, PeerInfo, ProtocolError};
use webcall_protocol::{RelayKind, TrackView};
use webcall_rooms::{ConnId, Counters, Frame, IceProvider, JoinPolicy, SfuRequest, Stats, Topology};
use webcall_server::router::{shrink_sparse, ConnSignal, Core, Driver, Layer, Router};
use webcall_server::sfu::SfuSink;

/// How long a session resumed from another node waits for that node's queue before it is welcomed without it.
const HANDOVER_WAIT: Duration = Duration::from_secs(2);
/// A join whose admission never arrived (lost in a Redis blip) is refused after this long.
const JOIN_WAIT: Duration = Duration::from_secs(5);
/// Longest time a Redis call may take before the node counts Redis as unavailable.
const REDIS_TIMEOUT: Duration = Duration::from_secs(2);
/// Commands sent to Redis in one pipeline at most.
const MAX_BATCH: usize = 512;
/// A node missing from the registry and silent on its link this long (while Redis answers, after this node has
/// answered for a TTL) is gone: its links, their buffers and its peers go.
const FORGET_AFTER_TTLS: u32 = 2;
/// Frames from other nodes waiting for a local connection to drain, per peer at most (a replay after a blip
/// arrives all at once; a client that reads gets it all, one that does not is cut off as a slow reader).
const INBOUND_MAX_FRAMES: usize = 8192;
const INBOUND_MAX_BYTES: usize = 4 << 20;

#[derive(Debug, Clone)]
pub struct ClusterConfig {
    /// `redis://host:port/db` or `redis+sentinel://host:port,host2:port/service` (`--redis`).
    pub redis_url: String,
    /// This node's name in the cluster (`--node-id`): unique among live nodes.
    pub node_id: String,
    /// A node silent this long is presumed dead and its sessions end (`--node-ttl`).
    pub node_ttl: Duration,
    /// Bytes of cross-node messages kept for replay until the receiving node acknowledges them
    /// (`--replay-limit`). Past it, relays to other nodes are refused with `unavailable`.
    pub replay_limit: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error(
        "--redis {url} is not a Redis URL: {reason} (write e.g. redis://127.0.0.1:6379 or \
         redis+sentinel://127.0.0.1:26379,127.0.0.2:26379/mymaster)"
    )]
    Url { url: String, reason: String },
    #[error("cannot reach Redis at {url}: {source} (is it running? check --redis)")]
    Connect { url: String, source: redis::RedisError },
    #[error("node id {0:?} is taken by a live node; give each node its own --node-id (or leave it unset)")]
    NodeIdTaken(String),
    #[error("--node-id {0:?} is not valid: use 1-64 characters of A-Z a-z 0-9 _ -")]
    BadNodeId(String),
    #[error("--node-ttl {0:?} is out of range: 300ms to 10m")]
    BadTtl(Duration),
}

/// A random node id, for nodes started without `--node-id`.
pub fn random_node_id() -> String {
    use rand::Rng;
    const A: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut r = rand::rng();
    (0..12).map(|_| A[r.random_range(0..A.len())] as char).collect()
}

/// Where the primary is: a fixed address, or whatever the sentinels say now.
enum Backend {
    Direct(redis::Client),
    Sentinel { sentinels: Vec<String>, service: String },
}

impl Backend {
    fn parse(url: &str) -> Result<Backend, ClusterError> {
        let bad = |reason: String| ClusterError::Url { url: url.to_owned(), reason };
        let Some(rest) = url.strip_prefix("redis+sentinel://") else {
            return redis::Client::open(url).map(Backend::Direct).map_err(|e| bad(e.to_string()));
        };
        let (hosts, service) = rest.split_once('/').ok_or_else(|| bad("no service name after the hosts".into()))?;
        let service = service.trim_end_matches('/');
        if service.is_empty() || service.contains('/') {
            return Err(bad("the path must be the sentinel service name, e.g. /mymaster".into()));
        }
        let sentinels: Vec<String> =
            hosts.split(',').filter(|h| !h.is_empty()).map(|h| format!("redis://{h}")).collect();
        if sentinels.is_empty() {
            return Err(bad("no sentinel host".into()));
        }
        for s in &sentinels {
            redis::Client::open(s.as_str()).map_err(|e| bad(format!("{s}: {e}")))?;
        }
        Ok(Backend::Sentinel { sentinels, service: service.to_owned() })
    }

    /// A client for the current primary.
    async fn client(&self) -> redis::RedisResult<redis::Client> {
        match self {
            Backend::Direct(c) => Ok(c.clone()),
            Backend::Sentinel { sentinels, service } => {
                use redis::sentinel::{SentinelClient, SentinelServerType};
                let mut s = SentinelClient::build(
                    sentinels.iter().map(String::as_str).collect(),
                    service.clone(),
                    None,
                    SentinelServerType::Master,
                )?;
                tokio::time::timeout(REDIS_TIMEOUT, s.async_get_client())
                    .await
                    .map_err(|_| redis::RedisError::from((redis::ErrorKind::IoError, "sentinels timed out")))?
            }
        }
    }

    fn follows_failover(&self) -> bool {
        matches!(self, Backend::Sentinel { .. })
    }
}

enum Cmd {
    Join {
        conn: ConnId,
        room: String,
        args: Vec<String>,
        refused: Option<ProtocolError>,
        max: usize,
    },
    Leave {
        id: Arc<str>,
    },
    /// A link message (replayed by the links if lost).
    Publish {
        node: String,
        payload: Arc<str>,
    },
    /// Graceful shutdown: end this node's sessions now.
    ReapSelf,
    /// A node gone from the registry for good (Redis lost it and it never came back): end what the store still
    /// names it for (the SFU rooms a restore put back under it move to a live node).
    ReapGone(String),
}

/// Messages for a peer that moved to another node, held until everything sent to its old node is settled there
/// (delivered, or returned to us), so that nothing overtakes what comes back.
struct Hold {
    node: String,
    until: u64,
    queue: VecDeque<Frame>,
}

/// The cluster layer around the room core: what the node knows of the other nodes, and its links to them.
struct ClusterState {
    shared: Arc<Shared>,
    tx: mpsc::UnboundedSender<Cmd>,
    /// Sessions resumed from another node, since when they wait for the hand-over.
    awaiting: HashMap<String, Instant>,
    /// Joins out for admission, since when.
    joins: HashMap<ConnId, Instant>,
    links: links::Links,
    /// Node of each remote member.
    routes: HashMap<String, String>,
    held: HashMap<String, Hold>,
    /// Local sessions resumed on another node: where messages that still come here go.
    moved: HashMap<String, (String, Instant)>,
    /// Password digests of rooms joined here, to put back if the store lost them.
    passwords: HashMap<String, String>,
    /// Per local peer: frames from other nodes waiting for its connection to drain, and their bytes.
    inbound: HashMap<String, (VecDeque<Frame>, usize)>,
    /// The node whose SFU carries each SFU room this node knows of (see `docs/cluster.md`, *SFU rooms*).
    owners: HashMap<String, String>,
    /// Peers this node's SFU serves: their room and the node that hosts them (where its frames for them go).
    served: HashMap<Arc<str>, (Arc<str>, String)>,
    /// Requests from other nodes' peers for this node's SFU.
    sfu_in: VecDeque<SfuRequest>,
    /// When `routes` was last pruned.
    pruned: Instant,
}

struct Shared {
    cfg: ClusterConfig,
    backend: Backend,
    /// The connection to the current primary; `None` when it must be looked up again (after a failover).
    con: tokio::sync::Mutex<Option<ConnectionManager>>,
    max_peers: usize,
    max_sfu_peers: usize,
    topology: Topology,
    /// Wrong passwords a room takes per minute, cluster-wide (`--max-password-attempts`).
    password_attempts: u64,
    scripts: scripts::Scripts,
    /// Redis answered the last liveness refresh and this node's registration holds.
    registered: AtomicBool,
    /// The channel subscription is up.
    subscribed: AtomicBool,
    /// The subscription was down: events may be missing, so membership is read again.
    needs_resync: AtomicBool,
    stopping: AtomicBool,
}

impl Shared {
    async fn connection(&self) -> redis::RedisResult<ConnectionManager> {
        let mut con = self.con.lock().await;
        if let Some(c) = &*con {
            return Ok(c.clone());
        }
        let client = self.backend.client().await?;
        let cfg = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(REDIS_TIMEOUT)
            .set_response_timeout(REDIS_TIMEOUT)
            .set_number_of_retries(1)
            .set_max_delay(500);
        let c = tokio::time::timeout(REDIS_TIMEOUT * 2, ConnectionManager::new_with_config(client, cfg))
            .await
            .map_err(|_| redis::RedisError::from((redis::ErrorKind::IoError, "connecting timed out")))??;
        *con = Some(c.clone());
        Ok(c)
    }

    /// Redis answers, this node is registered and subscribed, and not stopping.
    fn healthy(&self) -> bool {
        self.registered.load(Ordering::SeqCst)
            && self.subscribed.load(Ordering::SeqCst)
            && !self.stopping.load(Ordering::SeqCst)
    }

    /// After an error: with Sentinel, ask again where the primary is (it may have failed over, or the old one
    /// came back as a replica and refuses writes).
    async fn failed(&self) {
        if self.backend.follows_failover() {
            *self.con.lock().await = None;
        }
    }
}

pub struct ClusterRouter {
    driver: Driver<ClusterRooms, ClusterState>,
    shared: Arc<Shared>,
    tx: mpsc::UnboundedSender<Cmd>,
}

fn unavailable(what: &str) -> ProtocolError {
    ProtocolError::new(
        ErrorCode::Unavailable,
        format!("the room service is unavailable ({what}); try again in a moment"),
    )
}

fn timed_out() -> redis::RedisError {
    redis::RedisError::from((redis::ErrorKind::IoError, "timed out"))
}

/// "id\x1fname\x1fnode" records separated by \x1e.
fn parse_snapshot(s: &str) -> Vec<(PeerInfo, &str)> {
    s.split('\x1e')
        .filter(|p| !p.is_empty())
        .filter_map(|p| {
            let mut f = p.splitn(3, '\x1f');
            let (id, name, node) = (f.next()?, f.next()?, f.next().unwrap_or(""));
            Some((PeerInfo { id: id.to_owned(), name: name.to_owned() }, node))
        })
        .collect()
}

impl ClusterRouter {
    /// Connects to Redis, registers the node and starts its tasks. Fails if Redis cannot be reached now.
    pub async fn start(
        rooms_cfg: webcall_rooms::Config,
        ice: Box<dyn IceProvider>,
        policy: Box<dyn JoinPolicy>,
        cfg: ClusterConfig,
    ) -> Result<Arc<ClusterRouter>, ClusterError> {
        if cfg.node_id.is_empty() || !webcall_protocol::valid_room_name(&cfg.node_id) {
            return Err(ClusterError::BadNodeId(cfg.node_id));
        }
        if cfg.node_ttl < Duration::from_millis(300) || cfg.node_ttl > Duration::from_secs(600) {
            return Err(ClusterError::BadTtl(cfg.node_ttl));
        }
        let url = cfg.redis_url.clone();
        let backend = Backend::parse(&url)?;
        let shared = Arc::new(Shared {
            max_peers: rooms_cfg.max_peers,
            max_sfu_peers: rooms_cfg.max_sfu_peers,
            topology: rooms_cfg.topology,
            password_attempts: rooms_cfg.password_attempts_per_min.max(1.0) as u64,
            backend,
            con: tokio::sync::Mutex::new(None),
            cfg,
            scripts: scripts::Scripts::new(),
            registered: AtomicBool::new(false),
            subscribed: AtomicBool::new(false),
            needs_resync: AtomicBool::new(false),
            stopping: AtomicBool::new(false),
        });
        let mut con = shared.connection().await.map_err(|source| ClusterError::Connect { url: url.clone(), source })?;
        let incarnation = random_node_id();
        match register(&shared, &mut con, &incarnation).await {
            Ok(true) => {}
            Ok(false) => return Err(ClusterError::NodeIdTaken(shared.cfg.node_id.clone())),
            Err(source) => return Err(ClusterError::Connect { url, source }),
        }
        let (tx, rx) = mpsc::unbounded_channel();
        let links = links::Links::new(&shared.cfg.node_id, &random_node_id(), shared.cfg.replay_limit);
        let rooms = ClusterRooms::new(rooms_cfg, ice, Instant::now()).with_policy(policy);
        let router = Arc::new(ClusterRouter {
            driver: Driver::new(
                rooms,
                ClusterState {
                    shared: shared.clone(),
                    tx: tx.clone(),
                    awaiting: HashMap::new(),
                    joins: HashMap::new(),
                    links,
                    routes: HashMap::new(),
                    held: HashMap::new(),
                    moved: HashMap::new(),
                    passwords: HashMap::new(),
                    inbound: HashMap::new(),
                    owners: HashMap::new(),
                    served: HashMap::new(),
                    sfu_in: VecDeque::new(),
                    pruned: Instant::now(),
                },
            ),
            shared: shared.clone(),
            tx,
        });
        let (subscribed_tx, subscribed_rx) = tokio::sync::oneshot::channel();
        tokio::spawn(subscriber(Arc::downgrade(&router), Some(subscribed_tx)));
        // Joins before the subscription is up would never see their admission.
        let _ = tokio::time::timeout(REDIS_TIMEOUT * 2, subscribed_rx).await;
        shared.needs_resync.store(false, Ordering::SeqCst);
        shared.registered.store(true, Ordering::SeqCst);
        tokio::spawn(pipe(Arc::downgrade(&router), rx));
        tokio::spawn(monitor(Arc::downgrade(&router), incarnation));
        Driver::spawn_timer(Arc::downgrade(&router), |r: &ClusterRouter| &r.driver);
        tracing::info!(node = %shared.cfg.node_id, "cluster node registered");
        Ok(router)
    }

    pub fn node_id(&self) -> &str {
        &self.shared.cfg.node_id
    }

    /// Runs this node's SFU: the SFU rooms it owns carry their media here, for peers on every node.
    pub fn set_sfu(self: &Arc<Self>, sfu: webcall_sfu::net::SfuHandle) {
        let sink: Weak<dyn SfuSink> = Arc::downgrade(self) as Weak<ClusterRouter>;
        self.driver.lock().set_sfu(sfu, sink);
    }

    /// One message from this node's channel: a link message, or an event published by a script.
    fn on_event(&self, payload: &str) {
        let mut inner = self.driver.lock();
        let now = Instant::now();
        let Core { rooms, layer, .. } = &mut *inner;
        layer.on_event(rooms, payload, now);
        inner.dispatch(now);
    }
}

impl Layer<ClusterRooms> for ClusterState {
    /// Acts on what the core asked for.
    fn layer_output(&mut self, rooms: &mut ClusterRooms, out: ClusterOutput, now: Instant) {
        match out {
            ClusterOutput::Join { conn, room, name, password, resume, publish, refused, sfu } => {
                if !self.shared.healthy() {
                    rooms.refuse_join(conn, unavailable("its store, Redis, cannot be reached"), now);
                    return;
                }
                let s = &self.shared;
                let digest = password.map(|p| password_digest(&room, &p)).unwrap_or_default();
                let args = vec![
                    s.cfg.node_id.clone(),
                    conn.to_string(),
                    room.clone(),
                    random_id(10),
                    name,
                    random_id(24),
                    if publish { "1" } else { "0" }.to_owned(),
                    s.max_peers.to_string(),
                    digest,
                    resume.unwrap_or_default(),
                    if refused.is_none() { "1" } else { "0" }.to_owned(),
                    s.password_attempts.to_string(),
                    if sfu { "1" } else { "0" }.to_owned(),
                    match s.topology {
                        Topology::Auto => "auto",
                        Topology::Mesh => "mesh",
                        Topology::Sfu => "sfu",
                    }
                    .to_owned(),
                    s.max_sfu_peers.to_string(),
                ];
                self.joins.insert(conn, now);
                let _ = self.tx.send(Cmd::Join { conn, room, args, refused, max: s.max_peers });
            }
            ClusterOutput::Relay { to, frame } => self.relay(rooms, &to, frame, now),
            ClusterOutput::Left { id, .. } => {
                let _ = self.tx.send(Cmd::Leave { id });
            }
        }
    }

    /// Requests of rooms whose SFU runs on another node go there, on the link (in order, replayed if lost).
    fn sfu_request(&mut self, rooms: &mut ClusterRooms, req: SfuRequest, now: Instant) -> Option<SfuRequest> {
        let shared = self.shared.clone();
        let me = shared.cfg.node_id.as_str();
        let (room, peer) = match &req {
            SfuRequest::Signal { room, peer, .. }
            | SfuRequest::Leave { room, peer }
            | SfuRequest::View { room, peer, .. } => (room, peer),
            // The room core refuses `record` with --redis (recording is single-node for now): this node's SFU.
            SfuRequest::Record { .. } => return Some(req),
        };
        let owner = match self.owners.get(&**room) {
            Some(n) if n != me => n.clone(),
            _ => {
                self.serve(&req, me);
                return Some(req);
            }
        };
        let (kind, payload) = match &req {
            SfuRequest::Signal { kind, payload, .. } => (kind.as_str(), payload.clone()),
            SfuRequest::Leave { .. } => ("leave", String::new()),
            SfuRequest::View { tracks, .. } => ("view", serde_json::to_string(tracks).unwrap_or_default()),
            SfuRequest::Record { .. } => unreachable!("returned above"),
        };
        let body = format!("F\n{kind}\n{room}\n{peer}\n{payload}");
        // A leave must not be refused (its session would linger); the others are refused to their sender, as relays.
        let leave = matches!(req, SfuRequest::Leave { .. });
        if let Err(e) = self.links.send(&owner, &body, leave) {
            tracing::warn!("{e}");
            let err =
                unavailable("messages to the SFU on another server wait for its store, Redis, and its buffer is full")
                    .refers_to(kind);
            rooms.relay_refused(peer, err, now);
        }
        None
    }

    fn poll_sfu(&mut self) -> Option<SfuRequest> {
        self.sfu_in.pop_front()
    }

    fn dispatched(&mut self, rooms: &mut ClusterRooms, now: Instant) {
        self.release_holds(rooms, now);
        while let Some((node, payload)) = self.links.poll_publish() {
            let _ = self.tx.send(Cmd::Publish { node, payload });
        }
    }

    /// Hand-over and join timeouts, waiting frames of peers that left, link reports.
    fn tick(&mut self, rooms: &mut ClusterRooms, now: Instant) {
        let late: Vec<String> = self
            .awaiting
            .iter()
            .filter(|(_, t)| now.duration_since(**t) >= HANDOVER_WAIT)
            .map(|(k, _)| k.clone())
            .collect();
        for id in late {
            tracing::warn!(peer = %id, "no queue from the old node in time; resuming without it");
            self.awaiting.remove(&id);
            rooms.handover(&id, Vec::new(), now);
        }
        let stuck: Vec<ConnId> =
            self.joins.iter().filter(|(_, t)| now.duration_since(**t) >= JOIN_WAIT).map(|(c, _)| *c).collect();
        for conn in stuck {
            self.joins.remove(&conn);
            rooms.refuse_join(conn, unavailable("its store, Redis, did not answer in time"), now);
        }
        self.moved.retain(|_, (_, t)| now.duration_since(*t) < Duration::from_secs(300));
        if now.duration_since(self.pruned) >= Duration::from_secs(1) {
            // Members the core no longer knows (their room here emptied of local peers) need no route; and maps
            // give back their peak capacity after load.
            self.pruned = now;
            self.routes.retain(|id, _| rooms.is_remote(id));
            shrink_sparse(&mut self.routes);
            shrink_sparse(&mut self.moved);
            shrink_sparse(&mut self.joins);
            shrink_sparse(&mut self.inbound);
            shrink_sparse(&mut self.passwords);
            let me = self.shared.cfg.node_id.as_str();
            let served = &self.served;
            self.owners.retain(|room, node| {
                rooms.room_is_sfu(room) || (node == me && served.values().any(|(r, _)| **r == **room))
            });
            shrink_sparse(&mut self.owners);
            shrink_sparse(&mut self.served);
        }
        // Peers that detached or left meanwhile: what waited for them goes to the core (queued or dropped).
        let waiting: Vec<String> = self.inbound.keys().cloned().collect();
        for peer in waiting {
            self.drain_inbound(rooms, &peer, usize::MAX, now);
        }
        self.links.tick(now);
    }

    /// A connection drained: frames from other nodes waiting for it go now.
    fn taken(&mut self, rooms: &mut ClusterRooms, conn: ConnId) -> Option<Instant> {
        if self.inbound.is_empty() {
            return None;
        }
        let peer = rooms.peer_of(conn).filter(|p| self.inbound.contains_key(*p))?.to_owned();
        let now = Instant::now();
        self.drain_inbound(rooms, &peer, usize::MAX, now);
        Some(now)
    }

    fn disconnected(&mut self, conn: ConnId) {
        self.joins.remove(&conn);
    }

    fn max_sleep(&self) -> Duration {
        links::STATE_EVERY
    }
}

impl ClusterState {
    /// A frame for a peer on another node.
    fn relay(&mut self, rooms: &mut ClusterRooms, to: &str, frame: Frame, now: Instant) {
        if let Some(h) = self.held.get_mut(to) {
            h.queue.push_back(frame);
            return;
        }
        let Some(node) = self.routes.get(to) else {
            tracing::warn!(peer = %to, "no route to a remote peer; message dropped");
            return;
        };
        if let Err(e) = self.links.send_parts(node, &["D\n", to, "\n", &frame], false) {
            // The sender hears it: nothing is claimed delivered that was not accepted.
            let v: serde_json::Value = serde_json::from_str(&frame).unwrap_or_default();
            let (from, kind) = (v["from"].as_str().unwrap_or(""), v["type"].as_str().unwrap_or(""));
            tracing::warn!("{e}");
            let err =
                unavailable("messages to peers on other servers wait for its store, Redis, and its buffer is full")
                    .refers_to(kind);
            rooms.relay_refused(from, err, now);
        }
    }

    /// Holds whose old node has settled everything sent before the hold: their messages go out now.
    fn release_holds(&mut self, rooms: &mut ClusterRooms, now: Instant) {
        if self.held.is_empty() {
            return;
        }
        let done: Vec<String> =
            self.held.iter().filter(|(_, h)| self.links.acked(&h.node) >= h.until).map(|(k, _)| k.clone()).collect();
        for id in done {
            let h = self.held.remove(&id).expect("listed");
            for frame in h.queue {
                self.relay(rooms, &id, frame, now);
            }
        }
    }

    /// One message from this node's channel: a link message, or an event published by a script.
    fn on_event(&mut self, rooms: &mut ClusterRooms, payload: &str, now: Instant) {
        if matches!(payload.as_bytes().first(), Some(b'Q' | b'K' | b'N')) {
            if let Some(d) = self.links.receive(payload, now) {
                self.on_link(rooms, d.from, d.body, now);
            }
            return;
        }
        let mut f = payload.splitn(2, '\n');
        let (kind, rest) = (f.next().unwrap_or(""), f.next().unwrap_or(""));
        let shared = self.shared.clone();
        let me = shared.cfg.node_id.as_str();
        match kind {
            "J" => {
                let v: Vec<&str> = rest.splitn(4, '\n').collect();
                if let [room, id, node, name] = v[..] {
                    rooms.remote_join(room, id, name, now);
                    if rooms.is_remote(id) {
                        self.routes.insert(id.to_owned(), node.to_owned());
                    }
                }
            }
            "L" => {
                rooms.remote_leave(rest, now);
                self.routes.remove(rest);
                if let Some((peer, (room, _))) = self.served.remove_entry(rest) {
                    self.sfu_in.push_back(SfuRequest::Leave { room, peer });
                }
            }
            "A" => {
                let v: Vec<&str> = rest.splitn(10, '\n').collect();
                if let [conn, kind, id, token, room, publish, name, sfu, owner, peers] = v[..] {
                    if !owner.is_empty() {
                        self.set_owner(rooms, room, owner, now);
                    }
                    let kind = match kind {
                        "F" => AdmitKind::Fresh,
                        "R" => AdmitKind::Resumed,
                        _ => AdmitKind::ResumedFromElsewhere,
                    };
                    let conn: ConnId = conn.parse().unwrap_or(u64::MAX);
                    self.joins.remove(&conn);
                    let peers = parse_snapshot(peers);
                    // Routes are for peers on other nodes only: one per local peer here was never removed (the
                    // soak found 2 of every 3 allocations left after a round there).
                    for (p, node) in peers.iter().filter(|(_, n)| *n != me) {
                        self.routes.insert(p.id.clone(), (*node).to_owned());
                    }
                    let a = Admitted {
                        conn,
                        kind,
                        id: id.to_owned(),
                        token: token.to_owned(),
                        room: room.to_owned(),
                        name: name.to_owned(),
                        publish: publish == "1",
                        peers: peers.into_iter().map(|(p, _)| p).collect(),
                        sfu: sfu == "1",
                        sfu_room: !owner.is_empty(),
                    };
                    rooms.admit(a, now);
                    self.moved.remove(id);
                    self.routes.remove(id);
                    if rooms.awaiting_handover().any(|a| a == id) {
                        self.awaiting.insert(id.to_owned(), now);
                    }
                }
            }
            "Y" => {
                let v: Vec<&str> = rest.splitn(4, '\n').collect();
                let [room, nodes, owner, snap] = v[..] else { return };
                let nodes: Vec<&str> = nodes.split('\x1f').collect();
                let peers = parse_snapshot(snap);
                for (p, node) in &peers {
                    if *node == me {
                        if !rooms.is_local(&p.id) {
                            // A seat this node holds for nobody (its admission was lost): free it.
                            let _ = self.tx.send(Cmd::Leave { id: Arc::from(p.id.as_str()) });
                        }
                    } else {
                        self.routes.insert(p.id.clone(), (*node).to_owned());
                    }
                }
                let mut list: Vec<PeerInfo> = peers.into_iter().filter(|(_, n)| *n != me).map(|(p, _)| p).collect();
                // Members of nodes that have not registered again yet (Redis came back empty) are not in the
                // snapshot: they stay until their node restores them or is found gone.
                for p in rooms.remote_members(room) {
                    let registered = self.routes.get(&p.id).is_some_and(|n| nodes.contains(&n.as_str()));
                    if !registered && !list.iter().any(|q| q.id == p.id) {
                        list.push(p);
                    }
                }
                rooms.sync_remote(room, &list, now);
                if !owner.is_empty() {
                    self.set_owner(rooms, room, owner, now);
                    rooms.remote_topology(room, false, now);
                }
            }
            "S" => {
                if let Some((room, owner)) = rest.split_once('\n') {
                    self.set_owner(rooms, room, owner, now);
                    rooms.remote_topology(room, false, now);
                }
            }
            "T" => {
                if let Some((id, node)) = rest.split_once('\n') {
                    let frames = rooms.take_over(id, now);
                    self.moved.insert(id.to_owned(), (node.to_owned(), now));
                    if rooms.is_remote(id) {
                        // After the hand-over on the same link, so this node's later messages come behind it.
                        self.routes.insert(id.to_owned(), node.to_owned());
                    }
                    let mut body = format!("H\n{id}\n");
                    for (i, f) in frames.iter().enumerate() {
                        if i > 0 {
                            body.push('\x1e');
                        }
                        body.push_str(f);
                    }
                    let _ = self.links.send(node, &body, true);
                }
            }
            _ => tracing::warn!("unknown cluster event {kind:?}: is every node running the same version?"),
        }
    }

    /// A sequenced message from node `from`, in order.
    fn on_link(&mut self, rooms: &mut ClusterRooms, from: &str, body: &str, now: Instant) {
        let me = self.shared.cfg.node_id.as_str();
        let mut f = body.splitn(2, '\n');
        let (kind, rest) = (f.next().unwrap_or(""), f.next().unwrap_or(""));
        match kind {
            "D" => {
                let Some((to, frame)) = rest.split_once('\n') else { return };
                if let Some((q, bytes)) = self.inbound.get_mut(to) {
                    if q.len() < INBOUND_MAX_FRAMES && *bytes < INBOUND_MAX_BYTES {
                        *bytes += frame.len();
                        q.push_back(Arc::from(frame));
                        return;
                    }
                    self.drain_inbound(rooms, to, usize::MAX, now);
                } else if rooms.queue_room(to).is_some_and(|room| room < 2) {
                    self.inbound.insert(to.to_owned(), (VecDeque::from([Arc::from(frame)]), frame.len()));
                    return;
                }
                if !rooms.remote_deliver(to, Arc::from(frame), now) {
                    // Not here (any more): back to the sender, with where it went if we know.
                    let hint = self.moved.get(to).map_or("", |(n, _)| n.as_str()).to_owned();
                    let _ = self.links.send(from, &format!("R\n{to}\n{hint}\n{frame}"), true);
                }
            }
            "R" => {
                let v: Vec<&str> = rest.splitn(3, '\n').collect();
                let [to, hint, frame] = v[..] else { return };
                if hint == me {
                    rooms.remote_deliver(to, Arc::from(frame), now);
                } else if let Some((_, node)) = self.served.get_mut(to).filter(|_| !hint.is_empty()) {
                    // This node's SFU was talking to a peer that resumed on another node: follow it there.
                    *node = hint.to_owned();
                    let _ = self.links.send(hint, &format!("D\n{to}\n{frame}"), true);
                } else if hint.is_empty() || !rooms.is_remote(to) {
                    tracing::debug!(peer = %to, "a message for a peer that has gone was dropped");
                } else {
                    self.routes.insert(to.to_owned(), hint.to_owned());
                    if !self.held.contains_key(to) {
                        let until = self.links.sent(from);
                        self.held.insert(to.to_owned(), Hold { node: from.to_owned(), until, queue: VecDeque::new() });
                    }
                    let _ = self.links.send(hint, &format!("D\n{to}\n{frame}"), true);
                }
            }
            "F" => {
                let v: Vec<&str> = rest.splitn(4, '\n').collect();
                let [kind, room, peer, payload] = v[..] else { return };
                let (room, peer): (Arc<str>, Arc<str>) = (Arc::from(room), Arc::from(peer));
                let req = match kind {
                    "leave" => SfuRequest::Leave { room, peer },
                    "view" => {
                        let tracks: Vec<TrackView> = serde_json::from_str(payload).unwrap_or_default();
                        SfuRequest::View { room, peer, tracks }
                    }
                    "offer" | "answer" | "candidate" => {
                        let kind = match kind {
                            "offer" => RelayKind::Offer,
                            "answer" => RelayKind::Answer,
                            _ => RelayKind::Candidate,
                        };
                        SfuRequest::Signal { room, peer, kind, payload: payload.to_owned() }
                    }
                    _ => {
                        return tracing::warn!("unknown SFU request {kind:?}: is every node running the same version?")
                    }
                };
                self.serve(&req, from);
                self.sfu_in.push_back(req);
            }
            "H" => {
                let (id, frames) = rest.split_once('\n').unwrap_or((rest, ""));
                let frames: Vec<Frame> = frames.split('\x1e').filter(|f| !f.is_empty()).map(Arc::from).collect();
                self.awaiting.remove(id);
                rooms.handover(id, frames, now);
            }
            _ => tracing::warn!("unknown link message {kind:?}: is every node running the same version?"),
        }
    }

    /// `owner`'s SFU carries `room` now. When it was another node's (that node died), the local members are told to
    /// connect again, and if this node was the one, its SFU lets go of the room's sessions.
    fn set_owner(&mut self, rooms: &mut ClusterRooms, room: &str, owner: &str, now: Instant) {
        let Some(old) = self.owners.insert(room.to_owned(), owner.to_owned()) else { return };
        if old == owner {
            return;
        }
        if old == self.shared.cfg.node_id {
            let gone: Vec<Arc<str>> =
                self.served.iter().filter(|(_, (r, _))| **r == *room).map(|(p, _)| p.clone()).collect();
            for peer in gone {
                self.served.remove(&peer);
                self.sfu_in.push_back(SfuRequest::Leave { room: Arc::from(room), peer });
            }
        }
        // Only members with a connection to the old SFU have one to replace (the entry may be stale otherwise).
        if rooms.room_is_sfu(room) {
            tracing::info!(room, from = %old, to = %owner, "the room's SFU moved to another node");
            rooms.remote_topology(room, true, now);
        }
    }

    /// Notes which node a peer this node's SFU serves lives on (its frames go there).
    fn serve(&mut self, req: &SfuRequest, node: &str) {
        match req {
            SfuRequest::Leave { peer, .. } => {
                self.served.remove(peer);
            }
            SfuRequest::Signal { room, peer, .. } | SfuRequest::View { room, peer, .. } => {
                if self.served.get(peer).is_none_or(|(r, n)| r != room || n != node) {
                    self.served.insert(peer.clone(), (room.clone(), node.to_owned()));
                }
            }
            SfuRequest::Record { .. } => {}
        }
    }

    /// A frame of this node's SFU for `peer`: to its connection here, or on the link to the node that hosts it.
    fn sfu_frame(&mut self, rooms: &mut ClusterRooms, peer: &str, frame: String) {
        let me = self.shared.cfg.node_id.as_str();
        match self.served.get(peer) {
            Some((_, node)) if node != me && !rooms.is_local(peer) => {
                let node = node.clone();
                let _ = self.links.send_parts(&node, &["D\n", peer, "\n", &frame], true);
            }
            _ => {
                rooms.sfu_frame(peer, Arc::from(frame));
            }
        }
    }

    /// Hands waiting frames from other nodes to `peer`'s connection, as many as it takes (`max` at most).
    fn drain_inbound(&mut self, rooms: &mut ClusterRooms, peer: &str, max: usize, now: Instant) {
        let Some((mut q, mut bytes)) = self.inbound.remove(peer) else { return };
        let room = rooms.queue_room(peer).map_or(usize::MAX, |r| r.saturating_sub(1)).min(max);
        for _ in 0..room {
            let Some(f) = q.pop_front() else { break };
            bytes -= f.len();
            rooms.remote_deliver(peer, f, now);
        }
        if !q.is_empty() {
            self.inbound.insert(peer.to_owned(), (q, bytes));
        }
    }
}

fn random_id(len: usize) -> String {
    webcall_protocol::random_id(len, rand::random)
}

/// What Redis keeps of a room password: salted with the room name, so equal passwords of two rooms differ.
fn password_digest(room: &str, password: &str) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(b"webcall-room-password\0");
    h.update(room.as_bytes());
    h.update(b"\0");
    h.update(password.as_bytes());
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

impl SfuSink for ClusterRouter {
    fn sfu_frame(&self, peer: &str, frame: String) {
        self.driver.with(|i, _| {
            let Core { rooms, layer, .. } = i;
            layer.sfu_frame(rooms, peer, frame);
        });
    }
}

impl Router for ClusterRouter {
    fn connect(&self, conn: ConnId, signal: Arc<ConnSignal>) {
        self.driver.connect(conn, signal);
    }
    fn message(&self, conn: ConnId, text: &str) {
        self.driver.message(conn, text);
    }
    fn message_at(&self, conn: ConnId, text: &str, now: Instant) {
        self.driver.message_at(conn, text, now);
    }
    fn binary(&self, conn: ConnId, len: usize) {
        self.driver.binary(conn, len);
    }
    fn take(&self, conn: ConnId, buf: &mut Vec<Frame>) {
        self.driver.take(conn, buf);
    }
    fn disconnect(&self, conn: ConnId) {
        self.driver.disconnect(conn);
    }
    fn stats(&self) -> Stats {
        self.driver.stats()
    }
    fn counters(&self) -> Counters {
        self.driver.counters()
    }
    /// Graceful hand-off: clients are told to reconnect, and this node's sessions end cluster-wide at once (the
    /// other peers get `bye`), rather than lingering until the node's liveness key expires.
    fn shutdown(&self) {
        self.shared.stopping.store(true, Ordering::SeqCst);
        self.driver.shutdown();
        let _ = self.tx.send(Cmd::ReapSelf);
    }
    fn healthy(&self) -> bool {
        self.shared.healthy()
    }
}

async fn register(s: &Shared, con: &mut ConnectionManager, incarnation: &str) -> redis::RedisResult<bool> {
    let ttl = s.cfg.node_ttl.as_millis() as u64;
    load_scripts(s, con).await?;
    let r: i64 = s.scripts.register.arg(&s.cfg.node_id).arg(incarnation).arg(ttl).invoke_async(con).await?;
    Ok(r == 1)
}

/// Pipelines call scripts by hash: a Redis that restarted or failed over may not have them yet.
async fn load_scripts(s: &Shared, con: &mut ConnectionManager) -> redis::RedisResult<()> {
    for script in [&s.scripts.join, &s.scripts.leave, &s.scripts.refresh, &s.scripts.reap, &s.scripts.restore] {
        script.prepare_invoke().load_async(con).await?;
    }
    Ok(())
}

/// Receives this node's channel. After it was down, the monitor reads membership again.
async fn subscriber(router: Weak<ClusterRouter>, mut first: Option<tokio::sync::oneshot::Sender<()>>) {
    use futures_util::StreamExt;
    let (channel, shared) = match router.upgrade() {
        Some(r) => (format!("wc:ch:{}", r.shared.cfg.node_id), r.shared.clone()),
        None => return,
    };
    loop {
        let sub = async {
            let client = shared.backend.client().await?;
            let mut ps = client.get_async_pubsub().await?;
            ps.subscribe(&channel).await?;
            Ok::<_, redis::RedisError>(ps)
        };
        match tokio::time::timeout(REDIS_TIMEOUT * 2, sub).await {
            Ok(Ok(ps)) => {
                shared.needs_resync.store(true, Ordering::SeqCst);
                shared.subscribed.store(true, Ordering::SeqCst);
                if let Some(tx) = first.take() {
                    let _ = tx.send(());
                }
                let mut stream = ps.into_on_message();
                while let Some(msg) = stream.next().await {
                    let Some(r) = router.upgrade() else { return };
                    match std::str::from_utf8(msg.get_payload_bytes()) {
                        Ok(text) => r.on_event(text),
                        Err(_) => tracing::warn!("cluster event is not UTF-8; dropped"),
                    }
                }
                shared.subscribed.store(false, Ordering::SeqCst);
                tracing::warn!("lost the Redis subscription; refusing joins until it is back");
            }
            Ok(Err(e)) => tracing::debug!("Redis subscription failed: {e}"),
            Err(_) => tracing::debug!("Redis subscription timed out"),
        }
        if router.strong_count() == 0 || shared.stopping.load(Ordering::SeqCst) {
            return;
        }
        shared.failed().await;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Sends commands in the order the core produced them, as pipelines: a leave and a join from this node reach
/// Redis in that order. Link messages lost to a failure are replayed by the links; leaves are retried.
async fn pipe(router: Weak<ClusterRouter>, mut rx: mpsc::UnboundedReceiver<Cmd>) {
    let mut batch = Vec::new();
    let mut retry: VecDeque<Cmd> = VecDeque::new();
    let mut failing = false;
    loop {
        if retry.is_empty() {
            if rx.recv_many(&mut batch, MAX_BATCH).await == 0 {
                return;
            }
        } else {
            batch.extend(retry.drain(..));
            while batch.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(c) => batch.push(c),
                    Err(_) => break,
                }
            }
        }
        let Some(r) = router.upgrade() else { return };
        let s = r.shared.clone();
        let mut p = redis::pipe();
        for cmd in &batch {
            match cmd {
                Cmd::Join { args, .. } => {
                    p.cmd("EVALSHA").arg(s.scripts.join.get_hash()).arg(0).arg(args);
                }
                Cmd::Leave { id } => {
                    p.cmd("EVALSHA").arg(s.scripts.leave.get_hash()).arg(0).arg(&s.cfg.node_id).arg(&**id);
                }
                Cmd::Publish { node, payload } => {
                    p.cmd("PUBLISH").arg(format!("wc:ch:{node}")).arg(&**payload);
                }
                Cmd::ReapSelf => {
                    p.cmd("EVALSHA").arg(s.scripts.reap.get_hash()).arg(0).arg(&s.cfg.node_id);
                }
                Cmd::ReapGone(node) => {
                    p.cmd("EVALSHA").arg(s.scripts.reap.get_hash()).arg(0).arg(node);
                }
            }
        }
        let send = async {
            let mut con = s.connection().await.map_err(|e| e.to_string())?;
            match tokio::time::timeout(REDIS_TIMEOUT, con.send_packed_commands(&p, 0, batch.len())).await {
                Ok(Ok(v)) if v.len() == batch.len() => Ok(v),
                Ok(Ok(v)) => Err(format!("{} replies for {} commands", v.len(), batch.len())),
                Ok(Err(e)) => Err(e.to_string()),
                Err(_) => Err("timed out".into()),
            }
        };
        let replies: Result<Vec<Value>, String> = send.await;
        let failed = replies.is_err();
        match &replies {
            // Once per outage: link messages are replayed, so these are not losses.
            Err(e) if !failing => tracing::warn!("Redis refused {} cluster commands: {e}; retrying", batch.len()),
            Err(e) => tracing::debug!("Redis refused {} cluster commands: {e}", batch.len()),
            Ok(_) if failing => tracing::info!("Redis takes cluster commands again"),
            Ok(_) => {}
        }
        failing = failed;
        for (i, cmd) in batch.drain(..).enumerate() {
            let reply = replies.as_ref().map(|v| &v[i]);
            match cmd {
                Cmd::Join { conn, room, refused, max, args } => {
                    let refusal = match reply {
                        Ok(v) => match redis::from_redis_value::<String>(v) {
                            Ok(s) if s == "ok" || s == "resumed" => {
                                if !args[8].is_empty() {
                                    r.driver.lock().layer.passwords.insert(room.clone(), args[8].clone());
                                }
                                None
                            }
                            Ok(s) if s.starts_with("full:") => {
                                let (n, cap) = s[5..].split_once(':').unwrap_or((&s[5..], ""));
                                let cap = if cap.is_empty() { max.to_string() } else { cap.to_owned() };
                                Some(ProtocolError::new(
                                    ErrorCode::RoomFull,
                                    format!("room '{room}' is full ({n} of {cap} peers)"),
                                ))
                            }
                            Ok(s) if s == "needsfu" => Some(ProtocolError::new(
                                ErrorCode::NeedsSfu,
                                format!("room '{room}' sends media through the server; join with \"sfu\":true"),
                            )),
                            Ok(s) if s == "needpw" => Some(ProtocolError::new(
                                ErrorCode::Unauthorized,
                                format!("this room needs a password for room '{room}'"),
                            )),
                            Ok(s) if s.starts_with("pwlimit:") => Some(ProtocolError::new(
                                ErrorCode::RateLimited,
                                format!("too many wrong passwords for room '{room}'; try again in {} s", &s[8..]),
                            )),
                            Ok(s) if s == "badpw" => Some(ProtocolError::new(
                                ErrorCode::Unauthorized,
                                format!("wrong password for room '{room}'"),
                            )),
                            Ok(s) if s == "refused" => refused.clone(),
                            Ok(_) => Some(unavailable("a peer id clashed")),
                            Err(e) => {
                                tracing::warn!("join script failed: {e}");
                                Some(unavailable("its store, Redis, failed"))
                            }
                        },
                        Err(_) => Some(unavailable("its store, Redis, cannot be reached")),
                    };
                    if let Some(e) = refusal {
                        r.driver.with(|i, now| {
                            i.layer.joins.remove(&conn);
                            i.rooms.refuse_join(conn, e, now)
                        });
                    }
                }
                Cmd::Publish { .. } => {}
                cmd @ (Cmd::Leave { .. } | Cmd::ReapSelf | Cmd::ReapGone(_)) => match reply {
                    Err(_) => retry.push_back(cmd),
                    Ok(Value::ServerError(e)) => {
                        tracing::warn!("cluster command failed: {e:?}");
                        retry.push_back(cmd);
                    }
                    Ok(_) => {}
                },
            }
        }
        drop(r);
        if failed {
            s.failed().await;
            // Link messages queued meanwhile are replayed from the buffer once Redis answers: drop the copies.
            while let Ok(c) = rx.try_recv() {
                if !matches!(c, Cmd::Publish { .. }) {
                    retry.push_back(c);
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        } else if !retry.is_empty() {
            // Scripts may be missing after a restart or failover.
            if let Ok(mut con) = s.connection().await {
                let _ = load_scripts(&s, &mut con).await;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Keeps this node registered, re-asserts its sessions when the store lost them, reads membership again after
/// the subscription was down, and ends dead nodes' sessions.
async fn monitor(router: Weak<ClusterRouter>, incarnation: String) {
    let Some(r) = router.upgrade() else { return };
    let s = r.shared.clone();
    drop(r);
    let every = (s.cfg.node_ttl / 3).max(Duration::from_millis(100));
    // Others are reaped only after this node has answered for a whole TTL: after an outage every node needs a
    // moment to refresh before it is presumed dead.
    let mut ok_since: Option<Instant> = Some(Instant::now());
    let mut missing: HashMap<String, Instant> = HashMap::new();
    loop {
        tokio::time::sleep(every).await;
        if s.stopping.load(Ordering::SeqCst) || router.strong_count() == 0 {
            return;
        }
        let ttl = s.cfg.node_ttl.as_millis() as u64;
        let step = async {
            let mut con = s.connection().await?;
            let mut inv = s.scripts.refresh.prepare_invoke();
            inv.arg(&s.cfg.node_id).arg(&incarnation).arg(ttl);
            let refreshed: i64 = inv.invoke_async(&mut con).await?;
            if refreshed == -1 {
                return Ok((refreshed, None));
            }
            if refreshed == 0 || s.needs_resync.load(Ordering::SeqCst) {
                // Cleared before the restore: a drop after this point asks for another one.
                s.needs_resync.store(false, Ordering::SeqCst);
                if let Err(e) = restore(&router, &s, &mut con, &incarnation).await {
                    s.needs_resync.store(true, Ordering::SeqCst);
                    return Err(e);
                }
            }
            let nodes: Vec<String> = redis::cmd("SMEMBERS").arg("wc:nodes").query_async(&mut con).await?;
            Ok((1, Some((con, nodes))))
        };
        match tokio::time::timeout(REDIS_TIMEOUT * 2, step).await.unwrap_or_else(|_| Err(timed_out())) {
            Ok((-1, _)) => {
                tracing::error!(node = %s.cfg.node_id, "another live process uses this --node-id; give each node its own");
                s.registered.store(false, Ordering::SeqCst);
            }
            Ok((_, Some((mut con, nodes)))) => {
                if !s.registered.swap(true, Ordering::SeqCst) {
                    tracing::info!("Redis is back; accepting joins again");
                }
                let since = *ok_since.get_or_insert_with(Instant::now);
                if since.elapsed() >= s.cfg.node_ttl {
                    let mut inv = s.scripts.reap.prepare_invoke();
                    inv.arg("");
                    match tokio::time::timeout(REDIS_TIMEOUT, inv.invoke_async::<i64>(&mut con)).await {
                        Ok(Ok(n)) if n > 0 => tracing::info!("ended {n} sessions of nodes that stopped answering"),
                        Ok(Err(e)) => tracing::warn!("could not check for dead nodes: {e}"),
                        _ => {}
                    }
                }
                if since.elapsed() >= s.cfg.node_ttl {
                    forget_gone_nodes(&router, &s, &nodes, &mut missing);
                } else {
                    missing.clear();
                }
            }
            Ok((_, None)) => {}
            Err(e) => {
                ok_since = None;
                s.failed().await;
                if s.registered.swap(false, Ordering::SeqCst) {
                    tracing::error!("Redis unavailable ({e}): refusing joins, /healthz reports 503");
                }
            }
        }
    }
}

/// Puts this node and its sessions back into the store and asks for each room's membership (`Y` events).
async fn restore(
    router: &Weak<ClusterRouter>,
    s: &Shared,
    con: &mut ConnectionManager,
    incarnation: &str,
) -> redis::RedisResult<()> {
    let Some(r) = router.upgrade() else { return Ok(()) };
    let (sessions, passwords, owners) = {
        let inner = r.driver.lock();
        (inner.rooms.local_sessions(), inner.layer.passwords.clone(), inner.layer.owners.clone())
    };
    drop(r);
    load_scripts(s, con).await?;
    let mut inv = s.scripts.restore.prepare_invoke();
    inv.arg(&s.cfg.node_id).arg(incarnation).arg(s.cfg.node_ttl.as_millis() as u64);
    for l in &sessions {
        inv.arg(&*l.id).arg(&*l.room).arg(&*l.name).arg(&*l.token).arg(if l.publish { "1" } else { "0" });
        inv.arg(passwords.get(&*l.room).map_or("", String::as_str));
        inv.arg(if l.sfu { "1" } else { "0" }).arg(owners.get(&*l.room).map_or("", String::as_str));
    }
    let reply: Value = inv.invoke_async(con).await?;
    let elsewhere: Vec<String> = match reply {
        Value::Array(v) if v.first() == Some(&Value::Int(-1)) => {
            return Err(redis::RedisError::from((redis::ErrorKind::ClientError, "node id taken by a live process")));
        }
        v => redis::from_redis_value(&v).unwrap_or_default(),
    };
    if let Some(r) = router.upgrade() {
        r.driver.with(|i, now| {
            for id in &elsewhere {
                let lost = i.rooms.take_over(id, now).len();
                tracing::warn!(peer = %id, lost, "resumed on another node while this one was cut off");
            }
            let live: std::collections::HashSet<&str> = sessions.iter().map(|l| &*l.room).collect();
            i.layer.passwords.retain(|room, _| live.contains(room.as_str()));
        });
    }
    tracing::info!(node = %s.cfg.node_id, sessions = sessions.len(), "sessions re-asserted; reading membership again");
    Ok(())
}

/// Links to nodes that have been missing from the registry for a while go, with what was buffered for them
/// (their sessions died with them; the others got `bye`).
fn forget_gone_nodes(
    router: &Weak<ClusterRouter>,
    s: &Shared,
    nodes: &[String],
    missing: &mut HashMap<String, Instant>,
) {
    let Some(r) = router.upgrade() else { return };
    let now = Instant::now();
    let mut inner = r.driver.lock();
    let known: Vec<String> = inner.layer.links.nodes().map(str::to_owned).collect();
    missing.retain(|n, _| !nodes.contains(n));
    for n in known {
        if nodes.contains(&n) {
            continue;
        }
        let since = *missing.entry(n.clone()).or_insert(now);
        let quiet =
            inner.layer.links.heard(&n).is_none_or(|t| now.duration_since(t) >= s.cfg.node_ttl * FORGET_AFTER_TTLS);
        if quiet && now.duration_since(since) >= s.cfg.node_ttl * FORGET_AFTER_TTLS {
            let lost = inner.layer.links.forget(&n);
            missing.remove(&n);
            let gone: Vec<String> =
                inner.layer.routes.iter().filter(|(_, node)| **node == n).map(|(id, _)| id.clone()).collect();
            for id in gone {
                // Its sessions died with it; nobody is left to reap them (Redis came back without its entry).
                inner.rooms.remote_leave(&id, now);
                inner.layer.routes.remove(&id);
            }
            if lost > 0 {
                tracing::warn!(node = %n, lost, "node gone: messages for its peers died with it");
            }
            let _ = inner.layer.tx.send(Cmd::ReapGone(n.clone()));
        }
    }
    inner.dispatch(now);
}
