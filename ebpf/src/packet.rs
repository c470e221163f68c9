//! Parsing the IP header of a packet in a `cgroup_skb` program, shared by
//! ingress and egress. Bounded: at most `MAX_IPV6_EXT_HEADERS` extension
//! headers are walked; a packet with more cannot be parsed.
use aya_ebpf::{EbpfContext as _, bindings::__sk_buff, programs::SkBuffContext};
use network_types::{
    ip::{Ipv4Hdr, Ipv6Hdr},
    sctp::SctpHdr,
    tcp::TcpHdr,
    udp::UdpHdr,
};
use palisade_common::{PROTO_SCTP, PROTO_TCP, PROTO_UDP, v4_mapped};

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
        Ok(Packet {
            family: 4,
            src: v4_mapped(ip.src_addr),
            dst: v4_mapped(ip.dst_addr),
            protocol: ip.proto,
            l4_offset: ihl,
            // Workloads send no IPv4 options but source routes in practice;
            // any option is treated as one.
            source_routed: ihl > Ipv4Hdr::LEN,
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
