//! `airlock-demo`: boots the QEMU guest with `airlock-agent` and an AI-agent account that tries
//! privileged actions at a slow pace, against an `airlock-server` already listening on the host.
//! The guest's console streams to stdout, prefixed `guest| `. Run through `scripts/demo.sh`.

use std::time::Duration;

use airlock_tests::{vm::Guest, workspace_bin};
use anyhow::Result;
use clap::Parser;

/// Boots the demo guest.
#[derive(Debug, Parser)]
struct Args {
    /// Port of airlock-server's gRPC listener on the host (the guest reaches it at 10.0.2.2).
    #[arg(long, default_value_t = 7443)]
    server_port: u16,
    /// Rounds of actions before the guest powers off.
    #[arg(long, default_value_t = 3)]
    rounds: u32,
    /// File with the guest agent's credential (`airlock-server tokens create --scope agent
    /// --name demo-guest`).
    #[arg(long)]
    agent_token_file: std::path::PathBuf,
}

const CONFIG: &str = r#"
[agent]
decider = "http://10.0.2.2:PORT"
host_id = "demo-guest"
token_file = "/etc/airlock/agent.token"
hold_timeout_secs = 90
labels = { env = "demo" }

[watch]
users = ["agent"]

[[rule]]
name = "kubectl-destructive"
description = "Deletes or drains cluster resources"
exec = ["/usr/local/bin/kubectl"]
args = ["delete *", "drain *"]
decision = "ask"
risk = "high"

[[rule]]
name = "terraform-apply"
description = "Changes infrastructure"
exec = ["/usr/local/bin/terraform"]
args = ["apply *", "destroy *"]
decision = "ask"
risk = "high"

[[rule]]
name = "database-dump"
description = "Bulk export of the customer database"
exec = ["/usr/local/bin/pg_dump"]
decision = "deny"
risk = "critical"

[[rule]]
name = "prod-db"
description = "Connection to the production database"
connect = ["127.0.0.2/32"]
ports = [5432]
decision = "ask"
risk = "medium"
"#;

fn script(rounds: u32) -> String {
    format!(
        r#"
/usr/bin/airlock-workload serve 5432 > /dev/null &
AIRLOCK_LOG=airlock_agent::holds=info,airlock_agent::decider=info,warn /usr/bin/airlock-agent --config /etc/airlock/agent.toml > /tmp/agent.log 2>&1 &
tail -f /tmp/agent.log &
# The agent connects once its programs are in place: act only then (loading takes a few
# seconds under emulation).
for i in $(seq 1 300); do grep -q "connected to decider" /tmp/agent.log && break; sleep 0.2; done
act() {{
  echo ">>> AI agent runs: $*"
  out=$(su agent -c "$*" 2>&1); rc=$?
  echo "$out" | sed 's/^/    /'
  if [ $rc = 137 ]; then echo "<<< killed: denied"; else echo "<<< exit status $rc"; fi
  sleep 4
}}
for round in $(seq 1 {rounds}); do
  act kubectl get pods
  act kubectl delete namespace payments
  act terraform apply -auto-approve
  act pg_dump customers
  act /usr/bin/airlock-workload connect tcp 127.0.0.2 5432
done
echo "demo finished"
"#
    )
}

fn main() -> Result<()> {
    let args = Args::parse();
    let workload = workspace_bin("airlock-tests", "airlock-workload")?;
    let mut g = Guest::new();
    g.echo_prefix = Some("guest| ".into());
    g.airlock(
        &workload,
        CONFIG.replace("PORT", &args.server_port.to_string()),
    )?
    .file("/usr/local/bin/terraform", &workload, 0o755)
    .file("/usr/local/bin/pg_dump", &workload, 0o755)
    .file("/etc/airlock/agent.token", &args.agent_token_file, 0o600)
    .script(script(args.rounds));
    println!("booting the demo guest (Debian's kernel under QEMU, about 10 s)...");
    g.boot(Duration::from_secs(3600))?;
    Ok(())
}
