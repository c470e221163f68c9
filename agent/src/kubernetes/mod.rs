//! Kubernetes mode: pods, namespaces, NetworkPolicies and Palisade's policy
//! custom resources from the API server, turned into the same planner inputs
//! as the host mode's cgroup rules and policy files.
//!
//! - [`Cluster`] runs one kube-rs watcher per kind (list, then watch from the
//!   list's resourceVersion; a 410 Gone or a broken stream re-lists, with
//!   exponential backoff) into reflector stores, and records which pods,
//!   Services and EndpointSlices changed. The agent's loop reads the stores
//!   each round; pods go through a [`pods::PodIndex`] and Services through
//!   an [`endpoints::ServiceIndex`], which send the planner only what
//!   changed (everything again after a re-list).
//! - [`inputs`] maps local cgroups to pods ([`cgroup`]), and every other pod's
//!   addresses to its identity (the ipcache), and [`services`] reads Services
//!   with their slices, from the whole lists — what the indexes must equal;
//!   [`Cluster::policies`] validates each policy object with the same code
//!   as a policy file.
//! - [`crd`] holds the CustomResourceDefinitions, generated from Rust types.
pub mod cgroup;
pub mod crd;
pub mod endpoints;
pub mod pods;

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
    path::Path,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
};

use futures::TryStreamExt as _;
use k8s_openapi::api::{
    core::v1::{Namespace, Node, Pod, Service as KubeService},
    discovery::v1::EndpointSlice,
    networking::v1::NetworkPolicy,
};
use kube::{
    Api, Client, Resource, ResourceExt as _,
    runtime::{
        WatchStreamExt as _,
        reflector::{self, Store},
        watcher,
    },
};
use palisade_common::identity as reserved;
use tracing::{info, warn};

use crate::{
    config::NamedPortConfig,
    discovery::Cgroup,
    inventory::{
        Endpoint, Inputs, Nodes, RemoteWorkload, Service, ServicePort, UnknownPods, Workload,
    },
    policy::{
        api::{ClusterPalisadePolicy, PalisadePolicy},
        labels::Labels,
        load::{self, PolicyObject},
        model::{Policy, Protocol},
    },
};

/// The label that carries a pod's service account in its identity (the name
/// `display_name` builds `spiffe://…/sa/<sa>` from).
pub const SERVICE_ACCOUNT_LABEL: &str = "io.kubernetes.pod.serviceaccount";

#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    #[error("reading kubeconfig {path}: {message}")]
    Kubeconfig { path: String, message: String },
    #[error(
        "no Kubernetes API configuration: not running in a pod (KUBERNETES_SERVICE_HOST unset) and no kubeconfig ({message}); pass --kubeconfig"
    )]
    NoConfig { message: String },
    #[error("creating the Kubernetes client: {0}")]
    Client(#[from] kube::Error),
}

/// Connects with a kubeconfig file, or in-cluster (service account token and
/// `KUBERNETES_SERVICE_HOST`), or the default kubeconfig, in that order.
pub async fn client(kubeconfig: Option<&Path>) -> Result<Client, KubeError> {
    let config = match kubeconfig {
        Some(path) => {
            let kc =
                kube::config::Kubeconfig::read_from(path).map_err(|e| KubeError::Kubeconfig {
                    path: path.display().to_string(),
                    message: e.to_string(),
                })?;
            kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
                .await
                .map_err(|e| KubeError::Kubeconfig {
                    path: path.display().to_string(),
                    message: e.to_string(),
                })?
        }
        None => kube::Config::infer()
            .await
            .map_err(|e| KubeError::NoConfig {
                message: e.to_string(),
            })?,
    };
    Ok(Client::try_from(config)?)
}

/// Kinds watched, in [`Cluster::synced`] order.
pub const KINDS: [&str; 8] = [
    "pods",
    "namespaces",
    "networkpolicies.networking.k8s.io",
    "palisadepolicies.palisade.dev",
    "clusterpalisadepolicies.palisade.dev",
    "services",
    "endpointslices.discovery.k8s.io",
    "nodes",
];
const KIND_COUNT: usize = KINDS.len();

