//! The web UI in real headless Chromium, against a real control plane on loopback with a real
//! agent connection over gRPC.

#[path = "support/browser.rs"]
mod browser;
#[path = "support/db.rs"]
mod db;
#[path = "support/issuer.rs"]
mod issuer;

use std::time::Duration;

use airlock_agent::decider::Decider;
use airlock_control_plane::{
    auth::accounts,
    auth::Scope,
    config::WebConfig,
    policy::Policy,
    web::{Settings, Web},
    ControlPlane,
};
use airlock_proto::v1::{
    action_request::Action, ActionRequest, Ancestor, EnvVar, ExecAction, Hello, ProcessContext,
    RequestState, Verdict,
};
use browser::Browser;
use db::TestDb;

const POLICY: &str = r#"
[groups]
oncall = ["alice", "claude"]

[[rule]]
name = "kubectl-delete"
groups = ["oncall"]
quorum = 1
"#;

const PASSWORD: &str = "a long test password";

/// A control plane (gRPC and HTTP with the web UI) and one connected agent, `host-a`.
struct Ui {
    base: String,
    plane: ControlPlane,
    agent: Decider,
}

async fn start(t: &TestDb) -> Ui {
    start_with_oidc(t, None).await
}

async fn start_with_oidc(t: &TestDb, oidc: Option<airlock_control_plane::config::OidcFile>) -> Ui {
    let store = t.open().await;
    let agent_token = store.create_token("host-a", Scope::Agent).await.unwrap();
    // alice is in oncall through the policy, bob through his account's groups; claude is the
    // agent account itself (in oncall too, so only the self-approval rule stops it); dave is
    // in no group.
    for (name, groups) in [
        ("alice", vec![]),
        ("bob", vec!["oncall".to_owned()]),
        ("claude", vec![]),
        ("dave", vec![]),
        ("ops", vec!["admins".to_owned()]),
    ] {
        accounts::create(&store, name, PASSWORD, &groups)
            .await
            .unwrap();
    }
    let plane = ControlPlane::new(store);
    plane.set_policy(Policy::parse(POLICY, "policy.toml").unwrap());
    let grpc = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let grpc_url = format!("http://{}", grpc.local_addr().unwrap());
    let http = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", http.local_addr().unwrap());
    let settings = Settings::new(url::Url::parse(&base).unwrap(), &WebConfig::default());
    let oidc = oidc.map(|cfg| {
        let secret = airlock_control_plane::config::Secret::new(issuer::CLIENT_SECRET);
        std::sync::Arc::new(
            airlock_control_plane::web::OidcLogin::new(cfg, Some(secret), &settings).unwrap(),
        )
    });
    let web = Web::new(plane.clone(), settings, oidc);
    let p = plane.clone();
    tokio::spawn(async move { p.serve(grpc, std::future::pending()).await.unwrap() });
    let p = plane.clone();
    tokio::spawn(async move {
        p.serve_http(http, web.router(), std::future::pending())
            .await
            .unwrap()
    });
    let agent = Decider::spawn(
        grpc_url,
        Hello {
            host_id: "host-a".into(),
            hostname: "build-01".into(),
            labels: [("env".to_owned(), "prod".to_owned())].into(),
            version: "test".into(),
        },
        Some(agent_token),
    );
    assert!(agent.wait_connected(Duration::from_secs(10)).await);
    Ui { base, plane, agent }
}

fn request(id: &str, user: &str, argv: &[&str]) -> ActionRequest {
    ActionRequest {
        request_id: id.into(),
        rule: "kubectl-delete".into(),
        risk: "high".into(),
        description: "Deleting cluster objects".into(),
        process: Some(ProcessContext {
            user: user.into(),
            uid: 1500,
            group: user.into(),
            cwd: "/srv/agent/work".into(),
            login_user: "maria".into(),
            env: vec![EnvVar {
                name: "KUBECONFIG".into(),
                value: None,
            }],
            ancestors: vec![Ancestor {
                pid: 41,
                user: user.into(),
                exe: "/usr/bin/python3".into(),
                argv: vec!["python3".into(), "agent.py".into()],
                ..Default::default()
            }],
            ..Default::default()
        }),
        action: Some(Action::Exec(ExecAction {
            path: "/usr/bin/kubectl".into(),
            argv: argv.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        })),
        held_at_unix_ms: airlock_control_plane::types::now_ms(),
        deadline_unix_ms: airlock_control_plane::types::now_ms() + 600_000,
        ..Default::default()
    }
}

