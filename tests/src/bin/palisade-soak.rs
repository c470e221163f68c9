//! `palisade-soak [--minutes N]` (run by `cargo xtask soak`, root): the seed
//! scenario under churn for N minutes — policy applied and deleted through the
//! CLI (each change checked by a probe right after the CLI returns), workload
//! cgroups created and removed, continuous allowed and denied probes, an
//! audit flood every minute — while the agent's RSS, descriptors and threads
//! are sampled. Writes target/soak/report.md; exits non-zero on any wrong
//! verdict or an audit count that does not balance at rest.
use std::{
    fmt::Write as _,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use palisade_tests::{
    agent::{Agent, config_for},
    scenario,
    world::World,
};

const ALLOW_LOGGING: &str = "apiVersion: palisade.dev/v1alpha1\nkind: PalisadePolicy\nmetadata: {name: allow-logging, namespace: production}\nspec:\n  selector: {matchLabels: {app: payment-service}}\n  ingress:\n    - from: [{selector: {matchLabels: {app: logging}}}]\n      ports: [{protocol: TCP, port: 443}]\n";

#[derive(Clone, Copy, Default)]
struct Sample {
    secs: f64,
    rss_kib: u64,
    fds: u64,
    threads: u64,
}

fn sample(pid: u32, start: Instant) -> Sample {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    };
    Sample {
        secs: start.elapsed().as_secs_f64(),
        rss_kib: field("VmRSS:"),
        fds: std::fs::read_dir(format!("/proc/{pid}/fd"))
            .map(|d| d.count() as u64)
            .unwrap_or(0),
        threads: field("Threads:"),
    }
}

fn audit_counts(agent: &Agent) -> anyhow::Result<(u64, u64, u64)> {
    let s = agent.status()?;
    let n = |v: &serde_json::Value| v.as_u64().unwrap_or(0);
    Ok((
        n(&s["counters"]["events_emitted"]),
        n(&s["events_delivered"]),
        n(&s["counters"]["events_lost"]),
    ))
}

