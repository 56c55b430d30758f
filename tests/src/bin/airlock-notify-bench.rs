//! How fast approvers are told, and how fast their decision reaches the agent: a control plane
//! on loopback (SQLite file in WAL mode, the web UI, a signed webhook), a real agent stream
//! sending held requests, and three listeners that time each request's arrival: a web UI
//! session's live event stream (what the browser's queue uses), a gRPC watcher, and a webhook
//! receiver. Then every request is approved over gRPC and the time until the agent has the
//! decision is measured. The goal the issue sets is "told within a second".
//!
//! `cargo run --release -p airlock-tests --bin airlock-notify-bench -- --out bench/notify.md`

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use airlock_agent::decider::Decider;
use airlock_control_plane::{
    auth::{accounts, Scope},
    config::ServerConfig,
    notify,
    store::{Database, Store},
    web::{Settings, Web},
    ControlPlane,
};
use airlock_proto::v1::{
    action_request::Action, ActionRequest, DecideRequest, ExecAction, Hello, ProcessContext,
    Verdict, WatchRequestsRequest,
};
use anyhow::{Context, Result};
use clap::Parser;
use tokio_stream::StreamExt;

/// Measures notification and decision latency of the control plane on this machine.
#[derive(Debug, Parser)]
struct Args {
    /// Held requests to send.
    #[arg(long, default_value_t = 200)]
    requests: usize,
    /// Pause between requests, milliseconds (the requests are independent holds).
    #[arg(long, default_value_t = 10)]
    gap_ms: u64,
    /// Write the results (Markdown) here as well as to standard output.
    #[arg(long)]
    out: Option<std::path::PathBuf>,
}

/// Arrival times by request id, per listener.
type Arrivals = Arc<Mutex<HashMap<String, Instant>>>;

fn note(arrivals: &Arrivals, id: &str) {
    arrivals
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .entry(id.to_owned())
        .or_insert_with(Instant::now);
}

fn request(i: usize) -> ActionRequest {
    ActionRequest {
        request_id: format!("bench-{i}"),
        rule: "kubectl-delete".into(),
        process: Some(ProcessContext {
            user: "agent".into(),
            ..Default::default()
        }),
        action: Some(Action::Exec(ExecAction {
            path: "/usr/local/bin/kubectl".into(),
            argv: vec!["kubectl".into(), "delete".into(), format!("ns-{i}")],
            ..Default::default()
        })),
        deadline_unix_ms: i64::MAX,
        ..Default::default()
    }
}

/// p50, p95, p99 and max of `ms`, in milliseconds.
fn summary(mut ms: Vec<f64>) -> String {
    if ms.is_empty() {
        return "| – | – | – | – | 0 |".into();
    }
    ms.sort_by(f64::total_cmp);
    let at = |q: f64| ms[((ms.len() as f64 - 1.0) * q).round() as usize];
    format!(
        "| {:.1} | {:.1} | {:.1} | {:.1} | {} |",
        at(0.5),
        at(0.95),
        at(0.99),
        ms[ms.len() - 1],
        ms.len()
    )
}

/// Latencies of one run, in milliseconds: live stream, watcher, webhook, decision.
struct Run {
    live: Vec<f64>,
    watch: Vec<f64>,
    hook: Vec<f64>,
    decide: Vec<f64>,
}

