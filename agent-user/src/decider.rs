//! The agent's one long-lived gRPC stream to its decider (`airlock.v1.AgentService/Session`).
//!
//! A background task keeps the stream up. The decider may be several replicas of the control
//! plane: when the stream to one fails (or cannot be opened), the task moves to the next
//! address at once, and backs off only after every address failed in turn. Requests still
//! waiting for a decision are sent again on every new stream with the same id, so the decider
//! sees one request, not two, whichever replica it reaches. Outcomes produced while
//! disconnected are queued and flushed on reconnect.

use std::{
    collections::{HashMap, VecDeque},
    sync::{Arc, Mutex},
    time::Duration,
};

use airlock_proto::v1::{
    agent_message::Msg as Out, agent_service_client::AgentServiceClient,
    decider_message::Msg as In, ActionRequest, AgentMessage, Decision, Hello, Outcome, Pong,
    RulesUpdate,
};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_stream::wrappers::ReceiverStream;

/// Outcomes kept while the decider is unreachable; older ones are dropped past this.
const MAX_QUEUED_OUTCOMES: usize = 4096;

/// How to reach the decider.
#[derive(Clone, Debug)]
pub struct Connection {
    /// `http://` or `https://` address, or several separated by commas (replicas of the
    /// control plane), in order of preference.
    pub url: String,
    /// Bearer token (the agent's credential).
    pub token: Option<String>,
    /// TLS settings for `https://`: CA to trust, client certificate for mTLS.
    pub tls: Option<tonic::transport::ClientTlsConfig>,
}

impl Connection {
    /// The decider's addresses, in order of preference.
    pub fn addresses(&self) -> Vec<String> {
        self.url
            .split(',')
            .map(str::trim)
            .filter(|a| !a.is_empty())
            .map(str::to_owned)
            .collect()
    }

    /// Connects to the first of the decider's addresses that answers, without sending
    /// anything: shared by the session and enrolment so that both reach the decider the same
    /// way.
    pub async fn connect(&self) -> Result<tonic::transport::Channel, tonic::Status> {
        let mut last = tonic::Status::invalid_argument("no decider address");
        for addr in self.addresses() {
            match self.connect_to(&addr).await {
                Ok(c) => return Ok(c),
                Err(e) => {
                    tracing::warn!(decider = %addr, error = %e.message(), "decider unreachable");
                    last = e;
                }
            }
        }
        Err(last)
    }

    /// Connects to the decider at `url` (timeouts, TLS).
    pub async fn connect_to(&self, url: &str) -> Result<tonic::transport::Channel, tonic::Status> {
        let mut endpoint = tonic::transport::Endpoint::from_shared(url.to_owned())
            .map_err(|e| tonic::Status::invalid_argument(format!("decider address {url:?}: {e}")))?
            .connect_timeout(Duration::from_secs(3))
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(5));
        if let Some(tls) = &self.tls {
            endpoint = endpoint
                .tls_config(tls.clone())
                .map_err(|e| tonic::Status::invalid_argument(format!("TLS settings: {e}")))?;
        }
        endpoint
            .connect()
            .await
            .map_err(|e| tonic::Status::unavailable(error_chain(&e)))
    }
}

/// An error with its causes: a transport error alone says only "transport error".
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        text.push_str(": ");
        text.push_str(&c.to_string());
        cause = c.source();
    }
    text
}

struct Shared {
    /// Latest rules the decider sent.
    rules: watch::Sender<Option<RulesUpdate>>,
    /// Requests waiting for a decision, by id.
    pending: HashMap<String, (ActionRequest, oneshot::Sender<Decision>)>,
    /// Outcomes and records not yet sent.
    outcomes: VecDeque<AgentMessage>,
    /// Sender of the live stream, if any.
    stream: Option<mpsc::Sender<AgentMessage>>,
}

impl Default for Shared {
    fn default() -> Self {
        Self {
            rules: watch::channel(None).0,
            pending: HashMap::new(),
            outcomes: VecDeque::new(),
            stream: None,
        }
    }
}

/// Client side of the agent stream.
#[derive(Clone)]
pub struct Decider {
    shared: Arc<Mutex<Shared>>,
    connected: watch::Receiver<bool>,
}

impl Decider {
    /// Starts the connection task for `url` (e.g. `http://10.0.2.2:7443`), authenticating with
    /// `token` when given.
    pub fn spawn(url: String, hello: Hello, token: Option<String>) -> Self {
        Self::spawn_with(
            Connection {
                url,
                token,
                tls: None,
            },
            hello,
        )
    }

