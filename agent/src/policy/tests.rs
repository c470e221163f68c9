//! Policy pipeline tests: YAML → model → compiled entries → the lookup model.
use std::{collections::BTreeMap, path::PathBuf, sync::Arc};

use palisade_common::{DIR_EGRESS, DIR_INGRESS, PROTO_TCP, PROTO_UDP, identity, verdict};

use super::{
    compile::{IdentityInfo, IdentityKind, World, compile},
    load::{load_paths, parse_str},
    lookup,
    model::Protocol,
};

fn repo_policies(sub: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../policies")
        .join(sub)
}

/// The scenario's world: six workloads in three namespaces.
fn scenario_world() -> (World, BTreeMap<&'static str, u32>) {
    let pods = [
        ("production", "order-service"),
        ("production", "payment-service"),
        ("production", "postgres"),
        ("production", "logging"),
        ("monitoring", "prometheus"),
        ("kube-system", "dns"),
    ];
    let mut ids = BTreeMap::new();
    let mut world = World::default();
    for (i, (ns, app)) in pods.iter().enumerate() {
        let id = 300 + i as u32;
        ids.insert(*app, id);
        world.identities.push(Arc::new(IdentityInfo {
            id,
            name: format!("{ns}/{app}"),
            namespace: Some((*ns).into()),
            labels: [("app".to_owned(), (*app).to_owned())].into(),
            kind: IdentityKind::Workload,
            // Every workload declares `https`; payment-service serves it on 8443.
            named_ports: [(
                (Protocol::Tcp, "https".to_owned()),
                if *app == "payment-service" { 8443 } else { 443 },
            )]
            .into(),
        }));
        world
            .addresses
            .push((format!("10.0.0.{}/32", i + 1).parse().unwrap(), id));
    }
    for ns in ["production", "monitoring", "kube-system"] {
        let mut labels: BTreeMap<String, String> =
            [("kubernetes.io/metadata.name".to_owned(), ns.to_owned())].into();
        if ns == "monitoring" {
            labels.insert("name".into(), "monitoring".into());
        }
        world.namespaces.insert(ns.into(), labels);
    }
    (world, ids)
}

/// The kernel's decision with a peer known by its identity alone (an
/// address inside no block a policy names, or a block's own identity).
fn decide(
    c: &super::CompiledPolicy,
    direction: u8,
    protocol: u8,
    local: u32,
    peer: u32,
    port: u16,
) -> Option<lookup::Decision> {
    lookup::decide(
        c,
        direction,
        protocol,
        local,
        palisade_common::IpcacheValue::of(peer),
        port,
    )
}

/// (egress verdict at the sender, ingress verdict at the receiver); `None` = not judged.
fn both(
    c: &super::CompiledPolicy,
    from: u32,
    to: u32,
    proto: u8,
    port: u16,
) -> (Option<u8>, Option<u8>) {
    (
        decide(c, DIR_EGRESS, proto, from, to, port).map(|d| d.verdict),
        decide(c, DIR_INGRESS, proto, to, from, port).map(|d| d.verdict),
    )
}

fn allowed(v: (Option<u8>, Option<u8>)) -> bool {
    v.0.is_none_or(|x| x != verdict::DENY) && v.1.is_none_or(|x| x != verdict::DENY)
}

/// Sets one label of the identity `id` in `world`.
fn relabel(world: &mut World, id: u32, key: &str, value: &str) {
    let info = world.identities.iter_mut().find(|i| i.id == id).unwrap();
    Arc::make_mut(info).labels.insert(key.into(), value.into());
}

/// A compiled table with its rule ids replaced by the rules they name: two
/// tables that judge alike and name the same rules are equal in this form,
/// however their rules are numbered.
#[allow(clippy::type_complexity)]
fn canonical(
    c: &super::CompiledPolicy,
) -> (
    BTreeMap<super::compile::EntryKey, (u32, Option<super::compile::RuleRef>)>,
    BTreeMap<(u8, u32), (Option<super::compile::RuleRef>, u32)>,
    Vec<(ipnet::IpNet, u32)>,
) {
    let rule = |id: u32| c.rule(id).cloned();
    (
        c.entries
            .iter()
            .map(|(k, v)| (*k, (v.flags, rule(v.rule_id))))
            .collect(),
        c.enforced
            .iter()
            .map(|(k, v)| (*k, (rule(v.policy_rule_id), v.flags)))
            .collect(),
        c.cidr_identities.clone(),
    )
}

