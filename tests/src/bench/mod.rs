//! `cargo xtask bench`: Palisade's cost side by side with no enforcement,
//! iptables and nftables, measured in one run on one machine.
//!
//! The world is two pods (network namespaces over veth into a bridge, each in
//! its own cgroup): `production/order-service` (the client) and
//! `production/payment-service` (the server, TCP 443). Configurations run
//! interleaved, A B C D E A B C D E …, so drift hits every one alike; ratios
//! are taken per round against that round's `none` and summarized as median
//! (min–max). Then one phase per remaining figure. Everything lands in
//! `target/bench/report.{md,json}` and `target/bench/ratios.png`.
pub mod chart;
pub mod cluster;
pub mod noop;
pub mod report;
pub mod rules;
pub mod scale;

use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use serde_json::{Value, json};

use crate::{
    agent::{Agent, config_for},
    scenario,
    world::{PodSpec, World},
};
use report::Summary;

/// The configurations of figure 1, in run order.
pub const CONFIGS: [&str; 5] = [
    "none",
    "palisade-seed",
    "palisade-10k",
    "iptables-10k",
    "nftables-10k",
];

#[derive(Clone, Debug)]
pub struct Options {
    pub quick: bool,
    pub rounds: usize,
    /// Length of one throughput measurement.
    pub duration: Duration,
    pub clients: usize,
    /// Denied connections in the audit flood.
    pub flood: u32,
    pub out_dir: PathBuf,
    /// Run only these figures (`throughput`, `programs`, `apply`, `audit`,
    /// `agent`, `scale`); empty: all.
    pub only: Vec<String>,
}

impl Options {
    fn wants(&self, figure: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|f| f == figure)
    }
}

impl Options {
    pub fn new(quick: bool, out_dir: PathBuf) -> Options {
        if quick {
            Options {
                quick,
                rounds: 5,
                duration: Duration::from_millis(300),
                clients: 4,
                flood: 5_000,
                out_dir,
                only: Vec::new(),
            }
        } else {
            Options {
                quick,
                rounds: 7,
                duration: Duration::from_millis(2_000),
                clients: 4,
                flood: 50_000,
                out_dir,
                only: Vec::new(),
            }
        }
    }
}

fn step(msg: &str) {
    eprintln!("bench: {msg}");
}

struct Bench {
    // Dropped first: the server must leave its cgroup before the world
    // removes the cgroup tree.
    _server: crate::world::Spawned,
    opts: Options,
    world: World,
    dir: tempfile::TempDir,
    client_ip: Ipv4Addr,
    server_ip: Ipv4Addr,
    seed_policies: PathBuf,
    big_policies: PathBuf,
    rules: Vec<rules::Rule>,
}

impl Bench {
    fn client(&self) -> &crate::world::Pod {
        self.world.pod("production/order-service")
    }
    fn server(&self) -> &crate::world::Pod {
        self.world.pod("production/payment-service")
    }

    fn agent_config(&self, name: &str, policies: &Path, extra: &str) -> (PathBuf, String) {
        let dir = self.dir.path().join(name);
        let _ = std::fs::create_dir_all(&dir);
        let config = config_for(&self.world, policies, &dir.join("audit.jsonl"), extra);
        (dir, config)
    }

    /// Starts the agent for `cfg` and waits until it enforces both pods;
    /// returns it and the time from spawn to "enforcing".
    fn start_agent(&self, cfg: &str) -> anyhow::Result<(Agent, Duration)> {
        let (dir, config) = match cfg {
            "palisade-seed" => self.agent_config(cfg, &self.seed_policies, scenario::NAMESPACES),
            _ => self.agent_config(
                cfg,
                &self.big_policies,
                &format!("{}{}", scenario::NAMESPACES, rules::peers_config()),
            ),
        };
        let start = Instant::now();
        let mut agent = Agent::start(&dir, &config)?;
        agent.wait_applied(Duration::from_secs(60))?;
        let took = start.elapsed();
        agent.wait_enforcing(&self.world)?;
        Ok((agent, took))
    }

