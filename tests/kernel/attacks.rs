//! An attacker inside an enforced workload. Every technique is first tried
//! without policy, to prove it delivers packets in this world (counted where
//! they arrive: an nftables counter in the target's namespace, before any
//! socket); then under policy, where the denied peer must see nothing.
use std::{path::Path, time::Duration};

use palisade_tests::{
    agent::{Agent, config_for},
    world::{PodSpec, World},
};
use serde_json::Value;

use super::{burst_counts, cli, kernel_tests_enabled, node::until, temp_policy_dir};

const T: Duration = Duration::from_millis(800);

fn write(dir: &Path, name: &str, text: &str) {
    std::fs::write(dir.join(name), text).unwrap();
}

/// Writes policy file `name` and waits until the agent has applied a new
/// generation (the change is in the kernel).
fn write_applied(agent: &mut Agent, dir: &Path, name: &str, text: &str) {
    let before = agent.status().unwrap()["generation"].as_u64().unwrap();
    write(dir, name, text);
    agent
        .wait_status("the change applied", Duration::from_secs(5), |v| {
            v["generation"].as_u64().unwrap_or(0) > before
        })
        .unwrap();
}

/// Runs `palisade-testbed attack ARGS` in the attacker's network namespace
/// and cgroup (`managed`), or in a cgroup outside the agent's root (the
/// control: the same technique where Palisade does not enforce); returns
/// its word. The attacker runs as root (CAP_NET_RAW, CAP_NET_ADMIN), or as
/// nobody where the technique says `--nobody`.
fn attack(world: &World, managed: bool, args: &[&str]) -> String {
    let mut full = vec!["attack"];
    full.extend(args);
    let pod = world.pod("prod/attacker");
    let cgroup = if managed {
        pod.cgroup.clone()
    } else {
        world.outside_root.clone()
    };
    world
        .testbed_in(&cgroup, &pod.netns, &full)
        .unwrap()
        .trim()
        .to_owned()
}

