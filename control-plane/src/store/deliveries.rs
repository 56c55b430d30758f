//! What the notification channels keep: the delivery log (one row per attempt), the Slack
//! message posted for each request (so that later events update it), and each channel's
//! cursor in the change feed with the lease of the replica that delivers for it.
//!
//! A channel is delivered by one replica at a time: the one holding its lease. Claiming and
//! renewing run under the writer's lock (the equivalent of `FOR UPDATE SKIP LOCKED` on the
//! channel's row), so two replicas never hold one lease; when a replica stops renewing
//! (stopped or killed), another takes the channel over from its cursor once the lease runs out.

use super::{sql::args, Store, StoreError};
use crate::types::now_ms;

/// How long delivery log rows and Slack message references are kept.
pub const KEEP_MS: i64 = 30 * 24 * 3600 * 1000;

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

impl Store {
    /// Writes one attempt to the delivery log (and forgets rows older than [`KEEP_MS`]).
    pub async fn log_delivery(&self, d: &Delivery) -> Result<(), StoreError> {
        let d = d.clone();
        self.write(move |tx| {
            let d = d.clone();
            Box::pin(async move {
                tx.exec(
                    "INSERT INTO deliveries (id, channel, event, request_id, attempt, ok, status, error, at_ms)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
                     ON CONFLICT (id, attempt) DO UPDATE SET ok = $6, status = $7, error = $8, at_ms = $9",
                    args![
                        &d.id,
                        &d.channel,
                        &d.event,
                        &d.request_id,
                        d.attempt,
                        d.ok,
                        d.status.map(i64::from),
                        &d.error,
                        d.at_ms
                    ],
                )
                .await?;
                tx.exec(
                    "DELETE FROM deliveries WHERE at_ms < $1",
                    args![d.at_ms - KEEP_MS],
                )
                .await?;
                Ok(())
            })
        })
        .await
    }

    /// The delivery log, newest attempt first, at most `limit` rows.
    pub async fn deliveries(&self, limit: u32) -> Result<Vec<Delivery>, StoreError> {
        self.read(move |tx| {
            Box::pin(async move {
                tx.rows(
                    "SELECT id, channel, event, request_id, attempt, ok, status, error, at_ms
                     FROM deliveries ORDER BY at_ms DESC, id, attempt DESC LIMIT $1",
                    args![limit],
                )
                .await?
                .iter()
                .map(|r| {
                    Ok(Delivery {
                        id: r.text(0)?,
                        channel: r.text(1)?,
                        event: r.text(2)?,
                        request_id: r.text(3)?,
                        attempt: u32::try_from(r.int(4)?).unwrap_or(0),
                        ok: r.int(5)? != 0,
                        status: r.opt_int(6)?.and_then(|s| u16::try_from(s).ok()),
                        error: r.text(7)?,
                        at_ms: r.int(8)?,
                    })
                })
                .collect()
            })
        })
        .await
    }

    /// Remembers the Slack message (`channel`, `ts`) posted for `request_id`.
    pub async fn save_slack_message(
        &self,
        request_id: &str,
        channel: &str,
        ts: &str,
    ) -> Result<(), StoreError> {
        let a = (request_id.to_owned(), channel.to_owned(), ts.to_owned());
        self.write(move |tx| {
            let (id, channel, ts) = a.clone();
            Box::pin(async move {
                let now = now_ms();
                tx.exec(
                    "INSERT INTO slack_messages (request_id, channel, ts, posted_ms)
                     VALUES ($1, $2, $3, $4)
                     ON CONFLICT (request_id) DO UPDATE SET channel = $2, ts = $3, posted_ms = $4",
                    args![&id, &channel, &ts, now],
                )
                .await?;
                tx.exec(
                    "DELETE FROM slack_messages WHERE posted_ms < $1",
                    args![now - KEEP_MS],
                )
                .await?;
                Ok(())
            })
        })
        .await
    }

