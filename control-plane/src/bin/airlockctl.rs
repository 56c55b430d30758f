//! `airlockctl`: the Airlock command line for approvers and scripts.
//!
//! Exit codes: 0 success, 1 error (server unreachable, bad answer), 2 usage, 3 not found,
//! 4 refused (not allowed to decide, or no longer pending), 5 the audit trail was tampered with.
//! `policy test` answers with its own: 0 allowed, 10 held and asked, 11 denied (2 usage, 4 a
//! file is invalid).

use std::{
    io::{BufRead, Write},
    process::ExitCode,
};

use airlock_proto::v1::{
    agents_service_client::AgentsServiceClient, approval_service_client::ApprovalServiceClient,
    audit_service_client::AuditServiceClient, policy_service_client::PolicyServiceClient,
    tokens_service_client::TokensServiceClient, AuditExportRequest, AuditQuery, AuditVerifyRequest,
    CreateTokenRequest, DecideRequest, ExportFormat, GetPolicyRequest, GetRequestRequest,
    HeldRequest, ListAgentsRequest, ListRequestsRequest, RequestState, RevokeTokenRequest, Verdict,
    WatchRequestsRequest,
};
use clap::{Parser, Subcommand, ValueEnum};
use tonic::{
    metadata::MetadataValue, service::interceptor::InterceptedService, service::Interceptor,
    transport::Channel, Code,
};

/// Adds the bearer token to every call.
#[derive(Clone)]
struct Bearer(Option<MetadataValue<tonic::metadata::Ascii>>);

impl Interceptor for Bearer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

type Client = ApprovalServiceClient<InterceptedService<Channel, Bearer>>;

/// Watch and decide the actions Airlock holds.
#[derive(Debug, Parser)]
#[command(name = "airlockctl", version)]
struct Cli {
    /// Control plane gRPC address.
    #[arg(
        long,
        global = true,
        env = "AIRLOCK_SERVER",
        default_value = "http://127.0.0.1:7443"
    )]
    server: String,
    /// API token (read, approve or admin scope); see `airlock-server tokens create`.
    #[arg(long, global = true, env = "AIRLOCK_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Print JSON (one object per line) instead of tables, for scripts.
    #[arg(long, global = true)]
    json: bool,
    /// CA certificate (PEM) to trust for an https:// server.
    #[arg(long, global = true, env = "AIRLOCK_CA_FILE")]
    ca_file: Option<std::path::PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Held requests.
    #[command(subcommand)]
    Requests(Requests),
    /// The audit trail.
    #[command(subcommand)]
    Audit(Audit),
    /// Grants: standing approvals of one exact action for a while.
    #[command(subcommand)]
    Grants(Grants),
    /// Agents known to the server.
    #[command(subcommand)]
    Agents(Agents),
    /// The approval policy.
    #[command(subcommand)]
    Policy(PolicyCmd),
    /// API tokens and agent credentials (needs an admin token).
    #[command(subcommand)]
    Tokens(TokensCmd),
    /// Write man pages and bash/zsh/fish completions under DIR (packaging).
    #[command(hide = true)]
    WriteDocs {
        /// Output directory.
        dir: std::path::PathBuf,
    },
}

#[derive(Debug, Subcommand)]
enum TokensCmd {
    /// Create a token and print it (shown once).
    ///
    /// `--scope enroll` prints a one-time enrollment token for an agent's
    /// agent.enroll_token_file: it works once, expires (--ttl-hours) and, with --host, enrols
    /// only that host; without --host it enrols any host that has no credential yet.
    Create {
        /// Identity: an approver's name, or an agent's host id; for scope enroll, a label.
        #[arg(long)]
        name: String,
        /// agent, read, approve, admin or enroll.
        #[arg(long)]
        scope: String,
        /// Scope enroll only: hours until the token expires (default 24, at most 720).
        #[arg(long, value_name = "HOURS", value_parser = clap::value_parser!(u32).range(1..=720))]
        ttl_hours: Option<u32>,
        /// Scope enroll only: the host id the token may enrol.
        #[arg(long, value_name = "HOST_ID")]
        host: Option<String>,
    },
    /// Revoke a token by name.
    Revoke {
        /// The token's name.
        name: String,
    },
}

#[derive(Debug, Subcommand)]
enum Grants {
    /// List active grants (with --all, expired and revoked ones too).
    List {
        /// Include expired and revoked grants.
        #[arg(long)]
        all: bool,
    },
    /// End a grant now.
    Revoke {
        /// Grant id.
        id: String,
    },
}

