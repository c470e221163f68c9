//! The control loop over the fake datapath and a scripted source: what a
//! user sees in the status after each event.
use std::path::Path;

use super::*;
use crate::{datapath::fake::FakeDatapath, policy::model::Policy, status::StatusReport};

/// A source whose answer the test sets.
#[derive(Default)]
struct Scripted {
    inputs: Inputs,
    waiting: bool,
    policies: Vec<Policy>,
    epoch: u64,
    /// How often the agent observed it.
    observed: usize,
    /// Policy objects it refused, with why.
    refused: Vec<String>,
}

impl Source for Scripted {
    fn observe(&mut self) -> Observed {
        self.observed += 1;
        if self.waiting {
            Observed::Waiting(vec!["pods"])
        } else {
            Observed::Ready(self.inputs.clone())
        }
    }

    fn policy_epoch(&self) -> u64 {
        self.epoch
    }

    fn policies(&self) -> (Vec<Policy>, Vec<String>) {
        (self.policies.clone(), self.refused.clone())
    }

    async fn changed(&self) {
        std::future::pending().await
    }
}

/// A workload `prod/w<id>` labelled `app`, its own netns, address 10.1.0.<id>
/// (shared with the planner's tests).
pub(super) fn workload(cgroup_id: u64, app: &str) -> Workload {
    Workload {
        cgroup_id,
        cgroup_path: format!("prod/w{cgroup_id}"),
        namespace: "prod".into(),
        name: format!("w{cgroup_id}"),
        labels: [("app".to_owned(), app.to_owned())].into(),
        ips: vec![format!("10.1.0.{cgroup_id}").parse().unwrap()],
        ports: Vec::new(),
        own_netns: true,
    }
}

fn inputs(workloads: &[(u64, &str)]) -> Inputs {
    Inputs {
        workloads: workloads
            .iter()
            .map(|(id, app)| workload(*id, app))
            .collect(),
        ..Inputs::default()
    }
}

const DENY_ALL: &str = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: deny-all, namespace: prod}\nspec:\n  podSelector: {}\n  policyTypes: [Ingress, Egress]\n";
const ALLOW_WEB: &str = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: allow-web, namespace: prod}\nspec:\n  podSelector: {matchLabels: {app: web}}\n  ingress: [{}]\n";

/// An agent over workload 7 (`web`) with `deny.yaml` (DENY_ALL) in its
/// policy directory (kept alive by the returned guard).
fn agent_with_deny_all() -> (tempfile::TempDir, Agent<FakeDatapath, Scripted>) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("deny.yaml"), DENY_ALL).unwrap();
    let a = agent(
        FakeDatapath::default(),
        Scripted {
            inputs: inputs(&[(7, "web")]),
            ..Scripted::default()
        },
        Some(dir.path()),
    );
    (dir, a)
}

fn agent(
    dp: FakeDatapath,
    source: Scripted,
    policy_dir: Option<&Path>,
) -> Agent<FakeDatapath, Scripted> {
    let config = Config::parse(Path::new("t.yaml"), "cgroupRoot: x\n").unwrap();
    let policies = Policies::load(policy_dir.map(Path::to_owned), Duration::ZERO).unwrap();
    Agent::new(
        dp,
        source,
        Planner::new(config, false),
        policies,
        Shared::default(),
    )
}

fn status<D: Datapath, S: Source>(a: &Agent<D, S>) -> StatusReport {
    a.shared.status.lock().unwrap().clone()
}

/// A node at rest is not re-read on every tick: only when the source wakes
/// the agent, a policy changes, or the idle interval passed; after a change
/// it is re-read at the busy cadence for a while.
#[test]
fn a_node_at_rest_is_read_when_woken_not_on_every_tick() {
    let (_dir, mut a) = agent_with_deny_all();
    a.set_cadence(Cadence::new(Duration::ZERO, Duration::from_secs(3600)));
    // Until the first state is in and steady, every round observes.
    a.step(Event::Tick);
    a.step(Event::Tick);
    assert!(status(&a).ready);
    // Within the busy window (the first inputs were a change) a tick reads.
    let before = a.source.observed;
    a.step(Event::Tick);
    assert_eq!(a.source.observed, before + 1);
    // Past the busy window, ticks read nothing; a wakeup reads at once.
    a.cadence.busy_until = Some(Instant::now());
    let before = a.source.observed;
    a.source.inputs = inputs(&[(7, "web"), (8, "db")]);
    for _ in 0..5 {
        a.step(Event::Tick);
    }
    assert_eq!(a.source.observed, before, "ticks at rest read nothing");
    assert_eq!(status(&a).workload_list.len(), 1);
    a.step(Event::SourceChanged);
    assert_eq!(a.source.observed, before + 1);
    assert_eq!(
        status(&a).workload_list.len(),
        2,
        "a wakeup is read at once"
    );
    // The idle interval passed: a tick reads again.
    a.cadence.busy_until = Some(Instant::now());
    a.cadence.last = Instant::now().checked_sub(Duration::from_secs(3601));
    let before = a.source.observed;
    a.step(Event::Tick);
    assert_eq!(a.source.observed, before + 1);
}

