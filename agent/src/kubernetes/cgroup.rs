//! Which pod a cgroup belongs to, from the names kubelet and the container
//! runtimes give cgroups. Pure string parsing, no filesystem.
//!
//! kubelet's two cgroup drivers name a pod's cgroup differently:
//!
//! | driver   | QoS class  | pod cgroup (relative to the cgroup2 mount)                              |
//! |----------|------------|--------------------------------------------------------------------------|
//! | systemd  | guaranteed | `kubepods.slice/kubepods-pod<uid>.slice`                                 |
//! | systemd  | burstable  | `kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid>.slice` |
//! | systemd  | besteffort | `kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod<uid>.slice` |
//! | cgroupfs | guaranteed | `kubepods/pod<uid>`                                                      |
//! | cgroupfs | burstable  | `kubepods/burstable/pod<uid>`                                            |
//! | cgroupfs | besteffort | `kubepods/besteffort/pod<uid>`                                           |
//!
//! With the systemd driver the dashes of the pod UID are written as
//! underscores (a dash separates the levels of a slice name). Containers are
//! children of the pod cgroup: `cri-containerd-<id>.scope` (containerd),
//! `crio-<id>.scope` and `crio-conmon-<id>.scope` (CRI-O), `docker-<id>.scope`
//! (cri-dockerd) under systemd; the bare id (or `crio-<id>`) under cgroupfs.
//! Every cgroup at or below a pod cgroup belongs to that pod.

/// kubelet's QoS classes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Qos {
    Guaranteed,
    Burstable,
    BestEffort,
}

/// The container runtime that named a container cgroup.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Runtime {
    Containerd,
    CriO,
    /// CRI-O's monitor process for a container (in the pod's cgroup by default).
    CriOConmon,
    Docker,
    /// A bare container id (cgroupfs driver with containerd or cri-dockerd).
    Unknown,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Container {
    pub runtime: Runtime,
    pub id: String,
}

/// A cgroup that belongs to a pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodCgroup {
    /// The pod's `metadata.uid`, with dashes (as the API server writes it).
    pub uid: String,
    pub qos: Qos,
    /// The container cgroup on the path, if the path goes below the pod cgroup.
    pub container: Option<Container>,
}

/// Parses a cgroup path (relative to the cgroup2 mount or to any ancestor of
/// the `kubepods` cgroup). `None` when no segment is a pod cgroup.
pub fn parse(path: &str) -> Option<PodCgroup> {
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    for (i, seg) in segments.iter().enumerate() {
        // A pod directly under the root is under `kubepods` itself (the
        // cgroupfs driver's root): a Guaranteed pod has no QoS parent.
        let parent = i.checked_sub(1).map_or("kubepods", |p| segments[p]);
        let found = systemd_pod(seg).or_else(|| cgroupfs_pod(seg, parent));
        if let Some((uid, qos)) = found {
            return Some(PodCgroup {
                uid,
                qos,
                container: segments.get(i + 1).map(|c| container(c)),
            });
        }
    }
    None
}

/// `kubepods[-<qos>]-pod<uid_with_underscores>.slice`
fn systemd_pod(seg: &str) -> Option<(String, Qos)> {
    let rest = seg.strip_prefix("kubepods-")?.strip_suffix(".slice")?;
    let (qos, escaped) = if let Some(r) = rest.strip_prefix("burstable-pod") {
        (Qos::Burstable, r)
    } else if let Some(r) = rest.strip_prefix("besteffort-pod") {
        (Qos::BestEffort, r)
    } else {
        (Qos::Guaranteed, rest.strip_prefix("pod")?)
    };
    // systemd escaping: the UID's dashes are written as underscores.
    let uid = escaped.replace('_', "-");
    is_uid(&uid).then_some((uid, qos))
}

/// `pod<uid>` whose parent is `kubepods`, `burstable` or `besteffort`.
fn cgroupfs_pod(seg: &str, parent: &str) -> Option<(String, Qos)> {
    let uid = seg.strip_prefix("pod")?;
    let qos = match parent {
        "kubepods" => Qos::Guaranteed,
        "burstable" => Qos::Burstable,
        "besteffort" => Qos::BestEffort,
        _ => return None,
    };
    is_uid(uid).then(|| (uid.to_owned(), qos))
}

fn container(seg: &str) -> Container {
    let scoped = seg.strip_suffix(".scope").unwrap_or(seg);
    for (prefix, runtime) in [
        ("cri-containerd-", Runtime::Containerd),
        ("crio-conmon-", Runtime::CriOConmon),
        ("crio-", Runtime::CriO),
        ("docker-", Runtime::Docker),
    ] {
        if let Some(id) = scoped.strip_prefix(prefix) {
            return Container {
                runtime,
                id: id.to_owned(),
            };
        }
    }
    Container {
        runtime: Runtime::Unknown,
        id: scoped.to_owned(),
    }
}