#[derive(Debug, Subcommand)]
enum Audit {
    /// Check that no audit record was changed, removed, reordered or cut off the end; reports
    /// the first bad record. With --db, reads the database file directly (and the checkpoint
    /// beside it), which is what an auditor should do; without, asks the server.
    Verify {
        /// Check this SQLite file directly instead of asking the server, e.g.
        /// /var/lib/airlock/airlock.db (opened read-only; the checkpoint beside it is checked
        /// too).
        #[arg(long, conflicts_with = "database")]
        db: Option<std::path::PathBuf>,
        /// Check this database directly instead of asking the server: sqlite:///path or
        /// postgres://user:password@host/db (read only; nothing is changed).
        #[arg(long, value_name = "URL")]
        database: Option<String>,
        /// Also check the chain against the last signed checkpoint in this file (a copy of the
        /// server's `audit checkpoint` log lines kept elsewhere): the record it names must still
        /// have the hash it signed. Needs --db or --database, and --public-key.
        #[arg(long, value_name = "FILE", requires = "public_key")]
        checkpoint: Option<std::path::PathBuf>,
        /// The server's checkpoint public key (hex; airlock-server logs it at start).
        #[arg(long, value_name = "HEX", requires = "checkpoint")]
        public_key: Option<String>,
    },
    /// Write audit records as JSON Lines or CSV to stdout (or --out).
    Export {
        /// Output format.
        #[arg(long, value_enum, default_value_t = FormatArg::Jsonl)]
        format: FormatArg,
        /// Only records of this request.
        #[arg(long)]
        request: Option<String>,
        /// Only records by this actor.
        #[arg(long)]
        actor: Option<String>,
        /// Only this action, or a prefix ending in '*' (e.g. 'request.*').
        #[arg(long)]
        action: Option<String>,
        /// Write here instead of stdout.
        #[arg(long)]
        out: Option<std::path::PathBuf>,
    },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum FormatArg {
    /// JSON Lines.
    Jsonl,
    /// CSV with a header.
    Csv,
}

#[derive(Debug, Subcommand)]
enum Agents {
    /// Known agents, connected or not.
    List,
}

#[derive(Debug, Subcommand)]
enum PolicyCmd {
    /// Check a policy file (line and column of the first problem); nothing is applied.
    Validate {
        /// The file.
        file: std::path::PathBuf,
    },
    /// The policy in force on the server, and its last reload error.
    Show,
    /// Test what agents and this policy decide for one action, with no server and no agent:
    /// the agent rule that matches (the --rules file's, then this policy's rules for hosts
    /// with these labels), its decision, and for ask the approval rule that routes it, who may
    /// approve, the quorum, the deadline and on_timeout.
    ///
    /// Exit status: 0 allowed (no rule holds it, or an allow rule), 10 held and asked, 11
    /// denied; 4 a file is invalid (file, line and column are printed), 2 usage (a bad flag,
    /// command line or address). --json prints one object for scripts.
    #[command(after_help = "Examples:\n  \
        airlockctl policy test --policy /etc/airlock/policy.toml --rules agent.toml \\\n    \
        --exec \"kubectl -n prod delete ns payments\" --account ci --label env=prod\n  \
        airlockctl policy test --policy policy.toml --connect 10.20.3.4:5432 --account ci")]
    Test(PolicyTest),
    /// Propose agent rules from what observe mode recorded for one account: its observed
    /// actions grouped by program and subcommand, or destination and port, each with the
    /// decision the rules in force would have made and how often. Prints TOML to paste into
    /// agent.toml (or the policy) after reading it; nothing is applied. Needs a read token.
    Suggest {
        /// The account whose observed actions to use.
        #[arg(long, value_name = "NAME")]
        account: String,
        /// Only actions of this host id.
        #[arg(long, value_name = "HOST_ID")]
        host: Option<String>,
        /// Use at most this many of the most recent observed actions.
        #[arg(long, default_value_t = 1000)]
        limit: u32,
    },
}

