//! The agent's control loop (standalone mode): observe the host (cgroups,
//! addresses, policy files), compute the desired kernel state as plain data,
//! and hand it to the datapath when it differs from what was applied. Start,
//! reload and change are the same path.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    path::PathBuf,
    sync::{Arc, RwLock},
    time::{Duration, Instant, SystemTime},
};

use anyhow::Context as _;
use ipnet::IpNet;
use palisade_common::identity as reserved;
use tracing::{info, warn};

use crate::{
    audit::{self, AuditStats, SharedSnapshot, Snapshot},
    config::{Config, HostTraffic},
    datapath::{
        Datapath, Desired, ServiceBackends, ServiceFrontend, ServiceInfo, ServiceTable,
        kernel::KernelDatapath,
    },
    discovery::{self, Classifier},
    identity::{Allocator, LabelKey, display_name},
    inventory::{Inputs, Nodes, Service, UnknownPods, Workload},
    policy::{
        self, PolicySet,
        compile::{IdentityInfo, IdentityKind},
    },
};

/// What one observation of the host produced.
#[derive(Debug)]
pub struct Observation {
    pub workloads: Vec<Workload>,
    pub identities: BTreeMap<u32, IdentityInfo>,
    pub desired: Desired,
}

/// The pure part of the agent: from observed facts to the desired state.
pub struct Planner {
    config: Config,
    host_traffic: HostTraffic,
    /// What a cgroup not classified yet may do (`kubernetes.unknownPods`,
    /// or `unknownWorkloads` on a plain host).
    unknown: UnknownPods,
    allocator: Allocator,
    /// Identities in the last plan, kept one more round after their last
    /// workload left so that no cgroup is ever looked up under an identity
    /// missing from the live policy table.
    previous: BTreeMap<u32, IdentityInfo>,
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
    /// The identity each pod address had in the last plans, and when.
    address_history: std::collections::HashMap<IpAddr, (u32, Instant)>,
    /// Local workloads held `reserved:pending` until the instant, because
    /// their address belonged to another identity moments ago.
    reuse_holds: BTreeMap<u64, Instant>,
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
            config,
            allocator: Allocator::default(),
            previous: BTreeMap::new(),
            previous_cgroups: BTreeMap::new(),
            hints_by_cgroup: BTreeMap::new(),
            hints_by_net: BTreeMap::new(),
            own_cgroup: None,
            kubernetes,
            address_history: std::collections::HashMap::new(),
            reuse_holds: BTreeMap::new(),
        }
    }

    /// Some local pod is held because its address was reused: plan again
    /// every round until the holds end, even with unchanged inputs.
    pub fn holding(&self) -> bool {
        !self.reuse_holds.is_empty()
    }

    /// Kubernetes mode: holds every local workload that has just got its
    /// identity and whose address had another identity within
    /// [`ADDRESS_RECENT`] that no longer holds it; releases
    /// holds that ran out; records this plan's address owners.
    fn hold_reused_addresses(
        &mut self,
        workloads: &[Workload],
        cgroups: &mut BTreeMap<u64, u32>,
        addresses: &[(IpNet, u32)],
    ) {
        let now = Instant::now();
        // Who holds each address in this plan: an address two workloads
        // share (processes of several cgroups in one network namespace on a
        // plain host) is not a reused one.
        let current: BTreeSet<(IpAddr, u32)> = addresses
            .iter()
            .filter(|(net, _)| net.prefix_len() == net.max_prefix_len())
            .map(|(net, id)| (net.addr(), *id))
            .collect();
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
            let reused = w.ips.iter().find_map(|ip| {
                let (old, seen) = self.address_history.get(ip)?;
                (*old != id
                    && !current.contains(&(*ip, *old))
                    && now.duration_since(*seen) < ADDRESS_RECENT)
                    .then_some((*ip, *old))
            });
            if let Some((ip, old)) = reused {
                info!(workload = %format!("{}/{}", w.namespace, w.name), address = %ip, previous_identity = old,
                      hold_ms = ADDRESS_REUSE_HOLD.as_millis() as u64,
                      "address reused from a pod of another identity: holding the new pod's egress until every node has seen the change");
                self.reuse_holds
                    .insert(w.cgroup_id, now + ADDRESS_REUSE_HOLD);
            }
        }
        self.reuse_holds
            .retain(|cg, until| *until > now && cgroups.contains_key(cg));
        for cg in self.reuse_holds.keys() {
            cgroups.insert(*cg, reserved::PENDING);
        }
        self.address_history
            .retain(|_, (_, seen)| now.duration_since(*seen) < ADDRESS_RECENT);
        for (net, id) in addresses {
            if net.prefix_len() == net.max_prefix_len() {
                self.address_history.insert(net.addr(), (*id, now));
            }
        }
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
        workloads.retain(|w| Some(w.cgroup_id) != self.own_cgroup);
        workloads.sort_by(|a, b| a.cgroup_path.cmp(&b.cgroup_path));
        let td = self.config.trust_domain.clone();
        let mut identities: BTreeMap<u32, IdentityInfo> = BTreeMap::new();
        let mut cgroups = BTreeMap::new();
        let mut own_addresses = BTreeSet::new();
        let mut addresses: Vec<(IpNet, u32)> = Vec::new();
        for w in &workloads {
            let key = LabelKey {
                namespace: Some(w.namespace.clone()),
                labels: w.labels.clone(),
            };
            let id = self
                .allocator
                .get_or_allocate_hinted(&key, self.hints_by_cgroup.get(&w.cgroup_id).copied());
            let info = identities.entry(id).or_insert_with(|| IdentityInfo {
                id,
                name: display_name(&td, &key, &w.name),
                namespace: key.namespace.clone(),
                labels: key.labels.clone(),
                kind: IdentityKind::Workload,
                named_ports: BTreeMap::new(),
            });
            for (k, port) in w.ports.iter().filter_map(|p| p.key()) {
                info.named_ports.entry(k).or_insert(port);
            }
            cgroups.insert(w.cgroup_id, id);
            own_addresses.extend(w.ips.iter().map(|ip| (w.cgroup_id, *ip)));
            if w.own_netns {
                // Marks loopback as the workload's own (see `LOOPBACK_MARK`).
                own_addresses.insert((w.cgroup_id, IpAddr::from(palisade_common::LOOPBACK_MARK)));
            }
            addresses.extend(w.ips.iter().map(|ip| (IpNet::from(*ip), id)));
        }
        for (cgroup, id) in &held {
            cgroups.insert(*cgroup, *id);
            identities.entry(*id).or_insert_with(|| reserved_info(*id));
        }
        if let Some(own) = self.own_cgroup {
            cgroups.insert(own, reserved::HOST);
            identities
                .entry(reserved::HOST)
                .or_insert_with(|| reserved_info(reserved::HOST));
        }
        for r in &remote {
            let key = LabelKey {
                namespace: Some(r.namespace.clone()),
                labels: r.labels.clone(),
            };
            let hint = r
                .ips
                .first()
                .and_then(|ip| self.hints_by_net.get(&IpNet::from(*ip)).copied());
            let id = self.allocator.get_or_allocate_hinted(&key, hint);
            let info = identities.entry(id).or_insert_with(|| IdentityInfo {
                id,
                name: display_name(&td, &key, &r.name),
                namespace: key.namespace.clone(),
                labels: key.labels.clone(),
                kind: IdentityKind::Workload,
                named_ports: BTreeMap::new(),
            });
            for (k, port) in r.ports.iter().filter_map(|p| p.key()) {
                info.named_ports.entry(k).or_insert(port);
            }
            addresses.extend(r.ips.iter().map(|ip| (IpNet::from(*ip), id)));
        }
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
            identities.entry(id).or_insert_with(|| IdentityInfo {
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
            });
            addresses.extend(p.cidrs.iter().map(|c| (c.trunc(), id)));
        }
        // The node: its addresses (and loopback, for workloads in its
        // namespace) are `reserved:host`, other nodes' `reserved:remote-node`.
        for id in [reserved::HOST, reserved::REMOTE_NODE, reserved::BROADCAST] {
            identities.entry(id).or_insert_with(|| reserved_info(id));
        }
        addresses.extend(node_addresses(&nodes, &self.config.host_addresses));
        // Identities the kernel may still resolve for a cgroup this round.
        for id in self.previous_cgroups.values() {
            if !identities.contains_key(id)
                && let Some(info) = self.previous.get(id)
            {
                identities.insert(*id, info.clone());
            }
        }
        self.hold_reused_addresses(&workloads, &mut cgroups, &addresses);
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
            workloads
                .iter()
                .map(|w| w.namespace.as_str())
                .chain(remote.iter().map(|r| r.namespace.as_str())),
        );
        let world = policy::World {
            identities: identities.values().cloned().collect(),
            namespaces,
            addresses: addresses.clone(),
        };
        let mut compiled = policy::compile(&policies.policies, &world);
        // Cgroups not classified yet are `reserved:pending` in the kernel
        // (an entry missing from the cgroup map reads as pending), held
        // whether or not any is known now.
        {
            hold_pending(&mut compiled, self.unknown);
        }
        let mut ipcache = BTreeMap::new();
        // Broadcast and multicast first, outside the compiler's view of
        // addresses: no CIDR rule covers them by accident (`0.0.0.0/0`
        // does not mean "every pod on the link"); a rule naming exactly
        // such a block replaces the entry, `reserved:broadcast` names them all.
        ipcache.extend(broadcast_blocks().map(|net| (net, reserved::BROADCAST)));
        ipcache.extend(compiled.cidr_identities.iter().copied());
        ipcache.extend(addresses);
        let services = service_table(
            &services_input,
            &nodes,
            &self.config.host_addresses,
            &ipcache,
        );
        own_addresses.extend(own_services(&services_input, &workloads));
        let in_use: BTreeSet<u32> = identities.keys().copied().collect();
        self.allocator.release_unused(&in_use);
        self.previous = identities.clone();
        self.previous_cgroups = cgroups.clone();
        Observation {
            workloads,
            identities,
            desired: Desired {
                cgroups,
                ipcache,
                own_addresses,
                policy: Arc::new(compiled),
                services: Arc::new(services),
                host_always_allowed: self.host_traffic == HostTraffic::Allow,
            },
        }
    }
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

