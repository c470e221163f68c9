//! `cargo xtask`: the developer's entry point. Set up the machine, build the
//! eBPF object and the agent, run the agent, run every test, run the demo.
//!
//! Only std, clap and anyhow: xtask must build before anything else is installed.
use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    process::{Command, ExitCode},
};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

mod fuzz;
mod vm;

/// The toolchain pinned in rust-toolchain.toml; bpf-linker is built with it.
const TOOLCHAIN: &str = "1.98.0";
/// Debian packages: LLVM 22 for bpf-linker (same major version as rustc's LLVM),
/// and iproute2, procps, util-linux, iptables and nftables for the test world.
const DEBIAN_PACKAGES: &[&str] = &[
    "llvm-22-dev",
    "libpolly-22-dev",
    "libzstd-dev",
    "zlib1g-dev",
    "iproute2",
    // sysctl in the test world's node namespaces; nsenter for an agent inside one.
    "procps",
    "util-linux",
    // The benchmark's comparison points (and the tests' kube-proxy rules and
    // arrival counters), and the chart's font.
    "iptables",
    "nftables",
    "fonts-dejavu-core",
    // The kernel matrix (`cargo xtask vm`): QEMU/KVM, an initramfs shell, the
    // modules' index and loader, xz for compressed modules.
    "qemu-system-x86",
    "busybox-static",
    "kmod",
    "xz-utils",
    // The real-node tests and `cargo xtask image`: a container runtime
    // (podman with runc and netavark; catatonit is its pod's pause process),
    // buildah for the image, musl for the static agent binary.
    "podman",
    "buildah",
    "runc",
    "netavark",
    "catatonit",
    "musl-tools",
    "ca-certificates",
];
/// The agent image's binary: static, for an image with nothing else in it.
const STATIC_TARGET: &str = "x86_64-unknown-linux-musl";
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";

