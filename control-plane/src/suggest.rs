//! `airlockctl policy suggest`: agent rules proposed from what observe mode recorded.
//!
//! Observed actions of one account are grouped by what a rule would name: a program and its
//! subcommand (the first argument that is not a flag), or a destination and port. Each group
//! becomes one `[[rule]]` with the decision its observed records say the rules in force would
//! have made (the most common), and a comment with how often and an example. People read and
//! edit the proposal before they enforce it; nothing is applied.

use std::{collections::BTreeMap, fmt::Write as _};

use airlock_proto::v1::{action_request::Action, HeldRequest, RequestState};

/// One proposed rule's evidence.
#[derive(Debug, Default)]
struct Group {
    /// `exec` path, or `connect` CIDR.
    target: String,
    /// The subcommand, for an exec.
    sub: Option<String>,
    port: Option<u32>,
    count: usize,
    example: String,
    /// Would-be decisions, counted.
    would_be: BTreeMap<String, usize>,
    rules: BTreeMap<String, usize>,
}

/// The subcommand: the first argument after argv[0] that is neither a flag nor, as far as one
/// can tell without knowing the program, a flag's value (`-n prod`, `--namespace prod`; a
/// `--flag=value` carries its own). A guess people check before they enforce the rule.
fn subcommand(argv: &[String]) -> Option<&str> {
    let mut after_flag = false;
    for a in argv.iter().skip(1).map(String::as_str) {
        if a.starts_with('-') {
            after_flag = !a.contains('=') && a != "-" && a != "--";
            continue;
        }
        if after_flag || a.is_empty() {
            after_flag = false;
            continue;
        }
        return Some(a);
    }
    None
}

