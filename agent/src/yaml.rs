//! YAML in, located errors out: the one place that calls serde-saphyr, for
//! the agent config, policy files and world files. Limits bound what a
//! hostile file can cost; messages are cleaned of the library's own
//! location suffix and advice, and name a likely typo's intended field.
use serde::de::DeserializeOwned;

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
    let mut budget = serde_saphyr::Budget::default();
    budget.max_depth = 48;
    budget.max_aliases = 1_000;
    budget.max_nodes = 200_000;
    let mut options = serde_saphyr::Options::default();
    options.with_snippet = false;
    options.budget = Some(budget);
    serde_saphyr::from_str_with_options(text, options).map_err(|e| {
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
    let best = known
        .iter()
        .map(|k| (strsim::levenshtein(unknown, k), *k))
        .min();
    match best {
        Some((d, k)) if d <= 2.max(unknown.len() / 4) => format!("{message}; did you mean `{k}`?"),
        _ => message.to_owned(),
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
