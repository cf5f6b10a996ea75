//! Calico label selectors (`nodeSelector`, `peerSelector`): parse once, match many times.
//!
//! Grammar (Calico's): `all()`, `has(k)`, `k == 'v'`, `k != 'v'`, `k in {'a', 'b'}`, `k not in {...}`,
//! `k contains 'v'`, `k starts with 'v'`, `k ends with 'v'`, `!expr`, `expr && expr`, `expr || expr`,
//! parentheses. Strings take single or double quotes. An empty selector selects everything, as in Calico's
//! IPPool.nodeSelector.

use std::collections::BTreeMap;
use std::fmt;

/// A parsed selector. `Display` prints a normalised form.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selector {
    All,
    Has(String),
    Eq(String, String),
    Ne(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Contains(String, String),
    StartsWith(String, String),
    EndsWith(String, String),
    Not(Box<Selector>),
    And(Box<Selector>, Box<Selector>),
    Or(Box<Selector>, Box<Selector>),
}

/// Why a selector did not parse: the selector text, the byte offset and what was expected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("bad selector {text:?} at offset {offset}: {reason}")]
pub struct SelectorError {
    pub text: String,
    pub offset: usize,
    pub reason: String,
}

impl Selector {
    /// Parse Calico selector syntax. The empty string (or only whitespace) is `all()`.
    pub fn parse(text: &str) -> Result<Selector, SelectorError> {
        let mut p = Parser { text, pos: 0 };
        p.skip_ws();
        if p.at_end() {
            return Ok(Selector::All);
        }
        let sel = p.parse_or()?;
        p.skip_ws();
        if !p.at_end() {
            return Err(p.error("unexpected text after the end of the expression"));
        }
        Ok(sel)
    }

    /// Does a set of labels satisfy this selector?
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        match self {
            Selector::All => true,
            Selector::Has(k) => labels.contains_key(k),
            Selector::Eq(k, v) => labels.get(k) == Some(v),
            // Calico: `k != 'v'` is true when the label is absent.
            Selector::Ne(k, v) => labels.get(k) != Some(v),
            Selector::In(k, vs) => labels.get(k).is_some_and(|l| vs.contains(l)),
            Selector::NotIn(k, vs) => labels.get(k).is_none_or(|l| !vs.contains(l)),
            Selector::Contains(k, v) => labels.get(k).is_some_and(|l| l.contains(v.as_str())),
            Selector::StartsWith(k, v) => labels.get(k).is_some_and(|l| l.starts_with(v.as_str())),
            Selector::EndsWith(k, v) => labels.get(k).is_some_and(|l| l.ends_with(v.as_str())),
            Selector::Not(s) => !s.matches(labels),
            Selector::And(a, b) => a.matches(labels) && b.matches(labels),
            Selector::Or(a, b) => a.matches(labels) || b.matches(labels),
        }
    }
}

fn quote_list(vs: &[String]) -> String {
    vs.iter()
        .map(|v| format!("'{v}'"))
        .collect::<Vec<_>>()
        .join(", ")
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Selector::All => write!(f, "all()"),
            Selector::Has(k) => write!(f, "has({k})"),
            Selector::Eq(k, v) => write!(f, "{k} == '{v}'"),
            Selector::Ne(k, v) => write!(f, "{k} != '{v}'"),
            Selector::In(k, vs) => write!(f, "{k} in {{{}}}", quote_list(vs)),
            Selector::NotIn(k, vs) => write!(f, "{k} not in {{{}}}", quote_list(vs)),
            Selector::Contains(k, v) => write!(f, "{k} contains '{v}'"),
            Selector::StartsWith(k, v) => write!(f, "{k} starts with '{v}'"),
            Selector::EndsWith(k, v) => write!(f, "{k} ends with '{v}'"),
            Selector::Not(s) => write!(f, "!({s})"),
            Selector::And(a, b) => write!(f, "({a} && {b})"),
            Selector::Or(a, b) => write!(f, "({a} || {b})"),
        }
    }
}

