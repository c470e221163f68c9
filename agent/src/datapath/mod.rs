//! The datapath: the only module that touches the kernel. `Desired` is the
//! complete kernel state the agent wants, as plain data; a `Datapath` makes the
//! kernel match it. `kernel::KernelDatapath` is the real one (aya);
//! `fake::FakeDatapath` records applies for unit tests.
//!
//! Update order, so that no connection is judged against a mix:
//! 1. the whole new policy table is written into the inactive slot, then the
//!    active-slot index flips (one 4-byte array write), then the generation is
//!    bumped and the old slot is emptied;
//! 2. only then do ipcache and cgroup entries move to new identities (the
//!    agent keeps an identity in the compiled tables for one more round after
//!    its last workload moved away, so both old and new are present in the
//!    table that is live while the single-entry updates land);
//! 3. stale ipcache and cgroup entries are deleted last.
pub mod bpfsys;
pub mod fake;
pub mod ipcache;
pub mod kernel;

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    sync::Arc,
};

use ipnet::IpNet;
use palisade_common::IpcacheValue;

pub use self::ipcache::{IpCache, Stamp};
use crate::policy::{CompiledPolicy, model::Protocol};

/// Everything the kernel maps should contain.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Desired {
    /// cgroup id → identity.
    pub cgroups: BTreeMap<u64, u32>,
    /// Address block → identity (workload IPs, configured peers, policy CIDRs,
    /// the node's addresses), with what changed since each version.
    pub ipcache: IpCache,
    /// (cgroup id, address) of each workload's own addresses; `::1`
    /// (`LOOPBACK_MARK`) marks a workload with its own network namespace.
    pub own_addresses: BTreeSet<(u64, IpAddr)>,
    pub policy: Arc<CompiledPolicy>,
    pub services: Arc<ServiceTable>,
    /// Traffic with the node (`reserved:host`) passes before any policy.
    pub host_always_allowed: bool,
}

/// A Service frontend as a client addresses it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServiceFrontend {
    pub addr: IpAddr,
    pub port: u16,
    /// IANA protocol number.
    pub protocol: u8,
}

/// What a frontend leads to: the distinct (identity, target port) pairs of
/// its ready endpoints. More than `MAX_SERVICE_BACKENDS` pairs are written
/// as "too many" (refused in the kernel).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServiceBackends {
    pub service_id: u32,
    /// (who the backend is and its block identity, target port).
    pub backends: Vec<(IpcacheValue, u16)>,
}

/// One (Service, port), named in audit events by its id (index + 1).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceInfo {
    pub name: String,
    pub port: u16,
    pub protocol: Protocol,
    pub backends: Vec<(IpcacheValue, u16)>,
}

/// A vacant id (its Service or port is gone; handed out again).
impl Default for ServiceInfo {
    fn default() -> Self {
        ServiceInfo {
            name: String::new(),
            port: 0,
            protocol: Protocol::Tcp,
            backends: Vec::new(),
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServiceTable {
    pub frontends: BTreeMap<ServiceFrontend, ServiceBackends>,
    pub infos: Vec<ServiceInfo>,
}

impl ServiceTable {
    /// The (Service, port) `id` names; `None` for a vacant id.
    pub fn info(&self, id: u32) -> Option<&ServiceInfo> {
        self.infos
            .get(usize::try_from(id).ok()?.checked_sub(1)?)
            .filter(|i| !i.name.is_empty())
    }
}

/// One kernel map's fill, as `palisade status` and `/metrics` show it.
#[derive(
    Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize, schemars::JsonSchema,
)]
#[serde(deny_unknown_fields)]
pub struct MapFill {
    pub map: String,
    pub entries: usize,
    pub capacity: u32,
}

impl MapFill {
    /// entries / capacity (a zero capacity reads as one).
    pub fn ratio(&self) -> f64 {
        self.entries as f64 / f64::from(self.capacity.max(1))
    }
}

/// What the agent found in its pin directory when it started.
#[derive(
    Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize, schemars::JsonSchema,
)]
pub struct Adoption {
    /// Pinned programs, links and maps were adopted: enforcement never stopped.
    pub adopted: bool,
    /// Policy entries in the adopted active table.
    pub policy_entries: usize,
    /// Cgroup entries in the adopted maps.
    pub cgroups: usize,
    /// Pinned state replaced instead of adopted.
    pub replaced: Vec<Replaced>,
}

