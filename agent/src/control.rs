//! The local control socket (Unix, mode 0600, peer must be root or the
//! agent's own user) and its protocol: one JSON request line, JSON response
//! lines. The CLI (`palisade status`, `policy apply|list|delete`, `audit
//! --follow`, `workloads`) is its client.
use std::{
    io::{BufRead as _, BufReader, Write as _},
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _};

use crate::{
    audit::AuditRecord,
    policy,
    status::{Settled, SharedStatus, StatusReport},
};

pub use crate::config::DEFAULT_CONTROL_SOCKET as DEFAULT_SOCKET;

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "kebab-case")]
pub enum Request {
    Status,
    Workloads,
    PolicyList,
    PolicyApply {
        files: Vec<PolicyFile>,
        /// How long to wait for the kernel to enforce the change.
        #[serde(default = "default_timeout_ms")]
        timeout_ms: u64,
    },
    PolicyDelete {
        name: String,
        #[serde(default = "default_timeout_ms")]
        timeout_ms: u64,
    },
    AuditFollow {
        workload: Option<String>,
        verdict: Option<String>,
    },
}

pub const DEFAULT_TIMEOUT_MS: u64 = 30_000;

/// A client's timeout, at most an hour (an absurd one must not overflow the deadline).
fn bounded(timeout_ms: u64) -> Duration {
    Duration::from_millis(timeout_ms.min(3_600_000))
}

fn default_timeout_ms() -> u64 {
    DEFAULT_TIMEOUT_MS
}

#[derive(Debug, Serialize, Deserialize)]
pub struct PolicyFile {
    pub name: String,
    pub content: String,
}

/// One response line: `{"ok": …}` or `{"error": "…"}`. `T` is what the
/// request answers: [`StatusReport`] for `status`, the workload or policy
/// list, [`PolicyChange`] for apply/delete, an [`AuditRecord`] per line of
/// `audit-follow`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Response<T> {
    Ok(T),
    Error(String),
}

/// The answer to `policy-apply` and `policy-delete`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct PolicyChange {
    /// The policy generation in force.
    pub generation: u64,
    /// Written, but the kernel did not enforce it within the timeout.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub pending: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// What the server needs besides the status.
#[derive(Clone)]
pub struct Context {
    pub status: SharedStatus,
    pub events: tokio::sync::broadcast::Sender<Arc<AuditRecord>>,
    pub policy_dir: Option<PathBuf>,
    /// Tells the loop the policy directory was written.
    pub written: Option<tokio::sync::mpsc::Sender<PolicyWritten>>,
}

/// Binds the socket: parent directory created 0700, socket 0600, a stale
/// socket from a previous run replaced.
pub fn bind(path: &Path) -> std::io::Result<tokio::net::UnixListener> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    if path.exists() {
        std::fs::remove_file(path)?;
    }
    let listener = tokio::net::UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

pub async fn serve(listener: tokio::net::UnixListener, cx: Context) {
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let allowed = stream
            .peer_cred()
            .is_ok_and(|c| c.uid() == 0 || c.uid() == me);
        let cx = cx.clone();
        tokio::spawn(async move {
            let (read, mut write) = stream.into_split();
            if !allowed {
                let _ = send(
                    &mut write,
                    &Response::<()>::Error(
                        "permission denied: the control socket is for root".into(),
                    ),
                )
                .await;
                return;
            }
            let mut line = String::new();
            let mut reader = tokio::io::BufReader::new(read.take(16 * 1024 * 1024));
            if reader.read_line(&mut line).await.is_err() {
                return;
            }
            let request: Request = match serde_json::from_str(&line) {
                Ok(r) => r,
                Err(e) => {
                    let _ = send(
                        &mut write,
                        &Response::<()>::Error(format!("bad request: {e}")),
                    )
                    .await;
                    return;
                }
            };
            let _ = handle(request, &cx, &mut write).await;
        });
    }
}