/// The agent's view of the cluster: one reflector store per kind.
pub struct Cluster {
    pub pods: Store<Pod>,
    pub namespaces: Store<Namespace>,
    pub network_policies: Store<NetworkPolicy>,
    pub palisade_policies: Store<PalisadePolicy>,
    pub cluster_palisade_policies: Store<ClusterPalisadePolicy>,
    pub services: Store<KubeService>,
    pub endpoint_slices: Store<EndpointSlice>,
    pub nodes: Store<Node>,
    synced: Arc<[AtomicBool; KIND_COUNT]>,
    /// Woken on every watch event, so a change is planned at once.
    pub changed: Arc<tokio::sync::Notify>,
    /// Watch errors (each followed by a backoff and a retry).
    pub errors: Arc<AtomicU64>,
    /// When the API server last answered (a watch event, or the periodic
    /// `/version` probe).
    contact: Contact,
    /// Bumped on every event of a policy kind: "did the policy objects change?".
    policy_epoch: Arc<AtomicU64>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    parsed: Mutex<ParseCache>,
    /// Pods, Services and EndpointSlices changed since the agent last
    /// looked (see [`pods::PodIndex`], [`endpoints::ServiceIndex`]).
    pod_changes: Arc<Mutex<Changed>>,
    service_changes: Arc<Mutex<Changed>>,
    slice_changes: Arc<Mutex<Changed>>,
}

/// Origin → (resourceVersion, what validating that version gave).
type ParseCache = HashMap<String, (String, Result<Policy, String>)>;

impl Drop for Cluster {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// When the API server last answered: milliseconds since the agent's start,
/// written by every watch task and the probe, read by the loop.
#[derive(Clone)]
pub struct Contact {
    start: std::time::Instant,
    last_ms: Arc<AtomicU64>,
}

impl Contact {
    fn new() -> Contact {
        Contact {
            start: std::time::Instant::now(),
            last_ms: Arc::new(AtomicU64::new(0)),
        }
    }

    fn touch(&self) {
        let ms = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.fetch_max(ms, Ordering::Relaxed);
    }

    /// Time since the API server last answered.
    pub fn silent_for(&self) -> std::time::Duration {
        self.start
            .elapsed()
            .saturating_sub(std::time::Duration::from_millis(
                self.last_ms.load(Ordering::Relaxed),
            ))
    }
}

/// How often the API server is asked for its version while the watches are
/// quiet (a quiet watch says nothing about a dead server).
const CONTACT_PROBE_EVERY: std::time::Duration = std::time::Duration::from_secs(2);

/// Silence after which the cluster view is reported stale.
pub const STALE_AFTER: std::time::Duration = std::time::Duration::from_secs(10);

/// Asks the API server for its version every [`CONTACT_PROBE_EVERY`].
fn probe_contact(client: Client, contact: Contact) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut ticker = tokio::time::interval(CONTACT_PROBE_EVERY);
        loop {
            ticker.tick().await;
            if let Ok(Ok(_)) =
                tokio::time::timeout(CONTACT_PROBE_EVERY, client.apiserver_version()).await
            {
                contact.touch();
            }
        }
    })
}

/// Objects of a kind that changed since the agent last looked.
#[derive(Debug, Default)]
pub struct Changed {
    /// The kind was listed again: the store holds a new whole list.
    pub relisted: bool,
    /// (namespace, name) of objects added, modified or deleted.
    pub keys: std::collections::HashSet<(String, String)>,
}

fn take(changed: &Mutex<Changed>) -> Changed {
    let mut changed = match changed.lock() {
        Ok(c) => c,
        Err(poisoned) => poisoned.into_inner(),
    };
    std::mem::take(&mut *changed)
}

