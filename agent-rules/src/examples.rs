//! Examples a rule carries, checked against the whole file when it loads:
//!
//! ```toml
//! [[rule]]
//! name = "kubectl-destructive"
//! exec = ["/usr/local/bin/kubectl"]
//! args = ["* delete *"]
//! decision = "ask"
//! [[rule.example]]
//! exec = "kubectl -n prod delete ns x"
//! expect = "ask"
//! [[rule.example]]
//! exec = "kubectl get pods"
//! expect = "allow"          # no rule of the file holds it
//! ```
//!
//! An example states what the whole file decides for its action, not only its own rule: an
//! `allow` example proves that no rule holds the action (or that an allow rule comes first).
//! Its action is tested as [`crate::explain`] tests one (`exec` split like a shell, a bare
//! program name found in `PATH` or else among the rules' binaries; `connect` as
//! `ADDRESS:PORT`). A failing example refuses the file, naming the example's line and column.

use std::path::Path;

use serde::Deserialize;
use toml::Spanned;

use crate::{
    config::{line_col, Config, ConfigError},
    explain::{decision_word, Action, Tester, Transport},
    policy::Decision,
};

/// One `[[rule.example]]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Example {
    /// A command line: the program (absolute path or a name) and its arguments.
    pub exec: Option<Spanned<String>>,
    /// A destination, `ADDRESS:PORT` (IPv6 in brackets).
    pub connect: Option<Spanned<String>>,
    /// For `connect`: tcp (the default) or udp.
    pub protocol: Option<Spanned<Transport>>,
    /// The watched account that acts; none: an account no rule lists.
    pub account: Option<String>,
    /// Test the program as a file the account could have made (a copy, a download).
    #[serde(default)]
    pub self_made: bool,
    /// What the whole file decides: allow, deny or ask.
    pub expect: Spanned<Decision>,
}

