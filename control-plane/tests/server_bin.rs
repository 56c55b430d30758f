//! The `airlock-server` binary as an operator runs it, on both backends: first start prints its
//! addresses, its database (never a password) and a one-time admin token, and a second start on
//! the same data makes none; a policy file edited in place is reloaded, and a bad edit is
//! refused while the running policy stays.

#[path = "support/db.rs"]
mod db;
#[path = "support/server.rs"]
mod server;

use std::{path::Path, process::Command, time::Duration};

use airlock_control_plane::{
    audit::Filter,
    store::{Database, Store},
};
use airlock_proto::v1::{policy_service_client::PolicyServiceClient, GetPolicyRequest};
use db::TestDb;
use server::Server;

/// The `--database` value for `t`, with a password when it is PostgreSQL (the test cluster
/// trusts loopback, so any will do: it must never be printed or logged), and the database as
/// the server should show it.
fn database(t: &TestDb, data: &Path) -> (String, String) {
    match &t.db {
        Database::Sqlite(_) => {
            let path = data.join("airlock.db");
            (
                format!("sqlite://{}", path.display()),
                path.display().to_string(),
            )
        }
        Database::Postgres(url) => (
            url.replacen("postgres@", "postgres:s3cret-pw@", 1),
            url.replacen("postgres@", "postgres:***@", 1),
        ),
    }
}

async fn first_start_prints_what_matters_and_policy_file_changes_reload(t: TestDb) {
    let dir = tempfile::tempdir().unwrap();
    let (db, shown) = database(&t, dir.path());
    let policy = dir.path().join("policy.toml");
    std::fs::write(&policy, "[groups]\noncall = [\"alice\"]\n").unwrap();
    let server = Server::start(dir.path(), &db, &["--policy".as_ref(), policy.as_os_str()]);
    let text = server.printed.clone();
    let token = server
        .printed_word("alk_")
        .unwrap_or_else(|| panic!("no admin token in {text}"));
    assert!(text.contains("admin token"), "{text}");
    assert!(
        text.contains("web UI login (shown once): admin / "),
        "{text}"
    );
    let url = server
        .printed_word("http://127.0.0.1:")
        .unwrap_or_else(|| panic!("no address in {text}"));
    assert!(text.contains(&shown), "{text}");
    assert!(!text.contains("s3cret-pw"), "{text}");

    let ch = tonic::transport::Channel::from_shared(url)
        .unwrap()
        .connect()
        .await
        .unwrap();
    let bearer: tonic::metadata::MetadataValue<_> = format!("Bearer {token}").parse().unwrap();
    let mut client = PolicyServiceClient::with_interceptor(ch, move |mut r: tonic::Request<()>| {
        r.metadata_mut().insert("authorization", bearer.clone());
        Ok(r)
    });
    let status = client.get(GetPolicyRequest {}).await.unwrap().into_inner();
    assert!(status.source.contains("oncall"));

    // A bad edit: refused, visible through the API, the old policy stays.
    std::fs::write(&policy, "[[rule]]\nname = \"x\"\ngroups = [\"ghosts\"]\n").unwrap();
    let mut refused = None;
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let s = client.get(GetPolicyRequest {}).await.unwrap().into_inner();
        if !s.last_error.is_empty() {
            refused = Some(s);
            break;
        }
    }
    let refused = refused.expect("the bad edit was noticed");
    assert!(
        refused.last_error.contains("unknown group \"ghosts\""),
        "{}",
        refused.last_error
    );
    assert!(
        refused.source.contains("oncall"),
        "the running policy stays"
    );

    // A good edit: in force.
    std::fs::write(&policy, "[groups]\ndba = [\"carol\"]\n").unwrap();
    let mut reloaded = false;
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let s = client.get(GetPolicyRequest {}).await.unwrap().into_inner();
        if s.source.contains("dba") {
            reloaded = true;
            break;
        }
    }
    assert!(reloaded);
    let log = server.log.lock().unwrap().clone();
    assert!(log.contains("policy"), "{log}");
    assert!(
        !log.contains("s3cret-pw"),
        "the password was logged:\n{log}"
    );
    drop(server);
}

