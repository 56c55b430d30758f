//! Fan-out of request events to notification channels (Slack, Teams, generic webhooks).
//!
//! One subscription to the store's change feed is split into three events:
//!
//! - `request.received`: a new request waits for approvers;
//! - `request.vote`: someone voted and the request is still pending (quorum not reached);
//! - `request.decided`: the request left the pending state (approved, denied, approved at once
//!   by a grant, cancelled or expired).
//!
//! Every channel has its own bounded queue and worker task, so a slow or failing channel never
//! delays the others; when a queue is full the event is dropped for that channel (logged and
//! counted in `airlock_notification_failures`). A delivery is retried with exponential backoff
//! on connection errors, timeouts, 5xx and 429; every attempt is written to the `deliveries`
//! table ([`deliveries`]) and each failed attempt is counted in the metric.

pub mod slack;
pub mod teams;
pub mod webhook;

use std::{future::Future, sync::Arc, time::Duration};

use airlock_proto::v1::{action_request::Action, HeldRequest, RequestState};
use rusqlite::params;
use tokio::{
    sync::{broadcast, mpsc},
    task::JoinHandle,
};
use url::Url;

use crate::{
    config::{read_secret, ConfigError, ServerConfig},
    http::Metrics,
    store::{now_ms, Change, Store, StoreError},
};

/// Tables of the notification channels: the delivery log (one row per attempt) and the Slack
/// messages posted per request (so that a decision can update them).
pub const SCHEMA: &str = "CREATE TABLE IF NOT EXISTS deliveries (
    id TEXT NOT NULL,
    channel TEXT NOT NULL,
    event TEXT NOT NULL,
    request_id TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    ok INTEGER NOT NULL,
    status INTEGER,
    error TEXT NOT NULL,
    at_ms INTEGER NOT NULL,
    PRIMARY KEY (id, attempt)
);
CREATE INDEX IF NOT EXISTS deliveries_at ON deliveries (at_ms);
CREATE TABLE IF NOT EXISTS slack_messages (
    request_id TEXT PRIMARY KEY,
    channel TEXT NOT NULL,
    ts TEXT NOT NULL,
    posted_ms INTEGER NOT NULL
);";

/// How long delivery log rows and Slack message references are kept.
pub const KEEP_MS: i64 = 30 * 24 * 3600 * 1000;

/// Events per channel that may wait while the channel is busy; beyond that they are dropped.
const QUEUE: usize = 256;

/// What happened to a request, as channels are told.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// A new pending request.
    Received,
    /// A vote that left the request pending.
    Vote,
    /// The request is no longer pending.
    Decided,
}

impl Event {
    /// The event's name (`request.received`, `request.vote`, `request.decided`).
    pub fn as_str(self) -> &'static str {
        match self {
            Event::Received => "request.received",
            Event::Vote => "request.vote",
            Event::Decided => "request.decided",
        }
    }

    /// The event a store change stands for, if any (agent outcomes are not notified).
    pub fn of(change: &Change) -> Option<Event> {
        let pending = change.held.state() == RequestState::Pending;
        match change.action.as_str() {
            "request.outcome" => None,
            "request.received" if pending => Some(Event::Received),
            a if a.starts_with("request.vote") && pending => Some(Event::Vote),
            a if a.starts_with("request.") && !pending => Some(Event::Decided),
            _ => None,
        }
    }
}

/// One event for one request, as handed to every channel.
#[derive(Debug)]
pub struct Notice {
    /// What happened.
    pub event: Event,
    /// The request after the change.
    pub held: HeldRequest,
    /// The request's page in the web UI.
    pub link: String,
}

impl Notice {
    /// The request's id.
    pub fn request_id(&self) -> &str {
        self.held
            .request
            .as_ref()
            .map_or("", |r| r.request_id.as_str())
    }
}

