//! `EnrollmentService`: served without bearer-token authentication (the caller has no
//! credential yet); the one-time enrollment token in the body is what authenticates it. The
//! rules are in [`crate::auth::enroll`].

use airlock_proto::v1::{
    enrollment_service_server::EnrollmentService, EnrollRequest, EnrollResponse,
};
use tonic::{Request, Response, Status};

use crate::{auth::enroll::enroll, store::Store};

/// The gRPC service.
pub struct EnrollmentSvc {
    /// Where tokens live.
    pub store: Store,
    /// mTLS: as on the agent stream, callers must present a client certificate signed by the
    /// configured CA; enrolment is not a way around it.
    pub require_client_cert: bool,
}

#[tonic::async_trait]
impl EnrollmentService for EnrollmentSvc {
    async fn enroll(
        &self,
        req: Request<EnrollRequest>,
    ) -> Result<Response<EnrollResponse>, Status> {
        if self.require_client_cert && req.peer_certs().is_none_or(|c| c.is_empty()) {
            return Err(Status::unauthenticated(
                "this server requires agents to present a client certificate (mTLS)",
            ));
        }
        let r = req.into_inner();
        let hello = r
            .hello
            .ok_or_else(|| Status::invalid_argument("an enrolment needs the agent's hello"))?;
        match enroll(&self.store, &r.enrollment_token, &hello).await {
            Ok(done) => {
                tracing::info!(host_id = %done.host_id, host = %hello.hostname, replaced = done.replaced, "agent enrolled");
                Ok(Response::new(EnrollResponse {
                    agent_token: done.agent_token,
                    host_id: done.host_id,
                }))
            }
            Err(e) => {
                tracing::warn!(host_id = %hello.host_id, host = %hello.hostname, reason = %e, "enrolment refused");
                Err(e.into())
            }
        }
    }
}
