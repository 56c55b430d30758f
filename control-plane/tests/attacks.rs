//! Attacks, on both backends, each seen to succeed against the control plane before it was
//! fixed: one person voting twice under two names at the same moment, a host reporting
//! outcomes for another host's request or flooding one request with them, requests beyond
//! any size or count, deadlines in the far future, votes after the deadline.

#[path = "support/db.rs"]
mod db;

use std::time::Duration;

use airlock_agent::decider::Decider;
use airlock_control_plane::{
    auth::Scope,
    config::Limits,
    decide::{Approver, DecideError},
    policy::Policy,
    store::StoreError,
    types::now_ms,
    ControlPlane,
};
use airlock_proto::v1::{
    action_request::Action, ActionRequest, EnvVar, ExecAction, Hello, Outcome, ProcessContext,
    RequestState, Verdict,
};
use db::TestDb;

fn request(id: &str, user: &str, argv: usize) -> ActionRequest {
    ActionRequest {
        request_id: id.into(),
        rule: "kubectl".into(),
        process: Some(ProcessContext {
            user: user.into(),
            ..Default::default()
        }),
        action: Some(Action::Exec(ExecAction {
            path: "/usr/bin/kubectl".into(),
            argv: (0..argv).map(|i| format!("a{i}")).collect(),
            ..Default::default()
        })),
        deadline_unix_ms: now_ms() + 600_000,
        ..Default::default()
    }
}

/// A served control plane with `limits`, and agents (connected) for `hosts`.
async fn start(t: &TestDb, limits: Limits, hosts: &[&str]) -> (ControlPlane, Vec<Decider>) {
    let store = t.open().await;
    let mut tokens = Vec::new();
    for h in hosts {
        tokens.push(store.create_token(h, Scope::Agent).await.unwrap());
    }
    let mut plane = ControlPlane::new(store);
    plane.limits = limits;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let p = plane.clone();
    tokio::spawn(async move { p.serve(listener, std::future::pending()).await.unwrap() });
    let mut agents = Vec::new();
    for (h, token) in hosts.iter().zip(tokens) {
        let hello = Hello {
            host_id: (*h).into(),
            hostname: (*h).into(),
            ..Default::default()
        };
        let a = Decider::spawn(url.clone(), hello, Some(token));
        assert!(a.wait_connected(Duration::from_secs(5)).await);
        agents.push(a);
    }
    (plane, agents)
}