async fn send<T: Serialize>(
    w: &mut tokio::net::unix::OwnedWriteHalf,
    r: &Response<T>,
) -> std::io::Result<()> {
    let mut line = serde_json::to_string(r).unwrap_or_else(|_| "{\"error\":\"encoding\"}".into());
    line.push('\n');
    w.write_all(line.as_bytes()).await
}

/// One copy of the report: the counters and the delivered count were read together.
fn report(cx: &Context) -> StatusReport {
    cx.status.lock().map(|s| s.clone()).unwrap_or_default()
}

async fn handle(
    request: Request,
    cx: &Context,
    w: &mut tokio::net::unix::OwnedWriteHalf,
) -> std::io::Result<()> {
    match request {
        Request::Status => send(w, &Response::Ok(report(cx))).await,
        Request::Workloads => send(w, &Response::Ok(report(cx).workload_list)).await,
        Request::PolicyList => send(w, &Response::Ok(report(cx).policy_list)).await,
        Request::PolicyApply { files, timeout_ms } => {
            let r = apply(cx, files, bounded(timeout_ms)).await;
            send(w, &r).await
        }
        Request::PolicyDelete { name, timeout_ms } => {
            let r = delete(cx, &name, bounded(timeout_ms)).await;
            send(w, &r).await
        }
        Request::AuditFollow { workload, verdict } => {
            let mut rx = cx.events.subscribe();
            loop {
                match rx.recv().await {
                    Ok(ev) => {
                        let matches_workload = workload
                            .as_ref()
                            .is_none_or(|wl| ev.from == *wl || ev.to == *wl);
                        let matches_verdict = verdict.as_ref().is_none_or(|v| {
                            serde_json::to_value(ev.verdict).is_ok_and(|e| e == v.as_str())
                        });
                        if matches_workload && matches_verdict {
                            send(w, &Response::Ok((*ev).clone())).await?;
                        }
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                        send(
                            w,
                            &Response::<()>::Error(format!(
                                "follower too slow: {n} events skipped"
                            )),
                        )
                        .await?;
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return Ok(()),
                }
            }
        }
    }
}

fn revision(cx: &Context) -> u64 {
    cx.status
        .lock()
        .map(|s| s.policy_revision)
        .unwrap_or_default()
}

/// A client wrote the policy directory: the loop reads it at once and
/// answers how the change ended.
#[derive(Debug)]
pub struct PolicyWritten {
    pub reply: tokio::sync::oneshot::Sender<Settled>,
}

/// Waits until the agent read the directory after `before` and either the
/// kernel enforces what it read or the agent refused it: the loop is told
/// at once, and the status is watched until the deadline if its answer is
/// "not yet" (waiting for the API server, a busy round).
async fn settle(cx: &Context, before: u64, timeout: Duration) -> Settled {
    let deadline = tokio::time::Instant::now() + timeout;
    if timeout.is_zero() {
        // Not waiting: wake the loop (its answer is not read) and say pending.
        if let Some(written) = &cx.written {
            let (reply, _) = tokio::sync::oneshot::channel();
            let _ = written.try_send(PolicyWritten { reply });
        }
        let generation = cx.status.lock().map(|s| s.generation).unwrap_or_default();
        return Settled::Pending(generation);
    }
    if let Some(written) = &cx.written {
        let (reply, answer) = tokio::sync::oneshot::channel();
        if written.send(PolicyWritten { reply }).await.is_ok()
            && let Ok(Ok(settled)) = tokio::time::timeout_at(deadline, answer).await
            && !matches!(settled, Settled::Pending(_))
            // The answer is about this change only if the loop read it.
            && revision(cx) > before
        {
            return settled;
        }
    }
    loop {
        let s = report(cx);
        // Only a revision read after the write says how the write ended.
        let settled = s.settled();
        if s.policy_revision > before && !matches!(settled, Settled::Pending(_)) {
            return settled;
        }
        if tokio::time::Instant::now() >= deadline {
            return Settled::Pending(s.generation);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn pending(generation: u64, timeout: Duration) -> Response<PolicyChange> {
    Response::Ok(PolicyChange {
        generation,
        pending: true,
        note: Some(format!(
            "written, but the kernel did not enforce it within {} s (the agent may be waiting for the API server, or busy); `palisade status` shows when it does",
            timeout.as_secs_f64()
        )),
    })
}

fn applied(generation: u64) -> Response<PolicyChange> {
    Response::Ok(PolicyChange {
        generation,
        pending: false,
        note: None,
    })
}

/// Puts files back as they were (content, or absent).
fn restore(previous: &[(PathBuf, Option<Vec<u8>>)]) {
    for (path, content) in previous {
        let _ = match content {
            Some(c) => std::fs::write(path, c),
            None => std::fs::remove_file(path),
        };
    }
}

/// Validates the directory with the new files in place, all or nothing, then
/// writes them (temp file + rename each) for the watcher to apply.
async fn apply(cx: &Context, files: Vec<PolicyFile>, timeout: Duration) -> Response<PolicyChange> {
    let Some(dir) = cx.policy_dir.clone().filter(|d| d.is_dir()) else {
        return Response::Error(
            "the agent has no policy directory (policyDir) to apply into".into(),
        );
    };
    if files.is_empty() {
        return Response::Error("no policy files given".into());
    }
    let staging = match tempfile::tempdir() {
        Ok(d) => d,
        Err(e) => return Response::Error(format!("staging: {e}")),
    };
    let mut names = Vec::new();
    for f in &files {
        let base = Path::new(&f.name)
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if !(base.ends_with(".yaml") || base.ends_with(".yml")) {
            return Response::Error(format!("{}: policy files end in .yaml or .yml", f.name));
        }
        names.push(base);
    }
    // The directory as it would be: current files, replaced or added ones.
    if let Ok(rd) = std::fs::read_dir(&dir) {
        for e in rd.flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            if !names.contains(&n) && (n.ends_with(".yaml") || n.ends_with(".yml")) {
                let _ = std::fs::copy(e.path(), staging.path().join(&n));
            }
        }
    }
    for (f, base) in files.iter().zip(&names) {
        if let Err(e) = std::fs::write(staging.path().join(base), &f.content) {
            return Response::Error(format!("staging {base}: {e}"));
        }
    }
    if let Err(e) = policy::load_paths(&[staging.path().to_owned()]) {
        // Report against the names the user gave, not the staging directory.
        let text = e
            .to_string()
            .replace(&format!("{}/", staging.path().display()), "");
        return Response::Error(format!("nothing was applied:\n{text}"));
    }
    let before = revision(cx);
    let previous: Vec<(PathBuf, Option<Vec<u8>>)> = names
        .iter()
        .map(|b| (dir.join(b), std::fs::read(dir.join(b)).ok()))
        .collect();
    for (f, base) in files.iter().zip(&names) {
        let tmp = dir.join(format!(".{base}.tmp"));
        if let Err(e) =
            std::fs::write(&tmp, &f.content).and_then(|()| std::fs::rename(&tmp, dir.join(base)))
        {
            restore(&previous);
            return Response::Error(format!(
                "writing {base} into {}: {e}; nothing was left behind",
                dir.display()
            ));
        }
    }
    match settle(cx, before, timeout).await {
        Settled::Applied(generation) => applied(generation),
        Settled::Refused(why) => {
            // A refused push leaves nothing behind: a restart would
            // otherwise meet the same refusal.
            restore(&previous);
            Response::Error(format!(
                "the agent refused the change and it was taken out of {} again; the previous policy stays in force:\n{why}",
                dir.display()
            ))
        }
        Settled::Pending(generation) => pending(generation, timeout),
    }
}

/// Removes the file that holds policy `name` (`namespace/name`).
async fn delete(cx: &Context, name: &str, timeout: Duration) -> Response<PolicyChange> {
    let Some(dir) = cx.policy_dir.clone() else {
        return Response::Error("the agent has no policy directory (policyDir)".into());
    };
    let set = match policy::load_paths(std::slice::from_ref(&dir)) {
        Ok(s) => s,
        Err(e) => return Response::Error(format!("the policy directory is invalid:\n{e}")),
    };
    let Some(p) = set.policies.iter().find(|p| p.qualified_name() == name) else {
        let known: Vec<String> = set.policies.iter().map(|p| p.qualified_name()).collect();
        return Response::Error(format!("no policy {name:?}; known: {}", known.join(", ")));
    };
    let others = set
        .policies
        .iter()
        .filter(|q| q.origin.file == p.origin.file)
        .count();
    if others > 1 {
        return Response::Error(format!(
            "{name} shares {} with {} other policies: edit that file instead",
            p.origin.file,
            others - 1
        ));
    }
    let before = revision(cx);
    let content = std::fs::read(&p.origin.file).ok();
    if let Err(e) = std::fs::remove_file(&p.origin.file) {
        return Response::Error(format!("removing {}: {e}", p.origin.file));
    }
    let mut previous = vec![(PathBuf::from(&p.origin.file), content)];
    if set.files.len() == 1 {
        // The last policy file: an empty directory reads as a vanished
        // source (the agent keeps the last policy), so say "none" on purpose.
        let none = dir.join(NONE_FILE);
        let content = format!("{NONE_COMMENT}{}", policy::load::EMPTY_LIST);
        if let Err(e) = std::fs::write(&none, content) {
            restore(&previous);
            return Response::Error(format!("writing {}: {e}", none.display()));
        }
        previous.push((none, None));
    }
    match settle(cx, before, timeout).await {
        Settled::Applied(generation) => applied(generation),
        Settled::Refused(why) => {
            restore(&previous);
            Response::Error(format!(
                "the agent refused the change; {} was put back:\n{why}",
                p.origin.file
            ))
        }
        Settled::Pending(generation) => pending(generation, timeout),
    }
}

/// What `policy delete` leaves when it removes the last policy file.
pub const NONE_FILE: &str = "no-policies.yaml";
const NONE_COMMENT: &str = "# No policies: the last one was removed with `palisade policy delete`.\n# An empty policy directory is read as a vanished source, and an empty file\n# as one being written (the agent keeps the policy it had); this empty List\n# says \"no policies\" on purpose.\n";

/// Client side: sends `request`, calls `each` with every response line
/// read as `T` (what the request answers).
pub fn call<T: serde::de::DeserializeOwned>(
    socket: &Path,
    request: &Request,
    mut each: impl FnMut(Response<T>) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    use anyhow::Context as _;
    let mut stream = std::os::unix::net::UnixStream::connect(socket).with_context(|| {
        format!(
            "connecting to the agent at {} (is `palisade agent` running? as root?)",
            socket.display()
        )
    })?;
    let mut line = serde_json::to_string(request)?;
    line.push('\n');
    stream.write_all(line.as_bytes())?;
    let mut answered = false;
    for line in BufReader::new(stream).lines() {
        let line = line.context("reading the agent's answer")?;
        answered = true;
        each(serde_json::from_str(&line).with_context(|| format!("bad response: {line}"))?)?;
    }
    // A closed connection without an answer is the agent dying mid-request:
    // whatever was asked may or may not have happened.
    anyhow::ensure!(
        answered,
        "the agent at {} closed the connection without answering (did it stop or crash?); check `palisade status` and the agent's log",
        socket.display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_agent_that_closes_without_answering_is_an_error_not_silence() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.sock");
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        // An "agent" that reads the request and dies before answering.
        let server = std::thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            let mut line = String::new();
            let _ = BufReader::new(&stream).read_line(&mut line);
        });
        let mut calls = 0;
        let e = call(&path, &Request::Status, |_: Response<StatusReport>| {
            calls += 1;
            Ok(())
        })
        .unwrap_err();
        server.join().unwrap();
        assert_eq!(calls, 0);
        assert!(
            e.to_string()
                .contains("closed the connection without answering"),
            "{e}"
        );
    }
}
