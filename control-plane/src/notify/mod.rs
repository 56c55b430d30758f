//! Fan-out of request events to notification channels (Slack, Teams, generic webhooks).
//!
//! Every change to a request in the audit trail becomes one of three events:
//!
//! - `request.received`: a new request waits for approvers;
//! - `request.vote`: someone voted and the request is still pending (quorum not reached);
//! - `request.decided`: the request left the pending state (approved, denied, approved at once
//!   by a grant, cancelled or expired);
//! - `audit.checkpoint`: a signed checkpoint of the audit chain's head ([`crate::checkpoint`]),
//!   sent only to webhooks that list it in their `events`, so that a copy lives outside the
//!   database's host.
//!
//! Every channel is delivered by its own worker, in the trail's order, one event at a time (a
//! Slack update must follow its post), so a slow or failing channel never delays the others.
//! The trail is the queue: each channel keeps its cursor in it, in the database, and the
//! replica holding the channel's lease ([`crate::store::deliveries`]) delivers; the others wait.
//! So each event is sent once per channel, not once per replica, nothing is dropped when a
//! channel falls behind, and when a replica dies another takes its channels over from their
//! cursors once its lease runs out (an event it was sending may then be sent again, with the
//! same delivery id). A delivery is retried with exponential backoff on connection errors,
//! timeouts, 5xx and 429; every attempt is written to the delivery log and each failed
//! attempt is counted in `airlock_notification_failures`.

pub mod slack;
pub mod teams;
pub mod webhook;

use std::{future::Future, sync::Arc, time::Duration};

use airlock_proto::v1::{HeldRequest, RequestState};
use tokio::task::JoinHandle;
use url::Url;

use crate::{
    config::{read_secret, ConfigError, ServerConfig},
    metrics::Metrics,
    store::{deliveries::Delivery, Change, Store},
    types::now_ms,
};

/// How long a replica holds a channel after its last renewal.
pub const LEASE_MS: i64 = 15_000;

/// Changes read from the trail at a time.
const PAGE: i64 = 200;

/// What happened to a request, as channels are told.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// A new pending request.
    Received,
    /// A vote that left the request pending.
    Vote,
    /// The request is no longer pending.
    Decided,
    /// A signed checkpoint of the audit chain (no request).
    Checkpoint,
}

impl Event {
    /// The event's name (`request.received`, `request.vote`, `request.decided`).
    pub fn as_str(self) -> &'static str {
        match self {
            Event::Received => "request.received",
            Event::Vote => "request.vote",
            Event::Decided => "request.decided",
            Event::Checkpoint => "audit.checkpoint",
        }
    }

    /// The event a change in the trail stands for, if any (agent outcomes are not notified).
    /// It depends on the change alone (its action, and for a vote whether it decided), not on
    /// the request's state when the channel gets to it.
    pub fn of(change: &Change) -> Option<Event> {
        match change.action.as_str() {
            "request.received" => Some(Event::Received),
            a if a.starts_with("request.vote.") => {
                let decided = serde_json::from_str::<serde_json::Value>(&change.payload)
                    .is_ok_and(|p| p["decided"] == true);
                Some(if decided { Event::Decided } else { Event::Vote })
            }
            "request.approved.grant" | "request.cancelled" | "request.expired" => {
                Some(Event::Decided)
            }
            "audit.checkpoint" => Some(Event::Checkpoint),
            _ => None,
        }
    }
}

