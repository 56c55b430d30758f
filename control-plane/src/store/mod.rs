//! The store: one async interface to everything the control plane keeps (requests, votes,
//! grants, tokens, accounts, sessions, agents, the audit trail, notification deliveries, the
//! policy in force), over SQLite (the default, one file, no set-up) or PostgreSQL (several
//! replicas on one database), with versioned migrations run at open, and the change feed that
//! tells every replica what changed.
//!
//! - [`sql`]: the statements' common ground and the transaction handle, [`Tx`];
//! - [`run`]: how operations run: batched writes with one lock, reads beside them;
//! - [`sqlite`], [`postgres`]: the two backends;
//! - [`migrations`]: the versioned schema of each;
//! - [`feed`]: the change feed ([`Change`], [`Subscription`]);
//! - the operations, by subject: [`requests`] (requests, votes, grants, outcomes, expiry,
//!   history), [`credentials`] (tokens and enrollment tokens), [`people`] (local accounts and
//!   web sessions), [`agents`], [`trail`] (the audit trail), [`deliveries`] (notification
//!   channels' log, Slack messages, channel leases), [`policies`] and [`insights`] (the
//!   insights page's counts).
//!
//! Every change is committed, with its audit record in the same transaction, before anyone is
//! told: a request before watchers hear of it, a decision before the agent gets it. No
//! operation blocks a tokio worker: SQLite runs on threads of its own, PostgreSQL through sqlx.

pub mod agents;
pub mod credentials;
pub mod deliveries;
pub mod feed;
pub mod insights;
pub mod migrations;
pub mod people;
pub mod policies;
mod postgres;
pub mod requests;
pub mod run;
pub mod sql;
mod sqlite;
pub mod trail;

use std::{
    fmt,
    path::PathBuf,
    str::FromStr,
    sync::{atomic::Ordering, Arc},
    time::Duration,
};

use tokio::{sync::mpsc, task::JoinHandle};

pub use feed::{Change, Subscription};
pub use sql::{Dialect, Tx};

use run::{BoxFut, Job, Typed};
use sql::DbErrorKind;

/// Why a store operation was refused or failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// No request (or grant) has this id.
    #[error("no request with id {0:?}")]
    NotFound(String),
    /// The request was already decided or expired.
    #[error("request {id:?} is no longer pending (it is {state})")]
    NotPending {
        /// The request.
        id: String,
        /// Its state.
        state: &'static str,
    },
    /// The request's deadline has passed; it is about to expire.
    #[error("request {id:?} is past its deadline; it can no longer be decided")]
    PastDeadline {
        /// The request.
        id: String,
    },
    /// The database refused or failed.
    #[error("database {db}: {message}")]
    Db {
        /// The database (a file, or a URL without its password).
        db: String,
        /// What went wrong.
        message: String,
        /// Whether trying again may help.
        kind: DbErrorKind,
    },
    /// The same person voted twice.
    #[error("{approver} has already voted on request {id:?}; a second vote does not count")]
    AlreadyVoted {
        /// The request.
        id: String,
        /// Who.
        approver: String,
    },
    /// A page token that no list call produced.
    #[error("page token {0:?} is not valid; pass the next_page_token of a previous answer")]
    BadPageToken(String),
    /// A token name is taken.
    #[error("a token named {0:?} already exists")]
    TokenExists(String),
    /// The system random source failed.
    #[error("cannot read random bytes: {0}")]
    Random(String),
    /// Scope `enroll` asked of [`Store::create_token`]: enrollment tokens are one-time, expire
    /// and live apart from bearer tokens.
    #[error("scope enroll makes a one-time enrollment token, not a bearer token")]
    NotBearerScope,
    /// A request id already names another host's request or another action.
    #[error("request id {id:?} from {host} is already used by a different request; refused")]
    IdConflict {
        /// The id.
        id: String,
        /// The host that sent it.
        host: String,
    },
    /// A request or outcome over one of the limits (`[limits]` in the server configuration).
    #[error("{0}")]
    Limit(String),
    /// A name or value given to the store is not acceptable; the message says which and why.
    #[error("{0}")]
    Invalid(String),
    /// A stored value could not be decoded.
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    /// The database's schema is newer than this program.
    #[error("{0}")]
    Schema(String),
    /// The store is shutting down.
    #[error("the store is closed")]
    Closed,
}

