//! The seam between the WebSocket layer and room state. [`LocalRouter`] keeps rooms in this process; a
//! Redis-backed router shares them across nodes behind the same trait.

use parking_lot::Mutex;
use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::Notify;
use webcall_rooms::{
    ConnId, Counters, Frame, IceProvider, IceServer, JoinPolicy, OpenPolicy, Output, Rooms, Stats, WatchRefusal,
};

/// What the WebSocket task of one connection shares with the router.
#[derive(Default)]
pub struct ConnSignal {
    /// Frames are ready to take, or a close was asked for (also while a write is in progress, so a write stuck on a
    /// peer that stopped reading can be abandoned).
    pub wake: Notify,
    close: Mutex<Option<(u16, &'static str)>>,
}

impl ConnSignal {
    pub fn request_close(&self, code: u16, reason: &'static str) {
        self.close.lock().get_or_insert((code, reason));
        self.wake.notify_one();
    }
    pub fn close_requested(&self) -> Option<(u16, &'static str)> {
        *self.close.lock()
    }
}

pub trait Router: Send + Sync + 'static {
    fn connect(&self, conn: ConnId, signal: Arc<ConnSignal>);
    fn message(&self, conn: ConnId, text: &str);
    fn binary(&self, conn: ConnId, len: usize);
    /// Appends the frames queued for `conn` to `buf`.
    fn take(&self, conn: ConnId, buf: &mut Vec<Frame>);
    fn disconnect(&self, conn: ConnId);
    fn stats(&self) -> Stats;
    fn counters(&self) -> Counters;
    /// Tells every local client the server is going away and refuses joins from now on.
    fn shutdown(&self);
    /// [`Router::connect`] for a client of the server's own that can only use the SFU (a WHIP publisher), see
    /// [`Rooms::connect_sfu_only`]. Routers without SFU rooms connect it as any client.
    fn connect_sfu_only(&self, conn: ConnId, signal: Arc<ConnSignal>) {
        self.connect(conn, signal)
    }
    /// May `room` be watched without joining (WHEP)? See [`Rooms::admit_viewer`].
    fn admit_viewer(
        &self,
        _room: &str,
        _password: Option<&str>,
        _viewer: &str,
    ) -> Result<Vec<IceServer>, WatchRefusal> {
        Err(WatchRefusal::NotSfu)
    }
    /// `false` while the router cannot serve joins (e.g. its backing store is down).
    fn healthy(&self) -> bool {
        true
    }
}

struct Inner {
    rooms: Rooms,
    /// Keyed by connection ids the server picks, so a fast hash is safe.
    signals: HashMap<ConnId, Arc<ConnSignal>, rustc_hash::FxBuildHasher>,
    sfu: Option<crate::sfu::SfuBridge>,
}

/// Passes one output of the room core to the WebSocket task it concerns (any router uses this).
pub fn signal_output<S: BuildHasher>(signals: &HashMap<ConnId, Arc<ConnSignal>, S>, out: Output) {
    match out {
        Output::Wake(conn) => {
            if let Some(s) = signals.get(&conn) {
                s.wake.notify_one();
            }
        }
        Output::Close { conn, code, reason } => {
            if let Some(s) = signals.get(&conn) {
                s.request_close(code, reason);
            }
        }
    }
}

/// A map keeps its peak capacity; give it back once it is mostly empty (after load), at a quarter full so that
/// shrinking stays rare.
pub fn shrink_sparse<K: Eq + std::hash::Hash, V, S: BuildHasher>(m: &mut HashMap<K, V, S>) {
    if m.capacity() > 64 && m.len() * 4 < m.capacity() {
        m.shrink_to_fit();
    }
}

impl Inner {
    fn dispatch(&mut self) {
        while let Some(out) = self.rooms.poll_output() {
            signal_output(&self.signals, out);
        }
        while let Some(req) = self.rooms.poll_sfu() {
            match &mut self.sfu {
                Some(bridge) => bridge.route(req),
                None => tracing::warn!("an SFU room without an SFU running; request dropped"),
            }
        }
    }
}

