//! The no-escape promise, attacked: a watched, unprivileged account in the QEMU guest tries every
//! way known to get a held action through without a decision, or to break an allowed one. The
//! attack programs are `airlock-attack` subcommands; the held program is the `kubectl` stand-in,
//! whose first act is to write a marker file, so "it ran" is a file on disk.
//!
//! The decider denies every exec after 2.5 s at the earliest, long enough for an attack to try
//! to release the task meanwhile. Each check asserts what the workload saw, the marker, and what
//! the decider was (or was not) asked. One boot per kernel runs every attack.

use std::{collections::BTreeMap, fmt::Write as _, time::Duration};

use airlock_proto::v1::{action_request::Action, ActionRequest, Protocol};
use airlock_tests::{
    decider::{Plan, Seen, TestDecider},
    vm::{Guest, GuestRun, START_AGENT},
};

/// When the decider denies the "late" requests (attacks get this long to release the task).
const LATE: Duration = Duration::from_millis(2500);
/// When the decider allows the "slow" request (the agent is restarted meanwhile).
const SLOW: Duration = Duration::from_secs(8);

fn plan(r: &ActionRequest) -> Plan {
    match &r.action {
        Some(Action::Connect(c)) => match c.port {
            5432 | 5434 | 5435 => Plan::Allow,
            _ => Plan::Deny,
        },
        Some(Action::Exec(e)) => {
            let has = |p: &str| e.argv.iter().any(|a| a.starts_with(p));
            if has("allow-slow") {
                Plan::After(SLOW, true)
            } else if has("allow-late") {
                Plan::After(LATE, true)
            } else if has("deny-late") {
                Plan::After(LATE, false)
            } else if has("allow-me") {
                Plan::Allow
            } else if has("never-") {
                Plan::Never
            } else {
                Plan::Deny
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
hold_timeout_secs = 120
unreachable_grace_secs = 5
# Long enough that a process on a killed agent's pid is surely found within it (p1).
heartbeat_timeout_secs = 60
max_watched_tasks = 256

[watch]
users = ["agent"]
groups = ["ai"]
cgroups = ["ci-runner"]

[[rule]]
name = "kubectl-get"
exec = ["/usr/local/bin/kubectl"]
args = ["get *"]
decision = "allow"

[[rule]]
name = "agent-terraform"
accounts = ["agent"]
exec = ["/usr/local/bin/terraform"]
decision = "ask"

[[rule]]
name = "kubectl"
exec = ["/usr/local/bin/kubectl", "/mnt/b/sub/kubectl", "/mnt/o/kubectl"]
args = ["run *"]
decision = "ask"

[[rule]]
name = "deploy-script"
exec = ["/usr/local/bin/deploy.sh"]
decision = "ask"

[[rule]]
name = "db"
connect = ["127.0.0.2/32"]
ports = [5432, 5433, 5434, 5435]
decision = "ask"

[[rule]]
name = "loopback-admin"
connect = ["127.0.0.1/32"]
ports = [5436]
decision = "deny"
"#
    )
}

/// The same configuration with far more destinations than the kernel's table holds: a reload
/// that cannot be applied whole.
fn too_big_config(decider_port: u16) -> String {
    let mut c = agent_config(decider_port);
    c.push_str("\n[[rule]]\nname = \"many\"\nports = [9]\ndecision = \"ask\"\nconnect = [\n");
    for i in 0..9000u32 {
        let _ = writeln!(c, "  \"10.{}.{}.{}/32\",", i >> 16, (i >> 8) & 255, i & 255);
    }
    c.push_str("]\n");
    c
}

/// The same configuration, also watching root, with a rule that covers the decider's own
/// address: the agent must never hold itself.
fn self_hold_config(decider_port: u16) -> String {
    agent_config(decider_port).replace(
        "users = [\"agent\"]",
        "users = [\"agent\", \"root\"]",
    ) + &format!(
        "\n[[rule]]\nname = \"decider-address\"\nconnect = [\"10.0.2.2/32\"]\nports = [{decider_port}]\ndecision = \"deny\"\n"
    )
}

const SCRIPT: &str = r#"
mark() { test -e "$1" && echo yes || echo no; }
as() { su agent -c "$*"; }
A=/usr/bin/airlock-attack
K=/usr/local/bin/kubectl
mkdir -p /tmp/work && chown agent:agent /tmp/work
mkdir /sys/fs/cgroup/ci-runner
# A btrfs subvolume and an overlay (lower layer on another file system) each hold a copy of
# the binary that a rule names by that path.
mkdir -p /mnt/b /mnt/o /opt/ovl-lower /tmp/ovl/upper /tmp/ovl/work
mount /dev/vda /mnt/b && btrfs subvolume create /mnt/b/sub > /dev/null && cp $K /mnt/b/sub/kubectl
cp $K /opt/ovl-lower/kubectl
mount -t overlay overlay -o lowerdir=/opt/ovl-lower,upperdir=/tmp/ovl/upper,workdir=/tmp/ovl/work /mnt/o
echo "@@R fs_ready $(test -x /mnt/b/sub/kubectl && test -x /mnt/o/kubectl && echo yes || echo no)"
/usr/bin/airlock-workload serve 5432 5433 5434 5435 5436 > /dev/null &
$A udp-listen 5433 /tmp/udp-5433 > /dev/null &
start_agent
echo "@@R check $(/usr/bin/airlock-agent --check --config /etc/airlock/agent.toml 2>&1 | tail -1)"

# --- releasing a stopped task without kill(2) ---
echo "@@R a1_sigio $(as $A sigio 1500 $K run /tmp/work/a1 0 deny-late-a1)"
echo "@@R a1_marker $(mark /tmp/work/a1)"
out=$(as $A orphan $K run /tmp/work/a2 0 deny-late-a2)
echo "@@R a2_orphan $out"
pid=${out#pid=}; pid=${pid%% *}
sleep 3
echo "@@R a2_marker $(mark /tmp/work/a2)"
echo "@@R a2_gone $(test -e /proc/$pid && echo no || echo yes)"
echo "@@R a3_traceme $(as $A traceme $K run /tmp/work/a3 0 deny-late-a3)"
echo "@@R a3_marker $(mark /tmp/work/a3)"
echo "@@R a3_seize $(as $A seize $K run /tmp/work/a3s 0 deny-late-a3s)"
echo "@@R a3s_marker $(mark /tmp/work/a3s)"
# Behind a setuid helper the process is root: watched only through the inherited mark.
as "/usr/local/bin/suid-helper $A leader-exit $K run /tmp/a4 0 deny-me-a4"; echo "@@R a4_leader_rc $?"
echo "@@R a4_marker $(mark /tmp/a4)"
as "/usr/local/bin/suid-helper $A thread-exec $K run /tmp/a4t 0 deny-me-a4t"; echo "@@R a4_thread_rc $?"
echo "@@R a4t_marker $(mark /tmp/a4t)"
# Fill the mark table (256 here) from a process watched only by its mark: the forks that cannot be
# marked must fail, not run unwatched.
echo "@@R f1_forks $(as "/usr/local/bin/suid-helper $A fork-many 400")"

# --- exec identity ---
as "cp $K /tmp/work/kcopy && /tmp/work/kcopy run /tmp/work/a5 0 deny-me-a5"; echo "@@R a5_copy_rc $?"
echo "@@R a5_marker $(mark /tmp/work/a5)"
as "$A memfd $K run /tmp/work/a5m 0 deny-me-a5m"; echo "@@R a5_memfd_rc $?"
echo "@@R a5m_marker $(mark /tmp/work/a5m)"
as "/lib64/ld-linux-x86-64.so.2 $K run /tmp/work/a6 0 deny-me-a6"; echo "@@R a6_rc $?"
echo "@@R a6_marker $(mark /tmp/work/a6)"
as "/usr/local/bin/deploy.sh /tmp/work/a7"; echo "@@R a7_rc $?"
echo "@@R a7_marker $(mark /tmp/work/a7)"
as "$A argv0 '' $K run /tmp/work/a8 0 deny-me-a8"; echo "@@R a8_rc $?"
echo "@@R a8_marker $(mark /tmp/work/a8)"
# A forged "cut" note in argv must not make an allow rule (`get *`) match.
as "$K run /tmp/work/c1 0 deny-me-c1 '[airlock: 1 more items cut]'"; echo "@@R c1_rc $?"
echo "@@R c1_marker $(mark /tmp/work/c1)"
# A script whose #! line gives the held binary its arguments (`run`), and a script run by a
# held script (an interpreter in the middle). The held program writes "ran" into the script.
printf '#!/usr/local/bin/kubectl run\n' > /tmp/work/s1; chmod 755 /tmp/work/s1; chown agent /tmp/work/s1
as "/tmp/work/s1 0 deny-me-s1"; echo "@@R s1_rc $?"
echo "@@R s1_ran $(grep -c '^ran' /tmp/work/s1)"
printf '#!/usr/local/bin/deploy.sh\n' > /tmp/work/s2; chmod 755 /tmp/work/s2; chown agent /tmp/work/s2
as "/tmp/work/s2"; echo "@@R s2_rc $?"
echo "@@R s2_ran $(grep -c '^ran' /tmp/work/s2)"
# The loader: a traced one, and one whose --argv0 names the program too.
echo "@@R l1_traced $(as $A traceme /lib64/ld-linux-x86-64.so.2 $K run /tmp/work/l1 0 deny-late-l1)"
echo "@@R l1_marker $(mark /tmp/work/l1)"
as "/lib64/ld-linux-x86-64.so.2 --argv0 $K $K run /tmp/work/l2 0 deny-me-l2"; echo "@@R l2_rc $?"
echo "@@R l2_marker $(mark /tmp/work/l2)"
# A FIFO where the agent looks for the loader's program: two at once must not wedge it.
as "mkfifo /tmp/work/fifo"
as "/lib64/ld-linux-x86-64.so.2 --argv0 /tmp/work/fifo $K run /tmp/work/d1 0 deny-me-d1" > /dev/null 2>&1 &
d1=$!
as "/lib64/ld-linux-x86-64.so.2 --argv0 /tmp/work/fifo $K run /tmp/work/d2 0 deny-me-d2" > /dev/null 2>&1 &
d2=$!
wait $d1; echo "@@R d1_rc $?"
wait $d2; echo "@@R d2_rc $?"
as "$K run /tmp/work/d3 0 allow-me-d3" > /dev/null; echo "@@R d3_rc $?"
# A user namespace's overlay shows the held binary on a new super block, owned by root.
mkdir -p /tmp/work/ol /tmp/work/oe && chown agent /tmp/work/ol /tmp/work/oe
as "unshare -rm sh -c 'mount -t overlay -o lowerdir=/usr/local/bin:/tmp/work/oe none /tmp/work/ol && /tmp/work/ol/kubectl run /tmp/work/u5 0 deny-me-u5'"; echo "@@R u5_rc $?"
echo "@@R u5_marker $(mark /tmp/work/u5)"
# Rules for an account follow it past setuid; a supplementary group is watched like a primary.
as "/usr/local/bin/suid-helper /usr/local/bin/terraform run /tmp/w1 0 deny-me-w1"; echo "@@R w1_rc $?"
echo "@@R w1_marker $(mark /tmp/w1)"
su other -c "$K run /tmp/w2 0 deny-me-w2"; echo "@@R w2_rc $?"
echo "@@R w2_marker $(mark /tmp/w2)"
as "/mnt/b/sub/kubectl run /tmp/work/b1 0 deny-me-b1"; echo "@@R b1_btrfs_rc $?"
echo "@@R b1_marker $(mark /tmp/work/b1)"
as "/mnt/o/kubectl run /tmp/work/b2 0 deny-me-b2"; echo "@@R b2_overlay_rc $?"
echo "@@R b2_marker $(mark /tmp/work/b2)"

# --- the network ---
echo "@@R n1_tfo $(as $A tfo 127.0.0.2 5433)"
echo "@@R n2_udp $(as $A udp-sendto 127.0.0.2 5433)"
echo "@@R n2_mmsg $(as $A udp-sendmmsg 127.0.0.2 5433)"
sleep 0.5
echo "@@R n2_received $(cat /tmp/udp-5433 2>/dev/null | wc -l)"
echo "@@R n3_udp_allowed $(as $A udp-sendto 127.0.0.2 5432 5)"
echo "@@R n4_uring $(as $A uring-connect 127.0.0.2 5434)"
echo "@@R n5_zombie $(as timeout -s KILL 30 $A zombie-leader-connect 127.0.0.2 5435)"
echo "@@R n6_unspec $(as $A udp-sendto-unspec 127.0.0.2 5433)"
sleep 0.5
echo "@@R n6_received $(cat /tmp/udp-5433 2>/dev/null | wc -l)"
echo "@@R n7_any $(as /usr/bin/airlock-workload connect tcp 0.0.0.0 5436)"
echo "@@R n8_sctp $(as $A sctp-connectx 127.0.0.2 5433)"

# --- state that must survive ---
rmdir /sys/fs/cgroup/ci-runner && mkdir /sys/fs/cgroup/ci-runner
sleep 1
sh -c "echo \$\$ > /sys/fs/cgroup/ci-runner/cgroup.procs; exec $K run /tmp/u1 0 deny-me-u1"; echo "@@R u1_rc $?"
echo "@@R u1_marker $(mark /tmp/u1)"
cp $K $K.new && mv $K.new $K
sleep 1
as "$K run /tmp/work/u2 0 deny-me-u2"; echo "@@R u2_rc $?"
echo "@@R u2_marker $(mark /tmp/work/u2)"
cp /etc/airlock/agent.toml /tmp/agent.toml.good
cp /etc/airlock/too-big.toml /etc/airlock/agent.toml
kill -HUP $AGENT
t=0
while ! grep -q 'reload refused' /tmp/agent-$n.log && [ $t -lt 600 ]; do sleep 0.5; t=$((t+1)); done
echo "@@R u3_refused $(grep -c 'reload refused' /tmp/agent-$n.log) after ${t} half-seconds"
echo "@@R u3_connect $(as /usr/bin/airlock-workload connect tcp 127.0.0.2 5433)"
cp /tmp/agent.toml.good /etc/airlock/agent.toml
kill -HUP $AGENT
sleep 1
# An agent restart (upgrade) while a task is held and a marked process waits to exec.
as "/usr/local/bin/suid-helper /bin/sh -c 'sleep 5; exec $K run /tmp/u4m 0 deny-me-u4m'" > /dev/null 2>&1 &
m=$!
as "$K run /tmp/work/u4 0 allow-slow-u4" > /dev/null 2>&1 &
j=$!
sleep 1.5
kill -TERM $AGENT
wait $AGENT
echo "@@R u4_held_while_down $(grep -l '(kubectl) T' /proc/[0-9]*/stat 2>/dev/null | wc -l)"
echo "@@R u4_pinned $(ls /sys/fs/bpf/airlock 2>/dev/null | wc -l)"
start_agent
wait $j; echo "@@R u4_rc $?"
echo "@@R u4_marker $(mark /tmp/work/u4)"
wait $m; echo "@@R u4m_rc $?"
echo "@@R u4m_marker $(mark /tmp/u4m)"

# --- the agent never holds itself (root watched, a rule covering the decider's address) ---
cp /etc/airlock/self-hold.toml /etc/airlock/agent.toml
kill -HUP $AGENT
sleep 1
kill -9 $AGENT
start_agent
echo "@@R z1_agent_state $(cut -d' ' -f3 /proc/$AGENT/stat 2>/dev/null)"
echo "@@R z1_decided $(as "$K run /tmp/work/z1 0 allow-me-z1" > /dev/null 2>&1; echo $?)"

# --- a process that gets the pid of an agent that died is nobody ---
# Killed at once (it cannot retire), so its heartbeat stays fresh for heartbeat_timeout_secs:
# in that window a process on its pid must be held like any other, not taken for the agent.
old=$AGENT
kill -9 $AGENT
# Reap it: a zombie keeps its pid.
wait $AGENT 2>/dev/null
# New pids wrap at pid_max: just past the old pid, the pid comes round within a few thousand forks.
max=$(cat /proc/sys/kernel/pid_max)
echo $((old + 10)) > /proc/sys/kernel/pid_max
as "$A reuse-pid $old $K run /tmp/work/p1 0 deny-me-p1" > /tmp/p1.out 2>&1 &
p=$!
for i in $(seq 1 300); do
  [ "$(grep -l '(kubectl) T' /proc/[0-9]*/stat 2>/dev/null | wc -l)" != 0 ] && break
  kill -0 $p 2>/dev/null || break
  sleep 0.2
done
echo "@@R p1_held $(grep -l '(kubectl) T' /proc/[0-9]*/stat 2>/dev/null | wc -l)"
echo $max > /proc/sys/kernel/pid_max
# A new agent takes the hold over and asks.
start_agent
wait $p
echo "@@R p1_reuse $(grep '^reused=' /tmp/p1.out)"
echo "@@R p1_marker $(mark /tmp/work/p1)"

# --- an explicit uninstall releases (denies) what is held and unloads everything ---
as "timeout -s KILL 60 $K run /tmp/work/z2 0 never-z2" > /dev/null 2>&1 &
j=$!
sleep 2
/usr/bin/airlock-agent --config /etc/airlock/agent.toml --uninstall > /tmp/uninstall.log 2>&1; echo "@@R z2_uninstall_rc $?"
wait $j; echo "@@R z2_rc $?"
echo "@@R z2_pinned $(ls /sys/fs/bpf/airlock 2>/dev/null | wc -l)"
kill $AGENT 2>/dev/null; wait $AGENT 2>/dev/null

# --- the programs can no longer be loaded (kernel lockdown, one-way: this comes last): the
# agent says why, and an uninstall still denies what is held and removes every pin ---
start_agent
as "timeout -s KILL 90 $K run /tmp/work/z3 0 never-z3" > /dev/null 2>&1 &
j=$!
for i in $(seq 1 150); do
  [ "$(grep -l '(kubectl) T' /proc/[0-9]*/stat 2>/dev/null | wc -l)" != 0 ] && break
  sleep 0.2
done
echo "@@R z3_held $(grep -l '(kubectl) T' /proc/[0-9]*/stat 2>/dev/null | wc -l)"
kill $AGENT; wait $AGENT 2>/dev/null
echo confidentiality > /sys/kernel/security/lockdown
echo "@@R z3_lockdown $(cat /sys/kernel/security/lockdown 2>&1)"
/usr/bin/airlock-agent --config /etc/airlock/agent.toml --preflight > /tmp/z3-preflight.log 2>&1
echo "@@R z3_preflight_rc $?"
echo "@@R z3_preflight $(tr '\n' ' ' < /tmp/z3-preflight.log | head -c 600)"
/usr/bin/airlock-agent --config /etc/airlock/agent.toml --uninstall > /tmp/z3-uninstall.log 2>&1
echo "@@R z3_uninstall_rc $?"
echo "@@R z3_uninstall_out $(grep '^airlock-agent:' /tmp/z3-uninstall.log | tr '\n' ' ')"
echo "@@R z3_still_held $(grep -l '(kubectl) T' /proc/[0-9]*/stat 2>/dev/null | wc -l)"
wait $j; echo "@@R z3_rc $?"
echo "@@R z3_pinned $(ls /sys/fs/bpf/airlock 2>/dev/null | wc -l)"
for f in /tmp/agent-*.log /tmp/uninstall.log /tmp/z3-uninstall.log; do tail -n 150 $f | sed "s|^|@@LOG $f |"; done
"#;

struct Booted {
    run: GuestRun,
    decider: TestDecider,
    _rt: tokio::runtime::Runtime,
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

    /// The exec request (an ask, not a report of a refusal the agent made itself) whose argv
    /// carries `marker`.
    fn exec_request(&self, marker: &str) -> Option<Seen> {
        self.decider.seen().into_iter().find(|s| {
            s.request.decided.is_none()
                && matches!(&s.request.action, Some(Action::Exec(e)) if e.argv.iter().any(|a| a == marker))
        })
    }

    /// Connect requests to `port`: (protocol, times asked, decided by the agent itself).
    fn connects(&self, port: u32) -> Vec<(i32, u32, bool)> {
        self.decider
            .seen()
            .into_iter()
            .filter_map(|s| match &s.request.action {
                Some(Action::Connect(c)) if c.port == port => {
                    Some((c.protocol, s.times, s.request.decided.is_some()))
                }
                _ => None,
            })
            .collect()
    }

    /// Asserts that the held program never ran and the exec was killed (status 137 or
    /// `signal=9`), after the decider was asked (or the agent refused it itself).
    fn never_ran(&self, status_key: &str, marker_key: &str) {
        let status = self.r(status_key);
        assert!(
            status == "137" || status.contains("signal=9"),
            "{status_key}: the held program was not killed: {status}\n{}",
            self.logs()
        );
        assert_eq!(
            self.r(marker_key),
            "no",
            "{marker_key}: the held program ran without a decision"
        );
    }

    /// The largest value the agents logged for kernel counter `name` (at their stops).
    fn counter(&self, name: &str) -> u64 {
        let key = format!("\"{name}\": ");
        self.logs()
            .lines()
            .filter_map(|l| l.split(&key).nth(1))
            .filter_map(|rest| {
                rest.split(|c: char| !c.is_ascii_digit())
                    .next()?
                    .parse()
                    .ok()
            })
            .max()
            .unwrap_or(0)
    }

    fn logs(&self) -> String {
        self.run
            .console
            .lines()
            .filter(|l| l.starts_with("@@LOG"))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

fn boot(kernel: &str) -> anyhow::Result<Booted> {
    let rt = tokio::runtime::Runtime::new()?;
    let decider = rt.block_on(TestDecider::start("127.0.0.1:0", plan))?;
    let port = decider.addr.port();
    let workload = env!("CARGO_BIN_EXE_airlock-workload");
    let attack = env!("CARGO_BIN_EXE_airlock-attack");
    let disk = tempfile::NamedTempFile::new()?;
    disk.as_file().set_len(128 << 20)?;
    let mkfs = std::process::Command::new("mkfs.btrfs")
        .args(["-q", "-f", "-M"])
        .arg(disk.path())
        .output()?;
    anyhow::ensure!(
        mkfs.status.success(),
        "mkfs.btrfs (apt-get install btrfs-progs): {}",
        String::from_utf8_lossy(&mkfs.stderr)
    );
    let mut g = Guest::on(kernel);
    g.module("btrfs")
        .module("overlay")
        .module("sctp")
        .module("virtio_blk")
        .disk(disk.path())
        .airlock(workload, agent_config(port))?
        .file("/usr/bin/airlock-attack", attack, 0o755)
        .file("/usr/bin/btrfs", "/usr/bin/btrfs", 0o755)
        .file("/usr/local/bin/terraform", workload, 0o755)
        .file("/usr/local/bin/suid-helper", workload, 0o4755)
        .text(
            "/usr/local/bin/deploy.sh",
            "#!/bin/sh\n/usr/bin/airlock-workload run \"$1\" 0 script-ran\n",
            0o755,
        )
        .text("/etc/airlock/too-big.toml", too_big_config(port), 0o644)
        .text("/etc/airlock/self-hold.toml", self_hold_config(port), 0o644)
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

fn guest_set_up_and_nothing_left_stopped(b: &Booted) {
    assert_eq!(b.r("agent_1"), "1", "agent connected");
    assert_eq!(
        b.r("fs_ready"),
        "yes",
        "btrfs subvolume and overlay mounted"
    );
    assert!(
        b.r("check").contains("ok"),
        "airlock-agent --check: {}",
        b.r("check")
    );
    assert_eq!(b.r("stopped_tasks_at_end"), "0", "no task left stopped");
}

fn a1_sigcont_through_sigio_does_not_release(b: &Booted) {
    let out = b.r("a1_sigio");
    assert!(out.contains("sent=20"), "the attack ran: {out}");
    assert!(
        out.contains("after=T"),
        "still stopped after the SIGIO storm: {out}"
    );
    assert!(out.ends_with("signal=9"), "denied and killed: {out}");
    assert_eq!(b.r("a1_marker"), "no", "ran before the decision");
}

fn a2_orphaned_group_sigcont_does_not_release(b: &Booted) {
    let out = b.r("a2_orphan");
    assert!(
        out.contains("middle=exit=0"),
        "the child was held before the parent left: {out}"
    );
    assert_eq!(
        b.r("a2_marker"),
        "no",
        "ran after the kernel's SIGCONT: {out}"
    );
    assert_eq!(b.r("a2_gone"), "yes", "denied and killed, not left stopped");
}

fn a3_tracer_attached_before_cannot_continue_it(b: &Booted) {
    for (key, marker, arg) in [
        ("a3_traceme", "a3_marker", "deny-late-a3"),
        ("a3_seize", "a3s_marker", "deny-late-a3s"),
    ] {
        let out = b.r(key);
        assert!(
            out.ends_with("signal=9"),
            "{key}: a traced exec is refused: {out}"
        );
        assert_eq!(b.r(marker), "no", "{key}: ran under the tracer");
        assert!(
            b.exec_request(arg).is_none(),
            "{key}: never held, so never asked"
        );
    }
    // The task is killed at once, so its command line may be gone: the report names the rule.
    let refusals: Vec<_> = b
        .decider
        .seen()
        .into_iter()
        .filter(|s| via(s) != "loader")
        .filter_map(|s| s.request.decided.clone().map(|d| (s.request.rule, d)))
        .filter(|(_, d)| d.cause == "traced")
        .collect();
    assert_eq!(refusals.len(), 2, "both refusals reported: {refusals:?}");
    assert!(
        refusals
            .iter()
            .all(|(rule, d)| rule == "kubectl"
                && d.verdict == airlock_proto::v1::Verdict::Deny as i32),
        "{refusals:?}"
    );
}

fn a4_marks_survive_the_leaders_exit(b: &Booted) {
    b.never_ran("a4_leader_rc", "a4_marker");
    b.never_ran("a4_thread_rc", "a4t_marker");
    for arg in ["deny-me-a4", "deny-me-a4t"] {
        let seen = b
            .exec_request(arg)
            .unwrap_or_else(|| panic!("{arg} not held"));
        let p = seen.request.process.expect("context");
        assert_eq!(p.uid, 0, "{arg} ran as root behind the setuid helper");
    }
}

fn f1_a_full_mark_table_refuses_forks(b: &Booted) {
    let out = b.r("f1_forks");
    let failed: u32 = out
        .split_whitespace()
        .find_map(|w| w.strip_prefix("failed="))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no failed= in {out}"));
    assert!(
        failed > 0,
        "forks past the table's size were let through unmarked: {out}"
    );
    assert!(out.ends_with("errno=12"), "refused with ENOMEM: {out}");
    assert!(
        b.counter("refused_fork") >= u64::from(failed),
        "the kernel counted the refused forks"
    );
}

fn a5_copies_and_memfd_are_held_as_the_binary(b: &Booted) {
    b.never_ran("a5_copy_rc", "a5_marker");
    b.never_ran("a5_memfd_rc", "a5m_marker");
    for arg in ["deny-me-a5", "deny-me-a5m"] {
        let seen = b
            .exec_request(arg)
            .unwrap_or_else(|| panic!("{arg} not held"));
        let Some(Action::Exec(e)) = &seen.request.action else {
            panic!("not an exec")
        };
        assert_eq!(e.copy_of, "/usr/local/bin/kubectl", "{arg}: {e:?}");
        assert_eq!(e.sha256.len(), 64, "{arg}: the hash approvers see: {e:?}");
        assert_eq!(seen.request.rule, "kubectl");
    }
}

fn a6_dynamic_loader_is_held_like_the_exec(b: &Booted) {
    b.never_ran("a6_rc", "a6_marker");
    let seen = b.exec_request("deny-me-a6").expect("held");
    let Some(Action::Exec(e)) = &seen.request.action else {
        panic!("not an exec")
    };
    assert_eq!(e.program, "/usr/local/bin/kubectl", "{e:?}");
    assert_eq!(e.via, "loader", "{e:?}");
}

fn a7_rule_on_a_script_holds(b: &Booted) {
    b.never_ran("a7_rc", "a7_marker");
    let seen = b
        .decider
        .seen()
        .into_iter()
        .find(|s| s.request.rule == "deploy-script")
        .expect("the script's exec was held");
    let Some(Action::Exec(e)) = &seen.request.action else {
        panic!("not an exec")
    };
    assert_eq!(e.program, "/usr/local/bin/deploy.sh", "{e:?}");
    assert_eq!(e.via, "script", "{e:?}");
    assert!(
        e.path.ends_with("/sh") || e.path.ends_with("busybox"),
        "interpreter: {e:?}"
    );
    assert!(
        e.argv.iter().any(|a| a == "/tmp/work/a7"),
        "arguments: {e:?}"
    );
}

fn a8_empty_argv0_does_not_shift_arguments(b: &Booted) {
    b.never_ran("a8_rc", "a8_marker");
    assert!(b.exec_request("deny-me-a8").is_some(), "asked");
}

fn c1_a_forged_cut_note_does_not_make_an_allow_rule_match(b: &Booted) {
    b.never_ran("c1_rc", "c1_marker");
    let seen = b.exec_request("deny-me-c1").expect("asked");
    assert_eq!(seen.request.rule, "kubectl", "not the `get *` allow rule");
}

fn s1_a_shebang_line_and_a_middle_interpreter_are_held(b: &Booted) {
    for (rc, ran) in [("s1_rc", "s1_ran"), ("s2_rc", "s2_ran")] {
        assert_eq!(b.r(rc), "137", "{rc}: held and denied");
        assert_eq!(b.r(ran), "0", "{ran}: the held program ran");
    }
    assert!(
        b.exec_request("deny-me-s1").is_some(),
        "the #! line's kubectl was asked"
    );
    assert!(
        b.decider
            .seen()
            .iter()
            .filter(|s| s.request.rule == "deploy-script")
            .count()
            >= 2,
        "deploy.sh run as another script's interpreter was asked"
    );
}

/// How an exec request's program was started ("exec", "script", "loader"); empty for others.
fn via(s: &Seen) -> String {
    match &s.request.action {
        Some(Action::Exec(e)) => e.via.clone(),
        _ => String::new(),
    }
}

fn l1_loader_traced_or_with_options_is_held(b: &Booted) {
    assert_eq!(
        b.r("l1_marker"),
        "no",
        "ran under a tracer through the loader: {}",
        b.r("l1_traced")
    );
    let traced_loader = b
        .decider
        .seen()
        .into_iter()
        .filter(|s| via(s) == "loader")
        .filter(|s| {
            s.request
                .decided
                .as_ref()
                .is_some_and(|d| d.cause == "traced")
        })
        .count();
    assert_eq!(traced_loader, 1, "the traced loader's refusal reported");
    b.never_ran("l2_rc", "l2_marker");
}

fn d1_a_fifo_in_the_command_line_does_not_wedge_the_agent(b: &Booted) {
    for key in ["d1_rc", "d2_rc"] {
        assert_eq!(b.r(key), "137", "{key}: held and denied, not left waiting");
    }
    assert_eq!(b.r("d3_rc"), "0", "the agent still decides");
}

fn u5_user_namespace_overlay_of_a_held_binary_is_held(b: &Booted) {
    b.never_ran("u5_rc", "u5_marker");
    let seen = b.exec_request("deny-me-u5").expect("asked");
    let Some(Action::Exec(e)) = &seen.request.action else {
        panic!("not an exec")
    };
    assert_eq!(e.copy_of, "/usr/local/bin/kubectl", "{e:?}");
}

fn w1_account_rules_follow_setuid_and_supplementary_groups_are_watched(b: &Booted) {
    b.never_ran("w1_rc", "w1_marker");
    let seen = b.exec_request("deny-me-w1").expect("asked");
    assert_eq!(seen.request.rule, "agent-terraform");
    let p = seen.request.process.expect("context");
    assert_eq!((p.uid, p.watched_as.as_str()), (0, "agent"));
    b.never_ran("w2_rc", "w2_marker");
}

fn n6_unspecified_family_and_address_are_held(b: &Booted) {
    assert!(
        b.r("n6_unspec").starts_with("err 13"),
        "AF_UNSPEC sendto: {}",
        b.r("n6_unspec")
    );
    assert_eq!(
        b.r("n6_received"),
        "0",
        "nothing reached the denied destination"
    );
    assert!(
        b.r("n7_any").starts_with("err 13"),
        "connect to 0.0.0.0 reaches 127.0.0.1 and is denied: {}",
        b.r("n7_any")
    );
    assert_eq!(b.r("n8_sctp"), "err 13", "SCTP connectx refused");
}

fn p1_a_process_with_a_dead_agents_pid_is_watched(b: &Booted) {
    let out = b.r("p1_reuse");
    assert!(out.starts_with("reused="), "the pid came round: {out}");
    assert_eq!(
        b.r("p1_held"),
        "1",
        "held while the dead agent's heartbeat was fresh"
    );
    assert!(out.ends_with("signal=9"), "asked, and denied: {out}");
    assert_eq!(b.r("p1_marker"), "no", "ran as if it were the agent");
    assert!(
        b.exec_request("deny-me-p1").is_some(),
        "the new agent asked"
    );
}

fn b1_btrfs_and_overlay_binaries_match(b: &Booted) {
    b.never_ran("b1_btrfs_rc", "b1_marker");
    b.never_ran("b2_overlay_rc", "b2_marker");
    assert!(b.exec_request("deny-me-b1").is_some(), "btrfs exec held");
    assert!(b.exec_request("deny-me-b2").is_some(), "overlay exec held");
}

fn n1_tcp_fast_open_is_held_like_connect(b: &Booted) {
    assert_eq!(
        b.r("n1_tfo"),
        "err 13",
        "denied destination reached by sendto(MSG_FASTOPEN)"
    );
    let tcp = b
        .connects(5433)
        .into_iter()
        .filter(|(p, _, _)| *p == Protocol::Tcp as i32)
        .count();
    assert!(tcp >= 1, "the decider was asked: {:?}", b.connects(5433));
}

fn n2_unconnected_udp_is_held_and_allowed_once_per_socket(b: &Booted) {
    assert!(b.r("n2_udp").starts_with("err 13"), "{}", b.r("n2_udp"));
    assert!(b.r("n2_mmsg").starts_with("err 13"), "{}", b.r("n2_mmsg"));
    assert_eq!(
        b.r("n2_received"),
        "0",
        "no datagram reached the denied destination"
    );
    assert_eq!(b.r("n3_udp_allowed"), "ok 5", "an allowed socket sends on");
    let udp: Vec<_> = b
        .connects(5432)
        .into_iter()
        .filter(|(p, _, _)| *p == Protocol::Udp as i32)
        .collect();
    assert_eq!(udp.len(), 1, "five datagrams, one question: {udp:?}");
}

fn n4_io_uring_connect_is_refused_clearly_and_leaves_nothing_behind(b: &Booted) {
    assert_eq!(
        b.r("n4_uring"),
        "uring=err 13 plain=ok",
        "io_uring: refused with EACCES, not a stray EINTR; the plain connect after it is asked"
    );
    let asks = b.connects(5434);
    assert!(
        asks.iter().any(|(_, _, decided)| *decided),
        "the refusal is reported: {asks:?}"
    );
    assert!(
        asks.iter().any(|(_, _, decided)| !decided),
        "the later plain connect was asked, not passed on a verdict left behind: {asks:?}"
    );
}

fn n5_connect_hold_with_a_zombie_leader_is_decided(b: &Booted) {
    assert_eq!(b.r("n5_zombie"), "ok", "allowed and released");
    assert_eq!(b.connects(5435).len(), 1, "asked once");
}

fn u1_restarted_unit_is_still_watched(b: &Booted) {
    b.never_ran("u1_rc", "u1_marker");
}

fn u2_binary_replaced_by_rename_is_still_held(b: &Booted) {
    b.never_ran("u2_rc", "u2_marker");
}

fn u3_reload_that_cannot_apply_keeps_the_old_tables(b: &Booted) {
    assert!(
        b.r("u3_refused").starts_with("1 "),
        "the too-big reload was refused: {}",
        b.r("u3_refused")
    );
    assert_eq!(
        b.r("u3_connect").split(' ').next(),
        Some("err"),
        "still held and denied: {}",
        b.r("u3_connect")
    );
}

fn u4_restart_keeps_holds_and_marks(b: &Booted) {
    assert_ne!(b.r("u4_held_while_down"), "0", "held while no agent ran");
    assert!(
        b.r("u4_pinned").parse::<u32>().unwrap_or(0) > 0,
        "pins kept"
    );
    assert_eq!(b.r("agent_2"), "1", "restarted agent reconnected");
    assert_eq!(b.r("u4_rc"), "0", "approved after the restart, ran");
    assert_eq!(b.r("u4_marker"), "yes");
    b.never_ran("u4m_rc", "u4m_marker");
}

fn z1_agent_never_holds_itself(b: &Booted) {
    assert_eq!(
        b.r("agent_3"),
        "1",
        "the agent reached its decider through a rule covering it"
    );
    assert_ne!(b.r("z1_agent_state"), "T", "the agent is not stopped");
    assert_eq!(b.r("z1_decided"), "0", "and decides holds");
}

fn z2_uninstall_denies_what_is_held_and_unloads(b: &Booted) {
    assert_eq!(b.r("z2_uninstall_rc"), "0");
    assert_eq!(b.r("z2_rc"), "137", "the held task was denied");
    assert_eq!(b.r("z2_pinned"), "0", "nothing left pinned");
}

fn z3_where_the_programs_cannot_load_the_agent_says_why_and_uninstall_still_works(b: &Booted) {
    let all: Vec<String> = b
        .results()
        .into_iter()
        .filter(|(k, _)| k.starts_with("z3_"))
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    eprintln!("z3 results: {all:#?}");
    assert_eq!(b.r("z3_held"), "1", "a task was held before the lockdown");
    assert!(
        b.r("z3_lockdown").contains("[confidentiality]"),
        "lockdown: {}",
        b.r("z3_lockdown")
    );
    assert_ne!(
        b.r("z3_preflight_rc"),
        "0",
        "the preflight passed under lockdown"
    );
    assert!(
        b.r("z3_preflight").contains("lockdown"),
        "z3_preflight: {}",
        b.r("z3_preflight")
    );
    assert_eq!(
        b.r("z3_uninstall_rc"),
        "0",
        "uninstall failed; logs:\n{}",
        b.logs()
    );
    // The uninstall that ran is the one without the programs (which cannot load here), and it
    // is what killed the held task (not the task's own 90 s timeout).
    assert!(
        b.r("z3_uninstall_out")
            .contains("uninstalled without loading the programs (1 held task(s) killed;"),
        "z3_uninstall_out: {}",
        b.r("z3_uninstall_out")
    );
    assert_eq!(b.r("z3_still_held"), "0", "the held task was left stopped");
    assert_eq!(b.r("z3_rc"), "137", "the held task was denied (killed)");
    assert_eq!(b.r("z3_pinned"), "0", "nothing left pinned");
}

airlock_tests::kernel_matrix!(
    boot = boot,
    booted = Booted,
    checks = [
        guest_set_up_and_nothing_left_stopped,
        a1_sigcont_through_sigio_does_not_release,
        a2_orphaned_group_sigcont_does_not_release,
        a3_tracer_attached_before_cannot_continue_it,
        a4_marks_survive_the_leaders_exit,
        f1_a_full_mark_table_refuses_forks,
        a5_copies_and_memfd_are_held_as_the_binary,
        a6_dynamic_loader_is_held_like_the_exec,
        a7_rule_on_a_script_holds,
        a8_empty_argv0_does_not_shift_arguments,
        c1_a_forged_cut_note_does_not_make_an_allow_rule_match,
        s1_a_shebang_line_and_a_middle_interpreter_are_held,
        l1_loader_traced_or_with_options_is_held,
        d1_a_fifo_in_the_command_line_does_not_wedge_the_agent,
        u5_user_namespace_overlay_of_a_held_binary_is_held,
        w1_account_rules_follow_setuid_and_supplementary_groups_are_watched,
        n6_unspecified_family_and_address_are_held,
        p1_a_process_with_a_dead_agents_pid_is_watched,
        b1_btrfs_and_overlay_binaries_match,
        n1_tcp_fast_open_is_held_like_connect,
        n2_unconnected_udp_is_held_and_allowed_once_per_socket,
        n4_io_uring_connect_is_refused_clearly_and_leaves_nothing_behind,
        n5_connect_hold_with_a_zombie_leader_is_decided,
        u1_restarted_unit_is_still_watched,
        u2_binary_replaced_by_rename_is_still_held,
        u3_reload_that_cannot_apply_keeps_the_old_tables,
        u4_restart_keeps_holds_and_marks,
        z1_agent_never_holds_itself,
        z2_uninstall_denies_what_is_held_and_unloads,
        z3_where_the_programs_cannot_load_the_agent_says_why_and_uninstall_still_works,
    ]
);
