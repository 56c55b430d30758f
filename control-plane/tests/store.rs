//! The store on both backends: requests and their lifecycle, votes, grants, history, tokens,
//! accounts, sessions, enrolment, the policy, the audit trail, the change feed and migrations.

#[path = "support/db.rs"]
mod db;

use airlock_control_plane::{
    auth::{
        accounts::{self, AccountError},
        enroll::{self, EnrollError, DEFAULT_TTL, MAX_TTL},
        sessions,
    },
    config::Limits,
    credential::Scope,
    store::{requests::History, sql::Cell, Store, StoreError},
    types::{now_ms, Route},
};
use airlock_proto::v1::{
    action_request::Action, ActionRequest, Hello, ListRequestsRequest, RequestState, Verdict,
};
use db::TestDb;

fn host() -> Hello {
    Hello {
        host_id: "h".into(),
        hostname: "host".into(),
        ..Default::default()
    }
}

fn route(quorum: u32) -> Route {
    Route {
        quorum,
        ..Default::default()
    }
}

fn req(id: &str, deadline: i64) -> ActionRequest {
    ActionRequest {
        request_id: id.into(),
        deadline_unix_ms: deadline,
        ..Default::default()
    }
}

async fn receive(s: &Store, id: &str) {
    s.receive(&host(), &route(1), req(id, i64::MAX), &Limits::default())
        .await
        .unwrap();
}

async fn resent_request_is_the_same_request(t: TestDb) {
    let s = t.open().await;
    let l = Limits::default();
    let (_, new) = s
        .receive(&host(), &route(1), req("a", i64::MAX), &l)
        .await
        .unwrap();
    assert!(new);
    let (again, new) = s
        .receive(&host(), &route(1), req("a", i64::MAX), &l)
        .await
        .unwrap();
    assert!(!new);
    assert_eq!(again.request.unwrap().request_id, "a");
    let all = s
        .list(&ListRequestsRequest::default(), 1000)
        .await
        .unwrap()
        .0;
    assert_eq!(all.len(), 1);
    let mut other = host();
    other.host_id = "someone-else".into();
    assert!(matches!(
        s.receive(&other, &route(1), req("a", i64::MAX), &l).await,
        Err(StoreError::IdConflict { .. })
    ));
    let mut changed = req("a", i64::MAX);
    changed.action = Some(Action::Connect(airlock_proto::v1::ConnectAction {
        address: "10.0.0.9".into(),
        port: 5432,
        ..Default::default()
    }));
    assert!(matches!(
        s.receive(&host(), &route(1), changed, &l).await,
        Err(StoreError::IdConflict { .. })
    ));
}

async fn quorum_of_two_distinct_people_and_deny_wins(t: TestDb) {
    let s = t.open().await;
    let l = Limits::default();
    s.receive(&host(), &route(2), req("q", i64::MAX), &l)
        .await
        .unwrap();
    let (h, decided) = s.vote("q", "alice", Verdict::Allow, "", 0).await.unwrap();
    assert!(!decided);
    assert_eq!(h.state(), RequestState::Pending);
    let again = s
        .vote("q", "Alice@example.com", Verdict::Allow, "", 0)
        .await
        .unwrap_err();
    assert!(matches!(again, StoreError::AlreadyVoted { .. }), "{again}");
    let (h, decided) = s.vote("q", "bob", Verdict::Allow, "ok", 0).await.unwrap();
    assert!(decided);
    assert_eq!(h.state(), RequestState::Approved);
    assert_eq!(h.decided_by, "alice, bob");
    s.receive(&host(), &route(2), req("d", i64::MAX), &l)
        .await
        .unwrap();
    s.vote("d", "alice", Verdict::Allow, "", 0).await.unwrap();
    let (h, decided) = s.vote("d", "bob", Verdict::Deny, "no", 0).await.unwrap();
    assert!(decided);
    assert_eq!(
        (h.state(), h.decided_by.as_str()),
        (RequestState::Denied, "bob")
    );
    assert_eq!(s.verify_audit().await.unwrap(), 6);
}

async fn changes_reach_subscribers_in_order(t: TestDb) {
    let s = t.open().await;
    let mut sub = s.subscribe();
    for i in 0..50 {
        receive(&s, &format!("r{i}")).await;
    }
    for i in 0..50 {
        let c = sub.next().await.unwrap();
        assert_eq!(c.request_id, format!("r{i}"));
        assert_eq!(c.action, "request.received");
    }
}

