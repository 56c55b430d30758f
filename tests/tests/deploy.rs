//! The systemd units in deploy/ pass `systemd-analyze verify` (with ExecStart pointed at the
//! binaries this build produced, since nothing is installed under /usr/local/bin here).

use std::process::Command;

use airlock_tests::{vm::workspace_root, workspace_bin};

#[test]
fn systemd_units_verify_clean() {
    let dir = tempfile::tempdir().unwrap();
    for (unit, package, bin) in [
        ("airlock-agent.service", "agent-user", "airlock-agent"),
        ("airlock-server.service", "control-plane", "airlock-server"),
    ] {
        let text = std::fs::read_to_string(workspace_root().join("deploy").join(unit)).unwrap();
        let exe = workspace_bin(package, bin).unwrap();
        let local = format!("/usr/local/bin/{bin}");
        assert!(text.contains(&local), "{unit} runs {local}");
        std::fs::write(
            dir.path().join(unit),
            text.replace(&local, &exe.display().to_string()),
        )
        .unwrap();
    }
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(dir.path().join("airlock-agent.service"))
        .arg(dir.path().join("airlock-server.service"))
        .output()
        .expect("systemd-analyze (package systemd) is installed by scripts/setup.sh");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stderr.trim().is_empty(),
        "systemd-analyze verify: {stderr}"
    );
}