/// One event for one request (or one checkpoint), as handed to every channel.
#[derive(Debug)]
pub struct Notice {
    /// Its place in the audit trail.
    pub seq: i64,
    /// What happened.
    pub event: Event,
    /// The request after the change (empty for a checkpoint).
    pub held: HeldRequest,
    /// The request's page in the web UI ("" for a checkpoint).
    pub link: String,
    /// For [`Event::Checkpoint`]: the signed checkpoint line.
    pub checkpoint: Option<String>,
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
        let listed = |w: &webhook::Webhook| w.events.iter().any(|e| e == event.as_str());
        match (self, event) {
            // Checkpoints only where asked for: receivers written for request events would not
            // know what to do with them.
            (Sink::Webhook(w), Event::Checkpoint) => listed(w),
            (_, Event::Checkpoint) => false,
            (Sink::Slack(_), _) => true,
            (Sink::Teams(_), _) => event != Event::Vote,
            (Sink::Webhook(w), _) => w.events.is_empty() || listed(w),
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
    /// Starts one worker per channel of `channels`: every event committed after this returns
    /// is delivered on each (by whichever replica holds the channel then).
    pub async fn start(
        store: Store,
        channels: &Channels,
        metrics: Arc<Metrics>,
    ) -> Result<Hub, crate::store::StoreError> {
        let ctx = Arc::new(Ctx {
            store,
            metrics,
            http: client(),
        });
        let sinks = channels
            .slack
            .iter()
            .map(|s| Sink::Slack(s.clone()))
            .chain(channels.teams.iter().map(|t| Sink::Teams(t.clone())))
            .chain(channels.webhooks.iter().map(|w| Sink::Webhook(w.clone())));
        let mut tasks = Vec::new();
        for sink in sinks {
            ctx.store.register_channel(&sink.name()).await?;
            // At zero from the start, so a dashboard's rate() sees the first failure.
            drop(
                ctx.metrics
                    .notification_failures
                    .get_or_create(&crate::metrics::ChannelLabel {
                        channel: sink.name(),
                    }),
            );
            let (ctx, url) = (ctx.clone(), channels.public_url.clone());
            tasks.push(tokio::spawn(async move { work(sink, ctx, url).await }));
        }
        Ok(Hub { tasks })
    }
}

impl Drop for Hub {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Runs `fut` while renewing channel `name`'s lease; `None` if the lease was lost meanwhile
/// (another replica has the channel now, and `fut` is dropped).
async fn leased<F: Future>(store: &Store, name: &str, fut: F) -> Option<F::Output> {
    tokio::pin!(fut);
    let mut renew = tokio::time::interval(Duration::from_millis(LEASE_MS as u64 / 3));
    renew.tick().await;
    loop {
        tokio::select! {
            out = &mut fut => return Some(out),
            _ = renew.tick() => {
                if !matches!(store.claim_channel(name, LEASE_MS).await, Ok(Some(_))) {
                    tracing::warn!(channel = name, "lost the channel's lease; another replica delivers it now");
                    return None;
                }
            }
        }
    }
}

/// Delivers every event after the channel's cursor (while this replica holds its lease).
/// Returns false when the lease was lost.
async fn catch_up(sink: &Sink, ctx: &Ctx, name: &str, public_url: &Url, mut cursor: i64) -> bool {
    loop {
        let page = match ctx.store.changes_after(cursor, PAGE).await {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(channel = name, error = %e, "reading events for the channel failed");
                return true;
            }
        };
        let Some(last) = page.last().map(|c| c.seq) else {
            return true;
        };
        for c in page {
            let Some(event) = Event::of(&c).filter(|e| sink.wants(*e)) else {
                continue;
            };
            let notice = if event == Event::Checkpoint {
                let line = serde_json::from_str::<serde_json::Value>(&c.payload)
                    .ok()
                    .and_then(|p| p["checkpoint"].as_str().map(str::to_owned));
                let Some(line) = line else { continue };
                Notice {
                    seq: c.seq,
                    event,
                    held: HeldRequest::default(),
                    link: String::new(),
                    checkpoint: Some(line),
                }
            } else {
                let Some(held) = c.held.clone() else { continue };
                Notice {
                    seq: c.seq,
                    event,
                    link: request_link(public_url, &c.request_id),
                    held,
                    checkpoint: None,
                }
            };
            if leased(&ctx.store, name, sink.deliver(ctx, &notice))
                .await
                .is_none()
            {
                return false;
            }
            if !matches!(ctx.store.advance_channel(name, c.seq).await, Ok(true)) {
                return false;
            }
            cursor = c.seq;
        }
        if cursor != last {
            if !matches!(ctx.store.advance_channel(name, last).await, Ok(true)) {
                return false;
            }
            cursor = last;
        }
    }
}

/// One channel's worker: takes the channel's lease when it is free, delivers from its cursor,
/// then waits for news (or, without the lease, for its turn).
async fn work(sink: Sink, ctx: Arc<Ctx>, public_url: Url) {
    let name = sink.name();
    let mut head = ctx.store.head();
    loop {
        match ctx.store.claim_channel(&name, LEASE_MS).await {
            Ok(Some(cursor)) => {
                if catch_up(&sink, &ctx, &name, &public_url, cursor).await {
                    // Wake at the next change, or in time to renew the lease.
                    let wait = Duration::from_millis(LEASE_MS as u64 / 3);
                    let _ = tokio::time::timeout(wait, head.changed()).await;
                    continue;
                }
            }
            Ok(None) => {}
            Err(e) => tracing::warn!(channel = %name, error = %e, "claiming the channel failed"),
        }
        // Another replica delivers (or the database is away): look again a little later.
        tokio::time::sleep(Duration::from_millis(LEASE_MS as u64 / 3)).await;
    }
}

/// What every delivery needs.
pub(crate) struct Ctx {
    pub(crate) store: Store,
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
                    self.log(id, channel, notice, n, None, "").await;
                    return Some(v);
                }
                Attempt::Retry(s, e) => (s, e, n == max),
                Attempt::Fail(s, e) => (s, e, true),
            };
            self.log(id, channel, notice, n, Some(status), &error).await;
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
    async fn log(
        &self,
        id: &str,
        channel: &str,
        notice: &Notice,
        attempt: u32,
        failed: Option<Option<u16>>,
        error: &str,
    ) {
        let d = Delivery {
            id: id.to_owned(),
            channel: channel.to_owned(),
            event: notice.event.as_str().to_owned(),
            request_id: notice.request_id().to_owned(),
            attempt,
            ok: failed.is_none(),
            status: failed.flatten(),
            error: error.to_owned(),
            at_ms: now_ms(),
        };
        if let Err(e) = self.store.log_delivery(&d).await {
            tracing::error!(error = %e, "writing the delivery log failed");
        }
    }
}

