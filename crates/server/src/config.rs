//! `webcall serve` settings: flags, their `WEBCALL_*` environment variables and an optional TOML file.
//! Precedence: flag, then environment, then file, then the built-in default.

use clap::Args;
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

fn duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{e} (write e.g. 20s, 1m, 500ms)"))
}

/// Every field is optional so that a TOML file can fill what the command line leaves out. TOML keys are the flag
/// names without dashes prefix (`listen = "0.0.0.0:8080"`, `max-peers = 6`, `resume-grace = "30s"`).
// The field docs are `--help` text, written for a terminal, not rustdoc: `[::]` and bare URLs stay as they are.
#[allow(rustdoc::broken_intra_doc_links, rustdoc::bare_urls)]
#[derive(Args, Deserialize, Debug, Clone, Default)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct ServeArgs {
    /// TOML file with any of these settings (keys are the flag names, e.g. `max-peers = 6`).
    #[arg(long, env = "WEBCALL_CONFIG", value_name = "FILE")]
    #[serde(skip)]
    pub config: Option<PathBuf>,

    /// Address for HTTP and WebSocket [default: 127.0.0.1:8080].
    #[arg(long, env = "WEBCALL_LISTEN", value_name = "ADDR")]
    pub listen: Option<SocketAddr>,

    /// Room capacity: peers in one call [default: 4].
    #[arg(long, env = "WEBCALL_MAX_PEERS", value_name = "N")]
    pub max_peers: Option<usize>,

    /// Rooms on this server at once [default: 10000].
    #[arg(long, env = "WEBCALL_MAX_ROOMS", value_name = "N")]
    pub max_rooms: Option<usize>,

    /// WebSocket connections at once; more are refused with 503 [default: 16000].
    #[arg(long, env = "WEBCALL_MAX_CONNECTIONS", value_name = "N")]
    pub max_connections: Option<usize>,

    /// How long a dropped session keeps its seat and id for a resume [default: 20s].
    #[arg(long, env = "WEBCALL_RESUME_GRACE", value_name = "DURATION", value_parser = duration)]
    #[serde(with = "humantime_serde")]
    pub resume_grace: Option<Duration>,

    /// Largest accepted WebSocket message in bytes [default: 65536].
    #[arg(long, env = "WEBCALL_MAX_MESSAGE_SIZE", value_name = "BYTES")]
    pub max_message_size: Option<usize>,

    /// Frames queued for one connection before it is cut off as a slow reader [default: 256].
    #[arg(long, env = "WEBCALL_MAX_QUEUED_MESSAGES", value_name = "N")]
    pub max_queued_messages: Option<usize>,

    /// Bytes queued for one connection before it is cut off as a slow reader [default: 1048576].
    #[arg(long, env = "WEBCALL_MAX_QUEUED_BYTES", value_name = "BYTES")]
    pub max_queued_bytes: Option<usize>,

    /// Messages per second per connection; bursts of twice this pass at once, more are read more slowly, and a
    /// connection flooding past it for 20 s is closed [default: 50].
    #[arg(long, env = "WEBCALL_RATE_LIMIT", value_name = "PER_SEC")]
    pub rate_limit: Option<f64>,

    /// Refused messages a connection may send in a burst before it is closed (refilled at 1/s) [default: 20].
    #[arg(long, env = "WEBCALL_MAX_ERRORS", value_name = "N")]
    pub max_errors: Option<f64>,

    /// Wrong room passwords a room takes per minute, from anyone; past it password joins to that room are refused
    /// `rate-limited` until the budget refills [default: 10].
    #[arg(long, env = "WEBCALL_MAX_PASSWORD_ATTEMPTS", value_name = "PER_MIN")]
    pub max_password_attempts: Option<f64>,

    /// Interval of WebSocket pings [default: 10s].
    #[arg(long, env = "WEBCALL_PING_INTERVAL", value_name = "DURATION", value_parser = duration)]
    #[serde(with = "humantime_serde")]
    pub ping_interval: Option<Duration>,

    /// A connection silent (no frame, no pong) this long is dropped [default: 30s].
    #[arg(long, env = "WEBCALL_IDLE_TIMEOUT", value_name = "DURATION", value_parser = duration)]
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Option<Duration>,

    /// PEM certificate chain: serve HTTPS and WSS (needs --tls-key).
    #[arg(long, env = "WEBCALL_TLS_CERT", value_name = "FILE", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// PEM private key for --tls-cert.
    #[arg(long, env = "WEBCALL_TLS_KEY", value_name = "FILE", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// Serve HTTPS/WSS with a generated self-signed certificate (for a LAN: phones need a secure context for the
    /// camera); its SHA-256 fingerprint is printed at start.
    #[arg(long, env = "WEBCALL_TLS_SELF_SIGNED", conflicts_with = "tls_cert", num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    pub tls_self_signed: Option<bool>,

    /// Require signed join tokens (HS256 JWT, minted by `webcall token`) made with this secret.
    #[arg(long, env = "WEBCALL_AUTH_SECRET", value_name = "SECRET", hide_env_values = true)]
    pub auth_secret: Option<String>,

    /// Accept WebSockets only from pages of these origins (comma-separated, e.g. https://call.example.com).
    #[arg(long, env = "WEBCALL_ALLOWED_ORIGINS", value_name = "ORIGINS", value_delimiter = ',')]
    pub allowed_origins: Option<Vec<String>>,

    /// Proxies whose X-Forwarded-For is trusted for the client address (comma-separated CIDRs)
    /// [default: 127.0.0.0/8,::1, so a reverse proxy on this machine works out of the box].
    #[arg(long, env = "WEBCALL_TRUSTED_PROXIES", value_name = "CIDRS", value_delimiter = ',')]
    pub trusted_proxies: Option<Vec<ipnet::IpNet>>,

    /// WebSocket connections from one address at once [default: 256].
    #[arg(long, env = "WEBCALL_MAX_CONNECTIONS_PER_IP", value_name = "N")]
    pub max_connections_per_ip: Option<usize>,

    /// Joins from one address per minute [default: 600].
    #[arg(long, env = "WEBCALL_MAX_JOINS_PER_IP", value_name = "N")]
    pub max_joins_per_ip: Option<u32>,

    /// Do not run the built-in STUN/TURN server (e.g. when --ice-servers points at coturn).
    #[arg(long, env = "WEBCALL_NO_TURN", num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    pub no_turn: Option<bool>,

    /// External STUN/TURN servers for `iceServers` instead of the built-in one (comma-separated stun:, turn:,
    /// turns: URLs); turn: URLs get REST credentials minted with --turn-secret, coturn's static-auth-secret.
    #[arg(long, env = "WEBCALL_ICE_SERVERS", value_name = "URLS", value_delimiter = ',')]
    pub ice_servers: Option<Vec<String>>,

    /// Where a room's media flows: auto (peer-to-peer for two, the built-in SFU from the third peer on), mesh
    /// (always peer-to-peer) or sfu (always through the server) [default: auto].
    #[arg(long, env = "WEBCALL_TOPOLOGY", value_name = "MODE")]
    pub topology: Option<webcall_rooms::Topology>,

    /// Capacity of rooms that go through the SFU [default: 100].
    #[arg(long, env = "WEBCALL_MAX_SFU_PEERS", value_name = "N")]
    pub max_sfu_peers: Option<usize>,

    /// Address of the SFU's media port: UDP, and ICE-TCP on the same port number [default: 127.0.0.1:7882].
    /// A wildcard (0.0.0.0, [::]) advertises every interface's address unless --media-external-ip is set.
    #[arg(long, env = "WEBCALL_MEDIA_LISTEN", value_name = "ADDR")]
    pub media_listen: Option<SocketAddr>,

    /// The address clients reach the media socket at, behind NAT [default: --turn-external-ip].
    #[arg(long, env = "WEBCALL_MEDIA_EXTERNAL_IP", value_name = "IP")]
    pub media_external_ip: Option<std::net::IpAddr>,

    /// Tracks (audio and video) the SFU forwards on this server; more are not forwarded [default: 10000].
    #[arg(long, env = "WEBCALL_MAX_SFU_TRACKS", value_name = "N")]
    pub max_sfu_tracks: Option<usize>,

    /// Tracks the SFU forwards per room; more are not forwarded [default: 250].
    #[arg(long, env = "WEBCALL_MAX_SFU_ROOM_TRACKS", value_name = "N")]
    pub max_sfu_room_tracks: Option<usize>,

    /// Media the SFU takes in on this server, in kbit/s; publishers over it are asked (REMB) to send less
    /// [default: 1000000, 1 Gbit/s].
    #[arg(long, env = "WEBCALL_MAX_SFU_KBPS", value_name = "KBPS")]
    pub max_sfu_kbps: Option<u64>,

    /// Media the SFU takes in per room, in kbit/s; publishers over it are asked (REMB) to send less
    /// [default: 100000, 100 Mbit/s].
    #[arg(long, env = "WEBCALL_MAX_SFU_ROOM_KBPS", value_name = "KBPS")]
    pub max_sfu_room_kbps: Option<u64>,

    /// Record SFU rooms into this directory when a participant (or the HTTP API) asks: one WebM/Matroska file per
    /// participant and track (docs/recording.md) [default: off, recording is refused].
    #[arg(long, env = "WEBCALL_RECORD_DIR", value_name = "DIR")]
    pub record_dir: Option<PathBuf>,

    #[command(flatten)]
    pub turn: webcall_turn::TurnArgs,

    /// On SIGTERM/SIGINT, how long to wait for clients to leave before exiting [default: 10s].
    #[arg(long, env = "WEBCALL_SHUTDOWN_TIMEOUT", value_name = "DURATION", value_parser = duration)]
    #[serde(with = "humantime_serde")]
    pub shutdown_timeout: Option<Duration>,

    /// Share rooms with other nodes through this Redis (e.g. redis://127.0.0.1:6379, or
    /// redis+sentinel://host:26379,host2:26379/mymaster for a Sentinel-managed one); without it rooms stay in this
    /// process.
    #[arg(long, env = "WEBCALL_REDIS", value_name = "URL", hide_env_values = true)]
    pub redis: Option<String>,

    /// This node's name in a --redis cluster; unique among live nodes [default: random].
    #[arg(long, env = "WEBCALL_NODE_ID", value_name = "ID")]
    pub node_id: Option<String>,

    /// With --redis: a node silent this long is presumed dead and its peers get bye [default: 10s].
    #[arg(long, env = "WEBCALL_NODE_TTL", value_name = "DURATION", value_parser = duration)]
    #[serde(with = "humantime_serde")]
    pub node_ttl: Option<Duration>,

    /// With --redis: bytes of messages to other nodes kept until those nodes acknowledge them (what a Redis outage
    /// may hold back); past it relays to other nodes are refused with `unavailable` [default: 67108864].
    #[arg(long, env = "WEBCALL_REPLAY_LIMIT", value_name = "BYTES")]
    pub replay_limit: Option<usize>,
}

