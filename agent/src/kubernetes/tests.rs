//! Unit tests over recorded API objects (tests/kubernetes/fixtures).
use super::*;

fn fixture<T: serde::de::DeserializeOwned>(name: &str) -> Vec<T> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/kubernetes/fixtures")
        .join(name);
    let list: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    list["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| serde_json::from_value(i.clone()).unwrap())
        .collect()
}

fn pods() -> Vec<PodInfo> {
    fixture::<Pod>("pods.json")
        .iter()
        .filter_map(pod_info)
        .collect()
}

const PAYMENT_UID: &str = "8dbf9f0e-3c4b-4d1e-9a57-2f1c0b6e7d21";
const PROXY_UID: &str = "4d5e6f70-8192-4dae-bfc0-3b4c5d6e7f80";

#[test]
fn pod_identity_labels_carry_the_service_account_and_addresses() {
    let pods = pods();
    assert_eq!(pods.len(), 5, "the finished job pod is left out");
    let payment = pods.iter().find(|p| p.uid == PAYMENT_UID).unwrap();
    assert_eq!(payment.namespace, "production");
    assert_eq!(payment.labels["app"], "payment-service");
    assert_eq!(payment.labels[SERVICE_ACCOUNT_LABEL], "payment");
    assert_eq!(
        payment.ips,
        vec![
            "10.244.1.12".parse::<IpAddr>().unwrap(),
            "fd00:10:244:1::c".parse().unwrap()
        ]
    );
    assert_eq!(
        payment
            .ports
            .iter()
            .map(|p| (p.name.as_str(), p.port))
            .collect::<Vec<_>>(),
        [("https", 443), ("health", 8080)]
    );
    let key = crate::identity::LabelKey {
        namespace: Some(payment.namespace.clone()),
        labels: payment.labels.clone(),
    };
    assert_eq!(
        crate::identity::display_name("prod.example", &key, &payment.name),
        "spiffe://prod.example/ns/production/sa/payment"
    );
    let logging = pods.iter().find(|p| p.name.starts_with("logging")).unwrap();
    assert_eq!(
        logging.labels[SERVICE_ACCOUNT_LABEL], "default",
        "a pod without serviceAccountName runs as `default`"
    );
}

fn cg(id: u64, path: String) -> Cgroup {
    Cgroup { rel_path: path, id }
}

#[test]
fn local_cgroups_become_pods_host_network_is_host_unknown_is_held() {
    let pods = pods();
    let namespaces: Vec<Arc<Namespace>> = fixture("namespaces.json")
        .into_iter()
        .map(Arc::new)
        .collect();
    let unknown_uid = "0f0e0d0c-0b0a-4909-8807-060504030201";
    let cgroups = vec![
        cg(10, "kubepods.slice/kubepods-burstable.slice".into()),
        cg(
            11,
            cgroup::systemd_pod_path(PAYMENT_UID, cgroup::Qos::Burstable),
        ),
        cg(
            12,
            format!(
                "{}/cri-containerd-aa.scope",
                cgroup::systemd_pod_path(PAYMENT_UID, cgroup::Qos::Burstable)
            ),
        ),
        cg(
            13,
            cgroup::systemd_pod_path(PROXY_UID, cgroup::Qos::BestEffort),
        ),
        cg(
            14,
            cgroup::systemd_pod_path(unknown_uid, cgroup::Qos::BestEffort),
        ),
    ];
    let got = inputs(
        "node-a",
        &pods,
        &namespaces,
        &cgroups,
        UnknownPods::DenyEgress,
    );
    let local: Vec<(u64, &str)> = got
        .workloads
        .iter()
        .map(|w| (w.cgroup_id, w.name.as_str()))
        .collect();
    assert_eq!(
        local,
        [
            (11, "payment-service-7d9c5b8f6d-x2l9q"),
            (12, "payment-service-7d9c5b8f6d-x2l9q")
        ],
        "the pod cgroup and its container cgroup are the pod"
    );
    assert_eq!(got.held.get(&13), Some(&reserved::HOST), "hostNetwork pod");
    assert_eq!(
        got.held.get(&14),
        Some(&reserved::PENDING),
        "pod not known yet"
    );
    assert_eq!(
        got.held.get(&10),
        Some(&reserved::UNMANAGED),
        "a QoS slice is not a pod: unmanaged (not left pending)"
    );
    // Remote: every other running pod with an address, hostNetwork excluded.
    let mut remote: Vec<&str> = got.remote.objects().map(|r| r.name.as_str()).collect();
    remote.sort();
    assert_eq!(
        remote,
        [
            "logging-6c7d8e9f0a-p8q7r",
            "order-service-5f6b7c8d9e-k4m2n",
            "prometheus-0"
        ]
    );
    assert_eq!(
        got.local_without_cgroup,
        ["production/order-service-5f6b7c8d9e-k4m2n"],
        "order-service is on node-a"
    );
    assert_eq!(got.namespaces["monitoring"]["name"], "monitoring");

    let allow = inputs("node-a", &pods, &namespaces, &cgroups, UnknownPods::Allow);
    assert!(!allow.held.contains_key(&14));
}

