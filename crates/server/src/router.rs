//! The seam between the WebSocket layer and room state. [`LocalRouter`] keeps rooms in this process; the
//! Redis-backed router (crates/cluster) shares them across nodes behind the same trait. Both are a [`Driver`]: one
//! lock around a sans-IO core, its outputs handed to the connections, and its timer; the cluster router adds its
//! [`Layer`].

use futures_util::task::AtomicWaker;
use parking_lot::{Mutex, MutexGuard};
use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::task::Poll;
use std::time::{Duration, Instant};
use webcall_rooms::{
    ConnId, Counters, Frame, IceProvider, IceServer, JoinPolicy, OpenPolicy, Output, RecordRefusal, RoomCore, Rooms,
    SfuRequest, Stats, WatchRefusal,
};

/// A wake-up for the one task that waits on it: [`Wake::notify_one`] leaves a permit (and wakes the task if it is
/// waiting), [`Wake::notified`] waits for the permit and takes it. `tokio::sync::Notify` does the same for any
/// number of waiters, through a locked waiter list that every wait joins and leaves: ~3.5 % of the server's CPU
/// in a relay (perf, one wait per relayed message); here a wait is two atomic swaps and a waker registration.
#[derive(Default)]
pub struct Wake {
    permit: AtomicBool,
    waker: AtomicWaker,
}

impl Wake {
    pub fn notify_one(&self) {
        self.permit.store(true, Ordering::Release);
        self.waker.wake();
    }

    /// Ready once a permit is there (one left before the wait counts). One task at a time may wait.
    pub fn notified(&self) -> impl std::future::Future<Output = ()> + '_ {
        std::future::poll_fn(move |cx| {
            if self.permit.swap(false, Ordering::Acquire) {
                return Poll::Ready(());
            }
            self.waker.register(cx.waker());
            // A permit left between the check and the registration would otherwise wait for the next one.
            if self.permit.swap(false, Ordering::Acquire) {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        })
    }
}

/// What the WebSocket task of one connection shares with the router.
#[derive(Default)]
pub struct ConnSignal {
    /// Frames are ready to take, or a close was asked for (also while a write is in progress, so a write stuck on a
    /// peer that stopped reading can be abandoned).
    pub wake: Wake,
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
    /// [`Router::message`] of a frame read at `now`: the reader read the clock already (one read per relayed
    /// message instead of two: ~0.5 % of the relay's CPU).
    fn message_at(&self, conn: ConnId, text: &str, now: Instant) {
        let _ = now;
        self.message(conn, text)
    }
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
    /// Starts or stops recording `room` (the HTTP API); see [`Rooms::set_recording`]. Routers without SFU rooms
    /// refuse.
    fn set_recording(&self, _room: &str, _start: bool, _by: &str) -> Result<bool, RecordRefusal> {
        Err(RecordRefusal::Clustered)
    }
    /// `false` while the router cannot serve joins (e.g. its backing store is down).
    fn healthy(&self) -> bool {
        true
    }
}

