//! Ingress at the packet: `cgroup_skb/ingress` on the receiving workload's
//! cgroup. The local identity is the receiving socket's cgroup; the peer's
//! comes from its source address through the ipcache (a packet that crossed a
//! wire or a veth carries no sender cgroup).
//!
//! Only new flows are judged: a TCP SYN without ACK, an SCTP INIT, and a
//! packet of any other protocol (UDP, ICMP, UDP-Lite, …) from a peer this
//! workload has not yet exchanged such traffic with under the current policy
//! generation (UDP: this socket). Everything else belongs to a flow already
//! judged. A UDP datagram to a socket connected to its sender is that
//! socket's reply: judged as the socket's egress, cached or not. ICMP is
//! judged by type and code (an echo reply to an admitted echo
//! is a reply); ICMP errors and neighbour discovery pass. An ICMP echo that
//! the kernel answers itself reaches no socket, so no program of the
//! workload's runs for it: it is judged at the sender's egress.
use aya_ebpf::{
    EbpfContext as _,
    bindings::__sk_buff,
    helpers::generated::{bpf_get_socket_cookie, bpf_skb_cgroup_id},
    macros::cgroup_skb,
    programs::SkBuffContext,
};
use palisade_common::{DIR_EGRESS, DIR_INGRESS, PROTO_SCTP, PROTO_TCP, PROTO_UDP, counter, reason};

use crate::{
    cgroup_identity,
    egress_packet::established,
    packet::{self, parse},
    verdict::{
        Flow, Known, PASS, active_slot, as_first_judged, count, enforced, flow_state, judge_egress,
        judge_established, judge_ingress, own_address, own_loopback, refuse, remember_flow,
    },
};

/// `lo` has this index in every network namespace.
const LOOPBACK_IFINDEX: u32 = 1;
const SCTP_CHUNK_INIT: u8 = 1;

#[cgroup_skb(ingress)]
pub fn palisade_ingress(ctx: SkBuffContext) -> i32 {
    match try_ingress(&ctx) {
        Ok(verdict) | Err(verdict) => verdict,
    }
}

#[inline(always)]
fn try_ingress(ctx: &SkBuffContext) -> Result<i32, i32> {
    let parsed = parse(ctx);
    // Fast path: a TCP segment that does not open a connection belongs to a
    // flow judged at its SYN (or connect()); that is nearly every packet. It
    // costs one flow-cache lookup while the policy generation stays the same.
    if let Ok(p) = &parsed
        && p.protocol == PROTO_TCP
        && let Ok(tcp) = packet::tcp(ctx, p)
        && !packet::opens_connection(&tcp)
    {
        // Judged again once per policy generation (revocation).
        let flow = established(
            ctx,
            DIR_INGRESS,
            p.src,
            u16::from_be_bytes(tcp.source),
            p.family,
        );
        return Ok(judge_established(&flow, u16::from_be_bytes(tcp.dest)));
    }
    // SAFETY: the context pointer is valid for the program's run.
    let cgroup_id = unsafe { bpf_skb_cgroup_id(ctx.as_ptr().cast()) };
    let local = cgroup_identity(cgroup_id);
    let slot = active_slot();
    let ingress_enforced = enforced(slot, DIR_INGRESS, local).is_some();
    // A flow other than TCP to a workload whose egress is enforced is
    // remembered even when its ingress is open, so that the workload's
    // replies pass its egress (replies of admitted flows are allowed).
    let remembered = matches!(&parsed, Ok(p) if p.protocol != PROTO_TCP);
    if !ingress_enforced && !(remembered && enforced(slot, DIR_EGRESS, local).is_some()) {
        return Ok(PASS); // early exit: ingress is open for this identity
    }
    // Any packet we cannot parse on an enforced workload is dropped: it cannot
    // be judged, and passing it would be a bypass.
    // A header that ends early is unparseable too: counted and audited,
    // like a packet whose IP header cannot be read.
    let unparseable = || {
        count(counter::UNPARSEABLE);
        refuse::<false>(
            &Flow::without_peer(DIR_INGRESS, cgroup_id, local),
            reason::UNPARSEABLE,
        )
    };
    let Ok(packet) = parsed else {
        return Err(unparseable());
    };
    if ingress_ifindex(ctx) == LOOPBACK_IFINDEX
        && (own_address(cgroup_id, &packet.src) || own_loopback(cgroup_id, &packet.src))
    {
        return Ok(PASS); // the workload talking to itself, over its own loopback
    }
    // (source port, destination port); ICMP: (echo identifier, type << 8 | code).
    let (peer_side, judged) = packet::keys(ctx, &packet).map_err(|()| unparseable())?;
    if packet::icmp_infrastructure(packet.protocol, judged) {
        return Ok(PASS); // errors about flows, neighbour discovery
    }
    if packet.protocol == PROTO_TCP {
        // Only a SYN gets here (the fast path took every other segment); a
        // header too short to read is unparseable.
        packet::tcp(ctx, &packet).map_err(|()| unparseable())?;
    }
    if packet.protocol == PROTO_SCTP {
        // The first chunk of an association's first packet is INIT.
        let chunk_type = packet::sctp_first_chunk(ctx, &packet).map_err(|()| unparseable())?;
        if chunk_type != SCTP_CHUNK_INIT {
            return Ok(PASS); // part of an association judged at its INIT
        }
    }
    let flow = Flow {
        direction: DIR_INGRESS,
        protocol: packet.protocol,
        local_identity: local,
        cgroup_id,
        peer_addr: packet.src,
        family: packet.family,
        port: judged,
        peer_port: peer_side,
        // UDP flows are remembered per socket; the others per workload (an
        // SCTP association answers from another socket than its listener).
        socket_cookie: if packet.protocol == PROTO_UDP {
            // SAFETY: a cgroup_skb context is a valid argument for this helper.
            unsafe { bpf_get_socket_cookie(ctx.as_ptr()) }
        } else {
            cgroup_id
        },
        in_process: false,
    };
    if remembered {
        match flow_state(&flow) {
            Known::Fresh => return Ok(PASS),
            // A reply of a flow our egress opened under an older table:
            // judged again as that egress (to the same address and port,
            // Service frontends included); it goes on while policy allows it.
            Known::Stale {
                direction: DIR_EGRESS,
                port,
            } => {
                let first = as_first_judged(&flow, DIR_EGRESS, port);
                let verdict = judge_egress::<false>(&first);
                if verdict == PASS {
                    remember_flow(&flow, DIR_EGRESS, port);
                }
                return Ok(verdict);
            }
            // A reply to a UDP socket connected to this very sender: the
            // flow our egress opened (its connect() was judged there), even
            // when the cache forgot it or never held it (connected while
            // both directions were open). Judged as that egress.
            Known::Unknown
                if packet.protocol == PROTO_UDP && connected_to(ctx, &packet.src, peer_side) =>
            {
                let first = as_first_judged(&flow, DIR_EGRESS, peer_side);
                let verdict = judge_egress::<false>(&first);
                if verdict == PASS {
                    remember_flow(&flow, DIR_EGRESS, peer_side);
                }
                return Ok(verdict);
            }
            _ => {}
        }
        if !ingress_enforced {
            remember_flow(&flow, DIR_INGRESS, judged);
            return Ok(PASS);
        }
    }
    let verdict = judge_ingress::<false>(&flow);
    if remembered && verdict == PASS {
        remember_flow(&flow, DIR_INGRESS, judged);
    }
    Ok(verdict)
}