/// A recycled address: the old pod is still listed (terminating) with the
/// address the runtime gave a new pod. The new pod owns it wherever it is
/// judged: on its own node (its cgroup is there) and on every other node.
#[test]
fn a_recycled_address_belongs_to_the_new_pod_not_the_terminating_one() {
    let base = pods();
    let payment = base.iter().find(|p| p.uid == PAYMENT_UID).unwrap();
    let reused: IpAddr = "10.244.1.12".parse().unwrap();
    let mut old = payment.clone();
    old.terminating = true;
    old.created = "2026-01-01T00:00:00Z".into();
    let mut new = payment.clone();
    new.uid = "99999999-0000-4000-8000-000000000001".into();
    new.name = "intruder".into();
    new.labels.insert("app".into(), "logging".into());
    new.ips = vec![reused];
    new.created = "2026-01-01T00:05:00Z".into();
    let node_of_new = vec![cg(
        21,
        cgroup::systemd_pod_path(&new.uid, cgroup::Qos::BestEffort),
    )];
    for (old_first, cgroups, node) in [
        (true, node_of_new.clone(), "node-a"),
        (false, node_of_new, "node-a"),
        (true, Vec::new(), "node-b"),
        (false, Vec::new(), "node-b"),
    ] {
        let list = if old_first {
            vec![old.clone(), new.clone()]
        } else {
            vec![new.clone(), old.clone()]
        };
        let got = inputs(node, &list, &[], &cgroups, UnknownPods::DenyEgress);
        let claimants: Vec<&str> = got
            .workloads
            .iter()
            .filter(|w| w.ips.contains(&reused))
            .map(|w| w.name.as_str())
            .chain(
                got.remote
                    .objects()
                    .filter(|r| r.ips.contains(&reused))
                    .map(|r| r.name.as_str()),
            )
            .collect();
        assert_eq!(
            claimants,
            ["intruder"],
            "{node}, old listed first: {old_first}"
        );
    }
    // Neither terminating: the pod created last owns the address (the
    // runtime cannot have given it to the older one after the newer).
    old.terminating = false;
    let got = inputs(
        "node-b",
        &[new.clone(), old.clone()],
        &[],
        &[],
        UnknownPods::Allow,
    );
    let owner: Vec<&str> = got
        .remote
        .objects()
        .filter(|r| r.ips.contains(&reused))
        .map(|r| r.name.as_str())
        .collect();
    assert_eq!(owner, ["intruder"]);
    // The old pod keeps its other addresses.
    assert!(got.remote.objects().any(
        |r| r.name == payment.name && r.ips == ["fd00:10:244:1::c".parse::<IpAddr>().unwrap()]
    ));
}

fn store<K>(objects: Vec<K>) -> Store<K>
where
    K: Resource + Clone + std::fmt::Debug + Send + Sync + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone,
{
    let (reader, mut writer) = reflector::store();
    writer.apply_watcher_event(&watcher::Event::Init);
    for o in objects {
        writer.apply_watcher_event(&watcher::Event::InitApply(o));
    }
    writer.apply_watcher_event(&watcher::Event::InitDone);
    reader
}

