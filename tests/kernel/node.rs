//! A Kubernetes node built the way Kubernetes builds one: pods in their own
//! network namespaces behind a bridge whose gateway is the node, kubelet's
//! cgroupfs-driver cgroups in every QoS class, kube-proxy's Service DNAT in
//! the node's namespace, and the agent in Kubernetes mode reading Pods,
//! Services, EndpointSlices, Nodes and NetworkPolicies from the fake API
//! server. Every item of "no false denies on a real node" is tried with real
//! traffic: Services (DNS among them), the node's probes, loopback, UDP
//! replies and long-lived UDP flows.
use std::{
    net::IpAddr,
    path::Path,
    time::{Duration, Instant},
};

use palisade_tests::{
    agent::Agent,
    kubeapi::{FakeApiServer, Kind},
    kubeproxy::{self, Mode, Objects},
    scenario::{self, Family},
    world::{PodSpec, World},
};
use serde_json::{Value, json};

use super::{
    assert_all_hold, kernel_tests_enabled,
    kubernetes::{fixtures, pod_object, uid},
    temp_policy_dir,
};

const NODE: &str = "node-test";
const T: Duration = Duration::from_millis(800);

/// kubelet's cgroupfs-driver cgroup for container 0 of pod `index`
/// (relative to the world's root, under `kubepods`), cycling through the QoS
/// classes; index 1 (payment-service) is Guaranteed: no QoS directory.
fn kubelet_cgroupfs(index: usize) -> String {
    let id = format!("{:064x}", index + 0xfeed);
    match index % 3 {
        1 => format!("kubepods/pod{}/{id}", uid(index)),
        2 => format!("kubepods/burstable/pod{}/{id}", uid(index)),
        _ => format!("kubepods/besteffort/pod{}/crio-{id}", uid(index)),
    }
}

fn node_object(world: &World) -> Value {
    json!({
        "metadata": {"name": NODE, "uid": "node-uid-1"},
        "status": {"addresses": [
            {"type": "InternalIP", "address": world.gateway_v4().to_string()},
            {"type": "InternalIP", "address": world.gateway_v6().to_string()},
            {"type": "Hostname", "address": NODE},
        ]}
    })
}

/// Serves every Service in `objects` from the API server and programs the
/// node's kube-proxy rules from the same objects.
fn publish(api: &FakeApiServer, world: &World, objects: &Objects, mode: Mode) {
    for (svc, slice) in objects.values() {
        api.apply(Kind::Services, svc.clone());
        api.apply(Kind::EndpointSlices, slice.clone());
    }
    kubeproxy::sync(world, mode, &kubeproxy::rules_of(objects)).unwrap();
}

fn probe(world: &World, from: &str, proto: &str, to: IpAddr, port: u16) -> String {
    world.probe(world.pod(from), proto, to, port, T).unwrap()
}

/// Probes `from` → `to:port` until the word is `want` (at most 5 s);
/// returns how long that took.
pub(super) fn until(
    world: &World,
    from: &str,
    proto: &str,
    to: IpAddr,
    port: u16,
    want: &str,
) -> Duration {
    let start = Instant::now();
    loop {
        let word = probe(world, from, proto, to, port);
        if word == want {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "{from} → {to}:{port}/{proto} still {word:?}, want {want:?}"
        );
    }
}

/// `answered lost` of a `udp-session`.
pub(super) fn session(file: &Path) -> (u64, u64) {
    let text = std::fs::read_to_string(file).unwrap_or_default();
    let mut it = text.split_whitespace().map(|n| n.parse().unwrap_or(0));
    (it.next().unwrap_or(0), it.next().unwrap_or(0))
}

fn v4(world: &World, pod: &str) -> IpAddr {
    world.pod(pod).ipv4.into()
}

fn network_policy(ns: &str, name: &str, spec: Value) -> Value {
    json!({"metadata": {"name": name, "namespace": ns, "uid": format!("np-{ns}-{name}")}, "spec": spec})
}

