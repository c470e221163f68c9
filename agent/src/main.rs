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
        /// Log filter, e.g. `info`, `palisade=debug`. Also read from RUST_LOG.
        #[arg(long, default_value = "info", env = "RUST_LOG")]
        log: String,
    },
    /// Remove every pin, link and attachment the agent left (it keeps enforcing
    /// while stopped): detaches Palisade's programs and deletes its pinned maps.
    Cleanup {
        /// Agent configuration (for bpfPinDir).
        #[arg(long, short)]
        config: PathBuf,
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

#[derive(Subcommand)]
enum PolicyCommand {
    /// Validate policy files or directories; print every problem as file:line:column: field: message.
    Check {
        #[arg(required = true)]
        paths: Vec<PathBuf>,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Agent { config, log } => {
            tracing_subscriber::fmt()
                .with_env_filter(tracing_subscriber::EnvFilter::try_new(&log).context("--log")?)
                .with_writer(std::io::stderr)
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
                .init();
            let config = palisade::config::Config::load(&config)?;
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?;
            runtime.block_on(palisade::agent::run(config))
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

fn offline_model(
    world: &std::path::Path,
    policy: &[PathBuf],
) -> anyhow::Result<palisade::offline::Model> {
    let world = palisade::offline::WorldFile::load(world)?;
    let policies = palisade::policy::load_paths(policy).map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(palisade::offline::Model::build(&world, &policies))
}
