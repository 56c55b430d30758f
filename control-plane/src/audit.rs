//! The tamper-evident audit trail, as data: records, their hash chain, its verification and
//! exports. The table that holds it is in [`crate::store`]; with SQLite, a checkpoint file
//! beside the database also holds the chain head, so that cutting records off the end is
//! caught too.
//!
//! Each record's hash covers its sequence number, time, actor, action, request id, the digest of
//! its payload and the previous record's hash.

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

/// Hash of the record before the first one.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

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
    /// The checkpoint file beside a SQLite database that has records is gone: records may have
    /// been cut off the end with it.
    #[error("the audit checkpoint file {0} is missing: records may have been cut off the end; verify against a signed checkpoint (--checkpoint), then restore the file")]
    CheckpointMissing(String),
    /// The database could not be read.
    #[error("cannot read the audit trail: {0}")]
    Unreadable(String),
}

/// SHA-256 of `data`, hex.
pub fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// The hash of a record with these fields.
pub fn record_hash(
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

impl Record {
    /// The record that follows `prev_seq` / `prev_hash` in the chain.
    pub fn next(
        prev_seq: i64,
        prev_hash: &str,
        at_ms: i64,
        actor: &str,
        action: &str,
        request_id: &str,
        payload: &str,
    ) -> Record {
        let seq = prev_seq + 1;
        let digest = sha256_hex(payload.as_bytes());
        let hash = record_hash(seq, at_ms, actor, action, request_id, &digest, prev_hash);
        Record {
            seq,
            at_ms,
            actor: actor.into(),
            action: action.into(),
            request_id: request_id.into(),
            payload: payload.into(),
            digest,
            prev_hash: prev_hash.into(),
            hash,
        }
    }
}

/// Path of the checkpoint file that belongs to a database file.
pub fn checkpoint_path(db: &Path) -> PathBuf {
    let mut p = db.as_os_str().to_owned();
    p.push(".audit-head");
    PathBuf::from(p)
}

/// Writes the chain head (`seq hash`) to the checkpoint file, atomically.
pub fn write_checkpoint(path: &Path, seq: i64, hash: &str) -> std::io::Result<()> {
    let tmp = path.with_extension("audit-head.tmp");
    std::fs::write(&tmp, format!("{seq} {hash}\n"))?;
    std::fs::rename(tmp, path)
}

/// The head a checkpoint file records, if it exists and reads.
pub fn read_checkpoint(path: &Path) -> Option<(i64, String)> {
    let text = std::fs::read_to_string(path).ok()?;
    let mut it = text.split_whitespace();
    let seq = it.next()?.parse().ok()?;
    Some((seq, it.next().unwrap_or_default().to_owned()))
}

/// Verifies a chain record by record, in order (so a trail of any length is checked a page at
/// a time), and its end against a checkpoint.
#[derive(Debug, Clone)]
pub struct Chain {
    last: i64,
    prev: String,
    checkpoint: Option<(i64, String)>,
    /// The checkpoint file that should exist and does not.
    missing: Option<String>,
}

impl Chain {
    /// A chain from its first record; `checkpoint` is the head a checkpoint file (or a
    /// signed checkpoint) recorded.
    pub fn new(checkpoint: Option<(i64, String)>) -> Self {
        Self {
            last: 0,
            prev: GENESIS.to_owned(),
            checkpoint,
            missing: None,
        }
    }

    /// A chain from its first record, checked against the checkpoint file at `path`, which
    /// must exist once there is a record (a missing or unreadable file is an error, never a
    /// check skipped).
    pub fn with_file(path: &Path) -> Self {
        let checkpoint = read_checkpoint(path);
        Self {
            missing: checkpoint.is_none().then(|| path.display().to_string()),
            ..Self::new(checkpoint)
        }
    }

    /// A chain already verified up to record `seq`, whose hash is `hash`.
    pub fn resume(seq: i64, hash: String) -> Self {
        Self {
            last: seq,
            prev: hash,
            checkpoint: None,
            missing: None,
        }
    }

    /// The last record verified and its hash.
    pub fn head(&self) -> (i64, &str) {
        (self.last, &self.prev)
    }

    /// Checks the next record.
    pub fn push(&mut self, r: &Record) -> Result<(), Tamper> {
        let expected = self.last + 1;
        if r.seq != expected || r.prev_hash != self.prev {
            return Err(Tamper::Removed { seq: expected });
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
        if let Some((seq, head)) = &self.checkpoint {
            if *seq == r.seq && *head != r.hash {
                return Err(Tamper::Changed { seq: r.seq });
            }
        }
        self.last = r.seq;
        self.prev = r.hash.clone();
        Ok(())
    }

    /// Ends the check: the number of records, unless the checkpoint says there were more.
    pub fn finish(&self) -> Result<i64, Tamper> {
        if let (Some(path), true) = (&self.missing, self.last > 0) {
            return Err(Tamper::CheckpointMissing(path.clone()));
        }
        match &self.checkpoint {
            Some((seq, _)) if *seq > self.last => Err(Tamper::Truncated {
                last: self.last,
                checkpoint: *seq,
            }),
            _ => Ok(self.last),
        }
    }
}

/// Which records to read; every set field must match.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
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

/// Records as JSON Lines (one object per line).
pub fn to_json_lines(records: &[Record]) -> String {
    records
        .iter()
        .filter_map(|r| serde_json::to_string(r).ok())
        .map(|l| l + "\n")
        .collect()
}

/// Records as CSV with a header line. Text cells that could start a spreadsheet formula
/// (`=`, `+`, `-`, `@`: a request id or actor chosen on an agent's host) get a leading `'`
/// ([`crate::display::csv_text`]); the JSON lines export keeps every byte for verification.
pub fn to_csv(records: &[Record]) -> Result<String, csv::Error> {
    use crate::display::csv_text;
    let mut w = csv::Writer::from_writer(Vec::new());
    for r in records {
        w.serialize(Record {
            actor: csv_text(&r.actor).into_owned(),
            action: csv_text(&r.action).into_owned(),
            request_id: csv_text(&r.request_id).into_owned(),
            payload: csv_text(&r.payload).into_owned(),
            ..r.clone()
        })?;
    }
    let bytes = w.into_inner().map_err(|e| e.into_error())?;
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chain() -> Vec<Record> {
        let a = Record::next(0, GENESIS, 10, "h1", "request.received", "r1", "{\"a\":1}");
        let b = Record::next(1, &a.hash, 20, "alice", "request.vote.approve", "r1", "{}");
        let c = Record::next(2, &b.hash, 30, "h1", "request.received", "r2", "{}");
        vec![a, b, c]
    }

    fn verify(records: &[Record], cp: Option<(i64, String)>) -> Result<i64, Tamper> {
        let mut c = Chain::new(cp);
        for r in records {
            c.push(r)?;
        }
        c.finish()
    }

    #[test]
    fn chain_verifies_and_catches_changes_gaps_and_cuts() {
        let good = chain();
        assert_eq!(verify(&good, Some((3, good[2].hash.clone()))), Ok(3));
        let mut changed = good.clone();
        changed[1].actor = "mallory".into();
        assert_eq!(verify(&changed, None), Err(Tamper::Changed { seq: 2 }));
        let gap = [good[0].clone(), good[2].clone()];
        assert_eq!(verify(&gap, None), Err(Tamper::Removed { seq: 2 }));
        assert_eq!(
            verify(&good[..2], Some((3, good[2].hash.clone()))),
            Err(Tamper::Truncated {
                last: 2,
                checkpoint: 3
            })
        );
        let mut resumed = Chain::resume(2, good[1].hash.clone());
        assert_eq!(resumed.push(&good[2]), Ok(()));
    }

    #[test]
    fn exports_round_trip() {
        let mut records = chain();
        records[1].payload = "{\"reason\":\"ok, \\\"fine\\\"\"}".into();
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

        records[2].request_id = "=HYPERLINK(\"https://evil.example\",\"ok\")".into();
        records[2].actor = "@SUM(1+1)".into();
        let csv_text = to_csv(&records).unwrap();
        let mut rd = csv::Reader::from_reader(csv_text.as_bytes());
        let rows: Vec<csv::StringRecord> = rd.records().map(Result::unwrap).collect();
        assert_eq!(&rows[2][4], "'=HYPERLINK(\"https://evil.example\",\"ok\")");
        assert_eq!(&rows[2][2], "'@SUM(1+1)");
    }
}
