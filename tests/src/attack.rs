//! What an attacker inside a workload tries, as `palisade-testbed attack …`
//! runs it: raw IP sockets (with and without `IP_HDRINCL`, with a forged
//! source), TCP SYNs from a raw socket, an IPv4 loose source route
//! (`IP_OPTIONS`), an IPv6 segment routing header (`IPV6_RTHDR`, which needs
//! no capability), limited broadcast, a packet (AF_PACKET) socket, TCP
//! segments that open nothing (ACK+PSH with data, RST) from a raw socket,
//! ICMP echo over an unprivileged ping socket, and UDP-Lite. Each
//! returns `Ok` when the kernel let the packet (or socket) go, or the error.
use std::{
    io,
    net::{Ipv4Addr, Ipv6Addr},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
};

fn check(rc: libc::c_int) -> io::Result<libc::c_int> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

fn socket(domain: libc::c_int, ty: libc::c_int, proto: libc::c_int) -> io::Result<OwnedFd> {
    // SAFETY: plain syscall; the fd is owned from here on.
    let fd = check(unsafe { libc::socket(domain, ty, proto) })?;
    // SAFETY: a fresh, valid descriptor.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn setsockopt(fd: &OwnedFd, level: libc::c_int, name: libc::c_int, value: &[u8]) -> io::Result<()> {
    // SAFETY: `value` is valid for its length.
    check(unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            value.as_ptr().cast(),
            value.len() as libc::socklen_t,
        )
    })
    .map(|_| ())
}

fn sockaddr4(ip: Ipv4Addr, port: u16) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: port.to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(ip).to_be(),
        },
        sin_zero: [0; 8],
    }
}

fn send_to4(fd: &OwnedFd, payload: &[u8], ip: Ipv4Addr, port: u16) -> io::Result<()> {
    send_to_sockaddr(fd, payload, &sockaddr4(ip, port))
}

/// `sendto` with a `sockaddr_in` or `sockaddr_in6`.
fn send_to_sockaddr<A>(fd: &OwnedFd, payload: &[u8], addr: &A) -> io::Result<()> {
    // SAFETY: valid buffer and address for their lengths.
    check(unsafe {
        libc::sendto(
            fd.as_raw_fd(),
            payload.as_ptr().cast(),
            payload.len(),
            0,
            (addr as *const A).cast(),
            std::mem::size_of::<A>() as libc::socklen_t,
        ) as libc::c_int
    })
    .map(|_| ())
}

/// The Internet checksum of `data`.
pub fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// A UDP header and payload (checksum left 0: allowed over IPv4).
fn udp(src_port: u16, dst_port: u16, payload: &[u8]) -> Vec<u8> {
    let len = (8 + payload.len()) as u16;
    let mut out = Vec::with_capacity(usize::from(len));
    out.extend(src_port.to_be_bytes());
    out.extend(dst_port.to_be_bytes());
    out.extend(len.to_be_bytes());
    out.extend([0, 0]);
    out.extend(payload);
    out
}

/// An IPv4 header for `l4` from `src` to `dst`.
fn ipv4(src: Ipv4Addr, dst: Ipv4Addr, protocol: u8, l4: &[u8]) -> Vec<u8> {
    let total = (20 + l4.len()) as u16;
    let mut h = vec![0x45, 0];
    h.extend(total.to_be_bytes());
    h.extend([0x12, 0x34, 0x40, 0, 64, protocol, 0, 0]);
    h.extend(src.octets());
    h.extend(dst.octets());
    let sum = checksum(&h);
    h[10..12].copy_from_slice(&sum.to_be_bytes());
    h.extend(l4);
    h
}

