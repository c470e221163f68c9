//! Reading policies: multi-document YAML files, routed by `apiVersion`/`kind`,
//! and objects from the API server, both as the `api` types; validated and
//! converted into the `model` by one validator. A file's problem is reported
//! as `file:line:column: field.path: what is wrong` (the field path placed by
//! the document's located tree), a cluster object's as `Kind/namespace/name:
//! field.path: what is wrong`; a set with any problem is rejected whole.
use std::{
    fmt,
    net::IpAddr,
    path::{Path, PathBuf},
};

use ipnet::IpNet;

use crate::yaml;

use super::{
    api::{self, IntOrString, NetworkPolicyPeer, NetworkPolicyPort},
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
    /// The file, or a cluster object's `Kind/namespace/name`.
    pub file: String,
    /// 1-based; 0 for a cluster object (no position).
    pub line: usize,
    pub column: usize,
    /// Dotted field path (`spec.ingress[0].ports[1].port`), empty for syntax errors.
    pub field: String,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line == 0 {
            // A cluster object: no position, its `Kind/namespace/name`.
            write!(f, "{}: ", self.file)?;
        } else {
            write!(f, "{}:{}:{}: ", self.file, self.line, self.column)?;
        }
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
    /// Shared, so that the compiler can remember a policy by pointer.
    pub policies: Vec<std::sync::Arc<Policy>>,
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
                    set.policies
                        .extend(policies.into_iter().map(std::sync::Arc::new));
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

fn check_duplicates(policies: &[std::sync::Arc<Policy>], problems: &mut Vec<Problem>) {
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

/// The document as a located tree.
fn parse_doc(file: &str, doc: &Document<'_>) -> Result<yaml::Node, Problem> {
    yaml::tree(doc.text).map_err(|e| Problem {
        file: file.to_owned(),
        line: doc.first_line + e.line as usize - 1,
        column: e.column as usize,
        field: String::new(),
        message: e.message,
    })
}

/// A top-level string field of a document (`apiVersion`, `kind`).
fn top_level<'n>(node: &'n yaml::Node, key: &str) -> Option<&'n str> {
    let yaml::Value::Map(entries) = &node.value else {
        return None;
    };
    entries
        .iter()
        .find(|(k, _)| k.name == key)
        .and_then(|(_, v)| match &v.value {
            yaml::Value::Str(s) => Some(s.as_str()),
            _ => None,
        })
}

