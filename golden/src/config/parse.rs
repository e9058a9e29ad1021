//! TOML to `EngineConfig`, with one-line errors: origin, line, field path, problem, fix.
//!
//! toml's errors carry a byte span but no field path, so on an error the text is parsed a
//! second time into a tree of spans (keys and values) and the path is the deepest key whose
//! key or value covers the error's span.

use std::ops::Range;

use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::Value;
use toml::Spanned;

use super::{ConfigError, EngineConfig};

pub(super) fn from_toml(text: &str, origin: &str) -> Result<EngineConfig, ConfigError> {
    toml::from_str::<EngineConfig>(text).map_err(|e| translate(text, origin, &e))
}

/// A TOML value's span and, for tables and arrays, its children (key, key span, value).
struct Node {
    span: Range<usize>,
    kids: Vec<(String, Option<Range<usize>>, Node)>,
}

struct Kids(Vec<(String, Option<Range<usize>>, Node)>);

impl<'de> Deserialize<'de> for Node {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = Spanned::<Kids>::deserialize(d)?;
        let span = s.span();
        Ok(Node {
            span,
            kids: s.into_inner().0,
        })
    }
}

impl<'de> Deserialize<'de> for Kids {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(KidsVisitor)
    }
}

struct KidsVisitor;

impl<'de> Visitor<'de> for KidsVisitor {
    type Value = Kids;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("any TOML value")
    }
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Kids, E> {
        Ok(Kids(Vec::new()))
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<Kids, E> {
        Ok(Kids(Vec::new()))
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<Kids, E> {
        Ok(Kids(Vec::new()))
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Kids, E> {
        Ok(Kids(Vec::new()))
    }
    fn visit_str<E: de::Error>(self, _: &str) -> Result<Kids, E> {
        Ok(Kids(Vec::new()))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<Kids, A::Error> {
        let mut v = Vec::new();
        while let Some(k) = m.next_key::<Spanned<String>>()? {
            let span = k.span();
            let node: Node = m.next_value()?;
            v.push((k.into_inner(), Some(span), node));
        }
        Ok(Kids(v))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut s: A) -> Result<Kids, A::Error> {
        let mut v = Vec::new();
        while let Some(node) = s.next_element::<Node>()? {
            v.push((v.len().to_string(), None, node));
        }
        Ok(Kids(v))
    }
}

fn covers(outer: &Range<usize>, inner: &Range<usize>) -> bool {
    outer.start <= inner.start && inner.end <= outer.end
}

/// The dotted path of the deepest key whose key span or value span covers `span`.
fn find_path(node: &Node, span: &Range<usize>, path: &mut Vec<String>) -> bool {
    for (key, key_span, child) in &node.kids {
        let on_key = key_span.as_ref().is_some_and(|ks| covers(ks, span));
        if on_key || covers(&child.span, span) {
            path.push(key.clone());
            if !on_key {
                find_path(child, span, path);
            }
            return true;
        }
    }
    false
}

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before
        .rfind('\n')
        .map_or(before.len(), |nl| before.len() - nl - 1)
        + 1;
    (line, col)
}

/// Splits serde's "`a`, `b`" / "`a` or `b`" lists into names.
fn backticked(s: &str) -> Vec<String> {
    s.split('`')
        .skip(1)
        .step_by(2)
        .map(str::to_string)
        .collect()
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != *cb);
            cur.push(sub.min(prev[j + 1] + 1).min(cur[j] + 1));
        }
        prev = cur;
    }
    prev[b.len()]
}

/// Looks a dotted path up in the default config's JSON (array indices as numbers).
fn default_at(path: &[String]) -> Option<Value> {
    let mut v = serde_json::to_value(EngineConfig::default()).ok()?;
    for key in path {
        v = match v {
            Value::Object(mut m) => m.remove(key)?,
            Value::Array(mut a) => {
                let i: usize = key.parse().ok()?;
                if i < a.len() {
                    a.swap_remove(i)
                } else {
                    a.into_iter().next()?
                }
            }
            _ => return None,
        };
    }
    Some(v)
}

