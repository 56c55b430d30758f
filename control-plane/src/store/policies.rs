//! The approval policy in force for every replica: each version a replica loads from its file
//! is stored (with an audit record), and the others follow it through the change feed.

use serde_json::json;

use super::{sql::args, Store, StoreError};
use crate::types::now_ms;

/// A stored policy version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredPolicy {
    /// Its number, from 1.
    pub version: i64,
    /// The policy file's text.
    pub source: String,
    /// SHA-256 of the text.
    pub sha256: String,
    /// The file it came from, on the replica that loaded it.
    pub path: String,
    /// That replica.
    pub replica: String,
    /// The file's modification time, Unix ms.
    pub file_mtime_ms: i64,
    /// When it was stored, Unix ms.
    pub at_ms: i64,
}

impl Store {
    /// The policy in force, if any replica stored one.
    pub async fn current_policy(&self) -> Result<Option<StoredPolicy>, StoreError> {
        self.read(|tx| {
            Box::pin(async move {
                tx.row(
                    "SELECT version, source, sha256, path, replica, file_mtime_ms, at_ms
                     FROM policies ORDER BY version DESC LIMIT 1",
                    &[],
                )
                .await?
                .map(|r| {
                    Ok(StoredPolicy {
                        version: r.int(0)?,
                        source: r.text(1)?,
                        sha256: r.text(2)?,
                        path: r.text(3)?,
                        replica: r.text(4)?,
                        file_mtime_ms: r.int(5)?,
                        at_ms: r.int(6)?,
                    })
                })
                .transpose()
            })
        })
        .await
    }

    /// Stores `source` (read from `path`, modified at `file_mtime_ms`) as the policy in force,
    /// audited as `policy.loaded`, unless it is already the one in force. Returns its version.
    pub async fn publish_policy(
        &self,
        source: &str,
        path: &str,
        file_mtime_ms: i64,
    ) -> Result<i64, StoreError> {
        let sha = crate::audit::sha256_hex(source.as_bytes());
        let a = (
            source.to_owned(),
            path.to_owned(),
            sha,
            self.replica().to_owned(),
        );
        self.write(move |tx| {
            let (source, path, sha, replica) = a.clone();
            Box::pin(async move {
                let current = tx
                    .row(
                        "SELECT version, sha256 FROM policies ORDER BY version DESC LIMIT 1",
                        &[],
                    )
                    .await?;
                let (version, same) = match current {
                    Some(r) => (r.int(0)?, r.text(1)? == sha),
                    None => (0, false),
                };
                if same {
                    return Ok(version);
                }
                tx.exec(
                    "INSERT INTO policies (version, source, sha256, path, replica, file_mtime_ms, at_ms)
                     VALUES ($1, $2, $3, $4, $5, $6, $7)",
                    args![version + 1, &source, &sha, &path, &replica, file_mtime_ms, now_ms()],
                )
                .await?;
                let payload =
                    json!({"path": path, "sha256": sha, "version": version + 1}).to_string();
                tx.audit("server", "policy.loaded", "", &payload, None)
                    .await?;
                Ok(version + 1)
            })
        })
        .await
    }
}
