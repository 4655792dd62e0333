//! Long-term credentials (RFC 8489 §9.2) with TURN REST usernames: nonces, MD5 and SHA-256 keys, MESSAGE-INTEGRITY
//! and MESSAGE-INTEGRITY-SHA256.

use super::*;

pub(super) struct Authed {
    pub(super) username: Box<str>,
    pub(super) user: Arc<str>,
    pub(super) key: Key,
}

/// A long-term credential key (MD5 or SHA-256 of `username:realm:password`, RFC 8489 §9.2.2) and which
/// integrity attribute the client signed with; answers are signed the same way.
#[derive(Clone, Copy)]
pub(super) struct Key {
    pub(super) bytes: [u8; 32],
    pub(super) len: u8,
    pub(super) sha256: bool,
}

impl Key {
    pub(super) fn as_bytes(&self) -> &[u8] {
        &self.bytes[..self.len as usize]
    }
}

/// The PASSWORD-ALGORITHMS this server offers, in order of preference: SHA-256 (2), then MD5 (1), neither
/// with parameters (RFC 8489 §14.11).
pub(super) const PASSWORD_ALGORITHMS: [u8; 8] = [0, 2, 0, 0, 0, 1, 0, 0];

/// The RFC 8489 nonce cookie with the "password algorithms" security feature bit (§9.2): tells clients
/// that PASSWORD-ALGORITHMS is offered, so a downgrade is detectable.
pub(super) const NONCE_COOKIE: &str = "obMatJos2gAAA";

impl TurnCore {
    pub(super) fn now_secs(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.start).as_secs()
    }

    pub(super) fn nonce(&self, now: Instant, ip: IpAddr) -> String {
        let issued = self.now_secs(now);
        format!("{NONCE_COOKIE}{issued:016x}{:016x}", self.nonce_mac(issued, ip))
    }

    pub(super) fn nonce_mac(&self, issued: u64, ip: IpAddr) -> u64 {
        let mut mac = <Hmac<Sha1> as Mac>::new_from_slice(&self.nonce_key).expect("any key");
        mac.update(&issued.to_be_bytes());
        match ip {
            IpAddr::V4(v) => mac.update(&v.octets()),
            IpAddr::V6(v) => mac.update(&v.octets()),
        }
        u64::from_be_bytes(mac.finalize().into_bytes()[..8].try_into().expect("20 bytes"))
    }

    pub(super) fn nonce_valid(&self, now: Instant, ip: IpAddr, nonce: &[u8]) -> bool {
        let Some(s) = std::str::from_utf8(nonce).ok().and_then(|s| s.strip_prefix(NONCE_COOKIE)) else {
            return false;
        };
        if s.len() != 32 {
            return false;
        }
        let (Ok(issued), Ok(mac)) = (u64::from_str_radix(&s[..16], 16), u64::from_str_radix(&s[16..], 16)) else {
            return false;
        };
        mac == self.nonce_mac(issued, ip)
            && self.now_secs(now).saturating_sub(issued) < self.cfg.nonce_lifetime.as_secs()
    }

    /// RFC 8489 §9.2.4, long-term credentials with TURN REST usernames, MD5 or SHA-256 keys
    /// (PASSWORD-ALGORITHM) and MESSAGE-INTEGRITY or MESSAGE-INTEGRITY-SHA256. On failure the error
    /// response is queued and `None` returned.
    pub(super) fn authenticate(&mut self, now: Instant, tuple: FiveTuple, msg: &Msg<'_>, fp: bool) -> Option<Authed> {
        let mi = msg.attrs().any(|(t, _, _)| t == stun::MESSAGE_INTEGRITY);
        let mi256 = msg.attrs().any(|(t, _, _)| t == stun::MESSAGE_INTEGRITY_SHA256);
        let (Some(username), Some(realm), Some(nonce)) =
            (msg.get(stun::USERNAME), msg.get(stun::REALM), msg.get(stun::NONCE))
        else {
            if !mi && !mi256 {
                self.reply_error(now, tuple, msg, (401, "Unauthorized"), None, fp);
            } else {
                self.reply_error(now, tuple, msg, (400, "Bad Request: USERNAME, REALM and NONCE required"), None, fp);
            }
            return None;
        };
        if !mi && !mi256 {
            self.reply_error(now, tuple, msg, (401, "Unauthorized"), None, fp);
            return None;
        }
        if realm != self.cfg.realm.as_bytes() {
            self.reply_error(now, tuple, msg, (401, "Unauthorized: wrong REALM"), None, fp);
            return None;
        }
        // Both or neither (RFC 8489 §9.2.4); PASSWORD-ALGORITHMS must be the list we sent (no downgrade).
        let sha256_key = match (msg.get(stun::PASSWORD_ALGORITHMS), msg.get(stun::PASSWORD_ALGORITHM)) {
            (None, None) => false,
            (Some(list), Some(alg)) if list == PASSWORD_ALGORITHMS => match alg.get(..2) {
                Some([0, 1]) => false,
                Some([0, 2]) => true,
                _ => {
                    self.reply_error(now, tuple, msg, (400, "Bad Request: unknown PASSWORD-ALGORITHM"), None, fp);
                    return None;
                }
            },
            _ => {
                let fail = (400, "Bad Request: PASSWORD-ALGORITHMS does not match the offer");
                self.reply_error(now, tuple, msg, fail, None, fp);
                return None;
            }
        };
        let unix_now = self.start_unix + self.now_secs(now);
        let valid_user = std::str::from_utf8(username).ok().and_then(|u| {
            let (expiry, user) = auth::parse_rest_username(u)?;
            // Expiry bounds new allocations; an allocation made in time may be kept alive with the same
            // credentials (a call outlives them), as long as its client refreshes it.
            let keeps_alloc = || {
                msg.method() != stun::ALLOCATE
                    && self.by_tuple.get(&tuple).is_some_and(|id| &*self.allocs[id].username == u)
            };
            (expiry > unix_now || keeps_alloc()).then_some((u, user))
        });
        let Some((username, user)) = valid_user else {
            self.reply_error(now, tuple, msg, (401, "Unauthorized: credentials expired or malformed"), None, fp);
            return None;
        };
        let password = auth::rest_password(&self.cfg.secret, username);
        let mut key = Key { bytes: [0; 32], len: 16, sha256: mi256 };
        if sha256_key {
            key.bytes = auth::long_term_key_sha256(username, &self.cfg.realm, &password);
            key.len = 32;
        } else {
            key.bytes[..16].copy_from_slice(&auth::long_term_key(username, &self.cfg.realm, &password));
        }
        let ok = if mi256 { msg.check_integrity_sha256(key.as_bytes()) } else { msg.check_integrity(key.as_bytes()) };
        if ok != Some(true) {
            self.reply_error(now, tuple, msg, (401, "Unauthorized: wrong credentials"), None, fp);
            return None;
        }
        if !self.nonce_valid(now, tuple.client.ip(), nonce) {
            self.reply_error(now, tuple, msg, (438, "Stale Nonce"), None, fp);
            return None;
        }
        let user: Arc<str> = match self.per_user.key(user) {
            Some(k) => k.clone(),
            None => user.into(),
        };
        Some(Authed { username: username.into(), user, key })
    }
}
