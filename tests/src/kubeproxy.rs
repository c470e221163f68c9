//! kube-proxy in the test world: the node's Service DNAT written the way
//! kube-proxy writes it, from the same Service and EndpointSlice objects the
//! fake API server serves (or from a host config's Services).
//!
//! - iptables mode: `KUBE-SERVICES` (from `PREROUTING` and `OUTPUT`) →
//!   `KUBE-SVC-<hash>` → `KUBE-SEP-<hash>` DNAT, endpoints picked with
//!   `statistic --mode random --probability 1/(n-i)`, hairpin traffic marked
//!   with `KUBE-MARK-MASQ` and masqueraded in `KUBE-POSTROUTING`; NodePorts
//!   through `KUBE-NODEPORTS` for local destination addresses.
//! - nftables mode: table `kube-proxy` with the `service-ips` and
//!   `service-nodeports` verdict maps, one `service-…` chain per Service port
//!   choosing an `endpoint-…` chain with `numgen random mod n`.
//!
//! Every sync replaces the whole ruleset, as kube-proxy's full sync does.
use std::{collections::BTreeMap, fmt::Write as _, net::IpAddr};

use serde_json::Value;

use crate::world::World;

/// One Service port as kube-proxy programs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServicePortRule {
    /// `namespace/name`.
    pub service: String,
    pub port_name: String,
    /// `tcp`, `udp` or `sctp`.
    pub protocol: String,
    /// ClusterIPs and external IPs.
    pub addresses: Vec<IpAddr>,
    pub port: u16,
    pub node_port: Option<u16>,
    /// Ready endpoints: address and target port.
    pub endpoints: Vec<(IpAddr, u16)>,
}

impl ServicePortRule {
    fn id(&self) -> String {
        format!(
            "{}:{}/{}",
            self.service,
            if self.port_name.is_empty() {
                "p"
            } else {
                &self.port_name
            },
            self.protocol
        )
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Iptables,
    Nftables,
}

/// The rules kube-proxy derives from Service and EndpointSlice objects.
pub fn from_objects(services: &[Value], slices: &[Value]) -> Vec<ServicePortRule> {
    let mut out = Vec::new();
    for svc in services {
        let ns = svc["metadata"]["namespace"].as_str().unwrap_or_default();
        let name = svc["metadata"]["name"].as_str().unwrap_or_default();
        let spec = &svc["spec"];
        let mut addresses: Vec<IpAddr> = spec["clusterIPs"]
            .as_array()
            .into_iter()
            .flatten()
            .chain(spec["externalIPs"].as_array().into_iter().flatten())
            .filter_map(|a| a.as_str()?.parse().ok())
            .collect();
        addresses.sort();
        addresses.dedup();
        for port in spec["ports"].as_array().into_iter().flatten() {
            let port_name = port["name"].as_str().unwrap_or_default().to_owned();
            let protocol = port["protocol"].as_str().unwrap_or("TCP").to_lowercase();
            // kube-proxy's choice (KEP-1669): the ready endpoints, or when
            // none is ready, those serving while terminating.
            let (mut endpoints, mut terminating) = (Vec::new(), Vec::new());
            for slice in slices.iter().filter(|s| {
                s["metadata"]["namespace"] == ns
                    && s["metadata"]["labels"]["kubernetes.io/service-name"] == name
            }) {
                let Some(target) = slice["ports"].as_array().into_iter().flatten().find(|p| {
                    p["name"].as_str().unwrap_or_default() == port_name
                        && p["protocol"]
                            .as_str()
                            .unwrap_or("TCP")
                            .eq_ignore_ascii_case(&protocol)
                }) else {
                    continue;
                };
                let Some(target_port) = target["port"].as_u64().and_then(|p| u16::try_from(p).ok())
                else {
                    continue;
                };
                for ep in slice["endpoints"].as_array().into_iter().flatten() {
                    let c = &ep["conditions"];
                    let ready = c["ready"] != false;
                    let serving = c["serving"].as_bool().unwrap_or(ready);
                    let into = if ready {
                        &mut endpoints
                    } else if serving && c["terminating"] == true {
                        &mut terminating
                    } else {
                        continue;
                    };
                    for a in ep["addresses"].as_array().into_iter().flatten() {
                        if let Some(ip) = a.as_str().and_then(|a| a.parse().ok()) {
                            into.push((ip, target_port));
                        }
                    }
                }
            }
            if endpoints.is_empty() {
                endpoints = terminating;
            }
            endpoints.sort();
            out.push(ServicePortRule {
                service: format!("{ns}/{name}"),
                port_name,
                protocol,
                addresses: addresses.clone(),
                port: port["port"]
                    .as_u64()
                    .and_then(|p| u16::try_from(p).ok())
                    .unwrap_or_default(),
                node_port: port["nodePort"]
                    .as_u64()
                    .and_then(|p| u16::try_from(p).ok()),
                endpoints,
            });
        }
    }
    out
}

/// kube-proxy names chains after a hash of the Service port (base32 of a
/// SHA-256 upstream; any stable hash gives the same shape).
fn hash(text: &str) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let mut h: u128 = 0x6c62_272e_07bb_0142_62b8_2175_6295_c58d;
    for b in text.bytes() {
        h ^= u128::from(b);
        h = h.wrapping_mul(0x0000_0000_0100_0000_0000_0000_0000_013b);
    }
    (0..16)
        .map(|i| char::from(ALPHABET[((h >> (i * 5)) & 31) as usize]))
        .collect()
}

