//! `webcall serve`: HTTP (web client, health, metrics) and the signaling WebSocket, around a [`router::Router`].

pub mod access;
pub mod config;
pub mod ice;
pub mod metrics;
mod recording;
pub mod router;
pub mod sfu;
pub mod tls;
mod upgrade;
mod web;
mod whip;
mod ws;

pub use access::ServerPolicy;
pub use config::{ConfigError, IceSource, ServeArgs, ServeConfig, TlsSource};
pub use router::{LocalRouter, Router};

use axum::extract::FromRequestParts;
use axum::extract::{ConnectInfo, Path, State};
use axum::http::{header, request::Parts, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum_server::tls_rustls::RustlsAcceptor;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use upgrade::WebSocketUpgrade;
use webcall_protocol::{ErrorCode, ProtocolError};
use webcall_rooms::IceProvider;

/// A TLS handshake must be done within this.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// A connection must send its first request within this of being accepted (after the TLS handshake), and every
/// request's headers within this of the previous response (or of the first byte): silent, dribbling and idle
/// keep-alive connections are closed.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// The HTTP timeouts every listener gets (see [`HEADER_TIMEOUT`]).
fn bounded<A>(mut server: axum_server::Server<SocketAddr, A>) -> axum_server::Server<SocketAddr, A> {
    server.http_builder().http1().header_read_timeout(HEADER_TIMEOUT);
    server.first_request_timeout(HEADER_TIMEOUT)
}

/// Renders extra Prometheus lines (e.g. TURN figures) into `/metrics`.
pub type MetricsHook = Arc<dyn Fn(&mut String) + Send + Sync>;

pub(crate) struct AppState {
    pub cfg: ServeConfig,
    pub router: Arc<dyn Router>,
    pub policy: Arc<ServerPolicy>,
    pub next_conn: AtomicU64,
    pub connections: AtomicUsize,
    pub per_ip: Mutex<HashMap<IpAddr, usize>>,
    pub counters: metrics::AdapterCounters,
    pub metrics_hook: Mutex<Option<MetricsHook>>,
    /// The SFU, for WHIP and WHEP (set once, by [`Server::set_sfu`]).
    pub sfu: std::sync::OnceLock<webcall_sfu::net::SfuHandle>,
    pub whip: whip::Resources,
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot listen on {addr}: {source} (is another server using it? pick another with --listen)")]
    Bind { addr: SocketAddr, source: std::io::Error },
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
}

/// A running server.
pub struct Server {
    pub local_addr: SocketAddr,
    /// `https` when serving TLS, else `http`.
    pub scheme: &'static str,
    /// The certificate's SHA-256 fingerprint when serving TLS.
    pub fingerprint: Option<String>,
    /// The TLS settings (to reload on SIGHUP, or to share with TURN over TLS).
    pub tls: Option<tls::Tls>,
    state: Arc<AppState>,
    handle: axum_server::Handle<SocketAddr>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Server {
    /// Runs until the listener fails or [`Server::shutdown`] completes.
    pub async fn wait(&mut self) -> std::io::Result<()> {
        (&mut self.task).await.unwrap_or_else(|e| Err(std::io::Error::other(e)))
    }

    /// Adds lines to `/metrics`.
    pub fn set_metrics_hook(&self, hook: MetricsHook) {
        *self.state.metrics_hook.lock() = Some(hook);
    }

    /// Serves WHIP and WHEP into this SFU (the one the router's SFU rooms use).
    pub fn set_sfu(&self, sfu: webcall_sfu::net::SfuHandle) {
        let _ = self.state.sfu.set(sfu);
    }

    pub fn router(&self) -> Arc<dyn Router> {
        self.state.router.clone()
    }

    /// Graceful shutdown: stop accepting, tell every client (`server-shutdown`, close 1001), wait up to
    /// `--shutdown-timeout` for them to go. Returns how many connections were still open at the deadline.
    pub async fn shutdown(mut self) -> usize {
        let timeout = self.state.cfg.shutdown_timeout;
        self.handle.graceful_shutdown(Some(timeout));
        self.state.router.shutdown();
        let deadline = Instant::now() + timeout;
        while self.state.connections.load(Ordering::Relaxed) > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let left = self.state.connections.load(Ordering::Relaxed);
        self.handle.shutdown();
        let _ = self.wait().await;
        left
    }
}

/// The join policy for these settings (tokens, per-address join rate).
pub fn policy(cfg: &ServeConfig) -> Arc<ServerPolicy> {
    Arc::new(ServerPolicy::new(cfg.auth_secret.clone(), cfg.max_joins_per_ip))
}

/// Binds and starts serving with rooms kept in this process.
pub async fn serve(cfg: ServeConfig, ice: Box<dyn IceProvider>) -> Result<Server, ServeError> {
    let policy = policy(&cfg);
    let router = LocalRouter::start_with(cfg.rooms.clone(), ice, Box::new(policy.clone()));
    serve_with(cfg, router, policy).await
}

/// Binds and starts serving with the given router; `policy` must be the one the router's core uses.
pub async fn serve_with(
    cfg: ServeConfig,
    router: Arc<dyn Router>,
    policy: Arc<ServerPolicy>,
) -> Result<Server, ServeError> {
    let tls = match &cfg.tls {
        Some(source) => Some(tls::load(source).await?),
        None => None,
    };
    serve_prepared(cfg, router, policy, tls).await
}

/// Like [`serve_with`], with the TLS certificate already loaded (so TURN over TLS can share it).
pub async fn serve_prepared(
    cfg: ServeConfig,
    router: Arc<dyn Router>,
    policy: Arc<ServerPolicy>,
    tls: Option<tls::Tls>,
) -> Result<Server, ServeError> {
    let listener =
        std::net::TcpListener::bind(cfg.listen).map_err(|source| ServeError::Bind { addr: cfg.listen, source })?;
    let local_addr = listener.local_addr().map_err(|source| ServeError::Bind { addr: cfg.listen, source })?;
    let state = Arc::new(AppState {
        cfg,
        router,
        policy,
        next_conn: AtomicU64::new(1),
        connections: AtomicUsize::new(0),
        per_ip: Mutex::new(HashMap::new()),
        counters: Default::default(),
        metrics_hook: Mutex::new(None),
        sfu: std::sync::OnceLock::new(),
        whip: Default::default(),
    });
    let app = axum::Router::new()
        .route("/ws", get(ws_upgrade))
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .route("/", get(|| async { web::asset("index.html") }))
        .route("/r/{room}", get(call_page))
        .route("/api/rooms/{room}/recording", post(recording::start).delete(recording::stop))
        .route("/whip/{room}", post(whip::whip_post).options(whip::options).get(whip::explain))
        .route(
            "/whip/{room}/{id}",
            axum::routing::patch(whip::whip_patch).delete(whip::whip_delete).options(whip::options),
        )
        .route("/whep/{room}", post(whip::whep_post).options(whip::options).get(whip::explain))
        .route(
            "/whep/{room}/{id}",
            axum::routing::patch(whip::whep_patch).delete(whip::whep_delete).options(whip::options),
        )
        .route("/{*path}", get(|Path(path): Path<String>| async move { web::asset(&path) }))
        .layer(axum::middleware::map_response(web::security_headers))
        .with_state(state.clone())
        .into_make_service_with_connect_info::<SocketAddr>();
    let handle = axum_server::Handle::new();
    // Signaling is small frames each way: with Nagle on, a relayed offer could wait for the peer's delayed ACK of
    // the previous frame (up to 40 ms; measured in the native call benchmark). On Linux accepted sockets inherit
    // TCP_NODELAY from the listener, which saves a system call per connection.
    #[cfg(target_os = "linux")]
    socket2::SockRef::from(&listener)
        .set_tcp_nodelay(true)
        .map_err(|source| ServeError::Bind { addr: local_addr, source })?;
    let bind_err = |source| ServeError::Bind { addr: local_addr, source };
    let cap = access::ConnCap::new(
        state.cfg.max_connections_per_ip,
        state.cfg.trusted_proxies.clone(),
        state.counters.refused_tcp_per_ip.clone(),
    );
    let (scheme, fingerprint, task) = match &tls {
        Some(t) => {
            let acceptor = RustlsAcceptor::new(t.config.clone())
                .handshake_timeout(HANDSHAKE_TIMEOUT)
                .acceptor(web::PlainHttpRedirect(cap));
            let server = bounded(axum_server::from_tcp(listener).map_err(bind_err)?.acceptor(acceptor));
            ("https", Some(t.fingerprint.clone()), tokio::spawn(server.handle(handle.clone()).serve(app)))
        }
        None => {
            let server = bounded(axum_server::from_tcp(listener).map_err(bind_err)?.acceptor(cap));
            ("http", None, tokio::spawn(server.handle(handle.clone()).serve(app)))
        }
    };
    Ok(Server { local_addr, scheme, fingerprint, tls, state, handle, task })
}

async fn healthz(State(state): State<Arc<AppState>>) -> Response {
    if state.router.healthy() {
        (StatusCode::OK, "ok\n").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not accepting joins: room backend unavailable\n").into_response()
    }
}

async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    let mut extra = String::new();
    if let Some(hook) = state.metrics_hook.lock().clone() {
        hook(&mut extra);
    }
    if state.sfu.get().is_some() {
        whip::metrics(&state, &mut extra);
    }
    let body = metrics::render(state.router.stats(), &state.router.counters(), &state.counters, &extra);
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body).into_response()
}

