//! The policy the agent enforces: the policy directory's files (reloaded
//! when they change, the last good set kept when a change is invalid or the
//! directory vanishes) merged with the source's own policy objects. Each
//! load is a revision in the status, so a writer can tell when its change
//! was applied or refused.
//!
//! A file is never read half-written: a change is read once the directory
//! has been left alone for the settle time (`policySettleMs`), and a read
//! counts only if nothing changed while it ran. A file that holds no YAML
//! document at all — what a truncation leaves — is refused by the loader;
//! "no policies" on purpose is an explicit empty `kind: List`.
use std::{
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    time::{Duration, Instant, SystemTime},
};

use tracing::{debug, info, warn};

use super::source::Source;
use crate::{
    policy::{self, PolicySet},
    status::{PolicyStatus, SharedStatus},
};

/// The policy files, the merged set and which versions it holds.
pub struct Policies {
    dir: Option<PathBuf>,
    files: PolicySet,
    file_version: u64,
    /// What the files in force were read from.
    fingerprint: Fingerprint,
    /// A change seen but not read yet: what it looked like and since when.
    pending: Option<(Fingerprint, Instant)>,
    /// How long the directory must be left alone before a change is read.
    settle: Duration,
    /// The files' policies and the source's, as of `version`.
    pub set: PolicySet,
    /// (file version, source policy epoch) that `set` holds.
    version: Option<(u64, u64)>,
    /// The last merge had refused source objects (their problems shown).
    had_problems: bool,
    /// Pinned policy in force and an empty policy directory (an unmounted
    /// volume looks like that): nothing is planned until the directory has
    /// policy files again.
    pub held_for_source: bool,
}

impl Policies {
    /// Loads the directory (all or nothing), once it has settled: a file
    /// being written when the agent starts is waited for (up to four settle
    /// times), never read half-way.
    pub fn load(dir: Option<PathBuf>, settle: Duration) -> Result<Policies, policy::LoadError> {
        let deadline = Instant::now() + settle * 4;
        let (files, fingerprint) = loop {
            let before = Fingerprint::of(dir.as_deref());
            if !before.quiet_for(settle) && Instant::now() < deadline {
                std::thread::sleep(settle / 4 + Duration::from_millis(1));
                continue;
            }
            let files = load_dir(dir.as_deref());
            if Fingerprint::of(dir.as_deref()) == before || Instant::now() >= deadline {
                break (files?, before);
            }
        };
        Ok(Policies {
            fingerprint,
            pending: None,
            settle,
            set: files.clone(),
            files,
            dir,
            file_version: 0,
            version: None,
            had_problems: false,
            held_for_source: false,
        })
    }

    /// The directory has no policy files while the adopted kernel state
    /// enforces `entries` policy entries: keep them, not ready, until it has.
    pub fn hold_if_source_empty(&mut self, entries: usize, status: &SharedStatus) {
        let Some(dir) = self.dir.as_deref() else {
            return;
        };
        if !self.files.files.is_empty() || entries == 0 {
            return;
        }
        self.held_for_source = true;
        let problem = format!(
            "the policy directory {} has no policy files, but the pinned state enforces {entries} policy entries: keeping them, not ready, until the directory has policy files (to enforce no policy, put a file holding an empty `kind: List` there)",
            dir.display()
        );
        warn!("{problem}");
        if let Ok(mut s) = status.lock() {
            s.policy_source_problem = Some(problem.clone());
            s.last_error = Some(problem);
            s.update_ready();
        }
    }