/// `airlockctl policy test`.
#[derive(Debug, clap::Args)]
#[command(group(clap::ArgGroup::new("action").required(true).args(["exec", "connect"])))]
struct PolicyTest {
    /// The approval policy file (as airlock-server reads it).
    #[arg(long, value_name = "FILE")]
    policy: std::path::PathBuf,
    /// An agent configuration (agent.toml, or a file of [[rule]] tables): its rules come
    /// first, its agent.labels and agent.hold_timeout_secs apply.
    #[arg(long, value_name = "FILE")]
    rules: Option<std::path::PathBuf>,
    /// A command line, split as a shell splits it; the first word is the program (a path, or
    /// a name looked up in PATH and else among the rules' binaries).
    #[arg(long, value_name = "COMMAND LINE")]
    exec: Option<String>,
    /// A destination, ADDRESS:PORT (IPv6 as [ADDRESS]:PORT).
    #[arg(long, value_name = "ADDRESS:PORT")]
    connect: Option<String>,
    /// With --connect: the transport.
    #[arg(long, value_enum, default_value_t = ProtocolArg::Tcp, requires = "connect")]
    protocol: ProtocolArg,
    /// The watched account that acts (rules and routes with `accounts` apply only to theirs);
    /// without it, an account no rule lists.
    #[arg(long, value_name = "NAME")]
    account: Option<String>,
    /// A host label, over the --rules file's agent.labels: picks the policy's rules and its
    /// route. Repeatable.
    #[arg(long = "label", value_name = "KEY=VALUE", value_parser = agent_rules::explain::parse_label)]
    labels: Vec<(String, String)>,
    /// With --exec: test the program as a file the account could have made (a copy, a
    /// download), as `@self-made` rules see it.
    #[arg(long, requires = "exec")]
    self_made: bool,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum ProtocolArg {
    /// Stream sockets.
    Tcp,
    /// Datagram sockets.
    Udp,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum StateArg {
    Pending,
    Approved,
    Denied,
    Expired,
    Cancelled,
    /// Recorded in observe mode (ran unstopped).
    Observed,
}

#[derive(Debug, Subcommand)]
enum Requests {
    /// List requests, newest first.
    List {
        /// Only requests in this state.
        #[arg(long, value_enum)]
        state: Option<StateArg>,
        /// At most this many.
        #[arg(long, default_value_t = 50)]
        limit: u32,
        /// Only requests from this agent (host id).
        #[arg(long)]
        host: Option<String>,
        /// Only requests by this account.
        #[arg(long)]
        account: Option<String>,
        /// The next page: the token printed after the previous page.
        #[arg(long)]
        page: Option<String>,
    },
    /// Show one request with its whole context.
    Show {
        /// Request id.
        id: String,
    },
    /// Print requests as they arrive and change; with --decide, ask for a decision on each
    /// new one (a = approve, d = deny, anything else = skip).
    Watch {
        /// Decide interactively (needs an approve or admin token).
        #[arg(long)]
        decide: bool,
    },
    /// Approve a pending request, as the identity of your token.
    Approve {
        /// Request id.
        id: String,
        /// Why.
        #[arg(long, default_value = "")]
        reason: String,
        /// Also approve the same action, host and account for this many minutes (max 1440).
        #[arg(long, value_name = "MINUTES", default_value_t = 0)]
        grant: u32,
    },
    /// Withdraw a pending request (admin tokens only: it skips groups, quorum and the self
    /// check; approvers deny instead); the agent denies it.
    Cancel {
        /// Request id.
        id: String,
        /// Why (required).
        #[arg(long)]
        reason: String,
    },
    /// Deny a pending request, as the identity of your token.
    Deny {
        /// Request id.
        id: String,
        /// Why (required).
        #[arg(long)]
        reason: String,
    },
}

fn state_text(h: &HeldRequest) -> &'static str {
    airlock_control_plane::types::state_name(h.state())
}

/// Agent-supplied (or any server-relayed) text made inert for the terminal: an ESC sequence in
/// an argv could otherwise hide words right before the approve prompt.
fn esc(s: &str) -> std::borrow::Cow<'_, str> {
    airlock_control_plane::display::escape_control(s)
}

/// The action, by the executable the kernel ran, then its arguments.
fn what(h: &HeldRequest) -> String {
    airlock_control_plane::display::action_line(h.request.as_ref().and_then(|r| r.action.as_ref()))
}

/// One request as one line, every field escaped.
fn line(h: &HeldRequest) -> String {
    let r = h.request.clone().unwrap_or_default();
    let user = r.process.as_ref().map(|p| p.user.as_str()).unwrap_or("");
    esc(&format!(
        "{:<9} {} {}@{} [{}] {}",
        state_text(h),
        r.request_id,
        user,
        h.hostname,
        r.rule,
        what(h)
    ))
    .into_owned()
}