fn cluster_with(nps: Vec<NetworkPolicy>, pps: Vec<crate::policy::api::PalisadePolicy>) -> Cluster {
    Cluster {
        pods: store(Vec::new()),
        namespaces: store(Vec::new()),
        network_policies: store(nps),
        palisade_policies: store(pps),
        cluster_palisade_policies: store(Vec::new()),
        services: store(Vec::new()),
        endpoint_slices: store(Vec::new()),
        pod_changes: Default::default(),
        service_changes: Default::default(),
        slice_changes: Default::default(),
        nodes: store(Vec::new()),
        synced: Arc::new(Default::default()),
        changed: Arc::new(tokio::sync::Notify::new()),
        errors: Arc::new(AtomicU64::new(0)),
        contact: super::Contact::new(),
        policy_epoch: Arc::new(AtomicU64::new(0)),
        tasks: Vec::new(),
        parsed: Mutex::new(HashMap::new()),
    }
}

#[test]
fn policy_objects_compile_like_the_same_policy_files() {
    let cluster = cluster_with(
        fixture("networkpolicies.json"),
        fixture("palisadepolicies.json"),
    );
    let (policies, problems) = cluster.policies();
    assert!(problems.is_empty(), "{problems:?}");
    let names: Vec<String> = policies.iter().map(|p| p.qualified_name()).collect();
    assert_eq!(
        names,
        [
            "production/payment-service-policy",
            "production/logging-quiet"
        ]
    );
    // The NetworkPolicy object means what the committed policy file means.
    let file = crate::policy::load::load_paths(&[std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../policies/kubernetes/payment-service-policy.yaml")])
    .unwrap();
    let strip = |p: &Policy| {
        let mut p = p.clone();
        p.origin = crate::policy::model::Origin {
            file: String::new(),
            line: 0,
            kind: p.origin.kind,
        };
        p
    };
    assert_eq!(strip(&policies[0]), strip(&file.policies[0]));
    assert_eq!(
        policies[0].origin.file,
        "NetworkPolicy/production/payment-service-policy"
    );
}

#[test]
fn an_object_the_validator_refuses_is_named_and_the_others_apply() {
    let mut bad: Vec<NetworkPolicy> = fixture("networkpolicies.json");
    let mut second = bad[0].clone();
    second.metadata.name = Some("bad".into());
    second.metadata.resource_version = Some("1400".into());
    // endPort below port: the API server refuses this too; an agent that
    // reads from an older or permissive server must not apply it half.
    let spec = second.spec.as_mut().unwrap();
    let port = &mut spec.ingress.as_mut().unwrap()[0].ports.as_mut().unwrap()[0];
    port.end_port = Some(80);
    bad.push(second);
    let cluster = cluster_with(bad, Vec::new());
    let (policies, problems) = cluster.policies();
    assert_eq!(policies.len(), 1);
    assert_eq!(problems.len(), 1);
    assert!(
        problems[0].starts_with("NetworkPolicy/production/bad:")
            && problems[0].contains("spec.ingress[0].ports[0].endPort"),
        "{}",
        problems[0]
    );
}

#[test]
fn services_take_every_frontend_and_the_ready_endpoints_of_their_slices() {
    let svc: KubeService = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "db", "namespace": "shop"},
        "spec": {
            "type": "LoadBalancer",
            "clusterIP": "10.96.0.20", "clusterIPs": ["10.96.0.20", "fd00:96::20"],
            "externalIPs": ["192.0.2.7"],
            "ports": [{"name": "pg", "port": 5432, "targetPort": "postgres", "nodePort": 30432}]
        },
        "status": {"loadBalancer": {"ingress": [{"ip": "198.51.100.9"}]}}
    }))
    .unwrap();
    let headless: KubeService = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "db-headless", "namespace": "shop"},
        "spec": {"clusterIP": "None", "ports": [{"port": 5432}]}
    }))
    .unwrap();
    let slice: EndpointSlice = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "db-abc", "namespace": "shop",
                     "labels": {"kubernetes.io/service-name": "db"}},
        "addressType": "IPv4",
        "ports": [{"name": "pg", "port": 6432, "protocol": "TCP"}],
        "endpoints": [
            {"addresses": ["10.244.1.5"], "conditions": {"ready": true}},
            {"addresses": ["10.244.1.6"]},
            {"addresses": ["10.244.1.7"], "conditions": {"ready": false}}
        ]
    }))
    .unwrap();
    let out = services(&[Arc::new(svc), Arc::new(headless)], &[Arc::new(slice)]);
    assert_eq!(out.len(), 1, "the headless Service has no frontend");
    let db = &out[0];
    let addrs: Vec<String> = db.addresses.iter().map(ToString::to_string).collect();
    assert_eq!(addrs, ["10.96.0.20", "fd00:96::20"]);
    let external: Vec<String> = db.external.iter().map(ToString::to_string).collect();
    assert_eq!(
        external,
        ["192.0.2.7", "198.51.100.9"],
        "external and load-balancer IPs: frontends, not the endpoints' own"
    );
    assert_eq!(db.ports[0].node_port, Some(30432));
    let eps: Vec<String> = db.endpoints.iter().map(|e| e.ip.to_string()).collect();
    assert_eq!(
        eps,
        ["10.244.1.5", "10.244.1.6"],
        "not-ready left out, nil ready is ready"
    );
    assert_eq!(
        db.endpoints[0].ports[&(Protocol::Tcp, "pg".to_owned())],
        6432,
        "the endpoint's resolved target port"
    );
}