    /// Reloads the directory if its files changed and have settled;
    /// `at_once`: the agent itself wrote them (atomically, by rename), no
    /// settle time. A read during which anything changed is dropped and
    /// tried again once the directory settles.
    pub fn refresh_files(&mut self, now: Instant, at_once: bool, status: &SharedStatus) {
        let seen = Fingerprint::of(self.dir.as_deref());
        if seen == self.fingerprint {
            self.pending = None;
            return;
        }
        if !at_once && !self.settled(&seen, now) {
            return;
        }
        let read = self.read();
        let after = Fingerprint::of(self.dir.as_deref());
        if after != seen {
            debug!(
                "the policy directory changed while it was read; reading it again once it settles"
            );
            self.pending = Some((after, now));
            return;
        }
        self.pending = None;
        self.fingerprint = seen;
        if let Some(p) = self.record(read, status) {
            self.files = p;
            self.file_version += 1;
            self.held_for_source = false;
        }
    }

    /// Whether a change that looks like `seen` has settled: nothing in the
    /// directory changed for the settle time, by the files' own change
    /// times or (should the wall clock jump) by the agent's clock since it
    /// first saw the change.
    fn settled(&mut self, seen: &Fingerprint, now: Instant) -> bool {
        match &self.pending {
            Some((fp, since)) if fp == seen => {
                if now.duration_since(*since) >= self.settle {
                    return true;
                }
            }
            _ => {
                debug!("the policy directory changed; reading it once it has settled");
                self.pending = Some((seen.clone(), now));
            }
        }
        seen.quiet_for(self.settle)
    }

    /// Merges the source's policy objects in when they or the files changed
    /// since the last merge; `true` when the set changed.
    pub fn merge<S: Source>(&mut self, source: &S, status: &SharedStatus) -> bool {
        let version = (self.file_version, source.policy_epoch());
        if self.version == Some(version) {
            return false;
        }
        let (theirs, problems) = source.policies();
        self.set = PolicySet {
            policies: self
                .files
                .policies
                .iter()
                .cloned()
                .chain(theirs.into_iter().map(std::sync::Arc::new))
                .collect(),
            files: self.files.files.clone(),
        };
        self.version = Some(version);
        let had = std::mem::replace(&mut self.had_problems, !problems.is_empty());
        if let Ok(mut s) = status.lock() {
            s.refused_policy_objects.clone_from(&problems);
            if !problems.is_empty() || had {
                s.last_error = (!problems.is_empty()).then(|| problems.join("\n"));
            }
            s.policy_list = list(&self.set);
        }
        true
    }

    /// The versions the merged set holds.
    pub fn version(&self) -> (u64, u64) {
        self.version.unwrap_or_default()
    }

    /// Reads the policy directory: the new set, or why the previous policy
    /// stays (the problem, and whether the source itself vanished or turned
    /// empty — an unmounted volume, a dangling symlink — while it had
    /// policies).
    fn read(&self) -> Result<PolicySet, (String, bool)> {
        let Some(dir) = self.dir.as_deref() else {
            return Ok(PolicySet::default());
        };
        match source_gone(dir) {
            Some(problem) => Err((problem, true)),
            None => match load_dir(Some(dir)) {
                Ok(p) if p.files.is_empty() && !self.files.files.is_empty() => Err((
                    format!(
                        "the policy directory {} has no policy files any more (an empty or unmounted volume?)",
                        dir.display()
                    ),
                    true,
                )),
                Ok(p) => Ok(p),
                Err(e) => Err((e.to_string(), false)),
            },
        }
    }

    /// Records a read as a revision. `None`: the previous policy stays.
    fn record(
        &self,
        result: Result<PolicySet, (String, bool)>,
        status: &SharedStatus,
    ) -> Option<PolicySet> {
        let Ok(mut s) = status.lock() else {
            return result.ok();
        };
        s.policy_revision += 1;
        let revision = s.policy_revision;
        match result {
            Ok(p) => {
                info!(
                    policies = p.policies.len(),
                    files = p.files.len(),
                    "policy reloaded"
                );
                if s.policy_source_problem.take().is_some() {
                    info!("the policy directory is back; its policy is applied");
                }
                s.last_error = None;
                s.policy_revision_loaded = revision;
                Some(p)
            }
            Err((problem, source)) => {
                if source {
                    warn!(
                        "{problem}: the {} policies loaded before stay in force (to enforce no policy, leave a file holding an empty `kind: List` in it)",
                        self.files.policies.len()
                    );
                    s.policy_source_problem = Some(problem.clone());
                } else {
                    warn!("policy change rejected, the previous policy stays in force:\n{problem}");
                }
                s.apply_errors += 1;
                s.last_error = Some(problem);
                s.policy_revision_refused = revision;
                None
            }
        }
    }
}