/// Runs `api`'s watcher into a reflector store until the task is aborted;
/// `record` collects which objects changed.
fn follow<K>(
    api: Api<K>,
    strip: fn(&mut K),
    index: usize,
    synced: Arc<[AtomicBool; KIND_COUNT]>,
    changed: Arc<tokio::sync::Notify>,
    counters: (Arc<AtomicU64>, Option<Arc<AtomicU64>>, Contact),
    record: Option<Arc<Mutex<Changed>>>,
) -> (Store<K>, tokio::task::JoinHandle<()>)
where
    K: Resource + Clone + std::fmt::Debug + serde::de::DeserializeOwned + Send + Sync + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone,
{
    let (reader, writer) = reflector::store();
    let stream = watcher(api, watcher::Config::default())
        .default_backoff()
        .modify(strip)
        .reflect(writer);
    let (errors, epoch, contact) = counters;
    let task = tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        loop {
            match stream.try_next().await {
                Ok(Some(event)) => {
                    // `Init` comes before the list request is made (every
                    // retry after a failure starts with one): it says
                    // nothing about the API server answering.
                    if !matches!(event, watcher::Event::Init) {
                        contact.touch();
                    }
                    if matches!(event, watcher::Event::InitDone)
                        && !synced[index].swap(true, Ordering::SeqCst)
                    {
                        info!(kind = KINDS[index], "listed");
                    }
                    if let Some(epoch) = &epoch {
                        epoch.fetch_add(1, Ordering::SeqCst);
                    }
                    if let Some(record) = &record {
                        let mut changed = match record.lock() {
                            Ok(c) => c,
                            Err(poisoned) => poisoned.into_inner(),
                        };
                        match &event {
                            watcher::Event::Apply(o) | watcher::Event::Delete(o) => {
                                changed
                                    .keys
                                    .insert((o.namespace().unwrap_or_default(), o.name_any()));
                            }
                            // The store now holds the new list as a whole.
                            watcher::Event::InitDone => changed.relisted = true,
                            watcher::Event::Init | watcher::Event::InitApply(_) => {}
                        }
                    }
                    changed.notify_one();
                }
                Ok(None) => break,
                // The history the watch resumed from is compacted: the
                // watcher re-lists by itself. Routine, not a failure.
                Err(watcher::Error::WatchError(status)) if status.code == 410 => {
                    info!(
                        kind = KINDS[index],
                        "resource version expired (410 Gone): listing again"
                    );
                }
                Err(e) => {
                    errors.fetch_add(1, Ordering::Relaxed);
                    warn!(
                        kind = KINDS[index],
                        "watch failed, retrying with backoff: {e}"
                    );
                }
            }
        }
    });
    (reader, task)
}

/// Keeps of a Pod only what [`pod_info`] reads — at 50,000 pods the rest
/// (containers' images, env, probes and resources, volumes, conditions,
/// tolerations, owner references) is most of the agent's memory.
pub fn slim_pod(pod: &mut Pod) {
    use k8s_openapi::api::core::v1::{Container, PodSpec, PodStatus};
    let meta = &mut pod.metadata;
    meta.managed_fields = None;
    meta.annotations = None;
    meta.owner_references = None;
    meta.finalizers = None;
    meta.generate_name = None;
    if let Some(spec) = pod.spec.take() {
        pod.spec = Some(PodSpec {
            containers: spec
                .containers
                .into_iter()
                .filter(|c| c.ports.as_ref().is_some_and(|p| !p.is_empty()))
                .map(|c| Container {
                    name: c.name,
                    ports: c.ports,
                    ..Container::default()
                })
                .collect(),
            service_account_name: spec.service_account_name,
            node_name: spec.node_name,
            host_network: spec.host_network,
            ..PodSpec::default()
        });
    }
    if let Some(status) = pod.status.take() {
        pod.status = Some(PodStatus {
            phase: status.phase,
            pod_ip: status.pod_ip,
            pod_ips: status.pod_ips,
            ..PodStatus::default()
        });
    }
}

fn strip_meta(meta: &mut k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) {
    meta.managed_fields = None;
    meta.annotations = None;
}