fn details(h: &HeldRequest) -> String {
    let r = h.request.clone().unwrap_or_default();
    let p = r.process.clone().unwrap_or_default();
    let mut out = format!(
        "request   {}\nstate     {}\nhost      {} ({})\naccount   {} (uid {}), group {}\naction    {}\ncwd       {}\nrule      {} (risk: {}) {}\n",
        esc(&r.request_id),
        state_text(h),
        esc(&h.hostname),
        esc(&h.host_id),
        esc(&p.user),
        p.uid,
        esc(&p.group),
        esc(&what(h)),
        esc(&p.cwd),
        esc(&r.rule),
        esc(if r.risk.is_empty() { "-" } else { &r.risk }),
        esc(&r.description),
    );
    if r.asked_ahead {
        out.push_str(&format!(
            "asked     ahead: no task is held; approving grants this action for {} min\nreason    \"{}\" (the AI agent's own words, not checked)\n",
            r.ahead_minutes.max(1),
            esc(&r.justification)
        ));
    }
    let left = (r.deadline_unix_ms - airlock_control_plane::types::now_ms()) / 1000;
    if h.state() == RequestState::Pending {
        if r.wait {
            out.push_str("deadline  none: held until someone decides\n");
        } else {
            out.push_str(&format!("deadline  in {left} s\n"));
        }
    }
    for (i, a) in p.ancestors.iter().enumerate() {
        out.push_str(&format!(
            "parent {i}  pid {} {}: {}\n",
            a.pid,
            esc(&a.user),
            esc(&a.argv.join(" "))
        ));
    }
    if !h.decided_by.is_empty() {
        out.push_str(&format!(
            "decided   by {}: {}\n",
            esc(&h.decided_by),
            esc(&h.reason)
        ));
    }
    out
}

/// A client for `server` that sends `token` with every call; on failure, the exit code.
async fn connect(server: &str, token: Option<&str>) -> Result<Client, ExitCode> {
    let (channel, bearer) = channel(server, token).await?;
    Ok(ApprovalServiceClient::with_interceptor(channel, bearer))
}

fn finish(result: Result<(), tonic::Status>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(status) => exit_for(&status),
    }
}

async fn audit_remote(server: &str, token: Option<&str>, cmd: Audit) -> ExitCode {
    let (ch, bearer) = match channel(server, token).await {
        Ok(c) => c,
        Err(code) => return code,
    };
    let mut client = AuditServiceClient::with_interceptor(ch, bearer);
    match cmd {
        Audit::Verify { .. } => match client.verify(AuditVerifyRequest {}).await {
            Ok(r) if r.get_ref().intact => {
                println!("audit trail intact: {} records", r.get_ref().records);
                ExitCode::SUCCESS
            }
            Ok(r) => {
                eprintln!("airlockctl: {}", esc(&r.get_ref().problem));
                ExitCode::from(5)
            }
            Err(status) => exit_for(&status),
        },
        Audit::Export {
            format,
            request,
            actor,
            action,
            out,
        } => {
            let query = AuditQuery {
                request_id: request.unwrap_or_default(),
                actor: actor.unwrap_or_default(),
                action: action.unwrap_or_default(),
                ..Default::default()
            };
            let format = match format {
                FormatArg::Jsonl => ExportFormat::JsonLines,
                FormatArg::Csv => ExportFormat::Csv,
            };
            let result = async {
                let mut stream = client
                    .export(AuditExportRequest {
                        query: Some(query),
                        format: format as i32,
                    })
                    .await?
                    .into_inner();
                let mut data = Vec::new();
                while let Some(chunk) = stream.message().await? {
                    data.extend_from_slice(&chunk.data);
                }
                Ok::<_, tonic::Status>(data)
            }
            .await;
            match result {
                Ok(data) => {
                    let written = match &out {
                        Some(path) => std::fs::write(path, &data),
                        None => std::io::stdout().write_all(&data),
                    };
                    if let Err(e) = written {
                        eprintln!("airlockctl: writing the export: {e}");
                        return ExitCode::from(1);
                    }
                    ExitCode::SUCCESS
                }
                Err(status) => exit_for(&status),
            }
        }
    }
}

async fn agents_list(server: &str, token: Option<&str>) -> ExitCode {
    let (ch, bearer) = match channel(server, token).await {
        Ok(c) => c,
        Err(code) => return code,
    };
    let mut client = AgentsServiceClient::with_interceptor(ch, bearer);
    finish(client.list(ListAgentsRequest {}).await.map(|r| {
        for a in &r.get_ref().agents {
            let labels: Vec<String> = a.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
            emit(a, || {
                esc(&format!(
                    "{:<12} {} {} v{} [{}] last seen {}s ago",
                    if a.connected {
                        "connected"
                    } else {
                        "disconnected"
                    },
                    a.host_id,
                    a.hostname,
                    a.version,
                    labels.join(","),
                    (airlock_control_plane::types::now_ms() - a.last_seen_unix_ms) / 1000
                ))
                .into_owned()
            });
        }
    }))
}

