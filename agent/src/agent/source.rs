//! Where the agent's facts come from: a [`Source`] turns the host (cgroups
//! and workload rules from the config) or the Kubernetes API server (pods,
//! namespaces, Services, nodes, policy objects) into the domain model
//! ([`Inputs`]) the planner reads, and says when something changed.
use std::{
    collections::{BTreeMap, BTreeSet},
    future::Future,
    path::{Path, PathBuf},
};

use kube::{ResourceExt as _, runtime::reflector::ObjectRef};
use palisade_common::identity as reserved;

use crate::{
    cgroupwatch::CgroupWatch,
    config::Config,
    discovery::{self, Classifier},
    inventory::{Changes, Inputs, Nodes, Service, Workload},
    kubernetes::{
        Cluster,
        endpoints::ServiceIndex,
        pods::{PodChanges, PodIndex},
    },
    policy::model::Policy,
};

/// One look at a source.
#[derive(Debug)]
pub enum Observed {
    Ready(Inputs),
    /// Not everything is listed yet (the API server's kinds named): the
    /// kernel keeps what it has, because a partial view would drop or admit
    /// traffic by omission.
    Waiting(Vec<&'static str>),
    /// The look failed (a cgroup scan); tried again on the next round.
    Failed(String),
}

pub trait Source {
    /// The workloads, peers and nodes now; remote workloads and Services as
    /// what changed since the last `Ready` (each `Ready` must be planned).
    fn observe(&mut self) -> Observed;
    /// Changes whenever the source's own policy objects change (0: none).
    fn policy_epoch(&self) -> u64 {
        0
    }
    /// The source's own policies (cluster objects) and the problems of
    /// those that were refused.
    fn policies(&self) -> (Vec<Policy>, Vec<String>) {
        (Vec::new(), Vec::new())
    }
    /// Resolves when something may have changed before the next tick (a
    /// watch event); never for a source that can only be looked at.
    fn changed(&self) -> impl Future<Output = ()> + Send;
    /// Why what the source shows may be out of date (the API server lost);
    /// `None` while it is current.
    fn view_problem(&self) -> Option<String> {
        None
    }
}

/// The cgroup root's own cgroup, unmanaged (its processes are the node's).
fn hold_root(root: &Path, held: &mut BTreeMap<u64, u32>) {
    if let Ok(meta) = std::fs::metadata(root) {
        held.insert(
            std::os::unix::fs::MetadataExt::ino(&meta),
            reserved::UNMANAGED,
        );
    }
}

/// A plain host: workloads are cgroups matched by the config's rules,
/// Services and peers come from the config.
pub struct HostSource {
    pub root: PathBuf,
    pub classifier: Classifier,
    pub config: Config,
    /// Workloads' addresses, by network namespace (netlink, re-read on change).
    pub addresses: crate::netlink::AddressBook,
    /// The node's addresses (netlink, re-read on change).
    pub node_addresses: crate::netlink::NodeAddresses,
    /// Wakes the loop when a cgroup is made or removed, or its first
    /// process joins (`None`: rescans only).
    pub watch: Option<CgroupWatch>,
    /// Wakes the loop when a workload's or the node's addresses change
    /// (the sockets of `addresses` and `node_addresses` are in it).
    pub address_wakeup: Option<crate::netlink::AddressWakeup>,
    /// The configured Services as last sent.
    pub sent_services: BTreeMap<String, Service>,
}

/// Resolves when the cgroup tree or a watched address changes; never
/// without either (the rescan interval then finds changes).
async fn cgroups_or_addresses(
    watch: Option<&CgroupWatch>,
    addresses: Option<&crate::netlink::AddressWakeup>,
) {
    let cgroups = async {
        match watch {
            Some(w) => w.changed().await,
            None => std::future::pending().await,
        }
    };
    let addresses = async {
        match addresses {
            Some(a) => a.changed().await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        () = cgroups => {}
        () = addresses => {}
    }
}

impl Source for HostSource {
    fn observe(&mut self) -> Observed {
        let found = observe_workloads(
            &self.root,
            &self.classifier,
            &mut self.addresses,
            self.watch.as_mut(),
        );
        self.addresses.end_round();
        match found {
            Ok((workloads, held)) => Observed::Ready(Inputs {
                held,
                services: Changes::between(
                    &mut self.sent_services,
                    crate::inventory::resolve_services(&self.config.services, &workloads),
                ),
                nodes: Nodes {
                    local: self.node_addresses.get(),
                    remote: BTreeSet::new(),
                },
                workloads,
                ..Inputs::default()
            }),
            Err(e) => Observed::Failed(format!("scanning {}: {e:#}", self.root.display())),
        }
    }

    async fn changed(&self) {
        cgroups_or_addresses(self.watch.as_ref(), self.address_wakeup.as_ref()).await;
    }
}

/// Finds the workloads below `root` and their addresses. A cgroup below a
/// workload's is that workload (a process cannot leave its policy by making
/// a child cgroup); any other cgroup below the root, and the root itself,
/// is unmanaged (returned as held cgroups).
fn observe_workloads(
    root: &Path,
    classifier: &Classifier,
    addresses: &mut crate::netlink::AddressBook,
    watch: Option<&mut CgroupWatch>,
) -> anyhow::Result<(Vec<Workload>, BTreeMap<u64, u32>)> {
    let cgroups = discovery::scan(root)?;
    if let Some(w) = watch {
        w.sync(root, cgroups.iter().map(|c| c.rel_path.as_str()));
    }
    let mut held = BTreeMap::new();
    hold_root(root, &mut held);
    let mut workloads: Vec<Workload> = Vec::new();
    // Sorted by path: an ancestor comes before its descendants.
    for cg in &cgroups {
        if let Some(mut w) = classifier.classify(cg) {
            (w.own_netns, w.ips) =
                discovery::workload_network(&root.join(&w.cgroup_path), addresses);
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

/// A Kubernetes node: pods (this node's by cgroup, others' by address),
/// namespaces, Services with their EndpointSlices, nodes and policy objects
/// from the API server's watches.
pub struct KubernetesSource {
    pub cluster: Box<Cluster>,
    pub node: String,
    pub root: PathBuf,
    pub config: Config,
    /// Wakes the loop when a pod's cgroup appears (kubelet makes it after
    /// the API server has the pod).
    pub watch: Option<CgroupWatch>,
    /// The node's addresses (netlink, re-read on change).
    pub node_addresses: crate::netlink::NodeAddresses,
    /// Wakes the loop when the node's addresses change.
    pub address_wakeup: Option<crate::netlink::AddressWakeup>,
    /// The pods and Services as last sent; a round sends the planner what
    /// changed.
    pub pods: PodIndex,
    pub services: ServiceIndex,
}

impl Source for KubernetesSource {
    fn observe(&mut self) -> Observed {
        if !self.cluster.synced() {
            return Observed::Waiting(self.cluster.waiting_for());
        }
        let cgroups = match discovery::scan(&self.root) {
            Ok(c) => c,
            Err(e) => return Observed::Failed(format!("scanning {}: {e:#}", self.root.display())),
        };
        if let Some(w) = self.watch.as_mut() {
            w.sync(&self.root, cgroups.iter().map(|c| c.rel_path.as_str()));
        }
        let changed = self.cluster.take_pod_changes();
        let pods = if changed.relisted || !self.pods.started() {
            PodChanges::All(
                self.cluster
                    .pods
                    .state()
                    .iter()
                    .filter_map(|p| crate::kubernetes::pod_info(p))
                    .collect(),
            )
        } else {
            PodChanges::Some(
                changed
                    .keys
                    .into_iter()
                    .map(|(ns, name)| {
                        let object = self.cluster.pods.get(&ObjectRef::new(&name).within(&ns));
                        let pod = object.and_then(|p| crate::kubernetes::pod_info(&p));
                        (format!("{ns}/{name}"), pod)
                    })
                    .collect(),
            )
        };
        let mut input = self.pods.update(
            &self.node,
            pods,
            &cgroups,
            self.config.kubernetes.unknown_pods,
        );
        input.namespaces = self
            .cluster
            .namespaces
            .state()
            .iter()
            .map(|n| (n.name_any(), n.labels().clone()))
            .collect();
        hold_root(&self.root, &mut input.held);
        let (services_changed, slices_changed) = self.cluster.take_service_changes();
        input.services = self.services.update(
            services_changed,
            slices_changed,
            &self.cluster.services,
            &self.cluster.endpoint_slices,
        );
        input.nodes = crate::kubernetes::nodes(&self.node, &self.cluster.nodes.state());
        input.nodes.local.extend(self.node_addresses.get());
        // Pods on the host network use the node's addresses.
        input.nodes.local.extend(self.pods.host_network_ips());
        Observed::Ready(input)
    }

    fn policy_epoch(&self) -> u64 {
        self.cluster.policy_epoch()
    }

    fn policies(&self) -> (Vec<Policy>, Vec<String>) {
        self.cluster.policies()
    }

    fn view_problem(&self) -> Option<String> {
        self.cluster.view_problem()
    }

    async fn changed(&self) {
        tokio::select! {
            () = self.cluster.changed.notified() => {}
            () = cgroups_or_addresses(self.watch.as_ref(), self.address_wakeup.as_ref()) => {}
        }
    }
}
