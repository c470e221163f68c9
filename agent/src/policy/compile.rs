//! The compiler: policies + the world (identities, namespaces, addresses) →
//! the desired contents of the kernel's policy, enforcement and (CIDR part of
//! the) ipcache maps. Pure and deterministic: the same inputs give the same
//! tables, so "did anything change?" is an equality test.
//!
//! Sizes: a rule costs (peer identities) × (port prefixes) entries. "Any peer"
//! is one wildcard entry, never one per identity; a port range is at most 30
//! prefixes (1–65535 is 16), never one entry per port.
use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
};

use ipnet::IpNet;

use palisade_common::{EnforcedValue, PolicyValue, flags, identity};

use super::{
    labels::{LabelSelector, Labels},
    model::{Action, Direction, Mode, NamespaceScope, Peer, Policy, PortRange, Protocol, Rule},
};

/// Identities for CIDR blocks named in policies are numbered from here.
pub const FIRST_CIDR_IDENTITY: u32 = 1 << 24;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum IdentityKind {
    /// Local or remote workloads: the only kind a policy can select.
    Workload,
    /// Addresses from the config's `peers`: can be a peer, never selected.
    Peer,
    /// Reserved identities (host, world, …).
    Reserved,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct IdentityInfo {
    pub id: u32,
    pub name: String,
    pub namespace: Option<String>,
    pub labels: Labels,
    pub kind: IdentityKind,
    /// Declared ports by (protocol, name), for named ports in rules.
    pub named_ports: BTreeMap<(Protocol, String), u16>,
}

/// Address blocks → identity, with a print kept up to date entry by entry
/// (the XOR of every entry's hash): "did any address move since the last
/// compile?" costs nothing, however many addresses there are. The map is
/// shared: a planner that keeps its `Addresses` between compiles changes it
/// in place once the compile's copy is gone.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Addresses {
    map: Arc<BTreeMap<IpNet, u32>>,
    print: u128,
}

fn entry_print(net: &IpNet, id: u32) -> u128 {
    let mut bytes = [0u8; 22];
    match net {
        IpNet::V4(n) => bytes[..4].copy_from_slice(&n.addr().octets()),
        IpNet::V6(n) => bytes[..16].copy_from_slice(&n.addr().octets()),
    }
    bytes[16] = u8::from(matches!(net, IpNet::V6(_)));
    bytes[17] = net.prefix_len();
    bytes[18..].copy_from_slice(&id.to_le_bytes());
    xxhash_rust::xxh3::xxh3_128(&bytes)
}

impl Addresses {
    /// Sets (`Some`) or removes (`None`) `net`'s identity; returns the old one.
    pub fn set(&mut self, net: IpNet, id: Option<u32>) -> Option<u32> {
        let map = Arc::make_mut(&mut self.map);
        let old = match id {
            Some(id) => map.insert(net, id),
            None => map.remove(&net),
        };
        if old == id {
            return old;
        }
        if let Some(old) = old {
            self.print ^= entry_print(&net, old);
        }
        if let Some(id) = id {
            self.print ^= entry_print(&net, id);
        }
        old
    }

    /// Adds an entry (a later one for the same block replaces it).
    pub fn push(&mut self, entry: (IpNet, u32)) {
        self.set(entry.0, Some(entry.1));
    }

    pub fn get(&self, net: &IpNet) -> Option<u32> {
        self.map.get(net).copied()
    }

    pub fn iter(&self) -> impl Iterator<Item = (&IpNet, &u32)> {
        self.map.iter()
    }

