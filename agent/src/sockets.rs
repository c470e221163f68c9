//! Sockets a workload uses that were created outside the cgroup root. A
//! socket keeps the cgroup of the process that created it, and every hook
//! Palisade attaches below the root judges by that cgroup: a socket handed
//! to a workload (SCM_RIGHTS, inheritance, systemd socket activation) is
//! never judged. Attaching at the hierarchy's root would judge it, but
//! would put Palisade's programs on every process of the machine; instead
//! such sockets are found and reported (log, `palisade status`, metrics).
//!
//! How: each workload process's descriptors (`/proc/<pid>/fd`, `socket:[inode]`)
//! are matched against the TCP and UDP sockets of its network namespace as
//! `sock_diag` lists them, with each socket's cgroup id (kernel ≥ 5.7).
use std::{
    collections::{BTreeMap, BTreeSet},
    fs::File,
    io,
    os::fd::{AsRawFd as _, OwnedFd},
    path::Path,
};

/// A socket in use by a workload whose cgroup is outside the root.
#[derive(
    Clone,
    Debug,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    serde::Serialize,
    serde::Deserialize,
    schemars::JsonSchema,
)]
pub struct ForeignSocket {
    pub workload: String,
    pub pid: u32,
    pub inode: u64,
    /// The cgroup id the socket was created in.
    pub cgroup_id: u64,
    /// `TCP` or `UDP`.
    pub protocol: String,
}

/// Socket inodes of `pid`'s descriptors.
fn socket_inodes(pid: u32) -> BTreeSet<u64> {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return BTreeSet::new();
    };
    dir.flatten()
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .filter_map(|target| {
            let t = target.to_string_lossy().into_owned();
            t.strip_prefix("socket:[")?.strip_suffix(']')?.parse().ok()
        })
        .collect()
}

const SOCK_DIAG_BY_FAMILY: u16 = 20;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_DUMP: u16 = 0x300;
const NLMSG_DONE: u16 = 3;
const NLMSG_ERROR: u16 = 2;
const INET_DIAG_CGROUP_ID: u16 = 21;

/// (inode → (cgroup id, protocol)) of every TCP and UDP socket in the
/// calling thread's network namespace.
fn diag_sockets() -> io::Result<BTreeMap<u64, (u64, &'static str)>> {
    let fd = crate::netlink::open(libc::SOCK_DGRAM, libc::NETLINK_SOCK_DIAG)?;
    let mut out = BTreeMap::new();
    for family in [libc::AF_INET as u8, libc::AF_INET6 as u8] {
        for (protocol, name) in [
            (libc::IPPROTO_TCP as u8, "TCP"),
            (libc::IPPROTO_UDP as u8, "UDP"),
        ] {
            // nlmsghdr (16) + inet_diag_req_v2 (56).
            let mut req = [0u8; 72];
            req[0..4].copy_from_slice(&72u32.to_ne_bytes());
            req[4..6].copy_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
            req[6..8].copy_from_slice(&(NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
            req[16] = family;
            req[17] = protocol;
            req[20..24].copy_from_slice(&u32::MAX.to_ne_bytes()); // every state
            // SAFETY: the buffer is valid for its length.
            if unsafe { libc::send(fd.as_raw_fd(), req.as_ptr().cast(), req.len(), 0) } < 0 {
                return Err(io::Error::last_os_error());
            }
            read_dump(&fd, name, &mut out)?;
        }
    }
    Ok(out)
}

fn read_dump(
    fd: &OwnedFd,
    protocol: &'static str,
    out: &mut BTreeMap<u64, (u64, &'static str)>,
) -> io::Result<()> {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        // SAFETY: the buffer is valid for its length.
        let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let data = &buf[..n as usize];
        let mut off = 0;
        while off + 16 <= data.len() {
            let len = u32::from_ne_bytes(data[off..off + 4].try_into().unwrap_or([0; 4])) as usize;
            let ty = u16::from_ne_bytes([data[off + 4], data[off + 5]]);
            if len < 16 || off + len > data.len() {
                return Ok(());
            }
            match ty {
                NLMSG_DONE => return Ok(()),
                NLMSG_ERROR => return Err(io::Error::other("sock_diag answered an error")),
                _ => {}
            }
            // inet_diag_msg (72 bytes) after the header; inode at offset 68.
            let msg = &data[off + 16..off + len];
            if msg.len() >= 72 {
                let inode = u64::from(u32::from_ne_bytes(msg[68..72].try_into().unwrap_or([0; 4])));
                let mut cgroup = 0u64;
                let mut a = 72;
                while a + 4 <= msg.len() {
                    let alen = usize::from(u16::from_ne_bytes([msg[a], msg[a + 1]]));
                    let aty = u16::from_ne_bytes([msg[a + 2], msg[a + 3]]);
                    if alen < 4 || a + alen > msg.len() {
                        break;
                    }
                    if aty == INET_DIAG_CGROUP_ID && alen >= 12 {
                        cgroup =
                            u64::from_ne_bytes(msg[a + 4..a + 12].try_into().unwrap_or([0; 8]));
                    }
                    a += (alen + 3) & !3;
                }
                out.insert(inode, (cgroup, protocol));
            }
            off += (len + 3) & !3;
        }
    }
}

/// Finds the sockets of `processes` ((workload name, pid) in managed
/// cgroups) whose cgroup is not one of `managed` (the cgroup ids below the
/// root). Each network namespace is listed once, from a thread that enters it.
pub fn find_foreign(processes: &[(String, u32)], managed: &BTreeSet<u64>) -> Vec<ForeignSocket> {
    let mut by_netns: BTreeMap<(u64, u64), Vec<(&str, u32)>> = BTreeMap::new();
    for (workload, pid) in processes {
        if let Ok(meta) = std::fs::metadata(format!("/proc/{pid}/ns/net")) {
            use std::os::unix::fs::MetadataExt as _;
            by_netns
                .entry((meta.dev(), meta.ino()))
                .or_default()
                .push((workload.as_str(), *pid));
        }
    }
    let mut out = Vec::new();
    for procs in by_netns.values() {
        let Some(&(_, first)) = procs.first() else {
            continue;
        };
        let Ok(ns) = File::open(format!("/proc/{first}/ns/net")) else {
            continue;
        };
        let sockets = crate::netlink::in_netns(&ns, diag_sockets).unwrap_or_default();
        for (workload, pid) in procs {
            for inode in socket_inodes(*pid) {
                if let Some((cgroup, protocol)) = sockets.get(&inode)
                    && *cgroup != 0
                    && !managed.contains(cgroup)
                {
                    out.push(ForeignSocket {
                        workload: (*workload).to_owned(),
                        pid: *pid,
                        inode,
                        cgroup_id: *cgroup,
                        protocol: (*protocol).to_owned(),
                    });
                }
            }
        }
    }
    out.sort();
    out.dedup();
    out
}

/// Pids in a cgroup directory (`cgroup.procs`).
pub fn pids(cgroup_dir: &Path) -> Vec<u32> {
    std::fs::read_to_string(cgroup_dir.join("cgroup.procs"))
        .map(|t| t.lines().filter_map(|l| l.trim().parse().ok()).collect())
        .unwrap_or_default()
}
