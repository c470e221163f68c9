//! Palisade's kernel programs. One file per attach point, shared logic in
//! `verdict` (the policy lookup and the audit event) and the maps here.
//!
//! Architecture invariant: nothing here panics. Every map lookup that can fail
//! is handled as a value; loops are bounded by constants; every map has an
//! explicit capacity (overridden by the agent at load time).
#![no_std]
#![no_main]

mod egress;
mod egress_packet;
mod ingress;
mod packet;
mod socket;
mod verdict;

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, RingBuf},
};
use palisade_common::{
    EnforcedKey, EnforcedValue, FlowKey, FlowValue, PolicyKeyData, PolicyValue, SelfKey,
    ServiceKey, ServiceValue, capacity, counter, state,
};

/// cgroup id → identity of the workload that owns the cgroup.
#[map(name = "PAL_CGROUP_V1")]
static CGROUP_IDENTITY: HashMap<u64, u32> = HashMap::with_max_entries(capacity::CGROUP_IDENTITY, 0);

/// IP prefix (IPv6, IPv4 mapped) → identity of the peer at that address,
/// and its block identity (`IpcacheValue`).
#[map(name = "PAL_IPCACHE_V2")]
static IPCACHE: LpmTrie<[u8; 16], palisade_common::IpcacheValue> =
    LpmTrie::with_max_entries(capacity::IPCACHE, 0);

/// (slot, direction, protocol, local, peer, port prefix) → rule flags.
#[map(name = "PAL_POLICY_V1")]
static POLICY: LpmTrie<PolicyKeyData, PolicyValue> = LpmTrie::with_max_entries(capacity::POLICY, 0);

/// (slot, direction, identity) present ⇔ the identity is selected by a policy
/// in that direction (and so is default-deny there).
#[map(name = "PAL_ENFORCED_V1")]
static ENFORCED: HashMap<EnforcedKey, EnforcedValue> =
    HashMap::with_max_entries(capacity::ENFORCED, 0);

/// Verdicts remembered per (socket, peer): replies and later datagrams of a
/// judged UDP flow pass without a second policy lookup.
#[map(name = "PAL_FLOWS_V2")]
static FLOWS: LruHashMap<FlowKey, FlowValue> = LruHashMap::with_max_entries(capacity::FLOWS, 0);

/// (cgroup id, address) present ⇔ the address is the workload's own: its
/// traffic to itself is not judged.
#[map(name = "PAL_SELF_V1")]
static SELF_ADDRESSES: HashMap<SelfKey, u8> = HashMap::with_max_entries(capacity::IPCACHE, 0);

/// Service frontend (address, port, protocol) → its distinct backends:
/// egress to a Service is judged as egress to what the node's DNAT makes of it.
#[map(name = "PAL_SERVICES_V2")]
static SERVICES: HashMap<ServiceKey, ServiceValue> =
    HashMap::with_max_entries(capacity::SERVICES, 0);

/// Values written by the agent; see `palisade_common::state`.
#[map(name = "PAL_STATE_V1")]
static STATE: Array<u32> = Array::with_max_entries(state::COUNT, 0);

/// Verdict and audit counters; see `palisade_common::counter`.
#[map(name = "PAL_COUNTERS_V2")]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(counter::COUNT, 0);

/// Audit events for denied (and would-be denied) connections.
#[map(name = "PAL_AUDIT_V2")]
static AUDIT: RingBuf = RingBuf::with_byte_size(capacity::AUDIT_RING_BYTES, 0);

/// The identity of a cgroup below the root. One the agent has not
/// classified yet (created a moment ago, or while no agent ran) is held at
/// `reserved:pending`, which the agent keeps fail-closed (both directions
/// denied by default): never more open than its eventual classification.
#[inline(always)]
pub fn cgroup_identity(cgroup_id: u64) -> u32 {
    // SAFETY: the value is copied out at once.
    match unsafe { CGROUP_IDENTITY.get(&cgroup_id) } {
        Some(id) => *id,
        None => palisade_common::identity::PENDING,
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // Unreachable: the code has no panicking paths (no indexing, no unwrap).
    loop {}
}

/// GPL-2.0 OR MIT: the kernel reads "Dual MIT/GPL" as GPL-compatible, which
/// the GPL-only helpers (ring buffer, socket cookies) require.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
