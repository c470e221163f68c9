//! The agent's control loop. [`run`] sets the node up (cgroup root, kernel
//! programs, servers) and turns what happens into [`Event`]s; an
//! [`Agent`] over any [`Datapath`] and [`Source`] takes one event per
//! [`Agent::step`]: observe the source, merge the policy, plan the desired
//! kernel state as plain data, make the kernel match it, publish the status.
//! Start, reload and change are the same path.
pub mod planner;
pub mod policies;
mod services;
pub mod source;

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use palisade_common::identity as reserved;
use tokio::sync::oneshot;
use tracing::{info, warn};

pub use self::planner::{ADDRESS_RECENT, ADDRESS_REUSE_HOLD, Observation, Planner};
use self::{
    policies::Policies,
    source::{HostSource, KubernetesSource, Observed, Source},
};
use crate::{
    audit::{self, AuditStats, SharedSnapshot, Snapshot},
    config::Config,
    datapath::{ApplyError, ApplyReport, Datapath, Desired, kernel::KernelDatapath},
    discovery::{self, Classifier},
    inventory::{Inputs, Workload},
    reconcile::{Outcome, Reconciler},
    status::{Settled, SharedStatus, WorkloadStatus},
};

/// Something that happened, for the loop to act on.
#[derive(Debug)]
pub enum Event {
    /// The rescan interval passed.
    Tick,
    /// The source signalled a change (a watch event).
    SourceChanged,
    /// A client wrote the policy directory (`palisade policy apply|delete`):
    /// read it now and answer how the change ended.
    PolicyWritten(oneshot::Sender<Settled>),
    /// A signal: stop.
    Stop(&'static str),
}

/// Whether the loop goes on after a step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flow {
    Continue,
    Stop,
}

/// What the agent publishes: the status report, the snapshot the audit
/// reader names events with, and the audit reader's counts.
#[derive(Clone, Default)]
pub struct Shared {
    pub status: SharedStatus,
    pub snapshot: SharedSnapshot,
    pub stats: Arc<AuditStats>,
}

/// How often the kernel state is compared with the agent's (`guard`).
const SELF_CHECK_EVERY: Duration = Duration::from_secs(1);

/// How often the workloads' processes are searched for sockets created
/// outside the root.
const FOREIGN_SOCKETS_EVERY: Duration = Duration::from_secs(30);

/// How long a local pod may go without a cgroup before it is reported (the
/// runtime makes the cgroup before the pod has an address, so this only
/// covers the agent's own scan racing the API server's event).
const UNMATCHED_GRACE: Duration = Duration::from_secs(5);

/// After the source changed, how long it is re-read at the busy cadence.
const BUSY_FOR: Duration = Duration::from_secs(10);

/// Sockets the workloads use that were created outside the root.
struct ForeignSockets {
    root: PathBuf,
    last: Option<Instant>,
    seen: BTreeSet<crate::sockets::ForeignSocket>,
}

/// When the source is observed: at every wakeup (inotify, netlink, the API
/// server's watches) and every policy change; between them every `busy`
/// while something changed within `BUSY_FOR`, else every `idle`. Reading a
/// cgroup tree of 500 workloads costs about 20 ms of CPU, so a node at rest
/// reads it rarely (issue 23's idle CPU).
#[derive(Debug, Clone)]
pub struct Cadence {
    pub busy: Duration,
    pub idle: Duration,
    last: Option<Instant>,
    busy_until: Option<Instant>,
}

impl Cadence {
    pub fn new(busy: Duration, idle: Duration) -> Cadence {
        Cadence {
            busy,
            idle,
            last: None,
            busy_until: None,
        }
    }

    /// Observe on every round (the unit tests' agents).
    pub fn every_round() -> Cadence {
        Cadence::new(Duration::ZERO, Duration::ZERO)
    }

    fn due(&self, now: Instant) -> bool {
        let every = if self.busy_until.is_some_and(|t| now < t) {
            self.busy
        } else {
            self.idle
        };
        self.last.is_none_or(|l| now.duration_since(l) >= every)
    }

    fn changed(&mut self, now: Instant) {
        self.busy_until = Some(now + BUSY_FOR);
    }
}

