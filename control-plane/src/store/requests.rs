//! Held requests and their lifecycle (pending, then approved, denied, cancelled or expired),
//! votes, grants, outcomes and history.
//!
//! Every state change runs in the writer's transaction (one writer in the whole database at a
//! time), so each check and the write it guards are one step: a second vote by the same person
//! under another name, a vote after the deadline, two replicas expiring the same request or
//! two approvals racing for the last vote of a quorum cannot both succeed. That lock is what
//! `FOR UPDATE SKIP LOCKED` would give, for every claim at once.

use std::sync::Arc;

use airlock_proto::v1::{
    action_request::Action, ActionRequest, Grant, HeldRequest, Hello, ListRequestsRequest,
    LocalDecision, Outcome, RequestState, Verdict, Vote,
};
use prost::Message;
use serde_json::json;

use super::{
    sql::{args, Cell, Row, Tx},
    trail::Where,
    Store, StoreError,
};
use crate::{
    config::Limits,
    credential::random_hex,
    types::{now_ms, person, state_name, Route},
};

/// Longest grant a request asked ahead makes when no approver chose a window, minutes.
pub const MAX_AHEAD_MINUTES: u32 = 60;
/// Longest grant, minutes.
pub const MAX_GRANT_MINUTES: u32 = 24 * 60;

/// Requests one list call returns when it asks for none in particular.
pub const DEFAULT_LIST: u32 = 100;

/// Pending requests expired per write.
// (Pending is state 1; queries write it out for the partial indexes.)
const EXPIRE_BATCH: i64 = 500;

/// What a grant matches on: host id, account and the exact action in its scope, which is the
/// action, the working directory and the environment values the agent reported (so approving
/// `terraform apply` in staging's directory, or with `TF_WORKSPACE=staging`, does not approve it
/// in prod's). Fields are separated by U+001F, the scope's parts by U+001E.
pub fn grant_key(held: &HeldRequest) -> (String, String, String) {
    let req = held.request.clone().unwrap_or_default();
    let p = req.process.unwrap_or_default();
    let mut action = match req.action {
        Some(Action::Exec(e)) => format!("exec {} {}", e.path, e.argv.join("\u{1f}")),
        Some(Action::Connect(c)) => format!("connect {} {} {}", c.address, c.port, c.protocol),
        None => String::new(),
    };
    action.push_str("\u{1e}cwd ");
    action.push_str(&p.cwd);
    let mut env: Vec<String> = p
        .env
        .iter()
        .map(|e| match &e.value {
            Some(v) => format!("{}={v}", e.name),
            None => e.name.clone(),
        })
        .collect();
    env.sort();
    action.push_str("\u{1e}env ");
    action.push_str(&env.join("\u{1f}"));
    (held.host_id.clone(), p.user, action)
}

/// What a grant made by approving a request asked ahead matches on, beside host and account:
/// the program (for a script, the script), argv[0]'s file name, the rule, the other arguments,
/// the working directory, and the values of the environment variables the agent sends
/// (`agent.env_allow`). Environment names are checked apart ([`ahead_env_ok`]): a shell adds
/// some to what the asking process had. A connect: address, port, protocol.
pub fn ahead_key(held: &HeldRequest) -> String {
    let req = held.request.clone().unwrap_or_default();
    let p = req.process.unwrap_or_default();
    match req.action {
        Some(Action::Exec(e)) => {
            let program = if e.program.is_empty() {
                e.path
            } else {
                e.program
            };
            // argv[0]'s file name counts (`busybox` run as `rm` is another program), and so
            // does the rule that held it (another binary bind-mounted over the path is held by
            // another rule).
            let argv0 = e
                .argv
                .first()
                .map(|a| a.rsplit('/').next().unwrap_or(a))
                .unwrap_or("");
            let program = format!("{program} {argv0} rule {}", req.rule);
            let args: Vec<&str> = e.argv.iter().skip(1).map(String::as_str).collect();
            let mut env: Vec<String> = p
                .env
                .iter()
                .filter_map(|e| e.value.as_ref().map(|v| format!("{}={v}", e.name)))
                .collect();
            env.sort();
            format!(
                "ahead exec {program} {}\u{1e}cwd {}\u{1e}env {}",
                args.join("\u{1f}"),
                p.cwd,
                env.join("\u{1f}")
            )
        }
        Some(Action::Connect(c)) => {
            format!("ahead connect {} {} {}", c.address, c.port, c.protocol)
        }
        None => String::new(),
    }
}

