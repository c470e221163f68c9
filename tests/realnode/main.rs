//! The real-node group: the agent's image built with buildah and run by
//! podman with exactly the DaemonSet's grants, enforcing pods the container
//! runtime made (kubelet's cgroupfs layout, the runtime's bridge network) on
//! two nodes with one API server; a recycled pod address; the agent's
//! container replaced under continuous probes. See `palisade_tests::realnode`
//! for how the nodes are built and what is the test's rather than the runtime's.
//!
//! Needs root, podman, buildah, runc and the static agent (`cargo xtask test`
//! prepares all of it). Under CI=true a test that cannot run fails.
use std::{
    net::IpAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use palisade_tests::{
    kubeapi::Kind,
    realnode::{self, Cluster, RealPod},
    scenario::{self, Expectation, Family},
};
use serde_json::{Value, json};

/// One cluster at a time: the probes' timing is part of what is measured.
static SERIAL: Mutex<()> = Mutex::new(());

fn enabled() -> bool {
    match realnode::can_run() {
        Ok(()) => true,
        Err(why) if std::env::var("CI").as_deref() == Ok("true") => {
            panic!("real-node test cannot run under CI=true: {why}")
        }
        Err(why) => {
            eprintln!("skipping real-node test: {why}");
            false
        }
    }
}

/// Node of each scenario pod: a, b, a, b, b, a — every policy pair of the
/// seed scenario has cross-node and same-node cases.
const PLACEMENT: [(&str, usize); 6] = [
    ("production/order-service", 0),
    ("production/payment-service", 0),
    ("production/postgres", 1),
    ("production/logging", 1),
    ("monitoring/prometheus", 1),
    ("kube-system/dns", 0),
];

fn node_of(key: &str) -> usize {
    PLACEMENT
        .iter()
        .find(|(k, _)| *k == key)
        .map_or(0, |(_, n)| *n)
}

/// Two nodes, the image built on both, the scenario's pods made by the
/// runtime and published, the NetworkPolicy served, both agents running
/// from `image` and ready.
fn seed_cluster(image: &str) -> Cluster {
    let mut c = Cluster::new(2).expect("cluster");
    for node in 0..2 {
        c.build_image(node, image)
            .expect("image built with buildah");
    }
    c.publish_basics().unwrap();
    c.api
        .apply_list_file(
            Kind::NetworkPolicies,
            &std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("kubernetes/fixtures/networkpolicies.json"),
        )
        .unwrap();
    for spec in scenario::pods() {
        let node = node_of(&spec.key());
        let app = spec.name.clone();
        let pod = c
            .run_pod(node, spec, &app, None)
            .expect("pod made by podman");
        c.publish_pod(&pod);
    }
    for node in 0..2 {
        c.start_agent(node, image).expect("agent container");
    }
    for node in 0..2 {
        c.wait_agent_ready(node, Duration::from_secs(30))
            .expect("agent ready");
    }
    c
}

fn probe_word(c: &Cluster, e: &Expectation, family: Family) -> String {
    let from = c.pod(e.from);
    let to = c.pod(e.to).addr(family == Family::V6);
    c.exec_probe(from, e.proto, to, e.port, 1000)
}

/// Every expectation of the scenario in both families, from inside the
/// containers (podman exec), in parallel; the mismatches.
fn scenario_mismatches(c: &Cluster) -> (usize, Vec<String>) {
    let jobs: Vec<(Expectation, Family)> = [Family::V4, Family::V6]
        .iter()
        .flat_map(|f| scenario::expectations().into_iter().map(move |e| (e, *f)))
        .collect();
    let total = jobs.len();
    let wrong = std::thread::scope(|s| {
        let handles: Vec<_> = jobs
            .into_iter()
            .map(|(e, f)| {
                s.spawn(move || {
                    let want = e.expected_word(scenario::egress_denied(&e));
                    let got = probe_word(c, &e, f);
                    (got != want).then(|| {
                        format!(
                            "{} {} → {} {}/{}: want {want}, got {got}",
                            f.as_str(),
                            e.from,
                            e.to,
                            e.proto,
                            e.port
                        )
                    })
                })
            })
            .collect();
        handles
            .into_iter()
            .filter_map(|h| h.join().ok().flatten())
            .collect()
    });
    (total, wrong)
}

/// The denied pairs, probed once each (IPv4) with the listeners' counts
/// read around them: (pair, word, arrivals at the listener).
fn denied_attempts(c: &Cluster) -> Vec<(String, String, u64)> {
    scenario::expectations()
        .into_iter()
        .filter(|e| !e.allow)
        .map(|e| {
            let before = c.pod(e.to).arrivals();
            let word = probe_word(c, &e, Family::V4);
            let arrived = c.pod(e.to).arrivals() - before;
            (format!("{} → {}:{}", e.from, e.to, e.port), word, arrived)
        })
        .collect()
}

#[test]
fn the_image_with_the_daemonsets_grants_enforces_runtime_made_pods_on_two_nodes() {
    if !enabled() {
        return;
    }
    let _serial = SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let image = "localhost/palisade:realnode";
    let c = seed_cluster(image);

    // The image: one static binary on scratch, runnable as built.
    let version = c.nodes[0]
        .podman_run(&["run", "--rm", image, "--version"])
        .expect("the image runs");
    assert!(version.contains(env!("CARGO_PKG_VERSION")), "{version}");
    let grants = realnode::daemonset_grants().unwrap();
    assert_eq!(
        grants.caps_add,
        ["BPF", "NET_ADMIN", "SYS_ADMIN", "PERFMON"]
    );
    let inspect: Value = serde_json::from_str(
        &c.nodes[0]
            .podman_run(&["inspect", &c.agents[0].name])
            .unwrap(),
    )
    .unwrap();
    let host_config = &inspect[0]["HostConfig"];
    assert_eq!(host_config["Privileged"], json!(false));
    assert_eq!(host_config["ReadonlyRootfs"], json!(true));
    assert_eq!(host_config["NetworkMode"], json!("host"));
    let mut caps: Vec<String> = inspect[0]["EffectiveCaps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap().trim_start_matches("CAP_").to_owned())
        .collect();
    caps.sort();
    assert_eq!(
        caps,
        ["BPF", "NET_ADMIN", "PERFMON", "SYS_ADMIN"],
        "the agent's container has exactly the DaemonSet's capabilities"
    );

    // Both agents: ready (HTTP /readyz on the node's address, as kubelet
    // probes it), their own container is the node's, each pod enforced.
    for node in 0..2 {
        let status = c.nodes[node].status().unwrap();
        let own: Vec<&Value> = status["workload_list"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|w| {
                w["name"]
                    .as_str()
                    .is_some_and(|n| n.contains("palisade-agent"))
            })
            .collect();
        assert!(
            own.is_empty(),
            "the agent's own pod is not a workload: {own:?}"
        );
        let log = c.agent_log(node).unwrap();
        assert!(
            log.contains("the agent runs under the cgroup root (as a pod)"),
            "the agent found its own pod cgroup under kubepods:\n{log}"
        );
    }

    // The seed scenario across the two nodes, IPv4 and IPv6.
    let (total, wrong) = scenario_mismatches(&c);
    assert!(
        wrong.is_empty(),
        "{} of {total} wrong:\n{}",
        wrong.len(),
        wrong.join("\n")
    );
    eprintln!("seed scenario on two nodes: {total} probes as expected");

    // Denied peers received nothing at their listeners...
    eprintln!("denied attempts, counted at the listeners");
    let denied = denied_attempts(&c);
    for (pair, word, arrived) in &denied {
        assert_ne!(word, "ok", "{pair}");
        assert_eq!(
            *arrived, 0,
            "{pair} reached the listener while denied ({word})"
        );
    }
    // ...and the agents' audit events (their containers' stdout) name the pods.
    let deadline = Instant::now() + Duration::from_secs(5);
    // A local pod by its namespace/name, a peer by its identity's name
    // (spiffe://cluster.local/ns/<ns>/sa/<service account>).
    let named = |ev: &Value, from: &str, to: &str| {
        ev["verdict"] == "deny"
            && ev["from"]
                .as_str()
                .is_some_and(|f| f.ends_with(&format!("/{from}")))
            && ev["to"]
                .as_str()
                .is_some_and(|t| t.ends_with(&format!("/{to}")))
    };
    loop {
        let a = Cluster::events_in(&c.agent_log(0).unwrap());
        // logging (node b) → payment-service:443, dropped at node a's ingress;
        // payment-service → logging:9000, refused at node a's egress.
        let ingress = a
            .iter()
            .any(|e| named(e, "logging", "payment-service") && e["direction"] == "ingress");
        let egress = a
            .iter()
            .any(|e| named(e, "payment-service", "logging") && e["direction"] == "egress");
        if ingress && egress {
            // Real events of Kubernetes mode, read from the container log,
            // are the published record type.
            palisade_tests::assert_audit_records(&a);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "node-a's audit events do not name the pods (ingress {ingress}, egress {egress}):\n{}",
            a.iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("\n")
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    eprintln!("audit events name the pods; deleting the policy");
    // A policy change reaches both nodes: without the policy every denied
    // pair connects and its listener counts it (the technique works)...
    c.api
        .delete(
            Kind::NetworkPolicies,
            "production",
            "payment-service-policy",
        )
        .then_some(())
        .expect("the policy was served");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let open = denied_attempts(&c);
        if open.iter().all(|(_, w, n)| w == "ok" && *n > 0) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "policy deletion not enforced on both nodes: {open:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    eprintln!("without the policy every denied pair connects; serving it again");
    // ...and served again, it denies on both nodes again.
    c.api
        .apply_list_file(
            Kind::NetworkPolicies,
            &std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("kubernetes/fixtures/networkpolicies.json"),
        )
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, wrong) = scenario_mismatches(&c);
        if wrong.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "policy not enforced again: {wrong:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// One probe's time and word.
type Record = (Instant, String);

/// Probes `from` → `to:port` (TCP) continuously on `threads` threads until
/// `stop`; every word with its time.
fn probe_continuously(
    from: &RealPod,
    to: IpAddr,
    port: u16,
    threads: usize,
    stop: &AtomicBool,
) -> Vec<Record> {
    let records = Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                while !stop.load(Ordering::SeqCst) {
                    let word = Cluster::fast_probe(from, "tcp", to, port, 250);
                    records.lock().unwrap().push((Instant::now(), word));
                }
            });
        }
    });
    records.into_inner().unwrap()
}

