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
    pub fn matches(&self, labels: &Labels) -> bool {
        self.match_labels
            .iter()
            .all(|(k, v)| labels.get(k) == Some(v))
            && self.match_expressions.iter().all(|r| r.matches(labels))
    }

    /// Problems an API server would reject, as (field, message).
    pub fn validate(&self) -> Vec<(String, String)> {
        let mut problems = Vec::new();
        for (i, r) in self.match_expressions.iter().enumerate() {
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
