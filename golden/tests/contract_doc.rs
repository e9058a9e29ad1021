//! docs/numerics.md and the tests stay in step: every rule names a test, every named test exists.
#![allow(clippy::unwrap_used)]

const DOC: &str = include_str!("../../docs/numerics.md");
const TEST_SOURCES: [&str; 2] = [
    include_str!("contract_weights.rs"),
    include_str!("contract_kv.rs"),
];

/// Backticked test names of the doc: `` `n<digits>[b]_<snake>` ``.
fn named_tests(text: &str) -> Vec<String> {
    let mut names = Vec::new();
    for chunk in text.split('`').skip(1).step_by(2) {
        let rest = chunk.strip_prefix('n').unwrap_or("");
        let digits = rest.chars().take_while(char::is_ascii_digit).count();
        let after = rest[digits..].strip_prefix('b').unwrap_or(&rest[digits..]);
        if digits > 0
            && after.starts_with('_')
            && chunk
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        {
            names.push(chunk.to_string());
        }
    }
    names
}

/// The text of rule `id` (from its `**id - ` heading to the next rule or section).
fn rule_text(id: &str) -> &'static str {
    let start = DOC
        .find(&format!("**{id} - "))
        .unwrap_or_else(|| panic!("rule {id} missing"));
    let body = &DOC[start + 2..];
    let end = [body.find("\n**N"), body.find("\n## ")]
        .into_iter()
        .flatten()
        .min()
        .unwrap_or(body.len());
    &body[..end]
}

#[test]
fn contract_every_rule_names_an_existing_test() {
    let names = named_tests(DOC);
    assert!(names.len() >= 22, "found only {names:?}");
    for name in &names {
        let def = format!("fn {name}(");
        assert!(
            TEST_SOURCES.iter().any(|s| s.contains(&def)),
            "docs/numerics.md names `{name}`, no test defines it"
        );
    }
    let mut ids: Vec<String> = (1..=22).map(|i| format!("N{i}")).collect();
    ids.push("N11b".to_string());
    for id in &ids {
        let text = rule_text(id);
        let prefix = format!("{}_", id.to_lowercase());
        let own = named_tests(text);
        assert!(
            text.contains("Test:") && own.iter().any(|n| n.starts_with(&prefix)),
            "rule {id} names no test of its own: {own:?}"
        );
    }
}
