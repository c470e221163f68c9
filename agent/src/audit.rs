//! Audit: drains the kernel's ring buffer, decodes each event, enriches it
//! with what the agent knows (workload, identity names and labels, the policy
//! and rule that decided) and writes one JSON line per event.
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
use serde_json::{Value, json};

use crate::{
    datapath::ServiceTable,
    discovery::Workload,
    identity::reserved_name,
    policy::{CompiledPolicy, compile::IdentityInfo, model::Protocol},
};

/// What the enricher knows; replaced whole by the agent after each reconcile.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    pub identities: BTreeMap<u32, IdentityInfo>,
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

/// Decodes one ring-buffer record.
pub fn decode(bytes: &[u8]) -> Option<AuditEvent> {
    if bytes.len() < std::mem::size_of::<AuditEvent>() {
        return None;
    }
    // SAFETY: the length is checked; AuditEvent is Pod (any bit pattern is valid).
    Some(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<AuditEvent>()) })
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

/// Renders an event as the JSON object written to the audit log.
pub fn render(ev: &AuditEvent, snap: &Snapshot, boot: Duration) -> Value {
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
    let mut local = json!({
        "workload": local_name,
        "identity": ev.local_identity,
        "identityName": identity_name(ev.local_identity),
        "namespace": workload.map(|w| w.namespace.clone()),
        "labels": workload.map(|w| w.labels.clone()).unwrap_or_default(),
        "cgroup": workload.map(|w| w.cgroup_path.clone()),
    });
    if egress {
        local["pid"] = json!(ev.pid);
        local["command"] = json!(comm(&ev.comm));
    }
    let peer_ip = ip_of(ev.peer_addr, ev.family);
    let peer_info = snap.identities.get(&ev.peer_identity);
    let peer_name = match peer_info {
        Some(i) => i.name.clone(),
        None if ev.peer_identity == reserved::WORLD => peer_ip.to_string(),
        None => identity_name(ev.peer_identity),
    };
    let peer = json!({
        "name": peer_name,
        "identity": ev.peer_identity,
        "identityName": identity_name(ev.peer_identity),
        "namespace": peer_info.and_then(|i| i.namespace.clone()),
        "labels": peer_info.map(|i| i.labels.clone()).unwrap_or_default(),
        "ip": peer_ip.to_string(),
        "port": ev.peer_port,
    });
    let decided = snap.policy.rule(if ev.rule_id != 0 {
        ev.rule_id
    } else {
        ev.policy_rule_id
    });
    let (from, to) = if egress {
        (local_name.clone(), peer_name.clone())
    } else {
        (peer_name.clone(), local_name.clone())
    };
    let service = snap.services.info(ev.service_id).map(|svc| {
        json!({
            "name": svc.name,
            "address": peer_ip.to_string(),
            "port": svc.port,
            "protocol": svc.protocol.as_str(),
            "backends": svc.backends.iter().map(|(id, port)| json!({
                "identity": id,
                "name": identity_name(*id),
                "port": port,
            })).collect::<Vec<_>>(),
        })
    });
    let why = match ev.reason {
        reason::SERVICE_BACKENDS_DISAGREE => Some(
            "the Service's backends get different verdicts; the connection is refused whichever backend it would reach (fail closed)",
        ),
        reason::SERVICE_TOO_MANY_BACKENDS => Some(
            "the Service has more distinct backend identities and ports than the kernel judges (4); the connection is refused (fail closed)",
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
    let mut record = json!({
        "time": humantime::format_rfc3339_micros(time).to_string(),
        "verdict": match ev.verdict {
            verdict::ALLOW => "allow",
            verdict::WOULD_DENY => "would-deny",
            _ => "deny",
        },
        "direction": if egress { "egress" } else { "ingress" },
        "protocol": Protocol::from_number(ev.protocol).map_or_else(|| ev.protocol.to_string(), |p| p.as_str().to_owned()),
        "port": ev.port,
        "from": from,
        "to": to,
        "local": local,
        "peer": peer,
        "policy": decided.map(|r| r.policy.clone()),
        "policyKind": decided.map(|r| r.kind),
        "rule": if ev.rule_id == 0 { Some("default-deny".to_owned()) } else { decided.map(|r| r.rule.clone()) },
    });
    if let Some(service) = service {
        record["service"] = service;
    }
    if let Some(why) = why {
        record["reason"] = json!(why);
    }
    record
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
pub async fn run_reader(
    ring: aya::maps::RingBuf<aya::maps::MapData>,
    snapshot: SharedSnapshot,
    mut sink: Sink,
    stats: Arc<AuditStats>,
    events: tokio::sync::broadcast::Sender<Arc<serde_json::Value>>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let poll = Duration::from_millis(50);
    let boot = boot_offset();
    // SAFETY: the AsyncFd owns the ring buffer, so the fd stays open for as
    // long as it is registered.
    let mut fd = unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE)
    }?;
    loop {
        let stopping = *stop.borrow();
        {
            let snap = snapshot
                .read()
                .map_err(|_| anyhow::anyhow!("snapshot lock poisoned"))?
                .clone();
            let ring = fd.get_mut();
            let mut lines = Vec::new();
            while let Some(item) = ring.next() {
                match decode(&item) {
                    Some(ev) => {
                        let value = render(&ev, &snap, boot);
                        lines.push(value.to_string());
                        // Followers (`palisade audit --follow`); none is fine.
                        let _ = events.send(Arc::new(value));
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
            guard = fd.readable_mut() => { guard?.clear_ready(); }
            _ = tokio::time::sleep(poll) => {}
            _ = stop.changed() => {}
        }
    }
}
