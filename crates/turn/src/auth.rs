//! TURN REST credentials (coturn's `use-auth-secret`) and the `iceServers` minter for the signaling `welcome`.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use hmac::{Hmac, Mac};
use md5::{Digest, Md5};
use sha1::Sha1;
use webcall_protocol::IceServer;

/// `base64(HMAC-SHA1(secret, username))`, exactly as coturn's `use-auth-secret` computes the password.
pub fn rest_password(secret: &[u8], username: &str) -> String {
    let mut mac = <Hmac<Sha1> as Mac>::new_from_slice(secret).expect("hmac takes any key");
    mac.update(username.as_bytes());
    base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
}

/// `<unix expiry>:<peer id>`.
pub fn rest_username(expiry_unix: u64, peer_id: &str) -> String {
    format!("{expiry_unix}:{peer_id}")
}

/// Splits a TURN REST username into (expiry, user) the way coturn does: the timestamp is the part before
/// the first `:` when that part is all digits, otherwise the part after it; no `:` means the whole name is
/// the timestamp. `None` when there is no valid timestamp.
pub fn parse_rest_username(username: &str) -> Option<(u64, &str)> {
    let digits = |s: &str| !s.is_empty() && s.len() <= 19 && s.bytes().all(|b| b.is_ascii_digit());
    match username.split_once(':') {
        None => digits(username).then(|| (username.parse().ok(), "")).and_then(|(t, u)| Some((t?, u))),
        Some((a, b)) if digits(a) => Some((a.parse().ok()?, b)),
        Some((a, b)) if digits(b) => Some((b.parse().ok()?, a)),
        Some(_) => None,
    }
}

/// The long-term credential key, `MD5(username ":" realm ":" password)` (RFC 8489 §9.2.2).
pub fn long_term_key(username: &str, realm: &str, password: &str) -> [u8; 16] {
    let mut h = Md5::new();
    h.update(username.as_bytes());
    h.update(b":");
    h.update(realm.as_bytes());
    h.update(b":");
    h.update(password.as_bytes());
    h.finalize().into()
}

/// The SHA-256 long-term credential key, `SHA-256(username ":" realm ":" password)` (RFC 8489 §9.2.2), for
/// clients that pick PASSWORD-ALGORITHM SHA-256.
pub fn long_term_key_sha256(username: &str, realm: &str, password: &str) -> [u8; 32] {
    use sha2::Digest as _;
    let mut h = sha2::Sha256::new();
    h.update(username.as_bytes());
    h.update(b":");
    h.update(realm.as_bytes());
    h.update(b":");
    h.update(password.as_bytes());
    h.finalize().into()
}

/// Mints time-limited TURN credentials and the `iceServers` list for one peer. Cheap to clone.
#[derive(Clone)]
pub struct IceMinter {
    /// HMAC-SHA1 already keyed with the secret (both pads hashed once, not for every `welcome`).
    mac: Hmac<Sha1>,
    ttl: Duration,
    stun_urls: Arc<[String]>,
    turn_urls: Arc<[String]>,
}

impl std::fmt::Debug for IceMinter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IceMinter")
            .field("ttl", &self.ttl)
            .field("stun_urls", &self.stun_urls)
            .field("turn_urls", &self.turn_urls)
            .finish_non_exhaustive()
    }
}

/// `host` as it goes into a URL: IPv6 addresses in brackets.
fn url_host(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => format!("[{v6}]"),
    }
}

impl IceMinter {
    /// `host` is what browsers should dial (an IP or a DNS name, IPv6 in brackets); `port` the UDP/TCP
    /// port; `turns` optionally the host:port of TURN over TLS (adds a `turns:` URL).
    pub fn new(secret: impl Into<Vec<u8>>, ttl: Duration, host: &str, port: u16, turns: Option<(&str, u16)>) -> Self {
        let stun_urls = vec![format!("stun:{host}:{port}")];
        let mut turn_urls =
            vec![format!("turn:{host}:{port}?transport=udp"), format!("turn:{host}:{port}?transport=tcp")];
        if let Some((h, p)) = turns {
            turn_urls.push(format!("turns:{h}:{p}?transport=tcp"));
        }
        let secret: Vec<u8> = secret.into();
        IceMinter {
            mac: <Hmac<Sha1> as Mac>::new_from_slice(&secret).expect("hmac takes any key"),
            ttl,
            stun_urls: stun_urls.into(),
            turn_urls: turn_urls.into(),
        }
    }

