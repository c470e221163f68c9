//! An in-memory `Datapath` for unit tests: records what was applied, fails
//! the applies it is told to, and hands out audit events a test sends.
use std::collections::{BTreeMap, VecDeque};

use ipnet::IpNet;
use palisade_common::AuditEvent;

use super::{
    Adoption, ApplyError, ApplyReport, Counters, Datapath, DatapathError, Desired, EventSource,
    Health, MapFill, Posture,
};

/// Audit events a test sends (`FakeDatapath::events_tx`); `None` is a
/// malformed record.
pub struct FakeEvents {
    rx: tokio::sync::mpsc::UnboundedReceiver<Option<AuditEvent>>,
    /// Received by `wait`, not drained yet.
    pending: Vec<Option<AuditEvent>>,
}

impl EventSource for FakeEvents {
    fn drain(&mut self) -> Vec<Option<AuditEvent>> {
        let mut out = std::mem::take(&mut self.pending);
        while let Ok(e) = self.rx.try_recv() {
            out.push(e);
        }
        out
    }

    async fn wait(&mut self) -> std::io::Result<()> {
        match self.rx.recv().await {
            Some(e) => self.pending.push(e),
            // Every sender gone: nothing will come; the reader's poll
            // interval and stop signal take over.
            None => std::future::pending::<()>().await,
        }
        Ok(())
    }
}

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
    /// What the maps held at start, as adoption would find it.
    pub adopted: (BTreeMap<u64, u32>, BTreeMap<IpNet, u32>),
    pub adoption: Adoption,
    pub posture: Posture,
    /// Sends audit events to the reader of [`Datapath::take_events`].
    pub events_tx: Option<tokio::sync::mpsc::UnboundedSender<Option<AuditEvent>>>,
}

impl Datapath for FakeDatapath {
    type Events = FakeEvents;

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

    fn take_events(&mut self) -> Result<FakeEvents, DatapathError> {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        self.events_tx = Some(tx);
        Ok(FakeEvents {
            rx,
            pending: Vec::new(),
        })
    }

    fn adoption(&self) -> &Adoption {
        &self.adoption
    }

    fn adopted_identities(&self) -> (BTreeMap<u64, u32>, BTreeMap<IpNet, u32>) {
        self.adopted.clone()
    }

    fn active_entries(&self) -> usize {
        self.applied.last().map_or(0, |d| d.policy.entries.len())
    }

    fn attach_points(&self) -> &[String] {
        &[]
    }

    fn posture(&self) -> &Posture {
        &self.posture
    }
}