/// The delivery id of event `seq` on `channel`: the same on every attempt and on every replica,
/// so a receiver can drop an event sent again after a replica took the channel over.
pub(crate) fn delivery_id(channel: &str, seq: i64) -> String {
    crate::audit::sha256_hex(format!("{channel}\u{1f}{seq}").as_bytes())[..16].to_owned()
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
        let mut what = crate::display::action_line(req.action.as_ref());
        if req.asked_ahead {
            // The AI agent's words, marked as such; each channel escapes them like the rest.
            what = format!(
                "{what}\n(asked ahead for up to {} min, no task is held; the AI agent's own words: \"{}\")",
                req.ahead_minutes.clamp(1, crate::store::requests::MAX_AHEAD_MINUTES),
                clip(&req.justification, 500)
            );
        }
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
            deadline: if req.wait {
                "none: held until someone decides".into()
            } else {
                utc(req.deadline_unix_ms)
            },
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
        RequestState::Observed => "Observed",
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
    use airlock_proto::v1::{action_request::Action, ActionRequest};

    fn change(action: &str, decided: bool) -> Change {
        Change {
            seq: 1,
            at_ms: 0,
            actor: "x".into(),
            action: action.into(),
            request_id: "r".into(),
            payload: serde_json::json!({ "decided": decided }).to_string(),
            held: Some(HeldRequest::default()),
            web: Default::default(),
        }
    }

    #[test]
    fn changes_map_to_three_events_by_what_happened_not_by_the_state_now() {
        let of = |a, d| Event::of(&change(a, d));
        assert_eq!(of("request.received", false), Some(Event::Received));
        assert_eq!(of("request.vote.approve", false), Some(Event::Vote));
        assert_eq!(of("request.vote.deny", false), Some(Event::Vote));
        assert_eq!(of("request.vote.approve", true), Some(Event::Decided));
        assert_eq!(of("request.vote.deny", true), Some(Event::Decided));
        assert_eq!(of("request.approved.grant", false), Some(Event::Decided));
        assert_eq!(of("request.cancelled", false), Some(Event::Decided));
        assert_eq!(of("request.expired", false), Some(Event::Decided));
        assert_eq!(of("request.outcome", false), None);
        assert_eq!(of("token.created", false), None);
        assert_eq!(delivery_id("slack", 7), delivery_id("slack", 7));
        assert_ne!(delivery_id("slack", 7), delivery_id("teams", 7));
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
        // Waiting: no deadline. Asked ahead: marked, the agent's words quoted.
        let r = held.request.as_mut().unwrap();
        r.wait = true;
        r.asked_ahead = true;
        r.justification = "INC-42".into();
        let f = Facts::of(&held);
        assert_eq!(f.deadline, "none: held until someone decides");
        assert_eq!(
            f.what,
            "connect [2001:db8::1]:443/tcp\n(asked ahead for up to 1 min, no task is held; the AI agent's own words: \"INC-42\")"
        );
    }
}
