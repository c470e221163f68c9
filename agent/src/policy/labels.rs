//! Label sets and label selectors (Kubernetes `LabelSelector` semantics:
//! `matchLabels` and `matchExpressions` are ANDed; an empty selector matches
//! everything).
use std::collections::BTreeMap;

use serde::Deserialize;

pub type Labels = BTreeMap<String, String>;

/// The label the Kubernetes API server sets on every namespace.
pub const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";

/// Namespace labels as the compiler sees them: the `declared` namespaces with
/// their labels, plus every namespace in `also` (without labels of its own),
/// each carrying `kubernetes.io/metadata.name` as the API server sets it.
pub fn namespace_labels<'a>(
    declared: impl IntoIterator<Item = (&'a str, &'a Labels)>,
    also: impl IntoIterator<Item = &'a str>,
) -> BTreeMap<String, Labels> {
    let mut out: BTreeMap<String, Labels> = declared
        .into_iter()
        .map(|(name, labels)| (name.to_owned(), labels.clone()))
        .collect();
    for name in also {
        out.entry(name.to_owned()).or_default();
    }
    for (name, labels) in &mut out {
        labels.insert(NAMESPACE_NAME_LABEL.to_owned(), name.clone());
    }
    out
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct LabelSelector {
    #[serde(default)]
    pub match_labels: Labels,
    #[serde(default)]
    pub match_expressions: Vec<Requirement>,
}

#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Requirement {
    pub key: String,
    pub operator: Operator,
    #[serde(default)]
    pub values: Vec<String>,
}

#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
pub enum Operator {
    In,
    NotIn,
    Exists,
    DoesNotExist,
}

impl LabelSelector {
    /// The selector an API object spells, with the problems the API server
    /// would reject it for, as (field, message). A requirement with an
    /// unknown operator is left out (and is the problem named).
    pub fn from_api(
        api: &k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector,
    ) -> (Self, Vec<(String, String)>) {
        let mut unknown = Vec::new();
        let mut selector = LabelSelector {
            match_labels: api.match_labels.clone().unwrap_or_default(),
            match_expressions: Vec::new(),
        };
        for (i, r) in api.match_expressions.iter().flatten().enumerate() {
            let operator = match r.operator.as_str() {
                "In" => Operator::In,
                "NotIn" => Operator::NotIn,
                "Exists" => Operator::Exists,
                "DoesNotExist" => Operator::DoesNotExist,
                other => {
                    unknown.push((
                        format!("matchExpressions[{i}].operator"),
                        format!("unsupported value {other:?}: supported values: \"In\", \"NotIn\", \"Exists\", \"DoesNotExist\""),
                    ));
                    continue;
                }
            };
            selector.match_expressions.push(Requirement {
                key: r.key.clone(),
                operator,
                values: r.values.clone().unwrap_or_default(),
            });
        }
        // With a requirement left out the indices would shift: report the
        // unknown operators alone first.
        let problems = if unknown.is_empty() {
            selector.validate()
        } else {
            unknown
        };
        (selector, problems)
    }

    pub fn matches(&self, labels: &Labels) -> bool {
        self.match_labels
            .iter()
            .all(|(k, v)| labels.get(k) == Some(v))
            && self.match_expressions.iter().all(|r| r.matches(labels))
    }

    /// Problems an API server would reject, as (field, message).
    pub fn validate(&self) -> Vec<(String, String)> {
        let mut problems: Vec<(String, String)> = labels_problems(&self.match_labels)
            .into_iter()
            .map(|(_, m)| ("matchLabels".to_owned(), m))
            .collect();
        for (i, r) in self.match_expressions.iter().enumerate() {
            let kp = key_problems(&r.key);
            if !kp.is_empty() {
                problems.push((format!("matchExpressions[{i}].key"), invalid(&r.key, &kp)));
            }
            for (j, v) in r.values.iter().enumerate() {
                let vp = value_problems(v);
                if !vp.is_empty() {
                    problems.push((
                        format!("matchExpressions[{i}].values[{j}]"),
                        invalid(v, &vp),
                    ));
                }
            }
            let field = format!("matchExpressions[{i}].values");
            match r.operator {
                Operator::In | Operator::NotIn if r.values.is_empty() => problems.push((
                    field,
                    format!("must be non-empty when operator is {:?}", r.operator),
                )),
                Operator::Exists | Operator::DoesNotExist if !r.values.is_empty() => {
                    problems.push((
                        field,
                        format!("must be empty when operator is {:?}", r.operator),
                    ))
                }
                _ => {}
            }
        }
        problems
    }
}

impl Requirement {
    fn matches(&self, labels: &Labels) -> bool {
        let value = labels.get(&self.key);
        match self.operator {
            Operator::In => value.is_some_and(|v| self.values.contains(v)),
            Operator::NotIn => value.is_none_or(|v| !self.values.contains(v)),
            Operator::Exists => value.is_some(),
            Operator::DoesNotExist => value.is_none(),
        }
    }
}

// ----------------------------------------------------------- validation
// The API server's checks (apimachinery's IsQualifiedName,
// IsValidLabelValue, IsDNS1123Label, IsDNS1123Subdomain), with its messages.

const QUALIFIED_NAME_FMT: &str = "([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]";
const LABEL_VALUE_FMT: &str = "(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?";
const DNS1123_LABEL_FMT: &str = "[a-z0-9]([-a-z0-9]*[a-z0-9])?";
const DNS1123_SUBDOMAIN_FMT: &str =
    "[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*";

