//! Notifications over real sockets, on both backends: fake Slack, Teams and webhook receivers
//! on loopback, speaking their real wire formats and checking signatures.

#[path = "support/db.rs"]
mod db;

use std::{
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use airlock_control_plane::{
    config::{Limits, ServerConfig},
    metrics::ChannelLabel,
    notify::{self, slack, Hub},
    policy::{Policy, Route},
    store::Store,
    ControlPlane,
};
use airlock_proto::v1::{
    action_request::Action, ActionRequest, ExecAction, Hello, ProcessContext, RequestState,
};
use axum::{
    body::Bytes,
    http::{HeaderMap, StatusCode},
    routing::post,
    Router,
};
use db::TestDb;
use hmac::{Hmac, Mac};
use serde_json::{json, Value};
use sha2::Sha256;

const PUBLIC: &str = "https://airlock.test";
const SIGNING: &str = "slack-signing-secret";
const BOT: &str = "xoxb-test-token";

/// What a fake receiver got: headers and body of each call.
type Log = Arc<Mutex<Vec<(String, HeaderMap, Bytes)>>>;

async fn serve(app: Router) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    url
}

/// Polls the async `f` until it gives a value, for at most ten seconds.
async fn eventually_async<T, F, Fut>(what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Polls `f` until it gives a value, for at most ten seconds.
async fn eventually<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn calls(log: &Log, path: &str) -> Vec<Value> {
    log.lock()
        .unwrap()
        .iter()
        .filter(|(p, _, _)| p == path)
        .map(|(_, _, b)| serde_json::from_slice(b).unwrap())
        .collect()
}

fn secret(dir: &tempfile::TempDir, name: &str, value: &str) -> String {
    let path = dir.path().join(name);
    std::fs::write(&path, format!("{value}\n")).unwrap();
    path.display().to_string()
}

async fn plane(t: &TestDb) -> ControlPlane {
    let plane = ControlPlane::new(t.open().await);
    plane.set_policy(Policy::parse("[groups]\noncall = [\"alice\", \"bob\"]\n", "p.toml").unwrap());
    plane
}

fn channels(toml: &str) -> notify::Channels {
    let cfg = ServerConfig::parse(toml, "server.toml").unwrap();
    notify::channels_from_config(&cfg, &url::Url::parse(PUBLIC).unwrap()).unwrap()
}

/// Request `id` by account `user`, routed to group oncall.
async fn receive(store: &Store, id: &str, user: &str, require_reason: bool) {
    receive_exec(
        store,
        id,
        user,
        require_reason,
        "/usr/bin/kubectl",
        &["kubectl", "delete", "ns", "prod"],
    )
    .await
}

/// Like [`receive`], running `path` with `argv`.
async fn receive_exec(
    store: &Store,
    id: &str,
    user: &str,
    require_reason: bool,
    path: &str,
    argv: &[&str],
) {
    let host = Hello {
        host_id: "h1".into(),
        hostname: "web-1".into(),
        ..Default::default()
    };
    let route = Route {
        rule: "kubectl".into(),
        groups: vec!["oncall".into()],
        quorum: 1,
        require_reason,
        deny_needs_quorum: false,
        owners: Vec::new(),
    };
    let req = ActionRequest {
        request_id: id.into(),
        rule: "kubectl".into(),
        risk: "high".into(),
        description: "deletes a namespace".into(),
        process: Some(ProcessContext {
            user: user.into(),
            ..Default::default()
        }),
        action: Some(Action::Exec(ExecAction {
            path: path.into(),
            argv: argv.iter().map(|a| a.to_string()).collect(),
            ..Default::default()
        })),
        deadline_unix_ms: airlock_control_plane::types::now_ms() + 600_000,
        ..Default::default()
    };
    store
        .receive(&host, &route, req, &Limits::default())
        .await
        .unwrap();
}

fn failures(plane: &ControlPlane, channel: &str) -> u64 {
    plane
        .metrics
        .notification_failures
        .get_or_create(&ChannelLabel {
            channel: channel.into(),
        })
        .get()
}

fn hmac_hex(key: &str, parts: &[&[u8]]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(key.as_bytes()).unwrap();
    for p in parts {
        mac.update(p);
    }
    hex::encode(mac.finalize().into_bytes())
}

#[test]
fn slack_documentation_example_verifies() {
    let secret = "8f742231b10e8888abcd99yyyzzz85a5";
    let ts = "1531420618";
    let body = "token=xyzz0WbapA4vBCDEFasx0q6G&team_id=T1DC2JH3J&team_domain=testteamnow&channel_id=G8PSS9T3V&channel_name=foobar&user_id=U2CERLKJA&user_name=roadrunner&command=%2Fwebhook-collect&text=&response_url=https%3A%2F%2Fhooks.slack.com%2Fcommands%2FT1DC2JH3J%2F397700885554%2F96rGlfmibIGlgcZRskXaIFfN&trigger_id=398738663015.47445629121.803a0bc887a14d10d2c447fce8b6703c";
    let sig = "v0=a2114d57b48eac39b9ad189dd8316235a7b4a8d21a10bd27519666489c69b503";
    let now = 1531420618 + 60;
    assert_eq!(
        slack::verify_signature(secret, ts, body.as_bytes(), sig, now),
        Ok(())
    );
    let changed = body.replace("roadrunner", "wile");
    assert_eq!(
        slack::verify_signature(secret, ts, changed.as_bytes(), sig, now),
        Err(slack::SlackAuthError::BadSignature)
    );
    assert_eq!(
        slack::verify_signature("not-the-secret", ts, body.as_bytes(), sig, now),
        Err(slack::SlackAuthError::BadSignature)
    );
    // Replayed an hour later, or dated in the future.
    assert_eq!(
        slack::verify_signature(secret, ts, body.as_bytes(), sig, 1531420618 + 3600),
        Err(slack::SlackAuthError::Stale)
    );
    assert_eq!(
        slack::verify_signature(secret, ts, body.as_bytes(), sig, 1531420618 - 301),
        Err(slack::SlackAuthError::Stale)
    );
    assert!(slack::verify_signature(secret, "", body.as_bytes(), sig, now).is_err());
    assert!(slack::verify_signature(secret, ts, body.as_bytes(), "", now).is_err());
}

/// A fake Slack: the Web API (checks the bot token) and the presses' `response_url`.
async fn fake_slack() -> (String, Log) {
    let log: Log = Arc::default();
    let record = |log: Log, path: &'static str, answer: Value| {
        post(move |headers: HeaderMap, body: Bytes| async move {
            let bearer = headers
                .get("authorization")
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_owned();
            if path != "/respond" && bearer != format!("Bearer {BOT}") {
                return axum::Json(json!({"ok": false, "error": "invalid_auth"}));
            }
            log.lock().unwrap().push((path.into(), headers, body));
            axum::Json(answer)
        })
    };
    let ok = json!({"ok": true, "channel": "C42", "ts": "1700000000.000100"});
    let app = Router::new()
        .route(
            "/api/chat.postMessage",
            record(log.clone(), "/chat.postMessage", ok.clone()),
        )
        .route("/api/chat.update", record(log.clone(), "/chat.update", ok))
        .route(
            "/respond",
            record(log.clone(), "/respond", json!({"ok": true})),
        );
    (serve(app).await, log)
}

