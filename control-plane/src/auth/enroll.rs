//! Agent enrolment: one-time enrollment tokens, and `EnrollmentService/Enroll`, which trades one
//! for the agent's own credential.
//!
//! Rules:
//! - an enrollment token is stored hashed, in a table of its own (never in `tokens`), so no
//!   interceptor can ever take it for a bearer token;
//! - it is spent by the first enrolment that succeeds; a second one fails and changes nothing;
//! - it expires ([`DEFAULT_TTL`] unless told otherwise);
//! - it may be bound to one host id (`tokens create --scope enroll --host HOST`); the hello must
//!   then name that host. The token's name is only a label, never a binding: a label cannot be
//!   told apart from a host id;
//! - an unbound token enrols only a host that has no active credential. Replacing a host's
//!   credential needs a token bound to that host: otherwise anyone holding any enrollment token
//!   could take over an enrolled host's identity;
//! - enrolment creates (or replaces, revoking the old one) the `agent` token named after the host
//!   id, marks the enrollment token used and appends the audit records, all in one transaction.
//!   The audit trail names the enrollment token by its id, never by its text.

use std::{sync::Arc, time::Duration};

use airlock_proto::v1::{
    enrollment_service_server::EnrollmentService, EnrollRequest, EnrollResponse, Hello,
};
use rusqlite::{params, OptionalExtension};
use serde_json::json;
use tonic::{Request, Response, Status};

use crate::{
    auth::{self, Scope},
    store::{now_ms, Store, StoreError},
};

/// The enrollment tokens table.
pub const SCHEMA: &str = "CREATE TABLE IF NOT EXISTS enrollment_tokens (
    id TEXT PRIMARY KEY,
    label TEXT NOT NULL,
    host_id TEXT,
    hash TEXT NOT NULL,
    created_ms INTEGER NOT NULL,
    expires_ms INTEGER NOT NULL,
    used_ms INTEGER,
    used_by TEXT
);";

/// How long an enrollment token lasts unless told otherwise.
pub const DEFAULT_TTL: Duration = Duration::from_secs(24 * 3600);

/// Longest lifetime of an enrollment token: a token that lives for months is a standing
/// credential, which is what enrolment exists to avoid.
pub const MAX_TTL: Duration = Duration::from_secs(30 * 24 * 3600);

/// Why creating an enrollment token or enrolling was refused.
#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    /// A bad label, host id or lifetime.
    #[error("{0}")]
    Invalid(String),
    /// No enrollment token matches.
    #[error("unknown enrollment token")]
    Unknown,
    /// The token was spent already.
    #[error(
        "this enrollment token was already used (at {at}); enrollment tokens work once: create \
         a new one with `airlock-server tokens create --scope enroll`"
    )]
    Used {
        /// When, RFC 3339.
        at: String,
    },
    /// The token is past its lifetime.
    #[error(
        "this enrollment token expired at {at}; create a new one with `airlock-server tokens \
         create --scope enroll`"
    )]
    Expired {
        /// When, RFC 3339.
        at: String,
    },
    /// The token is bound to another host.
    #[error("this enrollment token is for host {bound:?}, not {host:?}")]
    HostMismatch {
        /// The host the token may enrol.
        bound: String,
        /// The host that tried.
        host: String,
    },
    /// An unbound token cannot replace a host's credential.
    #[error(
        "host {0:?} is enrolled already; re-enrolling it needs a token bound to it \
         (`airlock-server tokens create --scope enroll --name LABEL --host {0}`)"
    )]
    AlreadyEnrolled(String),
    /// The host id is the name of a token that is not an agent's.
    #[error("a {scope} token is named {name:?}, so no agent can have that host id")]
    NameTaken {
        /// The host id.
        name: String,
        /// The other token's scope.
        scope: String,
    },
    /// The random source failed.
    #[error("cannot read random bytes: {0}")]
    Random(String),
    /// The database failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<EnrollError> for Status {
    fn from(e: EnrollError) -> Self {
        match e {
            EnrollError::Unknown | EnrollError::Used { .. } | EnrollError::Expired { .. } => {
                Status::unauthenticated(e.to_string())
            }
            EnrollError::HostMismatch { .. } | EnrollError::AlreadyEnrolled(_) => {
                Status::permission_denied(e.to_string())
            }
            EnrollError::NameTaken { .. } => Status::failed_precondition(e.to_string()),
            EnrollError::Invalid(_) => Status::invalid_argument(e.to_string()),
            EnrollError::Random(_) | EnrollError::Store(_) => {
                tracing::error!(error = %e, "enrolment failed");
                Status::internal("enrolment failed on the server; see its log")
            }
        }
    }
}

