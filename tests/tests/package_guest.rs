//! The agent package installed by a real dpkg in a QEMU guest (Debian's 6.1 kernel, BPF LSM
//! active, the BPF file system not mounted), its maintainer scripts run: the agent started from
//! its installed paths with the packaged unit's command line and the packaged example
//! configuration edited as its comments say mounts bpffs itself, holds a watched account's
//! exec, applies the decider's answer, exports what the Grafana dashboard queries, keeps a held
//! task through an upgrade, and is unloaded on remove and gone on purge.

use std::{path::Path, process::Command, time::Duration};

use airlock_proto::v1::{action_request::Action, ActionRequest};
use airlock_tests::{
    debian_packages,
    decider::{Plan, TestDecider},
    vm::Guest,
};

fn plan(r: &ActionRequest) -> Plan {
    match &r.action {
        Some(Action::Exec(e)) if e.argv.iter().any(|a| a == "allow-me-p1") => Plan::Allow,
        _ => Plan::Deny,
    }
}

/// The example agent.toml edited as its comments tell an operator: this decider (no TLS, no
/// credential in the test), the guest's `agent` account, kubectl for /bin/sh. The rules'
/// `[[rule.example]]` tables go too: with `args` gone, what they state is no longer true.
fn edited(example: &str, decider_port: u16) -> String {
    let mut out = String::new();
    let mut in_example = false;
    for line in example.lines() {
        if line.starts_with('[') {
            in_example = line.trim() == "[[rule.example]]";
        }
        if in_example {
            continue;
        }
        let key = line.split('=').next().unwrap_or("").trim();
        let line = match key {
            "decider" => format!("decider = \"http://10.0.2.2:{decider_port}\""),
            "token_file" | "tls_ca_file" | "units" | "args" => continue,
            "users" => "users = [\"agent\"]".to_owned(),
            "exec" => "exec = [\"/usr/local/bin/kubectl\"]".to_owned(),
            _ => line.to_owned(),
        };
        out.push_str(&line);
        out.push('\n');
    }
    out
}

/// The edit leaves a file the agent loads (no guest needed).
#[test]
fn the_edited_example_loads() {
    let example =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/agent.toml"))
            .unwrap();
    let config = edited(&example, 7443);
    let parsed =
        airlock_agent::config::Config::parse(&config, std::path::Path::new("agent.toml")).unwrap();
    assert_eq!(parsed.rules.len(), 2, "{config}");
    assert!(
        parsed.rules.iter().all(|r| r.examples.is_empty()),
        "{config}"
    );
    assert_eq!(parsed.rules[0].exec, ["/usr/local/bin/kubectl"]);
}

/// `dpkg -s` stanzas of the host's packages that `deb` depends on, for the guest's dpkg
/// database: the guest has what the agent needs of them (the harness copies the libraries its
/// binaries use), so dpkg sees the dependencies as installed.
fn status_for(deb: &Path) -> String {
    let out = Command::new("dpkg-deb")
        .args(["-f"])
        .arg(deb)
        .arg("Depends")
        .output()
        .unwrap();
    let depends = String::from_utf8(out.stdout).unwrap();
    let names: Vec<String> = depends
        .split(',')
        .filter_map(|d| d.split_whitespace().next().map(str::to_owned))
        .collect();
    assert!(!names.is_empty(), "no Depends in {}", deb.display());
    let out = Command::new("dpkg-query")
        .arg("-s")
        .args(&names)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "dpkg-query -s {names:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Their own dependencies are not in the guest's database: leave them out, as the guest
    // has no package manager history of its own.
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .filter(|l| !l.starts_with("Depends:") && !l.starts_with("Pre-Depends:"))
        .map(|l| format!("{l}\n"))
        .collect()
}

