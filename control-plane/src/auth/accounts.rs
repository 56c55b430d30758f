//! Local web UI accounts: names, groups and Argon2id password hashes in the control plane's
//! database. They are the embedded default login; OIDC can sit beside them.

use argon2::{
    password_hash::{rand_core::OsRng, PasswordHash, PasswordHasher, PasswordVerifier, SaltString},
    Argon2,
};
use rusqlite::{params, OptionalExtension};
use serde_json::json;

use crate::store::{now_ms, Store, StoreError};

/// The accounts table.
pub const SCHEMA: &str = "CREATE TABLE IF NOT EXISTS accounts (
    name TEXT PRIMARY KEY,
    hash TEXT NOT NULL,
    groups TEXT NOT NULL,
    created_ms INTEGER NOT NULL
);";

/// Shortest password accepted.
pub const MIN_PASSWORD: usize = 12;

/// Why an account operation was refused.
#[derive(Debug, thiserror::Error)]
pub enum AccountError {
    /// Bad name, groups or password.
    #[error("{0}")]
    Invalid(String),
    /// The name is taken.
    #[error("an account named {0:?} already exists")]
    Exists(String),
    /// No such account.
    #[error("no account named {0:?}")]
    NotFound(String),
    /// Hashing failed.
    #[error("password hashing failed: {0}")]
    Hash(String),
    /// The database failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

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

fn hash(password: &str) -> Result<String, AccountError> {
    if password.chars().count() < MIN_PASSWORD {
        return Err(AccountError::Invalid(format!(
            "a password needs at least {MIN_PASSWORD} characters"
        )));
    }
    Argon2::default()
        .hash_password(password.as_bytes(), &SaltString::generate(&mut OsRng))
        .map(|h| h.to_string())
        .map_err(|e| AccountError::Hash(e.to_string()))
}

/// Checks that `name` can be an account name.
pub fn check_name(name: &str) -> Result<(), AccountError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._@-".contains(c));
    if ok {
        Ok(())
    } else {
        Err(AccountError::Invalid(format!(
            "account name {name:?}: use 1 to 64 letters, digits, '.', '_', '@' or '-'"
        )))
    }
}

/// Creates account `name` with `password` and `groups`.
pub fn create(
    store: &Store,
    name: &str,
    password: &str,
    groups: &[String],
) -> Result<Account, AccountError> {
    check_name(name)?;
    let hash = hash(password)?;
    let now = now_ms();
    let groups_json = json!(groups).to_string();
    let inserted = store.with_conn(|conn| {
        let tx = conn.transaction()?;
        let n = tx.execute(
            "INSERT OR IGNORE INTO accounts (name, hash, groups, created_ms) VALUES (?1, ?2, ?3, ?4)",
            params![name, hash, groups_json, now],
        )?;
        if n == 0 {
            return Ok(None);
        }
        let record = Store::audit_in(
            &tx,
            "server",
            "account.created",
            "",
            &json!({ "name": name, "groups": groups }).to_string(),
        )?;
        tx.commit()?;
        Ok(Some(record))
    })?;
    let record = inserted.ok_or_else(|| AccountError::Exists(name.into()))?;
    store.checkpointed(&record);
    Ok(Account {
        name: name.into(),
        groups: groups.to_vec(),
        created_ms: now,
    })
}

/// Sets a new password for `name` and ends the account's sessions.
pub fn set_password(store: &Store, name: &str, password: &str) -> Result<(), AccountError> {
    let hash = hash(password)?;
    change(store, name, "account.password", |tx| {
        tx.execute(
            "UPDATE accounts SET hash = ?2 WHERE name = ?1",
            params![name, hash],
        )
    })
}

/// Deletes account `name` and ends its sessions.
pub fn remove(store: &Store, name: &str) -> Result<(), AccountError> {
    change(store, name, "account.removed", |tx| {
        tx.execute("DELETE FROM accounts WHERE name = ?1", [name])
    })
}

