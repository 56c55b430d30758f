//! The kernel path, proven in a real kernel: the agent runs in a QEMU guest with Debian's 6.1
//! kernel (BPF LSM active) and asks a real gRPC decider in this process (reached at 10.0.2.2).
//!
//! One boot runs every scenario (boots are slow under emulation); each test below asserts one
//! scenario's results.

use std::{collections::BTreeMap, time::Duration};

use airlock_proto::v1::{action_request::Action, ActionRequest, OutcomeKind};
use airlock_tests::{
    decider::{Plan, TestDecider},
    vm::{Guest, GuestRun, START_AGENT},
};

/// Deadline of the `slow` rule, seconds.
const SLOW_TIMEOUT_MS: u64 = 3000;
/// Allowed lateness of a timeout or fail-closed under emulation.
const MARGIN_MS: u64 = 2500;
/// Grace before a hold fails closed when the decider is unreachable.
const GRACE_MS: u64 = 2000;

fn plan(r: &ActionRequest) -> Plan {
    match &r.action {
        Some(Action::Connect(c)) => match c.port {
            5432 => Plan::Allow,
            _ => Plan::Deny,
        },

        Some(Action::Exec(e)) => {
            let arg = |p: &str| e.argv.iter().find(|a| a.starts_with(p)).cloned();
            if let Some(a) = arg("c8-") {
                let i: u64 = a[3..].parse().unwrap_or(1);
                // Shuffle the answer order so that a swap would show.
                Plan::After(Duration::from_millis((i * 37) % 500), i.is_multiple_of(2))
            } else if arg("allow-me").is_some() {
                Plan::Allow
            } else if arg("deny-me").is_some() {
                Plan::Deny
            } else if arg("delay-me").is_some() {
                Plan::After(Duration::from_secs(6), true)
            } else if arg("vanish-me").is_some() {
                Plan::DenyThenVanish
            } else {
                Plan::Never
            }
        }
        None => Plan::Deny,
    }
}

fn agent_config(decider_port: u16) -> String {
    format!(
        r#"
[agent]
decider = "http://10.0.2.2:{decider_port}"
hold_timeout_secs = 30
unreachable_grace_secs = {grace}
env_allow = ["AIRLOCK_VISIBLE"]
labels = {{ env = "test" }}
metrics_addr = "127.0.0.1:9464"
# Fifty holds at once (s8): above the default caps of 20 pending requests.
max_pending = 100
max_pending_per_account = 100

[watch]
users = ["agent"]
cgroups = ["ci-runner"]

[[rule]]
name = "kubectl"
description = "cluster changes"
exec = ["/usr/local/bin/kubectl"]
decision = "ask"
risk = "high"

[[rule]]
name = "slow"
exec = ["/usr/local/bin/slowctl"]
decision = "ask"
timeout_secs = {slow}
on_timeout = "deny"

[[rule]]
name = "db"
connect = ["127.0.0.2/32", "::1/128"]
ports = [5432, 5433, 5436]
decision = "ask"
"#,
        grace = GRACE_MS / 1000,
        slow = SLOW_TIMEOUT_MS / 1000,
    )
}

const SCRIPT: &str = r#"
mark() { test -e "$1" && echo yes || echo no; }
mkdir -p /tmp/work && chown agent:agent /tmp/work
mkdir /sys/fs/cgroup/ci-runner
/usr/bin/airlock-workload serve 5432 5433 5436 > /dev/null &
start_agent

