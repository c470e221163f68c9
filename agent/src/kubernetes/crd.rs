//! Palisade's policy kinds as Kubernetes CustomResourceDefinitions, generated
//! from the policy API's Rust types (kube's `CustomResource` derive with a JSON schema).
//! `deploy/kubernetes/crds.yaml` is the committed output of [`crds_yaml`]; a
//! test fails when the two differ (`palisade crds > deploy/kubernetes/crds.yaml`
//! regenerates it).
//!
//! The types themselves are the one policy schema in `policy::api`; the
//! agent validates a cluster object with the same code as a policy file
//! (`policy::load`), so both paths accept exactly the same policies.
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt as _;

use crate::policy::api::{ClusterPalisadePolicy, PalisadePolicy};

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
