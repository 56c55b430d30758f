//! The SQL both backends speak, and [`Tx`], the handle every store operation runs its
//! statements through.
//!
//! Statements are written once, with `$1`, `$2`... parameters, for both SQLite and PostgreSQL;
//! the few places where the two differ ask [`Tx::dialect`]. Integers are 64-bit everywhere and
//! booleans are integers, so rows read the same from both. SQLite runs on threads of its own
//! ([`super::sqlite`]), where a `Tx` future never waits; PostgreSQL through sqlx
//! ([`super::postgres`]).

use std::{path::PathBuf, sync::Arc};

use sqlx::{pool::PoolConnection, Column, PgPool, Postgres, Row as _, TypeInfo};

use super::{feed::Change, run::BoxFut, StoreError};

/// Which SQL database a [`Tx`] talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    /// SQLite 3 (bundled with rusqlite).
    Sqlite,
    /// PostgreSQL 12 or later.
    Postgres,
}

/// A statement parameter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Arg {
    /// 64-bit integer (also booleans, as 0 and 1).
    Int(i64),
    /// Text.
    Text(String),
    /// Bytes (BLOB, BYTEA).
    Blob(Vec<u8>),
    /// NULL in an integer column.
    NullInt,
    /// NULL in a text column.
    NullText,
}

impl From<i64> for Arg {
    fn from(v: i64) -> Self {
        Arg::Int(v)
    }
}
impl From<i32> for Arg {
    fn from(v: i32) -> Self {
        Arg::Int(v.into())
    }
}
impl From<u32> for Arg {
    fn from(v: u32) -> Self {
        Arg::Int(v.into())
    }
}
impl From<bool> for Arg {
    fn from(v: bool) -> Self {
        Arg::Int(v.into())
    }
}
impl From<&str> for Arg {
    fn from(v: &str) -> Self {
        Arg::Text(v.to_owned())
    }
}
impl From<String> for Arg {
    fn from(v: String) -> Self {
        Arg::Text(v)
    }
}
impl From<&String> for Arg {
    fn from(v: &String) -> Self {
        Arg::Text(v.clone())
    }
}
impl From<Vec<u8>> for Arg {
    fn from(v: Vec<u8>) -> Self {
        Arg::Blob(v)
    }
}
impl From<Option<i64>> for Arg {
    fn from(v: Option<i64>) -> Self {
        v.map_or(Arg::NullInt, Arg::Int)
    }
}
impl From<Option<&str>> for Arg {
    fn from(v: Option<&str>) -> Self {
        v.map_or(Arg::NullText, |s| Arg::Text(s.to_owned()))
    }
}
impl From<Option<String>> for Arg {
    fn from(v: Option<String>) -> Self {
        v.map_or(Arg::NullText, Arg::Text)
    }
}

/// Parameters for a statement: `args![a, b, c]`.
macro_rules! args {
    ($($a:expr),* $(,)?) => { &[$($crate::store::sql::Arg::from($a)),*][..] };
}
pub(crate) use args;

/// One value of a result row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cell {
    /// NULL.
    Null,
    /// An integer (or a boolean).
    Int(i64),
    /// Text.
    Text(String),
    /// Bytes.
    Blob(Vec<u8>),
}

/// A result row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row(pub Vec<Cell>);

impl Row {
    fn cell(&self, i: usize) -> &Cell {
        self.0.get(i).unwrap_or(&Cell::Null)
    }

    fn wrong(&self, i: usize, want: &str) -> StoreError {
        StoreError::Corrupt(format!(
            "column {i} holds {:?} where {want} was expected",
            self.cell(i)
        ))
    }

    /// Column `i` as an integer.
    pub fn int(&self, i: usize) -> Result<i64, StoreError> {
        match self.cell(i) {
            Cell::Int(v) => Ok(*v),
            _ => Err(self.wrong(i, "an integer")),
        }
    }

    /// Column `i` as an integer, or `None` for NULL.
    pub fn opt_int(&self, i: usize) -> Result<Option<i64>, StoreError> {
        match self.cell(i) {
            Cell::Null => Ok(None),
            _ => self.int(i).map(Some),
        }
    }

