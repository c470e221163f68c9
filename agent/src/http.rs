//! Health and metrics over HTTP (for DaemonSet probes and Prometheus):
//! `GET /healthz` (alive), `GET /readyz` (the kernel enforces the policy
//! the agent says it does; 503 says why not), `GET /metrics` (Prometheus text format). A deliberately tiny
//! HTTP/1.1 responder: one request per connection, GET only.
use std::{
    fmt::Write as _,
    sync::{Arc, Mutex},
};

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use crate::datapath::Counters;

/// What the agent reports, refreshed by its loop.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Status {
    pub version: &'static str,
    pub attach_points: Vec<String>,
    pub workload_list: Vec<WorkloadStatus>,
    pub policy_list: Vec<PolicyStatus>,
    /// Programs attached and the first policy sync done.
    pub ready: bool,
    /// Successful applies of a changed state.
    pub generation: u64,
    /// Policy or state changes refused (invalid policy, map full, …).
    pub apply_errors: u64,
    pub last_error: Option<String>,
    pub workloads: usize,
    pub identities: usize,
    pub policies: usize,
    pub counters: Counters,
    /// (map, entries, capacity)
    pub maps: Vec<(&'static str, usize, u32)>,
    /// Which protections are active on this node.
    pub posture: crate::datapath::kernel::Posture,
    /// Sockets workloads use that were created outside the root (not judged).
    pub foreign_sockets: Vec<crate::sockets::ForeignSocket>,
    /// Audit events delivered, read just before `counters` (so that
    /// delivered + lost never exceeds emitted in one report).
    pub events_delivered: u64,
    /// A state was applied at least once.
    pub applied: bool,
    /// The kernel does not hold the planned state: it was refused (the
    /// previous one stays) or is part way there (retried).
    pub behind: Option<String>,
    /// Why the kernel does not enforce what the agent says (self-check),
    /// or why nothing is applied yet.
    pub enforcement_problems: Vec<String>,
    /// Repairs of the kernel state by the self-check, by kind.
    pub repairs: std::collections::BTreeMap<&'static str, u64>,
    /// The policy directory vanished, turned empty or unreadable: the last
    /// good policy stays in force.
    pub policy_source_problem: Option<String>,
    /// Policy-directory changes seen (loads tried), the last one loaded,
    /// the last one whose policy is in the kernel, and the last one refused.
    pub policy_revision: u64,
    pub policy_revision_loaded: u64,
    pub policy_revision_applied: u64,
    pub policy_revision_refused: u64,
}

impl Status {
    /// Why the agent is not ready (empty: ready). Ready means the kernel
    /// enforces the policy the agent says it does.
    pub fn not_ready_because(&self) -> Vec<String> {
        let mut why = self.enforcement_problems.clone();
        if self.applied
            && let Some(b) = &self.behind
        {
            why.push(b.clone());
        }
        if !self.applied {
            why.push(match &self.last_error {
                Some(e) => format!("nothing applied yet: {e}"),
                None => "programs not attached or policy not synced yet".to_owned(),
            });
        }
        why
    }

    /// Sets `ready` from the rest.
    pub fn update_ready(&mut self) {
        self.ready = self.not_ready_because().is_empty();
    }
}

#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct WorkloadStatus {
    pub name: String,
    pub cgroup: String,
    pub identity: u32,
    pub addresses: Vec<String>,
}

#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct PolicyStatus {
    pub name: String,
    pub kind: &'static str,
    pub file: String,
    pub line: usize,
}

pub type SharedStatus = Arc<Mutex<Status>>;