    fn netns_exec(&self, args: &[&str], stdin: Option<&str>) -> anyhow::Result<()> {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.server().netns]).args(args);
        if let Some(input) = stdin {
            let path = self.dir.path().join("rules.in");
            std::fs::write(&path, input)?;
            cmd.stdin(std::fs::File::open(&path)?);
        }
        let out = cmd.output().with_context(|| format!("running {args:?}"))?;
        if !out.status.success() {
            bail!("{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(())
    }

    /// `palisade-testbed bench-client MODE TO PORT CLIENTS MS` from `from`:
    /// (transactions, errors).
    fn bench_client(
        &self,
        from: &crate::world::Pod,
        mode: &str,
        to: impl std::fmt::Display,
        port: u16,
        clients: usize,
        ms: u128,
    ) -> anyhow::Result<(u64, u64)> {
        let out = self.world.testbed(
            from,
            &[
                "bench-client",
                mode,
                &to.to_string(),
                &port.to_string(),
                &clients.to_string(),
                &ms.to_string(),
            ],
        )?;
        let mut it = out
            .split_whitespace()
            .map(|w| w.parse::<u64>().unwrap_or(0));
        Ok((it.next().unwrap_or(0), it.next().unwrap_or(0)))
    }

    /// One throughput measurement: (transactions/s, errors).
    fn load(&self, mode: &str) -> anyhow::Result<(f64, u64)> {
        let (done, errors) = self.bench_client(
            self.client(),
            mode,
            self.server_ip,
            rules::PORT,
            self.opts.clients,
            self.opts.duration.as_millis(),
        )?;
        Ok((done as f64 / self.opts.duration.as_secs_f64(), errors))
    }
}

/// Runs every figure and writes the report; returns the report's JSON.
pub fn run(opts: Options) -> anyhow::Result<Value> {
    std::fs::create_dir_all(&opts.out_dir)?;
    for tool in ["iptables-restore", "nft"] {
        if Command::new(tool).arg("--version").output().is_err() {
            bail!("{tool} is missing: run `cargo xtask setup` (Debian iptables, nftables)");
        }
    }
    step("building the world: client and server namespaces over veth, one cgroup each");
    let mut world = World::new()?;
    world.add_pod(PodSpec::new("production", "order-service", &[], &[]))?;
    world.add_pod(PodSpec::new("production", "payment-service", &[], &[]))?;
    // The client makes thousands of short connections per second: let it
    // reuse ports in TIME_WAIT and use the whole port range, or connect()
    // slows to a crawl searching for a free port after a few rounds. (Its
    // own namespace only.)
    let client_ns = world.pod("production/order-service").netns.clone();
    for setting in [
        "net.ipv4.tcp_tw_reuse=1",
        "net.ipv4.ip_local_port_range=1024 65535",
    ] {
        let ok = Command::new("ip")
            .args(["netns", "exec", &client_ns, "sysctl", "-qw", setting])
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            bail!("setting {setting} in the client namespace failed");
        }
    }
    let dir = tempfile::tempdir()?;
    let server_pod = world.pod("production/payment-service");
    let server = world.spawn_testbed(server_pod, &["bench-serve", "--tcp", "443"])?;
    let (client_ip, server_ip) = (world.pod("production/order-service").ipv4, server_pod.ipv4);
    let seed_policies = dir.path().join("seed-policies");
    std::fs::create_dir_all(&seed_policies)?;
    std::fs::copy(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../policies/kubernetes/payment-service-policy.yaml"),
        seed_policies.join("payment-service-policy.yaml"),
    )?;
    let rules = rules::rules(client_ip);
    let big_policies = dir.path().join("policies-10k");
    std::fs::create_dir_all(&big_policies)?;
    std::fs::write(
        big_policies.join("10k.yaml"),
        rules::network_policies(&rules),
    )?;
    let bench = Bench {
        opts,
        world,
        dir,
        client_ip,
        server_ip,
        _server: server,
        seed_policies,
        big_policies,
        rules,
    };
    let mut report = json!({
        "machine": report::machine(),
        "options": {
            "quick": bench.opts.quick,
            "rounds": bench.opts.rounds,
            "durationMs": bench.opts.duration.as_millis() as u64,
            "clients": bench.opts.clients,
            "rules": bench.rules.len(),
            "identities": rules::PEERS + 2,
        },
    });
    let mut starts = Vec::new();
    if bench.opts.wants("throughput") {
        let (throughput, s) = figure_throughput(&bench)?;
        report["throughput"] = throughput;
        starts = s;
    }
    if bench.opts.wants("programs") {
        report["programs"] = figure_programs(&bench)?;
    }
    if bench.opts.wants("apply") {
        report["apply"] = figure_apply(&bench)?;
    }
    if bench.opts.wants("audit") {
        report["audit"] = figure_audit(&bench)?;
    }
    if bench.opts.wants("agent") {
        report["agent"] = figure_agent(&bench, starts)?;
    }
    if bench.opts.wants("scale") {
        report["scale"] = scale::figure(&bench.world.cgroup_root, bench.opts.quick)?;
    }
    if bench.opts.wants("cluster") {
        report["cluster"] = cluster::figure(bench.opts.quick)?;
    }
    report["targets"] = report::targets(&report);
    report::write(&bench.opts.out_dir, &report)?;
    chart::draw(&bench.opts.out_dir.join("ratios.png"), &report)?;
    Ok(report)
}

