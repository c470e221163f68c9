//! The policy decision shared by every program, and the audit event.
//!
//! Lookup (the precedence itself is `palisade_common::resolve`, shared with
//! user space's model in `agent/src/policy/lookup.rs`):
//! 1. the local identity comes from the socket's cgroup; an unknown cgroup is
//!    not managed and passes;
//! 2. `ENFORCED[(slot, dir, local)]` absent ⇒ not selected in this direction ⇒ pass;
//! 3. `POLICY` longest-prefix match with the exact peer identity, and again
//!    with `ANY` as the peer; each match already carries the flags of every
//!    less specific port prefix (the compiler merges them);
//! 4. `resolve` turns the two matches into the verdict.
use aya_ebpf::{
    bindings::{BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP},
    helpers::generated::bpf_ktime_get_ns,
    maps::lpm_trie::Key,
};
use palisade_common::{
    AuditEvent, EnforcedKey, FlowKey, FlowValue, POLICY_PREFIX_FULL, PolicyKeyData, SelfKey,
    counter, identity, resolve, state, verdict as v,
};

use crate::{AUDIT, COUNTERS, ENFORCED, FLOWS, IPCACHE, POLICY, SELF_ADDRESSES, STATE};

/// What the programs tell the kernel.
pub const PASS: i32 = 1;
pub const DROP: i32 = 0;

/// The traffic being judged.
pub struct Flow {
    pub direction: u8,
    pub protocol: u8,
    pub local_identity: u32,
    pub cgroup_id: u64,
    pub peer_addr: [u8; 16],
    pub family: u8,
    /// Destination port: the peer's on egress, ours on ingress.
    pub port: u16,
    pub peer_port: u16,
    pub socket_cookie: u64,
}

/// The result of a policy lookup.
pub struct Decision {
    pub verdict: u8,
    pub rule_id: u32,
    pub policy_rule_id: u32,
    pub peer_identity: u32,
}

#[inline(always)]
pub fn read_state(index: u32) -> u32 {
    match STATE.get(index) {
        Some(value) => *value,
        None => 0,
    }
}

#[inline(always)]
pub fn count(index: u32) {
    if let Some(slot) = COUNTERS.get_ptr_mut(index) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU.
        unsafe { *slot += 1 };
    }
}

#[inline(always)]
pub fn peer_identity(addr: &[u8; 16]) -> u32 {
    match IPCACHE.get(&Key::new(128, *addr)) {
        Some(id) => *id,
        None => identity::WORLD,
    }
}

/// Is `addr` one of the workload's own addresses?
#[inline(always)]
pub fn own_address(cgroup_id: u64, addr: &[u8; 16]) -> bool {
    let key = SelfKey {
        cgroup_id,
        addr: *addr,
    };
    // SAFETY: only presence is read.
    unsafe { SELF_ADDRESSES.get(&key) }.is_some()
}

/// Is `local` selected by a policy in `direction` in the active slot?
/// Returns the enforcement value when it is.
#[inline(always)]
pub fn enforced(slot: u8, direction: u8, local: u32) -> Option<palisade_common::EnforcedValue> {
    let key = EnforcedKey {
        slot,
        direction,
        _pad: [0; 2],
        identity: local,
    };
    // SAFETY: the value is copied out at once.
    unsafe { ENFORCED.get(&key) }.copied()
}

#[inline(always)]
fn lookup(slot: u8, flow: &Flow, peer: u32) -> (u32, u32) {
    let data = PolicyKeyData {
        slot,
        direction: flow.direction,
        protocol: flow.protocol,
        _pad0: 0,
        local_identity: flow.local_identity,
        peer_identity: peer,
        port_be: flow.port.to_be_bytes(),
        _pad1: [0; 2],
    };
    match POLICY.get(&Key::new(POLICY_PREFIX_FULL, data)) {
        Some(value) => (value.flags, value.rule_id),
        None => (0, 0),
    }
}