async fn tokens(server: &str, token: Option<&str>, cmd: TokensCmd) -> ExitCode {
    let (ch, bearer) = match channel(server, token).await {
        Ok(c) => c,
        Err(code) => return code,
    };
    let mut client = TokensServiceClient::with_interceptor(ch, bearer);
    finish(match cmd {
        TokensCmd::Create {
            name,
            scope,
            ttl_hours,
            host,
        } => client
            .create(CreateTokenRequest {
                name,
                scope,
                ttl_hours: ttl_hours.unwrap_or(0),
                host_id: host.unwrap_or_default(),
            })
            .await
            .map(|r| println!("{}", esc(&r.get_ref().token))),
        TokensCmd::Revoke { name } => client
            .revoke(RevokeTokenRequest { name: name.clone() })
            .await
            .map(|_| println!("revoked {}", esc(&name))),
    })
}

/// `policy suggest`: reads the account's observed actions, page by page, and prints the rules
/// [`airlock_control_plane::suggest`] proposes.
async fn policy_suggest(
    server: &str,
    token: Option<&str>,
    account: &str,
    host: Option<String>,
    limit: u32,
) -> ExitCode {
    let mut client = match connect(server, token).await {
        Ok(c) => c,
        Err(code) => return code,
    };
    let mut observed = Vec::new();
    let mut page = String::new();
    while observed.len() < limit as usize {
        let r = match client
            .list(ListRequestsRequest {
                state: RequestState::Observed as i32,
                account: account.to_owned(),
                host_id: host.clone().unwrap_or_default(),
                limit: limit.min(500),
                page_token: page.clone(),
            })
            .await
        {
            Ok(r) => r.into_inner(),
            Err(status) => return exit_for(&status),
        };
        observed.extend(r.requests);
        if r.next_page_token.is_empty() {
            break;
        }
        page = r.next_page_token;
    }
    observed.truncate(limit as usize);
    print!(
        "{}",
        airlock_control_plane::suggest::suggest(account, &observed)
    );
    ExitCode::SUCCESS
}

async fn policy_show(server: &str, token: Option<&str>) -> ExitCode {
    let (ch, bearer) = match channel(server, token).await {
        Ok(c) => c,
        Err(code) => return code,
    };
    let mut client = PolicyServiceClient::with_interceptor(ch, bearer);
    finish(client.get(GetPolicyRequest {}).await.map(|r| {
        let st = r.get_ref();
        if st.path.is_empty() {
            println!("built-in default policy: any one approver decides");
        } else {
            println!("# {} (loaded at {} ms)", esc(&st.path), st.loaded_unix_ms);
            for l in st.source.lines() {
                println!("{}", esc(l));
            }
        }
        if !st.last_error.is_empty() {
            println!("# last reload refused: {}", esc(&st.last_error));
        }
    }))
}

/// --json (set once at start).
static JSON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();

/// Prints `v` as one JSON line with --json, else `human()`.
fn emit<T: serde::Serialize>(v: &T, human: impl FnOnce() -> String) {
    if JSON.get().copied().unwrap_or(false) {
        match serde_json::to_string(v) {
            Ok(j) => println!("{}", airlock_control_plane::display::escape_json(&j)),
            Err(e) => eprintln!("airlockctl: cannot encode JSON: {e}"),
        }
    } else {
        println!("{}", human());
    }
}

/// CA to trust for https, from --ca-file (set once at start).
static CA_FILE: std::sync::OnceLock<Option<std::path::PathBuf>> = std::sync::OnceLock::new();