/// The remembering compiler judges exactly as a fresh compile does, and an
/// event recomputes only what it changes: one edited policy is one policy
/// recomputed; a removed one none, and the other policies' entries keep
/// their values (their rule ids stay).
#[test]
fn a_compile_recomputes_only_the_policies_that_changed() {
    use super::compile::Compiler;
    let (mut world, id) = scenario_world();
    let set = load_paths(&[
        repo_policies("kubernetes"),
        repo_policies("palisade"),
        repo_policies("examples"),
    ])
    .unwrap();
    // Owned copies: each compile gets new objects, as a reload makes them.
    let mut policies: Vec<super::model::Policy> =
        set.policies.iter().map(|p| (**p).clone()).collect();
    let n = policies.len();
    assert!(n >= 5, "{n}");
    let mut compiler = Compiler::default();
    let as_arcs = |p: &[super::model::Policy]| -> Vec<std::sync::Arc<_>> {
        p.iter().cloned().map(std::sync::Arc::new).collect()
    };
    let check = |compiler: &mut Compiler, policies: &[super::model::Policy], world: &World| {
        let policies = as_arcs(policies);
        let remembered = compiler.compile(&policies, world);
        assert_eq!(
            canonical(&remembered),
            canonical(&compile(&policies, world))
        );
        compiler.recomputed
    };
    assert_eq!(check(&mut compiler, &policies, &world), n);
    assert_eq!(
        check(&mut compiler, &policies, &world),
        0,
        "nothing changed"
    );
    // One rule of one policy edited (its first port range moved).
    let edited = policies
        .iter_mut()
        .find(|p| {
            p.ingress
                .iter()
                .flatten()
                .any(|r| r.ports.as_ref().is_some_and(|v| !v.is_empty()))
        })
        .unwrap();
    let rule = edited
        .ingress
        .iter_mut()
        .flatten()
        .find(|r| r.ports.as_ref().is_some_and(|v| !v.is_empty()))
        .unwrap();
    rule.ports.as_mut().unwrap()[0].first += 1;
    rule.ports.as_mut().unwrap()[0].last += 1;
    assert_eq!(check(&mut compiler, &policies, &world), 1);
    // A policy removed: the others keep their parts and their rule ids, so
    // no entry of theirs is written again.
    let before = compiler.compile(&as_arcs(&policies), &world);
    let removed = compile(&as_arcs(&policies[..1]), &world);
    policies.remove(0);
    assert_eq!(check(&mut compiler, &policies, &world), 0);
    let after = compiler.compile(&as_arcs(&policies), &world);
    let rewritten = after
        .entries
        .iter()
        .filter(|(k, v)| before.entries.get(k) != Some(v))
        .count();
    assert!(
        rewritten <= removed.entries.len(),
        "{rewritten} entries rewritten for a policy of {}",
        removed.entries.len()
    );
    // Numbered afresh (every later rule id one policy lower), far more
    // entries would have been written.
    let fresh = compile(&as_arcs(&policies), &world);
    let renumbered = fresh
        .entries
        .iter()
        .filter(|(k, v)| before.entries.get(k) != Some(v))
        .count();
    assert!(renumbered > rewritten, "{renumbered} vs {rewritten}");
    // Reordered: found by name, nothing recomputed.
    policies.swap(0, 1);
    assert_eq!(check(&mut compiler, &policies, &world), 0);
    // A known address added: nothing is recomputed (rules naming blocks
    // resolve to the blocks' identities; the ipcache places each address).
    world
        .addresses
        .push(("10.77.0.9/32".parse().unwrap(), id["logging"]));
    assert_eq!(check(&mut compiler, &policies, &world), 0);
    // A workload's labels changed: the policies that select or name it
    // (before or after) are recomputed, not the others.
    relabel(&mut world, id["logging"], "tier", "x");
    let recomputed = check(&mut compiler, &policies, &world);
    assert!(
        recomputed > 0 && recomputed < n - 1,
        "{recomputed} of {}",
        n - 1
    );
    // A namespace's labels: everything.
    world
        .namespaces
        .get_mut("production")
        .unwrap()
        .insert("team".into(), "shop".into());
    assert_eq!(check(&mut compiler, &policies, &world), n - 1);
}

/// Rule ids stay put: removing one of many policies rewrites only its own
/// entries (numbered afresh, every later entry would change), and edits
/// that keep numbering new parts from the end are compacted once the freed
/// ids outnumber the used ones, the table judging the same throughout.
#[test]
fn rule_ids_stay_put_and_freed_ones_are_compacted() {
    use super::compile::Compiler;
    let (world, _) = scenario_world();
    let apps = ["order-service", "payment-service", "postgres", "logging"];
    let policy = |i: usize, port: u16| {
        let text = format!(
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: p{i}, namespace: production}}\nspec:\n  podSelector: {{matchLabels: {{app: {}}}}}\n  ingress: [{{from: [{{podSelector: {{matchLabels: {{app: {}}}}}}}], ports: [{{port: {port}}}]}}]\n",
            apps[i % 4],
            apps[(i + 1) % 4]
        );
        std::sync::Arc::new(parse_str("p.yaml", &text).unwrap().remove(0))
    };
    let mut policies: Vec<_> = (0..40).map(|i| policy(i, 1000 + i as u16)).collect();
    let mut compiler = Compiler::default();
    let before = compiler.compile(&policies, &world);
    let removed = compile(&policies[..1], &world).entries.len();
    policies.remove(0);
    let after = compiler.compile(&policies, &world);
    let changed = |a: &super::CompiledPolicy, b: &super::CompiledPolicy| {
        a.entries
            .iter()
            .filter(|(k, v)| b.entries.get(k) != Some(v))
            .count()
    };
    assert_eq!(changed(&after, &before), 0, "removal rewrote other entries");
    assert!(before.entries.len() - after.entries.len() == removed);
    assert!(changed(&compile(&policies, &world), &before) > 30);
    // 2000 edits of one policy: each numbers its rules from the end.
    let mut highest = 0;
    for round in 0..2000u16 {
        policies[5] = policy(6, 20_000 + round);
        let c = compiler.compile(&policies, &world);
        assert_eq!(compiler.recomputed, 1);
        highest = highest.max(c.rules.len());
        if round % 250 == 0 {
            assert_eq!(canonical(&c), canonical(&compile(&policies, &world)));
        }
    }
    let live = compile(&policies, &world).rules.len();
    assert!(
        highest <= 2 * live + 1100,
        "the rule table grew to {highest} ids for {live} rules"
    );
}