    /// The blocks inside `cidr` (found by range, not by walking every block).
    pub fn inside(&self, cidr: &IpNet) -> impl Iterator<Item = (&IpNet, &u32)> {
        let (low, high) = match cidr {
            IpNet::V4(n) => (
                IpNet::V4(ipnet::Ipv4Net::new(n.network(), 0).unwrap_or_default()),
                IpNet::V4(ipnet::Ipv4Net::new(n.broadcast(), 32).unwrap_or_default()),
            ),
            IpNet::V6(n) => (
                IpNet::V6(ipnet::Ipv6Net::new(n.network(), 0).unwrap_or_default()),
                IpNet::V6(ipnet::Ipv6Net::new(n.broadcast(), 128).unwrap_or_default()),
            ),
        };
        let cidr = *cidr;
        self.map
            .range(low..=high)
            .filter(move |(net, _)| cidr.contains(*net))
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Changes with every entry set or removed; equal tables print alike.
    pub fn print(&self) -> u128 {
        self.print
    }
}

impl FromIterator<(IpNet, u32)> for Addresses {
    fn from_iter<I: IntoIterator<Item = (IpNet, u32)>>(iter: I) -> Addresses {
        let mut out = Addresses::default();
        for entry in iter {
            out.push(entry);
        }
        out
    }
}

/// Identities by number, each shared: a plan, the compiler's memory and
/// the published snapshot hold the same `IdentityInfo`s.
pub type Identities = BTreeMap<u32, Arc<IdentityInfo>>;

/// What the compiler needs to know about the world.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct World {
    pub identities: Vec<Arc<IdentityInfo>>,
    /// Namespace name → labels (with `kubernetes.io/metadata.name` set).
    pub namespaces: BTreeMap<String, Labels>,
    /// Known address blocks (workload IPs, configured peers, the nodes) →
    /// identity.
    pub addresses: Addresses,
    /// Directions (`DIR_*`) in which a cgroup not classified yet
    /// (`reserved:pending`) is default-deny, and the config field that says
    /// so (named by audit events).
    pub pending_held: Vec<u8>,
    pub pending_rule: &'static str,
}

/// What decided: one entry of the rule table carried by map values and events.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuleRef {
    pub policy: String,
    pub kind: &'static str,
    /// The rule's name, or `default-deny` for the policy's implicit deny.
    pub rule: String,
}

/// A policy map entry before the slot is chosen (the datapath encodes it as
/// the map's longest-prefix key: `datapath::kernel::encode_policy_key`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct EntryKey {
    pub direction: u8,
    pub protocol: u8,
    pub local: u32,
    pub peer: u32,
    pub port: u16,
    /// Bits of the port that must match (0 = any port, 16 = exactly `port`).
    pub port_bits: u8,
}

impl EntryKey {
    pub fn covers_port(&self, port: u16) -> bool {
        let mask = mask(self.port_bits);
        port & mask == self.port & mask
    }
}

fn mask(bits: u8) -> u16 {
    if bits == 0 {
        0
    } else {
        u16::MAX << (16 - u32::from(bits))
    }
}

/// The compiled form of a policy set over a world.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CompiledPolicy {
    pub entries: BTreeMap<EntryKey, PolicyValue>,
    /// (direction, identity) → enforcement.
    pub enforced: BTreeMap<(u8, u32), EnforcedValue>,
    /// Index = rule id; index 0 is "no rule", and so is an id no policy
    /// holds (an empty `kind`). Shared with the compiler's memory of each
    /// policy (a merge copies pointers, not names).
    pub rules: Vec<Arc<RuleRef>>,
    /// Extra ipcache entries for CIDR blocks named by policies.
    pub cidr_identities: Vec<(IpNet, u32)>,
}

impl CompiledPolicy {
    /// The rule `id` names; `None` for 0 ("no rule") and for ids no policy
    /// holds (freed by a replaced policy until the table is compacted).
    pub fn rule(&self, id: u32) -> Option<&RuleRef> {
        if id == 0 {
            None
        } else {
            self.rules
                .get(id as usize)
                .map(|r| &**r)
                .filter(|r| !r.kind.is_empty())
        }
    }
}

/// Per-entry accumulation: the rule that set each flag.
#[derive(Clone, Copy, Default)]
struct Acc {
    deny: u32,
    audit_deny: u32,
    allow: u32,
    audit_allow: u32,
}

