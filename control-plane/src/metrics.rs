//! The control plane's Prometheus metrics (served on `/metrics` by [`crate::web::health`]).

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

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
    /// Requests received from agents (new ones, not resends).
    pub requests: Counter,
    /// Requests decided, by result.
    pub decisions: Family<ResultLabel, Counter>,
    /// Seconds from a request's arrival to its decision by people.
    pub decision_latency: Histogram,
    /// Notification deliveries that failed (each failed attempt), by channel.
    pub notification_failures: Family<ChannelLabel, Counter>,
    /// Requests refused for a limit (`[limits]`), denied at once.
    pub refused: Counter,
    /// Pending requests (set when scraped).
    pub pending: Gauge,
    /// Agents connected to this replica (set when scraped).
    pub agents: Gauge,
    /// The registry, for the text exposition.
    pub registry: Registry,
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
        let refused = Counter::default();
        registry.register(
            "requests_refused",
            "Requests refused for a limit and denied at once",
            refused.clone(),
        );
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
        // Every result at zero from the start, so a dashboard's rate() sees the first of each.
        for result in [
            "approved",
            "denied",
            "expired",
            "cancelled",
            "approved_by_grant",
        ] {
            drop(decisions.get_or_create(&ResultLabel {
                result: result.into(),
            }));
        }
        Self {
            requests,
            decisions,
            decision_latency,
            notification_failures,
            refused,
            pending,
            agents,
            registry,
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
