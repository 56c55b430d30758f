//! The control plane over real sockets, driven by the agent's own client code.

#[path = "support/db.rs"]
mod db;

#[path = "support/session.rs"]
mod session;

use std::time::Duration;

use airlock_agent::decider::Decider;
use std::collections::HashMap;

use airlock_control_plane::{auth::Scope, policy::Policy, ControlPlane};
use airlock_proto::v1::{
    approval_service_client::ApprovalServiceClient, ActionRequest, DecideRequest, ExecAction,
    GetRequestRequest, Hello, ListRequestsRequest, ProcessContext, RequestState, Verdict,
    WatchRequestsRequest,
};
use db::TestDb;
use tonic::Code;

/// A server with tokens: agents `host-a`, `host-b`; approvers alice and bob; `claude` (the
/// account the agents' requests come from) also holds an approve token; `reader` can only read.
async fn start(
    t: &TestDb,
) -> (
    String,
    HashMap<&'static str, String>,
    tokio::sync::oneshot::Sender<()>,
) {
    start_with(t, None).await
}

/// Like [`start`], with an approval policy; carol holds an approve token too.
async fn start_with(
    t: &TestDb,
    policy: Option<&str>,
) -> (
    String,
    HashMap<&'static str, String>,
    tokio::sync::oneshot::Sender<()>,
) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let store = t.open().await;
    let mut tokens = HashMap::new();
    for (name, scope) in [
        ("host-a", Scope::Agent),
        ("host-b", Scope::Agent),
        ("alice", Scope::Approve),
        ("bob", Scope::Approve),
        ("claude", Scope::Approve),
        ("reader", Scope::Read),
        ("carol", Scope::Approve),
        ("root-admin", Scope::Admin),
    ] {
        tokens.insert(name, store.create_token(name, scope).await.unwrap());
    }
    let plane = ControlPlane::new(store);
    if let Some(text) = policy {
        plane.set_policy(Policy::parse(text, "test-policy.toml").unwrap());
    }
    tokio::spawn(async move {
        plane
            .serve(listener, async {
                let _ = rx.await;
            })
            .await
            .unwrap();
    });
    (url, tokens, tx)
}

fn agent(url: &str, host: &str, token: &str) -> Decider {
    Decider::spawn(
        url.to_owned(),
        Hello {
            host_id: host.into(),
            hostname: host.into(),
            labels: Default::default(),
            version: "test".into(),
        },
        Some(token.to_owned()),
    )
}

fn request(id: &str, user: &str) -> ActionRequest {
    ActionRequest {
        request_id: id.into(),
        rule: "kubectl".into(),
        process: Some(ProcessContext {
            user: user.into(),
            ..Default::default()
        }),
        action: Some(airlock_proto::v1::action_request::Action::Exec(
            ExecAction {
                path: "/usr/bin/kubectl".into(),
                argv: vec![
                    "kubectl".into(),
                    "delete".into(),
                    "ns".into(),
                    "prod".into(),
                ],
                ..Default::default()
            },
        )),
        deadline_unix_ms: i64::MAX,
        ..Default::default()
    }
}

type Client = ApprovalServiceClient<
    tonic::service::interceptor::InterceptedService<tonic::transport::Channel, Bearer>,
>;

#[derive(Clone)]
struct Bearer(Option<String>);

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(t) = &self.0 {
            let value = format!("Bearer {t}").parse().unwrap();
            req.metadata_mut().insert("authorization", value);
        }
        Ok(req)
    }
}

async fn approvals(url: &str, token: Option<&str>) -> Client {
    let ch = tonic::transport::Channel::from_shared(url.to_owned())
        .unwrap()
        .connect()
        .await
        .unwrap();
    ApprovalServiceClient::with_interceptor(ch, Bearer(token.map(str::to_owned)))
}

