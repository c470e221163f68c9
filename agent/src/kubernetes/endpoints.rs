//! The Services as the planner needs them, kept between rounds
//! ([`ServiceIndex`]): the watches name the Services and EndpointSlices
//! that changed, and a round rebuilds only those Services (each from its
//! own object and slices, by [`super::services`], the whole-list function
//! it must always equal).
use std::collections::{BTreeSet, HashMap};

use k8s_openapi::api::{core::v1::Service as KubeService, discovery::v1::EndpointSlice};
use kube::{
    ResourceExt as _,
    runtime::reflector::{ObjectRef, Store},
};

use super::{Changed, SERVICE_NAME_LABEL, services};
use crate::inventory::{Changes, Service};

/// (namespace, name).
type Key = (String, String);

#[derive(Debug, Default)]
pub struct ServiceIndex {
    /// Slice → the Service it names.
    slice_service: HashMap<Key, Key>,
    /// Service → its slices' names.
    slices_of: HashMap<Key, BTreeSet<String>>,
    /// The Services sent, by `namespace/name`.
    sent: HashMap<String, Service>,
    started: bool,
}

impl ServiceIndex {
    /// The Services that changed since the last round (everything, `reset`,
    /// the first time and after either kind was listed again).
    pub fn update(
        &mut self,
        services_changed: Changed,
        slices_changed: Changed,
        service_store: &Store<KubeService>,
        slice_store: &Store<EndpointSlice>,
    ) -> Changes<Service> {
        let all = !self.started || services_changed.relisted || slices_changed.relisted;
        let mut dirty: BTreeSet<Key> = BTreeSet::new();
        if all {
            self.slice_service.clear();
            self.slices_of.clear();
            for slice in slice_store.state() {
                let key = (slice.namespace().unwrap_or_default(), slice.name_any());
                self.link(key, &slice);
            }
            dirty.extend(
                service_store
                    .state()
                    .iter()
                    .map(|s| (s.namespace().unwrap_or_default(), s.name_any())),
            );
            dirty.extend(self.sent.keys().filter_map(|k| {
                let (ns, name) = k.split_once('/')?;
                Some((ns.to_owned(), name.to_owned()))
            }));
        } else {
            for key in slices_changed.keys {
                if let Some(service) = self.slice_service.remove(&key) {
                    if let Some(names) = self.slices_of.get_mut(&service) {
                        names.remove(&key.1);
                        if names.is_empty() {
                            self.slices_of.remove(&service);
                        }
                    }
                    dirty.insert(service);
                }
                let object = ObjectRef::new(&key.1).within(&key.0);
                if let Some(slice) = slice_store.get(&object) {
                    dirty.extend(self.link(key, &slice));
                }
            }
            dirty.extend(services_changed.keys);
        }
        let mut out = Changes {
            reset: all,
            changes: Vec::new(),
        };
        if all {
            self.sent.clear();
        }
        for (ns, name) in dirty {
            let now = self.build(&ns, &name, service_store, slice_store);
            let key = format!("{ns}/{name}");
            if self.sent.get(&key) == now.as_ref() {
                continue;
            }
            match &now {
                Some(s) => self.sent.insert(key.clone(), s.clone()),
                None => self.sent.remove(&key),
            };
            if now.is_some() || !all {
                out.changes.push((key, now));
            }
        }
        self.started = true;
        out
    }

    /// Records which Service `slice` names; returns it.
    fn link(&mut self, key: Key, slice: &EndpointSlice) -> Option<Key> {
        let service = (
            key.0.clone(),
            slice.labels().get(SERVICE_NAME_LABEL)?.clone(),
        );
        self.slices_of
            .entry(service.clone())
            .or_default()
            .insert(key.1.clone());
        self.slice_service.insert(key, service.clone());
        Some(service)
    }

    /// One Service from its object and slices (`None`: gone, headless or
    /// ExternalName).
    fn build(
        &self,
        ns: &str,
        name: &str,
        service_store: &Store<KubeService>,
        slice_store: &Store<EndpointSlice>,
    ) -> Option<Service> {
        let svc = service_store.get(&ObjectRef::new(name).within(ns))?;
        let slices: Vec<_> = self
            .slices_of
            .get(&(ns.to_owned(), name.to_owned()))
            .into_iter()
            .flatten()
            .filter_map(|s| slice_store.get(&ObjectRef::new(s).within(ns)))
            .collect();
        services(&[svc], &slices).pop()
    }
}