/// Names a shell adds to the environment it was started with.
const SHELL_NAMES: [&str; 6] = ["PWD", "OLDPWD", "SHLVL", "_", "LINES", "COLUMNS"];

/// Whether `held`'s environment names are within those of the request asked ahead that made
/// `g` (plus what a shell adds); always true for other grants, which bind names in their key.
pub fn ahead_env_ok(g: &Grant, held: &HeldRequest) -> bool {
    if !g.asked_ahead {
        return true;
    }
    let names = held
        .request
        .as_ref()
        .and_then(|r| r.process.as_ref())
        .map(|p| p.env.iter().map(|e| e.name.as_str()).collect::<Vec<_>>())
        .unwrap_or_default();
    names
        .iter()
        .all(|n| SHELL_NAMES.contains(n) || g.env_names.iter().any(|a| a == n))
}

/// Whether anyone who agreed to grant `g` is a human behind `held` (its account or login
/// user, by name or as one of `owners`, the people the policy lists for them): a grant never
/// approves its own approvers' requests, as their vote would not.
fn granted_by_requester(g: &Grant, held: &HeldRequest, owners: &[String]) -> bool {
    g.created_by.split(',').map(str::trim).any(|approver| {
        let me = crate::types::person(approver);
        crate::types::is_requester(held, approver)
            || owners.iter().any(|o| crate::types::person(o) == me)
    })
}

fn id_of(held: &HeldRequest) -> &str {
    held.request.as_ref().map_or("", |r| r.request_id.as_str())
}

/// The history filter: every field set must match.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct History {
    /// Host name or host id.
    pub host: String,
    /// The held task's account.
    pub account: String,
    /// The agent rule that held it.
    pub rule: String,
    /// State (0: any).
    pub state: i32,
    /// Someone who voted on it.
    pub approver: String,
    /// Received at or after (Unix ms).
    pub from_ms: Option<i64>,
    /// Received before (Unix ms).
    pub to_ms: Option<i64>,
}

/// A new request, made ready before it goes to the writer: what needs no database (the held
/// request, its encoding, the audit payload, the grant key) is done on the caller's thread, so
/// that the one writer does only what needs the database.
struct Incoming {
    held: HeldRequest,
    body: Vec<u8>,
    id: String,
    user: String,
    action_key: String,
    /// [`ahead_key`]: a grant made by approving a request asked ahead covers this one too.
    ahead_key: String,
    payload: serde_json::Value,
    /// [`Route::owners`].
    owners: Vec<String>,
    host_cap: u32,
    account_cap: u32,
}

impl Incoming {
    fn new(host: &Hello, route: &Route, mut req: ActionRequest, limits: &Limits) -> Self {
        let now = now_ms();
        // A request that waits until someone decides has no deadline at all (the pending caps
        // bound how many there are); any other is clamped.
        req.deadline_unix_ms = if req.wait {
            0
        } else {
            req.deadline_unix_ms
                .min(now.saturating_add(limits.max_deadline_ms()))
        };
        let user = req
            .process
            .as_ref()
            .map(|p| p.user.clone())
            .unwrap_or_default();
        // Named by the executable the kernel ran, not argv[0], which the caller chooses.
        let action = crate::display::action_line(req.action.as_ref());
        let payload =
            json!({"host": host.hostname, "user": user, "rule": req.rule, "action": action});
        let held = HeldRequest {
            request: Some(req),
            host_id: host.host_id.clone(),
            hostname: host.hostname.clone(),
            state: RequestState::Pending as i32,
            received_unix_ms: now,
            quorum: route.quorum,
            approver_groups: route.groups.clone(),
            host_labels: host.labels.clone(),
            reason_required: route.require_reason,
            deny_needs_quorum: route.deny_needs_quorum,
            route: route.rule.clone(),
            ..Default::default()
        };
        Self {
            body: held.encode_to_vec(),
            id: id_of(&held).to_owned(),
            action_key: grant_key(&held).2,
            ahead_key: ahead_key(&held),
            held,
            user,
            payload,
            owners: route.owners.clone(),
            host_cap: limits.max_pending_per_host,
            account_cap: limits.max_pending_per_account,
        }
    }
}