/// A new enrollment token.
#[derive(Debug, Clone)]
pub struct Created {
    /// The token; not stored, cannot be shown again.
    pub token: String,
    /// Its id (the part of the token that names it in the audit trail).
    pub id: String,
    /// When it expires, Unix ms.
    pub expires_ms: i64,
}

/// A completed enrolment.
#[derive(Debug, Clone)]
pub struct Enrolled {
    /// The agent's new credential.
    pub agent_token: String,
    /// The host it speaks for.
    pub host_id: String,
    /// Whether an earlier credential of the host was revoked.
    pub replaced: bool,
}

/// A row of `enrollment_tokens`.
struct Stored {
    label: String,
    bound: Option<String>,
    hash: String,
    expires_ms: i64,
    used_ms: Option<i64>,
}

/// RFC 3339 (UTC) of Unix ms, for messages.
fn utc(ms: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| format!("{ms} ms after the epoch"))
}

/// A host id as a credential's name: the agent stream checks the hello against it verbatim.
fn check_host_id(host: &str, what: &str) -> Result<(), EnrollError> {
    if host.trim().is_empty() || host.trim() != host || host.len() > 255 {
        return Err(EnrollError::Invalid(format!(
            "{what} {host:?}: a host id is 1 to 255 characters without surrounding spaces"
        )));
    }
    if host.chars().any(char::is_control) {
        return Err(EnrollError::Invalid(format!(
            "{what} {host:?} has control characters"
        )));
    }
    Ok(())
}

/// Creates an enrollment token labelled `label`, valid for `ttl`, for host `host` only when
/// given; `actor` is who asked (for the audit trail). Returns the token, which is not stored.
pub fn create(
    store: &Store,
    label: &str,
    host: Option<&str>,
    ttl: Duration,
    actor: &str,
) -> Result<Created, EnrollError> {
    if label.trim().is_empty() {
        return Err(EnrollError::Invalid(
            "an enrollment token needs a name (a label, e.g. the host it is for)".into(),
        ));
    }
    if let Some(h) = host {
        check_host_id(h, "--host")?;
    }
    if ttl.is_zero() || ttl > MAX_TTL {
        return Err(EnrollError::Invalid(format!(
            "an enrollment token lasts more than 0 and at most {} hours",
            MAX_TTL.as_secs() / 3600
        )));
    }
    let random = |e: std::io::Error| EnrollError::Random(e.to_string());
    let id = auth::random_hex(6).map_err(random)?;
    let token = auth::new_enrollment_token(&id).map_err(random)?;
    let now = now_ms();
    let expires_ms = now.saturating_add(i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX));
    let record = store.with_conn(|conn| {
        let tx = conn.transaction()?;
        tx.execute(
            "INSERT INTO enrollment_tokens (id, label, host_id, hash, created_ms, expires_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![id, label, host, auth::token_hash(&token), now, expires_ms],
        )?;
        let payload = json!({
            "name": label,
            "scope": Scope::Enroll.to_string(),
            "id": id,
            "host_id": host,
            "expires_ms": expires_ms,
        });
        let record = Store::audit_in(&tx, actor, "token.created", "", &payload.to_string())?;
        tx.commit()?;
        Ok(record)
    })?;
    store.checkpointed(&record);
    tracing::info!(name = %label, id = %id, host_id = ?host, expires = %utc(expires_ms), "enrollment token created");
    Ok(Created {
        token,
        id,
        expires_ms,
    })
}

