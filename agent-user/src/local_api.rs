//! The agent's local socket, for the AI agents on this host (through `airlock-agent mcp`):
//! would this action be held (a dry run), ask ahead with a reason, the state of a request, and
//! this account's recent decisions.
//!
//! The socket is root's, open to every local account; who asks is taken from the connection
//! (`SO_PEERCRED`), never from the request, so no account can ask or look on another's behalf.
//! One JSON object per line each way: a [`Call`], then its answer (`{"ok": ...}` or
//! `{"error": "..."}`).

use std::{
    path::{Path, PathBuf},
    sync::{atomic::AtomicU64, Arc, Mutex},
    time::Duration,
};

use airlock_proto::v1::{
    action_request::Action as ProtoAction, agent_query_service_client::AgentQueryServiceClient,
    ActionRequest, ConnectAction, ExecAction, GetHostRequest, HeldRequest, Protocol, RecentQuery,
    RequestState, RouteAnswer, RouteQuery, Verdict,
};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

use crate::{
    config::{Config, RuleConfig},
    decider::Connection,
    explain::{decision_word, Action, Explanation, Tester, Transport},
    holds::{mono_to_unix_ms, Engine},
    policy::Decision,
    procinfo,
};

/// Where the socket is unless `agent.local_socket` says otherwise.
pub const DEFAULT_SOCKET: &str = "/run/airlock/agent.sock";
/// Longest call line, bytes.
const MAX_LINE: usize = 64 * 1024;
/// Longest grant a request asked ahead may ask for, minutes (approvers may choose less).
const MAX_AHEAD_MINUTES: u32 = 60;
/// Longest justification kept, characters.
const MAX_JUSTIFICATION: usize = 2000;
/// Longest wait `status` takes, seconds.
const MAX_WAIT_SECS: u64 = 600;
/// Connections served at once.
const MAX_CONNECTIONS: usize = 64;
/// Connections one account may have open at once.
const MAX_PER_ACCOUNT: usize = 8;
/// A connection with no call for this long is closed.
const IDLE_LIMIT: Duration = Duration::from_secs(300);
/// How long examining an action may take (it reads paths the caller controls).
const EXAMINE_LIMIT: Duration = Duration::from_secs(5);
/// How long a question to the control plane may take.
const QUERY_LIMIT: Duration = Duration::from_secs(5);

/// The action a call is about: a command line, or a destination.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ActionArgs {
    /// A command line, as a shell would split it (`kubectl -n prod delete ns payments`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<String>,
    /// A destination `ADDRESS:PORT` (IPv6 as `[ADDRESS]:PORT`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destination: Option<String>,
    /// `tcp` (default) or `udp`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<String>,
    /// The directory the command will run in; default: the caller's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cwd: Option<String>,
}

/// One call on the socket.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "tool", rename_all = "snake_case")]
pub enum Call {
    /// Would this be allowed, held or denied for the caller, by which rule, who may approve.
    Check {
        /// The action.
        #[serde(flatten)]
        action: ActionArgs,
    },
    /// Ask ahead: a request approvers see, whose approval is a grant for the exact action.
    Request {
        /// The action.
        #[serde(flatten)]
        action: ActionArgs,
        /// Why, in the AI agent's own words.
        justification: String,
        /// How long the grant should last, minutes (default 10).
        #[serde(default)]
        minutes: Option<u32>,
    },
    /// A request's state, votes and reason; optionally waiting for its decision.
    Status {
        /// The request id.
        request_id: String,
        /// Wait up to this many seconds for a decision.
        #[serde(default)]
        wait_secs: Option<u64>,
    },
    /// The caller's recent requests on this host, newest first.
    Why {
        /// At most this many (default 10).
        #[serde(default)]
        limit: Option<u32>,
    },
}

/// What the socket's calls need of the running agent.
pub struct LocalApi {
    /// Holds, the decider, settings.
    pub engine: Arc<Engine>,
    /// The configuration in force (its rules, labels, env_allow).
    pub config: Arc<Mutex<Config>>,
    /// Rules the control plane sent.
    pub server_rules: Arc<Mutex<Vec<RuleConfig>>>,
    /// The configuration file (named in explanations).
    pub config_path: PathBuf,
    /// How to reach the control plane for questions (who may approve, request states).
    pub connection: Option<Connection>,
    /// Numbers requests asked ahead.
    pub asked: AtomicU64,
    /// Open connections per uid.
    pub open: Mutex<std::collections::HashMap<u32, usize>>,
}

