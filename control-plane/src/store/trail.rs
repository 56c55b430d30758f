//! The audit trail's table: appending (inside a write, so the record commits with the change
//! it describes, and at the one place in the chain the writer's lock gives it), filtered reads
//! in pages, the change feed's reads, and verification a page at a time.

use airlock_proto::v1::HeldRequest;

use super::{
    feed::Change,
    sql::{args, Arg, Conn, Row, Tx},
    Database, Store, StoreError,
};
use crate::{
    audit::{self, Chain, Filter, Record, Tamper},
    types::now_ms,
};

/// Most records one query returns.
pub const MAX_PAGE: u32 = 10_000;

/// Records verified per read.
const VERIFY_PAGE: i64 = 5_000;

const COLUMNS: &str = "seq, at_ms, actor, action, request_id, payload, digest, prev_hash, hash";

fn record(r: &Row) -> Result<Record, StoreError> {
    Ok(Record {
        seq: r.int(0)?,
        at_ms: r.int(1)?,
        actor: r.text(2)?,
        action: r.text(3)?,
        request_id: r.text(4)?,
        payload: r.text(5)?,
        digest: r.text(6)?,
        prev_hash: r.text(7)?,
        hash: r.text(8)?,
    })
}

/// A `WHERE` clause built from the filters that are set, so the database can use the index
/// that fits.
pub(crate) struct Where {
    pub(crate) sql: String,
    pub(crate) args: Vec<Arg>,
}

impl Where {
    pub(crate) fn new() -> Self {
        Self {
            sql: " WHERE 1 = 1".into(),
            args: Vec::new(),
        }
    }

    /// Adds `AND cond`, where each `?` in `cond` stands for `arg`.
    pub(crate) fn and(&mut self, cond: &str, arg: impl Into<Arg>) -> &mut Self {
        self.args.push(arg.into());
        let n = format!("${}", self.args.len());
        self.sql.push_str(" AND ");
        self.sql.push_str(&cond.replace('?', &n));
        self
    }

    /// Adds `AND column LIKE prefix%`, the prefix taken literally.
    pub(crate) fn prefix(&mut self, column: &str, prefix: &str) -> &mut Self {
        let escaped: String = prefix
            .chars()
            .flat_map(|c| match c {
                '%' | '_' | '\\' => vec!['\\', c],
                c => vec![c],
            })
            .collect();
        self.and(
            &format!("{column} LIKE ? ESCAPE '\\'"),
            format!("{escaped}%"),
        )
    }
}

fn filtered(f: &Filter) -> Where {
    let mut w = Where::new();
    if let Some(v) = &f.request_id {
        w.and("request_id = ?", v);
    }
    if let Some(v) = &f.actor {
        w.and("actor = ?", v);
    }
    match f.action.as_deref() {
        Some(a) if a.ends_with('*') => {
            w.prefix("action", a.trim_end_matches('*'));
        }
        Some(a) => {
            w.and("action = ?", a);
        }
        None => {}
    }
    if let Some(v) = f.since_ms {
        w.and("at_ms >= ?", v);
    }
    if let Some(v) = f.until_ms {
        w.and("at_ms < ?", v);
    }
    w
}

/// Which end of the trail a page starts from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Page {
    /// Oldest first, after this sequence number.
    After(i64),
    /// Newest first, before this sequence number.
    Before(i64),
}

impl Tx {
    /// Appends an audit record in this write transaction and returns its sequence number; the
    /// feed hears of it, with `held`, once the transaction commits.
    pub async fn audit(
        &mut self,
        actor: &str,
        action: &str,
        request_id: &str,
        payload: &str,
        held: Option<HeldRequest>,
    ) -> Result<i64, StoreError> {
        let (seq, hash) = self
            .head
            .clone()
            .ok_or_else(|| StoreError::Corrupt("audit record outside a write".into()))?;
        let r = Record::next(seq, &hash, now_ms(), actor, action, request_id, payload);
        self.exec(
            &format!("INSERT INTO audit ({COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)"),
            args![
                r.seq,
                r.at_ms,
                actor,
                action,
                request_id,
                payload,
                &r.digest,
                &r.prev_hash,
                &r.hash
            ],
        )
        .await?;
        self.head = Some((r.seq, r.hash));
        self.changes.push(Change {
            seq: r.seq,
            at_ms: r.at_ms,
            actor: r.actor,
            action: r.action,
            request_id: r.request_id,
            payload: r.payload,
            held,
            web: Default::default(),
        });
        Ok(r.seq)
    }
}

/// The records after `after` that verification reads next.
async fn verify_page(tx: &mut Tx, after: i64) -> Result<Vec<Record>, StoreError> {
    let sql = format!("SELECT {COLUMNS} FROM audit WHERE seq > $1 ORDER BY seq LIMIT $2");
    tx.rows(&sql, args![after, VERIFY_PAGE])
        .await?
        .iter()
        .map(record)
        .collect()
}