    /// Column `i` as text.
    pub fn text(&self, i: usize) -> Result<String, StoreError> {
        match self.cell(i) {
            Cell::Text(v) => Ok(v.clone()),
            _ => Err(self.wrong(i, "text")),
        }
    }

    /// Column `i` as text, or `None` for NULL.
    pub fn opt_text(&self, i: usize) -> Result<Option<String>, StoreError> {
        match self.cell(i) {
            Cell::Null => Ok(None),
            _ => self.text(i).map(Some),
        }
    }

    /// Column `i` as bytes.
    pub fn blob(&self, i: usize) -> Result<&[u8], StoreError> {
        match self.cell(i) {
            Cell::Blob(v) => Ok(v),
            _ => Err(self.wrong(i, "bytes")),
        }
    }

    /// Column `i` decoded as the protobuf message `M`.
    pub fn message<M: prost::Message + Default>(&self, i: usize) -> Result<M, StoreError> {
        M::decode(self.blob(i)?).map_err(|e| StoreError::Corrupt(format!("stored message: {e}")))
    }
}

/// What a database error means for whoever asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DbErrorKind {
    /// Worth trying again: the connection broke, the server restarts, the file is busy.
    Transient,
    /// A unique key would be duplicated.
    Unique,
    /// Anything else.
    Other,
}

pub(crate) enum Conn {
    Sqlite(rusqlite::Connection),
    Postgres {
        conn: Option<PoolConnection<Postgres>>,
        pool: PgPool,
    },
}

/// A connection inside a transaction (for writes) or between statements (for reads), with the
/// audit trail's head when it writes. Store operations get a `&mut Tx` and issue statements
/// through [`Tx::exec`] and [`Tx::rows`].
pub struct Tx {
    pub(crate) conn: Conn,
    /// The database, as errors name it (never with a password).
    pub(crate) db: Arc<str>,
    /// Audit chain head (sequence number and hash) in a write transaction.
    pub(crate) head: Option<(i64, String)>,
    /// Changes appended in this transaction, for the feed once it commits.
    pub(crate) changes: Vec<Change>,
    /// SQLite: the audit checkpoint file beside the database.
    pub(crate) checkpoint: Option<PathBuf>,
}

/// `$1` style parameters as SQLite's `?1`, which SQLite numbers by their digits (a `$1` would
/// be numbered by its first appearance).
fn sqlite_params(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len());
    let mut chars = sql.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '$' && chars.peek().is_some_and(char::is_ascii_digit) {
            out.push('?');
        } else {
            out.push(c);
        }
    }
    out
}

fn bind_sqlite(stmt: &mut rusqlite::Statement<'_>, args: &[Arg]) -> rusqlite::Result<()> {
    for (i, a) in args.iter().enumerate() {
        let n = i + 1;
        match a {
            Arg::Int(v) => stmt.raw_bind_parameter(n, v)?,
            Arg::Text(v) => stmt.raw_bind_parameter(n, v)?,
            Arg::Blob(v) => stmt.raw_bind_parameter(n, v)?,
            Arg::NullInt | Arg::NullText => stmt.raw_bind_parameter(n, rusqlite::types::Null)?,
        }
    }
    Ok(())
}

fn sqlite_cell(v: rusqlite::types::ValueRef<'_>) -> Cell {
    use rusqlite::types::ValueRef;
    match v {
        ValueRef::Null => Cell::Null,
        ValueRef::Integer(i) => Cell::Int(i),
        ValueRef::Real(f) => Cell::Int(f as i64),
        ValueRef::Text(t) => Cell::Text(String::from_utf8_lossy(t).into_owned()),
        ValueRef::Blob(b) => Cell::Blob(b.to_vec()),
    }
}

fn pg_query<'q>(
    sql: &'q str,
    args: &'q [Arg],
) -> sqlx::query::Query<'q, Postgres, sqlx::postgres::PgArguments> {
    let mut q = sqlx::query(sql);
    for a in args {
        q = match a {
            Arg::Int(v) => q.bind(*v),
            Arg::Text(v) => q.bind(v.as_str()),
            Arg::Blob(v) => q.bind(v.as_slice()),
            Arg::NullInt => q.bind(None::<i64>),
            Arg::NullText => q.bind(None::<&str>),
        };
    }
    q
}