/// A subscriber that does not read while thousands of changes go by (far more than the feed
/// buffers) still gets every one, in order, from the table.
async fn a_lagging_subscriber_catches_up_from_the_table(t: TestDb) {
    let s = t.open().await;
    let mut sub = s.subscribe();
    let start = sub.position();
    let n = 6000;
    let mut pending = Vec::new();
    for i in 0..n {
        let s = s.clone();
        pending.push(tokio::spawn(async move {
            s.audit_event("test", "test.event", &format!("{{\"i\":{i}}}"))
                .await
                .unwrap()
        }));
    }
    for p in pending {
        p.await.unwrap();
    }
    let mut seen = 0;
    let mut last = start;
    while seen < n {
        let c = sub.next().await.unwrap();
        assert_eq!(c.seq, last + 1, "no gap, no repeat");
        last = c.seq;
        seen += 1;
    }
    assert_eq!(s.verify_audit().await.unwrap(), n);
}

async fn list_filters_and_pages(t: TestDb) {
    let s = t.open().await;
    for i in 0..5 {
        let mut r = req(&format!("p{i}"), i64::MAX);
        r.process = Some(airlock_proto::v1::ProcessContext {
            user: if i % 2 == 0 {
                "ci".into()
            } else {
                "bot".into()
            },
            ..Default::default()
        });
        s.receive(&host(), &route(1), r, &Limits::default())
            .await
            .unwrap();
    }
    let q = |page: &str| ListRequestsRequest {
        limit: 2,
        page_token: page.into(),
        ..Default::default()
    };
    let (p1, t1) = s.list(&q(""), 1000).await.unwrap();
    let (p2, t2) = s.list(&q(&t1), 1000).await.unwrap();
    let (p3, t3) = s.list(&q(&t2), 1000).await.unwrap();
    let ids: Vec<String> = [p1, p2, p3]
        .concat()
        .into_iter()
        .map(|h| h.request.unwrap().request_id)
        .collect();
    assert_eq!(ids, ["p4", "p3", "p2", "p1", "p0"]);
    assert!(t3.is_empty(), "last page");
    let by_ci = ListRequestsRequest {
        account: "ci".into(),
        ..Default::default()
    };
    assert_eq!(s.list(&by_ci, 1000).await.unwrap().0.len(), 3);
    let bad = s.list(&q("garbage"), 1000).await.unwrap_err();
    assert!(matches!(bad, StoreError::BadPageToken(_)), "{bad}");
    // A limit over the server's is brought down to it.
    let huge = ListRequestsRequest {
        limit: 1_000_000,
        ..Default::default()
    };
    let (page, next) = s.list(&huge, 3).await.unwrap();
    assert_eq!((page.len(), next.is_empty()), (3, false));
}

async fn history_filters_run_in_sql_with_pages(t: TestDb) {
    let s = t.open().await;
    for i in 0..30 {
        let mut r = req(&format!("h{i}"), i64::MAX);
        r.rule = if i % 3 == 0 {
            "kubectl".into()
        } else {
            "psql".into()
        };
        let mut h = host();
        h.hostname = format!("web-{}", i % 2);
        s.receive(&h, &route(1), r, &Limits::default())
            .await
            .unwrap();
    }
    s.vote("h3", "carol", Verdict::Deny, "no", 0).await.unwrap();
    s.vote("h6", "carol", Verdict::Allow, "", 0).await.unwrap();
    let f = History {
        rule: "kubectl".into(),
        host: "web-0".into(),
        ..Default::default()
    };
    let (page, next) = s.history(&f, "", 3).await.unwrap();
    let ids: Vec<String> = page
        .iter()
        .map(|h| h.request.clone().unwrap().request_id)
        .collect();
    assert_eq!(ids, ["h24", "h18", "h12"]);
    let (page, next) = s.history(&f, &next, 3).await.unwrap();
    let ids: Vec<String> = page
        .iter()
        .map(|h| h.request.clone().unwrap().request_id)
        .collect();
    assert_eq!(ids, ["h6", "h0"]);
    assert!(next.is_empty());
    let by_carol = History {
        approver: "carol".into(),
        ..Default::default()
    };
    assert_eq!(s.history(&by_carol, "", 10).await.unwrap().0.len(), 2);
    let denied = History {
        state: RequestState::Denied as i32,
        ..Default::default()
    };
    let (page, _) = s.history(&denied, "", 10).await.unwrap();
    assert_eq!(page.len(), 1);
    assert_eq!(page[0].request.clone().unwrap().request_id, "h3");
    let future = History {
        from_ms: Some(now_ms() + 60_000),
        ..Default::default()
    };
    assert!(s.history(&future, "", 10).await.unwrap().0.is_empty());
}

