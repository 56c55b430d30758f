//! Who may decide what: the control plane's approval policy (TOML), routing each request to
//! approver groups with a quorum.
//!
//! ```toml
//! [groups]
//! oncall = ["alice", "bob"]
//!
//! [[rule]]
//! name = "kubectl-destructive"   # the agent rule that held the action; "*" for any
//! hosts = { env = "prod" }       # every label must match the agent's; empty: any host
//! accounts = ["ci"]              # the held task's account; empty: any
//! groups = ["oncall"]            # who may vote; empty: any approver
//! quorum = 2                     # distinct approvals needed
//! require_reason = true          # approvals need a reason too (denials always do)
//! deny_needs_quorum = false       # true: `quorum` denials are needed, not one
//! ```
//!
//! The first rule that matches routes the request; with none, any one approver decides.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::Path,
    sync::Arc,
};

use serde::Deserialize;

/// Errors reading a policy.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// The file could not be read.
    #[error("cannot read policy {path}: {reason}")]
    Read {
        /// File.
        path: String,
        /// Why.
        reason: String,
    },
    /// Malformed TOML or an unknown field.
    #[error("{path}:{line}:{column}: {message}")]
    Parse {
        /// File.
        path: String,
        /// 1-based line.
        line: usize,
        /// 1-based column.
        column: usize,
        /// What is wrong.
        message: String,
    },
    /// Valid, but its record (the stored policy and its `policy.loaded` audit record) could
    /// not be written: a policy nobody can trace is not put in force.
    #[error("{path}: not put in force, as recording it in the audit trail failed: {reason}")]
    NotRecorded {
        /// File.
        path: String,
        /// The store's error.
        reason: String,
    },
    /// Well-formed but inconsistent.
    #[error("{path}: {message}")]
    Invalid {
        /// File.
        path: String,
        /// What is wrong, naming the rule.
        message: String,
    },
    /// A rule's `[[rule.example]]` is not what the policy decides, or cannot be tested.
    #[error("{path}:{line}:{column}: {message}")]
    Example {
        /// File.
        path: String,
        /// 1-based line of the example's action.
        line: usize,
        /// 1-based column.
        column: usize,
        /// The rule, the example, and what the policy decides instead.
        message: String,
    },
}

/// The policy file.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    /// Approver groups: name to member identities (token names, later OIDC subjects).
    #[serde(default)]
    pub groups: BTreeMap<String, Vec<String>>,
    /// Routing rules, first match wins.
    #[serde(default, rename = "rule")]
    pub rules: Vec<ApprovalRule>,
    /// Each approver's own Unix accounts (approver identity to account names): a request whose
    /// account or login user is one of them is that approver's, and they may not decide it,
    /// whatever their names look like (`a.smith@corp.com` = `["alice", "deploy-alice"]`).
    #[serde(default)]
    pub unix_accounts: BTreeMap<String, Vec<String>>,
}

/// One `[[rule]]`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ApprovalRule {
    /// Agent rule name this applies to, or "*".
    pub name: String,
    /// Host label selector.
    #[serde(default)]
    pub hosts: BTreeMap<String, String>,
    /// Groups whose members may vote.
    #[serde(default)]
    pub groups: Vec<String>,
    /// Distinct approvals needed.
    #[serde(default = "one")]
    pub quorum: u32,
    /// Approvals need a reason.
    #[serde(default)]
    pub require_reason: bool,
    /// A deny is final unless this is set; then `quorum` denials are needed.
    #[serde(default)]
    pub deny_needs_quorum: bool,
    /// `[[rule.example]]`: actions and what agents with given labels decide for each under
    /// this policy, checked when it loads ([`crate::policy_examples`]); never sent to agents.
    #[serde(default, rename = "example")]
    pub examples: Vec<crate::policy_examples::PolicyExample>,
    /// What agents enforce (optional): when `exec` or `connect` is set, the rule is sent to
    /// every agent whose labels match `hosts`, in the agent's rule format.
    #[serde(flatten)]
    pub enforce: Enforce,
}