    /// Same, from socket addresses (as [`crate::TurnHandle`] knows them).
    pub fn for_addrs(secret: impl Into<Vec<u8>>, ttl: Duration, addr: SocketAddr, turns: Option<SocketAddr>) -> Self {
        let host = url_host(addr.ip());
        let turns_host = turns.map(|a| (url_host(a.ip()), a.port()));
        Self::new(secret, ttl, &host, addr.port(), turns_host.as_ref().map(|(h, p)| (h.as_str(), *p)))
    }

    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// (username, password) valid until `now + ttl`.
    pub fn credentials_at(&self, peer_id: &str, now: SystemTime) -> (String, String) {
        let expiry = (now + self.ttl).duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
        let username = rest_username(expiry, peer_id);
        // Same as `rest_password(secret, &username)`, from the keyed state.
        let mut mac = self.mac.clone();
        mac.update(username.as_bytes());
        let password = base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
        (username, password)
    }

    /// The `iceServers` for peer `peer_id`: one STUN entry, one TURN entry with udp/tcp(/tls) URLs.
    pub fn ice_servers_at(&self, peer_id: &str, now: SystemTime) -> Vec<IceServer> {
        let (username, credential) = self.credentials_at(peer_id, now);
        vec![
            IceServer { urls: self.stun_urls.to_vec(), username: None, credential: None },
            IceServer { urls: self.turn_urls.to_vec(), username: Some(username), credential: Some(credential) },
        ]
    }
}

impl webcall_protocol::IceProvider for IceMinter {
    fn ice_servers(&self, peer_id: &str) -> Vec<IceServer> {
        self.ice_servers_at(peer_id, SystemTime::now())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn username_forms() {
        assert_eq!(parse_rest_username("1700000000:alice"), Some((1700000000, "alice")));
        assert_eq!(parse_rest_username("alice:1700000000"), Some((1700000000, "alice")));
        assert_eq!(parse_rest_username("1700000000"), Some((1700000000, "")));
        assert_eq!(parse_rest_username("alice"), None);
        assert_eq!(parse_rest_username("alice:bob"), None);
        assert_eq!(parse_rest_username("99999999999999999999999:x"), None);
    }

    /// Known answer, computed independently: `echo -n 1700000000:alice | openssl dgst -sha1 -hmac secret -binary | base64`.
    #[test]
    fn password_matches_coturn_formula() {
        assert_eq!(rest_password(b"secret", "1700000000:alice"), "d8soP47RbdIKLDUOpnJPVQyq5Ts=");
    }

    #[test]
    fn minter_output() {
        let m = IceMinter::for_addrs(
            b"secret".to_vec(),
            Duration::from_secs(3600),
            "[::1]:3478".parse().unwrap(),
            Some("127.0.0.1:5349".parse().unwrap()),
        );
        let now = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let s = m.ice_servers_at("peer1", now);
        assert_eq!(s[0].urls, vec!["stun:[::1]:3478"]);
        assert_eq!(
            s[1].urls,
            vec![
                "turn:[::1]:3478?transport=udp",
                "turn:[::1]:3478?transport=tcp",
                "turns:127.0.0.1:5349?transport=tcp"
            ]
        );
        assert_eq!(s[1].username.as_deref(), Some("1700003600:peer1"));
        assert_eq!(s[1].credential.as_deref(), Some(rest_password(b"secret", "1700003600:peer1").as_str()));
        // Works as the room core's provider.
        let p: Box<dyn webcall_protocol::IceProvider> = Box::new(m);
        assert_eq!(p.ice_servers("x").len(), 2);
    }
}