/// A channel to `server` and the interceptor that adds `token`; on failure, the exit code.
async fn channel(server: &str, token: Option<&str>) -> Result<(Channel, Bearer), ExitCode> {
    let bearer = match token.map(|t| format!("Bearer {t}").parse()) {
        None => Bearer(None),
        Some(Ok(v)) => Bearer(Some(v)),
        Some(Err(_)) => {
            eprintln!("airlockctl: the token has characters that cannot be sent");
            return Err(ExitCode::from(2));
        }
    };
    let mut endpoint = Channel::from_shared(server.to_owned()).map_err(|e| {
        eprintln!("airlockctl: bad --server {server:?}: {e}");
        ExitCode::from(2)
    })?;
    if let Some(Some(ca)) = CA_FILE.get() {
        let pem = std::fs::read(ca).map_err(|e| {
            eprintln!("airlockctl: reading {}: {e}", ca.display());
            ExitCode::from(1)
        })?;
        let tls = tonic::transport::ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(pem));
        endpoint = endpoint.tls_config(tls).map_err(|e| {
            eprintln!("airlockctl: TLS settings: {e}");
            ExitCode::from(2)
        })?;
    }
    let channel = endpoint.connect().await.map_err(|e| {
        eprintln!("airlockctl: cannot reach {server}: {e}");
        ExitCode::from(1)
    })?;
    Ok((channel, bearer))
}

fn grant_line(g: &airlock_proto::v1::Grant) -> String {
    let now = airlock_control_plane::types::now_ms();
    let state = if g.revoked_unix_ms > 0 {
        format!("revoked by {}", g.revoked_by)
    } else if g.expires_unix_ms <= now {
        "expired".to_owned()
    } else {
        format!("{} min left", (g.expires_unix_ms - now) / 60_000)
    };
    esc(&format!(
        "{} {}@{} {} [{}] by {}",
        g.id,
        g.account,
        g.host_id,
        g.action.replace('\u{1f}', " ").replace('\u{1e}', " | "),
        state,
        g.created_by
    ))
    .into_owned()
}

fn exit_for(status: &tonic::Status) -> ExitCode {
    eprintln!("airlockctl: {}", esc(status.message()));
    match status.code() {
        Code::NotFound => ExitCode::from(3),
        Code::PermissionDenied | Code::FailedPrecondition | Code::InvalidArgument => {
            ExitCode::from(4)
        }
        _ => ExitCode::from(1),
    }
}

/// The chain head a signed checkpoint file vouches for, its signature checked with
/// `public_key`; `Ok(None)` without one; on failure, the exit code (2 unreadable, 5 forged).
fn signed_checkpoint(
    file: Option<std::path::PathBuf>,
    public_key: Option<String>,
) -> Result<Option<(i64, String)>, ExitCode> {
    use airlock_control_plane::checkpoint::Checkpoint;
    let (Some(file), Some(key)) = (file, public_key) else {
        return Ok(None);
    };
    let text = std::fs::read_to_string(&file).map_err(|e| {
        eprintln!("airlockctl: reading {}: {e}", file.display());
        ExitCode::from(2)
    })?;
    let c = Checkpoint::last_in(&text).map_err(|e| {
        eprintln!("airlockctl: {}: {}", file.display(), esc(&e.to_string()));
        ExitCode::from(2)
    })?;
    c.verify(&key).map_err(|e| {
        eprintln!("airlockctl: {}: {}", file.display(), esc(&e.to_string()));
        ExitCode::from(5)
    })?;
    Ok(Some((c.seq, c.hash)))
}

async fn audit_verify(
    db: airlock_control_plane::store::Database,
    signed: Option<(i64, String)>,
) -> ExitCode {
    use airlock_control_plane::store::Database;
    if let Database::Sqlite(path) = &db {
        if !path.is_file() {
            eprintln!("airlockctl: no database at {}", path.display());
            return ExitCode::from(3);
        }
    }
    let against = signed.clone();
    match airlock_control_plane::store::trail::verify_database_against(&db, against).await {
        Ok(n) => {
            match signed {
                Some((seq, _)) => println!(
                    "audit trail intact: {n} records, record {seq} as the signed checkpoint says"
                ),
                None => println!("audit trail intact: {n} records"),
            }
            ExitCode::SUCCESS
        }
        Err(airlock_control_plane::audit::Tamper::Unreadable(e)) => {
            eprintln!("airlockctl: {db}: {e}");
            ExitCode::from(1)
        }
        Err(t) => {
            eprintln!("airlockctl: {}", esc(&t.to_string()));
            ExitCode::from(5)
        }
    }
}

