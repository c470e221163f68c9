//! Reading policy files: multi-document YAML, routed by `apiVersion`/`kind`,
//! validated, converted into the `model`. Every problem is reported as
//! `file:line:column: field.path: what is wrong`, and a set with any problem is
//! rejected whole.
use std::{
    fmt,
    net::IpAddr,
    path::{Path, PathBuf},
};

use ipnet::IpNet;
use serde::de::DeserializeOwned;

use super::{
    api::{self, IntOrString, NetworkPolicyPeer, NetworkPolicyPort, ObjectMeta},
    labels::{self, LabelSelector},
    model::{
        Action, Direction, Mode, NamespaceScope, Origin, Peer, Policy, PortRange, Protocol, Rule,
    },
};

/// Files larger than this are refused before parsing.
pub const MAX_FILE_BYTES: u64 = 4 * 1024 * 1024;
/// The budget over everything loaded at once (a policy directory): files,
/// bytes, and rule terms (each rule's peers × ports).
pub const MAX_FILES: usize = 5_000;
pub const MAX_TOTAL_BYTES: u64 = 64 * 1024 * 1024;
pub const MAX_RULE_TERMS: usize = 200_000;

/// A rule's terms: what it costs the compiler (peers × port ranges).
fn rule_terms(p: &Policy) -> usize {
    p.ingress
        .iter()
        .chain(p.egress.iter())
        .flatten()
        .map(|r| {
            r.peers.as_ref().map_or(1, |v| v.len().max(1))
                * (r.ports.as_ref().map_or(0, Vec::len) + r.named_ports.len()).max(1)
        })
        .sum()
}

/// One located problem.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    pub file: String,
    pub line: usize,
    pub column: usize,
    /// Dotted field path (`spec.ingress[0].ports[1].port`), empty for syntax errors.
    pub field: String,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}: ", self.file, self.line, self.column)?;
        if !self.field.is_empty() {
            write!(f, "{}: ", self.field)?;
        }
        f.write_str(&self.message)
    }
}

/// Everything wrong with a set of policy files.
#[derive(Debug, thiserror::Error)]
pub struct LoadError {
    pub problems: Vec<Problem>,
}

impl fmt::Display for LoadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.problems.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{p}")?;
        }
        Ok(())
    }
}

/// A validated set of policies.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PolicySet {
    pub policies: Vec<Policy>,
    /// The files read, in order.
    pub files: Vec<PathBuf>,
}

/// Loads every `.yaml`/`.yml` file among `paths` (files, or directories read
/// non-recursively in name order). All or nothing.
/// Subdirectories read below a policy directory.
const MAX_POLICY_DIR_DEPTH: usize = 8;

/// Every `.yaml`/`.yml` file below `dir`, subdirectories included (sorted
/// per directory). Entries whose name starts with `.` are skipped: a
/// Kubernetes ConfigMap volume keeps each file twice, once under `..data/`.
fn collect_dir(dir: &Path, depth: usize, files: &mut Vec<PathBuf>, problems: &mut Vec<Problem>) {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) => {
            problems.push(file_problem(dir, format!("cannot read directory: {e}")));
            return;
        }
    };
    let mut found: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
        .map(|e| e.path())
        .collect();
    found.sort();
    for p in found {
        if p.is_dir() {
            if depth < MAX_POLICY_DIR_DEPTH {
                collect_dir(&p, depth + 1, files, problems);
            }
        } else if p.is_file()
            && matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml"))
        {
            files.push(p);
        }
    }
}

/// The policy files `load_paths` would read below `dir` (for change detection).
pub fn policy_files(dir: &Path) -> Vec<PathBuf> {
    let (mut files, mut problems) = (Vec::new(), Vec::new());
    if dir.is_dir() {
        collect_dir(dir, 0, &mut files, &mut problems);
    } else {
        files.push(dir.to_owned());
    }
    files
}

