//! The rule tester behind `airlockctl policy test`: what an agent on a host with given labels
//! would decide for one action, and for ask, who the approval policy lets decide it.
//!
//! The agent's side is the agent's own code (crate agent-rules): its rules file, then the rules
//! this policy sends to agents with those labels ([`Policy::rules_for`], parsed and merged as
//! the agent does), matched by [`agent_rules::explain`]. The routing is [`Policy::route`], as
//! the server routes a request when it arrives.

use std::{collections::BTreeMap, fmt, path::Path};

use agent_rules::{
    config::{Config as AgentConfig, ConfigError},
    explain::{ActionError, Explanation, Query, Tester},
    policy::Decision,
    server_rules,
};
use serde::Serialize;

use crate::policy::Policy;

/// Why a test could not be made.
#[derive(Debug, thiserror::Error)]
pub enum TestError {
    /// The action given cannot be tested (a usage error).
    #[error(transparent)]
    Action(#[from] ActionError),
    /// The agent rules (the file's, or the policy's for these labels) do not compile.
    #[error(transparent)]
    Rules(#[from] ConfigError),
    /// The rules this policy sends to agents with these labels would be refused by them.
    #[error(
        "{path}: agents labelled {labels} would refuse the rules this policy sends them: {message}"
    )]
    Sent {
        /// The policy file.
        path: String,
        /// The labels, `k=v, ...`.
        labels: String,
        /// Why.
        message: String,
    },
}

/// Where the deciding agent rule comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Source {
    /// The agent's own rules file (`--rules`).
    AgentFile,
    /// The approval policy's rules, sent to agents whose labels match.
    Policy,
}

/// An approver group and its members.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Group {
    /// The group.
    pub name: String,
    /// Its members (identities as they log in).
    pub members: Vec<String>,
}

/// Who may decide a held request, as the policy routes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Approval {
    /// The approval rule that routes it; none: the default, any one approver.
    pub rule: Option<String>,
    /// Groups whose members may vote; empty: any approver.
    pub groups: Vec<Group>,
    /// Distinct approvals needed.
    pub quorum: u32,
    /// Approvals need a reason too.
    pub require_reason: bool,
    /// `quorum` denials decide, not the first.
    pub deny_needs_quorum: bool,
}

/// What the test found.
#[derive(Debug, Clone, Serialize)]
pub struct Tested {
    /// Host labels tested.
    pub labels: BTreeMap<String, String>,
    /// What the agent decides.
    #[serde(flatten)]
    pub explained: Explanation,
    /// Where the deciding agent rule comes from.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source: Option<Source>,
    /// For ask: who may decide.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub approval: Option<Approval>,
}

/// Tests the action `query` by `account` on a host labelled `labels` (over the agent file's
/// `agent.labels`), under `policy` (named `policy_path`) and the agent's file `agent`, if any.
pub fn test(
    policy: &Policy,
    policy_path: &Path,
    agent: Option<(&AgentConfig, &Path)>,
    labels: &[(String, String)],
    query: &Query,
    account: Option<&str>,
) -> Result<Tested, TestError> {
    let base = agent
        .map(|(c, _)| c.agent.labels.clone())
        .unwrap_or_default();
    let labels = agent_rules::explain::merge_labels(&base, labels);
    let (text, _) = policy.rules_for(&labels);
    let shown_labels = || {
        if labels.is_empty() {
            "(none)".to_owned()
        } else {
            labels
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(", ")
        }
    };
    let sent = server_rules::parse(&text).map_err(|e| TestError::Sent {
        path: policy_path.display().to_string(),
        labels: shown_labels(),
        message: e.to_string(),
    })?;
    let local = agent.map(|(c, _)| c.rules.clone()).unwrap_or_default();
    let rules = server_rules::merge(&local, &sent).map_err(|message| TestError::Sent {
        path: policy_path.display().to_string(),
        labels: shown_labels(),
        message,
    })?;
    // Without an agent file, an agent's defaults (hold_timeout_secs, mode).
    let defaults = agent_rules::config::AgentSection::default();
    let section = agent.map_or(&defaults, |(c, _)| &c.agent);
    let hold_timeout = section.hold_timeout_secs;
    let action = query.resolve(&rules)?;
    let named = agent.map_or(policy_path, |(_, p)| p);
    let mut tester = Tester::new(&rules, named, section)?;
    let mut explained = tester.explain(&action, account);
    let source = explained.rule.as_ref().map(|r| {
        if local.iter().any(|l| l.name == r.name) {
            Source::AgentFile
        } else {
            Source::Policy
        }
    });
    let mut approval = None;
    if let (Some(rule), Decision::Ask) = (&explained.rule, explained.decision) {
        let route = policy.route(&rule.name, &labels, account.unwrap_or(""), "");
        approval = Some(Approval {
            rule: (!route.rule.is_empty()).then(|| route.rule.clone()),
            groups: route
                .groups
                .iter()
                .map(|g| Group {
                    name: g.clone(),
                    members: policy.groups.get(g).cloned().unwrap_or_default(),
                })
                .collect(),
            quorum: route.quorum,
            require_reason: route.require_reason,
            deny_needs_quorum: route.deny_needs_quorum,
        });
        let own_deadline = rules
            .iter()
            .find(|r| r.name == rule.name)
            .is_some_and(|r| r.timeout_secs.is_some());
        if agent.is_none() && !own_deadline {
            explained.notes.push(format!(
                "no --rules file: the deadline is the agent's default hold_timeout_secs ({hold_timeout} s)"
            ));
        }
    }
    Ok(Tested {
        labels,
        explained,
        source,
        approval,
    })
}