impl Cluster {
    /// Starts the watchers. The stores fill in the background; [`synced`]
    /// says when every kind has been listed once.
    ///
    /// Pods are watched cluster-wide once: the local node's pods name local
    /// cgroups, every pod's addresses feed the ipcache. (A second watch
    /// restricted by `spec.nodeName` would carry the local pods twice.)
    pub fn start(client: Client) -> Cluster {
        let synced: Arc<[AtomicBool; KIND_COUNT]> = Arc::new(Default::default());
        let changed = Arc::new(tokio::sync::Notify::new());
        let errors = Arc::new(AtomicU64::new(0));
        let policy_epoch = Arc::new(AtomicU64::new(0));
        let mut tasks = Vec::new();
        let pod_changes = Arc::new(Mutex::new(Changed::default()));
        let service_changes = Arc::new(Mutex::new(Changed::default()));
        let slice_changes = Arc::new(Mutex::new(Changed::default()));
        let (s, c) = (&synced, &changed);
        let contact = Contact::new();
        let plain = || (errors.clone(), None, contact.clone());
        let policy = || (errors.clone(), Some(policy_epoch.clone()), contact.clone());
        let (pods, t) = follow(
            Api::<Pod>::all(client.clone()),
            slim_pod,
            0,
            s.clone(),
            c.clone(),
            plain(),
            Some(pod_changes.clone()),
        );
        tasks.push(t);
        let (namespaces, t) = follow(
            Api::<Namespace>::all(client.clone()),
            |n| strip_meta(&mut n.metadata),
            1,
            s.clone(),
            c.clone(),
            plain(),
            None,
        );
        tasks.push(t);
        let (network_policies, t) = follow(
            Api::<NetworkPolicy>::all(client.clone()),
            |n| n.metadata.managed_fields = None,
            2,
            s.clone(),
            c.clone(),
            policy(),
            None,
        );
        tasks.push(t);
        let (palisade_policies, t) = follow(
            Api::<PalisadePolicy>::all(client.clone()),
            |n| n.metadata.managed_fields = None,
            3,
            s.clone(),
            c.clone(),
            policy(),
            None,
        );
        tasks.push(t);
        let (cluster_palisade_policies, t) = follow(
            Api::<ClusterPalisadePolicy>::all(client.clone()),
            |n| n.metadata.managed_fields = None,
            4,
            s.clone(),
            c.clone(),
            policy(),
            None,
        );
        tasks.push(t);
        let (services, t) = follow(
            Api::<KubeService>::all(client.clone()),
            |n| strip_meta(&mut n.metadata),
            5,
            s.clone(),
            c.clone(),
            plain(),
            Some(service_changes.clone()),
        );
        tasks.push(t);
        let (endpoint_slices, t) = follow(
            Api::<EndpointSlice>::all(client.clone()),
            |n| strip_meta(&mut n.metadata),
            6,
            s.clone(),
            c.clone(),
            plain(),
            Some(slice_changes.clone()),
        );
        tasks.push(t);
        let (nodes, t) = follow(
            Api::<Node>::all(client.clone()),
            |n| {
                strip_meta(&mut n.metadata);
                // Only the addresses are read.
                if let Some(status) = n.status.as_mut() {
                    status.images = None;
                    status.conditions = None;
                    status.volumes_attached = None;
                    status.volumes_in_use = None;
                }
            },
            7,
            s.clone(),
            c.clone(),
            plain(),
            None,
        );
        tasks.push(t);
        tasks.push(probe_contact(client, contact.clone()));
        Cluster {
            pods,
            namespaces,
            network_policies,
            palisade_policies,
            cluster_palisade_policies,
            services,
            endpoint_slices,
            nodes,
            synced,
            changed,
            errors,
            contact,
            policy_epoch,
            tasks,
            parsed: Mutex::new(HashMap::new()),
            pod_changes,
            service_changes,
            slice_changes,
        }
    }

    /// The pods that changed since the last call (and whether the pods
    /// were listed again meanwhile).
    pub fn take_pod_changes(&self) -> Changed {
        take(&self.pod_changes)
    }

    /// The Services and the EndpointSlices that changed since the last call.
    pub fn take_service_changes(&self) -> (Changed, Changed) {
        (take(&self.service_changes), take(&self.slice_changes))
    }

    /// Every kind listed at least once. Until then the agent does not touch
    /// the kernel: a partial view would deny (or allow) by omission.
    pub fn synced(&self) -> bool {
        self.synced.iter().all(|s| s.load(Ordering::SeqCst))
    }

