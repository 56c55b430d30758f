//! `airlock-agent`: the Airlock node agent.

use std::path::PathBuf;

use airlock_agent::{
    agent,
    config::{Config, FailMode},
};
use anyhow::{Context, Result};
use clap::{Parser, Subcommand, ValueEnum};

/// Holds the privileged exec and connect calls of AI-agent and automation accounts in the
/// kernel (BPF LSM) until a human decides, then resumes or kills them.
///
/// Needs root on a kernel with BPF LSM active (`bpf` in /sys/kernel/security/lsm) and BTF.
#[derive(Debug, Parser)]
#[command(
    name = "airlock-agent",
    version,
    after_help = "Rule tester: airlock-agent --explain --exec \"kubectl -n prod delete ns x\" --account ci\n\
                  tells which rule of --config (and of the rules cached from the control plane) \
                  matches the action and what it decides, with no kernel and nothing loaded.\n\
                  Exit status of --explain: 0 allowed (no rule holds it, or an allow rule), \
                  10 held and asked (ask), 11 denied; 1 the configuration is invalid (file, \
                  line and column are printed), 2 usage (a bad flag, command line or address)."
)]
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
    /// or restart keeps holds and marks for the next agent.) Where the programs can no longer be
    /// loaded (kernel lockdown raised since, say), every held task is killed and the pins are
    /// removed without them.
    #[arg(long, conflicts_with = "check")]
    uninstall: bool,
    /// Check that this host can run the agent (root, BPF LSM among the active LSMs, kernel
    /// lockdown below confidentiality, kernel BTF), print what to change if it cannot, and exit: 0 when it can, 1 when it cannot.
    /// Loads nothing and reads no configuration; the package runs it after installing.
    #[arg(long, conflicts_with_all = ["check", "uninstall"])]
    preflight: bool,
    /// Test what the rules decide for one action (--exec or --connect) and exit: which rule
    /// matches, its decision, and for ask the deadline and on_timeout. Needs no kernel, root
    /// or running agent; reads --config and the rules cached from the control plane
    /// (agent.rules_cache). Exit status: 0 allowed, 10 asked, 11 denied.
    #[arg(long, requires = "action", conflicts_with_all = ["check", "uninstall", "preflight"], help_heading = "Rule tester")]
    explain: bool,
    /// With --explain: a command line, split as a shell splits it; the first word is the
    /// program (a path, or a name looked up in PATH and else among the rules' binaries).
    #[arg(
        long,
        value_name = "COMMAND LINE",
        group = "action",
        requires = "explain",
        help_heading = "Rule tester"
    )]
    exec: Option<String>,
    /// With --explain: a destination, ADDRESS:PORT (IPv6 as [ADDRESS]:PORT).
    #[arg(
        long,
        value_name = "ADDRESS:PORT",
        group = "action",
        requires = "explain",
        help_heading = "Rule tester"
    )]
    connect: Option<String>,
    /// With --connect: the transport.
    #[arg(long, value_enum, default_value_t = ProtocolArg::Tcp, requires = "connect", help_heading = "Rule tester")]
    protocol: ProtocolArg,
    /// With --explain: the watched account that acts (rules with `accounts` apply only to
    /// theirs); without it, an account no rule lists.
    #[arg(
        long,
        value_name = "NAME",
        requires = "explain",
        help_heading = "Rule tester"
    )]
    account: Option<String>,
    /// With --explain: a host label, over agent.labels (shown; the control plane picks its
    /// rules and approvers by them). Repeatable.
    #[arg(long = "label", value_name = "KEY=VALUE", value_parser = parse_label, requires = "explain", help_heading = "Rule tester")]
    labels: Vec<(String, String)>,
    /// With --exec: test the program as a file the account could have made (a copy, a
    /// download, a build of its own), as `@self-made` rules see it.
    #[arg(long, requires = "exec", help_heading = "Rule tester")]
    self_made: bool,
    /// With --explain: print JSON, for scripts.
    #[arg(long, requires = "explain", help_heading = "Rule tester")]
    json: bool,
    /// Write man pages and bash/zsh/fish completions under DIR and exit (packaging).
    #[arg(long, value_name = "DIR", hide = true)]
    write_docs: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Sub>,
}

