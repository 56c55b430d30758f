//! `TokensService`: admin tokens create and revoke API tokens and enrollment tokens.

use airlock_proto::v1::{
    tokens_service_server::TokensService, CreateTokenRequest, CreateTokenResponse,
    RevokeTokenRequest, RevokeTokenResponse,
};
use tonic::{Request, Response, Status};

use super::status_of;
use crate::{
    auth::{self, enroll, Scope},
    store::{Store, StoreError},
};

/// `TokensService`: admin tokens only.
pub struct TokensSvc {
    /// Where tokens live.
    pub store: Store,
}

fn admin<T>(req: &Request<T>) -> Result<String, Status> {
    let who = auth::principal(req)?;
    if who.scope != Scope::Admin {
        return Err(Status::permission_denied(format!(
            "{} has a {} token; managing tokens needs an admin token",
            who.name, who.scope
        )));
    }
    Ok(who.name)
}

#[tonic::async_trait]
impl TokensService for TokensSvc {
    async fn create(
        &self,
        req: Request<CreateTokenRequest>,
    ) -> Result<Response<CreateTokenResponse>, Status> {
        let by = admin(&req)?;
        let r = req.into_inner();
        if r.name.trim().is_empty() {
            return Err(Status::invalid_argument("a token needs a name"));
        }
        let scope: Scope = r.scope.parse().map_err(Status::invalid_argument)?;
        if scope == Scope::Enroll {
            let ttl = match r.ttl_hours {
                0 => enroll::DEFAULT_TTL,
                h => std::time::Duration::from_secs(u64::from(h) * 3600),
            };
            let host = Some(r.host_id.as_str()).filter(|h| !h.is_empty());
            let created = enroll::create(&self.store, &r.name, host, ttl, &by).await?;
            return Ok(Response::new(CreateTokenResponse {
                token: created.token,
            }));
        }
        if r.ttl_hours != 0 || !r.host_id.is_empty() {
            return Err(Status::invalid_argument(
                "ttl_hours and host_id are for scope enroll only; other tokens last until revoked",
            ));
        }
        let token = self
            .store
            .create_token_by(&r.name, scope, &by)
            .await
            .map_err(|e| match e {
                StoreError::TokenExists(_) => Status::already_exists(e.to_string()),
                other => status_of(other),
            })?;
        tracing::info!(name = %r.name, %scope, by = %by, "token created");
        Ok(Response::new(CreateTokenResponse { token }))
    }

    async fn revoke(
        &self,
        req: Request<RevokeTokenRequest>,
    ) -> Result<Response<RevokeTokenResponse>, Status> {
        let by = admin(&req)?;
        let name = req.into_inner().name;
        if !self
            .store
            .revoke_token_by(&name, &by)
            .await
            .map_err(status_of)?
        {
            return Err(Status::not_found(format!("no active token named {name:?}")));
        }
        tracing::info!(name = %name, by = %by, "token revoked");
        Ok(Response::new(RevokeTokenResponse {}))
    }
}
