//! Agent enrolment over real sockets, driven by the agent's own enrolment code: a one-time
//! enrollment token becomes an agent credential that opens the agent stream; the token works
//! once, expires, is never a bearer token, honours its host binding, and leaves an audit trail
//! that verifies and never contains it.

#[path = "support/db.rs"]
mod db;

#[path = "support/session.rs"]
mod session;

use std::{os::unix::fs::PermissionsExt, path::Path, time::Duration};

use airlock_agent::{
    config::AgentSection,
    decider::{Connection, Decider},
    enroll::{self as agent_enroll, Enrolment},
};
use airlock_control_plane::{
    audit::Filter,
    auth::enroll::{self, DEFAULT_TTL},
    auth::Scope,
    store::{Database, Store},
    ControlPlane,
};
use airlock_proto::v1::{
    approval_service_client::ApprovalServiceClient, Hello, ListRequestsRequest,
};
use db::TestDb;
use tonic::Code;

struct Server {
    url: String,
    store: Store,
    admin: String,
    _stop: tokio::sync::oneshot::Sender<()>,
}

async fn start(t: &TestDb) -> Server {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let store = t.open().await;
    let admin = store
        .create_token("root-admin", Scope::Admin)
        .await
        .unwrap();
    let plane = ControlPlane::new(store);
    let store = plane.store.clone();
    tokio::spawn(async move {
        plane
            .serve(listener, async {
                let _ = rx.await;
            })
            .await
            .unwrap();
    });
    Server {
        url,
        store,
        admin,
        _stop: tx,
    }
}

fn hello(host: &str) -> Hello {
    Hello {
        host_id: host.into(),
        hostname: format!("{host}.example"),
        labels: Default::default(),
        version: "test".into(),
    }
}

fn conn(url: &str) -> Connection {
    Connection {
        url: url.to_owned(),
        token: None,
        tls: None,
    }
}

fn settings(dir: &Path) -> AgentSection {
    AgentSection {
        token_file: Some(dir.join("etc/airlock/agent.token")),
        enroll_token_file: Some(dir.join("enroll.token")),
        ..Default::default()
    }
}

async fn session_opens(url: &str, host: &str, token: &str, wait: Duration) -> bool {
    Decider::spawn(url.to_owned(), hello(host), Some(token.to_owned()))
        .wait_connected(wait)
        .await
}

async fn token_count(store: &Store) -> i64 {
    store
        .read(|tx| {
            Box::pin(async move {
                let row = tx.row("SELECT COUNT(*) FROM tokens", &[]).await?;
                row.map_or(Ok(0), |r| r.int(0))
            })
        })
        .await
        .unwrap()
}

async fn enrolment_writes_a_working_credential_once_and_later_starts_skip_it(t: TestDb) {
    let s = start(&t).await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = settings(dir.path());
    let (cred_file, enroll_file) = (
        cfg.token_file.clone().unwrap(),
        cfg.enroll_token_file.clone().unwrap(),
    );
    let token = enroll::create(&s.store, "web-1", None, DEFAULT_TTL, "server")
        .await
        .unwrap()
        .token;
    std::fs::write(&enroll_file, format!("{token}\n")).unwrap();

    let done = agent_enroll::ensure_credential(&cfg, &conn(&s.url), &hello("host-1"))
        .await
        .unwrap();
    assert_eq!(
        done,
        Enrolment::Enrolled {
            host_id: "host-1".into()
        }
    );
    let mode = std::fs::metadata(&cred_file).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the credential is for root's eyes only");
    assert!(
        !enroll_file.exists(),
        "the spent enrollment token is deleted"
    );
    let credential = std::fs::read_to_string(&cred_file)
        .unwrap()
        .trim()
        .to_owned();
    assert!(credential.starts_with("alk_"), "{credential}");
    assert!(
        session_opens(&s.url, "host-1", &credential, Duration::from_secs(5)).await,
        "the credential opens the agent stream"
    );
    let elsewhere = session::refusal_at(&s.url, Some(&credential), hello("host-2")).await;
    assert_eq!(elsewhere.code(), Code::PermissionDenied, "{elsewhere:?}");
    assert_eq!(
        elsewhere.message(),
        "this credential belongs to agent \"host-1\", not \"host-2\"",
        "and speaks for its own host only"
    );

    // A second start: the credential is there, so the enrollment token file is not even read.
    std::fs::write(&enroll_file, "alkenroll_never_read\n").unwrap();
    let again = agent_enroll::ensure_credential(&cfg, &conn(&s.url), &hello("host-1"))
        .await
        .unwrap();
    assert_eq!(again, Enrolment::Skipped);
    assert!(enroll_file.exists());
    assert_eq!(
        std::fs::read_to_string(&cred_file).unwrap().trim(),
        credential
    );

    // The spent token is refused, with a reason, and makes nothing.
    let before = token_count(&s.store).await;
    let twice = agent_enroll::request(&conn(&s.url), &token, &hello("host-2"))
        .await
        .unwrap_err();
    assert_eq!(twice.code(), Code::Unauthenticated);
    assert!(twice.message().contains("already used"), "{twice:?}");
    assert_eq!(token_count(&s.store).await, before, "nothing created");

    // What the agent reports when the server refuses: the file and the server's reason.
    std::fs::remove_file(&cred_file).unwrap();
    std::fs::write(&enroll_file, &token).unwrap();
    let err = agent_enroll::ensure_credential(&cfg, &conn(&s.url), &hello("host-1"))
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("enroll.token"), "{err}");
    assert!(err.contains("already used"), "{err}");
    assert!(
        !cred_file.exists(),
        "no credential from a refused enrolment"
    );
    assert!(
        enroll_file.exists(),
        "a refused token file is left for the operator"
    );
}