/// POSTs a block_actions press of `action` on `id` by Slack user `user`, signed unless `sign`
/// is false.
async fn press(
    url: &str,
    slack_url: &str,
    user: &str,
    action: &str,
    id: &str,
    sign: Option<&str>,
) -> StatusCode {
    let payload = json!({
        "type": "block_actions",
        "user": {"id": user, "username": user},
        "response_url": format!("{slack_url}/respond"),
        "actions": [{"action_id": action, "value": id, "type": "button"}],
    });
    let body = serde_urlencoded::to_string([("payload", payload.to_string())]).unwrap();
    let ts = (airlock_control_plane::types::now_ms() / 1000).to_string();
    let mut req = reqwest::Client::new()
        .post(format!("{url}/slack/interactions"))
        .header("content-type", "application/x-www-form-urlencoded")
        .header("x-slack-request-timestamp", &ts);
    if let Some(key) = sign {
        let sig = hmac_hex(key, &[b"v0:", ts.as_bytes(), b":", body.as_bytes()]);
        req = req.header("x-slack-signature", format!("v0={sig}"));
    }
    req.body(body).send().await.unwrap().status()
}

fn replies(log: &Log) -> Vec<String> {
    calls(log, "/respond")
        .into_iter()
        .map(|v| {
            assert_eq!(v["response_type"], "ephemeral");
            assert_eq!(v["replace_original"], false);
            v["text"].as_str().unwrap().to_owned()
        })
        .collect()
}