impl Acc {
    fn set(&mut self, flag: u32, rule: u32) {
        let slot = match flag {
            flags::DENY => &mut self.deny,
            flags::AUDIT_DENY => &mut self.audit_deny,
            flags::ALLOW => &mut self.allow,
            _ => &mut self.audit_allow,
        };
        if *slot == 0 {
            *slot = rule;
        }
    }
    fn merge(&mut self, other: &Acc) {
        for (flag, rule) in [
            (flags::DENY, other.deny),
            (flags::AUDIT_DENY, other.audit_deny),
            (flags::ALLOW, other.allow),
            (flags::AUDIT_ALLOW, other.audit_allow),
        ] {
            if rule != 0 {
                self.set(flag, rule);
            }
        }
    }
    fn value(&self) -> PolicyValue {
        let mut f = 0;
        for (flag, rule) in [
            (flags::DENY, self.deny),
            (flags::AUDIT_DENY, self.audit_deny),
            (flags::ALLOW, self.allow),
            (flags::AUDIT_ALLOW, self.audit_allow),
        ] {
            if rule != 0 {
                f |= flag;
            }
        }
        let rule_id = [self.deny, self.audit_deny, self.allow, self.audit_allow]
            .into_iter()
            .find(|r| *r != 0)
            .unwrap_or(0);
        PolicyValue { flags: f, rule_id }
    }
}

/// Compiles `policies` over `world` (no memory of an earlier compile: what
/// a [`Compiler`] must always equal).
pub fn compile<P: std::borrow::Borrow<Policy>>(policies: &[P], world: &World) -> CompiledPolicy {
    let cidrs = cidr_identities(policies.iter().map(|p| p.borrow()));
    let index = Index::new(world);
    let mut next = 1u32;
    let parts: Vec<(u32, Arc<Contribution>)> = policies
        .iter()
        .map(|p| {
            let part = contribute(p.borrow(), world, &index, &cidrs);
            let base = next;
            next += part.rules.len() as u32;
            (base, Arc::new(part))
        })
        .collect();
    merge(&parts, next, cidrs, world)
}

/// One policy's part of the compiled tables, its rules numbered from 0:
/// merged in policy order, each part's rule ids offset by its base, the
/// parts judge exactly as compiling everything at once does.
#[derive(Debug, Default)]
struct Contribution {
    rules: Vec<Arc<RuleRef>>,
    /// (entry, flag, rule), in emission order.
    entries: Vec<(EntryKey, u32, u32)>,
    /// ((direction, identity), the policy's default-deny rule, audit mode).
    enforced: Vec<((u8, u32), u32, bool)>,
}

/// A compiler that remembers each policy's contribution: while the world
/// stays the same, a compile recomputes only the policies that changed
/// (a one-rule change costs that policy's entries and the merge, not every
/// selector and peer of every policy). A world change recomputes only what
/// it can touch: an identity added, removed or relabelled, the policies that
/// select it or name it as a peer; addresses coming and going, nothing
/// (rules naming blocks resolve to the blocks' identities; the ipcache
/// places each address in its block); a namespace's labels,
/// the set of CIDRs or more than `MAX_CHANGED_IDENTITIES` identities at
/// once, everything.
#[derive(Debug, Default)]
pub struct Compiler {
    /// The print of what the parts were computed over besides identities:
    /// the namespaces and the CIDR identities.
    world: u128,
    /// The identities the parts were computed over, by id.
    identities: Identities,
    /// The last compile's policies and their parts, in order, each with the
    /// first rule id it holds.
    cache: Vec<(Arc<Policy>, Arc<Contribution>, u32)>,
    /// The last merge: what it was made of, and its output, handed out
    /// again (the same `Arc`) while nothing it was made of changed.
    merged: Option<(Merged, Arc<CompiledPolicy>)>,
    /// The first rule id no part holds: new parts are numbered from here,
    /// so a part kept keeps its ids and its entries their values.
    next_rule: u32,
    /// Policies recomputed by the last compile (the others were reused).
    pub recomputed: usize,
}

