//! The planner's Services: kept between rounds as the source sends their
//! changes, and their part of the desired state — the Service table's
//! frontends and names, and the (cgroup, Service address) pairs a workload
//! reaches as itself — brought up to date only for the Services that
//! changed, whose endpoints' identity or local owner changed, or (for node
//! ports) when the nodes' addresses changed.
use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::IpAddr,
    sync::Arc,
};

use ipnet::IpNet;
use palisade_common::{IpcacheValue, identity as reserved};

use crate::{
    datapath::{IpCache, ServiceBackends, ServiceFrontend, ServiceInfo, ServiceTable},
    inventory::{Changes, Service},
};

/// What one Service put into the table, to take out when it changes.
#[derive(Debug, Default)]
struct Placed {
    frontends: Vec<ServiceFrontend>,
    endpoints: Vec<IpAddr>,
    ports: usize,
}

#[derive(Debug, Default)]
pub(super) struct ServicePlan {
    services: BTreeMap<String, Service>,
    table: Arc<ServiceTable>,
    /// (Service key, port index) → id (index + 1 in `table.infos`); freed
    /// ids are handed out again, lowest first.
    ids: HashMap<(String, usize), u32>,
    free: BTreeSet<u32>,
    placed: HashMap<String, Placed>,
    /// Frontend → the Services that have it, each with its backends; the
    /// greatest key's is in the table.
    claims: HashMap<ServiceFrontend, BTreeMap<String, ServiceBackends>>,
    by_endpoint: HashMap<IpAddr, BTreeSet<String>>,
    node_port: BTreeSet<String>,
    node_ips: BTreeSet<IpAddr>,
    /// Local workloads' addresses → cgroup, as last round.
    owners: HashMap<IpAddr, u64>,
    own: BTreeMap<String, Vec<(u64, IpAddr)>>,
}

/// What changed around the Services this round.
pub(super) struct Around<'a> {
    /// Addresses whose ipcache entry changed.
    pub touched: &'a [IpNet],
    /// Every Service's backends may have changed (the policies' CIDR
    /// blocks, or a block wider than one address, moved).
    pub everything: bool,
    pub node_ips: BTreeSet<IpAddr>,
    pub owners: HashMap<IpAddr, u64>,
}

impl ServicePlan {
    /// Takes in the source's changes and what changed around them; returns
    /// the table and the (cgroup, address) pairs of Services whose
    /// endpoints are all one local workload's.
    pub fn update(
        &mut self,
        changes: Changes<Service>,
        around: Around<'_>,
        ipcache: &IpCache,
    ) -> (Arc<ServiceTable>, Vec<(u64, IpAddr)>) {
        let mut dirty: BTreeSet<String> = BTreeSet::new();
        if changes.reset {
            dirty.extend(self.services.keys().cloned());
            self.services.clear();
        }
        for (key, service) in changes.changes {
            match service {
                Some(s) => self.services.insert(key.clone(), s),
                None => self.services.remove(&key),
            };
            dirty.insert(key);
        }
        if around.node_ips != self.node_ips {
            dirty.extend(self.node_port.iter().cloned());
            self.node_ips = around.node_ips;
        }
        let moved = around
            .owners
            .iter()
            .filter(|(ip, cg)| self.owners.get(ip) != Some(cg))
            .map(|(ip, _)| *ip)
            .chain(
                self.owners
                    .keys()
                    .filter(|ip| !around.owners.contains_key(ip))
                    .copied(),
            )
            .collect::<Vec<_>>();
        self.owners = around.owners;
        let touched = around
            .touched
            .iter()
            .filter(|n| n.prefix_len() == n.max_prefix_len())
            .map(|n| n.addr());
        for ip in moved.into_iter().chain(touched) {
            dirty.extend(self.by_endpoint.get(&ip).into_iter().flatten().cloned());
        }
        if around.everything {
            dirty.extend(self.services.keys().cloned());
            dirty.extend(self.placed.keys().cloned());
        }
        if !dirty.is_empty() {
            for key in &dirty {
                self.place(key, ipcache);
            }
        }
        let own = self.own.values().flatten().copied().collect();
        (self.table.clone(), own)
    }

    /// Takes `key`'s old part out of the table and puts its new one in.
    fn place(&mut self, key: &str, ipcache: &IpCache) {
        self.take_out(key);
        if self.services.contains_key(key) {
            self.put_in(key, ipcache);
        }
    }

