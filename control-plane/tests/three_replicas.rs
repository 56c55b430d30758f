//! Three `airlock-server` processes on one PostgreSQL cluster of this test's own (it restarts
//! the cluster, so it shares it with no other test), with Slack and a webhook configured on all
//! three, fakes on loopback:
//!
//! - the agent on A, the approver on B: the decision lands; one Slack message and one webhook
//!   delivery per event, not one per replica;
//! - A killed (SIGKILL) mid-hold: the agent moves to B, sends the hold again, and the decision
//!   made there lands; requests that only A's agents had sent expire once, on another replica;
//! - PostgreSQL restarted mid-run: the replicas reconnect and catch up; a watcher on C that was
//!   open all along has seen every request; a request sent during the outage is decided;
//! - the audit trail is one chain that verifies, read back with `airlockctl audit verify`.

#[path = "support/server.rs"]
mod server;

use std::{
    collections::HashMap,
    path::Path,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use airlock_agent::decider::{Connection, Decider};
use airlock_control_plane::{audit::Filter, store::Store};
use airlock_proto::v1::{
    action_request::Action, approval_service_client::ApprovalServiceClient, ActionRequest,
    DecideRequest, ExecAction, Hello, ProcessContext, Verdict, WatchRequestsRequest,
};
use airlock_testkit::{Cluster, Durability};
use server::Server;

const BOT: &str = "xoxb-test-token";

/// What the fakes were sent: (path or event, request id, delivery id).
type Calls = Arc<Mutex<Vec<(String, String, String)>>>;

/// A fake Slack Web API (checking the bot token) and a webhook receiver on one listener.
async fn fakes() -> (String, Calls) {
    let calls: Calls = Arc::default();
    let slack = |path: &'static str, calls: Calls| {
        axum::routing::post(
            move |headers: axum::http::HeaderMap, body: axum::body::Bytes| async move {
                let auth = headers
                    .get("authorization")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default();
                if auth != format!("Bearer {BOT}") {
                    return axum::Json(serde_json::json!({"ok": false, "error": "invalid_auth"}));
                }
                let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
                // The request id is the Approve button's value, or in the context line.
                let text = v["blocks"].to_string();
                let id = text
                    .split("Request ")
                    .nth(1)
                    .and_then(|s| s.split(' ').next())
                    .unwrap_or_default()
                    .to_owned();
                calls.lock().unwrap().push((path.into(), id, String::new()));
                axum::Json(serde_json::json!({"ok": true, "channel": "C1", "ts": "1.1"}))
            },
        )
    };
    let hook_calls = calls.clone();
    let app = axum::Router::new()
        .route("/api/chat.postMessage", slack("post", calls.clone()))
        .route("/api/chat.update", slack("update", calls.clone()))
        .route(
            "/hook",
            axum::routing::post(
                move |headers: axum::http::HeaderMap, body: axum::body::Bytes| async move {
                    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
                    let delivery = headers["x-airlock-delivery"].to_str().unwrap().to_owned();
                    hook_calls.lock().unwrap().push((
                        v["event"].as_str().unwrap().to_owned(),
                        v["request"]["request"]["request_id"]
                            .as_str()
                            .unwrap()
                            .to_owned(),
                        delivery,
                    ));
                    "ok"
                },
            ),
        );
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", l.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(l, app).await });
    (url, calls)
}

