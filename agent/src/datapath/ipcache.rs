//! The ipcache as the planner keeps it and the datapath writes it: a
//! persistent map (a plan's copy costs nothing, a change costs its path)
//! with a version and a log of the blocks each version changed. A
//! datapath that wrote version v writes the blocks changed since v — a pod
//! event is a few map writes, not a comparison of every entry — and
//! compares the whole table only when the log does not reach back to what
//! it wrote (the first apply, after adoption, after a long failure).
use std::{collections::VecDeque, sync::Arc};

use ipnet::IpNet;
use palisade_common::IpcacheValue;

/// Changes remembered; a datapath further behind compares everything.
const LOG: usize = 4096;

/// Which table and which version of it: equal stamps, equal tables.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stamp {
    lineage: u64,
    version: u64,
}

#[derive(Clone, Debug, Default)]
pub struct IpCache {
    map: imbl::OrdMap<IpNet, IpcacheValue>,
    /// Blocks written with host bits set (`127.0.0.1/8`): the kernel's
    /// trie ignores them, a lookup by the truncated block would miss them.
    untruncated: imbl::OrdSet<IpNet>,
    stamp: Stamp,
    /// (version, block) of the last changes, oldest first; `first` is the
    /// oldest version whose changes are all in it.
    log: Arc<VecDeque<(u64, IpNet)>>,
    first: u64,
}

/// Equal when the stamps are (the same table, unchanged since), else by
/// content.
impl PartialEq for IpCache {
    fn eq(&self, other: &IpCache) -> bool {
        (self.stamp.lineage != 0 && self.stamp == other.stamp && self.map.len() == other.map.len())
            || self.map == other.map
    }
}

impl IpCache {
    /// An empty table of a lineage of its own (one per planner).
    pub fn new() -> IpCache {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        let process = u64::from(std::process::id()) << 32;
        IpCache {
            stamp: Stamp {
                lineage: process | NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
                version: 0,
            },
            ..IpCache::default()
        }
    }

    pub fn stamp(&self) -> Stamp {
        self.stamp
    }