/// Pinned state that was replaced, and why.
#[derive(
    Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize, schemars::JsonSchema,
)]
pub struct Replaced {
    /// `pins` (the whole directory), `maps`, or `link:<program>`.
    pub what: String,
    pub why: String,
}

/// Kernel counters, summed over CPUs.
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    serde::Serialize,
    serde::Deserialize,
    schemars::JsonSchema,
)]
pub struct Counters {
    pub egress_allow: u64,
    pub egress_deny: u64,
    pub ingress_allow: u64,
    pub ingress_deny: u64,
    pub egress_would_deny: u64,
    pub ingress_would_deny: u64,
    pub events_emitted: u64,
    pub events_lost: u64,
    pub flow_insert_failed: u64,
    pub unparseable: u64,
    pub forged_source: u64,
    pub source_routed: u64,
    pub packet_sockets_refused: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error(
        "map {map} cannot take the change: it needs {needed} entries, the capacity is {capacity} ({in_use} in use now); nothing was changed, raise maps.{config_key} in the config"
    )]
    MapFull {
        map: &'static str,
        config_key: &'static str,
        needed: usize,
        in_use: usize,
        capacity: u32,
    },
    #[error("updating map {map}: {source}")]
    Map {
        map: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("loading the eBPF object: {0}")]
    Load(#[source] Box<aya::EbpfError>),
    #[error("program {name}: {source}")]
    Program {
        name: &'static str,
        #[source]
        source: Box<aya::programs::ProgramError>,
    },
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("this kernel ({release}) cannot run Palisade: {missing}")]
    Kernel { release: String, missing: String },
    #[error("map {0} is missing from the eBPF object")]
    MissingMap(&'static str),
    #[error(
        "another palisade agent (pid {pid}) owns the pinned state in {dir} (lock {lock}): stop it first, or give this agent its own bpfPinDir"
    )]
    PinsInUse { dir: String, pid: i32, lock: String },
}

/// What an apply changed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ApplyReport {
    pub policy_swapped: bool,
    pub policy_entries: usize,
    pub cgroup_updates: usize,
    pub ipcache_updates: usize,
    pub service_updates: usize,
}

/// An apply that did not complete.
#[derive(Debug, thiserror::Error)]
#[error("{}: {error}", if *partial { "partially applied, will retry" } else { "refused, nothing changed" })]
pub struct ApplyError {
    pub error: DatapathError,
    /// The new policy table is live but a later write (ipcache, cgroups,
    /// Services) failed: the kernel is behind the desired state and the same
    /// state must be applied again. `false`: nothing in force changed.
    pub partial: bool,
}

impl ApplyError {
    pub fn refused(error: DatapathError) -> ApplyError {
        ApplyError {
            error,
            partial: false,
        }
    }
    pub fn partial(error: DatapathError) -> ApplyError {
        ApplyError {
            error,
            partial: true,
        }
    }
}

/// The outcome of one self-check.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Health {
    /// What does not match and could not be repaired (enforcement is not
    /// what the agent says): readiness turns false.
    pub problems: Vec<String>,
    /// What was found wrong and repaired this time.
    pub repaired: Vec<String>,
}

/// What the control loop needs of the kernel side.
pub trait Datapath {
    /// Where this datapath's audit events come from.
    type Events: EventSource;
    /// Makes the kernel maps equal `desired`. A refused apply changed
    /// nothing in force; a partial one must be retried.
    fn apply(&mut self, desired: &Desired) -> Result<ApplyReport, ApplyError>;
    fn counters(&self) -> Result<Counters, DatapathError>;
    /// How full each map is.
    fn fill(&self) -> Vec<MapFill>;
    /// Compares the kernel's state with the agent's and repairs what it can.
    fn verify(&mut self) -> Health;
    /// Repairs made so far, by kind.
    fn repairs(&self) -> BTreeMap<String, u64>;
    /// The audit events, handed once to their reader.
    fn take_events(&mut self) -> Result<Self::Events, DatapathError>;
    /// What was adopted from a previous agent at start, and what replaced.
    fn adoption(&self) -> &Adoption;
    /// The identities the maps held at start (empty unless adopted): the
    /// planner keeps their numbers, so nothing in force is renumbered.
    fn adopted_identities(&self) -> (BTreeMap<u64, u32>, BTreeMap<ipnet::IpNet, u32>);
    /// Policy entries in the active table (adopted or written).
    fn active_entries(&self) -> usize;
    /// Where the programs are attached, for the status.
    fn attach_points(&self) -> &[String];
    /// Which protections are active.
    fn posture(&self) -> &Posture;
}

