//! Kernel tests: the real agent, the real programs in the running kernel, real
//! TCP/UDP traffic between pods made of network namespaces and cgroups.
//!
//! They need root and the release binaries (`cargo xtask test` builds them).
//! Outside CI a test that cannot run says why and passes; under `CI=true` it
//! fails.
use std::{os::unix::fs::OpenOptionsExt as _, path::PathBuf, time::Duration};

use palisade_tests::{
    agent::{Agent, config_for, config_with_rules},
    conformance, kubeproxy,
    scenario::{self, Family},
    world::{PodSpec, World},
};
use serde_json::Value;

mod attacks;
mod faults;
mod inputs;
mod node;
mod progrun;

/// `ok eperm other` of one `palisade-testbed burst`.
pub(crate) fn burst_counts(out: &str) -> [u64; 3] {
    let n: Vec<u64> = out
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect();
    [0, 1, 2].map(|i| n.get(i).copied().unwrap_or(0))
}

/// The number a testbed listener keeps in its count file (`serve --count`,
/// `sink`): what arrived so far, 0 before the first arrival.
pub(crate) fn counted(file: &std::path::Path) -> u64 {
    std::fs::read_to_string(file)
        .ok()
        .and_then(|t| t.trim().parse().ok())
        .unwrap_or(0)
}

/// A temporary directory with an empty `policies/` directory in it.
pub(crate) fn temp_policy_dir() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let policies = dir.path().join("policies");
    std::fs::create_dir_all(&policies).unwrap();
    (dir, policies)
}

/// `Some(())` when kernel tests can run here; otherwise explains, and fails under CI.
fn kernel_tests_enabled() -> bool {
    match palisade_tests::can_run_kernel_tests() {
        Ok(()) => true,
        Err(why) if std::env::var("CI").is_ok_and(|v| v == "true") => {
            panic!("kernel test cannot run under CI=true: {why}")
        }
        Err(why) => {
            eprintln!("SKIPPED (not under CI): {why}");
            false
        }
    }
}

fn policy_dir(kind: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../policies")
        .join(kind)
}

struct Setup {
    // Field order is drop order: the agent stops before the world goes away.
    agent: Agent,
    world: World,
    _dir: tempfile::TempDir,
}

fn setup(pods: Vec<PodSpec>, policies: &std::path::Path, extra: &str) -> Setup {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut world = World::new().expect("world");
    for p in pods {
        world.add_pod(p).expect("pod");
    }
    let config = config_for(&world, policies, &dir.path().join("audit.jsonl"), extra);
    let mut agent = Agent::start(dir.path(), &config).expect("agent starts");
    agent
        .wait_enforcing(&world)
        .expect("agent enforces every pod");
    Setup {
        agent,
        world,
        _dir: dir,
    }
}

fn assert_all_hold(obs: &[scenario::Observation]) {
    let table = scenario::table(obs);
    assert!(
        obs.iter().all(scenario::Observation::holds),
        "verdicts differ from the policy:\n{table}"
    );
    assert!(!obs.is_empty());
}

fn field<'a>(ev: &'a Value, path: &[&str]) -> &'a Value {
    path.iter().fold(ev, |v, k| &v[*k])
}

#[test]
fn payment_service_networkpolicy_is_enforced_ipv4_and_ipv6_with_audit() {
    if !kernel_tests_enabled() {
        return;
    }
    let mut s = setup(
        scenario::pods(),
        &policy_dir("kubernetes"),
        scenario::NAMESPACES,
    );
    let obs = scenario::run_probes(
        &s.world,
        &scenario::expectations(),
        &[Family::V4, Family::V6],
    );
    assert_all_hold(&obs);

    let logging = s.world.pod("production/logging");
    // Ingress deny: names logging as source, payment-service as target, and the policy.
    for ip in [logging.ipv4.to_string(), logging.ipv6.to_string()] {
        let ev = s
            .agent
            .wait_for_event(
                |e| {
                    e["direction"] == "ingress"
                        && e["port"] == 443
                        && e["peer"]["ip"] == ip.as_str()
                },
                Duration::from_secs(3),
            )
            .expect("audit event for logging → payment-service:443");
        assert_eq!(ev["verdict"], "deny");
        assert_eq!(ev["protocol"], "TCP");
        assert_eq!(ev["from"], "production/logging");
        assert_eq!(ev["to"], "production/payment-service");
        assert_eq!(ev["policy"], "production/payment-service-policy");
        assert_eq!(ev["policyKind"], "NetworkPolicy");
        assert_eq!(ev["rule"], "default-deny");
        assert_eq!(
            field(&ev, &["local", "workload"]),
            "production/payment-service"
        );
        assert_eq!(field(&ev, &["local", "labels", "app"]), "payment-service");
        assert_eq!(field(&ev, &["peer", "labels", "app"]), "logging");
        assert_eq!(field(&ev, &["peer", "namespace"]), "production");
        assert!(ev["local"]["identity"].as_u64().unwrap_or(0) >= 256);
        assert!(
            ev["time"]
                .as_str()
                .is_some_and(|t| t.starts_with("20") && t.ends_with('Z')),
            "{ev}"
        );
    }
    // Egress deny at connect(): carries pid and command.
    let ev = s
        .agent
        .wait_for_event(
            |e| {
                e["direction"] == "egress"
                    && e["port"] == 9000
                    && e["peer"]["ip"] == logging.ipv4.to_string().as_str()
            },
            Duration::from_secs(3),
        )
        .expect("audit event for payment-service → logging:9000");
    assert_eq!(ev["verdict"], "deny");
    assert_eq!(ev["from"], "production/payment-service");
    assert_eq!(ev["to"], "production/logging");
    assert_eq!(ev["policy"], "production/payment-service-policy");
    assert!(ev["local"]["pid"].as_u64().unwrap_or(0) > 1, "{ev}");
    assert_eq!(
        ev["local"]["command"], "palisade-testbe",
        "comm is the 15-byte task name"
    );
    assert_eq!(
        field(&ev, &["local", "workload"]),
        "production/payment-service"
    );
    // Allowed traffic leaves no audit event.
    let events = s.agent.audit_events().expect("audit log");
    assert!(
        events.iter().all(|e| e["verdict"] == "deny"),
        "only denials are audited"
    );
    assert!(
        !events
            .iter()
            .any(|e| e["from"] == "production/order-service" && e["port"] == 443)
    );
    // Every real event is an `AuditRecord` (the type `palisade schema audit`
    // publishes): nothing unknown, nothing missing, read back unchanged.
    palisade_tests::assert_audit_records(&events);
    assert!(
        s.agent.stop().expect("agent stops"),
        "agent exits 0 on SIGTERM"
    );
}

#[test]
fn palisade_policy_kind_gives_the_same_verdicts_and_names_its_rules() {
    if !kernel_tests_enabled() {
        return;
    }
    let mut s = setup(
        scenario::pods(),
        &policy_dir("palisade"),
        scenario::NAMESPACES,
    );
    let obs = scenario::run_probes(
        &s.world,
        &scenario::expectations(),
        &[Family::V4, Family::V6],
    );
    assert_all_hold(&obs);
    let ev = s
        .agent
        .wait_for_event(
            |e| e["direction"] == "ingress" && e["from"] == "production/logging",
            Duration::from_secs(3),
        )
        .expect("ingress deny event");
    assert_eq!(ev["policy"], "production/payment-service");
    assert_eq!(ev["policyKind"], "PalisadePolicy");
    assert!(s.agent.stop().expect("agent stops"));
}

