//! Offline answers from the compiled tables: `palisade explain` and
//! `palisade simulate`. A world file describes namespaces and pods; it is
//! turned into the same identities, ipcache and compiled entries the agent
//! would write, and each probe is answered by `policy::lookup` — the
//! user-space model of the kernel's lookup — never by re-reading the YAML.
use std::{
    collections::BTreeMap,
    net::IpAddr,
    path::{Path, PathBuf},
};

use ipnet::IpNet;
use palisade_common::{DIR_EGRESS, DIR_INGRESS, IpcacheValue, identity as reserved, verdict};
use serde::{Deserialize, Serialize};

use crate::{
    agent::Planner,
    config::{Config, NamedPortConfig},
    inventory::{Inputs, RemoteChanges, RemoteWorkload},
    policy::{
        self, CompiledPolicy,
        compile::IdentityInfo,
        labels::Labels,
        lookup::{Decision, decide},
        model::Protocol,
    },
};

#[derive(Debug, thiserror::Error)]
pub enum OfflineError {
    #[error("cannot read {path}: {source}")]
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
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
    #[error("{0}")]
    Policy(#[from] policy::LoadError),
}

/// The world file (`--world`).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorldFile {
    #[serde(default)]
    pub namespaces: Vec<WorldNamespace>,
    pub pods: Vec<WorldPod>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorldNamespace {
    pub name: String,
    #[serde(default)]
    pub labels: Labels,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorldPod {
    pub namespace: String,
    pub name: String,
    #[serde(default)]
    pub labels: Labels,
    pub ip: IpAddr,
    #[serde(default)]
    pub ports: Vec<WorldPort>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorldPort {
    pub name: Option<String>,
    pub port: u16,
    #[serde(default = "tcp")]
    pub protocol: String,
}

fn tcp() -> String {
    "TCP".into()
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
pub struct Probe {
    pub from: String,
    pub to: String,
    pub port: u16,
    #[serde(default = "tcp")]
    pub protocol: String,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct ProbeFile {
    pub probes: Vec<Probe>,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
pub struct ProbeResult {
    pub from: String,
    pub to: String,
    pub port: u16,
    pub protocol: String,
    pub allowed: bool,
    pub reason: String,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct ResultFile {
    pub results: Vec<ProbeResult>,
}

fn read(path: &Path) -> Result<String, OfflineError> {
    std::fs::read_to_string(path).map_err(|source| OfflineError::Read {
        path: path.to_owned(),
        source,
    })
}

impl WorldFile {
    pub fn load(path: &Path) -> Result<WorldFile, OfflineError> {
        let text = read(path)?;
        let world: WorldFile = crate::yaml::from_str(&text).map_err(|e| OfflineError::Parse {
            path: path.to_owned(),
            line: e.line,
            column: e.column,
            message: e.message,
        })?;
        let mut seen = BTreeMap::new();
        for (i, p) in world.pods.iter().enumerate() {
            if seen
                .insert(format!("{}/{}", p.namespace, p.name), i)
                .is_some()
            {
                return Err(OfflineError::Invalid {
                    path: path.to_owned(),
                    message: format!("pods[{i}]: pod {}/{} is listed twice", p.namespace, p.name),
                });
            }
        }
        Ok(world)
    }
}

/// A world compiled the way the agent compiles its host.
pub struct Model {
    pub compiled: CompiledPolicy,
    pub identities: BTreeMap<u32, IdentityInfo>,
    /// pod key → (identity, ip)
    pub pods: BTreeMap<String, (u32, IpAddr)>,
    pub ipcache: Vec<(IpNet, IpcacheValue)>,
}

impl Model {
    /// The world's pods become the planner's inputs (workloads known by
    /// address, as pods on other nodes are), and the agent's own planner
    /// compiles them: the same identities, ipcache and entries.
    pub fn build(world: &WorldFile, policies: &policy::PolicySet) -> Model {
        let inputs = Inputs {
            remote: RemoteChanges::all(
                world
                    .pods
                    .iter()
                    .map(|p| RemoteWorkload {
                        namespace: p.namespace.clone(),
                        name: p.name.clone(),
                        labels: p.labels.clone(),
                        ips: vec![p.ip],
                        ports: p
                            .ports
                            .iter()
                            .filter_map(|port| {
                                Some(NamedPortConfig {
                                    name: port.name.clone()?,
                                    port: port.port,
                                    protocol: port.protocol.clone(),
                                })
                            })
                            .collect(),
                    })
                    .collect::<Vec<_>>(),
            ),
            namespaces: world
                .namespaces
                .iter()
                .map(|ns| (ns.name.clone(), ns.labels.clone()))
                .collect(),
            ..Inputs::default()
        };
        let plan = Planner::new(Config::default(), true).plan(inputs, policies);
        let ipcache: Vec<(IpNet, IpcacheValue)> = plan
            .desired
            .ipcache
            .iter()
            .map(|(n, id)| (*n, *id))
            .collect();
        let mut model = Model {
            compiled: (*plan.desired.policy).clone(),
            identities: plan
                .identities
                .into_iter()
                .map(|(id, i)| (id, std::sync::Arc::unwrap_or_clone(i)))
                .collect(),
            pods: BTreeMap::new(),
            ipcache,
        };
        for p in &world.pods {
            let id = model.peer_identity(p.ip).identity;
            model
                .pods
                .insert(format!("{}/{}", p.namespace, p.name), (id, p.ip));
        }
        model
    }

    /// The entry the kernel's ipcache would give `ip` (longest prefix).
    pub fn peer_identity(&self, ip: IpAddr) -> IpcacheValue {
        self.ipcache
            .iter()
            .filter(|(net, _)| net.contains(&ip))
            .max_by_key(|(net, _)| net.prefix_len())
            .map_or(IpcacheValue::of(reserved::WORLD), |(_, v)| *v)
    }

    fn describe(&self, direction: &str, d: Option<Decision>) -> (bool, String) {
        match d {
            None => (true, format!("{direction}: not selected by any policy")),
            Some(d) => {
                let name = |id: u32| {
                    self.compiled.rule(id).map_or_else(
                        || "?".to_owned(),
                        |r| format!("{} {} rule {}", r.kind, r.policy, r.rule),
                    )
                };
                match d.verdict {
                    verdict::ALLOW => {
                        (true, format!("{direction}: allowed by {}", name(d.rule_id)))
                    }
                    verdict::WOULD_DENY => (
                        true,
                        format!(
                            "{direction}: would be denied by {} (audit mode)",
                            name(if d.rule_id != 0 {
                                d.rule_id
                            } else {
                                d.policy_rule_id
                            })
                        ),
                    ),
                    _ if d.rule_id != 0 => {
                        (false, format!("{direction}: denied by {}", name(d.rule_id)))
                    }
                    _ => {
                        let p = self.compiled.rule(d.policy_rule_id);
                        (
                            false,
                            format!(
                                "{direction}: denied: selected by {} {} and no rule allows it",
                                p.map_or("", |r| r.kind),
                                p.map_or("?", |r| r.policy.as_str())
                            ),
                        )
                    }
                }
            }
        }
    }

    /// Answers one probe: both directions, as the kernel would judge them.
    pub fn answer(&self, probe: &Probe) -> Result<ProbeResult, String> {
        let (from_id, from_ip) = *self
            .pods
            .get(&probe.from)
            .ok_or_else(|| format!("unknown pod {:?} (write namespace/name)", probe.from))?;
        let (to_id, to_ip) = *self
            .pods
            .get(&probe.to)
            .ok_or_else(|| format!("unknown pod {:?} (write namespace/name)", probe.to))?;
        let protocol = Protocol::parse(&probe.protocol).ok_or_else(|| {
            format!(
                "unsupported protocol {:?}: TCP, UDP or SCTP",
                probe.protocol
            )
        })?;
        let proto = protocol.number();
        let (result, reason) = if probe.from == probe.to {
            (true, "a pod may always reach itself".to_owned())
        } else {
            let egress = decide(
                &self.compiled,
                DIR_EGRESS,
                proto,
                from_id,
                self.peer_identity(to_ip),
                probe.port,
            );
            let ingress = decide(
                &self.compiled,
                DIR_INGRESS,
                proto,
                to_id,
                self.peer_identity(from_ip),
                probe.port,
            );
            let (e_ok, e_why) = self.describe("egress", egress);
            let (i_ok, i_why) = self.describe("ingress", ingress);
            (e_ok && i_ok, format!("{e_why}; {i_why}"))
        };
        Ok(ProbeResult {
            from: probe.from.clone(),
            to: probe.to.clone(),
            port: probe.port,
            protocol: protocol.as_str().to_owned(),
            allowed: result,
            reason,
        })
    }
}

/// Reads the probes file.
pub fn load_probes(path: &Path) -> Result<ProbeFile, OfflineError> {
    let text = read(path)?;
    serde_json::from_str(&text).map_err(|e| OfflineError::Parse {
        path: path.to_owned(),
        line: e.line() as u64,
        column: e.column() as u64,
        message: e.to_string(),
    })
}

/// Answers every probe, in order.
pub fn simulate(model: &Model, probes: &ProbeFile) -> Result<ResultFile, String> {
    probes
        .probes
        .iter()
        .map(|p| model.answer(p))
        .collect::<Result<Vec<_>, _>>()
        .map(|results| ResultFile { results })
}

#[cfg(test)]
mod tests {
    use super::*;

    const WORLD: &str = r#"
namespaces:
  - name: x
    labels: {ns: x}
  - name: y
    labels: {ns: y}
pods:
  - {namespace: x, name: a, labels: {pod: a}, ip: 10.0.1.1}
  - {namespace: x, name: b, labels: {pod: b}, ip: 10.0.1.2}
  - {namespace: y, name: a, labels: {pod: a}, ip: 10.0.2.1}
"#;

    #[test]
    fn simulate_answers_from_the_compiled_tables() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("world.yaml"), WORLD).unwrap();
        std::fs::write(
            dir.path().join("p.yaml"),
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: only-b, namespace: x}\n\
spec:\n  podSelector: {matchLabels: {pod: a}}\n  ingress:\n  - from: [{podSelector: {matchLabels: {pod: b}}}]\n    ports: [{port: 80}]\n",
        )
        .unwrap();
        let world = WorldFile::load(&dir.path().join("world.yaml")).unwrap();
        let policies = policy::load_paths(&[dir.path().join("p.yaml")]).unwrap();
        let model = Model::build(&world, &policies);
        let probe = |from: &str, to: &str, port| Probe {
            from: from.into(),
            to: to.into(),
            port,
            protocol: "TCP".into(),
        };
        let r = simulate(
            &model,
            &ProbeFile {
                probes: vec![
                    probe("x/b", "x/a", 80),
                    probe("y/a", "x/a", 80),
                    probe("x/b", "x/a", 81),
                    probe("x/a", "x/a", 81),
                    probe("x/a", "y/a", 1),
                ],
            },
        )
        .unwrap();
        let allowed: Vec<bool> = r.results.iter().map(|r| r.allowed).collect();
        assert_eq!(allowed, [true, false, false, true, true]);
        assert!(
            r.results[0]
                .reason
                .contains("ingress: allowed by NetworkPolicy x/only-b rule ingress[0]"),
            "{}",
            r.results[0].reason
        );
        assert!(
            r.results[1]
                .reason
                .contains("ingress: denied: selected by NetworkPolicy x/only-b"),
            "{}",
            r.results[1].reason
        );
        assert!(
            r.results[4].reason.contains("not selected"),
            "{}",
            r.results[4].reason
        );
        assert!(
            simulate(
                &model,
                &ProbeFile {
                    probes: vec![probe("x/zz", "x/a", 1)]
                }
            )
            .unwrap_err()
            .contains("unknown pod \"x/zz\"")
        );
    }
}