/// `--replay-limit` when not set: about a minute of 1 MB/s of cross-node signaling.
pub const DEFAULT_REPLAY_LIMIT: usize = 64 << 20;

/// Where the TLS certificate comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TlsSource {
    Files { cert: PathBuf, key: PathBuf },
    SelfSigned,
}

/// Settings after merging flags, environment, file and defaults, and checking them.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub listen: SocketAddr,
    pub max_connections: usize,
    pub ping_interval: Duration,
    pub idle_timeout: Duration,
    pub rooms: webcall_rooms::Config,
    pub tls: Option<TlsSource>,
    pub auth_secret: Option<String>,
    pub allowed_origins: Option<Vec<String>>,
    pub trusted_proxies: Vec<ipnet::IpNet>,
    pub max_connections_per_ip: usize,
    pub max_joins_per_ip: u32,
    pub shutdown_timeout: Duration,
    /// Redis URL of a cluster (`--redis`); `None`: rooms in this process.
    pub redis: Option<String>,
    pub node_id: Option<String>,
    pub node_ttl: Duration,
    /// Bytes a cluster node keeps for replay (`--replay-limit`).
    pub replay_limit: usize,
    pub ice: IceSource,
    /// The SFU's media socket (`--media-listen`).
    pub media_listen: SocketAddr,
    /// `--media-external-ip`, else `--turn-external-ip`.
    pub media_external_ip: Option<std::net::IpAddr>,
    /// `--max-sfu-tracks`, `--max-sfu-room-tracks`, `--max-sfu-kbps`, `--max-sfu-room-kbps`.
    pub sfu_caps: webcall_sfu::Caps,
    /// `--record-dir`: recordings go here; `None`, recording is refused.
    pub record_dir: Option<PathBuf>,
}

