//! Egress at the packet: `cgroup_skb/egress` on what actually leaves a
//! workload, whatever the socket address said. The socket hooks judged the
//! address a TCP or UDP socket was connected or sent to; everything else is
//! judged here:
//!
//! - a source route (an IPv6 routing header with segments left, set with
//!   `IPV6_RTHDR` — no capability needed — or IPv4 options): dropped;
//! - a source address that is not the workload's own (a raw socket, or an
//!   address the workload added to its interface): dropped;
//! - a raw IP socket's packets, which no socket hook saw: every packet judged
//!   by its real destination (and ports, or ICMP type and code), whatever its
//!   TCP flags;
//! - every protocol other than TCP and UDP (ICMP from a ping socket, SCTP,
//!   UDP-Lite, DCCP, L2TP/IP, …): judged by destination, protocol and port
//!   (ICMP: type and code); a flow that passes is remembered, so its later
//!   packets and its replies cost one flow-cache lookup. ICMP errors and
//!   IPv6 neighbour discovery sent by the kernel pass.
//!
//! The common case costs no map lookup: a TCP segment of an ordinary socket
//! that does not open a connection and carries no source route passes at
//! once (its connection was judged at connect(), its source fixed then).
use aya_ebpf::{
    EbpfContext as _,
    helpers::generated::{bpf_get_socket_cookie, bpf_skb_cgroup_id},
    macros::cgroup_skb,
    programs::SkBuffContext,
};
use palisade_common::{
    DIR_EGRESS, DIR_INGRESS, LOOPBACK_MARK, PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP,
    counter, identity, is_loopback, reason,
};

use crate::{
    cgroup_identity,
    packet::{self, Packet, parse},
    verdict::{
        Flow, Known, PASS, active_slot, as_first_judged, count, enforced, flow_state, judge_egress,
        judge_established, judge_ingress, own_address, refuse, remember_flow,
    },
};

/// The flow of a TCP segment of an established connection: this socket,
/// the peer's address and port (identity filled in only when it must be
/// judged again).
#[inline(always)]
pub fn established(
    ctx: &SkBuffContext,
    direction: u8,
    peer_addr: [u8; 16],
    peer_port: u16,
    family: u8,
) -> Flow {
    Flow {
        direction,
        protocol: PROTO_TCP,
        local_identity: 0,
        // SAFETY: the context pointer is valid for the program's run.
        cgroup_id: unsafe { bpf_skb_cgroup_id(ctx.as_ptr().cast()) },
        peer_addr,
        family,
        port: 0,
        peer_port,
        // SAFETY: a cgroup_skb context is a valid argument for this helper.
        socket_cookie: unsafe { bpf_get_socket_cookie(ctx.as_ptr()) },
        in_process: false,
    }
}

const SOCK_RAW: u32 = 3;

#[cgroup_skb(egress)]
pub fn palisade_egress_packet(ctx: SkBuffContext) -> i32 {
    match try_egress(&ctx) {
        Ok(verdict) | Err(verdict) => verdict,
    }
}

