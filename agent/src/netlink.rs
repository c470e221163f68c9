//! Interface addresses over rtnetlink (`RTM_GETADDR` dumps, encoded and
//! decoded by netlink-packet-route): the node's own (the agent runs in the
//! node's network namespace) and the workloads'. A workload's namespace
//! gets one socket, made once from a thread that entered the namespace and
//! subscribed to its address changes; each round asks that socket, without
//! blocking, whether anything changed, and dumps again only then. Every
//! subscribed socket also sits in one epoll set ([`AddressWakeup`]), so an
//! address change wakes the control loop at once instead of waiting for the
//! next rescan.
use std::{
    collections::HashMap,
    io,
    net::IpAddr,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    path::Path,
    sync::Arc,
};

use tokio::io::unix::AsyncFd;

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
/// Address-change multicast groups (`RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR`).
const ADDRESS_GROUPS: u32 = 0x10 | 0x100;
/// The sequence number of our dump requests (notifications carry 0).
const DUMP_SEQ: u32 = 1;

/// One epoll set over every subscribed address socket: readable when any of
/// them holds a notification. Awaiting it is the sources' "addresses
/// changed" wakeup; the notifications themselves are consumed by the next
/// round's reads. A socket leaves the set when it is closed.
#[derive(Clone)]
pub struct AddressWakeup(Arc<AsyncFd<OwnedFd>>);

impl AddressWakeup {
    /// A new, empty set (inside the Tokio runtime).
    pub fn new() -> io::Result<Self> {
        // SAFETY: plain epoll_create1(2); the descriptor is owned below.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a new descriptor nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: the AsyncFd owns the descriptor, which stays open until it
        // is dropped (and deregistered).
        let fd = unsafe { AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) }?;
        Ok(AddressWakeup(Arc::new(fd)))
    }

    fn add(&self, sock: &OwnedFd) {
        let mut event = libc::epoll_event {
            events: libc::EPOLLIN as u32,
            u64: 0,
        };
        // SAFETY: registers our open socket with our epoll descriptor.
        let r = unsafe {
            libc::epoll_ctl(
                self.0.get_ref().as_raw_fd(),
                libc::EPOLL_CTL_ADD,
                sock.as_raw_fd(),
                &raw mut event,
            )
        };
        if r != 0 {
            tracing::warn!(
                "address changes of one namespace are seen at the next rescan only: {}",
                io::Error::last_os_error()
            );
        }
    }

    /// Resolves when a notification arrives on a subscribed socket. The
    /// runtime's readiness is checked against the set (a change already read
    /// does not wake) and cleared either way: notifications a round leaves
    /// unread (a source still waiting for its first listing) wake once, not
    /// in a busy loop; the next notification wakes again.
    pub async fn changed(&self) {
        loop {
            let Ok(mut guard) = self.0.readable().await else {
                return std::future::pending().await;
            };
            let mut event = libc::epoll_event { events: 0, u64: 0 };
            // SAFETY: polls our epoll descriptor without blocking, into one
            // valid event.
            let n = unsafe { libc::epoll_wait(self.0.get_ref().as_raw_fd(), &raw mut event, 1, 0) };
            guard.clear_ready();
            if n > 0 {
                return;
            }
        }
    }
}

/// A netlink socket of `protocol` (`NETLINK_ROUTE`, `NETLINK_SOCK_DIAG`)
/// in the calling thread's network namespace.
pub(crate) fn open(kind: libc::c_int, protocol: libc::c_int) -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2); the descriptor is owned below.
    let fd = unsafe { libc::socket(libc::AF_NETLINK, kind | libc::SOCK_CLOEXEC, protocol) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a new descriptor nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Runs `f` in a short-lived thread that entered the network namespace
/// `ns` (setns affects the calling thread only; needs CAP_SYS_ADMIN).
pub(crate) fn in_netns<T: Send>(
    ns: &std::fs::File,
    f: impl FnOnce() -> io::Result<T> + Send,
) -> io::Result<T> {
    std::thread::scope(|s| {
        s.spawn(|| {
            // SAFETY: entering a namespace by a valid descriptor, in this
            // thread only.
            if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(io::Error::last_os_error());
            }
            f()
        })
        .join()
        .unwrap_or_else(|_| Err(io::Error::other("the namespace thread panicked")))
    })
}