/// Runs `edit` on account `name` and, if it touched the account, ends the account's sessions
/// (whoever logged in before is logged out) and audits `action`, all in one transaction.
fn change(
    store: &Store,
    name: &str,
    action: &str,
    edit: impl FnOnce(&rusqlite::Transaction<'_>) -> rusqlite::Result<usize>,
) -> Result<(), AccountError> {
    let record = store.with_conn(|conn| {
        let tx = conn.transaction()?;
        if edit(&tx)? == 0 {
            return Ok(None);
        }
        tx.execute(
            "DELETE FROM sessions WHERE name = ?1 AND via = 'local'",
            [name],
        )?;
        let payload = json!({ "name": name }).to_string();
        let r = Store::audit_in(&tx, "server", action, "", &payload)?;
        tx.commit()?;
        Ok(Some(r))
    })?;
    let record = record.ok_or_else(|| AccountError::NotFound(name.into()))?;
    store.checkpointed(&record);
    Ok(())
}

/// Every account, by name.
pub fn list(store: &Store) -> Result<Vec<Account>, AccountError> {
    Ok(store.with_conn(|conn| {
        let mut stmt =
            conn.prepare("SELECT name, groups, created_ms FROM accounts ORDER BY name")?;
        let rows = stmt.query_map([], |r| {
            let groups: String = r.get(1)?;
            Ok(Account {
                name: r.get(0)?,
                groups: serde_json::from_str(&groups).unwrap_or_default(),
                created_ms: r.get(2)?,
            })
        })?;
        rows.collect()
    })?)
}

/// Whether any account exists.
pub fn any(store: &Store) -> Result<bool, AccountError> {
    Ok(store.with_conn(|conn| {
        conn.query_row("SELECT EXISTS (SELECT 1 FROM accounts)", [], |r| r.get(0))
    })?)
}

/// The account `name` if `password` is its password. Slow on purpose (Argon2id); an unknown
/// name costs the same as a wrong password, so timing does not reveal which names exist.
pub fn verify(store: &Store, name: &str, password: &str) -> Result<Option<Account>, AccountError> {
    let row: Option<(String, String, i64)> = store.with_conn(|conn| {
        conn.query_row(
            "SELECT hash, groups, created_ms FROM accounts WHERE name = ?1",
            [name],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .optional()
    })?;
    // Checked when the name is unknown: a hash of a random password, made once.
    static DUMMY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    let dummy = DUMMY.get_or_init(|| {
        Argon2::default()
            .hash_password(
                SaltString::generate(&mut OsRng).as_str().as_bytes(),
                &SaltString::generate(&mut OsRng),
            )
            .map(|h| h.to_string())
            .unwrap_or_default()
    });
    let stored = row.as_ref().map_or(dummy.as_str(), |r| r.0.as_str());
    let ok = PasswordHash::new(stored).is_ok_and(|h| {
        Argon2::default()
            .verify_password(password.as_bytes(), &h)
            .is_ok()
    });
    Ok(match row {
        Some((_, groups, created_ms)) if ok => Some(Account {
            name: name.into(),
            groups: serde_json::from_str(&groups).unwrap_or_default(),
            created_ms,
        }),
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_verify_change_remove() {
        let store = Store::in_memory().unwrap();
        assert!(!any(&store).unwrap());
        let groups = vec!["oncall".to_owned()];
        create(&store, "alice", "correct horse battery", &groups).unwrap();
        assert!(matches!(
            create(&store, "alice", "another long password", &[]),
            Err(AccountError::Exists(_))
        ));
        assert!(matches!(
            create(&store, "bob", "short", &[]),
            Err(AccountError::Invalid(_))
        ));
        assert!(matches!(
            create(&store, "bad name", "long enough password", &[]),
            Err(AccountError::Invalid(_))
        ));
        let a = verify(&store, "alice", "correct horse battery")
            .unwrap()
            .unwrap();
        assert_eq!(a.groups, groups);
        assert!(verify(&store, "alice", "wrong password!!")
            .unwrap()
            .is_none());
        assert!(verify(&store, "nobody", "correct horse battery")
            .unwrap()
            .is_none());
        set_password(&store, "alice", "a brand new passphrase").unwrap();
        assert!(verify(&store, "alice", "correct horse battery")
            .unwrap()
            .is_none());
        assert!(verify(&store, "alice", "a brand new passphrase")
            .unwrap()
            .is_some());
        let (sid, _) =
            crate::web::session::create(&store, "alice", &groups, "local", 60_000).unwrap();
        remove(&store, "alice").unwrap();
        assert!(list(&store).unwrap().is_empty());
        assert_eq!(
            crate::web::session::lookup(&store, &sid).unwrap(),
            None,
            "removing an account ends its sessions"
        );
        let audit = store.audit_query(&Default::default()).unwrap();
        let actions: Vec<&str> = audit.iter().map(|r| r.action.as_str()).collect();
        for action in ["account.created", "account.password", "account.removed"] {
            assert!(actions.contains(&action), "{action} audited: {actions:?}");
        }
        // Every column of every audit row, as stored: no password, old or new, in any of them.
        let rows: Vec<String> = store
            .with_conn(|c| {
                let mut stmt = c.prepare("SELECT * FROM audit ORDER BY seq")?;
                let columns = stmt.column_count();
                let rows = stmt.query_map([], |r| {
                    (0..columns)
                        .map(|i| {
                            Ok(match r.get_ref(i)? {
                                rusqlite::types::ValueRef::Text(t)
                                | rusqlite::types::ValueRef::Blob(t) => {
                                    String::from_utf8_lossy(t).into_owned()
                                }
                                v => format!("{v:?}"),
                            })
                        })
                        .collect::<rusqlite::Result<Vec<_>>>()
                        .map(|cells| cells.join("\u{1f}"))
                })?;
                rows.collect()
            })
            .unwrap();
        assert_eq!(rows.len(), audit.len());
        assert!(
            rows.iter().any(|r| r.contains("\"name\":\"alice\"")),
            "the payloads are read: {rows:?}"
        );
        for password in ["correct horse battery", "a brand new passphrase"] {
            for row in &rows {
                assert!(!row.contains(password), "audit row leaks a password: {row}");
            }
        }
    }
}