/// Whatever the world does between compiles — identities added, removed,
/// relabelled, renumbered, addresses moved, namespaces relabelled — the
/// remembering compiler's table is a fresh compile's, step after step.
#[test]
fn the_remembering_compiler_equals_a_fresh_compile_under_churn() {
    use super::compile::Compiler;
    let (mut world, _) = scenario_world();
    let mut policies: Vec<std::sync::Arc<super::model::Policy>> = load_paths(&[
        repo_policies("kubernetes"),
        repo_policies("palisade"),
        repo_policies("examples"),
    ])
    .unwrap()
    .policies;
    // Egress to any peer on a named port reads every identity's ports; a
    // CIDR peer, the addresses inside it.
    policies.extend(
        parse_str(
            "churn.yaml",
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: out-https, namespace: monitoring}\nspec:\n  podSelector: {}\n  egress: [{ports: [{port: https}]}]\n---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: office, namespace: production}\nspec:\n  podSelector: {}\n  ingress: [{from: [{ipBlock: {cidr: 10.20.0.0/16, except: [10.20.99.0/24]}}], ports: [{port: 443}]}]\n",
        )
        .unwrap()
        .into_iter()
        .map(std::sync::Arc::new),
    );
    let apps = [
        "order-service",
        "payment-service",
        "postgres",
        "logging",
        "prometheus",
        "dns",
        "web",
    ];
    let namespaces = ["production", "monitoring", "kube-system"];
    // A small deterministic generator (xorshift): the same churn every run.
    let mut state = 0x9e37_79b9_7f4a_7c15_u64;
    let mut next = |n: usize| {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state % n as u64) as usize
    };
    let mut compiler = Compiler::default();
    let mut reused = 0;
    for step in 0..300 {
        match next(6) {
            0 => {
                let ns = namespaces[next(3)];
                let app = apps[next(apps.len())];
                let id = 1000 + step;
                world.identities.push(Arc::new(IdentityInfo {
                    id,
                    name: format!("{ns}/{app}-{step}"),
                    namespace: Some(ns.into()),
                    labels: [("app".to_owned(), app.to_owned())].into(),
                    kind: IdentityKind::Workload,
                    named_ports: if next(2) == 0 {
                        [((Protocol::Tcp, "https".to_owned()), 8000 + step as u16)].into()
                    } else {
                        BTreeMap::new()
                    },
                }));
            }
            1 if world.identities.len() > 1 => {
                let i = next(world.identities.len());
                world.identities.remove(i);
            }
            2 => {
                let i = next(world.identities.len());
                let app = apps[next(apps.len())];
                Arc::make_mut(&mut world.identities[i])
                    .labels
                    .insert("app".into(), app.into());
            }
            3 => {
                let i = next(world.identities.len());
                let id = world.identities[i].id;
                // Inside a policy's CIDR, its exception, or neither.
                let block = ["10.20.1", "10.20.99", "192.168.10", "10.0.1"][next(4)];
                let last = next(250) + 1;
                world
                    .addresses
                    .push((format!("{block}.{last}/32").parse().unwrap(), id));
            }
            4 if next(4) == 0 => {
                let ns = namespaces[next(3)];
                world
                    .namespaces
                    .get_mut(ns)
                    .unwrap()
                    .insert("name".into(), format!("n{}", next(2)));
            }
            _ => {}
        }
        let remembered = compiler.compile(&policies, &world);
        assert_eq!(
            canonical(&remembered),
            canonical(&compile(&policies, &world)),
            "step {step}"
        );
        reused += policies.len() - compiler.recomputed;
    }
    assert!(
        reused > 300,
        "the compiler reused {reused} parts in 300 steps"
    );
}

#[test]
fn scenario_verdicts_from_both_policy_kinds() {
    let (world, id) = scenario_world();
    for kind in ["kubernetes", "palisade"] {
        let set = load_paths(&[repo_policies(kind)]).expect("example policies load");
        let c = compile(&set.policies, &world);
        let cases = [
            ("order-service", "payment-service", PROTO_TCP, 443, true),
            ("logging", "payment-service", PROTO_TCP, 443, false),
            ("prometheus", "payment-service", PROTO_TCP, 8080, true),
            ("logging", "payment-service", PROTO_TCP, 8080, false),
            ("payment-service", "postgres", PROTO_TCP, 5432, true),
            ("payment-service", "logging", PROTO_TCP, 9000, false),
            ("payment-service", "dns", PROTO_UDP, 53, true),
            ("logging", "postgres", PROTO_TCP, 5432, true),
            ("order-service", "payment-service", PROTO_TCP, 8080, false),
            ("prometheus", "payment-service", PROTO_TCP, 443, false),
            // UDP 53 is allowed to every pod of every namespace, not only dns.
            ("payment-service", "logging", PROTO_UDP, 53, true),
            ("payment-service", "dns", PROTO_TCP, 53, false),
        ];
        for (from, to, proto, port, expect) in cases {
            let v = both(&c, id[from], id[to], proto, port);
            assert_eq!(
                allowed(v),
                expect,
                "{kind}: {from} → {to}:{port}/{proto} gave {v:?}"
            );
        }
        // Unselected workloads are not judged at all.
        assert_eq!(
            both(&c, id["logging"], id["postgres"], PROTO_TCP, 5432),
            (None, None)
        );
        // The world (no identity) cannot reach payment-service.
        let d = decide(
            &c,
            DIR_INGRESS,
            PROTO_TCP,
            id["payment-service"],
            identity::WORLD,
            443,
        )
        .unwrap();
        assert_eq!(d.verdict, verdict::DENY);
        assert_eq!(d.rule_id, 0, "default deny");
        let policy = c.rule(d.policy_rule_id).expect("selecting policy is named");
        assert!(
            policy.policy.starts_with("production/payment-service"),
            "{policy:?}"
        );
        assert_eq!(policy.rule, "default-deny");
    }
}

/// One schema, two ways in: every example document read as a file and the
/// same document as the object the API server would hand the agent (the API
/// type deserialized from it, no text in between) become the same policy.
#[test]
fn a_file_and_the_same_cluster_object_become_the_same_policy() {
    use super::{
        api,
        load::{PolicyObject, validate_object},
    };
    let set = load_paths(&[
        repo_policies("kubernetes"),
        repo_policies("palisade"),
        repo_policies("examples"),
    ])
    .unwrap();
    let mut compared = 0;
    for file in &set.files {
        let text = std::fs::read_to_string(file).unwrap();
        for doc in text.split("\n---") {
            let (Some(kind), Some(name)) = (
                doc.lines().find_map(|l| l.strip_prefix("kind: ")),
                doc.lines().find_map(|l| l.trim().strip_prefix("name: ")),
            ) else {
                continue;
            };
            let from_api = match kind.trim() {
                "NetworkPolicy" => {
                    let o: api::NetworkPolicy = serde_saphyr::from_str(doc).unwrap();
                    validate_object(PolicyObject::Network(&o))
                }
                "PalisadePolicy" => {
                    let o: api::PalisadePolicy = serde_saphyr::from_str(doc).unwrap();
                    validate_object(PolicyObject::Palisade(&o))
                }
                "ClusterPalisadePolicy" => {
                    let o: api::ClusterPalisadePolicy = serde_saphyr::from_str(doc).unwrap();
                    validate_object(PolicyObject::ClusterPalisade(&o))
                }
                other => panic!("unexpected kind {other}"),
            }
            .unwrap();
            let from_file = set
                .policies
                .iter()
                .find(|p| p.name == name.trim() && p.origin.kind == kind.trim())
                .unwrap();
            assert!(from_api.origin.file.starts_with(kind.trim()));
            let mut same = from_api.clone();
            same.origin = from_file.origin.clone();
            assert_eq!(&same, &**from_file, "{kind} {name}");
            compared += 1;
        }
    }
    assert!(compared >= 5, "compared {compared}");
}

