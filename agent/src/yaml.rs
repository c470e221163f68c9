//! YAML in, located errors out: the one place that calls serde-saphyr, for
//! the agent config, policy files and world files. Limits bound what a
//! hostile file can cost; messages are cleaned of the library's own
//! location suffix and advice, and name a likely typo's intended field.
//! [`Node`] is a document as a tree of located values: policy files are
//! checked against their schema on it, and [`Node::locate`] places a problem
//! found at a field path (`spec.ingress[0].ports[1].port`) at a line and column.
use serde::{Deserialize, de::DeserializeOwned};

/// A parse error at a 1-based line and column.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct YamlError {
    pub line: u64,
    pub column: u64,
    pub message: String,
}

/// How deep a document may nest.
const MAX_DEPTH: usize = 48;
/// How many nodes a document may hold after alias expansion.
const MAX_NODES: usize = 200_000;

/// Parses `text` (one document) with budgets: at most `MAX_DEPTH` levels
/// deep, 1000 aliases and `MAX_NODES` nodes after alias expansion.
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
    budget.max_depth = MAX_DEPTH;
    budget.max_aliases = 1_000;
    budget.max_nodes = MAX_NODES;
    let mut options = serde_saphyr::Options::default();
    options.with_snippet = false;
    options.budget = Some(budget);
    options
}

/// A document as a located tree. The common document (no anchors, aliases,
/// tags, merge keys or scalars YAML could read several ways) is built
/// straight from the parser's events; anything else, and any error, goes
/// through the full deserializer ([`from_str`]), whose budgets and messages
/// then apply unchanged: first without building anything, so a document
/// that breaks a budget (an alias bomb) costs the parse alone.
pub fn tree(text: &str) -> Result<Node, YamlError> {
    if let Some(node) = fast_tree(text) {
        return Ok(node);
    }
    from_str::<serde::de::IgnoredAny>(text)?;
    from_str(text)
}

/// Builds the tree from parser events; `None` whenever the full
/// deserializer must decide (see [`tree`]).
fn fast_tree(text: &str) -> Option<Node> {
    use serde_saphyr::granit_parser::{Event, Parser, ScalarStyle};
    enum Open {
        Seq(Node),
        Map(Node, Option<Key>),
    }
    let mut stack: Vec<Open> = Vec::new();
    let mut root = None;
    let mut nodes = 0usize;
    for item in Parser::new_from_str(text) {
        let (event, span) = item.ok()?;
        let at = (span.start.line() as u64, span.start.col() as u64 + 1);
        let bytes = span
            .start
            .byte_offset()
            .zip(span.end.byte_offset())
            .map(|(a, b)| (a, b.saturating_sub(a)));
        let node = match event {
            Event::StreamStart | Event::StreamEnd | Event::DocumentEnd | Event::Comment(..) => {
                continue;
            }
            Event::DocumentStart(..) if root.is_none() && stack.is_empty() => continue,
            Event::Scalar(value, style, anchor, tag) => {
                if anchor != 0 || tag.is_some() {
                    return None;
                }
                let value = match style {
                    ScalarStyle::Plain => plain_scalar(&value)?,
                    _ => Value::Str(value.into_owned()),
                };
                Node {
                    at,
                    span: bytes,
                    value,
                }
            }
            Event::SequenceStart(_, 0, None) | Event::MappingStart(_, 0, None) => {
                nodes += 1;
                if stack.len() >= MAX_DEPTH || nodes > MAX_NODES {
                    return None;
                }
                let seq = matches!(event, Event::SequenceStart(..));
                let node = Node {
                    at,
                    span: bytes,
                    value: if seq {
                        Value::Seq(Vec::new())
                    } else {
                        Value::Map(Vec::new())
                    },
                };
                stack.push(if seq {
                    Open::Seq(node)
                } else {
                    Open::Map(node, None)
                });
                continue;
            }
            Event::SequenceEnd | Event::MappingEnd => match stack.pop()? {
                Open::Seq(n) | Open::Map(n, None) => n,
                Open::Map(_, Some(_)) => return None,
            },
            _ => return None,
        };
        nodes += 1;
        if nodes > MAX_NODES {
            return None;
        }
        match stack.last_mut() {
            None if root.is_none() => root = Some(node),
            None => return None,
            Some(Open::Seq(seq)) => {
                let Value::Seq(items) = &mut seq.value else {
                    return None;
                };
                items.push(node);
            }
            Some(Open::Map(map, key)) => match key.take() {
                None => {
                    let Value::Str(name) = node.value else {
                        return None;
                    };
                    let Value::Map(entries) = &map.value else {
                        return None;
                    };
                    // Merge keys and duplicates: the deserializer's rules and messages.
                    if name == "<<" || entries.iter().any(|(k, _)| k.name == name) {
                        return None;
                    }
                    *key = Some(Key { name, at: node.at });
                }
                Some(k) => {
                    let Value::Map(entries) = &mut map.value else {
                        return None;
                    };
                    entries.push((k, node));
                }
            },
        }
    }
    if !stack.is_empty() {
        return None;
    }
    root
}

