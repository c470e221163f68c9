//! The single definition of every type that crosses the kernel/user boundary:
//! map names (with their layout version), map keys and values, the audit event,
//! counter indices and reserved identities.
//!
//! Architecture invariant: this crate depends on nothing but `core` (and `aya`
//! behind the `user` feature). Every type is `#[repr(C)]` with explicit padding
//! fields, and its size is asserted at compile time. A layout change must bump
//! the version suffix of the map names that carry it, so that a pinned map of an
//! older layout is recognised and never misread.
#![no_std]

use core::mem::size_of;

/// Map names. The `_v1` suffix is the layout version of the key/value types.
pub mod maps {
    pub const CGROUP_IDENTITY: &str = "PAL_CGROUP_V1";
    pub const IPCACHE: &str = "PAL_IPCACHE_V2";
    pub const POLICY: &str = "PAL_POLICY_V1";
    pub const ENFORCED: &str = "PAL_ENFORCED_V1";
    pub const FLOWS: &str = "PAL_FLOWS_V2";
    pub const SERVICES: &str = "PAL_SERVICES_V2";
    pub const SELF_ADDRESSES: &str = "PAL_SELF_V1";
    pub const STATE: &str = "PAL_STATE_V1";
    pub const COUNTERS: &str = "PAL_COUNTERS_V2";
    pub const AUDIT: &str = "PAL_AUDIT_V2";
}

/// Program names (the Rust function names in the eBPF crate).
pub mod programs {
    pub const CONNECT4: &str = "palisade_connect4";
    pub const CONNECT6: &str = "palisade_connect6";
    pub const SENDMSG4: &str = "palisade_sendmsg4";
    pub const SENDMSG6: &str = "palisade_sendmsg6";
    pub const INGRESS: &str = "palisade_ingress";
    /// `cgroup_skb/egress`: what actually leaves a workload.
    pub const EGRESS_PACKET: &str = "palisade_egress_packet";
    /// `lsm_cgroup/socket_create`: packet sockets refused (needs BPF LSM).
    pub const SOCKET_CREATE: &str = "palisade_socket_create";
}

/// Default capacities; every one can be overridden in the agent's config.
pub mod capacity {
    pub const CGROUP_IDENTITY: u32 = 16_384;
    pub const IPCACHE: u32 = 65_536;
    pub const POLICY: u32 = 262_144;
    pub const ENFORCED: u32 = 32_768;
    pub const FLOWS: u32 = 65_536;
    /// Service frontends: (address, port, protocol) triples.
    pub const SERVICES: u32 = 65_536;
    /// Bytes; must be a power of two and a multiple of the page size.
    pub const AUDIT_RING_BYTES: u32 = 1 << 20;
}

/// Numeric identities. 0 is the wildcard in policy keys and never a real identity.
pub mod identity {
    /// Wildcard peer in a policy key ("any peer").
    pub const ANY: u32 = 0;
    /// The node itself (host network namespace).
    pub const HOST: u32 = 1;
    /// Anything not otherwise known: remote addresses outside every configured CIDR.
    pub const WORLD: u32 = 2;
    /// A local cgroup below the root that no workload rule matched.
    pub const UNMANAGED: u32 = 3;
    /// A pod's cgroup whose pod the agent has not learned yet (Kubernetes mode).
    pub const PENDING: u32 = 4;
    /// Another node of the cluster (its addresses, from Node objects).
    pub const REMOTE_NODE: u32 = 5;
    /// Broadcast and multicast destinations (255.255.255.255, 224.0.0.0/4,
    /// ff00::/8): never inside a policy's CIDR, allowed only by name.
    pub const BROADCAST: u32 = 6;
    /// Identities at or above this value are allocated for label sets.
    pub const FIRST_DYNAMIC: u32 = 256;
}

pub const DIR_EGRESS: u8 = 0;
pub const DIR_INGRESS: u8 = 1;

pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;
pub const PROTO_SCTP: u8 = 132;
pub const PROTO_ICMP: u8 = 1;
pub const PROTO_ICMPV6: u8 = 58;
pub const PROTO_DCCP: u8 = 33;
pub const PROTO_UDPLITE: u8 = 136;

