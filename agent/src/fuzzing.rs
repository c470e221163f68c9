//! The fuzz targets' entry points (`fuzz/`, `cargo xtask fuzz`). They live in
//! the library so that every crash kept under `fuzz/regressions/<target>/`
//! replays as a unit test on stable Rust. Each takes arbitrary bytes and must
//! return without panicking, whatever they are.
use std::{path::Path, time::Duration};

use crate::{
    audit, config, control, offline,
    policy::{self, PolicySet},
};

/// A target: arbitrary bytes in, no panic out.
pub type Target = fn(&[u8]);

/// The targets, by name (as under fuzz/fuzz_targets and fuzz/regressions).
pub const TARGETS: &[(&str, Target)] = &[
    ("policy_yaml", policy_yaml),
    ("agent_config", agent_config),
    ("control_request", control_request),
    ("world_file", world_file),
    ("audit_record", audit_record),
];

/// A small world for compiling fuzzed policies: two namespaces, four pods.
const WORLD: &str = "namespaces:\n- {name: production, labels: {env: prod}}\n- {name: monitoring}\n\
pods:\n\
- {namespace: production, name: web, labels: {app: web}, ip: 10.0.0.1, ports: [{name: http, port: 8080}]}\n\
- {namespace: production, name: db, labels: {app: db}, ip: 10.0.0.2}\n\
- {namespace: monitoring, name: prom, labels: {app: prom}, ip: 10.0.0.3}\n\
- {namespace: default, name: x, labels: {}, ip: 'fd00::4'}\n";

/// Policy YAML through validation, compilation and `explain`'s model.
pub fn policy_yaml(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(policies) = policy::load::parse_str("fuzz.yaml", text) else {
        return;
    };
    let Ok(world) = crate::yaml::from_str::<offline::WorldFile>(WORLD) else {
        return;
    };
    let set = PolicySet {
        policies: policies.into_iter().map(std::sync::Arc::new).collect(),
        files: Vec::new(),
    };
    let model = offline::Model::build(&world, &set);
    for (from, to) in [
        ("production/web", "production/db"),
        ("monitoring/prom", "production/web"),
    ] {
        for (port, protocol) in [(8080, "TCP"), (53, "UDP"), (1, "SCTP")] {
            let _ = model.answer(&offline::Probe {
                from: from.into(),
                to: to.into(),
                port,
                protocol: protocol.into(),
            });
        }
    }
}

/// The agent's config file.
pub fn agent_config(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = config::Config::parse(Path::new("fuzz.yaml"), text);
    }
}

/// One control-socket request line.
pub fn control_request(data: &[u8]) {
    let _ = serde_json::from_slice::<control::Request>(data);
}

/// A world file, built into the offline model.
pub fn world_file(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(world) = crate::yaml::from_str::<offline::WorldFile>(text) {
        let _ = offline::Model::build(&world, &PolicySet::default());
    }
}

/// A ring-buffer record, decoded and rendered as the audit log's JSON.
pub fn audit_record(data: &[u8]) {
    if let Some(ev) = crate::datapath::decode_audit_event(data) {
        let _ = audit::render(&ev, &audit::Snapshot::default(), Duration::ZERO);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every input a fuzzer once crashed a target with, kept under
    /// fuzz/regressions/<target>/, runs through the target again.
    #[test]
    fn fuzz_regressions_replay_without_a_panic() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/regressions");
        let mut replayed = 0;
        for (name, target) in TARGETS {
            let Ok(entries) = std::fs::read_dir(root.join(name)) else {
                continue;
            };
            for e in entries.flatten() {
                let data = std::fs::read(e.path()).unwrap();
                target(&data);
                replayed += 1;
            }
        }
        // The seeds that found the first bugs are kept even when fixed.
        assert!(
            replayed > 0,
            "no regression inputs under {}",
            root.display()
        );
    }

    #[test]
    fn the_targets_take_their_seeds() {
        let policies = Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies/kubernetes");
        for e in std::fs::read_dir(policies).unwrap().flatten() {
            policy_yaml(&std::fs::read(e.path()).unwrap());
        }
        world_file(WORLD.as_bytes());
        audit_record(&[0u8; 256]);
        control_request(b"{\"cmd\":\"status\"}");
    }
}
