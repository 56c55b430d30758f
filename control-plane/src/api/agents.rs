//! `AgentService`: the agents' streams. Requests are stored before anyone is told; decisions
//! reach the agent through the change feed, from whichever replica they were made on.
//!
//! Nothing is dropped on the way back: a decision that does not fit in an agent's queue ends
//! that agent's stream, and the agent reconnects and sends its holds again, which answers
//! every one already decided.

use std::{
    collections::{BTreeMap, HashMap},
    pin::Pin,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
};

use airlock_proto::v1::{
    agent_message::Msg as In, agent_service_server::AgentService, decider_message::Msg as Out,
    ActionRequest, AgentMessage, DeciderMessage, Decision, HeldRequest, Hello, RequestState,
    RulesUpdate, Verdict,
};
use futures::{stream::FuturesUnordered, Stream, StreamExt};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::{
    config::Limits,
    metrics::Metrics,
    policy::{self, Policy, SharedPolicy},
    store::{Store, StoreError, Subscription},
};

type Tx = mpsc::Sender<Result<DeciderMessage, Status>>;

/// Messages waiting for one agent before its stream is ended (it then reconnects and resends).
const QUEUE: usize = 4096;

/// Requests of one agent being stored at once.
const IN_FLIGHT: usize = 256;

/// One connected agent.
struct Session {
    /// Distinguishes a reconnect from the stream it replaced.
    number: u64,
    /// Messages to the agent.
    tx: Tx,
    /// Its labels (which rules it gets).
    labels: BTreeMap<String, String>,
    /// Ends the stream (its queue overflowed).
    end: Arc<Ending>,
}

/// How an agent's stream is ended from outside: a queue that cannot take a decision must not
/// lose it, so the stream goes and the agent resends.
struct Ending {
    now: watch::Sender<bool>,
    overflowed: AtomicBool,
}

impl Ending {
    fn new() -> Self {
        Self {
            now: watch::channel(false).0,
            overflowed: AtomicBool::new(false),
        }
    }

    fn end(&self) {
        self.now.send_replace(true);
    }
}

impl Session {
    /// Queues `msg`; when the queue is full, ends the stream instead of losing it.
    fn send(&self, host: &str, msg: DeciderMessage) {
        if self.tx.try_send(Ok(msg)).is_err() {
            tracing::warn!(host_id = %host, "agent's queue is full; ending its stream so that it resends its holds");
            self.end.overflowed.store(true, Ordering::SeqCst);
            self.end.end();
        }
    }
}

/// Agents connected to this replica, by host id.
#[derive(Default)]
pub struct Agents {
    streams: Mutex<HashMap<String, Session>>,
    next: AtomicU64,
    /// The web UI's public base URL, sent with the rules so agents can link held tasks to
    /// their request page; empty when `web.public_url` is not set.
    web_url: std::sync::RwLock<String>,
}

impl Agents {
    /// Sets the web UI's public base URL agents link to (from `web.public_url`).
    pub fn set_web_url(&self, url: &str) {
        *self.web_url.write().unwrap_or_else(|p| p.into_inner()) =
            url.trim_end_matches('/').to_owned();
    }