impl Compiler {
    /// Compiles `policies` over `world`, reusing what is still valid: the
    /// same output (`Arc`) when nothing it is made of changed.
    pub fn compile(&mut self, policies: &[Arc<Policy>], world: &World) -> Arc<CompiledPolicy> {
        let cidrs = cidr_identities(policies.iter().map(|p| &**p));
        self.forget_what_changed(world, &cidrs);
        if self.cache.is_empty() {
            // Nothing kept: number densely, as a fresh compile does.
            self.next_rule = 1;
        }
        let mut index = None;
        let mut cache = Vec::with_capacity(policies.len());
        self.recomputed = 0;
        // Where a policy was last time, by name, when the order moved.
        let mut moved: Option<std::collections::HashMap<(&str, String), usize>> = None;
        let mut taken = vec![false; self.cache.len()];
        for (i, policy) in policies.iter().enumerate() {
            let mut same = |j: usize| {
                let (p, part, base) = self.cache.get(j)?;
                let fits = !taken[j] && (Arc::ptr_eq(p, policy) || **p == **policy);
                fits.then(|| {
                    taken[j] = true;
                    (part.clone(), *base)
                })
            };
            let found = same(i).or_else(|| {
                let moved = moved.get_or_insert_with(|| {
                    self.cache
                        .iter()
                        .enumerate()
                        .map(|(j, (p, _, _))| ((p.origin.kind, p.qualified_name()), j))
                        .collect()
                });
                moved
                    .get(&(policy.origin.kind, policy.qualified_name()))
                    .and_then(|j| same(*j))
            });
            let (part, base) = match found {
                Some(kept) => kept,
                None => {
                    self.recomputed += 1;
                    let index = index.get_or_insert_with(|| Index::new(world));
                    let part = contribute(policy, world, index, &cidrs);
                    let base = self.next_rule.max(1);
                    self.next_rule = base + part.rules.len() as u32;
                    (Arc::new(part), base)
                }
            };
            cache.push((policy.clone(), part, base));
        }
        self.cache = cache;
        self.compact();
        let made_of = Merged {
            parts: self
                .cache
                .iter()
                .map(|(_, part, base)| (part.clone(), *base))
                .collect(),
            len: self.next_rule.max(1),
            cidrs,
            pending: (world.pending_held.clone(), world.pending_rule),
        };
        if let Some((last, out)) = &self.merged
            && last.same(&made_of)
        {
            return out.clone();
        }
        let parts: Vec<(u32, Arc<Contribution>)> = made_of
            .parts
            .iter()
            .map(|(part, base)| (*base, part.clone()))
            .collect();
        let out = Arc::new(merge(&parts, made_of.len, made_of.cidrs.clone(), world));
        self.merged = Some((made_of, out.clone()));
        out
    }

    /// Numbers the parts densely again (in policy order) once the ids freed
    /// by replaced parts outnumber the ids in use: one rewrite of the values,
    /// then new ids again from the end.
    fn compact(&mut self) {
        let live: u32 = self
            .cache
            .iter()
            .map(|(_, p, _)| p.rules.len() as u32)
            .sum();
        if self.next_rule <= 2 * live + 1024 {
            return;
        }
        let mut next = 1;
        for (_, part, base) in &mut self.cache {
            *base = next;
            next += part.rules.len() as u32;
        }
        self.next_rule = next;
    }

    /// Drops the remembered parts that the world's changes since the last
    /// compile can touch, and remembers this world.
    fn forget_what_changed(&mut self, world: &World, cidrs: &[(IpNet, u32)]) {
        let print = |value: &dyn Fn(&mut xxhash_rust::xxh3::Xxh3Default)| {
            let mut h = xxhash_rust::xxh3::Xxh3Default::new();
            value(&mut h);
            h.digest128()
        };
        // Rules naming blocks resolve to the blocks' identities only (the
        // ipcache gives each address its block), so addresses coming and
        // going change no policy's part.
        let prints = print(&|h| {
            use std::hash::Hash as _;
            (&world.namespaces, cidrs).hash(h);
        });
        let changed = changed_identities(&self.identities, world);
        // Past a few dozen changed identities, testing each policy against
        // each of them costs more than compiling everything again.
        if prints != self.world || changed.len() > MAX_CHANGED_IDENTITIES {
            self.cache.clear();
        } else {
            self.cache
                .retain(|(p, _, _)| !changed.iter().any(|i| touches(p, i, world)));
        }
        if !changed.is_empty() {
            self.identities = world.identities.iter().map(|i| (i.id, i.clone())).collect();
        }
        self.world = prints;
    }
}

