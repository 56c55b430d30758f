//! `airlock-bench`: measures, in one boot of the QEMU guest, what the agent costs.
//!
//! - non-matching exec and connect by a watched account, without and with the agent loaded
//!   (the overhead as a ratio);
//! - hold-to-resume round trip of an exec allowed by a local rule and of one allowed by the
//!   decider (a gRPC server in this process, reached over the guest network).
//!
//! Writes a Markdown report (machine, guest kernel, figures) to `--out`.

use std::{collections::BTreeMap, path::PathBuf, time::Duration};

use airlock_proto::v1::action_request::Action;
use airlock_tests::{
    decider::{Plan, TestDecider},
    vm::Guest,
    workspace_bin,
};
use anyhow::{Context, Result};
use clap::Parser;

/// Benchmarks the Airlock agent in a QEMU guest running Debian's kernel.
#[derive(Debug, Parser)]
struct Args {
    /// Where to write the report (Markdown).
    #[arg(long, default_value = "bench/results.md")]
    out: PathBuf,
    /// Iterations of each non-matching operation.
    #[arg(long, default_value_t = 300)]
    iterations: u32,
    /// Iterations of each held (round-trip) operation.
    #[arg(long, default_value_t = 30)]
    holds: u32,
}

const CONFIG: &str = r#"
[agent]
decider = "http://10.0.2.2:PORT"

[watch]
users = ["agent"]

[[rule]]
name = "local-allow"
exec = ["/usr/local/bin/okctl"]
decision = "allow"

[[rule]]
name = "ask"
exec = ["/usr/local/bin/kubectl"]
decision = "ask"

[[rule]]
name = "db"
connect = ["127.0.0.2/32"]
ports = [5432]
decision = "ask"
"#;

fn script(n: u32, holds: u32) -> String {
    format!(
        r#"
/usr/bin/airlock-workload serve 5432 > /dev/null &
sleep 1
W=/usr/bin/airlock-workload
measure() {{
  echo "@@R $1_exec $(su agent -c "$W bench-exec {n} $W run /dev/null 0")"
  echo "@@R $1_connect $(su agent -c "$W bench-connect {n} 127.0.0.1 5432")"
}}
measure without
/usr/bin/airlock-agent --config /etc/airlock/agent.toml > /tmp/agent.log 2>&1 &
for i in $(seq 1 150); do grep -q "connected to decider" /tmp/agent.log && break; sleep 0.2; done
measure with
echo "@@R hold_local $(su agent -c "$W bench-exec {holds} /usr/local/bin/okctl run /dev/null 0")"
echo "@@R hold_decider $(su agent -c "$W bench-exec {holds} /usr/local/bin/kubectl run /dev/null 0")"
echo "@@R baseline_same_binary $(su agent -c "$W bench-exec {holds} $W run /dev/null 0")"
kill -TERM $(pidof airlock-agent) 2>/dev/null; sleep 1
grep -h "kernel counters" /tmp/agent.log | sed 's/^/@@R counters /'
"#
    )
}

fn us(results: &BTreeMap<String, String>, key: &str) -> Result<f64> {
    let v = results
        .get(key)
        .with_context(|| format!("no result {key}"))?;
    if !v.contains("fails=0") {
        anyhow::bail!("{key}: some operations failed: {v}");
    }
    v.split_whitespace()
        .find_map(|w| w.strip_prefix("us_per_op="))
        .and_then(|x| x.parse().ok())
        .with_context(|| format!("{key}: no us_per_op in {v:?}"))
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let host_kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!("{cpu}, {cores} cores, host kernel {}", host_kernel.trim())
}

fn main() -> Result<()> {
    let args = Args::parse();
    let rt = tokio::runtime::Runtime::new()?;
    let decider = rt.block_on(TestDecider::start("127.0.0.1:0", |r| match &r.action {
        Some(Action::Exec(_)) | Some(Action::Connect(_)) => Plan::Allow,
        None => Plan::Deny,
    }))?;
    let agent = workspace_bin("agent-user", "airlock-agent")?;
    let workload = workspace_bin("airlock-tests", "airlock-workload")?;
    let mut g = Guest::new();
    g.file("/usr/bin/airlock-agent", &agent, 0o755)
        .file("/usr/bin/airlock-workload", &workload, 0o755)
        .file("/usr/local/bin/okctl", &workload, 0o755)
        .file("/usr/local/bin/kubectl", &workload, 0o755)
        .text(
            "/etc/airlock/agent.toml",
            CONFIG.replace("PORT", &decider.addr.port().to_string()),
            0o644,
        )
        .script(script(args.iterations, args.holds));
    eprintln!("booting the guest (software emulation; a few minutes)...");
    let run = g.boot(Duration::from_secs(1800))?;
    let r = run.results();
    let exec_without = us(&r, "without_exec")?;
    let exec_with = us(&r, "with_exec")?;
    let conn_without = us(&r, "without_connect")?;
    let conn_with = us(&r, "with_connect")?;
    let hold_local = us(&r, "hold_local")?;
    let hold_decider = us(&r, "hold_decider")?;
    let baseline = us(&r, "baseline_same_binary")?;
    let asked = decider.seen().len();
    let report = format!(
        "# Airlock agent benchmark\n\n\
         Run with `scripts/bench.sh` ({date}).\n\n\
         - Machine: {machine}\n\
         - Guest: Debian's kernel under QEMU TCG (software emulation, 2 vCPUs): absolute times are\n  \
           many times slower than on hardware; the ratios are what carries over.\n\
         - Workload: a watched account (`agent`) runs a small Rust program; every figure is the\n  \
           mean of sequential operations measured inside the guest.\n\n\
         ## Overhead on actions that do not match (prefilter only)\n\n\
         | operation | without agent (µs) | with agent (µs) | ratio |\n\
         |---|---:|---:|---:|\n\
         | exec (fork + exec + wait), {n} runs | {exec_without:.0} | {exec_with:.0} | {r1:.3} |\n\
         | TCP connect to an unwatched destination, {n} runs | {conn_without:.0} | {conn_with:.0} | {r2:.3} |\n\n\
         ## Hold-to-resume round trip (exec, {h} runs each)\n\n\
         | case | µs per exec | added by the hold (µs) |\n\
         |---|---:|---:|\n\
         | same program, not held (baseline) | {baseline:.0} | 0 |\n\
         | held, allowed by a local rule | {hold_local:.0} | {d1:.0} |\n\
         | held, allowed by the decider over gRPC | {hold_decider:.0} | {d2:.0} |\n\n\
         The decider answered {asked} requests. Kernel counters at the end: `{counters}`.\n\
         Guest wall time: {secs:.0} s.\n",
        date = chrono_like_now(),
        machine = machine(),
        n = args.iterations,
        h = args.holds,
        r1 = exec_with / exec_without,
        r2 = conn_with / conn_without,
        d1 = hold_local - baseline,
        d2 = hold_decider - baseline,
        counters = r.get("counters").map(String::as_str).unwrap_or("n/a"),
        secs = run.elapsed.as_secs_f64(),
    );
    if let Some(parent) = args.out.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(&args.out, &report)?;
    println!("{report}\nwritten to {}", args.out.display());
    Ok(())
}

/// UTC date and time, from `date` (no extra dependency for one line).
fn chrono_like_now() -> String {
    std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}