/// The agent side of a rule; field meanings as in the agent's `[[rule]]`.
#[derive(Debug, Clone, Default, Deserialize, serde::Serialize, PartialEq)]
pub struct Enforce {
    /// Accounts (user names) the rule applies to; empty: any. Also used for routing.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub accounts: Vec<String>,
    /// Shown to approvers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Binaries (absolute paths), or "*".
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub exec: Vec<String>,
    /// Argument globs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<String>,
    /// Destination CIDRs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub connect: Vec<String>,
    /// Destination ports.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<u16>,
    /// tcp, udp or any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<String>,
    /// allow, deny or ask.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decision: Option<String>,
    /// Hold deadline, seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_secs: Option<u64>,
    /// allow, deny or wait (no deadline) when the deadline passes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_timeout: Option<String>,
    /// enforce, or observe (record what would happen, never stop).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,
    /// Whether the held task is told on its stderr.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub notices: Option<bool>,
    /// refuse or kill, for connects.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_deny: Option<String>,
    /// Risk label.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub risk: Option<String>,
}

/// A rule as sent to agents.
#[derive(serde::Serialize)]
struct AgentRule<'a> {
    name: &'a str,
    #[serde(flatten)]
    enforce: &'a Enforce,
}

#[derive(serde::Serialize)]
struct AgentRules<'a> {
    rule: Vec<AgentRule<'a>>,
}

fn one() -> u32 {
    1
}

pub use crate::types::Route;

/// The approval policy in force, replaced whole on reload; subscribers hear of each change.
pub type SharedPolicy = Arc<tokio::sync::watch::Sender<Arc<Policy>>>;

/// A new holder of the policy in force, starting with the default (any one approver).
pub fn shared(p: Policy) -> SharedPolicy {
    Arc::new(tokio::sync::watch::channel(Arc::new(p)).0)
}

/// The policy in force now.
pub fn current(p: &SharedPolicy) -> Arc<Policy> {
    p.borrow().clone()
}