async fn expired_and_unknown_tokens_are_refused(t: TestDb) {
    let s = start(&t).await;
    let short = enroll::create(&s.store, "short", None, Duration::from_millis(1), "server")
        .await
        .unwrap()
        .token;
    tokio::time::sleep(Duration::from_millis(20)).await;
    let expired = agent_enroll::request(&conn(&s.url), &short, &hello("h"))
        .await
        .unwrap_err();
    assert_eq!(expired.code(), Code::Unauthenticated);
    assert!(expired.message().contains("expired"), "{expired:?}");

    let good = enroll::create(&s.store, "x", None, DEFAULT_TTL, "server")
        .await
        .unwrap()
        .token;
    let mut forged = good.clone();
    forged.pop();
    forged.push(if good.ends_with('0') { '1' } else { '0' });
    for bad in [forged.as_str(), "alkenroll_nope_x", "garbage", ""] {
        let e = agent_enroll::request(&conn(&s.url), bad, &hello("h"))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::Unauthenticated, "{bad}: {e:?}");
        assert_eq!(e.message(), "unknown enrollment token");
    }
    // None of that spent the real one.
    agent_enroll::request(&conn(&s.url), &good, &hello("h"))
        .await
        .unwrap();
}

async fn enrollment_tokens_are_never_bearer_tokens(t: TestDb) {
    let s = start(&t).await;
    let token = enroll::create(&s.store, "x", Some("host-a"), DEFAULT_TTL, "server")
        .await
        .unwrap()
        .token;
    let on_stream = session::refusal_at(&s.url, Some(&token), hello("host-a")).await;
    assert_eq!(on_stream.code(), Code::Unauthenticated, "{on_stream:?}");
    assert!(
        on_stream
            .message()
            .starts_with("this is an enrollment token"),
        "not on the agent stream: {on_stream:?}"
    );
    let ch = tonic::transport::Channel::from_shared(s.url.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let bearer: tonic::metadata::MetadataValue<_> = format!("Bearer {token}").parse().unwrap();
    let mut approvals =
        ApprovalServiceClient::with_interceptor(ch, move |mut r: tonic::Request<()>| {
            r.metadata_mut().insert("authorization", bearer.clone());
            Ok(r)
        });
    let refused = approvals
        .list(ListRequestsRequest::default())
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated);
    assert!(
        refused.message().contains("enrollment token"),
        "says what it is: {refused:?}"
    );
    // Refusals did not spend it.
    agent_enroll::request(&conn(&s.url), &token, &hello("host-a"))
        .await
        .unwrap();
}