/// A cluster object's problem is named by the object and its field path.
#[test]
fn a_cluster_object_problem_names_the_object_and_the_field() {
    use super::load::{PolicyObject, validate_object};
    let mut o: super::api::PalisadePolicy = serde_saphyr::from_str(
        "apiVersion: palisade.dev/v1alpha1\nkind: PalisadePolicy\nmetadata: {name: p, namespace: shop}\nspec:\n  selector: {matchExpressions: [{key: app, operator: Equals, values: [x]}]}\n  ingress: [{from: [{cidr: 10.0.0.0/8, except: [11.0.0.0/8]}]}]\n",
    )
    .unwrap();
    let e = validate_object(PolicyObject::Palisade(&o))
        .unwrap_err()
        .to_string();
    assert_eq!(
        e,
        "PalisadePolicy/shop/p: spec.selector.matchExpressions[0].operator: unsupported value \"Equals\": supported values: \"In\", \"NotIn\", \"Exists\", \"DoesNotExist\"\n\
         PalisadePolicy/shop/p: spec.ingress[0].from[0].except[0]: \"11.0.0.0/8\" must be a strict subset of cidr \"10.0.0.0/8\""
    );
    o.spec.selector = Default::default();
    o.spec.ingress = None;
    assert!(validate_object(PolicyObject::Palisade(&o)).is_ok());
}

/// Plain scalars where the schema wants strings are those strings, as the
/// API server reads YAML: `namespace: y`, a label value `true`, a name `123`.
#[test]
fn plain_scalars_in_string_fields_are_strings() {
    let p = parse_str(
        "p.yaml",
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: \"123\", namespace: y}\nspec:\n  podSelector: {matchLabels: {enabled: true, tier: 2}}\n  ingress: [{ports: [{port: 80}]}]\n",
    )
    .unwrap();
    assert_eq!(p[0].namespace.as_deref(), Some("y"));
    // An exported object's status is ignored, as before.
    assert!(
        parse_str(
            "p.yaml",
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: a}\nspec: {}\nstatus: {conditions: []}\n"
        )
        .is_ok()
    );
    assert_eq!(p[0].selector.match_labels["enabled"], "true");
    assert_eq!(p[0].selector.match_labels["tier"], "2");
}

#[test]
fn every_example_policy_file_loads() {
    let set = load_paths(&[
        repo_policies("kubernetes"),
        repo_policies("palisade"),
        repo_policies("examples"),
    ])
    .expect("examples are valid");
    assert!(set.files.len() >= 5, "{:?}", set.files);
    assert!(
        set.policies
            .iter()
            .any(|p| p.origin.kind == "ClusterPalisadePolicy")
    );
    assert!(
        set.policies
            .iter()
            .any(|p| p.origin.kind == "NetworkPolicy")
    );
    assert!(
        set.policies
            .iter()
            .any(|p| p.origin.kind == "PalisadePolicy")
    );
}

/// ICMP rules: a type with every code is one 8-bit prefix of `type << 8 |
/// code`, a type and code one exact entry, no type every message; the
/// user-space lookup (the kernel's model) answers by message.
#[test]
fn an_icmp_rule_names_messages_by_type_and_code() {
    let (world, ids) = scenario_world();
    let text = "apiVersion: palisade.dev/v1alpha1\nkind: PalisadePolicy\nmetadata: {name: p, namespace: production}\n\
                spec:\n  selector: {matchLabels: {app: payment-service}}\n  egress:\n\
                \x20   - to: [{selector: {matchLabels: {app: order-service}}}]\n\
                \x20     ports: [{protocol: ICMP, type: 8}, {protocol: ICMPv6, type: 128, code: 0}, {protocol: TCP, port: 80}]\n\
                \x20   - to: [{selector: {matchLabels: {app: logging}}}]\n      ports: [{protocol: ICMP}]\n";
    let policies = parse_str("icmp.yaml", text).unwrap();
    let compiled = compile(&policies, &world);
    let (pay, order, logging) = (ids["payment-service"], ids["order-service"], ids["logging"]);
    let egress = |proto: u8, peer: u32, kind: u16, code: u16| {
        decide(&compiled, DIR_EGRESS, proto, pay, peer, kind << 8 | code).map(|d| d.verdict)
    };
    use palisade_common::{PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, verdict::ALLOW};
    assert_eq!(egress(PROTO_ICMP, order, 8, 0), Some(ALLOW), "echo, code 0");
    assert_eq!(
        egress(PROTO_ICMP, order, 8, 9),
        Some(ALLOW),
        "echo, any code"
    );
    assert_ne!(
        egress(PROTO_ICMP, order, 13, 0),
        Some(ALLOW),
        "timestamp is not echo"
    );
    assert_eq!(egress(PROTO_ICMPV6, order, 128, 0), Some(ALLOW));
    assert_ne!(
        egress(PROTO_ICMPV6, order, 128, 1),
        Some(ALLOW),
        "code 0 only"
    );
    assert_ne!(egress(PROTO_ICMPV6, order, 8, 0), Some(ALLOW), "per family");
    assert_ne!(
        egress(PROTO_ICMP, order, 0, 80),
        Some(ALLOW),
        "TCP 80 is not an ICMP message"
    );
    assert_eq!(egress(PROTO_TCP, order, 0, 80), Some(ALLOW));
    assert_eq!(
        egress(PROTO_ICMP, logging, 13, 0),
        Some(ALLOW),
        "every ICMP message"
    );
    assert_ne!(
        egress(PROTO_ICMPV6, logging, 128, 0),
        Some(ALLOW),
        "but not ICMPv6"
    );
    assert_ne!(egress(PROTO_TCP, logging, 0, 80), Some(ALLOW), "nor TCP");
    // NetworkPolicy cannot name ICMP (the API server refuses it).
    let np = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: x, namespace: y}\n\
              spec:\n  podSelector: {}\n  egress:\n  - ports: [{protocol: ICMP}]\n";
    assert!(problems(np)[0].contains("supported values: \"TCP\", \"UDP\", \"SCTP\""));
}

