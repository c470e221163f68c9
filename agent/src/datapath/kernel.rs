//! The real datapath: loads the embedded eBPF object with aya, attaches the
//! programs under the configured cgroup root (multi-attach, through BPF
//! links, so other programs on the node keep working), and syncs the maps.
use std::{
    collections::{BTreeMap, BTreeSet},
    fs::File,
    net::IpAddr,
    os::fd::AsRawFd as _,
    path::Path,
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, LpmTrie, MapData, PerCpuArray, RingBuf, lpm_trie::Key},
};
use ipnet::IpNet;
use palisade_common::{
    EnforcedKey, EnforcedValue, IpcacheValue, MAX_SERVICE_BACKENDS, PolicyKeyData, PolicyValue,
    SelfKey, ServiceBackend, ServiceKey, ServiceValue, counter, maps, options, programs, state,
};

use super::{
    ApplyError, ApplyReport, Counters, Datapath, DatapathError, Desired, Posture, ServiceBackends,
    ServiceFrontend, diff,
};
use crate::{config::MapCapacities, policy::compile::EntryKey};

mod guard;
pub use super::Health;

/// The eBPF object built by `build.rs`.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/palisade"));

/// Per-slot contents as last written.
#[derive(Default)]
struct SlotContents {
    entries: BTreeMap<EntryKey, PolicyValue>,
    enforced: BTreeMap<(u8, u32), EnforcedValue>,
}

pub struct KernelDatapath {
    ebpf: Ebpf,
    capacities: MapCapacities,
    active_slot: u8,
    generation: u32,
    slots: [SlotContents; 2],
    cgroups: BTreeMap<u64, u32>,
    ipcache: BTreeMap<IpNet, IpcacheValue>,
    /// The version of the desired ipcache `ipcache` was last brought to.
    ipcache_written: super::Stamp,
    /// The policy table in force (as the planner handed it out).
    written_policy: Option<std::sync::Arc<crate::policy::CompiledPolicy>>,
    own_addresses: BTreeSet<(u64, IpAddr)>,
    services: BTreeMap<ServiceFrontend, ServiceBackends>,
    options: u32,
    attach_points: Vec<String>,
    posture: Posture,
    /// The cgroup root, an open descriptor of it and its cgroup id.
    root: std::path::PathBuf,
    root_fd: File,
    root_ino: u64,
    pins: Option<Pins>,
    /// The links the agent enforces through (see `guard`).
    links: Vec<guard::HeldLink>,
    /// Ids of the pinned maps in use, by name.
    map_ids: BTreeMap<&'static str, u32>,
    repairs: BTreeMap<&'static str, u64>,
    checks: u64,
    /// What was adopted from the pin directory, and what replaced.
    adoption: super::Adoption,
}

/// A compiled policy entry as the policy map's longest-prefix key in `slot`:
/// the prefix covers slot, direction, protocol and both identities, then
/// `port_bits` of the port.
pub fn encode_policy_key(entry: EntryKey, slot: u8) -> Key<PolicyKeyData> {
    Key::new(
        palisade_common::POLICY_PREFIX_ANY_PORT + u32::from(entry.port_bits),
        PolicyKeyData {
            slot,
            direction: entry.direction,
            protocol: entry.protocol,
            _pad0: 0,
            local_identity: entry.local,
            peer_identity: entry.peer,
            port_be: entry.port.to_be_bytes(),
            _pad1: [0; 2],
        },
    )
}

/// The inverse of [`encode_policy_key`]: (slot, entry).
pub fn decode_policy_key(key: &Key<PolicyKeyData>) -> (u8, EntryKey) {
    let data = key.data();
    let port_bits = key
        .prefix_len()
        .saturating_sub(palisade_common::POLICY_PREFIX_ANY_PORT);
    (
        data.slot & 1,
        EntryKey {
            direction: data.direction,
            protocol: data.protocol,
            local: data.local_identity,
            peer: data.peer_identity,
            port: u16::from_be_bytes(data.port_be),
            port_bits: u8::try_from(port_bits).unwrap_or(u8::MAX),
        },
    )
}

/// A frontend as the Service map's key.
fn service_key(f: &ServiceFrontend) -> ServiceKey {
    ServiceKey {
        addr: addr16(f.addr),
        port: f.port,
        protocol: f.protocol,
        _pad: 0,
    }
}

/// Backends as the Service map's value: more distinct pairs than the kernel
/// judges are written as "too many" (refused there, fail closed).
fn service_value(b: &ServiceBackends) -> ServiceValue {
    let mut value = ServiceValue {
        service_id: b.service_id,
        count: u8::try_from(b.backends.len()).unwrap_or(u8::MAX),
        ..ServiceValue::default()
    };
    for (slot, (at, port)) in value.backends.iter_mut().zip(&b.backends) {
        *slot = ServiceBackend {
            identity: at.identity,
            cidr_identity: at.cidr_identity,
            port: *port,
            _pad: 0,
        };
    }
    if b.backends.len() > MAX_SERVICE_BACKENDS {
        value.count = u8::try_from(MAX_SERVICE_BACKENDS + 1).unwrap_or(u8::MAX);
    }
    value
}

fn map_err(map: &'static str) -> impl Fn(aya::maps::MapError) -> DatapathError {
    move |source| DatapathError::Map { map, source }
}

/// A delete of `map` that found nothing to delete is done (the entry is
/// gone either way); any other failure is an error, and the caller's mirror
/// keeps the entry, so the next apply deletes it again.
pub(super) fn removed(
    result: Result<(), aya::maps::MapError>,
    map: &'static str,
) -> Result<(), DatapathError> {
    match result {
        Err(aya::maps::MapError::KeyNotFound | aya::maps::MapError::ElementNotFound) => Ok(()),
        Err(aya::maps::MapError::SyscallError(e))
            if e.io_error.raw_os_error() == Some(libc::ENOENT) =>
        {
            Ok(())
        }
        other => other.map_err(map_err(map)),
    }
}

