//! Several `webcall serve` nodes sharing rooms through Redis (see `docs/cluster.md`).
//!
//! [`ClusterRouter`] is a [`Router`] like `LocalRouter`: the same sans-IO core (in cluster mode) handles this
//! node's connections, while Redis holds what must be cluster-wide (seats, membership, resume tokens, which node
//! hosts which peer) and carries events between nodes, one channel per node.

mod scripts;

use parking_lot::Mutex;
use redis::aio::ConnectionManager;
use redis::Value;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use webcall_protocol::{ErrorCode, PeerInfo, ProtocolError};
use webcall_rooms::{
    AdmitKind, Admitted, ClusterOutput, ConnId, Counters, Frame, IceProvider, JoinPolicy, Rooms, Stats,
};
use webcall_server::router::{ConnSignal, Router};

/// How long a session resumed from another node waits for that node's queue before it is welcomed without it.
const HANDOVER_WAIT: Duration = Duration::from_secs(2);
/// Longest time a Redis call may take before the node counts Redis as unavailable.
const REDIS_TIMEOUT: Duration = Duration::from_secs(2);
/// Commands sent to Redis in one pipeline at most.
const MAX_BATCH: usize = 512;

#[derive(Debug, Clone)]
pub struct ClusterConfig {
    /// `redis://host:port/db` (`--redis`).
    pub redis_url: String,
    /// This node's name in the cluster (`--node-id`): unique among live nodes.
    pub node_id: String,
    /// A node silent this long is presumed dead and its sessions end (`--node-ttl`).
    pub node_ttl: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("--redis {url} is not a Redis URL: {source} (write e.g. redis://127.0.0.1:6379)")]
    Url { url: String, source: redis::RedisError },
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

enum Cmd {
    Join {
        conn: ConnId,
        room: String,
        args: Vec<String>,
        refused: Option<ProtocolError>,
        max: usize,
    },
    Relay {
        to: Arc<str>,
        payload: String,
    },
    Leave {
        id: Arc<str>,
    },
    Publish {
        node: String,
        payload: String,
    },
    /// Graceful shutdown: end this node's sessions now.
    ReapSelf,
}

struct Inner {
    rooms: Rooms,
    signals: HashMap<ConnId, Arc<ConnSignal>>,
    /// Sessions resumed from another node, since when they wait for the hand-over.
    awaiting: HashMap<String, Instant>,
}

struct Shared {
    cfg: ClusterConfig,
    max_peers: usize,
    scripts: scripts::Scripts,
    /// Redis answered the last liveness refresh and this node's registration holds.
    registered: AtomicBool,
    /// The channel subscription is up.
    subscribed: AtomicBool,
    /// The subscription was lost: events may be missing, so the node must start over.
    needs_reset: AtomicBool,
    stopping: AtomicBool,
}

pub struct ClusterRouter {
    inner: Mutex<Inner>,
    shared: Arc<Shared>,
    tx: mpsc::UnboundedSender<Cmd>,
}