impl Policy {
    /// Reads and checks a policy file.
    pub fn load(path: &Path) -> Result<Self, PolicyError> {
        let text = std::fs::read_to_string(path).map_err(|e| PolicyError::Read {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
        Self::parse(&text, &path.display().to_string())
    }

    /// Parses and checks policy text; `path` names it in errors.
    pub fn parse(text: &str, path: &str) -> Result<Self, PolicyError> {
        let policy: Policy = toml::from_str(text).map_err(|e| {
            let (line, column) = crate::config::toml_position(text, &e);
            PolicyError::Parse {
                path: path.to_owned(),
                line,
                column,
                message: e.message().to_owned(),
            }
        })?;
        let invalid = |message: String| PolicyError::Invalid {
            path: path.to_owned(),
            message,
        };
        for rule in &policy.rules {
            let e = &rule.enforce;
            if !e.exec.is_empty() || !e.connect.is_empty() {
                if !e.exec.is_empty() && !e.connect.is_empty() {
                    return Err(invalid(format!(
                        "rule {:?}: set exec or connect, not both",
                        rule.name
                    )));
                }
                if rule.name == "*" {
                    return Err(invalid(
                        "a rule named \"*\" cannot hold anything; give it a name".into(),
                    ));
                }
                match e.decision.as_deref() {
                    Some("allow" | "deny" | "ask" | "approve") => {}
                    other => {
                        return Err(invalid(format!(
                            "rule {:?}: decision must be allow, deny or ask (got {other:?})",
                            rule.name
                        )))
                    }
                }
            }
            if rule.quorum == 0 {
                return Err(invalid(format!(
                    "rule {:?}: quorum must be at least 1",
                    rule.name
                )));
            }
            let mut members = BTreeSet::new();
            for g in &rule.groups {
                let group = policy.groups.get(g).ok_or_else(|| {
                    invalid(format!(
                        "rule {:?}: unknown group {g:?} (define it under [groups])",
                        rule.name
                    ))
                })?;
                members.extend(group.iter());
            }
            if !rule.groups.is_empty() && (members.len() as u32) < rule.quorum {
                return Err(invalid(format!(
                    "rule {:?}: quorum {} but its groups have only {} members, so it could never be approved",
                    rule.name,
                    rule.quorum,
                    members.len()
                )));
            }
        }
        crate::policy_examples::check(&policy, text, path)?;
        Ok(policy)
    }

    /// The route of a request held under agent rule `agent_rule` on a host with `labels`, for
    /// account `account` launched by login user `login_user` ("" when unknown).
    pub fn route(
        &self,
        agent_rule: &str,
        labels: &BTreeMap<String, String>,
        account: &str,
        login_user: &str,
    ) -> Route {
        let mut route = self
            .rules
            .iter()
            .find(|r| {
                (r.name == "*" || r.name == agent_rule)
                    && r.hosts.iter().all(|(k, v)| labels.get(k) == Some(v))
                    && (r.enforce.accounts.is_empty()
                        || r.enforce.accounts.iter().any(|a| a == account))
            })
            .map_or(Route::default(), |r| Route {
                rule: r.name.clone(),
                groups: r.groups.clone(),
                quorum: r.quorum,
                require_reason: r.require_reason,
                deny_needs_quorum: r.deny_needs_quorum,
                owners: Vec::new(),
            });
        route.owners = self.owners(account, login_user);
        route
    }

    /// The rules agents with `labels` must enforce, as TOML in the agent's rule format, and a
    /// version (digest) of that text.
    pub fn rules_for(&self, labels: &BTreeMap<String, String>) -> (String, String) {
        let rule = self
            .rules
            .iter()
            .filter(|r| !r.enforce.exec.is_empty() || !r.enforce.connect.is_empty())
            .filter(|r| r.hosts.iter().all(|(k, v)| labels.get(k) == Some(v)))
            .map(|r| AgentRule {
                name: &r.name,
                enforce: &r.enforce,
            })
            .collect();
        let text = toml::to_string(&AgentRules { rule }).unwrap_or_default();
        let version = crate::audit::sha256_hex(text.as_bytes())[..16].to_owned();
        (text, version)
    }

    /// Whether `held` is `approver`'s own request: its account or login user is one of the
    /// approver's listed [`Policy::unix_accounts`], or the same person by name
    /// ([`crate::types::is_requester`]).
    pub fn is_own(&self, approver: &str, held: &airlock_proto::v1::HeldRequest) -> bool {
        if crate::types::is_requester(held, approver) {
            return true;
        }
        let Some(p) = held.request.as_ref().and_then(|r| r.process.as_ref()) else {
            return false;
        };
        let me = crate::types::person(approver);
        self.owners(&p.user, &p.login_user)
            .iter()
            .any(|who| crate::types::person(who) == me)
    }

    /// The people [`Policy::unix_accounts`] lists for account `user` or login user
    /// `login_user`.
    pub fn owners(&self, user: &str, login_user: &str) -> Vec<String> {
        self.unix_accounts
            .iter()
            .filter(|(_, accounts)| {
                accounts
                    .iter()
                    .any(|a| !a.is_empty() && (a == user || a == login_user))
            })
            .map(|(who, _)| who.clone())
            .collect()
    }

    /// Whether `approver` belongs to one of `groups` (true when `groups` is empty).
    pub fn may_vote(&self, approver: &str, groups: &[String]) -> bool {
        groups.is_empty()
            || groups.iter().any(|g| {
                self.groups
                    .get(g)
                    .is_some_and(|members| members.iter().any(|m| m == approver))
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: &str = r#"
[groups]
oncall = ["alice", "bob"]
dba = ["carol"]

[[rule]]
name = "kubectl-destructive"
hosts = { env = "prod" }
groups = ["oncall"]
quorum = 2

[[rule]]
name = "*"
groups = ["oncall", "dba"]
"#;

    fn labels(env: &str) -> BTreeMap<String, String> {
        [("env".to_owned(), env.to_owned())].into()
    }

    #[test]
    fn first_matching_rule_routes() {
        let p = Policy::parse(POLICY, "p.toml").unwrap();
        let r = p.route("kubectl-destructive", &labels("prod"), "ci", "");
        assert_eq!((r.rule.as_str(), r.quorum), ("kubectl-destructive", 2));
        let r = p.route("kubectl-destructive", &labels("staging"), "ci", "");
        assert_eq!((r.rule.as_str(), r.quorum), ("*", 1), "label selector");
        assert_eq!(
            Policy::default()
                .route("x", &labels("prod"), "ci", "")
                .quorum,
            1
        );
        let by_account = Policy::parse(
            "[[rule]]\nname = \"*\"\naccounts = [\"ci\"]\nquorum = 1\nrequire_reason = true\n",
            "p.toml",
        )
        .unwrap();
        assert!(
            by_account
                .route("x", &labels("prod"), "ci", "")
                .require_reason
        );
        assert!(
            !by_account
                .route("x", &labels("prod"), "claude", "")
                .require_reason
        );
        assert!(p.may_vote("carol", &["oncall".into(), "dba".into()]));
        assert!(!p.may_vote("carol", &["oncall".into()]));
        assert!(p.may_vote("anyone", &[]));
    }

    #[test]
    fn agents_get_the_rules_for_their_labels() {
        let p = Policy::parse(
            r#"
[[rule]]
name = "prod-kubectl"
hosts = { env = "prod" }
exec = ["/usr/bin/kubectl"]
args = ["delete *"]
decision = "ask"
timeout_secs = 120

[[rule]]
name = "everywhere-db"
connect = ["10.0.0.0/8"]
ports = [5432]
decision = "deny"

[[rule]]
name = "*"
quorum = 1
"#,
            "p.toml",
        )
        .unwrap();
        let (prod, v1) = p.rules_for(&labels("prod"));
        let parsed: toml::Table = toml::from_str(&prod).unwrap();
        let rules = parsed["rule"].as_array().unwrap();
        assert_eq!(rules.len(), 2, "{prod}");
        assert_eq!(rules[0]["name"].as_str(), Some("prod-kubectl"));
        assert_eq!(rules[0]["timeout_secs"].as_integer(), Some(120));
        assert!(
            rules[0].get("hosts").is_none() && rules[0].get("quorum").is_none(),
            "server-only fields stay"
        );
        let (staging, v2) = p.rules_for(&labels("staging"));
        assert!(!staging.contains("prod-kubectl"));
        assert_ne!(v1, v2);
        let err =
            Policy::parse("[[rule]]\nname = \"x\"\nexec = [\"/bin/a\"]\n", "p.toml").unwrap_err();
        assert!(err.to_string().contains("decision must be"), "{err}");
        let err = Policy::parse("[[rule]]\nname = \"x\"\nquorom = 2\n", "p.toml").unwrap_err();
        assert!(
            err.to_string().contains("quorom"),
            "a typo is an error, not ignored: {err}"
        );
    }

    #[test]
    fn errors_say_where_and_what() {
        let err =
            Policy::parse("[[rule]]\nname = \"x\"\nquorum = \"two\"\n", "p.toml").unwrap_err();
        assert!(err.to_string().starts_with("p.toml:3:10:"), "{err}");
        let err =
            Policy::parse("[[rule]]\nname = \"x\"\ngroups = [\"ghosts\"]\n", "p.toml").unwrap_err();
        assert!(
            err.to_string().contains("unknown group \"ghosts\""),
            "{err}"
        );
        let err = Policy::parse(
            "[groups]\na = [\"x\"]\n[[rule]]\nname = \"x\"\ngroups = [\"a\"]\nquorum = 2\n",
            "p.toml",
        )
        .unwrap_err();
        assert!(err.to_string().contains("could never be approved"), "{err}");
    }
}