fn regex_error(msg: &str, fmt: &str, examples: &[&str]) -> String {
    let examples: Vec<String> = examples.iter().map(|e| format!("'{e}', ")).collect();
    format!(
        "{msg} (e.g. {}regex used for validation is '{fmt}')",
        examples.join(" or ")
    )
}

fn max_len(n: usize) -> String {
    format!("must be no more than {n} characters")
}

/// `[A-Za-z0-9]` at both ends, `[-A-Za-z0-9_.]` between.
fn is_qualified_name_part(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric()
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
}

fn is_dns1123_label(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && (b[0].is_ascii_lowercase() || b[0].is_ascii_digit())
        && (b[b.len() - 1].is_ascii_lowercase() || b[b.len() - 1].is_ascii_digit())
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
}

/// IsDNS1123Label: namespace names.
pub fn dns1123_label_problems(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    if s.len() > 63 {
        out.push(max_len(63));
    }
    if !is_dns1123_label(s) {
        out.push(regex_error(
            "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must start and end with an alphanumeric character",
            DNS1123_LABEL_FMT,
            &["my-name", "123-abc"],
        ));
    }
    out
}

/// IsDNS1123Subdomain: object names, label key prefixes.
pub fn dns1123_subdomain_problems(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    if s.len() > 253 {
        out.push(max_len(253));
    }
    if !s.split('.').all(is_dns1123_label) {
        out.push(regex_error(
            "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character",
            DNS1123_SUBDOMAIN_FMT,
            &["example.com"],
        ));
    }
    out
}

/// IsQualifiedName: label keys (`[prefix/]name`).
pub fn key_problems(key: &str) -> Vec<String> {
    let name_error = || {
        regex_error(
            "must consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character",
            QUALIFIED_NAME_FMT,
            &["MyName", "my.name", "123-abc"],
        )
    };
    let mut out = Vec::new();
    let parts: Vec<&str> = key.split('/').collect();
    let name = match parts[..] {
        [name] => name,
        [prefix, name] => {
            if prefix.is_empty() {
                out.push("prefix part must be non-empty".to_owned());
            } else {
                out.extend(
                    dns1123_subdomain_problems(prefix)
                        .into_iter()
                        .map(|m| format!("prefix part {m}")),
                );
            }
            name
        }
        _ => {
            return vec![format!(
                "a qualified name {} with an optional DNS subdomain prefix and '/' (e.g. 'example.com/MyName')",
                name_error()
            )];
        }
    };
    if name.is_empty() {
        out.push("name part must be non-empty".to_owned());
    } else if name.len() > 63 {
        out.push(format!("name part {}", max_len(63)));
    }
    if !is_qualified_name_part(name) {
        out.push(format!("name part {}", name_error()));
    }
    out
}

/// IsValidLabelValue.
pub fn value_problems(value: &str) -> Vec<String> {
    let mut out = Vec::new();
    if value.len() > 63 {
        out.push(max_len(63));
    }
    if !value.is_empty() && !is_qualified_name_part(value) {
        out.push(regex_error(
            "a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character",
            LABEL_VALUE_FMT,
            &["MyValue", "my_value", "12345"],
        ));
    }
    out
}

/// `Invalid value: "…": m1, m2` as the API server words it (the value cut
/// short when long: a 3 MB label value is not echoed back).
pub fn invalid(value: &str, problems: &[String]) -> String {
    let shown: String = value.chars().take(80).collect();
    let shown = if shown.len() < value.len() {
        format!("{shown}… ({} bytes)", value.len())
    } else {
        shown
    };
    format!("Invalid value: {shown:?}: {}", problems.join(", "))
}

/// Problems of a label set, as (field, message).
pub fn labels_problems(labels: &Labels) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for (k, v) in labels {
        let kp = key_problems(k);
        if !kp.is_empty() {
            out.push((String::new(), invalid(k, &kp)));
        }
        let vp = value_problems(v);
        if !vp.is_empty() {
            out.push((String::new(), invalid(v, &vp)));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn empty_selector_matches_everything() {
        assert!(LabelSelector::default().matches(&labels(&[])));
        assert!(LabelSelector::default().matches(&labels(&[("app", "x")])));
    }

    #[test]
    fn expressions_follow_kubernetes_semantics() {
        let sel = |op, values: &[&str]| LabelSelector {
            match_labels: Labels::new(),
            match_expressions: vec![Requirement {
                key: "tier".into(),
                operator: op,
                values: values.iter().map(|v| (*v).to_owned()).collect(),
            }],
        };
        let web = labels(&[("tier", "web")]);
        let none = labels(&[]);
        assert!(sel(Operator::In, &["web", "db"]).matches(&web));
        assert!(!sel(Operator::In, &["db"]).matches(&web));
        assert!(!sel(Operator::In, &["web"]).matches(&none));
        assert!(sel(Operator::NotIn, &["db"]).matches(&web));
        assert!(
            sel(Operator::NotIn, &["db"]).matches(&none),
            "NotIn matches a missing key"
        );
        assert!(sel(Operator::Exists, &[]).matches(&web));
        assert!(!sel(Operator::Exists, &[]).matches(&none));
        assert!(sel(Operator::DoesNotExist, &[]).matches(&none));
        assert!(!sel(Operator::DoesNotExist, &[]).matches(&web));
    }
}
