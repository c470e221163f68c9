//! The agent's domain model, neutral of where the facts come from: local
//! workloads (cgroups), remote workloads (addresses), Services, nodes and
//! namespaces. Every source — host discovery with its config, the Kubernetes
//! API server — fills one [`Inputs`]; the planner reads nothing else. Remote
//! workloads and Services come as [`Changes`] (what changed since the last
//! round), the rest whole.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use regex::Regex;
use serde::Deserialize;

use crate::policy::{
    labels::{LabelSelector, Labels},
    model::Protocol,
};

/// A workload on this node: a cgroup with a name, labels and addresses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Workload {
    pub cgroup_id: u64,
    pub cgroup_path: String,
    pub namespace: String,
    pub name: String,
    pub labels: Labels,
    pub ips: Vec<IpAddr>,
    /// Declared ports (from the matching rule, or the pod's containers).
    pub ports: Vec<NamedPortConfig>,
    /// The workload has a network namespace of its own (a pod, a container
    /// with its own network): its loopback traffic is traffic to itself.
    /// `false` for workloads in the node's namespace, whose loopback peer is
    /// the node.
    pub own_netns: bool,
}

/// A workload that lives elsewhere, known by its addresses.
#[derive(Clone, Debug, PartialEq)]
pub struct RemoteWorkload {
    pub namespace: String,
    pub name: String,
    pub labels: Labels,
    pub ips: Vec<IpAddr>,
    pub ports: Vec<NamedPortConfig>,
}

/// What the agent does with a cgroup that belongs to a pod it has not
/// learned from the API server yet (the pod's watch event can trail the
/// container start by a moment).
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub enum UnknownPods {
    /// Both directions denied until the pod is known. The default: a pod
    /// can be addressed before it is classified (its address reused, its
    /// Pod object deleted while its containers run, the agent or the API
    /// server away), and what is admitted then must not outlive it.
    #[default]
    DenyAll,
    /// New outgoing connections fail (EPERM) until the pod is known;
    /// incoming traffic is not held.
    DenyEgress,
    /// Not held: unknown pods are unmanaged (allowed) until known.
    Allow,
}

impl UnknownPods {
    /// The directions (`DIR_*`) a pod not known yet is denied in.
    pub fn held_directions(self) -> &'static [u8] {
        use palisade_common::{DIR_EGRESS, DIR_INGRESS};
        match self {
            UnknownPods::DenyEgress => &[DIR_EGRESS],
            UnknownPods::DenyAll => &[DIR_EGRESS, DIR_INGRESS],
            UnknownPods::Allow => &[],
        }
    }
}

/// A Service: the addresses clients connect to, and the endpoints the node
/// forwards those connections to (kube-proxy's DNAT, or a host's local load
/// balancer).
#[derive(Clone, Debug, PartialEq)]
pub struct Service {
    pub namespace: String,
    pub name: String,
    /// The Service's own virtual addresses: ClusterIPs (on a plain host,
    /// the configured addresses).
    pub addresses: Vec<IpAddr>,
    /// External IPs and load-balancer ingress IPs: frontends too, but never
    /// an endpoint's own addresses — anyone who may create a Service can
    /// set them to any address, another pod's included.
    pub external: Vec<IpAddr>,
    pub ports: Vec<ServicePort>,
    /// Ready endpoints.
    pub endpoints: Vec<Endpoint>,
}

