//! The conformance corpus under `tests/conformance/`: a shared world and one
//! directory per case (`policies/`, `probes.json`, and `expected.json` written
//! by hand from the specification).
use std::path::{Path, PathBuf};

use palisade::offline::{self, ResultFile};

pub fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("conformance")
}

/// Every case directory, in name order.
pub fn cases() -> Vec<PathBuf> {
    let mut cases: Vec<PathBuf> = std::fs::read_dir(dir())
        .map(|rd| {
            rd.flatten()
                .map(|e| e.path())
                .filter(|p| p.is_dir())
                .collect()
        })
        .unwrap_or_default();
    cases.sort();
    cases
}

/// Answers a case's probes offline.
pub fn simulate(case: &Path) -> anyhow::Result<ResultFile> {
    let world = offline::WorldFile::load(&dir().join("world.yaml"))?;
    let policies = palisade::policy::load_paths(&[case.join("policies")])
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let probes = offline::load_probes(&case.join("probes.json"))?;
    offline::simulate(&offline::Model::build(&world, &policies), &probes)
        .map_err(|m| anyhow::anyhow!(m))
}

pub fn expected(case: &Path) -> anyhow::Result<ResultFile> {
    Ok(serde_json::from_str(&std::fs::read_to_string(
        case.join("expected.json"),
    )?)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn simulate_matches_the_hand_written_expectations_of_every_case() {
        let cases = cases();
        assert!(cases.len() >= 20, "corpus has {} cases", cases.len());
        let mut failures = Vec::new();
        for case in &cases {
            let got = simulate(case).unwrap_or_else(|e| panic!("{}: {e:#}", case.display()));
            let want = expected(case).unwrap_or_else(|e| panic!("{}: {e:#}", case.display()));
            assert_eq!(got.results.len(), want.results.len(), "{}", case.display());
            for (g, w) in got.results.iter().zip(&want.results) {
                assert_eq!((&g.from, &g.to, g.port), (&w.from, &w.to, w.port));
                if g.allowed != w.allowed {
                    failures.push(format!(
                        "{}: {} → {} {}/{}: simulate {} ({}), expected {}",
                        case.file_name().unwrap_or_default().to_string_lossy(),
                        g.from,
                        g.to,
                        g.protocol,
                        g.port,
                        g.allowed,
                        g.reason,
                        w.allowed
                    ));
                }
            }
        }
        assert!(failures.is_empty(), "{}", failures.join("\n"));
    }
}
