//! A decider for tests: a real tonic `AgentService` server on a real socket that records every
//! hello, request and outcome, and decides each request by a plan the test gives.

use std::{
    collections::HashMap,
    net::SocketAddr,
    pin::Pin,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use airlock_proto::v1::{
    agent_message::Msg as In,
    agent_service_server::{AgentService, AgentServiceServer},
    decider_message::Msg as Out,
    ActionRequest, AgentMessage, DeciderMessage, Decision, Hello, Outcome, Verdict,
};
use tokio::sync::mpsc;
use tokio_stream::{wrappers::ReceiverStream, Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

/// How the decider answers one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Plan {
    /// Allow at once.
    Allow,
    /// Deny at once.
    Deny,
    /// Allow (true) or deny (false) this long after the request was first seen.
    After(Duration, bool),
    /// Never answer.
    Never,
    /// Deny, then become unreachable: every stream ends and new ones are refused.
    DenyThenVanish,
}

/// A request as the decider saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    /// The request (first copy).
    pub request: ActionRequest,
    /// How many times it arrived (resends after a reconnect count).
    pub times: u32,
    /// In how many distinct streams it arrived.
    pub sessions: Vec<u64>,
}

type PlanFn = dyn Fn(&ActionRequest) -> Plan + Send + Sync;

struct State {
    plan: Box<PlanFn>,
    seen: Mutex<Vec<Seen>>,
    first_seen: Mutex<HashMap<String, Instant>>,
    outcomes: Mutex<Vec<Outcome>>,
    hellos: Mutex<Vec<Hello>>,
    sessions: Mutex<Vec<mpsc::Sender<Result<DeciderMessage, Status>>>>,
    vanished: AtomicBool,
    next_session: Mutex<u64>,
}

/// Handle on a running test decider.
#[derive(Clone)]
pub struct TestDecider {
    state: Arc<State>,
    /// Where it listens.
    pub addr: SocketAddr,
}

fn decision(id: &str, allow: bool) -> Result<DeciderMessage, Status> {
    Ok(DeciderMessage {
        msg: Some(Out::Decision(Decision {
            request_id: id.to_owned(),
            verdict: if allow { Verdict::Allow } else { Verdict::Deny } as i32,
            reason: "test decider".into(),
            decided_by: "test".into(),
        })),
    })
}

impl TestDecider {
    /// Starts a decider on `bind` (e.g. 127.0.0.1:0) deciding by `plan`.
    pub async fn start(
        bind: &str,
        plan: impl Fn(&ActionRequest) -> Plan + Send + Sync + 'static,
    ) -> anyhow::Result<Self> {
        let listener = tokio::net::TcpListener::bind(bind).await?;
        let addr = listener.local_addr()?;
        let state = Arc::new(State {
            plan: Box::new(plan),
            seen: Mutex::default(),
            first_seen: Mutex::default(),
            outcomes: Mutex::default(),
            hellos: Mutex::default(),
            sessions: Mutex::default(),
            vanished: AtomicBool::new(false),
            next_session: Mutex::new(0),
        });
        let svc = Svc(state.clone());
        tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(AgentServiceServer::new(svc))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
                .await;
        });
        Ok(Self { state, addr })
    }

    /// Every request seen, in arrival order of first copies.
    pub fn seen(&self) -> Vec<Seen> {
        self.state.seen.lock().unwrap().clone()
    }

    /// Every outcome reported.
    pub fn outcomes(&self) -> Vec<Outcome> {
        self.state.outcomes.lock().unwrap().clone()
    }

    /// Every hello received.
    pub fn hellos(&self) -> Vec<Hello> {
        self.state.hellos.lock().unwrap().clone()
    }

    /// The first request whose argv contains `marker`.
    pub fn request_with_arg(&self, marker: &str) -> Option<Seen> {
        self.seen().into_iter().find(|s| {
            matches!(&s.request.action, Some(airlock_proto::v1::action_request::Action::Exec(e)) if e.argv.iter().any(|a| a == marker))
        })
    }
}

struct Svc(Arc<State>);

type OutStream = Pin<Box<dyn Stream<Item = Result<DeciderMessage, Status>> + Send>>;

#[tonic::async_trait]
impl AgentService for Svc {
    type SessionStream = OutStream;

    async fn session(
        &self,
        req: Request<Streaming<AgentMessage>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        if self.0.vanished.load(Ordering::SeqCst) {
            return Err(Status::unavailable("test decider is gone"));
        }
        let mut inbound = req.into_inner();
        let (tx, rx) = mpsc::channel(1024);
        self.0.sessions.lock().unwrap().push(tx.clone());
        let session = {
            let mut n = self.0.next_session.lock().unwrap();
            *n += 1;
            *n
        };
        let state = self.0.clone();
        tokio::spawn(async move {
            while let Some(Ok(msg)) = inbound.next().await {
                match msg.msg {
                    Some(In::Hello(h)) => state.hellos.lock().unwrap().push(h),
                    Some(In::Outcome(o)) => state.outcomes.lock().unwrap().push(o),
                    Some(In::Request(r)) => handle_request(&state, &tx, r, session),
                    Some(In::Pong(_)) | None => {}
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx)) as OutStream))
    }
}

fn handle_request(
    state: &Arc<State>,
    tx: &mpsc::Sender<Result<DeciderMessage, Status>>,
    r: ActionRequest,
    session: u64,
) {
    let id = r.request_id.clone();
    {
        let mut seen = state.seen.lock().unwrap();
        match seen.iter_mut().find(|s| s.request.request_id == id) {
            Some(s) => {
                s.times += 1;
                s.sessions.push(session);
            }
            None => seen.push(Seen {
                request: r.clone(),
                times: 1,
                sessions: vec![session],
            }),
        }
    }
    let first = *state
        .first_seen
        .lock()
        .unwrap()
        .entry(id.clone())
        .or_insert_with(Instant::now);
    match (state.plan)(&r) {
        Plan::Allow => {
            let _ = tx.try_send(decision(&id, true));
        }
        Plan::Deny => {
            let _ = tx.try_send(decision(&id, false));
        }
        Plan::Never => {}
        Plan::After(delay, allow) => {
            let tx = tx.clone();
            tokio::spawn(async move {
                tokio::time::sleep(delay.saturating_sub(first.elapsed())).await;
                let _ = tx.send(decision(&id, allow)).await;
            });
        }
        Plan::DenyThenVanish => {
            let _ = tx.try_send(decision(&id, false));
            state.vanished.store(true, Ordering::SeqCst);
            let sessions: Vec<_> = state.sessions.lock().unwrap().drain(..).collect();
            tokio::spawn(async move {
                // Let the deny go out first.
                tokio::time::sleep(Duration::from_millis(200)).await;
                for s in sessions {
                    let _ = s
                        .send(Err(Status::unavailable("test decider is gone")))
                        .await;
                }
            });
        }
    }
}
