//! The gRPC services, one file each: [`agents`] (the agents' streams), [`agent_query`] (what an
//! agent may ask about its own host, for the AI agents there), [`enroll`] (agents
//! trading an enrollment token for their credential), [`approvals`] (list, watch, decide),
//! [`audit`] (query, export, verify), [`inventory`] (known agents), [`policy`] (the policy in
//! force) and [`tokens`] (API tokens). [`crate::server`] puts them behind authentication and
//! serves them.

pub mod agent_query;
pub mod agents;
pub mod approvals;
pub mod audit;
pub mod enroll;
pub mod inventory;
pub mod policy;
pub mod tokens;

use tonic::Status;

use crate::store::StoreError;

/// The gRPC status for a store refusal or failure; failures are logged, not shown.
pub fn status_of(e: StoreError) -> Status {
    match e {
        StoreError::NotFound(_) => Status::not_found(e.to_string()),
        StoreError::NotPending { .. }
        | StoreError::AlreadyVoted { .. }
        | StoreError::PastDeadline { .. } => Status::failed_precondition(e.to_string()),
        StoreError::TokenExists(_) | StoreError::IdConflict { .. } => {
            Status::already_exists(e.to_string())
        }
        StoreError::BadPageToken(_) | StoreError::NotBearerScope | StoreError::Invalid(_) => {
            Status::invalid_argument(e.to_string())
        }
        StoreError::Limit(_) => Status::resource_exhausted(e.to_string()),
        e if e.is_transient() => {
            tracing::warn!(error = %e, "database unavailable");
            Status::unavailable("the control plane's database is unavailable; try again")
        }
        StoreError::Closed => Status::unavailable("the control plane is shutting down"),
        StoreError::Db { .. }
        | StoreError::Corrupt(_)
        | StoreError::Random(_)
        | StoreError::Schema(_) => {
            tracing::error!(error = %e, "store failure");
            Status::internal("the control plane could not read or write its database")
        }
    }
}
