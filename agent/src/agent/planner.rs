//! The planner: from the domain model ([`Inputs`]) and the policies to the
//! complete desired kernel state ([`Desired`]), as plain data.
//!
//! It keeps what the sources send as changes between rounds — the remote
//! workloads, the identities they hold, every address's claims and the
//! ipcache built from them — so a pod event costs that pod: its identity's
//! membership, its addresses' entries, and the policies the compiler finds
//! touched. Local workloads, peers and the node's addresses (a few hundred
//! at most) are taken whole every round and compared with the last.
use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::IpAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use ipnet::IpNet;
use palisade_common::{IpcacheValue, identity as reserved};
use tracing::info;

use crate::{
    agent::services::{Around, ServicePlan},
    config::{Config, HostTraffic},
    datapath::{Desired, IpCache},
    identity::{Allocator, LabelKey, display_name, uses_fallback},
    inventory::{
        Changes, Inputs, Nodes, RemoteChanges, RemoteWorkload, Service, UnknownPods, Workload,
    },
    policy::{
        self, Addresses, PolicySet,
        compile::{Identities, IdentityInfo, IdentityKind},
        labels::Labels,
        model::Protocol,
    },
};

/// What one observation of the host produced.
#[derive(Debug)]
pub struct Observation {
    pub workloads: Vec<Workload>,
    /// The plan's identities (shared with the planner's memory of them).
    pub identities: Identities,
    pub desired: Desired,
}

/// A remote workload as the planner holds it between rounds.
#[derive(Debug)]
struct RemoteEntry {
    id: u32,
    nets: Vec<IpNet>,
    /// The identity's name this workload gives it, where its labels alone
    /// do not name it (see [`uses_fallback`]).
    name: Option<String>,
    ports: Vec<((Protocol, String), u16)>,
}

/// The remote workloads holding one identity, and what they declare.
#[derive(Debug)]
struct Members {
    count: usize,
    /// Names the members give the identity (only where the labels do not
    /// name it); the smallest is used, whatever the order they came in.
    names: BTreeMap<String, usize>,
    /// Declared named ports; where members disagree, the lowest number.
    ports: BTreeMap<(Protocol, String), BTreeMap<u16, usize>>,
    info: Arc<IdentityInfo>,
}

impl Members {
    fn refresh(&mut self, trust_domain: &str, key: &LabelKey) {
        let name = match self.names.keys().next() {
            Some(name) => name.clone(),
            None => display_name(trust_domain, key, ""),
        };
        let named_ports: BTreeMap<(Protocol, String), u16> = self
            .ports
            .iter()
            .filter_map(|(k, ports)| Some((k.clone(), *ports.keys().next()?)))
            .collect();
        if self.info.name != name || self.info.named_ports != named_ports {
            let info = Arc::make_mut(&mut self.info);
            info.name = name;
            info.named_ports = named_ports;
        }
    }
}

fn count_in<K: Ord>(map: &mut BTreeMap<K, usize>, key: K) {
    *map.entry(key).or_default() += 1;
}

fn count_out<K: Ord>(map: &mut BTreeMap<K, usize>, key: &K) {
    if let Some(n) = map.get_mut(key) {
        *n -= 1;
        if *n == 0 {
            map.remove(key);
        }
    }
}

/// Who claims an address block, by layer, in the order they claimed it;
/// the winner is the ipcache's entry: the node's addresses, then configured
/// peers, then remote workloads, then local workloads — the last claim in
/// the first layer that has one.
#[derive(Debug, Default)]
struct Claims {
    layers: [Vec<u32>; LAYERS],
}

const LOCAL: usize = 0;
const REMOTE: usize = 1;
const PEERS: usize = 2;
const NODE: usize = 3;
const LAYERS: usize = 4;

impl Claims {
    fn winner(&self) -> Option<u32> {
        self.layers.iter().rev().find_map(|l| l.last().copied())
    }

    fn holds(&self, id: u32) -> bool {
        self.layers.iter().any(|l| l.contains(&id))
    }

    fn is_empty(&self) -> bool {
        self.layers.iter().all(Vec::is_empty)
    }
}

/// The pure part of the agent: from observed facts to the desired state.
pub struct Planner {
    config: Config,
    /// Remembers each policy's compiled part while the world is unchanged.
    compiler: policy::Compiler,
    host_traffic: HostTraffic,
    /// What a cgroup not classified yet may do (`kubernetes.unknownPods`,
    /// or `unknownWorkloads` on a plain host).
    unknown: UnknownPods,
    /// The config field `unknown` came from, named in audit events.
    pending_rule: &'static str,
    allocator: Allocator,
    /// Identities in the last plan, kept one more round after their last
    /// workload left so that no cgroup is ever looked up under an identity
    /// missing from the live policy table.
    previous: Identities,
    previous_cgroups: BTreeMap<u64, u32>,
    /// Identity numbers found in adopted kernel maps (cgroup id / address block
    /// → identity), reused for the same workloads and peers.
    hints_by_cgroup: BTreeMap<u64, u32>,
    hints_by_net: BTreeMap<IpNet, u32>,
    /// The agent's own cgroup when it lies under the root (a DaemonSet pod):
    /// `reserved:host`, whatever its pod or a workload rule says.
    own_cgroup: Option<u64>,
    /// Kubernetes mode: other nodes judge this node's pods by address.
    kubernetes: bool,
    /// Remote workloads by the source's key, and their identities.
    remote: HashMap<String, RemoteEntry>,
    members: BTreeMap<u32, Members>,
    /// Every claimed address block, and each block's winner.
    claims: HashMap<IpNet, Claims>,
    addresses: Addresses,
    /// The layers taken whole (local, peers, node), as set last round.
    layers: [BTreeMap<IpNet, Vec<u32>>; LAYERS],
    /// The ipcache: broadcast blocks and the policies' CIDR blocks
    /// (`ipcache_base`), every claimed block's winner over them.
    ipcache: IpCache,
    ipcache_base: BTreeMap<IpNet, u32>,
    /// `ipcache_base`'s blocks, for each entry's block identity.
    blocks: Blocks,
    /// Blocks whose winner changed since the ipcache was last brought up to date.
    touched: Vec<IpNet>,
    /// Addresses whose identity lost them lately (gone, or taken by
    /// another), who had them and since when (for [`ADDRESS_RECENT`]); an
    /// entry goes once the planner has planned with the address's new
    /// holders.
    departed: HashMap<IpAddr, (u32, Instant)>,
    /// Local workloads held `reserved:pending` until the instant, because
    /// their address belonged to another identity moments ago.
    reuse_holds: BTreeMap<u64, Instant>,
    services: ServicePlan,
}

