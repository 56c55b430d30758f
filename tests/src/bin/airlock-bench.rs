//! `airlock-bench`: measures, in one boot of the QEMU guest per kernel, what the agent costs.
//!
//! - each kernel program's run time per call (`kernel.bpf_stats_enabled`, which the agent keeps
//!   on, read from its `/metrics`), while a watched account runs non-matching execs, connects
//!   and datagram sends;
//! - those operations' time without and with the agent loaded, and the overhead as a ratio: from
//!   the programs' own run time per operation (steady under emulation) and from wall time;
//! - the hold-to-resume round trip of an exec allowed by a local rule and of one allowed by the
//!   decider (a gRPC server in this process, reached over the guest network).
//!
//! Writes a Markdown report (machine, guest kernels, figures) to `--out`.

use std::{collections::BTreeMap, fmt::Write as _, path::PathBuf, time::Duration};

use airlock_proto::v1::action_request::Action;
use airlock_tests::{
    decider::{Plan, TestDecider},
    vm::{self, Guest},
    workspace_bin,
};
use anyhow::{Context, Result};
use clap::Parser;

/// Benchmarks the Airlock agent in QEMU guests running Debian's kernels.
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
    /// Kernel series to run on (default: AIRLOCK_KERNELS, else 6.1, 6.12 and sid).
    #[arg(long, value_delimiter = ',')]
    kernels: Vec<String>,
}

const CONFIG: &str = r#"
[agent]
decider = "http://10.0.2.2:PORT"
metrics_addr = "127.0.0.1:9464"

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

/// The non-matching operations: (key, workload arguments, description, iterations as a
/// multiple of `--iterations`: the short ones run more often, so each round is long enough to
/// time).
const OPS: [(&str, &str, &str, u32); 4] = [
    (
        "exec",
        "bench-exec {n} $W run /dev/null 0",
        "exec (fork + exec + wait)",
        1,
    ),
    (
        "connect",
        "bench-connect {n} 127.0.0.1 5432",
        "TCP connect to an unwatched destination",
        5,
    ),
    (
        "send",
        "bench-send {n} 127.0.0.1 5433",
        "UDP sendto to an unwatched destination",
        25,
    ),
    (
        "send_connected",
        "bench-send-connected {n} 127.0.0.1 5433",
        "UDP send on a connected socket (no address: the hook's floor)",
        25,
    ),
];

/// The workload arguments of an operation's warm-up and of its measured run, for
/// `--iterations` `n` and the operation's multiple `mult`.
fn op_runs(args: &str, n: u32, mult: u32) -> (String, String) {
    let times = |k: u32| args.replace("{n}", &k.to_string());
    (times(warm_up(n * mult)), times(n * mult))
}

/// Untimed runs before each measured one: the emulator translates code the first time it runs
/// (the kernel's paths, and each newly loaded program's JIT output), a one-time cost that
/// hardware does not have and that would otherwise be counted as per-call time.
fn warm_up(n: u32) -> u32 {
    (n / 4).max(10)
}

