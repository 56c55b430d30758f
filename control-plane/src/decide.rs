//! The one path by which a person decides a request, whatever they clicked: gRPC
//! `ApprovalService.Decide`, the web UI or a Slack button. Every rule of who may vote lives here,
//! so no front end can weaken it.
//!
//! A vote is refused when the approver has no identity, when a deny (or, where the rule says so,
//! an approval) has no reason, when the approver made the request, when they are in none of the
//! request's approver groups, when they (under any of their names) already voted, when the
//! request is no longer pending, and when its deadline has passed. The last three are checked
//! in the same transaction that records the vote, on whichever replica it is cast.
//!
//! A decision reaches the agent through the change feed: the replica that holds the agent's
//! stream sends it once the decision is committed.

use std::sync::Arc;

use airlock_proto::v1::{HeldRequest, RequestState, Verdict};

pub use crate::types::{is_requester, person};
use crate::{
    metrics::Metrics,
    policy::SharedPolicy,
    store::{Store, StoreError},
};

/// A person deciding: their identity and the groups their login gave them (OIDC group claims or
/// a local account's groups), on top of the groups the policy file lists them in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Approver {
    /// Identity, as the policy's `[groups]` and the audit trail name it.
    pub name: String,
    /// Groups from the login itself.
    pub groups: Vec<String>,
}

impl Approver {
    /// An approver known only by name (API tokens): groups come from the policy alone.
    pub fn named(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            groups: Vec::new(),
        }
    }
}

/// Why a vote was refused.
#[derive(Debug, thiserror::Error)]
pub enum DecideError {
    /// The vote itself is malformed (no verdict, no reason where one is needed).
    #[error("{0}")]
    Invalid(String),
    /// This approver may not vote on this request.
    #[error("{0}")]
    Forbidden(String),
    /// The store refused (not found, not pending, already voted) or failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Decides requests for every front end.
#[derive(Clone)]
pub struct Decisions {
    /// Requests.
    pub store: Store,
    /// Group membership.
    pub policy: SharedPolicy,
    /// Counters.
    pub metrics: Arc<Metrics>,
}

/// Whether the same [`person`] as `approver` already voted on `held`.
pub fn has_voted(held: &HeldRequest, approver: &str) -> bool {
    let me = person(approver);
    held.votes.iter().any(|v| person(&v.approver) == me)
}

impl Decisions {
    /// Why `approver` may not vote on `held` at all, or `None` if they may. The web UI shows
    /// the buttons only when this is `None`; [`Decisions::decide`] checks it again.
    pub fn refusal(&self, held: &HeldRequest, approver: &Approver) -> Option<String> {
        refusal(&crate::policy::current(&self.policy), held, approver)
    }