/// How long a local pod whose address belonged to a pod of another identity
/// moments ago ([`ADDRESS_RECENT`]) stays held (egress refused, as a pod
/// not known yet): every other node must have seen the change before the
/// pod's packets reach it, or they would judge them with the old pod's
/// identity. Measured by the real-node test: agents on two nodes apply the
/// same API event within tens of milliseconds of each other.
pub const ADDRESS_REUSE_HOLD: Duration = Duration::from_secs(1);

/// An address whose previous owner left the plans more than this long ago
/// is no longer "recently reused": every node has long removed the old owner.
pub const ADDRESS_RECENT: Duration = Duration::from_secs(10);

impl Planner {
    /// `kubernetes` picks the defaults of Kubernetes mode (traffic with the
    /// node always allowed, as upstream defines it).
    pub fn new(config: Config, kubernetes: bool) -> Planner {
        Planner {
            host_traffic: config.host_traffic.unwrap_or(if kubernetes {
                HostTraffic::Allow
            } else {
                HostTraffic::Policy
            }),
            unknown: if kubernetes {
                config.kubernetes.unknown_pods
            } else {
                config.unknown_workloads
            },
            pending_rule: if kubernetes {
                "kubernetes.unknownPods"
            } else {
                "unknownWorkloads"
            },
            config,
            allocator: Allocator::default(),
            previous: BTreeMap::new(),
            previous_cgroups: BTreeMap::new(),
            hints_by_cgroup: BTreeMap::new(),
            hints_by_net: BTreeMap::new(),
            own_cgroup: None,
            kubernetes,
            remote: HashMap::new(),
            members: BTreeMap::new(),
            claims: HashMap::new(),
            addresses: Addresses::default(),
            layers: Default::default(),
            ipcache: IpCache::new(),
            ipcache_base: BTreeMap::new(),
            blocks: Blocks::default(),
            touched: Vec::new(),
            departed: HashMap::new(),
            reuse_holds: BTreeMap::new(),
            services: ServicePlan::default(),
            compiler: policy::Compiler::default(),
        }
    }

    /// Some local pod is held because its address was reused: plan again
    /// every round until the holds end, even with unchanged inputs.
    pub fn holding(&self) -> bool {
        !self.reuse_holds.is_empty()
    }

    /// Changes one claim on `net` (`change` edits its layers); keeps the
    /// block's winner in `addresses` and notes an address's identity that
    /// no longer has it.
    fn claim(&mut self, net: IpNet, change: impl FnOnce(&mut Claims), now: Instant) {
        let claims = self.claims.entry(net).or_default();
        let before = claims.winner();
        change(claims);
        let after = claims.winner();
        // The address's identity lost it (it went, or another took it in
        // the same change): who had it, and since when.
        if let Some(id) = before
            && !claims.holds(id)
            && net.prefix_len() == net.max_prefix_len()
        {
            self.departed.insert(net.addr(), (id, now));
        }
        if claims.is_empty() {
            self.claims.remove(&net);
        }
        if before != after {
            self.addresses.set(net, after);
            self.touched.push(net);
        }
    }

    /// Replaces a layer taken whole with `now`, claiming only what changed.
    fn set_layer(&mut self, layer: usize, now: BTreeMap<IpNet, Vec<u32>>, at: Instant) {
        let old = std::mem::take(&mut self.layers[layer]);
        for net in old.keys().filter(|n| !now.contains_key(n)) {
            self.claim(*net, |c| c.layers[layer].clear(), at);
        }
        for (net, ids) in &now {
            if old.get(net) != Some(ids) {
                self.claim(*net, |c| c.layers[layer].clone_from(ids), at);
            }
        }
        self.layers[layer] = now;
    }

    /// Applies the source's changes to the remote workloads.
    fn update_remote(&mut self, changes: RemoteChanges, now: Instant) {
        if changes.reset {
            let keys: Vec<String> = self.remote.keys().cloned().collect();
            for key in keys {
                self.remote_change(key, None, now);
            }
        }
        for (key, workload) in changes.changes {
            self.remote_change(key, workload, now);
        }
    }

    fn remote_change(&mut self, key: String, workload: Option<RemoteWorkload>, now: Instant) {
        if let Some(old) = self.remote.remove(&key) {
            for net in &old.nets {
                self.claim(
                    *net,
                    |c| {
                        let remote = &mut c.layers[REMOTE];
                        if let Some(at) = remote.iter().rposition(|id| *id == old.id) {
                            remote.remove(at);
                        }
                    },
                    now,
                );
            }
            self.leave(&old);
        }
        let Some(w) = workload else {
            return;
        };
        let key_labels = LabelKey {
            namespace: Some(w.namespace),
            labels: w.labels,
        };
        let hint = w
            .ips
            .first()
            .and_then(|ip| self.hints_by_net.get(&IpNet::from(*ip)).copied());
        let id = self.allocator.get_or_allocate_hinted(&key_labels, hint);
        let td = &self.config.trust_domain;
        let entry = RemoteEntry {
            id,
            nets: w.ips.iter().map(|ip| IpNet::from(*ip)).collect(),
            name: uses_fallback(&key_labels).then(|| display_name(td, &key_labels, &w.name)),
            ports: w.ports.iter().filter_map(|p| p.key()).collect(),
        };
        let members = self.members.entry(id).or_insert_with(|| Members {
            count: 0,
            names: BTreeMap::new(),
            ports: BTreeMap::new(),
            info: Arc::new(IdentityInfo {
                id,
                name: String::new(),
                namespace: key_labels.namespace.clone(),
                labels: key_labels.labels.clone(),
                kind: IdentityKind::Workload,
                named_ports: BTreeMap::new(),
            }),
        });
        members.count += 1;
        if let Some(name) = &entry.name {
            count_in(&mut members.names, name.clone());
        }
        for (k, port) in &entry.ports {
            count_in(members.ports.entry(k.clone()).or_default(), *port);
        }
        members.refresh(td, &key_labels);
        for net in &entry.nets {
            self.claim(*net, |c| c.layers[REMOTE].push(id), now);
        }
        self.remote.insert(key, entry);
    }