#[test]
fn ingress_judges_a_sender_of_unknown_cgroup_by_its_address() {
    if !kernel_tests_enabled() {
        return;
    }
    // Two senders whose processes live outside the agent's cgroup root: the
    // agent knows them only by address, from its `peers` config.
    let dir = tempfile::tempdir().expect("temp dir");
    let mut world = World::new().expect("world");
    for p in scenario::pods() {
        world.add_pod(p).expect("pod");
    }
    let (orders_ns, orders_ix) = world.add_bare_netns("remote-orders").expect("netns");
    let (logs_ns, logs_ix) = world.add_bare_netns("remote-logs").expect("netns");
    let extra = format!(
        "{}peers:\n  - name: remote-order-service\n    namespace: production\n    labels: {{app: order-service}}\n    cidrs: [{}/32, {}/128]\n  \
         - name: remote-logging\n    namespace: production\n    labels: {{app: logging}}\n    cidrs: [{}/32]\n",
        scenario::NAMESPACES,
        world.ipv4(orders_ix),
        world.ipv6(orders_ix),
        world.ipv4(logs_ix),
    );
    let config = config_for(
        &world,
        &policy_dir("kubernetes"),
        &dir.path().join("audit.jsonl"),
        &extra,
    );
    let mut agent = Agent::start(dir.path(), &config).expect("agent");
    agent.wait_enforcing(&world).expect("enforcing");
    let payment = world.pod("production/payment-service");
    let outside = world.outside_root.clone();
    let t = Duration::from_millis(1000);
    assert_eq!(
        world
            .probe_in(&outside, &orders_ns, "tcp", payment.ipv4.into(), 443, t)
            .unwrap(),
        "ok"
    );
    assert_eq!(
        world
            .probe_in(&outside, &orders_ns, "tcp", payment.ipv6.into(), 443, t)
            .unwrap(),
        "ok"
    );
    assert_eq!(
        world
            .probe_in(&outside, &orders_ns, "tcp", payment.ipv4.into(), 8080, t)
            .unwrap(),
        "timeout"
    );
    assert_eq!(
        world
            .probe_in(&outside, &logs_ns, "tcp", payment.ipv4.into(), 443, t)
            .unwrap(),
        "timeout"
    );
    let ev = agent
        .wait_for_event(
            |e| e["peer"]["ip"] == world.ipv4(logs_ix).to_string().as_str(),
            Duration::from_secs(3),
        )
        .expect("deny event for the remote sender");
    assert_eq!(
        ev["from"], "production/logging",
        "the peer is named from its address"
    );
    assert_eq!(field(&ev, &["peer", "labels", "app"]), "logging");
    assert!(agent.stop().expect("stop"));
}

