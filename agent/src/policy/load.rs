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
    labels::LabelSelector,
    model::{
        Action, Direction, Mode, NamespaceScope, Origin, Peer, Policy, PortRange, Protocol, Rule,
    },
};

/// Files larger than this are refused before parsing.
pub const MAX_FILE_BYTES: u64 = 4 * 1024 * 1024;

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
pub fn load_paths(paths: &[PathBuf]) -> Result<PolicySet, LoadError> {
    let mut files = Vec::new();
    let mut problems = Vec::new();
    for path in paths {
        if path.is_dir() {
            match std::fs::read_dir(path) {
                Ok(entries) => {
                    let mut found: Vec<PathBuf> = entries
                        .filter_map(Result::ok)
                        .map(|e| e.path())
                        .filter(|p| {
                            p.is_file()
                                && matches!(
                                    p.extension().and_then(|e| e.to_str()),
                                    Some("yaml" | "yml")
                                )
                        })
                        .collect();
                    found.sort();
                    files.extend(found);
                }
                Err(e) => problems.push(file_problem(path, format!("cannot read directory: {e}"))),
            }
        } else {
            files.push(path.clone());
        }
    }
    let mut set = PolicySet::default();
    for file in &files {
        match read_file(file) {
            Ok(text) => match parse_str(&file.display().to_string(), &text) {
                Ok(policies) => set.policies.extend(policies),
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

fn yaml_options() -> serde_saphyr::Options {
    let mut options = serde_saphyr::Options::default();
    options.with_snippet = false;
    options
}

fn parse_doc<T: DeserializeOwned>(file: &str, doc: &Document<'_>) -> Result<T, Problem> {
    serde_saphyr::from_str_with_options(doc.text, yaml_options()).map_err(|e| {
        let (line, column) = e
            .location()
            .map(|l| (l.line() as usize, l.column() as usize))
            .unwrap_or((1, 1));
        let message = e.to_string();
        // The library appends its own location; ours is in front.
        let message = match message.rfind(" at line ") {
            Some(i) => message[..i].to_owned(),
            None => message,
        };
        // Library advice that does not apply to a policy author.
        let message = message.replace(", set DuplicateKeyPolicy in Options if acceptable", "");
        Problem {
            file: file.to_owned(),
            line: doc.first_line + line.saturating_sub(1),
            column,
            field: String::new(),
            message,
        }
    })
}

/// Parses and validates every document of one file.
pub fn parse_str(file: &str, text: &str) -> Result<Vec<Policy>, LoadError> {
    let mut policies = Vec::new();
    let mut problems = Vec::new();
    for doc in split_documents(text) {
        let meta: api::TypeMeta = match parse_doc(file, &doc) {
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
                parse_doc::<api::PalisadePolicy>(file, &doc).map(|pp| cx.palisade_policy(pp))
            }
            (api_version, kind) => {
                cx.problem(
                    if api_version.is_none() {
                        "apiVersion"
                    } else {
                        "kind"
                    },
                    format!(
                        "unsupported document apiVersion={} kind={}; expected {} {} or {} {}",
                        api_version.unwrap_or("(missing)"),
                        kind.unwrap_or("(missing)"),
                        api::NETWORK_POLICY_API,
                        api::NETWORK_POLICY_KIND,
                        api::PALISADE_API,
                        api::PALISADE_KIND
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
    line: usize,
    problems: Vec<Problem>,
}

impl Validator<'_> {
    fn problem(&mut self, field: &str, message: impl Into<String>) {
        self.problems.push(Problem {
            file: self.file.to_owned(),
            line: self.line,
            column: 1,
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
        let name = meta.name.clone().unwrap_or_default();
        if name.is_empty() {
            self.problem("metadata.name", "is required");
        } else if !is_dns_subdomain(&name) {
            self.problem(
                "metadata.name",
                format!("{name:?} must be a DNS subdomain: lower-case letters, digits, '-' and '.', at most 253 characters"),
            );
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

    fn selector(&mut self, field: &str, sel: &LabelSelector) {
        for (f, m) in sel.validate() {
            self.problem(&format!("{field}.{f}"), m);
        }
    }

    fn network_policy(&mut self, np: api::NetworkPolicy) -> Option<Policy> {
        let (name, namespace) = self.metadata(&np.metadata, true);
        let spec = np.spec;
        let pod_selector = spec.pod_selector.unwrap_or_default();
        self.selector("spec.podSelector", &pod_selector);
        // API server defaulting: Ingress always, Egress when egress rules exist.
        let types: Vec<String> = match spec.policy_types {
            Some(t) => t,
            None => {
                let mut t = vec!["Ingress".to_owned()];
                if spec.egress.as_ref().is_some_and(|e| !e.is_empty()) {
                    t.push("Egress".to_owned());
                }
                t
            }
        };
        let mut ingress_on = false;
        let mut egress_on = false;
        for (i, t) in types.iter().enumerate() {
            match t.as_str() {
                "Ingress" => ingress_on = true,
                "Egress" => egress_on = true,
                other => self.problem(
                    &format!("spec.policyTypes[{i}]"),
                    format!(
                        "unsupported value {other:?}: supported values: \"Ingress\", \"Egress\""
                    ),
                ),
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
            ingress: ingress_on.then_some(ingress),
            egress: egress_on.then_some(egress),
        })
    }

    fn k8s_rule(
        &mut self,
        field: &str,
        peers_field: &str,
        peers: Option<Vec<NetworkPolicyPeer>>,
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
        Rule {
            name,
            action: Action::Allow,
            peers,
            ports: self.ports(field, ports),
        }
    }

    fn k8s_peer(&mut self, field: &str, peer: NetworkPolicyPeer) -> Option<Peer> {
        match (peer.pod_selector, peer.namespace_selector, peer.ip_block) {
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
            (None, None, Some(block)) => {
                self.cidr(&format!("{field}.ipBlock"), &block.cidr, &block.except)
            }
            (pods, namespaces, None) => {
                if let Some(p) = &pods {
                    self.selector(&format!("{field}.podSelector"), p);
                }
                if let Some(n) = &namespaces {
                    self.selector(&format!("{field}.namespaceSelector"), n);
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

    fn ports(
        &mut self,
        field: &str,
        ports: Option<Vec<NetworkPolicyPort>>,
    ) -> Option<Vec<PortRange>> {
        let ports = ports.filter(|p| !p.is_empty())?;
        let mut out = Vec::new();
        for (i, p) in ports.into_iter().enumerate() {
            let f = format!("{field}.ports[{i}]");
            let protocol = match p.protocol.as_deref() {
                None | Some("TCP") => Protocol::Tcp,
                Some("UDP") => Protocol::Udp,
                Some("SCTP") => Protocol::Sctp,
                Some(other) => {
                    self.problem(
                        &format!("{f}.protocol"),
                        format!("unsupported value {other:?}: supported values: \"TCP\", \"UDP\", \"SCTP\""),
                    );
                    continue;
                }
            };
            let first = match p.port {
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
                Some(IntOrString::Int(n)) if (1..=65535).contains(&n) => n as u16,
                Some(IntOrString::Int(n)) => {
                    self.problem(
                        &format!("{f}.port"),
                        format!("{n} is out of range: must be between 1 and 65535, inclusive"),
                    );
                    continue;
                }
                Some(IntOrString::String(name)) => {
                    self.problem(
                        &format!("{f}.port"),
                        format!("named port {name:?} is not supported yet: use the port number"),
                    );
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
                Some(e) if e < i64::from(first) => {
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
        Some(out)
    }

    fn palisade_policy(&mut self, pp: api::PalisadePolicy) -> Option<Policy> {
        let (name, namespace) = self.metadata(&pp.metadata, true);
        let spec = pp.spec;
        let mode = match spec.mode.as_deref() {
            None | Some("enforce") => Mode::Enforce,
            Some("audit") => Mode::Audit,
            Some(other) => {
                self.problem(
                    "spec.mode",
                    format!(
                        "unsupported value {other:?}: supported values: \"enforce\", \"audit\""
                    ),
                );
                Mode::Enforce
            }
        };
        self.selector("spec.selector", &spec.selector);
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
            origin: self.origin(api::PALISADE_KIND),
            mode,
            selector: spec.selector,
            ingress,
            egress,
        })
    }

    fn palisade_rule(&mut self, dir: Direction, index: usize, r: api::PalisadeRule) -> Rule {
        let field = format!("spec.{}[{index}]", dir.as_str());
        let (peers_field, peers, wrong) = match dir {
            Direction::Ingress => ("from", r.from, r.to.is_some().then_some("to")),
            Direction::Egress => ("to", r.to, r.from.is_some().then_some("from")),
        };
        if let Some(w) = wrong {
            self.problem(
                &format!("{field}.{w}"),
                format!("{} rules name their peers in {peers_field:?}", dir.as_str()),
            );
        }
        let action = match r.action.as_deref() {
            None | Some("allow") => Action::Allow,
            Some("deny") => Action::Deny,
            Some(other) => {
                self.problem(
                    &format!("{field}.action"),
                    format!("unsupported value {other:?}: supported values: \"allow\", \"deny\""),
                );
                Action::Allow
            }
        };
        let name = r
            .name
            .unwrap_or_else(|| format!("{}[{index}]", dir.as_str()));
        let peers = peers.filter(|p| !p.is_empty()).map(|peers| {
            peers
                .into_iter()
                .enumerate()
                .filter_map(|(i, p)| self.palisade_peer(&format!("{field}.{peers_field}[{i}]"), p))
                .collect()
        });
        Rule {
            name,
            action,
            peers,
            ports: self.ports(&field, r.ports),
        }
    }

    fn palisade_peer(&mut self, field: &str, p: api::PalisadePeer) -> Option<Peer> {
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
        if let Some(id) = p.identity {
            if id.is_empty() {
                self.problem(&format!("{field}.identity"), "must not be empty");
                return None;
            }
            return Some(Peer::Identity(id));
        }
        if let Some(c) = p.cidr {
            return self.cidr(field, &c, &p.except);
        }
        if let Some(s) = &p.selector {
            self.selector(&format!("{field}.selector"), s);
        }
        if let Some(n) = &p.namespaces {
            self.selector(&format!("{field}.namespaces"), n);
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

fn is_dns_subdomain(s: &str) -> bool {
    s.len() <= 253
        && s.split('.').all(|label| {
            !label.is_empty()
                && label
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}
