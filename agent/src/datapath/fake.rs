//! An in-memory `Datapath` for unit tests: records what was applied, and
//! fails the applies it is told to.
use std::collections::{BTreeMap, VecDeque};

use super::{ApplyError, ApplyReport, Counters, Datapath, DatapathError, Desired, Health, MapFill};

#[derive(Debug, Default)]
pub struct FakeDatapath {
    pub applied: Vec<Desired>,
    /// The next applies fail: `true` partially (after the table swap),
    /// `false` refused (nothing changed).
    pub failures: VecDeque<bool>,
    /// Every apply tried, successful or not.
    pub attempts: usize,
    /// What every self-check reports.
    pub health: Health,
}

impl Datapath for FakeDatapath {
    fn apply(&mut self, desired: &Desired) -> Result<ApplyReport, ApplyError> {
        self.attempts += 1;
        if let Some(partial) = self.failures.pop_front() {
            let error = DatapathError::MissingMap("injected failure");
            return Err(if partial {
                ApplyError::partial(error)
            } else {
                ApplyError::refused(error)
            });
        }
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

    fn fill(&self) -> Vec<MapFill> {
        let entries = self.applied.last().map_or(0, |d| d.cgroups.len());
        vec![MapFill {
            map: "cgroups".into(),
            entries,
            capacity: 1024,
        }]
    }

    fn verify(&mut self) -> Health {
        self.health.clone()
    }

    fn repairs(&self) -> BTreeMap<String, u64> {
        BTreeMap::new()
    }
}
