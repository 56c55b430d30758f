//! `airlock-agent --write-docs DIR` (what the package ships) writes a man page that `man -l`
//! renders without a warning, and completions for bash, zsh and fish that name its flags.

use std::{path::Path, process::Command};

#[test]
fn agent_man_page_renders_and_completions_name_flags() {
    let dir = tempfile::tempdir().unwrap();
    let status = Command::new(env!("CARGO_BIN_EXE_airlock-agent"))
        .arg("--write-docs")
        .arg(dir.path())
        .status()
        .unwrap();
    assert!(status.success(), "--write-docs failed: {status}");
    let page = dir.path().join("man/airlock-agent.1");
    let text = render(&page);
    for want in [
        "airlock-agent",
        "--config",
        "--uninstall",
        "/etc/airlock/agent.toml",
    ] {
        assert!(
            text.contains(want),
            "{} lacks {want}:\n{text}",
            page.display()
        );
    }
    assert!(
        !text.contains("--write-docs"),
        "the hidden flag is documented"
    );
    for file in [
        "completions/bash/airlock-agent",
        "completions/zsh/_airlock-agent",
        "completions/fish/airlock-agent.fish",
    ] {
        let body = std::fs::read_to_string(dir.path().join(file)).unwrap();
        assert!(body.contains("uninstall"), "{file} lacks --uninstall");
    }
}

/// The page as `man -l` renders it; panics on a non-zero exit or any groff warning.
fn render(page: &Path) -> String {
    let out = Command::new("man")
        .args(["--warnings=all", "-E", "UTF-8", "-P", "cat", "-l"])
        .arg(page)
        .env("MANWIDTH", "100")
        .output()
        .expect("running man (scripts/setup.sh installs man-db)");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stderr.trim().is_empty(),
        "man -l {}: {}: {stderr}",
        page.display(),
        out.status
    );
    String::from_utf8(out.stdout).unwrap()
}
