//! The one policy schema: the documents users write and the API server
//! stores, as Rust types. NetworkPolicy is k8s-openapi's own type, unchanged;
//! PalisadePolicy and ClusterPalisadePolicy are the CRD types (kube's
//! `CustomResource` derive; `kubernetes::crd` renders their
//! CustomResourceDefinitions). Policy files and cluster objects deserialize
//! into these same types; `schema` checks a file's structure against the
//! JSON Schema generated from them, and `load` validates their semantics and
//! converts them into `model` types.
pub use k8s_openapi::{
    api::networking::v1::{NetworkPolicy, NetworkPolicyPeer, NetworkPolicyPort},
    apimachinery::pkg::{
        apis::meta::v1::{LabelSelector, ObjectMeta},
        util::intstr::IntOrString,
    },
};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

pub const NETWORK_POLICY_API: &str = "networking.k8s.io/v1";
pub const NETWORK_POLICY_KIND: &str = "NetworkPolicy";
pub const PALISADE_API: &str = "palisade.dev/v1alpha1";
pub const PALISADE_KIND: &str = "PalisadePolicy";
pub const CLUSTER_PALISADE_KIND: &str = "ClusterPalisadePolicy";

// ------------------------------------------------------------------ Palisade

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
    /// Absent: every port of TCP, UDP and SCTP.
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

/// A port, a named port, or a range (`port`..`endPort`), as in NetworkPolicy;
/// or ICMP messages by `type` and `code`.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Port {
    /// `TCP` (default), `UDP` or `SCTP`; `ICMP` or `ICMPv6` (PalisadePolicy
    /// rules only) with `type` and `code` instead of a port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<IntOrString>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end_port: Option<i32>,
    /// ICMP/ICMPv6 only: the message type, 0–255 (echo request: 8 for ICMP,
    /// 128 for ICMPv6). Absent: every type.
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    pub icmp_type: Option<i32>,
    /// ICMP/ICMPv6 only, with `type`: the message code, 0–255. Absent: every code.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<i32>,
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

impl From<PalisadePolicySpec> for ClusterPalisadePolicySpec {
    /// A namespaced policy's spec as the cluster-wide form with no namespace selector.
    fn from(spec: PalisadePolicySpec) -> Self {
        ClusterPalisadePolicySpec {
            mode: spec.mode,
            selector: spec.selector,
            namespaces: None,
            ingress: spec.ingress,
            egress: spec.egress,
        }
    }
}