    /// A remote workload leaves its identity.
    fn leave(&mut self, old: &RemoteEntry) {
        let Some(members) = self.members.get_mut(&old.id) else {
            return;
        };
        members.count -= 1;
        if members.count == 0 {
            self.members.remove(&old.id);
            return;
        }
        if let Some(name) = &old.name {
            count_out(&mut members.names, name);
        }
        for (k, port) in &old.ports {
            if let Some(ports) = members.ports.get_mut(k) {
                count_out(ports, port);
                if ports.is_empty() {
                    members.ports.remove(k);
                }
            }
        }
        let key = LabelKey {
            namespace: members.info.namespace.clone(),
            labels: members.info.labels.clone(),
        };
        members.refresh(&self.config.trust_domain, &key);
    }

    /// Kubernetes mode: holds every local workload that has just got its
    /// identity and whose address had another identity within
    /// [`ADDRESS_RECENT`] that no longer holds it; releases
    /// holds that ran out.
    fn hold_reused_addresses(
        &mut self,
        workloads: &[Workload],
        cgroups: &mut BTreeMap<u64, u32>,
        now: Instant,
    ) {
        for w in workloads.iter().filter(|_| self.kubernetes) {
            let Some(&id) = cgroups.get(&w.cgroup_id) else {
                continue;
            };
            // Only a pod that is new here (or was not known until now): a
            // relabelled pod keeps its traffic.
            let fresh = matches!(
                self.previous_cgroups.get(&w.cgroup_id),
                None | Some(&reserved::PENDING)
            );
            if !fresh || id == reserved::PENDING || self.reuse_holds.contains_key(&w.cgroup_id) {
                continue;
            }
            // An address two workloads share (processes of several cgroups
            // in one network namespace on a plain host) is not a reused one.
            let reused = w.ips.iter().find_map(|ip| {
                let (old, seen) = self.departed.get(ip)?;
                let still_held = self
                    .claims
                    .get(&IpNet::from(*ip))
                    .is_some_and(|c| c.holds(*old));
                (*old != id && !still_held && now.duration_since(*seen) < ADDRESS_RECENT)
                    .then_some((*ip, *old))
            });
            if let Some((ip, old)) = reused {
                info!(workload = %format!("{}/{}", w.namespace, w.name), address = %ip, previous_identity = old,
                      hold_ms = ADDRESS_REUSE_HOLD.as_millis() as u64,
                      "address reused from a pod of another identity: holding the new pod (pending, kubernetes.unknownPods) until every node has seen the change");
                self.reuse_holds
                    .insert(w.cgroup_id, now + ADDRESS_REUSE_HOLD);
            }
        }
        self.reuse_holds
            .retain(|cg, until| *until > now && cgroups.contains_key(cg));
        for cg in self.reuse_holds.keys() {
            cgroups.insert(*cg, reserved::PENDING);
        }
        // An address someone has again is no longer a departed one: a pod
        // that comes to it later is judged against its holder.
        let claims = &self.claims;
        self.departed.retain(|ip, (_, seen)| {
            now.duration_since(*seen) < ADDRESS_RECENT && !claims.contains_key(&IpNet::from(*ip))
        });
    }

    /// Keeps `cgroup` (the agent's own) `reserved:host` in every plan: the
    /// agent's connections to the API server and its probes' answers are
    /// the node's, and must not wait on the agent knowing its own pod.
    pub fn exempt(&mut self, cgroup: u64) {
        self.own_cgroup = Some(cgroup);
    }

    /// Numbers already in the kernel (after adopting pinned maps).
    pub fn hint(&mut self, cgroups: BTreeMap<u64, u32>, nets: BTreeMap<IpNet, u32>) {
        self.hints_by_cgroup = cgroups;
        self.hints_by_net = nets;
    }