/// A one-line TOML basic string for `s`: quotes, backslashes and every control character
/// escaped, so that agent text can neither end the string nor start a new line. (The toml
/// crate writes a string with a newline as a multi-line one, which would end a comment.)
fn toml_str(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => {
                let _ = write!(out, "\\u{:04X}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// How strict a would-be decision is: a group gets its strictest.
fn strictness(decision: &str) -> u8 {
    match decision {
        "deny" => 2,
        "ask" => 1,
        _ => 0,
    }
}

/// A rule name made of `parts`: lower-case letters, digits and dashes.
fn rule_name(parts: &[&str]) -> String {
    let mut name = String::from("suggested");
    for p in parts {
        let file = p.rsplit('/').next().unwrap_or(p);
        let clean: String = file
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() {
                    c.to_ascii_lowercase()
                } else {
                    '-'
                }
            })
            .collect();
        let clean = clean.trim_matches('-');
        if !clean.is_empty() {
            name.push('-');
            name.push_str(clean);
        }
    }
    name
}

/// Proposed `[[rule]]` tables (TOML) for `account` from its `observed` requests (others are
/// ignored); a comment when there are none.
pub fn suggest(account: &str, observed: &[HeldRequest]) -> String {
    let mut groups: BTreeMap<String, Group> = BTreeMap::new();
    for h in observed {
        if h.state() != RequestState::Observed {
            continue;
        }
        let Some(req) = &h.request else { continue };
        let would_be = req
            .decided
            .as_ref()
            .map_or("ask".to_owned(), |d| d.would_be.clone());
        let (key, mut g) = match &req.action {
            Some(Action::Exec(e)) => {
                let program = if e.program.is_empty() {
                    &e.path
                } else {
                    &e.program
                };
                let sub = subcommand(&e.argv).map(str::to_owned);
                (
                    format!(
                        "{}\u{1f}exec {program} {}",
                        req.rule,
                        sub.as_deref().unwrap_or("")
                    ),
                    Group {
                        target: program.clone(),
                        sub,
                        example: e.argv.join(" "),
                        ..Default::default()
                    },
                )
            }
            Some(Action::Connect(c)) => {
                let cidr = if c.address.contains(':') {
                    format!("{}/128", c.address)
                } else {
                    format!("{}/32", c.address)
                };
                (
                    format!("{}\u{1f}connect {cidr} {}", req.rule, c.port),
                    Group {
                        target: cidr,
                        port: Some(c.port),
                        example: format!("{}:{}", c.address, c.port),
                        ..Default::default()
                    },
                )
            }
            None => continue,
        };
        let entry = groups.entry(key).or_insert_with(|| {
            g.count = 0;
            std::mem::take(&mut g)
        });
        entry.count += 1;
        *entry.would_be.entry(would_be).or_default() += 1;
        *entry.rules.entry(req.rule.clone()).or_default() += 1;
    }
    let mut out = format!(
        "# Rules proposed from {} observed action(s) of account {} (airlockctl policy suggest).\n\
         # Read and edit them, try them with `airlockctl policy test`, then enforce.\n",
        groups.values().map(|g| g.count).sum::<usize>(),
        toml_str(account)
    );
    if groups.is_empty() {
        out.push_str(
            "# Nothing observed: set mode = \"observe\" on a rule (or in [agent]) first.\n",
        );
        return out;
    }
    let mut ordered: Vec<&Group> = groups.values().collect();
    ordered.sort_by(|a, b| b.count.cmp(&a.count).then(a.target.cmp(&b.target)));
    for g in ordered {
        // The strictest decision seen: a few allowed variants must not turn the group's
        // rule into an allow for the rest.
        let decision = g
            .would_be
            .keys()
            .max_by_key(|d| strictness(d))
            .map_or("ask", |d| d.as_str());
        // Agent text, in a comment: quoted and escaped, so it cannot end the comment.
        let rules: Vec<String> = g.rules.keys().map(|r| toml_str(r)).collect();
        let example: String = g.example.chars().take(120).collect();
        let _ = write!(
            out,
            "\n# {} time(s), observed under rule(s) {}; e.g. {}\n[[rule]]\n",
            g.count,
            rules.join(", "),
            toml_str(&example)
        );
        match (&g.sub, g.port) {
            (_, Some(port)) => {
                let _ = write!(
                    out,
                    "name = {}\nconnect = [{}]\nports = [{port}]\n",
                    toml_str(&rule_name(&["to", &g.example])),
                    toml_str(&g.target)
                );
            }
            (sub, None) => {
                let mut parts = vec![g.target.as_str()];
                if let Some(s) = sub {
                    parts.push(s);
                }
                let _ = write!(
                    out,
                    "name = {}\nexec = [{}]\n",
                    toml_str(&rule_name(&parts)),
                    toml_str(&g.target)
                );
                if let Some(s) = sub {
                    // The subcommand wherever it comes after flags; as a literal token.
                    let escaped: String = s
                        .chars()
                        .flat_map(|c| match c {
                            '*' | '?' | '[' | ']' | '{' | '}' | '\\' => vec!['\\', c],
                            c => vec![c],
                        })
                        .collect();
                    let _ = writeln!(out, "args = [{}]", toml_str(&format!("* {escaped} *")));
                }
            }
        }
        let _ = write!(
            out,
            "accounts = [{}]\ndecision = {}\n",
            toml_str(account),
            toml_str(decision)
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use airlock_proto::v1::{ActionRequest, ConnectAction, ExecAction, LocalDecision};

    fn observed(argv: &[&str], would_be: &str) -> HeldRequest {
        HeldRequest {
            state: RequestState::Observed as i32,
            request: Some(ActionRequest {
                rule: "kubectl-all".into(),
                action: Some(Action::Exec(ExecAction {
                    path: "/usr/local/bin/kubectl".into(),
                    argv: argv.iter().map(|s| s.to_string()).collect(),
                    ..Default::default()
                })),
                decided: Some(LocalDecision {
                    cause: "observe".into(),
                    would_be: would_be.into(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn groups_by_program_and_subcommand_and_loads_as_agent_rules() {
        let mut db = observed(&["psql"], "ask");
        db.request.as_mut().unwrap().action = Some(Action::Connect(ConnectAction {
            address: "10.20.3.4".into(),
            port: 5432,
            ..Default::default()
        }));
        let mut approved = observed(&["kubectl", "delete", "ns", "y"], "ask");
        approved.state = RequestState::Approved as i32;
        let text = suggest(
            "ci",
            &[
                observed(&["kubectl", "-n", "prod", "delete", "ns", "x"], "ask"),
                observed(&["kubectl", "delete", "pod", "p\"q"], "ask"),
                observed(&["kubectl", "get", "pods"], "allow"),
                db,
                approved,
            ],
        );
        assert!(text.contains("from 4 observed action(s)"), "{text}");
        assert!(text.contains("args = [\"* delete *\"]"), "{text}");
        assert!(text.contains("args = [\"* get *\"]"), "{text}");
        assert!(
            text.contains("connect = [\"10.20.3.4/32\"]\nports = [5432]"),
            "{text}"
        );
        // The proposal is a file the agent loads as it is.
        let loaded =
            agent_rules::config::Config::parse(&text, std::path::Path::new("suggested.toml"))
                .unwrap_or_else(|e| panic!("{e}\n{text}"));
        assert_eq!(loaded.rules.len(), 3);
        let parsed: toml::Value = toml::from_str(&text).expect(&text);
        let rules = parsed["rule"].as_array().expect("rules");
        assert_eq!(rules.len(), 3);
        assert_eq!(rules[0]["name"].as_str(), Some("suggested-kubectl-delete"));
        assert_eq!(rules[0]["decision"].as_str(), Some("ask"));
        let names: Vec<&str> = rules.iter().filter_map(|r| r["name"].as_str()).collect();
        assert_eq!(
            names,
            [
                "suggested-kubectl-delete",
                "suggested-kubectl-get",
                "suggested-to-10-20-3-4-5432"
            ]
        );
        assert_eq!(rules[1]["decision"].as_str(), Some("allow"));
    }

    #[test]
    fn agent_text_cannot_add_rules_through_a_comment() {
        let evil = "\n[[rule]]\nname='zz'\nexec=['*']\ndecision='allow'\n#";
        let text = suggest("ci", &[observed(&[evil, "zz", evil], "ask")]);
        let loaded = agent_rules::config::Config::parse(&text, std::path::Path::new("s.toml"))
            .unwrap_or_else(|e| panic!("{e}\n{text}"));
        assert_eq!(loaded.rules.len(), 1, "{text}");
        assert!(loaded.rules.iter().all(|r| r.name != "zz"));
        assert!(text.lines().all(|l| !l.starts_with("exec=")), "{text}");
    }

    #[test]
    fn a_group_gets_its_strictest_decision() {
        let text = suggest(
            "ci",
            &[
                observed(&["kubectl", "delete", "pod", "test-1"], "allow"),
                observed(&["kubectl", "delete", "pod", "test-2"], "allow"),
                observed(&["kubectl", "delete", "ns", "prod"], "deny"),
            ],
        );
        let loaded = agent_rules::config::Config::parse(&text, std::path::Path::new("s.toml"))
            .unwrap_or_else(|e| panic!("{e}\n{text}"));
        assert_eq!(
            loaded.rules[0].decision,
            agent_rules::policy::Decision::Deny
        );
    }

    #[test]
    fn nothing_observed_says_how_to_start() {
        assert!(suggest("ci", &[]).contains("set mode = \"observe\""));
    }
}