    /// Why the cluster view may be stale: the API server has not answered
    /// for longer than [`STALE_AFTER`] (watch events and probes alike).
    pub fn view_problem(&self) -> Option<String> {
        let silent = self.contact.silent_for();
        (silent > STALE_AFTER).then(|| {
            format!(
                "the API server has not answered for {} s ({} watch errors so far): the kernel keeps enforcing the cluster as last seen; pods, Services, nodes and policies changed since are not known",
                silent.as_secs(),
                self.errors.load(Ordering::Relaxed)
            )
        })
    }

    /// Changes whenever a policy object was added, changed or deleted.
    pub fn policy_epoch(&self) -> u64 {
        self.policy_epoch.load(Ordering::SeqCst)
    }

    /// Kinds not listed yet, for logs and `/readyz`.
    pub fn waiting_for(&self) -> Vec<&'static str> {
        KINDS
            .iter()
            .zip(self.synced.iter())
            .filter(|(_, s)| !s.load(Ordering::SeqCst))
            .map(|(k, _)| *k)
            .collect()
    }

    /// The policies of every policy object. An object the validator refuses
    /// is left out (with a message naming it); the others apply. Results are
    /// cached per object and resourceVersion.
    pub fn policies(&self) -> (Vec<Policy>, Vec<String>) {
        let (nps, pps, cps) = (
            self.network_policies.state(),
            self.palisade_policies.state(),
            self.cluster_palisade_policies.state(),
        );
        let mut objects: Vec<(String, Option<&str>, PolicyObject<'_>)> = nps
            .iter()
            .map(|o| PolicyObject::Network(o))
            .chain(pps.iter().map(|o| PolicyObject::Palisade(o)))
            .chain(cps.iter().map(|o| PolicyObject::ClusterPalisade(o)))
            .map(|o| {
                let version = o.meta().1.resource_version.as_deref();
                (o.name(), version.filter(|v| !v.is_empty()), o)
            })
            .collect();
        objects.sort_by(|a, b| a.0.cmp(&b.0));
        let mut cache = match self.parsed.lock() {
            Ok(c) => c,
            Err(poisoned) => poisoned.into_inner(),
        };
        let mut out = Vec::new();
        let mut problems = Vec::new();
        let mut keep = std::collections::HashSet::new();
        for (name, version, object) in objects {
            keep.insert(name.clone());
            let entry = cache
                .entry(name.clone())
                .or_insert_with(|| (String::new(), Err(String::new())));
            if version.is_none_or(|v| entry.0 != v) {
                let validated = load::validate_object(object).map_err(|e| e.to_string());
                if let Err(e) = &validated {
                    warn!("{name} is not applied:\n{e}");
                }
                *entry = (version.unwrap_or_default().to_owned(), validated);
            }
            match &entry.1 {
                Ok(p) => out.push(p.clone()),
                Err(e) => problems.push(e.clone()),
            }
        }
        cache.retain(|k, _| keep.contains(k));
        (out, problems)
    }
}

/// A pod as identity and the ipcache see it.
#[derive(Clone, Debug, PartialEq)]
pub struct PodInfo {
    pub uid: String,
    pub namespace: String,
    pub name: String,
    pub node: Option<String>,
    /// The pod's labels plus its service account ([`SERVICE_ACCOUNT_LABEL`]).
    pub labels: Labels,
    pub ips: Vec<IpAddr>,
    pub ports: Vec<NamedPortConfig>,
    pub host_network: bool,
    /// `metadata.deletionTimestamp` is set: the pod is shutting down and its
    /// address may already belong to a new pod.
    pub terminating: bool,
    /// `metadata.creationTimestamp` (RFC 3339, UTC: orders as text).
    pub created: String,
}

