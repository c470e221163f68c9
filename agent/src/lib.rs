//! Palisade's node agent as a library: the binary (`main.rs`) is a thin CLI
//! over these modules. See ARCHITECTURE.md for the code map.
pub mod agent;
pub mod audit;
pub mod cgroupwatch;
pub mod config;
pub mod control;
pub mod datapath;
pub mod discovery;
pub mod fuzzing;
pub mod http;
pub mod identity;
pub mod inventory;
pub mod kubernetes;
pub mod netlink;
pub mod offline;
pub mod policy;
pub mod reconcile;
pub mod sockets;
pub mod status;
#[cfg(test)]
mod testing;
pub mod text;
pub mod yaml;

/// The agent's top-level modules import each other without a cycle: each
/// source file's `crate::…` paths (also inside `use crate::{…}` groups)
/// name the modules it depends on, and the graph of those is acyclic.
#[cfg(test)]
mod module_graph {
    use std::{
        collections::{BTreeMap, BTreeSet},
        path::Path,
    };

    /// Top-level module names a source text refers to through `crate::`.
    fn references(text: &str) -> BTreeSet<String> {
        let mut out = BTreeSet::new();
        let mut rest = text;
        while let Some(at) = rest.find("crate::") {
            rest = &rest[at + "crate::".len()..];
            if let Some(group) = rest.strip_prefix('{') {
                // Names at the group's top level: `{a, b::{c, d}, e::f}`.
                let mut depth = 0usize;
                let mut item = String::new();
                for ch in group.chars() {
                    match ch {
                        '{' => depth += 1,
                        '}' if depth == 0 => break,
                        '}' => depth -= 1,
                        ',' if depth == 0 => {
                            out.extend(head(&item));
                            item.clear();
                            continue;
                        }
                        _ => {}
                    }
                    if depth == 0 {
                        item.push(ch);
                    }
                }
                out.extend(head(&item));
            } else {
                out.extend(head(rest));
            }
        }
        out
    }

    fn head(path: &str) -> Option<String> {
        let name: String = path
            .trim_start()
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        (!name.is_empty() && name != "self").then_some(name)
    }

    fn graph() -> BTreeMap<String, BTreeSet<String>> {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        let mut stack = vec![src.clone()];
        while let Some(dir) = stack.pop() {
            for entry in std::fs::read_dir(&dir).unwrap().flatten() {
                let path = entry.path();
                if path.is_dir() {
                    stack.push(path);
                    continue;
                }
                let rel = path.strip_prefix(&src).unwrap();
                let first = rel.components().next().unwrap().as_os_str();
                let module = first.to_string_lossy().trim_end_matches(".rs").to_owned();
                if ["lib", "main"].contains(&module.as_str()) {
                    continue;
                }
                let text = std::fs::read_to_string(&path).unwrap();
                let deps = graph.entry(module.clone()).or_default();
                deps.extend(references(&text).into_iter().filter(|d| *d != module));
            }
        }
        graph
    }

    /// A cycle through `start`, if any (depth-first).
    fn cycle(
        graph: &BTreeMap<String, BTreeSet<String>>,
        node: &str,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(at) = path.iter().position(|p| p == node) {
            let mut c = path[at..].to_vec();
            c.push(node.to_owned());
            return Some(c);
        }
        if done.contains(node) {
            return None;
        }
        path.push(node.to_owned());
        for dep in graph.get(node).into_iter().flatten() {
            if let Some(c) = cycle(graph, dep, path, done) {
                return Some(c);
            }
        }
        path.pop();
        done.insert(node.to_owned());
        None
    }

    #[test]
    fn references_are_read_from_paths_and_use_groups() {
        let text =
            "use crate::{audit::{self, X}, config::Config, self};\nlet x = crate::status::Y;";
        let got: Vec<String> = references(text).into_iter().collect();
        assert_eq!(got, ["audit", "config", "status"]);
    }

    #[test]
    fn the_agents_modules_import_each_other_without_a_cycle() {
        let graph = graph();
        assert!(graph.contains_key("agent") && graph["agent"].contains("datapath"));
        let mut done = BTreeSet::new();
        for module in graph.keys() {
            let found = cycle(&graph, module, &mut Vec::new(), &mut done);
            assert!(
                found.is_none(),
                "import cycle: {}",
                found.unwrap_or_default().join(" -> ")
            );
        }
    }
}