/// Passes one connection output of the room core to the WebSocket task it concerns.
fn signal_output<S: BuildHasher>(
    signals: &HashMap<ConnId, Arc<ConnSignal>, S>,
    conn: ConnId,
    close: Option<(u16, &'static str)>,
) {
    if let Some(s) = signals.get(&conn) {
        match close {
            None => s.wake.notify_one(),
            Some((code, reason)) => s.request_close(code, reason),
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

/// What a router adds around the room core `C`. The single-node router adds nothing (`()`); the cluster router
/// takes the cluster layer's outputs, runs its links and its own timeouts.
pub trait Layer<C: RoomCore>: Send + 'static {
    /// An [`Output::Layer`] of the core; may feed the core again (what that puts out is dispatched in turn).
    fn layer_output(&mut self, core: &mut C, out: C::Extra, now: Instant) {
        let _ = (core, now);
        tracing::warn!("a layer output without a layer: {out:?}");
    }
    /// An SFU request of the core: what comes back goes to this node's SFU. The cluster sends the requests of rooms
    /// whose SFU runs on another node there instead.
    fn sfu_request(&mut self, core: &mut C, req: SfuRequest, now: Instant) -> Option<SfuRequest> {
        let _ = (core, now);
        Some(req)
    }
    /// SFU requests from elsewhere (peers on other nodes) for this node's SFU.
    fn poll_sfu(&mut self) -> Option<SfuRequest> {
        None
    }
    /// After the core's outputs were dispatched.
    fn dispatched(&mut self, core: &mut C, now: Instant) {
        let _ = (core, now);
    }
    /// Timer work, after the core's own `tick`.
    fn tick(&mut self, core: &mut C, now: Instant) {
        let _ = (core, now);
    }
    /// `conn` took its frames (its queue drained); `Some(now)` if more was fed to the core then.
    fn taken(&mut self, core: &mut C, conn: ConnId) -> Option<Instant> {
        let _ = (core, conn);
        None
    }
    /// `conn` is gone.
    fn disconnected(&mut self, conn: ConnId) {
        let _ = conn;
    }
    /// Longest time between two timer steps.
    fn max_sleep(&self) -> Duration {
        // Deadlines only ever get later, so a capped sleep never misses one by more than the cap.
        Duration::from_millis(250)
    }
}

impl<C: RoomCore> Layer<C> for () {}

/// What the driver's lock guards: the core, the connections' signals, the SFU bridge and the layer's state.
pub struct Core<C, L> {
    pub rooms: C,
    /// Keyed by connection ids the server picks, so a fast hash is safe.
    signals: HashMap<ConnId, Arc<ConnSignal>, rustc_hash::FxBuildHasher>,
    sfu: Option<crate::sfu::SfuBridge>,
    pub layer: L,
    /// The latest time fed to the core: a time read before the lock was taken is never earlier (the core's time
    /// only goes forward).
    latest: Instant,
}

impl<C: RoomCore, L: Layer<C>> Core<C, L> {
    /// Acts on everything the core put out; a layer that feeds the core again gets its outputs dispatched too.
    pub fn dispatch(&mut self, now: Instant) {
        while let Some(out) = self.rooms.poll_output() {
            match out {
                Output::Wake(conn) => signal_output(&self.signals, conn, None),
                Output::Close { conn, code, reason } => signal_output(&self.signals, conn, Some((code, reason))),
                Output::Sfu(req) => {
                    if let Some(req) = self.layer.sfu_request(&mut self.rooms, req, now) {
                        self.route_sfu(req);
                    }
                }
                Output::Layer(o) => self.layer.layer_output(&mut self.rooms, o, now),
                // A single node has nobody else to tell (a layer around the core turns this into its own output).
                Output::Left { .. } => {}
                Output::Forward { to, .. } => {
                    tracing::warn!(peer = %to, "a frame for a remote member without a layer around the core; dropped")
                }
            }
        }
        self.layer.dispatched(&mut self.rooms, now);
        while let Some(req) = self.layer.poll_sfu() {
            self.route_sfu(req);
        }
    }

    fn route_sfu(&mut self, req: SfuRequest) {
        match &mut self.sfu {
            Some(bridge) => bridge.route(req),
            None => tracing::warn!("an SFU room without an SFU running; request dropped"),
        }
    }

    /// Sends the media of SFU rooms through `sfu`; its frames for peers go to `sink`.
    pub fn set_sfu(&mut self, sfu: webcall_sfu::net::SfuHandle, sink: Weak<dyn crate::sfu::SfuSink>) {
        self.sfu = Some(crate::sfu::SfuBridge::new(sfu, sink));
    }
}

/// One lock around a sans-IO room core `C` (held only to feed an input and hand out what it put out), with a
/// layer `L` around it.
pub struct Driver<C, L> {
    inner: Mutex<Core<C, L>>,
}

impl<C: RoomCore, L: Layer<C>> Driver<C, L> {
    pub fn new(rooms: C, layer: L) -> Self {
        Driver {
            inner: Mutex::new(Core { rooms, signals: HashMap::default(), sfu: None, layer, latest: Instant::now() }),
        }
    }

    pub fn lock(&self) -> MutexGuard<'_, Core<C, L>> {
        self.inner.lock()
    }

    /// Feeds the core (`f`) and dispatches what it put out.
    pub fn with<R>(&self, f: impl FnOnce(&mut Core<C, L>, Instant) -> R) -> R {
        self.with_at(Instant::now(), f)
    }

    /// [`Driver::with`] at a time the caller read before taking the lock (never earlier than what the core saw).
    pub fn with_at<R>(&self, now: Instant, f: impl FnOnce(&mut Core<C, L>, Instant) -> R) -> R {
        let mut inner = self.inner.lock();
        let now = now.max(inner.latest);
        inner.latest = now;
        let r = f(&mut inner, now);
        inner.dispatch(now);
        r
    }

    /// One timer step: the core's and the layer's timeouts; returns when to step again.
    fn step(&self) -> Instant {
        let mut inner = self.inner.lock();
        let now = Instant::now();
        inner.latest = now;
        inner.rooms.borrow_mut().tick(now);
        let Core { rooms, layer, .. } = &mut *inner;
        layer.tick(rooms, now);
        inner.dispatch(now);
        let cap = now + inner.layer.max_sleep();
        inner.rooms.borrow().poll_timeout().map_or(cap, |t| t.min(cap))
    }

    /// Runs the timer of the router `router` points at (`driver` finds its driver) until the router is dropped.
    pub fn spawn_timer<R: Send + Sync + 'static>(router: Weak<R>, driver: fn(&R) -> &Driver<C, L>) {
        tokio::spawn(async move {
            loop {
                let next = {
                    let Some(r) = router.upgrade() else { return };
                    driver(&r).step()
                };
                tokio::time::sleep_until(next.into()).await;
            }
        });
    }

    pub fn connect(&self, conn: ConnId, signal: Arc<ConnSignal>) {
        // Dispatched: during a shutdown the core answers a new connection at once.
        self.with(|i, now| {
            i.signals.insert(conn, signal);
            i.rooms.borrow_mut().connect(conn, now);
        });
    }
    pub fn message(&self, conn: ConnId, text: &str) {
        self.with(|i, now| i.rooms.message(conn, text, now));
    }
    pub fn message_at(&self, conn: ConnId, text: &str, now: Instant) {
        self.with_at(now, |i, now| i.rooms.message(conn, text, now));
    }
    pub fn binary(&self, conn: ConnId, len: usize) {
        self.with(|i, now| i.rooms.borrow_mut().binary(conn, len, now));
    }
    pub fn take(&self, conn: ConnId, buf: &mut Vec<Frame>) {
        let mut inner = self.inner.lock();
        inner.rooms.borrow_mut().take(conn, buf);
        let Core { rooms, layer, .. } = &mut *inner;
        if let Some(now) = layer.taken(rooms, conn) {
            inner.dispatch(now);
        }
    }
    pub fn disconnect(&self, conn: ConnId) {
        self.with(|i, now| {
            i.signals.remove(&conn);
            shrink_sparse(&mut i.signals);
            i.layer.disconnected(conn);
            i.rooms.disconnect(conn, now);
        });
    }
    pub fn stats(&self) -> Stats {
        self.inner.lock().rooms.borrow().stats()
    }
    pub fn counters(&self) -> Counters {
        self.inner.lock().rooms.borrow().counters().clone()
    }
    pub fn shutdown(&self) {
        self.with(|i, now| i.rooms.borrow_mut().shutdown(now));
    }
}

/// Rooms in this process: the single-node core behind a [`Driver`] with no layer.
pub struct LocalRouter {
    driver: Driver<Rooms, ()>,
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
        let rooms = Rooms::new(cfg, ice, Instant::now()).with_policy(policy);
        let router = Arc::new(LocalRouter { driver: Driver::new(rooms, ()) });
        Driver::spawn_timer(Arc::downgrade(&router), |r: &LocalRouter| &r.driver);
        router
    }

    /// Sends the media of SFU rooms through `sfu` (rooms become SFU rooms per `--topology`).
    pub fn set_sfu(self: &Arc<Self>, sfu: webcall_sfu::net::SfuHandle) {
        let sink: Weak<dyn crate::sfu::SfuSink> = Arc::downgrade(self) as Weak<LocalRouter>;
        self.driver.lock().set_sfu(sfu, sink);
    }
}