/// One run; with `hanging`, a second webhook whose receiver never answers is configured too.
async fn run(args: &Args, hanging: bool) -> Result<Run> {
    let dir = tempfile::tempdir()?;
    let store = Store::open(&Database::sqlite(dir.path().join("airlock.db"))).await?;
    let agent_token = store.create_token("bench-host", Scope::Agent).await?;
    let alice = store.create_token("alice", Scope::Approve).await?;
    let password = "bench password, long enough";
    accounts::create(&store, "bob", password, &[]).await?;
    let plane = ControlPlane::new(store);

    // A webhook receiver on loopback, and the hub that signs and sends to it.
    let hooked: Arrivals = Arc::default();
    let receiver = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let hook_url = format!("http://{}/hook", receiver.local_addr()?);
    let h = hooked.clone();
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |body: axum::body::Bytes| {
            let h = h.clone();
            async move {
                if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&body) {
                    if v["event"] == "request.received" {
                        if let Some(id) = v["request"]["request"]["request_id"].as_str() {
                            note(&h, id);
                        }
                    }
                }
                "ok"
            }
        }),
    );
    tokio::spawn(async move { axum::serve(receiver, app).await });
    let secret = dir.path().join("hook.key");
    std::fs::write(&secret, "bench-hmac-key")?;
    let mut hooks = format!(
        "[[webhook]]\nname = \"bench\"\nurl = \"{hook_url}\"\nsecret_file = \"{}\"\n",
        secret.display()
    );
    if hanging {
        // Accepts connections and never answers: its queue fills, the others must not notice.
        let stuck = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        hooks.push_str(&format!(
            "[[webhook]]\nname = \"stuck\"\nurl = \"http://{}/hook\"\nsecret_file = \"{}\"\ntimeout_secs = 30\n",
            stuck.local_addr()?,
            secret.display()
        ));
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((conn, _)) = stuck.accept().await {
                held.push(conn);
            }
        });
    }
    let cfg = ServerConfig::parse(&hooks, "bench")?;

    let grpc = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let grpc_url = format!("http://{}", grpc.local_addr()?);
    let http = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}", http.local_addr()?);
    let public = url::Url::parse(&base)?;
    let channels = notify::channels_from_config(&cfg, &public)?;
    let _hub = notify::Hub::start(plane.store.clone(), &channels, plane.metrics.clone()).await?;
    let web = Web::new(
        plane.clone(),
        Settings::new(public, &Default::default()),
        None,
    );
    let p = plane.clone();
    tokio::spawn(async move { p.serve(grpc, std::future::pending()).await });
    let p = plane.clone();
    tokio::spawn(async move {
        p.serve_http(http, web.router(), std::future::pending())
            .await
    });

    // The browser's live stream: log in as bob, then read /events.
    let browser = reqwest::Client::builder()
        .cookie_store(true)
        .redirect(reqwest::redirect::Policy::none())
        .build()?;
    let page = browser
        .get(format!("{base}/login"))
        .send()
        .await?
        .text()
        .await?;
    let token = page
        .split("name=\"login_csrf\" value=\"")
        .nth(1)
        .and_then(|s| s.split('"').next())
        .context("no login form")?
        .to_owned();
    let login = browser
        .post(format!("{base}/login"))
        .form(&[
            ("name", "bob"),
            ("password", password),
            ("login_csrf", &token),
        ])
        .send()
        .await?;
    anyhow::ensure!(login.status() == 303, "login failed: {}", login.status());
    let live: Arrivals = Arc::default();
    let mut events = browser
        .get(format!("{base}/events"))
        .send()
        .await?
        .bytes_stream();
    let l = live.clone();
    tokio::spawn(async move {
        let mut buf = String::new();
        while let Some(Ok(chunk)) = events.next().await {
            buf.push_str(&String::from_utf8_lossy(&chunk));
            while let Some(end) = buf.find("\n\n") {
                let event: String = buf.drain(..end + 2).collect();
                for line in event.lines() {
                    let Some(data) = line.strip_prefix("data:") else {
                        continue;
                    };
                    if let Ok(v) = serde_json::from_str::<serde_json::Value>(data.trim()) {
                        if v["action"] == "request.received" {
                            if let Some(id) = v["id"].as_str() {
                                note(&l, id);
                            }
                        }
                    }
                }
            }
        }
    });

    // A gRPC watcher, as integrations use.
    let mut approver = airlock_tests::approvals::connect(&grpc_url, &alice).await?;
    let watched: Arrivals = Arc::default();
    let mut watch = approver
        .watch(WatchRequestsRequest {
            include_pending: false,
        })
        .await?
        .into_inner();
    let w = watched.clone();
    tokio::spawn(async move {
        while let Some(Ok(h)) = watch.next().await {
            if let Some(r) = h.request {
                note(&w, &r.request_id);
            }
        }
    });

    let agent = Decider::spawn(
        grpc_url,
        Hello {
            host_id: "bench-host".into(),
            hostname: "bench".into(),
            labels: Default::default(),
            version: "bench".into(),
        },
        Some(agent_token),
    );
    anyhow::ensure!(
        agent.wait_connected(Duration::from_secs(10)).await,
        "agent did not connect"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;

    // Hold requests, one every gap_ms.
    let mut sent = Vec::new();
    let mut answers = Vec::new();
    for i in 0..args.requests {
        let t = Instant::now();
        answers.push(agent.ask(request(i)));
        sent.push((format!("bench-{i}"), t));
        tokio::time::sleep(Duration::from_millis(args.gap_ms)).await;
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline
        && [&live, &watched, &hooked]
            .iter()
            .any(|a| a.lock().map_or(0, |m| m.len()) < args.requests)
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let latency = |arrivals: &Arrivals| -> Vec<f64> {
        let m = arrivals.lock().unwrap_or_else(|p| p.into_inner());
        sent.iter()
            .filter_map(|(id, t)| {
                m.get(id)
                    .map(|a| a.duration_since(*t).as_secs_f64() * 1000.0)
            })
            .collect()
    };
    let (live_ms, watch_ms, hook_ms) = (latency(&live), latency(&watched), latency(&hooked));

    // Approve each over gRPC; time until the agent holds the decision.
    let mut decide_ms = Vec::new();
    for ((id, _), answer) in sent.iter().zip(answers) {
        let t = Instant::now();
        approver
            .decide(DecideRequest {
                request_id: id.clone(),
                verdict: Verdict::Allow as i32,
                reason: "bench".into(),
                ..Default::default()
            })
            .await?;
        let d = tokio::time::timeout(Duration::from_secs(10), answer)
            .await
            .context("no decision at the agent")??;
        anyhow::ensure!(d.verdict == Verdict::Allow as i32, "wrong verdict");
        decide_ms.push(t.elapsed().as_secs_f64() * 1000.0);
    }

    Ok(Run {
        live: live_ms,
        watch: watch_ms,
        hook: hook_ms,
        decide: decide_ms,
    })
}

fn table(r: Run) -> String {
    format!(
        "| from the agent's request to | p50 ms | p95 ms | p99 ms | max ms | n |\n\
         |---|---|---|---|---|---|\n\
         | web UI live stream (SSE, what the queue page uses) {live}\n\
         | gRPC watcher (integrations, `airlockctl requests watch`) {watch}\n\
         | signed webhook delivered (HMAC, own queue) {hook}\n\
         | **from an approval (gRPC Decide) to the decision at the agent** {decide}\n",
        live = summary(r.live),
        watch = summary(r.watch),
        hook = summary(r.hook),
        decide = summary(r.decide),
    )
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let normal = table(run(&args, false).await?);
    let stuck = table(run(&args, true).await?);
    let report = format!(
        "# Notification and decision latency\n\n\
         `cargo run --release -p airlock-tests --bin airlock-notify-bench` ({n} held requests, one \
         every {gap} ms, through a real agent stream; SQLite file in WAL mode with \
         synchronous=FULL; everything on loopback).\n\n\
         Machine: {machine}.\n\n\
         Goal (issue 4): the approver is told within a second (1000 ms).\n\n\
         ## Alone\n\n{normal}\n\
         ## Beside a webhook whose receiver never answers\n\n\
         The same run with a second webhook that accepts connections and never replies (30 s \
         timeout, retries): every channel has its own queue, so nothing above should change.\n\n\
         {stuck}",
        n = args.requests,
        gap = args.gap_ms,
        machine = airlock_tests::machine(),
    );
    print!("{report}");
    if let Some(out) = args.out {
        std::fs::write(&out, &report).with_context(|| format!("writing {}", out.display()))?;
    }
    Ok(())
}
