//! Generic webhooks: every event POSTed as JSON, signed with a shared key.
//!
//! ```json
//! {"event": "request.decided", "delivery": "3f9c0a1be27d4c55", "sent_unix_ms": 1767225600000,
//!  "url": "https://airlock.example.com/requests/r-123", "state": "approved",
//!  "request": { ...the HeldRequest, as in `airlockctl --json`... }}
//! ```
//!
//! A webhook that lists `audit.checkpoint` in its `events` also gets every signed checkpoint of
//! the audit chain, to keep where the database's host cannot rewrite it; append each
//! `checkpoint` line to a file for `airlockctl audit verify --checkpoint FILE`:
//!
//! ```json
//! {"event": "audit.checkpoint", "delivery": "...", "sent_unix_ms": 1767225600000,
//!  "checkpoint": "airlock-checkpoint v1 seq=120 hash=... at=... key=... sig=..."}
//! ```
//!
//! Headers:
//!
//! - `X-Airlock-Event`: the event (`request.received`, `request.vote`, `request.decided`,
//!   `audit.checkpoint`);
//! - `X-Airlock-Delivery`: the delivery id (the same on every retry of one event; use it to
//!   drop duplicates);
//! - `X-Airlock-Timestamp`: Unix seconds when this attempt was sent;
//! - `X-Airlock-Signature`: `sha256=` and the lower-case hex HMAC-SHA256, keyed with the
//!   webhook's secret, of `{timestamp}.{body}` (the timestamp header, a dot, the raw body).
//!
//! A receiver verifies a delivery by computing the HMAC of the timestamp header, `.` and the
//! raw request body (before any JSON parsing) with the secret, comparing it to the signature in
//! constant time, and refusing timestamps more than a few minutes from its own clock (replays).
//!
//! Answer 2xx to accept. Connection errors, timeouts, 429 and 5xx are retried with exponential
//! backoff (`backoff_ms`, doubling, `max_attempts`); any other status is final.

use hmac::{Hmac, Mac};
use sha2::Sha256;

use super::{delivery_id, send, Ctx, Notice, Retry};
use crate::{config::Secret, types::now_ms};

/// One configured webhook.
#[derive(Debug, Clone)]
pub struct Webhook {
    /// Name in the delivery log and metrics (`webhook:NAME`).
    pub name: String,
    /// Where to POST.
    pub url: String,
    /// HMAC key.
    pub secret: Secret,
    /// Events to send; empty: all.
    pub events: Vec<String>,
    /// Retries.
    pub retry: Retry,
}

/// `sha256=` and the hex HMAC-SHA256 of `{timestamp}.{body}` under `secret`.
pub fn signature(secret: &[u8], timestamp: &str, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes keys of any length");
    mac.update(timestamp.as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

impl Webhook {
    pub(super) async fn deliver(&self, ctx: &Ctx, notice: &Notice) {
        let channel = format!("webhook:{}", self.name);
        let id = delivery_id(&channel, notice.seq);
        let body = match &notice.checkpoint {
            Some(line) => serde_json::json!({
                "event": notice.event.as_str(),
                "delivery": id,
                "sent_unix_ms": now_ms(),
                "checkpoint": line,
            }),
            None => serde_json::json!({
                "event": notice.event.as_str(),
                "delivery": id,
                "sent_unix_ms": now_ms(),
                "url": notice.link,
                "state": crate::types::state_name(notice.held.state()),
                "request": notice.held,
            }),
        }
        .to_string();
        ctx.deliver(&id, &channel, notice, &self.retry, || {
            let timestamp = (now_ms() / 1000).to_string();
            let sig = signature(self.secret.expose().as_bytes(), &timestamp, body.as_bytes());
            let req = ctx
                .http
                .post(&self.url)
                .header("content-type", "application/json")
                .header("x-airlock-event", notice.event.as_str())
                .header("x-airlock-delivery", &id)
                .header("x-airlock-timestamp", timestamp)
                .header("x-airlock-signature", sig)
                .body(body.clone());
            async move { send(req).await.map(|_| ()) }
        })
        .await;
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn signature_is_hmac_of_timestamp_dot_body() {
        // echo -n '1700000000.{"a":1}' | openssl dgst -sha256 -hmac key
        assert_eq!(
            super::signature(b"key", "1700000000", br#"{"a":1}"#),
            "sha256=a438e398bfafc57e4396bb7fc2304422f0f768e965d073ca313cb52e22e6ad03"
        );
    }
}