#[test]
fn nodes_split_into_this_node_and_the_others() {
    let node = |name: &str, ip: &str| -> Arc<Node> {
        Arc::new(
            serde_json::from_value(serde_json::json!({
                "metadata": {"name": name},
                "status": {"addresses": [
                    {"type": "InternalIP", "address": ip},
                    {"type": "Hostname", "address": name}
                ]}
            }))
            .unwrap(),
        )
    };
    let n = nodes(
        "node-a",
        &[
            node("node-a", "192.168.0.10"),
            node("node-b", "192.168.0.11"),
        ],
    );
    assert_eq!(n.local, ["192.168.0.10".parse().unwrap()].into());
    assert_eq!(n.remote, ["192.168.0.11".parse().unwrap()].into());
}

/// The index fed only the pods that changed sends, round after round,
/// exactly what [`inputs`] computes from the whole list: pods added,
/// deleted, relabelled, moved between nodes, terminating, on the host
/// network, addresses shared and reused between pods, cgroups appearing
/// and going; a re-list in between.
#[test]
fn the_pod_index_fed_changes_equals_inputs_from_the_whole_list() {
    use pods::{PodChanges, PodIndex};
    let mut rng = crate::testing::Seeded::new(0x9e37_79b9_u64);
    let mut next = |n: usize| rng.below(n);
    let mut pods: BTreeMap<String, PodInfo> = BTreeMap::new();
    let mut cgroups: BTreeMap<String, u64> = BTreeMap::new();
    let mut index = PodIndex::default();
    let mut held: HashMap<String, RemoteWorkload> = HashMap::new();
    let mut serial = 0;
    for step in 0..600 {
        let mut changed = Vec::new();
        match next(7) {
            0..=2 => {
                serial += 1;
                let name = format!("p{}", next(30));
                let pod = PodInfo {
                    uid: format!("00000000-0000-4000-8000-{serial:012}"),
                    namespace: ["prod", "dev"][next(2)].into(),
                    name: name.clone(),
                    node: Some(["node-a", "node-b"][next(2)].into()),
                    labels: [("app".to_owned(), ["a", "b", "c"][next(3)].to_owned())].into(),
                    ips: (0..next(3))
                        .map(|_| format!("10.3.0.{}", next(12)).parse().unwrap())
                        .collect::<std::collections::BTreeSet<IpAddr>>()
                        .into_iter()
                        .collect(),
                    ports: Vec::new(),
                    host_network: next(10) == 0,
                    terminating: next(5) == 0,
                    created: format!("2026-01-01T00:00:{:02}Z", next(60)),
                };
                let key = pod_key(&pod);
                pods.insert(key.clone(), pod.clone());
                changed.push((key, Some(pod)));
            }
            3 => {
                if let Some(key) = pods.keys().nth(next(pods.len().max(1))).cloned() {
                    pods.remove(&key);
                    changed.push((key, None));
                }
            }
            4 => {
                let at = next(pods.len().max(1));
                if let Some((key, pod)) = pods.iter_mut().nth(at) {
                    pod.terminating = !pod.terminating;
                    pod.labels.insert("app".into(), "d".into());
                    changed.push((key.clone(), Some(pod.clone())));
                }
            }
            5 => {
                // A cgroup appears for a pod (known here or not), or goes.
                let local: Vec<&PodInfo> = pods.values().collect();
                if let Some(pod) = local.get(next(local.len().max(1))) {
                    let path = cgroup::systemd_pod_path(&pod.uid, cgroup::Qos::BestEffort);
                    if cgroups.remove(&path).is_none() {
                        cgroups.insert(path, 1000 + step as u64);
                    }
                }
            }
            _ => {
                let path = cgroup::systemd_pod_path(
                    &format!("00000000-0000-4000-9000-{:012}", next(3)),
                    cgroup::Qos::Burstable,
                );
                cgroups.insert(path, 5000 + step as u64);
            }
        }
        let scanned: Vec<Cgroup> = cgroups.iter().map(|(p, id)| cg(*id, p.clone())).collect();
        let list: Vec<PodInfo> = pods.values().cloned().collect();
        let changes = if step % 97 == 50 {
            PodChanges::All(list.clone())
        } else {
            PodChanges::Some(changed)
        };
        let got = index.update("node-a", changes, &scanned, UnknownPods::DenyEgress);
        let want = inputs("node-a", &list, &[], &scanned, UnknownPods::DenyEgress);
        if got.remote.reset {
            held.clear();
        }
        for (key, w) in got.remote.changes {
            match w {
                Some(w) => held.insert(key, w),
                None => held.remove(&key),
            };
        }
        let wanted: HashMap<String, RemoteWorkload> = want
            .remote
            .changes
            .into_iter()
            .filter_map(|(k, w)| Some((k, w?)))
            .collect();
        assert_eq!(held, wanted, "remote workloads, step {step}");
        assert_eq!(got.workloads, want.workloads, "step {step}");
        assert_eq!(got.held, want.held, "step {step}");
        assert_eq!(
            got.local_without_cgroup, want.local_without_cgroup,
            "step {step}"
        );
    }
    assert!(pods.len() > 10 && cgroups.len() > 3);
}