/// `PolicyValue::flags` bits.
pub mod flags {
    /// The traffic is allowed by a rule.
    pub const ALLOW: u32 = 1;
    /// The traffic is denied by an explicit deny rule of an enforcing policy;
    /// beats `ALLOW`.
    pub const DENY: u32 = 2;
    /// A deny rule of a policy in audit mode matched: the traffic is not
    /// dropped for it, but a `would-deny` event is written. In
    /// `EnforcedValue::flags` it means every selecting policy is in audit mode,
    /// so the default deny is a `would-deny` too.
    pub const AUDIT_DENY: u32 = 4;
    /// An allow rule of a policy in audit mode matched. It lets traffic
    /// through only where every selecting policy is in audit mode: an audit
    /// policy never loosens an enforcing one.
    pub const AUDIT_ALLOW: u32 = 8;
}

/// Verdicts in audit events and counters.
pub mod verdict {
    pub const ALLOW: u8 = 0;
    pub const DENY: u8 = 1;
    pub const WOULD_DENY: u8 = 2;
}

/// Indices into the per-CPU counters array.
pub mod counter {
    pub const EGRESS_ALLOW: u32 = 0;
    pub const EGRESS_DENY: u32 = 1;
    pub const INGRESS_ALLOW: u32 = 2;
    pub const INGRESS_DENY: u32 = 3;
    pub const EGRESS_WOULD_DENY: u32 = 4;
    pub const INGRESS_WOULD_DENY: u32 = 5;
    /// Audit events written into the ring.
    pub const EVENTS_EMITTED: u32 = 6;
    /// Audit events that did not fit into the ring.
    pub const EVENTS_LOST: u32 = 7;
    /// Flow-cache inserts that failed.
    pub const FLOW_INSERT_FAILED: u32 = 8;
    /// Packets of an enforced workload that could not be parsed (dropped).
    pub const UNPARSEABLE: u32 = 9;
    /// Packets leaving a workload with a source address not its own (dropped).
    pub const FORGED_SOURCE: u32 = 10;
    /// Packets leaving a workload with a source route (dropped).
    pub const SOURCE_ROUTED: u32 = 11;
    /// Packet (AF_PACKET) sockets refused to workloads.
    pub const PACKET_SOCKETS_REFUSED: u32 = 12;
    pub const COUNT: u32 = 13;
}

/// Indices into the `STATE` array (u32 values written by user space).
pub mod state {
    /// Which of the two policy table slots (0 or 1) the programs read.
    pub const ACTIVE_SLOT: u32 = 0;
    /// Generation of the policy set in the active slot; cached flow verdicts
    /// from an older generation are judged again.
    pub const GENERATION: u32 = 1;
    /// Ring fill (bytes) above which the kernel wakes the audit reader at once.
    pub const WAKEUP_BYTES: u32 = 2;
    /// `options::*` bits.
    pub const OPTIONS: u32 = 3;
    pub const COUNT: u32 = 4;
}

/// Bits of `STATE[state::OPTIONS]`.
pub mod options {
    /// Traffic between a workload and its own node (`identity::HOST`) is
    /// always allowed, before any policy (upstream NetworkPolicy semantics).
    pub const HOST_ALWAYS_ALLOWED: u32 = 1;
}

/// Why a deny happened, beyond the rule (`AuditEvent::reason`).
pub mod reason {
    /// The policy lookup decided (the rule id says which rule).
    pub const POLICY: u8 = 0;
    /// A connection to a Service whose backends get different verdicts:
    /// refused whole (fail closed), whichever backend it would reach.
    pub const SERVICE_BACKENDS_DISAGREE: u8 = 1;
    /// A connection to a Service with more distinct (identity, port)
    /// backends than the kernel judges (`MAX_SERVICE_BACKENDS`): refused.
    pub const SERVICE_TOO_MANY_BACKENDS: u8 = 2;
    /// A packet leaving with an IPv6 routing header or IPv4 options (a
    /// source route would carry it past the judged destination): dropped.
    pub const SOURCE_ROUTED: u8 = 3;
    /// A packet leaving with a source address that is not the workload's.
    pub const FORGED_SOURCE: u8 = 4;
    /// A packet that cannot be parsed, on an enforced workload: dropped.
    pub const UNPARSEABLE: u8 = 5;
    /// A packet (AF_PACKET) socket refused: it would bypass every hook.
    pub const PACKET_SOCKET: u8 = 6;
    /// A packet of a raw IP socket, judged by its real destination.
    pub const RAW_SOCKET: u8 = 7;
    /// A connection to a Service frontend with no backend the kernel can
    /// judge (no endpoint known, or none with the target port): refused,
    /// since the node would forward it to a backend nobody judged.
    pub const SERVICE_NO_BACKENDS: u8 = 8;
}

