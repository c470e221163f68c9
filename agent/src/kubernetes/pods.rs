//! The pods as the planner needs them, kept between rounds ([`PodIndex`]):
//! the watch names the pods that changed, and a round costs those pods and
//! the pods sharing an address with them — not every pod of the cluster.
//! What it sends must always equal what [`super::inputs`] computes from the
//! whole list (a churn test holds them equal).
use std::{
    collections::{BTreeSet, HashMap, HashSet},
    net::IpAddr,
};

use palisade_common::identity as reserved;

use super::{PodInfo, cgroup, pod_key};
use crate::{
    discovery::Cgroup,
    inventory::{Inputs, RemoteWorkload, UnknownPods, Workload},
};

/// The pods that changed since the last round.
#[derive(Debug)]
pub enum PodChanges {
    /// Every pod (the first list, a re-list): compared with what is held.
    All(Vec<PodInfo>),
    /// `namespace/name` → the pod now (`None`: deleted, or finished).
    Some(Vec<(String, Option<PodInfo>)>),
}

#[derive(Debug, Default)]
pub struct PodIndex {
    pods: HashMap<String, PodInfo>,
    /// uid → key.
    by_uid: HashMap<String, String>,
    /// Address → the pods (not hostNetwork) that name it.
    claimants: HashMap<IpAddr, Vec<String>>,
    /// Keys of the pods scheduled to this node.
    on_node: BTreeSet<String>,
    /// uids of known pods whose cgroup is on this node.
    with_cgroup: HashSet<String>,
    /// The remote workloads sent so far, by key.
    sent: HashMap<String, RemoteWorkload>,
    started: bool,
}

impl PodIndex {
    /// Whether a first list has been taken in.
    pub fn started(&self) -> bool {
        self.started
    }

    /// Takes in the changed pods and this round's local cgroups; returns
    /// the local workloads and held cgroups (whole, they are few) and the
    /// remote workloads that changed (everything, `reset`, the first time).
    pub fn update(
        &mut self,
        node: &str,
        changes: PodChanges,
        cgroups: &[Cgroup],
        unknown: UnknownPods,
    ) -> Inputs {
        let mut affected = HashSet::new();
        match changes {
            PodChanges::All(pods) => {
                let mut now: HashMap<String, PodInfo> =
                    pods.into_iter().map(|p| (pod_key(&p), p)).collect();
                let gone: Vec<String> = self
                    .pods
                    .keys()
                    .filter(|k| !now.contains_key(*k))
                    .cloned()
                    .collect();
                for key in gone {
                    self.set(node, key, None, &mut affected);
                }
                for (key, pod) in now.drain() {
                    self.set(node, key, Some(pod), &mut affected);
                }
            }
            PodChanges::Some(changed) => {
                for (key, pod) in changed {
                    self.set(node, key, pod, &mut affected);
                }
            }
        }
        let parsed: Vec<(&Cgroup, Option<cgroup::PodCgroup>)> = cgroups
            .iter()
            .map(|cg| (cg, cgroup::parse(&cg.rel_path)))
            .collect();
        let with_cgroup: HashSet<String> = parsed
            .iter()
            .filter_map(|(_, pc)| Some(pc.as_ref()?.uid.clone()))
            .filter(|uid| self.by_uid.contains_key(uid))
            .collect();
        // A pod whose cgroup came or went moves between local and remote,
        // and ranks differently for its addresses.
        let moved: Vec<String> = with_cgroup
            .symmetric_difference(&self.with_cgroup)
            .filter_map(|uid| self.by_uid.get(uid).cloned())
            .collect();
        self.with_cgroup = with_cgroup;
        for key in moved {
            self.touch(&key, &mut affected);
        }
        let mut out = self.local(&parsed, unknown);
        out.remote.reset = !self.started;
        if out.remote.reset {
            affected.extend(self.pods.keys().cloned());
            self.sent.clear();
        }
        let mut changes: Vec<(String, Option<RemoteWorkload>)> = Vec::new();
        for key in affected {
            let now = self.remote_of(&key);
            if self.sent.get(&key) == now.as_ref() {
                continue;
            }
            match &now {
                Some(w) => self.sent.insert(key.clone(), w.clone()),
                None => self.sent.remove(&key),
            };
            if now.is_some() || !out.remote.reset {
                changes.push((key, now));
            }
        }
        changes.sort_by(|a, b| a.0.cmp(&b.0));
        out.remote.changes = changes;
        self.started = true;
        out
    }

