use palisade::{
    agent::planner::Planner,
    config::Config,
    discovery::Cgroup,
    inventory::UnknownPods,
    kubernetes::{self, PodInfo},
    policy::{self, PolicySet},
};
use std::{path::Path, sync::Arc, time::Instant};

fn pod(i: usize, node: &str, app_variant: usize) -> PodInfo {
    PodInfo {
        uid: format!("uid-{i:06}"),
        namespace: format!("ns{}", i % 100),
        name: format!("pod-{i}"),
        node: Some(node.into()),
        labels: [
            (
                "app".to_owned(),
                format!("app{}", (i / 100 + app_variant) % 50),
            ),
            (
                "io.kubernetes.pod.serviceaccount".to_owned(),
                "default".to_owned(),
            ),
        ]
        .into(),
        ips: vec![std::net::IpAddr::V4(std::net::Ipv4Addr::from(
            0x0a00_0000u32 + i as u32 + 2,
        ))],
        ports: Vec::new(),
        host_network: false,
        terminating: false,
        created: "2026-01-01T00:00:00Z".into(),
    }
}

fn main() {
    let mut text = String::new();
    for ns in 0..100 {
        for a in 0..5 {
            text.push_str(&format!("---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: p{a}, namespace: ns{ns}}}\nspec:\n  podSelector: {{matchLabels: {{app: app{a}}}}}\n  ingress:\n  - from:\n    - podSelector: {{matchLabels: {{app: app{}}}}}\n    ports: [{{port: 80}}]\n", a + 10));
        }
    }
    let policies = PolicySet {
        policies: policy::load::parse_str("p.yaml", &text)
            .unwrap()
            .into_iter()
            .map(Arc::new)
            .collect(),
        files: Vec::new(),
    };
    for n in [50_000usize] {
        let config = Config::parse(Path::new("t.yaml"), "cgroupRoot: x\n").unwrap();
        let mut planner = Planner::new(config, true);
        let mut pods: Vec<PodInfo> = (0..n)
            .map(|i| pod(i, if i < 100 { "me" } else { "other" }, 0))
            .collect();
        let cgroups: Vec<Cgroup> = (0..100)
            .map(|i| Cgroup {
                rel_path: format!(
                    "kubepods.slice/kubepods-pod{}.slice",
                    format!("uid-{i:06}").replace('-', "_")
                ),
                id: 1000 + i as u64,
            })
            .collect();
        let mut index = kubernetes::pods::PodIndex::default();
        let t = Instant::now();
        let input = index.update("me", kubernetes::pods::PodChanges::All(pods.clone()), &cgroups, UnknownPods::DenyEgress);
        let t_in = t.elapsed();
        let t = Instant::now();
        let obs = planner.plan(input, &policies);
        let t_plan = t.elapsed();
        println!(
            "n={n}: first: inputs {t_in:?} plan {t_plan:?} workloads {} ipcache {} entries {}",
            obs.workloads.len(),
            obs.desired.ipcache.len(),
            obs.desired.policy.entries.len()
        );
        let mut prev = obs.desired;
        for k in 0..60 {
            pods[n - 1 - k] = pod(n - 1 - k, "other", 7);
            let t = Instant::now();
            let key = kubernetes::pod_key(&pods[n - 1 - k]);
            let input = index.update("me", kubernetes::pods::PodChanges::Some(vec![(key, Some(pods[n-1-k].clone()))]), &cgroups, UnknownPods::DenyEgress);
            let t_in = t.elapsed();
            let t = Instant::now();
            let same = false;
            let t_eq = t.elapsed();
            let t = Instant::now();
            let obs = planner.plan(input, &policies);
            let t_plan = t.elapsed();
            let t = Instant::now();
            let eq = prev == obs.desired;
            let t_cmp = t.elapsed();
            let t = Instant::now();
            let c = obs.desired.clone();
            let t_clone = t.elapsed();
            println!(
                "  event: inputs {t_in:?} plan {t_plan:?} desired== {t_cmp:?} ({eq}) clone {t_clone:?} {same}{t_eq:?}"
            );
            prev = c;
        }
    }
}
