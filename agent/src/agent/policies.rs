//! The policy the agent enforces: the policy directory's files (reloaded
//! when they change, the last good set kept when a change is invalid or the
//! directory vanishes) merged with the source's own policy objects. Each
//! load is a revision in the status, so a writer can tell when its change
//! was applied or refused.
use std::{
    path::{Path, PathBuf},
    time::SystemTime,
};

use tracing::{info, warn};

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
    fingerprint: Vec<(PathBuf, Option<SystemTime>, u64)>,
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
    /// Loads the directory (all or nothing).
    pub fn load(dir: Option<PathBuf>) -> Result<Policies, policy::LoadError> {
        let files = load_dir(dir.as_deref())?;
        Ok(Policies {
            fingerprint: fingerprint(dir.as_deref()),
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
            "the policy directory {} has no policy files, but the pinned state enforces {entries} policy entries: keeping them, not ready, until the directory has policy files (to enforce no policy, put a file without policies there)",
            dir.display()
        );
        warn!("{problem}");
        if let Ok(mut s) = status.lock() {
            s.policy_source_problem = Some(problem.clone());
            s.last_error = Some(problem);
            s.update_ready();
        }
    }

    /// Reloads the directory if its files changed.
    pub fn refresh_files(&mut self, status: &SharedStatus) {
        let now = fingerprint(self.dir.as_deref());
        if now == self.fingerprint {
            return;
        }
        self.fingerprint = now;
        if let Some(p) = self.reload(status) {
            self.files = p;
            self.file_version += 1;
            self.held_for_source = false;
        }
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

    /// Reloads the policy directory after a change. `None`: the previous
    /// policy stays — the change is invalid, or the source vanished or
    /// turned empty (an unmounted volume, a dangling symlink) while it had
    /// policies.
    fn reload(&self, status: &SharedStatus) -> Option<PolicySet> {
        let revision = status
            .lock()
            .map(|mut s| {
                s.policy_revision += 1;
                s.policy_revision
            })
            .unwrap_or_default();
        let dir = self.dir.as_deref()?;
        let result = match source_gone(dir) {
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
        };
        let Ok(mut s) = status.lock() else {
            return result.ok();
        };
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
                        "{problem}: the {} policies loaded before stay in force (to enforce no policy, leave a policy file without policies in it)",
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

/// Size and modification time of every policy file: a cheap "did it change?".
fn fingerprint(dir: Option<&Path>) -> Vec<(PathBuf, Option<SystemTime>, u64)> {
    let Some(dir) = dir else { return Vec::new() };
    let mut out: Vec<_> = policy::load::policy_files(dir)
        .into_iter()
        .filter_map(|p| {
            let m = std::fs::metadata(&p).ok()?;
            Some((p, m.modified().ok(), m.len()))
        })
        .collect();
    out.sort();
    out
}

fn load_dir(dir: Option<&Path>) -> Result<PolicySet, policy::LoadError> {
    match dir {
        Some(dir) => policy::load_paths(&[dir.to_owned()]),
        None => Ok(PolicySet::default()),
    }
}