async fn slack_buttons_vote_through_the_decision_path(t: TestDb) {
    let (slack_url, log) = fake_slack().await;
    let dir = tempfile::tempdir().unwrap();
    let channels = channels(&format!(
        "[slack]\nchannel = \"C42\"\nbot_token_file = {:?}\nsigning_secret_file = {:?}\n\
         users = {{ U1 = \"alice\", U2 = \"bob\", U9 = \"ci\" }}\napi_url = \"{slack_url}/api\"\n",
        secret(&dir, "bot", BOT),
        secret(&dir, "signing", SIGNING),
    ));
    let plane = plane(&t).await;
    let _hub = Hub::start(plane.store.clone(), &channels, plane.metrics.clone())
        .await
        .unwrap();
    let url = serve(slack::router(
        channels.slack.clone().unwrap(),
        plane.decisions(),
    ))
    .await;

    receive(&plane.store, "r1", "ci", false).await;
    let posted = eventually("chat.postMessage", || {
        calls(&log, "/chat.postMessage").pop()
    })
    .await;
    assert_eq!(posted["channel"], "C42");
    assert!(posted["text"]
        .as_str()
        .unwrap()
        .contains("kubectl delete ns prod"));
    let blocks = posted["blocks"].as_array().unwrap();
    assert_eq!(blocks[0]["type"], "header");
    let fields = blocks[1]["fields"].to_string();
    for fact in [
        "Host: web-1",
        "Account: ci",
        "What: /usr/bin/kubectl delete ns prod",
        "Risk: high",
        "Deadline: ",
    ] {
        assert!(fields.contains(fact), "{fact} in {fields}");
    }
    let actions = blocks.iter().find(|b| b["type"] == "actions").unwrap();
    let buttons = actions["elements"].as_array().unwrap();
    assert_eq!(
        (
            &buttons[0]["action_id"],
            &buttons[0]["style"],
            &buttons[0]["value"]
        ),
        (&json!("approve"), &json!("primary"), &json!("r1"))
    );
    assert_eq!(
        (
            &buttons[1]["action_id"],
            &buttons[1]["style"],
            &buttons[1]["value"]
        ),
        (&json!("deny"), &json!("danger"), &json!("r1"))
    );
    assert_eq!(buttons[2]["url"], format!("{PUBLIC}/requests/r1"));

    // Unsigned, badly signed: 401 and nothing changes.
    assert_eq!(
        press(&url, &slack_url, "U1", "approve", "r1", None).await,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        press(&url, &slack_url, "U1", "approve", "r1", Some("wrong")).await,
        StatusCode::UNAUTHORIZED
    );
    // A Slack user with no approver identity is refused.
    assert_eq!(
        press(&url, &slack_url, "U7", "approve", "r1", Some(SIGNING)).await,
        StatusCode::OK
    );
    let told = eventually("refusal", || replies(&log).pop()).await;
    assert!(told.contains("not linked to an Airlock approver"), "{told}");
    // The requester cannot approve their own request.
    assert_eq!(
        press(&url, &slack_url, "U9", "approve", "r1", Some(SIGNING)).await,
        StatusCode::OK
    );
    let told = eventually("refusal", || replies(&log).get(1).cloned()).await;
    assert!(told.contains("ci made this request"), "{told}");
    let held = plane.store.get("r1").await.unwrap();
    assert_eq!((held.state(), held.votes.len()), (RequestState::Pending, 0));

    // Two presses at once by alice: one vote, one "already decided".
    let (a, b) = tokio::join!(
        press(&url, &slack_url, "U1", "approve", "r1", Some(SIGNING)),
        press(&url, &slack_url, "U1", "approve", "r1", Some(SIGNING)),
    );
    assert_eq!((a, b), (StatusCode::OK, StatusCode::OK));
    let held = plane.store.get("r1").await.unwrap();
    assert_eq!(held.state(), RequestState::Approved);
    assert_eq!(held.votes.len(), 1);
    assert_eq!(
        (
            held.votes[0].approver.as_str(),
            held.votes[0].reason.as_str()
        ),
        ("alice", "approved in Slack")
    );
    let already = |log: &Log| {
        replies(log)
            .iter()
            .filter(|t| t.contains("already decided"))
            .count()
    };
    eventually("already decided", || (already(&log) == 1).then_some(())).await;
    // Pressing again later: still one vote.
    assert_eq!(
        press(&url, &slack_url, "U2", "deny", "r1", Some(SIGNING)).await,
        StatusCode::OK
    );
    eventually("already decided again", || {
        (already(&log) == 2).then_some(())
    })
    .await;
    assert_eq!(plane.store.get("r1").await.unwrap().votes.len(), 1);

    // The message is updated in place with the outcome, without buttons.
    let updated = eventually("chat.update", || calls(&log, "/chat.update").pop()).await;
    assert_eq!(
        (&updated["channel"], &updated["ts"]),
        (&json!("C42"), &json!("1700000000.000100"))
    );
    let blocks = updated["blocks"].as_array().unwrap();
    assert!(blocks.iter().all(|b| b["type"] != "actions"), "{updated}");
    assert!(
        updated["blocks"].to_string().contains("Approved by alice"),
        "{updated}"
    );

    // A deny carries who denied it; a rule needing reasons sends approvers to the web UI.
    receive(&plane.store, "r2", "ci", true).await;
    eventually("second post", || {
        (calls(&log, "/chat.postMessage").len() == 2).then_some(())
    })
    .await;
    assert_eq!(
        press(&url, &slack_url, "U1", "approve", "r2", Some(SIGNING)).await,
        StatusCode::OK
    );
    let told = eventually("reason needed", || {
        replies(&log)
            .into_iter()
            .find(|t| t.contains("needs a reason"))
    })
    .await;
    assert!(told.contains(&format!("{PUBLIC}/requests/r2")), "{told}");
    assert_eq!(
        plane.store.get("r2").await.unwrap().state(),
        RequestState::Pending
    );
    assert_eq!(
        press(&url, &slack_url, "U2", "deny", "r2", Some(SIGNING)).await,
        StatusCode::OK
    );
    let held = plane.store.get("r2").await.unwrap();
    assert_eq!(
        (held.state(), held.reason.as_str()),
        (RequestState::Denied, "denied in Slack by bob")
    );
    eventually("second update", || {
        (calls(&log, "/chat.update").len() == 2).then_some(())
    })
    .await;
    assert_eq!(failures(&plane, "slack"), 0);
    // Long after the presses, still exactly two "already decided" (and five replies in all).
    assert_eq!((already(&log), replies(&log).len()), (2, 5));
}

