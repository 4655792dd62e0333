//! Who may connect and join: signed join tokens, per-address limits, allowed origins, trusted proxies.

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use webcall_protocol::{ErrorCode, Join, ProtocolError};
use webcall_rooms::{Admission, ConnId, JoinPolicy};

/// Claims of a join token (HS256 JWT).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Claims {
    /// The room this token admits to; `*` admits to any room.
    pub room: String,
    /// The display name the holder appears with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Expiry, seconds since the Unix epoch.
    pub exp: u64,
    /// Not valid before this time (seconds since the Unix epoch), when present.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<u64>,
    /// `join` (required), `publish` (send media; without it the holder is subscribe-only) and `record` (start and
    /// stop recording the room).
    pub permissions: Vec<String>,
}

/// Mints a join token, as `webcall token` does.
pub fn mint_token(secret: &str, room: &str, name: Option<&str>, ttl: Duration, publish: bool) -> String {
    mint_token_with(secret, room, name, ttl, publish, false)
}

/// [`mint_token`], with the `record` permission when `record` is set.
pub fn mint_token_with(
    secret: &str,
    room: &str,
    name: Option<&str>,
    ttl: Duration,
    publish: bool,
    record: bool,
) -> String {
    let exp = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_secs() + ttl.as_secs();
    let mut permissions = vec!["join".to_owned()];
    if publish {
        permissions.push("publish".to_owned());
    }
    if record {
        permissions.push("record".to_owned());
    }
    let claims = Claims { room: room.to_owned(), name: name.map(str::to_owned), exp, nbf: None, permissions };
    jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &EncodingKey::from_secret(secret.as_bytes()))
        .expect("HS256 signing cannot fail")
}

fn unauthorized(msg: impl Into<String>) -> ProtocolError {
    ProtocolError::new(ErrorCode::Unauthorized, msg)
}

/// Checks a join token; `Ok` is what it grants.
pub fn verify_token(secret: &str, token: Option<&str>, room: &str) -> Result<Admission, ProtocolError> {
    let token = token.ok_or_else(|| unauthorized("this server needs a join token: add \"token\" to join"))?;
    let mut v = Validation::new(Algorithm::HS256);
    v.leeway = 5;
    v.validate_nbf = true;
    v.set_required_spec_claims(&["exp"]);
    let data =
        jsonwebtoken::decode::<Claims>(token, &DecodingKey::from_secret(secret.as_bytes()), &v).map_err(|e| {
            use jsonwebtoken::errors::ErrorKind;
            match e.kind() {
                ErrorKind::ExpiredSignature => unauthorized("the join token has expired; ask for a new one"),
                ErrorKind::ImmatureSignature => unauthorized("the join token is not valid yet (nbf); try again later"),
                ErrorKind::InvalidSignature => unauthorized("the join token's signature is not valid for this server"),
                _ => unauthorized(format!("the join token is not valid: {e}")),
            }
        })?;
    let c = data.claims;
    if c.room != "*" && c.room != room {
        return Err(unauthorized(format!("the join token is for room '{}', not '{room}'", c.room)));
    }
    if !c.permissions.iter().any(|p| p == "join") {
        return Err(unauthorized("the join token does not grant 'join'"));
    }
    let has = |what: &str| c.permissions.iter().any(|p| p == what);
    Ok(Admission { name: c.name.clone(), publish: has("publish"), record: has("record") })
}

struct Bucket {
    tokens: f64,
    last: Instant,
}

/// The server's [`JoinPolicy`]: join tokens (when a secret is set) and a join rate per client address.
pub struct ServerPolicy {
    secret: Option<String>,
    joins_per_min: f64,
    /// Keyed by connection ids the server picks, so a fast hash is safe.
    addrs: Mutex<HashMap<ConnId, IpAddr, rustc_hash::FxBuildHasher>>,
    buckets: Mutex<HashMap<IpAddr, Bucket>>,
}