#[test]
fn services_the_node_loopback_and_udp_replies_work_under_policy() {
    if !kernel_tests_enabled() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let api = FakeApiServer::start().unwrap();
    api.apply_list_file(Kind::Namespaces, &fixtures().join("namespaces.json"))
        .unwrap();
    api.apply_list_file(
        Kind::NetworkPolicies,
        &fixtures().join("networkpolicies.json"),
    )
    .unwrap();
    let template: Value = serde_json::from_str::<Value>(
        &std::fs::read_to_string(fixtures().join("pods.json")).unwrap(),
    )
    .unwrap()["items"][0]
        .clone();

    let mut world = World::new().unwrap();
    world.make_node().unwrap();
    api.apply(Kind::Nodes, node_object(&world));
    for (i, mut spec) in scenario::pods().into_iter().enumerate() {
        if spec.name == "dns" {
            spec.tcp = vec![53]; // kube-dns answers on TCP 53 too
        }
        spec.cgroup = Some(kubelet_cgroupfs(i));
        let pod = world.add_pod(spec.clone()).unwrap();
        let ips = [pod.ipv4.to_string(), pod.ipv6.to_string()];
        api.apply(Kind::Pods, pod_object(&template, i, &spec, &ips, NODE));
    }

    // Services, as the API server serves them and kube-proxy programs them.
    let dns_vip: IpAddr = world.service_v4(10).into();
    let db_vip: IpAddr = world.service_v4(11).into();
    let mixed_vip: IpAddr = world.service_v4(12).into();
    let mut objects = Objects::new();
    objects.insert(
        "kube-system/kube-dns".into(),
        kubeproxy::service_objects(
            "kube-system",
            "kube-dns",
            &[dns_vip],
            &[("dns", "UDP", 53, 53), ("dns-tcp", "TCP", 53, 53)],
            &[v4(&world, "kube-system/dns")],
        ),
    );
    // db: its endpoint moves between pods under probes below; also a
    // NodePort (30432 on every node address).
    let (mut db_svc, db_slice) = kubeproxy::service_objects(
        "production",
        "db",
        &[db_vip],
        &[("pg", "TCP", 5432, 5432)],
        &[v4(&world, "production/postgres")],
    );
    db_svc["spec"]["type"] = json!("NodePort");
    db_svc["spec"]["ports"][0]["nodePort"] = json!(30432);
    objects.insert("production/db".into(), (db_svc, db_slice));
    // mixed: two backends, one payment-service may reach (postgres:5432),
    // one it may not (logging:9000), as two slices with their target ports.
    let (mut mixed_svc, mixed_pg) = kubeproxy::service_objects(
        "production",
        "mixed",
        &[mixed_vip],
        &[("p", "TCP", 7000, 5432)],
        &[v4(&world, "production/postgres")],
    );
    let mut mixed_log = kubeproxy::service_objects(
        "production",
        "mixed",
        &[mixed_vip],
        &[("p", "TCP", 7000, 9000)],
        &[v4(&world, "production/logging")],
    )
    .1;
    mixed_log["metadata"]["name"] = json!("mixed-slice-2");
    mixed_svc["spec"]["type"] = json!("NodePort");
    mixed_svc["spec"]["ports"][0]["nodePort"] = json!(30700);
    objects.insert("production/mixed".into(), (mixed_svc.clone(), mixed_pg));
    objects.insert("production/mixed-2".into(), (mixed_svc, mixed_log));
    publish(&api, &world, &objects, Mode::Iptables);

    let config = format!(
        "cgroupRoot: {root}/kubepods\nbpfPinDir: /sys/fs/bpf/palisade-test-{tag}\ncontrolSocket: {dir}/palisade.sock\n\
         audit:\n  output: {dir}/audit.jsonl\nrescanIntervalMs: 100\ntrustDomain: test.example\n",
        root = world.cgroup_root.display(),
        tag = world.tag,
        dir = dir.path().display(),
    );
    let kubeconfig = api.kubeconfig(dir.path()).unwrap();
    let args = [
        "--kubernetes",
        "--kubeconfig",
        kubeconfig.to_str().unwrap(),
        "--node-name",
        NODE,
    ];
    let mut agent = Agent::start_with_args(dir.path(), &config, &args).unwrap();
    agent.wait_enforcing(&world).expect("every pod enforced");

    // 1. The seed scenario, with pods in every QoS class of the cgroupfs
    //    driver (payment-service is Guaranteed: `kubepods/pod<uid>`).
    assert_all_hold(&scenario::run_probes(
        &world,
        &scenario::expectations(),
        &[Family::V4, Family::V6],
    ));

    // 2. DNS through the kube-dns ClusterIP: UDP 53 allowed by the policy's
    //    "any namespace, UDP 53" rule; TCP 53 is not in it.
    for pod in [
        "production/payment-service",
        "production/logging",
        "monitoring/prometheus",
    ] {
        assert_eq!(
            probe(&world, pod, "udp", dns_vip, 53),
            "ok",
            "{pod} → kube-dns UDP"
        );
    }
    assert_eq!(
        probe(&world, "production/payment-service", "tcp", dns_vip, 53),
        "eperm",
        "TCP 53 is not allowed by payment-service's egress"
    );
    assert_eq!(
        probe(&world, "production/logging", "tcp", dns_vip, 53),
        "ok"
    );

    // 3. A Service whose backends disagree: refused whole, the event names it.
    assert_eq!(
        probe(&world, "production/payment-service", "tcp", mixed_vip, 7000),
        "eperm"
    );
    let ev = agent
        .wait_for_event(
            |e| e["service"]["name"] == "production/mixed",
            Duration::from_secs(3),
        )
        .unwrap();
    assert!(
        ev["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("different verdicts"),
        "{ev}"
    );
    assert_eq!(
        ev["service"]["backends"].as_array().map(Vec::len),
        Some(2),
        "{ev}"
    );
    assert!(ev["local"]["pid"].as_u64().unwrap_or(0) > 0, "{ev}");
    assert_eq!(
        probe(&world, "production/logging", "tcp", mixed_vip, 7000),
        "ok"
    );

    // 4. Endpoints that change re-judge new connections: a denied endpoint
    //    is added to db (refused: the backends disagree) and removed again;
    //    then db's endpoint moves from postgres (allowed) to logging (denied)
    //    and back.
    assert_eq!(
        probe(&world, "production/payment-service", "tcp", db_vip, 5432),
        "ok"
    );
    let (db_svc, _) = objects["production/db"].clone();
    let mut extra = kubeproxy::service_objects(
        "production",
        "db",
        &[db_vip],
        &[("pg", "TCP", 5432, 9000)],
        &[v4(&world, "production/logging")],
    )
    .1;
    extra["metadata"]["name"] = json!("db-slice-2");
    objects.insert("production/db-2".into(), (db_svc, extra));
    publish(&api, &world, &objects, Mode::Iptables);
    let took = until(
        &world,
        "production/payment-service",
        "tcp",
        db_vip,
        5432,
        "eperm",
    );
    eprintln!("a denied endpoint added → refused after {took:?}");
    objects.remove("production/db-2");
    api.delete(Kind::EndpointSlices, "production", "db-slice-2");
    publish(&api, &world, &objects, Mode::Iptables);
    let took = until(
        &world,
        "production/payment-service",
        "tcp",
        db_vip,
        5432,
        "ok",
    );
    eprintln!("the denied endpoint removed → allowed after {took:?}");
    objects.insert(
        "production/db".into(),
        kubeproxy::service_objects(
            "production",
            "db",
            &[db_vip],
            &[("pg", "TCP", 5432, 9000)],
            &[v4(&world, "production/logging")],
        ),
    );
    // kube-proxy switches to its nftables mode here: the iptables rules go first.
    world.on_node(&["iptables", "-t", "nat", "-F"]).unwrap();
    world.on_node(&["ip6tables", "-t", "nat", "-F"]).unwrap();
    publish(&api, &world, &objects, Mode::Nftables);
    let took = until(
        &world,
        "production/payment-service",
        "tcp",
        db_vip,
        5432,
        "eperm",
    );
    eprintln!("endpoint moved to a denied pod → refused after {took:?}");
    let ev = agent
        .wait_for_event(
            |e| e["service"]["name"] == "production/db",
            Duration::from_secs(3),
        )
        .unwrap();
    assert_eq!(
        ev["to"], "spiffe://test.example/ns/production/sa/logging",
        "{ev}"
    );
    assert_eq!(ev["port"], 5432, "{ev}");
    objects.insert(
        "production/db".into(),
        kubeproxy::service_objects(
            "production",
            "db",
            &[db_vip],
            &[("pg", "TCP", 5432, 5432)],
            &[v4(&world, "production/postgres")],
        ),
    );
    publish(&api, &world, &objects, Mode::Nftables);
    let took = until(
        &world,
        "production/payment-service",
        "tcp",
        db_vip,
        5432,
        "ok",
    );
    eprintln!("endpoint back on postgres → allowed after {took:?}");

    // 5. The node: kubelet-style probes from the node's address reach every
    //    pod whatever its ingress policy; a pod reaches its node.
    let outside = world.outside_root.clone();
    let hub = world.hub.clone();
    for pod in &world.pods {
        for port in pod.spec.tcp.iter().copied() {
            for to in [IpAddr::from(pod.ipv4), IpAddr::from(pod.ipv6)] {
                assert_eq!(
                    world.probe_in(&outside, &hub, "tcp", to, port, T).unwrap(),
                    "ok",
                    "node → {}:{port} ({to})",
                    pod.spec.key()
                );
            }
        }
    }
    let _node_server = world
        .spawn_testbed_in(&outside, &hub, &["serve", "--tcp", "7777"])
        .unwrap();
    let gw: IpAddr = world.gateway_v4().into();
    assert_eq!(
        probe(&world, "production/payment-service", "tcp", gw, 7777),
        "ok",
        "a pod reaches its node"
    );

    // 6. Loopback inside pods with ingress and egress policies.
    for (to, port) in [("127.0.0.1", 443), ("::1", 443), ("127.0.0.1", 8080)] {
        assert_eq!(
            probe(
                &world,
                "production/payment-service",
                "tcp",
                to.parse().unwrap(),
                port
            ),
            "ok",
            "payment-service → {to}:{port} over its own loopback"
        );
    }

    // 6b. An address the pod adds to its own interface (CAP_NET_ADMIN) is
    //     not its own: its addresses come from the API server, and a packet
    //     from the added one is dropped as it leaves.
    let dns = world.pod("kube-system/dns");
    world.count_arrivals(dns).unwrap();
    let payment_pod = world.pod("production/payment-service");
    let added = world.ipv4(250).to_string();
    palisade_tests::world::ip(&[
        "-n",
        &payment_pod.netns,
        "addr",
        "add",
        &format!("{added}/32"),
        "dev",
        "eth0",
    ])
    .unwrap();
    std::thread::sleep(Duration::from_millis(400)); // a rescan or two
    // UDP counted alone: the server's answer to a socket that has closed
    // comes back as a port unreachable, an arrival of its own.
    let send_from = |src: &str| {
        let before = world.arrivals_of(dns, "udp").unwrap();
        let word = world
            .testbed_in(
                &payment_pod.cgroup,
                &payment_pod.netns,
                &["attack", "bound-udp", src, &dns.ipv4.to_string(), "53"],
            )
            .unwrap();
        std::thread::sleep(Duration::from_millis(100));
        (
            word.trim().to_owned(),
            world.arrivals_of(dns, "udp").unwrap() - before,
        )
    };
    let own = payment_pod.ipv4.to_string();
    assert_eq!(
        send_from(&own),
        ("sent".to_owned(), 1),
        "from its own address"
    );
    let (word, arrived) = send_from(&added);
    assert_eq!(arrived, 0, "from an added address nothing arrives ({word})");
    let (_, out, _) = super::cli(&agent, &["workloads"]);
    assert!(
        !out.contains(&added),
        "the added address is not the pod's: {out}"
    );

    // 6c. Services never open what payment-service's egress policy denies
    //     (logging:9000):
    //     - a Service whose only endpoint is logging, not ready but serving
    //       while terminating: kube-proxy forwards to it (KEP-1669), so it
    //       is judged — order-service, whose egress is open, reaches logging
    //       through it (the technique works); payment-service is refused;
    //     - a Service with no endpoint: refused at connect(), audited;
    //     - a Service selecting payment-service with logging's address as
    //       an external IP: that address does not become payment-service's
    //       own (on every port, and as a source).
    let logging_ip = v4(&world, "production/logging");
    let ending_vip: IpAddr = world.service_v4(13).into();
    let empty_vip: IpAddr = world.service_v4(14).into();
    let (ending_svc, mut ending_slice) = kubeproxy::service_objects(
        "production",
        "ending",
        &[ending_vip],
        &[("l", "TCP", 9000, 9000)],
        &[logging_ip],
    );
    ending_slice["endpoints"][0]["conditions"] =
        json!({"ready": false, "serving": true, "terminating": true});
    objects.insert("production/ending".into(), (ending_svc, ending_slice));
    objects.insert(
        "production/empty".into(),
        kubeproxy::service_objects(
            "production",
            "empty",
            &[empty_vip],
            &[("l", "TCP", 9000, 9000)],
            &[],
        ),
    );
    let (mut evil_svc, evil_slice) = kubeproxy::service_objects(
        "production",
        "evil",
        &[world.service_v4(15).into()],
        &[("h", "TCP", 80, 8080)],
        &[v4(&world, "production/payment-service")],
    );
    evil_svc["spec"]["externalIPs"] = json!([logging_ip.to_string()]);
    objects.insert("production/evil".into(), (evil_svc, evil_slice));
    publish(&api, &world, &objects, Mode::Iptables);
    until(
        &world,
        "production/payment-service",
        "tcp",
        empty_vip,
        9000,
        "eperm",
    );
    assert_eq!(
        probe(&world, "production/order-service", "tcp", ending_vip, 9000),
        "ok",
        "kube-proxy forwards to the terminating endpoint"
    );
    assert_eq!(
        probe(
            &world,
            "production/payment-service",
            "tcp",
            ending_vip,
            9000
        ),
        "eperm",
        "a serving, terminating endpoint is judged"
    );
    assert_eq!(
        probe(
            &world,
            "production/payment-service",
            "tcp",
            logging_ip,
            9000
        ),
        "eperm",
        "an external IP is not the endpoint's own address"
    );
    // Before the agent has read the Services, the empty VIP is an unknown
    // address that payment-service's egress policy refuses too; probe until
    // the refusal names the Service.
    let start = Instant::now();
    let ev = loop {
        let word = probe(&world, "production/payment-service", "tcp", empty_vip, 9000);
        assert_eq!(word, "eperm", "a Service with no endpoint is refused");
        if let Ok(ev) = agent.wait_for_event(
            |e| e["service"]["name"] == "production/empty",
            Duration::from_millis(200),
        ) {
            break ev;
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "no audit event names the Service production/empty"
        );
    };
    assert!(
        ev["reason"]
            .as_str()
            .is_some_and(|r| r.contains("no backend")),
        "{ev}"
    );

    // 7. A UDP server whose egress is denied answers the clients its ingress
    //    admits, directly and through its Service.
    api.apply(
        Kind::NetworkPolicies,
        network_policy(
            "kube-system",
            "dns-no-egress",
            json!({"podSelector": {"matchLabels": {"app": "dns"}}, "policyTypes": ["Egress"]}),
        ),
    );
    until(
        &world,
        "kube-system/dns",
        "tcp",
        v4(&world, "production/postgres"),
        5432,
        "eperm",
    );
    for to in [v4(&world, "kube-system/dns"), dns_vip] {
        assert_eq!(
            probe(&world, "production/order-service", "udp", to, 53),
            "ok",
            "the restricted DNS server answers ({to})"
        );
    }

    // 8. A connected UDP flow lives across 50 table changes and workload
    //    churn, and stops when a change denies it.
    let order_egress = |allow_dns: bool| {
        let egress = if allow_dns {
            json!([{"ports": [{"protocol": "UDP", "port": 53}]}])
        } else {
            json!([{"ports": [{"protocol": "TCP", "port": 53}]}])
        };
        network_policy(
            "production",
            "order-egress",
            json!({"podSelector": {"matchLabels": {"app": "order-service"}},
                   "policyTypes": ["Ingress", "Egress"], "egress": egress,
                   "ingress": [{"from": [{"podSelector": {}}]}]}),
        )
    };
    api.apply(Kind::NetworkPolicies, order_egress(true));
    until(
        &world,
        "production/order-service",
        "tcp",
        v4(&world, "production/postgres"),
        5432,
        "eperm",
    );
    let counts = dir.path().join("udp-session");
    let _session = world
        .spawn_testbed(
            world.pod("production/order-service"),
            &[
                "udp-session",
                &world.pod("kube-system/dns").ipv4.to_string(),
                "53",
                counts.to_str().unwrap(),
            ],
        )
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let start = session(&counts);
    assert!(
        start.0 > 5,
        "the session talks before any change: {start:?}"
    );
    let mut churn = Vec::new();
    for round in 0..50 {
        // An unrelated policy changes every round (a new table generation);
        // every tenth round a new workload appears.
        api.apply(
            Kind::NetworkPolicies,
            network_policy(
                "monitoring",
                "churn",
                json!({"podSelector": {"matchLabels": {"app": format!("nothing-{round}")}},
                       "policyTypes": ["Ingress"]}),
            ),
        );
        if round % 10 == 5 {
            let spec = PodSpec {
                cgroup: Some(kubelet_cgroupfs(40 + round)),
                ..PodSpec::new("monitoring", &format!("churn-{round}"), &[], &[])
            };
            let pod = world.add_pod(spec.clone()).unwrap();
            let ips = [pod.ipv4.to_string(), pod.ipv6.to_string()];
            api.apply(
                Kind::Pods,
                pod_object(&template, 40 + round, &spec, &ips, NODE),
            );
            churn.push(spec);
        }
        std::thread::sleep(Duration::from_millis(150));
    }
    std::thread::sleep(Duration::from_millis(500));
    let after = session(&counts);
    eprintln!("udp session across 50 swaps: {start:?} → {after:?}");
    assert_eq!(
        after.1, start.1,
        "no exchange lost across 50 table changes and workload churn"
    );
    assert!(after.0 > start.0 + 50, "the flow kept talking: {after:?}");
    api.apply(Kind::NetworkPolicies, order_egress(false));
    std::thread::sleep(Duration::from_secs(2));
    let denied = session(&counts);
    std::thread::sleep(Duration::from_millis(2500));
    let later = session(&counts);
    assert_eq!(
        later.0, denied.0,
        "no answer passes once policy denies the flow: {denied:?} → {later:?}"
    );
    assert!(later.1 > denied.1, "the session kept trying: {later:?}");
    let ev = agent
        .wait_for_event(
            |e| {
                e["direction"] == "egress"
                    && e["protocol"] == "UDP"
                    && e["port"] == 53
                    && e["local"]["workload"] == "production/order-service"
            },
            Duration::from_secs(3),
        )
        .unwrap();
    assert_eq!(ev["policy"], "production/order-egress", "{ev}");
    assert!(agent.stop().unwrap());

    // 9. The opt-in: with `hostTraffic: policy` the node is a peer like any
    //    other; `reserved:host` in a PalisadePolicy lets it in again.
    let strict = format!("{config}hostTraffic: policy\n");
    let mut agent = Agent::start_with_args(dir.path(), &strict, &args).unwrap();
    agent.wait_enforcing(&world).expect("restarted");
    let payment: IpAddr = v4(&world, "production/payment-service");
    let deadline = Instant::now() + Duration::from_secs(5);
    while world
        .probe_in(&outside, &hub, "tcp", payment, 8080, T)
        .unwrap()
        != "timeout"
    {
        assert!(
            Instant::now() < deadline,
            "node probes still pass under hostTraffic: policy"
        );
    }
    assert_eq!(
        probe(&world, "production/payment-service", "tcp", gw, 7777),
        "eperm"
    );
    api.apply(
        Kind::PalisadePolicies,
        json!({
            "apiVersion": "palisade.dev/v1alpha1", "kind": "PalisadePolicy",
            "metadata": {"name": "node", "namespace": "production", "uid": "pp-node"},
            "spec": {
                "selector": {"matchLabels": {"app": "payment-service"}},
                "ingress": [{"name": "kubelet", "from": [{"identity": "reserved:host"}]}],
                "egress": [{"name": "node", "to": [{"identity": "reserved:host"}]}]
            }
        }),
    );
    until(&world, "production/payment-service", "tcp", gw, 7777, "ok");
    assert_eq!(
        world
            .probe_in(&outside, &hub, "tcp", payment, 8080, T)
            .unwrap(),
        "ok",
        "reserved:host matches the node's address"
    );
    assert!(agent.stop().unwrap());
}

/// On a plain host, workloads in the host's own network namespace share its
/// loopback: a connection to 127.0.0.1 or ::1 leaves no trace of which local
/// process answers, so its peer is `reserved:host` (judged like the node,
/// `hostTraffic: policy` by default on a plain host). A workload with a
/// network namespace of its own talks to itself over loopback, always allowed.
#[test]
fn on_a_plain_host_loopback_is_the_workload_itself_or_the_host() {
    if !kernel_tests_enabled() {
        return;
    }
    let (dir, policies) = temp_policy_dir();
    let mut world = World::new().unwrap();
    world.make_node().unwrap();
    world
        .add_pod(PodSpec::new("shop", "api", &[8080], &[]))
        .unwrap();
    // Services in the host's namespace (the hub is the host here: the agent runs in it).
    let (db_cg, web_cg) = (
        world.cgroup_root.join("hostsvc/db"),
        world.cgroup_root.join("hostsvc/web"),
    );
    std::fs::create_dir_all(&db_cg).unwrap();
    std::fs::create_dir_all(&web_cg).unwrap();
    let hub = world.hub.clone();
    let _db = world
        .spawn_testbed_in(&db_cg, &hub, &["serve", "--tcp", "5432"])
        .unwrap();
    let _web = world
        .spawn_testbed_in(&web_cg, &hub, &["serve", "--tcp", "8081"])
        .unwrap();
    std::fs::write(
        policies.join("policies.yaml"),
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: api-no-egress, namespace: shop}\n\
         spec: {podSelector: {matchLabels: {app: api}}, policyTypes: [Egress, Ingress]}\n---\n\
         apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: web-to-db, namespace: hostsvc}\n\
         spec:\n  podSelector: {matchLabels: {app: web}}\n  policyTypes: [Egress]\n  egress:\n    - to: [{podSelector: {matchLabels: {app: db}}}]\n      ports: [{port: 5432}]\n",
    )
    .unwrap();
    let audit = dir.path().join("audit.jsonl");
    let config = palisade_tests::agent::config_for(&world, &policies, &audit, "");
    let mut agent = Agent::start_in_netns(dir.path(), &config, &hub).unwrap();
    agent.wait_enforcing(&world).expect("enforcing");
    agent
        .wait_workload("hostsvc/web", None, Duration::from_secs(5))
        .unwrap();

    // The pod: its own loopback, under ingress and egress deny-all.
    for to in ["127.0.0.1", "::1"] {
        assert_eq!(
            probe(&world, "shop/api", "tcp", to.parse().unwrap(), 8080),
            "ok",
            "api → its own {to}"
        );
    }
    // …and the host is a peer like others: denied.
    let gw: IpAddr = world.gateway_v4().into();
    assert_eq!(probe(&world, "shop/api", "tcp", gw, 5432), "eperm");

    // A host-network workload: 127.0.0.1 is the host, not `app=db`.
    let web = |to: &str| {
        world
            .probe_in(&web_cg, &hub, "tcp", to.parse().unwrap(), 5432, T)
            .unwrap()
    };
    assert_eq!(
        web("127.0.0.1"),
        "eperm",
        "loopback in the host's namespace is reserved:host"
    );
    assert_eq!(web("::1"), "eperm");
    let ev = agent
        .wait_for_event(
            |e| e["local"]["workload"] == "hostsvc/web" && e["port"] == 5432,
            Duration::from_secs(3),
        )
        .unwrap();
    assert_eq!(ev["peer"]["identityName"], "reserved:host", "{ev}");
    // Without policy the same connection works (the technique is sound).
    let unselected = world
        .probe_in(&db_cg, &hub, "tcp", "127.0.0.1".parse().unwrap(), 8081, T)
        .unwrap();
    assert_eq!(unselected, "ok", "db (no policy) reaches web over loopback");
    // Naming the host in policy lets it through.
    std::fs::write(
        policies.join("host.yaml"),
        "apiVersion: palisade.dev/v1alpha1\nkind: PalisadePolicy\nmetadata: {name: web-to-local, namespace: hostsvc}\n\
         spec:\n  selector: {matchLabels: {app: web}}\n  egress:\n    - name: localhost\n      to: [{identity: \"reserved:host\"}]\n      ports: [{port: 5432}]\n",
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while web("127.0.0.1") != "ok" {
        assert!(
            Instant::now() < deadline,
            "reserved:host allows web → 127.0.0.1:5432"
        );
    }
    assert_eq!(web("::1"), "ok");
    assert!(agent.stop().unwrap());
}

