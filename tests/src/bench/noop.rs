//! The no-op baseline for per-program cost: a two-instruction program
//! (`r0 = 1; exit`, i.e. "allow") of each Palisade program type, loaded
//! with the raw bpf(2) syscall and attached beside Palisade's at the same
//! cgroup (multi-attach). Detached and freed on drop.
use std::{
    fs::File,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    path::Path,
};

use anyhow::Context as _;

const BPF_PROG_LOAD: i64 = 5;
const BPF_PROG_ATTACH: i64 = 8;
const BPF_PROG_DETACH: i64 = 9;
const BPF_F_ALLOW_MULTI: u32 = 2;

/// (program type, attach type, name) of each baseline: one per Palisade
/// program, same type, same attach point.
pub const BASELINES: [(u32, u32, &str); 6] = [
    // BPF_PROG_TYPE_CGROUP_SKB at BPF_CGROUP_INET_INGRESS and INET_EGRESS
    (8, 0, "noop_ingress"),
    (8, 1, "noop_egress"),
    // BPF_PROG_TYPE_CGROUP_SOCK_ADDR at BPF_CGROUP_INET4_CONNECT, INET6_CONNECT,
    // UDP4_SENDMSG, UDP6_SENDMSG
    (18, 10, "noop_connect4"),
    (18, 11, "noop_connect6"),
    (18, 14, "noop_sendmsg4"),
    (18, 15, "noop_sendmsg6"),
];

fn bpf(cmd: i64, attr: &mut [u8; 128]) -> std::io::Result<i64> {
    // SAFETY: `attr` is a zero-padded bpf_attr of the size passed.
    let r = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), attr.len()) };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn put_u32(attr: &mut [u8; 128], offset: usize, v: u32) {
    attr[offset..offset + 4].copy_from_slice(&v.to_ne_bytes());
}

fn put_u64(attr: &mut [u8; 128], offset: usize, v: u64) {
    attr[offset..offset + 8].copy_from_slice(&v.to_ne_bytes());
}

pub struct NoopPrograms {
    cgroup: File,
    attached: Vec<(OwnedFd, u32)>,
}

impl NoopPrograms {
    /// Loads both baselines and attaches them to `cgroup` (a directory).
    pub fn attach(cgroup: &Path) -> anyhow::Result<NoopPrograms> {
        let cg = File::open(cgroup).with_context(|| format!("opening {}", cgroup.display()))?;
        let mut out = NoopPrograms {
            cgroup: cg,
            attached: Vec::new(),
        };
        // mov64 r0, 1 ; exit
        let insns: [u64; 2] = [0x0000_0001_0000_00b7, 0x0000_0000_0000_0095];
        let license = b"GPL\0";
        for (prog_type, attach_type, name) in BASELINES {
            let mut attr = [0u8; 128];
            put_u32(&mut attr, 0, prog_type);
            put_u32(&mut attr, 4, insns.len() as u32);
            put_u64(&mut attr, 8, insns.as_ptr() as u64);
            put_u64(&mut attr, 16, license.as_ptr() as u64);
            attr[48..48 + name.len()].copy_from_slice(name.as_bytes());
            put_u32(&mut attr, 68, attach_type);
            let fd = bpf(BPF_PROG_LOAD, &mut attr).with_context(|| format!("loading {name}"))?;
            // SAFETY: the syscall returned a new file descriptor we own.
            let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
            let mut attr = [0u8; 128];
            put_u32(&mut attr, 0, out.cgroup.as_raw_fd() as u32);
            put_u32(&mut attr, 4, fd.as_raw_fd() as u32);
            put_u32(&mut attr, 8, attach_type);
            put_u32(&mut attr, 12, BPF_F_ALLOW_MULTI);
            bpf(BPF_PROG_ATTACH, &mut attr).with_context(|| format!("attaching {name}"))?;
            out.attached.push((fd, attach_type));
        }
        Ok(out)
    }
}

impl Drop for NoopPrograms {
    fn drop(&mut self) {
        for (fd, attach_type) in &self.attached {
            let mut attr = [0u8; 128];
            put_u32(&mut attr, 0, self.cgroup.as_raw_fd() as u32);
            put_u32(&mut attr, 4, fd.as_raw_fd() as u32);
            put_u32(&mut attr, 8, *attach_type);
            let _ = bpf(BPF_PROG_DETACH, &mut attr);
        }
    }
}