/// Figure 1: new connections and request/response per second, interleaved.
fn figure_throughput(b: &Bench) -> anyhow::Result<(Value, Vec<f64>)> {
    let mut crr: Vec<Vec<f64>> = vec![Vec::new(); CONFIGS.len()];
    let mut rr: Vec<Vec<f64>> = vec![Vec::new(); CONFIGS.len()];
    let mut errors = 0u64;
    let mut starts = Vec::new();
    for round in 0..b.opts.rounds {
        for (i, cfg) in CONFIGS.iter().enumerate() {
            step(&format!("round {}/{}: {cfg}", round + 1, b.opts.rounds));
            let mut agent = None;
            match *cfg {
                "none" => {}
                "palisade-seed" | "palisade-10k" => {
                    let (a, took) = b.start_agent(cfg)?;
                    if *cfg == "palisade-10k" {
                        starts.push(took.as_secs_f64() * 1e3);
                    }
                    agent = Some(a);
                }
                "iptables-10k" => {
                    b.netns_exec(&["iptables-restore"], Some(&rules::iptables(&b.rules)))?
                }
                _ => b.netns_exec(&["nft", "-f", "-"], Some(&rules::nftables(&b.rules)))?,
            }
            // Warm-up, then the two measurements.
            b.bench_client(b.client(), "crr", b.server_ip, rules::PORT, 1, 100)?;
            let (c, e1) = b.load("crr")?;
            let (r, e2) = b.load("rr")?;
            errors += e1 + e2;
            crr[i].push(c);
            rr[i].push(r);
            match *cfg {
                "iptables-10k" => b
                    .netns_exec(&["iptables", "-F"], None)
                    .and_then(|()| b.netns_exec(&["iptables", "-X"], None))?,
                "nftables-10k" => {
                    b.netns_exec(&["nft", "delete", "table", "inet", "palisade_bench"], None)?
                }
                _ => {}
            }
            if let Some(mut a) = agent {
                a.stop()?;
            }
        }
    }
    if errors > 0 {
        step(&format!(
            "{errors} client errors (connect or I/O) in the throughput runs"
        ));
    }
    let mut out = json!({"errors": errors});
    for (name, series) in [("newConnections", &crr), ("requestResponse", &rr)] {
        let mut by_cfg = serde_json::Map::new();
        for (i, cfg) in CONFIGS.iter().enumerate() {
            let ratio = |against: usize| -> Vec<f64> {
                series[i]
                    .iter()
                    .zip(&series[against])
                    .map(|(a, b)| if *b > 0.0 { a / b } else { 0.0 })
                    .collect()
            };
            let mut entry = json!({
                "perSecond": Summary::of(&series[i]),
                "samples": series[i],
                "ratioToNone": Summary::of(&ratio(0)),
            });
            if *cfg == "palisade-10k" {
                entry["ratioToIptables"] = json!(Summary::of(&ratio(3)));
                entry["ratioToNftables"] = json!(Summary::of(&ratio(4)));
            }
            by_cfg.insert((*cfg).to_owned(), entry);
        }
        out[name] = Value::Object(by_cfg);
    }
    Ok((out, starts))
}