impl ServerPolicy {
    pub fn new(secret: Option<String>, joins_per_min: u32) -> Self {
        ServerPolicy {
            secret,
            joins_per_min: joins_per_min as f64,
            addrs: Mutex::new(HashMap::default()),
            buckets: Mutex::new(HashMap::new()),
        }
    }

    pub fn register(&self, conn: ConnId, ip: IpAddr) {
        self.addrs.lock().insert(conn, ip);
    }

    pub fn unregister(&self, conn: ConnId) {
        let mut addrs = self.addrs.lock();
        addrs.remove(&conn);
        // A map keeps its peak capacity; give it back once mostly empty (after load).
        if addrs.capacity() > 64 && addrs.len() * 4 < addrs.capacity() {
            addrs.shrink_to_fit();
        }
    }

    fn take_join(&self, ip: IpAddr) -> bool {
        let ip = addr_key(ip);
        let now = Instant::now();
        let (cap, per_sec) = (self.joins_per_min, self.joins_per_min / 60.0);
        let mut buckets = self.buckets.lock();
        if buckets.len() > 100_000 {
            // Forget addresses whose bucket has refilled: they are back to the default anyway.
            buckets.retain(|_, b| b.tokens + now.saturating_duration_since(b.last).as_secs_f64() * per_sec < cap);
        }
        let b = buckets.entry(ip).or_insert(Bucket { tokens: cap, last: now });
        b.tokens = (b.tokens + now.saturating_duration_since(b.last).as_secs_f64() * per_sec).min(cap);
        b.last = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

impl JoinPolicy for ServerPolicy {
    fn admit(&self, conn: ConnId, join: &Join<'_>) -> Result<Admission, ProtocolError> {
        let ip = self.addrs.lock().get(&conn).copied();
        if let Some(ip) = ip {
            if !self.take_join(ip) {
                return Err(ProtocolError::new(
                    ErrorCode::RateLimited,
                    format!("more than {} joins per minute from your address; wait a little", self.joins_per_min),
                ));
            }
        }
        match &self.secret {
            Some(secret) => verify_token(secret, join.token.as_deref(), &join.room),
            None => Ok(Admission::default()),
        }
    }
}

/// What per-address limits count against: IPv4 addresses as they are (also when they arrive IPv4-mapped on a
/// dual-stack socket), IPv6 addresses by their /64 (one host usually has a whole /64 to pick from).
pub fn addr_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => IpAddr::V6(std::net::Ipv6Addr::from(v6.to_bits() & !((1u128 << 64) - 1))),
        v4 => v4,
    }
}

/// The client's address: the socket peer, or, when that peer is a trusted proxy, the right-most address in
/// `X-Forwarded-For` that is not itself a trusted proxy. IPv4-mapped IPv6 addresses come out as IPv4, so
/// `127.0.0.0/8` matches a proxy on a dual-stack listener.
pub fn client_ip(peer: IpAddr, forwarded_for: Option<&str>, trusted: &[ipnet::IpNet]) -> IpAddr {
    let peer = peer.to_canonical();
    let is_trusted = |ip: &IpAddr| trusted.iter().any(|n| n.contains(ip));
    if !is_trusted(&peer) {
        return peer;
    }
    let Some(xff) = forwarded_for else { return peer };
    let mut chosen = peer;
    for hop in xff.rsplit(',') {
        match hop.trim().parse::<IpAddr>().map(|ip| ip.to_canonical()) {
            Ok(ip) => {
                chosen = ip;
                if !is_trusted(&ip) {
                    break;
                }
            }
            Err(_) => break,
        }
    }
    chosen
}

/// Counts TCP connections per client address as they are accepted, before any byte is read (so before the TLS
/// handshake, the HTTP request and the WebSocket upgrade), and refuses past `limit`: half-sent requests from one
/// address cannot take every file descriptor. Trusted proxies are not counted here (the WebSocket limit counts
/// their clients by `X-Forwarded-For`).
#[derive(Clone)]
pub struct ConnCap(Arc<CapState>);