/// `{public_url}/requests/{id}`, the id percent-encoded as a path segment.
pub fn request_link(public_url: &Url, id: &str) -> String {
    let mut u = public_url.clone();
    match u.path_segments_mut() {
        Ok(mut s) => {
            s.pop_if_empty().push("requests").push(id);
        }
        Err(()) => {
            return format!(
                "{}/requests/{id}",
                public_url.as_str().trim_end_matches('/')
            )
        }
    }
    u.to_string()
}

/// How a channel retries a delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Retry {
    /// Attempts before the delivery is given up.
    pub max_attempts: u32,
    /// Delay before the second attempt; doubles after each further failure.
    pub backoff: Duration,
    /// Limit of one attempt (connect, send and read the answer).
    pub timeout: Duration,
}

impl Default for Retry {
    fn default() -> Self {
        Self {
            max_attempts: 5,
            backoff: Duration::from_secs(1),
            timeout: Duration::from_secs(10),
        }
    }
}

/// The channels configured in the server file, their secrets read.
#[derive(Debug, Clone)]
pub struct Channels {
    /// Base of request links.
    pub public_url: Url,
    /// Slack (messages, and the buttons' endpoint: [`slack::router`]).
    pub slack: Option<Arc<slack::SlackApp>>,
    /// Microsoft Teams.
    pub teams: Option<teams::Teams>,
    /// Generic webhooks.
    pub webhooks: Vec<webhook::Webhook>,
}

/// Builds the channels of `cfg`, reading their secret files (errors name the file); links
/// point under `public_url`.
pub fn channels_from_config(cfg: &ServerConfig, public_url: &Url) -> Result<Channels, ConfigError> {
    let slack = cfg
        .slack
        .as_ref()
        .map(|s| slack::SlackApp::from_config(s, public_url).map(Arc::new))
        .transpose()?;
    let teams = cfg
        .teams
        .as_ref()
        .map(|t| {
            let url = read_secret(&t.webhook_url_file)?;
            // The URL is a secret: the error must not show it.
            Url::parse(url.expose()).map_err(|e| ConfigError::Invalid {
                path: t.webhook_url_file.clone(),
                message: format!("not a URL: {e}"),
            })?;
            Ok(teams::Teams::new(url, Retry::default()))
        })
        .transpose()?;
    let webhooks = cfg
        .webhooks
        .iter()
        .map(|w| {
            Ok(webhook::Webhook {
                name: w.name.clone(),
                url: w.url.clone(),
                secret: read_secret(&w.secret_file)?,
                events: w.events.clone(),
                retry: Retry {
                    max_attempts: w.max_attempts.max(1),
                    backoff: Duration::from_millis(w.backoff_ms),
                    timeout: Duration::from_secs(w.timeout_secs.max(1)),
                },
            })
        })
        .collect::<Result<_, ConfigError>>()?;
    Ok(Channels {
        public_url: public_url.clone(),
        slack,
        teams,
        webhooks,
    })
}

/// One destination, as the hub drives it.
enum Sink {
    Slack(Arc<slack::SlackApp>),
    Teams(teams::Teams),
    Webhook(webhook::Webhook),
}

impl Sink {
    /// The channel label of logs, metrics and the delivery log.
    fn name(&self) -> String {
        match self {
            Sink::Slack(_) => "slack".into(),
            Sink::Teams(_) => "teams".into(),
            Sink::Webhook(w) => format!("webhook:{}", w.name),
        }
    }

    fn wants(&self, event: Event) -> bool {
        match self {
            Sink::Slack(_) => true,
            Sink::Teams(_) => event != Event::Vote,
            Sink::Webhook(w) => w.events.is_empty() || w.events.iter().any(|e| e == event.as_str()),
        }
    }

    async fn deliver(&self, ctx: &Ctx, notice: &Notice) {
        match self {
            Sink::Slack(s) => s.deliver(ctx, notice).await,
            Sink::Teams(t) => t.deliver(ctx, notice).await,
            Sink::Webhook(w) => w.deliver(ctx, notice).await,
        }
    }
}