/// Checks every example of `config`'s rules against all its rules; `text` is the file's text
/// (for positions) and `path` names it.
pub fn check(config: &Config, text: &str, path: &Path) -> Result<(), ConfigError> {
    if config.rules.iter().all(|r| r.examples.is_empty()) {
        return Ok(());
    }
    let at = |span: std::ops::Range<usize>, message: String| {
        let (line, column) = line_col(text, span.start);
        ConfigError::Example {
            path: path.to_owned(),
            line,
            column,
            message,
        }
    };
    let mut tester = Tester::new(&config.rules, path, &config.agent)?;
    for rule in &config.rules {
        for example in &rule.examples {
            let of = format!("example of rule {:?}", rule.name);
            let (span, tried) = match (&example.exec, &example.connect) {
                (Some(line), None) => {
                    if let Some(p) = &example.protocol {
                        return Err(at(
                            p.span(),
                            format!("{of}: protocol is for connect examples"),
                        ));
                    }
                    (
                        line.span(),
                        Action::exec(line.get_ref(), example.self_made, &config.rules),
                    )
                }
                (None, Some(dest)) => (
                    dest.span(),
                    Action::connect(
                        dest.get_ref(),
                        example
                            .protocol
                            .as_ref()
                            .map_or(Transport::Tcp, |p| *p.get_ref()),
                    ),
                ),
                _ => {
                    return Err(at(
                        example.expect.span(),
                        format!(
                        "{of}: give exactly one of exec (a command line) or connect (ADDRESS:PORT)"
                    ),
                    ))
                }
            };
            let action = tried.map_err(|e| at(span.clone(), format!("{of}: {e}")))?;
            let got = tester.explain(&action, example.account.as_deref());
            let expect = *example.expect.get_ref();
            if got.decision != expect {
                let by = match &got.rule {
                    Some(r) => format!("rule {:?} matches it first", r.name),
                    None => "no rule matches it in full".to_owned(),
                };
                let who = example
                    .account
                    .as_deref()
                    .map(|a| format!(" by {a}"))
                    .unwrap_or_default();
                return Err(at(
                    span,
                    format!(
                        "{of}: expects {} for {action}{who}, but the file decides {} ({by})",
                        decision_word(expect),
                        decision_word(got.decision),
                    ),
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("agent.toml"))
    }

    const RULES: &str = r#"[[rule]]
name = "sh-delete"
exec = ["/bin/sh"]
args = ["* delete *"]
decision = "ask"
[[rule]]
name = "db"
connect = ["10.20.0.0/16"]
ports = [5432]
protocol = "tcp"
decision = "deny"
"#;

    #[test]
    fn true_examples_load() {
        let text = format!(
            "{RULES}[[rule.example]]\nconnect = \"10.20.3.4:5432\"\nexpect = \"deny\"\n[[rule.example]]\nconnect = \"10.20.3.4:5432\"\nprotocol = \"udp\"\nexpect = \"allow\"\n[[rule.example]]\nexec = \"/bin/sh -c 'x' delete ns\"\nexpect = \"ask\"\n[[rule.example]]\nexec = \"/bin/sh get pods\"\nexpect = \"allow\"\n"
        );
        let c = parse(&text).unwrap();
        assert_eq!(c.rules[1].examples.len(), 4);
    }

    #[test]
    fn a_failing_example_refuses_the_file_at_its_line() {
        // Line 16: the `exec =` of the second example; column 8: its value.
        let text = format!(
            "{RULES}[[rule.example]]\nconnect = \"10.20.3.4:5432\"\nexpect = \"deny\"\n[[rule.example]]\nexec = \"/bin/sh get pods\"\nexpect = \"ask\"\n"
        );
        let err = parse(&text).unwrap_err().to_string();
        assert!(err.starts_with("agent.toml:16:8: "), "{err}");
        assert!(err.contains("example of rule \"db\""), "{err}");
        assert!(err.contains("expects ask"), "{err}");
        assert!(err.contains("the file decides allow"), "{err}");
        assert!(err.contains("no rule matches it in full"), "{err}");
    }

    #[test]
    fn an_example_states_what_the_whole_file_decides() {
        // The example sits under "db" but the exec is decided by "sh-delete", an earlier rule:
        // it is the file's decision that counts.
        let text =
            format!("{RULES}[[rule.example]]\nexec = \"/bin/sh delete x\"\nexpect = \"allow\"\n");
        let err = parse(&text).unwrap_err().to_string();
        assert!(err.contains("rule \"sh-delete\" matches it first"), "{err}");
        assert!(err.contains("the file decides ask"), "{err}");
    }

    #[test]
    fn examples_name_accounts() {
        let text = "[[rule]]\nname = \"ci\"\naccounts = [\"ci\"]\nexec = [\"/bin/sh\"]\ndecision = \"deny\"\n[[rule.example]]\nexec = \"/bin/sh\"\naccount = \"ci\"\nexpect = \"deny\"\n[[rule.example]]\nexec = \"/bin/sh\"\naccount = \"claude\"\nexpect = \"allow\"\n[[rule.example]]\nexec = \"/bin/sh\"\nexpect = \"allow\"\n";
        parse(text).unwrap();
        let wrong = text.replace(
            "account = \"claude\"\nexpect = \"allow\"",
            "account = \"claude\"\nexpect = \"deny\"",
        );
        let err = parse(&wrong).unwrap_err().to_string();
        assert!(err.starts_with("agent.toml:11:8:"), "{err}");
        assert!(err.contains("by claude"), "{err}");
    }

    #[test]
    fn bad_examples_say_what_and_where() {
        let base =
            "[[rule]]\nname = \"r\"\nexec = [\"/bin/sh\"]\ndecision = \"ask\"\n[[rule.example]]\n";
        let cases = [
            (
                "expect = \"ask\"\n",
                "agent.toml:6:10:",
                "exactly one of exec",
            ),
            (
                "exec = \"/bin/sh\"\nconnect = \"10.0.0.1:1\"\nexpect = \"ask\"\n",
                "agent.toml:8:10:",
                "exactly one of exec",
            ),
            (
                "exec = \"\"\nexpect = \"ask\"\n",
                "agent.toml:6:8:",
                "command line is empty",
            ),
            (
                "exec = \"/bin/sh 'x\"\nexpect = \"ask\"\n",
                "agent.toml:6:8:",
                "cannot split",
            ),
            (
                "exec = \"no-such-program-here x\"\nexpect = \"ask\"\n",
                "agent.toml:6:8:",
                "not in PATH",
            ),
            (
                "connect = \"db.invalid:5432\"\nexpect = \"ask\"\n",
                "agent.toml:6:11:",
                "does not resolve on this host",
            ),
            (
                "connect = \"10.0.0.1\"\nexpect = \"ask\"\n",
                "agent.toml:6:11:",
                "is not ADDRESS:PORT",
            ),
            (
                "exec = \"/bin/sh\"\nprotocol = \"udp\"\nexpect = \"ask\"\n",
                "agent.toml:7:12:",
                "protocol is for connect",
            ),
        ];
        for (example, at, what) in cases {
            let err = parse(&format!("{base}{example}")).unwrap_err().to_string();
            assert!(err.starts_with(at), "{example:?}: {err}");
            assert!(err.contains(what), "{example:?}: {err}");
        }
        let err = parse(&format!(
            "{base}exec = \"/bin/sh\"\nexpect = \"ask\"\nexpected = 1\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(err.contains("expected"), "a typo is refused: {err}");
    }

    #[test]
    fn a_program_not_on_this_host_is_matched_by_path() {
        // A name no PATH has: it is the binary of that name the rule names.
        let text = "[[rule]]\nname = \"k\"\nexec = [\"/nonexistent/bin/airlock-test-kubectl\"]\nargs = [\"* delete *\"]\ndecision = \"ask\"\n[[rule.example]]\nexec = \"airlock-test-kubectl -n prod delete ns x\"\nexpect = \"ask\"\n[[rule.example]]\nexec = \"/nonexistent/bin/airlock-test-kubectl get pods\"\nexpect = \"allow\"\n";
        parse(text).unwrap();
    }
}
