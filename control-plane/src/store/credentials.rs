//! Bearer tokens and one-time enrollment tokens, stored hashed; every change is audited.

use airlock_proto::v1::Hello;
use serde_json::json;

use super::{sql::args, Store, StoreError};
use crate::{
    credential::{new_token, random_hex, token_hash, token_id, Principal, Scope},
    types::now_ms,
};

/// Why an enrolment was refused (nothing changed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EnrollRefusal {
    /// No enrollment token has this id and hash.
    Unknown,
    /// Spent already, at this time (Unix ms).
    Used(i64),
    /// Expired at this time (Unix ms).
    Expired(i64),
    /// Bound to another host.
    HostMismatch {
        /// The host the token is for.
        bound: String,
    },
    /// The host has a credential and the token is not bound to it.
    AlreadyEnrolled,
    /// The host's credential was revoked and the token is not bound to it.
    Revoked,
    /// A token that is not an agent's has the host's name.
    NameTaken {
        /// Its scope.
        scope: String,
    },
}

/// A completed enrolment, as the store records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Enrolment {
    /// The enrollment token's label.
    pub label: String,
    /// Whether the token was bound to the host.
    pub bound: bool,
    /// Whether an earlier credential of the host was revoked.
    pub replaced: bool,
}

fn random(e: std::io::Error) -> StoreError {
    StoreError::Random(e.to_string())
}

impl Store {
    /// Creates a token `name` with `scope`; returns the token, which is not stored and cannot
    /// be shown again.
    pub async fn create_token(&self, name: &str, scope: Scope) -> Result<String, StoreError> {
        self.create_token_by(name, scope, "server").await
    }

