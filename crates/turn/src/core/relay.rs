//! The data plane: ChannelData and Send indications from clients to peers, and peer datagrams framed in place
//! for clients. The hot path: no allocation, a few hash lookups.

use super::*;

impl TurnCore {
    pub(super) fn channel_data<'a>(&mut self, now: Instant, tuple: FiveTuple, data: &'a [u8]) -> Option<PeerSend<'a>> {
        if data.len() < 4 {
            return None;
        }
        let number = u16::from_be_bytes([data[0], data[1]]);
        let len = u16::from_be_bytes([data[2], data[3]]) as usize;
        let payload = data.get(4..4 + len)?;
        let id = *self.by_tuple.get(&tuple)?;
        let a = self.allocs.get(&id)?;
        let ch = a.channels.iter().find(|c| c.number == number && c.expires > now)?;
        if !a.permitted(ch.peer.ip(), now) {
            return None;
        }
        let peer = ch.peer;
        self.stats.to_peer_packets += 1;
        self.stats.to_peer_bytes += len as u64;
        Some(PeerSend { alloc: id, peer, data: payload })
    }

    pub(super) fn send_indication<'a>(&mut self, now: Instant, tuple: FiveTuple, msg: Msg<'a>) -> Option<PeerSend<'a>> {
        let id = *self.by_tuple.get(&tuple)?;
        let a = self.allocs.get(&id)?;
        let (mut peer, mut data) = (None, None);
        for (t, v, _) in msg.attrs() {
            match t {
                stun::XOR_PEER_ADDRESS if peer.is_none() => peer = stun::decode_xor_addr(v, msg.txid()),
                stun::DATA_ATTR if data.is_none() => data = Some(v),
                // Unknown comprehension-required attributes: discard the indication (RFC 8489 §6.3.2).
                t if t < 0x8000 && !is_known(t) => return None,
                _ => {}
            }
        }
        let peer = canonical(peer?);
        let data = data?;
        if a.relayed.is_none() || !a.permitted(peer.ip(), now) || !self.port_allowed(peer) {
            return None;
        }
        self.stats.to_peer_packets += 1;
        self.stats.to_peer_bytes += data.len() as u64;
        Some(PeerSend { alloc: id, peer, data })
    }

    /// A datagram that arrived on the relay socket of `alloc` from `from`. The payload is
    /// `buf[start..start + len]`; `start >= PEER_HEADROOM` and `buf.len() >= start + len + PEER_TAILROOM`
    /// are required. Frames it in place (ChannelData or Data indication) and returns where to send it and
    /// which bytes of `buf`; `None` drops it (no permission, unknown allocation).
    pub fn handle_peer(
        &mut self,
        now: Instant,
        alloc: AllocId,
        from: SocketAddr,
        buf: &mut [u8],
        start: usize,
        len: usize,
    ) -> Option<(FiveTuple, Range<usize>)> {
        debug_assert!(start >= PEER_HEADROOM && buf.len() >= start + len + PEER_TAILROOM);
        if len > u16::MAX as usize - 64 {
            return None;
        }
        let from = canonical(from);
        let a = self.allocs.get(&alloc)?;
        if a.relayed.is_none() || !a.permitted(from.ip(), now) || !self.port_allowed(from) {
            return None;
        }
        let tuple = a.tuple;
        let range = if let Some(ch) = a.channels.iter().find(|c| c.peer == from && c.expires > now) {
            let s = start - 4;
            buf[s..s + 2].copy_from_slice(&ch.number.to_be_bytes());
            buf[s + 2..s + 4].copy_from_slice(&(len as u16).to_be_bytes());
            // Over streams ChannelData is padded to 4 bytes (RFC 8656 §12.5); over UDP it need not be.
            let end = if tuple.transport == Transport::Udp {
                start + len
            } else {
                let e = start + stun::pad4(len);
                buf[start + len..e].fill(0);
                e
            };
            s..end
        } else {
            let alen = if from.is_ipv4() { 8 } else { 20 };
            let s = start - (stun::HEADER_LEN + 4 + alen + 4);
            let padded = stun::pad4(len);
            let body = 4 + alen + 4 + padded;
            let txid = self.next_txid();
            let h = &mut buf[s..start];
            h[0..2].copy_from_slice(&stun::msg_type(stun::DATA, stun::INDICATION).to_be_bytes());
            h[2..4].copy_from_slice(&(body as u16).to_be_bytes());
            h[4..8].copy_from_slice(&stun::MAGIC.to_be_bytes());
            h[8..20].copy_from_slice(&txid);
            h[20..22].copy_from_slice(&stun::XOR_PEER_ADDRESS.to_be_bytes());
            h[22..24].copy_from_slice(&(alen as u16).to_be_bytes());
            stun::encode_xor_addr(&mut h[24..24 + alen], from, &txid);
            let d = 24 + alen;
            h[d..d + 2].copy_from_slice(&stun::DATA_ATTR.to_be_bytes());
            h[d + 2..d + 4].copy_from_slice(&(len as u16).to_be_bytes());
            buf[start + len..start + padded].fill(0);
            s..start + padded
        };
        self.stats.to_client_packets += 1;
        self.stats.to_client_bytes += len as u64;
        Some((tuple, range))
    }

    pub(super) fn next_txid(&mut self) -> [u8; 12] {
        // xorshift64*: indications need unpredictable-enough, not secret, ids; no syscall per packet.
        let mut x = self.txid_state;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.txid_state = x;
        let a = x.wrapping_mul(0x2545_F491_4F6C_DD1D);
        let mut t = [0u8; 12];
        t[..8].copy_from_slice(&a.to_le_bytes());
        t[8..].copy_from_slice(&((a >> 17) as u32).to_le_bytes());
        t
    }
}