#[test]
fn a_full_port_range_costs_a_handful_of_entries() {
    let (world, id) = scenario_world();
    let yaml = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: wide, namespace: production}
spec:
  podSelector: {matchLabels: {app: payment-service}}
  ingress:
  - from: [{podSelector: {matchLabels: {app: order-service}}}]
    ports: [{protocol: TCP, port: 1, endPort: 65535}]
  - ports: [{protocol: UDP, port: 5000, endPort: 5999}]
"#;
    let policies = parse_str("wide.yaml", yaml).unwrap();
    let c = compile(&policies, &world);
    let tcp = c.entries.keys().filter(|k| k.protocol == PROTO_TCP).count();
    let udp = c.entries.keys().filter(|k| k.protocol == PROTO_UDP).count();
    assert_eq!(tcp, 16, "1–65535 is 16 prefixes for one peer");
    assert!(
        udp <= 30,
        "a 1000-port range is a few prefixes, not 1000 entries ({udp})"
    );
    assert!(
        c.entries
            .keys()
            .filter(|k| k.protocol == PROTO_UDP)
            .all(|k| k.peer == identity::ANY),
        "no per-identity expansion of any-peer"
    );
    let d = |peer, proto, port| {
        decide(&c, DIR_INGRESS, proto, id["payment-service"], peer, port)
            .unwrap()
            .verdict
    };
    assert_eq!(d(id["order-service"], PROTO_TCP, 1), verdict::ALLOW);
    assert_eq!(d(id["order-service"], PROTO_TCP, 65535), verdict::ALLOW);
    assert_eq!(d(id["logging"], PROTO_TCP, 443), verdict::DENY);
    assert_eq!(d(identity::WORLD, PROTO_UDP, 5999), verdict::ALLOW);
    assert_eq!(d(identity::WORLD, PROTO_UDP, 6000), verdict::DENY);
    assert_eq!(d(identity::WORLD, PROTO_UDP, 4999), verdict::DENY);
}

#[test]
fn policy_types_default_like_the_api_server() {
    let (world, id) = scenario_world();
    let only_ingress = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: a, namespace: production}
spec:
  podSelector: {matchLabels: {app: postgres}}
"#;
    let c = compile(&parse_str("a.yaml", only_ingress).unwrap(), &world);
    assert!(
        c.enforced.contains_key(&(DIR_INGRESS, id["postgres"])),
        "Ingress is always defaulted"
    );
    assert!(
        !c.enforced.contains_key(&(DIR_EGRESS, id["postgres"])),
        "no egress rules ⇒ no Egress type"
    );
    let with_egress = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: b, namespace: production}
spec:
  podSelector: {}
  egress:
  - to: [{podSelector: {}}]
"#;
    let c = compile(&parse_str("b.yaml", with_egress).unwrap(), &world);
    assert!(
        c.enforced.contains_key(&(DIR_EGRESS, id["logging"])),
        "egress rules ⇒ Egress type"
    );
    assert!(c.enforced.contains_key(&(DIR_INGRESS, id["logging"])));
    assert!(
        !c.enforced.contains_key(&(DIR_INGRESS, id["dns"])),
        "a policy selects only its own namespace"
    );
    // podSelector {} in `to` means pods of the policy's namespace only.
    let egress =
        |to, proto, port| decide(&c, DIR_EGRESS, proto, id["logging"], to, port).map(|d| d.verdict);
    assert_eq!(egress(id["postgres"], PROTO_TCP, 1), Some(verdict::ALLOW));
    assert_eq!(egress(id["dns"], PROTO_UDP, 53), Some(verdict::DENY));
    // Ingress was defaulted on with no rules: nothing may come in.
    let d = decide(
        &c,
        DIR_INGRESS,
        PROTO_TCP,
        id["postgres"],
        id["logging"],
        5432,
    )
    .unwrap();
    assert_eq!(d.verdict, verdict::DENY);
}

#[test]
fn a_deny_rule_beats_an_allow_and_audit_mode_only_reports() {
    let (world, id) = scenario_world();
    let yaml = r#"
apiVersion: palisade.dev/v1alpha1
kind: PalisadePolicy
metadata: {name: db, namespace: production}
spec:
  selector: {matchLabels: {app: postgres}}
  ingress:
    - name: no-logging
      action: deny
      from: [{selector: {matchLabels: {app: logging}}}]
    - name: everyone
      ports: [{protocol: TCP, port: 5432}]
---
apiVersion: palisade.dev/v1alpha1
kind: PalisadePolicy
metadata: {name: trial, namespace: production}
spec:
  mode: audit
  selector: {matchLabels: {app: order-service}}
  ingress: []
"#;
    let policies = parse_str("deny.yaml", yaml).unwrap();
    let c = compile(&policies, &world);
    let d = decide(
        &c,
        DIR_INGRESS,
        PROTO_TCP,
        id["postgres"],
        id["logging"],
        5432,
    )
    .unwrap();
    assert_eq!(d.verdict, verdict::DENY);
    assert_eq!(c.rule(d.rule_id).unwrap().rule, "no-logging");
    let d = decide(
        &c,
        DIR_INGRESS,
        PROTO_TCP,
        id["postgres"],
        id["payment-service"],
        5432,
    )
    .unwrap();
    assert_eq!(
        (d.verdict, c.rule(d.rule_id).unwrap().rule.as_str()),
        (verdict::ALLOW, "everyone")
    );
    let d = decide(
        &c,
        DIR_INGRESS,
        PROTO_TCP,
        id["order-service"],
        id["logging"],
        8000,
    )
    .unwrap();
    assert_eq!(
        d.verdict,
        verdict::WOULD_DENY,
        "audit mode lets it through and reports it"
    );
}