fn script(n: u32, holds: u32) -> String {
    let mut s = format!(
        r#"
/usr/bin/airlock-workload serve 5432 > /dev/null &
sleep 1
W=/usr/bin/airlock-workload
as_agent() {{ su agent -c "$*"; }}
stats() {{ wget -qO- http://127.0.0.1:9464/metrics | grep '^airlock_agent_program_run' | tr '\n' ' '; }}
# Warm-up: page cache, dynamic loader, first-run costs.
as_agent $W bench-exec 30 $W run /dev/null 0 > /dev/null
for r in $(seq 1 {ROUNDS}); do
"#
    );
    for (key, args, _, mult) in OPS {
        let (warm, args) = op_runs(args, n, mult);
        let _ = writeln!(s, "  as_agent $W {warm} > /dev/null");
        let _ = writeln!(s, "  echo \"@@R without_{key}_$r $(as_agent $W {args})\"");
    }
    s.push_str(
        r#"  /usr/bin/airlock-agent --config /etc/airlock/agent.toml > /tmp/agent.log 2>&1 &
  for i in $(seq 1 300); do grep -q "airlock-agent running" /tmp/agent.log && grep -q "connected to decider" /tmp/agent.log && break; sleep 0.2; done
"#,
    );
    for (key, args, _, mult) in OPS {
        let (warm, args) = op_runs(args, n, mult);
        let _ = writeln!(s, "  as_agent $W {warm} > /dev/null");
        let _ = writeln!(s, "  echo \"@@R stats_before_{key}_$r $(stats)\"");
        let _ = writeln!(s, "  echo \"@@R with_{key}_$r $(as_agent $W {args})\"");
        let _ = writeln!(s, "  echo \"@@R stats_after_{key}_$r $(stats)\"");
    }
    let _ = write!(
        s,
        r#"  echo "@@R baseline_same_binary_$r $(as_agent $W bench-exec {holds} $W run /dev/null 0)"
  echo "@@R hold_local_$r $(as_agent $W bench-exec {holds} /usr/local/bin/okctl run /dev/null 0)"
  echo "@@R hold_decider_$r $(as_agent $W bench-exec {holds} /usr/local/bin/kubectl run /dev/null 0)"
  echo "@@R stats_total_$r $(stats)"
  /usr/bin/airlock-agent --config /etc/airlock/agent.toml --uninstall > /dev/null 2>&1
  kill -TERM $(pidof airlock-agent); while pidof airlock-agent > /dev/null; do sleep 0.2; done
  echo "@@R counters_$r $(grep -h 'kernel counters' /tmp/agent.log | sed 's/.*counters=//')"
done
"#
    );
    s
}

/// Median over the rounds of `key`, and the per-round values.
fn median(results: &BTreeMap<String, String>, key: &str) -> Result<(f64, Vec<f64>)> {
    let values = (1..=ROUNDS)
        .map(|r| us(results, &format!("{key}_{r}")))
        .collect::<Result<Vec<_>>>()?;
    Ok((median_of(&values), values))
}

fn median_of(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted.get(sorted.len() / 2).copied().unwrap_or(f64::NAN)
}

fn fmt_rounds(v: &[f64]) -> String {
    v.iter()
        .map(|x| format!("{x:.1}"))
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

/// Program name to (runs, seconds) from a scrape of the agent's program metrics.
fn programs(line: &str) -> BTreeMap<String, (f64, f64)> {
    let mut out: BTreeMap<String, (f64, f64)> = BTreeMap::new();
    let mut words = line.split_whitespace();
    while let (Some(metric), Some(value)) = (words.next(), words.next()) {
        let Some((name, rest)) = metric.split_once("{program=\"") else {
            continue;
        };
        let program = rest.trim_end_matches("\"}").to_owned();
        let value: f64 = value.parse().unwrap_or(0.0);
        let entry = out.entry(program).or_default();
        if name.ends_with("program_runs_total") {
            entry.0 = value;
        } else if name.ends_with("program_run_seconds_total") {
            entry.1 = value;
        }
    }
    out
}

/// Each program's runs and seconds between two scrapes.
fn program_delta(before: &str, after: &str) -> BTreeMap<String, (f64, f64)> {
    let before = programs(before);
    programs(after)
        .into_iter()
        .map(|(p, (runs, secs))| {
            let (b_runs, b_secs) = before.get(&p).copied().unwrap_or_default();
            (p, (runs - b_runs, secs - b_secs))
        })
        .collect()
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

/// The report section of one kernel.
fn measure(kernel: &str, args: &Args) -> Result<String> {
    let rt = tokio::runtime::Runtime::new()?;
    let decider = rt.block_on(TestDecider::start("127.0.0.1:0", |r| match &r.action {
        Some(Action::Exec(_)) | Some(Action::Connect(_)) => Plan::Allow,
        None => Plan::Deny,
    }))?;
    let agent = workspace_bin("agent-user", "airlock-agent")?;
    let workload = workspace_bin("airlock-tests", "airlock-workload")?;
    let release = vm::Kernel::find(kernel)?.release;
    let mut g = Guest::on(kernel);
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
    eprintln!("booting the guest on {kernel} (software emulation; a few minutes)...");
    let run = g.boot(Duration::from_secs(1800))?;
    // Kept for a failed or surprising run to be read.
    let console_log = vm::workspace_root().join(format!("target/tmp/bench-console-{kernel}.log"));
    if let Some(dir) = console_log.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&console_log, &run.console)?;
    let r = run.results();
    let mut s = format!("## Kernel {kernel} ({release})\n\n");
    s.push_str(
        "### Non-matching actions of a watched account\n\n\
         | operation | without agent (µs) | with agent (µs) | wall ratio | programs per op (ns) | program ratio |\n\
         |---|---:|---:|---:|---:|---:|\n",
    );
    // Each program's runs and run time in the measured windows only (warm, no holds).
    let mut measured: BTreeMap<String, (f64, f64)> = BTreeMap::new();
    for (key, _, what, mult) in OPS {
        let n = args.iterations * mult;
        let (without, w) = median(&r, &format!("without_{key}"))?;
        let (with, wi) = median(&r, &format!("with_{key}"))?;
        let per_op: Vec<f64> = (1..=ROUNDS)
            .map(|round| {
                let get = |k: String| r.get(&k).cloned().unwrap_or_default();
                let delta = program_delta(
                    &get(format!("stats_before_{key}_{round}")),
                    &get(format!("stats_after_{key}_{round}")),
                );
                let mut secs = 0.0;
                for (p, (runs, s)) in delta {
                    let e = measured.entry(p).or_default();
                    e.0 += runs;
                    e.1 += s;
                    secs += s;
                }
                // Nanoseconds the programs spent per operation.
                secs * 1e9 / f64::from(n.max(1))
            })
            .collect();
        let ns = median_of(&per_op);
        let _ = writeln!(
            s,
            "| {what}, {n} per round | {without:.1} [{w}] | {with:.1} [{wi}] | {wr:.3} | {ns:.0} | {pr:.5} |",
            w = fmt_rounds(&w),
            wi = fmt_rounds(&wi),
            wr = with / without,
            pr = 1.0 + ns / (without * 1000.0),
        );
    }
    s.push_str(
        "\n### Each program's run time per call\n\n\
         In the measured runs above (after their warm-up), and over the whole boot (warm-ups, the\n\
         holds below and the agent's own start included).\n\n\
         | program | calls, measured | ns per call, measured | calls, whole boot | ns per call, whole boot |\n\
         |---|---:|---:|---:|---:|\n",
    );
    let mut totals: BTreeMap<String, (f64, f64)> = BTreeMap::new();
    for round in 1..=ROUNDS {
        for (p, (runs, secs)) in programs(
            r.get(&format!("stats_total_{round}"))
                .map(String::as_str)
                .unwrap_or(""),
        ) {
            let e = totals.entry(p).or_default();
            e.0 += runs;
            e.1 += secs;
        }
    }
    let per_call = |runs: f64, secs: f64| {
        if runs > 0.0 {
            format!("{:.0}", secs * 1e9 / runs)
        } else {
            "-".into()
        }
    };
    for (p, (runs, secs)) in &totals {
        let (m_runs, m_secs) = measured.get(p).copied().unwrap_or_default();
        let _ = writeln!(
            s,
            "| `{p}` | {m_runs:.0} | {} | {runs:.0} | {} |",
            per_call(m_runs, m_secs),
            per_call(*runs, *secs),
        );
    }
    let (hold_local, hl) = median(&r, "hold_local")?;
    let (hold_decider, hd) = median(&r, "hold_decider")?;
    let (baseline, hb) = median(&r, "baseline_same_binary")?;
    let _ = write!(
        s,
        "\n### Hold-to-resume round trip (exec, {h} per round)\n\n\
         | case | µs per exec | added by the hold (µs) |\n\
         |---|---:|---:|\n\
         | same program, not held (baseline) | {baseline:.0} [{hb}] | 0 |\n\
         | held, allowed by a local rule | {hold_local:.0} [{hl}] | {d1:.0} |\n\
         | held, allowed by the decider over gRPC | {hold_decider:.0} [{hd}] | {d2:.0} |\n\n\
         The decider answered {asked} requests. Kernel counters of the last round: `{counters}`.\n\
         Guest wall time: {secs:.0} s.\n\n",
        h = args.holds,
        hb = fmt_rounds(&hb),
        hl = fmt_rounds(&hl),
        hd = fmt_rounds(&hd),
        d1 = hold_local - baseline,
        d2 = hold_decider - baseline,
        asked = decider.seen().len(),
        counters = r
            .get(&format!("counters_{ROUNDS}"))
            .map(String::as_str)
            .unwrap_or("n/a"),
        secs = run.elapsed.as_secs_f64(),
    );
    Ok(s)
}

/// What the report says of how the guests ran.
fn guests_line(accel: vm::Accel) -> String {
    let how = accel.describe();
    match accel {
        vm::Accel::Tcg => format!(
            "{how}, 2 vCPUs). Absolute times\n  \
             are many times slower than on hardware (a BPF map lookup that takes tens of ns on\n  \
             hardware takes hundreds here) and wall times are noisy. Ratios carry over better,\n  \
             but not for the shortest operations, where the emulated entry into a program weighs\n  \
             more than on hardware (see the floor)."
        ),
        vm::Accel::Kvm => format!("{how}, 2 vCPUs, `-cpu host`)."),
    }
}

fn main() -> Result<()> {
    let mut args = Args::parse();
    if args.kernels.is_empty() {
        args.kernels = vm::kernels();
    }
    let mut report = format!(
        "# Airlock agent benchmark\n\n\
         Run with `scripts/bench.sh` ({date}).\n\n\
         - Machine: {machine}\n\
         - Guests: Debian's kernels under {guests}\n\
         - Method: a watched account (`agent`) runs a small Rust program. Without and with the\n  \
           agent are measured alternately, {rounds} rounds per boot (the agent is started and\n  \
           uninstalled each round); each figure is the median of the rounds' means, the rounds'\n  \
           means follow in brackets. Each measured run follows an untimed warm-up of the same\n  \
           operation: the emulator translates code the first time it runs (each round's newly\n  \
           loaded programs too), a one-time cost that hardware does not have.\n\
         - \"Programs per op\" is the time the kernel programs spent per operation\n  \
           (`kernel.bpf_stats_enabled`, from the agent's `/metrics`), and \"program ratio\" is 1 +\n  \
           that time over the operation's time without the agent: the overhead without the\n  \
           wall clock's noise. Goals: at most 100 ns per call (on hardware), and a ratio of at\n  \
           most 1.005.\n\
         - The floor: every call of a hooked system call runs the hook's program, if only to\n  \
           leave at once. The connected UDP send (no address: the send program reads one field\n  \
           and returns) shows what that costs here, whatever the program does.\n\n",
        date = chrono_like_now(),
        machine = machine(),
        guests = guests_line(vm::Accel::from_env()?),
        rounds = ROUNDS,
    );
    // A kernel whose run fails is reported as such; the others' figures are kept.
    let mut failed = 0;
    for kernel in &args.kernels {
        match measure(kernel, &args) {
            Ok(section) => report.push_str(&section),
            Err(e) => {
                failed += 1;
                eprintln!("{kernel}: {e:#}");
                let _ = write!(
                    report,
                    "## Kernel {kernel}\n\nThe run failed: {e:#}. Its console is in \
                     `target/tmp/bench-console-{kernel}.log`.\n\n"
                );
            }
        }
    }
    if let Some(parent) = args.out.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(&args.out, &report)?;
    println!("{report}\nwritten to {}", args.out.display());
    if failed > 0 {
        anyhow::bail!("{failed} of {} kernels failed", args.kernels.len());
    }
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
