//! What the integration tests share: starting a server on loopback.

use std::sync::Arc;

use webcall_turn::{TurnArgs, TurnConfig, TurnHandle, TurnServer};

/// A server as `webcall turn` builds it from its flags: UDP and TCP on one free port of 127.0.0.1, TURN over
/// TLS on another when `tls` is given; `edit` adjusts the resolved configuration before the start.
pub async fn start(
    secret: &str,
    tls: Option<Arc<rustls::ServerConfig>>,
    edit: impl FnOnce(&mut TurnConfig),
) -> TurnHandle {
    let mut cfg = TurnArgs {
        listen: Some("127.0.0.1:0".parse().unwrap()),
        turns_listen: tls.is_some().then(|| "127.0.0.1:0".parse().unwrap()),
        secret: Some(secret.into()),
        ..Default::default()
    }
    .into_config(tls)
    .unwrap();
    edit(&mut cfg);
    TurnServer::start(cfg).await.unwrap()
}

/// Lets the relay reach peers on loopback (refused by default).
#[allow(dead_code)] // each test binary compiles this module; not all of them relay
pub fn allow_loopback(cfg: &mut TurnConfig) {
    cfg.allow_peers = vec!["127.0.0.0/8".parse().unwrap()];
}