fn problems(yaml: &str) -> Vec<String> {
    match parse_str("bad.yaml", yaml) {
        Ok(p) => panic!("accepted: {p:?}"),
        Err(e) => e.problems.iter().map(ToString::to_string).collect(),
    }
}

const HEAD: &str = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: x, namespace: y}\nspec:\n  podSelector: {}\n";

/// Malformed and hostile inputs: each is refused with `file:line:column:` and
/// what is wrong, quickly. (location, substring of the message)
#[test]
fn bad_input_is_reported_with_file_line_and_field() {
    let np = |spec: &str| format!("{HEAD}{spec}");
    let pp = |spec: &str| {
        format!(
            "apiVersion: palisade.dev/v1alpha1\nkind: PalisadePolicy\nmetadata: {{name: p, namespace: y}}\nspec:\n  selector: {{}}\n{spec}"
        )
    };
    let cases: Vec<(String, &str, &str)> = vec![
        (np("  ingress:\n  - ports: [{port: 0}]\n"), "7:20", "spec.ingress[0].ports[0].port: 0 is out of range: must be between 1 and 65535, inclusive"),
        (np("  ingress:\n  - ports: [{port: 70000}]\n"), "7:20", "spec.ingress[0].ports[0].port: 70000 is out of range"),
        (np("  egress:\n  - ports: [{port: 90, endPort: 80}]\n"), "7:33", "spec.egress[0].ports[0].endPort: 80 must be greater than or equal to port (90)"),
        (np("  egress:\n  - ports: [{endPort: 80}]\n"), "7:23", "spec.egress[0].ports[0].endPort: may not be specified when port is not specified"),
        (np("  ingress:\n  - ports: [{port: 80, protocol: ICMP}]\n"), "7:34", "spec.ingress[0].ports[0].protocol: unsupported value \"ICMP\""),
        (np("  ingress:\n  - ports: [{port: [80]}]\n"), "7:", "invalid type"),
        (np("  ingress:\n  - from: [{ipBlock: {cidr: 10.0.0.300/8}}]\n"), "7:", "spec.ingress[0].from[0].ipBlock.cidr: \"10.0.0.300/8\" is not a valid CIDR"),
        (np("  ingress:\n  - from: [{ipBlock: {cidr: 10.0.0.1}}]\n"), "7:", "is an address, not a CIDR"),
        (np("  ingress:\n  - from: [{ipBlock: {cidr: 10.0.0.0/8, except: [11.0.0.0/8]}}]\n"), "7:", "spec.ingress[0].from[0].ipBlock.except[0]: \"11.0.0.0/8\" must be a strict subset"),
        (np("  ingress:\n  - from: [{ipBlock: {cidr: 10.0.0.0/8}, podSelector: {}}]\n"), "7:", "may not specify both ipBlock and another peer"),
        (np("  ingress:\n  - from: [{}]\n"), "7:", "spec.ingress[0].from[0]: must specify a peer"),
        (np("  ingres:\n  - {}\n"), "6:3", "spec: unknown field `ingres`, expected one of egress, ingress, podSelector, policyTypes; did you mean `ingress`?"),
        (np("  podSelector: {}\n"), "6:3", "duplicate mapping key: podSelector"),
        (np("  policyTypes: [Sideways]\n"), "6:17", "spec.policyTypes[0]: unsupported value \"Sideways\""),
        (np("  ingress:\n  - from: [{podSelector: {matchExpressions: [{key: a, operator: In}]}}]\n"), "7:", "matchExpressions[0].values: must be non-empty when operator is In"),
        (np("  ingress:\n  - from: [{podSelector: {matchExpressions: [{key: a, operator: Exists, values: [x]}]}}]\n"), "7:", "must be empty when operator is Exists"),
        (np("  ingress:\n  - from: [{podSelector: {matchExpressions: [{key: a, operator: Equals}]}}]\n"), "7:", "Equals"),
        ("apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {namespace: y}\nspec: {}\n".into(), "3:11", "metadata.name: is required"),
        ("apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: Web_Policy}\nspec: {}\n".into(), "3:18", "metadata.name: Invalid value: \"Web_Policy\": a lowercase RFC 1123 subdomain"),
        ("apiVersion: v1\nkind: Pod\n".into(), "2:7", "unsupported document apiVersion=v1 kind=Pod"),
        ("kind: NetworkPolicy\n".into(), "1:1", "apiVersion: unsupported document apiVersion=(missing)"),
        ("apiVersion: [\n".into(), "1:13", "unclosed bracket"),
        ("apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: x}\nspec:\n\tpodSelector: {}\n".into(), "5:", ""),
        (pp("  mode: strict\n"), "6:9", "spec.mode: unsupported value \"strict\""),
        (pp("  ingress:\n    - action: reject\n"), "7:15", "spec.ingress[0].action: unsupported value \"reject\""),
        (pp("  ingress:\n    - from: [{identity: a/b, cidr: 10.0.0.0/8}]\n"), "7:", "spec.ingress[0].from[0]: must specify exactly one of"),
        (pp("  ingress:\n    - name: r\n    - name: r\n"), "8:13", "spec.ingress[1].name: rule name \"r\" is used twice"),
        (pp("  egress:\n    - from: [{identity: a/b}]\n"), "7:", "spec.egress[0].from: egress rules name their peers in \"to\""),
        (np("  ingress:\n  - ports: [{port: HTTP_1}]\n"), "7:20", "\"HTTP_1\" is not a valid port name"),
        (pp("  egress:\n    - ports: [{protocol: ICMP, port: 8}]\n"), "7:", "spec.egress[0].ports[0].port: ICMP has no ports: name messages with `type` and `code`"),
        (pp("  egress:\n    - ports: [{protocol: ICMPv6, type: 256}]\n"), "7:", "spec.egress[0].ports[0].type: 256 is out of range: must be between 0 and 255"),
        (pp("  egress:\n    - ports: [{protocol: ICMP, code: 0}]\n"), "7:", "spec.egress[0].ports[0].code: may not be specified without type"),
        (pp("  egress:\n    - ports: [{protocol: UDP, port: 53, type: 8}]\n"), "7:", "spec.egress[0].ports[0].type: only with protocol ICMP or ICMPv6 (this port's protocol is UDP)"),
        (pp("  egress:\n    - ports: [{protocol: icmp, type: 8}]\n"), "7:", "unsupported value \"icmp\": supported values: \"TCP\", \"UDP\", \"SCTP\", \"ICMP\", \"ICMPv6\""),
        (format!("{HEAD}---\n{HEAD}  policyTypes: [Sideways]\n"), "12:17", "spec.policyTypes[0]"),
        (format!("{HEAD}---\n{HEAD}"), "7:1", "NetworkPolicy y/x is defined twice (first at "),
    ];
    assert!(cases.len() >= 25);
    for (yaml, at, message) in &cases {
        let start = std::time::Instant::now();
        let problems = match parse_str("bad.yaml", yaml) {
            Ok(p) if p.len() == 2 => {
                // Duplicates across documents are found by load_paths.
                let dir = tempfile::tempdir().unwrap();
                let path = dir.path().join("bad.yaml");
                std::fs::write(&path, yaml).unwrap();
                load_paths(&[path])
                    .unwrap_err()
                    .problems
                    .into_iter()
                    .map(|mut p| {
                        p.file = "bad.yaml".into();
                        p.to_string()
                    })
                    .collect::<Vec<_>>()
            }
            Ok(p) => panic!("accepted {yaml:?}: {p:?}"),
            Err(e) => e.problems.iter().map(ToString::to_string).collect(),
        };
        assert!(
            start.elapsed() < std::time::Duration::from_secs(1),
            "{yaml:?} took {:?}",
            start.elapsed()
        );
        let want = format!("bad.yaml:{at}");
        assert!(
            problems
                .iter()
                .any(|p| p.starts_with(&want) && p.contains(message)),
            "for {yaml:?}\nwanted {want}…{message}\ngot {problems:#?}"
        );
    }
}