/// Reads what identity needs from a Pod object. `None` for a pod without a
/// UID or one that has finished (its address may already be reused).
pub fn pod_info(pod: &Pod) -> Option<PodInfo> {
    let uid = pod.metadata.uid.clone()?;
    let status = pod.status.as_ref();
    if matches!(
        status.and_then(|s| s.phase.as_deref()),
        Some("Succeeded" | "Failed")
    ) {
        return None;
    }
    let spec = pod.spec.as_ref();
    let mut labels: Labels = pod.labels().clone();
    let sa = spec
        .and_then(|s| s.service_account_name.clone())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "default".into());
    labels.insert(SERVICE_ACCOUNT_LABEL.into(), sa);
    let mut ips: Vec<IpAddr> = status
        .and_then(|s| s.pod_ips.as_ref())
        .map(|ips| ips.iter().filter_map(|i| i.ip.parse().ok()).collect())
        .unwrap_or_default();
    if ips.is_empty()
        && let Some(ip) = status
            .and_then(|s| s.pod_ip.as_ref())
            .and_then(|i| i.parse().ok())
    {
        ips.push(ip);
    }
    ips.sort();
    ips.dedup();
    let ports = spec
        .map(|s| {
            s.containers
                .iter()
                .flat_map(|c| c.ports.iter().flatten())
                .filter_map(|p| {
                    Some(NamedPortConfig {
                        name: p.name.clone()?,
                        port: u16::try_from(p.container_port).ok()?,
                        protocol: p.protocol.clone().unwrap_or_else(|| "TCP".into()),
                    })
                })
                .collect()
        })
        .unwrap_or_default();
    Some(PodInfo {
        uid,
        namespace: pod.namespace().unwrap_or_default(),
        name: pod.name_any(),
        node: spec.and_then(|s| s.node_name.clone()),
        labels,
        ips,
        ports,
        host_network: spec.and_then(|s| s.host_network).unwrap_or(false),
        terminating: pod.metadata.deletion_timestamp.is_some(),
        created: pod
            .metadata
            .creation_timestamp
            .as_ref()
            .map(|t| t.0.to_string())
            .unwrap_or_default(),
    })
}

/// Which pod an address belongs to when several pods name it. Addresses are
/// recycled: the runtime gives a deleted pod's address to a new pod while the
/// old Pod object may still be listed (terminating, or deleted later than
/// the new one is reported). The owner is, in order: a pod not terminating,
/// a pod whose cgroup is on this node (the runtime made its sandbox here),
/// the pod created last. Every other claimant loses the address, so no
/// packet from it is judged with a stale identity.
fn address_owners<'a>(
    pods: &'a [PodInfo],
    with_cgroup: &std::collections::HashSet<&str>,
) -> HashMap<IpAddr, &'a str> {
    let rank = |p: &'a PodInfo| {
        (
            !p.terminating,
            with_cgroup.contains(p.uid.as_str()),
            p.created.as_str(),
            p.uid.as_str(),
        )
    };
    let mut owners: HashMap<IpAddr, &PodInfo> = HashMap::new();
    for pod in pods.iter().filter(|p| !p.host_network) {
        for ip in &pod.ips {
            let better = owners.get(ip).is_none_or(|cur| rank(pod) > rank(cur));
            if better {
                owners.insert(*ip, pod);
            }
        }
    }
    owners
        .into_iter()
        .map(|(ip, p)| (ip, p.uid.as_str()))
        .collect()
}

/// `pod`'s addresses that it owns (see [`address_owners`]).
fn owned_ips(pod: &PodInfo, owners: &HashMap<IpAddr, &str>) -> Vec<IpAddr> {
    pod.ips
        .iter()
        .filter(|ip| owners.get(ip).is_some_and(|o| *o == pod.uid))
        .copied()
        .collect()
}

/// A pod's key in [`RemoteChanges`]: `namespace/name`.
pub fn pod_key(pod: &PodInfo) -> String {
    format!("{}/{}", pod.namespace, pod.name)
}