async fn decided_once_only(t: TestDb) {
    let s = t.open().await;
    receive(&s, "a").await;
    s.vote("a", "alice", Verdict::Allow, "ok", 0).await.unwrap();
    let err = s
        .vote("a", "bob", Verdict::Deny, "no", 0)
        .await
        .unwrap_err();
    assert!(
        matches!(err, StoreError::NotPending { ref id, state: "approved" } if id == "a"),
        "{err}"
    );
    let err = s.vote("zz", "a", Verdict::Allow, "", 0).await.unwrap_err();
    assert!(
        matches!(err, StoreError::NotFound(ref id) if id == "zz"),
        "{err}"
    );
}

async fn every_change_is_audited_and_verifies(t: TestDb) {
    let s = t.open().await;
    receive(&s, "a").await;
    s.vote("a", "alice", Verdict::Deny, "freeze", 0)
        .await
        .unwrap();
    assert_eq!(s.verify_audit().await.unwrap(), 2);
    let records = s.audit_query(&Default::default()).await.unwrap();
    assert_eq!(records[1].action, "request.vote.deny");
    assert_eq!(records[1].actor, "alice");
    assert!(records[1].payload.contains("freeze"));
}

/// Runs `sql` with one integer parameter through the store's writer (to age a grant).
async fn exec(s: &Store, sql: &'static str, v: i64) {
    s.write(move |tx| {
        Box::pin(async move {
            tx.exec(sql, &[airlock_control_plane::store::sql::Arg::Int(v)])
                .await
        })
    })
    .await
    .unwrap();
}

async fn grant_approves_the_same_action_until_revoked(t: TestDb) {
    let s = t.open().await;
    let l = Limits::default();
    let mut r = req("g1", i64::MAX);
    r.process = Some(airlock_proto::v1::ProcessContext {
        user: "ci".into(),
        ..Default::default()
    });
    r.action = Some(Action::Exec(airlock_proto::v1::ExecAction {
        path: "/usr/bin/kubectl".into(),
        argv: vec!["kubectl".into(), "delete".into(), "pod".into(), "x".into()],
        ..Default::default()
    }));
    s.receive(&host(), &route(1), r.clone(), &l).await.unwrap();
    let (h, _) = s
        .vote("g1", "alice", Verdict::Allow, "ok", 30)
        .await
        .unwrap();
    assert!(!h.grant_id.is_empty());

    let mut again = r.clone();
    again.request_id = "g2".into();
    let (h2, _) = s.receive(&host(), &route(1), again, &l).await.unwrap();
    assert_eq!(
        h2.state(),
        RequestState::Approved,
        "approved at once by the grant"
    );
    assert_eq!(h2.grant_id, h.grant_id);

    let mut other = r.clone();
    other.request_id = "g3".into();
    if let Some(Action::Exec(e)) = &mut other.action {
        e.argv[3] = "y".into();
    }
    let (h3, _) = s.receive(&host(), &route(1), other, &l).await.unwrap();
    assert_eq!(
        h3.state(),
        RequestState::Pending,
        "another action is not covered"
    );
    assert_eq!(s.list_grants(false).await.unwrap().len(), 1);

    // Once its window has passed, the grant covers nothing.
    exec(&s, "UPDATE grants SET expires_ms = $1", now_ms() - 1).await;
    let mut expired = r.clone();
    expired.request_id = "g-exp".into();
    let (he, _) = s.receive(&host(), &route(1), expired, &l).await.unwrap();
    assert_eq!(
        he.state(),
        RequestState::Pending,
        "an expired grant approves nothing"
    );
    assert!(
        s.list_grants(false).await.unwrap().is_empty(),
        "expired grants are not active"
    );
    exec(&s, "UPDATE grants SET expires_ms = $1", now_ms() + 60_000).await;

    s.revoke_grant(&h.grant_id, "bob").await.unwrap();
    assert!(s.list_grants(false).await.unwrap().is_empty());
    let mut later = r;
    later.request_id = "g4".into();
    let (h4, _) = s.receive(&host(), &route(1), later, &l).await.unwrap();
    assert_eq!(
        h4.state(),
        RequestState::Pending,
        "revoked grants approve nothing"
    );
    let actions: Vec<String> = s
        .audit_query(&Default::default())
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.action)
        .collect();
    for a in ["grant.created", "request.approved.grant", "grant.revoked"] {
        assert!(actions.contains(&a.to_owned()), "{a} in {actions:?}");
    }
    assert!(s.verify_audit().await.is_ok());
}