impl Tx {
    /// The request `id`, if stored.
    pub async fn load(&mut self, id: &str) -> Result<Option<HeldRequest>, StoreError> {
        self.row("SELECT body FROM requests WHERE id = $1", args![id])
            .await?
            .map(|r| r.message(0))
            .transpose()
    }

    /// The request `id`, which must still be pending.
    async fn load_pending(&mut self, id: &str) -> Result<HeldRequest, StoreError> {
        let held = self
            .load(id)
            .await?
            .ok_or_else(|| StoreError::NotFound(id.to_owned()))?;
        if held.state() != RequestState::Pending {
            return Err(StoreError::NotPending {
                id: id.to_owned(),
                state: state_name(held.state()),
            });
        }
        Ok(held)
    }

    /// Records `action` on `held` in the audit trail, then writes it (inserting it when it is
    /// new: its position in the trail becomes its position in lists).
    async fn save(
        &mut self,
        held: &HeldRequest,
        actor: &str,
        action: &str,
        payload: &str,
        insert: bool,
    ) -> Result<(), StoreError> {
        self.save_encoded(held, &held.encode_to_vec(), actor, action, payload, insert)
            .await
    }

    /// [`Tx::save`] with `held` already encoded as `body`.
    async fn save_encoded(
        &mut self,
        held: &HeldRequest,
        body: &[u8],
        actor: &str,
        action: &str,
        payload: &str,
        insert: bool,
    ) -> Result<(), StoreError> {
        let id = id_of(held).to_owned();
        let seq = self
            .audit(actor, action, &id, payload, Some(held.clone()))
            .await?;
        if insert {
            let req = held.request.clone().unwrap_or_default();
            self.exec(
                "INSERT INTO requests (id, seq, state, deadline_ms, host_id, hostname, account,
                 rule, received_ms, decided_ms, body)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
                args![
                    &id,
                    seq,
                    held.state,
                    crate::types::deadline_ms(&req),
                    &held.host_id,
                    &held.hostname,
                    grant_key(held).1,
                    &req.rule,
                    held.received_unix_ms,
                    held.decided_unix_ms,
                    body.to_vec()
                ],
            )
            .await?;
        } else {
            self.exec(
                "UPDATE requests SET state = $2, decided_ms = $3, body = $4 WHERE id = $1",
                args![&id, held.state, held.decided_unix_ms, body.to_vec()],
            )
            .await?;
        }
        Ok(())
    }

    async fn receive(&mut self, new: &Incoming) -> Result<(HeldRequest, bool), StoreError> {
        let (id, host_id, user) = (&new.id, new.held.host_id.as_str(), new.user.as_str());
        let (host_cap, account_cap) = (new.host_cap, new.account_cap);
        // One round trip: the request if it exists, the pending counts (up to the caps) and a
        // grant that covers it. (`state = 1`, pending, is written out: the partial indexes of
        // pending requests serve only a query that names it.)
        // The caps are written into the statement (they are numbers from the configuration):
        // SQLite prepares a statement again whenever a bound LIMIT changes its plan's estimates.
        let sql = format!(
            "SELECT (SELECT body FROM requests WHERE id = $1),
               (SELECT COUNT(*) FROM (SELECT 1 FROM requests WHERE state = 1 AND host_id = $2
                  LIMIT {host_cap}) h),
               (SELECT COUNT(*) FROM (SELECT 1 FROM requests WHERE state = 1 AND account = $3
                  LIMIT {account_cap}) a),
               (SELECT body FROM grants WHERE host_id = $2 AND account = $3
                  AND action IN ($4, $6) AND revoked_ms IS NULL AND expires_ms > $5
                  ORDER BY expires_ms DESC LIMIT 1)"
        );
        let row = self
            .row(
                &sql,
                args![
                    id,
                    host_id,
                    user,
                    &new.action_key,
                    new.held.received_unix_ms,
                    &new.ahead_key
                ],
            )
            .await?
            .ok_or_else(|| StoreError::Corrupt("a query gave no row".into()))?;
        if let Some(Cell::Blob(_)) = row.0.first() {
            let existing: HeldRequest = row.message(0)?;
            // A resend is the same action from the same host; anything else reusing the id
            // must not receive that request's decision.
            let req = new.held.request.as_ref();
            let same = existing.host_id == host_id
                && existing.request.as_ref().map(|r| &r.action) == req.map(|r| &r.action);
            if !same {
                return Err(StoreError::IdConflict {
                    id: id.clone(),
                    host: host_id.to_owned(),
                });
            }
            return Ok((existing, false));
        }
        if let Some(local) = new.held.request.as_ref().and_then(|r| r.decided.as_ref()) {
            return self.record_local(new, local).await;
        }
        if row.int(1)? >= i64::from(host_cap) {
            return Err(StoreError::Limit(format!(
                "host {host_id} already has {host_cap} requests pending \
                 (limits.max_pending_per_host)"
            )));
        }
        if row.int(2)? >= i64::from(account_cap) {
            return Err(StoreError::Limit(format!(
                "account {user:?} already has {account_cap} requests pending \
                 (limits.max_pending_per_account)"
            )));
        }
        let grant = match row.0.get(3) {
            Some(Cell::Blob(_)) => Some(row.message::<Grant>(3)?),
            _ => None,
        }
        .filter(|g| !granted_by_requester(g, &new.held, &new.owners) && ahead_env_ok(g, &new.held));
        let Some(g) = grant else {
            self.save_encoded(
                &new.held,
                &new.body,
                host_id,
                "request.received",
                &new.payload.to_string(),
                true,
            )
            .await?;
            return Ok((new.held.clone(), true));
        };
        let mut held = new.held.clone();
        held.state = RequestState::Approved as i32;
        held.decided_by = format!("grant {} ({})", g.id, g.created_by);
        held.reason = format!("covered by grant {} until {}", g.id, g.expires_unix_ms);
        held.decided_unix_ms = held.received_unix_ms;
        held.grant_id = g.id.clone();
        let mut payload = new.payload.clone();
        payload["grant"] = json!(g.id);
        self.save(
            &held,
            host_id,
            "request.approved.grant",
            &payload.to_string(),
            true,
        )
        .await?;
        Ok((held, true))
    }

    /// Records an action the agent already decided itself (a refusal it had to make, such as
    /// a traced task): stored decided, never pending, so no cap, grant or vote applies to it.
    async fn record_local(
        &mut self,
        new: &Incoming,
        local: &LocalDecision,
    ) -> Result<(HeldRequest, bool), StoreError> {
        let allowed = local.verdict() == Verdict::Allow;
        // Observe mode: the action ran; what enforcement would have done is kept apart, never
        // as an approval.
        let observed = local.cause == "observe";
        let mut held = new.held.clone();
        held.state = if observed {
            RequestState::Observed
        } else if allowed {
            RequestState::Approved
        } else {
            RequestState::Denied
        } as i32;
        held.decided_by = format!("agent ({})", local.cause);
        held.reason = local.reason.clone();
        held.decided_unix_ms = held.received_unix_ms;
        let mut payload = new.payload.clone();
        payload["cause"] = json!(local.cause);
        let action = if observed {
            payload["would_be"] = json!(local.would_be);
            "request.observed"
        } else if allowed {
            "request.allowed.agent"
        } else {
            "request.refused.agent"
        };
        self.save(&held, &held.host_id, action, &payload.to_string(), true)
            .await?;
        Ok((held, true))
    }

    #[allow(clippy::too_many_arguments)]
    async fn vote<E>(
        &mut self,
        id: &str,
        approver: &str,
        verdict: Verdict,
        reason: &str,
        grant_minutes: u32,
        check: &(dyn Fn(&HeldRequest) -> Result<(), E> + Send + Sync),
    ) -> Result<Result<(HeldRequest, bool), E>, StoreError> {
        // One person, one vote, whatever name they use: checked and written in this one
        // transaction, and the key of `votes` refuses a second row for the person anyway.
        let me = person(approver);
        let row = self
            .row(
                "SELECT (SELECT body FROM requests WHERE id = $1),
                   (SELECT approver FROM votes WHERE request_id = $1 AND person = $2)",
                args![id, &me],
            )
            .await?
            .ok_or_else(|| StoreError::Corrupt("a query gave no row".into()))?;
        if !matches!(row.0.first(), Some(Cell::Blob(_))) {
            return Err(StoreError::NotFound(id.to_owned()));
        }
        let mut held: HeldRequest = row.message(0)?;
        if held.state() != RequestState::Pending {
            return Err(StoreError::NotPending {
                id: id.to_owned(),
                state: state_name(held.state()),
            });
        }
        let at = now_ms();
        let deadline = held
            .request
            .as_ref()
            .map_or(i64::MAX, crate::types::deadline_ms);
        if at >= deadline {
            return Err(StoreError::PastDeadline { id: id.to_owned() });
        }
        let voted = matches!(row.0.get(1), Some(Cell::Text(_)));
        if voted || held.votes.iter().any(|v| person(&v.approver) == me) {
            return Err(StoreError::AlreadyVoted {
                id: id.to_owned(),
                approver: approver.to_owned(),
            });
        }
        if let Err(refused) = check(&held) {
            return Ok(Err(refused));
        }
        held.votes.push(Vote {
            approver: approver.to_owned(),
            verdict: verdict as i32,
            reason: reason.to_owned(),
            at_unix_ms: at,
            grant_minutes: if verdict == Verdict::Allow {
                grant_minutes.min(MAX_GRANT_MINUTES)
            } else {
                0
            },
        });
        let voters = |allow: bool| -> Vec<&Vote> {
            held.votes
                .iter()
                .filter(|v| (v.verdict == Verdict::Allow as i32) == allow)
                .collect()
        };
        let (approvals, denials) = (voters(true), voters(false));
        let names = |vs: &[&Vote]| -> String {
            vs.iter()
                .map(|v| v.approver.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        };
        let reasons = |vs: &[&Vote]| -> String {
            vs.iter()
                .map(|v| v.reason.as_str())
                .filter(|r| !r.is_empty())
                .collect::<Vec<_>>()
                .join("; ")
        };
        let quorum = held.quorum.max(1) as usize;
        let outcome = if verdict != Verdict::Allow && !held.deny_needs_quorum {
            Some((RequestState::Denied, approver.to_owned(), reason.to_owned()))
        } else if verdict != Verdict::Allow {
            (denials.len() >= quorum)
                .then(|| (RequestState::Denied, names(&denials), reasons(&denials)))
        } else if approvals.len() >= quorum {
            let all: Vec<&Vote> = held.votes.iter().collect();
            Some((RequestState::Approved, names(&approvals), reasons(&all)))
        } else {
            None
        };
        let minutes = approvals.iter().map(|v| v.grant_minutes).min().unwrap_or(0);
        let decided = outcome.is_some();
        let mut grant = None;
        if let Some((state, by, why)) = outcome {
            held.state = state as i32;
            held.decided_by = by;
            held.reason = why;
            held.decided_unix_ms = at;
            // A request asked ahead is approved as a grant: its whole point is that the real
            // action then passes at once. The approver's window wins if they gave one.
            // The window: the shortest any approver chose; none chose one ("this once"): what
            // the AI agent asked for, at most MAX_AHEAD_MINUTES.
            let ahead = held.request.as_ref().filter(|r| r.asked_ahead);
            let minutes = match ahead {
                Some(r) => approvals
                    .iter()
                    .map(|v| v.grant_minutes)
                    .filter(|m| *m > 0)
                    .min()
                    .unwrap_or_else(|| r.ahead_minutes.clamp(1, MAX_AHEAD_MINUTES)),
                None => minutes,
            };
            if state == RequestState::Approved && minutes > 0 {
                let (host_id, account, mut action) = grant_key(&held);
                let mut env_names = Vec::new();
                if let Some(r) = ahead {
                    action = ahead_key(&held);
                    env_names = r
                        .process
                        .as_ref()
                        .map(|p| p.env.iter().map(|e| e.name.clone()).collect())
                        .unwrap_or_default();
                }
                let g = Grant {
                    id: format!(
                        "g-{}",
                        random_hex(6).map_err(|e| StoreError::Random(e.to_string()))?
                    ),
                    host_id,
                    account,
                    action,
                    request_id: id.to_owned(),
                    created_by: held.decided_by.clone(),
                    created_unix_ms: at,
                    expires_unix_ms: at + i64::from(minutes) * 60_000,
                    asked_ahead: ahead.is_some(),
                    env_names,
                    ..Default::default()
                };
                held.grant_id = g.id.clone();
                grant = Some(g);
            }
        }
        self.exec(
            "INSERT INTO votes (request_id, person, approver, verdict, at_ms)
             VALUES ($1, $2, $3, $4, $5)",
            args![id, &me, approver, verdict as i32, at],
        )
        .await?;
        let action = match verdict {
            Verdict::Allow => "request.vote.approve",
            _ => "request.vote.deny",
        };
        let payload =
            json!({"reason": reason, "decided": decided, "state": state_name(held.state())});
        self.save(&held, approver, action, &payload.to_string(), false)
            .await?;
        if let Some(g) = grant {
            self.exec(
                "INSERT INTO grants (id, host_id, account, action, body, expires_ms, created_ms)
                 VALUES ($1, $2, $3, $4, $5, $6, $7)",
                args![
                    &g.id,
                    &g.host_id,
                    &g.account,
                    &g.action,
                    g.encode_to_vec(),
                    g.expires_unix_ms,
                    at
                ],
            )
            .await?;
            let payload = json!({
                "grant": g.id, "action": g.action, "account": g.account,
                "expires_ms": g.expires_unix_ms,
            });
            self.audit(
                approver,
                "grant.created",
                id,
                &payload.to_string(),
                Some(held.clone()),
            )
            .await?;
        }
        Ok(Ok((held, decided)))
    }
}

