//! The payment-service scenario: six pods in three namespaces, the
//! `payment-service-policy`, and the verdicts it must produce. Used by the
//! kernel tests and by `cargo xtask demo`.
use std::{net::IpAddr, time::Duration};

use crate::world::{PodSpec, World};

pub fn pods() -> Vec<PodSpec> {
    vec![
        PodSpec::new("production", "order-service", &[8000], &[]),
        PodSpec::new("production", "payment-service", &[443, 8080], &[]),
        PodSpec::new("production", "postgres", &[5432], &[]),
        PodSpec::new("production", "logging", &[9000], &[]),
        PodSpec::new("monitoring", "prometheus", &[9090], &[]),
        PodSpec::new("kube-system", "dns", &[], &[53]),
    ]
}

/// Agent config lines for the scenario's namespaces.
pub const NAMESPACES: &str = "namespaces:\n  - name: production\n  - name: monitoring\n    labels:\n      name: monitoring\n  - name: kube-system\n";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    pub fn as_str(self) -> &'static str {
        match self {
            Family::V4 => "IPv4",
            Family::V6 => "IPv6",
        }
    }
}

/// One attempt and what must happen.
#[derive(Clone, Debug)]
pub struct Expectation {
    pub from: &'static str,
    pub to: &'static str,
    pub proto: &'static str,
    pub port: u16,
    pub allow: bool,
}

impl Expectation {
    /// The probe's word when the expectation holds: a denied egress fails
    /// connect()/sendto() with EPERM; a denied ingress is dropped (timeout).
    pub fn expected_word(&self, egress_denied: bool) -> &'static str {
        match (self.allow, egress_denied) {
            (true, _) => "ok",
            (false, true) => "eperm",
            (false, false) => "timeout",
        }
    }
}

const fn exp(
    from: &'static str,
    to: &'static str,
    proto: &'static str,
    port: u16,
    allow: bool,
) -> Expectation {
    Expectation {
        from,
        to,
        proto,
        port,
        allow,
    }
}

/// Every attempt of the scenario, in the order the issue states them, plus
/// two that show ports and peers are both checked.
pub fn expectations() -> Vec<Expectation> {
    vec![
        exp(
            "production/order-service",
            "production/payment-service",
            "tcp",
            443,
            true,
        ),
        exp(
            "production/logging",
            "production/payment-service",
            "tcp",
            443,
            false,
        ),
        exp(
            "monitoring/prometheus",
            "production/payment-service",
            "tcp",
            8080,
            true,
        ),
        exp(
            "production/logging",
            "production/payment-service",
            "tcp",
            8080,
            false,
        ),
        exp(
            "production/payment-service",
            "production/postgres",
            "tcp",
            5432,
            true,
        ),
        exp(
            "production/payment-service",
            "production/logging",
            "tcp",
            9000,
            false,
        ),
        exp(
            "production/payment-service",
            "kube-system/dns",
            "udp",
            53,
            true,
        ),
        exp(
            "production/logging",
            "production/postgres",
            "tcp",
            5432,
            true,
        ),
        exp(
            "production/order-service",
            "production/payment-service",
            "tcp",
            8080,
            false,
        ),
        exp(
            "monitoring/prometheus",
            "production/payment-service",
            "tcp",
            443,
            false,
        ),
    ]
}

/// Which denials happen at the sender's connect(): the sender is selected for
/// egress (payment-service), so Palisade refuses the connect with EPERM.
pub fn egress_denied(e: &Expectation) -> bool {
    !e.allow && e.from == "production/payment-service"
}

#[derive(Clone, Debug)]
pub struct Observation {
    pub expectation: Expectation,
    pub family: Family,
    pub expected: &'static str,
    pub observed: String,
}

impl Observation {
    pub fn holds(&self) -> bool {
        self.observed == self.expected
    }
}

/// Runs every expectation in both families, in parallel.
pub fn run_probes(world: &World, exps: &[Expectation], families: &[Family]) -> Vec<Observation> {
    let timeout = Duration::from_millis(1000);
    let mut jobs = Vec::new();
    for family in families {
        for e in exps {
            jobs.push((e.clone(), *family));
        }
    }
    std::thread::scope(|s| {
        let handles: Vec<_> = jobs
            .into_iter()
            .map(|(e, family)| {
                s.spawn(move || {
                    let from = world.pod(e.from);
                    let to = world.pod(e.to);
                    let addr: IpAddr = match family {
                        Family::V4 => to.ipv4.into(),
                        Family::V6 => to.ipv6.into(),
                    };
                    let observed = world
                        .probe(from, e.proto, addr, e.port, timeout)
                        .unwrap_or_else(|err| format!("error {err}"));
                    Observation {
                        expected: e.expected_word(egress_denied(&e)),
                        expectation: e,
                        family,
                        observed,
                    }
                })
            })
            .collect();
        handles.into_iter().filter_map(|h| h.join().ok()).collect()
    })
}

fn word_meaning(word: &str) -> String {
    match word {
        "ok" => "allowed".into(),
        "eperm" => "denied (EPERM at connect)".into(),
        "timeout" => "denied (dropped)".into(),
        "refused" => "refused (no listener)".into(),
        other => other.into(),
    }
}

/// A readable table of every attempt.
pub fn table(obs: &[Observation]) -> String {
    let mut rows = vec![[
        "family".to_owned(),
        "from".to_owned(),
        "to".to_owned(),
        "port".to_owned(),
        "expected".to_owned(),
        "observed".to_owned(),
        String::new(),
    ]];
    for o in obs {
        let e = &o.expectation;
        rows.push([
            o.family.as_str().into(),
            e.from.into(),
            e.to.into(),
            format!("{}/{}", e.proto.to_uppercase(), e.port),
            word_meaning(o.expected),
            word_meaning(&o.observed),
            if o.holds() {
                "✓".into()
            } else {
                "✗ MISMATCH".into()
            },
        ]);
    }
    let widths: Vec<usize> = (0..7)
        .map(|i| rows.iter().map(|r| r[i].chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for (n, r) in rows.iter().enumerate() {
        let line: Vec<String> = r
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
        if n == 0 {
            out.push_str(
                &widths
                    .iter()
                    .map(|w| "-".repeat(*w))
                    .collect::<Vec<_>>()
                    .join("  "),
            );
            out.push('\n');
        }
    }
    out
}