#[inline(always)]
fn try_egress(ctx: &SkBuffContext) -> Result<i32, i32> {
    let parsed = parse(ctx);
    if let Ok(p) = &parsed
        && !p.source_routed
        && p.protocol == PROTO_TCP
        && let Ok(tcp) = packet::tcp(ctx, p)
        && !packet::opens_connection(&tcp)
        && !raw_socket(ctx)
    {
        // A segment of a connection judged at its connect() or its SYN:
        // judged again once per policy generation.
        let flow = established(
            ctx,
            DIR_EGRESS,
            p.dst,
            u16::from_be_bytes(tcp.dest),
            p.family,
        );
        return Ok(judge_established(&flow, u16::from_be_bytes(tcp.source)));
    }
    // SAFETY: the context pointer is valid for the program's run.
    let cgroup_id = unsafe { bpf_skb_cgroup_id(ctx.as_ptr().cast()) };
    let local = cgroup_identity(cgroup_id);
    if local == identity::HOST || local == identity::UNMANAGED {
        return Ok(PASS); // the node's own processes (hostNetwork pods), or unmanaged
    }
    let Ok(packet) = parsed else {
        count(counter::UNPARSEABLE);
        return Err(refuse::<false>(
            &Flow::without_peer(DIR_EGRESS, cgroup_id, local),
            reason::UNPARSEABLE,
        ));
    };
    let mut flow = Flow {
        direction: DIR_EGRESS,
        protocol: packet.protocol,
        local_identity: local,
        cgroup_id,
        peer_addr: packet.dst,
        family: packet.family,
        port: 0,
        peer_port: 0,
        // Flows other than UDP are remembered per workload: an SCTP
        // association's packets leave from another socket than the
        // listener that admitted its INIT.
        socket_cookie: cgroup_id,
        in_process: true,
    };
    // A fragment after the first carries no transport header: judged with
    // port 0 (only a rule for any port admits it).
    if let Ok((peer_side, judged)) = packet::keys(ctx, &packet) {
        flow.port = judged;
        flow.peer_port = if packet.protocol == PROTO_ICMP || packet.protocol == PROTO_ICMPV6 {
            peer_side
        } else {
            judged
        };
    }
    if packet.source_routed {
        count(counter::SOURCE_ROUTED);
        return Ok(refuse::<false>(&flow, reason::SOURCE_ROUTED));
    }
    if forged(cgroup_id, &packet) {
        count(counter::FORGED_SOURCE);
        return Ok(refuse::<false>(&flow, reason::FORGED_SOURCE));
    }
    if raw_socket(ctx) {
        // No socket hook saw this destination: judge it now, every packet.
        return Ok(judge_egress::<false>(&flow));
    }
    if packet.protocol == PROTO_TCP || packet.protocol == PROTO_UDP {
        return Ok(PASS); // judged by the socket hooks
    }
    if packet::icmp_infrastructure(packet.protocol, flow.port) {
        return Ok(PASS); // the kernel's errors and neighbour discovery
    }
    Ok(judge_remembered(&flow))
}

/// Judges a packet of a protocol no socket hook sees, with the flow cache:
/// a flow judged in this generation (either way) passes; one judged under
/// an older table is judged again the way it was first judged; a new one is
/// judged as egress and, when it passes and either direction is enforced,
/// remembered so that its replies pass.
#[inline(always)]
fn judge_remembered(flow: &Flow) -> i32 {
    match flow_state(flow) {
        Known::Fresh => return PASS,
        Known::Stale {
            direction: DIR_INGRESS,
            port,
        } => {
            let first = as_first_judged(flow, DIR_INGRESS, port);
            let verdict = judge_ingress::<false>(&first);
            if verdict == PASS {
                remember_flow(flow, DIR_INGRESS, port);
            }
            return verdict;
        }
        _ => {}
    }
    let verdict = judge_egress::<false>(flow);
    let slot = active_slot();
    if verdict == PASS
        && (enforced(slot, DIR_EGRESS, flow.local_identity).is_some()
            || enforced(slot, DIR_INGRESS, flow.local_identity).is_some())
    {
        remember_flow(flow, DIR_EGRESS, flow.port);
    }
    verdict
}

/// Does the packet claim an address that is not the workload's? Checked for
/// workloads with a network namespace of their own (their addresses are
/// known); loopback and IPv6 link-local sources stay on their link.
#[inline(always)]
fn forged(cgroup_id: u64, packet: &Packet) -> bool {
    if is_loopback(&packet.src) || (packet.src[0] == 0xfe && packet.src[1] & 0xc0 == 0x80) {
        return false;
    }
    own_address(cgroup_id, &LOOPBACK_MARK) && !own_address(cgroup_id, &packet.src)
}

#[inline(always)]
fn raw_socket(ctx: &SkBuffContext) -> bool {
    let full = packet::full_socket(ctx);
    if full.is_null() {
        return false;
    }
    // SAFETY: a full socket's `type` is readable.
    unsafe { (*full).type_ == SOCK_RAW }
}