    /// Computes the desired state from the workloads found and the policies.
    pub fn plan(&mut self, input: Inputs, policies: &PolicySet) -> Observation {
        let Inputs {
            mut workloads,
            held,
            remote,
            namespaces: cluster_namespaces,
            local_without_cgroup: _,
            services: services_input,
            nodes,
        } = input;
        let now = Instant::now();
        workloads.retain(|w| Some(w.cgroup_id) != self.own_cgroup);
        workloads.sort_by(|a, b| a.cgroup_path.cmp(&b.cgroup_path));
        self.update_remote(remote, now);
        let mut identities: Identities = self
            .members
            .iter()
            .map(|(id, m)| (*id, m.info.clone()))
            .collect();
        let mut cgroups = BTreeMap::new();
        let mut local = Vec::new();
        let own_addresses =
            self.add_local(&mut identities, &mut cgroups, &mut local, &workloads, &held);
        self.set_layer(LOCAL, layer(local), now);
        let peers = self.add_peers(&mut identities);
        self.set_layer(PEERS, layer(peers), now);
        // The node: its addresses (and loopback, for workloads in its
        // namespace) are `reserved:host`, other nodes' `reserved:remote-node`.
        for id in [reserved::HOST, reserved::REMOTE_NODE, reserved::BROADCAST] {
            identities.entry(id).or_insert_with(|| reserved_info(id));
        }
        let node = layer(node_addresses(&nodes, &self.config.host_addresses));
        self.set_layer(NODE, node, now);
        // Identities the kernel may still resolve for a cgroup this round.
        for id in self.previous_cgroups.values() {
            if !identities.contains_key(id)
                && let Some(info) = self.previous.get(id)
            {
                identities.insert(*id, info.clone());
            }
        }
        self.hold_reused_addresses(&workloads, &mut cgroups, now);
        if self.holding() {
            identities
                .entry(reserved::PENDING)
                .or_insert_with(|| reserved_info(reserved::PENDING));
        }
        let namespaces = policy::labels::namespace_labels(
            self.config
                .namespaces
                .iter()
                .map(|ns| (ns.name.as_str(), &ns.labels))
                .chain(cluster_namespaces.iter().map(|(n, l)| (n.as_str(), l))),
            workloads.iter().map(|w| w.namespace.as_str()).chain(
                self.members
                    .values()
                    .filter_map(|m| m.info.namespace.as_deref()),
            ),
        );
        let desired = self.finish(
            identities,
            cgroups,
            own_addresses,
            namespaces,
            policies,
            (services_input, &nodes, &workloads),
        );
        let in_use: BTreeSet<u32> = self.previous.keys().copied().collect();
        self.allocator.release_unused(&in_use);
        Observation {
            workloads,
            identities: self.previous.clone(),
            desired,
        }
    }

    /// Local workloads: an identity per (namespace, labels), their cgroups
    /// and addresses; held cgroups and the agent's own. Returns each
    /// workload's own addresses.
    fn add_local(
        &mut self,
        identities: &mut Identities,
        cgroups: &mut BTreeMap<u64, u32>,
        addresses: &mut Vec<(IpNet, u32)>,
        workloads: &[Workload],
        held: &BTreeMap<u64, u32>,
    ) -> BTreeSet<(u64, IpAddr)> {
        let mut own_addresses = BTreeSet::new();
        for w in workloads {
            let hint = self.hints_by_cgroup.get(&w.cgroup_id).copied();
            let id = self.workload_identity(identities, w, hint);
            cgroups.insert(w.cgroup_id, id);
            own_addresses.extend(w.ips.iter().map(|ip| (w.cgroup_id, *ip)));
            if w.own_netns {
                // Marks loopback as the workload's own (see `LOOPBACK_MARK`).
                own_addresses.insert((w.cgroup_id, IpAddr::from(palisade_common::LOOPBACK_MARK)));
            }
            addresses.extend(w.ips.iter().map(|ip| (IpNet::from(*ip), id)));
        }
        for (cgroup, id) in held {
            cgroups.insert(*cgroup, *id);
            identities.entry(*id).or_insert_with(|| reserved_info(*id));
        }
        if let Some(own) = self.own_cgroup {
            cgroups.insert(own, reserved::HOST);
            identities
                .entry(reserved::HOST)
                .or_insert_with(|| reserved_info(reserved::HOST));
        }
        own_addresses
    }

    /// The identity of a local workload's (namespace, labels), merged with
    /// the remote workloads of the same labels: the smallest name where the
    /// labels do not name it, the lowest number for a named port.
    fn workload_identity(
        &mut self,
        identities: &mut Identities,
        w: &Workload,
        hint: Option<u32>,
    ) -> u32 {
        let key = LabelKey {
            namespace: Some(w.namespace.clone()),
            labels: w.labels.clone(),
        };
        let id = self.allocator.get_or_allocate_hinted(&key, hint);
        let name = display_name(&self.config.trust_domain, &key, &w.name);
        let info = identities.entry(id).or_insert_with(|| {
            Arc::new(IdentityInfo {
                id,
                name: name.clone(),
                namespace: key.namespace.clone(),
                labels: key.labels.clone(),
                kind: IdentityKind::Workload,
                named_ports: BTreeMap::new(),
            })
        });
        if name < info.name {
            Arc::make_mut(info).name = name;
        }
        for (k, port) in w.ports.iter().filter_map(|p| p.key()) {
            if info.named_ports.get(&k).is_none_or(|p| port < *p) {
                Arc::make_mut(info).named_ports.insert(k, port);
            }
        }
        id
    }

    /// Configured peers (address blocks with a name and labels); returns
    /// their blocks.
    fn add_peers(&mut self, identities: &mut Identities) -> Vec<(IpNet, u32)> {
        let td = self.config.trust_domain.clone();
        let mut blocks = Vec::new();
        for p in &self.config.peers {
            let key = LabelKey {
                namespace: p.namespace.clone(),
                labels: p.labels.clone(),
            };
            let hint = p
                .cidrs
                .first()
                .and_then(|c| self.hints_by_net.get(&c.trunc()).copied());
            let id = self.allocator.get_or_allocate_hinted(&key, hint);
            identities.entry(id).or_insert_with(|| {
                Arc::new(IdentityInfo {
                    id,
                    name: match &p.namespace {
                        Some(_) => display_name(&td, &key, &p.name),
                        None => p.name.clone(),
                    },
                    namespace: key.namespace.clone(),
                    labels: key.labels.clone(),
                    // A namespaced peer is a remote workload; policies can select it as a peer.
                    kind: if p.namespace.is_some() {
                        IdentityKind::Workload
                    } else {
                        IdentityKind::Peer
                    },
                    named_ports: BTreeMap::new(),
                })
            });
            blocks.extend(p.cidrs.iter().map(|c| (c.trunc(), id)));
        }
        blocks
    }

