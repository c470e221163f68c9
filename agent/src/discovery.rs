//! Finding workloads on a plain host: the cgroup2 mount, the cgroups below the
//! configured root, the rules that name and label them, and the addresses of
//! their network namespaces. Reads /proc and the cgroup tree; writes nothing.
use std::{
    collections::BTreeMap,
    net::IpAddr,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

use crate::{config::WorkloadRule, inventory::PathPattern};

#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    #[error(
        "no cgroup2 filesystem is mounted (looked in /proc/self/mountinfo); mount one with `mount -t cgroup2 none /sys/fs/cgroup`"
    )]
    NoCgroup2,
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cgroup root {0} is not inside the cgroup2 mount {1}")]
    OutsideMount(PathBuf, PathBuf),
}

/// The cgroup2 mount point (pure v2 at /sys/fs/cgroup, or hybrid at
/// /sys/fs/cgroup/unified), from /proc/self/mountinfo.
pub fn cgroup2_mount() -> Result<PathBuf, DiscoveryError> {
    cgroup2_mounts()?
        .into_iter()
        .next()
        .ok_or(DiscoveryError::NoCgroup2)
}

/// Every cgroup2 mount point, in mount order. In a container there may be
/// two: the container's own view at /sys/fs/cgroup and the host's tree
/// mounted in from the node (the DaemonSet mounts it at /host/sys/fs/cgroup).
pub fn cgroup2_mounts() -> Result<Vec<PathBuf>, DiscoveryError> {
    let mounts = mounts_of_type("cgroup2")?;
    if mounts.is_empty() {
        return Err(DiscoveryError::NoCgroup2);
    }
    Ok(mounts)
}

/// Mount points of filesystems of `fstype` in this process's mount
/// namespace, in mount order (procfs reads /proc/self/mountinfo).
pub fn mounts_of_type(fstype: &str) -> Result<Vec<PathBuf>, DiscoveryError> {
    let infos = procfs::process::Process::myself()
        .and_then(|p| p.mountinfo())
        .map_err(|e| DiscoveryError::Io {
            path: "/proc/self/mountinfo".into(),
            source: std::io::Error::other(e.to_string()),
        })?;
    Ok(of_type(infos, fstype))
}

fn of_type(infos: procfs::process::MountInfos, fstype: &str) -> Vec<PathBuf> {
    infos
        .into_iter()
        .filter(|m| m.fs_type == fstype)
        .map(|m| m.mount_point)
        .collect()
}

/// Resolves the configured root against the mount; it must lie inside it.
pub fn resolve_root(mount: &Path, configured: &Path) -> Result<PathBuf, DiscoveryError> {
    let root = if configured.is_absolute() {
        configured.to_owned()
    } else {
        mount.join(configured)
    };
    if !root.starts_with(mount) {
        return Err(DiscoveryError::OutsideMount(root, mount.to_owned()));
    }
    Ok(root)
}

/// A cgroup found below the root.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cgroup {
    /// Path relative to the root, `/`-separated.
    pub rel_path: String,
    /// The kernel's cgroup id (the directory's inode on cgroup2).
    pub id: u64,
}

/// Every cgroup strictly below `root`, depth-first, bounded in depth.
pub fn scan(root: &Path) -> Result<Vec<Cgroup>, DiscoveryError> {
    const MAX_DEPTH: usize = 16;
    let mut out = Vec::new();
    let mut stack = vec![(root.to_owned(), String::new(), 0usize)];
    while let Some((dir, rel, depth)) = stack.pop() {
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            // A cgroup removed while we walk is not an error.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && depth > 0 => continue,
            Err(source) => return Err(DiscoveryError::Io { path: dir, source }),
        };
        for entry in entries.flatten() {
            // The entry's type and inode come with the directory listing
            // (kernfs lists a cgroup's id as its inode): no stat per cgroup.
            if !entry.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            let name = entry.file_name().to_string_lossy().into_owned();
            let child_rel = if rel.is_empty() {
                name
            } else {
                format!("{rel}/{name}")
            };
            out.push(Cgroup {
                rel_path: child_rel.clone(),
                id: std::os::unix::fs::DirEntryExt::ino(&entry),
            });
            if depth + 1 < MAX_DEPTH {
                stack.push((entry.path(), child_rel, depth + 1));
            }
        }
    }
    out.sort_by(|a, b| a.rel_path.cmp(&b.rel_path));
    Ok(out)
}