#[test]
fn a_write_that_failed_after_the_swap_is_retried_while_the_inputs_stay_the_same() {
    let mut dp = FakeDatapath::default();
    dp.failures.push_back(true);
    let source = Scripted {
        inputs: inputs(&[(7, "web")]),
        ..Scripted::default()
    };
    let mut a = agent(dp, source, None);
    // First state partly in: the agent says it is behind, not that it enforces.
    assert_eq!(a.step(Event::Tick), Flow::Continue);
    let s = status(&a);
    assert!(!s.ready && !s.applied, "{s:?}");
    assert_eq!((s.apply_errors, a.datapath.attempts), (1, 1));
    // Nothing changed in the inputs: the same state is applied again.
    a.step(Event::Tick);
    let s = status(&a);
    assert!(s.ready, "{:?}", s.not_ready_because());
    assert_eq!((s.generation, a.datapath.attempts), (1, 2));
    assert_eq!(a.datapath.applied.len(), 1);
    assert_eq!(s.workload_list[0].name, "prod/w7");
    // Once in, the same inputs are not applied again.
    a.step(Event::Tick);
    assert_eq!(a.datapath.attempts, 2);

    // A later change partly in: behind, not ready, retried, ready again.
    a.datapath.failures.push_back(true);
    a.source.inputs = inputs(&[(7, "web"), (8, "db")]);
    a.step(Event::SourceChanged);
    let s = status(&a);
    assert!(!s.ready);
    assert!(
        s.behind.as_deref().is_some_and(|b| b.contains("retrying")),
        "{s:?}"
    );
    a.step(Event::Tick);
    let s = status(&a);
    assert!(s.ready && s.behind.is_none(), "{s:?}");
    assert_eq!(s.generation, 2);
    assert_eq!(a.datapath.applied.last().unwrap().cgroups.len(), 2);
}

#[test]
fn a_refused_state_is_not_hammered_and_the_previous_one_stays() {
    let mut a = agent(
        FakeDatapath::default(),
        Scripted {
            inputs: inputs(&[(7, "web")]),
            ..Scripted::default()
        },
        None,
    );
    a.step(Event::Tick);
    assert!(status(&a).ready);
    // Too big for the maps: refused, nothing changed, not retried.
    a.datapath.failures.push_back(false);
    a.source.inputs = inputs(&[(7, "web"), (8, "db")]);
    a.step(Event::Tick);
    a.step(Event::Tick);
    let s = status(&a);
    assert_eq!(a.datapath.attempts, 2, "not tried again with the same plan");
    assert!(!s.ready);
    assert!(
        s.behind
            .as_deref()
            .is_some_and(|b| b.contains("previous one stays in force")),
        "{s:?}"
    );
    assert_eq!(a.datapath.applied.len(), 1);
    // The inputs change: the new state applies and the agent is ready.
    a.source.inputs = inputs(&[(8, "db")]);
    a.step(Event::Tick);
    let s = status(&a);
    assert!(s.ready && s.behind.is_none(), "{s:?}");
    assert_eq!(s.generation, 2);
}

#[test]
fn nothing_is_applied_while_the_source_is_not_listed() {
    let mut a = agent(
        FakeDatapath::default(),
        Scripted {
            inputs: inputs(&[(7, "web")]),
            waiting: true,
            ..Scripted::default()
        },
        None,
    );
    a.step(Event::Tick);
    a.step(Event::SourceChanged);
    assert_eq!(a.datapath.attempts, 0);
    assert!(!status(&a).ready);
    a.source.waiting = false;
    a.step(Event::SourceChanged);
    assert!(status(&a).ready);
    assert_eq!(a.datapath.attempts, 1);
}

