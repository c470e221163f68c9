//! `cargo xtask fuzz`: runs the cargo-fuzz targets under fuzz/ (policy YAML
//! through validation, compilation and explain; the agent config; control
//! requests; world files; audit records), each seeded from the repository's
//! own files. A crash is copied to fuzz/regressions/<target>/, where a unit
//! test replays it from then on, and the run fails naming the file.
use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

use crate::{root_dir, run, step};

pub const TARGETS: &[&str] = &[
    "policy_yaml",
    "agent_config",
    "control_request",
    "world_file",
    "audit_record",
];

/// Files under `dir` (recursively) whose name ends with one of `suffixes`.
fn files(dir: &Path, suffixes: &[&str], out: &mut Vec<PathBuf>) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd.flatten() {
        let p = e.path();
        if p.is_dir() {
            files(&p, suffixes, out);
        } else if suffixes.iter().any(|s| p.to_string_lossy().ends_with(s)) {
            out.push(p);
        }
    }
}

/// fuzz/corpus/<target>, seeded from the repository (once per file name).
fn seed(target: &str) -> anyhow::Result<PathBuf> {
    let root = root_dir();
    let corpus = root.join("fuzz/corpus").join(target);
    std::fs::create_dir_all(&corpus)?;
    let mut seeds = Vec::new();
    match target {
        "policy_yaml" => {
            files(&root.join("policies"), &[".yaml"], &mut seeds);
            files(&root.join("tests/conformance"), &[".yaml"], &mut seeds);
            seeds.retain(|p| !p.ends_with("world.yaml"));
        }
        "agent_config" => {
            files(
                &root.join("deploy"),
                &["agent.yaml", "config.yaml"],
                &mut seeds,
            );
        }
        "world_file" => files(&root.join("tests/conformance"), &["world.yaml"], &mut seeds),
        _ => {}
    }
    for (i, s) in seeds.iter().enumerate() {
        std::fs::copy(s, corpus.join(format!("seed-{i}")))?;
    }
    let fixed: &[&[u8]] = match target {
        "control_request" => &[
            b"{\"cmd\":\"status\"}",
            b"{\"cmd\":\"policy-apply\",\"files\":[{\"name\":\"a.yaml\",\"content\":\"x\"}],\"timeout_ms\":100}",
            b"{\"cmd\":\"policy-delete\",\"name\":\"ns/p\"}",
            b"{\"cmd\":\"audit-follow\",\"workload\":\"ns/w\",\"verdict\":\"deny\"}",
        ],
        "audit_record" => &[&[0u8; 128], &[0xffu8; 128]],
        _ => &[],
    };
    for (i, s) in fixed.iter().enumerate() {
        std::fs::write(corpus.join(format!("fixed-{i}")), s)?;
    }
    Ok(corpus)
}

/// Runs each target (or `only`) for `seconds`.
pub fn fuzz(seconds: u64, only: Option<&str>) -> anyhow::Result<()> {
    let root = root_dir();
    let targets: Vec<&str> = match only {
        Some(t) if TARGETS.contains(&t) => vec![t],
        Some(t) => bail!("no fuzz target {t:?}; the targets: {}", TARGETS.join(", ")),
        None => TARGETS.to_vec(),
    };
    for target in targets {
        let corpus = seed(target)?;
        let artifacts = root.join("fuzz/artifacts").join(target);
        let _ = std::fs::remove_dir_all(&artifacts);
        std::fs::create_dir_all(&artifacts)?;
        step(&format!("fuzzing {target} for {seconds} s"));
        let status = Command::new("cargo")
            .current_dir(&root)
            // cargo-fuzz's instrumentation flags need unstable options; the
            // pinned toolchain allows them as for the eBPF build.
            .env("RUSTC_BOOTSTRAP", "1")
            .args(["fuzz", "run", target, "--sanitizer", "none", "--release"])
            .arg(&corpus)
            .arg("--")
            .arg(format!("-max_total_time={seconds}"))
            .args(["-rss_limit_mb=4096", "-max_len=262144", "-timeout=20"])
            .arg(format!("-artifact_prefix={}/", artifacts.display()))
            .status()
            .context("cargo fuzz (cargo-fuzz; `cargo xtask setup` installs it)")?;
        if !status.success() {
            let regressions = root.join("fuzz/regressions").join(target);
            std::fs::create_dir_all(&regressions)?;
            let mut kept = Vec::new();
            for e in std::fs::read_dir(&artifacts)?.flatten() {
                let to = regressions.join(e.file_name());
                std::fs::copy(e.path(), &to)?;
                kept.push(to.display().to_string());
            }
            bail!(
                "fuzz target {target} crashed; the input is kept as a regression test: {} (replayed by `cargo test -p palisade fuzz_regressions`)",
                kept.join(", ")
            );
        }
    }
    step("fuzzing found no crash");
    Ok(())
}

/// Installs cargo-fuzz when missing.
pub fn ensure_cargo_fuzz() -> anyhow::Result<()> {
    let ok = Command::new("cargo")
        .args(["fuzz", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if ok {
        step("cargo-fuzz: present");
        return Ok(());
    }
    step("installing cargo-fuzz (about a minute)");
    run(Command::new("cargo").args(["install", "cargo-fuzz", "--locked"]))
}