/// What a value of the default's shape is called, and how to fix a wrong one.
fn expected_and_fix(path: &[String]) -> (String, String) {
    match default_at(path) {
        Some(Value::Number(n)) => (
            "an integer".into(),
            format!("set it to a whole number such as {n}"),
        ),
        Some(Value::Bool(b)) => (
            "a boolean".into(),
            format!("set it to true or false, e.g. {b}"),
        ),
        Some(Value::String(s)) => (
            "a string".into(),
            format!("set it to a quoted string such as {s:?}"),
        ),
        Some(Value::Array(a)) => {
            let example = Value::Array(a).to_string().replace(',', ", ");
            (
                "an array".into(),
                format!("set it to an array such as {example}"),
            )
        }
        Some(Value::Object(_)) => (
            "a table".into(),
            format!(
                "write it as a section: [{}] with its fields below",
                path.join(".")
            ),
        ),
        _ => (
            "another type".into(),
            "see configs/tiny.toml for the schema".into(),
        ),
    }
}

/// Rewrites serde's "string \"four\"" / "integer `5`" into TOML words.
fn describe_found(unexp: &str) -> String {
    let unexp = unexp.trim();
    let kinds = [
        ("string ", "a string"),
        ("integer ", "an integer"),
        ("floating point ", "a float"),
        ("boolean ", "a boolean"),
    ];
    for (prefix, word) in kinds {
        if let Some(rest) = unexp.strip_prefix(prefix) {
            return format!("{word} ({})", rest.trim_matches('`'));
        }
    }
    match unexp {
        "map" => "a table".into(),
        "sequence" => "an array".into(),
        other => other.into(),
    }
}

fn translate(text: &str, origin: &str, e: &toml::de::Error) -> ConfigError {
    let msg = e.message().trim().replace('\n', " ");
    let span = e.span().unwrap_or(0..0);
    let (line, column) = line_col(text, span.start);
    let mut path = Vec::new();
    let tree = toml::from_str::<Node>(text).ok();
    if let Some(tree) = &tree {
        find_path(tree, &span, &mut path);
    }
    if tree.is_none() || (path.is_empty() && !msg.starts_with("unknown field")) {
        return ConfigError::Syntax {
            origin: origin.into(),
            line,
            column,
            message: msg,
        };
    }

    let field = |path: &[String]| {
        if path.is_empty() {
            "(top level)".to_string()
        } else {
            path.join(".")
        }
    };
    let (problem, fix) = if let Some(rest) = msg.strip_prefix("unknown field `") {
        let (name, tail) = rest.split_once('`').unwrap_or((rest, ""));
        let known = backticked(tail);
        let section = &path[..path.len().saturating_sub(1)];
        let where_ = if section.is_empty() {
            "the top level".to_string()
        } else {
            format!("[{}]", section.join("."))
        };
        let mut fix = if known.is_empty() {
            format!("remove it; {where_} has no fields")
        } else {
            format!("remove it; {where_} has {}", known.join(", "))
        };
        if let Some(best) = known.iter().min_by_key(|k| edit_distance(name, k)) {
            if edit_distance(name, best) <= 2 {
                fix = format!("did you mean {best}? {fix}");
            }
        }
        (format!("unknown field {name:?}"), fix)
    } else if let Some(rest) = msg.strip_prefix("invalid type: ") {
        let found = rest.rsplit_once(", expected").map_or(rest, |(f, _)| f);
        let (expected, fix) = expected_and_fix(&path);
        (
            format!("expected {expected}, found {}", describe_found(found)),
            fix,
        )
    } else if let Some(rest) = msg.strip_prefix("invalid value: ") {
        let found = rest.rsplit_once(", expected").map_or(rest, |(f, _)| f);
        let (_, fix) = expected_and_fix(&path);
        (
            format!(
                "{} is out of range for an unsigned 32-bit integer",
                describe_found(found)
            ),
            fix,
        )
    } else {
        (
            msg.clone(),
            "see configs/tiny.toml for the schema".to_string(),
        )
    };
    ConfigError::Field {
        origin: origin.into(),
        line,
        path: field(&path),
        problem,
        fix,
    }
}
