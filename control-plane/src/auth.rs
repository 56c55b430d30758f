//! Who is calling: bearer tokens with a scope, stored hashed.
//!
//! - `agent`: an agent's credential; may open the agent stream, never vote.
//! - `read`: may list and watch requests.
//! - `approve`: may also decide, as the token's identity.
//! - `admin`: everything.
//!
//! A token reads `alk_<id>_<secret>`; only the SHA-256 of the whole token is stored.

use std::{fmt, str::FromStr, sync::Arc};

use sha2::{Digest, Sha256};
use tonic::{service::Interceptor, Request, Status};

use crate::store::Store;

/// What a token may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Scope {
    /// An agent's credential.
    Agent,
    /// Read requests.
    Read,
    /// Read and decide.
    Approve,
    /// Everything.
    Admin,
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Scope::Agent => "agent",
            Scope::Read => "read",
            Scope::Approve => "approve",
            Scope::Admin => "admin",
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
            other => Err(format!(
                "unknown scope {other:?} (agent, read, approve or admin)"
            )),
        }
    }
}

/// The authenticated caller, put in each request's extensions by the interceptors.
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

fn bearer<T>(req: &Request<T>) -> Result<&str, Status> {
    let value = req
        .metadata()
        .get("authorization")
        .ok_or_else(|| Status::unauthenticated("missing authorization: Bearer <token>"))?;
    let value = value
        .to_str()
        .map_err(|_| Status::unauthenticated("authorization header is not text"))?;
    value
        .strip_prefix("Bearer ")
        .map(str::trim)
        .ok_or_else(|| Status::unauthenticated("authorization must be \"Bearer <token>\""))
}

/// Interceptor that admits only tokens whose scope is in `allowed`.
#[derive(Clone)]
pub struct Auth {
    store: Arc<Store>,
    allowed: &'static [Scope],
}

impl Auth {
    /// For the agent stream.
    pub fn agents(store: Arc<Store>) -> Self {
        Self {
            store,
            allowed: &[Scope::Agent],
        }
    }

    /// For approvers and integrations.
    pub fn people(store: Arc<Store>) -> Self {
        Self {
            store,
            allowed: &[Scope::Read, Scope::Approve, Scope::Admin],
        }
    }
}

impl Interceptor for Auth {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        let token = bearer(&req)?;
        let principal = match self.store.principal(token) {
            Ok(Some(p)) => p,
            Ok(None) => return Err(Status::unauthenticated("unknown or revoked token")),
            Err(e) => {
                tracing::error!(error = %e, "token lookup failed");
                return Err(Status::internal("could not check the token"));
            }
        };
        if !self.allowed.contains(&principal.scope) {
            return Err(Status::permission_denied(format!(
                "a {} token cannot use this service",
                principal.scope
            )));
        }
        req.extensions_mut().insert(principal);
        Ok(req)
    }
}

/// The principal the interceptor admitted.
pub fn principal<T>(req: &Request<T>) -> Result<Principal, Status> {
    req.extensions()
        .get::<Principal>()
        .cloned()
        .ok_or_else(|| Status::unauthenticated("no credentials"))
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
    }
}
