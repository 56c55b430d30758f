//! Slack: a message with Approve and Deny buttons when a request arrives, updated as votes come
//! in and replaced by the outcome once it is decided; and the endpoint Slack calls when a button
//! is pressed (`POST /slack/interactions`, the app's Interactivity request URL).
//!
//! A press is trusted only when Slack's signature over the raw body verifies and its timestamp
//! is within five minutes. The Slack user must be mapped to an approver identity in
//! `[slack] users`; the vote then goes through [`Decisions::decide`], so the same rules hold as
//! in the web UI (groups, quorum, no approving one's own request, one vote per person). Refusals
//! are told to the presser only (an ephemeral reply through the payload's `response_url`).

use std::{collections::BTreeMap, sync::Arc};

use airlock_proto::v1::{HeldRequest, RequestState, Verdict};
use axum::{
    body::Bytes,
    extract::State,
    http::{HeaderMap, StatusCode},
    response::{IntoResponse, Response},
    routing::post,
    Router,
};
use hmac::{Hmac, Mac};
use serde::Deserialize;
use serde_json::{json, Value};
use sha2::Sha256;
use url::Url;

use super::{
    client, clip, delivery_id, error_text, outcome, request_link, send, Attempt, Ctx, Event, Facts,
    Notice, Retry,
};
use crate::{
    config::{read_secret, ConfigError, Secret, SlackFile},
    decide::{Approver, DecideError, Decisions},
    store::StoreError,
    types::now_ms,
};

/// Largest distance between a request's timestamp and now, seconds.
const MAX_SKEW_SECS: u64 = 5 * 60;

/// The Slack app: where to post, and how to check and map button presses.
#[derive(Debug)]
pub struct SlackApp {
    channel: String,
    bot_token: Secret,
    signing_secret: Secret,
    users: BTreeMap<String, String>,
    api_url: String,
    public_url: Url,
    retry: Retry,
    http: reqwest::Client,
}

/// Why a request claiming to come from Slack was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SlackAuthError {
    /// `X-Slack-Request-Timestamp` is missing or not a number.
    #[error("missing or malformed X-Slack-Request-Timestamp")]
    BadTimestamp,
    /// The timestamp is more than five minutes away from now (a replay, or a wrong clock).
    #[error("X-Slack-Request-Timestamp is more than 5 minutes from now")]
    Stale,
    /// `X-Slack-Signature` is missing or does not match.
    #[error("missing or invalid X-Slack-Signature")]
    BadSignature,
}

/// Checks Slack's request signature: `signature` must be `v0=` and the hex HMAC-SHA256, keyed
/// with the app's signing secret, of `v0:{timestamp}:{body}`, and `timestamp` (Unix seconds)
/// within five minutes of `now_unix`. The comparison takes constant time.
pub fn verify_signature(
    secret: &str,
    timestamp: &str,
    body: &[u8],
    signature: &str,
    now_unix: i64,
) -> Result<(), SlackAuthError> {
    let ts: i64 = timestamp
        .trim()
        .parse()
        .map_err(|_| SlackAuthError::BadTimestamp)?;
    if now_unix.abs_diff(ts) > MAX_SKEW_SECS {
        return Err(SlackAuthError::Stale);
    }
    let given = signature
        .strip_prefix("v0=")
        .and_then(|h| hex::decode(h).ok())
        .ok_or(SlackAuthError::BadSignature)?;
    let mut mac =
        Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC takes keys of any length");
    mac.update(b"v0:");
    mac.update(timestamp.as_bytes());
    mac.update(b":");
    mac.update(body);
    mac.verify_slice(&given)
        .map_err(|_| SlackAuthError::BadSignature)
}

impl SlackApp {
    pub(super) fn from_config(s: &SlackFile, public_url: &Url) -> Result<Self, ConfigError> {
        Ok(Self {
            channel: s.channel.clone(),
            bot_token: read_secret(&s.bot_token_file)?,
            signing_secret: read_secret(&s.signing_secret_file)?,
            users: s.users.clone(),
            api_url: s.api_url.trim_end_matches('/').to_owned(),
            public_url: public_url.clone(),
            retry: Retry::default(),
            http: client(),
        })
    }

