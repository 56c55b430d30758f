//! The read-mostly services for operators and auditors: `AuditService` (query, export,
//! verify), `AgentsService` (known and connected agents) and `PolicyService` (the policy in
//! force, and validation of a candidate).

use std::{
    pin::Pin,
    sync::{Arc, Mutex},
};

use airlock_proto::v1::{
    agents_service_server::AgentsService, audit_service_server::AuditService,
    policy_service_server::PolicyService, tokens_service_server::TokensService, AgentInfo,
    AuditChunk, AuditExportRequest, AuditQuery, AuditRecord, AuditRecords, AuditVerifyRequest,
    AuditVerifyResponse, CreateTokenRequest, CreateTokenResponse, ExportFormat, GetPolicyRequest,
    ListAgentsRequest, ListAgentsResponse, PolicyStatus, RevokeTokenRequest, RevokeTokenResponse,
    ValidatePolicyRequest, ValidatePolicyResponse,
};
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use crate::{
    agents::Agents,
    audit,
    auth::{self, Scope},
    policy::Policy,
    store::{Store, StoreError},
};

/// Bytes per export chunk.
const CHUNK: usize = 64 * 1024;

fn internal(e: impl std::fmt::Display) -> Status {
    tracing::error!(error = %e, "store failure");
    Status::internal("the control plane could not read its database")
}

fn filter(q: Option<AuditQuery>) -> audit::Filter {
    let q = q.unwrap_or_default();
    let some = |s: String| Some(s).filter(|s| !s.is_empty());
    audit::Filter {
        request_id: some(q.request_id),
        actor: some(q.actor),
        action: some(q.action),
        since_ms: Some(q.since_unix_ms).filter(|t| *t > 0),
        until_ms: Some(q.until_unix_ms).filter(|t| *t > 0),
        limit: Some(q.limit).filter(|l| *l > 0),
    }
}

fn to_proto(r: audit::Record) -> AuditRecord {
    AuditRecord {
        seq: r.seq,
        at_unix_ms: r.at_ms,
        actor: r.actor,
        action: r.action,
        request_id: r.request_id,
        payload: r.payload,
        digest: r.digest,
        prev_hash: r.prev_hash,
        hash: r.hash,
    }
}

/// `AuditService`.
pub struct AuditSvc {
    /// Where the trail lives.
    pub store: Arc<Store>,
}

type ChunkStream = Pin<Box<dyn Stream<Item = Result<AuditChunk, Status>> + Send>>;

#[tonic::async_trait]
impl AuditService for AuditSvc {
    async fn query(&self, req: Request<AuditQuery>) -> Result<Response<AuditRecords>, Status> {
        let records = self
            .store
            .audit_query(&filter(Some(req.into_inner())))
            .map_err(internal)?;
        Ok(Response::new(AuditRecords {
            records: records.into_iter().map(to_proto).collect(),
        }))
    }

    type ExportStream = ChunkStream;

    async fn export(
        &self,
        req: Request<AuditExportRequest>,
    ) -> Result<Response<Self::ExportStream>, Status> {
        let r = req.into_inner();
        let records = self.store.audit_query(&filter(r.query)).map_err(internal)?;
        let text = match ExportFormat::try_from(r.format).unwrap_or(ExportFormat::Unspecified) {
            ExportFormat::JsonLines => audit::to_json_lines(&records),
            ExportFormat::Csv => audit::to_csv(&records).map_err(internal)?,
            ExportFormat::Unspecified => {
                return Err(Status::invalid_argument("format must be JSON_LINES or CSV"))
            }
        };
        let chunks: Vec<Result<AuditChunk, Status>> = text
            .into_bytes()
            .chunks(CHUNK)
            .map(|c| Ok(AuditChunk { data: c.to_vec() }))
            .collect();
        Ok(Response::new(
            Box::pin(tokio_stream::iter(chunks)) as ChunkStream
        ))
    }

    async fn verify(
        &self,
        _req: Request<AuditVerifyRequest>,
    ) -> Result<Response<AuditVerifyResponse>, Status> {
        Ok(Response::new(match self.store.verify_audit() {
            Ok(n) => AuditVerifyResponse {
                intact: true,
                records: n,
                problem: String::new(),
            },
            Err(t) => AuditVerifyResponse {
                intact: false,
                records: 0,
                problem: t.to_string(),
            },
        }))
    }
}

