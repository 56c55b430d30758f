//! Small shared types and helpers that every layer uses: times, state names, the person behind
//! an identity, and a request's route.

use std::time::{SystemTime, UNIX_EPOCH};

use airlock_proto::v1::{HeldRequest, RequestState};

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// When `req` expires, Unix ms; `i64::MAX` for a request that waits until someone decides
/// (`on_timeout = "wait"`), which never expires.
pub fn deadline_ms(req: &airlock_proto::v1::ActionRequest) -> i64 {
    if req.wait {
        i64::MAX
    } else {
        req.deadline_unix_ms
    }
}

/// Human name of a state.
pub fn state_name(s: RequestState) -> &'static str {
    match s {
        RequestState::Pending => "pending",
        RequestState::Approved => "approved",
        RequestState::Denied => "denied",
        RequestState::Expired => "expired",
        RequestState::Cancelled => "cancelled",
        RequestState::Observed => "observed",
        RequestState::Unspecified => "unknown",
    }
}

/// The person behind an identity: its local part, lower-cased, so that `Alice@example.com`
/// (OIDC), `alice` (a local account or token) and the Unix account `alice` are one person.
/// Comparisons err on the side of "same person": refusing a vote is safe, a second vote by
/// one person is not.
pub fn person(identity: &str) -> String {
    // White space around a name never makes another person ("alice " is alice).
    let identity = identity.trim();
    identity
        .split('@')
        .next()
        .unwrap_or(identity)
        .to_ascii_lowercase()
}

/// Whether `approver` is the account that made `held` (its user, or the user who logged in
/// and launched it), as the same [`person`].
pub fn is_requester(held: &HeldRequest, approver: &str) -> bool {
    let Some(p) = held.request.as_ref().and_then(|r| r.process.as_ref()) else {
        return false;
    };
    let me = person(approver);
    [p.user.as_str(), p.login_user.as_str()]
        .iter()
        .any(|u| !u.is_empty() && person(u) == me)
}

/// Where a request goes: who may vote and how many must agree (from the approval policy).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// The routing rule ("" for the default).
    pub rule: String,
    /// Groups whose members may vote; empty: any approver.
    pub groups: Vec<String>,
    /// Distinct approvals needed.
    pub quorum: u32,
    /// Approvals need a reason.
    pub require_reason: bool,
    /// Denials need a quorum too.
    pub deny_needs_quorum: bool,
    /// People the policy's `[unix_accounts]` lists for the request's account or login user:
    /// the request is theirs, so no grant they agreed to covers it (as their vote would not).
    pub owners: Vec<String>,
}

impl Default for Route {
    /// Any one approver decides.
    fn default() -> Self {
        Self {
            rule: String::new(),
            groups: Vec::new(),
            quorum: 1,
            require_reason: false,
            deny_needs_quorum: false,
            owners: Vec::new(),
        }
    }
}
