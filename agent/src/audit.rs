//! Audit: takes the events the datapath drains from the kernel's ring
//! (`datapath::kernel::AuditRing`), names them with what the agent knows
//! (workload, identity names and labels, the policy and rule that decided)
//! as typed `AuditRecord`s and writes one JSON line per event.
use std::{
    collections::BTreeMap,
    io::Write,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::Path,
    sync::{
        Arc, RwLock,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, UNIX_EPOCH},
};

use palisade_common::{AuditEvent, DIR_EGRESS, identity as reserved, reason, verdict};
use serde_json::Value;

use crate::{
    datapath::ServiceTable,
    identity::reserved_name,
    inventory::Workload,
    policy::{CompiledPolicy, model::Protocol},
};

/// What the enricher knows; replaced whole by the agent after each reconcile.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    pub identities: crate::policy::compile::Identities,
    pub workloads: BTreeMap<u64, Workload>,
    pub policy: Arc<CompiledPolicy>,
    pub services: Arc<ServiceTable>,
}

pub type SharedSnapshot = Arc<RwLock<Arc<Snapshot>>>;

/// Events delivered to the sink.
#[derive(Debug, Default)]
pub struct AuditStats {
    pub delivered: AtomicU64,
    pub malformed: AtomicU64,
}

/// CLOCK_REALTIME − CLOCK_MONOTONIC, to turn `bpf_ktime_get_ns` into wall time.
pub fn boot_offset() -> Duration {
    let read = |clock| {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: valid pointer to a timespec.
        unsafe { libc::clock_gettime(clock, &mut ts) };
        Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
    };
    read(libc::CLOCK_REALTIME).saturating_sub(read(libc::CLOCK_MONOTONIC))
}

fn ip_of(addr: [u8; 16], family: u8) -> IpAddr {
    if family == 4 {
        IpAddr::V4(Ipv4Addr::new(addr[12], addr[13], addr[14], addr[15]))
    } else {
        IpAddr::V6(Ipv6Addr::from(addr))
    }
}

fn comm(bytes: &[u8; 16]) -> String {
    let end = bytes.iter().position(|b| *b == 0).unwrap_or(bytes.len());
    String::from_utf8_lossy(&bytes[..end]).into_owned()
}

/// One audit event as written to the audit log (one JSON object per line).
/// `palisade schema audit` prints its JSON Schema; the kernel tests check
/// real events against this type (every field known, nothing missing).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AuditRecord {
    /// When the kernel judged the packet or call (RFC 3339, UTC, microseconds).
    pub time: String,
    pub verdict: AuditVerdict,
    pub direction: AuditDirection,
    /// `TCP`, `UDP`, `SCTP`, `ICMP`, `ICMPv6`, `UDPLite`, `DCCP`, or the IP
    /// protocol number.
    pub protocol: String,
    /// The port the connection is to (the local one for ingress); for ICMP,
    /// `type × 256 + code` (also given in `icmp`).
    pub port: u16,
    /// The ICMP message's type and code (ICMP and ICMPv6 only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub icmp: Option<AuditIcmp>,
    /// The sender: a local workload as `namespace/name`, a peer by its identity's name.
    pub from: String,
    /// The receiver, named like `from`.
    pub to: String,
    pub local: AuditLocal,
    pub peer: AuditPeer,
    /// The policy whose rules decided (`namespace/name`), if any selected the workload.
    pub policy: Option<String>,
    /// `NetworkPolicy`, `PalisadePolicy` or `ClusterPalisadePolicy`.
    pub policy_kind: Option<String>,
    /// The rule that decided, or `default-deny` when no rule allowed.
    pub rule: Option<String>,
    /// The Service the connection was addressed to (judged as its backends).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<AuditService>,
    /// Why, when the verdict is not a policy's (a forged source, a source
    /// route, a packet socket, a Service whose backends disagree, …).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// An ICMP message's type and code.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize, schemars::JsonSchema,
)]
#[serde(deny_unknown_fields)]
pub struct AuditIcmp {
    #[serde(rename = "type")]
    pub kind: u8,
    pub code: u8,
}

/// The name an audit record gives an IP protocol number.
pub fn protocol_name(number: u8) -> String {
    match number {
        palisade_common::PROTO_ICMP => "ICMP".to_owned(),
        palisade_common::PROTO_ICMPV6 => "ICMPv6".to_owned(),
        palisade_common::PROTO_UDPLITE => "UDPLite".to_owned(),
        palisade_common::PROTO_DCCP => "DCCP".to_owned(),
        n => Protocol::from_number(n).map_or_else(|| n.to_string(), |p| p.as_str().to_owned()),
    }
}

