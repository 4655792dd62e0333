//! Quotas: allocations per user, per client address and on the whole server, counted as allocations come and
//! go (the relay ports of live allocations are counted the same way).

use rustc_hash::FxHashMap;
use std::borrow::Borrow;
use std::hash::Hash;

use super::*;

/// How many live things each key holds; a key at zero is dropped, so the map is only as large as what is live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Tally<K: Hash + Eq>(FxHashMap<K, usize>);

impl<K: Hash + Eq> Tally<K> {
    pub(super) fn new() -> Self {
        Tally(FxHashMap::default())
    }
    pub(super) fn count<Q: Hash + Eq + ?Sized>(&self, k: &Q) -> usize
    where
        K: Borrow<Q>,
    {
        self.0.get(k).copied().unwrap_or(0)
    }
    /// The stored key equal to `k` (to share one `Arc<str>` per user).
    pub(super) fn key<Q: Hash + Eq + ?Sized>(&self, k: &Q) -> Option<&K>
    where
        K: Borrow<Q>,
    {
        self.0.get_key_value(k).map(|(k, _)| k)
    }
    pub(super) fn add(&mut self, k: K) {
        *self.0.entry(k).or_insert(0) += 1;
    }
    pub(super) fn remove<Q: Hash + Eq + ?Sized>(&mut self, k: &Q)
    where
        K: Borrow<Q>,
    {
        if let Some(n) = self.0.get_mut(k) {
            *n -= 1;
            if *n == 0 {
                self.0.remove(k);
            }
        }
    }
    pub(super) fn as_map(&self) -> &FxHashMap<K, usize> {
        &self.0
    }
}

impl TurnCore {
    /// Allocate's quotas (RFC 8656 §7.2: 486 Allocation Quota Reached): per user, per client address
    /// (IPv4-mapped IPv6 counts as IPv4), on the whole server.
    pub(super) fn check_quota(&self, user: &str, ip: IpAddr) -> Result<(), Fail> {
        if self.per_user.count(user) >= self.cfg.user_quota {
            return Err((486, "Allocation Quota Reached: too many allocations for this user"));
        }
        if self.per_ip.count(&ip) >= self.cfg.ip_quota {
            return Err((486, "Allocation Quota Reached: too many allocations from this address"));
        }
        if self.allocs.len() >= self.cfg.total_quota {
            return Err((486, "Allocation Quota Reached: server full"));
        }
        Ok(())
    }
}