#[test]
fn an_attacker_in_a_workload_reaches_nothing_that_policy_denies() {
    if !kernel_tests_enabled() {
        return;
    }
    let (dir, policies) = temp_policy_dir();
    let mut world = World::new().unwrap();
    world
        .add_pod(PodSpec::new("prod", "attacker", &[], &[]))
        .unwrap();
    world
        .add_pod(PodSpec::new("prod", "allowed", &[80], &[80]))
        .unwrap();
    world
        .add_pod(PodSpec::new("prod", "victim", &[80], &[80]))
        .unwrap();
    let (attacker, allowed, victim) = (
        world.pod("prod/attacker"),
        world.pod("prod/allowed"),
        world.pod("prod/victim"),
    );
    palisade_tests::world::ip(&[
        "-n",
        &attacker.netns,
        "route",
        "add",
        "255.255.255.255",
        "dev",
        "eth0",
    ])
    .unwrap();
    world.count_arrivals(victim).unwrap();
    let (a4, l4, v4) = (
        attacker.ipv4.to_string(),
        allowed.ipv4.to_string(),
        victim.ipv4.to_string(),
    );
    let (l6, v6) = (allowed.ipv6.to_string(), victim.ipv6.to_string());
    let techniques: Vec<(&str, Vec<&str>)> = vec![
        ("raw UDP socket", vec!["raw-udp", &v4, "80"]),
        (
            "raw socket with IP_HDRINCL",
            vec!["raw-udp-hdrincl", &a4, &v4, "80"],
        ),
        ("TCP SYN from a raw socket", vec!["raw-syn", &a4, &v4, "80"]),
        (
            "forged source (as the allowed pod)",
            vec!["raw-udp-hdrincl", &l4, &v4, "80"],
        ),
        ("IPv4 loose source route", vec!["lsrr", &l4, &v4, "80"]),
        (
            "IPv6 routing header, no capability",
            vec!["rthdr", &l6, &v6, "80", "--nobody"],
        ),
        ("limited broadcast", vec!["broadcast", "80"]),
        (
            "ICMP echo over a ping socket, no capability",
            vec!["ping", &v4, "--nobody"],
        ),
        (
            "ICMPv6 echo over a ping socket, no capability",
            vec!["ping", &v6, "--nobody"],
        ),
        (
            "UDP-Lite from an ordinary socket, no capability",
            vec!["udplite", &v4, "80", "--nobody"],
        ),
        (
            "raw TCP ACK+PSH with data",
            vec!["raw-tcp-data", &a4, &v4, "80"],
        ),
        (
            "raw TCP RST as the allowed pod",
            vec!["raw-tcp-rst", &l4, &v4, "80"],
        ),
    ];
    // Unprivileged ping sockets, as container runtimes commonly allow.
    palisade_tests::world::in_netns(
        &attacker.netns,
        &["sysctl", "-qw", "net.ipv4.ping_group_range=0 2147483647"],
    )
    .unwrap();

    let audit = dir.path().join("audit.jsonl");
    let config = config_for(&world, &policies, &audit, "");
    let mut agent = Agent::start(dir.path(), &config).unwrap();
    agent.wait_enforcing(&world).unwrap();

    // Outside Palisade's reach, from the same namespace, every technique
    // delivers: the test can fail.
    for (name, args) in &techniques {
        let before = world.arrivals(victim).unwrap();
        let word = attack(&world, false, args);
        std::thread::sleep(Duration::from_millis(100));
        let after = world.arrivals(victim).unwrap();
        assert_eq!(word, "sent", "{name} outside the root");
        assert!(after > before, "{name} reaches the victim outside the root");
    }

    // The attacker may reach `allowed` on port 80 and anything outside the
    // pods' subnet; the victim admits only `allowed`.
    write(
        &policies,
        "policy.yaml",
        &format!(
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: attacker, namespace: prod}}\n\
             spec:\n  podSelector: {{matchLabels: {{app: attacker}}}}\n  policyTypes: [Egress]\n  egress:\n\
             \x20   - to: [{{podSelector: {{matchLabels: {{app: allowed}}}}}}]\n      ports: [{{protocol: TCP, port: 80}}, {{protocol: UDP, port: 80}}]\n\
             \x20   - to: [{{ipBlock: {{cidr: 0.0.0.0/0, except: [{}/24]}}}}]\n---\n\
             apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: victim, namespace: prod}}\n\
             spec:\n  podSelector: {{matchLabels: {{app: victim}}}}\n  policyTypes: [Ingress]\n  ingress:\n\
             \x20   - from: [{{podSelector: {{matchLabels: {{app: allowed}}}}}}]\n",
            world.ipv4(0)
        ),
    );
    until(
        &world,
        "prod/attacker",
        "tcp",
        victim.ipv4.into(),
        80,
        "eperm",
    );
    assert_eq!(
        world
            .probe(attacker, "udp", allowed.ipv4.into(), 80, T)
            .unwrap(),
        "ok",
        "the allowed path works"
    );
    for (name, args) in &techniques {
        let before = world.arrivals(victim).unwrap();
        let word = attack(&world, true, args);
        std::thread::sleep(Duration::from_millis(100));
        let after = world.arrivals(victim).unwrap();
        assert_eq!(
            after, before,
            "{name}: the victim saw nothing (attacker: {word})"
        );
    }
    for why in ["source route", "not the workload's own"] {
        agent
            .wait_for_event(
                |e| e["reason"].as_str().is_some_and(|r| r.contains(why)),
                Duration::from_secs(3),
            )
            .unwrap_or_else(|e| panic!("an audit event says {why:?}: {e}"));
    }
    let ev = agent
        .wait_for_event(
            |e| {
                e["local"]["workload"] == "prod/attacker"
                    && e["peer"]["ip"] == v4.as_str()
                    && e["protocol"] == "UDP"
            },
            Duration::from_secs(3),
        )
        .unwrap();
    assert_eq!(ev["verdict"], "deny", "{ev}");

    // Packet sockets: refused where the kernel has the BPF LSM; otherwise
    // the agent says plainly that this protection is missing.
    let (_, json, _) = cli(&agent, &["status", "--json"]);
    let status: Value = serde_json::from_str(&json).unwrap();
    assert_eq!(
        attack(&world, false, &["packet-socket"]),
        "sent",
        "outside the root"
    );
    let word = attack(&world, true, &["packet-socket"]);
    // Where the BPF LSM is active (the kernel matrix's guests list it), the
    // agent must have attached its guard.
    let lsm = std::fs::read_to_string("/sys/kernel/security/lsm").unwrap_or_default();
    if lsm.split(',').any(|m| m.trim() == "bpf") {
        assert_eq!(
            status["posture"]["packet_sockets_refused"], true,
            "the BPF LSM is active ({lsm}): {status}"
        );
    }
    if status["posture"]["packet_sockets_refused"] == true {
        assert_eq!(word, "eperm", "packet socket refused");
    } else {
        assert_eq!(word, "sent", "without the BPF LSM the socket opens");
        let gaps = status["posture"]["gaps"].to_string();
        assert!(gaps.contains("CAP_NET_RAW"), "{gaps}");
        let (_, text, _) = cli(&agent, &["status"]);
        assert!(text.contains("packet sockets refused OFF"), "{text}");
    }
    let (_, text, _) = cli(&agent, &["status"]);
    assert!(
        text.contains("forged source") && text.contains("source routed"),
        "{text}"
    );
    assert!(agent.stop().unwrap());
}