/// The identity the ipcache gives `ip` (longest prefix), `reserved:world` if none.
fn identity_of(ipcache: &BTreeMap<IpNet, u32>, ip: IpAddr) -> u32 {
    let host = IpNet::from(ip);
    if let Some(id) = ipcache.get(&host) {
        return *id;
    }
    ipcache
        .iter()
        .filter(|(net, _)| net.contains(&ip))
        .max_by_key(|(net, _)| net.prefix_len())
        .map_or(reserved::WORLD, |(_, id)| *id)
}

/// (cgroup, Service address) for every Service whose endpoints are all
/// addresses of one workload: connecting to it is that workload reaching
/// itself (kube-proxy's hairpin), which passes like a connection to its own
/// address. A Service with other endpoints too is judged by them all.
fn own_services(services: &[Service], workloads: &[Workload]) -> Vec<(u64, IpAddr)> {
    let owner: std::collections::HashMap<IpAddr, u64> = workloads
        .iter()
        .flat_map(|w| w.ips.iter().map(|ip| (*ip, w.cgroup_id)))
        .collect();
    let mut out = Vec::new();
    for svc in services {
        let owners: BTreeSet<Option<u64>> = svc
            .endpoints
            .iter()
            .map(|e| owner.get(&e.ip).copied())
            .collect();
        if let [Some(cgroup)] = owners.into_iter().collect::<Vec<_>>()[..] {
            out.extend(svc.addresses.iter().map(|a| (cgroup, *a)));
        }
    }
    out
}