fn page_of(rows: Vec<Row>, limit: usize) -> Result<(Vec<HeldRequest>, String), StoreError> {
    let more = rows.len() > limit;
    let mut out = Vec::with_capacity(rows.len().min(limit));
    let mut last = 0;
    for r in rows.iter().take(limit) {
        last = r.int(0)?;
        out.push(r.message(1)?);
    }
    Ok((
        out,
        if more {
            last.to_string()
        } else {
            String::new()
        },
    ))
}

impl Store {
    /// Records a request from agent `host`. A request with a known id is the same request
    /// (resent after a reconnect): the stored one is returned and nothing changes. `route`
    /// (from the approval policy) fixes who may vote and how many must agree; `limits` caps
    /// the pending requests of the host and of the account, and the deadline. Returns the
    /// request and whether it is new.
    pub async fn receive(
        &self,
        host: &Hello,
        route: &Route,
        req: ActionRequest,
        limits: &Limits,
    ) -> Result<(HeldRequest, bool), StoreError> {
        let new = Arc::new(Incoming::new(host, route, req, limits));
        self.write(move |tx| {
            let new = new.clone();
            Box::pin(async move { tx.receive(&new).await })
        })
        .await
    }

    /// Records a vote on a pending request, refused when the same person (under any of their
    /// names) already voted or the deadline has passed. A deny decides at once (unless the rule
    /// wants a quorum of denials); approvals decide when `quorum` distinct people agree.
    /// Returns the request and whether it is now decided.
    ///
    /// `grant_minutes` with an approval: the approver agrees to approve the same action, host
    /// and account for that long. When the request is approved and every approver agreed, a
    /// grant for the shortest window is created in the same transaction.
    pub async fn vote(
        &self,
        id: &str,
        approver: &str,
        verdict: Verdict,
        reason: &str,
        grant_minutes: u32,
    ) -> Result<(HeldRequest, bool), StoreError> {
        let no_check = |_: &HeldRequest| Ok::<(), std::convert::Infallible>(());
        match self
            .vote_checked(id, approver, verdict, reason, grant_minutes, no_check)
            .await?
        {
            Ok(v) => Ok(v),
            Err(never) => match never {},
        }
    }

