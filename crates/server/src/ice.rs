//! `iceServers` for external STUN/TURN servers (`--ice-servers`), e.g. a coturn with `use-auth-secret`.

use std::time::{Duration, SystemTime, UNIX_EPOCH};
use webcall_protocol::IceServer;
use webcall_rooms::IceProvider;

pub struct ExternalIce {
    stun: Vec<String>,
    turn: Vec<String>,
    secret: Option<String>,
    ttl: Duration,
}

impl ExternalIce {
    pub fn new(urls: Vec<String>, secret: Option<String>, ttl: Duration) -> Self {
        let (turn, stun) = urls.into_iter().partition(|u| u.starts_with("turn"));
        ExternalIce { stun, turn, secret, ttl }
    }
}

impl IceProvider for ExternalIce {
    fn ice_servers(&self, peer_id: &str) -> Vec<IceServer> {
        let mut out = Vec::new();
        if !self.stun.is_empty() {
            out.push(IceServer { urls: self.stun.clone(), username: None, credential: None });
        }
        if let (false, Some(secret)) = (self.turn.is_empty(), &self.secret) {
            let expiry = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default() + self.ttl;
            let username = webcall_turn::rest_username(expiry.as_secs(), peer_id);
            let credential = webcall_turn::rest_password(secret.as_bytes(), &username);
            out.push(IceServer { urls: self.turn.clone(), username: Some(username), credential: Some(credential) });
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn turn_urls_get_coturn_rest_credentials() {
        let ice = ExternalIce::new(
            vec!["stun:turn.example.com:3478".into(), "turn:turn.example.com:3478?transport=udp".into()],
            Some("s3cret".into()),
            Duration::from_secs(3600),
        );
        let got = ice.ice_servers("peer1");
        assert_eq!(got[0].urls, ["stun:turn.example.com:3478"]);
        assert!(got[0].username.is_none());
        let user = got[1].username.clone().unwrap();
        let (expiry, id) = user.split_once(':').unwrap();
        assert_eq!(id, "peer1");
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs();
        assert!((now + 3590..=now + 3610).contains(&expiry.parse::<u64>().unwrap()));
        assert_eq!(got[1].credential.as_deref(), Some(webcall_turn::rest_password(b"s3cret", &user).as_str()));
    }
}
