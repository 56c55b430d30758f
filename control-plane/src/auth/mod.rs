//! Who is calling, and as whom they decide:
//!
//! - bearer tokens with a scope (`agent`, `read`, `approve`, `admin`), checked for every gRPC
//!   call by [`Authed`], through a cache that starts over whenever a token is created, revoked
//!   or replaced (on this replica at once, on the others when the change feed brings it);
//! - [`accounts`]: local web UI accounts (Argon2id);
//! - [`sessions`]: web sessions and their CSRF tokens;
//! - [`oidc`]: login through an OpenID Connect issuer;
//! - [`enroll`]: one-time enrollment tokens, traded for an agent's credential.
//!
//! An `agent` token opens only the agent stream, for its own host id, and never votes. An
//! enrollment token is not a bearer token at all: it is stored apart, no service admits it, and
//! its only use is the body of `EnrollmentService/Enroll`.

pub mod accounts;
pub mod enroll;
pub mod oidc;
pub mod revocation;
pub mod sessions;

use std::{
    collections::HashMap,
    convert::Infallible,
    sync::{Arc, Mutex},
    task::{Context, Poll},
};

pub use crate::credential::{
    constant_time_eq, enrollment_token_id, new_enrollment_token, new_token, random_hex, token_hash,
    Principal, Scope, ENROLL_PREFIX,
};
use tonic::{
    body::Body,
    codegen::{http, BoxFuture, Service},
    server::NamedService,
    Request, Status,
};

use crate::listen::Callers;
use crate::store::{Store, StoreError};

/// Most answers the token cache keeps before it starts over.
const CACHE: usize = 10_000;

/// Checks bearer tokens against the store, remembering recent answers until a token changes.
pub struct Tokens {
    store: Store,
    cache: Mutex<(u64, HashMap<String, Principal>)>,
}

impl Tokens {
    /// Checks tokens against `store`.
    pub fn new(store: Store) -> Arc<Self> {
        Arc::new(Self {
            store,
            cache: Mutex::default(),
        })
    }

    /// The cache, emptied first if a credential changed since it was filled.
    fn cache(&self) -> std::sync::MutexGuard<'_, (u64, HashMap<String, Principal>)> {
        let generation = self.store.credentials_generation();
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if cache.0 != generation {
            *cache = (generation, HashMap::new());
        }
        cache
    }

    /// The principal `token` stands for; `None` if unknown, malformed or revoked.
    pub async fn principal(&self, token: &str) -> Result<Option<Principal>, StoreError> {
        let hash = token_hash(token);
        let generation = {
            let cache = self.cache();
            if let Some(p) = cache.1.get(&hash) {
                return Ok(Some(p.clone()));
            }
            cache.0
        };
        let found = self.store.principal(token).await?;
        if let Some(p) = &found {
            let mut cache = self.cache();
            // Not if a credential changed while the store was asked: the answer may be old.
            if cache.0 == generation {
                if cache.1.len() >= CACHE {
                    cache.1.clear();
                }
                cache.1.insert(hash, p.clone());
            }
        }
        Ok(found)
    }
}

fn bearer(headers: &http::HeaderMap) -> Result<&str, Status> {
    let value = headers
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

/// The principal behind the request's bearer token, if its scope is one of `allowed`.
pub async fn authenticate(
    tokens: &Tokens,
    allowed: &[Scope],
    headers: &http::HeaderMap,
) -> Result<Principal, Status> {
    let token = bearer(headers)?;
    if token.starts_with(ENROLL_PREFIX) {
        return Err(Status::unauthenticated(
            "this is an enrollment token: it is not a bearer token; give it to the agent as \
             agent.enroll_token_file, which trades it for the agent's own credential",
        ));
    }
    let principal = match tokens.principal(token).await {
        Ok(Some(p)) => p,
        Ok(None) => return Err(Status::unauthenticated("unknown or revoked token")),
        Err(e) => {
            tracing::error!(error = %e, "token lookup failed");
            return Err(Status::unavailable(
                "could not check the token: the database is unavailable",
            ));
        }
    };
    if !allowed.contains(&principal.scope) {
        return Err(Status::permission_denied(format!(
            "a {} token cannot use this service",
            principal.scope
        )));
    }
    Ok(principal)
}

/// A gRPC service behind bearer-token authentication: calls whose token is unknown, revoked
/// or of another scope are refused before they reach it; the others carry their
/// [`Principal`] in their extensions.
#[derive(Clone)]
pub struct Authed<S> {
    inner: S,
    tokens: Arc<Tokens>,
    callers: Callers,
    allowed: &'static [Scope],
}

impl<S> Authed<S> {
    /// For the agent stream: agent tokens only. A call that passes vouches for its connection
    /// in `callers`.
    pub fn agents(inner: S, tokens: Arc<Tokens>, callers: Callers) -> Self {
        Self {
            inner,
            tokens,
            callers,
            allowed: &[Scope::Agent],
        }
    }

    /// For approvers and integrations. A call that passes vouches for its connection in
    /// `callers`.
    pub fn people(inner: S, tokens: Arc<Tokens>, callers: Callers) -> Self {
        Self {
            inner,
            tokens,
            callers,
            allowed: &[Scope::Read, Scope::Approve, Scope::Admin],
        }
    }
}

/// The ends of the connection that carried `req`, as the gRPC listener accepted it. (Under
/// TLS, tonic puts the TCP connection's info in the extensions beside the TLS info.)
fn ends_of<B>(req: &http::Request<B>) -> Option<crate::listen::Ends> {
    use tonic::transport::server::TcpConnectInfo;
    let info = req.extensions().get::<TcpConnectInfo>()?;
    Some((info.local_addr()?, info.remote_addr()?))
}

impl<S: NamedService> NamedService for Authed<S> {
    const NAME: &'static str = S::NAME;
}

impl<S> Service<http::Request<Body>> for Authed<S>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Infallible>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<Body>) -> Self::Future {
        // The clone that was made ready serves this call; a fresh one waits for the next.
        let ready = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, ready);
        let (tokens, allowed, callers) = (self.tokens.clone(), self.allowed, self.callers.clone());
        Box::pin(async move {
            // Read before the token is checked: a revocation from then on ends the response.
            let generation = tokens.store.credentials_generation();
            match authenticate(&tokens, allowed, req.headers()).await {
                Ok(p) => {
                    if let Some(ends) = ends_of(&req) {
                        callers.vouch(ends);
                    }
                    let token = bearer(req.headers()).map(str::to_owned).unwrap_or_default();
                    req.extensions_mut().insert(p);
                    let response = inner.call(req).await?;
                    Ok(revocation::end_when_revoked(
                        response, tokens, token, generation,
                    ))
                }
                Err(status) => Ok(status.into_http()),
            }
        })
    }
}

/// The principal the authentication layer admitted.
pub fn principal<T>(req: &Request<T>) -> Result<Principal, Status> {
    req.extensions()
        .get::<Principal>()
        .cloned()
        .ok_or_else(|| Status::unauthenticated("no credentials"))
}