fn unavailable(what: &str) -> ProtocolError {
    ProtocolError::new(
        ErrorCode::Unavailable,
        format!("the room service is unavailable ({what}); try again in a moment"),
    )
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
        let client =
            redis::Client::open(url.as_str()).map_err(|source| ClusterError::Url { url: url.clone(), source })?;
        let mgr_cfg = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(REDIS_TIMEOUT)
            .set_response_timeout(REDIS_TIMEOUT)
            .set_number_of_retries(1)
            .set_max_delay(500);
        let mut con = ConnectionManager::new_with_config(client.clone(), mgr_cfg)
            .await
            .map_err(|source| ClusterError::Connect { url: url.clone(), source })?;
        let shared = Arc::new(Shared {
            max_peers: rooms_cfg.max_peers,
            cfg,
            scripts: scripts::Scripts::new(),
            registered: AtomicBool::new(false),
            subscribed: AtomicBool::new(false),
            needs_reset: AtomicBool::new(false),
            stopping: AtomicBool::new(false),
        });
        let incarnation = random_node_id();
        match register(&shared, &mut con, &incarnation).await {
            Ok(true) => {}
            Ok(false) => return Err(ClusterError::NodeIdTaken(shared.cfg.node_id.clone())),
            Err(source) => return Err(ClusterError::Connect { url, source }),
        }
        let (tx, rx) = mpsc::unbounded_channel();
        let router = Arc::new(ClusterRouter {
            inner: Mutex::new(Inner {
                rooms: Rooms::new(rooms_cfg, ice).with_policy(policy).clustered(),
                signals: HashMap::new(),
                awaiting: HashMap::new(),
            }),
            shared: shared.clone(),
            tx,
        });
        let (subscribed_tx, subscribed_rx) = tokio::sync::oneshot::channel();
        tokio::spawn(subscriber(Arc::downgrade(&router), client, Some(subscribed_tx)));
        // Joins before the subscription is up would never see their admission.
        let _ = tokio::time::timeout(REDIS_TIMEOUT * 2, subscribed_rx).await;
        shared.registered.store(true, Ordering::SeqCst);
        tokio::spawn(pipe(Arc::downgrade(&router), con.clone(), rx));
        tokio::spawn(monitor(Arc::downgrade(&router), con, incarnation));
        tokio::spawn(timer(Arc::downgrade(&router)));
        tracing::info!(node = %shared.cfg.node_id, "cluster node registered");
        Ok(router)
    }

    pub fn node_id(&self) -> &str {
        &self.shared.cfg.node_id
    }

    fn with(&self, f: impl FnOnce(&mut Inner, Instant)) {
        let mut inner = self.inner.lock();
        f(&mut inner, Instant::now());
        self.dispatch(&mut inner);
    }

    /// Acts on what the core asked for; refusing a join feeds the core again, hence the loop.
    fn dispatch(&self, inner: &mut Inner) {
        loop {
            while let Some(out) = inner.rooms.poll_output() {
                webcall_server::router::signal_output(&inner.signals, out);
            }
            let Some(out) = inner.rooms.poll_cluster_output() else { break };
            match out {
                ClusterOutput::Join { conn, room, name, password, resume, publish, refused } => {
                    if !self.healthy() {
                        inner.rooms.refuse_join(
                            conn,
                            unavailable("its store, Redis, cannot be reached"),
                            Instant::now(),
                        );
                        continue;
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
                    ];
                    let _ = self.tx.send(Cmd::Join { conn, room, args, refused, max: s.max_peers });
                }
                ClusterOutput::Relay { to, frame } => {
                    let payload = format!("D\n{to}\n{frame}");
                    let _ = self.tx.send(Cmd::Relay { to, payload });
                }
                ClusterOutput::Left { id, .. } => {
                    let _ = self.tx.send(Cmd::Leave { id });
                }
            }
        }
    }

    /// One event from this node's channel.
    fn on_event(&self, payload: &str) {
        let mut f = payload.splitn(2, '\n');
        let (kind, rest) = (f.next().unwrap_or(""), f.next().unwrap_or(""));
        let mut inner = self.inner.lock();
        let now = Instant::now();
        match kind {
            "D" => {
                if let Some((to, frame)) = rest.split_once('\n') {
                    inner.rooms.remote_deliver(to, Arc::from(frame), now);
                }
            }
            "J" => {
                let v: Vec<&str> = rest.splitn(3, '\n').collect();
                if let [room, id, name] = v[..] {
                    inner.rooms.remote_join(room, id, name, now);
                }
            }
            "L" => inner.rooms.remote_leave(rest, now),
            "A" => {
                let v: Vec<&str> = rest.splitn(8, '\n').collect();
                if let [conn, kind, id, token, room, publish, name, peers] = v[..] {
                    let kind = match kind {
                        "F" => AdmitKind::Fresh,
                        "R" => AdmitKind::Resumed,
                        _ => AdmitKind::ResumedFromElsewhere,
                    };
                    let peers = peers
                        .split('\x1e')
                        .filter(|p| !p.is_empty())
                        .filter_map(|p| p.split_once('\x1f'))
                        .map(|(id, name)| PeerInfo { id: id.to_owned(), name: name.to_owned() })
                        .collect();
                    let a = Admitted {
                        conn: conn.parse().unwrap_or(u64::MAX),
                        kind,
                        id: id.to_owned(),
                        token: token.to_owned(),
                        room: room.to_owned(),
                        name: name.to_owned(),
                        publish: publish == "1",
                        peers,
                    };
                    inner.rooms.admit(a, now);
                    if inner.rooms.awaiting_handover().any(|a| a == id) {
                        inner.awaiting.insert(id.to_owned(), now);
                    }
                }
            }
            "T" => {
                if let Some((id, node)) = rest.split_once('\n') {
                    let frames = inner.rooms.take_over(id, now);
                    let mut payload = format!("H\n{id}\n");
                    for (i, f) in frames.iter().enumerate() {
                        if i > 0 {
                            payload.push('\x1e');
                        }
                        payload.push_str(f);
                    }
                    let _ = self.tx.send(Cmd::Publish { node: node.to_owned(), payload });
                }
            }
            "H" => {
                let (id, frames) = rest.split_once('\n').unwrap_or((rest, ""));
                let frames: Vec<Frame> = frames.split('\x1e').filter(|f| !f.is_empty()).map(Arc::from).collect();
                inner.awaiting.remove(id);
                inner.rooms.handover(id, frames, now);
            }
            _ => tracing::warn!("unknown cluster event {kind:?}: is every node running the same version?"),
        }
        self.dispatch(&mut inner);
    }

    /// This node's view can no longer be trusted: end every local session and start over.
    fn reset(&self) {
        tracing::warn!(node = %self.shared.cfg.node_id, "cluster state lost: closing this node's sessions so clients join again");
        self.with(|inner, now| {
            inner.rooms.reset(now);
            inner.awaiting.clear();
        });
    }
}