/// Loads policy files and directories (`.yaml`/`.yml` files, subdirectories
/// included; names starting with `.` skipped).
pub fn load_paths(paths: &[PathBuf]) -> Result<PolicySet, LoadError> {
    let mut files = Vec::new();
    let mut problems = Vec::new();
    for path in paths {
        if path.is_dir() {
            collect_dir(path, 0, &mut files, &mut problems);
        } else {
            files.push(path.clone());
        }
    }
    let mut set = PolicySet::default();
    if files.len() > MAX_FILES {
        problems.push(file_problem(
            &files[MAX_FILES],
            format!(
                "more than {MAX_FILES} policy files ({} found): the budget of one agent; merge files or remove unused ones",
                files.len()
            ),
        ));
        return Err(LoadError { problems });
    }
    let (mut bytes, mut terms) = (0u64, 0usize);
    for file in &files {
        bytes += std::fs::metadata(file).map(|m| m.len()).unwrap_or(0);
        if bytes > MAX_TOTAL_BYTES {
            problems.push(file_problem(
                file,
                format!("the policy files up to this one hold more than {MAX_TOTAL_BYTES} bytes: the budget of one agent"),
            ));
            break;
        }
        match read_file(file) {
            Ok(text) => match parse_str(&file.display().to_string(), &text) {
                Ok(policies) => {
                    terms += policies.iter().map(rule_terms).sum::<usize>();
                    set.policies.extend(policies);
                    if terms > MAX_RULE_TERMS {
                        problems.push(file_problem(
                            file,
                            format!("the policies up to this file have more than {MAX_RULE_TERMS} rule terms (peers × ports, {terms} so far): the budget of one agent; use selectors that cover more workloads per rule, or port ranges"),
                        ));
                        break;
                    }
                }
                Err(mut e) => problems.append(&mut e.problems),
            },
            Err(p) => problems.push(p),
        }
    }
    check_duplicates(&set.policies, &mut problems);
    if problems.is_empty() {
        set.files = files;
        Ok(set)
    } else {
        Err(LoadError { problems })
    }
}

fn file_problem(path: &Path, message: String) -> Problem {
    Problem {
        file: path.display().to_string(),
        line: 1,
        column: 1,
        field: String::new(),
        message,
    }
}

fn read_file(path: &Path) -> Result<String, Problem> {
    let meta =
        std::fs::metadata(path).map_err(|e| file_problem(path, format!("cannot read: {e}")))?;
    if meta.len() > MAX_FILE_BYTES {
        return Err(file_problem(
            path,
            format!(
                "file is {} bytes, more than the limit of {MAX_FILE_BYTES}; split it into several files",
                meta.len()
            ),
        ));
    }
    std::fs::read_to_string(path).map_err(|e| file_problem(path, format!("cannot read: {e}")))
}

fn check_duplicates(policies: &[Policy], problems: &mut Vec<Problem>) {
    let mut seen = std::collections::BTreeMap::new();
    for p in policies {
        let key = (p.origin.kind, p.qualified_name());
        if let Some(first) = seen.insert(key.clone(), &p.origin) {
            problems.push(Problem {
                file: p.origin.file.clone(),
                line: p.origin.line,
                column: 1,
                field: "metadata.name".into(),
                message: format!(
                    "{} {} is defined twice (first at {}:{})",
                    key.0, key.1, first.file, first.line
                ),
            });
        }
    }
}

/// One YAML document of a multi-document file.
struct Document<'a> {
    text: &'a str,
    /// 1-based line of the document's first line in the file.
    first_line: usize,
}

fn split_documents(text: &str) -> Vec<Document<'_>> {
    let mut docs = Vec::new();
    let mut start = 0usize;
    let mut start_line = 1usize;
    let mut offset = 0usize;
    for (i, line) in text.split_inclusive('\n').enumerate() {
        let trimmed = line.trim_end();
        if trimmed == "---" || trimmed.starts_with("--- ") {
            docs.push(Document {
                text: &text[start..offset],
                first_line: start_line,
            });
            start = offset + line.len();
            start_line = i + 2;
        }
        offset += line.len();
    }
    docs.push(Document {
        text: &text[start..],
        first_line: start_line,
    });
    docs.into_iter()
        .filter(|d| {
            d.text
                .lines()
                .any(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#'))
        })
        .collect()
}