# 1: held, decided, ran exactly as asked or never ran
# (the trailing "exit" keeps the shell as kubectl's parent instead of exec-ing it)
out=$(su agent -c 'cd /tmp/work && AIRLOCK_VISIBLE=shown SECRET_TOKEN=hunter2 /usr/local/bin/kubectl run /tmp/work/m1a 3 allow-me-1 --namespace "two words"; exit $?')
echo "@@R s1_allow_rc $?"
echo "@@R s1_allow_out $out"
echo "@@R s1_allow_marker $(mark /tmp/work/m1a)"
su agent -c '/usr/local/bin/kubectl run /tmp/work/m1d 0 deny-me-1'
echo "@@R s1_deny_rc $?"
echo "@@R s1_deny_marker $(mark /tmp/work/m1d)"
wget -qO /tmp/metrics http://127.0.0.1:9464/metrics
echo "@@R metrics_hold_exec $(grep 'kernel_events_total{event="hold_exec"}' /tmp/metrics | awk '{print $2}')"
echo "@@R metrics_denied $(grep 'decisions_applied_total{verdict="deny",cause="decision"}' /tmp/metrics | awk '{print $2}')"

# 2: what must not be held, and every path to a held binary
su agent -c '/usr/bin/airlock-workload run /tmp/work/m2u 0 unpriv-2'
echo "@@R s2_unpriv_rc $?"
su other -c '/usr/local/bin/kubectl run /tmp/m2o 0 other-2'
echo "@@R s2_other_rc $?"
su agent -c 'PATH=/usr/local/bin:/bin kubectl run /tmp/work/m2p 0 allow-me-path'
echo "@@R s2_path_rc $?"
su agent -c 'cd /usr/local/bin && ./kubectl run /tmp/work/m2r 0 allow-me-rel'
echo "@@R s2_rel_rc $?"
su agent -c '/usr/bin/kctl run /tmp/work/m2s 0 allow-me-sym'
echo "@@R s2_sym_rc $?"
su agent -c '/opt/kubectl-hard run /tmp/work/m2h 0 allow-me-hard'
echo "@@R s2_hard_rc $?"

# 2b: a watched cgroup (a systemd unit's, on a real host): root inside it is held, outside not
sh -c 'echo $$ > /sys/fs/cgroup/ci-runner/cgroup.procs; /usr/local/bin/kubectl run /tmp/m2c 0 allow-me-cgroup; exit $?'
echo "@@R s2_cgroup_rc $?"
/usr/local/bin/kubectl run /tmp/m2n 0 root-outside-2
echo "@@R s2_root_outside_rc $?"

# 3: shell -> child -> setuid-root helper -> grandchild
su agent -c /usr/local/bin/chain.sh
echo "@@R s3_rc $?"
echo "@@R s3_marker $(mark /tmp/m3)"

# 4: connects
c() { su agent -c "/usr/bin/airlock-workload connect $1 $2 $3"; }
echo "@@R s4_v4_allow $(c tcp 127.0.0.2 5432)"
echo "@@R s4_v4_deny $(c tcp 127.0.0.2 5433)"
echo "@@R s4_v6_allow $(c tcp ::1 5432)"
echo "@@R s4_v6_deny $(c tcp ::1 5433)"
echo "@@R s4_mapped_allow $(c tcp ::ffff:127.0.0.2 5432)"
# Only the mapped connect uses port 5436 (served, denied): a pass would read "ok pong".
echo "@@R s4_mapped_deny $(c tcp ::ffff:127.0.0.2 5436)"
echo "@@R s4_unwatched $(c tcp 127.0.0.1 5433)"
echo "@@R s4_udp_allow $(c udp 127.0.0.2 5432)"

# 5: no decision before the deadline
echo "@@R s5_timeout $(su agent -c '/usr/bin/airlock-workload timed /usr/local/bin/slowctl run /tmp/work/m5 0 timeout-me')"
echo "@@R s5_timeout_marker $(mark /tmp/work/m5)"