/// Map `name` of the object as the typed map `T` (read access).
fn typed<'a, T>(ebpf: &'a Ebpf, name: &'static str) -> Result<T, DatapathError>
where
    T: TryFrom<&'a aya::maps::Map, Error = aya::maps::MapError>,
{
    T::try_from(ebpf.map(name).ok_or(DatapathError::MissingMap(name))?).map_err(map_err(name))
}

/// Map `name` of the object as the typed map `T` (write access).
fn typed_mut<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<T, DatapathError>
where
    T: TryFrom<&'a mut aya::maps::Map, Error = aya::maps::MapError>,
{
    T::try_from(ebpf.map_mut(name).ok_or(DatapathError::MissingMap(name))?).map_err(map_err(name))
}

/// An address block as an ipcache key (IPv4 mapped into IPv6).
pub fn ip_key(net: &IpNet) -> Key<[u8; 16]> {
    match net {
        IpNet::V4(n) => Key::new(
            palisade_common::IPV4_MAPPED_PREFIX + u32::from(n.prefix_len()),
            palisade_common::v4_mapped(n.addr().octets()),
        ),
        IpNet::V6(n) => Key::new(u32::from(n.prefix_len()), n.addr().octets()),
    }
}

/// An ipcache key back into a block.
fn net_of(prefix_len: u32, addr: [u8; 16]) -> Option<IpNet> {
    let ip = ip_of16(addr);
    match ip {
        IpAddr::V4(v4) => IpNet::new(
            v4.into(),
            u8::try_from(prefix_len.checked_sub(palisade_common::IPV4_MAPPED_PREFIX)?).ok()?,
        )
        .ok(),
        IpAddr::V6(v6) => IpNet::new(v6.into(), u8::try_from(prefix_len).ok()?).ok(),
    }
}

/// The kernel's 16-byte form back into an address (`::ffff:a.b.c.d` → IPv4).
fn ip_of16(addr: [u8; 16]) -> IpAddr {
    let v6 = std::net::Ipv6Addr::from(addr);
    match v6.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None => IpAddr::V6(v6),
    }
}

/// An address as the kernel stores it (IPv4 mapped into IPv6).
pub fn addr16(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(v4) => palisade_common::v4_mapped(v4.octets()),
        IpAddr::V6(v6) => v6.octets(),
    }
}

/// Where the agent pins its maps and links (bpffs), so enforcement outlives
/// the agent and a restarted agent adopts what is there.
#[derive(Clone, Debug)]
pub struct Pins {
    pub dir: std::path::PathBuf,
}

/// Marks the pin directory's layout (bpffs holds no regular files, so the
/// marker is an empty directory). A pin directory of another layout (an
/// older or newer agent, other map names or types) is replaced, never
/// adopted: adopting links whose programs use other maps would leave the
/// agent updating maps nothing reads. Bump with every map name version.
const PIN_LAYOUT: &str = "layout-2";

impl Pins {
    fn create_dir(&self) -> Result<(), DatapathError> {
        std::fs::create_dir_all(&self.dir).map_err(|source| DatapathError::Io {
            what: "creating pin directory",
            path: self.dir.display().to_string(),
            source,
        })
    }

    fn layout(&self) -> std::path::PathBuf {
        self.dir.join(PIN_LAYOUT)
    }

    /// The layout markers present (normally exactly `PIN_LAYOUT`).
    fn layouts(&self) -> Vec<String> {
        std::fs::read_dir(&self.dir)
            .map(|rd| {
                rd.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n.starts_with("layout-"))
                    .collect()
            })
            .unwrap_or_default()
    }

    fn map(&self, name: &str) -> std::path::PathBuf {
        self.dir.join(name)
    }
    fn link(&self, program: &str) -> std::path::PathBuf {
        self.dir.join(format!("link_{program}"))
    }
}

/// Where agents take their pin-directory locks (bpffs holds no regular
/// files); the DaemonSet mounts it from the host, as the control socket's.
pub const LOCK_DIR: &str = "/run/palisade/locks";

/// The exclusive claim of one agent on a pin directory, held while it runs:
/// a second agent with the same `bpfPinDir` would adopt the first one's
/// programs and rewrite its tables under it.
pub struct PinLock {
    file: File,
    path: std::path::PathBuf,
}

impl Pins {
    /// Takes the lock, or says which process holds it.
    pub fn lock(&self) -> Result<PinLock, DatapathError> {
        let name: String = self
            .dir
            .display()
            .to_string()
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        let path = Path::new(LOCK_DIR).join(format!("{name}.lock"));
        let io = |what: &'static str, source| DatapathError::Io {
            what,
            path: path.display().to_string(),
            source,
        };
        std::fs::create_dir_all(LOCK_DIR).map_err(|e| io("creating the lock directory of", e))?;
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| io("opening the pin lock", e))?;
        // SAFETY: a zeroed flock is a valid argument; fcntl reads/writes it.
        let mut fl: libc::flock = unsafe { std::mem::zeroed() };
        fl.l_type = libc::F_WRLCK as libc::c_short;
        fl.l_whence = libc::SEEK_SET as libc::c_short;
        // SAFETY: valid descriptor and flock.
        if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_SETLK, &fl) } != 0 {
            // SAFETY: as above; F_GETLK fills in the holder.
            let holder = if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GETLK, &mut fl) } == 0
                && fl.l_type != libc::F_UNLCK as libc::c_short
            {
                fl.l_pid
            } else {
                0
            };
            return Err(DatapathError::PinsInUse {
                dir: self.dir.display().to_string(),
                pid: holder,
                lock: path.display().to_string(),
            });
        }
        Ok(PinLock { file, path })
    }
}

impl Drop for PinLock {
    fn drop(&mut self) {
        // Removed before the descriptor (and with it the lock) goes.
        let _ = std::fs::remove_file(&self.path);
        let _ = &self.file;
    }
}

/// The kernel's release (`uname -r`).
pub fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "unknown".to_owned())
}

/// Why a kernel release is too old for the programs, if it is.
fn too_old(release: &str) -> Option<String> {
    let version: Vec<u32> = release
        .split(|c: char| !c.is_ascii_digit())
        .take(2)
        .filter_map(|n| n.parse().ok())
        .collect();
    match version[..] {
        [major, minor] if (major, minor) < (5, 8) => Some(
            "Linux 5.8 or later is needed (BPF ring buffer: 5.8; BPF links for cgroup programs: 5.7; cgroup v2 socket hooks: 4.18)".into(),
        ),
        _ => None,
    }
}

