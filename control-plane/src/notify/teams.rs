//! Microsoft Teams: an Adaptive Card when a request arrives and a short one when it is decided,
//! posted to an incoming webhook (or a Workflows "post to a channel when a webhook request is
//! received" URL). Teams cards cannot vote: their button opens the request in Airlock.

use serde_json::{json, Value};

use super::{delivery_id, outcome, send, Ctx, Event, Facts, Notice, Retry};
use crate::config::Secret;

/// The Teams channel.
#[derive(Debug, Clone)]
pub struct Teams {
    /// The webhook URL; it embeds a key, so it is a secret and never logged.
    url: Secret,
    retry: Retry,
}

impl Teams {
    /// Posts to `url` with `retry`.
    pub fn new(url: Secret, retry: Retry) -> Self {
        Self { url, retry }
    }

    pub(super) async fn deliver(&self, ctx: &Ctx, notice: &Notice) {
        let body = card(notice).to_string();
        let id = delivery_id("teams", notice.seq);
        ctx.deliver(&id, "teams", notice, &self.retry, || {
            let req = ctx
                .http
                .post(self.url.expose())
                .header("content-type", "application/json")
                .body(body.clone());
            async move { send(req).await.map(|_| ()) }
        })
        .await;
    }
}

/// The message for `notice`: an Adaptive Card with the request's facts, or its outcome.
pub fn card(notice: &Notice) -> Value {
    let f = Facts::of(&notice.held);
    // Teams renders fact values and text blocks as Markdown: agent text must stay text.
    let md = crate::display::teams_text;
    let fact = |title: &str, value: &str| json!({"title": title, "value": md(value)});
    let (title, facts, open) = match notice.event {
        Event::Decided => (
            md(&outcome(&notice.held)),
            vec![fact("Host", &f.host), fact("What", &f.what)],
            "Open in Airlock",
        ),
        Event::Received | Event::Vote => (
            format!("Approval needed on {}", md(&f.host)),
            vec![
                fact("Host", &f.host),
                fact("Account", &f.account),
                fact("What", &f.what),
                fact("Rule", &f.rule),
                fact("Risk", &f.risk),
                fact("Deadline", &f.deadline),
            ],
            "Review in Airlock",
        ),
        // Never sent to Teams (see `Sink::wants`); a plain card should that change.
        Event::Checkpoint => ("Audit checkpoint".to_owned(), Vec::new(), "Open in Airlock"),
    };
    json!({
        "type": "message",
        "attachments": [{
            "contentType": "application/vnd.microsoft.card.adaptive",
            "contentUrl": null,
            "content": {
                "$schema": "http://adaptivecards.io/schemas/adaptive-card.json",
                "type": "AdaptiveCard",
                "version": "1.4",
                "body": [
                    {"type": "TextBlock", "text": title, "weight": "Bolder", "size": "Medium",
                        "wrap": true},
                    {"type": "FactSet", "facts": facts},
                ],
                "actions": [{"type": "Action.OpenUrl", "title": open, "url": notice.link}],
            },
        }],
    })
}
