//! A local fake Kubernetes API server speaking the real list/watch protocol
//! over HTTP/1.1, for the agent's watchers to run against unchanged:
//!
//! - `GET <collection>`: a JSON list (`PodList`, …) whose `metadata.resourceVersion`
//!   is the store's current version; items without `kind`/`apiVersion` for
//!   built-in kinds, as the real server sends them; `limit`/`continue` pages.
//! - `GET <collection>?watch=1&resourceVersion=N`: a chunked stream of
//!   `{"type":"ADDED|MODIFIED|DELETED","object":…}` lines for every change
//!   after N, held open for new changes until `timeoutSeconds`.
//! - A watch from a version older than the last compaction gets what the real
//!   server sends: one `ERROR` event with a `Status` of code 410 (`Expired`),
//!   after which a client must re-list.
//!
//! One resourceVersion counter runs across all kinds, like etcd's revision.
//! [`FakeApiServer::expire`] compacts the history and ends every open watch,
//! so the next watch of each client gets 410 Gone.
use std::{
    collections::BTreeMap,
    io::{BufRead as _, BufReader, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    sync::{
        Arc, Condvar, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::Context as _;
use serde_json::{Value, json};

/// The kinds the agent watches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    Pods,
    Namespaces,
    NetworkPolicies,
    PalisadePolicies,
    ClusterPalisadePolicies,
    Services,
    EndpointSlices,
    Nodes,
}

impl Kind {
    const ALL: [Kind; 8] = [
        Kind::Pods,
        Kind::Namespaces,
        Kind::NetworkPolicies,
        Kind::PalisadePolicies,
        Kind::ClusterPalisadePolicies,
        Kind::Services,
        Kind::EndpointSlices,
        Kind::Nodes,
    ];

    /// The cluster-wide collection path.
    fn path(self) -> &'static str {
        match self {
            Kind::Pods => "/api/v1/pods",
            Kind::Namespaces => "/api/v1/namespaces",
            Kind::NetworkPolicies => "/apis/networking.k8s.io/v1/networkpolicies",
            Kind::PalisadePolicies => "/apis/palisade.dev/v1alpha1/palisadepolicies",
            Kind::ClusterPalisadePolicies => "/apis/palisade.dev/v1alpha1/clusterpalisadepolicies",
            Kind::Services => "/api/v1/services",
            Kind::EndpointSlices => "/apis/discovery.k8s.io/v1/endpointslices",
            Kind::Nodes => "/api/v1/nodes",
        }
    }

    fn api_version(self) -> &'static str {
        match self {
            Kind::Pods | Kind::Namespaces | Kind::Services | Kind::Nodes => "v1",
            Kind::EndpointSlices => "discovery.k8s.io/v1",
            Kind::NetworkPolicies => "networking.k8s.io/v1",
            Kind::PalisadePolicies | Kind::ClusterPalisadePolicies => "palisade.dev/v1alpha1",
        }
    }

    fn kind(self) -> &'static str {
        match self {
            Kind::Pods => "Pod",
            Kind::Namespaces => "Namespace",
            Kind::NetworkPolicies => "NetworkPolicy",
            Kind::PalisadePolicies => "PalisadePolicy",
            Kind::ClusterPalisadePolicies => "ClusterPalisadePolicy",
            Kind::Services => "Service",
            Kind::EndpointSlices => "EndpointSlice",
            Kind::Nodes => "Node",
        }
    }

    /// Custom resources keep `kind`/`apiVersion` on list items; built-in kinds do not.
    fn custom(self) -> bool {
        matches!(self, Kind::PalisadePolicies | Kind::ClusterPalisadePolicies)
    }
}

#[derive(Default)]
struct Store {
    revision: u64,
    /// Revisions at or below this are compacted away.
    compacted: u64,
    objects: BTreeMap<(Kind, String, String), Value>,
    /// (revision, kind, event type, object as of the event)
    history: Vec<(u64, Kind, &'static str, Value)>,
    /// Bumped by `expire`: open watches end.
    epoch: u64,
    requests: Vec<String>,
    gone: usize,
}

struct Shared {
    store: Mutex<Store>,
    changed: Condvar,
    stop: AtomicBool,
    /// Taken down (`set_down`): every request is met with a closed connection.
    down: AtomicBool,
}

pub struct FakeApiServer {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    thread: Option<std::thread::JoinHandle<()>>,
    /// The network namespace (under /run/netns) it listens in; `None`: the test's own.
    netns: Option<String>,
}

/// Runs `f` on a thread that joined network namespace `netns` (under
/// /run/netns): a socket made there stays in that namespace wherever it is
/// used afterwards.
pub fn in_netns<T: Send>(netns: &str, f: impl FnOnce() -> T + Send) -> anyhow::Result<T> {
    let file = std::fs::File::open(format!("/run/netns/{netns}"))
        .with_context(|| format!("opening netns {netns}"))?;
    std::thread::scope(|s| {
        s.spawn(|| {
            // SAFETY: setns on this (scoped, short-lived) thread only, with
            // an open namespace file.
            let rc =
                unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&file), libc::CLONE_NEWNET) };
            anyhow::ensure!(
                rc == 0,
                "setns {netns}: {}",
                std::io::Error::last_os_error()
            );
            Ok(f())
        })
        .join()
        .map_err(|_| anyhow::anyhow!("thread in {netns} panicked"))?
    })
}