/// The old pod `old_key` (allowed to `target:port`) is deleted as kubelet
/// and the runtime do it, and a new pod labelled `logging` (not allowed)
/// gets its addresses on the same node. Probes from the new pod run from
/// the moment its container runs. Returns (probes before the API server had
/// the new pod, after, verdicts with the stale identity after, ms from the
/// API server having the new pod to the first verdict with its identity).
fn reuse(c: &mut Cluster, old_key: &str, target: &str, port: u16) -> (usize, usize, usize, u128) {
    let old = c.pod(old_key).clone();
    // 1. kubelet starts terminating the old pod: deletionTimestamp set, the
    //    object still listed with its address.
    let mut obj = c.api.get(Kind::Pods, &old.namespace, &old.name).unwrap();
    obj["metadata"]["deletionTimestamp"] = json!("2026-11-29T00:00:00Z");
    c.api.apply(Kind::Pods, obj);
    // 2. The runtime removes its sandbox: the address is free.
    c.remove_pod(old_key).unwrap();
    // 3. The IPAM gives the address to a new pod with other labels.
    let spec = palisade_tests::world::PodSpec::new(
        "production",
        &format!("{}-new", old.name),
        &[7000],
        &[],
    );
    let new = c
        .run_pod(old.node, spec, "logging", Some((old.ipv4, old.ipv6)))
        .unwrap();
    assert_eq!(
        (new.ipv4, new.ipv6),
        (old.ipv4, old.ipv6),
        "the runtime reused the address"
    );
    let to = c.pod(target).addr(false);
    let stop = AtomicBool::new(false);
    let published = Arc::new(Mutex::new(None));
    let records = std::thread::scope(|s| {
        let prober = s.spawn(|| probe_continuously(&new, to, port, 3, &stop));
        // The container runs before kubelet reports it: probes meanwhile.
        std::thread::sleep(Duration::from_millis(1500));
        // 4. kubelet reports the new pod Running with the address.
        c.publish_pod(&new);
        *published.lock().unwrap() = Some(Instant::now());
        std::thread::sleep(Duration::from_millis(1500));
        // 5. The old object goes.
        c.api.delete(Kind::Pods, &old.namespace, &old.name);
        std::thread::sleep(Duration::from_millis(1000));
        stop.store(true, Ordering::SeqCst);
        prober.join().unwrap()
    });
    let t1 = published.lock().unwrap().unwrap();
    let before = records.iter().filter(|(t, _)| *t < t1).count();
    let after: Vec<&Record> = records.iter().filter(|(t, _)| *t >= t1).collect();
    let stale = after.iter().filter(|(_, w)| w == "ok").count();
    let stale_before = records.iter().filter(|(t, w)| *t < t1 && w == "ok").count();
    assert_eq!(
        stale_before, 0,
        "the new pod, not known yet, was judged as {old_key}"
    );
    let first_new = after
        .iter()
        .find(|(_, w)| w == "timeout")
        .map_or(u128::MAX, |(t, _)| t.duration_since(t1).as_millis());
    (before, after.len(), stale, first_new)
}