/// The running fan-out; dropping it stops the workers.
pub struct Hub {
    tasks: Vec<JoinHandle<()>>,
}

impl Hub {
    /// Subscribes to `store`'s changes now and starts one worker per channel of `channels`.
    /// Must be called within a Tokio runtime.
    pub fn start(store: Arc<Store>, channels: &Channels, metrics: Arc<Metrics>) -> Hub {
        let mut changes = store.subscribe();
        let ctx = Arc::new(Ctx {
            store,
            metrics: metrics.clone(),
            http: client(),
        });
        let sinks = channels
            .slack
            .iter()
            .map(|s| Sink::Slack(s.clone()))
            .chain(channels.teams.iter().map(|t| Sink::Teams(t.clone())))
            .chain(channels.webhooks.iter().map(|w| Sink::Webhook(w.clone())));
        let mut tasks = Vec::new();
        let mut queues = Vec::new();
        for sink in sinks {
            let (tx, mut rx) = mpsc::channel::<Arc<Notice>>(QUEUE);
            let wanted: Vec<Event> = [Event::Received, Event::Vote, Event::Decided]
                .into_iter()
                .filter(|e| sink.wants(*e))
                .collect();
            queues.push((sink.name(), wanted, tx));
            let ctx = ctx.clone();
            tasks.push(tokio::spawn(async move {
                // One event at a time, in order: Slack's update must follow its post.
                while let Some(notice) = rx.recv().await {
                    sink.deliver(&ctx, &notice).await;
                }
            }));
        }
        let public_url = channels.public_url.clone();
        tasks.push(tokio::spawn(async move {
            loop {
                let change = match changes.recv().await {
                    Ok(c) => c,
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        tracing::error!(
                            missed = n,
                            "notifications fell behind the change feed; events were lost"
                        );
                        for (name, _, _) in &queues {
                            metrics.notification_failed(name);
                        }
                        continue;
                    }
                    Err(broadcast::error::RecvError::Closed) => break,
                };
                let Some(event) = Event::of(&change) else {
                    continue;
                };
                let id = change.held.request.as_ref().map(|r| r.request_id.clone());
                let notice = Arc::new(Notice {
                    event,
                    link: request_link(&public_url, id.as_deref().unwrap_or_default()),
                    held: change.held,
                });
                for (name, wanted, tx) in &queues {
                    if !wanted.contains(&event) {
                        continue;
                    }
                    // Never wait for a busy channel: the others must not be delayed.
                    if tx.try_send(notice.clone()).is_err() {
                        tracing::error!(
                            channel = %name,
                            event = event.as_str(),
                            request = notice.request_id(),
                            "notification queue full; event dropped"
                        );
                        metrics.notification_failed(name);
                    }
                }
            }
        }));
        Hub { tasks }
    }
}

impl Drop for Hub {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// What every delivery needs.
pub(crate) struct Ctx {
    pub(crate) store: Arc<Store>,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) http: reqwest::Client,
}

/// The HTTP client of all channels: no redirects, so a signed body or a bot token is never
/// sent on to another place.
pub(crate) fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .user_agent(concat!("airlock-server/", env!("CARGO_PKG_VERSION")))
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap_or_default()
}

/// What one attempt came to.
pub(crate) enum Attempt<T> {
    /// Delivered.
    Done(T),
    /// Failed; worth trying again.
    Retry(Option<u16>, String),
    /// Failed for good (the receiver refused it).
    Fail(Option<u16>, String),
}

impl<T> Attempt<T> {
    pub(crate) fn map<U>(self, f: impl FnOnce(T) -> U) -> Attempt<U> {
        match self {
            Attempt::Done(v) => Attempt::Done(f(v)),
            Attempt::Retry(s, e) => Attempt::Retry(s, e),
            Attempt::Fail(s, e) => Attempt::Fail(s, e),
        }
    }
}