    /// The Slack message posted for `request_id`: channel and timestamp.
    pub async fn slack_message(
        &self,
        request_id: &str,
    ) -> Result<Option<(String, String)>, StoreError> {
        let id = request_id.to_owned();
        self.read(move |tx| {
            let id = id.clone();
            Box::pin(async move {
                tx.row(
                    "SELECT channel, ts FROM slack_messages WHERE request_id = $1",
                    args![&id],
                )
                .await?
                .map(|r| Ok((r.text(0)?, r.text(1)?)))
                .transpose()
            })
        })
        .await
    }

    /// Starts keeping a cursor for notification channel `name`, at the feed's current end,
    /// unless it has one: events from now on are delivered on it, none before.
    pub async fn register_channel(&self, name: &str) -> Result<(), StoreError> {
        let name = name.to_owned();
        self.write(move |tx| {
            let name = name.clone();
            Box::pin(async move {
                let head = tx.head.as_ref().map_or(0, |h| h.0);
                tx.exec(
                    "INSERT INTO notify_channels (name, cursor_seq) VALUES ($1, $2)
                     ON CONFLICT (name) DO NOTHING",
                    args![&name, head],
                )
                .await?;
                Ok(())
            })
        })
        .await
    }

    /// Takes (or renews) the lease of notification channel `name` for `lease_ms`, if it is free
    /// or already this replica's; returns the channel's cursor then. A channel seen for the
    /// first time starts at the feed's current end: what came before it was configured is not
    /// sent.
    pub async fn claim_channel(
        &self,
        name: &str,
        lease_ms: i64,
    ) -> Result<Option<i64>, StoreError> {
        let (name, me) = (name.to_owned(), self.replica().to_owned());
        self.write(move |tx| {
            let (name, me) = (name.clone(), me.clone());
            Box::pin(async move {
                let head = tx.head.as_ref().map_or(0, |h| h.0);
                tx.exec(
                    "INSERT INTO notify_channels (name, cursor_seq) VALUES ($1, $2)
                     ON CONFLICT (name) DO NOTHING",
                    args![&name, head],
                )
                .await?;
                let now = now_ms();
                let n = tx
                    .exec(
                        "UPDATE notify_channels SET owner = $2, lease_until_ms = $3
                         WHERE name = $1 AND (owner = $2 OR lease_until_ms < $4)",
                        args![&name, &me, now + lease_ms, now],
                    )
                    .await?;
                if n == 0 {
                    return Ok(None);
                }
                tx.row(
                    "SELECT cursor_seq FROM notify_channels WHERE name = $1",
                    args![&name],
                )
                .await?
                .map(|r| r.int(0))
                .transpose()
            })
        })
        .await
    }

    /// Moves channel `name`'s cursor to `seq`, if this replica still holds its lease.
    pub async fn advance_channel(&self, name: &str, seq: i64) -> Result<bool, StoreError> {
        let (name, me) = (name.to_owned(), self.replica().to_owned());
        self.write(move |tx| {
            let (name, me) = (name.clone(), me.clone());
            Box::pin(async move {
                Ok(tx
                    .exec(
                        "UPDATE notify_channels SET cursor_seq = $3
                         WHERE name = $1 AND owner = $2 AND lease_until_ms >= $4",
                        args![&name, &me, seq, now_ms()],
                    )
                    .await?
                    == 1)
            })
        })
        .await
    }

    /// Gives up channel `name`'s lease (at shutdown), so another replica takes it at once.
    pub async fn release_channel(&self, name: &str) -> Result<(), StoreError> {
        let (name, me) = (name.to_owned(), self.replica().to_owned());
        self.write(move |tx| {
            let (name, me) = (name.clone(), me.clone());
            Box::pin(async move {
                tx.exec(
                    "UPDATE notify_channels SET owner = '', lease_until_ms = 0
                     WHERE name = $1 AND owner = $2",
                    args![&name, &me],
                )
                .await?;
                Ok(())
            })
        })
        .await
    }
}
