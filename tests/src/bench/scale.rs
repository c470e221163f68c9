//! Figure 6: a pod event in a large cluster. The agent's planning path —
//! the pod index, the planner, the real kernel datapath — with 5,000 and
//! 50,000 pods on other nodes, one pod added, relabelled or deleted at a
//! time. The same events also go through the whole-list path (every pod
//! turned into planner inputs again, as the agent did before it kept
//! state between rounds), side by side in the same run.
use std::{
    net::{IpAddr, Ipv4Addr},
    path::Path,
    sync::Arc,
    time::Instant,
};

use palisade::{
    agent::Planner,
    config::Config,
    datapath::kernel::KernelDatapath,
    inventory::UnknownPods,
    kubernetes::{
        self, PodInfo,
        pods::{PodChanges, PodIndex},
    },
    policy::{self, PolicySet},
    reconcile::{Outcome, Reconciler},
};
use serde_json::{Value, json};

use super::report::Summary;

const NAMESPACES: usize = 100;
/// Distinct `app` labels per namespace: identities = namespaces × apps.
const APPS: usize = 25;
/// Pod events measured per size and path.
const EVENTS: usize = 21;

fn pod(i: usize, relabel: usize) -> PodInfo {
    PodInfo {
        uid: format!("00000000-0000-4000-8000-{i:012}"),
        namespace: format!("ns{}", i % NAMESPACES),
        name: format!("pod-{i}"),
        node: Some("elsewhere".into()),
        labels: [
            (
                "app".to_owned(),
                format!("app{}", (i / NAMESPACES + relabel) % APPS),
            ),
            (
                kubernetes::SERVICE_ACCOUNT_LABEL.to_owned(),
                "default".to_owned(),
            ),
        ]
        .into(),
        ips: vec![IpAddr::V4(Ipv4Addr::from(0x0a40_0000u32 + i as u32))],
        ports: Vec::new(),
        host_network: false,
        terminating: false,
        created: "2026-01-01T00:00:00Z".into(),
    }
}

/// Five NetworkPolicies per namespace, each selecting one app and allowing
/// another on one port.
fn policies() -> anyhow::Result<PolicySet> {
    let mut text = String::new();
    for ns in 0..NAMESPACES {
        for a in 0..5 {
            text.push_str(&format!(
                "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: p{a}, namespace: ns{ns}}}\nspec:\n  podSelector: {{matchLabels: {{app: app{a}}}}}\n  ingress:\n  - from: [{{podSelector: {{matchLabels: {{app: app{}}}}}}}]\n    ports: [{{port: 80}}]\n",
                a + 10
            ));
        }
    }
    Ok(PolicySet {
        policies: policy::load::parse_str("scale.yaml", &text)
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .into_iter()
            .map(Arc::new)
            .collect(),
        files: Vec::new(),
    })
}

/// One size, one path: the start (every pod) and each event, in ms.
fn run(
    root: &Path,
    config: &Config,
    policies: &PolicySet,
    pods: usize,
    keep_state: bool,
) -> anyhow::Result<(f64, Vec<f64>, usize)> {
    let mut dp = KernelDatapath::load(root, &config.maps, config.maps.audit_ring_bytes / 8, None)?;
    let mut planner = Planner::new(config.clone(), true);
    let mut reconciler = Reconciler::default();
    let mut index = PodIndex::default();
    let mut all: Vec<PodInfo> = (0..pods).map(|i| pod(i, 0)).collect();
    let mut step =
        |changed: Vec<(String, Option<PodInfo>)>, all: &[PodInfo]| -> anyhow::Result<()> {
            let input = if keep_state {
                let changes = if index.started() {
                    PodChanges::Some(changed)
                } else {
                    PodChanges::All(all.to_vec())
                };
                index.update("here", changes, &[], UnknownPods::DenyEgress)
            } else {
                kubernetes::inputs("here", all, &[], &[], UnknownPods::DenyEgress)
            };
            let obs = planner.plan(input, policies);
            match reconciler.reconcile(&mut dp, &obs.desired) {
                Outcome::Applied(_) | Outcome::Unchanged => Ok(()),
                Outcome::Refused(e) | Outcome::Partial(e) => Err(anyhow::anyhow!("{e}")),
                Outcome::StillRefused => Err(anyhow::anyhow!("refused")),
            }
        };
    let t = Instant::now();
    step(Vec::new(), &all)?;
    let start = t.elapsed().as_secs_f64() * 1e3;
    let mut events = Vec::new();
    for e in 0..EVENTS {
        // Relabelled (to another existing identity), added, deleted.
        let changed = match e % 3 {
            0 => {
                let i = (e * 7919) % pods;
                all[i] = pod(i, e + 1);
                vec![(kubernetes::pod_key(&all[i]), Some(all[i].clone()))]
            }
            1 => {
                let p = pod(pods + e, 0);
                all.push(p.clone());
                vec![(kubernetes::pod_key(&p), Some(p))]
            }
            _ => {
                let p = all.pop().ok_or_else(|| anyhow::anyhow!("no pods"))?;
                vec![(kubernetes::pod_key(&p), None)]
            }
        };
        let t = Instant::now();
        step(changed, &all)?;
        events.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let entries = reconciler.applied().map_or(0, |d| d.ipcache.len());
    Ok((start, events, entries))
}

pub fn figure(root: &Path, quick: bool) -> anyhow::Result<Value> {
    let config = Config::default();
    let policies = policies()?;
    let sizes: &[usize] = &[5_000, 50_000];
    let mut out = json!({
        "namespaces": NAMESPACES,
        "identities": NAMESPACES * APPS,
        "policies": policies.policies.len(),
        "events": EVENTS,
    });
    let mut rows = Vec::new();
    for &pods in sizes {
        for keep_state in [true, false] {
            if !keep_state && quick && pods > 5_000 {
                // The whole-list path at 50,000 pods takes seconds per
                // size; the quick run measures it at 5,000 only.
                continue;
            }
            super::step(&format!(
                "scale: {pods} pods, {}",
                if keep_state { "changes" } else { "whole list" }
            ));
            let (start, events, ipcache) = run(root, &config, &policies, pods, keep_state)?;
            rows.push(json!({
                "pods": pods,
                "path": if keep_state { "changes" } else { "whole list" },
                "startMs": start,
                "eventMs": Summary::of(&events),
                "ipcacheEntries": ipcache,
            }));
        }
    }
    let event = |pods: usize, path: &str| {
        rows.iter()
            .find(|r| r["pods"] == pods && r["path"] == path)
            .and_then(|r| r["eventMs"]["median"].as_f64())
    };
    if let (Some(small), Some(large)) = (event(5_000, "changes"), event(50_000, "changes")) {
        out["eventRatio50kTo5k"] = json!(large / small);
    }
    if let (Some(kept), Some(whole)) = (event(5_000, "changes"), event(5_000, "whole list")) {
        out["wholeListTo5kChanges"] = json!(whole / kept);
    }
    out["rows"] = Value::Array(rows);
    Ok(out)
}