/// `policy test`: prints what the rules decide and returns the exit status.
fn policy_test(t: &PolicyTest, json: bool) -> u8 {
    use agent_rules::explain::{exit_code, Query, Transport};
    use airlock_control_plane::tester::TestError;
    let policy = match airlock_control_plane::policy::Policy::load(&t.policy) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("airlockctl: {e}");
            return 4;
        }
    };
    let agent = match &t.rules {
        Some(path) => match agent_rules::config::Config::load(path) {
            Ok(c) => Some((c, path.as_path())),
            Err(e) => {
                eprintln!("airlockctl: {e}");
                return 4;
            }
        },
        None => None,
    };
    let query = match (&t.exec, &t.connect) {
        (Some(line), _) => Query::Exec {
            line: line.clone(),
            self_made: t.self_made,
        },
        (None, Some(dest)) => Query::Connect {
            destination: dest.clone(),
            protocol: match t.protocol {
                ProtocolArg::Tcp => Transport::Tcp,
                ProtocolArg::Udp => Transport::Udp,
            },
        },
        // clap requires one of the two.
        (None, None) => return 2,
    };
    let tested = match airlock_control_plane::tester::test(
        &policy,
        &t.policy,
        agent.as_ref().map(|(c, p)| (c, *p)),
        &t.labels,
        &query,
        t.account.as_deref(),
    ) {
        Ok(tested) => tested,
        Err(e @ TestError::Action(_)) => {
            eprintln!("airlockctl: {e}");
            return 2;
        }
        Err(e) => {
            eprintln!("airlockctl: {e}");
            return 4;
        }
    };
    if json {
        match serde_json::to_string(&tested) {
            Ok(line) => println!("{line}"),
            Err(e) => {
                eprintln!("airlockctl: {e}");
                return 1;
            }
        }
    } else {
        println!("policy:    {}", t.policy.display());
        if let Some(path) = &t.rules {
            println!("rules:     {}", path.display());
        }
        print!("{tested}");
    }
    exit_code(tested.explained.decision)
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Command::WriteDocs { dir } = &cli.command {
        use clap::CommandFactory;
        return match airlock_cli_docs::write(Cli::command(), dir) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("airlockctl: {e}");
                ExitCode::FAILURE
            }
        };
    }
    let _ = CA_FILE.set(cli.ca_file.clone());
    let _ = JSON.set(cli.json);
    let cmd = match cli.command {
        Command::Audit(Audit::Verify {
            db: Some(db),
            checkpoint,
            public_key,
            ..
        }) => {
            let signed = match signed_checkpoint(checkpoint, public_key) {
                Ok(s) => s,
                Err(code) => return code,
            };
            return audit_verify(airlock_control_plane::store::Database::Sqlite(db), signed).await;
        }
        Command::Audit(Audit::Verify {
            database: Some(db),
            checkpoint,
            public_key,
            ..
        }) => {
            let signed = match signed_checkpoint(checkpoint, public_key) {
                Ok(s) => s,
                Err(code) => return code,
            };
            // Parsed here rather than by clap, whose error would repeat the password.
            return match db.parse() {
                Ok(db) => audit_verify(db, signed).await,
                Err(e) => {
                    eprintln!("airlockctl: {e}");
                    ExitCode::from(2)
                }
            };
        }
        Command::Audit(Audit::Verify {
            checkpoint: Some(_),
            ..
        }) => {
            eprintln!("airlockctl: --checkpoint needs --db or --database: the chain is read from the database itself");
            return ExitCode::from(2);
        }
        Command::Policy(PolicyCmd::Validate { file }) => {
            return match airlock_control_plane::policy::Policy::load(&file) {
                Ok(p) => {
                    println!(
                        "{}: ok ({} groups, {} rules)",
                        file.display(),
                        p.groups.len(),
                        p.rules.len()
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("airlockctl: {e}");
                    ExitCode::from(4)
                }
            };
        }
        Command::Audit(a) => return audit_remote(&cli.server, cli.token.as_deref(), a).await,
        Command::Agents(Agents::List) => {
            return agents_list(&cli.server, cli.token.as_deref()).await
        }
        Command::Tokens(t) => return tokens(&cli.server, cli.token.as_deref(), t).await,
        Command::Policy(PolicyCmd::Test(t)) => return ExitCode::from(policy_test(&t, cli.json)),
        Command::Policy(PolicyCmd::Show) => {
            return policy_show(&cli.server, cli.token.as_deref()).await
        }
        Command::Policy(PolicyCmd::Suggest {
            account,
            host,
            limit,
        }) => {
            return policy_suggest(&cli.server, cli.token.as_deref(), &account, host, limit).await
        }
        Command::Requests(cmd) => cmd,
        Command::WriteDocs { .. } => return ExitCode::SUCCESS,
        Command::Grants(g) => {
            let mut client = match connect(&cli.server, cli.token.as_deref()).await {
                Ok(c) => c,
                Err(code) => return code,
            };
            let result = match g {
                Grants::List { all } => client
                    .list_grants(airlock_proto::v1::ListGrantsRequest { all })
                    .await
                    .map(|r| {
                        r.into_inner()
                            .grants
                            .iter()
                            .for_each(|g| emit(g, || grant_line(g)))
                    }),
                Grants::Revoke { id } => client
                    .revoke_grant(airlock_proto::v1::RevokeGrantRequest { grant_id: id })
                    .await
                    .map(|r| emit(r.get_ref(), || grant_line(r.get_ref()))),
            };
            return match result {
                Ok(()) => ExitCode::SUCCESS,
                Err(status) => exit_for(&status),
            };
        }
    };
    let mut client = match connect(&cli.server, cli.token.as_deref()).await {
        Ok(c) => c,
        Err(code) => return code,
    };
    let result = match cmd {
        Requests::List {
            state,
            limit,
            host,
            account,
            page,
        } => {
            let state = match state {
                None => RequestState::Unspecified,
                Some(StateArg::Pending) => RequestState::Pending,
                Some(StateArg::Approved) => RequestState::Approved,
                Some(StateArg::Denied) => RequestState::Denied,
                Some(StateArg::Expired) => RequestState::Expired,
                Some(StateArg::Cancelled) => RequestState::Cancelled,
                Some(StateArg::Observed) => RequestState::Observed,
            };
            client
                .list(ListRequestsRequest {
                    state: state as i32,
                    limit,
                    host_id: host.unwrap_or_default(),
                    account: account.unwrap_or_default(),
                    page_token: page.unwrap_or_default(),
                })
                .await
                .map(|r| {
                    let r = r.into_inner();
                    r.requests.iter().for_each(|h| emit(h, || line(h)));
                    if !r.next_page_token.is_empty() {
                        eprintln!("more: --page {}", esc(&r.next_page_token));
                    }
                })
        }
        Requests::Show { id } => client
            .get(GetRequestRequest { request_id: id })
            .await
            .map(|r| emit(r.get_ref(), || details(r.get_ref()).trim_end().to_owned())),
        Requests::Approve { id, reason, grant } => {
            decide(&mut client, id, Verdict::Allow, reason, grant).await
        }
        Requests::Deny { id, reason } => decide(&mut client, id, Verdict::Deny, reason, 0).await,
        Requests::Cancel { id, reason } => client
            .cancel(airlock_proto::v1::CancelRequest {
                request_id: id,
                reason,
            })
            .await
            .map(|r| emit(r.get_ref(), || line(r.get_ref()))),
        Requests::Watch {
            decide: interactive,
        } => watch(&mut client, interactive).await,
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(status) => exit_for(&status),
    }
}