# 7: the parent (same uid) tries to release or trace the held task
su agent -c '
/usr/local/bin/kubectl run /tmp/work/m7 0 delay-me-7 > /dev/null & c=$!
sleep 2
kill -CONT $c; echo "@@R s7_sigcont_rc $?"
echo "@@R s7_ptrace $(/usr/bin/airlock-workload ptrace $c)"
echo "@@R s7_state $(cut -d" " -f3 /proc/$c/stat)"
sleep 100 & s=$!
kill -STOP $s
echo "@@R s7_ptrace_control $(/usr/bin/airlock-workload ptrace $s)"
kill -CONT $s; echo "@@R s7_sigcont_control_rc $?"
kill $s
wait $c; echo "@@R s7_rc $?"
'
echo "@@R s7_marker $(mark /tmp/work/m7)"

# 8: fifty concurrent holds
su agent -c '/usr/bin/airlock-workload spawn 50 /usr/local/bin/kubectl run /tmp/work/m8-{i} {i} c8-{i}' | sed 's/^/@@R s8_/'
for i in $(seq 0 49); do echo "@@R s8_marker_$i $(mark /tmp/work/m8-$i)"; done

# 6: the agent is SIGKILLed while a task is held; a new agent resolves it
su agent -c '/usr/local/bin/kubectl run /tmp/work/m6 0 delay-me-6' > /dev/null 2>&1 &
j=$!
sleep 2
kill -9 $AGENT
sleep 1
echo "@@R s6_held_after_kill $(grep -l '(kubectl) T' /proc/[0-9]*/stat 2>/dev/null | wc -l)"
start_agent
wait $j
echo "@@R s6_rc $?"
echo "@@R s6_marker $(mark /tmp/work/m6)"

# SIGTERM with a task held (a restart, an upgrade): the hold stays with the kernel, and the
# next agent decides it
su agent -c '/usr/local/bin/kubectl run /tmp/work/mt 0 delay-me-sterm' > /dev/null 2>&1 &
j=$!
sleep 2
kill -TERM $AGENT
wait $AGENT
echo "@@R sterm_agent_rc $?"
sleep 1
echo "@@R sterm_held_after_stop $(grep -l '(kubectl) T' /proc/[0-9]*/stat 2>/dev/null | wc -l)"
echo "@@R sterm_pinned_left $(ls /sys/fs/bpf/airlock 2>/dev/null | wc -l)"
start_agent
wait $j
echo "@@R sterm_rc $?"
echo "@@R sterm_marker $(mark /tmp/work/mt)"

# 9: the agent is gone (killed, heartbeat stale): fail closed at once, nothing left stopped
kill -9 $AGENT
sleep 7
echo "@@R s9_no_agent $(su agent -c '/usr/bin/airlock-workload timed /usr/local/bin/kubectl run /tmp/work/m9 0 allow-me-9')"
echo "@@R s9_marker $(mark /tmp/work/m9)"
echo "@@R s9_unwatched $(su agent -c '/usr/bin/airlock-workload run /tmp/work/m9u 0 unpriv-9')"
start_agent

# 5b: the decider becomes unreachable: fail closed after the grace period
su agent -c '/usr/local/bin/kubectl run /tmp/work/mv 0 vanish-me'
echo "@@R s5_vanish_rc $?"
sleep 1
echo "@@R s5_unreachable $(su agent -c '/usr/bin/airlock-workload timed /usr/local/bin/kubectl run /tmp/work/mu 0 allow-me-unreach')"
echo "@@R s5_unreachable_marker $(mark /tmp/work/mu)"
kill -TERM $AGENT
wait $AGENT
grep -h "kernel counters" /tmp/agent-*.log | tail -1 | sed 's/^/@@R counters /'
for f in /tmp/agent-*.log; do tail -n 200 $f | sed "s|^|@@LOG $f |"; done
"#;

struct Booted {
    run: GuestRun,
    decider: TestDecider,
    _rt: tokio::runtime::Runtime,
}

