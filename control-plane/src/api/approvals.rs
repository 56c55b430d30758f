//! `ApprovalService`: list, watch and decide held requests.
//!
//! Who may decide: a caller whose token has the approve or admin scope, as the token's identity
//! (agent credentials never vote); the rest of the rules are in [`crate::decide`].
//!
//! A watcher hears of every change to every request, from any replica, in order; one that
//! reads slowly catches up from the table instead of losing events.

use std::pin::Pin;

use airlock_proto::v1::{
    approval_service_server::ApprovalService, CancelRequest, DecideRequest, GetRequestRequest,
    Grant, HeldRequest, ListGrantsRequest, ListGrantsResponse, ListRequestsRequest,
    ListRequestsResponse, RequestState, RevokeGrantRequest, Verdict, WatchRequestsRequest,
};
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use super::status_of;
use crate::{
    auth,
    config::Limits,
    decide::{Approver, DecideError, Decisions},
    metrics::Metrics,
    store::Store,
};

/// The gRPC service.
pub struct ApprovalSvc {
    /// Requests.
    pub store: Store,
    /// Counters.
    pub metrics: std::sync::Arc<Metrics>,
    /// The vote path.
    pub decisions: Decisions,
    /// Bounds on list calls.
    pub limits: Limits,
    /// Becomes true when the server stops: watch streams end then.
    pub closing: tokio::sync::watch::Receiver<bool>,
}

/// The gRPC status for a refused or failed vote.
pub fn status_of_decide(e: DecideError) -> Status {
    match e {
        DecideError::Invalid(m) => Status::invalid_argument(m),
        DecideError::Forbidden(m) => Status::permission_denied(m),
        DecideError::Store(e) => status_of(e),
    }
}

/// Resolves once `closing` is true (or its sender is gone).
pub async fn stopped(closing: &mut tokio::sync::watch::Receiver<bool>) {
    let _ = closing.wait_for(|c| *c).await;
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<HeldRequest, Status>> + Send>>;

fn voter<T>(req: &Request<T>, what: &str) -> Result<auth::Principal, Status> {
    let who = auth::principal(req)?;
    if !who.may_vote() {
        return Err(Status::permission_denied(format!(
            "{} has a {} token, which cannot {what}",
            who.name, who.scope
        )));
    }
    Ok(who)
}

impl ApprovalSvc {
    /// Every pending request, oldest first, page by page.
    async fn pending(&self) -> Result<Vec<HeldRequest>, Status> {
        let mut q = ListRequestsRequest {
            state: RequestState::Pending as i32,
            limit: self.limits.max_list,
            ..Default::default()
        };
        let mut all = Vec::new();
        loop {
            let (page, next) = self
                .store
                .list(&q, self.limits.max_list)
                .await
                .map_err(status_of)?;
            all.extend(page);
            if next.is_empty() {
                break;
            }
            q.page_token = next;
        }
        all.reverse();
        Ok(all)
    }
}

#[tonic::async_trait]
impl ApprovalService for ApprovalSvc {
    async fn list(
        &self,
        req: Request<ListRequestsRequest>,
    ) -> Result<Response<ListRequestsResponse>, Status> {
        let (requests, next_page_token) = self
            .store
            .list(req.get_ref(), self.limits.max_list)
            .await
            .map_err(status_of)?;
        Ok(Response::new(ListRequestsResponse {
            requests,
            next_page_token,
        }))
    }

    async fn get(&self, req: Request<GetRequestRequest>) -> Result<Response<HeldRequest>, Status> {
        self.store
            .get(&req.get_ref().request_id)
            .await
            .map(Response::new)
            .map_err(status_of)
    }

    type WatchStream = WatchStream;

    async fn watch(
        &self,
        req: Request<WatchRequestsRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        // Subscribe before listing, so nothing falls between the two.
        let changes = self.store.subscribe();
        let first = if req.get_ref().include_pending {
            self.pending().await?
        } else {
            Vec::new()
        };
        // Polled by the response itself: a watcher that reads slowly stops the polling, its
        // subscription falls behind and later reads what it missed from the table. The stream
        // ends when the server stops; a graceful shutdown would otherwise wait for every
        // watcher to hang up.
        let state = (first.into_iter(), changes, self.closing.clone());
        let stream =
            futures::stream::unfold(state, |(mut first, mut changes, mut closing)| async move {
                if let Some(h) = first.next() {
                    return Some((Ok(h), (first, changes, closing)));
                }
                loop {
                    tokio::select! {
                        _ = stopped(&mut closing) => return None,
                        c = changes.next() => {
                            let c = c?;
                            if !c.action.starts_with("request.") {
                                continue;
                            }
                            if let Some(held) = c.held.clone() {
                                return Some((Ok(held), (first, changes, closing)));
                            }
                        }
                    }
                }
            });
        Ok(Response::new(Box::pin(stream) as WatchStream))
    }

    async fn decide(&self, req: Request<DecideRequest>) -> Result<Response<HeldRequest>, Status> {
        let who = voter(&req, "decide requests")?;
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
            .await
            .map_err(status_of_decide)?;
        Ok(Response::new(held))
    }

    async fn list_grants(
        &self,
        req: Request<ListGrantsRequest>,
    ) -> Result<Response<ListGrantsResponse>, Status> {
        let mut grants = self
            .store
            .list_grants(req.get_ref().all)
            .await
            .map_err(status_of)?;
        grants.truncate(self.limits.max_list as usize);
        Ok(Response::new(ListGrantsResponse { grants }))
    }

    async fn revoke_grant(
        &self,
        req: Request<RevokeGrantRequest>,
    ) -> Result<Response<Grant>, Status> {
        let who = voter(&req, "revoke grants")?;
        let g = self
            .store
            .revoke_grant(&req.get_ref().grant_id, &who.name)
            .await
            .map_err(status_of)?;
        tracing::info!(grant = %g.id, by = %who.name, "grant revoked");
        Ok(Response::new(g))
    }

    async fn cancel(&self, req: Request<CancelRequest>) -> Result<Response<HeldRequest>, Status> {
        let who = voter(&req, "cancel requests")?;
        // A cancel decides without groups, quorum or the self check: admins only.
        if who.scope != auth::Scope::Admin {
            return Err(Status::permission_denied(format!(
                "{} has an {} token; only an admin token may cancel a request (approvers deny it \
                 with a reason instead)",
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
            .await
            .map_err(status_of)?;
        tracing::info!(request = %c.request_id, by = %who.name, "cancelled");
        self.metrics.decided("cancelled");
        Ok(Response::new(held))
    }
}
