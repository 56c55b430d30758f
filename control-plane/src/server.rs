//! One replica of the control plane: the parts every front end shares ([`ControlPlane`]), the
//! gRPC server with its authentication, and the work every replica does in the background
//! (expiring overdue requests, marking its agents as connected, following the policy in
//! force, delivering decisions to its agents).
//!
//! Any number of replicas may share one PostgreSQL database; none leads. What one replica
//! commits reaches the others through the change feed.

use std::{
    path::Path,
    sync::{Arc, Mutex},
    time::Duration,
};

use airlock_proto::v1::{
    agent_query_service_server::AgentQueryServiceServer, agent_service_server::AgentServiceServer,
    agents_service_server::AgentsServiceServer, approval_service_server::ApprovalServiceServer,
    audit_service_server::AuditServiceServer, enrollment_service_server::EnrollmentServiceServer,
    policy_service_server::PolicyServiceServer, tokens_service_server::TokensServiceServer,
    PolicyStatus, FILE_DESCRIPTOR_SET,
};
use tokio::{net::TcpListener, task::JoinHandle};

use crate::{
    api,
    auth::{Authed, Tokens},
    config::{Connections, Limits},
    decide::Decisions,
    metrics::Metrics,
    policy::{self, Policy, PolicyError, SharedPolicy},
    store::{trail::Verifier, Store},
    types::now_ms,
};

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

/// Background tasks of one replica; they stop when the last [`ControlPlane`] clone goes.
struct Life {
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

impl Drop for Life {
    fn drop(&mut self) {
        for t in self
            .tasks
            .get_mut()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            t.abort();
        }
    }
}

/// Everything the services share.
#[derive(Clone)]
pub struct ControlPlane {
    /// Requests and everything else kept.
    pub store: Store,
    /// Agents connected to this replica.
    pub agents: Arc<api::agents::Agents>,
    /// Approval policy.
    pub policy: SharedPolicy,
    /// What the policy service reports.
    pub policy_status: Arc<Mutex<PolicyStatus>>,
    /// TLS for the listener, if configured.
    pub tls: Option<Tls>,
    /// Prometheus metrics.
    pub metrics: Arc<Metrics>,
    /// Bounds on requests, outcomes and lists (`[limits]`).
    pub limits: Limits,
    /// Caps and timeouts on the listeners' connections (`[connections]`).
    pub connections: Connections,
    /// Bearer token checks.
    pub tokens: Arc<Tokens>,
    /// The audit chain's cached verification.
    pub verifier: Arc<Verifier>,
    /// Set when the server stops, so that long-lived streams (watchers) end and shutdown
    /// does not wait for them.
    pub closing: Arc<tokio::sync::watch::Sender<bool>>,
    life: Arc<Life>,
}

impl ControlPlane {
    /// A replica on `store`, with the default policy (any one approver) until one is loaded
    /// or another replica's arrives. Starts its background work; must be called within a
    /// tokio runtime.
    pub fn new(store: Store) -> Self {
        let plane = Self {
            agents: Arc::default(),
            policy: policy::shared(Policy::default()),
            policy_status: Arc::default(),
            tls: None,
            metrics: Arc::default(),
            limits: Limits::default(),
            connections: Connections::default(),
            tokens: Tokens::new(store.clone()),
            verifier: Verifier::new(store.clone()),
            closing: Arc::new(tokio::sync::watch::channel(false).0),
            life: Arc::new(Life {
                tasks: Mutex::default(),
            }),
            store,
        };
        let tasks = vec![
            tokio::spawn(plane.agents.clone().follow(plane.store.subscribe())),
            tokio::spawn(plane.agents.clone().follow_policy(plane.policy.clone())),
            tokio::spawn(plane.verifier.clone().run()),
            tokio::spawn(follow_policies(
                plane.store.clone(),
                plane.policy.clone(),
                plane.policy_status.clone(),
            )),
        ];
        *plane.life.tasks.lock().unwrap_or_else(|p| p.into_inner()) = tasks;
        plane
    }

    /// The vote path shared by gRPC, the web UI and Slack.
    pub fn decisions(&self) -> Decisions {
        Decisions {
            store: self.store.clone(),
            policy: self.policy.clone(),
            metrics: self.metrics.clone(),
        }
    }