/// Probes what the programs need before loading them, so a kernel that
/// lacks a feature is refused with its name and the version that has it,
/// not with a verifier log.
pub fn probe_kernel() -> Result<(), DatapathError> {
    use super::bpfsys::map_create;
    let release = kernel_release();
    let refuse = |missing: String| DatapathError::Kernel {
        release: release.clone(),
        missing,
    };
    if let Some(missing) = too_old(&release) {
        return Err(refuse(missing));
    }
    // BPF_MAP_TYPE_ARRAY: is bpf() there and permitted at all?
    match map_create(2, 4, 4, 1, 0) {
        Ok(_) => {}
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => {
            return Err(refuse(format!(
                "the bpf() syscall is not permitted ({e}): run as root, or with CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN and CAP_PERFMON as the DaemonSet grants"
            )));
        }
        Err(e) => {
            return Err(refuse(format!(
                "the bpf() syscall fails ({e}): a kernel built with CONFIG_BPF_SYSCALL is needed"
            )));
        }
    }
    // BPF_MAP_TYPE_RINGBUF (the audit stream) and BPF_MAP_TYPE_LPM_TRIE
    // (ipcache and policy; BPF_F_NO_PREALLOC).
    if let Err(e) = map_create(27, 0, 0, 4096, 0) {
        return Err(refuse(format!(
            "no BPF ring buffer maps ({e}): Linux 5.8 or later"
        )));
    }
    if let Err(e) = map_create(11, 8, 4, 1, 1) {
        return Err(refuse(format!(
            "no BPF LPM trie maps ({e}): Linux 4.11 or later"
        )));
    }
    Ok(())
}

