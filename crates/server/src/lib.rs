//! `webcall serve`: HTTP (web client, health) and the signaling WebSocket, around a [`router::Router`].

pub mod config;
pub mod router;
mod web;
mod ws;

pub use config::{ConfigError, ServeArgs, ServeConfig};
pub use router::{LocalRouter, Router};

use axum::extract::{Path, State, WebSocketUpgrade};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use webcall_rooms::IceProvider;

pub(crate) struct AppState {
    pub cfg: ServeConfig,
    pub router: Arc<dyn Router>,
    pub next_conn: AtomicU64,
    pub connections: AtomicUsize,
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot listen on {addr}: {source} (is another server using it? pick another with --listen)")]
    Bind { addr: SocketAddr, source: std::io::Error },
}

/// A running server.
pub struct Server {
    pub local_addr: SocketAddr,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Server {
    /// Runs until the listener fails.
    pub async fn wait(self) -> std::io::Result<()> {
        self.task.await.unwrap_or_else(|e| Err(std::io::Error::other(e)))
    }
}

/// Binds and starts serving with rooms kept in this process.
pub async fn serve(cfg: ServeConfig, ice: Box<dyn IceProvider>) -> Result<Server, ServeError> {
    let router = LocalRouter::start(cfg.rooms.clone(), ice);
    serve_with(cfg, router).await
}

/// Binds and starts serving with the given router.
pub async fn serve_with(cfg: ServeConfig, router: Arc<dyn Router>) -> Result<Server, ServeError> {
    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .map_err(|source| ServeError::Bind { addr: cfg.listen, source })?;
    let local_addr = listener.local_addr().map_err(|source| ServeError::Bind { addr: cfg.listen, source })?;
    let state = Arc::new(AppState { cfg, router, next_conn: AtomicU64::new(1), connections: AtomicUsize::new(0) });
    let app = axum::Router::new()
        .route("/ws", get(ws_upgrade))
        .route("/healthz", get(healthz))
        .route("/", get(|| async { web::asset("index.html") }))
        .route("/r/{room}", get(call_page))
        .route("/{*path}", get(|Path(path): Path<String>| async move { web::asset(&path) }))
        .with_state(state);
    let task = tokio::spawn(async move {
        axum::serve(listener, app.into_make_service_with_connect_info::<SocketAddr>()).await
    });
    Ok(Server { local_addr, task })
}

async fn healthz(State(state): State<Arc<AppState>>) -> Response {
    if state.router.healthy() {
        (StatusCode::OK, "ok\n").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not accepting joins: room backend unavailable\n").into_response()
    }
}

async fn call_page(Path(room): Path<String>) -> Response {
    if !webcall_protocol::valid_room_name(&room) {
        return (StatusCode::BAD_REQUEST, "room names are 1-64 characters of A-Z a-z 0-9 _ -\n").into_response();
    }
    web::asset("call.html")
}

async fn ws_upgrade(ws: WebSocketUpgrade, State(state): State<Arc<AppState>>) -> Response {
    let n = state.connections.fetch_add(1, Ordering::Relaxed);
    if n >= state.cfg.max_connections {
        state.connections.fetch_sub(1, Ordering::Relaxed);
        return (StatusCode::SERVICE_UNAVAILABLE, "server full: too many connections; try later\n").into_response();
    }
    // Frames between the configured limit and twice it reach the core, which answers `too-large`; larger ones
    // are cut off by the transport without being buffered.
    let cap = state.cfg.rooms.max_message_size * 2;
    ws.max_message_size(cap)
        .max_frame_size(cap)
        .read_buffer_size(4096)
        .write_buffer_size(0)
        .on_failed_upgrade({
            let state = state.clone();
            move |e| {
                state.connections.fetch_sub(1, Ordering::Relaxed);
                tracing::debug!("WebSocket upgrade failed: {e}");
            }
        })
        .on_upgrade(move |socket| ws::run(socket, state))
}