/// The Service index fed the Services and slices that changed sends, round
/// after round, exactly what [`services`] computes from the whole lists:
/// Services made, changed (ports, node ports, headless) and deleted,
/// slices moved between Services, their endpoints ready or not, re-lists.
#[test]
fn the_service_index_fed_changes_equals_services_from_the_whole_lists() {
    use endpoints::ServiceIndex;
    let mut rng = crate::testing::Seeded::new(0x51ce_u64);
    let mut next = |n: usize| rng.below(n);
    let (svc_store, mut svc_writer) = reflector::store::<KubeService>();
    let (slice_store, mut slice_writer) = reflector::store::<EndpointSlice>();
    for w in [watcher::Event::Init, watcher::Event::InitDone] {
        svc_writer.apply_watcher_event(&w);
    }
    for w in [watcher::Event::Init, watcher::Event::InitDone] {
        slice_writer.apply_watcher_event(&w);
    }
    let mut index = ServiceIndex::default();
    let mut held: HashMap<String, Service> = HashMap::new();
    for step in 0..500 {
        let (mut svc_changed, mut slice_changed) = (Changed::default(), Changed::default());
        let name = format!("s{}", next(5));
        match next(5) {
            0 | 1 => {
                let svc: KubeService = serde_json::from_value(serde_json::json!({
                    "metadata": {"name": name, "namespace": "shop"},
                    "spec": {
                        "clusterIP": if next(5) == 0 { "None".to_owned() } else { format!("10.96.0.{}", next(9) + 1) },
                        "ports": [{"name": "http", "port": 80 + next(2) as i32,
                                   "nodePort": if next(3) == 0 { Some(30080) } else { None }}]
                    }
                }))
                .unwrap();
                svc_writer.apply_watcher_event(&watcher::Event::Apply(svc));
                svc_changed.keys.insert(("shop".into(), name));
            }
            2 => {
                let svc: KubeService = serde_json::from_value(
                    serde_json::json!({"metadata": {"name": name, "namespace": "shop"}}),
                )
                .unwrap();
                svc_writer.apply_watcher_event(&watcher::Event::Delete(svc));
                svc_changed.keys.insert(("shop".into(), name));
            }
            3 => {
                let slice_name = format!("x{}", next(6));
                let endpoints: Vec<serde_json::Value> = (0..next(4))
                    .map(|_| {
                        serde_json::json!({
                            "addresses": [format!("10.244.0.{}", next(20) + 1)],
                            "conditions": {"ready": next(4) != 0}
                        })
                    })
                    .collect();
                let slice: EndpointSlice = serde_json::from_value(serde_json::json!({
                    "metadata": {"name": slice_name, "namespace": "shop",
                                 "labels": {"kubernetes.io/service-name": name}},
                    "addressType": "IPv4",
                    "ports": [{"name": "http", "port": 8080 + next(2) as i32, "protocol": "TCP"}],
                    "endpoints": endpoints
                }))
                .unwrap();
                if next(4) == 0 {
                    slice_writer.apply_watcher_event(&watcher::Event::Delete(slice));
                } else {
                    slice_writer.apply_watcher_event(&watcher::Event::Apply(slice));
                }
                slice_changed.keys.insert(("shop".into(), slice_name));
            }
            _ => {
                if next(10) == 0 {
                    slice_changed.relisted = true;
                }
            }
        }
        let got = index.update(svc_changed, slice_changed, &svc_store, &slice_store);
        if got.reset {
            held.clear();
        }
        for (key, s) in got.changes {
            match s {
                Some(s) => held.insert(key, s),
                None => held.remove(&key),
            };
        }
        let want: HashMap<String, Service> = services(&svc_store.state(), &slice_store.state())
            .into_iter()
            .map(|s| (s.qualified_name(), s))
            .collect();
        assert_eq!(held, want, "step {step}");
    }
    assert!(!svc_store.state().is_empty() && !slice_store.state().is_empty());
}