/// A UID as the API server generates it: 8-4-4-4-12 lowercase hex digits.
fn is_uid(s: &str) -> bool {
    let groups: Vec<&str> = s.split('-').collect();
    groups.len() == 5
        && groups
            .iter()
            .zip([8, 4, 4, 4, 12])
            .all(|(g, n)| g.len() == n && g.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// The systemd-driver pod slice path for `uid` (used by tests and docs).
pub fn systemd_pod_path(uid: &str, qos: Qos) -> String {
    let escaped = uid.replace('-', "_");
    match qos {
        Qos::Guaranteed => format!("kubepods.slice/kubepods-pod{escaped}.slice"),
        Qos::Burstable => {
            format!("kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{escaped}.slice")
        }
        Qos::BestEffort => format!(
            "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{escaped}.slice"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "8dbf9f0e-3c4b-4d1e-9a57-2f1c0b6e7d21";
    const CID: &str = "4f1e5a2b9c0d8e7f6a5b4c3d2e1f0a9b8c7d6e5f4a3b2c1d0e9f8a7b6c5d4e3f";

    #[test]
    fn systemd_driver_every_qos_class_and_runtime() {
        let cases = [
            (
                format!(
                    "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod8dbf9f0e_3c4b_4d1e_9a57_2f1c0b6e7d21.slice/cri-containerd-{CID}.scope"
                ),
                Qos::Burstable,
                Some(Runtime::Containerd),
            ),
            (
                format!(
                    "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod8dbf9f0e_3c4b_4d1e_9a57_2f1c0b6e7d21.slice/crio-{CID}.scope"
                ),
                Qos::BestEffort,
                Some(Runtime::CriO),
            ),
            (
                format!(
                    "kubepods.slice/kubepods-pod8dbf9f0e_3c4b_4d1e_9a57_2f1c0b6e7d21.slice/docker-{CID}.scope"
                ),
                Qos::Guaranteed,
                Some(Runtime::Docker),
            ),
            (
                format!(
                    "kubepods.slice/kubepods-pod8dbf9f0e_3c4b_4d1e_9a57_2f1c0b6e7d21.slice/crio-conmon-{CID}.scope"
                ),
                Qos::Guaranteed,
                Some(Runtime::CriOConmon),
            ),
            (
                "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod8dbf9f0e_3c4b_4d1e_9a57_2f1c0b6e7d21.slice".to_owned(),
                Qos::Burstable,
                None,
            ),
        ];
        for (path, qos, runtime) in cases {
            let p = parse(&path).unwrap_or_else(|| panic!("{path} is a pod cgroup"));
            assert_eq!(p.uid, UID, "{path}: dashes restored");
            assert_eq!(p.qos, qos, "{path}");
            assert_eq!(p.container.as_ref().map(|c| c.runtime), runtime, "{path}");
            if let Some(c) = p.container {
                assert_eq!(c.id, CID, "{path}");
            }
        }
    }

    #[test]
    fn cgroupfs_driver_every_qos_class() {
        for (path, qos) in [
            (format!("kubepods/pod{UID}/{CID}"), Qos::Guaranteed),
            (format!("kubepods/burstable/pod{UID}/{CID}"), Qos::Burstable),
            (
                format!("kubepods/besteffort/pod{UID}/crio-{CID}"),
                Qos::BestEffort,
            ),
        ] {
            let p = parse(&path).unwrap_or_else(|| panic!("{path}"));
            assert_eq!((p.uid.as_str(), p.qos), (UID, qos), "{path}");
            assert_eq!(p.container.unwrap().id, CID);
        }
    }

    #[test]
    fn relative_to_the_cgroupfs_root_every_qos_class() {
        // The agent names cgroups relative to its root, which is `kubepods`
        // itself under the cgroupfs driver: a Guaranteed pod has no parent.
        for (path, qos) in [
            (format!("pod{UID}/{CID}"), Qos::Guaranteed),
            (format!("pod{UID}"), Qos::Guaranteed),
            (format!("burstable/pod{UID}/{CID}"), Qos::Burstable),
            (format!("besteffort/pod{UID}"), Qos::BestEffort),
        ] {
            let p = parse(&path).unwrap_or_else(|| panic!("{path}"));
            assert_eq!((p.uid.as_str(), p.qos), (UID, qos), "{path}");
        }
    }

    #[test]
    fn a_prefix_before_kubepods_is_allowed() {
        // kubelet --cgroup-root, or a test subtree.
        let p = parse(&format!(
            "/palisade-test-1/{}/cri-containerd-{CID}.scope",
            systemd_pod_path(UID, Qos::BestEffort)
        ))
        .unwrap();
        assert_eq!((p.uid.as_str(), p.qos), (UID, Qos::BestEffort));
    }

    #[test]
    fn cgroups_that_are_not_pods() {
        for path in [
            "kubepods.slice",
            "kubepods.slice/kubepods-burstable.slice",
            "kubepods/burstable",
            "system.slice/containerd.service",
            // Not a UID: wrong group lengths, not hex, upper-case dashes-as-is under systemd.
            "kubepods.slice/kubepods-pod1234.slice",
            "kubepods.slice/kubepods-podzzzzzzzz_3c4b_4d1e_9a57_2f1c0b6e7d21.slice",
            // cgroupfs pod directory under a parent that is not a QoS level.
            "system.slice/pod8dbf9f0e-3c4b-4d1e-9a57-2f1c0b6e7d21",
        ] {
            assert_eq!(parse(path), None, "{path}");
        }
    }

    #[test]
    fn systemd_path_round_trips() {
        for qos in [Qos::Guaranteed, Qos::Burstable, Qos::BestEffort] {
            let p = parse(&systemd_pod_path(UID, qos)).unwrap();
            assert_eq!((p.uid.as_str(), p.qos), (UID, qos));
        }
    }
}
