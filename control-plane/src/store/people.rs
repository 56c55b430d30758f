//! Local web UI accounts (their Argon2id hashes, made and checked by [`crate::auth::accounts`])
//! and web sessions (only the hash of a session id is kept). Changes are audited.

use serde_json::json;

use super::{sql::args, Store, StoreError};
use crate::types::now_ms;

/// A local account, without its hash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Account {
    /// Login name, also the approver identity.
    pub name: String,
    /// Approver groups the account belongs to (besides the policy's `[groups]`).
    pub groups: Vec<String>,
    /// Creation time, Unix ms.
    pub created_ms: i64,
}

/// What to change about an account.
#[derive(Debug, Clone)]
pub enum AccountChange {
    /// A new password hash.
    Password(String),
    /// Delete it.
    Remove,
}

/// A logged-in person, as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredSession {
    /// Identity.
    pub name: String,
    /// Groups from the login.
    pub groups: Vec<String>,
    /// "local" or "oidc".
    pub via: String,
    /// The session's CSRF token.
    pub csrf: String,
    /// When it ends, Unix ms.
    pub expires_ms: i64,
}

fn groups(text: &str) -> Vec<String> {
    serde_json::from_str(text).unwrap_or_default()
}

impl Store {
    /// Creates account `name`; false if the name is taken.
    pub async fn insert_account(
        &self,
        name: &str,
        hash: &str,
        groups: &[String],
    ) -> Result<bool, StoreError> {
        let a = (name.to_owned(), hash.to_owned(), groups.to_vec());
        self.write(move |tx| {
            let (name, hash, groups) = a.clone();
            Box::pin(async move {
                let n = tx
                    .exec(
                        "INSERT INTO accounts (name, hash, groups, created_ms) VALUES ($1, $2, $3, $4)
                         ON CONFLICT (name) DO NOTHING",
                        args![&name, &hash, json!(groups).to_string(), now_ms()],
                    )
                    .await?;
                if n == 0 {
                    return Ok(false);
                }
                let payload = json!({ "name": name, "groups": groups }).to_string();
                tx.audit("server", "account.created", "", &payload, None)
                    .await?;
                Ok(true)
            })
        })
        .await
    }

    /// Changes account `name` and ends its local sessions, audited as `account.password` or
    /// `account.removed`; false if there is no such account.
    pub async fn change_account(
        &self,
        name: &str,
        change: AccountChange,
    ) -> Result<bool, StoreError> {
        let name = name.to_owned();
        self.write(move |tx| {
            let (name, change) = (name.clone(), change.clone());
            Box::pin(async move {
                let (n, action) = match &change {
                    AccountChange::Password(hash) => (
                        tx.exec(
                            "UPDATE accounts SET hash = $2 WHERE name = $1",
                            args![&name, hash],
                        )
                        .await?,
                        "account.password",
                    ),
                    AccountChange::Remove => (
                        tx.exec("DELETE FROM accounts WHERE name = $1", args![&name])
                            .await?,
                        "account.removed",
                    ),
                };
                if n == 0 {
                    return Ok(false);
                }
                tx.exec(
                    "DELETE FROM sessions WHERE name = $1 AND via = 'local'",
                    args![&name],
                )
                .await?;
                let payload = json!({ "name": name }).to_string();
                tx.audit("server", action, "", &payload, None).await?;
                Ok(true)
            })
        })
        .await
    }

    /// Every account, by name.
    pub async fn accounts(&self) -> Result<Vec<Account>, StoreError> {
        self.read(|tx| {
            Box::pin(async move {
                tx.rows(
                    "SELECT name, groups, created_ms FROM accounts ORDER BY name",
                    &[],
                )
                .await?
                .iter()
                .map(|r| {
                    Ok(Account {
                        name: r.text(0)?,
                        groups: groups(&r.text(1)?),
                        created_ms: r.int(2)?,
                    })
                })
                .collect()
            })
        })
        .await
    }

    /// Account `name` and its password hash.
    pub async fn account(&self, name: &str) -> Result<Option<(Account, String)>, StoreError> {
        let name = name.to_owned();
        self.read(move |tx| {
            let name = name.clone();
            Box::pin(async move {
                let Some(r) = tx
                    .row(
                        "SELECT hash, groups, created_ms FROM accounts WHERE name = $1",
                        args![&name],
                    )
                    .await?
                else {
                    return Ok(None);
                };
                let account = Account {
                    name,
                    groups: groups(&r.text(1)?),
                    created_ms: r.int(2)?,
                };
                Ok(Some((account, r.text(0)?)))
            })
        })
        .await
    }

    /// Stores a session (by the hash of its id) and audits the login; expired sessions go.
    pub async fn insert_session(&self, id_hash: &str, s: &StoredSession) -> Result<(), StoreError> {
        let a = (id_hash.to_owned(), s.clone());
        self.write(move |tx| {
            let (id_hash, s) = a.clone();
            Box::pin(async move {
                let now = now_ms();
                tx.exec("DELETE FROM sessions WHERE expires_ms <= $1", args![now])
                    .await?;
                tx.exec(
                    "INSERT INTO sessions (id_hash, name, groups, via, csrf, created_ms, expires_ms)
                     VALUES ($1, $2, $3, $4, $5, $6, $7)",
                    args![
                        &id_hash,
                        &s.name,
                        json!(s.groups).to_string(),
                        &s.via,
                        &s.csrf,
                        now,
                        s.expires_ms
                    ],
                )
                .await?;
                let payload = json!({ "via": s.via, "groups": s.groups }).to_string();
                tx.audit(&s.name, "login", "", &payload, None).await?;
                Ok(())
            })
        })
        .await
    }

    /// The live session whose id hashes to `id_hash`.
    pub async fn session(&self, id_hash: &str) -> Result<Option<StoredSession>, StoreError> {
        let id_hash = id_hash.to_owned();
        self.read(move |tx| {
            let id_hash = id_hash.clone();
            Box::pin(async move {
                let Some(r) = tx
                    .row(
                        "SELECT name, groups, via, csrf, expires_ms FROM sessions
                         WHERE id_hash = $1 AND expires_ms > $2",
                        args![&id_hash, now_ms()],
                    )
                    .await?
                else {
                    return Ok(None);
                };
                Ok(Some(StoredSession {
                    name: r.text(0)?,
                    groups: groups(&r.text(1)?),
                    via: r.text(2)?,
                    csrf: r.text(3)?,
                    expires_ms: r.int(4)?,
                }))
            })
        })
        .await
    }

    /// Ends the session whose id hashes to `id_hash`, audited as `name`'s logout.
    pub async fn end_session(&self, id_hash: &str, name: &str) -> Result<(), StoreError> {
        let a = (id_hash.to_owned(), name.to_owned());
        self.write(move |tx| {
            let (id_hash, name) = a.clone();
            Box::pin(async move {
                tx.exec("DELETE FROM sessions WHERE id_hash = $1", args![&id_hash])
                    .await?;
                tx.audit(&name, "logout", "", "{}", None).await?;
                Ok(())
            })
        })
        .await
    }
}
