//! Examples in the approval policy, checked whenever it loads (`airlock-server` at start and on
//! reload, `airlockctl policy validate`, `airlockctl policy test`):
//!
//! ```toml
//! [[rule]]
//! name = "terraform-apply"
//! hosts = { env = "prod" }
//! exec = ["/usr/local/bin/terraform"]
//! args = ["apply *"]
//! decision = "ask"
//! groups = ["oncall"]
//! [[rule.example]]
//! exec = "/usr/local/bin/terraform apply -auto-approve"
//! labels = { env = "prod" }
//! expect = "ask"
//! route = "terraform-apply"      # optional: the approval rule that routes it
//! [[rule.example]]
//! exec = "/usr/local/bin/terraform apply"
//! labels = { env = "staging" }
//! expect = "allow"               # staging hosts do not get the rule
//! ```
//!
//! An example states what an agent with `labels` and no rules of its own decides under this
//! policy's rules, tested as `airlockctl policy test` tests it ([`crate::tester`]). A failing
//! example refuses the file with its line and column, like any other error in it.

use std::{collections::BTreeMap, path::Path};

use agent_rules::{
    config::line_col,
    explain::{decision_word, Query, Transport},
    policy::Decision,
};
use serde::Deserialize;
use toml::Spanned;

use crate::policy::{Policy, PolicyError};

/// One `[[rule.example]]` of the approval policy.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PolicyExample {
    /// A command line: the program (absolute path or a name) and its arguments.
    pub exec: Option<String>,
    /// A destination, `ADDRESS:PORT` (IPv6 in brackets).
    pub connect: Option<String>,
    /// For `connect`: tcp (the default) or udp.
    pub protocol: Option<Transport>,
    /// The watched account that acts; none: an account no rule lists.
    pub account: Option<String>,
    /// The agent's labels (which of the policy's rules it gets, and the route).
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Test the program as a file the account could have made.
    #[serde(default)]
    pub self_made: bool,
    /// What the agent decides: allow, deny or ask.
    pub expect: Decision,
    /// For ask: the approval rule expected to route it.
    pub route: Option<String>,
}

/// Where each example's action is written. The policy's rules are read through a flattened
/// field, which loses positions, so they are read again here, only for positions.
#[derive(Debug, Default, Deserialize)]
struct Spans {
    #[serde(default)]
    rule: Vec<RuleSpans>,
}

#[derive(Debug, Default, Deserialize)]
struct RuleSpans {
    #[serde(default)]
    example: Vec<ExampleSpans>,
}

#[derive(Debug, Default, Deserialize)]
struct ExampleSpans {
    exec: Option<Spanned<toml::Value>>,
    connect: Option<Spanned<toml::Value>>,
    expect: Option<Spanned<toml::Value>>,
}