/// `apiVersion` and `kind` read from top-level `key: value` lines without
/// parsing the document, which halves the cost of a large file. `None` (the
/// caller then parses) unless both are plain or quoted scalars on their own
/// top-level lines, each once, and the document has no anchors or aliases
/// (whose budget the full parse enforces first).
fn quick_type_meta(text: &str) -> Option<api::TypeMeta> {
    if text.contains(['&', '*']) {
        return None;
    }
    let (mut api_version, mut kind) = (None, None);
    for line in text.lines() {
        let (slot, rest) = if let Some(r) = line.strip_prefix("apiVersion:") {
            (&mut api_version, r)
        } else if let Some(r) = line.strip_prefix("kind:") {
            (&mut kind, r)
        } else {
            continue;
        };
        let v = rest.trim();
        let v = v
            .strip_prefix('"')
            .and_then(|v| v.strip_suffix('"'))
            .unwrap_or(v);
        let simple = !v.is_empty()
            && v.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'/' || b == b'-');
        if !simple || slot.is_some() {
            return None;
        }
        *slot = Some(v.to_owned());
    }
    Some(api::TypeMeta {
        api_version: Some(api_version?),
        kind: Some(kind?),
    })
}

fn parse_doc<T: DeserializeOwned>(file: &str, doc: &Document<'_>) -> Result<T, Problem> {
    crate::yaml::from_str(doc.text).map_err(|e| Problem {
        file: file.to_owned(),
        line: doc.first_line + e.line as usize - 1,
        column: e.column as usize,
        field: String::new(),
        message: e.message,
    })
}

/// Parses and validates every document of one file.
pub fn parse_str(file: &str, text: &str) -> Result<Vec<Policy>, LoadError> {
    let mut policies = Vec::new();
    let mut problems = Vec::new();
    for doc in split_documents(text) {
        let meta: api::TypeMeta =
            match quick_type_meta(doc.text).map_or_else(|| parse_doc(file, &doc), Ok) {
                Ok(m) => m,
                Err(p) => {
                    problems.push(p);
                    continue;
                }
            };
        let mut cx = Validator {
            file,
            line: doc.first_line,
            problems: Vec::new(),
        };
        let policy = match (meta.api_version.as_deref(), meta.kind.as_deref()) {
            (Some(api::NETWORK_POLICY_API), Some(api::NETWORK_POLICY_KIND)) => {
                parse_doc::<api::NetworkPolicy>(file, &doc).map(|np| cx.network_policy(np))
            }
            (Some(api::PALISADE_API), Some(api::PALISADE_KIND)) => {
                parse_doc::<api::PalisadePolicy>(file, &doc).map(|pp| cx.palisade_policy(pp, false))
            }
            (Some(api::PALISADE_API), Some(api::CLUSTER_PALISADE_KIND)) => {
                parse_doc::<api::PalisadePolicy>(file, &doc).map(|pp| cx.palisade_policy(pp, true))
            }
            (api_version, kind) => {
                cx.problem(
                    if api_version.is_none() {
                        "apiVersion"
                    } else {
                        "kind"
                    },
                    format!(
                        "unsupported document apiVersion={} kind={}; expected {} {}, or {} {} or {}",
                        api_version.unwrap_or("(missing)"),
                        kind.unwrap_or("(missing)"),
                        api::NETWORK_POLICY_API,
                        api::NETWORK_POLICY_KIND,
                        api::PALISADE_API,
                        api::PALISADE_KIND,
                        api::CLUSTER_PALISADE_KIND
                    ),
                );
                Ok(None)
            }
        };
        match policy {
            Ok(Some(p)) if cx.problems.is_empty() => policies.push(p),
            Ok(_) => {}
            Err(p) => problems.push(p),
        }
        problems.append(&mut cx.problems);
    }
    if problems.is_empty() {
        Ok(policies)
    } else {
        Err(LoadError { problems })
    }
}

/// Collects semantic problems of one document and converts it to the model.
struct Validator<'a> {
    file: &'a str,
    /// The document's first line in the file.
    line: usize,
    problems: Vec<Problem>,
}

type Loc = serde_saphyr::Location;