/// Checks a page; true when it was the last.
fn push_page(chain: &mut Chain, page: &[Record]) -> Result<bool, Tamper> {
    for r in page {
        chain.push(r)?;
    }
    Ok((page.len() as i64) < VERIFY_PAGE)
}

/// Verifies the audit trail of `db` without opening it as a server would: nothing is written
/// and no migration runs (SQLite is opened read-only), so it suits a copy or an offline
/// database. With SQLite, the chain's end is checked against the checkpoint file beside it.
pub async fn verify_database(db: &Database) -> Result<i64, Tamper> {
    verify_database_against(db, None).await
}

/// Like [`verify_database`], with the chain's record `signed.0` required to have hash
/// `signed.1` (from a signed checkpoint kept elsewhere, whose signature the caller checked)
/// instead of the checkpoint file.
pub async fn verify_database_against(
    db: &Database,
    signed: Option<(i64, String)>,
) -> Result<i64, Tamper> {
    let unreadable = |e: &dyn std::fmt::Display| Tamper::Unreadable(e.to_string());
    match db {
        Database::Sqlite(path) => {
            let (path, name, signed) = (path.clone(), db.to_string(), signed.clone());
            tokio::task::spawn_blocking(move || {
                let conn = rusqlite::Connection::open_with_flags(
                    &path,
                    rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
                )
                .map_err(|e| unreadable(&e))?;
                let mut tx = Tx::new(Conn::Sqlite(conn), name.into());
                let mut chain = match &signed {
                    Some(c) => Chain::new(Some(c.clone())),
                    None => Chain::with_file(&audit::checkpoint_path(&path)),
                };
                futures::executor::block_on(async {
                    loop {
                        let page = verify_page(&mut tx, chain.head().0)
                            .await
                            .map_err(|e| unreadable(&e))?;
                        if push_page(&mut chain, &page)? {
                            return chain.finish();
                        }
                    }
                })
            })
            .await
            .map_err(|e| unreadable(&e))?
        }
        Database::Postgres(url) => {
            let pool = sqlx::postgres::PgPoolOptions::new()
                .max_connections(1)
                .connect(url)
                .await
                .map_err(|e| Tamper::Unreadable(super::redact_in(&e.to_string(), url)))?;
            let conn = pool.acquire().await.map_err(|e| unreadable(&e))?;
            let mut tx = Tx::new(
                Conn::Postgres {
                    conn: Some(conn),
                    pool: pool.clone(),
                },
                db.to_string().into(),
            );
            let mut chain = Chain::new(signed);
            loop {
                let page = verify_page(&mut tx, chain.head().0)
                    .await
                    .map_err(|e| unreadable(&e))?;
                if push_page(&mut chain, &page)? {
                    return chain.finish();
                }
            }
        }
    }
}

impl Store {
    /// Appends an audit record that concerns no request (policy loads, logins).
    pub async fn audit_event(
        &self,
        actor: &str,
        action: &str,
        payload: &str,
    ) -> Result<(), StoreError> {
        let (actor, action, payload) = (actor.to_owned(), action.to_owned(), payload.to_owned());
        self.write(move |tx| {
            let (actor, action, payload) = (actor.clone(), action.clone(), payload.clone());
            Box::pin(async move {
                tx.audit(&actor, &action, "", &payload, None).await?;
                Ok(())
            })
        })
        .await
    }

    /// The newest record's sequence number, hash and action (0, the genesis hash and "" when
    /// there is none): what a checkpoint signs, and whether that record is a checkpoint.
    pub async fn audit_tip(&self) -> Result<(i64, String, String), StoreError> {
        self.read(|tx| {
            Box::pin(async move {
                match tx
                    .row(
                        "SELECT seq, hash, action FROM audit ORDER BY seq DESC LIMIT 1",
                        &[],
                    )
                    .await?
                {
                    Some(r) => Ok((r.int(0)?, r.text(1)?, r.text(2)?)),
                    None => Ok((0, audit::GENESIS.to_owned(), String::new())),
                }
            })
        })
        .await
    }

    /// The sequence number of the newest record (0 when there is none).
    pub async fn audit_head(&self) -> Result<i64, StoreError> {
        self.read(|tx| {
            Box::pin(async move {
                tx.row("SELECT COALESCE(MAX(seq), 0) FROM audit", &[])
                    .await?
                    .map_or(Ok(0), |r| r.int(0))
            })
        })
        .await
    }

    /// One page of records matching `f` (its `limit`, at most [`MAX_PAGE`]), from `page`.
    pub async fn audit_page(&self, f: &Filter, page: Page) -> Result<Vec<Record>, StoreError> {
        let mut w = filtered(f);
        let order = match page {
            Page::After(seq) => {
                w.and("seq > ?", seq);
                "ASC"
            }
            Page::Before(seq) => {
                w.and("seq < ?", seq);
                "DESC"
            }
        };
        let limit = f.limit.filter(|l| *l > 0).unwrap_or(MAX_PAGE).min(MAX_PAGE);
        let sql = format!(
            "SELECT {COLUMNS} FROM audit{} ORDER BY seq {order} LIMIT {limit}",
            w.sql
        );
        let args = w.args;
        self.read(move |tx| {
            let (sql, args) = (sql.clone(), args.clone());
            Box::pin(async move { tx.rows(&sql, &args).await?.iter().map(record).collect() })
        })
        .await
    }