/// Service frontends (addresses × ports, and node addresses × node ports)
/// → the distinct (identity, target port) pairs of their ready endpoints.
/// Each (Service, port) gets its own id, which names it in audit events.
fn service_table(
    services: &[Service],
    nodes: &Nodes,
    host_addresses: &[IpAddr],
    ipcache: &BTreeMap<IpNet, u32>,
) -> ServiceTable {
    let mut table = ServiceTable::default();
    let node_ips: BTreeSet<IpAddr> = nodes
        .local
        .iter()
        .chain(&nodes.remote)
        .chain(host_addresses)
        .copied()
        .collect();
    for svc in services {
        for port in &svc.ports {
            let backends: BTreeSet<(u32, u16)> = svc
                .endpoints
                .iter()
                .filter_map(|e| {
                    let target = e.ports.get(&(port.protocol, port.name.clone()))?;
                    Some((identity_of(ipcache, e.ip), *target))
                })
                .collect();
            table.infos.push(ServiceInfo {
                name: svc.qualified_name(),
                port: port.port,
                protocol: port.protocol,
                backends: backends.iter().copied().collect(),
            });
            let service_id = u32::try_from(table.infos.len()).unwrap_or(u32::MAX);
            let value = ServiceBackends {
                service_id,
                backends: backends.into_iter().collect(),
            };
            let frontends = svc.addresses.iter().map(|a| (*a, port.port)).chain(
                port.node_port
                    .into_iter()
                    .flat_map(|np| node_ips.iter().map(move |a| (*a, np))),
            );
            for (addr, p) in frontends {
                table.frontends.insert(
                    ServiceFrontend {
                        addr,
                        port: p,
                        protocol: port.protocol.number(),
                    },
                    value.clone(),
                );
            }
        }
    }
    table
}

/// Names a reserved identity for audit events and status.
fn reserved_info(id: u32) -> IdentityInfo {
    IdentityInfo {
        id,
        name: crate::identity::reserved_name(id)
            .unwrap_or("reserved")
            .to_owned(),
        namespace: None,
        labels: Default::default(),
        kind: IdentityKind::Reserved,
        named_ports: BTreeMap::new(),
    }
}

/// Pods not known yet are default-deny in the directions `unknown_pods`
/// holds; the audit event names `kubernetes.unknownPods` as the reason.
fn hold_pending(compiled: &mut policy::compile::CompiledPolicy, mode: UnknownPods) {
    let directions: &[u8] = match mode {
        UnknownPods::DenyEgress => &[palisade_common::DIR_EGRESS],
        UnknownPods::DenyAll => &[palisade_common::DIR_EGRESS, palisade_common::DIR_INGRESS],
        UnknownPods::Allow => &[],
    };
    if directions.is_empty() {
        return;
    }
    let rule_id = u32::try_from(compiled.rules.len()).unwrap_or(u32::MAX);
    compiled.rules.push(policy::compile::RuleRef {
        policy: "kubernetes.unknownPods".into(),
        kind: "AgentConfig",
        rule: "pod-not-known-yet".into(),
    });
    for dir in directions {
        compiled.enforced.insert(
            (*dir, reserved::PENDING),
            palisade_common::EnforcedValue {
                policy_rule_id: rule_id,
                flags: 0,
            },
        );
    }
}

fn policy_list(set: &PolicySet) -> Vec<crate::http::PolicyStatus> {
    set.policies
        .iter()
        .map(|p| crate::http::PolicyStatus {
            name: p.qualified_name(),
            kind: p.origin.kind,
            file: p.origin.file.clone(),
            line: p.origin.line,
        })
        .collect()
}

/// Size and modification time of every policy file: a cheap "did it change?".
fn policy_fingerprint(dir: &Option<PathBuf>) -> Vec<(PathBuf, Option<SystemTime>, u64)> {
    let Some(dir) = dir else { return Vec::new() };
    let mut out = Vec::new();
    let paths = policy::load::policy_files(dir);
    for p in paths {
        if let Ok(m) = std::fs::metadata(&p) {
            out.push((p, m.modified().ok(), m.len()));
        }
    }
    out.sort();
    out
}

fn load_policies(config: &Config) -> Result<PolicySet, policy::LoadError> {
    match &config.policy_dir {
        Some(dir) => policy::load_paths(std::slice::from_ref(dir)),
        None => Ok(PolicySet::default()),
    }
}

/// How often the kernel state is compared with the agent's (`guard`).
const SELF_CHECK_EVERY: Duration = Duration::from_secs(1);

/// One self-check: repairs logged, unrepaired mismatches make the agent
/// not ready until they are gone.
fn self_check(datapath: &mut KernelDatapath, status: &crate::http::SharedStatus) {
    let health = datapath.verify();
    for r in &health.repaired {
        warn!("self-check repaired: {r}");
    }
    if let Ok(mut s) = status.lock() {
        if s.enforcement_problems != health.problems {
            for p in &health.problems {
                warn!("self-check: enforcement does not match (not ready): {p}");
            }
            if health.problems.is_empty() {
                info!("self-check: enforcement matches the agent's state again");
            }
        }
        s.enforcement_problems = health.problems;
        s.repairs = datapath.repairs().clone();
        s.update_ready();
    }
}