fn boot(kernel: &str) -> anyhow::Result<Booted> {
    let rt = tokio::runtime::Runtime::new()?;
    let decider = rt.block_on(TestDecider::start("127.0.0.1:0", plan))?;
    let workload = env!("CARGO_BIN_EXE_airlock-workload");
    let mut g = Guest::on(kernel);
    g.airlock(workload, agent_config(decider.addr.port()))?
        .file("/usr/local/bin/slowctl", workload, 0o755)
        .file("/usr/local/bin/suid-helper", workload, 0o4755)
        .symlink("/usr/bin/kctl", "/usr/local/bin/kubectl")
        .hardlink("/opt/kubectl-hard", "/usr/local/bin/kubectl")
        .text(
            "/usr/local/bin/chain.sh",
            "#!/bin/sh\nsh -c '/usr/local/bin/suid-helper /usr/local/bin/kubectl run /tmp/m3 0 allow-me-3'\n",
            0o755,
        )
        .script(format!("{START_AGENT}{SCRIPT}"));
    let run = g.boot(Duration::from_secs(900))?;
    if !run.finished() {
        anyhow::bail!("guest script did not finish:\n{}", run.console);
    }
    Ok(Booted {
        run,
        decider,
        _rt: rt,
    })
}

impl Booted {
    fn results(&self) -> BTreeMap<String, String> {
        self.run.results()
    }

    fn r(&self, key: &str) -> String {
        self.results()
            .get(key)
            .cloned()
            .unwrap_or_else(|| panic!("no result {key}; console:\n{}", self.run.console))
    }
}

fn ms_of(s: &str) -> u64 {
    s.split_whitespace()
        .find_map(|w| w.strip_prefix("ms="))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no ms= in {s:?}"))
}

fn guest_runs_bpf_lsm(b: &Booted) {
    assert!(
        b.r("lsm").split(',').any(|m| m == "bpf"),
        "lsm: {}",
        b.r("lsm")
    );
    assert_eq!(b.r("agent_1"), "1", "agent connected to the decider");
    assert_eq!(b.r("stopped_tasks_at_end"), "0", "no task left stopped");
}

fn s1_held_exec_allowed_runs_intact_denied_never_runs(b: &Booted) {
    assert_eq!(b.r("s1_allow_rc"), "3");
    assert_eq!(b.r("s1_allow_out"), "ran: allow-me-1 --namespace two words");
    assert_eq!(b.r("s1_allow_marker"), "yes");
    assert_eq!(b.r("s1_deny_rc"), "137");
    assert_eq!(b.r("s1_deny_marker"), "no");

    let d = &b.decider;
    let seen = d
        .request_with_arg("allow-me-1")
        .expect("decider saw the allowed exec");
    let req = &seen.request;
    let Some(Action::Exec(exec)) = &req.action else {
        panic!("not an exec: {req:?}")
    };
    assert_eq!(
        exec.argv,
        [
            "/usr/local/bin/kubectl",
            "run",
            "/tmp/work/m1a",
            "3",
            "allow-me-1",
            "--namespace",
            "two words"
        ]
    );
    assert_eq!(exec.path, "/usr/local/bin/kubectl");
    assert_eq!(req.rule, "kubectl");
    let p = req.process.as_ref().expect("process context");
    assert_eq!(p.user, "agent");
    assert_eq!(p.uid, 1000);
    assert_eq!(p.cwd, "/tmp/work");
    assert!(!p.ancestors.is_empty(), "parent chain");
    assert!(
        p.ancestors
            .iter()
            .any(|a| a.argv.iter().any(|x| x.contains("allow-me-1"))),
        "the parent shell's command line is in the chain: {:?}",
        p.ancestors
    );
    assert!(
        p.ancestors.iter().any(|a| a.exe.ends_with("busybox")),
        "{:?}",
        p.ancestors
    );
    let env = |n: &str| p.env.iter().find(|e| e.name == n).cloned();
    assert_eq!(
        env("AIRLOCK_VISIBLE").and_then(|e| e.value).as_deref(),
        Some("shown")
    );
    let secret = env("SECRET_TOKEN").expect("names are always sent");
    assert_eq!(
        secret.value, None,
        "values are redacted unless allow-listed"
    );
    assert!(req.deadline_unix_ms > req.held_at_unix_ms);

    // Outcomes reported: resumed then exited with 3; the denied one killed.
    let outs: Vec<_> = d
        .outcomes()
        .into_iter()
        .filter(|o| o.request_id == req.request_id)
        .collect();
    assert!(
        outs.iter().any(|o| o.kind == OutcomeKind::Resumed as i32),
        "{outs:?}"
    );
    assert!(
        outs.iter()
            .any(|o| o.kind == OutcomeKind::Exited as i32 && o.exit_code == Some(3)),
        "exit status reported: {outs:?}"
    );
    let denied = d
        .request_with_arg("deny-me-1")
        .expect("decider saw the denied exec");
    assert!(
        d.outcomes()
            .iter()
            .any(|o| o.request_id == denied.request.request_id
                && o.kind == OutcomeKind::Killed as i32)
    );
    let hello = d.hellos().into_iter().next().expect("hello");
    assert_eq!(hello.labels.get("env").map(String::as_str), Some("test"));
}

