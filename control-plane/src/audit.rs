//! The tamper-evident audit trail: an append-only, hash-chained table in the same database as
//! the requests, plus a checkpoint file outside it holding the chain head, so that cutting
//! records off the end is caught too.
//!
//! Each record's hash covers its sequence number, time, actor, action, request id, the digest of
//! its payload and the previous record's hash.

use std::path::{Path, PathBuf};

use rusqlite::{params, Connection, OptionalExtension, Transaction};
use sha2::{Digest, Sha256};

/// Hash of the record before the first one.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// Schema of the audit table.
pub const SCHEMA: &str = "CREATE TABLE IF NOT EXISTS audit (
    seq INTEGER PRIMARY KEY,
    at_ms INTEGER NOT NULL,
    actor TEXT NOT NULL,
    action TEXT NOT NULL,
    request_id TEXT NOT NULL,
    payload TEXT NOT NULL,
    digest TEXT NOT NULL,
    prev_hash TEXT NOT NULL,
    hash TEXT NOT NULL
)";

/// One audit record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Position in the chain, from 1.
    pub seq: i64,
    /// Unix time, ms.
    pub at_ms: i64,
    /// Who did it (approver, agent host id, "server").
    pub actor: String,
    /// What happened (`request.received`, `request.approved`, ...).
    pub action: String,
    /// The request concerned, if any.
    pub request_id: String,
    /// The details, as JSON text.
    pub payload: String,
    /// SHA-256 of the payload.
    pub digest: String,
    /// Hash of the previous record.
    pub prev_hash: String,
    /// Hash of this record.
    pub hash: String,
}

/// What verification found.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Tamper {
    /// A record's content no longer matches its hash or digest.
    #[error("audit record {seq} was changed")]
    Changed {
        /// The record.
        seq: i64,
    },
    /// A record is missing or out of order (a gap or a wrong previous hash).
    #[error("audit record {seq} was removed or reordered")]
    Removed {
        /// Where the chain breaks.
        seq: i64,
    },
    /// The chain ends before the checkpoint's head.
    #[error("the audit trail ends at record {last} but the checkpoint says {checkpoint}: records were cut off the end")]
    Truncated {
        /// Last record in the database.
        last: i64,
        /// Head recorded in the checkpoint.
        checkpoint: i64,
    },
    /// The database could not be read.
    #[error("cannot read the audit trail: {0}")]
    Unreadable(String),
}

fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

fn record_hash(
    seq: i64,
    at_ms: i64,
    actor: &str,
    action: &str,
    request_id: &str,
    digest: &str,
    prev: &str,
) -> String {
    // Unit separators keep field boundaries unambiguous.
    let text = format!(
        "{seq}\u{1f}{at_ms}\u{1f}{actor}\u{1f}{action}\u{1f}{request_id}\u{1f}{digest}\u{1f}{prev}"
    );
    sha256_hex(text.as_bytes())
}

/// Path of the checkpoint file that belongs to a database file.
pub fn checkpoint_path(db: &Path) -> PathBuf {
    let mut p = db.as_os_str().to_owned();
    p.push(".audit-head");
    PathBuf::from(p)
}

/// Appends a record inside `tx`; returns it. The caller commits, then calls
/// [`write_checkpoint`].
pub fn append(
    tx: &Transaction<'_>,
    at_ms: i64,
    actor: &str,
    action: &str,
    request_id: &str,
    payload: &str,
) -> rusqlite::Result<Record> {
    let last: Option<(i64, String)> = tx
        .query_row(
            "SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()?;
    let (prev_seq, prev_hash) = last.unwrap_or((0, GENESIS.to_owned()));
    let seq = prev_seq + 1;
    let digest = sha256_hex(payload.as_bytes());
    let hash = record_hash(seq, at_ms, actor, action, request_id, &digest, &prev_hash);
    tx.execute(
        "INSERT INTO audit (seq, at_ms, actor, action, request_id, payload, digest, prev_hash, hash)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
        params![seq, at_ms, actor, action, request_id, payload, digest, prev_hash, hash],
    )?;
    Ok(Record {
        seq,
        at_ms,
        actor: actor.into(),
        action: action.into(),
        request_id: request_id.into(),
        payload: payload.into(),
        digest,
        prev_hash,
        hash,
    })
}

/// Writes the chain head (`seq hash`) to the checkpoint file, atomically.
pub fn write_checkpoint(path: &Path, head: &Record) -> std::io::Result<()> {
    let tmp = path.with_extension("audit-head.tmp");
    std::fs::write(&tmp, format!("{} {}\n", head.seq, head.hash))?;
    std::fs::rename(tmp, path)
}

/// Every record, in order.
pub fn records(conn: &Connection) -> rusqlite::Result<Vec<Record>> {
    let mut stmt = conn.prepare(
        "SELECT seq, at_ms, actor, action, request_id, payload, digest, prev_hash, hash FROM audit ORDER BY seq",
    )?;
    let rows = stmt.query_map([], |r| {
        Ok(Record {
            seq: r.get(0)?,
            at_ms: r.get(1)?,
            actor: r.get(2)?,
            action: r.get(3)?,
            request_id: r.get(4)?,
            payload: r.get(5)?,
            digest: r.get(6)?,
            prev_hash: r.get(7)?,
            hash: r.get(8)?,
        })
    })?;
    rows.collect()
}

/// Checks the whole chain, and its end against the checkpoint file if there is one. Returns the
/// number of records on success.
pub fn verify(conn: &Connection, checkpoint: Option<&Path>) -> Result<i64, Tamper> {
    let all = records(conn).map_err(|e| Tamper::Unreadable(e.to_string()))?;
    let mut prev = GENESIS.to_owned();
    for (i, r) in all.iter().enumerate() {
        let expected_seq = i as i64 + 1;
        if r.seq != expected_seq || r.prev_hash != prev {
            return Err(Tamper::Removed { seq: expected_seq });
        }
        let digest = sha256_hex(r.payload.as_bytes());
        let hash = record_hash(
            r.seq,
            r.at_ms,
            &r.actor,
            &r.action,
            &r.request_id,
            &r.digest,
            &r.prev_hash,
        );
        if digest != r.digest || hash != r.hash {
            return Err(Tamper::Changed { seq: r.seq });
        }
        prev = r.hash.clone();
    }
    let last = all.last().map_or(0, |r| r.seq);
    if let Some(path) = checkpoint {
        if let Ok(text) = std::fs::read_to_string(path) {
            let mut it = text.split_whitespace();
            let seq: i64 = it.next().and_then(|s| s.parse().ok()).unwrap_or(0);
            let hash = it.next().unwrap_or_default();
            if seq > last {
                return Err(Tamper::Truncated {
                    last,
                    checkpoint: seq,
                });
            }
            let at = all.iter().find(|r| r.seq == seq);
            if seq > 0 && at.is_none_or(|r| r.hash != hash) {
                return Err(Tamper::Changed { seq });
            }
        }
    }
    Ok(last)
}
