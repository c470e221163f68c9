//! Palisade's policy kinds as Kubernetes CustomResourceDefinitions, generated
//! from these Rust types (kube's `CustomResource` derive with a JSON schema).
//! `deploy/kubernetes/crds.yaml` is the committed output of [`crds_yaml`]; a
//! test fails when the two differ (`palisade crds > deploy/kubernetes/crds.yaml`
//! regenerates it).
//!
//! These types describe the objects as the API server stores them. The agent
//! still validates each object with the same code as a policy file
//! (`policy::load`), so both paths accept exactly the same policies.
use k8s_openapi::{
    apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
    apimachinery::pkg::{apis::meta::v1::LabelSelector, util::intstr::IntOrString},
};
use kube::{CustomResource, CustomResourceExt as _};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// `enforce` drops what no rule allows; `audit` only reports it (`would-deny`).
#[derive(Clone, Copy, Debug, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Enforce,
    Audit,
}

/// `allow` (default) or `deny`; a deny beats every allow.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Allow,
    Deny,
}

/// One rule: peers, ports and what to do.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Rule {
    /// Name shown in audit events.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub action: Option<Action>,
    /// Ingress peers. Absent: any peer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<Vec<Peer>>,
    /// Egress peers. Absent: any peer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<Vec<Peer>>,
    /// Absent: every port of every protocol.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ports: Option<Vec<Port>>,
}

/// A peer: workloads by labels, namespaces by labels, an identity by name, or a CIDR.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Peer {
    /// Workloads by labels (in `namespaces`, or the policy's own namespace).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<LabelSelector>,
    /// Namespaces by labels; `{}` is every namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespaces: Option<LabelSelector>,
    /// `spiffe://<trust-domain>/ns/<ns>/sa/<sa>` or `<ns>/<name>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cidr: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub except: Vec<String>,
}

/// A port, a named port, or a range (`port`..`endPort`), as in NetworkPolicy.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Port {
    /// `TCP` (default), `UDP` or `SCTP`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<IntOrString>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end_port: Option<i32>,
}

/// Which workloads a PalisadePolicy protects and what may reach them or be reached.
#[derive(CustomResource, Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[kube(
    group = "palisade.dev",
    version = "v1alpha1",
    kind = "PalisadePolicy",
    plural = "palisadepolicies",
    shortname = "ppol",
    namespaced,
    doc = "Palisade's own policy kind: NetworkPolicy's model plus named rules, deny rules, identities by name and an audit mode. Selects workloads in its namespace.",
    printcolumn = r#"{"name":"Mode","type":"string","jsonPath":".spec.mode"}"#
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PalisadePolicySpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<Mode>,
    /// Workloads this policy applies to, in the policy's namespace.
    pub selector: LabelSelector,
    /// Present (even empty): selected workloads are default-deny for ingress.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ingress: Option<Vec<Rule>>,
    /// Present (even empty): selected workloads are default-deny for egress.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress: Option<Vec<Rule>>,
}

/// The cluster-wide form: selects workloads in every namespace (or those `namespaces` selects).
#[derive(CustomResource, Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[kube(
    group = "palisade.dev",
    version = "v1alpha1",
    kind = "ClusterPalisadePolicy",
    plural = "clusterpalisadepolicies",
    shortname = "cppol",
    doc = "A PalisadePolicy for the whole cluster: selects workloads in every namespace, or in the namespaces `spec.namespaces` selects.",
    printcolumn = r#"{"name":"Mode","type":"string","jsonPath":".spec.mode"}"#
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ClusterPalisadePolicySpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<Mode>,
    /// Workloads this policy applies to.
    pub selector: LabelSelector,
    /// Limits the namespaces whose workloads it selects. Absent: every namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespaces: Option<LabelSelector>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ingress: Option<Vec<Rule>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress: Option<Vec<Rule>>,
}

/// Both CRDs.
pub fn crds() -> Vec<CustomResourceDefinition> {
    vec![PalisadePolicy::crd(), ClusterPalisadePolicy::crd()]
}

/// Both CRDs as one multi-document YAML file, as committed under deploy/.
pub fn crds_yaml() -> String {
    let mut out = String::from(
        "# Generated from agent/src/kubernetes/crd.rs by `palisade crds`; do not edit.\n",
    );
    for crd in crds() {
        out.push_str("---\n");
        out.push_str(&serde_saphyr::to_string(&crd).unwrap_or_default());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn committed_crds_match_the_rust_types() {
        let path =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/kubernetes/crds.yaml");
        let committed = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            committed == crds_yaml(),
            "{} is stale: regenerate it with `cargo run -p palisade -- crds > deploy/kubernetes/crds.yaml`",
            path.display()
        );
    }

    #[test]
    fn the_example_palisade_policies_fit_the_crd_types() {
        // Every PalisadePolicy document under policies/ deserializes into the
        // CRD's types (unknown fields rejected), so what users write as files
        // they can `kubectl apply` too.
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies");
        let mut seen = 0;
        for dir in ["palisade", "examples"] {
            for entry in std::fs::read_dir(root.join(dir)).unwrap() {
                let text = std::fs::read_to_string(entry.unwrap().path()).unwrap();
                for doc in text.split("\n---") {
                    if doc.contains("kind: PalisadePolicy") {
                        let _: PalisadePolicy = serde_saphyr::from_str(doc).unwrap();
                        seen += 1;
                    } else if doc.contains("kind: ClusterPalisadePolicy") {
                        let _: ClusterPalisadePolicy = serde_saphyr::from_str(doc).unwrap();
                        seen += 1;
                    }
                }
            }
        }
        assert!(seen >= 3, "found {seen} Palisade policies");
    }
}