/// A UDP datagram through a raw IP socket: the kernel writes the IP header
/// (`src: None`), or the caller does with `IP_HDRINCL` (`src: Some`, which
/// may be anyone's address).
pub fn raw_udp(dst: Ipv4Addr, port: u16, hdrincl_src: Option<Ipv4Addr>) -> io::Result<()> {
    let payload = udp(40000, port, b"raw");
    match hdrincl_src {
        None => {
            let fd = socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_UDP)?;
            send_to4(&fd, &payload, dst, 0)
        }
        Some(src) => {
            let fd = socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW)?;
            let packet = ipv4(src, dst, libc::IPPROTO_UDP as u8, &payload);
            send_to4(&fd, &packet, dst, 0)
        }
    }
}

/// A TCP SYN through a raw IP socket (the listener would answer it).
pub fn raw_syn(src: Ipv4Addr, dst: Ipv4Addr, port: u16) -> io::Result<()> {
    raw_tcp(src, dst, port, TCP_SYN, b"")
}

pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_PSH_ACK: u8 = 0x18;

/// A TCP segment with `flags` and `payload` through a raw IP socket: with
/// a `src` that is not the sender's own it goes out with `IP_HDRINCL`.
/// Segments that open nothing (ACK+PSH with data, RST) carry data all the
/// same: counted where they arrive.
pub fn raw_tcp(
    src: Ipv4Addr,
    dst: Ipv4Addr,
    port: u16,
    flags: u8,
    payload: &[u8],
) -> io::Result<()> {
    let mut tcp = Vec::new();
    tcp.extend(40001u16.to_be_bytes());
    tcp.extend(port.to_be_bytes());
    tcp.extend(1u32.to_be_bytes()); // sequence
    tcp.extend(u32::from(flags & 0x10 != 0).to_be_bytes()); // acknowledgement
    tcp.extend([0x50, flags]); // header length 20, flags
    tcp.extend(64240u16.to_be_bytes());
    tcp.extend([0, 0, 0, 0]); // checksum, urgent
    tcp.extend(payload);
    let mut pseudo = Vec::new();
    pseudo.extend(src.octets());
    pseudo.extend(dst.octets());
    pseudo.extend([0, libc::IPPROTO_TCP as u8]);
    pseudo.extend((tcp.len() as u16).to_be_bytes());
    pseudo.extend(&tcp);
    let sum = checksum(&pseudo);
    tcp[16..18].copy_from_slice(&sum.to_be_bytes());
    let fd = socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW)?;
    let packet = ipv4(src, dst, libc::IPPROTO_TCP as u8, &tcp);
    send_to4(&fd, &packet, dst, 0)
}

/// An ICMP echo request with a 240-byte payload over a ping socket
/// (`SOCK_DGRAM`, `IPPROTO_ICMP`/`IPPROTO_ICMPV6`): no capability needed
/// where `net.ipv4.ping_group_range` admits the caller's group.
pub fn ping(dst: std::net::IpAddr) -> io::Result<OwnedFd> {
    let (domain, proto, kind) = match dst {
        std::net::IpAddr::V4(_) => (libc::AF_INET, libc::IPPROTO_ICMP, 8u8),
        std::net::IpAddr::V6(_) => (libc::AF_INET6, libc::IPPROTO_ICMPV6, 128u8),
    };
    let fd = socket(domain, libc::SOCK_DGRAM, proto)?;
    // Type, code, checksum and identifier (the kernel fills both), sequence.
    let mut echo = vec![kind, 0, 0, 0, 0, 0, 0, 1];
    echo.extend([0x5a; 240]);
    send_to(&fd, &echo, dst, 0)?;
    Ok(fd)
}

/// An ICMP echo as [`ping`], then its reply awaited for `wait`: `Ok` when
/// the reply came, `TimedOut` when none did.
pub fn ping_reply(dst: std::net::IpAddr, wait: std::time::Duration) -> io::Result<()> {
    let fd = ping(dst)?;
    let tv = libc::timeval {
        tv_sec: wait.as_secs() as libc::time_t,
        tv_usec: wait.subsec_micros() as libc::suseconds_t,
    };
    // SAFETY: a timeval is plain data, viewed as its bytes for the call.
    let bytes = unsafe {
        std::slice::from_raw_parts(
            (&raw const tv).cast::<u8>(),
            std::mem::size_of::<libc::timeval>(),
        )
    };
    setsockopt(&fd, libc::SOL_SOCKET, libc::SO_RCVTIMEO, bytes)?;
    let mut buf = [0u8; 512];
    // SAFETY: `buf` is valid for its length.
    let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
    match check(n as libc::c_int) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Err(io::ErrorKind::TimedOut.into()),
        Err(e) => Err(e),
    }
}

