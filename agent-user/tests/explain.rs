//! `airlock-agent --explain` and `--check` run as the real binary: the rule tester's answers
//! and exit status (0 allow, 10 ask, 11 deny, 1 an invalid file, 2 usage), and a file whose
//! `[[rule.example]]` is wrong refused with the example's line.

use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
};

fn deploy_example() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/agent.toml")
}

/// Runs `airlock-agent --config CONFIG ARGS...` with no rules cache from an earlier run.
fn agent(config: &Path, args: &[&str]) -> Output {
    let cache = tempfile::tempdir().unwrap();
    Command::new(env!("CARGO_BIN_EXE_airlock-agent"))
        .arg("--config")
        .arg(config)
        .args(args)
        .env("AIRLOCK_LOG", "warn")
        .current_dir(cache.path())
        .output()
        .unwrap()
}

fn text(out: &Output) -> (i32, String, String) {
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A config of `rules` with its rules cache in `dir` (none there), so no other rules count.
fn config_in(dir: &Path, rules: &str) -> PathBuf {
    let path = dir.join("agent.toml");
    let cache = dir.join("server-rules.toml");
    std::fs::write(
        &path,
        format!(
            "[agent]\nrules_cache = \"{}\"\nhold_timeout_secs = 45\n\n{rules}",
            cache.display()
        ),
    )
    .unwrap();
    path
}

#[test]
fn explain_answers_the_shipped_example_with_exit_codes_by_decision() {
    let file = deploy_example();
    let (code, out, err) = text(&agent(
        &file,
        &[
            "--explain",
            "--exec",
            "/bin/sh -n prod delete ns payments",
            "--account",
            "root",
        ],
    ));
    assert_eq!(code, 10, "ask exits 10: {out}{err}");
    assert!(
        out.contains("rule:      kubectl-destructive (rule 1, risk high)"),
        "{out}"
    );
    assert!(
        out.contains(
            "decision:  ask: held until approved or denied; after 300 s: deny (on_timeout)"
        ),
        "{out}"
    );
    assert!(out.contains("labels:    env=prod, team=platform"), "{out}");
    assert!(
        out.contains("approval policy: airlockctl policy test --policy"),
        "points at the control plane's tester: {out}"
    );

    let (code, out, _) = text(&agent(
        &file,
        &[
            "--explain",
            "--exec",
            "/bin/sh get pods",
            "--account",
            "root",
        ],
    ));
    assert_eq!(code, 0, "allow exits 0: {out}");
    assert!(out.contains("rule:      none matches in full"), "{out}");
    assert!(out.contains("resumes it at once"), "{out}");

    let (code, out, _) = text(&agent(&file, &["--explain", "--connect", "10.20.3.4:5432"]));
    assert_eq!(code, 10, "{out}");
    assert!(out.contains("rule:      prod-db"), "{out}");
    let (code, out, _) = text(&agent(
        &file,
        &[
            "--explain",
            "--connect",
            "10.20.3.4:5432",
            "--protocol",
            "udp",
        ],
    ));
    assert_eq!(code, 0, "the rule is tcp only: {out}");
}

#[test]
fn explain_denies_with_exit_11_and_prints_json_for_scripts() {
    let dir = tempfile::tempdir().unwrap();
    let config = config_in(
        dir.path(),
        "[[rule]]\nname = \"no-env\"\naccounts = [\"ci\"]\nexec = [\"/usr/bin/env\"]\ndecision = \"deny\"\n\n[[rule]]\nname = \"sh\"\nexec = [\"/bin/sh\"]\ndecision = \"ask\"\n",
    );
    let (code, out, err) = text(&agent(
        &config,
        &[
            "--explain",
            "--exec",
            "env FOO=1 true",
            "--account",
            "ci",
            "--json",
        ],
    ));
    assert_eq!(code, 11, "deny exits 11: {out}{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["decision"], "deny");
    assert_eq!(v["rule"]["name"], "no-env");
    assert_eq!(v["action"]["kind"], "exec");
    assert_eq!(v["action"]["args"], serde_json::json!(["FOO=1", "true"]));
    assert_eq!(v["account"], "ci");

    // Another account: the rule for ci does not apply.
    let (code, _, _) = text(&agent(
        &config,
        &[
            "--explain",
            "--exec",
            "env FOO=1 true",
            "--account",
            "claude",
        ],
    ));
    assert_eq!(code, 0);

    // The agent's default deadline when the rule sets none.
    let (code, out, _) = text(&agent(
        &config,
        &["--explain", "--exec", "/bin/sh", "--json"],
    ));
    assert_eq!(code, 10);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["deadline_secs"], 45);
    assert_eq!(v["on_timeout"], "deny");
}

#[test]
fn explain_usage_errors_exit_2_and_say_what() {
    let file = deploy_example();
    for (args, want) in [
        (
            &["--explain", "--exec", "/bin/sh 'unbalanced"][..],
            "cannot split",
        ),
        (
            &["--explain", "--connect", "db.invalid:5432"][..],
            "does not resolve on this host",
        ),
        (
            &["--explain", "--exec", "airlock-no-such-program x"][..],
            "is not in PATH here",
        ),
        (&["--explain"][..], "--exec"),
        (&["--exec", "/bin/sh"][..], "--explain"),
        (
            &["--explain", "--exec", "/bin/sh", "--connect", "10.0.0.1:1"][..],
            "cannot be used with",
        ),
        (
            &["--explain", "--exec", "/bin/sh", "--label", "prod"][..],
            "KEY=VALUE",
        ),
    ] {
        let (code, out, err) = text(&agent(&file, args));
        assert_eq!(code, 2, "{args:?}: {out}{err}");
        assert!(err.contains(want), "{args:?}: {err}");
    }
}

#[test]
fn a_failing_example_refuses_the_file_with_its_line() {
    let dir = tempfile::tempdir().unwrap();
    // Line 11 (config_in writes 4 lines first), column 8: the example's exec value.
    let config = config_in(
        dir.path(),
        "[[rule]]\nname = \"sh-delete\"\nexec = [\"/bin/sh\"]\nargs = [\"delete *\"]\ndecision = \"ask\"\n[[rule.example]]\nexec = \"/bin/sh get pods\"\nexpect = \"ask\"\n",
    );
    let where_ = format!("{}:11:8: example of rule \"sh-delete\"", config.display());
    let (code, out, err) = text(&agent(&config, &["--check"]));
    assert_eq!(code, 1, "{out}{err}");
    assert!(err.contains(&where_), "{err}");
    assert!(
        err.contains("expects ask for exec /bin/sh get pods, but the file decides allow"),
        "{err}"
    );
    let (code, _, err) = text(&agent(&config, &["--explain", "--exec", "/bin/sh"]));
    assert_eq!(code, 1, "the tester refuses the file too: {err}");
    assert!(err.contains(&where_), "{err}");

    // The shipped example's examples hold.
    let (code, out, err) = text(&agent(&deploy_example(), &["--check"]));
    assert_eq!(code, 0, "{out}{err}");
}
