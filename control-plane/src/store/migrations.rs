//! Versioned schema migrations, run when a store opens: each backend has its list, applied in
//! order and recorded in `schema_migrations`, all in one transaction under the database's write
//! lock (so replicas starting together migrate once). A database whose schema is newer than
//! this program is refused: running on it could lose what the newer one keeps.

use airlock_proto::v1::{Grant, HeldRequest};

use super::{
    run::BoxFut,
    sql::{args, Dialect, Tx},
    StoreError,
};

/// Fills rows by program after a migration's statements.
type Backfill = for<'t> fn(&'t mut Tx) -> BoxFut<'t, Result<(), StoreError>>;

/// One step of the schema.
pub struct Migration {
    /// Its number, from 1.
    pub version: i64,
    /// What it does, in a word or two.
    pub name: &'static str,
    /// The statements.
    pub sql: &'static str,
    /// Rows to fill after the statements, by program.
    backfill: Option<Backfill>,
}

/// SQLite's migrations.
pub const SQLITE: &[Migration] = &[
    Migration {
        version: 1,
        name: "initial",
        sql: include_str!("migrations/sqlite/0001_initial.sql"),
        backfill: None,
    },
    Migration {
        version: 2,
        name: "replicas",
        sql: include_str!("migrations/sqlite/0002_replicas.sql"),
        backfill: Some(|tx| Box::pin(backfill_columns(tx))),
    },
];

/// PostgreSQL's migrations.
pub const POSTGRES: &[Migration] = &[Migration {
    version: 1,
    name: "initial",
    sql: include_str!("migrations/postgres/0001_initial.sql"),
    backfill: None,
}];

/// Advisory lock of the migrating replica.
const PG_MIGRATE_LOCK: i64 = 0x6169_726c_6f63_6b02;

/// Fills the columns 0002 added from the bodies of requests and grants made before it.
async fn backfill_columns(tx: &mut Tx) -> Result<(), StoreError> {
    for row in tx.rows("SELECT id, body FROM requests", &[]).await? {
        let id = row.text(0)?;
        let held: HeldRequest = row.message(1)?;
        let rule = held.request.as_ref().map_or("", |r| r.rule.as_str());
        tx.exec(
            "UPDATE requests SET hostname = $2, rule = $3, received_ms = $4, decided_ms = $5
             WHERE id = $1",
            args![
                &id,
                &held.hostname,
                rule,
                held.received_unix_ms,
                held.decided_unix_ms
            ],
        )
        .await?;
        for v in &held.votes {
            tx.exec(
                "INSERT INTO votes (request_id, person, approver, verdict, at_ms)
                 VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING",
                args![
                    &id,
                    crate::types::person(&v.approver),
                    &v.approver,
                    v.verdict,
                    v.at_unix_ms
                ],
            )
            .await?;
        }
    }
    for row in tx.rows("SELECT id, body FROM grants", &[]).await? {
        let g: Grant = row.message(1)?;
        tx.exec(
            "UPDATE grants SET created_ms = $2 WHERE id = $1",
            args![row.text(0)?, g.created_unix_ms],
        )
        .await?;
    }
    Ok(())
}

async fn apply(tx: &mut Tx) -> Result<(), StoreError> {
    let list = match tx.dialect() {
        Dialect::Sqlite => SQLITE,
        Dialect::Postgres => POSTGRES,
    };
    tx.script(
        "CREATE TABLE IF NOT EXISTS schema_migrations (
            version BIGINT PRIMARY KEY,
            name TEXT NOT NULL,
            applied_ms BIGINT NOT NULL
        )",
    )
    .await?;
    let applied = tx
        .row(
            "SELECT COALESCE(MAX(version), 0) FROM schema_migrations",
            &[],
        )
        .await?
        .map_or(Ok(0), |r| r.int(0))?;
    let known = list.last().map_or(0, |m| m.version);
    if applied > known {
        return Err(StoreError::Schema(format!(
            "the database's schema is version {applied}, newer than this airlock-server knows \
             ({known}); run the newer airlock-server, or restore a backup"
        )));
    }
    for m in list.iter().filter(|m| m.version > applied) {
        tx.script(m.sql).await?;
        if let Some(fill) = m.backfill {
            fill(tx).await?;
        }
        tx.exec(
            "INSERT INTO schema_migrations (version, name, applied_ms) VALUES ($1, $2, $3)",
            args![m.version, m.name, crate::types::now_ms()],
        )
        .await?;
        tracing::info!(version = m.version, name = m.name, "database migrated");
    }
    Ok(())
}

/// Brings the schema up to date, in one transaction.
pub(crate) async fn migrate(tx: &mut Tx) -> Result<(), StoreError> {
    match tx.dialect() {
        Dialect::Sqlite => tx.script("BEGIN IMMEDIATE").await?,
        Dialect::Postgres => {
            tx.script(&format!(
                "BEGIN; SELECT pg_advisory_xact_lock({PG_MIGRATE_LOCK})"
            ))
            .await?
        }
    }
    match apply(tx).await {
        Ok(()) => tx.script("COMMIT").await,
        Err(e) => {
            let _ = tx.script("ROLLBACK").await;
            Err(e)
        }
    }
}