/// Mounts bpffs at /sys/fs/bpf when nothing is mounted there.
pub fn ensure_bpffs() -> Result<(), DatapathError> {
    let mounted = crate::discovery::mounts_of_type("bpf")
        .unwrap_or_default()
        .iter()
        .any(|m| m == Path::new("/sys/fs/bpf"));
    if mounted {
        return Ok(());
    }
    let io = |source| DatapathError::Io {
        what: "mounting bpffs at",
        path: "/sys/fs/bpf".into(),
        source,
    };
    std::fs::create_dir_all("/sys/fs/bpf").map_err(io)?;
    // SAFETY: constant, NUL-terminated arguments.
    let rc = unsafe {
        libc::mount(
            c"bpf".as_ptr(),
            c"/sys/fs/bpf".as_ptr(),
            c"bpf".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(io(std::io::Error::last_os_error()));
    }
    tracing::info!("mounted bpffs at /sys/fs/bpf");
    Ok(())
}

/// Removes every pin under `pins.dir`: links (which detaches the programs,
/// unless something else holds them) and maps. Returns what was removed.
/// `palisade cleanup`: every pin under `pins.dir` (see `remove_pins`), and
/// the directory's lock file when no agent holds it (a killed agent leaves it).
pub fn cleanup(pins: &Pins) -> Result<Vec<String>, DatapathError> {
    let removed = remove_pins(pins)?;
    // Taking and dropping the lock removes its file; held by a running
    // agent, it stays.
    if let Ok(lock) = pins.lock() {
        drop(lock);
    }
    Ok(removed)
}

/// Removes every pin under `pins.dir` (the agent itself, replacing pins of
/// another layout while it holds the directory's lock).
fn remove_pins(pins: &Pins) -> Result<Vec<String>, DatapathError> {
    let mut removed = Vec::new();
    let entries = match std::fs::read_dir(&pins.dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(removed),
        Err(source) => {
            return Err(DatapathError::Io {
                what: "reading pin directory",
                path: pins.dir.display().to_string(),
                source,
            });
        }
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with("link_")
            && let Ok(link) = aya::programs::links::PinnedLink::from_pin(&path)
        {
            // Unpinning and dropping the last reference detaches the program.
            let _ = link.unpin();
        } else if std::fs::remove_file(&path).is_err() {
            let _ = std::fs::remove_dir(&path);
        }
        removed.push(name);
    }
    let _ = std::fs::remove_dir(&pins.dir);
    Ok(removed)
}

impl KernelDatapath {
    /// Loads the programs and attaches them to `cgroup_root`. With `pins`,
    /// maps and links are pinned; what is already pinned there is adopted —
    /// maps with their contents, links without detaching — and an
    /// incompatible pinned layout is replaced (logged).
    pub fn load(
        cgroup_root: &Path,
        capacities: &MapCapacities,
        wakeup_bytes: u32,
        pins: Option<&Pins>,
    ) -> Result<KernelDatapath, DatapathError> {
        let load = || {
            let mut loader = EbpfLoader::new();
            loader
                .map_max_entries(maps::CGROUP_IDENTITY, capacities.cgroups)
                .map_max_entries(maps::IPCACHE, capacities.ipcache)
                .map_max_entries(maps::POLICY, capacities.policy)
                .map_max_entries(maps::ENFORCED, capacities.enforced)
                .map_max_entries(maps::FLOWS, capacities.flows)
                .map_max_entries(maps::SELF_ADDRESSES, capacities.ipcache)
                .map_max_entries(maps::SERVICES, capacities.services)
                .map_max_entries(maps::AUDIT, capacities.audit_ring_bytes);
            let paths: Vec<(&str, std::path::PathBuf)> = match pins {
                Some(p) => guard::PINNED_MAPS.iter().map(|n| (*n, p.map(n))).collect(),
                None => Vec::new(),
            };
            for (name, path) in &paths {
                loader.map_pin_path(name, path.as_path());
            }
            loader.load(EBPF_OBJECT)
        };
        let mut replaced = Vec::new();
        if let Some(p) = pins {
            ensure_bpffs()?;
            let found = std::fs::read_dir(&p.dir).map(|rd| rd.count()).unwrap_or(0);
            let layouts = p.layouts();
            if found > 0 && layouts != [PIN_LAYOUT] {
                tracing::warn!(
                    pins = %p.dir.display(),
                    found = %layouts.join(","),
                    expected = PIN_LAYOUT,
                    "pinned state of an incompatible layout; replacing it: enforcement restarts from empty tables"
                );
                replaced.push(super::Replaced {
                    what: "pins".into(),
                    why: format!(
                        "layout {} where this agent uses {PIN_LAYOUT}",
                        layouts.join(",")
                    ),
                });
                remove_pins(p)?;
            }
            p.create_dir()?;
        }
        let mut ebpf = match (load(), pins) {
            (Ok(e), _) => e,
            (
                Err(aya::EbpfError::MapError(
                    e @ aya::maps::MapError::IncompatiblePinnedMap { .. },
                )),
                Some(p),
            ) => {
                tracing::warn!(pins = %p.dir.display(), "pinned maps have an incompatible layout or capacity ({e}); replacing them: enforcement restarts from empty tables");
                replaced.push(super::Replaced {
                    what: "maps".into(),
                    why: format!("incompatible layout or capacity: {e}"),
                });
                remove_pins(p)?;
                p.create_dir()?;
                load().map_err(|e| DatapathError::Load(Box::new(e)))?
            }
            (Err(e), _) => return Err(DatapathError::Load(Box::new(e))),
        };
        let adopted = pins.is_some_and(|p| p.link(programs::INGRESS).exists());
        {
            let mut st: Array<&mut MapData, u32> = typed_mut(&mut ebpf, maps::STATE)?;
            if !adopted {
                st.set(state::ACTIVE_SLOT, &0, 0)
                    .map_err(map_err(maps::STATE))?;
                st.set(state::GENERATION, &1, 0)
                    .map_err(map_err(maps::STATE))?;
            }
            st.set(state::WAKEUP_BYTES, &wakeup_bytes, 0)
                .map_err(map_err(maps::STATE))?;
        }
        let root = File::open(cgroup_root).map_err(|source| DatapathError::Io {
            what: "opening cgroup root",
            path: cgroup_root.display().to_string(),
            source,
        })?;
        let root_ino = guard::cgroup_id(cgroup_root).map_err(|source| DatapathError::Io {
            what: "reading the cgroup id of",
            path: cgroup_root.display().to_string(),
            source,
        })?;
        let mut datapath = KernelDatapath {
            ebpf,
            capacities: capacities.clone(),
            active_slot: 0,
            generation: 1,
            slots: Default::default(),
            cgroups: BTreeMap::new(),
            ipcache: BTreeMap::new(),
            ipcache_written: super::Stamp::default(),
            written_policy: None,
            own_addresses: BTreeSet::new(),
            services: BTreeMap::new(),
            options: 0,
            attach_points: Vec::new(),
            posture: Posture::of(Ok(())),
            root: cgroup_root.to_owned(),
            root_fd: root,
            root_ino,
            pins: pins.cloned(),
            links: Vec::new(),
            map_ids: BTreeMap::new(),
            repairs: BTreeMap::new(),
            adoption: super::Adoption {
                replaced,
                ..super::Adoption::default()
            },
            checks: 0,
        };
        datapath.record_map_ids();
        for (name, attach_type) in guard::ENFORCING {
            datapath.hold_link(name, attach_type)?;
        }
        // Packet sockets: refused through the BPF LSM where the kernel has
        // it; held and checked like the other links.
        let packet_sockets = datapath
            .hold_link(programs::SOCKET_CREATE, guard::BPF_LSM_CGROUP)
            .map_err(|e| e.to_string());
        datapath.posture = Posture::of(packet_sockets);
        if let Some(p) = pins.filter(|p| !p.layout().exists()) {
            std::fs::create_dir(p.layout()).map_err(|source| DatapathError::Io {
                what: "creating",
                path: p.layout().display().to_string(),
                source,
            })?;
        }
        if adopted {
            datapath.observe()?;
        }
        Ok(datapath)
    }

    /// Holds the link of `name` on the root: the pinned one when it can be
    /// adopted, else a new one; named in the attach points either way.
    fn hold_link(&mut self, name: &'static str, attach_type: u32) -> Result<(), DatapathError> {
        let link = match self.adopt_link(name, attach_type) {
            Some(link) => {
                let from = self
                    .pins
                    .as_ref()
                    .map(|p| p.dir.display().to_string())
                    .unwrap_or_default();
                self.attach_points.push(format!(
                    "{name} on {} (adopted from {from})",
                    self.root.display()
                ));
                link
            }
            None => {
                let link = self.attach_fresh(name, attach_type)?;
                self.attach_points
                    .push(format!("{name} on {}", self.root.display()));
                link
            }
        };
        self.links.push(link);
        Ok(())
    }

    /// Reads what the (adopted) kernel maps hold, so the first apply is a
    /// diff against the real state: the live slot stays in force until the
    /// new table is complete.
    fn observe(&mut self) -> Result<(), DatapathError> {
        let st: Array<&MapData, u32> = typed(&self.ebpf, maps::STATE)?;
        self.active_slot = (st
            .get(&state::ACTIVE_SLOT, 0)
            .map_err(map_err(maps::STATE))?
            & 1) as u8;
        self.generation = st
            .get(&state::GENERATION, 0)
            .map_err(map_err(maps::STATE))?
            .max(2);
        for slot in 0..2 {
            self.slots[usize::from(slot)].entries = self.read_policy_slot(slot)?;
        }
        let enforced: HashMap<&MapData, EnforcedKey, EnforcedValue> =
            typed(&self.ebpf, maps::ENFORCED)?;
        for item in enforced.iter() {
            let (k, v) = item.map_err(map_err(maps::ENFORCED))?;
            self.slots[usize::from(k.slot & 1)]
                .enforced
                .insert((k.direction, k.identity), v);
        }
        let cgroups: HashMap<&MapData, u64, u32> = typed(&self.ebpf, maps::CGROUP_IDENTITY)?;
        for item in cgroups.iter() {
            let (k, v) = item.map_err(map_err(maps::CGROUP_IDENTITY))?;
            self.cgroups.insert(k, v);
        }
        let ipcache: LpmTrie<&MapData, [u8; 16], IpcacheValue> = typed(&self.ebpf, maps::IPCACHE)?;
        for item in ipcache.iter() {
            let (k, v) = item.map_err(map_err(maps::IPCACHE))?;
            if let Some(net) = net_of(k.prefix_len(), k.data()) {
                self.ipcache.insert(net, v);
            }
        }
        let own: HashMap<&MapData, SelfKey, u8> = typed(&self.ebpf, maps::SELF_ADDRESSES)?;
        for item in own.iter() {
            let (k, _) = item.map_err(map_err(maps::SELF_ADDRESSES))?;
            self.own_addresses.insert((k.cgroup_id, ip_of16(k.addr)));
        }
        let services: HashMap<&MapData, ServiceKey, ServiceValue> =
            typed(&self.ebpf, maps::SERVICES)?;
        for item in services.iter() {
            let (k, v) = item.map_err(map_err(maps::SERVICES))?;
            let frontend = ServiceFrontend {
                addr: ip_of16(k.addr),
                port: k.port,
                protocol: k.protocol,
            };
            let count = usize::from(v.count).min(MAX_SERVICE_BACKENDS);
            let backends = v.backends[..count]
                .iter()
                .map(|b| {
                    let at = IpcacheValue {
                        identity: b.identity,
                        cidr_identity: b.cidr_identity,
                    };
                    (at, b.port)
                })
                .collect();
            self.services.insert(
                frontend,
                ServiceBackends {
                    service_id: v.service_id,
                    backends,
                },
            );
        }
        self.options = st.get(&state::OPTIONS, 0).map_err(map_err(maps::STATE))?;
        let inactive = 1 - self.active_slot;
        // The previous table, or one half-written by an agent that died
        // mid-apply: drop it (its contents are known exactly either way, but
        // a fresh start keeps the adopted state simple).
        if !self.slots[usize::from(inactive)].entries.is_empty()
            || !self.slots[usize::from(inactive)].enforced.is_empty()
        {
            self.clear_slot(inactive)?;
        }
        tracing::info!(
            slot = self.active_slot,
            entries = self.slots[usize::from(self.active_slot)].entries.len(),
            cgroups = self.cgroups.len(),
            "adopted pinned programs, links and maps; enforcement never stopped"
        );
        self.adoption.adopted = true;
        self.adoption.policy_entries = self.slots[usize::from(self.active_slot)].entries.len();
        self.adoption.cgroups = self.cgroups.len();
        Ok(())
    }

    /// The policy entries of `slot` as the kernel holds them.
    fn read_policy_slot(&self, slot: u8) -> Result<BTreeMap<EntryKey, PolicyValue>, DatapathError> {
        let policy: LpmTrie<&MapData, PolicyKeyData, PolicyValue> =
            typed(&self.ebpf, maps::POLICY)?;
        let mut out = BTreeMap::new();
        for item in policy.iter() {
            let (key, value) = item.map_err(map_err(maps::POLICY))?;
            let (key_slot, entry) = decode_policy_key(&key);
            if key_slot == slot {
                out.insert(entry, value);
            }
        }
        Ok(out)
    }

    /// Makes the kernel's active slot equal what the agent wrote into it
    /// (after something else changed it).
    fn rewrite_active(&mut self) -> Result<(), DatapathError> {
        let slot = self.active_slot;
        let kernel = self.read_policy_slot(slot)?;
        let ours = self.slots[usize::from(slot)].entries.clone();
        let mut policy = policy_map(&mut self.ebpf)?;
        for key in kernel.keys().filter(|k| !ours.contains_key(k)) {
            policy
                .remove(&encode_policy_key(*key, slot))
                .map_err(map_err(maps::POLICY))?;
        }
        for (key, value) in ours.iter().filter(|(k, v)| kernel.get(k) != Some(v)) {
            policy
                .insert(&encode_policy_key(*key, slot), value, 0)
                .map_err(map_err(maps::POLICY))?;
        }
        let ours = self.slots[usize::from(slot)].enforced.clone();
        let mut enforced = enforced_map(&mut self.ebpf)?;
        let keys: Vec<EnforcedKey> = enforced
            .keys()
            .filter_map(Result::ok)
            .filter(|k| k.slot == slot && !ours.contains_key(&(k.direction, k.identity)))
            .collect();
        for k in keys {
            enforced.remove(&k).map_err(map_err(maps::ENFORCED))?;
        }
        for (&(direction, identity), value) in &ours {
            let key = EnforcedKey {
                slot,
                direction,
                _pad: [0; 2],
                identity,
            };
            enforced
                .insert(&key, value, 0)
                .map_err(map_err(maps::ENFORCED))?;
        }
        Ok(())
    }

    /// Gives `cgroup` the identity `id` in the kernel now, outside a planned
    /// apply: the agent's own cgroup when it lies under the root, written
    /// before the agent opens any connection (adopted programs judge its
    /// first packets already). Plans keep the entry (see `Planner::exempt`).
    pub fn exempt(&mut self, cgroup: u64, id: u32) -> Result<(), DatapathError> {
        let mut cgroups: HashMap<&mut MapData, u64, u32> =
            typed_mut(&mut self.ebpf, maps::CGROUP_IDENTITY)?;
        cgroups
            .insert(&cgroup, &id, 0)
            .map_err(map_err(maps::CGROUP_IDENTITY))?;
        self.cgroups.insert(cgroup, id);
        Ok(())
    }

    /// The descriptor of a loaded program (`programs::*`), e.g. to run it
    /// on crafted packets with [`super::bpfsys::prog_test_run`].
    pub fn loaded_program(&self, name: &str) -> Option<std::os::fd::BorrowedFd<'_>> {
        use std::os::fd::AsFd as _;
        Some(self.ebpf.program(name)?.fd().ok()?.as_fd())
    }

    /// Makes `slot` hold exactly `desired`'s table. The slot still holds the
    /// table it had before the last swap, so only the difference is written:
    /// a one-rule change costs a few map writes, not a rewrite of the table.
    /// `slots[slot]` follows every successful write, so a failure midway
    /// leaves it exact (and `clear_slot` can drop the partial table).
    fn write_slot(&mut self, slot: u8, desired: &Desired) -> Result<(), DatapathError> {
        let contents = &mut self.slots[usize::from(slot)];
        let mut policy = policy_map(&mut self.ebpf)?;
        let stale: Vec<EntryKey> = contents
            .entries
            .keys()
            .filter(|k| !desired.policy.entries.contains_key(k))
            .copied()
            .collect();
        for key in stale {
            policy
                .remove(&encode_policy_key(key, slot))
                .map_err(map_err(maps::POLICY))?;
            contents.entries.remove(&key);
        }
        for (key, value) in &desired.policy.entries {
            if contents.entries.get(key) == Some(value) {
                continue;
            }
            policy
                .insert(&encode_policy_key(*key, slot), value, 0)
                .map_err(map_err(maps::POLICY))?;
            contents.entries.insert(*key, *value);
        }
        let mut enforced = enforced_map(&mut self.ebpf)?;
        let enforced_key = |(direction, identity): (u8, u32)| EnforcedKey {
            slot,
            direction,
            _pad: [0; 2],
            identity,
        };
        let stale: Vec<(u8, u32)> = contents
            .enforced
            .keys()
            .filter(|k| !desired.policy.enforced.contains_key(k))
            .copied()
            .collect();
        for k in stale {
            enforced
                .remove(&enforced_key(k))
                .map_err(map_err(maps::ENFORCED))?;
            contents.enforced.remove(&k);
        }
        for (&k, value) in &desired.policy.enforced {
            if contents.enforced.get(&k) == Some(value) {
                continue;
            }
            enforced
                .insert(&enforced_key(k), value, 0)
                .map_err(map_err(maps::ENFORCED))?;
            contents.enforced.insert(k, *value);
        }
        Ok(())
    }

    fn clear_slot(&mut self, slot: u8) -> Result<(), DatapathError> {
        let contents = std::mem::take(&mut self.slots[usize::from(slot)]);
        let mut policy = policy_map(&mut self.ebpf)?;
        for key in contents.entries.keys() {
            policy
                .remove(&encode_policy_key(*key, slot))
                .map_err(map_err(maps::POLICY))?;
        }
        let mut enforced = enforced_map(&mut self.ebpf)?;
        for &(direction, identity) in contents.enforced.keys() {
            let key = EnforcedKey {
                slot,
                direction,
                _pad: [0; 2],
                identity,
            };
            enforced.remove(&key).map_err(map_err(maps::ENFORCED))?;
        }
        Ok(())
    }

    fn set_state(&mut self, index: u32, value: u32) -> Result<(), DatapathError> {
        let mut st: Array<&mut MapData, u32> = typed_mut(&mut self.ebpf, maps::STATE)?;
        st.set(index, &value, 0).map_err(map_err(maps::STATE))
    }

    fn check_capacity(&self, desired: &Desired) -> Result<(), DatapathError> {
        let active = &self.slots[usize::from(self.active_slot)];
        // Both slots share one map: the live table stays while the new one is written.
        let policy = active.entries.len();
        let enforced = active.enforced.len();
        let checks = [
            (
                maps::POLICY,
                "policy",
                policy,
                policy + desired.policy.entries.len(),
                self.capacities.policy,
            ),
            (
                maps::ENFORCED,
                "enforced",
                enforced,
                enforced + desired.policy.enforced.len(),
                self.capacities.enforced,
            ),
            (
                maps::CGROUP_IDENTITY,
                "cgroups",
                self.cgroups.len(),
                self.cgroups.len().max(desired.cgroups.len()),
                self.capacities.cgroups,
            ),
            (
                maps::IPCACHE,
                "ipcache",
                self.ipcache.len(),
                desired.ipcache.len(),
                self.capacities.ipcache,
            ),
            (
                maps::SELF_ADDRESSES,
                "ipcache",
                self.own_addresses.len(),
                desired.own_addresses.len(),
                self.capacities.ipcache,
            ),
            (
                maps::SERVICES,
                "services",
                self.services.len(),
                self.services.len().max(desired.services.frontends.len()),
                self.capacities.services,
            ),
        ];
        for (map, config_key, in_use, needed, capacity) in checks {
            if needed > capacity as usize {
                return Err(DatapathError::MapFull {
                    map,
                    config_key,
                    needed,
                    in_use,
                    capacity,
                });
            }
        }
        Ok(())
    }

    /// Fill of each map.
    pub fn map_fill(&self) -> Vec<super::MapFill> {
        let active = &self.slots[usize::from(self.active_slot)];
        [
            (
                maps::CGROUP_IDENTITY,
                self.cgroups.len(),
                self.capacities.cgroups,
            ),
            (maps::IPCACHE, self.ipcache.len(), self.capacities.ipcache),
            (maps::POLICY, active.entries.len(), self.capacities.policy),
            (
                maps::ENFORCED,
                active.enforced.len(),
                self.capacities.enforced,
            ),
            (
                maps::SERVICES,
                self.services.len(),
                self.capacities.services,
            ),
        ]
        .into_iter()
        .map(|(map, entries, capacity)| super::MapFill {
            map: map.to_owned(),
            entries,
            capacity,
        })
        .collect()
    }
}

