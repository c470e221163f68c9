//! Egress at the socket: `cgroup/connect4|6` (TCP and connected UDP) and
//! `cgroup/sendmsg4|6` (unconnected UDP). A denied connect() or sendto() fails
//! at once with EPERM, so the event can name the process.
use aya_ebpf::{
    EbpfContext as _,
    helpers::generated::{bpf_get_current_cgroup_id, bpf_get_socket_cookie},
    macros::cgroup_sock_addr,
    programs::SockAddrContext,
};
use palisade_common::{DIR_EGRESS, DIR_INGRESS, PROTO_SCTP, PROTO_TCP, PROTO_UDP, v4_mapped};

use crate::{
    cgroup_identity,
    verdict::{
        Flow, Known, PASS, active_slot, as_first_judged, enforced, flow_state, judge_egress,
        judge_ingress, remember_flow,
    },
};

#[cgroup_sock_addr(connect4)]
pub fn palisade_connect4(ctx: SockAddrContext) -> i32 {
    judge(&ctx, 4, false)
}

#[cgroup_sock_addr(connect6)]
pub fn palisade_connect6(ctx: SockAddrContext) -> i32 {
    judge(&ctx, 6, false)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn palisade_sendmsg4(ctx: SockAddrContext) -> i32 {
    judge(&ctx, 4, true)
}

#[cgroup_sock_addr(sendmsg6)]
pub fn palisade_sendmsg6(ctx: SockAddrContext) -> i32 {
    judge(&ctx, 6, true)
}

#[inline(always)]
fn judge(ctx: &SockAddrContext, family: u8, sendmsg: bool) -> i32 {
    // SAFETY: the kernel hands every sock_addr program a valid context.
    let sa = unsafe { &*ctx.sock_addr };
    let protocol = sa.protocol as u8;
    // SCTP associations are judged at connect() too, and every SCTP packet
    // as it leaves (`egress_packet`): an association set up implicitly by
    // sendmsg() has no socket hook.
    if protocol != PROTO_TCP && protocol != PROTO_UDP && protocol != PROTO_SCTP {
        return PASS;
    }
    // SAFETY: helper without arguments; process context.
    let cgroup_id = unsafe { bpf_get_current_cgroup_id() };
    let local = cgroup_identity(cgroup_id);
    // Early exit: egress is open for this identity. UDP goes on when our
    // ingress is enforced: an allowed datagram flow is remembered so that its
    // replies pass that ingress. A TCP connect() is remembered as opened by
    // us whatever the policy: after a change its packets are judged as this
    // egress (revocation), not as an accepted connection.
    let slot = active_slot();
    let udp = protocol == PROTO_UDP;
    let tcp_connect = protocol == PROTO_TCP && !sendmsg;
    if enforced(slot, DIR_EGRESS, local).is_none()
        && !tcp_connect
        && (!udp || enforced(slot, DIR_INGRESS, local).is_none())
    {
        return PASS;
    }
    let peer_addr = if family == 4 {
        v4_mapped(sa.user_ip4.to_ne_bytes())
    } else {
        let w = sa.user_ip6;
        let (a, b, c, d) = (
            w[0].to_ne_bytes(),
            w[1].to_ne_bytes(),
            w[2].to_ne_bytes(),
            w[3].to_ne_bytes(),
        );
        [
            a[0], a[1], a[2], a[3], b[0], b[1], b[2], b[3], c[0], c[1], c[2], c[3], d[0], d[1],
            d[2], d[3],
        ]
    };
    let port = u16::from_be(sa.user_port as u16);
    let flow = Flow {
        direction: DIR_EGRESS,
        protocol,
        local_identity: local,
        cgroup_id,
        peer_addr,
        family,
        port,
        peer_port: port,
        // Datagram flows and connections are remembered, by socket.
        socket_cookie: if udp || tcp_connect {
            // SAFETY: a sock_addr context is a valid argument for this helper.
            unsafe { bpf_get_socket_cookie(ctx.as_ptr()) }
        } else {
            0
        },
        in_process: true,
    };
    if udp && sendmsg {
        match flow_state(&flow) {
            // A reply to, or a repeat of, a datagram flow judged in this generation.
            Known::Fresh => return PASS,
            // A reply of a flow our ingress admitted under an older table:
            // judged again as that ingress (replies of allowed flows pass,
            // whatever egress policy says), and remembered again if it holds.
            Known::Stale {
                direction: DIR_INGRESS,
                port: local_port,
            } => {
                let first = as_first_judged(&flow, DIR_INGRESS, local_port);
                let verdict = judge_ingress::<true>(&first);
                if verdict == PASS {
                    remember_flow(&flow, DIR_INGRESS, local_port);
                }
                return verdict;
            }
            _ => {}
        }
    }
    let verdict = judge_egress::<true>(&flow);
    if (udp || tcp_connect) && verdict == PASS {
        // Remember the peer so that its replies pass our ingress, and how a
        // connection was opened, to judge it again that way after a change.
        remember_flow(&flow, DIR_EGRESS, port);
    }
    verdict
}