/// The control loop's state over a datapath and a source.
pub struct Agent<D: Datapath, S: Source> {
    pub datapath: D,
    pub source: S,
    planner: Planner,
    reconciler: Reconciler,
    policies: Policies,
    shared: Shared,
    /// Workloads of the state last applied.
    known: BTreeMap<u64, Workload>,
    /// The inputs (and policy versions) last planned.
    last_inputs: Option<(Inputs, (u64, u64))>,
    /// The last plan changed nothing in the kernel: the same inputs again
    /// need no planning.
    steady: bool,
    waiting: Option<Vec<&'static str>>,
    last_check: Instant,
    foreign: Option<ForeignSockets>,
    /// Policy entries the kernel enforced when the agent started (adopted).
    adopted_entries: usize,
    cadence: Cadence,
    /// Local pods without a cgroup, since when.
    unmatched_since: BTreeMap<String, Instant>,
}

impl<D: Datapath, S: Source> Agent<D, S> {
    pub fn new(
        datapath: D,
        source: S,
        planner: Planner,
        policies: Policies,
        shared: Shared,
    ) -> Agent<D, S> {
        if let Ok(mut s) = shared.status.lock() {
            s.policy_list = policies::list(&policies.set);
        }
        Agent {
            datapath,
            source,
            planner,
            reconciler: Reconciler::default(),
            policies,
            shared,
            known: BTreeMap::new(),
            last_inputs: None,
            steady: false,
            waiting: None,
            last_check: Instant::now(),
            foreign: None,
            adopted_entries: 0,
            cadence: Cadence::every_round(),
            unmatched_since: BTreeMap::new(),
        }
    }

    /// How often the source is re-read between wakeups.
    pub fn set_cadence(&mut self, cadence: Cadence) {
        self.cadence = cadence;
    }

    /// The kernel enforced `entries` policy entries when the agent started
    /// (adopted pins): an empty policy directory does not replace them.
    pub fn adopted(&mut self, entries: usize) {
        self.adopted_entries = entries;
        self.policies
            .hold_if_source_empty(entries, &self.shared.status);
    }

    /// Look every few rounds for sockets from outside `root`.
    pub fn watch_foreign_sockets(&mut self, root: PathBuf) {
        self.foreign = Some(ForeignSockets {
            root,
            last: None,
            seen: BTreeSet::new(),
        });
    }

    /// A state was applied in full at least once.
    pub fn has_applied(&self) -> bool {
        self.reconciler.applied().is_some()
    }

    /// Acts on one event.
    pub fn step(&mut self, event: Event) -> Flow {
        match event {
            Event::Stop(why) => {
                info!("{why}: stopping");
                return Flow::Stop;
            }
            Event::Tick => self.round(false, false),
            Event::SourceChanged => self.round(false, true),
            Event::PolicyWritten(reply) => {
                self.round(true, false);
                let settled = self
                    .shared
                    .status
                    .lock()
                    .map(|s| s.settled())
                    .unwrap_or(Settled::Pending(0));
                // The writer may have given up waiting; nothing to do then.
                let _ = reply.send(settled);
            }
        }
        Flow::Continue
    }