fn policy_map(
    ebpf: &mut Ebpf,
) -> Result<LpmTrie<&mut MapData, PolicyKeyData, PolicyValue>, DatapathError> {
    typed_mut(ebpf, maps::POLICY)
}

fn enforced_map(
    ebpf: &mut Ebpf,
) -> Result<HashMap<&mut MapData, EnforcedKey, EnforcedValue>, DatapathError> {
    typed_mut(ebpf, maps::ENFORCED)
}

impl KernelDatapath {
    /// Phase 1: the new policy table into the inactive slot, then the flip.
    /// An error here leaves the table in force as it was (refused).
    fn apply_policy(
        &mut self,
        desired: &Desired,
        report: &mut ApplyReport,
    ) -> Result<bool, DatapathError> {
        self.check_capacity(desired)?;
        // The planner hands out the same table (`Arc`) while nothing in it
        // changed: no comparison of every entry then.
        let same = self
            .written_policy
            .as_ref()
            .is_some_and(|p| std::sync::Arc::ptr_eq(p, &desired.policy));
        let active = &self.slots[usize::from(self.active_slot)];
        if !same
            && (active.entries != desired.policy.entries
                || active.enforced != desired.policy.enforced
                || self.generation == 1)
        {
            let next = 1 - self.active_slot;
            // The inactive slot keeps the previous table so the next change
            // is written as a difference; when the three tables (live,
            // retained, new) might not fit, the retained one goes first.
            let (live, retained) = (
                &self.slots[usize::from(self.active_slot)],
                &self.slots[usize::from(next)],
            );
            if live.entries.len() + retained.entries.len() + desired.policy.entries.len()
                > self.capacities.policy as usize
                || live.enforced.len() + retained.enforced.len() + desired.policy.enforced.len()
                    > self.capacities.enforced as usize
            {
                self.clear_slot(next)?;
            }
            if let Err(e) = self.write_slot(next, desired) {
                // Nothing in force changed; drop the partial table.
                let _ = self.clear_slot(next);
                return Err(e);
            }
            self.set_state(state::ACTIVE_SLOT, u32::from(next))?;
            self.active_slot = next;
            self.generation = self.generation.wrapping_add(1).max(2);
            self.set_state(state::GENERATION, self.generation)?;
            // The old slot is kept as it is: the next change is written into
            // it as a difference. The programs read only the active slot.
            report.policy_swapped = true;
            report.policy_entries = desired.policy.entries.len();
        }
        self.written_policy = Some(desired.policy.clone());

        Ok(report.policy_swapped)
    }