impl Service {
    pub fn qualified_name(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct ServicePort {
    /// The port's name (may be empty when the Service has one port).
    pub name: String,
    pub protocol: Protocol,
    pub port: u16,
    /// Also reachable on every node address at this port.
    pub node_port: Option<u16>,
}

/// One endpoint: an address and, per Service port name and protocol, the
/// port it listens on (named target ports already resolved for it).
#[derive(Clone, Debug, PartialEq)]
pub struct Endpoint {
    pub ip: IpAddr,
    pub ports: BTreeMap<(Protocol, String), u16>,
}

/// This node's addresses and the other nodes'.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Nodes {
    /// Every address of this node: its interfaces, the CNI gateway, the
    /// Node object's addresses. Traffic with them is `reserved:host`.
    pub local: BTreeSet<IpAddr>,
    /// Addresses of the cluster's other nodes: `reserved:remote-node`.
    pub remote: BTreeSet<IpAddr>,
}

/// A kind of fact as changes: a source that keeps it between rounds (the
/// Kubernetes watch) sends what changed since its last round, so a pod or
/// Service event costs that object and not the cluster; a source that lists
/// (a world file, a test) sends everything with `reset`.
#[derive(Clone, Debug, PartialEq)]
pub struct Changes<T> {
    /// `changes` is everything: what the planner holds is replaced.
    pub reset: bool,
    /// The object's key (`namespace/name`) → the object now; `None`: gone.
    pub changes: Vec<(String, Option<T>)>,
}

impl<T> Default for Changes<T> {
    fn default() -> Self {
        Changes {
            reset: false,
            changes: Vec::new(),
        }
    }
}

/// Objects with a `namespace/name` key.
pub trait Keyed {
    fn key(&self) -> String;
}

impl Keyed for RemoteWorkload {
    fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

impl Keyed for Service {
    fn key(&self) -> String {
        self.qualified_name()
    }
}

impl<T: Keyed> Changes<T> {
    /// Every object, replacing whatever was known (keyed by
    /// `namespace/name`, and by position where a key repeats).
    pub fn all(objects: impl IntoIterator<Item = T>) -> Changes<T> {
        let mut seen = std::collections::HashSet::new();
        let changes = objects
            .into_iter()
            .enumerate()
            .map(|(i, o)| {
                let mut key = o.key();
                if !seen.insert(key.clone()) {
                    key = format!("{key}#{i}");
                }
                (key, Some(o))
            })
            .collect();
        Changes {
            reset: true,
            changes,
        }
    }
}

impl<T: Keyed + Clone + PartialEq> Changes<T> {
    /// What changed from `sent` (what the planner holds) to `now`; `sent`
    /// becomes `now`. A source that computes its objects whole each round
    /// (the host's configured Services) sends only the difference.
    pub fn between(sent: &mut BTreeMap<String, T>, now: Vec<T>) -> Changes<T> {
        let now: BTreeMap<String, T> = now.into_iter().map(|o| (o.key(), o)).collect();
        let mut changes: Vec<(String, Option<T>)> = sent
            .keys()
            .filter(|k| !now.contains_key(*k))
            .map(|k| (k.clone(), None))
            .collect();
        changes.extend(
            now.iter()
                .filter(|(k, o)| sent.get(*k) != Some(*o))
                .map(|(k, o)| (k.clone(), Some(o.clone()))),
        );
        *sent = now;
        Changes {
            reset: false,
            changes,
        }
    }
}

impl<T> Changes<T> {
    /// The objects added or changed.
    pub fn objects(&self) -> impl Iterator<Item = &T> {
        self.changes.iter().filter_map(|(_, o)| o.as_ref())
    }