#[test]
fn the_sources_policies_join_the_files_when_its_epoch_changes() {
    let (_dir, mut a) = agent_with_deny_all();
    a.step(Event::Tick);
    assert_eq!(status(&a).policies, 1);
    let allow = crate::policy::load::parse_str("cluster", ALLOW_WEB).unwrap();
    a.source.policies = allow;
    a.step(Event::Tick);
    assert_eq!(status(&a).policies, 1, "same epoch: not merged yet");
    a.source.epoch = 1;
    a.step(Event::SourceChanged);
    let s = status(&a);
    assert_eq!(s.policies, 2);
    let names: Vec<&str> = s.policy_list.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, ["prod/deny-all", "prod/allow-web"]);
    assert_eq!(s.generation, 2);
}

#[test]
fn a_written_policy_is_answered_applied_or_refused_in_the_same_step() {
    let (dir, mut a) = agent_with_deny_all();
    a.step(Event::Tick);
    let before = a.datapath.applied.last().unwrap().policy.clone();
    std::fs::write(dir.path().join("allow.yaml"), ALLOW_WEB).unwrap();
    let (tx, mut rx) = oneshot::channel();
    a.step(Event::PolicyWritten(tx));
    assert_eq!(rx.try_recv().unwrap(), Settled::Applied(2));
    assert_ne!(a.datapath.applied.last().unwrap().policy, before);
    assert_eq!(status(&a).policies, 2);

    // An invalid file: refused, named, and the kernel keeps what it had.
    std::fs::write(dir.path().join("bad.yaml"), "kind: NetworkPolicy\nspec: [").unwrap();
    let (tx, mut rx) = oneshot::channel();
    a.step(Event::PolicyWritten(tx));
    match rx.try_recv().unwrap() {
        Settled::Refused(why) => assert!(why.contains("bad.yaml"), "{why}"),
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert_eq!(a.datapath.applied.len(), 2);
    assert!(status(&a).ready, "the previous policy stays enforced");
}

#[test]
fn a_stop_event_stops_the_loop() {
    let mut a = agent(FakeDatapath::default(), Scripted::default(), None);
    assert_eq!(a.step(Event::Stop("SIGTERM")), Flow::Stop);
    assert_eq!(a.datapath.attempts, 0);
}

/// A pod on this node whose cgroup is not found is reported once its grace
/// has passed, and the node is not ready until it is found (or gone).
#[test]
fn a_local_pod_without_a_cgroup_makes_the_node_not_ready_after_its_grace() {
    let (_dir, mut a) = agent_with_deny_all();
    a.source.inputs.local_without_cgroup = vec!["prod/lost".into()];
    a.step(Event::Tick);
    a.step(Event::Tick);
    let s = status(&a);
    assert!(
        s.ready && s.unmatched_local_pods.is_empty(),
        "in its grace: {s:?}"
    );
    // The grace passed.
    a.unmatched_since
        .insert("prod/lost".into(), Instant::now() - UNMATCHED_GRACE);
    a.step(Event::Tick);
    let s = status(&a);
    assert_eq!(s.unmatched_local_pods, ["prod/lost"]);
    assert!(!s.ready);
    assert!(
        s.not_ready_because()
            .iter()
            .any(|w| w.contains("prod/lost") && w.contains("cgroup")),
        "{:?}",
        s.not_ready_because()
    );
    // Its cgroup appeared.
    a.source.inputs.local_without_cgroup.clear();
    a.step(Event::SourceChanged);
    let s = status(&a);
    assert!(s.ready && s.unmatched_local_pods.is_empty(), "{s:?}");
}

/// A policy object the source refused is listed in the status with why;
/// the node stays ready (the object is refused on every node alike, and a
/// node taken out of service would not enforce it either).
#[test]
fn a_refused_policy_object_is_listed_in_the_status() {
    let (_dir, mut a) = agent_with_deny_all();
    a.step(Event::Tick);
    a.source.refused = vec!["NetworkPolicy prod/typo: spec.podSelector: unknown field".into()];
    a.source.epoch += 1;
    a.step(Event::SourceChanged);
    let s = status(&a);
    assert_eq!(s.refused_policy_objects, a.source.refused);
    assert!(s.ready, "{:?}", s.not_ready_because());
    a.source.refused.clear();
    a.source.epoch += 1;
    a.step(Event::SourceChanged);
    assert!(status(&a).refused_policy_objects.is_empty());
}
