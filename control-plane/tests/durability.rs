//! Durability on a real SQLite file: a restart keeps pending requests and delivers a later
//! decision; the audit trail catches a record changed, removed, reordered or cut off the end.

use std::{path::Path, time::Duration};

use airlock_agent::decider::Decider;
use airlock_control_plane::{
    audit::Tamper, auth::Scope, policy::Policy, store::Store, ControlPlane,
};
use airlock_proto::v1::{
    approval_service_client::ApprovalServiceClient, ActionRequest, DecideRequest,
    GetRequestRequest, Hello, RequestState, Verdict,
};

fn request(id: &str) -> ActionRequest {
    ActionRequest {
        request_id: id.into(),
        deadline_unix_ms: i64::MAX,
        ..Default::default()
    }
}

async fn serve(db: &Path, port: u16) -> tokio::sync::oneshot::Sender<()> {
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .unwrap();
    let store = Store::open(db).unwrap();
    if !store.has_admin_token().unwrap() {
        let agent = store.create_token("h1", Scope::Agent).unwrap();
        std::fs::write(db.with_extension("agent"), agent).unwrap();
        let alice = store.create_token("alice", Scope::Approve).unwrap();
        std::fs::write(db.with_extension("alice"), alice).unwrap();
        store.create_token("admin", Scope::Admin).unwrap();
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
    tx
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

#[tokio::test]
async fn restart_keeps_pending_and_delivers_later_decision() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("airlock.db");
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let url = format!("http://127.0.0.1:{port}");
    let stop = serve(&db, port).await;
    let agent_token = std::fs::read_to_string(db.with_extension("agent")).unwrap();
    let alice = std::fs::read_to_string(db.with_extension("alice")).unwrap();
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

    // Stop the server with the request pending, then start it again on the same file.
    stop.send(()).unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let _stop = serve(&db, port).await;
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

/// A database with five audit records (three requests, two decisions).
fn populated(dir: &Path) -> std::path::PathBuf {
    let db = dir.join("airlock.db");
    let s = Store::open(&db).unwrap();
    for id in ["a", "b", "c"] {
        let host = Hello {
            host_id: "h".into(),
            hostname: "host".into(),
            ..Default::default()
        };
        s.receive(
            &host,
            &Policy::default().route("", &Default::default(), ""),
            request(id),
        )
        .unwrap();
    }
    s.vote("a", "alice", Verdict::Allow, "ok", 0).unwrap();
    s.vote("b", "bob", Verdict::Deny, "no", 0).unwrap();
    assert_eq!(s.verify_audit().unwrap(), 5);
    drop(s);
    db
}

fn tamper(db: &Path, sql: &str) -> Result<i64, Tamper> {
    rusqlite_exec(db, sql);
    Store::open(db).unwrap().verify_audit()
}

/// Edits the database behind the server's back, as an attacker with file access would.
fn rusqlite_exec(db: &Path, sql: &str) {
    let conn = rusqlite::Connection::open(db).unwrap();
    conn.execute_batch(sql).unwrap();
}

#[test]
fn audit_catches_changed_record() {
    let dir = tempfile::tempdir().unwrap();
    let db = populated(dir.path());
    let err = tamper(
        &db,
        "UPDATE audit SET payload = '{\"reason\":\"yes\"}' WHERE seq = 5",
    )
    .unwrap_err();
    assert_eq!(err, Tamper::Changed { seq: 5 });
}

#[test]
fn audit_catches_removed_record() {
    let dir = tempfile::tempdir().unwrap();
    let db = populated(dir.path());
    let err = tamper(&db, "DELETE FROM audit WHERE seq = 3").unwrap_err();
    assert_eq!(err, Tamper::Removed { seq: 3 });
}

#[test]
fn audit_catches_reordered_records() {
    let dir = tempfile::tempdir().unwrap();
    let db = populated(dir.path());
    let err = tamper(
        &db,
        "UPDATE audit SET seq = 100 WHERE seq = 2; UPDATE audit SET seq = 2 WHERE seq = 3; UPDATE audit SET seq = 3 WHERE seq = 100",
    )
    .unwrap_err();
    assert_eq!(err, Tamper::Removed { seq: 2 });
}

#[test]
fn audit_catches_records_cut_off_the_end() {
    let dir = tempfile::tempdir().unwrap();
    let db = populated(dir.path());
    let err = tamper(&db, "DELETE FROM audit WHERE seq >= 4").unwrap_err();
    assert_eq!(
        err,
        Tamper::Truncated {
            last: 3,
            checkpoint: 5
        }
    );
}

#[test]
fn airlockctl_audit_verify_reports_first_bad_record_and_exit_code() {
    let dir = tempfile::tempdir().unwrap();
    let db = populated(dir.path());
    let ok = std::process::Command::new(env!("CARGO_BIN_EXE_airlockctl"))
        .args(["audit", "verify", "--db"])
        .arg(&db)
        .output()
        .unwrap();
    assert!(ok.status.success());
    assert!(
        String::from_utf8_lossy(&ok.stdout).contains("5 records"),
        "{ok:?}"
    );
    rusqlite_exec(&db, "UPDATE audit SET actor = 'mallory' WHERE seq = 4");
    let bad = std::process::Command::new(env!("CARGO_BIN_EXE_airlockctl"))
        .args(["audit", "verify", "--db"])
        .arg(&db)
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(5));
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("audit record 4 was changed"),
        "{bad:?}"
    );
}