#[test]
fn a_workload_created_after_start_is_enforced_within_a_second() {
    if !kernel_tests_enabled() {
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let mut world = World::new().expect("world");
    for p in scenario::pods() {
        world.add_pod(p).expect("pod");
    }
    // Replicas live under production-replicas/ and are labelled app=payment-service.
    let rule = "  - path: \"production-replicas/{name}\"\n    namespace: production\n    labels:\n      app: payment-service\n";
    let config = config_with_rules(
        &world,
        &policy_dir("kubernetes"),
        &dir.path().join("audit.jsonl"),
        rule,
        scenario::NAMESPACES,
    );
    let mut agent = Agent::start(dir.path(), &config).expect("agent");
    agent.wait_enforcing(&world).expect("enforcing");
    world
        .add_pod(PodSpec::new(
            "production-replicas",
            "payment-2",
            &[443, 8080],
            &[],
        ))
        .expect("replica");
    // The acceptance bound: one second after the workload exists, it is enforced.
    std::thread::sleep(Duration::from_secs(1));
    let replica = world.pod("production-replicas/payment-2");
    let logging = world.pod("production/logging");
    let order = world.pod("production/order-service");
    let t = Duration::from_millis(1000);
    assert_eq!(
        world
            .probe(logging, "tcp", replica.ipv4.into(), 443, t)
            .unwrap(),
        "timeout",
        "new replica is default-deny"
    );
    assert_eq!(
        world
            .probe(order, "tcp", replica.ipv4.into(), 443, t)
            .unwrap(),
        "ok",
        "and allows order-service"
    );
    assert_eq!(
        world
            .probe(replica, "tcp", logging.ipv4.into(), 9000, t)
            .unwrap(),
        "eperm",
        "its egress is enforced"
    );
    assert!(agent.stop().expect("stop"));
}

#[test]
fn processes_outside_the_root_and_unselected_workloads_are_unaffected() {
    if !kernel_tests_enabled() {
        return;
    }
    let mut s = setup(
        scenario::pods(),
        &policy_dir("kubernetes"),
        scenario::NAMESPACES,
    );
    let payment = s.world.pod("production/payment-service");
    let logging = s.world.pod("production/logging");
    let postgres = s.world.pod("production/postgres");
    let order = s.world.pod("production/order-service");
    let t = Duration::from_millis(1000);
    // Same network namespace and address as payment-service, but a process in
    // a cgroup outside the agent's root: its egress is not judged.
    let outside = s.world.outside_root.clone();
    assert_eq!(
        s.world
            .probe_in(
                &outside,
                &payment.netns,
                "tcp",
                logging.ipv4.into(),
                9000,
                t
            )
            .unwrap(),
        "ok"
    );
    assert_eq!(
        s.world
            .probe(payment, "tcp", logging.ipv4.into(), 9000, t)
            .unwrap(),
        "eperm"
    );
    // A workload may always reach itself (upstream: loopback follows no policy),
    // though its own egress and ingress policies allow neither of these.
    assert_eq!(
        s.world
            .probe(payment, "tcp", payment.ipv4.into(), 8080, t)
            .unwrap(),
        "ok"
    );
    assert_eq!(
        s.world
            .probe(payment, "tcp", payment.ipv6.into(), 443, t)
            .unwrap(),
        "ok"
    );
    // Workloads no policy selects talk freely, in both directions.
    assert_eq!(
        s.world
            .probe(logging, "tcp", postgres.ipv4.into(), 5432, t)
            .unwrap(),
        "ok"
    );
    assert_eq!(
        s.world
            .probe(postgres, "tcp", order.ipv6.into(), 8000, t)
            .unwrap(),
        "ok"
    );
    assert_eq!(
        s.world
            .probe(order, "tcp", logging.ipv4.into(), 9000, t)
            .unwrap(),
        "ok"
    );
    // No event for any of that.
    std::thread::sleep(Duration::from_millis(200));
    let events = s.agent.audit_events().unwrap();
    assert!(
        events
            .iter()
            .all(|e| e["from"] == "production/payment-service"),
        "{events:?}"
    );
    assert!(s.agent.stop().unwrap());
}

#[test]
fn everything_the_world_and_agent_made_is_removed() {
    if !kernel_tests_enabled() {
        return;
    }
    let s = setup(
        scenario::pods(),
        &policy_dir("kubernetes"),
        scenario::NAMESPACES,
    );
    let tag = s.world.tag.clone();
    let root = s.world.cgroup_root.clone();
    let outside = s.world.outside_root.clone();
    assert!(root.exists());
    drop(s);
    assert!(!root.exists(), "cgroup root removed");
    assert!(!outside.exists(), "outside cgroup removed");
    let left: Vec<String> = palisade_tests::world::leftover_netns()
        .into_iter()
        .filter(|n| n.starts_with(&tag))
        .collect();
    assert!(left.is_empty(), "network namespaces left: {left:?}");
}

#[test]
fn a_policy_file_change_applies_and_an_invalid_one_is_rejected() {
    if !kernel_tests_enabled() {
        return;
    }
    let policies = tempfile::tempdir().expect("temp dir");
    std::fs::copy(
        policy_dir("kubernetes").join("payment-service-policy.yaml"),
        policies.path().join("payment-service-policy.yaml"),
    )
    .expect("copy policy");
    let mut s = setup(scenario::pods(), policies.path(), scenario::NAMESPACES);
    let logging = s.world.pod("production/logging");
    let payment = s.world.pod("production/payment-service");
    let t = Duration::from_millis(1000);
    assert_eq!(
        s.world
            .probe(logging, "tcp", payment.ipv4.into(), 443, t)
            .unwrap(),
        "timeout"
    );

    // An invalid file: rejected with its location; the previous policy stays in force.
    std::fs::write(policies.path().join("broken.yaml"), "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: b, namespace: production}\nspec:\n  podSelector: {}\n  ingress:\n  - ports: [{port: 0}]\n").unwrap();
    s.agent
        .wait_status("the change refused", Duration::from_secs(5), |st| {
            st["policy_revision_refused"].as_u64() >= Some(1)
        })
        .expect("refused");
    // The log names the file, line and field (read from the agent's pipe).
    s.agent
        .wait_for_log(
            &["broken.yaml:7:20: spec.ingress[0].ports[0].port: 0 is out of range"],
            Duration::from_secs(2),
        )
        .expect("the refusal is logged with its location");
    assert_eq!(
        s.world
            .probe(logging, "tcp", payment.ipv4.into(), 443, t)
            .unwrap(),
        "timeout"
    );
    let (_, status, _) = cli(&s.agent, &["status", "--json"]);
    let status: Value = serde_json::from_str(&status).unwrap();
    assert!(
        status["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("broken.yaml:7:20: spec.ingress[0].ports[0].port")),
        "status shows the refused change: {status}"
    );
    assert_eq!(status["apply_errors"], 1);

    // A valid change: logging may now reach payment-service on 443.
    std::fs::remove_file(policies.path().join("broken.yaml")).unwrap();
    std::fs::write(
        policies.path().join("allow-logging.yaml"),
        "apiVersion: palisade.dev/v1alpha1\nkind: PalisadePolicy\nmetadata: {name: allow-logging, namespace: production}\n\
         spec:\n  selector: {matchLabels: {app: payment-service}}\n  ingress:\n    - name: logging-https\n      \
         from: [{selector: {matchLabels: {app: logging}}}]\n      ports: [{protocol: TCP, port: 443}]\n",
    )
    .unwrap();
    s.agent
        .wait_status("two policies applied", Duration::from_secs(5), |st| {
            st["policies"] == 2 && st["policy_revision_applied"] == st["policy_revision"]
        })
        .expect("reloaded and applied");
    assert_eq!(
        s.world
            .probe(logging, "tcp", payment.ipv4.into(), 443, t)
            .unwrap(),
        "ok"
    );
    assert_eq!(
        s.world
            .probe(logging, "tcp", payment.ipv4.into(), 8080, t)
            .unwrap(),
        "timeout",
        "only 443 was opened"
    );
    assert!(s.agent.stop().unwrap());
}

#[test]
fn the_conformance_corpus_holds_in_the_kernel() {
    if !kernel_tests_enabled() {
        return;
    }
    let world = palisade_tests::corpus::dir().join("world.yaml");
    let mut failures = Vec::new();
    for (i, case) in palisade_tests::corpus::cases().into_iter().enumerate() {
        let name = case
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        let probes = palisade::offline::load_probes(&case.join("probes.json")).expect("probes");
        // Every case twice: to pod addresses, and through one ClusterIP
        // Service per pod (kube-proxy's iptables and nftables modes in turn).
        let mode = if i % 2 == 0 {
            kubeproxy::Mode::Iptables
        } else {
            kubeproxy::Mode::Nftables
        };
        let observed = conformance::run_via(
            &world,
            &[case.join("policies")],
            &probes,
            conformance::Via::Services(mode),
        )
        .unwrap_or_else(|e| panic!("{name}: {e:#}"));
        let kernel = observed.direct;
        let expected = palisade_tests::corpus::expected(&case).expect("expected.json");
        let offline = palisade_tests::corpus::simulate(&case).expect("simulate");
        for d in palisade_tests::conformance::differences(&kernel, &expected) {
            failures.push(format!("{name}: {}", d.replace("simulate", "expected")));
        }
        let via = observed.via_services.expect("probed through Services");
        for d in palisade_tests::conformance::differences(&via, &expected) {
            failures.push(format!(
                "{name} (through ClusterIPs, {mode:?}): {}",
                d.replace("simulate", "expected")
            ));
        }
        for d in palisade_tests::conformance::differences(&kernel, &offline) {
            failures.push(format!("{name}: {d}"));
        }
    }
    assert!(
        failures.is_empty(),
        "kernel differs:\n{}",
        failures.join("\n")
    );
}

#[test]
fn audit_mode_lets_traffic_through_and_reports_would_deny() {
    if !kernel_tests_enabled() {
        return;
    }
    let policies = tempfile::tempdir().expect("temp dir");
    std::fs::write(
        policies.path().join("trial.yaml"),
        "apiVersion: palisade.dev/v1alpha1\nkind: PalisadePolicy\nmetadata: {name: trial, namespace: production}\n\
         spec:\n  mode: audit\n  selector: {matchLabels: {app: payment-service}}\n  ingress:\n    - name: orders\n      \
         from: [{selector: {matchLabels: {app: order-service}}}]\n",
    )
    .unwrap();
    let mut s = setup(scenario::pods(), policies.path(), scenario::NAMESPACES);
    let logging = s.world.pod("production/logging");
    let order = s.world.pod("production/order-service");
    let payment = s.world.pod("production/payment-service");
    let t = Duration::from_millis(1000);
    assert_eq!(
        s.world
            .probe(logging, "tcp", payment.ipv4.into(), 443, t)
            .unwrap(),
        "ok"
    );
    assert_eq!(
        s.world
            .probe(order, "tcp", payment.ipv4.into(), 443, t)
            .unwrap(),
        "ok"
    );
    let ev = s
        .agent
        .wait_for_event(
            |e| e["from"] == "production/logging",
            Duration::from_secs(3),
        )
        .expect("would-deny event");
    assert_eq!(ev["verdict"], "would-deny");
    assert_eq!(ev["policy"], "production/trial");
    assert_eq!(ev["policyKind"], "PalisadePolicy");
    std::thread::sleep(Duration::from_millis(200));
    let events = s.agent.audit_events().unwrap();
    assert!(
        !events
            .iter()
            .any(|e| e["from"] == "production/order-service"),
        "allowed traffic is not reported: {events:?}"
    );
    assert!(s.agent.stop().unwrap());
}

/// A free TCP port on loopback for the agent's HTTP endpoint.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// GET on loopback; returns (status line, body).
fn http_get(port: u16, path: &str) -> (String, String) {
    palisade_tests::http_get(([127, 0, 0, 1], port).into(), path)
        .expect("GET from the agent's HTTP endpoint")
}

fn metric(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|l| {
            l.strip_prefix(name)
                .and_then(|v| v.trim().parse::<f64>().ok())
        })
        .unwrap_or_else(|| panic!("no metric {name} in:\n{text}")) as u64
}

#[test]
fn health_and_metrics_report_what_the_kernel_did() {
    if !kernel_tests_enabled() {
        return;
    }
    let port = free_port();
    let extra = format!("{}httpAddress: 127.0.0.1:{port}\n", scenario::NAMESPACES);
    let s = setup(scenario::pods(), &policy_dir("kubernetes"), &extra);
    assert_eq!(http_get(port, "/healthz").0, "HTTP/1.1 200 OK");
    assert_eq!(http_get(port, "/readyz").0, "HTTP/1.1 200 OK");
    let logging = s.world.pod("production/logging");
    let payment = s.world.pod("production/payment-service");
    let t = Duration::from_millis(1000);
    assert_eq!(
        s.world
            .probe(logging, "tcp", payment.ipv4.into(), 443, t)
            .unwrap(),
        "timeout"
    );
    assert_eq!(
        s.world
            .probe(payment, "tcp", logging.ipv4.into(), 9000, t)
            .unwrap(),
        "eperm"
    );
    std::thread::sleep(Duration::from_millis(500));
    let (code, m) = http_get(port, "/metrics");
    assert_eq!(code, "HTTP/1.1 200 OK");
    assert!(
        metric(
            &m,
            "palisade_verdicts_total{direction=\"ingress\",verdict=\"deny\"}"
        ) >= 1,
        "{m}"
    );
    assert_eq!(
        metric(
            &m,
            "palisade_verdicts_total{direction=\"egress\",verdict=\"deny\"}"
        ),
        1,
        "{m}"
    );
    assert!(metric(&m, "palisade_audit_events_emitted_total") >= 2);
    assert_eq!(metric(&m, "palisade_workloads"), 6);
    assert_eq!(metric(&m, "palisade_policies"), 1);
    assert!(metric(&m, "palisade_map_entries{map=\"PAL_POLICY_V1\"}") > 0);
    assert!(m.contains("palisade_map_fill_ratio{map=\"PAL_CGROUP_V1\"}"));
}

#[test]
fn a_full_audit_ring_counts_every_event_it_could_not_keep() {
    if !kernel_tests_enabled() {
        return;
    }
    // The audit output is a FIFO nobody reads yet: the reader blocks, the
    // 4 KiB ring fills, and the kernel must count what it could not write.
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("audit.fifo");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: valid C string.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let reader = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(&fifo)
        .unwrap();
    let port = free_port();
    let mut world = World::new().unwrap();
    for p in scenario::pods() {
        world.add_pod(p).unwrap();
    }
    let config = config_for(
        &world,
        &policy_dir("kubernetes"),
        &fifo,
        &format!(
            "{}httpAddress: 127.0.0.1:{port}\nmaps:\n  auditRingBytes: 4096\n",
            scenario::NAMESPACES
        ),
    );
    let mut agent = Agent::start(dir.path(), &config).unwrap();
    agent.wait_enforcing(&world).unwrap();
    let payment = world.pod("production/payment-service");
    let logging = world.pod("production/logging");
    let refused = world
        .flood(payment, logging.ipv4.into(), 9000, 5000)
        .unwrap();
    assert_eq!(refused, 5000, "every connect is denied at once");
    // Now let the reader drain, and wait for the books to balance.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop_drain = stop.clone();
    let drain = std::thread::spawn(move || {
        use std::io::Read;
        let mut r = reader;
        let mut buf = vec![0u8; 1 << 16];
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while std::time::Instant::now() < deadline
            && !stop_drain.load(std::sync::atomic::Ordering::Relaxed)
        {
            match r.read(&mut buf) {
                Ok(0) | Err(_) => std::thread::sleep(Duration::from_millis(5)),
                Ok(_) => {}
            }
        }
    });
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    // Sampled live while the reader drains: every sample is one snapshot,
    // so delivered + lost never exceeds emitted.
    let (mut samples, mut inconsistent) = (0, Vec::new());
    let (emitted, delivered, lost) = loop {
        let (_, m) = http_get(port, "/metrics");
        let e = metric(&m, "palisade_audit_events_emitted_total");
        let d = metric(&m, "palisade_audit_events_delivered_total");
        let l = metric(&m, "palisade_audit_events_lost_total");
        samples += 1;
        if d + l > e {
            inconsistent.push((e, d, l));
        }
        if (e == d + l && e >= 5000) || std::time::Instant::now() > deadline {
            break (e, d, l);
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    eprintln!(
        "audit ring: emitted {emitted}, delivered {delivered}, lost {lost}; {samples} samples, {} inconsistent",
        inconsistent.len()
    );
    assert!(
        inconsistent.is_empty(),
        "(emitted, delivered, lost): {inconsistent:?}"
    );
    assert_eq!(emitted, 5000, "one event per denied connect");
    assert_eq!(
        emitted,
        delivered + lost,
        "emitted = delivered + lost, exactly"
    );
    assert!(lost > 0, "the ring overflowed (delivered {delivered})");
    assert!(delivered > 0);
    assert!(agent.stop().unwrap());
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    drop(world);
    let _ = drain.join();
}

#[test]
fn a_change_that_does_not_fit_a_map_is_refused_whole() {
    if !kernel_tests_enabled() {
        return;
    }
    let policies = tempfile::tempdir().unwrap();
    std::fs::copy(
        policy_dir("kubernetes").join("payment-service-policy.yaml"),
        policies.path().join("payment-service-policy.yaml"),
    )
    .unwrap();
    let port = free_port();
    let extra = format!(
        "{}httpAddress: 127.0.0.1:{port}\nmaps:\n  policy: 24\n",
        scenario::NAMESPACES
    );
    let mut s = setup(scenario::pods(), policies.path(), &extra);
    let (_, m) = http_get(port, "/metrics");
    let before = metric(&m, "palisade_map_entries{map=\"PAL_POLICY_V1\"}");
    assert!(before > 0 && before <= 12, "{before}");
    // Every pod may reach payment-service on every TCP port: 16 prefixes per peer.
    std::fs::write(
        policies.path().join("wide.yaml"),
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: wide, namespace: production}\n\
         spec:\n  podSelector: {matchLabels: {app: payment-service}}\n  ingress:\n  - from: [{namespaceSelector: {}}]\n    \
         ports: [{port: 1, endPort: 65535}]\n",
    )
    .unwrap();
    s.agent
        .wait_for_log(
            &[
                "applying the new state failed",
                "PAL_POLICY_V1",
                "the capacity is 24 (9 in use now)",
                "raise maps.policy",
            ],
            Duration::from_secs(5),
        )
        .expect("refusal logged with the map and its fill");
    let logging = s.world.pod("production/logging");
    let payment = s.world.pod("production/payment-service");
    let t = Duration::from_millis(1000);
    assert_eq!(
        s.world
            .probe(logging, "tcp", payment.ipv4.into(), 443, t)
            .unwrap(),
        "timeout",
        "the previous policy stays in force"
    );
    let (_, m) = http_get(port, "/metrics");
    assert_eq!(
        metric(&m, "palisade_map_entries{map=\"PAL_POLICY_V1\"}"),
        before,
        "nothing changed"
    );
    assert_eq!(
        metric(&m, "palisade_policy_apply_errors_total"),
        1,
        "refused once, not retried every rescan"
    );
    // The kernel does not enforce what the agent was told: not ready, and why.
    let (code, body) = http_get(port, "/readyz");
    assert_eq!(code, "HTTP/1.1 503 Service Unavailable");
    assert!(
        body.contains("the planned state was refused") && body.contains("raise maps.policy"),
        "{body}"
    );
    // Pushed through the CLI: refused, exit 1, and nothing left behind.
    let push = tempfile::tempdir().unwrap();
    let wide_too = push.path().join("wide-too.yaml");
    std::fs::write(
        &wide_too,
        std::fs::read_to_string(policies.path().join("wide.yaml"))
            .unwrap()
            .replace("name: wide,", "name: wide-too,"),
    )
    .unwrap();
    let (code, out, err) = cli(
        &s.agent,
        &["policy", "apply", "-f", wide_too.to_str().unwrap()],
    );
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        err.contains("refused") && err.contains("raise maps.policy"),
        "{err}"
    );
    assert!(
        !policies.path().join("wide-too.yaml").exists(),
        "a refused push leaves nothing in policyDir"
    );
    // A restart with the refused file still there (written by hand): the
    // adopted tables stay in force, and the agent is not ready and says why.
    s.agent.kill();
    s.agent.spawn().unwrap();
    s.agent
        .wait_status(
            "the adopted tables kept, the first state refused",
            Duration::from_secs(10),
            |v| {
                v["adoption"]["adopted"] == true
                    && v["applied"] == false
                    && v["apply_errors"].as_u64() >= Some(1)
            },
        )
        .unwrap();
    let (code, body) = http_get(port, "/readyz");
    assert_eq!(code, "HTTP/1.1 503 Service Unavailable");
    assert!(
        body.contains("nothing applied yet") && body.contains("raise maps.policy"),
        "{body}"
    );
    let (code, text, _) = cli(&s.agent, &["status"]);
    assert_eq!(code, 2, "status exits 2 when not ready:\n{text}");
    assert!(text.contains("NOT READY"), "{text}");
    assert_eq!(
        s.world
            .probe(logging, "tcp", payment.ipv4.into(), 443, t)
            .unwrap(),
        "timeout",
        "the adopted policy stays in force"
    );
    std::fs::remove_file(policies.path().join("wide.yaml")).unwrap();
    s.agent
        .wait_status("ready once the state fits", Duration::from_secs(5), |v| {
            v["ready"] == true
        })
        .unwrap();
    assert!(s.agent.stop().unwrap());
}

#[test]
fn alternating_policy_sets_never_judge_a_connection_wrongly() {
    if !kernel_tests_enabled() {
        return;
    }
    // Two policy sets that agree on two pairs but are written differently, so
    // every swap rewrites the whole table: order-service → payment-service:443
    // is allowed by both, logging → payment-service:443 denied by both. A probe
    // judged against a half-written table would see a wrong verdict.
    let policies = tempfile::tempdir().unwrap();
    let set_a =
        std::fs::read_to_string(policy_dir("kubernetes").join("payment-service-policy.yaml"))
            .unwrap();
    let set_b =
        std::fs::read_to_string(policy_dir("palisade").join("payment-service.yaml")).unwrap();
    let path = policies.path().join("policy.yaml");
    std::fs::write(&path, &set_a).unwrap();
    let port = free_port();
    // Rewritten in place (`fs::write`: truncate, then write) 500 times: a
    // short settle time keeps the run short; a read between the truncation
    // and the write is what it must never make.
    let extra = format!(
        "{}httpAddress: 127.0.0.1:{port}\npolicySettleMs: 50\n",
        scenario::NAMESPACES
    );
    let s = setup(scenario::pods(), policies.path(), &extra);
    let order = s.world.pod("production/order-service");
    let logging = s.world.pod("production/logging");
    let payment = s.world.pod("production/payment-service");
    let stop = std::sync::atomic::AtomicBool::new(false);
    let generation = || metric(&http_get(port, "/metrics").1, "palisade_policy_generation");
    let (wrong, probes, swaps) = std::thread::scope(|sc| {
        let prober = sc.spawn(|| {
            let (mut wrong, mut n) = (Vec::new(), 0);
            let t = Duration::from_millis(300);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let ok = s
                    .world
                    .probe(order, "tcp", payment.ipv4.into(), 443, t)
                    .unwrap();
                let denied = s
                    .world
                    .probe(logging, "tcp", payment.ipv4.into(), 443, t)
                    .unwrap();
                n += 2;
                if ok != "ok" {
                    wrong.push(format!("order-service → payment-service:443 gave {ok}"));
                }
                if denied != "timeout" {
                    wrong.push(format!("logging → payment-service:443 gave {denied}"));
                }
            }
            (wrong, n)
        });
        let mut swaps = 0;
        for i in 0..500 {
            let before = generation();
            std::fs::write(&path, if i % 2 == 0 { &set_b } else { &set_a }).unwrap();
            // Wait until this swap is applied before the next one.
            let deadline = std::time::Instant::now() + Duration::from_secs(5);
            while generation() == before && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
            if generation() > before {
                swaps += 1;
            }
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let (wrong, n) = prober.join().unwrap();
        (wrong, n, swaps)
    });
    eprintln!("{swaps} swaps, {probes} probes, {} wrong", wrong.len());
    assert_eq!(swaps, 500, "every alternation was applied");
    assert!(probes >= 100, "probes ran throughout ({probes})");
    assert!(wrong.is_empty(), "{wrong:#?}");
}

#[test]
fn killing_and_restarting_the_agent_never_stops_enforcement() {
    if !kernel_tests_enabled() {
        return;
    }
    let mut s = setup(
        scenario::pods(),
        &policy_dir("kubernetes"),
        scenario::NAMESPACES,
    );
    let order = s.world.pod("production/order-service");
    let logging = s.world.pod("production/logging");
    let prometheus = s.world.pod("monitoring/prometheus");
    let payment = s.world.pod("production/payment-service");
    let stop = std::sync::atomic::AtomicBool::new(false);
    let t = Duration::from_millis(300);
    let (wrong, probes) = std::thread::scope(|sc| {
        let prober = sc.spawn(|| {
            let (mut wrong, mut n) = (Vec::new(), 0);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let ok = s
                    .world
                    .probe(order, "tcp", payment.ipv4.into(), 443, t)
                    .unwrap();
                let denied = s
                    .world
                    .probe(logging, "tcp", payment.ipv4.into(), 443, t)
                    .unwrap();
                let egress = s
                    .world
                    .probe(payment, "tcp", logging.ipv4.into(), 9000, t)
                    .unwrap();
                n += 3;
                for (got, want, what) in [
                    (ok, "ok", "order → payment:443"),
                    (denied, "timeout", "logging → payment:443"),
                    (egress, "eperm", "payment → logging:9000"),
                ] {
                    if got != want {
                        wrong.push(format!("{what}: {got}"));
                    }
                }
            }
            (wrong, n)
        });
        for cycle in 1..=10 {
            s.agent.kill();
            // While no agent runs: the pinned programs judge, the pinned ring buffers.
            if cycle == 5 {
                assert_eq!(
                    s.world
                        .probe(prometheus, "tcp", payment.ipv4.into(), 443, t)
                        .unwrap(),
                    "timeout"
                );
            }
            std::thread::sleep(Duration::from_millis(200));
            s.agent.spawn().unwrap();
            let needle = "adopted pinned programs, links and maps";
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while s.agent.log().iter().filter(|l| l.contains(needle)).count() < cycle {
                assert!(
                    std::time::Instant::now() < deadline,
                    "cycle {cycle}: no adoption logged:\n{}",
                    s.agent.log().join("\n")
                );
                std::thread::sleep(Duration::from_millis(20));
            }
            std::thread::sleep(Duration::from_millis(300));
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        prober.join().unwrap()
    });
    eprintln!(
        "{probes} probes across 10 kill/restart cycles, {} wrong",
        wrong.len()
    );
    assert!(probes >= 30, "probes ran throughout ({probes})");
    assert!(wrong.is_empty(), "{wrong:#?}");
    let log = s.agent.log();
    let attached: Vec<&String> = log.iter().filter(|l| l.contains(" attached ")).collect();
    // Every program is attached once (at the first start); every later
    // start adopts them all.
    let programs: std::collections::BTreeSet<&str> = attached
        .iter()
        .filter_map(|l| l.split("attach=").nth(1)?.split_whitespace().next())
        .collect();
    assert!(programs.len() >= 6, "{programs:?}");
    assert_eq!(
        attached
            .iter()
            .filter(|l| !l.contains("adopted from"))
            .count(),
        programs.len(),
        "attached once, at the first start only"
    );
    // The event of the denial while the agent was down is delivered, with names.
    let ev = s
        .agent
        .wait_for_event(
            |e| e["from"] == "monitoring/prometheus",
            Duration::from_secs(3),
        )
        .expect("event buffered while no agent ran");
    assert_eq!(ev["to"], "production/payment-service");
    assert!(s.agent.stop().unwrap());
    assert!(
        !std::path::Path::new(&format!("/sys/fs/bpf/palisade-test-{}", s.world.tag)).exists(),
        "cleanup removed the pins"
    );
}

#[test]
fn pins_of_an_incompatible_layout_are_replaced_with_a_log_line() {
    if !kernel_tests_enabled() {
        return;
    }
    let mut s = setup(
        scenario::pods(),
        &policy_dir("kubernetes"),
        scenario::NAMESPACES,
    );
    let pins = PathBuf::from(format!("/sys/fs/bpf/palisade-test-{}", s.world.tag));
    let logging = s.world.pod("production/logging");
    let payment = s.world.pod("production/payment-service");
    let t = Duration::from_millis(1000);
    // As if an agent of another version had pinned this directory.
    s.agent.kill();
    std::fs::remove_dir(pins.join("layout-2")).unwrap();
    std::fs::create_dir(pins.join("layout-0")).unwrap();
    s.agent.spawn().unwrap();
    s.agent
        .wait_status("the pins replaced", Duration::from_secs(10), |v| {
            replaced(v, "pins").is_some_and(|why| why.contains("layout-0"))
        })
        .expect("the old layout replaced, not adopted");
    // On state, not on log lines (the first start logged "attached" too).
    s.agent
        .wait_status("the new agent ready", Duration::from_secs(20), |v| {
            v["ready"] == true
        })
        .unwrap();
    assert_eq!(
        s.world
            .probe(logging, "tcp", payment.ipv4.into(), 443, t)
            .unwrap(),
        "timeout"
    );
    // A map capacity change makes the pinned maps incompatible too.
    s.agent.kill();
    let config = std::fs::read_to_string(s.agent.dir.join("agent.yaml")).unwrap()
        + "maps:\n  policy: 4096\n";
    std::fs::write(s.agent.dir.join("agent.yaml"), config).unwrap();
    s.agent.spawn().unwrap();
    s.agent
        .wait_status("the maps replaced", Duration::from_secs(10), |v| {
            replaced(v, "maps").is_some_and(|why| why.contains("PAL_POLICY_V1"))
        })
        .expect("maps of another capacity replaced, not adopted");
    s.agent
        .wait_status("the new agent ready", Duration::from_secs(20), |v| {
            v["ready"] == true
        })
        .unwrap();
    assert_eq!(
        s.world
            .probe(logging, "tcp", payment.ipv4.into(), 443, t)
            .unwrap(),
        "timeout"
    );
    assert!(s.agent.stop().unwrap());
    assert!(!pins.exists());
}

/// Runs the `palisade` CLI against an agent's control socket.
fn cli(agent: &Agent, args: &[&str]) -> (i32, String, String) {
    agent.cli(args).expect("palisade runs")
}

#[test]
fn the_cli_drives_a_running_agent_through_its_control_socket() {
    if !kernel_tests_enabled() {
        return;
    }
    use std::os::unix::fs::PermissionsExt as _;
    let policies = tempfile::tempdir().unwrap();
    std::fs::copy(
        policy_dir("kubernetes").join("payment-service-policy.yaml"),
        policies.path().join("payment-service-policy.yaml"),
    )
    .unwrap();
    let mut s = setup(scenario::pods(), policies.path(), scenario::NAMESPACES);
    let socket = s.agent.dir.join("palisade.sock");
    assert_eq!(
        std::fs::metadata(&socket).unwrap().permissions().mode() & 0o777,
        0o600,
        "root-only socket"
    );
    let logging = s.world.pod("production/logging");
    let payment = s.world.pod("production/payment-service");
    let t = Duration::from_millis(1000);

    // Another user cannot talk to the agent.
    let other = std::process::Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(palisade_tests::bin_dir().join("palisade"))
        .arg("status")
        .env("PALISADE_SOCKET", &socket)
        .output()
        .expect("setpriv (util-linux) runs");
    assert!(!other.status.success(), "a non-root user was let in");
    assert!(
        String::from_utf8_lossy(&other.stderr).contains("Permission denied"),
        "{}",
        String::from_utf8_lossy(&other.stderr)
    );
    let (code, out, _) = cli(&s.agent, &["status"]);
    assert_eq!(code, 0);
    assert!(
        out.contains("ready") && out.contains("workloads 6") && out.contains("PAL_POLICY_V1"),
        "{out}"
    );
    let (_, json, _) = cli(&s.agent, &["status", "--json"]);
    let v: Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["workloads"], 6);
    // Socket hooks (4), ingress and egress packets; the packet-socket guard
    // too where the kernel has the BPF LSM.
    assert!(v["attach_points"].as_array().unwrap().len() >= 6, "{v}");
    let (_, out, _) = cli(&s.agent, &["workloads"]);
    assert!(
        out.contains("production/payment-service") && out.contains(&payment.ipv4.to_string()),
        "{out}"
    );
    let (_, out, _) = cli(&s.agent, &["policy", "list"]);
    assert!(
        out.contains("production/payment-service-policy") && out.contains("NetworkPolicy"),
        "{out}"
    );

    // Follow the audit stream while a denial happens.
    let mut follow = std::process::Command::new(palisade_tests::bin_dir().join("palisade"))
        .args([
            "audit",
            "--follow",
            "--json",
            "--verdict",
            "deny",
            "--workload",
            "production/logging",
        ])
        .env("PALISADE_SOCKET", &socket)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        s.world
            .probe(logging, "tcp", payment.ipv4.into(), 443, t)
            .unwrap(),
        "timeout"
    );
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(follow.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    let _ = follow.kill();
    let _ = follow.wait();
    let ev: Value = serde_json::from_str(&line).unwrap();
    assert_eq!(
        (ev["from"].as_str(), ev["verdict"].as_str()),
        (Some("production/logging"), Some("deny"))
    );

    // An invalid apply changes nothing and says where.
    let bad = s.agent.dir.join("bad.yaml");
    std::fs::write(&bad, "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: b, namespace: production}\nspec:\n  podSelector: {}\n  ingress:\n  - ports: [{port: 0}]\n").unwrap();
    let (code, _, err) = cli(&s.agent, &["policy", "apply", "-f", bad.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(
        err.contains("bad.yaml:7:20: spec.ingress[0].ports[0].port: 0 is out of range")
            && err.contains("nothing was applied"),
        "{err}"
    );
    assert!(!policies.path().join("bad.yaml").exists());

    // A valid apply: logging may reach payment-service on 443.
    let good = s.agent.dir.join("allow-logging.yaml");
    std::fs::write(&good, "apiVersion: palisade.dev/v1alpha1\nkind: PalisadePolicy\nmetadata: {name: allow-logging, namespace: production}\nspec:\n  selector: {matchLabels: {app: payment-service}}\n  ingress:\n    - from: [{selector: {matchLabels: {app: logging}}}]\n      ports: [{protocol: TCP, port: 443}]\n").unwrap();
    let (code, out, err) = cli(&s.agent, &["policy", "apply", "-f", good.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("policy generation"), "{out}");
    assert_eq!(
        s.world
            .probe(logging, "tcp", payment.ipv4.into(), 443, t)
            .unwrap(),
        "ok"
    );
    let (_, out, _) = cli(&s.agent, &["policy", "list"]);
    assert!(out.contains("production/allow-logging"), "{out}");

    // And deleted again.
    let (code, out, err) = cli(&s.agent, &["policy", "delete", "production/allow-logging"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("deleted production/allow-logging"), "{out}");
    assert_eq!(
        s.world
            .probe(logging, "tcp", payment.ipv4.into(), 443, t)
            .unwrap(),
        "timeout"
    );
    let (code, _, err) = cli(&s.agent, &["policy", "delete", "production/nope"]);
    assert_eq!(code, 1);
    assert!(err.contains("no policy \"production/nope\""), "{err}");
    // Not waiting for the kernel (`--timeout 0s`): exit 3, said plainly; it
    // is applied all the same. (A written change wakes the agent at once,
    // so any timeout long enough to schedule it usually sees it applied.)
    let before = s.agent.status().unwrap()["policy_revision"]
        .as_u64()
        .unwrap();
    let (code, out, err) = cli(
        &s.agent,
        &[
            "policy",
            "apply",
            "--timeout",
            "0s",
            "-f",
            good.to_str().unwrap(),
        ],
    );
    assert_eq!(code, 3, "{out}{err}");
    assert!(err.contains("still pending"), "{err}");
    s.agent
        .wait_status("the pending change applied", Duration::from_secs(5), |v| {
            v["policy_revision_applied"].as_u64().unwrap_or(0) > before
        })
        .unwrap();
    assert_eq!(
        s.world
            .probe(logging, "tcp", payment.ipv4.into(), 443, t)
            .unwrap(),
        "ok"
    );
    assert!(s.agent.stop().unwrap());
    assert!(!socket.exists(), "socket removed on exit");
}

// ------------------------------------------------------------- Kubernetes

mod kubernetes {
    use std::{
        path::Path,
        time::{Duration, Instant},
    };

    use palisade_tests::{
        agent::Agent,
        kubeapi::{FakeApiServer, Kind},
        scenario::{self, Family},
        world::{PodSpec, World},
    };
    use serde_json::{Value, json};

    use super::{assert_all_hold, kernel_tests_enabled};

    const NODE: &str = "node-test";

    pub(crate) fn fixtures() -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("kubernetes/fixtures")
    }

    pub(crate) fn uid(index: usize) -> String {
        format!("{index:08x}-5a1d-4e2f-9b3c-{:012x}", index * 7919)
    }

    /// kubelet's systemd-driver cgroup for container 0 of pod `index`, in the
    /// QoS class the index picks; dashes of the UID escaped as systemd does.
    fn kubelet_cgroup(index: usize) -> String {
        let u = uid(index).replace('-', "_");
        let id = format!("{:064x}", index + 0xc0ffee);
        match index % 3 {
            0 => format!("kubepods.slice/kubepods-pod{u}.slice/cri-containerd-{id}.scope"),
            1 => format!(
                "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{u}.slice/crio-{id}.scope"
            ),
            _ => format!(
                "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{u}.slice/docker-{id}.scope"
            ),
        }
    }

    /// A Pod object shaped like the recorded one, for a pod of the world.
    pub(crate) fn pod_object(
        template: &Value,
        index: usize,
        spec: &PodSpec,
        ips: &[String],
        node: &str,
    ) -> Value {
        palisade_tests::kubeapi::pod_object(
            template,
            &uid(index),
            (&spec.namespace, &spec.name, &spec.name),
            ips,
            node,
        )
    }

    /// Probes until the word is `want`; returns how long that took.
    fn until(
        world: &World,
        from: &str,
        to: &str,
        port: u16,
        want: &str,
        limit: Duration,
    ) -> Duration {
        let start = Instant::now();
        let (src, dst) = (world.pod(from), world.pod(to));
        loop {
            let word = world
                .probe(
                    src,
                    "tcp",
                    dst.ipv4.into(),
                    port,
                    Duration::from_millis(250),
                )
                .unwrap();
            if word == want {
                return start.elapsed();
            }
            assert!(
                start.elapsed() < limit,
                "{from} → {to}:{port} still {word:?} (want {want:?}) after {limit:?}"
            );
        }
    }

    #[test]
    fn pods_and_networkpolicy_from_the_api_server_are_enforced_and_followed() {
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
        for (i, mut spec) in scenario::pods().into_iter().enumerate() {
            spec.cgroup = Some(kubelet_cgroup(i));
            let pod = world.add_pod(spec.clone()).unwrap();
            let ips = [pod.ipv4.to_string(), pod.ipv6.to_string()];
            api.apply(Kind::Pods, pod_object(&template, i, &spec, &ips, NODE));
        }
        // A pod on another node: its address is known only from the API.
        let (remote_ns, remote_ix) = world.add_bare_netns("remote-orders").unwrap();
        let remote = PodSpec::new("production", "order-service-remote", &[], &[]);
        let mut remote_obj = pod_object(
            &template,
            90,
            &remote,
            &[world.ipv4(remote_ix).to_string()],
            "node-other",
        );
        remote_obj["metadata"]["labels"] = json!({"app": "order-service"});
        api.apply(Kind::Pods, remote_obj);

        let config = format!(
            "cgroupRoot: {root}/kubepods.slice\nbpfPinDir: /sys/fs/bpf/palisade-test-{tag}\ncontrolSocket: {dir}/palisade.sock\n\
             audit:\n  output: {dir}/audit.jsonl\nrescanIntervalMs: 100\ntrustDomain: test.example\n",
            root = world.cgroup_root.display(),
            tag = world.tag,
            dir = dir.path().display(),
        );
        let kubeconfig = api.kubeconfig(dir.path()).unwrap();
        let mut agent = Agent::start_with_args(
            dir.path(),
            &config,
            &[
                "--kubernetes",
                "--kubeconfig",
                kubeconfig.to_str().unwrap(),
                "--node-name",
                NODE,
            ],
        )
        .unwrap();
        agent.wait_enforcing(&world).expect("every pod enforced");

        // 1. The payment-service NetworkPolicy, served by the API, in both families.
        assert_all_hold(&scenario::run_probes(
            &world,
            &scenario::expectations(),
            &[Family::V4, Family::V6],
        ));
        let payment = world.pod("production/payment-service");
        let t = Duration::from_millis(1000);
        let outside = world.outside_root.clone();
        assert_eq!(
            world
                .probe_in(&outside, &remote_ns, "tcp", payment.ipv4.into(), 443, t)
                .unwrap(),
            "ok",
            "a remote order-service pod is allowed by its identity from the API's pod IP"
        );
        // Identity names carry namespace and service account.
        let logging_ip = world.pod("production/logging").ipv4.to_string();
        let ev = agent
            .wait_for_event(
                |e| e["peer"]["ip"] == logging_ip.as_str() && e["port"] == 443,
                Duration::from_secs(3),
            )
            .unwrap();
        assert_eq!(
            ev["peer"]["identityName"], "spiffe://test.example/ns/production/sa/logging",
            "{ev}"
        );
        assert_eq!(
            ev["from"], "spiffe://test.example/ns/production/sa/logging",
            "{ev}"
        );
        assert_eq!(ev["policy"], "production/payment-service-policy", "{ev}");

        // 2. A label change re-identifies the pod and changes the verdict within 2 s.
        let mut order = api.get(Kind::Pods, "production", "order-service").unwrap();
        order["metadata"]["labels"]["app"] = json!("order-service-v2");
        api.apply(Kind::Pods, order.clone());
        let took = until(
            &world,
            "production/order-service",
            "production/payment-service",
            443,
            "timeout",
            Duration::from_secs(2),
        );
        eprintln!("relabel → denied in {took:?}");

        // 3. The watch history is compacted (410 Gone on the next watch); a
        //    change made meanwhile arrives through the re-list.
        api.expire();
        order["metadata"]["labels"]["app"] = json!("order-service");
        api.apply(Kind::Pods, order);
        api.expire();
        until(
            &world,
            "production/order-service",
            "production/payment-service",
            443,
            "ok",
            Duration::from_secs(10),
        );
        assert!(
            api.gone_served() >= 1,
            "the agent's watches were answered 410 Gone"
        );

        // 4. A pod whose cgroup appears before its Pod object: held (egress
        //    denied) until the API names it, then judged by its own policy.
        let late = PodSpec {
            cgroup: Some(kubelet_cgroup(7)),
            ..PodSpec::new("production", "latecomer", &[], &[])
        };
        world.add_pod(late.clone()).unwrap();
        let held = until(
            &world,
            "production/latecomer",
            "production/postgres",
            5432,
            "eperm",
            Duration::from_secs(3),
        );
        eprintln!("unknown pod held after {held:?}");
        let ev = agent
            .wait_for_event(
                |e| e["policy"] == "kubernetes.unknownPods",
                Duration::from_secs(3),
            )
            .unwrap();
        assert_eq!(ev["local"]["identityName"], "reserved:pending-pod", "{ev}");
        assert_eq!(ev["rule"], "default-deny", "{ev}");
        let lp = world.pod("production/latecomer");
        let ips = [lp.ipv4.to_string(), lp.ipv6.to_string()];
        api.apply(Kind::Pods, pod_object(&template, 7, &late, &ips, NODE));
        let known = until(
            &world,
            "production/latecomer",
            "production/postgres",
            5432,
            "ok",
            Duration::from_secs(2),
        );
        eprintln!("latecomer released {known:?} after its Pod object");

        // 5. A deleted policy stops applying.
        let payment_to_logging = || {
            world
                .probe(
                    world.pod("production/payment-service"),
                    "tcp",
                    world.pod("production/logging").ipv4.into(),
                    9000,
                    t,
                )
                .unwrap()
        };
        assert_eq!(payment_to_logging(), "eperm");
        assert!(api.delete(
            Kind::NetworkPolicies,
            "production",
            "payment-service-policy"
        ));
        let took = until(
            &world,
            "production/payment-service",
            "production/logging",
            9000,
            "ok",
            Duration::from_secs(2),
        );
        eprintln!("policy delete → allowed in {took:?}");

        // 6. A running pod on this node whose cgroup the agent cannot find
        //    (a runtime's layout it does not recognise): not enforced, so
        //    the node is not ready and says which pod; ready again once the
        //    pod is gone.
        let ghost = PodSpec::new("production", "ghost", &[], &[]);
        let ghost_ips = ["10.77.250.9".to_owned()];
        let ghost_seen = Instant::now();
        api.apply(
            Kind::Pods,
            pod_object(&template, 9, &ghost, &ghost_ips, NODE),
        );
        let status = agent
            .wait_status("the unmatched pod reported", Duration::from_secs(10), |v| {
                v["unmatched_local_pods"] == json!(["production/ghost"])
            })
            .unwrap();
        assert!(
            ghost_seen.elapsed() >= Duration::from_secs(5),
            "reported only after its grace"
        );
        assert_eq!(status["ready"], false, "{status}");
        let (code, text, _) = super::cli(&agent, &["status"]);
        assert_eq!(code, 2, "status exits 2 while not ready: {text}");
        assert!(text.contains("production/ghost"), "{text}");
        assert!(api.delete(Kind::Pods, "production", "ghost"));
        agent
            .wait_status("ready again", Duration::from_secs(5), |v| {
                v["ready"] == true && v["unmatched_local_pods"] == json!([])
            })
            .unwrap();

        // 7. The API server lost: the status (and the CLI) say so once the
        //    bound has passed, the node stays ready and the kernel keeps the
        //    last view; back, and the view is current again.
        let status = agent.status().unwrap();
        assert!(status["cluster_view_problem"].is_null(), "{status}");
        api.set_down(true);
        let lost = std::time::Instant::now();
        let status = agent
            .wait_status("the stale view reported", Duration::from_secs(20), |v| {
                v["cluster_view_problem"].is_string()
            })
            .unwrap();
        eprintln!("API server down → reported after {:?}", lost.elapsed());
        assert!(
            lost.elapsed() >= palisade::kubernetes::STALE_AFTER,
            "not before the bound"
        );
        assert!(
            status["cluster_view_problem"]
                .as_str()
                .unwrap()
                .contains("has not answered"),
            "{status}"
        );
        assert_eq!(
            status["ready"], true,
            "a lost API server does not take the node out"
        );
        let (_, text, _) = super::cli(&agent, &["status"]);
        assert!(text.contains("has not answered"), "{text}");
        assert_eq!(payment_to_logging(), "ok", "the last view stays in force");
        api.set_down(false);
        agent
            .wait_status("the view current again", Duration::from_secs(20), |v| {
                v["cluster_view_problem"].is_null()
            })
            .unwrap();

        assert!(agent.stop().unwrap(), "agent exits 0 on SIGTERM");
    }
}

#[test]
fn a_second_agent_on_the_same_pins_refuses_to_start_and_names_the_first() {
    if !kernel_tests_enabled() {
        return;
    }
    let (dir, policies) = temp_policy_dir();
    let mut world = World::new().unwrap();
    world
        .add_pod(PodSpec::new("prod", "web", &[80], &[]))
        .unwrap();
    let first_dir = dir.path().join("first");
    let config = config_for(&world, &policies, &first_dir.join("audit.jsonl"), "");
    let mut first = Agent::start(&first_dir, &config).unwrap();
    first.wait_enforcing(&world).unwrap();
    // The same pins, its own control socket and audit file.
    let second_dir = dir.path().join("second");
    std::fs::create_dir_all(&second_dir).unwrap();
    let second_config = config_for(&world, &policies, &second_dir.join("audit.jsonl"), "");
    std::fs::write(second_dir.join("agent.yaml"), &second_config).unwrap();
    let out = std::process::Command::new(palisade_tests::bin_dir().join("palisade"))
        .args(["agent", "--config"])
        .arg(second_dir.join("agent.yaml"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "the second agent must not run: {err}"
    );
    let pid = first.pid().unwrap();
    assert!(
        err.contains(&format!(
            "another palisade agent (pid {pid}) owns the pinned state"
        )),
        "{err}"
    );
    // The first agent is untouched: its socket answers, it is ready.
    let (code, status, _) = cli(&first, &["status"]);
    assert_eq!(code, 0);
    assert!(status.contains("ready"), "{status}");
    assert!(first.stop().unwrap());
    // Once it stopped, the pins are free for a new agent.
    let mut next = Agent::start(&second_dir, &second_config).unwrap();
    next.wait_enforcing(&world).unwrap();
    assert!(next.stop().unwrap());
}

/// Why the status says the agent replaced pinned `what` at start, if it did.
fn replaced<'a>(status: &'a Value, what: &str) -> Option<&'a str> {
    status["adoption"]["replaced"]
        .as_array()?
        .iter()
        .find(|r| r["what"] == what)?["why"]
        .as_str()
}