#[test]
fn a_new_or_child_cgroup_is_never_more_open_than_its_workload() {
    if !kernel_tests_enabled() {
        return;
    }
    let (dir, policies) = temp_policy_dir();
    let mut world = World::new().unwrap();
    world
        .add_pod(PodSpec::new("prod", "client", &[], &[]))
        .unwrap();
    world
        .add_pod(PodSpec::new("other", "victim", &[80], &[]))
        .unwrap();
    let victim = world.pod("other/victim");
    world.count_arrivals(victim).unwrap();
    let client_ns = world.pod("prod/client").netns.clone();
    let vip = victim.ipv4.to_string();
    // A crafted cgroup name: escape sequences must not reach a terminal.
    let evil = world
        .cgroup_root
        .join("prod/evil\u{1b}[2J\u{1b}]0;owned\u{7}");
    std::fs::create_dir_all(&evil).unwrap();
    let audit = dir.path().join("audit.jsonl");
    let config = config_for(&world, &policies, &audit, "");
    let mut agent = Agent::start(dir.path(), &config).unwrap();
    agent.wait_enforcing(&world).unwrap();

    let burst_in = |world: &World, cgroup: &Path| -> String {
        std::fs::create_dir_all(cgroup).unwrap();
        world
            .testbed_in(cgroup, &client_ns, &["burst", &vip, "80", "300"])
            .unwrap()
    };

    // Without policy: a brand-new cgroup connects as soon as it is
    // classified, and a child cgroup of the client connects.
    let [ok, _, _] = burst_counts(&burst_in(&world, &world.cgroup_root.join("prod/fresh-a")));
    assert!(ok > 0, "connections go through without policy");
    let child = world.cgroup_root.join("prod/client/sub");
    std::fs::create_dir_all(&child).unwrap();
    agent
        .wait_workload("prod/client/sub", None, Duration::from_secs(5))
        .unwrap();
    assert_eq!(
        world
            .probe_in(&child, &client_ns, "tcp", victim.ipv4.into(), 80, T)
            .unwrap(),
        "ok"
    );

    // Namespace prod may not send anywhere.
    write(
        &policies,
        "deny.yaml",
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: no-egress, namespace: prod}\n\
         spec: {podSelector: {}, policyTypes: [Egress]}\n",
    );
    until(
        &world,
        "prod/client",
        "tcp",
        victim.ipv4.into(),
        80,
        "eperm",
    );
    let before = world.arrivals(victim).unwrap();
    // A child cgroup is its workload.
    assert_eq!(
        world
            .probe_in(&child, &client_ns, "tcp", victim.ipv4.into(), 80, T)
            .unwrap(),
        "eperm",
        "prod/client/sub is prod/client"
    );
    // A cgroup made a moment ago, connecting every millisecond from its
    // first instruction, gets nothing through (agent running).
    let [ok, eperm, _] = burst_counts(&burst_in(&world, &world.cgroup_root.join("prod/fresh-b")));
    assert_eq!(ok, 0, "nothing through while being classified");
    assert!(eperm > 50, "refused at once, every time ({eperm})");
    // …and with the agent stopped (its pinned programs and tables stay).
    agent.kill();
    let [ok, eperm, _] = burst_counts(&burst_in(&world, &world.cgroup_root.join("prod/fresh-c")));
    assert_eq!(ok, 0, "nothing through while no agent runs");
    assert!(eperm > 50, "held fail-closed ({eperm})");
    assert_eq!(
        world.arrivals(victim).unwrap(),
        before,
        "the victim saw nothing"
    );
    agent.spawn().unwrap();
    agent
        .wait_workload("fresh-c", None, Duration::from_secs(10))
        .unwrap();

    // The crafted name reaches neither the CLI nor the log raw.
    let (_, out, _) = cli(&agent, &["workloads"]);
    assert!(out.contains("evil\\u{1b}[2J"), "{out}");
    assert!(
        !out.contains('\u{1b}'),
        "no raw escape in `palisade workloads`"
    );
    assert!(
        agent.log().iter().all(|l| !l.contains('\u{1b}')),
        "no raw escape in the log"
    );
    assert!(agent.stop().unwrap());
}

#[test]
fn a_socket_created_outside_the_root_and_used_by_a_workload_is_reported() {
    if !kernel_tests_enabled() {
        return;
    }
    let (dir, policies) = temp_policy_dir();
    let mut world = World::new().unwrap();
    world
        .add_pod(PodSpec::new("prod", "client", &[8080], &[]))
        .unwrap();
    let audit = dir.path().join("audit.jsonl");
    let config = config_for(&world, &policies, &audit, "");
    let mut agent = Agent::start(dir.path(), &config).unwrap();
    agent.wait_enforcing(&world).unwrap();
    let client = world.pod("prod/client");
    // Made outside the root, then carried into the workload's cgroup.
    let procs = client.cgroup.join("cgroup.procs");
    let outside = world.outside_root.clone();
    let _carrier = world
        .spawn_testbed_in(
            &outside,
            &client.netns,
            &["foreign-socket", procs.to_str().unwrap()],
        )
        .unwrap();
    let status = agent
        .wait_status("a foreign socket", Duration::from_secs(10), |s| {
            s["foreign_sockets"]
                .as_array()
                .is_some_and(|f| !f.is_empty())
        })
        .unwrap();
    agent
        .wait_for_log(
            &["socket created outside the cgroup root", "prod/client"],
            Duration::from_secs(2),
        )
        .expect("each new foreign socket is logged");
    let found = status["foreign_sockets"].as_array().unwrap();
    let protocols: std::collections::BTreeSet<&str> = found
        .iter()
        .filter_map(|f| f["protocol"].as_str())
        .collect();
    assert_eq!(
        protocols,
        ["TCP", "UDP"].into(),
        "both carried sockets, and not the pod's own listener: {status}"
    );
    let (_, text, _) = cli(&agent, &["status"]);
    assert!(text.contains("created outside the cgroup root"), "{text}");
    assert!(agent.stop().unwrap());
}