/// A grant covers the action in its scope only: not another working directory, not other
/// environment values, and never a request by one of the people who agreed to it.
async fn grant_is_bound_to_cwd_env_and_not_its_approvers(t: TestDb) {
    use airlock_proto::v1::{EnvVar, ProcessContext};
    let s = t.open().await;
    let l = Limits::default();
    let make = |id: &str, login: &str, cwd: &str, ws: &str| {
        let mut r = req(id, i64::MAX);
        r.process = Some(ProcessContext {
            user: "deploy".into(),
            login_user: login.into(),
            cwd: cwd.into(),
            env: vec![EnvVar {
                name: "TF_WORKSPACE".into(),
                value: Some(ws.into()),
            }],
            ..Default::default()
        });
        r.action = Some(Action::Exec(airlock_proto::v1::ExecAction {
            path: "/usr/bin/terraform".into(),
            argv: vec!["terraform".into(), "apply".into()],
            ..Default::default()
        }));
        r
    };
    s.receive(
        &host(),
        &route(1),
        make("s1", "carol", "/srv/staging", "staging"),
        &l,
    )
    .await
    .unwrap();
    let (h, _) = s
        .vote(
            "s1",
            "alice@corp.example",
            Verdict::Allow,
            "staging is fine",
            60,
        )
        .await
        .unwrap();
    assert!(!h.grant_id.is_empty());
    let state = |h: airlock_proto::v1::HeldRequest| h.state();
    for (id, login, cwd, ws, why) in [
        (
            "p1",
            "carol",
            "/srv/prod",
            "staging",
            "another working directory",
        ),
        (
            "p2",
            "carol",
            "/srv/staging",
            "prod",
            "another environment value",
        ),
        (
            "p3",
            "alice",
            "/srv/staging",
            "staging",
            "a request by the grant's approver",
        ),
    ] {
        let (h, _) = s
            .receive(&host(), &route(1), make(id, login, cwd, ws), &l)
            .await
            .unwrap();
        assert_eq!(
            state(h),
            RequestState::Pending,
            "{why} must wait for a vote"
        );
    }
    let (h, _) = s
        .receive(
            &host(),
            &route(1),
            make("s2", "carol", "/srv/staging", "staging"),
            &l,
        )
        .await
        .unwrap();
    assert_eq!(
        state(h),
        RequestState::Approved,
        "the same scope is covered"
    );
}

async fn tokens_authenticate_until_revoked(t: TestDb) {
    let s = t.open().await;
    let tok = s.create_token("alice", Scope::Approve).await.unwrap();
    let p = s.principal(&tok).await.unwrap().unwrap();
    assert_eq!((p.name.as_str(), p.scope), ("alice", Scope::Approve));
    let mut forged = tok.clone();
    forged.pop();
    forged.push('x');
    assert_eq!(s.principal(&forged).await.unwrap(), None, "wrong secret");
    assert_eq!(s.principal("garbage").await.unwrap(), None);
    assert!(matches!(
        s.create_token("alice", Scope::Read).await,
        Err(StoreError::TokenExists(_))
    ));
    assert!(s.revoke_token("alice").await.unwrap());
    assert_eq!(s.principal(&tok).await.unwrap(), None, "revoked");
    assert_eq!(
        s.verify_audit().await.unwrap(),
        2,
        "creation and revocation are audited"
    );
}

