//! The agent's Prometheus metrics and health endpoint: kernel counters (holds, passes, drops,
//! refused signals and ptraces) and the decisions the agent applied.

use std::sync::{Arc, Mutex};

use axum::{extract::State, http::StatusCode, response::IntoResponse, routing::get, Router};
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, histogram::Histogram},
    registry::Registry,
};

use crate::bpf::{Kernel, COUNTER_NAMES};

/// Label of a kernel counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Event {
    /// hold_exec, hold_connect, pass, drop_ring_full, drop_no_agent, ...
    pub event: String,
}

/// Labels of an applied decision.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Applied {
    /// allow or deny.
    pub verdict: String,
    /// decision, local-rule, timeout, decider-unreachable, no-rule, shutdown.
    pub cause: String,
}

/// The agent's metrics.
pub struct AgentMetrics {
    registry: Registry,
    kernel: Family<Event, Counter>,
    /// Kernel totals at the previous scrape, to turn them into counter increments.
    last: Mutex<Vec<u64>>,
    applied: Family<Applied, Counter>,
    hold_seconds: Histogram,
}

impl Default for AgentMetrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("airlock_agent");
        let kernel = Family::<Event, Counter>::default();
        let applied = Family::<Applied, Counter>::default();
        let hold_seconds =
            Histogram::new([0.001, 0.01, 0.1, 0.5, 1.0, 5.0, 30.0, 60.0, 300.0, 3600.0]);
        registry.register(
            "kernel_events",
            "Kernel-side events since the maps were created",
            kernel.clone(),
        );
        registry.register(
            "decisions_applied",
            "Holds released, by verdict and cause",
            applied.clone(),
        );
        registry.register(
            "hold_duration_seconds",
            "Time from the kernel's hold to its release",
            hold_seconds.clone(),
        );
        Self {
            registry,
            kernel,
            last: Mutex::new(vec![0; COUNTER_NAMES.len()]),
            applied,
            hold_seconds,
        }
    }
}

impl AgentMetrics {
    /// Counts a released hold.
    pub fn applied(&self, allow: bool, cause: &str, held_for_secs: f64) {
        self.applied
            .get_or_create(&Applied {
                verdict: if allow { "allow" } else { "deny" }.into(),
                cause: cause.into(),
            })
            .inc();
        self.hold_seconds.observe(held_for_secs);
    }

    /// Folds the kernel's current totals into the counters.
    pub fn update_kernel(&self, totals: &[u64]) {
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        for (i, name) in COUNTER_NAMES.iter().enumerate() {
            let now = totals.get(i).copied().unwrap_or(0);
            let before = last.get(i).copied().unwrap_or(0);
            let counter = self.kernel.get_or_create(&Event {
                event: (*name).into(),
            });
            // Totals only grow while the pinned maps live; a restart of the maps starts over.
            counter.inc_by(now.saturating_sub(before));
            if let Some(slot) = last.get_mut(i) {
                *slot = now;
            }
        }
    }

    /// The text exposition.
    pub fn render(&self) -> Result<String, std::fmt::Error> {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)?;
        Ok(out)
    }
}

#[derive(Clone)]
struct Http {
    kernel: Arc<Kernel>,
    metrics: Arc<AgentMetrics>,
}

/// `/healthz` and `/metrics`.
pub fn router(kernel: Arc<Kernel>, metrics: Arc<AgentMetrics>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/metrics", get(render))
        .with_state(Http { kernel, metrics })
}

async fn render(State(h): State<Http>) -> impl IntoResponse {
    h.metrics.update_kernel(&h.kernel.counters());
    match h.metrics.render() {
        Ok(text) => (StatusCode::OK, text).into_response(),
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_totals_become_counters_and_decisions_are_labelled() {
        let m = AgentMetrics::default();
        let mut totals = vec![0; COUNTER_NAMES.len()];
        totals[0] = 3;
        m.update_kernel(&totals);
        totals[0] = 5;
        totals[4] = 1;
        m.update_kernel(&totals);
        m.applied(false, "timeout", 3.0);
        let text = m.render().unwrap();
        assert!(
            text.contains("airlock_agent_kernel_events_total{event=\"hold_exec\"} 5"),
            "{text}"
        );
        assert!(
            text.contains("airlock_agent_kernel_events_total{event=\"drop_no_agent\"} 1"),
            "{text}"
        );
        assert!(
            text.contains(
                "airlock_agent_decisions_applied_total{verdict=\"deny\",cause=\"timeout\"} 1"
            ),
            "{text}"
        );
        assert!(
            text.contains("airlock_agent_hold_duration_seconds_count 1"),
            "{text}"
        );
    }
}
