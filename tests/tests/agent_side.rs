//! The AI agent's side of a hold, on a real kernel: what a held task is told on its own
//! standard error, observe mode, the cap on pending requests and `on_timeout = "wait"`.
//!
//! `airlock-server` (the real binary) runs on this host with `web.public_url` set;
//! `airlock-agent` runs in a QEMU guest with Debian's kernel. An approver watching over gRPC
//! acts on each request by its last argument. One boot runs every scenario; each test asserts
//! one, from what the watched task saw (its exit status and captured stderr) and from what the
//! control plane recorded.

use std::{
    collections::{BTreeMap, HashSet},
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use airlock_control_plane::audit;
use airlock_proto::v1::{
    action_request::Action, DecideRequest, HeldRequest, RequestState, Verdict, WatchRequestsRequest,
};
use airlock_tests::{
    approvals,
    server::{finish, Records, Server},
    vm::{Guest, GuestRun, START_AGENT},
    workspace_bin,
};
use anyhow::Result;
use tokio_stream::StreamExt;

const AGENT_CONFIG: &str = r#"
[agent]
decider = "http://10.0.2.2:GRPC_PORT"
host_id = "side-guest"
token_file = "/etc/airlock/agent.token"
hold_timeout_secs = 5
unreachable_grace_secs = 30
max_pending_per_account = 2
dns_min_ttl_secs = 1

[watch]
users = ["agent", "other"]

[[rule]]
name = "orders-db"
description = "The orders database, by name"
connect = ["orders-db.test"]
ports = [5432]
decision = "ask"

[[rule]]
name = "kubectl-delete"
exec = ["/usr/local/bin/kubectl"]
args = ["delete *"]
decision = "ask"
timeout_secs = 20

[[rule]]
name = "kubectl-drain"
exec = ["/usr/local/bin/kubectl"]
args = ["drain *"]
decision = "ask"
timeout_secs = 3

[[rule]]
name = "kubectl-scale"
exec = ["/usr/local/bin/kubectl"]
args = ["scale *"]
decision = "ask"
on_timeout = "wait"

[[rule]]
name = "kubectl-apply"
exec = ["/usr/local/bin/kubectl"]
args = ["apply *"]
decision = "ask"
mode = "observe"

[[rule]]
name = "kubectl-apply-prod"
exec = ["/usr/local/bin/kubectl"]
args = ["apply -f prod"]
decision = "deny"

[[rule]]
name = "kubectl-patch"
exec = ["/usr/local/bin/kubectl"]
args = ["patch *"]
decision = "deny"
notices = false
"#;

/// The AI agent's MCP session, as account `agent`: a dry run of a held and of a free command,
/// asking ahead, waiting for the decision, then the real command.
const MCP_AGENT: &str = r#"
cd /tmp
P=/usr/bin/airlock-mcp-probe
A=/usr/bin/airlock-agent
out=$($P $A \
  check_delete airlock_check '{"command":"kubectl delete ns ahead-me"}' \
  check_get airlock_check '{"command":"kubectl get pods"}' \
  check_patch airlock_check '{"command":"kubectl patch node-1 x"}' \
  ask airlock_request '{"command":"kubectl delete ns ahead-me","justification":"INC-42: remove the broken namespace","minutes":5}' \
  ask_free airlock_request '{"command":"kubectl get pods","justification":"just looking"}')
echo "$out"
id=$(echo "$out" | grep '^@@R ask ' | grep -o '"request_id":"[^"]*"' | cut -d'"' -f4)
echo "@@R ahead_id $id"
echo "$id" > /tmp/ahead.id
$P $A status airlock_status "{\"request_id\":\"$id\",\"wait_secs\":60}"
t0=$(cut -d' ' -f1 /proc/uptime | tr -d .)
/usr/local/bin/kubectl delete ns ahead-me > /dev/null 2> /tmp/ahead.err
echo "@@R ahead_rc $?"
t1=$(cut -d' ' -f1 /proc/uptime | tr -d .)
echo "@@R ahead_ms $(( (t1 - t0) * 10 ))"
/usr/local/bin/kubectl get pods > /dev/null 2>&1
echo "@@R get_rc $?"
$P $A why airlock_why '{"limit":50}'
"#;

/// Account `other` on the same host tries to read and ask about `agent`'s request.
const MCP_OTHER: &str = r#"
cd /tmp
P=/usr/bin/airlock-mcp-probe
A=/usr/bin/airlock-agent
id=$(cat /tmp/ahead.id)
$P $A other_status airlock_status "{\"request_id\":\"$id\"}" other_why airlock_why '{"limit":50}'
"#;

const SERVER_CONFIG: &str = r#"
[web]
public_url = "https://airlock.test"
"#;

/// Before the agent starts: a DNS responder the test controls (its zone file is read again for
/// every query) as the guest's resolver, and a server on port 5432 of every loopback address.
const DNS_SETUP: &str = r#"
echo "nameserver 127.0.0.1" > /etc/resolv.conf
echo "orders-db.test 127.0.0.3 2" > /tmp/dns.zone
/usr/bin/airlock-workload dns 53 /tmp/dns.zone > /tmp/dns.log 2>&1 &
DNS=$!
/usr/bin/airlock-workload serve 5432 > /dev/null 2>&1 &
"#;

/// `k KEY ARGS...`: runs kubectl as the watched account with stderr to a root-made file, then
/// reports `KEY_rc`, `KEY_err` (stderr, lines joined by `|`) and `KEY_ms` (how long it took).
const SCRIPT: &str = r#"
k() {
  key=$1; shift
  t0=$(cut -d' ' -f1 /proc/uptime | tr -d .)
  su agent -c "/usr/local/bin/kubectl $*" > /dev/null 2> /tmp/$key.err
  rc=$?
  t1=$(cut -d' ' -f1 /proc/uptime | tr -d .)
  echo "@@R ${key}_rc $rc"
  echo "@@R ${key}_ms $(( (t1 - t0) * 10 ))"
  echo "@@R ${key}_err $(tr '\n' '|' < /tmp/$key.err)"
}
start_agent

k approve delete ns approve-me
k deny delete ns deny-me
k expire drain node-1 expire-me
k quiet patch node-1 quiet-me
k observe apply -f observe-me
k observe_prod apply -f prod

ESC=$(printf 'esc\033[8m')
su agent -c "/usr/local/bin/kubectl delete ns '$ESC' esc-me" > /dev/null 2> /tmp/esc.err
echo "@@R esc_rc $?"
echo "@@R esc_raw $(grep -c "$(printf '\033')" /tmp/esc.err)"
echo "@@R esc_err $(tr '\n' '|' < /tmp/esc.err)"

# stderr as a pipe the task writes into.
su agent -c "/usr/local/bin/kubectl delete ns pipe-me" 2>&1 > /dev/null | cat > /tmp/pipe.out
echo "@@R pipe_err $(tr '\n' '|' < /tmp/pipe.out)"

# fd 2 open read-only onto a file only root may read: the agent must not write into it.
printf 'root only\n' > /root/secret
chmod 600 /root/secret
su agent -c "/usr/local/bin/kubectl delete ns ro-me" > /dev/null 2< /root/secret
echo "@@R ro_rc $?"
echo "@@R ro_file $(tr '\n' '|' < /root/secret)"

# No deadline: still held well past hold_timeout_secs (5 s); approved after about 10 s.
su agent -c "/usr/local/bin/kubectl scale deploy wait-me" > /dev/null 2> /tmp/wait.err &
w=$!
sleep 8
if kill -0 $w 2> /dev/null; then echo "@@R wait_held_at_8s 1"; else echo "@@R wait_held_at_8s 0"; fi
wait $w
echo "@@R wait_rc $?"
echo "@@R wait_err $(tr '\n' '|' < /tmp/wait.err)"

# A connect rule by DNS name: the hold follows the name's address (TTL 2 s), the old address
# goes free after its TTL, and a resolver outage keeps the last address held.
db() { su agent -c "/usr/bin/airlock-workload connect tcp $1 5432" 2>&1 | tr '\n' ' '; }
echo "@@R dns_first_a $(db 127.0.0.3)"
echo "@@R dns_first_b $(db 127.0.0.4)"
echo "orders-db.test 127.0.0.4 2" > /tmp/dns.zone
sleep 8
echo "@@R dns_moved_b $(db 127.0.0.4)"
echo "@@R dns_moved_a $(db 127.0.0.3)"
kill $DNS
sleep 8
echo "@@R dns_outage_b $(db 127.0.0.4)"

# The AI agent's side over MCP, as agent, then as other.
su agent -c 'sh /opt/mcp-agent.sh'
su other -c 'sh /opt/mcp-other.sh'

# The cap: two requests of the account wait; a third is denied at once.
su agent -c "/usr/local/bin/kubectl delete ns cap-1" > /dev/null 2> /dev/null &
c1=$!
su agent -c "/usr/local/bin/kubectl delete ns cap-2" > /dev/null 2> /dev/null &
c2=$!
sleep 2
k cap delete ns cap-3
wait $c1; echo "@@R cap1_rc $?"
wait $c2; echo "@@R cap2_rc $?"

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

fn vote(id: &str, verdict: Verdict, reason: &str) -> DecideRequest {
    DecideRequest {
        request_id: id.into(),
        verdict: verdict as i32,
        reason: reason.into(),
        ..Default::default()
    }
}

/// The approver: watches the server and acts on each new request by its marker. Markers it
/// does not know (`expire-me`) are left to their deadline.
async fn approver(url: String, alice: String) {
    let mut handled: HashSet<String> = HashSet::new();
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let Ok(mut c) = approvals::connect(&url, &alice).await else {
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
            let decision = match marker(&h).as_str() {
                // Only the request asked ahead: the real command after it must pass by the
                // grant its approval made, or wait out its deadline and fail.
                "ahead-me" if h.request.as_ref().is_some_and(|r| r.asked_ahead) => {
                    Some((Duration::ZERO, Verdict::Allow, "go ahead"))
                }
                "approve-me" | "esc-me" | "pipe-me" | "ro-me" => {
                    Some((Duration::ZERO, Verdict::Allow, "ticket-7"))
                }
                "deny-me" => Some((Duration::ZERO, Verdict::Deny, "not during the freeze")),
                "wait-me" => Some((Duration::from_secs(10), Verdict::Allow, "late but fine")),
                "cap-1" | "cap-2" => Some((Duration::from_secs(6), Verdict::Allow, "ok")),
                "connect-5432" => Some((Duration::ZERO, Verdict::Deny, "not the orders db")),
                _ => None,
            };
            if let Some((after, verdict, reason)) = decision {
                let mut c = c.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(after).await;
                    let _ = c.decide(vote(&id, verdict, reason)).await;
                });
            }
        }
    }
}