/// Where audit events come from: the kernel's ring buffer
/// (`kernel::AuditRing`), or what a test feeds in (`fake::FakeEvents`).
pub trait EventSource: Send + 'static {
    /// Every record now, decoded (`None`: a malformed record).
    fn drain(&mut self) -> Vec<Option<palisade_common::AuditEvent>>;
    /// Resolves when records are signalled.
    fn wait(&mut self) -> impl std::future::Future<Output = std::io::Result<()>> + Send;
}

/// Which protections are active on this node, for the log and `palisade status`.
#[derive(
    Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize, schemars::JsonSchema,
)]
pub struct Posture {
    /// Socket addresses judged at connect/sendmsg (always).
    pub socket_hooks: bool,
    /// What leaves a workload judged per packet: source routes and forged
    /// sources dropped, raw sockets judged by their real destination.
    pub packet_egress: bool,
    /// Packet (AF_PACKET) sockets refused to workloads (needs the BPF LSM).
    pub packet_sockets_refused: bool,
    /// Why a protection is missing, and the remedy.
    pub gaps: Vec<String>,
}

impl Posture {
    pub(crate) fn of(packet_sockets: Result<(), String>) -> Posture {
        let mut posture = Posture {
            socket_hooks: true,
            packet_egress: true,
            packet_sockets_refused: packet_sockets.is_ok(),
            gaps: Vec::new(),
        };
        if let Err(e) = packet_sockets {
            posture.gaps.push(format!(
                "packet sockets (AF_PACKET) are not refused: the BPF LSM is not available ({e}); a workload with CAP_NET_RAW can send and receive below every hook. Drop CAP_NET_RAW from workloads (the Pod Security Standards' restricted profile does), or boot with `lsm=...,bpf`"
            ));
        }
        posture
    }
}

/// Decodes one audit ring-buffer record; `None` when it is too short.
pub fn decode_audit_event(bytes: &[u8]) -> Option<palisade_common::AuditEvent> {
    if bytes.len() < std::mem::size_of::<palisade_common::AuditEvent>() {
        return None;
    }
    // SAFETY: the length is checked; palisade_common::AuditEvent is Pod (any bit pattern is valid).
    Some(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<palisade_common::AuditEvent>()) })
}

/// Entries to write and delete to go from `current` to `desired`.
/// The ipcache writes (upserts, deletes) that bring `current` — a
/// datapath's copy of what it wrote, which was `desired` at `written` — to
/// `desired`: each block logged since `written` when the log reaches back
/// that far, else each block either side holds.
pub fn ipcache_diff(
    current: &BTreeMap<IpNet, IpcacheValue>,
    written: ipcache::Stamp,
    desired: &IpCache,
) -> (Vec<(IpNet, IpcacheValue)>, Vec<IpNet>) {
    let nets = desired.changes_since(written).unwrap_or_else(|| {
        let mut all: Vec<IpNet> = desired
            .iter()
            .map(|(n, _)| *n)
            .chain(current.keys().copied())
            .collect();
        all.sort();
        all.dedup();
        all
    });
    let (mut upserts, mut deletes) = (Vec::new(), Vec::new());
    for net in nets {
        match desired.get(&net) {
            Some(id) if current.get(&net) != Some(&id) => upserts.push((net, id)),
            None if current.contains_key(&net) => deletes.push(net),
            _ => {}
        }
    }
    (upserts, deletes)
}

pub fn diff<K: Ord + Copy, V: PartialEq + Copy>(
    current: &BTreeMap<K, V>,
    desired: &BTreeMap<K, V>,
) -> (Vec<(K, V)>, Vec<K>) {
    let upserts = desired
        .iter()
        .filter(|(k, v)| current.get(k) != Some(v))
        .map(|(k, v)| (*k, *v))
        .collect();
    let deletes = current
        .keys()
        .filter(|k| !desired.contains_key(k))
        .copied()
        .collect();
    (upserts, deletes)
}