/// Path-MTU discovery works under policy in both families: the node's
/// route to the server carries an MTU of 1,280, so full-sized segments from
/// the client are answered by the node with "fragmentation needed" /
/// "packet too big"; those errors reach the client's kernel (no rule names
/// them) and the connection goes on in smaller segments. Were they dropped,
/// the connection would stall at its first full segment.
#[test]
fn path_mtu_discovery_works_under_policy() {
    if !kernel_tests_enabled() {
        return;
    }
    let (dir, policies) = temp_policy_dir();
    let mut world = World::new().unwrap();
    world.make_node().unwrap();
    for name in ["client", "server"] {
        world.add_pod(PodSpec::new("prod", name, &[], &[])).unwrap();
    }
    let (client, server) = (world.pod("prod/client"), world.pod("prod/server"));
    let hub = world.hub.clone();
    for (family, addr) in [
        ("-4", format!("{}/32", server.ipv4)),
        ("-6", format!("{}/128", server.ipv6)),
    ] {
        palisade_tests::world::ip(&[
            "-n", &hub, family, "route", "add", &addr, "dev", "br0", "mtu", "1280",
        ])
        .unwrap();
    }
    std::fs::write(
        policies.join("policies.yaml"),
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: server, namespace: prod}\n\
         spec:\n  podSelector: {matchLabels: {app: server}}\n  policyTypes: [Ingress, Egress]\n  ingress:\n\
         \x20   - from: [{podSelector: {matchLabels: {app: client}}}]\n      ports: [{port: 7000}]\n---\n\
         apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: client, namespace: prod}\n\
         spec:\n  podSelector: {matchLabels: {app: client}}\n  policyTypes: [Ingress, Egress]\n  egress:\n\
         \x20   - to: [{podSelector: {matchLabels: {app: server}}}]\n      ports: [{port: 7000}]\n",
    )
    .unwrap();
    let audit = dir.path().join("audit.jsonl");
    let config = palisade_tests::agent::config_for(&world, &policies, &audit, "");
    let mut agent = Agent::start_in_netns(dir.path(), &config, &hub).unwrap();
    agent.wait_enforcing(&world).expect("enforcing");
    let bytes = dir.path().join("bytes");
    let _sink = world
        .spawn_testbed(server, &["sink", "7000", bytes.to_str().unwrap()])
        .unwrap();
    for to in [server.ipv4.to_string(), server.ipv6.to_string()] {
        let from = super::counted(&bytes);
        let stream = world
            .spawn_testbed(client, &["stream", &to, "7000", "--chunk", "16384"])
            .unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while super::counted(&bytes) < from + 1_000_000 {
            assert!(
                std::time::Instant::now() < deadline,
                "a megabyte to {to} across an MTU of 1,280: {} bytes arrived",
                super::counted(&bytes) - from
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        // The client learnt the path's MTU from the node's ICMP error.
        let route =
            palisade_tests::world::in_netns(&client.netns, &["ip", "route", "get", &to]).unwrap();
        assert!(route.contains("mtu 1280"), "{to}: {route}");
        drop(stream);
    }
    assert!(agent.stop().unwrap());
}