/// The receiving socket is connected to `addr:port` (a connected UDP
/// socket receives only from its peer, so the packet answers it).
#[inline(always)]
fn connected_to(ctx: &SkBuffContext, addr: &[u8; 16], port: u16) -> bool {
    let full = packet::full_socket(ctx);
    if full.is_null() {
        return false;
    }
    // SAFETY: a full socket's peer fields are readable; `dst_port` is read
    // as the 4-byte field every kernel accepts (network order in its first
    // two bytes). Each field is loaded on its own: the verifier refuses
    // arithmetic on a socket pointer, which copying an array would need.
    let (raw_port, family) = unsafe {
        (
            core::ptr::read_volatile(core::ptr::addr_of!((*full).dst_port).cast::<u32>()),
            core::ptr::read_volatile(core::ptr::addr_of!((*full).family)),
        )
    };
    let peer_port = u16::from_be(raw_port as u16);
    if peer_port == 0 || peer_port != port {
        return false;
    }
    // Both address fields are loaded whatever the family (a select of
    // values, never of pointers, which the verifier would refuse).
    // SAFETY: as above, one 4-byte field at a time.
    let (ip4, ip6) = unsafe {
        (
            core::ptr::read_volatile(core::ptr::addr_of!((*full).dst_ip4)),
            [
                core::ptr::read_volatile(core::ptr::addr_of!((*full).dst_ip6[0])),
                core::ptr::read_volatile(core::ptr::addr_of!((*full).dst_ip6[1])),
                core::ptr::read_volatile(core::ptr::addr_of!((*full).dst_ip6[2])),
                core::ptr::read_volatile(core::ptr::addr_of!((*full).dst_ip6[3])),
            ],
        )
    };
    let words: [u32; 4] = if family == AF_INET {
        let mapped = palisade_common::v4_mapped(ip4.to_ne_bytes());
        [
            u32::from_ne_bytes([mapped[0], mapped[1], mapped[2], mapped[3]]),
            u32::from_ne_bytes([mapped[4], mapped[5], mapped[6], mapped[7]]),
            u32::from_ne_bytes([mapped[8], mapped[9], mapped[10], mapped[11]]),
            ip4,
        ]
    } else {
        ip6
    };
    let mut same = true;
    for (i, w) in words.iter().enumerate() {
        let b = i * 4;
        same &= *w == u32::from_ne_bytes([addr[b], addr[b + 1], addr[b + 2], addr[b + 3]]);
    }
    same
}

const AF_INET: u32 = 2;

#[inline(always)]
fn ingress_ifindex(ctx: &SkBuffContext) -> u32 {
    let skb: *const __sk_buff = ctx.as_ptr().cast();
    // SAFETY: the context pointer is valid; cgroup_skb programs may read this field.
    unsafe { (*skb).ingress_ifindex }
}
