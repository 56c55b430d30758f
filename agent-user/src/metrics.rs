//! The agent's Prometheus metrics and health endpoint: kernel counters (holds, passes, drops,
//! refused signals and ptraces), each kernel program's runs and run time, and the decisions the
//! agent applied.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

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

/// Label of a kernel program.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Program {
    /// exec_hold, connect_hold, send_hold, restop, ...
    pub program: String,
}

/// Labels of an applied decision.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Applied {
    /// allow or deny.
    pub verdict: String,
    /// decision, local-rule, timeout, decider-unreachable, no-rule, shutdown.
    pub cause: String,
}

/// Label of a DNS name in a rule's `connect`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DnsName {
    /// The name.
    pub name: String,
}

/// The agent's metrics.
pub struct AgentMetrics {
    registry: Registry,
    /// Failed lookups of the names in `connect` (their last addresses stay watched).
    pub dns_failures: Family<DnsName, Counter>,
    /// Addresses each name stands for now (with the ones not yet expired).
    pub dns_addresses: Family<DnsName, prometheus_client::metrics::gauge::Gauge>,
    kernel: Family<Event, Counter>,
    /// Kernel totals at the previous scrape, to turn them into counter increments.
    last: Mutex<Vec<u64>>,
    applied: Family<Applied, Counter>,
    hold_seconds: Histogram,
    program_runs: Family<Program, Counter>,
    program_seconds: Family<Program, Counter<f64, std::sync::atomic::AtomicU64>>,
    /// Program totals at the previous scrape.
    last_programs: Mutex<HashMap<String, (u64, Duration)>>,
}

impl Default for AgentMetrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("airlock_agent");
        let dns_failures = Family::<DnsName, Counter>::default();
        let dns_addresses = Family::<DnsName, prometheus_client::metrics::gauge::Gauge>::default();
        registry.register(
            "dns_failures",
            "Failed lookups of a name in a connect rule; its last addresses stay watched",
            dns_failures.clone(),
        );
        registry.register(
            "dns_addresses",
            "Addresses a name in a connect rule stands for now",
            dns_addresses.clone(),
        );
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
        let program_runs = Family::<Program, Counter>::default();
        let program_seconds =
            Family::<Program, Counter<f64, std::sync::atomic::AtomicU64>>::default();
        registry.register(
            "program_runs",
            "Times each kernel program ran (kernel.bpf_stats_enabled, kept on by the agent)",
            program_runs.clone(),
        );
        registry.register(
            "program_run_seconds",
            "Time spent in each kernel program",
            program_seconds.clone(),
        );
        Self {
            registry,
            dns_failures,
            dns_addresses,
            kernel,
            last: Mutex::new(vec![0; COUNTER_NAMES.len()]),
            applied,
            hold_seconds,
            program_runs,
            program_seconds,
            last_programs: Mutex::default(),
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

    /// Folds each kernel program's current run count and run time into the counters.
    pub fn update_programs(&self, stats: &[(String, u64, Duration)]) {
        let mut last = self.last_programs.lock().unwrap_or_else(|p| p.into_inner());
        for (name, runs, time) in stats {
            let (runs_before, time_before) = last.get(name).copied().unwrap_or_default();
            let label = Program {
                program: name.clone(),
            };
            self.program_runs
                .get_or_create(&label)
                .inc_by(runs.saturating_sub(runs_before));
            self.program_seconds
                .get_or_create(&label)
                .inc_by(time.saturating_sub(time_before).as_secs_f64());
            last.insert(name.clone(), (*runs, *time));
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
    h.metrics.update_programs(&h.kernel.program_stats());
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

    #[test]
    fn dns_failures_and_addresses_are_exported() {
        let m = AgentMetrics::default();
        let name = DnsName {
            name: "orders-db.test".into(),
        };
        m.dns_failures.get_or_create(&name).inc();
        m.dns_addresses.get_or_create(&name).set(2);
        let text = m.render().expect("render");
        assert!(
            text.contains("airlock_agent_dns_failures_total{name=\"orders-db.test\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("airlock_agent_dns_addresses{name=\"orders-db.test\"} 2"),
            "{text}"
        );
    }

    #[test]
    fn program_totals_become_counters() {
        let m = AgentMetrics::default();
        m.update_programs(&[("exec_hold".into(), 10, Duration::from_micros(5))]);
        m.update_programs(&[("exec_hold".into(), 30, Duration::from_micros(9))]);
        let text = m.render().unwrap();
        assert!(
            text.contains("airlock_agent_program_runs_total{program=\"exec_hold\"} 30"),
            "{text}"
        );
        assert!(
            text.contains(
                "airlock_agent_program_run_seconds_total{program=\"exec_hold\"} 0.000009"
            ),
            "{text}"
        );
    }
}
