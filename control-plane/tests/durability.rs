//! Durability on both backends: a restart keeps pending requests and delivers a later
//! decision; the audit trail catches a record changed, removed or reordered behind the
//! server's back (and, with SQLite's checkpoint file, records cut off the end).

#[path = "support/db.rs"]
mod db;

use std::time::Duration;

use airlock_agent::decider::Decider;
use airlock_control_plane::{
    audit::Tamper,
    auth::Scope,
    config::Limits,
    policy::Policy,
    store::{trail::verify_database, Database, Store},
    ControlPlane,
};
use airlock_proto::v1::{
    approval_service_client::ApprovalServiceClient, ActionRequest, DecideRequest,
    GetRequestRequest, Hello, RequestState, Verdict,
};
use db::TestDb;

fn request(id: &str) -> ActionRequest {
    ActionRequest {
        request_id: id.into(),
        deadline_unix_ms: i64::MAX,
        ..Default::default()
    }
}

/// Serves `db` on `port`; the first time, makes tokens for agent h1 and alice.
async fn serve(t: &mut TestDb, port: u16) -> (tokio::sync::oneshot::Sender<()>, String, String) {
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .unwrap();
    let store = t.open().await;
    let dir = t.dir();
    if !store.has_admin_token().await.unwrap() {
        let agent = store.create_token("h1", Scope::Agent).await.unwrap();
        std::fs::write(dir.join("agent"), agent).unwrap();
        let alice = store.create_token("alice", Scope::Approve).await.unwrap();
        std::fs::write(dir.join("alice"), alice).unwrap();
        store.create_token("admin", Scope::Admin).await.unwrap();
    }
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        ControlPlane::new(store)
            .serve(listener, async {
                let _ = rx.await;
            })
            .await
            .unwrap();
    });
    let read = |f: &str| std::fs::read_to_string(dir.join(f)).unwrap();
    (tx, read("agent"), read("alice"))
}

async fn client(
    url: &str,
    token: &str,
) -> ApprovalServiceClient<
    tonic::service::interceptor::InterceptedService<
        tonic::transport::Channel,
        impl tonic::service::Interceptor,
    >,
> {
    let ch = tonic::transport::Channel::from_shared(url.to_owned())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let value: tonic::metadata::MetadataValue<_> = format!("Bearer {token}").parse().unwrap();
    ApprovalServiceClient::with_interceptor(ch, move |mut req: tonic::Request<()>| {
        req.metadata_mut().insert("authorization", value.clone());
        Ok(req)
    })
}