/// Maps the local cgroups to pods and collects every other pod's addresses,
/// from the whole list (every remote pod, `reset`). The agent keeps a
/// [`PodIndex`] instead, which sends what changed; this is what it must
/// always equal.
pub fn inputs(
    node: &str,
    pods: &[PodInfo],
    namespaces: &[Arc<Namespace>],
    cgroups: &[Cgroup],
    unknown: UnknownPods,
) -> Inputs {
    let by_uid: HashMap<&str, &PodInfo> = pods.iter().map(|p| (p.uid.as_str(), p)).collect();
    let parsed: Vec<(&Cgroup, Option<cgroup::PodCgroup>)> = cgroups
        .iter()
        .map(|cg| (cg, cgroup::parse(&cg.rel_path)))
        .collect();
    // Known pods with a cgroup here (hostNetwork ones included).
    let has_cgroup: std::collections::HashSet<&str> = parsed
        .iter()
        .filter_map(|(_, pc)| {
            by_uid
                .get(pc.as_ref()?.uid.as_str())
                .map(|p| p.uid.as_str())
        })
        .collect();
    let owners = address_owners(pods, &has_cgroup);
    let mut out = Inputs::default();
    for (cg, pc) in parsed {
        let Some(pc) = pc else {
            // QoS directories and anything else that is not a pod: unmanaged
            // (a cgroup the agent has not seen yet is pending in the kernel).
            out.held.insert(cg.id, reserved::UNMANAGED);
            continue;
        };
        match by_uid.get(pc.uid.as_str()) {
            Some(pod) if pod.host_network => {
                out.held.insert(cg.id, reserved::HOST);
            }
            Some(pod) => {
                out.workloads.push(Workload {
                    cgroup_id: cg.id,
                    cgroup_path: cg.rel_path.clone(),
                    namespace: pod.namespace.clone(),
                    name: pod.name.clone(),
                    labels: pod.labels.clone(),
                    ips: owned_ips(pod, &owners),
                    ports: pod.ports.clone(),
                    // Pods other than hostNetwork ones have their own network namespace.
                    own_netns: true,
                });
            }
            None if unknown != UnknownPods::Allow => {
                out.held.insert(cg.id, reserved::PENDING);
            }
            None => {}
        }
    }
    for pod in pods {
        // Local pods with cgroups are workloads already; hostNetwork pods use
        // their node's address, which is not theirs alone.
        if pod.host_network || pod.ips.is_empty() || has_cgroup.contains(pod.uid.as_str()) {
            continue;
        }
        if pod.node.as_deref() == Some(node) {
            // A local pod whose cgroup is not there (yet, or any more): still
            // known by address, so its peers see its identity.
            if !pod.terminating {
                out.local_without_cgroup
                    .push(format!("{}/{}", pod.namespace, pod.name));
            }
        }
        let ips = owned_ips(pod, &owners);
        if ips.is_empty() {
            continue; // its address belongs to a newer pod now
        }
        out.remote.changes.push((
            pod_key(pod),
            Some(RemoteWorkload {
                namespace: pod.namespace.clone(),
                name: pod.name.clone(),
                labels: pod.labels.clone(),
                ips,
                ports: pod.ports.clone(),
            }),
        ));
    }
    out.remote.reset = true;
    out.namespaces = namespaces
        .iter()
        .map(|n| (n.name_any(), n.labels().clone()))
        .collect();
    out
}