/// Reloads the policy directory after a change. `None`: the previous
/// policy stays — the change is invalid, or the source vanished or turned
/// empty (an unmounted volume, a dangling symlink) while it had policies.
fn reload_policies(
    config: &Config,
    previous: &PolicySet,
    status: &crate::http::SharedStatus,
) -> Option<PolicySet> {
    let revision = status.lock().map(|mut s| {
        s.policy_revision += 1;
        s.policy_revision
    });
    let revision = revision.unwrap_or_default();
    let dir = config.policy_dir.as_deref()?;
    let gone = if !dir.is_dir() {
        Some(format!(
            "the policy directory {} is missing or not a directory (a dangling symlink, an unmounted volume?)",
            dir.display()
        ))
    } else if let Err(e) = std::fs::read_dir(dir) {
        Some(format!(
            "the policy directory {} cannot be read: {e}",
            dir.display()
        ))
    } else {
        None
    };
    let result = match gone {
        Some(problem) => Err((problem, true)),
        None => match load_policies(config) {
            Ok(p) if p.files.is_empty() && !previous.files.is_empty() => Err((
                format!(
                    "the policy directory {} has no policy files any more (an empty or unmounted volume?)",
                    dir.display()
                ),
                true,
            )),
            Ok(p) => Ok(p),
            Err(e) => Err((e.to_string(), false)),
        },
    };
    let Ok(mut s) = status.lock() else {
        return result.ok();
    };
    match result {
        Ok(p) => {
            info!(
                policies = p.policies.len(),
                files = p.files.len(),
                "policy reloaded"
            );
            if s.policy_source_problem.take().is_some() {
                info!("the policy directory is back; its policy is applied");
            }
            s.last_error = None;
            s.policy_revision_loaded = revision;
            Some(p)
        }
        Err((problem, source)) => {
            if source {
                warn!(
                    "{problem}: the {} policies loaded before stay in force (to enforce no policy, leave a policy file without policies in it)",
                    previous.policies.len()
                );
                s.policy_source_problem = Some(problem.clone());
            } else {
                warn!("policy change rejected, the previous policy stays in force:\n{problem}");
            }
            s.apply_errors += 1;
            s.last_error = Some(problem);
            s.policy_revision_refused = revision;
            None
        }
    }
}

/// Rounds between two looks for sockets from outside the root.
const FOREIGN_SOCKET_ROUNDS: u64 = 10;

/// Looks for sockets the workloads use that were created outside the root
/// (no hook judges them): each new one is logged, all are in the status.
fn report_foreign_sockets(
    root: &std::path::Path,
    known: &BTreeMap<u64, Workload>,
    desired: &Desired,
    seen: &mut BTreeSet<crate::sockets::ForeignSocket>,
    status: &crate::http::SharedStatus,
) {
    let processes: Vec<(String, u32)> = known
        .values()
        .flat_map(|w| {
            let name = format!("{}/{}", w.namespace, w.name);
            crate::sockets::pids(&root.join(&w.cgroup_path))
                .into_iter()
                .map(move |pid| (name.clone(), pid))
        })
        .collect();
    let managed: BTreeSet<u64> = desired.cgroups.keys().copied().collect();
    let found: BTreeSet<_> = crate::sockets::find_foreign(&processes, &managed)
        .into_iter()
        .collect();
    for f in found.difference(seen) {
        warn!(
            workload = %crate::text::escape(&f.workload),
            pid = f.pid,
            socket_inode = f.inode,
            socket_cgroup = f.cgroup_id,
            protocol = f.protocol,
            "a workload uses a socket created outside the cgroup root: its traffic is not judged (close it, or create it inside the workload)"
        );
    }
    if let Ok(mut s) = status.lock() {
        s.foreign_sockets = found.iter().cloned().collect();
    }
    *seen = found;
}

/// Finds the workloads below `root` and their addresses. A cgroup below a
/// workload's is that workload (a process cannot leave its policy by making
/// a child cgroup); any other cgroup below the root, and the root itself,
/// is unmanaged (returned as held cgroups).
fn observe_workloads(
    root: &std::path::Path,
    classifier: &Classifier,
) -> anyhow::Result<(Vec<Workload>, BTreeMap<u64, u32>)> {
    let cgroups = discovery::scan(root)?;
    let mut held = BTreeMap::new();
    if let Ok(meta) = std::fs::metadata(root) {
        held.insert(
            std::os::unix::fs::MetadataExt::ino(&meta),
            reserved::UNMANAGED,
        );
    }
    let mut workloads: Vec<Workload> = Vec::new();
    // Sorted by path: an ancestor comes before its descendants.
    for cg in &cgroups {
        if let Some(mut w) = classifier.classify(cg) {
            (w.own_netns, w.ips) = discovery::workload_network(&root.join(&w.cgroup_path));
            workloads.push(w);
            continue;
        }
        let ancestor = workloads
            .iter()
            .filter(|w| {
                cg.rel_path
                    .strip_prefix(w.cgroup_path.as_str())
                    .is_some_and(|rest| rest.starts_with('/'))
            })
            .max_by_key(|w| w.cgroup_path.len())
            .cloned();
        match ancestor {
            Some(mut w) => {
                w.cgroup_id = cg.id;
                w.cgroup_path = cg.rel_path.clone();
                workloads.push(w);
            }
            None => {
                held.insert(cg.id, reserved::UNMANAGED);
            }
        }
    }
    Ok((workloads, held))
}