    /// Starts the connection task for `conn`.
    pub fn spawn_with(conn: Connection, hello: Hello) -> Self {
        let shared = Arc::new(Mutex::new(Shared::default()));
        let (tx, rx) = watch::channel(false);
        tokio::spawn(run(conn, hello, shared.clone(), tx));
        Self {
            shared,
            connected: rx,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Shared> {
        self.shared.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits up to `grace` for a live stream. False if the decider stayed unreachable.
    pub async fn wait_connected(&self, grace: Duration) -> bool {
        let mut rx = self.connected.clone();
        tokio::time::timeout(grace, rx.wait_for(|up| *up))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// Sends `req` and returns where its decision will arrive. The request is resent on
    /// reconnect until it is decided or [`Decider::forget`] is called.
    pub fn ask(&self, req: ActionRequest) -> oneshot::Receiver<Decision> {
        let (tx, rx) = oneshot::channel();
        let mut s = self.lock();
        let msg = AgentMessage {
            msg: Some(Out::Request(req.clone())),
        };
        if let Some(stream) = &s.stream {
            // A full or closed stream is fine: the request is resent on the next stream.
            let _ = stream.try_send(msg);
        }
        s.pending.insert(req.request_id.clone(), (req, tx));
        rx
    }

    /// The rules the decider sent most recently (`None` until it sends some).
    pub fn rules(&self) -> watch::Receiver<Option<RulesUpdate>> {
        self.lock().rules.subscribe()
    }

    /// Stops waiting for a decision on `request_id` (deadline passed, task gone).
    pub fn forget(&self, request_id: &str) {
        self.lock().pending.remove(request_id);
    }

    /// Reports what happened to a request; queued while disconnected.
    pub fn report(&self, outcome: Outcome) {
        self.send_or_queue(AgentMessage {
            msg: Some(Out::Outcome(outcome)),
        });
    }

    /// Records an action the agent already decided itself (`request.decided` is set): nothing
    /// waits for an answer. Queued while disconnected, like outcomes.
    pub fn record(&self, request: ActionRequest) {
        self.send_or_queue(AgentMessage {
            msg: Some(Out::Request(request)),
        });
    }

    fn send_or_queue(&self, msg: AgentMessage) {
        let mut s = self.lock();
        let sent = s
            .stream
            .as_ref()
            .is_some_and(|stream| stream.try_send(msg.clone()).is_ok());
        if !sent {
            if s.outcomes.len() >= MAX_QUEUED_OUTCOMES {
                s.outcomes.pop_front();
            }
            s.outcomes.push_back(msg);
        }
    }
}

async fn run(
    conn: Connection,
    hello: Hello,
    shared: Arc<Mutex<Shared>>,
    connected: watch::Sender<bool>,
) {
    let addresses = conn.addresses();
    if addresses.is_empty() {
        tracing::error!("no decider address; held actions get the fail mode");
        return;
    }
    let mut backoff = Duration::from_millis(200);
    let (mut next, mut failed_in_a_row) = (0, 0);
    loop {
        let url = &addresses[next % addresses.len()];
        next += 1;
        match session(&conn, url, &hello, &shared, &connected).await {
            Ok(()) => tracing::warn!(decider = %url, "decider closed the stream; reconnecting"),
            Err(e) => tracing::warn!(decider = %url, error = %e, "decider unreachable"),
        }
        let was_up = connected.send_replace(false);
        shared.lock().unwrap_or_else(|p| p.into_inner()).stream = None;
        // Another replica at once; a pause only when every address failed in turn, longer
        // each round. A stream that was up starts the count again.
        failed_in_a_row = if was_up { 0 } else { failed_in_a_row + 1 };
        if was_up {
            backoff = Duration::from_millis(200);
        }
        let pause = if failed_in_a_row > 0 && failed_in_a_row % addresses.len() == 0 {
            let p = backoff;
            backoff = (backoff * 2).min(Duration::from_secs(5));
            p
        } else {
            Duration::from_millis(50)
        };
        if addresses.len() > 1 {
            tracing::info!(decider = %addresses[next % addresses.len()], "trying the next decider in {pause:?}");
        }
        tokio::time::sleep(pause).await;
    }
}

/// One stream to the decider at `url`, from connect to its end.
async fn session(
    conn: &Connection,
    url: &str,
    hello: &Hello,
    shared: &Arc<Mutex<Shared>>,
    connected: &watch::Sender<bool>,
) -> Result<(), tonic::Status> {
    let token = conn.token.as_deref();
    let mut client = AgentServiceClient::new(conn.connect_to(url).await?);
    let (tx, rx) = mpsc::channel(1024);
    let hello_msg = AgentMessage {
        msg: Some(Out::Hello(hello.clone())),
    };
    tx.send(hello_msg)
        .await
        .map_err(|_| tonic::Status::internal("stream closed"))?;
    let mut request = tonic::Request::new(ReceiverStream::new(rx));
    if let Some(t) = token {
        let value = format!("Bearer {t}").parse().map_err(|_| {
            tonic::Status::invalid_argument("the agent token has characters that cannot be sent")
        })?;
        request.metadata_mut().insert("authorization", value);
    }
    let mut inbound = client.session(request).await?.into_inner();
    {
        let mut s = shared.lock().unwrap_or_else(|p| p.into_inner());
        for (req, _) in s.pending.values() {
            let _ = tx.try_send(AgentMessage {
                msg: Some(Out::Request(req.clone())),
            });
        }
        while let Some(o) = s.outcomes.pop_front() {
            if tx.try_send(o.clone()).is_err() {
                s.outcomes.push_front(o);
                break;
            }
        }
        s.stream = Some(tx.clone());
    }
    let _ = connected.send(true);
    tracing::info!(decider = %url, "connected to decider");
    while let Some(msg) = inbound.message().await? {
        match msg.msg {
            Some(In::Decision(d)) => {
                let waiter = shared
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .pending
                    .remove(&d.request_id);
                match waiter {
                    Some((_, tx)) => {
                        let _ = tx.send(d);
                    }
                    None => {
                        tracing::debug!(request = %d.request_id, "decision for a request no longer waiting")
                    }
                }
            }
            Some(In::Rules(r)) => {
                tracing::info!(version = %r.version, "rules received from the decider");
                let _ = shared
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .rules
                    .send_replace(Some(r));
            }
            Some(In::Ping(p)) => {
                let _ = tx.try_send(AgentMessage {
                    msg: Some(Out::Pong(Pong { seq: p.seq })),
                });
            }
            None => {}
        }
    }
    Ok(())
}