/// Sends `req` and sorts the answer: 2xx is done, 429 and 5xx and errors on the way are worth
/// a retry, other statuses are final.
pub(crate) async fn send(req: reqwest::RequestBuilder) -> Attempt<reqwest::Response> {
    match req.send().await {
        Err(e) => Attempt::Retry(None, error_text(e)),
        Ok(r) if r.status().is_success() => Attempt::Done(r),
        Ok(r) => {
            let status = r.status();
            let body = r.text().await.unwrap_or_default();
            let error = format!("HTTP {status}: {}", clip(body.trim(), 200));
            if status.as_u16() == 429 || status.is_server_error() {
                Attempt::Retry(Some(status.as_u16()), error)
            } else {
                Attempt::Fail(Some(status.as_u16()), error)
            }
        }
    }
}

/// A reqwest error with its causes but without its URL (a Teams URL embeds a key).
pub(crate) fn error_text(e: reqwest::Error) -> String {
    let e = e.without_url();
    let mut text = e.to_string();
    let mut cause = std::error::Error::source(&e);
    while let Some(c) = cause {
        text.push_str(": ");
        text.push_str(&c.to_string());
        cause = c.source();
    }
    text
}

/// At most `max` characters of `s`, marked when cut.
pub(crate) fn clip(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_owned(),
    }
}

impl Ctx {
    /// Runs `attempt` until it is done, fails for good or `retry.max_attempts` are spent,
    /// waiting `retry.backoff` (doubling) between attempts. Every attempt is logged under
    /// delivery `id`; each failure is counted. Returns what the successful attempt gave.
    pub(crate) async fn deliver<T, F, Fut>(
        &self,
        id: &str,
        channel: &str,
        notice: &Notice,
        retry: &Retry,
        mut attempt: F,
    ) -> Option<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Attempt<T>>,
    {
        let mut delay = retry.backoff;
        let max = retry.max_attempts.max(1);
        for n in 1..=max {
            let outcome = tokio::time::timeout(retry.timeout, attempt())
                .await
                .unwrap_or_else(|_| {
                    Attempt::Retry(None, format!("no answer within {:?}", retry.timeout))
                });
            let (status, error, last) = match outcome {
                Attempt::Done(v) => {
                    self.log(id, channel, notice, n, None, "");
                    return Some(v);
                }
                Attempt::Retry(s, e) => (s, e, n == max),
                Attempt::Fail(s, e) => (s, e, true),
            };
            self.log(id, channel, notice, n, Some(status), &error);
            self.metrics.notification_failed(channel);
            if last {
                tracing::error!(
                    channel,
                    delivery = id,
                    event = notice.event.as_str(),
                    request = notice.request_id(),
                    attempt = n,
                    error = %error,
                    "notification failed; given up"
                );
                return None;
            }
            tracing::warn!(
                channel,
                delivery = id,
                attempt = n,
                error = %error,
                retry_in = ?delay,
                "notification attempt failed"
            );
            tokio::time::sleep(delay).await;
            delay = delay.saturating_mul(2);
        }
        None
    }

