//! Web UI sessions: a random id in a Secure, HTTP-only, SameSite=Lax cookie; only its SHA-256 is
//! stored, beside the person's identity, groups and the session's CSRF token.

use axum::{
    extract::FromRequestParts,
    http::request::Parts,
    response::{IntoResponse, Redirect, Response},
};
use axum_extra::extract::cookie::{Cookie, CookieJar, SameSite};
use rusqlite::{params, OptionalExtension};
use serde_json::json;

use super::Web;
use crate::{
    auth,
    decide::Approver,
    store::{now_ms, Store, StoreError},
};

/// The sessions table.
pub const SCHEMA: &str = "CREATE TABLE IF NOT EXISTS sessions (
    id_hash TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    groups TEXT NOT NULL,
    via TEXT NOT NULL,
    csrf TEXT NOT NULL,
    created_ms INTEGER NOT NULL,
    expires_ms INTEGER NOT NULL
);";

/// Name of the session cookie.
pub const COOKIE: &str = "airlock_session";

/// A logged-in person.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    /// Identity.
    pub name: String,
    /// Groups from the login (local account groups or OIDC claims).
    pub groups: Vec<String>,
    /// "local" or "oidc".
    pub via: String,
    /// The token every state-changing form must carry.
    pub csrf: String,
    /// When the session ends, Unix ms.
    pub expires_ms: i64,
}

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

/// Compares two byte strings in time that depends only on their lengths.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn random(bytes: usize) -> Result<String, StoreError> {
    auth::random_hex(bytes).map_err(|e| StoreError::Random(e.to_string()))
}

/// Starts a session for `name`; returns the cookie value (the session id) and the session.
pub fn create(
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
    let now = now_ms();
    let record = store.with_conn(|conn| {
        let tx = conn.transaction()?;
        // Expired sessions go whenever a new one starts.
        tx.execute("DELETE FROM sessions WHERE expires_ms <= ?1", [now])?;
        tx.execute(
            "INSERT INTO sessions (id_hash, name, groups, via, csrf, created_ms, expires_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![
                auth::token_hash(&id),
                name,
                json!(groups).to_string(),
                via,
                session.csrf,
                now,
                session.expires_ms
            ],
        )?;
        let r = Store::audit_in(
            &tx,
            name,
            "login",
            "",
            &json!({ "via": via, "groups": groups }).to_string(),
        )?;
        tx.commit()?;
        Ok(r)
    })?;
    store.checkpointed(&record);
    Ok((id, session))
}

/// The live session with id `id`, if any.
pub fn lookup(store: &Store, id: &str) -> Result<Option<Session>, StoreError> {
    store.with_conn(|conn| {
        conn.query_row(
            "SELECT name, groups, via, csrf, expires_ms FROM sessions
             WHERE id_hash = ?1 AND expires_ms > ?2",
            params![auth::token_hash(id), now_ms()],
            |r| {
                let groups: String = r.get(1)?;
                Ok(Session {
                    name: r.get(0)?,
                    groups: serde_json::from_str(&groups).unwrap_or_default(),
                    via: r.get(2)?,
                    csrf: r.get(3)?,
                    expires_ms: r.get(4)?,
                })
            },
        )
        .optional()
    })
}

/// Ends session `id`.
pub fn end(store: &Store, id: &str, name: &str) -> Result<(), StoreError> {
    let record = store.with_conn(|conn| {
        let tx = conn.transaction()?;
        tx.execute(
            "DELETE FROM sessions WHERE id_hash = ?1",
            [auth::token_hash(id)],
        )?;
        let r = Store::audit_in(&tx, name, "logout", "", "{}")?;
        tx.commit()?;
        Ok(r)
    })?;
    store.checkpointed(&record);
    Ok(())
}

/// The session cookie for `id`.
pub fn cookie(id: String, secure: bool, max_age_secs: i64) -> Cookie<'static> {
    Cookie::build((COOKIE, id))
        .path("/")
        .http_only(true)
        .secure(secure)
        .same_site(SameSite::Lax)
        .max_age(time::Duration::seconds(max_age_secs))
        .build()
}

/// Extracts the logged-in person; without a session, pages redirect to the login page and
/// everything else gets 401.
impl FromRequestParts<Web> for Session {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, web: &Web) -> Result<Self, Self::Rejection> {
        let jar = CookieJar::from_headers(&parts.headers);
        let found = match jar.get(COOKIE) {
            Some(c) => lookup(&web.plane.store, c.value()).map_err(|e| {
                tracing::error!(error = %e, "session lookup failed");
                (
                    axum::http::StatusCode::INTERNAL_SERVER_ERROR,
                    "could not read the session database",
                )
                    .into_response()
            })?,
            None => None,
        };
        match found {
            Some(s) => Ok(s),
            None if parts.method == axum::http::Method::GET => {
                let next = parts
                    .uri
                    .path_and_query()
                    .map_or("/", |p| p.as_str())
                    .to_owned();
                let to = format!(
                    "/login?{}",
                    serde_urlencoded::to_string([("next", next)]).unwrap_or_default()
                );
                Err(Redirect::to(&to).into_response())
            }
            None => Err((
                axum::http::StatusCode::UNAUTHORIZED,
                "log in first: no valid session",
            )
                .into_response()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sessions_live_until_ended_and_store_only_a_hash() {
        let store = Store::in_memory().unwrap();
        let (id, s) = create(&store, "alice", &["oncall".into()], "local", 60_000).unwrap();
        assert_eq!(lookup(&store, &id).unwrap(), Some(s.clone()));
        assert!(s.csrf_ok(&s.csrf));
        assert!(!s.csrf_ok("forged"));
        let raw_present: bool = store
            .with_conn(|c| {
                c.query_row(
                    "SELECT EXISTS (SELECT 1 FROM sessions WHERE id_hash = ?1)",
                    [&id],
                    |r| r.get(0),
                )
            })
            .unwrap();
        assert!(!raw_present, "the session id itself must not be stored");
        end(&store, &id, "alice").unwrap();
        assert_eq!(lookup(&store, &id).unwrap(), None);
        let (expired, _) = create(&store, "bob", &[], "local", -1).unwrap();
        assert_eq!(lookup(&store, &expired).unwrap(), None);
        let actions: Vec<String> = store
            .audit_query(&Default::default())
            .unwrap()
            .into_iter()
            .map(|r| r.action)
            .collect();
        assert!(actions.contains(&"login".to_owned()) && actions.contains(&"logout".to_owned()));
    }
}