/// A UDP-Lite datagram from an ordinary socket (no capability needed).
pub fn udplite(dst: std::net::IpAddr, port: u16) -> io::Result<()> {
    let domain = if dst.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    let fd = socket(domain, libc::SOCK_DGRAM, IPPROTO_UDPLITE)?;
    send_to(&fd, b"udp-lite", dst, port)
}

const IPPROTO_UDPLITE: libc::c_int = 136;

/// `sendto` an IPv4 or IPv6 address.
fn send_to(fd: &OwnedFd, payload: &[u8], dst: std::net::IpAddr, port: u16) -> io::Result<()> {
    match dst {
        std::net::IpAddr::V4(ip) => send_to4(fd, payload, ip, port),
        std::net::IpAddr::V6(ip) => send_to_sockaddr(fd, payload, &sockaddr6(ip, port)),
    }
}

fn sockaddr6(ip: Ipv6Addr, port: u16) -> libc::sockaddr_in6 {
    libc::sockaddr_in6 {
        sin6_family: libc::AF_INET6 as libc::sa_family_t,
        sin6_port: port.to_be(),
        sin6_flowinfo: 0,
        sin6_addr: libc::in6_addr {
            s6_addr: ip.octets(),
        },
        sin6_scope_id: 0,
    }
}

/// A UDP datagram "to" `allowed` with a loose source route whose first hop
/// is `denied` (`IP_OPTIONS`, CAP_NET_RAW): on the wire it goes to `denied`.
pub fn lsrr_udp(allowed: Ipv4Addr, denied: Ipv4Addr, port: u16) -> io::Result<()> {
    let fd = socket(libc::AF_INET, libc::SOCK_DGRAM, 0)?;
    // NOP, then LSRR: type, length, pointer, first hop.
    let mut opt = vec![1u8, 0x83, 7, 4];
    opt.extend(denied.octets());
    setsockopt(&fd, libc::IPPROTO_IP, libc::IP_OPTIONS, &opt)?;
    send_to4(&fd, b"lsrr", allowed, port)
}

/// A UDP datagram "to" `allowed` with an IPv6 segment routing header whose
/// active segment is `denied` (`IPV6_RTHDR`, no capability needed): the
/// socket hook sees `allowed`, the packet leaves for `denied`.
pub fn rthdr_udp(allowed: Ipv6Addr, denied: Ipv6Addr, port: u16) -> io::Result<()> {
    let fd = socket(libc::AF_INET6, libc::SOCK_DGRAM, 0)?;
    // SRH: next header (kernel), hdr ext len = 2 × segments, type 4,
    // segments left 1, last entry 1, flags, tag; segments[0] is replaced by
    // the destination, segments[1] is the first hop.
    let mut srh = vec![0u8, 4, 4, 1, 1, 0, 0, 0];
    srh.extend([0u8; 16]);
    srh.extend(denied.octets());
    setsockopt(&fd, libc::IPPROTO_IPV6, libc::IPV6_RTHDR, &srh)?;
    send_to_sockaddr(&fd, b"rthdr", &sockaddr6(allowed, port))
}

/// A datagram from `src` — an address the workload added to its own
/// interface (CAP_NET_ADMIN), or its real one — through an ordinary socket.
pub fn bound_udp(src: Ipv4Addr, dst: Ipv4Addr, port: u16) -> io::Result<()> {
    let fd = socket(libc::AF_INET, libc::SOCK_DGRAM, 0)?;
    let local = sockaddr4(src, 0);
    // SAFETY: a valid address for its length.
    check(unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&raw const local).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    })?;
    send_to4(&fd, b"bound", dst, port)
}

