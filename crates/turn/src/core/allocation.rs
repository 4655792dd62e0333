//! Allocations (RFC 8656 §7): Allocate with its quotas, EVEN-PORT and RESERVATION-TOKEN, Refresh and
//! lifetimes.

use super::*;

pub(super) struct Allocation {
    pub(super) tuple: FiveTuple,
    pub(super) username: Box<str>,
    pub(super) user: Arc<str>,
    pub(super) key: Key,
    pub(super) family: Family,
    /// Advertised relayed address; `None` while the relay socket is being opened.
    pub(super) relayed: Option<SocketAddr>,
    pub(super) expires: Instant,
    pub(super) perms: Vec<(IpAddr, Instant)>,
    pub(super) channels: Vec<Channel>,
    /// Transaction id of the Allocate that made it, and the answer (re-sent on retransmission).
    pub(super) alloc_txid: [u8; 12],
    pub(super) alloc_response: Vec<u8>,
    pub(super) alloc_fingerprint: bool,
    pub(super) lifetime: Duration,
    pub(super) reserve_next: bool,
}

/// A port held for a RESERVATION-TOKEN.
pub(super) struct Reservation {
    pub(super) port: u16,
    pub(super) family: Family,
    pub(super) expires: Instant,
}

/// How long a reserved port waits for its Allocate (RFC 8656 §7.2 suggests 30 s).
pub(super) const RESERVATION_LIFETIME: Duration = Duration::from_secs(30);

impl TurnCore {
    pub(super) fn lifetime(&self, requested: Option<u32>) -> Duration {
        match requested {
            None => self.cfg.default_lifetime,
            Some(s) => Duration::from_secs(s as u64).min(self.cfg.max_lifetime).max(self.cfg.default_lifetime),
        }
    }

    pub(super) fn allocate(
        &mut self,
        now: Instant,
        tuple: FiveTuple,
        msg: &Msg<'_>,
        auth: &Authed,
        fp: bool,
    ) -> Result<Option<Builder>, Fail> {
        if self.by_tuple.contains_key(&tuple) {
            return Err((437, "Allocation Mismatch"));
        }
        match msg.get(stun::REQUESTED_TRANSPORT) {
            None => return Err((400, "Bad Request: REQUESTED-TRANSPORT missing")),
            Some(v) if v.len() != 4 => return Err((400, "Bad Request: REQUESTED-TRANSPORT malformed")),
            Some(v) if v[0] != 17 => return Err((442, "Unsupported Transport Protocol")),
            Some(_) => {}
        }
        let token = msg.get(stun::RESERVATION_TOKEN);
        if token.is_some() && (msg.get(stun::EVEN_PORT).is_some() || msg.get(stun::REQUESTED_ADDRESS_FAMILY).is_some())
        {
            return Err((400, "Bad Request: RESERVATION-TOKEN with EVEN-PORT or REQUESTED-ADDRESS-FAMILY"));
        }
        let family = match msg.get(stun::REQUESTED_ADDRESS_FAMILY) {
            None => Family::V4,
            Some([1, ..]) => Family::V4,
            Some([2, ..]) => Family::V6,
            Some(_) => return Err((440, "Address Family not Supported")),
        };
        if (family == Family::V4 && !self.cfg.relay_v4) || (family == Family::V6 && !self.cfg.relay_v6) {
            return Err((440, "Address Family not Supported"));
        }
        let ip = tuple.client.ip().to_canonical();
        self.check_quota(&auth.user, ip)?;
        let (port, family) = match (token, msg.get(stun::EVEN_PORT)) {
            (Some(t), _) => {
                let r = <[u8; 8]>::try_from(t)
                    .ok()
                    .and_then(|t| self.reservations.remove(&t))
                    .filter(|r| r.expires > now)
                    .ok_or((508, "Insufficient Capacity: unknown or expired RESERVATION-TOKEN"))?;
                (RelayPort::Reserved(r.port), r.family)
            }
            (None, Some(v)) => (RelayPort::Even { reserve_next: v.first().is_some_and(|b| b & 0x80 != 0) }, family),
            (None, None) => (RelayPort::Any, family),
        };
        let reserve_next = port == RelayPort::Even { reserve_next: true };
        let dont_fragment = msg.get(stun::DONT_FRAGMENT).is_some();
        let lifetime = self.lifetime(msg.get(stun::LIFETIME).and_then(be_u32));
        let id = AllocId(self.next_id);
        self.next_id += 1;
        let expires = now + lifetime;
        self.allocs.insert(
            id,
            Allocation {
                tuple,
                username: auth.username.clone(),
                user: auth.user.clone(),
                key: auth.key,
                family,
                relayed: None,
                expires,
                perms: Vec::new(),
                channels: Vec::new(),
                alloc_txid: *msg.txid(),
                alloc_response: Vec::new(),
                alloc_fingerprint: fp,
                lifetime,
                reserve_next,
            },
        );
        self.by_tuple.insert(tuple, id);
        self.expiries.insert((expires, id));
        self.per_user.add(auth.user.clone());
        self.per_ip.add(ip);
        self.out.push_back(Output::OpenRelay { alloc: id, family, port, dont_fragment });
        Ok(None)
    }

    /// The allocation on `tuple`, checked against the request's credentials.
    pub(super) fn own_alloc(&self, tuple: FiveTuple, auth: &Authed) -> Result<AllocId, Fail> {
        let id = *self.by_tuple.get(&tuple).ok_or((437, "Allocation Mismatch: no allocation"))?;
        let a = &self.allocs[&id];
        if a.username != auth.username {
            return Err((441, "Wrong Credentials"));
        }
        if a.relayed.is_none() {
            return Err((437, "Allocation Mismatch: allocation not ready"));
        }
        Ok(id)
    }

    pub(super) fn refresh(
        &mut self,
        now: Instant,
        tuple: FiveTuple,
        msg: &Msg<'_>,
        auth: &Authed,
    ) -> Result<Option<Builder>, Fail> {
        let id = self.own_alloc(tuple, auth)?;
        let requested = msg.get(stun::LIFETIME).and_then(be_u32);
        let mut b = Builder::new(stun::msg_type(stun::REFRESH, stun::SUCCESS), msg.txid());
        if requested == Some(0) {
            self.remove(id);
            b.u32(stun::LIFETIME, 0);
            return Ok(Some(b));
        }
        let lifetime = self.lifetime(requested);
        let a = self.allocs.get_mut(&id).expect("checked");
        self.expiries.remove(&(a.expires, id));
        a.expires = now + lifetime;
        self.expiries.insert((a.expires, id));
        b.u32(stun::LIFETIME, lifetime.as_secs() as u32);
        Ok(Some(b))
    }
}
