//! `webcall serve`: start the server, print where it listens, and handle signals.

use std::io::Write;
use tokio::signal::unix::{signal, SignalKind};

pub async fn run(args: webcall_server::ServeArgs) -> anyhow::Result<()> {
    let cfg = args.resolve()?;
    let ice: Box<dyn webcall_rooms::IceProvider> = Box::new(|_: &str| Vec::new());
    let mut server = match cfg.redis.clone() {
        None => webcall_server::serve(cfg, ice).await?,
        Some(redis_url) => {
            let cluster = webcall_cluster::ClusterConfig {
                redis_url,
                node_id: cfg.node_id.clone().unwrap_or_else(webcall_cluster::random_node_id),
                node_ttl: cfg.node_ttl,
            };
            let policy = webcall_server::policy(&cfg);
            let router =
                webcall_cluster::ClusterRouter::start(cfg.rooms.clone(), ice, Box::new(policy.clone()), cluster).await?;
            tracing::info!(node = router.node_id(), "sharing rooms through Redis");
            webcall_server::serve_with(cfg, router, policy).await?
        }
    };
    let (addr, scheme) = (server.local_addr, server.scheme);
    let ws = if scheme == "https" { "wss" } else { "ws" };
    if let Some(fp) = &server.fingerprint {
        println!("webcall TLS certificate SHA-256 fingerprint {fp}");
    }
    // Scripts and tests wait for this line (and read the port from it when listening on port 0).
    println!("webcall listening on {scheme}://{addr} (signaling at {ws}://{addr}/ws)");
    std::io::stdout().flush()?;

    // glibc keeps freed heap pages after a burst (a soak run left ~50 MB resident); hand them back now and then.
    tokio::spawn(async {
        let mut every = tokio::time::interval(std::time::Duration::from_secs(10));
        loop {
            every.tick().await;
            // SAFETY: malloc_trim only releases free memory; it is safe to call at any time.
            unsafe { libc::malloc_trim(0) };
        }
    });
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    loop {
        tokio::select! {
            r = server.wait() => return Ok(r?),
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = hup.recv() => match server.tls.as_mut() {
                Some(tls) => match tls.reload().await {
                    Ok(()) => tracing::info!(fingerprint = %tls.fingerprint, "TLS certificate reloaded"),
                    Err(e) => tracing::error!("TLS certificate not reloaded, keeping the old one: {e}"),
                },
                None => tracing::info!("SIGHUP: nothing to reload without TLS"),
            },
        }
    }
    tracing::info!("shutting down: telling clients to reconnect elsewhere");
    let left = server.shutdown().await;
    if left > 0 {
        tracing::warn!("{left} connections were still open at the shutdown deadline");
    }
    Ok(())
}