async fn wait_stored(plane: &ControlPlane, id: &str) {
    for _ in 0..200 {
        if plane.store.get(id).await.is_ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("{id} was never stored");
}

/// Alice votes as her token's name and as her OIDC login in the same instant on a request that
/// needs two approvals: only one vote may count. Before the fix, 36 of 200 such requests were
/// approved by her alone.
async fn one_person_under_two_names_at_once_is_one_vote(t: TestDb) {
    let (plane, _) = start(&t, Limits::default(), &[]).await;
    plane.set_policy(Policy::parse("[[rule]]\nname = \"*\"\nquorum = 2\n", "p").unwrap());
    let host = Hello {
        host_id: "h".into(),
        hostname: "h".into(),
        ..Default::default()
    };
    let route = airlock_control_plane::policy::current(&plane.policy).route(
        "kubectl",
        &Default::default(),
        "ci",
        "",
    );
    let mut doubled = Vec::new();
    for i in 0..100 {
        let id = format!("r{i}");
        plane
            .store
            .receive(&host, &route, request(&id, "ci", 3), &Limits::default())
            .await
            .unwrap();
        let votes = ["alice", "alice@example.com"].map(|name| {
            let (d, id) = (plane.decisions(), id.clone());
            tokio::spawn(async move {
                d.decide(&Approver::named(name), &id, Verdict::Allow, "ok", 0)
                    .await
            })
        });
        let mut refused = 0;
        for v in votes {
            match v.await.unwrap() {
                Ok(_) => {}
                Err(DecideError::Store(StoreError::AlreadyVoted { .. })) => refused += 1,
                Err(e) => panic!("unexpected refusal: {e}"),
            }
        }
        let held = plane.store.get(&id).await.unwrap();
        if held.state() != RequestState::Pending || held.votes.len() != 1 || refused != 1 {
            doubled.push(id);
        }
    }
    assert!(
        doubled.is_empty(),
        "one person counted twice on {doubled:?}"
    );
}

/// Host b reports outcomes for host a's request, and host a floods its own: neither lands.
async fn outcomes_come_only_from_the_requests_host_and_are_capped(t: TestDb) {
    let limits = Limits {
        max_outcomes_per_request: 3,
        ..Default::default()
    };
    let (plane, agents) = start(&t, limits, &["host-a", "host-b"]).await;
    let (a, b) = (&agents[0], &agents[1]);
    let _pending = a.ask(request("a-1", "ci", 3));
    wait_stored(&plane, "a-1").await;
    for i in 0..20 {
        b.report(Outcome {
            request_id: "a-1".into(),
            cause: format!("spoofed {i}"),
            ..Default::default()
        });
        a.report(Outcome {
            request_id: "a-1".into(),
            cause: format!("own {i}"),
            ..Default::default()
        });
    }
    let mut held = plane.store.get("a-1").await.unwrap();
    for _ in 0..100 {
        held = plane.store.get("a-1").await.unwrap();
        if held.outcomes.len() == 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let held2 = plane.store.get("a-1").await.unwrap();
    assert_eq!(held.outcomes, held2.outcomes, "nothing more landed later");
    let causes: Vec<&str> = held2.outcomes.iter().map(|o| o.cause.as_str()).collect();
    assert_eq!(
        causes,
        ["own 0", "own 1", "own 2"],
        "host-b wrote host-a's outcome, or too many"
    );
}

/// Oversized requests are denied at once, with the reason, and never stored.
async fn requests_over_the_limits_are_denied_at_once_and_not_stored(t: TestDb) {
    let limits = Limits {
        max_argv: 100,
        max_env: 10,
        max_request_bytes: 16 * 1024,
        ..Default::default()
    };
    let (plane, agents) = start(&t, limits, &["host-a"]).await;
    let a = &agents[0];
    let mut many_env = request("env", "ci", 3);
    if let Some(p) = many_env.process.as_mut() {
        p.env = (0..11)
            .map(|i| EnvVar {
                name: format!("V{i}"),
                value: None,
            })
            .collect();
    }
    let mut huge = request("huge", "ci", 3);
    huge.description = "x".repeat(20 * 1024);
    for (req, why) in [
        (
            request("argv", "ci", 101),
            "101 arguments, over limits.max_argv (100)",
        ),
        (
            many_env,
            "11 environment variables, over limits.max_env (10)",
        ),
        (huge, "over limits.max_request_bytes (16384)"),
    ] {
        let id = req.request_id.clone();
        let d = tokio::time::timeout(Duration::from_secs(5), a.ask(req))
            .await
            .expect("denied at once")
            .unwrap();
        assert_eq!(d.verdict, Verdict::Deny as i32, "{id}");
        assert!(d.reason.contains(why), "{id}: {}", d.reason);
        assert!(matches!(
            plane.store.get(&id).await,
            Err(StoreError::NotFound(_))
        ));
    }
    // The stream goes on.
    let _ok = a.ask(request("fine", "ci", 3));
    wait_stored(&plane, "fine").await;
}

/// A host (or an account) may not pile up pending requests past its cap: the next ones are
/// denied at once; deciding one makes room again.
async fn pending_requests_are_capped_per_host_and_per_account(t: TestDb) {
    let limits = Limits {
        max_pending_per_host: 3,
        max_pending_per_account: 4,
        ..Default::default()
    };
    let (plane, agents) = start(&t, limits, &["host-a", "host-b"]).await;
    let (a, b) = (&agents[0], &agents[1]);
    let mut waiting = Vec::new();
    for i in 0..3 {
        waiting.push(a.ask(request(&format!("a{i}"), "ci", 3)));
        wait_stored(&plane, &format!("a{i}")).await;
    }
    let over = tokio::time::timeout(Duration::from_secs(5), a.ask(request("a3", "ci", 3)))
        .await
        .expect("denied at once")
        .unwrap();
    assert_eq!(over.verdict, Verdict::Deny as i32);
    assert!(
        over.reason.contains("max_pending_per_host"),
        "{}",
        over.reason
    );
    // Host b is not host a; but account ci has 3 pending, so one more and it is full.
    let _b0 = b.ask(request("b0", "ci", 3));
    wait_stored(&plane, "b0").await;
    let over = tokio::time::timeout(Duration::from_secs(5), b.ask(request("b1", "ci", 3)))
        .await
        .expect("denied at once")
        .unwrap();
    assert!(
        over.reason.contains("max_pending_per_account"),
        "{}",
        over.reason
    );
    let _other = b.ask(request("b2", "bot", 3));
    wait_stored(&plane, "b2").await;
    // A decision makes room.
    plane
        .decisions()
        .decide(&Approver::named("alice"), "a0", Verdict::Deny, "no", 0)
        .await
        .unwrap();
    let _a4 = a.ask(request("a4", "bot", 3));
    wait_stored(&plane, "a4").await;
}

/// A deadline in the far future is brought forward; a vote after the deadline is refused even
/// before the request is marked expired.
async fn deadlines_are_clamped_and_votes_after_them_refused(t: TestDb) {
    let limits = Limits {
        max_deadline_secs: 60,
        ..Default::default()
    };
    let (plane, agents) = start(&t, limits, &["host-a"]).await;
    let mut far = request("far", "ci", 3);
    far.deadline_unix_ms = i64::MAX;
    let _far = agents[0].ask(far);
    wait_stored(&plane, "far").await;
    let held = plane.store.get("far").await.unwrap();
    let deadline = held.request.unwrap().deadline_unix_ms;
    assert!(
        deadline <= now_ms() + 60_000,
        "deadline {deadline} not clamped"
    );

    // Straight to the store, so that no expiry pass can come first.
    let host = Hello {
        host_id: "h".into(),
        ..Default::default()
    };
    let mut soon = request("soon", "ci", 3);
    soon.deadline_unix_ms = now_ms() + 100;
    plane
        .store
        .receive(&host, &Default::default(), soon, &Limits::default())
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(150)).await;
    let late = plane
        .store
        .vote("soon", "alice", Verdict::Allow, "late", 0)
        .await
        .unwrap_err();
    assert!(matches!(late, StoreError::PastDeadline { .. }), "{late}");
    assert!(plane.store.get("soon").await.unwrap().votes.is_empty());
}

both!(
    one_person_under_two_names_at_once_is_one_vote,
    outcomes_come_only_from_the_requests_host_and_are_capped,
    requests_over_the_limits_are_denied_at_once_and_not_stored,
    pending_requests_are_capped_per_host_and_per_account,
    deadlines_are_clamped_and_votes_after_them_refused,
);
