//! Permissions and channels (RFC 8656 §9, §12), and which peers a relay may reach at all (special-purpose
//! ranges, the server's own addresses).

use super::*;

/// After a channel binding expires, neither its number nor its peer may be rebound differently for this
/// long (RFC 8656 §12).
pub(super) const CHANNEL_COOLDOWN: Duration = Duration::from_secs(300);

/// Channel numbers as RFC 5766 allowed them and deployed clients (coturn's among them) pick them; RFC 8656
/// narrowed new bindings to 0x4000-0x4FFF, which a server gains nothing by enforcing.
pub(super) const CHANNEL_NUMBERS: std::ops::RangeInclusive<u16> = 0x4000..=0x7FFF;

pub(super) struct Channel {
    pub(super) number: u16,
    pub(super) peer: SocketAddr,
    pub(super) expires: Instant,
}

impl Allocation {
    pub(super) fn permitted(&self, ip: IpAddr, now: Instant) -> bool {
        self.perms.iter().any(|(p, exp)| *p == ip && *exp > now)
    }
}

pub(super) fn install_perm(a: &mut Allocation, ip: IpAddr, exp: Instant) {
    match a.perms.iter_mut().find(|(p, _)| *p == ip) {
        Some(p) => p.1 = exp,
        None => a.perms.push((ip, exp)),
    }
}

/// IPv4-mapped IPv6 addresses count as the IPv4 address they carry.
pub fn canonical(a: SocketAddr) -> SocketAddr {
    SocketAddr::new(a.ip().to_canonical(), a.port())
}

/// Relaying to loopback, private, link-local, multicast, unspecified and other special-purpose addresses
/// is refused unless a range in `allow` covers the peer.
pub fn peer_allowed(ip: IpAddr, allow: &[IpNet]) -> bool {
    let ip = ip.to_canonical();
    if allow.iter().any(|n| n.contains(&ip)) {
        return true;
    }
    match ip {
        IpAddr::V4(v) => {
            let o = v.octets();
            !(v.is_loopback()
                || v.is_private()
                || v.is_link_local()
                || v.is_multicast()
                || v.is_broadcast()
                || v.is_unspecified()
                || o[0] == 0
                || (o[0] == 100 && (o[1] & 0xC0) == 64) // 100.64/10 shared address space
                || o[0] >= 240
                || o == [168, 63, 129, 16]) // Azure's platform address (DNS, metadata, health)
        }
        IpAddr::V6(v) => {
            let s = v.segments();
            !(v.is_loopback()
                || v.is_unspecified()
                || v.is_multicast()
                || (s[0] & 0xFE00) == 0xFC00 // unique local fc00::/7
                || (s[0] & 0xFFC0) == 0xFE80 // link-local fe80::/10
                || s[0] == 0x2002 // 6to4 can tunnel to any IPv4 address
                || (s[0] == 0x64 && s[1] == 0xFF9B)) // NAT64 likewise
        }
    }
}

impl TurnCore {
    /// The IP check of a permission (ports do not matter to permissions, RFC 8656 §9).
    pub(super) fn check_peer(&self, a: &Allocation, peer: SocketAddr) -> Result<(), Fail> {
        if peer.is_ipv4() != (a.family == Family::V4) {
            return Err((443, "Peer Address Family Mismatch"));
        }
        // The server's own IPs pass here for relay to relay; `port_allowed` narrows them to the relay ports.
        if !peer_allowed(peer.ip(), &self.cfg.allow_peers) && !self.is_own(peer.ip()) {
            return Err((403, "Forbidden: peer address not allowed"));
        }
        Ok(())
    }

    pub(super) fn is_own(&self, ip: IpAddr) -> bool {
        self.cfg.external_ip.is_some_and(|e| e.to_canonical() == ip) || self.cfg.own_ips.contains(&ip)
    }

    /// Relaying to (or from) the server itself: on its own IPs only the relay sockets of live allocations
    /// (two clients of this server relaying to each other; other sockets of the host may use ports of the
    /// relay range too), unless `allow_peers` names a listen IP; the STUN/TURN ports never, on loopback
    /// either. `peer` is canonical.
    pub(super) fn port_allowed(&self, peer: SocketAddr) -> bool {
        let ip = peer.ip();
        let own = self.is_own(ip);
        if !own && !ip.is_loopback() {
            return true;
        }
        let port = peer.port();
        if self.live_relay_ports.count(&port) > 0 {
            return true;
        }
        if self.cfg.turn_ports.contains(&port) {
            return false;
        }
        if !own {
            return true;
        }
        self.cfg.external_ip.is_none_or(|e| e.to_canonical() != ip)
            && self.cfg.allow_peers.iter().any(|n| n.contains(&ip))
    }