    /// Calls Web API `method` with `body`; Slack answers 200 with `ok: false` for most errors.
    fn call(
        &self,
        http: &reqwest::Client,
        method: &str,
        body: &Value,
    ) -> impl std::future::Future<Output = Attempt<Value>> {
        let req = http
            .post(format!("{}/{method}", self.api_url))
            .bearer_auth(self.bot_token.expose())
            .json(body);
        async move {
            let r = match send(req).await {
                Attempt::Done(r) => r,
                Attempt::Retry(s, e) => return Attempt::Retry(s, e),
                Attempt::Fail(s, e) => return Attempt::Fail(s, e),
            };
            let status = Some(r.status().as_u16());
            match r.json::<Value>().await {
                Err(e) => Attempt::Retry(status, format!("unreadable answer: {}", error_text(e))),
                Ok(v) if v["ok"] == true => Attempt::Done(v),
                Ok(v) => {
                    let error = v["error"].as_str().unwrap_or("unknown error").to_owned();
                    let transient = [
                        "ratelimited",
                        "internal_error",
                        "fatal_error",
                        "service_unavailable",
                        "request_timeout",
                    ];
                    if transient.contains(&error.as_str()) {
                        Attempt::Retry(status, format!("Slack: {error}"))
                    } else {
                        Attempt::Fail(status, format!("Slack: {error}"))
                    }
                }
            }
        }
    }

    pub(super) async fn deliver(&self, ctx: &Ctx, notice: &Notice) {
        let id = notice.request_id().to_owned();
        let (text, blocks) = message(notice);
        let delivery = delivery_id("slack", notice.seq);
        if notice.event == Event::Received {
            // Posted already, by a replica that stopped before it could move the channel's
            // cursor: one message per request, not two.
            if matches!(ctx.store.slack_message(&id).await, Ok(Some(_))) {
                return;
            }
            let body = json!({"channel": self.channel, "text": text, "blocks": blocks});
            let posted = ctx
                .deliver(&delivery, "slack", notice, &self.retry, || {
                    self.call(&ctx.http, "chat.postMessage", &body)
                })
                .await;
            let Some(v) = posted else { return };
            let channel = v["channel"].as_str().unwrap_or(&self.channel).to_owned();
            let ts = v["ts"].as_str().unwrap_or_default().to_owned();
            if let Err(e) = ctx.store.save_slack_message(&id, &channel, &ts).await {
                tracing::error!(error = %e, request = %id, "remembering the Slack message failed");
            }
            return;
        }
        let (channel, ts) = match ctx.store.slack_message(&id).await {
            Ok(Some(m)) => m,
            // Never posted (approved at once by a grant, or the post failed): nothing to update.
            Ok(None) => return,
            Err(e) => {
                tracing::error!(error = %e, request = %id, "looking up the Slack message failed");
                return;
            }
        };
        let body = json!({"channel": channel, "ts": ts, "text": text, "blocks": blocks});
        ctx.deliver(&delivery, "slack", notice, &self.retry, || {
            self.call(&ctx.http, "chat.update", &body)
        })
        .await;
    }

    /// Answers only the presser, through the interaction's `response_url`.
    async fn tell(&self, decisions: &Decisions, response_url: &str, text: &str) {
        let body = json!({"response_type": "ephemeral", "replace_original": false, "text": text});
        let sent = match self
            .http
            .post(response_url)
            .timeout(self.retry.timeout)
            .json(&body)
            .send()
            .await
        {
            Ok(r) if r.status().is_success() => Ok(()),
            Ok(r) => Err(format!("HTTP {}", r.status())),
            Err(e) => Err(error_text(e)),
        };
        if let Err(e) = sent {
            tracing::warn!(error = %e, "replying to a Slack button press failed");
            decisions.metrics.notification_failed("slack");
        }
    }
}

/// Escapes the three characters Slack's mrkdwn reserves.
fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

fn plain(text: String) -> Value {
    json!({"type": "plain_text", "text": clip(&text, 1900), "emoji": false})
}