/// The ipcache LPM trie's key data is a `[u8; 16]` IPv6 address; IPv4 is stored
/// as `::ffff:a.b.c.d` with prefix length 96 + n, so one trie serves both families.
pub const IPV4_MAPPED_PREFIX: u32 = 96;

/// Key data of the policy LPM trie, in matching order. The trie's prefix length
/// covers everything before the port (`POLICY_PREFIX_ANY_PORT` bits) plus 0..=16
/// bits of the port: a port range is stored as a handful of prefixes, never one
/// entry per port.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PolicyKeyData {
    /// Table slot (0 or 1); see `state::ACTIVE_SLOT`.
    pub slot: u8,
    pub direction: u8,
    pub protocol: u8,
    pub _pad0: u8,
    pub local_identity: u32,
    /// `identity::ANY` for rules that allow any peer.
    pub peer_identity: u32,
    /// Destination port, big-endian, so port ranges are bit prefixes.
    pub port_be: [u8; 2],
    pub _pad1: [u8; 2],
}

/// Bits of `PolicyKeyData` before the port.
pub const POLICY_PREFIX_ANY_PORT: u32 = 12 * 8;
/// Bits of `PolicyKeyData` up to and including the port.
pub const POLICY_PREFIX_FULL: u32 = POLICY_PREFIX_ANY_PORT + 16;

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct PolicyValue {
    /// `flags::*` bits, already merged with every less specific entry of the
    /// same (slot, direction, protocol, local, peer) by the compiler.
    pub flags: u32,
    /// Rule that decided (index into the agent's rule table, 0 = none).
    pub rule_id: u32,
}

/// Key of the enforcement map: "is this identity selected in this direction?"
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EnforcedKey {
    pub slot: u8,
    pub direction: u8,
    pub _pad: [u8; 2],
    pub identity: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct EnforcedValue {
    /// Rule-table id of the first policy that selects the identity; names the
    /// policy in `default-deny` audit events.
    pub policy_rule_id: u32,
    /// `flags::AUDIT_DENY` when every selecting policy is in audit mode.
    pub flags: u32,
}

/// Key of the flow cache: a verdict remembered per socket and peer.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub socket_cookie: u64,
    pub peer_addr: [u8; 16],
    pub peer_port: u16,
    pub protocol: u8,
    pub _pad: [u8; 5],
}

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct FlowValue {
    /// Policy generation the verdict was reached under.
    pub generation: u32,
    /// The direction the flow was first judged in (`DIR_*`): a flow opened by
    /// an egress send is judged again as that egress after a table change,
    /// whichever way its next packet goes; likewise for ingress.
    pub direction: u8,
    /// `flow_flags::*`.
    pub flags: u8,
    /// The destination port of that first judgement (the peer's on egress,
    /// ours on ingress).
    pub port: u16,
}

/// `FlowValue::flags` bits.
pub mod flow_flags {
    /// The flow was judged again under this generation and denied: its
    /// packets drop without another lookup or audit event (a revoked TCP
    /// connection).
    pub const DENIED: u8 = 1;
}

/// Value of the ipcache: who an address is, and where it lies among the
/// blocks policies name. A CIDR rule matches addresses, not identities: an
/// address is judged by `identity` for rules that name workloads and
/// identities, and by `cidr_identity` for rules that name blocks, so an
/// identity with one address inside a block and another inside its
/// `except` is allowed at the first only.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Hash, PartialOrd, Ord)]
pub struct IpcacheValue {
    pub identity: u32,
    /// The identity of the most specific block a policy names that holds
    /// the address (`identity::ANY`, 0: none).
    pub cidr_identity: u32,
}