    /// [`Store::vote`], refused also by `check` (which sees the request in the vote's
    /// transaction, after the store's own checks): its error comes back as the inner `Err`,
    /// and nothing is written.
    #[allow(clippy::too_many_arguments)]
    pub async fn vote_checked<E, F>(
        &self,
        id: &str,
        approver: &str,
        verdict: Verdict,
        reason: &str,
        grant_minutes: u32,
        check: F,
    ) -> Result<Result<(HeldRequest, bool), E>, StoreError>
    where
        F: Fn(&HeldRequest) -> Result<(), E> + Send + Sync + 'static,
        E: Send + 'static,
    {
        let (id, approver, reason) = (id.to_owned(), approver.to_owned(), reason.to_owned());
        let check = Arc::new(check);
        self.write(move |tx| {
            let (id, approver, reason, check) =
                (id.clone(), approver.clone(), reason.clone(), check.clone());
            Box::pin(async move {
                tx.vote(&id, &approver, verdict, &reason, grant_minutes, &*check)
                    .await
            })
        })
        .await
    }

    /// Withdraws a pending request (the agent is told to deny it).
    pub async fn cancel(
        &self,
        id: &str,
        by: &str,
        reason: &str,
    ) -> Result<HeldRequest, StoreError> {
        let (id, by, reason) = (id.to_owned(), by.to_owned(), reason.to_owned());
        self.write(move |tx| {
            let (id, by, reason) = (id.clone(), by.clone(), reason.clone());
            Box::pin(async move {
                let mut held = tx.load_pending(&id).await?;
                held.state = RequestState::Cancelled as i32;
                held.decided_by = by.clone();
                held.reason = format!("cancelled: {reason}");
                held.decided_unix_ms = now_ms();
                let payload = json!({ "reason": reason }).to_string();
                tx.save(&held, &by, "request.cancelled", &payload, false)
                    .await?;
                Ok(held)
            })
        })
        .await
    }