async fn restart_keeps_pending_and_delivers_later_decision(mut t: TestDb) {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let url = format!("http://127.0.0.1:{port}");
    let (stop, agent_token, alice) = serve(&mut t, port).await;
    let agent = Decider::spawn(
        url.clone(),
        Hello {
            host_id: "h1".into(),
            hostname: "h1".into(),
            ..Default::default()
        },
        Some(agent_token),
    );
    assert!(agent.wait_connected(Duration::from_secs(5)).await);
    let answer = agent.ask(request("pending-1"));
    let mut c = client(&url, &alice).await;
    for _ in 0..100 {
        if c.get(GetRequestRequest {
            request_id: "pending-1".into(),
        })
        .await
        .is_ok()
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Stop the server with the request pending, then start it again on the same database.
    stop.send(()).unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let _stop = serve(&mut t, port).await;
    let mut c = client(&url, &alice).await;
    let held = c
        .get(GetRequestRequest {
            request_id: "pending-1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        held.state(),
        RequestState::Pending,
        "still pending after the restart"
    );
    assert!(
        agent.wait_connected(Duration::from_secs(10)).await,
        "agent reconnected"
    );
    // Give the agent's resend a moment, then decide.
    tokio::time::sleep(Duration::from_millis(300)).await;
    c.decide(DecideRequest {
        request_id: "pending-1".into(),
        verdict: Verdict::Allow as i32,
        reason: "after restart".into(),
        approver: String::new(),
        grant_minutes: 0,
    })
    .await
    .unwrap();
    let d = tokio::time::timeout(Duration::from_secs(5), answer)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (d.request_id.as_str(), d.verdict),
        ("pending-1", Verdict::Allow as i32)
    );
}

/// Five audit records (three requests, two decisions).
async fn populate(t: &TestDb) {
    let s = t.open().await;
    for id in ["a", "b", "c"] {
        let host = Hello {
            host_id: "h".into(),
            hostname: "host".into(),
            ..Default::default()
        };
        let route = Policy::default().route("", &Default::default(), "", "");
        s.receive(&host, &route, request(id), &Limits::default())
            .await
            .unwrap();
    }
    s.vote("a", "alice", Verdict::Allow, "ok", 0).await.unwrap();
    s.vote("b", "bob", Verdict::Deny, "no", 0).await.unwrap();
    assert_eq!(s.verify_audit().await.unwrap(), 5);
}

/// Runs `sql` on the database behind the server's back, as someone with access to it would.
async fn behind_the_back(db: &Database, sql: &str) {
    match db {
        Database::Sqlite(path) => {
            let conn = rusqlite::Connection::open(path).unwrap();
            conn.execute_batch(sql).unwrap();
        }
        Database::Postgres(url) => {
            use sqlx::{Connection, Executor};
            let mut conn = sqlx::PgConnection::connect(url).await.unwrap();
            conn.execute(sql).await.unwrap();
        }
    }
}

async fn tamper(t: &TestDb, sql: &str) -> Result<i64, Tamper> {
    populate(t).await;
    behind_the_back(&t.db, sql).await;
    let through_store = Store::open(&t.db).await.unwrap().verify_audit().await;
    let offline = verify_database(&t.db).await;
    assert_eq!(through_store, offline, "both ways of verifying agree");
    offline
}

async fn audit_catches_changed_record(t: TestDb) {
    let err = tamper(
        &t,
        "UPDATE audit SET payload = '{\"reason\":\"yes\"}' WHERE seq = 5",
    )
    .await
    .unwrap_err();
    assert_eq!(err, Tamper::Changed { seq: 5 });
}

async fn audit_catches_removed_record(t: TestDb) {
    let err = tamper(&t, "DELETE FROM audit WHERE seq = 3")
        .await
        .unwrap_err();
    assert_eq!(err, Tamper::Removed { seq: 3 });
}

async fn audit_catches_reordered_records(t: TestDb) {
    let err = tamper(
        &t,
        "UPDATE audit SET seq = 100 WHERE seq = 2; UPDATE audit SET seq = 2 WHERE seq = 3; UPDATE audit SET seq = 3 WHERE seq = 100",
    )
    .await
    .unwrap_err();
    assert_eq!(err, Tamper::Removed { seq: 2 });
}

/// SQLite only: the chain head is also kept in a checkpoint file outside the database, which
/// is what catches a cut. PostgreSQL keeps nothing outside the database; there, its own
/// backups and WAL archive are the record to compare with.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_catches_records_cut_off_the_end_of_a_sqlite_file() {
    let t = TestDb::sqlite();
    let err = tamper(&t, "DELETE FROM audit WHERE seq >= 4")
        .await
        .unwrap_err();
    assert_eq!(
        err,
        Tamper::Truncated {
            last: 3,
            checkpoint: 5
        }
    );
}

