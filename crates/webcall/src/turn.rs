//! `webcall turn`: the built-in STUN/TURN server alone (e.g. on its own machine beside several signaling nodes,
//! all sharing --turn-secret).

use std::io::Write;
use std::path::PathBuf;

/// Run only the STUN/TURN server.
#[derive(clap::Args)]
pub struct TurnCmdArgs {
    #[command(flatten)]
    turn: webcall_turn::TurnArgs,
    /// PEM certificate chain for TURN over TLS (--turns-listen).
    #[arg(long, env = "WEBCALL_TLS_CERT", value_name = "FILE", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// PEM private key for --tls-cert.
    #[arg(long, env = "WEBCALL_TLS_KEY", value_name = "FILE", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
}

pub async fn run(a: TurnCmdArgs) -> anyhow::Result<()> {
    // Before the server starts: a SIGTERM or SIGINT right after the banner must not kill it without its shutdown.
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    let tls = match (a.tls_cert, a.tls_key) {
        (Some(cert), Some(key)) => {
            Some(webcall_server::tls::load(&webcall_server::TlsSource::Files { cert, key }).await?.config.get_inner())
        }
        _ => None,
    };
    let random_secret = a.turn.secret.is_none();
    let cfg = a.turn.into_config(tls)?;
    if random_secret {
        // Without the secret nobody can mint credentials for this server.
        println!("webcall TURN secret (random; pass --turn-secret to choose one) {}", cfg.secret);
    }
    let handle = webcall_turn::TurnServer::start(cfg).await?;
    let turns = handle.tls_addr().map(|a| format!(", turns {a}")).unwrap_or_default();
    println!("webcall STUN/TURN on udp+tcp {}{turns}", handle.addr());
    std::io::stdout().flush()?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    handle.shutdown().await;
    Ok(())
}