/// A receiver that answers 500 to the first `fail` calls, hangs on every call when `hang`, and
/// records each call.
async fn receiver(fail: usize, hang: bool) -> (String, Log) {
    let log: Log = Arc::default();
    let seen = Arc::new(AtomicUsize::new(0));
    let l = log.clone();
    let app = Router::new().route(
        "/hook",
        post(move |headers: HeaderMap, body: Bytes| async move {
            l.lock().unwrap().push(("/hook".into(), headers, body));
            if hang {
                tokio::time::sleep(Duration::from_secs(3600)).await;
            }
            if seen.fetch_add(1, Ordering::SeqCst) < fail {
                StatusCode::INTERNAL_SERVER_ERROR
            } else {
                StatusCode::NO_CONTENT
            }
        }),
    );
    (format!("{}/hook", serve(app).await), log)
}

fn webhook_toml(dir: &tempfile::TempDir, name: &str, url: &str, extra: &str) -> String {
    format!(
        "[[webhook]]\nname = \"{name}\"\nurl = \"{url}\"\nsecret_file = {:?}\nbackoff_ms = 20\n{extra}\n",
        secret(dir, name, &format!("key-of-{name}"))
    )
}

async fn webhook_retries_signs_and_logs_every_attempt(t: TestDb) {
    let (url, log) = receiver(2, false).await;
    let dir = tempfile::tempdir().unwrap();
    let channels = channels(&webhook_toml(&dir, "siem", &url, "max_attempts = 5"));
    let plane = plane(&t).await;
    let _hub = Hub::start(plane.store.clone(), &channels, plane.metrics.clone())
        .await
        .unwrap();

    receive(&plane.store, "w1", "ci", false).await;
    eventually("three attempts", || {
        (log.lock().unwrap().len() == 3).then_some(())
    })
    .await;
    let calls = log.lock().unwrap().clone();
    let delivery = calls[0].1["x-airlock-delivery"].clone();
    for (_, headers, body) in &calls {
        let h = |n: &str| headers[n].to_str().unwrap().to_owned();
        assert_eq!(h("x-airlock-event"), "request.received");
        assert_eq!(
            headers["x-airlock-delivery"], delivery,
            "one delivery id across retries"
        );
        let ts = h("x-airlock-timestamp");
        let expected = hmac_hex("key-of-siem", &[ts.as_bytes(), b".", body]);
        assert_eq!(h("x-airlock-signature"), format!("sha256={expected}"));
        let ts: i64 = ts.parse().unwrap();
        assert!((airlock_control_plane::types::now_ms() / 1000 - ts).abs() < 60);
        let v: Value = serde_json::from_slice(body).unwrap();
        assert_eq!(v["event"], "request.received");
        assert_eq!(v["delivery"], delivery.to_str().unwrap());
        assert_eq!(v["url"], format!("{PUBLIC}/requests/w1"));
        assert_eq!(v["request"]["request"]["request_id"], "w1");
        assert_eq!(v["request"]["hostname"], "web-1");
        assert!(v["sent_unix_ms"].as_i64().unwrap() > 0);
    }
    let rows = eventually_async("the log", || {
        let store = plane.store.clone();
        async move {
            let rows = store.deliveries(10).await.unwrap();
            (rows.len() == 3).then_some(rows)
        }
    })
    .await;
    let summary: Vec<(u32, bool, Option<u16>)> =
        rows.iter().map(|d| (d.attempt, d.ok, d.status)).collect();
    assert_eq!(
        summary,
        [
            (3, true, None),
            (2, false, Some(500)),
            (1, false, Some(500))
        ]
    );
    assert!(rows.iter().all(|d| d.channel == "webhook:siem"
        && d.request_id == "w1"
        && d.event == "request.received"));
    assert!(rows[1].error.contains("500"), "{:?}", rows[1]);
    assert_eq!(failures(&plane, "webhook:siem"), 2);
    // The secret is nowhere in the log.
    assert!(rows
        .iter()
        .all(|d| !format!("{d:?}").contains("key-of-siem")));

    // A vote that decides is request.decided.
    plane
        .decisions()
        .decide(
            &airlock_control_plane::decide::Approver::named("alice"),
            "w1",
            airlock_proto::v1::Verdict::Deny,
            "no",
            0,
        )
        .await
        .unwrap();
    let decided = eventually("decided", || {
        let calls = log.lock().unwrap();
        (calls.len() == 4).then(|| serde_json::from_slice::<Value>(&calls[3].2).unwrap())
    })
    .await;
    assert_eq!(decided["event"], "request.decided");
    assert_eq!(decided["state"], "denied");
}

