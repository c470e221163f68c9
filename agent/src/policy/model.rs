//! The normalized policy model both YAML kinds are converted into. The
//! compiler only sees this, so a new source (the Kubernetes API, a CRD) adds a
//! conversion, not a second compiler.
use ipnet::IpNet;

use super::labels::LabelSelector;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Direction {
    Egress,
    Ingress,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Egress => "egress",
            Direction::Ingress => "ingress",
        }
    }
    pub fn to_kernel(self) -> u8 {
        match self {
            Direction::Egress => palisade_common::DIR_EGRESS,
            Direction::Ingress => palisade_common::DIR_INGRESS,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
    /// PalisadePolicy rules only; the "port" is `type << 8 | code`.
    Icmp,
    /// PalisadePolicy rules only; the "port" is `type << 8 | code`.
    Icmpv6,
}

impl Protocol {
    /// The protocols with ports: what NetworkPolicy names, and what a rule
    /// without `ports` covers.
    pub const ALL: [Protocol; 3] = [Protocol::Tcp, Protocol::Udp, Protocol::Sctp];
    /// As a PalisadePolicy rule names ICMP: `ICMP` or `ICMPv6`.
    pub fn icmp_from_api(s: &str) -> Option<Protocol> {
        [Protocol::Icmp, Protocol::Icmpv6]
            .into_iter()
            .find(|p| p.as_str() == s)
    }
    /// As the Kubernetes API spells it: exactly `TCP`, `UDP` or `SCTP`.
    pub fn from_api(s: &str) -> Option<Protocol> {
        Protocol::ALL.into_iter().find(|p| p.as_str() == s)
    }
    /// Any case (agent config, world files, the CLI).
    pub fn parse(s: &str) -> Option<Protocol> {
        Protocol::ALL
            .into_iter()
            .find(|p| p.as_str().eq_ignore_ascii_case(s))
    }
    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => palisade_common::PROTO_TCP,
            Protocol::Udp => palisade_common::PROTO_UDP,
            Protocol::Sctp => palisade_common::PROTO_SCTP,
            Protocol::Icmp => palisade_common::PROTO_ICMP,
            Protocol::Icmpv6 => palisade_common::PROTO_ICMPV6,
        }
    }
    pub fn from_number(n: u8) -> Option<Protocol> {
        [Protocol::Icmp, Protocol::Icmpv6]
            .into_iter()
            .chain(Protocol::ALL)
            .find(|p| p.number() == n)
    }
    pub fn is_icmp(self) -> bool {
        matches!(self, Protocol::Icmp | Protocol::Icmpv6)
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
            Protocol::Sctp => "SCTP",
            Protocol::Icmp => "ICMP",
            Protocol::Icmpv6 => "ICMPv6",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Enforce,
    Audit,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    Allow,
    Deny,
}

/// Where a policy came from, for messages and audit events.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Origin {
    pub file: String,
    pub line: usize,
    pub kind: &'static str,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Policy {
    pub name: String,
    /// `None` for cluster-wide policies.
    pub namespace: Option<String>,
    pub origin: Origin,
    pub mode: Mode,
    /// Workloads the policy applies to (within `namespace` when set).
    pub selector: LabelSelector,
    /// Cluster-wide policies: only workloads of namespaces matching this.
    pub namespace_selector: Option<LabelSelector>,
    /// `Some` ⇔ the policy makes selected workloads default-deny for ingress.
    pub ingress: Option<Vec<Rule>>,
    pub egress: Option<Vec<Rule>>,
}

impl Policy {
    /// `namespace/name`, or `name` for a cluster-wide policy.
    pub fn qualified_name(&self) -> String {
        match &self.namespace {
            Some(ns) => format!("{ns}/{}", self.name),
            None => self.name.clone(),
        }
    }
    pub fn rules(&self, direction: Direction) -> Option<&[Rule]> {
        match direction {
            Direction::Ingress => self.ingress.as_deref(),
            Direction::Egress => self.egress.as_deref(),
        }
    }

    /// Every peer every rule names, ingress then egress.
    pub fn peers(&self) -> impl Iterator<Item = &Peer> {
        [&self.ingress, &self.egress]
            .into_iter()
            .flatten()
            .flatten()
            .flat_map(|r| r.peers.iter().flatten())
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Rule {
    pub name: String,
    pub action: Action,
    /// `None`: any peer at all (including the world).
    pub peers: Option<Vec<Peer>>,
    /// `None` (and no named ports): every port of every protocol.
    pub ports: Option<Vec<PortRange>>,
    /// Named ports, resolved per workload when compiled: against the
    /// selected workload's ports for ingress, the peer's for egress.
    pub named_ports: Vec<(Protocol, String)>,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Peer {
    /// Workloads chosen by labels. `pods: None` means every workload of the
    /// chosen namespaces.
    Workloads {
        pods: Option<LabelSelector>,
        namespaces: NamespaceScope,
    },
    /// An identity by name (SPIFFE-style or `namespace/name`).
    Identity(String),
    /// An address block, minus exceptions.
    Cidr { cidr: IpNet, except: Vec<IpNet> },
}

#[derive(Clone, Debug, PartialEq)]
pub enum NamespaceScope {
    /// The policy's own namespace; every namespace for a cluster-wide policy.
    Same,
    /// Namespaces whose labels match.
    Matching(LabelSelector),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PortRange {
    pub protocol: Protocol,
    pub first: u16,
    pub last: u16,
}

impl PortRange {
    pub fn all(protocol: Protocol) -> PortRange {
        PortRange {
            protocol,
            first: 0,
            last: u16::MAX,
        }
    }
}
