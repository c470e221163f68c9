//! YAML in, located errors out: the one place that calls serde-saphyr, for
//! the agent config, policy files and world files. Limits bound what a
//! hostile file can cost; messages are cleaned of the library's own
//! location suffix and advice, and name a likely typo's intended field.
//! [`Node`] is a document as a tree of located values: policy files are
//! checked against their schema on it, and its span map places a problem
//! found at a field path (`spec.ingress[0].ports[1].port`) at a line and column.
use std::collections::HashMap;

use serde::{Deserialize, de::DeserializeOwned};

/// A parse error at a 1-based line and column.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct YamlError {
    pub line: u64,
    pub column: u64,
    pub message: String,
}

/// Parses `text` (one document) with budgets: at most 48 levels deep, 1000
/// aliases and 200 000 nodes after alias expansion.
pub fn from_str<T: DeserializeOwned>(text: &str) -> Result<T, YamlError> {
    serde_saphyr::from_str_with_options(text, options()).map_err(|e| {
        let (line, column) = e
            .location()
            .map_or((1, 1), |l| (l.line().max(1), l.column().max(1)));
        YamlError {
            line,
            column,
            message: clean(&e.to_string()),
        }
    })
}

fn options() -> serde_saphyr::Options {
    let mut budget = serde_saphyr::Budget::default();
    budget.max_depth = 48;
    budget.max_aliases = 1_000;
    budget.max_nodes = 200_000;
    let mut options = serde_saphyr::Options::default();
    options.with_snippet = false;
    options.budget = Some(budget);
    options
}

/// A 1-based line and column in a document.
pub type Position = (u64, u64);

/// A value of a YAML document and where it was written.
#[derive(Clone, Debug, PartialEq)]
pub struct Node {
    pub at: Position,
    /// Byte offset and length of the node in the document, when known.
    pub span: Option<(usize, usize)>,
    pub value: Value,
}

/// What a [`Node`] holds. Quoted scalars are strings, as the API server reads them.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    Null,
    Bool(bool),
    Int(i64),
    UInt(u64),
    Float(f64),
    Str(String),
    Seq(Vec<Node>),
    /// Keys with their own positions, in the order written.
    Map(Vec<(Key, Node)>),
}

/// A mapping key and where it was written.
#[derive(Clone, Debug, PartialEq)]
pub struct Key {
    pub name: String,
    pub at: Position,
}

fn position(l: &serde_saphyr::Location) -> Position {
    (l.line().max(1), l.column().max(1))
}

impl<'de> Deserialize<'de> for Node {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = serde_saphyr::Spanned::<Value>::deserialize(d)?;
        let span = s.referenced.span();
        Ok(Node {
            at: position(&s.referenced),
            span: span
                .byte_offset()
                .zip(span.byte_len())
                .map(|(o, l)| (o as usize, l as usize)),
            value: s.value,
        })
    }
}

impl<'de> Deserialize<'de> for Key {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = serde_saphyr::Spanned::<Value>::deserialize(d)?;
        let name = match s.value {
            Value::Str(s) => s,
            Value::Int(n) => n.to_string(),
            Value::UInt(n) => n.to_string(),
            Value::Bool(b) => b.to_string(),
            Value::Null => "null".to_owned(),
            _ => return Err(serde::de::Error::custom("a mapping key must be a scalar")),
        };
        Ok(Key {
            name,
            at: position(&s.referenced),
        })
    }
}

impl<'de> Deserialize<'de> for Value {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Value;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("any YAML value")
            }
            fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
                Ok(Value::Bool(v))
            }
            fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
                Ok(Value::Int(v))
            }
            fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
                Ok(i64::try_from(v).map_or(Value::UInt(v), Value::Int))
            }
            fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
                Ok(Value::Float(v))
            }
            fn visit_str<E>(self, v: &str) -> Result<Value, E> {
                Ok(Value::Str(v.to_owned()))
            }
            fn visit_string<E>(self, v: String) -> Result<Value, E> {
                Ok(Value::Str(v))
            }
            fn visit_unit<E>(self) -> Result<Value, E> {
                Ok(Value::Null)
            }
            fn visit_none<E>(self) -> Result<Value, E> {
                Ok(Value::Null)
            }
            fn visit_some<D: serde::Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
                Value::deserialize(d)
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut a: A) -> Result<Value, A::Error> {
                let mut items = Vec::new();
                while let Some(n) = a.next_element::<Node>()? {
                    items.push(n);
                }
                Ok(Value::Seq(items))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut a: A) -> Result<Value, A::Error> {
                let mut entries = Vec::new();
                while let Some(k) = a.next_key::<Key>()? {
                    entries.push((k, a.next_value::<Node>()?));
                }
                Ok(Value::Map(entries))
            }
        }
        d.deserialize_any(V)
    }
}