#[derive(Debug, Subcommand)]
enum Sub {
    /// Serve MCP on stdin/stdout for an AI agent on this host (Claude Code, Cursor, Copilot):
    /// tools airlock_check (would this be held?), airlock_request (ask ahead, with a
    /// justification), airlock_status (a request's state; can wait) and airlock_why (recent
    /// decisions and reasons). Runs as the AI agent's own account, needs no root and no
    /// configuration: it talks to the running agent's local socket, which knows the caller's
    /// account from the connection. Add it to Claude Code with
    /// `claude mcp add airlock -- airlock-agent mcp`.
    Mcp {
        /// The running agent's local socket (agent.local_socket).
        #[arg(long, value_name = "PATH", default_value = airlock_agent::local_api::DEFAULT_SOCKET, env = "AIRLOCK_AGENT_SOCKET")]
        socket: PathBuf,
    },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum FailModeArg {
    /// Kill held execs and refuse held connects.
    Deny,
    /// Resume held tasks (break-glass only).
    Allow,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum ProtocolArg {
    /// Stream sockets.
    Tcp,
    /// Datagram sockets.
    Udp,
}

fn parse_label(text: &str) -> Result<(String, String), String> {
    airlock_agent::explain::parse_label(text)
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

/// `--explain`: the rule tester. Returns the exit status; an invalid configuration is an error
/// (exit 1), a bad action is exit 2.
fn explain(cli: &Cli) -> Result<u8> {
    use airlock_agent::{
        explain::{exit_code, merge_labels, Query, Tester, Transport},
        policy::Decision,
        server_rules,
    };
    let config = load(cli)?;
    // What the agent enforces: its own rules, then those the control plane sent, as cached.
    let cached = server_rules::load_cache(&config.agent.rules_cache);
    let rules = server_rules::merge(&config.rules, &cached).map_err(anyhow::Error::msg)?;
    let query = match (&cli.exec, &cli.connect) {
        (Some(line), _) => Query::Exec {
            line: line.clone(),
            self_made: cli.self_made,
        },
        (None, Some(dest)) => Query::Connect {
            destination: dest.clone(),
            protocol: match cli.protocol {
                ProtocolArg::Tcp => Transport::Tcp,
                ProtocolArg::Udp => Transport::Udp,
            },
        },
        // clap requires one of the two.
        (None, None) => return Ok(2),
    };
    let action = match query.resolve(&rules) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("airlock-agent: {e}");
            return Ok(2);
        }
    };
    let mut tester = Tester::new(&rules, &cli.config, &config.agent)?;
    let mut explained = tester.explain(&action, cli.account.as_deref());
    if !cached.is_empty() {
        explained.notes.push(format!(
            "{} of the rules tried came from the control plane (cached in {})",
            rules.len() - config.rules.len(),
            config.agent.rules_cache.display()
        ));
    }
    if explained.decision == Decision::Ask {
        explained.notes.push(
            "who may approve, and how many must, is the control plane's approval policy: \
             airlockctl policy test --policy policy.toml --rules agent.toml tells"
                .into(),
        );
    }
    let labels = merge_labels(&config.agent.labels, &cli.labels);
    if cli.json {
        #[derive(serde::Serialize)]
        struct Out<'a> {
            config: &'a std::path::Path,
            labels: &'a std::collections::BTreeMap<String, String>,
            #[serde(flatten)]
            explained: &'a airlock_agent::explain::Explanation,
        }
        let out = Out {
            config: &cli.config,
            labels: &labels,
            explained: &explained,
        };
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        println!(
            "rules:     {} ({} rules)",
            cli.config.display(),
            rules.len()
        );
        if !labels.is_empty() {
            let shown: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
            println!("labels:    {}", shown.join(", "));
        }
        print!("{explained}");
    }
    Ok(exit_code(explained.decision))
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    if let Some(dir) = &cli.write_docs {
        use clap::CommandFactory;
        airlock_cli_docs::write(Cli::command(), dir)?;
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
    if let Some(Sub::Mcp { socket }) = &cli.command {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("starting the async runtime")?;
        return runtime.block_on(airlock_agent::mcp::serve(socket.clone()));
    }
    if cli.explain {
        let code = explain(&cli)?;
        std::process::exit(code.into());
    }
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
