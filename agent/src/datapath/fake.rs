//! An in-memory `Datapath` for unit tests: records what was applied.
use super::{ApplyReport, Counters, Datapath, DatapathError, Desired};

#[derive(Debug, Default)]
pub struct FakeDatapath {
    pub applied: Vec<Desired>,
}

impl Datapath for FakeDatapath {
    fn apply(&mut self, desired: &Desired) -> Result<ApplyReport, DatapathError> {
        let report = ApplyReport {
            policy_swapped: self
                .applied
                .last()
                .is_none_or(|d| d.policy != desired.policy),
            policy_entries: desired.policy.entries.len(),
            cgroup_updates: desired.cgroups.len(),
            ipcache_updates: desired.ipcache.len(),
            service_updates: desired.services.frontends.len(),
        };
        self.applied.push(desired.clone());
        Ok(report)
    }

    fn counters(&self) -> Result<Counters, DatapathError> {
        Ok(Counters::default())
    }
}
