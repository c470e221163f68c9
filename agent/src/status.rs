//! The agent's status report: what `palisade status`, the control socket,
//! `/readyz` and `/metrics` show. The control loop owns and publishes it;
//! readers take copies. A typed wire record (serde + JsonSchema): the CLI
//! reads it back as this type, not field by field.
use std::sync::{Arc, Mutex};

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// What the agent reports, refreshed by its loop.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct StatusReport {
    pub version: String,
    pub attach_points: Vec<String>,
    pub workload_list: Vec<WorkloadStatus>,
    pub policy_list: Vec<PolicyStatus>,
    /// Programs attached and the first policy sync done.
    pub ready: bool,
    /// Successful applies of a changed state.
    pub generation: u64,
    /// Policy or state changes refused (invalid policy, map full, …).
    pub apply_errors: u64,
    pub last_error: Option<String>,
    pub workloads: usize,
    pub identities: usize,
    pub policies: usize,
    pub counters: crate::datapath::Counters,
    /// How full each kernel map is.
    pub maps: Vec<crate::datapath::MapFill>,
    /// What was adopted from the pin directory at start, and what replaced.
    pub adoption: crate::datapath::Adoption,
    /// Which protections are active on this node.
    pub posture: crate::datapath::Posture,
    /// Sockets workloads use that were created outside the root (not judged).
    pub foreign_sockets: Vec<crate::sockets::ForeignSocket>,
    /// Audit events delivered, read just before `counters` (so that
    /// delivered + lost never exceeds emitted in one report).
    pub events_delivered: u64,
    /// A state was applied at least once.
    pub applied: bool,
    /// The kernel does not hold the planned state: it was refused (the
    /// previous one stays) or is part way there (retried).
    pub behind: Option<String>,
    /// Why the kernel does not enforce what the agent says (self-check),
    /// or why nothing is applied yet.
    pub enforcement_problems: Vec<String>,
    /// Repairs of the kernel state by the self-check, by kind.
    pub repairs: std::collections::BTreeMap<String, u64>,
    /// The policy directory vanished, turned empty or unreadable: the last
    /// good policy stays in force.
    pub policy_source_problem: Option<String>,
    /// Kubernetes mode: the API server has not answered for a while, so the
    /// cluster view (pods, Services, nodes, policies) may be stale; the kernel
    /// keeps enforcing it. Does not make the node not ready.
    #[serde(default)]
    pub cluster_view_problem: Option<String>,
    /// Policy-directory changes seen (loads tried), the last one loaded,
    /// the last one whose policy is in the kernel, and the last one refused.
    pub policy_revision: u64,
    pub policy_revision_loaded: u64,
    pub policy_revision_applied: u64,
    pub policy_revision_refused: u64,
    /// Policy objects from the API server the agent refused (kind,
    /// namespace/name and why): they are not enforced anywhere.
    #[serde(default)]
    pub refused_policy_objects: Vec<String>,
    /// Pods on this node, running with an address, whose cgroup has not been
    /// found under the root for 5 s or more: their traffic is not judged
    /// as theirs. The node is not ready while there are any.
    #[serde(default)]
    pub unmatched_local_pods: Vec<String>,
}

impl StatusReport {
    /// Why the agent is not ready (empty: ready). Ready means the kernel
    /// enforces the policy the agent says it does.
    pub fn not_ready_because(&self) -> Vec<String> {
        let mut why = self.enforcement_problems.clone();
        if self.applied
            && let Some(b) = &self.behind
        {
            why.push(b.clone());
        }
        if !self.unmatched_local_pods.is_empty() {
            why.push(format!(
                "pods on this node are not enforced, their cgroup is not found under the root (check cgroupRoot and the cgroup driver): {}",
                self.unmatched_local_pods.join(", ")
            ));
        }
        if !self.applied {
            why.push(match &self.last_error {
                Some(e) => format!("nothing applied yet: {e}"),
                None => "programs not attached or policy not synced yet".to_owned(),
            });
        }
        why
    }

    /// Sets `ready` from the rest.
    pub fn update_ready(&mut self) {
        self.ready = self.not_ready_because().is_empty();
    }
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct WorkloadStatus {
    pub name: String,
    pub cgroup: String,
    pub identity: u32,
    pub addresses: Vec<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct PolicyStatus {
    pub name: String,
    pub kind: String,
    pub file: String,
    pub line: usize,
}

/// The report the loop publishes; the control socket and HTTP read copies.
pub type SharedStatus = Arc<Mutex<StatusReport>>;

/// How a policy change written into the policy directory ended, as the
/// status shows it after the agent read the directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Settled {
    /// The kernel enforces it (generation).
    Applied(u64),
    /// The agent refused it (why); nothing of it is in force.
    Refused(String),
    /// Not decided yet (generation in force).
    Pending(u64),
}

impl StatusReport {
    /// Where the last policy-directory revision the agent read stands.
    pub fn settled(&self) -> Settled {
        if self.policy_revision_refused >= self.policy_revision && self.policy_revision > 0 {
            Settled::Refused(self.last_error.clone().unwrap_or_default())
        } else if self.policy_revision_applied >= self.policy_revision {
            Settled::Applied(self.generation)
        } else {
            Settled::Pending(self.generation)
        }
    }
}
