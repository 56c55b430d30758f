//! The Airlock control plane: stores held requests, lets approvers decide them, and answers the
//! agents.
//!
//! - [`agents`]: the agents' streams (`AgentService`);
//! - [`accounts`]: local web UI accounts (Argon2id);
//! - [`config`]: the server configuration file (web UI, OIDC, notification channels);
//! - [`approvals`]: approvers and integrations (`ApprovalService`), and who may decide;
//! - [`store`]: requests and their lifecycle, in SQLite;
//! - [`audit`]: the hash-chained audit trail and its verification;
//! - [`auth`]: bearer tokens and their scopes;
//! - [`enroll`]: one-time enrollment tokens and `EnrollmentService`, which trades one for an
//!   agent's credential;
//! - [`decide`]: the one vote path (who may decide what), for every front end;
//! - [`policy`]: approver groups, quorum and routing;
//! - [`control`]: audit queries and export, agents list, policy status;
//! - [`http`]: health, readiness and Prometheus metrics;
//! - [`notify`]: fan-out to Slack, Teams and webhooks, and Slack's buttons;
//! - [`oidc`]: login through an OpenID Connect issuer;
//! - [`web`]: the web UI (queue, request pages, history, audit, agents, policy).

pub mod accounts;
pub mod agents;
pub mod approvals;
pub mod audit;
pub mod auth;
pub mod config;
pub mod control;
pub mod decide;
pub mod enroll;
pub mod http;
pub mod notify;
pub mod oidc;
pub mod policy;
pub mod store;
pub mod web;

use std::{
    path::Path,
    sync::{Arc, Mutex, RwLock},
    time::Duration,
};

use airlock_proto::v1::{
    agent_service_server::AgentServiceServer, agents_service_server::AgentsServiceServer,
    approval_service_server::ApprovalServiceServer, audit_service_server::AuditServiceServer,
    enrollment_service_server::EnrollmentServiceServer, policy_service_server::PolicyServiceServer,
    tokens_service_server::TokensServiceServer, PolicyStatus, FILE_DESCRIPTOR_SET,
};
use tokio::net::TcpListener;

/// The approval policy in force, replaced whole on reload.
pub type SharedPolicy = Arc<RwLock<Arc<policy::Policy>>>;

/// The policy in force now.
pub fn current(p: &SharedPolicy) -> Arc<policy::Policy> {
    p.read().unwrap_or_else(|e| e.into_inner()).clone()
}

/// Everything the services share.
#[derive(Clone)]
pub struct ControlPlane {
    /// Requests.
    pub store: Arc<store::Store>,
    /// Connected agents.
    pub agents: Arc<agents::Agents>,
    /// Approval policy.
    pub policy: SharedPolicy,
    /// What the policy service reports.
    pub policy_status: Arc<Mutex<PolicyStatus>>,
    /// TLS for the listener, if configured.
    pub tls: Option<Tls>,
    /// Prometheus metrics.
    pub metrics: Arc<http::Metrics>,
    /// Set when the server stops, so that long-lived streams (watchers) end and shutdown
    /// does not wait for them.
    pub closing: Arc<tokio::sync::watch::Sender<bool>>,
}

/// TLS settings of the listener.
#[derive(Clone)]
pub struct Tls {
    /// Server certificate chain and key, PEM.
    pub cert_pem: Vec<u8>,
    /// Server key, PEM.
    pub key_pem: Vec<u8>,
    /// CA that signs agent client certificates (mTLS): when set, agent streams must present
    /// a certificate it signed. Approver clients may connect without one.
    pub client_ca_pem: Option<Vec<u8>>,
}

impl ControlPlane {
    /// A control plane on the store `store`.
    pub fn new(store: store::Store) -> Self {
        Self {
            store: Arc::new(store),
            agents: Arc::default(),
            policy: Arc::default(),
            policy_status: Arc::default(),
            tls: None,
            metrics: Arc::default(),
            closing: Arc::new(tokio::sync::watch::channel(false).0),
        }
    }

    /// Serves health, readiness and metrics, and the routes of `extra` (the web UI, Slack's
    /// interactivity endpoint), over HTTP on `listener` until `shutdown`.
    pub async fn serve_http(
        &self,
        listener: TcpListener,
        extra: axum::Router,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let app = http::router(
            self.store.clone(),
            self.agents.clone(),
            self.metrics.clone(),
        )
        .merge(extra);
        axum::serve(listener, app)
            .with_graceful_shutdown(shutdown)
            .await
    }

    /// Loads the policy file `path` and puts it in force; a bad file is refused, recorded
    /// (policy service, audit trail) and the running policy stays.
    pub fn load_policy(&self, path: &Path) -> Result<(), policy::PolicyError> {
        let now = store::now_ms();
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let digest = audit::sha256_hex(text.as_bytes());
        let payload = format!(
            "{{\"path\":{:?},\"sha256\":\"{digest}\"}}",
            path.display().to_string()
        );
        let mut status = self.policy_status.lock().unwrap_or_else(|e| e.into_inner());
        match policy::Policy::load(path) {
            Ok(p) => {
                self.set_policy(p);
                *status = PolicyStatus {
                    source: text,
                    path: path.display().to_string(),
                    loaded_unix_ms: now,
                    last_error: String::new(),
                    last_error_unix_ms: 0,
                };
                if let Err(e) = self.store.audit_event("server", "policy.loaded", &payload) {
                    tracing::error!(error = %e, "auditing the policy load failed");
                }
                Ok(())
            }
            Err(e) => {
                status.last_error = e.to_string();
                status.last_error_unix_ms = now;
                if let Err(e) = self.store.audit_event("server", "policy.refused", &payload) {
                    tracing::error!(error = %e, "auditing the refused policy failed");
                }
                Err(e)
            }
        }
    }

