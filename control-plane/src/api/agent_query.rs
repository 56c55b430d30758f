//! What an agent may ask about its own host (`AgentQueryService`): how an action would be
//! routed, one of its requests, its recent requests for one account. For the AI agents on that
//! host (`airlock-agent mcp`); the agent checks which local account asks, the credential here
//! limits every answer to the agent's own host.

use airlock_proto::v1::{
    agent_query_service_server::AgentQueryService, GetHostRequest, HeldRequest,
    ListRequestsRequest, RecentAnswer, RecentQuery, RouteAnswer, RouteQuery,
};
use tonic::{Request, Response, Status};

use super::status_of;
use crate::{
    policy::{self, SharedPolicy},
    store::{
        requests::{ahead_env_ok, ahead_key, grant_key},
        Store,
    },
    types::now_ms,
};

/// Most requests [`AgentQueryService::recent`] returns.
const MAX_RECENT: u32 = 100;

/// The gRPC service.
pub struct AgentQuerySvc {
    /// Requests and grants.
    pub store: Store,
    /// The approval policy in force.
    pub policy: SharedPolicy,
}

#[tonic::async_trait]
impl AgentQueryService for AgentQuerySvc {
    async fn route(&self, req: Request<RouteQuery>) -> Result<Response<RouteAnswer>, Status> {
        let host = crate::auth::principal(&req)?.name;
        let q = req.into_inner();
        let request = q
            .request
            .ok_or_else(|| Status::invalid_argument("route: request is missing"))?;
        let (account, login_user) = request
            .process
            .as_ref()
            .map(|p| (p.user.clone(), p.login_user.clone()))
            .unwrap_or_default();
        let labels = q.labels.into_iter().collect();
        let route =
            policy::current(&self.policy).route(&request.rule, &labels, &account, &login_user);
        let held = HeldRequest {
            request: Some(request),
            host_id: host.clone(),
            ..Default::default()
        };
        let (_, _, key) = grant_key(&held);
        let ahead = ahead_key(&held);
        let now = now_ms();
        let grant = self
            .store
            .list_grants(false)
            .await
            .map_err(status_of)?
            .into_iter()
            .filter(|g| {
                g.host_id == host
                    && g.account == account
                    && (g.action == key || g.action == ahead)
                    && g.expires_unix_ms > now
                    && ahead_env_ok(g, &held)
            })
            .max_by_key(|g| g.expires_unix_ms);
        Ok(Response::new(RouteAnswer {
            route: route.rule,
            groups: route.groups,
            quorum: route.quorum,
            grant_id: grant.as_ref().map(|g| g.id.clone()).unwrap_or_default(),
            grant_by: grant
                .as_ref()
                .map(|g| g.created_by.clone())
                .unwrap_or_default(),
            grant_expires_unix_ms: grant.map_or(0, |g| g.expires_unix_ms),
        }))
    }

    async fn get(&self, req: Request<GetHostRequest>) -> Result<Response<HeldRequest>, Status> {
        let host = crate::auth::principal(&req)?.name;
        let id = req.into_inner().request_id;
        let held = self.store.get(&id).await.map_err(status_of)?;
        // Another host's request is as unknown as a missing one.
        if held.host_id != host {
            return Err(Status::not_found(format!("request {id:?} not found")));
        }
        Ok(Response::new(held))
    }

    async fn recent(&self, req: Request<RecentQuery>) -> Result<Response<RecentAnswer>, Status> {
        let host = crate::auth::principal(&req)?.name;
        let q = req.into_inner();
        if q.account.is_empty() {
            return Err(Status::invalid_argument("recent: account is empty"));
        }
        let (requests, _) = self
            .store
            .list(
                &ListRequestsRequest {
                    host_id: host,
                    account: q.account,
                    limit: q.limit.clamp(1, MAX_RECENT),
                    ..Default::default()
                },
                MAX_RECENT,
            )
            .await
            .map_err(status_of)?;
        Ok(Response::new(RecentAnswer { requests }))
    }
}