/// The label an EndpointSlice carries naming its Service.
const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// Services with the endpoints kube-proxy forwards to (the ready ones, or
/// when none is ready those serving while terminating), from Service and
/// EndpointSlice objects. Headless and ExternalName Services have no address to judge and
/// are left out (connections to their pods are judged by the pods' IPs).
pub fn services(services: &[Arc<KubeService>], slices: &[Arc<EndpointSlice>]) -> Vec<Service> {
    let mut by_service: HashMap<(String, String), Vec<&EndpointSlice>> = HashMap::new();
    for slice in slices {
        if let Some(name) = slice.labels().get(SERVICE_NAME_LABEL) {
            by_service
                .entry((slice.namespace().unwrap_or_default(), name.clone()))
                .or_default()
                .push(slice);
        }
    }
    let mut out = Vec::new();
    for svc in services {
        let Some(spec) = svc.spec.as_ref() else {
            continue;
        };
        if spec.type_.as_deref() == Some("ExternalName") {
            continue;
        }
        let mut addresses: Vec<IpAddr> = spec
            .cluster_ips
            .iter()
            .flatten()
            .chain(spec.cluster_ip.iter())
            .filter_map(|a| a.parse().ok())
            .collect();
        let mut external: Vec<IpAddr> = spec
            .external_ips
            .iter()
            .flatten()
            .filter_map(|a| a.parse().ok())
            .collect();
        if let Some(ingress) = svc
            .status
            .as_ref()
            .and_then(|s| s.load_balancer.as_ref())
            .and_then(|lb| lb.ingress.as_ref())
        {
            external.extend(
                ingress
                    .iter()
                    .filter_map(|i| i.ip.as_ref()?.parse::<IpAddr>().ok()),
            );
        }
        addresses.sort();
        addresses.dedup();
        external.sort();
        external.dedup();
        external.retain(|a| !addresses.contains(a));
        let ports: Vec<ServicePort> = spec
            .ports
            .iter()
            .flatten()
            .filter_map(|p| {
                Some(ServicePort {
                    name: p.name.clone().unwrap_or_default(),
                    protocol: Protocol::parse(p.protocol.as_deref().unwrap_or("TCP"))?,
                    port: u16::try_from(p.port).ok()?,
                    node_port: p.node_port.and_then(|n| u16::try_from(n).ok()),
                })
            })
            .collect();
        let namespace = svc.namespace().unwrap_or_default();
        let name = svc.name_any();
        // kube-proxy's choice (KEP-1669): the ready endpoints; when none is
        // ready, the ones still serving while terminating (a rollout, a
        // scale-down). Judged whenever kube-proxy would use them.
        let (mut endpoints, mut terminating) = (Vec::new(), Vec::new());
        for slice in by_service
            .get(&(namespace.clone(), name.clone()))
            .into_iter()
            .flatten()
        {
            let slice_ports: BTreeMap<(Protocol, String), u16> = slice
                .ports
                .iter()
                .flatten()
                .filter_map(|p| {
                    Some((
                        (
                            Protocol::parse(p.protocol.as_deref().unwrap_or("TCP"))?,
                            p.name.clone().unwrap_or_default(),
                        ),
                        u16::try_from(p.port?).ok()?,
                    ))
                })
                .collect();
            for ep in &slice.endpoints {
                // Upstream: a nil `ready` is to be read as ready, a nil
                // `serving` as `ready`, a nil `terminating` as false.
                let c = ep.conditions.as_ref();
                let ready = c.and_then(|c| c.ready) != Some(false);
                let serving = c.and_then(|c| c.serving).unwrap_or(ready);
                let ending = c.and_then(|c| c.terminating) == Some(true);
                let into = if ready {
                    &mut endpoints
                } else if serving && ending {
                    &mut terminating
                } else {
                    continue;
                };
                into.extend(ep.addresses.iter().filter_map(|a| {
                    Some(Endpoint {
                        ip: a.parse().ok()?,
                        ports: slice_ports.clone(),
                    })
                }));
            }
        }
        if endpoints.is_empty() {
            endpoints = terminating;
        }
        if addresses.is_empty()
            && external.is_empty()
            && ports.iter().all(|p| p.node_port.is_none())
        {
            continue; // headless: nothing addresses the Service itself
        }
        // In one order whatever order the slices are listed in.
        endpoints.sort_by(|a, b| (a.ip, &a.ports).cmp(&(b.ip, &b.ports)));
        out.push(Service {
            namespace,
            name,
            addresses,
            external,
            ports,
            endpoints,
        });
    }
    out.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    out
}

/// This node's addresses (from its Node object) and the other nodes'.
pub fn nodes(node: &str, nodes: &[Arc<Node>]) -> Nodes {
    let mut out = Nodes::default();
    for n in nodes {
        let ips = n
            .status
            .as_ref()
            .and_then(|s| s.addresses.as_ref())
            .into_iter()
            .flatten()
            .filter(|a| a.type_ == "InternalIP" || a.type_ == "ExternalIP")
            .filter_map(|a| a.address.parse::<IpAddr>().ok());
        if n.name_any() == node {
            out.local.extend(ips);
        } else {
            out.remote.extend(ips);
        }
    }
    out
}

#[cfg(test)]
mod tests;