    /// The vote path shared by gRPC, the web UI and Slack.
    pub fn decisions(&self) -> decide::Decisions {
        decide::Decisions {
            store: self.store.clone(),
            agents: self.agents.clone(),
            policy: self.policy.clone(),
            metrics: self.metrics.clone(),
        }
    }

    /// Uses `policy` from now on (new requests are routed by it; group membership is checked
    /// against it).
    pub fn set_policy(&self, policy: policy::Policy) {
        let policy = Arc::new(policy);
        *self.policy.write().unwrap_or_else(|e| e.into_inner()) = policy.clone();
        self.agents.push_rules(&policy);
    }

    /// Serves gRPC (agents, approvals, health, reflection) on `listener` until `shutdown`
    /// completes; marks overdue requests expired once a second.
    pub async fn serve(
        &self,
        listener: TcpListener,
        shutdown: impl std::future::Future<Output = ()> + Send,
    ) -> anyhow::Result<()> {
        let (health, health_svc) = tonic_health::server::health_reporter();
        for name in [
            "airlock.v1.AgentService",
            "airlock.v1.EnrollmentService",
            "airlock.v1.ApprovalService",
            "airlock.v1.AuditService",
            "airlock.v1.AgentsService",
            "airlock.v1.PolicyService",
            "airlock.v1.TokensService",
            "",
        ] {
            health
                .set_service_status(name, tonic_health::ServingStatus::Serving)
                .await;
        }
        let reflection = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1()?;
        let store = self.store.clone();
        let metrics = self.metrics.clone();
        let expiry = tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tick.tick().await;
                match store.expire_due(store::now_ms()) {
                    Ok(expired) => {
                        for h in expired {
                            metrics.decided("expired");
                            tracing::info!(request = %h.request.map(|r| r.request_id).unwrap_or_default(), "expired");
                        }
                    }
                    Err(e) => tracing::error!(error = %e, "expiring requests failed"),
                }
            }
        });
        let agents = self.agents.clone();
        let closing = self.closing.clone();
        let shutdown = async move {
            shutdown.await;
            agents.close_all();
            closing.send_replace(true);
        };
        let mut builder = tonic::transport::Server::builder();
        if let Some(tls) = &self.tls {
            let mut cfg = tonic::transport::ServerTlsConfig::new().identity(
                tonic::transport::Identity::from_pem(&tls.cert_pem, &tls.key_pem),
            );
            if let Some(ca) = &tls.client_ca_pem {
                cfg = cfg
                    .client_ca_root(tonic::transport::Certificate::from_pem(ca))
                    .client_auth_optional(true);
            }
            builder = builder.tls_config(cfg)?;
        }
        let require_client_cert = self.tls.as_ref().is_some_and(|t| t.client_ca_pem.is_some());
        let result = builder
            .add_service(health_svc)
            .add_service(reflection)
            .add_service(AgentServiceServer::with_interceptor(
                agents::AgentSvc {
                    store: self.store.clone(),
                    agents: self.agents.clone(),
                    policy: self.policy.clone(),
                    require_client_cert,
                    metrics: self.metrics.clone(),
                },
                auth::Auth::agents(self.store.clone()),
            ))
            // No interceptor: enrolling is how an agent gets a credential, so it cannot need
            // one; the one-time enrollment token in the request body authenticates the call.
            // A service of its own (not a method of AgentService) because interceptors do not
            // see the method path: exempting one method would admit bearer-less calls to all.
            .add_service(EnrollmentServiceServer::new(enroll::EnrollmentSvc {
                store: self.store.clone(),
                require_client_cert,
            }))
            .add_service(AuditServiceServer::with_interceptor(
                control::AuditSvc {
                    store: self.store.clone(),
                },
                auth::Auth::people(self.store.clone()),
            ))
            .add_service(AgentsServiceServer::with_interceptor(
                control::AgentsSvc {
                    store: self.store.clone(),
                    agents: self.agents.clone(),
                },
                auth::Auth::people(self.store.clone()),
            ))
            .add_service(TokensServiceServer::with_interceptor(
                control::TokensSvc {
                    store: self.store.clone(),
                },
                auth::Auth::people(self.store.clone()),
            ))
            .add_service(PolicyServiceServer::with_interceptor(
                control::PolicySvc {
                    status: self.policy_status.clone(),
                },
                auth::Auth::people(self.store.clone()),
            ))
            .add_service(ApprovalServiceServer::with_interceptor(
                approvals::ApprovalSvc {
                    store: self.store.clone(),
                    agents: self.agents.clone(),
                    metrics: self.metrics.clone(),
                    decisions: self.decisions(),
                    closing: self.closing.subscribe(),
                },
                auth::Auth::people(self.store.clone()),
            ))
            // Small messages both ways (requests, decisions): no Nagle delay.
            .serve_with_incoming_shutdown(
                tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
                shutdown,
            )
            .await;
        expiry.abort();
        Ok(result?)
    }
}
