//! Command-line/config-file options and the resolved server configuration.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;
use rand::distr::{Alphanumeric, SampleString};
use serde::Deserialize;

use crate::TurnError;

use crate::defaults;

pub const DEFAULT_LISTEN: &str = defaults::LISTEN;
pub const DEFAULT_REALM: &str = defaults::REALM;
pub const DEFAULT_CREDENTIAL_TTL: Duration = defaults::CREDENTIAL_TTL;
pub const DEFAULT_IP_QUOTA: usize = defaults::IP_QUOTA;
pub const DEFAULT_RELAY_PORTS: PortRange = defaults::RELAY_PORTS;

/// A relay port range `MIN-MAX` (inclusive).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct PortRange {
    pub min: u16,
    pub max: u16,
}

// A range is never empty (parsing refuses MIN > MAX), so an `is_empty` would always be false.
#[allow(clippy::len_without_is_empty)]
impl PortRange {
    pub fn len(&self) -> usize {
        (self.max - self.min) as usize + 1
    }
    pub fn contains(&self, port: u16) -> bool {
        (self.min..=self.max).contains(&port)
    }
}

impl FromStr for PortRange {
    type Err = TurnError;
    fn from_str(s: &str) -> Result<Self, TurnError> {
        let bad = || TurnError::BadPortRange(s.to_string());
        let (a, b) = s.trim().split_once('-').ok_or_else(bad)?;
        let (min, max): (u16, u16) = (a.trim().parse().map_err(|_| bad())?, b.trim().parse().map_err(|_| bad())?);
        if min == 0 || min > max {
            return Err(bad());
        }
        Ok(PortRange { min, max })
    }
}

impl TryFrom<String> for PortRange {
    type Error = TurnError;
    fn try_from(s: String) -> Result<Self, TurnError> {
        s.parse()
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.min, self.max)
    }
}

/// The STUN/TURN options, for `#[command(flatten)]` into `webcall serve` and `webcall turn`, and for a
/// `[turn]` table of the TOML config file (keys: the flag names without `turn-`, e.g. `listen`,
/// `relay-ports`, `allow-peer = ["127.0.0.0/8"]`). Every field is optional so that a config file can
/// supply what the command line leaves out: combine with [`TurnArgs::or`], then [`TurnArgs::into_config`]
/// applies the defaults.
#[derive(clap::Args, Deserialize, Debug, Clone, Default, PartialEq)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct TurnArgs {
    /// UDP and TCP address of the STUN/TURN server [default: 127.0.0.1:3478]
    #[arg(id = "turn_listen", long = "turn-listen", env = "WEBCALL_TURN_LISTEN", value_name = "ADDR")]
    pub listen: Option<SocketAddr>,

    /// Address for TURN over TLS (turns:); needs the server's TLS certificate
    #[arg(long = "turns-listen", env = "WEBCALL_TURNS_LISTEN", value_name = "ADDR")]
    pub turns_listen: Option<SocketAddr>,

    /// UDP port range for relay addresses [default: 49152-65535]
    #[arg(long = "turn-relay-ports", env = "WEBCALL_TURN_RELAY_PORTS", value_name = "MIN-MAX")]
    pub relay_ports: Option<PortRange>,

    /// Public IP that relay candidates advertise (for a server behind NAT, or listening on 0.0.0.0)
    #[arg(long = "turn-external-ip", env = "WEBCALL_TURN_EXTERNAL_IP", value_name = "IP")]
    pub external_ip: Option<IpAddr>,

    /// Shared secret for TURN REST credentials (coturn's static-auth-secret) [default: random per start]
    #[arg(long = "turn-secret", env = "WEBCALL_TURN_SECRET", value_name = "SECRET", hide_env_values = true)]
    pub secret: Option<String>,

    /// TURN realm [default: webcall]
    #[arg(long = "turn-realm", env = "WEBCALL_TURN_REALM", value_name = "REALM")]
    pub realm: Option<String>,

    /// Allow relaying to peers in this range although it is loopback/private/link-local/multicast (repeatable)
    #[arg(long = "turn-allow-peer", env = "WEBCALL_TURN_ALLOW_PEER", value_name = "CIDR", value_delimiter = ',')]
    pub allow_peer: Vec<IpNet>,

    /// Lifetime of minted TURN credentials; allocations made in time outlive them while refreshed
    /// [default: 2h; for --ice-servers, 24h]
    #[arg(long = "turn-credential-ttl", env = "WEBCALL_TURN_CREDENTIAL_TTL", value_name = "DURATION", value_parser = humantime::parse_duration)]
    #[serde(with = "humantime_serde")]
    pub credential_ttl: Option<Duration>,

    /// Allocations per user (peer id) [default: 10; with `webcall serve`, 2 × --max-peers, at least 10]
    #[arg(long = "turn-user-quota", env = "WEBCALL_TURN_USER_QUOTA", value_name = "N")]
    pub user_quota: Option<usize>,

    /// Allocations on the whole server [default: 1000]
    #[arg(long = "turn-total-quota", env = "WEBCALL_TURN_TOTAL_QUOTA", value_name = "N")]
    pub total_quota: Option<usize>,

    /// Allocations per client IP address, whatever the credentials (over it, Allocate gets 486
    /// Allocation Quota Reached); raise it when many clients share one NAT address [default: 32]
    #[arg(long = "turn-ip-quota", env = "WEBCALL_TURN_IP_QUOTA", value_name = "N")]
    pub ip_quota: Option<usize>,

    /// Longest allocation lifetime a client may request [default: 1h]
    #[arg(long = "turn-max-lifetime", env = "WEBCALL_TURN_MAX_LIFETIME", value_name = "DURATION", value_parser = humantime::parse_duration)]
    #[serde(with = "humantime_serde")]
    pub max_lifetime: Option<Duration>,
}