async fn decide(
    client: &mut Client,
    id: String,
    verdict: Verdict,
    reason: String,
    grant_minutes: u32,
) -> Result<(), tonic::Status> {
    let h = client
        .decide(DecideRequest {
            request_id: id,
            verdict: verdict as i32,
            reason,
            approver: String::new(),
            grant_minutes,
        })
        .await?
        .into_inner();
    emit(&h, || line(&h));
    Ok(())
}

async fn watch(client: &mut Client, interactive: bool) -> Result<(), tonic::Status> {
    let mut stream = client
        .watch(WatchRequestsRequest {
            include_pending: true,
        })
        .await?
        .into_inner();
    let mut decider = client.clone();
    while let Some(h) = stream.message().await? {
        if !(interactive && h.state() == RequestState::Pending && h.outcomes.is_empty()) {
            emit(&h, || line(&h));
            continue;
        }
        println!("\n{}", details(&h));
        print!("approve (a), deny (d) or skip (enter)? ");
        let _ = std::io::stdout().flush();
        let answer = tokio::task::spawn_blocking(|| {
            let mut s = String::new();
            let _ = std::io::stdin().lock().read_line(&mut s);
            s.trim().to_lowercase()
        })
        .await
        .unwrap_or_default();
        let id = h
            .request
            .as_ref()
            .map(|r| r.request_id.clone())
            .unwrap_or_default();
        let verdict = match answer.as_str() {
            "a" | "approve" | "y" => Verdict::Allow,
            "d" | "deny" | "n" => Verdict::Deny,
            _ => continue,
        };
        let reason = if verdict == Verdict::Deny {
            "denied from airlockctl watch"
        } else {
            "approved from airlockctl watch"
        };
        if let Err(e) = decide(&mut decider, id, verdict, reason.into(), 0).await {
            eprintln!("airlockctl: {}", esc(e.message()));
        }
    }
    Ok(())
}
