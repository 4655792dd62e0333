//! Every default of the STUN/TURN server in one place: the flags ([`crate::TurnArgs`]), the resolved
//! [`crate::TurnConfig`], the core's [`crate::CoreConfig`] and `webcall serve` all read them from here.

use std::time::Duration;

use crate::config::PortRange;

pub const LISTEN: &str = "127.0.0.1:3478";
pub const REALM: &str = "webcall";
pub const RELAY_PORTS: PortRange = PortRange { min: 49152, max: 65535 };

/// Lifetime of minted TURN credentials. Short, so that credentials a client still holds after `bye` soon stop
/// opening allocations; an allocation made in time outlives them as long as its client refreshes it (the
/// built-in server accepts Refresh, CreatePermission and ChannelBind on it with the same credentials).
pub const CREDENTIAL_TTL: Duration = Duration::from_secs(2 * 3600);
/// The same for credentials minted for an external TURN server (`--ice-servers`): coturn refuses every
/// request once the credentials expired, refreshes of a running call included, so these must outlast a call.
pub const EXTERNAL_CREDENTIAL_TTL: Duration = Duration::from_secs(24 * 3600);

/// Allocations per user (the peer id of the TURN REST username); `webcall serve` raises it to 2 × --max-peers.
pub const USER_QUOTA: usize = 10;
/// Allocations on the whole server.
pub const TOTAL_QUOTA: usize = 1000;
/// Allocations per client IP address, whatever the credentials.
pub const IP_QUOTA: usize = 32;
/// Permissions (peer IPs) per allocation; channels per allocation have the same cap.
pub const MAX_PERMISSIONS: usize = 64;

/// Allocation lifetime when the client asks for none or less (RFC 8656 §7.2), and the least
/// `--turn-max-lifetime` may be.
pub const ALLOCATION_LIFETIME: Duration = Duration::from_secs(600);
/// Longest allocation lifetime a client may ask for.
pub const MAX_LIFETIME: Duration = Duration::from_secs(3600);
pub const PERMISSION_LIFETIME: Duration = Duration::from_secs(300);
pub const CHANNEL_LIFETIME: Duration = Duration::from_secs(600);
/// How long a NONCE stays valid before 438 (Stale Nonce).
pub const NONCE_LIFETIME: Duration = Duration::from_secs(600);

/// A TCP/TLS connection is closed when no complete STUN message or ChannelData came for this long and it
/// holds no allocation (a byte now and then does not keep it open); an allocation's own lifetime bounds
/// the others.
pub const STREAM_IDLE: Duration = Duration::from_secs(30);
/// A new TCP connection must send a complete first message, and a TLS one finish its handshake, in this time.
pub const STREAM_FIRST_MESSAGE: Duration = Duration::from_secs(10);
/// Open TCP/TLS connections per allocation of the total quota the server accepts (at least 64 in all).
pub const STREAMS_PER_ALLOCATION: usize = 2;
/// Open TCP/TLS connections from one client address (IPv6: one /64), handshaking ones included.
pub const STREAMS_PER_IP: usize = 64;
/// Bytes queued for one TCP/TLS client: past it, relayed data is dropped (as UDP would lose it) and a
/// client that does not read its answers is disconnected.
pub const STREAM_QUEUE: usize = 256 << 10;
/// A write to a TCP/TLS client that makes no progress for this long closes the connection.
pub const STREAM_WRITE_TIMEOUT: Duration = Duration::from_secs(10);