fn server_toml(dir: &Path, fakes: &str) -> std::path::PathBuf {
    let secret = |name: &str, value: &str| {
        let p = dir.join(name);
        std::fs::write(&p, value).unwrap();
        p.display().to_string()
    };
    let text = format!(
        "[slack]\nchannel = \"C1\"\nbot_token_file = {:?}\nsigning_secret_file = {:?}\n\
         api_url = \"{fakes}/api\"\n\n[[webhook]]\nname = \"siem\"\nurl = \"{fakes}/hook\"\n\
         secret_file = {:?}\n",
        secret("bot", BOT),
        secret("signing", "signing-secret"),
        secret("hook", "hook-key"),
    );
    let path = dir.join("server.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// `airlock-server tokens create` on the database: prints the token.
fn token(db: &str, name: &str, scope: &str) -> String {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_airlock-server"))
        .args([
            "tokens",
            "create",
            "--database",
            db,
            "--name",
            name,
            "--scope",
            scope,
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

fn request(id: &str, deadline_in_ms: i64) -> ActionRequest {
    ActionRequest {
        request_id: id.into(),
        rule: "kubectl".into(),
        process: Some(ProcessContext {
            user: "ci".into(),
            ..Default::default()
        }),
        action: Some(Action::Exec(ExecAction {
            path: "/usr/bin/kubectl".into(),
            argv: vec!["kubectl".into(), "delete".into(), id.into()],
            ..Default::default()
        })),
        deadline_unix_ms: airlock_control_plane::types::now_ms() + deadline_in_ms,
        ..Default::default()
    }
}

#[derive(Clone)]
struct Bearer(String);

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        let value = format!("Bearer {}", self.0).parse().unwrap();
        req.metadata_mut().insert("authorization", value);
        Ok(req)
    }
}

type Approvals = ApprovalServiceClient<
    tonic::service::interceptor::InterceptedService<tonic::transport::Channel, Bearer>,
>;

async fn approvals(url: &str, token: &str) -> Approvals {
    let ch = tonic::transport::Channel::from_shared(url.to_owned())
        .unwrap()
        .connect()
        .await
        .unwrap();
    ApprovalServiceClient::with_interceptor(ch, Bearer(token.to_owned()))
}

/// Decides `id` on `c`, trying again while the replica cannot reach its database.
async fn approve(c: &mut Approvals, id: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = c
            .decide(DecideRequest {
                request_id: id.into(),
                verdict: Verdict::Allow as i32,
                reason: "ok".into(),
                approver: String::new(),
                grant_minutes: 0,
            })
            .await;
        match r {
            Ok(_) => return,
            Err(e) if Instant::now() < deadline => {
                tracing_note(&format!("decide {id}: {e:?}; trying again"));
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("deciding {id}: {e:?}"),
        }
    }
}

fn tracing_note(s: &str) {
    eprintln!("three_replicas: {s}");
}

async fn until<F: FnMut() -> bool>(what: &str, secs: u64, mut f: F) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_one_postgres_nothing_lost() {
    let cluster = Cluster::start(Durability::Fast).unwrap();
    let db = cluster.create_database("airlock").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (fake_url, calls) = fakes().await;
    let config = server_toml(dir.path(), &fake_url);
    // A first (it migrates the empty database and takes the notification channels' leases),
    // then B and C together.
    let start = |name: &str| {
        let data = dir.path().join(name);
        std::fs::create_dir_all(&data).unwrap();
        Server::start(&data, &db, &["--config".as_ref(), config.as_os_str()])
    };
    let first = start("a");
    let mut replicas: Vec<Server> = std::thread::scope(|s| {
        let rest: Vec<_> = ["b", "c"]
            .map(|n| s.spawn(move || start(n)))
            .into_iter()
            .collect();
        std::iter::once(first)
            .chain(rest.into_iter().map(|h| h.join().unwrap()))
            .collect()
    });
    let admin_tokens: usize = replicas
        .iter()
        .filter(|r| r.printed.contains("admin token"))
        .count();
    assert_eq!(admin_tokens, 1, "one replica made the first admin token");
    assert!(replicas[0].printed.contains("admin token"));
    let (a, b, c) = (
        replicas[0].grpc_url(),
        replicas[1].grpc_url(),
        replicas[2].grpc_url(),
    );
    let alice = token(&db, "alice", "approve");
    let reader = token(&db, "audit", "read");
    let agent = Decider::spawn_with(
        Connection {
            url: format!("{a},{b}"),
            token: Some(token(&db, "host-1", "agent")),
            tls: None,
        },
        Hello {
            host_id: "host-1".into(),
            hostname: "host-1".into(),
            ..Default::default()
        },
    );
    // A second host that only knows A.
    let only_a = Decider::spawn(
        a.clone(),
        Hello {
            host_id: "host-2".into(),
            hostname: "host-2".into(),
            ..Default::default()
        },
        Some(token(&db, "host-2", "agent")),
    );
    assert!(agent.wait_connected(Duration::from_secs(10)).await);
    assert!(only_a.wait_connected(Duration::from_secs(10)).await);

    // A watcher on C, open for the whole run.
    let mut watch = approvals(&c, &reader)
        .await
        .watch(WatchRequestsRequest {
            include_pending: false,
        })
        .await
        .unwrap()
        .into_inner();
    let watched: Arc<Mutex<Vec<String>>> = Arc::default();
    let w = watched.clone();
    tokio::spawn(async move {
        while let Ok(Some(h)) = watch.message().await {
            w.lock().unwrap().push(h.request.unwrap().request_id);
        }
    });

    // The agent on A, the approver on B.
    let mut on_b = approvals(&b, &alice).await;
    let r1 = agent.ask(request("r1", 600_000));
    until("r1 watched on C", 10, || {
        watched.lock().unwrap().contains(&"r1".to_owned())
    })
    .await;
    approve(&mut on_b, "r1").await;
    let d = tokio::time::timeout(Duration::from_secs(10), r1)
        .await
        .expect("r1 decided")
        .unwrap();
    assert_eq!(d.verdict, Verdict::Allow as i32);

    // Held on A: r2 from the agent that can move, e1..e3 from the one that cannot.
    let r2 = agent.ask(request("r2", 600_000));
    let expiring: Vec<_> = (1..=3)
        .map(|i| only_a.ask(request(&format!("e{i}"), 4_000)))
        .collect();
    until("r2, e1..e3 watched on C", 10, || {
        let w = watched.lock().unwrap();
        ["r2", "e1", "e2", "e3"]
            .iter()
            .all(|id| w.contains(&id.to_string()))
    })
    .await;
    // Killed mid-hold, not mid-delivery: a replica killed between sending an event and
    // recording that it did sends it again from another replica (with the same delivery id).
    // So A goes once both channels have recorded the last of these requests as delivered.
    let store = Store::open(&db.parse().unwrap()).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (received, cursors) = store
            .read(|tx| {
                Box::pin(async move {
                    let r = tx
                        .row(
                            "SELECT MAX(seq) FROM audit WHERE action = 'request.received'",
                            &[],
                        )
                        .await?;
                    let c = tx
                        .rows("SELECT cursor_seq FROM notify_channels", &[])
                        .await?;
                    let cursors: Vec<i64> = c.iter().map(|r| r.int(0)).collect::<Result<_, _>>()?;
                    Ok((r.map_or(Ok(0), |r| r.int(0))?, cursors))
                })
            })
            .await
            .unwrap();
        if cursors.len() == 2 && cursors.iter().all(|c| *c >= received) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the channels never caught up: {cursors:?} < {received}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    replicas[0].kill();
    // The agent moves to B and sends r2 again; approved there, it lands.
    approve(&mut on_b, "r2").await;
    let d = tokio::time::timeout(Duration::from_secs(15), r2)
        .await
        .expect("r2 decided after the move")
        .unwrap();
    assert_eq!(d.verdict, Verdict::Allow as i32);
    drop(expiring);

    // PostgreSQL restarts under B and C; meanwhile the agent sends r3.
    cluster.stop().unwrap();
    let r3 = agent.ask(request("r3", 600_000));
    tokio::time::sleep(Duration::from_secs(2)).await;
    cluster.start_again().unwrap();
    let mut on_c = approvals(&c, &alice).await;
    until("r3 watched on C", 40, || {
        watched.lock().unwrap().contains(&"r3".to_owned())
    })
    .await;
    approve(&mut on_c, "r3").await;
    let d = tokio::time::timeout(Duration::from_secs(30), r3)
        .await
        .expect("r3, sent during the outage, decided")
        .unwrap();
    assert_eq!(d.verdict, Verdict::Allow as i32);

    // What A's killing left behind expired once each, on B or C.
    let expired = |store: Store| async move {
        store
            .audit_query(&Filter {
                action: Some("request.expired".into()),
                ..Default::default()
            })
            .await
            .unwrap()
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut done = expired(store.clone()).await;
    while done.len() < 3 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
        done = expired(store.clone()).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let done = expired(store.clone()).await;
    let ids: Vec<&str> = done.iter().map(|r| r.request_id.as_str()).collect();
    assert_eq!(ids.len(), 3, "each expired once: {ids:?}");
    for id in ["e1", "e2", "e3"] {
        assert!(ids.contains(&id), "{id} expired: {ids:?}");
    }

    // The watcher on C saw every request, through the kill and the restart.
    let seen = watched.lock().unwrap().clone();
    for id in ["r1", "r2", "r3", "e1", "e2", "e3"] {
        assert!(seen.contains(&id.to_string()), "{id} not watched: {seen:?}");
    }

    // Notifications: once per event, not once per replica; what came after A's death was
    // sent by B or C once A's leases on the channels ran out.
    until("every webhook event", 60, || {
        let c = calls.lock().unwrap();
        let hooks = c.iter().filter(|x| !x.2.is_empty()).count();
        // received and decided for r1..r3, received and decided (expired) for e1..e3
        hooks >= 12
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let all = calls.lock().unwrap().clone();
    let mut by_event: HashMap<(String, String), Vec<String>> = HashMap::new();
    for (event, id, delivery) in all.iter().filter(|x| !x.2.is_empty()) {
        by_event
            .entry((event.clone(), id.clone()))
            .or_default()
            .push(delivery.clone());
    }
    for ((event, id), deliveries) in &by_event {
        let mut distinct = deliveries.clone();
        distinct.dedup();
        assert_eq!(distinct.len(), 1, "{event} for {id}: {deliveries:?}");
    }
    assert_eq!(by_event.len(), 12, "{by_event:?}");
    let posts: Vec<&String> = all.iter().filter(|x| x.0 == "post").map(|x| &x.1).collect();
    for id in ["r1", "r2", "r3", "e1", "e2", "e3"] {
        assert_eq!(
            posts.iter().filter(|p| **p == id).count(),
            1,
            "one Slack message for {id}: {posts:?}"
        );
    }

    // One chain that verifies, read back offline.
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_airlockctl"))
        .args(["audit", "verify", "--database", &db])
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("audit trail intact"));
    drop(replicas);
}
