//! Interface addresses over rtnetlink (an `RTM_GETADDR` dump, encoded and
//! decoded by netlink-packet-route): the node's own (the agent runs in the
//! node's network namespace) and a workload's (the dump runs in a thread
//! that entered the workload's network namespace).
use std::{
    io,
    net::IpAddr,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    path::Path,
};

use netlink_packet_core::{
    NLM_F_DUMP, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_route::{
    RouteNetlinkMessage,
    address::{AddressAttribute, AddressMessage, AddressScope},
};

/// One address of an interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Address {
    pub ip: IpAddr,
    pub scope: AddressScope,
}

/// Bounds one dump: an interface list larger than this is cut short.
const MAX_MESSAGES: usize = 65_536;

/// Every address in the calling thread's network namespace.
pub fn addresses() -> io::Result<Vec<Address>> {
    // SAFETY: plain socket(2); the descriptor is owned below.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::NETLINK_ROUTE,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a new descriptor nothing else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_DUMP | NLM_F_REQUEST;
    header.sequence_number = 1;
    let mut request = NetlinkMessage::new(
        header,
        NetlinkPayload::from(RouteNetlinkMessage::GetAddress(AddressMessage::default())),
    );
    request.finalize();
    let mut buf = vec![0u8; request.buffer_len()];
    request.serialize(&mut buf);
    // SAFETY: sends `buf` on our socket (to the kernel: no address needed).
    if unsafe { libc::send(sock.as_raw_fd(), buf.as_ptr().cast(), buf.len(), 0) } < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut out = Vec::new();
    let mut recv = vec![0u8; 64 * 1024];
    for _ in 0..MAX_MESSAGES {
        // SAFETY: receives into `recv`, bounded by its length.
        let n = unsafe { libc::recv(sock.as_raw_fd(), recv.as_mut_ptr().cast(), recv.len(), 0) };
        let n = usize::try_from(n).map_err(|_| io::Error::last_os_error())?;
        if n == 0 || parse(&recv[..n], &mut out)? {
            return Ok(out);
        }
    }
    Ok(out)
}

/// Decodes the messages in one datagram into `out`; `true` at the end of
/// the dump.
fn parse(mut bytes: &[u8], out: &mut Vec<Address>) -> io::Result<bool> {
    while !bytes.is_empty() {
        let msg = NetlinkMessage::<RouteNetlinkMessage>::deserialize(bytes)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
        let len = usize::try_from(msg.header.length).unwrap_or(usize::MAX);
        match msg.payload {
            NetlinkPayload::Done(_) => return Ok(true),
            NetlinkPayload::Error(e) => {
                return Err(e.to_io());
            }
            NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewAddress(a)) => {
                out.extend(address(&a));
            }
            _ => {}
        }
        // Messages are 4-byte aligned within a datagram.
        let next = len.checked_next_multiple_of(4).unwrap_or(usize::MAX);
        if len == 0 || next > bytes.len() {
            break;
        }
        bytes = &bytes[next..];
    }
    Ok(false)
}

/// The interface's own address: IFA_LOCAL when present (the local end of a
/// point-to-point link), else IFA_ADDRESS.
fn address(msg: &AddressMessage) -> Option<Address> {
    let local = msg.attributes.iter().find_map(|a| match a {
        AddressAttribute::Local(ip) => Some(*ip),
        _ => None,
    });
    let addr = msg.attributes.iter().find_map(|a| match a {
        AddressAttribute::Address(ip) => Some(*ip),
        _ => None,
    });
    Some(Address {
        ip: local.or(addr)?,
        scope: msg.header.scope,
    })
}

/// The addresses of the interfaces in the agent's network namespace (the
/// node's, as the agent runs in it), loopback excluded; none when the dump
/// fails (logged).
pub fn node_addresses() -> std::collections::BTreeSet<IpAddr> {
    match addresses() {
        Ok(found) => found
            .into_iter()
            .map(|a| a.ip)
            .filter(|ip| !ip.is_loopback())
            .collect(),
        Err(e) => {
            tracing::warn!("reading the node's addresses over netlink: {e}");
            Default::default()
        }
    }
}

