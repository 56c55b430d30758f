//! `airlock-server write-docs DIR` and `airlockctl write-docs DIR` (what the package ships)
//! write a man page for the binary and for every visible subcommand, each of which `man -l`
//! renders without a warning, and bash, zsh and fish completions that name the subcommands.

use std::{path::Path, process::Command};

#[test]
fn server_and_ctl_man_pages_render_and_completions_name_subcommands() {
    for (bin, exe, pages, words) in [
        (
            "airlock-server",
            env!("CARGO_BIN_EXE_airlock-server"),
            &[
                "airlock-server",
                "airlock-server-tokens-create",
                "airlock-server-users-add",
            ][..],
            &["tokens", "users"][..],
        ),
        (
            "airlockctl",
            env!("CARGO_BIN_EXE_airlockctl"),
            &[
                "airlockctl",
                "airlockctl-requests-approve",
                "airlockctl-audit-verify",
                "airlockctl-grants-list",
            ][..],
            &["requests", "approve", "audit", "grants"][..],
        ),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let status = Command::new(exe)
            .arg("write-docs")
            .arg(dir.path())
            .status()
            .unwrap();
        assert!(status.success(), "{bin} write-docs failed: {status}");
        for page in pages {
            let path = dir.path().join(format!("man/{page}.1"));
            let text = render(&path);
            assert!(
                text.contains(page),
                "{} lacks its name:\n{text}",
                path.display()
            );
        }
        let mut count = 0;
        for entry in std::fs::read_dir(dir.path().join("man")).unwrap() {
            let path = entry.unwrap().path();
            let text = render(&path);
            assert!(
                !text.contains("write-docs"),
                "{} documents the hidden command",
                path.display()
            );
            count += 1;
        }
        assert!(count >= pages.len());
        for file in [
            format!("completions/bash/{bin}"),
            format!("completions/zsh/_{bin}"),
            format!("completions/fish/{bin}.fish"),
        ] {
            let body = std::fs::read_to_string(dir.path().join(&file)).unwrap();
            for word in words {
                assert!(body.contains(word), "{file} lacks {word}");
            }
        }
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