/// Where `welcome.iceServers` come from.
#[derive(Debug, Clone)]
pub enum IceSource {
    /// The built-in STUN/TURN server with these settings (flags over the file's `[turn]` table).
    BuiltIn(webcall_turn::TurnArgs),
    /// External servers; turn:/turns: URLs get credentials from the shared secret.
    External { urls: Vec<String>, secret: Option<String>, ttl: Duration },
    /// No STUN/TURN: host candidates only.
    None,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("config file {path} is not valid: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{setting} = {value} is out of range: {hint}")]
    Range { setting: &'static str, value: String, hint: &'static str },
}

impl ServeArgs {
    pub fn load_file(path: &Path) -> Result<ServeArgs, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.into(), source })?;
        toml::from_str(&text).map_err(|e| ConfigError::Parse { path: path.into(), message: e.to_string() })
    }

    /// Merges with the `--config` file (if any) and the defaults, and checks ranges.
    pub fn resolve(&self) -> Result<ServeConfig, ConfigError> {
        let file = match &self.config {
            Some(p) => ServeArgs::load_file(p)?,
            None => ServeArgs::default(),
        };
        macro_rules! pick {
            ($f:ident, $default:expr) => {
                self.$f.clone().or(file.$f.clone()).unwrap_or($default)
            };
        }
        let d = webcall_rooms::Config::default();
        let rooms = webcall_rooms::Config {
            max_peers: pick!(max_peers, d.max_peers),
            max_rooms: pick!(max_rooms, d.max_rooms),
            resume_grace: pick!(resume_grace, d.resume_grace),
            max_queued: pick!(max_queued_messages, d.max_queued),
            max_queued_bytes: pick!(max_queued_bytes, d.max_queued_bytes),
            max_message_size: pick!(max_message_size, d.max_message_size),
            rate_per_sec: pick!(rate_limit, d.rate_per_sec),
            max_errors: pick!(max_errors, d.max_errors),
            password_attempts_per_min: pick!(max_password_attempts, d.password_attempts_per_min),
            seed: rand::random(),
            topology: pick!(topology, d.topology),
            max_sfu_peers: pick!(max_sfu_peers, d.max_sfu_peers),
            recording: self.record_dir.is_some() || file.record_dir.is_some(),
        };
        let cfg = ServeConfig {
            listen: pick!(listen, SocketAddr::from(([127, 0, 0, 1], 8080))),
            max_connections: pick!(max_connections, 16_000),
            ping_interval: pick!(ping_interval, Duration::from_secs(10)),
            idle_timeout: pick!(idle_timeout, Duration::from_secs(30)),
            rooms,
            tls: match (self.tls_cert.clone().or(file.tls_cert.clone()), self.tls_key.clone().or(file.tls_key.clone()))
            {
                (Some(cert), Some(key)) => Some(TlsSource::Files { cert, key }),
                (Some(_), None) | (None, Some(_)) => {
                    return Err(ConfigError::Range {
                        setting: "tls-cert",
                        value: "(only one of tls-cert, tls-key)".into(),
                        hint: "give both --tls-cert and --tls-key",
                    })
                }
                (None, None) if pick!(tls_self_signed, false) => Some(TlsSource::SelfSigned),
                (None, None) => None,
            },
            auth_secret: self.auth_secret.clone().or(file.auth_secret.clone()),
            allowed_origins: self.allowed_origins.clone().or(file.allowed_origins.clone()),
            trusted_proxies: pick!(
                trusted_proxies,
                vec!["127.0.0.0/8".parse().expect("valid"), "::1/128".parse().expect("valid")]
            ),
            max_connections_per_ip: pick!(max_connections_per_ip, 256),
            max_joins_per_ip: pick!(max_joins_per_ip, 600),
            shutdown_timeout: pick!(shutdown_timeout, Duration::from_secs(10)),
            redis: self.redis.clone().or(file.redis.clone()),
            node_id: self.node_id.clone().or(file.node_id.clone()),
            node_ttl: pick!(node_ttl, Duration::from_secs(10)),
            replay_limit: pick!(replay_limit, DEFAULT_REPLAY_LIMIT),
            ice: IceSource::None,
            media_listen: pick!(media_listen, SocketAddr::from(([127, 0, 0, 1], 7882))),
            media_external_ip: self
                .media_external_ip
                .or(file.media_external_ip)
                .or(self.turn.external_ip)
                .or(file.turn.external_ip),
            sfu_caps: {
                let d = webcall_sfu::Caps::default();
                webcall_sfu::Caps {
                    max_tracks: pick!(max_sfu_tracks, d.max_tracks),
                    max_room_tracks: pick!(max_sfu_room_tracks, d.max_room_tracks),
                    max_bitrate: pick!(max_sfu_kbps, d.max_bitrate / 1000).saturating_mul(1000),
                    max_room_bitrate: pick!(max_sfu_room_kbps, d.max_room_bitrate / 1000).saturating_mul(1000),
                }
            },
            record_dir: self.record_dir.clone().or(file.record_dir.clone()),
        };
        let range = |setting, value: String, ok: bool, hint| {
            if ok {
                Ok(())
            } else {
                Err(ConfigError::Range { setting, value, hint })
            }
        };
        let mut cfg = cfg;
        let turn = self.turn.clone().or(file.turn.clone());
        cfg.ice = match (self.ice_servers.clone().or(file.ice_servers.clone()), pick!(no_turn, false)) {
            (Some(urls), _) => {
                for u in &urls {
                    let ok = ["stun:", "stuns:", "turn:", "turns:"].iter().any(|p| u.starts_with(p));
                    range("ice-servers", u.clone(), ok, "each URL starts with stun:, stuns:, turn: or turns:")?;
                }
                let needs_secret = urls.iter().any(|u| u.starts_with("turn"));
                range(
                    "ice-servers",
                    urls.join(","),
                    !needs_secret || turn.secret.is_some(),
                    "turn: URLs need --turn-secret (coturn's static-auth-secret) to mint credentials",
                )?;
                let ttl = turn.credential_ttl.unwrap_or(webcall_turn::defaults::EXTERNAL_CREDENTIAL_TTL);
                IceSource::External { urls, secret: turn.secret, ttl }
            }
            (None, true) => IceSource::None,
            (None, false) => {
                // One browser tab holds a peer connection per other peer plus a spare, each with up to two relay
                // allocations (UDP and TCP): a full room must not run out of its own quota.
                let mut turn = turn;
                turn.user_quota.get_or_insert((2 * cfg.rooms.max_peers).max(webcall_turn::defaults::USER_QUOTA));
                IceSource::BuiltIn(turn)
            }
        };
        let r = &cfg.rooms;
        range("max-peers", r.max_peers.to_string(), (2..=64).contains(&r.max_peers), "a call has 2 to 64 peers")?;
        range("max-rooms", r.max_rooms.to_string(), r.max_rooms >= 1, "at least 1")?;
        range(
            "max-sfu-peers",
            r.max_sfu_peers.to_string(),
            (3..=1000).contains(&r.max_sfu_peers),
            "an SFU room has 3 to 1000 peers",
        )?;
        let caps = &cfg.sfu_caps;
        range("max-sfu-tracks", caps.max_tracks.to_string(), caps.max_tracks >= 1, "at least 1")?;
        range("max-sfu-room-tracks", caps.max_room_tracks.to_string(), caps.max_room_tracks >= 1, "at least 1")?;
        let kbps = |b: u64| (b / 1000).to_string();
        range("max-sfu-kbps", kbps(caps.max_bitrate), caps.max_bitrate >= 100_000, "at least 100 (kbit/s)")?;
        range(
            "max-sfu-room-kbps",
            kbps(caps.max_room_bitrate),
            caps.max_room_bitrate >= 100_000,
            "at least 100 (kbit/s)",
        )?;
        range("max-connections", cfg.max_connections.to_string(), cfg.max_connections >= 1, "at least 1")?;
        range(
            "max-message-size",
            r.max_message_size.to_string(),
            (1024..=16 << 20).contains(&r.max_message_size),
            "1 KiB to 16 MiB; an SDP offer needs about 10 KiB",
        )?;
        range("max-queued-messages", r.max_queued.to_string(), r.max_queued >= 16, "at least 16")?;
        range(
            "max-queued-bytes",
            r.max_queued_bytes.to_string(),
            r.max_queued_bytes >= r.max_message_size,
            "at least --max-message-size, so one full message fits",
        )?;
        range(
            "replay-limit",
            cfg.replay_limit.to_string(),
            cfg.replay_limit >= r.max_message_size * 4,
            "at least four times --max-message-size, so a burst of large messages fits",
        )?;
        range("rate-limit", r.rate_per_sec.to_string(), r.rate_per_sec >= 1.0, "at least 1 per second")?;
        range("max-errors", r.max_errors.to_string(), r.max_errors >= 1.0, "at least 1")?;
        range(
            "max-password-attempts",
            r.password_attempts_per_min.to_string(),
            r.password_attempts_per_min >= 1.0,
            "at least 1 per minute",
        )?;
        range(
            "max-connections-per-ip",
            cfg.max_connections_per_ip.to_string(),
            cfg.max_connections_per_ip >= 1,
            "at least 1",
        )?;
        range(
            "max-joins-per-ip",
            cfg.max_joins_per_ip.to_string(),
            cfg.max_joins_per_ip >= 1,
            "at least 1 per minute",
        )?;
        if let Some(secret) = &cfg.auth_secret {
            range(
                "auth-secret",
                "(hidden)".into(),
                secret.len() >= 16,
                "use at least 16 characters (e.g. openssl rand -hex 32)",
            )?;
        }
        range(
            "ping-interval",
            format!("{:?}", cfg.ping_interval),
            cfg.ping_interval >= Duration::from_millis(100) && cfg.ping_interval < cfg.idle_timeout,
            "at least 100ms and shorter than idle-timeout",
        )?;
        Ok(cfg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn built_in_user_quota(args: ServeArgs) -> Option<usize> {
        match args.resolve().unwrap().ice {
            IceSource::BuiltIn(t) => t.user_quota,
            _ => panic!("the built-in TURN server"),
        }
    }

    #[test]
    fn topology_and_media_settings() {
        let d = ServeArgs::default().resolve().unwrap();
        assert_eq!(d.rooms.topology, webcall_rooms::Topology::Auto);
        assert_eq!(d.rooms.max_sfu_peers, 100);
        assert_eq!(d.media_listen, SocketAddr::from(([127, 0, 0, 1], 7882)));
        assert_eq!(d.media_external_ip, None);

        let file: ServeArgs =
            toml::from_str("topology = \"sfu\"\nmax-sfu-peers = 30\nmedia-listen = \"127.0.0.1:0\"").unwrap();
        let c = file.resolve().unwrap();
        assert_eq!((c.rooms.topology, c.rooms.max_sfu_peers), (webcall_rooms::Topology::Sfu, 30));
        assert!(toml::from_str::<ServeArgs>("topology = \"star\"").is_err());

        // The media address follows --turn-external-ip unless --media-external-ip is given.
        let mut args = ServeArgs::default();
        args.turn.external_ip = Some("192.0.2.7".parse().unwrap());
        assert_eq!(args.resolve().unwrap().media_external_ip, Some("192.0.2.7".parse().unwrap()));
        args.media_external_ip = Some("192.0.2.8".parse().unwrap());
        assert_eq!(args.resolve().unwrap().media_external_ip, Some("192.0.2.8".parse().unwrap()));

        let small = ServeArgs { max_sfu_peers: Some(2), ..Default::default() };
        assert!(small.resolve().unwrap_err().to_string().contains("max-sfu-peers"));

        // SFU caps: defaults, from the TOML file in kbit/s, and refused when nonsensical.
        assert_eq!(d.sfu_caps, webcall_sfu::Caps::default());
        assert_eq!(d.sfu_caps.max_room_bitrate, 100_000_000);
        let file: ServeArgs = toml::from_str(
            "max-sfu-room-kbps = 2500
max-sfu-room-tracks = 40",
        )
        .unwrap();
        let c = file.resolve().unwrap().sfu_caps;
        assert_eq!((c.max_room_bitrate, c.max_room_tracks, c.max_tracks), (2_500_000, 40, 10_000));
        let tiny = ServeArgs { max_sfu_kbps: Some(10), ..Default::default() };
        assert!(tiny.resolve().unwrap_err().to_string().contains("max-sfu-kbps"));
    }

    #[test]
    fn record_dir_is_off_by_default_and_read_from_the_file() {
        let d = ServeArgs::default().resolve().unwrap();
        assert_eq!((d.record_dir, d.rooms.recording), (None, false));
        let file: ServeArgs = toml::from_str("record-dir = \"/var/lib/webcall/rec\"").unwrap();
        let c = file.resolve().unwrap();
        assert_eq!(c.record_dir, Some(PathBuf::from("/var/lib/webcall/rec")));
        assert!(c.rooms.recording, "the room core takes record messages");
    }

    #[test]
    fn replay_limit_default_file_and_range() {
        assert_eq!(ServeArgs::default().resolve().unwrap().replay_limit, DEFAULT_REPLAY_LIMIT);
        let file: ServeArgs = toml::from_str("replay-limit = 1048576").unwrap();
        assert_eq!(file.resolve().unwrap().replay_limit, 1 << 20);
        let tiny = ServeArgs { replay_limit: Some(1000), ..Default::default() };
        assert!(tiny.resolve().unwrap_err().to_string().contains("replay-limit"));
    }

    #[test]
    fn the_turn_user_quota_follows_the_room_size_unless_set() {
        assert_eq!(built_in_user_quota(ServeArgs::default()), Some(10), "4 peers: the old default");
        let big = ServeArgs { max_peers: Some(12), ..Default::default() };
        assert_eq!(built_in_user_quota(big), Some(24), "11 peer connections and a spare, two allocations each");
        let mut set = ServeArgs { max_peers: Some(12), ..Default::default() };
        set.turn.user_quota = Some(3);
        assert_eq!(built_in_user_quota(set), Some(3), "an explicit quota wins");
    }
}