/// Why the directory cannot be read at all, if it cannot.
fn source_gone(dir: &Path) -> Option<String> {
    if !dir.is_dir() {
        Some(format!(
            "the policy directory {} is missing or not a directory (a dangling symlink, an unmounted volume?)",
            dir.display()
        ))
    } else if let Err(e) = std::fs::read_dir(dir) {
        Some(format!(
            "the policy directory {} cannot be read: {e}",
            dir.display()
        ))
    } else {
        None
    }
}

/// The status's list of policies.
pub fn list(set: &PolicySet) -> Vec<PolicyStatus> {
    set.policies
        .iter()
        .map(|p| PolicyStatus {
            name: p.qualified_name(),
            kind: p.origin.kind.to_owned(),
            file: p.origin.file.clone(),
            line: p.origin.line,
        })
        .collect()
}

/// What one look at the policy directory saw: every policy file's identity,
/// size and times (through symlinks, and of the symlink itself: a ConfigMap
/// volume swaps a `..data` link), and the times of the directories that hold
/// them (a file renamed in or removed changes those). Equal before and after
/// a read: nothing changed while it ran.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Fingerprint(Vec<Stamp>);

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Stamp {
    path: PathBuf,
    dev: u64,
    ino: u64,
    len: u64,
    modified: (i64, i64),
    changed: (i64, i64),
    link_changed: (i64, i64),
}

impl Stamp {
    fn of(path: &Path) -> Option<Stamp> {
        let m = std::fs::metadata(path).ok()?;
        let link = std::fs::symlink_metadata(path).ok()?;
        Some(Stamp {
            path: path.to_owned(),
            dev: m.dev(),
            ino: m.ino(),
            len: m.len(),
            modified: (m.mtime(), m.mtime_nsec()),
            changed: (m.ctime(), m.ctime_nsec()),
            link_changed: (link.ctime(), link.ctime_nsec()),
        })
    }
}

impl Fingerprint {
    fn of(dir: Option<&Path>) -> Fingerprint {
        let Some(dir) = dir else {
            return Fingerprint::default();
        };
        let files = policy::load::policy_files(dir);
        let mut dirs: Vec<PathBuf> = std::iter::once(dir)
            .chain(files.iter().filter_map(|f| f.parent()))
            .map(Path::to_owned)
            .collect();
        dirs.sort();
        dirs.dedup();
        let mut out: Vec<Stamp> = dirs
            .into_iter()
            .chain(files)
            .filter_map(|p| Stamp::of(&p))
            .collect();
        out.sort();
        Fingerprint(out)
    }

    /// Nothing in it changed during the last `settle`, by the change times
    /// the kernel keeps (a time in the future counts as a change now).
    fn quiet_for(&self, settle: Duration) -> bool {
        let Some(newest) = self
            .0
            .iter()
            .flat_map(|s| [s.changed, s.link_changed, s.modified])
            .max()
        else {
            return true;
        };
        let newest = SystemTime::UNIX_EPOCH
            + Duration::new(
                u64::try_from(newest.0).unwrap_or(0),
                u32::try_from(newest.1).unwrap_or(0),
            );
        SystemTime::now()
            .duration_since(newest)
            .is_ok_and(|age| age >= settle)
    }
}