impl fmt::Display for Tested {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if !self.labels.is_empty() {
            let shown: Vec<String> = self
                .labels
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            writeln!(f, "labels:    {}", shown.join(", "))?;
        }
        write!(f, "{}", self.explained)?;
        if let Some(source) = self.source {
            writeln!(
                f,
                "from:      {}",
                match source {
                    Source::AgentFile => "the agent's rules file",
                    Source::Policy => "the approval policy (sent to agents with these labels)",
                }
            )?;
        }
        if let Some(a) = &self.approval {
            match &a.rule {
                Some(r) => writeln!(f, "route:     approval rule {r:?}")?,
                None => writeln!(
                    f,
                    "route:     no approval rule matches: the default, any one approver"
                )?,
            }
            if a.groups.is_empty() {
                writeln!(f, "approvers: any approver")?;
            } else {
                for g in &a.groups {
                    writeln!(f, "approvers: {}: {}", g.name, g.members.join(", "))?;
                }
            }
            writeln!(
                f,
                "           never the requester (the held task's account or login user, or one listed for them under [unix_accounts])"
            )?;
            let deny = if a.deny_needs_quorum {
                format!("{} denials decide", a.quorum)
            } else {
                "any deny is final".to_owned()
            };
            writeln!(f, "quorum:    {} approval(s); {deny}", a.quorum)?;
            if a.require_reason {
                writeln!(f, "reason:    required for approvals too")?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use agent_rules::explain::Transport;

    fn connect(destination: &str) -> Query {
        Query::Connect {
            destination: destination.into(),
            protocol: Transport::Tcp,
        }
    }

    const POLICY: &str = r#"
[groups]
oncall = ["alice", "bob"]
dba = ["carol"]

[[rule]]
name = "terraform"
hosts = { env = "prod" }
exec = ["/nonexistent/terraform"]
args = ["apply *"]
decision = "ask"
timeout_secs = 900
groups = ["oncall"]
quorum = 2
require_reason = true

[[rule]]
name = "prod-db"
groups = ["dba"]
"#;

    const AGENT: &str = r#"
[agent]
hold_timeout_secs = 120
labels = { env = "prod" }

[[rule]]
name = "prod-db"
connect = ["10.20.0.0/16"]
ports = [5432]
decision = "ask"
"#;

    fn policy() -> Policy {
        Policy::parse(POLICY, "policy.toml").unwrap()
    }

    fn agent() -> AgentConfig {
        AgentConfig::parse(AGENT, Path::new("agent.toml")).unwrap()
    }

    fn exec(line: &str) -> Query {
        Query::Exec {
            line: line.into(),
            self_made: false,
        }
    }

    #[test]
    fn a_policy_rule_for_the_labels_asks_and_routes_to_its_groups() {
        let p = policy();
        let prod = [("env".to_owned(), "prod".to_owned())];
        let t = test(
            &p,
            Path::new("policy.toml"),
            None,
            &prod,
            &exec("/nonexistent/terraform apply -auto-approve"),
            Some("ci"),
        )
        .unwrap();
        assert_eq!(t.explained.decision, Decision::Ask);
        assert_eq!(t.source, Some(Source::Policy));
        assert_eq!(t.explained.deadline_secs, Some(900));
        let a = t.approval.unwrap();
        assert_eq!(a.rule.as_deref(), Some("terraform"));
        assert_eq!((a.quorum, a.require_reason), (2, true));
        assert_eq!(a.groups[0].members, ["alice", "bob"]);
    }

    #[test]
    fn other_labels_get_no_policy_rules() {
        let p = policy();
        let staging = [("env".to_owned(), "staging".to_owned())];
        let t = test(
            &p,
            Path::new("policy.toml"),
            None,
            &staging,
            &exec("/nonexistent/terraform apply"),
            Some("ci"),
        )
        .unwrap();
        assert_eq!(t.explained.decision, Decision::Allow);
        assert!(t.explained.rule.is_none() && t.approval.is_none());
    }

    #[test]
    fn the_agent_file_comes_first_and_gives_labels_and_deadline() {
        let p = policy();
        let a = agent();
        let t = test(
            &p,
            Path::new("policy.toml"),
            Some((&a, Path::new("agent.toml"))),
            &[],
            &connect("10.20.3.4:5432"),
            Some("ci"),
        )
        .unwrap();
        assert_eq!(t.labels.get("env").map(String::as_str), Some("prod"));
        assert_eq!(t.source, Some(Source::AgentFile));
        assert_eq!(
            t.explained.deadline_secs,
            Some(120),
            "agent.hold_timeout_secs"
        );
        let route = t.approval.unwrap();
        assert_eq!(route.rule.as_deref(), Some("prod-db"));
        assert_eq!(route.groups[0].members, ["carol"]);
        let text = t_text(&p, &a);
        assert!(
            text.contains("route:     approval rule \"prod-db\""),
            "{text}"
        );
        assert!(text.contains("approvers: dba: carol"), "{text}");
    }

    fn t_text(p: &Policy, a: &AgentConfig) -> String {
        test(
            p,
            Path::new("policy.toml"),
            Some((a, Path::new("agent.toml"))),
            &[],
            &connect("10.20.3.4:5432"),
            Some("ci"),
        )
        .unwrap()
        .to_string()
    }
}
