//! Local web UI accounts: names, groups and Argon2id password hashes in the store. They are the
//! embedded default login; OIDC can sit beside them. Hashing takes tens of milliseconds of CPU
//! on purpose, so it runs on tokio's blocking threads, never on an async worker.

use argon2::{
    password_hash::{rand_core::OsRng, PasswordHash, PasswordHasher, PasswordVerifier, SaltString},
    Argon2,
};

pub use crate::store::people::Account;
use crate::store::{people::AccountChange, Store, StoreError};

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

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, AccountError> + Send + 'static,
) -> Result<T, AccountError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| AccountError::Hash(e.to_string()))?
}

async fn hash(password: &str) -> Result<String, AccountError> {
    if password.chars().count() < MIN_PASSWORD {
        return Err(AccountError::Invalid(format!(
            "a password needs at least {MIN_PASSWORD} characters"
        )));
    }
    let password = password.to_owned();
    blocking(move || {
        Argon2::default()
            .hash_password(password.as_bytes(), &SaltString::generate(&mut OsRng))
            .map(|h| h.to_string())
            .map_err(|e| AccountError::Hash(e.to_string()))
    })
    .await
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
pub async fn create(
    store: &Store,
    name: &str,
    password: &str,
    groups: &[String],
) -> Result<Account, AccountError> {
    check_name(name)?;
    let hash = hash(password).await?;
    if !store.insert_account(name, &hash, groups).await? {
        return Err(AccountError::Exists(name.into()));
    }
    Ok(Account {
        name: name.into(),
        groups: groups.to_vec(),
        created_ms: crate::types::now_ms(),
    })
}

/// Sets a new password for `name` and ends the account's sessions.
pub async fn set_password(store: &Store, name: &str, password: &str) -> Result<(), AccountError> {
    let hash = hash(password).await?;
    change(store, name, AccountChange::Password(hash)).await
}

/// Deletes account `name` and ends its sessions.
pub async fn remove(store: &Store, name: &str) -> Result<(), AccountError> {
    change(store, name, AccountChange::Remove).await
}

async fn change(store: &Store, name: &str, c: AccountChange) -> Result<(), AccountError> {
    if store.change_account(name, c).await? {
        Ok(())
    } else {
        Err(AccountError::NotFound(name.into()))
    }
}

/// Every account, by name.
pub async fn list(store: &Store) -> Result<Vec<Account>, AccountError> {
    Ok(store.accounts().await?)
}

/// Whether any account exists.
pub async fn any(store: &Store) -> Result<bool, AccountError> {
    Ok(!store.accounts().await?.is_empty())
}

/// The account `name` if `password` is its password. Slow on purpose (Argon2id); an unknown
/// name costs the same as a wrong password, so timing does not reveal which names exist.
pub async fn verify(
    store: &Store,
    name: &str,
    password: &str,
) -> Result<Option<Account>, AccountError> {
    let row = store.account(name).await?;
    // Checked when the name is unknown: a hash of a random password, made once.
    static DUMMY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    let password = password.to_owned();
    let stored = row.as_ref().map(|r| r.1.clone());
    let ok = blocking(move || {
        let dummy = DUMMY.get_or_init(|| {
            Argon2::default()
                .hash_password(
                    SaltString::generate(&mut OsRng).as_str().as_bytes(),
                    &SaltString::generate(&mut OsRng),
                )
                .map(|h| h.to_string())
                .unwrap_or_default()
        });
        let stored = stored.as_deref().unwrap_or(dummy);
        Ok(PasswordHash::new(stored).is_ok_and(|h| {
            Argon2::default()
                .verify_password(password.as_bytes(), &h)
                .is_ok()
        }))
    })
    .await?;
    Ok(row.filter(|_| ok).map(|(a, _)| a))
}
