//! The PostgreSQL backend, for several replicas on one database: a pool of connections through
//! sqlx (TLS with rustls), one writer task per replica (see [`super::run`]), and a listener
//! that hears other replicas' commits (`LISTEN airlock_feed`) and wakes the feed, which then
//! reads the table. After a lost connection the listener reconnects and the feed re-reads
//! everything after its cursor.

use std::{sync::Arc, sync::Weak, time::Duration};

use sqlx::postgres::{PgConnectOptions, PgListener, PgPoolOptions};
use tokio::{sync::mpsc, task::JoinHandle};

use super::{
    feed::Change,
    run::{write_batch, Job, MAX_BATCH, PG_CHANNEL},
    sql::{pg_error, Conn, DbErrorKind, Tx},
    Inner, StoreError,
};

/// Connections per replica.
const POOL: u32 = 16;

/// Jobs waiting for the writer before senders wait too.
const QUEUE: usize = 8192;

pub(crate) struct Postgres {
    pub(crate) pool: sqlx::PgPool,
    pub(crate) writer: mpsc::Sender<Box<dyn Job>>,
}

/// `url`'s connection settings; errors never repeat the URL (it may hold a password).
fn options(url: &str, db: &str) -> Result<PgConnectOptions, StoreError> {
    url.parse::<PgConnectOptions>()
        .map(|o| o.application_name("airlock-server"))
        .map_err(|e| StoreError::Db {
            db: db.to_owned(),
            message: super::redact_in(&e.to_string(), url),
            kind: DbErrorKind::Other,
        })
}

/// Connects, brings the schema up to date (one replica at a time) and starts the writer.
/// Returns the backend and its writer task.
pub(crate) async fn open(
    url: &str,
    db: Arc<str>,
    feed: mpsc::UnboundedSender<Vec<Change>>,
    credentials: Arc<std::sync::atomic::AtomicU64>,
) -> Result<(Postgres, JoinHandle<()>), StoreError> {
    let pool = PgPoolOptions::new()
        .max_connections(POOL)
        .acquire_timeout(Duration::from_secs(5))
        .connect_with(options(url, &db)?)
        .await
        .map_err(|e| {
            let e = pg_error(&db, e);
            match e {
                StoreError::Db { db, message, kind } => StoreError::Db {
                    db,
                    message: super::redact_in(&message, url),
                    kind,
                },
                other => other,
            }
        })?;
    let conn = pool.acquire().await.map_err(|e| pg_error(&db, e))?;
    let mut tx = Tx::new(
        Conn::Postgres {
            conn: Some(conn),
            pool: pool.clone(),
        },
        db.clone(),
    );
    super::migrations::migrate(&mut tx).await?;
    let (writer, mut jobs) = mpsc::channel::<Box<dyn Job>>(QUEUE);
    let task = tokio::spawn(async move {
        while let Some(first) = jobs.recv().await {
            let mut batch = vec![first];
            while batch.len() < MAX_BATCH {
                match jobs.try_recv() {
                    Ok(j) => batch.push(j),
                    Err(_) => break,
                }
            }
            let status = match write_batch(&mut tx, &mut batch).await {
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
    });
    Ok((Postgres { pool, writer }, task))
}

/// Hears other replicas' commits and wakes the feed; after a lost connection (and at start)
/// wakes it too, so that it re-reads what it may have missed.
pub(crate) async fn listen(pool: sqlx::PgPool, inner: Weak<Inner>) {
    let wake = |inner: &Weak<Inner>| match inner.upgrade() {
        Some(i) => {
            i.feed.wake.notify_one();
            true
        }
        None => false,
    };
    loop {
        let mut listener = match PgListener::connect_with(&pool).await {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for other replicas' changes; trying again");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        if let Err(e) = listener.listen(PG_CHANNEL).await {
            tracing::warn!(error = %e, "LISTEN failed; trying again");
            tokio::time::sleep(Duration::from_secs(1)).await;
            continue;
        }
        if !wake(&inner) {
            return;
        }
        loop {
            match listener.try_recv().await {
                Ok(Some(_)) => {}
                Ok(None) => {
                    tracing::warn!("lost the connection that hears other replicas; reconnecting and catching up");
                }
                Err(e) => {
                    tracing::warn!(error = %e, "listening for other replicas failed; reconnecting");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    break;
                }
            }
            if !wake(&inner) {
                return;
            }
        }
    }
}
