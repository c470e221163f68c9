//! Conformance: the world of a world file built for real (a network namespace
//! and a cgroup per pod), the agent enforcing the policies, every probe tried
//! with real traffic, results in the same JSON as `palisade simulate`.
//!
//! With `Via::Services`, the world is built as a node builds it (pods routed
//! through the node's namespace) with one ClusterIP Service per pod and
//! kube-proxy's rules for them, and every probe is tried twice: to the pod's
//! address, and to its Service's ClusterIP, as the upstream e2e suite does.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::Context as _;
use palisade::offline::{ProbeFile, ProbeResult, ResultFile, WorldFile};

use crate::{
    agent::Agent,
    kubeproxy::{self, ServicePortRule},
    world::{PodSpec, World},
};

/// How probes reach their target.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Via {
    /// To the pod's address only.
    Direct,
    /// To the pod's address, and again through its ClusterIP Service with
    /// kube-proxy's rules in this mode.
    Services(kubeproxy::Mode),
}

/// What a run observed.
pub struct Observed {
    pub direct: ResultFile,
    /// The same probes through each target's ClusterIP (with `Via::Services`).
    pub via_services: Option<ResultFile>,
}

/// How many probes run at once.
const PARALLEL: usize = 64;

fn quote(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_default()
}

/// Agent config: one workload rule per pod (its exact cgroup path), namespaces
/// with labels; the control socket in the agent's directory (the audit file's).
fn config(world: &World, file: &WorldFile, policies: &Path, audit: &Path) -> String {
    let mut c = format!(
        "cgroupRoot: {}\nbpfPinDir: /sys/fs/bpf/palisade-test-{}\ncontrolSocket: {}\npolicyDir: {}\naudit:\n  output: {}\nrescanIntervalMs: 100\nnamespaces:\n",
        world.cgroup_root.display(),
        world.tag,
        // Next to the audit file, where `Agent::status` looks.
        audit.with_file_name("palisade.sock").display(),
        policies.display(),
        audit.display()
    );
    let mut names: BTreeSet<&str> = file.pods.iter().map(|p| p.namespace.as_str()).collect();
    for ns in &file.namespaces {
        names.remove(ns.name.as_str());
        c.push_str(&format!("  - name: {}\n    labels: {{", quote(&ns.name)));
        let labels: Vec<String> = ns
            .labels
            .iter()
            .map(|(k, v)| format!("{}: {}", quote(k), quote(v)))
            .collect();
        c.push_str(&labels.join(", "));
        c.push_str("}\n");
    }
    for ns in names {
        c.push_str(&format!("  - name: {}\n", quote(ns)));
    }
    c.push_str("workloads:\n");
    for p in &file.pods {
        let labels: Vec<String> = p
            .labels
            .iter()
            .map(|(k, v)| format!("{}: {}", quote(k), quote(v)))
            .collect();
        let ports: Vec<String> = p
            .ports
            .iter()
            .filter_map(|port| {
                let name = port.name.as_ref()?;
                Some(format!(
                    "{{name: {}, port: {}, protocol: {}}}",
                    quote(name),
                    port.port,
                    quote(&port.protocol)
                ))
            })
            .collect();
        c.push_str(&format!(
            "  - path: {}\n    namespace: {}\n    name: {}\n    labels: {{{}}}\n    ports: [{}]\n",
            quote(&format!("{}/{}", p.namespace, p.name)),
            quote(&p.namespace),
            quote(&p.name),
            labels.join(", "),
            ports.join(", ")
        ));
    }
    c
}

fn meaning(word: &str) -> String {
    match word {
        "ok" => "connected".into(),
        "eperm" => "refused at the sender (EPERM)".into(),
        "timeout" => "dropped (no answer)".into(),
        "refused" => "refused (no listener)".into(),
        other => other.into(),
    }
}

/// Builds the world, runs the agent with `policies`, tries every probe.
pub fn run(
    world_file: &Path,
    policies: &[PathBuf],
    probes: &ProbeFile,
) -> anyhow::Result<ResultFile> {
    Ok(run_via(world_file, policies, probes, Via::Direct)?.direct)
}

/// Agent config lines for the node and one Service per pod.
fn services_config(world: &World, rules: &[ServicePortRule]) -> String {
    let mut c = format!(
        "hostTraffic: allow
hostAddresses: [{}, {}]
services:
",
        world.gateway_v4(),
        world.gateway_v6()
    );
    for r in rules {
        let (ns, name) = r.service.split_once('/').unwrap_or(("", &r.service));
        c.push_str(&format!(
            "  - name: {}
    namespace: {}
    addresses: [{}]
    endpoints: [{}]
    ports: [{{name: {}, port: {}, protocol: {}, targetPort: {}}}]
",
            quote(name),
            quote(ns),
            r.addresses[0],
            r.endpoints[0].0,
            quote(&r.port_name),
            r.port,
            r.protocol.to_uppercase(),
            r.endpoints[0].1
        ));
    }
    c
}