/// Checks every example of `policy` (parsed from `text`, named `path`).
pub fn check(policy: &Policy, text: &str, path: &str) -> Result<(), PolicyError> {
    if policy.rules.iter().all(|r| r.examples.is_empty()) {
        return Ok(());
    }
    let spans: Spans = toml::from_str(text).unwrap_or_default();
    for (i, rule) in policy.rules.iter().enumerate() {
        for (j, example) in rule.examples.iter().enumerate() {
            let at = spans
                .rule
                .get(i)
                .and_then(|r| r.example.get(j))
                .and_then(|e| {
                    e.exec
                        .as_ref()
                        .or(e.connect.as_ref())
                        .or(e.expect.as_ref())
                        .map(|v| v.span().start)
                });
            let (line, column) = at.map_or((1, 1), |pos| line_col(text, pos));
            let fail = |message: String| PolicyError::Example {
                path: path.to_owned(),
                line,
                column,
                message: format!("example of rule {:?}: {message}", rule.name),
            };
            let query = match (&example.exec, &example.connect) {
                (Some(line), None) if example.protocol.is_none() => Query::Exec {
                    line: line.clone(),
                    self_made: example.self_made,
                },
                (Some(_), None) => return Err(fail("protocol is for connect examples".into())),
                (None, Some(destination)) => Query::Connect {
                    destination: destination.clone(),
                    protocol: example.protocol.unwrap_or_default(),
                },
                _ => {
                    return Err(fail(
                        "give exactly one of exec (a command line) or connect (ADDRESS:PORT)"
                            .into(),
                    ))
                }
            };
            let labels: Vec<(String, String)> = example.labels.clone().into_iter().collect();
            let tested = crate::tester::test(
                policy,
                Path::new(path),
                None,
                &labels,
                &query,
                example.account.as_deref(),
            )
            .map_err(|e| fail(e.to_string()))?;
            let got = tested.explained.decision;
            let on = if tested.labels.is_empty() {
                String::new()
            } else {
                let shown: Vec<String> = tested
                    .labels
                    .iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect();
                format!(" on hosts labelled {}", shown.join(", "))
            };
            if got != example.expect {
                let by = match &tested.explained.rule {
                    Some(r) => format!("rule {:?} matches it first", r.name),
                    None => "no rule matches it in full".to_owned(),
                };
                return Err(fail(format!(
                    "expects {} for {}{on}, but the policy decides {} ({by})",
                    decision_word(example.expect),
                    tested.explained.action,
                    decision_word(got),
                )));
            }
            if let Some(want) = &example.route {
                let routed = tested.approval.as_ref().and_then(|a| a.rule.clone());
                if routed.as_deref() != Some(want.as_str()) {
                    return Err(fail(format!(
                        "expects approval rule {want:?} to route {}{on}, but {}",
                        tested.explained.action,
                        match routed {
                            Some(r) => format!("rule {r:?} routes it"),
                            None if got == Decision::Ask => {
                                "no approval rule matches (any one approver decides)".to_owned()
                            }
                            None => "nothing is asked".to_owned(),
                        }
                    )));
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: &str = r#"[groups]
oncall = ["alice", "bob"]

[[rule]]
name = "tf"
hosts = { env = "prod" }
exec = ["/nonexistent/terraform"]
args = ["apply *"]
decision = "ask"
groups = ["oncall"]
quorum = 2
[[rule.example]]
exec = "/nonexistent/terraform apply -auto-approve"
labels = { env = "prod" }
expect = "ask"
route = "tf"
[[rule.example]]
exec = "/nonexistent/terraform apply"
labels = { env = "staging" }
expect = "allow"
"#;

    #[test]
    fn true_examples_load_and_are_not_sent_to_agents() {
        let p = Policy::parse(POLICY, "policy.toml").unwrap();
        assert_eq!(p.rules[0].examples.len(), 2);
        let (text, _) = p.rules_for(&[("env".to_owned(), "prod".to_owned())].into());
        assert!(!text.contains("example"), "{text}");
    }

    #[test]
    fn a_failing_example_refuses_the_policy_at_its_line() {
        let wrong = POLICY.replace(
            "labels = { env = \"staging\" }\nexpect = \"allow\"",
            "labels = { env = \"staging\" }\nexpect = \"ask\"",
        );
        let err = Policy::parse(&wrong, "policy.toml")
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("policy.toml:18:8: example of rule \"tf\""),
            "{err}"
        );
        assert!(err.contains("on hosts labelled env=staging"), "{err}");
        assert!(err.contains("the policy decides allow"), "{err}");
    }

    #[test]
    fn a_wrong_route_is_refused() {
        let wrong = POLICY.replace("route = \"tf\"", "route = \"other\"");
        let err = Policy::parse(&wrong, "policy.toml")
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("policy.toml:13:8:"), "{err}");
        assert!(err.contains("but rule \"tf\" routes it"), "{err}");
    }

    #[test]
    fn bad_examples_say_what_and_where() {
        let base = "[[rule]]\nname = \"*\"\n[[rule.example]]\n";
        for (example, at, what) in [
            ("expect = \"ask\"\n", "p.toml:4:10:", "exactly one of exec"),
            (
                "connect = \"db.invalid:5432\"\nexpect = \"ask\"\n",
                "p.toml:4:11:",
                "does not resolve on this host",
            ),
            (
                "exec = \"/bin/sh\"\nprotocol = \"udp\"\nexpect = \"allow\"\n",
                "p.toml:4:8:",
                "protocol is for connect",
            ),
            (
                "exec = \"/bin/sh\"\nexpect = \"allow\"\nexpected = 1\n",
                "p.toml:6:1:",
                "expected",
            ),
        ] {
            let err = Policy::parse(&format!("{base}{example}"), "p.toml")
                .unwrap_err()
                .to_string();
            assert!(err.starts_with(at), "{example:?}: {err}");
            assert!(err.contains(what), "{example:?}: {err}");
        }
    }
}
