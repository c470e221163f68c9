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

use crate::{audit::AuditStats, http::SharedStatus, policy};

pub const DEFAULT_SOCKET: &str = "/run/palisade/palisade.sock";

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "kebab-case")]
pub enum Request {
    Status,
    Workloads,
    PolicyList,
    PolicyApply {
        files: Vec<PolicyFile>,
    },
    PolicyDelete {
        name: String,
    },
    AuditFollow {
        workload: Option<String>,
        verdict: Option<String>,
    },
}

#[derive(Debug, Serialize, Deserialize)]
pub struct PolicyFile {
    pub name: String,
    pub content: String,
}

/// One response line: `{"ok": …}` or `{"error": "…"}`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Response {
    Ok(serde_json::Value),
    Error(String),
}

/// What the server needs besides the status.
#[derive(Clone)]
pub struct Context {
    pub status: SharedStatus,
    pub audit: Arc<AuditStats>,
    pub events: tokio::sync::broadcast::Sender<Arc<serde_json::Value>>,
    pub policy_dir: Option<PathBuf>,
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
                    &Response::Error("permission denied: the control socket is for root".into()),
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
                    let _ = send(&mut write, &Response::Error(format!("bad request: {e}"))).await;
                    return;
                }
            };
            let _ = handle(request, &cx, &mut write).await;
        });
    }
}

async fn send(w: &mut tokio::net::unix::OwnedWriteHalf, r: &Response) -> std::io::Result<()> {
    let mut line = serde_json::to_string(r).unwrap_or_else(|_| "{\"error\":\"encoding\"}".into());
    line.push('\n');
    w.write_all(line.as_bytes()).await
}

fn status_json(cx: &Context) -> serde_json::Value {
    let s = cx.status.lock().map(|s| s.clone()).unwrap_or_default();
    let mut v = serde_json::to_value(&s).unwrap_or_default();
    v["events_delivered"] = cx
        .audit
        .delivered
        .load(std::sync::atomic::Ordering::Relaxed)
        .into();
    v
}

async fn handle(
    request: Request,
    cx: &Context,
    w: &mut tokio::net::unix::OwnedWriteHalf,
) -> std::io::Result<()> {
    match request {
        Request::Status => send(w, &Response::Ok(status_json(cx))).await,
        Request::Workloads => {
            send(w, &Response::Ok(status_json(cx)["workload_list"].clone())).await
        }
        Request::PolicyList => send(w, &Response::Ok(status_json(cx)["policy_list"].clone())).await,
        Request::PolicyApply { files } => {
            let r = apply(cx, files).await;
            send(w, &r).await
        }
        Request::PolicyDelete { name } => {
            let r = delete(cx, &name).await;
            send(w, &r).await
        }
        Request::AuditFollow { workload, verdict } => {
            let mut rx = cx.events.subscribe();
            loop {
                match rx.recv().await {
                    Ok(ev) => {
                        let matches_workload = workload
                            .as_ref()
                            .is_none_or(|wl| ev["from"] == wl.as_str() || ev["to"] == wl.as_str());
                        let matches_verdict =
                            verdict.as_ref().is_none_or(|v| ev["verdict"] == v.as_str());
                        if matches_workload && matches_verdict {
                            send(w, &Response::Ok((*ev).clone())).await?;
                        }
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                        send(
                            w,
                            &Response::Error(format!("follower too slow: {n} events skipped")),
                        )
                        .await?;
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return Ok(()),
                }
            }
        }
    }
}

fn generation(cx: &Context) -> (u64, u64) {
    cx.status
        .lock()
        .map(|s| (s.generation, s.apply_errors))
        .unwrap_or_default()
}

/// Waits until the agent applied a change or refused one.
async fn settle(cx: &Context, before: (u64, u64)) -> Response {
    for _ in 0..60 {
        let now = generation(cx);
        if now.1 > before.1 {
            let e = cx
                .status
                .lock()
                .ok()
                .and_then(|s| s.last_error.clone())
                .unwrap_or_default();
            return Response::Error(format!(
                "the agent refused the change; the previous state stays in force:\n{e}"
            ));
        }
        if now.0 > before.0 {
            return Response::Ok(serde_json::json!({"generation": now.0}));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Response::Ok(
        serde_json::json!({"generation": generation(cx).0, "note": "written; nothing changed in the kernel"}),
    )
}

/// Validates the directory with the new files in place, all or nothing, then
/// writes them (temp file + rename each) for the watcher to apply.
async fn apply(cx: &Context, files: Vec<PolicyFile>) -> Response {
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
    let before = generation(cx);
    for (f, base) in files.iter().zip(&names) {
        let tmp = dir.join(format!(".{base}.tmp"));
        if let Err(e) =
            std::fs::write(&tmp, &f.content).and_then(|()| std::fs::rename(&tmp, dir.join(base)))
        {
            return Response::Error(format!("writing {base} into {}: {e}", dir.display()));
        }
    }
    settle(cx, before).await
}

/// Removes the file that holds policy `name` (`namespace/name`).
async fn delete(cx: &Context, name: &str) -> Response {
    let Some(dir) = cx.policy_dir.clone() else {
        return Response::Error("the agent has no policy directory (policyDir)".into());
    };
    let set = match policy::load_paths(&[dir]) {
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
    let before = generation(cx);
    if let Err(e) = std::fs::remove_file(&p.origin.file) {
        return Response::Error(format!("removing {}: {e}", p.origin.file));
    }
    settle(cx, before).await
}

/// Client side: sends `request`, calls `each` with every response line.
pub fn call(
    socket: &Path,
    request: &Request,
    mut each: impl FnMut(Response) -> anyhow::Result<()>,
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
        let e = call(&path, &Request::Status, |_| {
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
