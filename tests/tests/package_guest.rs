//! The agent package's files, unpacked into a QEMU guest (Debian's 6.1 kernel, BPF LSM active)
//! without the BPF file system mounted, run from their installed paths with the packaged unit's
//! command line and the packaged example configuration edited as its comments say: the agent
//! mounts bpffs itself, holds a watched account's exec, and applies the decider's answer.

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

#[test]
fn packaged_agent_mounts_bpffs_and_holds_from_installed_paths() {
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

    let rt = tokio::runtime::Runtime::new().unwrap();
    let decider = rt
        .block_on(TestDecider::start("127.0.0.1:0", plan))
        .unwrap();
    let example = std::fs::read_to_string(root.path().join("etc/airlock/agent.toml")).unwrap();
    let config = edited(&example, decider.addr.port());
    assert!(
        config.contains("exec = [\"/usr/local/bin/kubectl\"]"),
        "{config}"
    );

    let mut g = Guest::on("6.1");
    add_tree(&mut g, root.path(), root.path());
    g.text("/etc/airlock/agent.toml", config, 0o644)
        .file(
            "/usr/local/bin/kubectl",
            env!("CARGO_BIN_EXE_airlock-workload"),
            0o755,
        )
        .script(format!(
            r#"
mkdir -p /tmp/work && chown agent:agent /tmp/work
umount /sys/fs/bpf
echo "@@R bpffs_before $(grep -c ' /sys/fs/bpf bpf ' /proc/mounts)"
{exec_start} > /tmp/agent.log 2>&1 &
AGENT=$!
for i in $(seq 1 300); do
  grep -q "airlock-agent running" /tmp/agent.log && grep -q "connected to decider" /tmp/agent.log && break
  sleep 0.2
done
echo "@@R bpffs_after $(grep -c ' /sys/fs/bpf bpf ' /proc/mounts)"
su agent -c '/usr/local/bin/kubectl run /tmp/work/p1 0 allow-me-p1'
echo "@@R allow_rc $?"
echo "@@R allow_marker $(test -e /tmp/work/p1 && echo yes || echo no)"
su agent -c '/usr/local/bin/kubectl run /tmp/work/p2 0 deny-me-p2'
echo "@@R deny_rc $?"
echo "@@R deny_marker $(test -e /tmp/work/p2 && echo yes || echo no)"
kill -TERM $AGENT; wait $AGENT
tail -n 30 /tmp/agent.log | sed "s|^|@@LOG |"
"#
        ));
    let run = g.boot(Duration::from_secs(600)).unwrap();
    assert!(run.finished(), "guest did not finish:\n{}", run.console);
    let r = run.results();
    let get = |k: &str| r.get(k).cloned().unwrap_or_default();
    assert_eq!(get("bpffs_before"), "0", "{}", run.console);
    assert_eq!(
        get("bpffs_after"),
        "1",
        "the agent mounts bpffs:\n{}",
        run.console
    );
    assert_eq!(get("allow_rc"), "0", "{}", run.console);
    assert_eq!(get("allow_marker"), "yes", "{}", run.console);
    assert_ne!(get("deny_rc"), "0", "{}", run.console);
    assert_eq!(get("deny_marker"), "no", "{}", run.console);
    for marker in ["allow-me-p1", "deny-me-p2"] {
        let seen = decider
            .request_with_arg(marker)
            .unwrap_or_else(|| panic!("the decider never saw {marker}:\n{}", run.console));
        assert_eq!(seen.request.rule, "kubectl-destructive");
    }
}

/// Puts every file under `dir` into the guest at its path below `root`.
fn add_tree(g: &mut Guest, root: &Path, dir: &Path) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            add_tree(g, root, &path);
        } else {
            let guest = format!("/{}", path.strip_prefix(root).unwrap().display());
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o7777;
            g.file(&guest, &path, mode);
        }
    }
}
