//! Half-written inputs never open traffic: a policy file rewritten in place
//! (truncated, then written in pieces with pauses between), and a policy
//! directory swapped the way Kubernetes projects a ConfigMap (`..data`
//! symlink), under continuous connection attempts from the workloads the
//! policy judges, counted at the listeners.
use std::{
    io::Write as _,
    path::Path,
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use palisade_tests::{
    agent::{Agent, config_for},
    world::{Pod, PodSpec, World},
};

use super::{burst_counts, counted as accepted, kernel_tests_enabled, temp_policy_dir};

/// Selects nothing in the world: a file holding only it leaves the target open.
const PLACEHOLDER: &str = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: placeholder, namespace: prod}\nspec:\n  podSelector: {matchLabels: {app: nobody}}\n  policyTypes: [Ingress]\n";

/// Another name for the same: two placeholders together are still open.
const PLACEHOLDER_2: &str = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: placeholder-2, namespace: prod}\nspec:\n  podSelector: {matchLabels: {app: nobody}}\n  policyTypes: [Ingress]\n";

/// The target admits only `friend` on TCP 82, and sends nothing.
const TARGET: &str = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: target, namespace: prod}\nspec:\n  podSelector: {matchLabels: {app: target}}\n  policyTypes: [Ingress, Egress]\n  ingress:\n    - from: [{podSelector: {matchLabels: {app: friend}}}]\n      ports: [{protocol: TCP, port: 82}]\n";

/// Connection attempts from `from` to `to:port` in bursts until `stop`;
/// the summed `ok eperm other`.
fn hammer(
    world: &World,
    from: &Pod,
    to: &Pod,
    port: u16,
    timeout_ms: u32,
    stop: &AtomicBool,
) -> [u64; 3] {
    let mut sum = [0u64; 3];
    let (ip, port, timeout) = (
        to.ipv4.to_string(),
        port.to_string(),
        timeout_ms.to_string(),
    );
    while !stop.load(Ordering::Relaxed) {
        let out = world
            .testbed(
                from,
                &["burst", &ip, &port, "1000", "--timeout-ms", &timeout],
            )
            .unwrap();
        for (s, n) in sum.iter_mut().zip(burst_counts(&out)) {
            *s += n;
        }
    }
    sum
}

/// The allowed pair was never refused: no EPERM, no denial in the audit
/// log (a drop at the target is audited), and connects that timed out —
/// a SYN the listener's full queue dropped on a loaded machine, not a
/// verdict — stay below one in a thousand.
fn friend_never_refused(agent: &Agent, allowed: [u64; 3], phase: &str) {
    assert_eq!(allowed[1], 0, "friend was refused during the {phase}");
    let denials = agent
        .audit_events()
        .unwrap()
        .into_iter()
        .filter(|e| e["verdict"] == "deny" && e["port"] == 82)
        .count();
    assert_eq!(denials, 0, "friend → target:82 denied during the {phase}");
    assert!(
        allowed[2] * 1000 <= allowed[0],
        "friend's connects timed out during the {phase}: {allowed:?}"
    );
}

/// A small deterministic generator (no dependency for a test's pauses).
struct Lcg(u64);

impl Lcg {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (self.0 >> 33) % n
    }
}

/// kubelet's atomic writer: the files in a new timestamped directory, a
/// `..data_tmp` link to it renamed over `..data`, the old directory removed;
/// the visible names are links through `..data`.
fn project(dir: &Path, n: u32, files: &[(&str, &str)]) {
    let ts = format!("..2026_12_07_00_00_{n:05}");
    std::fs::create_dir(dir.join(&ts)).unwrap();
    for (name, text) in files {
        std::fs::write(dir.join(&ts).join(name), text).unwrap();
    }
    let old = std::fs::read_link(dir.join("..data")).ok();
    let tmp = dir.join("..data_tmp");
    std::os::unix::fs::symlink(&ts, &tmp).unwrap();
    std::fs::rename(&tmp, dir.join("..data")).unwrap();
    for (name, _) in files {
        let link = dir.join(name);
        if std::fs::symlink_metadata(&link).is_err() {
            std::os::unix::fs::symlink(Path::new("..data").join(name), &link).unwrap();
        }
    }
    if let Some(old) = old {
        std::fs::remove_dir_all(dir.join(old)).unwrap();
    }
}