struct Parser<'a> {
    text: &'a str,
    pos: usize,
}

impl Parser<'_> {
    fn error(&self, reason: &str) -> SelectorError {
        SelectorError {
            text: self.text.to_string(),
            offset: self.pos,
            reason: reason.to_string(),
        }
    }
    fn rest(&self) -> &str {
        &self.text[self.pos..]
    }
    fn at_end(&self) -> bool {
        self.pos >= self.text.len()
    }
    fn skip_ws(&mut self) {
        let trimmed = self.rest().trim_start();
        self.pos = self.text.len() - trimmed.len();
    }
    /// Consume `tok` (after whitespace) if it is next.
    fn eat(&mut self, tok: &str) -> bool {
        self.skip_ws();
        if self.rest().starts_with(tok) {
            self.pos += tok.len();
            true
        } else {
            false
        }
    }
    /// Consume a keyword only when it is not the prefix of a longer identifier.
    fn eat_word(&mut self, word: &str) -> bool {
        self.skip_ws();
        let rest = self.rest();
        if rest.starts_with(word) && !rest[word.len()..].chars().next().is_some_and(is_ident_char) {
            self.pos += word.len();
            true
        } else {
            false
        }
    }
    fn expect(&mut self, tok: &str) -> Result<(), SelectorError> {
        if self.eat(tok) {
            Ok(())
        } else {
            Err(self.error(&format!("expected {tok:?}")))
        }
    }

    fn parse_or(&mut self) -> Result<Selector, SelectorError> {
        let mut left = self.parse_and()?;
        while self.eat("||") {
            let right = self.parse_and()?;
            left = Selector::Or(Box::new(left), Box::new(right));
        }
        Ok(left)
    }

    fn parse_and(&mut self) -> Result<Selector, SelectorError> {
        let mut left = self.parse_unary()?;
        while self.eat("&&") {
            let right = self.parse_unary()?;
            left = Selector::And(Box::new(left), Box::new(right));
        }
        Ok(left)
    }

    fn parse_unary(&mut self) -> Result<Selector, SelectorError> {
        self.skip_ws();
        // `!=` never starts an expression, so a leading `!` is always negation.
        if self.eat("!") {
            return Ok(Selector::Not(Box::new(self.parse_unary()?)));
        }
        if self.eat("(") {
            let inner = self.parse_or()?;
            self.expect(")")?;
            return Ok(inner);
        }
        if self.eat_word("all") {
            self.expect("(")?;
            self.expect(")")?;
            return Ok(Selector::All);
        }
        if self.eat_word("has") {
            self.expect("(")?;
            let key = self.parse_key()?;
            self.expect(")")?;
            return Ok(Selector::Has(key));
        }
        let key = self.parse_key()?;
        if self.eat("==") {
            return Ok(Selector::Eq(key, self.parse_string()?));
        }
        if self.eat("!=") {
            return Ok(Selector::Ne(key, self.parse_string()?));
        }
        if self.eat_word("in") {
            return Ok(Selector::In(key, self.parse_set()?));
        }
        if self.eat_word("not") {
            if self.eat_word("in") {
                return Ok(Selector::NotIn(key, self.parse_set()?));
            }
            return Err(self.error("expected `in` after `not`"));
        }
        if self.eat_word("contains") {
            return Ok(Selector::Contains(key, self.parse_string()?));
        }
        if self.eat_word("starts") {
            if !self.eat_word("with") {
                return Err(self.error("expected `with` after `starts`"));
            }
            return Ok(Selector::StartsWith(key, self.parse_string()?));
        }
        if self.eat_word("ends") {
            if !self.eat_word("with") {
                return Err(self.error("expected `with` after `ends`"));
            }
            return Ok(Selector::EndsWith(key, self.parse_string()?));
        }
        Err(self
            .error("expected an operator (==, !=, in, not in, contains, starts with, ends with)"))
    }

    fn parse_key(&mut self) -> Result<String, SelectorError> {
        self.skip_ws();
        let len = self
            .rest()
            .find(|c: char| !is_ident_char(c))
            .unwrap_or(self.rest().len());
        if len == 0 {
            return Err(self.error("expected a label key"));
        }
        let key = self.rest()[..len].to_string();
        self.pos += len;
        Ok(key)
    }

    fn parse_string(&mut self) -> Result<String, SelectorError> {
        self.skip_ws();
        let quote = match self.rest().chars().next() {
            Some(q @ ('\'' | '"')) => q,
            _ => return Err(self.error("expected a quoted string")),
        };
        let body = &self.rest()[1..];
        let end = body
            .find(quote)
            .ok_or_else(|| self.error("unterminated string"))?;
        let s = body[..end].to_string();
        self.pos += end + 2;
        Ok(s)
    }

    fn parse_set(&mut self) -> Result<Vec<String>, SelectorError> {
        self.expect("{")?;
        let mut out = Vec::new();
        if self.eat("}") {
            return Ok(out);
        }
        loop {
            out.push(self.parse_string()?);
            if self.eat("}") {
                return Ok(out);
            }
            self.expect(",")?;
        }
    }
}