fn agent_metrics_count_holds_and_decisions(b: &Booted) {
    let holds: u64 = b.r("metrics_hold_exec").parse().expect("hold_exec counter");
    assert!(holds >= 2, "two execs were held before the scrape: {holds}");
    assert_eq!(
        b.r("metrics_denied"),
        "1",
        "one exec was denied by decision"
    );
}

fn s2_no_hold_for_unprivileged_binary_or_other_account_every_path_and_cgroup_matches(b: &Booted) {
    assert_eq!(b.r("s2_unpriv_rc"), "0");
    assert_eq!(b.r("s2_other_rc"), "0");
    let d = &b.decider;
    assert!(
        d.request_with_arg("unpriv-2").is_none(),
        "unprivileged binary was held"
    );
    assert!(
        d.request_with_arg("other-2").is_none(),
        "another account was held"
    );
    assert_eq!(
        b.r("s2_cgroup_rc"),
        "0",
        "the watched cgroup's exec was allowed"
    );
    let cgroup = d
        .request_with_arg("allow-me-cgroup")
        .expect("root inside the watched cgroup was held");
    assert_eq!(cgroup.request.process.expect("context").uid, 0);
    assert_eq!(b.r("s2_root_outside_rc"), "0");
    assert!(
        d.request_with_arg("root-outside-2").is_none(),
        "root outside the watched cgroup was held"
    );
    for (key, marker) in [
        ("s2_path_rc", "allow-me-path"),
        ("s2_rel_rc", "allow-me-rel"),
        ("s2_sym_rc", "allow-me-sym"),
        ("s2_hard_rc", "allow-me-hard"),
    ] {
        assert_eq!(b.r(key), "0", "{key}");
        assert!(
            d.request_with_arg(marker).is_some(),
            "{marker} was not held"
        );
    }
}

fn s3_grandchild_behind_setuid_helper_is_still_held(b: &Booted) {
    assert_eq!(b.r("s3_rc"), "0");
    assert_eq!(b.r("s3_marker"), "yes");
    let seen = b
        .decider
        .request_with_arg("allow-me-3")
        .expect("grandchild held");
    let p = seen.request.process.expect("context");
    assert_eq!(
        p.uid, 0,
        "it ran as root after the setuid helper, and was still held"
    );
}

