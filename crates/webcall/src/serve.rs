//! `webcall serve`: start the server, print where it listens, and handle signals.

use std::io::Write;
use tokio::signal::unix::{signal, SignalKind};
use webcall_server::IceSource;

pub async fn run(args: webcall_server::ServeArgs) -> anyhow::Result<()> {
    large_allocations_outside_the_heap();
    // Before anything listens: the workers serve clients as soon as the listener is up, so a SIGTERM that came
    // before these were installed (the main thread descheduled after printing "listening") killed the process
    // outright, resetting every connection instead of telling it `server-shutdown`.
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    let cfg = args.resolve()?;
    // One certificate for HTTPS/WSS and TURN over TLS (a self-signed one is generated once, here).
    let tls = match &cfg.tls {
        Some(source) => Some(webcall_server::tls::load(source).await?),
        None => None,
    };
    let mut turn = None;
    let ice: Box<dyn webcall_rooms::IceProvider> = match &cfg.ice {
        IceSource::BuiltIn(args) => {
            let tls_cfg = tls.as_ref().map(|t| t.config.get_inner());
            let handle = webcall_turn::TurnServer::start(args.clone().into_config(tls_cfg)?).await?;
            let turns = handle.tls_addr().map(|a| format!(", turns {a}")).unwrap_or_default();
            println!("webcall STUN/TURN on udp+tcp {}{turns}", handle.addr());
            let minter = handle.ice_minter();
            turn = Some(handle);
            Box::new(minter)
        }
        IceSource::External { urls, secret, ttl } => {
            Box::new(webcall_server::ice::ExternalIce::new(urls.clone(), secret.clone(), *ttl))
        }
        IceSource::None => Box::new(|_: &str| Vec::new()),
    };
    let policy = webcall_server::policy(&cfg);
    // Every node runs its own SFU (its own media port): with --redis, each SFU room's media goes through one node's.
    let sfu = if cfg.rooms.topology != webcall_rooms::Topology::Mesh {
        let media = webcall_sfu::net::MediaConfig {
            listen: cfg.media_listen,
            external_ip: cfg.media_external_ip,
            dtls_cert: None,
            caps: cfg.sfu_caps,
            record_dir: cfg.record_dir.clone(),
        };
        let handle = webcall_sfu::net::SfuHandle::start(media).await?;
        let ips: Vec<String> = handle.advertised().iter().map(|ip| ip.to_string()).collect();
        println!(
            "webcall SFU media on udp+tcp {} (advertised as {} port {})",
            handle.local_addr(),
            ips.join(", "),
            handle.local_addr().port()
        );
        Some(handle)
    } else {
        None
    };
    let cfg_redis = cfg.redis.clone();
    let mut server = match cfg.redis.clone() {
        None => {
            let router = webcall_server::LocalRouter::start_with(cfg.rooms.clone(), ice, Box::new(policy.clone()));
            if let Some(handle) = &sfu {
                router.set_sfu(handle.clone());
            }
            webcall_server::serve_prepared(cfg, router, policy, tls).await?
        }
        Some(redis_url) => {
            let cluster = webcall_cluster::ClusterConfig {
                redis_url,
                node_id: cfg.node_id.clone().unwrap_or_else(webcall_cluster::random_node_id),
                node_ttl: cfg.node_ttl,
                replay_limit: cfg.replay_limit,
            };
            let router =
                webcall_cluster::ClusterRouter::start(cfg.rooms.clone(), ice, Box::new(policy.clone()), cluster)
                    .await?;
            tracing::info!(node = router.node_id(), "sharing rooms through Redis");
            if let Some(handle) = &sfu {
                router.set_sfu(handle.clone());
            }
            webcall_server::serve_prepared(cfg, router, policy, tls).await?
        }
    };
    // WHIP and WHEP are single-node for now: their sessions would live on this node's SFU, whichever node runs
    // the room's.
    if let (Some(sfu), None) = (&sfu, &cfg_redis) {
        server.set_sfu(sfu.clone());
    }
    let turn_stats = turn.as_ref().map(|t| t.stats_reader());
    if turn_stats.is_some() || sfu.is_some() {
        let sfu = sfu.clone();
        server.set_metrics_hook(std::sync::Arc::new(move |out: &mut String| {
            if let Some(stats) = &turn_stats {
                turn_metrics(&stats(), out);
            }
            if let Some(sfu) = &sfu {
                sfu_metrics(&sfu.stats(), &sfu.net_stats(), out);
            }
        }));
    }
    give_back_after_load(server.router());
    let (addr, scheme) = (server.local_addr, server.scheme);
    let ws = if scheme == "https" { "wss" } else { "ws" };
    if let Some(fp) = &server.fingerprint {
        println!("webcall TLS certificate SHA-256 fingerprint {fp}");
    }
    // Scripts and tests wait for this line (and read the port from it when listening on port 0).
    println!("webcall listening on {scheme}://{addr} (signaling at {ws}://{addr}/ws)");
    std::io::stdout().flush()?;

    loop {
        tokio::select! {
            r = server.wait() => return Ok(r?),
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = hup.recv() => match server.tls.as_mut() {
                Some(tls) => match tls.reload().await {
                    Ok(()) => {
                        tracing::info!(fingerprint = %tls.fingerprint, "TLS certificate reloaded");
                        // TURN over TLS serves new connections with the new certificate too.
                        if let Some(t) = &turn {
                            t.set_tls(tls.config.get_inner());
                        }
                    }
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
    // Recordings end with whole clusters, their size and duration written: playable files.
    if let Some(sfu) = &sfu {
        sfu.finish_recordings().await;
    }
    if let Some(t) = turn {
        t.shutdown().await;
    }
    Ok(())
}

/// Frames and write buffers of 32 KiB and more (big SDPs, a slow reader's queue, a batch written at once) come and
/// go in bursts. Carved out of the worker threads' heaps they left holes that glibc never returns (a soak round left
/// 17 MB of free chunks resident there, found with `malloc_info`); mapped on their own, they are returned when freed.
/// This also stops glibc raising the threshold after the first such buffer is freed.
fn large_allocations_outside_the_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes an allocator parameter; called once before the heavy allocations start.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 * 1024);
    }
}

/// Hands the free memory of the load that just ended back to the system, once the load has fallen (sessions and
/// connections at a quarter of their peak or less), never periodically and never under steady load.
///
/// Why this is needed (bench/soak/RESULTS.md): after a soak round nothing live is left of the load (heaptrack: 200
/// KB of what was allocated during the round survives), but the worker threads' heaps stay at their peak size
/// (~6 MB each), because glibc gives memory back only from the top of a heap, and the top is pinned by a few hundred
/// small chunks spread over the whole heap: mostly glibc's own per-thread caches of freed chunks (tcache: off, the
/// heaps shrank by half) and a few dozen live ones. `malloc_trim` is glibc's only call that returns free pages in the
/// middle of a heap.
///
/// Settings tried instead (soak, 2 rounds, RSS after a round; bench/soak/RESULTS.md "Without the trim, again"):
/// none 27–28 MB, `M_ARENA_MAX` 1 (one heap for all threads) 27 MB, `M_MXFAST` 0 (no fastbins) 28 MB, the trim
/// 18.7–18.9 MB (baseline 15 MB). Only turning the thread caches off came close (20–21 MB), and that is an
/// environment tunable (`GLIBC_TUNABLES=glibc.malloc.tcache_count=0`), not a `mallopt` option, and slows every
/// allocation. Another allocator does not do better (same file, "Another allocator"): mimalloc left 28–32 MB after a
/// round, jemalloc 22.5–23.3 MB and needs `make` to build. So the arena settings stay at glibc's defaults and this
/// one trim after a load stays.
fn give_back_after_load(router: std::sync::Arc<dyn webcall_server::Router>) {
    let router = std::sync::Arc::downgrade(&router);
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    tokio::spawn(async move {
        let mut every = tokio::time::interval(std::time::Duration::from_secs(1));
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut peak = 0usize;
        loop {
            every.tick().await;
            let Some(s) = router.upgrade().map(|r| r.stats()) else { return };
            let load = s.connections + s.peers;
            peak = peak.max(load);
            if load * 4 <= peak && peak - load >= 16 {
                peak = load;
                // SAFETY: malloc_trim only releases free memory and is thread-safe. Off the workers: it walks the
                // free chunks of every heap.
                let _ = tokio::task::spawn_blocking(|| unsafe { libc::malloc_trim(0) }).await;
            }
        }
    });
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    let _ = router;
}

/// TURN figures for `/metrics`.
pub fn turn_metrics(s: &webcall_turn::CoreStats, out: &mut String) {
    use std::fmt::Write;
    let _ = writeln!(
        out,
        "# HELP webcall_turn_allocations Active TURN allocations.\n# TYPE webcall_turn_allocations gauge"
    );
    let _ = writeln!(out, "webcall_turn_allocations {}", s.allocations);
    let _ = writeln!(out, "# HELP webcall_turn_relayed_packets_total Packets relayed, by direction.\n# TYPE webcall_turn_relayed_packets_total counter");
    let _ = writeln!(out, "webcall_turn_relayed_packets_total{{direction=\"to-peer\"}} {}", s.to_peer_packets);
    let _ = writeln!(out, "webcall_turn_relayed_packets_total{{direction=\"to-client\"}} {}", s.to_client_packets);
    let _ = writeln!(out, "# HELP webcall_turn_relayed_bytes_total Bytes relayed, by direction.\n# TYPE webcall_turn_relayed_bytes_total counter");
    let _ = writeln!(out, "webcall_turn_relayed_bytes_total{{direction=\"to-peer\"}} {}", s.to_peer_bytes);
    let _ = writeln!(out, "webcall_turn_relayed_bytes_total{{direction=\"to-client\"}} {}", s.to_client_bytes);
}

/// SFU figures for `/metrics`.
pub fn sfu_metrics(s: &webcall_sfu::SfuStats, n: &webcall_sfu::net::NetStats, out: &mut String) {
    use std::fmt::Write;
    let gauge = |out: &mut String, name: &str, help: &str, v: u64| {
        let _ =
            writeln!(out, "# HELP webcall_sfu_{name} {help}\n# TYPE webcall_sfu_{name} gauge\nwebcall_sfu_{name} {v}");
    };
    let counter = |out: &mut String, name: &str, help: &str, v: u64| {
        let _ = writeln!(
            out,
            "# HELP webcall_sfu_{name} {help}\n# TYPE webcall_sfu_{name} counter\nwebcall_sfu_{name} {v}"
        );
    };
    gauge(out, "sessions", "SFU media sessions (one per participant).", s.sessions);
    gauge(out, "recording_rooms", "Rooms being recorded (--record-dir).", s.recording_rooms);
    gauge(out, "recording_files", "Recording files open (one per recorded track).", s.recording_files);
    gauge(out, "tracks", "Tracks published to the SFU.", s.tracks);
    counter(out, "forwarded_frames_total", "Media frames forwarded to subscribers.", s.forwarded_frames);
    counter(out, "forwarded_bytes_total", "Media payload bytes forwarded to subscribers.", s.forwarded_bytes);
    counter(out, "keyframe_requests_total", "Keyframe requests sent to publishers.", s.keyframe_requests);
    counter(out, "layer_switches_total", "Simulcast layer switches of subscribers' tracks.", s.layer_switches);
    counter(out, "refused_tracks_total", "Published tracks not forwarded: a track cap was reached.", s.refused_tracks);
    counter(out, "remb_total", "REMB messages asking publishers over a bitrate cap to send less.", s.remb_sent);
    counter(out, "unrouted_datagrams_total", "Datagrams on the media port no session knows.", s.unrouted_datagrams);
    counter(
        out,
        "session_timeouts_total",
        "Timeouts the SFU ran in its WebRTC sessions (due timers, and one after packets are written).",
        s.session_timeouts,
    );
    counter(
        out,
        "forwarded_packets_total",
        "RTP packets sent to subscribers (forwarded media, retransmissions included).",
        n.forwarded_packets,
    );
    counter(out, "forwarded_packet_bytes_total", "Bytes of those RTP packets, as sent.", n.forwarded_packet_bytes);
    counter(
        out,
        "received_datagrams_total",
        "Datagrams and ICE-TCP frames read on the media port.",
        n.received_datagrams,
    );
    counter(out, "send_drops_total", "Datagrams the kernel would not take (send buffer full).", n.send_drops);
    gauge(out, "tcp_connections", "Open ICE-TCP connections on the media port.", n.tcp_connections);
    counter(out, "tcp_refused_total", "ICE-TCP connections refused (caps) or closed (unclaimed, idle).", n.tcp_refused);
}
