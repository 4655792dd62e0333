//! `webcall check`: what `webcall serve` would run into with these settings, said before it happens.

use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::time::Duration;
use webcall_server::{IceSource, ServeArgs};

#[derive(Default)]
struct Report {
    failures: usize,
}

impl Report {
    fn ok(&mut self, what: impl AsRef<str>) {
        println!("ok    {}", what.as_ref());
    }
    fn warn(&mut self, what: impl AsRef<str>) {
        println!("warn  {}", what.as_ref());
    }
    fn fail(&mut self, what: impl AsRef<str>) {
        self.failures += 1;
        println!("FAIL  {}", what.as_ref());
    }
}

/// Addresses a client elsewhere cannot reach as given (so TURN must advertise --turn-external-ip).
fn not_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            v4.is_unspecified()
                || v4.is_private()
                || v4.is_link_local()
                || (v4.octets()[0] == 100 && (v4.octets()[1] & 0xc0) == 64)
        }
        IpAddr::V6(v6) => v6.is_unspecified() || v6.is_unique_local() || v6.is_unicast_link_local(),
    }
}

pub async fn run(args: ServeArgs) -> anyhow::Result<()> {
    let mut r = Report::default();
    let cfg = match args.resolve() {
        Ok(c) => {
            r.ok("settings are valid");
            c
        }
        Err(e) => {
            r.fail(format!("settings: {e}"));
            std::process::exit(1);
        }
    };
    match TcpListener::bind(cfg.listen) {
        Ok(_) => r.ok(format!("HTTP/WebSocket address {} is free", cfg.listen)),
        Err(e) => {
            r.fail(format!("cannot listen on {}: {e} (another server there? pick another with --listen)", cfg.listen))
        }
    }
    if cfg.listen.ip().is_loopback() {
        r.warn(format!(
            "{} is loopback: only this machine can connect (use --listen 0.0.0.0:PORT or a reverse proxy)",
            cfg.listen
        ));
    }
    let tls = match &cfg.tls {
        Some(source) => match webcall_server::tls::load(source).await {
            Ok(t) => {
                r.ok(format!("TLS certificate loads (SHA-256 {})", t.fingerprint));
                Some(t)
            }
            Err(e) => {
                r.fail(format!("TLS: {e}"));
                None
            }
        },
        None if !cfg.listen.ip().is_loopback() => {
            r.warn("no TLS: browsers give the camera only to https pages (or localhost); use --tls-cert/--tls-key, --tls-self-signed or a TLS proxy");
            None
        }
        None => None,
    };
    match &cfg.ice {
        IceSource::BuiltIn(turn) => {
            let tls_cfg = tls.as_ref().map(|t| t.config.get_inner());
            match turn.clone().into_config(tls_cfg) {
                Err(e) => r.fail(format!("TURN: {e}")),
                Ok(t) => {
                    let udp = UdpSocket::bind(t.listen);
                    let tcp = TcpListener::bind(t.listen);
                    match (udp, tcp) {
                        (Ok(_), Ok(_)) => r.ok(format!("STUN/TURN address {} is free (UDP and TCP)", t.listen)),
                        (Err(e), _) | (_, Err(e)) => r.fail(format!(
                            "cannot bind STUN/TURN on {}: {e} (coturn running? pass --turn-listen, or --no-turn with --ice-servers)",
                            t.listen
                        )),
                    }
                    if let Some((addr, _)) = t.tls {
                        match TcpListener::bind(addr) {
                            Ok(_) => r.ok(format!("TURN over TLS address {addr} is free")),
                            Err(e) => r.fail(format!("cannot listen on --turns-listen {addr}: {e}")),
                        }
                    }
                    match t.external_ip {
                        Some(ip) => r.ok(format!("relay candidates advertise --turn-external-ip {ip}")),
                        None if not_public(t.listen.ip()) && !t.listen.ip().is_loopback() => r.fail(format!(
                            "TURN listens on {} but no --turn-external-ip: relay candidates would carry an address clients elsewhere cannot reach",
                            t.listen.ip()
                        )),
                        None if t.listen.ip().is_loopback() => {
                            r.warn(format!("TURN on {} is loopback: only calls on this machine can use it", t.listen))
                        }
                        None => r.ok(format!("relay candidates advertise {}", t.listen.ip())),
                    }
                    r.ok(format!("relay ports {} ({} ports)", t.relay_ports, t.relay_ports.len()));
                    if turn.secret.is_none() {
                        r.warn(
                            "--turn-secret not set: a random one per start (fine for one node; share one across nodes)",
                        );
                    }
                }
            }
        }
        IceSource::External { urls, .. } => r.ok(format!("iceServers from --ice-servers: {}", urls.join(", "))),
        IceSource::None => r.warn("no STUN/TURN (--no-turn): calls between different networks will often fail"),
    }
    if let Some(url) = &cfg.redis {
        let hostport =
            url.split("://").nth(1).unwrap_or(url).rsplit('@').next().unwrap_or("").split('/').next().unwrap_or("");
        let reachable = tokio::net::lookup_host(if hostport.contains(':') {
            hostport.to_owned()
        } else {
            format!("{hostport}:6379")
        })
        .await
        .ok()
        .and_then(|mut a| a.next())
        .map(|a: SocketAddr| TcpStream::connect_timeout(&a, Duration::from_secs(2)));
        match reachable {
            Some(Ok(_)) => r.ok(format!("Redis at {hostport} accepts connections")),
            Some(Err(e)) => r.fail(format!("Redis at {hostport}: {e} (is redis-server running? check --redis)")),
            None => r.fail(format!("Redis address {hostport:?} does not resolve (check --redis)")),
        }
    }
    if cfg.auth_secret.is_some() {
        r.ok("joins need tokens signed with --auth-secret (mint with `webcall token`)");
    }
    if r.failures > 0 {
        println!("{} problem(s) found", r.failures);
        std::process::exit(1);
    }
    println!("no problems found");
    Ok(())
}