    /// Marks pending requests whose deadline is at or before `now` as expired (the agent
    /// applies the on-timeout action itself), at most a few hundred at a time; returns them.
    /// Every replica calls this; each request expires once.
    pub async fn expire_due(&self, now: i64) -> Result<Vec<HeldRequest>, StoreError> {
        self.write(move |tx| {
            Box::pin(async move {
                let due = tx
                    .rows(
                        "SELECT body FROM requests WHERE state = 1 AND deadline_ms <= $1
                         ORDER BY deadline_ms LIMIT $2",
                        args![now, EXPIRE_BATCH],
                    )
                    .await?;
                let mut expired = Vec::with_capacity(due.len());
                for r in &due {
                    let mut held: HeldRequest = r.message(0)?;
                    held.state = RequestState::Expired as i32;
                    held.decided_unix_ms = now;
                    tx.save(&held, "server", "request.expired", "{}", false)
                        .await?;
                    expired.push(held);
                }
                Ok(expired)
            })
        })
        .await
    }

    /// Appends an outcome that agent `host_id` reported. Only the host that made the request
    /// may report on it, and at most `max` times.
    pub async fn record_outcome(
        &self,
        host_id: &str,
        outcome: Outcome,
        max: u32,
    ) -> Result<(), StoreError> {
        let host_id = host_id.to_owned();
        self.write(move |tx| {
            let (host_id, outcome) = (host_id.clone(), outcome.clone());
            Box::pin(async move {
                let id = outcome.request_id.clone();
                let mut held = tx
                    .load(&id)
                    .await?
                    .ok_or_else(|| StoreError::NotFound(id.clone()))?;
                if held.host_id != host_id {
                    return Err(StoreError::Limit(format!(
                        "an outcome for request {id:?} came from host {host_id}, not from the \
                         request's own host; ignored"
                    )));
                }
                if held.outcomes.len() >= max as usize {
                    return Err(StoreError::Limit(format!(
                        "request {id:?} already has {max} outcomes \
                         (limits.max_outcomes_per_request); ignored"
                    )));
                }
                let payload = json!({
                    "kind": outcome.kind, "applied": outcome.applied, "cause": outcome.cause,
                    "exit_code": outcome.exit_code, "signal": outcome.signal,
                })
                .to_string();
                held.outcomes.push(outcome);
                tx.save(&held, &host_id, "request.outcome", &payload, false)
                    .await
            })
        })
        .await
    }