#[test]
fn a_packet_the_ingress_program_cannot_parse_is_dropped_counted_and_audited() {
    if !kernel_tests_enabled() {
        return;
    }
    let (dir, policies) = temp_policy_dir();
    let mut world = World::new().unwrap();
    world
        .add_pod(PodSpec::new("prod", "victim", &[], &[9000]))
        .unwrap();
    let (sender_ns, sender_ix) = world.add_bare_netns("sender").unwrap();
    let sender6 = world.ipv6(sender_ix).to_string();
    let victim6 = world.pod("prod/victim").ipv6.to_string();
    // The victim admits anyone on UDP 9000: only parsing can stop a datagram.
    write(
        &policies,
        "victim.yaml",
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: victim, namespace: prod}\n\
         spec:\n  podSelector: {matchLabels: {app: victim}}\n  policyTypes: [Ingress]\n  ingress:\n\
         \x20   - ports: [{protocol: UDP, port: 9000}]\n",
    );
    let audit = dir.path().join("audit.jsonl");
    let config = config_for(&world, &policies, &audit, "");
    let mut agent = Agent::start(dir.path(), &config).unwrap();
    agent.wait_enforcing(&world).unwrap();
    let outside = world.outside_root.clone();
    let send = |headers: &str| {
        world
            .testbed_in(
                &outside,
                &sender_ns,
                &[
                    "attack",
                    "deep-ipv6-udp",
                    &sender6,
                    &victim6,
                    "9000",
                    headers,
                ],
            )
            .unwrap()
    };
    // The status refreshes its counters every rescan (100 ms here): wait
    // (at most 3 s) for them to show `done`.
    let counters_when = |agent: &Agent, done: &dyn Fn(&Value) -> bool| -> Value {
        let deadline = std::time::Instant::now() + Duration::from_secs(3);
        loop {
            let (_, json, _) = cli(agent, &["status", "--json"]);
            let c = serde_json::from_str::<Value>(&json).unwrap()["counters"].clone();
            if done(&c) || std::time::Instant::now() >= deadline {
                return c;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    // Two extension headers: parsed, judged, allowed.
    assert_eq!(send("2").trim(), "sent");
    let before = counters_when(&agent, &|c| c["ingress_allow"].as_u64().unwrap_or(0) >= 1);
    assert_eq!(before["unparseable"], 0, "{before}");
    assert!(
        before["ingress_allow"].as_u64().unwrap_or(0) >= 1,
        "{before}"
    );
    // Six: more than the bounded walk reads — dropped, counted, audited.
    assert_eq!(send("6").trim(), "sent");
    let ev = agent
        .wait_for_event(
            |e| {
                e["reason"]
                    .as_str()
                    .is_some_and(|r| r.contains("could not be parsed"))
            },
            Duration::from_secs(3),
        )
        .unwrap();
    assert_eq!(ev["local"]["workload"], "prod/victim", "{ev}");
    assert_eq!(ev["verdict"], "deny", "{ev}");
    let after = counters_when(&agent, &|c| c["unparseable"] == 1);
    assert_eq!(after["unparseable"], 1, "{after}");
    assert!(agent.stop().unwrap());
}

/// A connection older than the change that denies it stops, in either
/// direction, counted in bytes at the listener: a change judges every
/// established connection again (once per policy generation).
#[test]
fn a_change_that_denies_an_established_connection_stops_it() {
    if !kernel_tests_enabled() {
        return;
    }
    let (dir, policies) = temp_policy_dir();
    let mut world = World::new().unwrap();
    world
        .add_pod(PodSpec::new("prod", "client", &[], &[]))
        .unwrap();
    world
        .add_pod(PodSpec::new("prod", "server", &[], &[]))
        .unwrap();
    let (client, server) = (world.pod("prod/client"), world.pod("prod/server"));
    let bytes = dir.path().join("bytes");
    let _sink = world
        .spawn_testbed(server, &["sink", "7000", bytes.to_str().unwrap()])
        .unwrap();
    let received = || super::counted(&bytes);
    let server_policy = |from: &str| {
        format!(
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: server, namespace: prod}}\n\
             spec:\n  podSelector: {{matchLabels: {{app: server}}}}\n  policyTypes: [Ingress]\n  ingress:\n\
             \x20   - from: [{{podSelector: {{matchLabels: {{app: {from}}}}}}}]\n      ports: [{{protocol: TCP, port: 7000}}]\n"
        )
    };
    let client_policy = |to: &str| {
        format!(
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: client, namespace: prod}}\n\
             spec:\n  podSelector: {{matchLabels: {{app: client}}}}\n  policyTypes: [Egress]\n  egress:\n\
             \x20   - to: [{{podSelector: {{matchLabels: {{app: {to}}}}}}}]\n      ports: [{{protocol: TCP, port: 7000}}]\n"
        )
    };
    let set = |agent: &mut Agent, server_from: &str, client_to: &str| {
        write_applied(
            agent,
            &policies,
            "policy.yaml",
            &format!(
                "{}---\n{}",
                server_policy(server_from),
                client_policy(client_to)
            ),
        );
    };
    let grows = |from: u64, what: &str| {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while received() < from + 1000 {
            assert!(
                std::time::Instant::now() < deadline,
                "{what}: {} bytes",
                received()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    let stops = |what: &str| {
        std::thread::sleep(Duration::from_millis(300));
        let at = received();
        std::thread::sleep(Duration::from_secs(2));
        assert_eq!(received(), at, "{what}: bytes still arrive");
        at
    };
    write(
        &policies,
        "policy.yaml",
        &format!(
            "{}---\n{}",
            server_policy("client"),
            client_policy("server")
        ),
    );
    let audit = dir.path().join("audit.jsonl");
    let mut agent = Agent::start(dir.path(), &config_for(&world, &policies, &audit, "")).unwrap();
    agent.wait_enforcing(&world).unwrap();
    let _stream = world
        .spawn_testbed(client, &["stream", &server.ipv4.to_string(), "7000"])
        .unwrap();
    grows(0, "the allowed connection delivers");

    // 1. The server's ingress no longer admits the client.
    set(&mut agent, "nobody", "server");
    let at = stops("after the server's ingress denied it");
    let ev = agent
        .wait_for_event(
            |e| {
                e["direction"] == "ingress"
                    && e["local"]["workload"] == "prod/server"
                    && e["port"] == 7000
            },
            Duration::from_secs(3),
        )
        .unwrap();
    assert_eq!(ev["verdict"], "deny", "{ev}");
    // 2. Allowed again: the same connection goes on (each generation judges it).
    set(&mut agent, "client", "server");
    grows(at, "allowed again");
    // 3. The client's egress no longer allows the server.
    set(&mut agent, "client", "nobody");
    stops("after the client's egress denied it");
    agent
        .wait_for_event(
            |e| {
                e["direction"] == "egress"
                    && e["local"]["workload"] == "prod/client"
                    && e["port"] == 7000
            },
            Duration::from_secs(3),
        )
        .unwrap();
    assert!(agent.stop().unwrap());
}

/// The flow cache cannot be turned against others, and a connected UDP
/// socket's replies always reach it. A client holds a connected UDP session
/// to dns:53 (a ping every 20 ms, each answer awaited) opened while its
/// ingress was open; then an ingress policy selects it (only its egress to
/// dns:53 is allowed) — its answers go on (a reply to a socket connected to
/// that very sender is judged as the socket's egress). Then another workload
/// sends 100,000 datagrams to distinct ports of a third one through a flow
/// cache of 4,096 entries, churning it 24 times over: the session loses
/// nothing, before, during or after.
#[test]
fn a_flow_cache_flood_and_a_later_ingress_policy_never_drop_a_connected_udp_reply() {
    if !kernel_tests_enabled() {
        return;
    }
    let (dir, policies) = temp_policy_dir();
    let mut world = World::new().unwrap();
    for (name, udp) in [
        ("client", &[][..]),
        ("dns", &[53][..]),
        ("flooder", &[]),
        ("sink", &[]),
    ] {
        world.add_pod(PodSpec::new("prod", name, &[], udp)).unwrap();
    }
    // dns admits the client; the flooder may send to the sink on any UDP
    // port (so every datagram is a flow the cache remembers).
    let base = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: dns, namespace: prod}\n\
                spec:\n  podSelector: {matchLabels: {app: dns}}\n  policyTypes: [Ingress]\n  ingress:\n\
                \x20   - from: [{podSelector: {matchLabels: {app: client}}}]\n      ports: [{protocol: UDP, port: 53}]\n\
                ---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: flooder, namespace: prod}\n\
                spec:\n  podSelector: {matchLabels: {app: flooder}}\n  policyTypes: [Egress]\n  egress:\n\
                \x20   - to: [{podSelector: {matchLabels: {app: sink}}}]\n      ports: [{protocol: UDP, port: 1024, endPort: 65535}]\n";
    write(&policies, "base.yaml", base);
    let audit = dir.path().join("audit.jsonl");
    let mut agent = Agent::start(
        dir.path(),
        &config_for(&world, &policies, &audit, "maps:\n  flows: 4096\n"),
    )
    .unwrap();
    agent.wait_enforcing(&world).unwrap();
    let (client, dns, flooder, sink) = (
        world.pod("prod/client"),
        world.pod("prod/dns"),
        world.pod("prod/flooder"),
        world.pod("prod/sink"),
    );
    let counts = dir.path().join("udp-session");
    let _session = world
        .spawn_testbed(
            client,
            &[
                "udp-session",
                &dns.ipv4.to_string(),
                "53",
                counts.to_str().unwrap(),
            ],
        )
        .unwrap();
    let session = || super::node::session(&counts);
    std::thread::sleep(Duration::from_millis(600));
    let before = session();
    assert!(before.0 > 5, "the session talks: {before:?}");

    // An ingress policy now selects the client: nothing may reach it but
    // the answers of the flow it opened.
    let generation = agent.status().unwrap()["generation"].as_u64().unwrap();
    write(
        &policies,
        "client.yaml",
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: client, namespace: prod}\n\
         spec:\n  podSelector: {matchLabels: {app: client}}\n  policyTypes: [Ingress, Egress]\n  egress:\n\
         \x20   - to: [{podSelector: {matchLabels: {app: dns}}}]\n      ports: [{protocol: UDP, port: 53}]\n",
    );
    agent
        .wait_status("the client's policy applied", Duration::from_secs(5), |v| {
            v["generation"].as_u64() > Some(generation) && v["ready"] == true
        })
        .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    let selected = session();
    assert!(
        selected.0 >= before.0 + 30,
        "answers go on under the new ingress policy: {before:?} → {selected:?}"
    );
    // The policy holds for anything else: the sink cannot reach the client.
    assert_eq!(
        world
            .probe(
                sink,
                "udp",
                client.ipv4.into(),
                53,
                Duration::from_millis(300)
            )
            .unwrap(),
        "timeout",
        "the client's ingress is enforced"
    );

    // The flood: 100,000 flows (IPv4 and IPv6) through 4,096 cache entries.
    let mut sent = 0;
    for addr in [sink.ipv4.to_string(), sink.ipv6.to_string()] {
        let out = world
            .testbed(flooder, &["udp-spray", &addr, "50000"])
            .unwrap();
        let words: Vec<&str> = out.split_whitespace().collect();
        assert_eq!(words.get(3), Some(&"0"), "no datagram refused: {out}");
        sent += words
            .get(1)
            .and_then(|n| n.parse::<u64>().ok())
            .unwrap_or(0);
    }
    assert_eq!(sent, 100_000, "every datagram left the flooder");
    std::thread::sleep(Duration::from_millis(1500));
    let after = session();
    eprintln!(
        "session answered/lost: {before:?} before, {selected:?} under the client's policy, {after:?} after 100,000 flooded flows"
    );
    assert_eq!(after.1, before.1, "no answer lost: {before:?} → {after:?}");
    assert!(after.0 > selected.0 + 30, "{selected:?} → {after:?}");
    assert!(agent.stop().unwrap());
}