impl Validator<'_> {
    /// A problem at the document's start (for facts with no single place).
    fn problem(&mut self, field: &str, message: impl Into<String>) {
        self.problems.push(Problem {
            file: self.file.to_owned(),
            line: self.line,
            column: 1,
            field: field.to_owned(),
            message: message.into(),
        });
    }

    /// A problem where the offending value was written.
    fn problem_at(&mut self, at: &Loc, field: &str, message: impl Into<String>) {
        if at.line() == 0 {
            return self.problem(field, message);
        }
        self.problems.push(Problem {
            file: self.file.to_owned(),
            line: self.line + at.line() as usize - 1,
            column: at.column() as usize,
            field: field.to_owned(),
            message: message.into(),
        });
    }

    fn origin(&self, kind: &'static str) -> Origin {
        Origin {
            file: self.file.to_owned(),
            line: self.line,
            kind,
        }
    }

    fn metadata(&mut self, meta: &ObjectMeta, namespaced: bool) -> (String, Option<String>) {
        let name = match &meta.name {
            None => {
                self.problem("metadata.name", "is required");
                String::new()
            }
            Some(n) => {
                if n.value.is_empty() {
                    self.problem_at(&n.referenced, "metadata.name", "is required");
                } else {
                    let p = labels::dns1123_subdomain_problems(&n.value);
                    if !p.is_empty() {
                        self.problem_at(
                            &n.referenced,
                            "metadata.name",
                            labels::invalid(&n.value, &p),
                        );
                    }
                }
                n.value.clone()
            }
        };
        if let Some(ns) = &meta.namespace {
            let p = labels::dns1123_label_problems(ns);
            if !p.is_empty() {
                self.problem("metadata.namespace", labels::invalid(ns, &p));
            }
        }
        let namespace = if namespaced {
            Some(
                meta.namespace
                    .clone()
                    .unwrap_or_else(|| "default".to_owned()),
            )
        } else {
            meta.namespace.clone()
        };
        (name, namespace)
    }

    fn selector(&mut self, at: &Loc, field: &str, sel: &LabelSelector) {
        for (f, m) in sel.validate() {
            self.problem_at(at, &format!("{field}.{f}"), m);
        }
    }

    fn network_policy(&mut self, np: api::NetworkPolicy) -> Option<Policy> {
        let (name, namespace) = self.metadata(&np.metadata, true);
        let spec = np.spec;
        let pod_selector = match spec.pod_selector {
            Some(s) => {
                self.selector(&s.referenced, "spec.podSelector", &s.value);
                s.value
            }
            None => LabelSelector::default(),
        };
        // API server defaulting: Ingress always, Egress when egress rules exist.
        let (mut ingress_on, mut egress_on) = (false, false);
        match spec.policy_types {
            Some(types) => {
                for (i, t) in types.iter().enumerate() {
                    match t.value.as_str() {
                        "Ingress" => ingress_on = true,
                        "Egress" => egress_on = true,
                        other => self.problem_at(
                            &t.referenced,
                            &format!("spec.policyTypes[{i}]"),
                            format!("unsupported value {other:?}: supported values: \"Ingress\", \"Egress\""),
                        ),
                    }
                }
            }
            None => {
                ingress_on = true;
                egress_on = spec.egress.as_ref().is_some_and(|e| !e.is_empty());
            }
        }
        let mut ingress = Vec::new();
        for (i, r) in spec.ingress.unwrap_or_default().into_iter().enumerate() {
            let field = format!("spec.ingress[{i}]");
            ingress.push(self.k8s_rule(&field, "from", r.from, r.ports, format!("ingress[{i}]")));
        }
        let mut egress = Vec::new();
        for (i, r) in spec.egress.unwrap_or_default().into_iter().enumerate() {
            let field = format!("spec.egress[{i}]");
            egress.push(self.k8s_rule(&field, "to", r.to, r.ports, format!("egress[{i}]")));
        }
        Some(Policy {
            name,
            namespace,
            origin: self.origin(api::NETWORK_POLICY_KIND),
            mode: Mode::Enforce,
            selector: pod_selector,
            namespace_selector: None,
            ingress: ingress_on.then_some(ingress),
            egress: egress_on.then_some(egress),
        })
    }

    fn k8s_rule(
        &mut self,
        field: &str,
        peers_field: &str,
        peers: Option<Vec<api::S<NetworkPolicyPeer>>>,
        ports: Option<Vec<NetworkPolicyPort>>,
        name: String,
    ) -> Rule {
        // An empty or missing list means "everything" for both peers and ports.
        let peers = peers.filter(|p| !p.is_empty()).map(|peers| {
            peers
                .into_iter()
                .enumerate()
                .filter_map(|(i, p)| self.k8s_peer(&format!("{field}.{peers_field}[{i}]"), p))
                .collect()
        });
        let (ports, named_ports) = self.ports(field, ports);
        Rule {
            name,
            action: Action::Allow,
            peers,
            ports,
            named_ports,
        }
    }

    fn k8s_peer(&mut self, field: &str, peer: api::S<NetworkPolicyPeer>) -> Option<Peer> {
        let at = peer.referenced;
        let peer = peer.value;
        match (peer.pod_selector, peer.namespace_selector, peer.ip_block) {
            (None, None, None) => {
                self.problem_at(
                    &at,
                    field,
                    "must specify a peer: podSelector, namespaceSelector or ipBlock",
                );
                None
            }
            (Some(_), _, Some(_)) | (_, Some(_), Some(_)) => {
                self.problem_at(
                    &at,
                    field,
                    "may not specify both ipBlock and another peer (podSelector/namespaceSelector)",
                );
                None
            }
            (None, None, Some(block)) => {
                self.cidr(&format!("{field}.ipBlock"), &block.cidr, &block.except)
            }
            (pods, namespaces, None) => {
                if let Some(p) = &pods {
                    self.selector(&at, &format!("{field}.podSelector"), p);
                }
                if let Some(n) = &namespaces {
                    self.selector(&at, &format!("{field}.namespaceSelector"), n);
                }
                Some(Peer::Workloads {
                    pods,
                    namespaces: match namespaces {
                        Some(n) => NamespaceScope::Matching(n),
                        None => NamespaceScope::Same,
                    },
                })
            }
        }
    }

    fn cidr(
        &mut self,
        field: &str,
        cidr: &api::S<String>,
        except: &[api::S<String>],
    ) -> Option<Peer> {
        let parse = |s: &str| -> Result<IpNet, String> {
            s.parse::<IpNet>().map_err(|_| {
                if s.parse::<IpAddr>().is_ok() {
                    format!(
                        "{s:?} is an address, not a CIDR: add a prefix length such as /32 or /128"
                    )
                } else {
                    format!("{s:?} is not a valid CIDR (expected e.g. 10.0.0.0/8 or fd00::/64)")
                }
            })
        };
        let block = match parse(&cidr.value) {
            Ok(b) => b,
            Err(m) => {
                self.problem_at(&cidr.referenced, &format!("{field}.cidr"), m);
                return None;
            }
        };
        let mut excepts = Vec::new();
        for (i, e) in except.iter().enumerate() {
            let f = format!("{field}.except[{i}]");
            match parse(&e.value) {
                Ok(net) if block.contains(&net) && net != block => excepts.push(net),
                Ok(_) => self.problem_at(
                    &e.referenced,
                    &f,
                    format!(
                        "{:?} must be a strict subset of cidr {:?}",
                        e.value, cidr.value
                    ),
                ),
                Err(m) => self.problem_at(&e.referenced, &f, m),
            }
        }
        Some(Peer::Cidr {
            cidr: block.trunc(),
            except: excepts,
        })
    }

    fn ports(
        &mut self,
        field: &str,
        ports: Option<Vec<NetworkPolicyPort>>,
    ) -> (Option<Vec<PortRange>>, Vec<(Protocol, String)>) {
        let mut named = Vec::new();
        let Some(ports) = ports.filter(|p| !p.is_empty()) else {
            return (None, named);
        };
        let mut out = Vec::new();
        for (i, p) in ports.into_iter().enumerate() {
            let f = format!("{field}.ports[{i}]");
            let protocol = match &p.protocol {
                None => Protocol::Tcp,
                Some(s) => match Protocol::from_api(&s.value) {
                    Some(p) => p,
                    None => {
                        let other = s.value.as_str();
                        self.problem_at(
                            &s.referenced,
                            &format!("{f}.protocol"),
                            format!("unsupported value {other:?}: supported values: \"TCP\", \"UDP\", \"SCTP\""),
                        );
                        continue;
                    }
                },
            };
            let first = match &p.port {
                None => {
                    if let Some(e) = &p.end_port {
                        self.problem_at(
                            &e.referenced,
                            &format!("{f}.endPort"),
                            "may not be specified when port is not specified",
                        );
                    }
                    out.push(PortRange::all(protocol));
                    continue;
                }
                Some(s) => match &s.value {
                    IntOrString::Int(n) if (1..=65535).contains(n) => *n as u16,
                    IntOrString::Int(n) => {
                        self.problem_at(
                            &s.referenced,
                            &format!("{f}.port"),
                            format!("{n} is out of range: must be between 1 and 65535, inclusive"),
                        );
                        continue;
                    }
                    IntOrString::String(name) => {
                        if let Some(e) = &p.end_port {
                            self.problem_at(
                                &e.referenced,
                                &format!("{f}.endPort"),
                                "may not be specified with a named port",
                            );
                        } else if !is_port_name(name) {
                            self.problem_at(
                                &s.referenced,
                                &format!("{f}.port"),
                                format!("{name:?} is not a valid port name: at most 15 lower-case letters, digits and '-', with at least one letter"),
                            );
                        } else {
                            named.push((protocol, name.clone()));
                        }
                        continue;
                    }
                },
            };
            let last = match &p.end_port {
                None => first,
                Some(e) if !(1..=65535).contains(&e.value.0) => {
                    self.problem_at(
                        &e.referenced,
                        &format!("{f}.endPort"),
                        format!(
                            "{} is out of range: must be between 1 and 65535, inclusive",
                            e.value.0
                        ),
                    );
                    continue;
                }
                Some(e) if e.value.0 < i64::from(first) => {
                    self.problem_at(
                        &e.referenced,
                        &format!("{f}.endPort"),
                        format!(
                            "{} must be greater than or equal to port ({first})",
                            e.value.0
                        ),
                    );
                    continue;
                }
                Some(e) => e.value.0 as u16,
            };
            out.push(PortRange {
                protocol,
                first,
                last,
            });
        }
        (Some(out), named)
    }

    fn palisade_policy(&mut self, pp: api::PalisadePolicy, cluster: bool) -> Option<Policy> {
        let (name, namespace) = self.metadata(&pp.metadata, !cluster);
        if cluster && namespace.is_some() {
            self.problem(
                "metadata.namespace",
                "a ClusterPalisadePolicy is not namespaced: remove metadata.namespace",
            );
        }
        let spec = pp.spec;
        let namespace_selector = match spec.namespaces {
            Some(sel) if !cluster => {
                self.problem_at(&sel.referenced, "spec.namespaces", "only a ClusterPalisadePolicy selects namespaces; a PalisadePolicy applies to its own");
                None
            }
            Some(sel) => {
                self.selector(&sel.referenced, "spec.namespaces", &sel.value);
                Some(sel.value)
            }
            None => None,
        };
        let mode = match &spec.mode {
            None => Mode::Enforce,
            Some(m) => {
                match m.value.as_str() {
                    "enforce" => Mode::Enforce,
                    "audit" => Mode::Audit,
                    other => {
                        self.problem_at(&m.referenced, "spec.mode", format!("unsupported value {other:?}: supported values: \"enforce\", \"audit\""));
                        Mode::Enforce
                    }
                }
            }
        };
        self.selector(
            &spec.selector.referenced,
            "spec.selector",
            &spec.selector.value,
        );
        let mut convert = |dir: Direction, rules: Option<Vec<api::PalisadeRule>>| {
            rules.map(|rules| {
                rules
                    .into_iter()
                    .enumerate()
                    .map(|(i, r)| self.palisade_rule(dir, i, r))
                    .collect::<Vec<_>>()
            })
        };
        let ingress = convert(Direction::Ingress, spec.ingress);
        let egress = convert(Direction::Egress, spec.egress);
        let mut names = std::collections::BTreeSet::new();
        for (dir, rules) in [("ingress", &ingress), ("egress", &egress)] {
            for (i, r) in rules.iter().flatten().enumerate() {
                if !names.insert(r.name.clone()) {
                    self.problem(
                        &format!("spec.{dir}[{i}].name"),
                        format!("rule name {:?} is used twice in this policy", r.name),
                    );
                }
            }
        }
        Some(Policy {
            name,
            namespace,
            origin: self.origin(if cluster {
                api::CLUSTER_PALISADE_KIND
            } else {
                api::PALISADE_KIND
            }),
            mode,
            selector: spec.selector.value,
            namespace_selector,
            ingress,
            egress,
        })
    }

    fn palisade_rule(&mut self, dir: Direction, index: usize, r: api::PalisadeRule) -> Rule {
        let field = format!("spec.{}[{index}]", dir.as_str());
        let (peers_field, peers, wrong) = match dir {
            Direction::Ingress => ("from", r.from, r.to.map(|p| ("to", p))),
            Direction::Egress => ("to", r.to, r.from.map(|p| ("from", p))),
        };
        if let Some((w, list)) = wrong {
            let message = format!("{} rules name their peers in {peers_field:?}", dir.as_str());
            match list.first() {
                Some(p) => self.problem_at(&p.referenced, &format!("{field}.{w}"), message),
                None => self.problem(&format!("{field}.{w}"), message),
            }
        }
        let action = match &r.action {
            None => Action::Allow,
            Some(a) => match a.value.as_str() {
                "allow" => Action::Allow,
                "deny" => Action::Deny,
                other => {
                    self.problem_at(
                        &a.referenced,
                        &format!("{field}.action"),
                        format!(
                            "unsupported value {other:?}: supported values: \"allow\", \"deny\""
                        ),
                    );
                    Action::Allow
                }
            },
        };
        let name = r
            .name
            .map_or_else(|| format!("{}[{index}]", dir.as_str()), |n| n.value);
        let peers = peers.filter(|p| !p.is_empty()).map(|peers| {
            peers
                .into_iter()
                .enumerate()
                .filter_map(|(i, p)| self.palisade_peer(&format!("{field}.{peers_field}[{i}]"), p))
                .collect()
        });
        let (ports, named_ports) = self.ports(&field, r.ports);
        Rule {
            name,
            action,
            peers,
            ports,
            named_ports,
        }
    }

    fn palisade_peer(&mut self, field: &str, p: api::S<api::PalisadePeer>) -> Option<Peer> {
        let at = p.referenced;
        let p = p.value;
        let workloads = p.selector.is_some() || p.namespaces.is_some();
        let kinds = [workloads, p.identity.is_some(), p.cidr.is_some()]
            .iter()
            .filter(|b| **b)
            .count();
        if kinds != 1 {
            self.problem_at(
                &at,
                field,
                "must specify exactly one of: selector/namespaces, identity, cidr",
            );
            return None;
        }
        if !p.except.is_empty() && p.cidr.is_none() {
            self.problem_at(&at, &format!("{field}.except"), "is only valid with cidr");
        }
        if let Some(id) = p.identity {
            if id.value.is_empty() {
                self.problem_at(
                    &id.referenced,
                    &format!("{field}.identity"),
                    "must not be empty",
                );
                return None;
            }
            return Some(Peer::Identity(id.value));
        }
        if let Some(c) = &p.cidr {
            return self.cidr(field, c, &p.except);
        }
        if let Some(s) = &p.selector {
            self.selector(&at, &format!("{field}.selector"), s);
        }
        if let Some(n) = &p.namespaces {
            self.selector(&at, &format!("{field}.namespaces"), n);
        }
        Some(Peer::Workloads {
            pods: p.selector,
            namespaces: match p.namespaces {
                Some(n) => NamespaceScope::Matching(n),
                None => NamespaceScope::Same,
            },
        })
    }
}

/// IANA service name, as Kubernetes validates container port names.
fn is_port_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 15
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && s.bytes().any(|b| b.is_ascii_lowercase())
        && !s.starts_with('-')
        && !s.ends_with('-')
        && !s.contains("--")
}