#[test]
fn terminating_endpoints_still_serving_are_judged_when_none_is_ready() {
    let svc: KubeService = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "web", "namespace": "shop"},
        "spec": {"clusterIP": "10.96.0.30", "ports": [{"name": "h", "port": 80}]}
    }))
    .unwrap();
    let slice = |endpoints: serde_json::Value| -> Arc<EndpointSlice> {
        Arc::new(
            serde_json::from_value(serde_json::json!({
                "metadata": {"name": "web-1", "namespace": "shop",
                             "labels": {"kubernetes.io/service-name": "web"}},
                "addressType": "IPv4",
                "ports": [{"name": "h", "port": 8080, "protocol": "TCP"}],
                "endpoints": endpoints
            }))
            .unwrap(),
        )
    };
    let ending = serde_json::json!({"addresses": ["10.244.1.8"],
        "conditions": {"ready": false, "serving": true, "terminating": true}});
    let gone = serde_json::json!({"addresses": ["10.244.1.9"],
        "conditions": {"ready": false, "serving": false, "terminating": true}});
    let ready = serde_json::json!({"addresses": ["10.244.1.5"], "conditions": {"ready": true}});
    let ips = |slices: &[Arc<EndpointSlice>]| -> Vec<String> {
        services(&[Arc::new(svc.clone())], slices)[0]
            .endpoints
            .iter()
            .map(|e| e.ip.to_string())
            .collect()
    };
    // kube-proxy's choice: the ready ones; with none ready, those still
    // serving while terminating (never the ones that stopped serving).
    assert_eq!(
        ips(&[slice(serde_json::json!([ending.clone(), gone.clone()]))]),
        ["10.244.1.8"]
    );
    assert_eq!(
        ips(&[slice(serde_json::json!([ending, gone, ready]))]),
        ["10.244.1.5"]
    );
}

/// The watch keeps a slim Pod: what `pod_info` reads is unchanged by it,
/// and most of the object is gone.
#[test]
fn a_slimmed_pod_reads_the_same_and_keeps_a_fraction_of_the_object() {
    for full in fixture::<Pod>("pods.json") {
        let mut slim = full.clone();
        slim_pod(&mut slim);
        assert_eq!(pod_info(&slim), pod_info(&full), "{}", full.name_any());
        let size = |p: &Pod| serde_json::to_string(p).unwrap().len();
        assert!(
            size(&slim) * 2 < size(&full),
            "{}: {} of {} bytes kept",
            full.name_any(),
            size(&slim),
            size(&full)
        );
    }
}
