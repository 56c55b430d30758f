//! The HTTP side of a replica that is not the UI: `/healthz` (the process answers), `/readyz`
//! (its database answers) and Prometheus `/metrics`.

use std::sync::Arc;

use axum::{extract::State, http::StatusCode, response::IntoResponse, routing::get, Router};

use crate::{api::agents::Agents, metrics::Metrics, store::Store};

#[derive(Clone)]
struct Http {
    store: Store,
    agents: Arc<Agents>,
    metrics: Arc<Metrics>,
}

/// The routes.
pub fn router(store: Store, agents: Arc<Agents>, metrics: Arc<Metrics>) -> Router {
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
    match h.store.ping().await {
        Ok(()) => (StatusCode::OK, "ready\n"),
        Err(e) => {
            // The probe answers whoever reaches the port: the detail (file path, database
            // error) goes to the log only.
            tracing::error!(error = %e, "readiness check failed: the database is not usable");
            (StatusCode::SERVICE_UNAVAILABLE, "database not usable\n")
        }
    }
}

async fn metrics_text(State(h): State<Http>) -> impl IntoResponse {
    if let Ok(n) = h.store.count_pending().await {
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
