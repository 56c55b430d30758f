//! How store operations run: each is a job (a closure over a [`Tx`]). Writes go to the
//! backend's one writer, which takes every job waiting, runs them in one transaction and
//! commits once: one disk flush for many changes. A job checks before it writes, so a refused
//! job changes nothing; one that fails after writing sends its batch round again with each job
//! in a savepoint of its own. While the writer holds its transaction it is the only writer of the whole
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
            let first = self.changes.first().map_or(1, |c| c.seq);
            // A missing file is only created with the chain's first record: made again later,
            // it would anchor a trail cut off while it was gone (`rm` plus `DELETE`).
            if first > 1 && !path.exists() {
                tracing::error!(path = %path.display(), "the audit checkpoint file is missing and is not made again; verify the trail against a signed checkpoint, then restore the file (see the README)");
            } else if let Err(e) = crate::audit::write_checkpoint(path, *seq, hash) {
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

/// A job failed in a way that may have left some of its writes behind: the batch is run
/// again with each job in a savepoint of its own.
struct Unsafe(StoreError);

/// Runs `jobs` in one transaction. Without `savepoints` (the fast way), a job that is refused
/// must have written nothing: every job checks before it writes, so its refusals come first and
/// an error after a write is a database error, which abandons the batch ([`Unsafe`]). With
/// `savepoints`, each job's writes are undone when it fails, and the others commit.
async fn try_batch(
    tx: &mut Tx,
    jobs: &mut [Box<dyn Job>],
    savepoints: bool,
) -> Result<Result<Vec<Change>, Unsafe>, StoreError> {
    // SQLite keeps these statements prepared; PostgreSQL takes two in one round trip.
    let sqlite = tx.dialect() == Dialect::Sqlite;
    tx.changes.clear();
    tx.begin_write().await?;
    let last = jobs.len().saturating_sub(1);
    for (i, job) in jobs.iter_mut().enumerate() {
        if savepoints && (sqlite || i == 0) {
            tx.script("SAVEPOINT job").await?;
        }
        let mark = (tx.head.clone(), tx.changes.len());
        match job.run(tx).await {
            Ok(()) => {}
            Err(e) if e.is_transient() => return Err(e),
            Err(e @ StoreError::Db { .. }) if !savepoints => return Ok(Err(Unsafe(e))),
            // Refused: what the job wrote goes, the rest of the batch stays.
            Err(_) => {
                if savepoints {
                    tx.exec("ROLLBACK TO SAVEPOINT job", &[]).await?;
                }
                tx.head = mark.0;
                tx.changes.truncate(mark.1);
            }
        }
        if savepoints {
            if sqlite || i == last {
                tx.exec("RELEASE SAVEPOINT job", &[]).await?;
            } else {
                tx.script("RELEASE SAVEPOINT job; SAVEPOINT job").await?;
            }
        }
    }
    tx.commit_write().await?;
    Ok(Ok(std::mem::take(&mut tx.changes)))
}

/// Runs `jobs` in one write transaction, trying again while the failure is a passing one.
/// Returns the changes the batch committed.
pub(crate) async fn write_batch(
    tx: &mut Tx,
    jobs: &mut [Box<dyn Job>],
) -> Result<Vec<Change>, StoreError> {
    let started = Instant::now();
    let mut delay = Duration::from_millis(50);
    let mut savepoints = false;
    loop {
        match try_batch(tx, jobs, savepoints).await {
            Ok(Ok(changes)) => return Ok(changes),
            Ok(Err(Unsafe(e))) => {
                tracing::warn!(error = %e, "an operation failed after writing; running its batch again, each operation on its own");
                tx.rollback().await;
                savepoints = true;
            }
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