/// `deb` repacked (same files, control and scripts) as `version`, for an upgrade.
fn repacked(deb: &Path, dir: &Path, version: &str) -> std::path::PathBuf {
    let tree = dir.join(format!("tree-{version}"));
    let run = |c: &mut Command| assert!(c.status().unwrap().success(), "{c:?}");
    run(Command::new("dpkg-deb").arg("-R").arg(deb).arg(&tree));
    let control = tree.join("DEBIAN/control");
    let text = std::fs::read_to_string(&control).unwrap();
    let bumped: String = text
        .lines()
        .map(|l| {
            if l.starts_with("Version: ") {
                format!("Version: {version}")
            } else {
                l.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    std::fs::write(&control, bumped + "\n").unwrap();
    let out = dir.join(format!("airlock-agent_{version}_amd64.deb"));
    run(Command::new("dpkg-deb")
        .args(["--root-owner-group", "-Zgzip", "-b"])
        .arg(&tree)
        .arg(&out));
    out
}

/// The agent package through a real dpkg in the guest, its maintainer scripts included:
/// install (enabled, not started without a credential), the operator's edit of the example
/// configuration, the agent started with the packaged unit's command line (it mounts bpffs
/// itself), a live /metrics scrape against the Grafana dashboard's queries, an allowed and a
/// denied exec, an upgrade while a task is held (the edit kept, the held task decided after
/// the restart), remove (the kernel programs unloaded) and purge (configuration and state
/// gone).
#[test]
fn packaged_agent_installs_holds_upgrades_and_goes_with_dpkg() {
    if !airlock_tests::vm::covers("6.1") {
        eprintln!("AIRLOCK_KERNELS leaves out 6.1: not booted");
        return;
    }
    let (agent_deb, _) = debian_packages().unwrap();
    let root = tempfile::tempdir().unwrap();
    let status = Command::new("dpkg-deb")
        .arg("-x")
        .arg(&agent_deb)
        .arg(root.path())
        .status()
        .unwrap();
    assert!(status.success());
    let unit = std::fs::read_to_string(
        root.path()
            .join("usr/lib/systemd/system/airlock-agent.service"),
    )
    .unwrap();
    let exec_start = unit
        .lines()
        .find_map(|l| l.strip_prefix("ExecStart="))
        .expect("the packaged unit has ExecStart")
        .to_owned();
    assert!(
        exec_start.starts_with("/usr/bin/airlock-agent "),
        "{exec_start}"
    );
    let upgrade = repacked(&agent_deb, root.path(), "0.1.0-2");

    let rt = tokio::runtime::Runtime::new().unwrap();
    let decider = rt
        .block_on(TestDecider::start(
            "127.0.0.1:0",
            |r: &ActionRequest| match &r.action {
                Some(Action::Exec(e)) if e.argv.iter().any(|a| a == "hold-me-p3") => {
                    Plan::After(Duration::from_secs(20), true)
                }
                _ => plan(r),
            },
        ))
        .unwrap();
    let example = std::fs::read_to_string(root.path().join("etc/airlock/agent.toml")).unwrap();
    let config = edited(&example, decider.addr.port()).replacen(
        "[agent]\n",
        "[agent]\nmetrics_addr = \"127.0.0.1:9464\"\n",
        1,
    );
    assert!(
        config.contains("exec = [\"/usr/local/bin/kubectl\"]") && config.contains("metrics_addr"),
        "{config}"
    );

    let mut g = Guest::on("6.1");
    g.file("/opt/pkg/agent-1.deb", &agent_deb, 0o644)
        .file("/opt/pkg/agent-2.deb", &upgrade, 0o644)
        // The agent's shared libraries (the harness copies a binary's libraries with it): the
        // guest has no libc6 package of its own for dpkg to install them from.
        .file(
            "/opt/pkg/same-libraries-as-airlock-agent",
            airlock_tests::workspace_bin("agent-user", "airlock-agent").unwrap(),
            0o755,
        )
        .file("/usr/bin/dpkg", "/usr/bin/dpkg", 0o755)
        .file("/usr/bin/dpkg-deb", "/usr/bin/dpkg-deb", 0o755)
        .file("/usr/bin/dpkg-query", "/usr/bin/dpkg-query", 0o755)
        .file("/usr/bin/dpkg-split", "/usr/bin/dpkg-split", 0o755)
        // dpkg-deb extracts control archives with `tar`; busybox's cannot read cargo-deb's.
        .file("/usr/bin/tar", "/usr/bin/tar", 0o755)
        .file("/sbin/start-stop-daemon", "/usr/sbin/start-stop-daemon", 0o755)
        .file("/sbin/ldconfig", "/sbin/ldconfig", 0o755)
        .text("/var/lib/dpkg/status", status_for(&agent_deb), 0o644)
        .text("/opt/pkg/agent.toml", config, 0o644)
        .file(
            "/usr/local/bin/kubectl",
            env!("CARGO_BIN_EXE_airlock-workload"),
            0o755,
        )
        .script(format!(
            r#"
# Full paths: busybox's shell runs its own dpkg applets before anything on PATH.
mkdir -p /var/lib/dpkg/info /var/lib/dpkg/updates /var/lib/dpkg/triggers /var/lib/dpkg/alternatives /tmp/work
touch /var/lib/dpkg/available
chown agent:agent /tmp/work
umount /sys/fs/bpf
echo "@@R bpffs_before $(grep -c ' /sys/fs/bpf bpf ' /proc/mounts)"

/usr/bin/dpkg -i /opt/pkg/agent-1.deb > /opt/install.log 2>&1
echo "@@R install_rc $?"
sed "s|^|@@INSTALL |" /opt/install.log
echo "@@R installed $(dpkg-query -W -f='${{Status}} ${{Version}}' airlock-agent)"
echo "@@R conffiles $(dpkg-query -W -f='${{Conffiles}}' airlock-agent | awk '{{print $1}}' | tr '\n' ' ')"
echo "@@R started_by_install $(pidof airlock-agent >/dev/null && echo yes || echo no)"

# The operator's edit, as the example's comments say.
cp /opt/pkg/agent.toml /etc/airlock/agent.toml
start_agent() {{
  {exec_start} > /opt/agent.log 2>&1 &
  AGENT=$!
  for i in $(seq 1 300); do
    grep -q "airlock-agent running" /opt/agent.log && grep -q "connected to decider" /opt/agent.log && break
    sleep 0.2
  done
}}
start_agent
echo "@@R bpffs_after $(grep -c ' /sys/fs/bpf bpf ' /proc/mounts)"
su agent -c '/usr/local/bin/kubectl run /tmp/work/p1 0 allow-me-p1'
echo "@@R allow_rc $?"
echo "@@R allow_marker $(test -e /tmp/work/p1 && echo yes || echo no)"
su agent -c '/usr/local/bin/kubectl run /tmp/work/p2 0 deny-me-p2'
echo "@@R deny_rc $?"
echo "@@R deny_marker $(test -e /tmp/work/p2 && echo yes || echo no)"
wget -qO /opt/metrics http://127.0.0.1:9464/metrics
echo "@@R metrics_rc $?"
grep '^# TYPE ' /opt/metrics | sed "s|^|@@M |"

# An upgrade while a task is held: dpkg replaces the files; the service restarts (systemd's
# try-restart from postinst, done by hand here: no systemd in the guest).
su agent -c '/usr/local/bin/kubectl run /tmp/work/p3 0 hold-me-p3' &
HELD=$!
sleep 3
echo "@@R held_before_upgrade $(test -e /tmp/work/p3 && echo ran || echo held)"
/usr/bin/dpkg -i /opt/pkg/agent-2.deb > /opt/upgrade.log 2>&1
echo "@@R upgrade_rc $?"
sed "s|^|@@UPGRADE |" /opt/upgrade.log
echo "@@R upgraded $(dpkg-query -W -f='${{Version}}' airlock-agent)"
echo "@@R edit_kept $(grep -c '10.0.2.2' /etc/airlock/agent.toml)"
kill -TERM $AGENT; wait $AGENT
echo "@@R held_after_stop $(test -e /tmp/work/p3 && echo ran || echo held)"
start_agent
wait $HELD
echo "@@R held_rc $?"
echo "@@R held_marker $(test -e /tmp/work/p3 && echo yes || echo no)"

# Remove: systemd would stop the service first (the debhelper part of prerm); then prerm
# unloads the kernel programs.
kill -TERM $AGENT; wait $AGENT
tail -n 30 /opt/agent.log | sed "s|^|@@LOG |"
echo "@@R pins_before_remove $(test -d /sys/fs/bpf/airlock && echo yes || echo no)"
/usr/bin/dpkg -r airlock-agent > /opt/remove.log 2>&1
echo "@@R remove_rc $?"
sed "s|^|@@REMOVE |" /opt/remove.log
echo "@@R pins_after_remove $(test -d /sys/fs/bpf/airlock && echo yes || echo no)"
echo "@@R binary_after_remove $(test -e /usr/bin/airlock-agent && echo yes || echo no)"
echo "@@R conffile_after_remove $(test -e /etc/airlock/agent.toml && echo yes || echo no)"
mkdir -p /var/lib/airlock-agent && touch /var/lib/airlock-agent/rules.toml
/usr/bin/dpkg -P airlock-agent > /opt/purge.log 2>&1
echo "@@R purge_rc $?"
sed "s|^|@@PURGE |" /opt/purge.log
echo "@@R conffile_after_purge $(test -e /etc/airlock/agent.toml && echo yes || echo no)"
echo "@@R state_after_purge $(test -e /var/lib/airlock-agent && echo yes || echo no)"
echo "@@R known_after_purge $(dpkg-query -W airlock-agent >/dev/null 2>&1 && echo yes || echo no)"
"#
        ));
    let run = g.boot(Duration::from_secs(900)).unwrap();
    assert!(run.finished(), "guest did not finish:\n{}", run.console);
    let r = run.results();
    let get = |k: &str| r.get(k).cloned().unwrap_or_default();
    let expect = |k: &str, want: &str| {
        assert_eq!(get(k), want, "{k}:\n{}", run.console);
    };
    expect("bpffs_before", "0");
    expect("install_rc", "0");
    expect("installed", "install ok installed 0.1.0-1");
    assert!(
        get("conffiles").contains("/etc/airlock/agent.toml"),
        "{}",
        run.console
    );
    expect("started_by_install", "no");
    assert!(
        run.console
            .contains("@@INSTALL airlock-agent: enabled, not started."),
        "postinst tells what is left to do:\n{}",
        run.console
    );
    expect("bpffs_after", "1");
    expect("allow_rc", "0");
    expect("allow_marker", "yes");
    assert_ne!(get("deny_rc"), "0", "{}", run.console);
    expect("deny_marker", "no");
    for marker in ["allow-me-p1", "deny-me-p2"] {
        let seen = decider
            .request_with_arg(marker)
            .unwrap_or_else(|| panic!("the decider never saw {marker}:\n{}", run.console));
        assert_eq!(seen.request.rule, "kubectl-destructive");
    }

    // Every agent metric the dashboard queries is on the live agent's /metrics.
    expect("metrics_rc", "0");
    let scraped: String = run
        .console
        .lines()
        .filter_map(|l| l.trim_end_matches('\r').strip_prefix("@@M "))
        .map(|l| format!("{l}\n"))
        .collect();
    let exported = airlock_testkit::prometheus::exposition_names(&scraped);
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../deploy/grafana/airlock.json"
        ))
        .unwrap(),
    )
    .unwrap();
    let mut agent_metrics = std::collections::BTreeSet::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"].as_str().unwrap_or_default();
            agent_metrics.extend(
                airlock_testkit::prometheus::metrics_in(expr)
                    .into_iter()
                    .filter(|m| m.starts_with("airlock_agent_")),
            );
        }
    }
    assert!(
        agent_metrics.len() >= 3,
        "the dashboard queries the agents: {agent_metrics:?}"
    );
    for m in &agent_metrics {
        assert!(
            exported.contains(m),
            "the dashboard queries {m}, which the live agent does not export: {exported:?}"
        );
    }

    // Upgrade: the edit kept, the held task held through the restart, then decided.
    expect("held_before_upgrade", "held");
    expect("upgrade_rc", "0");
    expect("upgraded", "0.1.0-2");
    expect("edit_kept", "1");
    expect("held_after_stop", "held");
    expect("held_rc", "0");
    expect("held_marker", "yes");
    let held = decider.request_with_arg("hold-me-p3").unwrap();
    assert!(
        held.sessions.len() >= 2,
        "the restarted agent asked again for the task it kept holding: {held:?}"
    );

    // Remove unloads the programs and keeps the configuration; purge takes the rest.
    expect("pins_before_remove", "yes");
    expect("remove_rc", "0");
    expect("pins_after_remove", "no");
    expect("binary_after_remove", "no");
    expect("conffile_after_remove", "yes");
    expect("purge_rc", "0");
    expect("conffile_after_purge", "no");
    expect("state_after_purge", "no");
    expect("known_after_purge", "no");
}
