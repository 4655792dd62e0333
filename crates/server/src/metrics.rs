//! `GET /metrics` in the Prometheus text format. The figures are a snapshot of counters the room core and the
//! adapter already keep, so this is a formatter (a few lines) rather than a metrics registry.

use std::fmt::Write;
use webcall_rooms::{Counters, Stats};

/// Counters kept by the HTTP/WebSocket adapter.
#[derive(Default)]
pub struct AdapterCounters {
    pub refused_server_full: std::sync::atomic::AtomicU64,
    pub refused_per_ip: std::sync::atomic::AtomicU64,
    pub refused_origin: std::sync::atomic::AtomicU64,
    /// TCP connections closed at accept: their address had `--max-connections-per-ip` open already.
    pub refused_tcp_per_ip: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

fn metric(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

pub fn render(stats: Stats, counters: &Counters, adapter: &AdapterCounters, extra: &str) -> String {
    use std::sync::atomic::Ordering::Relaxed;
    let mut o = String::with_capacity(4096);
    for (name, help, v) in [
        ("webcall_connections", "Open WebSocket connections.", stats.connections),
        ("webcall_rooms", "Rooms with at least one peer.", stats.rooms),
        ("webcall_peers", "Joined peers, including those in their resume grace period.", stats.peers),
        ("webcall_detached_peers", "Peers whose connection dropped, waiting for a resume.", stats.detached_peers),
    ] {
        metric(&mut o, name, "gauge", help);
        let _ = writeln!(o, "{name} {v}");
    }
    metric(&mut o, "webcall_messages_total", "counter", "Client messages received, by type.");
    for (kind, v) in counters.messages.iter() {
        let _ = writeln!(o, "webcall_messages_total{{type=\"{kind}\"}} {v}");
    }
    metric(&mut o, "webcall_errors_total", "counter", "Refused client messages, by error code.");
    for (code, v) in counters.errors.iter() {
        let _ = writeln!(o, "webcall_errors_total{{code=\"{code}\"}} {v}");
    }
    for (name, help, v) in [
        ("webcall_joins_total", "Fresh joins.", counters.joins),
        ("webcall_resumes_total", "Sessions resumed after a dropped connection.", counters.resumes),
        (
            "webcall_sessions_expired_total",
            "Sessions ended because their resume grace period ran out.",
            counters.expired,
        ),
        ("webcall_slow_readers_total", "Connections cut off for not reading.", counters.slow_readers),
    ] {
        metric(&mut o, name, "counter", help);
        let _ = writeln!(o, "{name} {v}");
    }
    metric(&mut o, "webcall_connections_refused_total", "counter", "WebSocket connections refused, by reason.");
    for (reason, v) in [
        ("server-full", adapter.refused_server_full.load(Relaxed)),
        ("per-ip", adapter.refused_per_ip.load(Relaxed)),
        ("origin", adapter.refused_origin.load(Relaxed)),
        ("tcp-per-ip", adapter.refused_tcp_per_ip.load(Relaxed)),
    ] {
        let _ = writeln!(o, "webcall_connections_refused_total{{reason=\"{reason}\"}} {v}");
    }
    metric(&mut o, "webcall_process_resident_memory_bytes", "gauge", "Resident memory of this process.");
    let _ = writeln!(o, "webcall_process_resident_memory_bytes {}", resident_bytes());
    o.push_str(extra);
    o
}

fn resident_bytes() -> u64 {
    // statm: size resident shared … in pages.
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1).and_then(|v| v.parse::<u64>().ok()))
        .map_or(0, |pages| pages * 4096)
}