/// Rooms in this process: one lock around the sans-IO core, held only to feed an input and hand out wake-ups.
pub struct LocalRouter {
    inner: Mutex<Inner>,
}

impl LocalRouter {
    /// Creates the router and spawns its timer task (resume-grace expiry).
    pub fn start(cfg: webcall_rooms::Config, ice: Box<dyn IceProvider>) -> Arc<LocalRouter> {
        Self::start_with(cfg, ice, Box::new(OpenPolicy))
    }

    /// Like [`LocalRouter::start`], with a join policy.
    pub fn start_with(
        cfg: webcall_rooms::Config,
        ice: Box<dyn IceProvider>,
        policy: Box<dyn JoinPolicy>,
    ) -> Arc<LocalRouter> {
        let router = Arc::new(LocalRouter {
            inner: Mutex::new(Inner {
                rooms: Rooms::new(cfg, ice).with_policy(policy),
                signals: HashMap::default(),
                sfu: None,
            }),
        });
        let weak = Arc::downgrade(&router);
        tokio::spawn(async move {
            // Deadlines only ever get later, so a capped sleep never misses one by more than the cap.
            const MAX_SLEEP: Duration = Duration::from_millis(250);
            loop {
                let next = {
                    let Some(r) = weak.upgrade() else { return };
                    let mut inner = r.inner.lock();
                    let now = Instant::now();
                    inner.rooms.tick(now);
                    inner.dispatch();
                    inner.rooms.poll_timeout().map_or(now + MAX_SLEEP, |t| t.min(now + MAX_SLEEP))
                };
                tokio::time::sleep_until(next.into()).await;
            }
        });
        router
    }

    /// Sends the media of SFU rooms through `sfu` (rooms become SFU rooms per `--topology`).
    pub fn set_sfu(self: &Arc<Self>, sfu: webcall_sfu::net::SfuHandle) {
        let bridge = crate::sfu::SfuBridge::new(sfu, Arc::downgrade(self));
        self.inner.lock().sfu = Some(bridge);
    }

    /// Queues a frame from the SFU for `peer`.
    pub(crate) fn sfu_frame(&self, peer: &str, frame: String) {
        self.with(|r, _| {
            r.sfu_frame(peer, Arc::from(frame));
        });
    }

    fn with(&self, f: impl FnOnce(&mut Rooms, Instant)) {
        let mut inner = self.inner.lock();
        f(&mut inner.rooms, Instant::now());
        inner.dispatch();
    }
}

impl Router for LocalRouter {
    fn connect(&self, conn: ConnId, signal: Arc<ConnSignal>) {
        let mut inner = self.inner.lock();
        inner.signals.insert(conn, signal);
        inner.rooms.connect(conn, Instant::now());
    }
    fn connect_sfu_only(&self, conn: ConnId, signal: Arc<ConnSignal>) {
        let mut inner = self.inner.lock();
        inner.signals.insert(conn, signal);
        inner.rooms.connect_sfu_only(conn, Instant::now());
    }
    fn admit_viewer(&self, room: &str, password: Option<&str>, viewer: &str) -> Result<Vec<IceServer>, WatchRefusal> {
        self.inner.lock().rooms.admit_viewer(room, password, viewer, Instant::now())
    }
    fn message(&self, conn: ConnId, text: &str) {
        self.with(|r, now| r.message(conn, text, now));
    }
    fn binary(&self, conn: ConnId, len: usize) {
        self.with(|r, now| r.binary(conn, len, now));
    }
    fn take(&self, conn: ConnId, buf: &mut Vec<Frame>) {
        self.inner.lock().rooms.take(conn, buf);
    }
    fn disconnect(&self, conn: ConnId) {
        let mut inner = self.inner.lock();
        inner.signals.remove(&conn);
        shrink_sparse(&mut inner.signals);
        inner.rooms.disconnect(conn, Instant::now());
        inner.dispatch();
    }
    fn stats(&self) -> Stats {
        self.inner.lock().rooms.stats()
    }
    fn counters(&self) -> Counters {
        self.inner.lock().rooms.counters().clone()
    }
    fn shutdown(&self) {
        self.with(|r, now| r.shutdown(now));
    }
}
