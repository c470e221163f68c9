//! Parsing the IP header of a packet in a `cgroup_skb` program, shared by
//! ingress and egress. Bounded: at most `MAX_IPV6_EXT_HEADERS` extension
//! headers are walked; a packet with more cannot be parsed.
use aya_ebpf::{
    EbpfContext as _,
    bindings::{__sk_buff, bpf_sock},
    helpers::generated::bpf_sk_fullsock,
    programs::SkBuffContext,
};
use network_types::{
    ip::{Ipv4Hdr, Ipv6Hdr},
    sctp::SctpHdr,
    tcp::TcpHdr,
    udp::UdpHdr,
};
use palisade_common::{
    PROTO_DCCP, PROTO_ICMP, PROTO_ICMPV6, PROTO_SCTP, PROTO_TCP, PROTO_UDP, PROTO_UDPLITE,
    v4_mapped,
};

const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
/// IPv6 extension headers walked to find the transport header.
const IPV6_HOPOPTS: u8 = 0;
const IPV6_ROUTING: u8 = 43;
const IPV6_DSTOPTS: u8 = 60;
const MAX_IPV6_EXT_HEADERS: usize = 4;

/// Network and transport facts of a packet.
pub struct Packet {
    pub family: u8,
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub protocol: u8,
    pub l4_offset: usize,
    /// IPv4 options, or an IPv6 routing header with segments left: the
    /// packet may travel past its destination address.
    pub source_routed: bool,
    /// An IPv4 fragment after the first: no transport header (an IPv6
    /// fragment's protocol is the fragment header's, 44).
    pub later_fragment: bool,
}

#[inline(always)]
pub fn parse(ctx: &SkBuffContext) -> Result<Packet, ()> {
    // SAFETY: the context pointer is valid for the program's run.
    let skb: *const __sk_buff = ctx.as_ptr().cast();
    // SAFETY: as above; `protocol` is readable by cgroup_skb programs.
    let proto = u16::from_be(unsafe { (*skb).protocol } as u16);
    if proto == ETH_P_IP {
        let ip: Ipv4Hdr = ctx.load(0).map_err(|_| ())?;
        let ihl = usize::from(ip.ihl());
        if ihl < Ipv4Hdr::LEN {
            return Err(());
        }
        // Flags and fragment offset: bytes 6 and 7 of the header.
        let frag: [u8; 2] = ctx.load(6).map_err(|_| ())?;
        Ok(Packet {
            family: 4,
            src: v4_mapped(ip.src_addr),
            dst: v4_mapped(ip.dst_addr),
            protocol: ip.proto,
            l4_offset: ihl,
            // Workloads send no IPv4 options but source routes in practice;
            // any option is treated as one.
            source_routed: ihl > Ipv4Hdr::LEN,
            later_fragment: u16::from_be_bytes(frag) & 0x1fff != 0,
        })
    } else if proto == ETH_P_IPV6 {
        let ip: Ipv6Hdr = ctx.load(0).map_err(|_| ())?;
        let mut next = ip.next_hdr;
        let mut offset = Ipv6Hdr::LEN;
        let mut source_routed = false;
        for _ in 0..MAX_IPV6_EXT_HEADERS {
            if next != IPV6_HOPOPTS && next != IPV6_ROUTING && next != IPV6_DSTOPTS {
                break;
            }
            // next header, length, and for a routing header: type, segments left.
            let ext: [u8; 4] = ctx.load(offset).map_err(|_| ())?;
            if next == IPV6_ROUTING && ext[3] > 0 {
                source_routed = true;
            }
            next = ext[0];
            offset += (usize::from(ext[1]) + 1) * 8;
        }
        if next == IPV6_HOPOPTS || next == IPV6_ROUTING || next == IPV6_DSTOPTS {
            return Err(());
        }
        Ok(Packet {
            family: 6,
            src: ip.src_addr,
            dst: ip.dst_addr,
            protocol: next,
            l4_offset: offset,
            source_routed,
            later_fragment: false,
        })
    } else {
        Err(())
    }
}