/// The session's CSRF token, from the logout form every page has.
async fn csrf_of(b: &Browser) -> String {
    b.client
        .find(fantoccini::Locator::Css("form.who input[name=csrf]"))
        .await
        .unwrap()
        .attr("value")
        .await
        .unwrap()
        .unwrap()
}

async fn wait_state(plane: &ControlPlane, id: &str, state: RequestState) {
    for _ in 0..100 {
        if plane.store.get(id).await.is_ok_and(|h| h.state() == state) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{id} never became {state:?}");
}

async fn login_live_queue_approve_with_reason_and_deny(t: TestDb) {
    let ui = start(&t).await;
    let b = Browser::start().await;

    // A wrong password is refused with a message, and no session starts.
    b.goto(&format!("{}/", ui.base)).await;
    b.wait_for("#password", 10).await;
    b.fill("#name", "alice").await;
    b.fill("#password", "not the password").await;
    b.click("button[type=submit]").await;
    assert!(b
        .wait_text("p.error", 10)
        .await
        .contains("Wrong name or password"));
    b.login(&ui.base, "alice", PASSWORD).await;
    assert!(b.text("#queue").await.contains("Nothing is waiting"));

    // A request held now appears in the open page, without reload, and the tab counts it.
    let decision = ui.agent.ask(request(
        "r-approve",
        "claude",
        &["kubectl", "delete", "namespace", "payments"],
    ));
    let row = b.wait_for("#queue a[href='/requests/r-approve']", 5).await;
    assert!(row
        .text()
        .await
        .unwrap()
        .contains("kubectl delete namespace payments"));
    assert!(b.text("#queue").await.contains("build-01"));
    for _ in 0..50 {
        if b.client.title().await.unwrap().starts_with("(1) ") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(b.client.title().await.unwrap().starts_with("(1) "));

    // The request page shows what the agent sent.
    row.click().await.unwrap();
    b.wait_for("form.decide", 10).await;
    let page = b.text("main").await;
    for expected in [
        "/srv/agent/work",
        "python3 agent.py",
        "KUBECONFIG",
        "Deleting cluster objects",
        "maria",
        "namespace",
        "oncall",
    ] {
        assert!(
            page.contains(expected),
            "request page lacks {expected:?}:\n{page}"
        );
    }

    // Approve with a reason: the agent receives the decision.
    b.fill("#reason", "change ticket CHG-42").await;
    b.click("#approve").await;
    b.wait_for("p.outcome", 10).await;
    let d = tokio::time::timeout(Duration::from_secs(10), decision)
        .await
        .expect("the agent got no decision")
        .unwrap();
    assert_eq!(d.verdict, Verdict::Allow as i32);
    assert_eq!(d.decided_by, "alice");
    assert!(d.reason.contains("CHG-42"));
    assert!(b.text("p.outcome").await.contains("approved"));

    // Deny: without a reason the browser does not submit and the request stays pending; with
    // one, the agent is told.
    let decision = ui.agent.ask(request(
        "r-deny",
        "claude",
        &["kubectl", "delete", "pvc", "--all"],
    ));
    wait_state(&ui.plane, "r-deny", RequestState::Pending).await;
    b.goto(&format!("{}/requests/r-deny", ui.base)).await;
    b.wait_for("#deny", 10).await;
    b.click("#deny").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        ui.plane.store.get("r-deny").await.unwrap().state(),
        RequestState::Pending
    );
    b.fill("#reason", "not during the freeze").await;
    b.click("#deny").await;
    b.wait_for("p.outcome", 10).await;
    let d = tokio::time::timeout(Duration::from_secs(10), decision)
        .await
        .expect("the agent got no decision")
        .unwrap();
    assert_eq!(d.verdict, Verdict::Deny as i32);
    assert_eq!(d.reason, "not during the freeze");

    // Both decisions are in the audit trail, which verifies.
    b.goto(&format!("{}/audit", ui.base)).await;
    assert!(b.text("#audit-status").await.contains("verified"));
    let audit = b.text("#audit").await;
    assert!(audit.contains("request.vote.approve") && audit.contains("request.vote.deny"));
    b.close().await;
}

async fn own_request_shows_no_buttons_and_the_server_refuses_forged_votes(t: TestDb) {
    let ui = start(&t).await;
    let _decision = ui.agent.ask(request(
        "r-own",
        "claude",
        &["kubectl", "delete", "ns", "x"],
    ));
    wait_state(&ui.plane, "r-own", RequestState::Pending).await;
    let b = Browser::start().await;

    // claude is in the approver group, but made the request.
    b.login(&ui.base, "claude", PASSWORD).await;
    b.goto(&format!("{}/requests/r-own", ui.base)).await;
    assert!(b
        .wait_text("#no-vote", 10)
        .await
        .contains("made this request"));
    assert!(!b.has("#approve").await && !b.has("#deny").await);

    // A forged form post, with the session's valid CSRF token, is refused by the server.
    let csrf = csrf_of(&b).await;
    let status = b
        .post_from_page(
            "/requests/r-own/decide",
            &format!("csrf={csrf}&verdict=allow&reason=me"),
        )
        .await;
    assert_eq!(status, 403);

    // Without the CSRF token (or with a wrong one) a state change is refused before anything
    // else is looked at.
    let status = b
        .post_from_page("/requests/r-own/decide", "verdict=deny&reason=x")
        .await;
    assert_eq!(status, 403);
    let status = b
        .post_from_page(
            "/requests/r-own/decide",
            "csrf=forged&verdict=deny&reason=x",
        )
        .await;
    assert_eq!(status, 403);
    let status = b.post_from_page("/logout", "csrf=forged").await;
    assert_eq!(status, 403);

    // dave is in no approver group: no buttons, and a post is refused.
    let b2 = Browser::start().await;
    b2.login(&ui.base, "dave", PASSWORD).await;
    b2.goto(&format!("{}/requests/r-own", ui.base)).await;
    assert!(b2
        .wait_text("#no-vote", 10)
        .await
        .contains("not in the approver groups"));
    assert!(!b2.has("#approve").await);
    let csrf = csrf_of(&b2).await;
    let status = b2
        .post_from_page(
            "/requests/r-own/decide",
            &format!("csrf={csrf}&verdict=allow&reason=x"),
        )
        .await;
    assert_eq!(status, 403);
    assert_eq!(
        ui.plane.store.get("r-own").await.unwrap().state(),
        RequestState::Pending
    );
    assert!(ui.plane.store.get("r-own").await.unwrap().votes.is_empty());

    // bob is in oncall through his account's groups: he gets the buttons.
    let b3 = Browser::start().await;
    b3.login(&ui.base, "bob", PASSWORD).await;
    b3.goto(&format!("{}/requests/r-own", ui.base)).await;
    b3.wait_for("#approve", 10).await;
    b.close().await;
    b2.close().await;
    b3.close().await;
}

async fn pages_need_a_session_and_history_exports_the_filter(t: TestDb) {
    let ui = start(&t).await;
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    // No session: pages redirect to the login page, state changes get 401.
    let r = http
        .get(format!("{}/history", ui.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 303);
    assert_eq!(r.headers()["location"], "/login?next=%2Fhistory");
    let r = http
        .post(format!("{}/requests/x/decide", ui.base))
        .form(&[("verdict", "allow")])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);

    let approve = ui
        .agent
        .ask(request("h-1", "claude", &["kubectl", "delete", "ns", "a"]));
    let _deny = ui
        .agent
        .ask(request("h-2", "claude", &["kubectl", "delete", "ns", "b"]));
    wait_state(&ui.plane, "h-2", RequestState::Pending).await;
    let decisions = ui.plane.decisions();
    let alice = airlock_control_plane::decide::Approver::named("alice");
    decisions
        .decide(&alice, "h-1", Verdict::Allow, "", 0)
        .await
        .unwrap();
    decisions
        .decide(&alice, "h-2", Verdict::Deny, "no", 0)
        .await
        .unwrap();
    let _ = approve.await;
    // Observe mode's record, and a request asked ahead with the AI agent's own words.
    ui.agent.record(ActionRequest {
        decided: Some(airlock_proto::v1::LocalDecision {
            verdict: Verdict::Allow as i32,
            cause: "observe".into(),
            reason: "observe mode".into(),
            would_be: "ask".into(),
        }),
        ..request("h-3", "claude", &["kubectl", "apply", "-f", "x"])
    });
    let mut ahead = request("h-4", "claude", &["kubectl", "delete", "ns", "c"]);
    ahead.asked_ahead = true;
    ahead.justification = "<script>document.title='pwned'</script> INC-42".into();
    ahead.ahead_minutes = 5;
    let _ahead = ui.agent.ask(ahead);
    wait_state(&ui.plane, "h-3", RequestState::Observed).await;
    wait_state(&ui.plane, "h-4", RequestState::Pending).await;

    let b = Browser::start().await;
    b.login(&ui.base, "alice", PASSWORD).await;
    b.goto(&format!("{}/history?decision=denied", ui.base))
        .await;
    let rows = b.text("#history").await;
    assert!(rows.contains("ns b") && !rows.contains("ns a"), "{rows}");
    // Observed actions apart: their own filter, badge and page.
    b.goto(&format!("{}/history?decision=observed", ui.base))
        .await;
    let rows = b.text("#history").await;
    assert!(
        rows.contains("apply -f x") && !rows.contains("ns b"),
        "{rows}"
    );
    assert!(b.has("#history .badge.observed").await);
    b.goto(&format!("{}/requests/h-3", ui.base)).await;
    let page = b.text("body").await;
    assert!(
        page.contains("ran unstopped (observe mode)") && page.contains("held it for approval"),
        "{page}"
    );
    // Asked ahead: marked, and the justification shown as text, never run.
    b.goto(&format!("{}/requests/h-4", ui.base)).await;
    let page = b.text("body").await;
    assert!(page.contains("Asked ahead"), "{page}");
    assert!(
        page.contains("<script>document.title='pwned'</script> INC-42"),
        "{page}"
    );
    assert!(!b.has("dd.justification script").await);
    let title = b.client.title().await.unwrap();
    assert_ne!(title, "pwned");
    // Export the same filter, with the browser's session.
    let script = "const done = arguments[0]; \
        fetch('/history/export?decision=denied&format=csv').then(r => r.text()).then(done);";
    let csv = b.client.execute_async(script, vec![]).await.unwrap();
    let csv = csv.as_str().unwrap();
    assert!(
        csv.starts_with("id,received,host,account,what,rule,risk,decision"),
        "{csv}"
    );
    assert!(csv.contains("h-2") && !csv.contains("h-1"), "{csv}");
    let script = "const done = arguments[0]; \
        fetch('/audit/export?action=request.vote.*&format=jsonl').then(r => r.text()).then(done);";
    let jsonl = b.client.execute_async(script, vec![]).await.unwrap();
    let lines: Vec<serde_json::Value> = jsonl
        .as_str()
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    assert!(lines.iter().all(|l| l["actor"] == "alice"));

    // On a phone-sized screen the history table reflows instead of scrolling sideways.
    b.client.set_window_size(390, 844).await.unwrap();
    b.goto(&format!("{}/history", ui.base)).await;
    let fits = b
        .client
        .execute(
            "return document.documentElement.scrollWidth <= window.innerWidth;",
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(
        fits,
        serde_json::Value::Bool(true),
        "history overflows a phone screen"
    );
    b.client.set_window_size(1280, 900).await.unwrap();

    // The agents and policy pages show the connected agent and the rule.
    b.goto(&format!("{}/agents", ui.base)).await;
    let agents = b.text("#agents").await;
    assert!(
        agents.contains("build-01") && agents.contains("connected") && agents.contains("env=prod")
    );
    b.goto(&format!("{}/policy", ui.base)).await;
    assert!(b.text("#rules").await.contains("kubectl-delete"));

    // The delivery log is for admins only: no link for alice, and the server refuses her.
    assert!(!b.has("a[href='/admin/deliveries']").await);
    let script = "const done = arguments[0]; \
        fetch('/admin/deliveries').then(r => done(r.status));";
    let status = b.client.execute_async(script, vec![]).await.unwrap();
    assert_eq!(status, serde_json::json!(403));
    let admin = Browser::start().await;
    admin.login(&ui.base, "ops", PASSWORD).await;
    admin.click("a[href='/admin/deliveries']").await;
    admin.wait_for("#deliveries", 10).await;
    admin.close().await;

    // Logging out ends the session for good.
    b.click("form.who button").await;
    b.wait_for("#password", 10).await;
    b.goto(&format!("{}/history", ui.base)).await;
    b.wait_for("#password", 10).await;
    b.close().await;
}

async fn oidc_login_in_the_browser_maps_groups_and_refuses_a_bad_token(t: TestDb) {
    let idp =
        issuer::Issuer::start(issuer::TestUser::new("erin@example.com", &["okta-oncall"])).await;
    let mut cfg = idp.oidc_file();
    cfg.group_map.insert("okta-oncall".into(), "oncall".into());
    cfg.label = "Sign in with Test IdP".into();
    cfg.allowed_groups = vec!["oncall".into()];
    let ui = start_with_oidc(&t, Some(cfg)).await;
    let _decision = ui
        .agent
        .ask(request("o-1", "claude", &["kubectl", "delete", "ns", "x"]));
    wait_state(&ui.plane, "o-1", RequestState::Pending).await;

    // The login page offers the issuer; one click there and back logs erin in, and her
    // issuer group (mapped to oncall) lets her vote.
    let b = Browser::start().await;
    b.goto(&format!("{}/requests/o-1", ui.base)).await;
    b.wait_for("a.button", 10).await;
    assert!(b.text("a.button").await.contains("Sign in with Test IdP"));
    b.click("a.button").await;
    b.wait_for("header.top", 10).await;
    assert!(b.text("form.who").await.contains("erin@example.com"));
    b.goto(&format!("{}/requests/o-1", ui.base)).await;
    b.wait_for("#approve", 10).await;
    b.close().await;

    // A token for another audience is refused: no session, a clear reason.
    idp.set_fault(issuer::Fault::WrongAudience);
    let b = Browser::start().await;
    b.goto(&format!("{}/login", ui.base)).await;
    b.wait_for("a.button", 10).await;
    b.click("a.button").await;
    let err = b.wait_text("p.error", 10).await;
    assert!(
        err.contains("Single sign-on failed") && err.contains("audience"),
        "{err}"
    );
    b.goto(&format!("{}/", ui.base)).await;
    b.wait_for("#password", 10).await;

    // Someone the issuer knows but who is in none of the allowed groups does not get in.
    idp.set_fault(issuer::Fault::None);
    idp.set_user(issuer::TestUser::new("mallory@example.com", &["sales"]));
    b.goto(&format!("{}/login", ui.base)).await;
    b.wait_for("a.button", 10).await;
    b.click("a.button").await;
    let err = b.wait_text("p.error", 10).await;
    assert!(err.contains("none of the groups allowed"), "{err}");
    let audit = ui
        .plane
        .store
        .audit_query(&Default::default())
        .await
        .unwrap();
    let logins: Vec<&str> = audit
        .iter()
        .filter(|r| r.action == "login")
        .map(|r| r.actor.as_str())
        .collect();
    assert_eq!(logins, ["erin@example.com"]);
    b.close().await;
}

async fn the_live_stream_ends_with_the_session(t: TestDb) {
    use tokio_stream::StreamExt;
    let ui = start(&t).await;
    let http = reqwest::Client::builder()
        .cookie_store(true)
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let page = http
        .get(format!("{}/login", ui.base))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let field = |page: &str, name: &str| {
        page.split(&format!("name=\"{name}\" value=\""))
            .nth(1)
            .and_then(|s| s.split('"').next())
            .unwrap()
            .to_owned()
    };
    let token = field(&page, "login_csrf");
    let r = http
        .post(format!("{}/login", ui.base))
        .form(&[
            ("name", "alice"),
            ("password", PASSWORD),
            ("login_csrf", &token),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 303);
    let mut events = http
        .get(format!("{}/events", ui.base))
        .send()
        .await
        .unwrap()
        .bytes_stream();

    // While logged in, a new request shows up on the stream.
    let _first = ui
        .agent
        .ask(request("s-1", "claude", &["kubectl", "delete", "a"]));
    let chunk = tokio::time::timeout(Duration::from_secs(5), events.next())
        .await
        .expect("no event")
        .unwrap()
        .unwrap();
    assert!(String::from_utf8_lossy(&chunk).contains("s-1"));

    // After logout, the next change ends the stream instead of being sent.
    let home = http
        .get(format!("{}/", ui.base))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let csrf = field(&home, "csrf");
    let r = http
        .post(format!("{}/logout", ui.base))
        .form(&[("csrf", csrf.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 303);
    let _second = ui
        .agent
        .ask(request("s-2", "claude", &["kubectl", "delete", "b"]));
    let rest = tokio::time::timeout(Duration::from_secs(5), async {
        let mut seen = String::new();
        while let Some(Ok(c)) = events.next().await {
            seen.push_str(&String::from_utf8_lossy(&c));
        }
        seen
    })
    .await
    .expect("the stream did not end after logout");
    assert!(!rest.contains("s-2"), "an event after logout: {rest}");
}

/// An SVG chart's row (`a[data-label=...]`) text: label and value.
async fn chart_row(b: &Browser, chart: &str, label: &str) -> (String, String) {
    let css = format!("#{chart} a[data-label='{label}']");
    let el = b.wait_for(&css, 10).await;
    let href = el.attr("href").await.unwrap().unwrap_or_default();
    (el.text().await.unwrap(), href)
}

/// The nearest-rank percentile and the page's way of writing a duration, to check its numbers.
fn expected_latency(mut ms: Vec<i64>) -> String {
    ms.sort_unstable();
    let rank = |q: usize| ms[(q * ms.len()).div_ceil(100).max(1) - 1];
    let show = |v: i64| match v {
        ..=999 => format!("{v} ms"),
        1_000..=59_999 => format!("{:.1} s", v as f64 / 1e3),
        _ => format!("{:.1} min", v as f64 / 60e3),
    };
    format!(
        "median {} · p90 {} · {} decided",
        show(rank(50)),
        show(rank(90)),
        ms.len()
    )
}

async fn insights_charts_count_what_happened_and_link_to_history(t: TestDb) {
    let ui = start(&t).await;
    let ask = |id: &str, user: &str, rule: &str, deadline_ms: i64| {
        let mut r = request(id, user, &["kubectl", "delete", "ns", id]);
        r.rule = rule.into();
        r.deadline_unix_ms = airlock_control_plane::types::now_ms() + deadline_ms;
        ui.agent.ask(r)
    };
    // Three kubectl-delete requests (two from claude, one from ci-bot) that people decide, and
    // one prod-db request from claude that nobody decides before it expires.
    let answers = [
        ask("i-1", "claude", "kubectl-delete", 600_000),
        ask("i-2", "claude", "kubectl-delete", 600_000),
        ask("i-3", "ci-bot", "kubectl-delete", 600_000),
    ];
    // Its answer is the agent's own deadline, not the server's: not awaited.
    let _expiring = ask("i-4", "claude", "prod-db", 800);
    for id in ["i-1", "i-2", "i-3"] {
        wait_state(&ui.plane, id, RequestState::Pending).await;
    }
    let decisions = ui.plane.decisions();
    let (alice, bob) = (
        airlock_control_plane::decide::Approver::named("alice"),
        airlock_control_plane::decide::Approver {
            name: "bob".into(),
            groups: vec!["oncall".into()],
        },
    );
    decisions
        .decide(&alice, "i-1", Verdict::Allow, "", 0)
        .await
        .unwrap();
    decisions
        .decide(&alice, "i-2", Verdict::Deny, "no", 0)
        .await
        .unwrap();
    decisions
        .decide(&bob, "i-3", Verdict::Allow, "", 0)
        .await
        .unwrap();
    wait_state(&ui.plane, "i-4", RequestState::Expired).await;
    for a in answers {
        let _ = a.await;
    }
    let mut latency = Vec::new();
    for id in ["i-1", "i-2", "i-3"] {
        let h = ui.plane.store.get(id).await.unwrap();
        latency.push(h.decided_unix_ms - h.received_unix_ms);
    }

    let b = Browser::start().await;
    b.login(&ui.base, "alice", PASSWORD).await;
    b.click("a[href='/insights']").await;
    let window = b.wait_text("#window", 10).await;
    assert!(window.contains("4 request(s), 1 expired"), "{window}");

    let (text, href) = chart_row(&b, "chart-rules", "kubectl-delete").await;
    assert!(
        text.contains("kubectl-delete") && text.ends_with('3'),
        "{text}"
    );
    assert!(
        href.starts_with("/history?rule=kubectl-delete&from="),
        "{href}"
    );
    assert!(chart_row(&b, "chart-rules", "prod-db")
        .await
        .0
        .ends_with('1'));
    assert!(chart_row(&b, "chart-accounts", "claude")
        .await
        .0
        .ends_with('3'));
    assert!(chart_row(&b, "chart-accounts", "ci-bot")
        .await
        .0
        .ends_with('1'));
    let (text, href) = chart_row(&b, "chart-approvers", "alice").await;
    assert!(text.contains("1 allowed · 1 denied"), "{text}");
    assert!(href.starts_with("/history?approver=alice&"), "{href}");
    let (text, _) = chart_row(&b, "chart-approvers", "bob").await;
    assert!(text.contains("1 allowed · 0 denied"), "{text}");
    let (text, _) = chart_row(&b, "chart-latency", "kubectl-delete").await;
    assert!(text.contains(&expected_latency(latency)), "{text}");
    assert!(
        !b.has("#chart-latency a[data-label='prod-db']").await,
        "an expiry is no decision"
    );

    // Today's columns: four received; two approved, one denied, one expired.
    let today = time::OffsetDateTime::now_utc().date().to_string();
    for (chart, total) in [
        ("chart-received", "4"),
        ("chart-decided", "4"),
        ("chart-expired", "1"),
    ] {
        let col = b
            .wait_for(&format!("#{chart} a[data-day='{today}']"), 10)
            .await;
        assert_eq!(
            col.attr("data-total").await.unwrap().as_deref(),
            Some(total),
            "{chart}"
        );
    }
    // The page needs no script: every chart is inline SVG in the served HTML.
    let script = "const done = arguments[0]; fetch('/insights').then(r => r.text()).then(done);";
    let html = b.client.execute_async(script, vec![]).await.unwrap();
    let html = html.as_str().unwrap();
    assert!(
        html.contains("<svg") && html.contains("id=\"chart-rules\""),
        "{html}"
    );

    // Each chart links to the history filtered the same way: the expired rule's row.
    let (_, href) = chart_row(&b, "chart-expired-rules", "prod-db").await;
    assert!(href.contains("decision=expired"), "{href}");
    b.goto(&format!("{}{href}", ui.base)).await;
    let rows = b.wait_text("#history", 10).await;
    assert!(
        rows.contains("ns i-4") && !rows.contains("ns i-1"),
        "{rows}"
    );
    b.close().await;
}

/// An HTTP client (no browser) whose connections come from `ip` (any 127.0.0.0/8 address).
fn client_from(ip: &str) -> reqwest::Client {
    reqwest::Client::builder()
        .cookie_store(true)
        .redirect(reqwest::redirect::Policy::none())
        .local_address(ip.parse::<std::net::IpAddr>().unwrap())
        .build()
        .unwrap()
}

/// The login form, filled in and sent by `http` as `name` with `password`.
async fn post_login(
    http: &reqwest::Client,
    base: &str,
    name: &str,
    password: &str,
) -> reqwest::Response {
    let page = http
        .get(format!("{base}/login"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let token = page
        .split("name=\"login_csrf\" value=\"")
        .nth(1)
        .and_then(|s| s.split('"').next())
        .unwrap()
        .to_owned();
    http.post(format!("{base}/login"))
        .form(&[
            ("name", name),
            ("password", password),
            ("login_csrf", &token),
        ])
        .send()
        .await
        .unwrap()
}

/// Guessing from one address makes that address wait, whatever name it tries next; the person
/// whose name was guessed still logs in from elsewhere, a few seconds late at most; the audit
/// trail gets a sample of the failures, not one record per guess.
async fn failed_logins_slow_the_address_not_the_name(t: TestDb) {
    let ui = start(&t).await;
    let guesser = client_from("127.0.0.2");
    for _ in 0..3 {
        let r = post_login(&guesser, &ui.base, "alice", "not-her-password").await;
        assert_eq!(r.status(), 401);
    }
    for (name, password) in [("bob", PASSWORD), ("alice", "guess")] {
        let r = post_login(&guesser, &ui.base, name, password).await;
        assert_eq!(r.status(), 429, "{name} from the guessing address");
        assert!(r.headers().contains_key("retry-after"));
    }
    let started = std::time::Instant::now();
    let r = post_login(&client_from("127.0.0.1"), &ui.base, "alice", PASSWORD).await;
    assert_eq!(r.status(), 303, "alice logs in from her own address");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    let failed = ui
        .plane
        .store
        .audit_query(&airlock_control_plane::audit::Filter {
            action: Some("login.failed".into()),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(
        failed.len(),
        2,
        "the 1st and 2nd of 3 failures are recorded"
    );
    assert!(
        failed[1].payload.contains("\"failures_from_client\":2"),
        "{}",
        failed[1].payload
    );
}

/// `/auth/oidc/start` needs no login: one address may not fill the pending logins for everyone.
async fn oidc_starts_are_capped_per_client(t: TestDb) {
    let idp = issuer::Issuer::start(issuer::TestUser::new(
        "erin@example.com",
        &["okta-approvers"],
    ))
    .await;
    let ui = start_with_oidc(&t, Some(idp.oidc_file())).await;
    let flood = client_from("127.0.0.3");
    let start = |http: reqwest::Client| {
        let url = format!("{}/auth/oidc/start", ui.base);
        async move { http.get(url).send().await.unwrap().status() }
    };
    for _ in 0..20 {
        assert_eq!(start(flood.clone()).await, 303);
    }
    assert_eq!(start(flood.clone()).await, 429, "the 21st from one address");
    assert_eq!(
        start(client_from("127.0.0.1")).await,
        303,
        "others still get in"
    );
}

both!(
    failed_logins_slow_the_address_not_the_name,
    oidc_starts_are_capped_per_client,
    login_live_queue_approve_with_reason_and_deny,
    own_request_shows_no_buttons_and_the_server_refuses_forged_votes,
    pages_need_a_session_and_history_exports_the_filter,
    oidc_login_in_the_browser_maps_groups_and_refuses_a_bad_token,
    the_live_stream_ends_with_the_session,
    insights_charts_count_what_happened_and_link_to_history,
);