    /// Phase 2: options, own addresses, ipcache, Services and cgroups —
    /// single writes against the live table. An error here leaves the
    /// kernel behind the desired state (partial: the agent applies it again;
    /// each map's mirror follows every successful write, so the retry
    /// writes only what is missing).
    fn apply_entries(
        &mut self,
        desired: &Desired,
        report: &mut ApplyReport,
    ) -> Result<(), DatapathError> {
        // Options with the entries: they hold for the live table.
        let options = if desired.host_always_allowed {
            options::HOST_ALWAYS_ALLOWED
        } else {
            0
        };
        if options != self.options {
            self.set_state(state::OPTIONS, options)?;
            self.options = options;
        }
        {
            let mut own: HashMap<&mut MapData, SelfKey, u8> =
                typed_mut(&mut self.ebpf, maps::SELF_ADDRESSES)?;
            let key = |(cgroup_id, ip): &(u64, IpAddr)| SelfKey {
                cgroup_id: *cgroup_id,
                addr: addr16(*ip),
            };
            // The mirror follows each write that succeeded, no further.
            let new: Vec<(u64, IpAddr)> = desired
                .own_addresses
                .difference(&self.own_addresses)
                .copied()
                .collect();
            for entry in new {
                own.insert(&key(&entry), &1, 0)
                    .map_err(map_err(maps::SELF_ADDRESSES))?;
                self.own_addresses.insert(entry);
            }
            let stale: Vec<(u64, IpAddr)> = self
                .own_addresses
                .difference(&desired.own_addresses)
                .copied()
                .collect();
            for entry in stale {
                removed(own.remove(&key(&entry)), maps::SELF_ADDRESSES)?;
                self.own_addresses.remove(&entry);
            }
        }
        let (ip_up, ip_del) =
            super::ipcache_diff(&self.ipcache, self.ipcache_written, &desired.ipcache);
        let (cg_up, cg_del) = diff(&self.cgroups, &desired.cgroups);
        report.ipcache_updates = ip_up.len() + ip_del.len();
        report.cgroup_updates = cg_up.len() + cg_del.len();
        {
            let mut ipcache: LpmTrie<&mut MapData, [u8; 16], IpcacheValue> =
                typed_mut(&mut self.ebpf, maps::IPCACHE)?;
            for (net, id) in &ip_up {
                ipcache
                    .insert(&ip_key(net), id, 0)
                    .map_err(map_err(maps::IPCACHE))?;
                self.ipcache.insert(*net, *id);
            }
        }
        {
            // Services after the ipcache's new entries (their backends'
            // identities are live) and before its stale ones go.
            let mut services: HashMap<&mut MapData, ServiceKey, ServiceValue> =
                typed_mut(&mut self.ebpf, maps::SERVICES)?;
            for (frontend, backends) in &desired.services.frontends {
                if self.services.get(frontend) == Some(backends) {
                    continue;
                }
                services
                    .insert(&service_key(frontend), &service_value(backends), 0)
                    .map_err(map_err(maps::SERVICES))?;
                self.services.insert(*frontend, backends.clone());
                report.service_updates += 1;
            }
            let stale: Vec<ServiceFrontend> = self
                .services
                .keys()
                .filter(|f| !desired.services.frontends.contains_key(f))
                .copied()
                .collect();
            for frontend in stale {
                removed(services.remove(&service_key(&frontend)), maps::SERVICES)?;
                self.services.remove(&frontend);
                report.service_updates += 1;
            }
        }
        {
            let mut cgroups: HashMap<&mut MapData, u64, u32> =
                typed_mut(&mut self.ebpf, maps::CGROUP_IDENTITY)?;
            for (cg, id) in &cg_up {
                cgroups
                    .insert(cg, id, 0)
                    .map_err(map_err(maps::CGROUP_IDENTITY))?;
                self.cgroups.insert(*cg, *id);
            }
            for cg in &cg_del {
                removed(cgroups.remove(cg), maps::CGROUP_IDENTITY)?;
                self.cgroups.remove(cg);
            }
        }
        {
            let mut ipcache: LpmTrie<&mut MapData, [u8; 16], IpcacheValue> =
                typed_mut(&mut self.ebpf, maps::IPCACHE)?;
            for net in &ip_del {
                removed(ipcache.remove(&ip_key(net)), maps::IPCACHE)?;
                self.ipcache.remove(net);
            }
        }
        self.ipcache_written = desired.ipcache.stamp();
        Ok(())
    }
}

