//! The policy decision shared by every program, and the audit event.
//!
//! Lookup (the precedence itself is `palisade_common::resolve`, shared with
//! user space's model in `agent/src/policy/lookup.rs`):
//! 1. the local identity comes from the socket's cgroup (an unknown cgroup
//!    is `reserved:pending`); the peer's identity and block identity from
//!    the ipcache;
//! 2. `ENFORCED[(slot, dir, local)]` absent ⇒ not selected in this direction ⇒ pass;
//! 3. `POLICY` longest-prefix match with the exact peer identity, with the
//!    peer address's block identity (rules naming CIDRs match addresses),
//!    and with `ANY` as the peer; each match already carries the flags of
//!    every less specific port prefix (the compiler merges them);
//! 4. `resolve` turns the three matches into the verdict.
//!
//! Before the lookups: traffic with the node (`identity::HOST`) passes when
//! `options::HOST_ALWAYS_ALLOWED` is set; loopback of a workload with its own
//! network namespace is the workload itself. An egress destination that is a
//! Service frontend (`SERVICES`) is judged as the connection to each distinct
//! backend (identity, block identity, target port); backends that disagree
//! refuse it whole.
//! Datagram flows are remembered with the direction they were first judged
//! in, and judged again that way after a table change.
use aya_ebpf::{
    bindings::{BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP},
    helpers::{bpf_get_current_comm, bpf_get_current_pid_tgid, generated::bpf_ktime_get_ns},
    maps::lpm_trie::Key,
};
use palisade_common::{
    AuditEvent, DIR_EGRESS, DIR_INGRESS, EnforcedKey, EnforcedValue, FlowKey, FlowValue,
    IpcacheValue, LOOPBACK_MARK, MAX_SERVICE_BACKENDS, POLICY_PREFIX_FULL, PolicyKeyData, SelfKey,
    ServiceKey, ServiceValue, counter, flow_flags, identity, is_loopback, options, reason, resolve,
    state, verdict as v,
};

use crate::{AUDIT, COUNTERS, ENFORCED, FLOWS, IPCACHE, POLICY, SELF_ADDRESSES, SERVICES, STATE};

/// What the programs tell the kernel.
pub const PASS: i32 = 1;
pub const DROP: i32 = 0;

/// The traffic being judged.
#[derive(Clone, Copy)]
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
    /// Judged in the sending process's context (connect/sendmsg): the audit
    /// event can carry its pid and command.
    pub in_process: bool,
}

/// The result of a policy lookup.
#[derive(Clone, Copy)]
pub struct Decision {
    pub verdict: u8,
    pub rule_id: u32,
    pub policy_rule_id: u32,
    pub peer_identity: u32,
    pub service_id: u32,
    pub reason: u8,
}

#[inline(always)]
pub fn read_state(index: u32) -> u32 {
    match STATE.get(index) {
        Some(value) => *value,
        None => 0,
    }
}

#[inline(always)]
pub fn active_slot() -> u8 {
    (read_state(state::ACTIVE_SLOT) & 1) as u8
}

#[inline(always)]
pub fn count(index: u32) {
    if let Some(slot) = COUNTERS.get_ptr_mut(index) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU.
        unsafe { *slot += 1 };
    }
}