    /// The addresses of this node's hostNetwork pods (the node's own).
    pub fn host_network_ips(&self) -> impl Iterator<Item = IpAddr> + '_ {
        self.on_node
            .iter()
            .filter_map(|k| self.pods.get(k))
            .filter(|p| p.host_network)
            .flat_map(|p| p.ips.iter().copied())
    }

    /// Records one pod's new state; `affected` gets every pod whose remote
    /// entry may differ because of it.
    fn set(
        &mut self,
        node: &str,
        key: String,
        pod: Option<PodInfo>,
        affected: &mut HashSet<String>,
    ) {
        if self.pods.get(&key) == pod.as_ref() {
            return;
        }
        if let Some(old) = self.pods.remove(&key) {
            if self.by_uid.get(&old.uid) == Some(&key) {
                self.by_uid.remove(&old.uid);
            }
            if !old.host_network {
                for ip in &old.ips {
                    if let Some(keys) = self.claimants.get_mut(ip) {
                        keys.retain(|k| *k != key);
                        affected.extend(keys.iter().cloned());
                        if keys.is_empty() {
                            self.claimants.remove(ip);
                        }
                    }
                }
            }
            self.on_node.remove(&key);
        }
        if let Some(pod) = pod {
            self.by_uid.insert(pod.uid.clone(), key.clone());
            if !pod.host_network {
                for ip in &pod.ips {
                    let keys = self.claimants.entry(*ip).or_default();
                    affected.extend(keys.iter().cloned());
                    keys.push(key.clone());
                }
            }
            if pod.node.as_deref() == Some(node) {
                self.on_node.insert(key.clone());
            }
            self.pods.insert(key.clone(), pod);
        }
        affected.insert(key);
    }

    /// `key` and the pods sharing an address with it.
    fn touch(&self, key: &str, affected: &mut HashSet<String>) {
        affected.insert(key.to_owned());
        if let Some(pod) = self.pods.get(key) {
            for ip in &pod.ips {
                affected.extend(self.claimants.get(ip).into_iter().flatten().cloned());
            }
        }
    }

    /// The uid of the pod an address belongs to (see
    /// [`super::address_owners`]: not terminating, then with a cgroup
    /// here, then created last).
    fn owner(&self, ip: &IpAddr) -> Option<&str> {
        self.claimants
            .get(ip)?
            .iter()
            .filter_map(|k| self.pods.get(k))
            .max_by_key(|p| {
                (
                    !p.terminating,
                    self.with_cgroup.contains(&p.uid),
                    p.created.as_str(),
                    p.uid.as_str(),
                )
            })
            .map(|p| p.uid.as_str())
    }

    fn owned_ips(&self, pod: &PodInfo) -> Vec<IpAddr> {
        pod.ips
            .iter()
            .filter(|ip| self.owner(ip) == Some(pod.uid.as_str()))
            .copied()
            .collect()
    }

    /// What the planner holds for `key`: a pod not local to a cgroup here,
    /// not on the host network, with an address it owns.
    fn remote_of(&self, key: &str) -> Option<RemoteWorkload> {
        let pod = self.pods.get(key)?;
        if pod.host_network || pod.ips.is_empty() || self.with_cgroup.contains(&pod.uid) {
            return None;
        }
        let ips = self.owned_ips(pod);
        (!ips.is_empty()).then(|| RemoteWorkload {
            namespace: pod.namespace.clone(),
            name: pod.name.clone(),
            labels: pod.labels.clone(),
            ips,
            ports: pod.ports.clone(),
        })
    }

    /// The local cgroups as workloads and held cgroups, and the local pods
    /// without a cgroup.
    fn local(
        &self,
        parsed: &[(&Cgroup, Option<cgroup::PodCgroup>)],
        unknown: UnknownPods,
    ) -> Inputs {
        let mut out = Inputs::default();
        for (cg, pc) in parsed {
            let Some(pc) = pc else {
                // QoS directories and anything else that is not a pod.
                out.held.insert(cg.id, reserved::UNMANAGED);
                continue;
            };
            match self.by_uid.get(&pc.uid).and_then(|k| self.pods.get(k)) {
                Some(pod) if pod.host_network => {
                    out.held.insert(cg.id, reserved::HOST);
                }
                Some(pod) => out.workloads.push(Workload {
                    cgroup_id: cg.id,
                    cgroup_path: cg.rel_path.clone(),
                    namespace: pod.namespace.clone(),
                    name: pod.name.clone(),
                    labels: pod.labels.clone(),
                    ips: self.owned_ips(pod),
                    ports: pod.ports.clone(),
                    own_netns: true,
                }),
                None if unknown != UnknownPods::Allow => {
                    out.held.insert(cg.id, reserved::PENDING);
                }
                None => {}
            }
        }
        out.local_without_cgroup = self
            .on_node
            .iter()
            .filter_map(|k| self.pods.get(k))
            .filter(|p| {
                !p.host_network
                    && !p.terminating
                    && !p.ips.is_empty()
                    && !self.with_cgroup.contains(&p.uid)
            })
            .map(|p| format!("{}/{}", p.namespace, p.name))
            .collect();
        out.local_without_cgroup.sort();
        out
    }
}