/// Characters of a label key: Kubernetes label keys may hold a DNS prefix and a slash.
fn is_ident_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | '/')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn empty_and_all_select_everything() {
        assert_eq!(Selector::parse("").unwrap(), Selector::All);
        assert_eq!(Selector::parse("  all( ) ").unwrap(), Selector::All);
        assert!(Selector::All.matches(&labels(&[])));
    }

    #[test]
    fn operators_match_like_calico() {
        let l = labels(&[
            ("rack", "r1"),
            ("kubernetes.io/hostname", "node-a"),
            ("zone", "eu-west-1a"),
        ]);
        let cases = [
            ("has(rack)", true),
            ("!has(rack)", false),
            ("rack == 'r1'", true),
            ("rack == \"r2\"", false),
            ("rack != 'r2'", true),
            ("missing != 'x'", true),
            ("rack in {'r1', 'r2'}", true),
            ("rack not in {'r1'}", false),
            ("missing not in {'r1'}", true),
            ("zone contains 'west'", true),
            ("zone starts with 'eu-'", true),
            ("zone ends with '1b'", false),
            ("kubernetes.io/hostname == 'node-a'", true),
            ("rack == 'r1' && zone == 'x'", false),
            ("rack == 'r1' || zone == 'x'", true),
            ("!(rack == 'r1' && has(zone))", false),
            ("has(a) || has(b) && has(rack)", false),
            ("all() && rack == 'r1'", true),
        ];
        for (text, want) in cases {
            let sel = Selector::parse(text).unwrap_or_else(|e| panic!("{text}: {e}"));
            assert_eq!(sel.matches(&l), want, "{text} (parsed as {sel})");
        }
    }

    #[test]
    fn and_binds_tighter_than_or() {
        let sel = Selector::parse("has(a) || has(b) && has(c)").unwrap();
        assert!(sel.matches(&labels(&[("a", "")])));
        assert!(!sel.matches(&labels(&[("b", "")])));
    }

    #[test]
    fn display_round_trips() {
        for text in [
            "rack in {'a', 'b'} && !has(x)",
            "a == 'b' || c starts with 'd'",
            "k not in {}",
        ] {
            let sel = Selector::parse(text).unwrap();
            assert_eq!(Selector::parse(&sel.to_string()).unwrap(), sel);
        }
    }

    #[test]
    fn errors_name_the_offset() {
        for bad in [
            "rack ==",
            "rack = 'x'",
            "has(rack",
            "rack == 'x",
            "rack in {'a' 'b'}",
            "&& x",
            "a == 'b' )",
        ] {
            let err = Selector::parse(bad).expect_err(bad);
            assert_eq!(err.text, bad);
            assert!(err.offset <= bad.len(), "{bad}: {err}");
        }
    }
}
