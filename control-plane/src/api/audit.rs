//! `AuditService`: query, export (streamed a page at a time, so a trail of any length fits)
//! and verify (the cached verification of [`crate::store::trail::Verifier`]).

use std::{pin::Pin, sync::Arc};

use airlock_proto::v1::{
    audit_service_server::AuditService, AuditChunk, AuditExportRequest, AuditQuery, AuditRecord,
    AuditRecords, AuditVerifyRequest, AuditVerifyResponse, ExportFormat,
};
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use super::status_of;
use crate::{
    audit,
    store::{
        trail::{Page, Verifier},
        Store,
    },
};

/// Records read per page of an export.
const EXPORT_PAGE: u32 = 5000;

/// The audit filter of a query.
pub fn filter(q: Option<AuditQuery>) -> audit::Filter {
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
    pub store: Store,
    /// Its cached verification.
    pub verifier: Arc<Verifier>,
}

type ChunkStream = Pin<Box<dyn Stream<Item = Result<AuditChunk, Status>> + Send>>;

#[tonic::async_trait]
impl AuditService for AuditSvc {
    async fn query(&self, req: Request<AuditQuery>) -> Result<Response<AuditRecords>, Status> {
        let records = self
            .store
            .audit_query(&filter(Some(req.into_inner())))
            .await
            .map_err(status_of)?;
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
        let format = ExportFormat::try_from(r.format).unwrap_or(ExportFormat::Unspecified);
        if format == ExportFormat::Unspecified {
            return Err(Status::invalid_argument("format must be JSON_LINES or CSV"));
        }
        let mut f = filter(r.query);
        let mut left = f.limit.map_or(u64::MAX, u64::from);
        let (store, (tx, rx)) = (self.store.clone(), tokio::sync::mpsc::channel(4));
        tokio::spawn(async move {
            let mut after = 0;
            let mut first = true;
            while left > 0 {
                f.limit = Some(EXPORT_PAGE.min(u32::try_from(left).unwrap_or(u32::MAX)));
                let page = match store.audit_page(&f, Page::After(after)).await {
                    Ok(p) => p,
                    Err(e) => {
                        let _ = tx.send(Err(status_of(e))).await;
                        return;
                    }
                };
                let Some(last) = page.last() else { break };
                after = last.seq;
                left = left.saturating_sub(page.len() as u64);
                let text = match format {
                    ExportFormat::Csv => match audit::to_csv(&page) {
                        // The header once, on the first page.
                        Ok(t) if first => t,
                        Ok(t) => t
                            .split_once('\n')
                            .map(|x| x.1.to_owned())
                            .unwrap_or_default(),
                        Err(e) => {
                            let _ = tx.send(Err(Status::internal(e.to_string()))).await;
                            return;
                        }
                    },
                    _ => audit::to_json_lines(&page),
                };
                first = false;
                let full = page.len() as u32 == f.limit.unwrap_or(0);
                if tx
                    .send(Ok(AuditChunk {
                        data: text.into_bytes(),
                    }))
                    .await
                    .is_err()
                    || !full
                {
                    return;
                }
            }
        });
        Ok(Response::new(
            Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx)) as ChunkStream,
        ))
    }

    async fn verify(
        &self,
        _req: Request<AuditVerifyRequest>,
    ) -> Result<Response<AuditVerifyResponse>, Status> {
        Ok(Response::new(match self.verifier.check().await {
            Ok(n) => AuditVerifyResponse {
                intact: true,
                records: n,
                problem: String::new(),
            },
            Err(audit::Tamper::Unreadable(e)) => {
                tracing::warn!(error = %e, "audit verification could not read the trail");
                return Err(Status::unavailable(
                    "the audit trail cannot be read now; try again",
                ));
            }
            Err(t) => AuditVerifyResponse {
                intact: false,
                records: 0,
                problem: t.to_string(),
            },
        }))
    }
}
