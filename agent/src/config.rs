//! The agent's configuration file (YAML): where workloads live, how they are
//! labelled, which remote peers exist, where policy and audit events go.
//! Parsing and validation only; nothing here touches the system.
use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use ipnet::IpNet;
use serde::Deserialize;

use crate::policy::labels::Labels;

/// Where the control socket is unless `controlSocket` says otherwise.
pub const DEFAULT_CONTROL_SOCKET: &str = "/run/palisade/palisade.sock";

pub use crate::inventory::NamedPortConfig;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}:{line}:{column}: {message}")]
    Parse {
        path: PathBuf,
        line: u64,
        column: u64,
        message: String,
    },
    #[error("{path}: {field}: {message}")]
    Invalid {
        path: PathBuf,
        field: String,
        message: String,
    },
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Config {
    /// cgroup v2 directory under which workloads live and programs attach.
    /// Absolute, or relative to the cgroup2 mount point. Required on a plain
    /// host; in Kubernetes mode the default is kubelet's `kubepods.slice`
    /// (systemd driver) or `kubepods` (cgroupfs driver), whichever exists.
    pub cgroup_root: Option<PathBuf>,
    /// Directory (or file) of policy YAML. Relative to the config file.
    pub policy_dir: Option<PathBuf>,
    #[serde(default)]
    pub audit: AuditConfig,
    /// Trust domain of SPIFFE-style identity names.
    #[serde(default = "default_trust_domain")]
    pub trust_domain: String,
    #[serde(default)]
    pub namespaces: Vec<NamespaceConfig>,
    /// cgroup path patterns → workload name, namespace and labels; first match wins.
    #[serde(default)]
    pub workloads: Vec<WorkloadRule>,
    /// Remote peers by address.
    #[serde(default)]
    pub peers: Vec<PeerConfig>,
    /// Services of a local load balancer (host mode; in Kubernetes mode they
    /// come from the API server): a connection to one of their addresses is
    /// judged as the connection to the workloads behind it.
    #[serde(default)]
    pub services: Vec<crate::inventory::ServiceConfig>,
    /// Addresses of this node besides its interfaces' (found by themselves),
    /// e.g. a gateway address in another namespace: traffic with them is
    /// `reserved:host`.
    #[serde(default)]
    pub host_addresses: Vec<std::net::IpAddr>,
    /// Traffic between a workload and its own node (`reserved:host`):
    /// `allow` (always allowed, as Kubernetes NetworkPolicy defines it: kubelet
    /// probes, node-local agents) or `policy` (judged like any peer). Default:
    /// `allow` in Kubernetes mode, `policy` on a plain host, where the host's
    /// processes (and localhost for workloads in the host's namespace) are
    /// peers like others.
    pub host_traffic: Option<HostTraffic>,
    /// A cgroup below the root that no rule has classified yet — created a
    /// moment ago, or while the agent was stopped: `denyAll` (default),
    /// `denyEgress` or `allow`. (Kubernetes mode: `kubernetes.unknownPods`.)
    #[serde(default)]
    pub unknown_workloads: crate::inventory::UnknownPods,
    /// How often the policy directory is looked at, and the cgroup tree
    /// re-read while the node is changing (a cgroup, a workload's addresses
    /// or the cluster changed within the last 10 s).
    #[serde(default = "default_rescan_ms")]
    pub rescan_interval_ms: u64,
    /// How often the cgroup tree is re-read on a node at rest. inotify and
    /// netlink wake the agent at once for a cgroup made or removed, its
    /// first process joining or its last leaving, and an address change;
    /// this re-read finds what they cannot see (a process moved into a
    /// workload that already had one, in another network namespace).
    #[serde(default = "default_idle_rescan_ms")]
    pub idle_rescan_interval_ms: u64,
    /// How long the policy directory must be left alone before a change to
    /// it is read, so a file being written in place (truncated, then
    /// written, as editors and configuration tools do) is never read
    /// half-way. Changes made with `palisade policy apply|delete` apply at
    /// once: the agent writes them whole, by rename.
    #[serde(default = "default_policy_settle_ms")]
    pub policy_settle_ms: u64,
    #[serde(default)]
    pub maps: MapCapacities,
    /// bpffs directory where maps and links are pinned, so enforcement
    /// continues while the agent restarts and a restarted agent adopts it.
    /// `null` disables pinning: programs detach when the agent exits.
    #[serde(default = "default_pin_dir")]
    pub bpf_pin_dir: Option<PathBuf>,
    /// Unix socket for the CLI (root only). `null` disables it.
    #[serde(default = "default_control_socket")]
    pub control_socket: Option<PathBuf>,
    /// Address for `/healthz`, `/readyz` and `/metrics` (e.g. `127.0.0.1:9964`).
    /// Unset: no HTTP endpoint.
    pub http_address: Option<std::net::SocketAddr>,
    /// Kubernetes mode settings (used with `palisade agent --kubernetes`).
    #[serde(default)]
    pub kubernetes: KubernetesConfig,
}