/// A policy object as the API server stores it.
#[derive(Clone, Copy, Debug)]
pub enum PolicyObject<'a> {
    Network(&'a api::NetworkPolicy),
    Palisade(&'a api::PalisadePolicy),
    ClusterPalisade(&'a api::ClusterPalisadePolicy),
}

impl<'a> PolicyObject<'a> {
    /// The object's kind and metadata.
    pub fn meta(&self) -> (&'static str, &'a api::ObjectMeta) {
        match *self {
            PolicyObject::Network(o) => (api::NETWORK_POLICY_KIND, &o.metadata),
            PolicyObject::Palisade(o) => (api::PALISADE_KIND, &o.metadata),
            PolicyObject::ClusterPalisade(o) => (api::CLUSTER_PALISADE_KIND, &o.metadata),
        }
    }

    /// `Kind/namespace/name` (`Kind/name` when not namespaced): how problems
    /// and the policy's origin name the object.
    pub fn name(&self) -> String {
        let (kind, meta) = self.meta();
        let name = meta.name.as_deref().unwrap_or_default();
        match meta.namespace.as_deref() {
            Some(ns) if !ns.is_empty() => format!("{kind}/{ns}/{name}"),
            _ => format!("{kind}/{name}"),
        }
    }
}

/// Validates one object read from the API server, with the same checks as a
/// policy file; problems are named `Kind/namespace/name: field.path: …`.
pub fn validate_object(object: PolicyObject<'_>) -> Result<Policy, LoadError> {
    let name = object.name();
    let mut cx = Validator {
        place: Place::Object,
        file: &name,
        line: 0,
        problems: Vec::new(),
    };
    let policy = match object {
        PolicyObject::Network(np) => cx.network_policy(np),
        PolicyObject::Palisade(pp) => {
            cx.palisade_policy(&pp.metadata, &pp.spec.clone().into(), false)
        }
        PolicyObject::ClusterPalisade(cp) => cx.palisade_policy(&cp.metadata, &cp.spec, true),
    };
    if cx.problems.is_empty() {
        Ok(policy)
    } else {
        Err(LoadError {
            problems: cx.problems,
        })
    }
}

/// Parses and validates every document of one file.
///
/// A file must hold at least one document: an empty file, or one of only
/// comments, is what a truncation in place leaves while the file is being
/// rewritten, so it is refused, never read as "no policies". No policies on
/// purpose is written as an empty list ([`EMPTY_LIST`]).
pub fn parse_str(file: &str, text: &str) -> Result<Vec<Policy>, LoadError> {
    let mut policies = Vec::new();
    let mut problems = Vec::new();
    let docs = split_documents(text);
    if docs.is_empty() {
        return Err(LoadError {
            problems: vec![Problem {
                file: file.to_owned(),
                line: 1,
                column: 1,
                field: String::new(),
                message: format!(
                    "the file holds no YAML document ({}): a file being rewritten in place looks like this, so it is not read as \"no policies\" and the previous policy stays in force; to enforce no policy on purpose, write `{}`",
                    if text.trim().is_empty() {
                        "it is empty"
                    } else {
                        "only comments"
                    },
                    EMPTY_LIST.trim_end().replace('\n', "; ")
                ),
            }],
        });
    }
    for doc in docs {
        let node = match parse_doc(file, &doc) {
            Ok(n) => n,
            Err(p) => {
                problems.push(p);
                continue;
            }
        };
        let mut cx = Validator {
            place: Place::File(&node),
            file,
            line: doc.first_line,
            problems: Vec::new(),
        };
        let policy = match (top_level(&node, "apiVersion"), top_level(&node, "kind")) {
            (Some(api::NETWORK_POLICY_API), Some(api::NETWORK_POLICY_KIND)) => cx
                .typed::<api::NetworkPolicy>(&node, doc.text)
                .map(|np| cx.network_policy(&np)),
            (Some(api::PALISADE_API), Some(api::PALISADE_KIND)) => cx
                .typed::<api::PalisadePolicy>(&node, doc.text)
                .map(|pp| cx.palisade_policy(&pp.metadata, &pp.spec.into(), false)),
            (Some(api::PALISADE_API), Some(api::CLUSTER_PALISADE_KIND)) => cx
                .typed::<api::ClusterPalisadePolicy>(&node, doc.text)
                .map(|cp| cx.palisade_policy(&cp.metadata, &cp.spec, true)),
            (Some("v1"), Some("List")) => {
                cx.empty_list(&node);
                None
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
                None
            }
        };
        match policy {
            Some(p) if cx.problems.is_empty() => policies.push(p),
            _ => {}
        }
        problems.append(&mut cx.problems);
    }
    if problems.is_empty() {
        Ok(policies)
    } else {
        Err(LoadError { problems })
    }
}

/// A file that says "no policies" on purpose (kubectl's empty list, as
/// `kubectl get networkpolicies -o yaml` prints it when there are none).
pub const EMPTY_LIST: &str = "apiVersion: v1\nkind: List\nitems: []\n";

/// Where a document's problems are placed: a file's located tree turns a field
/// path into line:column; a cluster object has no positions.
enum Place<'n> {
    File(&'n yaml::Node),
    Object,
}

/// Collects semantic problems of one document and converts it to the model.
struct Validator<'a> {
    place: Place<'a>,
    /// The file, or the object's `Kind/namespace/name`.
    file: &'a str,
    /// The document's first line in the file (0 for a cluster object).
    line: usize,
    problems: Vec<Problem>,
}

impl Validator<'_> {
    /// A `v1` `List` document: read only when empty (no policies, on
    /// purpose); its items are not read.
    fn empty_list(&mut self, node: &yaml::Node) {
        let yaml::Value::Map(entries) = &node.value else {
            return;
        };
        match entries.iter().find(|(k, _)| k.name == "items") {
            Some((_, v)) if matches!(&v.value, yaml::Value::Seq(items) if items.is_empty()) => {}
            Some(_) => self.problem(
                "items",
                "a List's items are not read: put each policy in its own YAML document (separated by `---`); an empty List (`items: []`) says \"no policies\" on purpose",
            ),
            None => self.problem(
                "items",
                "a List without `items`: write `items: []` to say \"no policies\" on purpose",
            ),
        }
    }

    /// A problem at `field`: where its value (or its nearest written
    /// ancestor) was written in a file; the object's name for a cluster object.
    fn problem(&mut self, field: &str, message: impl Into<String>) {
        let (line, column) = match &self.place {
            Place::Object => (0, 0),
            Place::File(node) => {
                let (l, c) = node.locate(field);
                (self.line + l as usize - 1, c as usize)
            }
        };
        self.push(line, column, field, message.into());
    }

    fn push(&mut self, line: usize, column: usize, field: &str, message: String) {
        self.problems.push(Problem {
            file: self.file.to_owned(),
            line,
            column,
            field: field.to_owned(),
            message,
        });
    }

    /// The document as `T`: its structure checked against `T`'s schema (all
    /// problems at once), then deserialized. `None` after a problem.
    fn typed<T: serde::de::DeserializeOwned + schemars::JsonSchema + 'static>(
        &mut self,
        node: &yaml::Node,
        text: &str,
    ) -> Option<T> {
        let json = match super::schema::conform::<T>(node, text) {
            Ok(json) => json,
            Err(problems) => {
                for p in problems {
                    let line = self.line + p.at.0 as usize - 1;
                    self.push(line, p.at.1 as usize, &p.path, p.message);
                }
                return None;
            }
        };
        match serde_path_to_error::deserialize(json) {
            Ok(t) => Some(t),
            Err(e) => {
                let path = e.path().to_string();
                let path = if path == "." { String::new() } else { path };
                self.problem(&path, e.into_inner().to_string());
                None
            }
        }
    }

    fn origin(&self, kind: &'static str) -> Origin {
        Origin {
            file: self.file.to_owned(),
            line: self.line,
            kind,
        }
    }

    fn metadata(&mut self, meta: &api::ObjectMeta, namespaced: bool) -> (String, Option<String>) {
        let name = meta.name.clone().unwrap_or_default();
        if name.is_empty() {
            self.problem("metadata.name", "is required");
        } else {
            let p = labels::dns1123_subdomain_problems(&name);
            if !p.is_empty() {
                self.problem("metadata.name", labels::invalid(&name, &p));
            }
        }
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

    fn selector(&mut self, field: &str, sel: &api::LabelSelector) -> LabelSelector {
        let (selector, problems) = LabelSelector::from_api(sel);
        for (f, m) in problems {
            self.problem(&format!("{field}.{f}"), m);
        }
        selector
    }

    fn network_policy(&mut self, np: &api::NetworkPolicy) -> Policy {
        let (name, namespace) = self.metadata(&np.metadata, true);
        // A missing spec is the empty spec, as the API server stores it.
        let spec = np.spec.clone().unwrap_or_default();
        let pod_selector = spec
            .pod_selector
            .as_ref()
            .map_or_else(LabelSelector::default, |s| {
                self.selector("spec.podSelector", s)
            });
        // API server defaulting: Ingress always, Egress when egress rules exist.
        let (mut ingress_on, mut egress_on) = (false, false);
        match &spec.policy_types {
            Some(types) => {
                for (i, t) in types.iter().enumerate() {
                    match t.as_str() {
                        "Ingress" => ingress_on = true,
                        "Egress" => egress_on = true,
                        other => self.problem(
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
        for (i, r) in spec.ingress.iter().flatten().enumerate() {
            let field = format!("spec.ingress[{i}]");
            let (peers, ports) = (r.from.as_deref(), r.ports.as_deref());
            ingress.push(self.k8s_rule(&field, "from", peers, ports, format!("ingress[{i}]")));
        }
        let mut egress = Vec::new();
        for (i, r) in spec.egress.iter().flatten().enumerate() {
            let field = format!("spec.egress[{i}]");
            let (peers, ports) = (r.to.as_deref(), r.ports.as_deref());
            egress.push(self.k8s_rule(&field, "to", peers, ports, format!("egress[{i}]")));
        }
        Policy {
            name,
            namespace,
            origin: self.origin(api::NETWORK_POLICY_KIND),
            mode: Mode::Enforce,
            selector: pod_selector,
            namespace_selector: None,
            ingress: ingress_on.then_some(ingress),
            egress: egress_on.then_some(egress),
        }
    }

    fn k8s_rule(
        &mut self,
        field: &str,
        peers_field: &str,
        peers: Option<&[NetworkPolicyPeer]>,
        ports: Option<&[NetworkPolicyPort]>,
        name: String,
    ) -> Rule {
        // An empty or missing list means "everything" for both peers and ports.
        let peers = peers.filter(|p| !p.is_empty()).map(|peers| {
            peers
                .iter()
                .enumerate()
                .filter_map(|(i, p)| self.k8s_peer(&format!("{field}.{peers_field}[{i}]"), p))
                .collect()
        });
        let ports: Option<Vec<api::Port>> = ports.map(|ports| {
            ports
                .iter()
                .map(|p| api::Port {
                    protocol: p.protocol.clone(),
                    port: p.port.clone(),
                    end_port: p.end_port,
                    ..Default::default()
                })
                .collect()
        });
        let (ports, named_ports) = self.ports(field, ports.as_deref(), false);
        Rule {
            name,
            action: Action::Allow,
            peers,
            ports,
            named_ports,
        }
    }

    fn k8s_peer(&mut self, field: &str, peer: &NetworkPolicyPeer) -> Option<Peer> {
        match (&peer.pod_selector, &peer.namespace_selector, &peer.ip_block) {
            (None, None, None) => {
                self.problem(
                    field,
                    "must specify a peer: podSelector, namespaceSelector or ipBlock",
                );
                None
            }
            (Some(_), _, Some(_)) | (_, Some(_), Some(_)) => {
                self.problem(
                    field,
                    "may not specify both ipBlock and another peer (podSelector/namespaceSelector)",
                );
                None
            }
            (None, None, Some(block)) => self.cidr(
                &format!("{field}.ipBlock"),
                &block.cidr,
                block.except.as_deref().unwrap_or_default(),
            ),
            (pods, namespaces, None) => {
                let pods = pods
                    .as_ref()
                    .map(|p| self.selector(&format!("{field}.podSelector"), p));
                let namespaces = namespaces
                    .as_ref()
                    .map(|n| self.selector(&format!("{field}.namespaceSelector"), n));
                Some(Peer::Workloads {
                    pods,
                    namespaces: namespaces.map_or(NamespaceScope::Same, NamespaceScope::Matching),
                })
            }
        }
    }

    fn cidr(&mut self, field: &str, cidr: &str, except: &[String]) -> Option<Peer> {
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
        let block = match parse(cidr) {
            Ok(b) => b,
            Err(m) => {
                self.problem(&format!("{field}.cidr"), m);
                return None;
            }
        };
        let mut excepts = Vec::new();
        for (i, e) in except.iter().enumerate() {
            let f = format!("{field}.except[{i}]");
            match parse(e) {
                Ok(net) if block.contains(&net) && net != block => excepts.push(net),
                Ok(_) => self.problem(
                    &f,
                    format!("{e:?} must be a strict subset of cidr {cidr:?}"),
                ),
                Err(m) => self.problem(&f, m),
            }
        }
        Some(Peer::Cidr {
            cidr: block.trunc(),
            except: excepts,
        })
    }

    /// `icmp`: the kind may name ICMP messages (PalisadePolicy).
    fn ports(
        &mut self,
        field: &str,
        ports: Option<&[api::Port]>,
        icmp: bool,
    ) -> (Option<Vec<PortRange>>, Vec<(Protocol, String)>) {
        let mut named = Vec::new();
        let Some(ports) = ports.filter(|p| !p.is_empty()) else {
            return (None, named);
        };
        let mut out = Vec::new();
        for (i, p) in ports.iter().enumerate() {
            let f = format!("{field}.ports[{i}]");
            let protocol = match &p.protocol {
                None => Protocol::Tcp,
                Some(s) => match Protocol::from_api(s)
                    .or_else(|| Protocol::icmp_from_api(s).filter(|_| icmp))
                {
                    Some(p) => p,
                    None => {
                        let also = if icmp { ", \"ICMP\", \"ICMPv6\"" } else { "" };
                        self.problem(
                            &format!("{f}.protocol"),
                            format!("unsupported value {s:?}: supported values: \"TCP\", \"UDP\", \"SCTP\"{also}"),
                        );
                        continue;
                    }
                },
            };
            if protocol.is_icmp() {
                if let Some(range) = self.icmp_messages(&f, p) {
                    out.push(range);
                }
                continue;
            }
            if p.icmp_type.is_some() || p.code.is_some() {
                let which = if p.icmp_type.is_some() {
                    "type"
                } else {
                    "code"
                };
                self.problem(
                    &format!("{f}.{which}"),
                    format!(
                        "only with protocol ICMP or ICMPv6 (this port's protocol is {})",
                        protocol.as_str()
                    ),
                );
                continue;
            }
            let first = match &p.port {
                None => {
                    if p.end_port.is_some() {
                        self.problem(
                            &format!("{f}.endPort"),
                            "may not be specified when port is not specified",
                        );
                    }
                    out.push(PortRange::all(protocol));
                    continue;
                }
                Some(IntOrString::Int(n)) if (1..=65535).contains(n) => *n as u16,
                Some(IntOrString::Int(n)) => {
                    self.problem(
                        &format!("{f}.port"),
                        format!("{n} is out of range: must be between 1 and 65535, inclusive"),
                    );
                    continue;
                }
                Some(IntOrString::String(name)) => {
                    if p.end_port.is_some() {
                        self.problem(
                            &format!("{f}.endPort"),
                            "may not be specified with a named port",
                        );
                    } else if !is_port_name(name) {
                        self.problem(
                            &format!("{f}.port"),
                            format!("{name:?} is not a valid port name: at most 15 lower-case letters, digits and '-', with at least one letter"),
                        );
                    } else {
                        named.push((protocol, name.clone()));
                    }
                    continue;
                }
            };
            let last = match p.end_port {
                None => first,
                Some(e) if !(1..=65535).contains(&e) => {
                    self.problem(
                        &format!("{f}.endPort"),
                        format!("{e} is out of range: must be between 1 and 65535, inclusive"),
                    );
                    continue;
                }
                Some(e) if e < i32::from(first) => {
                    self.problem(
                        &format!("{f}.endPort"),
                        format!("{e} must be greater than or equal to port ({first})"),
                    );
                    continue;
                }
                Some(e) => e as u16,
            };
            out.push(PortRange {
                protocol,
                first,
                last,
            });
        }
        (Some(out), named)
    }

    /// An ICMP rule's messages as a range of `type << 8 | code`: one type
    /// (every code, or one), or every message.
    fn icmp_messages(&mut self, f: &str, p: &api::Port) -> Option<PortRange> {
        let protocol = Protocol::icmp_from_api(p.protocol.as_deref().unwrap_or_default())?;
        let mut ok = true;
        for (field, present) in [
            ("port", p.port.is_some()),
            ("endPort", p.end_port.is_some()),
        ] {
            if present {
                self.problem(
                    &format!("{f}.{field}"),
                    format!(
                        "{} has no ports: name messages with `type` and `code`",
                        protocol.as_str()
                    ),
                );
                ok = false;
            }
        }
        let mut byte = |field: &str, v: Option<i32>| match v {
            Some(n) if !(0..=255).contains(&n) => {
                self.problem(
                    &format!("{f}.{field}"),
                    format!("{n} is out of range: must be between 0 and 255, inclusive"),
                );
                ok = false;
                None
            }
            v => v.map(|n| n as u16),
        };
        let kind = byte("type", p.icmp_type);
        let code = byte("code", p.code);
        if code.is_some() && kind.is_none() {
            self.problem(&format!("{f}.code"), "may not be specified without type");
            ok = false;
        }
        if !ok {
            return None;
        }
        let (first, last) = match (kind, code) {
            (Some(t), Some(c)) => (t << 8 | c, t << 8 | c),
            (Some(t), None) => (t << 8, t << 8 | 0xff),
            _ => (0, u16::MAX),
        };
        Some(PortRange {
            protocol,
            first,
            last,
        })
    }

    fn palisade_policy(
        &mut self,
        meta: &api::ObjectMeta,
        spec: &api::ClusterPalisadePolicySpec,
        cluster: bool,
    ) -> Policy {
        let (name, namespace) = self.metadata(meta, !cluster);
        if cluster && namespace.is_some() {
            self.problem(
                "metadata.namespace",
                "a ClusterPalisadePolicy is not namespaced: remove metadata.namespace",
            );
        }
        let namespace_selector = spec
            .namespaces
            .as_ref()
            .map(|sel| self.selector("spec.namespaces", sel));
        let mode = match spec.mode {
            None | Some(api::Mode::Enforce) => Mode::Enforce,
            Some(api::Mode::Audit) => Mode::Audit,
        };
        let selector = self.selector("spec.selector", &spec.selector);
        let mut convert = |dir: Direction, rules: Option<&Vec<api::Rule>>| {
            rules.map(|rules| {
                rules
                    .iter()
                    .enumerate()
                    .map(|(i, r)| self.palisade_rule(dir, i, r))
                    .collect::<Vec<_>>()
            })
        };
        let ingress = convert(Direction::Ingress, spec.ingress.as_ref());
        let egress = convert(Direction::Egress, spec.egress.as_ref());
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
        Policy {
            name,
            namespace,
            origin: self.origin(if cluster {
                api::CLUSTER_PALISADE_KIND
            } else {
                api::PALISADE_KIND
            }),
            mode,
            selector,
            namespace_selector,
            ingress,
            egress,
        }
    }

    fn palisade_rule(&mut self, dir: Direction, index: usize, r: &api::Rule) -> Rule {
        let field = format!("spec.{}[{index}]", dir.as_str());
        let (peers_field, peers, wrong) = match dir {
            Direction::Ingress => ("from", &r.from, r.to.as_ref().map(|_| "to")),
            Direction::Egress => ("to", &r.to, r.from.as_ref().map(|_| "from")),
        };
        if let Some(w) = wrong {
            self.problem(
                &format!("{field}.{w}"),
                format!("{} rules name their peers in {peers_field:?}", dir.as_str()),
            );
        }
        let action = match r.action {
            None | Some(api::Action::Allow) => Action::Allow,
            Some(api::Action::Deny) => Action::Deny,
        };
        let name = r
            .name
            .clone()
            .unwrap_or_else(|| format!("{}[{index}]", dir.as_str()));
        let peers = peers.as_ref().filter(|p| !p.is_empty()).map(|peers| {
            peers
                .iter()
                .enumerate()
                .filter_map(|(i, p)| self.palisade_peer(&format!("{field}.{peers_field}[{i}]"), p))
                .collect()
        });
        let (ports, named_ports) = self.ports(&field, r.ports.as_deref(), true);
        Rule {
            name,
            action,
            peers,
            ports,
            named_ports,
        }
    }

    fn palisade_peer(&mut self, field: &str, p: &api::Peer) -> Option<Peer> {
        let workloads = p.selector.is_some() || p.namespaces.is_some();
        let kinds = [workloads, p.identity.is_some(), p.cidr.is_some()]
            .iter()
            .filter(|b| **b)
            .count();
        if kinds != 1 {
            self.problem(
                field,
                "must specify exactly one of: selector/namespaces, identity, cidr",
            );
            return None;
        }
        if !p.except.is_empty() && p.cidr.is_none() {
            self.problem(&format!("{field}.except"), "is only valid with cidr");
        }
        if let Some(id) = &p.identity {
            if id.is_empty() {
                self.problem(&format!("{field}.identity"), "must not be empty");
                return None;
            }
            return Some(Peer::Identity(id.clone()));
        }
        if let Some(c) = &p.cidr {
            return self.cidr(field, c, &p.except);
        }
        let pods = p
            .selector
            .as_ref()
            .map(|s| self.selector(&format!("{field}.selector"), s));
        let namespaces = p
            .namespaces
            .as_ref()
            .map(|n| self.selector(&format!("{field}.namespaces"), n));
        Some(Peer::Workloads {
            pods,
            namespaces: namespaces.map_or(NamespaceScope::Same, NamespaceScope::Matching),
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