    /// Uses `policy` on this replica from now on (new requests are routed by it; group
    /// membership is checked against it; agents get its rules). [`ControlPlane::load_policy`]
    /// puts a policy file in force on every replica.
    pub fn set_policy(&self, policy: Policy) {
        self.policy.send_replace(Arc::new(policy));
    }

    /// Loads the policy file `path` and puts it in force on every replica sharing the
    /// database; a bad file is refused, recorded (policy service, audit trail) and the running
    /// policy stays.
    pub async fn load_policy(&self, path: &Path) -> Result<(), PolicyError> {
        let now = now_ms();
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let mtime = std::fs::metadata(path)
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_millis() as i64);
        let shown = path.display().to_string();
        let parsed = Policy::parse(&text, &shown).and_then(|p| {
            // A missing file parses as empty text: say that it is missing.
            if text.is_empty() && !path.exists() {
                Policy::load(path)
            } else {
                Ok(p)
            }
        });
        // Recorded (for the other replicas and in the audit trail) before it is put in force:
        // a policy whose record fails is refused like a bad file.
        let recorded = match parsed {
            Ok(p) => match self.store.publish_policy(&text, &shown, mtime).await {
                Ok(_) => Ok(p),
                Err(e) => Err(PolicyError::NotRecorded {
                    path: shown.clone(),
                    reason: e.to_string(),
                }),
            },
            Err(e) => Err(e),
        };
        match recorded {
            Ok(p) => {
                self.apply_policy(p, text, shown, now);
                Ok(())
            }
            Err(e) => {
                {
                    let mut status = self.policy_status.lock().unwrap_or_else(|e| e.into_inner());
                    status.last_error = e.to_string();
                    status.last_error_unix_ms = now;
                }
                let payload = serde_json::json!({
                    "path": shown,
                    "sha256": crate::audit::sha256_hex(text.as_bytes()),
                })
                .to_string();
                if let Err(e) = self
                    .store
                    .audit_event("server", "policy.refused", &payload)
                    .await
                {
                    tracing::error!(error = %e, "auditing the refused policy failed");
                }
                Err(e)
            }
        }
    }

    /// At start: puts in force the policy file `path`, or the one another replica stored if
    /// that is newer than the file (or there is no file). A policy file that does not load
    /// is an error here: a server must not start on a policy it cannot read.
    pub async fn start_policy(&self, path: Option<&Path>) -> Result<(), PolicyError> {
        let stored = match self.store.current_policy().await {
            Ok(p) => p,
            Err(e) => {
                tracing::error!(error = %e, "reading the stored policy failed");
                None
            }
        };
        let mtime = path
            .and_then(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok())
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_millis() as i64);
        if let Some(s) = stored.filter(|s| path.is_none() || s.at_ms > mtime) {
            let text = path.and_then(|p| std::fs::read_to_string(p).ok());
            if text.as_deref() != Some(s.source.as_str()) {
                let p = Policy::parse(&s.source, &s.path)?;
                if let Some(path) = path {
                    tracing::warn!(file = %path.display(), version = s.version, from = %s.path, "the policy another replica stored is newer than this file; using it");
                }
                self.apply_policy(p, s.source, s.path, now_ms());
                return Ok(());
            }
        }
        match path {
            Some(p) => self.load_policy(p).await,
            None => Ok(()),
        }
    }

    fn apply_policy(&self, p: Policy, source: String, path: String, at: i64) {
        apply(&self.policy, &self.policy_status, p, source, path, at);
    }

    /// Signs the audit chain's head with `signer` every `every`, when the trail has grown
    /// since the last one: each checkpoint goes to the log (target `airlock_audit_checkpoint`),
    /// into the trail as `audit.checkpoint` (for webhooks that ask for it) and, when `file` is
    /// set, is appended to it. Runs until the task is dropped.
    pub async fn sign_checkpoints(
        &self,
        signer: std::sync::Arc<crate::checkpoint::Signer>,
        every: std::time::Duration,
        file: Option<std::path::PathBuf>,
    ) {
        let mut signed = -1;
        let mut tick = tokio::time::interval(every);
        loop {
            tick.tick().await;
            let (seq, hash, action) = match self.store.audit_tip().await {
                Ok(t) => t,
                Err(e) => {
                    tracing::error!(error = %e, "reading the audit head for a checkpoint failed");
                    continue;
                }
            };
            // Nothing new since the last checkpoint (this replica's or another's): signing
            // again would only record checkpoints of checkpoints.
            if seq == signed || action == "audit.checkpoint" {
                continue;
            }
            let c = signer.sign(seq, &hash, crate::types::now_ms());
            tracing::info!(target: "airlock_audit_checkpoint", "audit checkpoint {c}");
            // Into the trail too, which carries it to the webhooks that ask for checkpoints
            // (once, by the replica holding each channel). That record is the new head; it is
            // covered by the next checkpoint, once something else has been recorded.
            let payload = serde_json::json!({"checkpoint": c.to_string(), "seq": seq}).to_string();
            match self
                .store
                .audit_event("server", "audit.checkpoint", &payload)
                .await
            {
                Ok(()) => {}
                Err(e) => tracing::error!(error = %e, "recording the audit checkpoint failed"),
            }
            signed = seq;
            if let Some(path) = &file {
                use std::io::Write;
                let appended = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .and_then(|mut f| writeln!(f, "{c}"));
                if let Err(e) = appended {
                    tracing::error!(path = %path.display(), error = %e, "appending the audit checkpoint failed");
                }
            }
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
        let app = crate::web::health::router(
            self.store.clone(),
            self.agents.clone(),
            self.metrics.clone(),
        )
        .merge(extra);
        crate::listen::serve_http(listener, app, &self.connections, shutdown).await
    }

    /// Serves gRPC (agents, approvals, health, reflection) on `listener` until `shutdown`
    /// completes; meanwhile marks overdue requests expired once a second and its agents as
    /// connected every few seconds.
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
        let expiry = tokio::spawn(expire(self.store.clone(), self.metrics.clone()));
        let heartbeat = tokio::spawn(heartbeat(self.store.clone()));
        let agents = self.agents.clone();
        let closing = self.closing.clone();
        let shutdown = async move {
            shutdown.await;
            agents.close_all();
            closing.send_replace(true);
        };
        // Connections the authentication layer has vouched for keep their place (see listen).
        let callers = crate::listen::Callers::default();
        let mut builder = tonic::transport::Server::builder();
        if let Some(tls) = &self.tls {
            let mut cfg = tonic::transport::ServerTlsConfig::new()
                .identity(tonic::transport::Identity::from_pem(
                    &tls.cert_pem,
                    &tls.key_pem,
                ))
                .timeout(self.connections.handshake_timeout());
            if let Some(ca) = &tls.client_ca_pem {
                cfg = cfg
                    .client_ca_root(tonic::transport::Certificate::from_pem(ca))
                    .client_auth_optional(true);
            }
            builder = builder.tls_config(cfg)?;
        }
        let require_client_cert = self.tls.as_ref().is_some_and(|t| t.client_ca_pem.is_some());
        // Peers that vanished without a FIN (a host powered off) are found and their
        // connections closed, so that they do not hold places under the connection cap.
        let result = builder
            .http2_keepalive_interval(Some(std::time::Duration::from_secs(60)))
            .add_service(health_svc)
            .add_service(reflection)
            .add_service(Authed::agents(
                AgentServiceServer::new(api::agents::AgentSvc {
                    store: self.store.clone(),
                    agents: self.agents.clone(),
                    policy: self.policy.clone(),
                    require_client_cert,
                    metrics: self.metrics.clone(),
                    limits: self.limits.clone(),
                }),
                self.tokens.clone(),
                callers.clone(),
            ))
            .add_service(Authed::agents(
                AgentQueryServiceServer::new(api::agent_query::AgentQuerySvc {
                    store: self.store.clone(),
                    policy: self.policy.clone(),
                }),
                self.tokens.clone(),
                callers.clone(),
            ))
            // No authentication: enrolling is how an agent gets a credential, so it cannot need
            // one; the one-time enrollment token in the request body authenticates the call.
            // A service of its own (not a method of AgentService), so that no exemption by
            // method path is needed.
            .add_service(EnrollmentServiceServer::new(api::enroll::EnrollmentSvc {
                store: self.store.clone(),
                require_client_cert,
            }))
            .add_service(Authed::people(
                AuditServiceServer::new(api::audit::AuditSvc {
                    store: self.store.clone(),
                    verifier: self.verifier.clone(),
                }),
                self.tokens.clone(),
                callers.clone(),
            ))
            .add_service(Authed::people(
                AgentsServiceServer::new(api::inventory::AgentsSvc {
                    store: self.store.clone(),
                }),
                self.tokens.clone(),
                callers.clone(),
            ))
            .add_service(Authed::people(
                TokensServiceServer::new(api::tokens::TokensSvc {
                    store: self.store.clone(),
                }),
                self.tokens.clone(),
                callers.clone(),
            ))
            .add_service(Authed::people(
                PolicyServiceServer::new(api::policy::PolicySvc {
                    status: self.policy_status.clone(),
                }),
                self.tokens.clone(),
                callers.clone(),
            ))
            .add_service(Authed::people(
                ApprovalServiceServer::new(api::approvals::ApprovalSvc {
                    store: self.store.clone(),
                    metrics: self.metrics.clone(),
                    decisions: self.decisions(),
                    limits: self.limits.clone(),
                    closing: self.closing.subscribe(),
                }),
                self.tokens.clone(),
                callers.clone(),
            ))
            .serve_with_incoming_shutdown(
                crate::listen::grpc(listener, &self.connections, callers),
                shutdown,
            )
            .await;
        expiry.abort();
        heartbeat.abort();
        Ok(result?)
    }
}