/// A plain scalar as YAML 1.1 resolves it, when that is unambiguous: null,
/// `true`/`false`, a decimal integer, or text that cannot be read as
/// anything else. `None` (the full deserializer decides) for the rest:
/// `yes`, `on`, `0x1f`, `1_000`, `1e3`, `.5`, …
fn plain_scalar(text: &str) -> Option<Value> {
    match text {
        "" | "~" | "null" | "Null" | "NULL" => return Some(Value::Null),
        "true" | "True" | "TRUE" => return Some(Value::Bool(true)),
        "false" | "False" | "FALSE" => return Some(Value::Bool(false)),
        _ => {}
    }
    let digits = text.strip_prefix('-').unwrap_or(text);
    if !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) {
        if digits.len() > 1 && digits.starts_with('0') {
            return None;
        }
        return match text.parse::<i64>() {
            Ok(n) => Some(Value::Int(n)),
            Err(_) => None,
        };
    }
    let first = text.as_bytes()[0];
    let short = matches!(
        text.to_ascii_lowercase().as_str(),
        "y" | "n" | "yes" | "no" | "on" | "off" | "inf" | "infinity" | "nan"
    );
    // Text that starts like a number is text only when no number has its
    // shape: an address or CIDR (`10.0.0.0/8`), a duration (`200ms`).
    let numeric_start = first.is_ascii_digit() || matches!(first, b'+' | b'-' | b'.');
    let not_a_number = text.contains(['/', ' '])
        || text.matches('.').count() >= 2
        || text
            .bytes()
            .any(|b| !(b.is_ascii_digit() || b"+-._:eExXoObBaAcCdDfFiInNtT".contains(&b)));
    if short || (numeric_start && !not_a_number) {
        return None;
    }
    Some(Value::Str(text.to_owned()))
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

    /// Where the value at `path` (`spec.ingress[0].from`) was written, or
    /// its nearest written ancestor (a missing field is reported where its
    /// parent is). Found by walking the tree: only a problem pays for it.
    pub fn locate(&self, path: &str) -> Position {
        let mut node = self;
        let mut rest = path;
        while !rest.is_empty() {
            let next = if let Some(r) = rest.strip_prefix('[') {
                let Some((index, after)) = r.split_once(']') else {
                    break;
                };
                let Value::Seq(items) = &node.value else {
                    break;
                };
                let Some(item) = index.parse::<usize>().ok().and_then(|i| items.get(i)) else {
                    break;
                };
                rest = after;
                item
            } else {
                let r = rest.strip_prefix('.').unwrap_or(rest);
                let end = r.find(['.', '[']).unwrap_or(r.len());
                let Value::Map(entries) = &node.value else {
                    break;
                };
                let Some((_, value)) = entries.iter().find(|(k, _)| k.name == r[..end]) else {
                    break;
                };
                rest = &r[end..];
                value
            };
            node = next;
        }
        node.at
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

    /// The tree built from parser events is the tree the full deserializer
    /// builds (values, positions, spans), document by document over every
    /// policy and config file in the repository and a set of tricky ones;
    /// the ones it cannot build alone it leaves to the deserializer.
    #[test]
    fn the_fast_tree_is_the_deserializers_tree() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let mut docs: Vec<String> = Vec::new();
        for dir in [
            "policies/kubernetes",
            "policies/palisade",
            "policies/examples",
            "deploy/host",
        ] {
            for entry in std::fs::read_dir(root.join(dir)).unwrap() {
                let path = entry.unwrap().path();
                if path.extension().is_some_and(|e| e == "yaml") {
                    let text = std::fs::read_to_string(path).unwrap();
                    docs.extend(text.split("\n---").map(str::to_owned));
                }
            }
        }
        let from_files = docs.len();
        let tricky = [
            "a: [10.0.0.0/8, 10.0.0.1, 200ms, 1.5, 1:30, -1.5e3, fd00::/64]\n",
            "a: [inf, NaN, Infinity, .inf, on, Off]\n",
            "a: {b: [1, -2, 0, \"3\", '4', x y, ~, null, true, False]}\n",
            "metadata: {name: \"123\", namespace: y}\nports: [{port: 80, endPort: \"90\"}]\n",
            "a: yes\n",
            "a: 0x1f\n",
            "a: 1_000\n",
            "a: 007\n",
            "a: &x 1\nb: *x\n",
            "a: !!str 80\n",
            "a: 1\na: 2\n",
            "<<: {a: 1}\n",
            "80: x\n",
            "a: |\n  text\n  more\n",
            "- a\n- [b, {c: d}]\n",
            "a: [\n",
            "a:\n\t- b\n",
            "",
        ];
        docs.extend(tricky.iter().map(|t| (*t).to_owned()));
        for (i, doc) in docs.iter().enumerate() {
            let full: Result<Node, _> = from_str(doc);
            match fast_tree(doc) {
                Some(node) => assert_eq!(Ok(&node), full.as_ref(), "{doc:?}"),
                // Every document of the repository's own files is built alone.
                None if i < from_files => panic!("not built from events: {doc:?}"),
                None => assert_eq!(tree(doc), full, "{doc:?}"),
            }
        }
    }
}