#[test]
fn a_recycled_pod_address_is_never_judged_with_the_old_pods_identity() {
    if !enabled() {
        return;
    }
    let _serial = SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let mut c = seed_cluster("localhost/palisade:realnode");
    // Other node: prometheus (node b) may reach payment-service:8080 (node
    // a, judged at its ingress by address); its address goes to a pod that
    // may not.
    let (before, after, stale, window) = reuse(
        &mut c,
        "monitoring/prometheus",
        "production/payment-service",
        8080,
    );
    eprintln!(
        "address reuse judged on the other node: {before} probes before the API server had the new pod, {after} after, {stale} with the old identity; new identity {window} ms after"
    );
    assert_eq!(
        stale, 0,
        "probes judged with the old identity after the API server had the new pod"
    );
    assert!(
        after > 0 && window < 5000,
        "the new pod's identity never applied"
    );
    // Same node: order-service (node a) may reach payment-service:443 (node a).
    let (before, after, stale, window) = reuse(
        &mut c,
        "production/order-service",
        "production/payment-service",
        443,
    );
    eprintln!(
        "address reuse judged on the same node: {before} probes before the API server had the new pod, {after} after, {stale} with the old identity; new identity {window} ms after"
    );
    assert_eq!(
        stale, 0,
        "probes judged with the old identity after the API server had the new pod"
    );
    assert!(
        after > 0 && window < 5000,
        "the new pod's identity never applied"
    );
}

