//! Figure 6: a pod event in a large cluster. The agent's planning path —
//! the pod and Service indexes, the planner, the real kernel datapath —
//! with 5,000 and 50,000 pods on other nodes and a ClusterIP Service per
//! app, one pod added, relabelled or deleted at a time (its Service's
//! EndpointSlice changing with it). The same events also go through the whole-list path (every pod
//! turned into planner inputs again, as the agent did before it kept
//! state between rounds), side by side in the same run.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr},
    path::Path,
    sync::Arc,
    time::Instant,
};

use k8s_openapi::api::{core::v1::Service as KubeService, discovery::v1::EndpointSlice};
use kube::runtime::{
    reflector::{self, Store, store::Writer},
    watcher,
};

use palisade::{
    agent::Planner,
    config::Config,
    datapath::kernel::KernelDatapath,
    inventory::Changes,
    inventory::UnknownPods,
    kubernetes::{
        self, Changed, PodInfo,
        endpoints::ServiceIndex,
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

/// The Service of (namespace, app): one ClusterIP Service per pair.
fn service(i: usize, ns: &str, app: &str) -> anyhow::Result<KubeService> {
    Ok(serde_json::from_value(json!({
        "metadata": {"name": app, "namespace": ns},
        "spec": {"clusterIP": format!("10.96.{}.{}", i / 250, i % 250 + 1),
                 "ports": [{"name": "http", "port": 80}]}
    }))?)
}

/// Its one EndpointSlice: the app's pods, ready.
fn slice(ns: &str, app: &str, ips: &BTreeSet<IpAddr>) -> anyhow::Result<EndpointSlice> {
    Ok(serde_json::from_value(json!({
        "metadata": {"name": format!("{app}-1"), "namespace": ns,
                     "labels": {"kubernetes.io/service-name": app}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": ips.iter().map(|ip| json!({"addresses": [ip.to_string()]})).collect::<Vec<_>>()
    }))?)
}

/// The Services and their slices as the API server would list them, kept
/// both as lists (the whole-list path) and as reflector stores fed the
/// changed slices (the changes path).
struct Cluster {
    endpoints: BTreeMap<(String, String), BTreeSet<IpAddr>>,
    services: Vec<Arc<KubeService>>,
    slices: BTreeMap<(String, String), Arc<EndpointSlice>>,
    service_store: Store<KubeService>,
    slice_store: Store<EndpointSlice>,
    slice_writer: Writer<EndpointSlice>,
}

impl Cluster {
    fn new(pods: &[PodInfo]) -> anyhow::Result<Cluster> {
        let mut endpoints: BTreeMap<(String, String), BTreeSet<IpAddr>> = BTreeMap::new();
        for p in pods {
            endpoints
                .entry((p.namespace.clone(), p.labels["app"].clone()))
                .or_default()
                .extend(p.ips.iter().copied());
        }
        // Every (namespace, app) has its Service, pods or not.
        for ns in 0..NAMESPACES {
            for app in 0..APPS {
                endpoints
                    .entry((format!("ns{ns}"), format!("app{app}")))
                    .or_default();
            }
        }
        let (service_store, mut service_writer) = reflector::store();
        let (slice_store, mut slice_writer) = reflector::store();
        service_writer.apply_watcher_event(&watcher::Event::Init);
        slice_writer.apply_watcher_event(&watcher::Event::Init);
        let (mut services, mut slices) = (Vec::new(), BTreeMap::new());
        for (i, ((ns, app), ips)) in endpoints.iter().enumerate() {
            let svc = service(i, ns, app)?;
            let sl = slice(ns, app, ips)?;
            service_writer.apply_watcher_event(&watcher::Event::InitApply(svc.clone()));
            slice_writer.apply_watcher_event(&watcher::Event::InitApply(sl.clone()));
            services.push(Arc::new(svc));
            slices.insert((ns.clone(), app.clone()), Arc::new(sl));
        }
        service_writer.apply_watcher_event(&watcher::Event::InitDone);
        slice_writer.apply_watcher_event(&watcher::Event::InitDone);
        Ok(Cluster {
            endpoints,
            services,
            slices,
            service_store,
            slice_store,
            slice_writer,
        })
    }

    /// A pod's address joins (`Some`) or leaves its app's endpoints; returns
    /// the slice changed, as the watch would record it.
    fn endpoint(&mut self, pod: &PodInfo, join: bool) -> anyhow::Result<Changed> {
        let key = (pod.namespace.clone(), pod.labels["app"].clone());
        let ips = self.endpoints.entry(key.clone()).or_default();
        for ip in &pod.ips {
            if join {
                ips.insert(*ip);
            } else {
                ips.remove(ip);
            }
        }
        let sl = slice(&key.0, &key.1, ips)?;
        self.slice_writer
            .apply_watcher_event(&watcher::Event::Apply(sl.clone()));
        self.slices.insert(key.clone(), Arc::new(sl));
        let mut changed = Changed::default();
        changed.keys.insert((key.0, format!("{}-1", key.1)));
        Ok(changed)
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
) -> anyhow::Result<(f64, Vec<f64>, (usize, usize))> {
    let mut dp = KernelDatapath::load(root, &config.maps, config.maps.audit_ring_bytes / 8, None)?;
    let mut planner = Planner::new(config.clone(), true);
    let mut reconciler = Reconciler::default();
    let mut index = PodIndex::default();
    let mut all: Vec<PodInfo> = (0..pods).map(|i| pod(i, 0)).collect();
    let mut cluster = Cluster::new(&all)?;
    let mut services = ServiceIndex::default();
    let mut step = |changed: Vec<(String, Option<PodInfo>)>,
                    slices: Vec<Changed>,
                    all: &[PodInfo],
                    cluster: &Cluster|
     -> anyhow::Result<()> {
        let mut input = if keep_state {
            let changes = if index.started() {
                PodChanges::Some(changed)
            } else {
                PodChanges::All(all.to_vec())
            };
            index.update("here", changes, &[], UnknownPods::DenyEgress)
        } else {
            kubernetes::inputs("here", all, &[], &[], UnknownPods::DenyEgress)
        };
        input.services = if keep_state {
            let mut slice_changed = Changed::default();
            for c in slices {
                slice_changed.keys.extend(c.keys);
            }
            services.update(
                Changed::default(),
                slice_changed,
                &cluster.service_store,
                &cluster.slice_store,
            )
        } else {
            let slices: Vec<Arc<EndpointSlice>> = cluster.slices.values().cloned().collect();
            Changes::all(kubernetes::services(&cluster.services, &slices))
        };
        let obs = planner.plan(input, policies);
        match reconciler.reconcile(&mut dp, &obs.desired) {
            Outcome::Applied(_) | Outcome::Unchanged => Ok(()),
            Outcome::Refused(e) | Outcome::Partial(e) => Err(anyhow::anyhow!("{e}")),
            Outcome::StillRefused => Err(anyhow::anyhow!("refused")),
        }
    };
    let t = Instant::now();
    step(Vec::new(), Vec::new(), &all, &cluster)?;
    let start = t.elapsed().as_secs_f64() * 1e3;
    let mut events = Vec::new();
    for e in 0..EVENTS {
        // Relabelled (to another existing identity), added, deleted; the
        // pod's Service endpoints follow, as the EndpointSlice controller
        // would.
        let (changed, slices) = match e % 3 {
            0 => {
                let i = (e * 7919) % pods;
                let before = all[i].clone();
                all[i] = pod(i, e + 1);
                let slices = vec![
                    cluster.endpoint(&before, false)?,
                    cluster.endpoint(&all[i], true)?,
                ];
                (
                    vec![(kubernetes::pod_key(&all[i]), Some(all[i].clone()))],
                    slices,
                )
            }
            1 => {
                let p = pod(pods + e, 0);
                all.push(p.clone());
                let slices = vec![cluster.endpoint(&p, true)?];
                (vec![(kubernetes::pod_key(&p), Some(p))], slices)
            }
            _ => {
                let p = all.pop().ok_or_else(|| anyhow::anyhow!("no pods"))?;
                let slices = vec![cluster.endpoint(&p, false)?];
                (vec![(kubernetes::pod_key(&p), None)], slices)
            }
        };
        let t = Instant::now();
        step(changed, slices, &all, &cluster)?;
        events.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let entries = reconciler
        .applied()
        .map_or((0, 0), |d| (d.ipcache.len(), d.services.frontends.len()));
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
        "services": NAMESPACES * APPS,
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
            let (start, events, (ipcache, frontends)) =
                run(root, &config, &policies, pods, keep_state)?;
            rows.push(json!({
                "pods": pods,
                "path": if keep_state { "changes" } else { "whole list" },
                "startMs": start,
                "eventMs": Summary::of(&events),
                "ipcacheEntries": ipcache,
                "serviceFrontends": frontends,
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
