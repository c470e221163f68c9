//! Palisade's test world and scenario, shared by the kernel tests
//! (`tests/kernel/`) and `cargo xtask demo`.
//!
//! Rules the world keeps (see DESIGN.md, "Testing for real"): programs attach
//! only under a cgroup subtree it creates; addresses exist only inside network
//! namespaces it creates, joined by a bridge with no route out; everything it
//! makes is removed on drop, also when a test fails.
pub mod agent;
pub mod attack;
pub mod bench;
pub mod conformance;
pub mod corpus;
pub mod kubeapi;
pub mod kubeproxy;
pub mod realnode;
pub mod scenario;
pub mod world;

use std::path::PathBuf;

/// Where the built binaries are: `PALISADE_BIN_DIR`, or the workspace's
/// `target/release` (what `cargo xtask build` produces).
pub fn bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("PALISADE_BIN_DIR") {
        return PathBuf::from(dir);
    }
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/release")
}

/// Whether this process may build worlds (root, cgroup2, `ip`).
pub fn can_run_kernel_tests() -> Result<(), String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err("kernel tests need root (they create network namespaces, cgroups and load eBPF programs)".into());
    }
    for bin in ["palisade", "palisade-testbed"] {
        let path = bin_dir().join(bin);
        if !path.exists() {
            return Err(format!(
                "{} is missing: run `cargo xtask build` first",
                path.display()
            ));
        }
    }
    if std::process::Command::new("ip").arg("-V").output().is_err() {
        return Err("`ip` (iproute2) is missing: run `cargo xtask setup`".into());
    }
    Ok(())
}

/// Every event is a `palisade::audit::AuditRecord` (the type whose schema
/// `palisade schema audit` prints): it deserializes with no unknown field and
/// no missing one, and serializes back to the same JSON.
pub fn assert_audit_records(events: &[serde_json::Value]) {
    assert!(!events.is_empty(), "no audit events to check");
    for ev in events {
        let record: palisade::audit::AuditRecord = serde_json::from_value(ev.clone())
            .unwrap_or_else(|e| panic!("an audit event is not an AuditRecord ({e}): {ev}"));
        assert_eq!(
            &serde_json::to_value(&record).unwrap_or_default(),
            ev,
            "an audit event does not read back unchanged"
        );
    }
}

/// GET `path` from the agent's HTTP endpoint at `addr`, as kubelet's probes
/// and Prometheus do: (status line, body).
pub fn http_get(addr: std::net::SocketAddr, path: &str) -> anyhow::Result<(String, String)> {
    use std::io::{Read as _, Write as _};
    let timeout = std::time::Duration::from_secs(2);
    let mut s = std::net::TcpStream::connect_timeout(&addr, timeout)?;
    s.set_read_timeout(Some(timeout))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    Ok((
        head.lines().next().unwrap_or("").to_owned(),
        body.to_owned(),
    ))
}