/// Like [`run`]; with `Via::Services` also through one ClusterIP per pod.
pub fn run_via(
    world_file: &Path,
    policies: &[PathBuf],
    probes: &ProbeFile,
    via: Via,
) -> anyhow::Result<Observed> {
    let file = WorldFile::load(world_file)?;
    let dir = tempfile::tempdir()?;
    // The agent reads one directory: gather the policy files there.
    let policy_dir = dir.path().join("policies");
    std::fs::create_dir_all(&policy_dir)?;
    let mut n = 0;
    for p in policies {
        let files: Vec<PathBuf> = if p.is_dir() {
            let mut f: Vec<PathBuf> = std::fs::read_dir(p)?
                .flatten()
                .map(|e| e.path())
                .filter(|f| matches!(f.extension().and_then(|e| e.to_str()), Some("yaml" | "yml")))
                .collect();
            f.sort();
            f
        } else {
            vec![p.clone()]
        };
        for f in files {
            n += 1;
            std::fs::copy(&f, policy_dir.join(format!("{n:03}.yaml")))
                .with_context(|| format!("reading {}", f.display()))?;
        }
    }
    // Every port a probe aims at is served.
    let mut tcp: BTreeMap<String, BTreeSet<u16>> = BTreeMap::new();
    let mut udp: BTreeMap<String, BTreeSet<u16>> = BTreeMap::new();
    for p in &probes.probes {
        let set = if p.protocol.eq_ignore_ascii_case("UDP") {
            &mut udp
        } else {
            &mut tcp
        };
        set.entry(p.to.clone()).or_default().insert(p.port);
    }
    let mut world = World::new()?;
    let node = via != Via::Direct;
    if node {
        world.make_node()?;
    }
    for p in &file.pods {
        let key = format!("{}/{}", p.namespace, p.name);
        let t: Vec<u16> = tcp
            .get(&key)
            .map(|s| s.iter().copied().collect())
            .unwrap_or_default();
        let u: Vec<u16> = udp
            .get(&key)
            .map(|s| s.iter().copied().collect())
            .unwrap_or_default();
        world.add_pod_at(PodSpec::new(&p.namespace, &p.name, &t, &u), Some(p.ip))?;
    }
    // One ClusterIP Service per pod, with a port per probed port.
    let mut vips: BTreeMap<String, IpAddr> = BTreeMap::new();
    let mut rules = Vec::new();
    if let Via::Services(mode) = via {
        world.route_all_via_node()?;
        for (i, p) in file.pods.iter().enumerate() {
            let key = format!("{}/{}", p.namespace, p.name);
            let index = u8::try_from(i + 10)?;
            let vip: IpAddr = if p.ip.is_ipv4() {
                world.service_v4(index).into()
            } else {
                world.service_v6(index).into()
            };
            vips.insert(key.clone(), vip);
            for (proto, set) in [("tcp", &tcp), ("udp", &udp)] {
                for port in set.get(&key).into_iter().flatten() {
                    rules.push(ServicePortRule {
                        service: format!("{}/s-{}-{}", p.namespace, p.name, port),
                        port_name: format!("{proto}-{port}"),
                        protocol: proto.into(),
                        addresses: vec![vip],
                        port: *port,
                        node_port: None,
                        endpoints: vec![(p.ip, *port)],
                    });
                }
            }
        }
        kubeproxy::sync(&world, mode, &rules)?;
    } else {
        world.route_all()?;
    }
    let mut cfg = config(&world, &file, &policy_dir, &dir.path().join("audit.jsonl"));
    if node {
        cfg.push_str(&services_config(&world, &rules));
    }
    let mut agent = Agent::start(dir.path(), &cfg)?;
    agent.wait_enforcing(&world)?;
    let ips: BTreeMap<String, IpAddr> = file
        .pods
        .iter()
        .map(|p| (format!("{}/{}", p.namespace, p.name), p.ip))
        .collect();
    let direct = probe_all(&world, probes, &ips)?;
    let via_services = if vips.is_empty() {
        None
    } else {
        Some(probe_all(&world, probes, &vips)?)
    };
    agent.stop()?;
    Ok(Observed {
        direct,
        via_services,
    })
}

/// Tries every probe, each to `targets[probe.to]`.
fn probe_all(
    world: &World,
    probes: &ProbeFile,
    targets: &BTreeMap<String, IpAddr>,
) -> anyhow::Result<ResultFile> {
    let ips = targets;
    let timeout = Duration::from_millis(1000);
    let mut results = Vec::with_capacity(probes.probes.len());
    for chunk in probes.probes.chunks(PARALLEL) {
        let words: Vec<anyhow::Result<String>> = std::thread::scope(|s| {
            let handles: Vec<_> = chunk
                .iter()
                .map(|p| {
                    s.spawn(move || -> anyhow::Result<String> {
                        let to = *ips
                            .get(&p.to)
                            .with_context(|| format!("unknown pod {:?}", p.to))?;

                        let proto = if p.protocol.eq_ignore_ascii_case("UDP") {
                            "udp"
                        } else {
                            "tcp"
                        };
                        world.probe(world.pod(&p.from), proto, to, p.port, timeout)
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or_else(|_| Err(anyhow::anyhow!("probe thread panicked")))
                })
                .collect()
        });
        for (p, word) in chunk.iter().zip(words) {
            let word = word?;
            results.push(ProbeResult {
                from: p.from.clone(),
                to: p.to.clone(),
                port: p.port,
                protocol: p.protocol.to_ascii_uppercase(),
                allowed: word == "ok",
                reason: meaning(&word),
            });
        }
    }
    Ok(ResultFile { results })
}

/// Differences between kernel results and offline results, as readable lines.
pub fn differences(kernel: &ResultFile, offline: &ResultFile) -> Vec<String> {
    kernel
        .results
        .iter()
        .zip(&offline.results)
        .filter(|(k, o)| k.allowed != o.allowed)
        .map(|(k, o)| {
            format!(
                "{} → {} {}/{}: kernel {} ({}), simulate {} ({})",
                k.from,
                k.to,
                k.protocol,
                k.port,
                if k.allowed { "allowed" } else { "denied" },
                k.reason,
                if o.allowed { "allowed" } else { "denied" },
                o.reason
            )
        })
        .collect()
}