/// A route netlink socket in the calling thread's namespace, subscribed to
/// `groups`, with a receive timeout so that a dump cannot hang the agent.
fn socket(groups: u32) -> io::Result<OwnedFd> {
    let sock = open(libc::SOCK_RAW, libc::NETLINK_ROUTE)?;
    // SAFETY: an all-zero sockaddr_nl is valid; the fields are set below.
    let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    addr.nl_family = libc::AF_NETLINK as u16;
    addr.nl_groups = groups;
    // SAFETY: binds our socket to a valid sockaddr_nl of the size passed.
    let bound = unsafe {
        libc::bind(
            sock.as_raw_fd(),
            (&raw const addr).cast(),
            std::mem::size_of::<libc::sockaddr_nl>() as u32,
        )
    };
    if bound < 0 {
        return Err(io::Error::last_os_error());
    }
    let timeout = libc::timeval {
        tv_sec: 1,
        tv_usec: 0,
    };
    // SAFETY: sets SO_RCVTIMEO from a valid timeval of the size passed.
    unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&raw const timeout).cast(),
            std::mem::size_of::<libc::timeval>() as u32,
        )
    };
    Ok(sock)
}

/// Every address in the namespace of `sock`, and whether an address-change
/// notification arrived meanwhile (the dump may already be stale).
fn dump(sock: &OwnedFd) -> io::Result<(Vec<Address>, bool)> {
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_DUMP | NLM_F_REQUEST;
    header.sequence_number = DUMP_SEQ;
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
    let mut notified = false;
    let mut recv = vec![0u8; 64 * 1024];
    for _ in 0..MAX_MESSAGES {
        // SAFETY: receives into `recv`, bounded by its length.
        let n = unsafe { libc::recv(sock.as_raw_fd(), recv.as_mut_ptr().cast(), recv.len(), 0) };
        let n = usize::try_from(n).map_err(|_| io::Error::last_os_error())?;
        let (done, other) = parse(&recv[..n], &mut out)?;
        notified |= other;
        if n == 0 || done {
            break;
        }
    }
    Ok((out, notified))
}

/// Whether `sock` holds address-change notifications; consumes them.
fn changed(sock: &OwnedFd) -> bool {
    let mut recv = [0u8; 8192];
    let mut any = false;
    for _ in 0..MAX_MESSAGES {
        // SAFETY: receives into `recv` without blocking.
        let n = unsafe {
            libc::recv(
                sock.as_raw_fd(),
                recv.as_mut_ptr().cast(),
                recv.len(),
                libc::MSG_DONTWAIT,
            )
        };
        if n > 0 {
            any = true;
            continue;
        }
        // EAGAIN: nothing more. Any other error (ENOBUFS: notifications
        // were lost) counts as a change.
        return any || (n < 0 && io::Error::last_os_error().kind() != io::ErrorKind::WouldBlock);
    }
    true
}

/// Every address in the calling thread's network namespace.
pub fn addresses() -> io::Result<Vec<Address>> {
    Ok(dump(&socket(0)?)?.0)
}

/// Decodes the messages in one datagram into `out` (only our dump's):
/// (the end of the dump was seen, a notification was seen).
fn parse(mut bytes: &[u8], out: &mut Vec<Address>) -> io::Result<(bool, bool)> {
    let mut notified = false;
    while !bytes.is_empty() {
        let msg = NetlinkMessage::<RouteNetlinkMessage>::deserialize(bytes)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
        let len = usize::try_from(msg.header.length).unwrap_or(usize::MAX);
        let ours = msg.header.sequence_number == DUMP_SEQ;
        match msg.payload {
            NetlinkPayload::Done(_) if ours => return Ok((true, notified)),
            NetlinkPayload::Error(e) if ours => return Err(e.to_io()),
            NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewAddress(a)) if ours => {
                out.extend(address(&a));
            }
            _ => notified = true,
        }
        // Messages are 4-byte aligned within a datagram.
        let next = len.checked_next_multiple_of(4).unwrap_or(usize::MAX);
        if len == 0 || next > bytes.len() {
            break;
        }
        bytes = &bytes[next..];
    }
    Ok((false, notified))
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
/// node's, as the agent runs in it), loopback excluded: dumped once, and
/// again only after the namespace says its addresses changed.
#[derive(Default)]
pub struct NodeAddresses {
    watched: Option<(OwnedFd, std::collections::BTreeSet<IpAddr>)>,
    stale: bool,
    /// Where a new socket is registered, to wake the loop on a change.
    wakeup: Option<AddressWakeup>,
}

impl NodeAddresses {
    /// Watches the node's addresses, registering its socket with `wakeup`.
    pub fn new(wakeup: Option<AddressWakeup>) -> Self {
        NodeAddresses {
            wakeup,
            ..Default::default()
        }
    }

