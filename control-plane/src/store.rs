//! Held requests and their lifecycle (pending, then approved, denied or expired), stored durably
//! in SQLite (WAL) with every change appended to the hash-chained audit trail in the same
//! transaction, and a change feed for watchers.
//!
//! A request is committed before watchers hear of it; a decision is committed before the agent
//! is told.

use std::{
    path::{Path, PathBuf},
    sync::Mutex,
    time::{SystemTime, UNIX_EPOCH},
};

use airlock_proto::v1::{
    action_request::Action, ActionRequest, Grant, HeldRequest, Hello, ListRequestsRequest, Outcome,
    RequestState, Verdict, Vote,
};
use prost::Message;
use rusqlite::{params, Connection, OptionalExtension};
use serde_json::json;
use tokio::sync::broadcast;

use crate::{
    audit,
    auth::{self, Principal, Scope},
    policy::Route,
};

/// Why a store operation was refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// No request has this id.
    #[error("no request with id {0:?}")]
    NotFound(String),
    /// The request was already decided or expired.
    #[error("request {id:?} is no longer pending (it is {state})")]
    NotPending {
        /// The request.
        id: String,
        /// Its state.
        state: &'static str,
    },
    /// The database failed.
    #[error("database {path}: {source}")]
    Db {
        /// The database file.
        path: String,
        /// Cause.
        source: rusqlite::Error,
    },
    /// The same person voted twice.
    #[error("{approver} has already voted on request {id:?}; a second vote does not count")]
    AlreadyVoted {
        /// The request.
        id: String,
        /// Who.
        approver: String,
    },
    /// A page token that no list call produced.
    #[error("page token {0:?} is not valid; pass the next_page_token of a previous answer")]
    BadPageToken(String),
    /// A token name is taken.
    #[error("a token named {0:?} already exists")]
    TokenExists(String),
    /// The system random source failed.
    #[error("cannot read random bytes: {0}")]
    Random(String),
    /// Scope `enroll` asked of [`Store::create_token`]: enrollment tokens are one-time, expire
    /// and live apart from bearer tokens ([`crate::enroll::create`]).
    #[error("scope enroll makes a one-time enrollment token, not a bearer token")]
    NotBearerScope,
    /// A request id already names another host's request or another action.
    #[error("request id {id:?} from {host} is already used by a different request; refused")]
    IdConflict {
        /// The id.
        id: String,
        /// The host that sent it.
        host: String,
    },
    /// A stored request could not be decoded.
    #[error("stored request {0:?} is corrupt")]
    Corrupt(String),
}

/// Longest grant, minutes.
pub const MAX_GRANT_MINUTES: u32 = 24 * 60;

/// What a grant covers of a request: the host, the account, and exactly this action.
pub fn grant_key(held: &HeldRequest) -> (String, String, String) {
    let req = held.request.clone().unwrap_or_default();
    let account = req.process.map(|p| p.user).unwrap_or_default();
    let action = match req.action {
        Some(Action::Exec(e)) => format!("exec {} {}", e.path, e.argv.join("\u{1f}")),
        Some(Action::Connect(c)) => format!("connect {} {} {}", c.address, c.port, c.protocol),
        None => String::new(),
    };
    (held.host_id.clone(), account, action)
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// Human name of a state.
pub fn state_name(s: RequestState) -> &'static str {
    match s {
        RequestState::Pending => "pending",
        RequestState::Approved => "approved",
        RequestState::Denied => "denied",
        RequestState::Expired => "expired",
        RequestState::Cancelled => "cancelled",
        RequestState::Unspecified => "unknown",
    }
}

const SCHEMA: &str = "CREATE TABLE IF NOT EXISTS requests (
    id TEXT PRIMARY KEY,
    seq INTEGER NOT NULL,
    state INTEGER NOT NULL,
    deadline_ms INTEGER NOT NULL,
    host_id TEXT NOT NULL,
    account TEXT NOT NULL,
    body BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS requests_state ON requests (state, deadline_ms);
