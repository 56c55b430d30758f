//! The change feed: every record appended to the audit trail, in order, to everyone in this
//! replica who listens (gRPC watchers, web event streams, agent streams, notifications).
//!
//! The table is the truth. The feed task publishes what this replica's writer committed at
//! once, and reads the table for everything else: after a PostgreSQL notification (which
//! carries only a sequence number), after a lost connection, and on a slow timer (SQLite: other
//! processes on the same file). Each [`Subscription`] checks that sequence numbers follow each
//! other; when it fell behind (a full buffer) or sees a gap, it reads what it missed from the
//! table. Nothing is dropped silently.

use std::{
    collections::VecDeque,
    sync::{
        atomic::{AtomicI64, Ordering},
        Arc, Weak,
    },
    time::Duration,
};

use airlock_proto::v1::HeldRequest;
use tokio::sync::{broadcast, mpsc, Notify};

use super::{Inner, Store, StoreError};

/// Changes a lagging subscriber reads from the table at a time.
const PAGE: i64 = 500;

/// One audit record, as the feed carries it.
#[derive(Debug, Clone, PartialEq)]
pub struct Change {
    /// Position in the audit trail.
    pub seq: i64,
    /// When (Unix ms).
    pub at_ms: i64,
    /// Who (an approver, an agent's host id, `server`).
    pub actor: String,
    /// What: `request.received`, `request.vote.approve`, `request.vote.deny`,
    /// `request.approved.grant`, `request.cancelled`, `request.expired`, `request.outcome`,
    /// `grant.*`, `token.*`, `policy.*`, `login`...
    pub action: String,
    /// The request concerned ("" for none).
    pub request_id: String,
    /// The record's details (JSON).
    pub payload: String,
    /// The request: as the change left it when this replica made the change, else as it is
    /// when the feed read it (which may be later).
    pub held: Option<HeldRequest>,
    /// The web UI's event for it, made once for every open event stream.
    pub(crate) web: std::sync::OnceLock<Option<String>>,
}

/// Whether a change can alter who a bearer token stands for (so caches of tokens must go).
pub fn touches_credentials(action: &str) -> bool {
    action.starts_with("token.") || action == "agent.enrolled"
}

impl Change {
    /// The web UI's live event for a change to a request (`{"id", "state", "action"}`), the
    /// same text for every open event stream; `None` for other changes.
    pub fn web_event(&self) -> Option<&str> {
        self.web
            .get_or_init(|| {
                let held = self
                    .held
                    .as_ref()
                    .filter(|_| self.action.starts_with("request."))?;
                let id = held.request.as_ref().map_or("", |r| r.request_id.as_str());
                let data = serde_json::json!({
                    "id": id,
                    "state": crate::types::state_name(held.state()),
                    "action": self.action,
                });
                Some(data.to_string())
            })
            .as_deref()
    }

    /// Whether this change decided its request (approved, denied or cancelled it), so that the
    /// agent must be told. Expiry is not: the agent applies its own deadline.
    pub fn decides(&self) -> bool {
        use airlock_proto::v1::RequestState as S;
        let decided = self
            .held
            .as_ref()
            .is_some_and(|h| matches!(h.state(), S::Approved | S::Denied | S::Cancelled));
        decided
            && (self.action.starts_with("request.vote.")
                || self.action == "request.approved.grant"
                || self.action == "request.cancelled")
    }
}

/// The feed of one store.
pub(crate) struct Feed {
    pub(crate) sender: broadcast::Sender<Arc<Change>>,
    /// The last sequence number published.
    pub(crate) cursor: AtomicI64,
    /// The same, for those who only need to know that something happened.
    pub(crate) head: tokio::sync::watch::Sender<i64>,
    /// Wakes the feed task to read the table.
    pub(crate) wake: Notify,
    /// Counts changes to credentials seen by this replica, its own as soon as they commit.
    pub(crate) credentials: Arc<std::sync::atomic::AtomicU64>,
}

impl Feed {
    pub(crate) fn new() -> Self {
        Self {
            sender: broadcast::channel(4096).0,
            cursor: AtomicI64::new(0),
            head: tokio::sync::watch::channel(0).0,
            wake: Notify::new(),
            credentials: Arc::default(),
        }
    }