fn main() -> anyhow::Result<()> {
    let minutes: f64 = std::env::args()
        .skip_while(|a| a != "--minutes")
        .nth(1)
        .map(|m| m.parse())
        .transpose()
        .context("--minutes N")?
        .unwrap_or(10.0);
    let duration = Duration::from_secs_f64(minutes * 60.0);
    palisade_tests::can_run_kernel_tests().map_err(anyhow::Error::msg)?;
    let dir = tempfile::tempdir()?;
    let policies = dir.path().join("policies");
    std::fs::create_dir_all(&policies)?;
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../policies/kubernetes");
    for e in std::fs::read_dir(&repo)?.flatten() {
        std::fs::copy(e.path(), policies.join(e.file_name()))?;
    }
    let mut world = World::new()?;
    for p in scenario::pods() {
        world.add_pod(p)?;
    }
    let config = config_for(
        &world,
        &policies,
        &dir.path().join("audit.jsonl"),
        scenario::NAMESPACES,
    );
    let mut agent = Agent::start(dir.path(), &config)?;
    agent.wait_enforcing(&world)?;
    let pid = agent.pid().context("agent pid")?;
    let (order, payment, logging) = (
        world.pod("production/order-service"),
        world.pod("production/payment-service"),
        world.pod("production/logging"),
    );
    let t = Duration::from_millis(500);
    let start = Instant::now();
    let mut samples = vec![sample(pid, start)];
    let (mut probes, mut wrong, mut changes, mut churned, mut floods) =
        (0u64, Vec::new(), 0u64, 0u64, 0u64);
    let mut logging_allowed = false;
    // The first flood comes after 30 s, so that warm-up (the audit stream's
    // buffers filled once) is over before the drift is measured.
    let first_flood = start.checked_sub(Duration::from_secs(30)).unwrap_or(start);
    let (mut last_change, mut last_flood, mut last_sample) = (start, first_flood, start);
    let churn_parent = world.cgroup_root.join("production");
    while start.elapsed() < duration {
        // Continuous probes: what the policy in force says.
        for (from, to, port, want) in [
            (order, payment, 443, "ok"),
            (
                logging,
                payment,
                443,
                if logging_allowed { "ok" } else { "timeout" },
            ),
            (payment, logging, 9000, "eperm"),
        ] {
            let got = world.probe(from, "tcp", to.ipv4.into(), port, t)?;
            probes += 1;
            if got != want {
                wrong.push(format!(
                    "{:.0}s {} → {}:{port}: {got}, want {want}",
                    start.elapsed().as_secs_f64(),
                    from.spec.key(),
                    to.spec.key()
                ));
            }
        }
        // Policy churn through the CLI: the change is in force when it returns.
        if last_change.elapsed() > Duration::from_secs(5) {
            last_change = Instant::now();
            let file = dir.path().join("allow-logging.yaml");
            std::fs::write(&file, ALLOW_LOGGING)?;
            let (code, out, err) = if logging_allowed {
                agent.cli(&["policy", "delete", "production/allow-logging"])?
            } else {
                agent.cli(&["policy", "apply", "-f", file.to_str().unwrap_or("")])?
            };
            anyhow::ensure!(
                code == 0,
                "policy change through the CLI failed: {out}{err}"
            );
            logging_allowed = !logging_allowed;
            changes += 1;
        }
        // Workload churn: a new workload joins, is judged, leaves. It sends
        // from logging's namespace, so payment's ingress judges it by that
        // address: allowed exactly while allow-logging is in force.
        let cg = churn_parent.join(format!("churn-{}", churned % 4));
        std::fs::create_dir_all(&cg)?;
        std::thread::sleep(Duration::from_millis(250));
        let got = world.probe_in(&cg, &logging.netns, "tcp", payment.ipv4.into(), 443, t)?;
        probes += 1;
        let want = if logging_allowed { "ok" } else { "timeout" };
        if got != want {
            wrong.push(format!(
                "{:.0}s churn workload → payment:443: {got}, want {want}",
                start.elapsed().as_secs_f64()
            ));
        }
        let _ = std::fs::remove_dir(&cg);
        churned += 1;
        // An audit flood every minute.
        if last_flood.elapsed() > Duration::from_secs(60) {
            last_flood = Instant::now();
            world.flood(payment, logging.ipv4.into(), 9000, 2000)?;
            floods += 1;
        }
        if last_sample.elapsed() > Duration::from_secs(10) {
            last_sample = Instant::now();
            samples.push(sample(pid, start));
        }
    }
    // At rest: every event emitted is delivered or counted lost.
    let rest = Instant::now();
    let (emitted, delivered, lost) = loop {
        let c = audit_counts(&agent)?;
        if c.0 == c.1 + c.2 || rest.elapsed() > Duration::from_secs(20) {
            break c;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    samples.push(sample(pid, start));
    agent.stop()?;
    let warm = samples
        .iter()
        .find(|s| s.secs >= (duration.as_secs_f64() * 0.1).min(180.0))
        .copied()
        .unwrap_or(samples[0]);
    let end = *samples.last().context("samples")?;
    let drift = (end.rss_kib as f64 - warm.rss_kib as f64) * 100.0 / warm.rss_kib.max(1) as f64;
    let mut report = String::new();
    writeln!(report, "# Soak report\n")?;
    writeln!(
        report,
        "{minutes} minutes on Linux {} ({} CPUs): the seed scenario with a policy change through the CLI every 5 s, a workload cgroup created and removed every round, three probes per round, a 2,000-connection audit flood every minute.\n",
        palisade::datapath::kernel::kernel_release(),
        std::thread::available_parallelism().map_or(0, usize::from)
    )?;
    writeln!(report, "| measure | value |\n|---|---|")?;
    writeln!(report, "| probes | {probes} |")?;
    writeln!(report, "| wrong verdicts | {} |", wrong.len())?;
    writeln!(report, "| policy changes through the CLI | {changes} |")?;
    writeln!(report, "| workloads created and removed | {churned} |")?;
    writeln!(report, "| audit floods | {floods} |")?;
    writeln!(
        report,
        "| audit at rest | emitted {emitted} = delivered {delivered} + lost {lost}: {} |",
        if emitted == delivered + lost {
            "exact"
        } else {
            "NOT EXACT"
        }
    )?;
    writeln!(
        report,
        "| agent RSS after warm-up ({:.0} s) → end | {} KiB → {} KiB ({drift:+.1}%) |",
        warm.secs, warm.rss_kib, end.rss_kib
    )?;
    writeln!(
        report,
        "| open descriptors start → end | {} → {} |",
        samples[0].fds, end.fds
    )?;
    writeln!(
        report,
        "| threads start → end | {} → {} |",
        samples[0].threads, end.threads
    )?;
    writeln!(
        report,
        "\n## Samples (every 10 s)\n\n| s | RSS KiB | fds | threads |\n|---|---|---|---|"
    )?;
    for s in &samples {
        writeln!(
            report,
            "| {:.0} | {} | {} | {} |",
            s.secs, s.rss_kib, s.fds, s.threads
        )?;
    }
    if !wrong.is_empty() {
        writeln!(report, "\n## Wrong verdicts\n")?;
        for w in &wrong {
            writeln!(report, "- {w}")?;
        }
    }
    let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/soak");
    std::fs::create_dir_all(&out)?;
    std::fs::write(out.join("report.md"), &report)?;
    print!("{report}");
    anyhow::ensure!(wrong.is_empty(), "{} wrong verdicts", wrong.len());
    anyhow::ensure!(
        emitted == delivered + lost,
        "audit counts do not balance at rest"
    );
    Ok(())
}