    /// One round: self-check when due, policy files, the source when due
    /// (see [`Cadence`]), then plan and apply when anything changed.
    /// `written`: the agent itself just wrote the policy directory (read it
    /// without waiting for it to settle); `woken`: the source said it changed.
    fn round(&mut self, written: bool, woken: bool) {
        let now = Instant::now();
        if self.last_check.elapsed() >= SELF_CHECK_EVERY {
            self.last_check = now;
            self.self_check();
        }
        self.policies
            .refresh_files(now, written, &self.shared.status);
        self.note_view(self.source.view_problem());
        self.look_for_foreign_sockets(now);
        if self.policies.held_for_source {
            return;
        }
        let policy_changed = self
            .last_inputs
            .as_ref()
            .is_none_or(|(_, v)| *v != self.policies.version());
        if woken {
            self.cadence.changed(now);
        }
        // A local pod without a cgroup still in its grace is looked at again
        // soon, so it is reported on time.
        let unmatched_waiting = self
            .unmatched_since
            .values()
            .any(|since| now.duration_since(*since) < UNMATCHED_GRACE);
        let holding = !self.steady || self.planner.holding() || unmatched_waiting;
        if !(woken || written || policy_changed || holding || self.cadence.due(now)) {
            self.refresh_counters();
            return;
        }
        self.cadence.last = Some(now);
        let input = match self.source.observe() {
            Observed::Ready(input) => input,
            Observed::Waiting(kinds) => {
                if self.waiting.as_ref() != Some(&kinds) {
                    info!(waiting = %kinds.join(", "), "waiting for the first list from the API server");
                    self.waiting = Some(kinds);
                }
                return;
            }
            Observed::Failed(e) => {
                warn!("{e}");
                return;
            }
        };
        self.policies.merge(&self.source, &self.shared.status);
        self.note_unmatched(&input.local_without_cgroup, now);
        // Planning is pure: the inputs of the last round again, after a
        // round whose plan changed nothing, give that plan again. Skipping
        // it keeps an idle agent with a large policy idle.
        let version = self.policies.version();
        // Remote workloads and Services come as changes, consumed by the plan.
        let same = input.remote.is_empty()
            && input.services.is_empty()
            && self
                .last_inputs
                .as_ref()
                .is_some_and(|(i, v)| *i == input && *v == version);
        if same && self.steady && !self.planner.holding() {
            self.refresh_counters();
            return;
        }
        if !same {
            self.cadence.changed(now);
            self.last_inputs = Some((input.clone(), version));
        }
        let obs = self.planner.plan(input, &self.policies.set);
        self.refresh_counters();
        let first = !self.has_applied();
        let outcome = self.reconciler.reconcile(&mut self.datapath, &obs.desired);
        self.steady = matches!(outcome, Outcome::Unchanged | Outcome::StillRefused);
        self.record(outcome, obs, first);
    }

    /// Whether the source's view is current, into the status; said once
    /// when it turns stale and once when it is current again. A stale view
    /// does not make the node not ready: the kernel goes on enforcing the
    /// last view, and an API server that comes and goes must not take every
    /// node out of service at once.
    fn note_view(&self, problem: Option<String>) {
        let Ok(mut s) = self.shared.status.lock() else {
            return;
        };
        match (&s.cluster_view_problem, &problem) {
            (None, Some(p)) => warn!("{p}"),
            (Some(_), None) => info!("the API server answers again; the cluster view is current"),
            _ => {}
        }
        s.cluster_view_problem = problem;
    }

    /// Local pods without a cgroup for longer than [`UNMATCHED_GRACE`]
    /// into the status (not ready while there are any), each said once.
    fn note_unmatched(&mut self, pods: &[String], now: Instant) {
        self.unmatched_since.retain(|k, _| pods.contains(k));
        for p in pods {
            self.unmatched_since.entry(p.clone()).or_insert(now);
        }
        let due: Vec<String> = self
            .unmatched_since
            .iter()
            .filter(|(_, since)| now.duration_since(**since) >= UNMATCHED_GRACE)
            .map(|(k, _)| k.clone())
            .collect();
        let Ok(mut s) = self.shared.status.lock() else {
            return;
        };
        if s.unmatched_local_pods == due {
            return;
        }
        for p in due.iter().filter(|p| !s.unmatched_local_pods.contains(p)) {
            warn!(pod = %crate::text::escape(p), "a pod on this node has no cgroup under the root: its traffic is not enforced (not ready)");
        }
        s.unmatched_local_pods = due;
        s.update_ready();
    }

    /// Counters and map fill into the status.
    fn refresh_counters(&self) {
        if let Ok(mut s) = self.shared.status.lock() {
            // Delivered first: every event delivered was emitted before
            // the counters are read, so one report never shows more
            // delivered than emitted.
            let delivered = self
                .shared
                .stats
                .delivered
                .load(std::sync::atomic::Ordering::Acquire);
            if let Ok(c) = self.datapath.counters() {
                s.counters = c;
                s.events_delivered = delivered;
            }
            s.maps = self.datapath.fill();
        }
    }

    /// One self-check: repairs logged, unrepaired mismatches make the agent
    /// not ready until they are gone.
    fn self_check(&mut self) {
        let health = self.datapath.verify();
        for r in &health.repaired {
            warn!("self-check repaired: {r}");
        }
        if let Ok(mut s) = self.shared.status.lock() {
            if s.enforcement_problems != health.problems {
                for p in &health.problems {
                    warn!("self-check: enforcement does not match (not ready): {p}");
                }
                if health.problems.is_empty() {
                    info!("self-check: enforcement matches the agent's state again");
                }
            }
            s.enforcement_problems = health.problems;
            s.repairs = self.datapath.repairs();
            s.update_ready();
        }
    }