#[test]
fn replacing_the_agent_container_keeps_every_verdict_and_delivers_the_gaps_events() {
    if !enabled() {
        return;
    }
    let _serial = SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let mut c = seed_cluster("localhost/palisade:realnode");
    c.build_image(0, "localhost/palisade:realnode-next")
        .unwrap();
    // Continuous probes on node a's pairs: allowed and denied, egress and
    // ingress, same node and cross node.
    let pairs: Vec<(RealPod, IpAddr, u16, &str)> = vec![
        (
            c.pod("production/order-service").clone(),
            c.pod("production/payment-service").addr(false),
            443,
            "ok",
        ),
        (
            c.pod("monitoring/prometheus").clone(),
            c.pod("production/payment-service").addr(false),
            8080,
            "ok",
        ),
        (
            c.pod("production/logging").clone(),
            c.pod("production/payment-service").addr(false),
            443,
            "timeout",
        ),
        (
            c.pod("production/payment-service").clone(),
            c.pod("production/logging").addr(false),
            9000,
            "eperm",
        ),
    ];
    let stop = AtomicBool::new(false);
    let (records, gap, old_log) = std::thread::scope(|s| {
        let probers: Vec<_> = pairs
            .iter()
            .map(|(from, to, port, _)| s.spawn(|| probe_continuously(from, *to, *port, 1, &stop)))
            .collect();
        std::thread::sleep(Duration::from_secs(2));
        // The rollout: the old pod's container stops (SIGTERM), the new one
        // starts from the new tag and adopts the pinned state.
        let gap_start = Instant::now();
        let old_log = c.stop_agent(0).unwrap();
        c.start_agent(0, "localhost/palisade:realnode-next")
            .unwrap();
        c.wait_agent_ready(0, Duration::from_secs(30)).unwrap();
        let gap_end = Instant::now();
        std::thread::sleep(Duration::from_secs(2));
        stop.store(true, Ordering::SeqCst);
        let records: Vec<Vec<Record>> = probers.into_iter().map(|p| p.join().unwrap()).collect();
        (records, (gap_start, gap_end), old_log)
    });
    let mut wrong = Vec::new();
    let mut in_gap = 0;
    for ((from, to, port, want), recs) in pairs.iter().zip(&records) {
        assert!(!recs.is_empty());
        for (t, w) in recs {
            if *t >= gap.0 && *t <= gap.1 {
                in_gap += 1;
            }
            if w != want {
                wrong.push(format!("{} → {to}:{port}: {w}, want {want}", from.key()));
            }
        }
    }
    let total: usize = records.iter().map(Vec::len).sum();
    eprintln!(
        "agent container replaced in {} ms: {total} probes, {in_gap} during the replacement, {} wrong",
        gap.1.duration_since(gap.0).as_millis(),
        wrong.len()
    );
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    assert!(in_gap > 0, "no probe ran while the agent was replaced");
    // Every refused connect of payment-service → logging:9000 has its event,
    // from the old container or, for the gap, the new one.
    let refused = records[3].iter().filter(|(_, w)| w == "eperm").count();
    let count = |log: &str| {
        Cluster::events_in(log)
            .iter()
            .filter(|e| e["direction"] == "egress" && e["port"] == 9000 && e["verdict"] == "deny")
            .count()
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let new_log = c.agent_log(0).unwrap();
        let (old_events, new_events) = (count(&old_log), count(&new_log));
        if old_events + new_events >= refused {
            eprintln!(
                "{refused} refused connects: {old_events} events from the old container, {new_events} from the new one"
            );
            assert_eq!(
                old_events + new_events,
                refused,
                "one event per refused connect"
            );
            assert!(
                new_events > 0,
                "the gap's events were not delivered by the new agent"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{refused} refused connects but {old_events} + {new_events} events; the old agent's last lines:\n{}\nthe new agent's counters: {}",
            old_log.lines().rev().take(5).collect::<Vec<_>>().join("\n"),
            c.nodes[0]
                .status()
                .map(|s| s["counters"].to_string())
                .unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let status = c.nodes[0].status().unwrap();
    assert_eq!(status["ready"], json!(true));
}