/// Signed checkpoints reach the webhooks that ask for them (and only those), signed like any
/// delivery, and the line a receiver keeps verifies against the database with the public key.
async fn checkpoints_reach_the_webhooks_that_ask_for_them(t: TestDb) {
    use airlock_control_plane::checkpoint::{Checkpoint, Signer};
    let (anchor_url, anchor) = receiver(0, false).await;
    let (siem_url, siem) = receiver(0, false).await;
    let dir = tempfile::tempdir().unwrap();
    let channels = channels(&format!(
        "{}{}",
        webhook_toml(
            &dir,
            "anchor",
            &anchor_url,
            "events = [\"audit.checkpoint\"]"
        ),
        webhook_toml(&dir, "siem", &siem_url, ""),
    ));
    let plane = plane(&t).await;
    let _hub = Hub::start(plane.store.clone(), &channels, plane.metrics.clone())
        .await
        .unwrap();
    receive(&plane.store, "c1", "ci", false).await;
    let signer = Arc::new(Signer::from_hex(&"07".repeat(32)).unwrap());
    let public = signer.public_hex();
    let p = plane.clone();
    let signing = tokio::spawn(async move {
        p.sign_checkpoints(signer, Duration::from_millis(100), None)
            .await
    });
    let (headers, body) = eventually("a checkpoint delivery", || {
        anchor
            .lock()
            .unwrap()
            .first()
            .map(|(_, h, b)| (h.clone(), b.clone()))
    })
    .await;
    let ts = headers["x-airlock-timestamp"].to_str().unwrap();
    let expected = hmac_hex("key-of-anchor", &[ts.as_bytes(), b".", &body]);
    assert_eq!(
        headers["x-airlock-signature"].to_str().unwrap(),
        format!("sha256={expected}")
    );
    assert_eq!(headers["x-airlock-event"], "audit.checkpoint");
    let v: Value = serde_json::from_slice(&body).unwrap();
    let c = Checkpoint::parse(v["checkpoint"].as_str().unwrap()).unwrap();
    c.verify(&public).unwrap();
    let records = plane.store.audit_query(&Default::default()).await.unwrap();
    let signed = records.iter().find(|r| r.seq == c.seq).unwrap();
    assert_eq!(
        signed.hash, c.hash,
        "the checkpoint signs the chain as stored"
    );
    assert_eq!(signed.action, "request.received");

    // Idle: no checkpoints of checkpoints.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let all = plane.store.audit_query(&Default::default()).await.unwrap();
    let checkpoints = all
        .iter()
        .filter(|r| r.action == "audit.checkpoint")
        .count();
    assert_eq!(checkpoints, 1, "{all:?}");
    assert_eq!(anchor.lock().unwrap().len(), 1);
    // The webhook on the default events gets requests, never checkpoints.
    eventually("the request event", || {
        (!siem.lock().unwrap().is_empty()).then_some(())
    })
    .await;
    assert!(siem
        .lock()
        .unwrap()
        .iter()
        .all(|(_, h, _)| h["x-airlock-event"] != "audit.checkpoint"));
    signing.abort();
    plane.store.verify_audit().await.unwrap();
}