/// Per program: (name, runs, ns per run) from the kernel's statistics.
fn program_stats(names: &[&str]) -> Vec<(String, u32, u64, f64)> {
    let mut out = Vec::new();
    for info in aya::programs::loaded_programs().flatten() {
        let Some(name) = info.name_as_str() else {
            continue;
        };
        if names.iter().any(|n| name.starts_with(n)) {
            let runs = info.run_count();
            let ns = info.run_time().as_nanos() as f64;
            out.push((
                name.to_owned(),
                info.id(),
                runs,
                if runs > 0 { ns / runs as f64 } else { 0.0 },
            ));
        }
    }
    out.sort_by_key(|p| p.1);
    out
}

/// Figure 2: ns per invocation of every Palisade program and of a no-op of
/// the same type at the same cgroup, under the new-connection load.
fn figure_programs(b: &Bench) -> anyhow::Result<Value> {
    let mut rows = Vec::new();
    for cfg in ["palisade-seed", "palisade-10k"] {
        step(&format!("program cost under {cfg} (kernel.bpf_stats)"));
        let (mut agent, _) = b.start_agent(cfg)?;
        let noops = noop::NoopPrograms::attach(&b.world.cgroup_root)?;
        let stats = aya::sys::enable_stats(aya::sys::Stats::RunTime)
            .context("enabling the kernel's BPF run-time statistics")?;
        b.load("crr")?;
        // Every program gets traffic: IPv6 connects, and unconnected UDP
        // request/response over both families — DNS-like, from the server
        // pod (whose egress the seed policy allows to UDP 53) to an echo in
        // the client's namespace. The echo runs outside the agent's cgroup
        // root, so only the sender's datagrams are counted.
        b.bench_client(b.client(), "crr", b.server().ipv6, rules::PORT, 2, 300)?;
        let client = b.client();
        let _echo = b.world.spawn_testbed_in(
            &b.world.outside_root,
            &client.netns,
            &["bench-serve", "--udp", "53"],
        )?;
        let ms = if b.opts.quick { 200 } else { 1000 };
        for to in [std::net::IpAddr::from(client.ipv4), client.ipv6.into()] {
            let (done, errors) = b.bench_client(b.server(), "udp", to, 53, 2, ms)?;
            if done == 0 {
                bail!("no UDP exchange to {to}:53 under {cfg} succeeded ({errors} errors)");
            }
        }
        let progs = program_stats(&["palisade_", "noop_"]);
        drop(stats);
        drop(noops);
        agent.stop()?;
        let noop = |n: &str| progs.iter().find(|p| p.0 == n).map(|p| p.3).unwrap_or(0.0);
        // Program names are cut to 15 bytes by the kernel: the agent loads
        // connect4, connect6, sendmsg4, sendmsg6 in that order (ascending ids).
        let mut seen_connect = 0;
        let mut seen_sendmsg = 0;
        for (name, _, runs, ns) in progs.iter().filter(|p| p.0.starts_with("palisade_")) {
            let label = if name.starts_with("palisade_connec") {
                seen_connect += 1;
                if seen_connect == 1 {
                    "connect4"
                } else {
                    "connect6"
                }
            } else if name.starts_with("palisade_sendms") {
                seen_sendmsg += 1;
                if seen_sendmsg == 1 {
                    "sendmsg4"
                } else {
                    "sendmsg6"
                }
            } else if name.starts_with("palisade_egress") {
                "egress"
            } else if name.starts_with("palisade_ingres") {
                "ingress"
            } else {
                continue; // the packet-socket guard runs at socket creation only
            };
            let baseline = format!("noop_{label}");
            let base = noop(&baseline);
            rows.push(json!({
                "config": cfg,
                "program": label,
                "runs": runs,
                "nsPerRun": ns,
                "baseline": baseline,
                "baselineNsPerRun": base,
                "ratioToNoop": if *runs > 0 && base > 0.0 { json!(ns / base) } else { Value::Null },
            }));
        }
    }
    Ok(Value::Array(rows))
}

