//! `cargo xtask demo`: the payment-service scenario on real workloads.
//! Builds the world, starts the agent with the example NetworkPolicy, tries
//! every connection over IPv4 and IPv6, prints what was expected and observed
//! and the audit events, removes everything, and exits non-zero on any
//! difference.
use std::{path::PathBuf, process::ExitCode, time::Duration};

use palisade_tests::{
    agent::{Agent, config_for},
    scenario::{self, Family},
    world::World,
};

fn main() -> ExitCode {
    match demo() {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("demo failed: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn demo() -> anyhow::Result<bool> {
    palisade_tests::can_run_kernel_tests().map_err(|m| anyhow::anyhow!(m))?;
    let policy = std::env::var_os("PALISADE_DEMO_POLICY")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../policies/kubernetes")
        });
    let dir = tempfile::tempdir()?;
    println!("Palisade demo: the payment-service scenario\n");
    let mut world = World::new()?;
    for pod in scenario::pods() {
        let p = world.add_pod(pod)?;
        println!(
            "  pod {:<28} {:<15} {:<22} cgroup {}",
            p.spec.key(),
            p.ipv4,
            p.ipv6,
            p.cgroup.display()
        );
    }
    println!("\nPolicy: {}", policy.display());
    let config = config_for(
        &world,
        &policy,
        &dir.path().join("audit.jsonl"),
        scenario::NAMESPACES,
    );
    let mut agent = Agent::start(dir.path(), &config)?;
    agent.wait_enforcing(&world)?;
    println!(
        "Agent enforcing (programs attached under {})\n",
        world.cgroup_root.display()
    );

    let obs = scenario::run_probes(&world, &scenario::expectations(), &[Family::V4, Family::V6]);
    print!("{}", scenario::table(&obs));
    std::thread::sleep(Duration::from_millis(300));
    let events = agent.audit_events()?;
    println!("\nAudit events ({}):", events.len());
    for e in &events {
        println!("{e}");
    }
    let stopped = agent.stop()?;
    let tag = world.tag.clone();
    let root = world.cgroup_root.clone();
    drop(world);
    let left = palisade_tests::world::leftover_netns()
        .into_iter()
        .filter(|n| n.starts_with(&tag))
        .count();
    let pins = std::path::Path::new("/sys/fs/bpf").join(format!("palisade-test-{tag}"));
    let clean = left == 0 && !root.exists() && !pins.exists();
    let failures = obs.iter().filter(|o| !o.holds()).count();
    println!(
        "\n{} of {} attempts as expected; {} audit events; agent stopped {}; {}",
        obs.len() - failures,
        obs.len(),
        events.len(),
        if stopped { "cleanly" } else { "with an error" },
        if clean {
            "world removed"
        } else {
            "WORLD LEFT BEHIND"
        }
    );
    Ok(failures == 0 && stopped && clean && !events.is_empty())
}