fn host_prefix(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(a) => format!("{a}/32"),
        IpAddr::V6(a) => format!("{a}/128"),
    }
}

fn endpoint(ip: IpAddr, port: u16) -> String {
    match ip {
        IpAddr::V4(a) => format!("{a}:{port}"),
        IpAddr::V6(a) => format!("[{a}]:{port}"),
    }
}

/// The `nat` table kube-proxy's iptables mode writes, for one family
/// (`iptables-restore` / `ip6tables-restore` input).
pub fn iptables(rules: &[ServicePortRule], v6: bool) -> String {
    let family = |ip: &IpAddr| ip.is_ipv6() == v6;
    let mut chains = vec![
        "KUBE-SERVICES".to_owned(),
        "KUBE-NODEPORTS".to_owned(),
        "KUBE-POSTROUTING".to_owned(),
        "KUBE-MARK-MASQ".to_owned(),
    ];
    let mut body = String::new();
    let mut line = |l: String| {
        body.push_str(&l);
        body.push('\n');
    };
    line(
        r#"-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES"#
            .into(),
    );
    line(r#"-A OUTPUT -m comment --comment "kubernetes service portals" -j KUBE-SERVICES"#.into());
    line(
        r#"-A POSTROUTING -m comment --comment "kubernetes postrouting rules" -j KUBE-POSTROUTING"#
            .into(),
    );
    line("-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN".into());
    line("-A KUBE-POSTROUTING -j MARK --xor-mark 0x4000".into());
    line(r#"-A KUBE-POSTROUTING -m comment --comment "kubernetes service traffic requiring SNAT" -j MASQUERADE --random-fully"#.into());
    line("-A KUBE-MARK-MASQ -j MARK --or-mark 0x4000".into());
    for r in rules {
        let endpoints: Vec<&(IpAddr, u16)> =
            r.endpoints.iter().filter(|(ip, _)| family(ip)).collect();
        if endpoints.is_empty() {
            continue;
        }
        let id = r.id();
        let svc_chain = format!("KUBE-SVC-{}", hash(&id));
        chains.push(svc_chain.clone());
        let p = &r.protocol;
        for addr in r.addresses.iter().filter(|a| family(a)) {
            line(format!(
                r#"-A KUBE-SERVICES -m comment --comment "{id} cluster IP" -m {p} -p {p} -d {} --dport {} -j {svc_chain}"#,
                host_prefix(*addr),
                r.port
            ));
        }
        if let Some(np) = r.node_port {
            let ext = format!("KUBE-EXT-{}", hash(&id));
            chains.push(ext.clone());
            line(format!(
                r#"-A KUBE-NODEPORTS -m comment --comment "{id}" -m {p} -p {p} --dport {np} -j {ext}"#
            ));
            line(format!(
                r#"-A {ext} -m comment --comment "masquerade traffic for {id} external destinations" -j KUBE-MARK-MASQ"#
            ));
            line(format!("-A {ext} -j {svc_chain}"));
        }
        let n = endpoints.len();
        for (i, (ip, port)) in endpoints.iter().enumerate() {
            let ep = endpoint(*ip, *port);
            let sep = format!("KUBE-SEP-{}", hash(&format!("{id}{ep}")));
            chains.push(sep.clone());
            if i + 1 < n {
                line(format!(
                    r#"-A {svc_chain} -m comment --comment "{id} -> {ep}" -m statistic --mode random --probability {:.10} -j {sep}"#,
                    1.0 / (n - i) as f64
                ));
            } else {
                line(format!(
                    r#"-A {svc_chain} -m comment --comment "{id} -> {ep}" -j {sep}"#
                ));
            }
            line(format!(
                r#"-A {sep} -m comment --comment "{id}" -s {} -j KUBE-MARK-MASQ"#,
                host_prefix(*ip)
            ));
            line(format!(
                r#"-A {sep} -m comment --comment "{id}" -m {p} -p {p} -j DNAT --to-destination {ep}"#
            ));
        }
    }
    line(r#"-A KUBE-SERVICES -m comment --comment "kubernetes service nodeports; NOTE: this must be the last rule in this chain" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS"#.into());
    let mut out = String::from("*nat\n");
    for c in ["PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"] {
        let _ = writeln!(out, ":{c} ACCEPT [0:0]");
    }
    for c in chains {
        let _ = writeln!(out, ":{c} - [0:0]");
    }
    out.push_str(&body);
    out.push_str("COMMIT\n");
    out
}

/// The `kube-proxy` tables kube-proxy's nftables mode writes (`nft -f -` input).
pub fn nftables(rules: &[ServicePortRule]) -> String {
    let mut out = String::new();
    for (family, v6) in [("ip", false), ("ip6", true)] {
        let fam = |ip: &IpAddr| ip.is_ipv6() == v6;
        let addr_type = if v6 { "ipv6_addr" } else { "ipv4_addr" };
        let daddr = if v6 { "ip6 daddr" } else { "ip daddr" };
        let saddr = if v6 { "ip6 saddr" } else { "ip saddr" };
        let mut service_ips = Vec::new();
        let mut node_ports = Vec::new();
        let mut chains = String::new();
        for r in rules {
            let endpoints: Vec<&(IpAddr, u16)> =
                r.endpoints.iter().filter(|(ip, _)| fam(ip)).collect();
            if endpoints.is_empty() {
                continue;
            }
            let name = format!(
                "{}/{}/{}",
                r.service,
                r.protocol,
                if r.port_name.is_empty() {
                    "p"
                } else {
                    &r.port_name
                }
            );
            let svc_chain = format!("service-{}-{name}", &hash(&r.id())[..8]);
            for addr in r.addresses.iter().filter(|a| fam(a)) {
                service_ips.push(format!(
                    "{addr} . {} . {} : goto {svc_chain}",
                    r.protocol, r.port
                ));
            }
            if let Some(np) = r.node_port {
                node_ports.push(format!("{} . {np} : goto {svc_chain}", r.protocol));
            }
            let mut picks = Vec::new();
            for (i, (ip, port)) in endpoints.iter().enumerate() {
                let ep_chain = format!(
                    "endpoint-{}-{name}__{}",
                    &hash(&format!("{}{}", r.id(), endpoint(*ip, *port)))[..8],
                    endpoint(*ip, *port)
                        .replace(['[', ']'], "")
                        .replace(':', ".")
                );
                picks.push(format!("{i} : goto {ep_chain}"));
                let to = match ip {
                    IpAddr::V4(a) => format!("{a}:{port}"),
                    IpAddr::V6(a) => format!("[{a}]:{port}"),
                };
                let _ = writeln!(
                    chains,
                    "  chain {ep_chain} {{\n    {saddr} {ip} jump mark-for-masquerade\n    meta l4proto {} dnat to {to}\n  }}",
                    r.protocol
                );
            }
            let _ = writeln!(
                chains,
                "  chain {svc_chain} {{\n    numgen random mod {} vmap {{ {} }}\n  }}",
                endpoints.len(),
                picks.join(", ")
            );
        }
        let elements = |v: &[String]| {
            if v.is_empty() {
                String::new()
            } else {
                format!("    elements = {{ {} }}\n", v.join(", "))
            }
        };
        let _ = write!(
            out,
            "add table {family} kube-proxy\ndelete table {family} kube-proxy\n\
             table {family} kube-proxy {{\n\
             \x20 chain mark-for-masquerade {{\n    mark set mark or 0x4000\n  }}\n\
             \x20 chain masquerading {{\n    mark and 0x4000 == 0 return\n    mark set mark xor 0x4000\n    masquerade fully-random\n  }}\n\
             \x20 chain nat-prerouting {{\n    type nat hook prerouting priority dstnat; policy accept;\n    jump services\n  }}\n\
             \x20 chain nat-output {{\n    type nat hook output priority -100; policy accept;\n    jump services\n  }}\n\
             \x20 chain nat-postrouting {{\n    type nat hook postrouting priority srcnat; policy accept;\n    jump masquerading\n  }}\n\
             \x20 map service-ips {{\n    type {addr_type} . inet_proto . inet_service : verdict\n{}  }}\n\
             \x20 map service-nodeports {{\n    type inet_proto . inet_service : verdict\n{}  }}\n\
             {chains}\
             \x20 chain services {{\n    {daddr} . meta l4proto . th dport vmap @service-ips\n    fib daddr type local meta l4proto . th dport vmap @service-nodeports\n  }}\n\
             }}\n",
            elements(&service_ips),
            elements(&node_ports),
        );
    }
    out
}

/// Programs the node's Service rules (a full sync: the previous rules go).
pub fn sync(world: &World, mode: Mode, rules: &[ServicePortRule]) -> anyhow::Result<()> {
    match mode {
        Mode::Iptables => {
            world.on_node_with_input(&["iptables-restore"], &iptables(rules, false))?;
            world.on_node_with_input(&["ip6tables-restore"], &iptables(rules, true))
        }
        Mode::Nftables => world.on_node_with_input(&["nft", "-f", "-"], &nftables(rules)),
    }
}

/// A Service and EndpointSlice pair as the API server would serve them: one
/// port, `backends` as ready endpoints (address, target port).
pub fn service_objects(
    namespace: &str,
    name: &str,
    cluster_ips: &[IpAddr],
    ports: &[(&str, &str, u16, u16)],
    backends: &[IpAddr],
) -> (Value, Value) {
    let svc = serde_json::json!({
        "metadata": {"name": name, "namespace": namespace, "uid": format!("svc-{namespace}-{name}")},
        "spec": {
            "type": "ClusterIP",
            "clusterIP": cluster_ips[0].to_string(),
            "clusterIPs": cluster_ips.iter().map(ToString::to_string).collect::<Vec<_>>(),
            "ports": ports.iter().map(|(pname, proto, port, target)| serde_json::json!({
                "name": pname, "protocol": proto, "port": port, "targetPort": target
            })).collect::<Vec<_>>(),
        }
    });
    let slice = serde_json::json!({
        "metadata": {
            "name": format!("{name}-slice"),
            "namespace": namespace,
            "labels": {"kubernetes.io/service-name": name},
        },
        "addressType": "IPv4",
        "ports": ports.iter().map(|(pname, proto, _, target)| serde_json::json!({
            "name": pname, "protocol": proto, "port": target
        })).collect::<Vec<_>>(),
        "endpoints": backends.iter().map(|ip| serde_json::json!({
            "addresses": [ip.to_string()], "conditions": {"ready": true}
        })).collect::<Vec<_>>(),
    });
    (svc, slice)
}

/// Services grouped by `namespace/name`, for tests that keep a set of them.
pub type Objects = BTreeMap<String, (Value, Value)>;

/// The rules of a set of Service objects.
pub fn rules_of(objects: &Objects) -> Vec<ServicePortRule> {
    let (svcs, slices): (Vec<Value>, Vec<Value>) = objects.values().cloned().unzip();
    from_objects(&svcs, &slices)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn db() -> Vec<ServicePortRule> {
        let (svc, slice) = service_objects(
            "shop",
            "db",
            &["10.96.0.20".parse().unwrap()],
            &[("pg", "TCP", 5432, 6432)],
            &["10.77.1.10".parse().unwrap(), "10.77.1.11".parse().unwrap()],
        );
        from_objects(&[svc], &[slice])
    }

    #[test]
    fn iptables_rules_have_kube_proxys_chain_shape() {
        let text = iptables(&db(), false);
        let svc = text
            .lines()
            .find(|l| l.starts_with("-A KUBE-SERVICES") && l.contains("10.96.0.20/32"))
            .unwrap();
        assert!(svc.contains("--dport 5432 -j KUBE-SVC-"), "{svc}");
        assert!(
            text.contains("-m statistic --mode random --probability 0.5000000000 -j KUBE-SEP-"),
            "{text}"
        );
        assert_eq!(
            text.matches("-j DNAT --to-destination 10.77.1.1").count(),
            2,
            "{text}"
        );
        assert!(
            text.contains("-s 10.77.1.10/32 -j KUBE-MARK-MASQ"),
            "hairpin"
        );
        assert!(
            iptables(&db(), true).matches("KUBE-SVC-").count() == 0,
            "no v6 endpoints"
        );
    }

    #[test]
    fn nftables_rules_map_the_frontend_to_a_random_endpoint_chain() {
        let text = nftables(&db());
        assert!(
            text.contains("10.96.0.20 . tcp . 5432 : goto service-"),
            "{text}"
        );
        assert!(text.contains("numgen random mod 2 vmap"), "{text}");
        assert!(text.contains("dnat to 10.77.1.11:6432"), "{text}");
    }
}
