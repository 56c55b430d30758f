//! `AgentService`: the agents' streams. Requests are stored before anyone is told; decisions are
//! routed back to the stream of the agent that holds the request.

use std::{
    collections::{BTreeMap, HashMap},
    pin::Pin,
    sync::{Arc, Mutex},
};

use airlock_proto::v1::{
    agent_message::Msg as In, agent_service_server::AgentService, decider_message::Msg as Out,
    AgentMessage, DeciderMessage, Decision, HeldRequest, RequestState, RulesUpdate, Verdict,
};
use tokio::sync::mpsc;
use tokio_stream::{wrappers::ReceiverStream, Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

use crate::{policy::Policy, store::Store};

type Tx = mpsc::Sender<Result<DeciderMessage, Status>>;

/// One connected agent.
struct Session {
    /// Distinguishes a reconnect from the stream it replaced.
    number: u64,
    /// Messages to the agent.
    tx: Tx,
    /// Its labels (which rules it gets).
    labels: BTreeMap<String, String>,
}

/// Connected agents, by host id.
#[derive(Default)]
pub struct Agents {
    /// By host id.
    streams: Mutex<HashMap<String, Session>>,
    next: Mutex<u64>,
}

impl Agents {
    /// Sends the decision of `held` to its agent, if connected. An agent that is not connected
    /// gets it when it reconnects and resends the request.
    pub fn deliver(&self, held: &HeldRequest) {
        let Some(decision) = decision_of(held) else {
            return;
        };
        let streams = self.streams.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(session) = streams.get(&held.host_id) {
            let _ = session.tx.try_send(Ok(DeciderMessage {
                msg: Some(Out::Decision(decision)),
            }));
        }
    }

    /// Ends every agent stream (on shutdown), so agents reconnect to whichever replica or
    /// restarted server comes next instead of holding on to a stopping one.
    pub fn close_all(&self) {
        let streams: Vec<_> = self
            .streams
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain()
            .collect();
        for (_, session) in streams {
            let _ = session
                .tx
                .try_send(Err(Status::unavailable("airlock-server is shutting down")));
        }
    }

    /// Sends every connected agent the rules `policy` gives it (after a policy change).
    pub fn push_rules(&self, policy: &Policy) {
        let streams = self.streams.lock().unwrap_or_else(|p| p.into_inner());
        for (host, session) in streams.iter() {
            if session
                .tx
                .try_send(Ok(rules_message(policy, &session.labels)))
                .is_err()
            {
                tracing::warn!(host_id = %host, "could not queue rules for agent");
            }
        }
    }

    /// Host ids of connected agents.
    pub fn connected(&self) -> Vec<String> {
        self.streams
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .cloned()
            .collect()
    }
}

fn labels_of(hello: &airlock_proto::v1::Hello) -> BTreeMap<String, String> {
    hello.labels.clone().into_iter().collect()
}

fn rules_message(policy: &Policy, labels: &BTreeMap<String, String>) -> DeciderMessage {
    let (rules_toml, version) = policy.rules_for(labels);
    DeciderMessage {
        msg: Some(Out::Rules(RulesUpdate {
            rules_toml,
            version,
        })),
    }
}

/// The decision message for a decided request; `None` while pending or expired.
fn decision_of(held: &HeldRequest) -> Option<Decision> {
    let verdict = match held.state() {
        RequestState::Approved => Verdict::Allow,
        RequestState::Denied | RequestState::Cancelled => Verdict::Deny,
        _ => return None,
    };
    Some(Decision {
        request_id: held.request.as_ref()?.request_id.clone(),
        verdict: verdict as i32,
        reason: held.reason.clone(),
        decided_by: held.decided_by.clone(),
    })
}

/// The gRPC service.
pub struct AgentSvc {
    /// Requests.
    pub store: Arc<Store>,
    /// Streams.
    pub agents: Arc<Agents>,
    /// Routing of new requests.
    pub policy: crate::SharedPolicy,
    /// mTLS: agents must present a client certificate signed by the configured CA.
    pub require_client_cert: bool,
    /// Counters.
    pub metrics: Arc<crate::http::Metrics>,
}

type OutStream = Pin<Box<dyn Stream<Item = Result<DeciderMessage, Status>> + Send>>;

#[tonic::async_trait]
impl AgentService for AgentSvc {
    type SessionStream = OutStream;

    async fn session(
        &self,
        req: Request<Streaming<AgentMessage>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        let who = crate::auth::principal(&req)?;
        if self.require_client_cert && req.peer_certs().is_none_or(|c| c.is_empty()) {
            return Err(Status::unauthenticated(
                "this server requires agents to present a client certificate (mTLS)",
            ));
        }
        let mut inbound = req.into_inner();
        let hello = match inbound.next().await {
            Some(Ok(AgentMessage {
                msg: Some(In::Hello(h)),
            })) => h,
            Some(Ok(_)) => {
                return Err(Status::invalid_argument(
                    "the first message of a session must be a hello",
                ))
            }
            Some(Err(e)) => return Err(e),
            None => return Err(Status::cancelled("stream closed before hello")),
        };
        if hello.host_id.trim().is_empty() {
            return Err(Status::invalid_argument("hello.host_id is empty"));
        }
        // An agent credential speaks for one host only.
        if hello.host_id != who.name {
            return Err(Status::permission_denied(format!(
                "this credential belongs to agent {:?}, not {:?}",
                who.name, hello.host_id
            )));
        }
        let (tx, rx) = mpsc::channel(1024);
        let session = {
            let mut n = self.agents.next.lock().unwrap_or_else(|p| p.into_inner());
            *n += 1;
            *n
        };
        self.agents
            .streams
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(
                hello.host_id.clone(),
                Session {
                    number: session,
                    tx: tx.clone(),
                    labels: labels_of(&hello),
                },
            );
        let _ = tx.try_send(Ok(rules_message(
            &crate::current(&self.policy),
            &labels_of(&hello),
        )));
        tracing::info!(host = %hello.hostname, host_id = %hello.host_id, version = %hello.version, "agent connected");
        if let Err(e) = self.store.agent_seen(&hello) {
            tracing::error!(error = %e, "recording the agent failed");
        }
        let (store, agents, policy) =
            (self.store.clone(), self.agents.clone(), self.policy.clone());
        let metrics = self.metrics.clone();
        tokio::spawn(async move {
            while let Some(msg) = inbound.next().await {
                let msg = match msg {
                    Ok(m) => m,
                    Err(e) => {
                        tracing::warn!(host_id = %hello.host_id, error = %e, "agent stream error");
                        break;
                    }
                };
                match msg.msg {
                    Some(In::Request(r)) => {
                        if r.request_id.is_empty() {
                            tracing::warn!(host_id = %hello.host_id, "request without id ignored");
                            continue;
                        }
                        let labels = hello.labels.clone().into_iter().collect();
                        let account = r.process.as_ref().map_or("", |p| p.user.as_str());
                        let route = crate::current(&policy).route(&r.rule, &labels, account);
                        let (held, new) = match store.receive(&hello, &route, r) {
                            Ok(v) => v,
                            Err(e) => {
                                // Not stored means not asked: the agent's deadline applies.
                                tracing::error!(host_id = %hello.host_id, error = %e, "storing a request failed");
                                continue;
                            }
                        };
                        if new {
                            metrics.requests.inc();
                            if !held.grant_id.is_empty() {
                                metrics.decided("approved_by_grant");
                            }
                            tracing::info!(request = %held.request.as_ref().map(|r| r.request_id.as_str()).unwrap_or(""), host = %hello.hostname, grant = %held.grant_id, "request received");
                        }
                        // Decided already (by a grant, or meanwhile for a resent request).
                        if let Some(d) = decision_of(&held) {
                            let _ = tx.try_send(Ok(DeciderMessage {
                                msg: Some(Out::Decision(d)),
                            }));
                        }
                    }
                    Some(In::Outcome(o)) => {
                        if let Err(e) = store.record_outcome(&hello.host_id, o) {
                            tracing::warn!(host_id = %hello.host_id, error = %e, "outcome not recorded");
                        }
                    }
                    Some(In::Hello(_)) | Some(In::Pong(_)) | None => {}
                }
            }
            let mut streams = agents.streams.lock().unwrap_or_else(|p| p.into_inner());
            if streams
                .get(&hello.host_id)
                .is_some_and(|s| s.number == session)
            {
                streams.remove(&hello.host_id);
            }
            if let Err(e) = store.agent_seen(&hello) {
                tracing::error!(error = %e, "recording the agent failed");
            }
            tracing::info!(host_id = %hello.host_id, "agent disconnected");
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx)) as OutStream))
    }
}