#[test]
fn huge_and_deep_files_are_refused_quickly() {
    let dir = tempfile::tempdir().unwrap();
    let big = dir.path().join("big.yaml");
    let line = "# padding padding padding padding padding padding padding padding padding\n";
    std::fs::write(&big, line.repeat(50 * 1024 * 1024 / line.len())).unwrap();
    let deep = dir.path().join("deep.yaml");
    std::fs::write(&deep, format!("apiVersion: {}\n", "[".repeat(100_000))).unwrap();
    for (path, message) in [(&big, "more than the limit"), (&deep, "")] {
        let start = std::time::Instant::now();
        let e = load_paths(std::slice::from_ref(path)).unwrap_err();
        assert!(
            start.elapsed() < std::time::Duration::from_secs(1),
            "{:?}",
            start.elapsed()
        );
        let p = &e.problems[0];
        assert!(
            p.file
                .ends_with(path.file_name().unwrap().to_str().unwrap())
                && p.message.contains(message),
            "{p}"
        );
    }
}

#[test]
fn alias_expansion_is_bounded() {
    let mut bomb =
        String::from("a: &a [\"x\",\"x\",\"x\",\"x\",\"x\",\"x\",\"x\",\"x\",\"x\",\"x\"]\n");
    let mut prev = 'a';
    for c in 'b'..='k' {
        bomb.push_str(&format!("{c}: &{c} [*{prev},*{prev},*{prev},*{prev},*{prev},*{prev},*{prev},*{prev},*{prev},*{prev}]\n"));
        prev = c;
    }
    // As the value of a real field, so the budget (not a type error) stops it.
    let bomb_doc = format!(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: x, namespace: y}}\nx-bomb:\n{}",
        bomb.lines().map(|l| format!("  {l}\n")).collect::<String>()
    );
    for input in [bomb, bomb_doc] {
        let start = std::time::Instant::now();
        let p = problems(&input);
        // 10^11 nodes if expanded; refusing it is what makes this finish at all.
        assert!(
            start.elapsed() < std::time::Duration::from_secs(1),
            "{:?}",
            start.elapsed()
        );
        assert!(
            p[0].starts_with("bad.yaml:")
                && p[0].contains("refused: it expands to more than 200000 nodes"),
            "{p:?}"
        );
    }
}

#[test]
fn named_ports_resolve_against_the_workload_that_declares_them() {
    let (world, id) = scenario_world();
    let yaml = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: named, namespace: production}
spec:
  podSelector: {matchLabels: {app: payment-service}}
  policyTypes: [Ingress, Egress]
  ingress:
  - ports: [{port: https}]
  egress:
  - to: [{podSelector: {matchLabels: {app: postgres}}}]
    ports: [{port: https}]
  - ports: [{port: https, protocol: UDP}]
"#;
    let c = compile(&parse_str("named.yaml", yaml).unwrap(), &world);
    let v = |dir, peer, proto, port| {
        decide(&c, dir, proto, id["payment-service"], peer, port)
            .unwrap()
            .verdict
    };
    // Ingress: the selected pod's own `https` (8443), from anyone.
    assert_eq!(
        v(DIR_INGRESS, id["logging"], PROTO_TCP, 8443),
        verdict::ALLOW
    );
    assert_eq!(
        v(DIR_INGRESS, identity::WORLD, PROTO_TCP, 8443),
        verdict::ALLOW
    );
    assert_eq!(v(DIR_INGRESS, id["logging"], PROTO_TCP, 443), verdict::DENY);
    // Egress: the peer's `https` (443 on postgres).
    assert_eq!(
        v(DIR_EGRESS, id["postgres"], PROTO_TCP, 443),
        verdict::ALLOW
    );
    assert_eq!(
        v(DIR_EGRESS, id["postgres"], PROTO_TCP, 8443),
        verdict::DENY
    );
    assert_eq!(v(DIR_EGRESS, id["logging"], PROTO_TCP, 443), verdict::DENY);
    // A name no workload declares for UDP matches nothing.
    assert_eq!(v(DIR_EGRESS, id["logging"], PROTO_UDP, 443), verdict::DENY);
}

fn problems_of(text: &str) -> Vec<String> {
    match parse_str("p.yaml", text) {
        Ok(_) => Vec::new(),
        Err(e) => e.problems.iter().map(ToString::to_string).collect(),
    }
}