/// Judges `flow` against the active policy tables. `None` means the local
/// identity is not selected in this direction: the traffic is not ours to judge.
#[inline(always)]
pub fn decide(flow: &Flow) -> Option<Decision> {
    let slot = (read_state(state::ACTIVE_SLOT) & 1) as u8;
    let enforcement = enforced(slot, flow.direction, flow.local_identity)?;
    let peer = peer_identity(&flow.peer_addr);
    let (verdict, rule_id) = resolve(
        lookup(slot, flow, peer),
        lookup(slot, flow, identity::ANY),
        enforcement.flags,
    );
    Some(Decision {
        verdict,
        rule_id,
        policy_rule_id: enforcement.policy_rule_id,
        peer_identity: peer,
    })
}

/// Counts the decision and, for a deny or would-deny, writes an audit event.
/// Returns what the program must answer.
#[inline(always)]
pub fn conclude(flow: &Flow, decision: &Decision, pid: u32, comm: [u8; 16]) -> i32 {
    let egress = flow.direction == palisade_common::DIR_EGRESS;
    let counter_index = match (decision.verdict, egress) {
        (v::ALLOW, true) => counter::EGRESS_ALLOW,
        (v::ALLOW, false) => counter::INGRESS_ALLOW,
        (v::WOULD_DENY, true) => counter::EGRESS_WOULD_DENY,
        (v::WOULD_DENY, false) => counter::INGRESS_WOULD_DENY,
        (_, true) => counter::EGRESS_DENY,
        (_, false) => counter::INGRESS_DENY,
    };
    count(counter_index);
    if decision.verdict == v::ALLOW {
        return PASS;
    }
    emit(flow, decision, pid, comm);
    if decision.verdict == v::WOULD_DENY {
        PASS
    } else {
        DROP
    }
}

#[inline(always)]
fn emit(flow: &Flow, decision: &Decision, pid: u32, comm: [u8; 16]) {
    count(counter::EVENTS_EMITTED);
    let Some(mut entry) = AUDIT.reserve::<AuditEvent>(0) else {
        count(counter::EVENTS_LOST);
        return;
    };
    entry.write(AuditEvent {
        // SAFETY: helper without arguments.
        timestamp_ns: unsafe { bpf_ktime_get_ns() },
        cgroup_id: flow.cgroup_id,
        local_identity: flow.local_identity,
        peer_identity: decision.peer_identity,
        peer_addr: flow.peer_addr,
        pid,
        rule_id: decision.rule_id,
        policy_rule_id: decision.policy_rule_id,
        port: flow.port,
        peer_port: flow.peer_port,
        protocol: flow.protocol,
        direction: flow.direction,
        verdict: decision.verdict,
        family: flow.family,
        _pad: [0; 4],
        comm,
    });
    // Waking the reader costs ~10 µs per event (irq_work); the reader polls on
    // a short timer anyway, so wake it only once the ring is filling up.
    let threshold = u64::from(read_state(state::WAKEUP_BYTES));
    let wakeup = if AUDIT.query(BPF_RB_AVAIL_DATA.into()) >= threshold {
        BPF_RB_FORCE_WAKEUP
    } else {
        BPF_RB_NO_WAKEUP
    };
    entry.submit(wakeup.into());
}

#[inline(always)]
fn flow_key(flow: &Flow) -> FlowKey {
    FlowKey {
        socket_cookie: flow.socket_cookie,
        peer_addr: flow.peer_addr,
        peer_port: flow.peer_port,
        protocol: flow.protocol,
        _pad: [0; 5],
    }
}

/// Has this socket already exchanged traffic with this peer under the current
/// policy generation (in either direction)?
#[inline(always)]
pub fn flow_known(flow: &Flow) -> bool {
    let generation = read_state(state::GENERATION);
    // SAFETY: the value is copied out at once.
    match unsafe { FLOWS.get(&flow_key(flow)) } {
        Some(value) => value.generation == generation,
        None => false,
    }
}

#[inline(always)]
pub fn remember_flow(flow: &Flow) {
    let value = FlowValue {
        generation: read_state(state::GENERATION),
        _pad: 0,
    };
    if FLOWS.insert(&flow_key(flow), &value, 0).is_err() {
        count(counter::FLOW_INSERT_FAILED);
    }
}
