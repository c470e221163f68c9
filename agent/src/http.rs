//! Health and metrics over HTTP (for DaemonSet probes and Prometheus), with
//! axum: `GET /healthz` (alive), `GET /readyz` (the kernel enforces the
//! policy the agent says it does; 503 says why not), `GET /metrics`
//! (OpenMetrics text from prometheus-client, built from one status report).
use axum::{
    Router,
    extract::State,
    http::{StatusCode, header},
    response::IntoResponse,
    routing::get,
};
use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

use crate::status::{SharedStatus, StatusReport};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VerdictLabels {
    direction: &'static str,
    verdict: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MapLabels {
    map: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RepairLabels {
    what: String,
}

fn counter(registry: &mut Registry, name: &str, help: &str, value: u64) {
    let c = Counter::<u64>::default();
    c.inc_by(value);
    registry.register(name, help, c);
}

fn gauge(registry: &mut Registry, name: &str, help: &str, value: u64) {
    let g = Gauge::<i64>::default();
    g.set(i64::try_from(value).unwrap_or(i64::MAX));
    registry.register(name, help, g);
}

/// The metrics of one status report (a registry per scrape: every value is
/// the report's, read together).
fn registry(status: &StatusReport) -> Registry {
    let mut r = Registry::default();
    let c = &status.counters;
    let verdicts = Family::<VerdictLabels, Counter>::default();
    for (direction, verdict, v) in [
        ("egress", "allow", c.egress_allow),
        ("egress", "deny", c.egress_deny),
        ("egress", "would-deny", c.egress_would_deny),
        ("ingress", "allow", c.ingress_allow),
        ("ingress", "deny", c.ingress_deny),
        ("ingress", "would-deny", c.ingress_would_deny),
    ] {
        verdicts
            .get_or_create(&VerdictLabels { direction, verdict })
            .inc_by(v);
    }
    r.register(
        "palisade_verdicts",
        "Connections judged by the kernel programs.",
        verdicts,
    );
    for (name, help, v) in [
        (
            "palisade_audit_events_emitted",
            "Audit events the kernel tried to write.",
            c.events_emitted,
        ),
        (
            "palisade_audit_events_lost",
            "Audit events dropped because the ring buffer was full.",
            c.events_lost,
        ),
        (
            "palisade_audit_events_delivered",
            "Audit events written to the audit output.",
            status.events_delivered,
        ),
        (
            "palisade_policy_apply_errors",
            "Changes refused; the previous state stayed in force.",
            status.apply_errors,
        ),
        (
            "palisade_packets_unparseable",
            "Packets of enforced workloads that could not be parsed (dropped).",
            c.unparseable,
        ),
        (
            "palisade_packets_forged_source",
            "Packets leaving a workload with a source address not its own (dropped).",
            c.forged_source,
        ),
        (
            "palisade_packets_source_routed",
            "Packets leaving a workload with a source route (dropped).",
            c.source_routed,
        ),
        (
            "palisade_packet_sockets_refused",
            "Packet (AF_PACKET) sockets refused to workloads.",
            c.packet_sockets_refused,
        ),
    ] {
        counter(&mut r, name, help, v);
    }
    let repairs = Family::<RepairLabels, Counter>::default();
    for (what, n) in &status.repairs {
        repairs
            .get_or_create(&RepairLabels { what: what.clone() })
            .inc_by(*n);
    }
    r.register(
        "palisade_repairs",
        "Kernel state the self-check found wrong and repaired (attachment, link-pin, map-pin, state, table, adoption).",
        repairs,
    );
    for (name, help, v) in [
        (
            "palisade_policy_generation",
            "Number of state changes applied.",
            status.generation,
        ),
        (
            "palisade_workloads",
            "Workloads found below the cgroup root.",
            status.workloads as u64,
        ),
        (
            "palisade_identities",
            "Identities in use.",
            status.identities as u64,
        ),
        (
            "palisade_policies",
            "Policies loaded.",
            status.policies as u64,
        ),
        (
            "palisade_ready",
            "1 while the kernel enforces the policy the agent says it does.",
            u64::from(status.ready),
        ),
        (
            "palisade_policy_source_problem",
            "1 while the policy directory is missing, empty or unreadable (the last good policy stays).",
            u64::from(status.policy_source_problem.is_some()),
        ),
        (
            "palisade_cluster_view_stale",
            "1 while the API server has not answered for 10 s or more (the kernel keeps enforcing the last view).",
            u64::from(status.cluster_view_problem.is_some()),
        ),
        (
            "palisade_policy_objects_refused",
            "Policy objects from the API server the agent refused (not enforced anywhere; `palisade status` names them and why).",
            status.refused_policy_objects.len() as u64,
        ),
        (
            "palisade_local_pods_unmatched",
            "Pods on this node whose cgroup is not found under the root for 5 s or more (not enforced; the node is not ready).",
            status.unmatched_local_pods.len() as u64,
        ),
        (
            "palisade_enforcement_problems",
            "Mismatches between the kernel and the agent's state that could not be repaired.",
            status.enforcement_problems.len() as u64,
        ),
        (
            "palisade_foreign_sockets",
            "Sockets in use by workloads that were created outside the cgroup root (not judged).",
            status.foreign_sockets.len() as u64,
        ),
    ] {
        gauge(&mut r, name, help, v);
    }
    let entries = Family::<MapLabels, Gauge>::default();
    let capacity = Family::<MapLabels, Gauge>::default();
    let ratio = Family::<MapLabels, Gauge<f64, std::sync::atomic::AtomicU64>>::default();
    for m in &status.maps {
        let labels = MapLabels { map: m.map.clone() };
        entries
            .get_or_create(&labels)
            .set(i64::try_from(m.entries).unwrap_or(i64::MAX));
        capacity.get_or_create(&labels).set(i64::from(m.capacity));
        ratio.get_or_create(&labels).set(m.ratio());
    }
    r.register(
        "palisade_map_entries",
        "Entries in each kernel map.",
        entries,
    );
    r.register(
        "palisade_map_capacity",
        "Capacity of each kernel map.",
        capacity,
    );
    r.register(
        "palisade_map_fill_ratio",
        "Entries / capacity of each kernel map.",
        ratio,
    );
    r
}

/// The OpenMetrics text of `status`.
pub fn render_metrics(status: &StatusReport) -> String {
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = encode(&mut out, &registry(status));
    out
}

fn snapshot(status: &SharedStatus) -> StatusReport {
    status.lock().map(|s| s.clone()).unwrap_or_default()
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(status): State<SharedStatus>) -> (StatusCode, String) {
    let s = snapshot(&status);
    if s.ready {
        (StatusCode::OK, "ready\n".to_owned())
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {}\n", s.not_ready_because().join("; ")),
        )
    }
}

async fn metrics(State(status): State<SharedStatus>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        render_metrics(&snapshot(&status)),
    )
}