#[derive(
    Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "kebab-case")]
pub enum AuditVerdict {
    Allow,
    /// Audit mode: the verdict a policy in audit mode would have given.
    WouldDeny,
    Deny,
}

#[derive(
    Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum AuditDirection {
    Egress,
    Ingress,
}

/// The workload on this node.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AuditLocal {
    /// `namespace/name`, or the identity's name when the cgroup is not a workload.
    pub workload: String,
    pub identity: u32,
    pub identity_name: String,
    pub namespace: Option<String>,
    pub labels: BTreeMap<String, String>,
    /// The cgroup, relative to the agent's cgroup root.
    pub cgroup: Option<String>,
    /// The calling process (egress from a socket call only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<String>,
}

/// The other end.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AuditPeer {
    /// The peer's identity name, or its address when it has none (`reserved:world`).
    pub name: String,
    pub identity: u32,
    pub identity_name: String,
    pub namespace: Option<String>,
    pub labels: BTreeMap<String, String>,
    pub ip: String,
    /// The peer's port (its source port for ingress).
    pub port: u16,
}

#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AuditService {
    /// `namespace/name`.
    pub name: String,
    pub address: String,
    pub port: u16,
    pub protocol: String,
    pub backends: Vec<AuditBackend>,
}

#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AuditBackend {
    pub identity: u32,
    pub name: String,
    pub port: u16,
}

/// The JSON Schema of [`AuditRecord`] (`palisade schema audit`).
pub fn audit_schema() -> String {
    serde_json::to_string_pretty(&schemars::schema_for!(AuditRecord)).unwrap_or_default()
}

/// Renders an event as the JSON object written to the audit log.
pub fn render(ev: &AuditEvent, snap: &Snapshot, boot: Duration) -> Value {
    serde_json::to_value(record(ev, snap, boot)).unwrap_or_default()
}

/// The typed audit record of a kernel event, named with `snap`.
pub fn record(ev: &AuditEvent, snap: &Snapshot, boot: Duration) -> AuditRecord {
    let time = UNIX_EPOCH + boot + Duration::from_nanos(ev.timestamp_ns);
    let egress = ev.direction == DIR_EGRESS;
    let identity_name = |id: u32| -> String {
        snap.identities
            .get(&id)
            .map(|i| i.name.clone())
            .or_else(|| reserved_name(id).map(str::to_owned))
            .unwrap_or_else(|| format!("identity:{id}"))
    };
    let workload = snap.workloads.get(&ev.cgroup_id);
    let local_name = workload
        .map(|w| format!("{}/{}", w.namespace, w.name))
        .unwrap_or_else(|| identity_name(ev.local_identity));
    let local = AuditLocal {
        workload: local_name.clone(),
        identity: ev.local_identity,
        identity_name: identity_name(ev.local_identity),
        namespace: workload.map(|w| w.namespace.clone()),
        labels: workload.map(|w| w.labels.clone()).unwrap_or_default(),
        cgroup: workload.map(|w| w.cgroup_path.clone()),
        pid: egress.then_some(ev.pid),
        command: egress.then(|| comm(&ev.comm)),
    };
    let peer_ip = ip_of(ev.peer_addr, ev.family);
    let peer_info = snap.identities.get(&ev.peer_identity);
    let peer_name = match peer_info {
        Some(i) => i.name.clone(),
        None if ev.peer_identity == reserved::WORLD => peer_ip.to_string(),
        None => identity_name(ev.peer_identity),
    };
    let peer = AuditPeer {
        name: peer_name.clone(),
        identity: ev.peer_identity,
        identity_name: identity_name(ev.peer_identity),
        namespace: peer_info.and_then(|i| i.namespace.clone()),
        labels: peer_info.map(|i| i.labels.clone()).unwrap_or_default(),
        ip: peer_ip.to_string(),
        port: ev.peer_port,
    };
    let decided = snap.policy.rule(if ev.rule_id != 0 {
        ev.rule_id
    } else {
        ev.policy_rule_id
    });
    let (from, to) = if egress {
        (local_name, peer_name)
    } else {
        (peer_name, local_name)
    };
    let service = snap.services.info(ev.service_id).map(|svc| AuditService {
        name: svc.name.clone(),
        address: peer_ip.to_string(),
        port: svc.port,
        protocol: svc.protocol.as_str().to_owned(),
        backends: svc
            .backends
            .iter()
            .map(|(at, port)| AuditBackend {
                identity: at.identity,
                name: identity_name(at.identity),
                port: *port,
            })
            .collect(),
    });
    let why = match ev.reason {
        reason::SERVICE_BACKENDS_DISAGREE => Some(
            "the Service's backends get different verdicts; the connection is refused whichever backend it would reach (fail closed)",
        ),
        reason::SERVICE_TOO_MANY_BACKENDS => Some(
            "the Service has more distinct backend identities and ports than the kernel judges (4); the connection is refused (fail closed)",
        ),
        reason::SERVICE_NO_BACKENDS => Some(
            "the Service has no backend the agent knows (no ready or serving endpoint with the target port); the connection is refused (fail closed)",
        ),
        reason::SOURCE_ROUTED => Some(
            "the packet carries a source route (IPv6 routing header or IPv4 options) that would take it past the judged destination; dropped",
        ),
        reason::FORGED_SOURCE => {
            Some("the packet's source address is not the workload's own; dropped")
        }
        reason::UNPARSEABLE => Some("the packet could not be parsed; dropped"),
        reason::PACKET_SOCKET => {
            Some("a packet (AF_PACKET) socket would bypass every hook; refused")
        }
        _ => None,
    };
    AuditRecord {
        time: humantime::format_rfc3339_micros(time).to_string(),
        verdict: match ev.verdict {
            verdict::ALLOW => AuditVerdict::Allow,
            verdict::WOULD_DENY => AuditVerdict::WouldDeny,
            _ => AuditVerdict::Deny,
        },
        direction: if egress {
            AuditDirection::Egress
        } else {
            AuditDirection::Ingress
        },
        protocol: protocol_name(ev.protocol),
        port: ev.port,
        icmp: matches!(
            ev.protocol,
            palisade_common::PROTO_ICMP | palisade_common::PROTO_ICMPV6
        )
        .then(|| AuditIcmp {
            kind: (ev.port >> 8) as u8,
            code: ev.port as u8,
        }),
        from,
        to,
        local,
        peer,
        policy: decided.map(|r| r.policy.clone()),
        policy_kind: decided.map(|r| r.kind.to_owned()),
        rule: if ev.rule_id == 0 {
            Some("default-deny".to_owned())
        } else {
            decided.map(|r| r.rule.clone())
        },
        service,
        reason: why.map(str::to_owned),
    }
}