struct CapState {
    limit: usize,
    trusted: Vec<ipnet::IpNet>,
    open: Mutex<HashMap<IpAddr, usize>>,
    refused: Arc<AtomicU64>,
}

impl ConnCap {
    pub fn new(limit: usize, trusted: Vec<ipnet::IpNet>, refused: Arc<AtomicU64>) -> Self {
        ConnCap(Arc::new(CapState { limit, trusted, open: Mutex::new(HashMap::new()), refused }))
    }

    /// A slot for a connection from `peer`, or `None` when that address is at its limit.
    fn admit(&self, peer: IpAddr) -> Option<Slot> {
        let peer = peer.to_canonical();
        if self.0.trusted.iter().any(|n| n.contains(&peer)) {
            return Some(Slot(None));
        }
        let key = addr_key(peer);
        let mut open = self.0.open.lock();
        let n = open.entry(key).or_insert(0);
        if *n >= self.0.limit {
            drop(open);
            self.0.refused.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        *n += 1;
        Some(Slot(Some((self.clone(), key))))
    }
}

/// One counted connection; gives its place back when dropped.
struct Slot(Option<(ConnCap, IpAddr)>);

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some((cap, key)) = self.0.take() {
            let mut open = cap.0.open.lock();
            if let Some(n) = open.get_mut(&key) {
                *n -= 1;
                if *n == 0 {
                    open.remove(&key);
                }
            }
        }
    }
}

/// An accepted TCP stream holding its [`ConnCap`] slot for as long as it lives (also once upgraded).
pub struct Counted {
    io: tokio::net::TcpStream,
    _slot: Slot,
}

impl Counted {
    /// Looks at the first bytes without taking them.
    pub async fn peek(&self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.io.peek(buf).await
    }
}

impl<S> axum_server::accept::Accept<tokio::net::TcpStream, S> for ConnCap {
    type Stream = Counted;
    type Service = S;
    type Future = std::future::Ready<std::io::Result<(Counted, S)>>;

    fn accept(&self, io: tokio::net::TcpStream, service: S) -> Self::Future {
        // On Linux accepted sockets inherit TCP_NODELAY from the listener.
        #[cfg(not(target_os = "linux"))]
        let _ = io.set_nodelay(true);
        let slot = match io.peer_addr() {
            Ok(peer) => self.admit(peer.ip()),
            Err(e) => return std::future::ready(Err(e)),
        };
        std::future::ready(match slot {
            Some(slot) => Ok((Counted { io, _slot: slot }, service)),
            // Dropping the stream closes it at once.
            None => Err(std::io::Error::other("too many connections from this address")),
        })
    }
}

impl tokio::io::AsyncRead for Counted {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for Counted {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "0123456789abcdef0123";

