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
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
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

/// SHA-256 of `data`, hex.
pub fn sha256_hex(data: &[u8]) -> String {
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
    query(conn, &Filter::default())
}

/// Which records to read; every set field must match.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    /// Request id.
    pub request_id: Option<String>,
    /// Actor.
    pub actor: Option<String>,
    /// Exact action, or a prefix ending in `*`.
    pub action: Option<String>,
    /// From this time (ms), inclusive.
    pub since_ms: Option<i64>,
    /// Until this time (ms), exclusive.
    pub until_ms: Option<i64>,
    /// At most this many.
    pub limit: Option<u32>,
}

/// Records matching `f`, oldest first.
pub fn query(conn: &Connection, f: &Filter) -> rusqlite::Result<Vec<Record>> {
    let (action_exact, action_prefix) = match f.action.as_deref() {
        Some(a) if a.ends_with('*') => (None, Some(format!("{}%", a.trim_end_matches('*')))),
        Some(a) => (Some(a.to_owned()), None),
        None => (None, None),
    };
    let mut stmt = conn.prepare(
        "SELECT seq, at_ms, actor, action, request_id, payload, digest, prev_hash, hash FROM audit
         WHERE (?1 IS NULL OR request_id = ?1) AND (?2 IS NULL OR actor = ?2)
           AND (?3 IS NULL OR action = ?3) AND (?4 IS NULL OR action LIKE ?4)
           AND (?5 IS NULL OR at_ms >= ?5) AND (?6 IS NULL OR at_ms < ?6)
         ORDER BY seq LIMIT ?7",
    )?;
    let limit = f.limit.filter(|l| *l > 0).map_or(-1, i64::from);
    let rows = stmt.query_map(
        params![
            f.request_id,
            f.actor,
            action_exact,
            action_prefix,
            f.since_ms,
            f.until_ms,
            limit
        ],
        |r| {
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
        },
    )?;
    rows.collect()
}

/// Records as JSON Lines (one object per line).
pub fn to_json_lines(records: &[Record]) -> String {
    records
        .iter()
        .filter_map(|r| serde_json::to_string(r).ok())
        .map(|l| l + "\n")
        .collect()
}

/// Records as CSV with a header line.
pub fn to_csv(records: &[Record]) -> Result<String, csv::Error> {
    let mut w = csv::Writer::from_writer(Vec::new());
    for r in records {
        w.serialize(r)?;
    }
    let bytes = w.into_inner().map_err(|e| e.into_error())?;
    Ok(String::from_utf8_lossy(&bytes).into_owned())
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

#[cfg(test)]
mod tests {
    use super::*;

    fn db() -> Connection {
        let conn = Connection::open_in_memory().unwrap();
        conn.execute_batch(SCHEMA).unwrap();
        let mut conn = conn;
        let tx = conn.transaction().unwrap();
        append(&tx, 10, "h1", "request.received", "r1", "{\"a\":1}").unwrap();
        append(
            &tx,
            20,
            "alice",
            "request.vote.approve",
            "r1",
            "{\"reason\":\"ok, \\\"fine\\\"\"}",
        )
        .unwrap();
        append(&tx, 30, "h1", "request.received", "r2", "{}").unwrap();
        tx.commit().unwrap();
        conn
    }

    #[test]
    fn query_filters_and_prefixes() {
        let conn = db();
        let f = Filter {
            request_id: Some("r1".into()),
            ..Default::default()
        };
        assert_eq!(query(&conn, &f).unwrap().len(), 2);
        let f = Filter {
            action: Some("request.vote.*".into()),
            ..Default::default()
        };
        assert_eq!(query(&conn, &f).unwrap()[0].actor, "alice");
        let f = Filter {
            since_ms: Some(15),
            until_ms: Some(30),
            ..Default::default()
        };
        assert_eq!(query(&conn, &f).unwrap().len(), 1);
        let f = Filter {
            limit: Some(1),
            ..Default::default()
        };
        assert_eq!(query(&conn, &f).unwrap().len(), 1);
    }

    #[test]
    fn exports_round_trip() {
        let records = query(&db(), &Filter::default()).unwrap();
        let jsonl = to_json_lines(&records);
        let lines: Vec<serde_json::Value> = jsonl
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 3);
        assert_eq!(lines[1]["actor"], "alice");
        let csv_text = to_csv(&records).unwrap();
        let mut rd = csv::Reader::from_reader(csv_text.as_bytes());
        let rows: Vec<csv::StringRecord> = rd.records().map(Result::unwrap).collect();
        assert_eq!(rows.len(), 3);
        assert_eq!(
            &rows[1][5],
            records[1].payload.as_str(),
            "quotes and commas survive"
        );
        assert_eq!(rd.headers().unwrap().get(0), Some("seq"));
    }
}