    /// Takes `key`'s part out: its frontends (another Service's claim on
    /// one takes over), endpoints, hairpin pairs, and the ids of ports it
    /// no longer has.
    fn take_out(&mut self, key: &str) {
        let table = Arc::make_mut(&mut self.table);
        let old = self.placed.remove(key).unwrap_or_default();
        for f in &old.frontends {
            if let Some(claims) = self.claims.get_mut(f) {
                claims.remove(key);
                match claims.last_key_value() {
                    Some((_, b)) => table.frontends.insert(*f, b.clone()),
                    None => {
                        self.claims.remove(f);
                        table.frontends.remove(f)
                    }
                };
            }
        }
        for ip in &old.endpoints {
            if let Some(keys) = self.by_endpoint.get_mut(ip) {
                keys.remove(key);
                if keys.is_empty() {
                    self.by_endpoint.remove(ip);
                }
            }
        }
        self.own.remove(key);
        self.node_port.remove(key);
        let ports = self.services.get(key).map_or(0, |s| s.ports.len());
        for pi in ports..old.ports {
            if let Some(id) = self.ids.remove(&(key.to_owned(), pi)) {
                if let Some(info) = table.infos.get_mut(id as usize - 1) {
                    *info = ServiceInfo::default();
                }
                self.free.insert(id);
            }
        }
    }

    /// Puts `key`'s part in: one id per port, its frontends (the greatest
    /// key's claim on a shared one wins), endpoints and hairpin pairs.
    fn put_in(&mut self, key: &str, ipcache: &IpCache) {
        let Some(svc) = self.services.get(key) else {
            return;
        };
        let table = Arc::make_mut(&mut self.table);
        let ports = svc.ports.len();
        let mut placed = Placed {
            ports,
            endpoints: svc.endpoints.iter().map(|e| e.ip).collect(),
            ..Placed::default()
        };
        for (pi, port) in svc.ports.iter().enumerate() {
            let id = match self.ids.get(&(key.to_owned(), pi)) {
                Some(id) => *id,
                None => {
                    let id = self.free.pop_first().unwrap_or_else(|| {
                        table.infos.push(ServiceInfo::default());
                        u32::try_from(table.infos.len()).unwrap_or(u32::MAX)
                    });
                    self.ids.insert((key.to_owned(), pi), id);
                    id
                }
            };
            let backends: BTreeSet<(IpcacheValue, u16)> = svc
                .endpoints
                .iter()
                .filter_map(|e| {
                    let target = e.ports.get(&(port.protocol, port.name.clone()))?;
                    Some((identity_of(ipcache, e.ip), *target))
                })
                .collect();
            if let Some(info) = table.infos.get_mut(id as usize - 1) {
                *info = ServiceInfo {
                    name: svc.qualified_name(),
                    port: port.port,
                    protocol: port.protocol,
                    backends: backends.iter().copied().collect(),
                };
            }
            let value = ServiceBackends {
                service_id: id,
                backends: backends.into_iter().collect(),
            };
            let frontends = svc
                .addresses
                .iter()
                .chain(&svc.external)
                .map(|a| (*a, port.port))
                .chain(
                    port.node_port
                        .into_iter()
                        .flat_map(|np| self.node_ips.iter().map(move |a| (*a, np))),
                );
            for (addr, p) in frontends {
                let f = ServiceFrontend {
                    addr,
                    port: p,
                    protocol: port.protocol.number(),
                };
                let claims = self.claims.entry(f).or_default();
                claims.insert(key.to_owned(), value.clone());
                if let Some((_, b)) = claims.last_key_value() {
                    table.frontends.insert(f, b.clone());
                }
                placed.frontends.push(f);
            }
            if port.node_port.is_some() {
                self.node_port.insert(key.to_owned());
            }
        }
        for ip in &placed.endpoints {
            self.by_endpoint
                .entry(*ip)
                .or_default()
                .insert(key.to_owned());
        }
        if let Some(own) = hairpin(&self.owners, &placed.endpoints, &svc.addresses) {
            self.own.insert(key.to_owned(), own);
        }
        self.placed.insert(key.to_owned(), placed);
    }
}

/// (cgroup, Service address) pairs when every endpoint is one local
/// workload's: connecting to the Service is that workload reaching itself
/// (kube-proxy's hairpin), which passes like a connection to its own
/// address. A Service with other endpoints too is judged by them all. Only
/// the Service's own virtual addresses count: an external or load-balancer
/// IP may be any address (another pod's), and would become the endpoint's
/// own on every port and as a source.
fn hairpin(
    owners: &HashMap<IpAddr, u64>,
    endpoints: &[IpAddr],
    addresses: &[IpAddr],
) -> Option<Vec<(u64, IpAddr)>> {
    let found: BTreeSet<Option<u64>> = endpoints.iter().map(|ip| owners.get(ip).copied()).collect();
    match found.into_iter().collect::<Vec<_>>()[..] {
        [Some(cgroup)] => Some(addresses.iter().map(|a| (cgroup, *a)).collect()),
        _ => None,
    }
}

/// The entry the ipcache gives `ip` (longest prefix), `reserved:world`
/// if none.
pub(super) fn identity_of(ipcache: &IpCache, ip: IpAddr) -> IpcacheValue {
    ipcache
        .longest_match(ip)
        .unwrap_or(IpcacheValue::of(reserved::WORLD))
}