    fn web_url(&self) -> String {
        self.web_url
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn streams(&self) -> std::sync::MutexGuard<'_, HashMap<String, Session>> {
        self.streams.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sends the decision of `held` to its agent, if it is connected here. An agent connected
    /// nowhere gets it when it reconnects and resends the request.
    pub fn deliver(&self, held: &HeldRequest) {
        let Some(decision) = decision_of(held) else {
            return;
        };
        if let Some(session) = self.streams().get(&held.host_id) {
            session.send(
                &held.host_id,
                DeciderMessage {
                    msg: Some(Out::Decision(decision)),
                },
            );
        }
    }

    /// Ends every agent stream (on shutdown), so agents reconnect to whichever replica or
    /// restarted server comes next instead of holding on to a stopping one.
    pub fn close_all(&self) {
        let streams: Vec<_> = self.streams().drain().collect();
        for (_, session) in streams {
            let _ = session
                .tx
                .try_send(Err(Status::unavailable("airlock-server is shutting down")));
        }
    }

    /// Sends every connected agent the rules `policy` gives it (after a policy change).
    pub fn push_rules(&self, policy: &Policy) {
        for (host, session) in self.streams().iter() {
            session.send(
                host,
                rules_message(policy, &session.labels, &self.web_url()),
            );
        }
    }

    /// Host ids of agents connected to this replica.
    pub fn connected(&self) -> Vec<String> {
        self.streams().keys().cloned().collect()
    }

    /// Delivers every decision the change feed reports (made on any replica) to the agents
    /// connected here, until the feed ends.
    pub async fn follow(self: Arc<Self>, mut changes: Subscription) {
        while let Some(c) = changes.next().await {
            // A grant's approval is answered on the stream that sent the request.
            if c.decides() && c.action != "request.approved.grant" {
                if let Some(held) = &c.held {
                    self.deliver(held);
                }
            }
        }
    }

    /// Sends agents their rules again whenever the policy in force changes.
    pub async fn follow_policy(self: Arc<Self>, policy: SharedPolicy) {
        let mut rx = policy.subscribe();
        while rx.changed().await.is_ok() {
            let p = rx.borrow_and_update().clone();
            self.push_rules(&p);
        }
    }
}

fn labels_of(hello: &Hello) -> BTreeMap<String, String> {
    hello.labels.clone().into_iter().collect()
}

fn rules_message(
    policy: &Policy,
    labels: &BTreeMap<String, String>,
    web_url: &str,
) -> DeciderMessage {
    let (rules_toml, version) = policy.rules_for(labels);
    DeciderMessage {
        msg: Some(Out::Rules(RulesUpdate {
            rules_toml,
            version,
            web_url: web_url.to_owned(),
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

/// A deny for a request refused before it was stored.
fn refusal(id: &str, why: &str) -> DeciderMessage {
    DeciderMessage {
        msg: Some(Out::Decision(Decision {
            request_id: id.to_owned(),
            verdict: Verdict::Deny as i32,
            reason: format!("refused by the control plane: {why}"),
            decided_by: "airlock-server".into(),
        })),
    }
}

/// The gRPC service.
pub struct AgentSvc {
    /// Requests.
    pub store: Store,
    /// Streams.
    pub agents: Arc<Agents>,
    /// Routing of new requests.
    pub policy: SharedPolicy,
    /// mTLS: agents must present a client certificate signed by the configured CA.
    pub require_client_cert: bool,
    /// Counters.
    pub metrics: Arc<Metrics>,
    /// Bounds on requests and outcomes.
    pub limits: Limits,
}

type OutStream = Pin<Box<dyn Stream<Item = Result<DeciderMessage, Status>> + Send>>;

/// What one agent's stream needs while it runs.
#[derive(Clone)]
struct Stream_ {
    store: Store,
    policy: SharedPolicy,
    metrics: Arc<Metrics>,
    limits: Limits,
    hello: Hello,
}

/// What storing one request came to: a message for the agent, or the end of its stream.
enum Answer {
    Nothing,
    Send(DeciderMessage),
    End,
}

impl Stream_ {
    async fn request(&self, r: ActionRequest) -> Answer {
        let hello = &self.hello;
        if r.request_id.is_empty() {
            tracing::warn!(host_id = %hello.host_id, "request without id ignored");
            return Answer::Nothing;
        }
        if let Err(why) = self.limits.check_request(&r) {
            tracing::warn!(host_id = %hello.host_id, request = %r.request_id, reason = %why, "request refused");
            self.metrics.refused.inc();
            return Answer::Send(refusal(&r.request_id, &why));
        }
        let labels = labels_of(hello);
        let (account, login_user) = r
            .process
            .as_ref()
            .map_or(("", ""), |p| (p.user.as_str(), p.login_user.as_str()));
        let route = policy::current(&self.policy).route(&r.rule, &labels, account, login_user);
        let id = r.request_id.clone();
        let (held, new) = match self.store.receive(hello, &route, r, &self.limits).await {
            Ok(v) => v,
            Err(e @ (StoreError::Limit(_) | StoreError::IdConflict { .. })) => {
                tracing::warn!(host_id = %hello.host_id, request = %id, reason = %e, "request refused");
                self.metrics.refused.inc();
                return Answer::Send(refusal(&id, &e.to_string()));
            }
            Err(e) => {
                // Not stored: end the stream, so that the agent reconnects (here or to another
                // replica) and sends it again. Its own deadline still holds.
                tracing::error!(host_id = %hello.host_id, request = %id, error = %e, "storing a request failed; ending the agent's stream");
                return Answer::End;
            }
        };
        let local = held.request.as_ref().and_then(|r| r.decided.as_ref());
        if new {
            self.metrics.requests.inc();
            if !held.grant_id.is_empty() {
                self.metrics.decided("approved_by_grant");
            }
            if let Some(d) = local {
                self.metrics.decided("decided_by_agent");
                tracing::info!(request = %id, host = %hello.hostname, cause = %d.cause, "agent reported an action it decided itself");
            } else {
                tracing::info!(request = %id, host = %hello.hostname, grant = %held.grant_id, "request received");
            }
        }
        // The agent applied its own verdict already and expects no answer.
        if local.is_some() {
            return Answer::Nothing;
        }
        // Decided already: by a grant, or meanwhile for a resent request.
        match decision_of(&held) {
            Some(d) => Answer::Send(DeciderMessage {
                msg: Some(Out::Decision(d)),
            }),
            None => Answer::Nothing,
        }
    }
}

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
        let (tx, rx) = mpsc::channel(QUEUE);
        let number = self.agents.next.fetch_add(1, Ordering::Relaxed);
        let end = Arc::new(Ending::new());
        let session = Session {
            number,
            tx,
            labels: labels_of(&hello),
            end: end.clone(),
        };
        session.send(
            &hello.host_id,
            rules_message(
                &policy::current(&self.policy),
                &session.labels,
                &self.agents.web_url(),
            ),
        );
        let me = self.agents.clone();
        me.streams().insert(hello.host_id.clone(), session);
        tracing::info!(host = %hello.hostname, host_id = %hello.host_id, version = %hello.version, "agent connected");
        // Bookkeeping: the stream does not wait for it (nor for a database that is away).
        let (store, h) = (self.store.clone(), hello.clone());
        let seen = tokio::spawn(async move {
            if let Err(e) = store.agent_seen(&h, true).await {
                tracing::error!(error = %e, "recording the agent failed");
            }
        });
        let s = Stream_ {
            store: self.store.clone(),
            policy: self.policy.clone(),
            metrics: self.metrics.clone(),
            limits: self.limits.clone(),
            hello: hello.clone(),
        };
        let (agents, host) = (self.agents.clone(), hello.host_id.clone());
        let mut ended = end.now.subscribe();
        tokio::spawn(async move {
            let mut storing = FuturesUnordered::new();
            let answer = |a: Answer| {
                let streams = agents.streams();
                let Some(session) = streams.get(&host).filter(|x| x.number == number) else {
                    return;
                };
                match a {
                    Answer::Nothing => {}
                    Answer::Send(m) => session.send(&host, m),
                    Answer::End => session.end.end(),
                }
            };
            loop {
                tokio::select! {
                    Some(a) = storing.next(), if !storing.is_empty() => answer(a),
                    msg = inbound.next(), if storing.len() < IN_FLIGHT => {
                        let msg = match msg {
                            Some(Ok(m)) => m,
                            Some(Err(e)) => {
                                tracing::warn!(host_id = %host, error = %e, "agent stream error");
                                break;
                            }
                            None => break,
                        };
                        match msg.msg {
                            Some(In::Request(r)) => {
                                let s = s.clone();
                                storing.push(async move { s.request(r).await });
                            }
                            Some(In::Outcome(o)) => {
                                let max = s.limits.max_outcomes_per_request;
                                if let Err(e) = s.store.record_outcome(&host, o, max).await {
                                    tracing::warn!(host_id = %host, error = %e, "outcome not recorded");
                                }
                            }
                            Some(In::Hello(_)) | Some(In::Pong(_)) | None => {}
                        }
                    }
                    _ = async { ended.wait_for(|e| *e).await.map(|_| ()) } => break,
                }
            }
            // Requests already on their way to the database are still stored.
            while let Some(a) = storing.next().await {
                answer(a);
            }
            {
                let mut streams = agents.streams();
                if streams.get(&host).is_some_and(|x| x.number == number) {
                    streams.remove(&host);
                }
            }
            // After the connect was recorded, so the two cannot cross.
            let _ = seen.await;
            if let Err(e) = s.store.agent_seen(&s.hello, false).await {
                tracing::error!(error = %e, "recording the agent failed");
            }
            tracing::info!(host_id = %host, "agent disconnected");
        });
        let mut until = end.now.subscribe();
        let out = ReceiverStream::new(rx)
            .take_until(async move {
                let _ = until.wait_for(|e| *e).await;
            })
            .chain(
                futures::stream::once(async move {
                    end.overflowed.load(Ordering::SeqCst).then(|| {
                        Err(Status::unavailable(
                            "this agent's stream fell behind; reconnect and send your holds again",
                        ))
                    })
                })
                .filter_map(|x| async move { x }),
            );
        Ok(Response::new(Box::pin(out) as OutStream))
    }
}
