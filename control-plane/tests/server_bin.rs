//! The `airlock-server` binary as an operator runs it: first start prints its addresses, data
//! location and a one-time admin token; a policy file edited in place is reloaded, and a bad
//! edit is refused while the running policy stays.

use std::{
    io::{BufRead, BufReader},
    process::{Command, Stdio},
    time::Duration,
};

use airlock_proto::v1::{policy_service_client::PolicyServiceClient, GetPolicyRequest};

#[tokio::test]
async fn first_start_prints_what_matters_and_policy_file_changes_reload() {
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("policy.toml");
    std::fs::write(&policy, "[groups]\noncall = [\"alice\"]\n").unwrap();
    let mut server = Command::new(env!("CARGO_BIN_EXE_airlock-server"))
        .args([
            "--grpc",
            "127.0.0.1:0",
            "--http",
            "127.0.0.1:0",
            "--data-dir",
        ])
        .arg(dir.path())
        .arg("--policy")
        .arg(&policy)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(server.stdout.take().unwrap()).lines();
    let mut printed = Vec::new();
    while printed.len() < 4 {
        printed.push(lines.next().unwrap().unwrap());
    }
    let text = printed.join("\n");
    let token = text
        .split_whitespace()
        .find(|w| w.starts_with("alk_"))
        .unwrap_or_else(|| panic!("no admin token in {text}"))
        .to_owned();
    let url = text
        .split_whitespace()
        .find(|w| w.starts_with("http://127.0.0.1:"))
        .unwrap_or_else(|| panic!("no address in {text}"))
        .to_owned();
    assert!(
        text.contains(&dir.path().join("airlock.db").display().to_string()),
        "{text}"
    );

    let ch = tonic::transport::Channel::from_shared(url)
        .unwrap()
        .connect()
        .await
        .unwrap();
    let bearer: tonic::metadata::MetadataValue<_> = format!("Bearer {token}").parse().unwrap();
    let mut client = PolicyServiceClient::with_interceptor(ch, move |mut r: tonic::Request<()>| {
        r.metadata_mut().insert("authorization", bearer.clone());
        Ok(r)
    });
    let status = client.get(GetPolicyRequest {}).await.unwrap().into_inner();
    assert!(status.source.contains("oncall"));

    // A bad edit: refused, visible through the API, the old policy stays.
    std::fs::write(&policy, "[[rule]]\nname = \"x\"\ngroups = [\"ghosts\"]\n").unwrap();
    let mut refused = None;
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let s = client.get(GetPolicyRequest {}).await.unwrap().into_inner();
        if !s.last_error.is_empty() {
            refused = Some(s);
            break;
        }
    }
    let refused = refused.expect("the bad edit was noticed");
    assert!(
        refused.last_error.contains("unknown group \"ghosts\""),
        "{}",
        refused.last_error
    );
    assert!(
        refused.source.contains("oncall"),
        "the running policy stays"
    );

    // A good edit: in force.
    std::fs::write(&policy, "[groups]\ndba = [\"carol\"]\n").unwrap();
    let mut reloaded = false;
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let s = client.get(GetPolicyRequest {}).await.unwrap().into_inner();
        if s.source.contains("dba") {
            reloaded = true;
            break;
        }
    }
    assert!(reloaded);
    let _ = server.kill();
    let _ = server.wait();

    // A second start does not mint another admin token.
    let second = Command::new(env!("CARGO_BIN_EXE_airlock-server"))
        .args(["--data-dir"])
        .arg(dir.path())
        .args(["tokens", "create", "--name", "alice", "--scope", "approve"])
        .output()
        .unwrap();
    assert!(second.status.success());
    assert!(!String::from_utf8_lossy(&second.stdout).contains("admin token"));
}