impl IpcacheValue {
    /// An identity inside no block a policy names.
    pub const fn of(identity: u32) -> IpcacheValue {
        IpcacheValue {
            identity,
            cidr_identity: identity::ANY,
        }
    }
}

/// Key of the Service map: a frontend (ClusterIP, external or load-balancer
/// address, or a node address with a NodePort) as a client addresses it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceKey {
    /// IPv4 as `::ffff:a.b.c.d`.
    pub addr: [u8; 16],
    pub port: u16,
    pub protocol: u8,
    pub _pad: u8,
}

/// Distinct (identity, target port) pairs the kernel judges per Service frontend.
pub const MAX_SERVICE_BACKENDS: usize = 4;

/// One distinct backend of a Service: what a connection to the frontend
/// becomes after the node's DNAT.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Hash, PartialOrd, Ord)]
pub struct ServiceBackend {
    pub identity: u32,
    /// The backend address's block identity (see [`IpcacheValue`]).
    pub cidr_identity: u32,
    /// Target port on the backend.
    pub port: u16,
    pub _pad: u16,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ServiceValue {
    /// Names the Service in audit events (index into the agent's table).
    pub service_id: u32,
    /// Distinct backends in `backends`; 0 = no endpoints (the connection is
    /// left to the node, which refuses it); more than `MAX_SERVICE_BACKENDS`
    /// = too many to judge (refused).
    pub count: u8,
    pub _pad: [u8; 3],
    pub backends: [ServiceBackend; MAX_SERVICE_BACKENDS],
}

/// Key of the own-address map: "is `addr` one of this workload's addresses?"
/// Traffic of a workload to itself always passes (upstream NetworkPolicy
/// semantics: loopback follows no policy).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SelfKey {
    pub cgroup_id: u64,
    pub addr: [u8; 16],
}

/// One audit event, written by the kernel into the ring buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AuditEvent {
    /// `bpf_ktime_get_ns()` (CLOCK_MONOTONIC).
    pub timestamp_ns: u64,
    pub cgroup_id: u64,
    pub local_identity: u32,
    pub peer_identity: u32,
    /// Peer address (IPv4 as `::ffff:a.b.c.d`).
    pub peer_addr: [u8; 16],
    /// Process id (egress only; 0 on ingress).
    pub pid: u32,
    /// Rule that decided, or 0 for the default deny of `policy_rule_id`'s policy.
    pub rule_id: u32,
    /// Rule-table id of the policy that selected the local identity.
    pub policy_rule_id: u32,
    /// Destination port (host byte order).
    pub port: u16,
    /// Peer's port (host byte order): the source port on ingress.
    pub peer_port: u16,
    pub protocol: u8,
    pub direction: u8,
    pub verdict: u8,
    /// 4 or 6.
    pub family: u8,
    /// The Service addressed (`ServiceValue::service_id`), 0 = none.
    pub service_id: u32,
    /// Command name (egress only).
    pub comm: [u8; 16],
    /// `reason::*`.
    pub reason: u8,
    pub _pad: [u8; 7],
}

const _: () = assert!(size_of::<PolicyKeyData>() == 16);
const _: () = assert!(size_of::<PolicyValue>() == 8);
const _: () = assert!(size_of::<EnforcedKey>() == 8);
const _: () = assert!(size_of::<EnforcedValue>() == 8);
const _: () = assert!(size_of::<FlowKey>() == 32);
const _: () = assert!(size_of::<FlowValue>() == 8);
const _: () = assert!(size_of::<SelfKey>() == 24);
const _: () = assert!(size_of::<AuditEvent>() == 88);
const _: () = assert!(size_of::<ServiceKey>() == 20);
const _: () = assert!(size_of::<ServiceValue>() == 56);
const _: () = assert!(size_of::<IpcacheValue>() == 8);
const _: () = assert!(core::mem::offset_of!(PolicyKeyData, port_be) == 12);