struct Booted {
    run: GuestRun,
    requests: Vec<HeldRequest>,
    audit: Vec<audit::Record>,
    _dir: tempfile::TempDir,
}

fn boot(kernel: &str) -> Result<Booted> {
    let dir = tempfile::tempdir()?;
    let mut server = Server::new(
        workspace_bin("control-plane", "airlock-server")?,
        dir.path().join("data"),
    )?;
    let config = dir.path().join("server.toml");
    std::fs::write(&config, SERVER_CONFIG)?;
    server.config = Some(config);
    let agent_token = server.cli(&[
        "tokens",
        "create",
        "--name",
        "side-guest",
        "--scope",
        "agent",
    ])?;
    let alice = server.cli(&["tokens", "create", "--name", "alice", "--scope", "approve"])?;
    std::fs::write(dir.path().join("agent.token"), &agent_token)?;
    server.start()?;
    let url = format!("http://127.0.0.1:{}", server.grpc);
    let grpc_port = server.grpc;
    let server = Arc::new(Mutex::new(server));

    let rt = tokio::runtime::Runtime::new()?;
    rt.spawn(approver(url, alice));
    let workload = env!("CARGO_BIN_EXE_airlock-workload");
    let mut g = Guest::on(kernel);
    g.airlock(
        workload,
        AGENT_CONFIG.replace("GRPC_PORT", &grpc_port.to_string()),
    )?
    .file(
        "/usr/bin/airlock-mcp-probe",
        env!("CARGO_BIN_EXE_airlock-mcp-probe"),
        0o755,
    )
    .text("/opt/mcp-agent.sh", MCP_AGENT, 0o644)
    .text("/opt/mcp-other.sh", MCP_OTHER, 0o644)
    .file(
        "/etc/airlock/agent.token",
        dir.path().join("agent.token"),
        0o600,
    )
    .script(format!("{DNS_SETUP}{START_AGENT}{SCRIPT}"));
    let run = g.boot(Duration::from_secs(600))?;
    rt.shutdown_background();
    let keep = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    let Records {
        requests, audit, ..
    } = finish(&server, &keep, "agent-side", kernel, &run)?;
    Ok(Booted {
        run,
        requests,
        audit,
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

    fn one(&self, m: &str) -> &HeldRequest {
        let v: Vec<&HeldRequest> = self.requests.iter().filter(|h| marker(h) == m).collect();
        assert_eq!(v.len(), 1, "requests for {m}: {v:#?}");
        v[0]
    }

    fn id(&self, m: &str) -> String {
        self.one(m)
            .request
            .as_ref()
            .map(|r| r.request_id.clone())
            .unwrap_or_default()
    }

    /// Asserts that result `key` contains `text`.
    fn expect(&self, key: &str, text: &str) {
        let v = self.r(key);
        assert!(v.contains(text), "{key}: {v}");
    }

    fn audit_actions(&self, m: &str) -> Vec<String> {
        let id = self.id(m);
        self.audit
            .iter()
            .filter(|r| r.request_id == id)
            .map(|r| r.action.clone())
            .collect()
    }
}

fn a_held_task_is_told_it_waits_and_who_approved(b: &Booted) {
    assert_eq!(b.r("agent_1"), "1", "the agent started");
    assert_eq!(b.r("approve_rc"), "0");
    let err = b.r("approve_err");
    let id = b.id("approve-me");
    assert!(
        err.contains(&format!(
            "/kubectl delete ns approve-me\" is waiting for approval (request {id}, up to "
        )) && err.contains(&format!("): https://airlock.test/requests/{id}|")),
        "{err}"
    );
    assert!(
        err.contains("airlock: approved by alice: \"ticket-7\"|"),
        "{err}"
    );
}

fn a_denied_task_is_told_who_denied_it_and_why(b: &Booted) {
    assert_eq!(b.r("deny_rc"), "137", "killed");
    let err = b.r("deny_err");
    assert!(err.contains("is waiting for approval"), "{err}");
    assert!(
        err.contains("airlock: denied by alice: \"not during the freeze\"|"),
        "{err}"
    );
}

fn an_expired_hold_says_so_before_the_kill(b: &Booted) {
    assert_eq!(b.r("expire_rc"), "137");
    let err = b.r("expire_err");
    assert!(
        err.contains("drain node-1 expire-me\" is waiting for approval (request ")
            && (err.contains(", up to 3s)") || err.contains(", up to 2s)")),
        "the rule's 3 s, less what reading the task took: {err}"
    );
    assert!(
        err.contains("airlock: expired: no decision in time; denied|"),
        "{err}"
    );
}

fn notices_can_be_turned_off_per_rule(b: &Booted) {
    assert_eq!(b.r("quiet_rc"), "137", "denied by its rule");
    // (su itself reports the kill: `Killed`.)
    let err = b.r("quiet_err");
    assert!(!err.contains("airlock"), "nothing written: {err}");
}

fn escape_sequences_from_the_task_are_shown_not_run(b: &Booted) {
    assert_eq!(b.r("esc_rc"), "0");
    let err = b.r("esc_err");
    // No line carries a raw ESC byte; the notice carries the two characters `\e`.
    assert_eq!(
        b.r("esc_raw"),
        "0",
        "a raw escape reached the terminal: {err}"
    );
    assert!(err.contains("esc\\e[8m"), "{err}");
}

fn the_notice_goes_into_a_pipe_too(b: &Booted) {
    let err = b.r("pipe_err");
    assert!(err.contains("is waiting for approval"), "{err}");
    assert!(err.contains("airlock: approved by alice"), "{err}");
}

fn a_read_only_stderr_onto_a_root_file_stays_untouched(b: &Booted) {
    assert_eq!(b.r("ro_rc"), "0", "approved and ran");
    assert_eq!(b.r("ro_file"), "root only|");
    assert_eq!(b.one("ro-me").state(), RequestState::Approved);
}

fn observe_mode_records_and_never_stops(b: &Booted) {
    assert_eq!(b.r("observe_rc"), "0", "ran");
    assert_eq!(b.r("observe_err"), "", "the task is not told anything");
    let ms: u64 = b.r("observe_ms").parse().unwrap_or(u64::MAX);
    assert!(ms < 4000, "not held for a decision: {ms} ms");
    let h = b.one("observe-me");
    assert_eq!(h.state(), RequestState::Observed);
    assert!(h.votes.is_empty());
    let local = h.request.as_ref().and_then(|r| r.decided.clone());
    assert_eq!(local.map(|d| d.would_be), Some("ask".to_owned()));
    assert!(b
        .audit_actions("observe-me")
        .contains(&"request.observed".to_owned()));
}

fn an_observe_rule_never_lets_through_what_a_later_rule_enforces(b: &Booted) {
    assert_eq!(
        b.r("observe_prod_rc"),
        "137",
        "denied by kubectl-apply-prod"
    );
    let observed: Vec<&HeldRequest> = b.requests.iter().filter(|h| marker(h) == "prod").collect();
    assert_eq!(observed.len(), 1, "{observed:#?}");
    assert_eq!(
        observed[0].state(),
        RequestState::Observed,
        "still recorded as observed"
    );
}

fn wait_holds_past_every_deadline_until_decided(b: &Booted) {
    assert_eq!(b.r("wait_held_at_8s"), "1", "still held after 8 s");
    assert_eq!(b.r("wait_rc"), "0", "approved, then ran");
    let err = b.r("wait_err");
    assert!(err.contains(", until someone decides)"), "{err}");
    let h = b.one("wait-me");
    assert_eq!(h.state(), RequestState::Approved);
    let r = h.request.as_ref().expect("request");
    assert!(r.wait && r.deadline_unix_ms == 0, "{r:?}");
}

fn past_the_pending_cap_a_hold_is_denied_at_once(b: &Booted) {
    assert_eq!(b.r("cap_rc"), "137");
    let ms: u64 = b.r("cap_ms").parse().unwrap_or(u64::MAX);
    assert!(ms < 4000, "denied at once, not after a wait: {ms} ms");
    let err = b.r("cap_err");
    assert!(
        err.contains("airlock: denied at once: too many pending requests"),
        "{err}"
    );
    let h = b.one("cap-3");
    assert_eq!(h.state(), RequestState::Denied);
    assert_eq!(h.decided_by, "agent (too-many-pending)");
    assert!(h.reason.contains("too many pending requests"), "{h:?}");
    assert!(b
        .audit_actions("cap-3")
        .contains(&"request.refused.agent".to_owned()));
    assert_eq!(b.r("cap1_rc"), "0", "the two under the cap were approved");
    assert_eq!(b.r("cap2_rc"), "0");
}

impl Booted {
    /// A `@@R KEY {json}` line of the MCP probe: whether the tool said error, and its body.
    fn mcp(&self, key: &str) -> (bool, serde_json::Value) {
        let v: serde_json::Value = serde_json::from_str(&self.r(key))
            .unwrap_or_else(|e| panic!("{key}: not JSON ({e}): {}", self.r(key)));
        (v["is_error"] == true, v["body"].clone())
    }
}

fn the_mcp_server_speaks_mcp_to_a_real_client(b: &Booted) {
    assert_eq!(b.r("mcp_server"), "airlock-agent");
    assert_eq!(
        b.r("mcp_tools"),
        "airlock_check,airlock_request,airlock_status,airlock_why"
    );
}

fn a_dry_run_says_what_the_kernel_then_does(b: &Booted) {
    let (err, held) = b.mcp("check_delete");
    assert!(!err, "{held}");
    assert_eq!(held["decision"], "ask", "{held}");
    assert_eq!(held["rule"]["name"], "kubectl-delete", "{held}");
    assert_eq!(held["account"], "agent");
    assert_eq!(held["approval"]["quorum"], 1, "{held}");
    let (_, free) = b.mcp("check_get");
    assert_eq!(free["decision"], "allow", "{free}");
    let (_, denied) = b.mcp("check_patch");
    assert_eq!(denied["decision"], "deny", "{denied}");
    // What the kernel then did: `get pods` ran with no request; `patch` was killed by its
    // rule (notices_can_be_turned_off_per_rule); `delete` was held (the scenarios above).
    assert_eq!(b.r("get_rc"), "0");
    assert!(
        b.requests.iter().all(|h| marker(h) != "pods"),
        "nothing asked for get pods"
    );
    assert_eq!(b.r("quiet_rc"), "137");
}

fn asked_ahead_then_the_real_command_passes_by_the_grant(b: &Booted) {
    let (err, asked) = b.mcp("ask");
    assert!(!err && asked["asked"] == true, "{asked}");
    let id = b.r("ahead_id");
    let ahead = b
        .requests
        .iter()
        .find(|h| h.request.as_ref().is_some_and(|r| r.request_id == id))
        .unwrap_or_else(|| panic!("no request {id}"));
    let r = ahead.request.as_ref().expect("request");
    assert!(r.asked_ahead);
    assert_eq!(r.justification, "INC-42: remove the broken namespace");
    assert_eq!(ahead.state(), RequestState::Approved);
    assert!(!ahead.grant_id.is_empty(), "its approval made a grant");
    let (_, status) = b.mcp("status");
    assert_eq!(status["state"], "approved", "{status}");
    assert_eq!(status["votes"][0]["approver"], "alice", "{status}");
    assert_eq!(status["votes"][0]["reason"], "go ahead", "{status}");
    // The real command: held by the kernel, approved at once by the grant, no vote.
    assert_eq!(b.r("ahead_rc"), "0", "{}", b.r("ahead_ms"));
    let ms: u64 = b.r("ahead_ms").parse().unwrap_or(u64::MAX);
    assert!(ms < 8000, "passed at once, not after an approver: {ms} ms");
    let real: Vec<&HeldRequest> = b
        .requests
        .iter()
        .filter(|h| marker(h) == "ahead-me" && h.request.as_ref().is_some_and(|r| !r.asked_ahead))
        .collect();
    assert_eq!(real.len(), 1, "{real:#?}");
    assert_eq!(real[0].state(), RequestState::Approved);
    assert_eq!(real[0].grant_id, ahead.grant_id, "covered by the grant");
    assert!(real[0].votes.is_empty(), "nobody voted on it");
    let (_, free) = b.mcp("ask_free");
    assert_eq!(
        free["asked"], false,
        "nothing to ask for a free command: {free}"
    );
    let (_, why) = b.mcp("why");
    let listed = why["requests"].as_array().cloned().unwrap_or_default();
    assert!(
        listed.iter().any(|r| r["request_id"] == id.as_str()),
        "{why}"
    );
    assert!(
        listed
            .iter()
            .any(|r| r["state"] == "denied" && r["reason"] == "not during the freeze"),
        "{why}"
    );
}

fn another_account_cannot_read_or_ask_for_the_first(b: &Booted) {
    let (err, body) = b.mcp("other_status");
    assert!(err, "other must not see agent's request: {body}");
    assert!(
        body.as_str()
            .is_some_and(|t| t.contains("of account \"other\"")),
        "{body}"
    );
    let (err, why) = b.mcp("other_why");
    assert!(!err, "{why}");
    assert_eq!(why["account"], "other");
    assert_eq!(why["requests"], serde_json::json!([]), "{why}");
}

fn a_connect_rule_by_name_follows_the_name(b: &Booted) {
    // Held (and denied by the approver) at the name's first address; the other is free. The
    // held task was told, with the name.
    b.expect(
        "dns_first_a",
        "airlock: \"connect to orders-db.test (127.0.0.3):5432\" is waiting",
    );
    b.expect("dns_first_a", "err 13");
    b.expect("dns_first_b", "ok pong");
    // The name moved: its new address is held, the old one is free once its TTL ran out.
    b.expect("dns_moved_b", "err 13");
    b.expect("dns_moved_a", "ok pong");
    // The resolver is gone: the last address stays held.
    b.expect("dns_outage_b", "err 13");
    // Approvers saw the name beside the address, and the audit record says it.
    let held: Vec<&HeldRequest> = b
        .requests
        .iter()
        .filter(|h| marker(h) == "connect-5432")
        .collect();
    assert_eq!(held.len(), 3, "{held:#?}");
    let names: Vec<String> = held
        .iter()
        .filter_map(
            |h| match h.request.as_ref().and_then(|r| r.action.as_ref()) {
                Some(Action::Connect(c)) => Some(format!("{} ({})", c.name, c.address)),
                _ => None,
            },
        )
        .collect();
    assert!(
        names.contains(&"orders-db.test (127.0.0.3)".to_owned()),
        "{names:?}"
    );
    assert!(
        names.contains(&"orders-db.test (127.0.0.4)".to_owned()),
        "{names:?}"
    );
    assert!(
        b.audit
            .iter()
            .any(|r| r.payload.contains("orders-db.test (127.0.0.3):5432")),
        "the audit record names it"
    );
}

airlock_tests::kernel_matrix!(
    boot = boot,
    booted = Booted,
    checks = [
        a_held_task_is_told_it_waits_and_who_approved,
        a_denied_task_is_told_who_denied_it_and_why,
        an_expired_hold_says_so_before_the_kill,
        notices_can_be_turned_off_per_rule,
        escape_sequences_from_the_task_are_shown_not_run,
        the_notice_goes_into_a_pipe_too,
        a_read_only_stderr_onto_a_root_file_stays_untouched,
        observe_mode_records_and_never_stops,
        wait_holds_past_every_deadline_until_decided,
        past_the_pending_cap_a_hold_is_denied_at_once,
        the_mcp_server_speaks_mcp_to_a_real_client,
        a_dry_run_says_what_the_kernel_then_does,
        asked_ahead_then_the_real_command_passes_by_the_grant,
        another_account_cannot_read_or_ask_for_the_first,
        a_connect_rule_by_name_follows_the_name,
        an_observe_rule_never_lets_through_what_a_later_rule_enforces,
    ]
);