/// `DELETE FROM audit WHERE seq >= 4` plus `rm airlock.db.audit-head`: the missing file is an
/// error, not a check skipped, and the server does not make it again over the cut trail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_with_the_checkpoint_file_deleted_is_caught() {
    let t = TestDb::sqlite();
    let Database::Sqlite(path) = &t.db else {
        unreachable!()
    };
    let head = airlock_control_plane::audit::checkpoint_path(path);
    populate(&t).await;
    std::fs::remove_file(&head).unwrap();
    behind_the_back(&t.db, "DELETE FROM audit WHERE seq >= 4").await;
    let err = verify_database(&t.db).await.unwrap_err();
    assert!(
        matches!(&err, Tamper::CheckpointMissing(p) if p.ends_with(".audit-head")),
        "{err:?}"
    );
    // A later write does not re-anchor the cut trail.
    let s = Store::open(&t.db).await.unwrap();
    s.audit_event("server", "test.later", "{}").await.unwrap();
    assert!(
        !head.exists(),
        "the checkpoint file was made again over a cut trail"
    );
    assert!(matches!(
        s.verify_audit().await,
        Err(Tamper::CheckpointMissing(_))
    ));
}

/// Someone with the database and root rewrites a record and recomputes every hash (and the
/// checkpoint file): the chain alone verifies, the signed checkpoint kept elsewhere does not.
async fn airlockctl_verify_checks_a_signed_checkpoint(t: TestDb) {
    use airlock_control_plane::{
        audit::{Filter, Record},
        checkpoint::Signer,
    };
    populate(&t).await;
    let s = Store::open(&t.db).await.unwrap();
    let records = s.audit_query(&Filter::default()).await.unwrap();
    let (r4, r5) = (&records[3], &records[4]);
    let signer = std::sync::Arc::new(Signer::from_hex(&"42".repeat(32)).unwrap());
    let dir = tempfile::tempdir().unwrap();
    let kept = dir.path().join("checkpoints.log");
    // The server's own checkpoint task signs the head and appends it to the file.
    let plane = ControlPlane::new(s.clone());
    let (signing, file) = (signer.clone(), kept.clone());
    let task = tokio::spawn(async move {
        plane
            .sign_checkpoints(signing, Duration::from_millis(50), Some(file))
            .await
    });
    for _ in 0..100 {
        if std::fs::read_to_string(&kept).is_ok_and(|t| t.contains("seq=5 ")) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    task.abort();
    let line = std::fs::read_to_string(&kept).unwrap();
    assert!(line.contains(&format!("seq=5 hash={} ", r5.hash)), "{line}");
    let db_args: Vec<String> = match &t.db {
        Database::Sqlite(path) => vec!["--db".into(), path.display().to_string()],
        Database::Postgres(url) => vec!["--database".into(), url.clone()],
    };
    let verify = |extra: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_airlockctl"))
            .args(["audit", "verify"])
            .args(&db_args)
            .args(extra)
            .output()
            .unwrap()
    };
    let key = signer.public_hex();
    let with_checkpoint = ["--checkpoint", kept.to_str().unwrap(), "--public-key", &key];
    let ok = verify(&with_checkpoint);
    assert!(ok.status.success(), "{ok:?}");

    let forged = Record::next(
        4,
        &r4.hash,
        r5.at_ms,
        &r5.actor,
        &r5.action,
        &r5.request_id,
        "{\"reason\":\"fine\"}",
    );
    behind_the_back(
        &t.db,
        &format!(
            // The checkpoint's own record (seq 6) chained on the old hash: the forger drops it.
            "UPDATE audit SET payload = '{}', digest = '{}', hash = '{}' WHERE seq = 5;
             DELETE FROM audit WHERE seq > 5",
            forged.payload, forged.digest, forged.hash
        ),
    )
    .await;
    if let Database::Sqlite(path) = &t.db {
        airlock_control_plane::audit::write_checkpoint(
            &airlock_control_plane::audit::checkpoint_path(path),
            5,
            &forged.hash,
        )
        .unwrap();
    }
    assert!(
        verify(&[]).status.success(),
        "the rewrite fools the chain alone"
    );
    let caught = verify(&with_checkpoint);
    assert_eq!(caught.status.code(), Some(5), "{caught:?}");
    assert!(
        String::from_utf8_lossy(&caught.stderr).contains("audit record 5 was changed"),
        "{caught:?}"
    );
    let other = Signer::from_hex(&"43".repeat(32)).unwrap().public_hex();
    let wrong_key = verify(&[
        "--checkpoint",
        kept.to_str().unwrap(),
        "--public-key",
        &other,
    ]);
    assert_eq!(wrong_key.status.code(), Some(5), "{wrong_key:?}");
}

