//! `airlockctl policy test` run as the real binary on the shipped example files and on files
//! made here: which agent rule matches, its decision, the approval route (approvers, quorum,
//! deadline), JSON for scripts, and exit codes (0 allow, 10 ask, 11 deny, 2 usage, 4 a file
//! is invalid, with file, line and column).

use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
};

fn deploy(file: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy")
        .join(file)
}

fn ctl(args: &[&str]) -> (i32, String, String) {
    let out: Output = Command::new(env!("CARGO_BIN_EXE_airlockctl"))
        .args(["policy", "test"])
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn path(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn an_agent_rule_that_asks_is_routed_to_its_approvers() {
    let (policy, agent) = (deploy("policy.toml"), deploy("agent.toml"));
    // The agent file's rule; its labels (env=prod) pick the policy's route.
    let (code, out, err) = ctl(&[
        "--policy",
        path(&policy),
        "--rules",
        path(&agent),
        "--connect",
        "10.20.3.4:5432",
        "--account",
        "ci",
    ]);
    assert_eq!(code, 10, "ask exits 10: {out}{err}");
    for want in [
        "rule:      prod-db (rule 2, risk medium)",
        "after 120 s: deny (on_timeout)",
        "from:      the agent's rules file",
        "route:     approval rule \"prod-db\"",
        "approvers: dba: carol@example.com",
        "approvers: oncall: alice@example.com, bob@example.com",
        "quorum:    1 approval(s); any deny is final",
        "labels:    env=prod, team=platform",
    ] {
        assert!(out.contains(want), "lacks {want:?}:\n{out}");
    }
}

#[test]
fn a_policy_rule_is_sent_by_label_and_json_says_who_approves() {
    let policy = deploy("policy.toml");
    let terraform = "/usr/local/bin/terraform apply -auto-approve";
    let (code, out, err) = ctl(&[
        "--policy",
        path(&policy),
        "--exec",
        terraform,
        "--account",
        "ci",
        "--label",
        "env=prod",
        "--json",
    ]);
    assert_eq!(code, 10, "{out}{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["decision"], "ask");
    assert_eq!(v["rule"]["name"], "terraform-apply");
    assert_eq!(v["source"], "policy");
    assert_eq!(v["deadline_secs"], 60, "the agent's default deadline");
    assert_eq!(v["on_timeout"], "deny");
    assert_eq!(v["approval"]["rule"], "terraform-apply");
    assert_eq!(v["approval"]["quorum"], 2);
    assert_eq!(v["approval"]["require_reason"], true);
    assert_eq!(
        v["approval"]["groups"][0]["members"],
        serde_json::json!(["alice@example.com", "bob@example.com"])
    );
    assert_eq!(v["labels"]["env"], "prod");

    // Hosts labelled otherwise do not get the rule: nothing holds it.
    let (code, out, _) = ctl(&[
        "--policy",
        path(&policy),
        "--exec",
        terraform,
        "--label",
        "env=staging",
    ]);
    assert_eq!(code, 0, "allow exits 0: {out}");
    assert!(out.contains("rule:      none matches in full"), "{out}");
    assert!(!out.contains("route:"), "nothing to approve: {out}");
}

#[test]
fn deny_exits_11() {
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("policy.toml");
    std::fs::write(
        &policy,
        "[[rule]]\nname = \"no-dump\"\nexec = [\"/usr/bin/pg_dump\"]\ndecision = \"deny\"\n",
    )
    .unwrap();
    let (code, out, err) = ctl(&[
        "--policy",
        path(&policy),
        "--exec",
        "/usr/bin/pg_dump customers",
    ]);
    assert_eq!(code, 11, "{out}{err}");
    assert!(
        out.contains("decision:  deny: held, then killed without asking"),
        "{out}"
    );
}

#[test]
fn bad_files_exit_4_with_where_and_bad_actions_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let policy = deploy("policy.toml");
    let bad_policy = dir.path().join("policy.toml");
    std::fs::write(&bad_policy, "[[rule]]\nname = \"x\"\nquorum = \"two\"\n").unwrap();
    let (code, _, err) = ctl(&["--policy", path(&bad_policy), "--connect", "10.0.0.1:1"]);
    assert_eq!(code, 4, "{err}");
    assert!(
        err.contains(&format!("{}:3:10:", bad_policy.display())),
        "{err}"
    );

    // An agent file whose example is wrong: refused at the example's line.
    let rules = dir.path().join("agent.toml");
    std::fs::write(
        &rules,
        "[[rule]]\nname = \"db\"\nconnect = [\"10.20.0.0/16\"]\ndecision = \"ask\"\n[[rule.example]]\nconnect = \"10.21.0.1:5432\"\nexpect = \"ask\"\n",
    )
    .unwrap();
    let (code, _, err) = ctl(&[
        "--policy",
        path(&policy),
        "--rules",
        path(&rules),
        "--connect",
        "10.0.0.1:1",
    ]);
    assert_eq!(code, 4, "{err}");
    assert!(
        err.contains(&format!("{}:6:11: example of rule \"db\"", rules.display())),
        "{err}"
    );
    assert!(err.contains("the file decides allow"), "{err}");

    for (args, want) in [
        (
            &["--connect", "db.invalid:5432"][..],
            "does not resolve on this host",
        ),
        (&["--exec", ""][..], "command line is empty"),
        (
            &["--exec", "x", "--connect", "10.0.0.1:1"][..],
            "cannot be used with",
        ),
        (&[][..], "--exec"),
        (
            &["--connect", "10.0.0.1:1", "--label", "env"][..],
            "KEY=VALUE",
        ),
    ] {
        let mut all = vec!["--policy", path(&policy)];
        all.extend_from_slice(args);
        let (code, out, err) = ctl(&all);
        assert_eq!(code, 2, "{args:?}: {out}{err}");
        assert!(err.contains(want), "{args:?}: {err}");
    }
}

#[test]
fn policy_validate_checks_the_policys_examples() {
    let policy = deploy("policy.toml");
    let out = Command::new(env!("CARGO_BIN_EXE_airlockctl"))
        .args(["policy", "validate"])
        .arg(&policy)
        .output()
        .unwrap();
    assert!(out.status.success(), "the shipped examples hold: {out:?}");

    // The shipped file with its staging example turned wrong: refused at that example's line.
    let text = std::fs::read_to_string(&policy).unwrap();
    let staging = "exec = \"/usr/local/bin/terraform destroy\"\nlabels = { env = \"staging\" }\nexpect = \"allow\"";
    assert!(text.contains(staging), "the shipped example changed");
    let line = text[..text.find(staging).unwrap()].matches('\n').count() + 1;
    let dir = tempfile::tempdir().unwrap();
    let wrong = dir.path().join("policy.toml");
    std::fs::write(
        &wrong,
        text.replace(staging, &staging.replace("\"allow\"", "\"ask\"")),
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_airlockctl"))
        .args(["policy", "validate"])
        .arg(&wrong)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(4), "{err}");
    assert!(
        err.contains(&format!(
            "{}:{line}:8: example of rule \"terraform-apply\"",
            wrong.display()
        )),
        "{err}"
    );
    assert!(err.contains("on hosts labelled env=staging"), "{err}");
    // policy test refuses it the same way.
    let (code, _, err) = ctl(&["--policy", path(&wrong), "--connect", "10.0.0.1:1"]);
    assert_eq!(code, 4, "{err}");
    assert!(
        err.contains(&format!(":{line}:8: example of rule")),
        "{err}"
    );
}