/// Figure 3: full compile + map sync of the 10k set, a one-rule change, and
/// apply → a probe observing the new verdict.
fn figure_apply(b: &Bench) -> anyhow::Result<Value> {
    use palisade::datapath::Datapath as _;
    step("policy apply: full compile + map sync, one-rule change (in process)");
    let (_, config_text) = b.agent_config(
        "apply",
        &b.big_policies,
        &format!("{}{}", scenario::NAMESPACES, rules::peers_config()),
    );
    let config = palisade::config::Config::parse(Path::new("bench.yaml"), &config_text)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let full_text = rules::network_policies(&b.rules);
    // Two different one-rule changes: the second is timed, written into the
    // slot that holds the full table (the steady state of a running agent).
    let mut changed = b.rules.clone();
    changed[0].port += 1;
    let warm_text = rules::network_policies(&changed);
    let mut changed = b.rules.clone();
    changed[1].port += 1;
    let changed_text = rules::network_policies(&changed);
    let parse = |t: &str| -> anyhow::Result<palisade::policy::PolicySet> {
        Ok(palisade::policy::PolicySet {
            policies: palisade::policy::load::parse_str("10k.yaml", t)
                .map_err(|e| anyhow::anyhow!("{e}"))?
                .into_iter()
                .map(std::sync::Arc::new)
                .collect(),
            files: Vec::new(),
        })
    };
    let (full, warm, one) = (
        parse(&full_text)?,
        parse(&warm_text)?,
        parse(&changed_text)?,
    );
    let classifier =
        palisade::discovery::Classifier::new(&config.workloads).map_err(|e| anyhow::anyhow!(e))?;
    let workloads = || -> anyhow::Result<palisade::inventory::Inputs> {
        let cgroups = palisade::discovery::scan(&b.world.cgroup_root)?;
        Ok(palisade::inventory::Inputs {
            workloads: cgroups
                .iter()
                .filter_map(|c| classifier.classify(c))
                .collect(),
            ..Default::default()
        })
    };
    let (mut full_ms, mut one_ms, mut entries) = (Vec::new(), Vec::new(), 0);
    let (mut compile_ms, mut sync_ms) = (Vec::new(), Vec::new());
    for _ in 0..b.opts.rounds {
        let mut dp = palisade::datapath::kernel::KernelDatapath::load(
            &b.world.cgroup_root,
            &config.maps,
            config.maps.audit_ring_bytes / 8,
            None,
        )?;
        let mut planner = palisade::agent::Planner::new(config.clone(), false);
        let input = workloads()?;
        let t = Instant::now();
        let obs = planner.plan(input, &full);
        compile_ms.push(t.elapsed().as_secs_f64() * 1e3);
        let t1 = Instant::now();
        let report = dp.apply(&obs.desired)?;
        sync_ms.push(t1.elapsed().as_secs_f64() * 1e3);
        full_ms.push(t.elapsed().as_secs_f64() * 1e3);
        entries = report.policy_entries;
        let obs = planner.plan(workloads()?, &warm);
        dp.apply(&obs.desired)?;
        let t = Instant::now();
        let obs = planner.plan(workloads()?, &one);
        dp.apply(&obs.desired)?;
        one_ms.push(t.elapsed().as_secs_f64() * 1e3);
    }

    step("policy apply: `palisade policy apply` returning → a probe sees the new verdict");
    let (mut agent, _) = b.start_agent("palisade-seed")?;
    let socket = agent.dir.join("palisade.sock");
    let original = std::fs::read_to_string(b.seed_policies.join("payment-service-policy.yaml"))?;
    let closed = original.replace("port: 443", "port: 444");
    let apply = |text: &str| -> anyhow::Result<()> {
        let file = b.dir.path().join("payment-service-policy.yaml");
        std::fs::write(&file, text)?;
        let out = Command::new(crate::bin_dir().join("palisade"))
            .arg("--socket")
            .arg(&socket)
            .args(["policy", "apply", "-f"])
            .arg(&file)
            .output()?;
        if !out.status.success() {
            bail!("policy apply: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(())
    };
    let mut enforced_ms = Vec::new();
    // One connection with one request/response against the bench server.
    let reachable = || {
        b.bench_client(b.client(), "crr", b.server_ip, rules::PORT, 1, 1)
            .is_ok_and(|(done, _)| done > 0)
    };
    for _ in 0..b.opts.rounds {
        apply(&closed)?;
        let deadline = Instant::now() + Duration::from_secs(5);
        while reachable() {
            if Instant::now() > deadline {
                bail!("the closing policy did not take effect within 5 s");
            }
        }
        apply(&original)?;
        let t = Instant::now();
        while !reachable() {
            if t.elapsed() > Duration::from_secs(5) {
                bail!("the opening policy did not take effect within 5 s");
            }
        }
        enforced_ms.push(t.elapsed().as_secs_f64() * 1e3);
    }
    agent.stop()?;
    Ok(json!({
        "policyEntries": entries,
        "fullMs": Summary::of(&full_ms),
        "fullCompileMs": Summary::of(&compile_ms),
        "fullSyncMs": Summary::of(&sync_ms),
        "oneRuleMs": Summary::of(&one_ms),
        "applyToEnforcedMs": Summary::of(&enforced_ms),
    }))
}

fn status(agent: &Agent) -> anyhow::Result<Value> {
    let out = Command::new(crate::bin_dir().join("palisade"))
        .arg("--socket")
        .arg(agent.dir.join("palisade.sock"))
        .args(["status", "--json"])
        .output()?;
    if !out.status.success() {
        bail!("palisade status: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(serde_json::from_slice(&out.stdout)?)
}

fn lines(path: &Path) -> u64 {
    std::fs::read_to_string(path)
        .map(|t| t.lines().count() as u64)
        .unwrap_or(0)
}

/// Figure 4: a flood of denied connections (EPERM at connect()); events per
/// second delivered to the JSON sink, and emitted = delivered + lost.
fn figure_audit(b: &Bench) -> anyhow::Result<Value> {
    step(&format!("audit: {} denied connections", b.opts.flood));
    let (agent, _) = b.start_agent("palisade-seed")?;
    let mut agent = agent;
    let before = lines(&agent.audit_path);
    let start = Instant::now();
    // The server's egress allows only postgres and DNS: every connect is EPERM.
    let denied = b
        .world
        .flood(b.server(), b.client_ip.into(), 9, b.opts.flood)?;
    let flood_s = start.elapsed().as_secs_f64();
    // Wait until the sink stops growing, watching its size (cheap: reading
    // the file on every poll would compete with the agent for the CPUs).
    let size = || std::fs::metadata(&agent.audit_path).map_or(0, |m| m.len());
    let mut last_size = size();
    let mut last_change = Instant::now();
    let mut done_at = start.elapsed();
    while last_change.elapsed() < Duration::from_millis(500) {
        std::thread::sleep(Duration::from_millis(5));
        let now = size();
        if now != last_size {
            last_size = now;
            last_change = Instant::now();
            done_at = start.elapsed();
        }
    }
    let last = lines(&agent.audit_path);
    // The status counters refresh every rescan.
    std::thread::sleep(Duration::from_millis(300));
    let s = status(&agent)?;
    let emitted = s["counters"]["events_emitted"].as_u64().unwrap_or(0);
    let lost = s["counters"]["events_lost"].as_u64().unwrap_or(0);
    let delivered = last - before;
    agent.stop()?;
    Ok(json!({
        "denied": denied,
        "floodSeconds": flood_s,
        "emitted": emitted,
        "delivered": delivered,
        "lost": lost,
        "exact": emitted == delivered + lost,
        "deliveredPerSecond": delivered as f64 / done_at.as_secs_f64().max(1e-9),
        "deniedPerSecond": f64::from(denied) / flood_s.max(1e-9),
    }))
}

fn proc_rss_mib(pid: u32) -> f64 {
    proc_status_mib(pid, "VmRSS:")
}

/// A memory line of `/proc/PID/status` (`VmRSS:`, `VmHWM:`) in MiB.
fn proc_status_mib(pid: u32, key: &str) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix(key))
                .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        })
        .map_or(0.0, |kib| kib / 1024.0)
}