async fn host_binding_and_re_enrolment(t: TestDb) {
    let s = start(&t).await;
    let bound = enroll::create(&s.store, "for-a", Some("host-a"), DEFAULT_TTL, "server")
        .await
        .unwrap()
        .token;
    let other = agent_enroll::request(&conn(&s.url), &bound, &hello("host-b"))
        .await
        .unwrap_err();
    assert_eq!(other.code(), Code::PermissionDenied);
    assert!(other.message().contains("host-a"), "{other:?}");
    let first = agent_enroll::request(&conn(&s.url), &bound, &hello("host-a"))
        .await
        .unwrap();
    assert_eq!(first.host_id, "host-a");

    // An unbound token cannot take over an enrolled host...
    let unbound = enroll::create(&s.store, "any", None, DEFAULT_TTL, "server")
        .await
        .unwrap()
        .token;
    let takeover = agent_enroll::request(&conn(&s.url), &unbound, &hello("host-a"))
        .await
        .unwrap_err();
    assert_eq!(takeover.code(), Code::PermissionDenied);
    assert!(takeover.message().contains("--host host-a"), "{takeover:?}");
    // ...a token bound to it replaces the credential, and the old one stops working.
    let rebind = enroll::create(&s.store, "again", Some("host-a"), DEFAULT_TTL, "server")
        .await
        .unwrap()
        .token;
    let second = agent_enroll::request(&conn(&s.url), &rebind, &hello("host-a"))
        .await
        .unwrap();
    let replaced = session::refusal_at(&s.url, Some(&first.agent_token), hello("host-a")).await;
    assert_eq!(replaced.code(), Code::Unauthenticated, "{replaced:?}");
    assert_eq!(
        replaced.message(),
        "unknown or revoked token",
        "the replaced credential is revoked"
    );
    assert!(
        session_opens(
            &s.url,
            "host-a",
            &second.agent_token,
            Duration::from_secs(5)
        )
        .await
    );

    // Revoking the host does not free its id for any spare token: a host whose credential an
    // admin revoked (lost, compromised, retired) comes back only through a token bound to it.
    assert!(s.store.revoke_token("host-a").await.unwrap());
    let spare = enroll::create(&s.store, "spare", None, DEFAULT_TTL, "server")
        .await
        .unwrap()
        .token;
    let takeover = agent_enroll::request(&conn(&s.url), &spare, &hello("host-a"))
        .await
        .unwrap_err();
    assert_eq!(takeover.code(), Code::PermissionDenied, "{takeover:?}");
    assert!(
        takeover.message().contains("revoked") && takeover.message().contains("--host host-a"),
        "{takeover:?}"
    );
    // The refused attempt did not spend the spare token: it still enrols a new host.
    agent_enroll::request(&conn(&s.url), &spare, &hello("host-c"))
        .await
        .unwrap();

    // The audit trail records it all, verifies, and never holds a token's text.
    s.store.verify_audit().await.unwrap();
    let enrolled = s
        .store
        .audit_query(&Filter {
            action: Some("agent.enrolled".into()),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(enrolled.len(), 3);
    assert!(enrolled[..2].iter().all(|r| r.actor == "host-a"));
    assert!(
        enrolled[1].payload.contains("\"replaced\":true"),
        "{enrolled:?}"
    );
    let revoked = s
        .store
        .audit_query(&Filter {
            action: Some("token.revoked".into()),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(
        revoked.len(),
        2,
        "the replaced credential's revocation, then the admin's"
    );
    let all = s.store.audit_query(&Filter::default()).await.unwrap();
    for secret in [
        &bound,
        &unbound,
        &rebind,
        &spare,
        &first.agent_token,
        &second.agent_token,
    ] {
        // The part after the id is the secret; the id alone may name a token.
        let tail = secret.rsplit('_').next().unwrap();
        for r in &all {
            assert!(
                !r.payload.contains(tail) && !r.actor.contains(tail),
                "{} leaks a token: {}",
                r.action,
                r.payload
            );
        }
    }
}

async fn airlockctl_and_airlock_server_make_enrollment_tokens(t: TestDb) {
    let s = start(&t).await;
    // Async: the server answers on this test's runtime, which a blocking wait would stall.
    let ctl = |args: &[&str]| {
        tokio::process::Command::new(env!("CARGO_BIN_EXE_airlockctl"))
            .args(["--server", &s.url, "--token", &s.admin, "tokens", "create"])
            .args(args)
            .output()
    };
    let out = ctl(&[
        "--scope",
        "enroll",
        "--name",
        "rack-7",
        "--host",
        "host-c",
        "--ttl-hours",
        "2",
    ])
    .await
    .unwrap();
    assert!(out.status.success(), "{out:?}");
    let token = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    assert!(token.starts_with("alkenroll_"), "{token}");
    let wrong = agent_enroll::request(&conn(&s.url), &token, &hello("host-d"))
        .await
        .unwrap_err();
    assert_eq!(wrong.code(), Code::PermissionDenied);
    agent_enroll::request(&conn(&s.url), &token, &hello("host-c"))
        .await
        .unwrap();
    let misuse = ctl(&["--scope", "read", "--name", "r", "--ttl-hours", "2"])
        .await
        .unwrap();
    assert!(!misuse.status.success(), "ttl is for enroll only");

    let dir = tempfile::tempdir().unwrap();
    let database = match &t.db {
        Database::Sqlite(_) => format!("sqlite://{}/airlock.db", dir.path().display()),
        Database::Postgres(url) => url.clone(),
    };
    let server = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_airlock-server"))
            .arg("--data-dir")
            .arg(dir.path())
            .args(["--database", &database])
            .args(["tokens", "create"])
            .args(args)
            .output()
            .unwrap()
    };
    let out = server(&["--scope", "enroll", "--name", "web", "--ttl-hours", "1"]);
    assert!(out.status.success(), "{out:?}");
    let printed = String::from_utf8(out.stdout).unwrap();
    assert!(printed.trim().starts_with("alkenroll_"), "{printed}");
    assert_eq!(printed.lines().count(), 1, "only the token on stdout");
    let misuse = server(&["--scope", "agent", "--name", "h", "--host", "h"]);
    assert!(!misuse.status.success());
    assert!(
        String::from_utf8_lossy(&misuse.stderr).contains("--scope enroll"),
        "{misuse:?}"
    );
}

both!(
    enrolment_writes_a_working_credential_once_and_later_starts_skip_it,
    expired_and_unknown_tokens_are_refused,
    enrollment_tokens_are_never_bearer_tokens,
    host_binding_and_re_enrolment,
    airlockctl_and_airlock_server_make_enrollment_tokens,
);
