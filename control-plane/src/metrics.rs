//! The HTTP side of `airlock-server`: health, readiness and Prometheus metrics.

use std::sync::Arc;

use axum::{extract::State, http::StatusCode, response::IntoResponse, routing::get, Router};
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

use crate::{agents::Agents, store::Store};

/// Label of the decisions counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    /// approved, denied, expired, cancelled, approved_by_grant.
    pub result: String,
}

/// Label of the notification failures counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ChannelLabel {
    /// slack, teams, or webhook:NAME.
    pub channel: String,
}

/// The control plane's metrics.
pub struct Metrics {
    registry: Registry,
    /// Requests received from agents (new ones, not resends).
    pub requests: Counter,
    /// Requests decided, by result.
    pub decisions: Family<ResultLabel, Counter>,
    /// Seconds from a request's arrival to its decision by people.
    pub decision_latency: Histogram,
    /// Notification deliveries that failed (each failed attempt), by channel.
    pub notification_failures: Family<ChannelLabel, Counter>,
    pending: Gauge,
    agents: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("airlock");
        let requests = Counter::default();
        let decisions = Family::<ResultLabel, Counter>::default();
        let decision_latency =
            Histogram::new([0.5, 1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 900.0, 3600.0]);
        let pending = Gauge::default();
        let agents = Gauge::default();
        let notification_failures = Family::<ChannelLabel, Counter>::default();
        registry.register(
            "notification_failures",
            "Failed notification attempts, by channel",
            notification_failures.clone(),
        );
        registry.register(
            "requests",
            "Held actions received from agents",
            requests.clone(),
        );
        registry.register(
            "decisions",
            "Requests decided, by result",
            decisions.clone(),
        );
        registry.register(
            "decision_latency_seconds",
            "Time from a request's arrival to its decision by approvers",
            decision_latency.clone(),
        );
        registry.register(
            "pending_requests",
            "Requests waiting for a decision",
            pending.clone(),
        );
        registry.register(
            "connected_agents",
            "Agents with a live stream",
            agents.clone(),
        );
        Self {
            registry,
            requests,
            decisions,
            decision_latency,
            notification_failures,
            pending,
            agents,
        }
    }
}

impl Metrics {
    /// Counts one failed notification attempt on `channel`.
    pub fn notification_failed(&self, channel: &str) {
        self.notification_failures
            .get_or_create(&ChannelLabel {
                channel: channel.to_owned(),
            })
            .inc();
    }

    /// Counts one decision.
    pub fn decided(&self, result: &str) {
        self.decisions
            .get_or_create(&ResultLabel {
                result: result.to_owned(),
            })
            .inc();
    }
}

#[derive(Clone)]
struct Http {
    store: Arc<Store>,
    agents: Arc<Agents>,
    metrics: Arc<Metrics>,
}

/// The HTTP routes.
pub fn router(store: Arc<Store>, agents: Arc<Agents>, metrics: Arc<Metrics>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .route("/metrics", get(metrics_text))
        .with_state(Http {
            store,
            agents,
            metrics,
        })
}

async fn ready(State(h): State<Http>) -> impl IntoResponse {
    match h.store.count_pending() {
        Ok(_) => (StatusCode::OK, "ready\n"),
        Err(e) => {
            // The probe answers whoever reaches the port: the detail (file path, database
            // error) goes to the log only.
            tracing::error!(error = %e, "readiness check failed: the database is not usable");
            (StatusCode::SERVICE_UNAVAILABLE, "database not usable\n")
        }
    }
}

async fn metrics_text(State(h): State<Http>) -> impl IntoResponse {
    if let Ok(n) = h.store.count_pending() {
        h.metrics.pending.set(n);
    }
    h.metrics.agents.set(h.agents.connected().len() as i64);
    let mut out = String::new();
    match prometheus_client::encoding::text::encode(&mut out, &h.metrics.registry) {
        Ok(()) => (
            StatusCode::OK,
            [(
                axum::http::header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            out,
        )
            .into_response(),
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}