fn proc_cpu_ticks(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            let rest = s.rsplit_once(')')?.1;
            let f: Vec<&str> = rest.split_whitespace().collect();
            Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
        })
        .unwrap_or(0)
}

/// Cgroups made for figure 5's "many workloads" row, each with a sleeping
/// process; the processes are killed and the cgroups removed on drop.
struct BulkWorkloads {
    dirs: Vec<PathBuf>,
    children: Vec<std::process::Child>,
}

impl BulkWorkloads {
    /// `n` workloads `bulk/wI` below `root` (the default rule names them).
    fn make(root: &Path, n: usize) -> anyhow::Result<BulkWorkloads> {
        let mut bulk = BulkWorkloads {
            dirs: vec![root.join("bulk")],
            children: Vec::new(),
        };
        std::fs::create_dir_all(root.join("bulk"))?;
        for i in 0..n {
            let dir = root.join(format!("bulk/w{i}"));
            std::fs::create_dir_all(&dir)?;
            bulk.dirs.push(dir.clone());
            let child = Command::new("sleep").arg("900").spawn()?;
            std::fs::write(dir.join("cgroup.procs"), child.id().to_string())?;
            bulk.children.push(child);
        }
        Ok(bulk)
    }
}

impl Drop for BulkWorkloads {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        for d in self.dirs.iter().rev() {
            let _ = std::fs::remove_dir(d);
        }
    }
}