    #[test]
    fn tokens_round_trip_and_refuse_what_they_should() {
        let t = mint_token(SECRET, "r", Some("Ann"), Duration::from_secs(60), true);
        assert_eq!(
            verify_token(SECRET, Some(&t), "r").unwrap(),
            Admission { name: Some("Ann".into()), publish: true, record: false }
        );
        let e = verify_token(SECRET, Some(&t), "other").unwrap_err();
        assert!(e.message.contains("for room 'r'"), "{e}");
        let e = verify_token("another-secret-xxxxxxxx", Some(&t), "r").unwrap_err();
        assert!(e.message.contains("signature"), "{e}");
        assert_eq!(verify_token(SECRET, None, "r").unwrap_err().code, ErrorCode::Unauthorized);
        assert!(verify_token(SECRET, Some("garbage"), "r").is_err());
        let viewer = mint_token(SECRET, "*", None, Duration::from_secs(60), false);
        assert_eq!(
            verify_token(SECRET, Some(&viewer), "any").unwrap(),
            Admission { name: None, publish: false, record: false }
        );
        let rec = mint_token_with(SECRET, "r", None, Duration::from_secs(60), true, true);
        assert!(verify_token(SECRET, Some(&rec), "r").unwrap().record, "the record permission");
        // Expired an hour ago.
        let claims =
            Claims { room: "r".into(), name: None, exp: 1_000_000, nbf: None, permissions: vec!["join".into()] };
        let old =
            jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &EncodingKey::from_secret(SECRET.as_bytes()))
                .unwrap();
        assert!(verify_token(SECRET, Some(&old), "r").unwrap_err().message.contains("expired"));
        // alg=none is refused.
        let none = format!(
            "{}.{}.",
            b64(r#"{"alg":"none","typ":"JWT"}"#),
            b64(r#"{"room":"r","exp":9999999999,"permissions":["join"]}"#)
        );
        assert!(verify_token(SECRET, Some(&none), "r").is_err());
    }

    fn b64(s: &str) -> String {
        use base64::Engine;
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s)
    }

    #[test]
    fn forwarded_for_only_from_trusted_proxies() {
        let trusted: Vec<ipnet::IpNet> = vec!["10.0.0.0/8".parse().unwrap()];
        let proxy: IpAddr = "10.1.1.1".parse().unwrap();
        let stranger: IpAddr = "198.51.100.7".parse().unwrap();
        assert_eq!(client_ip(stranger, Some("1.2.3.4"), &trusted), stranger, "untrusted peers cannot claim an address");
        assert_eq!(client_ip(proxy, Some("1.2.3.4, 10.2.2.2"), &trusted), "1.2.3.4".parse::<IpAddr>().unwrap());
        assert_eq!(
            client_ip(proxy, Some("6.6.6.6, 1.2.3.4"), &trusted),
            "1.2.3.4".parse::<IpAddr>().unwrap(),
            "right-most untrusted hop"
        );
        assert_eq!(client_ip(proxy, None, &trusted), proxy);
        assert_eq!(client_ip(proxy, Some("junk"), &trusted), proxy);
        // A dual-stack listener sees an IPv4 proxy as ::ffff:a.b.c.d.
        let loopback: Vec<ipnet::IpNet> = vec!["127.0.0.0/8".parse().unwrap()];
        let mapped: IpAddr = "::ffff:127.0.0.1".parse().unwrap();
        assert_eq!(client_ip(mapped, Some("::ffff:1.2.3.4"), &loopback), "1.2.3.4".parse::<IpAddr>().unwrap());
        assert_eq!(client_ip(mapped, None, &loopback), "127.0.0.1".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn limits_key_ipv6_by_its_64() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:bbbb::9".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(addr_key(a), addr_key(b));
        assert_eq!(addr_key(a), "2001:db8:1:2::".parse::<IpAddr>().unwrap());
        assert_ne!(addr_key(a), addr_key(c));
        assert_eq!(addr_key("::ffff:10.0.0.1".parse().unwrap()), "10.0.0.1".parse::<IpAddr>().unwrap());
        assert_eq!(addr_key("10.0.0.1".parse().unwrap()), "10.0.0.1".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn not_before_is_honoured() {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs();
        let claims =
            |nbf| Claims { room: "r".into(), name: None, exp: now + 600, nbf, permissions: vec!["join".into()] };
        let sign = |c: &Claims| {
            jsonwebtoken::encode(&Header::new(Algorithm::HS256), c, &EncodingKey::from_secret(SECRET.as_bytes()))
                .unwrap()
        };
        let e = verify_token(SECRET, Some(&sign(&claims(Some(now + 300)))), "r").unwrap_err();
        assert!(e.message.contains("not valid yet"), "{e}");
        assert!(verify_token(SECRET, Some(&sign(&claims(Some(now - 1)))), "r").is_ok());
    }
}