/// Runs `attack ping-reply DST` as nobody in the attacker's workload:
/// `sent` when the echo's reply came back, `eperm`, or `timeout`.
fn ping_reply(world: &World, dst: &str) -> String {
    attack(world, true, &["ping-reply", dst, "--nobody"])
}

#[test]
fn an_icmp_rule_lets_through_the_echo_it_names_and_nothing_more() {
    if !kernel_tests_enabled() {
        return;
    }
    let (dir, policies) = temp_policy_dir();
    let mut world = World::new().unwrap();
    for name in ["attacker", "allowed", "victim"] {
        world
            .add_pod(PodSpec::new("prod", name, &[80], &[]))
            .unwrap();
    }
    let (attacker, allowed, victim) = (
        world.pod("prod/attacker"),
        world.pod("prod/allowed"),
        world.pod("prod/victim"),
    );
    palisade_tests::world::in_netns(
        &attacker.netns,
        &["sysctl", "-qw", "net.ipv4.ping_group_range=0 2147483647"],
    )
    .unwrap();
    world.count_arrivals(victim).unwrap();
    let (l4, l6) = (allowed.ipv4.to_string(), allowed.ipv6.to_string());
    let (v4, v6) = (victim.ipv4.to_string(), victim.ipv6.to_string());
    let audit = dir.path().join("audit.jsonl");
    let config = config_for(&world, &policies, &audit, "");
    let mut agent = Agent::start(dir.path(), &config).unwrap();
    agent.wait_enforcing(&world).unwrap();

    // Without policy every echo is answered: the test can fail.
    for dst in [&l4, &l6, &v4, &v6] {
        assert_eq!(ping_reply(&world, dst), "sent", "echo to {dst} answered");
    }
    let policy = |code: &str| {
        format!(
            "apiVersion: palisade.dev/v1alpha1\nkind: PalisadePolicy\nmetadata: {{name: attacker, namespace: prod}}\n\
             spec:\n  selector: {{matchLabels: {{app: attacker}}}}\n  egress:\n\
             \x20   - name: echo-to-allowed\n      to: [{{selector: {{matchLabels: {{app: allowed}}}}}}]\n\
             \x20     ports: [{{protocol: ICMP, type: 8{code}}}, {{protocol: ICMPv6, type: 128{code}}}]\n"
        )
    };
    write(&policies, "policy.yaml", &policy(""));
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while ping_reply(&world, &v4) != "eperm" {
        assert!(std::time::Instant::now() < deadline, "the policy applies");
        std::thread::sleep(Duration::from_millis(100));
    }
    let before = world.arrivals(victim).unwrap();
    for dst in [&l4, &l6] {
        assert_eq!(ping_reply(&world, dst), "sent", "the named echo to {dst}");
    }
    // Refused at the ping socket (IPv4), or dropped as it leaves (the
    // IPv6 ping socket does not report the drop): never answered.
    assert_eq!(ping_reply(&world, &v4), "eperm", "no rule names {v4}");
    let word = ping_reply(&world, &v6);
    assert!(
        word == "eperm" || word == "timeout",
        "no rule names {v6}: {word}"
    );
    // TCP is not ICMP: the rule opens no port.
    assert_eq!(
        world
            .probe(attacker, "tcp", allowed.ipv4.into(), 80, T)
            .unwrap(),
        "eperm"
    );
    assert_eq!(
        world.arrivals(victim).unwrap(),
        before,
        "the victim saw nothing"
    );
    let ev = agent
        .wait_for_event(
            |e| e["peer"]["ip"] == v6.as_str() && e["protocol"] == "ICMPv6",
            Duration::from_secs(3),
        )
        .unwrap();
    assert_eq!(ev["verdict"], "deny", "{ev}");
    assert_eq!(ev["icmp"]["type"], 128, "{ev}");
    assert_eq!(ev["icmp"]["code"], 0, "{ev}");

    // A code narrows the rule: echo has code 0, so code 3 allows none.
    write(&policies, "policy.yaml", &policy(", code: 3"));
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while ping_reply(&world, &l4) != "eperm" {
        assert!(
            std::time::Instant::now() < deadline,
            "the narrower rule applies"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_ne!(ping_reply(&world, &l6), "sent");
    write(&policies, "policy.yaml", &policy(", code: 0"));
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while ping_reply(&world, &l4) != "sent" {
        assert!(std::time::Instant::now() < deadline, "code 0 is echo");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(ping_reply(&world, &l6), "sent");
    assert!(agent.stop().unwrap());
}

/// A workload not classified yet admits nothing: a client connects every
/// millisecond to a pod's address from before the pod exists until 3 s
/// after it is classified, and the pod's listener (up from its first
/// instant) counts no connection — agent running, and agent stopped while
/// the pod is made. Without policy the same burst connects (the control).
#[test]
fn a_workload_not_classified_yet_admits_nothing() {
    if !kernel_tests_enabled() {
        return;
    }
    let (dir, policies) = temp_policy_dir();
    let mut world = World::new().unwrap();
    world
        .add_pod(PodSpec::new("prod", "client", &[], &[]))
        .unwrap();
    let client = world.pod("prod/client");
    let (client_cg, client_ns) = (client.cgroup.clone(), client.netns.clone());
    let audit = dir.path().join("audit.jsonl");
    let config = config_for(&world, &policies, &audit, "");
    let mut agent = Agent::start(dir.path(), &config).unwrap();
    agent.wait_enforcing(&world).unwrap();

    // Bursts at the next pod's address for `ms` while `make` makes that pod
    // (after 300 ms) and starts its counting listener; returns (connections
    // the listener counted, the burst's ok count, when the pod was made).
    let run = |world: &mut World,
               agent: &mut Agent,
               name: &str,
               ms: u64,
               make: &dyn Fn(&mut Agent)|
     -> (u64, u64, std::time::Instant) {
        let index = u8::try_from(world.pods.len() + 10).unwrap();
        let addr = world.ipv4(index).to_string();
        let (cg, ns) = (client_cg.clone(), client_ns.clone());
        let burst = std::thread::spawn(move || {
            palisade_tests::world::testbed_in(&cg, &ns, &["burst", &addr, "80", &ms.to_string()])
                .unwrap()
        });
        std::thread::sleep(Duration::from_millis(300));
        let made = std::time::Instant::now();
        world
            .add_pod(PodSpec::new("vault", name, &[], &[]))
            .unwrap();
        let pod = world.pod(&format!("vault/{name}"));
        let count = dir.path().join(format!("count-{name}"));
        let listener = world
            .spawn_testbed(
                pod,
                &["serve", "--tcp", "80", "--count", count.to_str().unwrap()],
            )
            .unwrap();
        make(agent);
        let [ok, _, _] = burst_counts(&burst.join().unwrap());
        drop(listener);
        (super::counted(&count), ok, made)
    };

    // Without policy the technique delivers.
    let (counted, ok, _) = run(&mut world, &mut agent, "open", 2000, &|_| {});
    assert!(
        counted > 0 && ok > 0,
        "without policy: listener {counted}, burst ok {ok}"
    );

    // vault admits only app=friend.
    write_applied(
        &mut agent,
        &policies,
        "vault.yaml",
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: vault, namespace: vault}\n\
         spec:\n  podSelector: {}\n  policyTypes: [Ingress]\n  ingress:\n\
         \x20   - from: [{podSelector: {matchLabels: {app: friend}}}]\n",
    );

    // Agent running: classified within the burst, which goes on 3 s more.
    let (counted, ok, made) = run(&mut world, &mut agent, "late", 5000, &|agent| {
        agent
            .wait_workload("vault/late", None, Duration::from_secs(2))
            .unwrap();
    });
    assert!(
        made.elapsed() > Duration::from_secs(4),
        "the burst outlived classification"
    );
    assert_eq!((counted, ok), (0, 0), "a pod made under a running agent");

    // Agent stopped while the pod is made; started again, it classifies it.
    agent.kill();
    let (counted, ok, made) = run(&mut world, &mut agent, "orphan", 7000, &|agent| {
        std::thread::sleep(Duration::from_millis(1000));
        agent.spawn().unwrap();
        agent
            .wait_workload("vault/orphan", None, Duration::from_secs(3))
            .unwrap();
    });
    assert!(
        made.elapsed() > Duration::from_secs(6),
        "the burst outlived classification"
    );
    assert_eq!((counted, ok), (0, 0), "a pod made while no agent ran");
    // Refused while pending, in the kernel with no agent: audited as the
    // config field that holds it.
    let ev = agent
        .wait_for_event(
            |e| e["policy"] == "unknownWorkloads" && e["direction"] == "ingress",
            Duration::from_secs(3),
        )
        .unwrap();
    assert_eq!(ev["local"]["identityName"], "reserved:pending-pod", "{ev}");
    assert!(agent.stop().unwrap());
}

/// A CIDR rule matches addresses, not identities: an identity with one
/// address inside the block and others outside it (its IPv6 address) or
/// inside an `except` (a second address on its interface) is reachable at
/// the first only. Without policy all three answer.
#[test]
fn an_identity_spanning_an_except_is_judged_per_address() {
    if !kernel_tests_enabled() {
        return;
    }
    let (dir, policies) = temp_policy_dir();
    let mut world = World::new().unwrap();
    world
        .add_pod(PodSpec::new("prod", "attacker", &[], &[]))
        .unwrap();
    world
        .add_pod(PodSpec::new("prod", "victim", &[80], &[]))
        .unwrap();
    let (attacker, victim) = (world.pod("prod/attacker"), world.pod("prod/victim"));
    let second = world.ipv4(200);
    palisade_tests::world::ip(&[
        "-n",
        &victim.netns,
        "addr",
        "add",
        &format!("{second}/24"),
        "dev",
        "eth0",
    ])
    .unwrap();
    let audit = dir.path().join("audit.jsonl");
    let config = config_for(&world, &policies, &audit, "");
    let mut agent = Agent::start(dir.path(), &config).unwrap();
    agent.wait_enforcing(&world).unwrap();
    agent
        .wait_workload(
            "prod/victim",
            Some(&second.to_string()),
            Duration::from_secs(5),
        )
        .unwrap();
    let addrs: [std::net::IpAddr; 3] = [victim.ipv4.into(), second.into(), victim.ipv6.into()];
    for to in addrs {
        assert_eq!(
            world.probe(attacker, "tcp", to, 80, T).unwrap(),
            "ok",
            "{to} without policy"
        );
    }
    let subnet = format!("{}/24", world.ipv4(0));
    write(
        &policies,
        "policy.yaml",
        &format!(
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: attacker, namespace: prod}}\n\
             spec:\n  podSelector: {{matchLabels: {{app: attacker}}}}\n  policyTypes: [Egress]\n  egress:\n\
             \x20   - to: [{{ipBlock: {{cidr: {subnet}, except: [{second}/32]}}}}]\n      ports: [{{protocol: TCP, port: 80}}]\n"
        ),
    );
    until(&world, "prod/attacker", "tcp", second.into(), 80, "eperm");
    assert_eq!(
        world
            .probe(attacker, "tcp", victim.ipv4.into(), 80, T)
            .unwrap(),
        "ok",
        "the address inside the block"
    );
    assert_eq!(
        world
            .probe(attacker, "tcp", victim.ipv6.into(), 80, T)
            .unwrap(),
        "eperm",
        "the same workload's IPv6 address is outside the block"
    );
    let ev = agent
        .wait_for_event(
            |e| e["peer"]["ip"] == second.to_string().as_str(),
            Duration::from_secs(3),
        )
        .unwrap();
    assert_eq!(ev["verdict"], "deny", "{ev}");
    assert_eq!(ev["peer"]["name"], "prod/victim", "{ev}");
    assert!(agent.stop().unwrap());
}