fn load_dir(dir: Option<&Path>) -> Result<PolicySet, policy::LoadError> {
    match dir {
        Some(dir) => policy::load_paths(&[dir.to_owned()]),
        None => Ok(PolicySet::default()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: &str = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: deny, namespace: prod}\nspec: {podSelector: {}, policyTypes: [Ingress]}\n";

    fn names(p: &Policies) -> Vec<String> {
        p.files
            .policies
            .iter()
            .map(|p| p.qualified_name())
            .collect()
    }

    fn setup(settle: Duration) -> (tempfile::TempDir, PathBuf, Policies, SharedStatus) {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("p.yaml");
        std::fs::write(&file, POLICY).unwrap();
        let policies = Policies::load(Some(dir.path().to_owned()), settle).unwrap();
        (dir, file, policies, SharedStatus::default())
    }

    #[test]
    fn a_file_being_rewritten_is_read_only_once_it_has_settled() {
        let settle = Duration::from_millis(300);
        let (_dir, file, mut policies, status) = setup(settle);
        assert_eq!(names(&policies), ["prod/deny"]);
        // Truncated: however often the agent looks while the writer pauses,
        // it reads nothing yet.
        let f = std::fs::File::create(&file).unwrap();
        let start = Instant::now();
        for _ in 0..5 {
            policies.refresh_files(Instant::now(), false, &status);
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(status.lock().unwrap().policy_revision, 0, "nothing read");
        assert_eq!(names(&policies), ["prod/deny"]);
        // Written; read once nothing has changed for the settle time.
        std::io::Write::write_all(&mut &f, POLICY.replace("deny", "other").as_bytes()).unwrap();
        drop(f);
        let written = Instant::now();
        while names(&policies) == ["prod/deny"] {
            assert!(start.elapsed() < Duration::from_secs(5), "never read");
            policies.refresh_files(Instant::now(), false, &status);
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(written.elapsed() >= settle - Duration::from_millis(10));
        assert_eq!(names(&policies), ["prod/other"]);
        assert_eq!(
            status.lock().unwrap().policy_revision,
            1,
            "read once, whole"
        );
    }

    #[test]
    fn the_agents_own_write_is_read_at_once() {
        let (_dir, file, mut policies, status) = setup(Duration::ZERO);
        policies.settle = Duration::from_secs(60);
        let tmp = file.with_file_name(".p.yaml.tmp");
        std::fs::write(&tmp, POLICY.replace("deny", "other")).unwrap();
        std::fs::rename(&tmp, &file).unwrap();
        policies.refresh_files(Instant::now(), false, &status);
        assert_eq!(names(&policies), ["prod/deny"], "an outside edit waits");
        policies.refresh_files(Instant::now(), true, &status);
        assert_eq!(names(&policies), ["prod/other"]);
    }

    #[test]
    fn an_emptied_file_keeps_the_policy_and_an_empty_list_removes_it() {
        let (_dir, file, mut policies, status) = setup(Duration::ZERO);
        for (text, what) in [("", "it is empty"), ("# all gone\n\n", "only comments")] {
            std::fs::write(&file, text).unwrap();
            policies.refresh_files(Instant::now(), false, &status);
            assert_eq!(
                names(&policies),
                ["prod/deny"],
                "{text:?} is not \"no policies\""
            );
            let error = status.lock().unwrap().last_error.clone().unwrap();
            assert!(
                error.contains("p.yaml:1:1")
                    && error.contains("holds no YAML document")
                    && error.contains(what),
                "{error}"
            );
        }
        std::fs::write(
            &file,
            format!("# none on purpose\n{}", policy::load::EMPTY_LIST),
        )
        .unwrap();
        policies.refresh_files(Instant::now(), false, &status);
        assert!(names(&policies).is_empty());
        assert_eq!(policies.files.files.len(), 1);
        assert!(status.lock().unwrap().last_error.is_none());
        // A List with items is not read (and says why).
        std::fs::write(&file, "apiVersion: v1\nkind: List\nitems:\n- {}\n").unwrap();
        policies.refresh_files(Instant::now(), false, &status);
        let error = status.lock().unwrap().last_error.clone().unwrap();
        assert!(
            error.contains("items") && error.contains("own YAML document"),
            "{error}"
        );
    }
}