fn apply(
    shared: &SharedPolicy,
    status: &Mutex<PolicyStatus>,
    p: Policy,
    source: String,
    path: String,
    at: i64,
) {
    shared.send_replace(Arc::new(p));
    let mut status = status.lock().unwrap_or_else(|e| e.into_inner());
    *status = PolicyStatus {
        source,
        path,
        loaded_unix_ms: at,
        last_error: String::new(),
        last_error_unix_ms: 0,
    };
}

/// Puts in force on this replica every policy another replica stores.
async fn follow_policies(store: Store, shared: SharedPolicy, status: Arc<Mutex<PolicyStatus>>) {
    let mut changes = store.subscribe();
    while let Some(c) = changes.next().await {
        if c.action != "policy.loaded" {
            continue;
        }
        let stored = match store.current_policy().await {
            Ok(Some(p)) => p,
            Ok(None) => continue,
            Err(e) => {
                tracing::error!(error = %e, "reading the policy another replica stored failed");
                continue;
            }
        };
        let ours = status
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .source
            .clone();
        if crate::audit::sha256_hex(ours.as_bytes()) == stored.sha256 {
            continue;
        }
        match Policy::parse(&stored.source, &stored.path) {
            Ok(p) => {
                tracing::info!(version = stored.version, path = %stored.path, "policy from another replica in force");
                apply(&shared, &status, p, stored.source, stored.path, now_ms());
            }
            Err(e) => {
                tracing::error!(error = %e, "the policy another replica stored does not parse here; the running one stays")
            }
        }
    }
}

/// Marks overdue requests expired, once a second (every replica; each request once).
async fn expire(store: Store, metrics: Arc<Metrics>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        match store.expire_due(now_ms()).await {
            Ok(expired) => {
                for h in expired {
                    metrics.decided("expired");
                    tracing::info!(request = %h.request.map(|r| r.request_id).unwrap_or_default(), "expired");
                }
            }
            Err(e) => tracing::error!(error = %e, "expiring requests failed"),
        }
    }
}

/// Marks this replica's agents as still connected.
async fn heartbeat(store: Store) {
    let mut tick = tokio::time::interval(Duration::from_millis(
        crate::store::agents::HEARTBEAT_MS as u64,
    ));
    loop {
        tick.tick().await;
        if let Err(e) = store.touch_agents().await {
            tracing::warn!(error = %e, "marking agents as connected failed");
        }
    }
}
