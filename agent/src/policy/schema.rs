//! The structure check of a policy file against the one policy schema: the
//! JSON Schemas generated from the API types themselves (k8s-openapi's
//! NetworkPolicy, Palisade's CRD types), as the API server's strict field
//! validation checks an object against its OpenAPI schema. It runs on the
//! located YAML tree before anything is deserialized, so every unknown
//! field, wrong scalar type and unsupported enumerated value is reported at
//! once, each at its field path and position. The same walk turns the tree
//! into the JSON the typed object is deserialized from, reading a plain
//! scalar where the schema wants a string as that string (`port: 80` is a
//! number, `app: true` under `matchLabels` the label value "true"), as the
//! API server's YAML reader does.
use std::{any::TypeId, collections::HashMap, sync::Mutex};

use schemars::JsonSchema;
use serde_json::Value as J;

use super::api::ObjectMeta;
use crate::yaml::{self, Node, Position, Value};

/// One structural problem: its field path, where it was written, what is wrong.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SchemaProblem {
    pub path: String,
    pub at: Position,
    pub message: String,
}

/// The schema of `T` with every subschema inlined, generated once per type.
/// A custom resource's generated schema holds only its `spec`: the object's
/// `apiVersion`, `kind` and `metadata` are added as the API server adds them.
fn schema_of<T: JsonSchema + 'static>() -> &'static J {
    static CACHE: Mutex<Option<HashMap<TypeId, &'static J>>> = Mutex::new(None);
    let mut cache = match CACHE.lock() {
        Ok(c) => c,
        Err(poisoned) => poisoned.into_inner(),
    };
    cache
        .get_or_insert_with(HashMap::new)
        .entry(TypeId::of::<T>())
        .or_insert_with(|| {
            let mut generator = schemars::generate::SchemaSettings::default()
                .with(|s| s.inline_subschemas = true)
                .into_generator();
            let metadata = generator.subschema_for::<ObjectMeta>().to_value();
            let mut schema = generator.into_root_schema_for::<T>().to_value();
            if let Some(J::Object(properties)) = schema.get_mut("properties") {
                let string = serde_json::json!({"type": "string"});
                properties
                    .entry("apiVersion")
                    .or_insert_with(|| string.clone());
                properties.entry("kind").or_insert(string);
                properties.entry("metadata").or_insert(metadata);
            }
            // Three policy types at most: leaked once, read for the process's life.
            Box::leak(Box::new(schema))
        })
}

/// `node` (parsed from `text`) as the JSON a `T` deserializes from, or every
/// structural problem it has as a `T`.
pub fn conform<T: JsonSchema + 'static>(node: &Node, text: &str) -> Result<J, Vec<SchemaProblem>> {
    let mut walker = Walker {
        text,
        path: String::new(),
        problems: Vec::new(),
    };
    let json = walker.walk(Some(schema_of::<T>()), node);
    if walker.problems.is_empty() {
        Ok(json)
    } else {
        Err(walker.problems)
    }
}

/// The one schema a value must match: `anyOf`/`oneOf` with a single
/// non-null branch (how an `Option` is written) is that branch; `None` when
/// the schema leaves the value open.
fn resolve(schema: &J) -> Option<&J> {
    for key in ["anyOf", "oneOf"] {
        if let Some(J::Array(branches)) = schema.get(key) {
            let mut real = branches
                .iter()
                .filter(|b| b.get("type").and_then(J::as_str) != Some("null"));
            return match (real.next(), real.next()) {
                (Some(one), None) => resolve(one),
                _ => None,
            };
        }
    }
    schema.is_object().then_some(schema)
}

fn types(schema: &J) -> Vec<&str> {
    match schema.get("type") {
        Some(J::String(t)) => vec![t.as_str()],
        Some(J::Array(ts)) => ts.iter().filter_map(J::as_str).collect(),
        _ => Vec::new(),
    }
}

fn kind_of(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Int(_) | Value::UInt(_) => "an integer",
        Value::Float(_) => "a number",
        Value::Str(_) => "a string",
        Value::Seq(_) => "a list",
        Value::Map(_) => "a mapping",
    }
}

fn fits(ty: &str, value: &Value) -> bool {
    matches!(
        (ty, value),
        ("object", Value::Map(_))
            | ("array", Value::Seq(_))
            | ("string", Value::Str(_))
            | ("boolean", Value::Bool(_))
            | ("integer", Value::Int(_) | Value::UInt(_))
            | ("number", Value::Int(_) | Value::UInt(_) | Value::Float(_))
    )
}

fn describe(ty: &str) -> &str {
    match ty {
        "object" => "a mapping",
        "array" => "a list",
        "string" => "a string",
        "boolean" => "a boolean",
        "integer" => "an integer",
        "number" => "a number",
        other => other,
    }
}

struct Walker<'t> {
    text: &'t str,
    path: String,
    problems: Vec<SchemaProblem>,
}