    /// The node's addresses now; the last known ones when a dump fails (logged).
    pub fn get(&mut self) -> std::collections::BTreeSet<IpAddr> {
        let fresh = match &self.watched {
            Some((sock, _)) if !self.stale && !changed(sock) => None,
            Some(_) => Some(self.watched.take().map(|(sock, _)| sock)),
            None => {
                let sock = socket(ADDRESS_GROUPS).ok();
                if let (Some(w), Some(s)) = (&self.wakeup, &sock) {
                    w.add(s);
                }
                Some(sock)
            }
        };
        if let Some(sock) = fresh {
            match sock.map(|s| dump(&s).map(|d| (s, d))) {
                Some(Ok((sock, (found, notified)))) => {
                    let ips = found
                        .into_iter()
                        .map(|a| a.ip)
                        .filter(|ip| !ip.is_loopback())
                        .collect();
                    self.stale = notified;
                    self.watched = Some((sock, ips));
                }
                Some(Err(e)) => tracing::warn!("reading the node's addresses over netlink: {e}"),
                None => tracing::warn!("no netlink socket for the node's addresses"),
            }
        }
        self.watched
            .as_ref()
            .map(|(_, ips)| ips.clone())
            .unwrap_or_default()
    }
}

/// A workload's own addresses: IPv4 but loopback, IPv6 of global scope.
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

/// A subscribed socket made in the network namespace `netns` (a
/// `/proc/<pid>/ns/net` file) from a thread that entered it (CAP_SYS_ADMIN).
fn socket_in(netns: &Path) -> io::Result<OwnedFd> {
    in_netns(&std::fs::File::open(netns)?, || socket(ADDRESS_GROUPS))
}

/// Workloads' addresses by network namespace (its `(dev, inode)`), each
/// dumped when first seen and again only after a change notification.
#[derive(Default)]
pub struct AddressBook {
    namespaces: HashMap<(u64, u64), Watched>,
    /// Where a new socket is registered, to wake the loop on a change.
    wakeup: Option<AddressWakeup>,
}

struct Watched {
    sock: OwnedFd,
    ips: Vec<IpAddr>,
    /// A notification arrived during the last dump: dump again.
    stale: bool,
    seen: bool,
}

impl AddressBook {
    /// An empty book whose sockets are registered with `wakeup`.
    pub fn new(wakeup: Option<AddressWakeup>) -> Self {
        AddressBook {
            wakeup,
            ..Default::default()
        }
    }

    /// The own addresses of the namespace `key` (opened at `netns`).
    pub fn workload_addresses(&mut self, key: (u64, u64), netns: &Path) -> io::Result<Vec<IpAddr>> {
        if let Some(w) = self.namespaces.get_mut(&key) {
            w.seen = true;
            if w.stale || changed(&w.sock) {
                let (found, notified) = dump(&w.sock)?;
                w.ips = workload_own(found);
                w.stale = notified;
            }
            return Ok(w.ips.clone());
        }
        let sock = socket_in(netns)?;
        if let Some(w) = &self.wakeup {
            w.add(&sock);
        }
        let (found, notified) = dump(&sock)?;
        let ips = workload_own(found);
        self.namespaces.insert(
            key,
            Watched {
                sock,
                ips: ips.clone(),
                stale: notified,
                seen: true,
            },
        );
        Ok(ips)
    }

    /// Ends a round: namespaces not looked at since the last call are gone
    /// (their sockets closed).
    pub fn end_round(&mut self) {
        self.namespaces.retain(|_, w| std::mem::take(&mut w.seen));
    }

    /// Namespaces watched now.
    pub fn len(&self) -> usize {
        self.namespaces.len()
    }

    pub fn is_empty(&self) -> bool {
        self.namespaces.is_empty()
    }
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
        // As our dump's reply (its sequence number).
        let mut ours = Vec::new();
        for chunk in [&datagram] {
            let mut at = 0;
            while at < chunk.len() {
                let len = u32::from_ne_bytes(chunk[at..at + 4].try_into().unwrap()) as usize;
                ours.extend_from_slice(&chunk[at..at + len]);
                let seq = ours.len() - len + 8;
                ours[seq..seq + 4].copy_from_slice(&DUMP_SEQ.to_ne_bytes());
                at += len;
            }
        }
        let mut found = Vec::new();
        assert_eq!(
            parse(&ours, &mut found).unwrap(),
            (false, false),
            "no end of dump yet"
        );
        assert_eq!(found.len(), 4);
        assert_eq!(workload_own(found), vec![pod, v6]);
        let mut done = NetlinkMessage::<RouteNetlinkMessage>::new(
            NetlinkHeader::default(),
            NetlinkPayload::Done(DoneMessage::default()),
        );
        done.finalize();
        let mut buf = vec![0u8; done.buffer_len()];
        done.serialize(&mut buf);
        // With sequence number 0 these are notifications: counted, not taken.
        let mut none = Vec::new();
        assert_eq!(parse(&datagram, &mut none).unwrap(), (false, true));
        assert!(none.is_empty());
        buf[8..12].copy_from_slice(&DUMP_SEQ.to_ne_bytes());
        assert_eq!(
            parse(&buf, &mut Vec::new()).unwrap(),
            (true, false),
            "end of dump"
        );
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