/// What a merge is made of: the parts (the same objects) at their bases,
/// the rule table's length, the CIDR identities and the pending hold.
#[derive(Debug)]
struct Merged {
    parts: Vec<(Arc<Contribution>, u32)>,
    len: u32,
    cidrs: Vec<(IpNet, u32)>,
    pending: (Vec<u8>, &'static str),
}

impl Merged {
    fn same(&self, other: &Merged) -> bool {
        self.len == other.len
            && self.cidrs == other.cidrs
            && self.pending == other.pending
            && self.parts.len() == other.parts.len()
            && self
                .parts
                .iter()
                .zip(&other.parts)
                .all(|((a, x), (b, y))| x == y && Arc::ptr_eq(a, b))
    }
}

/// More identities changed at once than this recompile every policy.
const MAX_CHANGED_IDENTITIES: usize = 64;

/// Every identity added, removed or changed since `old`, changed ones in
/// both versions.
fn changed_identities<'a>(old: &'a Identities, world: &'a World) -> Vec<&'a IdentityInfo> {
    let now: BTreeMap<u32, &Arc<IdentityInfo>> =
        world.identities.iter().map(|i| (i.id, i)).collect();
    let mut changed: Vec<&IdentityInfo> = Vec::new();
    for (id, before) in old {
        match now.get(id) {
            // The same shared info (most of them), or an equal one.
            Some(after) if Arc::ptr_eq(after, before) || *after == before => {}
            Some(after) => changed.extend([&**before, &***after]),
            None => changed.push(before),
        }
    }
    changed.extend(
        now.iter()
            .filter(|(id, _)| !old.contains_key(id))
            .map(|(_, i)| &***i),
    );
    changed
}

/// The contributions in policy order as one compiled table, with the CIDR
/// identities and the hold of workloads not classified yet. Each part's
/// rules sit at ids `base..base + len` of a table of `len` ids; ids no part
/// holds read as "no rule".
fn merge(
    parts: &[(u32, Arc<Contribution>)],
    len: u32,
    cidrs: Vec<(IpNet, u32)>,
    world: &World,
) -> CompiledPolicy {
    let none = Arc::new(RuleRef {
        policy: String::new(),
        kind: "",
        rule: String::new(),
    });
    let mut out = CompiledPolicy {
        rules: vec![none; len as usize],
        ..Default::default()
    };
    let mut acc: BTreeMap<EntryKey, Acc> = BTreeMap::new();
    // (direction, identity) → (policy rule id, all selecting policies audit?)
    let mut enforcement: BTreeMap<(u8, u32), (u32, bool)> = BTreeMap::new();
    for (base, part) in parts {
        let base = *base;
        for (i, rule) in part.rules.iter().enumerate() {
            if let Some(slot) = out.rules.get_mut(base as usize + i) {
                *slot = rule.clone();
            }
        }
        for &(k, default_rule, audit) in &part.enforced {
            let e = enforcement.entry(k).or_insert((base + default_rule, true));
            e.1 &= audit;
        }
        for &(key, flag, rule) in &part.entries {
            acc.entry(key).or_default().set(flag, base + rule);
        }
    }
    merge_covering(&mut acc);
    out.entries = acc.into_iter().map(|(k, a)| (k, a.value())).collect();
    out.enforced = enforcement
        .into_iter()
        .map(|(k, (rule, audit_only))| {
            (
                k,
                EnforcedValue {
                    policy_rule_id: rule,
                    flags: if audit_only { flags::AUDIT_DENY } else { 0 },
                },
            )
        })
        .collect();
    out.cidr_identities = cidrs;
    hold_pending(&mut out, world);
    out
}

/// One policy's entries, enforcement and rules over `world`.
fn contribute(
    policy: &Policy,
    world: &World,
    index: &Index<'_>,
    cidrs: &[(IpNet, u32)],
) -> Contribution {
    let mut c = Contribution::default();
    let push_rule = |c: &mut Contribution, rule: String| -> u32 {
        c.rules.push(Arc::new(RuleRef {
            policy: policy.qualified_name(),
            kind: policy.origin.kind,
            rule,
        }));
        (c.rules.len() - 1) as u32
    };
    let selected: Vec<u32> = index
        .candidates(&policy.selector)
        .filter(|i| selects(policy, i, world))
        .map(|i| i.id)
        .collect();
    for direction in [Direction::Ingress, Direction::Egress] {
        let Some(rules) = policy.rules(direction) else {
            continue;
        };
        let dir = direction.to_kernel();
        let default_rule = push_rule(&mut c, "default-deny".to_owned());
        let audit = policy.mode == Mode::Audit;
        for &local in &selected {
            c.enforced.push(((dir, local), default_rule, audit));
        }
        for rule in rules {
            let rule_id = push_rule(&mut c, rule.name.clone());
            let flag = match (rule.action, policy.mode) {
                (Action::Allow, Mode::Enforce) => flags::ALLOW,
                (Action::Allow, Mode::Audit) => flags::AUDIT_ALLOW,
                (Action::Deny, Mode::Enforce) => flags::DENY,
                (Action::Deny, Mode::Audit) => flags::AUDIT_DENY,
            };
            let peers = resolve_peers(policy, rule, world, index, cidrs);
            let ports = port_prefixes(rule);
            let entries = &mut c.entries;
            let mut emit = |local: u32, peer: u32, protocol: u8, port: u16, port_bits: u8| {
                let key = EntryKey {
                    direction: dir,
                    protocol,
                    local,
                    peer,
                    port,
                    port_bits,
                };
                entries.push((key, flag, rule_id));
            };
            for &local in &selected {
                for &peer in &peers {
                    for &(protocol, port, port_bits) in &ports {
                        emit(local, peer, protocol, port, port_bits);
                    }
                    // Named ports: the selected workload's own for ingress;
                    // the peer's for egress (every workload declaring the
                    // name when the peer is "any").
                    for (protocol, name) in &rule.named_ports {
                        let key = (*protocol, name.clone());
                        let targets: Vec<(u32, u32)> = match direction {
                            Direction::Ingress => vec![(peer, local)],
                            Direction::Egress if peer == identity::ANY => {
                                world.identities.iter().map(|i| (i.id, i.id)).collect()
                            }
                            Direction::Egress => vec![(peer, peer)],
                        };
                        for (entry_peer, owner) in targets {
                            if let Some(port) = index
                                .by_id
                                .get(&owner)
                                .and_then(|i| i.named_ports.get(&key))
                            {
                                emit(local, entry_peer, protocol.number(), *port, 16);
                            }
                        }
                    }
                }
            }
        }
    }
    c
}

/// Cgroups not classified yet are default-deny in the directions the
/// world names; the audit event names the config field as the policy.
fn hold_pending(out: &mut CompiledPolicy, world: &World) {
    if world.pending_held.is_empty() {
        return;
    }
    let rule_id = u32::try_from(out.rules.len()).unwrap_or(u32::MAX);
    out.rules.push(Arc::new(RuleRef {
        policy: world.pending_rule.into(),
        kind: "AgentConfig",
        rule: "pod-not-known-yet".into(),
    }));
    for dir in &world.pending_held {
        out.enforced.insert(
            (*dir, palisade_common::identity::PENDING),
            EnforcedValue {
                policy_rule_id: rule_id,
                flags: 0,
            },
        );
    }
}

fn selects(policy: &Policy, id: &IdentityInfo, world: &World) -> bool {
    let in_scope = match (&policy.namespace, &policy.namespace_selector) {
        (Some(ns), _) => id.namespace.as_deref() == Some(ns.as_str()),
        (None, None) => true,
        (None, Some(sel)) => id
            .namespace
            .as_ref()
            .and_then(|ns| world.namespaces.get(ns))
            .is_some_and(|labels| sel.matches(labels)),
    };
    in_scope && policy.selector.matches(&id.labels)
}

/// Every CIDR a policy names (blocks and exceptions) gets an identity, so that
/// the longest-prefix ipcache can tell "inside the block" from "inside an
/// exception". Numbered deterministically in address order.
fn cidr_identities<'p>(policies: impl Iterator<Item = &'p Policy>) -> Vec<(IpNet, u32)> {
    let mut cidrs = BTreeSet::new();
    for peer in policies.flat_map(Policy::peers) {
        if let Peer::Cidr { cidr, except } = peer {
            cidrs.insert(*cidr);
            cidrs.extend(except.iter().copied());
        }
    }
    cidrs.into_iter().zip(FIRST_CIDR_IDENTITY..).collect()
}

