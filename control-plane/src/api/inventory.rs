//! `AgentsService`: every agent ever seen, and whether a replica holds its stream now.

use airlock_proto::v1::{
    agents_service_server::AgentsService, AgentInfo, ListAgentsRequest, ListAgentsResponse,
};
use tonic::{Request, Response, Status};

use super::status_of;
use crate::store::Store;

/// `AgentsService`.
pub struct AgentsSvc {
    /// Known agents.
    pub store: Store,
}

#[tonic::async_trait]
impl AgentsService for AgentsSvc {
    async fn list(
        &self,
        _req: Request<ListAgentsRequest>,
    ) -> Result<Response<ListAgentsResponse>, Status> {
        let agents = self
            .store
            .agents()
            .await
            .map_err(status_of)?
            .into_iter()
            .map(|a| AgentInfo {
                connected: a.connected,
                host_id: a.hello.host_id,
                hostname: a.hello.hostname,
                labels: a.hello.labels,
                version: a.hello.version,
                first_seen_unix_ms: a.first_seen_ms,
                last_seen_unix_ms: a.last_seen_ms,
            })
            .collect();
        Ok(Response::new(ListAgentsResponse { agents }))
    }
}