/// The Prometheus text exposition of `status`.
pub fn render_metrics(status: &Status) -> String {
    let mut out = String::new();
    let c = &status.counters;
    let _ = writeln!(
        out,
        "# HELP palisade_verdicts_total Connections judged by the kernel programs."
    );
    let _ = writeln!(out, "# TYPE palisade_verdicts_total counter");
    for (dir, verdict, v) in [
        ("egress", "allow", c.egress_allow),
        ("egress", "deny", c.egress_deny),
        ("egress", "would-deny", c.egress_would_deny),
        ("ingress", "allow", c.ingress_allow),
        ("ingress", "deny", c.ingress_deny),
        ("ingress", "would-deny", c.ingress_would_deny),
    ] {
        let _ = writeln!(
            out,
            "palisade_verdicts_total{{direction=\"{dir}\",verdict=\"{verdict}\"}} {v}"
        );
    }
    let _ = writeln!(
        out,
        "# HELP palisade_foreign_sockets Sockets in use by workloads that were created outside the cgroup root (not judged).\n# TYPE palisade_foreign_sockets gauge\npalisade_foreign_sockets {}",
        status.foreign_sockets.len()
    );
    let delivered = status.events_delivered;
    let _ = writeln!(
        out,
        "# HELP palisade_repairs_total Kernel state the self-check found wrong and repaired (attachment, link-pin, map-pin, state, table, adoption).\n# TYPE palisade_repairs_total counter"
    );
    for (what, n) in &status.repairs {
        let _ = writeln!(out, "palisade_repairs_total{{what=\"{what}\"}} {n}");
    }
    for (name, help, v) in [
        (
            "palisade_audit_events_emitted_total",
            "Audit events the kernel tried to write.",
            c.events_emitted,
        ),
        (
            "palisade_audit_events_lost_total",
            "Audit events dropped because the ring buffer was full.",
            c.events_lost,
        ),
        (
            "palisade_audit_events_delivered_total",
            "Audit events written to the audit output.",
            delivered,
        ),
        (
            "palisade_policy_apply_errors_total",
            "Changes refused; the previous state stayed in force.",
            status.apply_errors,
        ),
        (
            "palisade_packets_unparseable_total",
            "Packets of enforced workloads that could not be parsed (dropped).",
            c.unparseable,
        ),
        (
            "palisade_packets_forged_source_total",
            "Packets leaving a workload with a source address not its own (dropped).",
            c.forged_source,
        ),
        (
            "palisade_packets_source_routed_total",
            "Packets leaving a workload with a source route (dropped).",
            c.source_routed,
        ),
        (
            "palisade_packet_sockets_refused_total",
            "Packet (AF_PACKET) sockets refused to workloads.",
            c.packet_sockets_refused,
        ),
    ] {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}"
        );
    }
    for (name, help, v) in [
        (
            "palisade_policy_generation",
            "Number of state changes applied.",
            status.generation as f64,
        ),
        (
            "palisade_workloads",
            "Workloads found below the cgroup root.",
            status.workloads as f64,
        ),
        (
            "palisade_identities",
            "Identities in use.",
            status.identities as f64,
        ),
        (
            "palisade_policies",
            "Policies loaded.",
            status.policies as f64,
        ),
        (
            "palisade_ready",
            "1 while the kernel enforces the policy the agent says it does.",
            f64::from(u8::from(status.ready)),
        ),
        (
            "palisade_policy_source_problem",
            "1 while the policy directory is missing, empty or unreadable (the last good policy stays).",
            f64::from(u8::from(status.policy_source_problem.is_some())),
        ),
        (
            "palisade_enforcement_problems",
            "Mismatches between the kernel and the agent's state that could not be repaired.",
            status.enforcement_problems.len() as f64,
        ),
    ] {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
    }
    let _ = writeln!(
        out,
        "# HELP palisade_map_entries Entries in each kernel map.\n# TYPE palisade_map_entries gauge"
    );
    for (map, entries, _) in &status.maps {
        let _ = writeln!(out, "palisade_map_entries{{map=\"{map}\"}} {entries}");
    }
    let _ = writeln!(
        out,
        "# HELP palisade_map_capacity Capacity of each kernel map.\n# TYPE palisade_map_capacity gauge"
    );
    for (map, _, capacity) in &status.maps {
        let _ = writeln!(out, "palisade_map_capacity{{map=\"{map}\"}} {capacity}");
    }
    let _ = writeln!(
        out,
        "# HELP palisade_map_fill_ratio Entries / capacity of each kernel map.\n# TYPE palisade_map_fill_ratio gauge"
    );
    for (map, entries, capacity) in &status.maps {
        let ratio = *entries as f64 / f64::from((*capacity).max(1));
        let _ = writeln!(out, "palisade_map_fill_ratio{{map=\"{map}\"}} {ratio}");
    }
    out
}

/// Serves until the task is dropped.
pub async fn serve(listener: tokio::net::TcpListener, status: SharedStatus) {
    loop {
        let Ok((mut stream, _)) = listener.accept().await else {
            continue;
        };
        let status = status.clone();
        tokio::spawn(async move {
            let mut buf = [0u8; 2048];
            let mut len = 0;
            // Read the request head (bounded), with a deadline.
            let read = tokio::time::timeout(std::time::Duration::from_secs(2), async {
                while len < buf.len() {
                    match stream.read(&mut buf[len..]).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => len += n,
                    }
                    if buf[..len].windows(4).any(|w| w == b"\r\n\r\n") {
                        break;
                    }
                }
            })
            .await;
            if read.is_err() {
                return;
            }
            let head = String::from_utf8_lossy(&buf[..len]);
            let mut words = head.split_whitespace();
            let (method, path) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
            let snapshot = status.lock().map(|s| s.clone()).unwrap_or_default();
            let (code, body, kind) = match (method, path) {
                ("GET", "/healthz") => ("200 OK", "ok\n".to_owned(), "text/plain"),
                ("GET", "/readyz") if snapshot.ready => {
                    ("200 OK", "ready\n".to_owned(), "text/plain")
                }
                ("GET", "/readyz") => (
                    "503 Service Unavailable",
                    format!("not ready: {}\n", snapshot.not_ready_because().join("; ")),
                    "text/plain",
                ),
                ("GET", "/metrics") => (
                    "200 OK",
                    render_metrics(&snapshot),
                    "text/plain; version=0.0.4",
                ),
                ("GET", _) => (
                    "404 Not Found",
                    "try /healthz, /readyz or /metrics\n".to_owned(),
                    "text/plain",
                ),
                _ => (
                    "405 Method Not Allowed",
                    "GET only\n".to_owned(),
                    "text/plain",
                ),
            };
            let response = format!(
                "HTTP/1.1 {code}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = stream.write_all(response.as_bytes()).await;
            let _ = stream.shutdown().await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_are_prometheus_text() {
        let status = Status {
            ready: true,
            generation: 3,
            counters: Counters {
                ingress_deny: 7,
                events_emitted: 9,
                events_lost: 2,
                ..Default::default()
            },
            maps: vec![("PAL_POLICY_V1", 64, 256)],
            events_delivered: 7,
            ..Default::default()
        };
        let text = render_metrics(&status);
        for line in [
            "palisade_verdicts_total{direction=\"ingress\",verdict=\"deny\"} 7",
            "palisade_audit_events_emitted_total 9",
            "palisade_audit_events_lost_total 2",
            "palisade_audit_events_delivered_total 7",
            "palisade_map_fill_ratio{map=\"PAL_POLICY_V1\"} 0.25",
            "palisade_ready 1",
            "palisade_policy_generation 3",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line}:\n{text}");
        }
        // Every sample line is `name{labels} value` or `name value`.
        for l in text.lines().filter(|l| !l.starts_with('#')) {
            let (_, value) = l.rsplit_once(' ').unwrap();
            assert!(value.parse::<f64>().is_ok(), "{l}");
        }
    }
}