async fn a_hanging_receiver_does_not_delay_the_others(t: TestDb) {
    let (slow_url, slow) = receiver(0, true).await;
    let (fast_url, fast) = receiver(0, false).await;
    let (late_url, late) = receiver(0, false).await;
    let dir = tempfile::tempdir().unwrap();
    let channels = channels(&format!(
        "{}{}{}",
        webhook_toml(&dir, "slow", &slow_url, "timeout_secs = 60"),
        webhook_toml(&dir, "fast", &fast_url, ""),
        webhook_toml(
            &dir,
            "decided-only",
            &late_url,
            "events = [\"request.decided\"]"
        ),
    ));
    let plane = plane(&t).await;
    let _hub = Hub::start(plane.store.clone(), &channels, plane.metrics.clone())
        .await
        .unwrap();

    let started = Instant::now();
    receive(&plane.store, "h1", "ci", false).await;
    receive(&plane.store, "h2", "ci", false).await;
    plane.store.cancel("h2", "ci", "not needed").await.unwrap();
    eventually("the fast receiver", || {
        (fast.lock().unwrap().len() == 3).then_some(())
    })
    .await;
    eventually("the decided-only receiver", || {
        (late.lock().unwrap().len() == 1).then_some(())
    })
    .await;
    assert!(started.elapsed() < Duration::from_secs(5));
    // The slow one is still stuck on its first delivery.
    assert_eq!(slow.lock().unwrap().len(), 1);
    let events: Vec<Value> = calls(&fast, "/hook")
        .iter()
        .map(|v| v["event"].clone())
        .collect();
    assert_eq!(
        events,
        [
            json!("request.received"),
            json!("request.received"),
            json!("request.decided")
        ]
    );
    assert_eq!(
        calls(&late, "/hook")[0]["request"]["request"]["request_id"],
        "h2"
    );
}