/// Where events go.
pub enum Sink {
    Stdout,
    File(std::fs::File),
}

impl Sink {
    pub fn open(output: &str) -> std::io::Result<Sink> {
        if output == "stdout" {
            Ok(Sink::Stdout)
        } else {
            if let Some(dir) = Path::new(output).parent()
                && !dir.as_os_str().is_empty()
            {
                std::fs::create_dir_all(dir)?;
            }
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(output)
                .map(Sink::File)
        }
    }

    pub fn write_lines(&mut self, lines: &[String]) -> std::io::Result<()> {
        let mut buf = String::new();
        for l in lines {
            buf.push_str(l);
            buf.push('\n');
        }
        match self {
            Sink::Stdout => {
                let mut out = std::io::stdout().lock();
                out.write_all(buf.as_bytes())?;
                out.flush()
            }
            Sink::File(f) => {
                f.write_all(buf.as_bytes())?;
                f.flush()
            }
        }
    }
}

/// Drains the ring until `stop` fires: on a kernel wakeup (the ring filling
/// up) or every `poll` interval, whichever comes first.
pub async fn run_reader<E: crate::datapath::EventSource>(
    mut ring: E,
    snapshot: SharedSnapshot,
    mut sink: Sink,
    stats: Arc<AuditStats>,
    events: tokio::sync::broadcast::Sender<Arc<AuditRecord>>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<()> {
    // Events are read within 50 ms while they come; a reader that found
    // nothing for a while looks every 250 ms (a full ring wakes it at once).
    let (busy_poll, idle_poll) = (Duration::from_millis(50), Duration::from_millis(250));
    let mut last_event = std::time::Instant::now();
    let boot = boot_offset();
    loop {
        let poll = if last_event.elapsed() < Duration::from_secs(2) {
            busy_poll
        } else {
            idle_poll
        };
        let stopping = *stop.borrow();
        let items = ring.drain();
        // Most polls find nothing: the snapshot is only read when there is
        // something to name.
        if !items.is_empty() {
            last_event = std::time::Instant::now();
            let snap = snapshot
                .read()
                .map_err(|_| anyhow::anyhow!("snapshot lock poisoned"))?
                .clone();
            let mut lines = Vec::new();
            for item in items {
                match item {
                    Some(ev) => {
                        let rec = record(&ev, &snap, boot);
                        lines.push(serde_json::to_string(&rec)?);
                        // Followers (`palisade audit --follow`); none is fine.
                        let _ = events.send(Arc::new(rec));
                    }
                    None => {
                        stats.malformed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            if !lines.is_empty() {
                sink.write_lines(&lines)?;
                stats
                    .delivered
                    .fetch_add(lines.len() as u64, Ordering::Relaxed);
            }
        }
        if stopping {
            return Ok(());
        }
        tokio::select! {
            woken = ring.wait() => woken?,
            _ = tokio::time::sleep(poll) => {}
            _ = stop.changed() => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every field the typed record writes is in the published schema, and
    /// a rendered event reads back as the same record (nothing unknown,
    /// nothing missing); an egress event names its process, an ingress one
    /// does not.
    #[test]
    fn rendered_events_match_the_published_schema() {
        let schema: Value = serde_json::from_str(&audit_schema()).unwrap();
        let properties = |v: &Value| -> Vec<String> {
            let mut p: Vec<String> = v["properties"]
                .as_object()
                .map(|o| o.keys().cloned().collect())
                .unwrap_or_default();
            p.sort();
            p
        };
        for direction in [DIR_EGRESS, palisade_common::DIR_INGRESS] {
            let mut bytes = vec![0u8; std::mem::size_of::<AuditEvent>()];
            bytes[0] = 1;
            let mut ev = crate::datapath::decode_audit_event(&bytes).unwrap();
            ev.direction = direction;
            ev.family = 4;
            ev.protocol = 6;
            ev.port = 443;
            ev.pid = 42;
            let value = render(&ev, &Snapshot::default(), Duration::ZERO);
            let back: AuditRecord = serde_json::from_value(value.clone()).unwrap();
            assert_eq!(serde_json::to_value(&back).unwrap(), value);
            let mut keys: Vec<String> = value.as_object().unwrap().keys().cloned().collect();
            keys.sort();
            let known = properties(&schema);
            assert!(
                keys.iter().all(|k| known.contains(k)),
                "{keys:?} vs {known:?}"
            );
            assert_eq!(value["local"]["pid"].is_null(), direction != DIR_EGRESS);
        }
        let committed = std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../docs/audit-record.schema.json"),
        )
        .unwrap();
        assert_eq!(
            committed.trim_end(),
            audit_schema(),
            "docs/audit-record.schema.json is stale: `palisade schema audit > docs/audit-record.schema.json`"
        );
        for required in [
            "time",
            "verdict",
            "direction",
            "from",
            "to",
            "local",
            "peer",
        ] {
            assert!(
                schema["required"]
                    .as_array()
                    .is_some_and(|r| r.iter().any(|x| x == required)),
                "{required} is required"
            );
        }
    }

    /// The reader over a datapath's events (the fake's here, no kernel):
    /// each record reaches the sink as one JSON line and the followers, a
    /// malformed one is counted, not written; a stop drains what is left.
    #[test]
    fn the_reader_writes_every_event_of_the_datapath_and_counts_malformed_ones() {
        use crate::datapath::{Datapath as _, fake::FakeDatapath};
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        runtime.block_on(async {
            let mut datapath = FakeDatapath::default();
            let events = datapath.take_events().unwrap();
            let tx = datapath.events_tx.clone().unwrap();
            let stats = Arc::new(AuditStats::default());
            let (followers, mut follower) = tokio::sync::broadcast::channel(16);
            let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
            let reader = tokio::spawn(run_reader(
                events,
                SharedSnapshot::default(),
                Sink::open(path.to_str().unwrap()).unwrap(),
                stats.clone(),
                followers,
                stop_rx,
            ));
            let event = |port: u16| {
                let bytes = vec![0u8; std::mem::size_of::<AuditEvent>()];
                let mut ev = crate::datapath::decode_audit_event(&bytes).unwrap();
                ev.direction = DIR_EGRESS;
                ev.family = 4;
                ev.protocol = 6;
                ev.port = port;
                ev
            };
            tx.send(Some(event(443))).unwrap();
            let first = follower.recv().await.unwrap();
            assert_eq!(first.port, 443);
            tx.send(None).unwrap();
            tx.send(Some(event(8080))).unwrap();
            stop_tx.send(true).unwrap();
            reader.await.unwrap().unwrap();
            assert_eq!(stats.delivered.load(Ordering::Relaxed), 2);
            assert_eq!(stats.malformed.load(Ordering::Relaxed), 1);
        });
        let lines: Vec<AuditRecord> = std::fs::read_to_string(&path)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let ports: Vec<u16> = lines.iter().map(|r| r.port).collect();
        assert_eq!(ports, [443, 8080]);
    }
}