/// A UDP datagram over IPv6 behind `ext_headers` destination-options
/// headers (a raw IPv6 socket writes the whole packet): more than a parser
/// with a bounded walk reads.
pub fn deep_ipv6_udp(
    src: Ipv6Addr,
    dst: Ipv6Addr,
    port: u16,
    ext_headers: usize,
) -> io::Result<()> {
    let mut udp = udp(40002, port, b"deep");
    // The UDP checksum over the IPv6 pseudo-header (mandatory over IPv6).
    let mut pseudo = Vec::new();
    pseudo.extend(src.octets());
    pseudo.extend(dst.octets());
    pseudo.extend((udp.len() as u32).to_be_bytes());
    pseudo.extend([0, 0, 0, libc::IPPROTO_UDP as u8]);
    pseudo.extend(&udp);
    let sum = checksum(&pseudo);
    udp[6..8].copy_from_slice(&sum.to_be_bytes());
    let mut ext = Vec::new();
    for i in 0..ext_headers {
        let next = if i + 1 == ext_headers {
            libc::IPPROTO_UDP as u8
        } else {
            60 // another destination-options header
        };
        ext.extend([next, 0, 1, 4, 0, 0, 0, 0]); // PadN to 8 bytes
    }
    let payload_len = (ext.len() + udp.len()) as u16;
    let mut packet = vec![0x60, 0, 0, 0];
    packet.extend(payload_len.to_be_bytes());
    packet.push(if ext_headers == 0 {
        libc::IPPROTO_UDP as u8
    } else {
        60
    });
    packet.push(64);
    packet.extend(src.octets());
    packet.extend(dst.octets());
    packet.extend(ext);
    packet.extend(udp);
    let fd = socket(libc::AF_INET6, libc::SOCK_RAW, libc::IPPROTO_RAW)?;
    let addr = libc::sockaddr_in6 {
        sin6_family: libc::AF_INET6 as libc::sa_family_t,
        sin6_port: 0,
        sin6_flowinfo: 0,
        sin6_addr: libc::in6_addr {
            s6_addr: dst.octets(),
        },
        sin6_scope_id: 0,
    };
    // SAFETY: valid buffer and address for their lengths.
    check(unsafe {
        libc::sendto(
            fd.as_raw_fd(),
            packet.as_ptr().cast(),
            packet.len(),
            0,
            (&raw const addr).cast(),
            std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t,
        ) as libc::c_int
    })
    .map(|_| ())
}

/// A datagram to the limited broadcast address.
pub fn broadcast_udp(port: u16) -> io::Result<()> {
    let fd = socket(libc::AF_INET, libc::SOCK_DGRAM, 0)?;
    setsockopt(
        &fd,
        libc::SOL_SOCKET,
        libc::SO_BROADCAST,
        &1i32.to_ne_bytes(),
    )?;
    send_to4(&fd, b"all", Ipv4Addr::BROADCAST, port)
}

/// Opens (and closes) a packet socket: with it, frames go below every hook.
pub fn packet_socket() -> io::Result<()> {
    socket(
        libc::AF_PACKET,
        libc::SOCK_RAW,
        i32::from((libc::ETH_P_ALL as u16).to_be()),
    )
    .map(drop)
}

/// Gives up root: no capability is left (uid and gid 65534).
pub fn become_nobody() -> io::Result<()> {
    // SAFETY: plain syscalls on this process.
    unsafe {
        check(libc::setgroups(0, std::ptr::null()))?;
        check(libc::setgid(65534))?;
        check(libc::setuid(65534))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ipv4_header_checksum_verifies() {
        let h = ipv4(
            Ipv4Addr::new(10, 0, 0, 1),
            Ipv4Addr::new(10, 0, 0, 2),
            17,
            &udp(1, 2, b"x"),
        );
        assert_eq!(
            checksum(&h[..20]),
            0,
            "a header with its checksum sums to 0"
        );
        assert_eq!(u16::from_be_bytes([h[2], h[3]]), 29);
    }
}
