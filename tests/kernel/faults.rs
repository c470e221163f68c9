//! Faults around a running agent: pins removed or swapped, programs
//! detached, the cgroup root rebuilt, the policy directory vanishing, a
//! push that does not fit. Each test injects the fault the way an operator,
//! another agent or the node would, shows the technique works where nothing
//! guards against it, and asserts that denied traffic stays denied (or is
//! denied again within the self-check's period) and that status and
//! readiness say what happened.
use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use palisade_tests::scenario;
use serde_json::Value;

use super::{cli, kernel_tests_enabled, policy_dir, setup};

const T: Duration = Duration::from_millis(400);

fn pins_of(s: &super::Setup) -> PathBuf {
    PathBuf::from(format!("/sys/fs/bpf/palisade-test-{}", s.world.tag))
}

fn repairs(status: &Value, what: &str) -> u64 {
    status["repairs"][what].as_u64().unwrap_or(0)
}

/// The scenario's three standing facts: order → payment:443 allowed,
/// logging → payment:443 denied at ingress, payment → logging:9000 denied
/// at egress. Returns what differs.
fn verdicts(s: &super::Setup) -> Vec<String> {
    let w = &s.world;
    let (order, logging, payment) = (
        w.pod("production/order-service"),
        w.pod("production/logging"),
        w.pod("production/payment-service"),
    );
    let mut wrong = Vec::new();
    for (from, to, port, want) in [
        (order, payment, 443, "ok"),
        (logging, payment, 443, "timeout"),
        (payment, logging, 9000, "eperm"),
    ] {
        let got = w.probe(from, "tcp", to.ipv4.into(), port, T).unwrap();
        if got != want {
            wrong.push(format!(
                "{} → {}:{port}: {got}, want {want}",
                from.spec.key(),
                to.spec.key()
            ));
        }
    }
    wrong
}

/// logging → payment:443, the scenario's denied-at-ingress pair.
fn logging_to_payment(s: &super::Setup) -> String {
    let w = &s.world;
    let (logging, payment) = (
        w.pod("production/logging"),
        w.pod("production/payment-service"),
    );
    w.probe(logging, "tcp", payment.ipv4.into(), 443, T)
        .unwrap()
}

/// How long a (re)started agent may take to enforce again: it loads and
/// verifies its programs, about 0.3 s on this host and over 10 s under the
/// kernel matrix's software emulation.
const RESTART: Duration = Duration::from_secs(60);