impl Datapath for KernelDatapath {
    type Events = AuditRing;

    fn apply(&mut self, desired: &Desired) -> Result<ApplyReport, ApplyError> {
        let mut report = ApplyReport::default();
        self.apply_policy(desired, &mut report)
            .map_err(ApplyError::refused)?;
        self.apply_entries(desired, &mut report)
            .map_err(ApplyError::partial)?;
        Ok(report)
    }

    fn counters(&self) -> Result<Counters, DatapathError> {
        let arr: PerCpuArray<&MapData, u64> = typed(&self.ebpf, maps::COUNTERS)?;
        let sum = |i: u32| -> Result<u64, DatapathError> {
            Ok(arr
                .get(&i, 0)
                .map_err(map_err(maps::COUNTERS))?
                .iter()
                .sum())
        };
        Ok(Counters {
            egress_allow: sum(counter::EGRESS_ALLOW)?,
            egress_deny: sum(counter::EGRESS_DENY)?,
            ingress_allow: sum(counter::INGRESS_ALLOW)?,
            ingress_deny: sum(counter::INGRESS_DENY)?,
            egress_would_deny: sum(counter::EGRESS_WOULD_DENY)?,
            ingress_would_deny: sum(counter::INGRESS_WOULD_DENY)?,
            events_emitted: sum(counter::EVENTS_EMITTED)?,
            events_lost: sum(counter::EVENTS_LOST)?,
            flow_insert_failed: sum(counter::FLOW_INSERT_FAILED)?,
            unparseable: sum(counter::UNPARSEABLE)?,
            forged_source: sum(counter::FORGED_SOURCE)?,
            source_routed: sum(counter::SOURCE_ROUTED)?,
            packet_sockets_refused: sum(counter::PACKET_SOCKETS_REFUSED)?,
        })
    }