fn pg_row(row: &sqlx::postgres::PgRow) -> Result<Row, sqlx::Error> {
    let mut cells = Vec::with_capacity(row.columns().len());
    for (i, col) in row.columns().iter().enumerate() {
        let cell = match col.type_info().name() {
            "INT8" => row.try_get::<Option<i64>, _>(i)?.map(Cell::Int),
            "INT4" => row
                .try_get::<Option<i32>, _>(i)?
                .map(|v| Cell::Int(v.into())),
            "INT2" => row
                .try_get::<Option<i16>, _>(i)?
                .map(|v| Cell::Int(v.into())),
            "BOOL" => row
                .try_get::<Option<bool>, _>(i)?
                .map(|v| Cell::Int(v.into())),
            "BYTEA" => row.try_get::<Option<Vec<u8>>, _>(i)?.map(Cell::Blob),
            _ => row.try_get::<Option<String>, _>(i)?.map(Cell::Text),
        };
        cells.push(cell.unwrap_or(Cell::Null));
    }
    Ok(Row(cells))
}

impl Tx {
    pub(crate) fn new(conn: Conn, db: Arc<str>) -> Self {
        Self {
            conn,
            db,
            head: None,
            changes: Vec::new(),
            checkpoint: None,
        }
    }

    /// The database this transaction talks to.
    pub fn dialect(&self) -> Dialect {
        match self.conn {
            Conn::Sqlite(_) => Dialect::Sqlite,
            Conn::Postgres { .. } => Dialect::Postgres,
        }
    }