impl TurnArgs {
    /// Fills what `self` (e.g. the command line) leaves unset from `other` (e.g. the config file).
    pub fn or(self, other: TurnArgs) -> TurnArgs {
        TurnArgs {
            listen: self.listen.or(other.listen),
            turns_listen: self.turns_listen.or(other.turns_listen),
            relay_ports: self.relay_ports.or(other.relay_ports),
            external_ip: self.external_ip.or(other.external_ip),
            secret: self.secret.or(other.secret),
            realm: self.realm.or(other.realm),
            allow_peer: if self.allow_peer.is_empty() { other.allow_peer } else { self.allow_peer },
            credential_ttl: self.credential_ttl.or(other.credential_ttl),
            user_quota: self.user_quota.or(other.user_quota),
            total_quota: self.total_quota.or(other.total_quota),
            ip_quota: self.ip_quota.or(other.ip_quota),
            max_lifetime: self.max_lifetime.or(other.max_lifetime),
        }
    }

    /// Applies defaults and checks. `tls` is the server certificate, needed when `turns_listen` is set.
    pub fn into_config(self, tls: Option<Arc<rustls::ServerConfig>>) -> Result<TurnConfig, TurnError> {
        let listen = self.listen.unwrap_or_else(|| DEFAULT_LISTEN.parse().expect("valid"));
        let tls = match (self.turns_listen, tls) {
            (Some(addr), Some(cfg)) => Some((addr, cfg)),
            (Some(addr), None) => return Err(TurnError::TlsWithoutCert(addr)),
            (None, _) => None,
        };
        let secret = match self.secret {
            Some(s) if s.is_empty() => return Err(TurnError::EmptySecret),
            Some(s) => s,
            None => Alphanumeric.sample_string(&mut rand::rng(), 32),
        };
        let max_lifetime = self.max_lifetime.unwrap_or(defaults::MAX_LIFETIME);
        let total_quota = self.total_quota.unwrap_or(defaults::TOTAL_QUOTA);
        if max_lifetime < defaults::ALLOCATION_LIFETIME {
            return Err(TurnError::BadMaxLifetime(max_lifetime));
        }
        let cfg = TurnConfig {
            listen,
            tls,
            relay_ports: self.relay_ports.unwrap_or(DEFAULT_RELAY_PORTS),
            external_ip: self.external_ip,
            secret,
            realm: self.realm.unwrap_or_else(|| DEFAULT_REALM.into()),
            allow_peers: self.allow_peer,
            credential_ttl: self.credential_ttl.unwrap_or(DEFAULT_CREDENTIAL_TTL),
            user_quota: self.user_quota.unwrap_or(defaults::USER_QUOTA),
            total_quota,
            ip_quota: self.ip_quota.unwrap_or(DEFAULT_IP_QUOTA),
            max_lifetime,
            stream_idle: defaults::STREAM_IDLE,
            stream_first_message: defaults::STREAM_FIRST_MESSAGE,
            max_streams: total_quota.saturating_mul(defaults::STREAMS_PER_ALLOCATION).max(64),
            max_streams_per_ip: defaults::STREAMS_PER_IP,
            stream_queue: defaults::STREAM_QUEUE,
            stream_write_timeout: defaults::STREAM_WRITE_TIMEOUT,
        };
        cfg.check()?;
        Ok(cfg)
    }
}

/// Resolved configuration for [`crate::TurnServer::start`].
#[derive(Clone)]
pub struct TurnConfig {
    pub listen: SocketAddr,
    /// TURN over TLS: address and certificate.
    pub tls: Option<(SocketAddr, Arc<rustls::ServerConfig>)>,
    pub relay_ports: PortRange,
    pub external_ip: Option<IpAddr>,
    pub secret: String,
    pub realm: String,
    pub allow_peers: Vec<IpNet>,
    pub credential_ttl: Duration,
    pub user_quota: usize,
    pub total_quota: usize,
    pub ip_quota: usize,
    pub max_lifetime: Duration,
    /// A TCP/TLS connection without an allocation that sends no complete message for this long is closed.
    pub stream_idle: Duration,
    /// Time for a new TCP/TLS connection's handshake and first complete message.
    pub stream_first_message: Duration,
    /// Open TCP/TLS connections (handshaking ones included); more are closed at once.
    pub max_streams: usize,
    /// Open TCP/TLS connections per client address (IPv6: per /64).
    pub max_streams_per_ip: usize,
    /// Bytes queued for one TCP/TLS client before relayed data is dropped and a non-reading client is cut off.
    pub stream_queue: usize,
    /// A write to a TCP/TLS client that makes no progress for this long closes the connection.
    pub stream_write_timeout: Duration,
}