    pub fn get(&self, net: &IpNet) -> Option<IpcacheValue> {
        self.map.get(net).copied()
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = (&IpNet, &IpcacheValue)> {
        self.map.iter()
    }

    /// The entry of the longest block holding `ip`, as the kernel's
    /// LPM trie finds it: one lookup per prefix length.
    pub fn longest_match(&self, ip: std::net::IpAddr) -> Option<IpcacheValue> {
        let max = if ip.is_ipv4() { 32 } else { 128 };
        let odd = self
            .untruncated
            .iter()
            .filter(|n| n.contains(&ip))
            .max_by_key(|n| n.prefix_len());
        for len in (0..=max).rev() {
            if let Some(n) = odd.filter(|n| n.prefix_len() == len) {
                return self.get(n);
            }
            let Ok(net) = IpNet::new(ip, len) else {
                continue;
            };
            if let Some(id) = self.get(&net.trunc()) {
                return Some(id);
            }
        }
        None
    }

    /// Sets (`Some`) or removes (`None`) `net`'s entry.
    pub fn set(&mut self, net: IpNet, id: Option<IpcacheValue>) {
        let old = match id {
            Some(id) => self.map.insert(net, id),
            None => self.map.remove(&net),
        };
        if old == id {
            return;
        }
        if net != net.trunc() {
            match id {
                Some(_) => self.untruncated.insert(net),
                None => self.untruncated.remove(&net),
            };
        }
        self.stamp.version += 1;
        let log = Arc::make_mut(&mut self.log);
        log.push_back((self.stamp.version, net));
        // Version v's changes are no longer all here once one falls out.
        if log.len() > LOG
            && let Some((v, _)) = log.pop_front()
        {
            self.first = self.first.max(v + 1);
        }
    }

    /// Replaces everything: a datapath compares the whole table next.
    pub fn replace(&mut self, entries: impl IntoIterator<Item = (IpNet, IpcacheValue)>) {
        self.map = entries.into_iter().collect();
        self.untruncated = self
            .map
            .keys()
            .filter(|n| **n != n.trunc())
            .copied()
            .collect();
        self.stamp.version += 1;
        self.log = Arc::default();
        self.first = self.stamp.version + 1;
    }

    /// The blocks changed since the table was at `since` (each once; their
    /// value now is [`IpCache::get`]), or `None` when that is not known:
    /// another table, or further back than the log reaches.
    pub fn changes_since(&self, since: Stamp) -> Option<Vec<IpNet>> {
        if since.lineage == 0 || since.lineage != self.stamp.lineage {
            return None;
        }
        if since.version == self.stamp.version {
            return Some(Vec::new());
        }
        if since.version > self.stamp.version || since.version + 1 < self.first {
            return None;
        }
        let mut nets: Vec<IpNet> = self
            .log
            .iter()
            .filter(|(v, _)| *v > since.version)
            .map(|(_, n)| *n)
            .collect();
        nets.sort();
        nets.dedup();
        Some(nets)
    }
}

impl FromIterator<(IpNet, u32)> for IpCache {
    /// A table of no lineage (tests, fixed tables) of identities inside no
    /// block: always compared whole.
    fn from_iter<I: IntoIterator<Item = (IpNet, u32)>>(iter: I) -> IpCache {
        let mut out = IpCache::default();
        out.replace(iter.into_iter().map(|(n, id)| (n, IpcacheValue::of(id))));
        out.stamp = Stamp::default();
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    fn id(n: u32) -> Option<IpcacheValue> {
        Some(IpcacheValue::of(n))
    }

    #[test]
    fn changes_since_a_version_are_the_blocks_set_or_removed_after_it() {
        let mut t = IpCache::new();
        t.set(net("10.0.0.1/32"), id(300));
        t.set(net("10.0.0.2/32"), id(301));
        let seen = t.stamp();
        let copy = t.clone();
        t.set(net("10.0.0.1/32"), id(302));
        t.set(net("10.0.0.2/32"), None);
        t.set(net("10.0.0.3/32"), id(300));
        t.set(net("10.0.0.3/32"), id(300)); // no change, no version
        assert_eq!(
            t.changes_since(seen),
            Some(vec![
                net("10.0.0.1/32"),
                net("10.0.0.2/32"),
                net("10.0.0.3/32")
            ])
        );
        assert_eq!(t.changes_since(t.stamp()), Some(vec![]));
        // The copy taken before is untouched, and unequal.
        assert_eq!(copy.get(&net("10.0.0.1/32")), id(300));
        assert_ne!(copy, t);
        // Another table, or a table replaced whole: not known.
        assert_eq!(IpCache::new().changes_since(seen), None);
        t.replace([(net("10.0.0.9/32"), IpcacheValue::of(1))]);
        assert_eq!(t.changes_since(seen), None);
        let after = t.stamp();
        t.set(net("10.0.0.8/32"), id(2));
        assert_eq!(t.changes_since(after), Some(vec![net("10.0.0.8/32")]));
    }

    /// A copy kept up to date from the log equals one compared whole,
    /// through seeded churn, a replaced table and a copy left behind.
    #[test]
    fn writes_from_the_log_bring_a_copy_to_the_table() {
        use std::collections::BTreeMap;
        let mut rng = crate::testing::Seeded::new(7);
        let mut next = |n: u32| rng.below(n as usize) as u32;
        let mut t = IpCache::new();
        let mut copy: BTreeMap<IpNet, IpcacheValue> = BTreeMap::new();
        let mut written = Stamp::default();
        for step in 0..2000 {
            for _ in 0..next(4) {
                let n = IpNet::from(std::net::IpAddr::from([10, 0, 0, next(50) as u8]));
                t.set(n, (next(3) > 0).then(|| IpcacheValue::of(next(5))));
            }
            if step % 500 == 250 {
                t.replace([(net("10.9.9.9/32"), IpcacheValue::of(9))]);
            }
            // Sometimes the datapath does not write (a failed apply).
            if next(5) == 0 {
                continue;
            }
            let (up, del) = super::super::ipcache_diff(&copy, written, &t);
            copy.extend(up);
            for n in del {
                copy.remove(&n);
            }
            written = t.stamp();
            let whole: BTreeMap<IpNet, IpcacheValue> = t.iter().map(|(n, v)| (*n, *v)).collect();
            assert_eq!(copy, whole, "step {step}");
        }
    }

    #[test]
    fn the_longest_match_finds_blocks_written_with_host_bits() {
        let mut t = IpCache::new();
        t.set(net("127.0.0.1/8"), id(1));
        t.set(net("10.0.0.0/8"), id(7));
        t.set(net("10.1.0.0/16"), id(8));
        t.set(net("10.1.2.3/32"), id(9));
        let at = |t: &IpCache, ip: &str| t.longest_match(ip.parse().unwrap());
        assert_eq!(at(&t, "127.0.0.53"), id(1));
        assert_eq!(at(&t, "10.1.2.3"), id(9));
        assert_eq!(at(&t, "10.1.9.9"), id(8));
        assert_eq!(at(&t, "10.9.9.9"), id(7));
        assert_eq!(at(&t, "192.0.2.1"), None);
        t.set(net("127.0.0.1/8"), None);
        assert_eq!(at(&t, "127.0.0.53"), None);
    }

    #[test]
    fn a_datapath_further_behind_than_the_log_compares_everything() {
        let mut t = IpCache::new();
        let start = t.stamp();
        for i in 0..LOG as u32 {
            t.set(
                IpNet::from(std::net::IpAddr::from([10, 1, (i >> 8) as u8, i as u8])),
                id(i),
            );
        }
        assert_eq!(t.changes_since(start).map(|c| c.len()), Some(LOG));
        t.set(net("10.2.0.1/32"), id(1));
        assert_eq!(t.changes_since(start), None, "the first change fell out");
    }
}