async fn call_page(Path(room): Path<String>) -> Response {
    if !webcall_protocol::valid_room_name(&room) {
        return web::bad_room_page();
    }
    web::asset("call.html")
}

fn origin_allowed(allowed: &[String], origin: Option<&str>) -> bool {
    let Some(origin) = origin else { return false };
    let origin = origin.trim_end_matches('/');
    allowed.iter().any(|a| a.trim_end_matches('/').eq_ignore_ascii_case(origin))
}

/// The request headers the upgrade handler reads, taken out of the request without cloning its `HeaderMap` (as
/// the `HeaderMap` extractor does, for every connection).
struct ClientHeaders {
    origin: Option<HeaderValue>,
    forwarded_for: Option<HeaderValue>,
}

impl<S: Send + Sync> FromRequestParts<S> for ClientHeaders {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        let origin = parts.headers.get(header::ORIGIN).cloned();
        Ok(ClientHeaders { origin, forwarded_for: parts.headers.get("x-forwarded-for").cloned() })
    }
}

async fn ws_upgrade(
    ws: WebSocketUpgrade,
    State(state): State<Arc<AppState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: ClientHeaders,
) -> Response {
    if let Some(allowed) = &state.cfg.allowed_origins {
        let origin = headers.origin.as_ref().and_then(|v| v.to_str().ok());
        if !origin_allowed(allowed, origin) {
            state.counters.refused_origin.fetch_add(1, Ordering::Relaxed);
            let shown = origin.unwrap_or("(none)");
            return (
                StatusCode::FORBIDDEN,
                format!("origin {shown} is not allowed on this server (--allowed-origins)\n"),
            )
                .into_response();
        }
    }
    let xff = headers.forwarded_for.as_ref().and_then(|v| v.to_str().ok());
    let ip = access::client_ip(peer.ip(), xff, &state.cfg.trusted_proxies);
    let n = state.connections.fetch_add(1, Ordering::Relaxed);
    if n >= state.cfg.max_connections {
        state.connections.fetch_sub(1, Ordering::Relaxed);
        state.counters.refused_server_full.fetch_add(1, Ordering::Relaxed);
        return (StatusCode::SERVICE_UNAVAILABLE, "server full: too many connections; try later\n").into_response();
    }
    let key = access::addr_key(ip);
    let over_ip_limit = {
        let mut per_ip = state.per_ip.lock();
        let count = per_ip.entry(key).or_insert(0);
        *count += 1;
        *count > state.cfg.max_connections_per_ip
    };
    // Frames between the configured limit and twice it reach the core, which answers `too-large`; larger ones
    // are cut off by the transport without being buffered.
    let cap = state.cfg.rooms.max_message_size * 2;
    let failed_state = state.clone();
    ws.max_message_size(cap)
        .on_failed_upgrade(move |e| {
            release(&failed_state, key);
            tracing::debug!("WebSocket upgrade failed: {e}");
        })
        .on_upgrade(move |socket| async move {
            if over_ip_limit {
                state.counters.refused_per_ip.fetch_add(1, Ordering::Relaxed);
                let limit = state.cfg.max_connections_per_ip;
                let e = ProtocolError::new(
                    ErrorCode::RateLimited,
                    format!("more than {limit} connections from your address"),
                );
                // Rare: boxed so that its state does not add to every connection's future.
                Box::pin(ws::refuse(socket, e)).await;
            } else {
                ws::run(socket, state.clone(), ip).await;
            }
            release(&state, key);
        })
}

/// `key` is the client's [`access::addr_key`].
fn release(state: &AppState, key: IpAddr) {
    state.connections.fetch_sub(1, Ordering::Relaxed);
    let mut per_ip = state.per_ip.lock();
    if let Some(n) = per_ip.get_mut(&key) {
        *n -= 1;
        if *n == 0 {
            per_ip.remove(&key);
        }
    }
}