impl fmt::Debug for TurnConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TurnConfig")
            .field("listen", &self.listen)
            .field("tls", &self.tls.as_ref().map(|(a, _)| a))
            .field("relay_ports", &self.relay_ports)
            .field("external_ip", &self.external_ip)
            .field("realm", &self.realm)
            .field("allow_peers", &self.allow_peers)
            .field("credential_ttl", &self.credential_ttl)
            .field("user_quota", &self.user_quota)
            .field("total_quota", &self.total_quota)
            .field("ip_quota", &self.ip_quota)
            .field("max_lifetime", &self.max_lifetime)
            .field("stream_idle", &self.stream_idle)
            .field("max_streams", &self.max_streams)
            .field("max_streams_per_ip", &self.max_streams_per_ip)
            .finish_non_exhaustive()
    }
}

impl TurnConfig {
    /// Defaults with the given listen address and secret (handy for tests and embedding).
    pub fn new(listen: SocketAddr, secret: impl Into<String>) -> TurnConfig {
        TurnArgs { listen: Some(listen), secret: Some(secret.into()), ..Default::default() }
            .into_config(None)
            .expect("defaults are valid")
    }

    pub(crate) fn check(&self) -> Result<(), TurnError> {
        if self.listen.ip().is_unspecified() && self.external_ip.is_none() {
            return Err(TurnError::NeedExternalIp(self.listen));
        }
        if self.secret.is_empty() {
            return Err(TurnError::EmptySecret);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser, Debug)]
    struct Cli {
        #[command(flatten)]
        turn: TurnArgs,
    }

    #[test]
    fn flags_parse() {
        let cli = Cli::try_parse_from([
            "x",
            "--turn-listen",
            "127.0.0.1:0",
            "--turn-relay-ports",
            "40000-40100",
            "--turn-allow-peer",
            "127.0.0.0/8",
            "--turn-allow-peer",
            "::1/128",
            "--turn-secret",
            "s",
            "--turn-credential-ttl",
            "1h",
            "--turn-ip-quota",
            "4",
        ])
        .unwrap();
        assert_eq!(cli.turn.relay_ports, Some(PortRange { min: 40000, max: 40100 }));
        assert_eq!(cli.turn.allow_peer.len(), 2);
        let cfg = cli.turn.into_config(None).unwrap();
        assert_eq!(cfg.credential_ttl, Duration::from_secs(3600));
        assert_eq!(cfg.ip_quota, 4);
        assert_eq!(cfg.realm, "webcall");
        assert!(Cli::try_parse_from(["x", "--turn-relay-ports", "5-4"]).is_err());
    }

    #[test]
    fn toml_and_merge() {
        let file: TurnArgs = toml::from_str(
            "listen = \"127.0.0.1:4000\"\nrelay-ports = \"50000-50010\"\nallow-peer = [\"10.0.0.0/8\"]\ncredential-ttl = \"2h\"\nrealm = \"r\"\nip-quota = 7",
        )
        .unwrap();
        let cli = TurnArgs { realm: Some("cli".into()), ..Default::default() };
        let cfg = cli.or(file).into_config(None).unwrap();
        assert_eq!(cfg.listen.port(), 4000);
        assert_eq!(cfg.realm, "cli");
        assert_eq!(cfg.credential_ttl, Duration::from_secs(7200));
        assert_eq!(cfg.relay_ports.len(), 11);
        assert_eq!(cfg.ip_quota, 7);
        assert_eq!(TurnArgs::default().into_config(None).unwrap().ip_quota, DEFAULT_IP_QUOTA);
        assert!(toml::from_str::<TurnArgs>("nope = 1").is_err());
    }

    #[test]
    fn config_errors_say_what_to_do() {
        let e = TurnArgs { listen: Some("0.0.0.0:3478".parse().unwrap()), ..Default::default() }
            .into_config(None)
            .unwrap_err();
        assert!(e.to_string().contains("--turn-external-ip"), "{e}");
        let e = TurnArgs { turns_listen: Some("127.0.0.1:5349".parse().unwrap()), ..Default::default() }
            .into_config(None)
            .unwrap_err();
        assert!(e.to_string().contains("certificate"), "{e}");
        // A random secret when none is given.
        let a = TurnArgs::default().into_config(None).unwrap();
        let b = TurnArgs::default().into_config(None).unwrap();
        assert_ne!(a.secret, b.secret);
        assert_eq!(a.secret.len(), 32);
    }
}