/// Spends `token` and makes the agent credential of `hello.host_id`; see the module docs for
/// the rules. A refused enrolment changes nothing.
pub fn enroll(store: &Store, token: &str, hello: &Hello) -> Result<Enrolled, EnrollError> {
    let host = hello.host_id.as_str();
    check_host_id(host, "hello.host_id")?;
    let id = auth::enrollment_token_id(token.trim()).ok_or(EnrollError::Unknown)?;
    let random = |e: std::io::Error| EnrollError::Random(e.to_string());
    let new_id = auth::random_hex(6).map_err(random)?;
    let agent_token = auth::new_token(&new_id).map_err(random)?;
    let now = now_ms();
    let outcome = store.with_conn(|conn| {
        // Dropping the transaction without commit (every refusal below) rolls it back.
        let tx = conn.transaction()?;
        let row = tx
            .query_row(
                "SELECT label, host_id, hash, expires_ms, used_ms FROM enrollment_tokens
                 WHERE id = ?1",
                [id],
                |r| {
                    Ok(Stored {
                        label: r.get(0)?,
                        bound: r.get(1)?,
                        hash: r.get(2)?,
                        expires_ms: r.get(3)?,
                        used_ms: r.get(4)?,
                    })
                },
            )
            .optional()?;
        let Some(Stored {
            label,
            bound,
            hash,
            expires_ms,
            used_ms,
        }) = row
        else {
            return Ok(Err(EnrollError::Unknown));
        };
        if hash != auth::token_hash(token.trim()) {
            return Ok(Err(EnrollError::Unknown));
        }
        if let Some(at) = used_ms {
            return Ok(Err(EnrollError::Used { at: utc(at) }));
        }
        if expires_ms <= now {
            return Ok(Err(EnrollError::Expired {
                at: utc(expires_ms),
            }));
        }
        if let Some(bound) = bound.as_deref().filter(|b| *b != host) {
            return Ok(Err(EnrollError::HostMismatch {
                bound: bound.to_owned(),
                host: host.to_owned(),
            }));
        }
        let existing: Option<(String, Option<i64>)> = tx
            .query_row(
                "SELECT scope, revoked_ms FROM tokens WHERE name = ?1",
                [host],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?;
        let active = match &existing {
            Some((scope, _)) if *scope != Scope::Agent.to_string() => {
                return Ok(Err(EnrollError::NameTaken {
                    name: host.to_owned(),
                    scope: scope.clone(),
                }));
            }
            Some((_, revoked)) => revoked.is_none(),
            None => false,
        };
        if active && bound.is_none() {
            return Ok(Err(EnrollError::AlreadyEnrolled(host.to_owned())));
        }
        // Token names are unique (revoked ones included), so a host keeps one row: a new
        // credential replaces the old one in place, and the audit trail keeps the history.
        if existing.is_some() {
            tx.execute(
                "UPDATE tokens SET id = ?2, hash = ?3, created_ms = ?4, revoked_ms = NULL
                 WHERE name = ?1",
                params![host, new_id, auth::token_hash(&agent_token), now],
            )?;
        } else {
            tx.execute(
                "INSERT INTO tokens (id, name, scope, hash, created_ms) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![
                    new_id,
                    host,
                    Scope::Agent.to_string(),
                    auth::token_hash(&agent_token),
                    now
                ],
            )?;
        }
        let spent = tx.execute(
            "UPDATE enrollment_tokens SET used_ms = ?2, used_by = ?3
             WHERE id = ?1 AND used_ms IS NULL",
            params![id, now, host],
        )?;
        if spent != 1 {
            // Cannot happen while the connection is held, but a token must never work twice.
            return Ok(Err(EnrollError::Used { at: utc(now) }));
        }
        if active {
            let payload = json!({"name": host, "scope": "agent", "reason": "replaced by enrolment"});
            Store::audit_in(&tx, host, "token.revoked", "", &payload.to_string())?;
        }
        let payload = json!({
            "host_id": host,
            "hostname": hello.hostname,
            "version": hello.version,
            "enrollment_token": {"id": id, "name": label, "bound": bound.is_some()},
            "replaced": active,
        });
        let record = Store::audit_in(&tx, host, "agent.enrolled", "", &payload.to_string())?;
        tx.commit()?;
        Ok(Ok((record, active)))
    })?;
    let (record, replaced) = outcome?;
    store.checkpointed(&record);
    Ok(Enrolled {
        agent_token,
        host_id: host.to_owned(),
        replaced,
    })
}

/// The gRPC service. Served without the bearer-token interceptor: the caller has no
/// credential yet, and the enrollment token in the body is what authenticates it.
pub struct EnrollmentSvc {
    /// Where tokens live.
    pub store: Arc<Store>,
    /// mTLS: as on the agent stream, callers must present a client certificate signed by the
    /// configured CA; enrolment is not a way around it.
    pub require_client_cert: bool,
}