    /// Compiles the policies over the identities and brings the ipcache up
    /// to date; remembers this plan's identities and cgroups for the next one.
    fn finish(
        &mut self,
        identities: Identities,
        cgroups: BTreeMap<u64, u32>,
        mut own_addresses: BTreeSet<(u64, IpAddr)>,
        namespaces: BTreeMap<String, Labels>,
        policies: &PolicySet,
        (services_input, nodes, workloads): (Changes<Service>, &Nodes, &[Workload]),
    ) -> Desired {
        // Cgroups not classified yet are `reserved:pending` in the kernel
        // (an entry missing from the cgroup map reads as pending), held
        // whether or not any is known now.
        let world = policy::World {
            identities: identities.into_values().collect(),
            namespaces,
            addresses: self.addresses.clone(),
            pending_held: self.unknown.held_directions().to_vec(),
            pending_rule: self.pending_rule,
        };
        let compiled = self.compiler.compile(&policies.policies, &world);
        let identities: Identities = world.identities.into_iter().map(|i| (i.id, i)).collect();
        let (touched, rebuilt) = self.refresh_ipcache(&compiled);
        let node_ips = nodes
            .local
            .iter()
            .chain(&nodes.remote)
            .chain(&self.config.host_addresses)
            .copied()
            .collect();
        let owners = workloads
            .iter()
            .flat_map(|w| w.ips.iter().map(|ip| (*ip, w.cgroup_id)))
            .collect();
        // A block wider than one address moved (a peer, the node's
        // loopback): any endpoint's identity may have changed.
        let wide = touched.iter().any(|n| n.prefix_len() != n.max_prefix_len());
        let (services, own) = self.services.update(
            services_input,
            Around {
                touched: &touched,
                everything: rebuilt || wide,
                node_ips,
                owners,
            },
            &self.ipcache,
        );
        own_addresses.extend(own);
        self.previous = identities;
        self.previous_cgroups = cgroups.clone();
        Desired {
            cgroups,
            ipcache: self.ipcache.clone(),
            own_addresses,
            policy: compiled,
            services,
            host_always_allowed: self.host_traffic == HostTraffic::Allow,
        }
    }

    /// Brings the ipcache up to date: the blocks whose winner changed, or
    /// everything when the policies' CIDR blocks did. Returns the blocks
    /// changed and whether the table was rebuilt.
    fn refresh_ipcache(&mut self, compiled: &policy::CompiledPolicy) -> (Vec<IpNet>, bool) {
        // Broadcast and multicast first, outside the compiler's view of
        // addresses: no CIDR rule covers them by accident (`0.0.0.0/0`
        // does not mean "every pod on the link"); a rule naming exactly
        // such a block replaces the entry, `reserved:broadcast` names them all.
        let base: BTreeMap<IpNet, u32> = broadcast_blocks()
            .map(|net| (net, reserved::BROADCAST))
            .chain(compiled.cidr_identities.iter().copied())
            .collect();
        let touched = std::mem::take(&mut self.touched);
        let rebuilt = base != self.ipcache_base;
        if rebuilt {
            let blocks = Blocks::new(&base);
            let mut whole = base.clone();
            whole.extend(self.addresses.iter().map(|(n, id)| (*n, *id)));
            self.ipcache.replace(
                whole
                    .into_iter()
                    .map(|(net, identity)| (net, blocks.entry(net, identity))),
            );
            self.ipcache_base = base;
            self.blocks = blocks;
        } else {
            for net in &touched {
                let id = self.addresses.get(net).or_else(|| base.get(net).copied());
                self.ipcache
                    .set(*net, id.map(|id| self.blocks.entry(*net, id)));
            }
        }
        (touched, rebuilt)
    }
}

/// The blocks policies name, for the ipcache's block identities: the
/// most specific one holding an address is what rules naming blocks judge
/// it by, whoever holds the address (a CIDR rule matches addresses, not
/// identities). Broadcast and multicast blocks hold no block identity
/// unless a rule names exactly that block.
#[derive(Clone, Debug, Default)]
struct Blocks {
    /// Block → its identity (`ANY` for the broadcast blocks).
    by_block: BTreeMap<IpNet, u32>,
    /// The prefix lengths present, longest first, per family (v4, v6).
    lengths: [Vec<u8>; 2],
}

impl Blocks {
    fn new(base: &BTreeMap<IpNet, u32>) -> Blocks {
        let by_block: BTreeMap<IpNet, u32> = base
            .iter()
            .map(|(net, id)| {
                let block = if *id == reserved::BROADCAST {
                    reserved::ANY
                } else {
                    *id
                };
                (*net, block)
            })
            .collect();
        let mut lengths = [Vec::new(), Vec::new()];
        for net in by_block.keys() {
            lengths[usize::from(!matches!(net, IpNet::V4(_)))].push(net.prefix_len());
        }
        for l in &mut lengths {
            l.sort_unstable_by(|a, b| b.cmp(a));
            l.dedup();
        }
        Blocks { by_block, lengths }
    }

    /// `net`'s ipcache entry: `identity`, and the identity of the most
    /// specific named block holding all of `net`.
    fn entry(&self, net: IpNet, identity: u32) -> IpcacheValue {
        let family = usize::from(!matches!(net, IpNet::V4(_)));
        let cidr_identity = self.lengths[family]
            .iter()
            .filter(|len| **len <= net.prefix_len())
            .find_map(|len| {
                let block = IpNet::new(net.addr(), *len).ok()?.trunc();
                self.by_block.get(&block).copied()
            })
            .unwrap_or(reserved::ANY);
        IpcacheValue {
            identity,
            cidr_identity,
        }
    }
}

/// A layer's claims by block, in order (the last one wins).
fn layer(claims: Vec<(IpNet, u32)>) -> BTreeMap<IpNet, Vec<u32>> {
    let mut out: BTreeMap<IpNet, Vec<u32>> = BTreeMap::new();
    for (net, id) in claims {
        out.entry(net).or_default().push(id);
    }
    out
}