    /// What a reconcile did, into the status and the log.
    fn record(&mut self, outcome: Outcome, obs: Observation, first: bool) {
        if let Ok(mut s) = self.shared.status.lock() {
            match &outcome {
                Outcome::Unchanged | Outcome::Applied(_) => {
                    s.policy_revision_applied = s.policy_revision_loaded;
                    s.behind = None;
                    s.update_ready();
                }
                Outcome::Refused(_) => s.policy_revision_refused = s.policy_revision_loaded,
                _ => {}
            }
        }
        match outcome {
            Outcome::Unchanged | Outcome::StillRefused => {}
            Outcome::Applied(report) => self.applied(report, obs, first),
            Outcome::Refused(e) => self.refused(&e, first),
            Outcome::Partial(e) => {
                warn!("applying the new state failed part way; applying it again next round: {e}");
                self.failed(
                    &e,
                    Some(format!(
                        "the kernel is part way to the planned state (retrying): {e}"
                    )),
                );
            }
        }
    }

    fn refused(&mut self, e: &ApplyError, first: bool) {
        if first {
            warn!(
                "the first state cannot be applied; not ready until it can ({}): {e}",
                if self.adopted_entries > 0 {
                    "the adopted pinned tables stay in force"
                } else {
                    "no policy is enforced"
                }
            );
            self.failed(e, None);
        } else {
            warn!(
                "applying the new state failed, the previous state stays in force (not ready until a state applies): {e}"
            );
            self.failed(
                e,
                Some(format!(
                    "the planned state was refused; the previous one stays in force: {e}"
                )),
            );
        }
    }

    fn failed(&mut self, e: &ApplyError, behind: Option<String>) {
        if let Ok(mut s) = self.shared.status.lock() {
            s.apply_errors += 1;
            s.last_error = Some(e.to_string());
            if behind.is_some() {
                s.behind = behind;
            }
            s.update_ready();
        }
    }

    /// A new state is in the kernel: log what changed, publish the
    /// snapshot and the status.
    fn applied(&mut self, report: ApplyReport, obs: Observation, first: bool) {
        let now_known: BTreeMap<u64, Workload> = obs
            .workloads
            .iter()
            .map(|w| (w.cgroup_id, w.clone()))
            .collect();
        log_workload_changes(&self.known, &now_known, &obs.desired);
        if first {
            info!(
                workloads = now_known.len(),
                identities = obs.identities.len(),
                policies = self.policies.set.policies.len(),
                entries = report.policy_entries,
                "palisade is enforcing"
            );
        }
        let workload_list = workload_list(&now_known, &obs.desired);
        if let Ok(mut guard) = self.shared.snapshot.write() {
            *guard = Arc::new(Snapshot {
                identities: obs.identities.clone(),
                workloads: now_known.clone(),
                policy: obs.desired.policy.clone(),
                services: obs.desired.services.clone(),
            });
        }
        if let Ok(mut s) = self.shared.status.lock() {
            s.applied = true;
            s.last_error = None;
            s.update_ready();
            s.generation += 1;
            s.workloads = now_known.len();
            s.workload_list = workload_list;
            s.identities = obs.identities.len();
            s.policies = self.policies.set.policies.len();
            s.maps = self.datapath.fill();
        }
        self.known = now_known;
    }

