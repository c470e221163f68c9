//! Identities: one small number per distinct label set (namespace included).
//! Workloads with the same labels share an identity. Numbers are stable while
//! a label set is in use and are not reused after release, so an audit event
//! never names the wrong workload.
//!
//! Reserved numbers (see `palisade_common::identity`): 0 = any (policy
//! wildcard only), 1 = host, 2 = world, 3 = unmanaged local cgroup, 4 = a
//! pod not known yet (Kubernetes mode); dynamic
//! identities start at 256; identities for policy CIDR blocks start at 2^24.
use std::collections::{BTreeMap, BTreeSet};

use palisade_common::identity as reserved;

use crate::policy::labels::Labels;

/// Label keys that name a service account (Kubernetes pods carry the first).
const SERVICE_ACCOUNT_LABELS: [&str; 2] = ["io.kubernetes.pod.serviceaccount", "serviceaccount"];

/// The key identities are allocated by.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct LabelKey {
    pub namespace: Option<String>,
    pub labels: Labels,
}

#[derive(Debug)]
pub struct Allocator {
    by_labels: BTreeMap<LabelKey, u32>,
    next: u32,
}

impl Default for Allocator {
    fn default() -> Self {
        Allocator {
            by_labels: BTreeMap::new(),
            next: reserved::FIRST_DYNAMIC,
        }
    }
}

impl Allocator {
    /// The identity of `key`, allocating one if it is new.
    pub fn get_or_allocate(&mut self, key: &LabelKey) -> u32 {
        if let Some(id) = self.by_labels.get(key) {
            return *id;
        }
        let id = self.next;
        self.next += 1;
        self.by_labels.insert(key.clone(), id);
        id
    }

    /// Like `get_or_allocate`, but a new label set takes `hint` when that
    /// number is free: a restarted agent keeps the numbers the kernel maps it
    /// adopted already use, so no entry is ever read under a changed meaning.
    pub fn get_or_allocate_hinted(&mut self, key: &LabelKey, hint: Option<u32>) -> u32 {
        if let Some(id) = self.by_labels.get(key) {
            return *id;
        }
        match hint {
            Some(id)
                if id >= reserved::FIRST_DYNAMIC && !self.by_labels.values().any(|v| *v == id) =>
            {
                self.by_labels.insert(key.clone(), id);
                self.next = self.next.max(id + 1);
                id
            }
            _ => self.get_or_allocate(key),
        }
    }

    /// Forgets every identity not in `in_use`.
    pub fn release_unused(&mut self, in_use: &BTreeSet<u32>) {
        self.by_labels.retain(|_, id| in_use.contains(id));
    }

    pub fn len(&self) -> usize {
        self.by_labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_labels.is_empty()
    }
}

/// A readable name: SPIFFE-style when the service account is known,
/// `namespace/app` (or `namespace/<fallback>`) otherwise.
pub fn display_name(trust_domain: &str, key: &LabelKey, fallback: &str) -> String {
    let ns = key.namespace.as_deref().unwrap_or("-");
    if let Some(sa) = SERVICE_ACCOUNT_LABELS
        .iter()
        .find_map(|k| key.labels.get(*k))
    {
        return format!("spiffe://{trust_domain}/ns/{ns}/sa/{sa}");
    }
    match key.labels.get("app") {
        Some(app) => format!("{ns}/{app}"),
        None => format!("{ns}/{fallback}"),
    }
}

/// Whether [`display_name`] depends on its fallback (neither a service
/// account nor an `app` label names the identity).
pub fn uses_fallback(key: &LabelKey) -> bool {
    !SERVICE_ACCOUNT_LABELS
        .iter()
        .any(|k| key.labels.contains_key(*k))
        && !key.labels.contains_key("app")
}

/// Name of a reserved identity.
pub fn reserved_name(id: u32) -> Option<&'static str> {
    match id {
        reserved::HOST => Some("reserved:host"),
        reserved::WORLD => Some("reserved:world"),
        reserved::UNMANAGED => Some("reserved:unmanaged"),
        reserved::PENDING => Some("reserved:pending-pod"),
        reserved::REMOTE_NODE => Some("reserved:remote-node"),
        reserved::BROADCAST => Some("reserved:broadcast"),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(ns: &str, app: &str) -> LabelKey {
        LabelKey {
            namespace: Some(ns.into()),
            labels: [("app".to_owned(), app.to_owned())].into(),
        }
    }

    #[test]
    fn same_labels_share_an_identity_and_numbers_are_not_reused() {
        let mut a = Allocator::default();
        let x = a.get_or_allocate(&key("prod", "x"));
        assert_eq!(a.get_or_allocate(&key("prod", "x")), x);
        let y = a.get_or_allocate(&key("prod", "y"));
        let x_other_ns = a.get_or_allocate(&key("dev", "x"));
        assert!(x >= reserved::FIRST_DYNAMIC);
        assert_ne!(x, y);
        assert_ne!(x, x_other_ns, "the namespace is part of the identity");
        a.release_unused(&[y, x_other_ns].into());
        let x_again = a.get_or_allocate(&key("prod", "x"));
        assert!(
            x_again > x_other_ns,
            "released numbers are not handed out again"
        );
        assert_eq!(a.len(), 3);
    }

    #[test]
    fn names_are_spiffe_when_the_service_account_is_known() {
        let mut k = key("production", "payment-service");
        assert_eq!(
            display_name("example.org", &k, "w"),
            "production/payment-service"
        );
        k.labels
            .insert("io.kubernetes.pod.serviceaccount".into(), "payments".into());
        assert_eq!(
            display_name("example.org", &k, "w"),
            "spiffe://example.org/ns/production/sa/payments"
        );
    }
}