    /// Writes one attempt to the delivery log: `failed` holds the failure's HTTP status, if
    /// any; `None` means it succeeded.
    fn log(
        &self,
        id: &str,
        channel: &str,
        notice: &Notice,
        attempt: u32,
        failed: Option<Option<u16>>,
        error: &str,
    ) {
        let now = now_ms();
        let result = self.store.with_conn(|c| {
            c.execute(
                "INSERT OR REPLACE INTO deliveries
                 (id, channel, event, request_id, attempt, ok, status, error, at_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
                params![
                    id,
                    channel,
                    notice.event.as_str(),
                    notice.request_id(),
                    attempt,
                    failed.is_none(),
                    failed.flatten(),
                    error,
                    now
                ],
            )?;
            c.execute("DELETE FROM deliveries WHERE at_ms < ?1", [now - KEEP_MS])
        });
        if let Err(e) = result {
            tracing::error!(error = %e, "writing the delivery log failed");
        }
    }
}

/// A new delivery id.
pub(crate) fn delivery_id() -> String {
    crate::auth::random_hex(8).unwrap_or_else(|_| format!("{:x}", now_ms()))
}

/// One attempt to deliver an event, from the delivery log.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Delivery {
    /// The delivery (the same for every attempt of one event on one channel).
    pub id: String,
    /// `slack`, `teams` or `webhook:NAME`.
    pub channel: String,
    /// Event name.
    pub event: String,
    /// The request.
    pub request_id: String,
    /// 1 for the first attempt.
    pub attempt: u32,
    /// Whether this attempt delivered it.
    pub ok: bool,
    /// HTTP status of the answer, if there was one.
    pub status: Option<u16>,
    /// Why it failed ("" when it did not).
    pub error: String,
    /// When (Unix ms).
    pub at_ms: i64,
}

/// The delivery log, newest attempt first, at most `limit` rows.
pub fn deliveries(store: &Store, limit: u32) -> Result<Vec<Delivery>, StoreError> {
    store.with_conn(|c| {
        let mut stmt = c.prepare(
            "SELECT id, channel, event, request_id, attempt, ok, status, error, at_ms
             FROM deliveries ORDER BY at_ms DESC, rowid DESC LIMIT ?1",
        )?;
        let rows = stmt.query_map([limit], |r| {
            Ok(Delivery {
                id: r.get(0)?,
                channel: r.get(1)?,
                event: r.get(2)?,
                request_id: r.get(3)?,
                attempt: r.get(4)?,
                ok: r.get(5)?,
                status: r.get(6)?,
                error: r.get(7)?,
                at_ms: r.get(8)?,
            })
        })?;
        rows.collect()
    })
}

/// The facts about a request that every message shows.
pub(crate) struct Facts {
    pub host: String,
    pub account: String,
    pub what: String,
    pub rule: String,
    pub risk: String,
    pub deadline: String,
}

impl Facts {
    pub(crate) fn of(held: &HeldRequest) -> Self {
        let req = held.request.clone().unwrap_or_default();
        let account = match &req.process {
            Some(p) if !p.login_user.is_empty() && p.login_user != p.user => {
                format!("{} (login {})", p.user, p.login_user)
            }
            Some(p) => p.user.clone(),
            None => String::new(),
        };
        let what = match &req.action {
            Some(Action::Exec(e)) if !e.argv.is_empty() => e.argv.join(" "),
            Some(Action::Exec(e)) => e.path.clone(),
            Some(Action::Connect(c)) => {
                let proto = match c.protocol {
                    2 => "udp",
                    _ => "tcp",
                };
                if c.address.contains(':') {
                    format!("connect [{}]:{}/{proto}", c.address, c.port)
                } else {
                    format!("connect {}:{}/{proto}", c.address, c.port)
                }
            }
            None => String::new(),
        };
        let rule = match (req.rule.is_empty(), req.description.is_empty()) {
            (_, true) => req.rule.clone(),
            (true, false) => req.description.clone(),
            (false, false) => format!("{}: {}", req.rule, req.description),
        };
        let host = if held.hostname.is_empty() {
            held.host_id.clone()
        } else {
            held.hostname.clone()
        };
        Self {
            host,
            account,
            what: clip(&what, 1500),
            rule: clip(&rule, 500),
            risk: if req.risk.is_empty() {
                "unspecified".into()
            } else {
                req.risk
            },
            deadline: utc(req.deadline_unix_ms),
        }
    }
}

/// `ms` as `2026-11-22 14:03:07 UTC`, or "none" when it is not a usable time.
pub(crate) fn utc(ms: i64) -> String {
    let fmt =
        time::macros::format_description!("[year]-[month]-[day] [hour]:[minute]:[second] UTC");
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .ok()
        .filter(|_| ms > 0 && ms < 253_402_300_800_000)
        .and_then(|t| t.format(&fmt).ok())
        .unwrap_or_else(|| "none".into())
}

