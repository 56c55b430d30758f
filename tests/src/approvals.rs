//! An `ApprovalService` client for tests and benchmarks, with a bearer token on every call.

use airlock_proto::v1::approval_service_client::ApprovalServiceClient;
use tonic::{service::interceptor::InterceptedService, transport::Channel};

/// Puts `authorization: Bearer <token>` on every call.
#[derive(Clone)]
pub struct Bearer(pub String);

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        let v = format!("Bearer {}", self.0)
            .parse()
            .map_err(|_| tonic::Status::internal("the token is not a header value"))?;
        req.metadata_mut().insert("authorization", v);
        Ok(req)
    }
}

/// An approvals client.
pub type Client = ApprovalServiceClient<InterceptedService<Channel, Bearer>>;

/// Connects to the control plane at `url` as the holder of `token`.
pub async fn connect(url: &str, token: &str) -> anyhow::Result<Client> {
    let ch = Channel::from_shared(url.to_owned())?.connect().await?;
    Ok(ApprovalServiceClient::with_interceptor(
        ch,
        Bearer(token.to_owned()),
    ))
}
