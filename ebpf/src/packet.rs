//! Parsing the IP header of a packet in a `cgroup_skb` program, shared by
//! ingress and egress. Bounded: at most `MAX_IPV6_EXT_HEADERS` extension
//! headers are walked; a packet with more cannot be parsed.
use aya_ebpf::{EbpfContext as _, bindings::__sk_buff, programs::SkBuffContext};
use palisade_common::v4_mapped;

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
        let head: [u8; 20] = ctx.load(0).map_err(|_| ())?;
        let ihl = usize::from(head[0] & 0x0f) * 4;
        if ihl < 20 {
            return Err(());
        }
        Ok(Packet {
            family: 4,
            src: v4_mapped([head[12], head[13], head[14], head[15]]),
            dst: v4_mapped([head[16], head[17], head[18], head[19]]),
            protocol: head[9],
            l4_offset: ihl,
            // Workloads send no IPv4 options but source routes in practice;
            // any option is treated as one.
            source_routed: ihl > 20,
        })
    } else if proto == ETH_P_IPV6 {
        let head: [u8; 8] = ctx.load(0).map_err(|_| ())?;
        let src: [u8; 16] = ctx.load(8).map_err(|_| ())?;
        let dst: [u8; 16] = ctx.load(24).map_err(|_| ())?;
        let mut next = head[6];
        let mut offset = 40usize;
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
            src,
            dst,
            protocol: next,
            l4_offset: offset,
            source_routed,
        })
    } else {
        Err(())
    }
}