impl StoreError {
    /// Whether the failure may pass (a lost connection, a restarting server, a busy file).
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            StoreError::Db {
                kind: DbErrorKind::Transient,
                ..
            }
        )
    }

    /// Whether a unique key refused the write.
    pub fn is_unique(&self) -> bool {
        matches!(
            self,
            StoreError::Db {
                kind: DbErrorKind::Unique,
                ..
            }
        )
    }
}

/// Where the store lives: `sqlite:///path/airlock.db` or `postgres://user:pass@host:port/db`
/// (with PostgreSQL's usual TLS parameters: `sslmode`, `sslrootcert`, `sslcert`, `sslkey`).
#[derive(Clone, PartialEq, Eq)]
pub enum Database {
    /// A SQLite file.
    Sqlite(PathBuf),
    /// A PostgreSQL URL (it may hold a password: `Display` and `Debug` hide it).
    Postgres(String),
}

/// Why a `--database` value was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("--database {shown}: {reason}")]
pub struct DatabaseUrlError {
    shown: String,
    reason: String,
}

impl FromStr for Database {
    type Err = DatabaseUrlError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |reason: &str| DatabaseUrlError {
            shown: redact(s),
            reason: reason.into(),
        };
        if let Some(rest) = s.strip_prefix("sqlite:") {
            let path = rest.strip_prefix("//").unwrap_or(rest);
            let path = path.split('?').next().unwrap_or_default();
            if path.is_empty() {
                return Err(err(
                    "no file: use sqlite:///absolute/path/airlock.db (three slashes) or \
                     sqlite://relative/path.db",
                ));
            }
            return Ok(Database::Sqlite(PathBuf::from(path)));
        }
        if s.starts_with("postgres://") || s.starts_with("postgresql://") {
            let url = url::Url::parse(s).map_err(|e| err(&format!("not a URL: {e}")))?;
            if url.host_str().is_none_or(str::is_empty) {
                return Err(err(
                    "no host: use postgres://user:password@host:5432/database",
                ));
            }
            return Ok(Database::Postgres(s.to_owned()));
        }
        Err(err(
            "use sqlite:///path/airlock.db or postgres://user:password@host:5432/database",
        ))
    }
}

/// `url` with its password, if any, replaced by `***`.
pub fn redact(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) if u.password().is_some() => {
            let _ = u.set_password(Some("***"));
            u.to_string()
        }
        Ok(u) => u.to_string(),
        Err(_) => url
            .split_once('@')
            .map_or(url.to_owned(), |(_, host)| format!("***@{host}")),
    }
}

/// `text` with every occurrence of `url`'s password replaced by `***`.
pub(crate) fn redact_in(text: &str, url: &str) -> String {
    match url::Url::parse(url)
        .ok()
        .and_then(|u| u.password().map(str::to_owned))
    {
        Some(p) if !p.is_empty() => {
            let decoded = url::form_urlencoded::parse(format!("p={p}").as_bytes())
                .next()
                .map(|(_, v)| v.into_owned())
                .unwrap_or_default();
            let mut out = text.replace(&p, "***");
            if !decoded.is_empty() {
                out = out.replace(&decoded, "***");
            }
            out
        }
        _ => text.to_owned(),
    }
}

impl fmt::Display for Database {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Database::Sqlite(p) => write!(f, "sqlite://{}", p.display()),
            Database::Postgres(url) => f.write_str(&redact(url)),
        }
    }
}