fn random_id(len: usize) -> String {
    use rand::Rng;
    const A: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    let mut r = rand::rng();
    (0..len).map(|_| A[r.random_range(0..A.len())] as char).collect()
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

impl Router for ClusterRouter {
    fn connect(&self, conn: ConnId, signal: Arc<ConnSignal>) {
        let mut inner = self.inner.lock();
        inner.signals.insert(conn, signal);
        inner.rooms.connect(conn, Instant::now());
    }
    fn message(&self, conn: ConnId, text: &str) {
        self.with(|i, now| i.rooms.message(conn, text, now));
    }
    fn binary(&self, conn: ConnId, len: usize) {
        self.with(|i, now| i.rooms.binary(conn, len, now));
    }
    fn take(&self, conn: ConnId, buf: &mut Vec<Frame>) {
        self.inner.lock().rooms.take(conn, buf);
    }
    fn disconnect(&self, conn: ConnId) {
        self.with(|i, now| {
            i.signals.remove(&conn);
            i.rooms.disconnect(conn, now);
        });
    }
    fn stats(&self) -> Stats {
        self.inner.lock().rooms.stats()
    }
    fn counters(&self) -> Counters {
        self.inner.lock().rooms.counters().clone()
    }
    /// Graceful hand-off: clients are told to reconnect, and this node's sessions end cluster-wide at once (the
    /// other peers get `bye`), rather than lingering until the node's liveness key expires.
    fn shutdown(&self) {
        self.shared.stopping.store(true, Ordering::SeqCst);
        self.with(|i, now| i.rooms.shutdown(now));
        let _ = self.tx.send(Cmd::ReapSelf);
    }
    fn healthy(&self) -> bool {
        let s = &self.shared;
        s.registered.load(Ordering::SeqCst) && s.subscribed.load(Ordering::SeqCst) && !s.stopping.load(Ordering::SeqCst)
    }
}

async fn register(s: &Shared, con: &mut ConnectionManager, incarnation: &str) -> redis::RedisResult<bool> {
    let ttl = s.cfg.node_ttl.as_millis() as u64;
    for script in [&s.scripts.join, &s.scripts.leave, &s.scripts.relay, &s.scripts.refresh, &s.scripts.reap] {
        script.prepare_invoke().load_async(con).await?;
    }
    let r: i64 = s.scripts.register.arg(&s.cfg.node_id).arg(incarnation).arg(ttl).invoke_async(con).await?;
    Ok(r == 1)
}

/// Receives this node's channel. A lost subscription may have lost events, so it asks for a reset.
async fn subscriber(
    router: Weak<ClusterRouter>,
    client: redis::Client,
    mut first: Option<tokio::sync::oneshot::Sender<()>>,
) {
    use futures_util::StreamExt;
    let channel = match router.upgrade() {
        Some(r) => format!("wc:ch:{}", r.shared.cfg.node_id),
        None => return,
    };
    let mut was_up = false;
    loop {
        let sub = async {
            let mut ps = client.get_async_pubsub().await?;
            ps.subscribe(&channel).await?;
            Ok::<_, redis::RedisError>(ps)
        };
        match tokio::time::timeout(REDIS_TIMEOUT, sub).await {
            Ok(Ok(ps)) => {
                let Some(r) = router.upgrade() else { return };
                if was_up {
                    r.shared.needs_reset.store(true, Ordering::SeqCst);
                }
                was_up = true;
                r.shared.subscribed.store(true, Ordering::SeqCst);
                drop(r);
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
                let Some(r) = router.upgrade() else { return };
                r.shared.subscribed.store(false, Ordering::SeqCst);
                tracing::warn!("lost the Redis subscription; refusing joins until it is back");
            }
            Ok(Err(e)) => tracing::debug!("Redis subscription failed: {e}"),
            Err(_) => tracing::debug!("Redis subscription timed out"),
        }
        if router.strong_count() == 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Sends commands in the order the core produced them, as pipelines: a delivery, a leave and a join from this
/// node reach Redis in that order.
async fn pipe(router: Weak<ClusterRouter>, mut con: ConnectionManager, mut rx: mpsc::UnboundedReceiver<Cmd>) {
    let mut batch = Vec::new();
    while rx.recv_many(&mut batch, MAX_BATCH).await > 0 {
        let Some(r) = router.upgrade() else { return };
        let s = &r.shared;
        let mut p = redis::pipe();
        for cmd in &batch {
            match cmd {
                Cmd::Join { args, .. } => {
                    p.cmd("EVALSHA").arg(s.scripts.join.get_hash()).arg(0).arg(args);
                }
                Cmd::Relay { to, payload } => {
                    p.cmd("EVALSHA").arg(s.scripts.relay.get_hash()).arg(1).arg(format!("wc:peer:{to}")).arg(payload);
                }
                Cmd::Leave { id } => {
                    p.cmd("EVALSHA").arg(s.scripts.leave.get_hash()).arg(0).arg(&s.cfg.node_id).arg(&**id);
                }
                Cmd::Publish { node, payload } => {
                    p.cmd("PUBLISH").arg(format!("wc:ch:{node}")).arg(payload);
                }
                Cmd::ReapSelf => {
                    p.cmd("EVALSHA").arg(s.scripts.reap.get_hash()).arg(0).arg(&s.cfg.node_id);
                }
            }
        }
        let replies: Result<Vec<Value>, String> =
            match tokio::time::timeout(REDIS_TIMEOUT, con.send_packed_commands(&p, 0, batch.len())).await {
                Ok(Ok(v)) if v.len() == batch.len() => Ok(v),
                Ok(Ok(v)) => Err(format!("{} replies for {} commands", v.len(), batch.len())),
                Ok(Err(e)) => Err(e.to_string()),
                Err(_) => Err("timed out".into()),
            };
        if let Err(e) = &replies {
            tracing::warn!("Redis refused {} cluster commands: {e}", batch.len());
        }
        for (i, cmd) in batch.drain(..).enumerate() {
            let reply = replies.as_ref().map(|v| &v[i]);
            match cmd {
                Cmd::Join { conn, room, refused, max, .. } => {
                    let refusal = match reply {
                        Ok(v) => match redis::from_redis_value::<String>(v) {
                            Ok(s) if s == "ok" || s == "resumed" => None,
                            Ok(s) if s.starts_with("full:") => Some(ProtocolError::new(
                                ErrorCode::RoomFull,
                                format!("room '{room}' is full ({} of {max} peers)", &s[5..]),
                            )),
                            Ok(s) if s == "needpw" => Some(ProtocolError::new(
                                ErrorCode::Unauthorized,
                                format!("this room needs a password for room '{room}'"),
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
                        r.with(|i, now| i.rooms.refuse_join(conn, e, now));
                    }
                }
                Cmd::Relay { .. } | Cmd::Leave { .. } | Cmd::Publish { .. } | Cmd::ReapSelf => {
                    if let Ok(Value::ServerError(e)) = reply {
                        tracing::warn!("cluster command failed: {e:?}");
                    }
                }
            }
        }
    }
}

/// Keeps this node registered, ends dead nodes' sessions, and starts over when the cluster lost this node.
async fn monitor(router: Weak<ClusterRouter>, mut con: ConnectionManager, mut incarnation: String) {
    let Some(r) = router.upgrade() else { return };
    let every = (r.shared.cfg.node_ttl / 3).max(Duration::from_millis(100));
    drop(r);
    loop {
        tokio::time::sleep(every).await;
        let Some(r) = router.upgrade() else { return };
        let s = r.shared.clone();
        if s.stopping.load(Ordering::SeqCst) {
            return;
        }
        let ttl = s.cfg.node_ttl.as_millis() as u64;
        let mut inv = s.scripts.refresh.prepare_invoke();
        inv.arg(&s.cfg.node_id).arg(&incarnation).arg(ttl);
        let refresh = inv.invoke_async::<i64>(&mut con);
        let state = match tokio::time::timeout(REDIS_TIMEOUT, refresh).await {
            Ok(Ok(1)) if !s.needs_reset.load(Ordering::SeqCst) => Ok(true),
            Ok(Ok(-1)) => {
                tracing::error!(node = %s.cfg.node_id, "another live process uses this --node-id; give each node its own");
                Ok(false)
            }
            Ok(Ok(_)) => Ok(false),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("timed out".to_owned()),
        };
        match state {
            Ok(true) => {
                let mut inv = s.scripts.reap.prepare_invoke();
                inv.arg("");
                let reap = inv.invoke_async::<i64>(&mut con);
                match tokio::time::timeout(REDIS_TIMEOUT, reap).await {
                    Ok(Ok(n)) if n > 0 => tracing::info!("ended {n} sessions of nodes that stopped answering"),
                    Ok(Err(e)) => tracing::warn!("could not check for dead nodes: {e}"),
                    _ => {}
                }
                if !s.registered.swap(true, Ordering::SeqCst) {
                    tracing::info!("Redis is back; accepting joins again");
                }
            }
            Ok(false) => {
                // Presumed dead by the others, or Redis lost its data: our sessions are gone cluster-wide.
                s.registered.store(false, Ordering::SeqCst);
                r.reset();
                s.needs_reset.store(false, Ordering::SeqCst);
                incarnation = random_node_id();
                match tokio::time::timeout(REDIS_TIMEOUT, register(&s, &mut con, &incarnation)).await {
                    Ok(Ok(true)) => {
                        s.registered.store(true, Ordering::SeqCst);
                        tracing::info!(node = %s.cfg.node_id, "registered again; accepting joins");
                    }
                    Ok(Ok(false)) => tracing::error!(node = %s.cfg.node_id, "node id taken by a live node"),
                    Ok(Err(e)) => tracing::warn!("could not register with Redis: {e}"),
                    Err(_) => tracing::warn!("could not register with Redis: timed out"),
                }
            }
            Err(e) => {
                if s.registered.swap(false, Ordering::SeqCst) {
                    tracing::error!("Redis unavailable ({e}): refusing joins, /healthz reports 503");
                }
            }
        }
    }
}

/// Resume-grace expiry and hand-over timeouts.
async fn timer(router: Weak<ClusterRouter>) {
    const MAX_SLEEP: Duration = Duration::from_millis(250);
    loop {
        let next = {
            let Some(r) = router.upgrade() else { return };
            let mut inner = r.inner.lock();
            let now = Instant::now();
            inner.rooms.tick(now);
            let late: Vec<String> = inner
                .awaiting
                .iter()
                .filter(|(_, t)| now.duration_since(**t) >= HANDOVER_WAIT)
                .map(|(k, _)| k.clone())
                .collect();
            for id in late {
                tracing::warn!(peer = %id, "no queue from the old node in time; resuming without it");
                inner.awaiting.remove(&id);
                inner.rooms.handover(&id, Vec::new(), now);
            }
            r.dispatch(&mut inner);
            inner.rooms.poll_timeout().map_or(now + MAX_SLEEP, |t| t.min(now + MAX_SLEEP))
        };
        tokio::time::sleep_until(next.into()).await;
    }
}