    /// Every few rounds: sockets the workloads use that were created
    /// outside the root (no hook judges them); each new one is logged, all
    /// are in the status.
    fn look_for_foreign_sockets(&mut self, now: Instant) {
        let (Some(f), Some(desired)) = (self.foreign.as_mut(), self.reconciler.applied()) else {
            return;
        };
        if f.last
            .is_some_and(|l| now.duration_since(l) < FOREIGN_SOCKETS_EVERY)
        {
            return;
        }
        f.last = Some(now);
        let processes: Vec<(String, u32)> = self
            .known
            .values()
            .flat_map(|w| {
                let name = format!("{}/{}", w.namespace, w.name);
                crate::sockets::pids(&f.root.join(&w.cgroup_path))
                    .into_iter()
                    .map(move |pid| (name.clone(), pid))
            })
            .collect();
        let managed: BTreeSet<u64> = desired.cgroups.keys().copied().collect();
        let found: BTreeSet<_> = crate::sockets::find_foreign(&processes, &managed)
            .into_iter()
            .collect();
        for s in found.difference(&f.seen) {
            warn!(
                workload = %crate::text::escape(&s.workload),
                pid = s.pid,
                socket_inode = s.inode,
                socket_cgroup = s.cgroup_id,
                protocol = s.protocol,
                "a workload uses a socket created outside the cgroup root: its traffic is not judged (close it, or create it inside the workload)"
            );
        }
        if let Ok(mut s) = self.shared.status.lock() {
            s.foreign_sockets = found.iter().cloned().collect();
        }
        f.seen = found;
    }
}

fn log_workload_changes(
    known: &BTreeMap<u64, Workload>,
    now: &BTreeMap<u64, Workload>,
    desired: &Desired,
) {
    let name =
        |w: &Workload| crate::text::escape(&format!("{}/{}", w.namespace, w.name)).into_owned();
    for (id, w) in now {
        if known.get(id) != Some(w) {
            info!(workload = %name(w), cgroup = %crate::text::escape(&w.cgroup_path),
                  identity = desired.cgroups.get(id).copied().unwrap_or_default(),
                  addresses = %describe_ips(&w.ips), "workload enforced");
        }
    }
    for (id, w) in known {
        if !now.contains_key(id) {
            info!(workload = %name(w), "workload gone");
        }
    }
}

fn workload_list(known: &BTreeMap<u64, Workload>, desired: &Desired) -> Vec<WorkloadStatus> {
    known
        .values()
        .map(|w| WorkloadStatus {
            name: format!("{}/{}", w.namespace, w.name),
            cgroup: w.cgroup_path.clone(),
            identity: desired
                .cgroups
                .get(&w.cgroup_id)
                .copied()
                .unwrap_or_default(),
            addresses: w.ips.iter().map(ToString::to_string).collect(),
        })
        .collect()
}

