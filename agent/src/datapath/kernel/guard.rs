//! Guarding the kernel state: the agent keeps a descriptor of every link it
//! enforces through, verifies what it adopts from a pin directory (each
//! link's cgroup, each program's maps against the pinned ones), and checks
//! periodically that the programs are attached where they should be, the
//! pins name the objects in use and the active table is the one it wrote —
//! repairing what it can and reporting what it cannot.
use std::{
    collections::BTreeMap,
    fs::File,
    os::fd::{AsFd as _, OwnedFd},
};

use aya::{
    maps::{HashMap, LpmTrie, MapData, MapInfo},
    programs::{CgroupSkb, CgroupSockAddr, Program},
};
use palisade_common::{
    EnforcedKey, EnforcedValue, IpcacheValue, SelfKey, ServiceKey, ServiceValue, maps, programs,
    state,
};

use super::{
    KernelDatapath, addr16, ip_key, map_err, net_of, removed, service_key, service_value, typed,
    typed_mut,
};
use crate::datapath::{DatapathError, Health, bpfsys};

/// The programs that enforce, with their `bpf_attach_type`. They attach
/// through BPF links (kernel ≥ 5.7), which always coexist with other programs
/// on the same cgroup (multi-attach without `BPF_F_ALLOW_MULTI`).
pub(super) const ENFORCING: [(&str, u32); 6] = [
    (programs::CONNECT4, 10),     // BPF_CGROUP_INET4_CONNECT
    (programs::CONNECT6, 11),     // BPF_CGROUP_INET6_CONNECT
    (programs::SENDMSG4, 14),     // BPF_CGROUP_UDP4_SENDMSG
    (programs::SENDMSG6, 15),     // BPF_CGROUP_UDP6_SENDMSG
    (programs::INGRESS, 0),       // BPF_CGROUP_INET_INGRESS
    (programs::EGRESS_PACKET, 1), // BPF_CGROUP_INET_EGRESS
];

/// `bpf_attach_type` of the packet-socket guard (`lsm_cgroup/socket_create`,
/// kernel ≥ 6.0 with the BPF LSM active).
pub(super) const BPF_LSM_CGROUP: u32 = 43;

/// The maps that are pinned (and so can be swapped under a running agent).
pub(super) const PINNED_MAPS: [&str; 10] = [
    maps::CGROUP_IDENTITY,
    maps::IPCACHE,
    maps::POLICY,
    maps::ENFORCED,
    maps::FLOWS,
    maps::SELF_ADDRESSES,
    maps::SERVICES,
    maps::STATE,
    maps::COUNTERS,
    maps::AUDIT,
];

/// One link the agent enforces through; the descriptor keeps it alive even
/// when its pin is removed.
pub(super) struct HeldLink {
    pub name: &'static str,
    pub attach_type: u32,
    pub fd: OwnedFd,
    pub id: u32,
}

/// Self-checks between two full comparisons of the policy table.
const POLICY_TABLE_EVERY: u64 = 15;

/// Self-checks between two full comparisons of the identity maps (cgroups,
/// ipcache, own addresses, Services, options) once they are large: at
/// 50,000 pods the ipcache alone is 100,000 entries to read. Below
/// `SMALL_MAPS` entries they are compared at every check.
const IDENTITY_MAPS_EVERY: u64 = 30;
const SMALL_MAPS: usize = 4096;

/// Brings the hash map `map` to `want`; returns how many entries differed.
fn reconcile_hash<K, V>(
    map: &mut HashMap<&mut MapData, K, V>,
    want: &BTreeMap<K, V>,
    name: &'static str,
) -> Result<usize, DatapathError>
where
    K: aya::Pod + Ord,
    V: aya::Pod + PartialEq,
{
    let mut found = BTreeMap::new();
    for item in map.iter() {
        let (k, v) = item.map_err(map_err(name))?;
        found.insert(k, v);
    }
    let mut differed = 0;
    for (k, v) in want {
        if found.get(k) != Some(v) {
            map.insert(k, v, 0).map_err(map_err(name))?;
            differed += 1;
        }
    }
    for k in found.keys().filter(|k| !want.contains_key(k)) {
        removed(map.remove(k), name)?;
        differed += 1;
    }
    Ok(differed)
}

