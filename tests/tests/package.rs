//! The Debian packages that `scripts/package.sh` makes (here with `--debug`, from this build's
//! debug binaries; the release packages differ only in the binaries): `dpkg-deb -c` and `-I`
//! show the files, conffiles, dependencies and maintainer scripts; the packaged units pass
//! `systemd-analyze verify`; the packaged man pages render; and the packaged agent, run from
//! its unpacked files with the packaged example configuration, checks that configuration.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use airlock_tests::debian_packages;

/// The two packages, made once for both tests (they would race on the same output files).
fn build_packages() -> (PathBuf, PathBuf) {
    static PACKAGES: std::sync::OnceLock<(PathBuf, PathBuf)> = std::sync::OnceLock::new();
    PACKAGES.get_or_init(|| debian_packages().unwrap()).clone()
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The paths `dpkg-deb -c` lists, without the leading `.`.
fn files(deb: &Path) -> Vec<String> {
    run(Command::new("dpkg-deb").arg("-c").arg(deb))
        .lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .map(|p| p.trim_start_matches('.').to_owned())
        .collect()
}

fn info(deb: &Path, member: &str) -> String {
    run(Command::new("dpkg-deb").arg("-I").arg(deb).arg(member))
}

#[test]
fn packages_hold_files_conffiles_dependencies_and_scripts() {
    let (agent, server) = build_packages();

    let listed = files(&agent);
    for want in [
        "/usr/bin/airlock-agent",
        "/usr/lib/systemd/system/airlock-agent.service",
        "/etc/airlock/agent.toml",
        "/usr/share/man/man1/airlock-agent.1.gz",
        "/usr/share/bash-completion/completions/airlock-agent",
        "/usr/share/zsh/vendor-completions/_airlock-agent",
        "/usr/share/fish/vendor_completions.d/airlock-agent.fish",
        "/usr/share/doc/airlock-agent/copyright",
        "/usr/share/doc/airlock-agent/changelog.Debian.gz",
    ] {
        assert!(
            listed.iter().any(|f| f == want),
            "agent package lacks {want}: {listed:?}"
        );
    }
    let listed = files(&server);
    for want in [
        "/usr/bin/airlock-server",
        "/usr/bin/airlockctl",
        "/usr/lib/systemd/system/airlock-server.service",
        "/etc/airlock/policy.toml",
        "/etc/airlock/server.toml",
        "/usr/share/man/man1/airlock-server.1.gz",
        "/usr/share/man/man1/airlockctl.1.gz",
        "/usr/share/man/man1/airlockctl-requests-approve.1.gz",
        "/usr/share/bash-completion/completions/airlockctl",
        "/usr/share/zsh/vendor-completions/_airlock-server",
        "/usr/share/fish/vendor_completions.d/airlockctl.fish",
    ] {
        assert!(
            listed.iter().any(|f| f == want),
            "server package lacks {want}: {listed:?}"
        );
    }

    assert_eq!(info(&agent, "conffiles").trim(), "/etc/airlock/agent.toml");
    let mut conf: Vec<_> = info(&server, "conffiles")
        .lines()
        .map(str::to_owned)
        .collect();
    conf.sort();
    assert_eq!(
        conf,
        ["/etc/airlock/policy.toml", "/etc/airlock/server.toml"]
    );

    for (deb, name) in [(&agent, "airlock-agent"), (&server, "airlock-server")] {
        let control = info(deb, "control");
        assert!(control.contains(&format!("Package: {name}\n")), "{control}");
        let depends = control
            .lines()
            .find_map(|l| l.strip_prefix("Depends: "))
            .unwrap_or_else(|| panic!("{name} has no Depends: {control}"));
        assert!(
            depends.contains("libc6") && depends.contains("systemd"),
            "{depends}"
        );
        // Enabled at install, never started by the debhelper part; a running one is restarted
        // on upgrade, and stopped only on removal.
        let postinst = info(deb, "postinst");
        let unit = format!("{name}.service");
        assert!(
            postinst.contains(&format!("deb-systemd-helper enable {unit}")),
            "{postinst}"
        );
        assert!(
            postinst.contains(&format!("deb-systemd-invoke try-restart {unit}")),
            "{postinst}"
        );
        let prerm = info(deb, "prerm");
        assert!(
            prerm.contains(&format!(
                "[ \"$1\" = remove ]; then\n\tdeb-systemd-invoke stop {unit}"
            )),
            "{prerm}"
        );
        let postrm = info(deb, "postrm");
        assert!(postrm.contains("\"$1\" = \"purge\""), "{postrm}");
        for script in [&postinst, &prerm, &postrm] {
            assert!(
                !script.contains("#DEBHELPER#"),
                "unexpanded token: {script}"
            );
        }
    }
    let postinst = info(&agent, "postinst");
    assert!(
        postinst.contains("/usr/bin/airlock-agent --preflight"),
        "{postinst}"
    );
    assert!(
        postinst.contains("if credential_present; then"),
        "{postinst}"
    );
    let prerm = info(&agent, "prerm");
    assert!(
        prerm.contains("/usr/bin/airlock-agent --uninstall"),
        "{prerm}"
    );
    let postrm = info(&agent, "postrm");
    assert!(postrm.contains("rm -rf /var/lib/airlock-agent"), "{postrm}");
}

#[test]
fn packaged_units_verify_pages_render_and_agent_checks_example_config() {
    let (agent, server) = build_packages();
    let root = tempfile::tempdir().unwrap();
    for deb in [&agent, &server] {
        run(Command::new("dpkg-deb").arg("-x").arg(deb).arg(root.path()));
    }
    let units = tempfile::tempdir().unwrap();
    for (unit, bin) in [
        ("airlock-agent.service", "airlock-agent"),
        ("airlock-server.service", "airlock-server"),
    ] {
        let text =
            std::fs::read_to_string(root.path().join("usr/lib/systemd/system").join(unit)).unwrap();
        let installed = format!("ExecStart=/usr/bin/{bin} ");
        assert!(
            text.contains(&installed),
            "{unit} does not run /usr/bin/{bin}:\n{text}"
        );
        // systemd-analyze checks that ExecStart exists: point it at the unpacked binary.
        let unpacked = root.path().join("usr/bin").join(bin);
        std::fs::write(
            units.path().join(unit),
            text.replace(&installed, &format!("ExecStart={} ", unpacked.display())),
        )
        .unwrap();
    }
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(units.path().join("airlock-agent.service"))
        .arg(units.path().join("airlock-server.service"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stderr.trim().is_empty(),
        "systemd-analyze verify: {stderr}"
    );

    let man = root.path().join("usr/share/man/man1");
    let mut pages = 0;
    for entry in std::fs::read_dir(&man).unwrap() {
        let page = entry.unwrap().path();
        let out = Command::new("man")
            .args(["--warnings=all", "-E", "UTF-8", "-P", "cat", "-l"])
            .arg(&page)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success() && stderr.trim().is_empty() && !out.stdout.is_empty(),
            "man -l {}: {stderr}",
            page.display()
        );
        pages += 1;
    }
    assert!(pages >= 3, "only {pages} man pages");

    // The unit's command line, from the unpacked files, on the packaged example.
    let out = run(Command::new(root.path().join("usr/bin/airlock-agent"))
        .arg("--config")
        .arg(root.path().join("etc/airlock/agent.toml"))
        .arg("--check"));
    assert!(out.contains("agent.toml: ok (2 rules)"), "{out}");
    let out = run(Command::new(root.path().join("usr/bin/airlockctl"))
        .args(["policy", "validate"])
        .arg(root.path().join("etc/airlock/policy.toml")));
    assert!(out.contains("policy.toml: ok"), "{out}");
}