    /// Records matching `f`, oldest first (at most its `limit`, and at most [`MAX_PAGE`]).
    pub async fn audit_query(&self, f: &Filter) -> Result<Vec<Record>, StoreError> {
        self.audit_page(f, Page::After(0)).await
    }

    /// Changes after `after`, in order, at most `limit`: the feed's read. Each carries its
    /// request as it is now.
    pub async fn changes_after(&self, after: i64, limit: i64) -> Result<Vec<Change>, StoreError> {
        self.read(move |tx| {
            Box::pin(async move {
                let rows = tx
                    .rows(
                        "SELECT a.seq, a.at_ms, a.actor, a.action, a.request_id, a.payload, r.body
                         FROM audit a LEFT JOIN requests r ON r.id = a.request_id
                         WHERE a.seq > $1 ORDER BY a.seq LIMIT $2",
                        args![after, limit],
                    )
                    .await?;
                rows.iter()
                    .map(|r| {
                        Ok(Change {
                            seq: r.int(0)?,
                            at_ms: r.int(1)?,
                            actor: r.text(2)?,
                            action: r.text(3)?,
                            request_id: r.text(4)?,
                            payload: r.text(5)?,
                            held: match r.0.get(6) {
                                Some(super::sql::Cell::Blob(_)) => Some(r.message(6)?),
                                _ => None,
                            },
                            web: Default::default(),
                        })
                    })
                    .collect()
            })
        })
        .await
    }

    /// Verifies `chain` onwards: every record after its head, a page at a time. Returns the
    /// number of records verified in all.
    pub async fn verify_from(&self, chain: &mut Chain) -> Result<i64, Tamper> {
        loop {
            let (after, _) = chain.head();
            let page = self
                .read(move |tx| Box::pin(verify_page(tx, after)))
                .await
                .map_err(|e| Tamper::Unreadable(e.to_string()))?;
            if push_page(chain, &page)? {
                return chain.finish();
            }
        }
    }

    /// Verifies the whole chain, and its end against the checkpoint file beside a SQLite
    /// database. Returns the number of records.
    pub async fn verify_audit(&self) -> Result<i64, Tamper> {
        let mut chain = self
            .inner
            .checkpoint
            .as_deref()
            .map_or_else(|| Chain::new(None), Chain::with_file);
        self.verify_from(&mut chain).await
    }
}

/// How often the whole chain is verified again (new records are verified when asked).
pub const FULL_EVERY_MS: i64 = 10 * 60_000;

struct Verified {
    chain: Chain,
    result: Result<i64, Tamper>,
    full_at_ms: i64,
}

/// The audit chain's verification, cached: the whole chain is verified in the background (at
/// start and every [`FULL_EVERY_MS`]); a caller only waits for the records appended since.
/// A break, once found, is reported until a full pass finds the chain whole again.
pub struct Verifier {
    store: Store,
    state: tokio::sync::Mutex<Option<Verified>>,
}

impl Verifier {
    /// A verifier of `store`'s trail; nothing is read until it is asked or run.
    pub fn new(store: Store) -> std::sync::Arc<Self> {
        std::sync::Arc::new(Self {
            store,
            state: tokio::sync::Mutex::new(None),
        })
    }

    /// The chain's state now: the number of records if it verifies.
    pub async fn check(&self) -> Result<i64, Tamper> {
        let mut state = self.state.lock().await;
        let stale = state
            .as_ref()
            .is_none_or(|s| now_ms() - s.full_at_ms > FULL_EVERY_MS);
        if stale {
            let mut chain = self
                .store
                .inner
                .checkpoint
                .as_deref()
                .map_or_else(|| Chain::new(None), Chain::with_file);
            let result = self.store.verify_from(&mut chain).await;
            if matches!(result, Err(Tamper::Unreadable(_))) {
                return result;
            }
            *state = Some(Verified {
                chain: Chain::resume(chain.head().0, chain.head().1.to_owned()),
                result: result.clone(),
                full_at_ms: now_ms(),
            });
            return result;
        }
        let Some(s) = state.as_mut() else {
            return Err(Tamper::Unreadable("no verification yet".into()));
        };
        if s.result.is_ok() {
            let result = self.store.verify_from(&mut s.chain).await;
            if !matches!(result, Err(Tamper::Unreadable(_))) {
                s.result = result;
            } else {
                return result;
            }
        }
        s.result.clone()
    }

    /// Verifies the whole chain now and every [`FULL_EVERY_MS`], until the store closes.
    pub async fn run(self: std::sync::Arc<Self>) {
        loop {
            if let Err(e) = self.check().await {
                tracing::error!(problem = %e, "the audit trail does not verify");
            }
            tokio::time::sleep(std::time::Duration::from_millis(
                FULL_EVERY_MS as u64 + 1000,
            ))
            .await;
        }
    }
}
