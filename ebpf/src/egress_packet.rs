//! Egress at the packet: `cgroup_skb/egress` on what actually leaves a
//! workload, whatever the socket address said. The socket hooks judged the
//! address a socket was connected or sent to; three things can make the
//! packet go elsewhere or claim to be someone else, and they are judged here:
//!
//! - a source route (an IPv6 routing header with segments left, set with
//!   `IPV6_RTHDR` — no capability needed — or IPv4 options): dropped;
//! - a source address that is not the workload's own (a raw socket, or an
//!   address the workload added to its interface): dropped;
//! - a raw IP socket's packets, which no socket hook saw: judged by their
//!   real destination (and ports, for TCP and UDP).
//!
//! The common case costs no map lookup: a TCP segment that does not open a
//! connection and carries no source route passes at once.
use aya_ebpf::{
    EbpfContext as _,
    bindings::__sk_buff,
    helpers::generated::{bpf_sk_fullsock, bpf_skb_cgroup_id},
    macros::cgroup_skb,
    programs::SkBuffContext,
};
use palisade_common::{
    DIR_EGRESS, LOOPBACK_MARK, PROTO_TCP, PROTO_UDP, counter, identity, is_loopback, reason,
};

use crate::{
    cgroup_identity,
    packet::{self, Packet, parse},
    verdict::{Flow, PASS, count, judge_egress, own_address, refuse},
};

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
    {
        return Ok(PASS); // a segment of a connection judged at its connect()
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
        socket_cookie: 0,
        in_process: true,
    };
    if (packet.protocol == PROTO_TCP || packet.protocol == PROTO_UDP)
        && let Ok((_, dst)) = packet::ports(ctx, &packet)
    {
        flow.port = dst;
        flow.peer_port = flow.port;
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
    Ok(PASS)
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
    let skb: *const __sk_buff = ctx.as_ptr().cast();
    // SAFETY: reading the socket pointer of a valid context.
    let sk = unsafe { (*skb).__bindgen_anon_2.sk };
    if sk.is_null() {
        return false;
    }
    // SAFETY: a socket pointer from the context is a valid helper argument.
    let full = unsafe { bpf_sk_fullsock(sk) };
    if full.is_null() {
        return false;
    }
    // SAFETY: a full socket's `type` is readable.
    unsafe { (*full).type_ == SOCK_RAW }
}
