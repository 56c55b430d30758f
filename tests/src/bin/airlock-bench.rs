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
    #[arg(long, default_value_t = 200)]
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

/// Rounds of alternating measurements; the report gives the median.
const ROUNDS: usize = 3;

fn script(n: u32, holds: u32) -> String {
    format!(
        r#"
/usr/bin/airlock-workload serve 5432 > /dev/null &
sleep 1
W=/usr/bin/airlock-workload
as_agent() {{ su agent -c "$*"; }}
# Warm-up: page cache, dynamic loader, first-run costs.
as_agent $W bench-exec 30 $W run /dev/null 0 > /dev/null
for r in $(seq 1 {ROUNDS}); do
  echo "@@R without_exec_$r $(as_agent $W bench-exec {n} $W run /dev/null 0)"
  echo "@@R without_connect_$r $(as_agent $W bench-connect {n} 127.0.0.1 5432)"
  /usr/bin/airlock-agent --config /etc/airlock/agent.toml > /tmp/agent.log 2>&1 &
  for i in $(seq 1 150); do grep -q "connected to decider" /tmp/agent.log && break; sleep 0.2; done
  echo "@@R with_exec_$r $(as_agent $W bench-exec {n} $W run /dev/null 0)"
  echo "@@R with_connect_$r $(as_agent $W bench-connect {n} 127.0.0.1 5432)"
  echo "@@R baseline_same_binary_$r $(as_agent $W bench-exec {holds} $W run /dev/null 0)"
  echo "@@R hold_local_$r $(as_agent $W bench-exec {holds} /usr/local/bin/okctl run /dev/null 0)"
  echo "@@R hold_decider_$r $(as_agent $W bench-exec {holds} /usr/local/bin/kubectl run /dev/null 0)"
  kill -TERM $(pidof airlock-agent); while pidof airlock-agent > /dev/null; do sleep 0.2; done
  echo "@@R counters_$r $(grep -h 'kernel counters' /tmp/agent.log | sed 's/.*counters=//')"
done
"#
    )
}

/// Median over the rounds of `key`, and the per-round values.
fn median(results: &BTreeMap<String, String>, key: &str) -> Result<(f64, Vec<f64>)> {
    let mut values = (1..=ROUNDS)
        .map(|r| us(results, &format!("{key}_{r}")))
        .collect::<Result<Vec<_>>>()?;
    let rounds = values.clone();
    values.sort_by(f64::total_cmp);
    Ok((values[values.len() / 2], rounds))
}

fn fmt_rounds(v: &[f64]) -> String {
    v.iter()
        .map(|x| format!("{x:.0}"))
        .collect::<Vec<_>>()
        .join(" / ")
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
    let (exec_without, ew) = median(&r, "without_exec")?;
    let (exec_with, ewi) = median(&r, "with_exec")?;
    let (conn_without, cw) = median(&r, "without_connect")?;
    let (conn_with, cwi) = median(&r, "with_connect")?;
    let (hold_local, hl) = median(&r, "hold_local")?;
    let (hold_decider, hd) = median(&r, "hold_decider")?;
    let (baseline, hb) = median(&r, "baseline_same_binary")?;
    let asked = decider.seen().len();
    let report = format!(
        "# Airlock agent benchmark\n\n\
         Run with `scripts/bench.sh` ({date}).\n\n\
         - Machine: {machine}\n\
         - Guest: Debian's kernel under QEMU TCG (software emulation, 2 vCPUs): absolute times are\n  \
           many times slower than on hardware, and noisy; the ratios are what carries over.\n\
         - Method: a watched account (`agent`) runs a small Rust program. Without and with the\n  \
           agent are measured alternately, {rounds} rounds in one boot (the agent is started and\n  \
           stopped each round); each figure is the median of the rounds' means, the rounds'\n  \
           means follow in brackets. Under emulation a difference smaller than the spread\n  \
           between rounds is noise, not a cost of the agent.\n\n\
         ## Overhead on actions that do not match (prefilter only)\n\n\
         | operation | without agent (µs) | with agent (µs) | ratio |\n\
         |---|---:|---:|---:|\n\
         | exec (fork + exec + wait), {n} per round | {exec_without:.0} [{ew}] | {exec_with:.0} [{ewi}] | {r1:.3} |\n\
         | TCP connect to an unwatched destination, {n} per round | {conn_without:.0} [{cw}] | {conn_with:.0} [{cwi}] | {r2:.3} |\n\n\
         ## Hold-to-resume round trip (exec, {h} per round)\n\n\
         | case | µs per exec | added by the hold (µs) |\n\
         |---|---:|---:|\n\
         | same program, not held (baseline) | {baseline:.0} [{hb}] | 0 |\n\
         | held, allowed by a local rule | {hold_local:.0} [{hl}] | {d1:.0} |\n\
         | held, allowed by the decider over gRPC | {hold_decider:.0} [{hd}] | {d2:.0} |\n\n\
         The decider answered {asked} requests. Kernel counters of the last round: `{counters}`.\n\
         Guest wall time: {secs:.0} s.\n",
        date = chrono_like_now(),
        machine = machine(),
        rounds = ROUNDS,
        n = args.iterations,
        h = args.holds,
        ew = fmt_rounds(&ew),
        ewi = fmt_rounds(&ewi),
        cw = fmt_rounds(&cw),
        cwi = fmt_rounds(&cwi),
        hb = fmt_rounds(&hb),
        hl = fmt_rounds(&hl),
        hd = fmt_rounds(&hd),
        r1 = exec_with / exec_without,
        r2 = conn_with / conn_without,
        d1 = hold_local - baseline,
        d2 = hold_decider - baseline,
        counters = r.get(&format!("counters_{ROUNDS}")).map(String::as_str).unwrap_or("n/a"),
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