/// The verdict from the policy lookups, shared by the kernel
/// (`ebpf/src/verdict.rs`) and user space's model of it (`policy::lookup`), so
/// both apply one precedence. `peer`, `block` and `any` are (flags, rule id)
/// of the longest-prefix matches with the peer's identity, with the block
/// identity of its address (`IpcacheValue::cidr_identity`) and with `ANY`
/// ((0, 0) when nothing matched); `enforcement_flags` is
/// `EnforcedValue::flags`.
///
/// 1. an enforcing deny rule (`DENY`) in any ⇒ deny;
/// 2. an audit-mode deny rule with some allow ⇒ `would-deny` (passes);
/// 3. an enforcing allow rule ⇒ allow;
/// 4. every selecting policy in audit mode: an audit allow ⇒ allow,
///    otherwise ⇒ `would-deny` (passes);
/// 5. otherwise the default deny of the selecting policy (rule 0).
///
/// Returns (`verdict::*`, rule id).
#[inline(always)]
pub fn resolve(
    peer: (u32, u32),
    block: (u32, u32),
    any: (u32, u32),
    enforcement_flags: u32,
) -> (u8, u32) {
    let all = peer.0 | block.0 | any.0;
    let pick = |bit: u32| {
        if peer.0 & bit != 0 {
            peer.1
        } else if block.0 & bit != 0 {
            block.1
        } else {
            any.1
        }
    };
    let audit_only = enforcement_flags & flags::AUDIT_DENY != 0;
    if all & flags::DENY != 0 {
        (verdict::DENY, pick(flags::DENY))
    } else if all & flags::AUDIT_DENY != 0 && all & (flags::ALLOW | flags::AUDIT_ALLOW) != 0 {
        (verdict::WOULD_DENY, pick(flags::AUDIT_DENY))
    } else if all & flags::ALLOW != 0 {
        (verdict::ALLOW, pick(flags::ALLOW))
    } else if audit_only && all & flags::AUDIT_ALLOW != 0 {
        (verdict::ALLOW, pick(flags::AUDIT_ALLOW))
    } else if audit_only {
        (verdict::WOULD_DENY, pick(flags::AUDIT_DENY))
    } else {
        (verdict::DENY, 0)
    }
}

/// The own-address key that marks a workload with its own network namespace:
/// its loopback traffic is traffic to itself (`SelfKey { cgroup_id, addr: LOOPBACK_MARK }`).
pub const LOOPBACK_MARK: [u8; 16] = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];

/// Is `addr` (IPv4 mapped) a loopback address (127.0.0.0/8 or ::1)?
#[inline(always)]
pub fn is_loopback(addr: &[u8; 16]) -> bool {
    // Byte by byte: no slice comparison (which would need memcmp in the kernel).
    let mut zeros = 0u8;
    let mut i = 0;
    while i < 10 {
        zeros |= addr[i];
        i += 1;
    }
    if zeros != 0 {
        return false;
    }
    let v4_mapped_loopback = addr[10] == 0xff && addr[11] == 0xff && addr[12] == 127;
    let v6_loopback = addr[10] | addr[11] | addr[12] | addr[13] | addr[14] == 0 && addr[15] == 1;
    v4_mapped_loopback || v6_loopback
}

/// Maps an IPv4 address (network order octets) into the ipcache's IPv6 space.
pub const fn v4_mapped(octets: [u8; 4]) -> [u8; 16] {
    [
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, octets[0], octets[1], octets[2], octets[3],
    ]
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: every type is #[repr(C)], made of integers and byte arrays with
    // explicit padding fields, so any bit pattern is valid and none is implicit.
    unsafe impl aya::Pod for super::PolicyKeyData {}
    unsafe impl aya::Pod for super::PolicyValue {}
    unsafe impl aya::Pod for super::EnforcedKey {}
    unsafe impl aya::Pod for super::EnforcedValue {}
    unsafe impl aya::Pod for super::FlowKey {}
    unsafe impl aya::Pod for super::FlowValue {}
    unsafe impl aya::Pod for super::SelfKey {}
    unsafe impl aya::Pod for super::AuditEvent {}
    unsafe impl aya::Pod for super::ServiceKey {}
    unsafe impl aya::Pod for super::ServiceValue {}
    unsafe impl aya::Pod for super::IpcacheValue {}
}