    /// Records `approver`'s vote on request `id`, in one transaction with every check: that
    /// the request is still pending and before its deadline, that the same person has not
    /// voted (under any of their names), that the approver did not make it and is in its
    /// groups, and that a reason is given where one is needed.
    pub async fn decide(
        &self,
        approver: &Approver,
        id: &str,
        verdict: Verdict,
        reason: &str,
        grant_minutes: u32,
    ) -> Result<HeldRequest, DecideError> {
        if verdict == Verdict::Unspecified {
            return Err(DecideError::Invalid("verdict must be allow or deny".into()));
        }
        if verdict == Verdict::Deny && reason.trim().is_empty() {
            return Err(DecideError::Invalid("a deny needs a reason".into()));
        }
        let (policy, who, no_reason) = (
            self.policy.clone(),
            approver.clone(),
            reason.trim().is_empty(),
        );
        let check = move |held: &HeldRequest| {
            if verdict == Verdict::Allow && held.reason_required && no_reason {
                return Err(DecideError::Invalid(format!(
                    "rule {:?} needs a reason for an approval too",
                    held.route
                )));
            }
            match refusal(&crate::policy::current(&policy), held, &who) {
                Some(why) => Err(DecideError::Forbidden(why)),
                None => Ok(()),
            }
        };
        let (held, decided) = self
            .store
            .vote_checked(
                id,
                &approver.name,
                verdict,
                reason.trim(),
                grant_minutes,
                check,
            )
            .await??;
        tracing::info!(request = %id, approver = %approver.name, verdict = ?verdict, decided, "vote");
        if decided {
            self.metrics.decided(crate::types::state_name(held.state()));
            let secs = (held.decided_unix_ms - held.received_unix_ms).max(0) as f64 / 1000.0;
            self.metrics.decision_latency.observe(secs);
        }
        Ok(held)
    }
}

/// Why `approver` may not vote on `held` under `policy`, or `None` if they may.
fn refusal(
    policy: &crate::policy::Policy,
    held: &HeldRequest,
    approver: &Approver,
) -> Option<String> {
    if approver.name.trim().is_empty() {
        return Some("an approver identity is required".into());
    }
    if held.state() != RequestState::Pending {
        return Some(format!(
            "the request is {}",
            crate::types::state_name(held.state())
        ));
    }
    if policy.is_own(&approver.name, held) {
        return Some(format!(
            "{} made this request and cannot decide it",
            approver.name
        ));
    }
    if has_voted(held, &approver.name) {
        return Some(format!("{} has already voted", approver.name));
    }
    let member = policy.may_vote(&approver.name, &held.approver_groups)
        || held
            .approver_groups
            .iter()
            .any(|g| approver.groups.contains(g));
    if !member {
        return Some(format!(
            "{} is not in the approver groups of this request ({})",
            approver.name,
            held.approver_groups.join(", ")
        ));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use airlock_proto::v1::{ActionRequest, ProcessContext};

    fn held(user: &str, login: &str) -> HeldRequest {
        HeldRequest {
            request: Some(ActionRequest {
                process: Some(ProcessContext {
                    user: user.into(),
                    login_user: login.into(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn requester_matches_user_login_user_and_email_local_part() {
        let h = held("ci-bot", "alice");
        assert!(is_requester(&h, "ci-bot"));
        assert!(is_requester(&h, "alice"));
        assert!(is_requester(&h, "alice@example.com"));
        assert!(!is_requester(&h, "bob"));
        assert!(
            is_requester(&h, "Alice@Example.com"),
            "case does not make another person"
        );
        assert!(!is_requester(&held("ci-bot", ""), ""));
    }

    /// `a.smith@corp.com` logs in to hosts as `alice`: by name alone she could approve her own
    /// requests, also those of a service started by a unit (no login user at all).
    #[test]
    fn listed_unix_accounts_make_a_request_the_approvers_own() {
        let policy = crate::policy::Policy::parse(
            "[unix_accounts]\n\"a.smith@corp.com\" = [\"alice\", \"deploy-alice\"]\n",
            "policy.toml",
        )
        .unwrap();
        let smith = Approver::named("a.smith@corp.com");
        let pending = |user: &str, login: &str| {
            let mut h = held(user, login);
            h.state = RequestState::Pending as i32;
            h
        };
        let own = refusal(&policy, &pending("ci-bot", "alice"), &smith);
        assert!(own.is_some_and(|r| r.contains("made this request")));
        assert!(
            refusal(&policy, &pending("deploy-alice", ""), &smith).is_some(),
            "a unit's request under her service account"
        );
        assert_eq!(refusal(&policy, &pending("ci-bot", "bob"), &smith), None);
        let jones = Approver::named("b.jones@corp.com");
        assert_eq!(refusal(&policy, &pending("ci-bot", "alice"), &jones), None);
    }

    #[test]
    fn one_person_votes_once_under_any_of_their_identities() {
        let mut h = held("ci-bot", "");
        h.votes.push(airlock_proto::v1::Vote {
            approver: "alice".into(),
            ..Default::default()
        });
        assert!(has_voted(&h, "alice"));
        assert!(has_voted(&h, "ALICE@example.com"));
        assert!(!has_voted(&h, "bob@example.com"));
    }
}
