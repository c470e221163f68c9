//! The `palisade` command line. Errors end here as `anyhow` with context.
use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "palisade",
    version,
    about = "Identity-based workload network policy, enforced in the kernel with eBPF.",
    long_about = "Palisade tags every connection with the identity of the workload (cgroup) that owns the socket, \
drops traffic between workloads that policy does not allow, and writes an audit event for every denied connection.\n\n\
Policy is YAML: Kubernetes networking.k8s.io/v1 NetworkPolicy, unchanged, or Palisade's own palisade.dev/v1alpha1 PalisadePolicy."
)]
struct Cli {
    /// The agent's control socket (for status, workloads, policy apply/list/delete, audit).
    #[arg(long, global = true, env = "PALISADE_SOCKET", default_value = palisade::control::DEFAULT_SOCKET)]
    socket: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the node agent (needs root: loads and attaches eBPF programs).
    Agent {
        /// Agent configuration (YAML): cgroup root, workload rules, peers, policy directory, audit output.
        #[arg(long, short)]
        config: PathBuf,
        /// Kubernetes mode: pods, namespaces, NetworkPolicies and Palisade policies come
        /// from the API server (in-cluster service account, or --kubeconfig).
        #[arg(long)]
        kubernetes: bool,
        /// Kubernetes mode: a kubeconfig file instead of the in-cluster configuration.
        #[arg(long, requires = "kubernetes", env = "KUBECONFIG")]
        kubeconfig: Option<PathBuf>,
        /// Kubernetes mode: this node's name (the DaemonSet passes spec.nodeName through
        /// the downward API).
        #[arg(long, env = "NODE_NAME")]
        node_name: Option<String>,
        /// Log filter, e.g. `info`, `palisade=debug`. Also read from RUST_LOG.
        #[arg(long, default_value = "info", env = "RUST_LOG")]
        log: String,
    },
    /// What the running agent is doing: readiness and why not, workloads,
    /// identities, policies and their generation, map fill, events lost,
    /// self-check repairs, attach points, version. Exit status 2 when the
    /// agent is not ready (the kernel does not enforce what it says).
    Status {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// The workloads the running agent enforces, with identity and addresses.
    Workloads {
        #[arg(long)]
        json: bool,
    },
    /// Audit events of the running agent.
    Audit {
        /// Stream new events as they happen (required: past events are in the audit output).
        #[arg(long, required = true)]
        follow: bool,
        /// One JSON object per line instead of text.
        #[arg(long)]
        json: bool,
        /// Only events from or to this workload (`namespace/name`).
        #[arg(long)]
        workload: Option<String>,
        /// Only this verdict.
        #[arg(long, value_parser = ["deny", "would-deny"])]
        verdict: Option<String>,
    },
    /// Remove every pin, link and attachment the agent left (it keeps enforcing
    /// while stopped): detaches Palisade's programs and deletes its pinned maps.
    Cleanup {
        /// Agent configuration (for bpfPinDir).
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Print Palisade's CustomResourceDefinitions (PalisadePolicy,
    /// ClusterPalisadePolicy) as YAML, generated from the agent's types; the
    /// committed deploy/kubernetes/crds.yaml is this output.
    Crds,
    /// Print the JSON Schema of a record the agent writes. `audit`: one
    /// line of the audit log (and of `palisade audit`), generated from the
    /// agent's type; the kernel tests check real events against it.
    /// `status`: the report of `palisade status --json`.
    Schema {
        #[arg(value_enum)]
        record: SchemaRecord,
    },
    /// Work with policy files offline.
    Policy {
        #[command(subcommand)]
        command: PolicyCommand,
    },
    /// Would FROM reach TO on PORT, and why? Answered offline from the compiled
    /// tables (the entries the agent writes into the kernel), for each direction.
    Explain {
        /// World file: namespaces and pods (labels, ip, ports).
        #[arg(long)]
        world: PathBuf,
        /// Policy file or directory (repeatable).
        #[arg(long, required = true)]
        policy: Vec<PathBuf>,
        /// Source pod, `namespace/name`.
        #[arg(long)]
        from: String,
        /// Destination pod, `namespace/name`.
        #[arg(long)]
        to: String,
        #[arg(long)]
        port: u16,
        #[arg(long, default_value = "TCP")]
        protocol: String,
    },
    /// Answer every probe of a probes file offline; writes JSON results in probe order.
    Simulate {
        #[arg(long)]
        world: PathBuf,
        #[arg(long, required = true)]
        policy: Vec<PathBuf>,
        /// `{"probes": [{"from": "x/a", "to": "y/b", "port": 80, "protocol": "TCP"}]}`
        #[arg(long)]
        probes: PathBuf,
        /// Write the results here instead of stdout.
        #[arg(long, short)]
        output: Option<PathBuf>,
    },
}

/// Records whose JSON Schema `palisade schema` prints.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum SchemaRecord {
    /// An audit event (a line of the audit log).
    Audit,
    /// The status report (`palisade status --json`, the control socket's `status`).
    Status,
}

#[derive(Subcommand)]
enum PolicyCommand {
    /// Validate policy files or directories (subdirectories included, names
    /// starting with `.` skipped — as the agent reads `policyDir`); print every
    /// problem as file:line:column: field: message. Finding no policy file is
    /// an error.
    Check {
        #[arg(required = true)]
        paths: Vec<PathBuf>,
    },
    /// Validate, then hand policy files to the running agent; all or nothing.
    /// Waits until the kernel enforces them. Exit status: 0 enforced, 1
    /// refused or invalid (nothing is left behind in the agent's policyDir),
    /// 3 still pending when the timeout ran out.
    Apply {
        /// Policy file or directory (repeatable).
        #[arg(short = 'f', long = "filename", required = true)]
        files: Vec<PathBuf>,
        /// How long to wait for the kernel to enforce the change (`0s`: do
        /// not wait; exit 3, the agent applies it all the same).
        #[arg(long, default_value = "30s", value_parser = parse_duration)]
        timeout: std::time::Duration,
    },
    /// The policies the running agent enforces.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Remove a policy (`namespace/name`, or `name` for a cluster-wide one)
    /// from the running agent and wait until the kernel no longer enforces
    /// it (exit status as for `apply`). Removing the last policy file leaves
    /// `no-policies.yaml`: an empty policyDir is read as a vanished source.
    Delete {
        name: String,
        #[arg(long, default_value = "30s", value_parser = parse_duration)]
        timeout: std::time::Duration,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Agent {
            config,
            log,
            kubernetes,
            kubeconfig,
            node_name,
        } => {
            tracing_subscriber::fmt()
                .with_env_filter(tracing_subscriber::EnvFilter::try_new(&log).context("--log")?)
                .with_writer(std::io::stderr)
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
                .init();
            let config = palisade::config::Config::load(&config)?;
            let mode = if kubernetes {
                let node_name = match node_name {
                    Some(n) => n,
                    None => hostname().context(
                        "--node-name (or NODE_NAME) is not set and the host name cannot be read",
                    )?,
                };
                palisade::agent::Mode::Kubernetes {
                    kubeconfig,
                    node_name,
                }
            } else {
                palisade::agent::Mode::Host
            };
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?;
            runtime.block_on(palisade::agent::run(config, mode))
        }
        Command::Status { json } => {
            let mut ready = false;
            palisade::control::call(&cli.socket, &Request::Status, |r| {
                let s: StatusReport = ok(r)?;
                ready = s.ready;
                if json {
                    println!("{}", serde_json::to_string_pretty(&s)?);
                } else {
                    print_status(&s);
                }
                Ok(())
            })?;
            if !ready {
                std::process::exit(2);
            }
            Ok(())
        }
        Command::Workloads { json } => {
            palisade::control::call(&cli.socket, &Request::Workloads, |r| {
                let list: Vec<WorkloadStatus> = ok(r)?;
                if json {
                    println!("{}", serde_json::to_string_pretty(&list)?);
                } else {
                    let mut t = table(["WORKLOAD", "IDENTITY", "ADDRESSES", "CGROUP"]);
                    for w in &list {
                        t.add_row([
                            esc(&w.name),
                            w.identity.to_string(),
                            w.addresses.join(","),
                            esc(&w.cgroup),
                        ]);
                    }
                    println!("{t}");
                }
                Ok(())
            })
        }
        Command::Audit {
            follow: _,
            json,
            workload,
            verdict,
        } => palisade::control::call(
            &cli.socket,
            &Request::AuditFollow { workload, verdict },
            |r: Response<AuditRecord>| {
                match r {
                    Response::Ok(e) if json => println!("{}", serde_json::to_string(&e)?),
                    Response::Ok(e) => println!(
                        "{} {:<10} {:<7} {} → {} {}/{}  {} {}",
                        esc(&e.time),
                        word(&e.verdict),
                        word(&e.direction),
                        esc(&e.from),
                        esc(&e.to),
                        esc(&e.protocol),
                        e.port,
                        e.policy
                            .as_deref()
                            .map_or("-".into(), palisade::text::escape),
                        e.rule.as_deref().map_or("".into(), palisade::text::escape)
                    ),
                    Response::Error(m) => eprintln!("warning: {m}"),
                }
                std::io::Write::flush(&mut std::io::stdout())?;
                Ok(())
            },
        ),
        Command::Policy {
            command: PolicyCommand::Apply { files, timeout },
        } => {
            let mut payload = Vec::new();
            for f in &files {
                let paths: Vec<PathBuf> = if f.is_dir() {
                    let mut v: Vec<PathBuf> = std::fs::read_dir(f)
                        .with_context(|| format!("reading {}", f.display()))?
                        .flatten()
                        .map(|e| e.path())
                        .filter(|p| {
                            matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml"))
                        })
                        .collect();
                    v.sort();
                    v
                } else {
                    vec![f.clone()]
                };
                for p in paths {
                    let content = std::fs::read_to_string(&p)
                        .with_context(|| format!("reading {}", p.display()))?;
                    payload.push(palisade::control::PolicyFile {
                        name: p.display().to_string(),
                        content,
                    });
                }
            }
            // Check locally first: the same messages, with the user's paths.
            let paths: Vec<PathBuf> = payload.iter().map(|p| PathBuf::from(&p.name)).collect();
            if let Err(e) = palisade::policy::load_paths(&paths) {
                eprintln!("{e}\nnothing was applied");
                std::process::exit(1);
            }
            let count = payload.len();
            let request = Request::PolicyApply {
                files: payload,
                timeout_ms: timeout.as_millis() as u64,
            };
            palisade::control::call(&cli.socket, &request, |r| {
                let change = settled(r)?;
                println!(
                    "applied {count} file(s); the kernel enforces them (policy generation {})",
                    change.generation
                );
                Ok(())
            })
        }
        Command::Policy {
            command: PolicyCommand::List { json },
        } => palisade::control::call(&cli.socket, &Request::PolicyList, |r| {
            let list: Vec<PolicyStatus> = ok(r)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else {
                let mut t = table(["POLICY", "KIND", "SOURCE"]);
                for p in &list {
                    t.add_row([
                        esc(&p.name),
                        esc(&p.kind),
                        format!("{}:{}", esc(&p.file), p.line),
                    ]);
                }
                println!("{t}");
            }
            Ok(())
        }),
        Command::Policy {
            command: PolicyCommand::Delete { name, timeout },
        } => palisade::control::call(
            &cli.socket,
            &Request::PolicyDelete {
                name: name.clone(),
                timeout_ms: timeout.as_millis() as u64,
            },
            |r| {
                let change = settled(r)?;
                println!(
                    "deleted {name}; the kernel no longer enforces it (policy generation {})",
                    change.generation
                );
                Ok(())
            },
        ),
        Command::Crds => {
            print!("{}", palisade::kubernetes::crd::crds_yaml());
            Ok(())
        }
        Command::Schema { record } => {
            println!(
                "{}",
                match record {
                    SchemaRecord::Audit => palisade::audit::audit_schema(),
                    SchemaRecord::Status => serde_json::to_string_pretty(&schemars::schema_for!(
                        palisade::status::StatusReport
                    ))?,
                }
            );
            Ok(())
        }
        Command::Cleanup { config } => {
            let config = palisade::config::Config::load(&config)?;
            let Some(dir) = config.bpf_pin_dir else {
                println!("pinning is off in this config (bpfPinDir: null): nothing to clean up");
                return Ok(());
            };
            let pins = palisade::datapath::kernel::Pins { dir };
            let removed = palisade::datapath::kernel::cleanup(&pins)?;
            println!(
                "removed {} pins from {}{}",
                removed.len(),
                pins.dir.display(),
                if removed.is_empty() { "" } else { ":" }
            );
            for r in removed {
                println!("  {r}");
            }
            Ok(())
        }
        Command::Explain {
            world,
            policy,
            from,
            to,
            port,
            protocol,
        } => {
            let model = offline_model(&world, &policy)?;
            let probe = palisade::offline::Probe {
                from,
                to,
                port,
                protocol,
            };
            let r = model.answer(&probe).map_err(|m| anyhow::anyhow!(m))?;
            let verdict = if r.allowed { "ALLOWED" } else { "DENIED" };
            println!("{} → {} {}/{}: {verdict}", r.from, r.to, r.protocol, r.port);
            for part in r.reason.split("; ") {
                println!("  {part}");
            }
            Ok(())
        }
        Command::Simulate {
            world,
            policy,
            probes,
            output,
        } => {
            let model = offline_model(&world, &policy)?;
            let probes = palisade::offline::load_probes(&probes)?;
            let results =
                palisade::offline::simulate(&model, &probes).map_err(|m| anyhow::anyhow!(m))?;
            let json = serde_json::to_string_pretty(&results)?;
            match output {
                Some(path) => std::fs::write(&path, json + "\n")
                    .with_context(|| format!("writing {}", path.display()))?,
                None => println!("{json}"),
            }
            Ok(())
        }
        Command::Policy {
            command: PolicyCommand::Check { paths },
        } => match palisade::policy::load_paths(&paths) {
            Ok(set) if set.files.is_empty() => {
                eprintln!(
                    "no policy file (.yaml or .yml) found in {}",
                    paths
                        .iter()
                        .map(|p| p.display().to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                );
                std::process::exit(1);
            }
            Ok(set) => {
                println!(
                    "ok: {} policies in {} files",
                    set.policies.len(),
                    set.files.len()
                );
                Ok(())
            }
            Err(e) => {
                eprintln!("{e}");
                std::process::exit(1);
            }
        },
    }
}

use palisade::{
    audit::AuditRecord,
    control::{PolicyChange, Request, Response},
    status::{PolicyStatus, StatusReport, WorkloadStatus},
};

/// The value of an `ok` response; an `error` response ends the command with exit 1.
/// The kernel's host name (what kubelet names the node by default).
fn hostname() -> anyhow::Result<String> {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname")?;
    let name = name.trim();
    anyhow::ensure!(!name.is_empty(), "the host name is empty");
    Ok(name.to_owned())
}

fn ok<T>(r: Response<T>) -> anyhow::Result<T> {
    match r {
        Response::Ok(v) => Ok(v),
        Response::Error(m) => {
            eprintln!("{m}");
            std::process::exit(1);
        }
    }
}

/// An apply/delete reply: exits 1 when refused, 3 when still pending.
fn settled(r: Response<PolicyChange>) -> anyhow::Result<PolicyChange> {
    let change = ok(r)?;
    if change.pending {
        eprintln!("still pending: {}", change.note.as_deref().unwrap_or(""));
        std::process::exit(3);
    }
    Ok(change)
}

/// `30s`, `500ms`, `2m` or plain seconds.
fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    let (number, unit) = s
        .find(|c: char| !c.is_ascii_digit())
        .map_or((s, "s"), |i| s.split_at(i));
    let n: u64 = number
        .parse()
        .map_err(|_| format!("{s:?}: a duration is a number with ms, s or m (e.g. 30s)"))?;
    match unit {
        "ms" => Ok(std::time::Duration::from_millis(n)),
        "s" => Ok(std::time::Duration::from_secs(n)),
        "m" => Ok(std::time::Duration::from_secs(n * 60)),
        _ => Err(format!("{s:?}: unknown unit {unit:?}; use ms, s or m")),
    }
}

/// A string of a reply, escaped for the terminal (see `palisade::text`).
fn esc(s: &str) -> String {
    palisade::text::escape(s).into_owned()
}

/// A unit enum as its wire name (`would-deny`, `egress`).
fn word<T: serde::Serialize>(v: &T) -> String {
    match serde_json::to_value(v) {
        Ok(serde_json::Value::String(s)) => s,
        _ => "?".into(),
    }
}

/// A borderless table with a header row (no colours: output is often piped).
fn table<const N: usize>(header: [&str; N]) -> comfy_table::Table {
    let mut t = comfy_table::Table::new();
    t.load_preset(comfy_table::presets::NOTHING)
        .set_content_arrangement(comfy_table::ContentArrangement::Disabled)
        .set_header(header);
    t
}

fn print_status(s: &StatusReport) {
    println!(
        "palisade {}  {}",
        s.version,
        if s.ready { "ready" } else { "NOT READY" }
    );
    println!(
        "workloads {}   identities {}   policies {}   policy generation {}   apply errors {}",
        s.workloads, s.identities, s.policies, s.generation, s.apply_errors
    );
    if !s.ready {
        for why in s.not_ready_because() {
            println!("  ! {}", palisade::text::escape(&why));
        }
    }
    if let Some(p) = &s.policy_source_problem {
        println!(
            "  ! {}: the last good policy stays in force",
            palisade::text::escape(p)
        );
    }
    if let Some(p) = &s.cluster_view_problem {
        println!("  ! {}", palisade::text::escape(p));
    }
    for p in &s.refused_policy_objects {
        println!(
            "  ! policy object refused, not enforced: {}",
            palisade::text::escape(p)
        );
    }
    if !s.repairs.is_empty() {
        let list: Vec<String> = s.repairs.iter().map(|(k, n)| format!("{k} {n}")).collect();
        println!("self-check repairs  {}", list.join("   "));
    }
    if let Some(e) = &s.last_error {
        let lines: Vec<String> = e
            .lines()
            .map(|l| palisade::text::escape(l).into_owned())
            .collect();
        println!("last refused change:\n  {}", lines.join("\n  "));
    }
    let c = &s.counters;
    println!(
        "verdicts  egress allow {} deny {} would-deny {}   ingress allow {} deny {} would-deny {}",
        c.egress_allow,
        c.egress_deny,
        c.egress_would_deny,
        c.ingress_allow,
        c.ingress_deny,
        c.ingress_would_deny
    );
    println!(
        "audit     emitted {}   delivered {}   lost {}",
        c.events_emitted, s.events_delivered, c.events_lost
    );
    let mut maps = table(["MAP", "ENTRIES", "CAPACITY", "FILL"]);
    for m in &s.maps {
        maps.add_row([
            m.map.clone(),
            m.entries.to_string(),
            m.capacity.to_string(),
            format!("{:.1}%", m.ratio() * 100.0),
        ]);
    }
    println!("{maps}");
    println!(
        "dropped   forged source {}   source routed {}   unparseable {}   packet sockets refused {}",
        c.forged_source, c.source_routed, c.unparseable, c.packet_sockets_refused
    );
    let p = &s.posture;
    let on = |b: bool| if b { "on" } else { "OFF" };
    println!(
        "protections  socket hooks {}   packet egress {}   packet sockets refused {}",
        on(p.socket_hooks),
        on(p.packet_egress),
        on(p.packet_sockets_refused)
    );
    for gap in &p.gaps {
        println!("  ! {gap}");
    }
    for f in &s.foreign_sockets {
        println!(
            "  ! {} (pid {}) uses a {} socket created outside the cgroup root (cgroup id {}): not judged",
            esc(&f.workload),
            f.pid,
            esc(&f.protocol),
            f.cgroup_id
        );
    }
    println!("attached");
    for a in &s.attach_points {
        println!("  {a}");
    }
}

fn offline_model(
    world: &std::path::Path,
    policy: &[PathBuf],
) -> anyhow::Result<palisade::offline::Model> {
    let world = palisade::offline::WorldFile::load(world)?;
    let policies = palisade::policy::load_paths(policy).map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(palisade::offline::Model::build(&world, &policies))
}