/// `exec -a '[Approve here](https://evil.example)' terraform destroy`: argv[0] is the caller's
/// choice. Slack, Teams and the audit record name the executable the kernel ran, and Teams shows
/// the Markdown as text, not as a link on the approvers' card.
async fn notices_name_the_executable_and_teams_shows_markdown_as_text(t: TestDb) {
    let (slack_url, slack_log) = fake_slack().await;
    let log: Log = Arc::default();
    let l = log.clone();
    let app = Router::new().route(
        "/teams",
        post(move |headers: HeaderMap, body: Bytes| async move {
            l.lock().unwrap().push(("/teams".into(), headers, body));
            StatusCode::ACCEPTED
        }),
    );
    let url = serve(app).await;
    let dir = tempfile::tempdir().unwrap();
    let channels = channels(&format!(
        "[teams]\nwebhook_url_file = {:?}\n[slack]\nchannel = \"C42\"\nbot_token_file = {:?}\n\
         signing_secret_file = {:?}\napi_url = {:?}\n",
        secret(&dir, "teams", &format!("{url}/teams")),
        secret(&dir, "bot", BOT),
        secret(&dir, "signing", SIGNING),
        format!("{slack_url}/api"),
    ));
    let plane = plane(&t).await;
    let _hub = Hub::start(plane.store.clone(), &channels, plane.metrics.clone())
        .await
        .unwrap();
    receive_exec(
        &plane.store,
        "spoof-1",
        "ci",
        false,
        "/usr/bin/terraform",
        &["[Approve here](https://evil.example)", "destroy"],
    )
    .await;

    let card = eventually("a card", || calls(&log, "/teams").pop()).await;
    let facts = card["attachments"][0]["content"]["body"][1]["facts"]
        .as_array()
        .unwrap()
        .clone();
    let what = facts.iter().find(|f| f["title"] == "What").unwrap()["value"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(what.starts_with("/usr/bin/terraform destroy"), "{what}");
    assert!(
        !what.contains("]("),
        "a Markdown link reached Teams: {what}"
    );

    let posted = eventually("chat.postMessage", || {
        calls(&slack_log, "/chat.postMessage").pop()
    })
    .await;
    let fields = posted["blocks"][1]["fields"].to_string();
    assert!(
        fields.contains(
            "What: /usr/bin/terraform destroy [argv[0]: [Approve here](https://evil.example)]"
        ),
        "{fields}"
    );

    let rec = plane
        .store
        .audit_query(&airlock_control_plane::audit::Filter {
            request_id: Some("spoof-1".into()),
            action: Some("request.received".into()),
            ..Default::default()
        })
        .await
        .unwrap();
    let payload: Value = serde_json::from_str(&rec[0].payload).unwrap();
    assert!(
        payload["action"]
            .as_str()
            .unwrap()
            .starts_with("/usr/bin/terraform destroy"),
        "{payload}"
    );
}

async fn teams_gets_an_adaptive_card_linking_to_the_request(t: TestDb) {
    let log: Log = Arc::default();
    let l = log.clone();
    let app = Router::new().route(
        "/teams",
        post(move |headers: HeaderMap, body: Bytes| async move {
            l.lock().unwrap().push(("/teams".into(), headers, body));
            StatusCode::ACCEPTED
        }),
    );
    let url = serve(app).await;
    let dir = tempfile::tempdir().unwrap();
    let channels = channels(&format!(
        "[teams]\nwebhook_url_file = {:?}\n",
        secret(&dir, "teams", &format!("{url}/teams?sig=secret"))
    ));
    let plane = plane(&t).await;
    let _hub = Hub::start(plane.store.clone(), &channels, plane.metrics.clone())
        .await
        .unwrap();

    receive(&plane.store, "t1", "ci", false).await;
    let msg = eventually("a card", || calls(&log, "/teams").pop()).await;
    assert_eq!(msg["type"], "message");
    let att = &msg["attachments"][0];
    assert_eq!(
        att["contentType"],
        "application/vnd.microsoft.card.adaptive"
    );
    assert!(att["contentUrl"].is_null());
    let card = &att["content"];
    assert_eq!(
        (&card["type"], &card["version"]),
        (&json!("AdaptiveCard"), &json!("1.4"))
    );
    assert_eq!(card["actions"][0]["type"], "Action.OpenUrl");
    assert_eq!(card["actions"][0]["url"], format!("{PUBLIC}/requests/t1"));
    let facts = card["body"][1]["facts"].to_string();
    assert!(
        facts.contains("kubectl delete ns prod") && facts.contains("web-1"),
        "{facts}"
    );

    plane.store.cancel("t1", "ci", "typo").await.unwrap();
    let done = eventually("the outcome", || {
        let c = calls(&log, "/teams");
        (c.len() == 2).then(|| c[1].clone())
    })
    .await;
    let title = done["attachments"][0]["content"]["body"][0]["text"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(title.starts_with("Cancelled by ci"), "{title}");
    // One row per card, each a first attempt that succeeded; the URL's key is nowhere.
    let rows = eventually_async("both cards in the log", || {
        let store = plane.store.clone();
        async move {
            let rows = store.deliveries(10).await.unwrap();
            (rows.len() >= 2).then_some(rows)
        }
    })
    .await;
    let summary: Vec<_> = rows
        .iter()
        .map(|d| {
            (
                d.channel.as_str(),
                d.event.as_str(),
                d.request_id.as_str(),
                d.attempt,
                d.ok,
                d.status,
                d.error.as_str(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            ("teams", "request.decided", "t1", 1, true, None, ""),
            ("teams", "request.received", "t1", 1, true, None, ""),
        ]
    );
    assert_ne!(rows[0].id, rows[1].id, "two deliveries");
    assert!(rows.iter().all(|d| !format!("{d:?}").contains("secret")));
    assert_eq!(failures(&plane, "teams"), 0);
}

#[test]
fn missing_secret_files_are_named() {
    let cfg = ServerConfig::parse(
        "[[webhook]]\nname = \"a\"\nurl = \"http://x\"\nsecret_file = \"/nonexistent/airlock-key\"\n",
        "server.toml",
    )
    .unwrap();
    let e = notify::channels_from_config(&cfg, &url::Url::parse(PUBLIC).unwrap()).unwrap_err();
    assert!(e.to_string().contains("/nonexistent/airlock-key"), "{e}");
}

both!(
    slack_buttons_vote_through_the_decision_path,
    webhook_retries_signs_and_logs_every_attempt,
    checkpoints_reach_the_webhooks_that_ask_for_them,
    a_hanging_receiver_does_not_delay_the_others,
    teams_gets_an_adaptive_card_linking_to_the_request,
    notices_name_the_executable_and_teams_shows_markdown_as_text,
);