#[derive(Parser)]
#[command(name = "cargo xtask", about = "Build, run and test Palisade.")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what building and testing need: Debian packages (llvm-22-dev, iproute2, …),
    /// the pinned Rust toolchain with rust-src, and bpf-linker. Idempotent; quick when done.
    Setup,
    /// Build the eBPF object and the agent (release), and the test workloads.
    Build,
    /// Build, then run the agent in the foreground with CONFIG (needs root).
    Run {
        /// Agent configuration file.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Set up, build, and run every test: unit tests, the kernel tests (real
    /// programs, real traffic; root), the real-node tests (the agent's image
    /// under podman with the DaemonSet's grants, runtime-made pods on two
    /// nodes; root), the manifests' validation, the kernel
    /// matrix (seed scenario and self-check on Linux 6.1 and 6.12 in VMs) and
    /// a fuzzing smoke run. Under CI=true a kernel test that cannot run
    /// fails. With a filter: only the matching unit and kernel tests.
    Test {
        /// Extra arguments for the test harness (after `--`), e.g. a test name filter.
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Set up, build, and run the payment-service scenario on real workloads (root).
    Demo,
    /// Build the agent's container image locally (root): the static (musl)
    /// agent on scratch, from deploy/image/Containerfile, with buildah into
    /// the system's container storage; no registry needed. The real-node
    /// tests build and run the same image.
    Image {
        /// The image's name and tag.
        #[arg(long, default_value = concat!("localhost/palisade:", env!("CARGO_PKG_VERSION")))]
        tag: String,
    },
    /// Soak (root): the seed scenario for N minutes under policy churn through
    /// the CLI, workload churn, continuous allowed and denied probes and an
    /// audit flood every minute; reports RSS drift, descriptors, threads,
    /// wrong verdicts and audit exactness to target/soak/report.md.
    Soak {
        #[arg(long, default_value_t = 10)]
        minutes: u64,
    },
    /// Fuzz the parsers (cargo-fuzz): policy YAML through validation,
    /// compilation and explain; the agent config; control requests; world
    /// files; audit records. Seeded from policies/ and tests/conformance/; a
    /// crash is kept under fuzz/regressions/ (a unit test replays it) and fails the run.
    Fuzz {
        /// Minutes per target.
        #[arg(long, default_value_t = 2)]
        minutes: u64,
        /// A smoke run: 15 seconds per target (as `cargo xtask test` runs it).
        #[arg(long)]
        smoke: bool,
        /// Only this target.
        #[arg(long)]
        target: Option<String>,
    },
    /// The kernel matrix: boot Debian's kernel package of a series (6.1, 6.12)
    /// in QEMU/KVM with this machine's root shared read-only, and run the
    /// kernel tests inside (root). `host`: the same tests on this kernel.
    /// Example: `cargo xtask vm --kernel 6.1 -- payment_service`.
    Vm {
        /// Kernel series: 6.1, 6.12 (any series apt offers as linux-image-<series>.*-amd64) or host.
        #[arg(long)]
        kernel: String,
        /// Test name filters for the kernel tests (after `--`).
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Benchmarks (root): none / palisade-seed / palisade-10k / iptables-10k /
    /// nftables-10k interleaved, program cost against no-op programs, policy
    /// apply, audit flood, agent memory, a pod event with 5,000 and 50,000
    /// pods. Writes target/bench/report.md, report.json and ratios.png.
    Bench {
        /// A smoke run (5 short rounds, under 2 minutes), as CI runs it.
        #[arg(long)]
        quick: bool,
        /// Only these figures, comma-separated: throughput, programs, apply,
        /// audit, agent, scale, cluster.
        #[arg(long, value_delimiter = ',')]
        only: Vec<String>,
    },
    /// Render the Kubernetes manifests (`kubectl kustomize deploy/`) into
    /// target/deploy/palisade.yaml and validate them, and the example
    /// NetworkPolicies, offline against the Kubernetes schemas
    /// (kubernetes-validate --strict, oldest supported and newest version).
    Manifests,
    /// Real kernel against `palisade simulate`: build the world of a world file as
    /// namespaces and cgroups, run the agent with the policies, try every probe with
    /// real traffic and write the results JSON; `--check` exits non-zero on any
    /// difference. `--corpus tests/conformance --check` runs the whole corpus (root).
    Conformance {
        /// Arguments for palisade-conformance: --world W --policy DIR --probes FILE [--output F] [--check] | --corpus DIR [--check]
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

fn root_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_owned)
        .unwrap_or_default()
}

fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let shown = format!("{cmd:?}");
    let status = cmd.status().with_context(|| format!("starting {shown}"))?;
    if !status.success() {
        bail!("{shown} failed: {status}");
    }
    Ok(())
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

fn step(msg: &str) {
    eprintln!("\x1b[1m==>\x1b[0m {msg}");
}

fn setup() -> anyhow::Result<()> {
    let missing: Vec<&str> = DEBIAN_PACKAGES
        .iter()
        .copied()
        .filter(|p| {
            !Command::new("dpkg-query")
                .args(["-W", "-f=${Status}", p])
                .output()
                .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        })
        .collect();
    if missing.is_empty() {
        step("Debian packages: present");
    } else {
        if !is_root() {
            bail!(
                "missing Debian packages {missing:?}: run `cargo xtask setup` as root, or `sudo apt-get install {}`",
                missing.join(" ")
            );
        }
        step(&format!(
            "installing Debian packages: {}",
            missing.join(" ")
        ));
        run(Command::new("apt-get").arg("update").arg("-q"))?;
        run(Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"))?;
    }

    let installed = Command::new("rustup")
        .args(["component", "list", "--installed", "--toolchain", TOOLCHAIN])
        .output()
        .context("rustup is required: https://rustup.rs")?;
    let list = String::from_utf8_lossy(&installed.stdout);
    if installed.status.success()
        && list.contains("rust-src")
        && list.contains("clippy")
        && list.contains("rustfmt")
    {
        step(&format!(
            "Rust {TOOLCHAIN} with rust-src, clippy, rustfmt: present"
        ));
    } else {
        step(&format!(
            "installing Rust {TOOLCHAIN} with rust-src, clippy, rustfmt"
        ));
        run(Command::new("rustup").args(["toolchain", "install", TOOLCHAIN, "--profile", "minimal", "--component", "rust-src,clippy,rustfmt"]))
            .context("installing the pinned toolchain failed; see ARCHITECTURE.md (Toolchain) for the Debian-only fallback")?;
    }

    let linker_ok = Command::new("bpf-linker")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if linker_ok {
        step("bpf-linker: present");
    } else {
        step("building bpf-linker against LLVM 22 (about a minute)");
        let path = format!(
            "{LLVM_PREFIX}/bin:{}",
            std::env::var("PATH").unwrap_or_default()
        );
        run(Command::new("cargo")
            .args([
                &format!("+{TOOLCHAIN}"),
                "install",
                "bpf-linker",
                "--no-default-features",
                "--features",
                "llvm-22",
                "--locked",
            ])
            .env("LLVM_PREFIX", LLVM_PREFIX)
            .env("PATH", path))?;
    }
    let targets = Command::new("rustup")
        .args(["target", "list", "--installed", "--toolchain", TOOLCHAIN])
        .output()
        .context("rustup target list")?;
    if String::from_utf8_lossy(&targets.stdout).contains(STATIC_TARGET) {
        step(&format!("Rust target {STATIC_TARGET}: present"));
    } else {
        step(&format!(
            "installing the Rust target {STATIC_TARGET} (the image's static agent)"
        ));
        run(Command::new("rustup").args([
            "target",
            "add",
            "--toolchain",
            TOOLCHAIN,
            STATIC_TARGET,
        ]))?;
    }
    fuzz::ensure_cargo_fuzz()?;
    manifest_tools()
}

/// kubectl (for `kubectl kustomize`) and kubernetes-validate (PyPI).
fn manifest_tools() -> anyhow::Result<()> {
    let works = |cmd: &str, arg: &str| {
        Command::new(cmd)
            .arg(arg)
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if works("kubectl", "version") || works("kubectl", "kustomize") || has_kustomize() {
        step("kubectl (kustomize): present");
    } else {
        if !is_root() {
            bail!(
                "kubectl is missing: install Debian's kubernetes-client (`sudo apt-get install kubernetes-client`)"
            );
        }
        step("installing kubectl (Debian kubernetes-client) for `kubectl kustomize`");
        run(Command::new("apt-get")
            .args([
                "install",
                "-y",
                "-q",
                "--no-install-recommends",
                "kubernetes-client",
            ])
            .env("DEBIAN_FRONTEND", "noninteractive"))?;
    }
    if works("kubernetes-validate", "--version") {
        step("kubernetes-validate: present");
    } else {
        step("installing kubernetes-validate (PyPI) for offline manifest validation");
        run(Command::new("python3").args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "kubernetes-validate",
        ]))?;
    }
    Ok(())
}

fn has_kustomize() -> bool {
    Command::new("kubectl")
        .args(["kustomize", "--help"])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Oldest Kubernetes the manifests target (k8s-openapi's v1_33 feature) and
/// the newest kubernetes-validate knows.
const KUBERNETES_VERSIONS: &[&str] = &["1.33.0", "1.37.0"];

fn manifests() -> anyhow::Result<()> {
    let out_dir = root_dir().join("target/deploy");
    std::fs::create_dir_all(&out_dir)?;
    let rendered = out_dir.join("palisade.yaml");
    step("rendering deploy/ with `kubectl kustomize`");
    let out = Command::new("kubectl")
        .current_dir(root_dir())
        .args(["kustomize", "deploy"])
        .output()
        .context("running kubectl kustomize (run `cargo xtask setup`)")?;
    if !out.status.success() {
        bail!(
            "kubectl kustomize deploy failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    std::fs::write(&rendered, &out.stdout)?;
    let text = String::from_utf8_lossy(&out.stdout);
    for kind in [
        "Namespace",
        "CustomResourceDefinition",
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "ConfigMap",
        "DaemonSet",
    ] {
        if !text.lines().any(|l| l == format!("kind: {kind}")) {
            bail!("the rendered manifests have no {kind}");
        }
    }
    let mut files = vec![rendered.clone()];
    for dir in ["policies/kubernetes", "policies/examples"] {
        let mut found: Vec<PathBuf> = std::fs::read_dir(root_dir().join(dir))?
            .flatten()
            .map(|e| e.path())
            .filter(|p| std::fs::read_to_string(p).is_ok_and(|t| t.contains("kind: NetworkPolicy")))
            .collect();
        found.sort();
        files.extend(found);
    }
    for version in KUBERNETES_VERSIONS {
        step(&format!(
            "validating {} file(s) against the Kubernetes {version} schemas (strict)",
            files.len()
        ));
        run(Command::new("kubernetes-validate")
            .args(["--strict", "--quiet", "--no-warn", "-k", version])
            .args(&files))?;
    }
    step(&format!("manifests valid: {}", rendered.display()));
    Ok(())
}

fn build() -> anyhow::Result<()> {
    step("building the eBPF object, the agent and the test workloads (release)");
    run(Command::new("cargo").current_dir(root_dir()).args([
        "build",
        "--release",
        "-p",
        "palisade",
        "-p",
        "palisade-tests",
        "--bins",
    ]))
}

/// The static (musl) agent, the one file of the image.
fn build_static() -> anyhow::Result<PathBuf> {
    step(&format!(
        "building the static agent for the image ({STATIC_TARGET}, release)"
    ));
    run(Command::new("cargo").current_dir(root_dir()).args([
        "build",
        "--release",
        "-p",
        "palisade",
        "--target",
        STATIC_TARGET,
    ]))?;
    Ok(root_dir()
        .join("target")
        .join(STATIC_TARGET)
        .join("release/palisade"))
}

/// Builds the agent's image with buildah from deploy/image/Containerfile
/// (the static binary on scratch) into the local container storage.
fn image(tag: &str) -> anyhow::Result<()> {
    if !is_root() {
        bail!("building the image into the system's container storage needs root (buildah)");
    }
    let binary = build_static()?;
    let context = root_dir().join("target/image");
    std::fs::create_dir_all(&context)?;
    std::fs::copy(&binary, context.join("palisade"))
        .with_context(|| format!("copying {}", binary.display()))?;
    std::fs::copy(
        "/etc/ssl/certs/ca-certificates.crt",
        context.join("ca-certificates.crt"),
    )
    .context("the CA bundle /etc/ssl/certs/ca-certificates.crt (Debian's ca-certificates)")?;
    step(&format!("building the image {tag} (buildah, FROM scratch)"));
    run(Command::new("buildah")
        .args(["bud", "--quiet", "-f"])
        .arg(root_dir().join("deploy/image/Containerfile"))
        .args(["-t", tag])
        .arg(&context))?;
    step(&format!(
        "built {tag} (`podman images`); deploy/kubernetes/daemonset.yaml names the image a cluster pulls from a registry"
    ));
    Ok(())
}

fn release_bin(name: &str) -> PathBuf {
    root_dir().join("target/release").join(name)
}

fn test(args: &[String]) -> anyhow::Result<()> {
    setup()?;
    build()?;
    // The real-node tests build the agent's image from it.
    let static_agent = build_static()?;
    checking_leftovers(|| {
        step("running unit and kernel tests");
        run(Command::new("cargo")
            .current_dir(root_dir())
            // Default members: every crate but the eBPF one, which only builds for the bpf target.
            .args(["test", "--release", "--"])
            .args(args)
            .env("PALISADE_BIN_DIR", root_dir().join("target/release"))
            .env("PALISADE_STATIC_AGENT", &static_agent))?;
        manifests()?;
        if !args.is_empty() {
            return Ok(()); // a filtered run: the matrix and fuzzing are not what was asked for
        }
        // The kernel matrix: loading and attaching, the seed scenario and
        // the self-check on the oldest and newest supported series.
        for kernel in vm::MATRIX {
            vm::vm(kernel, &vm::MATRIX_TESTS.map(str::to_owned))?;
        }
        fuzz::fuzz(15, None)
    })
}

/// Test worlds' network namespaces, cgroups and bpffs pins that exist now.
fn test_artifacts() -> BTreeSet<String> {
    let names = |dir: &Path, keep: &dyn Fn(&str) -> bool, kind: &str| -> Vec<String> {
        std::fs::read_dir(dir)
            .map(|rd| {
                rd.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| keep(n))
                    .map(|n| format!("{kind} {n}"))
                    .collect()
            })
            .unwrap_or_default()
    };
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let cgroup2 = mountinfo.lines().find_map(|l| {
        let (left, right) = l.split_once(" - ")?;
        (right.split_whitespace().next()? == "cgroup2")
            .then(|| left.split_whitespace().nth(4).map(PathBuf::from))?
    });
    let mut all = BTreeSet::new();
    all.extend(names(
        Path::new("/run/netns"),
        &|n| n.starts_with("pal") && n.contains('x'),
        "network namespace",
    ));
    if let Some(mount) = cgroup2 {
        all.extend(names(&mount, &|n| n.starts_with("palisade-"), "cgroup"));
    }
    all.extend(names(
        Path::new("/run/palisade/locks"),
        &|n| n.contains("palisade-test-"),
        "pin lock file",
    ));
    all.extend(names(
        Path::new("/sys/fs/bpf"),
        &|n| n.starts_with("palisade-test-"),
        "bpffs pin directory",
    ));
    // The real-node tests: podman writes every hierarchy of a hybrid layout,
    // and keeps its storage in a temporary directory.
    if let Ok(rd) = std::fs::read_dir("/sys/fs/cgroup") {
        for hierarchy in rd.flatten() {
            let kind = format!("cgroup ({})", hierarchy.file_name().to_string_lossy());
            all.extend(names(
                &hierarchy.path(),
                &|n| n.starts_with("palisade-test-"),
                &kind,
            ));
        }
    }
    all.extend(names(
        &std::env::temp_dir(),
        &|n| n.starts_with("palisade-realnode-"),
        "real-node storage",
    ));
    all
}

/// Runs `f`, then fails when it left a test world's network namespace,
/// cgroup or bpffs pins behind. What existed before (another run still going)
/// is not this run's doing; what killed runs left, the test worlds remove
/// themselves when they start.
fn checking_leftovers(f: impl FnOnce() -> anyhow::Result<()>) -> anyhow::Result<()> {
    let before = test_artifacts();
    f()?;
    let left: Vec<String> = test_artifacts().difference(&before).cloned().collect();
    if !left.is_empty() {
        bail!("tests left things behind: {}", left.join(", "));
    }
    step("nothing left behind (network namespaces, cgroups, bpffs pins)");
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Cmd::Setup => setup(),
        Cmd::Build => setup().and_then(|()| build()),
        Cmd::Run { config } => setup().and_then(|()| build()).and_then(|()| {
            run(Command::new(release_bin("palisade")).arg("agent").arg("--config").arg(config))
        }),
        Cmd::Test { args } => test(&args),
        Cmd::Soak { minutes } => setup().and_then(|()| build()).and_then(|()| {
            if !is_root() {
                bail!("the soak creates network namespaces and cgroups and loads eBPF programs: run it as root");
            }
            checking_leftovers(|| {
                run(Command::new(release_bin("palisade-soak"))
                    .args(["--minutes", &minutes.to_string()])
                    .current_dir(root_dir())
                    .env("PALISADE_BIN_DIR", root_dir().join("target/release")))
            })
        }),
        Cmd::Fuzz {
            minutes,
            smoke,
            target,
        } => setup().and_then(|()| {
            fuzz::fuzz(if smoke { 15 } else { minutes * 60 }, target.as_deref())
        }),
        Cmd::Vm { kernel, args } => setup().and_then(|()| build()).and_then(|()| {
            if !is_root() {
                bail!("the kernel matrix boots VMs with KVM and runs the kernel tests: run it as root");
            }
            checking_leftovers(|| vm::vm(&kernel, &args))
        }),
        Cmd::Image { tag } => setup().and_then(|()| image(&tag)),
        Cmd::Manifests => manifest_tools().and_then(|()| manifests()),
        Cmd::Bench { quick, only } => setup().and_then(|()| build()).and_then(|()| {
            if !is_root() {
                bail!("the benchmark creates network namespaces and cgroups and loads eBPF programs: run it as root");
            }
            let mut cmd = Command::new(release_bin("palisade-bench"));
            if quick {
                cmd.arg("--quick");
            }
            if !only.is_empty() {
                cmd.args(["--only", &only.join(",")]);
            }
            checking_leftovers(|| {
                run(cmd
                    .current_dir(root_dir())
                    .env("PALISADE_BIN_DIR", root_dir().join("target/release")))
            })
        }),
        Cmd::Conformance { args } => setup().and_then(|()| build()).and_then(|()| {
            run(Command::new(release_bin("palisade-conformance"))
                .args(&args)
                .env("PALISADE_BIN_DIR", root_dir().join("target/release")))
        }),
        Cmd::Demo => setup().and_then(|()| build()).and_then(|()| {
            if !is_root() {
                bail!("the demo creates network namespaces and cgroups and loads eBPF programs: run it as root");
            }
            run(Command::new(release_bin("palisade-demo")).env("PALISADE_BIN_DIR", root_dir().join("target/release")))
        }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
