//! Making the kernel match the planned state: applies a state that differs
//! from the one in force, remembers a refused state so it is not tried again
//! while the plan stays the same, and applies a partially applied state
//! again on the next round (the kernel would otherwise stay behind the
//! desired state for as long as the inputs do not change).
use crate::datapath::{ApplyError, ApplyReport, Datapath, Desired};

#[derive(Debug, Default)]
pub struct Reconciler {
    applied: Option<Desired>,
    refused: Option<Desired>,
}

/// What one reconcile did.
#[derive(Debug)]
pub enum Outcome {
    /// The state in force is the planned one.
    Unchanged,
    /// The planned state is the one refused last time (not tried again).
    StillRefused,
    Applied(ApplyReport),
    /// Nothing in force changed; not retried until the plan changes.
    Refused(ApplyError),
    /// The kernel is behind the plan; retried on the next round.
    Partial(ApplyError),
}

impl Reconciler {
    /// The state last applied in full.
    pub fn applied(&self) -> Option<&Desired> {
        self.applied.as_ref()
    }

    pub fn reconcile<D: Datapath>(&mut self, datapath: &mut D, desired: &Desired) -> Outcome {
        if self.applied.as_ref() == Some(desired) {
            return Outcome::Unchanged;
        }
        if self.refused.as_ref() == Some(desired) {
            return Outcome::StillRefused;
        }
        match datapath.apply(desired) {
            Ok(report) => {
                self.applied = Some(desired.clone());
                self.refused = None;
                Outcome::Applied(report)
            }
            Err(e) if e.partial => {
                // `applied` stays the older state: the next round differs
                // from it and applies `desired` again.
                self.refused = None;
                Outcome::Partial(e)
            }
            Err(e) => {
                self.refused = Some(desired.clone());
                Outcome::Refused(e)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{collections::BTreeMap, sync::Arc};

    use super::*;
    use crate::datapath::fake::FakeDatapath;

    fn state(cgroups: &[(u64, u32)]) -> Desired {
        Desired {
            cgroups: cgroups.iter().copied().collect::<BTreeMap<_, _>>(),
            policy: Arc::default(),
            ..Desired::default()
        }
    }

    #[test]
    fn a_partial_apply_is_applied_again_with_the_same_plan() {
        let mut dp = FakeDatapath::default();
        dp.failures.push_back(true);
        let mut r = Reconciler::default();
        let want = state(&[(7, 300)]);
        assert!(matches!(r.reconcile(&mut dp, &want), Outcome::Partial(_)));
        // Same inputs, same plan: tried again, and now it holds.
        assert!(matches!(r.reconcile(&mut dp, &want), Outcome::Applied(_)));
        assert_eq!(dp.applied, vec![want.clone()]);
        assert!(matches!(r.reconcile(&mut dp, &want), Outcome::Unchanged));
        assert_eq!(dp.attempts, 2);
    }

    #[test]
    fn a_refused_plan_is_not_retried_until_it_changes() {
        let mut dp = FakeDatapath::default();
        dp.failures.push_back(false);
        let mut r = Reconciler::default();
        let too_big = state(&[(7, 300)]);
        assert!(matches!(
            r.reconcile(&mut dp, &too_big),
            Outcome::Refused(_)
        ));
        assert!(matches!(
            r.reconcile(&mut dp, &too_big),
            Outcome::StillRefused
        ));
        assert_eq!(dp.attempts, 1, "not hammered while the plan is the same");
        let smaller = state(&[(8, 301)]);
        assert!(matches!(
            r.reconcile(&mut dp, &smaller),
            Outcome::Applied(_)
        ));
        assert_eq!(r.applied(), Some(&smaller));
    }
}