async fn not_found() -> (StatusCode, &'static str) {
    (StatusCode::NOT_FOUND, "try /healthz, /readyz or /metrics\n")
}

/// The routes, over the shared status.
pub fn router(status: SharedStatus) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .with_state(status)
}

/// Serves until the task is dropped.
pub async fn serve(listener: tokio::net::TcpListener, status: SharedStatus) {
    if let Err(e) = axum::serve(listener, router(status)).await {
        tracing::warn!("the HTTP server stopped: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_are_prometheus_text() {
        let status = StatusReport {
            ready: true,
            generation: 3,
            counters: crate::datapath::Counters {
                ingress_deny: 7,
                events_emitted: 9,
                events_lost: 2,
                ..Default::default()
            },
            maps: vec![crate::datapath::MapFill {
                map: "PAL_POLICY_V1".into(),
                entries: 64,
                capacity: 256,
            }],
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
        assert_eq!(
            text.lines().last(),
            Some("# EOF"),
            "OpenMetrics ends with # EOF"
        );
        // Every sample line is `name{labels} value` or `name value`.
        for l in text.lines().filter(|l| !l.starts_with('#')) {
            let (_, value) = l.rsplit_once(' ').unwrap();
            assert!(value.parse::<f64>().is_ok(), "{l}");
        }
    }
}
