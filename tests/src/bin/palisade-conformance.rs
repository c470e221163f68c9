//! `cargo xtask conformance`: the real kernel against `palisade simulate`.
//!
//! `palisade-conformance --world W --policy DIR... --probes FILE [--output FILE] [--check]`
//! builds the world, runs the agent with the policies, tries every probe with
//! real traffic and writes the results JSON. With `--check` it also answers the
//! probes offline and exits 1 on any difference.
//!
//! `palisade-conformance --corpus DIR [--check]` does the same for every case
//! directory under DIR (each with `policies/`, `probes.json`, `expected.json`,
//! and the shared `DIR/world.yaml`); with `--check` the kernel must match both
//! `expected.json` and simulate.
use std::{path::PathBuf, process::ExitCode};

use anyhow::{Context as _, bail};
use palisade::offline::{self, ProbeFile, ResultFile};
use palisade_tests::conformance;

struct Args {
    world: Option<PathBuf>,
    policies: Vec<PathBuf>,
    probes: Option<PathBuf>,
    output: Option<PathBuf>,
    corpus: Option<PathBuf>,
    check: bool,
}

fn parse() -> anyhow::Result<Args> {
    let mut a = Args {
        world: None,
        policies: Vec::new(),
        probes: None,
        output: None,
        corpus: None,
        check: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = || {
            it.next()
                .map(PathBuf::from)
                .with_context(|| format!("{arg} needs a value"))
        };
        match arg.as_str() {
            "--world" => a.world = Some(value()?),
            "--policy" => a.policies.push(value()?),
            "--probes" => a.probes = Some(value()?),
            "--output" | "-o" => a.output = Some(value()?),
            "--corpus" => a.corpus = Some(value()?),
            "--check" => a.check = true,
            "-h" | "--help" => {
                println!(
                    "usage: palisade-conformance --world W --policy DIR... --probes FILE [--output FILE] [--check]\n       palisade-conformance --corpus DIR [--check]"
                );
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?} (see --help)"),
        }
    }
    Ok(a)
}

fn simulate(
    world: &std::path::Path,
    policies: &[PathBuf],
    probes: &ProbeFile,
) -> anyhow::Result<ResultFile> {
    let w = offline::WorldFile::load(world)?;
    let set = palisade::policy::load_paths(policies).map_err(|e| anyhow::anyhow!("{e}"))?;
    offline::simulate(&offline::Model::build(&w, &set), probes).map_err(|m| anyhow::anyhow!(m))
}

/// Runs one case; returns the number of differences.
fn case(
    world: &std::path::Path,
    policies: &[PathBuf],
    probes_path: &std::path::Path,
    output: Option<&PathBuf>,
    check: bool,
    expected: Option<&std::path::Path>,
) -> anyhow::Result<usize> {
    let probes = offline::load_probes(probes_path)?;
    let start = std::time::Instant::now();
    let kernel = conformance::run(world, policies, &probes)?;
    let json = serde_json::to_string_pretty(&kernel)?;
    match output {
        Some(path) => std::fs::write(path, json + "\n")?,
        None if !check => println!("{json}"),
        None => {}
    }
    let mut diffs = Vec::new();
    if check {
        let offline = simulate(world, policies, &probes)?;
        diffs.extend(conformance::differences(&kernel, &offline));
        if let Some(expected) = expected {
            let text = std::fs::read_to_string(expected)
                .with_context(|| format!("reading {}", expected.display()))?;
            let want: ResultFile = serde_json::from_str(&text)
                .with_context(|| format!("parsing {}", expected.display()))?;
            diffs.extend(
                conformance::differences(&kernel, &want)
                    .into_iter()
                    .map(|d| d.replace("simulate", "expected")),
            );
            if want.results.len() != kernel.results.len() {
                diffs.push(format!(
                    "{} has {} results for {} probes",
                    expected.display(),
                    want.results.len(),
                    kernel.results.len()
                ));
            }
        }
    }
    eprintln!(
        "  {} probes in {:.1} s, {} differences",
        kernel.results.len(),
        start.elapsed().as_secs_f64(),
        diffs.len()
    );
    for d in &diffs {
        eprintln!("    ✗ {d}");
    }
    Ok(diffs.len())
}

fn main() -> ExitCode {
    let result = (|| -> anyhow::Result<usize> {
        let a = parse()?;
        palisade_tests::can_run_kernel_tests().map_err(|m| anyhow::anyhow!(m))?;
        if let Some(corpus) = &a.corpus {
            let world = corpus.join("world.yaml");
            let mut cases: Vec<PathBuf> = std::fs::read_dir(corpus)?
                .flatten()
                .map(|e| e.path())
                .filter(|p| p.is_dir())
                .collect();
            cases.sort();
            let mut total = 0;
            for c in &cases {
                eprintln!("{}", c.file_name().unwrap_or_default().to_string_lossy());
                total += case(
                    &world,
                    &[c.join("policies")],
                    &c.join("probes.json"),
                    None,
                    a.check,
                    Some(&c.join("expected.json")),
                )?;
            }
            eprintln!("{} cases, {total} differences", cases.len());
            return Ok(total);
        }
        let world = a.world.context("--world is required")?;
        let probes = a.probes.context("--probes is required")?;
        if a.policies.is_empty() {
            bail!("--policy is required");
        }
        case(
            &world,
            &a.policies,
            &probes,
            a.output.as_ref(),
            a.check,
            None,
        )
    })();
    match result {
        Ok(0) => ExitCode::SUCCESS,
        Ok(_) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("conformance: {e:#}");
            ExitCode::FAILURE
        }
    }
}