    /// Nothing changed.
    pub fn is_empty(&self) -> bool {
        !self.reset && self.changes.is_empty()
    }
}

/// Workloads elsewhere, as changes.
pub type RemoteChanges = Changes<RemoteWorkload>;

/// What the planner gets from the sources in one round.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Inputs {
    /// Local workload cgroups.
    pub workloads: Vec<Workload>,
    /// Local cgroups held at a reserved identity: hostNetwork pods (host)
    /// and pods not known yet (pending).
    pub held: BTreeMap<u64, u32>,
    /// Workloads elsewhere (pods on other nodes, local pods without a cgroup
    /// yet), as changes since the last round.
    pub remote: RemoteChanges,
    /// Namespace name → labels.
    pub namespaces: BTreeMap<String, Labels>,
    /// Pods scheduled to this node (`spec.nodeName`), running with an
    /// address and not shutting down, whose cgroup is not found under the
    /// root (`namespace/name`, sorted): not enforced.
    pub local_without_cgroup: Vec<String>,
    /// Services, as changes since the last round.
    pub services: Changes<Service>,
    pub nodes: Nodes,
}

/// A Service declared in the host agent's config: its endpoints are the
/// workloads its selector picks, on their target port.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ServiceConfig {
    pub name: String,
    pub namespace: String,
    /// Addresses clients connect to (a local load balancer's virtual IPs).
    pub addresses: Vec<IpAddr>,
    pub ports: Vec<ServicePortConfig>,
    /// Workloads of the Service's namespace with these labels are its endpoints.
    #[serde(default)]
    pub selector: Option<Labels>,
    /// Endpoint addresses given explicitly (a Service without a selector);
    /// a named target port is resolved against the workload at the address.
    #[serde(default)]
    pub endpoints: Vec<IpAddr>,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ServicePortConfig {
    #[serde(default)]
    pub name: String,
    pub port: u16,
    /// TCP (default), UDP or SCTP.
    #[serde(default = "tcp")]
    pub protocol: String,
    /// A number, or the name of a port the workloads declare. Default: `port`.
    pub target_port: Option<TargetPort>,
    pub node_port: Option<u16>,
}

fn tcp() -> String {
    "TCP".into()
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum TargetPort {
    Number(u16),
    Name(String),
}

/// Resolves configured Services against the workloads found: each selected
/// workload with an address (and each explicit endpoint address) is an
/// endpoint, its target ports resolved by name where the Service names them
/// (an endpoint that does not declare the name is not an endpoint of that
/// port, as in Kubernetes).
pub fn resolve_services(configs: &[ServiceConfig], workloads: &[Workload]) -> Vec<Service> {
    configs
        .iter()
        .map(|c| {
            let selector = c.selector.as_ref().map(|labels| LabelSelector {
                match_labels: labels.clone(),
                ..LabelSelector::default()
            });
            let ports: Vec<(ServicePort, Option<TargetPort>)> = c
                .ports
                .iter()
                .filter_map(|p| {
                    Some((
                        ServicePort {
                            name: p.name.clone(),
                            protocol: Protocol::parse(&p.protocol)?,
                            port: p.port,
                            node_port: p.node_port,
                        },
                        p.target_port.clone(),
                    ))
                })
                .collect();
            let mut endpoints = Vec::new();
            let selected = workloads.iter().filter(|w| {
                w.namespace == c.namespace
                    && selector.as_ref().is_some_and(|s| s.matches(&w.labels))
            });
            let no_ports = Vec::new();
            let explicit = c.endpoints.iter().map(|ip| {
                let declared = workloads
                    .iter()
                    .find(|w| w.ips.contains(ip))
                    .map_or(&no_ports, |w| &w.ports);
                (vec![*ip], declared)
            });
            for (ips, declared) in selected.map(|w| (w.ips.clone(), &w.ports)).chain(explicit) {
                let mut resolved = BTreeMap::new();
                for (sp, target) in &ports {
                    let port = match target {
                        None => Some(sp.port),
                        Some(TargetPort::Number(n)) => Some(*n),
                        Some(TargetPort::Name(name)) => declared
                            .iter()
                            .find(|np| {
                                &np.name == name
                                    && Protocol::parse(&np.protocol) == Some(sp.protocol)
                            })
                            .map(|np| np.port),
                    };
                    if let Some(port) = port {
                        resolved.insert((sp.protocol, sp.name.clone()), port);
                    }
                }
                endpoints.extend(ips.iter().map(|ip| Endpoint {
                    ip: *ip,
                    ports: resolved.clone(),
                }));
            }
            Service {
                namespace: c.namespace.clone(),
                name: c.name.clone(),
                addresses: c.addresses.clone(),
                external: Vec::new(),
                ports: ports.into_iter().map(|(p, _)| p).collect(),
                endpoints,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn workload(name: &str, app: &str, ip: &str, ports: &[(&str, u16)]) -> Workload {
        Workload {
            cgroup_id: 1,
            cgroup_path: name.into(),
            namespace: "shop".into(),
            name: name.into(),
            labels: [("app".to_owned(), app.to_owned())].into(),
            ips: vec![ip.parse().unwrap()],
            ports: ports
                .iter()
                .map(|(n, p)| NamedPortConfig {
                    name: (*n).into(),
                    port: *p,
                    protocol: "TCP".into(),
                })
                .collect(),
            own_netns: true,
        }
    }

    #[test]
    fn configured_services_resolve_named_target_ports_per_workload() {
        let configs: Vec<ServiceConfig> = serde_saphyr::from_str(
            "- name: db\n  namespace: shop\n  addresses: [10.96.0.20]\n  selector: {app: db}\n  ports:\n    - {name: pg, port: 5432, targetPort: pg}\n    - {name: metrics, port: 9000, targetPort: 9100}\n",
        )
        .unwrap();
        let services = resolve_services(
            &configs,
            &[
                workload("db-1", "db", "10.1.0.1", &[("pg", 5432)]),
                workload("db-2", "db", "10.1.0.2", &[("pg", 6432)]),
                workload("db-3", "db", "10.1.0.3", &[]),
                workload("web", "web", "10.1.0.4", &[("pg", 1)]),
            ],
        );
        let eps = &services[0].endpoints;
        assert_eq!(eps.len(), 3, "the three db workloads, not web");
        let pg = |i: usize| eps[i].ports.get(&(Protocol::Tcp, "pg".into())).copied();
        assert_eq!((pg(0), pg(1), pg(2)), (Some(5432), Some(6432), None));
        assert_eq!(
            eps[2].ports.get(&(Protocol::Tcp, "metrics".into())),
            Some(&9100)
        );
    }
}

#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct NamedPortConfig {
    pub name: String,
    pub port: u16,
    /// TCP (default), UDP or SCTP.
    #[serde(default = "default_tcp")]
    pub protocol: String,
}

fn default_tcp() -> String {
    "TCP".into()
}

impl NamedPortConfig {
    pub fn key(&self) -> Option<((Protocol, String), u16)> {
        Some((
            (Protocol::parse(&self.protocol)?, self.name.clone()),
            self.port,
        ))
    }
}

/// A compiled `workloads[].path` pattern.
#[derive(Clone, Debug)]
pub struct PathPattern {
    regex: Regex,
}

impl PathPattern {
    pub fn new(pattern: &str) -> Result<PathPattern, String> {
        if pattern.is_empty() || pattern.starts_with('/') {
            return Err(format!(
                "{pattern:?} must be a non-empty path relative to cgroupRoot"
            ));
        }
        let mut re = String::from("^");
        let mut rest = pattern;
        while !rest.is_empty() {
            if let Some(r) = rest.strip_prefix("**") {
                re.push_str(".*");
                rest = r;
            } else if let Some(r) = rest.strip_prefix('*') {
                re.push_str("[^/]*");
                rest = r;
            } else if let Some(r) = rest.strip_prefix('{') {
                let end = r
                    .find('}')
                    .ok_or_else(|| format!("{pattern:?}: '{{' without a closing '}}'"))?;
                let name = &r[..end];
                if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                    return Err(format!(
                        "{pattern:?}: capture name {name:?} must be letters, digits or '_'"
                    ));
                }
                re.push_str(&format!("(?P<{name}>[^/]+)"));
                rest = &r[end + 1..];
            } else {
                let c = rest.chars().next().unwrap_or_default();
                re.push_str(&regex::escape(&c.to_string()));
                rest = &rest[c.len_utf8()..];
            }
        }
        re.push('$');
        Regex::new(&re)
            .map(|regex| PathPattern { regex })
            .map_err(|e| format!("{pattern:?}: {e}"))
    }

    /// Captures of a matching path.
    pub fn captures(&self, path: &str) -> Option<BTreeMap<String, String>> {
        let caps = self.regex.captures(path)?;
        Some(
            self.regex
                .capture_names()
                .flatten()
                .filter_map(|n| Some((n.to_owned(), caps.name(n)?.as_str().to_owned())))
                .collect(),
        )
    }
}