    fn publish(&self, c: Change) {
        if touches_credentials(&c.action) {
            self.credentials.fetch_add(1, Ordering::SeqCst);
        }
        self.cursor.store(c.seq, Ordering::SeqCst);
        self.head.send_replace(c.seq);
        let _ = self.sender.send(Arc::new(c));
    }
}

/// Reads the table after the cursor until it is all published.
async fn catch_up(inner: &Arc<Inner>) -> Result<(), StoreError> {
    let store = Store {
        inner: inner.clone(),
    };
    loop {
        let after = inner.feed.cursor.load(Ordering::SeqCst);
        let page = store.changes_after(after, PAGE).await?;
        let full = page.len() as i64 == PAGE;
        for c in page {
            if c.seq == inner.feed.cursor.load(Ordering::SeqCst) + 1 {
                inner.feed.publish(c);
            }
        }
        if !full {
            return Ok(());
        }
    }
}

/// The feed task: publishes local commits at once, and reads the table when woken or every
/// `poll`.
pub(crate) async fn run(
    inner: Weak<Inner>,
    mut local: mpsc::UnboundedReceiver<Vec<Change>>,
    poll: Duration,
) {
    let mut tick = tokio::time::interval(poll);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let Some(strong) = inner.upgrade() else {
            return;
        };
        let mut read_table = false;
        tokio::select! {
            batch = local.recv() => {
                let Some(batch) = batch else { return };
                for c in batch {
                    let next = strong.feed.cursor.load(Ordering::SeqCst) + 1;
                    if c.seq == next {
                        strong.feed.publish(c);
                    } else if c.seq > next {
                        // Another writer came in between: the table has both, in order.
                        read_table = true;
                        break;
                    }
                }
            }
            _ = strong.feed.wake.notified() => read_table = true,
            _ = tick.tick() => read_table = true,
        }
        if read_table {
            if let Err(e) = catch_up(&strong).await {
                tracing::warn!(error = %e, "reading the change feed failed; trying again");
                drop(strong);
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
}

/// Every change from the moment of subscribing, in order, none missed.
pub struct Subscription {
    rx: broadcast::Receiver<Arc<Change>>,
    last: i64,
    backlog: VecDeque<Arc<Change>>,
    inner: Weak<Inner>,
}

impl Subscription {
    pub(crate) fn new(inner: &Arc<Inner>) -> Self {
        // Subscribe first, then read the cursor: what arrives in between is skipped by number.
        let rx = inner.feed.sender.subscribe();
        Self {
            rx,
            last: inner.feed.cursor.load(Ordering::SeqCst),
            backlog: VecDeque::new(),
            inner: Arc::downgrade(inner),
        }
    }

    /// The sequence number of the last change handed out (or of the feed when subscribing).
    pub fn position(&self) -> i64 {
        self.last
    }

    /// The next change; `None` once the store is closed. A subscriber that fell behind reads
    /// what it missed from the table (trying again while the database is unavailable).
    pub async fn next(&mut self) -> Option<Arc<Change>> {
        loop {
            if let Some(c) = self.backlog.pop_front() {
                if c.seq > self.last {
                    self.last = c.seq;
                    return Some(c);
                }
                continue;
            }
            match self.rx.recv().await {
                Ok(c) if c.seq <= self.last => continue,
                Ok(c) if c.seq == self.last + 1 => {
                    self.last = c.seq;
                    return Some(c);
                }
                Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => self.catch_up().await?,
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    }

    /// Reads the next page after `last` from the table.
    async fn catch_up(&mut self) -> Option<()> {
        loop {
            let inner = self.inner.upgrade()?;
            let store = Store { inner };
            match store.changes_after(self.last, PAGE).await {
                Ok(page) => {
                    self.backlog.extend(page.into_iter().map(Arc::new));
                    return Some(());
                }
                Err(e) => {
                    tracing::warn!(error = %e, "catching up on the change feed failed; trying again");
                    drop(store);
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
    }
}