fn key(obj: &Value) -> (String, String) {
    let meta = &obj["metadata"];
    (
        meta["namespace"].as_str().unwrap_or_default().to_owned(),
        meta["name"].as_str().unwrap_or_default().to_owned(),
    )
}

impl FakeApiServer {
    /// Listens on an ephemeral loopback port.
    pub fn start() -> anyhow::Result<FakeApiServer> {
        FakeApiServer::serve(TcpListener::bind("127.0.0.1:0")?, None)
    }

    /// Listens on `ip` (an ephemeral port) inside network namespace
    /// `netns`: the control plane's address on a network of nodes.
    pub fn start_in(netns: &str, ip: std::net::IpAddr) -> anyhow::Result<FakeApiServer> {
        let listener = in_netns(netns, || TcpListener::bind((ip, 0)))??;
        FakeApiServer::serve(listener, Some(netns.to_owned()))
    }

    fn serve(listener: TcpListener, netns: Option<String>) -> anyhow::Result<FakeApiServer> {
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            store: Mutex::new(Store {
                revision: 100,
                ..Store::default()
            }),
            changed: Condvar::new(),
            stop: AtomicBool::new(false),
            down: AtomicBool::new(false),
        });
        let s = shared.clone();
        let thread = std::thread::spawn(move || {
            for conn in listener.incoming() {
                if s.stop.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                let s = s.clone();
                std::thread::spawn(move || {
                    let _ = serve_connection(conn, &s);
                });
            }
        });
        Ok(FakeApiServer {
            addr,
            shared,
            thread: Some(thread),
            netns,
        })
    }

    fn store(&self) -> std::sync::MutexGuard<'_, Store> {
        self.shared
            .store
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Creates or replaces an object (ADDED or MODIFIED), giving it the next
    /// resourceVersion (and a uid if it has none). Returns that version.
    pub fn apply(&self, kind: Kind, mut obj: Value) -> u64 {
        let mut st = self.store();
        st.revision += 1;
        let rev = st.revision;
        obj["apiVersion"] = kind.api_version().into();
        obj["kind"] = kind.kind().into();
        obj["metadata"]["resourceVersion"] = rev.to_string().into();
        if obj["metadata"]["uid"].is_null() {
            obj["metadata"]["uid"] = format!("00000000-0000-4000-8000-{rev:012}").into();
        }
        let (ns, name) = key(&obj);
        let kind_of_event = if st.objects.insert((kind, ns, name), obj.clone()).is_some() {
            "MODIFIED"
        } else {
            "ADDED"
        };
        st.history.push((rev, kind, kind_of_event, obj));
        drop(st);
        self.shared.changed.notify_all();
        rev
    }

    /// Every item of a `kubectl get -o json` list file.
    pub fn apply_list_file(&self, kind: Kind, path: &Path) -> anyhow::Result<()> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let list: Value = serde_json::from_str(&text)?;
        for item in list["items"].as_array().context("no items")? {
            self.apply(kind, item.clone());
        }
        Ok(())
    }

    /// The stored object, if any.
    pub fn get(&self, kind: Kind, namespace: &str, name: &str) -> Option<Value> {
        self.store()
            .objects
            .get(&(kind, namespace.to_owned(), name.to_owned()))
            .cloned()
    }

    /// Deletes an object (DELETED); false if it did not exist.
    pub fn delete(&self, kind: Kind, namespace: &str, name: &str) -> bool {
        let mut st = self.store();
        let Some(mut obj) = st
            .objects
            .remove(&(kind, namespace.to_owned(), name.to_owned()))
        else {
            return false;
        };
        st.revision += 1;
        let rev = st.revision;
        obj["metadata"]["resourceVersion"] = rev.to_string().into();
        st.history.push((rev, kind, "DELETED", obj));
        drop(st);
        self.shared.changed.notify_all();
        true
    }

    /// Compacts the history up to now and ends every open watch: each
    /// client's next watch (from its last seen version) gets 410 Gone.
    pub fn expire(&self) {
        let mut st = self.store();
        st.compacted = st.revision;
        st.history.clear();
        st.epoch += 1;
        drop(st);
        self.shared.changed.notify_all();
    }

    /// Request lines served so far (`GET /api/v1/pods?…`).
    pub fn requests(&self) -> Vec<String> {
        self.store().requests.clone()
    }

    /// How many 410 Gone answers were sent.
    pub fn gone_served(&self) -> usize {
        self.store().gone
    }

    /// Writes a kubeconfig pointing at this server (no credentials) to `dir`.
    pub fn kubeconfig(&self, dir: &Path) -> anyhow::Result<PathBuf> {
        let path = dir.join("kubeconfig");
        std::fs::write(
            &path,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: http://{}\ncontexts:\n- name: fake\n  context:\n    cluster: fake\n    user: fake\ncurrent-context: fake\nusers:\n- name: fake\n  user: {{}}\n",
                self.addr
            ),
        )?;
        Ok(path)
    }
}