/// `AgentsService`.
pub struct AgentsSvc {
    /// Known agents.
    pub store: Arc<Store>,
    /// Connected agents.
    pub agents: Arc<Agents>,
}

#[tonic::async_trait]
impl AgentsService for AgentsSvc {
    async fn list(
        &self,
        _req: Request<ListAgentsRequest>,
    ) -> Result<Response<ListAgentsResponse>, Status> {
        let connected = self.agents.connected();
        let agents = self
            .store
            .agents()
            .map_err(internal)?
            .into_iter()
            .map(|(h, first, last)| AgentInfo {
                connected: connected.contains(&h.host_id),
                host_id: h.host_id,
                hostname: h.hostname,
                labels: h.labels,
                version: h.version,
                first_seen_unix_ms: first,
                last_seen_unix_ms: last,
            })
            .collect();
        Ok(Response::new(ListAgentsResponse { agents }))
    }
}

/// `PolicyService`.
pub struct PolicySvc {
    /// What is in force, and the last reload error.
    pub status: Arc<Mutex<PolicyStatus>>,
}

#[tonic::async_trait]
impl PolicyService for PolicySvc {
    async fn get(&self, _req: Request<GetPolicyRequest>) -> Result<Response<PolicyStatus>, Status> {
        Ok(Response::new(
            self.status
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
        ))
    }

    async fn validate(
        &self,
        req: Request<ValidatePolicyRequest>,
    ) -> Result<Response<ValidatePolicyResponse>, Status> {
        Ok(Response::new(
            match Policy::parse(&req.get_ref().text, "candidate") {
                Ok(_) => ValidatePolicyResponse {
                    valid: true,
                    error: String::new(),
                },
                Err(e) => ValidatePolicyResponse {
                    valid: false,
                    error: e.to_string(),
                },
            },
        ))
    }
}

/// `TokensService`: admin tokens only.
pub struct TokensSvc {
    /// Where tokens live.
    pub store: Arc<Store>,
}

fn admin<T>(req: &Request<T>) -> Result<String, Status> {
    let who = auth::principal(req)?;
    if who.scope != Scope::Admin {
        return Err(Status::permission_denied(format!(
            "{} has a {} token; managing tokens needs an admin token",
            who.name, who.scope
        )));
    }
    Ok(who.name)
}

#[tonic::async_trait]
impl TokensService for TokensSvc {
    async fn create(
        &self,
        req: Request<CreateTokenRequest>,
    ) -> Result<Response<CreateTokenResponse>, Status> {
        let by = admin(&req)?;
        let r = req.into_inner();
        if r.name.trim().is_empty() {
            return Err(Status::invalid_argument("a token needs a name"));
        }
        let scope: Scope = r.scope.parse().map_err(Status::invalid_argument)?;
        if scope == Scope::Enroll {
            let ttl = match r.ttl_hours {
                0 => crate::enroll::DEFAULT_TTL,
                h => std::time::Duration::from_secs(u64::from(h) * 3600),
            };
            let host = Some(r.host_id.as_str()).filter(|h| !h.is_empty());
            let created = crate::enroll::create(&self.store, &r.name, host, ttl, &by)?;
            return Ok(Response::new(CreateTokenResponse {
                token: created.token,
            }));
        }
        if r.ttl_hours != 0 || !r.host_id.is_empty() {
            return Err(Status::invalid_argument(
                "ttl_hours and host_id are for scope enroll only; other tokens last until revoked",
            ));
        }
        let token = self
            .store
            .create_token(&r.name, scope)
            .map_err(|e| match e {
                StoreError::TokenExists(_) => Status::already_exists(e.to_string()),
                other => internal(other),
            })?;
        tracing::info!(name = %r.name, %scope, by = %by, "token created");
        Ok(Response::new(CreateTokenResponse { token }))
    }

    async fn revoke(
        &self,
        req: Request<RevokeTokenRequest>,
    ) -> Result<Response<RevokeTokenResponse>, Status> {
        let by = admin(&req)?;
        let name = req.into_inner().name;
        if !self.store.revoke_token(&name).map_err(internal)? {
            return Err(Status::not_found(format!("no active token named {name:?}")));
        }
        tracing::info!(name = %name, by = %by, "token revoked");
        Ok(Response::new(RevokeTokenResponse {}))
    }
}