/// Figure 5: resident memory and CPU at rest (seed; seed with 500 more
/// workload cgroups; the 10k policy), and start → enforcing (from the
/// throughput rounds' agent starts). CPU is counted once the agent has been
/// left alone for longer than its busy cadence (10 s after a change; not in
/// the smoke run).
fn figure_agent(b: &Bench, starts_10k: Vec<f64>) -> anyhow::Result<Value> {
    const BULK: usize = 500;
    let mut out =
        json!({ "startToEnforcingMs10k": Summary::of(&starts_10k), "bulkWorkloads": BULK });
    for (cfg, key) in [
        ("palisade-seed", "seed"),
        ("palisade-seed", "manyWorkloads"),
        ("palisade-10k", "tenK"),
    ] {
        step(&format!("agent memory and CPU at rest, {key}"));
        let _bulk = if key == "manyWorkloads" {
            Some(BulkWorkloads::make(&b.world.cgroup_root, BULK)?)
        } else {
            None
        };
        let (mut agent, took) = b.start_agent(cfg)?;
        let pid = agent.pid().context("agent pid")?;
        // The smoke run (--quick) only keeps the figure working: it does
        // not wait for the agent to come to rest.
        let (settle, window) = if b.opts.quick { (1, 2.0) } else { (11, 30.0) };
        std::thread::sleep(Duration::from_secs(settle));
        let t0 = proc_cpu_ticks(pid);
        std::thread::sleep(Duration::from_secs_f64(window));
        let ticks = proc_cpu_ticks(pid) - t0;
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
        out[key] = json!({
            "rssMiB": proc_rss_mib(pid),
            "idleCpuPercent": ticks as f64 / hz / window * 100.0,
            "startToEnforcingMs": took.as_secs_f64() * 1e3,
        });
        agent.stop()?;
    }
    Ok(out)
}