fn describe_ips(ips: &[IpAddr]) -> String {
    if ips.is_empty() {
        "no address yet".into()
    } else {
        ips.iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// Where workloads and policy come from.
#[derive(Clone, Debug)]
pub enum Mode {
    /// cgroup path rules and policy files from the config.
    Host,
    /// Pods, namespaces and policy objects from the Kubernetes API server.
    Kubernetes {
        /// A kubeconfig file; `None`: in-cluster (service account), else the default kubeconfig.
        kubeconfig: Option<PathBuf>,
        /// This node's name (`spec.nodeName` of its pods).
        node_name: String,
    },
}

enum Source {
    Host(Classifier),
    Kubernetes {
        cluster: Box<crate::kubernetes::Cluster>,
        node: String,
        waiting_logged: Option<Vec<&'static str>>,
    },
}

impl Source {
    /// Resolves when something the plan depends on may have changed before
    /// the next tick (a watch event); never in host mode.
    async fn changed(&self) {
        match self {
            Source::Kubernetes { cluster, .. } => cluster.changed.notified().await,
            Source::Host(_) => std::future::pending().await,
        }
    }
}

/// The cgroup root and the cgroup2 mount it lies in: configured, or in
/// Kubernetes mode kubelet's (`kubepods.slice` for the systemd cgroup driver,
/// `kubepods` for cgroupfs) under any cgroup2 mount.
fn cgroup_root(config: &Config, mode: &Mode) -> anyhow::Result<(PathBuf, PathBuf)> {
    let mounts = discovery::cgroup2_mounts()?;
    match (&config.cgroup_root, mode) {
        (Some(root), _) => {
            let mount = mounts
                .iter()
                .find(|m| root.is_absolute() && root.starts_with(m))
                .unwrap_or(&mounts[0]);
            Ok((discovery::resolve_root(mount, root)?, mount.clone()))
        }
        (None, Mode::Kubernetes { .. }) => mounts
            .iter()
            .flat_map(|m| ["kubepods.slice", "kubepods"].map(|d| (m.join(d), m.clone())))
            .find(|(p, _)| p.is_dir())
            .with_context(|| {
                format!(
                    "no kubepods.slice (kubelet's systemd cgroup driver) or kubepods (cgroupfs driver) under the cgroup2 mounts {}: mount the host's cgroup tree or set cgroupRoot in the config",
                    mounts.iter().map(|m| m.display().to_string()).collect::<Vec<_>>().join(", ")
                )
            }),
        (None, Mode::Host) => anyhow::bail!(
            "cgroupRoot is not set in the config: name the cgroup under which workloads live (or run with --kubernetes)"
        ),
    }
}

/// Runs the agent until SIGINT or SIGTERM.
pub async fn run(config: Config, mode: Mode) -> anyhow::Result<()> {
    let (root, mount) = cgroup_root(&config, &mode)?;
    if !root.is_dir() && matches!(mode, Mode::Host) && root.starts_with(&mount) {
        // On a plain host the root is Palisade's to name: an empty cgroup
        // whose workloads come later (e.g. systemd units with Slice=).
        std::fs::create_dir_all(&root)
            .with_context(|| format!("creating the cgroup root {}", root.display()))?;
        info!(root = %root.display(), "created the cgroup root (it did not exist); workloads go below it");
    }
    if !root.is_dir() {
        anyhow::bail!(
            "cgroup root {} does not exist: create it (mkdir) or fix cgroupRoot in the config",
            root.display()
        );
    }
    if root == mount {
        warn!(root = %root.display(), "cgroupRoot is the machine's root cgroup: every process on the host is subject to policy");
    }
    if let Some(dir) = config.policy_dir.as_deref().filter(|d| !d.is_dir()) {
        anyhow::bail!(
            "policyDir {} does not exist or is not a directory (a dangling symlink, an unmounted volume?): create it with the policy files, or fix policyDir in the config",
            dir.display()
        );
    }
    let mut file_policies = load_policies(&config)
        .map_err(|e| anyhow::anyhow!("{e}"))
        .context("policy is invalid; nothing was loaded")?;
    // The client is made (and its configuration checked) here; the
    // watchers connect only once the agent's own cgroup is exempt below.
    let client = match &mode {
        Mode::Host => None,
        Mode::Kubernetes { kubeconfig, .. } => {
            Some(crate::kubernetes::client(kubeconfig.as_deref()).await?)
        }
    };
    let classifier = match &mode {
        Mode::Host => Some(Classifier::new(&config.workloads).map_err(|m| anyhow::anyhow!(m))?),
        Mode::Kubernetes { .. } => None,
    };
    let own_cgroup = discovery::own_cgroup(&root, &mount);
    let mut policies = file_policies.clone();
    // Which (policy files, cluster policy objects) versions `policies` holds:
    // rebuilding a large set every round would cost as much as planning.
    let mut file_version: u64 = 0;
    let mut policies_version: Option<(u64, u64)> = None;
    let mut fingerprint = policy_fingerprint(&config.policy_dir);
    info!(
        files = policies.files.len(),
        policies = policies.policies.len(),
        "policy loaded"
    );

    let ring_bytes = config.maps.audit_ring_bytes;
    let pins = config
        .bpf_pin_dir
        .clone()
        .map(|dir| crate::datapath::kernel::Pins { dir });
    // One owner of the pinned state, before anything is adopted or replaced.
    let _pin_lock = match &pins {
        Some(p) => Some(p.lock()?),
        None => None,
    };
    crate::datapath::kernel::probe_kernel().context("probing the kernel")?;
    info!(kernel = %crate::datapath::kernel::kernel_release(), "kernel has what Palisade needs");
    let mut datapath = KernelDatapath::load(&root, &config.maps, ring_bytes / 8, pins.as_ref())
        .context("starting the datapath")?;
    for point in datapath.attach_points() {
        info!(attach = %point, "attached");
    }
    if let Some(own) = &own_cgroup {
        // Before any connection: the programs (adopted ones already) would
        // hold an unknown cgroup under the root, the agent's own among them.
        datapath
            .exempt(own.id, reserved::HOST)
            .context("exempting the agent's own cgroup")?;
        info!(cgroup = %own.rel_path, "the agent runs under the cgroup root (as a pod): its own traffic is the node's (reserved:host)");
    }
    let mut source = match (&mode, client, classifier) {
        (Mode::Kubernetes { node_name, .. }, Some(client), _) => {
            info!(node = %node_name, root = %root.display(), "Kubernetes mode: watching pods, namespaces, NetworkPolicies and Palisade policies");
            Source::Kubernetes {
                cluster: Box::new(crate::kubernetes::Cluster::start(client)),
                node: node_name.clone(),
                waiting_logged: None,
            }
        }
        (_, _, Some(classifier)) => Source::Host(classifier),
        _ => anyhow::bail!("internal: no workload source for this mode"),
    };
    for gap in &datapath.posture().gaps {
        warn!("protection missing: {gap}");
    }
    let sink = audit::Sink::open(&config.audit.output)
        .with_context(|| format!("opening audit output {}", config.audit.output))?;
    let snapshot: SharedSnapshot = Arc::new(RwLock::new(Arc::new(Snapshot::default())));
    let stats = Arc::new(AuditStats::default());
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    // The reader starts once the first state is applied, so that events the
    // kernel buffered while no agent ran are named with this agent's snapshot.
    let mut reader_parts = Some((datapath.take_audit_ring()?, sink, stop_rx));
    let mut reader = None;

    let status: crate::http::SharedStatus = Arc::default();
    if let Ok(mut s) = status.lock() {
        s.version = env!("CARGO_PKG_VERSION");
        s.attach_points = datapath.attach_points().to_vec();
        s.posture = datapath.posture().clone();
        s.policy_list = policy_list(&policies);
    }
    let (events_tx, _) = tokio::sync::broadcast::channel(4096);
    let control = match &config.control_socket {
        Some(path) => {
            let listener = crate::control::bind(path)
                .with_context(|| format!("binding controlSocket {}", path.display()))?;
            info!(socket = %path.display(), "control socket ready (root only)");
            Some(tokio::spawn(crate::control::serve(
                listener,
                crate::control::Context {
                    status: status.clone(),
                    events: events_tx.clone(),
                    policy_dir: config.policy_dir.clone(),
                },
            )))
        }
        None => None,
    };
    let http = match config.http_address {
        Some(addr) => {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding httpAddress {addr}"))?;
            info!(address = %addr, "serving /healthz, /readyz and /metrics");
            Some(tokio::spawn(crate::http::serve(listener, status.clone())))
        }
        None => None,
    };

    let interval = Duration::from_millis(config.rescan_interval_ms);
    let mut planner = Planner::new(config.clone(), matches!(mode, Mode::Kubernetes { .. }));
    if let Some(own) = &own_cgroup {
        planner.exempt(own.id);
    }
    let (adopted_cgroups, adopted_nets) = datapath.adopted_identities();
    planner.hint(adopted_cgroups, adopted_nets);
    let mut reconciler = crate::reconcile::Reconciler::default();
    let mut last_inputs: Option<(Inputs, (u64, u64))> = None;
    let mut steady = false;
    let mut known: BTreeMap<u64, Workload> = BTreeMap::new();
    // Sockets from outside the root, looked for every few seconds.
    let mut foreign_round: u64 = 0;
    let mut foreign_seen: BTreeSet<crate::sockets::ForeignSocket> = BTreeSet::new();
    let mut last_check = std::time::Instant::now();
    let adopted_entries = datapath.active_entries();
    // Pinned policy in force and an empty policy directory: an unmounted
    // volume looks like that. Keep what the kernel enforces until the
    // directory has policy files again.
    let mut held_for_source = config.policy_dir.is_some()
        && file_policies.files.is_empty()
        && datapath.active_entries() > 0;
    if held_for_source {
        let problem = format!(
            "the policy directory {} has no policy files, but the pinned state enforces {} policy entries: keeping them, not ready, until the directory has policy files (to enforce no policy, put a file without policies there)",
            config
                .policy_dir
                .as_deref()
                .unwrap_or(std::path::Path::new(""))
                .display(),
            datapath.active_entries()
        );
        warn!("{problem}");
        if let Ok(mut s) = status.lock() {
            s.policy_source_problem = Some(problem.clone());
            s.last_error = Some(problem);
            s.update_ready();
        }
    }
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => { info!("SIGINT: stopping"); break; }
            _ = sigterm.recv() => { info!("SIGTERM: stopping"); break; }
            _ = ticker.tick() => {}
            _ = source.changed() => {}
        }
        if last_check.elapsed() >= SELF_CHECK_EVERY {
            last_check = std::time::Instant::now();
            self_check(&mut datapath, &status);
        }
        let now = policy_fingerprint(&config.policy_dir);
        if now != fingerprint {
            fingerprint = now;
            if let Some(p) = reload_policies(&config, &file_policies, &status) {
                file_policies = p;
                file_version += 1;
                held_for_source = false;
            }
        }
        if held_for_source {
            continue;
        }
        let input = match &mut source {
            Source::Host(classifier) => {
                if policies_version != Some((file_version, 0)) {
                    policies = file_policies.clone();
                    policies_version = Some((file_version, 0));
                }
                match observe_workloads(&root, classifier) {
                    Ok((workloads, held)) => Inputs {
                        held,
                        services: crate::inventory::resolve_services(&config.services, &workloads),
                        nodes: Nodes {
                            local: crate::inventory::interface_addresses(),
                            remote: BTreeSet::new(),
                        },
                        workloads,
                        ..Inputs::default()
                    },
                    Err(e) => {
                        warn!("scanning {}: {e:#}", root.display());
                        continue;
                    }
                }
            }
            Source::Kubernetes {
                cluster,
                node,
                waiting_logged,
            } => {
                if !cluster.synced() {
                    // Until every kind is listed the kernel keeps what it has
                    // (adopted pins, or nothing): a partial view would drop
                    // or admit traffic by omission.
                    let waiting = cluster.waiting_for();
                    if waiting_logged.as_ref() != Some(&waiting) {
                        info!(waiting = %waiting.join(", "), "waiting for the first list from the API server");
                        *waiting_logged = Some(waiting);
                    }
                    continue;
                }
                let epoch = cluster.policy_epoch();
                if policies_version != Some((file_version, epoch)) {
                    let (cluster_policies, problems) = cluster.policies();
                    policies = PolicySet {
                        policies: file_policies
                            .policies
                            .iter()
                            .cloned()
                            .chain(cluster_policies)
                            .collect(),
                        files: file_policies.files.clone(),
                    };
                    policies_version = Some((file_version, epoch));
                    if let Ok(mut s) = status.lock() {
                        s.last_error = (!problems.is_empty()).then(|| problems.join("\n"));
                    }
                }
                let cgroups = match discovery::scan(&root) {
                    Ok(c) => c,
                    Err(e) => {
                        warn!("scanning {}: {e:#}", root.display());
                        continue;
                    }
                };
                let pods: Vec<crate::kubernetes::PodInfo> = cluster
                    .pods
                    .state()
                    .iter()
                    .filter_map(|p| crate::kubernetes::pod_info(p))
                    .collect();
                let mut input = crate::kubernetes::inputs(
                    node,
                    &pods,
                    &cluster.namespaces.state(),
                    &cgroups,
                    config.kubernetes.unknown_pods,
                );
                if let Ok(meta) = std::fs::metadata(&root) {
                    input.held.insert(
                        std::os::unix::fs::MetadataExt::ino(&meta),
                        reserved::UNMANAGED,
                    );
                }
                input.services = crate::kubernetes::services(
                    &cluster.services.state(),
                    &cluster.endpoint_slices.state(),
                );
                input.nodes = crate::kubernetes::nodes(node, &cluster.nodes.state());
                input
                    .nodes
                    .local
                    .extend(crate::inventory::interface_addresses());
                // Pods on the host network use the node's addresses.
                input.nodes.local.extend(
                    pods.iter()
                        .filter(|p| p.host_network && p.node.as_deref() == Some(node.as_str()))
                        .flat_map(|p| p.ips.iter().copied()),
                );
                input
            }
        };
        let refresh_counters = |datapath: &KernelDatapath| {
            if let Ok(mut s) = status.lock() {
                // Delivered first: every event delivered was emitted before
                // the counters are read, so one report never shows more
                // delivered than emitted.
                let delivered = stats.delivered.load(std::sync::atomic::Ordering::Acquire);
                if let Ok(c) = datapath.counters() {
                    s.counters = c;
                    s.events_delivered = delivered;
                }
                s.maps = datapath.fill();
            }
        };
        foreign_round += 1;
        if foreign_round % FOREIGN_SOCKET_ROUNDS == 1
            && let Some(desired) = reconciler.applied()
        {
            report_foreign_sockets(&root, &known, desired, &mut foreign_seen, &status);
        }
        // Planning is pure: the inputs of the last round again, after a round
        // whose plan changed nothing, give that plan again. Skipping it keeps
        // an idle agent with a large policy idle.
        let same_inputs = last_inputs
            .as_ref()
            .is_some_and(|(i, v)| *i == input && Some(*v) == policies_version);
        if same_inputs && steady && !planner.holding() {
            refresh_counters(&datapath);
            continue;
        }
        if !same_inputs {
            if let Ok(mut s) = status.lock() {
                s.policy_list = policy_list(&policies);
            }
            last_inputs = Some((input.clone(), policies_version.unwrap_or_default()));
        }
        let obs = planner.plan(input, &policies);
        refresh_counters(&datapath);
        let first = reconciler.applied().is_none();
        let outcome = reconciler.reconcile(&mut datapath, &obs.desired);
        steady = matches!(
            outcome,
            crate::reconcile::Outcome::Unchanged | crate::reconcile::Outcome::StillRefused
        );
        if let Ok(mut s) = status.lock() {
            match outcome {
                crate::reconcile::Outcome::Unchanged | crate::reconcile::Outcome::Applied(_) => {
                    s.policy_revision_applied = s.policy_revision_loaded;
                    s.behind = None;
                    s.update_ready();
                }
                crate::reconcile::Outcome::Refused(_) => {
                    s.policy_revision_refused = s.policy_revision_loaded;
                }
                _ => {}
            }
        }
        match outcome {
            crate::reconcile::Outcome::Unchanged | crate::reconcile::Outcome::StillRefused => {
                continue;
            }
            crate::reconcile::Outcome::Applied(report) => {
                let now_known: BTreeMap<u64, Workload> = obs
                    .workloads
                    .iter()
                    .map(|w| (w.cgroup_id, w.clone()))
                    .collect();
                for (id, w) in &now_known {
                    if known.get(id) != Some(w) {
                        info!(workload = %crate::text::escape(&format!("{}/{}", w.namespace, w.name)), cgroup = %crate::text::escape(&w.cgroup_path),
                              identity = obs.desired.cgroups.get(id).copied().unwrap_or_default(),
                              addresses = %describe_ips(&w.ips), "workload enforced");
                    }
                }
                for (id, w) in &known {
                    if !now_known.contains_key(id) {
                        info!(workload = %crate::text::escape(&format!("{}/{}", w.namespace, w.name)), "workload gone");
                    }
                }
                if let Some((ring, sink, stop_rx)) = reader_parts.take() {
                    if let Ok(mut guard) = snapshot.write() {
                        *guard = Arc::new(Snapshot {
                            identities: obs.identities.clone(),
                            workloads: now_known.clone(),
                            policy: obs.desired.policy.clone(),
                            services: obs.desired.services.clone(),
                        });
                    }
                    reader = Some(tokio::spawn(audit::run_reader(
                        ring,
                        snapshot.clone(),
                        sink,
                        stats.clone(),
                        events_tx.clone(),
                        stop_rx,
                    )));
                }
                if first {
                    info!(
                        workloads = now_known.len(),
                        identities = obs.identities.len(),
                        policies = policies.policies.len(),
                        entries = report.policy_entries,
                        "palisade is enforcing"
                    );
                }
                let snap = Snapshot {
                    identities: obs.identities.clone(),
                    workloads: now_known.clone(),
                    policy: obs.desired.policy.clone(),
                    services: obs.desired.services.clone(),
                };
                if let Ok(mut guard) = snapshot.write() {
                    *guard = Arc::new(snap);
                }
                if let Ok(mut s) = status.lock() {
                    s.applied = true;
                    s.last_error = None;
                    s.update_ready();
                    s.generation += 1;
                    s.workloads = now_known.len();
                    s.workload_list = now_known
                        .values()
                        .map(|w| crate::http::WorkloadStatus {
                            name: format!("{}/{}", w.namespace, w.name),
                            cgroup: w.cgroup_path.clone(),
                            identity: obs
                                .desired
                                .cgroups
                                .get(&w.cgroup_id)
                                .copied()
                                .unwrap_or_default(),
                            addresses: w.ips.iter().map(ToString::to_string).collect(),
                        })
                        .collect();
                    s.identities = obs.identities.len();
                    s.policies = policies.policies.len();
                    s.maps = datapath.fill();
                }
                known = now_known;
            }
            crate::reconcile::Outcome::Refused(e) if first => {
                warn!(
                    "the first state cannot be applied; not ready until it can ({}): {e}",
                    if adopted_entries > 0 {
                        "the adopted pinned tables stay in force"
                    } else {
                        "no policy is enforced"
                    }
                );
                if let Ok(mut s) = status.lock() {
                    s.apply_errors += 1;
                    s.last_error = Some(e.to_string());
                    s.update_ready();
                }
            }
            crate::reconcile::Outcome::Refused(e) => {
                warn!(
                    "applying the new state failed, the previous state stays in force (not ready until a state applies): {e}"
                );
                if let Ok(mut s) = status.lock() {
                    s.apply_errors += 1;
                    s.last_error = Some(e.to_string());
                    s.behind = Some(format!(
                        "the planned state was refused; the previous one stays in force: {e}"
                    ));
                    s.update_ready();
                }
            }
            crate::reconcile::Outcome::Partial(e) => {
                warn!("applying the new state failed part way; applying it again next round: {e}");
                if let Ok(mut s) = status.lock() {
                    s.apply_errors += 1;
                    s.last_error = Some(e.to_string());
                    s.behind = Some(format!(
                        "the kernel is part way to the planned state (retrying): {e}"
                    ));
                    s.update_ready();
                }
            }
        }
    }
    let _ = stop_tx.send(true);
    if let Some(reader) = reader {
        match reader.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => warn!("audit reader: {e:#}"),
            Err(e) => warn!("audit reader task: {e}"),
        }
    }
    if let Ok(c) = datapath.counters() {
        info!(
            egress_allow = c.egress_allow,
            egress_deny = c.egress_deny,
            ingress_allow = c.ingress_allow,
            ingress_deny = c.ingress_deny,
            events_emitted = c.events_emitted,
            events_lost = c.events_lost,
            events_delivered = stats.delivered.load(std::sync::atomic::Ordering::Relaxed),
            "final counters"
        );
    }
    if let Some(h) = http {
        h.abort();
    }
    if let Some(c) = control {
        c.abort();
        if let Some(path) = &config.control_socket {
            let _ = std::fs::remove_file(path);
        }
    }
    drop(datapath);
    match &pins {
        Some(p) => {
            info!(pins = %p.dir.display(), "stopped; the programs stay attached and enforcing (pinned): `palisade cleanup` removes them")
        }
        None => info!("programs detached; stopped"),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    use crate::datapath::fake::FakeDatapath;

    fn host(workloads: Vec<Workload>) -> Inputs {
        Inputs {
            workloads,
            ..Inputs::default()
        }
    }

    fn workload(cgroup_id: u64, app: &str) -> Workload {
        Workload {
            cgroup_id,
            cgroup_path: format!("prod/w{cgroup_id}"),
            namespace: "prod".into(),
            name: format!("w{cgroup_id}"),
            labels: [("app".to_owned(), app.to_owned())].into(),
            ips: vec![format!("10.1.0.{cgroup_id}").parse().unwrap()],
            ports: Vec::new(),
            own_netns: true,
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
            .unwrap(),
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
            remote: vec![old_owner],
            ..Inputs::default()
        };
        let first = planner.plan(with_old, &none);
        assert!(!planner.holding());
        let web = first.desired.cgroups[&8];
        // The old pod is gone; a new pod on this node has its address.
        let reused = || host(vec![workload(8, "api"), workload(7, "cache")]);
        let second = planner.plan(reused(), &none);
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
}