    fn fill(&self) -> Vec<super::MapFill> {
        self.map_fill()
    }

    fn verify(&mut self) -> Health {
        self.verify_state()
    }

    fn repairs(&self) -> BTreeMap<String, u64> {
        self.repair_counts()
            .iter()
            .map(|(k, v)| ((*k).to_owned(), *v))
            .collect()
    }

    /// What the agent adopted from the pin directory at start, and what it replaced.
    fn adoption(&self) -> &super::Adoption {
        &self.adoption
    }

    /// What the kernel maps held when the agent started (empty unless adopted).
    fn adopted_identities(&self) -> (BTreeMap<u64, u32>, BTreeMap<IpNet, u32>) {
        let ipcache = self.ipcache.iter().map(|(n, v)| (*n, v.identity)).collect();
        (self.cgroups.clone(), ipcache)
    }

    /// Policy entries in the active table (adopted or written).
    fn active_entries(&self) -> usize {
        self.slots[usize::from(self.active_slot)].entries.len()
    }

    fn attach_points(&self) -> &[String] {
        &self.attach_points
    }

    fn posture(&self) -> &Posture {
        &self.posture
    }

    /// Hands the audit ring buffer to its reader.
    fn take_events(&mut self) -> Result<AuditRing, DatapathError> {
        let map = self
            .ebpf
            .take_map(maps::AUDIT)
            .ok_or(DatapathError::MissingMap(maps::AUDIT))?;
        let ring = RingBuf::try_from(map).map_err(map_err(maps::AUDIT))?;
        AuditRing::new(ring).map_err(|source| DatapathError::Io {
            what: "watching the audit ring",
            path: maps::AUDIT.into(),
            source,
        })
    }
}

/// The kernel's audit ring buffer, registered with the runtime: wait for
/// the kernel's wakeup, then drain the records decoded.
pub struct AuditRing {
    fd: tokio::io::unix::AsyncFd<RingBuf<aya::maps::MapData>>,
}

impl super::EventSource for AuditRing {
    fn drain(&mut self) -> Vec<Option<palisade_common::AuditEvent>> {
        let ring = self.fd.get_mut();
        let mut out = Vec::new();
        while let Some(item) = ring.next() {
            out.push(super::decode_audit_event(&item));
        }
        out
    }

    async fn wait(&mut self) -> std::io::Result<()> {
        self.fd.readable_mut().await?.clear_ready();
        Ok(())
    }
}

impl AuditRing {
    fn new(ring: RingBuf<aya::maps::MapData>) -> std::io::Result<AuditRing> {
        // SAFETY: the AsyncFd owns the ring buffer, so the fd stays open for
        // as long as it is registered.
        let fd = unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE)
        }?;
        Ok(AuditRing { fd })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_policy_entry_survives_encoding_into_the_map_key_and_back() {
        let entry = EntryKey {
            direction: palisade_common::DIR_INGRESS,
            protocol: palisade_common::PROTO_UDP,
            local: 70_001,
            peer: 9,
            port: 5300,
            port_bits: 14,
        };
        let key = encode_policy_key(entry, 1);
        assert_eq!(
            key.prefix_len(),
            palisade_common::POLICY_PREFIX_ANY_PORT + 14
        );
        assert_eq!(key.data().port_be, 5300u16.to_be_bytes(), "network order");
        assert_eq!(decode_policy_key(&key), (1, entry));
        assert_eq!(decode_policy_key(&encode_policy_key(entry, 0)).0, 0);
    }

    #[test]
    fn kernels_older_than_5_8_are_refused_naming_what_they_lack() {
        for old in ["4.19.0-27-amd64", "5.4.0-150-generic", "5.7.19"] {
            let why = too_old(old).expect(old);
            assert!(why.contains("5.8") && why.contains("ring buffer"), "{why}");
        }
        for ok in [
            "5.8.0",
            "5.15.0-91-generic",
            "6.1.0-57-amd64",
            "6.12.117+deb12-amd64",
            "6.18.44",
        ] {
            assert_eq!(too_old(ok), None, "{ok}");
        }
    }

    #[test]
    fn every_map_and_program_the_agent_names_is_in_the_embedded_object() {
        let obj = aya_obj::Object::parse(EBPF_OBJECT).expect("the embedded object parses");
        for name in guard::PINNED_MAPS {
            assert!(obj.maps.contains_key(name), "map {name} is in the object");
        }
        for name in guard::ENFORCING
            .map(|(name, _)| name)
            .into_iter()
            .chain([programs::SOCKET_CREATE])
        {
            assert!(
                obj.programs.contains_key(name),
                "program {name} is in the object"
            );
        }
    }
}