fn s4_connects_held_v4_v6_mapped_unwatched_passes(b: &Booted) {
    assert_eq!(b.r("s4_v4_allow"), "ok pong");
    assert!(
        b.r("s4_v4_deny").starts_with("err 13 "),
        "{}",
        b.r("s4_v4_deny")
    );
    assert_eq!(b.r("s4_v6_allow"), "ok pong");
    assert!(
        b.r("s4_v6_deny").starts_with("err 13 "),
        "{}",
        b.r("s4_v6_deny")
    );
    assert_eq!(b.r("s4_mapped_allow"), "ok pong");
    assert!(
        b.r("s4_mapped_deny").starts_with("err 13 "),
        "an IPv4-mapped IPv6 connect is held and denied: {}",
        b.r("s4_mapped_deny")
    );
    assert_eq!(b.r("s4_unwatched"), "ok pong");
    assert_eq!(b.r("s4_udp_allow"), "ok sent");
    let connects: Vec<(String, u32, i32)> = b
        .decider
        .seen()
        .into_iter()
        .filter_map(|s| match s.request.action {
            Some(Action::Connect(c)) => Some((c.address, c.port, c.protocol)),
            _ => None,
        })
        .collect();
    for (addr, port) in [
        ("127.0.0.2", 5432),
        ("127.0.0.2", 5433),
        ("::1", 5432),
        ("::1", 5433),
    ] {
        assert!(
            connects.iter().any(|(a, p, _)| a == addr && *p == port),
            "{addr}:{port} not held: {connects:?}"
        );
    }
    let mapped: Vec<u32> = b
        .decider
        .seen()
        .into_iter()
        .filter_map(|s| match s.request.action {
            Some(Action::Connect(c)) if c.port == 5436 => Some(c.family),
            _ => None,
        })
        .collect();
    assert_eq!(
        mapped,
        [6],
        "the mapped connect was asked once, as an IPv6 call to 127.0.0.2"
    );
    assert!(
        connects.iter().any(|(_, _, proto)| *proto == 2),
        "udp connect held"
    );
    assert!(
        !connects.iter().any(|(a, _, _)| a == "127.0.0.1"),
        "unwatched destination was held"
    );
}

fn s5_deadline_applies_on_timeout_and_unreachable_decider_fails_closed(b: &Booted) {
    let t = b.r("s5_timeout");
    assert!(t.contains("signal=9"), "{t}");
    let ms = ms_of(&t);
    assert!(
        (SLOW_TIMEOUT_MS..SLOW_TIMEOUT_MS + MARGIN_MS).contains(&ms),
        "timeout took {ms} ms"
    );
    assert_eq!(b.r("s5_timeout_marker"), "no");

    assert_eq!(b.r("s5_vanish_rc"), "137");
    let u = b.r("s5_unreachable");
    assert!(u.contains("signal=9"), "{u}");
    let ms = ms_of(&u);
    assert!(ms < GRACE_MS + MARGIN_MS, "fail-closed took {ms} ms");
    assert!(
        ms >= GRACE_MS - 250,
        "failed closed after {ms} ms: sooner than the {GRACE_MS} ms grace for a decider to come back"
    );
    assert_eq!(b.r("s5_unreachable_marker"), "no");
}

fn s6_agent_killed_mid_hold_restarted_agent_resolves_it(b: &Booted) {
    assert_eq!(
        b.r("s6_held_after_kill"),
        "1",
        "task stays held while no agent runs"
    );
    assert_eq!(b.r("agent_2"), "1", "restarted agent reconnected");
    assert_eq!(b.r("s6_rc"), "0");
    assert_eq!(b.r("s6_marker"), "yes");
    let seen = b
        .decider
        .request_with_arg("delay-me-6")
        .expect("request seen");
    assert!(
        seen.times >= 2,
        "the restarted agent sent it again: {seen:?}"
    );
    let mut sessions = seen.sessions.clone();
    sessions.dedup();
    assert!(sessions.len() >= 2, "from a new stream, same id: {seen:?}");
    let same_id = b
        .decider
        .seen()
        .iter()
        .filter(|s| s.request.action == seen.request.action)
        .count();
    assert_eq!(same_id, 1, "one request, not two");
}

