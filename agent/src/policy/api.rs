//! The user-facing policy documents, exactly as written in YAML: Kubernetes
//! `networking.k8s.io/v1` NetworkPolicy and Palisade's own
//! `palisade.dev/v1alpha1` PalisadePolicy. This is the only place that derives
//! `Deserialize` for policy; `load` validates these and converts them into
//! `model` types. Unknown fields are rejected.
use std::collections::BTreeMap;

use serde::Deserialize;

use super::labels::LabelSelector;

/// A value with the place it was written, for located validation messages.
pub type S<T> = serde_saphyr::Spanned<T>;

pub const NETWORK_POLICY_API: &str = "networking.k8s.io/v1";
pub const NETWORK_POLICY_KIND: &str = "NetworkPolicy";
pub const PALISADE_API: &str = "palisade.dev/v1alpha1";
pub const PALISADE_KIND: &str = "PalisadePolicy";
pub const CLUSTER_PALISADE_KIND: &str = "ClusterPalisadePolicy";

/// Just enough of any document to route it to the right type.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TypeMeta {
    pub api_version: Option<String>,
    pub kind: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ObjectMeta {
    pub name: Option<S<String>>,
    pub namespace: Option<String>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
    // Fields a `kubectl get -o yaml` export carries; accepted and ignored.
    pub uid: Option<String>,
    pub resource_version: Option<String>,
    pub generation: Option<i64>,
    pub creation_timestamp: Option<String>,
    pub managed_fields: Option<serde::de::IgnoredAny>,
}

// ---------------------------------------------------------------- Kubernetes

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct NetworkPolicy {
    pub api_version: String,
    pub kind: String,
    pub metadata: ObjectMeta,
    pub spec: NetworkPolicySpec,
    pub status: Option<serde::de::IgnoredAny>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct NetworkPolicySpec {
    pub pod_selector: Option<S<LabelSelector>>,
    pub policy_types: Option<Vec<S<String>>>,
    pub ingress: Option<Vec<NetworkPolicyIngressRule>>,
    pub egress: Option<Vec<NetworkPolicyEgressRule>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct NetworkPolicyIngressRule {
    pub from: Option<Vec<S<NetworkPolicyPeer>>>,
    pub ports: Option<Vec<NetworkPolicyPort>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct NetworkPolicyEgressRule {
    pub to: Option<Vec<S<NetworkPolicyPeer>>>,
    pub ports: Option<Vec<NetworkPolicyPort>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct NetworkPolicyPeer {
    pub pod_selector: Option<LabelSelector>,
    pub namespace_selector: Option<LabelSelector>,
    pub ip_block: Option<IpBlock>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct IpBlock {
    pub cidr: S<String>,
    #[serde(default)]
    pub except: Vec<S<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct NetworkPolicyPort {
    pub protocol: Option<S<String>>,
    pub port: Option<S<IntOrString>>,
    pub end_port: Option<S<Integer>>,
}

/// An integer field: as in the API server, a quoted `"90"` is a string and
/// is refused, not converted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Integer(pub i64);

impl<'de> Deserialize<'de> for Integer {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Integer;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("an integer")
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Integer, E> {
                Ok(Integer(v))
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Integer, E> {
                Ok(Integer(i64::try_from(v).unwrap_or(i64::MAX)))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Integer, E> {
                Err(E::custom(format!(
                    "expected an integer, found the string {v:?} (write the number without quotes)"
                )))
            }
        }
        d.deserialize_any(V)
    }
}

/// Kubernetes `IntOrString`: a port number or a port name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum IntOrString {
    Int(i64),
    String(String),
}

impl<'de> Deserialize<'de> for IntOrString {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = IntOrString;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a port number or a port name")
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<IntOrString, E> {
                Ok(IntOrString::Int(v))
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<IntOrString, E> {
                Ok(IntOrString::Int(i64::try_from(v).unwrap_or(i64::MAX)))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<IntOrString, E> {
                Ok(IntOrString::String(v.to_owned()))
            }
        }
        d.deserialize_any(V)
    }
}

// ------------------------------------------------------------------ Palisade

/// Palisade's own policy kind: the same model as NetworkPolicy, plus named
/// rules, explicit deny rules, identities by name and an audit mode.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PalisadePolicy {
    pub api_version: String,
    pub kind: String,
    pub metadata: ObjectMeta,
    pub spec: PalisadePolicySpec,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PalisadePolicySpec {
    /// `enforce` (default) or `audit`.
    pub mode: Option<S<String>>,
    /// Workloads this policy applies to, in the policy's namespace (any
    /// namespace for a ClusterPalisadePolicy).
    pub selector: S<LabelSelector>,
    /// ClusterPalisadePolicy only: limits the namespaces whose workloads it selects.
    pub namespaces: Option<S<LabelSelector>>,
    /// Present (even empty) ⇒ selected workloads are default-deny for ingress.
    pub ingress: Option<Vec<PalisadeRule>>,
    /// Present (even empty) ⇒ selected workloads are default-deny for egress.
    pub egress: Option<Vec<PalisadeRule>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PalisadeRule {
    pub name: Option<S<String>>,
    /// `allow` (default) or `deny`; a deny beats every allow.
    pub action: Option<S<String>>,
    /// Ingress peers. Absent ⇒ any peer.
    pub from: Option<Vec<S<PalisadePeer>>>,
    /// Egress peers. Absent ⇒ any peer.
    pub to: Option<Vec<S<PalisadePeer>>>,
    /// Absent ⇒ every port of every protocol.
    pub ports: Option<Vec<NetworkPolicyPort>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PalisadePeer {
    /// Workloads by labels (in `namespaces`, or the policy's own namespace).
    pub selector: Option<LabelSelector>,
    /// Namespaces by labels; `{}` is every namespace.
    pub namespaces: Option<LabelSelector>,
    /// An identity by name: `spiffe://<trust-domain>/ns/<ns>/sa/<sa>` or `<ns>/<name>`.
    pub identity: Option<S<String>>,
    pub cidr: Option<S<String>>,
    #[serde(default)]
    pub except: Vec<S<String>>,
}