/// The peer identities a rule allows, or `[ANY]`.
/// Workload identities indexed by label, so that a selector with
/// `matchLabels` is tried only on the identities carrying the rarest of its
/// labels instead of on every identity (10,000 rules over 1,000 identities
/// would otherwise be 10 million selector evaluations). The full selector is
/// still evaluated on each candidate: the index only narrows.
struct Index<'a> {
    workloads: Vec<&'a IdentityInfo>,
    by_label: std::collections::HashMap<(&'a str, &'a str), Vec<usize>>,
    /// Every identity by number (named ports are read from it).
    by_id: BTreeMap<u32, &'a IdentityInfo>,
}

impl<'a> Index<'a> {
    fn new(world: &'a World) -> Index<'a> {
        let workloads: Vec<&IdentityInfo> = world
            .identities
            .iter()
            .filter(|i| i.kind == IdentityKind::Workload)
            .map(|i| &**i)
            .collect();
        let mut by_label: std::collections::HashMap<(&str, &str), Vec<usize>> =
            std::collections::HashMap::new();
        for (n, id) in workloads.iter().enumerate() {
            for (k, v) in &id.labels {
                by_label
                    .entry((k.as_str(), v.as_str()))
                    .or_default()
                    .push(n);
            }
        }
        Index {
            workloads,
            by_label,
            by_id: world.identities.iter().map(|i| (i.id, &**i)).collect(),
        }
    }

    /// Workload identities that may match `sel` (a superset of those that do).
    fn candidates<'s>(
        &'s self,
        sel: &'s LabelSelector,
    ) -> Box<dyn Iterator<Item = &'a IdentityInfo> + 's> {
        let rarest = sel
            .match_labels
            .iter()
            .map(|(k, v)| {
                self.by_label
                    .get(&(k.as_str(), v.as_str()))
                    .map_or(&[][..], Vec::as_slice)
            })
            .min_by_key(|list| list.len());
        match rarest {
            Some(list) => Box::new(list.iter().map(|n| self.workloads[*n])),
            None => Box::new(self.workloads.iter().copied()),
        }
    }
}

