//! The few `bpf(2)` commands the self-check needs and aya does not expose:
//! creating a cgroup link whose descriptor the agent keeps, pinning and
//! opening objects by descriptor, and reading a link's cgroup and a
//! program's maps. Each call is one syscall on a zeroed `bpf_attr`.
use std::{
    ffi::CString,
    io,
    os::fd::{AsFd, AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd},
    path::Path,
};

const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_PROG_GET_FD_BY_ID: libc::c_long = 13;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_LINK_DETACH: libc::c_long = 34;
const BPF_PROG_TEST_RUN: libc::c_long = 10;

/// `bpf_attr` is a union of up to ~150 bytes; 32 words cover every command here.
type Attr = [u32; 32];

fn bpf(cmd: libc::c_long, attr: &mut Attr) -> io::Result<i64> {
    // SAFETY: `attr` is a valid, writable buffer of the size passed.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr.as_mut_ptr(),
            std::mem::size_of::<Attr>(),
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn owned(r: i64) -> OwnedFd {
    // SAFETY: the kernel returned a new descriptor that nothing else owns.
    unsafe { OwnedFd::from_raw_fd(r as i32) }
}

fn set_u64(attr: &mut Attr, word: usize, v: u64) {
    attr[word] = v as u32;
    attr[word + 1] = (v >> 32) as u32;
}

fn path_c(path: &Path) -> io::Result<CString> {
    use std::os::unix::ffi::OsStrExt as _;
    CString::new(path.as_os_str().as_bytes()).map_err(io::Error::other)
}

/// `BPF_MAP_CREATE` of a throwaway map (feature probes).
pub fn map_create(
    map_type: u32,
    key: u32,
    value: u32,
    max_entries: u32,
    flags: u32,
) -> io::Result<OwnedFd> {
    let mut attr: Attr = [0; 32];
    attr[..5].copy_from_slice(&[map_type, key, value, max_entries, flags]);
    bpf(BPF_MAP_CREATE, &mut attr).map(owned)
}

/// `BPF_PROG_TEST_RUN`: runs a loaded program once on `packet` (for an
/// skb program: an Ethernet header, then the packet) and returns its return
/// value. The kernel builds the skb around a throwaway socket of the
/// calling task's cgroup (programs' tests, no traffic).
pub fn prog_test_run(prog: BorrowedFd<'_>, packet: &[u8]) -> io::Result<u32> {
    let mut attr: Attr = [0; 32];
    attr[0] = prog.as_raw_fd() as u32; // prog_fd
    attr[2] = u32::try_from(packet.len()).map_err(io::Error::other)?; // data_size_in
    set_u64(&mut attr, 4, packet.as_ptr() as u64); // data_in
    attr[8] = 1; // repeat
    bpf(BPF_PROG_TEST_RUN, &mut attr)?;
    Ok(attr[1]) // retval
}

/// `BPF_LINK_CREATE` for a cgroup attach type: the link lives as long as the
/// returned descriptor (or a pin of it).
pub fn link_create(
    prog: BorrowedFd<'_>,
    cgroup: BorrowedFd<'_>,
    attach_type: u32,
) -> io::Result<OwnedFd> {
    let mut attr: Attr = [0; 32];
    attr[0] = prog.as_raw_fd() as u32;
    attr[1] = cgroup.as_raw_fd() as u32;
    attr[2] = attach_type;
    bpf(BPF_LINK_CREATE, &mut attr).map(owned)
}

/// `BPF_LINK_DETACH`: the link stays open but no longer attached (what
/// `bpftool link detach` does). Tests use it to break enforcement.
pub fn link_detach(link: BorrowedFd<'_>) -> io::Result<()> {
    let mut attr: Attr = [0; 32];
    attr[0] = link.as_raw_fd() as u32;
    bpf(BPF_LINK_DETACH, &mut attr).map(|_| ())
}

pub fn obj_pin(fd: BorrowedFd<'_>, path: &Path) -> io::Result<()> {
    let c = path_c(path)?;
    let mut attr: Attr = [0; 32];
    set_u64(&mut attr, 0, c.as_ptr() as u64);
    attr[2] = fd.as_raw_fd() as u32;
    bpf(BPF_OBJ_PIN, &mut attr).map(|_| ())
}

pub fn obj_get(path: &Path) -> io::Result<OwnedFd> {
    let c = path_c(path)?;
    let mut attr: Attr = [0; 32];
    set_u64(&mut attr, 0, c.as_ptr() as u64);
    bpf(BPF_OBJ_GET, &mut attr).map(owned)
}

fn info(fd: BorrowedFd<'_>, buf: &mut [u64; 40]) -> io::Result<()> {
    let mut attr: Attr = [0; 32];
    attr[0] = fd.as_raw_fd() as u32;
    attr[1] = std::mem::size_of_val(buf) as u32;
    set_u64(&mut attr, 2, buf.as_mut_ptr() as u64);
    bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr).map(|_| ())
}

/// What the kernel says about a cgroup link.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinkInfo {
    pub id: u32,
    pub prog_id: u32,
    /// 0 once the link is detached or its cgroup is gone.
    pub cgroup_id: u64,
}

pub fn link_info(fd: BorrowedFd<'_>) -> io::Result<LinkInfo> {
    let mut buf = [0u64; 40];
    info(fd, &mut buf)?;
    // struct bpf_link_info { u32 type, id, prog_id; union (8-aligned) { struct { u64 cgroup_id; u32 attach_type; } cgroup; … } }
    Ok(LinkInfo {
        id: (buf[0] >> 32) as u32,
        prog_id: buf[1] as u32,
        cgroup_id: buf[2],
    })
}

/// The id of a map or program (the second `u32` of both info structs).
pub fn object_id(fd: BorrowedFd<'_>) -> io::Result<u32> {
    let mut buf = [0u64; 40];
    info(fd, &mut buf)?;
    Ok((buf[0] >> 32) as u32)
}

/// The ids of the maps a program uses.
pub fn program_map_ids(prog_id: u32) -> io::Result<Vec<u32>> {
    let mut attr: Attr = [0; 32];
    attr[0] = prog_id;
    let prog = owned(bpf(BPF_PROG_GET_FD_BY_ID, &mut attr)?);
    let mut ids = [0u32; 64];
    let mut buf = [0u64; 40];
    // struct bpf_prog_info: nr_map_ids at byte 52, map_ids (pointer) at 56.
    buf[6] = u64::from(ids.len() as u32) << 32;
    buf[7] = ids.as_mut_ptr() as u64;
    info(prog.as_fd(), &mut buf)?;
    let n = ((buf[6] >> 32) as usize).min(ids.len());
    Ok(ids[..n].to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bad_descriptor_is_an_error_not_a_zeroed_answer() {
        let file = std::fs::File::open("/dev/null").unwrap();
        // /dev/null is no BPF object: EINVAL (or EBADF), never Ok.
        assert!(link_info(file.as_fd()).is_err());
        assert!(obj_get(Path::new("/nonexistent/palisade-pin")).is_err());
    }
}