CREATE TABLE IF NOT EXISTS grants (
    id TEXT PRIMARY KEY,
    host_id TEXT NOT NULL,
    account TEXT NOT NULL,
    action TEXT NOT NULL,
    body BLOB NOT NULL,
    expires_ms INTEGER NOT NULL,
    revoked_ms INTEGER
);
CREATE INDEX IF NOT EXISTS grants_match ON grants (host_id, account, action);
CREATE TABLE IF NOT EXISTS agents (
    host_id TEXT PRIMARY KEY,
    body BLOB NOT NULL,
    first_seen_ms INTEGER NOT NULL,
    last_seen_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS tokens (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    scope TEXT NOT NULL,
    hash TEXT NOT NULL,
    created_ms INTEGER NOT NULL,
    revoked_ms INTEGER
);";

/// One change to a request, as watchers and notifiers hear of it.
#[derive(Debug, Clone)]
pub struct Change {
    /// The audit action that recorded it: `request.received`, `request.vote.approve`,
    /// `request.vote.deny`, `request.approved.grant`, `request.cancelled`, `request.expired`
    /// or `request.outcome`.
    pub action: String,
    /// The request after the change.
    pub held: HeldRequest,
}

/// The request store.
pub struct Store {
    conn: Mutex<Connection>,
    path: String,
    checkpoint: Option<PathBuf>,
    changes: broadcast::Sender<Change>,
}

impl Store {
    /// Opens (creating if needed) the database file `path`; the audit checkpoint lives beside it.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let conn = Connection::open(path).map_err(|source| StoreError::Db {
            path: path.display().to_string(),
            source,
        })?;
        Self::init(
            conn,
            path.display().to_string(),
            Some(audit::checkpoint_path(path)),
        )
    }

    /// A database in memory (tests).
    pub fn in_memory() -> Result<Self, StoreError> {
        let conn = Connection::open_in_memory().map_err(|source| StoreError::Db {
            path: ":memory:".into(),
            source,
        })?;
        Self::init(conn, ":memory:".into(), None)
    }

    fn init(
        conn: Connection,
        path: String,
        checkpoint: Option<PathBuf>,
    ) -> Result<Self, StoreError> {
        let db = |source| StoreError::Db {
            path: path.clone(),
            source,
        };
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(db)?;
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(db)?;
        conn.execute_batch(SCHEMA).map_err(db)?;
        conn.execute_batch(audit::SCHEMA).map_err(db)?;
        conn.execute_batch(crate::accounts::SCHEMA).map_err(db)?;
        conn.execute_batch(crate::enroll::SCHEMA).map_err(db)?;
        conn.execute_batch(crate::notify::SCHEMA).map_err(db)?;
        conn.execute_batch(crate::web::session::SCHEMA)
            .map_err(db)?;
        Ok(Self {
            conn: Mutex::new(conn),
            path,
            checkpoint,
            changes: broadcast::channel(1024).0,
        })
    }

    fn db(&self) -> impl Fn(rusqlite::Error) -> StoreError + '_ {
        move |source| StoreError::Db {
            path: self.path.clone(),
            source,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Every change from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Change> {
        self.changes.subscribe()
    }

    /// Runs `f` on the database connection: for the modules that keep their own tables
    /// (accounts, sessions, notification deliveries) beside the requests.
    pub fn with_conn<T>(
        &self,
        f: impl FnOnce(&mut Connection) -> rusqlite::Result<T>,
    ) -> Result<T, StoreError> {
        let mut conn = self.lock();
        f(&mut conn).map_err(self.db())
    }

    /// Appends an audit record in the transaction `tx` (for modules that change their own
    /// tables), returning it so that [`Store::checkpointed`] can advance the checkpoint
    /// once `tx` commits.
    pub fn audit_in(
        tx: &rusqlite::Transaction<'_>,
        actor: &str,
        action: &str,
        subject: &str,
        payload: &str,
    ) -> rusqlite::Result<audit::Record> {
        audit::append(tx, now_ms(), actor, action, subject, payload)
    }

    /// Advances the audit checkpoint to `record`, committed by the caller.
    pub fn checkpointed(&self, record: &audit::Record) {
        self.checkpoint(record);
    }

    fn load(conn: &Connection, id: &str) -> Result<Option<HeldRequest>, rusqlite::Error> {
        let body: Option<Vec<u8>> = conn
            .query_row("SELECT body FROM requests WHERE id = ?1", [id], |r| {
                r.get(0)
            })
            .optional()?;
        Ok(body.and_then(|b| HeldRequest::decode(b.as_slice()).ok()))
    }

    /// Grants, newest first; only active ones unless `all`.
    pub fn list_grants(&self, all: bool) -> Result<Vec<Grant>, StoreError> {
        let conn = self.lock();
        let mut stmt = conn
            .prepare(
                "SELECT body, revoked_ms FROM grants
                 WHERE ?1 OR (revoked_ms IS NULL AND expires_ms > ?2) ORDER BY rowid DESC",
            )
            .map_err(self.db())?;
        let rows = stmt
            .query_map(params![all, now_ms()], |r| {
                Ok((r.get::<_, Vec<u8>>(0)?, r.get::<_, Option<i64>>(1)?))
            })
            .map_err(self.db())?;
        let mut out = Vec::new();
        for row in rows {
            let (body, _) = row.map_err(self.db())?;
            if let Ok(g) = Grant::decode(body.as_slice()) {
                out.push(g);
            }
        }
        Ok(out)
    }

    /// Ends grant `id` now.
    pub fn revoke_grant(&self, id: &str, by: &str) -> Result<Grant, StoreError> {
        let mut conn = self.lock();
        let tx = conn.transaction().map_err(self.db())?;
        let body: Option<Vec<u8>> = tx
            .query_row(
                "SELECT body FROM grants WHERE id = ?1 AND revoked_ms IS NULL",
                [id],
                |r| r.get(0),
            )
            .optional()
            .map_err(self.db())?;
        let mut g = body
            .and_then(|b| Grant::decode(b.as_slice()).ok())
            .ok_or_else(|| StoreError::NotFound(id.to_owned()))?;
        let now = now_ms();
        g.revoked_unix_ms = now;
        g.revoked_by = by.to_owned();
        tx.execute(
            "UPDATE grants SET revoked_ms = ?2, body = ?3 WHERE id = ?1",
            params![id, now, g.encode_to_vec()],
        )
        .map_err(self.db())?;
        let payload = json!({ "grant": id }).to_string();
        let record = audit::append(&tx, now, by, "grant.revoked", &g.request_id, &payload)
            .map_err(self.db())?;
        tx.commit().map_err(self.db())?;
        self.checkpoint(&record);
        Ok(g)
    }

    /// The request `id`, which must still be pending.
    fn load_pending(&self, conn: &Connection, id: &str) -> Result<HeldRequest, StoreError> {
        let held = Self::load(conn, id)
            .map_err(self.db())?
            .ok_or_else(|| StoreError::NotFound(id.to_owned()))?;
        if held.state() != RequestState::Pending {
            return Err(StoreError::NotPending {
                id: id.to_owned(),
                state: state_name(held.state()),
            });
        }
        Ok(held)
    }

    /// Writes `held` and an audit record in one transaction, then announces the change.
    fn save(
        &self,
        conn: &mut Connection,
        held: &HeldRequest,
        actor: &str,
        action: &str,
        payload: &str,
        insert: bool,
    ) -> Result<(), StoreError> {
        self.save_and(conn, held, actor, action, payload, insert, |_| Ok(None))
    }

    /// Like [`Store::save`], and runs `extra` in the same transaction; a record it appends to
    /// the audit trail comes last and becomes the checkpoint.
    #[allow(clippy::too_many_arguments)]
    fn save_and(
        &self,
        conn: &mut Connection,
        held: &HeldRequest,
        actor: &str,
        action: &str,
        payload: &str,
        insert: bool,
        extra: impl FnOnce(&rusqlite::Transaction<'_>) -> rusqlite::Result<Option<audit::Record>>,
    ) -> Result<(), StoreError> {
        let id = held
            .request
            .as_ref()
            .map(|r| r.request_id.clone())
            .unwrap_or_default();
        let deadline = held
            .request
            .as_ref()
            .map_or(i64::MAX, |r| r.deadline_unix_ms);
        let tx = conn.transaction().map_err(self.db())?;
        if insert {
            let seq: i64 = tx
                .query_row("SELECT COALESCE(MAX(seq), 0) + 1 FROM requests", [], |r| {
                    r.get(0)
                })
                .map_err(self.db())?;
            tx.execute(
                "INSERT INTO requests (id, seq, state, deadline_ms, host_id, account, body)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                params![
                    id,
                    seq,
                    held.state,
                    deadline,
                    held.host_id,
                    grant_key(held).1,
                    held.encode_to_vec()
                ],
            )
            .map_err(self.db())?;
        } else {
            tx.execute(
                "UPDATE requests SET state = ?2, body = ?3 WHERE id = ?1",
                params![id, held.state, held.encode_to_vec()],
            )
            .map_err(self.db())?;
        }
        let record =
            audit::append(&tx, now_ms(), actor, action, &id, payload).map_err(self.db())?;
        let record = extra(&tx).map_err(self.db())?.unwrap_or(record);
        tx.commit().map_err(self.db())?;
        self.checkpoint(&record);
        let _ = self.changes.send(Change {
            action: action.to_owned(),
            held: held.clone(),
        });
        Ok(())
    }

    /// Records a request from agent `host_id`. A request with a known id is the same request
    /// (resent after a reconnect): the stored one is returned and nothing changes.
    /// `route` (from the approval policy) fixes who may vote and how many must agree.
    pub fn receive(
        &self,
        host: &Hello,
        route: &Route,
        req: ActionRequest,
    ) -> Result<(HeldRequest, bool), StoreError> {
        let (host_id, hostname) = (host.host_id.as_str(), host.hostname.as_str());
        let mut conn = self.lock();
        if let Some(existing) = Self::load(&conn, &req.request_id).map_err(self.db())? {
            // A resend is the same action from the same host; anything else reusing the id must
            // not receive that request's decision.
            let same = existing.host_id == host_id
                && existing.request.as_ref().map(|r| &r.action) == Some(&req.action);
            if !same {
                return Err(StoreError::IdConflict {
                    id: req.request_id,
                    host: host_id.to_owned(),
                });
            }
            return Ok((existing, false));
        }
        let argv = match &req.action {
            Some(airlock_proto::v1::action_request::Action::Exec(e)) => e.argv.join(" "),
            Some(airlock_proto::v1::action_request::Action::Connect(c)) => {
                format!("connect {}:{}", c.address, c.port)
            }
            None => String::new(),
        };
        let user = req
            .process
            .as_ref()
            .map(|p| p.user.clone())
            .unwrap_or_default();
        let mut payload = json!({"host": hostname, "user": user, "rule": req.rule, "action": argv});
        let now = now_ms();
        let mut held = HeldRequest {
            request: Some(req),
            host_id: host_id.to_owned(),
            hostname: hostname.to_owned(),
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
        let (gh, ga, gx) = grant_key(&held);
        let grant: Option<Vec<u8>> = conn
            .query_row(
                "SELECT body FROM grants WHERE host_id = ?1 AND account = ?2 AND action = ?3
                 AND revoked_ms IS NULL AND expires_ms > ?4 ORDER BY expires_ms DESC LIMIT 1",
                params![gh, ga, gx, now],
                |r| r.get(0),
            )
            .optional()
            .map_err(self.db())?;
        if let Some(g) = grant.and_then(|b| Grant::decode(b.as_slice()).ok()) {
            held.state = RequestState::Approved as i32;
            held.decided_by = format!("grant {} ({})", g.id, g.created_by);
            held.reason = format!("covered by grant {} until {}", g.id, g.expires_unix_ms);
            held.decided_unix_ms = now;
            held.grant_id = g.id.clone();
            payload["grant"] = json!(g.id);
            self.save(
                &mut conn,
                &held,
                host_id,
                "request.approved.grant",
                &payload.to_string(),
                true,
            )?;
            return Ok((held, true));
        }
        self.save(
            &mut conn,
            &held,
            host_id,
            "request.received",
            &payload.to_string(),
            true,
        )?;
        Ok((held, true))
    }

    /// Records a vote on a pending request. A deny decides at once; approvals decide when
    /// `quorum` distinct approvers agree. Returns the request and whether it is now decided.
    ///
    /// `grant_minutes` with an approval: the approver agrees to approve the same action, host
    /// and account for that long. When the request is approved and every approver agreed, a
    /// grant for the shortest window is created in the same transaction.
    pub fn vote(
        &self,
        id: &str,
        approver: &str,
        verdict: Verdict,
        reason: &str,
        grant_minutes: u32,
    ) -> Result<(HeldRequest, bool), StoreError> {
        let mut conn = self.lock();
        let mut held = self.load_pending(&conn, id)?;
        if held.votes.iter().any(|v| v.approver == approver) {
            return Err(StoreError::AlreadyVoted {
                id: id.to_owned(),
                approver: approver.to_owned(),
            });
        }
        let at = now_ms();
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
        let approvals: Vec<&str> = held
            .votes
            .iter()
            .filter(|v| v.verdict == Verdict::Allow as i32)
            .map(|v| v.approver.as_str())
            .collect();
        let denials: Vec<&str> = held
            .votes
            .iter()
            .filter(|v| v.verdict != Verdict::Allow as i32)
            .map(|v| v.approver.as_str())
            .collect();
        let outcome = if verdict != Verdict::Allow && !held.deny_needs_quorum {
            Some((RequestState::Denied, approver.to_owned(), reason.to_owned()))
        } else if verdict != Verdict::Allow {
            (denials.len() as u32 >= held.quorum.max(1)).then(|| {
                let reasons: Vec<&str> = held
                    .votes
                    .iter()
                    .filter(|v| v.verdict != Verdict::Allow as i32)
                    .map(|v| v.reason.as_str())
                    .collect();
                (RequestState::Denied, denials.join(", "), reasons.join("; "))
            })
        } else if approvals.len() as u32 >= held.quorum.max(1) {
            let reasons: Vec<&str> = held
                .votes
                .iter()
                .map(|v| v.reason.as_str())
                .filter(|r| !r.is_empty())
                .collect();
            Some((
                RequestState::Approved,
                approvals.join(", "),
                reasons.join("; "),
            ))
        } else {
            None
        };
        let decided = outcome.is_some();
        let action = match verdict {
            Verdict::Allow => "request.vote.approve",
            _ => "request.vote.deny",
        };
        let mut grant = None;
        if let Some((state, by, why)) = outcome {
            held.state = state as i32;
            held.decided_by = by;
            held.reason = why;
            held.decided_unix_ms = at;
            let minutes = held
                .votes
                .iter()
                .filter(|v| v.verdict == Verdict::Allow as i32)
                .map(|v| v.grant_minutes)
                .min()
                .unwrap_or(0);
            if state == RequestState::Approved && minutes > 0 {
                let (host_id, account, action) = grant_key(&held);
                let g = Grant {
                    id: format!(
                        "g-{}",
                        auth::random_hex(6).map_err(|e| StoreError::Random(e.to_string()))?
                    ),
                    host_id,
                    account,
                    action,
                    request_id: id.to_owned(),
                    created_by: held.decided_by.clone(),
                    created_unix_ms: at,
                    expires_unix_ms: at + i64::from(minutes) * 60_000,
                    ..Default::default()
                };
                held.grant_id = g.id.clone();
                grant = Some(g);
            }
        }
        let payload =
            json!({"reason": reason, "decided": decided, "state": state_name(held.state())})
                .to_string();
        match grant {
            Some(g) => {
                let tx_payload = json!({
                    "grant": g.id, "action": g.action, "account": g.account,
                    "expires_ms": g.expires_unix_ms,
                })
                .to_string();
                self.save_and(&mut conn, &held, approver, action, &payload, false, |tx| {
                    tx.execute(
                        "INSERT INTO grants (id, host_id, account, action, body, expires_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                        params![g.id, g.host_id, g.account, g.action, g.encode_to_vec(), g.expires_unix_ms],
                    )?;
                    audit::append(tx, at, approver, "grant.created", id, &tx_payload).map(Some)
                })?;
            }
            None => self.save(&mut conn, &held, approver, action, &payload, false)?,
        }
        Ok((held, decided))
    }

    /// Withdraws a pending request (the agent is told to deny it).
    pub fn cancel(&self, id: &str, by: &str, reason: &str) -> Result<HeldRequest, StoreError> {
        let mut conn = self.lock();
        let mut held = self.load_pending(&conn, id)?;
        held.state = RequestState::Cancelled as i32;
        held.decided_by = by.to_owned();
        held.reason = format!("cancelled: {reason}");
        held.decided_unix_ms = now_ms();
        let payload = json!({ "reason": reason }).to_string();
        self.save(&mut conn, &held, by, "request.cancelled", &payload, false)?;
        Ok(held)
    }

    /// Marks pending requests whose deadline has passed as expired (the agent applies the
    /// on-timeout action itself); returns them.
    pub fn expire_due(&self, now: i64) -> Result<Vec<HeldRequest>, StoreError> {
        let mut conn = self.lock();
        let ids: Vec<String> = {
            let mut stmt = conn
                .prepare("SELECT id FROM requests WHERE state = ?1 AND deadline_ms <= ?2")
                .map_err(self.db())?;
            let rows = stmt
                .query_map(params![RequestState::Pending as i32, now], |r| r.get(0))
                .map_err(self.db())?;
            rows.collect::<Result<_, _>>().map_err(self.db())?
        };
        let mut expired = Vec::new();
        for id in ids {
            let Some(mut held) = Self::load(&conn, &id).map_err(self.db())? else {
                continue;
            };
            held.state = RequestState::Expired as i32;
            held.decided_unix_ms = now;
            self.save(&mut conn, &held, "server", "request.expired", "{}", false)?;
            expired.push(held);
        }
        Ok(expired)
    }

    /// Appends an outcome the agent reported.
    pub fn record_outcome(&self, host_id: &str, outcome: Outcome) -> Result<(), StoreError> {
        let mut conn = self.lock();
        let mut held = Self::load(&conn, &outcome.request_id)
            .map_err(self.db())?
            .ok_or_else(|| StoreError::NotFound(outcome.request_id.clone()))?;
        let payload = json!({
            "kind": outcome.kind, "applied": outcome.applied, "cause": outcome.cause,
            "exit_code": outcome.exit_code, "signal": outcome.signal,
        })
        .to_string();
        held.outcomes.push(outcome);
        self.save(
            &mut conn,
            &held,
            host_id,
            "request.outcome",
            &payload,
            false,
        )
    }

    /// One request.
    pub fn get(&self, id: &str) -> Result<HeldRequest, StoreError> {
        Self::load(&self.lock(), id)
            .map_err(self.db())?
            .ok_or_else(|| StoreError::NotFound(id.to_owned()))
    }

    /// Requests, newest first.
    /// Requests matching `q`, newest first, one page, and the token of the next page ("" when
    /// this is the last).
    pub fn list(&self, q: &ListRequestsRequest) -> Result<(Vec<HeldRequest>, String), StoreError> {
        let conn = self.lock();
        let limit = if q.limit == 0 {
            100
        } else {
            i64::from(q.limit)
        };
        let before: i64 = if q.page_token.is_empty() {
            i64::MAX
        } else {
            q.page_token
                .parse()
                .map_err(|_| StoreError::BadPageToken(q.page_token.clone()))?
        };
        let mut stmt = conn
            .prepare(
                "SELECT id, seq, body FROM requests
                 WHERE (?1 = 0 OR state = ?1) AND (?2 = '' OR host_id = ?2)
                   AND (?3 = '' OR account = ?3) AND seq < ?4
                 ORDER BY seq DESC LIMIT ?5",
            )
            .map_err(self.db())?;
        let rows = stmt
            .query_map(
                params![q.state, q.host_id, q.account, before, limit + 1],
                |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, i64>(1)?,
                        r.get::<_, Vec<u8>>(2)?,
                    ))
                },
            )
            .map_err(self.db())?;
        let mut out = Vec::new();
        let mut last_seq = 0;
        let mut more = false;
        for row in rows {
            let (id, seq, body) = row.map_err(self.db())?;
            if out.len() as i64 == limit {
                more = true;
                break;
            }
            out.push(HeldRequest::decode(body.as_slice()).map_err(|_| StoreError::Corrupt(id))?);
            last_seq = seq;
        }
        let next = if more {
            last_seq.to_string()
        } else {
            String::new()
        };
        Ok((out, next))
    }

    /// Creates a token `name` with `scope`; returns the token, which is not stored and cannot
    /// be shown again.
    pub fn create_token(&self, name: &str, scope: Scope) -> Result<String, StoreError> {
        if scope == Scope::Enroll {
            return Err(StoreError::NotBearerScope);
        }
        let id = auth::random_hex(6).map_err(|e| StoreError::Random(e.to_string()))?;
        let token = auth::new_token(&id).map_err(|e| StoreError::Random(e.to_string()))?;
        let mut conn = self.lock();
        let tx = conn.transaction().map_err(self.db())?;
        let taken: bool = tx
            .query_row("SELECT COUNT(*) FROM tokens WHERE name = ?1", [name], |r| {
                r.get::<_, i64>(0)
            })
            .map_err(self.db())?
            > 0;
        if taken {
            return Err(StoreError::TokenExists(name.to_owned()));
        }
        tx.execute(
            "INSERT INTO tokens (id, name, scope, hash, created_ms) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![
                id,
                name,
                scope.to_string(),
                auth::token_hash(&token),
                now_ms()
            ],
        )
        .map_err(self.db())?;
        let payload = json!({"name": name, "scope": scope.to_string()}).to_string();
        let record = audit::append(&tx, now_ms(), "server", "token.created", "", &payload)
            .map_err(self.db())?;
        tx.commit().map_err(self.db())?;
        self.checkpoint(&record);
        Ok(token)
    }

    /// Revokes the token `name`; false if there is none.
    pub fn revoke_token(&self, name: &str) -> Result<bool, StoreError> {
        let mut conn = self.lock();
        let tx = conn.transaction().map_err(self.db())?;
        let n = tx
            .execute(
                "UPDATE tokens SET revoked_ms = ?2 WHERE name = ?1 AND revoked_ms IS NULL",
                params![name, now_ms()],
            )
            .map_err(self.db())?;
        if n == 0 {
            return Ok(false);
        }
        let payload = json!({ "name": name }).to_string();
        let record = audit::append(&tx, now_ms(), "server", "token.revoked", "", &payload)
            .map_err(self.db())?;
        tx.commit().map_err(self.db())?;
        self.checkpoint(&record);
        Ok(true)
    }

    /// Whether any admin token exists (first start creates one).
    pub fn has_admin_token(&self) -> Result<bool, StoreError> {
        let n: i64 = self
            .lock()
            .query_row(
                "SELECT COUNT(*) FROM tokens WHERE scope = 'admin'",
                [],
                |r| r.get(0),
            )
            .map_err(self.db())?;
        Ok(n > 0)
    }

    /// The principal a token stands for; `None` if unknown, malformed or revoked.
    pub fn principal(&self, token: &str) -> Result<Option<Principal>, StoreError> {
        let Some(id) = token.strip_prefix("alk_").and_then(|t| t.split('_').next()) else {
            return Ok(None);
        };
        let row: Option<(String, String, String)> = self
            .lock()
            .query_row(
                "SELECT name, scope, hash FROM tokens WHERE id = ?1 AND revoked_ms IS NULL",
                [id],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .optional()
            .map_err(self.db())?;
        Ok(row.and_then(|(name, scope, hash)| {
            (hash == auth::token_hash(token))
                .then(|| scope.parse().ok().map(|scope| Principal { name, scope }))
                .flatten()
        }))
    }

    fn checkpoint(&self, record: &audit::Record) {
        if let Some(cp) = &self.checkpoint {
            if let Err(e) = audit::write_checkpoint(cp, record) {
                tracing::error!(path = %cp.display(), error = %e, "writing the audit checkpoint failed");
            }
        }
    }

    /// How many requests are pending.
    pub fn count_pending(&self) -> Result<i64, StoreError> {
        self.lock()
            .query_row(
                "SELECT COUNT(*) FROM requests WHERE state = ?1",
                [RequestState::Pending as i32],
                |r| r.get(0),
            )
            .map_err(self.db())
    }

    /// Records that agent `hello` connected (or is still there).
    pub fn agent_seen(&self, hello: &Hello) -> Result<(), StoreError> {
        let now = now_ms();
        self.lock()
            .execute(
                "INSERT INTO agents (host_id, body, first_seen_ms, last_seen_ms) VALUES (?1, ?2, ?3, ?3)
                 ON CONFLICT (host_id) DO UPDATE SET body = ?2, last_seen_ms = ?3",
                params![hello.host_id, hello.encode_to_vec(), now],
            )
            .map_err(self.db())?;
        Ok(())
    }

    /// Every agent ever seen: hello, first and last seen (ms).
    pub fn agents(&self) -> Result<Vec<(Hello, i64, i64)>, StoreError> {
        let conn = self.lock();
        let mut stmt = conn
            .prepare("SELECT body, first_seen_ms, last_seen_ms FROM agents ORDER BY host_id")
            .map_err(self.db())?;
        let rows = stmt
            .query_map([], |r| Ok((r.get::<_, Vec<u8>>(0)?, r.get(1)?, r.get(2)?)))
            .map_err(self.db())?;
        let mut out = Vec::new();
        for row in rows {
            let (body, first, last) = row.map_err(self.db())?;
            if let Ok(h) = Hello::decode(body.as_slice()) {
                out.push((h, first, last));
            }
        }
        Ok(out)
    }

    /// Appends an audit record that concerns no request (policy loads, logins).
    pub fn audit_event(&self, actor: &str, action: &str, payload: &str) -> Result<(), StoreError> {
        let mut conn = self.lock();
        let tx = conn.transaction().map_err(self.db())?;
        let record = audit::append(&tx, now_ms(), actor, action, "", payload).map_err(self.db())?;
        tx.commit().map_err(self.db())?;
        self.checkpoint(&record);
        Ok(())
    }

    /// Audit records matching `f`.
    pub fn audit_query(&self, f: &audit::Filter) -> Result<Vec<audit::Record>, StoreError> {
        audit::query(&self.lock(), f).map_err(self.db())
    }

    /// Verifies the audit chain (and the checkpoint beside the database file).
    pub fn verify_audit(&self) -> Result<i64, audit::Tamper> {
        audit::verify(&self.lock(), self.checkpoint.as_deref())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host() -> Hello {
        Hello {
            host_id: "h".into(),
            hostname: "host".into(),
            ..Default::default()
        }
    }

    fn route(quorum: u32) -> Route {
        Route {
            rule: String::new(),
            groups: vec![],
            quorum,
            require_reason: false,
            deny_needs_quorum: false,
        }
    }

    fn req(id: &str, deadline: i64) -> ActionRequest {
        ActionRequest {
            request_id: id.into(),
            deadline_unix_ms: deadline,
            ..Default::default()
        }
    }

    #[test]
    fn resent_request_is_the_same_request() {
        let s = Store::in_memory().unwrap();
        let (_, new) = s.receive(&host(), &route(1), req("a", i64::MAX)).unwrap();
        assert!(new);
        let (again, new) = s.receive(&host(), &route(1), req("a", i64::MAX)).unwrap();
        assert!(!new);
        assert_eq!(again.request.unwrap().request_id, "a");
        assert_eq!(s.list(&ListRequestsRequest::default()).unwrap().0.len(), 1);
        // The same id from another host, or for another action, never gets this request back.
        let mut other = host();
        other.host_id = "someone-else".into();
        assert!(matches!(
            s.receive(&other, &route(1), req("a", i64::MAX)),
            Err(StoreError::IdConflict { .. })
        ));
        let mut changed = req("a", i64::MAX);
        changed.action = Some(Action::Connect(airlock_proto::v1::ConnectAction {
            address: "10.0.0.9".into(),
            port: 5432,
            ..Default::default()
        }));
        assert_ne!(changed.action, req("a", i64::MAX).action);
        assert!(matches!(
            s.receive(&host(), &route(1), changed),
            Err(StoreError::IdConflict { .. })
        ));
    }

    #[test]
    fn list_filters_and_pages() {
        let s = Store::in_memory().unwrap();
        for i in 0..5 {
            let mut r = req(&format!("p{i}"), i64::MAX);
            r.process = Some(airlock_proto::v1::ProcessContext {
                user: if i % 2 == 0 {
                    "ci".into()
                } else {
                    "bot".into()
                },
                ..Default::default()
            });
            s.receive(&host(), &route(1), r).unwrap();
        }
        let q = |page: &str| ListRequestsRequest {
            limit: 2,
            page_token: page.into(),
            ..Default::default()
        };
        let (p1, t1) = s.list(&q("")).unwrap();
        let (p2, t2) = s.list(&q(&t1)).unwrap();
        let (p3, t3) = s.list(&q(&t2)).unwrap();
        let ids: Vec<String> = [p1, p2, p3]
            .concat()
            .into_iter()
            .map(|h| h.request.unwrap().request_id)
            .collect();
        assert_eq!(ids, ["p4", "p3", "p2", "p1", "p0"]);
        assert!(t3.is_empty(), "last page");
        let by_ci = ListRequestsRequest {
            account: "ci".into(),
            ..Default::default()
        };
        assert_eq!(s.list(&by_ci).unwrap().0.len(), 3);
        let bad = s.list(&q("garbage")).unwrap_err();
        assert!(matches!(bad, StoreError::BadPageToken(_)), "{bad}");
    }

    #[test]
    fn decided_once_only() {
        let s = Store::in_memory().unwrap();
        s.receive(&host(), &route(1), req("a", i64::MAX)).unwrap();
        s.vote("a", "alice", Verdict::Allow, "ok", 0).unwrap();
        let err = s.vote("a", "bob", Verdict::Deny, "no", 0).unwrap_err();
        assert!(
            matches!(err, StoreError::NotPending { ref id, state: "approved" } if id == "a"),
            "{err}"
        );
        let err = s.vote("zz", "a", Verdict::Allow, "", 0).unwrap_err();
        assert!(
            matches!(err, StoreError::NotFound(ref id) if id == "zz"),
            "{err}"
        );
    }

    #[test]
    fn every_change_is_audited_and_verifies() {
        let s = Store::in_memory().unwrap();
        s.receive(&host(), &route(1), req("a", i64::MAX)).unwrap();
        s.vote("a", "alice", Verdict::Deny, "freeze", 0).unwrap();
        assert_eq!(s.verify_audit().unwrap(), 2);
        let records = audit::records(&s.lock()).unwrap();
        assert_eq!(records[1].action, "request.vote.deny");
        assert_eq!(records[1].actor, "alice");
        assert!(records[1].payload.contains("freeze"));
    }

    #[test]
    fn quorum_of_two_distinct_approvers_and_deny_wins() {
        let s = Store::in_memory().unwrap();
        s.receive(&host(), &route(2), req("q", i64::MAX)).unwrap();
        let (h, decided) = s.vote("q", "alice", Verdict::Allow, "", 0).unwrap();
        assert!(!decided);
        assert_eq!(h.state(), RequestState::Pending);
        let again = s.vote("q", "alice", Verdict::Allow, "", 0).unwrap_err();
        assert!(matches!(again, StoreError::AlreadyVoted { .. }), "{again}");
        let (h, decided) = s.vote("q", "bob", Verdict::Allow, "ok", 0).unwrap();
        assert!(decided);
        assert_eq!(h.state(), RequestState::Approved);
        assert_eq!(h.decided_by, "alice, bob");

        s.receive(&host(), &route(2), req("d", i64::MAX)).unwrap();
        s.vote("d", "alice", Verdict::Allow, "", 0).unwrap();
        let (h, decided) = s.vote("d", "bob", Verdict::Deny, "no", 0).unwrap();
        assert!(decided);
        assert_eq!(
            (h.state(), h.decided_by.as_str()),
            (RequestState::Denied, "bob")
        );
    }

    #[test]
    fn grant_approves_the_same_action_until_revoked() {
        let s = Store::in_memory().unwrap();
        let mut r = req("g1", i64::MAX);
        r.process = Some(airlock_proto::v1::ProcessContext {
            user: "ci".into(),
            ..Default::default()
        });
        r.action = Some(Action::Exec(airlock_proto::v1::ExecAction {
            path: "/usr/bin/kubectl".into(),
            argv: vec!["kubectl".into(), "delete".into(), "pod".into(), "x".into()],
            ..Default::default()
        }));
        s.receive(&host(), &route(1), r.clone()).unwrap();
        let (h, _) = s.vote("g1", "alice", Verdict::Allow, "ok", 30).unwrap();
        assert!(!h.grant_id.is_empty());

        let mut again = r.clone();
        again.request_id = "g2".into();
        let (h2, _) = s.receive(&host(), &route(1), again).unwrap();
        assert_eq!(
            h2.state(),
            RequestState::Approved,
            "approved at once by the grant"
        );
        assert_eq!(h2.grant_id, h.grant_id);

        let mut other = r.clone();
        other.request_id = "g3".into();
        if let Some(Action::Exec(e)) = &mut other.action {
            e.argv[3] = "y".into();
        }
        let (h3, _) = s.receive(&host(), &route(1), other).unwrap();
        assert_eq!(
            h3.state(),
            RequestState::Pending,
            "another action is not covered"
        );

        assert_eq!(s.list_grants(false).unwrap().len(), 1);

        // Once its window has passed, the grant covers nothing.
        s.lock()
            .execute("UPDATE grants SET expires_ms = ?1", [now_ms() - 1])
            .unwrap();
        let mut expired = r.clone();
        expired.request_id = "g-exp".into();
        let (he, _) = s.receive(&host(), &route(1), expired).unwrap();
        assert_eq!(
            he.state(),
            RequestState::Pending,
            "an expired grant approves nothing"
        );
        assert!(
            s.list_grants(false).unwrap().is_empty(),
            "expired grants are not active"
        );
        s.lock()
            .execute("UPDATE grants SET expires_ms = ?1", [now_ms() + 60_000])
            .unwrap();

        s.revoke_grant(&h.grant_id, "bob").unwrap();
        assert!(s.list_grants(false).unwrap().is_empty());
        let mut later = r;
        later.request_id = "g4".into();
        let (h4, _) = s.receive(&host(), &route(1), later).unwrap();
        assert_eq!(
            h4.state(),
            RequestState::Pending,
            "revoked grants approve nothing"
        );
        let actions: Vec<String> = audit::records(&s.lock())
            .unwrap()
            .into_iter()
            .map(|r| r.action)
            .collect();
        assert!(actions.contains(&"grant.created".to_owned()), "{actions:?}");
        assert!(
            actions.contains(&"request.approved.grant".to_owned()),
            "{actions:?}"
        );
        assert!(actions.contains(&"grant.revoked".to_owned()), "{actions:?}");
        assert!(s.verify_audit().is_ok());
    }

    #[test]
    fn tokens_authenticate_until_revoked() {
        let s = Store::in_memory().unwrap();
        let t = s.create_token("alice", Scope::Approve).unwrap();
        let p = s.principal(&t).unwrap().unwrap();
        assert_eq!((p.name.as_str(), p.scope), ("alice", Scope::Approve));
        let mut forged = t.clone();
        forged.pop();
        forged.push('x');
        assert_eq!(s.principal(&forged).unwrap(), None, "wrong secret");
        assert_eq!(s.principal("garbage").unwrap(), None);
        assert!(matches!(
            s.create_token("alice", Scope::Read),
            Err(StoreError::TokenExists(_))
        ));
        assert!(s.revoke_token("alice").unwrap());
        assert_eq!(s.principal(&t).unwrap(), None, "revoked");
        assert_eq!(
            s.verify_audit().unwrap(),
            2,
            "creation and revocation are audited"
        );
    }

    #[test]
    fn expiry_only_touches_pending_past_deadline() {
        let s = Store::in_memory().unwrap();
        s.receive(&host(), &route(1), req("old", 10)).unwrap();
        s.receive(&host(), &route(1), req("new", 1_000)).unwrap();
        s.receive(&host(), &route(1), req("done", 10)).unwrap();
        s.vote("done", "a", Verdict::Deny, "r", 0).unwrap();
        let expired = s.expire_due(500).unwrap();
        assert_eq!(expired.len(), 1);
        assert_eq!(s.get("old").unwrap().state(), RequestState::Expired);
        assert_eq!(s.get("new").unwrap().state(), RequestState::Pending);
        assert_eq!(s.get("done").unwrap().state(), RequestState::Denied);
    }
}