    /// [`Store::create_token`], audited as done by `by` (the admin who asked). Names are 1 to
    /// 128 letters, digits, `.`, `_`, `@`, `-` or `:`, so that `"alice "` and `alice` cannot
    /// be two tokens for one person.
    pub async fn create_token_by(
        &self,
        name: &str,
        scope: Scope,
        by: &str,
    ) -> Result<String, StoreError> {
        if scope == Scope::Enroll {
            return Err(StoreError::NotBearerScope);
        }
        let valid = !name.is_empty()
            && name.len() <= 128
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "._@-:".contains(c));
        if !valid {
            return Err(StoreError::Invalid(format!(
                "token name {:?}: use 1 to 128 letters, digits, '.', '_', '@', '-' or ':'",
                name.escape_debug().to_string()
            )));
        }
        let by = by.to_owned();
        let id = random_hex(6).map_err(random)?;
        let token = new_token(&id).map_err(random)?;
        let (name, hash) = (name.to_owned(), token_hash(&token));
        self.write(move |tx| {
            let (name, hash, id, by) = (name.clone(), hash.clone(), id.clone(), by.clone());
            Box::pin(async move {
                let taken = tx
                    .row("SELECT 1 FROM tokens WHERE name = $1", args![&name])
                    .await?;
                if taken.is_some() {
                    return Err(StoreError::TokenExists(name));
                }
                tx.exec(
                    "INSERT INTO tokens (id, name, scope, hash, created_ms) VALUES ($1, $2, $3, $4, $5)",
                    args![&id, &name, scope.to_string(), &hash, now_ms()],
                )
                .await?;
                let payload = json!({"name": name, "scope": scope.to_string()}).to_string();
                tx.audit(&by, "token.created", "", &payload, None).await?;
                Ok(())
            })
        })
        .await?;
        Ok(token)
    }

    /// Revokes the token `name`; false if there is none.
    pub async fn revoke_token(&self, name: &str) -> Result<bool, StoreError> {
        self.revoke_token_by(name, "server").await
    }

    /// [`Store::revoke_token`], audited as done by `by`.
    pub async fn revoke_token_by(&self, name: &str, by: &str) -> Result<bool, StoreError> {
        let (name, by) = (name.to_owned(), by.to_owned());
        self.write(move |tx| {
            let (name, by) = (name.clone(), by.clone());
            Box::pin(async move {
                let n = tx
                    .exec(
                        "UPDATE tokens SET revoked_ms = $2 WHERE name = $1 AND revoked_ms IS NULL",
                        args![&name, now_ms()],
                    )
                    .await?;
                if n == 0 {
                    return Ok(false);
                }
                let payload = json!({ "name": name }).to_string();
                tx.audit(&by, "token.revoked", "", &payload, None).await?;
                Ok(true)
            })
        })
        .await
    }

    /// Whether any admin token exists (first start creates one).
    pub async fn has_admin_token(&self) -> Result<bool, StoreError> {
        self.read(|tx| {
            Box::pin(async move {
                Ok(tx
                    .row("SELECT 1 FROM tokens WHERE scope = 'admin' LIMIT 1", &[])
                    .await?
                    .is_some())
            })
        })
        .await
    }

    /// The principal a token stands for; `None` if unknown, malformed or revoked.
    pub async fn principal(&self, token: &str) -> Result<Option<Principal>, StoreError> {
        let Some(id) = token_id(token).map(str::to_owned) else {
            return Ok(None);
        };
        let row = self
            .read(move |tx| {
                let id = id.clone();
                Box::pin(async move {
                    tx.row(
                        "SELECT name, scope, hash FROM tokens WHERE id = $1 AND revoked_ms IS NULL",
                        args![&id],
                    )
                    .await
                })
            })
            .await?;
        let Some(row) = row else { return Ok(None) };
        let (name, scope, hash) = (row.text(0)?, row.text(1)?, row.text(2)?);
        let same =
            crate::credential::constant_time_eq(hash.as_bytes(), token_hash(token).as_bytes());
        Ok(same
            .then(|| scope.parse().ok().map(|scope| Principal { name, scope }))
            .flatten())
    }

    /// Stores an enrollment token (its hash) `id` labelled `label`, for `host` only when given,
    /// until `expires_ms`; `actor` asked for it.
    pub async fn create_enrollment_token(
        &self,
        id: &str,
        label: &str,
        host: Option<&str>,
        hash: &str,
        expires_ms: i64,
        actor: &str,
    ) -> Result<(), StoreError> {
        let a = (
            id.to_owned(),
            label.to_owned(),
            host.map(str::to_owned),
            hash.to_owned(),
            actor.to_owned(),
        );
        self.write(move |tx| {
            let (id, label, host, hash, actor) = a.clone();
            Box::pin(async move {
                tx.exec(
                    "INSERT INTO enrollment_tokens (id, label, host_id, hash, created_ms, expires_ms)
                     VALUES ($1, $2, $3, $4, $5, $6)",
                    args![&id, &label, host.clone(), &hash, now_ms(), expires_ms],
                )
                .await?;
                let payload = json!({
                    "name": label,
                    "scope": Scope::Enroll.to_string(),
                    "id": id,
                    "host_id": host,
                    "expires_ms": expires_ms,
                });
                tx.audit(&actor, "token.created", "", &payload.to_string(), None)
                    .await?;
                Ok(())
            })
        })
        .await
    }

    /// Spends enrollment token `id` (whose hash must be `hash`) and makes (or replaces) the
    /// agent credential of `hello.host_id`: new token id `new_id`, hash `new_hash`. All in
    /// one transaction; a refusal changes nothing.
    pub async fn enroll(
        &self,
        id: &str,
        hash: &str,
        hello: &Hello,
        new_id: &str,
        new_hash: &str,
    ) -> Result<Result<Enrolment, EnrollRefusal>, StoreError> {
        let a = (
            id.to_owned(),
            hash.to_owned(),
            hello.clone(),
            new_id.to_owned(),
            new_hash.to_owned(),
        );
        self.write(move |tx| {
            let (id, hash, hello, new_id, new_hash) = a.clone();
            Box::pin(async move {
                let host = hello.host_id.as_str();
                let now = now_ms();
                let Some(row) = tx
                    .row(
                        "SELECT label, host_id, hash, expires_ms, used_ms FROM enrollment_tokens
                         WHERE id = $1",
                        args![&id],
                    )
                    .await?
                else {
                    return Ok(Err(EnrollRefusal::Unknown));
                };
                let (label, bound) = (row.text(0)?, row.opt_text(1)?);
                let (stored, expires_ms, used_ms) = (row.text(2)?, row.int(3)?, row.opt_int(4)?);
                if !crate::credential::constant_time_eq(stored.as_bytes(), hash.as_bytes()) {
                    return Ok(Err(EnrollRefusal::Unknown));
                }
                if let Some(at) = used_ms {
                    return Ok(Err(EnrollRefusal::Used(at)));
                }
                if expires_ms <= now {
                    return Ok(Err(EnrollRefusal::Expired(expires_ms)));
                }
                if let Some(b) = bound.as_deref().filter(|b| *b != host) {
                    return Ok(Err(EnrollRefusal::HostMismatch {
                        bound: b.to_owned(),
                    }));
                }
                let existing = tx
                    .row(
                        "SELECT scope, revoked_ms FROM tokens WHERE name = $1",
                        args![host],
                    )
                    .await?;
                let active = match &existing {
                    Some(r) if r.text(0)? != Scope::Agent.to_string() => {
                        return Ok(Err(EnrollRefusal::NameTaken { scope: r.text(0)? }));
                    }
                    Some(r) => r.opt_int(1)?.is_none(),
                    None => false,
                };
                // A host id seen before comes back only through a token bound to it: a revoked
                // credential (lost, compromised, retired) must not free the id for any spare
                // token.
                if existing.is_some() && bound.is_none() {
                    return Ok(Err(if active {
                        EnrollRefusal::AlreadyEnrolled
                    } else {
                        EnrollRefusal::Revoked
                    }));
                }
                // Token names are unique (revoked ones included), so a host keeps one row: a
                // new credential replaces the old one in place, and the audit trail keeps the
                // history.
                if existing.is_some() {
                    tx.exec(
                        "UPDATE tokens SET id = $2, hash = $3, created_ms = $4, revoked_ms = NULL
                         WHERE name = $1",
                        args![host, &new_id, &new_hash, now],
                    )
                    .await?;
                } else {
                    tx.exec(
                        "INSERT INTO tokens (id, name, scope, hash, created_ms) VALUES ($1, $2, $3, $4, $5)",
                        args![&new_id, host, Scope::Agent.to_string(), &new_hash, now],
                    )
                    .await?;
                }
                let spent = tx
                    .exec(
                        "UPDATE enrollment_tokens SET used_ms = $2, used_by = $3
                         WHERE id = $1 AND used_ms IS NULL",
                        args![&id, now, host],
                    )
                    .await?;
                if spent != 1 {
                    // Cannot happen under the write lock, but a token must never work twice:
                    // a database error, so that what this job wrote is undone.
                    return Err(StoreError::Db {
                        db: tx.db.to_string(),
                        message: format!("enrollment token {id} was spent twice"),
                        kind: super::sql::DbErrorKind::Other,
                    });
                }
                if active {
                    let payload =
                        json!({"name": host, "scope": "agent", "reason": "replaced by enrolment"});
                    tx.audit(host, "token.revoked", "", &payload.to_string(), None)
                        .await?;
                }
                let payload = json!({
                    "host_id": host,
                    "hostname": hello.hostname,
                    "version": hello.version,
                    "enrollment_token": {"id": id, "name": label, "bound": bound.is_some()},
                    "replaced": active,
                });
                tx.audit(host, "agent.enrolled", "", &payload.to_string(), None)
                    .await?;
                Ok(Ok(Enrolment {
                    label,
                    bound: bound.is_some(),
                    replaced: active,
                }))
            })
        })
        .await
    }
}
