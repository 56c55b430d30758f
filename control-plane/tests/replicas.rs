//! Several replicas on one database, in one process, over real sockets, on both backends (two
//! stores on one SQLite file, or on one PostgreSQL database): what one replica is told reaches
//! the others' watchers, web streams and notification channels once; a vote on one reaches
//! the agent on another; grants, revocations and the policy apply everywhere; one person votes
//! once across replicas; expiry happens once; an agent moves to another replica when its own
//! stops, and its held request is decided there.

#[path = "support/db.rs"]
mod db;

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use airlock_agent::decider::{Connection, Decider};
use airlock_control_plane::{
    auth::{accounts, Scope},
    config::{Limits, ServerConfig, WebConfig},
    decide::Approver,
    notify::{self, Hub},
    policy::Policy,
    store::StoreError,
    types::now_ms,
    web::{Settings, Web},
    ControlPlane,
};
use airlock_proto::v1::{
    action_request::Action, approval_service_client::ApprovalServiceClient, ActionRequest,
    DecideRequest, ExecAction, Hello, ListRequestsRequest, ProcessContext, RequestState, Verdict,
    WatchRequestsRequest,
};
use db::TestDb;
use tokio_stream::StreamExt;

const PASSWORD: &str = "a long test password";

/// One replica: its control plane, gRPC and web addresses, and a way to stop it.
struct Replica {
    plane: ControlPlane,
    grpc: String,
    web: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Replica {
    /// A replica on `t`'s database, serving gRPC and the web UI on loopback.
    async fn start(t: &TestDb) -> Replica {
        let plane = ControlPlane::new(t.open().await);
        let grpc = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let http = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (grpc_url, web) = (
            format!("http://{}", grpc.local_addr().unwrap()),
            format!("http://{}", http.local_addr().unwrap()),
        );
        let settings = Settings::new(url::Url::parse(&web).unwrap(), &WebConfig::default());
        let router = Web::new(plane.clone(), settings, None).router();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let p = plane.clone();
        tokio::spawn(async move {
            p.serve(grpc, async {
                let _ = rx.await;
            })
            .await
            .unwrap()
        });
        let p = plane.clone();
        tokio::spawn(async move { p.serve_http(http, router, std::future::pending()).await });
        Replica {
            plane,
            grpc: grpc_url,
            web,
            stop: Some(tx),
        }
    }

    async fn approvals(&self, token: &str) -> ApprovalClient {
        approvals(&self.grpc, token).await
    }
}

/// Puts the bearer token on every call.
#[derive(Clone)]
struct Bearer(String);

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        let value = format!("Bearer {}", self.0).parse().unwrap();
        req.metadata_mut().insert("authorization", value);
        Ok(req)
    }
}

type ApprovalClient = ApprovalServiceClient<
    tonic::service::interceptor::InterceptedService<tonic::transport::Channel, Bearer>,
>;

async fn approvals(url: &str, token: &str) -> ApprovalClient {
    let ch = tonic::transport::Channel::from_shared(url.to_owned())
        .unwrap()
        .connect()
        .await
        .unwrap();
    ApprovalServiceClient::with_interceptor(ch, Bearer(token.to_owned()))
}

fn hello(host: &str) -> Hello {
    Hello {
        host_id: host.into(),
        hostname: host.into(),
        ..Default::default()
    }
}

fn request(id: &str) -> ActionRequest {
    ActionRequest {
        request_id: id.into(),
        rule: "kubectl".into(),
        process: Some(ProcessContext {
            user: "ci".into(),
            ..Default::default()
        }),
        action: Some(Action::Exec(ExecAction {
            path: "/usr/bin/kubectl".into(),
            argv: ["kubectl", "delete", "ns", "prod"]
                .map(String::from)
                .to_vec(),
            ..Default::default()
        })),
        deadline_unix_ms: now_ms() + 600_000,
        ..Default::default()
    }
}

fn allow(id: &str) -> DecideRequest {
    DecideRequest {
        request_id: id.into(),
        verdict: Verdict::Allow as i32,
        reason: "ok".into(),
        approver: String::new(),
        grant_minutes: 0,
    }
}

/// Two replicas, agent `host-a` and approver tokens alice, bob and a reader.
struct Pair {
    a: Replica,
    b: Replica,
    agent_token: String,
    alice: String,
    bob: String,
}

