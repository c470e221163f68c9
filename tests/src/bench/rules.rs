//! The benchmark's 10,000-rule policy over 1,000 identities, written three
//! ways from one list: Palisade (NetworkPolicies plus `peers` in the agent
//! config), an iptables chain of the kind iptables-mode policy plugins
//! generate, and an nftables set.
use std::{fmt::Write as _, net::Ipv4Addr};

/// Identities besides the client and the server.
pub const PEERS: usize = 998;
/// Rules per policy; one policy per identity → 10,000 rules.
pub const RULES_PER_POLICY: usize = 10;
/// The port the server listens on (the payment-service scenario's).
pub const PORT: u16 = 443;

/// One allow rule: traffic from `from` (an address) to port `port` of the
/// workloads `app` labels select.
#[derive(Clone, Debug)]
pub struct Rule {
    pub selected_app: String,
    pub from_app: String,
    pub from_ip: Ipv4Addr,
    pub port: u16,
}

pub fn peer_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 201, (i / 250) as u8, (i % 250 + 1) as u8)
}

/// 1,000 policies × 10 rules. The server's policy is the last one, and the
/// measured allow (client → server:443) is its last rule, so the linear
/// iptables chain reaches it after 9,999 others.
pub fn rules(client_ip: Ipv4Addr) -> Vec<Rule> {
    let mut out = Vec::with_capacity((PEERS + 2) * RULES_PER_POLICY);
    for p in 0..PEERS + 1 {
        let selected = if p == PEERS {
            "payment-service".to_owned()
        } else {
            format!("peer-{p}")
        };
        for r in 0..RULES_PER_POLICY {
            let from = (p * 7 + r * 13) % PEERS;
            let measured = p == PEERS && r == RULES_PER_POLICY - 1;
            out.push(Rule {
                selected_app: selected.clone(),
                from_app: if measured {
                    "order-service".into()
                } else {
                    format!("peer-{from}")
                },
                from_ip: if measured { client_ip } else { peer_ip(from) },
                port: if measured {
                    PORT
                } else {
                    1000 + ((p + r) % 5000) as u16
                },
            });
        }
    }
    out
}

/// The agent config lines declaring the 998 peer identities (namespace
/// `production`, `app: peer-N`, one /32 each).
pub fn peers_config() -> String {
    let mut s = String::from("peers:\n");
    for i in 0..PEERS {
        let _ = writeln!(
            s,
            "  - {{name: peer-{i}, namespace: production, labels: {{app: peer-{i}}}, cidrs: [{}/32]}}",
            peer_ip(i)
        );
    }
    s
}

/// NetworkPolicies, one per selected app, `RULES_PER_POLICY` ingress rules each.
pub fn network_policies(rules: &[Rule]) -> String {
    let mut s = String::new();
    for chunk in rules.chunks(RULES_PER_POLICY) {
        let app = &chunk[0].selected_app;
        let _ = write!(
            s,
            "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: allow-{app}, namespace: production}}\nspec:\n  podSelector: {{matchLabels: {{app: {app}}}}}\n  ingress:\n"
        );
        for r in chunk {
            let _ = writeln!(
                s,
                "    - from: [{{podSelector: {{matchLabels: {{app: {}}}}}}}]\n      ports: [{{protocol: TCP, port: {}}}]",
                r.from_app, r.port
            );
        }
    }
    s
}

/// `iptables-restore` input: the server namespace's INPUT chain accepts
/// established flows first (as policy plugins do), then walks one chain of
/// every rule; what none accepts is dropped.
pub fn iptables(rules: &[Rule]) -> String {
    let mut s = String::from(
        "*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:PAL-INGRESS - [0:0]\n\
         -A INPUT -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT\n-A INPUT -i lo -j ACCEPT\n-A INPUT -j PAL-INGRESS\n",
    );
    for r in rules {
        let _ = writeln!(
            s,
            "-A PAL-INGRESS -s {}/32 -p tcp -m tcp --dport {} -m comment --comment \"{}\" -j ACCEPT",
            r.from_ip, r.port, r.selected_app
        );
    }
    s.push_str("-A PAL-INGRESS -j DROP\nCOMMIT\n");
    s
}

/// `nft -f` input: the same rules as one set of (source, port) pairs.
pub fn nftables(rules: &[Rule]) -> String {
    let mut s = String::from(
        "table inet palisade_bench {\n  set allowed {\n    type ipv4_addr . inet_service\n    elements = {\n",
    );
    let mut seen = std::collections::BTreeSet::new();
    let mut first = true;
    for r in rules {
        if !seen.insert((r.from_ip, r.port)) {
            continue;
        }
        if !first {
            s.push_str(",\n");
        }
        first = false;
        let _ = write!(s, "      {} . {}", r.from_ip, r.port);
    }
    s.push_str(
        "\n    }\n  }\n  chain input {\n    type filter hook input priority 0; policy accept;\n    ct state established,related accept\n    iif lo accept\n    ip saddr . tcp dport @allowed accept\n    drop\n  }\n}\n",
    );
    s
}
