//! The agent's Kubernetes watchers (kube-rs, unchanged) against the fake API
//! server: the first list fills the stores, watch events follow, a 410 Gone
//! makes them re-list and catch up on what they missed, and policy objects
//! come and go.
use std::{path::PathBuf, time::Duration};

use palisade::kubernetes::{Cluster, client, pod_info};
use palisade_tests::kubeapi::{FakeApiServer, Kind};
use serde_json::json;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("kubernetes/fixtures")
}

fn serve_fixtures() -> FakeApiServer {
    let api = FakeApiServer::start().expect("fake API server");
    for (kind, file) in [
        (Kind::Namespaces, "namespaces.json"),
        (Kind::Pods, "pods.json"),
        (Kind::NetworkPolicies, "networkpolicies.json"),
        (Kind::PalisadePolicies, "palisadepolicies.json"),
    ] {
        api.apply_list_file(kind, &fixtures().join(file)).unwrap();
    }
    api
}

/// Polls `cond` every 20 ms for up to `secs` seconds.
async fn eventually(secs: u64, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "not within {secs} s: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn app_of(cluster: &Cluster, name: &str) -> Option<String> {
    cluster
        .pods
        .state()
        .iter()
        .filter_map(|p| pod_info(p))
        .find(|p| p.name == name)
        .map(|p| p.labels["app"].clone())
}

const ORDER: &str = "order-service-5f6b7c8d9e-k4m2n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watchers_list_follow_relist_after_410_and_track_policies() {
    let api = serve_fixtures();
    let dir = tempfile::tempdir().unwrap();
    let client = client(Some(&api.kubeconfig(dir.path()).unwrap()))
        .await
        .expect("client from kubeconfig");
    let cluster = Cluster::start(client);

    // 1. The first list of every kind.
    eventually(10, "every kind listed", || cluster.synced()).await;
    assert_eq!(cluster.pods.state().len(), 6);
    assert_eq!(cluster.namespaces.state().len(), 4);
    let (policies, problems) = cluster.policies();
    assert!(problems.is_empty(), "{problems:?}");
    assert_eq!(policies.len(), 2);
    let requests = api.requests();
    for path in [
        "/api/v1/pods?",
        "/api/v1/namespaces?",
        "/apis/networking.k8s.io/v1/networkpolicies?",
        "/apis/palisade.dev/v1alpha1/palisadepolicies?",
        "/apis/palisade.dev/v1alpha1/clusterpalisadepolicies?",
    ] {
        assert!(
            requests
                .iter()
                .any(|r| r.contains(path) && !r.contains("watch=")),
            "no list of {path}: {requests:?}"
        );
    }

    // 2. A watch event: a label change on a pod.
    let mut pod = api.get(Kind::Pods, "production", ORDER).unwrap();
    pod["metadata"]["labels"]["app"] = json!("order-service-v2");
    api.apply(Kind::Pods, pod.clone());
    eventually(5, "relabel seen through the watch", || {
        app_of(&cluster, ORDER).as_deref() == Some("order-service-v2")
    })
    .await;
    assert!(
        api.requests()
            .iter()
            .any(|r| r.contains("/api/v1/pods?") && r.contains("watch=")),
        "pods are watched"
    );

    // 3. The history is compacted and the watches end; a change made in the
    //    gap is only visible to a client that re-lists after its 410.
    let lists_before = api
        .requests()
        .iter()
        .filter(|r| r.contains("/api/v1/pods?") && !r.contains("watch="))
        .count();
    api.expire();
    pod["metadata"]["labels"]["app"] = json!("order-service");
    api.apply(Kind::Pods, pod);
    api.expire();
    eventually(
        15,
        "the change made during the gap is seen after a re-list",
        || app_of(&cluster, ORDER).as_deref() == Some("order-service"),
    )
    .await;
    assert!(api.gone_served() >= 1, "a watch got 410 Gone");
    let lists_after = api
        .requests()
        .iter()
        .filter(|r| r.contains("/api/v1/pods?") && !r.contains("watch="))
        .count();
    assert!(
        lists_after > lists_before,
        "pods were listed again after 410"
    );

    // 4. A policy object deleted, a ClusterPalisadePolicy created.
    assert!(api.delete(
        Kind::NetworkPolicies,
        "production",
        "payment-service-policy"
    ));
    api.apply(
        Kind::ClusterPalisadePolicies,
        json!({"metadata": {"name": "baseline"}, "spec": {
            "selector": {}, "egress": [{"name": "dns", "to": [{"namespaces": {}}],
            "ports": [{"protocol": "UDP", "port": 53}]}]}}),
    );
    let c = &cluster;
    eventually(5, "policies follow deletes and creates", move || {
        let names: Vec<String> = c.policies().0.iter().map(|p| p.qualified_name()).collect();
        names == ["baseline", "production/logging-quiet"]
    })
    .await;
    assert_eq!(
        cluster.errors.load(std::sync::atomic::Ordering::Relaxed),
        0,
        "410 is not an error"
    );
}
