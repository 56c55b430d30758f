//! Agents ever seen: their hello, when, and which replica holds their stream. A replica touches
//! the agents it serves every [`HEARTBEAT_MS`]; an agent whose replica stopped touching it
//! (stopped, or killed) counts as disconnected after [`STALE_MS`].

use std::collections::BTreeMap;

use airlock_proto::v1::Hello;
use prost::Message;

use super::{sql::args, Store, StoreError};
use crate::types::now_ms;

/// How often a replica marks its agents as still connected.
pub const HEARTBEAT_MS: i64 = 10_000;

/// After this long without a mark, an agent counts as disconnected.
pub const STALE_MS: i64 = 3 * HEARTBEAT_MS;

/// A known agent.
#[derive(Debug, Clone, PartialEq)]
pub struct KnownAgent {
    /// Its last hello.
    pub hello: Hello,
    /// First seen, Unix ms.
    pub first_seen_ms: i64,
    /// Last seen, Unix ms.
    pub last_seen_ms: i64,
    /// Whether a replica holds its stream now.
    pub connected: bool,
}

fn sorted(labels: &std::collections::HashMap<String, String>) -> BTreeMap<&str, &str> {
    labels
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect()
}

impl Store {
    /// Records that agent `hello` connected to this replica (`connected`), or left it. A
    /// connection whose labels differ from the host's last ones is audited
    /// (`agent.labels_changed`).
    pub async fn agent_seen(&self, hello: &Hello, connected: bool) -> Result<(), StoreError> {
        let (hello, replica) = (hello.clone(), self.replica().to_owned());
        self.write(move |tx| {
            let (hello, replica) = (hello.clone(), replica.clone());
            Box::pin(async move {
                let now = now_ms();
                if connected {
                    // Labels route requests to approval rules (`hosts = { env = "prod" }`): a
                    // change is recorded in the audit trail with what it was and what it is.
                    let before = tx
                        .row("SELECT body FROM agents WHERE host_id = $1", args![&hello.host_id])
                        .await?
                        .map(|r| r.message::<Hello>(0))
                        .transpose()?;
                    if let Some(before) = before {
                        let (old, new) = (sorted(&before.labels), sorted(&hello.labels));
                        if old != new {
                            let payload = serde_json::json!({"before": old, "after": new});
                            tx.audit(
                                &hello.host_id,
                                "agent.labels_changed",
                                "",
                                &payload.to_string(),
                                None,
                            )
                            .await?;
                        }
                    }
                    tx.exec(
                        "INSERT INTO agents (host_id, body, first_seen_ms, last_seen_ms, replica, connected)
                         VALUES ($1, $2, $3, $3, $4, 1)
                         ON CONFLICT (host_id) DO UPDATE SET body = $2, last_seen_ms = $3,
                         replica = $4, connected = 1",
                        args![&hello.host_id, hello.encode_to_vec(), now, &replica],
                    )
                    .await?;
                } else {
                    tx.exec(
                        "UPDATE agents SET last_seen_ms = $2, connected = 0
                         WHERE host_id = $1 AND replica = $3",
                        args![&hello.host_id, now, &replica],
                    )
                    .await?;
                }
                Ok(())
            })
        })
        .await
    }

    /// Marks every agent connected to this replica as still there.
    pub async fn touch_agents(&self) -> Result<(), StoreError> {
        let replica = self.replica().to_owned();
        self.write(move |tx| {
            let replica = replica.clone();
            Box::pin(async move {
                tx.exec(
                    "UPDATE agents SET last_seen_ms = $2 WHERE replica = $1 AND connected = 1",
                    args![&replica, now_ms()],
                )
                .await?;
                Ok(())
            })
        })
        .await
    }

    /// Every agent ever seen, by host id.
    pub async fn agents(&self) -> Result<Vec<KnownAgent>, StoreError> {
        self.read(|tx| {
            Box::pin(async move {
                let fresh = now_ms() - STALE_MS;
                tx.rows(
                    "SELECT body, first_seen_ms, last_seen_ms, connected FROM agents ORDER BY host_id",
                    &[],
                )
                .await?
                .iter()
                .map(|r| {
                    let last_seen_ms = r.int(2)?;
                    Ok(KnownAgent {
                        hello: r.message(0)?,
                        first_seen_ms: r.int(1)?,
                        last_seen_ms,
                        connected: r.int(3)? == 1 && last_seen_ms > fresh,
                    })
                })
                .collect()
            })
        })
        .await
    }
}