async fn expiry_only_touches_pending_past_deadline(t: TestDb) {
    let s = t.open().await;
    let l = Limits::default();
    let soon = now_ms() + 5_000;
    s.receive(&host(), &route(1), req("old", soon), &l)
        .await
        .unwrap();
    s.receive(&host(), &route(1), req("new", soon + 60_000), &l)
        .await
        .unwrap();
    s.receive(&host(), &route(1), req("done", soon), &l)
        .await
        .unwrap();
    s.vote("done", "a", Verdict::Deny, "r", 0).await.unwrap();
    let expired = s.expire_due(soon + 10).await.unwrap();
    assert_eq!(expired.len(), 1);
    assert_eq!(s.get("old").await.unwrap().state(), RequestState::Expired);
    assert_eq!(s.get("new").await.unwrap().state(), RequestState::Pending);
    assert_eq!(s.get("done").await.unwrap().state(), RequestState::Denied);
    assert!(
        s.expire_due(soon + 10).await.unwrap().is_empty(),
        "expired once"
    );
}

async fn accounts_create_verify_change_remove(t: TestDb) {
    let store = t.open().await;
    assert!(!accounts::any(&store).await.unwrap());
    let groups = vec!["oncall".to_owned()];
    accounts::create(&store, "alice", "correct horse battery", &groups)
        .await
        .unwrap();
    assert!(matches!(
        accounts::create(&store, "alice", "another long password", &[]).await,
        Err(AccountError::Exists(_))
    ));
    assert!(matches!(
        accounts::create(&store, "bob", "short", &[]).await,
        Err(AccountError::Invalid(_))
    ));
    assert!(matches!(
        accounts::create(&store, "bad name", "long enough password", &[]).await,
        Err(AccountError::Invalid(_))
    ));
    let a = accounts::verify(&store, "alice", "correct horse battery")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(a.groups, groups);
    assert!(accounts::verify(&store, "alice", "wrong password!!")
        .await
        .unwrap()
        .is_none());
    assert!(accounts::verify(&store, "nobody", "correct horse battery")
        .await
        .unwrap()
        .is_none());
    accounts::set_password(&store, "alice", "a brand new passphrase")
        .await
        .unwrap();
    assert!(accounts::verify(&store, "alice", "correct horse battery")
        .await
        .unwrap()
        .is_none());
    assert!(accounts::verify(&store, "alice", "a brand new passphrase")
        .await
        .unwrap()
        .is_some());
    let (sid, _) = sessions::create(&store, "alice", &groups, "local", 60_000)
        .await
        .unwrap();
    accounts::remove(&store, "alice").await.unwrap();
    assert!(accounts::list(&store).await.unwrap().is_empty());
    assert_eq!(
        sessions::lookup(&store, &sid).await.unwrap(),
        None,
        "removing an account ends its sessions"
    );
    let audit = store.audit_query(&Default::default()).await.unwrap();
    let actions: Vec<&str> = audit.iter().map(|r| r.action.as_str()).collect();
    for action in ["account.created", "account.password", "account.removed"] {
        assert!(actions.contains(&action), "{action} audited: {actions:?}");
    }
    // Every column of every audit row, as stored: no password, old or new, in any of them.
    let rows: Vec<String> = store
        .read(|tx| {
            Box::pin(async move {
                let rows = tx.rows("SELECT * FROM audit ORDER BY seq", &[]).await?;
                Ok(rows
                    .into_iter()
                    .map(|r| {
                        r.0.into_iter()
                            .map(|c| match c {
                                Cell::Text(t) => t,
                                Cell::Blob(b) => String::from_utf8_lossy(&b).into_owned(),
                                other => format!("{other:?}"),
                            })
                            .collect::<Vec<_>>()
                            .join("\u{1f}")
                    })
                    .collect())
            })
        })
        .await
        .unwrap();
    assert_eq!(rows.len(), audit.len());
    assert!(
        rows.iter().any(|r| r.contains("\"name\":\"alice\"")),
        "the payloads are read: {rows:?}"
    );
    for password in ["correct horse battery", "a brand new passphrase"] {
        for row in &rows {
            assert!(!row.contains(password), "audit row leaks a password: {row}");
        }
    }
}

