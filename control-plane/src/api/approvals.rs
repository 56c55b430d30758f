//! `ApprovalService`: list, watch and decide held requests.
//!
//! Who may decide: a caller whose token has the approve or admin scope, as the token's identity
//! (agent credentials never vote); the rest of the rules are in [`crate::decide`].

use std::{pin::Pin, sync::Arc};

use airlock_proto::v1::{
    approval_service_server::ApprovalService, CancelRequest, DecideRequest, GetRequestRequest,
    Grant, HeldRequest, ListGrantsRequest, ListGrantsResponse, ListRequestsRequest,
    ListRequestsResponse, RequestState, RevokeGrantRequest, Verdict, WatchRequestsRequest,
};
use tokio_stream::{wrappers::BroadcastStream, Stream, StreamExt};
use tonic::{Request, Response, Status};

use crate::{
    agents::Agents,
    auth,
    decide::{Approver, Decisions},
    store::{Store, StoreError},
};

/// The gRPC service.
pub struct ApprovalSvc {
    /// Requests.
    pub store: Arc<Store>,
    /// Where decisions go.
    pub agents: Arc<Agents>,
    /// Counters.
    pub metrics: Arc<crate::http::Metrics>,
    /// The vote path.
    pub decisions: Decisions,
    /// Becomes true when the server stops: watch streams end then.
    pub closing: tokio::sync::watch::Receiver<bool>,
}

fn status_of(e: StoreError) -> Status {
    match e {
        StoreError::NotFound(_) => Status::not_found(e.to_string()),
        StoreError::NotPending { .. } | StoreError::AlreadyVoted { .. } => {
            Status::failed_precondition(e.to_string())
        }
        StoreError::TokenExists(_) | StoreError::IdConflict { .. } => {
            Status::already_exists(e.to_string())
        }
        StoreError::BadPageToken(_) | StoreError::NotBearerScope => {
            Status::invalid_argument(e.to_string())
        }
        StoreError::Db { .. } | StoreError::Corrupt(_) | StoreError::Random(_) => {
            tracing::error!(error = %e, "store failure");
            Status::internal("the control plane could not read or write its database")
        }
    }
}

/// The gRPC status for a refused or failed vote.
pub fn status_of_decide(e: crate::decide::DecideError) -> Status {
    use crate::decide::DecideError;
    match e {
        DecideError::Invalid(m) => Status::invalid_argument(m),
        DecideError::Forbidden(m) => Status::permission_denied(m),
        DecideError::Store(e) => status_of(e),
    }
}

/// Resolves once `closing` is true (or its sender is gone).
async fn stopped(closing: &mut tokio::sync::watch::Receiver<bool>) {
    loop {
        let now = *closing.borrow_and_update();
        if now || closing.changed().await.is_err() {
            return;
        }
    }
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<HeldRequest, Status>> + Send>>;

#[tonic::async_trait]
impl ApprovalService for ApprovalSvc {
    async fn list(
        &self,
        req: Request<ListRequestsRequest>,
    ) -> Result<Response<ListRequestsResponse>, Status> {
        let (requests, next_page_token) = self.store.list(req.get_ref()).map_err(status_of)?;
        Ok(Response::new(ListRequestsResponse {
            requests,
            next_page_token,
        }))
    }

    async fn get(&self, req: Request<GetRequestRequest>) -> Result<Response<HeldRequest>, Status> {
        self.store
            .get(&req.get_ref().request_id)
            .map(Response::new)
            .map_err(status_of)
    }

    type WatchStream = WatchStream;

    async fn watch(
        &self,
        req: Request<WatchRequestsRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        // Subscribe before listing, so nothing falls between the two.
        let changes =
            BroadcastStream::new(self.store.subscribe()).filter_map(|r| r.ok().map(|c| Ok(c.held)));
        let mut first: Vec<Result<HeldRequest, Status>> = Vec::new();
        if req.get_ref().include_pending {
            let q = ListRequestsRequest {
                state: RequestState::Pending as i32,
                limit: 10_000,
                ..Default::default()
            };
            first = self
                .store
                .list(&q)
                .map_err(status_of)?
                .0
                .into_iter()
                .rev()
                .map(Ok)
                .collect();
        }
        // Forwarded through a channel so the stream ends when the server stops; a graceful
        // shutdown would otherwise wait for every watcher to hang up.
        let (tx, rx) = tokio::sync::mpsc::channel(256);
        let mut closing = self.closing.clone();
        tokio::spawn(async move {
            let mut items = std::pin::pin!(tokio_stream::iter(first).chain(changes));
            loop {
                tokio::select! {
                    _ = stopped(&mut closing) => break,
                    item = items.next() => {
                        let Some(i) = item else { break };
                        if tx.send(i).await.is_err() {
                            break;
                        }
                    }
                }
            }
        });
        Ok(Response::new(
            Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx)) as WatchStream,
        ))
    }

    async fn decide(&self, req: Request<DecideRequest>) -> Result<Response<HeldRequest>, Status> {
        let who = auth::principal(&req)?;
        if !who.may_vote() {
            return Err(Status::permission_denied(format!(
                "{} has a {} token, which cannot decide requests",
                who.name, who.scope
            )));
        }
        let mut d = req.into_inner();
        if d.approver.is_empty() {
            d.approver = who.name.clone();
        } else if d.approver != who.name {
            return Err(Status::permission_denied(format!(
                "the token belongs to {}, not {}",
                who.name, d.approver
            )));
        }
        let verdict = Verdict::try_from(d.verdict).unwrap_or(Verdict::Unspecified);
        let held = self
            .decisions
            .decide(
                &Approver::named(d.approver),
                &d.request_id,
                verdict,
                &d.reason,
                d.grant_minutes,
            )
            .map_err(status_of_decide)?;
        Ok(Response::new(held))
    }

    async fn list_grants(
        &self,
        req: Request<ListGrantsRequest>,
    ) -> Result<Response<ListGrantsResponse>, Status> {
        Ok(Response::new(ListGrantsResponse {
            grants: self
                .store
                .list_grants(req.get_ref().all)
                .map_err(status_of)?,
        }))
    }

    async fn revoke_grant(
        &self,
        req: Request<RevokeGrantRequest>,
    ) -> Result<Response<Grant>, Status> {
        let who = auth::principal(&req)?;
        if !who.may_vote() {
            return Err(Status::permission_denied(format!(
                "{} has a {} token, which cannot revoke grants",
                who.name, who.scope
            )));
        }
        let g = self
            .store
            .revoke_grant(&req.get_ref().grant_id, &who.name)
            .map_err(status_of)?;
        tracing::info!(grant = %g.id, by = %who.name, "grant revoked");
        Ok(Response::new(g))
    }

    async fn cancel(&self, req: Request<CancelRequest>) -> Result<Response<HeldRequest>, Status> {
        let who = auth::principal(&req)?;
        if !who.may_vote() {
            return Err(Status::permission_denied(format!(
                "{} has a {} token, which cannot cancel requests",
                who.name, who.scope
            )));
        }
        let c = req.into_inner();
        if c.reason.trim().is_empty() {
            return Err(Status::invalid_argument("a cancel needs a reason"));
        }
        let held = self
            .store
            .cancel(&c.request_id, &who.name, &c.reason)
            .map_err(status_of)?;
        tracing::info!(request = %c.request_id, by = %who.name, "cancelled");
        self.metrics.decided("cancelled");
        self.agents.deliver(&held);
        Ok(Response::new(held))
    }
}