    /// One request.
    pub async fn get(&self, id: &str) -> Result<HeldRequest, StoreError> {
        let id = id.to_owned();
        self.read(move |tx| {
            let id = id.clone();
            Box::pin(async move {
                tx.load(&id)
                    .await?
                    .ok_or_else(|| StoreError::NotFound(id.clone()))
            })
        })
        .await
    }

    /// Requests matching `q` (state, host id, account), newest first, one page of at most
    /// `max` (and `q.limit`, [`DEFAULT_LIST`] when 0), and the token of the next page ("" when
    /// this is the last).
    pub async fn list(
        &self,
        q: &ListRequestsRequest,
        max: u32,
    ) -> Result<(Vec<HeldRequest>, String), StoreError> {
        let limit = match q.limit {
            0 => DEFAULT_LIST,
            n => n,
        }
        .min(max.max(1));
        let mut w = Where::new();
        if q.state == RequestState::Pending as i32 {
            // Written out, so that the partial indexes of pending requests serve it.
            w.sql.push_str(" AND state = 1");
        } else if q.state != 0 {
            w.and("state = ?", q.state);
        }
        if !q.host_id.is_empty() {
            w.and("host_id = ?", &q.host_id);
        }
        if !q.account.is_empty() {
            w.and("account = ?", &q.account);
        }
        if !q.page_token.is_empty() {
            let before: i64 = q
                .page_token
                .parse()
                .map_err(|_| StoreError::BadPageToken(q.page_token.clone()))?;
            w.and("seq < ?", before);
        }
        self.page(w, limit).await
    }