/// Whether a workload peer (`pods` in `namespaces`) of `policy` is `id`.
fn peer_selects(
    policy: &Policy,
    pods: Option<&LabelSelector>,
    namespaces: &NamespaceScope,
    id: &IdentityInfo,
    world: &World,
) -> bool {
    let Some(ns) = &id.namespace else {
        return false;
    };
    let ns_ok = match namespaces {
        NamespaceScope::Same => policy.namespace.as_ref().is_none_or(|own| own == ns),
        NamespaceScope::Matching(sel) => world
            .namespaces
            .get(ns)
            .is_some_and(|labels| sel.matches(labels)),
    };
    ns_ok && pods.is_none_or(|sel| sel.matches(&id.labels))
}

/// Whether `policy`'s part can depend on the identity `id`: it selects it,
/// names it as a peer (by labels or by name), or has an egress rule to any
/// peer on a named port (which reads every identity's declared ports).
fn touches(policy: &Policy, id: &IdentityInfo, world: &World) -> bool {
    let workload = id.kind == IdentityKind::Workload;
    if workload && selects(policy, id, world) {
        return true;
    }
    if policy
        .rules(Direction::Egress)
        .unwrap_or_default()
        .iter()
        .any(|r| r.peers.is_none() && !r.named_ports.is_empty() && !id.named_ports.is_empty())
    {
        return true;
    }
    policy.peers().any(|peer| match peer {
        Peer::Workloads { pods, namespaces } => {
            workload && peer_selects(policy, pods.as_ref(), namespaces, id, world)
        }
        Peer::Identity(name) => &id.name == name,
        Peer::Cidr { .. } => false,
    })
}

fn resolve_peers(
    policy: &Policy,
    rule: &Rule,
    world: &World,
    index: &Index<'_>,
    cidr_ids: &[(IpNet, u32)],
) -> Vec<u32> {
    let Some(peers) = &rule.peers else {
        return vec![identity::ANY];
    };
    let mut out = BTreeSet::new();
    for peer in peers {
        match peer {
            Peer::Workloads { pods, namespaces } => {
                let all = LabelSelector::default();
                for id in index.candidates(pods.as_ref().unwrap_or(&all)) {
                    if peer_selects(policy, pods.as_ref(), namespaces, id, world) {
                        out.insert(id.id);
                    }
                }
            }
            Peer::Identity(name) => {
                out.extend(
                    world
                        .identities
                        .iter()
                        .filter(|i| &i.name == name)
                        .map(|i| i.id),
                );
            }
            Peer::Cidr { cidr, except } => {
                let inside =
                    |net: &IpNet| cidr.contains(net) && !except.iter().any(|e| e.contains(net));
                out.extend(
                    cidr_ids
                        .iter()
                        .filter(|(n, _)| inside(n))
                        .map(|(_, id)| *id),
                );
            }
        }
    }
    out.into_iter().collect()
}