/// A workload's own addresses in its network namespace: IPv4 but
/// loopback, IPv6 of global scope.
pub fn workload_addresses(netns: &Path) -> io::Result<Vec<IpAddr>> {
    Ok(workload_own(addresses_in(netns)?))
}

fn workload_own(found: Vec<Address>) -> Vec<IpAddr> {
    let mut ips: Vec<IpAddr> = found
        .into_iter()
        .filter(|a| match a.ip {
            IpAddr::V4(v4) => !v4.is_loopback(),
            IpAddr::V6(_) => a.scope == AddressScope::Universe,
        })
        .map(|a| a.ip)
        .collect();
    ips.sort();
    ips.dedup();
    ips
}

/// The addresses in the network namespace `netns` (a `/proc/<pid>/ns/net`
/// file), read from a thread that entered it (CAP_SYS_ADMIN).
pub fn addresses_in(netns: &Path) -> io::Result<Vec<Address>> {
    let ns = std::fs::File::open(netns)?;
    std::thread::scope(|s| {
        s.spawn(|| {
            // SAFETY: entering a namespace by a valid descriptor, in this
            // short-lived thread only.
            if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(io::Error::last_os_error());
            }
            addresses()
        })
        .join()
        .unwrap_or_else(|_| Err(io::Error::other("the netlink thread panicked")))
    })
}

#[cfg(test)]
mod tests {
    use netlink_packet_core::DoneMessage;
    use netlink_packet_route::AddressFamily;

    use super::*;

    fn new_address(
        family: AddressFamily,
        scope: AddressScope,
        attrs: Vec<AddressAttribute>,
    ) -> Vec<u8> {
        let mut msg = AddressMessage::default();
        msg.header.family = family;
        msg.header.scope = scope;
        msg.attributes = attrs;
        let mut m = NetlinkMessage::new(
            NetlinkHeader::default(),
            NetlinkPayload::from(RouteNetlinkMessage::NewAddress(msg)),
        );
        m.finalize();
        let mut buf = vec![0u8; m.buffer_len()];
        m.serialize(&mut buf);
        buf
    }

    #[test]
    fn a_datagram_of_several_messages_decodes_to_the_interfaces_own_addresses() {
        let pod: IpAddr = "10.77.0.12".parse().unwrap();
        let peer: IpAddr = "10.77.0.1".parse().unwrap();
        let v6: IpAddr = "fd77::12".parse().unwrap();
        let link: IpAddr = "fe80::1".parse().unwrap();
        let mut datagram = Vec::new();
        // A point-to-point link: IFA_LOCAL is ours, IFA_ADDRESS the peer.
        datagram.extend(new_address(
            AddressFamily::Inet,
            AddressScope::Universe,
            vec![
                AddressAttribute::Address(peer),
                AddressAttribute::Local(pod),
            ],
        ));
        datagram.extend(new_address(
            AddressFamily::Inet,
            AddressScope::Host,
            vec![AddressAttribute::Local("127.0.0.1".parse().unwrap())],
        ));
        datagram.extend(new_address(
            AddressFamily::Inet6,
            AddressScope::Universe,
            vec![AddressAttribute::Address(v6)],
        ));
        datagram.extend(new_address(
            AddressFamily::Inet6,
            AddressScope::Link,
            vec![AddressAttribute::Address(link)],
        ));
        let mut found = Vec::new();
        assert!(!parse(&datagram, &mut found).unwrap(), "no end of dump yet");
        assert_eq!(found.len(), 4);
        assert_eq!(workload_own(found), vec![pod, v6]);
        let mut done = NetlinkMessage::<RouteNetlinkMessage>::new(
            NetlinkHeader::default(),
            NetlinkPayload::Done(DoneMessage::default()),
        );
        done.finalize();
        let mut buf = vec![0u8; done.buffer_len()];
        done.serialize(&mut buf);
        assert!(parse(&buf, &mut Vec::new()).unwrap(), "end of dump");
    }

    #[test]
    fn a_dump_of_this_namespace_decodes_and_ends() {
        // Every namespace has loopback with 127.0.0.1 (host scope).
        let found = addresses().unwrap();
        assert!(
            found
                .iter()
                .any(|a| a.ip == IpAddr::from([127, 0, 0, 1]) && a.scope == AddressScope::Host),
            "{found:?}"
        );
    }
}