fn s7_parent_cannot_sigcont_or_ptrace_a_held_task(b: &Booted) {
    assert_ne!(
        b.r("s7_sigcont_rc"),
        "0",
        "SIGCONT from the parent must fail"
    );
    assert_eq!(
        b.r("s7_ptrace"),
        "err 1",
        "ptrace attach must fail with EPERM"
    );
    assert_eq!(b.r("s7_state"), "T", "still stopped after the attempts");
    assert_eq!(
        b.r("s7_ptrace_control"),
        "ok",
        "control: same uid may trace a task that is not held"
    );
    assert_eq!(
        b.r("s7_sigcont_control_rc"),
        "0",
        "control: same uid may SIGCONT a task that is not held"
    );
    assert_eq!(b.r("s7_rc"), "0", "released by the decision");
    assert_eq!(b.r("s7_marker"), "yes");
}

fn s8_fifty_concurrent_holds_none_lost_or_swapped(b: &Booted) {
    let res = b.results();
    for i in 0..50 {
        let status = res
            .get(&format!("s8_i={i}"))
            .unwrap_or_else(|| panic!("child {i} missing"));
        let marker = res.get(&format!("s8_marker_{i}")).map(String::as_str);
        if i % 2 == 0 {
            assert_eq!(status, &format!("exit={i}"), "child {i}");
            assert_eq!(marker, Some("yes"), "child {i} ran");
        } else {
            assert_eq!(status, "signal=9", "child {i}");
            assert_eq!(marker, Some("no"), "child {i} never ran");
        }
    }
}

fn s9_agent_gone_fails_closed_without_stopping_anything(b: &Booted) {
    let t = b.r("s9_no_agent");
    assert!(t.contains("signal=9"), "killed, not held: {t}");
    assert!(ms_of(&t) < 2000, "no wait for a missing agent: {t}");
    assert_eq!(b.r("s9_marker"), "no");
    assert_eq!(
        b.r("s9_unwatched"),
        "ran: unpriv-9",
        "unprivileged binaries still run"
    );
    assert_eq!(b.r("agent_4"), "1", "a new agent takes over");
    let counters = b.r("counters");
    let drops = counters
        .split("\"drop_no_agent\": ")
        .nth(1)
        .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|n| n.parse::<u64>().ok())
        .unwrap_or_else(|| panic!("no drop_no_agent counter in {counters}"));
    assert!(
        drops >= 1,
        "the kernel counted the fail-closed exec: {counters}"
    );
}

fn sigterm_keeps_holds_for_the_next_agent(b: &Booted) {
    assert_eq!(b.r("sterm_agent_rc"), "0");
    assert_eq!(
        b.r("sterm_held_after_stop"),
        "1",
        "the task stays held while no agent runs"
    );
    assert_ne!(
        b.r("sterm_pinned_left"),
        "0",
        "programs and maps stay pinned"
    );
    assert_eq!(b.r("agent_3"), "1");
    assert_eq!(b.r("sterm_rc"), "0", "the next agent asked and released it");
    assert_eq!(b.r("sterm_marker"), "yes");
}

airlock_tests::kernel_matrix!(
    boot = boot,
    booted = Booted,
    checks = [
        guest_runs_bpf_lsm,
        s1_held_exec_allowed_runs_intact_denied_never_runs,
        agent_metrics_count_holds_and_decisions,
        s2_no_hold_for_unprivileged_binary_or_other_account_every_path_and_cgroup_matches,
        s3_grandchild_behind_setuid_helper_is_still_held,
        s4_connects_held_v4_v6_mapped_unwatched_passes,
        s5_deadline_applies_on_timeout_and_unreachable_decider_fails_closed,
        s6_agent_killed_mid_hold_restarted_agent_resolves_it,
        s7_parent_cannot_sigcont_or_ptrace_a_held_task,
        s8_fifty_concurrent_holds_none_lost_or_swapped,
        s9_agent_gone_fails_closed_without_stopping_anything,
        sigterm_keeps_holds_for_the_next_agent,
    ]
);