async fn second_start_mints_no_admin_token_or_password(t: TestDb) {
    let dir = tempfile::tempdir().unwrap();
    let (db, _) = database(&t, dir.path());
    let first = Server::start(dir.path(), &db, &[]);
    let token = first
        .printed_word("alk_")
        .unwrap_or_else(|| panic!("no admin token in {}", first.printed));
    drop(first);

    // The second start serves (it got past every first-start step), prints no new admin token
    // or password, and stores none: the first token is the only admin token, created once,
    // and it still works.
    let second = Server::start(dir.path(), &db, &[]);
    let again = second.printed.clone();
    drop(second);
    assert!(
        !again.contains("alk_"),
        "a second start printed a token:\n{again}"
    );
    assert!(!again.contains("admin token"), "{again}");
    assert!(!again.contains("web UI login"), "{again}");
    let store = Store::open(&db.parse().unwrap()).await.unwrap();
    let admin_tokens = store
        .read(|tx| {
            Box::pin(async move {
                let row = tx
                    .row("SELECT COUNT(*) FROM tokens WHERE scope = 'admin'", &[])
                    .await?;
                row.map_or(Ok(0), |r| r.int(0))
            })
        })
        .await
        .unwrap();
    assert_eq!(admin_tokens, 1, "one admin token in the database");
    let created = store
        .audit_query(&Filter {
            action: Some("token.created".into()),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(created.len(), 1, "{created:?}");
    assert!(store.principal(&token).await.unwrap().is_some());
}

async fn readyz_fails_when_the_database_is_unusable_and_does_not_say_why(t: TestDb) {
    let dir = tempfile::tempdir().unwrap();
    let (db, shown) = database(&t, dir.path());
    let server = Server::start(dir.path(), &db, &[]);
    let url = format!("{}readyz", server.http_url());
    let ready = reqwest::get(&url).await.unwrap();
    assert_eq!(ready.status(), reqwest::StatusCode::OK);
    assert_eq!(ready.text().await.unwrap(), "ready\n");

    match &t.db {
        // The database is damaged under the running server, as a failing disk or a stray
        // write would: the file, its write-ahead log and its shared-memory index are
        // overwritten.
        Database::Sqlite(_) => {
            let file = dir.path().join("airlock.db");
            for suffix in ["", "-wal", "-shm"] {
                let path = format!("{}{suffix}", file.display());
                let len = std::fs::metadata(&path).unwrap().len().max(4096);
                let mut file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
                std::io::Write::write_all(&mut file, &vec![0xff; len as usize]).unwrap();
            }
        }
        // The database stops taking connections and its sessions are ended, as when an
        // administrator shuts it or the server is gone.
        Database::Postgres(url) => {
            use sqlx::{Connection, Executor};
            let name = url.rsplit('/').next().unwrap();
            let admin = url.replacen(&format!("/{name}"), "/postgres", 1);
            let mut conn = sqlx::PgConnection::connect(&admin).await.unwrap();
            conn.execute(
                format!(
                    "ALTER DATABASE {name} ALLOW_CONNECTIONS false; \
                 SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}'"
                )
                .as_str(),
            )
            .await
            .unwrap();
        }
    }

    let answer = reqwest::get(&url).await.unwrap();
    let status = answer.status();
    let body = answer.text().await.unwrap();
    assert_eq!(status, reqwest::StatusCode::SERVICE_UNAVAILABLE, "{body}");
    // A probe answer for anyone who can reach the port: no paths, no database errors.
    assert_eq!(body, "database not usable\n");
    // The operator finds the detail in the log.
    let mut logged = String::new();
    for _ in 0..50 {
        logged = server.log.lock().unwrap().clone();
        if logged.contains("readiness") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let line = logged
        .lines()
        .find(|l| l.contains("readiness"))
        .unwrap_or_else(|| panic!("no readiness failure in the log:\n{logged}"));
    assert!(line.contains(&shown), "{line}");
    assert!(
        !logged.contains("s3cret-pw"),
        "the password was logged:\n{logged}"
    );
}

/// A database URL that does not work is refused at start, naming the database without its
/// password.
#[test]
fn a_bad_database_is_refused_without_showing_the_password() {
    let run = |url: &str| {
        Command::new(env!("CARGO_BIN_EXE_airlock-server"))
            .args(["tokens", "revoke", "nobody", "--database", url])
            .output()
            .unwrap()
    };
    let unreachable = run("postgres://airlock:hunter2-secret@127.0.0.1:9/airlock");
    assert!(!unreachable.status.success());
    let err = String::from_utf8_lossy(&unreachable.stderr);
    assert!(
        err.contains("postgres://airlock:***@127.0.0.1:9/airlock"),
        "{err}"
    );
    assert!(!err.contains("hunter2"), "{err}");
    let garbage = run("mysql://root:hunter2@db/airlock");
    assert_eq!(garbage.status.code(), Some(2), "a usage error");
    let err = String::from_utf8_lossy(&garbage.stderr);
    assert!(
        err.contains("use sqlite:///path/airlock.db or postgres://"),
        "{err}"
    );
    assert!(!err.contains("hunter2"), "{err}");
}

both!(
    first_start_prints_what_matters_and_policy_file_changes_reload,
    second_start_mints_no_admin_token_or_password,
    readyz_fails_when_the_database_is_unusable_and_does_not_say_why,
);