/// Whether this kernel can make an SCTP socket at all.
fn kernel_has_sctp() -> bool {
    // SAFETY: a plain syscall; the descriptor is closed at once.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 132) };
    if fd >= 0 {
        // SAFETY: our own descriptor.
        unsafe { libc::close(fd) };
    }
    fd >= 0
}

/// SCTP, counted at the listener: dropped as it leaves where the sender's
/// egress allows no SCTP (its INIT: the kernel runs no connect hook for
/// SCTP), dropped at the receiver where the receiver's ingress denies the
/// sender. Without policy both families
/// associate. The host CI runs on has no SCTP in its kernel; the kernel
/// matrix's guests (Debian 6.1 and 6.12) have it and run this test.
#[test]
fn sctp_is_judged_at_connect_and_at_the_receiver() {
    if !kernel_tests_enabled() {
        return;
    }
    if !kernel_has_sctp() {
        assert!(
            std::env::var_os("PALISADE_VM").is_none(),
            "the kernel matrix's guests have SCTP"
        );
        eprintln!(
            "this kernel has no SCTP: nothing to send it with; the kernel matrix runs this test"
        );
        return;
    }
    let (dir, policies) = temp_policy_dir();
    let mut world = World::new().unwrap();
    for name in ["client", "server", "friend"] {
        world.add_pod(PodSpec::new("prod", name, &[], &[])).unwrap();
    }
    let (client, server, friend) = (
        world.pod("prod/client"),
        world.pod("prod/server"),
        world.pod("prod/friend"),
    );
    let count = dir.path().join("associations");
    let _listener = world
        .spawn_testbed(
            server,
            &[
                "serve",
                "--sctp",
                "7000",
                "--count",
                count.to_str().unwrap(),
            ],
        )
        .unwrap();
    let audit = dir.path().join("audit.jsonl");
    let config = config_for(&world, &policies, &audit, "");
    let mut agent = Agent::start(dir.path(), &config).unwrap();
    agent.wait_enforcing(&world).unwrap();
    let (v4, v6): (std::net::IpAddr, std::net::IpAddr) = (server.ipv4.into(), server.ipv6.into());
    for to in [v4, v6] {
        assert_eq!(
            world.probe(client, "sctp", to, 7000, T).unwrap(),
            "ok",
            "{to} without policy"
        );
    }
    assert_eq!(super::counted(&count), 2, "the listener counted both");

    let set = |agent: &mut Agent, text: &str| write_applied(agent, &policies, "policy.yaml", text);
    let client_egress = |proto: &str| {
        format!(
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: client, namespace: prod}}\n\
             spec:\n  podSelector: {{matchLabels: {{app: client}}}}\n  policyTypes: [Egress]\n  egress:\n\
             \x20   - to: [{{podSelector: {{matchLabels: {{app: server}}}}}}]\n      ports: [{{protocol: {proto}, port: 7000}}]\n"
        )
    };
    // 1. The client's egress names TCP only: the INIT is dropped as it
    //    leaves (the kernel runs no connect hook for SCTP's connect()).
    set(&mut agent, &client_egress("TCP"));
    for to in [v4, v6] {
        let word = world.probe(client, "sctp", to, 7000, T).unwrap();
        assert!(word == "eperm" || word == "timeout", "{to}: {word}");
    }
    assert_eq!(
        super::counted(&count),
        2,
        "nothing more reached the listener"
    );
    let ev = agent
        .wait_for_event(
            |e| e["protocol"] == "SCTP" && e["port"] == 7000,
            Duration::from_secs(3),
        )
        .unwrap();
    assert_eq!(ev["verdict"], "deny", "{ev}");
    // 2. The client may send SCTP, the server admits only its friend: the
    //    INIT is dropped at the receiver.
    set(
        &mut agent,
        &format!(
            "{}---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: server, namespace: prod}}\n\
             spec:\n  podSelector: {{matchLabels: {{app: server}}}}\n  policyTypes: [Ingress]\n  ingress:\n\
             \x20   - from: [{{podSelector: {{matchLabels: {{app: friend}}}}}}]\n      ports: [{{protocol: SCTP, port: 7000}}]\n",
            client_egress("SCTP")
        ),
    );
    for to in [v4, v6] {
        let word = world.probe(client, "sctp", to, 7000, T).unwrap();
        assert!(word == "timeout" || word == "refused", "{to}: {word}");
    }
    assert_eq!(
        super::counted(&count),
        2,
        "the denied client associated nothing"
    );
    assert_eq!(
        world.probe(friend, "sctp", v4, 7000, T).unwrap(),
        "ok",
        "the friend may"
    );
    assert_eq!(super::counted(&count), 3);
    assert!(agent.stop().unwrap());
}