/// The cgroup at or below `root` that holds this process, if any: the
/// agent's own container when it runs as a pod under kubelet's `kubepods`
/// (a DaemonSet pod is a pod too). Found by the process's pid in
/// `cgroup.procs` (the kernel writes pids as the reader's pid namespace sees
/// them, so this works inside a container with its own pid and cgroup
/// namespaces, where `/proc/self/cgroup` only says `0::/`). `/proc/self/cgroup`
/// is tried first; the walk is bounded like [`scan`].
pub fn own_cgroup(root: &Path, mount: &Path) -> Option<Cgroup> {
    let pid = std::process::id().to_string();
    let holds_us = |dir: &Path| {
        std::fs::read_to_string(dir.join("cgroup.procs"))
            .is_ok_and(|procs| procs.lines().any(|l| l.trim() == pid))
    };
    let rel_of = |dir: &Path| {
        dir.strip_prefix(root)
            .ok()
            .map(|r| r.to_string_lossy().into_owned())
    };
    let from_proc = std::fs::read_to_string("/proc/self/cgroup")
        .ok()
        .and_then(|text| {
            let path = text.lines().find_map(|l| l.strip_prefix("0::"))?.trim();
            Some(mount.join(path.trim_start_matches('/')))
        })
        .filter(|dir| dir.starts_with(root) && dir != root && holds_us(dir));
    let dir = from_proc.or_else(|| {
        scan(root)
            .ok()?
            .into_iter()
            .map(|c| root.join(c.rel_path))
            .find(|dir| holds_us(dir))
    })?;
    Some(Cgroup {
        rel_path: rel_of(&dir)?,
        id: std::fs::metadata(&dir).ok()?.ino(),
    })
}

/// Substitutes `{var}` in `template` with captures.
pub fn expand(template: &str, captures: &BTreeMap<String, String>) -> String {
    let mut out = template.to_owned();
    for (k, v) in captures {
        out = out.replace(&format!("{{{k}}}"), v);
    }
    out
}

pub use crate::inventory::Workload;

/// Compiled workload rules.
pub struct Classifier {
    rules: Vec<(PathPattern, WorkloadRule)>,
}

impl Classifier {
    pub fn new(rules: &[WorkloadRule]) -> Result<Classifier, String> {
        rules
            .iter()
            .map(|r| Ok((PathPattern::new(&r.path)?, r.clone())))
            .collect::<Result<_, String>>()
            .map(|rules| Classifier { rules })
    }

    /// Names and labels a cgroup by the first matching rule.
    pub fn classify(&self, cgroup: &Cgroup) -> Option<Workload> {
        self.rules.iter().find_map(|(pattern, rule)| {
            let caps = pattern.captures(&cgroup.rel_path)?;
            let last = cgroup.rel_path.rsplit('/').next().unwrap_or_default();
            Some(Workload {
                cgroup_id: cgroup.id,
                cgroup_path: cgroup.rel_path.clone(),
                namespace: expand(&rule.namespace, &caps),
                name: rule
                    .name
                    .as_ref()
                    .map_or_else(|| last.to_owned(), |n| expand(n, &caps)),
                labels: rule
                    .labels
                    .iter()
                    .map(|(k, v)| (k.clone(), expand(v, &caps)))
                    .collect(),
                ips: Vec::new(),
                ports: rule.ports.clone(),
                own_netns: false,
            })
        })
    }
}