impl Walker<'_> {
    fn problem(&mut self, at: Position, message: String) {
        self.problems.push(SchemaProblem {
            path: self.path.clone(),
            at,
            message,
        });
    }

    /// `node` as JSON under `schema` (`None`: open, anything goes).
    fn walk(&mut self, schema: Option<&J>, node: &Node) -> J {
        let schema = schema.and_then(resolve);
        let plain = node.plain_text(self.text);
        let Some(schema) = schema else {
            return node.to_json();
        };
        if node.value == Value::Null {
            return J::Null;
        }
        if schema.get("x-kubernetes-int-or-string") == Some(&J::Bool(true)) {
            return match &node.value {
                Value::Int(n) => J::from(*n),
                Value::UInt(n) => J::from(*n),
                Value::Str(s) => J::String(s.clone()),
                v => {
                    let found = kind_of(v);
                    self.problem(
                        node.at,
                        format!("invalid type: found {found}, expected a port number or name"),
                    );
                    J::Null
                }
            };
        }
        let wanted: Vec<&str> = types(schema).into_iter().filter(|t| *t != "null").collect();
        if let Some(text) = plain.filter(|_| wanted.contains(&"string")) {
            return J::String(text.to_owned());
        }
        if !wanted.is_empty() && !wanted.iter().any(|t| fits(t, &node.value)) {
            let message = match (&node.value, wanted.as_slice()) {
                (Value::Str(s), ["integer"]) => format!(
                    "expected an integer, found the string {s:?} (write the number without quotes)"
                ),
                (v, _) => format!(
                    "invalid type: found {}, expected {}",
                    kind_of(v),
                    wanted
                        .iter()
                        .map(|t| describe(t))
                        .collect::<Vec<_>>()
                        .join(" or ")
                ),
            };
            self.problem(node.at, message);
            return J::Null;
        }
        if let (Some(J::Array(allowed)), Value::Str(s)) = (schema.get("enum"), &node.value)
            && !allowed.iter().any(|a| a.as_str() == Some(s))
        {
            let list: Vec<String> = allowed
                .iter()
                .filter(|a| !a.is_null())
                .map(ToString::to_string)
                .collect();
            let message = format!(
                "unsupported value {s:?}: supported values: {}",
                list.join(", ")
            );
            self.problem(node.at, message);
        }
        let len = self.path.len();
        match &node.value {
            Value::Seq(items) => J::Array(
                items
                    .iter()
                    .enumerate()
                    .map(|(i, n)| {
                        self.path.push_str(&format!("[{i}]"));
                        let j = self.walk(schema.get("items"), n);
                        self.path.truncate(len);
                        j
                    })
                    .collect(),
            ),
            Value::Map(entries) => self.walk_map(schema, entries),
            _ => node.to_json(),
        }
    }

    /// A mapping under an object schema: known fields walked, an unknown
    /// one reported where its key was written (when the schema is closed).
    fn walk_map(&mut self, schema: &J, entries: &[(yaml::Key, Node)]) -> J {
        let len = self.path.len();
        let properties = schema.get("properties").and_then(J::as_object);
        let additional = schema.get("additionalProperties");
        let closed = properties.is_some() || additional == Some(&J::Bool(false));
        let additional = additional.filter(|a| a.is_object());
        let mut out = serde_json::Map::new();
        for (key, value) in entries {
            // An exported object's `status` is the cluster's, not the author's.
            if len == 0 && key.name == "status" {
                continue;
            }
            match properties.and_then(|p| p.get(&key.name)).or(additional) {
                Some(sub) => {
                    if !self.path.is_empty() {
                        self.path.push('.');
                    }
                    self.path.push_str(&key.name);
                    let j = self.walk(Some(sub), value);
                    self.path.truncate(len);
                    out.insert(key.name.clone(), j);
                }
                None if closed => {
                    let known: Vec<&str> = properties
                        .map(|p| p.keys().map(String::as_str).collect())
                        .unwrap_or_default();
                    self.problem(key.at, yaml::unknown_field(&key.name, &known));
                }
                None => {
                    out.insert(key.name.clone(), value.to_json());
                }
            }
        }
        J::Object(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::api::{NetworkPolicy, PalisadePolicy};

    fn problems<T: JsonSchema + 'static>(text: &str) -> Vec<(String, Position, String)> {
        let node: Node = yaml::from_str(text).unwrap();
        conform::<T>(&node, text)
            .err()
            .unwrap_or_default()
            .into_iter()
            .map(|p| (p.path, p.at, p.message))
            .collect()
    }

    #[test]
    fn unknown_fields_types_and_values_are_found_at_their_paths() {
        let p = problems::<NetworkPolicy>(
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: a, labels: {x: y}}\nspec:\n  podSelecter: {}\n  ingress:\n  - ports: [{port: http, endPort: \"90\"}]\n    from: [{ipBlock: {cidr: [1]}}]\n",
        );
        assert_eq!(
            p,
            [
                (
                    "spec".into(),
                    (5, 3),
                    "unknown field `podSelecter`, expected one of egress, ingress, podSelector, policyTypes; did you mean `podSelector`?".into()
                ),
                (
                    "spec.ingress[0].ports[0].endPort".into(),
                    (7, 35),
                    "expected an integer, found the string \"90\" (write the number without quotes)".into()
                ),
                (
                    "spec.ingress[0].from[0].ipBlock.cidr".into(),
                    (8, 29),
                    "invalid type: found a list, expected a string".into()
                ),
            ]
        );
        let p = problems::<PalisadePolicy>(
            "apiVersion: palisade.dev/v1alpha1\nkind: PalisadePolicy\nmetadata: {name: a}\nspec:\n  selector: {}\n  mode: strict\n  ingress: [{action: allow}]\n",
        );
        assert_eq!(
            p,
            [(
                "spec.mode".into(),
                (6, 9),
                "unsupported value \"strict\": supported values: \"enforce\", \"audit\"".into()
            )]
        );
    }
}