/// One connection counted against its uid's limit while it is open.
struct Open<'a> {
    api: &'a LocalApi,
    uid: u32,
}

impl Drop for Open<'_> {
    fn drop(&mut self) {
        let mut open = lock(&self.api.open);
        if let Some(n) = open.get_mut(&self.uid) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                open.remove(&self.uid);
            }
        }
    }
}

/// Who is calling: the account behind the connection, and its process.
#[derive(Debug, Clone)]
struct Caller {
    uid: u32,
    gid: u32,
    pid: u32,
    account: String,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Binds the socket at `path` (root-owned directory, the socket open to every account) and
/// serves it until the task is dropped.
pub async fn serve(api: Arc<LocalApi>, path: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))?;
    }
    // A socket left by an earlier agent.
    let _ = std::fs::remove_file(path);
    let listener = tokio::net::UnixListener::bind(path)?;
    // Every account may connect: who it is comes from the connection, not the request.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666))?;
    tracing::info!(socket = %path.display(), "local socket for AI agents (airlock-agent mcp)");
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "local socket accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            continue; // Too many at once: the connection is closed.
        };
        let api = api.clone();
        tokio::spawn(async move {
            let _slot = slot;
            if let Err(e) = api.connection(stream).await {
                tracing::debug!(error = %e, "local socket connection ended");
            }
        });
    }
}

impl LocalApi {
    async fn connection(&self, stream: tokio::net::UnixStream) -> anyhow::Result<()> {
        let cred = stream.peer_cred()?;
        let uid = cred.uid();
        // One account cannot take every connection.
        let _open = {
            let mut open = lock(&self.open);
            let n = open.entry(uid).or_default();
            if *n >= MAX_PER_ACCOUNT {
                return Ok(());
            }
            *n += 1;
            Open { api: self, uid }
        };
        let pid = cred.pid().unwrap_or(0).max(0) as u32;
        let account = nix::unistd::User::from_uid(uid.into())
            .ok()
            .flatten()
            .map_or_else(|| uid.to_string(), |u| u.name);
        let caller = Caller {
            uid,
            gid: cred.gid(),
            pid,
            account,
        };
        let (read, mut write) = stream.into_split();
        let mut reader = BufReader::new(read);
        let mut line = String::new();
        loop {
            line.clear();
            // Bounded: a line longer than MAX_LINE ends the connection after its error.
            let Ok(read) = tokio::time::timeout(
                IDLE_LIMIT,
                (&mut reader).take(MAX_LINE as u64 + 1).read_line(&mut line),
            )
            .await
            else {
                return Ok(()); // Idle: closed.
            };
            let n = read?;
            if n == 0 {
                return Ok(());
            }
            let answer = if n > MAX_LINE {
                json!({"error": format!("a call is at most {MAX_LINE} bytes")})
            } else {
                match serde_json::from_str::<Call>(line.trim()) {
                    Ok(call) => match self.answer(&caller, call).await {
                        Ok(v) => json!({ "ok": v }),
                        Err(e) => json!({ "error": e }),
                    },
                    Err(e) => json!({"error": format!("not a call: {e}")}),
                }
            };
            let mut out = serde_json::to_vec(&answer)?;
            out.push(b'\n');
            write.write_all(&out).await?;
            if n > MAX_LINE {
                return Ok(());
            }
        }
    }

    async fn answer(&self, caller: &Caller, call: Call) -> Result<Value, String> {
        match call {
            Call::Check { action } => self.check(caller, &action).await,
            Call::Request {
                action,
                justification,
                minutes,
            } => {
                self.ask_ahead(caller, &action, justification, minutes)
                    .await
            }
            Call::Status {
                request_id,
                wait_secs,
            } => {
                self.status(caller, &request_id, wait_secs.unwrap_or(0))
                    .await
            }
            Call::Why { limit } => self.why(caller, limit.unwrap_or(10)).await,
        }
    }

    /// Whether the caller is one of the watched: its account or group, or its process in a
    /// watched cgroup.
    fn is_watched(&self, caller: &Caller) -> bool {
        let section = lock(&self.config).watch.clone();
        let root = Path::new("/sys/fs/cgroup");
        let Ok(w) = crate::watch::resolve(&section, root) else {
            return false;
        };
        if w.uids.contains(&caller.uid) || w.gids.contains(&caller.gid) {
            return true;
        }
        // The caller's cgroup, or one above it, is watched.
        let cgroup = std::fs::read_to_string(format!("/proc/{}/cgroup", caller.pid))
            .ok()
            .and_then(|t| {
                t.lines()
                    .find_map(|l| l.strip_prefix("0::").map(str::to_owned))
            })
            .unwrap_or_default();
        let mut dir = root.join(cgroup.trim_start_matches('/'));
        loop {
            use std::os::unix::fs::MetadataExt;
            if std::fs::metadata(&dir).is_ok_and(|m| w.cgroups.contains(&m.ino())) {
                return true;
            }
            if dir == root || !dir.pop() {
                return false;
            }
        }
    }