impl Node {
    /// The source text of a plain (unquoted) scalar that YAML read as a
    /// boolean, number or null: `80`, `true`, `y`. Where the schema wants a
    /// string, that text is the string, as the API server's YAML reader
    /// converts a scalar into the type of its target field.
    pub fn plain_text<'t>(&self, text: &'t str) -> Option<&'t str> {
        if matches!(self.value, Value::Str(_) | Value::Seq(_) | Value::Map(_)) {
            return None;
        }
        let (offset, len) = self.span?;
        let t = text.get(offset..offset + len)?.trim();
        (!t.is_empty() && !t.starts_with(['"', '\'', '*', '&', '!'])).then_some(t)
    }

    /// The same document as JSON, each scalar as YAML resolved it.
    pub fn to_json(&self) -> serde_json::Value {
        use serde_json::Value as J;
        match &self.value {
            Value::Null => J::Null,
            Value::Bool(b) => J::Bool(*b),
            Value::Int(n) => J::from(*n),
            Value::UInt(n) => J::from(*n),
            Value::Float(f) => serde_json::Number::from_f64(*f).map_or(J::Null, J::Number),
            Value::Str(s) => J::String(s.clone()),
            Value::Seq(items) => J::Array(items.iter().map(Node::to_json).collect()),
            Value::Map(entries) => J::Object(
                entries
                    .iter()
                    .map(|(k, v)| (k.name.clone(), v.to_json()))
                    .collect(),
            ),
        }
    }

    /// Every value's field path (`spec.ingress[0].from`) and position.
    pub fn spans(&self) -> Spans {
        fn walk(node: &Node, path: &mut String, out: &mut HashMap<String, Position>) {
            out.insert(path.clone(), node.at);
            let len = path.len();
            match &node.value {
                Value::Seq(items) => {
                    for (i, n) in items.iter().enumerate() {
                        path.push_str(&format!("[{i}]"));
                        walk(n, path, out);
                        path.truncate(len);
                    }
                }
                Value::Map(entries) => {
                    for (k, n) in entries {
                        if !path.is_empty() {
                            path.push('.');
                        }
                        path.push_str(&k.name);
                        walk(n, path, out);
                        path.truncate(len);
                    }
                }
                _ => {}
            }
        }
        let mut out = HashMap::new();
        walk(self, &mut String::new(), &mut out);
        Spans(out)
    }
}

/// Field paths to positions: where a problem found at a path was written.
#[derive(Debug, Default)]
pub struct Spans(HashMap<String, Position>);

impl Spans {
    /// The position of `path`, or of its nearest written ancestor (a missing
    /// field is reported where its parent is).
    pub fn locate(&self, path: &str) -> Option<Position> {
        let mut path = path;
        loop {
            if let Some(p) = self.0.get(path) {
                return Some(*p);
            }
            let cut = path.rfind(['.', '['])?;
            path = &path[..cut];
        }
    }
}

fn clean(message: &str) -> String {
    if message.starts_with("budget breached") {
        return explain_budget(message);
    }
    // The library appends its own location; ours goes in front.
    let message = match message.rfind(" at line ") {
        Some(i)
            if message[i + 9..]
                .split(", column ")
                .all(|n| n.parse::<u64>().is_ok()) =>
        {
            &message[..i]
        }
        _ => message,
    };
    // Library advice that does not apply to a file's author.
    let message = message.replace(", set DuplicateKeyPolicy in Options if acceptable", "");
    suggest_field(&message)
}

/// Turns the parser's budget report into what an author can act on.
fn explain_budget(message: &str) -> String {
    let what = if message.contains("Nodes") {
        "it expands to more than 200000 nodes (alias expansion, or a very large document)"
    } else if message.contains("Depth") {
        "it is nested deeper than 48 levels"
    } else if message.contains("Aliases") {
        "it uses more than 1000 aliases"
    } else {
        "it exceeds the parser's safety limits"
    };
    format!("refused: {what}; split the file or remove the aliases")
}

/// "unknown field `x`, expected one of a, b", naming the closest known field
/// when `x` is a likely typo of it.
pub fn unknown_field(unknown: &str, known: &[&str]) -> String {
    let message = format!(
        "unknown field `{unknown}`, expected one of {}",
        known.join(", ")
    );
    match closest(unknown, known) {
        Some(k) => format!("{message}; did you mean `{k}`?"),
        None => message,
    }
}

fn closest<'k>(unknown: &str, known: &[&'k str]) -> Option<&'k str> {
    known
        .iter()
        .map(|k| (strsim::levenshtein(unknown, k), *k))
        .min()
        .filter(|(d, _)| *d <= 2.max(unknown.len() / 4))
        .map(|(_, k)| k)
}

/// For "unknown field `x`, expected one of a, b, …", names the closest known
/// field when it is a likely typo.
fn suggest_field(message: &str) -> String {
    let Some(rest) = message.strip_prefix("unknown field `") else {
        return message.to_owned();
    };
    let Some((unknown, rest)) = rest.split_once('`') else {
        return message.to_owned();
    };
    let known: Vec<&str> = rest
        .split(['`', ',', ' '])
        .filter(|w| !w.is_empty() && !matches!(*w, "expected" | "one" | "of" | "or"))
        .collect();
    match closest(unknown, &known) {
        Some(k) => format!("{message}; did you mean `{k}`?"),
        None => message.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_cleaned_and_typos_get_a_suggestion() {
        assert_eq!(
            clean(
                "unknown field `namspaces`, expected one of `namespaces`, `pods` at line 3, column 1"
            ),
            "unknown field `namspaces`, expected one of `namespaces`, `pods`; did you mean `namespaces`?"
        );
        assert_eq!(
            clean("unknown field `zzz`, expected `a` or `b`"),
            "unknown field `zzz`, expected `a` or `b`"
        );
        assert!(
            clean("budget breached: Depth { depth: 49 } at line 1, column 1 (used at line 2)")
                .starts_with("refused: it is nested deeper")
        );
    }
}