async fn pair(t: &TestDb) -> Pair {
    let a = Replica::start(t).await;
    let b = Replica::start(t).await;
    let s = &a.plane.store;
    let agent_token = s.create_token("host-a", Scope::Agent).await.unwrap();
    let alice = s.create_token("alice", Scope::Approve).await.unwrap();
    let bob = s.create_token("bob", Scope::Approve).await.unwrap();
    Pair {
        a,
        b,
        agent_token,
        alice,
        bob,
    }
}

/// Polls `f` until it is true, for at most ten seconds.
async fn until<F, Fut>(what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(10);
    while !f().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A webhook receiver that records the event and request of every call.
async fn receiver() -> (String, Arc<Mutex<Vec<(String, String)>>>) {
    let seen: Arc<Mutex<Vec<(String, String)>>> = Arc::default();
    let s = seen.clone();
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |body: axum::body::Bytes| {
            let s = s.clone();
            async move {
                let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
                let id = v["request"]["request"]["request_id"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned();
                s.lock()
                    .unwrap()
                    .push((v["event"].as_str().unwrap_or_default().to_owned(), id));
                "ok"
            }
        }),
    );
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", l.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(l, app).await });
    (url, seen)
}

async fn a_request_on_one_replica_reaches_the_others_watchers_web_and_channels(mut t: TestDb) {
    let p = pair(&t).await;
    accounts::create(&p.b.plane.store, "carol", PASSWORD, &[])
        .await
        .unwrap();
    // The same webhook configured on both replicas: it must hear each event once.
    let (hook, seen) = receiver().await;
    let key = t.dir().join("hook.key");
    std::fs::write(&key, "k").unwrap();
    let cfg = ServerConfig::parse(
        &format!(
            "[[webhook]]\nname = \"siem\"\nurl = \"{hook}\"\nsecret_file = {:?}\n",
            key.display().to_string()
        ),
        "server.toml",
    )
    .unwrap();
    let public = url::Url::parse("https://airlock.test").unwrap();
    let channels = notify::channels_from_config(&cfg, &public).unwrap();
    let _hubs = [
        Hub::start(
            p.a.plane.store.clone(),
            &channels,
            p.a.plane.metrics.clone(),
        )
        .await
        .unwrap(),
        Hub::start(
            p.b.plane.store.clone(),
            &channels,
            p.b.plane.metrics.clone(),
        )
        .await
        .unwrap(),
    ];
    // B's watcher and B's web event stream.
    let mut watch =
        p.b.approvals(&p.bob)
            .await
            .watch(WatchRequestsRequest {
                include_pending: false,
            })
            .await
            .unwrap()
            .into_inner();
    let http = reqwest::Client::builder()
        .cookie_store(true)
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let page = http
        .get(format!("{}/login", p.b.web))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let csrf = page
        .split("name=\"login_csrf\" value=\"")
        .nth(1)
        .and_then(|s| s.split('"').next())
        .unwrap()
        .to_owned();
    let r = http
        .post(format!("{}/login", p.b.web))
        .form(&[
            ("name", "carol"),
            ("password", PASSWORD),
            ("login_csrf", &csrf),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 303);
    let mut events = http
        .get(format!("{}/events", p.b.web))
        .send()
        .await
        .unwrap()
        .bytes_stream();

    // The agent talks to A only.
    let agent = Decider::spawn(
        p.a.grpc.clone(),
        hello("host-a"),
        Some(p.agent_token.clone()),
    );
    assert!(agent.wait_connected(Duration::from_secs(5)).await);
    let answer = agent.ask(request("x-1"));
    let seen_on_b = tokio::time::timeout(Duration::from_secs(5), watch.message())
        .await
        .expect("B's watcher is told")
        .unwrap()
        .unwrap();
    assert_eq!(seen_on_b.request.unwrap().request_id, "x-1");
    let chunk = tokio::time::timeout(Duration::from_secs(5), events.next())
        .await
        .expect("B's web stream is told")
        .unwrap()
        .unwrap();
    assert!(String::from_utf8_lossy(&chunk).contains("x-1"));

    // Decided on B; the agent, on A, gets it.
    p.b.approvals(&p.alice)
        .await
        .decide(allow("x-1"))
        .await
        .unwrap();
    let d = tokio::time::timeout(Duration::from_secs(5), answer)
        .await
        .expect("the decision reaches the agent on the other replica")
        .unwrap();
    assert_eq!(d.verdict, Verdict::Allow as i32);
    until("both webhook events", || {
        let n = seen.lock().unwrap().len();
        async move { n >= 2 }
    })
    .await;
    // Long enough for a second replica's duplicate to arrive, if there were one.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let got = seen.lock().unwrap().clone();
    assert_eq!(
        got,
        [
            ("request.received".to_owned(), "x-1".to_owned()),
            ("request.decided".to_owned(), "x-1".to_owned())
        ],
        "each event once, not once per replica"
    );
}

async fn grants_revocations_and_the_policy_apply_on_every_replica(mut t: TestDb) {
    let p = pair(&t).await;
    let agent = Decider::spawn(
        p.a.grpc.clone(),
        hello("host-a"),
        Some(p.agent_token.clone()),
    );
    assert!(agent.wait_connected(Duration::from_secs(5)).await);
    // A grant made on B approves the same action on A at once.
    let first = agent.ask(request("g-1"));
    until("g-1 stored", || {
        let s = p.b.plane.store.clone();
        async move { s.get("g-1").await.is_ok() }
    })
    .await;
    let mut with_grant = allow("g-1");
    with_grant.grant_minutes = 5;
    p.b.approvals(&p.alice)
        .await
        .decide(with_grant)
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(5), first)
        .await
        .unwrap()
        .unwrap();
    let again = tokio::time::timeout(Duration::from_secs(5), agent.ask(request("g-2")))
        .await
        .expect("approved at once by the grant")
        .unwrap();
    assert_eq!(again.verdict, Verdict::Allow as i32);
    assert!(
        again.decided_by.starts_with("grant "),
        "{}",
        again.decided_by
    );

    // A token revoked on A no longer works on B.
    let mut bob_on_b = p.b.approvals(&p.bob).await;
    bob_on_b.list(ListRequestsRequest::default()).await.unwrap();
    assert!(p.a.plane.store.revoke_token("bob").await.unwrap());
    until("bob refused on B", || {
        let mut c = bob_on_b.clone();
        async move {
            c.list(ListRequestsRequest::default())
                .await
                .is_err_and(|e| e.code() == tonic::Code::Unauthenticated)
        }
    })
    .await;

    // A policy loaded on A routes requests on B.
    let dir = t.dir();
    let path = dir.join("policy.toml");
    std::fs::write(
        &path,
        "[groups]\noncall = [\"alice\", \"bob\"]\n[[rule]]\nname = \"*\"\ngroups = [\"oncall\"]\nquorum = 2\n",
    )
    .unwrap();
    p.a.plane.load_policy(&path).await.unwrap();
    until("the policy on B", || {
        let policy = airlock_control_plane::policy::current(&p.b.plane.policy);
        async move {
            policy
                .route("kubectl", &Default::default(), "ci", "")
                .quorum
                == 2
        }
    })
    .await;
    let status = p.b.plane.policy_status.lock().unwrap().clone();
    assert!(status.source.contains("quorum = 2"), "{status:?}");
}