    pub(super) fn create_permission(
        &mut self,
        now: Instant,
        tuple: FiveTuple,
        msg: &Msg<'_>,
        auth: &Authed,
    ) -> Result<Option<Builder>, Fail> {
        let id = self.own_alloc(tuple, auth)?;
        let mut peers = Vec::new();
        for (t, v, _) in msg.attrs() {
            if t == stun::MESSAGE_INTEGRITY || t == stun::MESSAGE_INTEGRITY_SHA256 {
                break;
            }
            if t == stun::XOR_PEER_ADDRESS {
                let p = stun::decode_xor_addr(v, msg.txid()).ok_or((400, "Bad Request: bad XOR-PEER-ADDRESS"))?;
                peers.push(canonical(p));
            }
        }
        if peers.is_empty() {
            return Err((400, "Bad Request: XOR-PEER-ADDRESS missing"));
        }
        let a = &self.allocs[&id];
        for p in &peers {
            self.check_peer(a, *p)?;
        }
        let exp = now + self.cfg.permission_lifetime;
        let max = self.cfg.max_permissions;
        let a = self.allocs.get_mut(&id).expect("checked");
        let new = peers.iter().filter(|p| !a.perms.iter().any(|(ip, _)| *ip == p.ip())).count();
        a.perms.retain(|(_, e)| *e > now);
        if a.perms.len() + new > max {
            return Err((508, "Insufficient Capacity: too many permissions"));
        }
        for p in peers {
            install_perm(a, p.ip(), exp);
        }
        Ok(Some(Builder::new(stun::msg_type(stun::CREATE_PERMISSION, stun::SUCCESS), msg.txid())))
    }

    pub(super) fn channel_bind(
        &mut self,
        now: Instant,
        tuple: FiveTuple,
        msg: &Msg<'_>,
        auth: &Authed,
    ) -> Result<Option<Builder>, Fail> {
        let id = self.own_alloc(tuple, auth)?;
        let number = match msg.get(stun::CHANNEL_NUMBER) {
            Some(v) if v.len() == 4 => u16::from_be_bytes([v[0], v[1]]),
            _ => return Err((400, "Bad Request: CHANNEL-NUMBER missing")),
        };
        if !CHANNEL_NUMBERS.contains(&number) {
            return Err((400, "Bad Request: channel number outside 0x4000-0x7FFF"));
        }
        let peer = msg
            .get_xor_addr(stun::XOR_PEER_ADDRESS)
            .map(canonical)
            .ok_or((400, "Bad Request: XOR-PEER-ADDRESS missing"))?;
        let a = &self.allocs[&id];
        self.check_peer(a, peer)?;
        if !self.port_allowed(peer) {
            return Err((403, "Forbidden: peer is this server (only its relay ports are)"));
        }
        let live = |c: &Channel| c.expires + CHANNEL_COOLDOWN > now;
        if a.channels.iter().any(|c| live(c) && c.number == number && c.peer != peer) {
            return Err((400, "Bad Request: channel bound to another peer"));
        }
        if a.channels.iter().any(|c| live(c) && c.peer == peer && c.number != number) {
            return Err((400, "Bad Request: peer bound to another channel"));
        }
        let max = self.cfg.max_permissions;
        let ch_exp = now + self.cfg.channel_lifetime;
        let perm_exp = now + self.cfg.permission_lifetime;
        let a = self.allocs.get_mut(&id).expect("checked");
        a.channels.retain(live);
        match a.channels.iter_mut().find(|c| c.number == number) {
            Some(c) => c.expires = ch_exp,
            None => {
                if a.channels.len() >= max {
                    return Err((508, "Insufficient Capacity: too many channels"));
                }
                a.channels.push(Channel { number, peer, expires: ch_exp });
            }
        }
        install_perm(a, peer.ip(), perm_exp);
        Ok(Some(Builder::new(stun::msg_type(stun::CHANNEL_BIND, stun::SUCCESS), msg.txid())))
    }
}