fn describe_ips(ips: &[IpAddr]) -> String {
    if ips.is_empty() {
        "no address yet".into()
    } else {
        ips.iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// Where workloads and policy come from.
#[derive(Clone, Debug)]
pub enum Mode {
    /// cgroup path rules and policy files from the config.
    Host,
    /// Pods, namespaces and policy objects from the Kubernetes API server.
    Kubernetes {
        /// A kubeconfig file; `None`: in-cluster (service account), else the default kubeconfig.
        kubeconfig: Option<PathBuf>,
        /// This node's name (`spec.nodeName` of its pods).
        node_name: String,
    },
}

/// The cgroup root and the cgroup2 mount it lies in: configured, or in
/// Kubernetes mode kubelet's (`kubepods.slice` for the systemd cgroup driver,
/// `kubepods` for cgroupfs) under any cgroup2 mount.
fn cgroup_root(config: &Config, mode: &Mode) -> anyhow::Result<(PathBuf, PathBuf)> {
    let mounts = discovery::cgroup2_mounts()?;
    match (&config.cgroup_root, mode) {
        (Some(root), _) => {
            let mount = mounts
                .iter()
                .find(|m| root.is_absolute() && root.starts_with(m))
                .unwrap_or(&mounts[0]);
            Ok((discovery::resolve_root(mount, root)?, mount.clone()))
        }
        (None, Mode::Kubernetes { .. }) => mounts
            .iter()
            .flat_map(|m| ["kubepods.slice", "kubepods"].map(|d| (m.join(d), m.clone())))
            .find(|(p, _)| p.is_dir())
            .with_context(|| {
                format!(
                    "no kubepods.slice (kubelet's systemd cgroup driver) or kubepods (cgroupfs driver) under the cgroup2 mounts {}: mount the host's cgroup tree or set cgroupRoot in the config",
                    mounts.iter().map(|m| m.display().to_string()).collect::<Vec<_>>().join(", ")
                )
            }),
        (None, Mode::Host) => anyhow::bail!(
            "cgroupRoot is not set in the config: name the cgroup under which workloads live (or run with --kubernetes)"
        ),
    }
}

/// The cgroup root (created on a plain host when missing) and its mount;
/// the policy directory checked.
fn prepare_root(config: &Config, mode: &Mode) -> anyhow::Result<(PathBuf, PathBuf)> {
    let (root, mount) = cgroup_root(config, mode)?;
    if !root.is_dir() && matches!(mode, Mode::Host) && root.starts_with(&mount) {
        // On a plain host the root is Palisade's to name: an empty cgroup
        // whose workloads come later (e.g. systemd units with Slice=).
        std::fs::create_dir_all(&root)
            .with_context(|| format!("creating the cgroup root {}", root.display()))?;
        info!(root = %root.display(), "created the cgroup root (it did not exist); workloads go below it");
    }
    if !root.is_dir() {
        anyhow::bail!(
            "cgroup root {} does not exist: create it (mkdir) or fix cgroupRoot in the config",
            root.display()
        );
    }
    if root == mount {
        warn!(root = %root.display(), "cgroupRoot is the machine's root cgroup: every process on the host is subject to policy");
    }
    if let Some(dir) = config.policy_dir.as_deref().filter(|d| !d.is_dir()) {
        anyhow::bail!(
            "policyDir {} does not exist or is not a directory (a dangling symlink, an unmounted volume?): create it with the policy files, or fix policyDir in the config",
            dir.display()
        );
    }
    Ok((root, mount))
}

/// The kernel side, loaded (or adopted from pins) and the agent's own
/// cgroup exempt; the pin lock held for as long as this lives.
struct Node<D> {
    datapath: D,
    pins: Option<crate::datapath::kernel::Pins>,
    _pin_lock: Option<crate::datapath::kernel::PinLock>,
}

fn start_datapath(
    config: &Config,
    root: &Path,
    own_cgroup: Option<&discovery::Cgroup>,
) -> anyhow::Result<Node<KernelDatapath>> {
    let pins = config
        .bpf_pin_dir
        .clone()
        .map(|dir| crate::datapath::kernel::Pins { dir });
    // One owner of the pinned state, before anything is adopted or replaced.
    let pin_lock = pins.as_ref().map(|p| p.lock()).transpose()?;
    crate::datapath::kernel::probe_kernel().context("probing the kernel")?;
    info!(kernel = %crate::datapath::kernel::kernel_release(), "kernel has what Palisade needs");
    let ring_bytes = config.maps.audit_ring_bytes;
    let mut datapath = KernelDatapath::load(root, &config.maps, ring_bytes / 8, pins.as_ref())
        .context("starting the datapath")?;
    for point in datapath.attach_points() {
        info!(attach = %point, "attached");
    }
    if let Some(own) = own_cgroup {
        // Before any connection: the programs (adopted ones already) would
        // hold an unknown cgroup under the root, the agent's own among them.
        datapath
            .exempt(own.id, reserved::HOST)
            .context("exempting the agent's own cgroup")?;
        info!(cgroup = %own.rel_path, "the agent runs under the cgroup root (as a pod): its own traffic is the node's (reserved:host)");
    }
    for gap in &datapath.posture().gaps {
        warn!("protection missing: {gap}");
    }
    Ok(Node {
        datapath,
        pins,
        _pin_lock: pin_lock,
    })
}

/// The control socket and the HTTP server, each a task.
struct Servers {
    control: Option<tokio::task::JoinHandle<()>>,
    http: Option<tokio::task::JoinHandle<()>>,
    control_socket: Option<PathBuf>,
}

async fn start_servers(
    config: &Config,
    status: &SharedStatus,
    events: &tokio::sync::broadcast::Sender<Arc<audit::AuditRecord>>,
    written: tokio::sync::mpsc::Sender<crate::control::PolicyWritten>,
) -> anyhow::Result<Servers> {
    let control = match &config.control_socket {
        Some(path) => {
            let listener = crate::control::bind(path)
                .with_context(|| format!("binding controlSocket {}", path.display()))?;
            info!(socket = %path.display(), "control socket ready (root only)");
            Some(tokio::spawn(crate::control::serve(
                listener,
                crate::control::Context {
                    status: status.clone(),
                    events: events.clone(),
                    policy_dir: config.policy_dir.clone(),
                    written: Some(written),
                },
            )))
        }
        None => None,
    };
    let http = match config.http_address {
        Some(addr) => {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding httpAddress {addr}"))?;
            info!(address = %addr, "serving /healthz, /readyz and /metrics");
            Some(tokio::spawn(crate::http::serve(listener, status.clone())))
        }
        None => None,
    };
    Ok(Servers {
        control,
        http,
        control_socket: config.control_socket.clone(),
    })
}

impl Servers {
    fn stop(self) {
        if let Some(h) = self.http {
            h.abort();
        }
        if let Some(c) = self.control {
            c.abort();
            if let Some(path) = &self.control_socket {
                let _ = std::fs::remove_file(path);
            }
        }
    }
}

/// The audit reader, started once the first state is applied so that
/// events the kernel buffered while no agent ran are named with this
/// agent's snapshot.
struct Reader<E> {
    parts: Option<(E, audit::Sink, tokio::sync::watch::Receiver<bool>)>,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
    stop: tokio::sync::watch::Sender<bool>,
    events: tokio::sync::broadcast::Sender<Arc<audit::AuditRecord>>,
}

impl<E: crate::datapath::EventSource> Reader<E> {
    fn start_if_due<D: Datapath, S: Source>(&mut self, agent: &Agent<D, S>) {
        if !agent.has_applied() {
            return;
        }
        if let Some((ring, sink, stop_rx)) = self.parts.take() {
            self.task = Some(tokio::spawn(audit::run_reader(
                ring,
                agent.shared.snapshot.clone(),
                sink,
                agent.shared.stats.clone(),
                self.events.clone(),
                stop_rx,
            )));
        }
    }

    async fn stop(self) {
        let _ = self.stop.send(true);
        if let Some(task) = self.task {
            match task.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => warn!("audit reader: {e:#}"),
                Err(e) => warn!("audit reader task: {e}"),
            }
        }
    }
}

/// Runs the agent until SIGINT or SIGTERM.
pub async fn run(config: Config, mode: Mode) -> anyhow::Result<()> {
    let (root, mount) = prepare_root(&config, &mode)?;
    let policies = Policies::load(
        config.policy_dir.clone(),
        Duration::from_millis(config.policy_settle_ms),
    )
    .map_err(|e| anyhow::anyhow!("{e}"))
    .context("policy is invalid; nothing was loaded")?;
    info!(
        files = policies.set.files.len(),
        policies = policies.set.policies.len(),
        "policy loaded"
    );
    // The client is made (and its configuration checked) here; the
    // watchers connect only once the agent's own cgroup is exempt.
    let client = match &mode {
        Mode::Host => None,
        Mode::Kubernetes { kubeconfig, .. } => {
            Some(crate::kubernetes::client(kubeconfig.as_deref()).await?)
        }
    };
    let classifier = match &mode {
        Mode::Host => Some(Classifier::new(&config.workloads).map_err(|m| anyhow::anyhow!(m))?),
        Mode::Kubernetes { .. } => None,
    };
    let own_cgroup = discovery::own_cgroup(&root, &mount);
    let node = start_datapath(&config, &root, own_cgroup.as_ref())?;
    let mut planner = Planner::new(config.clone(), matches!(mode, Mode::Kubernetes { .. }));
    if let Some(own) = &own_cgroup {
        planner.exempt(own.id);
    }
    let (cgroups, nets) = node.datapath.adopted_identities();
    planner.hint(cgroups, nets);
    match (mode, client, classifier) {
        (Mode::Kubernetes { node_name, .. }, Some(client), _) => {
            info!(node = %node_name, root = %root.display(), "Kubernetes mode: watching pods, namespaces, NetworkPolicies and Palisade policies");
            let address_wakeup = address_wakeup();
            let source = KubernetesSource {
                cluster: Box::new(crate::kubernetes::Cluster::start(client)),
                node: node_name,
                root: root.clone(),
                config: config.clone(),
                watch: cgroup_watch(),
                node_addresses: crate::netlink::NodeAddresses::new(address_wakeup.clone()),
                address_wakeup,
                pods: Default::default(),
                services: Default::default(),
            };
            drive(config, node, root, source, planner, policies).await
        }
        (_, _, Some(classifier)) => {
            let address_wakeup = address_wakeup();
            let source = HostSource {
                root: root.clone(),
                classifier,
                config: config.clone(),
                addresses: crate::netlink::AddressBook::new(address_wakeup.clone()),
                node_addresses: crate::netlink::NodeAddresses::new(address_wakeup.clone()),
                watch: cgroup_watch(),
                address_wakeup,
                sent_services: Default::default(),
            };
            drive(config, node, root, source, planner, policies).await
        }
        _ => anyhow::bail!("internal: no workload source for this mode"),
    }
}

/// The address sockets' wakeup; without it address changes are seen at
/// the next rescan only.
fn address_wakeup() -> Option<crate::netlink::AddressWakeup> {
    crate::netlink::AddressWakeup::new()
        .inspect_err(|e| {
            warn!("no epoll set for address changes ({e}): they are seen at the next rescan only")
        })
        .ok()
}

/// The cgroup tree's change notifications; without them (no inotify
/// instance left) the agent rescans on its interval only.
fn cgroup_watch() -> Option<crate::cgroupwatch::CgroupWatch> {
    crate::cgroupwatch::CgroupWatch::new()
        .inspect_err(|e| {
            warn!("no inotify for the cgroup tree ({e}): changes are seen at the next rescan only")
        })
        .ok()
}

/// Opens the outputs, starts the servers and turns signals, ticks, watch
/// changes and control requests into events until a stop.
async fn drive<D: Datapath, S: Source>(
    config: Config,
    mut node: Node<D>,
    root: PathBuf,
    source: S,
    planner: Planner,
    policies: Policies,
) -> anyhow::Result<()> {
    let sink = audit::Sink::open(&config.audit.output)
        .with_context(|| format!("opening audit output {}", config.audit.output))?;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let (events_tx, _) = tokio::sync::broadcast::channel(4096);
    let mut reader = Reader {
        parts: Some((node.datapath.take_events()?, sink, stop_rx)),
        task: None,
        stop: stop_tx,
        events: events_tx.clone(),
    };
    let shared = Shared::default();
    if let Ok(mut s) = shared.status.lock() {
        s.version = env!("CARGO_PKG_VERSION").to_owned();
        s.attach_points = node.datapath.attach_points().to_vec();
        s.posture = node.datapath.posture().clone();
        s.adoption = node.datapath.adoption().clone();
    }
    let (written_tx, mut written_rx) = tokio::sync::mpsc::channel(16);
    let servers = start_servers(&config, &shared.status, &events_tx, written_tx).await?;
    let adopted = node.datapath.active_entries();
    let pins = node.pins.take();
    let lock = node._pin_lock.take();
    let mut agent = Agent::new(node.datapath, source, planner, policies, shared);
    agent.adopted(adopted);
    agent.watch_foreign_sockets(root);
    agent.set_cadence(Cadence::new(
        Duration::from_millis(config.rescan_interval_ms),
        Duration::from_millis(config.idle_rescan_interval_ms),
    ));
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut ticker = tokio::time::interval(Duration::from_millis(config.rescan_interval_ms));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let event = tokio::select! {
            _ = tokio::signal::ctrl_c() => Event::Stop("SIGINT"),
            _ = sigterm.recv() => Event::Stop("SIGTERM"),
            _ = ticker.tick() => Event::Tick,
            _ = agent.source.changed() => Event::SourceChanged,
            Some(w) = written_rx.recv() => Event::PolicyWritten(w.reply),
        };
        if agent.step(event) == Flow::Stop {
            break;
        }
        reader.start_if_due(&agent);
    }
    reader.stop().await;
    let delivered = agent
        .shared
        .stats
        .delivered
        .load(std::sync::atomic::Ordering::Relaxed);
    if let Ok(c) = agent.datapath.counters() {
        info!(
            egress_allow = c.egress_allow,
            egress_deny = c.egress_deny,
            ingress_allow = c.ingress_allow,
            ingress_deny = c.ingress_deny,
            events_emitted = c.events_emitted,
            events_lost = c.events_lost,
            events_delivered = delivered,
            "final counters"
        );
    }
    servers.stop();
    drop(agent);
    drop(lock);
    match &pins {
        Some(p) => {
            info!(pins = %p.dir.display(), "stopped; the programs stay attached and enforcing (pinned): `palisade cleanup` removes them")
        }
        None => info!("programs detached; stopped"),
    }
    Ok(())
}

#[cfg(test)]
mod tests;