async fn one_person_votes_once_across_replicas(t: TestDb) {
    let p = pair(&t).await;
    let policy = Policy::parse("[[rule]]\nname = \"*\"\nquorum = 2\n", "p").unwrap();
    p.a.plane.set_policy(policy.clone());
    p.b.plane.set_policy(policy);
    let route = airlock_control_plane::policy::current(&p.a.plane.policy).route(
        "kubectl",
        &Default::default(),
        "ci",
        "",
    );
    for i in 0..30 {
        let id = format!("v{i}");
        p.a.plane
            .store
            .receive(&hello("h"), &route, request(&id), &Limits::default())
            .await
            .unwrap();
        let (da, db) = (p.a.plane.decisions(), p.b.plane.decisions());
        let (ia, ib) = (id.clone(), id.clone());
        let (ra, rb) = tokio::join!(
            tokio::spawn(async move {
                da.decide(&Approver::named("alice"), &ia, Verdict::Allow, "ok", 0)
                    .await
            }),
            tokio::spawn(async move {
                db.decide(
                    &Approver::named("ALICE@example.com"),
                    &ib,
                    Verdict::Allow,
                    "ok",
                    0,
                )
                .await
            }),
        );
        let oks = [ra.unwrap(), rb.unwrap()]
            .iter()
            .filter(|r| r.is_ok())
            .count();
        let held = p.a.plane.store.get(&id).await.unwrap();
        assert_eq!(
            (oks, held.votes.len(), held.state()),
            (1, 1, RequestState::Pending),
            "one person, one vote, on {id}"
        );
    }
}