async fn airlockctl_audit_verify_reports_first_bad_record_and_exit_code(t: TestDb) {
    populate(&t).await;
    let args: Vec<String> = match &t.db {
        Database::Sqlite(path) => vec!["--db".into(), path.display().to_string()],
        Database::Postgres(url) => vec!["--database".into(), url.clone()],
    };
    let verify = || {
        std::process::Command::new(env!("CARGO_BIN_EXE_airlockctl"))
            .args(["audit", "verify"])
            .args(&args)
            .output()
            .unwrap()
    };
    let ok = verify();
    assert!(ok.status.success(), "{ok:?}");
    assert!(
        String::from_utf8_lossy(&ok.stdout).contains("5 records"),
        "{ok:?}"
    );
    behind_the_back(&t.db, "UPDATE audit SET actor = 'mallory' WHERE seq = 4").await;
    let bad = verify();
    assert_eq!(bad.status.code(), Some(5));
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("audit record 4 was changed"),
        "{bad:?}"
    );
}

/// A policy whose `policy.loaded` record cannot be written (the database refuses it) is not put
/// in force: the running one stays and the refusal is reported with the reason.
async fn a_policy_whose_audit_record_fails_is_not_put_in_force(t: TestDb) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("policy.toml");
    std::fs::write(&path, "[groups]\noncall = [\"alice\"]\n").unwrap();
    let plane = ControlPlane::new(t.open().await);
    plane.load_policy(&path).await.unwrap();
    let refuse = match &t.db {
        Database::Sqlite(_) => {
            "CREATE TRIGGER refuse_policy BEFORE INSERT ON audit WHEN NEW.action = 'policy.loaded'
             BEGIN SELECT RAISE(ABORT, 'injected: audit disk full'); END;"
        }
        Database::Postgres(_) => {
            "CREATE FUNCTION refuse_policy() RETURNS trigger AS $$ BEGIN
               IF NEW.action = 'policy.loaded' THEN RAISE EXCEPTION 'injected: audit disk full';
               END IF; RETURN NEW; END $$ LANGUAGE plpgsql;
             CREATE TRIGGER refuse_policy BEFORE INSERT ON audit FOR EACH ROW
               EXECUTE FUNCTION refuse_policy();"
        }
    };
    behind_the_back(&t.db, refuse).await;
    std::fs::write(&path, "[groups]\noncall = [\"mallory\"]\n").unwrap();
    let err = plane.load_policy(&path).await.unwrap_err();
    assert!(
        err.to_string().contains("not put in force") && err.to_string().contains("injected"),
        "{err}"
    );
    let policy = airlock_control_plane::policy::current(&plane.policy);
    assert_eq!(
        policy.groups.get("oncall"),
        Some(&vec!["alice".to_owned()]),
        "the unrecorded policy was put in force"
    );
    let status = plane.policy_status.lock().unwrap().clone();
    assert!(status.last_error.contains("not put in force"), "{status:?}");
    assert!(!status.source.contains("mallory"), "{status:?}");
    // Nothing else was stored for the other replicas either.
    let stored = plane.store.current_policy().await.unwrap().unwrap();
    assert!(!stored.source.contains("mallory"));
}

both!(
    restart_keeps_pending_and_delivers_later_decision,
    a_policy_whose_audit_record_fails_is_not_put_in_force,
    audit_catches_changed_record,
    audit_catches_removed_record,
    audit_catches_reordered_records,
    airlockctl_audit_verify_reports_first_bad_record_and_exit_code,
    airlockctl_verify_checks_a_signed_checkpoint,
);