impl crate::sfu::SfuSink for LocalRouter {
    /// Queues a frame from the SFU for `peer`.
    fn sfu_frame(&self, peer: &str, frame: String) {
        self.driver.with(|i, _| {
            i.rooms.sfu_frame(peer, Arc::from(frame));
        });
    }
}

impl Router for LocalRouter {
    fn connect(&self, conn: ConnId, signal: Arc<ConnSignal>) {
        self.driver.connect(conn, signal);
    }
    fn connect_sfu_only(&self, conn: ConnId, signal: Arc<ConnSignal>) {
        self.driver.with(|i, now| {
            i.signals.insert(conn, signal);
            i.rooms.connect_sfu_only(conn, now);
        });
    }
    fn admit_viewer(&self, room: &str, password: Option<&str>, viewer: &str) -> Result<Vec<IceServer>, WatchRefusal> {
        self.driver.lock().rooms.admit_viewer(room, password, viewer, Instant::now())
    }
    fn set_recording(&self, room: &str, start: bool, by: &str) -> Result<bool, RecordRefusal> {
        self.driver.with(|i, now| i.rooms.set_recording(room, start, by, now))
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
    fn shutdown(&self) {
        self.driver.shutdown();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A permit left before the wait is taken at once; many notifications before a wait are one permit; a
    /// notification during the wait (from another thread) ends it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_wake_keeps_one_permit_and_ends_a_wait() {
        let w = Arc::new(Wake::default());
        w.notify_one();
        w.notify_one();
        tokio::time::timeout(Duration::from_secs(5), w.notified()).await.expect("the permit left before");
        let second = tokio::time::timeout(Duration::from_millis(50), w.notified()).await;
        assert!(second.is_err(), "two notifications before a wait are one permit");
        for _ in 0..1000 {
            let w2 = w.clone();
            let t = std::thread::spawn(move || w2.notify_one());
            tokio::time::timeout(Duration::from_secs(5), w.notified()).await.expect("woken from another thread");
            t.join().unwrap();
        }
    }

    /// A WebSocket whose upgrade finished just after the shutdown began registers after the core told everyone: it
    /// is told too, at once (wake, `server-shutdown`, close 1001), not left open until the shutdown deadline.
    #[tokio::test]
    async fn a_connection_registered_during_shutdown_is_told_at_once() {
        let router = LocalRouter::start(webcall_rooms::Config::default(), Box::new(|_: &str| Vec::new()));
        let early = Arc::new(ConnSignal::default());
        router.connect(1, early.clone());
        router.shutdown();
        assert_eq!(early.close_requested(), Some((webcall_rooms::close::GOING_AWAY, "server shutting down")));
        let late = Arc::new(ConnSignal::default());
        router.connect(2, late.clone());
        assert_eq!(late.close_requested(), Some((webcall_rooms::close::GOING_AWAY, "server shutting down")));
        tokio::time::timeout(std::time::Duration::from_secs(5), late.wake.notified()).await.expect("woken");
        let mut buf = Vec::new();
        router.take(2, &mut buf);
        assert_eq!(buf.len(), 1, "{buf:?}");
        assert!(buf[0].contains(r#""code":"server-shutdown""#), "{}", buf[0]);
    }
}