#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub enum HostTraffic {
    Allow,
    Policy,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct KubernetesConfig {
    /// A pod cgroup whose pod is not known yet: `denyAll` (default),
    /// `denyEgress` or `allow`.
    #[serde(default)]
    pub unknown_pods: crate::inventory::UnknownPods,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct AuditConfig {
    /// `stdout`, or a file path (appended to).
    #[serde(default = "default_audit_output")]
    pub output: String,
}

impl Default for AuditConfig {
    fn default() -> Self {
        AuditConfig {
            output: default_audit_output(),
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct NamespaceConfig {
    pub name: String,
    #[serde(default)]
    pub labels: Labels,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct WorkloadRule {
    /// Pattern over the cgroup path relative to `cgroupRoot`: `{var}` captures
    /// one path segment (or part of one), `*` matches within a segment, `**`
    /// matches any number of segments.
    pub path: String,
    /// Namespace; may use captures, e.g. `"{ns}"`.
    pub namespace: String,
    /// Workload name; may use captures. Default: the last path segment.
    pub name: Option<String>,
    /// Labels; values may use captures.
    #[serde(default)]
    pub labels: Labels,
    /// Declared ports, for named ports in policy (`port: https`).
    #[serde(default)]
    pub ports: Vec<NamedPortConfig>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PeerConfig {
    pub name: String,
    pub cidrs: Vec<IpNet>,
    /// A namespace makes the peer selectable like a workload of that namespace.
    pub namespace: Option<String>,
    #[serde(default)]
    pub labels: Labels,
}

/// Map capacities (entries; bytes for the audit ring).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct MapCapacities {
    #[serde(default = "cap::cgroups")]
    pub cgroups: u32,
    #[serde(default = "cap::ipcache")]
    pub ipcache: u32,
    #[serde(default = "cap::policy")]
    pub policy: u32,
    #[serde(default = "cap::enforced")]
    pub enforced: u32,
    #[serde(default = "cap::flows")]
    pub flows: u32,
    #[serde(default = "cap::services")]
    pub services: u32,
    #[serde(default = "cap::audit_ring_bytes")]
    pub audit_ring_bytes: u32,
}

mod cap {
    use palisade_common::capacity as c;
    pub fn cgroups() -> u32 {
        c::CGROUP_IDENTITY
    }
    pub fn ipcache() -> u32 {
        c::IPCACHE
    }
    pub fn policy() -> u32 {
        c::POLICY
    }
    pub fn enforced() -> u32 {
        c::ENFORCED
    }
    pub fn flows() -> u32 {
        c::FLOWS
    }
    pub fn services() -> u32 {
        c::SERVICES
    }
    pub fn audit_ring_bytes() -> u32 {
        c::AUDIT_RING_BYTES
    }
}

impl Default for MapCapacities {
    fn default() -> Self {
        MapCapacities {
            cgroups: cap::cgroups(),
            ipcache: cap::ipcache(),
            policy: cap::policy(),
            enforced: cap::enforced(),
            flows: cap::flows(),
            services: cap::services(),
            audit_ring_bytes: cap::audit_ring_bytes(),
        }
    }
}

fn default_control_socket() -> Option<PathBuf> {
    Some(PathBuf::from(DEFAULT_CONTROL_SOCKET))
}

fn default_pin_dir() -> Option<PathBuf> {
    Some(PathBuf::from("/sys/fs/bpf/palisade"))
}

fn default_trust_domain() -> String {
    "cluster.local".into()
}
fn default_rescan_ms() -> u64 {
    200
}
fn default_idle_rescan_ms() -> u64 {
    10000
}
/// The longest settle time the config accepts.
const MAX_POLICY_SETTLE_MS: u64 = 60_000;

fn default_policy_settle_ms() -> u64 {
    500
}
fn default_audit_output() -> String {
    "stdout".into()
}

impl Default for Config {
    /// Every field at its default: what an empty config file gives.
    fn default() -> Config {
        // An empty mapping is valid (unit test `an_empty_config_is_the_default`).
        serde_saphyr::from_str("{}").unwrap_or_else(|e| unreachable!("empty config: {e}"))
    }
}

impl Config {
    /// Reads, parses and validates `path`; relative paths inside are resolved
    /// against the file's directory.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let mut config = Config::parse(path, &text)?;
        let base = path.parent().unwrap_or(Path::new("."));
        if let Some(dir) = &config.policy_dir
            && dir.is_relative()
        {
            config.policy_dir = Some(base.join(dir));
        }
        if config.audit.output != "stdout" && Path::new(&config.audit.output).is_relative() {
            config.audit.output = base.join(&config.audit.output).display().to_string();
        }
        Ok(config)
    }

    pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
        let config: Config = crate::yaml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            line: e.line,
            column: e.column,
            message: e.message,
        })?;
        config.validate(path)?;
        Ok(config)
    }

    fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        let invalid = |field: String, message: String| ConfigError::Invalid {
            path: path.to_owned(),
            field,
            message,
        };
        let mut seen = BTreeMap::new();
        for (i, ns) in self.namespaces.iter().enumerate() {
            if seen.insert(ns.name.clone(), i).is_some() {
                return Err(invalid(
                    format!("namespaces[{i}].name"),
                    format!("namespace {:?} is listed twice", ns.name),
                ));
            }
        }
        for (i, rule) in self.workloads.iter().enumerate() {
            crate::inventory::PathPattern::new(&rule.path)
                .map_err(|m| invalid(format!("workloads[{i}].path"), m))?;
            for (j, p) in rule.ports.iter().enumerate() {
                if p.key().is_none() {
                    return Err(invalid(
                        format!("workloads[{i}].ports[{j}].protocol"),
                        format!(
                            "unsupported value {:?}: supported values: \"TCP\", \"UDP\", \"SCTP\"",
                            p.protocol
                        ),
                    ));
                }
            }
            if rule.namespace.is_empty() {
                return Err(invalid(
                    format!("workloads[{i}].namespace"),
                    "must not be empty".into(),
                ));
            }
        }
        for (i, svc) in self.services.iter().enumerate() {
            for (j, p) in svc.ports.iter().enumerate() {
                if crate::policy::model::Protocol::parse(&p.protocol).is_none() {
                    return Err(invalid(
                        format!("services[{i}].ports[{j}].protocol"),
                        format!(
                            "unsupported value {:?}: supported values: \"TCP\", \"UDP\", \"SCTP\"",
                            p.protocol
                        ),
                    ));
                }
                if p.port == 0 {
                    return Err(invalid(
                        format!("services[{i}].ports[{j}].port"),
                        "must be between 1 and 65535".into(),
                    ));
                }
            }
            if svc.selector.is_none() && svc.endpoints.is_empty() {
                return Err(invalid(
                    format!("services[{i}]"),
                    "a Service needs a `selector` (workloads) or `endpoints` (addresses)".into(),
                ));
            }
            if svc.addresses.is_empty() && svc.ports.iter().all(|p| p.node_port.is_none()) {
                return Err(invalid(
                    format!("services[{i}].addresses"),
                    "a Service needs at least one address (or a nodePort)".into(),
                ));
            }
        }
        let ring = self.maps.audit_ring_bytes;
        if !ring.is_power_of_two() || ring < 4096 {
            return Err(invalid(
                "maps.auditRingBytes".into(),
                format!("{ring} must be a power of two of at least 4096"),
            ));
        }
        if self.rescan_interval_ms == 0 {
            return Err(invalid(
                "rescanIntervalMs".into(),
                "must be at least 1".into(),
            ));
        }
        if self.idle_rescan_interval_ms < self.rescan_interval_ms {
            return Err(invalid(
                "idleRescanIntervalMs".into(),
                format!(
                    "{} is less than rescanIntervalMs ({}): a node at rest is re-read at most as often as a changing one",
                    self.idle_rescan_interval_ms, self.rescan_interval_ms
                ),
            ));
        }
        if self.policy_settle_ms > MAX_POLICY_SETTLE_MS {
            return Err(invalid(
                "policySettleMs".into(),
                format!(
                    "{} is more than {MAX_POLICY_SETTLE_MS} (a minute): policy edits would wait that long",
                    self.policy_settle_ms
                ),
            ));
        }
        Ok(())
    }

    /// Namespace labels as the compiler sees them: the configured labels plus
    /// `kubernetes.io/metadata.name`, which the Kubernetes API server sets on
    /// every namespace.
    pub fn namespace_labels(&self) -> BTreeMap<String, Labels> {
        crate::policy::labels::namespace_labels(
            self.namespaces
                .iter()
                .map(|ns| (ns.name.as_str(), &ns.labels)),
            [],
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_config_is_the_default() {
        let d = Config::default();
        assert_eq!(d.trust_domain, "cluster.local");
        assert_eq!(d.rescan_interval_ms, 200);
        assert!(d.cgroup_root.is_none() && d.policy_dir.is_none());
    }

    #[test]
    fn the_example_host_config_is_valid() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/host/agent.yaml");
        let config = Config::load(&path).expect("example config loads");
        assert_eq!(config.workloads.len(), 1);
        assert!(
            config
                .policy_dir
                .as_ref()
                .unwrap()
                .ends_with("deploy/host/policies"),
            "relative to the file"
        );
        assert_eq!(
            config.namespace_labels()["shop"]["kubernetes.io/metadata.name"],
            "shop"
        );
    }

    #[test]
    fn the_daemonset_configmap_holds_a_valid_kubernetes_config() {
        #[derive(serde::Deserialize)]
        struct ConfigMap {
            data: BTreeMap<String, String>,
        }
        let path =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/kubernetes/configmap.yaml");
        let cm: ConfigMap =
            serde_saphyr::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        let config =
            Config::parse(&path, &cm.data["agent.yaml"]).expect("agent.yaml in the ConfigMap");
        assert_eq!(
            config.cgroup_root, None,
            "found by itself in Kubernetes mode"
        );
        assert_eq!(
            config.kubernetes.unknown_pods,
            crate::inventory::UnknownPods::DenyAll
        );
        assert_eq!(
            config.http_address.map(|a| a.port()),
            Some(9964),
            "the probes' port"
        );
        assert_eq!(
            config.control_socket.as_deref(),
            Some(Path::new(DEFAULT_CONTROL_SOCKET)),
            "`kubectl exec … palisade status` finds it without --socket"
        );
    }

    #[test]
    fn mistakes_name_the_file_line_and_field() {
        let p = Path::new("agent.yaml");
        let e = Config::parse(p, "cgroupRoot: x\nworkload: []\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("agent.yaml:2:1: unknown field `workload`"),
            "{e}"
        );
        let e = Config::parse(
            p,
            "cgroupRoot: x\nworkloads:\n  - path: \"{ns\"\n    namespace: a\n",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("workloads[0].path"), "{e}");
        let e = Config::parse(
            p,
            "cgroupRoot: x\nservices:\n  - {name: db, namespace: a, addresses: [10.96.0.1], ports: [{port: 5432}]}\n",
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("services[0]: a Service needs a `selector`"),
            "{e}"
        );
        let e = Config::parse(
            p,
            "cgroupRoot: x\nservices:\n  - {name: db, namespace: a, addresses: [10.96.0.1], selector: {app: db}, ports: [{port: 53, protocol: ICMP}]}\n",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("services[0].ports[0].protocol"), "{e}");
        let e = Config::parse(p, "cgroupRoot: x\nhostTraffic: sometimes\n")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("agent.yaml:2:"), "{e}");
        let e = Config::parse(p, "cgroupRoot: x\nmaps: {auditRingBytes: 1000}\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("maps.auditRingBytes: 1000 must be a power of two"),
            "{e}"
        );
    }
}