fn wait_denied_again(s: &super::Setup, within: Duration) -> Duration {
    let start = std::time::Instant::now();
    loop {
        let wrong = verdicts(s);
        if wrong.is_empty() {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < within,
            "still wrong after {within:?}: {wrong:?}\nstatus: {}\nlog:\n{}",
            s.agent.status().map(|v| v.to_string()).unwrap_or_default(),
            s.agent.log().join("\n")
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn pins_removed_or_programs_detached_under_a_running_agent_are_repaired() {
    if !kernel_tests_enabled() {
        return;
    }
    let mut s = setup(
        scenario::pods(),
        &policy_dir("kubernetes"),
        scenario::NAMESPACES,
    );
    let pins = pins_of(&s);
    let logging = s.world.pod("production/logging");
    // The technique: with no process holding a link, removing its pin
    // detaches the program and denied traffic flows (both packet programs:
    // the egress one judges a connection's replies too).
    s.agent.kill();
    for pin in ["link_palisade_ingress", "link_palisade_egress_packet"] {
        std::fs::remove_file(pins.join(pin)).unwrap();
    }
    assert_eq!(
        logging_to_payment(&s),
        "ok",
        "removing the pins of unheld links detaches them"
    );
    s.agent.spawn().unwrap();
    wait_denied_again(&s, RESTART);

    // Under a running agent: link and map pins removed at once.
    s.world.count_arrivals(logging).unwrap();
    for pin in [
        "link_palisade_ingress",
        "link_palisade_connect4",
        "PAL_POLICY_V1",
    ] {
        std::fs::remove_file(pins.join(pin)).unwrap();
    }
    let start = std::time::Instant::now();
    while start.elapsed() < Duration::from_millis(1500) {
        assert!(verdicts(&s).is_empty(), "{:?}", verdicts(&s));
    }
    assert_eq!(
        s.world.arrivals(logging).unwrap(),
        0,
        "nothing of payment's denied connections reached logging"
    );
    let status = s
        .agent
        .wait_status("link and map pins repaired", Duration::from_secs(5), |v| {
            repairs(v, "link-pin") >= 2 && repairs(v, "map-pin") >= 1 && v["ready"] == true
        })
        .unwrap();
    for pin in [
        "link_palisade_ingress",
        "link_palisade_connect4",
        "PAL_POLICY_V1",
    ] {
        assert!(pins.join(pin).exists(), "{pin} pinned again: {status}");
    }
    s.agent
        .wait_for_log(&["self-check repaired", "link_palisade_ingress"], T)
        .expect("the repair is logged");

    // A program detached from the root (`bpftool link detach`).
    let link = palisade::datapath::bpfsys::obj_get(&pins.join("link_palisade_ingress")).unwrap();
    palisade::datapath::bpfsys::link_detach(std::os::fd::AsFd::as_fd(&link)).unwrap();
    let took = wait_denied_again(&s, Duration::from_secs(3));
    eprintln!("a detached ingress program was attached again within {took:?}");
    s.agent
        .wait_status("the attachment repair", Duration::from_secs(3), |v| {
            repairs(v, "attachment") >= 1 && v["ready"] == true
        })
        .unwrap();
    let (_, text, _) = cli(&s.agent, &["status"]);
    assert!(text.contains("self-check repairs"), "{text}");
    assert!(s.agent.stop().unwrap());
}

/// Points logging's address at order-service's identity in the pinned
/// ipcache (what a second writer of the map, or a stale agent, would do).
fn forge_ipcache(s: &super::Setup, identity: u32) {
    let data =
        aya::maps::MapData::from_pin(pins_of(s).join(palisade_common::maps::IPCACHE)).unwrap();
    let mut ipcache: aya::maps::LpmTrie<
        aya::maps::MapData,
        [u8; 16],
        palisade_common::IpcacheValue,
    > = aya::maps::LpmTrie::try_from(aya::maps::Map::LpmTrie(data)).unwrap();
    let logging = s.world.pod("production/logging");
    let net = ipnet::IpNet::from(std::net::IpAddr::from(logging.ipv4));
    ipcache
        .insert(
            &palisade::datapath::kernel::ip_key(&net),
            &palisade_common::IpcacheValue::of(identity),
            0,
        )
        .unwrap();
}

/// The maps the programs read identities from are compared with what the
/// agent wrote and rewritten: an ipcache entry that makes logging look like
/// order-service opens payment:443 to it while no agent runs (the technique
/// works), and is undone within seconds under a running agent; nothing
/// arrives at payment meanwhile beyond what the forged window let through.
#[test]
fn an_identity_map_changed_under_a_running_agent_is_rewritten() {
    if !kernel_tests_enabled() {
        return;
    }
    let mut s = setup(
        scenario::pods(),
        &policy_dir("kubernetes"),
        scenario::NAMESPACES,
    );
    let status = s.agent.status().unwrap();
    let order_identity = status["workload_list"]
        .as_array()
        .unwrap()
        .iter()
        .find(|w| w["name"] == "production/order-service")
        .and_then(|w| w["identity"].as_u64())
        .unwrap() as u32;
    assert_eq!(logging_to_payment(&s), "timeout");
    // The technique, with no agent running: logging reaches payment.
    s.agent.kill();
    forge_ipcache(&s, order_identity);
    assert_eq!(
        logging_to_payment(&s),
        "ok",
        "a forged ipcache entry opens payment to logging"
    );
    // A restarted agent brings the map back to what it decides.
    s.agent.spawn().unwrap();
    wait_denied_again(&s, RESTART);
    // Under a running agent: rewritten by the self-check.
    forge_ipcache(&s, order_identity);
    let took = wait_denied_again(&s, Duration::from_secs(5));
    eprintln!("a forged ipcache entry was rewritten within {took:?}");
    let status = s
        .agent
        .wait_status("the map repair", Duration::from_secs(3), |v| {
            repairs(v, "identity-maps") >= 1 && v["ready"] == true
        })
        .unwrap();
    s.agent
        .wait_for_log(&["self-check repaired", "ipcache map"], T)
        .unwrap_or_else(|e| panic!("{e}: {status}"));
    assert!(s.agent.stop().unwrap());
}

#[test]
fn a_swapped_policy_map_pin_is_not_adopted_by_a_restarted_agent() {
    if !kernel_tests_enabled() {
        return;
    }
    let (_dir, policies) = super::temp_policy_dir();
    copy_dir(&policy_dir("kubernetes"), &policies);
    let mut s = setup(scenario::pods(), &policies, scenario::NAMESPACES);
    let pins = pins_of(&s);
    // While no agent runs, the policy map pin goes (an operator's `rm`, a
    // second agent's cleanup): a new agent makes a new map; the attached
    // programs would read the old one.
    s.agent.kill();
    std::fs::remove_file(pins.join("PAL_POLICY_V1")).unwrap();
    s.agent.spawn().unwrap();
    s.agent
        .wait_status("the link replaced", Duration::from_secs(10), |v| {
            super::replaced(v, "link:palisade_ingress")
                .is_some_and(|why| why.contains("reads another PAL_POLICY_V1"))
        })
        .expect("the mismatch is found and the link replaced");
    wait_denied_again(&s, RESTART);
    // A change after the restart is enforced (it would go into a map the
    // programs do not read): without payment's policy, logging reaches it.
    let before = s.agent.status().unwrap()["generation"].as_u64().unwrap();
    let file = find_policy_file(&policies, "payment-service");
    let saved = std::fs::read_to_string(&file).unwrap();
    std::fs::write(
        &file,
        format!(
            "# no policies here for now\n{}",
            palisade::policy::load::EMPTY_LIST
        ),
    )
    .unwrap();
    s.agent
        .wait_status("the deletion applied", Duration::from_secs(5), |v| {
            v["generation"].as_u64().unwrap_or(0) > before
        })
        .unwrap();
    assert_eq!(
        logging_to_payment(&s),
        "ok",
        "a deleted policy does not come back"
    );
    std::fs::write(&file, saved).unwrap();
    wait_denied_again(&s, Duration::from_secs(5));
    assert!(s.agent.stop().unwrap());
}

#[test]
fn a_recreated_cgroup_root_is_enforced_again_running_or_restarted() {
    if !kernel_tests_enabled() {
        return;
    }
    let mut s = setup(
        scenario::pods(),
        &policy_dir("kubernetes"),
        scenario::NAMESPACES,
    );
    // Under a running agent: the root is gone for a moment (not ready,
    // and saying why), then back with the same pods.
    let agent = &mut s.agent;
    s.world
        .recreate_cgroups(move || {
            agent
                .wait_status("not ready, the root gone", Duration::from_secs(5), |v| {
                    v["ready"] == false && v["enforcement_problems"].to_string().contains("is gone")
                })
                .unwrap();
        })
        .unwrap();
    let took = wait_denied_again(&s, Duration::from_secs(5));
    eprintln!("enforced again {took:?} after the root was recreated");
    let status = s
        .agent
        .wait_status(
            "ready with an attachment repair",
            Duration::from_secs(5),
            |v| v["ready"] == true && repairs(v, "attachment") >= 1,
        )
        .unwrap();
    assert!(
        status["enforcement_problems"]
            .as_array()
            .unwrap()
            .is_empty()
    );
    // While no agent runs: the restarted agent finds links whose cgroup is
    // gone and attaches new ones instead of "adopting" dead links.
    s.agent.kill();
    s.world.recreate_cgroups(|| {}).unwrap();
    assert_eq!(
        logging_to_payment(&s),
        "ok",
        "nothing is attached to the new root while no agent runs"
    );
    s.agent.spawn().unwrap();
    s.agent
        .wait_status("the link replaced", Duration::from_secs(10), |v| {
            super::replaced(v, "link:palisade_ingress")
                .is_some_and(|why| why.contains("not to the root"))
        })
        .expect("dead links are replaced, not adopted");
    wait_denied_again(&s, RESTART);
    assert!(s.agent.stop().unwrap());
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap().flatten() {
        if e.file_type().unwrap().is_file() {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

fn find_policy_file(dir: &Path, needle: &str) -> PathBuf {
    std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| std::fs::read_to_string(p).is_ok_and(|t| t.contains(needle)))
        .unwrap_or_else(|| panic!("no policy file in {} mentions {needle}", dir.display()))
}

#[test]
fn a_vanished_or_emptied_policy_directory_keeps_the_last_good_policy() {
    if !kernel_tests_enabled() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let real = dir.path().join("real-policies");
    copy_dir(&policy_dir("kubernetes"), &real);
    let link = dir.path().join("policies");
    std::os::unix::fs::symlink(&real, &link).unwrap();
    let port = super::free_port();
    let extra = format!("{}httpAddress: 127.0.0.1:{port}\n", scenario::NAMESPACES);
    let mut s = setup(scenario::pods(), &link, &extra);
    // The technique: an empty policy set allows everyone (no policy selects
    // a pod) — checked at the end, through the agent's own delete.
    // 1. The directory a dangling symlink.
    let moved = dir.path().join("elsewhere");
    std::fs::rename(&real, &moved).unwrap();
    let status = s
        .agent
        .wait_status("a policy source problem", Duration::from_secs(5), |v| {
            v["policy_source_problem"].is_string()
        })
        .unwrap();
    assert!(
        status["policy_source_problem"]
            .as_str()
            .unwrap()
            .contains("missing or not a directory"),
        "{status}"
    );
    assert!(verdicts(&s).is_empty(), "{:?}", verdicts(&s));
    s.agent
        .wait_for_log(&["WARN", "stay in force"], T)
        .expect("said loudly");
    let (_, metrics) = super::http_get(port, "/metrics");
    assert_eq!(super::metric(&metrics, "palisade_policy_source_problem"), 1);
    // 2. Back, then emptied (an empty volume mounted over it).
    std::fs::rename(&moved, &real).unwrap();
    s.agent
        .wait_status("the source back", Duration::from_secs(5), |v| {
            v["policy_source_problem"].is_null()
        })
        .unwrap();
    std::fs::create_dir(&moved).unwrap();
    for e in std::fs::read_dir(&real).unwrap().flatten() {
        std::fs::rename(e.path(), moved.join(e.file_name())).unwrap();
    }
    s.agent
        .wait_status("an empty source", Duration::from_secs(5), |v| {
            v["policy_source_problem"]
                .as_str()
                .is_some_and(|p| p.contains("no policy files"))
        })
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    assert!(verdicts(&s).is_empty(), "{:?}", verdicts(&s));
    // 3. A restart with the directory still empty: the pinned policy stays,
    // not ready, until policy files are back.
    s.agent.kill();
    s.agent.spawn().unwrap();
    let status = s
        .agent
        .wait_status("the policy source problem", Duration::from_secs(10), |v| {
            v["policy_source_problem"]
                .as_str()
                .is_some_and(|p| p.contains("has no policy files, but the pinned state enforces"))
        })
        .unwrap();
    assert_eq!(status["ready"], false, "{status}");
    let (code, body) = super::http_get(port, "/readyz");
    assert_eq!(code, "HTTP/1.1 503 Service Unavailable");
    assert!(body.contains("has no policy files"), "{body}");
    assert!(verdicts(&s).is_empty(), "{:?}", verdicts(&s));
    for e in std::fs::read_dir(&moved).unwrap().flatten() {
        std::fs::rename(e.path(), real.join(e.file_name())).unwrap();
    }
    s.agent
        .wait_status("ready again", Duration::from_secs(10), |v| {
            v["ready"] == true
        })
        .unwrap();
    // 4. Really made empty, through the CLI: then everyone is allowed.
    let names: Vec<String> = s.agent.status().unwrap()["policy_list"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap().to_owned())
        .collect();
    for name in &names {
        let (code, out, err) = cli(&s.agent, &["policy", "delete", name]);
        assert_eq!(code, 0, "{name}: {out}{err}");
    }
    assert!(real.join("no-policies.yaml").exists());
    assert_eq!(
        logging_to_payment(&s),
        "ok",
        "an empty policy set, made on purpose, allows everyone"
    );
    assert!(s.agent.stop().unwrap());
}