fn io_err(what: &'static str, path: String) -> impl FnOnce(std::io::Error) -> DatapathError {
    move |source| DatapathError::Io { what, path, source }
}

/// The cgroup id of a cgroup2 directory (its inode number).
pub(super) fn cgroup_id(path: &std::path::Path) -> std::io::Result<u64> {
    std::fs::metadata(path).map(|m| std::os::unix::fs::MetadataExt::ino(&m))
}

/// Map names as the kernel keeps them (15 bytes).
fn kernel_name(name: &str) -> &str {
    &name[..name.len().min(15)]
}

impl KernelDatapath {
    pub(super) fn count_repair(&mut self, what: &'static str) {
        *self.repairs.entry(what).or_default() += 1;
    }

    /// Repairs done since start, by kind.
    pub fn repair_counts(&self) -> &BTreeMap<&'static str, u64> {
        &self.repairs
    }

    /// The ids of the pinned maps this agent uses.
    pub(super) fn record_map_ids(&mut self) {
        let Some(pins) = &self.pins else { return };
        self.map_ids = PINNED_MAPS
            .iter()
            .filter_map(|n| Some((*n, MapInfo::from_pin(pins.map(n)).ok()?.id())))
            .collect();
    }

    /// Why the program of an adopted link must not be kept: it reads maps
    /// other than the pinned ones (a pin was replaced while no agent ran).
    fn foreign_maps(&self, prog_id: u32) -> Option<String> {
        let ids = match bpfsys::program_map_ids(prog_id) {
            Ok(ids) => ids,
            Err(e) => return Some(format!("its program {prog_id} cannot be read ({e})")),
        };
        for id in ids {
            let Ok(info) = MapInfo::from_id(id) else {
                continue;
            };
            let Some(name) = info.name_as_str() else {
                continue;
            };
            for (ours, our_id) in &self.map_ids {
                if kernel_name(ours) == name && *our_id != id {
                    return Some(format!(
                        "its program reads another {ours} (map id {id}) than the pinned one (map id {our_id})"
                    ));
                }
            }
        }
        None
    }

    /// The pinned link of `name`, if it is attached to this root and its
    /// program reads the pinned maps; else `None` (and why, logged).
    pub(super) fn adopt_link(&mut self, name: &'static str, attach_type: u32) -> Option<HeldLink> {
        let path = self.pins.as_ref()?.link(name);
        if !path.exists() {
            return None;
        }
        let why = match bpfsys::obj_get(&path) {
            Err(e) => format!("it cannot be opened ({e})"),
            Ok(fd) => match bpfsys::link_info(fd.as_fd()) {
                Err(e) => format!("it cannot be read ({e})"),
                Ok(info) if info.cgroup_id != self.root_ino => format!(
                    "it is attached to cgroup id {} (0: detached or its cgroup is gone), not to the root {} (id {})",
                    info.cgroup_id,
                    self.root.display(),
                    self.root_ino
                ),
                Ok(info) => match self.foreign_maps(info.prog_id) {
                    Some(why) => why,
                    None => {
                        return Some(HeldLink {
                            name,
                            attach_type,
                            fd,
                            id: info.id,
                        });
                    }
                },
            },
        };
        tracing::warn!(link = %path.display(), "replacing the pinned link of {name}: {why}");
        self.count_repair("adoption");
        self.adoption.replaced.push(crate::datapath::Replaced {
            what: format!("link:{name}"),
            why,
        });
        None
    }

    fn program_fd(&mut self, name: &'static str) -> Result<OwnedFd, DatapathError> {
        let prog_err = |source: aya::programs::ProgramError| DatapathError::Program {
            name,
            source: Box::new(source),
        };
        let program = self
            .ebpf
            .program_mut(name)
            .ok_or_else(|| prog_err(aya::programs::ProgramError::NotLoaded))?;
        let fd = match program {
            Program::CgroupSockAddr(p) => {
                let p: &mut CgroupSockAddr = p;
                if p.fd().is_err() {
                    p.load().map_err(prog_err)?;
                }
                p.fd().map_err(prog_err)?.as_fd().try_clone_to_owned()
            }
            Program::CgroupSkb(p) => {
                let p: &mut CgroupSkb = p;
                if p.fd().is_err() {
                    p.load().map_err(prog_err)?;
                }
                p.fd().map_err(prog_err)?.as_fd().try_clone_to_owned()
            }
            Program::LsmCgroup(p) => {
                let p: &mut aya::programs::LsmCgroup = p;
                if p.fd().is_err() {
                    let btf = aya::Btf::from_sys_fs()
                        .map_err(|e| prog_err(aya::programs::ProgramError::Btf(e)))?;
                    p.load("socket_create", &btf).map_err(prog_err)?;
                }
                p.fd().map_err(prog_err)?.as_fd().try_clone_to_owned()
            }
            _ => return Err(prog_err(aya::programs::ProgramError::NotLoaded)),
        };
        fd.map_err(io_err("duplicating the descriptor of", name.into()))
    }

    /// A new link of `name` on the root, pinned in place of any old pin.
    pub(super) fn attach_fresh(
        &mut self,
        name: &'static str,
        attach_type: u32,
    ) -> Result<HeldLink, DatapathError> {
        let prog = self.program_fd(name)?;
        let fd = bpfsys::link_create(prog.as_fd(), self.root_fd.as_fd(), attach_type).map_err(
            io_err("attaching", format!("{name} to {}", self.root.display())),
        )?;
        if let Some(pins) = &self.pins {
            let path = pins.link(name);
            let _ = std::fs::remove_file(&path);
            bpfsys::obj_pin(fd.as_fd(), &path)
                .map_err(io_err("pinning the link at", path.display().to_string()))?;
        }
        let id = bpfsys::link_info(fd.as_fd())
            .map_err(io_err("reading the new link of", name.into()))?
            .id;
        Ok(HeldLink {
            name,
            attach_type,
            fd,
            id,
        })
    }

    /// Compares the kernel with what the agent holds and wrote; repairs
    /// what it can.
    pub fn verify_state(&mut self) -> Health {
        let mut health = Health::default();
        self.checks += 1;
        match cgroup_id(&self.root) {
            Err(e) => {
                health.problems.push(format!(
                    "the cgroup root {} is gone ({e}): nothing is enforced until it exists again",
                    self.root.display()
                ));
                return health;
            }
            Ok(ino) if ino != self.root_ino => {
                if let Err(e) = self.reopen_root(ino) {
                    health.problems.push(e.to_string());
                    return health;
                }
                health.repaired.push(format!(
                    "the cgroup root {} was recreated: attaching to the new one",
                    self.root.display()
                ));
            }
            Ok(_) => {}
        }
        self.verify_links(&mut health);
        self.verify_map_pins(&mut health);
        if let Err(e) = self.verify_tables(&mut health) {
            health
                .problems
                .push(format!("reading the active table: {e}"));
        }
        let size = self.ipcache.len() + self.cgroups.len() + self.services.len();
        if self.generation > 1
            && (size < SMALL_MAPS || self.checks.is_multiple_of(IDENTITY_MAPS_EVERY))
        {
            self.verify_identity_maps(&mut health);
        }
        health
    }

    /// The maps the programs look identities, own addresses, Services and
    /// options up in, against what the agent wrote; rewritten where they
    /// differ (a map written outside the agent, or an entry lost).
    pub(super) fn verify_identity_maps(&mut self, health: &mut Health) {
        let results = [
            ("cgroup identity", self.reconcile_cgroups()),
            ("ipcache", self.reconcile_ipcache()),
            ("own address", self.reconcile_own_addresses()),
            ("Service", self.reconcile_services()),
            ("options", self.reconcile_options()),
        ];
        for (what, result) in results {
            match result {
                Ok(0) => {}
                Ok(n) => {
                    health.repaired.push(format!(
                        "the {what} map was changed outside the agent ({n} entries differed): rewritten"
                    ));
                    self.count_repair("identity-maps");
                }
                Err(e) => health
                    .problems
                    .push(format!("checking the {what} map: {e}")),
            }
        }
    }

    fn reconcile_cgroups(&mut self) -> Result<usize, DatapathError> {
        let mut map: HashMap<&mut MapData, u64, u32> =
            typed_mut(&mut self.ebpf, maps::CGROUP_IDENTITY)?;
        reconcile_hash(&mut map, &self.cgroups, maps::CGROUP_IDENTITY)
    }

    fn reconcile_own_addresses(&mut self) -> Result<usize, DatapathError> {
        let want: BTreeMap<SelfKey, u8> = self
            .own_addresses
            .iter()
            .map(|(cgroup_id, ip)| {
                let key = SelfKey {
                    cgroup_id: *cgroup_id,
                    addr: addr16(*ip),
                };
                (key, 1)
            })
            .collect();
        let mut map: HashMap<&mut MapData, SelfKey, u8> =
            typed_mut(&mut self.ebpf, maps::SELF_ADDRESSES)?;
        reconcile_hash(&mut map, &want, maps::SELF_ADDRESSES)
    }

    fn reconcile_services(&mut self) -> Result<usize, DatapathError> {
        let want: BTreeMap<ServiceKey, ServiceValue> = self
            .services
            .iter()
            .map(|(f, b)| (service_key(f), service_value(b)))
            .collect();
        let mut map: HashMap<&mut MapData, ServiceKey, ServiceValue> =
            typed_mut(&mut self.ebpf, maps::SERVICES)?;
        reconcile_hash(&mut map, &want, maps::SERVICES)
    }

    fn reconcile_ipcache(&mut self) -> Result<usize, DatapathError> {
        let mut map: LpmTrie<&mut MapData, [u8; 16], IpcacheValue> =
            typed_mut(&mut self.ebpf, maps::IPCACHE)?;
        let mut found = Vec::new();
        for item in map.iter() {
            found.push(item.map_err(map_err(maps::IPCACHE))?);
        }
        let mut differed = 0;
        let mut right = std::collections::BTreeSet::new();
        for (key, id) in found {
            match net_of(key.prefix_len(), key.data()) {
                Some(net) if self.ipcache.get(&net) == Some(&id) => {
                    right.insert(net);
                }
                // A wrong identity is overwritten below.
                Some(net) if self.ipcache.contains_key(&net) => {}
                _ => {
                    removed(map.remove(&key), maps::IPCACHE)?;
                    differed += 1;
                }
            }
        }
        for (net, id) in &self.ipcache {
            if !right.contains(net) {
                map.insert(&ip_key(net), id, 0)
                    .map_err(map_err(maps::IPCACHE))?;
                differed += 1;
            }
        }
        Ok(differed)
    }

    fn reconcile_options(&mut self) -> Result<usize, DatapathError> {
        let st: aya::maps::Array<&MapData, u32> = typed(&self.ebpf, maps::STATE)?;
        let options = st.get(&state::OPTIONS, 0).map_err(map_err(maps::STATE))?;
        if options == self.options {
            return Ok(0);
        }
        self.set_state(state::OPTIONS, self.options)?;
        Ok(1)
    }

    /// Takes the recreated root as the root; `verify_links` then finds
    /// every link attached elsewhere and attaches it here (one by one, so a
    /// failure leaves the rest to the next check).
    fn reopen_root(&mut self, ino: u64) -> Result<(), DatapathError> {
        self.root_fd = File::open(&self.root).map_err(io_err(
            "opening cgroup root",
            self.root.display().to_string(),
        ))?;
        self.root_ino = ino;
        Ok(())
    }

    fn verify_links(&mut self, health: &mut Health) {
        for i in 0..self.links.len() {
            let (name, attach_type) = (self.links[i].name, self.links[i].attach_type);
            let attached = bpfsys::link_info(self.links[i].fd.as_fd())
                .is_ok_and(|info| info.cgroup_id == self.root_ino);
            if !attached {
                match self.attach_fresh(name, attach_type) {
                    Ok(fresh) => {
                        self.links[i] = fresh;
                        health
                            .repaired
                            .push(format!("{name} was detached from the root: attached again"));
                        self.count_repair("attachment");
                    }
                    Err(e) => health
                        .problems
                        .push(format!("{name} is not attached and attaching failed: {e}")),
                }
                continue;
            }
            let Some(path) = self.pins.as_ref().map(|p| p.link(name)) else {
                continue;
            };
            let pinned = bpfsys::obj_get(&path)
                .and_then(|fd| bpfsys::link_info(fd.as_fd()))
                .map(|i| i.id);
            if pinned.as_ref().ok() == Some(&self.links[i].id) {
                continue;
            }
            let _ = std::fs::remove_file(&path);
            match bpfsys::obj_pin(self.links[i].fd.as_fd(), &path) {
                Ok(()) => {
                    health.repaired.push(format!(
                        "the pin {} was missing or named another link: pinned again",
                        path.display()
                    ));
                    self.count_repair("link-pin");
                }
                Err(e) => health.problems.push(format!(
                    "{name}: pinning its link at {} failed ({e}); a restarted agent would not find it",
                    path.display()
                )),
            }
        }
    }

    fn verify_map_pins(&mut self, health: &mut Health) {
        let Some(pins) = self.pins.clone() else {
            return;
        };
        if !pins.layout().exists() {
            let _ = std::fs::create_dir(pins.layout());
        }
        for (name, id) in self.map_ids.clone() {
            let path = pins.map(name);
            if MapInfo::from_pin(&path).is_ok_and(|i| i.id() == id) {
                continue;
            }
            let _ = std::fs::remove_file(&path);
            match MapData::from_id(id).map(|m| m.pin(&path)) {
                Ok(Ok(())) => {
                    health.repaired.push(format!(
                        "the pin {} was missing or named another map: pinned the map in use again",
                        path.display()
                    ));
                    self.count_repair("map-pin");
                }
                Ok(Err(e)) => health
                    .problems
                    .push(format!("pinning {name} at {}: {e}", path.display())),
                Err(e) => health.problems.push(format!("reopening {name}: {e}")),
            }
        }
    }

    /// The active slot, the generation and the active table's enforced
    /// set every time; the policy entries every `POLICY_TABLE_EVERY` checks.
    fn verify_tables(&mut self, health: &mut Health) -> Result<(), DatapathError> {
        if self.generation == 1 {
            return Ok(()); // nothing applied yet
        }
        let st: aya::maps::Array<&MapData, u32> = typed(&self.ebpf, maps::STATE)?;
        let slot = st
            .get(&state::ACTIVE_SLOT, 0)
            .map_err(map_err(maps::STATE))?;
        let generation = st
            .get(&state::GENERATION, 0)
            .map_err(map_err(maps::STATE))?;
        if slot != u32::from(self.active_slot) || generation != self.generation {
            self.set_state(state::ACTIVE_SLOT, u32::from(self.active_slot))?;
            self.set_state(state::GENERATION, self.generation)?;
            health.repaired.push(format!(
                "the active table was switched outside the agent (slot {slot}, generation {generation}; the agent wrote slot {}, generation {}): switched back",
                self.active_slot, self.generation
            ));
            self.count_repair("state");
        }
        let active = self.active_slot;
        let enforced: HashMap<&MapData, EnforcedKey, EnforcedValue> =
            typed(&self.ebpf, maps::ENFORCED)?;
        let mut found = BTreeMap::new();
        for item in enforced.iter() {
            let (k, v) = item.map_err(map_err(maps::ENFORCED))?;
            if k.slot == active {
                found.insert((k.direction, k.identity), v);
            }
        }
        let policy_due = self.checks.is_multiple_of(POLICY_TABLE_EVERY);
        let policy_differs = policy_due && self.policy_slot_differs(active)?;
        if found != self.slots[usize::from(active)].enforced || policy_differs {
            self.rewrite_active()?;
            health.repaired.push(
                "the active policy table was changed outside the agent: rewritten".to_owned(),
            );
            self.count_repair("table");
        }
        Ok(())
    }

    fn policy_slot_differs(&self, slot: u8) -> Result<bool, DatapathError> {
        let kernel = self.read_policy_slot(slot)?;
        Ok(kernel != self.slots[usize::from(slot)].entries)
    }
}
