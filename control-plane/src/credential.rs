//! Credentials as data: token scopes, the principal a token stands for, and the formats and
//! hashes of tokens. Checking them is [`crate::auth`]'s work; keeping them, the store's.
//!
//! A token reads `alk_<id>_<secret>`, an enrollment token `alkenroll_<id>_<secret>`; only the
//! SHA-256 of the whole token is stored.

use std::{fmt, str::FromStr};

use sha2::{Digest, Sha256};

/// What a token may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Scope {
    /// An agent's credential.
    Agent,
    /// Read requests.
    Read,
    /// Read and decide.
    Approve,
    /// Everything.
    Admin,
    /// A one-time enrollment token (never a bearer token).
    Enroll,
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Scope::Agent => "agent",
            Scope::Read => "read",
            Scope::Approve => "approve",
            Scope::Admin => "admin",
            Scope::Enroll => "enroll",
        })
    }
}

impl FromStr for Scope {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "agent" => Ok(Scope::Agent),
            "read" => Ok(Scope::Read),
            "approve" => Ok(Scope::Approve),
            "admin" => Ok(Scope::Admin),
            "enroll" => Ok(Scope::Enroll),
            other => Err(format!(
                "unknown scope {other:?} (agent, read, approve, admin or enroll)"
            )),
        }
    }
}

/// The authenticated caller, put in each request's extensions by the authentication layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// Identity: the approver's name, or the agent's host id.
    pub name: String,
    /// What it may do.
    pub scope: Scope,
}

impl Principal {
    /// May this principal decide requests?
    pub fn may_vote(&self) -> bool {
        matches!(self.scope, Scope::Approve | Scope::Admin)
    }
}

/// SHA-256 (hex) of a whole token.
pub fn token_hash(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// Compares two byte strings in time that depends only on their lengths.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// `bytes` random bytes from the kernel, as hex.
pub fn random_hex(bytes: usize) -> std::io::Result<String> {
    use std::io::Read;
    let mut buf = vec![0u8; bytes];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut buf)?;
    Ok(hex::encode(buf))
}

/// A new random token for `id`.
pub fn new_token(id: &str) -> std::io::Result<String> {
    Ok(format!("alk_{id}_{}", random_hex(24)?))
}

/// The id part of a bearer token; `None` if `token` is not one.
pub fn token_id(token: &str) -> Option<&str> {
    token
        .strip_prefix("alk_")
        .and_then(|t| t.split('_').next())
        .filter(|id| !id.is_empty())
}

/// How enrollment tokens begin. Unlike `alk_`, so that one can never be taken for a bearer
/// token, and so that the authentication layer can tell someone who sends one what it is for.
pub const ENROLL_PREFIX: &str = "alkenroll_";

/// A new random enrollment token for `id`.
pub fn new_enrollment_token(id: &str) -> std::io::Result<String> {
    Ok(format!("{ENROLL_PREFIX}{id}_{}", random_hex(24)?))
}

/// The id part of an enrollment token; `None` if `token` is not one.
pub fn enrollment_token_id(token: &str) -> Option<&str> {
    token
        .strip_prefix(ENROLL_PREFIX)
        .and_then(|t| t.split('_').next())
        .filter(|id| !id.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_random_and_hash_stably() {
        let a = new_token("x").unwrap();
        let b = new_token("x").unwrap();
        assert_ne!(a, b);
        assert!(a.starts_with("alk_x_"));
        assert_eq!(token_id(&a), Some("x"));
        assert_eq!(token_hash(&a), token_hash(&a));
        assert_ne!(token_hash(&a), token_hash(&b));
    }

    #[test]
    fn scope_parses_and_agents_never_vote() {
        assert_eq!("approve".parse::<Scope>().unwrap(), Scope::Approve);
        assert!("root"
            .parse::<Scope>()
            .unwrap_err()
            .contains("unknown scope"));
        let agent = Principal {
            name: "h".into(),
            scope: Scope::Agent,
        };
        assert!(!agent.may_vote());
        assert_eq!("enroll".parse::<Scope>().unwrap(), Scope::Enroll);
    }

    #[test]
    fn enrollment_tokens_are_not_bearer_tokens() {
        let t = new_enrollment_token("abc").unwrap();
        assert!(!t.starts_with("alk_"), "{t}");
        assert_eq!(enrollment_token_id(&t), Some("abc"));
        assert_eq!(token_id(&t), None);
        assert_eq!(enrollment_token_id(&new_token("abc").unwrap()), None);
        assert_eq!(enrollment_token_id("alkenroll__x"), None);
    }
}
