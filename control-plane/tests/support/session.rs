//! What the server answers an agent that opens its stream: the refusal's gRPC status, so that
//! tests assert why a stream was refused rather than that none came up in time.
//!
//! Use from a test crate with `#[path = "support/session.rs"] mod session;`.
#![allow(dead_code)] // each test crate uses a part

use std::time::Duration;

use airlock_agent::decider::Connection;
use airlock_proto::v1::{
    agent_message::Msg, agent_service_client::AgentServiceClient, AgentMessage, Hello,
};

/// Opens `AgentService/Session` as the agent does (its own connection code, then a hello) and
/// returns the status it was refused with: from the connection when that fails (TLS, address),
/// else from the call. Panics if the stream opens, or if there is no answer within 5 s.
pub async fn refusal(conn: &Connection, hello: Hello) -> tonic::Status {
    let attempt = async {
        let channel = conn.connect().await?;
        let mut request = tonic::Request::new(tokio_stream::StreamExt::chain(
            tokio_stream::once(AgentMessage {
                msg: Some(Msg::Hello(hello.clone())),
            }),
            // Kept open, as the agent keeps its stream: an accepted session stays up.
            tokio_stream::pending(),
        ));
        if let Some(t) = &conn.token {
            let value = format!("Bearer {t}").parse().expect("token is ASCII");
            request.metadata_mut().insert("authorization", value);
        }
        AgentServiceClient::new(channel).session(request).await
    };
    match tokio::time::timeout(Duration::from_secs(5), attempt).await {
        Err(_) => panic!("no answer within 5 s to the session of {:?}", hello.host_id),
        Ok(Ok(_)) => panic!(
            "the server opened the session of {:?} to {}",
            hello.host_id, conn.url
        ),
        Ok(Err(status)) => status,
    }
}

/// [`refusal`] over plain `http://` with `token`.
pub async fn refusal_at(url: &str, token: Option<&str>, hello: Hello) -> tonic::Status {
    let conn = Connection {
        url: url.to_owned(),
        token: token.map(str::to_owned),
        tls: None,
    };
    refusal(&conn, hello).await
}