/// The recorded Pod (tests/kubernetes/fixtures/pods.json, first item):
/// the shape the API server stores, with managed fields and statuses.
pub fn pod_template() -> anyhow::Result<Value> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("kubernetes/fixtures/pods.json");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    Ok(serde_json::from_str::<Value>(&text)?["items"][0].clone())
}

/// A Pod object shaped like `template` for pod `namespace/name` (label and
/// service account `app`), running on `node` with addresses `ips`.
pub fn pod_object(
    template: &Value,
    uid: &str,
    (namespace, name, app): (&str, &str, &str),
    ips: &[String],
    node: &str,
) -> Value {
    let mut p = template.clone();
    p["metadata"]["name"] = json!(name);
    p["metadata"]["namespace"] = json!(namespace);
    p["metadata"]["uid"] = json!(uid);
    p["metadata"]["labels"] = json!({ "app": app });
    p["spec"]["nodeName"] = json!(node);
    p["spec"]["serviceAccountName"] = json!(app);
    p["spec"]["serviceAccount"] = json!(app);
    p["status"]["podIP"] = json!(ips[0]);
    p["status"]["podIPs"] = json!(ips.iter().map(|ip| json!({ "ip": ip })).collect::<Vec<_>>());
    p
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        self.shutdown();
    }
}

impl FakeApiServer {
    /// Takes the server down (`true`: open watches end, every request is
    /// answered with a closed connection, as a dead API server behind a
    /// load balancer) or brings it back.
    pub fn set_down(&self, down: bool) {
        self.shared.down.store(down, Ordering::SeqCst);
        if down {
            let mut st = self.store();
            st.epoch += 1;
            drop(st);
            self.shared.changed.notify_all();
        }
    }

    /// Ends every watch and the accept loop (also on drop; call it before
    /// the network namespace it listens in goes).
    pub fn shutdown(&mut self) {
        if self.thread.is_none() {
            return;
        }
        self.shared.stop.store(true, Ordering::SeqCst);
        self.expire();
        // Wake the accept loop (from where it listens).
        let addr = self.addr;
        match &self.netns {
            Some(ns) => drop(in_netns(ns, || TcpStream::connect(addr))),
            None => drop(TcpStream::connect(addr)),
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Serves requests on one connection until it closes (keep-alive).
fn serve_connection(conn: TcpStream, shared: &Shared) -> anyhow::Result<()> {
    conn.set_nodelay(true)?;
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut out = conn;
    loop {
        let mut request_line = String::new();
        if reader.read_line(&mut request_line)? == 0 {
            return Ok(());
        }
        let mut content_length = 0usize;
        loop {
            let mut h = String::new();
            if reader.read_line(&mut h)? == 0 {
                return Ok(());
            }
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':')
                && k.eq_ignore_ascii_case("content-length")
            {
                content_length = v.trim().parse().unwrap_or(0);
            }
        }
        if content_length > 0 {
            let mut body = vec![0; content_length];
            std::io::Read::read_exact(&mut reader, &mut body)?;
        }
        if shared.down.load(Ordering::SeqCst) {
            return Ok(());
        }
        let mut parts = request_line.split_whitespace();
        let method = parts.next().unwrap_or_default().to_owned();
        let target = parts.next().unwrap_or_default().to_owned();
        if let Ok(mut st) = shared.store.lock() {
            st.requests.push(format!("{method} {target}"));
        }
        let (path, query) = target.split_once('?').unwrap_or((&target, ""));
        let params: BTreeMap<String, String> = query
            .split('&')
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.replace("%2F", "/").replace("%3D", "=")))
            .collect();
        let kind = Kind::ALL.iter().copied().find(|k| k.path() == path);
        match (method.as_str(), kind) {
            ("GET", Some(kind))
                if matches!(params.get("watch").map(String::as_str), Some("1" | "true")) =>
            {
                watch(&mut out, shared, kind, &params)?;
                // A finished watch closes its connection.
                return Ok(());
            }
            ("GET", Some(kind)) => {
                let body = list(shared, kind, &params);
                respond(&mut out, 200, &body)?;
            }
            ("GET", None) if path == "/version" => {
                let body = json!({
                    "major": "1", "minor": "31", "gitVersion": "v1.31.0-palisade-fake",
                    "gitCommit": "", "gitTreeState": "clean", "buildDate": "",
                    "goVersion": "", "compiler": "", "platform": "linux/amd64",
                });
                respond(&mut out, 200, &body)?;
            }
            _ => {
                let status = json!({
                    "kind": "Status", "apiVersion": "v1", "metadata": {},
                    "status": "Failure", "reason": "NotFound", "code": 404,
                    "message": format!("the server could not find the requested resource ({method} {path})"),
                });
                respond(&mut out, 404, &status)?;
            }
        }
    }
}