    async fn page(&self, w: Where, limit: u32) -> Result<(Vec<HeldRequest>, String), StoreError> {
        let sql = format!(
            "SELECT seq, body FROM requests{} ORDER BY seq DESC LIMIT {}",
            w.sql,
            limit + 1
        );
        let args = w.args;
        self.read(move |tx| {
            let (sql, args) = (sql.clone(), args.clone());
            Box::pin(async move { page_of(tx.rows(&sql, &args).await?, limit as usize) })
        })
        .await
    }

    /// Requests matching the history filter `f`, newest first: one page of at most `limit`
    /// before the page token `page` ("" for the newest), and the next page's token.
    pub async fn history(
        &self,
        f: &History,
        page: &str,
        limit: u32,
    ) -> Result<(Vec<HeldRequest>, String), StoreError> {
        let mut w = Where::new();
        let host = f.host.trim();
        if !host.is_empty() {
            w.and("(hostname = ? OR host_id = ?)", host);
        }
        if !f.account.trim().is_empty() {
            w.and("account = ?", f.account.trim());
        }
        if !f.rule.trim().is_empty() {
            w.and("rule = ?", f.rule.trim());
        }
        if f.state == RequestState::Pending as i32 {
            w.sql.push_str(" AND state = 1");
        } else if f.state != 0 {
            w.and("state = ?", f.state);
        }
        if !f.approver.trim().is_empty() {
            w.and(
                "EXISTS (SELECT 1 FROM votes v WHERE v.request_id = requests.id AND v.approver = ?)",
                f.approver.trim(),
            );
        }
        if let Some(t) = f.from_ms {
            w.and("received_ms >= ?", t);
        }
        if let Some(t) = f.to_ms {
            w.and("received_ms < ?", t);
        }
        if !page.is_empty() {
            let before: i64 = page
                .parse()
                .map_err(|_| StoreError::BadPageToken(page.to_owned()))?;
            w.and("seq < ?", before);
        }
        self.page(w, limit.max(1)).await
    }

    /// How many requests are pending.
    pub async fn count_pending(&self) -> Result<i64, StoreError> {
        self.read(|tx| {
            Box::pin(async move {
                tx.row("SELECT COUNT(*) FROM requests WHERE state = 1", &[])
                    .await?
                    .map_or(Ok(0), |r| r.int(0))
            })
        })
        .await
    }

    /// Grants, newest first; only active ones unless `all`.
    pub async fn list_grants(&self, all: bool) -> Result<Vec<Grant>, StoreError> {
        self.read(move |tx| {
            Box::pin(async move {
                tx.rows(
                    "SELECT body FROM grants WHERE $1 = 1 OR (revoked_ms IS NULL AND expires_ms > $2)
                     ORDER BY created_ms DESC, id DESC",
                    args![all, now_ms()],
                )
                .await?
                .iter()
                .map(|r| r.message(0))
                .collect()
            })
        })
        .await
    }

    /// Ends grant `id` now.
    pub async fn revoke_grant(&self, id: &str, by: &str) -> Result<Grant, StoreError> {
        let (id, by) = (id.to_owned(), by.to_owned());
        self.write(move |tx| {
            let (id, by) = (id.clone(), by.clone());
            Box::pin(async move {
                let mut g: Grant = tx
                    .row(
                        "SELECT body FROM grants WHERE id = $1 AND revoked_ms IS NULL",
                        args![&id],
                    )
                    .await?
                    .ok_or_else(|| StoreError::NotFound(id.clone()))?
                    .message(0)?;
                let now = now_ms();
                g.revoked_unix_ms = now;
                g.revoked_by = by.clone();
                tx.exec(
                    "UPDATE grants SET revoked_ms = $2, body = $3 WHERE id = $1",
                    args![&id, now, g.encode_to_vec()],
                )
                .await?;
                let payload = json!({ "grant": id }).to_string();
                tx.audit(&by, "grant.revoked", &g.request_id, &payload, None)
                    .await?;
                Ok(g)
            })
        })
        .await
    }
}