/// ipcache entries for the node: this node's addresses, the configured host
/// addresses and loopback are `reserved:host`; other nodes' are
/// `reserved:remote-node`.
fn node_addresses(nodes: &Nodes, host_addresses: &[IpAddr]) -> Vec<(IpNet, u32)> {
    let loopback: [IpNet; 2] = [
        IpNet::V4(ipnet::Ipv4Net::new(std::net::Ipv4Addr::LOCALHOST, 8).unwrap_or_default()),
        IpNet::from(IpAddr::V6(std::net::Ipv6Addr::LOCALHOST)),
    ];
    let mut out: Vec<(IpNet, u32)> = nodes
        .remote
        .iter()
        .map(|ip| (IpNet::from(*ip), reserved::REMOTE_NODE))
        .collect();
    // Host last: an address both lists name is this node's.
    out.extend(
        nodes
            .local
            .iter()
            .chain(host_addresses)
            .map(|ip| (IpNet::from(*ip), reserved::HOST))
            .chain(loopback.into_iter().map(|n| (n, reserved::HOST))),
    );
    out
}

/// Limited broadcast and the multicast ranges.
fn broadcast_blocks() -> impl Iterator<Item = IpNet> {
    ["255.255.255.255/32", "224.0.0.0/4", "ff00::/8"]
        .into_iter()
        .filter_map(|n| n.parse().ok())
}