fn respond(out: &mut TcpStream, code: u16, body: &Value) -> std::io::Result<()> {
    let text = body.to_string();
    let reason = if code == 200 { "OK" } else { "Not Found" };
    write!(
        out,
        "HTTP/1.1 {code} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{text}",
        text.len()
    )?;
    out.flush()
}

fn list(shared: &Shared, kind: Kind, params: &BTreeMap<String, String>) -> Value {
    let st = shared
        .store
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let start: usize = params
        .get("continue")
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let limit: usize = params
        .get("limit")
        .and_then(|l| l.parse().ok())
        .filter(|l| *l > 0)
        .unwrap_or(usize::MAX);
    // Only the page's objects are copied: a list of 50,000 pods in pages
    // of 500 must not copy every pod for every page.
    let of_kind = || st.objects.iter().filter(|((k, _, _), _)| *k == kind);
    let total = of_kind().count();
    let page: Vec<Value> = of_kind()
        .skip(start)
        .take(limit)
        .map(|(_, o)| {
            let mut o = o.clone();
            if !kind.custom()
                && let Some(m) = o.as_object_mut()
            {
                m.remove("kind");
                m.remove("apiVersion");
            }
            o
        })
        .collect();
    let end = start.saturating_add(page.len());
    let mut metadata = json!({ "resourceVersion": st.revision.to_string() });
    if end < total {
        metadata["continue"] = end.to_string().into();
        metadata["remainingItemCount"] = (total - end).into();
    }
    json!({
        "kind": format!("{}List", kind.kind()),
        "apiVersion": kind.api_version(),
        "metadata": metadata,
        "items": page,
    })
}

fn chunk(out: &mut TcpStream, line: &str) -> std::io::Result<()> {
    write!(out, "{:x}\r\n{line}\n\r\n", line.len() + 1)?;
    out.flush()
}

fn watch(
    out: &mut TcpStream,
    shared: &Shared,
    kind: Kind,
    params: &BTreeMap<String, String>,
) -> anyhow::Result<()> {
    let timeout = params
        .get("timeoutSeconds")
        .and_then(|t| t.parse().ok())
        .map_or(Duration::from_secs(300), Duration::from_secs);
    let deadline = Instant::now() + timeout;
    write!(
        out,
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    )?;
    out.flush()?;
    let mut st = shared
        .store
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let mut seen: u64 = params
        .get("resourceVersion")
        .and_then(|v| v.parse().ok())
        .unwrap_or(st.revision);
    if seen < st.compacted {
        st.gone += 1;
        let message = format!("too old resource version: {seen} ({})", st.compacted);
        drop(st);
        let ev = json!({"type": "ERROR", "object": {
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": message, "reason": "Expired", "code": 410,
        }});
        chunk(out, &ev.to_string())?;
        write!(out, "0\r\n\r\n")?;
        return Ok(());
    }
    let epoch = st.epoch;
    loop {
        let pending: Vec<Value> = st
            .history
            .iter()
            .filter(|(rev, k, _, _)| *k == kind && *rev > seen)
            .map(|(_, _, ty, obj)| json!({"type": ty, "object": obj}))
            .collect();
        seen = st.revision;
        drop(st);
        for ev in pending {
            chunk(out, &ev.to_string())?;
        }
        st = shared
            .store
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if shared.stop.load(Ordering::SeqCst) || st.epoch != epoch || Instant::now() >= deadline {
            break;
        }
        let wait = deadline
            .saturating_duration_since(Instant::now())
            .min(Duration::from_millis(500));
        st = shared
            .changed
            .wait_timeout(st, wait)
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .0;
        if st.epoch != epoch {
            break;
        }
    }
    drop(st);
    write!(out, "0\r\n\r\n")?;
    out.flush()?;
    Ok(())
}
