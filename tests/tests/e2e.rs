//! The whole product on a real kernel: `airlock-server` (the real binary) on this host,
//! `airlock-agent` in a QEMU guest with Debian's kernel connecting to it at 10.0.2.2, and a
//! scripted AI-agent workload in the guest. Approvers act the way people do: some requests are
//! approved through the gRPC API, one is denied in the web UI in headless Chromium, one is left
//! to time out, a grant approves a repeat, and the control plane and the agent are each
//! restarted while a task is held.
//!
//! One boot runs every scenario; each test asserts one scenario, from what the workload saw and
//! from what the audit trail recorded.

#[path = "../../control-plane/tests/support/browser.rs"]
mod browser;

use std::{
    collections::{BTreeMap, HashSet},
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use airlock_control_plane::audit;
use airlock_proto::v1::{
    action_request::Action, DecideRequest, HeldRequest, OutcomeKind, RequestState, Verdict,
    WatchRequestsRequest,
};
use airlock_tests::{
    approvals::{self, Client},
    server::{finish, Records, Server},
    vm::{Guest, GuestRun, START_AGENT},
    workspace_bin,
};
use anyhow::{Context, Result};
use tokio_stream::StreamExt;

const AGENT_CONFIG: &str = r#"
[agent]
decider = "http://10.0.2.2:GRPC_PORT"
host_id = "e2e-guest"
token_file = "/etc/airlock/agent.token"
hold_timeout_secs = 60
unreachable_grace_secs = 30
labels = { env = "e2e" }

[watch]
users = ["agent"]

[[rule]]
name = "kubectl-delete"
description = "Deletes cluster objects"
exec = ["/usr/local/bin/kubectl"]
args = ["delete *"]
decision = "ask"
risk = "high"

[[rule]]
name = "kubectl-drain"
description = "Drains a node"
exec = ["/usr/local/bin/kubectl"]
args = ["drain *"]
decision = "ask"
timeout_secs = 4
on_timeout = "deny"

[[rule]]
name = "prod-db"
description = "Connection to the production database"
connect = ["127.0.0.2/32"]
ports = [5432]
decision = "ask"
risk = "medium"
"#;

const SCRIPT: &str = r#"
k() { out=$(su agent -c "/usr/local/bin/kubectl $*" 2>&1); rc=$?; }
/usr/bin/airlock-workload serve 5432 > /dev/null &
start_agent

k get pods;                    echo "@@R get_rc $rc"; echo "@@R get_out $out"
k delete ns approve-me;        echo "@@R approve_rc $rc"; echo "@@R approve_out $(echo "$out" | tr '\n' '|')"
k delete ns approve-me;        echo "@@R grant_rc $rc"
k delete ns deny-web;          echo "@@R deny_rc $rc"
k drain node-1 timeout-me;     echo "@@R timeout_rc $rc"
echo "@@R db $(su agent -c '/usr/bin/airlock-workload connect tcp 127.0.0.2 5432')"
k delete ns restart-server;    echo "@@R restart_server_rc $rc"; echo "@@R restart_server_out $out"

# The agent is SIGKILLed while the task is held; a new agent picks the hold up.
su agent -c '/usr/local/bin/kubectl delete ns restart-agent' > /tmp/ra.out 2>&1 &
j=$!
sleep 3
kill -9 $AGENT
sleep 1
start_agent
wait $j
echo "@@R restart_agent_rc $?"
echo "@@R restart_agent_out $(cat /tmp/ra.out)"
kill -TERM $AGENT
wait $AGENT
for f in /tmp/agent-*.log; do tail -n 60 $f | sed "s|^|@@LOG $f |"; done
"#;

fn marker(h: &HeldRequest) -> String {
    match h.request.as_ref().and_then(|r| r.action.as_ref()) {
        Some(Action::Exec(e)) => e.argv.last().cloned().unwrap_or_default(),
        Some(Action::Connect(c)) => format!("connect-{}", c.port),
        None => String::new(),
    }
}

async fn client(url: &str, token: &str) -> Option<Client> {
    approvals::connect(url, token).await.ok()
}

fn allow(id: &str, reason: &str, grant_minutes: u32) -> DecideRequest {
    DecideRequest {
        request_id: id.into(),
        verdict: Verdict::Allow as i32,
        reason: reason.into(),
        grant_minutes,
        ..Default::default()
    }
}

/// Approves `id` as soon as the server answers (it may be restarting).
async fn approve_when_up(url: &str, token: &str, id: &str, reason: &str) {
    for _ in 0..100 {
        if let Some(mut c) = client(url, token).await {
            if c.decide(allow(id, reason, 0)).await.is_ok() {
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("could not approve {id}");
}

/// The approvers: watch the server and act on each new request by its marker.
async fn approvers(server: Arc<Mutex<Server>>, alice: String, bob: (String, String)) {
    let (url, base) = {
        let s = server.lock().unwrap();
        (
            format!("http://127.0.0.1:{}", s.grpc),
            format!("http://127.0.0.1:{}", s.http),
        )
    };
    let mut handled: HashSet<String> = HashSet::new();
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let Some(mut c) = client(&url, &alice).await else {
            continue;
        };
        let Ok(stream) = c
            .watch(WatchRequestsRequest {
                include_pending: true,
            })
            .await
        else {
            continue;
        };
        let mut stream = stream.into_inner();
        while let Some(Ok(h)) = stream.next().await {
            let id = h
                .request
                .as_ref()
                .map(|r| r.request_id.clone())
                .unwrap_or_default();
            if h.state() != RequestState::Pending || !handled.insert(id.clone()) {
                continue;
            }
            match marker(&h).as_str() {
                "approve-me" => {
                    c.decide(allow(&id, "ticket-7", 10)).await.unwrap();
                }
                "connect-5432" => {
                    c.decide(allow(&id, "db maintenance", 0)).await.unwrap();
                }
                "deny-web" => {
                    let (base, bob) = (base.clone(), bob.clone());
                    tokio::spawn(async move {
                        let b = browser::Browser::start().await;
                        b.login(&base, &bob.0, &bob.1).await;
                        b.goto(&format!("{base}/requests/{id}")).await;
                        b.wait_for("#deny", 10).await;
                        b.fill("#reason", "web says no").await;
                        b.click("#deny").await;
                        b.wait_for("p.outcome", 10).await;
                        b.close().await;
                    });
                }
                "restart-server" => {
                    // The control plane goes away while the task is held, and comes back; the
                    // decision then goes through the new process.
                    let s = server.clone();
                    tokio::task::spawn_blocking(move || {
                        let mut s = s.lock().unwrap();
                        s.stop();
                        std::thread::sleep(Duration::from_secs(2));
                        s.start().unwrap();
                    })
                    .await
                    .unwrap();
                    approve_when_up(&url, &alice, &id, "after restart").await;
                    break; // the old watch stream died with the old process
                }
                "restart-agent" => {
                    // Decide only after the guest has killed and restarted its agent.
                    let (url, alice) = (url.clone(), alice.clone());
                    tokio::spawn(async move {
                        tokio::time::sleep(Duration::from_secs(12)).await;
                        approve_when_up(&url, &alice, &id, "after agent restart").await;
                    });
                }
                _ => {}
            }
        }
    }
}

struct Booted {
    run: GuestRun,
    requests: Vec<HeldRequest>,
    audit: Vec<audit::Record>,
    verified: Result<i64, String>,
    _dir: tempfile::TempDir,
}

fn boot(kernel: &str) -> Result<Booted> {
    let dir = tempfile::tempdir()?;
    let mut server = Server::new(
        workspace_bin("control-plane", "airlock-server")?,
        dir.path().join("data"),
    )?;
    let agent_token = server.cli(&[
        "tokens",
        "create",
        "--name",
        "e2e-guest",
        "--scope",
        "agent",
    ])?;
    let alice = server.cli(&["tokens", "create", "--name", "alice", "--scope", "approve"])?;
    let bob_line = server.cli(&["users", "add", "bob", "--generate-password"])?;
    let (_, bob_password) = bob_line.split_once(' ').context("users add output")?;
    std::fs::write(dir.path().join("agent.token"), &agent_token)?;
    server.start()?;
    let grpc_port = server.grpc;
    let server = Arc::new(Mutex::new(server));

    let rt = tokio::runtime::Runtime::new()?;
    rt.spawn(approvers(
        server.clone(),
        alice,
        ("bob".into(), bob_password.to_owned()),
    ));

    let workload = env!("CARGO_BIN_EXE_airlock-workload");
    let mut g = Guest::on(kernel);
    g.airlock(
        workload,
        AGENT_CONFIG.replace("GRPC_PORT", &grpc_port.to_string()),
    )?
    .file(
        "/etc/airlock/agent.token",
        dir.path().join("agent.token"),
        0o600,
    )
    .script(format!("{START_AGENT}{SCRIPT}"));
    let run = g.boot(Duration::from_secs(900))?;
    rt.shutdown_background();
    // Kept for a failing run: the guest's console (with the agents' logs) and the server's log.
    let keep = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    let Records {
        requests,
        audit,
        verified,
    } = finish(&server, &keep, "e2e", kernel, &run)?;
    Ok(Booted {
        run,
        requests,
        audit,
        verified,
        _dir: dir,
    })
}

impl Booted {
    fn r(&self, key: &str) -> String {
        let results: BTreeMap<String, String> = self.run.results();
        results
            .get(key)
            .cloned()
            .unwrap_or_else(|| panic!("no result {key}; console:\n{}", self.run.console))
    }

    /// The requests whose marker is `m`, oldest first.
    fn requests(&self, m: &str) -> Vec<&HeldRequest> {
        let mut v: Vec<&HeldRequest> = self.requests.iter().filter(|h| marker(h) == m).collect();
        v.sort_by_key(|h| h.received_unix_ms);
        v
    }

    fn one(&self, m: &str) -> &HeldRequest {
        let v = self.requests(m);
        assert_eq!(v.len(), 1, "requests for {m}: {v:#?}");
        v[0]
    }

    /// Audit records about request `h`.
    fn audit_of(&self, h: &HeldRequest) -> Vec<&audit::Record> {
        let id = &h.request.as_ref().unwrap().request_id;
        self.audit.iter().filter(|r| &r.request_id == id).collect()
    }
}

fn ran_and_exited(h: &HeldRequest, code: i32) -> bool {
    h.outcomes
        .iter()
        .any(|o| o.kind == OutcomeKind::Exited as i32 && o.exit_code == Some(code))
}

fn allowed_actions_pass_without_a_hold(b: &Booted) {
    assert_eq!(b.r("agent_1"), "1", "the agent connected to airlock-server");
    assert_eq!(b.r("get_rc"), "0");
    assert!(b.r("get_out").starts_with("kubectl get pods: done"));
    assert!(b.requests("pods").is_empty(), "kubectl get was not held");
}

fn approved_through_grpc_runs_and_is_audited(b: &Booted) {
    assert_eq!(b.r("approve_rc"), "0");
    // The task's own output, after the lines the agent told it while it was held.
    let out = b.r("approve_out");
    assert!(
        out.contains("is waiting for approval")
            && out.contains("kubectl delete ns approve-me: done"),
        "{out}"
    );
    let all = b.requests("approve-me");
    assert_eq!(all.len(), 2, "the first run and its repeat");
    let h = all[0];
    assert_eq!(h.state(), RequestState::Approved);
    assert_eq!(h.decided_by, "alice");
    assert_eq!(h.reason, "ticket-7");
    let p = h.request.as_ref().unwrap().process.as_ref().unwrap();
    assert_eq!(p.user, "agent", "the requester");
    assert!(h.decided_unix_ms >= h.received_unix_ms && h.received_unix_ms > 0);
    assert!(
        ran_and_exited(h, 0),
        "the agent reported the run: {:?}",
        h.outcomes
    );
    let actions: Vec<(&str, &str)> = b
        .audit_of(h)
        .iter()
        .map(|r| (r.actor.as_str(), r.action.as_str()))
        .collect();
    assert!(
        actions.contains(&("e2e-guest", "request.received")),
        "{actions:?}"
    );
    assert!(
        actions.contains(&("alice", "request.vote.approve")),
        "{actions:?}"
    );
    assert!(actions.contains(&("alice", "grant.created")), "{actions:?}");
    let vote = b
        .audit_of(h)
        .into_iter()
        .find(|r| r.action == "request.vote.approve")
        .unwrap();
    assert!(vote.payload.contains("ticket-7"));
}

fn a_grant_approves_the_repeat_at_once(b: &Booted) {
    assert_eq!(b.r("grant_rc"), "0");
    let repeat = b.requests("approve-me")[1];
    assert_eq!(repeat.state(), RequestState::Approved);
    assert!(
        !repeat.grant_id.is_empty(),
        "approved by a grant: {repeat:?}"
    );
    assert_eq!(repeat.grant_id, b.requests("approve-me")[0].grant_id);
    assert!(repeat.votes.is_empty(), "nobody had to vote");
}

fn denied_in_the_browser_never_runs(b: &Booted) {
    assert_eq!(b.r("deny_rc"), "137", "killed before it ran");
    let h = b.one("deny-web");
    assert_eq!(h.state(), RequestState::Denied);
    assert_eq!(h.decided_by, "bob");
    assert_eq!(h.reason, "web says no");
    assert!(h
        .outcomes
        .iter()
        .any(|o| o.kind == OutcomeKind::Killed as i32));
    assert!(b
        .audit
        .iter()
        .any(|r| r.actor == "bob" && r.action == "login"));
    assert!(b.audit_of(h).iter().any(|r| r.actor == "bob"
        && r.action == "request.vote.deny"
        && r.payload.contains("web says no")));
}

fn unanswered_request_times_out_denied(b: &Booted) {
    assert_eq!(b.r("timeout_rc"), "137");
    let h = b.one("timeout-me");
    assert_eq!(h.state(), RequestState::Expired);
    assert!(b.audit_of(h).iter().any(|r| r.action == "request.expired"));
    assert!(h
        .outcomes
        .iter()
        .any(|o| o.cause == "timeout" && o.kind == OutcomeKind::Killed as i32));
}

fn connect_to_the_database_port_waits_for_approval(b: &Booted) {
    assert!(b.r("db").starts_with("ok"), "db connect: {}", b.r("db"));
    let h = b.one("connect-5432");
    assert_eq!(h.state(), RequestState::Approved);
    assert_eq!(h.reason, "db maintenance");
}

fn control_plane_restart_during_a_hold_loses_nothing(b: &Booted) {
    assert_eq!(
        b.r("restart_server_rc"),
        "0",
        "{}",
        b.r("restart_server_out")
    );
    let h = b.one("restart-server");
    assert_eq!(h.state(), RequestState::Approved);
    assert_eq!(h.reason, "after restart");
    assert!(ran_and_exited(h, 0), "{:?}", h.outcomes);
}

fn agent_restart_during_a_hold_loses_nothing(b: &Booted) {
    assert_eq!(b.r("agent_2"), "1", "the new agent connected");
    assert_eq!(b.r("restart_agent_rc"), "0", "{}", b.r("restart_agent_out"));
    let h = b.one("restart-agent");
    assert_eq!(h.state(), RequestState::Approved);
    assert_eq!(h.reason, "after agent restart");
}

fn the_audit_chain_verifies(b: &Booted) {
    let n = b.verified.clone().expect("audit chain verifies");
    assert!(n as usize >= b.audit.len() && n > 10);
}

airlock_tests::kernel_matrix!(
    boot = boot,
    booted = Booted,
    checks = [
        allowed_actions_pass_without_a_hold,
        approved_through_grpc_runs_and_is_audited,
        a_grant_approves_the_repeat_at_once,
        denied_in_the_browser_never_runs,
        unanswered_request_times_out_denied,
        connect_to_the_database_port_waits_for_approval,
        control_plane_restart_during_a_hold_loses_nothing,
        agent_restart_during_a_hold_loses_nothing,
        the_audit_chain_verifies,
    ]
);