#[test]
fn half_written_policy_files_and_configmap_swaps_never_open_traffic() {
    if !kernel_tests_enabled() {
        return;
    }
    let (dir, policies) = temp_policy_dir();
    let mut world = World::new().unwrap();
    for name in ["client", "friend", "target"] {
        world.add_pod(PodSpec::new("prod", name, &[], &[])).unwrap();
    }
    let (client, friend, target) = (
        world.pod("prod/client"),
        world.pod("prod/friend"),
        world.pod("prod/target"),
    );
    // Listeners that count what they accept: the target's port nobody may
    // reach (81), the one friend may (82), and one on the client the
    // target may not send to (83).
    let counts = dir.path().join("counts");
    std::fs::create_dir(&counts).unwrap();
    let (c81, c82, c83) = (counts.join("81"), counts.join("82"), counts.join("83"));
    let _listeners = [
        world.spawn_testbed(
            target,
            &["serve", "--tcp", "81", "--count", c81.to_str().unwrap()],
        ),
        world.spawn_testbed(
            target,
            &["serve", "--tcp", "82", "--count", c82.to_str().unwrap()],
        ),
        world.spawn_testbed(
            client,
            &["serve", "--tcp", "83", "--count", c83.to_str().unwrap()],
        ),
    ]
    .map(Result::unwrap);

    // One file: a placeholder first, then the target's policy. Cut at the
    // document boundary it is a valid file that leaves the target open.
    let file = policies.join("policy.yaml");
    let whole = format!("{PLACEHOLDER}---\n{TARGET}");
    std::fs::write(&file, &whole).unwrap();
    let audit = dir.path().join("audit.jsonl");
    let mut agent = Agent::start(dir.path(), &config_for(&world, &policies, &audit, "")).unwrap();
    agent.wait_enforcing(&world).unwrap();
    let loaded = |agent: &Agent| {
        agent.status().unwrap()["policy_revision_loaded"]
            .as_u64()
            .unwrap_or(0)
    };

    // The technique can fail: with "no policies" on purpose, the client
    // reaches port 81 and the target reaches the client.
    let open = policies.join("open.yaml");
    std::fs::write(&open, palisade::policy::load::EMPTY_LIST).unwrap();
    std::fs::remove_file(&file).unwrap();
    agent
        .wait_status("no policies", Duration::from_secs(5), |v| {
            v["policies"] == 0 && v["ready"] == true
        })
        .unwrap();
    let reached = world
        .probe(
            client,
            "tcp",
            target.ipv4.into(),
            81,
            Duration::from_millis(500),
        )
        .unwrap();
    let sent = world
        .probe(
            target,
            "tcp",
            client.ipv4.into(),
            83,
            Duration::from_millis(500),
        )
        .unwrap();
    assert_eq!(
        (reached.as_str(), sent.as_str()),
        ("ok", "ok"),
        "open without policy"
    );
    assert!(
        accepted(&c81) >= 1 && accepted(&c83) >= 1,
        "the listeners count arrivals"
    );
    let base81 = accepted(&c81);
    let base83 = accepted(&c83);
    std::fs::write(&file, &whole).unwrap();
    std::fs::remove_file(&open).unwrap();
    agent
        .wait_status("the policy back", Duration::from_secs(5), |v| {
            v["policies"] == 2 && v["ready"] == true
        })
        .unwrap();

    // 1. In-place rewrites under continuous attempts: truncate, pause,
    // the placeholder, pause, the rest; 5,000 times.
    let stop = AtomicBool::new(false);
    let cut = PLACEHOLDER.len() + 4;
    let mut rng = Lcg(0x5eed);
    let start = loaded(&agent);
    let (denied, egress, allowed, took) = std::thread::scope(|sc| {
        let denied = sc.spawn(|| hammer(&world, client, target, 81, 20, &stop));
        let egress = sc.spawn(|| hammer(&world, target, client, 83, 20, &stop));
        let allowed = sc.spawn(|| hammer(&world, friend, target, 82, 500, &stop));
        let begun = Instant::now();
        for _ in 0..5000 {
            let mut f = std::fs::File::create(&file).unwrap();
            std::thread::sleep(Duration::from_micros(rng.below(3000)));
            f.write_all(&whole.as_bytes()[..cut]).unwrap();
            std::thread::sleep(Duration::from_micros(rng.below(3000)));
            f.write_all(&whole.as_bytes()[cut..]).unwrap();
        }
        let took = begun.elapsed();
        stop.store(true, Ordering::Relaxed);
        (
            denied.join().unwrap(),
            egress.join().unwrap(),
            allowed.join().unwrap(),
            took,
        )
    });
    eprintln!(
        "5,000 in-place rewrites in {took:?}: client→target:81 {denied:?}, target→client:83 {egress:?}, friend→target:82 {allowed:?} (ok eperm other); policy reads {}",
        loaded(&agent) - start
    );
    assert_eq!(denied[0], 0, "client reached target:81 during the rewrites");
    assert!(denied[2] > 500, "the client tried throughout ({denied:?})");
    assert_eq!(egress[0], 0, "target reached client:83 during the rewrites");
    assert!(
        egress[1] > 500,
        "refused at connect() throughout ({egress:?})"
    );
    friend_never_refused(&agent, allowed, "rewrites");
    assert!(
        allowed[0] > 100,
        "friend connected throughout ({allowed:?})"
    );
    assert_eq!(accepted(&c81), base81, "target:81 accepted nothing");
    assert_eq!(accepted(&c83), base83, "client:83 accepted nothing");

    // 2. ConfigMap-style swaps between two sets that hold the target's
    // policy in different files: a read that mixed them would hold only
    // the placeholders. Some swaps follow each other at once, some after
    // the agent has read the last one.
    agent
        .wait_status("the rewritten file settled", Duration::from_secs(5), |v| {
            v["policies"] == 2
        })
        .unwrap();
    project(&policies, 0, &[("a.yaml", TARGET), ("b.yaml", PLACEHOLDER)]);
    std::fs::remove_file(&file).unwrap();
    agent
        .wait_status("the projected set", Duration::from_secs(5), |v| {
            v["policies"] == 2 && v["ready"] == true
        })
        .unwrap();
    let before = loaded(&agent);
    let stop = AtomicBool::new(false);
    let (denied, egress, allowed) = std::thread::scope(|sc| {
        let denied = sc.spawn(|| hammer(&world, client, target, 81, 20, &stop));
        let egress = sc.spawn(|| hammer(&world, target, client, 83, 20, &stop));
        let allowed = sc.spawn(|| hammer(&world, friend, target, 82, 500, &stop));
        for n in 1..=60 {
            if n % 2 == 1 {
                project(
                    &policies,
                    n,
                    &[("a.yaml", PLACEHOLDER_2), ("b.yaml", TARGET)],
                );
            } else {
                project(&policies, n, &[("a.yaml", TARGET), ("b.yaml", PLACEHOLDER)]);
            }
            std::thread::sleep(Duration::from_millis(rng.below(1300)));
        }
        stop.store(true, Ordering::Relaxed);
        (
            denied.join().unwrap(),
            egress.join().unwrap(),
            allowed.join().unwrap(),
        )
    });
    let reads = loaded(&agent) - before;
    eprintln!(
        "60 ConfigMap swaps, {reads} read: client→target:81 {denied:?}, target→client:83 {egress:?}, friend→target:82 {allowed:?}"
    );
    assert!(reads >= 5, "swaps that settled were read ({reads})");
    assert_eq!(denied[0], 0, "client reached target:81 during the swaps");
    assert_eq!(egress[0], 0, "target reached client:83 during the swaps");
    assert!(egress[1] > 100, "{egress:?}");
    friend_never_refused(&agent, allowed, "swaps");
    assert!(allowed[0] > 100, "{allowed:?}");
    assert_eq!(accepted(&c81), base81, "target:81 accepted nothing");
    assert_eq!(accepted(&c83), base83, "client:83 accepted nothing");

    // 3. Emptied in place and left so: refused with its file named, the
    // policy stays, and the status says why.
    std::fs::write(policies.join("..data").join("a.yaml"), "").unwrap();
    let status = agent
        .wait_status("the empty file refused", Duration::from_secs(5), |v| {
            v["last_error"]
                .as_str()
                .is_some_and(|e| e.contains("holds no YAML document"))
        })
        .unwrap();
    assert!(
        status["last_error"].as_str().unwrap().contains("a.yaml"),
        "{status}"
    );
    assert_eq!(
        world
            .probe(
                client,
                "tcp",
                target.ipv4.into(),
                81,
                Duration::from_millis(300)
            )
            .unwrap(),
        "timeout"
    );
    assert_eq!(accepted(&c81), base81);
    assert!(agent.stop().unwrap());
}
