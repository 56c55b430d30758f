//! `airlock-agent`: the Airlock node agent.

use std::path::PathBuf;

use airlock_agent::{
    agent,
    config::{Config, FailMode},
};
use anyhow::{Context, Result};
use clap::{Parser, ValueEnum};

/// Holds the privileged exec and connect calls of AI-agent and automation accounts in the
/// kernel (BPF LSM) until a human decides, then resumes or kills them.
///
/// Needs root on a kernel with BPF LSM active (`bpf` in /sys/kernel/security/lsm) and BTF.
#[derive(Debug, Parser)]
#[command(name = "airlock-agent", version)]
struct Cli {
    /// Configuration file (TOML): [agent], [watch] and [[rule]] sections.
    #[arg(
        short,
        long,
        env = "AIRLOCK_AGENT_CONFIG",
        default_value = "/etc/airlock/agent.toml"
    )]
    config: PathBuf,
    /// Decider (control plane) gRPC address, e.g. http://airlock.internal:7443. Overrides
    /// agent.decider.
    #[arg(long, env = "AIRLOCK_DECIDER")]
    decider: Option<String>,
    /// Watch this account (name or uid) in addition to watch.users. Repeatable.
    #[arg(long = "watch-user", value_name = "ACCOUNT")]
    watch_users: Vec<String>,
    /// Default hold deadline in seconds (agent.hold_timeout_secs).
    #[arg(long, value_name = "SECS")]
    hold_timeout: Option<u64>,
    /// What applies when the decider is unreachable (agent.fail_mode).
    #[arg(long, value_enum)]
    fail_mode: Option<FailModeArg>,
    /// bpffs directory for pinned maps and links (agent.bpffs_dir).
    #[arg(long, value_name = "DIR")]
    bpffs_dir: Option<PathBuf>,
    /// Log format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, env = "AIRLOCK_LOG_FORMAT")]
    log_format: LogFormat,
    /// Check the configuration (and print the resolved rules) without loading anything.
    #[arg(long)]
    check: bool,
    /// Remove the agent from this host: deny every held task, detach the kernel programs and
    /// remove their pins under agent.bpffs_dir. Stop the agent's service first. (A plain stop
    /// or restart keeps holds and marks for the next agent.)
    #[arg(long, conflicts_with = "check")]
    uninstall: bool,
    /// Check that this host can run the agent (root, BPF LSM among the active LSMs, kernel
    /// BTF), print what to change if it cannot, and exit: 0 when it can, 1 when it cannot.
    /// Loads nothing and reads no configuration; the package runs it after installing.
    #[arg(long, conflicts_with_all = ["check", "uninstall"])]
    preflight: bool,
    /// Write man pages and bash/zsh/fish completions under DIR and exit (packaging).
    #[arg(long, value_name = "DIR", hide = true)]
    write_docs: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum FailModeArg {
    /// Kill held execs and refuse held connects.
    Deny,
    /// Resume held tasks (break-glass only).
    Allow,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

fn init_logs(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("AIRLOCK_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    if format == LogFormat::Json {
        builder.json().init();
    } else {
        builder.init();
    }
}

fn load(cli: &Cli) -> Result<Config> {
    let mut config = if cli.config.exists() || cli.check {
        Config::load(&cli.config)?
    } else {
        anyhow::bail!(
            "config file {} does not exist; pass --config FILE (see the README for an example)",
            cli.config.display()
        )
    };
    if let Some(d) = &cli.decider {
        config.agent.decider = Some(d.clone());
    }
    config.watch.users.extend(cli.watch_users.iter().cloned());
    if let Some(t) = cli.hold_timeout {
        config.agent.hold_timeout_secs = t;
    }
    if let Some(m) = cli.fail_mode {
        config.agent.fail_mode = match m {
            FailModeArg::Deny => FailMode::Deny,
            FailModeArg::Allow => FailMode::Allow,
        };
    }
    if let Some(d) = &cli.bpffs_dir {
        config.agent.bpffs_dir = d.clone();
    }
    Ok(config)
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    if let Some(dir) = &cli.write_docs {
        use clap::CommandFactory;
        airlock_agent::docs::write(Cli::command(), dir)?;
        return Ok(());
    }
    if cli.preflight {
        return match airlock_agent::bpf::preflight::check(std::path::Path::new("/sys")) {
            Ok(()) => {
                println!(
                    "airlock-agent: this host can run the agent (BPF LSM active, BTF present)"
                );
                Ok(())
            }
            Err(e) => {
                eprintln!("airlock-agent: this host cannot run the agent yet: {e}");
                std::process::exit(1)
            }
        };
    }
    init_logs(cli.log_format);
    let config = load(&cli)?;
    if cli.check {
        airlock_agent::policy::Policy::compile(&config.rules, &cli.config)?;
        airlock_agent::watch::resolve(&config.watch, std::path::Path::new("/sys/fs/cgroup"))?;
        println!(
            "{}: ok ({} rules)",
            cli.config.display(),
            config.rules.len()
        );
        return Ok(());
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    if cli.uninstall {
        return runtime.block_on(agent::uninstall(config));
    }
    runtime.block_on(agent::run(config, cli.config.clone()))
}