    pub(crate) fn sqlite_error(&self, e: rusqlite::Error) -> StoreError {
        let kind = match e.sqlite_error_code() {
            Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked) => {
                DbErrorKind::Transient
            }
            Some(rusqlite::ErrorCode::ConstraintViolation)
                if e.to_string().contains("UNIQUE") || e.to_string().contains("PRIMARY") =>
            {
                DbErrorKind::Unique
            }
            _ => DbErrorKind::Other,
        };
        StoreError::Db {
            db: self.db.to_string(),
            message: e.to_string(),
            kind,
        }
    }

    pub(crate) fn pg_error(&self, e: sqlx::Error) -> StoreError {
        pg_error(&self.db, e)
    }

    fn pg(&mut self) -> Result<&mut PoolConnection<Postgres>, StoreError> {
        let db = self.db.clone();
        match &mut self.conn {
            Conn::Postgres { conn: Some(c), .. } => Ok(c),
            _ => Err(StoreError::Db {
                db: db.to_string(),
                message: "no connection to the database".into(),
                kind: DbErrorKind::Transient,
            }),
        }
    }

    /// Runs `sql` with `args`; returns the number of rows it changed.
    pub fn exec<'a>(
        &'a mut self,
        sql: &'a str,
        args: &'a [Arg],
    ) -> BoxFut<'a, Result<u64, StoreError>> {
        Box::pin(async move {
            if let Conn::Sqlite(c) = &self.conn {
                let run = || -> rusqlite::Result<usize> {
                    let mut stmt = c.prepare_cached(&sqlite_params(sql))?;
                    bind_sqlite(&mut stmt, args)?;
                    stmt.raw_execute()
                };
                return run().map(|n| n as u64).map_err(|e| self.sqlite_error(e));
            }
            let result = pg_query(sql, args).execute(&mut **self.pg()?).await;
            self.pg_result(result).map(|r| r.rows_affected())
        })
    }

    /// Runs the query `sql` with `args`; returns every row.
    pub fn rows<'a>(
        &'a mut self,
        sql: &'a str,
        args: &'a [Arg],
    ) -> BoxFut<'a, Result<Vec<Row>, StoreError>> {
        Box::pin(async move {
            if let Conn::Sqlite(c) = &self.conn {
                let run = || -> rusqlite::Result<Vec<Row>> {
                    let mut stmt = c.prepare_cached(&sqlite_params(sql))?;
                    bind_sqlite(&mut stmt, args)?;
                    let n = stmt.column_count();
                    let mut rows = stmt.raw_query();
                    let mut out = Vec::new();
                    while let Some(r) = rows.next()? {
                        let mut cells = Vec::with_capacity(n);
                        for i in 0..n {
                            cells.push(sqlite_cell(r.get_ref(i)?));
                        }
                        out.push(Row(cells));
                    }
                    Ok(out)
                };
                return run().map_err(|e| self.sqlite_error(e));
            }
            let result = pg_query(sql, args).fetch_all(&mut **self.pg()?).await;
            let rows = self.pg_result(result)?;
            rows.iter()
                .map(pg_row)
                .collect::<Result<_, _>>()
                .map_err(|e| self.pg_error(e))
        })
    }

    /// The first row of the query `sql`, if any.
    pub async fn row(&mut self, sql: &str, args: &[Arg]) -> Result<Option<Row>, StoreError> {
        Ok(self.rows(sql, args).await?.into_iter().next())
    }

    /// Runs `sql`, which may hold several statements and no parameters.
    pub fn script<'a>(&'a mut self, sql: &'a str) -> BoxFut<'a, Result<(), StoreError>> {
        Box::pin(async move {
            if let Conn::Sqlite(c) = &self.conn {
                return c.execute_batch(sql).map_err(|e| self.sqlite_error(e));
            }
            // No parameters: the simple query protocol, which takes several statements.
            let result = sqlx::Executor::execute(&mut **self.pg()?, sql).await;
            self.pg_result(result).map(|_| ())
        })
    }

    /// A PostgreSQL result; a connection that broke is dropped, so that
    /// [`Tx::reconnect`] gets a new one.
    fn pg_result<T>(&mut self, r: Result<T, sqlx::Error>) -> Result<T, StoreError> {
        r.map_err(|e| {
            let err = self.pg_error(e);
            if matches!(
                err,
                StoreError::Db {
                    kind: DbErrorKind::Transient,
                    ..
                }
            ) {
                if let Conn::Postgres { conn, .. } = &mut self.conn {
                    if let Some(mut c) = conn.take() {
                        c.close_on_drop();
                    }
                }
            }
            err
        })
    }

    /// After a transient error: a new PostgreSQL connection (SQLite needs none).
    pub(crate) fn reconnect(&mut self) -> BoxFut<'_, Result<(), StoreError>> {
        Box::pin(async move {
            let db = self.db.clone();
            if let Conn::Postgres { conn, pool } = &mut self.conn {
                if conn.is_none() {
                    *conn = Some(pool.acquire().await.map_err(|e| pg_error(&db, e))?);
                }
            }
            Ok(())
        })
    }

    /// Waits `d` before another try: on SQLite's own thread by sleeping it, on PostgreSQL
    /// without holding a tokio worker.
    pub(crate) fn pause(&mut self, d: std::time::Duration) -> BoxFut<'_, ()> {
        let sqlite = matches!(self.conn, Conn::Sqlite(_));
        Box::pin(async move {
            if sqlite {
                std::thread::sleep(d)
            } else {
                tokio::time::sleep(d).await
            }
        })
    }
}

/// A sqlx error as a store error, transient when trying again may work.
pub(crate) fn pg_error(db: &str, e: sqlx::Error) -> StoreError {
    let kind = match &e {
        sqlx::Error::Io(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::Protocol(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::WorkerCrashed => DbErrorKind::Transient,
        sqlx::Error::Database(d) => {
            let code = d.code().unwrap_or_default();
            if code == "23505" {
                DbErrorKind::Unique
            } else if code.starts_with("08")
                || ["57P01", "57P02", "57P03", "40001", "40P01", "53300"].contains(&&*code)
            {
                DbErrorKind::Transient
            } else {
                DbErrorKind::Other
            }
        }
        _ => DbErrorKind::Other,
    };
    StoreError::Db {
        db: db.to_owned(),
        message: e.to_string(),
        kind,
    }
}

#[cfg(test)]
mod tests {
    use super::sqlite_params;

    #[test]
    fn dollar_parameters_become_numbered_question_marks() {
        assert_eq!(
            sqlite_params("SELECT $2, $10 FROM t WHERE a = $1 AND b = '$'"),
            "SELECT ?2, ?10 FROM t WHERE a = ?1 AND b = '$'"
        );
    }
}