/// The fallback text and the Block Kit blocks for `notice`.
pub fn message(notice: &Notice) -> (String, Value) {
    let held = &notice.held;
    let f = Facts::of(held);
    let id = notice.request_id();
    // Values are plain text: a command line must show exactly as it is, not as mrkdwn.
    let fields = json!({"type": "section", "fields": [
        plain(format!("Host: {}", f.host)),
        plain(format!("Account: {}", f.account)),
        plain(format!("What: {}", f.what)),
        plain(format!("Rule: {}", f.rule)),
        plain(format!("Risk: {}", f.risk)),
        plain(format!("Deadline: {}", f.deadline)),
    ]});
    if notice.event == Event::Decided {
        let outcome = outcome(held);
        let state = outcome.split([':', ' ']).next().unwrap_or_default();
        let blocks = json!([
            {"type": "header", "text": plain(clip(&format!("{state} on {}", f.host), 140))},
            fields,
            {"type": "section",
                "text": {"type": "mrkdwn", "text": format!("*{}*", esc(&clip(&outcome, 2500)))}},
            {"type": "context", "elements": [{"type": "mrkdwn",
                "text": format!("Request {} · <{}|Open in Airlock>", esc(id), notice.link)}]},
        ]);
        return (
            esc(&format!("{outcome} ({} on {})", f.what, f.host)),
            blocks,
        );
    }
    let groups = if held.approver_groups.is_empty() {
        "any approver".to_owned()
    } else {
        held.approver_groups.join(", ")
    };
    let mut context = format!(
        "Request {} · needs {} approval(s) from {}",
        esc(id),
        held.quorum.max(1),
        esc(&groups)
    );
    if !held.votes.is_empty() {
        let votes: Vec<String> = held
            .votes
            .iter()
            .map(|v| {
                let how = if v.verdict == Verdict::Allow as i32 {
                    "approved"
                } else {
                    "denied"
                };
                format!("{} {how}", esc(&v.approver))
            })
            .collect();
        context.push_str(&format!(" · votes: {}", votes.join(", ")));
    }
    let button = |text: &str, action: &str, style: &str| {
        json!({"type": "button", "text": plain(text.into()), "action_id": action,
            "style": style, "value": id})
    };
    let blocks = json!([
        {"type": "header", "text": plain(clip(&format!("Approval needed on {}", f.host), 140))},
        fields,
        {"type": "context", "elements": [{"type": "mrkdwn", "text": context}]},
        {"type": "actions", "block_id": "airlock_decide", "elements": [
            button("Approve", "approve", "primary"),
            button("Deny", "deny", "danger"),
            {"type": "button", "text": plain("Open in Airlock".into()), "action_id": "open",
                "url": notice.link},
        ]},
    ]);
    let text = format!("Approval needed: {} on {} as {}", f.what, f.host, f.account);
    (esc(&text), blocks)
}

/// The Slack buttons' endpoint: `POST /slack/interactions`. Votes go through `decisions`.
pub fn router(app: Arc<SlackApp>, decisions: Decisions) -> Router {
    Router::new()
        .route("/slack/interactions", post(interactions))
        .with_state((app, decisions))
}

#[derive(Deserialize)]
struct Form {
    payload: String,
}

#[derive(Deserialize)]
struct Interaction {
    #[serde(rename = "type")]
    kind: String,
    user: Option<SlackUser>,
    #[serde(default)]
    actions: Vec<SlackAction>,
    #[serde(default)]
    response_url: String,
}

#[derive(Deserialize)]
struct SlackUser {
    id: String,
}

#[derive(Deserialize)]
struct SlackAction {
    action_id: String,
    #[serde(default)]
    value: String,
}

/// The interaction in a (signed) request body, if it reads.
fn parse_interaction(body: &[u8]) -> Option<Interaction> {
    serde_urlencoded::from_bytes::<Form>(body)
        .ok()
        .and_then(|f| serde_json::from_str::<Interaction>(&f.payload).ok())
}

/// Fuzzing entry: an interaction body through the parsing a press goes through (signature
/// check first, then the payload and its actions).
#[cfg(feature = "fuzzing")]
pub fn fuzz_interaction(body: &[u8]) {
    let _ = verify_signature("secret", "1700000000", body, "v0=00", 1_700_000_000);
    if let Some(i) = parse_interaction(body) {
        for a in &i.actions {
            let _ = (
                a.action_id.as_str(),
                a.value.as_str(),
                &i.response_url,
                &i.kind,
            );
        }
        let _ = i.user.map(|u| u.id);
    }
}