    /// The rules the agent enforces: its own, then the control plane's.
    fn rules(&self) -> Result<Vec<RuleConfig>, String> {
        let own = lock(&self.config).rules.clone();
        crate::server_rules::merge(&own, &lock(&self.server_rules))
    }

    /// What the rules say of the action `args` names for the caller, and the request it would
    /// make. The caller controls every path involved (its PATH, cwd, scripts, FIFOs), so this
    /// runs off the async workers, with the caller's file-system identity (no root reads of
    /// what it may not read), within [`EXAMINE_LIMIT`].
    async fn examine(&self, caller: &Caller, args: &ActionArgs) -> Result<Examined, String> {
        let snapshot = Snapshot {
            rules: self.rules()?,
            settings: self.engine.settings(),
            resolved: self.engine.names.resolved(),
            config_path: self.config_path.clone(),
        };
        let (caller, args) = (caller.clone(), args.clone());
        let job = tokio::task::spawn_blocking(move || {
            let _as_caller = FsIdentity::become_(caller.uid, caller.gid);
            examine_now(&snapshot, &caller, &args)
        });
        match tokio::time::timeout(EXAMINE_LIMIT, job).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err("examining the action failed".into()),
            Err(_) => Err("examining the action took too long (a path that blocks?)".into()),
        }
    }
    async fn query_client(
        &self,
    ) -> Result<
        AgentQueryServiceClient<
            tonic::service::interceptor::InterceptedService<
                tonic::transport::Channel,
                impl tonic::service::Interceptor,
            >,
        >,
        String,
    > {
        let conn = self
            .connection
            .as_ref()
            .ok_or("this agent has no control plane (agent.decider) to ask")?;
        let channel = tokio::time::timeout(QUERY_LIMIT, conn.connect())
            .await
            .map_err(|_| "the control plane did not answer in time".to_owned())?
            .map_err(|e| format!("the control plane is unreachable: {}", e.message()))?;
        let bearer: Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>> = conn
            .token
            .as_ref()
            .and_then(|t| format!("Bearer {t}").parse().ok());
        Ok(AgentQueryServiceClient::with_interceptor(
            channel,
            move |mut req: tonic::Request<()>| {
                if let Some(b) = &bearer {
                    req.metadata_mut().insert("authorization", b.clone());
                }
                Ok(req)
            },
        ))
    }

    async fn route(&self, request: ActionRequest) -> Result<RouteAnswer, String> {
        let labels = lock(&self.config).agent.labels.clone();
        let mut client = self.query_client().await?;
        tokio::time::timeout(
            QUERY_LIMIT,
            client.route(RouteQuery {
                request: Some(request),
                labels: labels.into_iter().collect(),
            }),
        )
        .await
        .map_err(|_| "the control plane did not answer in time".to_owned())?
        .map(tonic::Response::into_inner)
        .map_err(|e| format!("the control plane: {}", e.message()))
    }

    async fn check(&self, caller: &Caller, args: &ActionArgs) -> Result<Value, String> {
        let Examined { e, rules, request } = self.examine(caller, args).await?;
        let mut out = explanation_json(&e, &rules, &self.engine.settings());
        if e.decision == Decision::Ask {
            out["approval"] = match self.route(request).await {
                Ok(r) => route_json(&r),
                Err(why) => json!({ "unknown": why }),
            };
        }
        out["account"] = json!(caller.account);
        Ok(out)
    }

    async fn ask_ahead(
        &self,
        caller: &Caller,
        args: &ActionArgs,
        justification: String,
        minutes: Option<u32>,
    ) -> Result<Value, String> {
        let Examined {
            e,
            rules,
            mut request,
        } = self.examine(caller, args).await?;
        let settings = self.engine.settings();
        if e.decision != Decision::Ask {
            let mut out = explanation_json(&e, &rules, &settings);
            out["asked"] = json!(false);
            out["why_not"] = json!(match e.decision {
                Decision::Allow => "nothing to ask: this action is not held for approval",
                _ => "asking cannot help: a rule denies this action without asking anyone",
            });
            return Ok(out);
        }
        let justification: String = justification
            .trim()
            .chars()
            .take(MAX_JUSTIFICATION)
            .collect();
        if justification.is_empty() {
            return Err("say why: `justification` is empty".into());
        }
        let decider = self
            .engine
            .decider
            .clone()
            .ok_or("this agent has no control plane (agent.decider) to ask")?;
        if !self.is_watched(caller) {
            return Err(format!(
                "account {:?} is not watched on this host: only watched accounts ask ahead",
                caller.account
            ));
        }
        let slot = self
            .engine
            .take_asked_ahead(&caller.account, &settings)
            .ok_or("too many requests asked ahead and still waiting: wait for their decisions")?;
        let rule = rules
            .iter()
            .find(|r| Some(&r.name) == e.rule.as_ref().map(|d| &d.name));
        // Nothing is held: a request asked ahead always has a deadline, even under a rule
        // that waits (`on_timeout = "wait"`), so it cannot keep its slot for ever.
        let secs = rule
            .and_then(|r| r.timeout_secs)
            .unwrap_or(settings.hold_timeout_secs);
        let n = self
            .asked
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let now_mono = crate::bpf::monotonic_ns();
        request.request_id = format!(
            "{}-ahead-{}-{}",
            self.engine.host_id,
            mono_to_unix_ms(now_mono),
            n
        );
        request.held_at_unix_ms = mono_to_unix_ms(now_mono);
        request.deadline_unix_ms = request.held_at_unix_ms + (secs as i64) * 1000;
        request.on_timeout = Verdict::Deny as i32;
        request.asked_ahead = true;
        request.justification = justification;
        request.ahead_minutes = minutes.unwrap_or(10).clamp(1, MAX_AHEAD_MINUTES);
        let id = request.request_id.clone();
        tracing::info!(request = %id, account = %caller.account, rule = %request.rule, "asked ahead");
        let answer = decider.ask(request);
        // Waits for the decision (the pending slot counts until then), then stops resending.
        let id2 = id.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let _ = tokio::time::timeout(Duration::from_secs(secs), answer).await;
            decider.forget(&id2);
        });
        Ok(json!({
            "asked": true,
            "request_id": id,
            "state": "pending",
            "rule": e.rule.map(|d| d.name),
            "deadline_secs": secs,
            "next": "approvers see the request with your justification; call airlock_status with wait_secs to wait for the decision. An approval is a grant: the same command, run by this account in the same directory, then passes at once.",
        }))
    }

    async fn status(&self, caller: &Caller, id: &str, wait_secs: u64) -> Result<Value, String> {
        let deadline =
            tokio::time::Instant::now() + Duration::from_secs(wait_secs.min(MAX_WAIT_SECS));
        let mut client = self.query_client().await?;
        loop {
            let held = tokio::time::timeout(
                QUERY_LIMIT,
                client.get(GetHostRequest {
                    request_id: id.to_owned(),
                }),
            )
            .await
            .map_err(|_| "the control plane did not answer in time".to_owned())?
            .map(tonic::Response::into_inner)
            .map_err(|e| match e.code() {
                tonic::Code::NotFound => not_yours(id, &caller.account),
                _ => format!("the control plane: {}", e.message()),
            })?;
            // Another account's request is as unknown as a missing one.
            if !belongs_to(&held, &caller.account) {
                return Err(not_yours(id, &caller.account));
            }
            if held.state() != RequestState::Pending || tokio::time::Instant::now() >= deadline {
                return Ok(held_json(&held));
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    async fn why(&self, caller: &Caller, limit: u32) -> Result<Value, String> {
        let mut client = self.query_client().await?;
        let recent = tokio::time::timeout(
            QUERY_LIMIT,
            client.recent(RecentQuery {
                account: caller.account.clone(),
                limit: limit.clamp(1, 100),
            }),
        )
        .await
        .map_err(|_| "the control plane did not answer in time".to_owned())?
        .map(tonic::Response::into_inner)
        .map_err(|e| format!("the control plane: {}", e.message()))?;
        let list: Vec<Value> = recent
            .requests
            .iter()
            .filter(|h| belongs_to(h, &caller.account))
            .map(held_json)
            .collect();
        Ok(json!({ "account": caller.account, "requests": list }))
    }
}

/// What [`LocalApi::examine`] needs of the running agent, copied for a blocking thread.
struct Snapshot {
    rules: Vec<RuleConfig>,
    settings: crate::config::AgentSection,
    resolved: crate::policy::Resolved,
    config_path: PathBuf,
}

/// An action examined for a caller.
struct Examined {
    e: Explanation,
    rules: Vec<RuleConfig>,
    /// The request it would make (no id, deadline or ask-ahead fields yet).
    request: ActionRequest,
}

/// The thread's file-system identity switched to a caller's (`setfsuid`/`setfsgid` act on the
/// calling thread only, and drop root's file capabilities while they are not 0); back to root
/// when dropped.
struct FsIdentity;

impl FsIdentity {
    fn become_(uid: u32, gid: u32) -> Self {
        // SAFETY: plain syscalls on the current thread's credentials.
        unsafe {
            libc::syscall(libc::SYS_setfsgid, gid);
            libc::syscall(libc::SYS_setfsuid, uid);
        }
        Self
    }
}

impl Drop for FsIdentity {
    fn drop(&mut self) {
        // SAFETY: as above, back to root's.
        unsafe {
            libc::syscall(libc::SYS_setfsuid, 0);
            libc::syscall(libc::SYS_setfsgid, 0);
        }
    }
}

/// The action `args` names, resolved as the caller's shell would (its PATH and cwd), what the
/// rules say of it for the caller, and the request it would make.
fn examine_now(snap: &Snapshot, caller: &Caller, args: &ActionArgs) -> Result<Examined, String> {
    let cwd = match &args.cwd {
        // A directory the caller names must be one: absolute, existing, as the kernel will
        // see it (the request shows it, and a grant is bound to it).
        Some(c) => {
            let c = PathBuf::from(c);
            if !c.is_absolute() {
                return Err(format!("cwd {:?} must be an absolute path", c.display()));
            }
            std::fs::canonicalize(&c)
                .ok()
                .filter(|p| p.is_dir())
                .ok_or_else(|| format!("cwd {:?} is not a directory you can reach", c.display()))?
        }
        None => std::fs::read_link(format!("/proc/{}/cwd", caller.pid))
            .unwrap_or_else(|_| PathBuf::from("/")),
    };
    let action = match (&args.command, &args.destination) {
        (Some(line), None) => {
            let search = caller_path(caller.pid);
            Action::exec_in(line, false, &snap.rules, &search, &cwd).map_err(|e| e.to_string())?
        }
        (None, Some(dest)) => {
            let protocol = match args.protocol.as_deref() {
                None | Some("tcp") => Transport::Tcp,
                Some("udp") => Transport::Udp,
                Some(other) => return Err(format!("protocol {other:?}: use tcp or udp")),
            };
            Action::connect(dest, protocol).map_err(|e| e.to_string())?
        }
        _ => return Err("give either `command` or `destination`".into()),
    };
    // The names in connect rules stand for what the running agent resolved them to.
    let mut tester = Tester::new_resolved(
        &snap.rules,
        &snap.config_path,
        &snap.settings,
        &snap.resolved,
    )
    .map_err(|e| e.to_string())?;
    let e = tester.explain(&action, Some(&caller.account));
    let request = request_of(snap, caller, &e, &cwd);
    Ok(Examined {
        e,
        rules: snap.rules.clone(),
        request,
    })
}

/// The request the action would make, as the agent would send it for the caller.
fn request_of(snap: &Snapshot, caller: &Caller, e: &Explanation, cwd: &Path) -> ActionRequest {
    let rule = e
        .rule
        .as_ref()
        .and_then(|d| snap.rules.iter().find(|r| r.name == d.name));
    let mut process = procinfo::gather(
        Path::new("/proc"),
        caller.pid,
        caller.pid,
        caller.uid,
        &snap.settings.env_allow,
    );
    // What the caller says, not what its MCP server process is.
    process.cwd = cwd.display().to_string();
    process.user = caller.account.clone();
    process.uid = caller.uid;
    let action = match &e.action {
        Action::Exec {
            given,
            program,
            args,
            ..
        } => {
            let mut argv = vec![given.clone()];
            argv.extend(args.iter().cloned());
            // As the kernel will name it: symlinks resolved.
            let path = std::fs::canonicalize(program).unwrap_or_else(|_| program.clone());
            ProtoAction::Exec(ExecAction {
                path: path.display().to_string(),
                argv,
                via: "asked ahead".into(),
                ..Default::default()
            })
        }
        Action::Connect {
            address,
            port,
            protocol,
            name,
        } => ProtoAction::Connect(ConnectAction {
            address: address.to_string(),
            port: (*port).into(),
            protocol: match protocol {
                Transport::Tcp => Protocol::Tcp,
                Transport::Udp => Protocol::Udp,
            } as i32,
            name: name.clone().unwrap_or_default(),
            ..Default::default()
        }),
    };
    ActionRequest {
        rule: rule.map(|r| r.name.clone()).unwrap_or_default(),
        risk: rule.map(|r| r.risk.clone()).unwrap_or_default(),
        description: rule.map(|r| r.description.clone()).unwrap_or_default(),
        process: Some(process),
        action: Some(action),
        ..Default::default()
    }
}

fn not_yours(id: &str, account: &str) -> String {
    format!("no request {id:?} of account {account:?} on this host")
}

/// Whether `held` was made by `account` (as itself, or a task descending from it).
fn belongs_to(held: &HeldRequest, account: &str) -> bool {
    held.request
        .as_ref()
        .and_then(|r| r.process.as_ref())
        .is_some_and(|p| p.user == account || p.watched_as == account)
}

/// The caller's `PATH`, from its environment (a bare program name resolves as its shell would).
fn caller_path(pid: u32) -> Vec<PathBuf> {
    let env = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
    env.split(|b| *b == 0)
        .find_map(|kv| kv.strip_prefix(b"PATH="))
        .map(|p| {
            std::env::split_paths(std::ffi::OsStr::new(&*String::from_utf8_lossy(p))).collect()
        })
        .unwrap_or_else(|| {
            ["/usr/local/bin", "/usr/bin", "/bin"]
                .map(PathBuf::from)
                .to_vec()
        })
}

fn explanation_json(
    e: &Explanation,
    rules: &[RuleConfig],
    settings: &crate::config::AgentSection,
) -> Value {
    let mut v = serde_json::to_value(e).unwrap_or_else(|_| json!({}));
    v["decision"] = json!(decision_word(e.decision));
    let mode = e
        .rule
        .as_ref()
        .and_then(|d| rules.iter().find(|r| r.name == d.name))
        .and_then(|r| r.mode)
        .unwrap_or(settings.mode);
    v["mode"] = json!(mode);
    v["summary"] = json!(match (e.decision, &e.rule) {
        (Decision::Allow, _) => "allowed: it runs without a hold".to_owned(),
        (Decision::Deny, Some(r)) => format!("denied by rule {:?} without asking", r.name),
        (Decision::Deny, None) => "denied".to_owned(),
        (Decision::Ask, Some(r)) => format!("held for approval by rule {:?}", r.name),
        (Decision::Ask, None) => "held for approval".to_owned(),
    });
    v
}

fn route_json(r: &RouteAnswer) -> Value {
    let mut v = json!({
        "routed_by": if r.route.is_empty() { "the default: any one approver" } else { r.route.as_str() },
        "approver_groups": r.groups,
        "quorum": r.quorum.max(1),
    });
    if !r.grant_id.is_empty() {
        v["covered_by_grant"] = json!({
            "id": r.grant_id,
            "by": r.grant_by,
            "until_unix_ms": r.grant_expires_unix_ms,
        });
    }
    v
}

fn held_json(h: &HeldRequest) -> Value {
    let r = h.request.clone().unwrap_or_default();
    let what = match &r.action {
        Some(ProtoAction::Exec(e)) => e.argv.join(" "),
        Some(ProtoAction::Connect(c)) => format!("connect to {}:{}", c.address, c.port),
        None => String::new(),
    };
    // REQUEST_STATE_APPROVED -> approved
    let state = h
        .state()
        .as_str_name()
        .trim_start_matches("REQUEST_STATE_")
        .to_ascii_lowercase();
    let votes: Vec<Value> = h
        .votes
        .iter()
        .map(|v| {
            json!({
                "approver": v.approver,
                "verdict": if v.verdict == Verdict::Allow as i32 { "approve" } else { "deny" },
                "reason": v.reason,
            })
        })
        .collect();
    json!({
        "request_id": r.request_id,
        "action": what,
        "rule": r.rule,
        "state": state,
        "decided_by": h.decided_by,
        "reason": h.reason,
        "votes": votes,
        "asked_ahead": r.asked_ahead,
        "grant_id": h.grant_id,
        "received_unix_ms": h.received_unix_ms,
        "deadline_unix_ms": if r.wait { Value::Null } else { json!(r.deadline_unix_ms) },
    })
}