/// Names a reserved identity for audit events and status.
fn reserved_info(id: u32) -> Arc<IdentityInfo> {
    Arc::new(IdentityInfo {
        id,
        name: crate::identity::reserved_name(id)
            .unwrap_or("reserved")
            .to_owned(),
        namespace: None,
        labels: Default::default(),
        kind: IdentityKind::Reserved,
        named_ports: BTreeMap::new(),
    })
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::{
        agent::tests::workload,
        datapath::{Datapath, fake::FakeDatapath},
        inventory::RemoteChanges,
    };

    fn host(workloads: Vec<Workload>) -> Inputs {
        Inputs {
            workloads,
            ..Inputs::default()
        }
    }

    #[test]
    fn a_relabelled_workloads_old_identity_stays_one_round_in_the_tables() {
        let config = Config::parse(Path::new("t.yaml"), "cgroupRoot: x\n").unwrap();
        let policies = policy::PolicySet {
            policies: policy::load::parse_str(
                "p.yaml",
                "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: p, namespace: prod}\nspec:\n  podSelector: {}\n",
            )
            .unwrap()
            .into_iter()
            .map(std::sync::Arc::new)
            .collect(),
            files: Vec::new(),
        };
        let mut planner = Planner::new(config, false);
        let mut dp = FakeDatapath::default();
        let first = planner.plan(host(vec![workload(7, "web")]), &policies);
        dp.apply(&first.desired).unwrap();
        let old = first.desired.cgroups[&7];
        // The workload is relabelled: a new identity, and the old one is kept
        // enforced while the kernel may still map the cgroup to it.
        let second = planner.plan(host(vec![workload(7, "api")]), &policies);
        dp.apply(&second.desired).unwrap();
        let new = second.desired.cgroups[&7];
        assert_ne!(old, new);
        let enforced = |d: &Desired, id| {
            d.policy
                .enforced
                .contains_key(&(palisade_common::DIR_INGRESS, id))
        };
        assert!(
            enforced(&second.desired, old) && enforced(&second.desired, new),
            "both identities in the live table"
        );
        // One round later the old identity is gone.
        let third = planner.plan(host(vec![workload(7, "api")]), &policies);
        dp.apply(&third.desired).unwrap();
        assert!(!enforced(&third.desired, old) && enforced(&third.desired, new));
        assert_eq!(dp.applied.len(), 3);
        assert_ne!(
            dp.applied[1], dp.applied[2],
            "dropping the old identity is a change"
        );
    }

    /// A new local pod gets an address a pod of another identity (on
    /// another node's view: a remote pod) had a moment ago: it is held as
    /// pending for ADDRESS_REUSE_HOLD, then gets its identity. A relabelled
    /// pod and a pod on a fresh address are not held.
    #[test]
    fn a_pod_on_a_just_reused_address_is_held_until_every_node_has_seen_it() {
        let config = Config::parse(Path::new("t.yaml"), "cgroupRoot: x\n").unwrap();
        let none = policy::PolicySet::default();
        let mut planner = Planner::new(config, true);
        let old_owner = crate::inventory::RemoteWorkload {
            namespace: "prod".into(),
            name: "old".into(),
            labels: [("app".to_owned(), "db".to_owned())].into(),
            ips: vec!["10.1.0.7".parse().unwrap()],
            ports: Vec::new(),
        };
        let with_old = Inputs {
            workloads: vec![workload(8, "web")],
            remote: RemoteChanges::all([old_owner]),
            ..Inputs::default()
        };
        let first = planner.plan(with_old, &none);
        assert!(!planner.holding());
        let web = first.desired.cgroups[&8];
        // The old pod is gone; a new pod on this node has its address.
        let reused = || host(vec![workload(8, "api"), workload(7, "cache")]);
        let mut gone = reused();
        gone.remote = RemoteChanges::all([]);
        let second = planner.plan(gone, &none);
        assert_eq!(second.desired.cgroups[&7], reserved::PENDING, "held");
        assert!(planner.holding());
        assert_ne!(
            second.desired.cgroups[&8],
            reserved::PENDING,
            "relabelled, not held"
        );
        assert_ne!(second.desired.cgroups[&8], web);
        std::thread::sleep(ADDRESS_REUSE_HOLD + Duration::from_millis(50));
        let third = planner.plan(reused(), &none);
        assert!(!planner.holding());
        let cache = third.desired.cgroups[&7];
        assert!(cache != reserved::PENDING && cache != web);
        // A pod on an address nobody had is not held.
        let fourth = planner.plan(
            host(vec![
                workload(8, "api"),
                workload(7, "cache"),
                workload(9, "q"),
            ]),
            &none,
        );
        assert_ne!(fourth.desired.cgroups[&9], reserved::PENDING);
        // A new cgroup sharing an address its owner still holds (one
        // network namespace, two cgroups) is not on a reused address.
        let mut sharing = workload(10, "sidecar");
        sharing.ips = workload(8, "api").ips;
        let fifth = planner.plan(
            host(vec![
                workload(8, "api"),
                workload(7, "cache"),
                workload(9, "q"),
                sharing,
            ]),
            &none,
        );
        assert_ne!(fifth.desired.cgroups[&10], reserved::PENDING);
        assert!(!planner.holding());
    }

    /// The address passes from one local pod to a new one in one round,
    /// while the old pod's cgroup is still there (terminating, its address
    /// already given away): the new pod is held as for any reused address.
    #[test]
    fn an_address_handed_between_local_pods_in_one_round_is_held() {
        let config = Config::parse(Path::new("t.yaml"), "cgroupRoot: x\n").unwrap();
        let none = policy::PolicySet::default();
        let mut planner = Planner::new(config, true);
        let mut new = workload(9, "web");
        new.ips = workload(7, "db").ips;
        // The new pod's container runs before the API server has the pod.
        let first = Inputs {
            workloads: vec![workload(7, "db")],
            held: [(9, reserved::PENDING)].into(),
            ..Inputs::default()
        };
        planner.plan(first, &none);
        let mut old = workload(7, "db");
        old.ips.clear();
        let handed = planner.plan(host(vec![old, new]), &none);
        assert_eq!(handed.desired.cgroups[&9], reserved::PENDING, "held");
        assert!(planner.holding());
    }

    #[test]
    fn identity_numbers_in_adopted_maps_are_kept() {
        let config = Config::parse(Path::new("t.yaml"), "cgroupRoot: x\n").unwrap();
        let mut planner = Planner::new(config, false);
        planner.hint([(7, 300), (8, 301)].into(), BTreeMap::new());
        let obs = planner.plan(
            host(vec![workload(8, "db"), workload(7, "web")]),
            &policy::PolicySet::default(),
        );
        assert_eq!(
            (obs.desired.cgroups[&7], obs.desired.cgroups[&8]),
            (300, 301)
        );
        // A new workload gets a fresh number above them.
        let obs = planner.plan(
            host(vec![
                workload(8, "db"),
                workload(7, "web"),
                workload(9, "cache"),
            ]),
            &policy::PolicySet::default(),
        );
        assert!(obs.desired.cgroups[&9] > 301);
    }

    /// An identity number in a form two planners agree on however they
    /// numbered: reserved and CIDR numbers as they are, a workload's by its
    /// namespace and labels.
    type Canon = Result<u32, (Option<String>, Labels)>;

    #[allow(clippy::type_complexity)]
    fn canonical(
        obs: &Observation,
    ) -> (
        BTreeMap<Canon, (String, IdentityKind, BTreeMap<(Protocol, String), u16>)>,
        BTreeMap<IpNet, (Canon, Canon)>,
        BTreeMap<u64, Canon>,
        BTreeMap<(u8, u8, Canon, Canon, u16, u8), (u32, Option<policy::compile::RuleRef>)>,
        BTreeMap<(u8, Canon), (Option<policy::compile::RuleRef>, u32)>,
        BTreeMap<crate::datapath::ServiceFrontend, (String, u16, Vec<(Canon, Canon, u16)>)>,
        BTreeSet<(u64, IpAddr)>,
    ) {
        let canon = |id: u32| -> Canon {
            match obs.identities.get(&id) {
                Some(i) if i.kind == IdentityKind::Workload => {
                    Err((i.namespace.clone(), i.labels.clone()))
                }
                _ => Ok(id),
            }
        };
        let p = &obs.desired.policy;
        (
            obs.identities
                .values()
                .map(|i| (canon(i.id), (i.name.clone(), i.kind, i.named_ports.clone())))
                .collect(),
            obs.desired
                .ipcache
                .iter()
                .map(|(n, v)| (*n, (canon(v.identity), canon(v.cidr_identity))))
                .collect(),
            obs.desired
                .cgroups
                .iter()
                .map(|(c, id)| (*c, canon(*id)))
                .collect(),
            p.entries
                .iter()
                .map(|(k, v)| {
                    (
                        (
                            k.direction,
                            k.protocol,
                            canon(k.local),
                            canon(k.peer),
                            k.port,
                            k.port_bits,
                        ),
                        (v.flags, p.rule(v.rule_id).cloned()),
                    )
                })
                .collect(),
            p.enforced
                .iter()
                .map(|((dir, id), v)| {
                    (
                        (*dir, canon(*id)),
                        (p.rule(v.policy_rule_id).cloned(), v.flags),
                    )
                })
                .collect(),
            obs.desired
                .services
                .frontends
                .iter()
                .map(|(f, b)| {
                    let info = obs
                        .desired
                        .services
                        .info(b.service_id)
                        .cloned()
                        .unwrap_or_default();
                    let mut backends: Vec<(Canon, Canon, u16)> = b
                        .backends
                        .iter()
                        .map(|(at, port)| (canon(at.identity), canon(at.cidr_identity), *port))
                        .collect();
                    backends.sort();
                    (*f, (info.name, info.port, backends))
                })
                .collect(),
            obs.desired.own_addresses.clone(),
        )
    }

    /// The planner that keeps remote workloads, identities and address
    /// claims between rounds plans exactly what a fresh planner plans from
    /// the whole list, through seeded churn: pods added, removed,
    /// relabelled, moved to another address, declaring other ports; local
    /// workloads relabelled and sharing addresses with remote ones; a CIDR
    /// policy with an exception over part of the addresses.
    #[test]
    fn a_planner_fed_changes_equals_one_fed_the_whole_list() {
        let config = Config::parse(Path::new("t.yaml"), "cgroupRoot: x\n").unwrap();
        let mut text = String::new();
        for (ns, app, from) in [("prod", "a", "b"), ("prod", "c", "a"), ("dev", "b", "d")] {
            text.push_str(&format!(
                "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: {app}, namespace: {ns}}}\nspec:\n  podSelector: {{matchLabels: {{app: {app}}}}}\n  ingress:\n  - from: [{{podSelector: {{matchLabels: {{app: {from}}}}}}}]\n    ports: [{{port: http}}]\n"
            ));
        }
        text.push_str("---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: cidr, namespace: prod}\nspec:\n  podSelector: {}\n  policyTypes: [Egress]\n  egress:\n  - to: [{ipBlock: {cidr: 10.9.0.0/27, except: [10.9.0.8/30]}}]\n");
        let policies = policy::PolicySet {
            policies: policy::load::parse_str("p.yaml", &text)
                .unwrap()
                .into_iter()
                .map(Arc::new)
                .collect(),
            files: Vec::new(),
        };
        let mut rng = crate::testing::Seeded::new(0x5eed_u64);
        let mut next = |n: usize| rng.below(n);
        let mut pods: BTreeMap<String, RemoteWorkload> = BTreeMap::new();
        let mut locals = vec![workload(7, "a"), workload(8, "b")];
        let mut services: BTreeMap<String, Service> = BTreeMap::new();
        let mut nodes = Nodes::default();
        let mut planner = Planner::new(config.clone(), false);
        let ip = |i: usize| -> IpAddr { format!("10.9.0.{i}").parse().unwrap() };
        for step in 0..400 {
            let mut change = Vec::new();
            let mut service_change = Vec::new();
            match next(6) {
                0 | 1 => {
                    let free: Vec<usize> = (1..60)
                        .filter(|i| !pods.values().any(|p| p.ips.contains(&ip(*i))))
                        .collect();
                    let key = format!("p{}", next(40));
                    let mut labels: Labels =
                        [("tier".to_owned(), ["x", "y"][next(2)].to_owned())].into();
                    if next(3) > 0 {
                        labels.insert("app".into(), ["a", "b", "c", "d"][next(4)].into());
                    }
                    let w = RemoteWorkload {
                        namespace: ["prod", "dev"][next(2)].into(),
                        name: key.clone(),
                        labels,
                        ips: vec![ip(free[next(free.len())])],
                        ports: vec![crate::inventory::NamedPortConfig {
                            name: "http".into(),
                            port: [80, 8080][next(2)],
                            protocol: "TCP".into(),
                        }],
                    };
                    pods.insert(key.clone(), w.clone());
                    change.push((key, Some(w)));
                }
                2 => {
                    if let Some(key) = pods.keys().nth(next(pods.len().max(1))).cloned() {
                        pods.remove(&key);
                        change.push((key, None));
                    }
                }
                3 => {
                    let at = next(pods.len().max(1));
                    if let Some((key, w)) = pods.iter_mut().nth(at) {
                        w.labels
                            .insert("app".into(), ["a", "b", "c", "d"][next(4)].into());
                        change.push((key.clone(), Some(w.clone())));
                    }
                }
                4 if next(2) == 0 => {
                    // A Service whose endpoints are a few of the addresses
                    // (pods', a local workload's, or nobody's), sometimes
                    // with a node port; or one deleted.
                    let name = format!("s{}", next(6));
                    let svc_change = if next(4) == 0 {
                        services.remove(&name).map(|_| None)
                    } else {
                        let endpoints = (0..next(4))
                            .map(|_| crate::inventory::Endpoint {
                                ip: ip(next(60) + 1),
                                ports: [((Protocol::Tcp, "http".to_owned()), 8080)].into(),
                            })
                            .collect();
                        let svc = Service {
                            namespace: "prod".into(),
                            name: name.clone(),
                            addresses: vec![format!("10.96.0.{}", next(6) + 1).parse().unwrap()],
                            external: Vec::new(),
                            ports: vec![crate::inventory::ServicePort {
                                name: "http".into(),
                                protocol: Protocol::Tcp,
                                port: 80,
                                node_port: (next(2) == 0).then_some(30080),
                            }],
                            endpoints,
                        };
                        services.insert(name.clone(), svc.clone());
                        Some(Some(svc))
                    };
                    if let Some(s) = svc_change {
                        service_change.push((format!("prod/{name}"), s));
                    }
                    if next(3) == 0 {
                        nodes.local = [ip(next(60) + 1)].into();
                    }
                }
                4 => {
                    let l = &mut locals[next(2)];
                    l.labels
                        .insert("app".into(), ["a", "b", "c"][next(3)].into());
                    l.ips = vec![ip(next(60) + 1)];
                }
                _ => {
                    // Several changes in one round, one of them undone.
                    if let Some((key, w)) = pods.iter().next().map(|(k, w)| (k.clone(), w.clone()))
                    {
                        change.push((key.clone(), None));
                        change.push((key, Some(w)));
                    }
                }
            }
            let inputs = |remote, services| Inputs {
                workloads: locals.clone(),
                remote,
                services,
                nodes: nodes.clone(),
                ..Inputs::default()
            };
            planner.plan(
                inputs(
                    RemoteChanges {
                        reset: false,
                        changes: change,
                    },
                    Changes {
                        reset: false,
                        changes: service_change,
                    },
                ),
                &policies,
            );
            // A quiet round: identities kept one round for a relabelled
            // cgroup are gone, as they never were for a fresh planner.
            let kept = planner.plan(inputs(Changes::default(), Changes::default()), &policies);
            let fresh = Planner::new(config.clone(), false).plan(
                inputs(
                    RemoteChanges::all(pods.values().cloned()),
                    Changes::all(services.values().cloned()),
                ),
                &policies,
            );
            assert_eq!(canonical(&kept), canonical(&fresh), "step {step}");
        }
        assert!(pods.len() > 10, "the churn kept a world to compare");
        assert!(!services.is_empty());
    }
}