#[tonic::async_trait]
impl EnrollmentService for EnrollmentSvc {
    async fn enroll(
        &self,
        req: Request<EnrollRequest>,
    ) -> Result<Response<EnrollResponse>, Status> {
        if self.require_client_cert && req.peer_certs().is_none_or(|c| c.is_empty()) {
            return Err(Status::unauthenticated(
                "this server requires agents to present a client certificate (mTLS)",
            ));
        }
        let r = req.into_inner();
        let hello = r
            .hello
            .ok_or_else(|| Status::invalid_argument("an enrolment needs the agent's hello"))?;
        // Blocking SQLite work (and fsync on commit) off the async workers.
        let (store, token, who) = (self.store.clone(), r.enrollment_token, hello.clone());
        let result = tokio::task::spawn_blocking(move || enroll(&store, &token, &who))
            .await
            .map_err(|e| Status::internal(format!("enrolment task failed: {e}")))?;
        match result {
            Ok(done) => {
                tracing::info!(host_id = %done.host_id, host = %hello.hostname, replaced = done.replaced, "agent enrolled");
                Ok(Response::new(EnrollResponse {
                    agent_token: done.agent_token,
                    host_id: done.host_id,
                }))
            }
            Err(e) => {
                tracing::warn!(host_id = %hello.host_id, host = %hello.hostname, reason = %e, "enrolment refused");
                Err(e.into())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hello(host: &str) -> Hello {
        Hello {
            host_id: host.into(),
            hostname: format!("{host}.example"),
            ..Default::default()
        }
    }

    #[test]
    fn spent_once_and_nothing_changes_on_refusal() {
        let s = Store::in_memory().unwrap();
        let t = create(&s, "web", None, DEFAULT_TTL, "server").unwrap();
        let done = enroll(&s, &t.token, &hello("h1")).unwrap();
        assert!(!done.replaced);
        let p = s.principal(&done.agent_token).unwrap().unwrap();
        assert_eq!((p.name.as_str(), p.scope), ("h1", Scope::Agent));
        let again = enroll(&s, &t.token, &hello("h2")).unwrap_err();
        assert!(matches!(again, EnrollError::Used { .. }), "{again}");
        assert!(s.principal(&done.agent_token).unwrap().is_some());
        assert_eq!(s.verify_audit().unwrap(), 2, "created and enrolled");
    }

    #[test]
    fn unbound_tokens_cannot_take_over_an_enrolled_host() {
        let s = Store::in_memory().unwrap();
        let first = create(&s, "a", None, DEFAULT_TTL, "server").unwrap();
        let old = enroll(&s, &first.token, &hello("h1")).unwrap();
        let unbound = create(&s, "b", None, DEFAULT_TTL, "server").unwrap();
        let err = enroll(&s, &unbound.token, &hello("h1")).unwrap_err();
        assert!(matches!(err, EnrollError::AlreadyEnrolled(_)), "{err}");
        let bound = create(&s, "c", Some("h1"), DEFAULT_TTL, "server").unwrap();
        let new = enroll(&s, &bound.token, &hello("h1")).unwrap();
        assert!(new.replaced);
        assert!(
            s.principal(&old.agent_token).unwrap().is_none(),
            "old one revoked"
        );
        assert!(s.principal(&new.agent_token).unwrap().is_some());
        // The refused unbound token was not spent: it still enrols a new host.
        enroll(&s, &unbound.token, &hello("h2")).unwrap();
    }

    #[test]
    fn bad_input_is_refused() {
        let s = Store::in_memory().unwrap();
        assert!(create(&s, " ", None, DEFAULT_TTL, "server").is_err());
        assert!(create(&s, "x", None, Duration::ZERO, "server").is_err());
        assert!(create(&s, "x", None, MAX_TTL * 2, "server").is_err());
        assert!(create(&s, "x", Some(" h"), DEFAULT_TTL, "server").is_err());
        s.create_token("alice", Scope::Approve).unwrap();
        let t = create(&s, "x", None, DEFAULT_TTL, "server").unwrap();
        let err = enroll(&s, &t.token, &hello("alice")).unwrap_err();
        assert!(matches!(err, EnrollError::NameTaken { .. }), "{err}");
        let err = enroll(&s, &t.token, &hello("")).unwrap_err();
        assert!(matches!(err, EnrollError::Invalid(_)), "{err}");
        let err = enroll(&s, "alk_x_y", &hello("h")).unwrap_err();
        assert!(matches!(err, EnrollError::Unknown), "{err}");
    }
}
