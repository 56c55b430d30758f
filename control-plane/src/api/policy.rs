//! `PolicyService`: the policy in force (as this replica holds it) and validation of a
//! candidate.

use std::sync::{Arc, Mutex};

use airlock_proto::v1::{
    policy_service_server::PolicyService, GetPolicyRequest, PolicyStatus, ValidatePolicyRequest,
    ValidatePolicyResponse,
};
use tonic::{Request, Response, Status};

use crate::policy::Policy;

/// `PolicyService`.
pub struct PolicySvc {
    /// What is in force, and the last reload error.
    pub status: Arc<Mutex<PolicyStatus>>,
}

#[tonic::async_trait]
impl PolicyService for PolicySvc {
    async fn get(&self, _req: Request<GetPolicyRequest>) -> Result<Response<PolicyStatus>, Status> {
        Ok(Response::new(
            self.status
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
        ))
    }

    async fn validate(
        &self,
        req: Request<ValidatePolicyRequest>,
    ) -> Result<Response<ValidatePolicyResponse>, Status> {
        Ok(Response::new(
            match Policy::parse(&req.get_ref().text, "candidate") {
                Ok(_) => ValidatePolicyResponse {
                    valid: true,
                    error: String::new(),
                },
                Err(e) => ValidatePolicyResponse {
                    valid: false,
                    error: e.to_string(),
                },
            },
        ))
    }
}