/// (protocol, port, port bits) prefixes covering the rule's ports.
fn port_prefixes(rule: &Rule) -> Vec<(u8, u16, u8)> {
    let ranges: Vec<PortRange> = match &rule.ports {
        None if rule.named_ports.is_empty() => {
            Protocol::ALL.iter().map(|p| PortRange::all(*p)).collect()
        }
        None => Vec::new(),
        Some(r) => r.clone(),
    };
    let mut out = BTreeSet::new();
    for r in ranges {
        for (port, bits) in range_to_prefixes(r.first, r.last) {
            out.insert((r.protocol.number(), port, bits));
        }
    }
    out.into_iter().collect()
}

/// Splits `first..=last` into the fewest aligned bit prefixes.
pub fn range_to_prefixes(first: u16, last: u16) -> Vec<(u16, u8)> {
    let mut out = Vec::new();
    let (mut lo, hi) = (u32::from(first), u32::from(last));
    while lo <= hi {
        // Largest block aligned at `lo` that stays within `hi`.
        let mut size = if lo == 0 {
            1 << 16
        } else {
            1 << lo.trailing_zeros().min(16)
        };
        while lo + size - 1 > hi {
            size >>= 1;
        }
        out.push((lo as u16, (16 - size.trailing_zeros()) as u8));
        lo += size;
    }
    out
}

/// Makes every entry carry the flags of each less specific entry with the same
/// (direction, protocol, local, peer) whose port prefix covers it, so one
/// longest-prefix match in the kernel sees everything that applies.
fn merge_covering(acc: &mut BTreeMap<EntryKey, Acc>) {
    // The table is ordered by (direction, protocol, local, peer, …): each
    // group of entries that differ only in their port is one run of it.
    let mut group: Vec<(EntryKey, Acc)> = Vec::new();
    let flush = |group: &mut Vec<(EntryKey, Acc)>, acc: &mut BTreeMap<EntryKey, Acc>| {
        if group.len() > 1 {
            for (k, _) in group.iter() {
                let Some(a) = acc.get_mut(k) else { continue };
                for (other, other_acc) in group.iter() {
                    if other.port_bits < k.port_bits && other.covers_port(k.port) {
                        a.merge(other_acc);
                    }
                }
            }
        }
        group.clear();
    };
    let same = |a: &EntryKey, b: &EntryKey| {
        (a.direction, a.protocol, a.local, a.peer) == (b.direction, b.protocol, b.local, b.peer)
    };
    let keys: Vec<(EntryKey, Acc)> = acc.iter().map(|(k, a)| (*k, *a)).collect();
    for (k, a) in keys {
        if group.last().is_some_and(|(last, _)| !same(last, &k)) {
            flush(&mut group, acc);
        }
        group.push((k, a));
    }
    flush(&mut group, acc);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_become_few_prefixes() {
        assert_eq!(range_to_prefixes(443, 443), vec![(443, 16)]);
        assert_eq!(range_to_prefixes(0, 65535), vec![(0, 0)]);
        assert_eq!(range_to_prefixes(1, 65535).len(), 16);
        assert_eq!(range_to_prefixes(8000, 8003), vec![(8000, 14)]);
        // Every port of an odd range is covered exactly once, nothing more.
        let prefixes = range_to_prefixes(1000, 2999);
        for port in 0..=u16::MAX {
            let hits = prefixes
                .iter()
                .filter(|(p, bits)| port & mask(*bits) == *p & mask(*bits))
                .count();
            assert_eq!(
                hits,
                usize::from((1000..=2999).contains(&port)),
                "port {port}"
            );
        }
    }
}