async fn expiry_happens_once_and_the_trail_is_one_chain(t: TestDb) {
    let p = pair(&t).await;
    for i in 0..20 {
        let mut r = request(&format!("e{i}"));
        r.deadline_unix_ms = now_ms() + 300;
        p.a.plane
            .store
            .receive(&hello("h"), &Default::default(), r, &Limits::default())
            .await
            .unwrap();
    }
    // Both replicas expire on their own timers; and write concurrently meanwhile.
    let mut writers = Vec::new();
    for (i, r) in [&p.a, &p.b].into_iter().enumerate() {
        for n in 0..50 {
            let s = r.plane.store.clone();
            writers.push(tokio::spawn(async move {
                s.audit_event("test", "test.write", &format!("{{\"r\":{i},\"n\":{n}}}"))
                    .await
                    .unwrap()
            }));
        }
    }
    for w in writers {
        w.await.unwrap();
    }
    until("every request expired", || {
        let s = p.b.plane.store.clone();
        async move {
            let q = ListRequestsRequest {
                state: RequestState::Pending as i32,
                ..Default::default()
            };
            s.list(&q, 100).await.unwrap().0.is_empty()
        }
    })
    .await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let expired =
        p.a.plane
            .store
            .audit_query(&airlock_control_plane::audit::Filter {
                action: Some("request.expired".into()),
                ..Default::default()
            })
            .await
            .unwrap();
    let mut ids: Vec<&str> = expired.iter().map(|r| r.request_id.as_str()).collect();
    ids.sort_unstable();
    let before = ids.len();
    ids.dedup();
    assert_eq!((before, ids.len()), (20, 20), "each request expired once");
    let n = p.b.plane.store.verify_audit().await.unwrap();
    assert!(n >= 20 + 20 + 100 + 3, "{n}");
    assert_eq!(p.a.plane.verifier.check().await.unwrap(), n);
}

async fn an_agent_moves_to_another_replica_and_its_hold_is_decided_there(t: TestDb) {
    let mut p = pair(&t).await;
    let conn = Connection {
        url: format!("{},{}", p.a.grpc, p.b.grpc),
        token: Some(p.agent_token.clone()),
        tls: None,
    };
    let agent = Decider::spawn_with(conn, hello("host-a"));
    assert!(agent.wait_connected(Duration::from_secs(5)).await);
    let answer = agent.ask(request("m-1"));
    until("m-1 stored", || {
        let s = p.a.plane.store.clone();
        async move { s.get("m-1").await.is_ok() }
    })
    .await;
    let on_a = |agents: Vec<String>| agents.contains(&"host-a".to_owned());
    assert!(on_a(p.a.plane.agents.connected()));
    // A stops; the agent moves to B and sends its held request again.
    p.a.stop.take().unwrap().send(()).unwrap();
    until("the agent on B", || {
        let connected = p.b.plane.agents.connected();
        async move { on_a(connected) }
    })
    .await;
    p.b.approvals(&p.alice)
        .await
        .decide(allow("m-1"))
        .await
        .unwrap();
    let d = tokio::time::timeout(Duration::from_secs(5), answer)
        .await
        .expect("the decision reaches the agent on B")
        .unwrap();
    assert_eq!(
        (d.request_id.as_str(), d.verdict),
        ("m-1", Verdict::Allow as i32)
    );
    // One request, not two.
    let all =
        p.b.plane
            .store
            .list(&Default::default(), 100)
            .await
            .unwrap()
            .0;
    assert_eq!(all.len(), 1);
    let late =
        p.b.plane
            .store
            .vote("m-1", "bob", Verdict::Deny, "late", 0)
            .await
            .unwrap_err();
    assert!(matches!(late, StoreError::NotPending { .. }), "{late}");
}

both!(
    a_request_on_one_replica_reaches_the_others_watchers_web_and_channels,
    grants_revocations_and_the_policy_apply_on_every_replica,
    one_person_votes_once_across_replicas,
    expiry_happens_once_and_the_trail_is_one_chain,
    an_agent_moves_to_another_replica_and_its_hold_is_decided_there,
);
