//! Held requests and their lifecycle (pending, then approved, denied or expired), with a change
//! feed for watchers.
//!
//! This first store keeps requests in memory; the persistent backends (SQLite, PostgreSQL) sit
//! behind the same methods.

use std::{
    collections::HashMap,
    sync::Mutex,
    time::{SystemTime, UNIX_EPOCH},
};

use airlock_proto::v1::{
    ActionRequest, HeldRequest, ListRequestsRequest, Outcome, RequestState, Verdict,
};
use tokio::sync::broadcast;

/// Why a store operation was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StoreError {
    /// No request has this id.
    #[error("no request with id {0:?}")]
    NotFound(String),
    /// The request was already decided or expired.
    #[error("request {id:?} is no longer pending (it is {state})")]
    NotPending {
        /// The request.
        id: String,
        /// Its state.
        state: &'static str,
    },
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// Human name of a state.
pub fn state_name(s: RequestState) -> &'static str {
    match s {
        RequestState::Pending => "pending",
        RequestState::Approved => "approved",
        RequestState::Denied => "denied",
        RequestState::Expired => "expired",
        RequestState::Unspecified => "unknown",
    }
}

#[derive(Default)]
struct Inner {
    by_id: HashMap<String, HeldRequest>,
    /// Ids in arrival order.
    order: Vec<String>,
}

/// The request store.
pub struct Store {
    inner: Mutex<Inner>,
    changes: broadcast::Sender<HeldRequest>,
}

impl Default for Store {
    fn default() -> Self {
        Self::new()
    }
}

impl Store {
    /// An empty store.
    pub fn new() -> Self {
        Self {
            inner: Mutex::default(),
            changes: broadcast::channel(1024).0,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Every change from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<HeldRequest> {
        self.changes.subscribe()
    }

    /// Records a request from agent `host_id`. A request with a known id is the same request
    /// (resent after a reconnect): the stored one is returned and nothing changes.
    pub fn receive(
        &self,
        host_id: &str,
        hostname: &str,
        req: ActionRequest,
    ) -> (HeldRequest, bool) {
        let mut inner = self.lock();
        if let Some(existing) = inner.by_id.get(&req.request_id) {
            return (existing.clone(), false);
        }
        let held = HeldRequest {
            request: Some(req.clone()),
            host_id: host_id.to_owned(),
            hostname: hostname.to_owned(),
            state: RequestState::Pending as i32,
            received_unix_ms: now_ms(),
            ..Default::default()
        };
        inner.order.push(req.request_id.clone());
        inner.by_id.insert(req.request_id, held.clone());
        drop(inner);
        let _ = self.changes.send(held.clone());
        (held, true)
    }

    /// Decides a pending request.
    pub fn decide(
        &self,
        id: &str,
        verdict: Verdict,
        by: &str,
        reason: &str,
    ) -> Result<HeldRequest, StoreError> {
        let mut inner = self.lock();
        let held = inner
            .by_id
            .get_mut(id)
            .ok_or_else(|| StoreError::NotFound(id.to_owned()))?;
        if held.state() != RequestState::Pending {
            return Err(StoreError::NotPending {
                id: id.to_owned(),
                state: state_name(held.state()),
            });
        }
        held.state = match verdict {
            Verdict::Allow => RequestState::Approved,
            _ => RequestState::Denied,
        } as i32;
        held.decided_by = by.to_owned();
        held.reason = reason.to_owned();
        held.decided_unix_ms = now_ms();
        let held = held.clone();
        drop(inner);
        let _ = self.changes.send(held.clone());
        Ok(held)
    }

    /// Marks pending requests whose deadline has passed as expired (the agent applies the
    /// on-timeout action itself); returns them.
    pub fn expire_due(&self, now: i64) -> Vec<HeldRequest> {
        let mut inner = self.lock();
        let mut expired = Vec::new();
        for held in inner.by_id.values_mut() {
            let deadline = held
                .request
                .as_ref()
                .map_or(i64::MAX, |r| r.deadline_unix_ms);
            if held.state() == RequestState::Pending && deadline <= now {
                held.state = RequestState::Expired as i32;
                held.decided_unix_ms = now;
                expired.push(held.clone());
            }
        }
        drop(inner);
        for h in &expired {
            let _ = self.changes.send(h.clone());
        }
        expired
    }

    /// Appends an outcome the agent reported.
    pub fn record_outcome(&self, outcome: Outcome) -> Result<(), StoreError> {
        let mut inner = self.lock();
        let held = inner
            .by_id
            .get_mut(&outcome.request_id)
            .ok_or_else(|| StoreError::NotFound(outcome.request_id.clone()))?;
        held.outcomes.push(outcome);
        let held = held.clone();
        drop(inner);
        let _ = self.changes.send(held);
        Ok(())
    }

    /// One request.
    pub fn get(&self, id: &str) -> Result<HeldRequest, StoreError> {
        self.lock()
            .by_id
            .get(id)
            .cloned()
            .ok_or_else(|| StoreError::NotFound(id.to_owned()))
    }

    /// Requests, newest first.
    pub fn list(&self, q: &ListRequestsRequest) -> Vec<HeldRequest> {
        let inner = self.lock();
        let limit = if q.limit == 0 { 100 } else { q.limit as usize };
        inner
            .order
            .iter()
            .rev()
            .filter_map(|id| inner.by_id.get(id))
            .filter(|h| q.state == RequestState::Unspecified as i32 || h.state == q.state)
            .take(limit)
            .cloned()
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(id: &str, deadline: i64) -> ActionRequest {
        ActionRequest {
            request_id: id.into(),
            deadline_unix_ms: deadline,
            ..Default::default()
        }
    }

    #[test]
    fn resent_request_is_the_same_request() {
        let s = Store::new();
        let (_, new) = s.receive("h", "host", req("a", i64::MAX));
        assert!(new);
        let (again, new) = s.receive("h", "host", req("a", i64::MAX));
        assert!(!new);
        assert_eq!(again.request.unwrap().request_id, "a");
        assert_eq!(s.list(&ListRequestsRequest::default()).len(), 1);
    }

    #[test]
    fn decided_once_only() {
        let s = Store::new();
        s.receive("h", "host", req("a", i64::MAX));
        s.decide("a", Verdict::Allow, "alice", "ok").unwrap();
        let err = s.decide("a", Verdict::Deny, "bob", "no").unwrap_err();
        assert_eq!(
            err,
            StoreError::NotPending {
                id: "a".into(),
                state: "approved"
            }
        );
        assert_eq!(
            s.decide("zz", Verdict::Allow, "a", "").unwrap_err(),
            StoreError::NotFound("zz".into())
        );
    }

    #[test]
    fn expiry_only_touches_pending_past_deadline() {
        let s = Store::new();
        s.receive("h", "host", req("old", 10));
        s.receive("h", "host", req("new", 1_000));
        s.receive("h", "host", req("done", 10));
        s.decide("done", Verdict::Deny, "a", "r").unwrap();
        let expired = s.expire_due(500);
        assert_eq!(expired.len(), 1);
        assert_eq!(s.get("old").unwrap().state(), RequestState::Expired);
        assert_eq!(s.get("new").unwrap().state(), RequestState::Pending);
        assert_eq!(s.get("done").unwrap().state(), RequestState::Denied);
    }
}