/// The TCP header of a TCP packet.
#[inline(always)]
pub fn tcp(ctx: &SkBuffContext, p: &Packet) -> Result<TcpHdr, ()> {
    ctx.load(p.l4_offset).map_err(|_| ())
}

/// A SYN without ACK: the segment that opens a connection (everything else
/// belongs to a connection judged at its SYN).
#[inline(always)]
pub fn opens_connection(tcp: &TcpHdr) -> bool {
    tcp.syn() != 0 && tcp.ack() == 0
}

/// (source, destination) ports of a TCP, UDP or SCTP packet, in host order.
#[inline(always)]
pub fn ports(ctx: &SkBuffContext, p: &Packet) -> Result<(u16, u16), ()> {
    let (src, dst) = match p.protocol {
        // Both start with the two ports, as UDP does.
        PROTO_UDPLITE | PROTO_DCCP => {
            let h: [u8; 4] = ctx.load(p.l4_offset).map_err(|_| ())?;
            ([h[0], h[1]], [h[2], h[3]])
        }
        PROTO_TCP => {
            let h: TcpHdr = ctx.load(p.l4_offset).map_err(|_| ())?;
            (h.source, h.dest)
        }
        PROTO_UDP => {
            let h: UdpHdr = ctx.load(p.l4_offset).map_err(|_| ())?;
            (h.src, h.dst)
        }
        PROTO_SCTP => {
            let h: SctpHdr = ctx.load(p.l4_offset).map_err(|_| ())?;
            (h.src, h.dst)
        }
        _ => return Err(()),
    };
    Ok((u16::from_be_bytes(src), u16::from_be_bytes(dst)))
}

/// The type of an SCTP packet's first chunk (INIT opens an association).
#[inline(always)]
pub fn sctp_first_chunk(ctx: &SkBuffContext, p: &Packet) -> Result<u8, ()> {
    ctx.load(p.l4_offset + SctpHdr::LEN).map_err(|_| ())
}

/// What identifies a packet of a protocol without ports to policy and to the
/// flow cache: (peer side, judged side). ICMP: (echo identifier, type << 8 |
/// code) — a rule names a type and code the way a port is named, and an echo
/// and its reply share the identifier. Any other protocol without ports:
/// (0, 0).
#[inline(always)]
pub fn keys(ctx: &SkBuffContext, p: &Packet) -> Result<(u16, u16), ()> {
    if p.later_fragment {
        return Ok((0, 0));
    }
    match p.protocol {
        PROTO_TCP | PROTO_UDP | PROTO_SCTP | PROTO_UDPLITE | PROTO_DCCP => ports(ctx, p),
        PROTO_ICMP | PROTO_ICMPV6 => {
            let h: [u8; 6] = ctx.load(p.l4_offset).map_err(|_| ())?;
            Ok((
                u16::from_be_bytes([h[4], h[5]]),
                u16::from_be_bytes([h[0], h[1]]),
            ))
        }
        _ => Ok((0, 0)),
    }
}

/// ICMP messages that are the network's own business, never a workload's
/// conversation: errors about a flow (destination unreachable, fragmentation
/// needed / packet too big, time exceeded, parameter problem) and IPv6
/// neighbour discovery and multicast listener messages, which stay on the
/// link. `type_code` is `type << 8 | code`.
#[inline(always)]
pub fn icmp_infrastructure(protocol: u8, type_code: u16) -> bool {
    let kind = (type_code >> 8) as u8;
    match protocol {
        PROTO_ICMP => matches!(kind, 3 | 11 | 12),
        PROTO_ICMPV6 => matches!(kind, 1..=4 | 130..=137 | 143),
        _ => false,
    }
}

/// The full socket the packet belongs to (null: none, or a request or
/// time-wait socket).
#[inline(always)]
pub fn full_socket(ctx: &SkBuffContext) -> *mut bpf_sock {
    let skb: *const __sk_buff = ctx.as_ptr().cast();
    // SAFETY: reading the socket pointer of a valid context.
    let sk = unsafe { (*skb).__bindgen_anon_2.sk };
    if sk.is_null() {
        return core::ptr::null_mut();
    }
    // SAFETY: a socket pointer from the context is a valid helper argument.
    unsafe { bpf_sk_fullsock(sk) }
}
