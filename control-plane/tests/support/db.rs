//! The two backends every control-plane test runs on: a SQLite file in a temporary directory,
//! and a fresh database in this test binary's own PostgreSQL cluster (started on first use by
//! `airlock-testkit` with initdb and pg_ctl on a free port, stopped when the binary exits).

#![allow(dead_code)]

use airlock_control_plane::store::{Database, Store};

/// A database for one test.
pub struct TestDb {
    /// Where it is.
    pub db: Database,
    /// Which backend, for messages.
    pub backend: &'static str,
    dir: Option<tempfile::TempDir>,
}

impl TestDb {
    /// A SQLite file in a new temporary directory.
    pub fn sqlite() -> Self {
        let dir = tempfile::tempdir().unwrap();
        Self {
            db: Database::sqlite(dir.path().join("airlock.db")),
            backend: "sqlite",
            dir: Some(dir),
        }
    }

    /// A new database in the shared PostgreSQL cluster.
    pub fn postgres() -> Self {
        Self {
            db: airlock_testkit::fresh_database().parse().unwrap(),
            backend: "postgres",
            dir: None,
        }
    }

    /// A directory that lives as long as this database (for files a test needs beside it).
    pub fn dir(&mut self) -> std::path::PathBuf {
        if self.dir.is_none() {
            self.dir = Some(tempfile::tempdir().unwrap());
        }
        self.dir.as_ref().unwrap().path().to_owned()
    }

    /// Opens the store.
    pub async fn open(&self) -> Store {
        Store::open(&self.db).await.unwrap()
    }
}

/// Runs the async test function `$name(TestDb)` twice: `$name::sqlite` and `$name::postgres`.
#[macro_export]
macro_rules! both {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                super::$name($crate::db::TestDb::sqlite()).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                super::$name($crate::db::TestDb::postgres()).await
            }
        }
    )*};
}