/// How a decided request ended, in one line: `Approved by alice, bob: looks fine`.
pub(crate) fn outcome(held: &HeldRequest) -> String {
    let state = match held.state() {
        RequestState::Approved => "Approved",
        RequestState::Denied => "Denied",
        RequestState::Expired => "Expired",
        RequestState::Cancelled => "Cancelled",
        RequestState::Pending => "Pending",
        RequestState::Unspecified => "Unknown",
    };
    let mut line = state.to_owned();
    if held.state() == RequestState::Expired {
        line.push_str(": no decision before the deadline");
    } else if !held.decided_by.is_empty() {
        line.push_str(" by ");
        line.push_str(&held.decided_by);
    }
    if !held.reason.is_empty() {
        line.push_str(": ");
        line.push_str(&held.reason);
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;
    use airlock_proto::v1::ActionRequest;

    fn change(action: &str, state: RequestState) -> Change {
        Change {
            action: action.into(),
            held: HeldRequest {
                state: state as i32,
                ..Default::default()
            },
        }
    }

    #[test]
    fn store_changes_map_to_three_events() {
        use RequestState::*;
        let of = |a, s| Event::of(&change(a, s));
        assert_eq!(of("request.received", Pending), Some(Event::Received));
        assert_eq!(of("request.vote.approve", Pending), Some(Event::Vote));
        assert_eq!(of("request.vote.deny", Pending), Some(Event::Vote));
        assert_eq!(of("request.vote.approve", Approved), Some(Event::Decided));
        assert_eq!(of("request.vote.deny", Denied), Some(Event::Decided));
        assert_eq!(of("request.approved.grant", Approved), Some(Event::Decided));
        assert_eq!(of("request.cancelled", Cancelled), Some(Event::Decided));
        assert_eq!(of("request.expired", Expired), Some(Event::Decided));
        assert_eq!(of("request.outcome", Approved), None);
        assert_eq!(of("request.outcome", Pending), None);
    }

    #[test]
    fn links_encode_the_id() {
        let base = Url::parse("https://airlock.example.com").unwrap();
        assert_eq!(
            request_link(&base, "r-1"),
            "https://airlock.example.com/requests/r-1"
        );
        let sub = Url::parse("https://example.com/airlock/").unwrap();
        assert_eq!(
            request_link(&sub, "a/b c"),
            "https://example.com/airlock/requests/a%2Fb%20c"
        );
    }

    #[test]
    fn facts_and_outcomes_read_well() {
        let mut held = HeldRequest {
            hostname: "web-1".into(),
            request: Some(ActionRequest {
                request_id: "r".into(),
                rule: "net".into(),
                action: Some(Action::Connect(airlock_proto::v1::ConnectAction {
                    address: "2001:db8::1".into(),
                    port: 443,
                    protocol: 1,
                    family: 6,
                    ..Default::default()
                })),
                deadline_unix_ms: 1_767_225_600_000,
                ..Default::default()
            }),
            ..Default::default()
        };
        let f = Facts::of(&held);
        assert_eq!(f.what, "connect [2001:db8::1]:443/tcp");
        assert_eq!(f.deadline, "2026-01-01 00:00:00 UTC");
        assert_eq!(utc(i64::MAX), "none");
        held.state = RequestState::Denied as i32;
        held.decided_by = "bob".into();
        held.reason = "freeze".into();
        assert_eq!(outcome(&held), "Denied by bob: freeze");
        held.state = RequestState::Expired as i32;
        held.decided_by.clear();
        held.reason.clear();
        assert_eq!(outcome(&held), "Expired: no decision before the deadline");
        assert_eq!(clip("héllo", 2), "hé…");
    }
}