#[test]
fn names_labels_and_integers_are_validated_as_the_api_server_does() {
    let np = |meta: &str, selector: &str, ports: &str| {
        format!(
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {meta}\nspec:\n  podSelector: {selector}\n  ingress:\n  - ports: [{ports}]\n"
        )
    };
    // Upstream's own wording (apimachinery validation), field by field.
    let p = problems_of(&np("{name: a, namespace: Bad_NS}", "{}", "{port: 80}"));
    assert_eq!(
        p,
        [
            "p.yaml:3:32: metadata.namespace: Invalid value: \"Bad_NS\": a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must start and end with an alphanumeric character (e.g. 'my-name',  or '123-abc', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?')"
        ]
    );
    let p = problems_of(&np("{name: a.B, namespace: ok}", "{}", "{port: 80}"));
    assert!(
        p[0].contains("metadata.name: Invalid value: \"a.B\": a lowercase RFC 1123 subdomain"),
        "{p:?}"
    );
    let p = problems_of(&np(
        "{name: a, namespace: ok}",
        "{matchLabels: {\"example.com/ok\": \"x y\", \"-bad\": v, \"a/b/c\": v}}",
        "{port: 80}",
    ));
    assert_eq!(p.len(), 3, "{p:?}");
    assert!(p.iter().any(|m| m.contains("spec.podSelector.matchLabels: Invalid value: \"x y\": a valid label must be an empty string")), "{p:?}");
    assert!(
        p.iter().any(|m| m.contains(
            "Invalid value: \"-bad\": name part must consist of alphanumeric characters"
        )),
        "{p:?}"
    );
    assert!(
        p.iter()
            .any(|m| m.contains("Invalid value: \"a/b/c\": a qualified name must consist")),
        "{p:?}"
    );
    let long = "v".repeat(64);
    let p = problems_of(&np(
        "{name: a, namespace: ok}",
        &format!("{{matchExpressions: [{{key: app, operator: In, values: [ok, {long}]}}]}}"),
        "{port: 80}",
    ));
    assert!(
        p[0].contains("spec.podSelector.matchExpressions[0].values[1]: Invalid value")
            && p[0].contains("must be no more than 63 characters"),
        "{p:?}"
    );
    // A namespace of a megabyte is refused without echoing it back.
    let huge = "n".repeat(1 << 20);
    let p = problems_of(&np(
        &format!("{{name: a, namespace: {huge}}}"),
        "{}",
        "{port: 80}",
    ));
    assert!(
        p[0].contains("must be no more than 63 characters") && p[0].len() < 1000,
        "{}",
        &p[0][..200]
    );
    // Integers only where integers belong: a quoted endPort is a string.
    let p = problems_of(&np(
        "{name: a, namespace: ok}",
        "{}",
        "{port: 80, endPort: \"90\"}",
    ));
    assert!(
        p[0].contains("expected an integer, found the string \"90\""),
        "{p:?}"
    );
    assert!(
        problems_of(&np(
            "{name: a, namespace: ok}",
            "{}",
            "{port: 80, endPort: 90}"
        ))
        .is_empty()
    );
}

#[test]
fn a_policy_directory_over_the_rule_budget_is_refused_at_the_file_that_crosses_it() {
    let dir = tempfile::tempdir().unwrap();
    let file = |i: usize, peers: usize, ports: usize| {
        let peers: String = (0..peers)
            .map(|p| format!("    - podSelector: {{matchLabels: {{peer: \"p{p}\"}}}}\n"))
            .collect();
        let ports: String = (0..ports)
            .map(|p| format!("{{port: {}}}, ", p + 1))
            .collect();
        format!(
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: p{i}, namespace: ok}}\nspec:\n  podSelector: {{}}\n  ingress:\n  - from:\n{peers}    ports: [{ports}]\n"
        )
    };
    // 100 000 terms each: the first two fit, the third crosses the budget.
    for i in 0..3 {
        std::fs::write(dir.path().join(format!("p{i}.yaml")), file(i, 400, 250)).unwrap();
    }
    let e = load_paths(&[dir.path().to_owned()])
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("p2.yaml:1:1") && e.contains("more than 200000 rule terms"),
        "{e}"
    );
    std::fs::remove_file(dir.path().join("p2.yaml")).unwrap();
    assert_eq!(
        load_paths(&[dir.path().to_owned()]).unwrap().policies.len(),
        2
    );
}

/// While nothing a merge is made of changes — no policy recomputed, the
/// same CIDR blocks — the compiler hands out the same table (one `Arc`),
/// which the datapath then does not compare entry by entry; a change that
/// touches a policy makes a new one.
#[test]
fn an_unchanged_compile_hands_out_the_same_table() {
    use super::compile::Compiler;
    let (mut world, id) = scenario_world();
    let set = load_paths(&[repo_policies("kubernetes"), repo_policies("examples")]).unwrap();
    let mut compiler = Compiler::default();
    let first = compiler.compile(&set.policies, &world);
    let again = compiler.compile(&set.policies, &world);
    assert!(Arc::ptr_eq(&first, &again), "nothing changed");
    // A pod of an existing identity at an address no CIDR rule names.
    world
        .addresses
        .push(("192.0.2.77/32".parse().unwrap(), id["logging"]));
    let moved = compiler.compile(&set.policies, &world);
    let cidr_policies = set.policies.iter().any(|p| {
        p.peers()
            .any(|peer| matches!(peer, super::model::Peer::Cidr { .. }))
    });
    if !cidr_policies {
        assert!(Arc::ptr_eq(&first, &moved));
    }
    assert_eq!(
        canonical(&moved),
        canonical(&compile(&set.policies, &world))
    );
    // A relabelled identity that policies select: a new table, equal to a
    // fresh compile.
    relabel(&mut world, id["logging"], "app", "payment-service");
    let relabelled = compiler.compile(&set.policies, &world);
    assert!(!Arc::ptr_eq(&moved, &relabelled));
    assert_eq!(
        canonical(&relabelled),
        canonical(&compile(&set.policies, &world))
    );
}