async fn wait_pending(c: &mut Client, n: usize) {
    for _ in 0..100 {
        let list = c
            .list(ListRequestsRequest {
                state: RequestState::Pending as i32,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        if list.requests.len() >= n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("requests never arrived");
}

fn vote(id: &str, verdict: Verdict, reason: &str) -> DecideRequest {
    DecideRequest {
        request_id: id.into(),
        verdict: verdict as i32,
        reason: reason.into(),
        approver: String::new(),
        grant_minutes: 0,
    }
}

async fn decision_reaches_the_right_agent_and_request(t: TestDb) {
    let (url, t, _stop) = start(&t).await;
    let (a, b) = (
        agent(&url, "host-a", &t["host-a"]),
        agent(&url, "host-b", &t["host-b"]),
    );
    assert!(a.wait_connected(Duration::from_secs(5)).await);
    assert!(b.wait_connected(Duration::from_secs(5)).await);
    let mut ra = a.ask(request("a-1", "ci"));
    let mut rb = b.ask(request("b-1", "ci"));
    let mut c = approvals(&url, Some(&t["alice"])).await;
    wait_pending(&mut c, 2).await;

    c.decide(vote("b-1", Verdict::Deny, "not during the freeze"))
        .await
        .unwrap();
    let d = tokio::time::timeout(Duration::from_secs(5), &mut rb)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (d.request_id.as_str(), d.verdict),
        ("b-1", Verdict::Deny as i32)
    );
    assert_eq!(d.decided_by, "alice");
    assert!(ra.try_recv().is_err(), "agent a must not get b's decision");

    c.decide(vote("a-1", Verdict::Allow, "")).await.unwrap();
    let d = tokio::time::timeout(Duration::from_secs(5), ra)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (d.request_id.as_str(), d.verdict),
        ("a-1", Verdict::Allow as i32)
    );
}

async fn refusals_are_precise_and_lose_nothing(t: TestDb) {
    let (url, t, _stop) = start(&t).await;
    let a = agent(&url, "host-a", &t["host-a"]);
    assert!(a.wait_connected(Duration::from_secs(5)).await);
    let _pending = a.ask(request("r-1", "claude"));
    let mut alice = approvals(&url, Some(&t["alice"])).await;
    wait_pending(&mut alice, 1).await;

    let mut claude = approvals(&url, Some(&t["claude"])).await;
    let own = claude
        .decide(vote("r-1", Verdict::Allow, ""))
        .await
        .unwrap_err();
    assert_eq!(own.code(), Code::PermissionDenied);
    assert!(
        own.message().contains("made this request"),
        "{}",
        own.message()
    );

    let mut agent_token = approvals(&url, Some(&t["host-a"])).await;
    let by_agent = agent_token
        .decide(vote("r-1", Verdict::Allow, ""))
        .await
        .unwrap_err();
    assert_eq!(
        by_agent.code(),
        Code::PermissionDenied,
        "agent credentials never vote"
    );

    let mut reader = approvals(&url, Some(&t["reader"])).await;
    let by_reader = reader
        .decide(vote("r-1", Verdict::Allow, ""))
        .await
        .unwrap_err();
    assert_eq!(by_reader.code(), Code::PermissionDenied);
    assert!(
        by_reader.message().contains("read token"),
        "{}",
        by_reader.message()
    );

    let mut anonymous = approvals(&url, None).await;
    let anon = anonymous
        .decide(vote("r-1", Verdict::Allow, ""))
        .await
        .unwrap_err();
    assert_eq!(anon.code(), Code::Unauthenticated);
    let mut forged = approvals(&url, Some("alk_nope_0000")).await;
    assert_eq!(
        forged
            .decide(vote("r-1", Verdict::Allow, ""))
            .await
            .unwrap_err()
            .code(),
        Code::Unauthenticated
    );

    let mut impersonate = vote("r-1", Verdict::Allow, "");
    impersonate.approver = "bob".into();
    assert_eq!(
        alice.decide(impersonate).await.unwrap_err().code(),
        Code::PermissionDenied
    );

    let no_reason = alice
        .decide(vote("r-1", Verdict::Deny, ""))
        .await
        .unwrap_err();
    assert_eq!(no_reason.code(), Code::InvalidArgument);
    let unknown = alice
        .decide(vote("nope", Verdict::Allow, ""))
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound);

    let still = alice
        .get(GetRequestRequest {
            request_id: "r-1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        still.state(),
        RequestState::Pending,
        "refused votes change nothing"
    );

    let done = alice
        .decide(vote("r-1", Verdict::Allow, "ok"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(done.decided_by, "alice", "the token's identity decides");
    let mut bob = approvals(&url, Some(&t["bob"])).await;
    let twice = bob
        .decide(vote("r-1", Verdict::Deny, "late"))
        .await
        .unwrap_err();
    assert_eq!(twice.code(), Code::FailedPrecondition);
}

async fn agent_stream_needs_its_own_credential(t: TestDb) {
    let (url, t, _stop) = start(&t).await;
    let hello = |host: &str| Hello {
        host_id: host.into(),
        hostname: host.into(),
        ..Default::default()
    };
    let anonymous = session::refusal_at(&url, None, hello("host-a")).await;
    assert_eq!(anonymous.code(), Code::Unauthenticated, "{anonymous:?}");
    assert!(
        anonymous.message().starts_with("missing authorization"),
        "no token, no stream: {anonymous:?}"
    );
    let approver = session::refusal_at(&url, Some(&t["alice"]), hello("host-a")).await;
    assert_eq!(approver.code(), Code::PermissionDenied, "{approver:?}");
    assert!(
        approver
            .message()
            .ends_with("approve token cannot use this service"),
        "{approver:?}"
    );
    let other_host = session::refusal_at(&url, Some(&t["host-b"]), hello("host-a")).await;
    assert_eq!(other_host.code(), Code::PermissionDenied, "{other_host:?}");
    assert_eq!(
        other_host.message(),
        "this credential belongs to agent \"host-b\", not \"host-a\"",
        "a credential speaks for its own host only"
    );
    let unknown = session::refusal_at(&url, Some("alk_nope_x"), hello("host-a")).await;
    assert_eq!(unknown.code(), Code::Unauthenticated, "{unknown:?}");
    assert_eq!(unknown.message(), "unknown or revoked token");
    let ok = agent(&url, "host-a", &t["host-a"]);
    assert!(ok.wait_connected(Duration::from_secs(5)).await);
}

async fn resent_request_is_one_request_and_watchers_see_it(t: TestDb) {
    let (url, t, _stop) = start(&t).await;
    let mut c = approvals(&url, Some(&t["alice"])).await;
    let mut watch = c
        .watch(WatchRequestsRequest {
            include_pending: true,
        })
        .await
        .unwrap()
        .into_inner();
    let a = agent(&url, "host-a", &t["host-a"]);
    assert!(a.wait_connected(Duration::from_secs(5)).await);
    let _first = a.ask(request("same", "ci"));
    let second = a.ask(request("same", "ci"));
    let seen = tokio::time::timeout(Duration::from_secs(5), watch.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(seen.request.unwrap().request_id, "same");
    wait_pending(&mut c, 1).await;
    let all = c
        .list(ListRequestsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(all.requests.len(), 1, "one request, not two");
    c.decide(vote("same", Verdict::Allow, "")).await.unwrap();
    let d = tokio::time::timeout(Duration::from_secs(5), second)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(d.verdict, Verdict::Allow as i32);
}

async fn quorum_of_two_from_the_rules_group_and_deny_wins(t: TestDb) {
    let policy = r#"
[groups]
oncall = ["alice", "bob"]

[[rule]]
name = "kubectl"
hosts = { env = "prod" }
groups = ["oncall"]
quorum = 2
require_reason = true
"#;
    let (url, t, _stop) = start_with(&t, Some(policy)).await;
    let a = Decider::spawn(
        url.clone(),
        Hello {
            host_id: "host-a".into(),
            hostname: "host-a".into(),
            labels: [("env".to_owned(), "prod".to_owned())].into(),
            version: "test".into(),
        },
        Some(t["host-a"].clone()),
    );
    assert!(a.wait_connected(Duration::from_secs(5)).await);
    let mut answer = a.ask(request("q-1", "ci"));
    let _denied = a.ask(request("q-2", "ci"));
    let mut alice = approvals(&url, Some(&t["alice"])).await;
    wait_pending(&mut alice, 2).await;
    let held = alice
        .get(GetRequestRequest {
            request_id: "q-1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (held.quorum, held.approver_groups.clone()),
        (2, vec!["oncall".to_owned()])
    );

    let mut carol = approvals(&url, Some(&t["carol"])).await;
    let outsider = carol
        .decide(vote("q-1", Verdict::Allow, "looks fine"))
        .await
        .unwrap_err();
    assert_eq!(
        outsider.code(),
        Code::PermissionDenied,
        "not in the rule's group"
    );
    let no_reason = alice
        .decide(vote("q-1", Verdict::Allow, ""))
        .await
        .unwrap_err();
    assert_eq!(
        no_reason.code(),
        Code::InvalidArgument,
        "this rule wants a reason"
    );

    let first = alice
        .decide(vote("q-1", Verdict::Allow, "change 42"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first.state(), RequestState::Pending, "one of two");
    let twice = alice
        .decide(vote("q-1", Verdict::Allow, "really"))
        .await
        .unwrap_err();
    assert_eq!(
        twice.code(),
        Code::FailedPrecondition,
        "a second vote by the same person does not count"
    );
    assert!(answer.try_recv().is_err(), "not decided yet");
    let mut bob = approvals(&url, Some(&t["bob"])).await;
    let done = bob
        .decide(vote("q-1", Verdict::Allow, "agreed"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(done.state(), RequestState::Approved);
    assert_eq!(done.decided_by, "alice, bob");
    let d = tokio::time::timeout(Duration::from_secs(5), answer)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(d.verdict, Verdict::Allow as i32);

    alice
        .decide(vote("q-2", Verdict::Allow, "fine"))
        .await
        .unwrap();
    let denied = bob
        .decide(vote("q-2", Verdict::Deny, "no"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(denied.state(), RequestState::Denied, "any deny is final");
}

/// Agent `a` asks `id` for account `ci`; alice approves it with a 10-minute grant. Returns
/// alice's client and the decided request (with its grant id) once the agent has the answer.
async fn alice_grants(
    url: &str,
    t: &HashMap<&'static str, String>,
    a: &Decider,
    id: &str,
) -> (Client, airlock_proto::v1::HeldRequest) {
    let first = a.ask(request(id, "ci"));
    let mut alice = approvals(url, Some(&t["alice"])).await;
    wait_pending(&mut alice, 1).await;
    let mut with_grant = vote(id, Verdict::Allow, "deploy window");
    with_grant.grant_minutes = 10;
    let held = alice.decide(with_grant).await.unwrap().into_inner();
    assert!(!held.grant_id.is_empty());
    tokio::time::timeout(Duration::from_secs(5), first)
        .await
        .unwrap()
        .unwrap();
    (alice, held)
}

async fn grant_answers_the_same_action_at_once_until_revoked(t: TestDb) {
    let (url, t, _stop) = start(&t).await;
    let a = agent(&url, "host-a", &t["host-a"]);
    assert!(a.wait_connected(Duration::from_secs(5)).await);
    let (mut alice, held) = alice_grants(&url, &t, &a, "g-1").await;

    // The same action again: approved by the grant, nobody asked.
    let repeat = a.ask(request("g-2", "ci"));
    let d = tokio::time::timeout(Duration::from_secs(5), repeat)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(d.verdict, Verdict::Allow as i32);
    assert!(d.decided_by.contains(&held.grant_id), "{}", d.decided_by);
    let grants = alice
        .list_grants(airlock_proto::v1::ListGrantsRequest { all: false })
        .await
        .unwrap()
        .into_inner()
        .grants;
    assert_eq!(grants.len(), 1);
    assert_eq!(grants[0].account, "ci");

    alice
        .revoke_grant(airlock_proto::v1::RevokeGrantRequest {
            grant_id: held.grant_id.clone(),
        })
        .await
        .unwrap();
    let mut after = a.ask(request("g-3", "ci"));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        after.try_recv().is_err(),
        "a revoked grant approves nothing"
    );
    let g3 = alice
        .get(GetRequestRequest {
            request_id: "g-3".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(g3.state(), RequestState::Pending);
}

/// A grant never covers a request its own approver is behind, under any of the Unix accounts
/// the policy lists for them: alice grants `kubectl` for the `ci` account, then logs in as her
/// own `deploy-alice` and runs it as `ci`. Her vote on that request would be refused; her grant
/// must not approve it either.
async fn a_grant_never_covers_its_approvers_listed_unix_accounts(t: TestDb) {
    let policy = "[unix_accounts]\nalice = [\"deploy-alice\"]\n";
    let (url, t, _stop) = start_with(&t, Some(policy)).await;
    let a = agent(&url, "host-a", &t["host-a"]);
    assert!(a.wait_connected(Duration::from_secs(5)).await);
    let (mut alice, held) = alice_grants(&url, &t, &a, "own-1").await;

    let mut own = request("own-2", "ci");
    own.process.as_mut().unwrap().login_user = "deploy-alice".into();
    let mut mine = a.ask(own);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        mine.try_recv().is_err(),
        "alice's grant approved a request she is behind (login user deploy-alice)"
    );
    let got = alice
        .get(GetRequestRequest {
            request_id: "own-2".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.state(), RequestState::Pending, "{got:?}");
    // Someone else still gets the grant's help.
    let mut other = request("own-3", "ci");
    other.process.as_mut().unwrap().login_user = "bob".into();
    let d = tokio::time::timeout(Duration::from_secs(5), a.ask(other))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(d.verdict, Verdict::Allow as i32);
    assert!(d.decided_by.contains(&held.grant_id), "{}", d.decided_by);
}

async fn audit_export_agents_and_policy_services(t: TestDb) {
    use airlock_proto::v1::{
        agents_service_client::AgentsServiceClient, audit_service_client::AuditServiceClient,
        policy_service_client::PolicyServiceClient, AuditExportRequest, AuditQuery,
        AuditVerifyRequest, ExportFormat, GetPolicyRequest, ListAgentsRequest,
        ValidatePolicyRequest,
    };
    let (url, t, _stop) = start(&t).await;
    let a = agent(&url, "host-a", &t["host-a"]);
    assert!(a.wait_connected(Duration::from_secs(5)).await);
    let answer = a.ask(request("x-1", "ci"));
    let mut alice = approvals(&url, Some(&t["alice"])).await;
    wait_pending(&mut alice, 1).await;
    alice
        .decide(vote("x-1", Verdict::Deny, "no, \"really\""))
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(5), answer)
        .await
        .unwrap()
        .unwrap();

    let ch = tonic::transport::Channel::from_shared(url.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let reader = Bearer(Some(t["reader"].clone()));
    let mut audit = AuditServiceClient::with_interceptor(ch.clone(), reader.clone());
    let export = |format: ExportFormat| AuditExportRequest {
        query: Some(AuditQuery {
            request_id: "x-1".into(),
            ..Default::default()
        }),
        format: format as i32,
    };
    let mut stream = audit
        .export(export(ExportFormat::JsonLines))
        .await
        .unwrap()
        .into_inner();
    let mut jsonl = Vec::new();
    while let Some(c) = stream.message().await.unwrap() {
        jsonl.extend(c.data);
    }
    let lines: Vec<&str> = std::str::from_utf8(&jsonl).unwrap().lines().collect();
    assert_eq!(lines.len(), 2, "received and denied: {lines:?}");
    assert!(lines[1].contains("\"actor\":\"alice\"") && lines[1].contains("request.vote.deny"));
    let mut stream = audit
        .export(export(ExportFormat::Csv))
        .await
        .unwrap()
        .into_inner();
    let mut csv = Vec::new();
    while let Some(c) = stream.message().await.unwrap() {
        csv.extend(c.data);
    }
    let csv = String::from_utf8(csv).unwrap();
    assert!(
        csv.starts_with("seq,at_ms,actor,action,request_id,payload"),
        "{csv}"
    );
    assert_eq!(csv.lines().count(), 3);
    let unspecified = audit.export(export(ExportFormat::Unspecified)).await;
    assert_eq!(
        unspecified.err().map(|e| e.code()),
        Some(Code::InvalidArgument)
    );
    let v = audit
        .verify(AuditVerifyRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(v.intact && v.records >= 2, "{v:?}");

    let mut agents = AgentsServiceClient::with_interceptor(ch.clone(), reader.clone());
    let list = agents
        .list(ListAgentsRequest {})
        .await
        .unwrap()
        .into_inner()
        .agents;
    let host_a = list
        .iter()
        .find(|x| x.host_id == "host-a")
        .expect("host-a known");
    assert!(host_a.connected);

    let mut policy = PolicyServiceClient::with_interceptor(ch.clone(), reader);
    let status = policy.get(GetPolicyRequest {}).await.unwrap().into_inner();
    assert!(status.path.is_empty(), "built-in default");
    let bad = policy
        .validate(ValidatePolicyRequest {
            text: "[[rule]]\nname = 1\n".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        !bad.valid && bad.error.starts_with("candidate:2:8:"),
        "{bad:?}"
    );

    let mut anonymous = AuditServiceClient::new(ch);
    let denied = anonymous.verify(AuditVerifyRequest {}).await.unwrap_err();
    assert_eq!(denied.code(), Code::Unauthenticated);
}

async fn bad_policy_reload_is_refused_recorded_and_old_one_stays(t: TestDb) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("policy.toml");
    std::fs::write(
        &path,
        "[groups]\noncall = [\"alice\"]\n[[rule]]\nname = \"*\"\ngroups = [\"oncall\"]\n",
    )
    .unwrap();
    let plane = ControlPlane::new(t.open().await);
    plane.load_policy(&path).await.unwrap();
    std::fs::write(&path, "[[rule]]\nname = \"*\"\ngroups = [\"nobody\"]\n").unwrap();
    let err = plane.load_policy(&path).await.unwrap_err();
    assert!(
        err.to_string().contains("unknown group \"nobody\""),
        "{err}"
    );
    let policy = airlock_control_plane::policy::current(&plane.policy);
    assert_eq!(
        policy.groups.get("oncall").map(Vec::len),
        Some(1),
        "old policy still in force"
    );
    let status = plane.policy_status.lock().unwrap().clone();
    assert!(status.last_error.contains("nobody"));
    assert!(
        status.source.contains("oncall"),
        "status shows the policy in force"
    );
    let actions: Vec<String> = plane
        .store
        .audit_query(&Default::default())
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.action)
        .collect();
    assert_eq!(actions, ["policy.loaded", "policy.refused"]);
}

async fn cancel_tells_the_agent_to_deny(t: TestDb) {
    let (url, t, _stop) = start(&t).await;
    let a = agent(&url, "host-a", &t["host-a"]);
    assert!(a.wait_connected(Duration::from_secs(5)).await);
    let answer = a.ask(request("c-1", "ci"));
    let mut alice = approvals(&url, Some(&t["alice"])).await;
    wait_pending(&mut alice, 1).await;
    let mut admin = approvals(&url, Some(&t["root-admin"])).await;
    let no_reason = admin
        .cancel(airlock_proto::v1::CancelRequest {
            request_id: "c-1".into(),
            reason: " ".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(no_reason.code(), Code::InvalidArgument);
    let mut reader = approvals(&url, Some(&t["reader"])).await;
    let by_reader = reader
        .cancel(airlock_proto::v1::CancelRequest {
            request_id: "c-1".into(),
            reason: "x".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(by_reader.code(), Code::PermissionDenied);
    // Cancel skips groups, quorum and the self check: only admins may use it; approvers deny.
    let by_approver = alice
        .cancel(airlock_proto::v1::CancelRequest {
            request_id: "c-1".into(),
            reason: "x".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(
        by_approver.code(),
        Code::PermissionDenied,
        "{by_approver:?}"
    );
    let held = admin
        .cancel(airlock_proto::v1::CancelRequest {
            request_id: "c-1".into(),
            reason: "wrong ticket".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(held.state(), RequestState::Cancelled);
    let d = tokio::time::timeout(Duration::from_secs(5), answer)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(d.verdict, Verdict::Deny as i32);
    assert!(d.reason.contains("wrong ticket"), "{}", d.reason);
    let late = alice
        .decide(vote("c-1", Verdict::Allow, ""))
        .await
        .unwrap_err();
    assert_eq!(late.code(), Code::FailedPrecondition);
}

async fn agents_receive_their_rules_now_and_on_change(t: TestDb) {
    let policy = r#"
[[rule]]
name = "prod-kubectl"
hosts = { env = "prod" }
exec = ["/usr/bin/kubectl"]
args = ["delete *"]
decision = "ask"

[[rule]]
name = "staging-only"
hosts = { env = "staging" }
exec = ["/usr/bin/terraform"]
decision = "ask"
"#;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let store = t.open().await;
    let token = store.create_token("host-a", Scope::Agent).await.unwrap();
    let plane = ControlPlane::new(store);
    plane.set_policy(Policy::parse(policy, "p.toml").unwrap());
    let serving = plane.clone();
    tokio::spawn(async move {
        serving
            .serve(listener, std::future::pending())
            .await
            .unwrap()
    });

    let a = Decider::spawn(
        url,
        Hello {
            host_id: "host-a".into(),
            hostname: "host-a".into(),
            labels: [("env".to_owned(), "prod".to_owned())].into(),
            version: "test".into(),
        },
        Some(token),
    );
    let mut rules = a.rules();
    tokio::time::timeout(Duration::from_secs(5), rules.wait_for(Option::is_some))
        .await
        .unwrap()
        .unwrap();
    let first = rules.borrow_and_update().clone().unwrap();
    let parsed = airlock_agent::server_rules::parse(&first.rules_toml).unwrap();
    let names: Vec<&str> = parsed.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(
        names,
        ["prod-kubectl"],
        "only the rules for this host's labels"
    );
    assert_eq!(parsed[0].args, ["delete *"]);

    plane.set_policy(
        Policy::parse(
            "[[rule]]\nname = \"db\"\nconnect = [\"10.0.0.0/8\"]\ndecision = \"deny\"\n",
            "p.toml",
        )
        .unwrap(),
    );
    tokio::time::timeout(Duration::from_secs(5), rules.changed())
        .await
        .unwrap()
        .unwrap();
    let second = rules.borrow_and_update().clone().unwrap();
    assert_ne!(second.version, first.version);
    let parsed = airlock_agent::server_rules::parse(&second.rules_toml).unwrap();
    assert_eq!(parsed[0].name, "db");
}

async fn airlockctl_json_and_exit_codes(t: TestDb) {
    let (url, t, _stop) = start(&t).await;
    let a = agent(&url, "host-a", &t["host-a"]);
    assert!(a.wait_connected(Duration::from_secs(5)).await);
    let _pending = a.ask(request("j-1", "claude"));
    let mut alice = approvals(&url, Some(&t["alice"])).await;
    wait_pending(&mut alice, 1).await;
    let ctl = |token: &str, args: &[&str]| {
        let url = url.clone();
        let token = token.to_owned();
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        async move {
            tokio::process::Command::new(env!("CARGO_BIN_EXE_airlockctl"))
                .args(["--server", &url, "--token", &token, "--json"])
                .args(&args)
                .output()
                .await
                .unwrap()
        }
    };
    let out = ctl(&t["reader"], &["requests", "list"]).await;
    assert!(out.status.success(), "{out:?}");
    let first: serde_json::Value =
        serde_json::from_str(String::from_utf8_lossy(&out.stdout).lines().next().unwrap()).unwrap();
    assert_eq!(first["request"]["request_id"], "j-1");
    let own = ctl(&t["claude"], &["requests", "approve", "j-1"]).await;
    assert_eq!(own.status.code(), Some(4), "refused: own request");
    let missing = ctl(&t["alice"], &["requests", "show", "nope"]).await;
    assert_eq!(missing.status.code(), Some(3), "not found");
    let ok = ctl(
        &t["alice"],
        &["requests", "approve", "j-1", "--reason", "ok"],
    )
    .await;
    assert!(ok.status.success(), "{ok:?}");
    let decided: serde_json::Value = serde_json::from_slice(&ok.stdout).unwrap();
    assert_eq!(decided["decided_by"], "alice");
}

/// `exec -a $'kubectl get pods\e[8m' kubectl delete namespace payments`: the ESC sequence would
/// hide "delete namespace payments" on the approver's terminal right before the a/d prompt.
async fn airlockctl_escapes_agent_text_before_the_prompt(t: TestDb) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (url, t, _stop) = start(&t).await;
    let a = agent(&url, "host-a", &t["host-a"]);
    assert!(a.wait_connected(Duration::from_secs(5)).await);
    let mut req = request("esc-1", "claude");
    req.rule = "kubectl\u{1b}]0;title\u{7}".into();
    req.process.as_mut().unwrap().cwd = "/srv\u{1b}[2J\u{9b}8m".into();
    req.action = Some(airlock_proto::v1::action_request::Action::Exec(
        ExecAction {
            path: "/usr/bin/kubectl".into(),
            argv: vec![
                "kubectl get pods\u{1b}[8m".into(),
                "delete".into(),
                "namespace".into(),
                "payments\u{202e}".into(),
            ],
            ..Default::default()
        },
    ));
    let _pending = a.ask(req);
    let mut alice = approvals(&url, Some(&t["alice"])).await;
    wait_pending(&mut alice, 1).await;
    let raw = |b: &[u8]| {
        let text = String::from_utf8_lossy(b);
        text.chars()
            .any(|c| (c.is_control() && c != '\n') || ('\u{202a}'..='\u{202e}').contains(&c))
    };

    let mut watch = tokio::process::Command::new(env!("CARGO_BIN_EXE_airlockctl"))
        .args(["--server", &url, "--token", &t["alice"]])
        .args(["requests", "watch", "--decide"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut stdout = watch.stdout.take().unwrap();
    let mut seen = Vec::new();
    let prompt = tokio::time::timeout(Duration::from_secs(10), async {
        let mut buf = [0u8; 4096];
        while !String::from_utf8_lossy(&seen).contains("approve (a)") {
            let n = stdout.read(&mut buf).await.unwrap();
            assert!(n > 0, "airlockctl ended before the prompt");
            seen.extend_from_slice(&buf[..n]);
        }
    })
    .await;
    assert!(
        prompt.is_ok(),
        "no prompt: {}",
        String::from_utf8_lossy(&seen)
    );
    let shown = String::from_utf8_lossy(&seen).into_owned();
    assert!(
        !raw(&seen),
        "raw control characters reached the terminal: {shown:?}"
    );
    assert!(
        shown.contains(
            "action    /usr/bin/kubectl delete namespace payments\\u{202e} \
             [argv[0]: kubectl get pods\\u{1b}[8m]\n"
        ),
        "{shown}"
    );
    let mut stdin = watch.stdin.take().unwrap();
    stdin.write_all(b"\n").await.unwrap();
    drop(stdin);
    let _ = watch.kill().await;

    for json in [false, true] {
        let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_airlockctl"));
        cmd.args(["--server", &url, "--token", &t["alice"]]);
        if json {
            cmd.arg("--json");
        }
        let out = cmd.args(["requests", "list"]).output().await.unwrap();
        assert!(out.status.success(), "{out:?}");
        assert!(
            !raw(&out.stdout),
            "raw control characters in list (json: {json}): {:?}",
            String::from_utf8_lossy(&out.stdout)
        );
        if json {
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            assert_eq!(v["request"]["process"]["cwd"], "/srv\u{1b}[2J\u{9b}8m");
        }
    }
}

async fn only_admins_manage_tokens_and_revoked_tokens_stop_working(t: TestDb) {
    use airlock_proto::v1::{
        tokens_service_client::TokensServiceClient, CreateTokenRequest, RevokeTokenRequest,
    };
    let (url, t, _stop) = start(&t).await;
    let ch = tonic::transport::Channel::from_shared(url.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut as_alice =
        TokensServiceClient::with_interceptor(ch.clone(), Bearer(Some(t["alice"].clone())));
    let create = |name: &str, scope: &str| CreateTokenRequest {
        name: name.into(),
        scope: scope.into(),
        ..Default::default()
    };
    let refused = as_alice.create(create("eve", "admin")).await.unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied);

    let mut admin =
        TokensServiceClient::with_interceptor(ch, Bearer(Some(t["root-admin"].clone())));
    let bad_scope = admin.create(create("dave", "superuser")).await.unwrap_err();
    assert_eq!(bad_scope.code(), Code::InvalidArgument);
    let dave = admin
        .create(create("dave", "read"))
        .await
        .unwrap()
        .into_inner()
        .token;
    let twice = admin.create(create("dave", "read")).await.unwrap_err();
    assert_eq!(twice.code(), Code::AlreadyExists);
    // "dave " would be a second token, and a second vote, for one person.
    for odd in ["dave ", "dave\u{1b}[8m", ""] {
        let refused = admin.create(create(odd, "approve")).await.unwrap_err();
        assert_eq!(refused.code(), Code::InvalidArgument, "{odd:?}");
    }

    let mut as_dave = approvals(&url, Some(&dave)).await;
    as_dave.list(ListRequestsRequest::default()).await.unwrap();
    admin
        .revoke(RevokeTokenRequest {
            name: "dave".into(),
        })
        .await
        .unwrap();
    let gone = as_dave
        .list(ListRequestsRequest::default())
        .await
        .unwrap_err();
    assert_eq!(gone.code(), Code::Unauthenticated);
    // Both are audited as the admin who did them, not as "server".
    let mut audit = airlock_proto::v1::audit_service_client::AuditServiceClient::with_interceptor(
        tonic::transport::Channel::from_shared(url.clone())
            .unwrap()
            .connect()
            .await
            .unwrap(),
        Bearer(Some(t["root-admin"].clone())),
    );
    let records = audit
        .query(airlock_proto::v1::AuditQuery {
            action: "token.*".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .records;
    let actors: Vec<(&str, &str)> = records
        .iter()
        .filter(|r| r.payload.contains("\"dave\""))
        .map(|r| (r.action.as_str(), r.actor.as_str()))
        .collect();
    assert_eq!(
        actors,
        [
            ("token.created", "root-admin"),
            ("token.revoked", "root-admin")
        ]
    );
}

/// Revoking a token ends the streams it already opened: an agent session and a watcher, with
/// UNAUTHENTICATED, within a few seconds; others' streams stay up.
async fn revoking_a_token_ends_its_open_streams(t: TestDb) {
    use airlock_proto::v1::{
        agent_message::Msg, agent_service_client::AgentServiceClient,
        tokens_service_client::TokensServiceClient, AgentMessage, RevokeTokenRequest,
    };
    let (url, t, _stop) = start(&t).await;
    let ch = tonic::transport::Channel::from_shared(url.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut session = tonic::Request::new(tokio_stream::StreamExt::chain(
        tokio_stream::once(AgentMessage {
            msg: Some(Msg::Hello(Hello {
                host_id: "host-b".into(),
                hostname: "host-b".into(),
                ..Default::default()
            })),
        }),
        tokio_stream::pending(),
    ));
    session.metadata_mut().insert(
        "authorization",
        format!("Bearer {}", t["host-b"]).parse().unwrap(),
    );
    let mut agent_stream = AgentServiceClient::new(ch.clone())
        .session(session)
        .await
        .unwrap()
        .into_inner();
    let first = agent_stream.message().await.unwrap();
    assert!(first.is_some(), "the session sends its rules first");
    let watch = |token: &str| {
        let (url, token) = (url.clone(), token.to_owned());
        async move {
            approvals(&url, Some(&token))
                .await
                .watch(WatchRequestsRequest {
                    include_pending: false,
                })
                .await
                .unwrap()
                .into_inner()
        }
    };
    let mut bobs = watch(&t["bob"]).await;
    let mut alices = watch(&t["alice"]).await;

    let mut admin =
        TokensServiceClient::with_interceptor(ch, Bearer(Some(t["root-admin"].clone())));
    for name in ["host-b", "bob"] {
        admin
            .revoke(RevokeTokenRequest { name: name.into() })
            .await
            .unwrap();
    }
    fn ended<M: std::fmt::Debug>(r: Result<Option<M>, tonic::Status>, what: &str) {
        match r {
            Err(s) => assert_eq!(s.code(), Code::Unauthenticated, "{what}: {s:?}"),
            Ok(m) => panic!("{what} went on after its token was revoked: {m:?}"),
        }
    }
    let limit = Duration::from_secs(5);
    ended(
        tokio::time::timeout(limit, agent_stream.message())
            .await
            .expect("the agent session stayed open"),
        "agent session",
    );
    ended(
        tokio::time::timeout(limit, bobs.message())
            .await
            .expect("bob's watch stayed open"),
        "watch",
    );
    assert!(
        tokio::time::timeout(Duration::from_millis(300), alices.message())
            .await
            .is_err(),
        "alice's token is still good: her watch stays open"
    );
}

async fn overdue_requests_expire_and_bad_requests_lose_nothing(t: TestDb) {
    let (url, t, _stop) = start(&t).await;
    let a = agent(&url, "host-a", &t["host-a"]);
    assert!(a.wait_connected(Duration::from_secs(5)).await);
    let mut soon = request("e-1", "ci");
    soon.deadline_unix_ms = airlock_control_plane::types::now_ms() + 300;
    let _expiring = a.ask(soon);
    let _no_id = a.ask(request("", "ci"));
    let _kept = a.ask(request("k-1", "ci"));
    let mut alice = approvals(&url, Some(&t["alice"])).await;
    let mut expired = None;
    for _ in 0..60 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let h = alice
            .get(GetRequestRequest {
                request_id: "e-1".into(),
            })
            .await;
        if let Ok(h) = h {
            if h.get_ref().state() == RequestState::Expired {
                expired = Some(h.into_inner());
                break;
            }
        }
    }
    assert!(
        expired.is_some(),
        "the server marks an overdue request expired"
    );
    let late = alice
        .decide(vote("e-1", Verdict::Allow, "late"))
        .await
        .unwrap_err();
    assert_eq!(
        late.code(),
        Code::FailedPrecondition,
        "an expired request cannot be approved"
    );

    let all = alice
        .list(ListRequestsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .requests;
    let ids: Vec<String> = all
        .into_iter()
        .map(|h| h.request.unwrap().request_id)
        .collect();
    assert!(
        !ids.contains(&String::new()),
        "a request without id is not stored"
    );
    assert!(
        ids.contains(&"k-1".to_owned()),
        "the stream went on after the bad request: {ids:?}"
    );
    let bad_page = alice
        .list(ListRequestsRequest {
            page_token: "x".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(bad_page.code(), Code::InvalidArgument);
}

/// GET over a plain HTTP/1.0 connection; returns status line and body.
async fn http_get(addr: std::net::SocketAddr, path: &str) -> (String, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).await.unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
    (
        head.lines().next().unwrap_or_default().to_owned(),
        body.to_owned(),
    )
}

async fn health_readiness_and_metrics_over_http(t: TestDb) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let http = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let http_addr = http.local_addr().unwrap();
    let store = t.open().await;
    let agent_token = store.create_token("host-a", Scope::Agent).await.unwrap();
    let alice = store.create_token("alice", Scope::Approve).await.unwrap();
    let plane = ControlPlane::new(store);
    let (p1, p2) = (plane.clone(), plane.clone());
    tokio::spawn(async move { p1.serve(listener, std::future::pending()).await.unwrap() });
    tokio::spawn(async move {
        p2.serve_http(http, axum::Router::new(), std::future::pending())
            .await
            .unwrap()
    });

    assert_eq!(http_get(http_addr, "/healthz").await.0, "HTTP/1.0 200 OK");
    assert_eq!(http_get(http_addr, "/readyz").await.0, "HTTP/1.0 200 OK");
    let a = agent(&url, "host-a", &agent_token);
    assert!(a.wait_connected(Duration::from_secs(5)).await);
    let answer = a.ask(request("m-1", "ci"));
    let _pending = a.ask(request("m-2", "ci"));
    let mut c = approvals(&url, Some(&alice)).await;
    wait_pending(&mut c, 2).await;
    c.decide(vote("m-1", Verdict::Deny, "no")).await.unwrap();
    tokio::time::timeout(Duration::from_secs(5), answer)
        .await
        .unwrap()
        .unwrap();

    let (status, body) = http_get(http_addr, "/metrics").await;
    assert_eq!(status, "HTTP/1.0 200 OK");
    for expected in [
        "airlock_requests_total 2",
        "airlock_decisions_total{result=\"denied\"} 1",
        "airlock_pending_requests 1",
        "airlock_connected_agents 1",
        "airlock_decision_latency_seconds_count 1",
    ] {
        assert!(body.contains(expected), "missing {expected:?} in:\n{body}");
    }
}

/// A refusal the agent had to make on its own (a traced task) is reported for the record: it is
/// stored decided with the agent's cause, never pending, cannot be voted on, and is audited.
async fn an_action_the_agent_decided_is_recorded_not_asked(t: TestDb) {
    use airlock_proto::v1::{
        audit_service_client::AuditServiceClient, AuditExportRequest, AuditQuery, ExportFormat,
        LocalDecision,
    };
    let (url, t, _stop) = start(&t).await;
    let a = agent(&url, "host-a", &t["host-a"]);
    assert!(a.wait_connected(Duration::from_secs(5)).await);
    a.record(ActionRequest {
        decided: Some(LocalDecision {
            verdict: Verdict::Deny as i32,
            cause: "traced".into(),
            reason: "the task was being traced".into(),
            ..Default::default()
        }),
        ..request("local-1", "claude")
    });
    // A pending request after it: once it is listed, the report was handled before it.
    let _asked = a.ask(request("asked-1", "claude"));
    let mut alice = approvals(&url, Some(&t["alice"])).await;
    wait_pending(&mut alice, 1).await;
    let pending = alice
        .list(ListRequestsRequest {
            state: RequestState::Pending as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let ids: Vec<_> = pending
        .requests
        .iter()
        .filter_map(|h| h.request.as_ref().map(|r| r.request_id.as_str()))
        .collect();
    assert_eq!(ids, ["asked-1"], "the agent's own refusal is not pending");
    let got = alice
        .get(GetRequestRequest {
            request_id: "local-1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.state(), RequestState::Denied);
    assert_eq!(got.decided_by, "agent (traced)");
    assert_eq!(got.reason, "the task was being traced");
    let voted = alice.decide(vote("local-1", Verdict::Allow, "")).await;
    assert_eq!(
        voted.expect_err("nothing to decide").code(),
        Code::FailedPrecondition
    );

    let ch = tonic::transport::Channel::from_shared(url.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut audit = AuditServiceClient::with_interceptor(ch, Bearer(Some(t["reader"].clone())));
    let mut stream = audit
        .export(AuditExportRequest {
            query: Some(AuditQuery {
                request_id: "local-1".into(),
                ..Default::default()
            }),
            format: ExportFormat::JsonLines as i32,
        })
        .await
        .unwrap()
        .into_inner();
    let mut jsonl = Vec::new();
    while let Some(c) = stream.message().await.unwrap() {
        jsonl.extend(c.data);
    }
    let text = String::from_utf8(jsonl).unwrap();
    assert_eq!(text.lines().count(), 1, "{text}");
    assert!(
        text.contains("request.refused.agent") && text.contains("cause") && text.contains("traced"),
        "{text}"
    );
}

/// Observe mode and `on_timeout = "wait"` as the control plane keeps them: an observed action
/// is its own state (never an approval, nothing to decide, audited with what would have
/// happened); a waiting request never expires, while one with a deadline beside it does, and
/// can still be approved.
async fn observed_actions_are_kept_apart_and_waits_never_expire(t: TestDb) {
    use airlock_proto::v1::LocalDecision;
    let (url, t, _stop) = start(&t).await;
    let a = agent(&url, "host-a", &t["host-a"]);
    assert!(a.wait_connected(Duration::from_secs(5)).await);
    a.record(ActionRequest {
        decided: Some(LocalDecision {
            verdict: Verdict::Allow as i32,
            cause: "observe".into(),
            reason: "observe mode: rule \"kubectl\" would have said ask".into(),
            would_be: "ask".into(),
        }),
        ..request("seen-1", "ci")
    });
    let soon = airlock_control_plane::types::now_ms() + 300;
    let mut waits = request("wait-1", "ci");
    waits.deadline_unix_ms = soon;
    waits.wait = true;
    let answer = a.ask(waits);
    let mut expires = request("exp-1", "ci");
    expires.deadline_unix_ms = soon;
    let _expires = a.ask(expires);

    let mut alice = approvals(&url, Some(&t["alice"])).await;
    let get = |id: &'static str| GetRequestRequest {
        request_id: id.into(),
    };
    let mut expired = false;
    for _ in 0..60 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if let Ok(h) = alice.get(get("exp-1")).await {
            if h.get_ref().state() == RequestState::Expired {
                expired = true;
                break;
            }
        }
    }
    assert!(expired, "the request with a deadline expires");
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let w = alice.get(get("wait-1")).await.unwrap().into_inner();
    assert_eq!(
        w.state(),
        RequestState::Pending,
        "a waiting request never expires"
    );
    assert!(w
        .request
        .as_ref()
        .is_some_and(|r| r.wait && r.deadline_unix_ms == 0));
    alice
        .decide(vote("wait-1", Verdict::Allow, "go"))
        .await
        .expect("a waiting request can be approved however late");
    let d = tokio::time::timeout(Duration::from_secs(5), answer)
        .await
        .expect("decision in time")
        .expect("decision");
    assert_eq!(d.verdict, Verdict::Allow as i32);

    // What observe mode recorded, proposed as rules the agent loads as they are.
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_airlockctl"))
        .args(["--server", &url, "--token", &t["reader"]])
        .args(["policy", "suggest", "--account", "ci"])
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    let rules = agent_rules::config::Config::parse(&text, std::path::Path::new("suggested.toml"))
        .unwrap_or_else(|e| panic!("{e}\n{text}"))
        .rules;
    assert_eq!(rules.len(), 1, "{text}");
    assert_eq!(rules[0].exec, ["/usr/bin/kubectl"]);
    assert_eq!(rules[0].args, ["* delete *"]);
    assert_eq!(rules[0].accounts, ["ci"]);
    assert_eq!(rules[0].decision, agent_rules::policy::Decision::Ask);
    let seen = alice.get(get("seen-1")).await.unwrap().into_inner();
    assert_eq!(seen.state(), RequestState::Observed);
    assert_eq!(seen.decided_by, "agent (observe)");
    let voted = alice.decide(vote("seen-1", Verdict::Allow, "")).await;
    assert_eq!(
        voted.expect_err("nothing to decide").code(),
        Code::FailedPrecondition
    );
    let listed = alice
        .list(ListRequestsRequest {
            state: RequestState::Observed as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .requests;
    let ids: Vec<_> = listed
        .iter()
        .filter_map(|h| h.request.as_ref().map(|r| r.request_id.as_str()))
        .collect();
    assert_eq!(ids, ["seen-1"], "observed actions are listed apart");
    let approved = alice
        .list(ListRequestsRequest {
            state: RequestState::Approved as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .requests;
    assert!(
        approved
            .iter()
            .all(|h| h.request.as_ref().is_some_and(|r| r.request_id != "seen-1")),
        "an observed action is never an approval"
    );
}

/// A request asked ahead (`airlock-agent mcp`): its approval is a grant for that program and
/// arguments, account, host, directory and allowed environment values, whatever argv[0] and
/// the other environment names the real task has; anything else stays pending. The agent's
/// query service answers about its own host only.
async fn asked_ahead_approval_is_a_grant_for_that_action_only(t: TestDb) {
    use airlock_proto::v1::{
        agent_query_service_client::AgentQueryServiceClient, EnvVar, GetHostRequest, RecentQuery,
        RouteQuery,
    };
    let (url, t, _stop) = start(&t).await;
    let a = agent(&url, "host-a", &t["host-a"]);
    assert!(a.wait_connected(Duration::from_secs(5)).await);
    let shaped = |id: &str, argv0: &str, cwd: &str, extra_env: &str| {
        let mut r = request(id, "ci");
        if let Some(airlock_proto::v1::action_request::Action::Exec(e)) = r.action.as_mut() {
            e.argv[0] = argv0.into();
        }
        let p = r.process.as_mut().expect("process");
        p.cwd = cwd.into();
        p.env = vec![
            EnvVar {
                name: "KUBECONFIG".into(),
                value: Some("/home/ci/.kube/staging".into()),
            },
            EnvVar {
                name: extra_env.into(),
                value: None,
            },
        ];
        r
    };
    let mut ahead = shaped("ahead-1", "kubectl", "/work", "MCP_ONLY");
    ahead.asked_ahead = true;
    ahead.justification = "INC-42: remove the broken namespace".into();
    ahead.ahead_minutes = 5;
    let asked = a.ask(ahead);
    let mut alice = approvals(&url, Some(&t["alice"])).await;
    wait_pending(&mut alice, 1).await;
    let held = alice
        .decide(vote("ahead-1", Verdict::Allow, "go ahead"))
        .await
        .unwrap()
        .into_inner();
    assert!(!held.grant_id.is_empty(), "approving it made a grant");
    tokio::time::timeout(Duration::from_secs(5), asked)
        .await
        .unwrap()
        .unwrap();

    // The real command: another argv[0], other environment names; passes at once.
    let real = a.ask(shaped("real-1", "/usr/bin/kubectl", "/work", "SHLVL"));
    let d = tokio::time::timeout(Duration::from_secs(5), real)
        .await
        .expect("answered at once")
        .unwrap();
    assert_eq!(d.verdict, Verdict::Allow as i32);
    assert!(d.decided_by.contains(&held.grant_id), "{}", d.decided_by);
    // Another directory, or another kubeconfig: not covered.
    let mut elsewhere = a.ask(shaped("real-2", "kubectl", "/prod", "SHLVL"));
    let mut other_env = shaped("real-3", "kubectl", "/work", "SHLVL");
    other_env.process.as_mut().unwrap().env[0].value = Some("/home/ci/.kube/prod".into());
    let mut other_env = a.ask(other_env);
    // Another name for the program (busybox run as `rm`), or an environment name the asking
    // process lacked (TF_CLI_ARGS, LD_PRELOAD): not covered.
    let mut renamed = a.ask(shaped("real-4", "/tmp/rm", "/work", "SHLVL"));
    let mut preloaded = a.ask(shaped("real-5", "kubectl", "/work", "LD_PRELOAD"));
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(elsewhere.try_recv().is_err(), "another cwd is not covered");
    assert!(
        other_env.try_recv().is_err(),
        "another KUBECONFIG is not covered"
    );
    assert!(
        renamed.try_recv().is_err(),
        "another argv[0] is not covered"
    );
    assert!(
        preloaded.try_recv().is_err(),
        "a new environment name is not covered"
    );
    let grants = alice
        .list_grants(airlock_proto::v1::ListGrantsRequest { all: false })
        .await
        .unwrap()
        .into_inner()
        .grants;
    let g = grants
        .iter()
        .find(|g| g.id == held.grant_id)
        .expect("the grant");
    let minutes = (g.expires_unix_ms - g.created_unix_ms) / 60_000;
    assert_eq!(
        minutes, 5,
        "the window the agent asked for, as no approver chose one"
    );

    // The agent's own questions: about its host only.
    let query = |token: &str| {
        let url = url.clone();
        let bearer: tonic::metadata::MetadataValue<_> = format!("Bearer {token}").parse().unwrap();
        async move {
            let ch = tonic::transport::Channel::from_shared(url)
                .unwrap()
                .connect()
                .await
                .unwrap();
            AgentQueryServiceClient::with_interceptor(ch, move |mut r: tonic::Request<()>| {
                r.metadata_mut().insert("authorization", bearer.clone());
                Ok(r)
            })
        }
    };
    let mut qa = query(&t["host-a"]).await;
    let route = qa
        .route(RouteQuery {
            request: Some(shaped("probe", "kubectl", "/work", "MCP_ONLY")),
            labels: Default::default(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(route.grant_id, held.grant_id, "the dry run sees the grant");
    assert_eq!(route.quorum, 1);
    let got = qa
        .get(GetHostRequest {
            request_id: "ahead-1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.votes.len(), 1);
    let recent = qa
        .recent(RecentQuery {
            account: "ci".into(),
            limit: 10,
        })
        .await
        .unwrap()
        .into_inner()
        .requests;
    assert_eq!(recent.len(), 6, "ahead-1, real-1 .. real-5");
    let mut qb = query(&t["host-b"]).await;
    let other_host = qb
        .get(GetHostRequest {
            request_id: "ahead-1".into(),
        })
        .await
        .expect_err("another host's request is not found");
    assert_eq!(other_host.code(), Code::NotFound);
    let none = qb
        .recent(RecentQuery {
            account: "ci".into(),
            limit: 10,
        })
        .await
        .unwrap()
        .into_inner()
        .requests;
    assert!(none.is_empty(), "host-b sees none of host-a's requests");
    let mut approver = query(&t["alice"]).await;
    let refused = approver
        .get(GetHostRequest {
            request_id: "ahead-1".into(),
        })
        .await
        .expect_err("an approver token is not an agent credential");
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
}

both!(
    decision_reaches_the_right_agent_and_request,
    refusals_are_precise_and_lose_nothing,
    agent_stream_needs_its_own_credential,
    resent_request_is_one_request_and_watchers_see_it,
    quorum_of_two_from_the_rules_group_and_deny_wins,
    grant_answers_the_same_action_at_once_until_revoked,
    a_grant_never_covers_its_approvers_listed_unix_accounts,
    audit_export_agents_and_policy_services,
    cancel_tells_the_agent_to_deny,
    agents_receive_their_rules_now_and_on_change,
    airlockctl_json_and_exit_codes,
    airlockctl_escapes_agent_text_before_the_prompt,
    only_admins_manage_tokens_and_revoked_tokens_stop_working,
    revoking_a_token_ends_its_open_streams,
    overdue_requests_expire_and_bad_requests_lose_nothing,
    health_readiness_and_metrics_over_http,
    bad_policy_reload_is_refused_recorded_and_old_one_stays,
    an_action_the_agent_decided_is_recorded_not_asked,
    observed_actions_are_kept_apart_and_waits_never_expire,
    asked_ahead_approval_is_a_grant_for_that_action_only,
);
