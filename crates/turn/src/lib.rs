//! webcall's built-in STUN/TURN server (RFC 8489 binding, RFC 8656 TURN over UDP, TCP and TLS) with
//! TURN REST credentials compatible with coturn's `use-auth-secret`.
//!
//! - [`TurnCore`]: the allocation/permission/channel logic as a state machine without I/O (`core/`: allocations,
//!   permissions and channels, credentials and nonces, quotas); [`framing`] splits TCP/TLS streams into frames.
//! - [`defaults`]: every default, in one place.
//! - [`TurnServer::start`]: binds sockets and spawns tokio tasks around it, returns a [`TurnHandle`].
//! - [`IceMinter`]: mints `iceServers` for the signaling `welcome`; a `webcall_protocol::IceProvider`.
//! - [`TurnArgs`]: the `--turn-*` flags (clap) and `[turn]` config table (serde).
//!
//! Embedding (inside a tokio runtime):
//!
//! ```no_run
//! # async fn f(cli: webcall_turn::TurnArgs, file: webcall_turn::TurnArgs) -> Result<(), webcall_turn::TurnError> {
//! let cfg = cli.or(file).into_config(None)?; // Some(Arc<rustls::ServerConfig>) for --turns-listen
//! let turn = webcall_turn::TurnServer::start(cfg).await?; // keep `turn` alive: dropping it stops the server
//! let ice: Box<dyn webcall_protocol::IceProvider> = Box::new(turn.ice_minter());
//! // ... Rooms::new(room_config, ice) ...; after reloading the certificate (SIGHUP):
//! // turn.set_tls(new_server_config); // new TURNS connections use it
//! // on shutdown:
//! turn.shutdown().await;
//! # Ok(()) }
//! ```

pub mod auth;
pub mod config;
pub mod core;
pub mod defaults;
pub mod framing;
mod net;
pub mod stun;

use std::net::SocketAddr;
use std::time::Duration;

pub use crate::auth::{long_term_key, rest_password, rest_username, IceMinter};
pub use crate::config::{PortRange, TurnArgs, TurnConfig};
pub use crate::core::{CoreConfig, CoreStats, FiveTuple, Output, PeerSend, RelayPort, Transport, TurnCore};
pub use crate::net::{TurnHandle, TurnServer};

#[derive(Debug, thiserror::Error)]
pub enum TurnError {
    #[error("cannot bind TURN {proto} on {addr}: {source} (is another TURN server such as coturn running? pass --turn-listen with a free address)")]
    Bind { proto: &'static str, addr: SocketAddr, source: std::io::Error },
    #[error("TURN listens on the wildcard address {0}: pass --turn-external-ip with the address clients reach, so relay candidates and iceServers URLs are reachable")]
    NeedExternalIp(SocketAddr),
    #[error("--turns-listen {0} needs a TLS certificate: configure the server certificate, or drop --turns-listen")]
    TlsWithoutCert(SocketAddr),
    #[error("bad --turn-relay-ports '{0}': expected MIN-MAX with 1 <= MIN <= MAX <= 65535, e.g. 49152-65535")]
    BadPortRange(String),
    #[error("--turn-secret is empty: give a non-empty secret, or leave it out for a random one")]
    EmptySecret,
    #[error("--turn-max-lifetime {0:?} is below the 600 s default allocation lifetime: pass at least 10m")]
    BadMaxLifetime(Duration),
    #[error("TURN I/O error while {0}: {1}")]
    Io(&'static str, std::io::Error),
}
