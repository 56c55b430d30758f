//! How store operations run: each is a job (a closure over a [`Tx`]). Writes go to the
//! backend's one writer, which takes every job waiting, runs them in one transaction (each in
//! a savepoint of its own, so a refused job changes nothing) and commits once: one disk flush
//! for many changes. While the writer holds its transaction it is the only writer of the whole
//! database (SQLite: `BEGIN IMMEDIATE`; PostgreSQL: a transaction-scoped advisory lock taken
//! first), so every job reads and writes as if alone, and the audit trail gets one order.
//!
//! A batch that fails for a passing reason (a broken connection, PostgreSQL restarting, a busy
//! file) is tried again, whole, for up to [`RETRY_FOR`]; only then do its jobs fail.

use std::{
    future::Future,
    pin::Pin,
    time::{Duration, Instant},
};

use tokio::sync::oneshot;

use crate::audit::GENESIS;

use super::{
    feed::Change,
    sql::{Conn, Dialect, Tx},
    StoreError,
};

/// A boxed future that may be sent between threads.
pub type BoxFut<'t, T> = Pin<Box<dyn Future<Output = T> + Send + 't>>;

/// How long a failing batch is tried again before its jobs fail.
pub const RETRY_FOR: Duration = Duration::from_secs(30);

/// Most jobs in one transaction.
pub const MAX_BATCH: usize = 512;

/// The advisory lock every PostgreSQL writer holds while it writes.
const PG_WRITE_LOCK: i64 = 0x6169_726c_6f63_6b01;

/// The channel PostgreSQL writers notify of new audit records (the payload is the newest
/// sequence number; readers re-read the table).
pub const PG_CHANNEL: &str = "airlock_feed";

/// A unit of work for a writer or a reader.
pub(crate) trait Job: Send {
    /// Runs the job's statements; may run again when its batch is retried. An error is the
    /// job's own (a copy is returned so the batch can tell a passing failure).
    fn run<'t>(&'t mut self, tx: &'t mut Tx) -> BoxFut<'t, Result<(), StoreError>>;
    /// Hands the caller the job's result, or `batch`'s error if the batch did not commit.
    fn finish(self: Box<Self>, batch: Result<(), StoreError>);
}

/// A job whose result of type `T` goes back through a oneshot channel.
pub(crate) struct Typed<F, T> {
    f: F,
    out: Option<Result<T, StoreError>>,
    reply: Option<oneshot::Sender<Result<T, StoreError>>>,
}

impl<F, T> Typed<F, T> {
    pub(crate) fn new(f: F) -> (Box<Self>, oneshot::Receiver<Result<T, StoreError>>) {
        let (tx, rx) = oneshot::channel();
        (
            Box::new(Self {
                f,
                out: None,
                reply: Some(tx),
            }),
            rx,
        )
    }
}

impl<F, T> Job for Typed<F, T>
where
    F: for<'t> FnMut(&'t mut Tx) -> BoxFut<'t, Result<T, StoreError>> + Send,
    T: Send,
{
    fn run<'t>(&'t mut self, tx: &'t mut Tx) -> BoxFut<'t, Result<(), StoreError>> {
        Box::pin(async move {
            let r = (self.f)(tx).await;
            let status = match &r {
                Ok(_) => Ok(()),
                Err(e) => Err(e.clone()),
            };
            self.out = Some(r);
            status
        })
    }

    fn finish(mut self: Box<Self>, batch: Result<(), StoreError>) {
        let out = match (self.out.take(), batch) {
            (Some(Err(e)), _) | (_, Err(e)) => Err(e),
            (Some(Ok(v)), Ok(())) => Ok(v),
            (None, Ok(())) => Err(StoreError::Closed),
        };
        if let Some(reply) = self.reply.take() {
            let _ = reply.send(out);
        }
    }
}

