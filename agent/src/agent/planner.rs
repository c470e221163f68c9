//! The planner: from the domain model ([`Inputs`]) and the policies to the
//! complete desired kernel state ([`Desired`]), as plain data. Pure apart
//! from its memory of the last plan (identity numbers, identities kept one
//! more round, recently reused addresses).
use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use ipnet::IpNet;
use palisade_common::identity as reserved;
use tracing::info;

use crate::{
    config::{Config, HostTraffic, NamedPortConfig},
    datapath::{Desired, ServiceBackends, ServiceFrontend, ServiceInfo, ServiceTable},
    identity::{Allocator, LabelKey, display_name},
    inventory::{Inputs, Nodes, RemoteWorkload, Service, UnknownPods, Workload},
    policy::{
        self, PolicySet,
        compile::{IdentityInfo, IdentityKind},
        labels::Labels,
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
    /// Remembers each policy's compiled part while the world is unchanged.
    compiler: policy::Compiler,
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
            compiler: policy::Compiler::default(),
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
        let mut plan = Draft::default();
        self.add_local(&mut plan, &workloads, &held);
        self.add_remote(&mut plan, &remote);
        self.add_peers(&mut plan);
        // The node: its addresses (and loopback, for workloads in its
        // namespace) are `reserved:host`, other nodes' `reserved:remote-node`.
        for id in [reserved::HOST, reserved::REMOTE_NODE, reserved::BROADCAST] {
            plan.identities
                .entry(id)
                .or_insert_with(|| reserved_info(id));
        }
        plan.addresses
            .extend(node_addresses(&nodes, &self.config.host_addresses));
        // Identities the kernel may still resolve for a cgroup this round.
        for id in self.previous_cgroups.values() {
            if !plan.identities.contains_key(id)
                && let Some(info) = self.previous.get(id)
            {
                plan.identities.insert(*id, info.clone());
            }
        }
        self.hold_reused_addresses(&workloads, &mut plan.cgroups, &plan.addresses);
        if self.holding() {
            plan.identities
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
        let desired = self.finish(
            plan,
            namespaces,
            policies,
            &services_input,
            &nodes,
            &workloads,
        );
        let in_use: BTreeSet<u32> = self.previous.keys().copied().collect();
        self.allocator.release_unused(&in_use);
        Observation {
            workloads,
            identities: self.previous.clone(),
            desired,
        }
    }

    /// Local workloads: an identity per (namespace, labels), their cgroups,
    /// own addresses and addresses; held cgroups and the agent's own.
    fn add_local(&mut self, plan: &mut Draft, workloads: &[Workload], held: &BTreeMap<u64, u32>) {
        for w in workloads {
            let hint = self.hints_by_cgroup.get(&w.cgroup_id).copied();
            let id = self.workload_identity(plan, &w.namespace, &w.labels, &w.name, &w.ports, hint);
            plan.cgroups.insert(w.cgroup_id, id);
            plan.own_addresses
                .extend(w.ips.iter().map(|ip| (w.cgroup_id, *ip)));
            if w.own_netns {
                // Marks loopback as the workload's own (see `LOOPBACK_MARK`).
                plan.own_addresses
                    .insert((w.cgroup_id, IpAddr::from(palisade_common::LOOPBACK_MARK)));
            }
            plan.addresses
                .extend(w.ips.iter().map(|ip| (IpNet::from(*ip), id)));
        }
        for (cgroup, id) in held {
            plan.cgroups.insert(*cgroup, *id);
            plan.identities
                .entry(*id)
                .or_insert_with(|| reserved_info(*id));
        }
        if let Some(own) = self.own_cgroup {
            plan.cgroups.insert(own, reserved::HOST);
            plan.identities
                .entry(reserved::HOST)
                .or_insert_with(|| reserved_info(reserved::HOST));
        }
    }

    /// Workloads on other nodes, known by address.
    fn add_remote(&mut self, plan: &mut Draft, remote: &[RemoteWorkload]) {
        for r in remote {
            let hint = r
                .ips
                .first()
                .and_then(|ip| self.hints_by_net.get(&IpNet::from(*ip)).copied());
            let id = self.workload_identity(plan, &r.namespace, &r.labels, &r.name, &r.ports, hint);
            plan.addresses
                .extend(r.ips.iter().map(|ip| (IpNet::from(*ip), id)));
        }
    }

    /// The identity of a workload's (namespace, labels), with its named ports.
    fn workload_identity(
        &mut self,
        plan: &mut Draft,
        namespace: &str,
        labels: &Labels,
        name: &str,
        ports: &[NamedPortConfig],
        hint: Option<u32>,
    ) -> u32 {
        let key = LabelKey {
            namespace: Some(namespace.to_owned()),
            labels: labels.clone(),
        };
        let id = self.allocator.get_or_allocate_hinted(&key, hint);
        let td = &self.config.trust_domain;
        let info = plan.identities.entry(id).or_insert_with(|| IdentityInfo {
            id,
            name: display_name(td, &key, name),
            namespace: key.namespace.clone(),
            labels: key.labels.clone(),
            kind: IdentityKind::Workload,
            named_ports: BTreeMap::new(),
        });
        for (k, port) in ports.iter().filter_map(|p| p.key()) {
            info.named_ports.entry(k).or_insert(port);
        }
        id
    }

    /// Configured peers (address blocks with a name and labels).
    fn add_peers(&mut self, plan: &mut Draft) {
        let td = self.config.trust_domain.clone();
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
            plan.identities.entry(id).or_insert_with(|| IdentityInfo {
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
            plan.addresses
                .extend(p.cidrs.iter().map(|c| (c.trunc(), id)));
        }
    }

    /// Compiles the policies over the identities and builds the tables;
    /// remembers this plan's identities and cgroups for the next one.
    fn finish(
        &mut self,
        plan: Draft,
        namespaces: BTreeMap<String, Labels>,
        policies: &PolicySet,
        services_input: &[Service],
        nodes: &Nodes,
        workloads: &[Workload],
    ) -> Desired {
        let Draft {
            identities,
            cgroups,
            mut own_addresses,
            addresses,
        } = plan;
        // Cgroups not classified yet are `reserved:pending` in the kernel
        // (an entry missing from the cgroup map reads as pending), held
        // whether or not any is known now.
        let world = policy::World {
            identities: identities.values().cloned().collect(),
            namespaces,
            addresses: addresses.clone(),
            pending_held: self.unknown.held_directions().to_vec(),
            pending_rule: "kubernetes.unknownPods",
        };
        let compiled = self.compiler.compile(&policies.policies, &world);
        let mut ipcache = BTreeMap::new();
        // Broadcast and multicast first, outside the compiler's view of
        // addresses: no CIDR rule covers them by accident (`0.0.0.0/0`
        // does not mean "every pod on the link"); a rule naming exactly
        // such a block replaces the entry, `reserved:broadcast` names them all.
        ipcache.extend(broadcast_blocks().map(|net| (net, reserved::BROADCAST)));
        ipcache.extend(compiled.cidr_identities.iter().copied());
        ipcache.extend(addresses);
        let services = service_table(services_input, nodes, &self.config.host_addresses, &ipcache);
        own_addresses.extend(own_services(services_input, workloads));
        self.previous = identities;
        self.previous_cgroups = cgroups.clone();
        Desired {
            cgroups,
            ipcache,
            own_addresses,
            policy: Arc::new(compiled),
            services: Arc::new(services),
            host_always_allowed: self.host_traffic == HostTraffic::Allow,
        }
    }
}

/// A plan being put together: identities with their info, cgroup →
/// identity, each workload's own addresses, address block → identity.
#[derive(Default)]
struct Draft {
    identities: BTreeMap<u32, IdentityInfo>,
    cgroups: BTreeMap<u64, u32>,
    own_addresses: BTreeSet<(u64, IpAddr)>,
    addresses: Vec<(IpNet, u32)>,
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

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::{
        agent::tests::workload,
        datapath::{Datapath, fake::FakeDatapath},
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
