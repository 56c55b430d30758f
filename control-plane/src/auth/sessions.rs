//! Web sessions: a random id (the cookie's value; only its SHA-256 is stored), the person's
//! identity and groups, and the session's CSRF token. Logins and logouts are audited.

pub use crate::store::people::StoredSession as Session;
use crate::{
    credential::{constant_time_eq, random_hex, token_hash},
    decide::Approver,
    store::{Store, StoreError},
    types::now_ms,
};

impl Session {
    /// The person as an approver.
    pub fn approver(&self) -> Approver {
        Approver {
            name: self.name.clone(),
            groups: self.groups.clone(),
        }
    }

    /// Whether `token` is this session's CSRF token (constant time).
    pub fn csrf_ok(&self, token: &str) -> bool {
        constant_time_eq(self.csrf.as_bytes(), token.as_bytes())
    }
}

fn random(bytes: usize) -> Result<String, StoreError> {
    random_hex(bytes).map_err(|e| StoreError::Random(e.to_string()))
}

/// Starts a session for `name`; returns the session id (the cookie's value) and the session.
pub async fn create(
    store: &Store,
    name: &str,
    groups: &[String],
    via: &str,
    ttl_ms: i64,
) -> Result<(String, Session), StoreError> {
    let id = random(32)?;
    let session = Session {
        name: name.into(),
        groups: groups.to_vec(),
        via: via.into(),
        csrf: random(32)?,
        expires_ms: now_ms() + ttl_ms,
    };
    store.insert_session(&token_hash(&id), &session).await?;
    Ok((id, session))
}

/// The live session with id `id`, if any.
pub async fn lookup(store: &Store, id: &str) -> Result<Option<Session>, StoreError> {
    store.session(&token_hash(id)).await
}

/// Ends session `id` of `name`.
pub async fn end(store: &Store, id: &str, name: &str) -> Result<(), StoreError> {
    store.end_session(&token_hash(id), name).await
}
