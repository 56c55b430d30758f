//! The SQLite backend: one file in WAL mode with `synchronous = FULL`, no set-up.
//!
//! SQLite's calls block, so they run on threads of their own, never on a tokio worker: one
//! writer thread (the only one that writes, in batches, see [`super::run`]) and a few reader
//! threads (WAL lets them read while it writes). A job's future never waits on those threads:
//! every statement completes inside the call.

use std::{
    path::Path,
    sync::{mpsc as std_mpsc, Arc, Mutex},
};

use tokio::sync::mpsc;

use super::{
    feed::Change,
    run::{read_job, write_batch, Job, MAX_BATCH},
    sql::{Conn, Tx},
    StoreError,
};

/// Reader threads.
const READERS: usize = 2;

/// Jobs waiting for the writer before senders wait too.
const QUEUE: usize = 8192;

pub(crate) struct Sqlite {
    pub(crate) writer: mpsc::Sender<Box<dyn Job>>,
    pub(crate) readers: Mutex<std_mpsc::Sender<Box<dyn Job>>>,
    /// Dropped with the store: the checkpointing thread ends.
    _checkpointing: std_mpsc::Sender<()>,
}

fn connect(path: &Path, db: &Arc<str>, writer: bool) -> Result<rusqlite::Connection, StoreError> {
    let err = |e: rusqlite::Error| StoreError::Db {
        db: db.to_string(),
        message: e.to_string(),
        kind: super::sql::DbErrorKind::Other,
    };
    let conn = rusqlite::Connection::open(path).map_err(err)?;
    conn.busy_timeout(std::time::Duration::from_secs(10))
        .map_err(err)?;
    conn.set_prepared_statement_cache_capacity(128);
    // 64 MiB of page cache, and reads through a memory map: fewer copies and system calls.
    conn.pragma_update(None, "cache_size", -65536)
        .map_err(err)?;
    conn.pragma_update(None, "mmap_size", 1i64 << 30)
        .map_err(err)?;
    if writer {
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(err)?;
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(err)?;
        // The log is copied back into the database by a thread of its own
        // (see `open`), not by the writer in the middle of a commit.
        conn.pragma_update(None, "wal_autocheckpoint", 0)
            .map_err(err)?;
        // Each operation runs in a savepoint, whose undo copies go to a statement journal:
        // in memory, not spilled to a temporary file page by page.
        conn.pragma_update(None, "temp_store", "MEMORY")
            .map_err(err)?;
    } else {
        conn.pragma_update(None, "query_only", true).map_err(err)?;
    }
    Ok(conn)
}

/// Opens (creating) the database file `path`, brings its schema up to date and starts the
/// writer and reader threads. Committed changes go to `feed`. Blocks: call it off the async
/// workers.
pub(crate) fn open(
    path: &Path,
    db: Arc<str>,
    checkpoint: Option<std::path::PathBuf>,
    feed: mpsc::UnboundedSender<Vec<Change>>,
    credentials: Arc<std::sync::atomic::AtomicU64>,
) -> Result<Sqlite, StoreError> {
    let mut tx = Tx::new(Conn::Sqlite(connect(path, &db, true)?), db.clone());
    futures::executor::block_on(super::migrations::migrate(&mut tx))?;
    tx.checkpoint = checkpoint;
    let (writer, mut jobs) = mpsc::channel::<Box<dyn Job>>(QUEUE);
    let spawn = |name: String, f: Box<dyn FnOnce() + Send>| {
        std::thread::Builder::new()
            .name(name)
            .spawn(f)
            .map_err(|e| StoreError::Db {
                db: db.to_string(),
                message: format!("cannot start a database thread: {e}"),
                kind: super::sql::DbErrorKind::Other,
            })
    };
    spawn(
        "airlock-sqlite-w".into(),
        Box::new(move || {
            while let Some(first) = jobs.blocking_recv() {
                let mut batch = vec![first];
                while batch.len() < MAX_BATCH {
                    match jobs.try_recv() {
                        Ok(j) => batch.push(j),
                        Err(_) => break,
                    }
                }
                let started = std::time::Instant::now();
                let result = futures::executor::block_on(write_batch(&mut tx, &mut batch));
                tracing::trace!(jobs = batch.len(), took = ?started.elapsed(), "batch written");
                let status = match result {
                    Ok(changes) => {
                        // Before anyone is answered: a revoked token must not work once the
                        // revocation returns.
                        if changes
                            .iter()
                            .any(|c| super::feed::touches_credentials(&c.action))
                        {
                            credentials.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        }
                        if !changes.is_empty() {
                            let _ = feed.send(changes);
                        }
                        Ok(())
                    }
                    Err(e) => Err(e),
                };
                for job in batch {
                    job.finish(status.clone());
                }
            }
        }),
    )?;
    let (readers, queue) = std_mpsc::channel::<Box<dyn Job>>();
    let queue = Arc::new(Mutex::new(queue));
    for i in 0..READERS {
        let mut tx = Tx::new(Conn::Sqlite(connect(path, &db, false)?), db.clone());
        let queue = queue.clone();
        spawn(
            format!("airlock-sqlite-r{i}"),
            Box::new(move || loop {
                let next = queue.lock().unwrap_or_else(|p| p.into_inner()).recv();
                let Ok(mut job) = next else { return };
                let _ = futures::executor::block_on(read_job(&mut tx, &mut job));
                job.finish(Ok(()));
            }),
        )?;
    }
    // Copies the write-ahead log back into the database every half second (PASSIVE: never
    // waits for readers or the writer), so that it stays short.
    let (checkpointing, stop) = std_mpsc::channel::<()>();
    let conn = connect(path, &db, false)?;
    conn.pragma_update(None, "query_only", false)
        .map_err(|e| StoreError::Db {
            db: db.to_string(),
            message: e.to_string(),
            kind: super::sql::DbErrorKind::Other,
        })?;
    spawn(
        "airlock-sqlite-c".into(),
        Box::new(move || {
            while let Err(std_mpsc::RecvTimeoutError::Timeout) =
                stop.recv_timeout(std::time::Duration::from_millis(500))
            {
                if let Err(e) = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())) {
                    tracing::warn!(error = %e, "checkpointing the SQLite log failed");
                }
            }
        }),
    )?;
    Ok(Sqlite {
        writer,
        readers: Mutex::new(readers),
        _checkpointing: checkpointing,
    })
}