/// Who `addr` is, and the block identity rules naming blocks judge it by.
#[inline(always)]
pub fn peer_identity(addr: &[u8; 16]) -> IpcacheValue {
    match IPCACHE.get(&Key::new(128, *addr)) {
        Some(value) => *value,
        None => IpcacheValue {
            identity: identity::WORLD,
            cidr_identity: identity::ANY,
        },
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

/// Loopback traffic of a workload with its own network namespace is the
/// workload talking to itself (the agent marks such workloads with
/// `LOOPBACK_MARK`). Workloads in the host's namespace are not marked: their
/// loopback peer is the host (`identity::HOST` in the ipcache).
#[inline(always)]
pub fn own_loopback(cgroup_id: u64, addr: &[u8; 16]) -> bool {
    is_loopback(addr) && own_address(cgroup_id, &LOOPBACK_MARK)
}

/// Is `local` selected by a policy in `direction` in `slot`?
/// Returns the enforcement value when it is.
#[inline(always)]
pub fn enforced(slot: u8, direction: u8, local: u32) -> Option<EnforcedValue> {
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
fn lookup(slot: u8, flow: &Flow, peer: u32, port: u16) -> (u32, u32) {
    let data = PolicyKeyData {
        slot,
        direction: flow.direction,
        protocol: flow.protocol,
        _pad0: 0,
        local_identity: flow.local_identity,
        peer_identity: peer,
        port_be: port.to_be_bytes(),
        _pad1: [0; 2],
    };
    match POLICY.get(&Key::new(POLICY_PREFIX_FULL, data)) {
        Some(value) => (value.flags, value.rule_id),
        None => (0, 0),
    }
}

/// Judges `flow` as traffic with `peer` on `port` under `enforcement`:
/// rules naming workloads by `peer.identity`, rules naming blocks by
/// `peer.cidr_identity` (the address's place among the blocks).
/// Traffic with the node itself passes first when the agent says so.
#[inline(always)]
fn decide_peer(
    slot: u8,
    flow: &Flow,
    peer_at: IpcacheValue,
    port: u16,
    enforcement: &EnforcedValue,
) -> Decision {
    let peer = peer_at.identity;
    let block = peer_at.cidr_identity;
    if peer == identity::HOST && read_state(state::OPTIONS) & options::HOST_ALWAYS_ALLOWED != 0 {
        return Decision {
            verdict: v::ALLOW,
            rule_id: 0,
            policy_rule_id: enforcement.policy_rule_id,
            peer_identity: peer,
            service_id: 0,
            reason: reason::POLICY,
        };
    }
    // Looked up whatever the block (none: the `ANY` entries again; the
    // peer's own identity: its entries again): fewer paths for the
    // verifier than a test, and the same verdict.
    let (verdict, rule_id) = resolve(
        lookup(slot, flow, peer, port),
        lookup(slot, flow, block, port),
        lookup(slot, flow, identity::ANY, port),
        enforcement.flags,
    );
    Decision {
        verdict,
        rule_id,
        policy_rule_id: enforcement.policy_rule_id,
        peer_identity: peer,
        service_id: 0,
        reason: reason::POLICY,
    }
}

/// The Service frontend `flow` addresses, if any.
#[inline(always)]
fn service(flow: &Flow) -> Option<ServiceValue> {
    let key = ServiceKey {
        addr: flow.peer_addr,
        port: flow.port,
        protocol: flow.protocol,
        _pad: 0,
    };
    // SAFETY: the value is copied out at once.
    unsafe { SERVICES.get(&key) }.copied()
}

/// Judges a connection to a Service as the same connection to its backends
/// on their target ports (what the node's DNAT will make of it). Backends
/// that agree decide; backends that disagree refuse the connection whole
/// (fail closed), naming the Service; a Service with no backend to judge is
/// refused too (the node might forward to one the agent has not learned).
#[inline(always)]
fn decide_service(
    slot: u8,
    flow: &Flow,
    svc: &ServiceValue,
    enforcement: &EnforcedValue,
) -> Decision {
    let refused = |why| Decision {
        verdict: v::DENY,
        rule_id: 0,
        policy_rule_id: enforcement.policy_rule_id,
        peer_identity: identity::WORLD,
        service_id: svc.service_id,
        reason: why,
    };
    let count = usize::from(svc.count);
    if count == 0 {
        return refused(reason::SERVICE_NO_BACKENDS);
    }
    if count > MAX_SERVICE_BACKENDS {
        return refused(reason::SERVICE_TOO_MANY_BACKENDS);
    }
    // Plain values with flags rather than `Option<Decision>`: the
    // verifier refuses code that copies an uninitialised `None` payload.
    let (mut denied, mut passed) = (refused(reason::POLICY), refused(reason::POLICY));
    let (mut any_denied, mut any_passed) = (false, false);
    for i in 0..MAX_SERVICE_BACKENDS {
        if i >= count {
            break;
        }
        let Some(backend) = svc.backends.get(i) else {
            break;
        };
        let at = IpcacheValue {
            identity: backend.identity,
            cidr_identity: backend.cidr_identity,
        };
        let d = decide_peer(slot, flow, at, backend.port, enforcement);
        if d.verdict == v::DENY {
            if !any_denied {
                denied = d;
                any_denied = true;
            }
        } else if !any_passed || d.verdict == v::WOULD_DENY {
            passed = d;
            any_passed = true;
        }
    }
    let (mut decision, reason) = match (any_passed, any_denied) {
        (true, false) => (passed, reason::POLICY),
        (false, true) => (denied, reason::POLICY),
        (true, true) => (denied, reason::SERVICE_BACKENDS_DISAGREE),
        (false, false) => return refused(reason::SERVICE_NO_BACKENDS),
    };
    decision.service_id = svc.service_id;
    decision.reason = reason;
    decision
}

/// Judges traffic the workload sends to `flow.peer_addr:flow.port` (a
/// connect, a send, or a flow first opened by a send that is judged again
/// after a table change). Returns what the program must answer.
#[inline(always)]
pub fn judge_egress<const TASK: bool>(flow: &Flow) -> i32 {
    match decide_egress(flow) {
        Some(decision) => conclude::<TASK>(flow, &decision),
        None => PASS,
    }
}

/// The decision on egress `flow`; `None`: it passes without a policy
/// verdict (egress open, loopback of its own, its own address).
#[inline(always)]
fn decide_egress(flow: &Flow) -> Option<Decision> {
    let slot = active_slot();
    // Egress open for this identity.
    let enforcement = enforced(slot, DIR_EGRESS, flow.local_identity)?;
    if own_loopback(flow.cgroup_id, &flow.peer_addr) {
        return None;
    }
    let decision = match service(flow) {
        Some(svc) => decide_service(slot, flow, &svc, &enforcement),
        None => decide_peer(
            slot,
            flow,
            peer_identity(&flow.peer_addr),
            flow.port,
            &enforcement,
        ),
    };
    // A workload talking to itself always passes (its own address, or a
    // Service whose only endpoint it is); asked only when policy would not
    // allow it, so allowed traffic pays no extra lookup.
    if decision.verdict != v::ALLOW && own_address(flow.cgroup_id, &flow.peer_addr) {
        return None;
    }
    Some(decision)
}

/// Judges traffic from `flow.peer_addr` to the workload's `flow.port`.
#[inline(always)]
pub fn judge_ingress<const TASK: bool>(flow: &Flow) -> i32 {
    match decide_ingress(flow) {
        Some(decision) => conclude::<TASK>(flow, &decision),
        None => PASS,
    }
}

/// The decision on ingress `flow`; `None`: ingress open for its identity.
#[inline(always)]
fn decide_ingress(flow: &Flow) -> Option<Decision> {
    let slot = active_slot();
    let enforcement = enforced(slot, DIR_INGRESS, flow.local_identity)?;
    Some(decide_peer(
        slot,
        flow,
        peer_identity(&flow.peer_addr),
        flow.port,
        &enforcement,
    ))
}

/// Judges a segment of an established TCP connection (not a SYN), in
/// either direction, once per policy generation per connection: a change
/// that denies the connection stops it (revocation). `flow` names this
/// packet's socket, peer address and the peer's port; `local_port` is ours.
/// The flow cache says how the connection was opened — by our `connect()`
/// (recorded there; judged again as that egress) or by the peer (as that
/// ingress). A connection it does not know was accepted (or is older than
/// the programs, or was evicted): judged as ingress, and when that denies
/// it, as egress (an outgoing connection older than the programs). A
/// denied connection is remembered as such: its later packets drop with one
/// lookup and no more audit events.
#[inline(always)]
pub fn judge_established(flow: &Flow, local_port: u16) -> i32 {
    let generation = read_state(state::GENERATION);
    // SAFETY: the value is copied out at once.
    let known = unsafe { FLOWS.get(&flow_key(flow)) }.copied();
    if let Some(value) = known
        && value.generation == generation
    {
        return if value.flags & flow_flags::DENIED != 0 {
            DROP
        } else {
            PASS
        };
    }
    let mut flow = *flow;
    flow.local_identity = crate::cgroup_identity(flow.cgroup_id);
    let ingress = as_first_judged(&flow, DIR_INGRESS, local_port);
    let egress = as_first_judged(&flow, DIR_EGRESS, flow.peer_port);
    let (first, decision) = match known {
        Some(value) if value.direction == DIR_EGRESS => {
            let first = as_first_judged(&flow, DIR_EGRESS, value.port);
            (first, decide_egress(&first))
        }
        Some(value) => {
            let first = as_first_judged(&flow, DIR_INGRESS, value.port);
            (first, decide_ingress(&first))
        }
        None => match decide_ingress(&ingress) {
            Some(d) if d.verdict != v::ALLOW => match decide_egress(&egress) {
                Some(e) if e.verdict != v::ALLOW => (ingress, Some(d)),
                e => (egress, e),
            },
            d => (ingress, d),
        },
    };
    let verdict = match decision {
        Some(d) if d.verdict != v::ALLOW => conclude::<false>(&first, &d),
        _ => PASS,
    };
    let value = FlowValue {
        generation,
        direction: first.direction,
        flags: if verdict == PASS {
            0
        } else {
            flow_flags::DENIED
        },
        port: first.port,
    };
    if FLOWS.insert(&flow_key(&flow), &value, 0).is_err() {
        count(counter::FLOW_INSERT_FAILED);
    }
    verdict
}

impl Flow {
    /// Traffic of `local` with no peer to name (a packet that could not be
    /// parsed, a socket refused): only the workload and the direction.
    #[inline(always)]
    pub fn without_peer(direction: u8, cgroup_id: u64, local: u32) -> Flow {
        Flow {
            direction,
            protocol: 0,
            local_identity: local,
            cgroup_id,
            peer_addr: [0; 16],
            family: 0,
            port: 0,
            peer_port: 0,
            socket_cookie: 0,
            in_process: direction == DIR_EGRESS,
        }
    }
}

/// Refuses `flow` for a reason other than a policy rule (`reason::*`):
/// counted as a deny, with an audit event giving `why`. Returns `DROP`.
#[inline(always)]
pub fn refuse<const TASK: bool>(flow: &Flow, why: u8) -> i32 {
    let decision = Decision {
        verdict: v::DENY,
        rule_id: 0,
        policy_rule_id: 0,
        peer_identity: identity::WORLD,
        service_id: 0,
        reason: why,
    };
    conclude::<TASK>(flow, &decision);
    DROP
}

/// Counts the decision and, for a deny or would-deny, writes an audit event.
/// Returns what the program must answer.
#[inline(always)]
pub fn conclude<const TASK: bool>(flow: &Flow, decision: &Decision) -> i32 {
    let egress = flow.direction == DIR_EGRESS;
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
    emit::<TASK>(flow, decision);
    if decision.verdict == v::WOULD_DENY {
        PASS
    } else {
        DROP
    }
}

#[inline(always)]
fn emit<const TASK: bool>(flow: &Flow, decision: &Decision) {
    count(counter::EVENTS_EMITTED);
    // `TASK`: the program type may call the task helpers (socket hooks and
    // the LSM; packet programs may not before Linux 6.x — the 6.1 verifier
    // refuses the call even on a path never taken).
    let (pid, comm) = if TASK && flow.in_process {
        (
            (bpf_get_current_pid_tgid() >> 32) as u32,
            bpf_get_current_comm().unwrap_or([0; 16]),
        )
    } else {
        (0, [0; 16])
    };
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
        service_id: decision.service_id,
        comm,
        reason: decision.reason,
        _pad: [0; 7],
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

/// What the flow cache knows of a datagram flow (socket, peer).
pub enum Known {
    /// Judged under the current policy generation (either direction).
    Fresh,
    /// Judged under an older generation, first in `direction` on `port`:
    /// judge it again that way.
    Stale {
        direction: u8,
        port: u16,
    },
    Unknown,
}

#[inline(always)]
pub fn flow_state(flow: &Flow) -> Known {
    let generation = read_state(state::GENERATION);
    // SAFETY: the value is copied out at once.
    match unsafe { FLOWS.get(&flow_key(flow)) } {
        Some(value) if value.generation == generation => Known::Fresh,
        Some(value) => Known::Stale {
            direction: value.direction,
            port: value.port,
        },
        None => Known::Unknown,
    }
}

/// Remembers that the flow passed, first judged in `direction` on `port`.
#[inline(always)]
pub fn remember_flow(flow: &Flow, direction: u8, port: u16) {
    let value = FlowValue {
        generation: read_state(state::GENERATION),
        direction,
        flags: 0,
        port,
    };
    if FLOWS.insert(&flow_key(flow), &value, 0).is_err() {
        count(counter::FLOW_INSERT_FAILED);
    }
}

/// A flow in its first direction, for judging it again.
#[inline(always)]
pub fn as_first_judged(flow: &Flow, direction: u8, port: u16) -> Flow {
    let mut first = *flow;
    first.direction = direction;
    first.port = port;
    first.in_process = first.in_process && direction == DIR_EGRESS;
    first
}
