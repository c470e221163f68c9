//! Text from the outside world (cgroup names, labels, command names, policy
//! names) on its way to a terminal or a log: control characters — terminal
//! escape sequences among them — are written as `\u{..}`, so a crafted name
//! cannot rewrite what an operator sees.
use std::borrow::Cow;

/// `s` with every control character escaped; unchanged (borrowed) when it
/// has none.
pub fn escape(s: &str) -> Cow<'_, str> {
    if !s.chars().any(char::is_control) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if c.is_control() {
            out.push_str(&format!("\\u{{{:x}}}", u32::from(c)));
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn terminal_escapes_are_written_out() {
        assert_eq!(escape("prod/web"), "prod/web");
        assert_eq!(
            escape("evil\u{1b}[2J\u{1b}]0;owned\u{7}\r\nname"),
            "evil\\u{1b}[2J\\u{1b}]0;owned\\u{7}\\u{d}\\u{a}name"
        );
        assert_eq!(escape("caf\u{e9}"), "caf\u{e9}", "printable Unicode stays");
        assert_eq!(escape("x\u{9b}y"), "x\\u{9b}y", "C1 CSI too");
    }
}
