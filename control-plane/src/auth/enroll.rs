//! Agent enrolment: one-time enrollment tokens, traded (through `EnrollmentService/Enroll`,
//! [`crate::api::enroll`]) for the agent's own credential.
//!
//! Rules:
//! - an enrollment token is stored hashed, in a table of its own (never in `tokens`), so no
//!   interceptor can ever take it for a bearer token;
//! - it is spent by the first enrolment that succeeds; a second one fails and changes nothing;
//! - it expires ([`DEFAULT_TTL`] unless told otherwise);
//! - it may be bound to one host id (`tokens create --scope enroll --host HOST`); the hello must
//!   then name that host. The token's name is only a label, never a binding: a label cannot be
//!   told apart from a host id;
//! - an unbound token enrols only a host id never enrolled before. Replacing a host's
//!   credential, or bringing back a host whose credential was revoked, needs a token bound to
//!   that host: otherwise anyone holding any enrollment token could take over its identity;
//! - enrolment creates (or replaces, revoking the old one) the `agent` token named after the host
//!   id, marks the enrollment token used and appends the audit records, all in one transaction.
//!   The audit trail names the enrollment token by its id, never by its text.

use std::time::Duration;

use airlock_proto::v1::Hello;
use tonic::Status;

use crate::{
    credential::{
        enrollment_token_id, new_enrollment_token, new_token, random_hex, token_hash, token_id,
    },
    store::{credentials::EnrollRefusal, Store, StoreError},
    types::now_ms,
};

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
    /// An unbound token cannot bring back a host whose credential was revoked.
    #[error(
        "host {0:?} had its credential revoked; enrolling it again needs a token bound to it \
         (`airlock-server tokens create --scope enroll --name LABEL --host {0}`)"
    )]
    Revoked(String),
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
            EnrollError::HostMismatch { .. }
            | EnrollError::AlreadyEnrolled(_)
            | EnrollError::Revoked(_) => Status::permission_denied(e.to_string()),
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
pub async fn create(
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
    let id = random_hex(6).map_err(random)?;
    let token = new_enrollment_token(&id).map_err(random)?;
    let expires_ms = now_ms().saturating_add(i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX));
    store
        .create_enrollment_token(&id, label, host, &token_hash(&token), expires_ms, actor)
        .await?;
    tracing::info!(name = %label, id = %id, host_id = ?host, expires = %utc(expires_ms), "enrollment token created");
    Ok(Created {
        token,
        id,
        expires_ms,
    })
}

/// Spends `token` and makes the agent credential of `hello.host_id`; see the module docs for
/// the rules. A refused enrolment changes nothing.
pub async fn enroll(store: &Store, token: &str, hello: &Hello) -> Result<Enrolled, EnrollError> {
    let host = hello.host_id.as_str();
    check_host_id(host, "hello.host_id")?;
    let token = token.trim();
    let id = enrollment_token_id(token).ok_or(EnrollError::Unknown)?;
    let random = |e: std::io::Error| EnrollError::Random(e.to_string());
    let agent_token = new_token(&random_hex(6).map_err(random)?).map_err(random)?;
    let new_id = token_id(&agent_token).unwrap_or_default().to_owned();
    let done = store
        .enroll(
            id,
            &token_hash(token),
            hello,
            &new_id,
            &token_hash(&agent_token),
        )
        .await?;
    match done {
        Ok(e) => Ok(Enrolled {
            agent_token,
            host_id: host.to_owned(),
            replaced: e.replaced,
        }),
        Err(EnrollRefusal::Unknown) => Err(EnrollError::Unknown),
        Err(EnrollRefusal::Used(at)) => Err(EnrollError::Used { at: utc(at) }),
        Err(EnrollRefusal::Expired(at)) => Err(EnrollError::Expired { at: utc(at) }),
        Err(EnrollRefusal::HostMismatch { bound }) => Err(EnrollError::HostMismatch {
            bound,
            host: host.to_owned(),
        }),
        Err(EnrollRefusal::AlreadyEnrolled) => Err(EnrollError::AlreadyEnrolled(host.to_owned())),
        Err(EnrollRefusal::Revoked) => Err(EnrollError::Revoked(host.to_owned())),
        Err(EnrollRefusal::NameTaken { scope }) => Err(EnrollError::NameTaken {
            name: host.to_owned(),
            scope,
        }),
    }
}