async fn sessions_live_until_ended_and_store_only_a_hash(t: TestDb) {
    let store = t.open().await;
    let (id, s) = sessions::create(&store, "alice", &["oncall".into()], "local", 60_000)
        .await
        .unwrap();
    assert_eq!(
        sessions::lookup(&store, &id).await.unwrap(),
        Some(s.clone())
    );
    assert!(s.csrf_ok(&s.csrf));
    assert!(!s.csrf_ok("forged"));
    assert_eq!(
        store.session(&id).await.unwrap(),
        None,
        "the session id itself is not stored"
    );
    sessions::end(&store, &id, "alice").await.unwrap();
    assert_eq!(sessions::lookup(&store, &id).await.unwrap(), None);
    let (expired, _) = sessions::create(&store, "bob", &[], "local", -1)
        .await
        .unwrap();
    assert_eq!(sessions::lookup(&store, &expired).await.unwrap(), None);
    let actions: Vec<String> = store
        .audit_query(&Default::default())
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.action)
        .collect();
    assert!(actions.contains(&"login".to_owned()) && actions.contains(&"logout".to_owned()));
}

fn hello(host: &str) -> Hello {
    Hello {
        host_id: host.into(),
        hostname: format!("{host}.example"),
        ..Default::default()
    }
}

async fn enrollment_tokens_are_spent_once_and_refusals_change_nothing(t: TestDb) {
    let s = t.open().await;
    let tok = enroll::create(&s, "web", None, DEFAULT_TTL, "server")
        .await
        .unwrap();
    let done = enroll::enroll(&s, &tok.token, &hello("h1")).await.unwrap();
    assert!(!done.replaced);
    let p = s.principal(&done.agent_token).await.unwrap().unwrap();
    assert_eq!((p.name.as_str(), p.scope), ("h1", Scope::Agent));
    let again = enroll::enroll(&s, &tok.token, &hello("h2"))
        .await
        .unwrap_err();
    assert!(matches!(again, EnrollError::Used { .. }), "{again}");
    assert!(s.principal(&done.agent_token).await.unwrap().is_some());
    assert_eq!(s.verify_audit().await.unwrap(), 2, "created and enrolled");
}

async fn unbound_enrollment_tokens_cannot_take_over_an_enrolled_host(t: TestDb) {
    let s = t.open().await;
    let first = enroll::create(&s, "a", None, DEFAULT_TTL, "server")
        .await
        .unwrap();
    let old = enroll::enroll(&s, &first.token, &hello("h1"))
        .await
        .unwrap();
    let unbound = enroll::create(&s, "b", None, DEFAULT_TTL, "server")
        .await
        .unwrap();
    let err = enroll::enroll(&s, &unbound.token, &hello("h1"))
        .await
        .unwrap_err();
    assert!(matches!(err, EnrollError::AlreadyEnrolled(_)), "{err}");
    let bound = enroll::create(&s, "c", Some("h1"), DEFAULT_TTL, "server")
        .await
        .unwrap();
    let new = enroll::enroll(&s, &bound.token, &hello("h1"))
        .await
        .unwrap();
    assert!(new.replaced);
    assert!(
        s.principal(&old.agent_token).await.unwrap().is_none(),
        "old one revoked"
    );
    assert!(s.principal(&new.agent_token).await.unwrap().is_some());
    // The refused unbound token was not spent: it still enrols a new host.
    enroll::enroll(&s, &unbound.token, &hello("h2"))
        .await
        .unwrap();
}

async fn bad_enrollment_input_is_refused(t: TestDb) {
    let s = t.open().await;
    let ttl = std::time::Duration::ZERO;
    assert!(enroll::create(&s, " ", None, DEFAULT_TTL, "server")
        .await
        .is_err());
    assert!(enroll::create(&s, "x", None, ttl, "server").await.is_err());
    assert!(enroll::create(&s, "x", None, MAX_TTL * 2, "server")
        .await
        .is_err());
    assert!(enroll::create(&s, "x", Some(" h"), DEFAULT_TTL, "server")
        .await
        .is_err());
    s.create_token("alice", Scope::Approve).await.unwrap();
    let tok = enroll::create(&s, "x", None, DEFAULT_TTL, "server")
        .await
        .unwrap();
    let err = enroll::enroll(&s, &tok.token, &hello("alice"))
        .await
        .unwrap_err();
    assert!(matches!(err, EnrollError::NameTaken { .. }), "{err}");
    let err = enroll::enroll(&s, &tok.token, &hello(""))
        .await
        .unwrap_err();
    assert!(matches!(err, EnrollError::Invalid(_)), "{err}");
    let err = enroll::enroll(&s, "alk_x_y", &hello("h"))
        .await
        .unwrap_err();
    assert!(matches!(err, EnrollError::Unknown), "{err}");
}