impl Tx {
    /// Starts a write transaction holding the database's one write lock, and reads the audit
    /// chain's head.
    async fn begin_write(&mut self) -> Result<(), StoreError> {
        match self.dialect() {
            Dialect::Sqlite => self.script("BEGIN IMMEDIATE").await?,
            Dialect::Postgres => {
                self.script(&format!(
                    "BEGIN; SELECT pg_advisory_xact_lock({PG_WRITE_LOCK})"
                ))
                .await?
            }
        }
        let head = self
            .row("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1", &[])
            .await?;
        self.head = Some(match head {
            Some(r) => (r.int(0)?, r.text(1)?),
            None => (0, GENESIS.to_owned()),
        });
        Ok(())
    }

    /// Commits; PostgreSQL tells the other replicas, SQLite writes the audit checkpoint.
    async fn commit_write(&mut self) -> Result<(), StoreError> {
        let last = self.changes.last().map(|c| c.seq);
        if let (Some(seq), Dialect::Postgres) = (last, self.dialect()) {
            self.exec(
                "SELECT pg_notify($1, $2)",
                super::sql::args![PG_CHANNEL, seq.to_string()],
            )
            .await?;
        }
        self.script("COMMIT").await?;
        if let (Some(path), Some((seq, hash)), Some(_)) = (&self.checkpoint, &self.head, last) {
            if let Err(e) = crate::audit::write_checkpoint(path, *seq, hash) {
                tracing::error!(path = %path.display(), error = %e, "writing the audit checkpoint failed");
            }
        }
        self.head = None;
        Ok(())
    }

    async fn rollback(&mut self) {
        self.head = None;
        self.changes.clear();
        if matches!(&self.conn, Conn::Postgres { conn: None, .. }) {
            return;
        }
        let _ = self.script("ROLLBACK").await;
    }
}

async fn try_batch(tx: &mut Tx, jobs: &mut [Box<dyn Job>]) -> Result<Vec<Change>, StoreError> {
    tx.changes.clear();
    tx.begin_write().await?;
    tx.script("SAVEPOINT job").await?;
    for job in jobs.iter_mut() {
        let mark = (tx.head.clone(), tx.changes.len());
        match job.run(tx).await {
            Ok(()) => tx.script("RELEASE SAVEPOINT job; SAVEPOINT job").await?,
            Err(e) if e.is_transient() => return Err(e),
            Err(_) => {
                tx.script("ROLLBACK TO SAVEPOINT job").await?;
                tx.head = mark.0;
                tx.changes.truncate(mark.1);
            }
        }
    }
    tx.script("RELEASE SAVEPOINT job").await?;
    tx.commit_write().await?;
    Ok(std::mem::take(&mut tx.changes))
}

/// Runs `jobs` in one write transaction, trying again while the failure is a passing one.
/// Returns the changes the batch committed.
pub(crate) async fn write_batch(
    tx: &mut Tx,
    jobs: &mut [Box<dyn Job>],
) -> Result<Vec<Change>, StoreError> {
    let started = Instant::now();
    let mut delay = Duration::from_millis(50);
    loop {
        match try_batch(tx, jobs).await {
            Ok(changes) => return Ok(changes),
            Err(e) => {
                tx.rollback().await;
                if !e.is_transient() || started.elapsed() >= RETRY_FOR {
                    return Err(e);
                }
                tracing::warn!(error = %e, retry_in = ?delay, "database write failed; trying again");
                tx.pause(delay).await;
                delay = (delay * 2).min(Duration::from_secs(2));
                if let Err(e) = tx.reconnect().await {
                    tracing::warn!(error = %e, "reconnecting to the database failed");
                }
            }
        }
    }
}

/// Runs a read-only job: on SQLite in a read transaction (one snapshot), on PostgreSQL
/// statement by statement.
pub(crate) async fn read_job(tx: &mut Tx, job: &mut Box<dyn Job>) -> Result<(), StoreError> {
    if tx.dialect() == Dialect::Sqlite {
        tx.script("BEGIN").await?;
        let r = job.run(tx).await;
        let _ = tx.script("COMMIT").await;
        return r;
    }
    job.run(tx).await
}