/// Whether the cgroup's processes have a network namespace of their own
/// (not the agent's, which is the host's), and that namespace's addresses.
/// `(false, [])` while the cgroup has no process.
pub fn workload_network(
    cgroup_dir: &Path,
    book: &mut crate::netlink::AddressBook,
) -> (bool, Vec<IpAddr>) {
    let Ok(procs) = std::fs::read_to_string(cgroup_dir.join("cgroup.procs")) else {
        return (false, Vec::new());
    };
    let Some(pid) = procs
        .lines()
        .next()
        .and_then(|l| l.trim().parse::<u32>().ok())
    else {
        return (false, Vec::new());
    };
    let netns = |p: &str| std::fs::metadata(p).map(|m| (m.dev(), m.ino())).ok();
    // The agent's own namespace never changes: looked up once.
    static OWN: std::sync::OnceLock<Option<(u64, u64)>> = std::sync::OnceLock::new();
    let own = *OWN.get_or_init(|| netns("/proc/self/ns/net"));
    let path = format!("/proc/{pid}/ns/net");
    let Some(theirs) = netns(&path).filter(|ns| Some(*ns) != own) else {
        return (false, Vec::new());
    };
    // A process that exits meanwhile leaves no addresses this round.
    let ips = book
        .workload_addresses(theirs, Path::new(&path))
        .unwrap_or_default();
    (true, ips)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The agent's own container under the root is found by its pid in
    /// `cgroup.procs` (as inside a container, where `/proc/self/cgroup` says
    /// `0::/`); another pod's cgroup is not the agent's.
    #[test]
    fn the_agents_own_cgroup_is_found_by_its_pid() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("kubepods");
        let other = root.join("besteffort/podaaaa/c1");
        let own = root.join("burstable/podbbbb/c2");
        for (dir, procs) in [
            (&other, "1\n77\n"),
            (&own, &format!("5\n{}\n", std::process::id())),
        ] {
            std::fs::create_dir_all(dir).unwrap();
            std::fs::write(dir.join("cgroup.procs"), procs).unwrap();
        }
        let found = own_cgroup(&root, tmp.path()).expect("found");
        assert_eq!(found.rel_path, "burstable/podbbbb/c2");
        assert_eq!(found.id, std::fs::metadata(&own).unwrap().ino());
        std::fs::write(own.join("cgroup.procs"), "5\n").unwrap();
        assert_eq!(own_cgroup(&root, tmp.path()), None, "not under the root");
    }

    fn parse_cgroup2_mount(text: &str) -> Option<PathBuf> {
        let infos: procfs::process::MountInfos =
            procfs::FromBufRead::from_buf_read(text.as_bytes()).unwrap();
        of_type(infos, "cgroup2").into_iter().next()
    }

    #[test]
    fn finds_cgroup2_in_hybrid_and_pure_layouts() {
        let hybrid = "31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755\n\
                      41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n";
        assert_eq!(
            parse_cgroup2_mount(hybrid),
            Some("/sys/fs/cgroup/unified".into())
        );
        let pure =
            "30 23 0:26 / /sys/fs/cgroup rw,nosuid shared:4 - cgroup2 cgroup2 rw,nsdelegate\n";
        assert_eq!(parse_cgroup2_mount(pure), Some("/sys/fs/cgroup".into()));
        assert_eq!(
            parse_cgroup2_mount("1 1 0:1 / / rw - ext4 /dev/vda rw\n"),
            None
        );
    }

    #[test]
    fn patterns_capture_segments() {
        let p = PathPattern::new("{ns}/{app}").unwrap();
        let caps = p.captures("production/payment-service").unwrap();
        assert_eq!(caps["ns"], "production");
        assert_eq!(caps["app"], "payment-service");
        assert!(p.captures("production").is_none());
        assert!(p.captures("a/b/c").is_none());
        let unit = PathPattern::new("system.slice/{unit}.service").unwrap();
        assert_eq!(
            unit.captures("system.slice/nginx.service").unwrap()["unit"],
            "nginx"
        );
        assert!(
            unit.captures("systemXslice/nginx.service").is_none(),
            "'.' is literal"
        );
        let deep = PathPattern::new("kubepods/**/{pod}").unwrap();
        assert_eq!(deep.captures("kubepods/a/b/pod1").unwrap()["pod"], "pod1");
        assert!(PathPattern::new("{ns").is_err());
        assert!(PathPattern::new("/abs").is_err());
    }
}