/// The policy one replica stores is the one the next reads.
async fn policies_are_versioned_and_audited(t: TestDb) {
    let s = t.open().await;
    assert!(s.current_policy().await.unwrap().is_none());
    let v1 = s
        .publish_policy("[groups]\n", "/etc/p.toml", 1)
        .await
        .unwrap();
    let same = s
        .publish_policy("[groups]\n", "/etc/p.toml", 2)
        .await
        .unwrap();
    assert_eq!((v1, same), (1, 1), "the same text is no new version");
    let v2 = s
        .publish_policy("[groups]\na = [\"x\"]\n", "/etc/p.toml", 3)
        .await
        .unwrap();
    assert_eq!(v2, 2);
    let p = s.current_policy().await.unwrap().unwrap();
    assert_eq!((p.version, p.file_mtime_ms), (2, 3));
    assert!(p.source.contains("a = "));
    let loaded = s
        .audit_query(&airlock_control_plane::audit::Filter {
            action: Some("policy.loaded".into()),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(loaded.len(), 2);
}

/// A SQLite database made by the airlock-server before versioned migrations opens, gets the
/// new columns filled from its requests, and its audit trail still verifies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_from_before_migrations_is_upgraded_in_place() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("airlock.db");
    {
        let conn = rusqlite::Connection::open(&path).unwrap();
        conn.execute_batch(include_str!(
            "../src/store/migrations/sqlite/0001_initial.sql"
        ))
        .unwrap();
        let held = airlock_proto::v1::HeldRequest {
            request: Some(req("legacy", i64::MAX)),
            host_id: "h".into(),
            hostname: "old-host".into(),
            state: RequestState::Approved as i32,
            received_unix_ms: 1000,
            decided_unix_ms: 2000,
            votes: vec![airlock_proto::v1::Vote {
                approver: "Alice@example.com".into(),
                verdict: Verdict::Allow as i32,
                ..Default::default()
            }],
            ..Default::default()
        };
        use prost::Message;
        conn.execute(
            "INSERT INTO requests (id, seq, state, deadline_ms, host_id, account, body)
             VALUES ('legacy', 1, ?1, 0, 'h', '', ?2)",
            rusqlite::params![held.state, held.encode_to_vec()],
        )
        .unwrap();
        let r = airlock_control_plane::audit::Record::next(
            0,
            airlock_control_plane::audit::GENESIS,
            1000,
            "h",
            "request.received",
            "legacy",
            "{}",
        );
        conn.execute(
            "INSERT INTO audit VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
            rusqlite::params![
                r.seq,
                r.at_ms,
                r.actor,
                r.action,
                r.request_id,
                r.payload,
                r.digest,
                r.prev_hash,
                r.hash
            ],
        )
        .unwrap();
        // The server has written the checkpoint file beside its database from the start.
        airlock_control_plane::audit::write_checkpoint(
            &airlock_control_plane::audit::checkpoint_path(&path),
            r.seq,
            &r.hash,
        )
        .unwrap();
    }
    let s = Store::open(&airlock_control_plane::store::Database::sqlite(&path))
        .await
        .unwrap();
    let by_host = History {
        host: "old-host".into(),
        ..Default::default()
    };
    assert_eq!(s.history(&by_host, "", 10).await.unwrap().0.len(), 1);
    let by_alice = History {
        approver: "Alice@example.com".into(),
        ..Default::default()
    };
    assert_eq!(s.history(&by_alice, "", 10).await.unwrap().0.len(), 1);
    assert_eq!(s.verify_audit().await.unwrap(), 1);
    receive(&s, "new").await;
    let all = s.list(&ListRequestsRequest::default(), 10).await.unwrap().0;
    assert_eq!(
        all[0].request.clone().unwrap().request_id,
        "new",
        "newest first"
    );
}

/// An operation that fails after it wrote leaves nothing behind, and the operations batched
/// with it still commit.
async fn a_failure_after_a_write_undoes_only_that_operation(t: TestDb) {
    let s = t.open().await;
    let mut ops = Vec::new();
    for i in 0..40 {
        let s = s.clone();
        ops.push(tokio::spawn(async move {
            if i % 10 == 3 {
                s.write(|tx| {
                    Box::pin(async move {
                        tx.audit("test", "test.half", "", "{}", None).await?;
                        tx.exec("INSERT INTO no_such_table VALUES (1)", &[]).await?;
                        Ok(())
                    })
                })
                .await
                .is_err()
            } else {
                s.audit_event("test", "test.whole", "{}").await.is_ok()
            }
        }));
    }
    for op in ops {
        assert!(
            op.await.unwrap(),
            "the failing ones fail, the others succeed"
        );
    }
    let records = s.audit_query(&Default::default()).await.unwrap();
    let actions: Vec<&str> = records.iter().map(|r| r.action.as_str()).collect();
    assert_eq!(actions.len(), 36, "{actions:?}");
    assert!(actions.iter().all(|a| *a == "test.whole"), "{actions:?}");
    assert_eq!(s.verify_audit().await.unwrap(), 36);
}

/// A database whose schema is newer than this program is refused, not used.
async fn a_newer_schema_is_refused(t: TestDb) {
    let s = t.open().await;
    s.write(|tx| {
        Box::pin(async move {
            tx.exec(
                "INSERT INTO schema_migrations (version, name, applied_ms) VALUES (999, 'future', 0)",
                &[],
            )
            .await
        })
    })
    .await
    .unwrap();
    drop(s);
    let err = Store::open(&t.db).await.err().expect("refused");
    assert!(
        err.to_string()
            .contains("newer than this airlock-server knows"),
        "{err}"
    );
}

/// An agent's labels choose its approval rules (`hosts = { env = "prod" }`), so a host that
/// comes back with other labels is recorded in the audit trail, with before and after.
async fn agent_label_changes_are_audited(t: TestDb) {
    let s = t.open().await;
    let hello = |env: &str| Hello {
        host_id: "web-1".into(),
        hostname: "web-1".into(),
        labels: [("env".to_owned(), env.to_owned())].into(),
        ..Default::default()
    };
    s.agent_seen(&hello("prod"), true).await.unwrap();
    s.agent_seen(&hello("prod"), false).await.unwrap();
    s.agent_seen(&hello("prod"), true).await.unwrap();
    s.agent_seen(&hello("dev"), true).await.unwrap();
    let changes = s
        .audit_query(&airlock_control_plane::audit::Filter {
            action: Some("agent.labels_changed".into()),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(
        changes.len(),
        1,
        "one change, not one per connection: {changes:?}"
    );
    assert_eq!(changes[0].actor, "web-1");
    let payload: serde_json::Value = serde_json::from_str(&changes[0].payload).unwrap();
    assert_eq!(payload["before"]["env"], "prod", "{payload}");
    assert_eq!(payload["after"]["env"], "dev", "{payload}");
    s.verify_audit().await.unwrap();
}

both!(
    resent_request_is_the_same_request,
    agent_label_changes_are_audited,
    quorum_of_two_distinct_people_and_deny_wins,
    changes_reach_subscribers_in_order,
    a_lagging_subscriber_catches_up_from_the_table,
    list_filters_and_pages,
    history_filters_run_in_sql_with_pages,
    decided_once_only,
    every_change_is_audited_and_verifies,
    grant_approves_the_same_action_until_revoked,
    grant_is_bound_to_cwd_env_and_not_its_approvers,
    tokens_authenticate_until_revoked,
    expiry_only_touches_pending_past_deadline,
    accounts_create_verify_change_remove,
    sessions_live_until_ended_and_store_only_a_hash,
    enrollment_tokens_are_spent_once_and_refusals_change_nothing,
    unbound_enrollment_tokens_cannot_take_over_an_enrolled_host,
    bad_enrollment_input_is_refused,
    policies_are_versioned_and_audited,
    a_newer_schema_is_refused,
    a_failure_after_a_write_undoes_only_that_operation,
);