impl fmt::Debug for Database {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Database({self})")
    }
}

impl Database {
    /// The SQLite file `path`.
    pub fn sqlite(path: impl Into<PathBuf>) -> Self {
        Database::Sqlite(path.into())
    }
}

enum Backend {
    Sqlite(sqlite::Sqlite),
    Postgres(postgres::Postgres),
}

pub(crate) struct Inner {
    backend: Backend,
    pub(crate) feed: feed::Feed,
    name: Arc<str>,
    replica: String,
    /// SQLite: the audit checkpoint file beside the database.
    pub(crate) checkpoint: Option<PathBuf>,
    tasks: std::sync::Mutex<Vec<JoinHandle<()>>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        for t in self
            .tasks
            .get_mut()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            t.abort();
        }
    }
}

/// The store; cheap to clone (all clones share one database connection set and feed).
#[derive(Clone)]
pub struct Store {
    pub(crate) inner: Arc<Inner>,
}

impl Store {
    /// Opens `db` (creating a SQLite file if needed), brings its schema up to date and starts
    /// the writer and the change feed. Must be called within a tokio runtime.
    pub async fn open(db: &Database) -> Result<Self, StoreError> {
        let name: Arc<str> = Arc::from(db.to_string());
        let (local_tx, local_rx) = mpsc::unbounded_channel();
        let feed = feed::Feed::new();
        let credentials = feed.credentials.clone();
        let (backend, tasks, poll, checkpoint) = match db {
            Database::Sqlite(path) => {
                if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                    std::fs::create_dir_all(dir).map_err(|e| StoreError::Db {
                        db: name.to_string(),
                        message: format!("cannot create {}: {e}", dir.display()),
                        kind: DbErrorKind::Other,
                    })?;
                }
                let (path, n) = (path.clone(), name.clone());
                let checkpoint = Some(crate::audit::checkpoint_path(&path));
                let cp = checkpoint.clone();
                let s = tokio::task::spawn_blocking(move || {
                    sqlite::open(&path, n, cp, local_tx, credentials)
                })
                .await
                .map_err(|e| StoreError::Db {
                    db: name.to_string(),
                    message: format!("opening failed: {e}"),
                    kind: DbErrorKind::Other,
                })??;
                // Other processes (`airlock-server tokens`, `users`) write the same file.
                (
                    Backend::Sqlite(s),
                    Vec::new(),
                    Duration::from_millis(250),
                    checkpoint,
                )
            }
            Database::Postgres(url) => {
                let (p, writer) = postgres::open(url, name.clone(), local_tx, credentials).await?;
                (
                    Backend::Postgres(p),
                    vec![writer],
                    Duration::from_secs(1),
                    None,
                )
            }
        };
        let replica =
            crate::credential::random_hex(6).map_err(|e| StoreError::Random(e.to_string()))?;
        let pool = match &backend {
            Backend::Postgres(p) => Some(p.pool.clone()),
            Backend::Sqlite(_) => None,
        };
        let store = Store {
            inner: Arc::new(Inner {
                backend,
                feed,
                name,
                replica,
                checkpoint,
                tasks: std::sync::Mutex::new(tasks),
            }),
        };
        // The feed starts at the head: what came before is history, not news.
        let head = store.audit_head().await?;
        store.inner.feed.cursor.store(head, Ordering::SeqCst);
        store.inner.feed.head.send_replace(head);
        let weak = Arc::downgrade(&store.inner);
        let mut spawned = vec![tokio::spawn(feed::run(weak.clone(), local_rx, poll))];
        if let Some(pool) = pool {
            spawned.push(tokio::spawn(postgres::listen(pool, weak)));
        }
        store
            .inner
            .tasks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend(spawned);
        Ok(store)
    }

    /// The database, as logs and errors name it (without a password).
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// Which database this is.
    pub fn dialect(&self) -> Dialect {
        match self.inner.backend {
            Backend::Sqlite(_) => Dialect::Sqlite,
            Backend::Postgres(_) => Dialect::Postgres,
        }
    }

    /// This process's id among the replicas sharing the database (random at each open).
    pub fn replica(&self) -> &str {
        &self.inner.replica
    }

    /// Every change from now on, none missed.
    pub fn subscribe(&self) -> Subscription {
        Subscription::new(&self.inner)
    }

    /// A number that changes whenever a credential may have changed (a token created, revoked
    /// or replaced): on this replica as soon as the change commits, on the others when the
    /// feed brings it. Caches of tokens start over when it moves.
    pub fn credentials_generation(&self) -> u64 {
        self.inner
            .feed
            .credentials
            .load(std::sync::atomic::Ordering::SeqCst)
    }

    /// The sequence number of the newest change the feed published; wakes its receivers on
    /// every change (for those who read the table themselves).
    pub fn head(&self) -> tokio::sync::watch::Receiver<i64> {
        self.inner.feed.head.subscribe()
    }

    /// Runs `f` in the writer's transaction, alone among the database's writers; its changes
    /// commit with the rest of the batch. `f` may run more than once (a retried batch), so it
    /// must take what it needs by clone.
    pub async fn write<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        F: for<'t> FnMut(&'t mut Tx) -> BoxFut<'t, Result<T, StoreError>> + Send + 'static,
        T: Send + 'static,
    {
        let (job, rx) = Typed::new(f);
        let sent = match &self.inner.backend {
            Backend::Sqlite(s) => s.writer.send(job).await.is_ok(),
            Backend::Postgres(p) => p.writer.send(job).await.is_ok(),
        };
        if !sent {
            return Err(StoreError::Closed);
        }
        rx.await.unwrap_or(Err(StoreError::Closed))
    }

    /// Runs the read-only `f` beside the writer (a reader thread for SQLite, a pooled
    /// connection for PostgreSQL, tried twice when the connection broke).
    pub async fn read<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        F: for<'t> FnMut(&'t mut Tx) -> BoxFut<'t, Result<T, StoreError>> + Send + 'static,
        T: Send + 'static,
    {
        let (job, rx) = Typed::new(f);
        let mut job: Box<dyn Job> = job;
        match &self.inner.backend {
            Backend::Sqlite(s) => {
                let sent = s
                    .readers
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .send(job);
                if sent.is_err() {
                    return Err(StoreError::Closed);
                }
            }
            Backend::Postgres(p) => {
                for attempt in 0..2 {
                    let last = attempt == 1;
                    match p.pool.acquire().await {
                        Ok(c) => {
                            let mut tx = Tx::new(
                                sql::Conn::Postgres {
                                    conn: Some(c),
                                    pool: p.pool.clone(),
                                },
                                self.inner.name.clone(),
                            );
                            // The job keeps its own result; a broken connection is tried once
                            // more.
                            let status = run::read_job(&mut tx, &mut job).await;
                            if !last && status.as_ref().is_err_and(StoreError::is_transient) {
                                tokio::time::sleep(Duration::from_millis(200)).await;
                                continue;
                            }
                            job.finish(Ok(()));
                        }
                        Err(e) => {
                            let e = sql::pg_error(self.name(), e);
                            if !last && e.is_transient() {
                                tokio::time::sleep(Duration::from_millis(200)).await;
                                continue;
                            }
                            job.finish(Err(e));
                        }
                    }
                    break;
                }
            }
        }
        rx.await.unwrap_or(Err(StoreError::Closed))
    }

    /// Whether the database answers and its schema reads.
    pub async fn ping(&self) -> Result<(), StoreError> {
        self.read(|tx| {
            Box::pin(async move {
                tx.row("SELECT COUNT(*) FROM schema_migrations", &[])
                    .await
                    .map(|_| ())
            })
        })
        .await
    }
}