async fn interactions(
    State((app, decisions)): State<(Arc<SlackApp>, Decisions)>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
    };
    if let Err(e) = verify_signature(
        app.signing_secret.expose(),
        header("x-slack-request-timestamp"),
        &body,
        header("x-slack-signature"),
        now_ms() / 1000,
    ) {
        tracing::warn!(error = %e, "refused a Slack interaction");
        return (StatusCode::UNAUTHORIZED, format!("{e}\n")).into_response();
    }
    let Some(i) = parse_interaction(&body) else {
        // Signed by Slack, so not an attack: a payload this code does not know. Slack retries
        // anything but 200, which would not help.
        tracing::warn!("ignored a Slack interaction without a readable payload");
        return StatusCode::OK.into_response();
    };
    if i.kind != "block_actions" {
        return StatusCode::OK.into_response();
    }
    let user = i.user.map(|u| u.id).unwrap_or_default();
    for action in i.actions {
        let verdict = match action.action_id.as_str() {
            "approve" => Verdict::Allow,
            "deny" => Verdict::Deny,
            // "open" is a link; Slack reports its press too.
            _ => continue,
        };
        let reply = press(&app, &decisions, &user, &action.value, verdict).await;
        if let (Some(text), false) = (reply, i.response_url.is_empty()) {
            let (a, d, url) = (app.clone(), decisions.clone(), i.response_url.clone());
            // Slack wants its answer within 3 seconds; the reply goes separately.
            tokio::spawn(async move { a.tell(&d, &url, &text).await });
        }
    }
    StatusCode::OK.into_response()
}

/// Records Slack user `user`'s press on request `id`; returns what to tell them, if anything
/// (a decided request needs no reply: the message itself is updated).
async fn press(
    app: &SlackApp,
    decisions: &Decisions,
    user: &str,
    id: &str,
    verdict: Verdict,
) -> Option<String> {
    let open = format!("<{}|open it in Airlock>", request_link(&app.public_url, id));
    let Some(name) = app.users.get(user) else {
        tracing::warn!(
            slack_user = %user,
            request = %id,
            "press by a Slack user with no approver identity refused"
        );
        return Some(format!(
            "Your Slack account ({}) is not linked to an Airlock approver, nothing was recorded. \
             Ask an administrator to add it to `[slack] users`, or {open}.",
            esc(user)
        ));
    };
    if verdict == Verdict::Allow {
        // A button cannot carry a reason, and "approved in Slack" must not stand in for one.
        if let Ok(held) = decisions.store.get(id).await {
            if held.reason_required && held.state() == RequestState::Pending {
                return Some(format!(
                    "Rule {} needs a reason with every approval, which a Slack button \
                     cannot give: {open} to approve it there.",
                    esc(&held.route)
                ));
            }
        }
    }
    let reason = match verdict {
        Verdict::Allow => "approved in Slack".to_owned(),
        _ => format!("denied in Slack by {name}"),
    };
    match decisions
        .decide(&Approver::named(name.clone()), id, verdict, &reason, 0)
        .await
    {
        Ok(held) if held.state() == RequestState::Pending => Some(progress(&held, verdict)),
        Ok(_) => None,
        Err(DecideError::Store(StoreError::NotPending { state, .. })) => Some(format!(
            "This request is already decided (it is {state}); your vote was not recorded."
        )),
        Err(DecideError::Store(StoreError::PastDeadline { .. })) => {
            Some("This request is past its deadline; your vote was not recorded.".into())
        }
        Err(DecideError::Store(StoreError::AlreadyVoted { .. })) => {
            Some("You have already voted on this request; a second vote does not count.".into())
        }
        Err(DecideError::Store(StoreError::NotFound(_))) => {
            Some(format!("Airlock has no request {}.", esc(id)))
        }
        Err(DecideError::Forbidden(why) | DecideError::Invalid(why)) => Some(format!(
            "Your vote was not recorded: {}. You can {open}.",
            esc(&why)
        )),
        Err(e) => {
            tracing::error!(error = %e, request = %id, "recording a Slack vote failed");
            Some(format!(
                "Airlock could not record your vote; try again or {open}."
            ))
        }
    }
}

/// "Your approval is recorded: 1 of 2 approvals so far."
fn progress(held: &HeldRequest, verdict: Verdict) -> String {
    let (noun, plural) = match verdict {
        Verdict::Allow => ("approval", "approvals"),
        _ => ("denial", "denials"),
    };
    let n = held
        .votes
        .iter()
        .filter(|v| v.verdict == verdict as i32)
        .count();
    format!(
        "Your {noun} is recorded: {n} of {} {plural} so far.",
        held.quorum.max(1)
    )
}
